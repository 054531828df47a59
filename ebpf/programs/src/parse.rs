//! Packet parsing: Ethernet, IPv4/IPv6 (with extension headers), and the ports of TCP, UDP,
//! SCTP, ICMP and ICMPv6. Reads are bounds-checked against the linear packet data, falling
//! back to `bpf_skb_load_bytes` for headers outside it; a failed read is a truncated packet.
use aya_ebpf::programs::TcContext;
use palisade_common::{CtKey, FragKey, FragValue, family, proto};

/// Length of the Ethernet header.
pub const ETH_HLEN: u32 = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPV6_HLEN: u32 = 40;
/// IPv6 extension headers followed at most; a packet with more is treated as malformed.
const IPV6_MAX_EXT_HEADERS: usize = 6;

const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_AUTH: u8 = 51;
const NEXTHDR_DEST: u8 = 60;
const PROTO_UDPLITE: u8 = 136;

/// How conntrack and policy treat an ICMP/ICMPv6 message.
pub mod icmp_class {
    /// Not ICMP.
    pub const NONE: u8 = 0;
    /// Echo request: the identifier is both conntrack ports.
    pub const ECHO_REQUEST: u8 = 1;
    /// Echo reply: same normalisation, so it finds its request's reversed key.
    pub const ECHO_REPLY: u8 = 2;
    /// Destination unreachable, time exceeded, parameter problem, packet too big: related
    /// to the flow quoted inside.
    pub const ERROR: u8 = 3;
    /// ICMPv6 link-local control: neighbour discovery (router/neighbour solicitation and
    /// advertisement, redirect) and multicast listener discovery (query, report, done).
    pub const NEIGHBOUR_DISCOVERY: u8 = 4;
    /// Any other type.
    pub const OTHER: u8 = 5;
}

/// Where a packet stands in IP fragmentation.
pub mod fragment {
    /// Not fragmented.
    pub const NONE: u8 = 0;
    /// First fragment: has the L4 header.
    pub const FIRST: u8 = 1;
    /// A later fragment: no L4 header, ports unknown until looked up.
    pub const LATER: u8 = 2;
}

/// What the parser learned about one packet. Filled in as parsing goes, so that a packet
/// rejected as malformed still carries whatever was read before the failure.
#[derive(Clone, Copy)]
pub struct Packet {
    pub family: u8,
    pub protocol: u8,
    /// TCP flags byte (FIN 0x01, SYN 0x02, RST 0x04, ACK 0x10); zero for other protocols.
    pub tcp_flags: u8,
    /// [`icmp_class`] of an ICMP/ICMPv6 packet.
    pub icmp_class: u8,
    /// [`fragment`] state.
    pub frag: u8,
    /// IP identification of a fragment (IPv4: in the last two bytes), network order.
    pub frag_id_be: [u8; 4],
    /// Addresses, network order; IPv4 in the first 4 bytes.
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// Ports as reported in events, host order (ICMP: code in `sport`, type in `dport`).
    pub sport: u16,
    pub dport: u16,
    /// Ports of the conntrack key, host order (ICMP echo: the identifier in both).
    pub ct_sport: u16,
    pub ct_dport: u16,
    /// Port of the policy key (ICMP: the type).
    pub policy_port: u16,
    /// Offset of the L4 header.
    pub l4_off: u32,
}

impl Packet {
    pub const fn empty() -> Packet {
        Packet {
            family: 0,
            protocol: 0,
            tcp_flags: 0,
            icmp_class: icmp_class::NONE,
            frag: fragment::NONE,
            frag_id_be: [0; 4],
            saddr: [0; 16],
            daddr: [0; 16],
            sport: 0,
            dport: 0,
            ct_sport: 0,
            ct_dport: 0,
            policy_port: 0,
            l4_off: 0,
        }
    }

    /// The conntrack key of this packet's tuple.
    #[inline(always)]
    pub fn ct_key(&self) -> CtKey {
        CtKey {
            saddr: self.saddr,
            daddr: self.daddr,
            sport_be: self.ct_sport.to_be_bytes(),
            dport_be: self.ct_dport.to_be_bytes(),
            protocol: self.protocol,
            family: self.family,
            pad: [0; 2],
        }
    }

    /// The FRAGMENTS key of this packet's datagram.
    #[inline(always)]
    pub fn frag_key(&self) -> FragKey {
        FragKey {
            saddr: self.saddr,
            daddr: self.daddr,
            id_be: self.frag_id_be,
            protocol: self.protocol,
            family: self.family,
            pad: [0; 2],
        }
    }

    /// What later fragments need from this (first) fragment's L4 header.
    #[inline(always)]
    pub fn frag_value(&self) -> FragValue {
        let echo = self.icmp_class == icmp_class::ECHO_REQUEST || self.icmp_class == icmp_class::ECHO_REPLY;
        FragValue { sport: self.sport, dport: self.dport, icmp_id: if echo { self.ct_sport } else { 0 }, pad: 0 }
    }

    /// Takes the ports of a later fragment from its datagram's first fragment.
    #[inline(always)]
    pub fn apply_fragment(&mut self, v: &FragValue) {
        set_ports(self, v.sport, v.dport, v.icmp_id);
    }
}

/// Whether the protocol has ports (or ICMP type/code) that policy and conntrack match.
#[inline(always)]
pub fn has_ports(protocol: u8) -> bool {
    matches!(protocol, proto::TCP | proto::UDP | proto::SCTP | PROTO_UDPLITE | proto::ICMP | proto::ICMPV6)
}

/// Fills the port fields from the L4 header's values (ICMP: `sport` = code, `dport` = type,
/// `icmp_id` = echo identifier).
#[inline(always)]
fn set_ports(pkt: &mut Packet, sport: u16, dport: u16, icmp_id: u16) {
    pkt.sport = sport;
    pkt.dport = dport;
    pkt.policy_port = dport;
    if pkt.protocol == proto::ICMP || pkt.protocol == proto::ICMPV6 {
        pkt.icmp_class = classify_icmp(pkt.protocol, dport as u8);
        let echo = pkt.icmp_class == icmp_class::ECHO_REQUEST || pkt.icmp_class == icmp_class::ECHO_REPLY;
        let id = if echo { icmp_id } else { 0 };
        pkt.ct_sport = id;
        pkt.ct_dport = id;
    } else {
        pkt.ct_sport = sport;
        pkt.ct_dport = dport;
    }
}

/// Parse outcome.
pub enum Parsed {
    /// Not IPv4/IPv6 (ARP, LLDP...).
    NotIp,
    /// Headers parsed.
    Ip,
}

/// A header was truncated or malformed.
pub struct Malformed;

/// Reads a `T` at `off`: straight from the linear packet data when it is there (the common
/// case), else through `bpf_skb_load_bytes`, which also reaches paged data. `Err` means the
/// packet is shorter than `off + size_of::<T>()`.
#[inline(always)]
pub fn load<T: Copy>(ctx: &TcContext, off: u32) -> Result<T, Malformed> {
    let start = ctx.data();
    let end = ctx.data_end();
    // Offsets are bounded (headers are parsed a bounded number of times), so the verifier
    // can follow the pointer arithmetic.
    if off < 0x1000 && start + off as usize + size_of::<T>() <= end {
        // SAFETY: the bytes lie within [data, data_end), checked just above.
        return Ok(unsafe { core::ptr::read_unaligned((start + off as usize) as *const T) });
    }
    ctx.load::<T>(off as usize).map_err(|_| Malformed)
}

/// Parses the packet into `pkt`.
#[inline(always)]
pub fn parse(ctx: &TcContext, pkt: &mut Packet) -> Result<Parsed, Malformed> {
    let ethertype = u16::from_be_bytes(load::<[u8; 2]>(ctx, 12)?);
    match ethertype {
        ETH_P_IP => {
            parse_ipv4(ctx, pkt)?;
        }
        ETH_P_IPV6 => {
            parse_ipv6(ctx, pkt)?;
        }
        _ => return Ok(Parsed::NotIp),
    }
    if pkt.frag != fragment::LATER {
        parse_l4(ctx, pkt)?;
    }
    Ok(Parsed::Ip)
}

#[inline(always)]
fn parse_ipv4(ctx: &TcContext, pkt: &mut Packet) -> Result<(), Malformed> {
    pkt.family = family::IPV4;
    // version/ihl, tos, tot_len, id, frag_off, ttl, protocol, check, saddr, daddr
    let h = load::<[u8; 20]>(ctx, ETH_HLEN)?;
    if h[0] >> 4 != 4 {
        return Err(Malformed);
    }
    let ihl = (h[0] & 0x0f) as u32;
    if ihl < 5 {
        return Err(Malformed);
    }
    pkt.protocol = h[9];
    pkt.saddr[..4].copy_from_slice(&h[12..16]);
    pkt.daddr[..4].copy_from_slice(&h[16..20]);
    let frag = u16::from_be_bytes([h[6], h[7]]);
    if frag & 0x1fff != 0 {
        pkt.frag = fragment::LATER;
    } else if frag & 0x2000 != 0 {
        pkt.frag = fragment::FIRST;
    }
    pkt.frag_id_be = [0, 0, h[4], h[5]];
    pkt.l4_off = ETH_HLEN + ihl * 4;
    Ok(())
}

#[inline(always)]
fn parse_ipv6(ctx: &TcContext, pkt: &mut Packet) -> Result<(), Malformed> {
    pkt.family = family::IPV6;
    let h = load::<[u8; 40]>(ctx, ETH_HLEN)?;
    if h[0] >> 4 != 6 {
        return Err(Malformed);
    }
    pkt.saddr.copy_from_slice(&h[8..24]);
    pkt.daddr.copy_from_slice(&h[24..40]);
    let mut next = h[6];
    let mut off = ETH_HLEN + IPV6_HLEN;
    // One round per extension header, plus one to find the L4 header behind the last.
    for _ in 0..=IPV6_MAX_EXT_HEADERS {
        match next {
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST => {
                let e = load::<[u8; 2]>(ctx, off)?;
                next = e[0];
                off += (e[1] as u32 + 1) * 8;
            }
            NEXTHDR_AUTH => {
                let e = load::<[u8; 2]>(ctx, off)?;
                next = e[0];
                off += (e[1] as u32 + 2) * 4;
            }
            NEXTHDR_FRAGMENT => {
                // next header, reserved, offset (13 bits) + 2 reserved bits + M, identification
                let e = load::<[u8; 8]>(ctx, off)?;
                next = e[0];
                off += 8;
                let frag = u16::from_be_bytes([e[2], e[3]]);
                if frag >> 3 != 0 {
                    pkt.frag = fragment::LATER;
                } else if frag & 1 != 0 {
                    pkt.frag = fragment::FIRST;
                }
                pkt.frag_id_be = [e[4], e[5], e[6], e[7]];
            }
            _ => {
                pkt.protocol = next;
                pkt.l4_off = off;
                return Ok(());
            }
        }
    }
    // Too many extension headers to follow.
    Err(Malformed)
}

/// Reads the L4 ports (and TCP flags, ICMP type/code) at `pkt.l4_off`.
#[inline(always)]
fn parse_l4(ctx: &TcContext, pkt: &mut Packet) -> Result<(), Malformed> {
    let off = pkt.l4_off;
    match pkt.protocol {
        proto::TCP => {
            // sport, dport, seq, ack, data offset, flags
            let t = load::<[u8; 14]>(ctx, off)?;
            if t[12] >> 4 < 5 {
                return Err(Malformed);
            }
            pkt.tcp_flags = t[13];
            set_ports(pkt, u16::from_be_bytes([t[0], t[1]]), u16::from_be_bytes([t[2], t[3]]), 0);
        }
        proto::UDP | proto::SCTP | PROTO_UDPLITE => {
            let p = load::<[u8; 4]>(ctx, off)?;
            set_ports(pkt, u16::from_be_bytes([p[0], p[1]]), u16::from_be_bytes([p[2], p[3]]), 0);
        }
        proto::ICMP | proto::ICMPV6 => {
            // type, code, checksum, identifier (echo)
            let i = load::<[u8; 6]>(ctx, off)?;
            set_ports(pkt, i[1] as u16, i[0] as u16, u16::from_be_bytes([i[4], i[5]]));
        }
        _ => {}
    }
    Ok(())
}

#[inline(always)]
fn classify_icmp(protocol: u8, ty: u8) -> u8 {
    if protocol == proto::ICMP {
        match ty {
            8 => icmp_class::ECHO_REQUEST,
            0 => icmp_class::ECHO_REPLY,
            3 | 11 | 12 => icmp_class::ERROR,
            _ => icmp_class::OTHER,
        }
    } else {
        match ty {
            128 => icmp_class::ECHO_REQUEST,
            129 => icmp_class::ECHO_REPLY,
            1..=4 => icmp_class::ERROR,
            // Neighbour discovery and multicast listener discovery: link-local control
            // that IPv6 needs to work at all.
            130..=137 | 143 => icmp_class::NEIGHBOUR_DISCOVERY,
            _ => icmp_class::OTHER,
        }
    }
}

/// The conntrack key of the packet quoted in an ICMP error (the offending packet, as its
/// sender sent it), or `None` when the quote is too short or not understood.
#[inline(always)]
pub fn quoted_ct_key(ctx: &TcContext, pkt: &Packet) -> Option<CtKey> {
    // ICMP header (8 bytes), then the quoted IP header and at least 8 bytes of its payload.
    let off = pkt.l4_off + 8;
    let mut key = CtKey {
        saddr: [0; 16],
        daddr: [0; 16],
        sport_be: [0; 2],
        dport_be: [0; 2],
        protocol: 0,
        family: pkt.family,
        pad: [0; 2],
    };
    let l4_off;
    if pkt.family == family::IPV4 {
        let h = load::<[u8; 20]>(ctx, off).ok()?;
        let ihl = (h[0] & 0x0f) as u32;
        if h[0] >> 4 != 4 || ihl < 5 {
            return None;
        }
        key.protocol = h[9];
        key.saddr[..4].copy_from_slice(&h[12..16]);
        key.daddr[..4].copy_from_slice(&h[16..20]);
        l4_off = off + ihl * 4;
    } else {
        let h = load::<[u8; 40]>(ctx, off).ok()?;
        if h[0] >> 4 != 6 {
            return None;
        }
        // Quoted packets with extension headers are not followed.
        key.protocol = h[6];
        key.saddr.copy_from_slice(&h[8..24]);
        key.daddr.copy_from_slice(&h[24..40]);
        l4_off = off + IPV6_HLEN;
    }
    match key.protocol {
        proto::TCP | proto::UDP | proto::SCTP | PROTO_UDPLITE => {
            let p = load::<[u8; 4]>(ctx, l4_off).ok()?;
            key.sport_be = [p[0], p[1]];
            key.dport_be = [p[2], p[3]];
        }
        proto::ICMP | proto::ICMPV6 => {
            let i = load::<[u8; 6]>(ctx, l4_off).ok()?;
            let class = classify_icmp(key.protocol, i[0]);
            if class == icmp_class::ECHO_REQUEST || class == icmp_class::ECHO_REPLY {
                key.sport_be = [i[4], i[5]];
                key.dport_be = [i[4], i[5]];
            }
        }
        _ => {}
    }
    Some(key)
}
