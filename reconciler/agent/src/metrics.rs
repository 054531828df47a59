//! Metrics and health: the Prometheus endpoint (`/metrics`, text exposition format 0.0.4,
//! written here), `/healthz` and `/readyz`, served on one TCP listener (by default
//! `127.0.0.1:9962`, never a public address unless configured so).
//!
//! Three kinds of values:
//! - events the actors report as they happen, through two process-wide recorders with a
//!   one-line hook each: [`global`] (a revision accepted by the resolver, realized by the
//!   map writer, a plan applied) and [`readiness`] (a source's first complete sync);
//! - gauges asked from the actors at scrape time (policies, revision, endpoints,
//!   identities);
//! - what the kernel holds, read back from the pinned maps at scrape time (verdict
//!   counters, map fill), see [`crate::api::kernel`].
//!
//! Names follow Cilium's where there is one (`cilium_policy` -> `palisade_policy`, ...).
//! docs/operations.md lists every metric.
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use palisade_common::{direction, reason};

use crate::actors::Agent;
use crate::actors::endpoints::ListEndpoints;
use crate::actors::identity::ListIdentities;
use crate::actors::map_writer::GetRealized;
use crate::actors::policy_watch::ListPolicies;
use crate::actors::resolver::CurrentRevision;
use crate::mapstate::Plan;
use crate::monitor::reason_name;

/// The default listen address: loopback only.
pub const DEFAULT_ADDRESS: &str = "127.0.0.1:9962";

/// Where `/metrics`, `/healthz` and `/readyz` are served: an address, or `off`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListenAddress {
    Off,
    On(SocketAddr),
}

impl std::str::FromStr for ListenAddress {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("off") || s.is_empty() {
            return Ok(ListenAddress::Off);
        }
        s.parse()
            .map(ListenAddress::On)
            .map_err(|_| format!("{s:?} is not an address with a port (e.g. 127.0.0.1:9962 or [::1]:9962) or `off`"))
    }
}

// ---------------------------------------------------------------------------------------
// Histograms and the event recorder.

/// Bucket bounds (seconds) of both histograms.
pub const BUCKETS: [f64; 14] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// A Prometheus histogram with [`BUCKETS`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Histogram {
    /// Observations per bucket (not cumulative), then the +Inf bucket.
    counts: [u64; BUCKETS.len() + 1],
    sum: f64,
    count: u64,
}

impl Histogram {
    pub fn observe(&mut self, seconds: f64) {
        let i = BUCKETS.iter().position(|b| seconds <= *b).unwrap_or(BUCKETS.len());
        self.counts[i] += 1;
        self.sum += seconds;
        self.count += 1;
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (i, b) in BUCKETS.iter().enumerate() {
            cumulative += self.counts[i];
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}", self.count);
        let braces = if labels.is_empty() { String::new() } else { format!("{{{labels}}}") };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braces} {}", self.count);
    }
}

/// Most accepted revisions waiting to be realized that are remembered (the oldest are
/// forgotten beyond it, e.g. while the kernel cannot be written).
const MAX_PENDING: usize = 10_000;

#[derive(Debug, Default)]
struct Events {
    /// Revision -> when the resolver accepted it, until the map writer realizes it.
    accepted: BTreeMap<u64, Instant>,
    implementation_delay: Histogram,
    regenerations_ok: u64,
    regenerations_failed: u64,
    regeneration_time: Histogram,
    /// (verdict, direction, reason) -> flow records.
    flows: BTreeMap<(String, String, String), u64>,
    /// (policy, direction, action) -> flow records it decided.
    policy_verdicts: BTreeMap<(String, String, String), u64>,
    /// Source -> flows a reader missed.
    flows_lost: BTreeMap<String, u64>,
}

/// What the actors report as it happens (see the hooks in the resolver and map writer).
#[derive(Debug, Default)]
pub struct Recorder {
    events: Mutex<Events>,
}

/// The process's recorder.
pub fn global() -> &'static Recorder {
    static R: OnceLock<Recorder> = OnceLock::new();
    R.get_or_init(Recorder::default)
}

impl Recorder {
    fn lock(&self) -> std::sync::MutexGuard<'_, Events> {
        self.events.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The resolver accepted a change (policy, endpoint or identity): `revision` is new.
    pub fn change_accepted(&self, revision: u64) {
        let mut e = self.lock();
        e.accepted.insert(revision, Instant::now());
        while e.accepted.len() > MAX_PENDING {
            e.accepted.pop_first();
        }
    }

    /// Every endpoint has `revision` in the kernel: each change accepted up to it observes
    /// its implementation delay.
    pub fn revision_realized(&self, revision: u64) {
        let now = Instant::now();
        let mut e = self.lock();
        let later = e.accepted.split_off(&(revision + 1));
        let done = std::mem::replace(&mut e.accepted, later);
        for at in done.values() {
            e.implementation_delay.observe(now.duration_since(*at).as_secs_f64());
        }
    }

    /// The map writer applied (`ok`) or failed to apply a plan, `elapsed` after it started
    /// the pass: every endpoint whose kernel state the plan changes was regenerated.
    pub fn plan_applied(&self, plan: &Plan, ok: bool, elapsed: Duration) {
        let n = regenerated_endpoints(plan).len() as u64;
        let mut e = self.lock();
        if ok {
            e.regenerations_ok += n;
        } else {
            e.regenerations_failed += n;
        }
        for _ in 0..n {
            e.regeneration_time.observe(elapsed.as_secs_f64());
        }
    }

    /// A flow record was made (see [`crate::flows`]).
    pub fn flow_recorded(&self, flow: &palisade_api::flow::Flow) {
        let reason = flow.drop_reason_desc.as_deref().or(flow.forward_reason_desc.as_deref()).unwrap_or("UNKNOWN");
        let dir = flow.traffic_direction.to_ascii_lowercase();
        let mut e = self.lock();
        *e.flows.entry((flow.verdict.clone(), dir.clone(), reason.to_string())).or_default() += 1;
        let mut seen = BTreeSet::new();
        for p in flow.decided_by() {
            if seen.insert((p.policy_name(), p.action.clone())) {
                *e.policy_verdicts.entry((p.policy_name(), dir.clone(), p.action.clone())).or_default() += 1;
            }
        }
    }

    /// A reader missed `n` flows (`source`: `flow-buffer`, `slow-reader`).
    pub fn flows_lost(&self, source: &str, n: u64) {
        *self.lock().flows_lost.entry(source.to_string()).or_default() += n;
    }

    /// Implementation-delay observations so far (for tests).
    pub fn implementation_delay(&self) -> Histogram {
        self.lock().implementation_delay.clone()
    }
}

/// The endpoints whose policy entries, prefix lengths or endpoint entry a plan adds,
/// updates or deletes (a deleted endpoint is not regenerated, it is gone).
pub fn regenerated_endpoints(plan: &Plan) -> BTreeSet<u32> {
    let mut out = BTreeSet::new();
    for (_, k) in plan.policy.adds.iter().map(|(k, _)| k).chain(plan.policy.updates.iter().map(|(k, _)| k)) {
        out.insert(u32::from(k.endpoint_id()));
    }
    for (_, k) in &plan.policy.deletes {
        out.insert(u32::from(k.endpoint_id()));
    }
    for k in plan.policy_lengths.adds.iter().chain(&plan.policy_lengths.updates).map(|(k, _)| k) {
        out.insert(u32::from(k.endpoint_id()));
    }
    for k in &plan.policy_lengths.deletes {
        out.insert(u32::from(k.endpoint_id()));
    }
    for (_, v) in plan.endpoints.adds.iter().chain(&plan.endpoints.updates) {
        out.insert(v.endpoint_id);
    }
    out
}

// ---------------------------------------------------------------------------------------
// Readiness.

/// The policy directory (always a source).
pub const SOURCE_POLICY_DIR: &str = "policy-dir";
/// The Kubernetes API (with `--kubernetes`).
pub const SOURCE_KUBERNETES: &str = "kubernetes";
/// The kvstore (with `--kvstore`): its first complete list of the store.
pub const SOURCE_KVSTORE: &str = "kvstore";

#[derive(Debug)]
struct Sources {
    expected: BTreeSet<&'static str>,
    /// Source -> the revision that included its first complete sync.
    synced: BTreeMap<&'static str, u64>,
}

/// The sources of desired state and whether each has completed its first sync.
#[derive(Debug)]
pub struct Readiness {
    sources: Mutex<Sources>,
}

/// The process's readiness gate. The policy directory is always expected.
pub fn readiness() -> &'static Readiness {
    static R: OnceLock<Readiness> = OnceLock::new();
    R.get_or_init(|| Readiness {
        sources: Mutex::new(Sources { expected: BTreeSet::from([SOURCE_POLICY_DIR]), synced: BTreeMap::new() }),
    })
}

impl Readiness {
    fn lock(&self) -> std::sync::MutexGuard<'_, Sources> {
        self.sources.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// `source` feeds desired state: the agent is not ready before its first sync. Call
    /// before the metrics listener starts.
    pub fn expect_source(&self, source: &'static str) {
        self.lock().expected.insert(source);
    }

    /// `source` has handed in everything it had at start; `revision` includes it. Only the
    /// first call per source counts.
    pub fn source_synced(&self, source: &'static str, revision: u64) {
        let mut s = self.lock();
        if !s.synced.contains_key(source) {
            tracing::info!(source, revision, "source synced for the first time");
            s.synced.insert(source, revision);
        }
    }

    /// The revision that holds the first sync of every expected source, or the sources
    /// still waited for.
    pub fn first_sync(&self) -> Result<u64, Vec<&'static str>> {
        let s = self.lock();
        let missing: Vec<&'static str> = s.expected.iter().filter(|x| !s.synced.contains_key(*x)).copied().collect();
        if missing.is_empty() { Ok(s.synced.values().copied().max().unwrap_or(0)) } else { Err(missing) }
    }
}

// ---------------------------------------------------------------------------------------
// The HTTP listener.

/// How long `/healthz` waits for each actor, and a scrape for each question.
pub const ACTOR_TIMEOUT: Duration = Duration::from_secs(5);

async fn ask<A, M>(addr: &actix::Addr<A>, msg: M) -> Result<M::Result, String>
where
    A: actix::Actor<Context = actix::Context<A>> + actix::Handler<M>,
    M: actix::Message + Send + 'static,
    M::Result: Send,
{
    match tokio::time::timeout(ACTOR_TIMEOUT, addr.send(msg)).await {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(e)) => Err(format!("mailbox: {e}")),
        Err(_) => Err(format!("no answer within {} s", ACTOR_TIMEOUT.as_secs())),
    }
}

/// The routes `/metrics`, `/healthz`, `/readyz`.
pub fn router(agent: Agent) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(agent)
}

/// Binds `addr` and serves until the task is dropped.
pub async fn serve(agent: Agent, addr: SocketAddr) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(address = %addr, "metrics and health listening (/metrics, /healthz, /readyz)");
    axum::serve(listener, router(agent)).await
}

/// `/healthz`: 200 when every actor answers.
async fn healthz(State(agent): State<Agent>) -> impl IntoResponse {
    let mut lines = Vec::new();
    let mut ok = true;
    let mut check = |name: &str, r: Result<(), String>| match r {
        Ok(()) => lines.push(format!("{name}: ok")),
        Err(e) => {
            ok = false;
            lines.push(format!("{name}: {e}"));
        }
    };
    check("resolver", ask(&agent.resolver, CurrentRevision).await.map(drop));
    check("map-writer", ask(&agent.map_writer, GetRealized).await.map(drop));
    check("policy-watch", ask(&agent.policy_watch, ListPolicies).await.map(drop));
    check("endpoints", ask(&agent.endpoints, ListEndpoints).await.map(drop));
    check("identities", ask(&agent.identities, ListIdentities).await.map(drop));
    let code = if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, format!("{}\n{}\n", if ok { "ok" } else { "unhealthy" }, lines.join("\n")))
}

/// Whether the agent is ready, and why (not).
pub async fn ready(agent: &Agent) -> Result<String, String> {
    readiness().first_sync().map_err(|missing| format!("waiting for the first sync of: {}", missing.join(", ")))?;
    let realized = ask(&agent.map_writer, GetRealized).await.map_err(|e| format!("map writer: {e}"))?;
    ready_with(&realized)
}

/// [`ready`] with the map writer's answer at hand.
fn ready_with(realized: &crate::actors::map_writer::RealizedState) -> Result<String, String> {
    let sync_revision =
        readiness().first_sync().map_err(|missing| format!("waiting for the first sync of: {}", missing.join(", ")))?;
    if realized.revision < sync_revision {
        return Err(format!(
            "first full sync is revision {sync_revision}; realized in the kernel (programs attached to every endpoint): {}",
            realized.revision
        ));
    }
    Ok(format!(
        "first full sync: revision {sync_revision}; realized revision {}; datapath {}",
        realized.revision, realized.attach_mode
    ))
}

/// `/readyz`: 200 once the programs are loaded and attached to every endpoint and the
/// first full sync of every source is realized in the kernel.
async fn readyz(State(agent): State<Agent>) -> impl IntoResponse {
    match ready(&agent).await {
        Ok(detail) => (StatusCode::OK, format!("ready\n{detail}\n")),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready\n{why}\n")),
    }
}

async fn metrics(State(agent): State<Agent>) -> impl IntoResponse {
    let text = render(&agent).await;
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text)
}

// ---------------------------------------------------------------------------------------
// Rendering.

/// Escapes a label value.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

pub(crate) fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

pub(crate) fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
    if labels.is_empty() {
        let _ = writeln!(out, "{name} {value}");
    } else {
        let l: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{}\"", escape(v))).collect();
        let _ = writeln!(out, "{name}{{{}}} {value}", l.join(","));
    }
}

fn direction_name(d: u8) -> &'static str {
    if d == direction::INGRESS { "ingress" } else { "egress" }
}

/// What the kernel tells, read in one blocking pass.
struct KernelView {
    counters: Result<Vec<(u8, u8, palisade_common::Counter)>, String>,
    fill: Vec<crate::api::kernel::MapFill>,
}

fn read_kernel(dir: &Path) -> KernelView {
    KernelView {
        counters: crate::api::kernel::counters(dir).map_err(|e| e.to_string()),
        fill: crate::api::kernel::map_fill(dir),
    }
}

/// The flow metrics.
fn render_flows(out: &mut String, agent: &Agent) {
    let (flows, verdicts, lost) = {
        let e = global().lock();
        (e.flows.clone(), e.policy_verdicts.clone(), e.flows_lost.clone())
    };
    header(out, "palisade_flows_processed_total", "counter", "Flow records made, by verdict, direction and reason");
    for ((v, d, r), n) in &flows {
        sample(out, "palisade_flows_processed_total", &[("verdict", v), ("direction", d), ("reason", r)], n);
    }
    header(
        out,
        "palisade_policy_verdicts_total",
        "counter",
        "Flow records each policy decided, by direction and action (allow, deny, default-deny)",
    );
    for ((p, d, a), n) in &verdicts {
        sample(out, "palisade_policy_verdicts_total", &[("policy", p), ("direction", d), ("action", a)], n);
    }
    header(out, "palisade_flows_lost_total", "counter", "Flow records readers missed, by source");
    for source in ["flow-buffer", "slow-reader"] {
        sample(out, "palisade_flows_lost_total", &[("source", source)], lost.get(source).copied().unwrap_or(0));
    }
    let (recorded, overwritten) = agent.flows.counts();
    header(out, "palisade_flows_overwritten_total", "counter", "Flow records overwritten in the full flow buffer");
    sample(out, "palisade_flows_overwritten_total", &[], overwritten);
    header(out, "palisade_flow_buffer_flows", "gauge", "Flow records in the flow buffer");
    sample(out, "palisade_flow_buffer_flows", &[], recorded - overwritten);
    header(out, "palisade_flow_buffer_capacity", "gauge", "Flow records the flow buffer holds (--flow-buffer-size)");
    sample(out, "palisade_flow_buffer_capacity", &[], agent.flows.capacity());
}

/// The whole exposition.
pub async fn render(agent: &Agent) -> String {
    let mut out = String::new();
    let dir = agent.config.bpffs.clone();
    let kernel = tokio::task::spawn_blocking(move || read_kernel(&dir)).await.ok();

    if let Ok(policies) = ask(&agent.policy_watch, ListPolicies).await {
        header(&mut out, "palisade_policy", "gauge", "Number of policies currently enforced");
        sample(&mut out, "palisade_policy", &[], policies.iter().filter(|p| p.enforced).count());
        header(&mut out, "palisade_policy_rejected", "gauge", "Number of policy manifests currently rejected");
        sample(&mut out, "palisade_policy_rejected", &[], policies.iter().filter(|p| !p.enforced).count());
    }
    if let Ok(rev) = ask(&agent.resolver, CurrentRevision).await {
        header(&mut out, "palisade_policy_max_revision", "gauge", "Highest revision of the desired state");
        sample(&mut out, "palisade_policy_max_revision", &[], rev);
    }
    let realized = ask(&agent.map_writer, GetRealized).await.ok();
    if let Some(r) = &realized {
        header(
            &mut out,
            "palisade_policy_realized_revision",
            "gauge",
            "Revision realized in the kernel for every endpoint",
        );
        sample(&mut out, "palisade_policy_realized_revision", &[], r.revision);
    }
    let (delay, regen_ok, regen_failed, regen_time) = {
        let e = global().lock();
        (e.implementation_delay.clone(), e.regenerations_ok, e.regenerations_failed, e.regeneration_time.clone())
    };
    render_flows(&mut out, agent);
    header(
        &mut out,
        "palisade_policy_implementation_delay",
        "histogram",
        "Seconds from a change accepted (policy, endpoint or identity) to the kernel maps written for every endpoint",
    );
    delay.render(&mut out, "palisade_policy_implementation_delay", "");

    if let Some(k) = &kernel {
        match &k.counters {
            Ok(slots) => {
                header(
                    &mut out,
                    "palisade_drop_count_total",
                    "counter",
                    "Packets dropped by the datapath, by reason and direction (the pod's point of view)",
                );
                for (r, d, c) in slots.iter().filter(|(r, _, _)| reason::is_drop(*r) && reason_name(*r) != "unknown") {
                    sample(
                        &mut out,
                        "palisade_drop_count_total",
                        &[("reason", reason_name(*r)), ("direction", direction_name(*d))],
                        c.packets,
                    );
                }
                header(&mut out, "palisade_drop_bytes_total", "counter", "Bytes dropped, by reason and direction");
                for (r, d, c) in slots.iter().filter(|(r, _, _)| reason::is_drop(*r) && reason_name(*r) != "unknown") {
                    sample(
                        &mut out,
                        "palisade_drop_bytes_total",
                        &[("reason", reason_name(*r)), ("direction", direction_name(*d))],
                        c.bytes,
                    );
                }
                let mut fwd = [(0u64, 0u64); 2];
                for (_, d, c) in slots.iter().filter(|(r, _, _)| *r != 0 && !reason::is_drop(*r)) {
                    fwd[usize::from(*d & 1)].0 += c.packets;
                    fwd[usize::from(*d & 1)].1 += c.bytes;
                }
                header(
                    &mut out,
                    "palisade_forward_count_total",
                    "counter",
                    "Packets the datapath let through, by direction (the pod's point of view)",
                );
                for d in [direction::INGRESS, direction::EGRESS] {
                    sample(
                        &mut out,
                        "palisade_forward_count_total",
                        &[("direction", direction_name(d))],
                        fwd[d as usize].0,
                    );
                }
                header(&mut out, "palisade_forward_bytes_total", "counter", "Bytes let through, by direction");
                for d in [direction::INGRESS, direction::EGRESS] {
                    sample(
                        &mut out,
                        "palisade_forward_bytes_total",
                        &[("direction", direction_name(d))],
                        fwd[d as usize].1,
                    );
                }
                header(
                    &mut out,
                    "palisade_verdict_count_total",
                    "counter",
                    "Packets by verdict reason and direction (allow reasons included)",
                );
                for (r, d, c) in slots.iter().filter(|(r, _, _)| reason_name(*r) != "unknown") {
                    let verdict = if reason::is_drop(*r) { "drop" } else { "allow" };
                    sample(
                        &mut out,
                        "palisade_verdict_count_total",
                        &[("verdict", verdict), ("reason", reason_name(*r)), ("direction", direction_name(*d))],
                        c.packets,
                    );
                }
            }
            Err(e) => tracing::warn!(error = %e, "metrics: the verdict counters cannot be read"),
        }
        header(
            &mut out,
            "palisade_bpf_map_pressure",
            "gauge",
            "Fill of each eBPF map: entries / max entries (1 = full)",
        );
        for f in &k.fill {
            let ratio = if f.max_entries == 0 { 0.0 } else { f.entries as f64 / f64::from(f.max_entries) };
            sample(&mut out, "palisade_bpf_map_pressure", &[("map_name", f.name)], ratio);
        }
        header(&mut out, "palisade_bpf_map_entries", "gauge", "Entries in each eBPF map");
        for f in &k.fill {
            sample(&mut out, "palisade_bpf_map_entries", &[("map_name", f.name)], f.entries);
        }
    }

    if let Ok(eps) = ask(&agent.endpoints, ListEndpoints).await {
        header(&mut out, "palisade_endpoint", "gauge", "Number of local endpoints (pods of this node)");
        sample(&mut out, "palisade_endpoint", &[], eps.len());
        if let Some(r) = &realized {
            let (ing, eg) = r
                .endpoints
                .values()
                .fold((0, 0), |(i, e), x| (i + usize::from(x.ingress_enforced), e + usize::from(x.egress_enforced)));
            header(&mut out, "palisade_endpoint_enforced", "gauge", "Endpoints with policy enforced, by direction");
            sample(&mut out, "palisade_endpoint_enforced", &[("direction", "ingress")], ing);
            sample(&mut out, "palisade_endpoint_enforced", &[("direction", "egress")], eg);
        }
    }
    if let Ok(ids) = ask(&agent.identities, ListIdentities).await {
        let mut by_type: BTreeMap<&str, usize> =
            BTreeMap::from([("reserved", 0), ("cluster_local", 0), ("node_local", 0)]);
        for i in &ids {
            let t = if i.id < palisade_common::identity::FIRST_CLUSTER {
                "reserved"
            } else if i.id & palisade_common::identity::LOCAL_SCOPE != 0 {
                "node_local"
            } else {
                "cluster_local"
            };
            *by_type.entry(t).or_default() += 1;
        }
        header(&mut out, "palisade_identity", "gauge", "Number of security identities, by type");
        for (t, n) in by_type {
            sample(&mut out, "palisade_identity", &[("type", t)], n);
        }
    }
    header(
        &mut out,
        "palisade_endpoint_regenerations_total",
        "counter",
        "Endpoint regenerations (an endpoint's kernel policy state rewritten), by outcome",
    );
    sample(&mut out, "palisade_endpoint_regenerations_total", &[("outcome", "success")], regen_ok);
    sample(&mut out, "palisade_endpoint_regenerations_total", &[("outcome", "failure")], regen_failed);
    header(
        &mut out,
        "palisade_endpoint_regeneration_time_stats_seconds",
        "histogram",
        "Seconds a regeneration took: the map writer's pass from the desired state to the maps written",
    );
    regen_time.render(&mut out, "palisade_endpoint_regeneration_time_stats_seconds", "");
    let is_ready = realized.as_ref().is_some_and(|r| ready_with(r).is_ok());
    header(&mut out, "palisade_ready", "gauge", "1 when /readyz answers 200");
    sample(&mut out, "palisade_ready", &[], u8::from(is_ready));
    if let Some((kv, _)) = agent.kvstore.get() {
        kv.render_metrics(&mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_address_parses() {
        assert_eq!("off".parse::<ListenAddress>().unwrap(), ListenAddress::Off);
        assert_eq!(
            DEFAULT_ADDRESS.parse::<ListenAddress>().unwrap(),
            ListenAddress::On("127.0.0.1:9962".parse().unwrap())
        );
        assert!("9962".parse::<ListenAddress>().is_err());
    }

    #[test]
    fn histogram_text_is_cumulative() {
        let mut h = Histogram::default();
        h.observe(0.002);
        h.observe(0.002);
        h.observe(100.0);
        let mut out = String::new();
        h.render(&mut out, "x", "");
        assert!(out.contains("x_bucket{le=\"0.001\"} 0\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"0.0025\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"30\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_count 3\n"), "{out}");
    }

    #[test]
    fn regenerations_are_the_endpoints_a_plan_touches() {
        use palisade_common::{EndpointInfo, PolicyKey, PolicyLengthsKey, PolicyValue};
        let mut p = Plan::default();
        p.policy.adds.push(((88, PolicyKey::new(3, 0, 256, 6, 80)), PolicyValue::default()));
        p.policy.deletes.push((88, PolicyKey::new(4, 0, 256, 6, 80)));
        p.policy_lengths.updates.push((PolicyLengthsKey::new(3, 0, 256), 1));
        p.endpoints.adds.push((17, EndpointInfo { endpoint_id: 5, ..Default::default() }));
        // An ipcache change or a deleted endpoint regenerates nothing.
        p.endpoints.deletes.push(18);
        assert_eq!(regenerated_endpoints(&p), BTreeSet::from([3, 4, 5]));
        assert!(regenerated_endpoints(&Plan::default()).is_empty());
    }

    #[test]
    fn readiness_waits_for_every_expected_source() {
        let r = Readiness {
            sources: Mutex::new(Sources { expected: BTreeSet::from([SOURCE_POLICY_DIR]), synced: BTreeMap::new() }),
        };
        r.expect_source(SOURCE_KUBERNETES);
        assert_eq!(r.first_sync(), Err(vec![SOURCE_KUBERNETES, SOURCE_POLICY_DIR]));
        r.source_synced(SOURCE_POLICY_DIR, 3);
        assert_eq!(r.first_sync(), Err(vec![SOURCE_KUBERNETES]));
        r.source_synced(SOURCE_KUBERNETES, 9);
        // Only the first sync of a source counts.
        r.source_synced(SOURCE_KUBERNETES, 12);
        assert_eq!(r.first_sync(), Ok(9));
    }

    #[test]
    fn realized_revisions_observe_every_accepted_change_once() {
        let r = Recorder::default();
        for rev in 1..=3 {
            r.change_accepted(rev);
        }
        r.revision_realized(2);
        assert_eq!(r.implementation_delay().count(), 2);
        r.revision_realized(2);
        assert_eq!(r.implementation_delay().count(), 2);
        r.revision_realized(5);
        assert_eq!(r.implementation_delay().count(), 3);
    }

    #[test]
    fn label_values_are_escaped() {
        let mut out = String::new();
        sample(&mut out, "m", &[("a", "x\"y\\z\n")], 1);
        assert_eq!(out, "m{a=\"x\\\"y\\\\z\\n\"} 1\n");
    }
}
