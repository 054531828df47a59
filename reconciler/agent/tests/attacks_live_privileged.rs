//! The kernel's side of the attack suite (needs root and bpffs): real frames sent from a
//! pod's network namespace on a raw socket, received (or not) by a real socket on the node.
//! Each test first shows the attack working without the programs, then blocked with them,
//! with the reason the datapath counted.
//!
//! The "node" is a throwaway network namespace of the test's thread (gone with it); the
//! "pod" is a named namespace removed by a guard, also on panic. Nothing touches the root
//! namespace.
mod common;
#[path = "common/frames.rs"]
mod frames;

use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::Duration;

use common::PinDir;
use frames::*;
use palisade_agent::datapath::Datapath;
use palisade_common::{EndpointInfo, direction, endpoint_flags, proto, reason};

const NODE_IP: [u8; 4] = [10, 200, 0, 1];
const POD_IP: [u8; 4] = [10, 200, 0, 2];
const HOST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const POD_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

/// The pod's namespace, deleted on drop.
struct PodNs(String);

impl Drop for PodNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Runs `f` on a thread in a new network namespace of its own (the node), deleted with
/// everything in it when the thread ends.
fn in_node_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let handle = std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
        f()
    });
    match handle.join() {
        Ok(v) => v,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Builds node <-> pod: `pal-h9` in the node (10.200.0.1/24), `pal-p9` in the pod
/// (10.200.0.2/24). Returns the pod namespace and the host side's ifindex.
fn topology() -> (PodNs, u32) {
    let ns = PodNs(format!("pal-live-{}", std::process::id()));
    ip(&["netns", "add", &ns.0]);
    ip(&["link", "add", "pal-h9", "address", "02:00:00:00:00:01", "type", "veth", "peer", "name", "pal-p9"]);
    ip(&["link", "set", "pal-p9", "netns", &ns.0]);
    ip(&["addr", "add", "10.200.0.1/24", "dev", "pal-h9"]);
    ip(&["link", "set", "pal-h9", "up"]);
    ip(&["link", "set", "lo", "up"]);
    let n = ns.0.as_str();
    ip(&["-n", n, "link", "set", "pal-p9", "address", "02:00:00:00:00:02"]);
    ip(&["-n", n, "addr", "add", "10.200.0.2/24", "dev", "pal-p9"]);
    ip(&["-n", n, "link", "set", "pal-p9", "up"]);
    ip(&["-n", n, "link", "set", "lo", "up"]);
    let ifindex = palisade_agent::datapath::ifindex("pal-h9").expect("veth exists");
    (ns, ifindex)
}

fn ipv4_checksum(h: &mut [u8]) {
    h[10] = 0;
    h[11] = 0;
    let mut sum: u32 = h.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], c[1]]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    h[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
}

/// A UDP datagram from the pod to the node's port, with `tags` in the frame.
fn udp_frame(tags: &[(u16, u16)], port: u16, payload: &[u8]) -> Vec<u8> {
    let mut packet = ipv4_packet(POD_IP, NODE_IP, proto::UDP, &[], 0, 7, &udp(40000, port, payload));
    ipv4_checksum(&mut packet[..20]);
    let mut f = ethernet_tagged(tags, ETH_IPV4, &packet);
    f[..6].copy_from_slice(&HOST_MAC);
    f[6..12].copy_from_slice(&POD_MAC);
    f
}

/// Sends `frame` on the pod's interface through an `AF_PACKET` socket, from the pod's namespace.
fn send_from_pod(ns: &str, frame: Vec<u8>) {
    send_raw(ns, "pal-p9", frame);
}

/// Sends `frame` on `ifname` of the namespace `ns` through an `AF_PACKET` socket.
fn send_raw(ns: &str, ifname: &'static str, frame: Vec<u8>) {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let f = std::fs::File::open(&path).expect("open the netns");
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let ifindex = palisade_agent::datapath::ifindex(ifname).expect("interface");
        // SAFETY: plain socket calls with valid arguments; the descriptor is closed below.
        unsafe {
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
            assert!(fd >= 0, "AF_PACKET socket: {}", std::io::Error::last_os_error());
            let mut addr: libc::sockaddr_ll = std::mem::zeroed();
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_ifindex = ifindex as i32;
            addr.sll_halen = 6;
            addr.sll_addr[..6].copy_from_slice(&frame[..6]);
            let n = libc::sendto(
                fd,
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&raw const addr).cast(),
                size_of::<libc::sockaddr_ll>() as u32,
            );
            let err = std::io::Error::last_os_error();
            libc::close(fd);
            assert_eq!(n, frame.len() as isize, "sendto: {err}");
        }
    })
    .join()
    .expect("sender thread");
}

/// What the node's socket received within a short, bounded wait.
fn received(sock: &UdpSocket) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = [0u8; 2048];
    while let Ok(n) = sock.recv(&mut buf) {
        out.push(buf[..n].to_vec());
    }
    out
}

#[test]
fn attack_double_vlan_live_the_kernel_delivers_it_and_the_program_drops_it() {
    palisade_privileged::require_root!();
    in_node_netns(|| {
        let (ns, ifindex) = topology();
        let sock = UdpSocket::bind("10.200.0.1:9999").expect("bind on the node");
        sock.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
        let _ = sock.as_raw_fd();
        let qinq = [(TPID_8021Q, 0), (TPID_8021Q, 0)];
        let adq = [(TPID_8021AD, 0), (TPID_8021Q, 0)];

        // Without palisade: the kernel strips both tags and delivers the inner datagram.
        send_from_pod(&ns.0, udp_frame(&[], 9999, b"plain"));
        send_from_pod(&ns.0, udp_frame(&qinq, 9999, b"qinq"));
        send_from_pod(&ns.0, udp_frame(&adq, 9999, b"ad-q"));
        let got = received(&sock);
        let payloads: Vec<&[u8]> = got.iter().map(Vec::as_slice).collect();
        assert_eq!(payloads, vec![&b"plain"[..], b"qinq", b"ad-q"], "the kernel's side of the attack");

        // With palisade, the pod's egress enforced with no rule (default deny).
        let pins = PinDir::new("live");
        let mut dp = Datapath::load(&pins.config()).expect("load");
        dp.attach("pal-h9").expect("attach");
        let mut maps = dp.take_maps().expect("maps");
        let ep = EndpointInfo {
            endpoint_id: 9,
            identity: 1000,
            flags: endpoint_flags::EGRESS_ENFORCED | endpoint_flags::HAS_IPV4,
            ipv4: POD_IP,
            ipv6: [0; 16],
        };
        maps.endpoints.insert(ifindex, ep, 0).expect("endpoint");
        let count = |maps: &palisade_agent::datapath::MapSet, r| {
            maps.sum_counters().expect("counters").get(r, direction::EGRESS).packets
        };

        send_from_pod(&ns.0, udp_frame(&[], 9999, b"plain"));
        send_from_pod(&ns.0, udp_frame(&qinq, 9999, b"qinq"));
        send_from_pod(&ns.0, udp_frame(&adq, 9999, b"ad-q"));
        // One tag: the kernel moves it into the metadata, and policy judges what is inside.
        send_from_pod(&ns.0, udp_frame(&[(TPID_8021Q, 0)], 9999, b"one tag"));
        let got = received(&sock);
        assert!(got.is_empty(), "nothing reaches the node's socket: {got:?}");
        assert_eq!(count(&maps, reason::DROP_L2_UNSUPPORTED), 2, "both double-tagged frames");
        assert_eq!(count(&maps, reason::DROP_POLICY_DENIED), 2, "the plain and the single-tagged datagram");

        // The same pod under a policy that admits nothing but enforces nothing either: the
        // double-tagged frames are still outside the grammar.
        maps.endpoints.insert(ifindex, EndpointInfo { flags: endpoint_flags::HAS_IPV4, ..ep }, 0).expect("endpoint");
        send_from_pod(&ns.0, udp_frame(&qinq, 9999, b"qinq"));
        send_from_pod(&ns.0, udp_frame(&[], 9999, b"plain"));
        let got = received(&sock);
        let payloads: Vec<&[u8]> = got.iter().map(Vec::as_slice).collect();
        assert_eq!(payloads, vec![&b"plain"[..]], "unenforced: the plain datagram only");
        assert_eq!(count(&maps, reason::DROP_L2_UNSUPPORTED), 3);

        drop(maps);
        dp.detach("pal-h9").expect("detach");
        drop(dp);
        drop(pins);
        drop(ns);
    });
}

/// Runs `f` on a thread inside the named namespace `ns`.
fn in_named_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> std::thread::JoinHandle<T> {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("open the netns");
        nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
}

/// Datagrams to `addr` received inside `ns` until 500 ms pass without one (the socket is
/// bound before this returns).
fn receiver(ns: &str, addr: &'static str) -> std::thread::JoinHandle<Vec<Vec<u8>>> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let h = in_named_netns(ns, move || {
        let sock = UdpSocket::bind(addr).expect("bind in the pod");
        sock.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        ready_tx.send(()).unwrap();
        received(&sock)
    });
    ready_rx.recv().expect("receiver ready");
    h
}

fn payloads(got: &[Vec<u8>]) -> Vec<String> {
    got.iter().map(|p| String::from_utf8_lossy(p).into_owned()).collect()
}

#[test]
fn attack_local_pod_address_from_the_uplink_live() {
    use palisade_common::{IpcacheValue, Ipv4Prefix, POLICY_PREFIX_FULL, PolicyKey, PolicyValue, ipcache_flags};
    palisade_privileged::require_root!();
    in_node_netns(|| {
        let pid = std::process::id();
        let (a, b, out) = (PodNs(format!("pal-a-{pid}")), PodNs(format!("pal-b-{pid}")), PodNs(format!("pal-o-{pid}")));
        for (ns, host, peer, subnet, host_mac) in [
            (&a, "pal-ha", "pal-pa", 1, "02:00:00:00:01:01"),
            (&b, "pal-hb", "pal-pb", 2, "02:00:00:00:02:01"),
            (&out, "pal-hu", "pal-pu", 3, "02:00:00:00:03:01"),
        ] {
            ip(&["netns", "add", &ns.0]);
            ip(&["link", "add", host, "address", host_mac, "type", "veth", "peer", "name", peer]);
            ip(&["link", "set", peer, "netns", &ns.0]);
            ip(&["addr", "add", &format!("10.200.{subnet}.1/24"), "dev", host]);
            ip(&["link", "set", host, "up"]);
            let n = ns.0.as_str();
            ip(&["-n", n, "addr", "add", &format!("10.200.{subnet}.2/24"), "dev", peer]);
            ip(&["-n", n, "link", "set", peer, "up"]);
            ip(&["-n", n, "link", "set", "lo", "up"]);
            ip(&["-n", n, "route", "add", "default", "via", &format!("10.200.{subnet}.1")]);
        }
        ip(&["link", "set", "lo", "up"]);
        // A node that forwards, without reverse-path filtering (as with asymmetric routes).
        for (k, v) in [
            ("net/ipv4/ip_forward", "1"),
            ("net/ipv4/conf/all/rp_filter", "0"),
            ("net/ipv4/conf/default/rp_filter", "0"),
            ("net/ipv4/conf/pal-hu/rp_filter", "0"),
        ] {
            std::fs::write(format!("/proc/sys/{k}"), v).unwrap_or_else(|e| panic!("sysctl {k}: {e}"));
        }
        let a_ip = [10, 200, 1, 2];
        let b_ip = [10, 200, 2, 2];
        // What someone on the node's network sends: A's address to B's port that only A may use.
        let spoofed = |payload: &[u8]| {
            let mut packet = ipv4_packet(a_ip, b_ip, proto::UDP, &[], 0, 9, &udp(40000, 7777, payload));
            ipv4_checksum(&mut packet[..20]);
            let mut f = ethernet(ETH_IPV4, &packet);
            f[..6].copy_from_slice(&[0x02, 0, 0, 0, 0x03, 0x01]);
            f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0x03, 0x02]);
            f
        };
        let from_a = |payload: &'static [u8]| {
            in_named_netns(&a.0, move || {
                let s = UdpSocket::bind("10.200.1.2:40001").expect("bind in A");
                s.send_to(payload, "10.200.2.2:7777").expect("send from A");
            })
            .join()
            .expect("A's sender");
        };

        // Without palisade: the node forwards the forged datagram to B.
        let rx = receiver(&b.0, "10.200.2.2:7777");
        send_raw(&out.0, "pal-pu", spoofed(b"forged"));
        from_a(b"from A");
        let got = payloads(&rx.join().expect("receiver"));
        assert!(got.contains(&"forged".to_string()), "the kernel's side of the attack: {got:?}");

        // With palisade: B's ingress admits A's identity on UDP 7777 only.
        let pins = PinDir::new("live");
        let mut dp = Datapath::load(&pins.config()).expect("load");
        dp.attach("pal-ha").expect("attach A");
        let b_if = dp.attach("pal-hb").expect("attach B");
        let a_if = palisade_agent::datapath::ifindex("pal-ha").expect("A");
        let mut maps = dp.take_maps().expect("maps");
        let flags = endpoint_flags::HAS_IPV4;
        maps.endpoints
            .insert(a_if, EndpointInfo { endpoint_id: 1, identity: 300, flags, ipv4: a_ip, ipv6: [0; 16] }, 0)
            .expect("A");
        let b_ep = EndpointInfo {
            endpoint_id: 2,
            identity: 301,
            flags: flags | endpoint_flags::INGRESS_ENFORCED,
            ipv4: b_ip,
            ipv6: [0; 16],
        };
        maps.endpoints.insert(b_if, b_ep, 0).expect("B");
        let local = ipcache_flags::LOCAL_ENDPOINT;
        maps.ipcache_host_v4
            .insert(Ipv4Prefix { addr: a_ip }, IpcacheValue { identity: 300, flags: local }, 0)
            .unwrap();
        maps.ipcache_host_v4
            .insert(Ipv4Prefix { addr: b_ip }, IpcacheValue { identity: 301, flags: local }, 0)
            .unwrap();
        let key = PolicyKey::new(2, direction::INGRESS, 300, proto::UDP, 7777);
        let value = PolicyValue { flags: 0, cookie: 1, prefix_len: POLICY_PREFIX_FULL };
        maps.insert_policy(POLICY_PREFIX_FULL, key, value).expect("policy");
        let count = |maps: &palisade_agent::datapath::MapSet, r| {
            maps.sum_counters().expect("counters").get(r, direction::INGRESS).packets
        };

        let rx = receiver(&b.0, "10.200.2.2:7777");
        send_raw(&out.0, "pal-pu", spoofed(b"forged"));
        from_a(b"from A");
        let got = payloads(&rx.join().expect("receiver"));
        assert_eq!(got, vec!["from A".to_string()], "only A's own datagram reaches B's socket");
        assert_eq!(count(&maps, reason::DROP_SPOOFED_SOURCE), 1, "the forged one, dropped at B's ingress");
        assert_eq!(count(&maps, reason::ALLOWED_BY_POLICY), 1, "A's, allowed by policy");

        drop(maps);
        dp.detach("pal-ha").expect("detach");
        dp.detach("pal-hb").expect("detach");
        drop(dp);
        drop(pins);
    });
}
