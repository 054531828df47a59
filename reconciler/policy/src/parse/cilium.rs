//! CiliumNetworkPolicy and CiliumClusterwideNetworkPolicy -> the internal model.
//!
//! Cilium's rules, as its `ParseToCiliumRule` applies them: in a namespaced policy the
//! subject always lives in the policy's namespace, and a peer selector is scoped to it
//! unless it names the namespace label itself or a reserved label.

use serde_yaml::Value;

use super::Invalid;
use super::raw;
use crate::labels::{keys, source};
use crate::model::{Peer, PeerRule, Peers, Policy, PolicyKind, Port, PortRule, Protocol, Rule, Verdict, is_port_name};
use crate::selector::{EndpointSelector, Operator, SelectorKey};

pub(super) fn translate(value: Value, kind: PolicyKind, origin: &str) -> Result<Policy, Invalid> {
    let raw: raw::CiliumPolicy = serde_path_to_error::deserialize(value).map_err(|e| serde_invalid(&e))?;
    let name = raw
        .metadata
        .name
        .filter(|n| !n.is_empty())
        .ok_or_else(|| Invalid::new("metadata.name", "the policy has no name", "set metadata.name"))?;
    let mut warnings = Vec::new();
    let namespace = if kind.is_namespaced() {
        Some(raw.metadata.namespace.unwrap_or_else(|| "default".to_owned()))
    } else {
        if raw.metadata.namespace.is_some() {
            warnings.push(format!(
                "metadata.namespace: ignored, a {kind} is not namespaced and applies to the whole cluster"
            ));
        }
        None
    };
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
    Ok(Policy { kind, namespace, name, source: origin.to_owned(), rules, warnings })
}

fn serde_invalid(e: &serde_path_to_error::Error<serde_yaml::Error>) -> Invalid {
    let reason = e.inner().to_string();
    let hint = if reason.starts_with("unknown field") {
        "Cilium's CRD schema would silently drop this field, so the policy would not do what \
         it says; fix the spelling or remove the field"
    } else if reason.starts_with("missing field") {
        "add the field"
    } else {
        "check the field's type against the CiliumNetworkPolicy reference"
    };
    Invalid::new(e.path().to_string(), reason, hint)
}

/// Translation context of one policy.
struct Ctx<'a> {
    /// The policy's namespace; `None` for clusterwide policies.
    namespace: Option<&'a str>,
}

/// The parts of an ingress or egress item, with Cilium's field names.
struct PeerParts<'a> {
    endpoints: Option<(&'static str, &'a Vec<raw::LabelSelector>)>,
    /// Fields not supported yet, and whether each is present.
    unsupported: Vec<(&'static str, bool)>,
    to_ports: Option<&'a Vec<raw::PortRule>>,
}

impl<'a> PeerParts<'a> {
    fn ingress(r: &'a raw::IngressRule) -> PeerParts<'a> {
        PeerParts {
            endpoints: r.from_endpoints.as_ref().map(|e| ("fromEndpoints", e)),
            unsupported: vec![
                ("fromRequires", r.from_requires.is_some()),
                ("fromCIDR", r.from_cidr.is_some()),
                ("fromCIDRSet", r.from_cidr_set.is_some()),
                ("fromEntities", r.from_entities.is_some()),
                ("fromGroups", r.from_groups.is_some()),
                ("fromNodes", r.from_nodes.is_some()),
                ("icmps", r.icmps.is_some()),
                ("authentication", r.authentication.is_some()),
            ],
            to_ports: r.to_ports.as_ref(),
        }
    }

    fn egress(r: &'a raw::EgressRule) -> PeerParts<'a> {
        PeerParts {
            endpoints: r.to_endpoints.as_ref().map(|e| ("toEndpoints", e)),
            unsupported: vec![
                ("toRequires", r.to_requires.is_some()),
                ("toCIDR", r.to_cidr.is_some()),
                ("toCIDRSet", r.to_cidr_set.is_some()),
                ("toEntities", r.to_entities.is_some()),
                ("toServices", r.to_services.is_some()),
                ("toFQDNs", r.to_fqdns.is_some()),
                ("toGroups", r.to_groups.is_some()),
                ("toNodes", r.to_nodes.is_some()),
                ("icmps", r.icmps.is_some()),
                ("authentication", r.authentication.is_some()),
            ],
            to_ports: r.to_ports.as_ref(),
        }
    }
}

impl Ctx<'_> {
    fn rule(&self, path: &str, spec: &raw::CiliumRule, warnings: &mut Vec<String>) -> Result<Rule, Invalid> {
        if spec.node_selector.is_some() {
            return Err(Invalid::new(
                format!("{path}.nodeSelector"),
                "host policies (nodeSelector) are not supported yet",
                "select pods with endpointSelector",
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
        let mut subject = label_selector(raw_subject, &sel_path)?;
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
        for (field, present) in &parts.unsupported {
            if *present {
                return Err(Invalid::new(
                    format!("{path}.{field}"),
                    format!("{field} is not supported yet"),
                    "remove it from the rule or wait for support; ignoring it would change \
                     which peers the rule applies to",
                ));
            }
        }
        let mut peer_list = Vec::new();
        if let Some((field, selectors)) = parts.endpoints {
            for (i, s) in selectors.iter().enumerate() {
                let sel = label_selector(s, &format!("{path}.{field}[{i}]"))?;
                peer_list.push(Peer::Endpoints(self.scope_peer(sel)));
            }
        }
        let to_ports = parts.to_ports.map(Vec::as_slice).unwrap_or_default();
        let ports = port_rules(path, verdict, to_ports, warnings)?;
        // Cilium: an item with no L3 part but ports applies to every peer; an item with
        // neither (`{}`) applies to no peer.
        let peers = if peer_list.is_empty() && !to_ports.is_empty() { Peers::Any } else { Peers::Only(peer_list) };
        Ok(PeerRule { path: path.to_owned(), verdict, peers, ports })
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

fn label_selector(raw: &raw::LabelSelector, path: &str) -> Result<EndpointSelector, Invalid> {
    let mut sel = EndpointSelector::all();
    for (key, value) in raw.match_labels.iter().flatten() {
        if key.is_empty() {
            return Err(Invalid::new(
                format!("{path}.matchLabels"),
                "a label key is empty",
                "write matchLabels as `key: value`",
            ));
        }
        sel = sel.match_label(key, value);
    }
    for (i, req) in raw.match_expressions.iter().flatten().enumerate() {
        let p = format!("{path}.matchExpressions[{i}]");
        let operator = match req.operator.as_str() {
            "In" => Operator::In,
            "NotIn" => Operator::NotIn,
            "Exists" => Operator::Exists,
            "DoesNotExist" => Operator::DoesNotExist,
            other => {
                return Err(Invalid::new(
                    format!("{p}.operator"),
                    format!("operator {other:?} is not one of In, NotIn, Exists, DoesNotExist"),
                    "operators are case-sensitive",
                ));
            }
        };
        let values: Vec<&str> = req.values.iter().flatten().map(String::as_str).collect();
        let needs_values = matches!(operator, Operator::In | Operator::NotIn);
        if needs_values && values.is_empty() {
            return Err(Invalid::new(
                format!("{p}.values"),
                format!("operator {} needs at least one value", req.operator),
                "list the values, or use Exists / DoesNotExist",
            ));
        }
        if !needs_values && !values.is_empty() {
            return Err(Invalid::new(
                format!("{p}.values"),
                format!("operator {} takes no values", req.operator),
                "remove values, or use In / NotIn",
            ));
        }
        if req.key.is_empty() {
            return Err(Invalid::new(format!("{p}.key"), "the key is empty", "name a label key"));
        }
        sel.require(SelectorKey::parse(&req.key), operator, &values);
    }
    Ok(sel)
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
            return Err(Invalid::new(
                format!("{path}.protocol"),
                format!("protocol {other:?} is not one of TCP, UDP, SCTP, ANY"),
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
    let port = match (pp.end_port, port) {
        (None | Some(0), port) => port,
        (Some(end), Port::Range { first, .. }) => {
            if end < i64::from(first) || end > 65535 {
                return Err(Invalid::new(
                    format!("{path}.endPort"),
                    format!("endPort {end} is not between port {first} and 65535"),
                    "endPort is the last port of the range and must not be below port",
                ));
            }
            Port::Range { first, last: u16::try_from(end).expect("checked above") }
        }
        (Some(_), _) => {
            return Err(Invalid::new(
                format!("{path}.endPort"),
                "endPort needs a numeric port to start the range",
                "set port to the first port of the range",
            ));
        }
    };
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
