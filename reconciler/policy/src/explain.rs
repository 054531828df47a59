//! Why a flow is allowed or dropped: the same decision the datapath takes, taken on the
//! resolver's output, with the rules behind it.
//!
//! The datapath looks the policy map up twice per packet, once with the peer's identity
//! and once with "any identity", each a longest-prefix match over (protocol, port); a deny
//! from either wins, else an allow from either passes, else the packet is dropped. This
//! module does exactly that on an [`EndpointPolicy`], so `policy explain` and the kernel
//! cannot disagree unless the maps differ from the desired state.
use serde::Serialize;

use crate::identity;
use crate::labels::LabelSet;
use crate::model::{Direction, Entity, NamedPort, Peer, Peers, Policy, Port, PortRule, Protocol, Verdict};
use crate::resolve::{EndpointPolicy, EntryKey, EntryValue, RuleOrigin};
use crate::selector::Operator;

/// The decision of one side (the source's egress or the destination's ingress).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "decision", rename_all = "kebab-case")]
pub enum Decision {
    /// No policy selects the endpoint for this direction: everything passes.
    NotSelected,
    /// An allow entry matched and no deny did.
    Allowed { entry: String, rules: Vec<RuleOrigin> },
    /// A deny entry matched (it wins over every allow).
    Denied { entry: String, rules: Vec<RuleOrigin> },
    /// The endpoint is enforced and nothing allows the flow.
    DefaultDeny,
    /// The endpoint is not on this node (its side is decided elsewhere).
    NotLocal,
}

impl Decision {
    /// Whether the packet passes this side.
    pub fn passes(&self) -> bool {
        matches!(self, Decision::NotSelected | Decision::Allowed { .. } | Decision::NotLocal)
    }
}

/// Length in bits of the (protocol, port) part an entry matches: 0 for any protocol, 8 for
/// a protocol with any port, 8 + the port prefix otherwise. Longer is more specific.
fn l4_bits(k: &EntryKey) -> u8 {
    if k.protocol == 0 { 0 } else { 8 + k.port_prefix_len }
}

fn l4_matches(k: &EntryKey, protocol: u8, port: u16) -> bool {
    if k.protocol == 0 {
        return true;
    }
    if k.protocol != protocol {
        return false;
    }
    let len = u32::from(k.port_prefix_len);
    let mask = u16::MAX.checked_shl(16 - len).unwrap_or(0);
    (port & mask) == (k.port & mask)
}

/// The longest-prefix entry for one identity, as one LPM lookup finds it.
fn longest(
    policy: &EndpointPolicy,
    direction: Direction,
    identity: u32,
    protocol: u8,
    port: u16,
) -> Option<(&EntryKey, &EntryValue)> {
    policy
        .entries
        .iter()
        .filter(|(k, _)| k.direction == direction && k.identity == identity && l4_matches(k, protocol, port))
        .max_by_key(|(k, _)| l4_bits(k))
}

/// Decides one side. `policy` is the endpoint's desired policy (`None`: no entries and not
/// enforced); for ICMP and ICMPv6 pass the type as `port`.
pub fn decide(policy: Option<&EndpointPolicy>, direction: Direction, peer: u32, protocol: u8, port: u16) -> Decision {
    let Some(policy) = policy else { return Decision::NotSelected };
    let enforced = match direction {
        Direction::Ingress => policy.ingress_enforced,
        Direction::Egress => policy.egress_enforced,
    };
    if !enforced {
        return Decision::NotSelected;
    }
    let exact = if peer == identity::ANY { None } else { longest(policy, direction, peer, protocol, port) };
    let any = longest(policy, direction, identity::ANY, protocol, port);
    let found = |(k, v): (&EntryKey, &EntryValue)| (k.to_string(), v.origins.iter().cloned().collect::<Vec<_>>());
    if let Some(hit) = exact.filter(|(_, v)| v.deny).or_else(|| any.filter(|(_, v)| v.deny)) {
        let (entry, rules) = found(hit);
        return Decision::Denied { entry, rules };
    }
    if let Some(hit) = exact.or(any) {
        let (entry, rules) = found(hit);
        return Decision::Allowed { entry, rules };
    }
    Decision::DefaultDeny
}

/// The policies that put an endpoint with `labels` under default deny in `direction`: those
/// with a NetworkPolicy-tier rule that selects it and enforces that direction (the same
/// test the resolver makes for `ingress_enforced`/`egress_enforced`). Each policy once, in
/// policy order. What a default deny names (`policy explain`, flow records).
pub fn default_deny_by<'a>(policies: &'a [Policy], labels: &LabelSet, direction: Direction) -> Vec<&'a Policy> {
    policies
        .iter()
        .filter(|p| p.tier.is_none())
        .filter(|p| {
            p.rules.iter().any(|r| {
                let enforces = match direction {
                    Direction::Ingress => r.enforce_ingress,
                    Direction::Egress => r.enforce_egress,
                };
                enforces && r.subject.matches(labels)
            })
        })
        .collect()
}

/// The rule that came nearest to allowing a default-denied flow, and what the flow lacks
/// for it (`policy explain`'s `nearestRule`, flow records' `nearest_rule`).
///
/// "Nearest": among the allow items (`ingress` / `egress`) of the rules of the policies
/// that put the endpoint into default deny in that direction ([`default_deny_by`]) whose
/// subject selects the endpoint, the one whose peer part the flow misses least (the
/// fewest unmatched label requirements, counting a missed entity or CIDR as one), then
/// whose port part it misses least (0 or 1); ties go to the first in policy and rule
/// order. So a rule whose peer matches but whose port differs is nearer than one whose
/// port matches but whose peer differs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Nearest {
    /// `Kind namespace/name`.
    pub policy: String,
    /// Where the item is in the manifest (`spec.ingress[0]`).
    pub rule: String,
    /// What the flow lacks, each one thing: `label app=frontend` (a key of any source), `namespace prod`,
    /// `entity host`, `an address in 192.0.2.0/24`, `port 8080/TCP`, `protocol UDP`.
    /// Empty: the flow matches the item's peers and ports (a `fromRequires` / `toRequires`
    /// of another rule then keeps it out).
    pub lacks: Vec<String>,
}

impl std::fmt::Display for Nearest {
    /// `CiliumNetworkPolicy default/p spec.ingress[0], which the flow misses by: port 8080/TCP`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.policy, self.rule)?;
        if self.lacks.is_empty() {
            f.write_str(", which matches the flow's peer and port (a fromRequires/toRequires keeps it out)")
        } else {
            write!(f, ", which the flow misses by: {}", self.lacks.join(", "))
        }
    }
}

/// The peer of a flow as [`nearest_allow`] compares it: its identity's labels and its
/// address (for CIDR peers; `None` when not known).
#[derive(Clone, Copy, Debug)]
pub struct FlowPeer<'a> {
    pub labels: &'a LabelSet,
    pub ip: Option<std::net::IpAddr>,
}

fn entity_matches(e: Entity, labels: &LabelSet) -> bool {
    use crate::labels::source;
    let reserved = |name: &str| labels.get(name).is_some_and(|l| l.source == source::RESERVED);
    let world = reserved("world") || reserved("world-ipv4") || reserved("world-ipv6") || labels.has_source("cidr");
    match e {
        Entity::All => true,
        Entity::None => false,
        Entity::World | Entity::WorldIpv4 | Entity::WorldIpv6 => world,
        Entity::Cluster => !world,
        other => reserved(other.as_str()),
    }
}

/// What the flow lacks for one peer (empty: it matches).
fn peer_lacks(peer: &Peer, flow: FlowPeer<'_>) -> Vec<String> {
    match peer {
        Peer::Endpoints(sel) => sel
            .requirements()
            .filter(|r| !r.matches(flow.labels))
            .map(|r| {
                if r.key.key == crate::labels::keys::POD_NAMESPACE && r.operator == Operator::In && r.values.len() == 1
                {
                    format!("namespace {}", r.values.iter().next().map_or("", String::as_str))
                } else {
                    let r = r.to_string();
                    format!("label {}", r.strip_prefix("any:").unwrap_or(&r))
                }
            })
            .collect(),
        Peer::Entity(e) if entity_matches(*e, flow.labels) => Vec::new(),
        Peer::Entity(e) => vec![format!("entity {e}")],
        Peer::Cidr(b) | Peer::IpBlock(b) if flow.ip.is_some_and(|ip| b.contains_ip(ip)) => Vec::new(),
        Peer::Cidr(b) | Peer::IpBlock(b) => vec![format!("an address in {b}")],
    }
}

fn protocol_name(p: Protocol) -> &'static str {
    match p {
        Protocol::Any => "ANY",
        Protocol::Tcp => "TCP",
        Protocol::Udp => "UDP",
        Protocol::Sctp => "SCTP",
        Protocol::Icmp => "ICMP",
        Protocol::IcmpV6 => "ICMPv6",
    }
}

/// What the flow lacks for the ports of an item (`None`: it matches). `named`: the
/// destination's named ports (resolves `Port::Named`).
fn ports_lack(ports: &[PortRule], protocol: u8, port: u16, named: &[NamedPort]) -> Option<String> {
    let proto_ok = |p: Protocol| match p {
        Protocol::Any => true,
        p => p.number() == protocol,
    };
    let port_ok = |r: &PortRule| match &r.port {
        Port::Any => true,
        Port::Range { first, last } => (*first..=*last).contains(&port),
        Port::Named(n) => named.iter().any(|np| &np.name == n && np.port == port && np.protocol.number() == protocol),
    };
    if ports.is_empty() || ports.iter().any(|r| proto_ok(r.protocol) && port_ok(r)) {
        return None;
    }
    let text = |r: &PortRule| {
        let proto = protocol_name(r.protocol);
        match &r.port {
            Port::Any => format!("protocol {proto}"),
            Port::Range { first, last } if first == last => format!("port {first}/{proto}"),
            Port::Range { first, last } => format!("a port in {first}-{last}/{proto}"),
            Port::Named(n) => format!("port {n:?}/{proto} (named)"),
        }
    };
    // The item's first port of the flow's protocol (the flow lacks its port), else its
    // first port (the flow lacks protocol and port).
    let r = ports.iter().find(|r| proto_ok(r.protocol)).unwrap_or(&ports[0]);
    let mut all: Vec<String> = vec![text(r)];
    all.extend(ports.iter().filter(|o| *o != r).map(text));
    Some(if all.len() == 1 { all.remove(0) } else { all.join(" or ") })
}

/// The nearest allow rule for a default-denied flow at an endpoint with `labels` in
/// `direction` from/to `peer` on `protocol`/`port` (see [`Nearest`] for what "nearest"
/// means); `named`: the destination's named ports. `None` when no isolating policy has an
/// allow item in that direction for the endpoint.
pub fn nearest_allow(
    policies: &[Policy],
    labels: &LabelSet,
    direction: Direction,
    peer: FlowPeer<'_>,
    protocol: u8,
    port: u16,
    named: &[NamedPort],
) -> Option<Nearest> {
    let mut best: Option<((usize, usize), Nearest)> = None;
    for p in default_deny_by(policies, labels, direction) {
        for r in p.rules.iter().filter(|r| r.subject.matches(labels)) {
            let items = match direction {
                Direction::Ingress => &r.ingress,
                Direction::Egress => &r.egress,
            };
            for item in items.iter().filter(|i| i.verdict == Verdict::Allow) {
                let peers = match &item.peers {
                    Peers::Any => Vec::new(),
                    Peers::Only(list) => list
                        .iter()
                        .map(|x| peer_lacks(x, peer))
                        .min_by_key(Vec::len)
                        .unwrap_or_else(|| vec!["a peer (the item lists none)".into()]),
                };
                let port_lack = ports_lack(&item.ports, protocol, port, named);
                let score = (peers.len(), usize::from(port_lack.is_some()));
                if best.as_ref().is_none_or(|(b, _)| score < *b) {
                    let mut lacks = peers;
                    lacks.extend(port_lack);
                    best = Some((score, Nearest { policy: p.display_name(), rule: item.path.clone(), lacks }));
                }
            }
        }
    }
    best.map(|(_, n)| n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::PolicyKind;
    use std::collections::BTreeSet;

    fn origin(name: &str) -> BTreeSet<RuleOrigin> {
        BTreeSet::from([RuleOrigin {
            kind: PolicyKind::CiliumNetworkPolicy,
            namespace: Some("default".into()),
            name: name.into(),
            direction: Direction::Ingress,
            rule_index: 0,
            peer_rule_index: 0,
            path: "spec.ingress[0]".into(),
            tier: None,
        }])
    }

    fn entry(p: &mut EndpointPolicy, identity: u32, protocol: u8, port: u16, len: u8, deny: bool, name: &str) {
        p.entries.insert(
            EntryKey { direction: Direction::Ingress, identity, protocol, port, port_prefix_len: len },
            EntryValue { deny, origins: origin(name).into() },
        );
    }

    #[test]
    fn follows_the_datapath_rules() {
        let mut p = EndpointPolicy { ingress_enforced: true, ..Default::default() };
        entry(&mut p, 256, 6, 8080, 16, false, "allow-web");
        entry(&mut p, 0, 6, 22, 16, true, "deny-ssh");
        entry(&mut p, 256, 6, 8000, 13, false, "allow-range");
        let d = |peer, proto, port| decide(Some(&p), Direction::Ingress, peer, proto, port);
        assert!(matches!(d(256, 6, 8080), Decision::Allowed { ref rules, .. } if rules[0].name == "allow-web"));
        assert!(matches!(d(256, 6, 8003), Decision::Allowed { ref rules, .. } if rules[0].name == "allow-range"));
        assert_eq!(d(256, 6, 8008), Decision::DefaultDeny);
        assert!(matches!(d(256, 6, 22), Decision::Denied { ref rules, .. } if rules[0].name == "deny-ssh"));
        assert_eq!(d(257, 17, 8080), Decision::DefaultDeny);
        assert_eq!(decide(Some(&p), Direction::Egress, 257, 6, 1), Decision::NotSelected);
        assert_eq!(decide(None, Direction::Ingress, 257, 6, 1), Decision::NotSelected);
    }

    #[test]
    fn any_protocol_and_wildcards() {
        let mut p = EndpointPolicy { ingress_enforced: true, ..Default::default() };
        entry(&mut p, 300, 0, 0, 0, false, "all-from-300");
        let d = decide(Some(&p), Direction::Ingress, 300, 1, 8);
        assert!(matches!(d, Decision::Allowed { ref entry, .. } if entry == "ingress from 300 *"));
        assert!(d.passes());
        assert!(!Decision::DefaultDeny.passes());
    }

    fn pod(ns: &str, app: &str) -> LabelSet {
        let ns_labels = std::collections::BTreeMap::from([("kubernetes.io/metadata.name".to_string(), ns.to_string())]);
        let labels = std::collections::BTreeMap::from([("app".to_string(), app.to_string())]);
        LabelSet::for_pod(ns, &ns_labels, &labels, "default", "default")
    }

    const TWO_RULES: &str = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: p, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: backend}}
  ingress:
    - fromEndpoints: [{matchLabels: {app: frontend}}]
      toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
    - fromEntities: [host]
      toPorts: [{ports: [{port: "9090", protocol: TCP}]}]
    - fromCIDR: [192.0.2.0/24]
      toPorts: [{ports: [{port: "53", protocol: UDP}]}]
"#;

    #[test]
    fn the_nearest_rule_prefers_a_matching_peer_over_a_matching_port() {
        let ps = crate::synth::accepted_policies(TWO_RULES, "t.yaml");
        let backend = pod("default", "backend");
        let near = |peer: &LabelSet, ip: Option<&str>, proto: u8, port: u16| {
            let peer = FlowPeer { labels: peer, ip: ip.map(|i| i.parse().unwrap()) };
            nearest_allow(&ps, &backend, Direction::Ingress, peer, proto, port, &[]).unwrap()
        };
        // frontend on 9090: its peer matches item 0, whose port it lacks (item 1's port
        // matches but its peer does not: farther).
        let n = near(&pod("default", "frontend"), None, 6, 9090);
        assert_eq!((n.rule.as_str(), n.lacks.clone()), ("spec.ingress[0]", vec!["port 8080/TCP".to_string()]));
        assert_eq!(
            n.to_string(),
            "CiliumNetworkPolicy default/p spec.ingress[0], which the flow misses by: port 8080/TCP"
        );
        // other on 8080: the label.
        let n = near(&pod("default", "other"), None, 6, 8080);
        assert_eq!((n.rule.as_str(), n.lacks.clone()), ("spec.ingress[0]", vec!["label app=frontend".to_string()]));
        // frontend of another namespace: the namespace.
        let n = near(&pod("prod", "frontend"), None, 6, 8080);
        assert_eq!(n.lacks, vec!["namespace default".to_string()]);
        // The host on 8080: the host item's port (its peer matches).
        let host = LabelSet::reserved("host");
        let n = near(&host, None, 6, 8080);
        assert_eq!((n.rule.as_str(), n.lacks.clone()), ("spec.ingress[1]", vec!["port 9090/TCP".to_string()]));
        // A world address inside the CIDR over TCP: the protocol and port of the CIDR item.
        let world = LabelSet::reserved("world-ipv4");
        let n = near(&world, Some("192.0.2.7"), 6, 53);
        assert_eq!((n.rule.as_str(), n.lacks.clone()), ("spec.ingress[2]", vec!["port 53/UDP".to_string()]));
        // Outside it: one thing missing from the peer, one from the port, at best.
        let n = near(&world, Some("198.51.100.1"), 6, 80);
        assert_eq!(n.lacks.len(), 2, "{n:?}");
        // Nothing isolates the frontend for ingress: no nearest rule.
        let fe = pod("default", "frontend");
        let peer = FlowPeer { labels: &backend, ip: None };
        assert_eq!(nearest_allow(&ps, &fe, Direction::Ingress, peer, 6, 8080, &[]), None);
    }

    #[test]
    fn a_named_port_resolves_on_the_destination() {
        let yaml = TWO_RULES.replace(r#"port: "8080", protocol: TCP"#, "port: http, protocol: TCP");
        let ps = crate::synth::accepted_policies(&yaml, "t.yaml");
        let backend = pod("default", "backend");
        let fe = pod("default", "frontend");
        let named = [NamedPort { name: "http".into(), port: 8080, protocol: Protocol::Tcp }];
        let peer = FlowPeer { labels: &fe, ip: None };
        let n = nearest_allow(&ps, &backend, Direction::Ingress, peer, 6, 8080, &named).unwrap();
        assert!(n.lacks.is_empty(), "{n:?}");
        assert!(n.to_string().contains("matches the flow's peer and port"));
        let n = nearest_allow(&ps, &backend, Direction::Ingress, peer, 6, 9090, &named).unwrap();
        assert_eq!(n.lacks, vec!["port \"http\"/TCP (named)".to_string()]);
    }
}
