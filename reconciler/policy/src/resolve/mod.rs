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
use std::sync::Arc;

use serde::{Serialize, Serializer};

pub use crate::model::NamedPort;
pub use crate::ports::range_to_prefixes;
pub use engine::{ADDRESS_IDENTITY_BASE, Changes, Options, PolicyResolver};

mod engine;

use crate::cidr::CidrIdentities;
use crate::identity::{self, IdentityAllocator};
use crate::labels::{LabelSet, source};
use crate::model::{Direction, PeerRule, Policy, PolicyKind, Port, PortRule, Protocol};
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
    /// Shared per endpoint, so that a copy of the state costs one reference per endpoint
    /// and an update copies only the endpoints it changes.
    #[serde(serialize_with = "endpoints_by_id")]
    pub endpoints: BTreeMap<u16, Arc<EndpointPolicy>>,
    /// Prefix -> CIDR identity, for the ipcache. Endpoint addresses (and reserved
    /// entries such as node addresses) must win over these for the same prefix.
    #[serde(skip_serializing_if = "BTreeMap::is_empty", serialize_with = "prefixes_by_text")]
    pub cidr_ipcache: BTreeMap<(IpAddr, u8), u32>,
    /// The labels of every CIDR identity (`cidr:10.0.0.0/8`, `reserved:world`, ...).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub cidr_identities: BTreeMap<u32, LabelSet>,
    /// Pod address (host prefix) -> its address identity: for the pod addresses inside
    /// some Kubernetes NetworkPolicy ipBlock (see [`PolicyResolver`]). These win over the
    /// pod's own identity for that address.
    #[serde(skip_serializing_if = "BTreeMap::is_empty", serialize_with = "prefixes_by_text")]
    pub address_ipcache: BTreeMap<(IpAddr, u8), u32>,
    /// The labels of every address identity (the pod's labels and `ipblock:` labels).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub address_identities: BTreeMap<u32, LabelSet>,
}

fn endpoints_by_id<S: Serializer>(map: &BTreeMap<u16, Arc<EndpointPolicy>>, s: S) -> Result<S::Ok, S::Error> {
    s.collect_map(map.iter().map(|(id, p)| (id, p.as_ref())))
}

fn origins_as_set<S: Serializer>(set: &Arc<BTreeSet<RuleOrigin>>, s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(set.iter())
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
    /// Shared: entries produced by the same rules hold the same set.
    #[serde(serialize_with = "origins_as_set")]
    pub origins: Arc<BTreeSet<RuleOrigin>>,
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
/// these policies (in prefix order). No pod addresses are known, so ipBlocks select no
/// pods (see [`PolicyResolver`] for that). An agent that keeps running holds a
/// [`PolicyResolver`] instead, so that numbers stay put and identity changes are
/// incremental.
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
    resolve_full(policies, endpoints, identities, cidrs, &BTreeMap::new())
}

/// Resolves every endpoint's desired policy, with the addresses of pods (local and
/// remote: address -> the pod's identity), so that Kubernetes NetworkPolicy ipBlocks
/// select the pod addresses inside them (through address identities, see
/// [`PolicyResolver`]).
pub fn resolve_full(
    policies: &[Policy],
    endpoints: &[EndpointView],
    identities: &IdentityAllocator,
    cidrs: &CidrIdentities,
    addresses: &BTreeMap<IpAddr, u32>,
) -> DesiredState {
    let mut r = PolicyResolver::new(Options::default());
    r.set_policies(Arc::new(policies.to_vec()));
    r.set_cidr_identities(cidrs.clone());
    r.set_endpoints(endpoints.to_vec());
    r.set_identities(Arc::new(identities.clone()), addresses.clone());
    r.resolve().clone()
}

/// A direction with deny rules but no default deny (`enableDefaultDeny: false`): deny
/// rules still apply, everything else passes. The datapath only looks policy up on
/// enforced directions, so enforce it with an allow for every peer beside the denies
/// (which win over it, as over every allow).
fn open_directions_without_default_deny(policy: &mut EndpointPolicy) {
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
}

/// The node itself may always reach its pods (kubelet probes), as Cilium's default
/// `allow-localhost` does: an ingress-enforced endpoint gets an allow for the host
/// identity, any protocol and port, with no rule behind it. A deny for the host (or for any
/// peer) on some port still wins there, as for every allow.
pub fn allow_localhost(policy: &mut EndpointPolicy) {
    if policy.ingress_enforced {
        let key = EntryKey {
            direction: Direction::Ingress,
            identity: identity::HOST,
            protocol: 0,
            port: 0,
            port_prefix_len: 0,
        };
        policy.entries.entry(key).or_default();
    }
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
    endpoint: Option<&EndpointView>,
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
    endpoint: Option<&'a EndpointView>,
    endpoints: &'a [EndpointView],
) -> Vec<&'a NamedPort> {
    let destinations: Vec<&EndpointView> = match direction {
        Direction::Ingress => endpoint.into_iter().collect(),
        Direction::Egress => endpoints.iter().filter(|e| peer == identity::ANY || e.identity == peer).collect(),
    };
    destinations.into_iter().flat_map(|e| e.named_ports.iter()).filter(|np| np.name == name).collect()
}

#[cfg(test)]
mod tests;
