//! The agent as its DaemonSet runs it: the image (built FROM scratch from the local build,
//! deploy/Containerfile.scratch) in a container of a Docker engine this test starts itself,
//! with host bpffs, state and network namespaces mounted and the capabilities named (not
//! --privileged), in Kubernetes mode against the testbed's API server, enforcing in the
//! testbed's node namespace. Needs root, the binaries built (`cargo build --bins`) and
//! docker.io installed (ci/setup.sh); without a Docker engine the test says why and is
//! skipped.
mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use palisade_testbed::container::{Dockerd, RECIPE};
use palisade_testbed::netns;
use palisade_testbed::report::Observed;
use palisade_testbed::scenario;
use palisade_testbed::session::{RunNames, RunOptions, Session};
use palisade_testbed::topology::node_netns_name;

fn agent_binary() -> PathBuf {
    std::env::var_os("PALISADE_AGENT")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(BIN).with_file_name("palisade-agent"))
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

#[test]
fn the_containerized_agent_enforces_the_seed_scenario_privileged() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let agent = agent_binary();
    assert!(agent.is_file(), "{} is missing: build the binaries first (`cargo build --bins`)", agent.display());
    let dockerd = match Dockerd::start() {
        Ok(d) => d,
        Err(why) => {
            eprintln!("SKIPPED (no Docker engine can run here): {why}");
            return;
        }
    };
    let image = format!("palisade-agent:test-{}", std::process::id());
    dockerd.build_agent_image(&image, &agent, &repo_root().join(RECIPE)).expect("the image builds FROM scratch");

    let plan = scenario::load(&fixture("seed-allow-frontend-to-backend.yaml")).unwrap();
    let pid = std::process::id();
    let names = RunNames { prefix: format!("pt{pid}-ct"), tag: format!("{pid}-ct") };
    let tmp = std::env::temp_dir().join(format!("palisade-testbed-{}", names.tag));
    let launcher =
        dockerd.agent_launcher(&image, &node_netns_name(&names.prefix), &[&tmp]).expect("the launcher is written");
    let mut opts = RunOptions::new(Some(launcher));
    opts.kubernetes = true;
    opts.timeout = Duration::from_millis(800);

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let session =
            Session::up(&plan, &opts, &names).await.expect("the scenario comes up with the agent in a container");
        assert_eq!(dockerd.agent_containers().len(), 1, "the agent runs in a container");
        let report = session.probe_all().await;
        let failed: Vec<_> = report.probes.iter().filter(|r| !r.passed()).collect();
        assert!(failed.is_empty(), "probes that failed: {failed:#?}");
        assert!(report.probes.iter().any(|r| r.observed == Observed::Deny));
        session.down().await;
    });
    assert!(dockerd.agent_containers().is_empty(), "the container went with the session");
    assert_eq!(netns::list_with_prefix(&names.prefix), Vec::<String>::new());
}
