//! Policies x endpoints x identities -> the desired policy entries of every endpoint.
//!
//! For each endpoint: the rules whose subject selects it decide whether it is enforced per
//! direction, and each of their peer rules turns into entries (peer identity, protocol,
//! port block). Allows are a union; a deny wins: an allow entry that a deny entry for the
//! same identity or for any identity covers is dropped, so that a longest-prefix lookup can
//! never find a more specific allow under a broader deny. The result knows nothing of BPF;
//! the map writer encodes it.
//!
//! Peers are identities: those of the allocator (reserved ones and label sets) and the
//! node-local CIDR identities of the prefixes policies name ([`CidrIdentities`]), which
//! the result also lists so that the agent can put them into the ipcache.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use serde::{Serialize, Serializer};

pub use crate::model::NamedPort;
pub use crate::ports::range_to_prefixes;

use crate::cidr::{CidrBlock, CidrIdentities, IPBLOCK_SOURCE};
use crate::identity::{self, IdentityAllocator};
use crate::labels::{LabelSet, source};
use crate::model::{
    Direction, Entity, Peer, PeerRule, Peers, Policy, PolicyKind, Port, PortRule, Protocol, Rule, Verdict,
};
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

/// The desired policy of every endpoint, by endpoint id, and the CIDR identities the
/// entries may name.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DesiredState {
    pub endpoints: BTreeMap<u16, EndpointPolicy>,
    /// Prefix -> CIDR identity, for the ipcache. Endpoint addresses (and reserved
    /// entries such as node addresses) must win over these for the same prefix.
    #[serde(skip_serializing_if = "BTreeMap::is_empty", serialize_with = "prefixes_by_text")]
    pub cidr_ipcache: BTreeMap<(IpAddr, u8), u32>,
    /// The labels of every CIDR identity (`cidr:10.0.0.0/8`, `reserved:world`, ...).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub cidr_identities: BTreeMap<u32, LabelSet>,
}

fn prefixes_by_text<S: Serializer>(map: &BTreeMap<(IpAddr, u8), u32>, s: S) -> Result<S::Ok, S::Error> {
    s.collect_map(map.iter().map(|((addr, len), id)| (format!("{addr}/{len}"), id)))
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

/// Resolves every endpoint's desired policy, with CIDR identities numbered afresh for
/// these policies (in prefix order). An agent that keeps running should hold a
/// [`CidrIdentities`], [`CidrIdentities::sync`] it when policies change and call
/// [`resolve_with_cidrs`], so that numbers stay put while their prefix is in use.
pub fn resolve(policies: &[Policy], endpoints: &[EndpointView], identities: &IdentityAllocator) -> DesiredState {
    resolve_with_cidrs(policies, endpoints, identities, &CidrIdentities::for_policies(policies))
}

/// Resolves every endpoint's desired policy. `cidrs` should hold the prefixes these
/// policies name (see [`CidrIdentities::sync`]); a prefix without an identity selects
/// nothing.
pub fn resolve_with_cidrs(
    policies: &[Policy],
    endpoints: &[EndpointView],
    identities: &IdentityAllocator,
    cidrs: &CidrIdentities,
) -> DesiredState {
    let universe = Universe { identities, cidrs, cidr_labels: cidrs.labels() };
    let mut state = DesiredState {
        endpoints: BTreeMap::new(),
        cidr_ipcache: cidrs.ipcache(),
        cidr_identities: universe.cidr_labels.clone(),
    };
    for ep in endpoints {
        let selecting: Vec<(&Policy, usize, &Rule)> = policies
            .iter()
            .flat_map(|p| p.rules.iter().enumerate().map(move |(i, r)| (p, i, r)))
            .filter(|(_, _, rule)| rule.subject.matches(&ep.labels))
            .collect();
        let mut requires: BTreeMap<(Direction, Verdict), Vec<&EndpointSelector>> = BTreeMap::new();
        for (_, _, rule) in &selecting {
            for direction in Direction::BOTH {
                for pr in rule.peer_rules(direction) {
                    requires.entry((direction, pr.verdict)).or_default().extend(pr.requires.iter());
                }
            }
        }
        let mut r = EndpointResolver {
            endpoint: ep,
            endpoints,
            universe: &universe,
            requires,
            allow: BTreeMap::new(),
            deny: BTreeMap::new(),
        };
        let mut policy = EndpointPolicy::default();
        for (p, rule_index, rule) in selecting {
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
        policy.entries = r.finish();
        // A direction with deny rules but no default deny (`enableDefaultDeny: false`):
        // deny rules still apply, everything else passes. The datapath only looks policy up
        // on enforced directions, so enforce it with an allow for every peer beside the
        // denies (which win over it, as over every allow).
        for direction in Direction::BOTH {
            let enforced = match direction {
                Direction::Ingress => &mut policy.ingress_enforced,
                Direction::Egress => &mut policy.egress_enforced,
            };
            if !*enforced && policy.entries.iter().any(|(k, v)| k.direction == direction && v.deny) {
                *enforced = true;
                policy.entries.retain(|k, v| k.direction != direction || v.deny);
                let all = EntryKey { direction, identity: identity::ANY, protocol: 0, port: 0, port_prefix_len: 0 };
                policy.entries.entry(all).or_default();
            }
        }
        state.endpoints.insert(ep.id, policy);
    }
    state
}

/// Every identity a peer can have.
struct Universe<'a> {
    identities: &'a IdentityAllocator,
    cidrs: &'a CidrIdentities,
    cidr_labels: BTreeMap<u32, LabelSet>,
}

impl Universe<'_> {
    fn iter(&self) -> impl Iterator<Item = (u32, &LabelSet)> {
        self.identities
            .iter()
            .map(|(id, labels, _)| (id, labels))
            .chain(self.cidr_labels.iter().map(|(id, l)| (*id, l)))
    }

    /// The identities with the label `reserved:<name>`.
    fn reserved(&self, name: &str) -> impl Iterator<Item = u32> {
        self.iter().filter(move |(_, l)| l.get(name).is_some_and(|l| l.source == source::RESERVED)).map(|(id, _)| id)
    }

    fn entity(&self, entity: Entity) -> BTreeSet<u32> {
        match entity {
            Entity::All => BTreeSet::from([identity::ANY]),
            Entity::None => BTreeSet::new(),
            Entity::Cluster => {
                let mut out: BTreeSet<u32> =
                    self.iter().filter(|(_, l)| l.has_source(source::K8S)).map(|(id, _)| id).collect();
                for e in [
                    Entity::Host,
                    Entity::RemoteNode,
                    Entity::Init,
                    Entity::Health,
                    Entity::Unmanaged,
                    Entity::KubeApiserver,
                    Entity::Ingress,
                ] {
                    out.extend(self.reserved(e.as_str()));
                }
                out
            }
            named => self.reserved(named.as_str()).collect(),
        }
    }

    /// The CIDR identities of the prefixes inside the block, and for `0.0.0.0/0` or
    /// `::/0` the world identities of that family (the identities of addresses no named
    /// prefix covers).
    fn cidr(&self, block: &CidrBlock) -> BTreeSet<u32> {
        let mut out: BTreeSet<u32> = self.cidrs.iter().filter(|(p, _)| block.covers(p)).map(|(_, id)| id).collect();
        if block.cidr.is_everything() {
            out.insert(identity::WORLD);
            out.insert(if block.cidr.is_ipv4() { identity::WORLD_IPV4 } else { identity::WORLD_IPV6 });
        }
        out
    }

    /// The pod identities that carry the block's `ipblock:` label.
    fn ipblock_members(&self, block: &CidrBlock) -> impl Iterator<Item = u32> {
        let key = block.label_key();
        self.iter().filter(move |(_, l)| l.get(&key).is_some_and(|l| l.source == IPBLOCK_SOURCE)).map(|(id, _)| id)
    }
}

/// Accumulates the entries of one endpoint.
struct EndpointResolver<'a> {
    endpoint: &'a EndpointView,
    endpoints: &'a [EndpointView],
    universe: &'a Universe<'a>,
    /// The `fromRequires` / `toRequires` of every rule selecting the endpoint.
    requires: BTreeMap<(Direction, Verdict), Vec<&'a EndpointSelector>>,
    allow: BTreeMap<EntryKey, BTreeSet<RuleOrigin>>,
    deny: BTreeMap<EntryKey, BTreeSet<RuleOrigin>>,
}

impl EndpointResolver<'_> {
    fn add(&mut self, direction: Direction, pr: &PeerRule, origin: &RuleOrigin) {
        let peers = self.peer_identities(direction, pr);
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

    fn peer_identities(&self, direction: Direction, pr: &PeerRule) -> BTreeSet<u32> {
        let list = match &pr.peers {
            Peers::Any => return BTreeSet::from([identity::ANY]),
            Peers::Only(list) => list,
        };
        let requires = self.requires.get(&(direction, pr.verdict)).map(Vec::as_slice).unwrap_or_default();
        let mut out = BTreeSet::new();
        for peer in list {
            match peer {
                Peer::Endpoints(sel) => out.extend(
                    self.universe
                        .iter()
                        .filter(|(_, labels)| {
                            endpoint_selectable(sel, labels)
                                && sel.matches(labels)
                                && requires.iter().all(|r| r.matches(labels))
                        })
                        .map(|(id, _)| id),
                ),
                Peer::Entity(entity) => out.extend(self.universe.entity(*entity)),
                Peer::Cidr(block) => out.extend(self.universe.cidr(block)),
                Peer::IpBlock(block) => {
                    out.extend(self.universe.cidr(block));
                    out.extend(self.universe.ipblock_members(block));
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
