//! Identity and policy lookups: the peer's identity from the ipcache (longest prefix, world
//! when absent) and the verdict from two POLICY lookups (exact peer identity, any peer),
//! where a deny from either beats any allow.
use aya_ebpf::maps::lpm_trie::Key;
use palisade_common::{
    Ipv4Prefix, Ipv6Prefix, POLICY_PREFIX_FULL, POLICY_PREFIX_PROTO, PolicyKey, family, identity, match_kind,
    policy_flags, reason,
};

use crate::maps::{IPCACHE_V4, IPCACHE_V6, POLICY};

/// The security identity of the address `addr` (IPv4 in the first 4 bytes).
#[inline(always)]
pub fn peer_identity(fam: u8, addr: &[u8; 16]) -> u32 {
    if fam == family::IPV4 {
        let key = Key::new(32, Ipv4Prefix { addr: [addr[0], addr[1], addr[2], addr[3]] });
        match IPCACHE_V4.get(&key) {
            Some(v) => v.identity,
            None => identity::WORLD_IPV4,
        }
    } else {
        let key = Key::new(128, Ipv6Prefix { addr: *addr });
        match IPCACHE_V6.get(&key) {
            Some(v) => v.identity,
            None => identity::WORLD_IPV6,
        }
    }
}

/// What the policy decided for one forward packet.
pub struct PolicyVerdict {
    /// `ALLOWED_BY_POLICY`, `DROP_POLICY_DENY_RULE` or `DROP_POLICY_DENIED`.
    pub reason: u8,
    pub match_kind: u8,
    pub cookie: u32,
}

/// Looks the packet up in POLICY for endpoint `endpoint_id` in direction `dir`.
#[inline(always)]
pub fn check(endpoint_id: u16, dir: u8, peer: u32, protocol: u8, port: u16) -> PolicyVerdict {
    // Results stay references (null when absent): copying them into an `Option` of values
    // lets LLVM read the fields of a `None`, which the verifier rejects as uninitialised.
    let exact = POLICY.get(Key::new(POLICY_PREFIX_FULL, PolicyKey::new(endpoint_id, dir, peer, protocol, port)));
    let any = if peer == identity::ANY {
        None
    } else {
        POLICY.get(Key::new(POLICY_PREFIX_FULL, PolicyKey::new(endpoint_id, dir, identity::ANY, protocol, port)))
    };
    // Deny first (exact identity preferred), then allow (exact identity preferred).
    let (f, exact_identity) = match (exact, any) {
        (Some(e), _) if e.flags & policy_flags::DENY != 0 => (e, true),
        (_, Some(a)) if a.flags & policy_flags::DENY != 0 => (a, false),
        (Some(e), _) => (e, true),
        (None, Some(a)) => (a, false),
        (None, None) => {
            return PolicyVerdict { reason: reason::DROP_POLICY_DENIED, match_kind: match_kind::NONE, cookie: 0 };
        }
    };
    let with_port = f.prefix_len >= POLICY_PREFIX_PROTO;
    let kind = match (exact_identity, with_port) {
        (true, true) => match_kind::L3_L4,
        (true, false) => match_kind::L3_ONLY,
        (false, true) => match_kind::L4_ONLY,
        (false, false) => match_kind::ALL,
    };
    let r = if f.flags & policy_flags::DENY != 0 { reason::DROP_POLICY_DENY_RULE } else { reason::ALLOWED_BY_POLICY };
    PolicyVerdict { reason: r, match_kind: kind, cookie: f.cookie }
}
