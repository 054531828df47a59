//! What the pods listen on: for every TCP port an accept loop (accept, note the peer,
//! close), for every UDP port an echo loop. The sockets are created inside the pod's
//! namespace and then served by tokio tasks; dropping [`Listeners`] stops every task and
//! closes every socket. Each arrival is noted, so a probe that fails can tell "nothing
//! reached the destination" from "the answer was lost".
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, Mutex};

use tokio::task::JoinSet;

use crate::error::SetupError;
use crate::netns::Netns;
use crate::scenario::{PodPort, PortProtocol};

/// Something that reached a listener.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Arrival {
    /// Index of the pod (host) that received it.
    pub host: usize,
    pub protocol: PortProtocol,
    pub local_port: u16,
    pub peer: SocketAddr,
}

/// The running listeners of a scenario.
#[derive(Default)]
pub struct Listeners {
    tasks: JoinSet<()>,
    arrivals: Arc<Mutex<Vec<Arrival>>>,
}

impl Listeners {
    pub fn new() -> Listeners {
        Listeners::default()
    }

    /// Opens the listeners of one host inside its namespace and starts serving them. Must be
    /// called from within the tokio runtime. SCTP ports get no listener (no SCTP sockets on
    /// this kernel: SCTP probes are checked by capture).
    pub fn start(&mut self, host: usize, netns: &Netns, ports: &[PodPort]) -> Result<(), SetupError> {
        let wanted: Vec<(u16, PortProtocol)> =
            ports.iter().filter(|p| p.protocol != PortProtocol::SCTP).map(|p| (p.port, p.protocol)).collect();
        let ns_name = netns.name().to_string();
        let sockets = netns.run(move || {
            wanted
                .into_iter()
                .map(|(port, protocol)| {
                    let addr = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port);
                    let opened = match protocol {
                        PortProtocol::TCP => std::net::TcpListener::bind(addr).map(Socket::Tcp),
                        _ => std::net::UdpSocket::bind(addr).map(Socket::Udp),
                    };
                    opened.map_err(|source| SetupError::Io {
                        what: format!("listening on {port}/{protocol} in network namespace {ns_name}"),
                        source,
                    })
                })
                .collect::<Result<Vec<_>, _>>()
        })??;
        for socket in sockets {
            self.serve(host, socket)?;
        }
        Ok(())
    }

    fn serve(&mut self, host: usize, socket: Socket) -> Result<(), SetupError> {
        let arrivals = self.arrivals.clone();
        match socket {
            Socket::Tcp(l) => {
                l.set_nonblocking(true).map_err(SetupError::io("setting a listener non-blocking"))?;
                let local_port = l.local_addr().map_err(SetupError::io("reading a listener's address"))?.port();
                let l = tokio::net::TcpListener::from_std(l).map_err(SetupError::io("registering a listener"))?;
                self.tasks.spawn(async move {
                    while let Ok((stream, peer)) = l.accept().await {
                        note(&arrivals, Arrival { host, protocol: PortProtocol::TCP, local_port, peer });
                        drop(stream);
                    }
                });
            }
            Socket::Udp(s) => {
                s.set_nonblocking(true).map_err(SetupError::io("setting a socket non-blocking"))?;
                let local_port = s.local_addr().map_err(SetupError::io("reading a socket's address"))?.port();
                let s = tokio::net::UdpSocket::from_std(s).map_err(SetupError::io("registering a socket"))?;
                self.tasks.spawn(async move {
                    let mut buf = vec![0u8; 2048];
                    while let Ok((n, peer)) = s.recv_from(&mut buf).await {
                        note(&arrivals, Arrival { host, protocol: PortProtocol::UDP, local_port, peer });
                        let _ = s.send_to(&buf[..n], peer).await;
                    }
                });
            }
        }
        Ok(())
    }

    /// Whether anything from `peer` reached `host` on `local_port`/`protocol`.
    pub fn arrived(&self, host: usize, protocol: PortProtocol, local_port: u16, peer: SocketAddr) -> bool {
        let want = Arrival { host, protocol, local_port, peer };
        self.arrivals.lock().unwrap_or_else(|e| e.into_inner()).contains(&want)
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
}

/// At most this many arrivals are kept (probes are bounded; this bounds a flood too).
const MAX_ARRIVALS: usize = 100_000;

fn note(arrivals: &Mutex<Vec<Arrival>>, a: Arrival) {
    let mut v = arrivals.lock().unwrap_or_else(|e| e.into_inner());
    if v.len() < MAX_ARRIVALS {
        v.push(a);
    }
}
