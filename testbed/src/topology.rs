//! The scenario's network: a namespace for the node, one per pod and one per other host
//! (world hosts, the simulated remote node and API server), each wired to the node like a
//! CNI plugin (Calico/Cilium style) wires a pod, and nothing in the machine's root namespace.
//!
//! ```text
//!   pod netns pt<pid>-p<i>                    node netns pt<pid>-node
//!   eth0  10.200.1.x/32  <---- veth ---->  lxc<hash>   (proxy_arp, route 10.200.1.x/32)
//!         fd00:10:200::1:x/128                         fe80::1/64, route fd00:10:200::1:x/128
//!   169.254.1.1 dev eth0 scope link         lo: 10.200.0.1/32, fd00:10:200::1/128
//!   default via 169.254.1.1                 route 169.254.1.1/32 dev lo
//!   default via fe80::1 dev eth0            ip_forward=1, no default route
//!
//!   host netns pt<pid>-h<i>  (world host 203.0.113.7, remote node 10.200.0.2, ...)
//!   eth0  <addr>/32 or /128  <--- veth ---> tbh<i>     (same wiring, never an endpoint)
//! ```
//!
//! With several nodes (`nodes:` in the scenario) every node is such a namespace
//! (`<prefix>-node` for the first, `<prefix>-n<k>` for the others), with its own address
//! (`10.(200+k).0.1`, `fd00:10:(200+k)::1`) and pod range (`10.(200+k).0.0/16`,
//! `fd00:10:(200+k)::/64`), and the underlay is a veth pair between every two nodes
//! (`ul<j>` in node i leads to node j, `ul<i>` in node j back), routed natively: each node
//! routes every other node's address and pod range over the pair to that node (IPv4 with
//! its own address as source and proxy ARP on the far end, IPv6 through the far end's
//! link-local address `fe80::a:<j+1>`), so pods see each other's real addresses, no NAT.
//! World hosts and the simulated entities are wired to the first node; the others route
//! them over the underlay. A host-network pod has no namespace of its own: it is its node.
//!
//! The node's addresses sit on its loopback (this kernel has no dummy interfaces). The node
//! answers the pods' ARP for the gateway 169.254.1.1 by proxy ARP (it has a route for it
//! on another interface, the loopback); for IPv6 every host-side interface carries the
//! link-local gateway `fe80::1` itself. The node forwards between the /32 and /128 routes.
//! It has no route out, so nothing a scenario sends can leave the testbed: a "world"
//! address exists only as the namespace the testbed made for it. IPv6 duplicate address
//! detection and router solicitations are off, so addresses work at once.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::path::PathBuf;

use crate::error::SetupError;
use crate::netns::{Netns, Via};
use crate::scenario::{
    Entity, HostRef, IpFamily, POD_GATEWAY_IPV4, POD_GATEWAY_IPV6, Plan, PlanHost, PlanPod, node_addresses,
    node_pod_cidrs,
};

/// The node's interface that holds its addresses.
const NODE_ADDRESS_DEV: &str = "lo";

/// A node's namespace.
#[derive(Debug)]
pub struct Node {
    pub netns: Netns,
    pub ipv4: Option<Ipv4Addr>,
    pub ipv6: Option<Ipv6Addr>,
    /// Position in [`Plan::nodes`].
    pub index: usize,
    /// The node's IPv4 address, on its loopback in every scenario (the source of its
    /// routes), even when the scenario is IPv6 only.
    pub own_ipv4: Ipv4Addr,
}

/// One pod's namespace and wiring (a host-network pod: an alias of its node's namespace).
#[derive(Debug)]
pub struct PodNet {
    pub netns: Netns,
    pub ipv4: Option<Ipv4Addr>,
    pub ipv6: Option<Ipv6Addr>,
    /// Host side of the veth, in the node's namespace.
    pub host_interface: String,
}

/// A host other than a pod: its own namespace, or `None` for a node itself.
#[derive(Debug)]
pub struct OtherHostNet {
    pub netns: Option<Netns>,
    /// The node it is (`netns` `None`) or is wired to.
    pub node: usize,
    pub ipv4: Option<Ipv4Addr>,
    pub ipv6: Option<Ipv6Addr>,
}

/// Everything built for a scenario. Dropping it removes the pods' and hosts' namespaces
/// (and with them the veth pairs), then the node's.
#[derive(Debug)]
pub struct Topology {
    /// Same order as [`Plan::pods`]. Declared before `node` so that it is dropped first.
    pub pods: Vec<PodNet>,
    /// Same order as [`Plan::hosts`].
    pub hosts: Vec<OtherHostNet>,
    /// The nodes after the first (multi-node scenarios), in [`Plan::nodes`] order.
    pub extra_nodes: Vec<Node>,
    /// The first node (the only one of a scenario without `nodes`).
    pub node: Node,
}

/// A host probes start from or go to: a pod, a world host, an entity.
#[derive(Clone, Copy, Debug)]
pub struct Host<'a> {
    pub netns: &'a Netns,
    pub ipv4: Option<Ipv4Addr>,
    pub ipv6: Option<Ipv6Addr>,
    /// Key of the host's listeners (see [`Plan::host_key`]).
    pub key: usize,
    /// The node's own namespace (`entity:host`): many interfaces, not one `eth0`.
    pub is_node: bool,
}

impl Host<'_> {
    /// The host's address of `family`.
    pub fn addr(&self, family: IpFamily) -> Option<IpAddr> {
        match family {
            IpFamily::IPv4 => self.ipv4.map(IpAddr::V4),
            IpFamily::IPv6 => self.ipv6.map(IpAddr::V6),
        }
    }
}

/// Namespace names of a run: `<prefix>-node`, `<prefix>-p<index>`, `<prefix>-h<index>`.
pub fn node_netns_name(prefix: &str) -> String {
    format!("{prefix}-node")
}

/// The namespace of node `index`: the first node's is [`node_netns_name`].
pub fn nth_node_netns_name(prefix: &str, index: usize) -> String {
    if index == 0 { node_netns_name(prefix) } else { format!("{prefix}-n{index}") }
}

/// Node i's end of the underlay pair that leads to node `peer`.
pub fn underlay_name(peer: usize) -> String {
    format!("ul{peer}")
}

/// Node `index`'s link-local address on every underlay link (the IPv6 next hop of the
/// other nodes).
pub fn underlay_ipv6(index: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0xa, index as u16 + 1)
}

pub fn pod_netns_name(prefix: &str, index: usize) -> String {
    format!("{prefix}-p{index}")
}

pub fn host_netns_name(prefix: &str, index: usize) -> String {
    format!("{prefix}-h{index}")
}

/// Node side of the veth of the `index`-th other host.
pub fn host_side_name(index: usize) -> String {
    format!("tbh{index}")
}

impl Topology {
    /// Builds the node, every pod and every other host of `plan`, with namespace names
    /// starting with `prefix`.
    pub fn build(plan: &Plan, prefix: &str) -> Result<Topology, SetupError> {
        Topology::build_with(plan, prefix, None)
    }

    /// As [`Topology::build`], the pods plumbed by the CNI plugin `cni` when given.
    pub fn build_with(plan: &Plan, prefix: &str, cni: Option<&Cni>) -> Result<Topology, SetupError> {
        let families = Families { v4: plan.has_family(IpFamily::IPv4), v6: plan.has_family(IpFamily::IPv6) };
        let node = build_node(prefix, 0, families)?;
        let mut topo =
            Topology { pods: Vec::with_capacity(plan.pods.len()), hosts: Vec::new(), extra_nodes: Vec::new(), node };
        for k in 1..plan.nodes.len() {
            let n = build_node(prefix, k, families)?;
            topo.extra_nodes.push(n);
        }
        if plan.is_multi_node() {
            build_underlay(&topo, families)?;
        }
        for pod in &plan.pods {
            let node = topo.node_at(pod.node);
            let net = match cni {
                _ if pod.host_network => {
                    PodNet { netns: node.netns.alias(), ipv4: pod.ipv4, ipv6: pod.ipv6, host_interface: String::new() }
                }
                Some(cni) => build_pod_with_cni(node, pod, prefix, families, cni)?,
                None => build_pod(node, pod, prefix, families)?,
            };
            topo.pods.push(net);
        }
        for (i, host) in plan.hosts.iter().enumerate() {
            let node = match host.host {
                HostRef::Node(k) => k,
                _ => 0,
            };
            let net = build_other_host(topo.node_at(node), host, i, prefix, families)?;
            topo.hosts.push(net);
        }
        if plan.is_multi_node() {
            route_extra_addresses(&topo, plan)?;
        }
        Ok(topo)
    }

    /// Node `index` (0: [`Topology::node`]).
    pub fn node_at(&self, index: usize) -> &Node {
        if index == 0 { &self.node } else { &self.extra_nodes[index - 1] }
    }

    /// Every node, in [`Plan::nodes`] order.
    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        std::iter::once(&self.node).chain(&self.extra_nodes)
    }

    /// The host a probe end names, if this topology has it.
    pub fn host(&self, plan: &Plan, end: &HostRef) -> Option<Host<'_>> {
        let Some(key) = plan.host_key(end) else {
            // The nodes exist in every scenario; one its probes do not name has no
            // listeners (key none of them uses), so it can only be a probe's source.
            let node = match end {
                HostRef::Entity(Entity::Host) => &self.node,
                HostRef::Node(k) if *k < plan.nodes.len() => self.node_at(*k),
                HostRef::Pod(i) if plan.pods.get(*i).is_some_and(|p| p.host_network) => {
                    self.node_at(plan.pods[*i].node)
                }
                _ => return None,
            };
            return Some(Host { netns: &node.netns, ipv4: node.ipv4, ipv6: node.ipv6, key: usize::MAX, is_node: true });
        };
        match end {
            HostRef::Pod(i) if key < plan.pods.len() => {
                self.pods.get(*i).map(|p| Host { netns: &p.netns, ipv4: p.ipv4, ipv6: p.ipv6, key, is_node: false })
            }
            // A host-network pod is its node.
            HostRef::Pod(_) | HostRef::Node(_) | HostRef::Entity(_) | HostRef::World(_) => {
                let h = self.hosts.get(key - plan.pods.len())?;
                Some(Host {
                    netns: h.netns.as_ref().unwrap_or(&self.node_at(h.node).netns),
                    ipv4: h.ipv4,
                    ipv6: h.ipv6,
                    key,
                    is_node: h.netns.is_none(),
                })
            }
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Families {
    v4: bool,
    v6: bool,
}

/// IPv6 off in an IPv4-only scenario: no router solicitations or MLD reports crossing the
/// datapath while probing.
const IPV6_OFF: [(&str, &str); 2] =
    [("net/ipv6/conf/all/disable_ipv6", "1"), ("net/ipv6/conf/default/disable_ipv6", "1")];

/// IPv6 on, without the delays and chatter of autoconfiguration: no duplicate address
/// detection (addresses usable at once), no router solicitations or advertisements.
const IPV6_QUIET: [(&str, &str); 5] = [
    ("net/ipv6/conf/all/accept_dad", "0"),
    ("net/ipv6/conf/default/accept_dad", "0"),
    ("net/ipv6/conf/default/router_solicitations", "0"),
    ("net/ipv6/conf/all/accept_ra", "0"),
    ("net/ipv6/conf/default/accept_ra", "0"),
];

/// Settings every namespace of the run gets, before any interface is made in it.
fn family_settings(netns: &Netns, families: Families) -> Result<(), SetupError> {
    if families.v6 { netns.sysctls(&IPV6_QUIET) } else { netns.sysctls(&IPV6_OFF) }
}

fn build_node(prefix: &str, index: usize, families: Families) -> Result<Node, SetupError> {
    let (node_v4, node_v6) = node_addresses(index);
    let netns = Netns::create(&nth_node_netns_name(prefix, index))?;
    family_settings(&netns, families)?;
    netns.sysctls(&[
        ("net/ipv4/ip_forward", "1"),
        ("net/ipv4/conf/all/rp_filter", "0"),
        ("net/ipv4/conf/default/rp_filter", "0"),
    ])?;
    if families.v6 {
        netns.sysctls(&[("net/ipv6/conf/all/forwarding", "1")])?;
    }
    // The node's IPv4 address exists in every scenario (the agent's own API is a unix
    // socket; the address only matters to probes), its IPv6 one when IPv6 is on.
    let v6 = families.v6;
    netns.netlink(move |nl| {
        let dev = nl.existing_link(NODE_ADDRESS_DEV)?;
        nl.add_address(&dev, NODE_ADDRESS_DEV, node_v4.into(), 32, false)?;
        // Proxy ARP answers for an address only if the node routes it elsewhere than where
        // the request came from: give the gateway address a route on the loopback.
        nl.add_route(&dev, NODE_ADDRESS_DEV, POD_GATEWAY_IPV4.into(), 32, Via::Link)?;
        if v6 {
            nl.add_address(&dev, NODE_ADDRESS_DEV, node_v6.into(), 128, true)?;
        }
        Ok(())
    })?;
    Ok(Node {
        netns,
        ipv4: families.v4.then_some(node_v4),
        ipv6: families.v6.then_some(node_v6),
        index,
        own_ipv4: node_v4,
    })
}

/// A veth pair between every two nodes, and each node's routes to the other nodes'
/// addresses and pod ranges over it.
fn build_underlay(topo: &Topology, families: Families) -> Result<(), SetupError> {
    let nodes: Vec<&Node> = topo.nodes().collect();
    for (i, a) in nodes.iter().enumerate() {
        for (j, b) in nodes.iter().enumerate().skip(i + 1) {
            let peer_ns = b.netns.open()?;
            let (here, there) = (underlay_name(j), underlay_name(i));
            a.netns.netlink(move |nl| nl.add_veth_with_peer_in(&here, &there, peer_ns.as_raw_fd()))?;
        }
    }
    for (i, node) in nodes.iter().enumerate() {
        for (j, _) in nodes.iter().enumerate().filter(|(j, _)| *j != i) {
            let dev = underlay_name(j);
            if families.v4 {
                let proxy_arp = format!("net/ipv4/conf/{dev}/proxy_arp");
                let rp_filter = format!("net/ipv4/conf/{dev}/rp_filter");
                let proxy_delay = format!("net/ipv4/neigh/{dev}/proxy_delay");
                node.netns.sysctls(&[(&proxy_arp, "1"), (&rp_filter, "0"), (&proxy_delay, "0")])?;
            }
            let (src_v4, v6) = (node.own_ipv4, families.v6);
            let (peer_v4, peer_v6) = node_addresses(j);
            let ((cidr_v4, len_v4), (cidr_v6, len_v6)) = node_pod_cidrs(j);
            let local_ll = underlay_ipv6(i);
            let peer_ll = underlay_ipv6(j);
            let v4 = families.v4;
            node.netns.netlink(move |nl| {
                let link = nl.existing_link(&dev)?;
                if v6 {
                    nl.add_address(&link, &dev, local_ll.into(), 64, true)?;
                }
                nl.set_up(&link, &dev)?;
                if v4 {
                    nl.add_route(&link, &dev, peer_v4.into(), 32, Via::LinkFrom(src_v4.into()))?;
                    nl.add_route(&link, &dev, cidr_v4.into(), len_v4, Via::LinkFrom(src_v4.into()))?;
                }
                if v6 {
                    nl.add_route(&link, &dev, peer_v6.into(), 128, Via::Gateway(peer_ll.into()))?;
                    nl.add_route(&link, &dev, cidr_v6.into(), len_v6, Via::Gateway(peer_ll.into()))?;
                }
                Ok(())
            })?;
        }
    }
    Ok(())
}

/// Addresses outside their node's pod range (pods with an `ip` of the scenario's choice,
/// world hosts wired to the first node): a host route on every other node.
fn route_extra_addresses(topo: &Topology, plan: &Plan) -> Result<(), SetupError> {
    let mut extra: Vec<(usize, IpAddr)> = Vec::new();
    let in_range = |node: usize, ip: IpAddr| {
        let ((v4, l4), (v6, l6)) = node_pod_cidrs(node);
        match ip {
            IpAddr::V4(a) => u32::from(a) & (u32::MAX << (32 - l4)) == u32::from(v4),
            IpAddr::V6(a) => u128::from(a) & (u128::MAX << (128 - l6)) == u128::from(v6),
        }
    };
    for pod in plan.pods.iter().filter(|p| !p.host_network) {
        for ip in [pod.ipv4.map(IpAddr::V4), pod.ipv6.map(IpAddr::V6)].into_iter().flatten() {
            if !in_range(pod.node, ip) {
                extra.push((pod.node, ip));
            }
        }
    }
    for (host, net) in plan.hosts.iter().zip(&topo.hosts) {
        if net.netns.is_none() {
            continue;
        }
        for ip in [host.ipv4.map(IpAddr::V4), host.ipv6.map(IpAddr::V6)].into_iter().flatten() {
            if !in_range(net.node, ip) {
                extra.push((net.node, ip));
            }
        }
    }
    for node in topo.nodes() {
        let routes: Vec<(IpAddr, usize)> =
            extra.iter().filter(|(n, _)| *n != node.index).map(|(n, ip)| (*ip, *n)).collect();
        if routes.is_empty() {
            continue;
        }
        let src_v4 = node.own_ipv4;
        node.netns.netlink(move |nl| {
            for (ip, via) in routes {
                let dev = underlay_name(via);
                let link = nl.existing_link(&dev)?;
                match ip {
                    IpAddr::V4(_) => nl.add_route(&link, &dev, ip, 32, Via::LinkFrom(src_v4.into()))?,
                    IpAddr::V6(_) => nl.add_route(&link, &dev, ip, 128, Via::Gateway(underlay_ipv6(via).into()))?,
                }
            }
            Ok(())
        })?;
    }
    Ok(())
}

fn build_pod(node: &Node, pod: &PlanPod, prefix: &str, families: Families) -> Result<PodNet, SetupError> {
    let netns = Netns::create(&pod_netns_name(prefix, pod.index))?;
    family_settings(&netns, families)?;
    wire(node, &netns, &pod.host_interface, pod.ipv4, pod.ipv6)?;
    Ok(PodNet { netns, ipv4: pod.ipv4, ipv6: pod.ipv6, host_interface: pod.host_interface.clone() })
}

/// The CNI plugin that plumbs the pods, as a container runtime calls it.
#[derive(Clone, Debug)]
pub struct Cni {
    /// The `palisade-cni` binary.
    pub plugin: PathBuf,
    /// A folder for the network configuration and the IPAM plugins (one per pod, answering
    /// the scenario's addresses).
    pub dir: PathBuf,
    /// The agent's API socket, where the plugin registers the pods.
    pub agent_socket: PathBuf,
}

/// A pod's namespace plumbed by the CNI plugin: ADD run inside the node's namespace (the
/// plugin creates the veth pair there and moves its peer into the pod), with the pod's
/// identity in `CNI_ARGS` and its scenario addresses from a static IPAM plugin.
fn build_pod_with_cni(
    node: &Node,
    pod: &PlanPod,
    prefix: &str,
    families: Families,
    cni: &Cni,
) -> Result<PodNet, SetupError> {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;

    let netns = Netns::create(&pod_netns_name(prefix, pod.index))?;
    family_settings(&netns, families)?;
    let io = |what: String| move |e: std::io::Error| SetupError::Io { what: what.clone(), source: e };
    std::fs::create_dir_all(&cni.dir).map_err(io(format!("creating {}", cni.dir.display())))?;
    let mut ips = Vec::new();
    if let Some(a) = pod.ipv4 {
        ips.push(serde_json::json!({"address": format!("{a}/32")}));
    }
    if let Some(a) = pod.ipv6 {
        ips.push(serde_json::json!({"address": format!("{a}/128")}));
    }
    let result = serde_json::json!({"cniVersion": "1.0.0", "ips": ips});
    let ipam = format!("testbed-ipam-{}", pod.index);
    let script = format!(
        "#!/bin/sh\n# Static IPAM of the testbed: pod {}'s scenario addresses.\n[ \"$CNI_COMMAND\" = ADD ] && echo '{result}'\nexit 0\n",
        pod.key()
    );
    let ipam_path = cni.dir.join(&ipam);
    std::fs::write(&ipam_path, script).map_err(io(format!("writing {}", ipam_path.display())))?;
    std::fs::set_permissions(&ipam_path, std::fs::Permissions::from_mode(0o755))
        .map_err(io(format!("making {} executable", ipam_path.display())))?;
    let conf = serde_json::json!({
        "cniVersion": "1.0.0", "name": "palisade-testbed", "type": "palisade-cni",
        "agentSocket": cni.agent_socket, "ipam": {"type": ipam}
    });
    let node_ns = node.netns.open()?;
    let ns_fd = std::os::fd::AsRawFd::as_raw_fd(&node_ns);
    let mut cmd = std::process::Command::new(&cni.plugin);
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", netns.name())
        .env("CNI_NETNS", netns.path())
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", &cni.dir)
        .env("CNI_ARGS", format!("K8S_POD_NAMESPACE={};K8S_POD_NAME={}", pod.namespace, pod.name))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    // SAFETY: only setns (async-signal-safe) between fork and exec; `node_ns` outlives spawn.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(ns_fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let what = format!("running the CNI plugin {} for pod {}", cni.plugin.display(), pod.key());
    let mut child = cmd.spawn().map_err(io(what.clone()))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(conf.to_string().as_bytes()).map_err(io(what.clone()))?;
    }
    let out = child.wait_with_output().map_err(io(what.clone()))?;
    drop(node_ns);
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    if !out.status.success() {
        return Err(SetupError::Io {
            what,
            source: std::io::Error::other(format!("{answer} {}", String::from_utf8_lossy(&out.stderr).trim())),
        });
    }
    let host_interface = answer["interfaces"][0]["name"]
        .as_str()
        .ok_or_else(|| SetupError::Io {
            what,
            source: std::io::Error::other(format!("no host interface in {answer}")),
        })?
        .to_string();
    Ok(PodNet { netns, ipv4: pod.ipv4, ipv6: pod.ipv6, host_interface })
}

fn build_other_host(
    node: &Node,
    host: &PlanHost,
    index: usize,
    prefix: &str,
    families: Families,
) -> Result<OtherHostNet, SetupError> {
    if host.is_node() {
        return Ok(OtherHostNet { netns: None, node: node.index, ipv4: host.ipv4, ipv6: host.ipv6 });
    }
    let netns = Netns::create(&host_netns_name(prefix, index))?;
    family_settings(&netns, families)?;
    wire(node, &netns, &host_side_name(index), host.ipv4, host.ipv6)?;
    Ok(OtherHostNet { netns: Some(netns), node: node.index, ipv4: host.ipv4, ipv6: host.ipv6 })
}

/// A veth pair between the node (interface `dev`) and `netns` (interface `eth0`) with the
/// host's addresses, its default routes via the gateways, and the node's routes to it.
fn wire(
    node: &Node,
    netns: &Netns,
    dev: &str,
    ipv4: Option<Ipv4Addr>,
    ipv6: Option<Ipv6Addr>,
) -> Result<(), SetupError> {
    // Both ends are created directly in their namespaces: never in the root namespace.
    let peer_ns = netns.open()?;
    let name = dev.to_string();
    node.netns.netlink(move |nl| nl.add_veth_with_peer_in(&name, "eth0", peer_ns.as_raw_fd()))?;
    if ipv4.is_some() {
        let proxy_arp = format!("net/ipv4/conf/{dev}/proxy_arp");
        let rp_filter = format!("net/ipv4/conf/{dev}/rp_filter");
        // Answer proxy ARP at once instead of after a random delay of up to 0.8 s.
        let proxy_delay = format!("net/ipv4/neigh/{dev}/proxy_delay");
        node.netns.sysctls(&[(&proxy_arp, "1"), (&rp_filter, "0"), (&proxy_delay, "0")])?;
    }
    let name = dev.to_string();
    node.netns.netlink(move |nl| {
        let link = nl.existing_link(&name)?;
        if ipv6.is_some() {
            nl.add_address(&link, &name, POD_GATEWAY_IPV6.into(), 64, true)?;
        }
        nl.set_up(&link, &name)
    })?;
    netns.netlink(move |nl| {
        let eth0 = nl.existing_link("eth0")?;
        if let Some(v4) = ipv4 {
            nl.add_address(&eth0, "eth0", v4.into(), 32, false)?;
        }
        if let Some(v6) = ipv6 {
            nl.add_address(&eth0, "eth0", v6.into(), 128, true)?;
        }
        nl.set_up(&eth0, "eth0")?;
        if ipv4.is_some() {
            nl.add_route(&eth0, "eth0", POD_GATEWAY_IPV4.into(), 32, Via::Link)?;
            nl.add_route(&eth0, "eth0", Ipv4Addr::UNSPECIFIED.into(), 0, Via::Gateway(POD_GATEWAY_IPV4.into()))?;
        }
        if ipv6.is_some() {
            nl.add_route(&eth0, "eth0", Ipv6Addr::UNSPECIFIED.into(), 0, Via::Gateway(POD_GATEWAY_IPV6.into()))?;
        }
        Ok(())
    })?;
    let (name, node_v4, node_v6) = (dev.to_string(), node.own_ipv4, node.ipv6);
    node.netns.netlink(move |nl| {
        let link = nl.existing_link(&name)?;
        if let Some(v4) = ipv4 {
            nl.add_route(&link, &name, v4.into(), 32, Via::LinkFrom(node_v4.into()))?;
        }
        if let Some(v6) = ipv6 {
            let via = if let Some(own) = node_v6 { Via::LinkFrom(own.into()) } else { Via::Link };
            nl.add_route(&link, &name, v6.into(), 128, via)?;
        }
        Ok(())
    })?;
    Ok(())
}
