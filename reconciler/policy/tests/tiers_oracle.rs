//! The flattened tier chain against a packet-by-packet evaluation of the tier model.
//!
//! Random synthetic clusters (NetworkPolicy, CNP and CCNP rules, and `ClusterNetworkPolicies`
//! and `AdminNetworkPolicies` of both tiers, few priorities, overlapping ports and ranges)
//! are resolved; then random packets (local endpoint, direction, peer address, protocol,
//! port) are decided twice:
//!
//! - as the datapath decides them on the resolved entries (`explain::decide`: longest
//!   match for the peer's identity and for any peer, a deny from either wins);
//! - by [`palisade_policy::tiers::evaluate`], which walks the Admin and Baseline rules of
//!   the policies themselves, and for the NetworkPolicy tier takes the verdict of the
//!   NetworkPolicy-tier policies alone, resolved on their own.
//!
//! Peers are addresses, turned into identities as the datapath does (host entries, then
//! the longest CIDR prefix, else world), in each resolution's own ipcache.

use std::collections::BTreeMap;
use std::net::IpAddr;

use palisade_policy::cidr::{CidrIdentities, Prefix};
use palisade_policy::explain::decide;
use palisade_policy::model::{Direction, Policy};
use palisade_policy::resolve::{DesiredState, Options, PolicyResolver};
use palisade_policy::synth::{Cluster, Rng, Shape, accepted_policies};
use palisade_policy::tiers::{PeerView, TierDecision, evaluate};
use palisade_policy::{IdentityAllocator, LabelSet, identity};

fn resolve(policies: &[Policy], c: &Cluster, cidrs: &CidrIdentities) -> DesiredState {
    let mut r = PolicyResolver::new(Options { allow_localhost: true });
    r.set_policies(std::sync::Arc::new(policies.to_vec()));
    r.set_cidr_identities(cidrs.clone());
    r.set_endpoints(c.endpoints.clone());
    r.set_identities(std::sync::Arc::new(c.identities.clone()), c.addresses.clone());
    r.resolve().clone()
}

/// The identity of `addr` in a state's ipcache, as the datapath finds it (the node
/// address is the host).
fn identity_of(state: &DesiredState, pods: &BTreeMap<IpAddr, u32>, addr: IpAddr) -> u32 {
    if addr == NODE {
        return identity::HOST;
    }
    if addr == OTHER_NODE {
        return identity::REMOTE_NODE;
    }
    let host_len = if addr.is_ipv4() { 32 } else { 128 };
    if let Some(id) = state.address_ipcache.get(&(addr, host_len)) {
        return *id;
    }
    if let Some(id) = pods.get(&addr) {
        return *id;
    }
    state
        .cidr_ipcache
        .iter()
        .filter(|((a, len), _)| Prefix::new(*a, *len).is_some_and(|p| p.contains_ip(addr)))
        .max_by_key(|((_, len), _)| *len)
        .map_or(if addr.is_ipv4() { identity::WORLD_IPV4 } else { identity::WORLD_IPV6 }, |(_, id)| *id)
}

const NODE: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 255, 0, 1));
const OTHER_NODE: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 255, 0, 2));

fn labels_of<'a>(state: &'a DesiredState, ids: &'a IdentityAllocator, id: u32) -> &'a LabelSet {
    ids.get(id)
        .or_else(|| state.cidr_identities.get(&id))
        .or_else(|| state.address_identities.get(&id))
        .unwrap_or_else(|| panic!("identity {id} has labels"))
}

/// One packet: local endpoint index, direction, peer address, protocol, port.
type Packet = (usize, Direction, IpAddr, u8, u16);

/// Decides every packet both ways and panics at the first disagreement; answers how many
/// packets each tier decided.
fn check(c: &Cluster, packets: impl IntoIterator<Item = Packet>, what: &str) -> BTreeMap<&'static str, usize> {
    let cidrs = CidrIdentities::for_policies(&c.policies);
    let full = resolve(&c.policies, c, &cidrs);
    let np_policies: Vec<Policy> = c.policies.iter().filter(|p| p.tier.is_none()).cloned().collect();
    let np = resolve(&np_policies, c, &cidrs);
    let mut by_tier = BTreeMap::<&str, usize>::new();
    for (e, direction, addr, protocol, port) in packets {
        let ep = &c.endpoints[e];
        let id_full = identity_of(&full, &c.addresses, addr);
        let id_np = identity_of(&np, &c.addresses, addr);
        let kernel =
            decide(full.endpoints.get(&ep.id).map(std::convert::AsRef::as_ref), direction, id_full, protocol, port);
        let np_policy = np.endpoints.get(&ep.id).map(std::convert::AsRef::as_ref);
        let np_selects = np_policy.is_some_and(|p| match direction {
            Direction::Ingress => p.ingress_enforced,
            Direction::Egress => p.egress_enforced,
        });
        let base = c.addresses.get(&addr).copied().unwrap_or(id_full);
        let peer = PeerView { identity: id_full, labels: labels_of(&full, &c.identities, id_full) };
        let trace = evaluate(&c.policies, ep, &c.endpoints, direction, peer, base, protocol, port, np_selects);
        let (model, tier) = match &trace.decision {
            TierDecision::Admin { allowed, .. } => (*allowed, "admin"),
            TierDecision::Baseline { allowed, .. } => (*allowed, "baseline"),
            TierDecision::NetworkPolicy => {
                (decide(np_policy, direction, id_np, protocol, port).passes(), "network-policy")
            }
            TierDecision::Default => (true, "default"),
        };
        *by_tier.entry(tier).or_default() += 1;
        assert_eq!(
            kernel.passes(),
            model,
            "{what}: endpoint {} ({}) {direction:?} peer {addr} (identity {id_full}) proto {protocol} \
             port {port}: entries say {kernel:?}, the tier model says {trace:?}",
            ep.id,
            ep.labels,
        );
    }
    by_tier
}

#[test]
fn flattened_entries_decide_every_packet_as_the_tier_model() {
    let mut by_tier = BTreeMap::<&str, usize>::new();
    for seed in 1..=12 {
        let shape = Shape { namespaces: 4, identities: 60, endpoints: 16, rules: 30, apps: 4, seed };
        let c = Cluster::generate_tiered(shape, 14);
        let mut rng = Rng::new(seed * 991);
        let pod_addrs: Vec<IpAddr> = c.addresses.keys().copied().collect();
        let outside: Vec<IpAddr> =
            ["203.0.113.7", "192.0.2.9", "198.51.100.20", "172.16.1.1", "8.8.8.8", "10.128.4.77"]
                .iter()
                .map(|a| a.parse().unwrap())
                .collect();
        let packets: Vec<Packet> = (0..3000)
            .map(|_| {
                let e = rng.below(c.endpoints.len());
                let direction = if rng.chance(50) { Direction::Ingress } else { Direction::Egress };
                let addr = match rng.below(10) {
                    0 => outside[rng.below(outside.len())],
                    1 => [NODE, OTHER_NODE][rng.below(2)],
                    _ => pod_addrs[rng.below(pod_addrs.len())],
                };
                let protocol = [6u8, 6, 6, 17, 132, 1, 47][rng.below(7)];
                let port = match rng.below(8) {
                    0 => 53,
                    1 => 8000 + rng.below(40) as u16,
                    2 => 8080,
                    3 => 5432,
                    4 => 999 + rng.below(3) as u16,
                    5 => rng.below(65536) as u16,
                    _ => 80 + 10 * rng.below(21) as u16,
                };
                (e, direction, addr, protocol, port)
            })
            .collect();
        for (tier, n) in check(&c, packets, &format!("seed {seed}")) {
            *by_tier.entry(tier).or_default() += n;
        }
    }
    eprintln!("packets by deciding tier: {by_tier:?}");
    // Every tier decided a fair share of the packets (the test covers them all).
    for tier in ["admin", "network-policy", "baseline", "default"] {
        assert!(by_tier.get(tier).copied().unwrap_or(0) > 200, "{tier} decided too few packets: {by_tier:?}");
    }
    assert_eq!(by_tier.values().sum::<usize>(), 12 * 3000);
}

/// A small cluster with these policies instead of generated ones.
fn cluster_with(text: &str) -> Cluster {
    let shape = Shape { namespaces: 2, identities: 8, endpoints: 4, rules: 0, apps: 2, seed: 5 };
    let mut c = Cluster::generate(shape);
    c.policies = accepted_policies(text, "test");
    c
}

/// Every packet of the small cluster over the given ports (all endpoints, both
/// directions, every pod address, the node, an outside address; TCP, UDP, ICMP, GRE).
fn sweep(c: &Cluster, ports: &[u16]) -> Vec<Packet> {
    let mut addrs: Vec<IpAddr> = c.addresses.keys().copied().collect();
    addrs.extend([NODE, "203.0.113.7".parse().unwrap()]);
    let mut out = Vec::new();
    for e in 0..c.endpoints.len() {
        for direction in Direction::BOTH {
            for addr in &addrs {
                for protocol in [6u8, 17, 1, 47] {
                    for &port in ports {
                        out.push((e, direction, *addr, protocol, port));
                    }
                }
            }
        }
    }
    out
}

/// "Monitoring may always scrape": an Admin Accept for one app on a port that the
/// NetworkPolicy tier denies to every peer. The any-peer deny would beat the Accept in the
/// datapath, so it becomes a default drop, and the other protocols get entries of their
/// own (the encoding's hardest case).
#[test]
fn an_admin_accept_beats_a_deny_for_every_peer_of_the_network_policy_tier() {
    let c = cluster_with(
        r#"
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: open-but-9090}
spec:
  endpointSelector: {}
  ingress: [{fromEntities: [all]}]
  ingressDeny: [{fromEntities: [all], toPorts: [{ports: [{port: "9090", protocol: TCP}]}]}]
---
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: scrape}
spec:
  tier: Admin
  priority: 1
  subject: {namespaces: {}}
  ingress:
  - action: Accept
    from: [{pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: app-1}}}}]
    protocols: [{tcp: {destinationPort: {number: 9090}}}]
"#,
    );
    let by_tier = check(&c, sweep(&c, &[0, 80, 9089, 9090, 9091, 65535]), "scrape");
    assert!(by_tier["admin"] > 0 && by_tier["network-policy"] > 0, "{by_tier:?}");
    // The flattening really took the hard path: per-protocol entries for any peer.
    let full = resolve(&c.policies, &c, &CidrIdentities::for_policies(&c.policies));
    let ep = full.endpoints.values().next().unwrap();
    let any_ingress = ep.entries.keys().filter(|k| k.direction == Direction::Ingress && k.identity == 0).count();
    assert!(any_ingress > 250, "one entry per other protocol: {any_ingress}");
}

/// Overlapping ranges at three priorities, a Pass in between and a Baseline floor.
#[test]
fn overlapping_ranges_at_different_priorities() {
    let c = cluster_with(
        r"
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: a-narrow-accept}
spec:
  tier: Admin
  priority: 10
  subject: {namespaces: {}}
  ingress:
  - {action: Accept, from: [{namespaces: {}}], protocols: [{tcp: {destinationPort: {range: {start: 8080, end: 8090}}}}]}
---
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: b-pass}
spec:
  tier: Admin
  priority: 20
  subject: {namespaces: {}}
  ingress:
  - {action: Pass, from: [{pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: app-0}}}}], protocols: [{tcp: {destinationPort: {range: {start: 8000, end: 8100}}}}]}
---
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: c-wide-deny}
spec:
  tier: Admin
  priority: 30
  subject: {namespaces: {}}
  ingress:
  - {action: Deny, from: [{namespaces: {}}], protocols: [{tcp: {destinationPort: {range: {start: 1, end: 10000}}}}]}
---
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: floor}
spec:
  tier: Baseline
  priority: 0
  subject: {namespaces: {}}
  ingress:
  - {action: Deny, from: [{namespaces: {}}]}
",
    );
    let ports = [1, 79, 80, 7999, 8000, 8079, 8080, 8085, 8090, 8091, 8100, 8101, 10000, 10001, 65535];
    let by_tier = check(&c, sweep(&c, &ports), "ranges");
    assert!(by_tier["admin"] > 0 && by_tier["baseline"] > 0, "{by_tier:?}");
}
