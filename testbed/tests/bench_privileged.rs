//! `palisade-bench --quick`, the CI size of the benchmark: it runs every part for real
//! (traffic through palisade, iptables and nftables in the testbed's namespaces, the agent
//! binary, resolution), writes every figure the full run writes, and leaves nothing behind,
//! also when interrupted (needs root; the agent binary must be built: `cargo build --bins`).
mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use palisade_testbed::bench::{Size, expected_figures};

const BENCH: &str = env!("CARGO_BIN_EXE_palisade-bench");

#[test]
fn bench_quick_writes_every_figure_and_leaves_nothing_privileged() {
    palisade_privileged::require_root!();
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("quick.json");
    let svg = dir.path().join("plot.svg");
    let child = Command::new(BENCH)
        .args(["--quick", "--json", json.to_str().unwrap(), "--svg", svg.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("palisade-bench starts");
    let pid = child.id();
    let started = Instant::now();
    let out = child.wait_with_output().expect("palisade-bench runs");
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(started.elapsed() < Duration::from_mins(5), "the quick run took {:?}", started.elapsed());

    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["size"], "quick");
    assert_eq!(report["failures"].as_array().map(Vec::len), Some(0), "{report}");
    let figures = report["figures"].as_array().expect("figures");
    for name in expected_figures(Size::Quick) {
        let f = figures.iter().find(|f| f["name"] == name.as_str()).unwrap_or_else(|| panic!("no figure {name}"));
        let v = f["value"].as_f64().unwrap_or_else(|| panic!("{name} has no number: {f}"));
        assert!(v.is_finite() && v >= 0.0, "{name} = {v}");
        assert!(!f["unit"].as_str().unwrap_or("").is_empty(), "{name} has no unit");
        assert!(f["context"].as_str().unwrap_or("").len() > 20, "{name} has no context");
    }
    // Figures that can only come from real traffic and a real agent.
    let get = |n: &str| figures.iter().find(|f| f["name"] == n).and_then(|f| f["value"].as_f64()).unwrap();
    assert!(get("datapath.baseline.n10.udp_stream_pps") > 100.0);
    assert!(get("datapath.palisade.n10000.tcp_crr_p50") > 0.0);
    assert!(get("memory.agent_idle_rss_mib") > 1.0);
    assert!(get("memory.maps_idle_total_mib") > 1.0);
    assert!(get("control.agent.policy_entries") > 0.0);
    // The cluster part: pods seen on the other node, real agents' memory, real etcd work.
    assert!(get("cluster.n2.pod_everywhere_p50_ms") > 0.0);
    assert!(get("cluster.n3.agent_rss_max_mib") > 1.0);
    assert!(get("cluster.n2.etcd_ops_per_pod") >= 1.0);
    assert!(get("cluster.n2.identity_allocations_per_s") > 0.0);
    let plot = std::fs::read_to_string(&svg).unwrap();
    assert!(plot.starts_with("<svg") && plot.contains("polyline"), "{plot}");
    assert_eq!(leftovers(pid), Vec::<String>::new());
}

#[test]
fn interrupted_bench_leaves_nothing_privileged() {
    palisade_privileged::require_root!();
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("quick.json");
    let mut child = Command::new(BENCH)
        .args(["--quick", "--only", "datapath", "--json", json.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("palisade-bench starts");
    let pid = child.id();
    // Into the middle of it: namespaces (with pins or firewall rules) exist.
    std::thread::sleep(Duration::from_secs(3));
    let deadline = Instant::now() + Duration::from_secs(20);
    while leftovers(pid).is_empty() {
        assert!(Instant::now() < deadline, "nothing made within 20 s: the run did not get going");
        std::thread::sleep(Duration::from_millis(20));
    }
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGINT).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "palisade-bench did not exit within 30 s of SIGINT");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(130), "{status}");
    assert_eq!(leftovers(pid), Vec::<String>::new());
}
