//! What every policy kind parses the same way: label selectors (with Kubernetes label
//! syntax checks), CIDRs and CIDR blocks, serde errors.

use super::Invalid;
use super::raw;
use crate::cidr::{CidrBlock, Prefix, Written};
use crate::labels::{keys, source, split_source};
use crate::model::Port;
use crate::selector::{EndpointSelector, Operator, SelectorKey};

/// How the keys of a label selector are read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum KeyStyle {
    /// Cilium: an optional `source:` prefix, no prefix = any source.
    Cilium,
    /// A Kubernetes pod selector: plain keys of pod labels (source `k8s`).
    PodLabels,
    /// A Kubernetes namespace selector: plain keys of namespace labels, which a pod's
    /// identity carries as `k8s:io.cilium.k8s.namespace.labels.<key>`.
    NamespaceLabels,
}

impl KeyStyle {
    fn key(self, path: &str, text: &str) -> Result<SelectorKey, Invalid> {
        let key = match self {
            KeyStyle::Cilium => SelectorKey::parse(text),
            KeyStyle::PodLabels => SelectorKey::new(source::K8S, text),
            KeyStyle::NamespaceLabels => {
                SelectorKey::new(source::K8S, &format!("{}{text}", keys::NAMESPACE_LABELS_PREFIX))
            }
        };
        let checked = match self {
            KeyStyle::Cilium => checked_part_of_cilium_key(text),
            KeyStyle::PodLabels | KeyStyle::NamespaceLabels => Some(text),
        };
        if let Some(name) = checked
            && let Err(why) = qualified_name(name)
        {
            return Err(Invalid::new(
                path,
                format!("label key {text:?} is not valid: {why}"),
                "label keys are Kubernetes qualified names: an optional DNS subdomain prefix and '/', \
                 then up to 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit",
            ));
        }
        Ok(key)
    }
}

/// The part of a Cilium selector key that must be a Kubernetes qualified name: the key
/// without its source, and for namespace labels the namespace label's own key. `None`:
/// not checked (`cidr:` keys are prefixes).
fn checked_part_of_cilium_key(text: &str) -> Option<&str> {
    let (src, key) = split_source(text);
    if src == Some(source::CIDR) {
        return None;
    }
    Some(key.strip_prefix(keys::NAMESPACE_LABELS_PREFIX).unwrap_or(key))
}

/// Checks a Kubernetes qualified name (`[prefix/]name`).
fn qualified_name(text: &str) -> Result<(), String> {
    let (prefix, name) = match text.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, text),
    };
    if let Some(prefix) = prefix {
        if prefix.is_empty() || prefix.len() > 253 {
            return Err("the prefix before '/' must have 1 to 253 characters".to_owned());
        }
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        if !prefix.split('.').all(label_ok) {
            return Err(format!(
                "the prefix {prefix:?} is not a DNS subdomain (lower case letters, digits, '-' and '.')"
            ));
        }
    }
    if name.is_empty() || name.len() > 63 {
        return Err("the name must have 1 to 63 characters".to_owned());
    }
    label_text(name).map_err(|why| format!("the name {why}"))
}

/// Checks the characters of a label name or value.
fn label_text(text: &str) -> Result<(), String> {
    let ok = text.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && text.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && text.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err("may only have letters, digits, '-', '_' and '.', and must start and end with a letter or digit".to_owned())
    }
}

/// Checks a label value (empty, or up to 63 characters of label text).
fn label_value(path: &str, value: &str) -> Result<(), Invalid> {
    if value.is_empty() {
        return Ok(());
    }
    let why = if value.len() > 63 { Err("has more than 63 characters".to_owned()) } else { label_text(value) };
    why.map_err(|why| {
        Invalid::new(
            path,
            format!("label value {value:?} is not valid: it {why}"),
            "fix the value; it can also be empty",
        )
    })
}

/// `metadata.name`, which a policy must have.
pub(super) fn policy_name(name: Option<String>) -> Result<String, Invalid> {
    name.filter(|n| !n.is_empty())
        .ok_or_else(|| Invalid::new("metadata.name", "the policy has no name", "set metadata.name"))
}

/// Checks `metadata.name` (a DNS subdomain, as Kubernetes requires of every object name)
/// and `metadata.namespace` (a DNS label), when present.
pub(super) fn object_names(name: &str, namespace: Option<&str>) -> Result<(), Invalid> {
    if let Err(why) = dns_name(name, 253, true) {
        return Err(Invalid::new(
            "metadata.name",
            format!("name {name:?} is not valid: {why}"),
            "Kubernetes object names are DNS subdomains: at most 253 lower case letters, digits, '-' and '.', \
             starting and ending with a letter or digit",
        ));
    }
    if let Some(ns) = namespace
        && let Err(why) = dns_name(ns, 63, false)
    {
        return Err(Invalid::new(
            "metadata.namespace",
            format!("namespace {ns:?} is not valid: {why}"),
            "namespace names are DNS labels: at most 63 lower case letters, digits and '-', \
             starting and ending with a letter or digit",
        ));
    }
    Ok(())
}

/// Checks a DNS subdomain (`dots`) or DNS label of at most `max` characters.
fn dns_name(text: &str, max: usize, dots: bool) -> Result<(), String> {
    if text.len() > max {
        return Err(format!("it has {} characters, more than {max}", text.len()));
    }
    let ok_char = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || (dots && b == b'.');
    let ends_ok = |b: Option<u8>| b.is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if !text.bytes().all(ok_char) {
        let allowed =
            if dots { "lower case letters, digits, '-' and '.'" } else { "lower case letters, digits and '-'" };
        return Err(format!("it may only have {allowed}"));
    }
    let parts_ok = text.split('.').all(|part| ends_ok(part.bytes().next()) && ends_ok(part.bytes().last()));
    if !parts_ok {
        return Err("it must start and end with a letter or digit (each part between dots, too)".to_owned());
    }
    Ok(())
}

/// A `matchLabels` + `matchExpressions` selector, checked.
pub(super) fn label_selector(
    raw: &raw::LabelSelector,
    path: &str,
    style: KeyStyle,
) -> Result<EndpointSelector, Invalid> {
    let mut sel = EndpointSelector::all();
    for (key, value) in raw.match_labels.iter().flatten() {
        let p = format!("{path}.matchLabels.{key}");
        if key.is_empty() {
            return Err(Invalid::new(
                format!("{path}.matchLabels"),
                "a label key is empty",
                "write matchLabels as `key: value`",
            ));
        }
        let k = style.key(&p, key)?;
        label_value(&p, value)?;
        sel.require(k, Operator::In, &[value]);
    }
    for (i, req) in raw.match_expressions.iter().flatten().enumerate() {
        let p = format!("{path}.matchExpressions[{i}]");
        let operator = match req.operator.as_str() {
            "In" => Operator::In,
            "NotIn" => Operator::NotIn,
            "Exists" => Operator::Exists,
            "DoesNotExist" => Operator::DoesNotExist,
            other => {
                return Err(Invalid::new(
                    format!("{p}.operator"),
                    format!("operator {other:?} is not one of In, NotIn, Exists, DoesNotExist"),
                    "operators are case-sensitive",
                ));
            }
        };
        let values: Vec<&str> = req.values.iter().flatten().map(String::as_str).collect();
        let needs_values = matches!(operator, Operator::In | Operator::NotIn);
        if needs_values && values.is_empty() {
            return Err(Invalid::new(
                format!("{p}.values"),
                format!("operator {} needs at least one value", req.operator),
                "list the values, or use Exists / DoesNotExist",
            ));
        }
        if !needs_values && !values.is_empty() {
            return Err(Invalid::new(
                format!("{p}.values"),
                format!("operator {} takes no values", req.operator),
                "remove values, or use In / NotIn",
            ));
        }
        if req.key.is_empty() {
            return Err(Invalid::new(format!("{p}.key"), "the key is empty", "name a label key"));
        }
        let k = style.key(&format!("{p}.key"), &req.key)?;
        for (j, v) in values.iter().enumerate() {
            label_value(&format!("{p}.values[{j}]"), v)?;
        }
        sel.require(k, operator, &values);
    }
    Ok(sel)
}

/// One CIDR. A bare address is a host prefix; bits set past the prefix length are
/// cleared with a warning (Kubernetes and Cilium accept such CIDRs too).
pub(super) fn prefix(path: &str, text: &str, warnings: &mut Vec<String>) -> Result<Prefix, Invalid> {
    let (p, written) = Prefix::parse(text.trim()).map_err(|why| {
        Invalid::new(path, why, "write an IPv4 or IPv6 prefix like 10.0.0.0/8 or fd00::/64, or a single address")
    })?;
    if written == Written::HostBitsCleared {
        warnings.push(format!("{path}: {text} has bits set past the prefix length; it is read as {p}"));
    }
    Ok(p)
}

/// A CIDR with `except` prefixes, each strictly inside it.
pub(super) fn cidr_block(
    path: &str,
    cidr: &str,
    except: &[String],
    warnings: &mut Vec<String>,
) -> Result<CidrBlock, Invalid> {
    let cidr_path = format!("{path}.cidr");
    let outer = prefix(&cidr_path, cidr, warnings)?;
    let mut holes = Vec::new();
    for (i, e) in except.iter().enumerate() {
        let p = format!("{path}.except[{i}]");
        let hole = prefix(&p, e, warnings)?;
        if !outer.contains(&hole) || hole == outer {
            return Err(Invalid::new(
                p,
                format!("except {hole} is not strictly inside cidr {outer}"),
                "every except prefix must be a smaller part of the cidr it carves a hole in",
            ));
        }
        holes.push(hole);
    }
    holes.sort();
    holes.dedup();
    Ok(CidrBlock { cidr: outer, except: holes })
}

/// The error for a protocol at `{path}.protocol` that is not one of `allowed`.
pub(super) fn unknown_protocol(path: &str, protocol: &str, allowed: &str, hint: &str) -> Invalid {
    Invalid::new(format!("{path}.protocol"), format!("protocol {protocol:?} is not one of {allowed}"), hint)
}

/// A serde error as an [`Invalid`] with its path; `reference` names the API reference
/// to check types against, `schema_note` what an unknown field would do elsewhere.
pub(super) fn serde_invalid(
    e: &serde_path_to_error::Error<serde_json::Error>,
    reference: &str,
    schema_note: &str,
) -> Invalid {
    let reason = plain_type_names(&e.inner().to_string());
    let hint = if reason.starts_with("unknown field") {
        format!("{schema_note}; fix the spelling or remove the field")
    } else if reason.starts_with("missing field") {
        "add the field".to_owned()
    } else {
        format!("check the field's type against the {reference} reference")
    };
    Invalid::new(e.path().to_string(), reason, hint)
}

/// serde's Rust type names (`i64`, `struct CiliumRule`) in the words of a manifest.
fn plain_type_names(reason: &str) -> String {
    let mut out = reason.replace("expected i64", "expected an integer").replace("expected u64", "expected an integer");
    if let Some(at) = out.find("expected struct ") {
        let rest = &out[at + "expected struct ".len()..];
        let end = rest.find(|c: char| !c.is_ascii_alphanumeric()).unwrap_or(rest.len());
        out = format!("{}expected a mapping{}", &out[..at], &rest[end..]);
    }
    out
}

/// Applies an `endPort` (at `{path}.endPort`) to the port it follows: a numeric port
/// becomes the range `port..=endPort`; a named or absent port cannot start a range.
pub(super) fn end_port(path: &str, end_port: Option<i64>, port: Port) -> Result<Port, Invalid> {
    match (end_port, port) {
        (None, port) => Ok(port),
        (Some(end), Port::Range { first, .. }) => {
            if end < i64::from(first) || end > 65535 {
                return Err(Invalid::new(
                    format!("{path}.endPort"),
                    format!("endPort {end} is not between port {first} and 65535"),
                    "endPort is the last port of the range and must not be below port",
                ));
            }
            Ok(Port::Range { first, last: u16::try_from(end).expect("checked above") })
        }
        (Some(_), _) => Err(Invalid::new(
            format!("{path}.endPort"),
            "endPort needs a numeric port to start the range",
            "set port to the first port of the range",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qualified_names() {
        for ok in ["app", "app.kubernetes.io/name", "a_b-c.d", "io.kubernetes.pod.namespace", "x/y", "A1"] {
            assert_eq!(qualified_name(ok), Ok(()), "{ok}");
        }
        for bad in ["", "-app", "app-", "a b", "/name", "Example.com/x", "a/b/c", &"x".repeat(64), "a=b"] {
            assert!(qualified_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn type_names_are_said_plainly() {
        assert_eq!(
            plain_type_names("invalid type: string \"x\", expected i64"),
            "invalid type: string \"x\", expected an integer"
        );
        assert_eq!(
            plain_type_names("invalid type: string \"x\", expected struct CiliumRule"),
            "invalid type: string \"x\", expected a mapping"
        );
    }

    #[test]
    fn object_names_are_dns_names() {
        for ok in ["web", "allow-web.v2", "a", &"n".repeat(253)] {
            assert_eq!(object_names(ok, Some("default")), Ok(()), "{ok}");
        }
        for bad in ["Web", "allow_web", "-web", "web-", "a..b", ".a", &"n".repeat(254), "caf\u{e9}"] {
            let e = object_names(bad, None).expect_err(bad);
            assert_eq!(e.path, "metadata.name");
        }
        for bad in ["Team_A", "a.b", &"n".repeat(64)] {
            let e = object_names("web", Some(bad)).expect_err(bad);
            assert_eq!(e.path, "metadata.namespace");
        }
    }

    #[test]
    fn cilium_keys_are_checked_without_their_source() {
        let check = |k: &str| KeyStyle::Cilium.key("p", k).map(|k| k.to_string());
        assert_eq!(check("k8s:app").unwrap(), "k8s:app");
        assert_eq!(check("reserved:kube-apiserver").unwrap(), "reserved:kube-apiserver");
        assert_eq!(
            check("k8s:io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name").unwrap(),
            "k8s:io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name"
        );
        let long_ns_label = format!("io.cilium.k8s.namespace.labels.{}", "t".repeat(40));
        assert!(check(&long_ns_label).is_ok(), "the namespace label's own key is what counts");
        assert!(check("cidr:fd00::/8").is_ok(), "cidr keys are prefixes");
        assert!(check("k8s:bad key").is_err());
    }
}
