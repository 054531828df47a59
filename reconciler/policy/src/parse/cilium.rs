//! CiliumNetworkPolicy and CiliumClusterwideNetworkPolicy -> the internal model.
//!
//! Cilium's rules, as its `ParseToCiliumRule` applies them: in a namespaced policy the
//! subject always lives in the policy's namespace, and a peer selector is scoped to it
//! unless it names the namespace label itself or a reserved label.

use std::collections::HashSet;

use crate::yaml::Value;

use super::Invalid;
use super::common::{
    KeyStyle, cidr_block, end_port, label_selector, object_names, policy_name, prefix, serde_invalid, unknown_protocol,
};
use super::icmp;
use super::raw;
use crate::cidr::CidrBlock;
use crate::labels::{keys, source};
use crate::model::{
    Entity, Peer, PeerRule, Peers, Policy, PolicyKind, Port, PortRule, Protocol, Rule, Verdict, is_port_name,
};
use crate::selector::{EndpointSelector, Operator, SelectorKey};

/// Cilium's limit of ports in one `toPorts` item and of fields in one `icmps` item.
const MAX_PORTS: usize = 40;

pub(super) fn translate(value: Value, kind: PolicyKind, origin: &str) -> Result<Policy, Invalid> {
    let raw: raw::CiliumPolicy = serde_path_to_error::deserialize(value).map_err(|e| {
        serde_invalid(
            &e,
            "CiliumNetworkPolicy",
            "Cilium's CRD schema would silently drop this field, so the policy would not do what it says",
        )
    })?;
    let name = policy_name(raw.metadata.name)?;
    let mut warnings = Vec::new();
    let written_namespace = raw.metadata.namespace.filter(|ns| !ns.is_empty());
    let namespace = if kind.is_namespaced() {
        Some(written_namespace.unwrap_or_else(|| "default".to_owned()))
    } else {
        // The API server ignores a namespace on a cluster-scoped object, so Cilium applies
        // such a manifest everywhere; so do we, and say so.
        if let Some(ns) = written_namespace {
            warnings.push(format!(
                "metadata.namespace: a {kind} is not namespaced: it applies to pods in every namespace, not only in \
                 {ns:?} (the API server ignores this field); to limit it to one namespace, make it a \
                 CiliumNetworkPolicy or select k8s:io.kubernetes.pod.namespace in its endpointSelector"
            ));
        }
        None
    };
    object_names(&name, namespace.as_deref())?;
    let mut specs = Vec::new();
    if let Some(spec) = raw.spec {
        specs.push(("spec".to_owned(), spec));
    }
    for (i, spec) in raw.specs.into_iter().flatten().enumerate() {
        specs.push((format!("specs[{i}]"), spec));
    }
    if specs.is_empty() {
        return Err(Invalid::new(
            "spec",
            "the policy has neither spec nor specs",
            "add a spec with an endpointSelector and ingress or egress rules",
        ));
    }
    let ctx = Ctx { namespace: namespace.as_deref() };
    let mut rules = Vec::new();
    for (path, spec) in &specs {
        rules.push(ctx.rule(path, spec, &mut warnings)?);
    }
    Ok(Policy { kind, tier: None, namespace, name, source: origin.to_owned(), rules, warnings, audit: false })
}

/// Translation context of one policy.
struct Ctx<'a> {
    /// The policy's namespace; `None` for clusterwide policies.
    namespace: Option<&'a str>,
}

/// The parts of an ingress or egress item, with Cilium's field names.
struct PeerParts<'a> {
    endpoints: (&'static str, &'a [raw::LabelSelector]),
    requires: (&'static str, &'a [raw::LabelSelector]),
    cidr: (&'static str, &'a [String]),
    cidr_set: (&'static str, &'a [raw::CidrRule]),
    entities: (&'static str, &'a [String]),
    /// Peer fields accepted but not enforced: name, number of items, why.
    unenforced: Vec<(&'static str, usize, &'static str)>,
    /// Peer fields rejected: name, number of items.
    unsupported: Vec<(&'static str, usize)>,
    authentication: bool,
    icmps: &'a [raw::IcmpRule],
    to_ports: &'a [raw::PortRule],
}

#[allow(clippy::ref_option, reason = "called on the serde mirror's optional fields as they are")]
fn items<T>(v: &Option<Vec<T>>) -> &[T] {
    v.as_deref().unwrap_or_default()
}

const FQDN_WHY: &str = "palisade has no DNS proxy yet, so it cannot learn the addresses of these names";
const SERVICES_WHY: &str = "palisade does not resolve Services to their backends yet";
const GROUPS_WHY: &str = "palisade does not resolve cloud provider groups";

impl<'a> PeerParts<'a> {
    fn ingress(r: &'a raw::IngressRule) -> PeerParts<'a> {
        PeerParts {
            endpoints: ("fromEndpoints", items(&r.from_endpoints)),
            requires: ("fromRequires", items(&r.from_requires)),
            cidr: ("fromCIDR", items(&r.from_cidr)),
            cidr_set: ("fromCIDRSet", items(&r.from_cidr_set)),
            entities: ("fromEntities", items(&r.from_entities)),
            unenforced: vec![("fromGroups", items(&r.from_groups).len(), GROUPS_WHY)],
            unsupported: vec![("fromNodes", items(&r.from_nodes).len())],
            authentication: r.authentication.is_some(),
            icmps: items(&r.icmps),
            to_ports: items(&r.to_ports),
        }
    }

    fn egress(r: &'a raw::EgressRule) -> PeerParts<'a> {
        PeerParts {
            endpoints: ("toEndpoints", items(&r.to_endpoints)),
            requires: ("toRequires", items(&r.to_requires)),
            cidr: ("toCIDR", items(&r.to_cidr)),
            cidr_set: ("toCIDRSet", items(&r.to_cidr_set)),
            entities: ("toEntities", items(&r.to_entities)),
            unenforced: vec![
                ("toServices", items(&r.to_services).len(), SERVICES_WHY),
                ("toFQDNs", items(&r.to_fqdns).len(), FQDN_WHY),
                ("toGroups", items(&r.to_groups).len(), GROUPS_WHY),
            ],
            unsupported: vec![("toNodes", items(&r.to_nodes).len())],
            authentication: r.authentication.is_some(),
            icmps: items(&r.icmps),
            to_ports: items(&r.to_ports),
        }
    }

    /// The peer fields with items, in Cilium's order.
    fn l3_fields(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        for (field, n) in [
            (self.endpoints.0, self.endpoints.1.len()),
            (self.cidr.0, self.cidr.1.len()),
            (self.cidr_set.0, self.cidr_set.1.len()),
            (self.entities.0, self.entities.1.len()),
        ]
        .into_iter()
        .chain(self.unsupported.iter().copied())
        .chain(self.unenforced.iter().map(|(f, n, _)| (*f, *n)))
        {
            if n > 0 {
                out.push(field);
            }
        }
        out
    }
}

impl Ctx<'_> {
    fn rule(&self, path: &str, spec: &raw::CiliumRule, warnings: &mut Vec<String>) -> Result<Rule, Invalid> {
        if spec.node_selector.is_some() {
            return Err(Invalid::new(
                format!("{path}.nodeSelector"),
                "host policies (nodeSelector) are not supported: palisade enforces policy on pods only",
                "select pods with endpointSelector; protect nodes with a host firewall for now",
            ));
        }
        let sel_path = format!("{path}.endpointSelector");
        let Some(raw_subject) = &spec.endpoint_selector else {
            return Err(Invalid::new(
                sel_path,
                "endpointSelector is missing",
                "add `endpointSelector: {}` to select every pod in the namespace, or matchLabels to select some",
            ));
        };
        let mut subject = label_selector(raw_subject, &sel_path, KeyStyle::Cilium)?;
        if let Some(ns) = self.namespace {
            let removed = subject.remove_key(keys::POD_NAMESPACE, &[source::K8S, source::ANY]);
            if removed.iter().any(|r| r.operator != Operator::In || r.values.len() != 1 || !r.values.contains(ns)) {
                warnings.push(format!(
                    "{sel_path}: the namespace match was replaced by the policy's namespace {ns}: \
                     the endpointSelector of a namespaced policy always applies in its own namespace"
                ));
            }
            subject.require(SelectorKey::new(source::K8S, keys::POD_NAMESPACE), Operator::In, &[ns]);
        }
        let mut ingress = Vec::new();
        for (field, verdict, items) in
            [("ingress", Verdict::Allow, &spec.ingress), ("ingressDeny", Verdict::Deny, &spec.ingress_deny)]
        {
            for (i, item) in items.iter().flatten().enumerate() {
                let p = format!("{path}.{field}[{i}]");
                ingress.push(self.peer_rule(&p, verdict, &PeerParts::ingress(item), warnings)?);
            }
        }
        let mut egress = Vec::new();
        for (field, verdict, items) in
            [("egress", Verdict::Allow, &spec.egress), ("egressDeny", Verdict::Deny, &spec.egress_deny)]
        {
            for (i, item) in items.iter().flatten().enumerate() {
                let p = format!("{path}.{field}[{i}]");
                egress.push(self.peer_rule(&p, verdict, &PeerParts::egress(item), warnings)?);
            }
        }
        let default_deny = spec.enable_default_deny.as_ref();
        Ok(Rule {
            path: path.to_owned(),
            subject,
            enforce_ingress: default_deny.and_then(|d| d.ingress).unwrap_or(!ingress.is_empty()),
            enforce_egress: default_deny.and_then(|d| d.egress).unwrap_or(!egress.is_empty()),
            ingress,
            egress,
        })
    }

    fn peer_rule(
        &self,
        path: &str,
        verdict: Verdict,
        parts: &PeerParts<'_>,
        warnings: &mut Vec<String>,
    ) -> Result<PeerRule, Invalid> {
        for (field, n) in &parts.unsupported {
            if *n > 0 {
                return Err(Invalid::new(
                    format!("{path}.{field}"),
                    format!("{field} is not supported: it selects nodes by their labels"),
                    "use the entities remote-node and host (fromEntities / toEntities) to select nodes",
                ));
            }
        }
        if let [first, second, ..] = parts.l3_fields()[..] {
            return Err(Invalid::new(
                format!("{path}.{second}"),
                format!("combining {first} and {second} in one rule is not supported"),
                "Cilium rejects this too; put each kind of peer in a rule (list item) of its own",
            ));
        }
        if verdict == Verdict::Deny {
            let denied = parts.unenforced.iter().find(|(_, n, _)| *n > 0).map(|(f, _, _)| *f);
            if let Some(field) = denied.or(parts.authentication.then_some("authentication")) {
                return Err(Invalid::new(
                    format!("{path}.{field}"),
                    format!("{field} cannot be part of a deny rule"),
                    "deny rules take endpoints, CIDRs, entities, ports and ICMP types only",
                ));
            }
        }
        let mut peer_list = Vec::new();
        let (field, selectors) = parts.endpoints;
        for (i, s) in selectors.iter().enumerate() {
            let sel = label_selector(s, &format!("{path}.{field}[{i}]"), KeyStyle::Cilium)?;
            peer_list.push(Peer::Endpoints(self.scope_peer(sel)));
        }
        let (field, cidrs) = parts.cidr;
        for (i, c) in cidrs.iter().enumerate() {
            let cidr = prefix(&format!("{path}.{field}[{i}]"), c, warnings)?;
            peer_list.push(Peer::Cidr(CidrBlock { cidr, except: vec![] }));
        }
        let (field, sets) = parts.cidr_set;
        for (i, set) in sets.iter().enumerate() {
            let p = format!("{path}.{field}[{i}]");
            peer_list.push(Peer::Cidr(cidr_rule(&p, set, warnings)?));
        }
        let (field, entities) = parts.entities;
        for (i, name) in entities.iter().enumerate() {
            let entity = Entity::parse(name).ok_or_else(|| {
                let known: Vec<&str> = Entity::ALL.iter().map(|e| e.as_str()).collect();
                Invalid::new(
                    format!("{path}.{field}[{i}]"),
                    format!("{name:?} is not an entity"),
                    format!("entities are {}", known.join(", ")),
                )
            })?;
            peer_list.push(Peer::Entity(entity));
        }
        dedup_peers(&mut peer_list);
        let mut unenforced_peers = false;
        for (field, n, why) in &parts.unenforced {
            if *n > 0 {
                unenforced_peers = true;
                warnings.push(format!(
                    "{path}.{field}: not enforced ({why}); it is this rule's only kind of peer, so the rule \
                     matches no peer and allows nothing"
                ));
            }
        }
        if parts.authentication {
            warnings.push(format!(
                "{path}.authentication: mutual authentication is not enforced; the rule allows its peers \
                 without it"
            ));
        }
        let (field, requires) = parts.requires;
        let mut required = Vec::new();
        for (i, s) in requires.iter().enumerate() {
            let sel = label_selector(s, &format!("{path}.{field}[{i}]"), KeyStyle::Cilium)?;
            required.push(self.scope_peer(sel));
        }
        if !parts.icmps.is_empty() && !parts.to_ports.is_empty() {
            return Err(Invalid::new(
                format!("{path}.icmps"),
                "icmps and toPorts cannot be in the same rule",
                "Cilium rejects this too; put the ICMP types in a rule (list item) of their own",
            ));
        }
        let mut ports = port_rules(path, verdict, parts.to_ports, warnings)?;
        ports.extend(icmp_rules(path, parts.icmps)?);
        let has_l4 = !parts.to_ports.is_empty() || !parts.icmps.is_empty();
        // Cilium: an item with no L3 part but ports applies to every peer; an item with
        // neither (`{}`) applies to no peer. A peer field that is not enforced still
        // counts as the L3 part: its rule must not widen to every peer.
        let peers =
            if peer_list.is_empty() && !unenforced_peers && has_l4 { Peers::Any } else { Peers::Only(peer_list) };
        Ok(PeerRule { path: path.to_owned(), verdict, peers, ports, requires: required })
    }

    /// Scopes a peer selector to the policy's namespace unless it names the namespace
    /// label or a reserved label (Cilium's `getEndpointSelector`).
    fn scope_peer(&self, mut sel: EndpointSelector) -> EndpointSelector {
        if let Some(ns) = self.namespace
            && !sel.names_source(source::RESERVED)
            && !sel.names_key(keys::POD_NAMESPACE, &[source::K8S, source::ANY])
        {
            sel.require(SelectorKey::new(source::K8S, keys::POD_NAMESPACE), Operator::In, &[ns]);
        }
        sel
    }
}

/// Drops repeated CIDR and entity peers, keeping the first of each, in linear time (a
/// policy may list hundreds of thousands of CIDRs).
fn dedup_peers(list: &mut Vec<Peer>) {
    let mut seen = HashSet::new();
    list.retain(|p| matches!(p, Peer::Endpoints(_)) || seen.insert(p.clone()));
}

fn cidr_rule(path: &str, rule: &raw::CidrRule, warnings: &mut Vec<String>) -> Result<CidrBlock, Invalid> {
    for (field, present) in
        [("cidrGroupRef", rule.cidr_group_ref.is_some()), ("cidrGroupSelector", rule.cidr_group_selector.is_some())]
    {
        if present {
            return Err(Invalid::new(
                format!("{path}.{field}"),
                format!("{field} is not supported: palisade does not read CiliumCIDRGroups"),
                "list the prefixes with cidr and except",
            ));
        }
    }
    let Some(cidr) = &rule.cidr else {
        return Err(Invalid::new(format!("{path}.cidr"), "cidr is missing", "give the prefix, like 10.0.0.0/8"));
    };
    cidr_block(path, cidr, rule.except.as_deref().unwrap_or_default(), warnings)
}

fn icmp_rules(path: &str, icmps: &[raw::IcmpRule]) -> Result<Vec<PortRule>, Invalid> {
    let mut out = Vec::new();
    for (i, rule) in icmps.iter().enumerate() {
        let base = format!("{path}.icmps[{i}].fields");
        let fields = rule.fields.as_deref().unwrap_or_default();
        if fields.is_empty() {
            return Err(Invalid::new(base, "an icmps item needs fields", "list the ICMP types, like `- type: 8`"));
        }
        if fields.len() > MAX_PORTS {
            return Err(Invalid::new(
                base,
                format!("{} ICMP fields in one item; at most {MAX_PORTS} are allowed", fields.len()),
                "split them over several icmps items",
            ));
        }
        for (j, f) in fields.iter().enumerate() {
            let p = format!("{base}[{j}]");
            let v6 = match f.family.as_deref() {
                None | Some("IPv4") => false,
                Some("IPv6") => true,
                Some(other) => {
                    return Err(Invalid::new(
                        format!("{p}.family"),
                        format!("family {other:?} is not IPv4 or IPv6"),
                        "leave it out for IPv4",
                    ));
                }
            };
            let t = icmp::icmp_type(&format!("{p}.type"), &f.icmp_type, v6)?;
            let protocol = if v6 { Protocol::IcmpV6 } else { Protocol::Icmp };
            let rule = PortRule { protocol, port: Port::Range { first: t.into(), last: t.into() } };
            if !out.contains(&rule) {
                out.push(rule);
            }
        }
    }
    Ok(out)
}

fn port_rules(
    path: &str,
    verdict: Verdict,
    to_ports: &[raw::PortRule],
    warnings: &mut Vec<String>,
) -> Result<Vec<PortRule>, Invalid> {
    let mut out = Vec::new();
    for (i, pr) in to_ports.iter().enumerate() {
        let base = format!("{path}.toPorts[{i}]");
        for (field, present, what) in [
            ("rules", pr.rules.is_some(), "L7 rules"),
            ("originatingTLS", pr.originating_tls.is_some(), "TLS origination"),
            ("terminatingTLS", pr.terminating_tls.is_some(), "TLS termination"),
            ("serverNames", pr.server_names.is_some(), "TLS server name matching"),
            ("listener", pr.listener.is_some(), "Envoy listeners"),
        ] {
            if !present {
                continue;
            }
            if verdict == Verdict::Deny {
                return Err(Invalid::new(
                    format!("{base}.{field}"),
                    format!("{what} cannot be part of a deny rule"),
                    "deny rules are L3/L4 only; remove the field",
                ));
            }
            warnings.push(format!(
                "{base}.{field}: {what} are not enforced (palisade has no L7 proxy yet); \
                 the L4 part is enforced, so these ports are open to the rule's peers \
                 whatever the request"
            ));
        }
        let ports = pr.ports.as_deref().unwrap_or_default();
        if ports.len() > MAX_PORTS {
            return Err(Invalid::new(
                format!("{base}.ports"),
                format!("{} ports in one toPorts item; at most {MAX_PORTS} are allowed", ports.len()),
                "split them over several toPorts items, or use port ranges (endPort)",
            ));
        }
        if ports.is_empty() {
            out.push(PortRule { protocol: Protocol::Any, port: Port::Any });
        }
        for (j, pp) in ports.iter().enumerate() {
            out.push(port_protocol(&format!("{base}.ports[{j}]"), pp)?);
        }
    }
    Ok(out)
}

fn port_protocol(path: &str, pp: &raw::PortProtocol) -> Result<PortRule, Invalid> {
    let protocol = match pp.protocol.as_deref() {
        None | Some("ANY") => Protocol::Any,
        Some("TCP") => Protocol::Tcp,
        Some("UDP") => Protocol::Udp,
        Some("SCTP") => Protocol::Sctp,
        Some(p @ ("ICMP" | "ICMPv6" | "ICMPV6")) => {
            return Err(Invalid::new(
                format!("{path}.protocol"),
                format!("protocol {p} has no ports"),
                "allow ICMP with `icmps` next to toPorts",
            ));
        }
        Some(other) => {
            return Err(unknown_protocol(
                path,
                other,
                "TCP, UDP, SCTP, ANY",
                "protocols are upper case; leave it out for ANY",
            ));
        }
    };
    let port = match &pp.port {
        None => Port::Any,
        Some(raw::PortValue::Number(n)) => number_port(path, *n)?,
        Some(raw::PortValue::Text(t)) => {
            if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
                number_port(path, t.parse::<i64>().unwrap_or(i64::MAX))?
            } else if is_port_name(t) {
                Port::Named(t.clone())
            } else {
                return Err(Invalid::new(
                    format!("{path}.port"),
                    format!("port {t:?} is neither a number from 1 to 65535 nor a port name"),
                    "write a number like \"8080\", or the name of a container port \
                     (lower case letters, digits and '-', at most 15 characters)",
                ));
            }
        }
    };
    // Cilium reads endPort 0 as "no range".
    let port = end_port(path, pp.end_port.filter(|e| *e != 0), port)?;
    Ok(PortRule { protocol, port })
}

fn number_port(path: &str, n: i64) -> Result<Port, Invalid> {
    match n {
        0 => Ok(Port::Any),
        1..=65535 => {
            let p = u16::try_from(n).expect("in range");
            Ok(Port::Range { first: p, last: p })
        }
        _ => Err(Invalid::new(
            format!("{path}.port"),
            format!("port {n} is out of range"),
            "ports are 1 to 65535; 0 or no port means every port",
        )),
    }
}
