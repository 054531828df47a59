//! A pod on this node as the agent tracks it, and what is derived from the pods: their
//! security labels, the pod addresses the resolver needs, and the ipcache handed to the
//! map writer.
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use palisade_api::types::EndpointSpec;
use palisade_policy::labels::LabelSet;
use palisade_policy::resolve::{DesiredState, EndpointView, NamedPort};

use crate::ipcache::Prefix;

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

    /// What the resolver sees of the endpoint.
    pub fn view(&self) -> EndpointView {
        EndpointView {
            id: self.id,
            namespace: self.namespace.clone(),
            identity: self.identity,
            labels: self.labels.clone(),
            named_ports: self.named_ports.clone(),
        }
    }
}

/// The label set of a pod: pod labels, namespace labels (with
/// `kubernetes.io/metadata.name`), service account and cluster. Kubernetes NetworkPolicy
/// ipBlocks match pod addresses, address by address: that is not part of the pod's labels
/// (a dual-stack pod may have one address inside a block and one outside); the resolver
/// gives such addresses address identities (`DesiredState::address_ipcache`), so a
/// policy change never changes a pod's labels.
pub fn endpoint_labels(
    namespace: &str,
    namespace_labels: &BTreeMap<String, String>,
    spec: &EndpointSpec,
    cluster: &str,
) -> LabelSet {
    let mut ns_labels = namespace_labels.clone();
    ns_labels.insert("kubernetes.io/metadata.name".into(), namespace.to_string());
    LabelSet::for_pod(namespace, &ns_labels, &spec.labels, &spec.service_account, cluster)
}

/// The ipcache as the resolver hands it to the map writer: CIDR identities, then addresses
/// outside this node's pods (reserved prefixes, other nodes' pods), then the local pods' own
/// addresses, then the address identities of pod addresses inside Kubernetes NetworkPolicy
/// ipBlocks; later entries win on the same prefix.
pub fn assemble_ipcache(
    desired: &DesiredState,
    external: &BTreeMap<Prefix, u32>,
    endpoints: &[LocalEndpoint],
) -> BTreeMap<Prefix, u32> {
    let mut ipcache = desired.cidr_ipcache.clone();
    ipcache.extend(external.iter().map(|(k, v)| (*k, *v)));
    for e in endpoints {
        if let Some(v4) = e.ipv4 {
            ipcache.insert((v4.into(), 32), e.identity);
        }
        if let Some(v6) = e.ipv6 {
            ipcache.insert((v6.into(), 128), e.identity);
        }
    }
    ipcache.extend(desired.address_ipcache.iter().map(|(k, v)| (*k, *v)));
    ipcache
}

/// The pod addresses the resolver needs (for ipBlocks): local endpoints' addresses and
/// other nodes' pods' addresses, each with its pod's identity.
pub fn pod_addresses(endpoints: &[LocalEndpoint], remote: &BTreeMap<IpAddr, u32>) -> BTreeMap<IpAddr, u32> {
    let mut out = remote.clone();
    for e in endpoints {
        if let Some(v4) = e.ipv4 {
            out.insert(v4.into(), e.identity);
        }
        if let Some(v6) = e.ipv6 {
            out.insert(v6.into(), e.identity);
        }
    }
    out
}
