//! Flow records: every verdict event of the datapath turned into a [`Flow`] with both ends
//! named and the policy that decided ([`to_flow`]), kept in a bounded buffer
//! ([`FlowStore`]) that `palisade observe` queries and follows.
//!
//! Attribution: an allow or a deny names the rules of the deciding entry's cookie (the
//! entry `policy explain` finds is the same one: both look up the same resolved entries);
//! a default deny names the policies that put the endpoint into default deny in that
//! direction ([`palisade_policy::explain::default_deny_by`], which `policy explain` uses
//! too).
use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, Mutex};

use palisade_api::flow::{
    Flow, FlowEndpoint, FlowIp, FlowPolicy, FlowQuery, FlowsResponse, Icmp, Layer4, LostEvents, Ports, TcpFlags,
    rfc3339,
};
use palisade_common::{VerdictEvent, direction, family, proto, reason, verdict};
use tokio::sync::broadcast;

use crate::monitor::{BuiltinKey, DecodeContext, builtin_entry, match_kind_name};

/// Default of `--flow-buffer-size`: flows kept per agent (about 1 KiB each).
pub const DEFAULT_BUFFER_SIZE: usize = 4096;

/// Hubble's name of a drop reason.
pub fn drop_reason_desc(r: u8) -> &'static str {
    match r {
        reason::DROP_POLICY_DENIED => "POLICY_DENIED",
        reason::DROP_POLICY_DENY_RULE => "POLICY_DENY",
        reason::DROP_SPOOFED_SOURCE => "SPOOFED_SOURCE",
        reason::DROP_MALFORMED => "MALFORMED",
        reason::DROP_FRAGMENT_UNKNOWN => "FRAGMENT_UNKNOWN",
        reason::DROP_NO_ENDPOINT => "NO_ENDPOINT",
        reason::DROP_L2_UNSUPPORTED => "L2_UNSUPPORTED",
        reason::DROP_IPV6_EXT_CHAIN => "IPV6_EXTENSION_CHAIN",
        _ => "UNKNOWN",
    }
}

fn forward_reason_desc(r: u8) -> &'static str {
    match r {
        reason::ALLOWED_BY_POLICY => "POLICY",
        reason::ALLOWED_NOT_ENFORCED => "NOT_ENFORCED",
        reason::ALLOWED_REPLY => "REPLY",
        reason::ALLOWED_ALWAYS => "ALWAYS_ALLOWED",
        _ => "UNKNOWN",
    }
}

/// The `reserved:` label of a reserved identity (the policy crate's table of them).
fn reserved_label(id: u32) -> Option<String> {
    palisade_policy::identity::RESERVED.iter().find(|(n, _)| *n == id).map(|(_, name)| format!("reserved:{name}"))
}

fn addr(fam: u8, bytes: &[u8; 16]) -> IpAddr {
    if fam == family::IPV6 {
        IpAddr::V6(Ipv6Addr::from(*bytes))
    } else {
        IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
    }
}

fn local(ctx: &DecodeContext, id: u32) -> FlowEndpoint {
    match ctx.endpoint_info.get(&id) {
        Some(e) => FlowEndpoint {
            id,
            identity: e.identity,
            namespace: e.namespace.clone(),
            labels: e.labels.clone(),
            pod_name: e.name.clone(),
        },
        None => FlowEndpoint { id, ..Default::default() },
    }
}

fn peer(ctx: &DecodeContext, ip: IpAddr, peer_identity: u32) -> FlowEndpoint {
    if let Some(id) = ctx.by_ip.get(&ip) {
        return local(ctx, *id);
    }
    if let Some(n) = ctx.remote_names.get(&ip) {
        return FlowEndpoint {
            identity: peer_identity,
            namespace: n.namespace.clone(),
            pod_name: n.name.clone(),
            labels: n.labels.clone(),
            ..Default::default()
        };
    }
    let labels = match ctx.identity_labels.get(&peer_identity) {
        Some(l) => l.clone(),
        None => reserved_label(peer_identity).into_iter().collect(),
    };
    FlowEndpoint { identity: peer_identity, labels, ..Default::default() }
}

/// For a default deny: the nearest allow rule and what the flow lacks for it, the text
/// `policy explain` gives ([`palisade_policy::explain::nearest_allow`]). Runs per
/// default-deny drop only (a walk over the policies); the peer's labels come from the
/// local endpoint, the other node's pod or the identity's labels the flow record names.
fn nearest_rule(ctx: &DecodeContext, ev: &VerdictEvent, peer_ip: IpAddr, peer: &FlowEndpoint) -> Option<String> {
    use palisade_policy::labels::{Label, LabelSet};
    let (policies, endpoints) = ctx.policy_inputs()?;
    let me = endpoints.iter().find(|e| u32::from(e.id) == ev.endpoint_id)?;
    let local_peer = ctx.by_ip.get(&peer_ip).and_then(|id| endpoints.iter().find(|e| u32::from(e.id) == *id));
    let labels = if let Some(p) = local_peer {
        p.labels.clone()
    } else {
        let mut set = LabelSet::new();
        for l in &peer.labels {
            set.insert(Label::parse(l));
        }
        set
    };
    let ingress = ev.direction == direction::INGRESS;
    let dir = if ingress { palisade_policy::Direction::Ingress } else { palisade_policy::Direction::Egress };
    let named = match (ingress, local_peer) {
        (true, _) => me.named_ports.as_slice(),
        (false, Some(p)) => p.named_ports.as_slice(),
        (false, None) => &[],
    };
    let flow_peer = palisade_policy::explain::FlowPeer { labels: &labels, ip: Some(peer_ip) };
    // ICMP: the type is in `dport`, as `policy explain` takes it.
    palisade_policy::explain::nearest_allow(policies, &me.labels, dir, flow_peer, ev.protocol, ev.dport, named)
        .map(|n| n.to_string())
}

fn rule_policies(ctx: &DecodeContext, ev: &VerdictEvent, action: &str) -> Vec<FlowPolicy> {
    match ctx.origins.get(&ev.cookie) {
        Some(origins) if !origins.is_empty() => origins
            .iter()
            .map(|o| FlowPolicy {
                kind: o.kind.to_string(),
                namespace: o.namespace.clone().unwrap_or_default(),
                name: o.name.clone(),
                rule: o.path.clone(),
                action: action.into(),
            })
            .collect(),
        Some(_) => vec![FlowPolicy {
            kind: "built-in".into(),
            name: builtin_entry(BuiltinKey::of_event(ev)).trim_start_matches("built-in ").into(),
            action: action.into(),
            ..Default::default()
        }],
        None if ev.cookie == 0 => Vec::new(),
        None => vec![FlowPolicy {
            kind: "unknown".into(),
            name: format!("cookie {}", ev.cookie),
            action: action.into(),
            ..Default::default()
        }],
    }
}

fn l4(ev: &VerdictEvent) -> Layer4 {
    let ports = |flags| Some(Ports { source_port: ev.sport, destination_port: ev.dport, flags });
    // ICMP: the type is in `dport`, the code in `sport`.
    let icmp = || Some(Icmp { icmp_type: (ev.dport & 0xff) as u8, code: (ev.sport & 0xff) as u8 });
    match ev.protocol {
        proto::TCP => Layer4 { tcp: ports(Some(TcpFlags::from_byte(ev.tcp_flags))), ..Default::default() },
        proto::UDP => Layer4 { udp: ports(None), ..Default::default() },
        proto::SCTP => Layer4 { sctp: ports(None), ..Default::default() },
        proto::ICMP => Layer4 { icmpv4: icmp(), ..Default::default() },
        proto::ICMPV6 => Layer4 { icmpv6: icmp(), ..Default::default() },
        p => Layer4 { protocol: Some(p), ..Default::default() },
    }
}

/// The flow record of one verdict event; `unix_ns` is the event's wall-clock time.
pub fn to_flow(ev: &VerdictEvent, ctx: &DecodeContext, unix_ns: u64) -> Flow {
    let (src_ip, dst_ip) = (addr(ev.family, &ev.saddr), addr(ev.family, &ev.daddr));
    let ingress = ev.direction == direction::INGRESS;
    let dropped = ev.verdict == verdict::DROP;
    // Audit mode: the packet passed, and `reason`, `cookie` and `match_kind` are the audit
    // view's drop.
    let audit = ev.verdict == verdict::AUDIT;
    // The hook's endpoint is the destination at ingress, the source at egress; the other
    // end is the peer the datapath identified.
    let me = local(ctx, ev.endpoint_id);
    let here = me.pod();
    let (source, destination) =
        if ingress { (peer(ctx, src_ip, ev.peer_identity), me) } else { (me, peer(ctx, dst_ip, ev.peer_identity)) };
    let dir_name = if ingress { "ingress" } else { "egress" };
    let mut f = Flow {
        time: rfc3339(unix_ns),
        verdict: if audit {
            "AUDIT"
        } else if dropped {
            "DROPPED"
        } else {
            "FORWARDED"
        }
        .into(),
        drop_reason_desc: (dropped || audit).then(|| drop_reason_desc(ev.reason).to_string()),
        forward_reason_desc: (!dropped && !audit).then(|| forward_reason_desc(ev.reason).to_string()),
        ip: FlowIp {
            source: src_ip.to_string(),
            destination: dst_ip.to_string(),
            ip_version: if ev.family == family::IPV6 { "IPv6" } else { "IPv4" }.into(),
        },
        l4: l4(ev),
        source,
        destination,
        flow_type: "L3_L4".into(),
        node_name: ctx.node_name.clone(),
        traffic_direction: if ingress { "INGRESS" } else { "EGRESS" }.into(),
        observed_at: here.clone(),
        policy_match_type: match_kind_name(ev.match_kind).into(),
        is_reply: ev.reason == reason::ALLOWED_REPLY,
        event_type: if dropped { "drop" } else { "policy-verdict" }.into(),
        pkt_len: ev.pkt_len,
        ..Default::default()
    };
    let names = |ps: &[FlowPolicy]| {
        let mut n: Vec<String> = ps.iter().map(FlowPolicy::policy_name).collect();
        n.dedup();
        n.join(", ")
    };
    // A deny entry no rule made: the tier flattening's NetworkPolicy-tier default deny
    // (see `policy explain`): named as a default deny.
    let flattened_default_deny =
        ev.reason == reason::DROP_POLICY_DENY_RULE && ctx.origins.get(&ev.cookie).is_some_and(Vec::is_empty);
    let effective = if flattened_default_deny { reason::DROP_POLICY_DENIED } else { ev.reason };
    let (policies, summary) = match effective {
        reason::ALLOWED_BY_POLICY => {
            let p = rule_policies(ctx, ev, "allow");
            let rules: Vec<String> = p.iter().map(|p| format!("{} {}", p.policy_name(), p.rule)).collect();
            let s = format!("allowed at the {dir_name} of {here} by {}", rules.join(", ").trim());
            (p, s)
        }
        reason::DROP_POLICY_DENY_RULE if audit => {
            let p = rule_policies(ctx, ev, "audit");
            let rules: Vec<String> = p.iter().map(|p| format!("{} {}", p.policy_name(), p.rule)).collect();
            let s = format!(
                "audit: passed, but would be denied at the {dir_name} of {here} by the deny rule {}",
                rules.join(", ").trim()
            );
            (p, s)
        }
        reason::DROP_POLICY_DENIED if audit => {
            let d = usize::from(ev.direction & 1);
            let p =
                ctx.endpoint_info.get(&ev.endpoint_id).map(|e| e.audit_default_deny_by[d].clone()).unwrap_or_default();
            let s = format!(
                "audit: passed, but would be denied at the {dir_name} of {here} by default deny: {} selects it for \
                 {dir_name} and no rule allows the flow",
                names(&p)
            );
            (p, s)
        }
        reason::DROP_POLICY_DENY_RULE => {
            let p = rule_policies(ctx, ev, "deny");
            let rules: Vec<String> = p.iter().map(|p| format!("{} {}", p.policy_name(), p.rule)).collect();
            let s = format!("denied at the {dir_name} of {here} by the deny rule {}", rules.join(", ").trim());
            (p, s)
        }
        reason::DROP_POLICY_DENIED
            if ctx.endpoint_info.get(&ev.endpoint_id).is_some_and(|e| e.fail_closed[usize::from(ev.direction & 1)]) =>
        {
            let p = vec![FlowPolicy {
                kind: "built-in".into(),
                name: "fail-closed (map overflow)".into(),
                action: "default-deny".into(),
                ..Default::default()
            }];
            let s = format!(
                "fail closed at the {dir_name} of {here}: its policy entries do not fit in the maps, so it denies \
                 everything there (see `palisade status`, mapErrors)"
            );
            (p, s)
        }
        reason::DROP_POLICY_DENIED => {
            let d = usize::from(ev.direction & 1);
            let p = ctx.endpoint_info.get(&ev.endpoint_id).map(|e| e.default_deny_by[d].clone()).unwrap_or_default();
            let s = if p.is_empty() {
                format!("default deny at the {dir_name} of {here}")
            } else {
                let (peer_ip, peer) = if ingress { (src_ip, &f.source) } else { (dst_ip, &f.destination) };
                f.nearest_rule = nearest_rule(ctx, ev, peer_ip, peer);
                let near = f.nearest_rule.as_ref().map(|n| format!("; nearest rule {n}")).unwrap_or_default();
                format!(
                    "default deny at the {dir_name} of {here}: {} selects it for {dir_name} and no rule allows the \
                     flow{near}",
                    names(&p)
                )
            };
            (p, s)
        }
        reason::ALLOWED_NOT_ENFORCED => (Vec::new(), format!("no policy selects {here} for {dir_name}")),
        reason::ALLOWED_REPLY => (Vec::new(), "reply of an allowed connection".into()),
        reason::ALLOWED_ALWAYS => (Vec::new(), "always allowed (ARP, neighbour discovery)".into()),
        r => (Vec::new(), format!("dropped: {}", crate::monitor::reason_name(r))),
    };
    f.summary = summary;
    match (ingress, dropped || audit) {
        (true, false) => f.ingress_allowed_by = policies,
        (false, false) => f.egress_allowed_by = policies,
        (true, true) => f.ingress_denied_by = policies,
        (false, true) => f.egress_denied_by = policies,
    }
    f
}

/// The offset of `CLOCK_REALTIME` from `CLOCK_MONOTONIC` (what turns an event's
/// `bpf_ktime_get_ns()` into wall-clock time).
///
/// The wall clock is read between two monotonic readings and compared with their midpoint;
/// of a few tries the one with the narrowest window counts. A thread preempted between two
/// plain readings would otherwise be off by the whole preemption (hundreds of µs on a busy
/// machine), enough to order two agents' records of one packet the wrong way round.
pub fn monotonic_to_unix_offset() -> i128 {
    let read = |clock| {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: `ts` is a valid, writable timespec; the clocks always exist on Linux.
        unsafe { libc::clock_gettime(clock, &raw mut ts) };
        i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
    };
    let mut best: Option<(i128, i128)> = None;
    for _ in 0..4 {
        let before = read(libc::CLOCK_MONOTONIC);
        let real = read(libc::CLOCK_REALTIME);
        let after = read(libc::CLOCK_MONOTONIC);
        let window = after - before;
        if best.is_none_or(|(w, _)| window < w) {
            best = Some((window, real - i128::midpoint(before, after)));
        }
    }
    best.map_or(0, |(_, offset)| offset)
}

/// A recorded flow.
#[derive(Debug)]
pub struct Stored {
    pub seq: u64,
    pub unix_ns: u64,
    pub flow: Flow,
}

#[derive(Debug, Default)]
struct Buffer {
    flows: VecDeque<Arc<Stored>>,
    next_seq: u64,
}

/// The flow buffer: the last `capacity` flows, and a feed of new ones for followers.
#[derive(Clone, Debug)]
pub struct FlowStore {
    buf: Arc<Mutex<Buffer>>,
    capacity: usize,
    live: broadcast::Sender<Arc<Stored>>,
    pacer: Arc<Pacer>,
}

/// The verdict-event reader's batching window (it reads the events of a burst together,
/// one wake-up per window), and a way for a query to have what the kernel reported before
/// it recorded first: a query during a window cuts the window short and waits for it.
#[derive(Debug)]
struct Pacer {
    reader: std::sync::OnceLock<std::thread::Thread>,
    in_window: std::sync::atomic::AtomicBool,
    /// Windows completed.
    done: tokio::sync::watch::Sender<u64>,
}

impl FlowStore {
    pub fn new(capacity: usize) -> FlowStore {
        let capacity = capacity.max(1);
        let pacer = Pacer {
            reader: std::sync::OnceLock::new(),
            in_window: std::sync::atomic::AtomicBool::new(false),
            done: tokio::sync::watch::Sender::new(0),
        };
        FlowStore {
            buf: Arc::default(),
            capacity,
            live: broadcast::channel(capacity.min(65_536)).0,
            pacer: Arc::new(pacer),
        }
    }

    /// Called by the event reader's thread after a wake-up: waits `window` (less if a query
    /// asks for the flows meanwhile) for more events to read with the first.
    pub fn wait_window(&self, window: std::time::Duration) {
        use std::sync::atomic::Ordering;
        self.pacer.reader.get_or_init(std::thread::current);
        self.pacer.in_window.store(true, Ordering::SeqCst);
        std::thread::park_timeout(window);
    }

    /// Called by the event reader's thread once the events read after a window are recorded.
    pub fn window_done(&self) {
        self.pacer.in_window.store(false, std::sync::atomic::Ordering::SeqCst);
        self.pacer.done.send_modify(|n| *n += 1);
    }

    /// Before a query: if the reader is in a window, has it end now and waits (at most
    /// 200 ms) until its events are recorded, so a flow the kernel reported before the
    /// query is in the answer.
    pub async fn flush(&self) {
        if !self.pacer.in_window.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let mut rx = self.pacer.done.subscribe();
        let seen = *rx.borrow_and_update();
        if let Some(t) = self.pacer.reader.get() {
            t.unpark();
        }
        let _ = tokio::time::timeout(std::time::Duration::from_millis(200), rx.wait_for(|n| *n > seen)).await;
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Records a flow (the oldest goes when the buffer is full).
    pub fn push(&self, unix_ns: u64, flow: Flow) {
        let stored = {
            let Ok(mut b) = self.buf.lock() else { return };
            let stored = Arc::new(Stored { seq: b.next_seq, unix_ns, flow });
            b.next_seq += 1;
            if b.flows.len() == self.capacity {
                b.flows.pop_front();
            }
            b.flows.push_back(stored.clone());
            stored
        };
        let _ = self.live.send(stored);
    }

    /// How many flows have been recorded (and how many of them were overwritten).
    pub fn counts(&self) -> (u64, u64) {
        let Ok(b) = self.buf.lock() else { return (0, 0) };
        (b.next_seq, b.next_seq - b.flows.len() as u64)
    }

    /// What a query reads from the buffer now: the matching flows (the last `query.last`
    /// of them), preceded by a lost-events note when flows the query asks for were
    /// overwritten: with `last`, when fewer than `last` match and flows were overwritten
    /// (at most that many were missed); with `since`, when flows at or after it were
    /// overwritten. Subscribes the follower first when `follow` (so nothing falls between).
    pub fn query(&self, q: &FlowQuery) -> (Vec<FlowsResponse>, Option<broadcast::Receiver<Arc<Stored>>>, u64) {
        let rx = q.follow.then(|| self.live.subscribe());
        let Ok(b) = self.buf.lock() else { return (Vec::new(), rx, 0) };
        let overwritten = b.next_seq - b.flows.len() as u64;
        let mut hits: Vec<&Arc<Stored>> = b.flows.iter().filter(|s| q.matches(&s.flow, s.unix_ns)).collect();
        let mut lost = 0;
        if let Some(n) = q.last {
            if hits.len() > n {
                hits.drain(..hits.len() - n);
            } else if overwritten > 0 {
                lost = overwritten.min((n - hits.len()) as u64);
            }
        }
        if q.last.is_none()
            && let (Some(since), Some(oldest)) = (q.since_unix_ns, b.flows.front())
            && oldest.unix_ns > since
            && overwritten > 0
        {
            lost = overwritten;
        }
        let mut out = Vec::with_capacity(hits.len() + 1);
        if lost > 0 {
            crate::metrics::global().flows_lost("flow-buffer", lost);
            out.push(FlowsResponse::LostEvents(LostEvents { source: "FLOW_BUFFER".into(), num_events_lost: lost }));
        }
        out.extend(hits.iter().map(|s| FlowsResponse::Flow(Box::new(s.flow.clone()))));
        (out, rx, b.next_seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::monitor::EndpointNames;

    #[test]
    fn the_clock_offset_turns_monotonic_time_into_the_wall_clock() {
        let offset = monotonic_to_unix_offset();
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: `ts` is a valid, writable timespec.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
        let mono = i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec);
        let wall = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        let converted = mono + offset;
        // Read one after the other, so the converted time is a little earlier than the wall's.
        let diff = i128::try_from(wall).unwrap() - converted;
        assert!((0..1_000_000_000).contains(&diff), "monotonic + offset is {diff} ns from the wall clock");
    }

    fn ctx() -> DecodeContext {
        let mut c = DecodeContext::default();
        c.node_name = "node-1".into();
        let backend = EndpointNames {
            namespace: "default".into(),
            name: "backend".into(),
            identity: 301,
            labels: vec!["k8s:app=backend".into()],
            default_deny_by: [
                vec![FlowPolicy {
                    kind: "CiliumNetworkPolicy".into(),
                    namespace: "default".into(),
                    name: "allow-frontend-to-backend".into(),
                    rule: String::new(),
                    action: "default-deny".into(),
                }],
                Vec::new(),
            ],
            audit_default_deny_by: [Vec::new(), Vec::new()],
            fail_closed: [false; 2],
        };
        c.endpoint_info.insert(2, backend);
        c.endpoint_info.insert(
            1,
            EndpointNames { namespace: "default".into(), name: "frontend".into(), identity: 300, ..Default::default() },
        );
        c.by_ip.insert("10.200.1.10".parse().unwrap(), 1);
        c.by_ip.insert("10.200.1.11".parse().unwrap(), 2);
        c
    }

    fn event(r: u8, cookie: u32) -> VerdictEvent {
        let mut ev = VerdictEvent {
            endpoint_id: 2,
            direction: direction::INGRESS,
            verdict: if reason::is_drop(r) { verdict::DROP } else { verdict::ALLOW },
            reason: r,
            family: family::IPV4,
            protocol: proto::TCP,
            sport: 40000,
            dport: 9090,
            peer_identity: 300,
            tcp_flags: 0x02,
            cookie,
            ..Default::default()
        };
        ev.saddr[..4].copy_from_slice(&[10, 200, 1, 10]);
        ev.daddr[..4].copy_from_slice(&[10, 200, 1, 11]);
        ev
    }

    #[test]
    fn a_default_deny_names_the_policies_that_isolate() {
        let f = to_flow(&event(reason::DROP_POLICY_DENIED, 0), &ctx(), 1_000_000_000);
        assert_eq!((f.verdict.as_str(), f.drop_reason_desc.as_deref()), ("DROPPED", Some("POLICY_DENIED")));
        assert_eq!((f.source.pod(), f.destination.pod()), ("default/frontend".into(), "default/backend".into()));
        assert_eq!(f.ingress_denied_by[0].policy_name(), "CiliumNetworkPolicy default/allow-frontend-to-backend");
        assert_eq!(f.ingress_denied_by[0].action, "default-deny");
        assert!(f.summary.contains("selects it for ingress"), "{}", f.summary);
        assert_eq!(f.l4.tcp.as_ref().unwrap().flags.as_ref().unwrap().names(), "SYN");
        assert_eq!(f.time, "1970-01-01T00:00:01.000000000Z");
        assert_eq!(f.node_name, "node-1");
    }

    /// The origin of the first ingress rule of CiliumNetworkPolicy `default/name`.
    fn cnp_ingress_rule(name: &str, path: &str) -> palisade_policy::RuleOrigin {
        palisade_policy::RuleOrigin {
            kind: palisade_policy::PolicyKind::CiliumNetworkPolicy,
            namespace: Some("default".into()),
            name: name.into(),
            direction: palisade_policy::Direction::Ingress,
            rule_index: 0,
            peer_rule_index: 0,
            path: path.into(),
            tier: None,
        }
    }

    #[test]
    fn an_allow_names_its_rule_and_a_world_peer_its_entity() {
        let mut c = ctx();
        c.origins.insert(5, vec![cnp_ingress_rule("allow-frontend-to-backend", "spec.ingress[0]")]);
        let f = to_flow(&event(reason::ALLOWED_BY_POLICY, 5), &c, 0);
        assert_eq!(f.verdict, "FORWARDED");
        assert_eq!(f.ingress_allowed_by[0].rule, "spec.ingress[0]");
        assert!(f.summary.contains("CiliumNetworkPolicy default/allow-frontend-to-backend spec.ingress[0]"));
        let mut ev = event(reason::DROP_SPOOFED_SOURCE, 0);
        ev.saddr[..4].copy_from_slice(&[192, 0, 2, 1]);
        ev.peer_identity = palisade_common::identity::WORLD_IPV4;
        let f = to_flow(&ev, &c, 0);
        assert_eq!(f.source.labels, vec!["reserved:world-ipv4".to_string()]);
        assert_eq!(f.drop_reason_desc.as_deref(), Some("SPOOFED_SOURCE"));
        assert!(f.ingress_denied_by.is_empty());
        // A deny entry without rules (the tier flattening's default deny) is named as one.
        c.origins.insert(6, Vec::new());
        let f = to_flow(&event(reason::DROP_POLICY_DENY_RULE, 6), &c, 0);
        assert_eq!(f.ingress_denied_by[0].action, "default-deny");
        assert_eq!(f.ingress_denied_by[0].name, "allow-frontend-to-backend");
        // An endpoint failing closed (map overflow) says so, not which policies select it.
        c.endpoint_info.get_mut(&2).unwrap().fail_closed = [true, false];
        let f = to_flow(&event(reason::DROP_POLICY_DENIED, 0), &c, 0);
        assert_eq!(f.ingress_denied_by[0].policy_name(), "built-in fail-closed (map overflow)");
        assert!(f.summary.starts_with("fail closed at the ingress of default/backend"), "{}", f.summary);
    }

    /// Audit mode: an AUDIT event is a forwarded packet that the audit view would drop; its
    /// record says AUDIT, the would-be drop reason, and the audited policy (rule, or the
    /// policy that would make the endpoint default-deny) with action `audit`, which is what
    /// `palisade_policy_verdicts_total{action="audit"}` counts.
    #[test]
    fn an_audit_verdict_names_the_audited_policy() {
        let mut c = ctx();
        c.origins.insert(9, vec![cnp_ingress_rule("deny-metrics", "spec.ingressDeny[0]")]);
        let audit = |r, cookie| VerdictEvent { verdict: verdict::AUDIT, ..event(r, cookie) };
        let f = to_flow(&audit(reason::DROP_POLICY_DENY_RULE, 9), &c, 0);
        assert_eq!((f.verdict.as_str(), f.drop_reason_desc.as_deref()), ("AUDIT", Some("POLICY_DENY")));
        assert_eq!(f.forward_reason_desc, None);
        assert_eq!(f.event_type, "policy-verdict");
        let by: Vec<_> = f.decided_by().map(|p| (p.policy_name(), p.rule.clone(), p.action.clone())).collect();
        assert_eq!(
            by,
            vec![("CiliumNetworkPolicy default/deny-metrics".into(), "spec.ingressDeny[0]".into(), "audit".into())]
        );
        assert!(f.summary.starts_with("audit: passed, but would be denied at the ingress of default/backend"));

        c.endpoint_info.get_mut(&2).unwrap().audit_default_deny_by[0] = vec![FlowPolicy {
            kind: "NetworkPolicy".into(),
            namespace: "default".into(),
            name: "isolate".into(),
            rule: String::new(),
            action: "audit".into(),
        }];
        let f = to_flow(&audit(reason::DROP_POLICY_DENIED, 0), &c, 0);
        assert_eq!((f.verdict.as_str(), f.drop_reason_desc.as_deref()), ("AUDIT", Some("POLICY_DENIED")));
        assert_eq!(f.ingress_denied_by[0].policy_name(), "NetworkPolicy default/isolate");
        assert!(f.summary.contains("by default deny: NetworkPolicy default/isolate selects it"), "{}", f.summary);
    }

    #[test]
    fn a_pod_of_another_node_is_named_from_the_identity_cache() {
        let mut c = ctx();
        let remote = Arc::new(palisade_node::ipcache::RemotePodName {
            namespace: "shop".into(),
            name: "db".into(),
            labels: vec!["k8s:app=db".into()],
        });
        c.remote_names = Arc::new([("10.200.2.20".parse().unwrap(), remote)].into_iter().collect());
        // frontend (local, egress) to the remote db.
        let mut ev = event(reason::DROP_POLICY_DENIED, 0);
        ev.endpoint_id = 1;
        ev.direction = direction::EGRESS;
        ev.daddr[..4].copy_from_slice(&[10, 200, 2, 20]);
        ev.peer_identity = 410;
        let f = to_flow(&ev, &c, 0);
        assert_eq!((f.source.pod(), f.destination.pod()), ("default/frontend".into(), "shop/db".into()));
        assert_eq!((f.destination.identity, f.destination.labels.clone()), (410, vec!["k8s:app=db".to_string()]));
        // An address the cache does not name stays an address with its identity.
        ev.daddr[..4].copy_from_slice(&[10, 200, 2, 21]);
        let f = to_flow(&ev, &c, 0);
        assert_eq!((f.destination.pod_name.as_str(), f.destination.identity), ("", 410));
    }

    #[test]
    fn the_buffer_is_bounded_and_tells_what_was_overwritten() {
        let s = FlowStore::new(3);
        for i in 0..5u64 {
            let mut f = to_flow(&event(reason::DROP_POLICY_DENIED, 0), &ctx(), i);
            f.l4.tcp.as_mut().unwrap().source_port = u16::try_from(i).unwrap();
            s.push(i, f);
        }
        assert_eq!(s.counts(), (5, 2));
        let (out, rx, _) = s.query(&FlowQuery { last: Some(2), ..Default::default() });
        assert!(rx.is_none());
        assert_eq!(out.len(), 2);
        let (out, _, _) = s.query(&FlowQuery { last: Some(10), ..Default::default() });
        assert_eq!(out[0], FlowsResponse::LostEvents(LostEvents { source: "FLOW_BUFFER".into(), num_events_lost: 2 }));
        assert_eq!(out.len(), 4);
        let (out, _, _) = s.query(&FlowQuery { since_unix_ns: Some(3), ..Default::default() });
        assert_eq!(out.len(), 2, "flows 3 and 4, and nothing lost after 3");
        let (out, _, _) = s.query(&FlowQuery { since_unix_ns: Some(0), ..Default::default() });
        assert!(matches!(out[0], FlowsResponse::LostEvents(_)));
    }

    #[test]
    fn a_follower_gets_new_flows_and_learns_what_it_missed() {
        use tokio::sync::broadcast::error::TryRecvError;
        let s = FlowStore::new(4);
        let flow = || to_flow(&event(reason::DROP_POLICY_DENIED, 0), &ctx(), 0);
        s.push(0, flow());
        let (out, rx, next) = s.query(&FlowQuery { follow: true, ..Default::default() });
        let mut rx = rx.expect("a follower");
        assert_eq!((out.len(), next), (1, 1));
        s.push(1, flow());
        assert_eq!(rx.try_recv().unwrap().seq, 1);
        // The live feed holds as many flows as the buffer (rounded up to a power of two): a
        // follower further behind is told how many it missed.
        for i in 2..10 {
            s.push(i, flow());
        }
        assert!(matches!(rx.try_recv(), Err(TryRecvError::Lagged(4))));
        assert_eq!(rx.try_recv().unwrap().seq, 6);
    }
}
