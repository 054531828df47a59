//! Kubernetes objects -> what the actors take: policy texts under a source key, endpoint
//! specs for the pods of this node, label sets and addresses for the pods of other nodes.
//! Pure functions of the objects.
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use k8s_openapi::api::core::v1::Pod;
use palisade_policy::labels::LabelSet;
use serde::Serialize;
use serde_json::Value;

use crate::api::types::{EndpointSpec, PortSpec};

/// Source key of a policy object: `kube:Kind/namespace/name` (`kube:Kind/name` when
/// clusterwide).
pub fn policy_source(kind: &str, namespace: Option<&str>, name: &str) -> String {
    match namespace {
        Some(ns) => format!("kube:{kind}/{ns}/{name}"),
        None => format!("kube:{kind}/{name}"),
    }
}

/// The manifest text of an API object for the policy parser: apiVersion, kind, name,
/// namespace and everything but `status` and the server-managed metadata (so a status
/// write-back or a new resourceVersion does not count as a change).
pub fn policy_text<K: Serialize>(obj: &K, api_version: &str, kind: &str) -> String {
    let mut v = serde_json::to_value(obj).unwrap_or(Value::Null);
    if let Value::Object(map) = &mut v {
        map.insert("apiVersion".into(), Value::String(api_version.into()));
        map.insert("kind".into(), Value::String(kind.into()));
        map.remove("status");
        if let Some(Value::Object(meta)) = map.get_mut("metadata") {
            // Of the annotations only palisade's audit switch, which the parser checks.
            let key = palisade_policy::model::AUDIT_ANNOTATION;
            let audit = meta.get("annotations").and_then(|a| a.get(key)).cloned();
            meta.retain(|k, _| k == "name" || k == "namespace");
            if let Some(a) = audit {
                meta.insert("annotations".into(), serde_json::json!({ key: a }));
            }
        }
    }
    palisade_policy::yaml::to_string(&v).unwrap_or_default()
}

/// What the agent uses of a pod that has an address and is not host-network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    pub node: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub service_account: String,
    pub ipv4: Option<Ipv4Addr>,
    pub ipv6: Option<Ipv6Addr>,
    pub ports: Vec<PortSpec>,
}

impl PodInfo {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    pub fn ips(&self) -> Vec<IpAddr> {
        self.ipv4.map(IpAddr::from).into_iter().chain(self.ipv6.map(IpAddr::from)).collect()
    }

    /// The endpoint spec for the local API, with the host-side interface found.
    pub fn endpoint_spec(&self, interface: String) -> EndpointSpec {
        EndpointSpec {
            labels: self.labels.clone(),
            service_account: self.service_account.clone(),
            ipv4: self.ipv4,
            ipv6: self.ipv6,
            interface,
            ports: self.ports.clone(),
        }
    }

    /// The security labels of this pod (as the endpoint tracker derives them for local
    /// pods, without ipBlock memberships).
    pub fn security_labels(&self, namespace_labels: Option<&BTreeMap<String, String>>, cluster: &str) -> LabelSet {
        let mut ns = namespace_labels.cloned().unwrap_or_default();
        ns.insert("kubernetes.io/metadata.name".into(), self.namespace.clone());
        LabelSet::for_pod(&self.namespace, &ns, &self.labels, &self.service_account, cluster)
    }
}

/// The pod as an endpoint, or `None` when it has none: no address yet, host network (it
/// has its node's address and identity), or finished (Succeeded/Failed: its address may
/// already belong to another pod).
pub fn pod_info(pod: &Pod) -> Option<PodInfo> {
    let spec = pod.spec.as_ref()?;
    if spec.host_network == Some(true) {
        return None;
    }
    let status = pod.status.as_ref()?;
    if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return None;
    }
    let mut ipv4 = None;
    let mut ipv6 = None;
    let listed = status.pod_ips.iter().flatten().map(|p| p.ip.as_str());
    for ip in status.pod_ip.as_deref().into_iter().chain(listed) {
        match ip.parse::<IpAddr>() {
            Ok(IpAddr::V4(a)) if ipv4.is_none() => ipv4 = Some(a),
            Ok(IpAddr::V6(a)) if ipv6.is_none() => ipv6 = Some(a),
            _ => {}
        }
    }
    if ipv4.is_none() && ipv6.is_none() {
        return None;
    }
    let mut ports = Vec::new();
    for c in &spec.containers {
        for p in c.ports.iter().flatten() {
            let (Some(name), Ok(port)) = (p.name.as_ref(), u16::try_from(p.container_port)) else { continue };
            ports.push(PortSpec {
                name: name.clone(),
                port,
                protocol: p.protocol.clone().unwrap_or_else(|| "TCP".into()),
            });
        }
    }
    Some(PodInfo {
        namespace: pod.metadata.namespace.clone().unwrap_or_else(|| "default".into()),
        name: pod.metadata.name.clone().unwrap_or_default(),
        node: spec.node_name.clone(),
        labels: pod.metadata.labels.clone().unwrap_or_default(),
        service_account: spec.service_account_name.clone().unwrap_or_else(|| "default".into()),
        ipv4,
        ipv6,
        ports,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(json: serde_json::Value) -> Pod {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn pod_with_addresses_becomes_an_endpoint() {
        let p = pod(serde_json::json!({
            "metadata": {"name": "web-1", "namespace": "shop", "labels": {"app": "web"}},
            "spec": {"nodeName": "n1", "serviceAccountName": "web", "containers": [
                {"name": "c", "ports": [{"name": "http", "containerPort": 8080}, {"containerPort": 9}]}
            ]},
            "status": {"phase": "Running", "podIP": "10.1.0.5", "podIPs": [{"ip": "10.1.0.5"}, {"ip": "fd00::5"}]}
        }));
        let info = pod_info(&p).unwrap();
        assert_eq!(info.key(), "shop/web-1");
        assert_eq!(info.node.as_deref(), Some("n1"));
        assert_eq!(info.ipv4, Some("10.1.0.5".parse().unwrap()));
        assert_eq!(info.ipv6, Some("fd00::5".parse().unwrap()));
        assert_eq!(info.ports, vec![PortSpec { name: "http".into(), port: 8080, protocol: "TCP".into() }]);
        let spec = info.endpoint_spec("lxc1".into());
        assert_eq!(spec.service_account, "web");
        let labels = info.security_labels(Some(&BTreeMap::from([("team".into(), "a".into())])), "c1").to_string();
        assert!(labels.contains("k8s:app=web"), "{labels}");
        assert!(labels.contains("io.cilium.k8s.namespace.labels.team=a"), "{labels}");
        assert!(labels.contains("io.kubernetes.pod.namespace=shop"), "{labels}");
    }

    #[test]
    fn pods_without_an_own_address_are_not_endpoints() {
        let no_ip = pod(
            serde_json::json!({"metadata": {"name": "a"}, "spec": {"containers": []}, "status": {"phase": "Pending"}}),
        );
        assert!(pod_info(&no_ip).is_none());
        let host = pod(
            serde_json::json!({"metadata": {"name": "a"}, "spec": {"hostNetwork": true, "containers": []}, "status": {"podIP": "192.168.0.1"}}),
        );
        assert!(pod_info(&host).is_none());
        let done = pod(
            serde_json::json!({"metadata": {"name": "a"}, "spec": {"containers": []}, "status": {"phase": "Succeeded", "podIP": "10.0.0.1"}}),
        );
        assert!(pod_info(&done).is_none());
    }

    #[test]
    fn policy_text_drops_status_and_server_metadata() {
        let obj = serde_json::json!({
            "metadata": {"name": "web", "namespace": "shop", "resourceVersion": "7", "uid": "u", "managedFields": [],
                         "annotations": {"palisade.io/audit": "true", "kubectl.kubernetes.io/last-applied-configuration": "{}"}},
            "spec": {"endpointSelector": {}},
            "status": {"nodes": {}}
        });
        let text = policy_text(&obj, "cilium.io/v2", "CiliumNetworkPolicy");
        assert!(!text.contains("resourceVersion") && !text.contains("status") && !text.contains("uid"), "{text}");
        let out = palisade_policy::parse::parse_manifests(&text, "kube:CiliumNetworkPolicy/shop/web").unwrap();
        assert!(matches!(&out[0], palisade_policy::parse::ManifestOutcome::Accepted(p) if p.audit), "{out:?}");
        assert!(!text.contains("last-applied"), "{text}");
        assert_eq!(policy_source("CiliumNetworkPolicy", Some("shop"), "web"), "kube:CiliumNetworkPolicy/shop/web");
        assert_eq!(
            policy_source("CiliumClusterwideNetworkPolicy", None, "all"),
            "kube:CiliumClusterwideNetworkPolicy/all"
        );
    }
}
