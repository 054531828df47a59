//! The cluster on one machine (`palisade-bench --only cluster`): for 2, 5 and 10 nodes
//! (quick: 2 and 3), each node its own namespace with its own real agent in kvstore mode
//! against the testbed's etcd, as `palisade-testbed run --kvstore` brings them up:
//!
//! - **pod to every node**: a pod registered on one node (through that agent's local API,
//!   as the CNI plugin does; the nodes take turns) until every other node's kernel ipcache
//!   maps its address to its identity (each other agent's ipcache polled every 2 ms), p50
//!   and p99 over the pods;
//! - **identity allocations per second**, every node's allocator contending: one
//!   `palisade_agent::kvstore::Kv` client per node (the agent's own allocator code, each
//!   with its lease) asking etcd for new label sets at once, half of them asked by every
//!   node (the contended case) and half by one node each;
//! - **etcd operations per pod**: etcd's own counters (puts, deletes, transactions and
//!   ranges, from its `/metrics`) over the pod registrations, divided by the pods;
//! - **agent RSS**, the largest and the mean over the nodes, after the registrations;
//! - **cross-node traffic**: TCP connect-request-close and UDP request/response from a pod
//!   on the first node to one on the second, with an egress and an ingress policy allowing
//!   exactly that, against the same topology without any agent, in paired rounds: the
//!   median over the rounds of the p50 ratio.
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::Path;
use std::time::{Duration, Instant};

use palisade_api::types::EndpointSpec;

use super::traffic;
use super::{Report, Size, median, percentile};
use crate::session::{RunNames, RunOptions, Session};

/// Node counts of a run.
pub fn node_counts(size: Size) -> &'static [usize] {
    match size {
        Size::Quick => &[2, 3],
        Size::Full => &[2, 5, 10],
    }
}

#[derive(Clone, Copy)]
struct Params {
    pods: usize,
    /// Label sets each allocator asks for alone; as many more are asked by every node.
    allocations: usize,
    rounds: usize,
    crr: usize,
    rr: usize,
}

impl Params {
    fn of(size: Size) -> Params {
        match size {
            Size::Quick => Params { pods: 20, allocations: 25, rounds: 2, crr: 50, rr: 200 },
            Size::Full => Params { pods: 120, allocations: 200, rounds: 40, crr: 300, rr: 2_000 },
        }
    }
}

const FIGURES: [(&str, &str); 8] = [
    ("pod_everywhere_p50_ms", "ms"),
    ("pod_everywhere_p99_ms", "ms"),
    ("identity_allocations_per_s", "identities/s"),
    ("etcd_ops_per_pod", "ops"),
    ("agent_rss_max_mib", "MiB"),
    ("agent_rss_mean_mib", "MiB"),
    ("tcp_crr_p50_ratio", "x"),
    ("udp_rr_p50_ratio", "x"),
];

pub fn figure_names(size: Size) -> Vec<String> {
    node_counts(size).iter().flat_map(|n| FIGURES.iter().map(move |(f, _)| format!("cluster.n{n}.{f}"))).collect()
}

fn unit(figure: &str) -> &'static str {
    FIGURES.iter().find(|(f, _)| *f == figure).map_or("", |(_, u)| u)
}

/// Ports of the cross-node traffic (served by the benchmark's own echo servers).
const TCP_PORT: u16 = 7100;
const UDP_PORT: u16 = 7101;

/// A scenario of `nodes` nodes: client on the first, server on the second, policies
/// allowing client -> server on the two ports (egress at client, ingress at server).
fn scenario(nodes: usize) -> String {
    let list: Vec<String> = (0..nodes).map(|k| format!("{{name: node-{k}}}")).collect();
    format!(
        "name: cluster-bench-{nodes}\nnodes: [{}]\nnamespaces:\n  bench: {{}}\npods:\n\
         \x20 - {{name: client, namespace: bench, node: node-0, labels: {{app: client}}}}\n\
         \x20 - {{name: server, namespace: bench, node: node-1, labels: {{app: server}}}}\n\
         policies:\n\
         \x20 - apiVersion: cilium.io/v2\n    kind: CiliumNetworkPolicy\n    metadata: {{name: server-in, namespace: bench}}\n\
         \x20   spec:\n      endpointSelector: {{matchLabels: {{app: server}}}}\n      ingress:\n\
         \x20       - fromEndpoints: [{{matchLabels: {{app: client}}}}]\n\
         \x20         toPorts: [{{ports: [{{port: \"{TCP_PORT}\", protocol: TCP}}, {{port: \"{UDP_PORT}\", protocol: UDP}}]}}]\n\
         \x20 - apiVersion: cilium.io/v2\n    kind: CiliumNetworkPolicy\n    metadata: {{name: client-out, namespace: bench}}\n\
         \x20   spec:\n      endpointSelector: {{matchLabels: {{app: client}}}}\n      egress:\n\
         \x20       - toEndpoints: [{{matchLabels: {{app: server}}}}]\n\
         \x20         toPorts: [{{ports: [{{port: \"{TCP_PORT}\", protocol: TCP}}, {{port: \"{UDP_PORT}\", protocol: UDP}}]}}]\n\
         probes: []\n",
        list.join(", ")
    )
}

/// Runs the part at `counts` nodes (empty: [`node_counts`] of `size`).
pub fn run(report: &mut Report, size: Size, agent: &Path, counts: &[usize]) {
    if let Some(n) = counts.iter().find(|n| **n < 2) {
        return report.failures.push(format!("cluster: --cluster-nodes {n}: a cluster has at least 2 nodes"));
    }
    let counts = if counts.is_empty() { node_counts(size) } else { counts };
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return report.failures.push(format!("cluster: async runtime: {e}")),
    };
    if !palisade_privileged::etcd::installed() {
        report.failures.push("cluster: needs etcd (Debian's etcd-server; ci/setup.sh installs it)".into());
        return;
    }
    for (i, &nodes) in counts.iter().enumerate() {
        if crate::cleanup::terminating() {
            return;
        }
        match rt.block_on(one(size, nodes, agent, i)) {
            Ok(figures) => {
                for (name, value, context) in figures {
                    report.push(format!("cluster.n{nodes}.{name}"), value, unit(name), context);
                }
            }
            Err(e) => report.failures.push(format!("cluster: {nodes} nodes: {e}")),
        }
    }
}

type Figures = Vec<(&'static str, f64, String)>;

async fn one(size: Size, nodes: usize, agent: &Path, index: usize) -> Result<Figures, String> {
    let p = Params::of(size);
    let text = scenario(nodes);
    let plan = crate::scenario::load_str(&text, Path::new("cluster-bench.yaml")).map_err(|e| e.to_string())?;
    let pid = std::process::id();
    let mut opts = RunOptions::new(Some(agent.to_path_buf()));
    opts.kvstore = true;
    let names = RunNames { prefix: format!("pt{pid}-c{index}"), tag: format!("{pid}-c{index}") };
    let session = Session::up(&plan, &opts, &names).await.map_err(|e| format!("bringing the cluster up: {e}"))?;
    let mut out = Figures::new();
    let etcd_url = session.etcd().ok_or("no etcd")?.url().to_string();

    // Pods registered on the nodes in turn, each until every other node has it.
    let ops_before = etcd_ops(&session, &etcd_url)?;
    let mut lat = Vec::with_capacity(p.pods);
    for k in 0..nodes {
        let mut lines = String::new();
        for j in (k..p.pods).step_by(nodes) {
            let _ = writeln!(lines, "link add bp{j} type veth peer name bq{j}\nlink set bp{j} up\nlink set bq{j} up");
        }
        super::control::ip_batch(&session.topology().node_at(k).netns, &lines)?;
    }
    for j in 0..p.pods {
        let k = j % nodes;
        let addr = pod_addr(k, j);
        let spec = EndpointSpec {
            labels: BTreeMap::from([("app".into(), "bench".into()), ("group".into(), format!("g{}", j % 10))]),
            service_account: "default".into(),
            ipv4: Some(addr),
            ipv6: None,
            interface: format!("bp{j}"),
            ports: Vec::new(),
        };
        let client = session.client_of(k).ok_or("no agent")?;
        let t = Instant::now();
        tokio::time::timeout(Duration::from_secs(30), client.put_endpoint("bench", &format!("bp{j}"), &spec))
            .await
            .map_err(|_| format!("registering bp{j} on node-{k}: no answer in 30 s"))?
            .map_err(|e| format!("registering bp{j} on node-{k}: {e}"))?;
        let identity = client
            .endpoints()
            .await
            .map_err(|e| e.to_string())?
            .into_iter()
            .find(|e| e.name == format!("bp{j}"))
            .map(|e| e.identity)
            .ok_or(format!("bp{j} is no endpoint of node-{k}"))?;
        let prefix = format!("{addr}/32");
        let deadline = t + Duration::from_secs(10);
        for other in (0..nodes).filter(|&o| o != k) {
            let c = session.client_of(other).ok_or("no agent")?;
            loop {
                let entries = c.ipcache().await.map_err(|e| e.to_string())?;
                if entries.iter().any(|e| e.prefix == prefix && e.identity == identity) {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(format!("node-{other} did not learn bp{j} of node-{k} within 10 s"));
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        lat.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let ops = etcd_ops(&session, &etcd_url)? - ops_before;
    lat.sort_by(f64::total_cmp);
    let ctx = format!(
        "{nodes} nodes (one real agent each, kvstore mode, agents publish on every endpoint change), {} pods registered one after the other on the nodes in turn through the node's local API (10 label sets); from the registration request until every other node's kernel ipcache maps the pod's address to its identity (polled every 2 ms)",
        p.pods
    );
    out.push(("pod_everywhere_p50_ms", percentile(&lat, 50.0), ctx.clone()));
    out.push(("pod_everywhere_p99_ms", percentile(&lat, 99.0), ctx));
    out.push((
        "etcd_ops_per_pod",
        ops as f64 / p.pods as f64,
        format!("etcd's put, delete, txn and range counters (its /metrics) over the {} registrations, watches and lease keep-alives of {nodes} agents included, per pod", p.pods),
    ));

    // Every agent's resident memory after the registrations.
    let mut rss = Vec::new();
    for k in 0..nodes {
        let pid = session.agent_pid_of(k).ok_or("no agent pid")?;
        rss.push(super::memory::rss_kib(pid)?.0 as f64 / 1024.0);
    }
    let ctx = format!("VmRSS of each of the {nodes} agents after {} pods were registered across the cluster", p.pods);
    out.push(("agent_rss_max_mib", rss.iter().copied().fold(0.0, f64::max), ctx.clone()));
    out.push(("agent_rss_mean_mib", rss.iter().sum::<f64>() / rss.len() as f64, ctx));

    // Identity allocations, every node's allocator at once.
    let rate = allocations(&session, &etcd_url, nodes, p.allocations)?;
    out.push((
        "identity_allocations_per_s",
        rate,
        format!(
            "{nodes} allocators (palisade_agent::kvstore::Kv, the agent's code, one lease each, {IN_FLIGHT} allocations in flight per node) at once against the testbed's etcd: {} label sets each alone and {} asked by every node; new identities over the wall time",
            p.allocations, p.allocations
        ),
    ));

    // Cross-node traffic against the same topology without agents, in paired rounds.
    let base_names = RunNames { prefix: format!("pt{pid}-b{index}"), tag: format!("{pid}-b{index}") };
    let base = Session::up(&plan, &RunOptions::new(None), &base_names)
        .await
        .map_err(|e| format!("bringing the baseline up: {e}"))?;
    let (crr, rr) = cross_node(&session, &base, &plan, p)?;
    let ctx = |what: &str| {
        format!(
            "{what} from a pod on node-0 to one on node-1 (egress and ingress policy), over the same namespaces without any agent, median over {} paired rounds of the p50 ratio",
            p.rounds
        )
    };
    out.push(("tcp_crr_p50_ratio", crr, ctx(&format!("{} TCP connect-request-close", p.crr))));
    out.push(("udp_rr_p50_ratio", rr, ctx(&format!("{} UDP request/response", p.rr))));
    base.down().await;
    session.down().await;
    Ok(out)
}

/// Node `k`'s `j`-th benchmark pod address (10.(200+k).2.x: the node's pod range).
fn pod_addr(k: usize, j: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 200 + k as u8, 2 + (j / 250) as u8, 1 + (j % 250) as u8)
}

/// etcd's count of puts, deletes, transactions and ranges so far (its `/metrics`, read from
/// the first node's namespace, where it listens).
fn etcd_ops(session: &Session, url: &str) -> Result<u64, String> {
    let hostport = url.trim_start_matches("http://").to_string();
    let text = session
        .topology()
        .node
        .netns
        .run(move || -> Result<String, String> {
            let mut s = std::net::TcpStream::connect(&hostport).map_err(|e| format!("etcd metrics: {e}"))?;
            s.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
            write!(s, "GET /metrics HTTP/1.0\r\nHost: {hostport}\r\n\r\n").map_err(|e| e.to_string())?;
            let mut body = String::new();
            s.read_to_string(&mut body).map_err(|e| format!("etcd metrics: {e}"))?;
            Ok(body)
        })
        .map_err(|e| e.to_string())??;
    let mut total = 0.0;
    for line in text.lines() {
        for name in ["etcd_mvcc_put_total", "etcd_mvcc_delete_total", "etcd_mvcc_txn_total", "etcd_mvcc_range_total"] {
            if let Some(v) = line.strip_prefix(name).and_then(|r| r.trim().parse::<f64>().ok()) {
                total += v;
            }
        }
    }
    if total == 0.0 {
        return Err("etcd's /metrics has none of its mvcc counters".into());
    }
    Ok(total as u64)
}

/// Allocations one node has in flight at once (as the agent does when pods of new label
/// sets register together: each registration waits for its identity on its own).
const IN_FLIGHT: usize = 8;

/// New identities per second with one allocator per node asking at once.
fn allocations(session: &Session, url: &str, nodes: usize, each: usize) -> Result<f64, String> {
    // The allocators talk to etcd from the first node's namespace (where it listens): a
    // thread of this process joins it for the connections.
    let ns = session.topology().node.netns.open().map_err(|e| e.to_string())?;
    let url = url.to_string();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r = crate::netns::run_in(ns, move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
            rt.block_on(allocate_all(url, nodes, each))
        });
        let _ = tx.send(r.map_err(|e| e.to_string()).and_then(|r| r));
    });
    rx.recv_timeout(Duration::from_mins(5)).map_err(|_| "the allocators did not finish in 5 minutes".to_string())?
}

async fn allocate_all(url: String, nodes: usize, each: usize) -> Result<f64, String> {
    use palisade_agent::kvstore::Kv;
    let mut kvs = Vec::new();
    for k in 0..nodes {
        let kv = Kv::connect(std::slice::from_ref(&url), &format!("alloc-{k}"), Duration::from_secs(5))
            .await
            .map_err(|e| e.to_string())?;
        let lease = kv.grant(Duration::from_mins(10)).await.map_err(|e| e.to_string())?;
        kv.set_lease(lease);
        kvs.push(kv);
    }
    let labels = |name: String| {
        palisade_policy::labels::LabelSet::for_pod(
            "bench",
            &BTreeMap::new(),
            &BTreeMap::from([("bench-alloc".to_string(), name)]),
            "default",
            "default",
        )
    };
    let t = Instant::now();
    let tasks = kvs.into_iter().enumerate().map(|(k, kv)| {
        let sets: Vec<_> =
            (0..each).flat_map(|i| [labels(format!("n{k}-{i}")), labels(format!("shared-{i}"))]).collect();
        async move {
            use futures_util::StreamExt;
            let kv = &kv;
            let ids: Vec<Result<u32, String>> = futures_util::stream::iter(sets.iter())
                .map(|set| async move { kv.allocate(set, None).await.map_err(|e| e.to_string()) })
                .buffer_unordered(IN_FLIGHT)
                .collect()
                .await;
            ids.into_iter().collect::<Result<Vec<u32>, String>>()
        }
    });
    let results = futures_util::future::join_all(tasks).await;
    let secs = t.elapsed().as_secs_f64();
    let mut distinct = std::collections::BTreeSet::new();
    for r in results {
        distinct.extend(r?);
    }
    let wanted = nodes * each + each;
    if distinct.len() != wanted {
        return Err(format!("{} distinct identities for {wanted} label sets", distinct.len()));
    }
    Ok(wanted as f64 / secs)
}

/// Median over paired rounds of the p50 ratios (palisade / no agent): TCP CRR, UDP RR.
fn cross_node(
    session: &Session,
    base: &Session,
    plan: &crate::scenario::Plan,
    p: Params,
) -> Result<(f64, f64), String> {
    let server_ip = plan.pods[1].ipv4.ok_or("server has no IPv4 address")?;
    let mut servers = Vec::new();
    for s in [session, base] {
        let ns = &s.topology().pods[1].netns;
        servers.push(traffic::tcp_echo(ns, TCP_PORT)?);
        servers.push(traffic::udp_echo(ns, UDP_PORT)?);
    }
    let (mut crr, mut rr) = (Vec::new(), Vec::new());
    for round in 0..p.rounds {
        let measure = |s: &Session| -> Result<(f64, f64), String> {
            let client = &s.topology().pods[0].netns;
            let c = traffic::tcp_crr(client, SocketAddrV4::new(server_ip, TCP_PORT), p.crr / 5, p.crr)?;
            let r = traffic::udp_rr(client, SocketAddrV4::new(server_ip, UDP_PORT), p.rr / 5, p.rr)?;
            Ok((c.p(50.0), r.p(50.0)))
        };
        // The order alternates, so neither side always runs on a warmer machine.
        let (with, without) = if round % 2 == 0 {
            let w = measure(session)?;
            (w, measure(base)?)
        } else {
            let b = measure(base)?;
            (measure(session)?, b)
        };
        crr.push(with.0 / without.0);
        rr.push(with.1 / without.1);
    }
    drop(servers);
    Ok((median(&crr), median(&rr)))
}
