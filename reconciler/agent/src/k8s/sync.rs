//! What the actors should hold, computed from the mirrors of the API: policy texts by
//! source, namespace labels, this node's endpoints, other nodes' pods, and the status each
//! policy object should show for this node. Level-based: every pass compares the whole
//! desired state with what was applied, so a missed event, a relist or a restart of a
//! watch cannot leave anything behind.
use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::ResourceExt;
use kube::api::DynamicObject;
use palisade_policy::labels::LabelSet;
use palisade_policy::resolve::NamedPort;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use super::crd::{NodePolicyStatus, tier_condition_type};
use super::mirror::Mirror;
use super::translate::{PodInfo, pod_info, policy_source, policy_text};
use crate::actors::identity::UpsertRemoteEndpoint;
use crate::api::types::{EndpointSpec, PolicyStatus, PortSpec};

pub const CNP_KIND: &str = "CiliumNetworkPolicy";
pub const CCNP_KIND: &str = "CiliumClusterwideNetworkPolicy";
pub const KNP_KIND: &str = "NetworkPolicy";
pub const CLUSTER_NP_KIND: &str = "ClusterNetworkPolicy";
pub const ANP_KIND: &str = "AdminNetworkPolicy";
pub const BANP_KIND: &str = "BaselineAdminNetworkPolicy";

/// The cluster-scoped tier kinds of `policy.networking.k8s.io`: kind, version, plural.
pub const TIER_KINDS: [(&str, &str, &str); 3] = [
    (CLUSTER_NP_KIND, "v1alpha2", "clusternetworkpolicies"),
    (ANP_KIND, "v1alpha1", "adminnetworkpolicies"),
    (BANP_KIND, "v1alpha1", "baselineadminnetworkpolicies"),
];

/// `policy.networking.k8s.io/<version>` of a tier kind.
pub fn tier_api_version(kind: &str) -> String {
    let version = TIER_KINDS.iter().find(|t| t.0 == kind).map_or("v1alpha2", |t| t.1);
    format!("policy.networking.k8s.io/{version}")
}

/// Mirrors of the tier kinds, by kind.
pub type TierMirrors = BTreeMap<&'static str, Mirror<DynamicObject>>;

/// Policy texts by source key, from the policy mirrors.
pub fn desired_policies(
    cnp: &Mirror<DynamicObject>,
    ccnp: &Mirror<DynamicObject>,
    knp: &Mirror<NetworkPolicy>,
    tiers: &TierMirrors,
) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (kind, mirror) in tiers {
        for o in mirror.objects() {
            out.insert(policy_source(kind, None, &o.name_any()), policy_text(o, &tier_api_version(kind), kind));
        }
    }
    for o in cnp.objects() {
        let src = policy_source(CNP_KIND, Some(&o.namespace().unwrap_or_default()), &o.name_any());
        out.insert(src, policy_text(o, "cilium.io/v2", CNP_KIND));
    }
    for o in ccnp.objects() {
        out.insert(policy_source(CCNP_KIND, None, &o.name_any()), policy_text(o, "cilium.io/v2", CCNP_KIND));
    }
    for o in knp.objects() {
        let src = policy_source(KNP_KIND, Some(&o.namespace().unwrap_or_default()), &o.name_any());
        out.insert(src, policy_text(o, "networking.k8s.io/v1", KNP_KIND));
    }
    out
}

/// Labels of every namespace.
pub fn desired_namespaces(namespaces: &Mirror<Namespace>) -> BTreeMap<String, BTreeMap<String, String>> {
    namespaces.objects().map(|n| (n.name_any(), n.labels().clone())).collect()
}

/// A pod of another node as the identity cache takes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteSpec {
    pub labels: LabelSet,
    pub ips: Vec<IpAddr>,
    pub named_ports: Vec<NamedPort>,
    /// `namespace/name` (what flow records name it by); empty when the source does not
    /// tell it.
    pub pod: String,
}

impl RemoteSpec {
    /// The pod's named ports (`ports` that are not valid named ports are left out: no rule
    /// can name them).
    pub fn new(labels: LabelSet, ips: Vec<IpAddr>, ports: &[PortSpec]) -> RemoteSpec {
        let named_ports = ports.iter().filter_map(|p| NamedPort::new(&p.name, p.port, &p.protocol).ok()).collect();
        RemoteSpec { labels, ips, named_ports, pod: String::new() }
    }

    /// The same pod named `namespace/name`.
    #[must_use]
    pub fn named(mut self, pod: impl Into<String>) -> RemoteSpec {
        self.pod = pod.into();
        self
    }

    /// The identity cache's message for this pod under `key`; `identity`: the cluster's
    /// number for its labels (kvstore mode), else the node allocates one.
    pub fn upsert(&self, key: &str, identity: Option<u32>) -> UpsertRemoteEndpoint {
        UpsertRemoteEndpoint {
            key: key.to_owned(),
            labels: self.labels.clone(),
            ips: self.ips.clone(),
            named_ports: self.named_ports.clone(),
            pod: self.pod.clone(),
            identity,
        }
    }
}

/// The endpoints the pods derive.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredEndpoints {
    /// This node's pods whose host-side interface is known.
    pub local: BTreeMap<(String, String), EndpointSpec>,
    /// This node's pods whose interface is not known yet (`namespace/name`).
    pub waiting: Vec<String>,
    /// Other nodes' pods, by `namespace/name`.
    pub remote: BTreeMap<String, RemoteSpec>,
}

/// Splits the pods into this node's endpoints (with the interface `interface` finds for
/// them) and other nodes' pods (label set and addresses).
pub fn desired_endpoints(
    pods: &Mirror<Pod>,
    namespaces: &BTreeMap<String, BTreeMap<String, String>>,
    node: &str,
    cluster: &str,
    interface: impl Fn(&PodInfo) -> Option<String>,
) -> DesiredEndpoints {
    let mut out = DesiredEndpoints::default();
    for pod in pods.objects() {
        let Some(info) = pod_info(pod) else { continue };
        if info.node.as_deref() == Some(node) {
            match interface(&info) {
                Some(iface) => {
                    out.local.insert((info.namespace.clone(), info.name.clone()), info.endpoint_spec(iface));
                }
                None => out.waiting.push(info.key()),
            }
        } else {
            let labels = info.security_labels(namespaces.get(&info.namespace), cluster);
            out.remote.insert(info.key(), RemoteSpec::new(labels, info.ips(), &info.ports).named(info.key()));
        }
    }
    out
}

/// What a policy object's status should say for this node, from the statuses of its
/// manifests (one per object).
pub fn node_status(statuses: &[PolicyStatus]) -> NodePolicyStatus {
    let ok = !statuses.is_empty() && statuses.iter().all(|s| s.enforced);
    let errors: Vec<&str> = statuses.iter().filter_map(|s| s.error.as_deref()).collect();
    let warnings: Vec<&str> = statuses.iter().flat_map(|s| s.warnings.iter().map(String::as_str)).collect();
    let mut annotations = BTreeMap::new();
    if !warnings.is_empty() {
        annotations.insert("palisade.io/not-enforced".to_string(), warnings.join("; "));
    }
    NodePolicyStatus {
        ok,
        // A rejected new version leaves the last accepted one in force.
        enforcing: ok || errors.iter().any(|e| e.contains("previously accepted version stays in force")),
        error: (!errors.is_empty()).then(|| errors.join("; ")),
        local_policy_revision: statuses.iter().map(|s| s.revision).filter(|r| *r != u64::MAX).max(),
        annotations,
    }
}

/// The condition this node's agent should show on a tier policy (`status.conditions`,
/// type [`tier_condition_type`]), from the statuses of its manifest, or `None` when the
/// object already shows it (same status, reason and message). `lastTransitionTime` moves
/// only when the status flips.
pub fn tier_condition(obj: &DynamicObject, node: &str, statuses: &[PolicyStatus], now: &Time) -> Option<Condition> {
    let st = node_status(statuses);
    let (status, reason, message) = match (&st.error, st.ok) {
        (Some(e), _) if st.enforcing => ("False", "InvalidPreviousVersionEnforced", e.clone()),
        (Some(e), _) => ("False", "Invalid", e.clone()),
        (None, true) if !st.annotations.is_empty() => {
            ("True", "EnforcedWithWarnings", st.annotations.values().cloned().collect::<Vec<_>>().join("; "))
        }
        (None, true) => ("True", "Enforced", format!("enforced by palisade on node {node}")),
        (None, false) => ("Unknown", "Pending", format!("not yet resolved by palisade on node {node}")),
    };
    let type_ = tier_condition_type(node);
    let have = current_tier_condition(obj, &type_);
    if let Some(h) = &have
        && h.status == status
        && h.reason == reason
        && h.message == message
    {
        return None;
    }
    let last_transition_time =
        have.filter(|h| h.status == status).map_or_else(|| now.clone(), |h| h.last_transition_time);
    Some(Condition {
        type_,
        status: status.into(),
        reason: reason.into(),
        message,
        last_transition_time,
        observed_generation: obj.metadata.generation,
    })
}

/// The condition of type `type_` on a tier policy's status, if it has one.
pub fn current_tier_condition(obj: &DynamicObject, type_: &str) -> Option<Condition> {
    let list = obj.data.get("status")?.get("conditions")?.as_array()?;
    let c = list.iter().find(|c| c.get("type").and_then(serde_json::Value::as_str) == Some(type_))?;
    serde_json::from_value(c.clone()).ok()
}

/// The status this node last wrote on an object, if any.
pub fn current_node_status(obj: &DynamicObject, node: &str) -> Option<NodePolicyStatus> {
    let v = obj.data.get("status")?.get("nodes")?.get(node)?;
    serde_json::from_value(v.clone()).ok()
}

/// Whether two statuses differ in what a user reads (the revision alone does not count).
pub fn status_differs(have: Option<&NodePolicyStatus>, want: &NodePolicyStatus) -> bool {
    match have {
        None => true,
        Some(h) => {
            h.ok != want.ok
                || h.enforcing != want.enforcing
                || h.error != want.error
                || h.annotations != want.annotations
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::watcher::Event;

    fn pod(name: &str, node: &str, ip: &str, app: &str) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "shop", "labels": {"app": app}},
            "spec": {"nodeName": node, "containers": []},
            "status": {"phase": "Running", "podIP": ip}
        }))
        .unwrap()
    }

    #[allow(clippy::needless_pass_by_value, reason = "tests pass json! literals")]
    fn cnp(name: &str, spec: serde_json::Value) -> DynamicObject {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
            "metadata": {"name": name, "namespace": "shop", "resourceVersion": "3"},
            "spec": spec
        }))
        .unwrap()
    }

    #[test]
    fn pods_split_into_local_waiting_and_remote() {
        let mut pods = Mirror::default();
        pods.apply(Event::Init);
        pods.apply(Event::InitApply(pod("a", "n1", "10.1.0.1", "web")));
        pods.apply(Event::InitApply(pod("b", "n1", "10.1.0.2", "web")));
        pods.apply(Event::InitApply(pod("c", "n2", "10.2.0.1", "api")));
        pods.apply(Event::InitDone);
        let ns = BTreeMap::from([("shop".to_string(), BTreeMap::from([("team".to_string(), "x".to_string())]))]);
        let d = desired_endpoints(&pods, &ns, "n1", "default", |p| (p.name == "a").then(|| "lxc-a".to_string()));
        assert_eq!(d.local.len(), 1);
        assert_eq!(d.local[&("shop".into(), "a".into())].interface, "lxc-a");
        assert_eq!(d.waiting, vec!["shop/b".to_string()]);
        let c = &d.remote["shop/c"];
        assert_eq!(c.ips, vec!["10.2.0.1".parse::<IpAddr>().unwrap()]);
        assert!(c.labels.to_string().contains("io.cilium.k8s.namespace.labels.team=x"), "{}", c.labels);
    }

    #[test]
    fn policies_are_keyed_by_kind_namespace_and_name() {
        let mut m = Mirror::default();
        m.apply(Event::Apply(cnp("web", serde_json::json!({"endpointSelector": {}}))));
        let d = desired_policies(&m, &Mirror::default(), &Mirror::default(), &TierMirrors::new());
        let text = &d["kube:CiliumNetworkPolicy/shop/web"];
        assert!(text.contains("kind: CiliumNetworkPolicy"), "{text}");
        assert!(!text.contains("resourceVersion"), "{text}");
    }

    #[test]
    fn tier_policies_are_cluster_scoped_sources_with_their_api_version() {
        let mut tiers = TierMirrors::new();
        for (kind, version, _) in TIER_KINDS {
            let obj: DynamicObject = serde_json::from_value(serde_json::json!({
                "apiVersion": format!("policy.networking.k8s.io/{version}"), "kind": kind,
                "metadata": {"name": "default", "resourceVersion": "9", "generation": 2},
                "spec": {"priority": 5}
            }))
            .unwrap();
            let mut m = Mirror::default();
            m.apply(Event::Apply(obj));
            tiers.insert(kind, m);
        }
        let d = desired_policies(&Mirror::default(), &Mirror::default(), &Mirror::default(), &tiers);
        assert_eq!(d.len(), 3);
        assert!(d["kube:ClusterNetworkPolicy/default"].contains("apiVersion: policy.networking.k8s.io/v1alpha2"));
        assert!(d["kube:AdminNetworkPolicy/default"].contains("apiVersion: policy.networking.k8s.io/v1alpha1"));
        let banp = &d["kube:BaselineAdminNetworkPolicy/default"];
        assert!(banp.contains("kind: BaselineAdminNetworkPolicy") && !banp.contains("resourceVersion"), "{banp}");
    }

    #[test]
    fn tier_condition_follows_the_verdict_and_keeps_its_transition_time() {
        let st = |enforced: bool, error: Option<&str>, warnings: Vec<String>| PolicyStatus {
            source: "kube:ClusterNetworkPolicy/a".into(),
            kind: CLUSTER_NP_KIND.into(),
            namespace: None,
            name: "a".into(),
            enforced,
            error: error.map(str::to_string),
            warnings,
            revision: 3,
            audit: false,
        };
        let t1 = Time("2026-01-01T00:00:00Z".parse().unwrap());
        let t2 = Time("2026-01-02T00:00:00Z".parse().unwrap());
        let mut obj: DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
            "metadata": {"name": "a", "generation": 4}, "spec": {}
        }))
        .unwrap();
        let good = tier_condition(&obj, "n1", &[st(true, None, vec![])], &t1).unwrap();
        assert_eq!(
            (good.type_.as_str(), good.status.as_str(), good.reason.as_str()),
            ("Ready-On-Node-n1", "True", "Enforced")
        );
        assert_eq!(good.observed_generation, Some(4));
        // Written (with another node's condition beside it): nothing more to write.
        let other = serde_json::json!({"type": "Ready-On-Node-n2", "status": "False", "reason": "Invalid",
            "message": "x", "lastTransitionTime": "2026-01-01T00:00:00Z"});
        obj.data["status"] = serde_json::json!({"conditions": [other, serde_json::to_value(&good).unwrap()]});
        assert!(tier_condition(&obj, "n1", &[st(true, None, vec![])], &t2).is_none());
        // Warnings: still True (same transition time), another reason.
        let warned =
            tier_condition(&obj, "n1", &[st(true, None, vec!["domainNames: not enforced".into()])], &t2).unwrap();
        assert_eq!((warned.status.as_str(), warned.reason.as_str()), ("True", "EnforcedWithWarnings"));
        assert_eq!(warned.last_transition_time, t1);
        assert!(warned.message.contains("domainNames"));
        // Rejected: False, the time moves; a kept previous version says so.
        let bad =
            tier_condition(&obj, "n1", &[st(false, Some("spec.priority: 1001 is out of range"), vec![])], &t2).unwrap();
        assert_eq!((bad.status.as_str(), bad.reason.as_str()), ("False", "Invalid"));
        assert_eq!(bad.last_transition_time, t2);
        assert!(bad.message.contains("spec.priority"));
        let kept = tier_condition(
            &obj,
            "n1",
            &[st(false, Some("spec.priority: bad (the previously accepted version stays in force)"), vec![])],
            &t2,
        )
        .unwrap();
        assert_eq!(kept.reason, "InvalidPreviousVersionEnforced");
        assert!(current_tier_condition(&obj, "Ready-On-Node-n2").is_some());
    }

    #[test]
    fn node_status_reports_errors_and_keeps_enforcing_the_last_good_version() {
        let st = |enforced: bool, error: Option<&str>| PolicyStatus {
            source: "kube:x".into(),
            kind: CNP_KIND.into(),
            namespace: Some("shop".into()),
            name: "web".into(),
            enforced,
            error: error.map(str::to_string),
            warnings: vec![],
            revision: 4,
            audit: false,
        };
        let good = node_status(&[st(true, None)]);
        assert!(good.ok && good.enforcing && good.error.is_none());
        assert_eq!(good.local_policy_revision, Some(4));
        let bad = node_status(&[st(false, Some("spec.x: bad"))]);
        assert!(!bad.ok && !bad.enforcing);
        let kept = node_status(&[st(false, Some("spec.x: bad (the previously accepted version stays in force)"))]);
        assert!(!kept.ok && kept.enforcing);
        assert!(status_differs(None, &good));
        let mut same = good.clone();
        same.local_policy_revision = Some(9);
        assert!(!status_differs(Some(&same), &good));
        assert!(status_differs(Some(&bad), &good));

        let mut obj = cnp("web", serde_json::json!({}));
        obj.data["status"] =
            serde_json::json!({"nodes": {"n1": {"ok": true, "enforcing": true, "localPolicyRevision": 2}}});
        let have = current_node_status(&obj, "n1").unwrap();
        assert!(!status_differs(Some(&have), &good));
        assert!(current_node_status(&obj, "n2").is_none());
    }
}
