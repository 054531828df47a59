//! The tier model, packet by packet: what ClusterNetworkPolicy's evaluation order says for
//! one flow, straight from the policies (no resolution, no entries).
//!
//! Per direction of the selected pod: the Admin tier's rules by priority (lower first),
//! then rule order, the first that matches decides (Accept, Deny) or hands on (Pass, which
//! skips the rest of the Admin tier); then the NetworkPolicy tier (Kubernetes
//! NetworkPolicy, CNP, CCNP), which decides for every pod it selects (enforces) in that
//! direction; then, only for the pods it does not select, the Baseline tier's rules in
//! order; then allow. Being the subject of a tiered policy isolates nothing.
//!
//! `policy explain` shows this trace next to the entries' decision, and the resolver's
//! tests compare it with the flattened entries packet by packet
//! (`tests/tiers_oracle.rs`). Policies of one priority are ordered by kind and name.

use serde::Serialize;

use crate::cidr::{CidrBlock, IPBLOCK_SOURCE, Prefix};
use crate::labels::{LabelSet, source};
use crate::model::{Direction, Entity, Peer, Policy, Port, Protocol, Tier, TierPlace, Verdict};
use crate::resolve::{EndpointView, NamedPort};

/// A tiered rule that matched the flow.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TierRule {
    /// `ClusterNetworkPolicy web-guard`.
    pub policy: String,
    pub tier: Tier,
    pub priority: u32,
    /// Where the rule is in the manifest (`spec.ingress[1]`).
    pub path: String,
    /// What the rule does (Accept is [`Verdict::Allow`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verdict: Option<Verdict>,
}

/// Which tier decided, and how.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "tier", rename_all = "kebab-case")]
pub enum TierDecision {
    /// An Admin tier rule accepted or denied.
    Admin { rule: TierRule, allowed: bool },
    /// The NetworkPolicy tier selects the pod in this direction: its verdict decides.
    NetworkPolicy,
    /// A Baseline tier rule accepted or denied.
    Baseline { rule: TierRule, allowed: bool },
    /// No tier decided: allowed.
    Default,
}

/// The evaluation of one flow on one side.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Trace {
    /// Admin tier rules that matched with Pass, in order (at most one: Pass ends the tier).
    pub passes: Vec<TierRule>,
    pub decision: TierDecision,
}

/// The peer of a flow as the tier rules see it: its identity's labels (pod labels,
/// `reserved:` labels of node identities, `cidr:` labels of CIDR identities, `ipblock:`
/// labels of address identities) and, for egress named ports, the identity number.
#[derive(Clone, Copy, Debug)]
pub struct PeerView<'a> {
    pub identity: u32,
    pub labels: &'a LabelSet,
}

fn peer_matches(peer: &Peer, p: &PeerView) -> bool {
    match peer {
        Peer::Endpoints(sel) => p.labels.has_source(source::K8S) && sel.matches(p.labels),
        Peer::Entity(Entity::All) => true,
        Peer::Entity(Entity::None) => false,
        Peer::Entity(e) => p.labels.get(e.as_str()).is_some_and(|l| l.source == source::RESERVED),
        Peer::Cidr(block) => cidr_identity_in(block, p.labels),
        Peer::IpBlock(block) => {
            cidr_identity_in(block, p.labels)
                || p.labels.get(&block.label_key()).is_some_and(|l| l.source == IPBLOCK_SOURCE)
        }
    }
}

/// Whether the labels are those of a CIDR identity whose prefix is inside the block (or
/// of a world identity of the block's family for `0.0.0.0/0` and `::/0`).
fn cidr_identity_in(block: &CidrBlock, labels: &LabelSet) -> bool {
    let cidr = labels.iter().find(|l| l.source == source::CIDR).and_then(|l| Prefix::parse(&l.key).ok());
    if let Some((p, _)) = cidr {
        return block.covers(&p);
    }
    let family = if block.cidr.is_ipv4() { "world-ipv4" } else { "world-ipv6" };
    block.cidr.is_everything()
        && !labels.has_source(source::K8S)
        && (labels.get(family).is_some_and(|l| l.source == source::RESERVED)
            || (labels.get("world").is_some_and(|l| l.source == source::RESERVED) && labels.iter().count() == 1))
}

/// Whether a port rule matches (protocol, port) on the destination. Named ports resolve on
/// the destination pod: `endpoint` for ingress, the local endpoints with the peer's
/// identity (`base`: the pod identity behind an address identity) for egress.
fn port_matches(
    rule: &crate::model::PortRule,
    protocol: u8,
    port: u16,
    direction: Direction,
    endpoint: &EndpointView,
    endpoints: &[EndpointView],
    base: u32,
) -> bool {
    let proto_ok = |p: Protocol| match p {
        Protocol::Any => true,
        other => other.number() == protocol,
    };
    match &rule.port {
        Port::Any => proto_ok(rule.protocol),
        Port::Range { first, last } => {
            let with_ports = Protocol::WITH_PORTS.iter().any(|p| p.number() == protocol);
            proto_ok(rule.protocol)
                && (rule.protocol != Protocol::Any || with_ports)
                && (*first..=*last).contains(&port)
        }
        Port::Named(name) => {
            let ports: Vec<&NamedPort> = match direction {
                Direction::Ingress => endpoint.named_ports.iter().collect(),
                Direction::Egress => {
                    endpoints.iter().filter(|e| e.identity == base).flat_map(|e| e.named_ports.iter()).collect()
                }
            };
            ports.iter().any(|np| {
                np.name == *name && np.port == port && np.protocol.number() == protocol && proto_ok(rule.protocol)
            })
        }
    }
}

/// The tiered rules selecting `endpoint` in `direction`, in evaluation order.
fn ordered<'a>(
    policies: &'a [Policy],
    endpoint: &EndpointView,
    direction: Direction,
    tier: Tier,
) -> Vec<(&'a Policy, TierPlace, &'a crate::model::PeerRule)> {
    let mut list: Vec<&Policy> = policies.iter().filter(|p| p.tier.is_some_and(|t| t.tier == tier)).collect();
    list.sort_by(|a, b| (a.tier, a.kind, &a.name).cmp(&(b.tier, b.kind, &b.name)));
    let mut out = Vec::new();
    for p in list {
        let place = p.tier.expect("tiered");
        for rule in &p.rules {
            if rule.subject.matches(&endpoint.labels) && endpoint.labels.has_source(source::K8S) {
                out.extend(rule.peer_rules(direction).iter().map(|pr| (p, place, pr)));
            }
        }
    }
    out
}

/// Evaluates the Admin and Baseline tiers for one flow. `np_selects`: whether the
/// NetworkPolicy tier selects (enforces) the endpoint in this direction; when the trace
/// says [`TierDecision::NetworkPolicy`], that tier's verdict is the flow's. `base`: for
/// egress named ports, the pod identity of the peer (its identity, or the pod behind an
/// address identity).
#[allow(clippy::too_many_arguments, reason = "one flow's every part")]
pub fn evaluate(
    policies: &[Policy],
    endpoint: &EndpointView,
    endpoints: &[EndpointView],
    direction: Direction,
    peer: PeerView,
    base: u32,
    protocol: u8,
    port: u16,
    np_selects: bool,
) -> Trace {
    let matching = |tier: Tier| {
        ordered(policies, endpoint, direction, tier).into_iter().find(|(_, _, pr)| {
            pr.peers.list().iter().any(|p| peer_matches(p, &peer))
                && (pr.ports.is_empty()
                    || pr.ports.iter().any(|r| port_matches(r, protocol, port, direction, endpoint, endpoints, base)))
        })
    };
    let rule = |p: &Policy, place: TierPlace, pr: &crate::model::PeerRule| TierRule {
        policy: p.display_name(),
        tier: place.tier,
        priority: place.priority,
        path: pr.path.clone(),
        verdict: Some(pr.verdict),
    };
    let mut passes = Vec::new();
    if let Some((p, place, pr)) = matching(Tier::Admin) {
        let r = rule(p, place, pr);
        match pr.verdict {
            Verdict::Pass => passes.push(r),
            v => return Trace { passes, decision: TierDecision::Admin { rule: r, allowed: v == Verdict::Allow } },
        }
    }
    if np_selects {
        return Trace { passes, decision: TierDecision::NetworkPolicy };
    }
    if let Some((p, place, pr)) = matching(Tier::Baseline) {
        let allowed = pr.verdict != Verdict::Deny;
        return Trace { passes, decision: TierDecision::Baseline { rule: rule(p, place, pr), allowed } };
    }
    Trace { passes, decision: TierDecision::Default }
}

/// Whether some NetworkPolicy-tier policy selects `endpoint` for `direction`: a rule that
/// selects it enforces the direction, or has deny rules for it there (deny rules without
/// default deny still make the tier decide).
pub fn network_policy_tier_selects(policies: &[Policy], endpoint: &EndpointView, direction: Direction) -> bool {
    policies.iter().filter(|p| p.tier.is_none()).flat_map(|p| p.rules.iter()).any(|r| {
        r.subject.matches(&endpoint.labels)
            && (r.enforces(direction) || r.peer_rules(direction).iter().any(|pr| pr.verdict == Verdict::Deny))
    })
}

/// Whether any policy is tiered (then explain shows a trace).
pub fn any_tiered(policies: &[Policy]) -> bool {
    policies.iter().any(|p| p.tier.is_some())
}
