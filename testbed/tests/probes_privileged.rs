//! The topology and the probes on their own, without an agent (needs root): what answers,
//! what is refused, and what is silently lost.
mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use palisade_testbed::listen::{ListenOn, Listeners, Wanted};
use palisade_testbed::netns;
use palisade_testbed::probe::{self, Attempt};
use palisade_testbed::scenario;
use palisade_testbed::topology::Topology;

const TWO_PODS: &str = include_str!("scenarios/two-pods.yaml");

#[test]
fn probes_answer_get_refused_and_see_loss_privileged() {
    palisade_privileged::require_root!();
    let plan = scenario::load_str(TWO_PODS, Path::new("two-pods.yaml")).unwrap();
    let prefix = format!("pt{}-probes", std::process::id());
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    rt.block_on(async {
        let topo = Topology::build(&plan, &prefix).unwrap();
        let mut listeners = Listeners::new();
        let on = ListenOn { key: 1, netns: &topo.pods[1].netns, ipv6: false, is_node: false };
        listeners.start(on, &plan.pods[1].ports).unwrap();
        let b = topo.pods[1].ipv4.unwrap();
        let (b_ip, a_ip) = (std::net::IpAddr::V4(b), std::net::IpAddr::V4(topo.pods[0].ipv4.unwrap()));
        let t = Duration::from_millis(300);
        let from_a = |f: Box<dyn FnOnce() -> probe::ProbeRun + Send>| {
            let ns = topo.pods[0].netns.open().unwrap();
            netns::run_in(ns, f).unwrap()
        };

        let tcp = from_a(Box::new(move || probe::tcp(SocketAddr::new(b_ip, 8080), t)));
        assert_eq!(tcp.attempt, Attempt::Answered);
        assert!(tcp.local_port.is_some());
        let udp = from_a(Box::new(move || probe::udp(SocketAddr::new(b_ip, 5353), b"hello", t)));
        assert_eq!(udp.attempt, Attempt::Answered);
        let icmp = from_a(Box::new(move || probe::icmp_echo(b_ip, 0x4242, 1, t)));
        assert_eq!(icmp.attempt, Attempt::Answered);
        // Nothing listens on 8081: the pod's kernel answers with a reset.
        let refused = from_a(Box::new(move || probe::tcp(SocketAddr::new(b_ip, 8081), t)));
        assert_eq!(refused.attempt, Attempt::Refused);
        // The listener noted the TCP and UDP arrivals from a's address and source port.
        let want = Wanted {
            host: 1,
            protocol: scenario::PortProtocol::TCP,
            local_port: 8080,
            peer: SocketAddr::new(a_ip, tcp.local_port.unwrap()),
            tag: None,
            since_ns: tcp.started_ns,
        };
        assert!(listeners.arrived(&want));

        // b's link down: packets to it vanish without an answer.
        topo.pods[1].netns.netlink(|nl| nl.set_down(&nl.existing_link("eth0")?, "eth0")).unwrap();
        let lost = from_a(Box::new(move || probe::tcp(SocketAddr::new(b_ip, 8080), t)));
        assert_eq!(lost.attempt, Attempt::NoAnswer);
        assert!(lost.elapsed >= t);
        let lost = from_a(Box::new(move || probe::udp(SocketAddr::new(b_ip, 5353), b"hello", t)));
        assert_eq!(lost.attempt, Attempt::NoAnswer);
        let lost = from_a(Box::new(move || probe::icmp_echo(b_ip, 0x4242, 2, t)));
        assert_eq!(lost.attempt, Attempt::NoAnswer);

        listeners.stop().await;
        drop(topo);
    });
    assert_eq!(netns::list_with_prefix(&prefix), Vec::<String>::new());
}
