//! The control plane at scale (issue 8, items 3 and 5), built on the public API of
//! `palisade-policy` (full resolution: [`palisade_policy::resolve`]) and of the agent (its
//! binary and local API), so the same figures can be taken again after the resolver changes.
//!
//! - [`scaling`] — full resolution time and memory at 10x steps of identities. Each step runs
//!   in a fresh child process (this binary with `--resolve-step K`) so its memory figure is
//!   its own: peak RSS of the child minus its RSS before building anything.
//! - [`agent_scale`] — the real agent with E local endpoints (real veth interfaces in its
//!   namespace), P policies and K identities (E endpoint identities plus K - E CIDR
//!   identities the policies name): time from start to full enforcement, policy-to-kernel
//!   latency of one changed policy, resident memory at that scale.
//! - [`map_writes`] — policy entries written into the kernel per second, one
//!   `BPF_MAP_UPDATE_ELEM` per entry and `BPF_MAP_UPDATE_BATCH`.
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use palisade_api::types::{EndpointSpec, NamespaceSpec};
use palisade_common::{POLICY_PREFIX_FULL, PolicyKey, PolicyValue, direction, proto};
use palisade_policy::{EndpointView, IdentityAllocator, LabelSet, ManifestOutcome, Policy};

use super::memory::rss_kib;
use super::{Report, Size, median};
use crate::agent::{AgentProcess, CALL_TIMEOUT, RunDirs, call};
use crate::cleanup;
use crate::netns::Netns;

/// Identities of the scaling curve.
pub fn curve(size: Size) -> Vec<usize> {
    match size {
        Size::Quick => vec![100, 1_000, 10_000],
        Size::Full => vec![100, 1_000, 10_000, 100_000],
    }
}

/// Endpoints, identities, policies and policy changes of the agent at scale.
#[derive(Clone, Copy, Debug)]
pub struct Scale {
    pub endpoints: usize,
    pub identities: usize,
    pub policies: usize,
    pub changes: usize,
}

impl Scale {
    pub fn of(size: Size) -> Scale {
        match size {
            Size::Quick => Scale { endpoints: 100, identities: 1_000, policies: 100, changes: 10 },
            Size::Full => Scale { endpoints: 1_000, identities: 10_000, policies: 1_000, changes: 50 },
        }
    }
}

/// Entries written by the map-write measurement.
fn map_write_count(size: Size) -> usize {
    match size {
        Size::Quick => 20_000,
        // Twice this fits in POLICY (262,144 slots): single, then batched, into fresh keys.
        Size::Full => 100_000,
    }
}

pub fn figure_names(size: Size) -> Vec<String> {
    let mut v = Vec::new();
    for k in curve(size) {
        for m in ["ms", "rss_mib", "entries"] {
            v.push(format!("control.resolve.k{k}_{m}"));
        }
    }
    for m in [
        "agent.start_to_enforced_s",
        "agent.ready_s",
        "agent.restart_to_enforced_s",
        "agent.clsact_start_to_enforced_s",
        "agent.restart_ready_s",
        "agent.identities",
        "agent.policy_entries",
        "agent.policy_change_p50_ms",
        "agent.policy_change_p99_ms",
        "agent.rss_mib",
        "agent.peak_rss_mib",
        "map_writes.single_per_s",
        "map_writes.batched_per_s",
    ] {
        v.push(format!("control.{m}"));
    }
    v
}

// ---------------------------------------------------------------------------------------
// Scaling curve

/// Endpoints and policies of every scaling step (only the identities grow).
const CURVE_ENDPOINTS: usize = 100;
const CURVE_POLICIES: usize = 100;
/// Peers of a policy: identities with one of this many `tier` values.
const TIERS: usize = 100;
const NAMESPACE: &str = "bench";

fn pod_labels(j: usize, endpoints: usize) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app".to_string(), format!("app-{}", j % endpoints)),
        ("tier".to_string(), format!("t-{}", j % TIERS)),
        ("idx".to_string(), j.to_string()),
    ])
}

/// Policy `i`: endpoints `app-(i % endpoints)` take TCP port 8000 + i % 1000 (or `port`)
/// from every identity of tier `t-(i % TIERS)`, and from `cidrs`.
fn policy_yaml(i: usize, endpoints: usize, port: Option<u16>, cidrs: &[String]) -> String {
    let port = port.unwrap_or(8000 + (i % 1000) as u16);
    let mut s = format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: p{i}\n  namespace: {NAMESPACE}\nspec:\n  \
         endpointSelector:\n    matchLabels:\n      app: app-{}\n  ingress:\n  - fromEndpoints:\n    - matchLabels:\n        \
         tier: t-{}\n    toPorts:\n    - ports:\n      - port: \"{port}\"\n        protocol: TCP\n",
        i % endpoints,
        i % TIERS
    );
    if !cidrs.is_empty() {
        s.push_str("  - fromCIDR:\n");
        for c in cidrs {
            let _ = writeln!(s, "    - {c}");
        }
        let _ = write!(s, "    toPorts:\n    - ports:\n      - port: \"{port}\"\n        protocol: TCP\n");
    }
    s
}

fn parse(text: &str, source: &str) -> Result<Vec<Policy>, String> {
    let outcomes = palisade_policy::parse_manifests(text, source).map_err(|e| e.to_string())?;
    outcomes
        .into_iter()
        .map(|o| match o {
            ManifestOutcome::Accepted(p) => Ok(p),
            ManifestOutcome::Rejected(e) => Err(format!("{source}: {e}")),
        })
        .collect()
}

/// One scaling step, in this process: `k` identities, [`CURVE_ENDPOINTS`] of them local
/// endpoints, [`CURVE_POLICIES`] policies; full resolution `runs` times. Returns (median
/// milliseconds, entries, peak RSS growth in kiB).
pub fn resolve_step(k: usize, runs: usize) -> Result<(f64, usize, u64), String> {
    let (base, _) = rss_kib(std::process::id())?;
    let mut ids = IdentityAllocator::new();
    let ns_labels = BTreeMap::new();
    let mut endpoints = Vec::new();
    for j in 0..k {
        let labels = LabelSet::for_pod(NAMESPACE, &ns_labels, &pod_labels(j, CURVE_ENDPOINTS), "default", "default");
        let id = ids.allocate(&labels);
        if j < CURVE_ENDPOINTS {
            endpoints.push(EndpointView {
                id: (j + 1) as u16,
                namespace: NAMESPACE.into(),
                identity: id,
                labels,
                named_ports: Vec::new(),
            });
        }
    }
    let text: String = (0..CURVE_POLICIES).fold(String::new(), |mut s, i| {
        let _ = write!(s, "---\n{}", policy_yaml(i, CURVE_ENDPOINTS, None, &[]));
        s
    });
    let policies = parse(&text, "bench")?;
    let mut times = Vec::new();
    let mut entries = 0;
    let mut keep = None;
    for _ in 0..runs.max(1) {
        let t = Instant::now();
        let state = palisade_policy::resolve(&policies, &endpoints, &ids);
        times.push(t.elapsed().as_secs_f64() * 1e3);
        entries = state.endpoints.values().map(|e| e.entries.len()).sum();
        keep = Some(state);
    }
    let (_, hwm) = rss_kib(std::process::id())?;
    drop(keep);
    Ok((median(&times), entries, hwm.saturating_sub(base)))
}

/// The scaling curve, one child process per step.
pub fn scaling(report: &mut Report, size: Size) {
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => return report.failures.push(format!("control: scaling: {e}")),
    };
    let runs = if size == Size::Quick { 1 } else { 3 };
    for k in curve(size) {
        let out = Command::new(&exe)
            .args(["--resolve-step", &k.to_string(), "--runs", &runs.to_string()])
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output();
        let parsed = out.map_err(|e| e.to_string()).and_then(|o| {
            let text = String::from_utf8_lossy(&o.stdout).to_string();
            let nums: Vec<f64> = text.split_whitespace().filter_map(|w| w.parse().ok()).collect();
            if o.status.success() && nums.len() == 3 {
                Ok((nums[0], nums[1], nums[2]))
            } else {
                Err(format!("resolve step {k}: {} {text}", o.status))
            }
        });
        let (ms, entries, kib) = match parsed {
            Ok(v) => v,
            Err(e) => {
                report.failures.push(format!("control: scaling: {e}"));
                continue;
            }
        };
        let ctx = format!(
            "palisade_policy::resolve (full resolution) of {CURVE_POLICIES} policies over {CURVE_ENDPOINTS} local endpoints and {k} identities (each policy admits the identities of one of {TIERS} tiers); median of {runs} runs, fresh process"
        );
        report.push(format!("control.resolve.k{k}_ms"), ms, "ms", ctx.clone());
        report.push(
            format!("control.resolve.k{k}_rss_mib"),
            kib / 1024.0,
            "MiB",
            format!("peak RSS growth of the process (identities, endpoints, policies, desired state); {ctx}"),
        );
        report.push(
            format!("control.resolve.k{k}_entries"),
            entries,
            "entries",
            format!("policy entries in the desired state; {ctx}"),
        );
    }
}

// ---------------------------------------------------------------------------------------
// The agent at scale

/// The `j`-th endpoint's address (10.210.0.1 onwards) and host-side interface.
fn endpoint_addr(j: usize) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(10, 210, 0, 1)) + j as u32)
}

fn endpoint_dev(j: usize) -> String {
    format!("lxb{j}")
}

/// Endpoint registrations in flight at once.
const REGISTER_CONCURRENCY: usize = 16;
/// How long one registration may take (it returns once the endpoint is known; the agent
/// may be busy resolving for the others).
const REGISTER_TIMEOUT: Duration = Duration::from_mins(1);
/// How long registering every endpoint may take before the measurement gives up.
fn register_deadline(size: Size) -> Duration {
    match size {
        Size::Quick => Duration::from_mins(2),
        Size::Full => Duration::from_mins(20),
    }
}

/// `ip -n <ns> -batch -` with `lines`.
pub(super) fn ip_batch(ns: &Netns, lines: &str) -> Result<(), String> {
    let mut child = Command::new("ip")
        .args(["-n", ns.name(), "-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("ip -batch: {e}"))?;
    child.stdin.take().expect("piped").write_all(lines.as_bytes()).map_err(|e| format!("ip -batch: {e}"))?;
    let out = child.wait_with_output().map_err(|e| format!("ip -batch: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("ip -batch: {}", String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// The CIDRs policy `i` names: (K - E) / P distinct host addresses in 10.220.0.0/16 up.
fn policy_cidrs(i: usize, per_policy: usize) -> Vec<String> {
    (0..per_policy)
        .map(|c| {
            let n = i * per_policy + c;
            format!("{}/32", std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(10, 220, 0, 1)) + n as u32))
        })
        .collect()
}

pub fn agent_scale(report: &mut Report, size: Size, agent: &Path) {
    if let Err(e) = agent_scale_inner(report, size, agent, false) {
        report.failures.push(format!("control: agent at scale: {e}"));
    }
    // The same node bring-up with tc (clsact) filters instead of tcx links: what the
    // agent costs without the kernel's grace period per tcx attach.
    if let Err(e) = agent_scale_inner(report, size, agent, true) {
        report.failures.push(format!("control: agent at scale (clsact): {e}"));
    }
}

/// `clsact`: attach with `--attach-mode clsact` and measure the bring-up only.
fn agent_scale_inner(report: &mut Report, size: Size, agent: &Path, clsact: bool) -> Result<(), String> {
    let s = Scale::of(size);
    let per_policy = (s.identities - s.endpoints) / s.policies;
    let pid = std::process::id();
    let ns = Netns::create(&format!("pt{pid}-cp")).map_err(|e| e.to_string())?;
    ns.sysctls(&[("net/ipv6/conf/all/disable_ipv6", "1"), ("net/ipv6/conf/default/disable_ipv6", "1")])
        .map_err(|e| e.to_string())?;
    // Endpoint interfaces: veth pairs with both ends in the agent's namespace (the pods'
    // side is never used: this measures the control plane, no traffic flows).
    let mut lines = String::new();
    for j in 0..s.endpoints {
        let _ = writeln!(lines, "link add {} type veth peer name lxp{j}", endpoint_dev(j));
    }
    for j in 0..s.endpoints {
        let _ = writeln!(lines, "link set {} up", endpoint_dev(j));
    }
    ip_batch(&ns, &lines)?;
    let dirs = RunDirs::create(&format!("{pid}-cp"), false).map_err(|e| e.to_string())?;
    for i in 0..s.policies {
        dirs.write_policy(&format!("p{i}.yaml"), &policy_yaml(i, s.endpoints, None, &policy_cidrs(i, per_policy)))
            .map_err(|e| e.to_string())?;
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    let extra: Vec<String> = if clsact { vec!["--attach-mode".into(), "clsact".into()] } else { Vec::new() };
    let proc = AgentProcess::spawn(agent, ns.open().map_err(|e| e.to_string())?, &dirs, None, &extra)
        .map_err(|e| e.to_string())?;
    let limit = Duration::from_mins(2);
    let (ready, enforced) = rt
        .block_on(async {
            proc.wait_ready(Duration::from_mins(1)).await?;
            let ready = t0.elapsed();
            call("namespace", CALL_TIMEOUT, proc.client.put_namespace(NAMESPACE, &NamespaceSpec::default())).await?;
            // As kubelet starts pods: many at once, each through the CNI's call to the agent.
            let client = &proc.client;
            let mut calls = futures_util::stream::iter((0..s.endpoints).map(|j| async move {
                let spec = EndpointSpec {
                    labels: pod_labels(j, s.endpoints),
                    service_account: "default".into(),
                    ipv4: Some(endpoint_addr(j)),
                    ipv6: None,
                    interface: endpoint_dev(j),
                    ports: Vec::new(),
                };
                call(
                    format!("endpoint {j}"),
                    REGISTER_TIMEOUT,
                    client.put_endpoint(NAMESPACE, &format!("pod{j}"), &spec),
                )
                .await
            }))
            .buffer_unordered(REGISTER_CONCURRENCY);
            let mut done = 0;
            while let Some(r) = calls.next().await {
                r?;
                done += 1;
                if done % 100 == 0 {
                    eprintln!("  {done} endpoints registered ({:.1} s since start)", t0.elapsed().as_secs_f64());
                }
                if t0.elapsed() > register_deadline(size) {
                    return Err(crate::error::SetupError::AgentHung {
                        call: format!("registering {} endpoints ({done} done)", s.endpoints),
                        secs: register_deadline(size).as_secs(),
                    });
                }
            }
            call("full enforcement", limit + Duration::from_secs(5), proc.client.wait_current(limit)).await?;
            Ok::<_, crate::error::SetupError>((ready, t0.elapsed()))
        })
        .map_err(|e| e.to_string())?;
    let (status, eps) = rt
        .block_on(async {
            let st = call("status", CALL_TIMEOUT, proc.client.status()).await?;
            let eps = call("endpoints", CALL_TIMEOUT, proc.client.endpoints()).await?;
            Ok::<_, crate::error::SetupError>((st, eps))
        })
        .map_err(|e| e.to_string())?;
    let entries: usize = eps.iter().map(|e| e.policy_entries).sum();
    let enforced_eps = eps.iter().filter(|e| e.ingress_enforced).count();
    if enforced_eps != s.endpoints || status.policies != s.policies {
        return Err(format!(
            "the agent enforces {enforced_eps} of {} endpoints and has {} of {} policies",
            s.endpoints, status.policies, s.policies
        ));
    }
    let ctx = format!(
        "real palisade-agent, {} local endpoints (veth interfaces), {} CiliumNetworkPolicies in its policy directory, {} identities ({} endpoints + {} CIDR identities)",
        s.endpoints,
        s.policies,
        s.identities,
        s.endpoints,
        s.identities - s.endpoints
    );
    if clsact {
        report.push(
            "control.agent.clsact_start_to_enforced_s",
            enforced.as_secs_f64(),
            "s",
            format!("node bring-up as control.agent.start_to_enforced_s, with --attach-mode clsact (tc filters instead of tcx links); {ctx}"),
        );
        proc.check_alive("at the end").map_err(|e| e.to_string())?;
        return Ok(());
    }
    report.push(
        "control.agent.start_to_enforced_s",
        enforced.as_secs_f64(),
        "s",
        format!("node bring-up: from spawning the agent (policies already in its directory) until every endpoint, registered through the local API as a CNI would ({REGISTER_CONCURRENCY} at once), has its programs attached and its policy in the kernel (wait for the current revision); {ctx}"),
    );
    report.push(
        "control.agent.ready_s",
        ready.as_secs_f64(),
        "s",
        format!("from spawning the agent until its API answers; {ctx}"),
    );
    let kernel_ids = kernel_identities(&dirs.bpffs)?;
    report.push(
        "control.agent.identities",
        kernel_ids as f64,
        "identities",
        format!("distinct identities in the kernel's IPv4 ipcache maps after full enforcement (the agent's status counts {} label identities); {ctx}", status.identities),
    );
    report.push(
        "control.agent.policy_entries",
        entries as f64,
        "entries",
        format!("policy entries loaded over all endpoints; {ctx}"),
    );
    let (rss, hwm) = rss_kib(proc.pid().ok_or("the agent is gone")?)?;
    report.push("control.agent.rss_mib", rss as f64 / 1024.0, "MiB", format!("VmRSS after full enforcement; {ctx}"));
    report.push(
        "control.agent.peak_rss_mib",
        hwm as f64 / 1024.0,
        "MiB",
        format!("VmHWM (peak RSS since start); {ctx}"),
    );

    let mut lat = Vec::new();
    for c in 0..s.changes {
        let i = (c * 7) % s.policies;
        let text = policy_yaml(i, s.endpoints, Some(9000 + c as u16), &policy_cidrs(i, per_policy));
        let t = Instant::now();
        rt.block_on(async {
            dirs.write_policy(&format!("p{i}.yaml"), &text)?;
            let ack = call("rescan", CALL_TIMEOUT, proc.client.rescan_policies()).await?;
            call("change realized", limit + Duration::from_secs(5), proc.client.wait_revision(ack.revision, limit))
                .await
                .map(|_| ())
        })
        .map_err(|e| e.to_string())?;
        lat.push(t.elapsed().as_secs_f64() * 1e3);
    }
    eprintln!("  policy change latencies (ms, in order): {lat:.0?}");
    lat.sort_by(f64::total_cmp);
    let cctx = format!(
        "one policy's port changed: file written, rescan asked, until the agent reports the revision realized in the kernel; {} changes; {ctx}",
        s.changes
    );
    report.push("control.agent.policy_change_p50_ms", super::percentile(&lat, 50.0), "ms", cctx.clone());
    report.push("control.agent.policy_change_p99_ms", super::percentile(&lat, 99.0), "ms", cctx);

    // The DaemonSet case: the agent restarts on a node that runs all these pods (its
    // state directory, pinned maps and links are there, its policies in the directory).
    proc.stop_now(crate::agent::StopHow::Term, Duration::from_secs(30)).map_err(|e| e.to_string())?;
    let t = Instant::now();
    proc.start_again(ns.open().map_err(|e| e.to_string())?, &dirs).map_err(|e| e.to_string())?;
    let ready = rt
        .block_on(async {
            proc.wait_ready(Duration::from_mins(1)).await?;
            let ready = t.elapsed();
            call("full enforcement after the restart", limit + Duration::from_secs(5), proc.client.wait_current(limit))
                .await?;
            Ok::<_, crate::error::SetupError>(ready)
        })
        .map_err(|e| e.to_string())?;
    let restarted = t.elapsed();
    let eps = rt
        .block_on(async { call("endpoints", CALL_TIMEOUT, proc.client.endpoints()).await })
        .map_err(|e| e.to_string())?;
    let enforced_eps = eps.iter().filter(|e| e.ingress_enforced).count();
    let entries_after: usize = eps.iter().map(|e| e.policy_entries).sum();
    if enforced_eps != s.endpoints || entries_after != entries {
        return Err(format!(
            "after the restart the agent enforces {enforced_eps} of {} endpoints with {entries_after} entries (before: {entries})",
            s.endpoints
        ));
    }
    report.push(
        "control.agent.restart_to_enforced_s",
        restarted.as_secs_f64(),
        "s",
        format!("the agent stopped (SIGTERM) and started again on the node it enforced: from the new process's spawn until its current revision is realized for every endpoint (registry, policies, pinned maps and links taken over); {ctx}"),
    );
    report.push(
        "control.agent.restart_ready_s",
        ready.as_secs_f64(),
        "s",
        format!("from spawning the restarted agent until its API answers; {ctx}"),
    );
    proc.check_alive("at the end").map_err(|e| e.to_string())?;
    drop(proc);
    drop(dirs);
    drop(ns);
    Ok(())
}

/// Distinct identities of the entries in the pinned IPv4 ipcache maps under `pin_dir`.
fn kernel_identities(pin_dir: &Path) -> Result<usize, String> {
    use aya::maps::{HashMap, LpmTrie, Map, MapData};
    use palisade_common::{IpcacheValue, Ipv4Prefix, map_names};
    let open = |name: &str| MapData::from_pin(pin_dir.join(name)).map_err(|e| format!("opening map {name}: {e}"));
    let mut ids = std::collections::BTreeSet::new();
    let host: HashMap<MapData, Ipv4Prefix, IpcacheValue> =
        HashMap::try_from(Map::HashMap(open(map_names::IPCACHE_HOST_V4)?)).map_err(|e| e.to_string())?;
    for (_, v) in host.iter().flatten() {
        ids.insert(v.identity);
    }
    let lpm: LpmTrie<MapData, Ipv4Prefix, IpcacheValue> =
        LpmTrie::try_from(Map::LpmTrie(open(map_names::IPCACHE_V4)?)).map_err(|e| e.to_string())?;
    for (_, v) in lpm.iter().flatten() {
        ids.insert(v.identity);
    }
    Ok(ids.len())
}

// ---------------------------------------------------------------------------------------
// Map writes

const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BATCH: usize = 1024;

#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

#[repr(C)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> Result<(), std::io::Error> {
    // SAFETY: `attr` is a valid bpf_attr prefix for `cmd`, alive for the call; the pointers
    // inside it point at live buffers of the sizes the map expects.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_mut::<T>(attr), size_of::<T>() as u32) };
    if r < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
}

pub fn map_writes(report: &mut Report, size: Size) {
    if let Err(e) = map_writes_inner(report, size) {
        report.failures.push(format!("control: map writes: {e}"));
    }
}

fn map_writes_inner(report: &mut Report, size: Size) -> Result<(), String> {
    let pin_dir = PathBuf::from(crate::agent::BPFFS).join(format!("palisade-testbed-{}-mapw", std::process::id()));
    if pin_dir.exists() {
        return Err(format!("{} exists", pin_dir.display()));
    }
    let _guard = {
        let p = pin_dir.clone();
        cleanup::register(format!("bpffs directory {}", p.display()), move || {
            let _ = std::fs::remove_dir_all(&p);
        })
        .map_err(|e| e.to_string())?
    };
    let dp = palisade_agent::datapath::Datapath::load(&palisade_agent::datapath::DatapathConfig {
        pin_dir: pin_dir.clone(),
    })
    .map_err(|e| e.to_string())?;
    let info =
        aya::maps::MapInfo::from_pin(pin_dir.join(palisade_common::map_names::POLICY)).map_err(|e| e.to_string())?;
    let fd = info.fd().map_err(|e| e.to_string())?;
    let map_fd = fd.as_fd().as_raw_fd() as u32;
    let n = map_write_count(size);
    let value = PolicyValue { flags: 0, cookie: 1, prefix_len: POLICY_PREFIX_FULL };
    let keys = |base: u32| -> Vec<PolicyKey> {
        (0..n)
            .map(|i| {
                PolicyKey::new(1 + (i % 1000) as u16, direction::INGRESS, base + (i / 1000) as u32, proto::TCP, 80)
                    .at_prefix(POLICY_PREFIX_FULL)
            })
            .collect()
    };
    let single_keys = keys(100_000);
    let t = Instant::now();
    for k in &single_keys {
        let mut a = ElemAttr {
            map_fd,
            _pad: 0,
            key: std::ptr::from_ref::<PolicyKey>(k) as u64,
            value: &raw const value as u64,
            flags: 0,
        };
        bpf(BPF_MAP_UPDATE_ELEM, &mut a).map_err(|e| format!("BPF_MAP_UPDATE_ELEM: {e}"))?;
    }
    let single = n as f64 / t.elapsed().as_secs_f64();
    let batch_keys = keys(200_000);
    let values = vec![value; BATCH];
    let t = Instant::now();
    for chunk in batch_keys.chunks(BATCH) {
        let mut a = BatchAttr {
            in_batch: 0,
            out_batch: 0,
            keys: chunk.as_ptr() as u64,
            values: values.as_ptr() as u64,
            count: chunk.len() as u32,
            map_fd,
            elem_flags: 0,
            flags: 0,
        };
        bpf(BPF_MAP_UPDATE_BATCH, &mut a).map_err(|e| format!("BPF_MAP_UPDATE_BATCH: {e}"))?;
        if a.count as usize != chunk.len() {
            return Err(format!("BPF_MAP_UPDATE_BATCH wrote {} of {}", a.count, chunk.len()));
        }
    }
    let batched = n as f64 / t.elapsed().as_secs_f64();
    drop(fd);
    drop(dp);
    let ctx = format!("{n} new entries into the POLICY hash map (262,144 slots), from user space");
    report.push(
        "control.map_writes.single_per_s",
        single,
        "entries/s",
        format!("one BPF_MAP_UPDATE_ELEM per entry; {ctx}"),
    );
    report.push(
        "control.map_writes.batched_per_s",
        batched,
        "entries/s",
        format!("BPF_MAP_UPDATE_BATCH of {BATCH} entries per call; {ctx}"),
    );
    Ok(())
}
