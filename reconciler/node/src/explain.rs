//! `policy explain`: turns "from X to Y on port/protocol" into the decision of the source's
//! egress and the destination's ingress, with the rules behind each, using the same
//! resolver output the map writer loads into the kernel.
//!
//! Two callers, one code path ([`explain`] over [`ExplainInputs`]):
//! - the running agent (`POST /v1/explain`): the resolver actor's current state;
//! - offline, without an agent or root ([`offline::OfflineState`], `palisade policy explain
//!   --scenario FILE [--policies DIR]`, the CLI's `offline` module): the state an agent
//!   would hold after being told about namespaces, pods and reserved entity addresses and
//!   after reading the policy files.
use std::collections::BTreeMap;
use std::net::IpAddr;

use palisade_common::{identity as reserved, proto};
use palisade_policy::CidrIdentities;
use palisade_policy::explain::{Decision, decide};
use palisade_policy::identity::IdentityAllocator;
use palisade_policy::labels::LabelSet;
use palisade_policy::model::{Direction, Policy, Verdict};
use palisade_policy::resolve::{DesiredState, EndpointView, resolve_full};
use palisade_policy::tiers::{self, TierDecision, TierRule, Trace};

use palisade_api::types::{ExplainRequest, Explanation, SideDecision};

use crate::endpoint::LocalEndpoint;
use crate::ipcache::Prefix;

/// Everything the resolver holds that an explanation needs.
pub struct ExplainInputs<'a> {
    pub policies: &'a [Policy],
    pub endpoints: &'a [LocalEndpoint],
    pub allocator: &'a IdentityAllocator,
    pub cidrs: &'a CidrIdentities,
    /// The desired state last handed to the map writer.
    pub desired: Option<&'a DesiredState>,
    /// The ipcache last handed to the map writer.
    pub ipcache: &'a BTreeMap<Prefix, u32>,
    pub cluster: &'a str,
}

/// One end of the flow.
enum Party {
    /// A pod of this node.
    Local { view: EndpointView, name: String, ip: Option<IpAddr> },
    /// A pod described by labels only (it may not exist).
    Hypothetical { view: EndpointView, name: String },
    /// An address outside this node's pods.
    Address { ip: IpAddr, identity: u32 },
}

impl Party {
    fn identity(&self) -> u32 {
        match self {
            Party::Local { view, .. } | Party::Hypothetical { view, .. } => view.identity,
            Party::Address { identity, .. } => *identity,
        }
    }
}

/// Longest-prefix match in the ipcache, as the datapath does; no entry = world.
fn ipcache_identity(ipcache: &BTreeMap<Prefix, u32>, ip: IpAddr) -> u32 {
    ipcache
        .iter()
        // Family first: masking an IPv4 address with an IPv6 prefix length overflows.
        .filter(|((net, len), _)| net.is_ipv4() == ip.is_ipv4() && crate::ipcache::mask(ip, *len) == *net)
        .max_by_key(|((_, len), _)| *len)
        .map_or(if ip.is_ipv4() { reserved::WORLD_IPV4 } else { reserved::WORLD_IPV6 }, |(_, id)| *id)
}

fn parse_party(text: &str, hypothetical_id: u16, inp: &ExplainInputs<'_>) -> Result<Party, String> {
    let text = text.trim();
    if let Ok(ip) = text.parse::<IpAddr>() {
        if let Some(e) =
            inp.endpoints.iter().find(|e| e.ipv4.map(IpAddr::V4) == Some(ip) || e.ipv6.map(IpAddr::V6) == Some(ip))
        {
            return Ok(Party::Local { view: e.view(), name: e.full_name(), ip: Some(ip) });
        }
        return Ok(Party::Address { ip, identity: ipcache_identity(inp.ipcache, ip) });
    }
    if text.contains('=') {
        // namespace:key=value,key=value
        let (ns, rest) = match text.split_once(':') {
            Some((ns, rest)) if !ns.contains('=') => (ns, rest),
            _ => ("default", text),
        };
        let mut labels = BTreeMap::new();
        for kv in rest.split(',').filter(|s| !s.is_empty()) {
            let (k, v) = kv.split_once('=').ok_or_else(|| format!("{kv:?} is not key=value"))?;
            labels.insert(k.trim().to_string(), v.trim().to_string());
        }
        let ns_labels = BTreeMap::from([("kubernetes.io/metadata.name".to_string(), ns.to_string())]);
        let set = LabelSet::for_pod(ns, &ns_labels, &labels, "default", inp.cluster);
        let identity = inp.allocator.lookup(&set).unwrap_or(0);
        return Ok(Party::Hypothetical {
            view: EndpointView {
                id: hypothetical_id,
                namespace: ns.into(),
                identity,
                labels: set,
                named_ports: Vec::new(),
            },
            name: format!("{ns}:{rest}"),
        });
    }
    if let Some((ns, name)) = text.split_once('/') {
        return inp
            .endpoints
            .iter()
            .find(|e| e.namespace == ns && e.name == name)
            .map(|e| Party::Local {
                view: e.view(),
                name: e.full_name(),
                ip: e.ipv4.map(IpAddr::V4).or(e.ipv6.map(IpAddr::V6)),
            })
            .ok_or_else(|| format!("no endpoint {text} on this node (see `palisade endpoint list`)"));
    }
    Err(format!("{text:?} is neither a pod (namespace/name), an address, nor a label set (namespace:key=value,...)"))
}

fn protocol_number(p: &str) -> Result<u8, String> {
    match p.to_ascii_uppercase().as_str() {
        "TCP" => Ok(proto::TCP),
        "UDP" => Ok(proto::UDP),
        "SCTP" => Ok(proto::SCTP),
        "ICMP" => Ok(proto::ICMP),
        "ICMPV6" => Ok(proto::ICMPV6),
        _ => Err(format!("protocol {p:?} is not TCP, UDP, SCTP, ICMP or ICMPv6")),
    }
}

fn side(endpoint: Option<String>, d: Decision) -> SideDecision {
    let (decision, entry, rules) = match d {
        Decision::NotSelected => ("not-selected", None, Vec::new()),
        Decision::NotLocal => ("not-local", None, Vec::new()),
        Decision::DefaultDeny => ("default-deny", None, Vec::new()),
        Decision::Allowed { entry, rules } if rules.is_empty() => {
            let why = if entry.starts_with("ingress from 1 ") {
                "built-in: the node may always reach its pods (allow-localhost)".to_string()
            } else {
                "built-in: no default deny here (enableDefaultDeny: false)".to_string()
            };
            return SideDecision {
                endpoint,
                decision: "allowed".into(),
                entry: Some(entry),
                rules: vec![why],
                tiers: Vec::new(),
                default_deny_by: Vec::new(),
                nearest_rule: None,
            };
        }
        Decision::Allowed { entry, rules } => ("allowed", Some(entry), rules),
        Decision::Denied { entry, rules } => ("denied", Some(entry), rules),
    };
    SideDecision {
        endpoint,
        decision: decision.into(),
        entry,
        rules: rules.iter().map(std::string::ToString::to_string).collect(),
        tiers: Vec::new(),
        default_deny_by: Vec::new(),
        nearest_rule: None,
    }
}

/// The tier model's steps for one side, as lines (see [`SideDecision::tiers`]).
fn tier_lines(trace: &Trace, endpoint: &str, direction: Direction) -> Vec<String> {
    let rule = |r: &TierRule| {
        let action = match r.verdict {
            Some(Verdict::Allow) => "Accept",
            Some(Verdict::Deny) => "Deny",
            Some(Verdict::Pass) => "Pass",
            None => "-",
        };
        format!("{} tier, priority {}: {} {}: {action}", r.tier, r.priority, r.policy, r.path)
    };
    let mut out: Vec<String> = trace.passes.iter().map(|r| format!("{} (on to the next tier)", rule(r))).collect();
    let dir = match direction {
        Direction::Ingress => "ingress",
        Direction::Egress => "egress",
    };
    out.push(match &trace.decision {
        TierDecision::Admin { rule: r, .. } => format!("{} (decides)", rule(r)),
        TierDecision::NetworkPolicy => {
            format!("NetworkPolicy tier: a policy of it selects {endpoint} for {dir}: its verdict decides")
        }
        TierDecision::Baseline { rule: r, .. } => {
            format!("{} (decides: no NetworkPolicy-tier policy selects {endpoint} for {dir})", rule(r))
        }
        TierDecision::Default => format!("no tier decides for {endpoint} ({dir}): allowed"),
    });
    out
}

/// The nearest allow rule for a default deny at `me` (see
/// [`palisade_policy::explain::nearest_allow`]), as text. The peer's labels: its own for a
/// pod of this node or one described by labels, else its identity's; the destination's
/// named ports: `me`'s at ingress, the peer's at egress (none for an address).
#[allow(clippy::too_many_arguments, reason = "one call site; the flow's parts, named")]
fn nearest(
    policies: &[Policy],
    me: &EndpointView,
    dir: Direction,
    peer_id: u32,
    peer: &Party,
    protocol: u8,
    port: u16,
    labels_of: &dyn Fn(u32) -> LabelSet,
) -> Option<String> {
    let (labels, ip, peer_ports) = match peer {
        Party::Local { view, ip, .. } => (view.labels.clone(), *ip, view.named_ports.as_slice()),
        Party::Hypothetical { view, .. } => (view.labels.clone(), None, view.named_ports.as_slice()),
        Party::Address { ip, .. } => (labels_of(peer_id), Some(*ip), &[][..]),
    };
    let named = if dir == Direction::Ingress { me.named_ports.as_slice() } else { peer_ports };
    let flow_peer = palisade_policy::explain::FlowPeer { labels: &labels, ip };
    palisade_policy::explain::nearest_allow(policies, &me.labels, dir, flow_peer, protocol, port, named)
        .map(|n| n.to_string())
}

/// Explains one flow.
pub fn explain(req: &ExplainRequest, inp: &ExplainInputs<'_>) -> Result<Explanation, String> {
    let protocol = protocol_number(&req.protocol)?;
    let port = match (protocol, req.port) {
        (_, Some(p)) => p,
        (proto::ICMP, None) => 8,
        (proto::ICMPV6, None) => 128,
        _ => return Err(format!("{} needs a port", req.protocol)),
    };
    let mut from = parse_party(&req.from, 0, inp)?;
    let mut to = parse_party(&req.to, u16::MAX, inp)?;
    // A pod described by labels needs its own resolution (and an identity, if its label
    // set is new); otherwise the state loaded in the kernel is the one to explain.
    let hypothetical = matches!(from, Party::Hypothetical { .. }) || matches!(to, Party::Hypothetical { .. });
    let fresh;
    let desired = if hypothetical {
        let mut allocator = inp.allocator.clone();
        let mut views: Vec<EndpointView> = inp.endpoints.iter().map(LocalEndpoint::view).collect();
        for p in [&mut from, &mut to] {
            if let Party::Hypothetical { view, .. } = p {
                view.identity = allocator.allocate(&view.labels);
                views.push(view.clone());
            }
        }
        let addresses = crate::endpoint::pod_addresses(inp.endpoints, &BTreeMap::new());
        fresh = resolve_full(inp.policies, &views, &allocator, inp.cidrs, &addresses);
        &fresh
    } else {
        inp.desired.ok_or("the agent has not resolved any policy yet")?
    };
    let labels_of = |id: u32| {
        inp.allocator
            .get(id)
            .or_else(|| desired.cidr_identities.get(&id))
            .or_else(|| desired.address_identities.get(&id))
            .cloned()
            .unwrap_or_default()
    };
    let decide_for = |p: &Party, dir: Direction, peer: u32, other: &Party| match p {
        Party::Local { view, name, .. } | Party::Hypothetical { view, name } => {
            let mut s = side(
                Some(name.clone()),
                decide(desired.endpoints.get(&view.id).map(std::convert::AsRef::as_ref), dir, peer, protocol, port),
            );
            if s.decision == "default-deny" {
                s.default_deny_by = palisade_policy::explain::default_deny_by(inp.policies, &view.labels, dir)
                    .iter()
                    .map(|p| p.display_name())
                    .collect();
                s.nearest_rule = nearest(inp.policies, view, dir, peer, other, protocol, port, &labels_of);
            }
            s
        }
        Party::Address { .. } => side(None, Decision::NotLocal),
    };
    // A local pod's address may have an identity of its own (an address identity, for a
    // pod address inside a NetworkPolicy ipBlock): the datapath sees the ipcache's.
    // (From the state being explained: a fresh resolution numbers them itself.)
    let peer_identity = |p: &Party| match p {
        Party::Local { ip: Some(ip), .. } => {
            let host = (*ip, if ip.is_ipv4() { 32 } else { 128 });
            match desired.address_ipcache.get(&host) {
                Some(id) => *id,
                None => ipcache_identity(inp.ipcache, *ip),
            }
        }
        other => other.identity(),
    };
    let (from_identity, to_identity) = (peer_identity(&from), peer_identity(&to));
    let mut egress = decide_for(&from, Direction::Egress, to_identity, &to);
    let mut ingress = decide_for(&to, Direction::Ingress, from_identity, &from);
    if tiers::any_tiered(inp.policies) {
        let views: Vec<EndpointView> = inp.endpoints.iter().map(LocalEndpoint::view).collect();
        for (me, peer, peer_id, dir, out) in [
            (&from, &to, to_identity, Direction::Egress, &mut egress),
            (&to, &from, from_identity, Direction::Ingress, &mut ingress),
        ] {
            let (Party::Local { view, name, .. } | Party::Hypothetical { view, name }) = me else { continue };
            let labels = labels_of(peer_id);
            let np = tiers::network_policy_tier_selects(inp.policies, view, dir);
            let trace = tiers::evaluate(
                inp.policies,
                view,
                &views,
                dir,
                tiers::PeerView { identity: peer_id, labels: &labels },
                peer.identity(),
                protocol,
                port,
                np,
            );
            out.tiers = tier_lines(&trace, name, dir);
            // Entries the tier flattening wrote without a rule behind them.
            if out.entry.is_some() && out.decision == "allowed" && matches!(trace.decision, TierDecision::Default) {
                out.rules = vec![
                    "built-in: no tier decides, so the flow is allowed (a ClusterNetworkPolicy subject is \
                                  not isolated)"
                        .to_string(),
                ];
            } else if let (
                "default-deny",
                TierDecision::Admin { rule: r, allowed: false } | TierDecision::Baseline { rule: r, allowed: false },
            ) = (out.decision.as_str(), &trace.decision)
            {
                // The identity is dropped like every other peer, so it has no entries of
                // its own: the rule that drops it is the tier's.
                out.rules = vec![format!("{} {} ({} tier, priority {})", r.policy, r.path, r.tier, r.priority)];
            } else if out.decision == "denied" && out.rules.is_empty() {
                out.rules = vec![
                    "no rule allows it: the NetworkPolicy tier's default deny (written as a deny entry \
                                  by the tier flattening)"
                        .to_string(),
                ];
            }
        }
    }
    let passes = |s: &SideDecision| matches!(s.decision.as_str(), "allowed" | "not-selected" | "not-local");
    let verdict = if passes(&egress) && passes(&ingress) { "allow" } else { "deny" };
    let label = |p: &Party, text: &str| match p {
        Party::Local { name, ip: Some(ip), .. } => format!("{name} ({ip})"),
        Party::Address { ip, .. } => ip.to_string(),
        _ => text.to_string(),
    };
    Ok(Explanation {
        from: label(&from, &req.from),
        to: label(&to, &req.to),
        protocol: req.protocol.clone(),
        port,
        from_identity,
        to_identity,
        egress,
        ingress,
        verdict: verdict.into(),
    })
}

/// The node itself may always reach its pods (kubelet probes), as Cilium's default
/// `allow-localhost` does: every ingress-enforced endpoint gets an allow for the host
/// identity (see [`palisade_policy::resolve::allow_localhost`]). The agent's resolver does
/// this itself; this is for states resolved without it (offline explanations).
pub fn allow_localhost(desired: &mut DesiredState) {
    for ep in desired.endpoints.values_mut() {
        palisade_policy::resolve::allow_localhost(std::sync::Arc::make_mut(ep));
    }
}

/// The state an agent would hold, built without one: for `palisade policy explain
/// --scenario/--policies` (the CLI turns a scenario into its inputs) and for checks that
/// compare the kernel with it. Every step is the
/// agent's own code where it is reachable ([`PolicySources`] reads the manifests,
/// `resolve_full` + [`allow_localhost`] resolve, [`ExternalIpcache`] holds the
/// reserved addresses), and the same label derivation and ipcache assembly
/// ([`crate::endpoint::endpoint_labels`], [`crate::endpoint::assemble_ipcache`]).
pub mod offline {
    use std::collections::BTreeMap;
    use std::path::{Path, PathBuf};

    use palisade_policy::CidrIdentities;
    use palisade_policy::identity::IdentityAllocator;
    use palisade_policy::model::Policy;
    use palisade_policy::resolve::{DesiredState, EndpointView, NamedPort, resolve_on_node};

    use palisade_api::types::{EndpointSpec, IpcacheEntrySpec, PolicyStatus};

    use super::{ExplainInputs, allow_localhost};
    use crate::endpoint::{LocalEndpoint, assemble_ipcache, endpoint_labels, pod_addresses};
    use crate::ipcache::{ExternalIpcache, Prefix, entity_identity, parse_prefix};
    use crate::sources::PolicySources;

    /// The agent's default cluster name (`--cluster`).
    pub const DEFAULT_CLUSTER: &str = "default";

    /// Why the offline state cannot be built.
    #[derive(Debug, thiserror::Error)]
    pub enum OfflineError {
        #[error("cannot read the policy directory {}: {source}", dir.display())]
        PolicyDir { dir: PathBuf, source: std::io::Error },
        #[error("cannot read policy file {}: {source}", file.display())]
        PolicyFile { file: PathBuf, source: std::io::Error },
        #[error("pod {namespace}/{name}: {reason}")]
        Endpoint { namespace: String, name: String, reason: String },
        #[error("namespace {namespace} of pod {namespace}/{name} is not known")]
        UnknownNamespace { namespace: String, name: String },
        #[error("ipcache entry {cidr}: {reason}")]
        Ipcache { cidr: String, reason: String },
    }

    /// The files of a policy directory the agent reads (`*.yaml`, `*.yml`, `*.json`, not
    /// hidden), sorted, with their content.
    pub fn read_policy_dir(dir: &Path) -> Result<Vec<(String, Vec<u8>)>, OfflineError> {
        let files = crate::sources::policy_files(dir)
            .map_err(|source| OfflineError::PolicyDir { dir: dir.to_path_buf(), source })?;
        files
            .into_iter()
            .map(|f| {
                let bytes = std::fs::read(&f).map_err(|source| OfflineError::PolicyFile { file: f.clone(), source })?;
                Ok((f.display().to_string(), bytes))
            })
            .collect()
    }

    /// A pod as the agent's API receives it.
    #[derive(Clone, Debug)]
    pub struct PodInput {
        pub namespace: String,
        pub name: String,
        pub spec: EndpointSpec,
    }

    /// The named container ports of `pod`, or why one is not valid.
    fn named_ports_of(pod: &PodInput) -> Result<Vec<NamedPort>, String> {
        pod.spec.ports.iter().map(|p| NamedPort::new(&p.name, p.port, &p.protocol)).collect()
    }

    /// The agent's state for some namespaces, pods, reserved addresses and policy files.
    pub struct OfflineState {
        statuses: Vec<PolicyStatus>,
        /// The enforced ones (audit mode: policies with the audit annotation are not).
        policies: Vec<Policy>,
        endpoints: Vec<LocalEndpoint>,
        allocator: IdentityAllocator,
        cidrs: CidrIdentities,
        desired: DesiredState,
        ipcache: BTreeMap<Prefix, u32>,
        cluster: String,
    }

    impl OfflineState {
        /// Reads the policy files (`(source, content)`, as the agent reads its directory),
        /// registers the pods in order (endpoint ids 1, 2, ...; identities allocated in
        /// that order) and the reserved addresses, and resolves.
        pub fn build(
            namespaces: &BTreeMap<String, BTreeMap<String, String>>,
            pods: &[PodInput],
            reserved_entries: &[IpcacheEntrySpec],
            policy_files: &[(String, Vec<u8>)],
            cluster: &str,
        ) -> Result<OfflineState, OfflineError> {
            Self::build_with_remote(namespaces, pods, &[], reserved_entries, policy_files, cluster)
        }

        /// As [`OfflineState::build`], for one node of several: `remote_pods` are the other
        /// nodes' pods (their addresses get the identities of their label sets, as the
        /// agent's remote endpoints do; their interfaces are not used).
        pub fn build_with_remote(
            namespaces: &BTreeMap<String, BTreeMap<String, String>>,
            pods: &[PodInput],
            remote_pods: &[PodInput],
            reserved_entries: &[IpcacheEntrySpec],
            policy_files: &[(String, Vec<u8>)],
            cluster: &str,
        ) -> Result<OfflineState, OfflineError> {
            let mut sources = PolicySources::default();
            for (i, (source, bytes)) in policy_files.iter().enumerate() {
                let name = Path::new(source).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                sources.load_source(source, &name, true, bytes, i as u64);
            }
            sources.stamp(0);
            let policies = sources.policies();

            let mut allocator = IdentityAllocator::new();
            let mut endpoints = Vec::with_capacity(pods.len());
            for (i, pod) in pods.iter().enumerate() {
                let err = |reason: String| OfflineError::Endpoint {
                    namespace: pod.namespace.clone(),
                    name: pod.name.clone(),
                    reason,
                };
                let ns_labels = namespaces.get(&pod.namespace).ok_or_else(|| OfflineError::UnknownNamespace {
                    namespace: pod.namespace.clone(),
                    name: pod.name.clone(),
                })?;
                if pod.spec.ipv4.is_none() && pod.spec.ipv6.is_none() {
                    return Err(err("it has neither an IPv4 nor an IPv6 address".into()));
                }
                let named_ports = named_ports_of(pod).map_err(err)?;
                let labels = endpoint_labels(&pod.namespace, ns_labels, &pod.spec, cluster);
                let identity = allocator.allocate(&labels);
                endpoints.push(LocalEndpoint {
                    id: u16::try_from(i + 1).map_err(|_| err("more than 65535 pods".into()))?,
                    namespace: pod.namespace.clone(),
                    name: pod.name.clone(),
                    labels,
                    identity,
                    ipv4: pod.spec.ipv4,
                    ipv6: pod.spec.ipv6,
                    interface: pod.spec.interface.clone(),
                    ifindex: 0,
                    named_ports,
                });
            }

            let mut external = ExternalIpcache::default();
            for pod in remote_pods {
                let ns_labels = namespaces.get(&pod.namespace).ok_or_else(|| OfflineError::UnknownNamespace {
                    namespace: pod.namespace.clone(),
                    name: pod.name.clone(),
                })?;
                let labels = endpoint_labels(&pod.namespace, ns_labels, &pod.spec, cluster);
                let identity = allocator.allocate(&labels);
                let ips =
                    pod.spec.ipv4.map(std::net::IpAddr::V4).into_iter().chain(pod.spec.ipv6.map(std::net::IpAddr::V6));
                let named_ports = named_ports_of(pod).map_err(|reason| OfflineError::Endpoint {
                    namespace: pod.namespace.clone(),
                    name: pod.name.clone(),
                    reason,
                })?;
                let key = format!("{}/{}", pod.namespace, pod.name);
                let remote = crate::ipcache::RemoteEndpoint { identity, ips: ips.collect(), named_ports, name: None };
                external.upsert_remote(&key, remote);
            }
            for e in reserved_entries {
                let prefix = parse_prefix(&e.cidr)
                    .map_err(|err| OfflineError::Ipcache { cidr: e.cidr.clone(), reason: err.to_string() })?;
                external.upsert_reserved(prefix, entity_identity(e.entity));
            }

            let mut cidrs = CidrIdentities::new();
            cidrs.sync(&policies);
            let views: Vec<EndpointView> = endpoints.iter().map(LocalEndpoint::view).collect();
            let addresses = pod_addresses(&endpoints, &external.pod_addresses());
            // Audit mode, as the agent enforces it: audited policies are not enforced (their
            // prefixes keep identities, as in the agent), and pods in audit mode (by their
            // pod's or namespace's label) enforce nothing.
            let policies: Vec<Policy> = policies.into_iter().filter(|p| !p.audit).collect();
            let remote_ports = external.remote_named_ports();
            let mut desired = resolve_on_node(&policies, &views, &allocator, &cidrs, &addresses, &remote_ports);
            allow_localhost(&mut desired);
            for e in &endpoints {
                if palisade_policy::resolve::endpoint_audited(&e.labels) {
                    desired.endpoints.insert(e.id, std::sync::Arc::default());
                }
            }
            let ipcache = assemble_ipcache(&desired, &external.entries(), &endpoints);
            Ok(OfflineState {
                statuses: sources.statuses(),
                policies,
                endpoints,
                allocator,
                cidrs,
                desired,
                ipcache,
                cluster: cluster.to_string(),
            })
        }

        /// Policies only (no pods): flows between label sets and addresses.
        pub fn from_policy_dir(dir: &Path, cluster: &str) -> Result<OfflineState, OfflineError> {
            Self::build(&BTreeMap::new(), &[], &[], &read_policy_dir(dir)?, cluster)
        }

        /// The status of every manifest read (rejected ones carry their error).
        pub fn statuses(&self) -> &[PolicyStatus] {
            &self.statuses
        }

        pub fn endpoints(&self) -> &[LocalEndpoint] {
            &self.endpoints
        }

        /// What [`super::explain`] needs.
        pub fn inputs(&self) -> ExplainInputs<'_> {
            ExplainInputs {
                policies: &self.policies,
                endpoints: &self.endpoints,
                allocator: &self.allocator,
                cidrs: &self.cidrs,
                desired: Some(&self.desired),
                ipcache: &self.ipcache,
                cluster: &self.cluster,
            }
        }
    }
}
