//! A pod on this node as the agent tracks it.
use std::net::{Ipv4Addr, Ipv6Addr};

use palisade_policy::labels::LabelSet;
use palisade_policy::resolve::NamedPort;

/// One local endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalEndpoint {
    /// Node-local id (1..=65535), the first field of every policy key.
    pub id: u16,
    pub namespace: String,
    pub name: String,
    /// Security labels (derived from pod and namespace labels, service account, cluster).
    pub labels: LabelSet,
    pub identity: u32,
    pub ipv4: Option<Ipv4Addr>,
    pub ipv6: Option<Ipv6Addr>,
    /// Host-side interface name and index.
    pub interface: String,
    pub ifindex: u32,
    pub named_ports: Vec<NamedPort>,
}

impl LocalEndpoint {
    /// `namespace/name`.
    pub fn full_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// Index of a network interface in the agent's network namespace.
pub fn ifindex(name: &str) -> Option<u32> {
    nix::net::if_::if_nametoindex(name).ok()
}
