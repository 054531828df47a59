//! What hosts listen on: for every TCP port an accept loop (accept, note the peer, close),
//! for every UDP port an echo loop, and for SCTP a packet capture (this kernel has no SCTP
//! sockets: an SCTP probe is a crafted INIT, and "received" means the capture saw it).
//! The sockets are created inside the host's namespace and then served by tokio tasks;
//! dropping [`Listeners`] stops every task and closes every socket. Each arrival is noted
//! with its time, so a probe that fails can tell "nothing reached the destination" from
//! "the answer was lost", and an SCTP probe can wait for its INIT to arrive.
//!
//! Where SCTP is captured: in a pod's or other host's namespace, an `AF_PACKET` socket on
//! its only interface `eth0` (the datapath has judged the packet on the node's side of the
//! veth before it gets there). In the node's own namespace (`entity:host`) a packet
//! capture would see packets *before* the tc programs of the pods' host-side interfaces
//! judge them, so there a raw `IPPROTO_SCTP` socket sees what the node's stack receives.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::error::SetupError;
use crate::netns::Netns;
use crate::probe::{self, monotonic_ns};
use crate::scenario::{PodPort, PortProtocol};

/// Something that reached a listener or a capture.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Arrival {
    /// Key of the host that received it (see [`crate::scenario::Plan::host_key`]).
    pub host: usize,
    pub protocol: PortProtocol,
    pub local_port: u16,
    pub peer: SocketAddr,
    /// SCTP: the INIT's initiate tag.
    pub tag: Option<u32>,
    /// `CLOCK_MONOTONIC`, ns.
    pub at_ns: u64,
}

/// What a probe looks for among the arrivals.
#[derive(Clone, Debug)]
pub struct Wanted {
    pub host: usize,
    pub protocol: PortProtocol,
    pub local_port: u16,
    pub peer: SocketAddr,
    pub tag: Option<u32>,
    pub since_ns: u64,
}

impl Wanted {
    fn matches(&self, a: &Arrival) -> bool {
        a.host == self.host
            && a.protocol == self.protocol
            && a.local_port == self.local_port
            && a.peer == self.peer
            && (self.tag.is_none() || a.tag == self.tag)
            && a.at_ns >= self.since_ns
    }
}

/// The running listeners of a scenario.
pub struct Listeners {
    tasks: JoinSet<()>,
    arrivals: Arc<Mutex<Vec<Arrival>>>,
    count: watch::Sender<usize>,
}

impl Default for Listeners {
    fn default() -> Self {
        Listeners { tasks: JoinSet::new(), arrivals: Arc::default(), count: watch::Sender::new(0) }
    }
}

/// A host's namespace as the listeners need it.
#[derive(Clone, Copy, Debug)]
pub struct ListenOn<'a> {
    pub key: usize,
    pub netns: &'a Netns,
    /// IPv6 is on in the namespace: sockets are dual-stack (`[::]`).
    pub ipv6: bool,
    /// The node's own namespace (SCTP seen by a raw socket, not a capture on `eth0`).
    pub is_node: bool,
}

impl Listeners {
    pub fn new() -> Listeners {
        Listeners::default()
    }

    /// Opens the listeners of one host inside its namespace and starts serving them. Must be
    /// called from within the tokio runtime.
    pub fn start(&mut self, on: ListenOn<'_>, ports: &[PodPort]) -> Result<(), SetupError> {
        let wanted: Vec<(u16, PortProtocol)> =
            ports.iter().filter(|p| p.protocol != PortProtocol::SCTP).map(|p| (p.port, p.protocol)).collect();
        let sctp = ports.iter().any(|p| p.protocol == PortProtocol::SCTP);
        let ns_name = on.netns.name().to_string();
        let (ipv6, is_node) = (on.ipv6, on.is_node);
        let sockets = on.netns.run(move || {
            let mut out = Vec::new();
            for (port, protocol) in wanted {
                // Dual-stack when IPv6 is on (bindv6only is 0): one socket for both families.
                let ip = if ipv6 { IpAddr::V6(Ipv6Addr::UNSPECIFIED) } else { IpAddr::V4(Ipv4Addr::UNSPECIFIED) };
                let addr = SocketAddr::new(ip, port);
                let opened = match protocol {
                    PortProtocol::TCP => std::net::TcpListener::bind(addr).map(Socket::Tcp),
                    _ => std::net::UdpSocket::bind(addr).map(Socket::Udp),
                };
                out.push(opened.map_err(|source| SetupError::Io {
                    what: format!("listening on {port}/{protocol} in network namespace {ns_name}"),
                    source,
                })?);
            }
            if sctp {
                let captures = if is_node {
                    let mut v = vec![probe::raw_socket(libc::AF_INET, probe::IPPROTO_SCTP, true)];
                    if ipv6 {
                        v.push(probe::raw_socket(libc::AF_INET6, probe::IPPROTO_SCTP, true));
                    }
                    v
                } else {
                    vec![capture_socket("eth0")]
                };
                for c in captures {
                    out.push(Socket::Capture(c.map_err(|source| SetupError::Io {
                        what: format!("capturing SCTP in network namespace {ns_name}"),
                        source,
                    })?));
                }
            }
            Ok::<_, SetupError>(out)
        })??;
        for socket in sockets {
            self.serve(on.key, socket)?;
        }
        Ok(())
    }

    fn serve(&mut self, host: usize, socket: Socket) -> Result<(), SetupError> {
        let arrivals = Noter { arrivals: self.arrivals.clone(), count: self.count.clone() };
        match socket {
            Socket::Tcp(l) => {
                l.set_nonblocking(true).map_err(SetupError::io("setting a listener non-blocking"))?;
                let local_port = l.local_addr().map_err(SetupError::io("reading a listener's address"))?.port();
                let l = tokio::net::TcpListener::from_std(l).map_err(SetupError::io("registering a listener"))?;
                self.tasks.spawn(async move {
                    while let Ok((stream, peer)) = l.accept().await {
                        arrivals.note(host, PortProtocol::TCP, local_port, peer, None);
                        drop(stream);
                    }
                });
            }
            Socket::Udp(s) => {
                s.set_nonblocking(true).map_err(SetupError::io("setting a socket non-blocking"))?;
                let local_port = s.local_addr().map_err(SetupError::io("reading a socket's address"))?.port();
                let s = tokio::net::UdpSocket::from_std(s).map_err(SetupError::io("registering a socket"))?;
                self.tasks.spawn(async move {
                    // Room for the largest datagram: big ones (sent in fragments) echo whole.
                    let mut buf = vec![0u8; 65_536];
                    while let Ok((n, peer)) = s.recv_from(&mut buf).await {
                        arrivals.note(host, PortProtocol::UDP, local_port, peer, None);
                        let _ = s.send_to(&buf[..n], peer).await;
                    }
                });
            }
            Socket::Capture(fd) => {
                // SAFETY: the `OwnedFd` is moved into the `AsyncFd`, which owns it (and its
                // descriptor stays the same) until the `AsyncFd` is dropped.
                let fd = unsafe { AsyncFd::register(fd) }.map_err(|e| SetupError::Io {
                    what: "registering a capture socket".into(),
                    source: std::io::Error::other(e.to_string()),
                })?;
                self.tasks.spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    loop {
                        let Ok(mut ready) = fd.readable().await else { return };
                        match ready.try_io(|fd| recv_packet(fd.get_ref(), &mut buf)) {
                            Ok(Ok(packet)) => {
                                if let Some(init) = packet {
                                    let peer = SocketAddr::new(init.src, init.src_port);
                                    arrivals.note(host, PortProtocol::SCTP, init.dst_port, peer, Some(init.tag));
                                }
                            }
                            Ok(Err(e)) if e.kind() == std::io::ErrorKind::Interrupted => {}
                            Ok(Err(_)) => return,
                            Err(_would_block) => {}
                        }
                    }
                });
            }
        }
        Ok(())
    }

    /// Whether what `want` describes has arrived.
    pub fn arrived(&self, want: &Wanted) -> bool {
        self.arrivals.lock().unwrap_or_else(std::sync::PoisonError::into_inner).iter().any(|a| want.matches(a))
    }

    /// Waits up to `timeout` for what `want` describes to arrive.
    pub async fn wait_arrival(&self, want: &Wanted, timeout: Duration) -> bool {
        let mut count = self.count.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            count.borrow_and_update();
            if self.arrived(want) {
                return true;
            }
            if tokio::time::timeout_at(deadline, count.changed()).await.is_err() {
                return self.arrived(want);
            }
        }
    }

    /// Stops every listener and closes its socket.
    pub async fn stop(mut self) {
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
    }
}

enum Socket {
    Tcp(std::net::TcpListener),
    Udp(std::net::UdpSocket),
    /// A packet capture or raw socket that sees SCTP INITs.
    Capture(OwnedFd),
}

/// At most this many arrivals are kept (probes are bounded; this bounds a flood too).
const MAX_ARRIVALS: usize = 100_000;

#[derive(Clone)]
struct Noter {
    arrivals: Arc<Mutex<Vec<Arrival>>>,
    count: watch::Sender<usize>,
}

impl Noter {
    fn note(&self, host: usize, protocol: PortProtocol, local_port: u16, peer: SocketAddr, tag: Option<u32>) {
        // Dual-stack sockets show IPv4 peers as ::ffff:a.b.c.d.
        let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
        let a = Arrival { host, protocol, local_port, peer, tag, at_ns: monotonic_ns() };
        let mut v = self.arrivals.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if v.len() < MAX_ARRIVALS {
            v.push(a);
        }
        let n = v.len();
        drop(v);
        self.count.send_replace(n);
    }
}

/// `ETH_P_ALL` in network byte order, as `AF_PACKET` wants it.
const ETH_P_ALL_BE: u16 = (libc::ETH_P_ALL as u16).to_be();

/// An `AF_PACKET` datagram socket (no link-layer header) on interface `dev` of the
/// calling thread's namespace, non-blocking.
fn capture_socket(dev: &str) -> std::io::Result<OwnedFd> {
    let name = std::ffi::CString::new(dev).map_err(std::io::Error::other)?;
    // SAFETY: a valid NUL-terminated name.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: plain socket(2) call; the result is checked and owned at once.
    let raw = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            i32::from(ETH_P_ALL_BE),
        )
    };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is a new, valid descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: zeroed sockaddr_ll is valid; the fields are then set.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = ETH_P_ALL_BE;
    sll.sll_ifindex = ifindex as i32;
    // SAFETY: `sll` is a valid sockaddr_ll of the given size.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw const sll).cast::<libc::sockaddr>(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}

/// Reads one packet from a capture (`AF_PACKET`) or raw (`AF_INET`/`AF_INET6`) socket and
/// returns the SCTP INIT in it, if it is one that came in.
fn recv_packet(fd: &OwnedFd, buf: &mut [u8]) -> std::io::Result<Option<probe::SctpInit>> {
    // SAFETY: zeroed sockaddr_storage is valid; recvfrom writes at most `len` bytes of it.
    let mut from: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: `buf` and `from` are valid for writes of the given sizes.
    let n = unsafe {
        libc::recvfrom(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            0,
            (&raw mut from).cast::<libc::sockaddr>(),
            &raw mut len,
        )
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let data = &buf[..n as usize];
    Ok(match i32::from(from.ss_family) {
        libc::AF_PACKET => {
            // SAFETY: the kernel filled a sockaddr_ll for an AF_PACKET socket.
            let sll = unsafe { &*(&raw const from).cast::<libc::sockaddr_ll>() };
            if sll.sll_pkttype == libc::PACKET_OUTGOING { None } else { probe::parse_sctp_init_ip(data) }
        }
        // Raw IPv4 sockets deliver the IP header, raw IPv6 ones only the payload.
        libc::AF_INET => probe::parse_sctp_init_ip(data),
        libc::AF_INET6 => {
            // SAFETY: the kernel filled a sockaddr_in6 for an AF_INET6 socket.
            let sin6 = unsafe { &*(&raw const from).cast::<libc::sockaddr_in6>() };
            probe::parse_sctp_init(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)), data)
        }
        _ => None,
    })
}
