//! Policy resolution at scale: full resolution of 1,000 local endpoints x 10,000
//! identities x 1,000 rules, and what one identity appearing or disappearing elsewhere in
//! the cluster costs (time per affected endpoint, entries changed). See
//! docs/benchmarks.md, "Policy resolution".
//!
//! ```text
//! cargo bench -p palisade-policy --bench resolution
//! cargo bench -p palisade-policy --bench resolution -- --runs 5 --json /tmp/resolution.json
//! ```
//!
//! Every case is checked, not only timed: after each identity change the incremental
//! state must equal a full resolution of the same inputs, and the number of entries the
//! update reports must be the number of entries that differ between before and after.
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use palisade_policy::IdentityAllocator;
use palisade_policy::labels::LabelSet;
use palisade_policy::model::Peer;
use palisade_policy::resolve::{Changes, DesiredState, Options, PolicyResolver};
use palisade_policy::synth::{Cluster, Shape, namespace_labels, same_state};
use serde::Serialize;

/// CPU time of this thread (the machine is shared: wall time includes other work).
fn thread_cpu() -> std::time::Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &raw mut ts) };
    std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn timed<T>(f: impl FnOnce() -> T) -> (T, f64, f64) {
    let (w, c) = (Instant::now(), thread_cpu());
    let out = f();
    (out, w.elapsed().as_secs_f64() * 1e3, thread_cpu().checked_sub(c).unwrap().as_secs_f64() * 1e3)
}

#[derive(Serialize, Clone)]
struct Sample {
    case: String,
    run: usize,
    wall_ms: f64,
    cpu_ms: f64,
    /// Identities that appeared or disappeared.
    identities: usize,
    /// Endpoints whose entries were recomputed.
    endpoints: usize,
    /// Policy entries added, removed or changed.
    entries: usize,
}

#[derive(Serialize)]
struct Report {
    shape: String,
    policies: usize,
    endpoints: usize,
    identities: usize,
    total_entries: usize,
    median_entries_per_endpoint: usize,
    max_entries_per_endpoint: usize,
    address_identities: usize,
    samples: Vec<Sample>,
}

struct Args {
    runs: usize,
    json: std::path::PathBuf,
}

fn args() -> Args {
    let mut a = Args {
        runs: 5,
        json: std::path::PathBuf::from(std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into()))
            .join("palisade-bench/resolution.json"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--runs" => a.runs = it.next().and_then(|v| v.parse().ok()).expect("--runs N"),
            "--json" => a.json = it.next().expect("--json PATH").into(),
            // cargo bench passes --bench.
            _ => {}
        }
    }
    a
}

fn full(c: &Cluster, ids: &Arc<IdentityAllocator>, addresses: &BTreeMap<IpAddr, u32>) -> PolicyResolver {
    let mut r = PolicyResolver::new(Options { allow_localhost: true });
    r.set_policies(Arc::new(c.policies.clone()));
    r.set_endpoints(c.endpoints.clone());
    r.set_identities(ids.clone(), addresses.clone());
    r.resolve();
    r
}

fn entries_differing(a: &DesiredState, b: &DesiredState) -> usize {
    let mut n = 0;
    for (id, pa) in &a.endpoints {
        let pb = &b.endpoints[id];
        if Arc::ptr_eq(pa, pb) {
            continue;
        }
        n += pa.entries.iter().filter(|(k, v)| pb.entries.get(k) != Some(v)).count();
        n += pb.entries.keys().filter(|k| !pa.entries.contains_key(k)).count();
    }
    n
}

/// A pod appearing on another node: a new version of a popular app in some namespace.
fn new_pod(c: &Cluster, k: usize) -> LabelSet {
    let n = (7 + 13 * k) % c.shape.namespaces;
    let app = (3 + 5 * k) % c.shape.apps;
    let pod = BTreeMap::from([
        ("app".to_owned(), format!("app-{app}")),
        ("tier".to_owned(), ["web", "api", "db", "cache"][app % 4].to_owned()),
        ("version".to_owned(), format!("canary-{k}")),
    ]);
    LabelSet::for_pod(&format!("ns-{n}"), &namespace_labels(n), &pod, &format!("sa-{app}"), "default")
}

/// A free address inside some ipBlock of the policies (a pod there gets an address
/// identity too).
fn address_in_ip_block(c: &Cluster, k: usize) -> IpAddr {
    let blocks: Vec<_> = c
        .policies
        .iter()
        .flat_map(|p| &p.rules)
        .flat_map(|r| r.ingress.iter().chain(&r.egress))
        .flat_map(|pr| pr.peers.list())
        .filter_map(|p| match p {
            Peer::IpBlock(b) if b.cidr.addr().to_string().starts_with("10.128.") => Some(b.clone()),
            _ => None,
        })
        .collect();
    let block = &blocks[k % blocks.len()];
    let base = match block.cidr.addr() {
        IpAddr::V4(a) => u32::from(a),
        IpAddr::V6(_) => unreachable!(),
    };
    (0..256u32)
        .rev()
        .map(|i| IpAddr::V4((base + i).into()))
        .find(|ip| block.contains_ip(*ip) && !c.addresses.contains_key(ip))
        .expect("a free address in the block")
}

fn main() {
    let a = args();
    let shape = Shape::BENCH;
    let (c, gen_ms, _) = timed(|| Cluster::generate(shape));
    let ids = Arc::new(c.identities.clone());
    println!(
        "policy resolution: {} local endpoints x {} identities x {} rules (generated and parsed in {gen_ms:.0} ms)",
        shape.endpoints,
        ids.iter().count(),
        c.policies.iter().map(|p| p.rules.len()).sum::<usize>()
    );
    let mut samples = Vec::new();
    let mut last = None;
    for run in 0..a.runs {
        let (r, wall_ms, cpu_ms) = timed(|| full(&c, &ids, &c.addresses));
        let entries: usize = r.state().endpoints.values().map(|e| e.entries.len()).sum();
        samples.push(Sample {
            case: "full".into(),
            run,
            wall_ms,
            cpu_ms,
            identities: ids.iter().count(),
            endpoints: r.state().endpoints.len(),
            entries,
        });
        last = Some(r);
    }
    let base = last.expect("at least one run");
    let total_entries: usize = base.state().endpoints.values().map(|e| e.entries.len()).sum();
    let address_identities = base.state().address_identities.len();

    let mut sizes: Vec<usize> = base.state().endpoints.values().map(|e| e.entries.len()).collect();
    sizes.sort_unstable();
    let (median_entries, max_entries) = (sizes[sizes.len() / 2], sizes[sizes.len() - 1]);

    // Identity changes. Each run starts from the fully resolved state.
    for run in 0..a.runs {
        // The fixed cost of an update: nothing changed (the address maps are still
        // compared and copied).
        let mut r = base.clone();
        let (ch, wall_ms, cpu_ms) = timed(|| r.update(ids.clone(), &[], c.addresses.clone()));
        assert_eq!((ch.entries, ch.endpoints), (0, 0));
        samples.push(Sample {
            case: "no_change".into(),
            run,
            wall_ms,
            cpu_ms,
            identities: 0,
            endpoints: 0,
            entries: 0,
        });
        for case in ["identity_add", "identity_add_in_ip_block", "identity_remove"] {
            let mut r = base.clone();
            let mut alloc = ids.clone();
            let mut addresses = c.addresses.clone();
            let k = run;
            if case == "identity_remove" {
                // The pod added by identity_add goes away again: set it up first.
                let id = Arc::make_mut(&mut alloc).allocate(&new_pod(&c, k));
                addresses.insert(IpAddr::V4([10, 200, 0, k as u8].into()), id);
                r.update(alloc.clone(), &[id], addresses.clone());
                Arc::make_mut(&mut alloc).release(id);
                addresses.remove(&IpAddr::V4([10, 200, 0, k as u8].into()));
                let before = r.state().clone();
                let (ch, wall_ms, cpu_ms) = timed(|| r.update(alloc.clone(), &[id], addresses.clone()));
                check(&c, &r, &before, &alloc, &addresses, &ch, case, run == 0);
                samples.push(sample(case, run, wall_ms, cpu_ms, &ch));
                continue;
            }
            let labels = new_pod(&c, k);
            let id = Arc::make_mut(&mut alloc).allocate(&labels);
            let addr = if case == "identity_add" {
                IpAddr::V4([10, 200, 0, k as u8].into())
            } else {
                address_in_ip_block(&c, k)
            };
            addresses.insert(addr, id);
            let before = r.state().clone();
            let (ch, wall_ms, cpu_ms) = timed(|| r.update(alloc.clone(), &[id], addresses.clone()));
            check(&c, &r, &before, &alloc, &addresses, &ch, case, run == 0);
            samples.push(sample(case, run, wall_ms, cpu_ms, &ch));
        }
    }

    print_table(&samples);
    let report = Report {
        shape: format!("{shape:?}"),
        policies: c.policies.len(),
        endpoints: shape.endpoints,
        identities: ids.iter().count(),
        total_entries,
        median_entries_per_endpoint: median_entries,
        max_entries_per_endpoint: max_entries,
        address_identities,
        samples,
    };
    if let Some(dir) = a.json.parent() {
        std::fs::create_dir_all(dir).expect("JSON directory");
    }
    std::fs::write(&a.json, serde_json::to_string_pretty(&report).expect("JSON")).expect("write JSON");
    println!(
        "entries in total: {total_entries} (per endpoint: median {median_entries}, max {max_entries}); address identities: {address_identities}"
    );
    println!("samples written to {}", a.json.display());
}

fn sample(case: &str, run: usize, wall_ms: f64, cpu_ms: f64, ch: &Changes) -> Sample {
    assert!(!ch.full, "{case}: an identity change must not resolve everything");
    Sample {
        case: case.into(),
        run,
        wall_ms,
        cpu_ms,
        identities: ch.identities,
        endpoints: ch.endpoints,
        entries: ch.entries,
    }
}

/// The incremental state equals a full resolution, and the reported number of changed
/// entries is the number that differ (`verify_full`: also resolve in full, which takes a
/// second, so only on the first run).
#[allow(clippy::too_many_arguments, reason = "one figure of the bench: every field it reports")]
fn check(
    c: &Cluster,
    r: &PolicyResolver,
    before: &DesiredState,
    alloc: &Arc<IdentityAllocator>,
    addresses: &BTreeMap<IpAddr, u32>,
    ch: &Changes,
    case: &str,
    verify_full: bool,
) {
    let differing = entries_differing(before, r.state());
    assert_eq!(differing, ch.entries, "{case}: changes reported = entries that differ");
    assert!(ch.entries > 0 && ch.endpoints > 0, "{case}: the identity must matter to someone: {ch:?}");
    if verify_full {
        let fresh = full(c, alloc, addresses);
        if let Err(e) = same_state(r.state(), fresh.state()) {
            panic!("{case}: incremental state differs from full resolution: {e}");
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn print_table(samples: &[Sample]) {
    println!();
    println!(
        "| case | runs | wall ms (median) | CPU ms (median) | identities | endpoints affected | entries changed | CPU µs per affected endpoint |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for case in ["full", "no_change", "identity_add", "identity_add_in_ip_block", "identity_remove"] {
        let s: Vec<&Sample> = samples.iter().filter(|s| s.case == case).collect();
        if s.is_empty() {
            continue;
        }
        let wall = median(s.iter().map(|x| x.wall_ms).collect());
        let cpu = median(s.iter().map(|x| x.cpu_ms).collect());
        let eps = median(s.iter().map(|x| x.endpoints as f64).collect());
        let entries = median(s.iter().map(|x| x.entries as f64).collect());
        let ids = median(s.iter().map(|x| x.identities as f64).collect());
        let per_ep = median(s.iter().map(|x| x.cpu_ms * 1e3 / x.endpoints.max(1) as f64).collect());
        let per = if matches!(case, "full" | "no_change") { "-".to_string() } else { format!("{per_ep:.1}") };
        println!("| `{case}` | {} | {wall:.2} | {cpu:.2} | {ids:.0} | {eps:.0} | {entries:.0} | {per} |", s.len());
    }
}
