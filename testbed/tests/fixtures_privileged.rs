//! Every scenario in fixtures/scenarios, in one run, against the real agent (needs root and
//! the binaries built: `cargo build --bins`): fed through its local API and policy folder,
//! and again in Kubernetes mode, fed through the testbed's list/watch API server, with the
//! pods plumbed by the palisade-cni plugin as a container runtime would call it.
mod common;

use common::*;

#[test]
fn every_fixture_scenario_passes_privileged() {
    run_every_fixture(&[]);
}

#[test]
fn every_fixture_scenario_passes_in_kubernetes_mode_with_cni_plumbing_privileged() {
    run_every_fixture(&["--kubernetes", "--cni"]);
}

fn run_every_fixture(extra: &[&str]) {
    palisade_privileged::require_root!();
    let dir = fixture("");
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .map(|p| p.to_str().unwrap().to_string())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no scenarios in {}", dir.display());
    let mut args = vec!["run", "--json"];
    args.extend_from_slice(extra);
    args.extend(files.iter().map(String::as_str));
    let (pid, out) = run(&args);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "stdout:\n{stdout}\nstderr:\n{}", text(&out.stderr));
    let doc: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let scenarios = doc["scenarios"].as_array().unwrap();
    assert_eq!(scenarios.len(), files.len());
    for s in scenarios {
        for p in s["probes"].as_array().unwrap() {
            assert_eq!(p["observed"], p["expect"], "{}: {p}", s["name"]);
        }
    }
    assert_eq!(leftovers(pid), Vec::<String>::new());
}
