//! Incremental resolution equals full resolution.
//!
//! [`PolicyResolver::update`] recomputes only the entries of identities that
//! appear or disappear. These tests drive it through sequences of identity and address
//! changes and, after every step, compare its state with a full resolution of the same
//! inputs ([`same_state`]), and check that the number of changed entries it reports is
//! the number of entries that differ from the state before. They run over:
//!
//! - every fixture scenario (fixtures/scenarios/*.yaml): its
//!   pods are the local endpoints; pods appear on other nodes with the labels of each
//!   scenario pod plus one (so that they are new identities the scenario's selectors
//!   select), at addresses next to the scenario pod's (inside the same ipBlocks), both
//!   families when the pod has both, and then go away again;
//! - random synthetic clusters (policies of every kind) with random sequences of pods
//!   appearing, disappearing and changing address.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use palisade_policy::model::{NamedPort, Peer, Policy};
use palisade_policy::resolve::{DesiredState, EndpointView, Options, PolicyResolver};
use palisade_policy::synth::{Cluster, Rng, Shape, accepted_policies, namespace_labels, same_state};
use palisade_policy::yaml::{self, Value};
use palisade_policy::{IdentityAllocator, LabelSet, ManifestOutcome, parse_manifests};

/// Entries that differ between two states (all of an endpoint's entries when it is in
/// one state only).
fn differing(a: &DesiredState, b: &DesiredState) -> usize {
    let mut n = 0;
    for (id, pa) in &a.endpoints {
        let Some(pb) = b.endpoints.get(id) else {
            n += pa.entries.len();
            continue;
        };
        n += pa.entries.iter().filter(|(k, v)| pb.entries.get(k) != Some(v)).count();
        n += pb.entries.keys().filter(|k| !pa.entries.contains_key(k)).count();
    }
    n +=
        b.endpoints.iter().filter(|(id, _)| !a.endpoints.contains_key(id)).map(|(_, p)| p.entries.len()).sum::<usize>();
    n
}

struct Harness {
    policies: Arc<Vec<Policy>>,
    endpoints: Vec<EndpointView>,
    identities: Arc<IdentityAllocator>,
    addresses: BTreeMap<IpAddr, u32>,
    resolver: PolicyResolver,
    steps: usize,
}

impl Harness {
    fn new(
        policies: Vec<Policy>,
        endpoints: Vec<EndpointView>,
        identities: IdentityAllocator,
        addresses: BTreeMap<IpAddr, u32>,
    ) -> Harness {
        let policies = Arc::new(policies);
        let identities = Arc::new(identities);
        let mut resolver = PolicyResolver::new(Options { allow_localhost: true });
        resolver.set_policies(policies.clone());
        resolver.set_endpoints(endpoints.clone());
        resolver.set_identities(identities.clone(), addresses.clone());
        resolver.resolve();
        Harness { policies, endpoints, identities, addresses, resolver, steps: 0 }
    }

    /// A fresh resolver given the same inputs (and the incremental one's CIDR identity
    /// numbers, which a fresh one would number from the start), resolved in full.
    fn full(&self) -> PolicyResolver {
        let mut r = PolicyResolver::new(Options { allow_localhost: true });
        r.set_policies(self.policies.clone());
        r.set_cidr_identities(self.resolver.cidr_identities().clone());
        r.set_endpoints(self.endpoints.clone());
        r.set_identities(self.identities.clone(), self.addresses.clone());
        r.resolve();
        r
    }

    /// Applies the current policies, endpoints, identities and addresses incrementally
    /// and checks the result.
    fn step(&mut self, changed: &[u32], what: &str) {
        let before = self.resolver.state().clone();
        self.resolver.set_policies(self.policies.clone());
        self.resolver.set_endpoints(self.endpoints.clone());
        let ch = self.resolver.update(self.identities.clone(), changed, self.addresses.clone());
        assert!(!ch.full, "{what}: changes are incremental");
        let fresh = self.full();
        if let Err(e) = same_state(self.resolver.state(), fresh.state()) {
            panic!("{what}: incremental differs from full resolution: {e}");
        }
        assert_eq!(ch.entries, differing(&before, self.resolver.state()), "{what}: reported changes");
        self.steps += 1;
    }

    fn add_pod(&mut self, labels: &LabelSet, ips: &[IpAddr], what: &str) -> u32 {
        let id = Arc::make_mut(&mut self.identities).allocate(labels);
        for ip in ips {
            self.addresses.insert(*ip, id);
        }
        self.step(&[id], what);
        id
    }

    fn remove_pod(&mut self, id: u32, ips: &[IpAddr], what: &str) {
        let freed = Arc::make_mut(&mut self.identities).release(id);
        for ip in ips {
            self.addresses.remove(ip);
        }
        let changed: Vec<u32> = if freed { vec![id] } else { Vec::new() };
        self.step(&changed, what);
    }

    /// A local endpoint goes (with its addresses and its identity reference).
    fn remove_endpoint(&mut self, k: usize, what: &str) -> (EndpointView, Vec<IpAddr>) {
        let ep = self.endpoints.remove(k);
        let ips: Vec<IpAddr> = self.addresses.iter().filter(|(_, id)| **id == ep.identity).map(|(ip, _)| *ip).collect();
        // Addresses of this endpoint only: other pods with the same identity keep theirs.
        let others = self.endpoints.iter().any(|e| e.identity == ep.identity);
        let ips = if others { Vec::new() } else { ips };
        for ip in &ips {
            self.addresses.remove(ip);
        }
        let freed = Arc::make_mut(&mut self.identities).release(ep.identity);
        let changed: Vec<u32> = if freed { vec![ep.identity] } else { Vec::new() };
        self.step(&changed, what);
        (ep, ips)
    }

    /// A local endpoint comes (back), with `labels`, at `ips`.
    fn add_endpoint(&mut self, mut ep: EndpointView, labels: LabelSet, ips: &[IpAddr], what: &str) {
        let known = self.identities.lookup(&labels).is_some();
        ep.identity = Arc::make_mut(&mut self.identities).allocate(&labels);
        ep.labels = labels;
        for ip in ips {
            self.addresses.insert(*ip, ep.identity);
        }
        let at = self.endpoints.iter().position(|e| e.id > ep.id).unwrap_or(self.endpoints.len());
        let changed: Vec<u32> = if known { Vec::new() } else { vec![ep.identity] };
        self.endpoints.insert(at, ep);
        self.step(&changed, what);
    }

    fn set_policies(&mut self, policies: Vec<Policy>, what: &str) {
        self.policies = Arc::new(policies);
        self.step(&[], what);
    }
}

fn fixtures(dir: &str) -> Vec<std::path::PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures").join(dir);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

fn map_of(v: Option<&Value>) -> BTreeMap<String, String> {
    v.and_then(|v| v.as_object())
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    let v = match v {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    };
                    (k.clone(), v)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The address next to `ip` (`k` added to its last part).
fn neighbour(ip: IpAddr, k: u8) -> IpAddr {
    match ip {
        IpAddr::V4(a) => {
            let mut o = a.octets();
            o[3] = o[3].wrapping_add(100 + k);
            IpAddr::V4(o.into())
        }
        IpAddr::V6(a) => {
            let mut o = a.octets();
            o[15] = o[15].wrapping_add(100 + k);
            IpAddr::V6(o.into())
        }
    }
}

/// A fixture scenario as resolver inputs.
struct Scenario {
    name: String,
    policies: Vec<Policy>,
    namespaces: BTreeMap<String, BTreeMap<String, String>>,
    identities: IdentityAllocator,
    endpoints: Vec<EndpointView>,
    addresses: BTreeMap<IpAddr, u32>,
    /// Per pod: namespace, labels, addresses.
    pods: Vec<(String, BTreeMap<String, String>, Vec<IpAddr>)>,
}

fn load(path: &Path) -> Scenario {
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    let doc: Value = yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut text = String::new();
    for p in doc.get("policies").and_then(|p| p.as_array()).into_iter().flatten() {
        text.push_str("---\n");
        text.push_str(&yaml::to_string(p).unwrap());
    }
    let policies: Vec<Policy> = parse_manifests(&text, &name)
        .unwrap()
        .into_iter()
        .filter_map(|o| match o {
            ManifestOutcome::Accepted(p) => Some(p),
            ManifestOutcome::Rejected(_) => None,
        })
        .collect();
    let namespaces: BTreeMap<String, BTreeMap<String, String>> = doc
        .get("namespaces")
        .and_then(|n| n.as_object())
        .map(|m| m.iter().map(|(k, v)| (k.clone(), map_of(Some(v)))).collect())
        .unwrap_or_default();
    let mut identities = IdentityAllocator::new();
    let mut endpoints = Vec::new();
    let mut addresses = BTreeMap::new();
    let mut pods = Vec::new();
    for (i, pod) in doc.get("pods").and_then(|p| p.as_array()).into_iter().flatten().enumerate() {
        let ns = pod.get("namespace").and_then(|n| n.as_str()).unwrap_or("default").to_owned();
        let labels = map_of(pod.get("labels"));
        let set =
            LabelSet::for_pod(&ns, &namespaces.get(&ns).cloned().unwrap_or_default(), &labels, "default", "default");
        let identity = identities.allocate(&set);
        let mut ips: Vec<IpAddr> = Vec::new();
        let v4 = pod.get("ip").and_then(|v| v.as_str()).map(|s| s.parse().unwrap());
        ips.push(v4.unwrap_or_else(|| IpAddr::V4([10, 250, (i / 200) as u8, (i % 200) as u8 + 1].into())));
        if let Some(v6) = pod.get("ipv6").and_then(|v| v.as_str()) {
            ips.push(v6.parse().unwrap());
        }
        for ip in &ips {
            addresses.insert(*ip, identity);
        }
        let named_ports = pod
            .get("ports")
            .and_then(|p| p.as_array())
            .into_iter()
            .flatten()
            .filter_map(|p| {
                let name = p.get("name")?.as_str()?;
                let port = p.get("port")?.as_u64()? as u16;
                let proto = p.get("protocol").and_then(|v| v.as_str()).unwrap_or("TCP");
                NamedPort::new(name, port, proto).ok()
            })
            .collect();
        endpoints.push(EndpointView {
            id: (i + 1) as u16,
            namespace: ns.clone(),
            identity,
            labels: set.clone(),
            named_ports,
        });
        pods.push((ns, labels, ips));
    }
    Scenario { name, policies, namespaces, identities, endpoints, addresses, pods }
}

#[test]
fn identity_changes_on_every_fixture_scenario_equal_full_resolution() {
    let files = fixtures("scenarios");
    assert!(files.len() >= 80, "scenarios found: {}", files.len());
    let mut total_steps = 0;
    for path in files {
        let Scenario { name, policies, namespaces, identities, endpoints, addresses, pods } = load(&path);
        let mut h = Harness::new(policies, endpoints, identities, addresses);
        let initial = h.resolver.state().clone();
        // Pods appear elsewhere, each like a scenario pod, then go away in another order.
        let mut added = Vec::new();
        for (k, (ns, labels, ips)) in pods.iter().enumerate().take(8) {
            let mut labels = labels.clone();
            labels.insert("instance".into(), format!("remote-{k}"));
            let set =
                LabelSet::for_pod(ns, &namespaces.get(ns).cloned().unwrap_or_default(), &labels, "default", "default");
            let remote: Vec<IpAddr> = ips.iter().map(|ip| neighbour(*ip, k as u8)).collect();
            let id = h.add_pod(&set, &remote, &format!("{name}: pod like {ns}/{k} appears"));
            added.push((id, remote));
        }
        // One address moves out of (or into) the neighbourhood: same identity, new address.
        if let Some((id, remote)) = added.first_mut() {
            let old = remote[0];
            h.addresses.remove(&old);
            let moved = neighbour(old, 50);
            h.addresses.insert(moved, *id);
            remote[0] = moved;
            h.step(&[], &format!("{name}: an address moves"));
        }
        for (id, remote) in added.into_iter().rev() {
            h.remove_pod(id, &remote, &format!("{name}: pod {id} goes away"));
        }
        if let Err(e) = same_state(h.resolver.state(), &initial) {
            panic!("{name}: back where it started, but: {e}");
        }
        total_steps += h.steps;
    }
    assert!(total_steps > 500, "steps: {total_steps}");
}

/// Policies removed and put back one by one, endpoints going and coming back, an
/// endpoint relabelled (a new identity), on every fixture scenario: after every step the
/// incremental state equals full resolution, and the end state equals the start.
#[test]
fn policy_and_endpoint_changes_on_every_fixture_scenario_equal_full_resolution() {
    let mut total_steps = 0;
    for path in fixtures("scenarios") {
        let Scenario { name, policies, namespaces, identities, endpoints, addresses, pods } = load(&path);
        let mut h = Harness::new(policies.clone(), endpoints, identities, addresses);
        let initial = h.resolver.state().clone();
        for k in 0..policies.len() {
            let mut fewer = policies.clone();
            let p = fewer.remove(k);
            h.set_policies(fewer, &format!("{name}: policy {} removed", p.name));
            h.set_policies(policies.clone(), &format!("{name}: policy {} back", p.name));
        }
        // Every policy's rules under the next one's name (a changed policy, same names).
        if policies.len() > 1 {
            let mut shifted = policies.clone();
            for k in 0..shifted.len() {
                shifted[k].rules = policies[(k + 1) % policies.len()].rules.clone();
            }
            h.set_policies(shifted, &format!("{name}: every policy's rules changed"));
            h.set_policies(policies.clone(), &format!("{name}: every policy back"));
        }
        for k in 0..h.endpoints.len().min(6) {
            let (ep, ips) = h.remove_endpoint(k, &format!("{name}: endpoint {k} goes"));
            let labels = ep.labels.clone();
            h.add_endpoint(ep, labels, &ips, &format!("{name}: endpoint {k} comes back"));
        }
        if let Some((ns, labels, _)) = pods.first() {
            let (ep, ips) = h.remove_endpoint(0, &format!("{name}: endpoint 0 goes to be relabelled"));
            let mut relabelled = labels.clone();
            relabelled.insert("instance".into(), "relabelled".into());
            let ns_labels = namespaces.get(ns).cloned().unwrap_or_default();
            let set = LabelSet::for_pod(ns, &ns_labels, &relabelled, "default", "default");
            h.add_endpoint(ep, set, &ips, &format!("{name}: endpoint 0 relabelled"));
            let (ep, ips) = h.remove_endpoint(0, &format!("{name}: relabelled endpoint goes"));
            let set = LabelSet::for_pod(ns, &ns_labels, labels, "default", "default");
            h.add_endpoint(ep, set, &ips, &format!("{name}: endpoint 0 back"));
        }
        if let Err(e) = same_state(h.resolver.state(), &initial) {
            panic!("{name}: back where it started, but: {e}");
        }
        total_steps += h.steps;
    }
    assert!(total_steps > 1000, "steps: {total_steps}");
}

/// Every ipBlock of the policies.
fn ip_blocks(policies: &[Policy]) -> Vec<palisade_policy::CidrBlock> {
    policies
        .iter()
        .flat_map(|p| &p.rules)
        .flat_map(|r| r.ingress.iter().chain(&r.egress))
        .flat_map(|pr| pr.peers.list())
        .filter_map(|p| match p {
            Peer::IpBlock(b) => Some(b.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn random_identity_changes_on_synthetic_clusters_equal_full_resolution() {
    for seed in 1..=6 {
        let shape = Shape { namespaces: 5, identities: 150, endpoints: 40, rules: 120, apps: 6, seed };
        let c = Cluster::generate(shape);
        let blocks = ip_blocks(&c.policies);
        let mut rng = Rng::new(seed * 77);
        let mut h = Harness::new(c.policies.clone(), c.endpoints.clone(), c.identities.clone(), c.addresses.clone());
        let mut remote: Vec<(u32, Vec<IpAddr>)> = Vec::new();
        for step in 0..30 {
            match rng.below(4) {
                0 | 1 => {
                    // A new pod elsewhere: an app of some namespace, a new version; its
                    // address sometimes inside an ipBlock, sometimes dual stack.
                    let n = rng.below(shape.namespaces);
                    let app = rng.below(shape.apps);
                    let pod = BTreeMap::from([
                        ("app".to_owned(), format!("app-{app}")),
                        ("tier".to_owned(), ["web", "api", "db", "cache"][app % 4].to_owned()),
                        ("version".to_owned(), format!("r{}", rng.below(3))),
                    ]);
                    let set = LabelSet::for_pod(
                        &format!("ns-{n}"),
                        &namespace_labels(n),
                        &pod,
                        &format!("sa-{app}"),
                        "default",
                    );
                    let mut ips = vec![if !blocks.is_empty() && rng.chance(50) {
                        let b = &blocks[rng.below(blocks.len())];
                        let IpAddr::V4(a) = b.cidr.addr() else { unreachable!() };
                        IpAddr::V4((u32::from(a) + rng.below(256) as u32).into())
                    } else {
                        IpAddr::V4([10, 201, (step / 200) as u8, rng.below(250) as u8 + 1].into())
                    }];
                    if rng.chance(30) {
                        ips.push(format!("fd00:10::{seed}:{step}").parse().unwrap());
                    }
                    ips.retain(|ip| !h.addresses.contains_key(ip));
                    let id = h.add_pod(&set, &ips, &format!("seed {seed} step {step}: pod appears"));
                    remote.push((id, ips));
                }
                2 if !remote.is_empty() => {
                    let (id, ips) = remote.remove(rng.below(remote.len()));
                    h.remove_pod(id, &ips, &format!("seed {seed} step {step}: pod goes away"));
                }
                _ => {
                    // A pod of the original cluster (not local) changes address.
                    let addrs: Vec<(IpAddr, u32)> = h.addresses.iter().map(|(a, i)| (*a, *i)).collect();
                    let (addr, id) = addrs[rng.below(addrs.len())];
                    h.addresses.remove(&addr);
                    let moved = neighbour(addr, rng.below(100) as u8);
                    h.addresses.entry(moved).or_insert(id);
                    h.step(&[], &format!("seed {seed} step {step}: address moves"));
                }
            }
        }
    }
}

/// Random sequences of policies removed, put back and changed, and endpoints going,
/// coming back and relabelled, with pods appearing elsewhere in between, on random
/// synthetic clusters: incremental equals full resolution after every step.
#[test]
fn random_policy_and_endpoint_changes_on_synthetic_clusters_equal_full_resolution() {
    for seed in 1..=6 {
        let shape = Shape { namespaces: 4, identities: 120, endpoints: 30, rules: 80, apps: 6, seed };
        let c = Cluster::generate(shape);
        let mut rng = Rng::new(seed * 131);
        let mut h = Harness::new(c.policies.clone(), c.endpoints.clone(), c.identities.clone(), c.addresses.clone());
        let mut removed: Vec<Policy> = Vec::new();
        let mut gone: Vec<(EndpointView, Vec<IpAddr>)> = Vec::new();
        for step in 0..40 {
            let what = format!("seed {seed} step {step}");
            let mut policies = (*h.policies).clone();
            match rng.below(6) {
                0 if policies.len() > 1 => {
                    removed.push(policies.remove(rng.below(policies.len())));
                    h.set_policies(policies, &format!("{what}: a policy removed"));
                }
                1 if !removed.is_empty() => {
                    policies.push(removed.remove(rng.below(removed.len())));
                    h.set_policies(policies, &format!("{what}: a policy put back"));
                }
                2 if policies.len() > 1 => {
                    let (a, b) = (rng.below(policies.len()), rng.below(policies.len()));
                    policies[a].rules = c.policies[b % c.policies.len()].rules.clone();
                    h.set_policies(policies, &format!("{what}: a policy changed"));
                }
                3 if h.endpoints.len() > 1 => {
                    let k = rng.below(h.endpoints.len());
                    gone.push(h.remove_endpoint(k, &format!("{what}: an endpoint goes")));
                }
                4 if !gone.is_empty() => {
                    let (ep, ips) = gone.remove(rng.below(gone.len()));
                    let labels = if rng.chance(50) {
                        ep.labels.clone()
                    } else {
                        // Another endpoint's labels: a relabelled pod.
                        c.endpoints[rng.below(c.endpoints.len())].labels.clone()
                    };
                    h.add_endpoint(ep, labels, &ips, &format!("{what}: an endpoint comes (back)"));
                }
                _ => {
                    let labels = c.label_sets[rng.below(c.label_sets.len())].clone();
                    let mut labels = labels;
                    labels.insert(palisade_policy::Label::new("k8s", "instance", &format!("s{step}")));
                    let ip = IpAddr::V4([10, 202, seed as u8, step as u8 + 1].into());
                    h.add_pod(&labels, &[ip], &format!("{what}: a pod appears elsewhere"));
                }
            }
        }
    }
}

/// Allows for a new identity that a deny for every peer covers are never written, and
/// removing the identity removes exactly its entries.
#[test]
fn a_deny_for_every_peer_covers_identities_that_appear_later() {
    let yaml = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: db, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: db}}
  ingress:
    - fromEndpoints: [{matchLabels: {app: web}}]
      toPorts: [{ports: [{port: "5432", protocol: TCP}, {port: "8008", protocol: TCP}]}]
---
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: no-debug-ports}
spec:
  endpointSelector: {}
  ingressDeny:
    - fromEntities: [all]
      toPorts: [{ports: [{port: "8000", endPort: 8015, protocol: TCP}]}]
"#;
    let policies = accepted_policies(yaml, "t.yaml");
    let pod = |app: &str, v: &str| {
        let labels = BTreeMap::from([("app".to_owned(), app.to_owned()), ("version".to_owned(), v.to_owned())]);
        LabelSet::for_pod("shop", &BTreeMap::new(), &labels, "default", "default")
    };
    let mut identities = IdentityAllocator::new();
    let db = identities.allocate(&pod("db", "1"));
    let endpoints = vec![EndpointView {
        id: 1,
        namespace: "shop".into(),
        identity: db,
        labels: pod("db", "1"),
        named_ports: Vec::new(),
    }];
    let addresses = BTreeMap::from([("10.0.0.1".parse().unwrap(), db)]);
    let mut h = Harness::new(policies, endpoints, identities, addresses);
    let mut added = Vec::new();
    for k in 0..4u8 {
        let ip: IpAddr = IpAddr::V4([10, 0, 1, k].into());
        let id = h.add_pod(&pod("web", &k.to_string()), &[ip], &format!("web {k} appears"));
        let entries: Vec<String> = h.resolver.state().endpoints[&1]
            .entries
            .iter()
            .filter(|(key, _)| key.identity == id)
            .map(|(key, v)| format!("{key} {}", v.deny))
            .collect();
        assert!(!entries.iter().any(|e| e.contains("TCP/8008")), "the deny for any peer covers it: {entries:?}");
        assert!(entries.iter().any(|e| e.contains("TCP/5432")), "{entries:?}");
        added.push((id, ip));
    }
    for (id, ip) in added {
        h.remove_pod(id, &[ip], &format!("{id} goes away"));
    }
}
