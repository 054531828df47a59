//! The agent's verdict events: a background collector of the monitor stream, and the rules
//! that tie an event to a probe. A failed probe is a deny only when a policy drop of *that*
//! flow (addresses, protocol, ports, time) was reported *at the right place* (the source's
//! egress or the destination's ingress).
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use palisade_api::Client;
use palisade_api::types::MonitorEvent;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::error::SetupError;
use crate::scenario::ProbeProtocol;

/// Most events kept (probes are few; this bounds memory under a flood).
const MAX_EVENTS: usize = 200_000;

/// Collects verdict events in the background from the moment it is started.
pub struct Collector {
    events: Arc<Mutex<Vec<MonitorEvent>>>,
    count: watch::Receiver<usize>,
    /// Why the stream ended, if it did.
    ended: Arc<Mutex<Option<String>>>,
    task: JoinHandle<()>,
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Collector {
    pub async fn start(client: &Client) -> Result<Collector, SetupError> {
        let mut stream =
            crate::agent::call("opening the monitor stream", crate::agent::CALL_TIMEOUT, client.monitor()).await?;
        let events = Arc::new(Mutex::new(Vec::new()));
        let ended = Arc::new(Mutex::new(None));
        let (tx, count) = watch::channel(0usize);
        let task = tokio::spawn({
            let events = events.clone();
            let ended = ended.clone();
            async move {
                let why = loop {
                    match stream.next().await {
                        Ok(Some(ev)) => {
                            let mut v = events.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                            if v.len() < MAX_EVENTS {
                                v.push(ev);
                            }
                            let n = v.len();
                            drop(v);
                            tx.send_replace(n);
                        }
                        Ok(None) => break "the agent closed the monitor stream".to_string(),
                        Err(e) => break format!("monitor stream: {e}"),
                    }
                };
                *ended.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(why);
                tx.send_replace(usize::MAX);
            }
        });
        Ok(Collector { events, count, ended, task })
    }

    /// A copy of every event so far.
    pub fn snapshot(&self) -> Vec<MonitorEvent> {
        self.events.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Why the stream ended, if it did.
    pub fn ended(&self) -> Option<String> {
        self.ended.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// The first event matching `pred`, waiting up to `timeout` for it to arrive.
    pub async fn wait_for(&self, timeout: Duration, pred: impl Fn(&MonitorEvent) -> bool) -> Option<MonitorEvent> {
        let mut count = self.count.clone();
        let deadline = tokio::time::Instant::now() + timeout;
        let mut checked = 0;
        loop {
            {
                let v = self.events.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                if let Some(ev) = v[checked..].iter().find(|e| pred(e)) {
                    return Some(ev.clone());
                }
                checked = v.len();
            }
            if *count.borrow_and_update() == usize::MAX {
                return None;
            }
            match tokio::time::timeout_at(deadline, count.changed()).await {
                Ok(Ok(())) => {}
                _ => return None,
            }
        }
    }
}

/// An endpoint as the agent names it in events.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointRef {
    /// `namespace/name`.
    pub key: String,
    pub id: u32,
}

/// The flow a probe sent, to recognise its events.
#[derive(Clone, Debug)]
pub struct Flow {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub protocol: ProbeProtocol,
    /// Known for TCP and UDP.
    pub src_port: Option<u16>,
    /// Destination port (TCP, UDP); not compared for ICMP.
    pub dst_port: Option<u16>,
    /// The source when it is an endpoint of this node (its egress can drop).
    pub src_endpoint: Option<EndpointRef>,
    /// The destination when it is an endpoint of this node (its ingress can drop).
    pub dst_endpoint: Option<EndpointRef>,
    /// Events before this `CLOCK_MONOTONIC` time belong to earlier probes.
    pub since_ns: u64,
}

/// Drop reasons that are policy verdicts (`deny` observed); others (spoofed source,
/// malformed...) are not.
pub fn is_policy_drop(reason: &str) -> bool {
    matches!(reason, "policy-denied" | "deny-rule")
}

fn same_ip(text: &str, ip: IpAddr) -> bool {
    text.parse::<IpAddr>().is_ok_and(|a| a == ip)
}

fn same_protocol(text: &str, p: ProbeProtocol) -> bool {
    text.eq_ignore_ascii_case(p.as_str()) || text.parse::<u8>().is_ok_and(|n| n == p.number())
}

impl Flow {
    /// The event is about this flow in its forward direction (the probe's packets).
    pub fn is_forward(&self, ev: &MonitorEvent) -> bool {
        same_ip(&ev.src, self.src)
            && same_ip(&ev.dst, self.dst)
            && same_protocol(&ev.protocol, self.protocol)
            && (self.protocol.is_icmp()
                || (self.src_port.is_none_or(|p| p == ev.src_port) && self.dst_port.is_none_or(|p| p == ev.dst_port)))
            && (ev.ts_ns == 0 || ev.ts_ns >= self.since_ns)
    }

    /// Which end of the flow the event was reported at: `Some("egress")` at the source,
    /// `Some("ingress")` at the destination, `None` elsewhere.
    pub fn place<'a>(&self, ev: &'a MonitorEvent) -> Option<&'a str> {
        let at = |e: &Option<EndpointRef>| {
            e.as_ref().is_some_and(|e| ev.endpoint.as_deref().map_or(ev.endpoint_id == e.id, |k| k == e.key))
        };
        match ev.direction.as_str() {
            "egress" if at(&self.src_endpoint) => Some("egress"),
            "ingress" if at(&self.dst_endpoint) => Some("ingress"),
            _ => None,
        }
    }

    /// A policy drop of this flow at its source's egress or its destination's ingress.
    pub fn is_policy_drop(&self, ev: &MonitorEvent) -> bool {
        ev.verdict == "drop" && is_policy_drop(&ev.reason) && self.is_forward(ev) && self.place(ev).is_some()
    }

    /// Any drop of this flow or of its replies (for explaining an unexplained loss).
    pub fn is_related_drop(&self, ev: &MonitorEvent) -> bool {
        let addrs = (same_ip(&ev.src, self.src) && same_ip(&ev.dst, self.dst))
            || (same_ip(&ev.src, self.dst) && same_ip(&ev.dst, self.src));
        ev.verdict == "drop" && addrs && same_protocol(&ev.protocol, self.protocol) && ev.ts_ns >= self.since_ns
    }

    /// An AUDIT verdict (audit mode: passed, would have been dropped) of this flow at its
    /// source's egress or its destination's ingress.
    pub fn is_audit(&self, ev: &MonitorEvent) -> bool {
        ev.verdict == "audit" && self.is_forward(ev) && self.place(ev).is_some()
    }

    /// An allow of this flow at one of its ends.
    pub fn is_allow(&self, ev: &MonitorEvent) -> bool {
        ev.verdict == "allow" && self.is_forward(ev) && self.place(ev).is_some()
    }
}

/// What decided, in words: the policies named in the event or its reason.
pub fn describe(ev: &MonitorEvent) -> String {
    let reason = match ev.reason.as_str() {
        "policy-denied" => "default deny",
        "deny-rule" => "deny rule",
        "allowed-by-policy" => "policy",
        "not-enforced" => "not enforced",
        "reply" => "reply",
        "always-allowed" => "always allowed",
        other => other,
    };
    if ev.policies.is_empty() {
        reason.to_string()
    } else if ev.reason == "deny-rule" {
        format!("deny rule {}", ev.policies.join(", "))
    } else {
        ev.policies.join(", ")
    }
}

/// One line about an event, for details.
pub fn summary(ev: &MonitorEvent) -> String {
    format!(
        "{} {} {}:{} -> {}:{} at {} {} ({}{})",
        ev.verdict,
        ev.protocol,
        ev.src,
        ev.src_port,
        ev.dst,
        ev.dst_port,
        ev.endpoint.clone().unwrap_or_else(|| format!("endpoint {}", ev.endpoint_id)),
        ev.direction,
        ev.reason,
        if ev.policies.is_empty() { String::new() } else { format!(": {}", ev.policies.join(", ")) }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(direction: &str, endpoint: &str, verdict: &str, reason: &str) -> MonitorEvent {
        MonitorEvent {
            ts_ns: 2_000,
            endpoint_id: 2,
            endpoint: Some(endpoint.into()),
            direction: direction.into(),
            verdict: verdict.into(),
            reason: reason.into(),
            match_kind: "none".into(),
            src: "10.200.1.10".into(),
            dst: "10.200.1.11".into(),
            src_port: 40000,
            dst_port: 9090,
            protocol: "TCP".into(),
            peer_identity: 256,
            policies: vec![],
        }
    }

    fn flow() -> Flow {
        Flow {
            src: "10.200.1.10".parse().unwrap(),
            dst: "10.200.1.11".parse().unwrap(),
            protocol: ProbeProtocol::TCP,
            src_port: Some(40000),
            dst_port: Some(9090),
            src_endpoint: Some(EndpointRef { key: "default/frontend".into(), id: 1 }),
            dst_endpoint: Some(EndpointRef { key: "default/backend".into(), id: 2 }),
            since_ns: 1_000,
        }
    }

    #[test]
    fn policy_drop_at_destination_ingress_matches() {
        assert!(flow().is_policy_drop(&event("ingress", "default/backend", "drop", "policy-denied")));
        assert!(flow().is_policy_drop(&event("egress", "default/frontend", "drop", "deny-rule")));
    }

    #[test]
    fn drop_elsewhere_or_for_other_reasons_does_not_match() {
        // At the destination but in the egress direction: not this flow's verdict.
        assert!(!flow().is_policy_drop(&event("egress", "default/backend", "drop", "policy-denied")));
        assert!(!flow().is_policy_drop(&event("ingress", "default/backend", "drop", "spoofed-source")));
        assert!(!flow().is_policy_drop(&event("ingress", "default/backend", "allow", "allowed-by-policy")));
        let mut other_port = event("ingress", "default/backend", "drop", "policy-denied");
        other_port.src_port = 40001;
        assert!(!flow().is_policy_drop(&other_port));
        let mut earlier = event("ingress", "default/backend", "drop", "policy-denied");
        earlier.ts_ns = 500;
        assert!(!flow().is_policy_drop(&earlier));
    }

    #[test]
    fn describes_policies_or_reason() {
        let mut ev = event("ingress", "default/backend", "allow", "allowed-by-policy");
        ev.policies = vec!["CiliumNetworkPolicy/default/x".into()];
        assert_eq!(describe(&ev), "CiliumNetworkPolicy/default/x");
        assert_eq!(describe(&event("ingress", "b", "drop", "policy-denied")), "default deny");
    }
}
