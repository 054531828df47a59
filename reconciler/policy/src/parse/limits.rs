//! Bounds on what reading one text may cost, checked before any value is built.
//!
//! serde_yaml stops nesting past 128 levels ("recursion limit exceeded") and alias replays
//! past 100 per event of the document ("repetition limit exceeded"). Neither bounds the
//! size of what aliases expand to: an anchor of N values used N times stays under both
//! limits and still expands to N² values (a 20 KB text with N = 3000 gives 9 million
//! values: seconds of CPU and hundreds of MB). So a text is limited in bytes, and every
//! document in the number of values it expands to; the values are counted in a first
//! pass that builds nothing and stops at the limit, so a hostile text costs at most
//! [`MAX_VALUES_PER_DOCUMENT`] steps per document.

use std::cell::Cell;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, EnumAccess, MapAccess, SeqAccess, VariantAccess, Visitor};

/// The largest text read, in bytes. Kubernetes stores at most 1.5 MiB per object; a
/// file of many policies may be bigger, but not this big.
pub const MAX_TEXT_BYTES: usize = 8 << 20;

/// The deepest nesting of flow collections (`[...]`, `{...}`) read. libyaml's scanner
/// spends time proportional to the flow depth on every token, so a text of N nested
/// brackets costs N² (80,000 levels, 160 KB: 40 to 90 s) before serde_yaml's own depth
/// limit of 128 is ever checked. Counted by [`flow_depth_over`] before libyaml sees the text.
pub const MAX_FLOW_DEPTH: usize = 1000;

/// The most values (scalars, sequences and mappings, with aliases expanded) one document
/// may have. A policy with thousands of CIDRs has tens of thousands.
pub const MAX_VALUES_PER_DOCUMENT: usize = 250_000;

/// What went wrong while counting one document.
pub(super) enum CountError {
    /// The document has more values than the limit.
    TooManyValues,
    /// The text is not readable YAML.
    Yaml(serde_yaml::Error),
}

/// Counts the values of every document of `text`, stopping at the first document over
/// `limit`. `Err((document, error))` names the 1-based document.
pub(super) fn count_values(text: &str, limit: usize) -> Result<(), (usize, CountError)> {
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let left = Cell::new(limit);
        let over = Cell::new(false);
        if let Err(e) = (Budget { left: &left, over: &over }).deserialize(doc) {
            let why = if over.get() { CountError::TooManyValues } else { CountError::Yaml(e) };
            return Err((i + 1, why));
        }
    }
    Ok(())
}

/// Where (1-based line) the flow nesting of `text` first goes over `limit`, if it does.
///
/// A lexical estimate that errs on the high side: every `[` and `{` counts, a `]` or `}`
/// counts only outside comments and quoted scalars, and brackets inside a quoted scalar
/// count only while it lasts (so `"[a-z]"` leaves no trace). Quoted scalars are
/// recognised where YAML lets them start: after `[`, `{`, `,`, after `:`, `?` or `-` and
/// whitespace, at the start of a line or after `:` that follows a closing quote.
pub(super) fn flow_depth_over(text: &str, limit: usize) -> Option<usize> {
    let b = text.as_bytes();
    let (mut depth, mut line, mut i) = (0usize, 1usize, 0usize);
    // The last byte that is not whitespace, the one before it, and whether whitespace
    // (or a line start) came after it.
    let (mut prev, mut before_prev, mut gap) = (b'\n', b'\n', true);
    while i < b.len() {
        let c = b[i];
        match c {
            b'\n' | b' ' | b'\t' | b'\r' => {
                if c == b'\n' {
                    line += 1;
                }
                gap = true;
                i += 1;
                continue;
            }
            b'#' if gap => {
                // A comment: openers still count, closers do not.
                while i < b.len() && b[i] != b'\n' {
                    if matches!(b[i], b'[' | b'{') {
                        depth += 1;
                        if depth > limit {
                            return Some(line);
                        }
                    }
                    i += 1;
                }
                continue;
            }
            b'"' | b'\'' if quote_starts(prev, before_prev, gap) => {
                let mut inner = 0usize;
                i += 1;
                while i < b.len() {
                    match b[i] {
                        b'\\' if c == b'"' => i += 1,
                        b'\'' if c == b'\'' && b.get(i + 1) == Some(&b'\'') => i += 1,
                        q if q == c => break,
                        b'\n' => line += 1,
                        b'[' | b'{' => {
                            inner += 1;
                            if depth + inner > limit {
                                return Some(line);
                            }
                        }
                        b']' | b'}' => inner = inner.saturating_sub(1),
                        _ => {}
                    }
                    i += 1;
                }
            }
            b'[' | b'{' => {
                depth += 1;
                if depth > limit {
                    return Some(line);
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        before_prev = prev;
        prev = c;
        gap = false;
        i += 1;
    }
    None
}

/// Whether a quote character at this point starts a quoted scalar.
fn quote_starts(prev: u8, before_prev: u8, gap: bool) -> bool {
    match prev {
        b'[' | b'{' | b',' | b'\n' => true,
        b':' | b'?' | b'-' if gap => true,
        b':' => matches!(before_prev, b'"' | b'\''),
        _ => false,
    }
}

/// Visits a value and everything in it, spending one unit per value.
#[derive(Clone, Copy)]
struct Budget<'a> {
    left: &'a Cell<usize>,
    over: &'a Cell<bool>,
}

impl Budget<'_> {
    fn spend<E: de::Error>(self) -> Result<(), E> {
        match self.left.get().checked_sub(1) {
            Some(left) => {
                self.left.set(left);
                Ok(())
            }
            None => {
                self.over.set(true);
                Err(E::custom("the document has too many values"))
            }
        }
    }
}

impl<'de> DeserializeSeed<'de> for Budget<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Budget<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML value")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        self.spend()
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        self.spend()
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        self.spend()
    }
    fn visit_i128<E: de::Error>(self, _: i128) -> Result<(), E> {
        self.spend()
    }
    fn visit_u128<E: de::Error>(self, _: u128) -> Result<(), E> {
        self.spend()
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        self.spend()
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        self.spend()
    }
    fn visit_bytes<E: de::Error>(self, _: &[u8]) -> Result<(), E> {
        self.spend()
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.spend()
    }
    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        self.spend()
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        self.deserialize(d)
    }
    fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        self.deserialize(d)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        self.spend()?;
        while seq.next_element_seed(self)?.is_some() {}
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        self.spend()?;
        while map.next_key_seed(self)?.is_some() {
            map.next_value_seed(self)?;
        }
        Ok(())
    }
    /// A tagged value (`!tag value`): the tag, then the value.
    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<(), A::Error> {
        let ((), variant) = data.variant_seed(self)?;
        variant.newtype_variant_seed(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_every_value_with_aliases_expanded() {
        // The mapping, key a, [1, 2] (3 values), key b, and [1, 2] again through the alias.
        assert!(count_values("a: &x [1, 2]\nb: *x\n", 9).is_ok());
        assert!(matches!(count_values("a: &x [1, 2]\nb: *x\n", 8), Err((1, CountError::TooManyValues))));
        assert!(matches!(count_values("a: 1\n---\n[1, 2, 3, 4]\n", 4), Err((2, CountError::TooManyValues))));
        assert!(matches!(count_values("a: [1\n", 100), Err((1, CountError::Yaml(_)))));
        assert!(count_values("!tagged {a: 1}\n", 10).is_ok());
    }

    #[test]
    fn flow_depth_is_never_underestimated() {
        assert_eq!(flow_depth_over("a: [[[1]]]\n", 3), None);
        assert_eq!(flow_depth_over("a: [[[1]]]\n", 2), Some(1));
        assert_eq!(flow_depth_over("a: [1]\nb: [[2]]\nc: [[[3]]]\n", 2), Some(3), "depth goes back down");
        // Closers in quoted scalars and comments close nothing.
        assert_eq!(flow_depth_over("a: [\"]]]\", [\"]]\", [3]]]\n", 2), Some(1));
        assert_eq!(flow_depth_over("a: [ 'it''s ]]', ['x]]', [3]]]\n", 2), Some(1));
        assert_eq!(flow_depth_over("a: [ # ]]]\n [ # ]]\n [3]]]\n", 2), Some(3));
        // Brackets inside a string leave no trace once it ends.
        let strings = "- \"[a-z]\"\n".repeat(50);
        assert_eq!(flow_depth_over(&strings, 2), None);
        // Apostrophes inside plain scalars start nothing.
        assert_eq!(flow_depth_over("a: don't [[[x]]]\n", 2), Some(1));
    }
}
