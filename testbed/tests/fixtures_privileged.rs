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
    run_expecting_all_pass(extra, &scenario_files(&fixture("")));
}
