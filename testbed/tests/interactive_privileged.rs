//! The developer commands, each a separate invocation as from a shell: `up` the seed
//! scenario, `probe` (allow and deny), `exec` in a pod, edit a policy file, `down`; then
//! `up` again, kill the testbed process outright, and `down` must still remove everything.
//! Needs root and the binaries built (`cargo build --bins`).
mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use palisade_testbed::instance::{InstanceState, ProcRef};

/// Everything of the instance that must be gone after `down`.
fn left_behind(state: &InstanceState, instance_dir: &Path) -> Vec<String> {
    let mut left = leftovers(state.holder.pid);
    left.extend(state.namespaces.iter().filter(|n| Path::new("/var/run/netns").join(n).exists()).cloned());
    for d in [&state.run_dir, &state.bpffs_dir, &instance_dir.to_path_buf()] {
        if d.exists() {
            left.push(d.display().to_string());
        }
    }
    if state.holder.alive() {
        left.push(format!("testbed process {}", state.holder.pid));
    }
    if let Some(a) = state.agent.filter(ProcRef::alive) {
        left.push(format!("agent process {}", a.pid));
    }
    left
}

#[test]
fn up_probe_exec_edit_down_privileged() {
    palisade_privileged::require_root!();
    built_agent();
    let root = tempfile::tempdir().unwrap();
    let seed = fixture("seed-allow-frontend-to-backend.yaml");
    let seed = seed.to_str().unwrap();
    let dir: PathBuf = root.path().join("default");

    let out = ok(&testbed(root.path(), &["up", seed]));
    assert!(out.contains("is up as testbed instance \"default\""), "{out}");
    let state = InstanceState::load(&dir).unwrap().expect("up wrote the state");
    assert!(out.contains(&format!("policy directory {}", state.policy_dir.display())), "{out}");
    assert!(out.contains(&format!("--socket {}", state.api_socket.display())), "{out}");
    assert!(state.holder.alive() && state.agent.is_some_and(|a| a.alive()), "{state:?}");

    // Only one instance of a name.
    let again = testbed(root.path(), &["up", seed]);
    assert_eq!(again.status.code(), Some(2));
    assert!(text(&again.stderr).contains("already up"), "{}", text(&again.stderr));

    let out = ok(&testbed(root.path(), &["probe", "default/frontend", "default/backend", "8080/TCP"]));
    assert!(out.contains("8080/TCP: allow"), "{out}");
    assert!(out.contains("CiliumNetworkPolicy default/allow-frontend-to-backend"), "{out}");
    let out =
        ok(&testbed(root.path(), &["probe", "--expect", "deny", "default/frontend", "default/backend", "9090/TCP"]));
    assert!(out.contains("9090/TCP: deny") && out.contains("ingress of default/backend"), "{out}");
    let mismatch =
        testbed(root.path(), &["probe", "--expect", "allow", "default/other", "default/backend", "8080/TCP"]);
    assert_eq!(mismatch.status.code(), Some(1), "{}", text(&mismatch.stdout));
    let bad = testbed(root.path(), &["probe", "default/frontend", "default/backend", "7/TCP"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(text(&bad.stderr).contains("does not list 7/TCP"), "{}", text(&bad.stderr));

    let out = ok(&testbed(root.path(), &["exec", "default/frontend", "--", "ip", "-brief", "addr"]));
    assert!(out.contains("10.200.1.10/32") && out.contains("eth0"), "{out}");
    let out = ok(&testbed(root.path(), &["exec", "node", "--", "ip", "-brief", "addr", "show", "dev", "lo"]));
    assert!(out.contains("10.200.0.1/32"), "{out}");
    let missing = testbed(root.path(), &["exec", "default/frontend", "--", "/nonexistent/command"]);
    assert_eq!(missing.status.code(), Some(127));

    // An edit in the printed policy directory changes enforcement (the agent's watch).
    let file = std::fs::read_dir(&state.policy_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| std::fs::read_to_string(p).unwrap().contains("namespace: default"))
        .expect("the default namespace's policy file");
    let manifest = std::fs::read_to_string(&file).unwrap();
    std::fs::write(&file, manifest.replace("app: frontend", "app: other")).unwrap();
    let edited = Instant::now();
    loop {
        let out = testbed(root.path(), &["probe", "--expect", "allow", "default/other", "default/backend", "8080/TCP"]);
        if out.status.code() == Some(0) {
            break;
        }
        assert!(edited.elapsed() < Duration::from_secs(10), "the edit was not enforced: {}", text(&out.stdout));
    }
    let out = testbed(root.path(), &["probe", "--expect", "deny", "default/frontend", "default/backend", "8080/TCP"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));

    let out = ok(&testbed(root.path(), &["down"]));
    assert!(out.contains("testbed instance \"default\" is down"), "{out}");
    assert_eq!(left_behind(&state, &dir), Vec::<String>::new());
    let out = ok(&testbed(root.path(), &["down"]));
    assert!(out.contains("nothing to take down"), "{out}");

    // The testbed process killed outright: `down` still removes everything.
    ok(&testbed(root.path(), &["up", seed]));
    let state = InstanceState::load(&dir).unwrap().expect("up wrote the state");
    assert!(state.holder.signal(nix::sys::signal::Signal::SIGKILL));
    assert!(state.holder.wait_gone(Duration::from_secs(10)));
    let probe = testbed(root.path(), &["probe", "default/frontend", "default/backend", "8080/TCP"]);
    assert_eq!(probe.status.code(), Some(2));
    assert!(text(&probe.stderr).contains("is not up"), "{}", text(&probe.stderr));
    let out = ok(&testbed(root.path(), &["down"]));
    assert!(out.contains("left behind"), "{out}");
    // The agent went with its parent (parent-death signal) or was stopped by `down`.
    assert_eq!(left_behind(&state, &dir), Vec::<String>::new());
}
