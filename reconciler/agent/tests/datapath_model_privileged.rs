//! Property test of the tc programs against a reference model (needs root and bpffs).
//!
//! Random frames (VLAN tags, ethertypes, IPv4 options and length fields, IPv6 extension
//! header chains, fragment layouts, L4 headers, ICMP errors quoting earlier frames, replies,
//! truncations) go through the real programs with `BPF_PROG_TEST_RUN`, and every verdict must
//! equal what the model below says: the datapath's accepted grammar and decision
//! (docs/reliability.md), written from that description as plain Rust over plain
//! collections. For one frame in 64 the reason (read from the counters) must agree too.
//!
//! `PALISADE_MODEL_FRAMES` sets the number of frames (default 1,000,000: the CI size, about
//! a minute on 2 cores); `PALISADE_MODEL_SEED` replays a run (each run prints its seed).
//! Frames run in episodes of 64 whose ports and IP ids are their own, so state never leaks
//! between episodes and the model can start each one afresh; every 200,000 frames the
//! datapath is loaded anew (fresh maps), which keeps every entry far from its timeout and
//! the LRU maps far from full.
mod common;
#[path = "common/frames.rs"]
mod frames;

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;

use frames::*;
use palisade_agent::datapath::Hook;
use palisade_common::{EndpointInfo, direction, identity, ipcache_flags, proto, reason};

const CIDR_HOST: [u8; 4] = [192, 0, 2, 9];
const CIDR_ID: u32 = identity::LOCAL_SCOPE | 1;
const GLOBAL_MCAST: [u8; 16] = [0xff, 0x0e, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

const EPISODE: usize = 64;
const BLOCK: usize = 200_000;
const PORTS_PER_EPISODE: u16 = 12;
const IDS_PER_EPISODE: u16 = 12;

// ---------------------------------------------------------------------------------------
// The configuration both sides share

struct Rule {
    dir: u8,
    identity: u32,
    protocol: u8,
    /// None: the whole protocol (prefix 72), else the exact port (prefix 88).
    port: Option<u16>,
    deny: bool,
}

fn rules() -> Vec<Rule> {
    let r = |dir, identity, protocol, port, deny| Rule { dir, identity, protocol, port, deny };
    let (i, e) = (direction::INGRESS, direction::EGRESS);
    vec![
        r(i, PEER_ID, proto::TCP, Some(8080), false),
        r(i, PEER_ID, proto::UDP, Some(5353), false),
        r(i, PEER_ID, proto::SCTP, Some(3868), false),
        r(i, PEER_ID, proto::ICMP, Some(8), false),
        r(i, PEER_ID, proto::ICMPV6, Some(128), false),
        r(i, PEER_ID, proto::TCP, Some(22), true),
        r(i, identity::ANY, proto::TCP, Some(8443), false),
        r(i, identity::ANY, proto::TCP, Some(22), false),
        r(i, identity::HOST, proto::UDP, None, false),
        r(e, PEER_ID, proto::TCP, Some(6000), false),
        r(e, PEER_ID, proto::UDP, Some(9999), false),
        r(e, PEER_ID, proto::ICMPV6, Some(128), false),
        r(e, CIDR_ID, proto::UDP, Some(53), false),
        r(e, identity::ANY, proto::ICMP, Some(8), false),
        r(e, identity::WORLD_IPV4, proto::TCP, None, true),
        r(e, identity::HOST, proto::ICMPV6, Some(135), false),
    ]
}

fn hosts4() -> Vec<([u8; 4], u32, u32)> {
    let l = ipcache_flags::LOCAL_ENDPOINT;
    vec![(POD, 1000, l), (PEER, PEER_ID, 0), (OTHER, OTHER_ID, l), (NODE, identity::HOST, 0)]
}

fn hosts6() -> Vec<([u8; 16], u32, u32)> {
    let l = ipcache_flags::LOCAL_ENDPOINT;
    vec![(POD6, 1000, l), (PEER6, PEER_ID, 0), (OTHER6, OTHER_ID, l), (NODE6, identity::HOST, 0)]
}

fn load_fixture() -> Fixture {
    let mut fx = Fixture::new("model");
    fx.endpoint(LO, enforced_pod());
    fx.endpoint(OTHER_IF, EndpointInfo { endpoint_id: 11, identity: OTHER_ID, flags: 0, ipv4: OTHER, ipv6: OTHER6 });
    for (a, id, f) in hosts4() {
        fx.host4(a, id, f);
    }
    for (a, id, f) in hosts6() {
        fx.host6(a, id, f);
    }
    fx.prefix4([192, 0, 2, 0], 24, CIDR_ID);
    for r in rules() {
        fx.rule(EP_ID, r.dir, r.identity, r.protocol, r.port, r.deny);
    }
    fx
}

// ---------------------------------------------------------------------------------------
// The reference model

const NONE: u8 = 0;
const FIRST: u8 = 1;
const LATER: u8 = 2;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Icmp {
    None,
    EchoRequest,
    EchoReply,
    Error,
    Nd,
    Other,
}

#[derive(Clone, Copy, Default)]
struct P {
    v6: bool,
    protocol: u8,
    tcp_flags: u8,
    frag: u8,
    frag_id: u32,
    saddr: [u8; 16],
    daddr: [u8; 16],
    sport: u16,
    dport: u16,
    ct_sport: u16,
    ct_dport: u16,
    l4_off: usize,
    l3_end: usize,
    hop_limit: u8,
    icmp: Option<Icmp>,
}

impl P {
    fn class(&self) -> Icmp {
        self.icmp.unwrap_or(Icmp::None)
    }
}

type CtKey = ([u8; 16], [u8; 16], u16, u16, u8, bool);
type FragKey = ([u8; 16], [u8; 16], u32, u8, bool);

const EGRESS_OK: u32 = 1;
const INGRESS_OK: u32 = 2;
const SEEN_REPLY: u32 = 4;
const FIN_FWD: u32 = 8;
const FIN_REV: u32 = 16;
const RST_SEEN: u32 = 32;

#[derive(Clone, Copy)]
struct FragV {
    sport: u16,
    dport: u16,
    icmp_id: u16,
    protocol: u8,
    denied: u8,
}

#[derive(Default)]
struct Model {
    ct: HashMap<CtKey, u32>,
    frags: HashMap<FragKey, FragV>,
}

fn is_icmp(v6: bool, p: u8) -> bool {
    (!v6 && p == proto::ICMP) || (v6 && p == proto::ICMPV6)
}

fn classify(v6: bool, ty: u8) -> Icmp {
    match (v6, ty) {
        (false, 8) | (true, 128) => Icmp::EchoRequest,
        (false, 0) | (true, 129) => Icmp::EchoReply,
        (false, 3 | 11 | 12) | (true, 1..=4) => Icmp::Error,
        (true, 130..=137 | 143) => Icmp::Nd,
        _ => Icmp::Other,
    }
}

fn set_ports(p: &mut P, sport: u16, dport: u16, icmp_id: u16) {
    p.sport = sport;
    p.dport = dport;
    if is_icmp(p.v6, p.protocol) {
        let c = classify(p.v6, dport as u8);
        p.icmp = Some(c);
        let id = if matches!(c, Icmp::EchoRequest | Icmp::EchoReply) { icmp_id } else { 0 };
        (p.ct_sport, p.ct_dport) = (id, id);
    } else {
        (p.ct_sport, p.ct_dport) = (sport, dport);
    }
}

fn be16(f: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([f[at], f[at + 1]])
}

/// `n` bytes at `off` within the IP packet.
fn take(f: &[u8], end: usize, off: usize, n: usize) -> Result<&[u8], u8> {
    if off + n > end { Err(reason::DROP_MALFORMED) } else { Ok(&f[off..off + n]) }
}

enum Parsed {
    Arp,
    Ip(P),
}

/// The accepted grammar; `Err` is the drop reason of a frame outside it. `p` keeps what was
/// read before a failure (the fragment state matters for what is remembered).
fn parse(f: &[u8], p: &mut P) -> Result<Parsed, u8> {
    let m = reason::DROP_MALFORMED;
    if f.len() < 14 {
        return Err(m);
    }
    match be16(f, 12) {
        0x0806 => return Ok(Parsed::Arp),
        0x0800 => {
            let h = take(f, f.len(), 14, 20)?;
            let ihl = usize::from(h[0] & 0x0f);
            if h[0] >> 4 != 4 || ihl < 5 {
                return Err(m);
            }
            let tot = usize::from(be16(h, 2));
            if tot < ihl * 4 || 14 + tot > f.len() {
                return Err(m);
            }
            p.l3_end = 14 + tot;
            p.hop_limit = h[8];
            p.protocol = h[9];
            p.saddr[..4].copy_from_slice(&h[12..16]);
            p.daddr[..4].copy_from_slice(&h[16..20]);
            let frag = be16(h, 6);
            p.frag = if frag & 0x1fff != 0 {
                LATER
            } else if frag & 0x2000 != 0 {
                FIRST
            } else {
                NONE
            };
            p.frag_id = u32::from(be16(h, 4));
            p.l4_off = 14 + ihl * 4;
            if p.l4_off > p.l3_end {
                return Err(m);
            }
        }
        0x86dd => {
            p.v6 = true;
            let h = take(f, f.len(), 14, 40)?;
            if h[0] >> 4 != 6 {
                return Err(m);
            }
            p.hop_limit = h[7];
            p.saddr.copy_from_slice(&h[8..24]);
            p.daddr.copy_from_slice(&h[24..40]);
            let plen = usize::from(be16(h, 4));
            let mut next = h[6];
            if plen == 0 && next == NEXTHDR_HOP {
                return Err(m);
            }
            if 54 + plen > f.len() {
                return Err(m);
            }
            p.l3_end = 54 + plen;
            let end = p.l3_end;
            let mut off = 54;
            let mut seen_frag = false;
            let mut done = false;
            for i in 0..=16 {
                match next {
                    NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST => {
                        if next == NEXTHDR_HOP && i != 0 {
                            return Err(reason::DROP_IPV6_EXT_CHAIN);
                        }
                        let e = take(f, end, off, 2)?;
                        next = e[0];
                        off += (usize::from(e[1]) + 1) * 8;
                    }
                    NEXTHDR_AUTH => {
                        let e = take(f, end, off, 2)?;
                        next = e[0];
                        off += (usize::from(e[1]) + 2) * 4;
                    }
                    NEXTHDR_FRAGMENT => {
                        if seen_frag {
                            return Err(reason::DROP_IPV6_EXT_CHAIN);
                        }
                        seen_frag = true;
                        let e = take(f, end, off, 8)?;
                        off += 8;
                        let fo = be16(e, 2);
                        p.frag_id = u32::from_be_bytes([e[4], e[5], e[6], e[7]]);
                        if fo >> 3 != 0 {
                            p.frag = LATER;
                            p.protocol = 0;
                            p.l4_off = off;
                            return Ok(Parsed::Ip(*p));
                        } else if fo & 1 != 0 {
                            p.frag = FIRST;
                        }
                        next = e[0];
                    }
                    _ => {
                        p.protocol = next;
                        p.l4_off = off;
                        done = true;
                        break;
                    }
                }
            }
            if !done {
                return Err(reason::DROP_IPV6_EXT_CHAIN);
            }
        }
        _ => return Err(reason::DROP_L2_UNSUPPORTED),
    }
    if p.frag != LATER {
        let (off, end) = (p.l4_off, p.l3_end);
        match p.protocol {
            proto::TCP => match take(f, end, off, 14) {
                Ok(t) => {
                    if t[12] >> 4 < 5 {
                        return Err(m);
                    }
                    p.tcp_flags = t[13];
                    let (s, d) = (be16(t, 0), be16(t, 2));
                    set_ports(p, s, d, 0);
                }
                Err(e) => {
                    if p.v6 || p.frag != FIRST {
                        return Err(e);
                    }
                    let t = take(f, end, off, 8)?;
                    let (s, d) = (be16(t, 0), be16(t, 2));
                    set_ports(p, s, d, 0);
                }
            },
            proto::UDP | proto::SCTP | 136 => {
                let t = take(f, end, off, 4)?;
                let (s, d) = (be16(t, 0), be16(t, 2));
                set_ports(p, s, d, 0);
            }
            x if is_icmp(p.v6, x) => {
                let t = take(f, end, off, 8)?;
                let (c, ty, id) = (u16::from(t[1]), u16::from(t[0]), be16(t, 4));
                set_ports(p, c, ty, id);
            }
            _ => {}
        }
    }
    Ok(Parsed::Ip(*p))
}

fn link_local(a: &[u8; 16]) -> bool {
    a[0] == 0xfe && a[1] & 0xc0 == 0x80
}

fn identity_of(v6: bool, a: &[u8; 16]) -> u32 {
    if v6 {
        hosts6().iter().find(|h| h.0 == *a).map_or(identity::WORLD_IPV6, |h| h.1)
    } else {
        let a4 = [a[0], a[1], a[2], a[3]];
        if let Some(h) = hosts4().iter().find(|h| h.0 == a4) {
            return h.1;
        }
        if a4[..3] == [192, 0, 2] { CIDR_ID } else { identity::WORLD_IPV4 }
    }
}

fn host_flags(v6: bool, a: &[u8; 16]) -> u32 {
    if v6 {
        hosts6().iter().find(|h| h.0 == *a).map_or(0, |h| h.2)
    } else {
        hosts4().iter().find(|h| h.0[..] == a[..4]).map_or(0, |h| h.2)
    }
}

fn own(v6: bool, a: &[u8; 16]) -> bool {
    if v6 { *a == POD6 } else { a[..4] == POD }
}

/// Policy: the most specific entry for the peer, then for any peer; a deny wins.
fn policy(dir: u8, peer: u32, protocol: u8, port: u16) -> u8 {
    let longest = |id: u32| {
        rules()
            .into_iter()
            .filter(|r| r.dir == dir && r.identity == id && r.protocol == protocol)
            .filter(|r| r.port.is_none_or(|p| p == port))
            .max_by_key(|r| r.port.is_some())
    };
    let exact = longest(peer);
    let any = if exact.as_ref().is_some_and(|e| e.deny) { None } else { longest(identity::ANY) };
    match (exact, any) {
        (Some(e), _) if e.deny => reason::DROP_POLICY_DENY_RULE,
        (_, Some(a)) if a.deny => reason::DROP_POLICY_DENY_RULE,
        (Some(_), _) | (None, Some(_)) => reason::ALLOWED_BY_POLICY,
        (None, None) => reason::DROP_POLICY_DENIED,
    }
}

impl Model {
    /// The reason the datapath gives `frame` at `hook`, arriving on `iif`.
    fn verdict(&mut self, hook: Hook, iif: u32, frame: &[u8]) -> u8 {
        let mut p = P::default();
        let r = match parse(frame, &mut p) {
            Ok(Parsed::Arp) => reason::ALLOWED_ALWAYS,
            Ok(Parsed::Ip(parsed)) => {
                p = parsed;
                self.decide(hook, iif, frame, &mut p)
            }
            Err(r) => r,
        };
        if p.frag == FIRST {
            let key = (p.saddr, p.daddr, p.frag_id, if p.v6 { 0 } else { p.protocol }, p.v6);
            let echo = matches!(p.class(), Icmp::EchoRequest | Icmp::EchoReply);
            let v = FragV {
                sport: p.sport,
                dport: p.dport,
                icmp_id: if echo { p.ct_sport } else { 0 },
                protocol: p.protocol,
                denied: 0,
            };
            if !reason::is_drop(r) {
                self.frags.insert(key, v);
            } else if r == reason::DROP_POLICY_DENIED || r == reason::DROP_POLICY_DENY_RULE {
                self.frags.entry(key).or_insert(FragV { denied: r, ..v });
            }
        }
        r
    }

    fn decide(&mut self, hook: Hook, iif: u32, frame: &[u8], p: &mut P) -> u8 {
        let egress = hook == Hook::FromPod;
        let dir = if egress { direction::EGRESS } else { direction::INGRESS };
        if egress && !own(p.v6, &p.saddr) && !(p.v6 && (link_local(&p.saddr) || p.saddr == [0; 16])) {
            return reason::DROP_SPOOFED_SOURCE;
        }
        if !egress && iif != 0 && iif != LO && iif != OTHER_IF && host_flags(p.v6, &p.saddr) != 0 {
            return reason::DROP_SPOOFED_SOURCE;
        }
        let peer_addr = if egress { p.daddr } else { p.saddr };
        if p.class() == Icmp::Nd && Self::nd_exempt(egress, p) {
            return reason::ALLOWED_ALWAYS;
        }
        let has_ports = matches!(p.protocol, proto::TCP | proto::UDP | proto::SCTP | 136) || is_icmp(p.v6, p.protocol);
        if p.frag == LATER && (p.v6 || has_ports) {
            let key = (p.saddr, p.daddr, p.frag_id, if p.v6 { 0 } else { p.protocol }, p.v6);
            match self.frags.get(&key) {
                Some(v) => {
                    let v = *v;
                    p.protocol = v.protocol;
                    set_ports(p, v.sport, v.dport, v.icmp_id);
                    if v.denied != 0 {
                        return v.denied;
                    }
                }
                None => return reason::DROP_FRAGMENT_UNKNOWN,
            }
        }
        if p.class() == Icmp::Error && p.frag == NONE && self.related(egress, frame, p) {
            return reason::ALLOWED_REPLY;
        }
        let key: CtKey = (p.saddr, p.daddr, p.ct_sport, p.ct_dport, p.protocol, p.v6);
        let rev: CtKey = (p.daddr, p.saddr, p.ct_dport, p.ct_sport, p.protocol, p.v6);
        let syn_only = p.protocol == proto::TCP && p.tcp_flags & (0x02 | 0x10) == 0x02;
        let own_flag = if egress { EGRESS_OK } else { INGRESS_OK };
        let reply_flag = if egress { INGRESS_OK } else { EGRESS_OK };
        let closing = |f: u32| f & RST_SEEN != 0 || f & (FIN_FWD | FIN_REV) == (FIN_FWD | FIN_REV);
        let tcp_bits = |fin: u32| {
            let mut b = 0;
            if p.protocol == proto::TCP {
                if p.tcp_flags & 0x01 != 0 {
                    b |= fin;
                }
                if p.tcp_flags & 0x04 != 0 {
                    b |= RST_SEEN;
                }
            }
            b
        };
        if matches!(p.class(), Icmp::None | Icmp::EchoReply)
            && let Some(f) = self.ct.get_mut(&rev)
            && *f & reply_flag != 0
            && !(syn_only && (*f & SEEN_REPLY != 0 || closing(*f)))
        {
            *f |= SEEN_REPLY | tcp_bits(FIN_REV);
            return reason::ALLOWED_REPLY;
        }
        let fwd = self.ct.get(&key).copied().filter(|f| !(syn_only && closing(*f)));
        let r = policy(dir, identity_of(p.v6, &peer_addr), p.protocol, p.dport);
        if reason::is_drop(r) {
            if fwd.is_some() {
                *self.ct.get_mut(&key).unwrap() &= !own_flag;
            }
        } else if matches!(p.class(), Icmp::None | Icmp::EchoRequest) {
            let bits = own_flag | tcp_bits(FIN_FWD);
            match fwd {
                Some(f) => {
                    self.ct.insert(key, f | bits);
                }
                None => {
                    self.ct.insert(key, bits);
                }
            }
        }
        r
    }

    fn nd_exempt(egress: bool, p: &P) -> bool {
        let hl = if (133..=137).contains(&p.dport) { 255 } else { 1 };
        if p.frag != NONE || p.sport != 0 || p.hop_limit != hl {
            return false;
        }
        let (local, peer) = if egress { (p.saddr, p.daddr) } else { (p.daddr, p.saddr) };
        let mcast = |a: &[u8; 16]| a[0] == 0xff && a[1] & 0x0f <= 2;
        let local_ok =
            link_local(&local) || (egress && local == [0; 16]) || (!egress && mcast(&local)) || local == POD6;
        local_ok
            && (link_local(&peer)
                || (egress && mcast(&peer))
                || (!egress && peer == [0; 16])
                || identity_of(true, &peer) == identity::HOST)
    }

    fn related(&self, egress: bool, f: &[u8], p: &P) -> bool {
        let Some(q) = quoted(f, p) else {
            return false;
        };
        if !egress {
            if !own(p.v6, &p.daddr) || q.0 != p.daddr {
                return false;
            }
            if q.1 != p.saddr && identity_of(p.v6, &p.saddr) != identity::HOST {
                return false;
            }
        } else if q.1 != p.saddr || q.0 != p.daddr {
            return false;
        }
        let (own_flag, reply_flag) = if egress { (EGRESS_OK, INGRESS_OK) } else { (INGRESS_OK, EGRESS_OK) };
        let rev = (q.1, q.0, q.3, q.2, q.4, q.5);
        self.ct.get(&q).is_some_and(|f| f & reply_flag != 0) || self.ct.get(&rev).is_some_and(|f| f & own_flag != 0)
    }
}

/// The conntrack key of the packet an ICMP error quotes.
fn quoted(f: &[u8], p: &P) -> Option<CtKey> {
    let off = p.l4_off + 8;
    let end = p.l3_end;
    let (mut s, mut d) = ([0u8; 16], [0u8; 16]);
    let (protocol, l4) = if p.v6 {
        let h = take(f, end, off, 40).ok()?;
        if h[0] >> 4 != 6 {
            return None;
        }
        s.copy_from_slice(&h[8..24]);
        d.copy_from_slice(&h[24..40]);
        (h[6], off + 40)
    } else {
        let h = take(f, end, off, 20).ok()?;
        let ihl = usize::from(h[0] & 0x0f);
        if h[0] >> 4 != 4 || ihl < 5 {
            return None;
        }
        s[..4].copy_from_slice(&h[12..16]);
        d[..4].copy_from_slice(&h[16..20]);
        (h[9], off + ihl * 4)
    };
    let (mut sp, mut dp) = (0, 0);
    match protocol {
        proto::TCP | proto::UDP | proto::SCTP | 136 => {
            let t = take(f, end, l4, 4).ok()?;
            (sp, dp) = (be16(t, 0), be16(t, 2));
        }
        x if is_icmp(p.v6, x) => {
            let t = take(f, end, l4, 6).ok()?;
            if matches!(classify(p.v6, t[0]), Icmp::EchoRequest | Icmp::EchoReply) {
                let id = be16(t, 4);
                (sp, dp) = (id, id);
            }
        }
        _ => {}
    }
    Some((s, d, sp, dp, protocol, p.v6))
}

// ---------------------------------------------------------------------------------------
// Random frames

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len() as u64) as usize]
    }
    fn byte(&mut self) -> u8 {
        self.next() as u8
    }
}

/// What an episode's frames draw their ports and ids from.
struct Episode {
    port_base: u16,
    id_base: u16,
    id6_base: u32,
    /// Frames sent so far (IP packets without Ethernet header, and their hook).
    sent: Vec<(Hook, Vec<u8>)>,
}

const RULE_PORTS: [u16; 10] = [8080, 5353, 3868, 22, 8443, 6000, 9999, 53, 25, 80];

impl Episode {
    fn port(&self, rng: &mut Rng) -> u16 {
        self.port_base + rng.below(u64::from(PORTS_PER_EPISODE)) as u16
    }
    fn id(&self, rng: &mut Rng) -> u16 {
        self.id_base + rng.below(u64::from(IDS_PER_EPISODE)) as u16
    }
}

fn addr4(rng: &mut Rng) -> [u8; 4] {
    rng.pick(&[PEER, PEER, PEER, PEER, OTHER, NODE, WORLD, CIDR_HOST, POD, [10, 0, 0, 9]])
}

fn addr6(rng: &mut Rng) -> [u8; 16] {
    rng.pick(&[
        PEER6,
        PEER6,
        PEER6,
        PEER6,
        OTHER6,
        NODE6,
        WORLD6,
        LINK_LOCAL,
        GATEWAY_LL,
        ALL_NODES,
        GLOBAL_MCAST,
        [0; 16],
        POD6,
    ])
}

/// The L4 header (and a little payload) of a new packet.
fn l4(rng: &mut Rng, ep: &Episode, protocol: u8, v6: bool) -> Vec<u8> {
    let port = |rng: &mut Rng| if rng.chance(70) { rng.pick(&RULE_PORTS) } else { rng.next() as u16 };
    match protocol {
        proto::TCP => {
            let flags = rng.pick(&[SYN, SYN, ACK, SYN | ACK, ACK | 0x08, FIN | ACK, RST, SYN | FIN, 0, 0xff]);
            let mut t = tcp(ep.port(rng), port(rng), flags);
            if rng.chance(5) {
                t[12] = rng.byte();
            }
            t
        }
        proto::UDP | proto::SCTP | 136 => {
            let mut u = udp(ep.port(rng), port(rng), b"payload");
            if protocol == proto::SCTP {
                u.extend_from_slice(&[0; 4]);
            }
            u
        }
        _ if is_icmp(v6, protocol) => {
            let types: &[u8] = if v6 {
                &[128, 128, 129, 1, 2, 3, 4, 133, 134, 135, 136, 137, 130, 143, 200]
            } else {
                &[8, 8, 0, 3, 11, 12, 13, 5]
            };
            let ty = if rng.chance(5) { rng.byte() } else { rng.pick(types) };
            let code = if rng.chance(90) { 0 } else { rng.byte() };
            let mut m = icmp(ty, code, ep.id(rng));
            if matches!(classify(v6, ty), Icmp::Error) && !ep.sent.is_empty() && rng.chance(80) {
                // Quote an earlier packet of the episode (as sent, or reversed).
                let (_, q) = &ep.sent[rng.below(ep.sent.len() as u64) as usize];
                let n = if v6 { 48 } else { 28 };
                if q.len() >= n && (q[0] >> 4 == 6) == v6 {
                    let mut q = q[..n].to_vec();
                    if rng.chance(30) {
                        swap_addresses(&mut q, v6);
                    }
                    m.extend_from_slice(&q);
                }
            } else if rng.chance(10) {
                m.resize(8 + rng.below(600) as usize, 0x55);
            }
            m
        }
        _ => vec![0u8; rng.below(24) as usize],
    }
}

fn swap_addresses(ip: &mut [u8], v6: bool) {
    let (a, n) = if v6 { (8, 16) } else { (12, 4) };
    if ip.len() < a + 2 * n {
        return;
    }
    for i in 0..n {
        ip.swap(a + i, a + n + i);
    }
}

/// A reply to an earlier packet: addresses and ports swapped, the other hook.
fn reply_to(rng: &mut Rng, hook: Hook, ip: &[u8]) -> Option<(Hook, Vec<u8>)> {
    let v6 = ip[0] >> 4 == 6;
    if ip.len() < 40 {
        return None;
    }
    let mut r = ip.to_vec();
    swap_addresses(&mut r, v6);
    let l4_off = if v6 { 40 } else { usize::from(r[0] & 0x0f) * 4 };
    let protocol = if v6 { r[6] } else { r[9] };
    if r.len() < l4_off + 4 {
        return None;
    }
    if matches!(protocol, proto::TCP | proto::UDP | proto::SCTP | 136) {
        for i in 0..2 {
            r.swap(l4_off + i, l4_off + 2 + i);
        }
    }
    if protocol == proto::TCP && r.len() >= l4_off + 14 {
        r[l4_off + 13] = rng.pick(&[SYN | ACK, ACK, SYN, RST, FIN | ACK, ACK | 0x08]);
    }
    if is_icmp(v6, protocol) {
        r[l4_off] = if v6 { rng.pick(&[129, 129, 1]) } else { rng.pick(&[0, 0, 3]) };
    }
    let other = if hook == Hook::FromPod { Hook::ToPod } else { Hook::FromPod };
    Some((other, r))
}

/// One random frame: (hook, ingress interface, frame).
fn frame(rng: &mut Rng, ep: &mut Episode) -> (Hook, u32, Vec<u8>) {
    let iif = if rng.chance(85) { 0 } else { rng.pick(&[UPLINK_IF, OTHER_IF, LO, 5]) };
    if !ep.sent.is_empty() && rng.chance(35) {
        let (h, ip) = ep.sent[rng.below(ep.sent.len() as u64) as usize].clone();
        if let Some((hook, r)) = reply_to(rng, h, &ip) {
            let ethertype = if r[0] >> 4 == 6 { ETH_IPV6 } else { ETH_IPV4 };
            ep.sent.push((hook, r.clone()));
            return (hook, iif, ethernet(ethertype, &r));
        }
    }
    let hook = if rng.chance(50) { Hook::FromPod } else { Hook::ToPod };
    let out = hook == Hook::FromPod;
    let v6 = rng.chance(45);
    // A third of the frames start a flow the policy allows (so that replies, related errors
    // and later fragments have something to belong to); the rest are anything.
    let legit = rng.chance(33);
    let allowed: &[(u8, u16)] = match (out, v6) {
        (false, false) => &[(proto::TCP, 8080), (proto::UDP, 5353), (proto::SCTP, 3868), (proto::ICMP, 8)],
        (false, true) => &[(proto::TCP, 8080), (proto::UDP, 5353), (proto::ICMPV6, 128)],
        (true, false) => &[(proto::TCP, 6000), (proto::UDP, 9999), (proto::ICMP, 8)],
        (true, true) => &[(proto::TCP, 6000), (proto::UDP, 9999), (proto::ICMPV6, 128)],
    };
    let (legit_protocol, legit_port) = rng.pick(allowed);
    let protocol = if legit {
        legit_protocol
    } else if rng.chance(8) {
        rng.pick(&[proto::ICMP, proto::ICMPV6, 4, 41, 47, 50, 59, 255, 0])
    } else if v6 {
        rng.pick(&[proto::TCP, proto::TCP, proto::UDP, proto::ICMPV6, proto::ICMPV6, proto::SCTP, 136])
    } else {
        rng.pick(&[proto::TCP, proto::TCP, proto::UDP, proto::ICMP, proto::SCTP, 136])
    };
    let mut body = l4(rng, ep, protocol, v6);
    if legit {
        if is_icmp(v6, protocol) {
            body[0] = legit_port as u8;
        } else {
            body[2..4].copy_from_slice(&legit_port.to_be_bytes());
        }
    }
    let ip = if v6 {
        let own = if legit {
            POD6
        } else if rng.chance(85) {
            rng.pick(&[POD6, POD6, LINK_LOCAL, [0; 16], ALL_NODES])
        } else {
            addr6(rng)
        };
        let peer = if legit { PEER6 } else { addr6(rng) };
        let (src, dst) = if out { (own, peer) } else { (peer, own) };
        // An extension header chain, maybe with a Fragment header.
        let mut next = protocol;
        let n = if rng.chance(70) {
            0
        } else if rng.chance(90) {
            rng.below(4)
        } else {
            rng.below(19)
        };
        for _ in 0..n {
            let kind =
                rng.pick(&[NEXTHDR_DEST, NEXTHDR_DEST, NEXTHDR_ROUTING, NEXTHDR_HOP, NEXTHDR_AUTH, NEXTHDR_FRAGMENT]);
            let mut h = match kind {
                NEXTHDR_FRAGMENT => {
                    let offset = if rng.chance(50) { 0 } else { rng.below(8) as u16 };
                    let id = ep.id6_base + u32::from(ep.id(rng) - ep.id_base);
                    let mut fh = frag6(next, offset, rng.chance(70), id, &[]);
                    if offset != 0 {
                        // A later fragment carries payload, not the L4 header.
                        body = vec![0xab; 16];
                        fh[0] = rng.pick(&[proto::TCP, proto::UDP, NEXTHDR_FRAGMENT]);
                    }
                    fh
                }
                NEXTHDR_AUTH => vec![next, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                _ => {
                    let len = rng.below(3) as u8;
                    let mut h = vec![next, len];
                    h.resize(8 * (usize::from(len) + 1), 1);
                    h
                }
            };
            h.extend_from_slice(&body);
            body = h;
            next = kind;
        }
        let any = rng.byte();
        let hl = rng.pick(&[255, 255, 1, 64, any]);
        ipv6_packet(hl, src, dst, next, &body)
    } else {
        let own = if legit || rng.chance(90) { POD } else { addr4(rng) };
        let peer = if legit { PEER } else { addr4(rng) };
        let (src, dst) = if out { (own, peer) } else { (peer, own) };
        let options: Vec<u8> = if rng.chance(85) { Vec::new() } else { (0..4 * rng.below(11)).map(|_| 1).collect() };
        let id = ep.id(rng);
        let frag = match rng.below(10) {
            0..=5 => 0,
            6 => {
                // A first fragment, sometimes with only 8 (or 4) bytes of L4.
                if rng.chance(30) {
                    body.truncate(rng.pick(&[4, 8, 12]));
                }
                0x2000
            }
            7 | 8 => {
                body = vec![0xcd; 16];
                (rng.below(8) as u16 + 1) | if rng.chance(50) { 0x2000 } else { 0 }
            }
            _ => rng.next() as u16 & 0x3fff,
        };
        let mut p = ipv4_packet(src, dst, protocol, &options, frag, id, &body);
        if rng.chance(3) {
            p[0] = rng.byte();
        }
        p
    };
    let mut ip = ip;
    if rng.chance(4) {
        // A length field that lies.
        let at = if v6 { 4 } else { 2 };
        let v = rng.below(ip.len() as u64 + 64) as u16;
        ip[at..at + 2].copy_from_slice(&v.to_be_bytes());
    }
    let ethertype = if v6 { ETH_IPV6 } else { ETH_IPV4 };
    let mut f = match rng.below(100) {
        0..=2 => {
            let tags: Vec<(u16, u16)> =
                (0..=rng.below(2)).map(|_| (rng.pick(&[TPID_8021Q, TPID_8021AD, TPID_QINQ]), 0)).collect();
            ethernet_tagged(&tags, ethertype, &ip)
        }
        3..=4 => {
            let any = rng.next() as u16;
            ethernet(rng.pick(&[ETH_ARP, 0x88cc, 0x8035, 0x05dc, any]), &ip)
        }
        _ => {
            ep.sent.push((hook, ip.clone()));
            ethernet(ethertype, &ip)
        }
    };
    if rng.chance(6) {
        f.truncate(14 + rng.below(f.len() as u64 - 13) as usize);
    } else if rng.chance(3) {
        f.extend(std::iter::repeat_n(0, rng.below(40) as usize));
    }
    (hook, iif, f)
}

// ---------------------------------------------------------------------------------------

fn reason_name(r: u8) -> String {
    palisade_agent::monitor::reason_name(r).to_string()
}

#[test]
fn random_frames_get_the_reference_models_verdict() {
    let frames: usize = std::env::var("PALISADE_MODEL_FRAMES").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000);
    let seed: u64 = std::env::var("PALISADE_MODEL_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64) | 1
    });
    eprintln!("model test: {frames} frames, PALISADE_MODEL_SEED={seed}");
    let mut rng = Rng(seed);
    let started = std::time::Instant::now();
    let mut fx = load_fixture();
    let mut mismatches = Vec::new();
    let mut by_reason: HashMap<u8, u64> = HashMap::new();
    let mut checked_reasons = 0u64;
    let mut skipped = 0u64;
    let mut seen_l2 = HashSet::new();
    let mut done = 0usize;
    let mut episode_in_block = 0u16;
    while done < frames && mismatches.len() < 5 {
        if done.is_multiple_of(BLOCK) && done != 0 {
            fx = load_fixture();
            episode_in_block = 0;
        }
        let mut ep = Episode {
            port_base: 1024 + episode_in_block * PORTS_PER_EPISODE,
            id_base: 1 + episode_in_block * IDS_PER_EPISODE,
            id6_base: (done as u32 / EPISODE as u32) * u32::from(IDS_PER_EPISODE),
            sent: Vec::new(),
        };
        episode_in_block += 1;
        let mut model = Model::default();
        for _ in 0..EPISODE.min(frames - done) {
            let (hook, iif, f) = frame(&mut rng, &mut ep);
            let want = model.verdict(hook, iif, &f);
            *by_reason.entry(want).or_default() += 1;
            seen_l2.insert(be16(&f, 12));
            let check_reason = done.is_multiple_of(64);
            // BPF_PROG_TEST_RUN refuses an IPv4/IPv6 frame shorter than its fixed IP header
            // (the model says DROP_MALFORMED for it, which the program gives it too).
            let ip_ethertype = matches!(be16(&f, 12), ETH_IPV4 | ETH_IPV6);
            if ip_ethertype && f.len() < if be16(&f, 12) == ETH_IPV4 { 34 } else { 54 } {
                assert_eq!(want, reason::DROP_MALFORMED);
                skipped += 1;
                done += 1;
                continue;
            }
            let (got_drop, got_reason) = if check_reason {
                let o = fx.observe_from(hook, &f, iif);
                checked_reasons += 1;
                (o.out.dropped(), o.moved.first().map(|m| m.0))
            } else {
                let out = fx.dp.test_run_from(hook, &f, iif);
                let out = out
                    .unwrap_or_else(|e| panic!("test run of {} bytes {:02x?}, {hook:?}, iif {iif}: {e}", f.len(), f));
                (out.dropped(), None)
            };
            let reason_wrong = check_reason && got_reason != Some(want);
            if got_drop != reason::is_drop(want) || reason_wrong {
                mismatches.push(format!(
                    "frame {done} {hook:?} iif {iif}: program {} ({:?}), model {} ({})\n  {}",
                    if got_drop { "drop" } else { "pass" },
                    got_reason.map(reason_name),
                    if reason::is_drop(want) { "drop" } else { "pass" },
                    reason_name(want),
                    f.iter().fold(String::new(), |mut hex, b| {
                        let _ = write!(hex, "{b:02x}");
                        hex
                    })
                ));
            }
            done += 1;
        }
        if check_drain(done) {
            let _ = fx.drain_events();
        }
    }
    let mut reasons: Vec<_> = by_reason.iter().map(|(r, n)| format!("{}={n}", reason_name(*r))).collect();
    reasons.sort();
    eprintln!(
        "{done} frames in {:.1} s ({checked_reasons} with their reason checked, {skipped} too short for a test \
         run); model reasons: {}",
        started.elapsed().as_secs_f64(),
        reasons.join(" ")
    );
    assert!(mismatches.is_empty(), "seed {seed}: the program and the model disagree:\n{}", mismatches.join("\n"));
    // The generator reaches every class of verdict.
    if frames >= 100_000 {
        for r in [
            reason::ALLOWED_BY_POLICY,
            reason::ALLOWED_REPLY,
            reason::ALLOWED_ALWAYS,
            reason::DROP_POLICY_DENIED,
            reason::DROP_POLICY_DENY_RULE,
            reason::DROP_SPOOFED_SOURCE,
            reason::DROP_MALFORMED,
            reason::DROP_FRAGMENT_UNKNOWN,
            reason::DROP_L2_UNSUPPORTED,
            reason::DROP_IPV6_EXT_CHAIN,
        ] {
            assert!(by_reason.get(&r).copied().unwrap_or(0) > 0, "no frame got {}", reason_name(r));
        }
    }
}

/// Whether to empty the event ring now (drops fill it; a full ring only loses events).
fn check_drain(done: usize) -> bool {
    done % 4096 < EPISODE
}
