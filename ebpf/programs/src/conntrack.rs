//! Connection tracking: one CONNTRACK entry per pair of ends, keyed by the two ends in
//! address order ([`CtKey::normalised`]), so that a packet finds its flow with one lookup
//! whichever way it goes. The entry holds a flow per orientation of the key
//! ([`CtValue::orig`]): the one opened by a packet going that way (nearly always only one is
//! there). A packet's forward state is the flow of its own orientation, its reply state the
//! flow of the opposite one.
//!
//! Each hook that allows a forward packet sets its own flag (`EGRESS_OK` at the sender's
//! hook, `INGRESS_OK` at the receiver's), so one flow serves both pods of a node-local flow.
//! A packet is a reply when the flow of the opposite orientation has the opposite hook's
//! flag. Flows idle longer than their protocol's timeout count as missing; the LRU evicts
//! entries.
use aya_ebpf::bindings::BPF_NOEXIST;
use palisade_common::{CtKey, CtOrig, CtValue, ct_flags, direction, proto};

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

/// Whether the flow is there and recent enough to count.
#[inline(always)]
fn live(v: &CtOrig, protocol: u8, now: u64) -> bool {
    if v.last_seen_ns == 0 {
        return false;
    }
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

/// A packet's place in conntrack: its key, its orientation in it, and the entry if there
/// is one (a pointer into the map, valid while the program runs).
pub struct Flow {
    /// The key, in the per-CPU scratch slot.
    pub key: &'static CtKey,
    /// Index of the packet's own orientation in [`CtValue::orig`].
    fwd: usize,
    /// Index of the opposite orientation (the same as `fwd` when the tuple is its own reverse).
    rev: usize,
    entry: Option<*mut CtValue>,
}

/// Looks the packet's flow up: the one CONNTRACK lookup of a packet.
#[inline(always)]
pub fn lookup(pkt: &Packet, slot: &'static mut CtKey, orient: &mut [u32; 2]) -> Flow {
    let o = pkt.ct_key(slot);
    let key: &'static CtKey = slot;
    let (fwd, rev) = orientations(key, o, orient);
    let entry = CONNTRACK.get_ptr_mut(key);
    Flow { key, fwd, rev, entry }
}

/// The indices in [`CtValue::orig`] of a packet of orientation `o` in `key`: its own, and
/// the opposite one (the same when the tuple is its own reverse). Passed through map
/// memory (`slots`, in the scratch slot): the verifier then knows them only as 0 or 1, not
/// as constants, and the paths that computed different ones merge instead of doubling the
/// states it walks for the rest of the program (which went over its 1M instruction limit).
#[inline(always)]
pub fn orientations(key: &CtKey, o: usize, slots: &mut [u32; 2]) -> (usize, usize) {
    let fwd = (o & 1) as u32;
    let rev = if key.symmetric() { fwd } else { fwd ^ 1 };
    let p = slots.as_mut_ptr();
    // SAFETY: both within `slots`.
    unsafe {
        p.write_volatile(fwd);
        p.add(1).write_volatile(rev);
        ((p.read_volatile() & 1) as usize, (p.add(1).read_volatile() & 1) as usize)
    }
}

/// If `pkt` is a reply of a live flow the opposite hook allowed (the flow of the opposite
/// orientation in `flow`'s entry), refreshes that flow and returns true. A TCP SYN without
/// ACK (`syn_only`) is a reply only in a simultaneous open: the flow has seen nothing back
/// yet and is not closing (the peer's SYN crossed ours, RFC 9293 3.5); afterwards, or on a
/// closed flow, it opens a new flow and policy decides.
#[inline(always)]
pub fn reply(flow: &Flow, pkt: &Packet, dir: u8, now: u64, syn_only: bool) -> bool {
    let Some(p) = flow.entry else {
        return false;
    };
    // SAFETY: a pointer into the map value returned by the kernel for this key; concurrent
    // updates of the same entry can only lose a flag or a timestamp, never corrupt memory.
    let v = unsafe { &mut (*p).orig[flow.rev & 1] };
    if !live(v, flow.key.protocol, now) || v.flags & reply_flag(dir) == 0 {
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

/// Whether an ICMP error quoting a packet (as its sender sent it: `key` and `orientation`
/// from [`CtKey::normalised`]) belongs to a live flow: the quote is a forward packet of a
/// flow the opposite hook allowed, or a reply of a flow this hook allowed.
#[inline(always)]
pub fn related(key: &CtKey, orientation: usize, dir: u8, now: u64, slots: &mut [u32; 2]) -> bool {
    // SAFETY: the entry is read once and copied; a concurrent update can only make the
    // answer stale by one packet.
    let Some(e) = (unsafe { CONNTRACK.get(key) }) else {
        return false;
    };
    let (fwd, rev) = orientations(key, orientation, slots);
    let q = &e.orig[fwd];
    if live(q, key.protocol, now) && q.flags & reply_flag(dir) != 0 {
        return true;
    }
    let r = &e.orig[rev];
    live(r, key.protocol, now) && r.flags & own_flag(dir) != 0
}

/// The live forward flow of the packet (its own orientation), if any. A TCP SYN (without
/// ACK) on a closing flow starts a new flow: the old one does not count.
#[inline(always)]
pub fn forward(flow: &Flow, pkt: &Packet, now: u64) -> Option<*mut CtOrig> {
    let p = flow.entry?;
    // SAFETY: see `reply`; the index is 0 or 1.
    let o = unsafe { &raw mut (*p).orig[flow.fwd & 1] };
    // SAFETY: as above.
    let v = unsafe { &*o };
    if !live(v, flow.key.protocol, now) {
        return None;
    }
    if pkt.protocol == proto::TCP && pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN && closing(v.flags) {
        return None;
    }
    Some(o)
}

/// The policy generation at which this hook last allowed a forward packet of the flow `fwd`
/// (0: never, or the hook does not enforce).
#[inline(always)]
pub fn allowed_at(fwd: *mut CtOrig, dir: u8) -> u32 {
    // SAFETY: see `reply`.
    unsafe { (*fwd).policy_gen[(dir & 1) as usize] }
}

/// Records that this hook allowed a forward packet, by policy at generation `generation` (0: not
/// by policy): refreshes the live flow `fwd`, or opens a new one in the packet's orientation
/// (in the entry that is there, or a new entry).
#[inline(always)]
#[allow(clippy::too_many_arguments, reason = "the packet's flow and verdict, and the scratch space for a new entry")]
pub fn allowed(
    flow: &Flow,
    fwd: Option<*mut CtOrig>,
    pkt: &Packet,
    dir: u8,
    now: u64,
    cookie: u32,
    generation: u32,
    new_entry: &mut CtValue,
) {
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
        return;
    }
    let mut policy_gen = [0; 2];
    policy_gen[slot] = generation;
    let new = CtOrig { last_seen_ns: now, flags: bits, cookie, policy_gen };
    let o = flow.fwd & 1;
    if let Some(p) = flow.entry {
        // SAFETY: see `reply`.
        unsafe { (*p).orig[o] = new };
        return;
    }
    // The new entry is built in the scratch slot: on the stack, its zeroing would call the
    // byte-loop `memset` (see `Packet::clear`).
    crate::zero_words(core::ptr::from_mut(new_entry));
    new_entry.orig[o] = new;
    let v: &CtValue = new_entry;
    // A full LRU evicts the oldest entry; failure only means no conntrack entry. An entry
    // another CPU created meanwhile (for the other orientation) is kept: the flow goes into it.
    if CONNTRACK.insert(flow.key, v, u64::from(BPF_NOEXIST)).is_err()
        && let Some(p) = CONNTRACK.get_ptr_mut(flow.key)
    {
        // SAFETY: see `reply`.
        unsafe { (*p).orig[o] = new };
    }
}

/// Records that this hook dropped a forward packet of the flow: its replies stop passing here.
#[inline(always)]
pub fn dropped(fwd: Option<*mut CtOrig>, dir: u8) {
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
