//! Audit mode with the real agent and real packets (needs root and the binaries built:
//! `cargo build --bins`):
//!
//! - the flow records (`palisade observe`) hold AUDIT flows for exactly the probes that the
//!   audited policies would drop, naming the audited policy and rule (or, for a would-be
//!   default deny, the policy that would make it), and `palisade policy list` shows each
//!   policy's mode;
//! - what is enforced is identical to the same scenario without the audited policies.
mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Output};

use common::*;
use palisade_policy::yaml::{self, Value};
use palisade_testbed::instance::InstanceState;

const SCENARIO: &str = "audit-policy-annotation.yaml";

fn palisade(socket: &Path, args: &[&str]) -> Output {
    Command::new(Path::new(BIN).with_file_name("palisade"))
        .arg("--socket")
        .arg(socket)
        .args(args)
        .output()
        .expect("palisade runs")
}

fn scenario() -> Value {
    yaml::from_str(&std::fs::read_to_string(fixture(SCENARIO)).unwrap()).unwrap()
}

fn audited(policy: &Value) -> bool {
    policy["metadata"]["annotations"]["palisade.io/audit"] == "true"
}

/// (from, to, port) of the scenario's probes that expect `expect`.
fn probes_expecting(s: &Value, expect: &str) -> BTreeSet<(String, String, u64)> {
    s["probes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["expect"] == expect)
        .map(|p| (p["from"].as_str().unwrap().into(), p["to"].as_str().unwrap().into(), p["port"].as_u64().unwrap()))
        .collect()
}

#[test]
fn audit_flows_are_exactly_the_would_be_drops_privileged() {
    palisade_privileged::require_root!();
    built_agent();
    let s = scenario();
    let want_audit = probes_expecting(&s, "audit");
    assert_eq!(want_audit.len(), 2, "the fixture has a deny-rule and a default-deny audit hit");

    let root = tempfile::tempdir().unwrap();
    ok(&testbed(root.path(), &["up", fixture(SCENARIO).to_str().unwrap()]));
    let _down = Down(root.path());
    let state = InstanceState::load(&root.path().join("default")).unwrap().expect("up wrote the state");
    let socket = state.api_socket.clone();

    for p in s["probes"].as_array().unwrap() {
        let spec = format!("{}/{}", p["port"], p["protocol"].as_str().unwrap());
        let (from, to, expect) =
            (p["from"].as_str().unwrap(), p["to"].as_str().unwrap(), p["expect"].as_str().unwrap());
        ok(&testbed(root.path(), &["probe", "--expect", expect, from, to, &spec]));
    }

    // Exactly the would-be drops are AUDIT flows, and each names what would have dropped it.
    let out = ok(&palisade(&socket, &["observe", "--verdict", "AUDIT", "-o", "json", "--last", "1000"]));
    let audits: Vec<Value> =
        out.lines().map(|l| serde_json::from_str::<Value>(l).unwrap()).filter_map(|v| v.get("flow").cloned()).collect();
    let got: BTreeSet<(String, String, u64)> = audits
        .iter()
        .map(|f| {
            assert_eq!(f["verdict"], "AUDIT", "{f}");
            let pod = |e: &Value| format!("{}/{}", e["namespace"].as_str().unwrap(), e["pod_name"].as_str().unwrap());
            (pod(&f["source"]), pod(&f["destination"]), f["l4"]["TCP"]["destination_port"].as_u64().unwrap())
        })
        .collect();
    assert_eq!(got, want_audit, "AUDIT flows: {audits:#?}");
    let by = |port: u64| {
        let f = audits.iter().find(|f| f["l4"]["TCP"]["destination_port"] == port).unwrap();
        (f["drop_reason_desc"].clone(), f["ingress_denied_by"][0].clone(), f["Summary"].clone())
    };
    let (reason, p, summary) = by(9090);
    assert_eq!(reason, "POLICY_DENY", "{summary}");
    assert_eq!(
        (&p["kind"], &p["namespace"], &p["name"], &p["rule"], &p["action"]),
        (
            &"CiliumNetworkPolicy".into(),
            &"default".into(),
            &"deny-metrics".into(),
            &"spec.ingressDeny[0]".into(),
            &"audit".into()
        ),
        "{summary}"
    );
    let (reason, p, summary) = by(8000);
    assert_eq!(reason, "POLICY_DENIED", "{summary}");
    assert_eq!(
        (&p["kind"], &p["name"], &p["action"]),
        (&"NetworkPolicy".into(), &"isolate-other".into(), &"audit".into()),
        "{summary}"
    );
    assert!(summary.as_str().unwrap().starts_with("audit: passed"), "{summary}");

    // The enforced deny is a drop as before, and nothing audited appears among the drops.
    let out = ok(&palisade(&socket, &["observe", "--verdict", "DROPPED", "-o", "json", "--last", "1000"]));
    for l in out.lines() {
        let v: Value = serde_json::from_str(l).unwrap();
        let Some(f) = v.get("flow") else { continue };
        assert_eq!(f["source"]["pod_name"], "other", "only other -> backend is dropped: {f}");
        assert!(f["ingress_denied_by"].as_array().unwrap().iter().all(|p| p["action"] == "default-deny"), "{f}");
    }

    // Each policy's mode.
    let list: Value = serde_json::from_str(&ok(&palisade(&socket, &["-o", "json", "policy", "list"]))).unwrap();
    let modes: BTreeSet<(String, bool)> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["name"].as_str().unwrap().to_string(), p["audit"].as_bool().unwrap_or(false)))
        .collect();
    let want: BTreeSet<(String, bool)> =
        [("allow-frontend-to-backend", false), ("deny-metrics", true), ("isolate-other", true)]
            .into_iter()
            .map(|(n, a)| (n.to_string(), a))
            .collect();
    assert_eq!(modes, want);
    let table = ok(&palisade(&socket, &["policy", "list"]));
    assert!(table.lines().any(|l| l.contains("deny-metrics") && l.contains(" audit ")), "{table}");
    assert!(table.lines().any(|l| l.contains("allow-frontend-to-backend") && l.contains(" enforce ")), "{table}");
}

#[test]
fn enforcement_is_identical_without_the_audited_policies_privileged() {
    palisade_privileged::require_root!();
    built_agent();
    let s = scenario();
    // The same scenario without the audited policies: every `audit` probe must be `allow`.
    let mut stripped = s.clone();
    stripped["name"] = "audit-policy-annotation-without-audited".into();
    stripped["policies"] =
        Value::Array(s["policies"].as_array().unwrap().iter().filter(|p| !audited(p)).cloned().collect());
    assert_eq!(stripped["policies"].as_array().unwrap().len(), 1);
    for p in stripped["probes"].as_array_mut().unwrap() {
        if p["expect"] == "audit" {
            p["expect"] = "allow".into();
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let stripped_file = dir.path().join("without-audited.yaml");
    std::fs::write(&stripped_file, yaml::to_string(&stripped).unwrap()).unwrap();

    let (pid, out) = run(&["run", "--json", fixture(SCENARIO).to_str().unwrap(), stripped_file.to_str().unwrap()]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "stdout:\n{stdout}\nstderr:\n{}", text(&out.stderr));
    let doc: Value = serde_json::from_str(&stdout).unwrap();
    let observed = |i: usize| -> Vec<String> {
        doc["scenarios"][i]["probes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["observed"].as_str().unwrap().to_string())
            .collect()
    };
    let (with, without) = (observed(0), observed(1));
    assert_eq!(with.iter().filter(|o| *o == "audit").count(), 2, "{with:?}");
    let enforced: Vec<String> = with.iter().map(|o| if o == "audit" { "allow".into() } else { o.clone() }).collect();
    assert_eq!(enforced, without, "what passes and what drops is the same with and without the audited policies");
    assert!(!without.iter().any(|o| o == "audit"), "{without:?}");
    assert_eq!(leftovers(pid), Vec::<String>::new());
}
