//! Flow records (`palisade observe`): one per verdict event of the datapath, both ends
//! named, with the policy that decided; the filters `observe` takes; and the stream the
//! agent answers `POST /v1/flows` with.
//!
//! Field names follow Hubble's flow JSON (`verdict`, `drop_reason_desc`, `source`,
//! `destination`, `l4`, `traffic_direction`, `is_reply`, `ingress_allowed_by`, ...), so
//! `jq` habits carry over. The filter ([`FlowFilter`], [`FlowQuery`]) is a plain function
//! of a flow: the agent applies it, and it is unit-tested here without a kernel.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One end of a flow (Hubble's `Endpoint`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowEndpoint {
    /// The local endpoint id (0: not a pod of this node).
    #[serde(rename = "ID", default)]
    pub id: u32,
    /// Security identity.
    pub identity: u32,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    /// Security labels (`k8s:app=backend`, `reserved:world`, `cidr:192.0.2.0/24`).
    #[serde(default)]
    pub labels: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pod_name: String,
}

impl FlowEndpoint {
    /// `namespace/pod`, or empty for a peer that is not a pod.
    pub fn pod(&self) -> String {
        if self.pod_name.is_empty() { String::new() } else { format!("{}/{}", self.namespace, self.pod_name) }
    }
}

/// Addresses (Hubble's `IP`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowIp {
    pub source: String,
    pub destination: String,
    /// `IPv4` or `IPv6`.
    #[serde(rename = "ipVersion")]
    pub ip_version: String,
}

/// TCP flags that were set (Hubble's `TCPFlags`: only the set ones appear).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[allow(clippy::struct_excessive_bools, reason = "one bool per TCP flag, as Hubble's JSON has them")]
pub struct TcpFlags {
    #[serde(rename = "FIN", default, skip_serializing_if = "is_false")]
    pub fin: bool,
    #[serde(rename = "SYN", default, skip_serializing_if = "is_false")]
    pub syn: bool,
    #[serde(rename = "RST", default, skip_serializing_if = "is_false")]
    pub rst: bool,
    #[serde(rename = "PSH", default, skip_serializing_if = "is_false")]
    pub psh: bool,
    #[serde(rename = "ACK", default, skip_serializing_if = "is_false")]
    pub ack: bool,
    #[serde(rename = "URG", default, skip_serializing_if = "is_false")]
    pub urg: bool,
}

#[allow(clippy::trivially_copy_pass_by_ref, reason = "serde's skip_serializing_if passes a reference")]
fn is_false(b: &bool) -> bool {
    !*b
}

impl TcpFlags {
    /// From the flags byte of the TCP header.
    pub fn from_byte(b: u8) -> TcpFlags {
        TcpFlags {
            fin: b & 0x01 != 0,
            syn: b & 0x02 != 0,
            rst: b & 0x04 != 0,
            psh: b & 0x08 != 0,
            ack: b & 0x10 != 0,
            urg: b & 0x20 != 0,
        }
    }

    /// `SYN, ACK`, as Hubble prints them.
    pub fn names(&self) -> String {
        let all = [
            (self.syn, "SYN"),
            (self.ack, "ACK"),
            (self.psh, "PSH"),
            (self.fin, "FIN"),
            (self.rst, "RST"),
            (self.urg, "URG"),
        ];
        all.iter().filter(|(on, _)| *on).map(|(_, n)| *n).collect::<Vec<_>>().join(", ")
    }
}

/// Ports of TCP, UDP or SCTP.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ports {
    pub source_port: u16,
    pub destination_port: u16,
    /// TCP only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flags: Option<TcpFlags>,
}

/// ICMP type and code.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Icmp {
    #[serde(rename = "type")]
    pub icmp_type: u8,
    pub code: u8,
}

/// Layer 4 (Hubble's `Layer4`: one of the protocols is set).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layer4 {
    #[serde(rename = "TCP", default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<Ports>,
    #[serde(rename = "UDP", default, skip_serializing_if = "Option::is_none")]
    pub udp: Option<Ports>,
    #[serde(rename = "SCTP", default, skip_serializing_if = "Option::is_none")]
    pub sctp: Option<Ports>,
    #[serde(rename = "ICMPv4", default, skip_serializing_if = "Option::is_none")]
    pub icmpv4: Option<Icmp>,
    #[serde(rename = "ICMPv6", default, skip_serializing_if = "Option::is_none")]
    pub icmpv6: Option<Icmp>,
    /// Another protocol's number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<u8>,
}

impl Layer4 {
    /// `TCP`, `UDP`, `SCTP`, `ICMPv4`, `ICMPv6` or the number.
    pub fn protocol_name(&self) -> String {
        if self.tcp.is_some() {
            "TCP".into()
        } else if self.udp.is_some() {
            "UDP".into()
        } else if self.sctp.is_some() {
            "SCTP".into()
        } else if self.icmpv4.is_some() {
            "ICMPv4".into()
        } else if self.icmpv6.is_some() {
            "ICMPv6".into()
        } else {
            self.protocol.map_or_else(|| "ANY".into(), |p| p.to_string())
        }
    }

    /// The ports, for the protocols that have them.
    pub fn ports(&self) -> Option<&Ports> {
        self.tcp.as_ref().or(self.udp.as_ref()).or(self.sctp.as_ref())
    }
}

/// A policy that decided a flow (Hubble's `Policy`, with the rule and how it decided).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowPolicy {
    /// `CiliumNetworkPolicy`, `NetworkPolicy`, ... or `built-in` for an entry no rule made.
    pub kind: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    pub name: String,
    /// The rule (`spec.ingress[0]`); empty for a default deny (no rule decided: the policy
    /// selects the endpoint and so puts it into default deny).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub rule: String,
    /// `allow` (an allow rule), `deny` (a deny rule) or `default-deny`.
    pub action: String,
}

impl FlowPolicy {
    /// `CiliumNetworkPolicy default/allow-frontend-to-backend`.
    pub fn policy_name(&self) -> String {
        if self.namespace.is_empty() {
            format!("{} {}", self.kind, self.name)
        } else {
            format!("{} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}

/// One flow record.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flow {
    /// RFC 3339 with nanoseconds, UTC.
    pub time: String,
    /// `FORWARDED` or `DROPPED` (`AUDIT` is reserved for audit mode).
    pub verdict: String,
    /// Why it was dropped: `POLICY_DENIED` (default deny), `POLICY_DENY` (a deny rule),
    /// `SPOOFED_SOURCE`, `MALFORMED`, `FRAGMENT_UNKNOWN`, `NO_ENDPOINT`, `L2_UNSUPPORTED`,
    /// `IPV6_EXTENSION_CHAIN`; absent for a forwarded flow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drop_reason_desc: Option<String>,
    /// How it was allowed: `POLICY`, `NOT_ENFORCED`, `REPLY`, `ALWAYS_ALLOWED`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forward_reason_desc: Option<String>,
    #[serde(rename = "IP")]
    pub ip: FlowIp,
    pub l4: Layer4,
    pub source: FlowEndpoint,
    pub destination: FlowEndpoint,
    /// `L3_L4`.
    #[serde(rename = "Type")]
    pub flow_type: String,
    pub node_name: String,
    /// `INGRESS` or `EGRESS`, from the point of view of the endpoint whose hook decided.
    pub traffic_direction: String,
    /// The endpoint whose hook decided (`namespace/pod`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub observed_at: String,
    /// `L3-L4`, `L3-only`, `L4-only`, `all` or `none`: how the deciding entry matched.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub policy_match_type: String,
    pub is_reply: bool,
    /// `drop` or `policy-verdict` (a new flow policy allowed).
    pub event_type: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ingress_allowed_by: Vec<FlowPolicy>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress_allowed_by: Vec<FlowPolicy>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ingress_denied_by: Vec<FlowPolicy>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress_denied_by: Vec<FlowPolicy>,
    /// palisade's addition, for a default deny: the nearest allow rule and what the flow
    /// lacks for it (the text `policy explain` gives as `nearestRule`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nearest_rule: Option<String>,
    /// Packet length in bytes.
    #[serde(default)]
    pub pkt_len: u32,
    /// One line saying why (the same words as `policy explain`).
    #[serde(rename = "Summary")]
    pub summary: String,
}

impl Flow {
    /// The policies that decided, whichever list they are in.
    pub fn decided_by(&self) -> impl Iterator<Item = &FlowPolicy> {
        self.ingress_allowed_by
            .iter()
            .chain(&self.egress_allowed_by)
            .chain(&self.ingress_denied_by)
            .chain(&self.egress_denied_by)
    }
}

/// One line of the `POST /v1/flows` answer (Hubble's `GetFlowsResponse`): a flow, or how
/// many flows the reader missed and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FlowsResponse {
    Flow(Box<Flow>),
    LostEvents(LostEvents),
}

/// Flows a reader did not get.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LostEvents {
    /// `FLOW_BUFFER`: overwritten in the agent's flow buffer before this query read them
    /// (the buffer holds `--flow-buffer-size` flows); `SLOW_READER`: a `--follow` reader
    /// fell behind the live flows.
    pub source: String,
    pub num_events_lost: u64,
}

/// What `observe` matches flows on (Hubble's `FlowFilter`): every field that is set must
/// match; within a field one of the values must.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FlowFilter {
    /// `namespace/pod`, or a prefix of it ending in the name's start (`default/back`).
    pub source_pod: Vec<String>,
    pub destination_pod: Vec<String>,
    pub source_namespace: Vec<String>,
    pub destination_namespace: Vec<String>,
    /// `key=value` or `key` (any value); with or without a source prefix (`k8s:app=web`).
    /// All the labels of one value (comma-separated) must be there.
    pub source_label: Vec<String>,
    pub destination_label: Vec<String>,
    pub source_identity: Vec<u32>,
    pub destination_identity: Vec<u32>,
    /// Source or destination address, or a prefix (`10.0.0.0/8`).
    pub ip: Vec<String>,
    /// Source or destination port.
    pub port: Vec<u16>,
    /// `TCP`, `UDP`, `SCTP`, `ICMPv4` (or `ICMP`), `ICMPv6`.
    pub protocol: Vec<String>,
    /// `FORWARDED`, `DROPPED`, `AUDIT`.
    pub verdict: Vec<String>,
    /// `INGRESS`, `EGRESS`.
    pub traffic_direction: Vec<String>,
    /// `drop`, `policy-verdict` (also `trace`: every forwarded flow).
    pub event_type: Vec<String>,
}

/// A query of the flow buffer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FlowQuery {
    /// A flow is shown when it matches one of these (none: every flow)...
    pub whitelist: Vec<FlowFilter>,
    /// ... and none of these (`--not`).
    pub blacklist: Vec<FlowFilter>,
    /// Unix nanoseconds: only flows at or after.
    pub since_unix_ns: Option<u64>,
    /// Unix nanoseconds: only flows at or before.
    pub until_unix_ns: Option<u64>,
    /// Only the last N matching flows of the buffer.
    pub last: Option<usize>,
    /// Keep the stream open and send new flows as they come.
    pub follow: bool,
}

fn pod_matches(pattern: &str, ep: &FlowEndpoint) -> bool {
    if ep.pod_name.is_empty() {
        return false;
    }
    let (ns, name) = pattern.split_once('/').unwrap_or(("default", pattern));
    ep.namespace == ns && ep.pod_name.starts_with(name)
}

fn label_matches(want: &str, have: &[String]) -> bool {
    want.split(',').map(str::trim).filter(|w| !w.is_empty()).all(|w| {
        let (wkey, wval) = match w.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (w, None),
        };
        have.iter().any(|h| {
            let (hkey, hval) = h.split_once('=').unwrap_or((h, ""));
            // Without a source prefix in the filter, any source matches.
            let key_ok = hkey == wkey || (!wkey.contains(':') && hkey.split_once(':').is_some_and(|(_, k)| k == wkey));
            key_ok && wval.is_none_or(|v| v == hval)
        })
    })
}

fn ip_matches(pattern: &str, ip: &str) -> bool {
    let Ok(addr) = ip.parse::<std::net::IpAddr>() else { return false };
    match pattern.split_once('/') {
        None => pattern.parse::<std::net::IpAddr>().is_ok_and(|p| p == addr),
        Some((net, len)) => {
            let (Ok(net), Ok(len)) = (net.parse::<std::net::IpAddr>(), len.parse::<u32>()) else { return false };
            match (net, addr) {
                (std::net::IpAddr::V4(n), std::net::IpAddr::V4(a)) if len <= 32 => {
                    let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
                    u32::from(n) & mask == u32::from(a) & mask
                }
                (std::net::IpAddr::V6(n), std::net::IpAddr::V6(a)) if len <= 128 => {
                    let mask = u128::MAX.checked_shl(128 - len).unwrap_or(0);
                    u128::from(n) & mask == u128::from(a) & mask
                }
                _ => false,
            }
        }
    }
}

fn protocol_matches(want: &str, l4: &Layer4) -> bool {
    let have = l4.protocol_name();
    let want = if want.eq_ignore_ascii_case("ICMP") { "ICMPv4" } else { want };
    have.eq_ignore_ascii_case(want)
}

fn any<T>(values: &[T], f: impl Fn(&T) -> bool) -> bool {
    values.is_empty() || values.iter().any(f)
}

impl FlowFilter {
    /// Whether `flow` matches every field that is set.
    pub fn matches(&self, flow: &Flow) -> bool {
        let ports = flow.l4.ports();
        any(&self.source_pod, |p| pod_matches(p, &flow.source))
            && any(&self.destination_pod, |p| pod_matches(p, &flow.destination))
            && any(&self.source_namespace, |n| *n == flow.source.namespace)
            && any(&self.destination_namespace, |n| *n == flow.destination.namespace)
            && any(&self.source_label, |l| label_matches(l, &flow.source.labels))
            && any(&self.destination_label, |l| label_matches(l, &flow.destination.labels))
            && any(&self.source_identity, |i| *i == flow.source.identity)
            && any(&self.destination_identity, |i| *i == flow.destination.identity)
            && any(&self.ip, |p| ip_matches(p, &flow.ip.source) || ip_matches(p, &flow.ip.destination))
            && any(&self.port, |p| ports.is_some_and(|x| x.source_port == *p || x.destination_port == *p))
            && any(&self.protocol, |p| protocol_matches(p, &flow.l4))
            && any(&self.verdict, |v| v.eq_ignore_ascii_case(&flow.verdict))
            && any(&self.traffic_direction, |d| d.eq_ignore_ascii_case(&flow.traffic_direction))
            && any(&self.event_type, |t| {
                t.eq_ignore_ascii_case(&flow.event_type)
                    || (t.eq_ignore_ascii_case("trace") && flow.verdict == "FORWARDED")
            })
    }

    /// Whether no field is set.
    pub fn is_empty(&self) -> bool {
        *self == FlowFilter::default()
    }

    /// Checks the values that have a fixed set (verdict, direction, type, protocol) and
    /// the addresses: a typo is an error, not a filter that matches nothing.
    pub fn validate(&self) -> Result<(), String> {
        let check = |field: &str, values: &[String], allowed: &[&str]| {
            for v in values {
                if !allowed.iter().any(|a| a.eq_ignore_ascii_case(v)) {
                    return Err(format!("{field} {v:?} is not one of {}", allowed.join(", ")));
                }
            }
            Ok(())
        };
        check("verdict", &self.verdict, &["FORWARDED", "DROPPED", "AUDIT"])?;
        check("traffic direction", &self.traffic_direction, &["INGRESS", "EGRESS"])?;
        check("type", &self.event_type, &["drop", "policy-verdict", "trace"])?;
        check("protocol", &self.protocol, &["TCP", "UDP", "SCTP", "ICMP", "ICMPv4", "ICMPv6"])?;
        for ip in &self.ip {
            let net = ip.split_once('/').map_or(ip.as_str(), |(n, _)| n);
            let len_ok = ip.split_once('/').is_none_or(|(_, l)| l.parse::<u8>().is_ok_and(|l| l <= 128));
            if net.parse::<std::net::IpAddr>().is_err() || !len_ok {
                return Err(format!("--ip {ip:?} is neither an address nor a prefix (10.0.0.0/8)"));
            }
        }
        Ok(())
    }
}

impl FlowQuery {
    /// Whether `flow` (recorded at `unix_ns`) is shown.
    pub fn matches(&self, flow: &Flow, unix_ns: u64) -> bool {
        self.since_unix_ns.is_none_or(|s| unix_ns >= s)
            && self.until_unix_ns.is_none_or(|u| unix_ns <= u)
            && (self.whitelist.is_empty() || self.whitelist.iter().any(|f| f.matches(flow)))
            && !self.blacklist.iter().any(|f| f.matches(flow))
    }

    pub fn validate(&self) -> Result<(), String> {
        self.whitelist.iter().chain(&self.blacklist).try_for_each(FlowFilter::validate)
    }
}

/// Unix nanoseconds as RFC 3339 in UTC with nanoseconds (`2026-12-02T13:04:05.123456789Z`).
pub fn rfc3339(unix_ns: u64) -> String {
    let secs = unix_ns / 1_000_000_000;
    let nanos = unix_ns % 1_000_000_000;
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(i64::try_from(days).unwrap_or(0));
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{nanos:09}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Days since 1970-01-01 -> (year, month, day) (the proleptic Gregorian calendar).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = u32::try_from(doy - (153 * mp + 2) / 5 + 1).unwrap_or(1);
    let m = u32::try_from(if mp < 10 { mp + 3 } else { mp - 9 }).unwrap_or(1);
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Parses `--since`/`--until`: RFC 3339 in UTC (`2026-12-02T13:04:05Z`, fractions
/// allowed) or a time ago (`30s`, `5m`, `2h`, `1d`), relative to `now_unix_ns`.
pub fn parse_time(text: &str, now_unix_ns: u64) -> Result<u64, String> {
    let t = text.trim();
    let bad =
        || format!("time {text:?} is neither RFC 3339 in UTC (2026-12-02T13:04:05Z) nor a time ago (30s, 5m, 2h, 1d)");
    if let Some(unit) = t.chars().last().filter(|c| "smhd".contains(*c)) {
        let n: u64 = t[..t.len() - 1].parse().map_err(|_| bad())?;
        let secs = match unit {
            's' => n,
            'm' => n * 60,
            'h' => n * 3600,
            'd' => n * 86_400,
            _ => return Err(bad()),
        };
        return Ok(now_unix_ns.saturating_sub(secs.saturating_mul(1_000_000_000)));
    }
    let t = t.strip_suffix('Z').ok_or_else(bad)?;
    let (date, time) = t.split_once('T').ok_or_else(bad)?;
    let mut dp = date.split('-');
    let (Some(y), Some(mo), Some(d), None) = (dp.next(), dp.next(), dp.next(), dp.next()) else { return Err(bad()) };
    let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
    let mut tp = hms.split(':');
    let (Some(h), Some(mi), Some(s), None) = (tp.next(), tp.next(), tp.next(), tp.next()) else { return Err(bad()) };
    let num = |s: &str| s.parse::<u32>().map_err(|_| bad());
    let (y, mo, d, h, mi, s) = (y.parse::<i64>().map_err(|_| bad())?, num(mo)?, num(d)?, num(h)?, num(mi)?, num(s)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || s > 60 || frac.len() > 9 {
        return Err(bad());
    }
    let nanos = if frac.is_empty() { 0 } else { u64::from(num(frac)?) * 10u64.pow(9 - frac.len() as u32) };
    let days = days_from_civil(y, mo, d);
    let secs = u64::try_from(days * 86_400).map_err(|_| bad())? + u64::from(h * 3600 + mi * 60 + s);
    Ok(secs * 1_000_000_000 + nanos)
}

/// Label lists as `key=value` maps are shown by `kubectl`: only the `k8s:` labels that are
/// not palisade's own (`io.kubernetes.pod.namespace`, `io.cilium.k8s.*`).
pub fn short_labels(labels: &[String]) -> BTreeMap<String, String> {
    labels
        .iter()
        .filter_map(|l| l.strip_prefix("k8s:"))
        .filter(|l| !l.starts_with("io.kubernetes.") && !l.starts_with("io.cilium."))
        .filter_map(|l| l.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow() -> Flow {
        Flow {
            verdict: "DROPPED".into(),
            drop_reason_desc: Some("POLICY_DENIED".into()),
            ip: FlowIp { source: "10.200.1.10".into(), destination: "10.200.1.11".into(), ip_version: "IPv4".into() },
            l4: Layer4 {
                tcp: Some(Ports { source_port: 40000, destination_port: 9090, flags: Some(TcpFlags::from_byte(2)) }),
                ..Default::default()
            },
            source: FlowEndpoint {
                id: 1,
                identity: 300,
                namespace: "default".into(),
                labels: vec!["k8s:app=frontend".into(), "k8s:io.kubernetes.pod.namespace=default".into()],
                pod_name: "frontend".into(),
            },
            destination: FlowEndpoint {
                id: 2,
                identity: 301,
                namespace: "default".into(),
                labels: vec!["k8s:app=backend".into()],
                pod_name: "backend".into(),
            },
            traffic_direction: "INGRESS".into(),
            event_type: "drop".into(),
            ..Default::default()
        }
    }

    #[test]
    fn every_set_field_must_match() {
        let f = flow();
        let m = |filter: FlowFilter| filter.matches(&f);
        assert!(m(FlowFilter::default()));
        assert!(m(FlowFilter { source_pod: vec!["default/frontend".into()], ..Default::default() }));
        assert!(m(FlowFilter { source_pod: vec!["default/front".into()], ..Default::default() }));
        assert!(m(FlowFilter { source_pod: vec!["frontend".into()], ..Default::default() }));
        assert!(!m(FlowFilter { source_pod: vec!["other-team/frontend".into()], ..Default::default() }));
        assert!(!m(FlowFilter { destination_pod: vec!["default/frontend".into()], ..Default::default() }));
        assert!(m(FlowFilter {
            source_pod: vec!["default/frontend".into()],
            destination_pod: vec!["default/backend".into()],
            verdict: vec!["dropped".into()],
            ..Default::default()
        }));
        assert!(!m(FlowFilter {
            source_pod: vec!["default/frontend".into()],
            verdict: vec!["FORWARDED".into()],
            ..Default::default()
        }));
        // One of the values of a field.
        assert!(m(FlowFilter { port: vec![1, 9090], ..Default::default() }));
        assert!(m(FlowFilter { port: vec![40000], ..Default::default() }));
        assert!(!m(FlowFilter { port: vec![8080], ..Default::default() }));
        assert!(m(FlowFilter { destination_namespace: vec!["default".into()], ..Default::default() }));
        assert!(m(FlowFilter { source_identity: vec![300], ..Default::default() }));
        assert!(!m(FlowFilter { destination_identity: vec![300], ..Default::default() }));
        assert!(m(FlowFilter { protocol: vec!["tcp".into()], ..Default::default() }));
        assert!(!m(FlowFilter { protocol: vec!["ICMP".into()], ..Default::default() }));
        assert!(m(FlowFilter { traffic_direction: vec!["ingress".into()], ..Default::default() }));
        assert!(m(FlowFilter { event_type: vec!["drop".into()], ..Default::default() }));
        assert!(!m(FlowFilter { event_type: vec!["trace".into()], ..Default::default() }));
    }

    #[test]
    fn labels_addresses_and_prefixes() {
        let f = flow();
        let m = |filter: FlowFilter| filter.matches(&f);
        assert!(m(FlowFilter { source_label: vec!["app=frontend".into()], ..Default::default() }));
        assert!(m(FlowFilter { source_label: vec!["k8s:app=frontend".into()], ..Default::default() }));
        assert!(m(FlowFilter { source_label: vec!["app".into()], ..Default::default() }));
        assert!(!m(FlowFilter { source_label: vec!["app=backend".into()], ..Default::default() }));
        assert!(!m(FlowFilter { source_label: vec!["app=frontend,tier=web".into()], ..Default::default() }));
        assert!(!m(FlowFilter { source_label: vec!["other:app=frontend".into()], ..Default::default() }));
        assert!(m(FlowFilter { destination_label: vec!["app=backend".into()], ..Default::default() }));
        assert!(m(FlowFilter { ip: vec!["10.200.1.11".into()], ..Default::default() }));
        assert!(m(FlowFilter { ip: vec!["10.200.0.0/16".into()], ..Default::default() }));
        assert!(!m(FlowFilter { ip: vec!["10.201.0.0/16".into()], ..Default::default() }));
        assert!(!m(FlowFilter { ip: vec!["fd00::/8".into()], ..Default::default() }));
    }

    #[test]
    fn query_whitelist_blacklist_and_time() {
        let f = flow();
        let q = FlowQuery {
            blacklist: vec![FlowFilter { destination_pod: vec!["default/backend".into()], ..Default::default() }],
            ..Default::default()
        };
        assert!(!q.matches(&f, 5));
        let q = FlowQuery {
            whitelist: vec![
                FlowFilter { port: vec![1], ..Default::default() },
                FlowFilter { port: vec![9090], ..Default::default() },
            ],
            since_unix_ns: Some(5),
            until_unix_ns: Some(10),
            ..Default::default()
        };
        assert!(q.matches(&f, 5) && q.matches(&f, 10));
        assert!(!q.matches(&f, 4) && !q.matches(&f, 11));
    }

    #[test]
    fn typos_are_errors() {
        let bad = FlowFilter { verdict: vec!["DROP".into()], ..Default::default() };
        assert!(bad.validate().unwrap_err().contains("FORWARDED, DROPPED, AUDIT"));
        assert!(FlowFilter { ip: vec!["10.0.0/8".into()], ..Default::default() }.validate().is_err());
        assert!(FlowFilter { protocol: vec!["tcpp".into()], ..Default::default() }.validate().is_err());
        let ok = FlowFilter { verdict: vec!["dropped".into()], ip: vec!["10.0.0.0/8".into()], ..Default::default() };
        assert!(ok.validate().is_ok());
    }

    #[test]
    fn times_round_trip() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000000000Z");
        let t = parse_time("2026-12-02T13:04:05.5Z", 0).unwrap();
        assert_eq!(rfc3339(t), "2026-12-02T13:04:05.500000000Z");
        assert_eq!(parse_time("2000-02-29T23:59:59Z", 0).map(rfc3339).unwrap(), "2000-02-29T23:59:59.000000000Z");
        assert_eq!(parse_time("5m", 600_000_000_000).unwrap(), 300_000_000_000);
        assert_eq!(parse_time("1h", 10).unwrap(), 0);
        for bad in ["yesterday", "5x", "5", "2026-13-01T00:00:00Z", "2026-12-02 13:04:05", ""] {
            assert!(parse_time(bad, 0).is_err(), "{bad}");
        }
    }

    #[test]
    fn json_uses_hubble_names() {
        let v = serde_json::to_value(flow()).unwrap();
        assert_eq!(v["l4"]["TCP"]["destination_port"], 9090);
        assert_eq!(v["l4"]["TCP"]["flags"]["SYN"], true);
        assert_eq!(v["source"]["pod_name"], "frontend");
        assert_eq!(v["drop_reason_desc"], "POLICY_DENIED");
        assert_eq!(v["IP"]["ipVersion"], "IPv4");
        let back: Flow = serde_json::from_value(v).unwrap();
        assert_eq!(back, flow());
        assert_eq!(short_labels(&flow().source.labels), BTreeMap::from([("app".into(), "frontend".into())]));
    }
}
