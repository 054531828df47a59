//! Label selectors over [`LabelSet`]s: Kubernetes `matchLabels` + `matchExpressions`, with
//! Cilium's source prefixes on keys (`k8s:app`, `reserved:host`; no prefix = any source).
//!
//! [`EndpointSelector::matches`] is pure label matching. Which identities a selector may
//! select at all (endpoint selectors never select reserved or CIDR identities unless they
//! name such a label) is the resolver's business.

use std::collections::BTreeSet;
use std::fmt;

use serde::{Serialize, Serializer};

use crate::labels::{LabelSet, source, split_source};

/// A selector key: a label key and the source it must come from ([`source::ANY`]: any).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SelectorKey {
    pub source: String,
    pub key: String,
}

impl SelectorKey {
    /// Parses `source:key` or `key` (no prefix: any source).
    pub fn parse(text: &str) -> SelectorKey {
        let (src, key) = split_source(text);
        SelectorKey { source: src.unwrap_or(source::ANY).to_owned(), key: key.to_owned() }
    }

    pub fn new(source: &str, key: &str) -> SelectorKey {
        SelectorKey { source: source.to_owned(), key: key.to_owned() }
    }

    /// The value of the label this key refers to in `labels`, if there is one.
    fn value_in<'a>(&self, labels: &'a LabelSet) -> Option<&'a str> {
        let label = labels.get(&self.key)?;
        (self.source == source::ANY || label.source == self.source).then_some(&label.value)
    }
}

impl fmt::Display for SelectorKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.source, self.key)
    }
}

/// The operator of a requirement (`matchLabels` entries are `In` with one value).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Operator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

/// One requirement; a selector matches when all of its requirements do.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Requirement {
    pub key: SelectorKey,
    pub operator: Operator,
    pub values: BTreeSet<String>,
}

impl Requirement {
    pub fn matches(&self, labels: &LabelSet) -> bool {
        let value = self.key.value_in(labels);
        match self.operator {
            Operator::In => value.is_some_and(|v| self.values.contains(v)),
            Operator::NotIn => value.is_none_or(|v| !self.values.contains(v)),
            Operator::Exists => value.is_some(),
            Operator::DoesNotExist => value.is_none(),
        }
    }
}

impl fmt::Display for Requirement {
    /// `k8s:app=web`, `any:tier in (a,b)`, `any:tier notin (a)`, `any:x`, `!any:x`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let values = self.values.iter().cloned().collect::<Vec<_>>().join(",");
        match self.operator {
            Operator::In if self.values.len() == 1 => write!(f, "{}={values}", self.key),
            Operator::In => write!(f, "{} in ({values})", self.key),
            Operator::NotIn => write!(f, "{} notin ({values})", self.key),
            Operator::Exists => write!(f, "{}", self.key),
            Operator::DoesNotExist => write!(f, "!{}", self.key),
        }
    }
}

/// A label selector. The empty selector matches every label set.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EndpointSelector {
    requirements: BTreeSet<Requirement>,
}

impl EndpointSelector {
    /// The selector that matches everything (`{}`).
    pub fn all() -> EndpointSelector {
        EndpointSelector::default()
    }

    /// Adds a requirement (the selector then matches less).
    pub fn require(&mut self, key: SelectorKey, operator: Operator, values: &[&str]) {
        self.requirements.insert(Requirement {
            key,
            operator,
            values: values.iter().map(|v| (*v).to_owned()).collect(),
        });
    }

    /// Adds a `matchLabels` entry; `key` may carry a source prefix.
    #[must_use]
    pub fn match_label(mut self, key: &str, value: &str) -> EndpointSelector {
        self.require(SelectorKey::parse(key), Operator::In, &[value]);
        self
    }

    /// The selector that matches what both match.
    #[must_use]
    pub fn and(mut self, other: &EndpointSelector) -> EndpointSelector {
        self.requirements.extend(other.requirements.iter().cloned());
        self
    }

    pub fn requirements(&self) -> impl Iterator<Item = &Requirement> {
        self.requirements.iter()
    }

    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }

    pub fn matches(&self, labels: &LabelSet) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }

    /// Whether some requirement is about `key` with one of these sources.
    pub fn names_key(&self, key: &str, sources: &[&str]) -> bool {
        self.requirements.iter().any(|r| r.key.key == key && sources.contains(&r.key.source.as_str()))
    }

    /// Removes and returns the requirements about `key` with one of these sources.
    pub fn remove_key(&mut self, key: &str, sources: &[&str]) -> Vec<Requirement> {
        let (removed, kept) = std::mem::take(&mut self.requirements)
            .into_iter()
            .partition(|r| r.key.key == key && sources.contains(&r.key.source.as_str()));
        self.requirements = kept;
        removed.into_iter().collect()
    }

    /// Whether some requirement is about a key with this source.
    pub fn names_source(&self, src: &str) -> bool {
        self.requirements.iter().any(|r| r.key.source == src)
    }
}

impl fmt::Display for EndpointSelector {
    /// Requirements joined by `, ` (`{}` for the empty selector).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("{}");
        }
        for (i, r) in self.requirements.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{r}")?;
        }
        Ok(())
    }
}

impl Serialize for EndpointSelector {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::labels::Label;

    fn pod(ns: &str, labels: &[(&str, &str)]) -> LabelSet {
        let labels: BTreeMap<String, String> = labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        LabelSet::for_pod(ns, &BTreeMap::new(), &labels, "default", "default")
    }

    #[test]
    fn match_labels_with_and_without_source() {
        let web = pod("default", &[("app", "web")]);
        assert!(EndpointSelector::all().match_label("app", "web").matches(&web));
        assert!(EndpointSelector::all().match_label("k8s:app", "web").matches(&web));
        assert!(EndpointSelector::all().match_label("any:app", "web").matches(&web));
        assert!(!EndpointSelector::all().match_label("reserved:app", "web").matches(&web));
        assert!(!EndpointSelector::all().match_label("app", "db").matches(&web));
        assert!(EndpointSelector::all().matches(&web));
    }

    #[test]
    fn match_expressions() {
        let web = pod("default", &[("app", "web"), ("tier", "front")]);
        let sel = |op, values: &[&str]| {
            let mut s = EndpointSelector::all();
            s.require(SelectorKey::parse("tier"), op, values);
            s
        };
        assert!(sel(Operator::In, &["front", "back"]).matches(&web));
        assert!(!sel(Operator::In, &["back"]).matches(&web));
        assert!(sel(Operator::NotIn, &["back"]).matches(&web));
        assert!(!sel(Operator::NotIn, &["front"]).matches(&web));
        assert!(sel(Operator::Exists, &[]).matches(&web));
        assert!(!sel(Operator::DoesNotExist, &[]).matches(&web));
        let bare = pod("default", &[("app", "web")]);
        assert!(sel(Operator::NotIn, &["front"]).matches(&bare), "absent key");
        assert!(sel(Operator::DoesNotExist, &[]).matches(&bare));
        assert!(!sel(Operator::In, &["front"]).matches(&bare));
    }

    #[test]
    fn namespace_label_selects_the_namespace() {
        let sel =
            EndpointSelector::all().match_label("app", "web").match_label("k8s:io.kubernetes.pod.namespace", "prod");
        assert!(sel.matches(&pod("prod", &[("app", "web")])));
        assert!(!sel.matches(&pod("default", &[("app", "web")])));
        assert!(sel.names_key("io.kubernetes.pod.namespace", &["k8s", "any"]));
        assert!(!sel.names_key("app", &["k8s"]));
    }

    #[test]
    fn reserved_labels_need_the_reserved_source() {
        let host = LabelSet::reserved("host");
        assert!(EndpointSelector::all().match_label("reserved:host", "").matches(&host));
        assert!(!EndpointSelector::all().match_label("k8s:host", "").matches(&host));
        let one: LabelSet = [Label::k8s("host", "")].into_iter().collect();
        assert!(!EndpointSelector::all().match_label("reserved:host", "").matches(&one));
    }

    #[test]
    fn display_is_readable() {
        let mut s = EndpointSelector::all().match_label("app", "web");
        s.require(SelectorKey::parse("k8s:tier"), Operator::NotIn, &["a", "b"]);
        assert_eq!(s.to_string(), "any:app=web, k8s:tier notin (a,b)");
        assert_eq!(EndpointSelector::all().to_string(), "{}");
    }
}
