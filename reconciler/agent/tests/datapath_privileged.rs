//! Kernel tests of the datapath (need root and bpffs at /sys/fs/bpf; `ci/setup.sh` mounts
//! it). The real eBPF object is loaded with its maps pinned in a private directory
//! (`/sys/fs/bpf/palisade-test-<pid>-<n>`, removed by a guard even on panic), the maps are
//! filled, and the programs run on crafted frames with `BPF_PROG_TEST_RUN`. Without a context
//! the kernel runs them on the loopback device, so endpoints are registered at ifindex 1.
//! Attach tests create a veth pair inside a throwaway network namespace (one thread's,
//! gone with the thread), never in the root namespace.
mod common;
use common::PinDir;

use std::process::Command;

use aya::maps::lpm_trie::Key;
use palisade_agent::datapath::{
    AttachMode, Datapath, DatapathConfig, DatapathError, EventReader, Hook, MapSet, TestRunOutcome,
};
use palisade_common::{
    CtKey, EndpointInfo, IpcacheValue, Ipv4Prefix, Ipv6Prefix, POLICY_PREFIX_FIXED, POLICY_PREFIX_FULL,
    POLICY_PREFIX_PROTO, PolicyKey, PolicyValue, VerdictEvent, ct_flags, direction, endpoint_flags, family, identity,
    map_names, match_kind, policy_flags, policy_view, proto, reason, verdict,
};

// ---------------------------------------------------------------------------------------
// Fixtures

/// The interface the programs see under `BPF_PROG_TEST_RUN` without a context: loopback.
const LO: u32 = 1;
const EP_ID: u16 = 10;
const EP_IDENTITY: u32 = 1000;
const POD: [u8; 4] = [10, 0, 0, 2];
const PEER: [u8; 4] = [10, 0, 0, 1];
const PEER_ID: u32 = 300;
const OTHER: [u8; 4] = [10, 0, 0, 3];
const OTHER_ID: u32 = 301;
const INTERNET: [u8; 4] = [8, 8, 8, 8];
const POD6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
const PEER6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

/// A loaded datapath with its maps and events, in a private pin directory.
struct Fixture {
    dp: Datapath,
    maps: MapSet,
    events: EventReader,
    // Dropped last: removes the pins after the handles are closed.
    _pins: PinDir,
}

impl Fixture {
    fn new() -> Fixture {
        let pins = PinDir::new("test");
        let mut dp = Datapath::load(&pins.config()).unwrap_or_else(|e| panic!("loading the datapath: {e}"));
        let maps = dp.take_maps().expect("maps");
        let events = dp.take_events().expect("events");
        Fixture { dp, maps, events, _pins: pins }
    }

    fn endpoint(&mut self, ifindex: u32, flags: u32) {
        let ep = EndpointInfo { endpoint_id: EP_ID.into(), identity: EP_IDENTITY, flags, ipv4: POD, ipv6: POD6 };
        self.maps.endpoints.insert(ifindex, ep, 0).expect("insert endpoint");
    }

    fn ipcache(&mut self, addr: [u8; 4], prefix_len: u32, identity: u32) {
        let key = Key::new(prefix_len, Ipv4Prefix { addr });
        self.maps.ipcache_v4.insert(&key, IpcacheValue { identity, flags: 0 }, 0).expect("insert ipcache");
    }

    fn ipcache6(&mut self, addr: [u8; 16], identity: u32) {
        let key = Key::new(128, Ipv6Prefix { addr });
        self.maps.ipcache_v6.insert(&key, IpcacheValue { identity, flags: 0 }, 0).expect("insert ipcache");
    }

    #[allow(clippy::too_many_arguments, reason = "one argument per key field, as in the ABI")]
    fn rule(&mut self, dir: u8, peer: u32, protocol: u8, port: u16, prefix_len: u32, deny: bool, cookie: u32) {
        let key = PolicyKey::new(EP_ID, dir, peer, protocol, port);
        let value = PolicyValue { flags: if deny { policy_flags::DENY } else { 0 }, cookie, prefix_len };
        self.maps.insert_policy(prefix_len, key, value).expect("insert policy");
    }

    /// An entry of the audit view ([`policy_view::AUDIT`]).
    #[allow(clippy::too_many_arguments, reason = "one argument per key field, as in the ABI")]
    fn audit_rule(&mut self, dir: u8, peer: u32, protocol: u8, port: u16, prefix_len: u32, deny: bool, cookie: u32) {
        let key = PolicyKey::new(EP_ID, dir, peer, protocol, port).in_view(policy_view::AUDIT);
        let value = PolicyValue { flags: if deny { policy_flags::DENY } else { 0 }, cookie, prefix_len };
        self.maps.insert_policy(prefix_len, key, value).expect("insert policy");
    }

    fn allow_events(&mut self) {
        self.maps.set_allow_events(true).expect("config");
    }

    fn run(&self, hook: Hook, frame: &[u8]) -> TestRunOutcome {
        self.dp.test_run(hook, frame, None).expect("test run")
    }

    fn events(&mut self) -> Vec<VerdictEvent> {
        let mut out = Vec::new();
        self.events.drain(&mut out);
        out
    }

    fn packets(&self, r: u8, dir: u8) -> u64 {
        self.maps.sum_counters().expect("counters").get(r, dir).packets
    }
}

// ---------------------------------------------------------------------------------------
// Frames

fn ethernet(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01];
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn ipv4_header(src: [u8; 4], dst: [u8; 4], protocol: u8, payload_len: usize, frag: u16) -> Vec<u8> {
    let total = (20 + payload_len) as u16;
    let mut h = vec![0x45, 0];
    h.extend_from_slice(&total.to_be_bytes());
    h.extend_from_slice(&[0x12, 0x34]);
    h.extend_from_slice(&frag.to_be_bytes());
    h.extend_from_slice(&[64, protocol, 0, 0]);
    h.extend_from_slice(&src);
    h.extend_from_slice(&dst);
    h
}

fn ipv4(src: [u8; 4], dst: [u8; 4], protocol: u8, l4: &[u8]) -> Vec<u8> {
    let mut p = ipv4_header(src, dst, protocol, l4.len(), 0);
    p.extend_from_slice(l4);
    ethernet(0x0800, &p)
}

fn ipv6(src: [u8; 16], dst: [u8; 16], next: u8, l4: &[u8]) -> Vec<u8> {
    let mut p = vec![0x60, 0, 0, 0];
    p.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    p.extend_from_slice(&[next, 64]);
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    p.extend_from_slice(l4);
    ethernet(0x86dd, &p)
}

fn tcp(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut t = Vec::new();
    t.extend_from_slice(&sport.to_be_bytes());
    t.extend_from_slice(&dport.to_be_bytes());
    t.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    t
}

fn udp(sport: u16, dport: u16) -> Vec<u8> {
    let mut u = Vec::new();
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&[0, 12, 0, 0, b'p', b'i', b'n', b'g']);
    u
}

fn icmp(ty: u8, code: u8, id: u16) -> Vec<u8> {
    let mut i = vec![ty, code, 0, 0];
    i.extend_from_slice(&id.to_be_bytes());
    i.extend_from_slice(&[0, 1]);
    i
}

fn tcp4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    ipv4(src, dst, proto::TCP, &tcp(sport, dport, flags))
}

fn v4(a: [u8; 4]) -> [u8; 16] {
    let mut x = [0u8; 16];
    x[..4].copy_from_slice(&a);
    x
}

fn assert_passed(o: TestRunOutcome, what: &str) {
    assert!(o.passed(), "{what}: expected pass (-1), program returned {}", o.action);
}

fn assert_dropped(o: TestRunOutcome, what: &str) {
    assert!(o.dropped(), "{what}: expected drop (2), program returned {}", o.action);
}

// ---------------------------------------------------------------------------------------
// Verdicts

#[test]
fn allows_matching_identity_and_port_with_counters_and_event() {
    let mut fx = Fixture::new();
    fx.endpoint(LO, endpoint_flags::INGRESS_ENFORCED);
    fx.ipcache(PEER, 32, PEER_ID);
    fx.rule(direction::INGRESS, PEER_ID, proto::TCP, 80, POLICY_PREFIX_FULL, false, 7);
    fx.allow_events();

    let frame = tcp4(PEER, POD, 40000, 80, TCP_SYN);
    assert_passed(fx.run(Hook::ToPod, &frame), "allowed peer to port 80");

    let totals = fx.maps.sum_counters().unwrap();
    let c = totals.get(reason::ALLOWED_BY_POLICY, direction::INGRESS);
    assert_eq!((c.packets, c.bytes), (1, frame.len() as u64));
    assert_eq!(totals.nonzero().count(), 1, "only one counter moves: {:?}", totals.nonzero().collect::<Vec<_>>());

    let evs = fx.events();
    assert_eq!(evs.len(), 1, "one event for the new flow: {evs:?}");
    let ev = evs[0];
    assert!(ev.ts_ns > 0);
    assert_eq!(ev.endpoint_id, u32::from(EP_ID));
    assert_eq!(ev.ifindex, LO);
    assert_eq!(ev.peer_identity, PEER_ID);
    assert_eq!(ev.cookie, 7);
    assert_eq!((ev.saddr, ev.daddr), (v4(PEER), v4(POD)));
    assert_eq!((ev.sport, ev.dport), (40000, 80));
    assert_eq!((ev.family, ev.protocol, ev.direction), (family::IPV4, proto::TCP, direction::INGRESS));
    assert_eq!((ev.verdict, ev.reason, ev.match_kind), (verdict::ALLOW, reason::ALLOWED_BY_POLICY, match_kind::L3_L4));
    assert_eq!(ev.tcp_flags, TCP_SYN);
    assert_eq!(ev.pkt_len, frame.len() as u32);

    // The same flow again: still allowed (policy re-checked), but no longer new: no event.
    assert_passed(fx.run(Hook::ToPod, &tcp4(PEER, POD, 40000, 80, TCP_ACK)), "second packet");
    assert!(fx.events().is_empty(), "no event for a known flow");
    assert_eq!(fx.packets(reason::ALLOWED_BY_POLICY, direction::INGRESS), 2);
}

#[test]
fn allowed_flow_events_are_off_by_default() {
    let mut fx = Fixture::new();
    fx.endpoint(LO, endpoint_flags::INGRESS_ENFORCED);
    fx.ipcache(PEER, 32, PEER_ID);
    fx.rule(direction::INGRESS, PEER_ID, proto::TCP, 80, POLICY_PREFIX_FULL, false, 7);
    assert_passed(fx.run(Hook::ToPod, &tcp4(PEER, POD, 40000, 80, TCP_SYN)), "allowed");
    assert!(fx.events().is_empty());
}

#[test]
fn denies_another_port() {
    let mut fx = Fixture::new();
    fx.endpoint(LO, endpoint_flags::INGRESS_ENFORCED);
    fx.ipcache(PEER, 32, PEER_ID);
    fx.rule(direction::INGRESS, PEER_ID, proto::TCP, 80, POLICY_PREFIX_FULL, false, 7);

    let frame = tcp4(PEER, POD, 40000, 81, TCP_SYN);
    assert_dropped(fx.run(Hook::ToPod, &frame), "port 81");
    assert_eq!(fx.packets(reason::DROP_POLICY_DENIED, direction::INGRESS), 1);
    let evs = fx.events();
    assert_eq!(evs.len(), 1, "drops are always reported");
    let ev = evs[0];
    assert_eq!((ev.verdict, ev.reason, ev.match_kind), (verdict::DROP, reason::DROP_POLICY_DENIED, match_kind::NONE));
    assert_eq!((ev.peer_identity, ev.cookie, ev.dport), (PEER_ID, 0, 81));
    // UDP to port 80 is another protocol: denied too.
    assert_dropped(fx.run(Hook::ToPod, &ipv4(PEER, POD, proto::UDP, &udp(40000, 80))), "udp/80");
}

#[test]
fn denies_another_identity() {
    let mut fx = Fixture::new();
    fx.endpoint(LO, endpoint_flags::INGRESS_ENFORCED);
    fx.ipcache(PEER, 32, PEER_ID);
    fx.ipcache(OTHER, 32, OTHER_ID);
    fx.rule(direction::INGRESS, PEER_ID, proto::TCP, 80, POLICY_PREFIX_FULL, false, 7);

    assert_dropped(fx.run(Hook::ToPod, &tcp4(OTHER, POD, 40000, 80, TCP_SYN)), "other identity");
    let ev = fx.events()[0];
    assert_eq!((ev.peer_identity, ev.reason), (OTHER_ID, reason::DROP_POLICY_DENIED));
}

#[test]
fn ipcache_is_longest_prefix_match() {
    let mut fx = Fixture::new();
    fx.endpoint(LO, endpoint_flags::INGRESS_ENFORCED);
    fx.ipcache([10, 0, 0, 0], 8, OTHER_ID);
    fx.ipcache(PEER, 32, PEER_ID);
    fx.rule(direction::INGRESS, OTHER_ID, proto::TCP, 80, POLICY_PREFIX_FULL, false, 1);
    assert_passed(fx.run(Hook::ToPod, &tcp4([10, 9, 9, 9], POD, 1, 80, TCP_SYN)), "10.9.9.9 is in 10/8");
    assert_dropped(fx.run(Hook::ToPod, &tcp4(PEER, POD, 1, 80, TCP_SYN)), "the /32 is more specific");
}

#[test]
fn host_entries_are_looked_up_before_the_trie() {
    let mut fx = Fixture::new();
    fx.endpoint(LO, endpoint_flags::INGRESS_ENFORCED);
    // PEER has a host entry (where the agent puts /32s) and lies in a /8 of the trie.
    fx.ipcache([10, 0, 0, 0], 8, OTHER_ID);
    let host = IpcacheValue { identity: PEER_ID, flags: 0 };
    fx.maps.ipcache_host_v4.insert(Ipv4Prefix { addr: PEER }, host, 0).unwrap();
    fx.maps.ipcache_host_v6.insert(Ipv6Prefix { addr: PEER6 }, host, 0).unwrap();
    fx.rule(direction::INGRESS, PEER_ID, proto::TCP, 80, POLICY_PREFIX_FULL, false, 1);
    fx.rule(direction::INGRESS, OTHER_ID, proto::TCP, 81, POLICY_PREFIX_FULL, false, 2);

    assert_passed(fx.run(Hook::ToPod, &tcp4(PEER, POD, 1, 80, TCP_SYN)), "host entry: PEER_ID");
    assert_dropped(fx.run(Hook::ToPod, &tcp4(PEER, POD, 1, 81, TCP_SYN)), "the host entry beats the /8");
    assert_passed(fx.run(Hook::ToPod, &tcp4(OTHER, POD, 1, 81, TCP_SYN)), "no host entry: the /8");
    assert_passed(fx.run(Hook::ToPod, &ipv6(PEER6, POD6, proto::TCP, &tcp(1, 80, TCP_SYN))), "v6 host entry");
    let evs = fx.events();
    assert_eq!(evs.len(), 1, "{evs:?}");
    assert_eq!(evs[0].peer_identity, PEER_ID);

    // Without its host entry the address falls back to the trie.
    fx.maps.ipcache_host_v4.remove(&Ipv4Prefix { addr: PEER }).unwrap();
    assert_passed(fx.run(Hook::ToPod, &tcp4(PEER, POD, 2, 81, TCP_SYN)), "trie after the host entry is gone");
}

#[test]
fn explicit_deny_beats_allow() {
    let mut fx = Fixture::new();
    fx.endpoint(LO, endpoint_flags::INGRESS_ENFORCED);
    fx.ipcache(PEER, 32, PEER_ID);
    fx.ipcache(OTHER, 32, OTHER_ID);
    // Any peer may reach TCP 80 ...
    fx.rule(direction::INGRESS, identity::ANY, proto::TCP, 80, POLICY_PREFIX_FULL, false, 1);
    // ... but PEER is denied everything.
    fx.rule(direction::INGRESS, PEER_ID, proto::ANY, 0, POLICY_PREFIX_FIXED, true, 2);
    // OTHER has an exact allow on TCP 443, and any peer is denied TCP 443.
    fx.rule(direction::INGRESS, OTHER_ID, proto::TCP, 443, POLICY_PREFIX_FULL, false, 3);
    fx.rule(direction::INGRESS, identity::ANY, proto::TCP, 443, POLICY_PREFIX_FULL, true, 4);

    assert_dropped(fx.run(Hook::ToPod, &tcp4(PEER, POD, 1, 80, TCP_SYN)), "identity deny over any-peer allow");
    assert_passed(fx.run(Hook::ToPod, &tcp4(OTHER, POD, 1, 80, TCP_SYN)), "any-peer allow for others");
    assert_dropped(fx.run(Hook::ToPod, &tcp4(OTHER, POD, 1, 443, TCP_SYN)), "any-peer deny over exact allow");

    let evs = fx.events();
    assert_eq!(evs.len(), 2, "{evs:?}");
    assert_eq!(
        (evs[0].reason, evs[0].match_kind, evs[0].cookie),
        (reason::DROP_POLICY_DENY_RULE, match_kind::L3_ONLY, 2)
    );
    assert_eq!(
        (evs[1].reason, evs[1].match_kind, evs[1].cookie),
        (reason::DROP_POLICY_DENY_RULE, match_kind::L4_ONLY, 4)
    );
    assert_eq!(fx.packets(reason::DROP_POLICY_DENY_RULE, direction::INGRESS), 2);
}

#[test]
fn unenforced_endpoint_passes_everything() {
    let mut fx = Fixture::new();
    fx.endpoint(LO, endpoint_flags::INGRESS_ENFORCED);
    fx.allow_events();
    // Egress is not enforced: anything the pod sends passes.
    assert_passed(fx.run(Hook::FromPod, &tcp4(POD, INTERNET, 5000, 25, TCP_SYN)), "egress not enforced");
    assert_eq!(fx.packets(reason::ALLOWED_NOT_ENFORCED, direction::EGRESS), 1);
    let ev = fx.events()[0];
    assert_eq!(
        (ev.reason, ev.direction, ev.peer_identity),
        (reason::ALLOWED_NOT_ENFORCED, direction::EGRESS, identity::WORLD_IPV4)
    );
    // Ingress is enforced with no rule: default deny.
    assert_dropped(fx.run(Hook::ToPod, &tcp4(PEER, POD, 5000, 25, TCP_SYN)), "ingress enforced");
}

#[test]
fn unknown_interface_fails_closed() {
    let mut fx = Fixture::new();
    // An endpoint on another interface; the program runs on loopback, which has no record
    // (as a pod would have when the ENDPOINTS table is full): everything is dropped.
    fx.endpoint(4242, endpoint_flags::INGRESS_ENFORCED | endpoint_flags::EGRESS_ENFORCED);
    assert_dropped(fx.run(Hook::ToPod, &tcp4(PEER, POD, 1, 80, TCP_SYN)), "not an endpoint");
    assert_dropped(fx.run(Hook::FromPod, &[0u8; 14]), "not an endpoint, not even IP");
    assert_dropped(fx.run(Hook::FromPod, &ethernet(0x0806, &[0u8; 28])), "not an endpoint, ARP");
    assert_eq!(fx.packets(reason::DROP_NO_ENDPOINT, direction::INGRESS), 1);
    assert_eq!(fx.packets(reason::DROP_NO_ENDPOINT, direction::EGRESS), 2);
    let evs = fx.events();
    assert_eq!(evs.len(), 3);
    assert!(evs.iter().all(|e| e.reason == reason::DROP_NO_ENDPOINT && e.endpoint_id == 0), "{evs:?}");
    assert_eq!((evs[0].saddr, evs[0].dport), (v4(PEER), 80), "what could be parsed is reported");
}

#[test]
fn unknown_peer_is_world() {
    let mut fx = Fixture::new();
    fx.endpoint(LO, endpoint_flags::EGRESS_ENFORCED);
    fx.allow_events();
    // DNS to the world (no ipcache entry: world-ipv4)...
    fx.rule(direction::EGRESS, identity::WORLD_IPV4, proto::UDP, 53, POLICY_PREFIX_FULL, false, 11);
    // ... and TCP anywhere, any port.
    fx.rule(direction::EGRESS, identity::ANY, proto::TCP, 0, POLICY_PREFIX_PROTO, false, 12);

    assert_passed(fx.run(Hook::FromPod, &ipv4(POD, INTERNET, proto::UDP, &udp(3333, 53))), "dns to world");
    assert_dropped(fx.run(Hook::FromPod, &ipv4(POD, INTERNET, proto::UDP, &udp(3333, 54))), "udp/54 to world");
    assert_passed(fx.run(Hook::FromPod, &tcp4(POD, INTERNET, 3333, 8443, TCP_SYN)), "tcp anywhere");
    let evs = fx.events();
    assert_eq!(evs.len(), 3, "{evs:?}");
    assert!(evs.iter().all(|e| e.peer_identity == identity::WORLD_IPV4));
    assert_eq!((evs[0].reason, evs[0].match_kind, evs[0].cookie), (reason::ALLOWED_BY_POLICY, match_kind::L3_L4, 11));
    assert_eq!(evs[1].reason, reason::DROP_POLICY_DENIED);
    assert_eq!((evs[2].reason, evs[2].match_kind, evs[2].cookie), (reason::ALLOWED_BY_POLICY, match_kind::L4_ONLY, 12));
}

#[test]
fn any_peer_any_port_is_match_kind_all() {
    let mut fx = Fixture::new();
    fx.endpoint(LO, endpoint_flags::EGRESS_ENFORCED);
    fx.allow_events();
    fx.rule(direction::EGRESS, identity::ANY, proto::ANY, 0, POLICY_PREFIX_FIXED, false, 5);
    assert_passed(fx.run(Hook::FromPod, &ipv4(POD, PEER, 47, &[0u8; 8])), "gre, allow-all");
    let ev = fx.events()[0];
    assert_eq!((ev.match_kind, ev.protocol, ev.cookie), (match_kind::ALL, 47, 5));
}

#[test]
fn reply_of_allowed_flow_passes_via_conntrack() {
    let mut fx = Fixture::new();
    fx.endpoint(LO, endpoint_flags::INGRESS_ENFORCED | endpoint_flags::EGRESS_ENFORCED);
    fx.ipcache(PEER, 32, PEER_ID);
    fx.rule(direction::INGRESS, PEER_ID, proto::TCP, 80, POLICY_PREFIX_FULL, false, 7);

    // Before any request, the pod may not send to PEER (egress enforced, no rule).
    assert_dropped(fx.run(Hook::FromPod, &tcp4(POD, PEER, 80, 40000, TCP_SYN | TCP_ACK)), "reply before request");

    assert_passed(fx.run(Hook::ToPod, &tcp4(PEER, POD, 40000, 80, TCP_SYN)), "request");
    // One entry for both directions, keyed by the ends in address order; the request's flow
    // is in the request's orientation.
    let (key, orientation) = CtKey::normalised(&v4(PEER), &v4(POD), 40000, 80, proto::TCP, family::IPV4);
    let ct = fx.maps.conntrack.get(&key, 0).expect("conntrack entry for the request").orig[orientation];
    assert_eq!(ct.flags & ct_flags::INGRESS_OK, ct_flags::INGRESS_OK);
    assert_eq!(ct.cookie, 7);

    assert_passed(fx.run(Hook::FromPod, &tcp4(POD, PEER, 80, 40000, TCP_SYN | TCP_ACK)), "reply");
    assert_eq!(fx.packets(reason::ALLOWED_REPLY, direction::EGRESS), 1);
    let ct = fx.maps.conntrack.get(&key, 0).unwrap().orig[orientation];
    assert_ne!(ct.flags & ct_flags::SEEN_REPLY, 0);

    // The reply direction is not a free pass: other ports from the pod are still denied.
    assert_dropped(fx.run(Hook::FromPod, &tcp4(POD, PEER, 80, 40001, TCP_ACK)), "not a reply");
    // FIN from the pod is recorded on the flow.
    assert_passed(fx.run(Hook::FromPod, &tcp4(POD, PEER, 80, 40000, TCP_FIN | TCP_ACK)), "fin reply");
    let ct = fx.maps.conntrack.get(&key, 0).unwrap().orig[orientation];
    assert_ne!(ct.flags & ct_flags::TCP_FIN_REV, 0);

    // Without conntrack, the reply is a forward packet again: denied.
    assert_eq!(fx.maps.flush_conntrack().unwrap(), 1);
    assert_dropped(fx.run(Hook::FromPod, &tcp4(POD, PEER, 80, 40000, TCP_ACK)), "reply after flush");
}

#[test]
fn denied_forward_packet_revokes_replies() {
    let mut fx = Fixture::new();
    fx.endpoint(LO, endpoint_flags::INGRESS_ENFORCED | endpoint_flags::EGRESS_ENFORCED);
    fx.ipcache(PEER, 32, PEER_ID);
    fx.rule(direction::INGRESS, PEER_ID, proto::TCP, 80, POLICY_PREFIX_FULL, false, 7);
    assert_passed(fx.run(Hook::ToPod, &tcp4(PEER, POD, 40000, 80, TCP_SYN)), "request");
    // The policy changes: the next forward packet is denied and replies stop.
    let key = PolicyKey::new(EP_ID, direction::INGRESS, PEER_ID, proto::TCP, 80);
    fx.maps.remove_policy(POLICY_PREFIX_FULL, key).unwrap();
    assert_dropped(fx.run(Hook::ToPod, &tcp4(PEER, POD, 40000, 80, TCP_ACK)), "forward after policy change");
    assert_dropped(fx.run(Hook::FromPod, &tcp4(POD, PEER, 80, 40000, TCP_ACK)), "reply after revocation");
}

#[test]
fn established_flow_is_rechecked_when_the_policy_generation_moves() {
    let mut fx = Fixture::new();
    fx.endpoint(LO, endpoint_flags::INGRESS_ENFORCED);
    fx.ipcache(PEER, 32, PEER_ID);
    fx.rule(direction::INGRESS, PEER_ID, proto::TCP, 80, POLICY_PREFIX_FULL, false, 7);
    let generation = fx.maps.config.get(&palisade_common::config::POLICY_GEN, 0).unwrap();
    assert_ne!(generation, 0, "writing policy moves the generation on");

    assert_passed(fx.run(Hook::ToPod, &tcp4(PEER, POD, 40000, 80, TCP_SYN)), "request");
    // One entry for both directions, keyed by the ends in address order; the request's flow
    // is in the request's orientation.
    let (key, orientation) = CtKey::normalised(&v4(PEER), &v4(POD), 40000, 80, proto::TCP, family::IPV4);
    let ct = fx.maps.conntrack.get(&key, 0).unwrap().orig[orientation];
    assert_eq!(ct.policy_gen[direction::INGRESS as usize], generation, "the verdict is remembered with its generation");
    assert_eq!(ct.policy_gen[direction::EGRESS as usize], 0, "egress is not enforced: nothing remembered there");
    assert_passed(fx.run(Hook::ToPod, &tcp4(PEER, POD, 40000, 80, TCP_ACK)), "established");
    assert_eq!(fx.packets(reason::ALLOWED_BY_POLICY, direction::INGRESS), 2);

    // The peer's address moves to another identity, written without moving the generation
    // (which the map writer never does): the remembered verdict still stands. This shows the
    // established packets really skip the lookups, and why every write must move it on.
    fx.ipcache(PEER, 32, OTHER_ID);
    assert_passed(fx.run(Hook::ToPod, &tcp4(PEER, POD, 40000, 80, TCP_ACK)), "stale by construction");
    let next = fx.maps.bump_policy_generation().unwrap();
    assert_eq!(next, generation + 1);
    assert_dropped(fx.run(Hook::ToPod, &tcp4(PEER, POD, 40000, 80, TCP_ACK)), "re-checked at the new generation");
    assert_eq!(fx.packets(reason::DROP_POLICY_DENIED, direction::INGRESS), 1);
    let ct = fx.maps.conntrack.get(&key, 0).unwrap().orig[orientation];
    assert_eq!(ct.flags & ct_flags::INGRESS_OK, 0, "the drop revokes the flow at this hook");
    assert_eq!(ct.policy_gen[direction::INGRESS as usize], 0, "and forgets the remembered verdict");

    // Back to the allowed identity (and a new generation): the flow is allowed again.
    fx.ipcache(PEER, 32, PEER_ID);
    fx.maps.bump_policy_generation().unwrap();
    assert_passed(fx.run(Hook::ToPod, &tcp4(PEER, POD, 40000, 80, TCP_ACK)), "allowed again");
}

#[test]
fn icmp_verdicts_are_not_remembered_across_types() {
    // An echo request with identifier 0 and a timestamp request share a conntrack key (ICMP,
    // no ports): a remembered "echo allowed" must not let the timestamp request through.
    let mut fx = Fixture::new();
    fx.endpoint(LO, endpoint_flags::INGRESS_ENFORCED);
    fx.ipcache(PEER, 32, PEER_ID);
    fx.rule(direction::INGRESS, PEER_ID, proto::ICMP, 8, POLICY_PREFIX_FULL, false, 7);
    let echo = ipv4(PEER, POD, proto::ICMP, &icmp(8, 0, 0));
    assert_passed(fx.run(Hook::ToPod, &echo), "echo request");
    assert_passed(fx.run(Hook::ToPod, &echo), "echo request again");
    let timestamp = ipv4(PEER, POD, proto::ICMP, &icmp(13, 0, 0));
    assert_dropped(fx.run(Hook::ToPod, &timestamp), "timestamp request on the echo's conntrack key");
}

#[test]
fn icmp_echo_reply_matches_its_request() {
    let mut fx = Fixture::new();
    fx.endpoint(LO, endpoint_flags::INGRESS_ENFORCED | endpoint_flags::EGRESS_ENFORCED);
    fx.ipcache(PEER, 32, PEER_ID);
    fx.allow_events();
    // Echo requests (type 8) to PEER may leave.
    fx.rule(direction::EGRESS, PEER_ID, proto::ICMP, 8, POLICY_PREFIX_FULL, false, 9);

    assert_passed(fx.run(Hook::FromPod, &ipv4(POD, PEER, proto::ICMP, &icmp(8, 0, 77))), "echo request");
    let ev = fx.events()[0];
    assert_eq!((ev.protocol, ev.dport, ev.sport, ev.match_kind), (proto::ICMP, 8, 0, match_kind::L3_L4));
    assert_passed(fx.run(Hook::ToPod, &ipv4(PEER, POD, proto::ICMP, &icmp(0, 0, 77))), "echo reply");
    assert_eq!(fx.packets(reason::ALLOWED_REPLY, direction::INGRESS), 1);
    assert_dropped(fx.run(Hook::ToPod, &ipv4(PEER, POD, proto::ICMP, &icmp(0, 0, 78))), "reply to another id");
    assert_dropped(fx.run(Hook::ToPod, &ipv4(PEER, POD, proto::ICMP, &icmp(8, 0, 77))), "an echo request is no reply");
    assert_dropped(fx.run(Hook::FromPod, &ipv4(POD, PEER, proto::ICMP, &icmp(13, 0, 0))), "timestamp not allowed");
}

#[test]
fn icmp_error_of_allowed_flow_is_related() {
    let mut fx = Fixture::new();
    fx.endpoint(LO, endpoint_flags::INGRESS_ENFORCED | endpoint_flags::EGRESS_ENFORCED);
    fx.ipcache(PEER, 32, PEER_ID);
    fx.rule(direction::EGRESS, PEER_ID, proto::UDP, 9999, POLICY_PREFIX_FULL, false, 3);
    let sent = ipv4(POD, PEER, proto::UDP, &udp(5555, 9999));
    assert_passed(fx.run(Hook::FromPod, &sent), "udp request");

    // Port unreachable from PEER, quoting the request.
    let mut quote = ipv4_header(POD, PEER, proto::UDP, 12, 0);
    quote.extend_from_slice(&udp(5555, 9999)[..8]);
    let mut err = icmp(3, 3, 0);
    err.extend_from_slice(&quote);
    assert_passed(fx.run(Hook::ToPod, &ipv4(PEER, POD, proto::ICMP, &err)), "port unreachable");
    assert_eq!(fx.packets(reason::ALLOWED_REPLY, direction::INGRESS), 1);

    // An error quoting a flow that never was is policy's business: denied.
    let mut quote = ipv4_header(POD, PEER, proto::UDP, 12, 0);
    quote.extend_from_slice(&udp(5555, 1234)[..8]);
    let mut err = icmp(3, 3, 0);
    err.extend_from_slice(&quote);
    assert_dropped(fx.run(Hook::ToPod, &ipv4(PEER, POD, proto::ICMP, &err)), "unrelated error");
}

#[test]
fn malformed_headers_drop_enforced_or_not() {
    let mut fx = Fixture::new();
    fx.endpoint(LO, endpoint_flags::INGRESS_ENFORCED);
    let truncated = {
        let mut f = tcp4(PEER, POD, 1, 80, TCP_SYN);
        f.truncate(14 + 20 + 6);
        f
    };
    assert_dropped(fx.run(Hook::ToPod, &truncated), "truncated tcp, enforced");
    assert_eq!(fx.packets(reason::DROP_MALFORMED, direction::INGRESS), 1);
    let ev = fx.events()[0];
    assert_eq!((ev.reason, ev.verdict), (reason::DROP_MALFORMED, verdict::DROP));
    // A parse the program cannot complete is a drop also where no policy is enforced:
    // anti-spoofing and the fragment records depend on it.
    assert_dropped(fx.run(Hook::FromPod, &truncated), "truncated tcp, not enforced");
    assert_eq!(fx.packets(reason::DROP_MALFORMED, direction::EGRESS), 1);

    let mut bad_version = tcp4(PEER, POD, 1, 80, TCP_SYN);
    bad_version[14] = 0x55;
    assert_dropped(fx.run(Hook::ToPod, &bad_version), "ip version 5");
}

#[test]
fn non_ip_passes_and_is_counted() {
    let mut fx = Fixture::new();
    fx.endpoint(LO, endpoint_flags::INGRESS_ENFORCED | endpoint_flags::EGRESS_ENFORCED);
    let arp = ethernet(0x0806, &[0u8; 28]);
    assert_passed(fx.run(Hook::ToPod, &arp), "arp");
    assert_eq!(fx.packets(reason::ALLOWED_ALWAYS, direction::INGRESS), 1);
    assert!(fx.events().is_empty());
}

#[test]
fn ipv6_policy_and_neighbour_discovery() {
    let mut fx = Fixture::new();
    fx.endpoint(LO, endpoint_flags::INGRESS_ENFORCED | endpoint_flags::EGRESS_ENFORCED | endpoint_flags::HAS_IPV6);
    fx.ipcache6(PEER6, PEER_ID);
    fx.allow_events();
    fx.rule(direction::INGRESS, PEER_ID, proto::TCP, 443, POLICY_PREFIX_FULL, false, 21);

    assert_passed(fx.run(Hook::ToPod, &ipv6(PEER6, POD6, proto::TCP, &tcp(1000, 443, TCP_SYN))), "v6 allowed");
    assert_dropped(fx.run(Hook::ToPod, &ipv6(PEER6, POD6, proto::TCP, &tcp(1000, 444, TCP_SYN))), "v6 other port");
    assert_passed(
        fx.run(Hook::FromPod, &ipv6(POD6, PEER6, proto::TCP, &tcp(443, 1000, TCP_SYN | TCP_ACK))),
        "v6 reply",
    );
    let world = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    assert_dropped(fx.run(Hook::ToPod, &ipv6(world, POD6, proto::UDP, &udp(1, 2))), "v6 world");

    // Neighbour solicitation between link-local addresses (hop limit 255) passes whatever
    // the policy.
    let link_local = [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9];
    let gateway = [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    let nd = |src, dst| {
        let mut f = ipv6(src, dst, proto::ICMPV6, &[135, 0, 0, 0, 0, 0, 0, 0]);
        f[14 + 7] = 255;
        f
    };
    assert_passed(fx.run(Hook::FromPod, &nd(link_local, gateway)), "neighbour solicitation out");
    assert_passed(fx.run(Hook::ToPod, &nd(link_local, POD6)), "neighbour solicitation in");
    assert_eq!(fx.packets(reason::ALLOWED_ALWAYS, direction::INGRESS), 1);

    // A hop-by-hop extension header is walked to find TCP.
    let mut hbh = vec![proto::TCP, 0, 1, 4, 0, 0, 0, 0];
    hbh.extend_from_slice(&tcp(1000, 443, TCP_SYN));
    assert_passed(fx.run(Hook::ToPod, &ipv6(PEER6, POD6, 0, &hbh)), "v6 allowed behind hop-by-hop");

    // Fragments: the first one (offset 0, more fragments) carries TCP; later ones are
    // matched through it, and unknown ones are dropped.
    let frag = |id: u8, offset_and_m: u16, payload: &[u8]| {
        let mut f = vec![proto::TCP, 0];
        f.extend_from_slice(&offset_and_m.to_be_bytes());
        f.extend_from_slice(&[0, 0, 0, id]);
        f.extend_from_slice(payload);
        ipv6(PEER6, POD6, 44, &f)
    };
    assert_passed(fx.run(Hook::ToPod, &frag(9, 0x0001, &tcp(1001, 443, TCP_SYN))), "v6 first fragment");
    assert_passed(fx.run(Hook::ToPod, &frag(9, 3 << 3, &[0u8; 16])), "v6 later fragment");
    assert_dropped(fx.run(Hook::ToPod, &frag(10, 3 << 3, &[0u8; 16])), "v6 unknown later fragment");

    let evs = fx.events();
    assert_eq!(evs.last().unwrap().reason, reason::DROP_FRAGMENT_UNKNOWN);
    assert_eq!(evs[0].family, family::IPV6);
    assert_eq!((evs[0].saddr, evs[0].daddr, evs[0].dport), (PEER6, POD6, 443));
    assert_eq!(evs[1].reason, reason::DROP_POLICY_DENIED);
    assert_eq!((evs[2].peer_identity, evs[2].reason), (identity::WORLD_IPV6, reason::DROP_POLICY_DENIED));
}

#[test]
fn sctp_ports_are_matched() {
    let mut fx = Fixture::new();
    fx.endpoint(LO, endpoint_flags::INGRESS_ENFORCED);
    fx.ipcache(PEER, 32, PEER_ID);
    fx.rule(direction::INGRESS, PEER_ID, proto::SCTP, 3868, POLICY_PREFIX_FULL, false, 1);
    let sctp = |dport: u16| {
        let mut s = 5000u16.to_be_bytes().to_vec();
        s.extend_from_slice(&dport.to_be_bytes());
        s.extend_from_slice(&[0u8; 8]);
        ipv4(PEER, POD, proto::SCTP, &s)
    };
    assert_passed(fx.run(Hook::ToPod, &sctp(3868)), "sctp 3868");
    assert_dropped(fx.run(Hook::ToPod, &sctp(3869)), "sctp 3869");
}

#[test]
fn spoofed_source_is_dropped() {
    let mut fx = Fixture::new();
    fx.endpoint(LO, endpoint_flags::HAS_IPV4);
    assert_passed(fx.run(Hook::FromPod, &tcp4(POD, PEER, 1, 2, TCP_SYN)), "own address");
    assert_dropped(fx.run(Hook::FromPod, &tcp4(OTHER, PEER, 1, 2, TCP_SYN)), "someone else's address");
    assert_eq!(fx.events()[0].reason, reason::DROP_SPOOFED_SOURCE);
    assert_passed(fx.run(Hook::ToPod, &tcp4(OTHER, PEER, 1, 2, TCP_SYN)), "only checked on what the pod sends");
}

#[test]
fn later_fragments_follow_their_first_fragment() {
    let mut fx = Fixture::new();
    fx.endpoint(LO, endpoint_flags::INGRESS_ENFORCED);
    fx.ipcache(PEER, 32, PEER_ID);
    fx.rule(direction::INGRESS, PEER_ID, proto::UDP, 5353, POLICY_PREFIX_FULL, false, 1);
    // frag field: 0x2000 = more fragments, low 13 bits = offset in 8-byte units.
    let fragment = |id: u8, frag: u16, payload: &[u8]| {
        let mut p = ipv4_header(PEER, POD, proto::UDP, payload.len(), frag);
        p[5] = id;
        p.extend_from_slice(payload);
        ethernet(0x0800, &p)
    };
    let mut first_allowed = udp(1000, 5353);
    first_allowed.extend_from_slice(&[0u8; 8]);
    let mut first_denied = udp(1000, 5354);
    first_denied.extend_from_slice(&[0u8; 8]);

    // A later fragment whose first fragment was not seen.
    assert_dropped(fx.run(Hook::ToPod, &fragment(1, 2, &[0u8; 16])), "unknown later fragment, enforced");
    assert_eq!(fx.events()[0].reason, reason::DROP_FRAGMENT_UNKNOWN);
    assert_passed(fx.run(Hook::FromPod, &fragment(1, 2, &[0u8; 16])), "unknown later fragment, not enforced");

    // Datagram 2 goes to an allowed port: all its fragments pass.
    assert_passed(fx.run(Hook::ToPod, &fragment(2, 0x2000, &first_allowed)), "first fragment, allowed port");
    assert_passed(fx.run(Hook::ToPod, &fragment(2, 0x2000 | 2, &[0u8; 16])), "middle fragment");
    assert_passed(fx.run(Hook::ToPod, &fragment(2, 4, &[0u8; 16])), "last fragment");
    // Datagram 3 goes to a denied port: its later fragments are denied by policy too.
    assert_dropped(fx.run(Hook::ToPod, &fragment(3, 0x2000, &first_denied)), "first fragment, denied port");
    assert_dropped(fx.run(Hook::ToPod, &fragment(3, 2, &[0u8; 16])), "later fragment, denied port");
    let evs = fx.events();
    let last = evs.last().unwrap();
    assert_eq!(
        (last.reason, last.dport, last.sport),
        (reason::DROP_POLICY_DENIED, 5354, 1000),
        "ports from the first fragment"
    );
}

#[test]
fn events_arrive_through_the_async_reader() {
    let mut fx = Fixture::new();
    fx.endpoint(LO, endpoint_flags::INGRESS_ENFORCED);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        assert_dropped(fx.run(Hook::ToPod, &tcp4(PEER, POD, 1, 22, TCP_SYN)), "drop");
        assert_dropped(fx.run(Hook::ToPod, &tcp4(PEER, POD, 1, 23, TCP_SYN)), "drop");
        let mut batch = Vec::new();
        tokio::time::timeout(std::time::Duration::from_secs(5), fx.events.next_batch(&mut batch))
            .await
            .expect("events within 5 s")
            .unwrap();
        assert_eq!(batch.iter().map(|e| e.dport).collect::<Vec<_>>(), vec![22, 23]);
        // Nothing more: next_batch waits; an event sent later wakes it.
        let mut later = Vec::new();
        let pending =
            tokio::time::timeout(std::time::Duration::from_millis(50), fx.events.next_batch(&mut later)).await;
        assert!(pending.is_err(), "no event yet");
        assert_dropped(fx.run(Hook::ToPod, &tcp4(PEER, POD, 1, 24, TCP_SYN)), "drop");
        tokio::time::timeout(std::time::Duration::from_secs(5), fx.events.next_batch(&mut later))
            .await
            .expect("event within 5 s")
            .unwrap();
        assert_eq!(later.iter().map(|e| e.dport).collect::<Vec<_>>(), vec![24]);
    });
}

#[test]
fn measures_per_packet_cost() {
    let mut fx = Fixture::new();
    fx.endpoint(LO, endpoint_flags::INGRESS_ENFORCED);
    fx.ipcache(PEER, 32, PEER_ID);
    fx.rule(direction::INGRESS, PEER_ID, proto::TCP, 80, POLICY_PREFIX_FULL, false, 7);
    let frame = tcp4(PEER, POD, 40000, 80, TCP_ACK);
    let r = fx.dp.test_run_repeat(Hook::ToPod, &frame, 100_000).unwrap();
    assert!(r.passed());
    eprintln!("allowed TCP packet: {:?} per run (kernel average over 100k)", r.duration);
}

// ---------------------------------------------------------------------------------------
// Loading and pinning

#[test]
fn restart_reuses_pinned_maps() {
    let pins = PinDir::new("test");
    {
        let mut dp = Datapath::load(&pins.config()).unwrap();
        let mut maps = dp.take_maps().unwrap();
        maps.endpoints.insert(7, EndpointInfo { endpoint_id: 3, ..Default::default() }, 0).unwrap();
    }
    for spec in [map_names::ENDPOINTS, map_names::POLICY, map_names::EVENTS, map_names::CONNTRACK] {
        assert!(pins.0.join(spec).exists(), "{spec} stays pinned after the datapath is dropped");
    }
    let mut dp = Datapath::load(&pins.config()).unwrap();
    let maps = dp.take_maps().unwrap();
    assert_eq!(maps.endpoints.get(&7, 0).unwrap().endpoint_id, 3, "the second load adopted the map");
}

#[test]
fn incompatible_pinned_map_is_refused() {
    let pins = PinDir::new("test");
    std::fs::create_dir_all(&pins.0).unwrap();
    // An object whose POLICY map is smaller than this build's, pinned where the agent looks.
    let ebpf = aya::EbpfLoader::new()
        .default_map_pin_directory(&pins.0)
        .map_max_entries(map_names::POLICY, 16)
        .load(palisade_agent::datapath::EBPF_OBJECT)
        .unwrap();
    drop(ebpf);
    // Same layout, another size: refused with both sizes (a pinned map cannot be resized).
    match Datapath::load(&pins.config()) {
        Err(DatapathError::PinnedMapSize { map, pinned, configured, .. }) => {
            assert_eq!((map, pinned, configured), (map_names::POLICY, 16, palisade_common::map_sizes::POLICY));
        }
        other => panic!("expected PinnedMapSize, got {other:?}"),
    }
}

#[test]
fn pin_dir_outside_bpffs_is_refused() {
    let dir = std::env::temp_dir().join(format!("palisade-not-bpffs-{}", std::process::id()));
    let err = Datapath::load(&DatapathConfig { pin_dir: dir.clone() }).unwrap_err();
    assert!(matches!(err, DatapathError::NotBpffs { .. }), "{err}");
    assert!(err.to_string().contains("mount -t bpf"), "{err}");
    let _ = std::fs::remove_dir(&dir);
}

// ---------------------------------------------------------------------------------------
// Attaching, in a throwaway network namespace

/// Runs `f` on a thread in a new network namespace of its own, which the kernel deletes
/// with everything in it when the thread ends (also when `f` panics).
fn in_throwaway_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let handle = std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
        f()
    });
    match handle.join() {
        Ok(v) => v,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Runs `ip` in the calling thread's network namespace.
fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

fn veth_pair(host: &str, pod: &str) -> u32 {
    ip(&["link", "add", host, "type", "veth", "peer", "name", pod]);
    ip(&["link", "set", host, "up"]);
    ip(&["link", "set", pod, "up"]);
    palisade_agent::datapath::ifindex(host).expect("veth exists")
}

fn tcx_program_ids(ifname: &str) -> (Vec<u32>, Vec<u32>) {
    use aya::programs::{SchedClassifier, TcAttachType};
    let ids = |t| {
        SchedClassifier::query_tcx(ifname, t)
            .expect("query tcx")
            .1
            .iter()
            .map(aya::programs::ProgramInfo::id)
            .collect::<Vec<_>>()
    };
    (ids(TcAttachType::Ingress), ids(TcAttachType::Egress))
}

fn tc_filters(ifname: &str, side: &str) -> String {
    let out = Command::new("tc").args(["filter", "show", "dev", ifname, side]).output().expect("run tc");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn tcx_attach_is_idempotent_survives_restart_and_detaches() {
    in_throwaway_netns(|| {
        let pins = PinDir::new("test");
        let ifindex = veth_pair("pal-h0", "pal-p0");

        let mut dp = Datapath::load(&pins.config()).unwrap();
        assert_eq!(dp.attach_mode(), AttachMode::Tcx);
        assert_eq!(dp.attach_mode().to_string(), "tcx");
        assert_eq!(dp.attach("pal-h0").unwrap(), ifindex);
        let from = dp.program_id(Hook::FromPod).unwrap();
        let to = dp.program_id(Hook::ToPod).unwrap();
        assert_eq!(tcx_program_ids("pal-h0"), (vec![from], vec![to]));
        let links = pins.0.join("links/pal-h0");
        assert!(links.join("palisade_from_pod").exists() && links.join("palisade_to_pod").exists());
        assert_eq!(dp.pinned_interfaces(), vec!["pal-h0".to_string()]);

        // Again: still one program per side.
        dp.attach("pal-h0").unwrap();
        assert_eq!(tcx_program_ids("pal-h0"), (vec![from], vec![to]));

        // The programs see the veth's ifindex when the test run says so.
        let mut maps = dp.take_maps().unwrap();
        let ep = EndpointInfo { endpoint_id: 5, flags: endpoint_flags::INGRESS_ENFORCED, ..Default::default() };
        maps.endpoints.insert(ifindex, ep, 0).unwrap();
        // Loopback: an endpoint enforcing nothing (an interface without a record would be
        // dropped as well: the datapath fails closed).
        maps.endpoints.insert(LO, EndpointInfo { endpoint_id: 6, ..Default::default() }, 0).unwrap();
        let frame = tcp4(PEER, POD, 1, 80, TCP_SYN);
        assert_dropped(dp.test_run(Hook::ToPod, &frame, Some(ifindex)).unwrap(), "endpoint at the veth's ifindex");
        assert_passed(dp.test_run(Hook::ToPod, &frame, None).unwrap(), "loopback is another endpoint");
        drop(maps);

        // The agent exits: the links stay, with the old programs.
        drop(dp);
        assert_eq!(tcx_program_ids("pal-h0"), (vec![from], vec![to]));

        // A new agent adopts the links and swaps its programs in.
        let mut dp = Datapath::load(&pins.config()).unwrap();
        dp.attach("pal-h0").unwrap();
        let (from2, to2) = (dp.program_id(Hook::FromPod).unwrap(), dp.program_id(Hook::ToPod).unwrap());
        assert_ne!(from2, from);
        assert_eq!(tcx_program_ids("pal-h0"), (vec![from2], vec![to2]));

        dp.detach("pal-h0").unwrap();
        assert_eq!(tcx_program_ids("pal-h0"), (vec![], vec![]));
        assert!(!links.exists(), "link pins removed");
        dp.detach("pal-h0").unwrap();

        // Interface gone: detach is fine, stale pins are pruned.
        dp.attach("pal-h0").unwrap();
        ip(&["link", "del", "pal-h0"]);
        assert_eq!(dp.prune_stale_links().unwrap(), vec!["pal-h0".to_string()]);
        dp.detach("pal-h0").unwrap();
        assert!(matches!(dp.attach("pal-h0"), Err(DatapathError::InterfaceNotFound { .. })));
    });
}

#[test]
fn clsact_attach_replaces_in_place_and_detaches() {
    in_throwaway_netns(|| {
        let pins = PinDir::new("test");
        veth_pair("pal-h1", "pal-p1");
        let mut dp = Datapath::load(&pins.config()).unwrap();
        dp.set_attach_mode(AttachMode::Clsact);
        assert_eq!(dp.attach_mode().to_string(), "clsact");
        dp.attach("pal-h1").unwrap();
        dp.attach("pal-h1").unwrap();
        let ingress = tc_filters("pal-h1", "ingress");
        let egress = tc_filters("pal-h1", "egress");
        assert_eq!(ingress.matches("handle 0x5a1 palisade_from_pod").count(), 1, "{ingress}");
        assert_eq!(egress.matches("handle 0x5a1 palisade_to_pod").count(), 1, "{egress}");
        assert!(!pins.0.join("links/pal-h1").exists(), "clsact has no link pins");

        // A later agent replaces the filters' programs.
        drop(dp);
        let mut dp = Datapath::load(&pins.config()).unwrap();
        dp.set_attach_mode(AttachMode::Clsact);
        dp.attach("pal-h1").unwrap();
        let ingress = tc_filters("pal-h1", "ingress");
        assert_eq!(ingress.matches("handle 0x5a1 palisade_from_pod").count(), 1, "{ingress}");
        let id = dp.program_id(Hook::FromPod).unwrap();
        assert!(ingress.contains(&format!("id {id} ")), "new program in the filter: {ingress}");

        // Switching to tcx removes the clsact filters.
        dp.set_attach_mode(AttachMode::Tcx);
        dp.attach("pal-h1").unwrap();
        assert!(!tc_filters("pal-h1", "ingress").contains("palisade"));
        dp.set_attach_mode(AttachMode::Clsact);
        dp.attach("pal-h1").unwrap();
        assert_eq!(tcx_program_ids("pal-h1"), (vec![], vec![]), "and back: tcx links removed");

        dp.detach("pal-h1").unwrap();
        assert!(!tc_filters("pal-h1", "ingress").contains("palisade"));
        assert!(!tc_filters("pal-h1", "egress").contains("palisade"));
    });
}

#[test]
fn uninstall_removes_pins_and_links() {
    in_throwaway_netns(|| {
        let pins = PinDir::new("test");
        veth_pair("pal-h2", "pal-p2");
        veth_pair("pal-h3", "pal-p3");
        let mut dp = Datapath::load(&pins.config()).unwrap();
        dp.attach("pal-h2").unwrap();
        dp.set_attach_mode(AttachMode::Clsact);
        dp.attach("pal-h3").unwrap();
        drop(dp);
        Datapath::uninstall(&pins.0).unwrap();
        assert!(!pins.0.exists());
        assert_eq!(tcx_program_ids("pal-h2"), (vec![], vec![]));
        assert!(!tc_filters("pal-h3", "ingress").contains("palisade"));
        assert!(!tc_filters("pal-h3", "egress").contains("palisade"));
        Datapath::uninstall(&pins.0).unwrap();
    });
}

// ---------------------------------------------------------------------------------------
// Audit mode

/// An enforced endpoint with an audit view: what the enforced entries allow and the audit
/// view denies (a deny rule or its default deny) passes with an AUDIT event carrying the
/// audit view's reason and cookie; what both allow passes without one; what the enforced
/// entries deny is dropped whatever the audit view says. Counters count the enforced
/// verdicts; a flow's later packets add nothing.
#[test]
fn audit_view_reports_would_be_drops_and_never_changes_the_verdict() {
    let mut fx = Fixture::new();
    fx.endpoint(LO, endpoint_flags::INGRESS_ENFORCED | endpoint_flags::INGRESS_AUDIT);
    fx.ipcache(PEER, 32, PEER_ID);
    fx.ipcache(OTHER, 32, OTHER_ID);
    // Enforced: PEER on 80 and 81.
    fx.rule(direction::INGRESS, PEER_ID, proto::TCP, 80, POLICY_PREFIX_FULL, false, 7);
    fx.rule(direction::INGRESS, PEER_ID, proto::TCP, 81, POLICY_PREFIX_FULL, false, 7);
    // Audit view: PEER on 80 allowed, 81 denied by a rule; default deny for the rest.
    fx.audit_rule(direction::INGRESS, PEER_ID, proto::TCP, 80, POLICY_PREFIX_FULL, false, 7);
    fx.audit_rule(direction::INGRESS, PEER_ID, proto::TCP, 81, POLICY_PREFIX_FULL, true, 9);

    assert_passed(fx.run(Hook::ToPod, &tcp4(PEER, POD, 40000, 80, TCP_SYN)), "both allow");
    assert!(fx.events().is_empty(), "no audit hit, allow events off: {:?}", fx.events());

    assert_passed(fx.run(Hook::ToPod, &tcp4(PEER, POD, 40001, 81, TCP_SYN)), "the audited deny rule only reports");
    let evs = fx.events();
    assert_eq!(evs.len(), 1, "{evs:?}");
    let ev = evs[0];
    assert_eq!(
        (ev.verdict, ev.reason, ev.match_kind, ev.cookie, ev.peer_identity),
        (verdict::AUDIT, reason::DROP_POLICY_DENY_RULE, match_kind::L3_L4, 9, PEER_ID)
    );
    assert_eq!(fx.packets(reason::ALLOWED_BY_POLICY, direction::INGRESS), 2, "counted as enforced: allowed");
    assert_eq!(fx.packets(reason::DROP_POLICY_DENY_RULE, direction::INGRESS), 0);
    // The flow's next packet: the established path, no second lookup, no event.
    assert_passed(fx.run(Hook::ToPod, &tcp4(PEER, POD, 40001, 81, TCP_ACK)), "established");
    assert!(fx.events().is_empty(), "one audit report per flow");

    // Enforced default deny: dropped, reported as a drop, the audit view is not consulted.
    assert_dropped(fx.run(Hook::ToPod, &tcp4(OTHER, POD, 40002, 80, TCP_SYN)), "enforced deny stays");
    let ev = fx.events()[0];
    assert_eq!((ev.verdict, ev.reason), (verdict::DROP, reason::DROP_POLICY_DENIED));
}

/// An endpoint in audit mode (nothing enforced, the audit view holds its policy): its
/// would-be default deny passes with an AUDIT event; a spoofed source is still dropped.
#[test]
fn endpoint_audit_mode_passes_policy_drops_but_not_spoofing() {
    let mut fx = Fixture::new();
    fx.endpoint(LO, endpoint_flags::HAS_IPV4 | endpoint_flags::INGRESS_AUDIT | endpoint_flags::EGRESS_AUDIT);
    fx.ipcache(PEER, 32, PEER_ID);
    fx.audit_rule(direction::INGRESS, PEER_ID, proto::TCP, 80, POLICY_PREFIX_FULL, false, 7);
    // Egress audit view: enforced with no entry at all (default deny).
    fx.audit_rule(direction::EGRESS, OTHER_ID, proto::UDP, 53, POLICY_PREFIX_FULL, false, 8);

    assert_passed(fx.run(Hook::ToPod, &tcp4(PEER, POD, 40000, 80, TCP_SYN)), "allowed in the audit view");
    assert!(fx.events().is_empty());
    assert_passed(fx.run(Hook::ToPod, &tcp4(PEER, POD, 40000, 22, TCP_SYN)), "would-be default deny");
    let ev = fx.events()[0];
    assert_eq!((ev.verdict, ev.reason, ev.cookie), (verdict::AUDIT, reason::DROP_POLICY_DENIED, 0));
    assert_eq!(fx.packets(reason::ALLOWED_NOT_ENFORCED, direction::INGRESS), 2);
    assert_passed(fx.run(Hook::FromPod, &tcp4(POD, INTERNET, 5000, 443, TCP_SYN)), "egress would-be deny");
    let ev = fx.events()[0];
    assert_eq!(
        (ev.verdict, ev.reason, ev.direction, ev.peer_identity),
        (verdict::AUDIT, reason::DROP_POLICY_DENIED, direction::EGRESS, identity::WORLD_IPV4)
    );
    // Not policy's to pass: a source that is not the pod's own.
    assert_dropped(fx.run(Hook::FromPod, &tcp4(OTHER, INTERNET, 5000, 443, TCP_SYN)), "spoofed");
    let ev = fx.events()[0];
    assert_eq!((ev.verdict, ev.reason), (verdict::DROP, reason::DROP_SPOOFED_SOURCE));
}
