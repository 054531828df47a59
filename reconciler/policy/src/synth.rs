//! Synthetic clusters for the resolution benchmark and the incremental-resolution tests: a
//! deterministic generator (seeded, no external crates) of namespaces, pod identities,
//! local endpoints and a realistic mix of policies (CNP, CCNP and Kubernetes
//! NetworkPolicy: matchLabels and matchExpressions, namespace selectors, ports and
//! ranges, CIDRs with except, ipBlocks, entities, requires, deny rules).
//!
//! Not part of the agent's behaviour; public so that `benches/` and `tests/` can use it.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use serde_json::{Value, json};

use crate::identity::IdentityAllocator;
use crate::labels::LabelSet;
use crate::model::{NamedPort, Policy, Protocol};
use crate::parse::{ManifestOutcome, parse_manifests};
use crate::resolve::{ADDRESS_IDENTITY_BASE, DesiredState, EndpointView};

/// A small deterministic PRNG (xorshift64*).
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// True with probability `percent` / 100.
    pub fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
}

/// The shape of a synthetic cluster.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub namespaces: usize,
    /// Pod label sets (identities) in the whole cluster.
    pub identities: usize,
    /// Endpoints on this node (each with one of the identities).
    pub endpoints: usize,
    /// Policy rules in total (one rule per manifest).
    pub rules: usize,
    /// Distinct `app` values per namespace.
    pub apps: usize,
    pub seed: u64,
}

impl Shape {
    /// 1,000 local endpoints x 10,000 identities x 1,000 rules.
    pub const BENCH: Shape =
        Shape { namespaces: 50, identities: 10_000, endpoints: 1_000, rules: 1_000, apps: 40, seed: 1 };
}

/// A generated cluster: what the resolver takes.
pub struct Cluster {
    pub shape: Shape,
    pub policies: Vec<Policy>,
    pub identities: IdentityAllocator,
    pub endpoints: Vec<EndpointView>,
    /// Every pod address (local and remote) and its pod's identity.
    pub addresses: BTreeMap<IpAddr, u32>,
    /// The label sets of the identities, in allocation order.
    pub label_sets: Vec<LabelSet>,
}

const TIERS: [&str; 4] = ["web", "api", "db", "cache"];
const TEAMS: usize = 10;

/// The namespace labels of namespace `n`.
/// Every policy of `text`, which must all be accepted (panics otherwise: for tests and
/// benchmarks).
pub fn accepted_policies(text: &str, source: &str) -> Vec<Policy> {
    parse_manifests(text, source)
        .unwrap_or_else(|e| panic!("{e}"))
        .into_iter()
        .map(|o| match o {
            ManifestOutcome::Accepted(p) => p,
            ManifestOutcome::Rejected(e) => panic!("rejected: {e}"),
        })
        .collect()
}

pub fn namespace_labels(n: usize) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("team".to_owned(), format!("t{}", n % TEAMS)),
        ("env".to_owned(), if n.is_multiple_of(3) { "staging".to_owned() } else { "prod".to_owned() }),
    ])
}

/// The labels of pod variant `j` in namespace `n`: app, tier and version.
pub fn pod_labels(shape: &Shape, n: usize, j: usize) -> LabelSet {
    let app = j % shape.apps;
    let pod = BTreeMap::from([
        ("app".to_owned(), format!("app-{app}")),
        ("tier".to_owned(), TIERS[app % TIERS.len()].to_owned()),
        ("version".to_owned(), format!("v{}", j / shape.apps)),
    ]);
    let ns = format!("ns-{n}");
    LabelSet::for_pod(&ns, &namespace_labels(n), &pod, &format!("sa-{app}"), "default")
}

/// The address of pod variant `j` in namespace `n` (one per identity; local endpoints use
/// the address of their identity).
pub fn pod_address(n: usize, j: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 128 + (n / 64) as u8, ((n % 64) * 4 + j / 256) as u8, (j % 256) as u8))
}

impl Cluster {
    pub fn generate(shape: Shape) -> Cluster {
        let mut rng = Rng::new(shape.seed);
        let mut identities = IdentityAllocator::new();
        let mut label_sets = Vec::new();
        let mut addresses = BTreeMap::new();
        let mut by_ns: Vec<Vec<(u32, LabelSet, IpAddr)>> = vec![Vec::new(); shape.namespaces];
        for i in 0..shape.identities {
            let (n, j) = (i % shape.namespaces, i / shape.namespaces);
            let labels = pod_labels(&shape, n, j);
            let id = identities.allocate(&labels);
            let addr = pod_address(n, j);
            addresses.insert(addr, id);
            label_sets.push(labels.clone());
            by_ns[n].push((id, labels, addr));
        }
        let mut endpoints = Vec::new();
        for e in 0..shape.endpoints {
            let n = e % shape.namespaces;
            let pick = (e / shape.namespaces) % by_ns[n].len();
            let (identity, labels, _) = by_ns[n][pick].clone();
            let mut named_ports = vec![NamedPort { name: "http".into(), port: 8080, protocol: Protocol::Tcp }];
            if rng.chance(30) {
                named_ports.push(NamedPort { name: "metrics".into(), port: 9090, protocol: Protocol::Tcp });
            }
            endpoints.push(EndpointView {
                id: (e + 1) as u16,
                namespace: format!("ns-{n}"),
                identity,
                labels,
                named_ports,
            });
        }
        let mut text = String::new();
        for r in 0..shape.rules {
            let doc = policy_doc(&shape, &mut rng, r);
            text.push_str("---\n");
            text.push_str(&serde_json::to_string(&doc).expect("json"));
            text.push('\n');
        }
        let policies = accepted_policies(&text, "synthetic");
        Cluster { shape, policies, identities, endpoints, addresses, label_sets }
    }
}

fn app(shape: &Shape, rng: &mut Rng) -> String {
    format!("app-{}", rng.below(shape.apps))
}

/// Ports for a rule: one to three exact ports, sometimes a range, sometimes UDP or ANY,
/// sometimes a named port.
fn ports(rng: &mut Rng) -> Value {
    let mut list = Vec::new();
    for _ in 0..=rng.below(3) {
        let p = match rng.below(10) {
            0 => json!({"port": "8000", "endPort": 8000 + 8 * (1 + rng.below(4)), "protocol": "TCP"}),
            1 => json!({"port": "53", "protocol": "UDP"}),
            2 => json!({"port": "http", "protocol": "TCP"}),
            3 => json!({"port": "5432", "protocol": "ANY"}),
            _ => json!({"port": (80 + 10 * rng.below(20)).to_string(), "protocol": "TCP"}),
        };
        list.push(p);
    }
    json!([{"ports": list}])
}

/// An endpoint selector for peers: an app in the policy's namespace, or pods of some
/// teams' namespaces (matchExpressions), or a tier with a version (`NotIn`).
fn peer_selector(shape: &Shape, rng: &mut Rng, r: usize, salt: u64) -> Value {
    match pick(r, salt, 10) {
        0..=5 => json!({"matchLabels": {"app": app(shape, rng)}}),
        6 | 7 => json!({
            "matchLabels": {"app": app(shape, rng)},
            "matchExpressions": [{
                "key": "k8s:io.cilium.k8s.namespace.labels.team",
                "operator": "In",
                "values": [format!("t{}", rng.below(TEAMS)), format!("t{}", rng.below(TEAMS))],
            }],
        }),
        8 => json!({
            "matchLabels": {"tier": TIERS[rng.below(TIERS.len())]},
            "matchExpressions": [{"key": "version", "operator": "NotIn", "values": ["v0"]}],
        }),
        _ => json!({
            "matchExpressions": [
                {"key": "app", "operator": "In", "values": [app(shape, rng), app(shape, rng)]},
                {"key": "version", "operator": "Exists"},
            ],
        }),
    }
}

/// A category of rule `r` in `0..n`, fixed by `r` and `salt` (splitmix64 of both, so
/// categories with different salts are independent).
fn pick(r: usize, salt: u64, n: u64) -> u64 {
    let mut x = (r as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ salt.wrapping_mul(0xD1B5_4A32_D192_ED03);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (x ^ (x >> 31)) % n
}

/// One policy manifest with one rule.
fn policy_doc(shape: &Shape, rng: &mut Rng, r: usize) -> Value {
    let n = r % shape.namespaces;
    let ns = format!("ns-{n}");
    let name = format!("p{r}");
    // The kind of each rule is fixed by its number (not by the random stream, so the mix
    // stays the same whatever else is drawn): 15% NetworkPolicy, 3% CCNP, the rest CNP.
    let kind = pick(r, 0, 100);
    if kind < 15 {
        return network_policy(shape, rng, r, &ns, &name);
    }
    if kind < 18 {
        return clusterwide(rng, r, &name);
    }
    let subject = match pick(r, 1, 10) {
        0..=6 => json!({"matchLabels": {"app": app(shape, rng)}}),
        7 | 8 => json!({"matchExpressions": [{"key": "tier", "operator": "In", "values": [TIERS[rng.below(4)]]}]}),
        _ => json!({}),
    };
    let mut spec = serde_json::Map::new();
    spec.insert("endpointSelector".into(), subject);
    let direction = if pick(r, 2, 5) < 3 { "ingress" } else { "egress" };
    let (ep_key, cidr_key, cidrset_key, entity_key, req_key) = if direction == "ingress" {
        ("fromEndpoints", "fromCIDR", "fromCIDRSet", "fromEntities", "fromRequires")
    } else {
        ("toEndpoints", "toCIDR", "toCIDRSet", "toEntities", "toRequires")
    };
    let mut peer = serde_json::Map::new();
    match pick(r, 3, 20) {
        0 | 1 => {
            peer.insert(cidr_key.into(), json!([format!("192.0.{}.0/24", rng.below(64)), "198.51.100.0/24"]));
        }
        2 => {
            let b = 16 + rng.below(8);
            peer.insert(
                cidrset_key.into(),
                json!([{"cidr": format!("172.{b}.0.0/16"), "except": [format!("172.{b}.{}.0/24", rng.below(4))]}]),
            );
        }
        3 | 4 => {
            let entity = ["world", "host", "kube-apiserver", "remote-node", "world-ipv4", "health"][rng.below(6)];
            peer.insert(entity_key.into(), json!([entity]));
        }
        5 if pick(r, 4, 5) == 0 => {
            peer.insert(entity_key.into(), json!(["cluster"]));
        }
        6 => {
            peer.insert(ep_key.into(), json!([peer_selector(shape, rng, r, 10)]));
            peer.insert(req_key.into(), json!([{"matchLabels": {"tier": TIERS[rng.below(4)]}}]));
        }
        _ => {
            let mut sels = vec![peer_selector(shape, rng, r, 11)];
            if pick(r, 12, 10) < 3 {
                sels.push(peer_selector(shape, rng, r, 13));
            }
            peer.insert(ep_key.into(), json!(sels));
        }
    }
    if !peer.contains_key(req_key) && rng.chance(75) {
        peer.insert("toPorts".into(), ports(rng));
    }
    let deny = pick(r, 5, 20) == 0;
    let key = match (direction, deny) {
        ("ingress", false) => "ingress",
        ("ingress", true) => "ingressDeny",
        (_, false) => "egress",
        (_, true) => "egressDeny",
    };
    if deny {
        peer.remove(req_key);
        if pick(r, 6, 5) < 2 {
            // A deny for every peer on some ports: allows of every identity there go.
            peer.clear();
            peer.insert(entity_key.into(), json!(["all"]));
            peer.insert("toPorts".into(), ports(rng));
        }
    }
    spec.insert(key.into(), json!([Value::Object(peer)]));
    json!({
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumNetworkPolicy",
        "metadata": {"name": name, "namespace": ns},
        "spec": Value::Object(spec),
    })
}

/// A cluster-wide policy as platforms write them: about every pod or a tier, with peers
/// in a platform namespace (`ns-0` plays kube-system, `ns-1` monitoring), entities or
/// CIDRs.
fn clusterwide(rng: &mut Rng, r: usize, name: &str) -> Value {
    let spec = match pick(r, 7, 5) {
        0 => json!({
            "endpointSelector": {},
            "egress": [{
                "toEndpoints": [{"matchLabels": {"k8s:io.kubernetes.pod.namespace": "ns-0", "app": "app-0"}}],
                "toPorts": [{"ports": [{"port": "53", "protocol": "UDP"}, {"port": "53", "protocol": "TCP"}]}],
            }],
        }),
        1 => json!({
            "endpointSelector": {},
            "ingress": [{
                "fromEndpoints": [{"matchLabels": {"k8s:io.kubernetes.pod.namespace": "ns-1", "app": "app-1"}}],
                "toPorts": [{"ports": [{"port": "metrics", "protocol": "TCP"}]}],
            }],
        }),
        2 => json!({
            "endpointSelector": {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["db"]}]},
            "egressDeny": [{"toCIDR": ["169.254.169.254/32"]}],
        }),
        3 => json!({
            "endpointSelector": {"matchLabels": {"tier": "web"}},
            "ingress": [{"fromEntities": ["world"], "toPorts": [{"ports": [{"port": "443", "protocol": "TCP"}]}]}],
        }),
        _ => json!({
            "endpointSelector": {},
            "ingressDeny": [{"fromEntities": ["all"], "toPorts": [{"ports": [{"port": format!("{}", 2200 + rng.below(4)), "protocol": "TCP"}]}]}],
        }),
    };
    json!({
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumClusterwideNetworkPolicy",
        "metadata": {"name": format!("cc-{name}")},
        "spec": spec,
    })
}

fn network_policy(shape: &Shape, rng: &mut Rng, r: usize, ns: &str, name: &str) -> Value {
    let subject = json!({"matchLabels": {"app": app(shape, rng)}});
    let peer = match pick(r, 8, 6) {
        0 => json!({"podSelector": {"matchLabels": {"app": app(shape, rng)}}}),
        1 | 2 => json!({
            "namespaceSelector": {"matchLabels": {"team": format!("t{}", rng.below(TEAMS))}},
            "podSelector": {"matchExpressions": [{"key": "tier", "operator": "In", "values": [TIERS[rng.below(4)]]}]},
        }),
        3 => json!({"namespaceSelector": {"matchLabels": {"env": "prod"}}}),
        4 => {
            // Some pod addresses (those of one namespace's first 256 identities).
            let c = rng.below(64) * 4;
            json!({"ipBlock": {"cidr": format!("10.128.{c}.0/24"), "except": [format!("10.128.{c}.{}/28", 16 * rng.below(16))]}})
        }
        _ => json!({"ipBlock": {"cidr": format!("203.0.{}.0/24", rng.below(64))}}),
    };
    let ports = json!([{"port": 80 + 10 * rng.below(20), "protocol": "TCP"}]);
    if pick(r, 9, 5) < 3 {
        json!({
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"podSelector": subject, "ingress": [{"from": [peer], "ports": ports}]},
        })
    } else {
        json!({
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"podSelector": subject, "policyTypes": ["Egress"], "egress": [{"to": [peer], "ports": ports}]},
        })
    }
}

/// Checks that two desired states mean the same: equal, except that address identities
/// (numbered in the order they were needed) are compared by their labels. The error names
/// the first difference.
pub fn same_state(a: &DesiredState, b: &DesiredState) -> Result<(), String> {
    if a.cidr_ipcache != b.cidr_ipcache || a.cidr_identities != b.cidr_identities {
        return Err("CIDR identities differ".into());
    }
    if a.endpoints.keys().ne(b.endpoints.keys()) {
        return Err("not the same endpoints".into());
    }
    if a.address_identities == b.address_identities {
        if a.address_ipcache != b.address_ipcache {
            return Err("address ipcache differs".into());
        }
        for (id, pa) in &a.endpoints {
            let pb = &b.endpoints[id];
            if pa != pb {
                let only_a: Vec<String> = pa
                    .entries
                    .iter()
                    .filter(|(k, v)| pb.entries.get(k) != Some(v))
                    .map(|(k, _)| k.to_string())
                    .take(5)
                    .collect();
                let only_b: Vec<String> = pb
                    .entries
                    .iter()
                    .filter(|(k, v)| pa.entries.get(k) != Some(v))
                    .map(|(k, _)| k.to_string())
                    .take(5)
                    .collect();
                return Err(format!(
                    "endpoint {id} differs: enforced {}/{} vs {}/{}; only in the first: {only_a:?}; only in the second: {only_b:?}",
                    pa.ingress_enforced, pa.egress_enforced, pb.ingress_enforced, pb.egress_enforced
                ));
            }
        }
        return Ok(());
    }
    // Numbered differently: compare by labels.
    let name = |s: &DesiredState, id: u32| -> String {
        if id >= ADDRESS_IDENTITY_BASE {
            s.address_identities.get(&id).map_or_else(|| format!("unknown {id}"), std::string::ToString::to_string)
        } else {
            id.to_string()
        }
    };
    let ipcache = |s: &DesiredState| -> BTreeMap<(IpAddr, u8), String> {
        s.address_ipcache.iter().map(|(k, id)| (*k, name(s, *id))).collect()
    };
    if ipcache(a) != ipcache(b) {
        return Err("address ipcache differs (by labels)".into());
    }
    for (id, pa) in &a.endpoints {
        let pb = &b.endpoints[id];
        let entries = |s: &DesiredState, p: &crate::resolve::EndpointPolicy| {
            let mut v: Vec<String> = p
                .entries
                .iter()
                .map(|(k, e)| {
                    format!(
                        "{:?} {} {} {} {} {} {:?}",
                        k.direction,
                        name(s, k.identity),
                        k.protocol,
                        k.port,
                        k.port_prefix_len,
                        e.deny,
                        e.origins
                    )
                })
                .collect();
            v.sort();
            v
        };
        if pa.ingress_enforced != pb.ingress_enforced
            || pa.egress_enforced != pb.egress_enforced
            || entries(a, pa) != entries(b, pb)
        {
            return Err(format!("endpoint {id} differs (by labels)"));
        }
    }
    Ok(())
}
