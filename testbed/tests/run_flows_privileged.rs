//! `palisade-testbed run --flows`: per probe the flow records the real agents emitted for
//! it, "decided by" from them, and a disagreement with the verdict events failing the
//! probe. On the seed scenario and a three-node cluster fixture (the records of a probe
//! come from both nodes that judged it). Needs root and the binaries built.
mod common;

use std::process::Command;

use common::*;
use palisade_testbed::report::Observed;

fn run_json(file: &std::path::Path) -> serde_json::Value {
    let out = Command::new(BIN).args(["run", "--flows", "--json"]).arg(file).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "stdout:\n{}\nstderr:\n{}", text(&out.stdout), text(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn denied_by(f: &serde_json::Value) -> Vec<String> {
    let side = if f["traffic_direction"] == "EGRESS" { "egress_denied_by" } else { "ingress_denied_by" };
    f[side]
        .as_array()
        .map(|a| a.iter().map(|p| format!("{} {}/{}", p["kind"], p["namespace"], p["name"]).replace('"', "")).collect())
        .unwrap_or_default()
}

#[test]
fn run_flows_prints_each_probes_records_privileged() {
    palisade_privileged::require_root!();
    built_agent();
    let seed = fixture("seed-allow-frontend-to-backend.yaml");
    let doc = run_json(&seed);
    let probes = doc["scenarios"][0]["probes"].as_array().unwrap();
    assert!(probes.len() >= 5);
    for p in probes {
        let flows = p["flows"].as_array().unwrap_or_else(|| panic!("no flows for {p}"));
        assert!(!flows.is_empty(), "{p}");
        for f in flows {
            assert_eq!(f["source"]["pod_name"], p["from"].as_str().unwrap().split('/').nth(1).unwrap(), "{p}");
            assert_eq!(f["destination"]["pod_name"], p["to"].as_str().unwrap().split('/').nth(1).unwrap(), "{p}");
        }
        let dropped: Vec<&serde_json::Value> = flows.iter().filter(|f| f["verdict"] == "DROPPED").collect();
        if p["observed"] == "deny" {
            assert!(!dropped.is_empty(), "{p}");
            let ns = p["to"].as_str().unwrap().split('/').next().unwrap();
            assert_eq!(
                denied_by(dropped[0]),
                vec![format!("CiliumNetworkPolicy {ns}/allow-frontend-to-backend")],
                "{p}"
            );
        } else {
            assert!(dropped.is_empty(), "{p}");
        }
    }

    // The table: the records under each probe, "decided by" from them.
    let out = Command::new(BIN).args(["run", "--flows"]).arg(&seed).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let table = text(&out.stdout);
    assert!(
        table.lines().any(|l| l.contains("default/frontend")
            && l.contains("9090/TCP")
            && l.contains(
                "default deny by CiliumNetworkPolicy default/allow-frontend-to-backend (ingress default/backend)"
            )),
        "{table}"
    );
    assert!(
        table.lines().any(|l| l.trim_start().starts_with("flow ") && l.contains("INGRESS DROPPED POLICY_DENIED")),
        "{table}"
    );

    // Several nodes: the egress record from the source's node, the ingress record from the
    // destination's.
    let doc = run_json(&cluster_fixture("three-nodes-frontend-backend.yaml"));
    let probes = doc["scenarios"][0]["probes"].as_array().unwrap();
    let p = probes
        .iter()
        .find(|p| p["from"] == "default/frontend" && p["to"] == "default/backend" && p["port"] == 9090)
        .unwrap();
    let nodes: Vec<(&str, &str)> = p["flows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| (f["node_name"].as_str().unwrap(), f["traffic_direction"].as_str().unwrap()))
        .collect();
    assert!(nodes.contains(&("node-a", "EGRESS")) && nodes.contains(&("node-b", "INGRESS")), "{p}");
}

/// A flow buffer of one record: the records of most probes are overwritten before the
/// testbed reads them, and `--flows` must say so (the probe fails) instead of showing a
/// verdict the records do not back.
#[test]
fn run_flows_fails_a_probe_whose_records_are_missing_privileged() {
    palisade_privileged::require_root!();
    let scenario = client_server_scenario("flows", &[82, 83, 84]);
    let (plan, names, mut opts) = agent_run(&scenario, "flw", &["--flow-buffer-size", "1"]);
    opts.flows = true;
    let report = runtime().block_on(palisade_testbed::runner::run_scenario(&plan, &opts, &names)).unwrap();
    let missing: Vec<_> = report
        .probes
        .iter()
        .filter(|p| p.observed == Observed::Error && p.detail.as_deref().is_some_and(|d| d.contains("no flow record")))
        .collect();
    assert!(!missing.is_empty(), "{report:#?}");
    assert!(!report.ok());
}
