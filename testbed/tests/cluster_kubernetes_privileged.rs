//! Several nodes in Kubernetes mode, with real packets: every node's agent watches the
//! testbed's one API server (a listener in each node's namespace) and enforces the pods
//! whose `spec.nodeName` is its node. Every scenario of fixtures/cluster gets its verdicts
//! with and without `--kvstore`; without it each agent numbers the other nodes' pods it
//! sees in the API itself (node-local identities), with it the numbers come from etcd and
//! agree on every node. Policy and pod changes through the API reach every node's
//! agent, and each agent writes its own node's entry of a policy's status. Needs root,
//! etcd for the kvstore half (ci/setup.sh) and the binaries built (`cargo build --bins`).
mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::*;
use palisade_testbed::kubeapi;
use palisade_testbed::report::Observed;
use palisade_testbed::scenario::Expect::{Allow, Deny};
use palisade_testbed::scenario::Plan;
use palisade_testbed::session::{RunNames, RunOptions, Session};

/// Node `node`'s kernel ipcache: prefix -> identity.
async fn ipcache(session: &Session, node: usize) -> BTreeMap<String, u32> {
    let entries = session.client_of(node).unwrap().ipcache().await.unwrap();
    entries.into_iter().map(|e| (e.prefix, e.identity)).collect()
}

/// Waits until no node's agent has policy source `source` (`present` false) or every one
/// enforces it, then until every node realized that.
async fn on_every_node(session: &Session, source: &str, present: bool) {
    for k in 0..session.plan().nodes.len() {
        let client = session.client_of(k).unwrap();
        eventually(&format!("node {k}: {source} present={present}"), async || {
            let pols = client.policies().await.ok()?;
            let found = pols.iter().any(|p| p.source == source && p.enforced);
            (found == present).then_some(())
        })
        .await;
    }
    session.wait_realized().await.unwrap();
}

/// The three-node fixture in Kubernetes mode with the kvstore, as `tag`.
fn kube_kvstore_run(tag: &str) -> (Plan, RunNames, RunOptions) {
    built_agent();
    let text = std::fs::read_to_string(cluster_fixture("three-nodes-frontend-backend.yaml")).unwrap();
    let (plan, names, mut opts) = kube_run(&text, tag);
    opts.kvstore = true;
    (plan, names, opts)
}

#[test]
fn every_cluster_fixture_passes_in_kubernetes_mode_with_and_without_the_kvstore_privileged() {
    palisade_privileged::require_root!();
    built_agent();
    let files = cluster_fixtures();
    assert!(files.len() >= 2, "{files:?}");
    let judged_on_two = |p: &&serde_json::Value| {
        p["nodes"]["egress"].is_string()
            && p["nodes"]["ingress"].is_string()
            && p["nodes"]["egress"] != p["nodes"]["ingress"]
    };
    let (_, probes) = run_expecting_all_pass(&["--kubernetes"], &files);
    assert!(probes.iter().filter(judged_on_two).count() >= 8);
    if palisade_privileged::etcd::installed() {
        let (_, probes) = run_expecting_all_pass(&["--kubernetes", "--kvstore"], &files);
        assert!(probes.iter().filter(judged_on_two).count() >= 8);
    } else {
        palisade_privileged::skip("--kubernetes --kvstore needs etcd (Debian's etcd-server; ci/setup.sh installs it)");
    }
}

#[test]
fn policy_and_pod_changes_through_the_api_reach_every_node_privileged() {
    palisade_privileged::require_root!();
    built_agent();
    let text = std::fs::read_to_string(cluster_fixture("three-nodes-frontend-backend.yaml")).unwrap();
    let (plan, names, opts) = kube_run(&text, "ck");
    let rt = runtime();
    rt.block_on(async {
        use Observed::{Allow as A, Deny as D};
        let session = Session::up(&plan, &opts, &names).await.expect("the cluster comes up in Kubernetes mode");
        let api = session.kube_api().expect("an API server").clone();
        let probe = |from: &str, to: &str, port: u16, expect| tcp_probe(&plan, from, to, port, expect);
        let flows = [
            probe("default/frontend", "default/backend", 8080, Allow),
            probe("default/client-c", "default/backend", 8080, Allow),
            probe("default/frontend", "default/backend", 9090, Deny),
            probe("default/other", "default/backend", 8080, Deny),
        ];
        let seen = |v: Vec<(Observed, String)>| v.into_iter().map(|(o, _)| o).collect::<Vec<_>>();
        assert_eq!(seen(observe(&session, &flows).await), [A, A, D, D]);

        // Node-local identities: each agent knows the other nodes' pods from the API, in
        // its own ipcache, with a number it gave them itself.
        let backend = plan.pods.iter().find(|p| p.name == "backend").unwrap();
        let backend_v4 = format!("{}/32", backend.ipv4.unwrap());
        for k in [0, 2] {
            let id = ipcache(&session, k).await.get(&backend_v4).copied();
            assert!(id.is_some_and(|id| id >= 256), "node {k}: backend's address as {id:?}");
        }

        // Every agent writes its own node's entry of the status.
        let status = eventually("every node's status entry", async || {
            let obj = api.get("CiliumNetworkPolicy", "default/backend-ingress")?;
            let nodes: BTreeSet<String> = obj["status"]["nodes"].as_object()?.keys().cloned().collect();
            (nodes.len() == 3).then_some(nodes)
        })
        .await;
        assert_eq!(status, ["node-a", "node-b", "node-c"].map(String::from).into());

        // The ingress policy deleted: backend (node-b) is no longer selected; other's
        // egress policy (node-a) still holds.
        api.delete("CiliumNetworkPolicy", "default/backend-ingress");
        on_every_node(&session, "kube:CiliumNetworkPolicy/default/backend-ingress", false).await;
        assert_eq!(seen(observe(&session, &flows).await), [A, A, A, D]);

        // Back again, then client-c (node-c) deleted from the API: node-b forgets its
        // address (world: no longer frontend's rights), and learns it again when it returns.
        let manifest = plan.policies.iter().find(|p| p.name == "backend-ingress").unwrap();
        api.upsert(manifest.manifest.clone());
        on_every_node(&session, "kube:CiliumNetworkPolicy/default/backend-ingress", true).await;
        let client_c = plan.pods.iter().position(|p| p.name == "client-c").unwrap();
        let client_c_v4 = format!("{}/32", plan.pods[client_c].ipv4.unwrap());
        api.delete("Pod", "default/client-c");
        eventually("node-b forgets client-c", async || {
            (!ipcache(&session, 1).await.contains_key(&client_c_v4)).then_some(())
        })
        .await;
        session.wait_realized().await.unwrap();
        assert_eq!(seen(observe(&session, &flows).await), [A, D, D, D]);
        api.upsert(kubeapi::pod_object(&plan, client_c, "node-c"));
        eventually("node-b learns client-c again", async || {
            ipcache(&session, 1).await.get(&client_c_v4).is_some_and(|id| *id >= 256).then_some(())
        })
        .await;
        session.wait_realized().await.unwrap();
        assert_eq!(seen(observe(&session, &flows).await), [A, A, D, D]);
        session.down().await;
    });
}

#[test]
fn with_the_kvstore_identities_agree_across_nodes_in_kubernetes_mode_privileged() {
    palisade_privileged::require_root!();
    if !etcd_or_skip() {
        return;
    }
    let (plan, names, opts) = kube_kvstore_run("cq");
    let rt = runtime();
    rt.block_on(async {
        let session = Session::up(&plan, &opts, &names).await.expect("the cluster comes up, Kubernetes and kvstore");
        let per_node = [identities(&session, 0).await, identities(&session, 1).await, identities(&session, 2).await];
        // frontend (node-a) and client-c (node-c) share a label set: one number everywhere.
        let mut shared = 0;
        for (labels, id) in &per_node[0] {
            for other in &per_node[1..] {
                if let Some(o) = other.get(labels) {
                    assert_eq!(o, id, "{labels}: {id} on node-a, {o} elsewhere");
                    shared += 1;
                }
            }
        }
        assert!(shared >= 2, "{per_node:?}");
        // Node-a's ipcache holds backend (node-b) under node-b's own number for it.
        let backend = plan.pods.iter().find(|p| p.name == "backend").unwrap();
        let backend_v4 = format!("{}/32", backend.ipv4.unwrap());
        let on_b = ipcache(&session, 1).await[&backend_v4];
        assert_eq!(ipcache(&session, 0).await.get(&backend_v4), Some(&on_b));
        let flows = [
            tcp_probe(&plan, "default/client-c", "default/backend", 8080, Allow),
            tcp_probe(&plan, "default/frontend", "default/backend", 9090, Deny),
        ];
        let seen: Vec<Observed> = observe(&session, &flows).await.into_iter().map(|(o, _)| o).collect();
        assert_eq!(seen, [Observed::Allow, Observed::Deny]);
        session.down().await;
    });
}

/// Issue 18's long etcd outage, in Kubernetes mode with the kvstore: etcd stopped for 30 s
/// while client-c comes back on node-c and `other` goes from node-a (through the API), with
/// frontend (node-a) probing backend (node-b) on an allowed and a denied port all along:
/// not one wrong verdict; while etcd is away node-b does not know the new pod (world:
/// denied, fail closed) and keeps the removed one; once etcd answers again node-b learns
/// client-c with frontend's number (client-c is allowed) and forgets `other`.
#[test]
fn etcd_away_30s_while_a_pod_comes_on_one_node_and_one_goes_on_another_privileged() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};
    palisade_privileged::require_root!();
    if !etcd_or_skip() {
        return;
    }
    let (plan, names, opts) = kube_kvstore_run("co");
    let rt = runtime();
    rt.block_on(async {
        let mut session = Session::up(&plan, &opts, &names).await.expect("the cluster comes up, Kubernetes and kvstore");
        let api = session.kube_api().unwrap().clone();
        let pod = |name: &str| plan.pods.iter().position(|p| p.name == name).unwrap();
        let v4 = |i: usize| format!("{}/32", plan.pods[i].ipv4.unwrap());
        let (client_c, other, backend) = (pod("client-c"), pod("other"), pod("backend"));
        let frontend_id = identities(&session, 0)
            .await
            .into_iter()
            .find(|(l, _)| l.split(',').any(|x| x == "k8s:app=frontend"))
            .map(|(_, id)| id)
            .unwrap();
        let c_to_backend = [tcp_probe(&plan, "default/client-c", "default/backend", 8080, Allow)];
        macro_rules! seen {
            () => {
                observe(&session, &c_to_backend).await.remove(0).0
            };
        }

        // client-c leaves first (node-b forgets it through etcd), to come back later.
        api.delete("Pod", "default/client-c");
        eventually("node-b forgets client-c", async || {
            (!ipcache(&session, 1).await.contains_key(&v4(client_c))).then_some(())
        })
        .await;
        session.wait_realized().await.unwrap();
        assert_eq!(seen!(), Observed::Deny, "client-c unknown to node-b: world");

        let stop = Arc::new(AtomicBool::new(false));
        let probing = {
            let ns = session.topology().pods[pod("frontend")].netns.open().unwrap();
            let server = std::net::IpAddr::V4(plan.pods[backend].ipv4.unwrap());
            let stop = stop.clone();
            std::thread::spawn(move || {
                probe_continuously(ns, server, [8080, 9090], stop, 5_000, Duration::from_mins(3))
            })
        };
        session.etcd().unwrap().stop();
        let stopped = Instant::now();
        api.upsert(kubeapi::pod_object(&plan, client_c, "node-c"));
        api.delete("Pod", "default/other");
        tokio::time::sleep(Duration::from_secs(5)).await;
        let b = ipcache(&session, 1).await;
        assert!(!b.contains_key(&v4(client_c)), "node-b cannot learn client-c while etcd is away");
        assert!(b.contains_key(&v4(other)), "node-b keeps what it learnt while etcd is away");
        assert_eq!(seen!(), Observed::Deny, "the new pod fails closed while etcd is away");
        // node-b's agent SIGKILLed and started again while etcd is away: it cannot list the
        // store, so it holds the kernel's state as it found it (the probes keep their
        // verdicts), and it keeps its pods' numbers.
        let numbers = |ids: BTreeMap<String, u32>| {
            // node-b's own pod and the remote one that stays (`other` goes, and its number
            // with it).
            ids.into_iter()
                .filter(|(l, _)| l.contains("k8s:app=backend") || l.contains("k8s:app=frontend"))
                .collect::<BTreeMap<_, _>>()
        };
        let before = numbers(identities(&session, 1).await);
        session
            .restart_agent_of_unsynced(1, palisade_testbed::agent::StopHow::Kill)
            .await
            .expect("node-b's agent starts again while etcd is away");
        let b = ipcache(&session, 1).await;
        let log = palisade_testbed::agent::log_tail(&session.node_dirs(1).log, 30);
        assert!(b.contains_key(&v4(other)) && !b.contains_key(&v4(client_c)), "the restarted node-b holds what it had: {b:?}\n{log}");
        tokio::time::sleep(Duration::from_secs(30).saturating_sub(stopped.elapsed())).await;
        session.etcd().unwrap().restart().expect("etcd comes back");
        let back = Instant::now();
        let (learnt, forgot) = (std::cell::Cell::new(None), std::cell::Cell::new(None));
        let converged = eventually("node-b learns client-c and forgets other once etcd is back", async || {
            let b = ipcache(&session, 1).await;
            if b.get(&v4(client_c)) == Some(&frontend_id) && learnt.get().is_none() {
                learnt.set(Some(back.elapsed()));
            }
            if !b.contains_key(&v4(other)) && forgot.get().is_none() {
                forgot.set(Some(back.elapsed()));
            }
            (learnt.get().is_some() && forgot.get().is_some()).then(|| back.elapsed())
        })
        .await;
        session.wait_realized().await.unwrap();
        eprintln!(
            "converged {converged:?} after etcd answered again (outage {:?}): client-c learnt after {:?}, other forgotten after {:?}",
            back - stopped,
            learnt.get().unwrap(),
            forgot.get().unwrap()
        );
        assert_eq!(seen!(), Observed::Allow, "client-c has frontend's rights again");
        let after = numbers(identities(&session, 1).await);
        assert_eq!(before.len(), 2, "{before:?}");
        for (labels, id) in &before {
            assert_eq!(after.get(labels), Some(id), "node-b's restarted agent keeps the number of {labels}");
        }
        stop.store(true, Ordering::Relaxed);
        let tally = probing.join().unwrap();
        assert!(tally.rounds >= 10, "{tally}");
        assert!(tally.wrong.is_empty(), "{tally}: {:?}", tally.wrong);
        session.down().await;
    });
}
