//! A scenario brought up and kept up: directories, namespaces, listeners, the agent and
//! what it was told, ready to be probed any number of times, with its policy directory open
//! to edits the agent picks up by itself. [`Session::up`], [`Session::probe`] /
//! [`Session::probe_all`], [`Session::write_policy_file`], [`Session::down`] are what
//! `run`, the tests, and interactive commands (up / probe / exec / down) build on.
//!
//! Everything created is owned by a guard declared in this order, so it is removed in the
//! reverse order whatever way the session ends (also when it is dropped without `down`):
//! agent, listeners, hosts and pods, node, pin directory, temporary directory.
//!
//! Probes run concurrently (at most [`MAX_CONCURRENT_PROBES`] at once, each bounded by the
//! probe timeout). Their verdict events cannot be confused: TCP, UDP and SCTP flows differ
//! by their source port (chosen by the kernel for sockets, by the testbed for SCTP), and
//! ICMP events carry no echo identifier, so ICMP probes between the same two addresses
//! run one after the other.
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use palisade_api::types::{EndpointStatus, MonitorEvent, PolicyStatus, Status};
use tokio::sync::Semaphore;

use crate::agent::{self, AgentProcess, CALL_TIMEOUT, PolicyOutcome, READY_TIMEOUT, RunDirs};
use crate::error::SetupError;
use crate::events::{self, Collector, EndpointRef, Flow};
use crate::explain_check;
use crate::kubeapi::{self, FakeApi, KubeApiServer};
use crate::listen::{ListenOn, Listeners, Wanted};
use crate::netns;
use crate::probe::{self, Attempt, ProbeRun, monotonic_ns};
use crate::report::{Observed, ProbeResult, ScenarioReport};
use crate::scenario::{Expect, HostRef, IpFamily, Plan, PlanProbe, PortProtocol, ProbeProtocol};
use crate::topology::{Host, Topology};

/// Most probes in flight at once.
pub const MAX_CONCURRENT_PROBES: usize = 32;
/// Most `policy explain` calls in flight at once (each is a lookup in the agent).
pub const MAX_CONCURRENT_EXPLAINS: usize = 8;

/// How a session is made.
#[derive(Clone, Debug)]
#[allow(clippy::struct_excessive_bools, reason = "independent switches of `run`, one per flag")]
pub struct RunOptions {
    /// How long a probe waits for its answer.
    pub timeout: Duration,
    /// The agent binary; `None` runs without an agent (plumbing check: every probe must
    /// then simply connect).
    pub agent: Option<PathBuf>,
    /// More arguments for the agent (e.g. `--policy-rescan-secs 3600`).
    pub agent_args: Vec<String>,
    /// Keep the temporary directory (agent log, policy files).
    pub keep_logs: bool,
    /// Kubernetes mode: the agent runs with `--kubernetes` against the testbed's own API
    /// server ([`crate::kubeapi`]: one state, a listener in every node's namespace), which
    /// holds the scenario's nodes, namespaces, pods (each with its node's name, see
    /// [`kube_node_name`]) and policies; each node's agent enforces the pods of its node and
    /// finds their interfaces by their routes, as on a cluster that keeps its own CNI.
    /// With [`RunOptions::kvstore`] too, identities and the other nodes' pods come from
    /// etcd; without, each agent numbers the other nodes' pods it sees in the API itself.
    pub kubernetes: bool,
    /// Plumb the pods with this CNI plugin (`palisade-cni`), as a container runtime calls
    /// it, instead of wiring them directly (Kubernetes mode only: the pods' labels come from
    /// the API server, the plugin gives the addresses and the interfaces).
    pub cni: Option<PathBuf>,
    /// Kvstore mode: an etcd in the testbed ([`crate::kvstore`]) and every agent with
    /// `--kvstore etcd` (identities, pods and nodes shared through it) instead of a remote
    /// endpoints file.
    pub kvstore: bool,
    /// Per probe, the flow records the agents emitted for it; "decided by" from them, and
    /// a disagreement with the verdict events makes the probe an error.
    pub flows: bool,
}

/// The node name of the testbed's pods in Kubernetes mode, on a scenario of one node.
pub const KUBE_NODE: &str = "testbed-node";

/// The Kubernetes node name of node `k` of `plan`: [`KUBE_NODE`] on a scenario of one node,
/// else the node's name in the scenario.
pub fn kube_node_name(plan: &Plan, k: usize) -> String {
    if plan.is_multi_node() { plan.nodes[k].name.clone() } else { KUBE_NODE.to_string() }
}

impl RunOptions {
    pub fn new(agent: Option<PathBuf>) -> RunOptions {
        RunOptions {
            timeout: Duration::from_secs(1),
            agent,
            agent_args: Vec::new(),
            keep_logs: false,
            kubernetes: false,
            cni: None,
            kvstore: false,
            flows: false,
        }
    }
}

/// Names of one run: namespaces start with `prefix` (`pt<pid>`), directories end in `tag`.
#[derive(Clone, Debug)]
pub struct RunNames {
    pub prefix: String,
    pub tag: String,
}

impl RunNames {
    /// The names of this process's `index`-th scenario.
    pub fn for_scenario(index: usize) -> RunNames {
        let pid = std::process::id();
        RunNames { prefix: format!("pt{pid}"), tag: format!("{pid}-{index}") }
    }
}

/// The agent side of a session, one per node. Field order is drop order: the event stream
/// first.
struct AgentSide {
    collector: Collector,
    /// By `namespace/name`.
    endpoints: HashMap<String, EndpointStatus>,
    process: AgentProcess,
}

/// A scenario that is up.
pub struct Session {
    plan: Plan,
    timeout: Duration,
    /// `run --flows`.
    flows: bool,
    outcome: PolicyOutcome,
    // Field order is drop order: agents, listeners, topology, directories.
    /// One per node, in [`Plan::nodes`] order; empty without an agent.
    agents: Vec<AgentSide>,
    /// Kubernetes mode's API server, one listener per node (stopped after the agents).
    kube: Vec<KubeApiServer>,
    /// Kvstore mode's etcd (stopped after the agents, before the namespaces go).
    etcd: Option<crate::kvstore::TestbedEtcd>,
    listeners: Option<Listeners>,
    topology: Topology,
    /// The first node's directories (with the policy directory every agent reads).
    dirs: RunDirs,
    /// The other nodes' directories (pins, state, socket, log, remote endpoints file).
    node_dirs: Vec<RunDirs>,
}

impl Session {
    /// Builds the scenario, starts listeners and the agent, registers everything, applies
    /// the policies and waits until the agent has realized them. On error everything made
    /// so far is removed (and the agent's log tail printed when it helps).
    pub async fn up(plan: &Plan, opts: &RunOptions, names: &RunNames) -> Result<Session, SetupError> {
        let dirs = RunDirs::create(&names.tag, opts.keep_logs)?;
        let mut node_dirs = Vec::new();
        for k in 1..plan.nodes.len() {
            let mut d = RunDirs::create(&format!("{}-n{k}", names.tag), opts.keep_logs)?;
            // One policy directory for the cluster, as one API server would be.
            d.policies.clone_from(&dirs.policies);
            node_dirs.push(d);
        }
        if opts.kvstore && opts.agent.is_none() {
            return Err(SetupError::Unsupported(
                "--kvstore runs the agents in kvstore mode: it needs the agent (not --no-agent)".into(),
            ));
        }
        if opts.cni.is_some() && !(opts.kubernetes && opts.agent.is_some()) {
            return Err(SetupError::Unsupported(
                "pods plumbed by the CNI plugin need the agent in Kubernetes mode (their labels come from the API server)"
                    .into(),
            ));
        }
        let cni = opts.cni.as_ref().map(|plugin| crate::topology::Cni {
            plugin: plugin.clone(),
            dir: dirs.root.join("cni"),
            agent_socket: dirs.socket.clone(),
        });
        let topology = {
            let (plan, prefix) = (plan.clone(), names.prefix.clone());
            blocking(move || Topology::build_with(&plan, &prefix, cni.as_ref())).await??
        };
        let mut listeners = Listeners::new();
        let ipv6 = plan.has_family(IpFamily::IPv6);
        for pod in plan.pods.iter().filter(|p| !p.host_network) {
            let Some(h) = topology.host(plan, &HostRef::Pod(pod.index)) else { continue };
            listeners.start(ListenOn { key: h.key, netns: h.netns, ipv6, is_node: false }, &pod.ports)?;
        }
        for host in &plan.hosts {
            let Some(h) = topology.host(plan, &host.host) else { continue };
            listeners.start(ListenOn { key: h.key, netns: h.netns, ipv6, is_node: h.is_node }, &host.ports)?;
        }
        let mut session = Session {
            plan: plan.clone(),
            timeout: opts.timeout,
            flows: opts.flows,
            outcome: PolicyOutcome::default(),
            agents: Vec::new(),
            kube: Vec::new(),
            etcd: None,
            listeners: Some(listeners),
            topology,
            dirs,
            node_dirs,
        };
        if let Some(binary) = &opts.agent {
            let mut args = opts.agent_args.clone();
            args.extend(plan.agent_args.iter().cloned());
            if opts.kubernetes {
                let api = FakeApi::new();
                for obj in kubeapi::plan_objects(plan, |k| kube_node_name(plan, k)) {
                    api.upsert(obj);
                }
                for k in 0..plan.nodes.len() {
                    let server = KubeApiServer::serve(session.topology.node_at(k).netns.open()?, api.clone())?;
                    let kubeconfig = session.node_dirs(k).root.join("kubeconfig");
                    std::fs::write(&kubeconfig, server.kubeconfig())
                        .map_err(SetupError::io(format!("writing {}", kubeconfig.display())))?;
                    session.kube.push(server);
                }
                args.extend(["--kubernetes", "--kube-resync-secs", "1"].map(String::from));
            }
            if opts.kvstore {
                let node0 = &plan.nodes[0];
                let address = node0
                    .ipv4
                    .map(IpAddr::V4)
                    .or(node0.ipv6.map(IpAddr::V6))
                    .ok_or_else(|| SetupError::Unsupported("--kvstore: the first node has no address".into()))?;
                let etcd = crate::kvstore::TestbedEtcd::start(
                    &session.topology.node.netns,
                    address,
                    session.dirs.root.join("etcd"),
                )?;
                tracing::info!(url = etcd.url(), "etcd up in the first node's namespace");
                session.etcd = Some(etcd);
            }
            // Every node's agent starts before any is told anything; the first one's start
            // (file mode) applies the policies, which every agent reads from the one
            // directory.
            let mut processes = Vec::with_capacity(plan.nodes.len());
            for k in 0..plan.nodes.len() {
                let dirs = session.node_dirs(k);
                let mut node_args = args.clone();
                if opts.kubernetes {
                    let kubeconfig = dirs.root.join("kubeconfig");
                    node_args.extend(["--kubeconfig".to_string(), kubeconfig.display().to_string()]);
                }
                if let Some(etcd) = &session.etcd {
                    // Names the node too (its keys; its pods' spec.nodeName in Kubernetes mode).
                    let name = if opts.kubernetes { kube_node_name(plan, k) } else { plan.nodes[k].name.clone() };
                    node_args.extend(kvstore_args(plan, k, &name, etcd.url()));
                } else if opts.kubernetes {
                    node_args.extend(["--node-name".to_string(), kube_node_name(plan, k)]);
                } else if plan.is_multi_node() {
                    agent::write_remote_endpoints(&dirs.remote_endpoints(), plan, k)?;
                    node_args.push("--remote-endpoints".into());
                    node_args.push(dirs.remote_endpoints().display().to_string());
                    // Its flow records name the node (`node_name`, `observe --all-nodes`).
                    node_args.extend(["--node-name".to_string(), plan.nodes[k].name.clone()]);
                }
                let ns = session.topology.node_at(k).netns.open()?;
                processes.push(AgentProcess::spawn(binary, ns, dirs, plan.cluster.as_deref(), &node_args)?);
            }
            for (k, process) in processes.into_iter().enumerate() {
                let started = if opts.kubernetes {
                    start_agent_kube(plan, k, &process).await
                } else {
                    start_agent(plan, k, &session, &process, !opts.kvstore).await
                };
                match started {
                    Ok((outcome, endpoints, collector)) => {
                        if k == 0 {
                            session.outcome = outcome;
                        } else {
                            session.outcome.warnings.extend(outcome.warnings);
                            session.outcome.failures.extend(outcome.failures);
                        }
                        session.agents.push(AgentSide { collector, endpoints, process });
                    }
                    Err(e) => {
                        if !matches!(e, SetupError::AgentExited { .. } | SetupError::AgentNotReady { .. }) {
                            print_log_tail(&process);
                        }
                        return Err(e);
                    }
                }
            }
            if (opts.kvstore || opts.kubernetes) && plan.is_multi_node() {
                // Every node has registered its pods: each learns the others' from etcd (or
                // from the API server).
                for k in 0..plan.nodes.len() {
                    let side = &session.agents[k];
                    if let Err(e) = agent::wait_remote_endpoints(&side.process.client, plan, k).await {
                        print_log_tail(&side.process);
                        return Err(e);
                    }
                }
            }
        }
        Ok(session)
    }

    /// Kvstore mode's etcd, if it runs.
    pub fn etcd(&self) -> Option<&crate::kvstore::TestbedEtcd> {
        self.etcd.as_ref()
    }

    /// Node `k`'s directories.
    pub fn node_dirs(&self, k: usize) -> &RunDirs {
        if k == 0 { &self.dirs } else { &self.node_dirs[k - 1] }
    }

    /// Node `k`'s directories (pins, state directory, API socket, log, remote endpoints file).
    pub fn dirs_of(&self, k: usize) -> Option<&RunDirs> {
        (k <= self.node_dirs.len()).then(|| self.node_dirs(k))
    }

    /// The agent of node `k`'s API client, if an agent runs.
    pub fn client_of(&self, k: usize) -> Option<&palisade_api::Client> {
        self.agents.get(k).map(|a| &a.process.client)
    }

    /// The agent of node `k`'s process id, if it runs.
    pub fn agent_pid_of(&self, k: usize) -> Option<u32> {
        self.agents.get(k).and_then(|a| a.process.pid())
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// The directory the agent watches for policy manifests.
    pub fn policy_dir(&self) -> &Path {
        &self.dirs.policies
    }

    /// The (first node's) agent's log file, if an agent runs.
    pub fn agent_log(&self) -> Option<&Path> {
        self.agents.first().map(|a| a.process.log.as_path())
    }

    /// The run's directories (temporary directory with the API socket, log and policy
    /// directory; bpffs pin directory).
    pub fn dirs(&self) -> &RunDirs {
        &self.dirs
    }

    /// The agent's process id, if an agent runs.
    pub fn agent_pid(&self) -> Option<u32> {
        self.agents.first().and_then(|a| a.process.pid())
    }

    /// Every network namespace of the session: pods', other hosts', then the nodes'.
    pub fn netns_names(&self) -> Vec<String> {
        let t = &self.topology;
        t.pods
            .iter()
            .filter(|p| !p.netns.is_alias())
            .map(|p| p.netns.name().to_string())
            .chain(t.hosts.iter().filter_map(|h| h.netns.as_ref().map(|n| n.name().to_string())))
            .chain(t.extra_nodes.iter().map(|n| n.netns.name().to_string()))
            .chain([t.node.netns.name().to_string()])
            .collect()
    }

    /// Checks of the policies' application that failed (see [`PolicyOutcome`]).
    pub fn policy_outcome(&self) -> &PolicyOutcome {
        &self.outcome
    }

    fn agent(&self) -> Result<&AgentSide, SetupError> {
        self.agents.first().ok_or_else(|| SetupError::Unsupported("this session runs without an agent".into()))
    }

    /// The agent's endpoints.
    pub async fn endpoints(&self) -> Result<Vec<EndpointStatus>, SetupError> {
        agent::call("listing endpoints", CALL_TIMEOUT, self.agent()?.process.client.endpoints()).await
    }

    /// The agent's status.
    pub async fn status(&self) -> Result<Status, SetupError> {
        agent::call("status", CALL_TIMEOUT, self.agent()?.process.client.status()).await
    }

    /// The agent's view of every manifest.
    pub async fn policies(&self) -> Result<Vec<PolicyStatus>, SetupError> {
        agent::call("listing policies", CALL_TIMEOUT, self.agent()?.process.client.policies()).await
    }

    /// Writes `text` as `file_name` into the agent's policy directory (atomically: the
    /// agent never reads half a file) and waits, by polling the agent's policy list
    /// (bounded, never a fixed sleep), until the agent has read the new content on its
    /// own (its directory watch; no rescan request is made) and realized that revision.
    /// `text` must differ from what the file held, or there is nothing to wait for.
    /// Returns the agent's status of the manifest (enforced or rejected).
    /// With several nodes every agent reads the one directory; this waits for each of them
    /// and answers the first node's status.
    pub async fn write_policy_file(&self, file_name: &str, text: &str) -> Result<PolicyStatus, SetupError> {
        self.agent()?;
        let mut olds = Vec::with_capacity(self.agents.len());
        for side in &self.agents {
            let before = agent::call("listing policies", CALL_TIMEOUT, side.process.client.policies()).await?;
            olds.push(agent::find_status(&before, file_name).map(|s| s.revision));
        }
        self.dirs.write_policy(file_name, text)?;
        let mut first = None;
        for (side, old) in self.agents.iter().zip(olds) {
            let deadline = Instant::now() + READY_TIMEOUT;
            let status = loop {
                side.process.check_alive("while its policy directory changed")?;
                let now = agent::call("listing policies", CALL_TIMEOUT, side.process.client.policies()).await?;
                // u64::MAX: read, but not yet numbered by the resolver.
                match agent::find_status(&now, file_name) {
                    Some(s) if Some(s.revision) != old && s.revision != u64::MAX => break s.clone(),
                    _ if Instant::now() >= deadline => {
                        return Err(SetupError::PolicyNotSeen {
                            file: file_name.into(),
                            secs: READY_TIMEOUT.as_secs(),
                        });
                    }
                    _ => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            };
            agent::call(
                "waiting until the edited policy is realized",
                READY_TIMEOUT + Duration::from_secs(5),
                side.process.client.wait_revision(status.revision, READY_TIMEOUT),
            )
            .await?;
            first.get_or_insert(status);
        }
        first.ok_or_else(|| SetupError::Unsupported("this session runs without an agent".into()))
    }

    /// Runs one probe.
    pub async fn probe(&self, p: &PlanProbe) -> ProbeResult {
        self.probe_many(std::slice::from_ref(p)).await.remove(0)
    }

    /// Runs every probe of the plan and reports, with the checks of the policies'
    /// application and the agent's warnings.
    pub async fn probe_all(&self) -> ScenarioReport {
        let probes = self.probe_many(&self.plan.probes).await;
        let mut report = ScenarioReport {
            name: self.plan.name.clone(),
            file: self.plan.file.display().to_string(),
            probes,
            failures: self.outcome.failures.clone(),
            notes: self.outcome.warnings.iter().map(|w| format!("agent warning: {w}")).collect(),
        };
        if self.agents.is_empty() {
            report.notes.push("run without an agent (--no-agent): every probe expects plain connectivity".into());
        }
        if self.plan.is_multi_node() {
            let nodes: Vec<String> = self
                .plan
                .nodes
                .iter()
                .map(|n| {
                    let addrs: Vec<String> =
                        n.ipv4.map(|a| a.to_string()).into_iter().chain(n.ipv6.map(|a| a.to_string())).collect();
                    format!("{} ({})", n.name, addrs.join(", "))
                })
                .collect();
            report.notes.push(format!("nodes, each with its own agent: {}", nodes.join("; ")));
        }
        for (k, a) in self.agents.iter().enumerate() {
            let on =
                if self.plan.is_multi_node() { format!(" (node {})", self.plan.nodes[k].name) } else { String::new() };
            if let Err(e) = a.process.check_alive("while probing") {
                report.failures.push(format!("{e}{on}"));
            }
            if let Some(why) = a.collector.ended() {
                report.notes.push(format!("verdict events stopped{on}: {why}"));
            }
        }
        report
    }

    /// Runs `probes` concurrently and returns their results in the same order.
    pub async fn probe_many(&self, probes: &[PlanProbe]) -> Vec<ProbeResult> {
        // Lanes: probes that must not overlap run in order within one lane.
        let mut lanes: BTreeMap<(usize, String), Vec<usize>> = BTreeMap::new();
        for (i, p) in probes.iter().enumerate() {
            let key = if p.protocol.is_icmp() { format!("{}>{}>{}", p.from, p.to, p.family) } else { String::new() };
            let lane = if key.is_empty() { (i, key) } else { (usize::MAX, key) };
            lanes.entry(lane).or_default().push(i);
        }
        let permits = Semaphore::new(MAX_CONCURRENT_PROBES);
        let runs = lanes.into_values().map(|lane| {
            let permits = &permits;
            async move {
                let mut out = Vec::with_capacity(lane.len());
                for i in lane {
                    let _permit = permits.acquire().await;
                    let r = self.run_probe(&probes[i]).await;
                    tracing::info!(
                        probe = probes[i].index,
                        observed = r.0.observed.as_str(),
                        ms = r.0.ms,
                        "probe done"
                    );
                    out.push((i, r));
                }
                out
            }
        });
        let mut results: Vec<Option<(ProbeResult, Option<Flow>)>> = vec![None; probes.len()];
        for (i, r) in futures_util::future::join_all(runs).await.into_iter().flatten() {
            results[i] = Some(r);
        }
        let mut results: Vec<(ProbeResult, Option<Flow>)> = results.into_iter().flatten().collect();
        // Allowed flows: what decided, from the events that came in meanwhile (each side
        // on the node that judged it).
        if !self.agents.is_empty() {
            // Audit mode: an allowed probe for which a judging datapath reported an AUDIT
            // verdict is `audit` (one expected so waits for that report a little).
            for ((result, flow), p) in results.iter_mut().zip(probes) {
                if let (Observed::Allow, Some(flow)) = (result.observed, flow.as_ref()) {
                    self.classify_audit(p, flow, result).await;
                }
            }
            let events: Vec<Vec<MonitorEvent>> = self.agents.iter().map(|a| a.collector.snapshot()).collect();
            for ((result, flow), p) in results.iter_mut().zip(probes) {
                if let (Observed::Allow, Some(flow)) = (result.observed, flow) {
                    let (src, dst) = (self.plan.node_of(&p.from), self.plan.node_of(&p.to));
                    let sides = [
                        ("egress", &events[src], &self.agents[src].endpoints),
                        ("ingress", &events[dst], &self.agents[dst].endpoints),
                    ];
                    let text = allow_decided_by(flow, &sides);
                    result.detail = Some(text.clone());
                    result.decided_by = text;
                }
            }
        }
        if self.plan.is_multi_node() {
            for (result, p) in results.iter_mut().zip(probes) {
                result.0.judged = Some(self.judged_on(p));
            }
        }
        let (mut results, flows): (Vec<ProbeResult>, Vec<Option<Flow>>) = results.into_iter().unzip();
        self.check_explain(probes, &mut results).await;
        if self.flows {
            self.check_flows(probes, &flows, &mut results).await;
        }
        results
    }

    /// `run --flows`: each probe's flow records from the agents that judged it (the
    /// source's and the destination's node); "decided by" from them, and a probe whose
    /// records disagree with its verdict events becomes an error.
    async fn check_flows(&self, probes: &[PlanProbe], flows: &[Option<Flow>], results: &mut [ProbeResult]) {
        if self.agents.is_empty() {
            return;
        }
        // Probe starts are CLOCK_MONOTONIC; flow records carry the wall clock.
        let unix_now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        let offset = unix_now.saturating_sub(monotonic_ns());
        for ((p, flow), r) in probes.iter().zip(flows).zip(results.iter_mut()) {
            let Some(flow) = flow else { continue };
            if r.observed == Observed::Error {
                continue;
            }
            let (src, dst) = (self.plan.node_of(&p.from), self.plan.node_of(&p.to));
            let nodes: Vec<usize> = if src == dst { vec![src] } else { vec![src, dst] };
            let query = crate::flow_check::query(flow);
            // A drop's record may still be on its way: a few tries, briefly.
            let mut records = Vec::new();
            for attempt in 0..5 {
                records.clear();
                let mut problem = None;
                for &k in &nodes {
                    let answer = agent::call("flows", CALL_TIMEOUT, async {
                        let mut stream = self.agents[k].process.client.flows(&query).await?;
                        let mut out = Vec::new();
                        while let Some(x) = stream.next().await? {
                            if let palisade_api::flow::FlowsResponse::Flow(f) = x {
                                out.push(*f);
                            }
                        }
                        Ok::<_, palisade_api::ClientError>(out)
                    })
                    .await;
                    match answer {
                        Ok(fs) => records.extend(
                            fs.into_iter()
                                .filter(|f| crate::flow_check::belongs(f, flow, flow.since_ns.saturating_add(offset))),
                        ),
                        Err(e) => problem = Some(e.to_string()),
                    }
                }
                if let Some(e) = problem {
                    r.detail = Some(format!("could not read the flow records: {e}"));
                    r.decided_by = "flow records unreadable".into();
                    r.observed = Observed::Error;
                    break;
                }
                let wanted = if r.observed == Observed::Deny { "DROPPED" } else { "FORWARDED" };
                if records.iter().any(|f| f.verdict == wanted) || attempt == 4 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            if r.observed == Observed::Error {
                continue;
            }
            records.sort_by(|a, b| a.time.cmp(&b.time));
            match crate::flow_check::disagreement(r.observed, &r.decided_by, &records) {
                Some(problem) => {
                    r.detail = Some(problem.clone());
                    r.decided_by = problem;
                    r.observed = Observed::Error;
                }
                None => {
                    if let Some(by) = crate::flow_check::decided_by(&records) {
                        r.decided_by = by;
                    }
                }
            }
            r.flows = records;
        }
    }

    /// Asks the agent's `policy explain` about every probe that observed a verdict, after
    /// probing (at most [`MAX_CONCURRENT_EXPLAINS`] calls at once): a verdict explain does
    /// not agree with makes the probe an error, so that explain and the kernel cannot
    /// drift apart unnoticed.
    /// With several nodes, the source's node explains the egress side and the destination's
    /// node the ingress side, each with its own identities, as their datapaths judge them.
    async fn check_explain(&self, probes: &[PlanProbe], results: &mut [ProbeResult]) {
        use futures_util::StreamExt;
        if self.agents.is_empty() {
            return;
        }
        let plan = &self.plan;
        let agents = &self.agents;
        let asks =
            probes.iter().zip(results.iter()).enumerate().filter(|(_, (_, r))| r.observed != Observed::Error).map(
                |(i, (p, _))| async move {
                    let Some(req) = explain_check::request(plan, p) else {
                        return (i, Err("no explain request".into()));
                    };
                    let (src, dst) = (plan.node_of(&p.from), plan.node_of(&p.to));
                    let ask = |k: usize| {
                        let req = req.clone();
                        async move {
                            agent::call("policy explain", CALL_TIMEOUT, agents[k].process.client.explain(&req))
                                .await
                                .map_err(|e| e.to_string())
                        }
                    };
                    let answer = if src == dst {
                        ask(src).await
                    } else {
                        match (ask(src).await, ask(dst).await) {
                            (Ok(at_src), Ok(at_dst)) => Ok(explain_check::combine(at_src, at_dst)),
                            (Err(e), _) | (_, Err(e)) => Err(e),
                        }
                    };
                    (i, answer)
                },
            );
        let answers: Vec<_> =
            futures_util::stream::iter(asks).buffer_unordered(MAX_CONCURRENT_EXPLAINS).collect().await;
        for (i, answer) in answers {
            let r = &mut results[i];
            let problem = match answer {
                Ok(e) => {
                    let problem = explain_check::disagreement(r.observed, &e);
                    // "policy": enforced, but no allow event named the rule; explain does.
                    if problem.is_none()
                        && r.observed == Observed::Allow
                        && r.decided_by.split("; ").any(|part| part.ends_with(": policy"))
                        && let Some(by) = explain_check::allowed_by(&e)
                    {
                        r.detail = Some(by.clone());
                        r.decided_by = by;
                    }
                    problem
                }
                Err(e) => Some(format!("the agent could not explain this flow: {e}")),
            };
            if let Some(problem) = problem {
                let kernel = r.detail.take().map(|d| format!("; kernel: {d}")).unwrap_or_default();
                r.detail = Some(format!("{problem}{kernel}"));
                r.decided_by = problem;
                r.observed = Observed::Error;
            }
        }
    }

    fn endpoint_ref(&self, end: &HostRef) -> Option<EndpointRef> {
        let pod = self.plan.endpoint_pod(end)?;
        let key = pod.key();
        let id = self.agents.get(pod.node).and_then(|a| a.endpoints.get(&key)).map_or(0, |e| u32::from(e.id));
        Some(EndpointRef { key, id })
    }

    /// Which node judged each side of a probe (multi-node scenarios): the source's node its
    /// egress, the destination's node its ingress, for ends that are enforced pods.
    fn judged_on(&self, p: &PlanProbe) -> crate::report::JudgedOn {
        let node = |end: &HostRef| self.plan.endpoint_pod(end).map(|pod| self.plan.nodes[pod.node].name.clone());
        crate::report::JudgedOn { egress: node(&p.from), ingress: node(&p.to) }
    }

    async fn run_probe(&self, p: &PlanProbe) -> (ProbeResult, Option<Flow>) {
        let expect = if self.agents.is_empty() { Expect::Allow } else { p.expect };
        let mut result = ProbeResult {
            from: p.from_text.clone(),
            to: p.to_text.clone(),
            port: p.port,
            protocol: p.protocol.as_str().to_string(),
            family: p.family,
            expect,
            observed: Observed::Error,
            detail: None,
            ms: 0,
            decided_by: "-".into(),
            judged: None,
            flows: Vec::new(),
        };
        let (Some(src), Some(dst)) = (self.topology.host(&self.plan, &p.from), self.topology.host(&self.plan, &p.to))
        else {
            result.detail = Some("a probe end the testbed did not build (a testbed fault)".into());
            return (result, None);
        };
        let (Some(src_ip), Some(dst_ip)) = (src.addr(p.family), dst.addr(p.family)) else {
            result.detail =
                Some(format!("{} or {} has no {} address (a testbed fault)", p.from_text, p.to_text, p.family));
            return (result, None);
        };
        let run = match self.send(p, &src, &dst, src_ip, dst_ip).await {
            Ok(r) => r,
            Err(e) => {
                result.detail = Some(format!("could not run the probe: {e}"));
                return (result, None);
            }
        };
        result.ms = run.elapsed.as_millis() as u64;
        let flow = Flow {
            src: src_ip,
            dst: dst_ip,
            protocol: p.protocol,
            src_port: run.local_port,
            dst_port: p.port,
            src_endpoint: self.endpoint_ref(&p.from),
            dst_endpoint: self.endpoint_ref(&p.to),
            since_ns: run.started_ns,
        };
        match run.attempt {
            Attempt::Answered => {
                result.observed = Observed::Allow;
                if self.agents.is_empty() {
                    result.decided_by = "no agent".into();
                    result.detail = Some("connected (no agent runs)".into());
                }
            }
            Attempt::Refused => {
                result.detail = Some(format!(
                    "{} refused the connection: nothing listens on {} there (a testbed fault)",
                    p.to_text,
                    p.port.map_or_else(|| p.protocol.to_string(), |port| format!("{port}/{}", p.protocol))
                ));
            }
            Attempt::Failed(why) => result.detail = Some(why),
            Attempt::NoAnswer => self.no_answer(p, dst.key, &flow, run.tag, &mut result).await,
        }
        (result, Some(flow))
    }

    /// Sends the probe from inside the source's namespace and waits for its answer.
    async fn send(
        &self,
        p: &PlanProbe,
        src: &Host<'_>,
        dst: &Host<'_>,
        src_ip: IpAddr,
        dst_ip: IpAddr,
    ) -> Result<ProbeRun, SetupError> {
        let timeout = self.timeout;
        let index = p.index;
        let port = p.port.unwrap_or(0);
        let ns = src.netns.open()?;
        let in_source = |f: Box<dyn FnOnce() -> ProbeRun + Send>| blocking(move || netns::run_in(ns, f));
        match p.protocol {
            ProbeProtocol::TCP => {
                in_source(Box::new(move || probe::tcp(SocketAddr::new(dst_ip, port), timeout))).await?
            }
            ProbeProtocol::UDP => {
                let token = format!("palisade-testbed {} probe {index}", std::process::id());
                in_source(Box::new(move || probe::udp(SocketAddr::new(dst_ip, port), token.as_bytes(), timeout)))
                    .await?
            }
            ProbeProtocol::ICMP | ProbeProtocol::ICMPv6 => {
                let ident = std::process::id() as u16;
                let seq = next_sequence() as u16;
                in_source(Box::new(move || probe::icmp_echo(dst_ip, ident, seq, timeout))).await?
            }
            ProbeProtocol::SCTP => {
                let n = next_sequence();
                let src_port = 32_768 + (n % 28_000) as u16;
                let tag = (std::process::id() << 16) ^ n ^ 0x5c7b_0000 | 1;
                let want = Wanted {
                    host: dst.key,
                    protocol: PortProtocol::SCTP,
                    local_port: port,
                    peer: SocketAddr::new(src_ip, src_port),
                    tag: Some(tag),
                    since_ns: 0,
                };
                self.sctp(src, want, SocketAddr::new(dst_ip, port)).await
            }
        }
    }

    /// An SCTP INIT, sent again at half time; answered when the destination's capture saw it.
    async fn sctp(&self, src: &Host<'_>, mut want: Wanted, dst: SocketAddr) -> Result<ProbeRun, SetupError> {
        let t0 = Instant::now();
        let started = monotonic_ns();
        want.since_ns = started;
        let (src_port, tag) = (want.peer.port(), want.tag.unwrap_or(0));
        let listeners = self.listeners.as_ref().expect("listeners run while the session is up");
        let mut arrived = false;
        for wait in [self.timeout / 2, self.timeout.checked_sub(self.timeout / 2).unwrap()] {
            let ns = src.netns.open()?;
            let sent = blocking(move || netns::run_in(ns, move || probe::sctp_init(dst, src_port, tag))).await??;
            if let Err(why) = sent {
                return Ok(ProbeRun {
                    attempt: Attempt::Failed(why),
                    local_port: Some(src_port),
                    started_ns: started,
                    elapsed: t0.elapsed(),
                    tag: Some(tag),
                });
            }
            if listeners.wait_arrival(&want, wait).await {
                arrived = true;
                break;
            }
        }
        Ok(ProbeRun {
            attempt: if arrived { Attempt::Answered } else { Attempt::NoAnswer },
            local_port: Some(src_port),
            started_ns: started,
            elapsed: t0.elapsed(),
            tag: Some(tag),
        })
    }

    /// The collectors whose agents judge probe `p`: the source's egress is judged on its
    /// node, the destination's ingress on its node.
    fn judges(&self, p: &PlanProbe) -> Vec<&Collector> {
        let (src_node, dst_node) = (self.plan.node_of(&p.from), self.plan.node_of(&p.to));
        let mut judges: Vec<&Collector> = vec![&self.agents[src_node].collector];
        if dst_node != src_node {
            judges.push(&self.agents[dst_node].collector);
        }
        judges
    }

    /// A probe got no answer: a deny only if the datapath reported a policy drop of this flow.
    /// Makes an allowed probe `audit` when the source's egress or the destination's ingress
    /// reported an AUDIT verdict for its flow. Waits for such a report only when the probe
    /// expects one or the scenario has something in audit mode (others look at what came
    /// in, so scenarios without audit run as before).
    async fn classify_audit(&self, p: &PlanProbe, flow: &Flow, result: &mut ProbeResult) {
        let judges = self.judges(p);
        let mut found = judges.iter().find_map(|c| c.snapshot().into_iter().find(|ev| flow.is_audit(ev)));
        if found.is_none() && (p.expect == Expect::Audit || self.plan.may_audit()) {
            // The event is sent with the probe's first packet; a short wait covers its way
            // through the ring buffer and the monitor stream.
            let grace = if p.expect == Expect::Audit {
                (self.timeout / 2).max(Duration::from_millis(250))
            } else {
                Duration::from_millis(200)
            };
            found = first_event(&judges, grace, |ev| flow.is_audit(ev)).await;
        }
        if let Some(ev) = found {
            let place = flow.place(&ev).unwrap_or("?");
            let at = ev.endpoint.clone().unwrap_or_else(|| format!("endpoint {}", ev.endpoint_id));
            result.observed = Observed::Audit;
            result.decided_by = format!("audit: {} ({place} {at})", events::describe(&ev));
            result.detail = Some(format!("passed; audit at {place} of {at}: {}", events::describe(&ev)));
        }
    }

    async fn no_answer(&self, p: &PlanProbe, dst: usize, flow: &Flow, tag: Option<u32>, result: &mut ProbeResult) {
        let reached = match (p.protocol.port_protocol(), p.port, flow.src_port, &self.listeners) {
            (Some(protocol), Some(port), Some(src_port), Some(listeners)) => listeners.arrived(&Wanted {
                host: dst,
                protocol,
                local_port: port,
                peer: SocketAddr::new(flow.src, src_port),
                tag,
                since_ns: flow.since_ns,
            }),
            _ => false,
        };
        if self.agents.is_empty() {
            result.detail = Some("unexplained loss (no agent runs, so nothing should drop)".into());
            return;
        }
        let judges = self.judges(p);
        let drops = || judges.iter().map(|c| related_drops(c, flow)).collect::<String>();
        if reached {
            result.detail = Some(format!("the probe reached {} but no answer came back{}", p.to_text, drops()));
            return;
        }
        // The drop happened when the probe was sent; the event may still be on its way.
        let grace = (self.timeout / 2).max(Duration::from_millis(250));
        let found = first_event(&judges, grace, |ev| flow.is_policy_drop(ev)).await;
        if let Some(ev) = found {
            let place = flow.place(&ev).unwrap_or("?");
            let at = ev.endpoint.clone().unwrap_or_else(|| format!("endpoint {}", ev.endpoint_id));
            result.observed = Observed::Deny;
            result.decided_by = format!("{} ({place} {at})", events::describe(&ev));
            result.detail = Some(format!("dropped at {place} of {at}: {}", events::describe(&ev)));
        } else {
            let ended: String = judges.iter().filter_map(|c| c.ended()).fold(String::new(), |mut out, w| {
                let _ = write!(out, " (verdict events stopped: {w})");
                out
            });
            result.detail = Some(format!(
                "unexplained loss: no answer and no policy drop reported for this flow{}{ended}",
                drops()
            ));
        }
    }

    /// The last lines of the agent's log, printed to stderr.
    /// Kubernetes mode: the API server the agent watches (change pods and policies here).
    pub fn kube_api(&self) -> Option<&FakeApi> {
        self.kube.first().map(|k| &k.api)
    }

    /// Waits until everything the agents have accepted so far is realized in the kernel;
    /// answers the first node's status.
    pub async fn wait_realized(&self) -> Result<Status, SetupError> {
        self.agent()?;
        let mut first = None;
        for side in &self.agents {
            let status = agent::call(
                "waiting until the agent's state is realized",
                READY_TIMEOUT + CALL_TIMEOUT,
                side.process.client.wait_current(READY_TIMEOUT),
            )
            .await?;
            first.get_or_insert(status);
        }
        first.ok_or_else(|| SetupError::Unsupported("this session runs without an agent".into()))
    }

    /// The first verdict event from the agent matching `pred` (one that came in since the
    /// session started), waiting up to `timeout`. `None` without an agent.
    pub async fn wait_for_event(
        &self,
        timeout: Duration,
        pred: impl Fn(&MonitorEvent) -> bool,
    ) -> Option<MonitorEvent> {
        self.agents.first()?.collector.wait_for(timeout, pred).await
    }

    pub fn print_agent_log_tail(&self) {
        for a in &self.agents {
            print_log_tail(&a.process);
        }
    }

    /// Restarts the agent: stops it with SIGTERM or SIGKILL (the datapath stays loaded and
    /// keeps enforcing meanwhile) and starts it again with the same arguments
    /// ([`Session::stop_agent`], then [`Session::start_agent_again`]). Answers the old
    /// process's exit status.
    pub async fn restart_agent(&mut self, how: agent::StopHow) -> Result<String, SetupError> {
        self.restart_agent_of(0, how).await
    }

    /// [`Session::restart_agent`] for the agent of node `node`.
    pub async fn restart_agent_of(&mut self, node: usize, how: agent::StopHow) -> Result<String, SetupError> {
        let exit = self.stop_agent_of(node, how)?;
        self.start_agent_again_of(node).await?;
        Ok(exit)
    }

    /// Stops the agent of node `node` and starts it again, waiting only until it answers on
    /// its API (not until it has applied: with the kvstore away it cannot finish its first
    /// list, so it holds what the kernel has, as it found it, until the store answers).
    pub async fn restart_agent_of_unsynced(&mut self, node: usize, how: agent::StopHow) -> Result<String, SetupError> {
        let exit = self.stop_agent_of(node, how)?;
        self.start_agent_again_inner(node, false).await?;
        Ok(exit)
    }

    /// Starts the agent again after [`Session::stop_agent`], with the same arguments.
    /// Nothing is registered again: the agent restores its endpoints from its state
    /// directory. Waits until it answers and has realized its first revision (which
    /// includes the policy directory as it found it), then reopens the verdict-event stream.
    pub async fn start_agent_again(&mut self) -> Result<(), SetupError> {
        self.start_agent_again_of(0).await
    }

    /// [`Session::start_agent_again`] for the agent of node `node` (it reads its remote
    /// endpoints file again by itself).
    pub async fn start_agent_again_of(&mut self, node: usize) -> Result<(), SetupError> {
        self.start_agent_again_inner(node, true).await
    }

    async fn start_agent_again_inner(&mut self, node: usize, applied: bool) -> Result<(), SetupError> {
        if node >= self.plan.nodes.len() {
            return Err(SetupError::Unsupported(format!("the scenario has no node #{node}")));
        }
        let node_ns = self.topology.node_at(node).netns.open()?;
        let dirs = if node == 0 { &self.dirs } else { &self.node_dirs[node - 1] };
        let side = self
            .agents
            .get_mut(node)
            .ok_or_else(|| SetupError::Unsupported("this session runs without an agent".into()))?;
        side.process.start_again(node_ns, dirs)?;
        side.process.wait_ready(READY_TIMEOUT).await?;
        let client = &side.process.client;
        if applied {
            agent::call(
                "waiting until the restarted agent applied",
                READY_TIMEOUT + Duration::from_secs(5),
                client.wait_current(READY_TIMEOUT),
            )
            .await?;
        }
        side.collector = Collector::start(client).await?;
        side.endpoints = agent::call("listing endpoints", CALL_TIMEOUT, client.endpoints())
            .await?
            .into_iter()
            .map(|e| (format!("{}/{}", e.namespace, e.name), e))
            .collect();
        Ok(())
    }

    /// Stops the agent (SIGTERM or SIGKILL) without starting it again; the datapath it
    /// loaded stays. Answers its exit status.
    pub fn stop_agent(&mut self, how: agent::StopHow) -> Result<String, SetupError> {
        self.stop_agent_of(0, how)
    }

    /// [`Session::stop_agent`] for the agent of node `node`.
    pub fn stop_agent_of(&mut self, node: usize, how: agent::StopHow) -> Result<String, SetupError> {
        let side = self
            .agents
            .get(node)
            .ok_or_else(|| SetupError::Unsupported("this session runs without an agent on that node".into()))?;
        side.process.stop_now(how, Duration::from_secs(10))
    }

    /// The agent's API client, if an agent runs.
    pub fn client(&self) -> Option<&palisade_api::Client> {
        self.agents.first().map(|a| &a.process.client)
    }

    /// Takes everything down, in order.
    pub async fn down(mut self) {
        self.agents.clear();
        if let Some(l) = self.listeners.take() {
            l.stop().await;
        }
        drop(self);
    }
}

/// File mode, node `node`'s agent: registers that node's namespaces, pods and entities; with
/// several nodes waits until it has read the other nodes' pods; the first node's start
/// writes the manifests into the one policy directory and checks them, the others then
/// check that they read the same.
async fn start_agent(
    plan: &Plan,
    node: usize,
    session: &Session,
    process: &AgentProcess,
    wait_remote: bool,
) -> Result<(PolicyOutcome, HashMap<String, EndpointStatus>, Collector), SetupError> {
    process.wait_ready(READY_TIMEOUT).await?;
    tracing::info!(node, "agent answers");
    let client = &process.client;
    agent::register_node(client, plan, node).await?;
    if wait_remote && plan.is_multi_node() {
        agent::wait_remote_endpoints(client, plan, node).await?;
    }
    tracing::info!(node, "namespaces, pods and entities registered and realized");
    let outcome = if node == 0 {
        agent::apply_policies(client, &session.dirs, plan).await?
    } else {
        agent::check_policies_read(client, plan).await?
    };
    tracing::info!(node, "policies applied and realized");
    let endpoints: HashMap<String, EndpointStatus> = agent::call("listing endpoints", CALL_TIMEOUT, client.endpoints())
        .await?
        .into_iter()
        .map(|e| (format!("{}/{}", e.namespace, e.name), e))
        .collect();
    let collector = Collector::start(client).await?;
    tracing::info!("monitor stream open");
    Ok((outcome, endpoints, collector))
}

/// The arguments of node `k`'s agent in kvstore mode.
fn kvstore_args(plan: &Plan, k: usize, name: &str, url: &str) -> Vec<String> {
    let node = &plan.nodes[k];
    let addresses: Vec<String> =
        node.ipv4.map(|a| a.to_string()).into_iter().chain(node.ipv6.map(|a| a.to_string())).collect();
    vec![
        "--kvstore".into(),
        "etcd".into(),
        "--kvstore-endpoints".into(),
        url.into(),
        "--kvstore-lease-ttl".into(),
        crate::kvstore::LEASE_TTL_SECS.to_string(),
        "--node-name".into(),
        name.into(),
        "--node-address".into(),
        addresses.join(","),
    ]
}

/// Kubernetes mode: node `node`'s agent learns namespaces, pods and policies from the API
/// server; only the reserved addresses (its node, the other nodes, the API server) come
/// through its local API, as the node's own configuration would. Waits until every pod of
/// its node is an endpoint and every policy is enforced and realized.
async fn start_agent_kube(
    plan: &Plan,
    node: usize,
    process: &AgentProcess,
) -> Result<(PolicyOutcome, HashMap<String, EndpointStatus>, Collector), SetupError> {
    process.wait_ready(READY_TIMEOUT).await?;
    let client = &process.client;
    for spec in palisade_cli::offline::scenario_reserved_entries_for_node(plan, node) {
        let what = format!("registering {} as entity {:?}", spec.cidr, spec.entity);
        agent::call(what, CALL_TIMEOUT, client.put_ipcache(&spec)).await?;
    }
    let wanted: Vec<String> =
        plan.pods.iter().filter(|p| !p.host_network && p.node == node).map(palisade_scenario::PlanPod::key).collect();
    let policies = plan.policies.iter().filter(|p| !p.expect_rejected).count();
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut outcome = PolicyOutcome::default();
    let endpoints = loop {
        process.check_alive("while it read the API server")?;
        let eps = agent::call("listing endpoints", CALL_TIMEOUT, client.endpoints()).await?;
        let eps: HashMap<String, EndpointStatus> =
            eps.into_iter().map(|e| (format!("{}/{}", e.namespace, e.name), e)).collect();
        let pols = agent::call("listing policies", CALL_TIMEOUT, client.policies()).await?;
        let enforced = pols.iter().filter(|p| p.enforced).count();
        if wanted.iter().all(|k| eps.contains_key(k)) && enforced == policies {
            outcome.warnings =
                pols.iter().flat_map(|p| p.warnings.iter().map(|w| format!("{}: {w}", p.source))).collect();
            break eps;
        }
        if Instant::now() >= deadline {
            let missing: Vec<&String> = wanted.iter().filter(|k| !eps.contains_key(*k)).collect();
            return Err(SetupError::Unsupported(format!(
                "Kubernetes mode: after {}s the agent has endpoints for all but {missing:?} and enforces {enforced} of {policies} policies",
                READY_TIMEOUT.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    agent::call(
        "waiting until the API's state is realized",
        READY_TIMEOUT + CALL_TIMEOUT,
        client.wait_current(READY_TIMEOUT),
    )
    .await?;
    let collector = Collector::start(client).await?;
    Ok((outcome, endpoints, collector))
}

fn print_log_tail(process: &AgentProcess) {
    eprintln!("palisade-testbed: last lines of the agent's log ({}):\n{}", process.log.display(), process.log_tail(40));
}

/// A number unique within this process (ICMP sequence numbers, SCTP ports and tags).
fn next_sequence() -> u32 {
    static NEXT: AtomicU32 = AtomicU32::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Runs a blocking closure off the async workers.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, SetupError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| SetupError::Io { what: "a blocking task".into(), source: std::io::Error::other(e.to_string()) })
}

/// Drops seen on the flow's addresses (either way), for explaining a loss.
fn related_drops(collector: &Collector, flow: &Flow) -> String {
    let drops: Vec<String> =
        collector.snapshot().iter().filter(|e| flow.is_related_drop(e)).take(3).map(events::summary).collect();
    if drops.is_empty() { String::new() } else { format!("; drops seen: {}", drops.join("; ")) }
}

/// What allowed a flow at each end: the allow events if the agent emits them, else the
/// endpoints' enforcement ("not enforced" or "policy").
/// `sides`: for egress and ingress, the events and endpoints of the node that judged it.
fn allow_decided_by(flow: &Flow, sides: &[(&str, &Vec<MonitorEvent>, &HashMap<String, EndpointStatus>); 2]) -> String {
    let mut parts = Vec::new();
    for ((place, events, endpoints), end) in sides.iter().zip([&flow.src_endpoint, &flow.dst_endpoint]) {
        let place = *place;
        let Some(end) = end else { continue };
        let ev = events.iter().find(|e| flow.is_allow(e) && flow.place(e) == Some(place));
        let text = if let Some(ev) = ev {
            events::describe(ev)
        } else {
            let enforced = endpoints
                .get(&end.key)
                .is_some_and(|e| if place == "egress" { e.egress_enforced } else { e.ingress_enforced });
            if enforced { "policy".to_string() } else { "not enforced".to_string() }
        };
        if text != "not enforced" {
            parts.push(format!("{place}: {text}"));
        }
    }
    if parts.is_empty() { "not enforced".into() } else { parts.join("; ") }
}

/// The first event `pred` accepts that any of `judges` receives within `grace`.
async fn first_event(
    judges: &[&Collector],
    grace: Duration,
    pred: impl Fn(&MonitorEvent) -> bool + Copy,
) -> Option<MonitorEvent> {
    let waits = judges.iter().map(|c| Box::pin(async move { c.wait_for(grace, pred).await.ok_or(()) }));
    futures_util::future::select_ok(waits).await.ok().map(|(ev, _)| ev)
}
