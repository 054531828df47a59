//! Frame builders and a datapath fixture for the attack suite and the model test
//! (included with `#[path]` by the tests that use it).
#![allow(dead_code, reason = "each test binary uses a part of the builders")]

use aya::maps::lpm_trie::Key;
use palisade_agent::datapath::{Datapath, EventReader, Hook, MapSet, TestRunOutcome};
use palisade_common::{
    EndpointInfo, IpcacheValue, Ipv4Prefix, Ipv6Prefix, POLICY_PREFIX_FULL, POLICY_PREFIX_PROTO, PolicyKey,
    PolicyValue, VerdictEvent, direction, endpoint_flags, policy_flags,
};

use crate::common::PinDir;

// The address plan of the fixture's node (the attack suite and the model test share it).

pub const EP_ID: u16 = 10;
pub const POD: [u8; 4] = [10, 0, 0, 2];
pub const PEER: [u8; 4] = [10, 0, 0, 1];
pub const PEER_ID: u32 = 300;
/// Another pod of this node, on interface `OTHER_IF`.
pub const OTHER: [u8; 4] = [10, 0, 0, 3];
pub const OTHER_ID: u32 = 301;
pub const OTHER_IF: u32 = 4242;
/// An interface of the node that is no pod's (the uplink).
pub const UPLINK_IF: u32 = 77;
pub const NODE: [u8; 4] = [10, 0, 0, 254];
pub const WORLD: [u8; 4] = [203, 0, 113, 7];
pub const POD6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
pub const PEER6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
pub const OTHER6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3];
pub const NODE6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xfe];
pub const WORLD6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7];
pub const LINK_LOCAL: [u8; 16] = [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
pub const GATEWAY_LL: [u8; 16] = [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
pub const ALL_NODES: [u8; 16] = [0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

pub const ETH_IPV4: u16 = 0x0800;
pub const ETH_IPV6: u16 = 0x86dd;
pub const ETH_ARP: u16 = 0x0806;
pub const TPID_8021Q: u16 = 0x8100;
pub const TPID_8021AD: u16 = 0x88a8;
pub const TPID_QINQ: u16 = 0x9100;

pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const ACK: u8 = 0x10;

pub const NEXTHDR_HOP: u8 = 0;
pub const NEXTHDR_ROUTING: u8 = 43;
pub const NEXTHDR_FRAGMENT: u8 = 44;
pub const NEXTHDR_AUTH: u8 = 51;
pub const NEXTHDR_DEST: u8 = 60;

/// An Ethernet frame; `tags` are (TPID, TCI) pairs written in the data, outermost first.
pub fn ethernet_tagged(tags: &[(u16, u16)], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01];
    for (tpid, tci) in tags {
        f.extend_from_slice(&tpid.to_be_bytes());
        f.extend_from_slice(&tci.to_be_bytes());
    }
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

pub fn ethernet(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    ethernet_tagged(&[], ethertype, payload)
}

/// An IPv4 packet (no Ethernet header): `frag` is the 16-bit flags+offset field.
pub fn ipv4_packet(src: [u8; 4], dst: [u8; 4], protocol: u8, options: &[u8], frag: u16, id: u16, l4: &[u8]) -> Vec<u8> {
    let ihl = 5 + options.len() / 4;
    let total = (ihl * 4 + l4.len()) as u16;
    let mut h = vec![0x40 | ihl as u8, 0];
    h.extend_from_slice(&total.to_be_bytes());
    h.extend_from_slice(&id.to_be_bytes());
    h.extend_from_slice(&frag.to_be_bytes());
    h.extend_from_slice(&[64, protocol, 0, 0]);
    h.extend_from_slice(&src);
    h.extend_from_slice(&dst);
    h.extend_from_slice(options);
    h.extend_from_slice(l4);
    h
}

pub fn ipv4_full(src: [u8; 4], dst: [u8; 4], protocol: u8, options: &[u8], frag: u16, id: u16, l4: &[u8]) -> Vec<u8> {
    ethernet(ETH_IPV4, &ipv4_packet(src, dst, protocol, options, frag, id, l4))
}

pub fn ipv4(src: [u8; 4], dst: [u8; 4], protocol: u8, l4: &[u8]) -> Vec<u8> {
    ipv4_full(src, dst, protocol, &[], 0, 0x1234, l4)
}

/// An IPv6 packet (no Ethernet header) with hop limit `hl`.
pub fn ipv6_packet(hl: u8, src: [u8; 16], dst: [u8; 16], next: u8, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0x60, 0, 0, 0];
    p.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    p.extend_from_slice(&[next, hl]);
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    p.extend_from_slice(payload);
    p
}

pub fn ipv6_hl(hl: u8, src: [u8; 16], dst: [u8; 16], next: u8, payload: &[u8]) -> Vec<u8> {
    ethernet(ETH_IPV6, &ipv6_packet(hl, src, dst, next, payload))
}

pub fn ipv6(src: [u8; 16], dst: [u8; 16], next: u8, payload: &[u8]) -> Vec<u8> {
    ipv6_hl(64, src, dst, next, payload)
}

/// An 8-byte IPv6 extension header (hop-by-hop, routing, destination options) naming `next`.
pub fn ext(next: u8, rest: &[u8]) -> Vec<u8> {
    let mut e = vec![next, 0, 1, 4, 0, 0, 0, 0];
    e.extend_from_slice(rest);
    e
}

/// An IPv6 fragment header: `offset` in 8-byte units, `more` fragments flag.
pub fn frag6(next: u8, offset: u16, more: bool, id: u32, rest: &[u8]) -> Vec<u8> {
    let mut f = vec![next, 0];
    f.extend_from_slice(&((offset << 3) | u16::from(more)).to_be_bytes());
    f.extend_from_slice(&id.to_be_bytes());
    f.extend_from_slice(rest);
    f
}

pub fn tcp(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut t = Vec::new();
    t.extend_from_slice(&sport.to_be_bytes());
    t.extend_from_slice(&dport.to_be_bytes());
    t.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    t
}

pub fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut u = Vec::new();
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    u
}

pub fn icmp(ty: u8, code: u8, id: u16) -> Vec<u8> {
    let mut i = vec![ty, code, 0, 0];
    i.extend_from_slice(&id.to_be_bytes());
    i.extend_from_slice(&[0, 1]);
    i
}

/// An ICMP (v4) error of type `ty` quoting the first 28 bytes of the IP packet in `frame`.
pub fn icmp_error_quoting(ty: u8, code: u8, frame: &[u8]) -> Vec<u8> {
    let mut e = icmp(ty, code, 0);
    e.extend_from_slice(&frame[14..14 + 28]);
    e
}

/// An ICMPv6 error quoting the first 48 bytes of the IPv6 packet in `frame`.
pub fn icmp6_error_quoting(ty: u8, code: u8, frame: &[u8]) -> Vec<u8> {
    let mut e = icmp(ty, code, 0);
    e.extend_from_slice(&frame[14..14 + 48]);
    e
}

pub fn v4(a: [u8; 4]) -> [u8; 16] {
    let mut x = [0u8; 16];
    x[..4].copy_from_slice(&a);
    x
}

// ---------------------------------------------------------------------------------------
// Fixture

/// The endpoint most cases run on: enforced both ways (default deny), dual-stack, at
/// `POD`/`POD6` with identity 1000.
pub fn enforced_pod() -> EndpointInfo {
    EndpointInfo {
        endpoint_id: EP_ID.into(),
        identity: 1000,
        flags: endpoint_flags::INGRESS_ENFORCED
            | endpoint_flags::EGRESS_ENFORCED
            | endpoint_flags::HAS_IPV4
            | endpoint_flags::HAS_IPV6,
        ipv4: POD,
        ipv6: POD6,
    }
}

/// What one packet did.
#[derive(Debug)]
pub struct Observed {
    pub out: TestRunOutcome,
    /// The (reason, direction) counter slots that moved.
    pub moved: Vec<(u8, u8)>,
    /// The verdict events it sent.
    pub events: Vec<VerdictEvent>,
}

impl Observed {
    /// The single reason counted for the packet.
    pub fn reason(&self) -> u8 {
        assert_eq!(self.moved.len(), 1, "exactly one counter moves per packet: {:?}", self.moved);
        self.moved[0].0
    }
}

/// A loaded datapath in a private pin directory.
pub struct Fixture {
    pub dp: Datapath,
    pub maps: MapSet,
    pub events: EventReader,
    pub _pins: PinDir,
}

pub const LO: u32 = 1;

impl Fixture {
    pub fn new(tag: &str) -> Fixture {
        let pins = PinDir::new(tag);
        let mut dp = Datapath::load(&pins.config()).unwrap_or_else(|e| panic!("loading the datapath: {e}"));
        let maps = dp.take_maps().expect("maps");
        let events = dp.take_events().expect("events");
        Fixture { dp, maps, events, _pins: pins }
    }

    pub fn endpoint(&mut self, ifindex: u32, ep: EndpointInfo) {
        self.maps.endpoints.insert(ifindex, ep, 0).expect("insert endpoint");
    }

    pub fn host4(&mut self, addr: [u8; 4], identity: u32, flags: u32) {
        self.maps.ipcache_host_v4.insert(Ipv4Prefix { addr }, IpcacheValue { identity, flags }, 0).expect("ipcache");
    }

    pub fn host6(&mut self, addr: [u8; 16], identity: u32, flags: u32) {
        self.maps.ipcache_host_v6.insert(Ipv6Prefix { addr }, IpcacheValue { identity, flags }, 0).expect("ipcache");
    }

    pub fn prefix4(&mut self, addr: [u8; 4], len: u32, identity: u32) {
        let key = Key::new(len, Ipv4Prefix { addr });
        self.maps.ipcache_v4.insert(&key, IpcacheValue { identity, flags: 0 }, 0).expect("ipcache");
    }

    /// A rule on (protocol, port); `port` None: the whole protocol.
    pub fn rule(&mut self, endpoint_id: u16, dir: u8, peer: u32, protocol: u8, port: Option<u16>, deny: bool) {
        let prefix_len = if port.is_some() { POLICY_PREFIX_FULL } else { POLICY_PREFIX_PROTO };
        let key = PolicyKey::new(endpoint_id, dir, peer, protocol, port.unwrap_or(0));
        let value = PolicyValue { flags: if deny { policy_flags::DENY } else { 0 }, cookie: 1, prefix_len };
        self.maps.insert_policy(prefix_len, key, value).expect("insert policy");
    }

    pub fn run(&self, hook: Hook, frame: &[u8]) -> TestRunOutcome {
        self.dp.test_run(hook, frame, None).expect("test run")
    }

    pub fn drain_events(&mut self) -> Vec<VerdictEvent> {
        let mut out = Vec::new();
        self.events.drain(&mut out);
        out
    }

    /// Runs `frame` as if it had entered the node on `ingress_ifindex` (0: from the node) and
    /// reports what it did.
    pub fn observe_from(&mut self, hook: Hook, frame: &[u8], ingress_ifindex: u32) -> Observed {
        self.try_observe_from(hook, frame, ingress_ifindex).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Fixture::observe_from`], with `BPF_PROG_TEST_RUN` refusing the frame as an error.
    pub fn try_observe_from(&mut self, hook: Hook, frame: &[u8], ingress_ifindex: u32) -> Result<Observed, String> {
        let _ = self.drain_events();
        let before = self.maps.sum_counters().expect("counters");
        let out = self
            .dp
            .test_run_from(hook, frame, ingress_ifindex)
            .map_err(|e| format!("BPF_PROG_TEST_RUN refused it: {e}"))?;
        let after = self.maps.sum_counters().expect("counters");
        let moved = after
            .nonzero()
            .filter(|(r, d, c)| c.packets != before.get(*r, *d).packets)
            .map(|(r, d, _)| (r, d))
            .collect();
        let events = self.drain_events();
        Ok(Observed { out, moved, events })
    }

    pub fn observe(&mut self, hook: Hook, frame: &[u8]) -> Observed {
        self.observe_from(hook, frame, 0)
    }
}

/// The policy direction a hook judges.
pub fn hook_direction(hook: Hook) -> u8 {
    if hook == Hook::FromPod { direction::EGRESS } else { direction::INGRESS }
}
