//! Identity and policy lookups: the peer's identity from the ipcache (host entry first, else
//! longest prefix, world when absent) and the verdict from the longest POLICY entries for
//! the exact peer identity and for any peer, where a deny from either beats any allow.
use aya_ebpf::maps::lpm_trie::Key;
use palisade_common::{
    Ipv4Prefix, Ipv6Prefix, POLICY_LENGTHS_COUNT, POLICY_PREFIX_FIXED, POLICY_PREFIX_PROTO, PolicyKey,
    PolicyLengthsKey, PolicyValue, family, identity, match_kind, policy_flags, reason,
};

use crate::maps::{IPCACHE_HOST_V4, IPCACHE_HOST_V6, IPCACHE_V4, IPCACHE_V6, POLICY, POLICY_LENGTHS};

/// The security identity of the address `addr` (IPv4 in the first 4 bytes): its host entry
/// (always the longest prefix) if there is one, else the longest prefix in the trie.
#[inline(always)]
pub fn peer_identity(fam: u8, addr: &[u8; 16]) -> u32 {
    if fam == family::IPV4 {
        let host = Ipv4Prefix { addr: [addr[0], addr[1], addr[2], addr[3]] };
        // SAFETY: the value is copied out at once.
        if let Some(v) = unsafe { IPCACHE_HOST_V4.get(host) } {
            return v.identity;
        }
        match IPCACHE_V4.get(Key::new(32, host)) {
            Some(v) => v.identity,
            None => identity::WORLD_IPV4,
        }
    } else {
        let host = Ipv6Prefix { addr: *addr };
        // SAFETY: the value is copied out at once.
        if let Some(v) = unsafe { IPCACHE_HOST_V6.get(host) } {
            return v.identity;
        }
        match IPCACHE_V6.get(Key::new(128, host)) {
            Some(v) => v.identity,
            None => identity::WORLD_IPV6,
        }
    }
}

/// The [`ipcache_flags`](palisade_common::ipcache_flags) of the host entry of `addr`
/// (0 without one): local endpoints' addresses are always host entries.
#[inline(always)]
pub fn host_flags(fam: u8, addr: &[u8; 16]) -> u32 {
    if fam == family::IPV4 {
        let host = Ipv4Prefix { addr: [addr[0], addr[1], addr[2], addr[3]] };
        // SAFETY: the value is copied out at once.
        match unsafe { IPCACHE_HOST_V4.get(host) } {
            Some(v) => v.flags,
            None => 0,
        }
    } else {
        let host = Ipv6Prefix { addr: *addr };
        // SAFETY: the value is copied out at once.
        match unsafe { IPCACHE_HOST_V6.get(host) } {
            Some(v) => v.flags,
            None => 0,
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

/// The longest POLICY entry matching (endpoint, direction, `peer`, protocol, port): probes
/// POLICY at the prefix lengths `POLICY_LENGTHS` lists for (endpoint, direction, `peer`),
/// longest first. One hash lookup when there is no entry for the peer at all, two when its
/// longest entry matches; never more than one per prefix length in use.
#[inline(always)]
fn longest(view: u8, endpoint_id: u16, dir: u8, peer: u32, protocol: u8, port: u16) -> Option<&'static PolicyValue> {
    // SAFETY: the bitmap is copied out at once.
    let mut bits = match unsafe { POLICY_LENGTHS.get(PolicyLengthsKey::new(endpoint_id, dir, peer).in_view(view)) } {
        Some(b) => *b,
        None => return None,
    };
    let key = PolicyKey::new(endpoint_id, dir, peer, protocol, port).in_view(view);
    // Straight from one length in use to the next shorter one: a lookup per set bit, not a
    // test per possible length.
    for _ in 0..POLICY_LENGTHS_COUNT {
        if bits == 0 {
            return None;
        }
        let top = highest_bit(bits);
        // SAFETY: the reference is only read, while the program runs (RCU).
        if let Some(v) = unsafe { POLICY.get(key.at_prefix(POLICY_PREFIX_FIXED + top)) } {
            return Some(v);
        }
        bits &= !(1 << top);
    }
    None
}

/// The index of the highest set bit of `x` (non-zero), without a branch: BPF has no
/// count-leading-zeros instruction, and a branch per halving step would split the
/// verifier's states (32 paths per probe) until the program no longer verifies. Every bit
/// below the highest is set, then the bits are counted (SWAR popcount).
#[inline(always)]
fn highest_bit(x: u32) -> u32 {
    let mut x = x;
    x |= x >> 1;
    x |= x >> 2;
    x |= x >> 4;
    x |= x >> 8;
    x |= x >> 16;
    x -= (x >> 1) & 0x5555_5555;
    x = (x & 0x3333_3333) + ((x >> 2) & 0x3333_3333);
    x = (x + (x >> 4)) & 0x0f0f_0f0f;
    let ones = x.wrapping_mul(0x0101_0101) >> 24;
    ones.wrapping_sub(1) & 31
}

/// Looks the packet up in POLICY for endpoint `endpoint_id` in direction `dir`, in view
/// `view` ([`policy_view`](palisade_common::policy_view): the enforced entries or the audit
/// view's).
#[inline(always)]
pub fn check(view: u8, endpoint_id: u16, dir: u8, peer: u32, protocol: u8, port: u16) -> PolicyVerdict {
    // Results stay references (null when absent): copying them into an `Option` of values
    // lets LLVM read the fields of a `None`, which the verifier rejects as uninitialised.
    let exact = longest(view, endpoint_id, dir, peer, protocol, port);
    // A deny for the exact identity decides: nothing the any-peer lookup finds can beat it.
    let exact_denies = exact.is_some_and(|e| e.flags & policy_flags::DENY != 0);
    let any = if peer == identity::ANY || exact_denies {
        None
    } else {
        longest(view, endpoint_id, dir, identity::ANY, protocol, port)
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
