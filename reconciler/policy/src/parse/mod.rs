//! Manifests (YAML, several documents per text) -> [`Policy`]s or precise errors.
//!
//! Each document is judged on its own: a bad one yields a [`PolicyError`] naming the kind,
//! the policy, the field path, the reason and what to do, and does not hide the good ones.
//! Only text that is not readable YAML at all fails as a whole ([`ParseError`]).

mod cilium;
mod common;
mod icmp;
mod network_policy;
mod raw;

use std::fmt;

use serde::Deserialize;
use serde::Serialize;
use serde_yaml::Value;

use crate::model::{Policy, PolicyKind};

/// The text is not readable YAML.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("{origin}: not readable YAML at line {line}, column {column}: {message}")]
    Yaml {
        /// Where the text came from.
        origin: String,
        line: usize,
        column: usize,
        message: String,
    },
}

/// Why one document was rejected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
pub struct PolicyError {
    /// Where the text came from (the `source` given to [`parse_manifests`]).
    pub origin: String,
    /// 1-based position of the document in the text.
    pub document: usize,
    /// The manifest's kind, when it has one.
    pub kind: Option<String>,
    pub namespace: Option<String>,
    pub name: Option<String>,
    /// Field path, like `spec.ingress[0].toPorts[0].ports[0].port` (empty: the document).
    pub path: String,
    /// What is wrong.
    pub reason: String,
    /// What to do about it.
    pub hint: String,
}

impl fmt::Display for PolicyError {
    /// `CiliumNetworkPolicy default/web (policies.yaml, document 2): spec.x: reason (hint)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kind.as_deref().unwrap_or("manifest"))?;
        match (&self.namespace, &self.name) {
            (Some(ns), Some(name)) => write!(f, " {ns}/{name}")?,
            (None, Some(name)) => write!(f, " {name}")?,
            _ => {}
        }
        write!(f, " ({}, document {}): ", self.origin, self.document)?;
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        write!(f, "{}", self.reason)?;
        if !self.hint.is_empty() {
            write!(f, " (hint: {})", self.hint)?;
        }
        Ok(())
    }
}

impl PolicyError {
    /// (kind, namespace, name) of the rejected manifest, as far as it could be read
    /// (empty strings when unknown): the key under which an earlier accepted version of
    /// the same policy would be stored.
    pub fn identity(&self) -> (String, Option<String>, String) {
        (self.kind.clone().unwrap_or_default(), self.namespace.clone(), self.name.clone().unwrap_or_default())
    }
}

/// What became of one document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum ManifestOutcome {
    Accepted(Policy),
    Rejected(PolicyError),
}

/// A rejection before the kind/name context is attached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Invalid {
    pub path: String,
    pub reason: String,
    pub hint: String,
}

impl Invalid {
    pub(crate) fn new(path: impl Into<String>, reason: impl Into<String>, hint: impl Into<String>) -> Invalid {
        Invalid { path: path.into(), reason: reason.into(), hint: hint.into() }
    }
}

/// Parses every YAML document of `text`. Empty documents are skipped.
pub fn parse_manifests(text: &str, source: &str) -> Result<Vec<ManifestOutcome>, ParseError> {
    let mut outcomes = Vec::new();
    let mut documents = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(text) {
        let value = Value::deserialize(doc).map_err(|e| yaml_error(&e, source))?;
        documents.push(value);
    }
    for (i, value) in documents.into_iter().enumerate() {
        if value.is_null() {
            continue;
        }
        outcomes.push(parse_document(value, source, i + 1));
    }
    Ok(outcomes)
}

fn yaml_error(e: &serde_yaml::Error, source: &str) -> ParseError {
    let (line, column) = e.location().map_or((0, 0), |l| (l.line(), l.column()));
    ParseError::Yaml { origin: source.to_owned(), line, column, message: e.to_string() }
}

fn text_field<'a>(value: &'a Value, path: &[&str]) -> Option<&'a str> {
    let mut v = value;
    for key in path {
        v = v.get(*key)?;
    }
    v.as_str()
}

/// Parses one document that is known not to be empty.
fn parse_document(value: Value, source: &str, document: usize) -> ManifestOutcome {
    let kind = text_field(&value, &["kind"]).map(str::to_owned);
    let api_version = text_field(&value, &["apiVersion"]).map(str::to_owned);
    let name = text_field(&value, &["metadata", "name"]).map(str::to_owned);
    let mut namespace = text_field(&value, &["metadata", "namespace"]).map(str::to_owned);
    let result = match (kind.as_deref(), api_version.as_deref()) {
        (Some(k @ ("CiliumNetworkPolicy" | "CiliumClusterwideNetworkPolicy")), v) => {
            let kind = if k == "CiliumNetworkPolicy" {
                PolicyKind::CiliumNetworkPolicy
            } else {
                PolicyKind::CiliumClusterwideNetworkPolicy
            };
            if kind.is_namespaced() && namespace.is_none() {
                namespace = Some("default".to_owned());
            }
            if !kind.is_namespaced() {
                namespace = None;
            }
            check_api_version(v, "cilium.io/v2", kind.as_str()).and_then(|()| cilium::translate(value, kind, source))
        }
        (Some("NetworkPolicy"), v) => {
            if namespace.is_none() {
                namespace = Some("default".to_owned());
            }
            check_api_version(v, "networking.k8s.io/v1", "NetworkPolicy")
                .and_then(|()| network_policy::translate(value, source))
        }
        (Some(other), _) => Err(Invalid::new(
            "kind",
            format!("{other} is not a policy kind palisade knows"),
            "use CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy or NetworkPolicy; \
             keep other resources out of policy files",
        )),
        (None, _) => Err(Invalid::new(
            "kind",
            "the document has no kind",
            "every manifest needs apiVersion and kind, e.g. apiVersion: cilium.io/v2, \
             kind: CiliumNetworkPolicy",
        )),
    };
    match result {
        Ok(policy) => ManifestOutcome::Accepted(policy),
        Err(invalid) => ManifestOutcome::Rejected(PolicyError {
            origin: source.to_owned(),
            document,
            kind,
            namespace,
            name,
            path: invalid.path,
            reason: invalid.reason,
            hint: invalid.hint,
        }),
    }
}

fn check_api_version(found: Option<&str>, want: &str, kind: &str) -> Result<(), Invalid> {
    match found {
        Some(v) if v == want => Ok(()),
        Some(v) => Err(Invalid::new(
            "apiVersion",
            format!("{kind} must have apiVersion {want}, not {v}"),
            format!("set apiVersion: {want}"),
        )),
        None => Err(Invalid::new("apiVersion", "apiVersion is missing", format!("set apiVersion: {want}"))),
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_network_policy;
#[cfg(test)]
mod tests_peers;
