//! Manifests (YAML, several documents per text) -> [`Policy`]s or precise errors.
//!
//! Each document is judged on its own: a bad one yields a [`PolicyError`] naming the kind,
//! the policy, the field path, the reason and what to do, and does not hide the good ones.
//! Only text that is not readable YAML at all fails as a whole ([`ParseError`]).

mod cilium;
mod common;
mod icmp;
pub mod limits;
mod network_policy;
mod raw;
mod tiers;

pub use tiers::BANP_PRIORITY;

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

use crate::yaml::{self, Value};

use crate::model::{Policy, PolicyKind};

/// The text as a whole cannot be read; no document of it is judged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    /// The text is not readable YAML.
    Yaml {
        /// Where the text came from.
        origin: String,
        /// 1-based; 0 when the YAML library gave no position.
        line: usize,
        column: usize,
        message: String,
    },
    /// The bytes are not UTF-8 ([`parse_manifest_bytes`]).
    NotUtf8 {
        origin: String,
        /// Offset of the first byte that is not part of a UTF-8 character.
        offset: usize,
        /// The text starts with a UTF-16 byte order mark.
        utf16: bool,
    },
    /// The text is longer than [`limits::MAX_TEXT_BYTES`].
    TooLarge { origin: String, bytes: usize, limit: usize },
    /// A document expands to more values than [`limits::MAX_VALUES_PER_DOCUMENT`]
    /// (aliases count every time they are used).
    TooManyValues {
        origin: String,
        /// 1-based position of the document in the text.
        document: usize,
        limit: usize,
    },
}

impl fmt::Display for ParseError {
    /// `origin: what is wrong (hint: what to do)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParseError::Yaml { origin, line, column, message } => {
                write!(f, "{origin}: not readable YAML")?;
                match (line, column) {
                    (0, _) => {}
                    (line, 0) => write!(f, " at line {line}")?,
                    (line, column) => write!(f, " at line {line}, column {column}")?,
                }
                write!(f, ": {message}")?;
                if message.starts_with("values are nested more than") {
                    f.write_str(
                        " (hint: no policy needs more than about ten levels; look for brackets that are not closed)",
                    )?;
                } else if message.starts_with("repetition limit exceeded") {
                    f.write_str(
                        " (hint: aliases (*name) are replayed too often, as in a 'billion laughs' text; \
                         write the values out)",
                    )?;
                } else if message.contains("in this mapping twice") || message.contains("in its mapping twice") {
                    f.write_str(" (hint: keep one of them: which one is meant cannot be told)")?;
                }
                Ok(())
            }
            ParseError::NotUtf8 { origin, offset, utf16 } => {
                write!(f, "{origin}: not UTF-8 text (invalid byte at offset {offset})")?;
                if *utf16 {
                    f.write_str(" (hint: the text is UTF-16 (it starts with a byte order mark); save it as UTF-8)")
                } else {
                    f.write_str(" (hint: save the file as UTF-8; policy manifests are text)")
                }
            }
            ParseError::TooLarge { origin, bytes, limit } => write!(
                f,
                "{origin}: the text has {bytes} bytes, more than the {limit} palisade reads \
                 (hint: Kubernetes keeps at most 1.5 MiB per object; split the file, or keep what \
                 is not policy out of it)"
            ),
            ParseError::TooManyValues { origin, document, limit } => write!(
                f,
                "{origin}, document {document}: the document has more than {limit} values once its \
                 aliases are expanded (hint: an anchor repeated many times, as in a 'billion laughs' \
                 text, multiplies its values; write the values out, or split the policy)"
            ),
        }
    }
}

impl std::error::Error for ParseError {}

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

/// Parses every YAML (or JSON) document of `text`. Empty documents are skipped (and not
/// counted in the documents' numbers). A document that
/// defines the same policy (kind, namespace, name) as another document of the text is
/// rejected, as is the other one: which of them is meant cannot be told.
///
/// Reading is bounded: texts over [`limits::MAX_TEXT_BYTES`], documents nested more than
/// [`limits::MAX_DEPTH`] levels deep, with more than [`limits::MAX_VALUES_PER_DOCUMENT`]
/// values or aliases that replay more than [`limits::MAX_ALIAS_REPLAYS`] are a
/// [`ParseError`].
pub fn parse_manifests(text: &str, source: &str) -> Result<Vec<ManifestOutcome>, ParseError> {
    if text.len() > limits::MAX_TEXT_BYTES {
        return Err(ParseError::TooLarge {
            origin: source.to_owned(),
            bytes: text.len(),
            limit: limits::MAX_TEXT_BYTES,
        });
    }
    let documents = yaml::documents(text).map_err(|e| read_error(&e, source))?;
    let outcomes =
        documents.into_iter().enumerate().map(|(i, value)| (i + 1, parse_document(value, source, i + 1))).collect();
    Ok(reject_duplicates(outcomes))
}

/// [`parse_manifests`] on bytes, which must be UTF-8: what a file or a request body holds.
pub fn parse_manifest_bytes(bytes: &[u8], source: &str) -> Result<Vec<ManifestOutcome>, ParseError> {
    if bytes.len() > limits::MAX_TEXT_BYTES {
        return Err(ParseError::TooLarge {
            origin: source.to_owned(),
            bytes: bytes.len(),
            limit: limits::MAX_TEXT_BYTES,
        });
    }
    let text = std::str::from_utf8(bytes).map_err(|e| ParseError::NotUtf8 {
        origin: source.to_owned(),
        offset: e.valid_up_to(),
        utf16: bytes.starts_with(&[0xff, 0xfe]) || bytes.starts_with(&[0xfe, 0xff]),
    })?;
    parse_manifests(text, source)
}

/// (kind, namespace, name) of the policy a document defines, when its kind is a policy
/// kind and it has a name.
fn defined_policy(outcome: &ManifestOutcome) -> Option<(String, Option<String>, String)> {
    match outcome {
        ManifestOutcome::Accepted(p) => Some((p.kind.to_string(), p.namespace.clone(), p.name.clone())),
        ManifestOutcome::Rejected(e) => {
            let kind = e.kind.as_deref()?;
            let known = [
                "CiliumNetworkPolicy",
                "CiliumClusterwideNetworkPolicy",
                "NetworkPolicy",
                "ClusterNetworkPolicy",
                "AdminNetworkPolicy",
                "BaselineAdminNetworkPolicy",
            ]
            .contains(&kind);
            let name = e.name.as_deref().filter(|n| !n.is_empty())?;
            known.then(|| (kind.to_owned(), e.namespace.clone(), name.to_owned()))
        }
    }
}

/// Rejects every accepted document that defines the same policy as another document of
/// the text (documents rejected for a reason of their own keep that reason).
fn reject_duplicates(outcomes: Vec<(usize, ManifestOutcome)>) -> Vec<ManifestOutcome> {
    let mut documents_of: BTreeMap<(String, Option<String>, String), Vec<usize>> = BTreeMap::new();
    for (document, outcome) in &outcomes {
        if let Some(id) = defined_policy(outcome) {
            documents_of.entry(id).or_default().push(*document);
        }
    }
    outcomes
        .into_iter()
        .map(|(document, outcome)| {
            let ManifestOutcome::Accepted(p) = &outcome else { return outcome };
            let id = defined_policy(&outcome).expect("accepted documents define a policy");
            let all = &documents_of[&id];
            if all.len() < 2 {
                return outcome;
            }
            let numbers: Vec<String> = all.iter().map(ToString::to_string).collect();
            let (last, rest) = numbers.split_last().expect("two or more");
            ManifestOutcome::Rejected(PolicyError {
                origin: p.source.clone(),
                document,
                kind: Some(id.0.clone()),
                namespace: id.1.clone(),
                name: Some(id.2.clone()),
                path: "metadata.name".to_owned(),
                reason: format!(
                    "documents {} and {last} of this text {} define {}",
                    rest.join(", "),
                    if rest.len() == 1 { "both" } else { "all" },
                    p.display_name()
                ),
                hint: "keep one document per policy: palisade cannot tell which one is meant (kubectl would \
                       let the last one overwrite the others), so none of them is taken"
                    .to_owned(),
            })
        })
        .collect()
}

/// A document that cannot be read as the error for the whole text.
fn read_error(e: &yaml::DocumentError, source: &str) -> ParseError {
    let origin = source.to_owned();
    let (line, column) = e.error.location().map_or((0, 0), |l| (l.line() as usize, l.column() as usize));
    let message = match limits::stop(&e.error) {
        limits::Stop::TooManyValues => {
            return ParseError::TooManyValues { origin, document: e.document, limit: limits::MAX_VALUES_PER_DOCUMENT };
        }
        limits::Stop::TooManyReplays => {
            format!("repetition limit exceeded: aliases replay more than {} values", limits::MAX_ALIAS_REPLAYS)
        }
        limits::Stop::TooDeep => format!("values are nested more than {} levels deep", limits::MAX_DEPTH),
        limits::Stop::DuplicateKey(Some(key)) => format!("the key {key:?} is in this mapping twice"),
        limits::Stop::DuplicateKey(None) => "this key is in its mapping twice".to_owned(),
        limits::Stop::Other(error) => {
            let message = error.to_string();
            // The position is said once, before the message.
            match message.strip_suffix(&format!(" at line {line}, column {column}")) {
                Some(short) => short.to_owned(),
                None => message,
            }
        }
    };
    ParseError::Yaml { origin, line, column, message }
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
    let name = text_field(&value, &["metadata", "name"]).filter(|n| !n.is_empty()).map(str::to_owned);
    let mut namespace = text_field(&value, &["metadata", "namespace"]).filter(|n| !n.is_empty()).map(str::to_owned);
    let not_a_manifest = match &value {
        Value::Object(_) => None,
        Value::Array(_) => Some("a list"),
        Value::String(_) => Some("a string"),
        Value::Number(_) => Some("a number"),
        Value::Bool(_) => Some("a boolean"),
        Value::Null => Some("empty"),
    };
    let audit = audit_annotation(&value);
    let result = match (kind.as_deref(), api_version.as_deref()) {
        _ if not_a_manifest.is_some() => Err(Invalid::new(
            "",
            format!("the document is {}, not a manifest", not_a_manifest.unwrap_or_default()),
            "a manifest is a mapping with apiVersion, kind, metadata and spec; separate manifests with a \
             line `---`",
        )),
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
        (Some("ClusterNetworkPolicy"), v) => {
            namespace = None;
            check_api_version(v, "policy.networking.k8s.io/v1alpha2", "ClusterNetworkPolicy")
                .and_then(|()| tiers::translate_cluster_network_policy(value, source))
        }
        (Some(k @ ("AdminNetworkPolicy" | "BaselineAdminNetworkPolicy")), v) => {
            namespace = None;
            check_api_version(v, "policy.networking.k8s.io/v1alpha1", k)
                .and_then(|()| tiers::translate_v1alpha1(value, source, k == "BaselineAdminNetworkPolicy"))
        }
        (Some(other), _) => Err(Invalid::new(
            "kind",
            format!("{other} is not a policy kind palisade knows"),
            "use CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy, NetworkPolicy, ClusterNetworkPolicy \
             (or the v1alpha1 AdminNetworkPolicy and BaselineAdminNetworkPolicy); \
             keep other resources out of policy files",
        )),
        (None, _) if value.get("kind").is_some_and(|k| !k.is_null()) => Err(Invalid::new(
            "kind",
            "kind is not a string",
            "write the kind as a plain string, like `kind: CiliumNetworkPolicy`",
        )),
        (None, _) => Err(Invalid::new(
            "kind",
            "the document has no kind",
            "every manifest needs apiVersion and kind, e.g. apiVersion: cilium.io/v2, \
             kind: CiliumNetworkPolicy",
        )),
    };
    match result.and_then(|mut policy| {
        policy.audit = audit?;
        Ok(policy)
    }) {
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

/// The policy's audit annotation ([`crate::model::AUDIT_ANNOTATION`]): `"true"` puts it
/// into audit mode, `"false"` or none enforces it; anything else is rejected (a typo must
/// not silently enforce a policy meant to be tried first).
fn audit_annotation(value: &Value) -> Result<bool, Invalid> {
    let key = crate::model::AUDIT_ANNOTATION;
    let Some(v) = value.get("metadata").and_then(|m| m.get("annotations")).and_then(|a| a.get(key)) else {
        return Ok(false);
    };
    match v.as_str() {
        Some("true") => Ok(true),
        Some("false") => Ok(false),
        _ => Err(Invalid::new(
            format!("metadata.annotations[\"{key}\"]"),
            format!("{key} must be \"true\" or \"false\", not {v}"),
            format!(
                "write `{key}: \"true\"` (quoted: annotation values are strings) to audit the policy, or remove the annotation to enforce it"
            ),
        )),
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
