//! Turns raw verdict events from the datapath into [`MonitorEvent`]s a person can read:
//! names for reasons, protocols and endpoints, and the policies behind the deciding entry.
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use palisade_common::{VerdictEvent, direction, family, match_kind, proto, reason, verdict};

use crate::api::types::MonitorEvent;

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
    /// Cookie -> policies (`Kind/namespace/name`) behind it.
    pub cookies: BTreeMap<u32, Vec<String>>,
}

/// Decodes one raw event.
pub fn decode(ev: &VerdictEvent, ctx: &DecodeContext) -> MonitorEvent {
    MonitorEvent {
        ts_ns: ev.ts_ns,
        endpoint_id: ev.endpoint_id,
        endpoint: ctx.endpoints.get(&ev.endpoint_id).cloned(),
        direction: if ev.direction == direction::INGRESS { "ingress" } else { "egress" }.into(),
        verdict: if ev.verdict == verdict::DROP { "drop" } else { "allow" }.into(),
        reason: reason_name(ev.reason).into(),
        match_kind: match_kind_name(ev.match_kind).into(),
        src: addr(ev.family, &ev.saddr).to_string(),
        dst: addr(ev.family, &ev.daddr).to_string(),
        src_port: ev.sport,
        dst_port: ev.dport,
        protocol: protocol_name(ev.protocol),
        peer_identity: ev.peer_identity,
        policies: if ev.cookie == 0 { Vec::new() } else { ctx.cookies.get(&ev.cookie).cloned().unwrap_or_default() },
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
}
