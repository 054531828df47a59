//! Every manifest in deploy/ parses into the Kubernetes API types without losing a field,
//! the CRDs there are the ones the Rust types generate, and the DaemonSet and RBAC keep
//! the promises docs/kubernetes.md makes (named capabilities, probes, least privilege).
use std::path::{Path, PathBuf};

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use palisade_policy::yaml::{self, Value};
use serde::de::DeserializeOwned;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy")
}

fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    yaml::documents(&text).unwrap_or_else(|e| panic!("{}: document {}: {}", path.display(), e.document, e.error))
}

/// Parses `doc` as `T` and checks that nothing was dropped: the typed object, written
/// back, equals the document (so a misspelled field fails here, not in the cluster).
fn typed<T: DeserializeOwned + serde::Serialize>(doc: &Value, what: &str) -> T {
    let t: T = serde_json::from_value(doc.clone()).unwrap_or_else(|e| panic!("{what}: {e}"));
    let back: serde_json::Value = serde_json::to_value(&t).unwrap();
    let orig: serde_json::Value = serde_json::to_value(doc).unwrap();
    assert_eq!(back, orig, "{what}: fields were lost or changed when parsed as the API type");
    t
}

#[test]
fn every_manifest_parses_into_the_api_types() {
    let mut kinds = Vec::new();
    for entry in std::fs::read_dir(deploy_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        for doc in documents(&path) {
            let kind = doc["kind"].as_str().unwrap_or_default().to_string();
            let what = format!("{} {kind} {}", path.display(), doc["metadata"]["name"].as_str().unwrap_or("?"));
            match kind.as_str() {
                "ServiceAccount" => drop(typed::<ServiceAccount>(&doc, &what)),
                "ClusterRole" => check_role(&typed::<ClusterRole>(&doc, &what)),
                "ClusterRoleBinding" => drop(typed::<ClusterRoleBinding>(&doc, &what)),
                "ConfigMap" => drop(typed::<ConfigMap>(&doc, &what)),
                "DaemonSet" => check_daemonset(&typed::<DaemonSet>(&doc, &what)),
                "CustomResourceDefinition" => drop(typed::<CustomResourceDefinition>(&doc, &what)),
                other => panic!("{what}: unexpected kind {other}"),
            }
            kinds.push(kind);
        }
    }
    for k in
        ["ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet", "CustomResourceDefinition"]
    {
        assert!(kinds.iter().any(|x| x == k), "deploy/ has no {k}");
    }
}

/// The ConfigMap's data (the agent's environment).
fn deploy_config() -> std::collections::BTreeMap<String, String> {
    let doc = documents(&deploy_dir().join("configmap.yaml")).into_iter().next().unwrap();
    typed::<ConfigMap>(&doc, "configmap").data.unwrap_or_default()
}

fn check_role(role: &ClusterRole) {
    for rule in role.rules.iter().flatten() {
        for v in &rule.verbs {
            assert_ne!(v, "*", "no wildcard verbs");
            if !["get", "list", "watch"].contains(&v.as_str()) {
                assert!(
                    rule.resources.iter().flatten().all(|r| r.ends_with("/status")),
                    "{v} only on status subresources"
                );
            }
        }
        assert!(rule.resources.iter().flatten().all(|r| r != "*"), "no wildcard resources");
    }
}

fn check_daemonset(ds: &DaemonSet) {
    let spec = ds.spec.as_ref().unwrap();
    let pod = spec.template.spec.as_ref().unwrap();
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(spec.update_strategy.as_ref().unwrap().type_.as_deref(), Some("RollingUpdate"));
    let c = &pod.containers[0];
    let sc = c.security_context.as_ref().unwrap();
    assert_ne!(sc.privileged, Some(true), "named capabilities, not privileged");
    let caps = sc.capabilities.as_ref().unwrap();
    let add = caps.add.clone().unwrap_or_default();
    for cap in ["BPF", "NET_ADMIN", "PERFMON"] {
        assert!(add.iter().any(|a| a == cap), "capability {cap} missing");
    }
    assert!(!add.iter().any(|a| a == "SYS_ADMIN" || a == "ALL"), "no blanket capabilities");
    // Probes: the agent's health listener, on loopback (the pod shares the host network
    // namespace with the kubelet), at the address the ConfigMap gives the agent.
    let config = deploy_config();
    let address = config.get("PALISADE_METRICS_ADDRESS").expect("the ConfigMap sets PALISADE_METRICS_ADDRESS");
    let address: std::net::SocketAddr = address.parse().unwrap();
    assert!(address.ip().is_loopback(), "not on a public address by default: {address}");
    let http = |p: Option<&k8s_openapi::api::core::v1::Probe>, path: &str| {
        let get = p.and_then(|p| p.http_get.clone()).unwrap_or_else(|| panic!("an httpGet probe on {path}"));
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(get.host.as_deref(), Some(address.ip().to_string().as_str()));
        assert_eq!(get.port, k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(address.port().into()));
    };
    http(c.liveness_probe.as_ref(), "/healthz");
    http(c.startup_probe.as_ref(), "/healthz");
    http(c.readiness_probe.as_ref(), "/readyz");
    assert!(c.env.iter().flatten().any(|e| e.name == "NODE_NAME"), "NODE_NAME from the downward API");
    let mounts: Vec<&str> = c.volume_mounts.iter().flatten().map(|m| m.mount_path.as_str()).collect();
    assert!(mounts.contains(&"/sys/fs/bpf") && mounts.contains(&"/run/palisade"), "{mounts:?}");
    assert!(mounts.contains(&"/var/lib/palisade"), "the state directory survives the pod: {mounts:?}");
}

#[test]
fn crds_are_up_to_date() {
    let path = deploy_dir().join("crds.yaml");
    let want = palisade_agent::k8s::crd::crds_yaml();
    if std::env::var_os("PALISADE_UPDATE_CRDS").is_some() {
        std::fs::write(&path, &want).unwrap();
    }
    let have = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        have == want,
        "deploy/crds.yaml is not what reconciler/agent/src/k8s/crd.rs generates; run PALISADE_UPDATE_CRDS=1 cargo test -p palisade-agent --test k8s_deploy"
    );
    // The generated schema accepts Cilium's shapes: `spec` or `specs`, and keeps unknown
    // fields for the agent to report.
    let docs = documents(&path);
    assert_eq!(docs.len(), 2);
    for d in &docs {
        let schema = &d["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
        assert!(schema["required"].is_null(), "spec is optional: {schema:?}");
        assert_eq!(schema["properties"]["specs"]["type"].as_str(), Some("array"));
        assert_eq!(schema["properties"]["spec"]["x-kubernetes-preserve-unknown-fields"].as_bool(), Some(true));
        assert!(!d["spec"]["versions"][0]["subresources"]["status"].is_null());
    }
}

#[test]
fn tier_crds_are_up_to_date_cluster_scoped_with_conditions_and_status() {
    let path = deploy_dir().join("crds-network-policy-api.yaml");
    let want = palisade_agent::k8s::crd::tier_crds_yaml();
    if std::env::var_os("PALISADE_UPDATE_CRDS").is_some() {
        std::fs::write(&path, &want).unwrap();
    }
    let have = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        have == want,
        "deploy/crds-network-policy-api.yaml is not what reconciler/agent/src/k8s/crd.rs generates; run PALISADE_UPDATE_CRDS=1 cargo test -p palisade-agent --test k8s_deploy"
    );
    let docs = documents(&path);
    let names: Vec<&str> = docs.iter().map(|d| d["metadata"]["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "clusternetworkpolicies.policy.networking.k8s.io",
            "adminnetworkpolicies.policy.networking.k8s.io",
            "baselineadminnetworkpolicies.policy.networking.k8s.io"
        ]
    );
    for d in &docs {
        assert_eq!(d["spec"]["scope"].as_str(), Some("Cluster"), "{names:?}");
        let version = &d["spec"]["versions"][0];
        assert!(!version["subresources"]["status"].is_null());
        let props = &version["schema"]["openAPIV3Schema"]["properties"];
        assert_eq!(props["spec"]["x-kubernetes-preserve-unknown-fields"].as_bool(), Some(true));
        // Upstream's status: conditions, a list map keyed by type (one entry per node).
        let conditions = &props["status"]["properties"]["conditions"];
        assert_eq!(conditions["x-kubernetes-list-type"].as_str(), Some("map"), "{conditions:?}");
        assert_eq!(conditions["x-kubernetes-list-map-keys"][0].as_str(), Some("type"));
        for field in ["type", "status", "reason", "message", "lastTransitionTime"] {
            assert!(!conditions["items"]["properties"][field].is_null(), "condition field {field}");
        }
        if d["spec"]["names"]["kind"].as_str() != Some("BaselineAdminNetworkPolicy") {
            assert_eq!(props["spec"]["properties"]["priority"]["maximum"].as_f64(), Some(1000.0));
        }
    }
    let cnp = &docs[0]["spec"]["versions"][0];
    assert_eq!(cnp["name"].as_str(), Some("v1alpha2"));
    let tier = &cnp["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["tier"]["enum"];
    assert_eq!(tier[0].as_str(), Some("Admin"));
    assert_eq!(tier[1].as_str(), Some("Baseline"));
}

#[test]
fn rbac_lets_the_agent_watch_the_tier_kinds_and_patch_only_their_status() {
    let role = documents(&deploy_dir().join("rbac.yaml"))
        .into_iter()
        .find(|d| d["kind"].as_str() == Some("ClusterRole"))
        .map(|d| typed::<ClusterRole>(&d, "ClusterRole"))
        .unwrap();
    let allows = |resource: &str, verb: &str| {
        role.rules.iter().flatten().any(|r| {
            r.api_groups.iter().flatten().any(|g| g == "policy.networking.k8s.io")
                && r.resources.iter().flatten().any(|x| x == resource)
                && r.verbs.iter().any(|v| v == verb)
        })
    };
    for plural in ["clusternetworkpolicies", "adminnetworkpolicies", "baselineadminnetworkpolicies"] {
        for verb in ["get", "list", "watch"] {
            assert!(allows(plural, verb), "{verb} {plural}");
        }
        assert!(allows(&format!("{plural}/status"), "patch"), "patch {plural}/status");
        assert!(!allows(plural, "patch") && !allows(plural, "update"), "the spec stays read-only: {plural}");
    }
}

#[test]
fn cilium_example_manifests_fit_the_generated_types() {
    // The same manifest a Cilium user applies: it deserializes into the typed resource.
    let cnp: palisade_agent::k8s::crd::CiliumNetworkPolicy = yaml::from_str(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: web, namespace: shop}\nspec:\n  endpointSelector: {matchLabels: {app: web}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: api}}]\n    toPorts: [{ports: [{port: \"80\", protocol: TCP}]}]\n",
    )
    .unwrap();
    assert_eq!(cnp.spec.ingress.as_ref().unwrap().len(), 1);
}
