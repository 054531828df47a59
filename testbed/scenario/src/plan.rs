//! A validated scenario with everything the testbed decides filled in: pod addresses,
//! host-side interface names, policy file names, resolved probe ends.
use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use super::model::{Expect, IpFamily, PodPort, ProbeProtocol, RawProbe};

/// The node's own address (on the loopback of the node's namespace). 10.200.0.0/24 and
/// `fd00:10:200::/112` are kept for the testbed's infrastructure hosts: the node and the
/// simulated entities.
pub const NODE_IPV4: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
pub const NODE_IPV6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x200, 0, 0, 0, 0, 1);
/// The simulated other node of the cluster (`entity:remote-node`).
pub const REMOTE_NODE_IPV4: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 2);
pub const REMOTE_NODE_IPV6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x200, 0, 0, 0, 0, 2);
/// The address the testbed designates as the cluster's API server (`entity:kube-apiserver`).
pub const KUBE_APISERVER_IPV4: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 3);
pub const KUBE_APISERVER_IPV6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x200, 0, 0, 0, 0, 3);
/// The gateway every pod routes through; the node answers ARP for it (proxy ARP).
pub const POD_GATEWAY_IPV4: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// The IPv6 gateway of every pod: a link-local address on every host-side interface.
pub const POD_GATEWAY_IPV6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);

/// The name of the one node of a scenario that lists no `nodes` (also its node name in
/// Kubernetes mode).
pub const IMPLICIT_NODE: &str = "testbed-node";
/// Most nodes a scenario may list (each is a network namespace with its own agent).
pub const MAX_NODES: usize = 16;

/// The `index`-th node's own address (on its loopback): `10.(200+index).0.1` and
/// `fd00:10:(200+index)::1`, so the first node's is [`NODE_IPV4`] / [`NODE_IPV6`], as in a
/// scenario without `nodes`. Each node keeps `10.(200+index).0.0/24` and
/// `fd00:10:(200+index)::/112` for itself and the testbed's hosts.
pub fn node_addresses(index: usize) -> (Ipv4Addr, Ipv6Addr) {
    let k = u8::try_from(index).ok().filter(|k| usize::from(*k) < MAX_NODES).expect("node index below MAX_NODES");
    (Ipv4Addr::new(10, 200 + k, 0, 1), Ipv6Addr::new(0xfd00, 0x10, 0x200 + u16::from(k), 0, 0, 0, 0, 1))
}

/// The `index`-th node's pod address ranges, `10.(200+index).0.0/16` and
/// `fd00:10:(200+index)::/64` (pods get addresses from `.1.10` / `::1:10` upward; the
/// node routes the other nodes' ranges over the underlay).
pub fn node_pod_cidrs(index: usize) -> ((Ipv4Addr, u8), (Ipv6Addr, u8)) {
    let (v4, v6) = node_addresses(index);
    let o = v4.octets();
    let s = v6.segments();
    ((Ipv4Addr::new(o[0], o[1], 0, 0), 16), (Ipv6Addr::new(s[0], s[1], s[2], 0, 0, 0, 0, 0), 64))
}

/// A node of the scenario: its own network namespace and agent.
#[derive(Clone, Debug)]
pub struct PlanNode {
    /// Position in `nodes` (0 for the implicit node).
    pub index: usize,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// Set when IPv4 is in the scenario's families.
    pub ipv4: Option<Ipv4Addr>,
    /// Set when IPv6 is in the scenario's families.
    pub ipv6: Option<Ipv6Addr>,
}

/// A validated, resolved scenario.
#[derive(Clone, Debug)]
pub struct Plan {
    pub name: String,
    pub description: Option<String>,
    /// The file as given on the command line.
    pub file: PathBuf,
    pub cluster: Option<String>,
    pub ip_families: Vec<IpFamily>,
    /// Namespace name -> labels as written (the agent adds `kubernetes.io/metadata.name`).
    pub namespaces: BTreeMap<String, BTreeMap<String, String>>,
    /// The nodes: those of `nodes`, or one named [`IMPLICIT_NODE`].
    pub nodes: Vec<PlanNode>,
    /// The file lists `nodes` (then `entity:host` is the other end's node, [`HostRef::Node`]).
    pub nodes_listed: bool,
    pub pods: Vec<PlanPod>,
    /// Hosts other than pods that probes start from or go to (world hosts, entities), in
    /// the order probes first name them.
    pub hosts: Vec<PlanHost>,
    pub policies: Vec<PlanPolicy>,
    pub probes: Vec<PlanProbe>,
    /// The agent's extra flags from the scenario's `agent` key (`--policy-audit-mode`,
    /// `--policy-enforcement always`).
    pub agent_args: Vec<String>,
}

impl Plan {
    /// Whether anything of the scenario is in audit mode (agent-wide, a policy's
    /// annotation, a namespace's or pod's label `palisade.io/audit: "true"`): only then
    /// does the testbed wait for AUDIT verdicts of allowed probes.
    pub fn may_audit(&self) -> bool {
        const KEY: &str = "palisade.io/audit";
        self.agent_args.iter().any(|a| a == "--policy-audit-mode")
            || self.policies.iter().any(|p| p.manifest["metadata"]["annotations"][KEY] == "true")
            || self.namespaces.values().any(|l| l.get(KEY).is_some_and(|v| v == "true"))
            || self.pods.iter().any(|p| p.labels.get(KEY).is_some_and(|v| v == "true"))
    }

    pub fn pod(&self, index: usize) -> &PlanPod {
        &self.pods[index]
    }

    /// A probe between this scenario's pods and hosts that its file does not list (see
    /// `validate::extra_probe`); `index` numbers it (the scenario's own are `0..probes.len()`).
    pub fn extra_probe(&self, raw: &RawProbe, index: usize) -> Result<PlanProbe, Vec<super::Issue>> {
        super::validate::extra_probe(self, raw, index)
    }

    pub fn has_family(&self, family: IpFamily) -> bool {
        self.ip_families.contains(&family)
    }

    /// More than one node: each with its own agent, joined by an underlay.
    pub fn is_multi_node(&self) -> bool {
        self.nodes.len() > 1
    }

    /// How a probe end names node `index` itself: [`HostRef::Node`] when the file lists
    /// nodes, `entity:host` ([`HostRef::Entity`]) in a scenario of format 1.0.
    pub fn node_ref(&self, index: usize) -> HostRef {
        if self.nodes_listed { HostRef::Node(index) } else { HostRef::Entity(Entity::Host) }
    }

    /// The node a probe end lives on: a pod's node, a node itself, and node 0 for every
    /// other host (world hosts and the simulated entities are wired to the first node).
    pub fn node_of(&self, end: &HostRef) -> usize {
        match end {
            HostRef::Pod(i) => self.pods[*i].node,
            HostRef::Node(k) => *k,
            HostRef::Entity(_) | HostRef::World(_) => 0,
        }
    }

    /// The pod of a probe end whose policy an agent enforces (not host-network).
    pub fn endpoint_pod(&self, end: &HostRef) -> Option<&PlanPod> {
        match end {
            HostRef::Pod(i) if !self.pods[*i].host_network => Some(&self.pods[*i]),
            _ => None,
        }
    }

    /// The key of a probe end among all hosts: pods are `0..pods.len()`, then
    /// [`Plan::hosts`] in order. Listeners and captures are keyed by it.
    /// A host-network pod has its node's key.
    pub fn host_key(&self, end: &HostRef) -> Option<usize> {
        match end {
            HostRef::Pod(i) if self.pods[*i].host_network => self.host_key(&self.node_ref(self.pods[*i].node)),
            HostRef::Pod(i) => Some(*i),
            other => self.hosts.iter().position(|h| &h.host == other).map(|i| self.pods.len() + i),
        }
    }
}

/// A host that is not a pod: a world host (its own namespace, with the scenario's
/// address) or an entity (the node itself, or a namespace the testbed designates).
#[derive(Clone, Debug)]
pub struct PlanHost {
    /// [`HostRef::World`] or [`HostRef::Entity`].
    pub host: HostRef,
    pub ipv4: Option<Ipv4Addr>,
    pub ipv6: Option<Ipv6Addr>,
    /// What it listens on: every port probes aim at it.
    pub ports: Vec<PodPort>,
}

impl PlanHost {
    /// `entity:host` or `node:NAME`: a node's own namespace, not a namespace of its own.
    pub fn is_node(&self) -> bool {
        matches!(self.host, HostRef::Entity(Entity::Host) | HostRef::Node(_))
    }
}

#[derive(Clone, Debug)]
pub struct PlanPod {
    /// Position in the scenario's `pods` list.
    pub index: usize,
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub service_account: String,
    /// Set when IPv4 is in the scenario's families.
    pub ipv4: Option<Ipv4Addr>,
    /// Set when IPv6 is in the scenario's families.
    pub ipv6: Option<Ipv6Addr>,
    pub ports: Vec<PodPort>,
    /// Host side of the pod's veth, in the node's namespace (unused for a host-network pod).
    pub host_interface: String,
    /// Index into [`Plan::nodes`].
    pub node: usize,
    /// The pod is its node's host: its addresses are the node's, its ports are served in
    /// the node's namespace, and no agent enforces it.
    pub host_network: bool,
}

impl PlanPod {
    /// `namespace/name`, as probes and the agent's events name the pod.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// A policy manifest to hand to the agent.
#[derive(Clone, Debug)]
pub struct PlanPolicy {
    pub index: usize,
    /// `kind`, `metadata.namespace`, `metadata.name` as far as the manifest has them (for
    /// messages; the agent judges the manifest).
    pub kind: String,
    pub namespace: Option<String>,
    pub name: String,
    /// The scenario said `expectRejected: true`.
    pub expect_rejected: bool,
    /// The manifest without `expectRejected`.
    pub manifest: serde_json::Value,
    /// File name in the agent's policy directory.
    pub file_name: String,
}

impl PlanPolicy {
    /// The manifest as written into the agent's policy directory.
    pub fn to_yaml(&self) -> Result<String, serde_saphyr::SerializeError> {
        serde_saphyr::to_string(&self.manifest)
    }

    /// `Kind/namespace/name` (or `Kind/name`), for messages.
    pub fn label(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("{}/{}/{}", self.kind, ns, self.name),
            None => format!("{}/{}", self.kind, self.name),
        }
    }
}

/// Reserved entities a probe can name (`entity:NAME`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Entity {
    Host,
    RemoteNode,
    KubeApiserver,
}

impl Entity {
    /// The entity's addresses (the node's own for `host`).
    pub fn addresses(self) -> (Ipv4Addr, Ipv6Addr) {
        match self {
            Entity::Host => (NODE_IPV4, NODE_IPV6),
            Entity::RemoteNode => (REMOTE_NODE_IPV4, REMOTE_NODE_IPV6),
            Entity::KubeApiserver => (KUBE_APISERVER_IPV4, KUBE_APISERVER_IPV6),
        }
    }

    pub fn parse(name: &str) -> Option<Entity> {
        match name {
            "host" => Some(Entity::Host),
            "remote-node" => Some(Entity::RemoteNode),
            "kube-apiserver" => Some(Entity::KubeApiserver),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Entity::Host => "host",
            Entity::RemoteNode => "remote-node",
            Entity::KubeApiserver => "kube-apiserver",
        }
    }
}

/// One end of a probe.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum HostRef {
    /// Index into [`Plan::pods`].
    Pod(usize),
    /// A node itself (`node:NAME`, or `entity:host` in a file that lists nodes): index into
    /// [`Plan::nodes`].
    Node(usize),
    Entity(Entity),
    /// A host outside the cluster, with this address.
    World(IpAddr),
}

impl fmt::Display for HostRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostRef::Pod(i) => write!(f, "pod #{i}"),
            HostRef::Node(k) => write!(f, "node #{k}"),
            HostRef::Entity(e) => write!(f, "entity:{}", e.as_str()),
            HostRef::World(ip) => write!(f, "{ip}"),
        }
    }
}

#[derive(Clone, Debug)]
pub struct PlanProbe {
    pub index: usize,
    /// `from` and `to` as written in the scenario (the report echoes them).
    pub from_text: String,
    pub to_text: String,
    pub from: HostRef,
    pub to: HostRef,
    pub protocol: ProbeProtocol,
    /// Destination port; `None` for ICMP.
    pub port: Option<u16>,
    /// ICMP type (8 when the scenario does not say).
    pub icmp_type: Option<u8>,
    pub family: IpFamily,
    pub expect: Expect,
}

/// Name of a pod's host-side interface: `lxc` and 12 hex digits of a hash of the pod's key
/// and index (15 bytes, the kernel's limit). Unique within a scenario (checked).
pub fn host_interface_name(namespace: &str, name: &str, index: usize) -> String {
    // FNV-1a, 64 bit: stable across runs and Rust versions.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in namespace.bytes().chain([b'/']).chain(name.bytes()).chain((index as u64).to_le_bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("lxc{:012x}", h & 0xffff_ffff_ffff)
}
