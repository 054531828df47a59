//! The probes themselves: one TCP connect, one UDP exchange or one ICMP echo, bounded by a
//! timeout. Each function blocks and must run on a thread inside the source's network
//! namespace (see [`crate::netns::run_in`]): the socket it creates belongs to that namespace.
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{
    AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType, SockaddrIn, bind, connect, getsockname, getsockopt,
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
    /// CLOCK_MONOTONIC when the probe started, in ns (the clock of verdict events).
    pub started_ns: u64,
    pub elapsed: Duration,
}

/// CLOCK_MONOTONIC in nanoseconds, the clock `bpf_ktime_get_ns` uses.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
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
        let n = unsafe { libc::poll(&mut p, 1, ms) };
        match n {
            0 => return Ok(false),
            n if n > 0 => return Ok(true),
            _ => match Errno::last() {
                Errno::EINTR => continue,
                e => return Err(e),
            },
        }
    }
}

fn finish(attempt: Attempt, local_port: Option<u16>, started_ns: u64, t0: Instant) -> ProbeRun {
    ProbeRun { attempt, local_port, started_ns, elapsed: t0.elapsed() }
}

/// A TCP connect to `dst`: allowed when the handshake completes within `timeout`.
pub fn tcp(dst: SocketAddrV4, timeout: Duration) -> ProbeRun {
    let t0 = Instant::now();
    let started = monotonic_ns();
    let fail = |what: &str, e: Errno, port| finish(Attempt::Failed(format!("{what}: {e}")), port, started, t0);
    let fd: OwnedFd =
        match socket(AddressFamily::Inet, SockType::Stream, SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC, None) {
            Ok(fd) => fd,
            Err(e) => return fail("creating a TCP socket", e, None),
        };
    // Bind first so that the source port is known even when the handshake never completes.
    if let Err(e) = bind(fd.as_raw_fd(), &SockaddrIn::new(0, 0, 0, 0, 0)) {
        return fail("binding a TCP socket", e, None);
    }
    let port = getsockname::<SockaddrIn>(fd.as_raw_fd()).ok().map(|a| a.port());
    match connect(fd.as_raw_fd(), &SockaddrIn::from(dst)) {
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
pub fn udp(dst: SocketAddrV4, token: &[u8], timeout: Duration) -> ProbeRun {
    let t0 = Instant::now();
    let started = monotonic_ns();
    let fail = |what: &str, e: std::io::Error, port| finish(Attempt::Failed(format!("{what}: {e}")), port, started, t0);
    let sock = match UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)) {
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

/// ICMP echo request to `dst` with identifier `ident`: allowed when the matching echo reply
/// comes back within `timeout`. Uses a raw socket (the testbed runs as root).
pub fn icmp_echo(dst: Ipv4Addr, ident: u16, seq: u16, timeout: Duration) -> ProbeRun {
    let t0 = Instant::now();
    let started = monotonic_ns();
    let fail = |what: &str, e: Errno| finish(Attempt::Failed(format!("{what}: {e}")), None, started, t0);
    let fd = match socket(AddressFamily::Inet, SockType::Raw, SockFlag::SOCK_CLOEXEC, SockProtocol::Icmp) {
        Ok(fd) => fd,
        Err(e) => return fail("creating a raw ICMP socket", e),
    };
    let request = echo_request(ident, seq, b"palisade-testbed");
    if let Err(e) = sendto(fd.as_raw_fd(), &request, &SockaddrIn::from(SocketAddrV4::new(dst, 0)), MsgFlags::empty()) {
        return fail("sending the echo request", e);
    }
    let deadline = t0 + timeout;
    let mut buf = [0u8; 2048];
    loop {
        match wait_ready(&fd, libc::POLLIN, deadline) {
            Ok(false) => return finish(Attempt::NoAnswer, None, started, t0),
            Err(e) => return fail("waiting for the echo reply", e),
            Ok(true) => {}
        }
        match recvfrom::<SockaddrIn>(fd.as_raw_fd(), &mut buf) {
            Ok((n, Some(from))) if from.ip() == dst && is_echo_reply(&buf[..n], ident, seq) => {
                return finish(Attempt::Answered, None, started, t0);
            }
            Ok(_) | Err(Errno::EINTR) | Err(Errno::EAGAIN) => {}
            Err(e) => return fail("receiving", e),
        }
    }
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
