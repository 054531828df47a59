//! ClusterNetworkPolicy (`policy.networking.k8s.io/v1alpha2`) and the v1alpha1
//! AdminNetworkPolicy / BaselineAdminNetworkPolicy it replaced -> the internal model.
//!
//! All three become a clusterwide [`Policy`] with a [`TierPlace`] (Admin or Baseline, a
//! priority) and one [`Rule`] whose peer rules keep the manifest's order (first match
//! decides; see [`crate::tiers`]). A tiered rule never puts its subject under default
//! deny. The v1alpha1 kinds are translated here, at parse time: `Allow` is Accept, a
//! BaselineAdminNetworkPolicy is the Baseline tier (priority 1000, after every
//! ClusterNetworkPolicy of that tier), `ports` are protocols.
//!
//! Validation follows the CRD schema and its CEL rules: priority 0..=1000, tier Admin or
//! Baseline, actions Accept/Deny/Pass (no Pass in the Baseline tier), exactly one field
//! per subject, peer and protocol, 1 to 25 peers and protocols per rule and at most 25
//! rules per direction, port numbers 1..=65535, ranges with start < end, no named port
//! with networks/nodes/domainNames peers, domainNames only in egress Accept rules.
//!
//! Subjects and pod peers select pod identities only (they require the pod namespace
//! label): host-network pods have the node's identity and are never subjects or pod
//! peers. `networks` are address sets (like a NetworkPolicy ipBlock, pods inside
//! included). `nodes: {}` is every node (the host and remote-node identities); node labels
//! are not known to palisade, so a non-empty node selector is rejected. `domainNames` are
//! accepted but match nothing until palisade has a DNS proxy, as `toFQDNs` is.

use std::collections::{BTreeMap, HashSet};

use serde::Deserialize;

use super::Invalid;
use super::common::{KeyStyle, cidr_block, label_selector, object_names, policy_name, serde_invalid};
use super::raw::LabelSelector;
use crate::labels::{keys, source};
use crate::model::{
    Entity, Peer, PeerRule, Peers, Policy, PolicyKind, Port, PortRule, Protocol, Rule, Tier, TierPlace, Verdict,
    is_port_name,
};
use crate::selector::{EndpointSelector, Operator, SelectorKey};
use crate::yaml::Value;

/// The most rules per direction, peers per rule and protocols per rule the CRD allows.
const MAX_ITEMS: usize = 25;
/// The priority of a BaselineAdminNetworkPolicy in the Baseline tier.
pub const BANP_PRIORITY: u32 = 1000;

const DNS_WHY: &str = "palisade has no DNS proxy yet, so it cannot learn the addresses of these names";

#[derive(Debug, Deserialize)]
struct Manifest {
    #[serde(default)]
    metadata: super::raw::Metadata,
    spec: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct CnpSpec {
    tier: Option<String>,
    priority: Option<i64>,
    subject: Option<Subject>,
    ingress: Option<Vec<CnpRule>>,
    egress: Option<Vec<CnpRule>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct AnpSpec {
    priority: Option<i64>,
    subject: Option<Subject>,
    ingress: Option<Vec<AnpRule>>,
    egress: Option<Vec<AnpRule>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Subject {
    namespaces: Option<LabelSelector>,
    pods: Option<NamespacedPod>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct NamespacedPod {
    namespace_selector: Option<LabelSelector>,
    pod_selector: Option<LabelSelector>,
}

/// A rule of either direction (the peers' field is `from` or `to`).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct CnpRule {
    name: Option<String>,
    action: Option<String>,
    from: Option<Vec<PeerSpec>>,
    to: Option<Vec<PeerSpec>>,
    protocols: Option<Vec<CnpProtocol>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct AnpRule {
    name: Option<String>,
    action: Option<String>,
    from: Option<Vec<PeerSpec>>,
    to: Option<Vec<PeerSpec>>,
    ports: Option<Vec<AnpPort>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PeerSpec {
    namespaces: Option<LabelSelector>,
    pods: Option<NamespacedPod>,
    nodes: Option<LabelSelector>,
    networks: Option<Vec<String>>,
    domain_names: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct CnpProtocol {
    tcp: Option<ProtocolPort>,
    udp: Option<ProtocolPort>,
    sctp: Option<ProtocolPort>,
    destination_named_port: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ProtocolPort {
    destination_port: Option<PortSpec>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PortSpec {
    number: Option<i64>,
    range: Option<RangeSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RangeSpec {
    start: Option<i64>,
    end: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct AnpPort {
    port_number: Option<AnpPortNumber>,
    named_port: Option<String>,
    port_range: Option<AnpPortRange>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AnpPortNumber {
    protocol: Option<String>,
    port: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AnpPortRange {
    protocol: Option<String>,
    start: Option<i64>,
    end: Option<i64>,
}

/// Which manifest is being read, for messages and for what differs between them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flavour {
    /// v1alpha2 ClusterNetworkPolicy.
    Cnp,
    /// v1alpha1 AdminNetworkPolicy.
    Anp,
    /// v1alpha1 BaselineAdminNetworkPolicy.
    Banp,
}

impl Flavour {
    fn kind(self) -> PolicyKind {
        match self {
            Flavour::Cnp => PolicyKind::ClusterNetworkPolicy,
            Flavour::Anp => PolicyKind::AdminNetworkPolicy,
            Flavour::Banp => PolicyKind::BaselineAdminNetworkPolicy,
        }
    }

    fn reference(self) -> &'static str {
        match self {
            Flavour::Cnp => "ClusterNetworkPolicy (policy.networking.k8s.io/v1alpha2)",
            Flavour::Anp => "AdminNetworkPolicy (policy.networking.k8s.io/v1alpha1)",
            Flavour::Banp => "BaselineAdminNetworkPolicy (policy.networking.k8s.io/v1alpha1)",
        }
    }
}

/// A v1alpha2 ClusterNetworkPolicy.
pub(super) fn translate_cluster_network_policy(value: Value, origin: &str) -> Result<Policy, Invalid> {
    let (name, spec) = header(value, Flavour::Cnp)?;
    let spec: CnpSpec = deserialize(spec, Flavour::Cnp, "spec")?;
    let tier = match spec.tier.as_deref() {
        Some("Admin") => Tier::Admin,
        Some("Baseline") => Tier::Baseline,
        Some(other) => {
            return Err(Invalid::new(
                "spec.tier",
                format!("tier {other:?} is not Admin or Baseline"),
                "the NetworkPolicy tier is for NetworkPolicy, CiliumNetworkPolicy and \
                 CiliumClusterwideNetworkPolicy; tiers are case-sensitive",
            ));
        }
        None => return Err(Invalid::new("spec.tier", "tier is missing", "set tier: Admin or tier: Baseline")),
    };
    let priority = priority(spec.priority)?;
    let subject = subject(spec.subject.as_ref())?;
    let mut warnings = Vec::new();
    let mut rules = [Vec::new(), Vec::new()];
    for (d, (field, items)) in [("ingress", &spec.ingress), ("egress", &spec.egress)].into_iter().enumerate() {
        let items = items.as_deref().unwrap_or_default();
        too_many(&format!("spec.{field}"), items.len(), "rules")?;
        for (i, item) in items.iter().enumerate() {
            let path = format!("spec.{field}[{i}]");
            let verdict = action(&path, item.action.as_deref(), Flavour::Cnp, tier)?;
            rule_name(&path, item.name.as_deref())?;
            let peers = peers(&path, d == 1, item.from.as_deref(), item.to.as_deref(), verdict, &mut warnings)?;
            let ports = cnp_protocols(&path, item.protocols.as_deref(), &peers)?;
            rules[d].push(PeerRule { path, verdict, peers: peers.peers, ports, requires: vec![] });
        }
    }
    Ok(policy(Flavour::Cnp, TierPlace { tier, priority }, name, origin, subject, rules, warnings))
}

/// A v1alpha1 AdminNetworkPolicy or BaselineAdminNetworkPolicy.
pub(super) fn translate_v1alpha1(value: Value, origin: &str, baseline: bool) -> Result<Policy, Invalid> {
    let flavour = if baseline { Flavour::Banp } else { Flavour::Anp };
    let (name, spec) = header(value, flavour)?;
    if baseline && name != "default" {
        return Err(Invalid::new(
            "metadata.name",
            format!("a BaselineAdminNetworkPolicy must be named \"default\", not {name:?}"),
            "the API allows one BaselineAdminNetworkPolicy per cluster, named default; or write a \
             ClusterNetworkPolicy with tier: Baseline",
        ));
    }
    let place = if baseline {
        if let Some(Value::Object(map)) = &spec
            && map.contains_key("priority")
        {
            return Err(Invalid::new(
                "spec.priority",
                "a BaselineAdminNetworkPolicy has no priority",
                "remove priority (there is only one BaselineAdminNetworkPolicy), or write a ClusterNetworkPolicy \
                 with tier: Baseline and a priority",
            ));
        }
        TierPlace { tier: Tier::Baseline, priority: BANP_PRIORITY }
    } else {
        TierPlace { tier: Tier::Admin, priority: 0 }
    };
    let spec: AnpSpec = deserialize(spec, flavour, "spec")?;
    let place = if baseline { place } else { TierPlace { priority: priority(spec.priority)?, ..place } };
    let subject = subject(spec.subject.as_ref())?;
    let mut warnings = Vec::new();
    let mut rules = [Vec::new(), Vec::new()];
    for (d, (field, items)) in [("ingress", &spec.ingress), ("egress", &spec.egress)].into_iter().enumerate() {
        let items = items.as_deref().unwrap_or_default();
        // v1alpha1 allows up to 100 rules per direction.
        if items.len() > 100 {
            return Err(Invalid::new(
                format!("spec.{field}"),
                format!("{} rules, more than the 100 the API allows", items.len()),
                "split the policy",
            ));
        }
        for (i, item) in items.iter().enumerate() {
            let path = format!("spec.{field}[{i}]");
            let verdict = action(&path, item.action.as_deref(), flavour, place.tier)?;
            rule_name(&path, item.name.as_deref())?;
            let peers = peers(&path, d == 1, item.from.as_deref(), item.to.as_deref(), verdict, &mut warnings)?;
            let ports = anp_ports(&path, item.ports.as_deref(), &peers)?;
            rules[d].push(PeerRule { path, verdict, peers: peers.peers, ports, requires: vec![] });
        }
    }
    Ok(policy(flavour, place, name, origin, subject, rules, warnings))
}

fn policy(
    flavour: Flavour,
    place: TierPlace,
    name: String,
    origin: &str,
    subject: EndpointSelector,
    [ingress, egress]: [Vec<PeerRule>; 2],
    warnings: Vec<String>,
) -> Policy {
    let rule =
        Rule { path: "spec".to_owned(), subject, enforce_ingress: false, enforce_egress: false, ingress, egress };
    Policy {
        kind: flavour.kind(),
        tier: Some(place),
        namespace: None,
        name,
        source: origin.to_owned(),
        rules: vec![rule],
        warnings,
        audit: false,
    }
}

/// The name (checked) and the spec.
fn header(value: Value, flavour: Flavour) -> Result<(String, Option<Value>), Invalid> {
    let m: Manifest = serde_path_to_error::deserialize(value)
        .map_err(|e| serde_invalid(&e, flavour.reference(), "the Kubernetes API server would reject the policy"))?;
    let name = policy_name(m.metadata.name)?;
    object_names(&name, None)?;
    if m.spec.is_none() {
        return Err(Invalid::new("spec", "the policy has no spec", "add a spec with a subject"));
    }
    Ok((name, m.spec))
}

fn deserialize<T: for<'de> Deserialize<'de>>(value: Option<Value>, flavour: Flavour, at: &str) -> Result<T, Invalid> {
    let value = value.unwrap_or(Value::Null);
    serde_path_to_error::deserialize(value)
        .map_err(|e| {
            serde_invalid(
                &e,
                flavour.reference(),
                "the CRD schema would reject the policy (or drop the field without a word)",
            )
        })
        .map_err(|mut inv| {
            inv.path =
                if inv.path.is_empty() || inv.path == "." { at.to_owned() } else { format!("{at}.{}", inv.path) };
            inv
        })
}

fn priority(p: Option<i64>) -> Result<u32, Invalid> {
    match p {
        None => Err(Invalid::new("spec.priority", "priority is missing", "set a priority from 0 (first) to 1000")),
        Some(p) if (0..=1000).contains(&p) => Ok(u32::try_from(p).expect("in range")),
        Some(p) => Err(Invalid::new(
            "spec.priority",
            format!("priority {p} is outside 0..1000"),
            "priorities go from 0 (evaluated first) to 1000 (last)",
        )),
    }
}

fn too_many(path: &str, n: usize, what: &str) -> Result<(), Invalid> {
    if n > MAX_ITEMS {
        return Err(Invalid::new(
            path,
            format!("{n} {what}, more than the {MAX_ITEMS} the API allows"),
            "split the policy into several (same priority keeps their order undefined; give them distinct \
             priorities)",
        ));
    }
    Ok(())
}

fn rule_name(path: &str, name: Option<&str>) -> Result<(), Invalid> {
    match name {
        Some(n) if n.chars().count() > 100 => Err(Invalid::new(
            format!("{path}.name"),
            format!("the rule name has {} characters, more than 100", n.chars().count()),
            "shorten the name",
        )),
        _ => Ok(()),
    }
}

fn action(path: &str, action: Option<&str>, flavour: Flavour, tier: Tier) -> Result<Verdict, Invalid> {
    let at = format!("{path}.action");
    let accept = if flavour == Flavour::Cnp { "Accept" } else { "Allow" };
    let verdict = match (action, flavour) {
        (Some("Accept"), Flavour::Cnp) | (Some("Allow"), Flavour::Anp | Flavour::Banp) => Verdict::Allow,
        (Some("Deny"), _) => Verdict::Deny,
        (Some("Pass"), Flavour::Cnp | Flavour::Anp) => Verdict::Pass,
        (Some("Allow"), Flavour::Cnp) => {
            return Err(Invalid::new(
                at,
                "action Allow is v1alpha1's name",
                "a v1alpha2 ClusterNetworkPolicy says Accept (actions are Accept, Deny and Pass)",
            ));
        }
        (Some("Accept"), _) => {
            return Err(Invalid::new(
                at,
                "action Accept is v1alpha2's name",
                "v1alpha1 policies say Allow; or move to a v1alpha2 ClusterNetworkPolicy",
            ));
        }
        (Some("Pass"), Flavour::Banp) => {
            return Err(Invalid::new(
                at,
                "a BaselineAdminNetworkPolicy cannot Pass: there is no tier after it",
                "use Allow or Deny",
            ));
        }
        (Some(other), _) => {
            let known =
                if flavour == Flavour::Banp { "Allow, Deny".to_owned() } else { format!("{accept}, Deny, Pass") };
            return Err(Invalid::new(
                at,
                format!("action {other:?} is not one of {known}"),
                "actions are case-sensitive",
            ));
        }
        (None, _) => {
            return Err(Invalid::new(at, "action is missing", format!("set action: {accept}, Deny or Pass")));
        }
    };
    if verdict == Verdict::Pass && tier == Tier::Baseline {
        return Err(Invalid::new(
            at,
            "action Pass is not allowed in the Baseline tier: there is no tier after it to pass to",
            "use Accept or Deny (traffic no Baseline rule matches is allowed)",
        ));
    }
    Ok(verdict)
}

/// A subject or pod peer: pods only (the pod namespace label must exist).
fn pods_only(mut sel: EndpointSelector) -> EndpointSelector {
    sel.require(SelectorKey::new(source::K8S, keys::POD_NAMESPACE), Operator::Exists, &[]);
    sel
}

fn namespaced_pod(path: &str, p: &NamespacedPod) -> Result<EndpointSelector, Invalid> {
    let Some(pods) = &p.pod_selector else {
        return Err(Invalid::new(
            format!("{path}.podSelector"),
            "podSelector is missing",
            "add `podSelector: {}` for every pod of the selected namespaces",
        ));
    };
    let pods = label_selector(pods, &format!("{path}.podSelector"), KeyStyle::PodLabels)?;
    let namespaces = match &p.namespace_selector {
        Some(ns) => label_selector(ns, &format!("{path}.namespaceSelector"), KeyStyle::NamespaceLabels)?,
        None => EndpointSelector::all(),
    };
    Ok(pods_only(pods.and(&namespaces)))
}

fn subject(s: Option<&Subject>) -> Result<EndpointSelector, Invalid> {
    let Some(s) = s else {
        return Err(Invalid::new(
            "spec.subject",
            "subject is missing",
            "select the pods the policy applies to: `subject: {namespaces: {}}` is every pod",
        ));
    };
    match (&s.namespaces, &s.pods) {
        (Some(ns), None) => Ok(pods_only(label_selector(ns, "spec.subject.namespaces", KeyStyle::NamespaceLabels)?)),
        (None, Some(p)) => namespaced_pod("spec.subject.pods", p),
        (Some(_), Some(_)) => Err(Invalid::new(
            "spec.subject",
            "the subject sets both namespaces and pods",
            "set exactly one of them (pods has a namespaceSelector of its own)",
        )),
        (None, None) => Err(Invalid::new(
            "spec.subject",
            "the subject sets neither namespaces nor pods",
            "set exactly one: `namespaces: {}` is every pod",
        )),
    }
}

/// The peers of a rule, and what the protocol checks need to know about them.
struct RulePeers {
    peers: Peers,
    /// Some peer is networks, nodes or domainNames (no named ports there).
    not_pods: Option<&'static str>,
}

fn peers(
    path: &str,
    egress: bool,
    from: Option<&[PeerSpec]>,
    to: Option<&[PeerSpec]>,
    verdict: Verdict,
    warnings: &mut Vec<String>,
) -> Result<RulePeers, Invalid> {
    let (field, list, wrong) = if egress { ("to", to, ("from", from)) } else { ("from", from, ("to", to)) };
    if wrong.1.is_some() {
        return Err(Invalid::new(
            format!("{path}.{}", wrong.0),
            format!("an {} rule has no `{}`", if egress { "egress" } else { "ingress" }, wrong.0),
            format!("name the peers under `{field}`"),
        ));
    }
    let list = match list {
        None | Some([]) => {
            return Err(Invalid::new(
                format!("{path}.{field}"),
                format!("`{field}` is missing or empty"),
                "a rule needs at least one peer: `namespaces: {}` is every pod",
            ));
        }
        Some(list) => list,
    };
    too_many(&format!("{path}.{field}"), list.len(), "peers")?;
    let (mut out, mut seen) = (Vec::new(), HashSet::new());
    let mut not_pods = None;
    for (i, p) in list.iter().enumerate() {
        let at = format!("{path}.{field}[{i}]");
        let set: Vec<&str> = [
            ("namespaces", p.namespaces.is_some()),
            ("pods", p.pods.is_some()),
            ("nodes", p.nodes.is_some()),
            ("networks", p.networks.is_some()),
            ("domainNames", p.domain_names.is_some()),
        ]
        .into_iter()
        .filter_map(|(f, set)| set.then_some(f))
        .collect();
        if set.len() != 1 {
            return Err(Invalid::new(
                at,
                if set.is_empty() {
                    "the peer sets no field".to_owned()
                } else {
                    format!("the peer sets {}", set.join(" and "))
                },
                "a peer sets exactly one of namespaces, pods (and for egress nodes, networks, domainNames); \
                 list several peers for an OR",
            ));
        }
        if !egress && matches!(set[0], "nodes" | "networks" | "domainNames") {
            return Err(Invalid::new(
                format!("{at}.{}", set[0]),
                format!("{} is an egress peer only", set[0]),
                "ingress peers are namespaces and pods",
            ));
        }
        let mut add = |peer: Peer, out: &mut Vec<Peer>| {
            if seen.insert(peer.clone()) {
                out.push(peer);
            }
        };
        if let Some(ns) = &p.namespaces {
            let sel = label_selector(ns, &format!("{at}.namespaces"), KeyStyle::NamespaceLabels)?;
            add(Peer::Endpoints(pods_only(sel)), &mut out);
        } else if let Some(pods) = &p.pods {
            add(Peer::Endpoints(namespaced_pod(&format!("{at}.pods"), pods)?), &mut out);
        } else if let Some(nodes) = &p.nodes {
            not_pods = Some("nodes");
            let empty = nodes.match_labels.as_ref().is_none_or(BTreeMap::is_empty)
                && nodes.match_expressions.as_ref().is_none_or(Vec::is_empty);
            if !empty {
                return Err(Invalid::new(
                    format!("{at}.nodes"),
                    "palisade does not know node labels yet, so it cannot select some nodes only",
                    "use `nodes: {}` for every node (this node and the others), or networks with the nodes' \
                     addresses",
                ));
            }
            add(Peer::Entity(Entity::Host), &mut out);
            add(Peer::Entity(Entity::RemoteNode), &mut out);
        } else if let Some(networks) = &p.networks {
            not_pods = Some("networks");
            if networks.is_empty() {
                return Err(Invalid::new(
                    format!("{at}.networks"),
                    "networks is empty",
                    "list at least one CIDR, like 192.0.2.0/24",
                ));
            }
            too_many(&format!("{at}.networks"), networks.len(), "networks")?;
            for (j, cidr) in networks.iter().enumerate() {
                let block = cidr_block(&format!("{at}.networks[{j}]"), cidr, &[], warnings).map_err(|mut e| {
                    e.path = format!("{at}.networks[{j}]");
                    e
                })?;
                add(Peer::IpBlock(block), &mut out);
            }
        } else if let Some(names) = &p.domain_names {
            not_pods = Some("domainNames");
            let at = format!("{at}.domainNames");
            if verdict != Verdict::Allow {
                return Err(Invalid::new(
                    at,
                    "domainNames peers are for Accept rules only",
                    "accept the names, and deny the rest with a rule of lower precedence",
                ));
            }
            if names.is_empty() {
                return Err(Invalid::new(at, "domainNames is empty", "list at least one name, like example.com"));
            }
            too_many(&at, names.len(), "domain names")?;
            for (j, name) in names.iter().enumerate() {
                if !domain_name(name) {
                    return Err(Invalid::new(
                        format!("{at}[{j}]"),
                        format!("{name:?} is not a domain name"),
                        "write a name like example.com, or *.example.com for its subdomains ('*' only as the first \
                         label)",
                    ));
                }
            }
            warnings.push(format!("{at}: not enforced ({DNS_WHY}); this peer matches no peer, so it accepts nothing"));
        }
    }
    Ok(RulePeers { peers: Peers::Only(out), not_pods })
}

/// The CRD's `DomainName` pattern: an optional `*.`, then labels of letters, digits, '-'
/// and '_' (not at either end of a label), at least two labels, an optional final dot.
fn domain_name(name: &str) -> bool {
    let rest = name.strip_prefix("*.").unwrap_or(name);
    let rest = rest.strip_suffix('.').unwrap_or(rest);
    let labels: Vec<&str> = rest.split('.').collect();
    labels.len() >= 2
        && labels.iter().all(|l| {
            !l.is_empty()
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                && l.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
                && l.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric())
        })
}

fn port_number(path: &str, n: Option<i64>, what: &str) -> Result<u16, Invalid> {
    match n {
        Some(n) if (1..=65535).contains(&n) => Ok(u16::try_from(n).expect("in range")),
        Some(n) => Err(Invalid::new(path, format!("{what} {n} is outside 1..65535"), "ports are 1 to 65535")),
        None => Err(Invalid::new(path, format!("{what} is missing"), "give a port from 1 to 65535")),
    }
}

fn range(path: &str, start: Option<i64>, end: Option<i64>) -> Result<Port, Invalid> {
    let first = port_number(&format!("{path}.start"), start, "start")?;
    let last = port_number(&format!("{path}.end"), end, "end")?;
    if first >= last {
        return Err(Invalid::new(
            path,
            format!("the range starts at {first} and ends at {last}: start must be less than end"),
            "for one port, give its number instead of a range",
        ));
    }
    Ok(Port::Range { first, last })
}

fn named_port(path: &str, name: &str, peers: &RulePeers) -> Result<PortRule, Invalid> {
    if let Some(field) = peers.not_pods {
        return Err(Invalid::new(
            path,
            format!("a named port cannot be used with a {field} peer: {field} have no named ports"),
            "give the port number, or put the pod peers in a rule of their own",
        ));
    }
    if !is_port_name(name) {
        return Err(Invalid::new(
            path,
            format!("{name:?} is not a port name"),
            "name a container port (lower case letters, digits and '-', at most 15 characters, one letter at least)",
        ));
    }
    Ok(PortRule { protocol: Protocol::Any, port: Port::Named(name.to_owned()) })
}

fn cnp_protocols(path: &str, list: Option<&[CnpProtocol]>, peers: &RulePeers) -> Result<Vec<PortRule>, Invalid> {
    let Some(list) = list else { return Ok(Vec::new()) };
    let at = format!("{path}.protocols");
    if list.is_empty() {
        return Err(Invalid::new(at, "protocols is empty", "leave protocols out to match all traffic"));
    }
    too_many(&at, list.len(), "protocols")?;
    let mut out: Vec<PortRule> = Vec::new();
    for (i, p) in list.iter().enumerate() {
        let at = format!("{at}[{i}]");
        let set: Vec<(&str, Option<&ProtocolPort>, Protocol)> = [
            ("tcp", p.tcp.as_ref(), Protocol::Tcp),
            ("udp", p.udp.as_ref(), Protocol::Udp),
            ("sctp", p.sctp.as_ref(), Protocol::Sctp),
        ]
        .into_iter()
        .filter(|(_, v, _)| v.is_some())
        .collect();
        let rule = match (set.as_slice(), &p.destination_named_port) {
            ([], Some(name)) => named_port(&format!("{at}.destinationNamedPort"), name, peers)?,
            ([(field, Some(pp), protocol)], None) => {
                let at = format!("{at}.{field}");
                let Some(port) = &pp.destination_port else {
                    return Err(Invalid::new(
                        at,
                        format!("{field} has no destinationPort"),
                        format!(
                            "give destinationPort (a number or a range); for every {} port use range 1..65535",
                            field.to_ascii_uppercase()
                        ),
                    ));
                };
                let at = format!("{at}.destinationPort");
                let port = match (port.number, &port.range) {
                    (Some(n), None) => {
                        let n = port_number(&format!("{at}.number"), Some(n), "port")?;
                        Port::Range { first: n, last: n }
                    }
                    (None, Some(r)) => range(&format!("{at}.range"), r.start, r.end)?,
                    _ => {
                        return Err(Invalid::new(
                            at,
                            "destinationPort sets both or neither of number and range",
                            "set exactly one of them",
                        ));
                    }
                };
                PortRule { protocol: *protocol, port }
            }
            _ => {
                return Err(Invalid::new(
                    at,
                    "a protocol entry sets exactly one of tcp, udp, sctp and destinationNamedPort",
                    "list several entries for several protocols",
                ));
            }
        };
        if !out.contains(&rule) {
            out.push(rule);
        }
    }
    Ok(out)
}

fn anp_protocol(path: &str, p: Option<&str>) -> Result<Protocol, Invalid> {
    match p {
        None | Some("TCP") => Ok(Protocol::Tcp),
        Some("UDP") => Ok(Protocol::Udp),
        Some("SCTP") => Ok(Protocol::Sctp),
        Some(other) => Err(Invalid::new(
            format!("{path}.protocol"),
            format!("protocol {other:?} is not one of TCP, UDP, SCTP"),
            "protocols are upper case; leave it out for TCP",
        )),
    }
}

fn anp_ports(path: &str, list: Option<&[AnpPort]>, peers: &RulePeers) -> Result<Vec<PortRule>, Invalid> {
    let Some(list) = list else { return Ok(Vec::new()) };
    let at = format!("{path}.ports");
    if list.is_empty() {
        return Err(Invalid::new(at, "ports is empty", "leave ports out to match all traffic"));
    }
    if list.len() > 100 {
        return Err(Invalid::new(
            at,
            format!("{} ports, more than the 100 the API allows", list.len()),
            "split the rule",
        ));
    }
    let mut out: Vec<PortRule> = Vec::new();
    for (i, p) in list.iter().enumerate() {
        let at = format!("{at}[{i}]");
        let rule = match (&p.port_number, &p.named_port, &p.port_range) {
            (Some(n), None, None) => {
                let protocol = anp_protocol(&format!("{at}.portNumber"), n.protocol.as_deref())?;
                let port = port_number(&format!("{at}.portNumber.port"), n.port, "port")?;
                PortRule { protocol, port: Port::Range { first: port, last: port } }
            }
            (None, Some(name), None) => named_port(&format!("{at}.namedPort"), name, peers)?,
            (None, None, Some(r)) => {
                let protocol = anp_protocol(&format!("{at}.portRange"), r.protocol.as_deref())?;
                PortRule { protocol, port: range(&format!("{at}.portRange"), r.start, r.end)? }
            }
            _ => {
                return Err(Invalid::new(
                    at,
                    "a port sets exactly one of portNumber, namedPort and portRange",
                    "list several ports for several of them",
                ));
            }
        };
        if !out.contains(&rule) {
            out.push(rule);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
