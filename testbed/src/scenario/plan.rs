//! A validated scenario with everything the testbed decides filled in: pod addresses,
//! host-side interface names, policy file names, resolved probe ends.
use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use super::model::{Expect, IpFamily, PodPort, ProbeProtocol};

/// The node's own address (on a dummy interface in the node's namespace). 10.200.0.0/24 is
/// kept for the testbed's infrastructure hosts (node, and later simulated entities).
pub const NODE_IPV4: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
/// The gateway every pod routes through; the node answers ARP for it (proxy ARP).
pub const POD_GATEWAY_IPV4: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

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
    pub pods: Vec<PlanPod>,
    pub policies: Vec<PlanPolicy>,
    pub probes: Vec<PlanProbe>,
}

impl Plan {
    pub fn pod(&self, index: usize) -> &PlanPod {
        &self.pods[index]
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
    pub ipv4: Ipv4Addr,
    pub ipv6: Option<Ipv6Addr>,
    pub ports: Vec<PodPort>,
    /// Host side of the pod's veth, in the node's namespace.
    pub host_interface: String,
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
    pub manifest: serde_yaml::Value,
    /// File name in the agent's policy directory.
    pub file_name: String,
}

impl PlanPolicy {
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
    Entity(Entity),
    /// A host outside the cluster, with this address.
    World(IpAddr),
}

impl fmt::Display for HostRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostRef::Pod(i) => write!(f, "pod #{i}"),
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
