//! A table of crafted packets run through the real tc programs with `BPF_PROG_TEST_RUN` (needs
//! root and bpffs at /sys/fs/bpf), each with the verdict and the reason it must get. The
//! reason is read from the counters (exactly one (reason, direction) slot must move by one),
//! and every drop must also send one verdict event with that reason.
//!
//! Rows run in order on one datapath, so conntrack and fragment state carry over: a reply
//! row follows the row that opened its flow, a later fragment the row of its first fragment.
//! On failure the whole table is printed, one line per packet, mismatches marked.
//!
//! The endpoint (on loopback, where `BPF_PROG_TEST_RUN` runs programs without a context) is
//! enforced in both directions (default deny) and has these rules:
//!
//! | direction | peer           | what                         |
//! |-----------|----------------|------------------------------|
//! | ingress   | PEER (300)     | allow TCP/80, TCP/443, UDP/53, SCTP/3868, ICMP echo request, ICMPv6 echo request |
//! | ingress   | PEER (300)     | deny TCP/22                  |
//! | ingress   | any            | allow TCP/8443               |
//! | egress    | PEER (300)     | allow TCP/8080               |
//! | egress    | CIDR 192.0.2.0/24 | allow UDP/123             |
mod common;
#[path = "common/frames.rs"]
mod frames;

use std::fmt::Write as _;

use frames::*;
use palisade_agent::datapath::Hook;
use palisade_common::{direction, identity, proto, reason};

/// Not in the ipcache: the world.
const WORLD: [u8; 4] = [8, 8, 8, 8];
const CIDR_HOST: [u8; 4] = [192, 0, 2, 9];
const CIDR_ID: u32 = identity::LOCAL_SCOPE | 1;

const PSH: u8 = 0x08;

// ---------------------------------------------------------------------------------------
// Fixture

/// The endpoint and the rules of the module's table, on a freshly loaded datapath.
fn fixture() -> Fixture {
    let mut fx = Fixture::new("table");
    fx.endpoint(LO, enforced_pod());
    // Host entries where the agent puts them; the CIDR in the trie.
    fx.host4(PEER, PEER_ID, 0);
    fx.host4(POD, 1000, 0);
    fx.host6(PEER6, PEER_ID, 0);
    fx.prefix4([192, 0, 2, 0], 24, CIDR_ID);

    let (ingress, egress) = (direction::INGRESS, direction::EGRESS);
    for (p, port) in [(proto::TCP, 80), (proto::TCP, 443), (proto::UDP, 53), (proto::SCTP, 3868)] {
        fx.rule(EP_ID, ingress, PEER_ID, p, Some(port), false);
    }
    fx.rule(EP_ID, ingress, PEER_ID, proto::ICMP, Some(8), false);
    fx.rule(EP_ID, ingress, PEER_ID, proto::ICMPV6, Some(128), false);
    fx.rule(EP_ID, ingress, PEER_ID, proto::TCP, Some(22), true);
    fx.rule(EP_ID, ingress, identity::ANY, proto::TCP, Some(8443), false);
    fx.rule(EP_ID, egress, PEER_ID, proto::TCP, Some(8080), false);
    fx.rule(EP_ID, egress, CIDR_ID, proto::UDP, Some(123), false);
    fx
}

// ---------------------------------------------------------------------------------------
// Frames

fn sctp(sport: u16, dport: u16) -> Vec<u8> {
    let mut s = Vec::new();
    s.extend_from_slice(&sport.to_be_bytes());
    s.extend_from_slice(&dport.to_be_bytes());
    s.extend_from_slice(&[0u8; 8]);
    s
}

fn truncated(mut frame: Vec<u8>, len: usize) -> Vec<u8> {
    frame.truncate(len);
    frame
}

// ---------------------------------------------------------------------------------------
// The table

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    Pass,
    Drop,
}

struct Row {
    name: &'static str,
    hook: Hook,
    frame: Vec<u8>,
    verdict: Verdict,
    reason: u8,
}

fn row(name: &'static str, hook: Hook, frame: Vec<u8>, verdict: Verdict, reason: u8) -> Row {
    Row { name, hook, frame, verdict, reason }
}

fn reason_name(r: u8) -> &'static str {
    match r {
        reason::ALLOWED_BY_POLICY => "ALLOWED_BY_POLICY",
        reason::ALLOWED_NOT_ENFORCED => "ALLOWED_NOT_ENFORCED",
        reason::ALLOWED_REPLY => "ALLOWED_REPLY",
        reason::ALLOWED_ALWAYS => "ALLOWED_ALWAYS",
        reason::DROP_POLICY_DENIED => "DROP_POLICY_DENIED",
        reason::DROP_POLICY_DENY_RULE => "DROP_POLICY_DENY_RULE",
        reason::DROP_SPOOFED_SOURCE => "DROP_SPOOFED_SOURCE",
        reason::DROP_MALFORMED => "DROP_MALFORMED",
        reason::DROP_FRAGMENT_UNKNOWN => "DROP_FRAGMENT_UNKNOWN",
        reason::DROP_NO_ENDPOINT => "DROP_NO_ENDPOINT",
        reason::DROP_L2_UNSUPPORTED => "DROP_L2_UNSUPPORTED",
        reason::DROP_IPV6_EXT_CHAIN => "DROP_IPV6_EXT_CHAIN",
        _ => "?",
    }
}

fn rows() -> Vec<Row> {
    use Hook::{FromPod as OUT, ToPod as IN};
    use Verdict::{Drop, Pass};
    use reason::*;

    let ip_options = [1, 1, 1, 0]; // NOP, NOP, NOP, end of options
    let egress_udp = ipv4(POD, PEER, proto::UDP, &udp(5555, 8080, b"x"));
    let egress_tcp = ipv4(POD, PEER, proto::TCP, &tcp(5556, 8080, SYN));
    let unknown_quote = ipv4(POD, PEER, proto::UDP, &udp(5555, 9999, b"x"));
    let tcp443 = tcp(1000, 443, SYN);
    // `n` destination options headers, the last naming TCP. The parser follows sixteen.
    let dest_opts_chain = |n: usize, sport: u16| {
        let mut chain = Vec::new();
        for i in 0..n {
            chain.extend_from_slice(&[if i == n - 1 { proto::TCP } else { NEXTHDR_DEST }, 0, 1, 4, 0, 0, 0, 0]);
        }
        chain.extend_from_slice(&tcp(sport, 443, SYN));
        chain
    };

    vec![
        // IPv4 TCP
        row(
            "v4 tcp SYN peer->pod:80 (exact allow)",
            IN,
            ipv4(PEER, POD, proto::TCP, &tcp(40000, 80, SYN)),
            Pass,
            ALLOWED_BY_POLICY,
        ),
        row(
            "v4 tcp ACK same flow (policy re-checked)",
            IN,
            ipv4(PEER, POD, proto::TCP, &tcp(40000, 80, ACK)),
            Pass,
            ALLOWED_BY_POLICY,
        ),
        row(
            "v4 tcp SYN|ACK reply pod:80->peer",
            OUT,
            ipv4(POD, PEER, proto::TCP, &tcp(80, 40000, SYN | ACK)),
            Pass,
            ALLOWED_REPLY,
        ),
        row(
            "v4 tcp ACK|PSH reply, zero-length payload",
            OUT,
            ipv4(POD, PEER, proto::TCP, &tcp(80, 40000, ACK | PSH)),
            Pass,
            ALLOWED_REPLY,
        ),
        row(
            "v4 tcp pod:80->peer:40001 is no reply",
            OUT,
            ipv4(POD, PEER, proto::TCP, &tcp(80, 40001, ACK)),
            Drop,
            DROP_POLICY_DENIED,
        ),
        row(
            "v4 tcp peer->pod:81 (no rule)",
            IN,
            ipv4(PEER, POD, proto::TCP, &tcp(40000, 81, SYN)),
            Drop,
            DROP_POLICY_DENIED,
        ),
        row(
            "v4 tcp peer->pod:22 (deny rule)",
            IN,
            ipv4(PEER, POD, proto::TCP, &tcp(40000, 22, SYN)),
            Drop,
            DROP_POLICY_DENY_RULE,
        ),
        row(
            "v4 tcp world->pod:80 (world, no rule)",
            IN,
            ipv4(WORLD, POD, proto::TCP, &tcp(40000, 80, SYN)),
            Drop,
            DROP_POLICY_DENIED,
        ),
        row(
            "v4 tcp world->pod:8443 (any-peer allow)",
            IN,
            ipv4(WORLD, POD, proto::TCP, &tcp(40000, 8443, SYN)),
            Pass,
            ALLOWED_BY_POLICY,
        ),
        row(
            "v4 tcp SYN+FIN peer->pod:80 (policy decides)",
            IN,
            ipv4(PEER, POD, proto::TCP, &tcp(40010, 80, SYN | FIN)),
            Pass,
            ALLOWED_BY_POLICY,
        ),
        row(
            "v4 tcp SYN+FIN peer->pod:81",
            IN,
            ipv4(PEER, POD, proto::TCP, &tcp(40011, 81, SYN | FIN)),
            Drop,
            DROP_POLICY_DENIED,
        ),
        row(
            "v4 tcp no flags peer->pod:80",
            IN,
            ipv4(PEER, POD, proto::TCP, &tcp(40012, 80, 0)),
            Pass,
            ALLOWED_BY_POLICY,
        ),
        row(
            "v4 tcp all flags peer->pod:80",
            IN,
            ipv4(PEER, POD, proto::TCP, &tcp(40013, 80, 0xff)),
            Pass,
            ALLOWED_BY_POLICY,
        ),
        row(
            "v4 tcp all flags peer->pod:22",
            IN,
            ipv4(PEER, POD, proto::TCP, &tcp(40013, 22, 0xff)),
            Drop,
            DROP_POLICY_DENY_RULE,
        ),
        row(
            "v4 tcp RST reply pod:80->peer",
            OUT,
            ipv4(POD, PEER, proto::TCP, &tcp(80, 40013, RST)),
            Pass,
            ALLOWED_REPLY,
        ),
        row(
            "v4 tcp data offset 4 (malformed)",
            IN,
            {
                let mut t = tcp(40000, 80, SYN);
                t[12] = 0x40;
                ipv4(PEER, POD, proto::TCP, &t)
            },
            Drop,
            DROP_MALFORMED,
        ),
        // IPv4 UDP, SCTP, other protocols
        row("v4 udp peer->pod:53", IN, ipv4(PEER, POD, proto::UDP, &udp(3333, 53, b"query")), Pass, ALLOWED_BY_POLICY),
        row(
            "v4 udp reply pod:53->peer",
            OUT,
            ipv4(POD, PEER, proto::UDP, &udp(53, 3333, b"answer")),
            Pass,
            ALLOWED_REPLY,
        ),
        row(
            "v4 udp peer->pod:53, zero-length payload",
            IN,
            ipv4(PEER, POD, proto::UDP, &udp(3334, 53, b"")),
            Pass,
            ALLOWED_BY_POLICY,
        ),
        row(
            "v4 udp peer->pod:54, zero-length payload",
            IN,
            ipv4(PEER, POD, proto::UDP, &udp(3334, 54, b"")),
            Drop,
            DROP_POLICY_DENIED,
        ),
        row("v4 sctp peer->pod:3868", IN, ipv4(PEER, POD, proto::SCTP, &sctp(5000, 3868)), Pass, ALLOWED_BY_POLICY),
        row("v4 sctp peer->pod:3869", IN, ipv4(PEER, POD, proto::SCTP, &sctp(5000, 3869)), Drop, DROP_POLICY_DENIED),
        row("v4 gre peer->pod (no rule, no ports)", IN, ipv4(PEER, POD, 47, &[0u8; 8]), Drop, DROP_POLICY_DENIED),
        row(
            "v4 udp pod->192.0.2.9:123 (CIDR peer, trie)",
            OUT,
            ipv4(POD, CIDR_HOST, proto::UDP, &udp(4444, 123, b"ntp")),
            Pass,
            ALLOWED_BY_POLICY,
        ),
        row(
            "v4 udp pod->192.0.2.9:124",
            OUT,
            ipv4(POD, CIDR_HOST, proto::UDP, &udp(4444, 124, b"ntp")),
            Drop,
            DROP_POLICY_DENIED,
        ),
        // ICMP
        row(
            "v4 icmp echo request peer->pod",
            IN,
            ipv4(PEER, POD, proto::ICMP, &icmp(8, 0, 77)),
            Pass,
            ALLOWED_BY_POLICY,
        ),
        row("v4 icmp echo reply pod->peer", OUT, ipv4(POD, PEER, proto::ICMP, &icmp(0, 0, 77)), Pass, ALLOWED_REPLY),
        row(
            "v4 icmp echo reply, another id",
            OUT,
            ipv4(POD, PEER, proto::ICMP, &icmp(0, 0, 78)),
            Drop,
            DROP_POLICY_DENIED,
        ),
        row(
            "v4 icmp timestamp request peer->pod",
            IN,
            ipv4(PEER, POD, proto::ICMP, &icmp(13, 0, 0)),
            Drop,
            DROP_POLICY_DENIED,
        ),
        row("v4 tcp SYN pod->peer:8080 (egress allow)", OUT, egress_tcp.clone(), Pass, ALLOWED_BY_POLICY),
        row(
            "v4 icmp port unreachable quoting it",
            IN,
            ipv4(PEER, POD, proto::ICMP, &icmp_error_quoting(3, 3, &egress_tcp)),
            Pass,
            ALLOWED_REPLY,
        ),
        row("v4 udp pod->peer:8080 (egress: TCP only)", OUT, egress_udp, Drop, DROP_POLICY_DENIED),
        row(
            "v4 icmp unreachable quoting an unknown flow",
            IN,
            ipv4(PEER, POD, proto::ICMP, &icmp_error_quoting(3, 3, &unknown_quote)),
            Drop,
            DROP_POLICY_DENIED,
        ),
        row(
            "v4 icmp header truncated to 2 bytes",
            IN,
            truncated(ipv4(PEER, POD, proto::ICMP, &icmp(8, 0, 1)), 14 + 20 + 2),
            Drop,
            DROP_MALFORMED,
        ),
        // IP options and malformed IPv4 headers
        row(
            "v4 with IP options, tcp peer->pod:80",
            IN,
            ipv4_full(PEER, POD, proto::TCP, &ip_options, 0, 1, &tcp(40020, 80, SYN)),
            Pass,
            ALLOWED_BY_POLICY,
        ),
        row(
            "v4 with IP options, tcp peer->pod:81",
            IN,
            ipv4_full(PEER, POD, proto::TCP, &ip_options, 0, 1, &tcp(40020, 81, SYN)),
            Drop,
            DROP_POLICY_DENIED,
        ),
        row(
            "v4 IHL 4 (malformed)",
            IN,
            {
                let mut f = ipv4(PEER, POD, proto::TCP, &tcp(40000, 80, SYN));
                f[14] = 0x44;
                f
            },
            Drop,
            DROP_MALFORMED,
        ),
        row(
            "v4 version 6 in an IPv4 frame",
            IN,
            {
                let mut f = ipv4(PEER, POD, proto::TCP, &tcp(40000, 80, SYN));
                f[14] = 0x65;
                f
            },
            Drop,
            DROP_MALFORMED,
        ),
        // IPv4 fragments
        row(
            "v4 first fragment udp peer->pod:53",
            IN,
            ipv4_full(PEER, POD, proto::UDP, &[], 0x2000, 100, &udp(3335, 53, &[0u8; 16])),
            Pass,
            ALLOWED_BY_POLICY,
        ),
        row(
            "v4 later fragment, first seen",
            IN,
            ipv4_full(PEER, POD, proto::UDP, &[], 3, 100, &[0u8; 16]),
            Pass,
            ALLOWED_BY_POLICY,
        ),
        row(
            "v4 later fragment, first unknown",
            IN,
            ipv4_full(PEER, POD, proto::UDP, &[], 3, 101, &[0u8; 16]),
            Drop,
            DROP_FRAGMENT_UNKNOWN,
        ),
        row(
            "v4 first fragment udp peer->pod:54",
            IN,
            ipv4_full(PEER, POD, proto::UDP, &[], 0x2000, 102, &udp(3335, 54, &[0u8; 16])),
            Drop,
            DROP_POLICY_DENIED,
        ),
        row(
            "v4 later fragment of the denied datagram",
            IN,
            ipv4_full(PEER, POD, proto::UDP, &[], 3, 102, &[0u8; 16]),
            Drop,
            DROP_POLICY_DENIED,
        ),
        // Truncated at each layer
        // BPF_PROG_TEST_RUN refuses (EINVAL) frames shorter than an Ethernet header plus the
        // IPv4/IPv6 base header their ethertype announces, so truncation there cannot be
        // crafted; what lies behind the base header can.
        row("ethernet header only, ARP ethertype", IN, ethernet(0x0806, &[]), Pass, ALLOWED_ALWAYS),
        row(
            "v4 IHL 15, options cut off",
            IN,
            {
                let mut f = ipv4(PEER, POD, proto::TCP, &tcp(1, 80, SYN));
                f[14] = 0x4f;
                truncated(f, 14 + 20 + 12)
            },
            Drop,
            DROP_MALFORMED,
        ),
        row(
            "truncated TCP header (6 of 20)",
            IN,
            truncated(ipv4(PEER, POD, proto::TCP, &tcp(1, 80, SYN)), 14 + 20 + 6),
            Drop,
            DROP_MALFORMED,
        ),
        row(
            "truncated UDP header (2 of 8)",
            IN,
            truncated(ipv4(PEER, POD, proto::UDP, &udp(1, 53, b"")), 14 + 20 + 2),
            Drop,
            DROP_MALFORMED,
        ),
        row(
            "truncated SCTP header (3 of 12)",
            IN,
            truncated(ipv4(PEER, POD, proto::SCTP, &sctp(1, 3868)), 14 + 20 + 3),
            Drop,
            DROP_MALFORMED,
        ),
        row(
            "truncated IPv6 fragment header (4 of 8)",
            IN,
            truncated(ipv6(PEER6, POD6, NEXTHDR_FRAGMENT, &frag6(proto::TCP, 0, true, 11, &tcp443)), 14 + 40 + 4),
            Drop,
            DROP_MALFORMED,
        ),
        row(
            "truncated IPv6 hop-by-hop header",
            IN,
            truncated(ipv6(PEER6, POD6, NEXTHDR_HOP, &ext(proto::TCP, &tcp443)), 14 + 40 + 1),
            Drop,
            DROP_MALFORMED,
        ),
        row(
            "truncated TCP behind IPv6 (10 of 20)",
            IN,
            truncated(ipv6(PEER6, POD6, proto::TCP, &tcp443), 14 + 40 + 10),
            Drop,
            DROP_MALFORMED,
        ),
        // IPv6
        row("v6 tcp SYN peer->pod:443", IN, ipv6(PEER6, POD6, proto::TCP, &tcp443), Pass, ALLOWED_BY_POLICY),
        row(
            "v6 tcp SYN|ACK reply",
            OUT,
            ipv6(POD6, PEER6, proto::TCP, &tcp(443, 1000, SYN | ACK)),
            Pass,
            ALLOWED_REPLY,
        ),
        row("v6 tcp peer->pod:444", IN, ipv6(PEER6, POD6, proto::TCP, &tcp(1000, 444, SYN)), Drop, DROP_POLICY_DENIED),
        row(
            "v6 tcp unknown peer (world-ipv6)->pod:443",
            IN,
            ipv6(OTHER6, POD6, proto::TCP, &tcp443),
            Drop,
            DROP_POLICY_DENIED,
        ),
        row(
            "v6 udp peer->pod:53, zero-length payload",
            IN,
            ipv6(PEER6, POD6, proto::UDP, &udp(3333, 53, b"")),
            Pass,
            ALLOWED_BY_POLICY,
        ),
        row("v6 sctp peer->pod:3868", IN, ipv6(PEER6, POD6, proto::SCTP, &sctp(5000, 3868)), Pass, ALLOWED_BY_POLICY),
        row(
            "v6 icmpv6 echo request peer->pod",
            IN,
            ipv6(PEER6, POD6, proto::ICMPV6, &icmp(128, 0, 9)),
            Pass,
            ALLOWED_BY_POLICY,
        ),
        row(
            "v6 icmpv6 echo reply pod->peer",
            OUT,
            ipv6(POD6, PEER6, proto::ICMPV6, &icmp(129, 0, 9)),
            Pass,
            ALLOWED_REPLY,
        ),
        row(
            "v6 icmpv6 type 200 (no rule)",
            IN,
            ipv6(PEER6, POD6, proto::ICMPV6, &icmp(200, 0, 0)),
            Drop,
            DROP_POLICY_DENIED,
        ),
        // IPv6 extension headers
        row(
            "v6 hop-by-hop, tcp :443",
            IN,
            ipv6(PEER6, POD6, NEXTHDR_HOP, &ext(proto::TCP, &tcp(1001, 443, SYN))),
            Pass,
            ALLOWED_BY_POLICY,
        ),
        row(
            "v6 routing header, tcp :443",
            IN,
            ipv6(PEER6, POD6, NEXTHDR_ROUTING, &ext(proto::TCP, &tcp(1002, 443, SYN))),
            Pass,
            ALLOWED_BY_POLICY,
        ),
        row(
            "v6 destination options, tcp :444",
            IN,
            ipv6(PEER6, POD6, NEXTHDR_DEST, &ext(proto::TCP, &tcp(1003, 444, SYN))),
            Drop,
            DROP_POLICY_DENIED,
        ),
        row(
            "v6 hop-by-hop+routing+dest options, tcp :443",
            IN,
            ipv6(
                PEER6,
                POD6,
                NEXTHDR_HOP,
                &ext(NEXTHDR_ROUTING, &ext(NEXTHDR_DEST, &ext(proto::TCP, &tcp(1004, 443, SYN)))),
            ),
            Pass,
            ALLOWED_BY_POLICY,
        ),
        row(
            "v6 six extension headers",
            IN,
            ipv6(PEER6, POD6, NEXTHDR_DEST, &dest_opts_chain(6, 1006)),
            Pass,
            ALLOWED_BY_POLICY,
        ),
        row(
            "v6 seven extension headers",
            IN,
            ipv6(PEER6, POD6, NEXTHDR_DEST, &dest_opts_chain(7, 1007)),
            Pass,
            ALLOWED_BY_POLICY,
        ),
        row(
            "v6 sixteen extension headers (the most followed)",
            IN,
            ipv6(PEER6, POD6, NEXTHDR_DEST, &dest_opts_chain(16, 1016)),
            Pass,
            ALLOWED_BY_POLICY,
        ),
        row(
            "v6 seventeen extension headers (too many)",
            IN,
            ipv6(PEER6, POD6, NEXTHDR_DEST, &dest_opts_chain(17, 1017)),
            Drop,
            DROP_IPV6_EXT_CHAIN,
        ),
        row(
            "v6 first fragment, tcp :443",
            IN,
            ipv6(PEER6, POD6, NEXTHDR_FRAGMENT, &frag6(proto::TCP, 0, true, 7, &tcp(1005, 443, SYN))),
            Pass,
            ALLOWED_BY_POLICY,
        ),
        row(
            "v6 later fragment, first seen",
            IN,
            ipv6(PEER6, POD6, NEXTHDR_FRAGMENT, &frag6(proto::TCP, 3, false, 7, &[0u8; 16])),
            Pass,
            ALLOWED_BY_POLICY,
        ),
        row(
            "v6 later fragment, first unknown",
            IN,
            ipv6(PEER6, POD6, NEXTHDR_FRAGMENT, &frag6(proto::TCP, 3, false, 8, &[0u8; 16])),
            Drop,
            DROP_FRAGMENT_UNKNOWN,
        ),
        row(
            "v6 hop-by-hop then fragment header, first",
            IN,
            ipv6(
                PEER6,
                POD6,
                NEXTHDR_HOP,
                &ext(NEXTHDR_FRAGMENT, &frag6(proto::UDP, 0, true, 9, &udp(3336, 53, &[0u8; 8]))),
            ),
            Pass,
            ALLOWED_BY_POLICY,
        ),
        // Spoofed sources (checked on what the pod sends)
        row(
            "v4 spoofed source pod->peer:8080",
            OUT,
            ipv4([10, 0, 0, 99], PEER, proto::TCP, &tcp(5557, 8080, SYN)),
            Drop,
            DROP_SPOOFED_SOURCE,
        ),
        row(
            "v6 spoofed source pod->peer:8080",
            OUT,
            ipv6(OTHER6, PEER6, proto::TCP, &tcp(5557, 8080, SYN)),
            Drop,
            DROP_SPOOFED_SOURCE,
        ),
        row(
            "v6 link-local source is the pod's own",
            OUT,
            ipv6(LINK_LOCAL, PEER6, proto::TCP, &tcp(5558, 8080, SYN)),
            Pass,
            ALLOWED_BY_POLICY,
        ),
        row(
            "v4 spoofed source inbound is not checked",
            IN,
            ipv4(PEER, [10, 0, 0, 99], proto::TCP, &tcp(5559, 80, SYN)),
            Pass,
            ALLOWED_BY_POLICY,
        ),
        // Not IP, and neighbour discovery under default deny
        row("arp request in", IN, ethernet(0x0806, &[0u8; 28]), Pass, ALLOWED_ALWAYS),
        row("arp reply out", OUT, ethernet(0x0806, &[0u8; 28]), Pass, ALLOWED_ALWAYS),
        row(
            "v6 neighbour solicitation in",
            IN,
            ipv6_hl(255, LINK_LOCAL, POD6, proto::ICMPV6, &[135, 0, 0, 0, 0, 0, 0, 0]),
            Pass,
            ALLOWED_ALWAYS,
        ),
        row(
            "v6 neighbour advertisement out",
            OUT,
            ipv6_hl(255, POD6, LINK_LOCAL, proto::ICMPV6, &[136, 0, 0, 0, 0, 0, 0, 0]),
            Pass,
            ALLOWED_ALWAYS,
        ),
        row(
            "v6 router solicitation out",
            OUT,
            ipv6_hl(255, LINK_LOCAL, ALL_NODES, proto::ICMPV6, &[133, 0, 0, 0, 0, 0, 0, 0]),
            Pass,
            ALLOWED_ALWAYS,
        ),
        row(
            "v6 router advertisement in",
            IN,
            ipv6_hl(255, LINK_LOCAL, ALL_NODES, proto::ICMPV6, &[134, 0, 0, 0, 0, 0, 0, 0]),
            Pass,
            ALLOWED_ALWAYS,
        ),
        row(
            "v6 MLDv2 report out",
            OUT,
            ipv6_hl(1, LINK_LOCAL, ALL_NODES, proto::ICMPV6, &[143, 0, 0, 0, 0, 0, 0, 0]),
            Pass,
            ALLOWED_ALWAYS,
        ),
        row(
            "v6 DAD solicitation from :: out",
            OUT,
            ipv6_hl(255, [0; 16], ALL_NODES, proto::ICMPV6, &[135, 0, 0, 0, 0, 0, 0, 0]),
            Pass,
            ALLOWED_ALWAYS,
        ),
    ]
}

#[test]
fn crafted_packets_get_their_verdict_and_reason() {
    let mut fx = fixture();
    let rows = rows();
    assert!(rows.len() >= 40, "the table has {} rows", rows.len());
    let mut report = String::new();
    let mut failures = 0;
    for (i, r) in rows.iter().enumerate() {
        let dir = if r.hook == Hook::FromPod { direction::EGRESS } else { direction::INGRESS };
        let mut problems = Vec::new();
        match fx.try_observe_from(r.hook, &r.frame, 0) {
            Err(e) => problems.push(e),
            Ok(Observed { out, moved, events }) => {
                let events: Vec<u8> = events.iter().map(|e| e.reason).collect();
                let got_verdict = if out.dropped() { Verdict::Drop } else { Verdict::Pass };
                if got_verdict != r.verdict {
                    problems.push(format!("verdict {got_verdict:?} (action {})", out.action));
                }
                if moved != [(r.reason, dir)] {
                    let got: Vec<String> = moved
                        .iter()
                        .map(|(m, d)| format!("{}/{}", reason_name(*m), if *d == 0 { "in" } else { "out" }))
                        .collect();
                    problems.push(format!("counters moved: [{}]", got.join(", ")));
                }
                let want_events: Vec<u8> = if r.verdict == Verdict::Drop { vec![r.reason] } else { Vec::new() };
                if events != want_events {
                    let got: Vec<&str> = events.iter().map(|e| reason_name(*e)).collect();
                    problems.push(format!("events: {got:?}"));
                }
            }
        }
        let hook = if r.hook == Hook::FromPod { "from-pod" } else { "to-pod  " };
        let mark = if problems.is_empty() { "ok  " } else { "FAIL" };
        let _ = writeln!(
            report,
            "{mark} {i:>2} {hook} {:<48} want {:?} {:<22} {}",
            r.name,
            r.verdict,
            reason_name(r.reason),
            problems.join("; ")
        );
        if !problems.is_empty() {
            failures += 1;
        }
    }
    assert!(failures == 0, "{failures} of {} packets got another verdict or reason:\n{report}", rows.len());
    eprintln!("{} packets:\n{report}", rows.len());
}
