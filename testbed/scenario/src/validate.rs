//! Cross-checks of a parsed scenario and its resolution into a [`Plan`]: every issue is
//! collected (not only the first) with the key path it is about.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

use super::Issue;
use super::model::{IpFamily, PodPort, ProbeProtocol, RawNode, RawPod, RawProbe, RawScenario};
use super::plan::{
    Entity, HostRef, IMPLICIT_NODE, MAX_NODES, NODE_IPV4, NODE_IPV6, POD_GATEWAY_IPV4, Plan, PlanHost, PlanNode,
    PlanPod, PlanPolicy, PlanProbe, host_interface_name, node_addresses,
};

/// Most pods a scenario may have (each is a network namespace and a veth pair).
pub const MAX_PODS: usize = 250;
/// Most probes a scenario may have (each can take up to the probe timeout).
pub const MAX_PROBES: usize = 500;
/// First address given to pods without an `ip`.
const FIRST_ASSIGNED: Ipv4Addr = Ipv4Addr::new(10, 200, 1, 10);
/// First IPv6 address given to pods without an `ipv6` (when IPv6 is in `ipFamilies`).
const FIRST_ASSIGNED_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x200, 0, 0, 0, 1, 0x10);
/// ICMP and ICMPv6 echo requests, the only ICMP types this version probes with.
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMPV6_ECHO_REQUEST: u8 = 128;

/// A probe that is not in the scenario, between its pods and the hosts its probes name
/// (`palisade-testbed probe` on a scenario that is up): checked like the scenario's own,
/// plus that a host that is not a pod exists (only the world and entity hosts the
/// scenario's probes name are built) and listens on the port. Issues name `from`, `to`,
/// `port`, `family`.
pub(super) fn extra_probe(plan: &Plan, raw: &RawProbe, index: usize) -> Result<PlanProbe, Vec<Issue>> {
    let mut issues = Vec::new();
    let probe = resolve_probes(
        std::slice::from_ref(raw),
        &plan.pods,
        &plan.nodes,
        plan.nodes_listed,
        &plan.ip_families,
        &mut issues,
    )
    .pop();
    let mut issues: Vec<Issue> =
        issues.into_iter().map(|i| Issue { path: i.path.trim_start_matches("probes[0].").to_string(), ..i }).collect();
    let Some(mut probe) = probe else { return Err(issues) };
    for (end, key) in [(&probe.from, "from"), (&probe.to, "to")] {
        if plan.endpoint_pod(end).is_some() {
            continue;
        }
        // A host-network pod is its node's host.
        let end = match end {
            HostRef::Pod(i) => &plan.node_ref(plan.pods[*i].node),
            other => other,
        };
        match plan.hosts.iter().find(|h| &h.host == end) {
            // The nodes exist in every scenario (without listeners unless a probe aims at them).
            None if key == "from" && matches!(end, HostRef::Entity(Entity::Host) | HostRef::Node(_)) => {}
            None => issues.push(Issue::invalid(
                key,
                format!("{end} is not a host of this scenario: only its pods and the hosts its probes name exist"),
            )),
            Some(h) if key == "to" => {
                if let (Some(proto), Some(port)) = (probe.protocol.port_protocol(), probe.port)
                    && !h.ports.iter().any(|p| p.port == port && p.protocol == proto)
                {
                    let listed: Vec<String> = h.ports.iter().map(|p| format!("{}/{}", p.port, p.protocol)).collect();
                    issues.push(Issue::invalid(
                        "port",
                        format!(
                            "{end} only listens on the ports the scenario's probes aim at it ({})",
                            if listed.is_empty() { "none".to_string() } else { listed.join(", ") }
                        ),
                    ));
                }
            }
            Some(_) => {}
        }
    }
    if !issues.is_empty() {
        return Err(issues);
    }
    probe.index = index;
    Ok(probe)
}

pub(super) fn resolve(raw: RawScenario, file: &Path) -> Result<Plan, Vec<Issue>> {
    let mut issues = Vec::new();

    if raw.name.trim().is_empty() {
        issues.push(Issue::invalid("name", "must not be empty"));
    }
    let ip_families = check_families(raw.ip_families.as_deref(), &mut issues);
    let mut agent_args = Vec::new();
    if let Some(agent) = &raw.agent {
        if agent.policy_audit_mode {
            agent_args.push("--policy-audit-mode".to_owned());
        }
        match agent.policy_enforcement.as_deref() {
            None => {}
            Some(e @ ("default" | "always" | "never")) => {
                agent_args.extend(["--policy-enforcement".to_owned(), e.to_owned()]);
            }
            Some(other) => issues.push(Issue::invalid(
                "agent.policyEnforcement",
                format!("must be default, always or never, not {other:?}"),
            )),
        }
    }
    if let Some(c) = &raw.cluster
        && !is_dns_label(c)
    {
        issues.push(Issue::invalid("cluster", format!("{c:?} is not a valid cluster name (lowercase DNS label)")));
    }

    let mut namespaces = BTreeMap::new();
    for (name, labels) in &raw.namespaces {
        if !is_dns_label(name) {
            issues.push(Issue::invalid(
                format!("namespaces.{name}"),
                "not a valid namespace name (lowercase letters, digits and '-', at most 63)",
            ));
        }
        let labels = labels.clone().unwrap_or_default();
        check_labels(&format!("namespaces.{name}"), &labels, &mut issues);
        namespaces.insert(name.clone(), labels);
    }

    let nodes_listed = raw.nodes.is_some();
    let nodes = resolve_nodes(raw.nodes.as_deref(), &ip_families, &mut issues);
    let pods = resolve_pods(&raw.pods, &namespaces, &nodes, nodes_listed, &ip_families, &mut issues);
    let policies = resolve_policies(&raw.policies, &namespaces, &mut issues);
    let probes = resolve_probes(&raw.probes, &pods, &nodes, nodes_listed, &ip_families, &mut issues);
    let hosts = resolve_hosts(&probes, &pods, &nodes, nodes_listed, &ip_families);

    if issues.is_empty() {
        Ok(Plan {
            name: raw.name,
            description: raw.description,
            file: file.to_path_buf(),
            cluster: raw.cluster,
            ip_families,
            namespaces,
            nodes,
            nodes_listed,
            pods,
            hosts,
            policies,
            probes,
            agent_args,
        })
    } else {
        Err(issues)
    }
}

fn check_families(families: Option<&[IpFamily]>, issues: &mut Vec<Issue>) -> Vec<IpFamily> {
    let Some(families) = families else { return vec![IpFamily::IPv4] };
    if families.is_empty() {
        issues.push(Issue::invalid("ipFamilies", "must name at least one family (IPv4, IPv6)"));
    }
    let unique: BTreeSet<_> = families.iter().collect();
    if unique.len() != families.len() {
        issues.push(Issue::invalid("ipFamilies", "lists a family twice"));
    }
    families.to_vec()
}

/// The nodes of `nodes`, or the one implicit node when the file lists none.
fn resolve_nodes(raw: Option<&[RawNode]>, families: &[IpFamily], issues: &mut Vec<Issue>) -> Vec<PlanNode> {
    let implicit = [RawNode { name: IMPLICIT_NODE.into(), labels: BTreeMap::new() }];
    let raw = match raw {
        None => &implicit[..],
        Some([]) => {
            issues.push(Issue::invalid("nodes", "must list at least one node (leave `nodes` out for one node)"));
            &implicit[..]
        }
        Some(list) if list.len() > MAX_NODES => {
            issues.push(Issue::invalid("nodes", format!("{} nodes: at most {MAX_NODES} are supported", list.len())));
            &list[..MAX_NODES]
        }
        Some(list) => list,
    };
    let mut seen: HashMap<&str, usize> = HashMap::new();
    let mut out = Vec::with_capacity(raw.len());
    for (i, node) in raw.iter().enumerate() {
        if !is_dns_subdomain(&node.name) {
            issues.push(Issue::invalid(
                format!("nodes[{i}].name"),
                format!("{:?} is not a valid node name (lowercase letters, digits, '-' and '.')", node.name),
            ));
        }
        if let Some(j) = seen.insert(node.name.as_str(), i) {
            issues.push(Issue::invalid(
                format!("nodes[{i}].name"),
                format!("node {:?} is already defined at nodes[{j}]", node.name),
            ));
        }
        check_labels(&format!("nodes[{i}].labels"), &node.labels, issues);
        let (v4, v6) = node_addresses(i);
        out.push(PlanNode {
            index: i,
            name: node.name.clone(),
            labels: node.labels.clone(),
            ipv4: families.contains(&IpFamily::IPv4).then_some(v4),
            ipv6: families.contains(&IpFamily::IPv6).then_some(v6),
        });
    }
    out
}

/// The node `name` names, or an issue at `path`.
fn find_node(name: &str, path: &str, nodes: &[PlanNode], listed: bool, issues: &mut Vec<Issue>) -> Option<usize> {
    if listed && let Some(n) = nodes.iter().find(|n| n.name == name) {
        return Some(n.index);
    }
    if listed {
        let names: Vec<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
        issues.push(Issue::invalid(
            path,
            format!("node {name:?} is not listed under `nodes` (nodes: {})", names.join(", ")),
        ));
    } else {
        issues.push(Issue::invalid(
            path,
            format!("node {name:?}: the scenario lists no `nodes` (it has one node; list nodes under `nodes` to name them, or use entity:host)"),
        ));
    }
    None
}

fn resolve_pods(
    raw: &[RawPod],
    namespaces: &BTreeMap<String, BTreeMap<String, String>>,
    nodes: &[PlanNode],
    nodes_listed: bool,
    families: &[IpFamily],
    issues: &mut Vec<Issue>,
) -> Vec<PlanPod> {
    if raw.len() > MAX_PODS {
        issues.push(Issue::invalid("pods", format!("{} pods: at most {MAX_PODS} are supported", raw.len())));
    }
    let mut seen: HashMap<(String, String), usize> = HashMap::new();
    let mut explicit_ips: HashMap<Ipv4Addr, usize> = HashMap::new();
    let mut explicit_ipv6: HashMap<Ipv6Addr, usize> = HashMap::new();
    for (i, pod) in raw.iter().enumerate() {
        let at = |k: &str| format!("pods[{i}].{k}");
        if !is_dns_subdomain(&pod.name) {
            issues.push(Issue::invalid(
                at("name"),
                format!("{:?} is not a valid pod name (lowercase letters, digits, '-' and '.')", pod.name),
            ));
        }
        if !namespaces.contains_key(&pod.namespace) {
            issues.push(Issue::invalid(
                at("namespace"),
                format!("namespace {:?} is not listed under `namespaces`", pod.namespace),
            ));
        }
        if let Some(j) = seen.insert((pod.namespace.clone(), pod.name.clone()), i) {
            issues.push(Issue::invalid(
                at("name"),
                format!("pod {}/{} is already defined at pods[{j}]", pod.namespace, pod.name),
            ));
        }
        check_labels(&at("labels"), &pod.labels, issues);
        if let Some(sa) = &pod.service_account
            && !is_dns_subdomain(sa)
        {
            issues.push(Issue::invalid(at("serviceAccount"), format!("{sa:?} is not a valid service account name")));
        }
        if pod.ip.is_some() && !families.contains(&IpFamily::IPv4) {
            issues.push(Issue::invalid(at("ip"), "set, but ipFamilies does not include IPv4"));
        }
        if let Some(ip) = pod.ipv6 {
            if let Some(why) = unusable_ipv6(ip) {
                issues.push(Issue::invalid(at("ipv6"), format!("{ip} cannot be a pod address: {why}")));
            }
            if let Some(j) = explicit_ipv6.insert(ip, i) {
                issues.push(Issue::invalid(at("ipv6"), format!("{ip} is already the address of pods[{j}]")));
            }
        }
        if let Some(ip) = pod.ip {
            if let Some(why) = unusable_ipv4(ip) {
                issues.push(Issue::invalid(at("ip"), format!("{ip} cannot be a pod address: {why}")));
            }
            if let Some(j) = explicit_ips.insert(ip, i) {
                issues.push(Issue::invalid(at("ip"), format!("{ip} is already the address of pods[{j}]")));
            }
        }
        if pod.ipv6.is_some() && !families.contains(&IpFamily::IPv6) {
            issues.push(Issue::invalid(at("ipv6"), "set, but ipFamilies does not include IPv6"));
        }
        check_ports(i, pod, issues);
        if pod.host_network {
            for (key, set) in [("ip", pod.ip.is_some()), ("ipv6", pod.ipv6.is_some())] {
                if set {
                    issues.push(Issue::invalid(
                        at(key),
                        "a host-network pod has its node's addresses: leave the address out",
                    ));
                }
            }
        }
        if nodes.len() > 1 {
            for (key, reserved) in [
                ("ip", pod.ip.and_then(|ip| node_reserved_v4(ip, nodes.len()))),
                ("ipv6", pod.ipv6.and_then(|ip| node_reserved_v6(ip, nodes.len()))),
            ] {
                if let Some(why) = reserved {
                    issues.push(Issue::invalid(at(key), format!("cannot be a pod address: {why}")));
                }
            }
        }
    }
    let node_of: Vec<usize> = raw
        .iter()
        .enumerate()
        .map(|(i, pod)| match &pod.node {
            None => 0,
            Some(name) => find_node(name, &format!("pods[{i}].node"), nodes, nodes_listed, issues).unwrap_or(0),
        })
        .collect();
    // Host-network pods of one node share its ports.
    let mut served: HashMap<(usize, u16, super::model::PortProtocol), usize> = HashMap::new();
    for (i, pod) in raw.iter().enumerate().filter(|(_, p)| p.host_network) {
        for (k, p) in pod.ports.iter().enumerate() {
            if let Some(j) = served.insert((node_of[i], p.port, p.protocol), i) {
                issues.push(Issue::invalid(
                    format!("pods[{i}].ports[{k}].port"),
                    format!(
                        "{}/{} is already served on node {} by the host-network pod pods[{j}]",
                        p.port, p.protocol, nodes[node_of[i]].name
                    ),
                ));
            }
        }
    }

    // Pods get addresses from their node's range: 10.(200+k).1.10 upward (the first node's
    // are those of a scenario without nodes).
    let mut next: Vec<u32> = (0..nodes.len()).map(|k| u32::from(FIRST_ASSIGNED) + ((k as u32) << 16)).collect();
    let mut next_v6: Vec<u128> =
        (0..nodes.len()).map(|k| u128::from(FIRST_ASSIGNED_V6) + ((k as u128) << 80)).collect();
    let (has_v4, has_v6) = (families.contains(&IpFamily::IPv4), families.contains(&IpFamily::IPv6));
    let mut names = BTreeSet::new();
    raw.iter()
        .enumerate()
        .map(|(i, pod)| {
            let node = node_of[i];
            let free_v4 = |a: Ipv4Addr| {
                !explicit_ips.contains_key(&a)
                    && unusable_ipv4(a).is_none()
                    && (nodes.len() == 1 || node_reserved_v4(a, nodes.len()).is_none())
            };
            let free_v6 = |a: Ipv6Addr| {
                !explicit_ipv6.contains_key(&a)
                    && unusable_ipv6(a).is_none()
                    && (nodes.len() == 1 || node_reserved_v6(a, nodes.len()).is_none())
            };
            let (ipv4, ipv6) = if pod.host_network {
                (nodes[node].ipv4, nodes[node].ipv6)
            } else {
                (
                    has_v4.then(|| pod.ip.unwrap_or_else(|| next_free(&mut next[node], free_v4))),
                    has_v6.then(|| pod.ipv6.unwrap_or_else(|| next_free(&mut next_v6[node], free_v6))),
                )
            };
            let mut host_interface = host_interface_name(&pod.namespace, &pod.name, i);
            let mut salt = raw.len();
            while !names.insert(host_interface.clone()) {
                salt += 1;
                host_interface = host_interface_name(&pod.namespace, &pod.name, salt);
            }
            PlanPod {
                index: i,
                namespace: pod.namespace.clone(),
                name: pod.name.clone(),
                labels: pod.labels.clone(),
                service_account: pod.service_account.clone().unwrap_or_else(|| "default".into()),
                ipv4,
                ipv6,
                ports: pod.ports.clone(),
                host_interface,
                node,
                host_network: pod.host_network,
            }
        })
        .collect()
}

/// Why an IPv4 address is kept for the nodes of a multi-node scenario: each node's
/// `10.(200+k).0.0/24` (its own address and the testbed's hosts).
fn node_reserved_v4(ip: Ipv4Addr, nodes: usize) -> Option<&'static str> {
    let o = ip.octets();
    (o[0] == 10 && o[1] >= 200 && usize::from(o[1] - 200) < nodes && o[2] == 0)
        .then_some("10.(200+k).0.0/24 is kept for node k's own address and the testbed's hosts")
}

/// As [`node_reserved_v4`] for `fd00:10:(200+k)::/112`.
fn node_reserved_v6(ip: Ipv6Addr, nodes: usize) -> Option<&'static str> {
    let s = ip.segments();
    (s[0] == 0xfd00 && s[1] == 0x10 && s[2] >= 0x200 && usize::from(s[2] - 0x200) < nodes && s[3..7] == [0; 4])
        .then_some("fd00:10:(200+k)::/112 is kept for node k's own address and the testbed's hosts")
}

fn check_ports(i: usize, pod: &RawPod, issues: &mut Vec<Issue>) {
    let mut seen = HashMap::new();
    let mut names = HashMap::new();
    for (k, p) in pod.ports.iter().enumerate() {
        let at = |key: &str| format!("pods[{i}].ports[{k}].{key}");
        if let Some(j) = seen.insert((p.port, p.protocol), k) {
            issues
                .push(Issue::invalid(at("port"), format!("{}/{} is already listed at ports[{j}]", p.port, p.protocol)));
        }
        if let Some(name) = &p.name {
            if !is_port_name(name) {
                issues.push(Issue::invalid(
                    at("name"),
                    format!(
                        "{name:?} is not a valid port name (at most 15 lowercase letters, digits and '-', with a letter)"
                    ),
                ));
            }
            if let Some(j) = names.insert(name.clone(), k) {
                issues.push(Issue::invalid(at("name"), format!("port name {name:?} is already used by ports[{j}]")));
            }
        }
    }
}

/// The first address from `*next` on that `free` takes; `*next` moves past it.
fn next_free<N, A>(next: &mut N, free: impl Fn(A) -> bool) -> A
where
    N: Copy + std::ops::AddAssign + From<u8>,
    A: From<N> + Copy,
{
    loop {
        let candidate = A::from(*next);
        *next += N::from(1);
        if free(candidate) {
            return candidate;
        }
    }
}

fn resolve_policies(
    raw: &[serde_json::Value],
    namespaces: &BTreeMap<String, BTreeMap<String, String>>,
    issues: &mut Vec<Issue>,
) -> Vec<PlanPolicy> {
    let mut out = Vec::new();
    let mut seen: HashMap<(String, Option<String>, String), usize> = HashMap::new();
    for (i, manifest) in raw.iter().enumerate() {
        let at = |k: &str| if k.is_empty() { format!("policies[{i}]") } else { format!("policies[{i}].{k}") };
        let serde_json::Value::Object(map) = manifest else {
            issues.push(Issue::invalid(at(""), "a policy must be a manifest (a mapping with apiVersion, kind, ...)"));
            continue;
        };
        let mut map = map.clone();
        let expect_rejected = match map.remove("expectRejected") {
            None => false,
            Some(serde_json::Value::Bool(b)) => b,
            Some(_) => {
                issues.push(Issue::invalid(at("expectRejected"), "must be true or false"));
                false
            }
        };
        let text = |v: Option<&serde_json::Value>| v.and_then(serde_json::Value::as_str).map(str::to_string);
        let kind = text(map.get("kind")).unwrap_or_else(|| "(no kind)".into());
        let metadata = map.get("metadata");
        let name = text(metadata.and_then(|m| m.get("name"))).unwrap_or_else(|| "(no name)".into());
        let namespace = text(metadata.and_then(|m| m.get("namespace")));
        if !expect_rejected {
            // A namespaced manifest without a namespace lands in `default`, as with kubectl.
            let effective = match (&namespace, kind.as_str()) {
                (Some(ns), _) => Some(ns.clone()),
                (None, "NetworkPolicy" | "CiliumNetworkPolicy") => Some("default".to_string()),
                (None, _) => None,
            };
            if let Some(ns) = effective
                && !namespaces.contains_key(&ns)
            {
                issues.push(Issue::invalid(
                    at("metadata.namespace"),
                    format!("the manifest is in namespace {ns:?}, which is not listed under `namespaces`"),
                ));
            }
            if let Some(j) = seen.insert((kind.clone(), namespace.clone(), name.clone()), i) {
                issues.push(Issue::invalid(at("metadata.name"), format!("the same manifest as policies[{j}]")));
            }
        }
        let file_name = format!("{i:03}-{}-{}.yaml", file_part(&kind), file_part(&name));
        out.push(PlanPolicy {
            index: i,
            kind,
            namespace,
            name,
            expect_rejected,
            manifest: serde_json::Value::Object(map),
            file_name,
        });
    }
    out
}

fn resolve_probes(
    raw: &[RawProbe],
    pods: &[PlanPod],
    nodes: &[PlanNode],
    nodes_listed: bool,
    families: &[IpFamily],
    issues: &mut Vec<Issue>,
) -> Vec<PlanProbe> {
    if raw.len() > MAX_PROBES {
        issues.push(Issue::invalid("probes", format!("{} probes: at most {MAX_PROBES} are supported", raw.len())));
    }
    let by_key: HashMap<(&str, &str), usize> =
        pods.iter().map(|p| ((p.namespace.as_str(), p.name.as_str()), p.index)).collect();
    let by_ip: HashMap<IpAddr, usize> = pods
        .iter()
        .filter(|p| !p.host_network)
        .flat_map(|p| [p.ipv4.map(IpAddr::V4), p.ipv6.map(IpAddr::V6)].into_iter().flatten().map(|ip| (ip, p.index)))
        .collect();
    let mut out = Vec::new();
    for (i, probe) in raw.iter().enumerate() {
        let at = |k: &str| format!("probes[{i}].{k}");
        let before = issues.len();
        let ctx = RefContext { by_key: &by_key, by_ip: &by_ip, pods, nodes, nodes_listed };
        let mut from = resolve_ref(&probe.from, &at("from"), &ctx, issues);
        let mut to = resolve_ref(&probe.to, &at("to"), &ctx, issues);
        // In a file that lists nodes, `entity:host` is the node of the other end's pod.
        if nodes_listed {
            let (f0, t0) = (from.clone(), to.clone());
            for (end, other) in [(&mut from, t0), (&mut to, f0)] {
                if *end == Some(HostRef::Entity(Entity::Host)) {
                    let node = match other {
                        Some(HostRef::Pod(i)) => pods[i].node,
                        _ => 0,
                    };
                    *end = Some(HostRef::Node(node));
                }
            }
        }

        // A world host's address says which family the probe is.
        let literal = [&from, &to].into_iter().find_map(|end| match end {
            Some(HostRef::World(IpAddr::V4(_))) => Some(IpFamily::IPv4),
            Some(HostRef::World(IpAddr::V6(_))) => Some(IpFamily::IPv6),
            _ => None,
        });
        let family = match (probe.family, probe.protocol) {
            (Some(IpFamily::IPv4), ProbeProtocol::ICMPv6) => {
                issues.push(Issue::invalid(at("family"), "ICMPv6 probes are IPv6"));
                IpFamily::IPv4
            }
            (Some(IpFamily::IPv6), ProbeProtocol::ICMP) => {
                issues.push(Issue::invalid(at("family"), "ICMP probes are IPv4 (use ICMPv6 for IPv6)"));
                IpFamily::IPv6
            }
            (Some(f), _) => f,
            (None, ProbeProtocol::ICMPv6) => IpFamily::IPv6,
            (None, ProbeProtocol::ICMP) => IpFamily::IPv4,
            (None, _) => literal.unwrap_or(IpFamily::IPv4),
        };
        if let Some(l) = literal
            && l != family
        {
            issues.push(Issue::invalid(
                at("family"),
                format!("the probe is {family}, but its world host's address is {l}"),
            ));
        }
        if !families.contains(&family) {
            issues.push(Issue::invalid(at("family"), format!("{family}, but ipFamilies does not include it")));
        }

        match (probe.protocol.is_icmp(), probe.port) {
            (true, Some(_)) => issues.push(Issue::invalid(at("port"), "ICMP probes have no port")),
            (false, None) => {
                issues.push(Issue::invalid(at("port"), format!("a {} probe needs a destination port", probe.protocol)));
            }
            _ => {}
        }
        if probe.icmp_type.is_some() && !probe.protocol.is_icmp() {
            issues.push(Issue::invalid(at("icmp_type"), "only ICMP and ICMPv6 probes have a type"));
        }
        if let (Some(HostRef::Pod(dst)), Some(proto), Some(port)) = (&to, probe.protocol.port_protocol(), probe.port) {
            let pod = &pods[*dst];
            if !pod.ports.iter().any(|p| p.port == port && p.protocol == proto) {
                let listed: Vec<String> = pod.ports.iter().map(|p| format!("{}/{}", p.port, p.protocol)).collect();
                issues.push(Issue::invalid(
                    at("port"),
                    format!(
                        "pod {} does not list {port}/{proto} under its ports (it lists {})",
                        pod.key(),
                        if listed.is_empty() { "none".to_string() } else { listed.join(", ") }
                    ),
                ));
            }
        }
        let is_endpoint = |end: &HostRef| matches!(end, HostRef::Pod(i) if !pods[*i].host_network);
        if let (Some(f), Some(t)) = (&from, &to)
            && !is_endpoint(f)
            && !is_endpoint(t)
        {
            let host_network = [f, t].into_iter().any(|e| matches!(e, HostRef::Pod(_)));
            issues.push(Issue::invalid(
                at("to"),
                if host_network {
                    "at least one end of a probe must be a pod that is not host-network (the datapath only sees pods' traffic)"
                } else {
                    "at least one end of a probe must be a pod (the datapath only sees pods' traffic)"
                },
            ));
        }

        // What the format allows but this version cannot run yet.
        let echo = if probe.protocol == ProbeProtocol::ICMPv6 { ICMPV6_ECHO_REQUEST } else { ICMP_ECHO_REQUEST };
        if let Some(t) = probe.icmp_type
            && probe.protocol.is_icmp()
            && t != echo
        {
            issues.push(Issue::unsupported(
                at("icmp_type"),
                format!("{} type {t} (only {echo}, echo request, is probed)", probe.protocol),
            ));
        }

        if issues.len() == before
            && let (Some(from), Some(to)) = (from, to)
        {
            out.push(PlanProbe {
                index: i,
                from_text: probe.from.clone(),
                to_text: probe.to.clone(),
                from,
                to,
                protocol: probe.protocol,
                port: probe.port,
                icmp_type: probe.protocol.is_icmp().then(|| probe.icmp_type.unwrap_or(echo)),
                family,
                expect: probe.expect,
            });
        }
    }
    out
}

/// What a probe end can name.
struct RefContext<'a> {
    by_key: &'a HashMap<(&'a str, &'a str), usize>,
    by_ip: &'a HashMap<IpAddr, usize>,
    pods: &'a [PlanPod],
    nodes: &'a [PlanNode],
    nodes_listed: bool,
}

fn resolve_ref(text: &str, path: &str, ctx: &RefContext<'_>, issues: &mut Vec<Issue>) -> Option<HostRef> {
    let (by_key, by_ip, pods) = (ctx.by_key, ctx.by_ip, ctx.pods);
    let text = text.trim();
    if let Some(name) = text.strip_prefix("node:") {
        return find_node(name, path, ctx.nodes, ctx.nodes_listed, issues).map(HostRef::Node);
    }
    if let Some(name) = text.strip_prefix("entity:") {
        return if let Some(e) = Entity::parse(name) {
            Some(HostRef::Entity(e))
        } else {
            issues.push(Issue::invalid(
                path,
                format!(
                    "unknown entity {name:?} (probes can name entity:host, entity:remote-node, entity:kube-apiserver)"
                ),
            ));
            None
        };
    }
    if let Ok(ip) = text.parse::<IpAddr>() {
        if let Some(&i) = by_ip.get(&ip) {
            issues.push(Issue::invalid(
                path,
                format!("{ip} is the address of pod {}: name the pod ({})", pods[i].key(), pods[i].key()),
            ));
            return None;
        }
        let n = ctx.nodes.len();
        let bad = match ip {
            IpAddr::V4(v4) => unusable_ipv4(v4).or(if n > 1 { node_reserved_v4(v4, n) } else { None }),
            IpAddr::V6(v6) => unusable_ipv6(v6).or(if n > 1 { node_reserved_v6(v6, n) } else { None }),
        };
        if let Some(why) = bad {
            issues.push(Issue::invalid(path, format!("{ip} cannot be a world host: {why}")));
            return None;
        }
        return Some(HostRef::World(ip));
    }
    if let Some((ns, name)) = text.split_once('/') {
        return if let Some(&i) = by_key.get(&(ns, name)) {
            Some(HostRef::Pod(i))
        } else {
            issues.push(Issue::invalid(path, format!("no pod {text:?} in the scenario")));
            None
        };
    }
    issues.push(Issue::invalid(
        path,
        format!("{text:?} is neither NAMESPACE/POD, entity:NAME, node:NAME nor an IP address"),
    ));
    None
}

/// Why an IPv4 address cannot be a pod's or a world host's, if it cannot.
fn unusable_ipv4(ip: Ipv4Addr) -> Option<&'static str> {
    if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() || ip.is_broadcast() {
        Some("unspecified, loopback, multicast and broadcast addresses cannot be hosts")
    } else if ip == POD_GATEWAY_IPV4 {
        Some("it is the pods' gateway address")
    } else if u32::from(ip) & 0xffff_ff00 == u32::from(NODE_IPV4) & 0xffff_ff00 {
        Some("10.200.0.0/24 is kept for the testbed's node and infrastructure hosts")
    } else {
        None
    }
}

/// Why an IPv6 address cannot be a pod's or a world host's, if it cannot.
fn unusable_ipv6(ip: Ipv6Addr) -> Option<&'static str> {
    let s = ip.segments();
    if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() {
        Some("unspecified, loopback and multicast addresses cannot be hosts")
    } else if s[0] & 0xffc0 == 0xfe80 {
        Some("link-local addresses cannot be hosts (fe80::1 is the pods' gateway)")
    } else if ip.to_ipv4_mapped().is_some() {
        Some("IPv4-mapped addresses cannot be hosts")
    } else if u128::from(ip) >> 16 == u128::from(NODE_IPV6) >> 16 {
        Some("fd00:10:200::/112 is kept for the testbed's node and infrastructure hosts")
    } else {
        None
    }
}

/// The hosts other than pods that the probes name, each with the addresses of the
/// scenario's families and the ports probes aim at it; a node that has host-network pods
/// also serves their ports.
fn resolve_hosts(
    probes: &[PlanProbe],
    pods: &[PlanPod],
    nodes: &[PlanNode],
    nodes_listed: bool,
    families: &[IpFamily],
) -> Vec<PlanHost> {
    let node_ref = |k: usize| if nodes_listed { HostRef::Node(k) } else { HostRef::Entity(Entity::Host) };
    let mut hosts: Vec<PlanHost> = Vec::new();
    // A probe end that is a host-network pod is its node.
    let ends = probes.iter().flat_map(|p| {
        [(&p.from, false, p), (&p.to, true, p)].map(|(end, dst, p)| match end {
            HostRef::Pod(i) if pods[*i].host_network => (node_ref(pods[*i].node), dst, p),
            other => (other.clone(), dst, p),
        })
    });
    for (end, is_destination, p) in ends {
        let end = &end;
        {
            let i = if let Some(i) = hosts.iter().position(|h| &h.host == end) {
                i
            } else {
                let (ipv4, ipv6) = match end {
                    HostRef::Pod(_) => continue,
                    HostRef::Node(k) => (nodes[*k].ipv4, nodes[*k].ipv6),
                    HostRef::World(IpAddr::V4(a)) => (Some(*a), None),
                    HostRef::World(IpAddr::V6(a)) => (None, Some(*a)),
                    HostRef::Entity(e) => {
                        let (v4, v6) = e.addresses();
                        (
                            families.contains(&IpFamily::IPv4).then_some(v4),
                            families.contains(&IpFamily::IPv6).then_some(v6),
                        )
                    }
                };
                hosts.push(PlanHost { host: end.clone(), ipv4, ipv6, ports: Vec::new() });
                hosts.len() - 1
            };
            if let (true, Some(protocol), Some(port)) = (is_destination, p.protocol.port_protocol(), p.port) {
                let ports = &mut hosts[i].ports;
                if !ports.iter().any(|q| q.port == port && q.protocol == protocol) {
                    ports.push(PodPort { port, protocol, name: None });
                }
            }
        }
    }
    // Host-network pods' ports are served in their node's namespace.
    for pod in pods.iter().filter(|p| p.host_network) {
        let end = node_ref(pod.node);
        let i = if let Some(i) = hosts.iter().position(|h| h.host == end) {
            i
        } else {
            let node = &nodes[pod.node];
            hosts.push(PlanHost { host: end, ipv4: node.ipv4, ipv6: node.ipv6, ports: Vec::new() });
            hosts.len() - 1
        };
        for port in &pod.ports {
            let ports = &mut hosts[i].ports;
            if !ports.iter().any(|q| q.port == port.port && q.protocol == port.protocol) {
                ports.push(port.clone());
            }
        }
    }
    hosts
}

fn check_labels(path: &str, labels: &BTreeMap<String, String>, issues: &mut Vec<Issue>) {
    for (k, v) in labels {
        if k.is_empty() || k.len() > 317 || k.chars().any(char::is_whitespace) {
            issues.push(Issue::invalid(format!("{path}.{k}"), "not a valid label key"));
        }
        if v.len() > 63 || v.chars().any(char::is_whitespace) {
            issues.push(Issue::invalid(format!("{path}.{k}"), format!("{v:?} is not a valid label value")));
        }
    }
}

/// RFC 1123 label: what Kubernetes requires of namespace names.
fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// RFC 1123 subdomain: what Kubernetes requires of pod and service account names.
fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// IANA service name: what Kubernetes requires of named ports.
fn is_port_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.bytes().any(|b| b.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
}

/// A piece of a file name: lowercase letters, digits, '-' and '.'.
fn file_part(s: &str) -> String {
    let p: String = s
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '.' { c.to_ascii_lowercase() } else { '_' })
        .take(60)
        .collect();
    if p.is_empty() { "_".into() } else { p }
}
