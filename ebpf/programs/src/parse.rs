//! Packet parsing: Ethernet, IPv4/IPv6 (with extension headers), and the ports of TCP, UDP,
//! SCTP, ICMP and ICMPv6. Reads are bounds-checked against the linear packet data, falling
//! back to `bpf_skb_load_bytes` for headers outside it; a failed read is a truncated packet.
use aya_ebpf::programs::TcContext;
use palisade_common::{CtKey, FragKey, FragValue, family, proto, reason};

/// Length of the Ethernet header.
pub const ETH_HLEN: u32 = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_ARP: u16 = 0x0806;
const IPV6_HLEN: u32 = 40;
/// IPv6 extension headers followed at most; a packet with more is dropped
/// (`DROP_IPV6_EXT_CHAIN`). RFC 8200's recommended order has at most 6 before the upper
/// layer (Destination Options twice); 16 leaves room for what real stacks send.
pub const IPV6_MAX_EXT_HEADERS: usize = 16;

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
/// rejected as malformed still carries whatever was read before the failure. 8-aligned and
/// a multiple of 8 bytes long, so that [`Packet::clear`] zeroes it in whole words.
#[derive(Clone, Copy)]
#[repr(C, align(8))]
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
    /// End of the IP packet (Ethernet header + IP total length).
    pub l3_end: u32,
    /// IPv4 TTL / IPv6 hop limit.
    pub hop_limit: u8,
}

impl Packet {
    /// Zeroes the packet in place, one 8-byte store per word ([`crate::zero_words`]): no
    /// family, protocol 0, not ICMP ([`icmp_class::NONE`]), not fragmented
    /// ([`fragment::NONE`]), all addresses, ports and offsets 0.
    #[inline(always)]
    pub fn clear(&mut self) {
        crate::zero_words(core::ptr::from_mut(self));
    }

    /// Writes the conntrack key of this packet's tuple into `key`; returns the packet's
    /// orientation in it.
    #[inline(always)]
    pub fn ct_key(&self, key: &mut CtKey) -> usize {
        key.set_normalised(&self.saddr, &self.daddr, self.ct_sport, self.ct_dport, self.protocol, self.family)
    }

    /// The FRAGMENTS key of this packet's datagram: the kernel's reassembly key. IPv4
    /// reassembles by (addresses, id, protocol); IPv6 by (addresses, id) only, the protocol
    /// coming from the first fragment (later fragments' Next Header is not used).
    #[inline(always)]
    pub fn frag_key(&self) -> FragKey {
        FragKey {
            saddr: self.saddr,
            daddr: self.daddr,
            id_be: self.frag_id_be,
            protocol: if self.family == family::IPV4 { self.protocol } else { 0 },
            family: self.family,
            pad: [0; 2],
        }
    }

    /// What later fragments need from this (first) fragment's headers, and how it was
    /// judged (`denied`: the `reason::DROP_*` of its policy drop, 0 when it passed).
    #[inline(always)]
    pub fn frag_value(&self, denied: u8) -> FragValue {
        let echo = self.icmp_class == icmp_class::ECHO_REQUEST || self.icmp_class == icmp_class::ECHO_REPLY;
        FragValue {
            sport: self.sport,
            dport: self.dport,
            icmp_id: if echo { self.ct_sport } else { 0 },
            protocol: self.protocol,
            denied,
        }
    }

    /// Takes the protocol and ports of a later fragment from its datagram's first fragment.
    #[inline(always)]
    pub fn apply_fragment(&mut self, v: FragValue) {
        self.protocol = v.protocol;
        set_ports(self, v.sport, v.dport, v.icmp_id);
    }
}

/// Whether the protocol has ports (or ICMP type/code) that policy and conntrack match.
#[inline(always)]
pub fn has_ports(fam: u8, protocol: u8) -> bool {
    matches!(protocol, proto::TCP | proto::UDP | proto::SCTP | PROTO_UDPLITE) || is_icmp(fam, protocol)
}

/// Fills the port fields from the L4 header's values (ICMP: `sport` = code, `dport` = type,
/// `icmp_id` = echo identifier).
#[inline(always)]
fn set_ports(pkt: &mut Packet, sport: u16, dport: u16, icmp_id: u16) {
    pkt.sport = sport;
    pkt.dport = dport;
    pkt.policy_port = dport;
    if is_icmp(pkt.family, pkt.protocol) {
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
    /// ARP: passed without further parsing (IPv4 needs it; it carries no IP payload).
    Arp,
    /// IPv4/IPv6 headers parsed.
    Ip,
}

/// The frame is outside the accepted grammar: dropped with this reason (a `reason::DROP_*`).
pub struct Reject(pub u8);

const MALFORMED: Reject = Reject(reason::DROP_MALFORMED);

/// Reads a `T` at `off`: straight from the linear packet data when it is there (the common
/// case), else through `bpf_skb_load_bytes`, which also reaches paged data. `Err` means the
/// packet is shorter than `off + size_of::<T>()`.
#[inline(always)]
pub fn load<T: Copy>(ctx: &TcContext, off: u32) -> Result<T, Reject> {
    let start = ctx.data();
    let end = ctx.data_end();
    // Offsets are bounded (headers are parsed a bounded number of times), so the verifier
    // can follow the pointer arithmetic.
    if off < 0x1000 && start + off as usize + size_of::<T>() <= end {
        // SAFETY: the bytes lie within [data, data_end), checked just above.
        return Ok(unsafe { core::ptr::read_unaligned((start + off as usize) as *const T) });
    }
    ctx.load::<T>(off as usize).map_err(|_| MALFORMED)
}

/// A read at `off` within the IP packet: bytes past `l3_end` (the end the IP header's
/// length field gives; what follows is link-layer padding the kernel trims) count as
/// missing. Always through `bpf_skb_load_bytes`: the offset, which depends on header
/// lengths read from the packet, is then only a helper argument, and the verifier can
/// merge the states of different header chains instead of following each one to the end
/// (direct packet access would make every offset a distinct state).
#[inline(always)]
pub fn load_in<T: Copy>(ctx: &TcContext, l3_end: u32, off: u32) -> Result<T, Reject> {
    if u64::from(off) + size_of::<T>() as u64 > u64::from(l3_end) {
        return Err(MALFORMED);
    }
    ctx.load::<T>(off as usize).map_err(|_| MALFORMED)
}

/// [`load_in`] for the L4 header: straight from the linear data when the header sits right
/// behind a fixed-size IP header (no IPv4 options, no IPv6 extension headers: nearly every
/// packet), at an offset the verifier knows.
#[inline(always)]
fn load_l4<T: Copy>(ctx: &TcContext, pkt: &Packet, off: u32) -> Result<T, Reject> {
    if u64::from(off) + size_of::<T>() as u64 > u64::from(pkt.l3_end) {
        return Err(MALFORMED);
    }
    if off == ETH_HLEN + 20 {
        return load::<T>(ctx, ETH_HLEN + 20);
    }
    if off == ETH_HLEN + IPV6_HLEN {
        return load::<T>(ctx, ETH_HLEN + IPV6_HLEN);
    }
    load_in(ctx, pkt.l3_end, off)
}

/// Whether `protocol` is the ICMP of the family: ICMP (1) in IPv4, ICMPv6 (58) in IPv6.
/// Protocol 58 in IPv4, or 1 in IPv6, is an unknown protocol like any other.
#[inline(always)]
pub fn is_icmp(fam: u8, protocol: u8) -> bool {
    (fam == family::IPV4 && protocol == proto::ICMP) || (fam == family::IPV6 && protocol == proto::ICMPV6)
}

/// Parses the frame into `pkt`. The accepted grammar (docs/reliability.md):
///
/// - Ethernet with ethertype ARP, IPv4 or IPv6 at offset 12. A VLAN tag in the frame's data
///   (802.1Q, 802.1ad, `QinQ` 0x9100) is rejected: the kernel moves the first tag a pod sends
///   into the packet's metadata before tc sees it, so a tag still in the data is a second
///   one, which the kernel would strip again after the verdict and deliver what is inside.
///   Any other ethertype (and 802.3 length fields) is rejected too.
/// - IPv4: version 4, IHL >= 5, total length covering the header and within the frame.
/// - IPv6: version 6, payload length within the frame (zero with a Hop-by-Hop header, a
///   jumbogram, is rejected); at most [`IPV6_MAX_EXT_HEADERS`] extension headers, Hop-by-Hop
///   only first, one Fragment header at most; a non-first fragment ends the chain there.
/// - L4 headers of TCP (14 bytes read), UDP/UDP-Lite/SCTP (4), ICMP/ICMPv6 (8) complete
///   within the IP packet; an IPv4 first fragment needs only the 8 bytes RFC 791 guarantees.
#[inline(always)]
pub fn parse(ctx: &TcContext, pkt: &mut Packet) -> Result<Parsed, Reject> {
    let ethertype = u16::from_be_bytes(load::<[u8; 2]>(ctx, 12)?);
    match ethertype {
        ETH_P_IP => {
            parse_ipv4(ctx, pkt)?;
        }
        ETH_P_IPV6 => {
            parse_ipv6(ctx, pkt)?;
        }
        ETH_P_ARP => return Ok(Parsed::Arp),
        _ => return Err(Reject(reason::DROP_L2_UNSUPPORTED)),
    }
    if pkt.frag != fragment::LATER {
        parse_l4(ctx, pkt)?;
    }
    Ok(Parsed::Ip)
}

#[inline(always)]
fn parse_ipv4(ctx: &TcContext, pkt: &mut Packet) -> Result<(), Reject> {
    pkt.family = family::IPV4;
    // version/ihl, tos, tot_len, id, frag_off, ttl, protocol, check, saddr, daddr
    let h = load::<[u8; 20]>(ctx, ETH_HLEN)?;
    if h[0] >> 4 != 4 {
        return Err(MALFORMED);
    }
    let ihl = u32::from(h[0] & 0x0f);
    if ihl < 5 {
        return Err(MALFORMED);
    }
    let tot_len = u32::from(u16::from_be_bytes([h[2], h[3]]));
    if tot_len < ihl * 4 || ETH_HLEN + tot_len > ctx.len() {
        return Err(MALFORMED);
    }
    pkt.l3_end = ETH_HLEN + tot_len;
    pkt.hop_limit = h[8];
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
    if pkt.l4_off > pkt.l3_end {
        return Err(MALFORMED);
    }
    Ok(())
}

#[inline(always)]
fn parse_ipv6(ctx: &TcContext, pkt: &mut Packet) -> Result<(), Reject> {
    pkt.family = family::IPV6;
    let h = load::<[u8; 40]>(ctx, ETH_HLEN)?;
    if h[0] >> 4 != 6 {
        return Err(MALFORMED);
    }
    pkt.hop_limit = h[7];
    pkt.saddr.copy_from_slice(&h[8..24]);
    pkt.daddr.copy_from_slice(&h[24..40]);
    let payload_len = u32::from(u16::from_be_bytes([h[4], h[5]]));
    let mut next = h[6];
    let frame_len = ctx.len();
    if payload_len == 0 && frame_len > ETH_HLEN + IPV6_HLEN + 0xffff && next != NEXTHDR_HOP {
        // A GSO/GRO packet above 64 KiB (BIG TCP): the kernel leaves the length zero.
        pkt.l3_end = frame_len;
    } else if payload_len == 0 && next == NEXTHDR_HOP {
        // A jumbogram (RFC 2675): not supported.
        return Err(MALFORMED);
    } else if ETH_HLEN + IPV6_HLEN + payload_len > frame_len {
        return Err(MALFORMED);
    } else {
        pkt.l3_end = ETH_HLEN + IPV6_HLEN + payload_len;
    }
    let end = pkt.l3_end;
    let mut off = ETH_HLEN + IPV6_HLEN;
    let mut seen_fragment = false;
    // One round per extension header, plus one to find the L4 header behind the last.
    let mut i = 0;
    while i <= IPV6_MAX_EXT_HEADERS {
        match next {
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST => {
                // The kernel processes Hop-by-Hop only right after the fixed header.
                if next == NEXTHDR_HOP && i != 0 {
                    return Err(Reject(reason::DROP_IPV6_EXT_CHAIN));
                }
                let e = load_in::<[u8; 2]>(ctx, end, off)?;
                next = e[0];
                off += (u32::from(e[1]) + 1) * 8;
            }
            NEXTHDR_AUTH => {
                let e = load_in::<[u8; 2]>(ctx, end, off)?;
                next = e[0];
                off += (u32::from(e[1]) + 2) * 4;
            }
            NEXTHDR_FRAGMENT => {
                // The kernel reassembles at the first Fragment header; a second one inside
                // a datagram has no meaning (RFC 8200 allows one) and is not followed.
                if seen_fragment {
                    return Err(Reject(reason::DROP_IPV6_EXT_CHAIN));
                }
                seen_fragment = true;
                // next header, reserved, offset (13 bits) + 2 reserved bits + M, identification
                let e = load_in::<[u8; 8]>(ctx, end, off)?;
                off += 8;
                let frag = u16::from_be_bytes([e[2], e[3]]);
                pkt.frag_id_be = [e[4], e[5], e[6], e[7]];
                if frag >> 3 != 0 {
                    // A later fragment: what follows is payload, not headers, and its
                    // Next Header is not the one the kernel uses (the first fragment's is).
                    pkt.frag = fragment::LATER;
                    pkt.protocol = 0;
                    pkt.l4_off = off;
                    return Ok(());
                } else if frag & 1 != 0 {
                    pkt.frag = fragment::FIRST;
                }
                // Offset 0 without M is an atomic fragment: the kernel goes on with the
                // header behind it, as if there were no Fragment header.
                next = e[0];
            }
            _ => {
                pkt.protocol = next;
                pkt.l4_off = off;
                return Ok(());
            }
        }
        i += 1;
    }
    // Too many extension headers to follow.
    Err(Reject(reason::DROP_IPV6_EXT_CHAIN))
}

/// Reads the L4 ports (and TCP flags, ICMP type/code) at `pkt.l4_off`.
#[inline(always)]
fn parse_l4(ctx: &TcContext, pkt: &mut Packet) -> Result<(), Reject> {
    let off = pkt.l4_off;
    let end = pkt.l3_end;
    match pkt.protocol {
        proto::TCP => {
            // sport, dport, seq, ack, data offset, flags
            match load_l4::<[u8; 14]>(ctx, pkt, off) {
                Ok(t) => {
                    if t[12] >> 4 < 5 {
                        return Err(MALFORMED);
                    }
                    pkt.tcp_flags = t[13];
                    set_ports(pkt, u16::from_be_bytes([t[0], t[1]]), u16::from_be_bytes([t[2], t[3]]), 0);
                }
                Err(r) => {
                    // RFC 791 promises a first fragment 8 bytes of L4 header: the ports
                    // are there, the flags may be in the next fragment (unknown: 0).
                    if !(pkt.family == family::IPV4 && pkt.frag == fragment::FIRST) {
                        return Err(r);
                    }
                    let t = load_in::<[u8; 8]>(ctx, end, off)?;
                    set_ports(pkt, u16::from_be_bytes([t[0], t[1]]), u16::from_be_bytes([t[2], t[3]]), 0);
                }
            }
        }
        proto::UDP | proto::SCTP | PROTO_UDPLITE => {
            let p = load_l4::<[u8; 4]>(ctx, pkt, off)?;
            set_ports(pkt, u16::from_be_bytes([p[0], p[1]]), u16::from_be_bytes([p[2], p[3]]), 0);
        }
        p if is_icmp(pkt.family, p) => {
            // type, code, checksum, identifier (echo), sequence
            let i = load_l4::<[u8; 8]>(ctx, pkt, off)?;
            set_ports(pkt, u16::from(i[1]), u16::from(i[0]), u16::from_be_bytes([i[4], i[5]]));
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
            // that IPv6 needs to work at all. Candidates only: the decision checks that
            // they are link-scoped and well-formed (`nd_exempt` in main.rs).
            130..=137 | 143 => icmp_class::NEIGHBOUR_DISCOVERY,
            _ => icmp_class::OTHER,
        }
    }
}

/// The tuple of the packet quoted in an ICMP error (the offending packet, as its sender
/// sent it), with its ports as conntrack keys them.
pub struct Quoted {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub protocol: u8,
}

impl Quoted {
    /// Writes the conntrack key of the quoted packet into `key`; returns its orientation.
    #[inline(always)]
    pub fn ct_key(&self, fam: u8, key: &mut CtKey) -> usize {
        key.set_normalised(&self.saddr, &self.daddr, self.sport, self.dport, self.protocol, fam)
    }
}

/// The packet quoted in an ICMP error, or `None` when the quote is too short or not
/// understood.
#[inline(always)]
pub fn quoted_tuple(ctx: &TcContext, pkt: &Packet) -> Option<Quoted> {
    // ICMP header (8 bytes), then the quoted IP header and at least 8 bytes of its payload.
    let off = pkt.l4_off + 8;
    let mut q = Quoted { saddr: [0; 16], daddr: [0; 16], sport: 0, dport: 0, protocol: 0 };
    let l4_off;
    let end = pkt.l3_end;
    if pkt.family == family::IPV4 {
        let h = load_in::<[u8; 20]>(ctx, end, off).ok()?;
        let ihl = u32::from(h[0] & 0x0f);
        if h[0] >> 4 != 4 || ihl < 5 {
            return None;
        }
        q.protocol = h[9];
        q.saddr[..4].copy_from_slice(&h[12..16]);
        q.daddr[..4].copy_from_slice(&h[16..20]);
        l4_off = off + ihl * 4;
    } else {
        let h = load_in::<[u8; 40]>(ctx, end, off).ok()?;
        if h[0] >> 4 != 6 {
            return None;
        }
        // Quoted packets with extension headers are not followed.
        q.protocol = h[6];
        q.saddr.copy_from_slice(&h[8..24]);
        q.daddr.copy_from_slice(&h[24..40]);
        l4_off = off + IPV6_HLEN;
    }
    match q.protocol {
        proto::TCP | proto::UDP | proto::SCTP | PROTO_UDPLITE => {
            let p = load_in::<[u8; 4]>(ctx, end, l4_off).ok()?;
            q.sport = u16::from_be_bytes([p[0], p[1]]);
            q.dport = u16::from_be_bytes([p[2], p[3]]);
        }
        p if is_icmp(pkt.family, p) => {
            let i = load_in::<[u8; 6]>(ctx, end, l4_off).ok()?;
            let class = classify_icmp(q.protocol, i[0]);
            if class == icmp_class::ECHO_REQUEST || class == icmp_class::ECHO_REPLY {
                let id = u16::from_be_bytes([i[4], i[5]]);
                q.sport = id;
                q.dport = id;
            }
        }
        _ => {}
    }
    Some(q)
}
