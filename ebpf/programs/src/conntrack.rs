//! Connection tracking: one CONNTRACK entry per flow, keyed by the tuple of the flow's first
//! allowed packet. Each hook that allows a forward packet sets its own flag (`EGRESS_OK` at
//! the sender's hook, `INGRESS_OK` at the receiver's), so one entry serves both pods of a
//! node-local flow. A packet whose reversed tuple has the opposite hook's flag is a reply.
//! Entries idle longer than their protocol's timeout count as missing; the LRU evicts them.
use palisade_common::{CtKey, CtValue, ct_flags, direction, proto};

use crate::{maps::CONNTRACK, parse::Packet};

const SEC: u64 = 1_000_000_000;
/// TCP after a reply was seen and before it closed.
pub const TCP_ESTABLISHED_TIMEOUT_NS: u64 = 6 * 3600 * SEC;
/// TCP before any reply (a SYN without answer).
pub const TCP_SYN_TIMEOUT_NS: u64 = 60 * SEC;
/// TCP after a RST, or after FINs in both directions.
pub const TCP_CLOSING_TIMEOUT_NS: u64 = 10 * SEC;
/// UDP, ICMP, SCTP and every other protocol.
pub const OTHER_TIMEOUT_NS: u64 = 60 * SEC;

const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// The flag a hook sets on the flows it allows.
#[inline(always)]
pub const fn own_flag(dir: u8) -> u32 {
    if dir == direction::EGRESS { ct_flags::EGRESS_OK } else { ct_flags::INGRESS_OK }
}

/// The flag a reply needs at this hook: the opposite hook allowed the flow.
#[inline(always)]
pub const fn reply_flag(dir: u8) -> u32 {
    if dir == direction::EGRESS { ct_flags::INGRESS_OK } else { ct_flags::EGRESS_OK }
}

#[inline(always)]
fn closing(flags: u32) -> bool {
    flags & ct_flags::TCP_RST != 0
        || flags & (ct_flags::TCP_FIN_FWD | ct_flags::TCP_FIN_REV) == (ct_flags::TCP_FIN_FWD | ct_flags::TCP_FIN_REV)
}

/// Whether the entry is recent enough to count.
#[inline(always)]
fn live(v: &CtValue, protocol: u8, now: u64) -> bool {
    let timeout = if protocol == proto::TCP {
        if closing(v.flags) {
            TCP_CLOSING_TIMEOUT_NS
        } else if v.flags & ct_flags::SEEN_REPLY == 0 {
            TCP_SYN_TIMEOUT_NS
        } else {
            TCP_ESTABLISHED_TIMEOUT_NS
        }
    } else {
        OTHER_TIMEOUT_NS
    };
    // Another CPU may have stamped the entry a little after `now` was read.
    now.saturating_sub(v.last_seen_ns) <= timeout
}

#[inline(always)]
fn tcp_bits(pkt: &Packet, fin: u32) -> u32 {
    let mut f = 0;
    if pkt.protocol == proto::TCP {
        if pkt.tcp_flags & TCP_FIN != 0 {
            f |= fin;
        }
        if pkt.tcp_flags & TCP_RST != 0 {
            f |= ct_flags::TCP_RST;
        }
    }
    f
}

/// If `pkt` is a reply of a live flow the opposite hook allowed (its reversed tuple is
/// `rev`), refreshes the entry and returns true. A TCP SYN without ACK (`syn_only`) is a
/// reply only in a simultaneous open: the flow has seen nothing back yet and is not closing
/// (the peer's SYN crossed ours, RFC 9293 3.5); afterwards, or on a closed flow, it opens a
/// new flow and policy decides.
#[inline(always)]
pub fn reply(rev: &CtKey, pkt: &Packet, dir: u8, now: u64, syn_only: bool) -> bool {
    let Some(v) = CONNTRACK.get_ptr_mut(rev) else {
        return false;
    };
    // SAFETY: a pointer into the map value returned by the kernel for this key; concurrent
    // updates of the same entry can only lose a flag or a timestamp, never corrupt memory.
    let v = unsafe { &mut *v };
    if !live(v, rev.protocol, now) || v.flags & reply_flag(dir) == 0 {
        return false;
    }
    if syn_only && (v.flags & ct_flags::SEEN_REPLY != 0 || closing(v.flags)) {
        return false;
    }
    v.last_seen_ns = now;
    let flags = v.flags | ct_flags::SEEN_REPLY | tcp_bits(pkt, ct_flags::TCP_FIN_REV);
    if flags != v.flags {
        v.flags = flags;
    }
    true
}

/// Whether an ICMP error quoting the packet `quoted` (as its sender sent it) belongs to a
/// live flow: the quote is a forward packet of a flow the opposite hook allowed, or a reply
/// of a flow this hook allowed.
#[inline(always)]
pub fn related(quoted: &CtKey, dir: u8, now: u64) -> bool {
    // SAFETY: the entry is read once and copied; a concurrent update can only make the
    // answer stale by one packet.
    if let Some(v) = unsafe { CONNTRACK.get(quoted) }
        && live(v, quoted.protocol, now)
        && v.flags & reply_flag(dir) != 0
    {
        return true;
    }
    let rev = quoted.reversed();
    // SAFETY: as above.
    if let Some(v) = unsafe { CONNTRACK.get(rev) }
        && live(v, rev.protocol, now)
        && v.flags & own_flag(dir) != 0
    {
        return true;
    }
    false
}

/// The live forward entry of `key`, if any. A TCP SYN (without ACK) on a closing flow
/// starts a new flow: the old entry does not count.
#[inline(always)]
pub fn forward(key: &CtKey, pkt: &Packet, now: u64) -> Option<*mut CtValue> {
    let p = CONNTRACK.get_ptr_mut(key)?;
    // SAFETY: see `reply`.
    let v = unsafe { &*p };
    if !live(v, key.protocol, now) {
        return None;
    }
    if pkt.protocol == proto::TCP && pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN && closing(v.flags) {
        return None;
    }
    Some(p)
}

/// The policy generation at which this hook last allowed a forward packet of the flow `fwd`
/// (0: never, or the hook does not enforce).
#[inline(always)]
pub fn allowed_at(fwd: *mut CtValue, dir: u8) -> u32 {
    // SAFETY: see `reply`.
    unsafe { (*fwd).policy_gen[(dir & 1) as usize] }
}

/// Records that this hook allowed a forward packet, by policy at generation `generation` (0: not
/// by policy): refreshes the live entry `fwd`, or creates a new one.
#[inline(always)]
pub fn allowed(key: &CtKey, fwd: Option<*mut CtValue>, pkt: &Packet, dir: u8, now: u64, cookie: u32, generation: u32) {
    let bits = own_flag(dir) | tcp_bits(pkt, ct_flags::TCP_FIN_FWD);
    let slot = (dir & 1) as usize;
    if let Some(p) = fwd {
        // SAFETY: see `reply`.
        let v = unsafe { &mut *p };
        v.last_seen_ns = now;
        let flags = v.flags | bits;
        if flags != v.flags {
            v.flags = flags;
        }
        if cookie != 0 && v.cookie != cookie {
            v.cookie = cookie;
        }
        if v.policy_gen[slot] != generation {
            v.policy_gen[slot] = generation;
        }
    } else {
        let mut policy_gen = [0; 2];
        policy_gen[slot] = generation;
        let v = CtValue { last_seen_ns: now, created_ns: now, flags: bits, cookie, policy_gen };
        // A full LRU evicts the oldest entry; failure only means no conntrack entry.
        let _ = CONNTRACK.insert(key, v, 0);
    }
}

/// Records that this hook dropped a forward packet of the flow: its replies stop passing here.
#[inline(always)]
pub fn dropped(fwd: Option<*mut CtValue>, dir: u8) {
    if let Some(p) = fwd {
        // SAFETY: see `reply`.
        let v = unsafe { &mut *p };
        if v.flags & own_flag(dir) != 0 {
            v.flags &= !own_flag(dir);
        }
        let slot = (dir & 1) as usize;
        if v.policy_gen[slot] != 0 {
            v.policy_gen[slot] = 0;
        }
    }
}
