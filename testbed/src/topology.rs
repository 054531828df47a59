//! The scenario's network: a namespace for the node and one per pod, wired like a CNI
//! plugin (Calico/Cilium style) would, and nothing in the machine's root namespace.
//!
//! ```text
//!   pod netns pt<pid>-p<i>                    node netns pt<pid>-node
//!   eth0  10.200.1.x/32  <---- veth ---->  lxc<hash>   (proxy_arp, route 10.200.1.x/32)
//!   169.254.1.1 dev eth0 scope link         lo: 10.200.0.1/32; route 169.254.1.1/32 dev lo
//!   default via 169.254.1.1                 ip_forward=1, no default route
//! ```
//!
//! The node's address sits on its loopback (this kernel has no dummy interfaces). The node
//! answers the pods' ARP for the gateway 169.254.1.1 by proxy ARP (it has a route for it
//! on another interface, the loopback) and forwards between the pods' /32 routes. The node has no route
//! out, so nothing a scenario sends can leave the testbed. Later hosts (world addresses,
//! entities) become further namespaces wired to the node the same way.
use std::net::Ipv4Addr;

use crate::error::SetupError;
use crate::netns::Netns;
use crate::scenario::{HostRef, IpFamily, NODE_IPV4, POD_GATEWAY_IPV4, Plan, PlanPod};

/// The node's interface that holds its address.
const NODE_ADDRESS_DEV: &str = "lo";

/// The node's namespace.
#[derive(Debug)]
pub struct Node {
    pub netns: Netns,
    pub ipv4: Ipv4Addr,
}

/// One pod's namespace and wiring.
#[derive(Debug)]
pub struct PodNet {
    pub netns: Netns,
    pub ipv4: Ipv4Addr,
    /// Host side of the veth, in the node's namespace.
    pub host_interface: String,
}

/// Everything built for a scenario. Dropping it removes the pods' namespaces (and with
/// them the veth pairs), then the node's.
#[derive(Debug)]
pub struct Topology {
    /// Same order as [`Plan::pods`]. Declared before `node` so that it is dropped first.
    pub pods: Vec<PodNet>,
    pub node: Node,
}

/// A host probes start from or go to: a pod now; world hosts and entities (each its own
/// namespace wired to the node) later.
#[derive(Clone, Copy, Debug)]
pub struct Host<'a> {
    pub netns: &'a Netns,
    pub ipv4: Ipv4Addr,
    /// Key of the host's listeners (see [`crate::listen::Listeners`]).
    pub listener_key: usize,
}

/// Namespace names of a run: `<prefix>-node`, `<prefix>-p<index>`.
pub fn node_netns_name(prefix: &str) -> String {
    format!("{prefix}-node")
}

pub fn pod_netns_name(prefix: &str, index: usize) -> String {
    format!("{prefix}-p{index}")
}

impl Topology {
    /// Builds the node and every pod of `plan`, with namespace names starting with `prefix`.
    pub fn build(plan: &Plan, prefix: &str) -> Result<Topology, SetupError> {
        let ipv4_only = !plan.ip_families.contains(&IpFamily::IPv6);
        let node = build_node(prefix, ipv4_only)?;
        let mut pods = Vec::with_capacity(plan.pods.len());
        for pod in &plan.pods {
            pods.push(build_pod(&node, pod, prefix, ipv4_only)?);
        }
        Ok(Topology { pods, node })
    }

    /// The host a probe end names, if this topology has it.
    pub fn host(&self, end: &HostRef) -> Option<Host<'_>> {
        match end {
            HostRef::Pod(i) => self.pods.get(*i).map(|p| Host { netns: &p.netns, ipv4: p.ipv4, listener_key: *i }),
            // World hosts and entities: not built by this version (rejected by validation).
            HostRef::Entity(_) | HostRef::World(_) => None,
        }
    }
}

/// IPv6 off in an IPv4-only scenario: no router solicitations or MLD reports crossing the
/// datapath while probing.
const IPV6_OFF: [(&str, &str); 2] =
    [("net/ipv6/conf/all/disable_ipv6", "1"), ("net/ipv6/conf/default/disable_ipv6", "1")];

fn build_node(prefix: &str, ipv4_only: bool) -> Result<Node, SetupError> {
    let netns = Netns::create(&node_netns_name(prefix))?;
    let mut settings = vec![
        ("net/ipv4/ip_forward", "1"),
        ("net/ipv4/conf/all/rp_filter", "0"),
        ("net/ipv4/conf/default/rp_filter", "0"),
    ];
    if ipv4_only {
        settings.extend(IPV6_OFF);
    }
    netns.sysctls(&settings)?;
    netns.ip(&["addr", "add", &format!("{NODE_IPV4}/32"), "dev", NODE_ADDRESS_DEV])?;
    // Proxy ARP answers for an address only if the node routes it elsewhere than where
    // the request came from: give the gateway address a route on the loopback.
    netns.ip(&["route", "add", &format!("{POD_GATEWAY_IPV4}/32"), "dev", NODE_ADDRESS_DEV])?;
    Ok(Node { netns, ipv4: NODE_IPV4 })
}

fn build_pod(node: &Node, pod: &PlanPod, prefix: &str, ipv4_only: bool) -> Result<PodNet, SetupError> {
    let netns = Netns::create(&pod_netns_name(prefix, pod.index))?;
    if ipv4_only {
        netns.sysctls(&IPV6_OFF)?;
    }
    let lxc = pod.host_interface.as_str();
    // Both ends are created directly in their namespaces: never in the root namespace.
    node.netns.ip(&["link", "add", lxc, "type", "veth", "peer", "name", "eth0", "netns", netns.name()])?;
    let gw = POD_GATEWAY_IPV4.to_string();
    netns.ip(&["addr", "add", &format!("{}/32", pod.ipv4), "dev", "eth0"])?;
    netns.ip(&["link", "set", "eth0", "up"])?;
    netns.ip(&["route", "add", &gw, "dev", "eth0", "scope", "link"])?;
    netns.ip(&["route", "add", "default", "via", &gw, "dev", "eth0"])?;

    let proxy_arp = format!("net/ipv4/conf/{lxc}/proxy_arp");
    let rp_filter = format!("net/ipv4/conf/{lxc}/rp_filter");
    // Answer proxy ARP at once instead of after a random delay of up to 0.8 s.
    let proxy_delay = format!("net/ipv4/neigh/{lxc}/proxy_delay");
    node.netns.sysctls(&[(&proxy_arp, "1"), (&rp_filter, "0"), (&proxy_delay, "0")])?;
    node.netns.ip(&["link", "set", lxc, "up"])?;
    let node_ip = node.ipv4.to_string();
    node.netns.ip(&["route", "add", &format!("{}/32", pod.ipv4), "dev", lxc, "src", &node_ip])?;
    Ok(PodNet { netns, ipv4: pod.ipv4, host_interface: lxc.to_string() })
}
