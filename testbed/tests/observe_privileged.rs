//! `palisade observe` on the seed scenario with the real agent: the testbed brings it up,
//! sends probes (one allowed, the denied ones), and the flow records name both pods, the
//! rule that allowed, and for each default deny the policy that put `default/backend` into
//! default deny. Needs root and the binaries built (`cargo build --bins`).
mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::*;
use palisade_testbed::instance::InstanceState;

fn observe(socket: &Path, args: &[&str]) -> Output {
    Command::new(Path::new(BIN).with_file_name("palisade"))
        .arg("--socket")
        .arg(socket)
        .arg("observe")
        .args(args)
        .output()
        .expect("palisade runs")
}

fn flows(out: &str) -> Vec<serde_json::Value> {
    out.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .filter_map(|v| v.get("flow").cloned())
        .collect()
}

#[test]
fn observe_names_the_pods_and_the_deciding_policy_privileged() {
    palisade_privileged::require_root!();
    built_agent();
    let root = tempfile::tempdir().unwrap();
    let seed = fixture("seed-allow-frontend-to-backend.yaml");
    ok(&testbed(root.path(), &["up", seed.to_str().unwrap()]));
    let _down = Down(root.path());
    let state = InstanceState::load(&root.path().join("default")).unwrap().expect("up wrote the state");
    let socket = state.api_socket.clone();

    ok(&testbed(root.path(), &["probe", "--expect", "allow", "default/frontend", "default/backend", "8080/TCP"]));
    ok(&testbed(root.path(), &["probe", "--expect", "deny", "default/frontend", "default/backend", "9090/TCP"]));
    ok(&testbed(root.path(), &["probe", "--expect", "deny", "default/other", "default/backend", "8080/TCP"]));
    ok(&testbed(root.path(), &["probe", "--expect", "deny", "default/frontend", "default/backend", "8080/UDP"]));

    let dropped = flows(&ok(&observe(&socket, &["--verdict", "DROPPED", "-o", "json", "--last", "1000"])));
    assert!(!dropped.is_empty());
    for f in &dropped {
        assert_eq!(f["verdict"], "DROPPED", "{f}");
    }
    let find = |src: &str, port: u64, proto: &str| {
        dropped
            .iter()
            .find(|f| {
                f["source"]["pod_name"] == src
                    && f["destination"]["pod_name"] == "backend"
                    && f["l4"][proto]["destination_port"] == port
            })
            .unwrap_or_else(|| panic!("no dropped flow {src} -> backend {port}/{proto} in {dropped:#?}"))
    };
    for (src, port, proto) in [("frontend", 9090, "TCP"), ("other", 8080, "TCP"), ("frontend", 8080, "UDP")] {
        let f = find(src, port, proto);
        assert_eq!(f["source"]["namespace"], "default");
        assert_eq!(f["destination"]["namespace"], "default");
        assert_eq!(f["traffic_direction"], "INGRESS");
        assert_eq!(f["drop_reason_desc"], "POLICY_DENIED", "a default deny: {f}");
        let by = &f["ingress_denied_by"][0];
        assert_eq!(
            (&by["kind"], &by["namespace"], &by["name"], &by["action"]),
            (
                &"CiliumNetworkPolicy".into(),
                &"default".into(),
                &"allow-frontend-to-backend".into(),
                &"default-deny".into()
            ),
            "{f}"
        );
        assert!(f["source"]["labels"].as_array().unwrap().iter().any(|l| l == &format!("k8s:app={src}")), "{f}");
        assert!(f["destination"]["identity"].as_u64().unwrap() >= 256, "{f}");
    }

    // The allowed probe names its rule (at backend's ingress; frontend's egress is not
    // enforced).
    let allowed = flows(&ok(&observe(
        &socket,
        &["--from-pod", "default/frontend", "--to-pod", "default/backend", "--verdict", "FORWARDED", "-o", "json"],
    )));
    let f = allowed
        .iter()
        .find(|f| f["traffic_direction"] == "INGRESS" && f["l4"]["TCP"]["destination_port"] == 8080)
        .unwrap_or_else(|| panic!("no allowed flow at backend's ingress in {allowed:#?}"));
    let by = &f["ingress_allowed_by"][0];
    assert_eq!(
        (&by["kind"], &by["namespace"], &by["name"], &by["rule"], &by["action"]),
        (
            &"CiliumNetworkPolicy".into(),
            &"default".into(),
            &"allow-frontend-to-backend".into(),
            &"spec.ingress[0]".into(),
            &"allow".into()
        ),
        "{f}"
    );

    // Filters, --not and the compact line.
    let out = ok(&observe(&socket, &["--verdict", "DROPPED", "--not", "--from-pod", "default/frontend"]));
    assert!(out.lines().count() >= 1, "{out}");
    assert!(out.lines().all(|l| l.contains("default/other:") && !l.contains("default/frontend:")), "{out}");
    assert!(out.contains("by CiliumNetworkPolicy default/allow-frontend-to-backend (default deny)"), "{out}");
    let bad = observe(&socket, &["--verdict", "DROP"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(text(&bad.stderr).contains("FORWARDED, DROPPED, AUDIT"), "{}", text(&bad.stderr));

    // --follow: a flow that happens after the call arrives on the open stream (and none
    // from before it with --last 0).
    let mut child = Command::new(Path::new(BIN).with_file_name("palisade"))
        .arg("--socket")
        .arg(&socket)
        .args(["observe", "--follow", "--last", "0", "-o", "json", "--to-pod", "default/backend", "--port", "9090"])
        .args(["--verdict", "DROPPED"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // The stream is open once the agent answered; give it a moment before the probe.
    std::thread::sleep(std::time::Duration::from_millis(300));
    ok(&testbed(root.path(), &["probe", "--expect", "deny", "default/frontend", "default/backend", "9090/TCP"]));
    let line = rx.recv_timeout(std::time::Duration::from_secs(10));
    let _ = child.kill();
    let _ = child.wait();
    let line = line.expect("the followed drop arrives within 10 s");
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["flow"]["verdict"], "DROPPED", "{line}");
    assert_eq!(v["flow"]["destination"]["pod_name"], "backend", "{line}");
    assert_eq!(v["flow"]["l4"]["TCP"]["destination_port"], 9090, "{line}");
    let first = dropped.iter().find(|f| f["l4"]["TCP"]["destination_port"] == 9090).unwrap();
    assert_ne!(v["flow"]["time"], first["time"], "a new flow, not the buffered one");

    // `policy explain` names the same policy for the default deny.
    let out = Command::new(Path::new(BIN).with_file_name("palisade"))
        .arg("--socket")
        .arg(&socket)
        .args(["-o", "json", "policy", "explain", "--from", "default/frontend", "--to", "default/backend"])
        .args(["--port", "9090"])
        .output()
        .unwrap();
    let e: serde_json::Value = serde_json::from_str(&ok(&out)).unwrap();
    assert_eq!(e["ingress"]["decision"], "default-deny");
    assert_eq!(e["ingress"]["defaultDenyBy"][0], "CiliumNetworkPolicy default/allow-frontend-to-backend");
    // ... and the nearest rule, the same text as the flow record's.
    let nearest = "CiliumNetworkPolicy default/allow-frontend-to-backend spec.ingress[0], which the flow misses by: \
                   port 8080/TCP";
    assert_eq!(e["ingress"]["nearestRule"], nearest, "{e}");
    assert_eq!(first["nearest_rule"], nearest, "{first}");
    // ... and the same rule for the allowed flow as its flow record.
    let out = Command::new(Path::new(BIN).with_file_name("palisade"))
        .arg("--socket")
        .arg(&socket)
        .args(["-o", "json", "policy", "explain", "--from", "default/frontend", "--to", "default/backend"])
        .args(["--port", "8080"])
        .output()
        .unwrap();
    let e: serde_json::Value = serde_json::from_str(&ok(&out)).unwrap();
    let rule = format!(
        "{} {}/{} {}",
        by["kind"].as_str().unwrap(),
        by["namespace"].as_str().unwrap(),
        by["name"].as_str().unwrap(),
        by["rule"].as_str().unwrap()
    );
    assert_eq!(e["ingress"]["rules"], serde_json::json!([rule]));
}

/// `observe --all-nodes` on a three-node testbed: a connection from node-a to node-b is
/// recorded at frontend's egress by node-a's agent and at backend's ingress by node-b's;
/// the merge has both, ordered by time, each with its node's name, while one agent alone
/// has only its half.
#[test]
fn observe_all_nodes_merges_the_agents_by_time_privileged() {
    palisade_privileged::require_root!();
    built_agent();
    let root = tempfile::tempdir().unwrap();
    let file = cluster_fixture("three-nodes-frontend-backend.yaml");
    ok(&testbed(root.path(), &["up", file.to_str().unwrap()]));
    let _down = Down(root.path());
    let state = InstanceState::load(&root.path().join("default")).unwrap().expect("up wrote the state");
    assert_eq!(state.first_node.as_deref(), Some("node-a"), "{state:?}");
    ok(&testbed(root.path(), &["probe", "--expect", "deny", "default/frontend", "default/backend", "9090/TCP"]));
    ok(&testbed(root.path(), &["probe", "--expect", "allow", "default/frontend", "default/backend", "8080/TCP"]));

    let palisade = Path::new(BIN).with_file_name("palisade");
    let mut all = Command::new(&palisade);
    all.arg("--socket").arg(&state.api_socket);
    for n in &state.nodes {
        all.arg("--agent").arg(&n.api_socket);
    }
    // By pod: node-a's record of the egress half names the backend of node-b too (its agent
    // knows the other nodes' pods from the remote endpoints file).
    let backend = state.ends.iter().find(|e| e.name == "default/backend").unwrap().ipv4.unwrap().to_string();
    let out = all.args(["observe", "--all-nodes", "-o", "json", "--last", "1000", "--to-pod", "default/backend"]);
    let out = out.output().unwrap();
    let merged = flows(&ok(&out));
    let times: Vec<&str> = merged.iter().map(|f| f["time"].as_str().unwrap()).collect();
    let mut sorted = times.clone();
    sorted.sort_unstable();
    assert_eq!(times, sorted, "merged by time");
    let frontend = state.ends.iter().find(|e| e.name == "default/frontend").unwrap().ipv4.unwrap().to_string();
    let find = |node: &str, dir: &str, verdict: &str, port: u64| {
        merged.iter().find(|f| {
            f["node_name"] == node
                && f["traffic_direction"] == dir
                && f["verdict"] == verdict
                && f["IP"]["source"] == frontend.as_str()
                && f["l4"]["TCP"]["destination_port"] == port
        })
    };
    let egress =
        find("node-a", "EGRESS", "FORWARDED", 9090).unwrap_or_else(|| panic!("node-a's egress record in {merged:#?}"));
    let drop = find("node-b", "INGRESS", "DROPPED", 9090).unwrap_or_else(|| panic!("node-b's drop in {merged:#?}"));
    // The egress half happened first, but each agent turns kernel time into wall time with
    // its own reading of the clocks; a wall-clock step between the two readings (time sync,
    // a resumed VM) moves one agent's records against the other's. Allow that much.
    let ns = |f: &serde_json::Value| palisade_api::flow::parse_time(f["time"].as_str().unwrap(), 0).unwrap();
    assert!(ns(egress) <= ns(drop) + 5_000_000, "the egress before the ingress (within 5 ms): {egress} {drop}");
    assert_eq!(drop["ingress_denied_by"][0]["action"], "default-deny", "{drop}");
    assert_eq!(drop["destination"]["pod_name"], "backend", "{drop}");
    assert_eq!(egress["IP"]["destination"], backend.as_str(), "{egress}");
    assert_eq!(egress["source"]["pod_name"], "frontend", "{egress}");
    assert_eq!(
        (&egress["destination"]["namespace"], &egress["destination"]["pod_name"]),
        (&"default".into(), &"backend".into()),
        "{egress}"
    );
    assert!(egress["destination"]["labels"].as_array().unwrap().iter().any(|l| l == "k8s:app=backend"), "{egress}");
    assert!(find("node-b", "INGRESS", "FORWARDED", 8080).is_some(), "the allowed one at node-b: {merged:#?}");

    // One agent alone has its own node's half only.
    let alone = flows(&ok(&observe(&state.api_socket, &["-o", "json", "--last", "1000", "--ip", &backend])));
    assert!(!alone.is_empty());
    assert!(alone.iter().all(|f| f["node_name"] == "node-a"), "{alone:#?}");

    // Without the other agents named, --all-nodes says how to name them.
    let bad = observe(&state.api_socket, &["--all-nodes"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(text(&bad.stderr).contains("--agent SOCKET"), "{}", text(&bad.stderr));
    // An agent that is not there fails the command, naming it.
    let out = Command::new(&palisade)
        .arg("--socket")
        .arg(&state.api_socket)
        .args(["--agent", "/nonexistent/agent.sock", "observe", "--all-nodes"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("/nonexistent/agent.sock"), "{}", text(&out.stderr));
}
