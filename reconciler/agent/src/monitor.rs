//! Turns raw verdict events from the datapath into [`MonitorEvent`]s a person can read:
//! names for reasons, protocols and endpoints, and the policies behind the deciding entry.
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use palisade_common::{VerdictEvent, direction, family, identity, match_kind, proto, reason, verdict};

use crate::api::types::MonitorEvent;
use crate::mapstate::CookieJar;

/// Name of an IP protocol number.
pub fn protocol_name(p: u8) -> String {
    match p {
        proto::TCP => "TCP".into(),
        proto::UDP => "UDP".into(),
        proto::SCTP => "SCTP".into(),
        proto::ICMP => "ICMP".into(),
        proto::ICMPV6 => "ICMPv6".into(),
        proto::ANY => "ANY".into(),
        n => n.to_string(),
    }
}

/// Name of a verdict reason.
pub fn reason_name(r: u8) -> &'static str {
    match r {
        reason::ALLOWED_BY_POLICY => "allowed-by-policy",
        reason::ALLOWED_NOT_ENFORCED => "not-enforced",
        reason::ALLOWED_REPLY => "reply",
        reason::ALLOWED_ALWAYS => "always-allowed",
        reason::DROP_POLICY_DENIED => "policy-denied",
        reason::DROP_POLICY_DENY_RULE => "deny-rule",
        reason::DROP_SPOOFED_SOURCE => "spoofed-source",
        reason::DROP_MALFORMED => "malformed",
        reason::DROP_FRAGMENT_UNKNOWN => "fragment-unknown",
        reason::DROP_NO_ENDPOINT => "no-endpoint",
        reason::DROP_L2_UNSUPPORTED => "l2-unsupported",
        reason::DROP_IPV6_EXT_CHAIN => "ipv6-extension-chain",
        _ => "unknown",
    }
}

/// Name of a match kind.
pub fn match_kind_name(m: u8) -> &'static str {
    match m {
        match_kind::ALL => "all",
        match_kind::L3_ONLY => "L3-only",
        match_kind::L4_ONLY => "L4-only",
        match_kind::L3_L4 => "L3-L4",
        _ => "none",
    }
}

fn addr(fam: u8, bytes: &[u8; 16]) -> IpAddr {
    if fam == family::IPV6 {
        IpAddr::V6(Ipv6Addr::from(*bytes))
    } else {
        IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
    }
}

/// What the decoder knows besides the event: endpoint names and cookie origins.
#[derive(Clone, Debug, Default)]
pub struct DecodeContext {
    /// Endpoint id -> `namespace/name`.
    pub endpoints: BTreeMap<u32, String>,
    /// Cookie -> policies (`Kind namespace/name`) behind it; empty for a built-in entry
    /// (one no rule produced: see [`builtin_entry`]).
    pub cookies: BTreeMap<u32, Vec<String>>,
    /// Cookie -> the rules behind it (`Kind namespace/name spec.ingress[0]`).
    pub rules: BTreeMap<u32, Vec<String>>,
    /// Cookie -> the rules behind it, structured (for flow records).
    pub origins: BTreeMap<u32, Vec<palisade_policy::RuleOrigin>>,
    /// Endpoint id -> what a flow record says of it.
    pub endpoint_info: BTreeMap<u32, EndpointNames>,
    /// A local endpoint's address -> its id.
    pub by_ip: BTreeMap<IpAddr, u32>,
    /// Labels of the identities that are not local pods' (CIDR and address identities).
    pub identity_labels: BTreeMap<u32, Vec<String>>,
    /// This node's name (flow records' `node_name`).
    pub node_name: String,
    /// Other nodes' pods' names by address (the identity cache's table, shared).
    pub remote_names: Arc<BTreeMap<IpAddr, Arc<palisade_node::ipcache::RemotePodName>>>,
    /// Endpoint id -> per direction the policies that select it with default deny there,
    /// whether or not the direction is enforced; computed for the policies and endpoints
    /// of `deny_by_of` (held, so compared by pointer: recomputed only when either list
    /// is a new one).
    /// Index: direction, then +2 for the audit view's.
    deny_by_all: BTreeMap<u32, [Vec<palisade_api::flow::FlowPolicy>; 4]>,
    deny_by_of: Option<DenyBySource>,
}

type DenyBySource = (Arc<Vec<palisade_policy::Policy>>, Arc<Vec<crate::endpoint::LocalEndpoint>>);

/// A local endpoint as flow records name it.
#[derive(Clone, Debug, Default)]
pub struct EndpointNames {
    pub namespace: String,
    pub name: String,
    pub identity: u32,
    pub labels: Vec<String>,
    /// Per direction ([`direction`] index): the policies that put the endpoint into
    /// default deny there (empty when the direction is not enforced).
    pub default_deny_by: [Vec<palisade_api::flow::FlowPolicy>; 2],
    /// Per direction: the policies that put the endpoint's audit view into default deny
    /// there (action `audit`; the audited ones when some are, else all), for AUDIT flows.
    pub audit_default_deny_by: [Vec<palisade_api::flow::FlowPolicy>; 2],
    /// Per direction: denied entirely because the endpoint's entries do not fit in the
    /// maps (see `mapErrors` in the status).
    pub fail_closed: [bool; 2],
}

impl DecodeContext {
    /// Takes the policies and rules of every cookie in `live` from the map writer's jar.
    /// A cookie always stands for the same origins (the jar never gives a number out
    /// twice), so only cookies new since the last call are named.
    pub fn set_cookies(&mut self, jar: &CookieJar, live: &BTreeSet<u32>) {
        self.cookies.retain(|c, _| live.contains(c));
        self.rules.retain(|c, _| live.contains(c));
        self.origins.retain(|c, _| live.contains(c));
        for c in live {
            if self.cookies.contains_key(c) {
                continue;
            }
            let Some(origins) = jar.origins(*c) else { continue };
            let mut names: Vec<String> = origins.iter().map(palisade_policy::RuleOrigin::policy_name).collect();
            names.dedup();
            self.cookies.insert(*c, names);
            self.rules.insert(*c, origins.iter().map(std::string::ToString::to_string).collect());
            self.origins.insert(*c, origins.iter().cloned().collect());
        }
    }

    /// The policies and local endpoints of the desired state last applied (what the
    /// default-deny attribution and the nearest rule of a flow record look at).
    pub fn policy_inputs(&self) -> Option<(&[palisade_policy::Policy], &[crate::endpoint::LocalEndpoint])> {
        self.deny_by_of.as_ref().map(|(p, e)| (p.as_slice(), e.as_slice()))
    }

    /// The policies behind a policy entry's cookie, or the name of the built-in entry it
    /// is; `None` when the cookie is not one the agent wrote (yet).
    pub fn attribution(&self, cookie: u32, entry: BuiltinKey) -> Option<Vec<String>> {
        let names = self.cookies.get(&cookie)?;
        if names.is_empty() { Some(vec![builtin_entry(entry).to_string()]) } else { Some(names.clone()) }
    }
}

/// Takes what flow records say of the endpoints from the desired state the map writer
/// applies: names, identities, labels, addresses, and per enforced direction the policies
/// that put the endpoint into default deny there.
pub fn set_endpoint_names(ctx: &mut DecodeContext, msg: &crate::writer::Desired) {
    use palisade_policy::Direction;
    ctx.by_ip.clear();
    ctx.endpoint_info.clear();
    // Selector matches of every endpoint against every policy: only when either changed.
    let same =
        ctx.deny_by_of.as_ref().is_some_and(|(p, e)| Arc::ptr_eq(p, &msg.policies) && Arc::ptr_eq(e, &msg.endpoints));
    if !same {
        let flow_policy = |p: &palisade_policy::Policy, action: &str| palisade_api::flow::FlowPolicy {
            kind: p.kind.to_string(),
            namespace: p.namespace.clone().unwrap_or_default(),
            name: p.name.clone(),
            rule: String::new(),
            action: action.into(),
        };
        // What is enforced names the enforced policies only; the audit view the audited
        // ones when some select the endpoint (the would-be default deny is theirs), else
        // every one (the endpoint itself is in audit mode).
        let by = |e: &crate::endpoint::LocalEndpoint, dir: Direction| {
            let all = palisade_policy::explain::default_deny_by(&msg.policies, &e.labels, dir);
            let enforced: Vec<_> = all.iter().filter(|p| !p.audit).map(|p| flow_policy(p, "default-deny")).collect();
            let audited = if all.iter().any(|p| p.audit) {
                all.iter().filter(|p| p.audit).map(|p| flow_policy(p, "audit")).collect()
            } else {
                all.iter().map(|p| flow_policy(p, "audit")).collect()
            };
            [enforced, audited]
        };
        ctx.deny_by_all = msg
            .endpoints
            .iter()
            .map(|e| {
                let [ie, ia] = by(e, Direction::Ingress);
                let [ee, ea] = by(e, Direction::Egress);
                (u32::from(e.id), [ie, ee, ia, ea])
            })
            .collect();
        ctx.deny_by_of = Some((msg.policies.clone(), msg.endpoints.clone()));
    }
    for e in msg.endpoints.iter() {
        let id = u32::from(e.id);
        let policy = msg.desired.endpoints.get(&e.id);
        let deny_by = |dir: Direction, audit: bool| {
            let view = if audit { policy.and_then(|p| p.audit.as_deref()) } else { policy.map(AsRef::as_ref) };
            let enforced = view.is_some_and(|p| p.enforced(dir));
            match ctx.deny_by_all.get(&id) {
                Some(lists) if enforced => {
                    lists[usize::from(dir == Direction::Egress) + 2 * usize::from(audit)].clone()
                }
                _ => Vec::new(),
            }
        };
        ctx.endpoint_info.insert(
            id,
            EndpointNames {
                namespace: e.namespace.clone(),
                name: e.name.clone(),
                identity: e.identity,
                labels: e.labels.iter().map(ToString::to_string).collect(),
                default_deny_by: [deny_by(Direction::Ingress, false), deny_by(Direction::Egress, false)],
                audit_default_deny_by: [deny_by(Direction::Ingress, true), deny_by(Direction::Egress, true)],
                fail_closed: [false; 2],
            },
        );
        if let Some(a) = e.ipv4 {
            ctx.by_ip.insert(IpAddr::V4(a), id);
        }
        if let Some(a) = e.ipv6 {
            ctx.by_ip.insert(IpAddr::V6(a), id);
        }
    }
    ctx.remote_names = msg.remote_names.clone();
    ctx.identity_labels = msg
        .desired
        .cidr_identities
        .iter()
        .chain(&msg.desired.address_identities)
        .map(|(id, l)| (*id, l.iter().map(ToString::to_string).collect()))
        .collect();
}

/// Name of the allow every ingress-enforced endpoint has for the node (the host identity,
/// any protocol and port; see `palisade_node::explain::allow_localhost`).
pub const BUILTIN_ALLOW_LOCALHOST: &str = "built-in allow-localhost";
/// Name of the allow for any peer that enforces a direction with deny rules but
/// `enableDefaultDeny: false` (the denies win over it).
pub const BUILTIN_ALLOW_ALL: &str = "built-in allow-all (enableDefaultDeny: false)";

/// What tells the built-in entries apart: the entry's direction, peer identity (0 = any)
/// and whether it is for any protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BuiltinKey {
    pub direction: u8,
    pub identity: u32,
    pub any_protocol: bool,
}

impl BuiltinKey {
    /// The key of the entry that decided a verdict event, as far as the event tells it
    /// (its match kind says whether the identity and the port were wildcards).
    pub fn of_event(ev: &VerdictEvent) -> BuiltinKey {
        let identity = match ev.match_kind {
            match_kind::ALL | match_kind::L4_ONLY => identity::ANY,
            _ => ev.peer_identity,
        };
        let any_protocol = matches!(ev.match_kind, match_kind::ALL | match_kind::L3_ONLY);
        BuiltinKey { direction: ev.direction, identity, any_protocol }
    }
}

/// The name of a built-in entry (an entry with a cookie but no rule behind it).
pub fn builtin_entry(k: BuiltinKey) -> &'static str {
    match (k.direction, k.identity, k.any_protocol) {
        (direction::INGRESS, identity::HOST, true) => BUILTIN_ALLOW_LOCALHOST,
        (_, identity::ANY, true) => BUILTIN_ALLOW_ALL,
        _ => "built-in",
    }
}

/// Decodes one raw event.
pub fn decode(ev: &VerdictEvent, ctx: &DecodeContext) -> MonitorEvent {
    MonitorEvent {
        ts_ns: ev.ts_ns,
        endpoint_id: ev.endpoint_id,
        endpoint: ctx.endpoints.get(&ev.endpoint_id).cloned(),
        direction: if ev.direction == direction::INGRESS { "ingress" } else { "egress" }.into(),
        verdict: match ev.verdict {
            verdict::DROP => "drop",
            verdict::AUDIT => "audit",
            _ => "allow",
        }
        .into(),
        reason: reason_name(ev.reason).into(),
        match_kind: match_kind_name(ev.match_kind).into(),
        src: addr(ev.family, &ev.saddr).to_string(),
        dst: addr(ev.family, &ev.daddr).to_string(),
        src_port: ev.sport,
        dst_port: ev.dport,
        protocol: protocol_name(ev.protocol),
        peer_identity: ev.peer_identity,
        policies: if ev.cookie == 0 {
            Vec::new()
        } else {
            ctx.attribution(ev.cookie, BuiltinKey::of_event(ev))
                .unwrap_or_else(|| vec![format!("cookie {}", ev.cookie)])
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_a_drop() {
        let mut ev = VerdictEvent {
            endpoint_id: 2,
            direction: direction::INGRESS,
            verdict: verdict::DROP,
            reason: reason::DROP_POLICY_DENIED,
            family: family::IPV4,
            protocol: proto::TCP,
            dport: 9090,
            sport: 40000,
            peer_identity: 257,
            ..Default::default()
        };
        ev.saddr[..4].copy_from_slice(&[10, 200, 1, 1]);
        ev.daddr[..4].copy_from_slice(&[10, 200, 1, 2]);
        let mut ctx = DecodeContext::default();
        ctx.endpoints.insert(2, "default/backend".into());
        let m = decode(&ev, &ctx);
        assert_eq!(m.endpoint.as_deref(), Some("default/backend"));
        assert_eq!((m.src.as_str(), m.dst.as_str()), ("10.200.1.1", "10.200.1.2"));
        assert_eq!((m.verdict.as_str(), m.reason.as_str(), m.protocol.as_str()), ("drop", "policy-denied", "TCP"));
        assert!(m.policies.is_empty());
    }

    #[test]
    fn built_in_entries_are_named() {
        let mut ctx = DecodeContext::default();
        ctx.cookies.insert(7, Vec::new());
        ctx.cookies.insert(8, vec!["CiliumNetworkPolicy default/web".into()]);
        let ev = |cookie, dir, m, peer| VerdictEvent {
            cookie,
            direction: dir,
            verdict: verdict::ALLOW,
            reason: reason::ALLOWED_BY_POLICY,
            match_kind: m,
            peer_identity: peer,
            ..Default::default()
        };
        let names = |e: &VerdictEvent| decode(e, &ctx).policies;
        assert_eq!(names(&ev(7, direction::INGRESS, match_kind::L3_ONLY, 1)), vec![BUILTIN_ALLOW_LOCALHOST]);
        assert_eq!(names(&ev(7, direction::EGRESS, match_kind::ALL, 300)), vec![BUILTIN_ALLOW_ALL]);
        assert_eq!(names(&ev(8, direction::INGRESS, match_kind::L3_L4, 300)), vec!["CiliumNetworkPolicy default/web"]);
        assert_eq!(names(&ev(9, direction::INGRESS, match_kind::L3_L4, 300)), vec!["cookie 9"]);
        assert!(names(&ev(0, direction::INGRESS, match_kind::NONE, 300)).is_empty());
    }
}
