//! Several nodes in kvstore mode, with real packets and a real etcd (in the first node's
//! namespace): every scenario of fixtures/cluster run by the binary with `--kvstore` gets
//! the verdicts it gets in file mode; the same label set has the same number on every node
//! (`palisade identity list`); etcd stopped for longer than a lease lives under continuous
//! cross-node probes: no wrong verdict, then or after; etcd wiped and restarted empty, then one agent killed (SIGKILL) and
//! restarted: the agents publish again, the numbers stay, the restarted agent learns the
//! other nodes' pods from etcd again, and cross-node flows keep their verdicts; a node gone
//! for good: once its lease expires its pods are world to the others.
//! Needs root, etcd (ci/setup.sh) and the binaries built (`cargo build --bins`).
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use palisade_testbed::report::Observed;
use palisade_testbed::scenario::Expect::{Allow, Deny};
use palisade_testbed::session::Session;

/// etcd processes whose data directory belongs to run `pid`.
fn etcd_leftovers(pid: u32) -> Vec<String> {
    let mark = format!("palisade-testbed-{pid}-");
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else { continue };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.starts_with("etcd ") && cmd.contains(&mark) {
            out.push(cmd);
        }
    }
    out
}

#[test]
fn every_cluster_fixture_passes_in_kvstore_mode_privileged() {
    palisade_privileged::require_root!();
    if !etcd_or_skip() {
        return;
    }
    built_agent();
    let files = cluster_fixtures();
    assert!(files.len() >= 2, "{files:?}");
    let (pid, probes) = run_expecting_all_pass(&["--kvstore"], &files);
    let judged_on_two = |p: &&serde_json::Value| {
        p["nodes"]["egress"].is_string()
            && p["nodes"]["ingress"].is_string()
            && p["nodes"]["egress"] != p["nodes"]["ingress"]
    };
    let cross_node = probes.iter().filter(judged_on_two).count();
    assert!(cross_node >= 8, "{cross_node} probes judged on two nodes");
    assert_eq!(etcd_leftovers(pid), Vec::<String>::new());
}

#[test]
fn identities_agree_across_nodes_and_survive_a_wiped_etcd_a_killed_agent_and_a_node_gone_privileged() {
    palisade_privileged::require_root!();
    if !etcd_or_skip() {
        return;
    }
    let text_in = std::fs::read_to_string(cluster_fixture("three-nodes-frontend-backend.yaml")).unwrap();
    let (plan, names, mut opts) = agent_run(&text_in, "kv", &[]);
    opts.kvstore = true;
    let rt = runtime();
    rt.block_on(async {
        let mut session = Session::up(&plan, &opts, &names).await.expect("the cluster comes up in kvstore mode");
        assert!(session.etcd().and_then(palisade_testbed::kvstore::TestbedEtcd::pid).is_some());
        let probe = |from: &str, to: &str, port: u16, expect| tcp_probe(&plan, from, to, port, expect);
        let flows = [
            probe("default/frontend", "default/backend", 8080, Allow),
            probe("default/client-c", "default/backend", 8080, Allow),
            probe("default/frontend", "default/backend", 9090, Deny),
            probe("default/other", "default/backend", 9090, Allow),
        ];
        let expected: Vec<Observed> =
            flows.iter().map(|p| if p.expect == Allow { Observed::Allow } else { Observed::Deny }).collect();
        let check = async |session: &Session, when: &str| {
            let seen = observe(session, &flows).await;
            for ((s, why), want) in seen.iter().zip(&expected) {
                assert_eq!(s, want, "{when}: {why}");
            }
        };
        check(&session, "at start").await;

        // One number per label set, the same on every node that knows it; every pod's
        // label set is known on every node (its own or learnt from etcd).
        let before: Vec<BTreeMap<String, u32>> =
            futures_util::future::join_all((0..3).map(|k| identities(&session, k))).await;
        let mut all: BTreeMap<String, BTreeSet<u32>> = BTreeMap::new();
        for ids in &before {
            for (labels, id) in ids {
                all.entry(labels.clone()).or_default().insert(*id);
            }
        }
        for (labels, ids) in &all {
            assert_eq!(ids.len(), 1, "{labels} has several numbers across nodes: {ids:?}");
        }
        for app in ["k8s:app=frontend", "k8s:app=backend", "k8s:app=other"] {
            for (k, ids) in before.iter().enumerate() {
                assert!(ids.keys().any(|l| l.split(',').any(|x| x == app)), "node {k} lacks {app}: {ids:?}");
            }
        }
        let numbers: BTreeSet<u32> = all.values().flatten().copied().collect();
        assert_eq!(numbers.len(), all.len(), "two label sets share a number: {all:?}");

        // etcd stopped for longer than a lease lives, with frontend (node-a) probing backend
        // (node-b) all along: not one wrong verdict while it is away, nor after it returns
        // and the leases held while it was away have expired (the agents took new ones and
        // published again; otherwise node-b would drop frontend and deny it).
        let stop = Arc::new(AtomicBool::new(false));
        let probing = {
            let ns = session.topology().pods[0].netns.open().unwrap();
            let backend = IpAddr::V4(plan.pods[2].ipv4.unwrap());
            let stop = stop.clone();
            std::thread::spawn(move || {
                probe_continuously(ns, backend, [8080, 9090], stop, 2_000, Duration::from_mins(2))
            })
        };
        let etcd = session.etcd().unwrap();
        etcd.stop();
        tokio::time::sleep(Duration::from_secs(palisade_testbed::kvstore::LEASE_TTL_SECS + 2)).await;
        etcd.restart().expect("etcd comes back");
        tokio::time::sleep(Duration::from_secs(palisade_testbed::kvstore::LEASE_TTL_SECS * 2 + 2)).await;
        for k in 0..3 {
            palisade_testbed::agent::wait_remote_endpoints(session.client_of(k).unwrap(), &plan, k)
                .await
                .unwrap_or_else(|e| panic!("after etcd came back: {e}"));
        }
        stop.store(true, Ordering::Relaxed);
        let tally = probing.join().unwrap();
        assert!(tally.rounds >= 10, "{tally}");
        assert!(tally.wrong.is_empty(), "{tally}: {:?}", tally.wrong);
        check(&session, "after etcd was away").await;

        // etcd wiped and restarted empty: every agent publishes again.
        session.etcd().unwrap().wipe().expect("etcd comes back empty");
        // node-b's agent SIGKILLed and started again: what it learns of the other nodes
        // now comes only from what they published into the emptied store.
        session.restart_agent_of(1, palisade_testbed::agent::StopHow::Kill).await.expect("node-b's agent restarts");
        let client_b = session.client_of(1).unwrap();
        let frontend_ip = format!("{}/32", plan.pods[0].ipv4.unwrap());
        let frontend_id = before[0].iter().find(|(l, _)| l.contains("k8s:app=frontend")).map(|(_, id)| *id).unwrap();
        eventually("node-b learns frontend from etcd again, with its number", async || {
            let entries = client_b.ipcache().await.ok()?;
            entries.iter().any(|e| e.prefix == frontend_ip && e.identity == frontend_id).then_some(())
        })
        .await;
        for k in 0..3 {
            // Every node's kernel ipcache holds every other node's pods (bounded wait).
            palisade_testbed::agent::wait_remote_endpoints(session.client_of(k).unwrap(), &plan, k)
                .await
                .unwrap_or_else(|e| panic!("after the wipe: {e}"));
        }
        eventually("every node holds the same numbers as before", async || {
            for (k, was) in before.iter().enumerate() {
                let now = identities(&session, k).await;
                if was.iter().any(|(l, id)| now.get(l) != Some(id)) {
                    return None;
                }
            }
            Some(())
        })
        .await;
        check(&session, "after the wipe and node-b's restart").await;

        // node-c gone for good (its agent SIGKILLed, not restarted): once its lease
        // expires, node-b drops client-c's address (world again: denied at backend's
        // ingress); frontend on node-a is untouched.
        session.stop_agent_of(2, palisade_testbed::agent::StopHow::Kill).expect("node-c's agent stops");
        let client_c_ip = format!("{}/32", plan.pods[3].ipv4.unwrap());
        let client_b = session.client_of(1).unwrap();
        eventually("node-b forgets node-c's pod after node-c's lease expired", async || {
            let entries = client_b.ipcache().await.ok()?;
            (!entries.iter().any(|e| e.prefix == client_c_ip)).then_some(())
        })
        .await;
        let seen = observe(&session, &flows[..2]).await;
        assert_eq!(seen[0].0, Observed::Allow, "{}", seen[0].1);
        // Dropped by node-b's kernel at backend's ingress (node-c's agent is gone, so the
        // testbed cannot ask it to explain the egress side: that part is an error).
        assert!(matches!(seen[1].0, Observed::Deny | Observed::Error), "{}", seen[1].1);
        assert!(seen[1].1.contains("dropped at ingress of default/backend"), "{}", seen[1].1);
        // The label set is still node-a's: same number on node-b.
        assert_eq!(identities(&session, 1).await.values().filter(|id| **id == frontend_id).count(), 1);
        session.down().await;
    });
    assert_eq!(leftovers(std::process::id()), Vec::<String>::new());
    assert_eq!(etcd_leftovers(std::process::id()), Vec::<String>::new());
}

/// `up --kvstore` / `probe` / `down`: the etcd starts with the instance and goes with it.
#[test]
fn up_probe_down_in_kvstore_mode_privileged() {
    palisade_privileged::require_root!();
    if !etcd_or_skip() {
        return;
    }
    built_agent();
    let root = tempfile::tempdir().unwrap();
    let file = cluster_fixture("three-nodes-frontend-backend.yaml");
    let testbed = |args: &[&str]| {
        let out = std::process::Command::new(BIN)
            .args(args)
            .env("PALISADE_TESTBED_STATE_DIR", root.path())
            .output()
            .expect("palisade-testbed runs");
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}\n{}", text(&out.stdout), text(&out.stderr));
        text(&out.stdout)
    };
    testbed(&["up", "--kvstore", file.to_str().unwrap()]);
    let state = palisade_testbed::instance::InstanceState::load(&root.path().join("default")).unwrap().unwrap();
    assert_eq!(etcd_leftovers(state.holder.pid).len(), 1, "one etcd runs for the instance");
    let out = testbed(&["probe", "default/client-c", "default/backend", "8080/TCP"]);
    assert!(out.contains("8080/TCP: allow") && out.contains("egress node-c, ingress node-b"), "{out}");
    testbed(&["down"]);
    assert!(state.holder.wait_gone(Duration::from_secs(10)));
    assert_eq!(leftovers(state.holder.pid), Vec::<String>::new());
    assert_eq!(etcd_leftovers(state.holder.pid), Vec::<String>::new());
}
