//! Keys and values in etcd, in Cilium's kvstore layout (its `Documentation/kvstore.rst`):
//!
//! | key | value | lease |
//! |---|---|---|
//! | `cilium/state/identities/v1/id/<id>` | the label set, as its key form | none (collected when unused) |
//! | `cilium/state/identities/v1/value/<labels>/<node>` | the id (decimal) | the node's |
//! | `cilium/state/ip/v1/<cluster>/<ip>` | [`IpEntry`] (JSON) | the node's |
//! | `cilium/state/nodes/v1/<cluster>/<node>` | [`NodeEntry`] (JSON) | the node's |
//!
//! A label set's key form is every label as `source:key=value;` in key order, so
//! `value/<labels>/` is a prefix of exactly that set's per-node keys (a label never starts
//! with `/`).
use std::net::IpAddr;

use palisade_policy::labels::{Label, LabelSet};
use serde::{Deserialize, Serialize};

/// Everything agents write lives under this prefix.
pub const STATE: &str = "cilium/state/";
/// Master keys: one per identity.
pub const IDS: &str = "cilium/state/identities/v1/id/";
/// Per-node keys: one per label set and node using it.
pub const VALUES: &str = "cilium/state/identities/v1/value/";
/// The first key after every per-node key (`/` + 1 is `0`), and the first after everything
/// under [`STATE`]: the watcher reads `[AFTER_VALUES, STATE_END)` (the `ip` and `nodes`
/// keys) and [`IDS`], not the per-node keys, which only their own node and the collection
/// pass read.
pub const AFTER_VALUES: &str = "cilium/state/identities/v1/value0";
pub const STATE_END: &str = "cilium/state0";

/// The label set as a key segment: `k8s:app=web;k8s:io.kubernetes.pod.namespace=default;`.
pub fn label_key(labels: &LabelSet) -> String {
    let mut out = String::new();
    for l in labels.iter() {
        out.push_str(&l.to_string());
        out.push(';');
    }
    out
}

/// The label set of a key form; `None` for an empty or malformed one.
pub fn parse_label_key(s: &str) -> Option<LabelSet> {
    if s.is_empty() || !s.ends_with(';') {
        return None;
    }
    let set: LabelSet = s.split(';').filter(|p| !p.is_empty()).map(Label::parse).collect();
    (!set.is_empty()).then_some(set)
}

pub fn id_key(id: u32) -> String {
    format!("{IDS}{id}")
}

/// `value/<labels>/`: the per-node keys of one label set.
pub fn value_prefix(labels_key: &str) -> String {
    format!("{VALUES}{labels_key}/")
}

pub fn ip_prefix(cluster: &str) -> String {
    format!("cilium/state/ip/v1/{cluster}/")
}

pub fn nodes_prefix(cluster: &str) -> String {
    format!("cilium/state/nodes/v1/{cluster}/")
}

/// A pod address: its identity, the node it lives on, and which pod it is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpEntry {
    #[serde(rename = "IP")]
    pub ip: IpAddr,
    #[serde(rename = "HostIP")]
    pub host_ip: IpAddr,
    #[serde(rename = "ID")]
    pub id: u32,
    #[serde(rename = "K8sNamespace", default)]
    pub namespace: String,
    #[serde(rename = "K8sPodName", default)]
    pub pod: String,
    /// The pod's named container ports: other nodes resolve egress rules that name a port
    /// on them.
    #[serde(rename = "NamedPorts", default, skip_serializing_if = "Vec::is_empty")]
    pub named_ports: Vec<KvNamedPort>,
}

/// A named port of a pod, as published with its address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvNamedPort {
    #[serde(rename = "Name")]
    pub name: String,
    #[serde(rename = "Port")]
    pub port: u16,
    /// `TCP`, `UDP` or `SCTP`.
    #[serde(rename = "Protocol")]
    pub protocol: String,
}

/// One address of a node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeAddress {
    #[serde(rename = "Type")]
    pub kind: String,
    #[serde(rename = "IP")]
    pub ip: IpAddr,
}

/// A node of the registry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeEntry {
    #[serde(rename = "Name")]
    pub name: String,
    #[serde(rename = "Cluster")]
    pub cluster: String,
    #[serde(rename = "IPAddresses")]
    pub addresses: Vec<NodeAddress>,
}

/// What one key of [`STATE`] says, for a watcher of `cluster`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    /// A master key: identity -> labels.
    Identity(u32, LabelSet),
    Ip(IpEntry),
    Node(NodeEntry),
    /// A per-node key, or another cluster's, or junk: not used by the watcher.
    Other,
}

/// Parses a key of [`STATE`] and its value (`None` value: the key was deleted, only the
/// key's kind and name are known).
pub fn parse_entry(cluster: &str, key: &str, value: &[u8]) -> Result<Entry, String> {
    if let Some(id) = key.strip_prefix(IDS) {
        let id: u32 = id.parse().map_err(|_| format!("{key}: not a numeric identity"))?;
        let text = std::str::from_utf8(value).map_err(|_| format!("{key}: labels are not UTF-8"))?;
        let labels = parse_label_key(text).ok_or_else(|| format!("{key}: {text:?} is not a label set"))?;
        return Ok(Entry::Identity(id, labels));
    }
    if key.starts_with(&ip_prefix(cluster)) {
        return serde_json::from_slice(value).map(Entry::Ip).map_err(|e| format!("{key}: {e}"));
    }
    if key.starts_with(&nodes_prefix(cluster)) {
        return serde_json::from_slice(value).map(Entry::Node).map_err(|e| format!("{key}: {e}"));
    }
    Ok(Entry::Other)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_sets_round_trip_through_their_key_form() {
        let set: LabelSet = [
            Label::k8s("app", "web"),
            Label::k8s("io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name", "shop"),
            Label::k8s("io.kubernetes.pod.namespace", "shop"),
        ]
        .into_iter()
        .collect();
        let key = label_key(&set);
        assert_eq!(
            key,
            "k8s:app=web;k8s:io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name=shop;k8s:io.kubernetes.pod.namespace=shop;"
        );
        assert_eq!(parse_label_key(&key), Some(set));
        assert_eq!(parse_label_key(""), None);
        assert_eq!(parse_label_key("k8s:app=web"), None, "no trailing ;");
    }

    #[test]
    fn one_label_sets_prefix_is_not_a_larger_sets() {
        let small: LabelSet = [Label::k8s("a", "1")].into_iter().collect();
        let big: LabelSet = [Label::k8s("a", "1"), Label::k8s("b", "2")].into_iter().collect();
        let big_node_key = format!("{}node-a", value_prefix(&label_key(&big)));
        assert!(!big_node_key.starts_with(&value_prefix(&label_key(&small))));
    }

    #[test]
    fn entries_parse_by_key_and_junk_is_named() {
        let e = parse_entry("c1", "cilium/state/identities/v1/id/300", b"k8s:app=web;").unwrap();
        assert_eq!(e, Entry::Identity(300, [Label::k8s("app", "web")].into_iter().collect()));
        let ip = br#"{"IP":"10.1.0.5","HostIP":"10.200.0.1","ID":300,"K8sNamespace":"default","K8sPodName":"web"}"#;
        let Entry::Ip(ip) = parse_entry("c1", "cilium/state/ip/v1/c1/10.1.0.5", ip).unwrap() else { panic!() };
        assert_eq!((ip.id, ip.pod.as_str()), (300, "web"));
        assert_eq!(parse_entry("c2", "cilium/state/ip/v1/c1/10.1.0.5", b"{}").unwrap(), Entry::Other);
        let e = parse_entry("c1", "cilium/state/identities/v1/id/x", b"").unwrap_err();
        assert!(e.contains("not a numeric identity"), "{e}");
        let e = parse_entry("c1", "cilium/state/nodes/v1/c1/n", b"{").unwrap_err();
        assert!(e.starts_with("cilium/state/nodes/v1/c1/n: "), "{e}");
    }
}
