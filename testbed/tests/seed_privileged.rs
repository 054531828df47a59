//! The seed scenario against the real agent (needs root, and palisade-agent built next to
//! palisade-testbed: `cargo build --bins`).
mod common;

use common::*;

#[test]
fn seed_scenario_passes_with_the_real_agent_privileged() {
    palisade_privileged::require_root!();
    built_agent();
    let file = fixture("seed-allow-frontend-to-backend.yaml");
    let (pid, out) = run(&["run", "--json", file.to_str().unwrap()]);
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "stdout:\n{stdout}\nstderr:\n{stderr}");

    let doc: serde_json::Value = serde_json::from_str(&stdout).expect("one JSON document on stdout");
    let scenarios = doc["scenarios"].as_array().expect("scenarios");
    assert_eq!(scenarios.len(), 1);
    let s = &scenarios[0];
    assert_eq!(s["name"], "allow-frontend-to-backend");
    assert_eq!(s["file"], file.to_str().unwrap());
    let probes = s["probes"].as_array().expect("probes");
    assert_eq!(probes.len(), 15);
    for p in probes {
        assert_eq!(p["observed"], p["expect"], "{p}");
        assert!(p["ms"].is_u64(), "{p}");
    }
    let first = &probes[0];
    assert_eq!(
        (&first["from"], &first["to"], &first["port"], &first["protocol"], &first["expect"]),
        (&"default/frontend".into(), &"default/backend".into(), &8080.into(), &"TCP".into(), &"allow".into())
    );
    // 9090/TCP is dropped at backend's ingress, by default deny.
    let denied = &probes[1];
    assert_eq!(denied["port"], 9090);
    assert_eq!(denied["observed"], "deny");
    let detail = denied["detail"].as_str().unwrap_or_default();
    assert!(detail.contains("ingress") && detail.contains("default/backend"), "{detail}");
    // The ICMP probe has no port.
    assert!(probes.iter().any(|p| p["protocol"] == "ICMP" && p["port"].is_null()));

    assert_eq!(leftovers(pid), Vec::<String>::new(), "the run left things behind");
}
