//! The attack suite: crafted frames, one test per attack (issue 13 and the attacks that were
//! already blocked), run through the real tc programs with `BPF_PROG_TEST_RUN` (needs root and
//! bpffs). Every test asserts the verdict, the one (reason, direction) counter that moved,
//! and, for drops, the verdict event with that reason. The legitimate cases the same issue
//! found dropped are here too, delivered or dropped by a documented choice.
//! docs/reliability.md lists which test shows which attack closed.
//!
//! The endpoint (on loopback, where `BPF_PROG_TEST_RUN` runs programs) is enforced both ways:
//!
//! | direction | peer        | allowed                       |
//! |-----------|-------------|-------------------------------|
//! | ingress   | PEER (300)  | TCP/8080, UDP/5353, ICMP echo request, ICMPv6 echo request |
//! | egress    | PEER (300)  | TCP/6000, UDP/9999, ICMPv6 echo request |
mod common;
#[path = "common/frames.rs"]
mod frames;

use frames::*;
use palisade_agent::datapath::Hook::{self, FromPod as OUT, ToPod as IN};
use palisade_common::{
    CtKey, CtOrig, CtValue, EndpointInfo, ct_flags, direction, endpoint_flags, identity, ipcache_flags, proto, reason,
};

const MLDV2_ROUTERS: [u8; 16] = [0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x16];

fn setup_with(ep: EndpointInfo) -> Fixture {
    let mut fx = Fixture::new("attack");
    fx.endpoint(LO, ep);
    let other = EndpointInfo { endpoint_id: 11, identity: OTHER_ID, flags: 0, ipv4: OTHER, ipv6: OTHER6 };
    fx.endpoint(OTHER_IF, other);
    let local = ipcache_flags::LOCAL_ENDPOINT;
    fx.host4(POD, 1000, local);
    fx.host4(PEER, PEER_ID, 0);
    fx.host4(OTHER, OTHER_ID, local);
    fx.host4(NODE, identity::HOST, 0);
    fx.host6(POD6, 1000, local);
    fx.host6(PEER6, PEER_ID, 0);
    fx.host6(OTHER6, OTHER_ID, local);
    fx.host6(NODE6, identity::HOST, 0);
    let (i, e) = (direction::INGRESS, direction::EGRESS);
    fx.rule(EP_ID, i, PEER_ID, proto::TCP, Some(8080), false);
    fx.rule(EP_ID, i, PEER_ID, proto::UDP, Some(5353), false);
    fx.rule(EP_ID, i, PEER_ID, proto::ICMP, Some(8), false);
    fx.rule(EP_ID, i, PEER_ID, proto::ICMPV6, Some(128), false);
    fx.rule(EP_ID, e, PEER_ID, proto::TCP, Some(6000), false);
    fx.rule(EP_ID, e, PEER_ID, proto::UDP, Some(9999), false);
    fx.rule(EP_ID, e, PEER_ID, proto::ICMPV6, Some(128), false);
    fx
}

fn setup() -> Fixture {
    setup_with(enforced_pod())
}

/// Runs `frame` and checks verdict, counter and event: `want` is the one reason counted; a
/// drop must also send one event with it.
#[track_caller]
fn expect_from(fx: &mut Fixture, hook: Hook, frame: &[u8], iif: u32, want: u8, what: &str) -> Observed {
    let o = fx.observe_from(hook, frame, iif);
    let dir = hook_direction(hook);
    assert_eq!(o.moved, vec![(want, dir)], "{what}: counters moved {:?}, want reason {want}", o.moved);
    if reason::is_drop(want) {
        assert!(o.out.dropped(), "{what}: expected a drop, program returned {}", o.out.action);
        let reasons: Vec<u8> = o.events.iter().map(|e| e.reason).collect();
        assert_eq!(reasons, vec![want], "{what}: one drop event with the reason");
    } else {
        assert!(o.out.passed(), "{what}: expected a pass, program returned {}", o.out.action);
    }
    o
}

#[track_caller]
fn expect(fx: &mut Fixture, hook: Hook, frame: &[u8], want: u8, what: &str) -> Observed {
    expect_from(fx, hook, frame, 0, want, what)
}

fn udp4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
    ipv4(src, dst, proto::UDP, &udp(sport, dport, b"data"))
}

// ---------------------------------------------------------------------------------------
// 1. L2: VLAN tags and other ethertypes

#[test]
fn attack_double_vlan_8021q_8021q_is_dropped() {
    let mut fx = setup();
    // What the program sees of a QinQ frame: the kernel took the outer tag into the
    // metadata, the inner one is still in the data. A spoofed source inside.
    let inner = ipv4_packet(OTHER, WORLD, proto::UDP, &[], 0, 1, &udp(1, 53, b"x"));
    let frame = ethernet_tagged(&[(TPID_8021Q, 0)], ETH_IPV4, &inner);
    expect(&mut fx, OUT, &frame, reason::DROP_L2_UNSUPPORTED, "802.1Q inside 802.1Q, from the pod");
    expect(&mut fx, IN, &frame, reason::DROP_L2_UNSUPPORTED, "802.1Q inside 802.1Q, to the pod");
    // Two tags still in the data (test runs see the whole frame).
    let frame = ethernet_tagged(&[(TPID_8021Q, 0), (TPID_8021Q, 0)], ETH_IPV4, &inner);
    expect(&mut fx, OUT, &frame, reason::DROP_L2_UNSUPPORTED, "two 802.1Q tags in the data");
}

#[test]
fn attack_double_vlan_8021ad_8021q_is_dropped() {
    let mut fx = setup();
    let inner = ipv4_packet(POD, WORLD, proto::TCP, &[], 0, 1, &tcp(1, 443, SYN));
    for tags in [vec![(TPID_8021AD, 0), (TPID_8021Q, 0)], vec![(TPID_8021AD, 5)], vec![(TPID_QINQ, 0)]] {
        let frame = ethernet_tagged(&tags, ETH_IPV4, &inner);
        expect(&mut fx, OUT, &frame, reason::DROP_L2_UNSUPPORTED, &format!("tags {tags:x?}"));
    }
    let inner6 = ipv6_packet(64, POD6, WORLD6, proto::UDP, &udp(1, 53, b"x"));
    let frame = ethernet_tagged(&[(TPID_8021AD, 0), (TPID_8021Q, 0)], ETH_IPV6, &inner6);
    expect(&mut fx, OUT, &frame, reason::DROP_L2_UNSUPPORTED, "IPv6 in 802.1ad+802.1Q");
}

#[test]
fn attack_vlan_tags_bypass_even_unenforced_pods_antispoofing() {
    // No policy selects the pod: it may send anything from its own address, but a tagged
    // frame is outside the grammar whatever the policy.
    let mut ep = enforced_pod();
    ep.flags &= !(endpoint_flags::INGRESS_ENFORCED | endpoint_flags::EGRESS_ENFORCED);
    let mut fx = setup_with(ep);
    let inner = ipv4_packet(OTHER, PEER, proto::TCP, &[], 0, 1, &tcp(1, 8080, SYN));
    let frame = ethernet_tagged(&[(TPID_8021Q, 0)], ETH_IPV4, &inner);
    expect(&mut fx, OUT, &frame, reason::DROP_L2_UNSUPPORTED, "tagged, unenforced");
    expect(&mut fx, OUT, &ipv4(POD, PEER, proto::TCP, &tcp(1, 80, SYN)), reason::ALLOWED_NOT_ENFORCED, "plain");
}

#[test]
fn non_ip_ethertypes_are_dropped_and_arp_passes() {
    let mut fx = setup();
    for ethertype in [0x88cc_u16, 0x8137, 0x8035, 0x8847, 0x88e5, 0x0000, 0x05dc] {
        let frame = ethernet(ethertype, &[0u8; 46]);
        expect(&mut fx, OUT, &frame, reason::DROP_L2_UNSUPPORTED, &format!("ethertype {ethertype:#06x}"));
    }
    expect(&mut fx, OUT, &ethernet(ETH_ARP, &[0u8; 28]), reason::ALLOWED_ALWAYS, "ARP out");
    expect(&mut fx, IN, &ethernet(ETH_ARP, &[0u8; 28]), reason::ALLOWED_ALWAYS, "ARP in");
}

// ---------------------------------------------------------------------------------------
// 2. Neighbour discovery

fn icmp6(ty: u8, len: usize) -> Vec<u8> {
    let mut m = vec![ty, 0, 0, 0, 0, 0, 0, 0];
    m.resize(len.max(8), 0xaa);
    m
}

#[test]
fn attack_nd_to_a_global_destination_goes_through_policy() {
    let mut fx = setup();
    // A neighbour solicitation with kilobytes of payload towards the world: policy decides
    // on ICMPv6 type 135, and the pod may not.
    let exfil = ipv6_hl(255, POD6, WORLD6, proto::ICMPV6, &icmp6(135, 1400));
    let o = expect(&mut fx, OUT, &exfil, reason::DROP_POLICY_DENIED, "NS to the world");
    assert_eq!((o.events[0].dport, o.events[0].peer_identity), (135, identity::WORLD_IPV6));
    for ty in [130, 131, 132, 133, 134, 136, 137, 143] {
        let f = ipv6_hl(255, POD6, PEER6, proto::ICMPV6, &icmp6(ty, 64));
        expect(&mut fx, OUT, &f, reason::DROP_POLICY_DENIED, &format!("type {ty} to another pod"));
    }
    // Towards the pod, from the world.
    let f = ipv6_hl(255, WORLD6, POD6, proto::ICMPV6, &icmp6(136, 1000));
    expect(&mut fx, IN, &f, reason::DROP_POLICY_DENIED, "NA from the world");
}

#[test]
fn attack_nd_with_a_spoofed_source_is_dropped_as_spoofed() {
    let mut fx = setup();
    let f = ipv6_hl(255, OTHER6, ALL_NODES, proto::ICMPV6, &icmp6(136, 32));
    expect(&mut fx, OUT, &f, reason::DROP_SPOOFED_SOURCE, "NA from another pod's address");
}

#[test]
fn attack_malformed_nd_goes_through_policy() {
    let mut fx = setup();
    let hop64 = ipv6_hl(64, LINK_LOCAL, GATEWAY_LL, proto::ICMPV6, &icmp6(135, 24));
    expect(&mut fx, OUT, &hop64, reason::DROP_POLICY_DENIED, "NS with hop limit 64 (forwarded, not on-link)");
    let mut code1 = icmp6(135, 24);
    code1[1] = 1;
    let f = ipv6_hl(255, LINK_LOCAL, GATEWAY_LL, proto::ICMPV6, &code1);
    expect(&mut fx, OUT, &f, reason::DROP_POLICY_DENIED, "NS with code 1");
    let frag = frag6(proto::ICMPV6, 0, true, 5, &icmp6(135, 24));
    let f = ipv6_hl(255, LINK_LOCAL, GATEWAY_LL, NEXTHDR_FRAGMENT, &frag);
    expect(&mut fx, OUT, &f, reason::DROP_POLICY_DENIED, "fragmented NS");
    let f = ipv6_hl(255, LINK_LOCAL, MLDV2_ROUTERS, proto::ICMPV6, &icmp6(143, 28));
    expect(&mut fx, OUT, &f, reason::DROP_POLICY_DENIED, "MLD report with hop limit 255");
}

/// (hook, hop limit, source, destination, ICMPv6 type, what).
type NdCase = (Hook, u8, [u8; 16], [u8; 16], u8, &'static str);

#[test]
fn well_formed_link_scoped_nd_passes_without_policy() {
    let mut fx = setup();
    let ok = reason::ALLOWED_ALWAYS;
    let cases: [NdCase; 9] = [
        (OUT, 255, LINK_LOCAL, GATEWAY_LL, 135, "NS to the gateway"),
        (OUT, 255, POD6, GATEWAY_LL, 136, "NA from the pod's address to link-local"),
        (OUT, 255, [0; 16], ALL_NODES, 135, "DAD from ::"),
        (OUT, 255, LINK_LOCAL, ALL_NODES, 133, "RS"),
        (OUT, 255, POD6, NODE6, 135, "NUD to the node's address"),
        (OUT, 1, LINK_LOCAL, MLDV2_ROUTERS, 143, "MLDv2 report"),
        (IN, 255, GATEWAY_LL, ALL_NODES, 134, "RA"),
        (IN, 255, GATEWAY_LL, POD6, 135, "NS to the pod"),
        (IN, 255, NODE6, POD6, 136, "NA from the node's address"),
    ];
    for (hook, hl, src, dst, ty, what) in cases {
        expect(&mut fx, hook, &ipv6_hl(hl, src, dst, proto::ICMPV6, &icmp6(ty, 24)), ok, what);
    }
}

#[test]
fn attack_ipv4_protocol_58_is_not_icmpv6() {
    let mut fx = setup();
    // Looks like a neighbour advertisement, but in IPv4: an unknown protocol for policy.
    let f = ipv4(POD, WORLD, proto::ICMPV6, &icmp6(136, 1000));
    let o = expect(&mut fx, OUT, &f, reason::DROP_POLICY_DENIED, "IPv4 protocol 58");
    assert_eq!((o.events[0].protocol, o.events[0].dport), (proto::ICMPV6, 0), "no type read from it");
    // And ICMP (1) inside IPv6 is no ICMP either.
    let f = ipv6(POD6, PEER6, proto::ICMP, &icmp(8, 0, 1));
    expect(&mut fx, OUT, &f, reason::DROP_POLICY_DENIED, "IPv6 next header 1");
}

#[test]
fn attack_icmpv6_error_the_pod_emits_opens_no_flow() {
    // Egress unenforced: the pod may send its error. Then an echo reply with identifier 0
    // (the ports of the error's tuple) must not pass as its "reply".
    let mut ep = enforced_pod();
    ep.flags &= !endpoint_flags::EGRESS_ENFORCED;
    let mut fx = setup_with(ep);
    let provoking = ipv6(PEER6, POD6, proto::UDP, &udp(7, 9, b"x"));
    let err = ipv6(POD6, PEER6, proto::ICMPV6, &icmp6_error_quoting(1, 4, &provoking));
    expect(&mut fx, OUT, &err, reason::ALLOWED_NOT_ENFORCED, "port unreachable out");
    let reply = ipv6(PEER6, POD6, proto::ICMPV6, &[129, 0, 0, 0, 0, 0, 0, 1]);
    expect(&mut fx, IN, &reply, reason::DROP_POLICY_DENIED, "unsolicited echo reply, id 0");
    // The same for ICMP (v4), and for other message types.
    let provoking4 = udp4(PEER, POD, 7, 9);
    let err4 = ipv4(POD, PEER, proto::ICMP, &icmp_error_quoting(3, 3, &provoking4));
    expect(&mut fx, OUT, &err4, reason::ALLOWED_NOT_ENFORCED, "v4 port unreachable out");
    expect(&mut fx, IN, &ipv4(PEER, POD, proto::ICMP, &icmp(0, 0, 0)), reason::DROP_POLICY_DENIED, "echo reply id 0");
    expect(&mut fx, OUT, &ipv4(POD, PEER, proto::ICMP, &icmp(13, 0, 0)), reason::ALLOWED_NOT_ENFORCED, "timestamp");
    expect(&mut fx, IN, &ipv4(PEER, POD, proto::ICMP, &icmp(0, 0, 0)), reason::DROP_POLICY_DENIED, "after timestamp");
    // An echo request does open a flow: its reply passes.
    expect(&mut fx, OUT, &ipv4(POD, PEER, proto::ICMP, &icmp(8, 0, 42)), reason::ALLOWED_NOT_ENFORCED, "echo");
    expect(&mut fx, IN, &ipv4(PEER, POD, proto::ICMP, &icmp(0, 0, 42)), reason::ALLOWED_REPLY, "echo reply");
}

// ---------------------------------------------------------------------------------------
// 3. ICMP errors

/// The pod's allowed flow POD:5555 -> PEER:9999/udp, opened.
fn open_udp_flow(fx: &mut Fixture) -> Vec<u8> {
    let sent = udp4(POD, PEER, 5555, 9999);
    expect(fx, OUT, &sent, reason::ALLOWED_BY_POLICY, "the pod's flow");
    sent
}

#[test]
fn icmp_error_from_the_flows_peer_or_the_node_is_related() {
    let mut fx = setup();
    let sent = open_udp_flow(&mut fx);
    let err = ipv4(PEER, POD, proto::ICMP, &icmp_error_quoting(3, 3, &sent));
    expect(&mut fx, IN, &err, reason::ALLOWED_REPLY, "port unreachable from the peer");
    let err = ipv4(NODE, POD, proto::ICMP, &icmp_error_quoting(3, 4, &sent));
    expect(&mut fx, IN, &err, reason::ALLOWED_REPLY, "fragmentation needed from the node");
    let err = ipv4(NODE, POD, proto::ICMP, &icmp_error_quoting(11, 0, &sent));
    expect(&mut fx, IN, &err, reason::ALLOWED_REPLY, "time exceeded from the node");
}

#[test]
fn attack_icmp_error_from_a_third_party_is_not_related() {
    let mut fx = setup();
    let sent = open_udp_flow(&mut fx);
    let err = ipv4(WORLD, POD, proto::ICMP, &icmp_error_quoting(3, 3, &sent));
    expect(&mut fx, IN, &err, reason::DROP_POLICY_DENIED, "error from a host that is not the peer");
    let err = ipv4(OTHER, POD, proto::ICMP, &icmp_error_quoting(3, 1, &sent));
    expect(&mut fx, IN, &err, reason::DROP_POLICY_DENIED, "error from another pod");
}

#[test]
fn attack_icmp_error_quoting_the_flow_in_the_wrong_orientation_is_not_related() {
    let mut fx = setup();
    let _ = open_udp_flow(&mut fx);
    // Quotes PEER:9999 -> POD:5555, a packet the pod never sent.
    let reversed = udp4(PEER, POD, 9999, 5555);
    let err = ipv4(PEER, POD, proto::ICMP, &icmp_error_quoting(3, 3, &reversed));
    expect(&mut fx, IN, &err, reason::DROP_POLICY_DENIED, "quote reversed");
}

#[test]
fn attack_icmp_error_quoting_another_endpoints_flow_is_not_related() {
    let mut fx = setup();
    // A live flow OTHER -> PEER (both hooks allowed it), not the pod's.
    let (key, orientation) = CtKey::normalised(&v4(OTHER), &v4(PEER), 5555, 9999, proto::UDP, 4);
    let now = coarse_now_ns();
    let mut value = CtValue::default();
    value.orig[orientation] =
        CtOrig { last_seen_ns: now, flags: ct_flags::EGRESS_OK | ct_flags::INGRESS_OK, cookie: 0, policy_gen: [0; 2] };
    fx.maps.conntrack.insert(key, value, 0).expect("conntrack entry");
    let quoted = udp4(OTHER, PEER, 5555, 9999);
    let err = ipv4(PEER, POD, proto::ICMP, &icmp_error_quoting(3, 3, &quoted));
    expect(&mut fx, IN, &err, reason::DROP_POLICY_DENIED, "error about another pod's flow");
    // The pod emitting an error about a flow it is not part of.
    let err = ipv4(POD, PEER, proto::ICMP, &icmp_error_quoting(3, 3, &quoted));
    expect(&mut fx, OUT, &err, reason::DROP_POLICY_DENIED, "the pod's error about another flow");
}

/// `CLOCK_MONOTONIC` now, as `bpf_ktime_get_coarse_ns` reads it (near enough).
fn coarse_now_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &raw mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[test]
fn icmpv6_packet_too_big_from_the_node_is_related() {
    let mut fx = setup();
    let sent = ipv6(POD6, PEER6, proto::TCP, &tcp(5000, 6000, SYN));
    expect(&mut fx, OUT, &sent, reason::ALLOWED_BY_POLICY, "the pod's TCP flow");
    let ptb = ipv6(NODE6, POD6, proto::ICMPV6, &icmp6_error_quoting(2, 0, &sent));
    expect(&mut fx, IN, &ptb, reason::ALLOWED_REPLY, "packet too big from the node");
    let ptb = ipv6(WORLD6, POD6, proto::ICMPV6, &icmp6_error_quoting(2, 0, &sent));
    expect(&mut fx, IN, &ptb, reason::DROP_POLICY_DENIED, "packet too big from the world");
}

// ---------------------------------------------------------------------------------------
// 4, 5. Fragments

#[test]
fn attack_ipv6_nested_fragment_headers_are_dropped() {
    let mut fx = setup();
    // An allowed datagram 7 (first fragment passes).
    let first = frag6(proto::UDP, 0, true, 7, &udp(1000, 5353, &[0u8; 16]));
    expect(&mut fx, IN, &ipv6(PEER6, POD6, NEXTHDR_FRAGMENT, &first), reason::ALLOWED_BY_POLICY, "datagram 7");
    // A later fragment of datagram 8 (unknown) carrying a second Fragment header that names
    // datagram 7: the first header decides, as in the kernel.
    let inner = frag6(proto::UDP, 3, false, 7, &[0u8; 16]);
    let outer = frag6(NEXTHDR_FRAGMENT, 3, false, 8, &inner);
    expect(&mut fx, IN, &ipv6(PEER6, POD6, NEXTHDR_FRAGMENT, &outer), reason::DROP_FRAGMENT_UNKNOWN, "rides on 7");
    // A first fragment with a second Fragment header behind it.
    let inner = frag6(proto::UDP, 3, false, 7, &[0u8; 16]);
    let outer = frag6(NEXTHDR_FRAGMENT, 0, true, 9, &inner);
    expect(&mut fx, IN, &ipv6(PEER6, POD6, NEXTHDR_FRAGMENT, &outer), reason::DROP_IPV6_EXT_CHAIN, "two headers");
    // An atomic fragment (offset 0, no M) followed by a real one.
    let inner = frag6(proto::UDP, 0, true, 7, &udp(1000, 5353, &[0u8; 16]));
    let outer = frag6(NEXTHDR_FRAGMENT, 0, false, 10, &inner);
    expect(&mut fx, IN, &ipv6(PEER6, POD6, NEXTHDR_FRAGMENT, &outer), reason::DROP_IPV6_EXT_CHAIN, "atomic+real");
    // A later fragment's Next Header is not the datagram's: the first fragment's is.
    let later = frag6(proto::TCP, 3, false, 7, &[0u8; 16]);
    let o = expect(&mut fx, IN, &ipv6(PEER6, POD6, NEXTHDR_FRAGMENT, &later), reason::ALLOWED_BY_POLICY, "later");
    assert!(o.events.is_empty());
}

#[test]
fn attack_spoofed_first_fragment_does_not_poison_the_victims_datagram() {
    let mut fx = setup();
    let first = |dport: u16| {
        let mut payload = udp(1000, dport, &[0u8; 8]);
        payload.truncate(16);
        ipv4_full(PEER, POD, proto::UDP, &[], 0x2000, 77, &payload)
    };
    let later = ipv4_full(PEER, POD, proto::UDP, &[], 2, 77, &[0u8; 16]);
    // The pod forges PEER's first fragment (id 77) to a denied port: dropped as spoofed,
    // and nothing is remembered.
    expect(&mut fx, OUT, &first(1), reason::DROP_SPOOFED_SOURCE, "forged first fragment");
    // PEER's real datagram 77 to the pod's allowed port.
    expect(&mut fx, IN, &first(5353), reason::ALLOWED_BY_POLICY, "the victim's first fragment");
    // A denied first fragment with the same id (spoofed by someone on the network) does not
    // replace the record of the allowed one.
    expect(&mut fx, IN, &first(1), reason::DROP_POLICY_DENIED, "denied first fragment, same id");
    expect(&mut fx, IN, &later, reason::ALLOWED_BY_POLICY, "the victim's later fragment");
}

#[test]
fn later_fragments_of_a_denied_datagram_are_denied_with_its_ports() {
    let mut fx = setup();
    let first = ipv4_full(PEER, POD, proto::UDP, &[], 0x2000, 5, &udp(1000, 5354, &[0u8; 8]));
    expect(&mut fx, IN, &first, reason::DROP_POLICY_DENIED, "denied first fragment");
    let later = ipv4_full(PEER, POD, proto::UDP, &[], 2, 5, &[0u8; 16]);
    let o = expect(&mut fx, IN, &later, reason::DROP_POLICY_DENIED, "its later fragment");
    assert_eq!((o.events[0].sport, o.events[0].dport), (1000, 5354));
}

#[test]
fn attack_lone_and_tiny_fragments_are_dropped() {
    let mut fx = setup();
    let lone = ipv4_full(PEER, POD, proto::TCP, &[], 0x2000 | 5, 9, &[0u8; 16]);
    expect(&mut fx, IN, &lone, reason::DROP_FRAGMENT_UNKNOWN, "lone middle fragment");
    let lone6 = ipv6(PEER6, POD6, NEXTHDR_FRAGMENT, &frag6(proto::TCP, 5, true, 9, &[0u8; 16]));
    expect(&mut fx, IN, &lone6, reason::DROP_FRAGMENT_UNKNOWN, "lone v6 fragment");
    // A first fragment with 4 bytes of TCP (less than the 8 RFC 791 guarantees).
    let tiny = ipv4_full(PEER, POD, proto::TCP, &[], 0x2000, 10, &tcp(1, 8080, SYN)[..4]);
    expect(&mut fx, IN, &tiny, reason::DROP_MALFORMED, "tiny first fragment");
    // IPv6: the kernel wants the whole upper-layer header in the first fragment.
    let short6 = ipv6(PEER6, POD6, NEXTHDR_FRAGMENT, &frag6(proto::TCP, 0, true, 11, &tcp(1, 8080, SYN)[..8]));
    expect(&mut fx, IN, &short6, reason::DROP_MALFORMED, "v6 first fragment with 8 bytes of TCP");
}

#[test]
fn first_fragment_with_eight_bytes_of_tcp_is_judged_on_its_ports() {
    let mut fx = setup();
    let first = |dport: u16, id: u16| ipv4_full(PEER, POD, proto::TCP, &[], 0x2000, id, &tcp(40000, dport, SYN)[..8]);
    expect(&mut fx, IN, &first(8080, 20), reason::ALLOWED_BY_POLICY, "8 bytes of TCP, allowed port");
    expect(&mut fx, IN, &first(8081, 21), reason::DROP_POLICY_DENIED, "8 bytes of TCP, other port");
    let later = ipv4_full(PEER, POD, proto::TCP, &[], 1, 20, &tcp(0, 0, SYN)[8..]);
    expect(&mut fx, IN, &later, reason::ALLOWED_BY_POLICY, "the rest of the header");
}

#[test]
fn later_fragment_before_its_first_is_dropped_by_documented_choice() {
    // The datapath cannot hold a packet until its first fragment arrives: a later fragment
    // seen first is dropped (DROP_FRAGMENT_UNKNOWN, counted), the ones after the first pass.
    let mut fx = setup();
    let first = ipv4_full(PEER, POD, proto::UDP, &[], 0x2000, 30, &udp(1000, 5353, &[0u8; 8]));
    let middle = ipv4_full(PEER, POD, proto::UDP, &[], 0x2000 | 2, 30, &[0u8; 16]);
    let last = ipv4_full(PEER, POD, proto::UDP, &[], 4, 30, &[0u8; 16]);
    expect(&mut fx, IN, &last, reason::DROP_FRAGMENT_UNKNOWN, "last fragment first");
    expect(&mut fx, IN, &first, reason::ALLOWED_BY_POLICY, "then the first");
    expect(&mut fx, IN, &middle, reason::ALLOWED_BY_POLICY, "then the middle one");
    expect(&mut fx, IN, &last, reason::ALLOWED_BY_POLICY, "the last one, sent again");
}

// ---------------------------------------------------------------------------------------
// 6. Endpoint table overflow, 7. local sources from elsewhere

#[test]
fn attack_pod_beyond_the_endpoint_table_is_enforced_closed() {
    let mut fx = Fixture::new("attack");
    // No ENDPOINTS record for the interface the program runs on (loopback).
    expect(&mut fx, OUT, &udp4(POD, PEER, 1, 9999), reason::DROP_NO_ENDPOINT, "from the pod");
    expect(&mut fx, IN, &udp4(PEER, POD, 1, 5353), reason::DROP_NO_ENDPOINT, "to the pod");
    expect(&mut fx, OUT, &ethernet(ETH_ARP, &[0u8; 28]), reason::DROP_NO_ENDPOINT, "ARP");
}

#[test]
fn attack_local_pod_address_from_another_interface_is_dropped() {
    let mut fx = setup();
    // OTHER is a pod of this node; PEER is not. The frontend-only port 8080 is for PEER.
    let spoof = ipv4(OTHER, POD, proto::TCP, &tcp(1, 8080, SYN));
    expect_from(&mut fx, IN, &spoof, UPLINK_IF, reason::DROP_SPOOFED_SOURCE, "OTHER's address via the uplink");
    let spoof6 = ipv6(OTHER6, POD6, proto::UDP, &udp(1, 5353, b"x"));
    expect_from(&mut fx, IN, &spoof6, UPLINK_IF, reason::DROP_SPOOFED_SOURCE, "v6, via the uplink");
    let own = ipv4(POD, POD, proto::TCP, &tcp(1, 8080, SYN));
    expect_from(&mut fx, IN, &own, UPLINK_IF, reason::DROP_SPOOFED_SOURCE, "the pod's own address via the uplink");
    // From OTHER's own interface (its program checked the source) or the node: policy decides.
    expect_from(&mut fx, IN, &spoof, OTHER_IF, reason::DROP_POLICY_DENIED, "from OTHER's interface");
    expect_from(&mut fx, IN, &spoof, 0, reason::DROP_POLICY_DENIED, "from the node");
    // A non-local source via the uplink is what the uplink is for.
    let peer = ipv4(PEER, POD, proto::TCP, &tcp(1, 8080, SYN));
    expect_from(&mut fx, IN, &peer, UPLINK_IF, reason::ALLOWED_BY_POLICY, "PEER via the uplink");
}

// ---------------------------------------------------------------------------------------
// 8. Legitimate traffic

#[test]
fn seven_and_sixteen_extension_headers_pass_seventeen_are_dropped() {
    let mut fx = setup();
    let chain = |n: usize| {
        let mut c = Vec::new();
        for i in 0..n {
            c.extend_from_slice(&[if i == n - 1 { proto::UDP } else { NEXTHDR_DEST }, 0, 1, 4, 0, 0, 0, 0]);
        }
        c.extend_from_slice(&udp(1000, 5353, b"x"));
        ipv6(PEER6, POD6, NEXTHDR_DEST, &c)
    };
    expect(&mut fx, IN, &chain(7), reason::ALLOWED_BY_POLICY, "7 headers");
    expect(&mut fx, IN, &chain(16), reason::ALLOWED_BY_POLICY, "16 headers");
    expect(&mut fx, IN, &chain(17), reason::DROP_IPV6_EXT_CHAIN, "17 headers");
    // Hop-by-Hop anywhere but first: the kernel drops it too.
    let late_hbh = ext(NEXTHDR_HOP, &ext(proto::UDP, &udp(1000, 5353, b"x")));
    expect(&mut fx, IN, &ipv6(PEER6, POD6, NEXTHDR_DEST, &late_hbh), reason::DROP_IPV6_EXT_CHAIN, "late HBH");
}

#[test]
fn tcp_simultaneous_open_passes() {
    let mut fx = setup();
    // The pod connects POD:5000 -> PEER:6000 (egress allows it) while PEER connects back
    // from 6000 to 5000: PEER's SYN crosses the pod's.
    expect(&mut fx, OUT, &ipv4(POD, PEER, proto::TCP, &tcp(5000, 6000, SYN)), reason::ALLOWED_BY_POLICY, "SYN");
    expect(&mut fx, IN, &ipv4(PEER, POD, proto::TCP, &tcp(6000, 5000, SYN)), reason::ALLOWED_REPLY, "crossing SYN");
    expect(&mut fx, OUT, &ipv4(POD, PEER, proto::TCP, &tcp(5000, 6000, SYN | ACK)), reason::ALLOWED_BY_POLICY, "SA");
    expect(&mut fx, IN, &ipv4(PEER, POD, proto::TCP, &tcp(6000, 5000, SYN | ACK)), reason::ALLOWED_REPLY, "SA back");
    // Once answered, a SYN from PEER is a new connection: policy (ingress allows 8080 only).
    let syn = ipv4(PEER, POD, proto::TCP, &tcp(6000, 5000, SYN));
    expect(&mut fx, IN, &syn, reason::DROP_POLICY_DENIED, "SYN after the handshake");
    // A SYN on a flow never opened is policy's too.
    let syn = ipv4(PEER, POD, proto::TCP, &tcp(6001, 5001, SYN));
    expect(&mut fx, IN, &syn, reason::DROP_POLICY_DENIED, "unsolicited SYN");
}

// ---------------------------------------------------------------------------------------
// Attacks that were blocked already (kept blocked)

#[test]
fn attack_ip_options_do_not_mislead_the_parser() {
    let mut fx = setup();
    // 8080 where a fixed-offset parser would read the ports; 22 is where they are.
    let mut options = vec![1u8; 4];
    options.extend_from_slice(&[0x1f, 0x90, 0x1f, 0x90]);
    let f = ipv4_full(PEER, POD, proto::TCP, &options, 0, 1, &tcp(1, 22, SYN));
    let o = expect(&mut fx, IN, &f, reason::DROP_POLICY_DENIED, "options");
    assert_eq!(o.events[0].dport, 22);
    let mut bad = ipv4(PEER, POD, proto::TCP, &tcp(1, 8080, SYN));
    bad[14] = 0x4f; // IHL 15: options run past the packet
    expect(&mut fx, IN, &bad, reason::DROP_MALFORMED, "IHL past the end");
}

#[test]
fn attack_ip_length_fields_are_checked() {
    let mut fx = setup();
    let mut long = ipv4(PEER, POD, proto::TCP, &tcp(1, 8080, SYN));
    long[16..18].copy_from_slice(&200u16.to_be_bytes());
    expect(&mut fx, IN, &long, reason::DROP_MALFORMED, "total length past the frame");
    let mut short = ipv4(PEER, POD, proto::TCP, &tcp(1, 8080, SYN));
    short[16..18].copy_from_slice(&24u16.to_be_bytes());
    expect(&mut fx, IN, &short, reason::DROP_MALFORMED, "TCP header beyond the total length (in padding)");
    let mut v6 = ipv6(PEER6, POD6, proto::UDP, &udp(1, 5353, b"x"));
    v6[18..20].copy_from_slice(&400u16.to_be_bytes());
    expect(&mut fx, IN, &v6, reason::DROP_MALFORMED, "payload length past the frame");
    let jumbo = ipv6(PEER6, POD6, NEXTHDR_HOP, &ext(proto::UDP, &udp(1, 5353, b"x")));
    let mut jumbo = jumbo;
    jumbo[18..20].copy_from_slice(&0u16.to_be_bytes());
    expect(&mut fx, IN, &jumbo, reason::DROP_MALFORMED, "jumbogram");
}

#[test]
fn attack_routing_and_auth_headers_are_walked() {
    let mut fx = setup();
    let mut routing = vec![proto::UDP, 2, 0, 0, 0, 0, 0, 0];
    routing.extend_from_slice(&[0u8; 16]);
    routing.extend_from_slice(&udp(1, 5354, b"x"));
    let o = expect(&mut fx, IN, &ipv6(PEER6, POD6, NEXTHDR_ROUTING, &routing), reason::DROP_POLICY_DENIED, "rh");
    assert_eq!(o.events[0].dport, 5354);
    let mut auth = vec![proto::UDP, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    auth.extend_from_slice(&udp(1, 5353, b"x"));
    expect(&mut fx, IN, &ipv6(PEER6, POD6, NEXTHDR_AUTH, &auth), reason::ALLOWED_BY_POLICY, "AH");
}

#[test]
fn attack_spoofed_sources_from_the_pod_are_dropped() {
    let mut fx = setup();
    expect(&mut fx, OUT, &udp4(OTHER, PEER, 1, 9999), reason::DROP_SPOOFED_SOURCE, "v4");
    expect(&mut fx, OUT, &ipv6(OTHER6, PEER6, proto::UDP, &udp(1, 9999, b"x")), reason::DROP_SPOOFED_SOURCE, "v6");
    let frag = ipv4_full(OTHER, PEER, proto::UDP, &[], 3, 1, &[0u8; 16]);
    expect(&mut fx, OUT, &frag, reason::DROP_SPOOFED_SOURCE, "later fragment");
}

#[test]
fn attack_tcp_without_handshake_and_other_protocols_go_through_policy() {
    let mut fx = setup();
    expect(&mut fx, IN, &ipv4(PEER, POD, proto::TCP, &tcp(1, 22, ACK)), reason::DROP_POLICY_DENIED, "bare ACK");
    expect(&mut fx, IN, &ipv4(PEER, POD, proto::TCP, &tcp(1, 22, RST)), reason::DROP_POLICY_DENIED, "bare RST");
    expect(&mut fx, IN, &ipv4(PEER, POD, proto::TCP, &tcp(1, 22, FIN)), reason::DROP_POLICY_DENIED, "bare FIN");
    for p in [4u8, 41, 47, 50, 132, 136, 255] {
        expect(&mut fx, IN, &ipv4(PEER, POD, p, &[0u8; 24]), reason::DROP_POLICY_DENIED, &format!("protocol {p}"));
    }
    expect(&mut fx, OUT, &ipv6(POD6, WORLD6, 59, &[]), reason::DROP_POLICY_DENIED, "no next header");
}
