//! The stateful datapath with real packets between pods, the real agent binary in charge:
//! an established TCP connection is cut when its allow goes away (and carries on when it
//! comes back), a UDP datagram larger than the MTU arrives in fragments at an allowed port
//! and never at a denied one, and a pod sending from an address that is not its own is
//! stopped at its own interface. IPv4 and IPv6 alike. Needs root and the binaries built
//! (`cargo build --bins`).
mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use common::*;
use palisade_api::types::MonitorEvent;
use palisade_testbed::netns::{self, Netns};
use palisade_testbed::probe::{internet_checksum, raw_socket};
use palisade_testbed::scenario::Plan;
use palisade_testbed::session::Session;

/// A TCP port the test serves itself (the testbed's own TCP listeners close at once).
const ECHO_TCP: u16 = 8080;
/// UDP ports with the testbed's echo listeners: 5000 allowed, 5001 not.
const UDP_ALLOWED: u16 = 5000;
const UDP_DENIED: u16 = 5001;
/// Larger than the 1500-byte MTU of the pods' interfaces: sent in fragments.
const BIG: usize = 4000;
/// How long "nothing arrives" is waited for.
const QUIET: Duration = Duration::from_millis(1500);
/// How long an expected event or answer may take.
const WAIT: Duration = Duration::from_secs(10);

const POLICY: &str = include_str!("scenarios/datapath-live-policy.yaml");

fn scenario() -> String {
    let policy: palisade_policy::yaml::Value =
        palisade_policy::yaml::from_str(&POLICY.replace("PORT", &ECHO_TCP.to_string())).unwrap();
    format!(
        r"
name: datapath-live
ipFamilies: [IPv4, IPv6]
namespaces: {{default: {{}}}}
pods:
  - {{name: client, namespace: default, labels: {{app: client}}}}
  - name: server
    namespace: default
    labels: {{app: server}}
    ports: [{{port: {UDP_ALLOWED}, protocol: UDP}}, {{port: {UDP_DENIED}, protocol: UDP}}]
  - {{name: bystander, namespace: default, labels: {{app: bystander}}}}
policies:
  - {}
probes:
  - {{from: default/client, to: default/server, port: {UDP_ALLOWED}, protocol: UDP, expect: allow}}
  - {{from: default/client, to: default/server, port: {UDP_DENIED}, protocol: UDP, expect: deny}}
",
        serde_json::to_string(&policy).unwrap()
    )
}

/// The scenario up, with the agent; `body` runs inside, then everything is taken down and
/// checked gone.
fn with_session(tag: &str, body: impl AsyncFnOnce(&Session, &Plan)) {
    let (plan, names, mut opts) = agent_run(&scenario(), tag, &[]);
    opts.timeout = Duration::from_millis(1500);
    let rt = runtime();
    rt.block_on(async {
        let session = Session::up(&plan, &opts, &names).await.expect("the scenario comes up");
        body(&session, &plan).await;
        session.down().await;
    });
    assert_eq!(netns::list_with_prefix(&names.prefix), Vec::<String>::new());
}

/// The namespace and addresses of pod `name` (namespace default).
fn pod<'a>(session: &'a Session, plan: &Plan, name: &str) -> (&'a Netns, Ipv4Addr, Ipv6Addr) {
    let i = plan.pods.iter().position(|p| p.name == name).unwrap_or_else(|| panic!("pod {name}"));
    let p = &session.topology().pods[i];
    (&p.netns, p.ipv4.expect("IPv4 address"), p.ipv6.expect("IPv6 address"))
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

/// Serves one connection on `listener`: echoes what it reads until EOF or a bounded time.
fn echo_one(listener: TcpListener) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        listener.set_nonblocking(false).unwrap();
        let Ok((mut conn, _)) = listener.accept() else { return };
        conn.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        let end = Instant::now() + Duration::from_mins(1);
        let mut buf = [0u8; 1024];
        while Instant::now() < end {
            match conn.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    if conn.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
                Err(e) if is_timeout(&e) => {}
                Err(_) => return,
            }
        }
    })
}

/// Reads exactly `want.len()` bytes within `limit`; `Err` with what came when it did not.
fn read_exactly(conn: &mut TcpStream, want: &[u8], limit: Duration) -> Result<(), String> {
    let end = Instant::now() + limit;
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while got.len() < want.len() {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("got {:?} of {:?} within {limit:?}", String::from_utf8_lossy(&got), want));
        }
        conn.set_read_timeout(Some(left.min(Duration::from_millis(200)))).unwrap();
        match conn.read(&mut buf) {
            Ok(0) => return Err(format!("connection closed after {got:?}")),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if is_timeout(&e) => {}
            Err(e) => return Err(format!("reading: {e}")),
        }
    }
    if got == want { Ok(()) } else { Err(format!("got {got:?}, wanted {want:?}")) }
}

fn drop_at_server(ev: &MonitorEvent, reason: &str, protocol: &str, port: u16) -> bool {
    ev.verdict == "drop"
        && ev.reason == reason
        && ev.endpoint.as_deref() == Some("default/server")
        && ev.direction == "ingress"
        && ev.protocol == protocol
        && ev.dst_port == port
}

#[test]
fn removing_an_allow_cuts_an_established_connection_privileged() {
    palisade_privileged::require_root!();
    with_session("rv", async |session, plan| {
        let (server_ns, server4, server6) = pod(session, plan, "server");
        let (client_ns, _, _) = pod(session, plan, "client");
        let policy_file = plan.policies[0].file_name.clone();
        for (round, server) in [IpAddr::V4(server4), IpAddr::V6(server6)].into_iter().enumerate() {
            let bind = SocketAddr::new(
                if server.is_ipv4() { Ipv4Addr::UNSPECIFIED.into() } else { Ipv6Addr::UNSPECIFIED.into() },
                ECHO_TCP,
            );
            let listener =
                server_ns.run(move || TcpListener::bind(bind)).unwrap().expect("listening in the server pod");
            let echo = echo_one(listener);
            let to = SocketAddr::new(server, ECHO_TCP);
            let mut conn = client_ns
                .run(move || TcpStream::connect_timeout(&to, Duration::from_secs(5)))
                .unwrap()
                .unwrap_or_else(|e| panic!("connecting to {to}: {e}"));
            conn.write_all(b"hello").unwrap();
            read_exactly(&mut conn, b"hello", WAIT).unwrap_or_else(|e| panic!("{to} before the change: {e}"));

            // The allow moves to another port: the established connection's next segment is
            // dropped at the server's ingress, by policy, and nothing comes back.
            let other = POLICY.replace("PORT", &(ECHO_TCP + 1).to_string());
            let st = session.write_policy_file(&policy_file, &other).await.expect("the agent takes the edit in");
            assert!(st.enforced, "{st:?}");
            conn.write_all(b"again").unwrap();
            let sport = conn.local_addr().unwrap().port();
            session
                .wait_for_event(WAIT, |ev| {
                    drop_at_server(ev, "policy-denied", "TCP", ECHO_TCP)
                        && ev.src_port == sport
                        && ev.dst == server.to_string()
                })
                .await
                .unwrap_or_else(|| panic!("{to}: no policy drop of the established connection at the server"));
            assert!(
                read_exactly(&mut conn, b"again", QUIET).is_err(),
                "{to}: the revoked connection still carried data"
            );

            // The allow comes back: TCP retransmits and the same connection carries on.
            let back = POLICY.replace("PORT", &ECHO_TCP.to_string());
            session.write_policy_file(&policy_file, &back).await.expect("the agent takes the edit in");
            read_exactly(&mut conn, b"again", WAIT)
                .unwrap_or_else(|e| panic!("{to}: the connection did not recover (round {round}): {e}"));
            let _ = conn.shutdown(Shutdown::Both);
            drop(conn);
            echo.join().unwrap();
        }
    });
}

/// Reassembled datagrams so far in the calling thread's namespace (IPv4 and IPv6).
fn reassembled() -> (u64, u64) {
    fn field(path: &str, name: &str) -> u64 {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        // snmp: a header line of names and a line of values per protocol; snmp6: name value.
        let lines: Vec<&str> = text.lines().collect();
        for pair in lines.windows(2) {
            let (names, values) = (pair[0], pair[1]);
            if names.starts_with("Ip: ") && values.starts_with("Ip: ") {
                let i = names.split_whitespace().position(|n| n == name);
                if let Some(i) = i {
                    return values.split_whitespace().nth(i).and_then(|v| v.parse().ok()).unwrap_or(0);
                }
            }
        }
        lines.iter().find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok())).unwrap_or(0)
    }
    (field("/proc/thread-self/net/snmp", "ReasmOKs"), field("/proc/thread-self/net/snmp6", "Ip6ReasmOKs"))
}

#[test]
fn fragmented_datagrams_arrive_only_where_allowed_privileged() {
    palisade_privileged::require_root!();
    with_session("fr", async |session, plan| {
        let (server_ns, server4, server6) = pod(session, plan, "server");
        let (client_ns, _, _) = pod(session, plan, "client");
        for server in [IpAddr::V4(server4), IpAddr::V6(server6)] {
            let (v4_before, v6_before) = server_ns.run(reassembled).unwrap();
            let bind = SocketAddr::new(
                if server.is_ipv4() { Ipv4Addr::UNSPECIFIED.into() } else { Ipv6Addr::UNSPECIFIED.into() },
                0,
            );
            let sock = client_ns.run(move || UdpSocket::bind(bind)).unwrap().unwrap();
            sock.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
            let payload: Vec<u8> = (0..BIG).map(|i| (i % 251) as u8).collect();

            // Allowed port: the datagram arrives (the server reassembled it) and its echo,
            // fragmented as well, comes back through conntrack.
            sock.send_to(&payload, SocketAddr::new(server, UDP_ALLOWED)).unwrap();
            let mut buf = vec![0u8; BIG + 100];
            let end = Instant::now() + WAIT;
            let got = loop {
                match sock.recv_from(&mut buf) {
                    Ok((n, _)) => break Some(n),
                    Err(e) if is_timeout(&e) && Instant::now() < end => {}
                    Err(_) => break None,
                }
            };
            assert_eq!(got, Some(BIG), "{server}: the fragmented datagram to an allowed port did not come back whole");
            assert_eq!(&buf[..BIG], &payload[..]);
            let (v4_after, v6_after) = server_ns.run(reassembled).unwrap();
            if server.is_ipv4() {
                assert!(v4_after > v4_before, "the server reassembled no IPv4 datagram: it was not fragmented");
            } else {
                assert!(v6_after > v6_before, "the server reassembled no IPv6 datagram: it was not fragmented");
            }

            // Denied port: no fragment gets through (nothing echoes), and the drop is the
            // policy's, at the server's ingress.
            sock.send_to(&payload, SocketAddr::new(server, UDP_DENIED)).unwrap();
            let end = Instant::now() + QUIET;
            while Instant::now() < end {
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    panic!("{server}: {n} bytes came back from {from} through a denied port");
                }
            }
            let sport = sock.local_addr().unwrap().port();
            session
                .wait_for_event(WAIT, |ev| {
                    drop_at_server(ev, "policy-denied", "UDP", UDP_DENIED)
                        && ev.src_port == sport
                        && ev.dst == server.to_string()
                })
                .await
                .unwrap_or_else(|| panic!("{server}: no policy drop for the fragmented datagram to a denied port"));
            let (v4_end, v6_end) = server_ns.run(reassembled).unwrap();
            assert_eq!(
                (v4_end, v6_end),
                (v4_after, v6_after),
                "{server}: fragments of the denied datagram were reassembled"
            );
        }
    });
}

/// An IPv4 UDP packet from `src` to `dst` (checksum left 0, which IPv4 allows).
fn udp4(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let total = 20 + 8 + payload.len();
    let mut p = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0];
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    let sum = internet_checksum(&p);
    p[10..12].copy_from_slice(&sum.to_be_bytes());
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(payload);
    p
}

/// An IPv6 UDP packet from `src` to `dst`, with its (mandatory) checksum.
fn udp6(src: Ipv6Addr, dst: Ipv6Addr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let len = (8 + payload.len()) as u16;
    let mut udp = Vec::new();
    udp.extend_from_slice(&sport.to_be_bytes());
    udp.extend_from_slice(&dport.to_be_bytes());
    udp.extend_from_slice(&len.to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&u32::from(len).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, 17]);
    pseudo.extend_from_slice(&udp);
    let sum = match internet_checksum(&pseudo) {
        0 => 0xffff,
        s => s,
    };
    udp[6..8].copy_from_slice(&sum.to_be_bytes());
    let mut p = vec![0x60, 0, 0, 0];
    p.extend_from_slice(&len.to_be_bytes());
    p.extend_from_slice(&[17, 64]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&udp);
    p
}

/// Sends `packet` (IP header included) to `dst` from a raw socket in the calling thread's
/// namespace.
fn send_raw(dst: IpAddr, packet: &[u8]) -> std::io::Result<()> {
    let domain = if dst.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    // IPPROTO_RAW: the packet carries its own IP header.
    let fd = raw_socket(domain, libc::IPPROTO_RAW, false)?;
    let to = nix::sys::socket::SockaddrStorage::from(SocketAddr::new(dst, 0));
    nix::sys::socket::sendto(fd.as_raw_fd(), packet, &to, nix::sys::socket::MsgFlags::empty())?;
    Ok(())
}

#[test]
fn a_pod_cannot_send_from_another_address_privileged() {
    palisade_privileged::require_root!();
    with_session("sp", async |session, plan| {
        let (client_ns, client4, client6) = pod(session, plan, "client");
        let (_, bystander4, bystander6) = pod(session, plan, "bystander");
        let (_, server4, server6) = pod(session, plan, "server");
        let cases: [(IpAddr, IpAddr, IpAddr); 2] =
            [(client4.into(), bystander4.into(), server4.into()), (client6.into(), bystander6.into(), server6.into())];
        for (own, other, server) in cases {
            // Control: the same hand-made packet from the pod's own address is allowed and
            // echoed back to a socket bound there.
            let sock = client_ns.run(move || UdpSocket::bind(SocketAddr::new(own, 0))).unwrap().unwrap();
            sock.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
            let sport = sock.local_addr().unwrap().port();
            let packet = |src: IpAddr| match (src, server) {
                (IpAddr::V4(s), IpAddr::V4(d)) => udp4(s, d, sport, UDP_ALLOWED, b"spoof-test"),
                (IpAddr::V6(s), IpAddr::V6(d)) => udp6(s, d, sport, UDP_ALLOWED, b"spoof-test"),
                _ => unreachable!(),
            };
            let genuine = packet(own);
            client_ns.run(move || send_raw(server, &genuine)).unwrap().expect("sending the genuine packet");
            let mut buf = [0u8; 64];
            let end = Instant::now() + WAIT;
            let echoed = loop {
                match sock.recv_from(&mut buf) {
                    Ok((n, _)) => break &buf[..n] == b"spoof-test",
                    Err(e) if is_timeout(&e) && Instant::now() < end => {}
                    Err(_) => break false,
                }
            };
            assert!(echoed, "{own} -> {server}: the genuine hand-made packet was not answered");

            // The bystander's address as source: dropped at the client's own interface, as a
            // spoofed source (the server's policy would allow the client, not the bystander,
            // so only this reason shows the check works where it must).
            let spoofed = packet(other);
            client_ns.run(move || send_raw(server, &spoofed)).unwrap().expect("sending the spoofed packet");
            let ev = session
                .wait_for_event(WAIT, |ev| {
                    ev.verdict == "drop"
                        && ev.reason == "spoofed-source"
                        && ev.endpoint.as_deref() == Some("default/client")
                        && ev.direction == "egress"
                        && ev.src == other.to_string()
                })
                .await
                .unwrap_or_else(|| panic!("no spoofed-source drop at the client for source {other}"));
            assert_eq!((ev.dst.as_str(), ev.dst_port), (server.to_string().as_str(), UDP_ALLOWED), "{ev:?}");
        }
    });
}
