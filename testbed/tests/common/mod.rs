//! Helpers shared by the testbed's integration tests: running the binary, finding what a
//! run left behind.
#![allow(dead_code, reason = "each test crate uses a different part")]
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use palisade_testbed::kubeapi::FakeApi;
use palisade_testbed::report::Observed;
use palisade_testbed::scenario::{self, Plan, PlanProbe};
use palisade_testbed::session::{RunNames, RunOptions, Session};

pub const BIN: &str = env!("CARGO_BIN_EXE_palisade-testbed");

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/scenarios").join(name)
}

/// The agent binary the tests run: $`PALISADE_AGENT`, else the one built beside the testbed.
/// A file of `fixtures/cluster` (the multi-node scenarios); `""` is the folder.
pub fn cluster_fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/cluster").join(name)
}

/// Every scenario in `fixtures/cluster`, sorted.
pub fn cluster_fixtures() -> Vec<String> {
    scenario_files(&cluster_fixture(""))
}

/// Every scenario file (`.yaml`, `.yml`) in `dir`, sorted; fails the test when there is none.
pub fn scenario_files(dir: &Path) -> Vec<String> {
    let mut files: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .map(|p| p.to_str().unwrap().to_string())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no scenarios in {}", dir.display());
    files
}

/// Runs `palisade-testbed run --json ARGS... FILES...` and checks what every run of the
/// suite must give: exit 0, one report per file, every probe observed as expected, nothing
/// of the run left behind. Returns the run's PID and every probe's report.
pub fn run_expecting_all_pass(args: &[&str], files: &[String]) -> (u32, Vec<serde_json::Value>) {
    let mut all = vec!["run", "--json"];
    all.extend_from_slice(args);
    all.extend(files.iter().map(String::as_str));
    let (pid, out) = run(&all);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "stdout:\n{stdout}\nstderr:\n{}", text(&out.stderr));
    let doc: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let scenarios = doc["scenarios"].as_array().unwrap();
    assert_eq!(scenarios.len(), files.len());
    let mut probes = Vec::new();
    for s in scenarios {
        for p in s["probes"].as_array().unwrap() {
            assert_eq!(p["observed"], p["expect"], "{}: {p}", s["name"]);
            probes.push(p.clone());
        }
    }
    assert_eq!(leftovers(pid), Vec::<String>::new());
    (pid, probes)
}

pub fn agent_binary() -> PathBuf {
    std::env::var_os("PALISADE_AGENT").map_or_else(|| Path::new(BIN).with_file_name("palisade-agent"), PathBuf::from)
}

/// [`agent_binary`], which must have been built.
pub fn built_agent() -> PathBuf {
    let agent = agent_binary();
    assert!(
        agent.is_file(),
        "{} is missing: build the binaries first (`cargo build --bins`), or name one with PALISADE_AGENT",
        agent.display()
    );
    agent
}

/// The scenario most tests of the real agent share: pods `client` and `server` in
/// `default`, the server listening on TCP 80, 81 and `extra_ports`; the policy
/// `server-ingress` admits the client on TCP/80 only; probes: TCP/80 allowed, TCP/81 and
/// every extra port denied (in that order).
pub fn client_server_scenario(name: &str, extra_ports: &[u16]) -> String {
    let ports: String = [80, 81]
        .iter()
        .chain(extra_ports)
        .map(|p| format!("{{port: {p}, protocol: TCP}}"))
        .collect::<Vec<_>>()
        .join(", ");
    let mut probes =
        String::from("  - {from: default/client, to: default/server, port: 80, protocol: TCP, expect: allow}\n");
    for p in [81].iter().chain(extra_ports) {
        let _ = writeln!(
            probes,
            "  - {{from: default/client, to: default/server, port: {p}, protocol: TCP, expect: deny}}"
        );
    }
    format!(
        r#"
name: {name}
namespaces: {{default: {{}}}}
pods:
  - {{name: client, namespace: default, labels: {{app: client}}}}
  - name: server
    namespace: default
    labels: {{app: server}}
    ports: [{ports}]
policies:
  - apiVersion: cilium.io/v2
    kind: CiliumNetworkPolicy
    metadata: {{name: server-ingress, namespace: default}}
    spec:
      endpointSelector: {{matchLabels: {{app: server}}}}
      ingress:
        - fromEndpoints: [{{matchLabels: {{app: client}}}}]
          toPorts: [{{ports: [{{port: "80", protocol: TCP}}]}}]
probes:
{probes}"#
    )
}

/// What [`Session::up`] needs to bring `scenario` (YAML text) up with the real agent: the
/// plan, the run's names (`pt<pid>-<tag>`, which `palisade-testbed cleanup` recognises),
/// and options (the built agent with `agent_args`, a probe timeout of 500 ms).
pub fn agent_run(scenario: &str, tag: &str, agent_args: &[&str]) -> (Plan, RunNames, RunOptions) {
    let plan = scenario::load_str(scenario, Path::new(&format!("{tag}.yaml"))).expect("the test's scenario is valid");
    let pid = std::process::id();
    let names = RunNames { prefix: format!("pt{pid}-{tag}"), tag: format!("{pid}-{tag}") };
    let mut opts = RunOptions::new(Some(built_agent()));
    opts.timeout = Duration::from_millis(500);
    opts.agent_args = agent_args.iter().map(std::string::ToString::to_string).collect();
    (plan, names, opts)
}

/// [`agent_run`] in Kubernetes mode: the testbed's API server feeds the agent; a probe
/// timeout of 700 ms.
pub fn kube_run(scenario: &str, tag: &str) -> (Plan, RunNames, RunOptions) {
    let (plan, names, mut opts) = agent_run(scenario, tag, &[]);
    opts.timeout = Duration::from_millis(700);
    opts.kubernetes = true;
    (plan, names, opts)
}

/// A TCP probe `from` -> `to`:`port` that is not in the scenario (named as in a scenario's
/// `probes:`), expecting `expect`.
pub fn tcp_probe(plan: &Plan, from: &str, to: &str, port: u16, expect: scenario::Expect) -> PlanProbe {
    let raw = scenario::RawProbe {
        from: from.into(),
        to: to.into(),
        port: Some(port),
        protocol: scenario::ProbeProtocol::TCP,
        icmp_type: None,
        family: None,
        expect,
    };
    plan.extra_probe(&raw, 1000).unwrap()
}

/// The runtime the tests drive a session on.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("a tokio runtime")
}

/// Runs `probes` (concurrently) and returns what each observed, with its detail for
/// messages.
pub async fn observe(session: &Session, probes: &[PlanProbe]) -> Vec<(Observed, String)> {
    session
        .probe_many(probes)
        .await
        .into_iter()
        .map(|r| (r.observed, format!("{} -> {} {:?}/{}: {:?}", r.from, r.to, r.port, r.protocol, r.detail)))
        .collect()
}

/// The probes' verdicts, in the plan's order.
pub async fn verdicts(session: &Session, plan: &Plan) -> Vec<Observed> {
    session.probe_many(&plan.probes).await.into_iter().map(|r| r.observed).collect()
}

/// The agent's source name of a Kubernetes object: `kube:KIND/NAMESPACE/NAME`, or
/// `kube:KIND/NAME` for a cluster-scoped one.
pub fn kube_source(obj: &serde_json::Value) -> String {
    let kind = obj["kind"].as_str().unwrap();
    let name = obj["metadata"]["name"].as_str().unwrap();
    match obj["metadata"]["namespace"].as_str() {
        Some(ns) => format!("kube:{kind}/{ns}/{name}"),
        None => format!("kube:{kind}/{name}"),
    }
}

/// Applies a policy through the test API server; waits until the agent took in this
/// version (`accepted`: enforced at a new revision; else: an error recorded) and realized it.
pub async fn kube_apply(session: &Session, api: &FakeApi, obj: serde_json::Value, accepted: bool) {
    let source = kube_source(&obj);
    let before = session.policies().await.unwrap().into_iter().find(|p| p.source == source);
    let (rev_before, err_before) = (before.as_ref().map(|p| p.revision), before.is_some_and(|p| p.error.is_some()));
    api.upsert(obj);
    eventually(&format!("{source} taken in"), async || {
        let now = session.policies().await.ok()?.into_iter().find(|p| p.source == source)?;
        let done = if accepted {
            (Some(now.revision) != rev_before || err_before)
                && now.revision != u64::MAX
                && now.enforced
                && now.error.is_none()
        } else {
            now.error.is_some()
        };
        done.then_some(())
    })
    .await;
    session.wait_realized().await.unwrap();
}

/// Deletes a policy (`key`: `NAMESPACE/NAME`, or `NAME` when cluster-scoped) through the
/// test API server; waits until the agent has dropped it and realized that.
pub async fn kube_delete(session: &Session, api: &FakeApi, kind: &str, key: &str) {
    let source = format!("kube:{kind}/{key}");
    api.delete(kind, key);
    eventually(&format!("{source} gone"), async || {
        (!session.policies().await.ok()?.iter().any(|p| p.source == source)).then_some(())
    })
    .await;
    session.wait_realized().await.unwrap();
}

/// Polls `f` (every 50 ms, at most 30 s) until it answers; fails the test naming `what`
/// when it never does.
pub async fn eventually<T>(what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(std::time::Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Starts `palisade-testbed ARGS...` with piped output.
pub fn spawn(args: &[&str]) -> Child {
    Command::new(BIN).args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("palisade-testbed starts")
}

/// Runs `palisade-testbed ARGS...`; returns its PID (the run's names derive from it) and output.
pub fn run(args: &[&str]) -> (u32, Output) {
    let child = spawn(args);
    let pid = child.id();
    (pid, child.wait_with_output().expect("palisade-testbed runs"))
}

/// Everything named after run `pid` that still exists: network namespaces `pt<pid>-*`,
/// bpffs pin directories and temporary directories `palisade-testbed-<pid>-*`.
pub fn leftovers(pid: u32) -> Vec<String> {
    let mut left = Vec::new();
    let ns_prefix = format!("pt{pid}-");
    let dir_prefix = format!("palisade-testbed-{pid}-");
    for (dir, prefix) in [
        (PathBuf::from("/var/run/netns"), &ns_prefix),
        (PathBuf::from("/sys/fs/bpf"), &dir_prefix),
        (std::env::temp_dir(), &dir_prefix),
    ] {
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with(prefix.as_str()) {
                    left.push(dir.join(name).display().to_string());
                }
            }
        }
    }
    left
}

/// Runs `palisade-testbed ARGS...` with its own instance directory under `state_root`
/// (as a developer's separate shell commands would: `up`, `probe`, `down`).
pub fn testbed(state_root: &Path, args: &[&str]) -> Output {
    Command::new(BIN).args(args).env("PALISADE_TESTBED_STATE_DIR", state_root).output().expect("palisade-testbed runs")
}

/// `out`'s standard output, after checking that it exited 0.
pub fn ok(out: &Output) -> String {
    assert_eq!(out.status.code(), Some(0), "stdout:\n{}\nstderr:\n{}", text(&out.stdout), text(&out.stderr));
    text(&out.stdout)
}

/// Takes the instance under the state root down when dropped (also when the test fails).
pub struct Down<'a>(pub &'a Path);

impl Drop for Down<'_> {
    fn drop(&mut self) {
        let _ = testbed(self.0, &["down"]);
    }
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// What [`probe_continuously`] saw.
#[derive(Default, Debug)]
pub struct Tally {
    pub rounds: usize,
    pub allowed_ok: usize,
    pub denied_ok: usize,
    pub wrong: Vec<String>,
}

impl std::fmt::Display for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} rounds: {} allowed ok, {} denied ok, {} wrong",
            self.rounds,
            self.allowed_ok,
            self.denied_ok,
            self.wrong.len()
        )
    }
}

/// Probes `server:allowed` (must connect) and `server:denied` (must get no answer) from
/// the namespace `ns` until `stop`, at most `max_rounds` rounds and `max_time`.
pub fn probe_continuously(
    ns: std::fs::File,
    server: std::net::IpAddr,
    [allowed_port, denied_port]: [u16; 2],
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    max_rounds: usize,
    max_time: std::time::Duration,
) -> Tally {
    use palisade_testbed::probe::{self, Attempt};
    use std::net::SocketAddr;
    use std::sync::atomic::Ordering;
    use std::time::{Duration, Instant};
    palisade_testbed::netns::run_in(ns, move || {
        let mut t = Tally::default();
        let start = Instant::now();
        while !stop.load(Ordering::Relaxed) && t.rounds < max_rounds && start.elapsed() < max_time {
            t.rounds += 1;
            let allowed = probe::tcp(SocketAddr::new(server, allowed_port), Duration::from_secs(1));
            match allowed.attempt {
                Attempt::Answered => t.allowed_ok += 1,
                other => t.wrong.push(format!("round {}: port {allowed_port} (allowed): {other:?}", t.rounds)),
            }
            let denied = probe::tcp(SocketAddr::new(server, denied_port), Duration::from_millis(150));
            match denied.attempt {
                Attempt::NoAnswer => t.denied_ok += 1,
                other => t.wrong.push(format!("round {}: port {denied_port} (denied): {other:?}", t.rounds)),
            }
        }
        t
    })
    .expect("probing runs in the client's namespace")
}

/// Node `node`'s cluster identities: labels (sorted, joined) -> number.
pub async fn identities(session: &Session, node: usize) -> std::collections::BTreeMap<String, u32> {
    let ids = session.client_of(node).unwrap().identities().await.unwrap();
    ids.into_iter()
        .filter(|i| i.id >= 256)
        .map(|i| {
            let mut l = i.labels;
            l.sort();
            (l.join(","), i.id)
        })
        .collect()
}

/// Whether etcd is installed; else reports the skip (a failure under `CI=true`).
pub fn etcd_or_skip() -> bool {
    if palisade_privileged::etcd::installed() {
        return true;
    }
    palisade_privileged::skip("needs etcd (Debian's etcd-server; ci/setup.sh installs it)");
    false
}
