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
//!
//! [`state`] holds what resolution produces, [`engine`] the resolver that keeps it
//! current; this file the entry points and what both share (ports, selectability).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

pub use crate::model::NamedPort;
pub use crate::ports::range_to_prefixes;
pub use engine::{ADDRESS_IDENTITY_BASE, Changes, Options, PolicyResolver};

mod engine;
mod state;

pub use state::{DesiredState, EndpointPolicy, EntryKey, EntryValue, RuleOrigin};

use crate::cidr::CidrIdentities;
use crate::identity::{self, IdentityAllocator};
use crate::labels::{LabelSet, source};
use crate::model::{Direction, Policy, Port, PortRule, Protocol};
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
    resolve_on_node(policies, endpoints, identities, cidrs, addresses, &BTreeMap::new())
}

/// [`resolve_full`] on a node of a cluster: `remote_named_ports` are the other nodes'
/// pods' named ports by identity, on which egress named ports resolve too.
pub fn resolve_on_node(
    policies: &[Policy],
    endpoints: &[EndpointView],
    identities: &IdentityAllocator,
    cidrs: &CidrIdentities,
    addresses: &BTreeMap<IpAddr, u32>,
    remote_named_ports: &BTreeMap<u32, Vec<NamedPort>>,
) -> DesiredState {
    let mut r = PolicyResolver::new(Options::default());
    r.set_policies(Arc::new(policies.to_vec()));
    r.set_cidr_identities(cidrs.clone());
    r.set_endpoints(endpoints.to_vec());
    r.set_identities(Arc::new(identities.clone()), addresses.clone());
    r.set_remote_named_ports(remote_named_ports.clone());
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

/// Whether an endpoint is in audit mode by its labels: the label
/// [`AUDIT_ANNOTATION`](crate::model::AUDIT_ANNOTATION)`=true` on its pod, or on its
/// namespace (`k8s:io.cilium.k8s.namespace.labels.palisade.io/audit=true`).
pub fn endpoint_audited(labels: &LabelSet) -> bool {
    let key = crate::model::AUDIT_ANNOTATION;
    let on = |k: &str| labels.get(k).is_some_and(|l| l.source == source::K8S && l.value == "true");
    on(key) || on(&format!("{}{key}", crate::labels::keys::NAMESPACE_LABELS_PREFIX))
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
    names: PortNames,
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
                for np in named_ports(name, direction, peer, endpoint, names) {
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
/// the endpoints with the peer's identity (any endpoint for any peer): the local ones and
/// the other nodes' pods (`remote`: their named ports by identity).
fn named_ports<'a>(
    name: &'a str,
    direction: Direction,
    peer: u32,
    endpoint: Option<&'a EndpointView>,
    ports: PortNames<'a>,
) -> Vec<&'a NamedPort> {
    match direction {
        Direction::Ingress => {
            endpoint.into_iter().flat_map(|e| e.named_ports.iter()).filter(|np| np.name == name).collect()
        }
        Direction::Egress => {
            let local = ports
                .local
                .iter()
                .filter(|e| peer == identity::ANY || e.identity == peer)
                .flat_map(|e| e.named_ports.iter());
            let remote =
                ports.remote.iter().filter(|(id, _)| peer == identity::ANY || **id == peer).flat_map(|(_, p)| p.iter());
            local.chain(remote).filter(|np| np.name == name).collect()
        }
    }
}

/// Where named ports of egress destinations are looked up: the local endpoints and the
/// other nodes' pods (named ports by identity).
#[derive(Clone, Copy, Debug)]
pub(crate) struct PortNames<'a> {
    pub local: &'a [EndpointView],
    pub remote: &'a BTreeMap<u32, Vec<NamedPort>>,
}

impl PortNames<'_> {
    /// No endpoints: rules without named ports need none.
    pub fn none() -> PortNames<'static> {
        static EMPTY: BTreeMap<u32, Vec<NamedPort>> = BTreeMap::new();
        PortNames { local: &[], remote: &EMPTY }
    }
}

#[cfg(test)]
mod tests;
