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

#[test]
fn the_containerized_agent_enforces_the_seed_scenario_privileged() {
    let _engine = ENGINE.lock().unwrap_or_else(|e| e.into_inner());
    palisade_privileged::require_root!();
    let agent = agent_binary();
    assert!(agent.is_file(), "{} is missing: build the binaries first (`cargo build --bins`)", agent.display());
    let dockerd = match Dockerd::start() {
        Ok(d) => d,
        Err(why) => {
            palisade_privileged::skip(&format!("no Docker engine can run here: {why}"));
            return;
        }
    };
    let image = format!("palisade-agent:test-{}", std::process::id());
    dockerd.build_agent_image(&image, &agent, &repo_root().join(RECIPE)).expect("the image builds FROM scratch");

    let plan = scenario::load(&fixture("seed-allow-frontend-to-backend.yaml")).unwrap();
    let pid = std::process::id();
    let names = RunNames { prefix: format!("pt{pid}-ct"), tag: format!("{pid}-ct") };
    let tmp = std::env::temp_dir().join(format!("palisade-testbed-{}", names.tag));
    let launcher = dockerd
        .agent_launcher(&launcher(), &image, &node_netns_name(&names.prefix), &[&tmp])
        .expect("the launcher is written");
    let mut opts = RunOptions::new(Some(launcher));
    opts.kubernetes = true;
    opts.timeout = Duration::from_millis(800);

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
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

const RESTART_SCENARIO: &str = r#"
name: container-restart
namespaces: {default: {}}
pods:
  - {name: client, namespace: default, labels: {app: client}}
  - name: server
    namespace: default
    labels: {app: server}
    ports: [{port: 80, protocol: TCP}, {port: 81, protocol: TCP}, {port: 82, protocol: TCP}]
policies:
  - apiVersion: cilium.io/v2
    kind: CiliumNetworkPolicy
    metadata: {name: server-ingress, namespace: default}
    spec:
      endpointSelector: {matchLabels: {app: server}}
      ingress:
        - fromEndpoints: [{matchLabels: {app: client}}]
          toPorts: [{ports: [{port: "80", protocol: TCP}]}]
probes:
  - {from: default/client, to: default/server, port: 80, protocol: TCP, expect: allow}
  - {from: default/client, to: default/server, port: 81, protocol: TCP, expect: deny}
  - {from: default/client, to: default/server, port: 82, protocol: TCP, expect: deny}
"#;

const RESTARTS: usize = 10;

#[test]
fn the_containerized_agent_restarts_with_zero_wrong_verdicts_privileged() {
    let _engine = ENGINE.lock().unwrap_or_else(|e| e.into_inner());
    palisade_privileged::require_root!();
    let agent = agent_binary();
    assert!(agent.is_file(), "{} is missing: build the binaries first (`cargo build --bins`)", agent.display());
    let dockerd = match Dockerd::start() {
        Ok(d) => d,
        Err(why) => {
            palisade_privileged::skip(&format!("no Docker engine can run here: {why}"));
            return;
        }
    };
    let image = format!("palisade-agent:restart-{}", std::process::id());
    dockerd.build_agent_image(&image, &agent, &repo_root().join(RECIPE)).expect("the image builds FROM scratch");
    let plan = scenario::load_str(RESTART_SCENARIO, Path::new("container-restart.yaml")).unwrap();
    let pid = std::process::id();
    let names = RunNames { prefix: format!("pt{pid}-cr"), tag: format!("{pid}-cr") };
    let tmp = std::env::temp_dir().join(format!("palisade-testbed-{}", names.tag));
    let launcher = dockerd.agent_launcher(&launcher(), &image, &node_netns_name(&names.prefix), &[&tmp]).unwrap();
    let mut opts = RunOptions::new(Some(launcher));
    opts.kubernetes = true;
    opts.timeout = Duration::from_millis(500);

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
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
            std::thread::spawn(move || probe_continuously(client_ns, server, stop, 20_000, Duration::from_secs(300)))
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
        eprintln!(
            "{} rounds across {RESTARTS} container restarts: {} allowed ok, {} denied ok, {} wrong",
            tally.rounds,
            tally.allowed_ok,
            tally.denied_ok,
            tally.wrong.len()
        );
        assert!(tally.wrong.is_empty(), "wrong verdicts: {:#?}", tally.wrong);
        assert!(tally.rounds >= RESTARTS, "too few probe rounds: {tally:?}");
        session.down().await;
    });
    assert!(rt.block_on(dockerd.agent_containers()).is_empty(), "the container went with the session");
    assert_eq!(netns::list_with_prefix(&names.prefix), Vec::<String>::new());
}
