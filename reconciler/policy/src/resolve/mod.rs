//! Policies x endpoints x identities -> the desired policy entries of every endpoint.
//!
//! For each endpoint: the rules whose subject selects it decide whether it is enforced per
//! direction, and each of their peer rules turns into entries (peer identity, protocol,
//! port block). Allows are a union; a deny wins: an allow entry that a deny entry for the
//! same identity or for any identity covers is dropped, so that a longest-prefix lookup can
//! never find a more specific allow under a broader deny. The result knows nothing of BPF;
//! the map writer encodes it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Serialize, Serializer};

pub use crate::model::NamedPort;
pub use crate::ports::range_to_prefixes;

use crate::identity::{self, IdentityAllocator};
use crate::labels::{LabelSet, source};
use crate::model::{Direction, Peer, PeerRule, Peers, Policy, PolicyKind, Port, PortRule, Protocol, Verdict};
use crate::ports::{block_contains, block_last};
use crate::selector::EndpointSelector;

/// A local endpoint, as the resolver needs to see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointView {
    pub id: u16,
    pub namespace: String,
    pub identity: u32,
    pub labels: LabelSet,
    pub named_ports: Vec<NamedPort>,
}

/// The desired policy of every endpoint, by endpoint id.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DesiredState {
    pub endpoints: BTreeMap<u16, EndpointPolicy>,
}

/// What one endpoint should have loaded.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct EndpointPolicy {
    pub ingress_enforced: bool,
    pub egress_enforced: bool,
    #[serde(serialize_with = "entries_by_text")]
    pub entries: BTreeMap<EntryKey, EntryValue>,
}

/// One policy entry. Wildcards: identity 0 = any peer; protocol 0 = any protocol (then
/// the port is 0 and `port_prefix_len` 0); `port_prefix_len` 0 = any port, 16 = `port`
/// exactly, in between = the aligned block of `2^(16 - len)` ports starting at `port`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EntryKey {
    pub direction: Direction,
    pub identity: u32,
    pub protocol: u8,
    pub port: u16,
    pub port_prefix_len: u8,
}

impl EntryKey {
    /// Whether every packet this entry matches is also matched by `other`'s L4 part
    /// (identities are not compared).
    fn l4_within(&self, other: &EntryKey) -> bool {
        other.protocol == 0
            || (other.protocol == self.protocol
                && block_contains(other.port, other.port_prefix_len, self.port, self.port_prefix_len))
    }
}

impl fmt::Display for EntryKey {
    /// `ingress from 256 TCP/8080`, `egress to any UDP/53`, `ingress from 300 TCP/8000-8003`,
    /// `ingress from 256 TCP/*`, `egress to any *`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.direction {
            Direction::Ingress => f.write_str("ingress from ")?,
            Direction::Egress => f.write_str("egress to ")?,
        }
        if self.identity == identity::ANY {
            f.write_str("any")?;
        } else {
            write!(f, "{}", self.identity)?;
        }
        match self.protocol {
            0 => return f.write_str(" *"),
            1 => f.write_str(" ICMP")?,
            6 => f.write_str(" TCP")?,
            17 => f.write_str(" UDP")?,
            58 => f.write_str(" ICMPv6")?,
            132 => f.write_str(" SCTP")?,
            n => write!(f, " proto{n}")?,
        }
        match self.port_prefix_len {
            0 => f.write_str("/*"),
            16 => write!(f, "/{}", self.port),
            len => write!(f, "/{}-{}", self.port, block_last(self.port, len)),
        }
    }
}

/// What an entry does and which rules produced it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct EntryValue {
    pub deny: bool,
    pub origins: BTreeSet<RuleOrigin>,
}

/// A rule that produced an entry: `policy.rules[rule_index]`, and in it
/// `peer_rules(direction)[peer_rule_index]`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RuleOrigin {
    pub kind: PolicyKind,
    pub namespace: Option<String>,
    pub name: String,
    pub direction: Direction,
    /// Index of the rule (Cilium spec) in [`Policy::rules`].
    pub rule_index: usize,
    /// Index of the peer rule in the rule's ingress or egress list.
    pub peer_rule_index: usize,
    /// Where the peer rule is in the manifest (`spec.ingressDeny[1]`).
    pub path: String,
}

impl fmt::Display for RuleOrigin {
    /// `CiliumNetworkPolicy default/web spec.ingress[1]`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ", self.kind)?;
        if let Some(ns) = &self.namespace {
            write!(f, "{ns}/")?;
        }
        write!(f, "{} {}", self.name, self.path)
    }
}

impl RuleOrigin {
    /// `CiliumNetworkPolicy default/web` (as [`Policy::display_name`]).
    pub fn policy_name(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("{} {ns}/{}", self.kind, self.name),
            None => format!("{} {}", self.kind, self.name),
        }
    }
}

impl Serialize for RuleOrigin {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

fn entries_by_text<S: Serializer>(entries: &BTreeMap<EntryKey, EntryValue>, s: S) -> Result<S::Ok, S::Error> {
    s.collect_map(entries.iter().map(|(k, v)| (k.to_string(), v)))
}

impl Policy {
    /// The peer rule an origin names, if it is in this policy.
    pub fn peer_rule(&self, origin: &RuleOrigin) -> Option<&PeerRule> {
        self.rules.get(origin.rule_index)?.peer_rules(origin.direction).get(origin.peer_rule_index)
    }
}

/// Resolves every endpoint's desired policy.
pub fn resolve(policies: &[Policy], endpoints: &[EndpointView], identities: &IdentityAllocator) -> DesiredState {
    let mut state = DesiredState::default();
    for ep in endpoints {
        let mut r =
            EndpointResolver { endpoint: ep, endpoints, identities, allow: BTreeMap::new(), deny: BTreeMap::new() };
        let mut policy = EndpointPolicy::default();
        for p in policies {
            for (rule_index, rule) in p.rules.iter().enumerate() {
                if !rule.subject.matches(&ep.labels) {
                    continue;
                }
                policy.ingress_enforced |= rule.enforce_ingress;
                policy.egress_enforced |= rule.enforce_egress;
                for direction in Direction::BOTH {
                    for (peer_rule_index, pr) in rule.peer_rules(direction).iter().enumerate() {
                        let origin = RuleOrigin {
                            kind: p.kind,
                            namespace: p.namespace.clone(),
                            name: p.name.clone(),
                            direction,
                            rule_index,
                            peer_rule_index,
                            path: pr.path.clone(),
                        };
                        r.add(direction, pr, &origin);
                    }
                }
            }
        }
        policy.entries = r.finish();
        state.endpoints.insert(ep.id, policy);
    }
    state
}

/// Accumulates the entries of one endpoint.
struct EndpointResolver<'a> {
    endpoint: &'a EndpointView,
    endpoints: &'a [EndpointView],
    identities: &'a IdentityAllocator,
    allow: BTreeMap<EntryKey, BTreeSet<RuleOrigin>>,
    deny: BTreeMap<EntryKey, BTreeSet<RuleOrigin>>,
}

impl EndpointResolver<'_> {
    fn add(&mut self, direction: Direction, pr: &PeerRule, origin: &RuleOrigin) {
        let peers = self.peer_identities(&pr.peers);
        let any_port = [PortRule { protocol: Protocol::Any, port: Port::Any }];
        let ports = if pr.ports.is_empty() { &any_port[..] } else { &pr.ports };
        let target = match pr.verdict {
            Verdict::Allow => &mut self.allow,
            Verdict::Deny => &mut self.deny,
        };
        for &identity in &peers {
            for port_rule in ports {
                for (protocol, port, port_prefix_len) in
                    l4_blocks(port_rule, direction, identity, self.endpoint, self.endpoints)
                {
                    let key = EntryKey { direction, identity, protocol, port, port_prefix_len };
                    target.entry(key).or_default().insert(origin.clone());
                }
            }
        }
    }

    fn peer_identities(&self, peers: &Peers) -> BTreeSet<u32> {
        let mut out = BTreeSet::new();
        match peers {
            Peers::Any => {
                out.insert(identity::ANY);
            }
            Peers::Only(list) => {
                for peer in list {
                    match peer {
                        Peer::Endpoints(sel) => out.extend(
                            self.identities
                                .iter()
                                .filter(|(_, labels, _)| endpoint_selectable(sel, labels) && sel.matches(labels))
                                .map(|(id, _, _)| id),
                        ),
                    }
                }
            }
        }
        out
    }

    /// The allow entries that no deny covers, and the deny entries.
    fn finish(self) -> BTreeMap<EntryKey, EntryValue> {
        let mut out: BTreeMap<EntryKey, EntryValue> = self
            .deny
            .iter()
            .map(|(k, origins)| {
                let value = EntryValue { deny: true, origins: origins.clone() };
                (*k, value)
            })
            .collect();
        for (key, origins) in self.allow {
            if !covered_by_deny(&key, &self.deny) {
                out.insert(key, EntryValue { deny: false, origins });
            }
        }
        out
    }
}

/// Whether a deny entry for the same identity or for any identity covers `key`.
fn covered_by_deny(key: &EntryKey, deny: &BTreeMap<EntryKey, BTreeSet<RuleOrigin>>) -> bool {
    let mut ids = vec![key.identity];
    if key.identity != identity::ANY {
        ids.push(identity::ANY);
    }
    ids.into_iter().any(|id| {
        let lo = EntryKey { direction: key.direction, identity: id, protocol: 0, port: 0, port_prefix_len: 0 };
        let hi = EntryKey { protocol: u8::MAX, port: u16::MAX, port_prefix_len: u8::MAX, ..lo };
        deny.range(lo..=hi).any(|(d, _)| key.l4_within(d))
    })
}

/// Endpoint selectors select identities of pods (those with `k8s:` labels); reserved
/// and CIDR identities only when the selector names a label of their source
/// (`reserved:host`), so `{}` never means "the world".
fn endpoint_selectable(sel: &EndpointSelector, labels: &LabelSet) -> bool {
    labels.has_source(source::K8S) || labels.iter().any(|l| sel.names_source(&l.source))
}

/// The (protocol, port, port prefix length) blocks of a port rule for one peer.
fn l4_blocks(
    rule: &PortRule,
    direction: Direction,
    peer: u32,
    endpoint: &EndpointView,
    endpoints: &[EndpointView],
) -> Vec<(u8, u16, u8)> {
    // The LPM key puts the protocol before the port, so "any protocol" with a port is
    // one entry per protocol that has ports.
    let protocols: &[Protocol] = match (&rule.protocol, &rule.port) {
        (Protocol::Any, Port::Any) => return vec![(0, 0, 0)],
        (Protocol::Any, _) => &Protocol::WITH_PORTS,
        (p, _) => std::slice::from_ref(p),
    };
    let mut out = Vec::new();
    for &protocol in protocols {
        let number = protocol.number();
        match &rule.port {
            Port::Any => out.push((number, 0, 0)),
            Port::Range { first, last } => {
                out.extend(range_to_prefixes(*first, *last).into_iter().map(|(p, l)| (number, p, l)));
            }
            Port::Named(name) => {
                for np in named_ports(name, direction, peer, endpoint, endpoints) {
                    if np.protocol == protocol {
                        out.push((number, np.port, 16));
                    }
                }
            }
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// Named ports resolve on the destination: the endpoint itself for ingress; for egress
/// the local endpoints with the peer's identity (any local endpoint for any peer).
/// Remote endpoints' named ports are not known here yet.
fn named_ports<'a>(
    name: &'a str,
    direction: Direction,
    peer: u32,
    endpoint: &'a EndpointView,
    endpoints: &'a [EndpointView],
) -> Vec<&'a NamedPort> {
    let destinations: Vec<&EndpointView> = match direction {
        Direction::Ingress => vec![endpoint],
        Direction::Egress => endpoints.iter().filter(|e| peer == identity::ANY || e.identity == peer).collect(),
    };
    destinations.into_iter().flat_map(|e| e.named_ports.iter()).filter(|np| np.name == name).collect()
}

#[cfg(test)]
mod tests;
