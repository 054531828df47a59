//! Several nodes in file mode, with real packets: every scenario in fixtures/cluster run by
//! the binary (each node its own namespace and agent, the underlay between them, cross-node
//! verdicts judged on both nodes), a wrong expectation that must fail, the other nodes'
//! pods learnt from the agent's watched file, a policy edit enforced on every node, and
//! `up`/`probe`/`exec NODE`/`down` (also after the testbed process was killed outright).
//! Needs root and the binaries built (`cargo build --bins`).
mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use palisade_testbed::instance::{InstanceState, ProcRef};
use palisade_testbed::report::Observed;
use palisade_testbed::session::Session;

#[test]
fn every_cluster_fixture_passes_with_each_side_judged_on_its_node_privileged() {
    palisade_privileged::require_root!();
    built_agent();
    let files = cluster_fixtures();
    assert!(files.len() >= 2, "{files:?}");
    let (_, probes) = run_expecting_all_pass(&[], &files);
    let mut cross_node = 0;
    for p in &probes {
        let nodes = &p["nodes"];
        assert!(nodes.is_object(), "{p}");
        if p["from"] == "default/frontend" && p["to"] == "default/backend" {
            assert_eq!(nodes["egress"], "node-a", "{p}");
            assert_eq!(nodes["ingress"], "node-b", "{p}");
            cross_node += 1;
        }
        if p["from"] == "node:node-a" {
            // A node is no endpoint: only the destination's node judges.
            assert_eq!(nodes["egress"], serde_json::Value::Null, "{p}");
        }
    }
    assert!(cross_node >= 6, "{cross_node} frontend -> backend probes");
}

#[test]
fn a_wrong_cross_node_expectation_fails_privileged() {
    palisade_privileged::require_root!();
    built_agent();
    let text_in = std::fs::read_to_string(cluster_fixture("three-nodes-frontend-backend.yaml")).unwrap();
    let wrong = text_in.replace(
        "{from: default/frontend, to: default/backend, port: 9090, protocol: TCP, expect: deny}",
        "{from: default/frontend, to: default/backend, port: 9090, protocol: TCP, expect: allow}",
    );
    assert_ne!(wrong, text_in);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("wrong.yaml");
    std::fs::write(&file, wrong).unwrap();
    let (pid, out) = run(&["run", "--json", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let doc: serde_json::Value = serde_json::from_str(&text(&out.stdout)).unwrap();
    let probes = doc["scenarios"][0]["probes"].as_array().unwrap();
    let failed: Vec<&serde_json::Value> = probes.iter().filter(|p| p["observed"] != p["expect"]).collect();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0]["observed"], "deny");
    assert!(failed[0]["detail"].as_str().unwrap().contains("ingress of default/backend"), "{}", failed[0]);
    assert_eq!(leftovers(pid), Vec::<String>::new());
}

/// The other nodes' pods come from each agent's watched file; an edit of one file and of
/// the one policy directory are enforced where they should be.
#[test]
fn remote_endpoints_file_and_policy_edits_are_enforced_on_each_node_privileged() {
    palisade_privileged::require_root!();
    let text_in = std::fs::read_to_string(cluster_fixture("three-nodes-frontend-backend.yaml")).unwrap();
    let (plan, names, opts) = agent_run(&text_in, "rf", &[]);
    let rt = runtime();
    rt.block_on(async {
        let session = Session::up(&plan, &opts, &names).await.expect("the cluster comes up");
        let probe = |from: &str, to: &str, port: u16| {
            tcp_probe(&plan, from, to, port, palisade_testbed::scenario::Expect::Allow)
        };
        let front = probe("default/frontend", "default/backend", 8080);
        assert_eq!(observe(&session, std::slice::from_ref(&front)).await[0].0, Observed::Allow);

        // node-b forgets frontend: its address is world there, and backend's ingress denies it.
        let file = session.dirs_of(1).unwrap().remote_endpoints();
        let original = std::fs::read_to_string(&file).unwrap();
        let mut doc: serde_json::Value = serde_json::from_str(&original).unwrap();
        doc["pods"].as_array_mut().unwrap().retain(|p| p["name"] != "frontend");
        let staged = file.with_extension("tmp");
        std::fs::write(&staged, doc.to_string()).unwrap();
        std::fs::rename(&staged, &file).unwrap();
        let client_b = session.client_of(1).unwrap();
        let frontend_ip = plan.pods[0].ipv4.unwrap().to_string();
        eventually("node-b drops frontend from its ipcache", async || {
            let entries = client_b.ipcache().await.ok()?;
            (!entries.iter().any(|e| e.prefix == format!("{frontend_ip}/32"))).then_some(())
        })
        .await;
        let (seen, why) = observe(&session, std::slice::from_ref(&front)).await.remove(0);
        assert_eq!(seen, Observed::Deny, "{why}");
        assert!(why.contains("ingress of default/backend"), "{why}");
        // node-a still knows backend: frontend's egress was never the problem.
        let entries = session.client_of(0).unwrap().ipcache().await.unwrap();
        let backend_ip = plan.pods[2].ipv4.unwrap().to_string();
        assert!(entries.iter().any(|e| e.prefix == format!("{backend_ip}/32") && e.identity >= 256), "{entries:?}");

        std::fs::write(&staged, &original).unwrap();
        std::fs::rename(&staged, &file).unwrap();
        eventually("node-b knows frontend again", async || {
            let (seen, _) = observe(&session, std::slice::from_ref(&front)).await.remove(0);
            (seen == Observed::Allow).then_some(())
        })
        .await;

        // One policy directory for the cluster: an egress rule for frontend, enforced on node-a.
        let status = session
            .write_policy_file(
                "900-frontend-egress.yaml",
                "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: frontend-egress, namespace: default}\nspec:\n  endpointSelector: {matchLabels: {app: frontend}}\n  egress:\n    - toEndpoints: [{matchLabels: {app: backend}}]\n      toPorts: [{ports: [{port: \"9090\", protocol: TCP}]}]\n",
            )
            .await
            .unwrap();
        assert!(status.enforced, "{status:?}");
        let (seen, why) = observe(&session, std::slice::from_ref(&front)).await.remove(0);
        assert_eq!(seen, Observed::Deny, "{why}");
        assert!(why.contains("egress of default/frontend"), "{why}");
        for k in 0..3 {
            let policies = session.client_of(k).unwrap().policies().await.unwrap();
            assert!(policies.iter().any(|p| p.name == "frontend-egress" && p.enforced), "node {k}: {policies:?}");
        }

        // node-b's agent killed and started again: it reads its file again, so other (on
        // node-a) is still recognised by its labels at backend's ingress.
        let mut session = session;
        session.restart_agent_of(1, palisade_testbed::agent::StopHow::Kill).await.unwrap();
        let other = probe("default/other", "default/backend", 9090);
        let denied = probe("default/other", "default/node-agent", 9100);
        let seen = eventually("node-b recognises other again after its restart", async || {
            let seen = observe(&session, &[other.clone(), denied.clone()]).await;
            (seen[0].0 == Observed::Allow).then_some(seen)
        })
        .await;
        assert_eq!(seen[1].0, Observed::Deny, "{}", seen[1].1);
        session.down().await;
    });
    assert_eq!(leftovers(std::process::id()), Vec::<String>::new());
}

#[test]
fn up_probe_exec_node_down_with_three_nodes_privileged() {
    palisade_privileged::require_root!();
    built_agent();
    let root = tempfile::tempdir().unwrap();
    let file = cluster_fixture("three-nodes-frontend-backend.yaml");
    let file = file.to_str().unwrap();
    let dir = root.path().join("default");

    let out = ok(&testbed(root.path(), &["up", file]));
    assert!(out.contains("node node-b: agent process") && out.contains("node node-c: agent process"), "{out}");
    assert!(out.contains("(node node-a), log"), "{out}");
    assert!(out.contains("node:node-b") && out.contains("10.201.0.1"), "{out}");
    let state = InstanceState::load(&dir).unwrap().expect("up wrote the state");
    assert_eq!(state.nodes.len(), 2, "{state:?}");
    let agents: Vec<ProcRef> = state.nodes.iter().filter_map(|n| n.agent).chain(state.agent).collect();
    assert_eq!(agents.len(), 3);
    assert!(agents.iter().all(ProcRef::alive));

    let out = ok(&testbed(root.path(), &["probe", "default/frontend", "default/backend", "8080/TCP"]));
    assert!(out.contains("8080/TCP: allow"), "{out}");
    assert!(out.contains("[judged on: egress node-a, ingress node-b]"), "{out}");
    let out = ok(&testbed(root.path(), &["probe", "--json", "default/client-c", "default/backend", "9090/TCP"]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!((v["observed"].as_str(), v["judgedOn"].as_str()), (Some("deny"), Some("egress node-c, ingress node-b")));
    let out = ok(&testbed(root.path(), &["probe", "--expect", "deny", "node:node-c", "default/backend", "8080/TCP"]));
    assert!(out.contains("ingress of default/backend"), "{out}");
    let out =
        ok(&testbed(root.path(), &["probe", "--expect", "deny", "default/other", "default/node-agent", "9100/TCP"]));
    assert!(out.contains("egress of default/other"), "{out}");

    // exec NODE: node-b's namespace, with its address and the underlay to the others.
    let out = ok(&testbed(root.path(), &["exec", "node-b", "--", "ip", "-brief", "addr"]));
    assert!(out.contains("10.201.0.1/32") && out.contains("ul0") && out.contains("ul2"), "{out}");
    let out = ok(&testbed(root.path(), &["exec", "node:node-a", "--", "ip", "route"]));
    assert!(out.contains("10.201.0.0/16 dev ul1") && out.contains("10.202.0.0/16 dev ul2"), "{out}");

    // The testbed process killed outright: `down` still stops every agent and removes all.
    assert!(state.holder.signal(nix::sys::signal::Signal::SIGKILL));
    assert!(state.holder.wait_gone(Duration::from_secs(10)));
    let out = ok(&testbed(root.path(), &["down"]));
    assert!(out.contains("left behind"), "{out}");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while agents.iter().any(ProcRef::alive) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!agents.iter().any(ProcRef::alive), "an agent survived");
    let mut left = leftovers(state.holder.pid);
    left.extend(state.namespaces.iter().filter(|n| Path::new("/var/run/netns").join(n).exists()).cloned());
    for d in state.nodes.iter().flat_map(|n| [&n.run_dir, &n.bpffs_dir]).chain([&state.run_dir, &state.bpffs_dir]) {
        if d.exists() {
            left.push(d.display().to_string());
        }
    }
    assert_eq!(left, Vec::<String>::new());
    assert!(!dir.exists());
}
