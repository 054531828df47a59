//! The probes themselves: one TCP connect, one UDP exchange, one ICMP/ICMPv6 echo or one
//! SCTP INIT, bounded by a timeout, over IPv4 or IPv6. Each function blocks and must run on a thread inside the source's network
//! namespace (see [`crate::netns::run_in`]): the socket it creates belongs to that namespace.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{
    AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType, SockaddrStorage, bind, connect, getsockname, getsockopt,
    recvfrom, sendto, socket, sockopt,
};

/// What came of one probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attempt {
    /// TCP handshake completed, UDP echo or ICMP echo reply received.
    Answered,
    /// Nothing came back within the timeout.
    NoAnswer,
    /// The destination refused (TCP RST, ICMP port unreachable).
    Refused,
    /// The probe could not be made (no route, socket error...).
    Failed(String),
}

/// One probe's outcome and the facts needed to find its verdict events.
#[derive(Clone, Debug)]
pub struct ProbeRun {
    pub attempt: Attempt,
    /// The source port the probe used (TCP, UDP).
    pub local_port: Option<u16>,
    /// `CLOCK_MONOTONIC` when the probe started, in ns (the clock of verdict events).
    pub started_ns: u64,
    pub elapsed: Duration,
    /// SCTP: the INIT's initiate tag.
    pub tag: Option<u32>,
}

/// `CLOCK_MONOTONIC` in nanoseconds, the clock `bpf_ktime_get_ns` uses.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    (ts.tv_sec as u64).saturating_mul(1_000_000_000).saturating_add(ts.tv_nsec as u64)
}

/// Waits until `fd` is ready for `events` or the deadline passes; `Ok(false)` on timeout.
fn wait_ready(fd: &impl AsFd, events: libc::c_short, deadline: Instant) -> Result<bool, Errno> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        // Rounded up: never return before the deadline.
        let ms = i32::try_from(left.as_micros().div_ceil(1000)).unwrap_or(i32::MAX);
        let mut p = libc::pollfd { fd: fd.as_fd().as_raw_fd(), events, revents: 0 };
        // SAFETY: one valid pollfd, for the duration of the call.
        let n = unsafe { libc::poll(&raw mut p, 1, ms) };
        match n {
            0 => return Ok(false),
            n if n > 0 => return Ok(true),
            _ => match Errno::last() {
                Errno::EINTR => {}
                e => return Err(e),
            },
        }
    }
}

fn finish(attempt: Attempt, local_port: Option<u16>, started_ns: u64, t0: Instant) -> ProbeRun {
    ProbeRun { attempt, local_port, started_ns, elapsed: t0.elapsed(), tag: None }
}

/// The unspecified address of `dst`'s family, port 0 (bind to get a source port).
fn any_of(dst: &SocketAddr) -> SockaddrStorage {
    match dst {
        SocketAddr::V4(_) => SockaddrStorage::from(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0)),
        SocketAddr::V6(_) => SockaddrStorage::from(SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0)),
    }
}

fn port_of(addr: &SockaddrStorage) -> Option<u16> {
    addr.as_sockaddr_in()
        .map(nix::sys::socket::SockaddrIn::port)
        .or_else(|| addr.as_sockaddr_in6().map(nix::sys::socket::SockaddrIn6::port))
}

fn family_of(dst: &SocketAddr) -> AddressFamily {
    if dst.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 }
}

/// A TCP connect to `dst`: allowed when the handshake completes within `timeout`.
pub fn tcp(dst: SocketAddr, timeout: Duration) -> ProbeRun {
    let t0 = Instant::now();
    let started = monotonic_ns();
    let fail = |what: &str, e: Errno, port| finish(Attempt::Failed(format!("{what}: {e}")), port, started, t0);
    let fd: OwnedFd =
        match socket(family_of(&dst), SockType::Stream, SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC, None) {
            Ok(fd) => fd,
            Err(e) => return fail("creating a TCP socket", e, None),
        };
    // Bind first so that the source port is known even when the handshake never completes.
    if let Err(e) = bind(fd.as_raw_fd(), &any_of(&dst)) {
        return fail("binding a TCP socket", e, None);
    }
    let port = getsockname::<SockaddrStorage>(fd.as_raw_fd()).ok().as_ref().and_then(port_of);
    match connect(fd.as_raw_fd(), &SockaddrStorage::from(dst)) {
        Ok(()) => return finish(Attempt::Answered, port, started, t0),
        Err(Errno::EINPROGRESS) => {}
        Err(Errno::ECONNREFUSED) => return finish(Attempt::Refused, port, started, t0),
        Err(e) => return fail("connecting", e, port),
    }
    match wait_ready(&fd, libc::POLLOUT, t0 + timeout) {
        Ok(false) => finish(Attempt::NoAnswer, port, started, t0),
        Err(e) => fail("waiting for the handshake", e, port),
        Ok(true) => match getsockopt(&fd, sockopt::SocketError) {
            Ok(0) => finish(Attempt::Answered, port, started, t0),
            Ok(e) if e == libc::ECONNREFUSED => finish(Attempt::Refused, port, started, t0),
            Ok(e) if e == libc::ETIMEDOUT => finish(Attempt::NoAnswer, port, started, t0),
            Ok(e) => fail("connecting", Errno::from_raw(e), port),
            Err(e) => fail("reading the socket error", e, port),
        },
    }
}

/// A UDP datagram to `dst` carrying `token`: allowed when the same bytes come back from
/// `dst` within `timeout`. The datagram is sent again at half time (one loss is not a
/// verdict).
pub fn udp(dst: SocketAddr, token: &[u8], timeout: Duration) -> ProbeRun {
    let t0 = Instant::now();
    let started = monotonic_ns();
    let fail = |what: &str, e: std::io::Error, port| finish(Attempt::Failed(format!("{what}: {e}")), port, started, t0);
    let any: SocketAddr = match dst {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let sock = match UdpSocket::bind(any) {
        Ok(s) => s,
        Err(e) => return fail("creating a UDP socket", e, None),
    };
    let port = sock.local_addr().ok().map(|a| a.port());
    // Connected: only `dst` can answer, and an ICMP port unreachable shows as ECONNREFUSED.
    if let Err(e) = sock.connect(dst) {
        return fail("connecting a UDP socket", e, port);
    }
    let deadline = t0 + timeout;
    let resend_at = t0 + timeout / 2;
    let mut resent = false;
    if let Err(e) = sock.send(token) {
        return fail("sending", e, port);
    }
    let mut buf = [0u8; 2048];
    loop {
        let now = Instant::now();
        if now >= deadline {
            return finish(Attempt::NoAnswer, port, started, t0);
        }
        let until = if resent { deadline } else { resend_at.max(now + Duration::from_millis(1)) };
        if sock.set_read_timeout(Some(until - now)).is_err() {
            return finish(Attempt::Failed("setting a read timeout".into()), port, started, t0);
        }
        match sock.recv(&mut buf) {
            Ok(n) if &buf[..n] == token => return finish(Attempt::Answered, port, started, t0),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                return finish(Attempt::Refused, port, started, t0);
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                if !resent && Instant::now() >= resend_at {
                    resent = true;
                    if let Err(e) = sock.send(token) {
                        return fail("sending again", e, port);
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return fail("receiving", e, port),
        }
    }
}

/// ICMP (IPv4) or ICMPv6 echo request to `dst` with identifier `ident`: allowed when the
/// matching echo reply comes back within `timeout`. Uses a raw socket (the testbed runs as
/// root); the request is sent again at half time.
pub fn icmp_echo(dst: IpAddr, ident: u16, seq: u16, timeout: Duration) -> ProbeRun {
    let t0 = Instant::now();
    let started = monotonic_ns();
    let fail = |what: &str, e: Errno| finish(Attempt::Failed(format!("{what}: {e}")), None, started, t0);
    let (family, protocol, request) = match dst {
        IpAddr::V4(_) => (AddressFamily::Inet, SockProtocol::Icmp, echo_request(ident, seq, ECHO_PAYLOAD)),
        // The kernel fills in the ICMPv6 checksum (it needs the pseudo-header's addresses).
        IpAddr::V6(_) => (AddressFamily::Inet6, SockProtocol::IcmpV6, echo_request_v6(ident, seq, ECHO_PAYLOAD)),
    };
    let fd = match socket(family, SockType::Raw, SockFlag::SOCK_CLOEXEC, protocol) {
        Ok(fd) => fd,
        Err(e) => return fail("creating a raw ICMP socket", e),
    };
    let to = SockaddrStorage::from(SocketAddr::new(dst, 0));
    if let Err(e) = sendto(fd.as_raw_fd(), &request, &to, MsgFlags::empty()) {
        return fail("sending the echo request", e);
    }
    let deadline = t0 + timeout;
    let resend_at = t0 + timeout / 2;
    let mut resent = false;
    let mut buf = [0u8; 2048];
    loop {
        let until = if resent { deadline } else { resend_at };
        match wait_ready(&fd, libc::POLLIN, until) {
            Ok(false) if resent || Instant::now() >= deadline => return finish(Attempt::NoAnswer, None, started, t0),
            Ok(false) => {
                resent = true;
                if let Err(e) = sendto(fd.as_raw_fd(), &request, &to, MsgFlags::empty()) {
                    return fail("sending the echo request again", e);
                }
                continue;
            }
            Err(e) => return fail("waiting for the echo reply", e),
            Ok(true) => {}
        }
        match recvfrom::<SockaddrStorage>(fd.as_raw_fd(), &mut buf) {
            Ok((n, Some(from))) => {
                let from_ip = from
                    .as_sockaddr_in()
                    .map(|a| IpAddr::V4(a.ip()))
                    .or_else(|| from.as_sockaddr_in6().map(|a| IpAddr::V6(a.ip())));
                let reply = match dst {
                    IpAddr::V4(_) => is_echo_reply(&buf[..n], ident, seq),
                    IpAddr::V6(_) => is_echo_reply_v6(&buf[..n], ident, seq),
                };
                if from_ip == Some(dst) && reply {
                    return finish(Attempt::Answered, None, started, t0);
                }
            }
            Ok(_) | Err(Errno::EINTR | Errno::EAGAIN) => {}
            Err(e) => return fail("receiving", e),
        }
    }
}

const ECHO_PAYLOAD: &[u8] = b"palisade-testbed";

/// An ICMPv6 echo request (type 128), checksum left to the kernel.
pub fn echo_request_v6(ident: u16, seq: u16, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![128, 0, 0, 0];
    p.extend_from_slice(&ident.to_be_bytes());
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(payload);
    p
}

/// Whether `packet` (ICMPv6 message, as a raw IPv6 socket delivers it: no IP header) is the
/// echo reply to (`ident`, `seq`).
pub fn is_echo_reply_v6(packet: &[u8], ident: u16, seq: u16) -> bool {
    packet.len() >= 8
        && packet[0] == 129
        && packet[1] == 0
        && packet[4..6] == ident.to_be_bytes()
        && packet[6..8] == seq.to_be_bytes()
}

/// IP protocol number of SCTP.
pub const IPPROTO_SCTP: i32 = 132;

/// A raw socket of `domain` (`AF_INET`, `AF_INET6`) for IP protocol `protocol` in the
/// calling thread's namespace.
pub fn raw_socket(domain: i32, protocol: i32, nonblocking: bool) -> std::io::Result<OwnedFd> {
    let flags = libc::SOCK_RAW | libc::SOCK_CLOEXEC | if nonblocking { libc::SOCK_NONBLOCK } else { 0 };
    // SAFETY: plain socket(2) call; the result is checked and owned at once.
    let raw = unsafe { libc::socket(domain, flags, protocol) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is a new, valid descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Sends one SCTP INIT from `src_port` to `dst` with initiate tag `tag`, from a raw socket
/// (this kernel has no SCTP sockets; the kernel adds the IP header). Whether it arrived is
/// for the destination's capture to say (see [`crate::listen`]).
pub fn sctp_init(dst: SocketAddr, src_port: u16, tag: u32) -> Result<(), String> {
    let domain = if dst.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    let fd = raw_socket(domain, IPPROTO_SCTP, false).map_err(|e| format!("creating a raw SCTP socket: {e}"))?;
    let packet = sctp_init_packet(src_port, dst.port(), tag);
    // Port 0 in the address: raw sockets take the protocol from the socket.
    let to = SockaddrStorage::from(SocketAddr::new(dst.ip(), 0));
    sendto(fd.as_raw_fd(), &packet, &to, MsgFlags::empty()).map_err(|e| format!("sending the SCTP INIT: {e}"))?;
    Ok(())
}

/// An SCTP packet (RFC 9260) with one INIT chunk: common header with verification tag 0
/// (as an INIT must have) and a `CRC32c` checksum, then the chunk carrying `tag` as its
/// initiate tag.
pub fn sctp_init_packet(src_port: u16, dst_port: u16, tag: u32) -> Vec<u8> {
    let mut p = Vec::with_capacity(32);
    p.extend_from_slice(&src_port.to_be_bytes());
    p.extend_from_slice(&dst_port.to_be_bytes());
    p.extend_from_slice(&0u32.to_be_bytes()); // verification tag
    p.extend_from_slice(&0u32.to_be_bytes()); // checksum, filled below
    p.extend_from_slice(&[1, 0]); // chunk type INIT, flags
    p.extend_from_slice(&20u16.to_be_bytes()); // chunk length
    p.extend_from_slice(&tag.to_be_bytes()); // initiate tag
    p.extend_from_slice(&65_535u32.to_be_bytes()); // advertised receiver window
    p.extend_from_slice(&1u16.to_be_bytes()); // outbound streams
    p.extend_from_slice(&1u16.to_be_bytes()); // inbound streams
    p.extend_from_slice(&tag.to_be_bytes()); // initial TSN
    // The CRC32c value goes on the wire least significant byte first (as Linux's
    // sctp_compute_cksum stores it: cpu_to_le32).
    let sum = crc32c(&p);
    p[8..12].copy_from_slice(&sum.to_le_bytes());
    p
}

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), as SCTP uses it.
pub fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0x82f6_3b78 } else { crc >> 1 };
        }
    }
    !crc
}

/// An SCTP INIT as a capture saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SctpInit {
    pub src: IpAddr,
    pub src_port: u16,
    pub dst_port: u16,
    pub tag: u32,
}

/// The SCTP INIT in `packet` (an IPv4 or IPv6 packet, header included), if it is one.
/// IPv6 extension headers are not followed: the testbed's INITs carry none.
pub fn parse_sctp_init_ip(packet: &[u8]) -> Option<SctpInit> {
    match packet.first()? >> 4 {
        4 => {
            let ihl = usize::from(packet[0] & 0x0f) * 4;
            if packet.get(9) != Some(&(IPPROTO_SCTP as u8)) {
                return None;
            }
            let src: [u8; 4] = packet.get(12..16)?.try_into().ok()?;
            parse_sctp_init(IpAddr::V4(Ipv4Addr::from(src)), packet.get(ihl..)?)
        }
        6 => {
            if packet.get(6) != Some(&(IPPROTO_SCTP as u8)) {
                return None;
            }
            let src: [u8; 16] = packet.get(8..24)?.try_into().ok()?;
            parse_sctp_init(IpAddr::V6(Ipv6Addr::from(src)), packet.get(40..)?)
        }
        _ => None,
    }
}

/// The SCTP INIT in `sctp` (the SCTP packet, from its common header on), sent by `src`.
pub fn parse_sctp_init(src: IpAddr, sctp: &[u8]) -> Option<SctpInit> {
    let b = sctp.get(..20)?;
    if b[12] != 1 {
        return None;
    }
    Some(SctpInit {
        src,
        src_port: u16::from_be_bytes([b[0], b[1]]),
        dst_port: u16::from_be_bytes([b[2], b[3]]),
        tag: u32::from_be_bytes([b[16], b[17], b[18], b[19]]),
    })
}

/// An ICMP echo request (type 8) with a correct checksum.
pub fn echo_request(ident: u16, seq: u16, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![8, 0, 0, 0];
    p.extend_from_slice(&ident.to_be_bytes());
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(payload);
    let sum = internet_checksum(&p);
    p[2..4].copy_from_slice(&sum.to_be_bytes());
    p
}

/// Whether `packet` (IPv4 header included, as a raw socket delivers it) is the echo reply
/// to (`ident`, `seq`).
pub fn is_echo_reply(packet: &[u8], ident: u16, seq: u16) -> bool {
    let Some(first) = packet.first() else { return false };
    let ihl = usize::from(first & 0x0f) * 4;
    let Some(icmp) = packet.get(ihl..ihl + 8) else { return false };
    icmp[0] == 0 && icmp[1] == 0 && icmp[4..6] == ident.to_be_bytes() && icmp[6..8] == seq.to_be_bytes()
}

/// RFC 1071 checksum.
pub fn internet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_request_checksums_to_zero() {
        let p = echo_request(0x1234, 7, b"abc");
        assert_eq!(p[0], 8);
        assert_eq!(internet_checksum(&p), 0);
    }

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn sctp_init_packet_round_trips_and_checks_out() {
        let p = sctp_init_packet(40_001, 9000, 0xdead_beef);
        assert_eq!(p.len(), 32);
        let src: IpAddr = "10.200.1.10".parse().unwrap();
        let init = parse_sctp_init(src, &p).unwrap();
        assert_eq!(init, SctpInit { src, src_port: 40_001, dst_port: 9000, tag: 0xdead_beef });
        // The receiver's check: the CRC over the packet with a zero checksum field.
        let mut zeroed = p.clone();
        zeroed[8..12].fill(0);
        assert_eq!(u32::from_le_bytes(p[8..12].try_into().unwrap()), crc32c(&zeroed));
        let mut v4 = vec![0x45, 0, 0, 52, 0, 0, 0, 0, 64, 132, 0, 0, 10, 200, 1, 10, 10, 200, 1, 11];
        v4.extend_from_slice(&p);
        assert_eq!(parse_sctp_init_ip(&v4), Some(init));
    }

    #[test]
    fn recognises_its_echo_reply_v6() {
        let mut reply = echo_request_v6(0x1234, 7, b"x");
        assert!(!is_echo_reply_v6(&reply, 0x1234, 7));
        reply[0] = 129;
        assert!(is_echo_reply_v6(&reply, 0x1234, 7));
        assert!(!is_echo_reply_v6(&reply, 0x1234, 8));
    }

    #[test]
    fn recognises_its_echo_reply() {
        let mut reply = vec![0x45u8; 20];
        reply.extend_from_slice(&[0, 0, 0, 0, 0x12, 0x34, 0, 7]);
        assert!(is_echo_reply(&reply, 0x1234, 7));
        assert!(!is_echo_reply(&reply, 0x1234, 8));
        reply[20] = 8;
        assert!(!is_echo_reply(&reply, 0x1234, 7));
        assert!(!is_echo_reply(&reply[..24], 0x1234, 7));
    }
}
