//! `palisade observe`: the flags of `hubble observe`, turned into a [`FlowQuery`], and the
//! compact and table lines of a flow. No agent needed here (unit-tested).
use palisade_api::flow::{Flow, FlowFilter, FlowQuery, parse_time};

/// The filter flags (each can be given several times: one of the values must match; all
/// the flags given must match).
#[derive(clap::Args, Clone, Debug, Default, PartialEq, Eq)]
pub struct FilterArgs {
    /// Source pod: `namespace/name` (or a prefix of the name; no namespace: `default`).
    #[arg(long, value_name = "NS/POD")]
    pub from_pod: Vec<String>,
    /// Destination pod.
    #[arg(long, value_name = "NS/POD")]
    pub to_pod: Vec<String>,
    #[arg(long, value_name = "NS")]
    pub from_namespace: Vec<String>,
    #[arg(long, value_name = "NS")]
    pub to_namespace: Vec<String>,
    /// Source label `key=value` or `key` (several, comma-separated: all of them).
    #[arg(long, value_name = "LABELS")]
    pub from_label: Vec<String>,
    #[arg(long, value_name = "LABELS")]
    pub to_label: Vec<String>,
    /// Source security identity.
    #[arg(long, value_name = "ID")]
    pub from_identity: Vec<u32>,
    #[arg(long, value_name = "ID")]
    pub to_identity: Vec<u32>,
    /// Source or destination address or prefix.
    #[arg(long, value_name = "IP|CIDR")]
    pub ip: Vec<String>,
    /// Source or destination port.
    #[arg(long)]
    pub port: Vec<u16>,
    /// TCP, UDP, SCTP, ICMP (`ICMPv4`), `ICMPv6`.
    #[arg(long)]
    pub protocol: Vec<String>,
    /// FORWARDED, DROPPED or AUDIT.
    #[arg(long)]
    pub verdict: Vec<String>,
    /// INGRESS or EGRESS (the point of view of the pod whose hook decided).
    #[arg(long)]
    pub traffic_direction: Vec<String>,
    /// `drop`, `policy-verdict` (a new flow policy allowed) or `trace` (any forwarded flow).
    #[arg(long = "type", value_name = "TYPE")]
    pub event_type: Vec<String>,
}

impl FilterArgs {
    pub fn to_filter(&self) -> FlowFilter {
        FlowFilter {
            source_pod: self.from_pod.clone(),
            destination_pod: self.to_pod.clone(),
            source_namespace: self.from_namespace.clone(),
            destination_namespace: self.to_namespace.clone(),
            source_label: self.from_label.clone(),
            destination_label: self.to_label.clone(),
            source_identity: self.from_identity.clone(),
            destination_identity: self.to_identity.clone(),
            ip: self.ip.clone(),
            port: self.port.clone(),
            protocol: self.protocol.clone(),
            verdict: self.verdict.iter().map(|v| v.to_ascii_uppercase()).collect(),
            traffic_direction: self.traffic_direction.iter().map(|v| v.to_ascii_uppercase()).collect(),
            event_type: self.event_type.clone(),
        }
    }
}

/// `palisade observe`.
#[derive(clap::Args, Clone, Debug, Default, PartialEq, Eq)]
pub struct ObserveArgs {
    #[command(flatten)]
    pub filters: FilterArgs,
    /// Negates the filter flag that follows it (`--not --verdict FORWARDED`); repeat it
    /// for each flag to negate. A flow is shown when it matches the other flags and none
    /// of the negated ones.
    #[arg(long)]
    pub not: bool,
    /// Only flows at or after: RFC 3339 in UTC (`2026-12-02T13:04:05Z`) or a time ago
    /// (`30s`, `5m`, `2h`, `1d`).
    #[arg(long)]
    pub since: Option<String>,
    /// Only flows at or before (same forms as --since).
    #[arg(long)]
    pub until: Option<String>,
    /// The last N matching flows of the buffer (default 20 unless --since).
    #[arg(long, value_name = "N")]
    pub last: Option<usize>,
    /// Keep printing new flows as they come.
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// The flows of every node's agent, merged by time: the agent of --socket and each
    /// `--agent SOCKET` (or `PALISADE_AGENTS=a.sock,b.sock`).
    #[arg(long)]
    pub all_nodes: bool,
}

/// The flags that take a value (all filter flags do); for [`split_not`].
const VALUE_FLAGS: &[&str] = &[
    "--from-pod",
    "--to-pod",
    "--from-namespace",
    "--to-namespace",
    "--from-label",
    "--to-label",
    "--from-identity",
    "--to-identity",
    "--ip",
    "--port",
    "--protocol",
    "--verdict",
    "--traffic-direction",
    "--type",
];

/// Takes the flags that a `--not` negates out of the arguments after `observe`: answers
/// (the arguments without them, the negated flags with their values). Arguments before
/// the `observe` subcommand are left alone.
pub fn split_not(args: Vec<String>) -> Result<(Vec<String>, Vec<String>), String> {
    let Some(at) = args.iter().position(|a| a == "observe") else { return Ok((args, Vec::new())) };
    let mut kept: Vec<String> = args[..=at].to_vec();
    let mut negated = Vec::new();
    let mut it = args.into_iter().skip(at + 1);
    while let Some(a) = it.next() {
        if a != "--not" {
            kept.push(a);
            continue;
        }
        let flag = it.next().ok_or("--not must be followed by a filter flag (e.g. --not --verdict FORWARDED)")?;
        let name = flag.split_once('=').map_or(flag.as_str(), |(n, _)| n).to_string();
        if !VALUE_FLAGS.contains(&name.as_str()) {
            return Err(format!("--not negates a filter flag ({}), not {flag:?}", VALUE_FLAGS.join(", ")));
        }
        let needs_value = !flag.contains('=');
        negated.push(flag);
        if needs_value {
            negated.push(it.next().ok_or_else(|| format!("{name} after --not needs a value"))?);
        }
    }
    Ok((kept, negated))
}

/// Parses negated flags (from [`split_not`]) into one filter per flag (a flow is hidden
/// when it matches any of them, as Hubble's blacklist).
pub fn negated_filters(negated: &[String]) -> Result<Vec<FlowFilter>, String> {
    #[derive(clap::Parser)]
    #[command(name = "--not", no_binary_name = true)]
    struct Not {
        #[command(flatten)]
        f: FilterArgs,
    }
    let mut out = Vec::new();
    let mut i = 0;
    while i < negated.len() {
        let n = if negated[i].contains('=') { 1 } else { 2 };
        let part = &negated[i..(i + n).min(negated.len())];
        let parsed = <Not as clap::Parser>::try_parse_from(part).map_err(|e| e.to_string())?;
        out.push(parsed.f.to_filter());
        i += n;
    }
    Ok(out)
}

/// The time now, in nanoseconds since the Unix epoch (what the flags' relative times
/// count back from).
pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

impl ObserveArgs {
    /// The query these flags ask, at `now_unix_ns`.
    pub fn query(&self, negated: &[String], now_unix_ns: u64) -> Result<FlowQuery, String> {
        let f = self.filters.to_filter();
        let since = self.since.as_deref().map(|t| parse_time(t, now_unix_ns)).transpose()?;
        let until = self.until.as_deref().map(|t| parse_time(t, now_unix_ns)).transpose()?;
        // As Hubble: the last 20 unless told otherwise (then, with --follow, new ones).
        let last = match (self.last, since) {
            (Some(n), _) => Some(n),
            (None, None) => Some(20),
            (None, Some(_)) => None,
        };
        let q = FlowQuery {
            whitelist: if f.is_empty() { Vec::new() } else { vec![f] },
            blacklist: negated_filters(negated)?,
            since_unix_ns: since,
            until_unix_ns: until,
            last,
            follow: self.follow,
        };
        q.validate()?;
        Ok(q)
    }
}

fn end(ep: &palisade_api::flow::FlowEndpoint, ip: &str, port: Option<u16>) -> String {
    let who = if ep.pod_name.is_empty() {
        let entity = ep.labels.first().map(|l| format!(" {l}")).unwrap_or_default();
        format!("{ip}{entity}")
    } else {
        ep.pod()
    };
    match port {
        Some(p) => format!("{who}:{p} (ID:{})", ep.identity),
        None => format!("{who} (ID:{})", ep.identity),
    }
}

/// `13:04:05.123` of an RFC 3339 time.
fn clock(time: &str) -> &str {
    time.split_once('T').map_or(time, |(_, t)| t.get(..12).unwrap_or(t))
}

fn l4_detail(f: &Flow) -> String {
    if let Some(p) = &f.l4.tcp {
        let flags = p.flags.as_ref().map(palisade_api::flow::TcpFlags::names).unwrap_or_default();
        return format!("TCP Flags: {flags}");
    }
    if let Some(i) = f.l4.icmpv4.as_ref().or(f.l4.icmpv6.as_ref()) {
        return format!("{} type {} code {}", f.l4.protocol_name(), i.icmp_type, i.code);
    }
    f.l4.protocol_name()
}

fn decided(f: &Flow) -> String {
    let mut names: Vec<String> = f
        .decided_by()
        .map(|p| match p.action.as_str() {
            "default-deny" => format!("{} (default deny)", p.policy_name()),
            _ if p.rule.is_empty() => p.policy_name(),
            _ => format!("{} {}", p.policy_name(), p.rule),
        })
        .collect();
    names.dedup();
    names.join(", ")
}

/// One line, as `hubble observe -o compact` prints, with the deciding policy.
pub fn compact_line(f: &Flow) -> String {
    let ports = f.l4.ports();
    let src = end(&f.source, &f.ip.source, ports.map(|p| p.source_port));
    let dst = end(&f.destination, &f.ip.destination, ports.map(|p| p.destination_port));
    let reason = f
        .drop_reason_desc
        .as_deref()
        .or(f.forward_reason_desc.as_deref().filter(|r| *r != "POLICY"))
        .map(|r| format!(" {r}"))
        .unwrap_or_default();
    let by = decided(f);
    let by = if by.is_empty() { String::new() } else { format!(" by {by}") };
    format!(
        "{} [{}]: {src} -> {dst} {} {}{reason} ({}){by}",
        clock(&f.time),
        f.node_name,
        f.traffic_direction,
        f.verdict,
        l4_detail(f)
    )
}

/// The row of `-o table`: TIME, SOURCE, DESTINATION, TYPE, VERDICT, SUMMARY.
pub fn table_row(f: &Flow) -> Vec<String> {
    let ports = f.l4.ports();
    let side = |ep: &palisade_api::flow::FlowEndpoint, ip: &str, port: Option<u16>| {
        let who = if ep.pod_name.is_empty() { ip.to_string() } else { ep.pod() };
        port.map_or(who.clone(), |p| format!("{who}:{p}"))
    };
    vec![
        clock(&f.time).to_string(),
        side(&f.source, &f.ip.source, ports.map(|p| p.source_port)),
        side(&f.destination, &f.ip.destination, ports.map(|p| p.destination_port)),
        f.event_type.clone(),
        f.verdict.clone(),
        f.summary.clone(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn not_negates_the_next_flag() {
        let (kept, neg) = split_not(args(
            "palisade --socket s observe --not --verdict FORWARDED --to-pod default/backend --not --port=53",
        ))
        .unwrap();
        assert_eq!(kept, args("palisade --socket s observe --to-pod default/backend"));
        assert_eq!(neg, args("--verdict FORWARDED --port=53"));
        let filters = negated_filters(&neg).unwrap();
        assert_eq!(filters.len(), 2);
        assert_eq!(filters[0].verdict, vec!["FORWARDED".to_string()]);
        assert_eq!(filters[1].port, vec![53]);
        assert!(split_not(args("palisade observe --not --follow")).unwrap_err().contains("negates a filter flag"));
        assert!(split_not(args("palisade observe --not")).is_err());
        assert!(split_not(args("palisade observe --not --ip")).is_err());
        // Nothing to do for other commands.
        assert_eq!(split_not(args("palisade status")).unwrap().0, args("palisade status"));
    }

    #[test]
    fn flags_make_the_query() {
        let a = ObserveArgs {
            filters: FilterArgs {
                from_pod: vec!["default/frontend".into()],
                verdict: vec!["dropped".into()],
                ..Default::default()
            },
            ..Default::default()
        };
        let q = a.query(&[], 0).unwrap();
        assert_eq!(q.last, Some(20), "hubble's default");
        assert_eq!(q.whitelist[0].verdict, vec!["DROPPED".to_string()]);
        assert_eq!(q.whitelist[0].source_pod, vec!["default/frontend".to_string()]);
        let follow = ObserveArgs { follow: true, since: Some("5m".into()), ..Default::default() };
        let q = follow.query(&[], 600_000_000_000).unwrap();
        assert_eq!((q.last, q.since_unix_ns, q.whitelist.len()), (None, Some(300_000_000_000), 0));
        let bad = ObserveArgs {
            filters: FilterArgs { verdict: vec!["DROP".into()], ..Default::default() },
            ..Default::default()
        };
        assert!(bad.query(&[], 0).unwrap_err().contains("DROPPED"));
        assert!(ObserveArgs { since: Some("yesterday".into()), ..Default::default() }.query(&[], 0).is_err());
    }

    #[test]
    fn a_compact_line_names_both_ends_and_the_policy() {
        use palisade_api::flow::{FlowEndpoint, FlowIp, FlowPolicy, Layer4, Ports, TcpFlags};
        let f = Flow {
            time: "2026-12-02T13:04:05.123456789Z".into(),
            verdict: "DROPPED".into(),
            drop_reason_desc: Some("POLICY_DENIED".into()),
            ip: FlowIp { source: "10.200.1.10".into(), destination: "10.200.1.11".into(), ip_version: "IPv4".into() },
            l4: Layer4 {
                tcp: Some(Ports { source_port: 4, destination_port: 9090, flags: Some(TcpFlags::from_byte(2)) }),
                ..Default::default()
            },
            source: FlowEndpoint {
                identity: 300,
                namespace: "default".into(),
                pod_name: "frontend".into(),
                ..Default::default()
            },
            destination: FlowEndpoint {
                identity: 301,
                namespace: "default".into(),
                pod_name: "backend".into(),
                ..Default::default()
            },
            node_name: "node".into(),
            traffic_direction: "INGRESS".into(),
            ingress_denied_by: vec![FlowPolicy {
                kind: "CiliumNetworkPolicy".into(),
                namespace: "default".into(),
                name: "allow-frontend-to-backend".into(),
                rule: String::new(),
                action: "default-deny".into(),
            }],
            ..Default::default()
        };
        assert_eq!(
            compact_line(&f),
            "13:04:05.123 [node]: default/frontend:4 (ID:300) -> default/backend:9090 (ID:301) INGRESS DROPPED \
             POLICY_DENIED (TCP Flags: SYN) by CiliumNetworkPolicy default/allow-frontend-to-backend (default deny)"
        );
        assert_eq!(table_row(&f)[1], "default/frontend:4");
    }
}
