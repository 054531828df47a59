//! The agent as its DaemonSet runs it: the image (built FROM scratch from the local build,
//! deploy/Containerfile.scratch) in a container of a Docker engine this test starts itself,
//! run through testcontainers (the `palisade-agent-container` launcher, see
//! `testbed/container`) with host bpffs, state and network namespaces mounted and the
//! capabilities named (not --privileged), in Kubernetes mode against the testbed's API server, enforcing in the
//! testbed's node namespace; then restarted like a DaemonSet pod (rolling update: SIGTERM;
//! a crash: SIGKILL of the container), some restarts in the middle of a policy change made
//! through the API server, while traffic flows: zero wrong verdicts. Needs root, the
//! binaries built (`cargo build --bins`) and docker.io installed (ci/setup.sh); without a
//! Docker engine the tests say why and are skipped (a failure under CI=true).
mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use palisade_agent_container::{Dockerd, LAUNCHER, RECIPE};
use palisade_testbed::agent::StopHow;
use palisade_testbed::netns;
use palisade_testbed::report::Observed;
use palisade_testbed::scenario::{self, HostRef, IpFamily};
use palisade_testbed::session::{RunNames, RunOptions, Session};
use palisade_testbed::topology::node_netns_name;

/// One Docker engine at a time: the tests of this file run one after the other.
static ENGINE: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The launcher the testbed starts in place of the agent, built beside the testbed.
fn launcher() -> PathBuf {
    let l = Path::new(BIN).with_file_name(LAUNCHER);
    assert!(l.is_file(), "{} is missing: build the binaries first (`cargo build --bins`)", l.display());
    l
}

/// The container's side of a run, once per test: the test's own Docker engine, the image
/// built from the local agent, and options that start the agent through the launcher in
/// Kubernetes mode, in run `tag`'s node namespace. `None` (the skip reported) where no
/// Docker engine can run.
fn in_container(tag: &str) -> Option<(Dockerd, RunNames, RunOptions)> {
    let dockerd = match Dockerd::start() {
        Ok(d) => d,
        Err(why) => {
            palisade_privileged::skip(&format!("no Docker engine can run here: {why}"));
            return None;
        }
    };
    let pid = std::process::id();
    let image = format!("palisade-agent:{tag}-{pid}");
    dockerd
        .build_agent_image(&image, &built_agent(), &repo_root().join(RECIPE))
        .expect("the image builds FROM scratch");
    let names = RunNames { prefix: format!("pt{pid}-{tag}"), tag: format!("{pid}-{tag}") };
    let tmp = std::env::temp_dir().join(format!("palisade-testbed-{}", names.tag));
    let launcher = dockerd
        .agent_launcher(&launcher(), &image, &node_netns_name(&names.prefix), &[&tmp])
        .expect("the launcher is written");
    let mut opts = RunOptions::new(Some(launcher));
    opts.kubernetes = true;
    opts.timeout = Duration::from_millis(500);
    Some((dockerd, names, opts))
}

#[test]
fn the_containerized_agent_enforces_the_seed_scenario_privileged() {
    let _engine = ENGINE.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    palisade_privileged::require_root!();
    let Some((dockerd, names, mut opts)) = in_container("ct") else { return };
    opts.timeout = Duration::from_millis(800);
    let plan = scenario::load(&fixture("seed-allow-frontend-to-backend.yaml")).unwrap();

    let rt = runtime();
    rt.block_on(async {
        let session =
            Session::up(&plan, &opts, &names).await.expect("the scenario comes up with the agent in a container");
        assert_eq!(dockerd.agent_containers().await.len(), 1, "the agent runs in a container");
        let report = session.probe_all().await;
        let failed: Vec<_> = report.probes.iter().filter(|r| !r.passed()).collect();
        assert!(failed.is_empty(), "probes that failed: {failed:#?}");
        assert!(report.probes.iter().any(|r| r.observed == Observed::Deny));
        session.down().await;
    });
    assert!(rt.block_on(dockerd.agent_containers()).is_empty(), "the container went with the session");
    assert_eq!(netns::list_with_prefix(&names.prefix), Vec::<String>::new());
}

const RESTARTS: usize = 10;

#[test]
fn the_containerized_agent_restarts_with_zero_wrong_verdicts_privileged() {
    let _engine = ENGINE.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    palisade_privileged::require_root!();
    let Some((dockerd, names, opts)) = in_container("cr") else { return };
    let plan =
        scenario::load_str(&client_server_scenario("container-restart", &[82]), Path::new("container-restart.yaml"))
            .unwrap();

    let rt = runtime();
    rt.block_on(async {
        let mut session = Session::up(&plan, &opts, &names).await.expect("the scenario comes up in a container");
        let api = session.kube_api().unwrap().clone();
        let v1 = serde_json::to_value(&plan.policies[0].manifest).unwrap();
        let mut v2 = v1.clone();
        v2["spec"]["ingress"].as_array_mut().unwrap().push(serde_json::json!(
            {"fromEndpoints": [{"matchLabels": {"app": "client"}}], "toPorts": [{"ports": [{"port": "82", "protocol": "TCP"}]}]}
        ));
        let port82 = plan.probes[2].clone();
        assert_eq!(session.probe(&port82).await.observed, Observed::Deny);

        let server = session.topology().host(&plan, &HostRef::Pod(1)).unwrap().addr(IpFamily::IPv4).unwrap();
        let client_ns = session.topology().host(&plan, &HostRef::Pod(0)).unwrap().netns.open().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let prober = {
            let stop = stop.clone();
            std::thread::spawn(move || probe_continuously(client_ns, server, [80, 81], stop, 20_000, Duration::from_mins(5)))
        };
        let mut current_v2 = false;
        for i in 0..RESTARTS {
            let how = if i % 2 == 0 { StopHow::Term } else { StopHow::Kill };
            let mid_change = i % 3 == 1;
            if mid_change {
                // A new version arrives through the API; the agent goes before it applies it.
                current_v2 = !current_v2;
                api.upsert(if current_v2 { v2.clone() } else { v1.clone() });
            }
            if how == StopHow::Kill {
                // The container, not only the client that started it: a crash of the pod.
                assert_eq!(dockerd.kill_agents().await, 1, "restart {i}: one agent container runs");
            }
            let exit = session.restart_agent(how).await.unwrap_or_else(|e| panic!("restart {i} ({how:?}): {e}"));
            assert_eq!(dockerd.agent_containers().await.len(), 1, "restart {i}: one agent container runs again");
            eprintln!("container restart {i}: {how:?} (exit {exit}), policy change: {mid_change}");
            // What the API holds now is what is enforced (nothing is applied before the
            // restarted agent has listed everything).
            let want = if current_v2 { Observed::Allow } else { Observed::Deny };
            let seen = session.probe(&port82).await;
            assert_eq!(seen.observed, want, "restart {i}: port 82 with policy v{}: {seen:?}", if current_v2 { 2 } else { 1 });
        }
        stop.store(true, Ordering::Relaxed);
        let tally = prober.join().expect("the prober ends");
        eprintln!("across {RESTARTS} container restarts, {tally}");
        assert!(tally.wrong.is_empty(), "wrong verdicts: {:#?}", tally.wrong);
        assert!(tally.rounds >= RESTARTS, "too few probe rounds: {tally:?}");
        session.down().await;
    });
    assert!(rt.block_on(dockerd.agent_containers()).is_empty(), "the container went with the session");
    assert_eq!(netns::list_with_prefix(&names.prefix), Vec::<String>::new());
}
