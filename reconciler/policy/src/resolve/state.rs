//! What resolution produces: the desired policy of every endpoint ([`DesiredState`],
//! [`EndpointPolicy`]), its entries ([`EntryKey`], [`EntryValue`]) and the rules behind
//! them ([`RuleOrigin`]). Plain values, serialisable for snapshots and the API; nothing
//! here knows BPF (the map writer encodes them).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use serde::{Serialize, Serializer};

use crate::identity;
use crate::labels::LabelSet;
use crate::model::{Direction, PeerRule, Policy, PolicyKind, TierPlace};
use crate::ports::{block_contains, block_last};

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
    /// Audit mode: what the enforced and the audited policies together would enforce (the
    /// endpoint's audit view), when that differs from what is enforced. Never enforced:
    /// the datapath looks a packet the enforced entries let through up here too, and
    /// reports an audit hit when this view would drop it.
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "audit_view")]
    pub audit: Option<Arc<EndpointPolicy>>,
}

#[expect(clippy::ref_option, reason = "the signature serde's `serialize_with` calls")]
fn audit_view<S: Serializer>(view: &Option<Arc<EndpointPolicy>>, s: S) -> Result<S::Ok, S::Error> {
    match view {
        Some(v) => s.serialize_some(v.as_ref()),
        None => s.serialize_none(),
    }
}

impl EndpointPolicy {
    /// Whether `direction` is enforced.
    pub fn enforced(&self, direction: Direction) -> bool {
        match direction {
            Direction::Ingress => self.ingress_enforced,
            Direction::Egress => self.egress_enforced,
        }
    }

    /// Whether `self` and `other` enforce `direction` alike (enforcement and entries;
    /// audit views are not compared).
    pub fn same_in(&self, other: &EndpointPolicy, direction: Direction) -> bool {
        self.enforced(direction) == other.enforced(direction)
            && self
                .entries
                .iter()
                .filter(|(k, _)| k.direction == direction)
                .eq(other.entries.iter().filter(|(k, _)| k.direction == direction))
    }

    /// The directions in which the audit view differs from what is enforced (the ones
    /// the datapath must look up in the audit view).
    pub fn audited_directions(&self) -> impl Iterator<Item = Direction> + '_ {
        Direction::BOTH.into_iter().filter(|d| self.audit.as_ref().is_some_and(|a| !a.same_in(self, *d)))
    }
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
    pub(super) fn l4_within(&self, other: &EntryKey) -> bool {
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
    /// The tier and priority of a ClusterNetworkPolicy (or v1alpha1 admin policy) rule;
    /// `None` in the NetworkPolicy tier.
    pub tier: Option<TierPlace>,
}

impl fmt::Display for RuleOrigin {
    /// `CiliumNetworkPolicy default/web spec.ingress[1]`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ", self.kind)?;
        if let Some(ns) = &self.namespace {
            write!(f, "{ns}/")?;
        }
        write!(f, "{} {}", self.name, self.path)?;
        if let Some(place) = &self.tier {
            write!(f, " ({} tier, priority {})", place.tier, place.priority)?;
        }
        Ok(())
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
