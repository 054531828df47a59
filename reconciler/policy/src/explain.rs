//! Why a flow is allowed or dropped: the same decision the datapath takes, taken on the
//! resolver's output, with the rules behind it.
//!
//! The datapath looks the policy map up twice per packet, once with the peer's identity
//! and once with "any identity", each a longest-prefix match over (protocol, port); a deny
//! from either wins, else an allow from either passes, else the packet is dropped. This
//! module does exactly that on an [`EndpointPolicy`], so `policy explain` and the kernel
//! cannot disagree unless the maps differ from the desired state.
use serde::Serialize;

use crate::identity;
use crate::labels::LabelSet;
use crate::model::{Direction, Policy};
use crate::resolve::{EndpointPolicy, EntryKey, EntryValue, RuleOrigin};

/// The decision of one side (the source's egress or the destination's ingress).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "decision", rename_all = "kebab-case")]
pub enum Decision {
    /// No policy selects the endpoint for this direction: everything passes.
    NotSelected,
    /// An allow entry matched and no deny did.
    Allowed { entry: String, rules: Vec<RuleOrigin> },
    /// A deny entry matched (it wins over every allow).
    Denied { entry: String, rules: Vec<RuleOrigin> },
    /// The endpoint is enforced and nothing allows the flow.
    DefaultDeny,
    /// The endpoint is not on this node (its side is decided elsewhere).
    NotLocal,
}

impl Decision {
    /// Whether the packet passes this side.
    pub fn passes(&self) -> bool {
        matches!(self, Decision::NotSelected | Decision::Allowed { .. } | Decision::NotLocal)
    }
}

/// Length in bits of the (protocol, port) part an entry matches: 0 for any protocol, 8 for
/// a protocol with any port, 8 + the port prefix otherwise. Longer is more specific.
fn l4_bits(k: &EntryKey) -> u8 {
    if k.protocol == 0 { 0 } else { 8 + k.port_prefix_len }
}

fn l4_matches(k: &EntryKey, protocol: u8, port: u16) -> bool {
    if k.protocol == 0 {
        return true;
    }
    if k.protocol != protocol {
        return false;
    }
    let len = u32::from(k.port_prefix_len);
    let mask = u16::MAX.checked_shl(16 - len).unwrap_or(0);
    (port & mask) == (k.port & mask)
}

/// The longest-prefix entry for one identity, as one LPM lookup finds it.
fn longest(
    policy: &EndpointPolicy,
    direction: Direction,
    identity: u32,
    protocol: u8,
    port: u16,
) -> Option<(&EntryKey, &EntryValue)> {
    policy
        .entries
        .iter()
        .filter(|(k, _)| k.direction == direction && k.identity == identity && l4_matches(k, protocol, port))
        .max_by_key(|(k, _)| l4_bits(k))
}

/// Decides one side. `policy` is the endpoint's desired policy (`None`: no entries and not
/// enforced); for ICMP and ICMPv6 pass the type as `port`.
pub fn decide(policy: Option<&EndpointPolicy>, direction: Direction, peer: u32, protocol: u8, port: u16) -> Decision {
    let Some(policy) = policy else { return Decision::NotSelected };
    let enforced = match direction {
        Direction::Ingress => policy.ingress_enforced,
        Direction::Egress => policy.egress_enforced,
    };
    if !enforced {
        return Decision::NotSelected;
    }
    let exact = if peer == identity::ANY { None } else { longest(policy, direction, peer, protocol, port) };
    let any = longest(policy, direction, identity::ANY, protocol, port);
    let found = |(k, v): (&EntryKey, &EntryValue)| (k.to_string(), v.origins.iter().cloned().collect::<Vec<_>>());
    if let Some(hit) = exact.filter(|(_, v)| v.deny).or_else(|| any.filter(|(_, v)| v.deny)) {
        let (entry, rules) = found(hit);
        return Decision::Denied { entry, rules };
    }
    if let Some(hit) = exact.or(any) {
        let (entry, rules) = found(hit);
        return Decision::Allowed { entry, rules };
    }
    Decision::DefaultDeny
}

/// The policies that put an endpoint with `labels` under default deny in `direction`: those
/// with a NetworkPolicy-tier rule that selects it and enforces that direction (the same
/// test the resolver makes for `ingress_enforced`/`egress_enforced`). Each policy once, in
/// policy order. What a default deny names (`policy explain`, flow records).
pub fn default_deny_by<'a>(policies: &'a [Policy], labels: &LabelSet, direction: Direction) -> Vec<&'a Policy> {
    policies
        .iter()
        .filter(|p| p.tier.is_none())
        .filter(|p| {
            p.rules.iter().any(|r| {
                let enforces = match direction {
                    Direction::Ingress => r.enforce_ingress,
                    Direction::Egress => r.enforce_egress,
                };
                enforces && r.subject.matches(labels)
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::PolicyKind;
    use std::collections::BTreeSet;

    fn origin(name: &str) -> BTreeSet<RuleOrigin> {
        BTreeSet::from([RuleOrigin {
            kind: PolicyKind::CiliumNetworkPolicy,
            namespace: Some("default".into()),
            name: name.into(),
            direction: Direction::Ingress,
            rule_index: 0,
            peer_rule_index: 0,
            path: "spec.ingress[0]".into(),
            tier: None,
        }])
    }

    fn entry(p: &mut EndpointPolicy, identity: u32, protocol: u8, port: u16, len: u8, deny: bool, name: &str) {
        p.entries.insert(
            EntryKey { direction: Direction::Ingress, identity, protocol, port, port_prefix_len: len },
            EntryValue { deny, origins: origin(name).into() },
        );
    }

    #[test]
    fn follows_the_datapath_rules() {
        let mut p = EndpointPolicy { ingress_enforced: true, ..Default::default() };
        entry(&mut p, 256, 6, 8080, 16, false, "allow-web");
        entry(&mut p, 0, 6, 22, 16, true, "deny-ssh");
        entry(&mut p, 256, 6, 8000, 13, false, "allow-range");
        let d = |peer, proto, port| decide(Some(&p), Direction::Ingress, peer, proto, port);
        assert!(matches!(d(256, 6, 8080), Decision::Allowed { ref rules, .. } if rules[0].name == "allow-web"));
        assert!(matches!(d(256, 6, 8003), Decision::Allowed { ref rules, .. } if rules[0].name == "allow-range"));
        assert_eq!(d(256, 6, 8008), Decision::DefaultDeny);
        assert!(matches!(d(256, 6, 22), Decision::Denied { ref rules, .. } if rules[0].name == "deny-ssh"));
        assert_eq!(d(257, 17, 8080), Decision::DefaultDeny);
        assert_eq!(decide(Some(&p), Direction::Egress, 257, 6, 1), Decision::NotSelected);
        assert_eq!(decide(None, Direction::Ingress, 257, 6, 1), Decision::NotSelected);
    }

    #[test]
    fn any_protocol_and_wildcards() {
        let mut p = EndpointPolicy { ingress_enforced: true, ..Default::default() };
        entry(&mut p, 300, 0, 0, 0, false, "all-from-300");
        let d = decide(Some(&p), Direction::Ingress, 300, 1, 8);
        assert!(matches!(d, Decision::Allowed { ref entry, .. } if entry == "ingress from 300 *"));
        assert!(d.passes());
        assert!(!Decision::DefaultDeny.passes());
    }
}
