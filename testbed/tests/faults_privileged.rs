//! Faults, with the real agent and real packets: every actor made to panic once (the
//! supervisor restarts it in the same process, it rebuilds its state, enforcement stays
//! right and policy edits still take effect); pods whose network namespace is deleted
//! abruptly, while the agent runs or while it is down (their endpoints, map entries, links
//! and identity references go); and the
//! explicit uninstall after a SIGTERM (which left enforcement in place). Needs root and the
//! binaries built (`cargo build --bins`).
mod common;

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use palisade_testbed::agent::StopHow;
use palisade_testbed::netns;
use palisade_testbed::probe::{self, Attempt};
use palisade_testbed::report::Observed;
use palisade_testbed::scenario::{HostRef, IpFamily, Plan};
use palisade_testbed::session::{RunNames, RunOptions, Session};

const SCENARIO: &str = include_str!("scenarios/faults.yaml");

const ACTORS: [&str; 5] = ["policy_watch", "endpoint_tracker", "identity_cache", "resolver", "map_writer"];

fn setup(tag: &str, args: &[&str]) -> Option<(Plan, RunNames, RunOptions)> {
    palisade_privileged::require_root!(None);
    Some(agent_run(SCENARIO, tag, args))
}

/// Probes `probes` (indexes into the plan) and asserts each verdict is the expected one.
async fn assert_verdicts(session: &Session, probes: &[usize], when: &str) {
    let plan = session.plan();
    let list: Vec<_> = probes.iter().map(|i| plan.probes[*i].clone()).collect();
    for r in session.probe_many(&list).await {
        assert!(
            r.passed(),
            "{when}: {} -> {} {:?}: expected {:?}, observed {:?} ({:?})",
            r.from,
            r.to,
            r.port,
            r.expect,
            r.observed,
            r.detail
        );
    }
}

/// One TCP connection attempt from pod `from` to pod `to`, without the agent's help.
fn raw_tcp(session: &Session, from: usize, to: usize, port: u16, timeout: Duration) -> Attempt {
    let plan = session.plan();
    let dst = session.topology().host(plan, &HostRef::Pod(to)).unwrap().addr(IpFamily::IPv4).unwrap();
    let ns = session.topology().host(plan, &HostRef::Pod(from)).unwrap().netns.open().unwrap();
    netns::run_in(ns, move || probe::tcp(SocketAddr::new(dst, port), timeout).attempt).unwrap()
}

/// Entries of a pinned map, with bpftool if it is installed.
fn pinned_entries(path: &Path) -> Option<usize> {
    let out = std::process::Command::new("bpftool").args(["-j", "map", "dump", "pinned"]).arg(path).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    Some(v.as_array()?.len())
}

#[test]
fn each_actor_panics_once_and_enforcement_stays_right_privileged() {
    let Some((plan, names, opts)) =
        setup("ft", &["--fault-injection", "--policy-rescan-secs", "3600", "--repair-interval-secs", "3600"])
    else {
        return;
    };
    let policy = plan.policies[0].clone();
    let v1 = palisade_policy::yaml::to_string(&policy.manifest).unwrap();
    let v2 = v1.replace("port: \"80\"", "port: \"81\"");
    assert_ne!(v1, v2);
    runtime().block_on(async {
        let session = Session::up(&plan, &opts, &names).await.expect("the scenario comes up");
        let client = session.client().unwrap().clone();
        assert_verdicts(&session, &[0, 1, 2, 3], "before any fault").await;
        let pid = session.agent_pid().unwrap();
        let identities_before = client.identities().await.unwrap();
        for actor in ACTORS {
            let ack = client.debug_panic(actor).await.unwrap_or_else(|e| panic!("{actor}: {e}"));
            let st = client.wait_revision(ack.revision, Duration::from_secs(20)).await.unwrap();
            assert_eq!(session.agent_pid(), Some(pid), "{actor}: the process itself was not restarted");
            let log = std::fs::read_to_string(session.agent_log().unwrap()).unwrap();
            assert!(
                log.lines().any(|l| l.contains("actor panicked") && l.contains(actor)),
                "{actor}: no restart logged"
            );
            // State rebuilt: every endpoint, the policy, the same identities and references.
            assert_eq!((st.endpoints, st.policies), (4, 1), "{actor}: {st:?}");
            // The timestamps behind the policy-to-kernel latency.
            assert!(
                st.realized_revision_accepted_unix_ms > 0
                    && st.realized_revision_unix_ms >= st.realized_revision_accepted_unix_ms
                    && st.revision_accepted_unix_ms >= st.realized_revision_accepted_unix_ms,
                "{actor}: {st:?}"
            );
            assert_eq!(client.identities().await.unwrap(), identities_before, "{actor}: identities changed");
            assert_verdicts(&session, &[0, 1, 2, 3], &format!("after {actor} panicked")).await;
            // And it still follows edits (the directory watch alone: re-reads are hourly).
            let st = session.write_policy_file(&policy.file_name, &v2).await.expect("the edit is taken in");
            assert!(st.enforced, "{st:?}");
            let p81 = plan.probes[1].clone();
            let r = session.probe(&p81).await;
            assert_eq!(r.observed, Observed::Allow, "{actor}: port 81 after the edit: {r:?}");
            session.write_policy_file(&policy.file_name, &v1).await.expect("the edit is taken in");
            assert_verdicts(&session, &[0, 1, 2, 3], &format!("after {actor} panicked and two edits")).await;
        }
        session.down().await;
    });
    assert_eq!(netns::list_with_prefix(&names.prefix), Vec::<String>::new());
}

#[test]
fn vanished_interfaces_are_cleaned_up_and_identities_released_privileged() {
    let Some((plan, names, opts)) = setup("fv", &["--interface-check-ms", "3600000"]) else { return };
    runtime().block_on(async {
        let mut session = Session::up(&plan, &opts, &names).await.expect("the scenario comes up");
        let client = session.client().unwrap().clone();
        // Without --fault-injection there is no way to make an actor panic.
        assert!(client.debug_panic("resolver").await.is_err());
        let eps = client.endpoints().await.unwrap();
        assert_eq!(eps.len(), 4);
        let ep = |name: &str| eps.iter().find(|e| e.name == name).unwrap().clone();
        let (c, twin, victim) = (ep("client"), ep("twin"), ep("victim"));
        assert_eq!(c.identity, twin.identity, "same labels, same identity");
        let refs =
            |ids: &[palisade_api::types::IdentityInfo], id: u32| ids.iter().find(|i| i.id == id).map(|i| i.references);
        let ids = client.identities().await.unwrap();
        assert_eq!(refs(&ids, c.identity), Some(2));
        assert_eq!(refs(&ids, victim.identity), Some(1));
        let endpoints_map = session.dirs().bpffs.join("ENDPOINTS");
        let links = session.dirs().bpffs.join("links");
        assert!(links.join(&victim.interface).is_dir() || !links.exists(), "tcx link pins per interface");
        let before = pinned_entries(&endpoints_map);
        assert!(before.is_none() || before == Some(4), "{before:?}");

        // The pods die abruptly: their namespaces go, and with them both ends of the veths.
        // The victim dies while no agent runs (killed): the next agent drops it on start.
        let pod_ns: Vec<String> = session.topology().pods.iter().map(|p| p.netns.name().to_string()).collect();
        let delete_ns = |i: usize| netns::delete(&pod_ns[i]).unwrap();
        session.stop_agent(StopHow::Kill).unwrap();
        delete_ns(2);
        // The kernel removes the veth once the namespace is gone; wait (bounded) for it.
        let node = session.topology().node.netns.open().unwrap();
        let victim_if = victim.interface.clone();
        let gone = netns::run_in(node, move || {
            let deadline = Instant::now() + Duration::from_secs(5);
            while nix::net::if_::if_nametoindex(victim_if.as_str()).is_ok() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            nix::net::if_::if_nametoindex(victim_if.as_str()).is_err()
        })
        .unwrap();
        assert!(gone, "the victim's veth went with its namespace");
        session.start_agent_again().await.expect("the agent restarts");
        assert_eq!(client.endpoints().await.unwrap().len(), 3, "the victim was dropped on restore");
        // The twin dies while the agent runs: netlink reports the link removal (the periodic
        // check is hourly here, so only the notification can be in time).
        let removed_at = Instant::now();
        delete_ns(1);
        let deadline = Instant::now() + Duration::from_secs(15);
        let left = loop {
            let left = client.endpoints().await.unwrap();
            if left.len() == 2 || Instant::now() >= deadline {
                break left;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        eprintln!("a vanished pod's endpoint was removed {:?} after its namespace was deleted", removed_at.elapsed());
        let mut left_names: Vec<String> = left.iter().map(|e| e.name.clone()).collect();
        left_names.sort();
        assert_eq!(left_names, vec!["client", "server"], "vanished endpoints are removed");
        client.wait_current(Duration::from_secs(20)).await.unwrap();
        // Identities: the victim's is released, the one the twin shared keeps one reference.
        let ids = client.identities().await.unwrap();
        assert_eq!(refs(&ids, victim.identity), None, "{ids:?}");
        assert_eq!(refs(&ids, c.identity), Some(1), "{ids:?}");
        // Kernel side: link pins and endpoint entries gone.
        assert!(!links.join(&victim.interface).exists() && !links.join(&twin.interface).exists());
        if let Some(n) = pinned_entries(&endpoints_map) {
            assert_eq!(n, 2, "entries of the endpoints map");
        } else {
            eprintln!("bpftool missing: map entries not counted");
        }
        // The registry in the state directory no longer has them either.
        let saved = std::fs::read_to_string(session.dirs().state.join("endpoints.json")).unwrap();
        assert!(!saved.contains("\"victim\"") && !saved.contains("\"twin\""), "{saved}");
        assert_verdicts(&session, &[0, 1], "after the pods vanished").await;
        // The CLI waits for revisions too: the current one is realized, a future one times out.
        let cli = |args: &[&str]| {
            std::process::Command::new(Path::new(BIN).with_file_name("palisade"))
                .arg("--socket")
                .arg(&session.dirs().socket)
                .args(args)
                .output()
                .unwrap()
        };
        let out = cli(&["wait"]);
        assert!(out.status.success() && text(&out.stdout).contains("realized"), "{out:?}");
        let future = (client.status().await.unwrap().revision + 1000).to_string();
        let out = cli(&["wait", "--revision", &future, "--timeout-secs", "1"]);
        assert!(!out.status.success() && text(&out.stderr).contains("not realized"), "{out:?}");
        session.down().await;
    });
    assert_eq!(netns::list_with_prefix(&names.prefix), Vec::<String>::new());
}

#[test]
fn sigterm_keeps_enforcing_and_uninstall_removes_everything_privileged() {
    let Some((plan, names, opts)) = setup("fu", &[]) else { return };
    runtime().block_on(async {
        let mut session = Session::up(&plan, &opts, &names).await.expect("the scenario comes up");
        assert_verdicts(&session, &[0, 1], "with the agent").await;
        let exit = session.stop_agent(StopHow::Term).unwrap();
        assert!(exit.contains("exit status: 0"), "SIGTERM is a clean stop: {exit}");
        // No agent: the datapath still enforces.
        assert_eq!(raw_tcp(&session, 0, 3, 80, Duration::from_secs(1)), Attempt::Answered);
        assert_eq!(raw_tcp(&session, 0, 3, 81, Duration::from_millis(300)), Attempt::NoAnswer);
        let (bpffs, state) = (session.dirs().bpffs.clone(), session.dirs().state.clone());
        assert!(bpffs.join("ENDPOINTS").exists() && state.join("endpoints.json").exists());

        // Uninstall, in the node's namespace (clsact filters are per namespace).
        let node = session.topology().node.netns.open().unwrap();
        let fd = node.as_raw_fd();
        let mut cmd = std::process::Command::new(agent_binary());
        cmd.arg("uninstall").arg("--bpffs").arg(&bpffs).arg("--state-dir").arg(&state);
        // SAFETY: only setns, async-signal-safe, between fork and exec; `node` outlives it.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let out = cmd.output().unwrap();
        drop(node);
        assert!(out.status.success(), "{}{}", text(&out.stdout), text(&out.stderr));
        assert!(!bpffs.exists(), "pins removed");
        assert!(!state.exists(), "state removed");
        // Programs detached: nothing is enforced any more.
        assert_eq!(raw_tcp(&session, 0, 3, 81, Duration::from_secs(1)), Attempt::Answered);
        assert_eq!(raw_tcp(&session, 2, 3, 80, Duration::from_secs(1)), Attempt::Answered);
        session.down().await;
    });
    assert_eq!(netns::list_with_prefix(&names.prefix), Vec::<String>::new());
}
