//! The manifest parser on arbitrary bytes: it must never panic, whatever it is given, and
//! must judge every document (accepted or rejected with a path and a reason) or refuse
//! the whole text with an error.
#![no_main]

use libfuzzer_sys::fuzz_target;
use palisade_policy::{ManifestOutcome, parse_manifest_bytes, parse_manifests};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(outcomes) = parse_manifests(&text, "fuzz.yaml") {
        for o in &outcomes {
            match o {
                ManifestOutcome::Accepted(p) => {
                    let _ = p.display_name();
                }
                ManifestOutcome::Rejected(e) => {
                    assert!(!e.reason.is_empty(), "a rejection without a reason: {e:?}");
                    let _ = e.to_string();
                }
            }
        }
    }
    // The bytes as they are (not UTF-8: an error, never a panic).
    let _ = parse_manifest_bytes(data, "fuzz.yaml").map_err(|e| e.to_string());
});
