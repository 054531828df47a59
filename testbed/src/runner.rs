//! One scenario, end to end: directories, namespaces, listeners, the agent and what it is
//! told, the probes and their verdicts. Everything created is owned by a guard declared in
//! this order, so it is removed in the reverse order whatever way the run ends: agent,
//! listeners, pods, node, pin directory, temporary directory.
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::time::Duration;

use palisade_agent::api::types::EndpointStatus;

use crate::agent::{self, AgentProcess, READY_TIMEOUT, RunDirs};
use crate::error::SetupError;
use crate::events::{self, Collector, EndpointRef, Flow};
use crate::listen::Listeners;
use crate::netns;
use crate::probe::{self, Attempt, ProbeRun};
use crate::report::{Observed, ProbeResult, ScenarioReport};
use crate::scenario::{Expect, HostRef, Plan, PlanProbe, ProbeProtocol};
use crate::topology::Topology;

/// How a run is made.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// How long a probe waits for its answer.
    pub timeout: Duration,
    /// The agent binary; `None` runs without an agent (plumbing check: every probe must
    /// then simply connect).
    pub agent: Option<PathBuf>,
    /// Keep the temporary directory (agent log, policy files).
    pub keep_logs: bool,
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

/// Runs one scenario. `Err` means it could not be set up or checked (exit code 2).
pub async fn run_scenario(plan: &Plan, opts: &RunOptions, names: &RunNames) -> Result<ScenarioReport, SetupError> {
    let dirs = RunDirs::create(&names.tag, opts.keep_logs)?;
    let topology = {
        let (plan, prefix) = (plan.clone(), names.prefix.clone());
        blocking(move || Topology::build(&plan, &prefix)).await??
    };
    let mut listeners = Listeners::new();
    for (pod, net) in plan.pods.iter().zip(&topology.pods) {
        listeners.start(pod.index, &net.netns, &pod.ports)?;
    }

    let result = match &opts.agent {
        None => {
            let ctx =
                ProbeContext { plan, topology: &topology, listeners: &listeners, agent: None, timeout: opts.timeout };
            let mut report = run_probes(&ctx).await;
            report.notes.push("run without an agent (--no-agent): every probe expects plain connectivity".into());
            Ok(report)
        }
        Some(binary) => {
            let agent = AgentProcess::spawn(binary, topology.node.netns.open()?, &dirs, plan.cluster.as_deref())?;
            let result = with_agent(plan, opts, &dirs, &topology, &listeners, &agent).await;
            let show_tail = match &result {
                Err(SetupError::AgentExited { .. } | SetupError::AgentNotReady { .. }) => false,
                Err(_) => true,
                Ok(report) => !report.ok(),
            };
            if show_tail {
                eprintln!(
                    "palisade-testbed: last lines of the agent's log ({}):\n{}",
                    agent.log.display(),
                    agent.log_tail(40)
                );
            }
            drop(agent);
            result
        }
    };
    listeners.stop().await;
    drop(topology);
    drop(dirs);
    result
}

async fn with_agent(
    plan: &Plan,
    opts: &RunOptions,
    dirs: &RunDirs,
    topology: &Topology,
    listeners: &Listeners,
    agent: &AgentProcess,
) -> Result<ScenarioReport, SetupError> {
    agent.wait_ready(READY_TIMEOUT).await?;
    tracing::info!("agent answers");
    let client = &agent.client;
    agent::register(client, plan, topology).await?;
    tracing::info!("namespaces, pods and node registered and realized");
    let outcome = agent::apply_policies(client, dirs, plan).await?;
    tracing::info!("policies applied and realized");
    let endpoints: HashMap<String, EndpointStatus> =
        agent::call("listing endpoints", agent::CALL_TIMEOUT, client.endpoints())
            .await?
            .into_iter()
            .map(|e| (format!("{}/{}", e.namespace, e.name), e))
            .collect();
    let collector = Collector::start(client).await?;
    tracing::info!("monitor stream open");
    let ctx = ProbeContext {
        plan,
        topology,
        listeners,
        agent: Some(AgentView { collector: &collector, endpoints: &endpoints }),
        timeout: opts.timeout,
    };
    let mut report = run_probes(&ctx).await;
    agent.check_alive("while probing")?;
    report.failures.extend(outcome.failures);
    report.notes.extend(outcome.warnings.into_iter().map(|w| format!("agent warning: {w}")));
    if let Some(why) = collector.ended() {
        report.notes.push(format!("verdict events stopped: {why}"));
    }
    Ok(report)
}

struct AgentView<'a> {
    collector: &'a Collector,
    /// By `namespace/name`.
    endpoints: &'a HashMap<String, EndpointStatus>,
}

struct ProbeContext<'a> {
    plan: &'a Plan,
    topology: &'a Topology,
    listeners: &'a Listeners,
    agent: Option<AgentView<'a>>,
    timeout: Duration,
}

async fn run_probes(ctx: &ProbeContext<'_>) -> ScenarioReport {
    let mut probes = Vec::with_capacity(ctx.plan.probes.len());
    let mut flows = Vec::with_capacity(ctx.plan.probes.len());
    for p in &ctx.plan.probes {
        let (result, flow) = run_probe(ctx, p).await;
        tracing::info!(probe = p.index, observed = result.observed.as_str(), ms = result.ms, "probe done");
        probes.push(result);
        flows.push(flow);
    }
    // Allowed flows: what decided, from the events that came in meanwhile.
    if let Some(agent) = &ctx.agent {
        let events = agent.collector.snapshot();
        for (result, flow) in probes.iter_mut().zip(&flows) {
            if let (Observed::Allow, Some(flow)) = (result.observed, flow) {
                let text = allow_decided_by(flow, &events, agent.endpoints);
                result.detail = Some(text.clone());
                result.decided_by = text;
            }
        }
    }
    ScenarioReport {
        name: ctx.plan.name.clone(),
        file: ctx.plan.file.display().to_string(),
        probes,
        failures: Vec::new(),
        notes: Vec::new(),
    }
}

/// Runs a blocking closure off the async workers.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, SetupError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| SetupError::Io { what: "a blocking task".into(), source: std::io::Error::other(e.to_string()) })
}

fn endpoint_ref(ctx: &ProbeContext<'_>, end: &HostRef) -> Option<EndpointRef> {
    let HostRef::Pod(i) = end else { return None };
    let key = ctx.plan.pod(*i).key();
    let id = ctx.agent.as_ref().and_then(|a| a.endpoints.get(&key)).map_or(0, |e| u32::from(e.id));
    Some(EndpointRef { key, id })
}

async fn run_probe(ctx: &ProbeContext<'_>, p: &PlanProbe) -> (ProbeResult, Option<Flow>) {
    let expect = if ctx.agent.is_some() { p.expect } else { Expect::Allow };
    let mut result = ProbeResult {
        from: p.from_text.clone(),
        to: p.to_text.clone(),
        port: p.port,
        protocol: p.protocol.as_str().to_string(),
        expect,
        observed: Observed::Error,
        detail: None,
        ms: 0,
        decided_by: "-".into(),
    };
    let (Some(src), Some(dst)) = (ctx.topology.host(&p.from), ctx.topology.host(&p.to)) else {
        result.detail = Some("only pod-to-pod probes are supported by this testbed version".into());
        return (result, None);
    };
    let (src_ip, dst_ip) = (src.ipv4, dst.ipv4);
    let ns = match src.netns.open() {
        Ok(f) => f,
        Err(e) => {
            result.detail = Some(e.to_string());
            return (result, None);
        }
    };
    let timeout = ctx.timeout;
    let index = p.index;
    let (protocol, port) = (p.protocol, p.port.unwrap_or(0));
    let run: Result<ProbeRun, SetupError> = blocking(move || {
        netns::run_in(ns, move || match protocol {
            ProbeProtocol::TCP => probe::tcp(SocketAddrV4::new(dst_ip, port), timeout),
            ProbeProtocol::UDP => {
                let token = format!("palisade-testbed {} probe {index}", std::process::id());
                probe::udp(SocketAddrV4::new(dst_ip, port), token.as_bytes(), timeout)
            }
            ProbeProtocol::ICMP => probe::icmp_echo(dst_ip, std::process::id() as u16, index as u16, timeout),
            other => ProbeRun {
                attempt: Attempt::Failed(format!("{other} probes are not supported by this testbed version")),
                local_port: None,
                started_ns: 0,
                elapsed: Duration::ZERO,
            },
        })
    })
    .await
    .and_then(|r| r);
    let run = match run {
        Ok(r) => r,
        Err(e) => {
            result.detail = Some(format!("could not run the probe: {e}"));
            return (result, None);
        }
    };
    result.ms = run.elapsed.as_millis() as u64;
    let flow = Flow {
        src: IpAddr::V4(src_ip),
        dst: IpAddr::V4(dst_ip),
        protocol: p.protocol,
        src_port: run.local_port,
        dst_port: p.port,
        src_endpoint: endpoint_ref(ctx, &p.from),
        dst_endpoint: endpoint_ref(ctx, &p.to),
        since_ns: run.started_ns,
    };
    match run.attempt {
        Attempt::Answered => {
            result.observed = Observed::Allow;
            if ctx.agent.is_none() {
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
        Attempt::NoAnswer => no_answer(ctx, p, dst.listener_key, &flow, &mut result).await,
    }
    (result, Some(flow))
}

/// A probe got no answer: a deny only if the datapath reported a policy drop of this flow.
async fn no_answer(ctx: &ProbeContext<'_>, p: &PlanProbe, dst: usize, flow: &Flow, result: &mut ProbeResult) {
    let reached = match (p.protocol.port_protocol(), p.port, flow.src_port) {
        (Some(proto), Some(port), Some(src_port)) => {
            ctx.listeners.arrived(dst, proto, port, SocketAddr::new(flow.src, src_port))
        }
        _ => false,
    };
    let Some(agent) = &ctx.agent else {
        result.detail = Some("unexplained loss (no agent runs, so nothing should drop)".into());
        return;
    };
    if reached {
        result.detail = Some(format!(
            "the probe reached {} but no answer came back{}",
            p.to_text,
            related_drops(agent.collector, flow)
        ));
        return;
    }
    // The drop happened when the probe was sent; the event may still be on its way.
    let grace = (ctx.timeout / 2).max(Duration::from_millis(250));
    match agent.collector.wait_for(grace, |ev| flow.is_policy_drop(ev)).await {
        Some(ev) => {
            let place = flow.place(&ev).unwrap_or("?");
            let at = ev.endpoint.clone().unwrap_or_else(|| format!("endpoint {}", ev.endpoint_id));
            result.observed = Observed::Deny;
            result.decided_by = format!("{} ({place} {at})", events::describe(&ev));
            result.detail = Some(format!("dropped at {place} of {at}: {}", events::describe(&ev)));
        }
        None => {
            let ended = agent.collector.ended().map(|w| format!(" (verdict events stopped: {w})")).unwrap_or_default();
            result.detail = Some(format!(
                "unexplained loss: no answer and no policy drop reported for this flow{}{ended}",
                related_drops(agent.collector, flow)
            ));
        }
    }
}

/// Drops seen on the flow's addresses (either way), for explaining a loss.
fn related_drops(collector: &Collector, flow: &Flow) -> String {
    let drops: Vec<String> =
        collector.snapshot().iter().filter(|e| flow.is_related_drop(e)).take(3).map(events::summary).collect();
    if drops.is_empty() { String::new() } else { format!("; drops seen: {}", drops.join("; ")) }
}

/// What allowed a flow at each end: the allow events if the agent emits them, else the
/// endpoints' enforcement ("not enforced" or "policy").
fn allow_decided_by(
    flow: &Flow,
    events: &[palisade_agent::api::types::MonitorEvent],
    endpoints: &HashMap<String, EndpointStatus>,
) -> String {
    let mut parts = Vec::new();
    for (place, end) in [("egress", &flow.src_endpoint), ("ingress", &flow.dst_endpoint)] {
        let Some(end) = end else { continue };
        let ev = events.iter().find(|e| flow.is_allow(e) && flow.place(e) == Some(place));
        let text = match ev {
            Some(ev) => events::describe(ev),
            None => {
                let enforced = endpoints
                    .get(&end.key)
                    .is_some_and(|e| if place == "egress" { e.egress_enforced } else { e.ingress_enforced });
                if enforced { "policy".to_string() } else { "not enforced".to_string() }
            }
        };
        if text != "not enforced" {
            parts.push(format!("{place}: {text}"));
        }
    }
    if parts.is_empty() { "not enforced".into() } else { parts.join("; ") }
}
