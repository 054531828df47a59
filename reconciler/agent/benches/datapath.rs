//! Datapath benchmark: what the tc programs cost per packet, measured by the kernel with
//! `BPF_PROG_TEST_RUN`, next to an empty program (`palisade_empty`, which only returns "pass")
//! loaded from the same object in the same run.
//!
//! ```text
//! sudo cargo bench -p palisade-agent --bench datapath
//! ... --bench datapath -- --repeat 1000000 --runs 5 --json /tmp/datapath.json
//! ... --bench datapath -- --object before=/tmp/old.o --object after=/tmp/new.o
//! ```
//!
//! `--object LABEL=PATH` (repeatable) measures that build of the eBPF programs instead of
//! the one the agent carries; with several, their samples are interleaved run by run (paired
//! rounds under the same load) and each gets its table. The objects' maps must have this
//! build's layouts (`palisade_common`); an object of another layout needs a bench built
//! with it embedded (`PALISADE_EBPF_OBJECT`, see docs/benchmarks.md).
//!
//! Needs root and bpffs at /sys/fs/bpf. Every map set lives in a private pin directory
//! (`/sys/fs/bpf/palisade-bench-<pid>-<n>`) removed on exit, also on panic.
//!
//! Two map sizes: "small" (10 IPv4 ipcache entries, 10 IPv6, 10 policy entries) and "large"
//! (100,000 IPv4 ipcache entries, 100,000 IPv6, 10,000 policy entries over 50 endpoints).
//! The measured endpoint has the same kinds of rules at both sizes (exact, deny, any-peer),
//! so each packet makes the same lookups and only the number of entries differs.
//! Each case is measured `--runs` times (cases interleaved, so a noisy neighbour hits all of
//! them alike) and the median is reported. `BPF_PROG_TEST_RUN` with `repeat` runs the same
//! packet again and again and map state persists between repetitions; what that means
//! for each case is in [`CASES`] and in docs/benchmarks.md.
use std::{
    collections::HashSet,
    fmt::Write as _,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use aya::maps::lpm_trie::Key;
use palisade_agent::datapath::{Datapath, DatapathConfig, EventReader, Hook, MapSet, MapSizes, TestRunOutcome};
use palisade_common::{
    EndpointInfo, IpcacheValue, Ipv4Prefix, Ipv6Prefix, POLICY_PREFIX_FIXED, POLICY_PREFIX_FULL, POLICY_PREFIX_PROTO,
    PolicyKey, PolicyValue, VerdictEvent, direction, endpoint_flags, identity, policy_flags, proto, reason,
};

// ---------------------------------------------------------------------------------------
// The measured endpoint and its peers

/// `BPF_PROG_TEST_RUN` without a context runs the program on loopback: the endpoint is there.
const LO: u32 = 1;
const EP_ID: u16 = 10;
const POD: [u8; 4] = [10, 0, 0, 2];
const POD6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
/// Allowed to TCP/80 (and, over IPv6, TCP/443).
const PEER: [u8; 4] = [10, 0, 0, 1];
const PEER6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const PEER_ID: u32 = 300;
/// Denied everything by an explicit deny rule.
const DENIED: [u8; 4] = [10, 0, 0, 4];
const DENIED_ID: u32 = 302;
/// No rule names it: default deny.
const OTHER: [u8; 4] = [10, 0, 0, 3];
const OTHER_ID: u32 = 301;
/// A world address inside a CIDR entry (203.0.113.0/24), allowed to TCP/443 on egress.
const CIDR_PEER: [u8; 4] = [203, 0, 113, 7];
const CIDR_ID: u32 = identity::LOCAL_SCOPE | 5;

const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

/// The ring buffer holds about this many verdict events (1 MiB / (72 B + 8 B header)).
const RING_EVENTS: u32 = (1 << 20) / 80;

// ---------------------------------------------------------------------------------------
// Frames

fn ethernet(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01];
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn tcp(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut t = Vec::new();
    t.extend_from_slice(&sport.to_be_bytes());
    t.extend_from_slice(&dport.to_be_bytes());
    t.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    t
}

fn tcp4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let l4 = tcp(sport, dport, flags);
    let mut p = vec![0x45, 0];
    p.extend_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
    p.extend_from_slice(&[0x12, 0x34, 0x40, 0, 64, proto::TCP, 0, 0]);
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    p.extend_from_slice(&l4);
    ethernet(0x0800, &p)
}

fn tcp6(src: [u8; 16], dst: [u8; 16], sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let l4 = tcp(sport, dport, flags);
    let mut p = vec![0x60, 0, 0, 0];
    p.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    p.extend_from_slice(&[proto::TCP, 64]);
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    p.extend_from_slice(&l4);
    ethernet(0x86dd, &p)
}

// ---------------------------------------------------------------------------------------
// The datapath under test

/// A pin directory on bpffs, removed with everything in it on drop.
struct PinDir(PathBuf);

impl PinDir {
    fn new() -> PinDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        PinDir(PathBuf::from(format!("/sys/fs/bpf/palisade-bench-{}-{n}", std::process::id())))
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        if let Err(e) = Datapath::uninstall(&self.0) {
            eprintln!("cleaning up {}: {e}", self.0.display());
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

struct Bench {
    dp: Datapath,
    maps: MapSet,
    events: EventReader,
    // Dropped last: removes the pins after the handles are closed.
    _pins: PinDir,
}

/// A small deterministic generator (xorshift64*), so every run fills the maps alike.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// How full the maps are.
#[derive(Clone, Copy, Debug)]
struct Size {
    name: &'static str,
    ipcache: usize,
    policy: usize,
}

const SIZES: [Size; 2] =
    [Size { name: "small", ipcache: 10, policy: 10 }, Size { name: "large", ipcache: 100_000, policy: 10_000 }];

impl Bench {
    fn new(size: Size, object: Option<&[u8]>) -> Bench {
        let pins = PinDir::new();
        let cfg = DatapathConfig { pin_dir: pins.0.clone() };
        let mut dp = match object {
            Some(o) => Datapath::load_object(&cfg, &MapSizes::default(), o),
            None => Datapath::load(&cfg),
        }
        .unwrap_or_else(|e| panic!("loading the datapath: {e}"));
        let maps = dp.take_maps().expect("maps");
        let events = dp.take_events().expect("events");
        let mut b = Bench { dp, maps, events, _pins: pins };
        b.fill(size);
        // As the agent runs it: events for new allowed flows on.
        b.maps.set_allow_events(true).expect("config");
        b
    }

    /// Where the agent puts it (`mapstate::encode`): host entries in the host map, shorter
    /// prefixes in the trie.
    fn ipcache4(&mut self, addr: [u8; 4], len: u32, id: u32) {
        let value = IpcacheValue { identity: id, flags: 0 };
        if len == 32 {
            self.maps.ipcache_host_v4.insert(Ipv4Prefix { addr }, value, 0).expect("ipcache host v4");
        } else {
            self.maps.ipcache_v4.insert(&Key::new(len, Ipv4Prefix { addr }), value, 0).expect("ipcache v4");
        }
    }

    fn ipcache6(&mut self, addr: [u8; 16], len: u32, id: u32) {
        let value = IpcacheValue { identity: id, flags: 0 };
        if len == 128 {
            self.maps.ipcache_host_v6.insert(Ipv6Prefix { addr }, value, 0).expect("ipcache host v6");
        } else {
            self.maps.ipcache_v6.insert(&Key::new(len, Ipv6Prefix { addr }), value, 0).expect("ipcache v6");
        }
    }

    #[allow(clippy::too_many_arguments, reason = "one argument per key field, as in the ABI")]
    fn rule(&mut self, ep: u16, dir: u8, peer: u32, protocol: u8, port: u16, prefix_len: u32, deny: bool) {
        // As the agent writes it: the entry, then its prefix length.
        let key = PolicyKey::new(ep, dir, peer, protocol, port);
        let value = PolicyValue { flags: if deny { policy_flags::DENY } else { 0 }, cookie: 1, prefix_len };
        self.maps.insert_policy(prefix_len, key, value).expect("policy");
    }

    /// The entries the cases need, then filler up to the size: host entries of pods spread
    /// over 10.0.0.0/8 and `fd00::/64` with 1% CIDR entries of every length, and policy entries
    /// of 50 endpoints (exact port, port range, any port, any protocol, any peer, deny).
    fn fill(&mut self, size: Size) {
        let ep = EndpointInfo {
            endpoint_id: EP_ID.into(),
            identity: 1000,
            flags: endpoint_flags::INGRESS_ENFORCED
                | endpoint_flags::EGRESS_ENFORCED
                | endpoint_flags::HAS_IPV4
                | endpoint_flags::HAS_IPV6,
            ipv4: POD,
            ipv6: POD6,
        };
        self.maps.endpoints.insert(LO, ep, 0).expect("endpoint");

        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let fixed4 = [(POD, 32, 1000), (PEER, 32, PEER_ID), (OTHER, 32, OTHER_ID), (DENIED, 32, DENIED_ID)];
        let mut seen4: HashSet<([u8; 4], u32)> = HashSet::new();
        for (a, l, id) in fixed4.into_iter().chain([([203, 0, 113, 0], 24, CIDR_ID)]) {
            self.ipcache4(a, l, id);
            seen4.insert((a, l));
        }
        while seen4.len() < size.ipcache {
            let r = rng.next();
            let (addr, len) = if r.is_multiple_of(100) {
                let len = 8 + (r >> 8) as u32 % 21;
                let a = ((r >> 32) as u32) & (u32::MAX << (32 - len));
                (a.to_be_bytes(), len)
            } else {
                ((0x0a00_0000 | ((r >> 16) as u32 & 0x00ff_ffff)).to_be_bytes(), 32)
            };
            if fixed4.iter().any(|(a, _, _)| *a == addr) || !seen4.insert((addr, len)) {
                continue;
            }
            self.ipcache4(addr, len, 256 + (r >> 40) as u32 % 5000);
        }

        let mut seen6: HashSet<([u8; 16], u32)> = HashSet::new();
        for (a, id) in [(POD6, 1000), (PEER6, PEER_ID)] {
            self.ipcache6(a, 128, id);
            seen6.insert((a, 128));
        }
        while seen6.len() < size.ipcache {
            let r = rng.next();
            let mut addr = [0u8; 16];
            addr[0] = 0xfd;
            let (len, id) = if r.is_multiple_of(100) {
                addr[2..10].copy_from_slice(&rng.next().to_be_bytes());
                let len = 32 + (r >> 8) as u32 % 33;
                let keep = (len / 8) as usize;
                for (i, b) in addr.iter_mut().enumerate().skip(keep) {
                    *b = if i == keep { *b & !(0xffu8 >> (len % 8)) } else { 0 };
                }
                (len, identity::LOCAL_SCOPE | ((r >> 40) as u32 % 1000))
            } else {
                addr[8..16].copy_from_slice(&rng.next().to_be_bytes());
                (128, 256 + (r >> 40) as u32 % 5000)
            };
            if !seen6.insert((addr, len)) {
                continue;
            }
            self.ipcache6(addr, len, id);
        }

        // The rules the cases hit.
        self.rule(EP_ID, direction::INGRESS, PEER_ID, proto::TCP, 80, POLICY_PREFIX_FULL, false);
        self.rule(EP_ID, direction::INGRESS, PEER_ID, proto::TCP, 443, POLICY_PREFIX_FULL, false);
        self.rule(EP_ID, direction::INGRESS, DENIED_ID, proto::ANY, 0, POLICY_PREFIX_FIXED, true);
        self.rule(EP_ID, direction::EGRESS, CIDR_ID, proto::TCP, 443, POLICY_PREFIX_FULL, false);
        // Any-peer rules in both directions (on a protocol the cases do not use), so that
        // every case probes the any-peer entries at both sizes: the lookups per packet are
        // the same and only the number of entries differs.
        self.rule(EP_ID, direction::INGRESS, identity::ANY, proto::UDP, 5353, POLICY_PREFIX_FULL, false);
        self.rule(EP_ID, direction::EGRESS, identity::ANY, proto::UDP, 5353, POLICY_PREFIX_FULL, false);
        let fixed_rules = 6;
        let measured = [PEER_ID, OTHER_ID, DENIED_ID, CIDR_ID, identity::WORLD_IPV4, identity::WORLD_IPV6];
        let mut seen: HashSet<(u32, PolicyKey)> = HashSet::new();
        while seen.len() + fixed_rules < size.policy {
            let r = rng.next();
            let ep = if seen.len().is_multiple_of(50) { EP_ID } else { 1 + (r % 50) as u16 };
            let dir = ((r >> 8) & 1) as u8;
            let mut peer = 256 + (r >> 16) as u32 % 5000;
            let kind = (r >> 32) % 10;
            let (protocol, port, len) = match kind {
                0 => (proto::ANY, 0, POLICY_PREFIX_FIXED),
                1 => (proto::UDP, 0, POLICY_PREFIX_PROTO),
                2 => {
                    // A port range block: 4..=12 low bits free.
                    let free = 4 + (r >> 40) as u32 % 9;
                    let port = ((r >> 48) as u16) & (u16::MAX << free);
                    (proto::TCP, port, POLICY_PREFIX_FULL - free)
                }
                3 => {
                    // Any peer, one UDP port (not a protocol the cases use).
                    peer = identity::ANY;
                    (proto::UDP, (r >> 48) as u16, POLICY_PREFIX_FULL)
                }
                _ => {
                    (if kind.is_multiple_of(2) { proto::TCP } else { proto::UDP }, (r >> 48) as u16, POLICY_PREFIX_FULL)
                }
            };
            if ep == EP_ID && (measured.contains(&peer) || (peer == identity::ANY && protocol != proto::UDP)) {
                continue;
            }
            let key = PolicyKey::new(ep, dir, peer, protocol, port);
            if !seen.insert((len, key)) {
                continue;
            }
            let deny = (r >> 56).is_multiple_of(20) && ep != EP_ID;
            self.rule(ep, dir, peer, protocol, port, len, deny);
        }
    }

    fn drain_events(&mut self) {
        let mut sink: Vec<VerdictEvent> = Vec::new();
        while self.events.drain(&mut sink) > 0 {
            sink.clear();
        }
    }

    fn reason_packets(&self, r: u8, dir: u8) -> u64 {
        self.maps.sum_counters().expect("counters").get(r, dir).packets
    }
}

// ---------------------------------------------------------------------------------------
// Cases

/// How a case is run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Method {
    /// One `BPF_PROG_TEST_RUN` with `repeat` repetitions; the kernel's average.
    Repeat,
    /// `repeat / CHUNK` runs of CHUNK repetitions with the event ring drained before each,
    /// so that every repetition writes its event; the average of the kernel's averages.
    RepeatDrained,
    /// `SINGLE_SHOTS` runs of one repetition each on distinct flows (so each is a new flow);
    /// the median of the kernel's times.
    SingleShots,
}

const CHUNK: u32 = 10_000;
const SINGLE_SHOTS: u16 = 10_000;

#[derive(Clone, Copy, Debug)]
struct Case {
    name: &'static str,
    /// The program; `None` is the empty program.
    hook: Option<Hook>,
    method: Method,
    /// The verdict and reason every repetition must get (checked on the counters).
    expect: Option<(u8, u8)>,
    what: &'static str,
}

const CASES: [Case; 12] = [
    Case {
        name: "empty",
        hook: None,
        method: Method::Repeat,
        expect: None,
        what: "palisade_empty: returns pass, nothing else (the cost of BPF_PROG_TEST_RUN itself)",
    },
    Case {
        name: "not_endpoint",
        hook: Some(Hook::ToPod),
        method: Method::Repeat,
        expect: Some((reason::DROP_NO_ENDPOINT, direction::INGRESS)),
        what: "palisade_to_pod on an interface without an ENDPOINTS record: one miss, fail closed (drop)",
    },
    Case {
        name: "allow_forward",
        hook: Some(Hook::ToPod),
        method: Method::Repeat,
        expect: Some((reason::ALLOWED_BY_POLICY, direction::INGRESS)),
        what: "TCP ACK peer->pod:80, allowed by an exact rule. Repetition 1 creates the flow; \
               every later one is a forward packet of an established flow: ipcache, conntrack, \
               policy re-checked",
    },
    Case {
        name: "allow_forward_v6",
        hook: Some(Hook::ToPod),
        method: Method::Repeat,
        expect: Some((reason::ALLOWED_BY_POLICY, direction::INGRESS)),
        what: "the same over IPv6 (TCP/443; 128-bit ipcache keys)",
    },
    Case {
        name: "allow_forward_cidr",
        hook: Some(Hook::FromPod),
        method: Method::Repeat,
        expect: Some((reason::ALLOWED_BY_POLICY, direction::EGRESS)),
        what: "TCP ACK pod->203.0.113.7:443, peer found by a /24 CIDR entry (not a host \
               entry), allowed on egress; established after repetition 1",
    },
    Case {
        name: "reply",
        hook: Some(Hook::FromPod),
        method: Method::Repeat,
        expect: Some((reason::ALLOWED_REPLY, direction::EGRESS)),
        what: "TCP ACK pod:80->peer, the reply of the allow_forward flow: passes by conntrack \
               (egress is enforced and has no rule for the peer). Every repetition is the same \
               established-flow hit",
    },
    Case {
        name: "deny_rule",
        hook: Some(Hook::ToPod),
        method: Method::Repeat,
        expect: Some((reason::DROP_POLICY_DENY_RULE, direction::INGRESS)),
        what: "TCP SYN denied->pod:80, dropped by an explicit deny rule. Every repetition is \
               the same drop; its event fills the 1 MiB ring after ~13k repetitions, later \
               ones find it full (no event written)",
    },
    Case {
        name: "deny_default",
        hook: Some(Hook::ToPod),
        method: Method::Repeat,
        expect: Some((reason::DROP_POLICY_DENIED, direction::INGRESS)),
        what: "TCP SYN other->pod:80, no rule for the peer: default deny (ring full as above)",
    },
    Case {
        name: "deny_default_events",
        hook: Some(Hook::ToPod),
        method: Method::RepeatDrained,
        expect: Some((reason::DROP_POLICY_DENIED, direction::INGRESS)),
        what: "deny_default with the ring drained every 10,000 repetitions: every drop \
               writes its event",
    },
    Case {
        name: "empty_single",
        hook: None,
        method: Method::SingleShots,
        expect: None,
        what: "the empty program, one repetition per run: the baseline of allow_new_flow",
    },
    Case {
        name: "allow_new_flow",
        hook: Some(Hook::ToPod),
        method: Method::SingleShots,
        expect: Some((reason::ALLOWED_BY_POLICY, direction::INGRESS)),
        what: "TCP SYN peer->pod:80 from 10,000 distinct source ports, one repetition each: \
               the new-flow path (conntrack insert, allow event). Median of single runs",
    },
    Case {
        name: "deny_new_flow",
        hook: Some(Hook::ToPod),
        method: Method::SingleShots,
        expect: Some((reason::DROP_POLICY_DENIED, direction::INGRESS)),
        what: "TCP SYN other->pod:80 from distinct source ports, one repetition each, ring \
               drained: a default-deny drop with its event. Median of single runs",
    },
];

impl Case {
    fn frame(&self, sport: u16) -> Vec<u8> {
        match self.name {
            "allow_forward_v6" => tcp6(PEER6, POD6, sport, 443, TCP_ACK),
            "allow_forward_cidr" => tcp4(POD, CIDR_PEER, sport, 443, TCP_ACK),
            "reply" => tcp4(POD, PEER, 80, sport, TCP_ACK),
            "deny_rule" => tcp4(DENIED, POD, sport, 80, TCP_SYN),
            "deny_default" | "deny_default_events" | "deny_new_flow" => tcp4(OTHER, POD, sport, 80, TCP_SYN),
            "allow_new_flow" => tcp4(PEER, POD, sport, 80, TCP_SYN),
            _ => tcp4(PEER, POD, sport, 80, TCP_ACK),
        }
    }
}

/// Runs `case` once (one sample): nanoseconds per packet, kernel-measured.
fn measure(b: &mut Bench, case: &Case, repeat: u32) -> f64 {
    let before = case.expect.map(|(r, d)| b.reason_packets(r, d));
    let mut expected_packets = u64::from(repeat);
    let ns = match case.method {
        Method::Repeat => {
            b.drain_events();
            let frame = case.frame(40000);
            let removed = if case.name == "not_endpoint" { b.maps.endpoints.remove(&LO).is_ok() } else { false };
            let out = run_once(b, case.hook, &frame, repeat);
            if removed {
                let ep = EndpointInfo {
                    endpoint_id: EP_ID.into(),
                    identity: 1000,
                    flags: endpoint_flags::INGRESS_ENFORCED
                        | endpoint_flags::EGRESS_ENFORCED
                        | endpoint_flags::HAS_IPV4
                        | endpoint_flags::HAS_IPV6,
                    ipv4: POD,
                    ipv6: POD6,
                };
                b.maps.endpoints.insert(LO, ep, 0).expect("endpoint back");
            }
            check_action(case, out);
            nanos(out.duration)
        }
        Method::RepeatDrained => {
            let frame = case.frame(40000);
            let chunks = repeat.div_ceil(CHUNK);
            expected_packets = u64::from(chunks * CHUNK);
            let mut total = 0.0;
            for _ in 0..chunks {
                b.drain_events();
                let out = run_once(b, case.hook, &frame, CHUNK);
                check_action(case, out);
                total += nanos(out.duration);
            }
            b.drain_events();
            total / f64::from(chunks)
        }
        Method::SingleShots => {
            // Each shot a flow conntrack has not seen: distinct source ports, conntrack
            // emptied first (the repeat cases re-create their flow on their first repetition).
            b.maps.flush_conntrack().expect("flush conntrack");
            let base = 1024;
            let mut samples = Vec::with_capacity(SINGLE_SHOTS.into());
            for i in 0..SINGLE_SHOTS {
                if i % 4096 == 0 {
                    b.drain_events();
                }
                let out = run_once(b, case.hook, &case.frame(base + i), 1);
                check_action(case, out);
                samples.push(nanos(out.duration));
            }
            b.drain_events();
            expected_packets = SINGLE_SHOTS.into();
            median(&mut samples)
        }
    };
    if let (Some((r, d)), Some(before)) = (case.expect, before) {
        let got = b.reason_packets(r, d) - before;
        assert_eq!(got, expected_packets, "{}: every repetition must count as reason {r} (got {got})", case.name);
    }
    ns
}

fn run_once(b: &mut Bench, hook: Option<Hook>, frame: &[u8], repeat: u32) -> TestRunOutcome {
    match hook {
        Some(h) => b.dp.test_run_repeat(h, frame, repeat),
        None => b.dp.test_run_empty(frame, repeat),
    }
    .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN: {e}"))
}

fn check_action(case: &Case, out: TestRunOutcome) {
    let want_drop = case.expect.is_some_and(|(r, _)| reason::is_drop(r));
    assert_eq!(out.dropped(), want_drop, "{}: program returned {}", case.name, out.action);
}

fn nanos(d: Duration) -> f64 {
    d.as_nanos() as f64
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        0.0
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        f64::midpoint(v[n / 2 - 1], v[n / 2])
    }
}

// ---------------------------------------------------------------------------------------
// Main

struct Args {
    repeat: u32,
    runs: u32,
    json: PathBuf,
    /// `--object LABEL=PATH`: (label, ELF bytes); empty: the embedded build.
    objects: Vec<(String, Vec<u8>)>,
}

fn args() -> Args {
    // Benches run in the package's folder: the default is the workspace's target folder.
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"), PathBuf::from);
    let mut a =
        Args { repeat: 1_000_000, runs: 3, json: target.join("palisade-bench/datapath.json"), objects: Vec::new() };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--repeat" => a.repeat = it.next().and_then(|v| v.parse().ok()).expect("--repeat N"),
            "--runs" => a.runs = it.next().and_then(|v| v.parse().ok()).expect("--runs N"),
            "--json" => a.json = PathBuf::from(it.next().expect("--json PATH")),
            "--object" => {
                let v = it.next().expect("--object LABEL=PATH");
                let (label, path) = v.split_once('=').expect("--object LABEL=PATH (a label, '=', the object file)");
                let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("--object {v}: reading {path}: {e}"));
                a.objects.push((label.to_string(), bytes));
            }
            // cargo bench passes --bench; libtest-style filters are not supported.
            _ => {}
        }
    }
    a
}

fn machine() -> serde_json::Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let kernel =
        std::fs::read_to_string("/proc/sys/kernel/osrelease").map(|s| s.trim().to_string()).unwrap_or_default();
    let nproc = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let load = std::fs::read_to_string("/proc/loadavg").map(|s| s.trim().to_string()).unwrap_or_default();
    serde_json::json!({ "cpu": cpu, "kernel": kernel, "nproc": nproc, "loadavg_at_start": load })
}

/// What the agent's event thread does per verdict event (name both ends, attribute the
/// policy, count it, buffer it), over 200,000 events of 100 endpoints: events per second.
fn flow_enrichment() -> f64 {
    use palisade_agent::flows::{FlowStore, to_flow};
    use palisade_agent::monitor::{DecodeContext, EndpointNames};
    const EVENTS: u32 = 200_000;
    let mut ctx = DecodeContext::default();
    ctx.node_name = "bench".into();
    for id in 1..=100u32 {
        let labels = vec![format!("k8s:app=app-{id}"), "k8s:io.kubernetes.pod.namespace=default".into()];
        let deny_by = vec![palisade_api::flow::FlowPolicy {
            kind: "CiliumNetworkPolicy".into(),
            namespace: "default".into(),
            name: format!("policy-{id}"),
            rule: String::new(),
            action: "default-deny".into(),
        }];
        ctx.endpoint_info.insert(
            id,
            EndpointNames {
                namespace: "default".into(),
                name: format!("pod-{id}"),
                identity: 255 + id,
                labels,
                default_deny_by: [deny_by, Vec::new()],
                audit_default_deny_by: [Vec::new(), Vec::new()],
                fail_closed: [false; 2],
            },
        );
        ctx.by_ip.insert(std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 1, id as u8)), id);
    }
    let store = FlowStore::new(palisade_agent::flows::DEFAULT_BUFFER_SIZE);
    let started = std::time::Instant::now();
    for i in 0..EVENTS {
        let mut ev = VerdictEvent {
            endpoint_id: i % 100 + 1,
            direction: direction::INGRESS,
            verdict: 2,
            reason: reason::DROP_POLICY_DENIED,
            family: 4,
            protocol: proto::TCP,
            sport: 40_000 + (i % 1000) as u16,
            dport: 8080,
            peer_identity: 256 + (i + 1) % 100,
            tcp_flags: TCP_SYN,
            ..Default::default()
        };
        ev.saddr[..4].copy_from_slice(&[10, 0, 1, ((i + 1) % 100 + 1) as u8]);
        ev.daddr[..4].copy_from_slice(&[10, 0, 1, (i % 100 + 1) as u8]);
        let flow = to_flow(&ev, &ctx, u64::from(i));
        palisade_agent::metrics::global().flow_recorded(&flow);
        store.push(u64::from(i), flow);
    }
    f64::from(EVENTS) / started.elapsed().as_secs_f64()
}

fn main() {
    let a = args();
    assert!(nix::unistd::geteuid().is_root(), "the datapath benchmark loads eBPF programs: run it as root");
    assert!(Path::new("/sys/fs/bpf").exists(), "bpffs is not mounted at /sys/fs/bpf: run ci/setup.sh (as root)");
    let machine = machine();
    eprintln!("machine: {machine}");
    eprintln!("repeat {} per sample, {} samples per case (median reported)", a.repeat, a.runs);

    // The builds measured: the embedded one, or the `--object`s.
    let variants: Vec<(String, Option<&[u8]>)> = if a.objects.is_empty() {
        vec![(String::new(), None)]
    } else {
        a.objects.iter().map(|(l, b)| (l.clone(), Some(b.as_slice()))).collect()
    };
    // samples[variant][size][case]
    let mut samples = vec![vec![vec![Vec::new(); CASES.len()]; SIZES.len()]; variants.len()];
    let mut benches: Vec<Vec<Bench>> = variants
        .iter()
        .map(|(label, object)| {
            SIZES
                .iter()
                .map(|s| {
                    let started = std::time::Instant::now();
                    let b = Bench::new(*s, *object);
                    eprintln!("{label} {}: maps filled in {:.1?}", s.name, started.elapsed());
                    b
                })
                .collect()
        })
        .collect();
    for run in 0..a.runs {
        for (vi, bs) in benches.iter_mut().enumerate() {
            for (si, b) in bs.iter_mut().enumerate() {
                for (ci, case) in CASES.iter().enumerate() {
                    let ns = measure(b, case, a.repeat);
                    samples[vi][si][ci].push(ns);
                }
            }
        }
        eprintln!("run {} of {} done", run + 1, a.runs);
    }
    drop(benches);

    let mut results = Vec::new();
    for (vi, (label, _)) in variants.iter().enumerate() {
        let samples = &samples[vi];
        let med: Vec<Vec<f64>> = samples.iter().map(|s| s.iter().map(|c| median(&mut c.clone())).collect()).collect();
        let empty_of = |si: usize, m: Method| {
            let name = if m == Method::SingleShots { "empty_single" } else { "empty" };
            med[si][CASES.iter().position(|c| c.name == name).expect("baseline case")]
        };

        let mut table = String::new();
        if !label.is_empty() {
            let _ = writeln!(table, "object {label}:");
        }
        let _ = writeln!(
            table,
            "{:<22} {:>9} {:>9} {:>11} {:>11} {:>8}",
            "case", "small ns", "large ns", "small-empty", "large-empty", "large/small"
        );
        for (ci, case) in CASES.iter().enumerate() {
            let (s, l) = (med[0][ci], med[1][ci]);
            let (se, le) = (s - empty_of(0, case.method), l - empty_of(1, case.method));
            let _ = writeln!(
                table,
                "{:<22} {:>9.1} {:>9.1} {:>11.1} {:>11.1} {:>8.2}",
                case.name,
                s,
                l,
                se,
                le,
                if s > 0.0 { l / s } else { 0.0 }
            );
            for (si, size) in SIZES.iter().enumerate() {
                let mut r = serde_json::json!({
                    "case": case.name,
                    "size": size.name,
                    "ipcache_entries_per_family": size.ipcache,
                    "policy_entries": size.policy,
                    "method": format!("{:?}", case.method),
                    "ns_per_packet": med[si][ci],
                    "ns_over_empty": med[si][ci] - empty_of(si, case.method),
                    "samples_ns": samples[si][ci],
                    "what": case.what,
                });
                if !label.is_empty() {
                    r["object"] = serde_json::Value::String(label.clone());
                }
                results.push(r);
            }
        }
        println!("{table}");
    }
    let flows_per_s = flow_enrichment();
    println!("flow records: {flows_per_s:.0} events/s decoded, enriched and buffered (one thread)");
    let doc = serde_json::json!({
        "flow_records_per_second": flows_per_s,
        "benchmark": "datapath BPF_PROG_TEST_RUN",
        "machine": machine,
        "repeat": a.repeat,
        "runs": a.runs,
        "ring_events_capacity": RING_EVENTS,
        "results": results,
    });
    if let Some(dir) = a.json.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    match std::fs::write(&a.json, serde_json::to_string_pretty(&doc).expect("json")) {
        Ok(()) => eprintln!("results written to {}", a.json.display()),
        Err(e) => eprintln!("writing {}: {e}", a.json.display()),
    }
}
