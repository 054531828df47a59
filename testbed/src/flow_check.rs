//! `run --flows`: the flow records the agents emitted for each probe, and the "decided by"
//! column taken from them. The verdict events (the monitor stream the probe was judged
//! with) and the flow records come through two separate paths of the agent; the two must
//! agree, or the probe is an error.
use std::net::IpAddr;

use palisade_api::flow::{Flow as FlowRecord, FlowFilter, FlowQuery};

use crate::events::Flow;
use crate::report::Observed;
use crate::scenario::ProbeProtocol;

/// The query that finds a probe's records (by its destination and, when known, its
/// source port; [`belongs`] keeps only the probe's own).
pub fn query(flow: &Flow) -> FlowQuery {
    FlowQuery {
        whitelist: vec![FlowFilter {
            ip: vec![flow.dst.to_string()],
            port: flow.src_port.map(|p| vec![p]).unwrap_or_default(),
            ..FlowFilter::default()
        }],
        last: Some(1000),
        ..FlowQuery::default()
    }
}

fn same_protocol(r: &FlowRecord, p: ProbeProtocol) -> bool {
    let name = r.l4.protocol_name();
    match p {
        ProbeProtocol::ICMP => name == "ICMPv4",
        ProbeProtocol::ICMPv6 => name == "ICMPv6",
        other => name.eq_ignore_ascii_case(other.as_str()),
    }
}

/// Whether a record is of this probe's flow (not a reply), sent at or after
/// `since_unix_ns`.
pub fn belongs(r: &FlowRecord, flow: &Flow, since_unix_ns: u64) -> bool {
    let ip = |s: &str| s.parse::<IpAddr>().ok();
    let ports = r.l4.ports();
    ip(&r.ip.source) == Some(flow.src)
        && ip(&r.ip.destination) == Some(flow.dst)
        && !r.is_reply
        && same_protocol(r, flow.protocol)
        && flow.src_port.is_none_or(|sp| ports.is_some_and(|p| p.source_port == sp))
        && flow.dst_port.is_none_or(|dp| ports.is_none_or(|p| p.destination_port == dp))
        && palisade_api::flow::parse_time(&r.time, 0).is_ok_and(|t| t >= since_unix_ns)
}

fn names(list: &[palisade_api::flow::FlowPolicy], with_rule: bool) -> Vec<String> {
    let mut out: Vec<String> = list
        .iter()
        .map(|p| {
            // A built-in entry: its name, as the verdict events say it (`built-in` alone
            // when it has no other).
            let name = if p.kind == "built-in" && (p.name.is_empty() || p.name == "built-in") {
                "built-in".to_string()
            } else {
                p.policy_name()
            };
            if with_rule && !p.rule.is_empty() { format!("{name} {}", p.rule) } else { name }
        })
        .collect();
    out.dedup();
    out
}

/// "Decided by", from the records: for a drop, the reason and the policies (for a default
/// deny, those that put the endpoint into default deny) and where; for an allow, per side
/// the rules that allowed it (`not enforced` when no side is enforced).
pub fn decided_by(records: &[FlowRecord]) -> Option<String> {
    if let Some(d) = records.iter().find(|r| r.verdict == "DROPPED") {
        let list = if d.traffic_direction == "EGRESS" { &d.egress_denied_by } else { &d.ingress_denied_by };
        let by = names(list, false);
        // A tier's default deny (a selected endpoint after Pass) is a deny entry in the
        // datapath (POLICY_DENY) that the record attributes as a default deny.
        let default_deny = !list.is_empty() && list.iter().all(|p| p.action == "default-deny");
        let reason = match d.drop_reason_desc.as_deref() {
            Some("POLICY_DENIED") if by.is_empty() => "default deny".to_string(),
            Some("POLICY_DENIED") => format!("default deny by {}", by.join(", ")),
            Some("POLICY_DENY") if default_deny => format!("default deny by {}", by.join(", ")),
            Some("POLICY_DENY") => format!("deny rule {}", by.join(", ")),
            other => other.unwrap_or("dropped").to_string(),
        };
        return Some(format!("{reason} ({} {})", d.traffic_direction.to_ascii_lowercase(), d.observed_at));
    }
    let mut parts = Vec::new();
    for place in ["EGRESS", "INGRESS"] {
        let Some(r) = records.iter().find(|r| r.verdict == "FORWARDED" && r.traffic_direction == place) else {
            continue;
        };
        if r.forward_reason_desc.as_deref() == Some("NOT_ENFORCED") {
            continue;
        }
        let by = names(if place == "EGRESS" { &r.egress_allowed_by } else { &r.ingress_allowed_by }, true);
        let text = if by.is_empty() { r.forward_reason_desc.clone().unwrap_or_default() } else { by.join(", ") };
        parts.push(format!("{}: {text}", place.to_ascii_lowercase()));
    }
    if records.is_empty() {
        None
    } else if parts.is_empty() {
        Some("not enforced".into())
    } else {
        Some(parts.join("; "))
    }
}

/// Whether the records agree with what the verdict events said (`observed`, and the
/// events' "decided by" text): `Some(problem)` when not.
pub fn disagreement(observed: Observed, from_events: &str, records: &[FlowRecord]) -> Option<String> {
    if observed == Observed::Audit {
        // An audit hit's records (FORWARDED and AUDIT) are checked by the audit tests
        // (`testbed/tests/audit_privileged.rs`), not here.
        return None;
    }
    let drop = records.iter().find(|r| r.verdict == "DROPPED");
    match (observed, drop) {
        (Observed::Deny, None) => return Some("the drop has no flow record".into()),
        (Observed::Allow, Some(d)) => {
            return Some(format!("the probe got through but a flow record says dropped: {}", d.summary));
        }
        (Observed::Allow, None) if records.is_empty() => return Some("the allowed flow has no flow record".into()),
        _ => {}
    }
    let from_records = decided_by(records)?;
    // The same reason, place and policies (the events do not name the policies behind a
    // default deny: only the records do).
    let agree = match observed {
        Observed::Deny => {
            let (rec_head, rec_place) = from_records.rsplit_once(" (").unwrap_or((&from_records, ""));
            let (ev_head, ev_place) = from_events.rsplit_once(" (").unwrap_or((from_events, ""));
            rec_place == ev_place
                && if rec_head.starts_with("deny rule") {
                    rec_head == ev_head
                } else {
                    // The events name a tier's default deny by its built-in deny entry.
                    rec_head.split(" by ").next() == Some(ev_head)
                        || rec_head.starts_with("default deny by ") && ev_head == "deny rule built-in"
                }
        }
        Observed::Allow => {
            from_records == "not enforced" && from_events == "not enforced"
                || from_records.split("; ").all(|part| {
                    let (place, by) = part.split_once(": ").unwrap_or((part, ""));
                    from_events.split("; ").any(|e| {
                        e.strip_prefix(place).and_then(|r| r.strip_prefix(": ")).is_some_and(|e| {
                            e == "policy"
                                || by.split(", ").all(|rule| e.contains(rule.split(" spec.").next().unwrap_or(rule)))
                        })
                    })
                })
        }
        Observed::Error | Observed::Audit => true,
    };
    (!agree).then(|| format!("the flow records say \"{from_records}\" but the verdict events \"{from_events}\""))
}

#[cfg(test)]
mod tests {
    use super::*;
    use palisade_api::flow::FlowPolicy;

    fn record(verdict: &str, dir: &str) -> FlowRecord {
        FlowRecord {
            verdict: verdict.into(),
            traffic_direction: dir.into(),
            observed_at: "default/backend".into(),
            ..FlowRecord::default()
        }
    }

    fn cnp(name: &str, rule: &str, action: &str) -> FlowPolicy {
        FlowPolicy {
            kind: "CiliumNetworkPolicy".into(),
            namespace: "default".into(),
            name: name.into(),
            rule: rule.into(),
            action: action.into(),
        }
    }

    #[test]
    fn a_default_deny_names_the_policy_and_agrees_with_the_event() {
        let mut d = record("DROPPED", "INGRESS");
        d.drop_reason_desc = Some("POLICY_DENIED".into());
        d.ingress_denied_by = vec![cnp("allow-frontend-to-backend", "", "default-deny")];
        let recs = vec![record("FORWARDED", "EGRESS"), d];
        assert_eq!(
            decided_by(&recs).unwrap(),
            "default deny by CiliumNetworkPolicy default/allow-frontend-to-backend (ingress default/backend)"
        );
        assert_eq!(disagreement(Observed::Deny, "default deny (ingress default/backend)", &recs), None);
        assert!(disagreement(Observed::Deny, "default deny (egress default/frontend)", &recs).is_some());
        assert!(
            disagreement(Observed::Deny, "deny rule CiliumNetworkPolicy default/x (ingress default/backend)", &recs)
                .is_some()
        );
        assert!(disagreement(Observed::Allow, "ingress: policy", &recs).unwrap().contains("dropped"));
        // A tier's default deny: a deny entry in the datapath, a built-in one in the events.
        let mut t = recs[1].clone();
        t.drop_reason_desc = Some("POLICY_DENY".into());
        t.ingress_denied_by = vec![FlowPolicy { kind: "NetworkPolicy".into(), ..cnp("own-team", "", "default-deny") }];
        assert_eq!(
            decided_by(&[t.clone()]).unwrap(),
            "default deny by NetworkPolicy default/own-team (ingress default/backend)"
        );
        assert_eq!(disagreement(Observed::Deny, "deny rule built-in (ingress default/backend)", &[t]), None);
        assert!(
            disagreement(Observed::Deny, "default deny (ingress default/backend)", &recs[..1])
                .unwrap()
                .contains("no flow record")
        );
    }

    #[test]
    fn an_allow_names_the_rule_and_agrees_with_the_event() {
        let mut e = record("FORWARDED", "EGRESS");
        e.forward_reason_desc = Some("NOT_ENFORCED".into());
        let mut i = record("FORWARDED", "INGRESS");
        i.forward_reason_desc = Some("POLICY".into());
        i.ingress_allowed_by = vec![cnp("allow-frontend-to-backend", "spec.ingress[0]", "allow")];
        let recs = vec![e.clone(), i];
        assert_eq!(
            decided_by(&recs).unwrap(),
            "ingress: CiliumNetworkPolicy default/allow-frontend-to-backend spec.ingress[0]"
        );
        assert_eq!(
            disagreement(Observed::Allow, "ingress: CiliumNetworkPolicy default/allow-frontend-to-backend", &recs),
            None
        );
        assert_eq!(
            disagreement(
                Observed::Allow,
                "ingress: CiliumNetworkPolicy default/allow-frontend-to-backend spec.ingress[0]",
                &recs
            ),
            None
        );
        assert!(disagreement(Observed::Allow, "ingress: CiliumNetworkPolicy default/other", &recs).is_some());
        assert!(disagreement(Observed::Allow, "not enforced", &recs).is_some());
        assert_eq!(decided_by(&[e.clone()]).unwrap(), "not enforced");
        assert_eq!(disagreement(Observed::Allow, "not enforced", &[e]), None);
        assert!(disagreement(Observed::Allow, "not enforced", &[]).unwrap().contains("no flow record"));
        let mut b = recs[1].clone();
        b.ingress_allowed_by =
            vec![FlowPolicy { kind: "built-in".into(), name: "built-in".into(), ..FlowPolicy::default() }];
        assert_eq!(decided_by(&[b.clone()]).unwrap(), "ingress: built-in");
        assert_eq!(disagreement(Observed::Allow, "ingress: built-in", &[b]), None);
    }
}
