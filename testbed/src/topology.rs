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
    Entity, HostRef, IpFamily, NODE_IPV4, NODE_IPV6, POD_GATEWAY_IPV4, POD_GATEWAY_IPV6, Plan, PlanHost, PlanPod,
};

/// The node's interface that holds its addresses.
const NODE_ADDRESS_DEV: &str = "lo";

/// The node's namespace.
#[derive(Debug)]
pub struct Node {
    pub netns: Netns,
    pub ipv4: Option<Ipv4Addr>,
    pub ipv6: Option<Ipv6Addr>,
}

/// One pod's namespace and wiring.
#[derive(Debug)]
pub struct PodNet {
    pub netns: Netns,
    pub ipv4: Option<Ipv4Addr>,
    pub ipv6: Option<Ipv6Addr>,
    /// Host side of the veth, in the node's namespace.
    pub host_interface: String,
}

/// A host other than a pod: its own namespace, or `None` for the node itself.
#[derive(Debug)]
pub struct OtherHostNet {
    pub netns: Option<Netns>,
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
        let node = build_node(prefix, families)?;
        let mut topo = Topology { pods: Vec::with_capacity(plan.pods.len()), hosts: Vec::new(), node };
        for pod in &plan.pods {
            let net = match cni {
                Some(cni) => build_pod_with_cni(&topo.node, pod, prefix, families, cni)?,
                None => build_pod(&topo.node, pod, prefix, families)?,
            };
            topo.pods.push(net);
        }
        for (i, host) in plan.hosts.iter().enumerate() {
            let net = build_other_host(&topo.node, host, i, prefix, families)?;
            topo.hosts.push(net);
        }
        Ok(topo)
    }

    /// The host a probe end names, if this topology has it.
    pub fn host(&self, plan: &Plan, end: &HostRef) -> Option<Host<'_>> {
        let Some(key) = plan.host_key(end) else {
            // The node exists in every scenario; one its probes do not name has no
            // listeners (key none of them uses), so it can only be a probe's source.
            let node = &self.node;
            return (end == &HostRef::Entity(Entity::Host)).then_some(Host {
                netns: &node.netns,
                ipv4: node.ipv4,
                ipv6: node.ipv6,
                key: usize::MAX,
                is_node: true,
            });
        };
        match end {
            HostRef::Pod(i) => {
                self.pods.get(*i).map(|p| Host { netns: &p.netns, ipv4: p.ipv4, ipv6: p.ipv6, key, is_node: false })
            }
            HostRef::Entity(_) | HostRef::World(_) => {
                let h = self.hosts.get(key - plan.pods.len())?;
                Some(Host {
                    netns: h.netns.as_ref().unwrap_or(&self.node.netns),
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

fn build_node(prefix: &str, families: Families) -> Result<Node, SetupError> {
    let netns = Netns::create(&node_netns_name(prefix))?;
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
        nl.add_address(&dev, NODE_ADDRESS_DEV, NODE_IPV4.into(), 32, false)?;
        // Proxy ARP answers for an address only if the node routes it elsewhere than where
        // the request came from: give the gateway address a route on the loopback.
        nl.add_route(&dev, NODE_ADDRESS_DEV, POD_GATEWAY_IPV4.into(), 32, Via::Link)?;
        if v6 {
            nl.add_address(&dev, NODE_ADDRESS_DEV, NODE_IPV6.into(), 128, true)?;
        }
        Ok(())
    })?;
    Ok(Node { netns, ipv4: families.v4.then_some(NODE_IPV4), ipv6: families.v6.then_some(NODE_IPV6) })
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
        return Ok(OtherHostNet { netns: None, ipv4: host.ipv4, ipv6: host.ipv6 });
    }
    let netns = Netns::create(&host_netns_name(prefix, index))?;
    family_settings(&netns, families)?;
    wire(node, &netns, &host_side_name(index), host.ipv4, host.ipv6)?;
    Ok(OtherHostNet { netns: Some(netns), ipv4: host.ipv4, ipv6: host.ipv6 })
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
    let (name, node_v6) = (dev.to_string(), node.ipv6);
    node.netns.netlink(move |nl| {
        let link = nl.existing_link(&name)?;
        if let Some(v4) = ipv4 {
            nl.add_route(&link, &name, v4.into(), 32, Via::LinkFrom(NODE_IPV4.into()))?;
        }
        if let Some(v6) = ipv6 {
            let via = if node_v6.is_some() { Via::LinkFrom(NODE_IPV6.into()) } else { Via::Link };
            nl.add_route(&link, &name, v6.into(), 128, via)?;
        }
        Ok(())
    })?;
    Ok(())
}
