//! Every probe is also asked of the agent's `policy explain`: what the kernel did and what
//! the agent says it should do must agree, or the probe is an error. The same requests
//! drive the offline check (`palisade policy explain --scenario`) in the tests.
use std::net::IpAddr;

use palisade_api::types::{ExplainRequest, Explanation};

use crate::report::Observed;
use crate::scenario::{HostRef, IpFamily, Plan, PlanProbe};

/// How explain names a probe end: a pod by its address of the probe's family (a pod's
/// addresses may have different identities: an address inside a NetworkPolicy ipBlock has
/// one of its own), or by `namespace/name` when it has none; any other host by its address
/// of the probe's family.
pub fn party(plan: &Plan, end: &HostRef, family: IpFamily) -> Option<String> {
    match end {
        HostRef::Pod(i) => {
            let pod = plan.pod(*i);
            let ip = match family {
                IpFamily::IPv4 => pod.ipv4.map(IpAddr::V4),
                IpFamily::IPv6 => pod.ipv6.map(IpAddr::V6),
            };
            Some(ip.map_or_else(|| pod.key(), |ip| ip.to_string()))
        }
        HostRef::World(ip) => Some(ip.to_string()),
        HostRef::Node(k) => {
            let node = plan.nodes.get(*k)?;
            match family {
                IpFamily::IPv4 => node.ipv4.map(|a| a.to_string()),
                IpFamily::IPv6 => node.ipv6.map(|a| a.to_string()),
            }
        }
        HostRef::Entity(e) => {
            let (v4, v6) = e.addresses();
            Some(match family {
                IpFamily::IPv4 => IpAddr::V4(v4).to_string(),
                IpFamily::IPv6 => IpAddr::V6(v6).to_string(),
            })
        }
    }
}

/// The explain request for a probe's flow.
pub fn request(plan: &Plan, p: &PlanProbe) -> Option<ExplainRequest> {
    Some(ExplainRequest {
        from: party(plan, &p.from, p.family)?,
        to: party(plan, &p.to, p.family)?,
        port: if p.protocol.is_icmp() { p.icmp_type.map(u16::from) } else { p.port },
        protocol: p.protocol.as_str().to_string(),
    })
}

/// One explanation of a flow between two nodes from the two agents' answers: the egress side
/// as the source's node explains it, the ingress side as the destination's node does (each
/// calls the other end "not-local"), allowed when both pass.
pub fn combine(at_source: Explanation, at_destination: Explanation) -> Explanation {
    let passes =
        |s: &palisade_api::types::SideDecision| matches!(s.decision.as_str(), "allowed" | "not-selected" | "not-local");
    let verdict = if passes(&at_source.egress) && passes(&at_destination.ingress) { "allow" } else { "deny" };
    Explanation {
        from: at_source.from,
        to: at_destination.to,
        protocol: at_source.protocol,
        port: at_source.port,
        // Each node's own numbers for the peer it judged.
        from_identity: at_destination.from_identity,
        to_identity: at_source.to_identity,
        egress: at_source.egress,
        ingress: at_destination.ingress,
        verdict: verdict.into(),
    }
}

/// The disagreement between explain and what the kernel did, if any (`None` also when the
/// probe observed nothing to compare: an error).
pub fn disagreement(observed: Observed, e: &Explanation) -> Option<String> {
    let kernel = match observed {
        // An audit hit passed: what is enforced allowed it.
        Observed::Allow | Observed::Audit => "allow",
        Observed::Deny => "deny",
        Observed::Error => return None,
    };
    (e.verdict != kernel).then(|| {
        format!(
            "explain says {} but the kernel did {kernel} (egress of {}: {}; ingress of {}: {})",
            e.verdict,
            e.egress.endpoint.as_deref().unwrap_or(&e.from),
            e.egress.decision,
            e.ingress.endpoint.as_deref().unwrap_or(&e.to),
            e.ingress.decision
        )
    })
}

/// What allowed the flow by explain's account (`ingress: Kind ns/name`), for allowed
/// probes whose verdict events did not say (the datapath reports allows of enforced
/// endpoints only when it has an event for them).
pub fn allowed_by(e: &Explanation) -> Option<String> {
    let parts: Vec<String> = [("egress", &e.egress), ("ingress", &e.ingress)]
        .into_iter()
        .filter(|(_, s)| s.decision == "allowed" && !s.rules.is_empty())
        .map(|(place, s)| {
            // `Kind ns/name spec.ingress[0]` -> `Kind ns/name`.
            let mut policies: Vec<String> =
                s.rules.iter().map(|r| r.rsplit_once(" spec.").map_or(r.as_str(), |(p, _)| p).to_string()).collect();
            policies.dedup();
            format!("{place}: {}", policies.join(", "))
        })
        .collect();
    (!parts.is_empty()).then(|| parts.join("; "))
}

#[cfg(test)]
mod tests {
    use palisade_api::types::SideDecision;

    use super::*;

    fn side(endpoint: &str, decision: &str, rules: &[&str]) -> SideDecision {
        SideDecision {
            endpoint: Some(endpoint.into()),
            decision: decision.into(),
            entry: None,
            rules: rules.iter().map(std::string::ToString::to_string).collect(),
            tiers: Vec::new(),
            default_deny_by: Vec::new(),
            nearest_rule: None,
        }
    }

    fn explanation(verdict: &str) -> Explanation {
        Explanation {
            from: "default/a (10.200.1.10)".into(),
            to: "default/b (10.200.1.11)".into(),
            protocol: "TCP".into(),
            port: 80,
            from_identity: 256,
            to_identity: 257,
            egress: side("default/a", "not-selected", &[]),
            ingress: side(
                "default/b",
                if verdict == "allow" { "allowed" } else { "default-deny" },
                &["CiliumNetworkPolicy default/web spec.ingress[0]", "CiliumNetworkPolicy default/web spec.ingress[1]"],
            ),
            verdict: verdict.into(),
        }
    }

    #[test]
    fn a_verdict_explain_does_not_give_is_a_disagreement() {
        assert_eq!(disagreement(Observed::Allow, &explanation("allow")), None);
        assert_eq!(disagreement(Observed::Deny, &explanation("deny")), None);
        assert_eq!(disagreement(Observed::Error, &explanation("deny")), None);
        let d = disagreement(Observed::Allow, &explanation("deny")).unwrap();
        assert!(d.starts_with("explain says deny but the kernel did allow"), "{d}");
        assert!(d.contains("ingress of default/b: default-deny"), "{d}");
        let d = disagreement(Observed::Deny, &explanation("allow")).unwrap();
        assert!(d.starts_with("explain says allow but the kernel did deny"), "{d}");
    }

    #[test]
    fn two_nodes_explanations_combine_each_nodes_side() {
        let mut at_source = explanation("allow");
        at_source.ingress = side("default/b", "not-local", &[]);
        at_source.ingress.endpoint = None;
        let mut at_destination = explanation("deny");
        at_destination.egress = SideDecision {
            endpoint: None,
            decision: "not-local".into(),
            entry: None,
            rules: vec![],
            tiers: vec![],
            default_deny_by: vec![],
            nearest_rule: None,
        };
        let c = combine(at_source.clone(), at_destination.clone());
        assert_eq!(c.verdict, "deny");
        assert_eq!(c.egress.decision, "not-selected");
        assert_eq!(c.ingress.decision, "default-deny");
        at_destination.ingress = side("default/b", "allowed", &["CiliumNetworkPolicy default/web spec.ingress[0]"]);
        assert_eq!(combine(at_source, at_destination).verdict, "allow");
    }

    #[test]
    fn allowed_by_names_each_policy_once() {
        assert_eq!(allowed_by(&explanation("allow")).unwrap(), "ingress: CiliumNetworkPolicy default/web");
        assert_eq!(allowed_by(&explanation("deny")), None);
    }
}
