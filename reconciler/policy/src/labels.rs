//! Labels and label sets: what a security identity is made of.
//!
//! A [`Label`] is `source:key=value` (Cilium's notation). A [`LabelSet`] holds at most one
//! label per key (as Cilium's `Labels` map does) and is ordered by key, so equal sets
//! compare, hash and print the same way everywhere. This module also derives the labels
//! of a pod ([`LabelSet::for_pod`]) and the fixed label sets of the reserved identities.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use serde::{Serialize, Serializer};

/// Well-known label sources.
pub mod source {
    /// Labels from Kubernetes (pod labels and the ones the agent derives for a pod).
    pub const K8S: &str = "k8s";
    /// Labels of the reserved identities (`reserved:host`, `reserved:world`...).
    pub const RESERVED: &str = "reserved";
    /// Labels of CIDR identities (`cidr:10.0.0.0/8`).
    pub const CIDR: &str = "cidr";
    /// In a selector: a label of any source.
    pub const ANY: &str = "any";
    /// A label whose source is not known.
    pub const UNSPEC: &str = "unspec";
}

/// Keys of the labels the agent derives for every pod (always with source `k8s`).
pub mod keys {
    /// The pod's namespace.
    pub const POD_NAMESPACE: &str = "io.kubernetes.pod.namespace";
    /// Prefix of one label per label of the pod's namespace.
    pub const NAMESPACE_LABELS_PREFIX: &str = "io.cilium.k8s.namespace.labels.";
    /// The pod's service account.
    pub const SERVICE_ACCOUNT: &str = "io.cilium.k8s.policy.serviceaccount";
    /// The cluster the pod runs in.
    pub const CLUSTER: &str = "io.cilium.k8s.policy.cluster";
    /// The label Kubernetes puts on every namespace.
    pub const NAMESPACE_NAME: &str = "kubernetes.io/metadata.name";
}

/// One label: `source:key=value` (the value may be empty).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Label {
    pub source: String,
    pub key: String,
    pub value: String,
}

impl Label {
    pub fn new(source: &str, key: &str, value: &str) -> Label {
        Label { source: source.to_owned(), key: key.to_owned(), value: value.to_owned() }
    }

    /// A `k8s:` label.
    pub fn k8s(key: &str, value: &str) -> Label {
        Label::new(source::K8S, key, value)
    }

    /// A `reserved:` label (reserved labels have no value).
    pub fn reserved(key: &str) -> Label {
        Label::new(source::RESERVED, key, "")
    }

    /// Parses `source:key=value`, `key=value` or `key` (no source: [`source::UNSPEC`]).
    /// The source is what comes before the first `:` if that `:` comes before any `=`.
    pub fn parse(text: &str) -> Label {
        let (src, rest) = split_source(text);
        let (key, value) = rest.split_once('=').unwrap_or((rest, ""));
        Label::new(src.unwrap_or(source::UNSPEC), key, value)
    }
}

/// Splits an optional `source:` prefix off a label or selector key.
pub(crate) fn split_source(text: &str) -> (Option<&str>, &str) {
    match text.find(':') {
        Some(colon) if text.find('=').is_none_or(|eq| colon < eq) => (Some(&text[..colon]), &text[colon + 1..]),
        _ => (None, text),
    }
}

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.source, self.key)?;
        if !self.value.is_empty() {
            write!(f, "={}", self.value)?;
        }
        Ok(())
    }
}

impl Serialize for Label {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A set of labels with at most one label per key, ordered by key. Copies share the
/// labels (a copy costs one reference count), so identity tables can be copied cheaply.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LabelSet {
    by_key: Arc<BTreeMap<String, Label>>,
}

impl LabelSet {
    pub fn new() -> LabelSet {
        LabelSet::default()
    }

    /// Adds a label, replacing any label with the same key.
    pub fn insert(&mut self, label: Label) {
        Arc::make_mut(&mut self.by_key).insert(label.key.clone(), label);
    }

    /// The label with this key (whatever its source).
    pub fn get(&self, key: &str) -> Option<&Label> {
        self.by_key.get(key)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Label> {
        self.by_key.values()
    }

    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    /// Whether any label has this source.
    pub fn has_source(&self, src: &str) -> bool {
        self.iter().any(|l| l.source == src)
    }

    /// The labels of a pod, as Cilium derives them: the pod's namespace, one label per
    /// namespace label (`kubernetes.io/metadata.name=<namespace>` is always there), the
    /// service account, the cluster, then every pod label with source `k8s`.
    pub fn for_pod(
        namespace: &str,
        namespace_labels: &BTreeMap<String, String>,
        pod_labels: &BTreeMap<String, String>,
        service_account: &str,
        cluster: &str,
    ) -> LabelSet {
        let mut set = LabelSet::new();
        for (k, v) in pod_labels {
            set.insert(Label::k8s(k, v));
        }
        let mut ns_labels = namespace_labels.clone();
        ns_labels.insert(keys::NAMESPACE_NAME.to_owned(), namespace.to_owned());
        for (k, v) in &ns_labels {
            set.insert(Label::k8s(&format!("{}{k}", keys::NAMESPACE_LABELS_PREFIX), v));
        }
        // The derived labels win over pod labels that happen to use the same keys.
        set.insert(Label::k8s(keys::POD_NAMESPACE, namespace));
        set.insert(Label::k8s(keys::SERVICE_ACCOUNT, service_account));
        set.insert(Label::k8s(keys::CLUSTER, cluster));
        set
    }

    /// The label set of a reserved identity: `reserved:<name>`, and for `world-ipv4` /
    /// `world-ipv6` also `reserved:world` (as Cilium does in dual-stack mode).
    pub fn reserved(name: &str) -> LabelSet {
        let mut set: LabelSet = [Label::reserved(name)].into_iter().collect();
        if name == "world-ipv4" || name == "world-ipv6" {
            set.insert(Label::reserved("world"));
        }
        set
    }
}

impl FromIterator<Label> for LabelSet {
    fn from_iter<I: IntoIterator<Item = Label>>(iter: I) -> LabelSet {
        let mut set = LabelSet::new();
        for l in iter {
            set.insert(l);
        }
        set
    }
}

impl fmt::Display for LabelSet {
    /// `k8s:app=frontend,k8s:io.kubernetes.pod.namespace=default`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, l) in self.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{l}")?;
        }
        Ok(())
    }
}

impl Serialize for LabelSet {
    /// A list of `source:key=value` strings.
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn pod_labels_are_derived_like_cilium() {
        let set = LabelSet::for_pod("prod", &map(&[("team", "a")]), &map(&[("app", "frontend")]), "fe-sa", "default");
        let shown: Vec<String> = set.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                "k8s:app=frontend",
                "k8s:io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name=prod",
                "k8s:io.cilium.k8s.namespace.labels.team=a",
                "k8s:io.cilium.k8s.policy.cluster=default",
                "k8s:io.cilium.k8s.policy.serviceaccount=fe-sa",
                "k8s:io.kubernetes.pod.namespace=prod",
            ]
        );
        assert_eq!(set.to_string(), shown.join(","), "Display joins labels with commas");
    }

    #[test]
    fn derived_labels_win_over_pod_labels_with_the_same_key() {
        let set = LabelSet::for_pod(
            "prod",
            &BTreeMap::new(),
            &map(&[("io.kubernetes.pod.namespace", "spoofed")]),
            "default",
            "default",
        );
        assert_eq!(set.get(keys::POD_NAMESPACE).unwrap().value, "prod");
    }

    #[test]
    fn reserved_world_ipv4_also_carries_world() {
        assert_eq!(LabelSet::reserved("world-ipv4").to_string(), "reserved:world,reserved:world-ipv4");
        assert_eq!(LabelSet::reserved("host").to_string(), "reserved:host");
    }

    #[test]
    fn labels_parse_with_and_without_source() {
        assert_eq!(Label::parse("k8s:app=web"), Label::k8s("app", "web"));
        assert_eq!(Label::parse("reserved:host"), Label::reserved("host"));
        assert_eq!(Label::parse("app=a:b"), Label::new("unspec", "app", "a:b"));
    }
}
