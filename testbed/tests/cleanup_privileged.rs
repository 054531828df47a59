//! Whatever way a run ends, it leaves no namespace, pin directory or temporary directory
//! behind (needs root).
mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use common::*;

#[test]
fn plumbing_run_without_agent_passes_and_leaves_nothing_privileged() {
    palisade_privileged::require_root!();
    let file = fixture("seed-allow-frontend-to-backend.yaml");
    let (pid, out) = run(&["run", "--no-agent", file.to_str().unwrap()]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "stdout:\n{stdout}\nstderr:\n{}", text(&out.stderr));
    assert!(stdout.contains("15 passed, 0 failed"), "{stdout}");
    assert_eq!(leftovers(pid), Vec::<String>::new());
}

#[test]
fn run_whose_agent_dies_exits_2_and_leaves_nothing_privileged() {
    palisade_privileged::require_root!();
    let file = fixture("seed-allow-frontend-to-backend.yaml");
    let (pid, out) = run(&["run", "--agent", "/bin/false", file.to_str().unwrap()]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr:\n{stderr}");
    assert!(stderr.contains("the agent exited"), "{stderr}");
    assert_eq!(leftovers(pid), Vec::<String>::new());
}

#[test]
fn interrupted_run_stops_its_agent_and_leaves_nothing_privileged() {
    palisade_privileged::require_root!();
    // An "agent" that never answers: the run waits for it until interrupted.
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("agent.pid");
    let script = dir.path().join("fake-agent");
    std::fs::write(&script, format!("#!/bin/sh\necho $$ > {}\nexec sleep 600\n", pidfile.display())).unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();

    let file = fixture("seed-allow-frontend-to-backend.yaml");
    let child = spawn(&["run", "--agent", script.to_str().unwrap(), file.to_str().unwrap()]);
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(15);
    while !(pidfile.exists() && std::fs::read_to_string(&pidfile).is_ok_and(|s| s.ends_with('\n'))) {
        assert!(Instant::now() < deadline, "the fake agent never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!leftovers(pid).is_empty(), "the run should have built its namespaces by now");
    let agent_pid: i32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();

    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGINT).unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "stderr:\n{}", text(&out.stderr));
    assert_eq!(leftovers(pid), Vec::<String>::new());
    // The agent was stopped (and reaped) by the testbed.
    assert_eq!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(agent_pid), None),
        Err(nix::errno::Errno::ESRCH),
        "the agent process {agent_pid} is still there"
    );
}
