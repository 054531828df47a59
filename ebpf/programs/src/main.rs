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
#![allow(
    clippy::inline_always,
    reason = "every helper is inlined into the two programs on purpose: the verifier then tracks               packet-pointer bounds across the whole parse, and no BPF-to-BPF call frame eats               into the 512-byte stack"
)]

mod conntrack;
mod maps;
mod parse;
mod policy;

use aya_ebpf::bindings::BPF_NOEXIST;
use aya_ebpf::{
    helpers::{bpf_ktime_get_coarse_ns, bpf_ktime_get_ns},
    macros::classifier,
    programs::TcContext,
};
use palisade_common::{
    CtKey, CtValue, EndpointInfo, VerdictEvent, config, counter_index, direction, endpoint_flags, family, identity,
    ipcache_flags, match_kind, policy_view, proto, reason, verdict,
};

use crate::{
    conntrack::{TCP_ACK, TCP_SYN},
    maps::{CONFIG, COUNTERS, ENDPOINTS, EVENTS, FRAGMENTS, SCRATCH},
    parse::{Packet, Parsed, Reject, fragment, icmp_class},
};

/// Let the packet continue (tcx: next program, then the stack).
const TC_ACT_UNSPEC: i32 = -1;
/// Drop the packet.
const TC_ACT_SHOT: i32 = 2;

#[classifier]
#[expect(clippy::needless_pass_by_value, reason = "the signature `#[classifier]` requires")]
pub fn palisade_from_pod(ctx: TcContext) -> i32 {
    let (Ok(action) | Err(action)) = try_classify(&ctx, direction::EGRESS);
    action
}

#[classifier]
#[expect(clippy::needless_pass_by_value, reason = "the signature `#[classifier]` requires")]
pub fn palisade_to_pod(ctx: TcContext) -> i32 {
    let (Ok(action) | Err(action)) = try_classify(&ctx, direction::INGRESS);
    action
}

/// Passes every packet and does nothing else: the baseline the datapath benchmark measures
/// the real programs against (what `BPF_PROG_TEST_RUN` and the tc context cost by
/// themselves). Loaded only on demand (`Datapath::test_run_empty`), never attached.
#[classifier]
pub fn palisade_empty(_ctx: TcContext) -> i32 {
    TC_ACT_UNSPEC
}

/// Zeroes `*p` with one volatile 8-byte store per word. A plain zeroing (an assignment of a
/// zero value, `Default`) of anything above a few words compiles to a call of the BPF build
/// of `memset`, a loop over single bytes: for the 64-byte parsed packet that loop cost more
/// than the rest of a reply's path. Volatile stores cannot be merged back into that call.
/// `T` must be 8-aligned, a multiple of 8 bytes long, and valid when all zero.
#[inline(always)]
pub(crate) fn zero_words<T>(p: *mut T) {
    const { assert!(align_of::<T>() >= 8 && size_of::<T>().is_multiple_of(8)) };
    let words = p.cast::<u64>();
    let mut i = 0;
    while i < size_of::<T>() / 8 {
        // SAFETY: within `*p` (checked above: whole words); the callers' types are valid
        // all zero.
        unsafe { words.add(i).write_volatile(0) };
        i += 1;
    }
}

/// The outcome for one packet.
struct Verdict {
    reason: u8,
    match_kind: u8,
    cookie: u32,
    peer_identity: u32,
    /// Send a verdict event.
    report: bool,
    /// The drop the audit view gives a packet that passes (0: none): reported as an
    /// `AUDIT` event with `audit_cookie` and `audit_match_kind`.
    audit_reason: u8,
    audit_match_kind: u8,
    audit_cookie: u32,
}

/// Classifies one packet: `Ok(TC_ACT_UNSPEC)` to pass, `Err(TC_ACT_SHOT)` to drop.
#[inline(always)]
fn try_classify(ctx: &TcContext, dir: u8) -> Result<i32, i32> {
    // SAFETY: `skb` is the context pointer the kernel passed to the program.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // The packet's parsed fields live in a per-CPU scratch slot, not on the stack: the
    // stack stays within its 512 bytes, and the verifier, which does not track what map
    // memory holds, checks the decision once for all header chains instead of once for
    // every chain it can tell apart.
    let Some(slot) = SCRATCH.get_ptr_mut(0) else {
        return Err(TC_ACT_SHOT);
    };
    // SAFETY: this CPU's slot of a per-CPU array, used by nothing else while the program
    // runs (programs do not migrate, and tc programs do not nest on one CPU).
    let scratch = unsafe { &mut *slot };
    scratch.pkt.clear();
    let pkt = &mut scratch.pkt;
    let ct = &mut scratch.ct;
    let new_entry = &mut scratch.new_entry;
    let orient = &mut scratch.orient;
    // SAFETY: a plain write to this CPU's scratch slot.
    unsafe { core::ptr::write_volatile(&raw mut scratch.audit, 0) };
    let audit_out = &mut scratch.audit;
    let mut v = Verdict {
        reason: reason::ALLOWED_ALWAYS,
        match_kind: match_kind::NONE,
        cookie: 0,
        peer_identity: 0,
        report: false,
        audit_reason: 0,
        audit_match_kind: match_kind::NONE,
        audit_cookie: 0,
    };
    // SAFETY: the value is copied out at once.
    let Some(ep) = unsafe { ENDPOINTS.get(ifindex) }.copied() else {
        // The programs run only on endpoints' interfaces: one without a record is a pod the
        // table could not hold, or one not (or no longer) registered. Fail closed.
        let _ = parse::parse(ctx, pkt);
        v.reason = reason::DROP_NO_ENDPOINT;
        let len = ctx.len();
        count(v.reason, dir, len);
        report(ifindex, &EndpointInfo::default(), dir, pkt, &v, len);
        return Err(TC_ACT_SHOT);
    };
    let enforce_bit =
        if dir == direction::EGRESS { endpoint_flags::EGRESS_ENFORCED } else { endpoint_flags::INGRESS_ENFORCED };
    let enforced = ep.flags & enforce_bit != 0;

    match parse::parse(ctx, pkt) {
        Ok(Parsed::Arp) => {}
        Ok(Parsed::Ip) => decide(ctx, &ep, dir, enforced, pkt, ct, new_entry, orient, audit_out, &mut v),
        // Outside the grammar: dropped whether or not policy is enforced, since what the
        // kernel would make of it is not what the program saw.
        Err(Reject(r)) => {
            v.reason = r;
            v.report = true;
        }
    }
    if pkt.frag == fragment::FIRST {
        remember_fragment(pkt, v.reason);
    }

    let len = ctx.len();
    count(v.reason, dir, len);
    if v.report {
        report(ifindex, &ep, dir, pkt, &v, len);
    }
    let action = if reason::is_drop(v.reason) { Err(TC_ACT_SHOT) } else { Ok(TC_ACT_UNSPEC) };
    // SAFETY: a plain read of this CPU's scratch slot.
    let want = unsafe { core::ptr::read_volatile(&raw const scratch.audit) };
    if want & 1 != 0 {
        audit(ifindex, &ep, dir, &scratch.pkt, (want >> 32) as u32, len);
    }
    action
}

/// Audit mode: looks a packet that passed up in the audit view, and reports an `AUDIT`
/// event when that view would drop it. Runs after the verdict, with its inputs from the
/// scratch slot, so the verifier checks it once rather than once per path to it.
#[inline(always)]
fn audit(ifindex: u32, ep: &EndpointInfo, dir: u8, pkt: &Packet, peer: u32, len: u32) {
    let a = policy::check(policy_view::AUDIT, ep.endpoint_id as u16, dir, peer, pkt.protocol, pkt.policy_port);
    if reason::is_drop(a.reason) {
        let v = Verdict {
            reason: reason::ALLOWED_BY_POLICY,
            match_kind: match_kind::NONE,
            cookie: 0,
            peer_identity: peer,
            report: true,
            audit_reason: a.reason,
            audit_match_kind: a.match_kind,
            audit_cookie: a.cookie,
        };
        report(ifindex, ep, dir, pkt, &v, len);
    }
}

/// Records a first fragment's ports and verdict for its later fragments. Only a fragment
/// that passed, or that policy dropped, is recorded: one dropped as spoofed or malformed
/// is not its sender's to speak for. A denied one never replaces what is there, so it
/// cannot displace the record of an allowed datagram with the same id.
#[inline(always)]
fn remember_fragment(pkt: &Packet, r: u8) {
    if !reason::is_drop(r) {
        let _ = FRAGMENTS.insert(pkt.frag_key(), pkt.frag_value(0), 0);
    } else if r == reason::DROP_POLICY_DENIED || r == reason::DROP_POLICY_DENY_RULE {
        let _ = FRAGMENTS.insert(pkt.frag_key(), pkt.frag_value(r), u64::from(BPF_NOEXIST));
    }
}

/// The verdict for a parsed IP packet.
#[inline(always)]
#[allow(
    clippy::too_many_lines,
    reason = "one decision, step by step; split, it would take the same arguments everywhere"
)]
#[allow(
    clippy::too_many_arguments,
    reason = "the packet, its endpoint, and the scratch space the decision writes into"
)]
fn decide(
    ctx: &TcContext,
    ep: &EndpointInfo,
    dir: u8,
    enforced: bool,
    pkt: &mut Packet,
    ct: &'static mut CtKey,
    new_entry: &mut CtValue,
    orient: &mut [u32; 2],
    audit_out: &mut u64,
    v: &mut Verdict,
) {
    // The peer's identity is looked up only where it is needed: for policy and for events.
    // Replies (the conntrack path) need neither.
    if dir == direction::EGRESS && spoofed(ep, pkt) {
        v.reason = reason::DROP_SPOOFED_SOURCE;
        v.report = true;
        v.peer_identity = peer_identity(dir, pkt);
        return;
    }
    if dir == direction::INGRESS && local_source_elsewhere(ctx, pkt) {
        v.reason = reason::DROP_SPOOFED_SOURCE;
        v.report = true;
        v.peer_identity = peer_identity(dir, pkt);
        return;
    }
    if pkt.icmp_class == icmp_class::NEIGHBOUR_DISCOVERY && nd_exempt(ep, dir, pkt) {
        // IPv6 does not work without it, whatever the policy.
        v.reason = reason::ALLOWED_ALWAYS;
        return;
    }
    if pkt.frag == fragment::LATER && (pkt.family == family::IPV6 || parse::has_ports(pkt.family, pkt.protocol)) {
        // Later fragments carry no L4 header: take it from the first fragment.
        // SAFETY: the value is copied out at once.
        match unsafe { FRAGMENTS.get(pkt.frag_key()) } {
            Some(first) => {
                let first = *first;
                pkt.apply_fragment(first);
                if first.denied != 0 {
                    v.reason = first.denied;
                    v.report = true;
                    v.peer_identity = peer_identity(dir, pkt);
                    return;
                }
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
        && pkt.frag == fragment::NONE
        && related_error(ctx, ep, dir, pkt, ct, orient, now)
    {
        v.reason = reason::ALLOWED_REPLY;
        return;
    }
    let flow = conntrack::lookup(pkt, ct, orient);
    // ICMP: only echo replies are replies; other types with equal (zero) ports are not. A
    // TCP SYN without ACK is a reply only in a simultaneous open (`conntrack::reply`).
    let syn_only = pkt.protocol == proto::TCP && pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    let may_be_reply = pkt.icmp_class == icmp_class::NONE || pkt.icmp_class == icmp_class::ECHO_REPLY;
    if may_be_reply && conntrack::reply(&flow, pkt, dir, now, syn_only) {
        v.reason = reason::ALLOWED_REPLY;
        return;
    }

    // A forward packet: policy decides every time, conntrack only remembers for the replies.
    // "Every time" without paying for it: a flow this hook allowed at the current policy
    // generation is allowed again without the identity and policy lookups; any change of
    // policy, identities or endpoints moves the generation on, and the next packet is
    // checked in full.
    let fwd = conntrack::forward(&flow, pkt, now);
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
    } else {
        if enforced {
            v.peer_identity = peer_identity(dir, pkt);
            let p = policy::check(
                policy_view::ENFORCED,
                ep.endpoint_id as u16,
                dir,
                v.peer_identity,
                pkt.protocol,
                pkt.policy_port,
            );
            v.reason = p.reason;
            v.match_kind = p.match_kind;
            v.cookie = p.cookie;
        } else {
            v.reason = reason::ALLOWED_NOT_ENFORCED;
        }
        // Audit mode: what the enforced entries let through is looked up again in the audit
        // view (after the verdict, see `audit`), which never changes it. Only on directions
        // that have one, and on an unenforced direction only for a flow's first packet
        // (established flows there pay nothing; enforced ones are re-checked only when the
        // generation moves on).
        let audit_bit =
            if dir == direction::EGRESS { endpoint_flags::EGRESS_AUDIT } else { endpoint_flags::INGRESS_AUDIT };
        if ep.flags & audit_bit != 0 && !reason::is_drop(v.reason) && (enforced || new_flow) {
            if !enforced {
                v.peer_identity = peer_identity(dir, pkt);
            }
            // SAFETY: a plain write to this CPU's scratch slot.
            unsafe { core::ptr::write_volatile(audit_out, 1 | u64::from(v.peer_identity) << 32) };
        }
    }
    if reason::is_drop(v.reason) {
        conntrack::dropped(fwd, dir);
        v.report = true;
    } else {
        // ICMP opens a flow only with an echo request: an allowed error or other message
        // must not become an entry that lets unsolicited messages back in as "replies".
        if pkt.icmp_class == icmp_class::NONE || pkt.icmp_class == icmp_class::ECHO_REQUEST {
            conntrack::allowed(&flow, fwd, pkt, dir, now, v.cookie, generation, new_entry);
        }
        v.report = new_flow && allow_events_enabled();
        if v.report && !enforced {
            v.peer_identity = peer_identity(dir, pkt);
        }
    }
}

/// Whether an ICMP error is related to a live flow of this endpoint: the packet it quotes
/// was sent by the endpoint (ingress: the error comes back to it) or to it (egress: the
/// endpoint reports on what it received), in the orientation conntrack knows the flow in,
/// and the error comes from the quoted packet's other end, or (ingress only) from the node,
/// the one router on the path the datapath can name.
#[inline(always)]
fn related_error(
    ctx: &TcContext,
    ep: &EndpointInfo,
    dir: u8,
    pkt: &Packet,
    ct: &mut CtKey,
    orient: &mut [u32; 2],
    now: u64,
) -> bool {
    let Some(quoted) = parse::quoted_tuple(ctx, pkt) else {
        return false;
    };
    if dir == direction::INGRESS {
        if !own_address(ep, pkt.family, &pkt.daddr) || quoted.saddr != pkt.daddr {
            return false;
        }
        if quoted.daddr != pkt.saddr && peer_identity(dir, pkt) != identity::HOST {
            return false;
        }
    } else if quoted.daddr != pkt.saddr || quoted.saddr != pkt.daddr {
        return false;
    }
    let orientation = quoted.ct_key(pkt.family, ct);
    conntrack::related(ct, orientation, dir, now, orient)
}

/// Whether `addr` is the endpoint's address of that family (true when the endpoint has
/// none recorded: nothing to compare with).
#[inline(always)]
fn own_address(ep: &EndpointInfo, fam: u8, addr: &[u8; 16]) -> bool {
    if fam == family::IPV4 {
        ep.flags & endpoint_flags::HAS_IPV4 == 0 || addr[..4] == ep.ipv4
    } else {
        ep.flags & endpoint_flags::HAS_IPV6 == 0 || *addr == ep.ipv6
    }
}

#[inline(always)]
fn link_local(a: &[u8; 16]) -> bool {
    a[0] == 0xfe && a[1] & 0xc0 == 0x80
}

/// Interface- or link-local multicast (`ffX1::/16`, `ffX2::/16`): never routed off the link.
#[inline(always)]
fn link_scope_multicast(a: &[u8; 16]) -> bool {
    a[0] == 0xff && a[1] & 0x0f <= 2
}

#[inline(always)]
fn unspecified(a: &[u8; 16]) -> bool {
    *a == [0u8; 16]
}

/// Whether an ICMPv6 neighbour/multicast listener discovery message passes without policy:
/// only when it is well-formed (code 0, not fragmented, hop limit 255 for ND, 1 for MLD, as
/// the kernel's receivers require) and stays on the pod's link: the pod's side of it is the
/// pod's own (link-local, unspecified, its address, or link-scope multicast), and its other
/// side is link-local, link-scope multicast, unspecified, or the node itself. Anything
/// else is ICMPv6 like any other, and policy decides on its type.
#[inline(always)]
fn nd_exempt(ep: &EndpointInfo, dir: u8, pkt: &Packet) -> bool {
    let ty = pkt.dport;
    let hop_limit = if (133..=137).contains(&ty) { 255 } else { 1 };
    if pkt.frag != fragment::NONE || pkt.sport != 0 || pkt.hop_limit != hop_limit {
        return false;
    }
    let (local, peer) = if dir == direction::EGRESS { (&pkt.saddr, &pkt.daddr) } else { (&pkt.daddr, &pkt.saddr) };
    let local_ok = link_local(local)
        || (dir == direction::EGRESS && unspecified(local))
        || (dir == direction::INGRESS && link_scope_multicast(local))
        || own_address(ep, family::IPV6, local) && ep.flags & endpoint_flags::HAS_IPV6 != 0;
    if !local_ok {
        return false;
    }
    link_local(peer)
        || (dir == direction::EGRESS && link_scope_multicast(peer))
        || (dir == direction::INGRESS && unspecified(peer))
        || peer_identity(dir, pkt) == identity::HOST
}

/// A packet to the pod whose source is a local pod's address, arriving from somewhere that
/// is neither that pod's interface (whose own program checked the source) nor the node
/// itself: someone on the node's network pretending to be a local pod.
#[inline(always)]
fn local_source_elsewhere(ctx: &TcContext, pkt: &Packet) -> bool {
    // SAFETY: `skb` is the context pointer the kernel passed to the program.
    let iif = unsafe { (*ctx.skb.skb).ingress_ifindex };
    if iif == 0 {
        return false;
    }
    // SAFETY: only tested for presence.
    if unsafe { ENDPOINTS.get(iif) }.is_some() {
        return false;
    }
    policy::host_flags(pkt.family, &pkt.saddr) & ipcache_flags::LOCAL_ENDPOINT != 0
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
            (*c).bytes += u64::from(len);
        }
    }
}

#[inline(always)]
fn report(ifindex: u32, ep: &EndpointInfo, dir: u8, pkt: &Packet, v: &Verdict, len: u32) {
    // A full ring buffer loses the event; the counters still have the packet.
    let Some(mut entry) = EVENTS.reserve::<VerdictEvent>(0) else {
        return;
    };
    let audit = v.audit_reason != 0;
    entry.write(VerdictEvent {
        // SAFETY: a helper without arguments.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        endpoint_id: ep.endpoint_id,
        ifindex,
        peer_identity: v.peer_identity,
        cookie: if audit { v.audit_cookie } else { v.cookie },
        saddr: pkt.saddr,
        daddr: pkt.daddr,
        sport: pkt.sport,
        dport: pkt.dport,
        family: pkt.family,
        protocol: pkt.protocol,
        direction: dir,
        verdict: if audit {
            verdict::AUDIT
        } else if reason::is_drop(v.reason) {
            verdict::DROP
        } else {
            verdict::ALLOW
        },
        reason: if audit { v.audit_reason } else { v.reason },
        match_kind: if audit { v.audit_match_kind } else { v.match_kind },
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
