//! The one internal rule model every policy kind translates into.
//!
//! A [`Policy`] is one accepted manifest. It holds [`Rule`]s (one per Cilium spec): a
//! subject selector, whether the rule enforces default deny per direction, and the
//! [`PeerRule`]s per direction (allow and deny, each with its peers and ports). Selectors
//! here are final: namespace scoping was applied during translation, so the resolver
//! needs no knowledge of the policy kind.

use std::fmt;

use serde::Serialize;

use crate::cidr::CidrBlock;
use crate::selector::EndpointSelector;

/// Which kind of manifest a policy came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum PolicyKind {
    CiliumNetworkPolicy,
    CiliumClusterwideNetworkPolicy,
    NetworkPolicy,
    /// `policy.networking.k8s.io/v1alpha2` ClusterNetworkPolicy (Admin or Baseline tier).
    ClusterNetworkPolicy,
    /// `policy.networking.k8s.io/v1alpha1` AdminNetworkPolicy: the Admin tier.
    AdminNetworkPolicy,
    /// `policy.networking.k8s.io/v1alpha1` BaselineAdminNetworkPolicy: the Baseline tier.
    BaselineAdminNetworkPolicy,
}

impl PolicyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyKind::CiliumNetworkPolicy => "CiliumNetworkPolicy",
            PolicyKind::CiliumClusterwideNetworkPolicy => "CiliumClusterwideNetworkPolicy",
            PolicyKind::NetworkPolicy => "NetworkPolicy",
            PolicyKind::ClusterNetworkPolicy => "ClusterNetworkPolicy",
            PolicyKind::AdminNetworkPolicy => "AdminNetworkPolicy",
            PolicyKind::BaselineAdminNetworkPolicy => "BaselineAdminNetworkPolicy",
        }
    }

    /// Whether policies of this kind live in a namespace.
    pub fn is_namespaced(self) -> bool {
        matches!(self, PolicyKind::CiliumNetworkPolicy | PolicyKind::NetworkPolicy)
    }

    /// The kinds of the Admin and Baseline tiers (the others are the NetworkPolicy tier).
    pub fn is_tiered(self) -> bool {
        matches!(
            self,
            PolicyKind::ClusterNetworkPolicy | PolicyKind::AdminNetworkPolicy | PolicyKind::BaselineAdminNetworkPolicy
        )
    }
}

impl fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Traffic direction, from the selected endpoint's point of view.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Direction {
    /// Traffic the endpoint receives.
    Ingress,
    /// Traffic the endpoint sends.
    Egress,
}

impl Direction {
    pub const BOTH: [Direction; 2] = [Direction::Ingress, Direction::Egress];
}

/// An L4 protocol in a port rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Protocol {
    /// Every protocol (Cilium's `ANY`; a port with it means TCP, UDP and SCTP).
    Any,
    Tcp,
    Udp,
    Sctp,
    Icmp,
    IcmpV6,
}

impl Protocol {
    /// The IP protocol number (0 for any).
    pub fn number(self) -> u8 {
        match self {
            Protocol::Any => 0,
            Protocol::Icmp => 1,
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::IcmpV6 => 58,
            Protocol::Sctp => 132,
        }
    }

    /// The protocols that have ports.
    pub const WITH_PORTS: [Protocol; 3] = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp];
}

/// The tiers of ClusterNetworkPolicy, in evaluation order. The NetworkPolicy tier
/// (Kubernetes NetworkPolicy, CNP, CCNP) sits between them and has no value here: a
/// policy of it has [`Policy::tier`] `None`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Tier {
    /// Before the NetworkPolicy tier: Accept and Deny are final, Pass hands on.
    Admin,
    /// After the NetworkPolicy tier, only for pods that no policy of it selects.
    Baseline,
}

impl Tier {
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Admin => "Admin",
            Tier::Baseline => "Baseline",
        }
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a tiered policy stands: its tier and its priority in it (0..=1000, lower first).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct TierPlace {
    pub tier: Tier,
    pub priority: u32,
}

/// An accepted policy manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Policy {
    pub kind: PolicyKind,
    /// Admin or Baseline tier (ClusterNetworkPolicy and the v1alpha1 kinds); `None`: the
    /// NetworkPolicy tier. The rules of a tiered policy never put an endpoint under
    /// default deny; their peer rules are ordered (first match decides, see
    /// [`crate::tiers`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tier: Option<TierPlace>,
    /// `None` for clusterwide policies.
    pub namespace: Option<String>,
    pub name: String,
    /// Where it came from (file path, `kube`, `api`...), for messages.
    pub source: String,
    pub rules: Vec<Rule>,
    /// Accepted-but-noteworthy things (unenforced L7 parts, ignored fields...).
    pub warnings: Vec<String>,
    /// In audit mode (annotation [`AUDIT_ANNOTATION`]`: "true"`): resolved as if enforced,
    /// but only reported on (AUDIT flows), never enforced.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub audit: bool,
}

/// The annotation that puts a policy (of any kind) into audit mode: `"true"` or `"false"`.
/// As a label (`palisade.io/audit=true`) on a pod or a namespace it puts every pod of that
/// scope into audit mode (see the agent's endpoint audit).
pub const AUDIT_ANNOTATION: &str = "palisade.io/audit";

impl Policy {
    /// `kind namespace/name` or `kind name`, for messages.
    pub fn display_name(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("{} {ns}/{}", self.kind, self.name),
            None => format!("{} {}", self.kind, self.name),
        }
    }
}

/// One rule: which endpoints it applies to, and what it allows or denies them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Rule {
    /// Where the rule is in the manifest (`spec`, `specs[1]`).
    pub path: String,
    /// The endpoints the rule applies to (already scoped to the policy's namespace).
    pub subject: EndpointSelector,
    /// Whether selected endpoints become default-deny for ingress.
    pub enforce_ingress: bool,
    /// Whether selected endpoints become default-deny for egress.
    pub enforce_egress: bool,
    pub ingress: Vec<PeerRule>,
    pub egress: Vec<PeerRule>,
}

impl Rule {
    pub fn enforces(&self, direction: Direction) -> bool {
        match direction {
            Direction::Ingress => self.enforce_ingress,
            Direction::Egress => self.enforce_egress,
        }
    }

    pub fn peer_rules(&self, direction: Direction) -> &[PeerRule] {
        match direction {
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        }
    }
}

/// Allow or deny; Pass only in the Admin tier (hands the decision to the next tier).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Verdict {
    /// Allow (ClusterNetworkPolicy's Accept).
    Allow,
    Deny,
    /// ClusterNetworkPolicy's Pass: the rest of the tier is skipped.
    Pass,
}

/// One item of `ingress`, `egress`, `ingressDeny` or `egressDeny`: traffic with these
/// peers on these ports.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PeerRule {
    /// Where the item is in the manifest (`spec.ingress[0]`).
    pub path: String,
    pub verdict: Verdict,
    pub peers: Peers,
    /// Empty: every protocol and port.
    pub ports: Vec<PortRule>,
    /// Cilium's `fromRequires` / `toRequires` (already namespace-scoped). They grant
    /// nothing here: for an endpoint this rule selects, every [`Peer::Endpoints`] selector
    /// of the same direction and verdict, in any rule selecting the endpoint, must also
    /// match all of them.
    pub requires: Vec<EndpointSelector>,
}

/// Which peers a peer rule is about.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum Peers {
    /// Every peer, whatever its identity (a rule with ports but no L3 part, a
    /// NetworkPolicy rule without `from` / `to`).
    Any,
    /// The union of these; empty = no peer at all (a CNP's `{}` rule).
    Only(Vec<Peer>),
}

impl Peers {
    /// The peers listed (none for [`Peers::Any`]).
    pub fn list(&self) -> &[Peer] {
        match self {
            Peers::Any => &[],
            Peers::Only(list) => list,
        }
    }
}

/// One way of naming peers.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum Peer {
    /// Endpoints whose identity's labels match (final, already namespace-scoped).
    Endpoints(EndpointSelector),
    /// A Cilium entity.
    Entity(Entity),
    /// Cilium's `fromCIDR` / `fromCIDRSet`: the CIDR identities of the prefixes inside
    /// the block (never pods: their addresses are more specific ipcache entries).
    Cidr(CidrBlock),
    /// A NetworkPolicy `ipBlock`: what [`Peer::Cidr`] selects, and also the pod addresses
    /// inside the block, address by address (their address identities carry its
    /// `ipblock:` label, see [`crate::resolve::PolicyResolver`]).
    IpBlock(CidrBlock),
}

/// Cilium's entities: named groups of peers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Entity {
    /// Every peer (identity 0).
    All,
    /// Everything outside the cluster: the world identities and every CIDR identity.
    World,
    WorldIpv4,
    WorldIpv6,
    /// Every endpoint of the cluster, and host, remote-node, init, health, unmanaged,
    /// kube-apiserver and ingress.
    Cluster,
    Host,
    RemoteNode,
    KubeApiserver,
    Health,
    Init,
    Unmanaged,
    Ingress,
    /// No peer.
    None,
}

impl Entity {
    pub const ALL: [Entity; 13] = [
        Entity::All,
        Entity::World,
        Entity::WorldIpv4,
        Entity::WorldIpv6,
        Entity::Cluster,
        Entity::Host,
        Entity::RemoteNode,
        Entity::KubeApiserver,
        Entity::Health,
        Entity::Init,
        Entity::Unmanaged,
        Entity::Ingress,
        Entity::None,
    ];

    /// The name as policies write it.
    pub fn as_str(self) -> &'static str {
        match self {
            Entity::All => "all",
            Entity::World => "world",
            Entity::WorldIpv4 => "world-ipv4",
            Entity::WorldIpv6 => "world-ipv6",
            Entity::Cluster => "cluster",
            Entity::Host => "host",
            Entity::RemoteNode => "remote-node",
            Entity::KubeApiserver => "kube-apiserver",
            Entity::Health => "health",
            Entity::Init => "init",
            Entity::Unmanaged => "unmanaged",
            Entity::Ingress => "ingress",
            Entity::None => "none",
        }
    }

    pub fn parse(name: &str) -> Option<Entity> {
        Entity::ALL.into_iter().find(|e| e.as_str() == name)
    }
}

impl fmt::Display for Entity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Entity {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// A protocol and port (range) a peer rule applies to.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct PortRule {
    pub protocol: Protocol,
    pub port: Port,
}

/// A destination port specification.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum Port {
    /// Every port.
    Any,
    /// `first..=last` (one port: `first == last`).
    Range { first: u16, last: u16 },
    /// A container port name, resolved on the destination endpoint.
    Named(String),
}

/// A container port of an endpoint (an empty name: the port has none and no named-port
/// rule refers to it).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct NamedPort {
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
}

impl NamedPort {
    /// Checks a container port as a pod spec gives it: a port name (or empty), a port
    /// from 1 to 65535 and protocol TCP, UDP or SCTP. The error says what is wrong.
    pub fn new(name: &str, port: u16, protocol: &str) -> Result<NamedPort, String> {
        if !name.is_empty() && !is_port_name(name) {
            return Err(format!(
                "port name {name:?} is not valid: use lower case letters, digits and '-', \
                 at most 15 characters, with at least one letter"
            ));
        }
        if port == 0 {
            return Err(format!("port {name:?} has number 0; give a port from 1 to 65535"));
        }
        let protocol = match protocol.to_ascii_uppercase().as_str() {
            "TCP" | "" => Protocol::Tcp,
            "UDP" => Protocol::Udp,
            "SCTP" => Protocol::Sctp,
            _ => return Err(format!("port {port} has protocol {protocol:?}; use TCP, UDP or SCTP")),
        };
        Ok(NamedPort { name: name.to_owned(), port, protocol })
    }
}

/// Whether `s` is a valid port name (an IANA service name, as Kubernetes requires): at
/// most 15 characters, lower case letters, digits and '-', at least one letter, no
/// leading, trailing or double '-'.
pub fn is_port_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.bytes().any(|b| b.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_ports_are_checked() {
        assert_eq!(
            NamedPort::new("http", 8080, "TCP"),
            Ok(NamedPort { name: "http".into(), port: 8080, protocol: Protocol::Tcp })
        );
        assert_eq!(NamedPort::new("", 53, "udp").map(|p| p.protocol), Ok(Protocol::Udp), "unnamed is fine");
        assert!(NamedPort::new("Http", 80, "TCP").is_err());
        assert!(NamedPort::new("web", 0, "TCP").is_err());
        assert!(NamedPort::new("web", 80, "ICMP").is_err());
    }

    #[test]
    fn port_names() {
        for ok in ["http", "http-alt", "80a", "a", "abcdefghijklmno"] {
            assert!(is_port_name(ok), "{ok}");
        }
        for bad in ["", "80", "-a", "a-", "a--b", "A", "a_b", "abcdefghijklmnop"] {
            assert!(!is_port_name(bad), "{bad}");
        }
    }
}
