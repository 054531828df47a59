//! Bounds on what reading one text may cost, and the options every YAML reader of
//! palisade uses ([`yaml_options`]).
//!
//! The YAML parser (serde-saphyr) enforces its budget while it parses, per document:
//! nesting ([`MAX_DEPTH`], also in its scanner for `[...]`/`{...}`, whose work per token
//! grows with the flow depth), nodes ([`MAX_VALUES_PER_DOCUMENT`]) and the
//! events replayed for aliases (the same number: an anchor of N values used N times
//! stays small as text and expands to N² values, as in a 'billion laughs' text). What it
//! does not bound for a text already in memory is the text's size: [`MAX_TEXT_BYTES`] is
//! checked before it starts.

/// The largest text read, in bytes. Kubernetes stores at most 1.5 MiB per object; a
/// file of many policies may be bigger, but not this big.
pub const MAX_TEXT_BYTES: usize = 8 << 20;

/// The deepest nesting of sequences and mappings read, block or flow (`[...]`, `{...}`).
/// A policy needs about ten levels. Building an untyped value recurses once per level,
/// at about 22 KB of stack per level in a debug build: 32 levels stay well inside the
/// 2 MiB of a thread's stack.
pub const MAX_DEPTH: usize = 32;

/// The most values (scalars, sequences and mappings) one document may have. A policy
/// with thousands of CIDRs has tens of thousands.
pub const MAX_VALUES_PER_DOCUMENT: usize = 250_000;

/// The most parser events the aliases (`*name`) of one document may replay. A manifest
/// that reuses an anchor replays a few hundred; a 'billion laughs' text is stopped after
/// this many, in well under a second.
pub const MAX_ALIAS_REPLAYS: usize = 25_000;

/// The parser options for manifests: the limits above, per document; YAML 1.2 booleans
/// only (`yes` is a string, as in JSON and Kubernetes); tags other than YAML's own refused
/// (a tag changes nothing a policy says, so one there is a mistake); messages without
/// source snippets (callers say where).
pub fn yaml_options() -> serde_saphyr::Options {
    serde_saphyr::options! {
        budget: serde_saphyr::budget! {
            max_depth: MAX_DEPTH,
            flow_nesting_limit: MAX_DEPTH,
            max_nodes: MAX_VALUES_PER_DOCUMENT,
            // Checked by the caller, for the whole text.
            max_reader_input_bytes: None,
            // The replay limit below bounds what aliases cost; a ratio of aliases to
            // anchors would also refuse a policy that reuses one port list many times.
            enforce_alias_anchor_ratio: false,
        },
        alias_limits: serde_saphyr::alias_limits! {
            max_total_replayed_events: MAX_ALIAS_REPLAYS,
        },
        strict_booleans: true,
        reject_unsupported_tags: true,
        with_snippet: false,
    }
}

/// Why the parser stopped reading a text, in palisade's terms.
pub(super) enum Stop<'a> {
    /// Too many values in a document.
    TooManyValues,
    /// Aliases that replay too much.
    TooManyReplays,
    /// Nested deeper than [`MAX_DEPTH`].
    TooDeep,
    /// A mapping has this key twice.
    DuplicateKey(Option<&'a str>),
    /// Not YAML (or another error of the parser, with its message).
    Other(&'a serde_saphyr::Error),
}

/// What stopped the parser: `e` without the wrappers that say where an alias was
/// defined and used.
pub(super) fn stop(e: &serde_saphyr::Error) -> Stop<'_> {
    use serde_saphyr::Error;
    use serde_saphyr::budget::BudgetBreach;
    let mut e = e;
    while let Error::AliasError { error, .. } | Error::WithSnippet { error, .. } = e {
        e = error;
    }
    match e {
        Error::Budget { breach: BudgetBreach::Nodes { .. } | BudgetBreach::Events { .. }, .. }
        | Error::Budget { breach: BudgetBreach::ScalarBytes { .. }, .. } => Stop::TooManyValues,
        Error::AliasReplayLimitExceeded { .. } | Error::AliasReplayCounterOverflow { .. } => Stop::TooManyReplays,
        Error::Budget { breach: BudgetBreach::Depth { .. }, .. } | Error::AliasReplayStackDepthExceeded { .. } => {
            Stop::TooDeep
        }
        // The scanner's flow nesting limit.
        other if other.to_string().starts_with("recursion limit exceeded") => Stop::TooDeep,
        Error::DuplicateMappingKey { key, .. } => Stop::DuplicateKey(key.as_deref()),
        other => Stop::Other(other),
    }
}

#[cfg(test)]
mod tests {
    use std::fmt::Write as _;

    use crate::parse::{ParseError, parse_manifests};

    use super::*;

    #[test]
    fn values_replayed_by_aliases_are_limited() {
        // 600 values, replayed 500 times through one alias each: 300,000 values for a text
        // of a few KB.
        let text = format!("a: &a [{}]\nb: [{}]\n", vec!["1"; 600].join(","), vec!["*a"; 500].join(","));
        let err = parse_manifests(&text, "t").unwrap_err();
        assert!(err.to_string().contains(&format!("aliases replay more than {MAX_ALIAS_REPLAYS} values")), "{err}");
        // The same anchor replayed a few times is fine.
        let text = format!("a: &a [{}]\nb: [{}]\n", vec!["1"; 600].join(","), ["*a"; 5].join(","));
        assert!(parse_manifests(&text, "t").is_ok());
        // The limit is per document: the second one is named.
        let text = format!("a: 1\n---\nb: [{}]\n", vec!["1"; MAX_VALUES_PER_DOCUMENT].join(","));
        assert!(matches!(parse_manifests(&text, "t"), Err(ParseError::TooManyValues { document: 2, .. })));
    }

    #[test]
    fn nesting_is_limited_in_block_and_flow_style() {
        let flow = |n: usize| format!("kind: {}{}\n", "[".repeat(n), "]".repeat(n));
        let block = |n: usize| {
            (0..n).fold(String::new(), |mut s, i| {
                let _ = writeln!(s, "{}k{i}:", "  ".repeat(i));
                s
            }) + &"  ".repeat(n)
                + "x\n"
        };
        for text in [flow(MAX_DEPTH - 1), block(MAX_DEPTH - 1)] {
            assert!(parse_manifests(&text, "t").is_ok(), "{text}");
        }
        for text in [flow(MAX_DEPTH + 1), block(MAX_DEPTH + 1)] {
            let err = parse_manifests(&text, "t").unwrap_err();
            assert!(err.to_string().contains(&format!("nested more than {MAX_DEPTH} levels deep")), "{err}");
        }
    }
}
