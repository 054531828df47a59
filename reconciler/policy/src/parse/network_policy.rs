//! Kubernetes NetworkPolicy (networking.k8s.io/v1) -> the internal model.
//!
//! Kubernetes' rules: the subject is `podSelector` in the policy's namespace;
//! `policyTypes` omitted means Ingress, plus Egress when there are egress rules; a peer
//! with podSelector only is a pod of the policy's namespace, with namespaceSelector only
//! any pod of the matching namespaces, with both a pod matching both (AND); several
//! peers are an OR; a rule without peers (`from` / `to` absent or empty) applies to every
//! peer, the world included; no rules for an enforced direction deny everything. Ports
//! default to TCP; a port may be a container port name (resolved on the destination)
//! and `endPort` makes a range. An `ipBlock` matches outside addresses and also the pod
//! addresses inside it, address by address (see [`crate::resolve::PolicyResolver`]).

use std::collections::HashSet;

use crate::yaml::Value;

use super::Invalid;
use super::common::{
    KeyStyle, cidr_block, end_port, label_selector, object_names, policy_name, serde_invalid, unknown_protocol,
};
use super::raw;
use crate::labels::{keys, source};
use crate::model::{Peer, PeerRule, Peers, Policy, PolicyKind, Port, PortRule, Protocol, Rule, Verdict, is_port_name};
use crate::selector::{EndpointSelector, Operator, SelectorKey};

pub(super) fn translate(value: Value, origin: &str) -> Result<Policy, Invalid> {
    let raw: raw::NetworkPolicy = serde_path_to_error::deserialize(value).map_err(|e| {
        serde_invalid(&e, "NetworkPolicy", "the Kubernetes API server would drop this field or reject the policy")
    })?;
    let name = policy_name(raw.metadata.name)?;
    let namespace = raw.metadata.namespace.filter(|ns| !ns.is_empty()).unwrap_or_else(|| "default".to_owned());
    object_names(&name, Some(&namespace))?;
    let Some(spec) = raw.spec else {
        return Err(Invalid::new("spec", "the policy has no spec", "add a spec with a podSelector"));
    };
    let Some(pod_selector) = &spec.pod_selector else {
        return Err(Invalid::new(
            "spec.podSelector",
            "podSelector is missing",
            "add `podSelector: {}` to select every pod in the namespace, or matchLabels to select some",
        ));
    };
    let mut subject = label_selector(pod_selector, "spec.podSelector", KeyStyle::PodLabels)?;
    in_namespace(&mut subject, &namespace);

    let ingress_items = spec.ingress.as_deref().unwrap_or_default();
    let egress_items = spec.egress.as_deref().unwrap_or_default();
    let (enforce_ingress, enforce_egress) = match spec.policy_types.as_deref() {
        None | Some([]) => (true, !egress_items.is_empty()),
        Some(types) => {
            let (mut ingress, mut egress) = (false, false);
            for (i, t) in types.iter().enumerate() {
                match t.as_str() {
                    "Ingress" => ingress = true,
                    "Egress" => egress = true,
                    other => {
                        return Err(Invalid::new(
                            format!("spec.policyTypes[{i}]"),
                            format!("policy type {other:?} is not Ingress or Egress"),
                            "policy types are case-sensitive",
                        ));
                    }
                }
            }
            (ingress, egress)
        }
    };
    let mut warnings = Vec::new();
    let ctx = Ctx { namespace: &namespace };
    let mut ingress = Vec::new();
    if enforce_ingress {
        for (i, item) in ingress_items.iter().enumerate() {
            let path = format!("spec.ingress[{i}]");
            ingress.push(ctx.peer_rule(&path, "from", item.from.as_deref(), item.ports.as_deref(), &mut warnings)?);
        }
    } else if !ingress_items.is_empty() {
        warnings.push(
            "spec.ingress: ignored, spec.policyTypes does not list Ingress (Kubernetes ignores these rules too)"
                .to_owned(),
        );
    }
    let mut egress = Vec::new();
    if enforce_egress {
        for (i, item) in egress_items.iter().enumerate() {
            let path = format!("spec.egress[{i}]");
            egress.push(ctx.peer_rule(&path, "to", item.to.as_deref(), item.ports.as_deref(), &mut warnings)?);
        }
    } else if !egress_items.is_empty() {
        warnings.push(
            "spec.egress: ignored, spec.policyTypes does not list Egress (Kubernetes ignores these rules too)"
                .to_owned(),
        );
    }
    let rule = Rule { path: "spec".to_owned(), subject, enforce_ingress, enforce_egress, ingress, egress };
    Ok(Policy {
        kind: PolicyKind::NetworkPolicy,
        tier: None,
        namespace: Some(namespace),
        name,
        source: origin.to_owned(),
        rules: vec![rule],
        warnings,
        audit: false,
    })
}

/// Requires the pod namespace label to be `namespace`.
fn in_namespace(sel: &mut EndpointSelector, namespace: &str) {
    sel.require(SelectorKey::new(source::K8S, keys::POD_NAMESPACE), Operator::In, &[namespace]);
}

struct Ctx<'a> {
    namespace: &'a str,
}

impl Ctx<'_> {
    fn peer_rule(
        &self,
        path: &str,
        field: &str,
        peers: Option<&[raw::NetworkPolicyPeer]>,
        ports: Option<&[raw::NetworkPolicyPort]>,
        warnings: &mut Vec<String>,
    ) -> Result<PeerRule, Invalid> {
        let peers = match peers {
            None | Some([]) => Peers::Any,
            Some(list) => {
                let (mut out, mut seen) = (Vec::new(), HashSet::new());
                for (i, p) in list.iter().enumerate() {
                    let peer = self.peer(&format!("{path}.{field}[{i}]"), p, warnings)?;
                    if seen.insert(peer.clone()) {
                        out.push(peer);
                    }
                }
                Peers::Only(out)
            }
        };
        let (mut port_rules, mut seen) = (Vec::new(), HashSet::new());
        for (i, p) in ports.unwrap_or_default().iter().enumerate() {
            let rule = port(&format!("{path}.ports[{i}]"), p)?;
            if seen.insert(rule.clone()) {
                port_rules.push(rule);
            }
        }
        Ok(PeerRule { path: path.to_owned(), verdict: Verdict::Allow, peers, ports: port_rules, requires: vec![] })
    }

    fn peer(&self, path: &str, p: &raw::NetworkPolicyPeer, warnings: &mut Vec<String>) -> Result<Peer, Invalid> {
        if let Some(block) = &p.ip_block {
            if p.pod_selector.is_some() || p.namespace_selector.is_some() {
                return Err(Invalid::new(
                    format!("{path}.ipBlock"),
                    "a peer with ipBlock cannot also have podSelector or namespaceSelector",
                    "make them two peers of the list (they are then an OR)",
                ));
            }
            let block = cidr_block(
                &format!("{path}.ipBlock"),
                &block.cidr,
                block.except.as_deref().unwrap_or_default(),
                warnings,
            )?;
            return Ok(Peer::IpBlock(block));
        }
        let pods = p
            .pod_selector
            .as_ref()
            .map(|s| label_selector(s, &format!("{path}.podSelector"), KeyStyle::PodLabels))
            .transpose()?;
        let namespaces = p
            .namespace_selector
            .as_ref()
            .map(|s| label_selector(s, &format!("{path}.namespaceSelector"), KeyStyle::NamespaceLabels))
            .transpose()?;
        let sel = match (pods, namespaces) {
            (None, None) => {
                return Err(Invalid::new(
                    path,
                    "a peer needs podSelector, namespaceSelector or ipBlock",
                    "remove the empty peer, or give it a selector (`podSelector: {}` is every pod of the namespace)",
                ));
            }
            (Some(mut pods), None) => {
                in_namespace(&mut pods, self.namespace);
                pods
            }
            (pods, Some(namespaces)) => {
                let mut sel = pods.unwrap_or_default().and(&namespaces);
                // Pods of any namespace (and only pods), even for `namespaceSelector: {}`.
                sel.require(SelectorKey::new(source::K8S, keys::POD_NAMESPACE), Operator::Exists, &[]);
                sel
            }
        };
        Ok(Peer::Endpoints(sel))
    }
}

fn port(path: &str, p: &raw::NetworkPolicyPort) -> Result<PortRule, Invalid> {
    let protocol = match p.protocol.as_deref() {
        None | Some("TCP") => Protocol::Tcp,
        Some("UDP") => Protocol::Udp,
        Some("SCTP") => Protocol::Sctp,
        Some(other) => {
            return Err(unknown_protocol(
                path,
                other,
                "TCP, UDP, SCTP",
                "protocols are upper case; leave it out for TCP",
            ));
        }
    };
    let port = match &p.port {
        None => Port::Any,
        Some(raw::PortValue::Number(n)) => match u16::try_from(*n) {
            Ok(n) if n > 0 => Port::Range { first: n, last: n },
            _ => {
                return Err(Invalid::new(
                    format!("{path}.port"),
                    format!("port {n} is out of range"),
                    "ports are 1 to 65535; leave port out for every port",
                ));
            }
        },
        Some(raw::PortValue::Text(t)) if is_port_name(t) => Port::Named(t.clone()),
        Some(raw::PortValue::Text(t)) => {
            let hint = if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
                "a port number is written without quotes in a NetworkPolicy"
            } else {
                "name a container port (lower case letters, digits and '-', at most 15 characters, one letter at least)"
            };
            return Err(Invalid::new(
                format!("{path}.port"),
                format!("port {t:?} is neither a number nor a port name"),
                hint,
            ));
        }
    };
    let port = end_port(path, p.end_port, port)?;
    Ok(PortRule { protocol, port })
}
