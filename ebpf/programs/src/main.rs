//! palisade's tc programs, one per direction of a pod's host-side veth:
//!
//! - `palisade_from_pod` on the host side's tc ingress sees what the pod sends (pod egress);
//! - `palisade_to_pod` on the host side's tc egress sees what the pod receives (pod ingress).
//!
//! For every packet of a known endpoint (ENDPOINTS, by interface index): parse, find the
//! peer's identity, let replies and related ICMP errors of allowed flows through
//! (conntrack), otherwise look the policy up (deny wins); then count, report drops (and new
//! allowed flows when asked to) in the EVENTS ring buffer, and pass or drop.
#![no_std]
#![no_main]

mod conntrack;
mod maps;
mod parse;
mod policy;

use aya_ebpf::{
    helpers::{bpf_ktime_get_coarse_ns, bpf_ktime_get_ns},
    macros::classifier,
    programs::TcContext,
};
use palisade_common::{
    EndpointInfo, VerdictEvent, config, counter_index, direction, endpoint_flags, family, match_kind, proto, reason,
    verdict,
};

use crate::{
    conntrack::{TCP_ACK, TCP_SYN},
    maps::{CONFIG, COUNTERS, ENDPOINTS, EVENTS, FRAGMENTS},
    parse::{Malformed, Packet, Parsed, fragment, icmp_class},
};

/// Let the packet continue (tcx: next program, then the stack).
const TC_ACT_UNSPEC: i32 = -1;
/// Drop the packet.
const TC_ACT_SHOT: i32 = 2;

#[classifier]
pub fn palisade_from_pod(ctx: TcContext) -> i32 {
    match try_classify(&ctx, direction::EGRESS) {
        Ok(action) => action,
        Err(action) => action,
    }
}

#[classifier]
pub fn palisade_to_pod(ctx: TcContext) -> i32 {
    match try_classify(&ctx, direction::INGRESS) {
        Ok(action) => action,
        Err(action) => action,
    }
}

/// Passes every packet and does nothing else: the baseline the datapath benchmark measures
/// the real programs against (what BPF_PROG_TEST_RUN and the tc context cost by
/// themselves). Loaded only on demand (`Datapath::test_run_empty`), never attached.
#[classifier]
pub fn palisade_empty(_ctx: TcContext) -> i32 {
    TC_ACT_UNSPEC
}

/// The outcome for one packet.
struct Verdict {
    reason: u8,
    match_kind: u8,
    cookie: u32,
    peer_identity: u32,
    /// Send a verdict event.
    report: bool,
}

/// Classifies one packet: `Ok(TC_ACT_UNSPEC)` to pass, `Err(TC_ACT_SHOT)` to drop.
#[inline(always)]
fn try_classify(ctx: &TcContext, dir: u8) -> Result<i32, i32> {
    // SAFETY: `skb` is the context pointer the kernel passed to the program.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: the value is copied out at once.
    let ep = match unsafe { ENDPOINTS.get(ifindex) } {
        Some(ep) => *ep,
        None => return Ok(TC_ACT_UNSPEC),
    };
    let enforce_bit =
        if dir == direction::EGRESS { endpoint_flags::EGRESS_ENFORCED } else { endpoint_flags::INGRESS_ENFORCED };
    let enforced = ep.flags & enforce_bit != 0;

    let mut pkt = Packet::empty();
    let mut v = Verdict {
        reason: reason::ALLOWED_ALWAYS,
        match_kind: match_kind::NONE,
        cookie: 0,
        peer_identity: 0,
        report: false,
    };
    match parse::parse(ctx, &mut pkt) {
        Ok(Parsed::NotIp) => {}
        Ok(Parsed::Ip) => decide(ctx, &ep, dir, enforced, &mut pkt, &mut v),
        Err(Malformed) => {
            if enforced {
                v.reason = reason::DROP_MALFORMED;
                v.report = true;
            } else {
                v.reason = reason::ALLOWED_NOT_ENFORCED;
            }
        }
    }

    let len = ctx.len();
    count(v.reason, dir, len);
    if v.report {
        report(ifindex, &ep, dir, &pkt, &v, len);
    }
    if reason::is_drop(v.reason) { Err(TC_ACT_SHOT) } else { Ok(TC_ACT_UNSPEC) }
}

/// The verdict for a parsed IP packet.
#[inline(always)]
fn decide(ctx: &TcContext, ep: &EndpointInfo, dir: u8, enforced: bool, pkt: &mut Packet, v: &mut Verdict) {
    if pkt.icmp_class == icmp_class::NEIGHBOUR_DISCOVERY {
        // IPv6 does not work without it, whatever the policy.
        v.reason = reason::ALLOWED_ALWAYS;
        return;
    }
    // The peer's identity is looked up only where it is needed: for policy and for events.
    // Replies (the conntrack path) need neither.
    if dir == direction::EGRESS && spoofed(ep, pkt) {
        v.reason = reason::DROP_SPOOFED_SOURCE;
        v.report = true;
        v.peer_identity = peer_identity(dir, pkt);
        return;
    }
    if pkt.frag == fragment::FIRST {
        // Later fragments carry no ports: remember them for the datagram.
        let _ = FRAGMENTS.insert(pkt.frag_key(), pkt.frag_value(), 0);
    } else if pkt.frag == fragment::LATER && parse::has_ports(pkt.protocol) {
        // SAFETY: the value is copied out at once.
        match unsafe { FRAGMENTS.get(pkt.frag_key()) } {
            Some(first) => {
                let first = *first;
                pkt.apply_fragment(&first);
            }
            None if enforced => {
                v.reason = reason::DROP_FRAGMENT_UNKNOWN;
                v.report = true;
                v.peer_identity = peer_identity(dir, pkt);
                return;
            }
            None => {
                v.reason = reason::ALLOWED_NOT_ENFORCED;
                return;
            }
        }
    }

    // Conntrack needs seconds, not nanoseconds: the coarse clock (CLOCK_MONOTONIC at tick
    // resolution) costs a fraction of bpf_ktime_get_ns.
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    if pkt.icmp_class == icmp_class::ERROR
        && pkt.frag != fragment::LATER
        && let Some(quoted) = parse::quoted_ct_key(ctx, pkt)
        && conntrack::related(&quoted, dir, now)
    {
        v.reason = reason::ALLOWED_REPLY;
        return;
    }
    let key = pkt.ct_key();
    // ICMP: only echo replies are replies; other types with equal (zero) ports are not. A
    // TCP SYN without ACK opens a flow: it is never a reply.
    let may_be_reply = (pkt.icmp_class == icmp_class::NONE || pkt.icmp_class == icmp_class::ECHO_REPLY)
        && !(pkt.protocol == proto::TCP && pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN);
    if may_be_reply && conntrack::reply(&key.reversed(), pkt, dir, now) {
        v.reason = reason::ALLOWED_REPLY;
        return;
    }

    // A forward packet: policy decides every time, conntrack only remembers for the replies.
    // "Every time" without paying for it: a flow this hook allowed at the current policy
    // generation is allowed again without the identity and policy lookups; any change of
    // policy, identities or endpoints moves the generation on, and the next packet is
    // checked in full.
    let fwd = conntrack::forward(&key, pkt, now);
    // SAFETY: pointer from the map lookup in `forward`.
    let new_flow = fwd.is_none_or(|p| unsafe { (*p).flags } & conntrack::own_flag(dir) == 0);
    // Read before the lookups it vouches for: a change during them leaves an older stamp.
    let generation = if enforced { policy_generation() } else { 0 };
    // ICMP is left out: its conntrack key (echo identifier, or none) does not pin the type
    // that policy matches.
    let cacheable = enforced && !new_flow && generation != 0 && pkt.icmp_class == icmp_class::NONE;
    if let Some(p) = fwd
        && cacheable
        && conntrack::allowed_at(p, dir) == generation
    {
        v.reason = reason::ALLOWED_BY_POLICY;
        // SAFETY: as above.
        v.cookie = unsafe { (*p).cookie };
    } else if enforced {
        v.peer_identity = peer_identity(dir, pkt);
        let p = policy::check(ep.endpoint_id as u16, dir, v.peer_identity, pkt.protocol, pkt.policy_port);
        v.reason = p.reason;
        v.match_kind = p.match_kind;
        v.cookie = p.cookie;
    } else {
        v.reason = reason::ALLOWED_NOT_ENFORCED;
    }
    if reason::is_drop(v.reason) {
        conntrack::dropped(fwd, dir);
        v.report = true;
    } else {
        conntrack::allowed(&key, fwd, pkt, dir, now, v.cookie, generation);
        v.report = new_flow && allow_events_enabled();
        if v.report && !enforced {
            v.peer_identity = peer_identity(dir, pkt);
        }
    }
}

/// The identity of the packet's peer: the destination for egress, the source for ingress.
#[inline(always)]
fn peer_identity(dir: u8, pkt: &Packet) -> u32 {
    let peer_addr = if dir == direction::EGRESS { &pkt.daddr } else { &pkt.saddr };
    policy::peer_identity(pkt.family, peer_addr)
}

/// The pod sent from an address that is not its own (link-local and unspecified IPv6
/// sources are always its own: neighbour discovery and DAD use them).
#[inline(always)]
fn spoofed(ep: &EndpointInfo, pkt: &Packet) -> bool {
    if pkt.family == family::IPV4 {
        ep.flags & endpoint_flags::HAS_IPV4 != 0 && pkt.saddr[..4] != ep.ipv4
    } else {
        let s = &pkt.saddr;
        let link_local = s[0] == 0xfe && s[1] & 0xc0 == 0x80;
        let unspecified = *s == [0u8; 16];
        ep.flags & endpoint_flags::HAS_IPV6 != 0 && !link_local && !unspecified && *s != ep.ipv6
    }
}

/// The current policy generation (`config::POLICY_GEN`); 0 before the agent's first write.
#[inline(always)]
fn policy_generation() -> u32 {
    match CONFIG.get(config::POLICY_GEN) {
        Some(g) => *g,
        None => 0,
    }
}

#[inline(always)]
fn allow_events_enabled() -> bool {
    match CONFIG.get(config::FLAGS) {
        Some(flags) => *flags & config::FLAG_EMIT_ALLOW_EVENTS != 0,
        None => false,
    }
}

#[inline(always)]
fn count(r: u8, dir: u8, len: u32) {
    if let Some(c) = COUNTERS.get_ptr_mut(counter_index(r, dir)) {
        // SAFETY: this CPU's slot of a per-CPU array; programs do not migrate while running.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += len as u64;
        }
    }
}

#[inline(always)]
fn report(ifindex: u32, ep: &EndpointInfo, dir: u8, pkt: &Packet, v: &Verdict, len: u32) {
    // A full ring buffer loses the event; the counters still have the packet.
    let Some(mut entry) = EVENTS.reserve::<VerdictEvent>(0) else {
        return;
    };
    entry.write(VerdictEvent {
        // SAFETY: a helper without arguments.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        endpoint_id: ep.endpoint_id,
        ifindex,
        peer_identity: v.peer_identity,
        cookie: v.cookie,
        saddr: pkt.saddr,
        daddr: pkt.daddr,
        sport: pkt.sport,
        dport: pkt.dport,
        family: pkt.family,
        protocol: pkt.protocol,
        direction: dir,
        verdict: if reason::is_drop(v.reason) { verdict::DROP } else { verdict::ALLOW },
        reason: v.reason,
        match_kind: v.match_kind,
        tcp_flags: pkt.tcp_flags,
        pad: 0,
        pkt_len: len,
    });
    entry.submit(0);
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
