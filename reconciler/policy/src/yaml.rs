//! YAML in and out, for every crate of palisade: texts are read with the options and
//! limits of [`crate::parse::limits`] (serde-saphyr, a pure-Rust parser that enforces them
//! while it parses), untyped documents are [`Value`]s (`serde_json`'s: YAML that is also
//! JSON, string keys), and YAML is written by the same crate.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::parse::limits::yaml_options;

pub use serde_json::Value;
/// Why a text could not be read.
pub use serde_saphyr::Error;
/// Why a value could not be written.
pub use serde_saphyr::SerializeError as WriteError;

/// A document of a text that could not be read.
#[derive(Debug)]
pub struct DocumentError {
    /// 1-based position among the documents that are not empty.
    pub document: usize,
    pub error: Error,
}

/// Every document of `text` that is not empty, in order. The first one that cannot be read
/// (not YAML, a duplicate key, over a limit) ends the text.
pub fn documents(text: &str) -> Result<Vec<Value>, DocumentError> {
    let mut bytes = text.as_bytes();
    let mut out = Vec::new();
    for doc in serde_saphyr::read_with_options::<_, Value>(&mut bytes, yaml_options()) {
        match doc {
            Ok(value) => out.push(value),
            Err(error) => return Err(DocumentError { document: out.len() + 1, error }),
        }
    }
    Ok(out)
}

/// One document of `text` as a `T`.
pub fn from_str<T: DeserializeOwned>(text: &str) -> Result<T, Error> {
    serde_saphyr::from_str_with_options(text, yaml_options())
}

/// `value` as a YAML document.
pub fn to_string<T: Serialize>(value: &T) -> Result<String, WriteError> {
    serde_saphyr::to_string(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_yaml_reads_back_as_the_same_value() {
        let text = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: web}\nspec:\n  \
                    endpointSelector: {}\n  ingress:\n  - toPorts: [{ports: [{port: \"80\", protocol: TCP}]}]\n    \
                    fromEntities: [world, 'yes', 'null', '']\n";
        let value: Value = from_str(text).unwrap();
        assert_eq!(value["spec"]["ingress"][0]["toPorts"][0]["ports"][0]["port"], Value::from("80"));
        assert_eq!(value["spec"]["ingress"][0]["fromEntities"][1], Value::from("yes"));
        let written = to_string(&value).unwrap();
        assert_eq!(from_str::<Value>(&written).unwrap(), value, "{written}");
        assert_eq!(documents(&format!("---\n{written}---\n---\n{written}")).unwrap(), vec![value.clone(), value]);
    }

    #[test]
    fn json_is_read_too_and_yaml_booleans_are_only_true_and_false() {
        let value: Value = from_str(r#"{"a": [1, "x", true, null], "b": yes}"#).unwrap();
        assert_eq!(value, serde_json::json!({"a": [1, "x", true, null], "b": "yes"}));
    }

    #[test]
    fn the_document_that_cannot_be_read_is_named() {
        let err = documents("a: 1\n---\nb: 2\n---\nc: [\n").unwrap_err();
        assert_eq!(err.document, 3);
        let err = documents("a: 1\nb: 2\na: 3\n").unwrap_err();
        assert_eq!(err.document, 1);
    }
}
