//! Serde mirrors of the manifests as users write them. Spec types reject unknown fields
//! (Cilium's CRD schema would silently drop them, so a typo would change the policy
//! without a word). Fields that palisade does not enforce are still listed, as raw
//! values, so the translator can name them in a clear error or warning instead of
//! "unknown field".

use std::collections::BTreeMap;
use std::fmt;

use crate::yaml::Value;
use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

/// The object metadata we use; every other metadata field is ignored.
#[derive(Debug, Default, Deserialize)]
pub struct Metadata {
    pub name: Option<String>,
    pub namespace: Option<String>,
}

/// A CiliumNetworkPolicy or CiliumClusterwideNetworkPolicy. Other top-level fields
/// (`status`, tooling annotations) are ignored.
#[derive(Debug, Deserialize)]
pub struct CiliumPolicy {
    #[serde(default)]
    pub metadata: Metadata,
    pub spec: Option<CiliumRule>,
    pub specs: Option<Vec<CiliumRule>>,
}

/// Cilium's `api.Rule`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CiliumRule {
    pub endpoint_selector: Option<LabelSelector>,
    pub node_selector: Option<Value>,
    pub ingress: Option<Vec<IngressRule>>,
    pub ingress_deny: Option<Vec<IngressRule>>,
    pub egress: Option<Vec<EgressRule>>,
    pub egress_deny: Option<Vec<EgressRule>>,
    pub enable_default_deny: Option<DefaultDeny>,
    /// Rule labels: metadata, no effect on enforcement.
    #[allow(dead_code, reason = "accepted so that it is not an unknown field")]
    pub labels: Option<Value>,
    #[allow(dead_code, reason = "accepted so that it is not an unknown field")]
    pub description: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DefaultDeny {
    pub ingress: Option<bool>,
    pub egress: Option<bool>,
}

/// Kubernetes `LabelSelector`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabelSelector {
    pub match_labels: Option<BTreeMap<String, String>>,
    pub match_expressions: Option<Vec<LabelSelectorRequirement>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelSelectorRequirement {
    pub key: String,
    pub operator: String,
    pub values: Option<Vec<String>>,
}

/// Cilium's `IngressRule` / `IngressDenyRule`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IngressRule {
    pub from_endpoints: Option<Vec<LabelSelector>>,
    pub from_requires: Option<Vec<LabelSelector>>,
    #[serde(rename = "fromCIDR")]
    pub from_cidr: Option<Vec<String>>,
    #[serde(rename = "fromCIDRSet")]
    pub from_cidr_set: Option<Vec<CidrRule>>,
    pub from_entities: Option<Vec<String>>,
    pub from_groups: Option<Vec<Value>>,
    pub from_nodes: Option<Vec<Value>>,
    pub icmps: Option<Vec<IcmpRule>>,
    pub authentication: Option<Value>,
    pub to_ports: Option<Vec<PortRule>>,
}

/// Cilium's `EgressRule` / `EgressDenyRule`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EgressRule {
    pub to_endpoints: Option<Vec<LabelSelector>>,
    pub to_requires: Option<Vec<LabelSelector>>,
    #[serde(rename = "toCIDR")]
    pub to_cidr: Option<Vec<String>>,
    #[serde(rename = "toCIDRSet")]
    pub to_cidr_set: Option<Vec<CidrRule>>,
    pub to_entities: Option<Vec<String>>,
    pub to_services: Option<Vec<Value>>,
    #[serde(rename = "toFQDNs")]
    pub to_fqdns: Option<Vec<Value>>,
    pub to_groups: Option<Vec<Value>>,
    pub to_nodes: Option<Vec<Value>>,
    pub icmps: Option<Vec<IcmpRule>>,
    pub authentication: Option<Value>,
    pub to_ports: Option<Vec<PortRule>>,
}

/// Cilium's `CIDRRule` (an item of `fromCIDRSet` / `toCIDRSet`).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CidrRule {
    pub cidr: Option<String>,
    pub except: Option<Vec<String>>,
    pub cidr_group_ref: Option<Value>,
    pub cidr_group_selector: Option<Value>,
}

/// Cilium's `ICMPRule`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IcmpRule {
    pub fields: Option<Vec<IcmpField>>,
}

/// Cilium's `ICMPField`: a type number or name, and the family.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IcmpField {
    pub family: Option<String>,
    #[serde(rename = "type")]
    pub icmp_type: PortValue,
}

/// A Kubernetes NetworkPolicy (networking.k8s.io/v1). `status` and other top-level
/// fields are ignored.
#[derive(Debug, Deserialize)]
pub struct NetworkPolicy {
    #[serde(default)]
    pub metadata: Metadata,
    pub spec: Option<NetworkPolicySpec>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkPolicySpec {
    pub pod_selector: Option<LabelSelector>,
    pub policy_types: Option<Vec<String>>,
    pub ingress: Option<Vec<NetworkPolicyIngressRule>>,
    pub egress: Option<Vec<NetworkPolicyEgressRule>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkPolicyIngressRule {
    pub from: Option<Vec<NetworkPolicyPeer>>,
    pub ports: Option<Vec<NetworkPolicyPort>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkPolicyEgressRule {
    pub to: Option<Vec<NetworkPolicyPeer>>,
    pub ports: Option<Vec<NetworkPolicyPort>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkPolicyPeer {
    pub pod_selector: Option<LabelSelector>,
    pub namespace_selector: Option<LabelSelector>,
    pub ip_block: Option<IpBlock>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IpBlock {
    pub cidr: String,
    pub except: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkPolicyPort {
    pub protocol: Option<String>,
    pub port: Option<PortValue>,
    pub end_port: Option<i64>,
}

/// Cilium's `PortRule`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PortRule {
    pub ports: Option<Vec<PortProtocol>>,
    /// L7 rules (http, kafka, dns, l7proto/l7).
    pub rules: Option<Value>,
    #[serde(rename = "originatingTLS")]
    pub originating_tls: Option<Value>,
    #[serde(rename = "terminatingTLS")]
    pub terminating_tls: Option<Value>,
    pub server_names: Option<Value>,
    pub listener: Option<Value>,
}

/// Cilium's `PortProtocol`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PortProtocol {
    pub port: Option<PortValue>,
    pub end_port: Option<i64>,
    pub protocol: Option<String>,
}

/// A port as written: Cilium's schema says string (`"8080"`, `"http"`), but a bare
/// number is accepted too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortValue {
    Text(String),
    Number(i64),
}

impl<'de> Deserialize<'de> for PortValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<PortValue, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = PortValue;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port number or name, like \"8080\" or \"http\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<PortValue, E> {
                Ok(PortValue::Text(v.to_owned()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<PortValue, E> {
                Ok(PortValue::Number(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<PortValue, E> {
                Ok(PortValue::Number(i64::try_from(v).unwrap_or(i64::MAX)))
            }
        }
        d.deserialize_any(V)
    }
}
