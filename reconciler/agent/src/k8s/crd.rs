//! The cilium.io/v2 policy resources and the `policy.networking.k8s.io` tier kinds
//! (ClusterNetworkPolicy v1alpha2, AdminNetworkPolicy and BaselineAdminNetworkPolicy
//! v1alpha1) as Rust types, for generating `CustomResourceDefinitions` (`deploy/crds.yaml`
//! for clusters without Cilium, `deploy/crds-network-policy-api.yaml` for clusters without
//! the network-policy-api CRDs; both checked by a test to be up to date).
//!
//! The schema is that of Cilium's `api.Rule` at the level of rule fields: the shape of each
//! rule (which fields exist, lists, strings) is checked by the API server; the meaning
//! (selectors, ports, CIDRs) is validated by the agent, which reports every error with its
//! field path in the policy's status. `spec` keeps unknown fields
//! (`x-kubernetes-preserve-unknown-fields`) so that a typo reaches the agent and is
//! rejected with a clear error instead of being pruned silently by the API server.
//!
//! The agent does not watch through these types: it reads the objects as untyped JSON so
//! that one malformed object cannot stop the watch of all the others.
use std::collections::BTreeMap;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResource;
use kube::core::CustomResourceExt;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Any JSON object, kept as written (the agent validates it).
fn free_object(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({ "type": "object", "x-kubernetes-preserve-unknown-fields": true })
}

/// A list of JSON objects, kept as written.
fn free_object_list(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "array",
        "items": { "type": "object", "x-kubernetes-preserve-unknown-fields": true }
    })
}

/// A list of rule objects (ingress, egress and their deny forms).
fn rule_list(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "array",
        "items": {
            "type": "object",
            "x-kubernetes-preserve-unknown-fields": true,
            "properties": {
                "fromEndpoints": { "type": "array", "items": { "type": "object", "x-kubernetes-preserve-unknown-fields": true } },
                "toEndpoints": { "type": "array", "items": { "type": "object", "x-kubernetes-preserve-unknown-fields": true } },
                "fromRequires": { "type": "array", "items": { "type": "object", "x-kubernetes-preserve-unknown-fields": true } },
                "toRequires": { "type": "array", "items": { "type": "object", "x-kubernetes-preserve-unknown-fields": true } },
                "fromCIDR": { "type": "array", "items": { "type": "string" } },
                "toCIDR": { "type": "array", "items": { "type": "string" } },
                "fromCIDRSet": { "type": "array", "items": { "type": "object", "x-kubernetes-preserve-unknown-fields": true } },
                "toCIDRSet": { "type": "array", "items": { "type": "object", "x-kubernetes-preserve-unknown-fields": true } },
                "fromEntities": { "type": "array", "items": { "type": "string" } },
                "toEntities": { "type": "array", "items": { "type": "string" } },
                "toPorts": { "type": "array", "items": { "type": "object", "x-kubernetes-preserve-unknown-fields": true } },
                "icmps": { "type": "array", "items": { "type": "object", "x-kubernetes-preserve-unknown-fields": true } }
            }
        }
    })
}

/// Cilium's `api.Rule`: the `spec` (or one element of `specs`) of a CNP or CCNP.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "cilium.io",
    version = "v2",
    kind = "CiliumNetworkPolicy",
    plural = "ciliumnetworkpolicies",
    shortname = "cnp",
    namespaced,
    status = "PolicyResourceStatus",
    doc = "CiliumNetworkPolicy: a namespaced network policy (cilium.io/v2, enforced by palisade)",
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct CiliumRuleSpec {
    /// Which endpoints the rule applies to (a label selector).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "free_object")]
    pub endpoint_selector: Option<serde_json::Value>,
    /// Which nodes the rule applies to (host policies; not enforced by palisade).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "free_object")]
    pub node_selector: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "rule_list")]
    pub ingress: Option<Vec<serde_json::Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "rule_list")]
    pub ingress_deny: Option<Vec<serde_json::Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "rule_list")]
    pub egress: Option<Vec<serde_json::Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "rule_list")]
    pub egress_deny: Option<Vec<serde_json::Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enable_default_deny: Option<DefaultDenySpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "free_object_list")]
    pub labels: Option<Vec<serde_json::Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// `enableDefaultDeny`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct DefaultDenySpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<bool>,
}

/// The clusterwide form: same rule, no namespace.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "cilium.io",
    version = "v2",
    kind = "CiliumClusterwideNetworkPolicy",
    plural = "ciliumclusterwidenetworkpolicies",
    shortname = "ccnp",
    status = "PolicyResourceStatus",
    doc = "CiliumClusterwideNetworkPolicy: a cluster-scoped network policy (cilium.io/v2, enforced by palisade)"
)]
pub struct ClusterwideRuleSpec(pub CiliumRuleSpec);

/// `status` of a CNP or CCNP, as Cilium writes it: one entry per node.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PolicyResourceStatus {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub nodes: BTreeMap<String, NodePolicyStatus>,
}

/// Whether one node's agent enforces the policy.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodePolicyStatus {
    /// True when the policy was accepted.
    #[serde(default)]
    pub ok: bool,
    /// True when it is part of what the node enforces.
    #[serde(default)]
    pub enforcing: bool,
    /// Why it was rejected: kind, name, field path, reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The agent's revision that includes this version of the policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_policy_revision: Option<u64>,
    /// Parts of the policy accepted but not enforced (L7 rules...).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// The `spec` of a v1alpha2 ClusterNetworkPolicy, at the level of its fields: the tier and
/// priority are checked by the API server (enum, 0..=1000), the subject and rules keep
/// what was written so the agent can report a mistake with its field path instead of the
/// API server pruning it.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "policy.networking.k8s.io",
    version = "v1alpha2",
    kind = "ClusterNetworkPolicy",
    plural = "clusternetworkpolicies",
    status = "TierPolicyStatus",
    doc = "ClusterNetworkPolicy: a cluster-wide policy of the Admin or Baseline tier (policy.networking.k8s.io/v1alpha2, enforced by palisade)",
    printcolumn = r#"{"name":"Tier","type":"string","jsonPath":".spec.tier"}"#,
    printcolumn = r#"{"name":"Priority","type":"string","jsonPath":".spec.priority"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct ClusterNetworkPolicySpec {
    /// Admin (before the NetworkPolicy tier) or Baseline (after it, only for pods no
    /// NetworkPolicy-tier policy selects).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = ["Admin", "Baseline"]))]
    pub tier: Option<String>,
    /// 0..=1000; lower is evaluated first within the tier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1000))]
    pub priority: Option<i32>,
    /// The pods the policy applies to (`namespaces` or `pods`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "free_object")]
    pub subject: Option<serde_json::Value>,
    /// Ingress rules, in order (first match decides); at most 25.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "tier_rules_25")]
    pub ingress: Option<Vec<serde_json::Value>>,
    /// Egress rules, in order (first match decides); at most 25.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "tier_rules_25")]
    pub egress: Option<Vec<serde_json::Value>>,
}

/// The `spec` of a v1alpha1 AdminNetworkPolicy (translated at parse time: `Allow` is
/// Accept, `ports` are protocols).
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "policy.networking.k8s.io",
    version = "v1alpha1",
    kind = "AdminNetworkPolicy",
    plural = "adminnetworkpolicies",
    shortname = "anp",
    status = "TierPolicyStatus",
    doc = "AdminNetworkPolicy: the v1alpha1 Admin tier (policy.networking.k8s.io/v1alpha1, enforced by palisade as a ClusterNetworkPolicy of tier Admin)",
    printcolumn = r#"{"name":"Priority","type":"string","jsonPath":".spec.priority"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct AdminNetworkPolicySpec {
    /// 0..=1000; lower is evaluated first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1000))]
    pub priority: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "free_object")]
    pub subject: Option<serde_json::Value>,
    /// Ingress rules, in order; at most 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "tier_rules_100")]
    pub ingress: Option<Vec<serde_json::Value>>,
    /// Egress rules, in order; at most 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "tier_rules_100")]
    pub egress: Option<Vec<serde_json::Value>>,
}

/// The `spec` of the v1alpha1 BaselineAdminNetworkPolicy (one per cluster, named
/// `default`; the Baseline tier after every ClusterNetworkPolicy of that tier).
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "policy.networking.k8s.io",
    version = "v1alpha1",
    kind = "BaselineAdminNetworkPolicy",
    plural = "baselineadminnetworkpolicies",
    shortname = "banp",
    status = "TierPolicyStatus",
    doc = "BaselineAdminNetworkPolicy: the v1alpha1 Baseline tier (policy.networking.k8s.io/v1alpha1, enforced by palisade as a ClusterNetworkPolicy of tier Baseline)",
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct BaselineAdminNetworkPolicySpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "free_object")]
    pub subject: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "tier_rules_100")]
    pub ingress: Option<Vec<serde_json::Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "tier_rules_100")]
    pub egress: Option<Vec<serde_json::Value>>,
}

fn tier_rules(max: u32) -> schemars::Schema {
    schemars::json_schema!({
        "type": "array",
        "maxItems": max,
        "items": { "type": "object", "x-kubernetes-preserve-unknown-fields": true }
    })
}

fn tier_rules_25(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    tier_rules(25)
}

fn tier_rules_100(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    tier_rules(100)
}

/// `status` of the tier kinds, as upstream defines it: a list of `metav1.Condition`, a map
/// keyed by `type` (so each node's agent owns its own condition through server-side apply).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TierPolicyStatus {
    #[serde(default)]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>,
}

fn conditions_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let item = generator.subschema_for::<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>();
    schemars::json_schema!({
        "type": "array",
        "items": item,
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": ["type"]
    })
}

/// The condition type this node's agent owns on a tier policy's status:
/// `Ready-On-Node-<node>` (node names fit the condition type's syntax).
pub fn tier_condition_type(node: &str) -> String {
    format!("Ready-On-Node-{node}")
}

/// The CRDs of the tier kinds, for clusters that do not have the network-policy-api CRDs
/// (the content of `deploy/crds-network-policy-api.yaml`).
pub fn tier_crds() -> Vec<CustomResourceDefinition> {
    vec![ClusterNetworkPolicy::crd(), AdminNetworkPolicy::crd(), BaselineAdminNetworkPolicy::crd()]
}

/// [`tier_crds`] as one multi-document YAML text.
pub fn tier_crds_yaml() -> String {
    let mut out = String::from(
        "# Generated from reconciler/agent/src/k8s/crd.rs (test k8s_deploy::tier_crds_are_up_to_date_cluster_scoped_with_conditions_and_status);\n\
         # apply only on clusters without the kubernetes-sigs/network-policy-api CRDs (theirs serve the same resources).\n",
    );
    for crd in tier_crds() {
        out.push_str("---\n");
        out.push_str(&palisade_policy::yaml::to_string(&crd).expect("a CRD serializes"));
    }
    out
}

/// The CRDs palisade needs on a cluster without Cilium. Adjusted after derivation to
/// Cilium's shape: `spec` is optional and `specs` (a list of rules) may stand instead.
pub fn crds() -> Vec<CustomResourceDefinition> {
    let mut out = vec![CiliumNetworkPolicy::crd(), CiliumClusterwideNetworkPolicy::crd()];
    for crd in &mut out {
        for version in &mut crd.spec.versions {
            let Some(schema) = version.schema.as_mut().and_then(|s| s.open_api_v3_schema.as_mut()) else { continue };
            schema.required = None;
            if let Some(props) = schema.properties.as_mut()
                && let Some(spec) = props.get("spec").cloned()
            {
                props.insert(
                    "specs".into(),
                    k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSONSchemaProps {
                        type_: Some("array".into()),
                        items: Some(
                            k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSONSchemaPropsOrArray::Schema(
                                Box::new(spec),
                            ),
                        ),
                        ..Default::default()
                    },
                );
            }
        }
    }
    out
}

/// [`crds`] as one multi-document YAML text, the content of `deploy/crds.yaml`.
pub fn crds_yaml() -> String {
    let mut out = String::from(
        "# Generated from reconciler/agent/src/k8s/crd.rs (test k8s_deploy::crds_are_up_to_date);\n\
         # apply only on clusters without Cilium (Cilium's own CRDs serve the same resources).\n",
    );
    for crd in crds() {
        out.push_str("---\n");
        out.push_str(&palisade_policy::yaml::to_string(&crd).expect("a CRD serializes"));
    }
    out
}
