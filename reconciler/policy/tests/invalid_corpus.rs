//! Every file of fixtures/invalid is rejected, with the message fixtures/invalid/EXPECTED.yaml
//! gives for it, and every message names the kind and name (when the document has them),
//! the field path and the reason. Texts too big to commit (over the size limit, over the
//! value limit, nested 10,000 deep) are generated here; every hostile text must be judged
//! within a bounded time.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use palisade_policy::parse::limits::{MAX_DEPTH, MAX_TEXT_BYTES, MAX_VALUES_PER_DOCUMENT};
use palisade_policy::yaml::{self, Value};
use palisade_policy::{ManifestOutcome, ParseError, PolicyError, parse_manifest_bytes, parse_manifests};
use serde::Deserialize;

/// What EXPECTED.yaml says about one file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Expected {
    /// Every document is rejected at this exact path ("" = the document as a whole).
    path: Option<String>,
    /// ...with a reason containing this.
    reason: Option<String>,
    /// The text as a whole cannot be read: the error message contains this.
    text: Option<String>,
    /// The text has this many documents (only 0 is used: nothing in the file).
    documents: Option<usize>,
}

/// Generous even for a debug build on a busy machine; the hostile files take well under
/// a second each.
const TIME_LIMIT: Duration = Duration::from_secs(10);

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/invalid")
}

fn corpus_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(corpus_dir())
        .expect("fixtures/invalid exists")
        .map(|e| e.expect("readable directory").path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            name != "EXPECTED.yaml" && name != "README.md"
        })
        .collect();
    files.sort();
    files
}

fn expectations() -> BTreeMap<String, Expected> {
    let text = std::fs::read_to_string(corpus_dir().join("EXPECTED.yaml")).expect("EXPECTED.yaml is readable");
    yaml::from_str(&text).expect("EXPECTED.yaml maps file names to expectations")
}

/// The kind and name document `index` (1-based) of `text` has, read without palisade:
/// what a rejection of it must name.
fn written_kind_and_name(text: &str, index: usize) -> (Option<String>, Option<String>) {
    let Ok(documents) = yaml::documents(text) else { return (None, None) };
    let Some(value) = documents.get(index - 1) else { return (None, None) };
    let text_at = |v: Option<&Value>| v.and_then(|v| v.as_str()).filter(|s| !s.is_empty()).map(str::to_owned);
    (text_at(value.get("kind")), text_at(value.get("metadata").and_then(|m| m.get("name"))))
}

fn check_rejection(file: &str, text: &str, e: &PolicyError, path: &str, reason: &str) -> Result<(), String> {
    let shown = e.to_string();
    let mut wrong = Vec::new();
    if e.path != path {
        wrong.push(format!("path is {:?}, expected {path:?}", e.path));
    }
    if !e.reason.contains(reason) {
        wrong.push(format!("reason {:?} does not contain {reason:?}", e.reason));
    }
    if !path.is_empty() && !shown.contains(&format!("{path}: ")) {
        wrong.push("the message does not name the path".to_owned());
    }
    if !shown.contains(&e.reason) || e.hint.is_empty() || !shown.contains(&e.hint) {
        wrong.push("the message lacks the reason or a hint".to_owned());
    }
    if !shown.contains(file) || !shown.contains(&format!("document {}", e.document)) {
        wrong.push("the message does not name the file and document".to_owned());
    }
    let (kind, name) = written_kind_and_name(text, e.document);
    if let Some(kind) = kind
        && (!shown.starts_with(&kind) || e.kind.as_deref() != Some(kind.as_str()))
    {
        wrong.push(format!("the message does not name the kind {kind}"));
    }
    if let Some(name) = name
        && (!shown.contains(&name) || e.name.as_deref() != Some(name.as_str()))
    {
        wrong.push(format!("the message does not name the name {name}"));
    }
    if wrong.is_empty() { Ok(()) } else { Err(format!("{}\n      message: {shown}", wrong.join("; "))) }
}

fn check_file(path: &Path, want: &Expected) -> Result<(), String> {
    let file = path.file_name().unwrap().to_string_lossy().into_owned();
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    let started = Instant::now();
    let result = parse_manifest_bytes(&bytes, &file);
    if started.elapsed() > TIME_LIMIT {
        return Err(format!("took {:?}", started.elapsed()));
    }
    match (want, result) {
        (Expected { text: Some(text), path: None, reason: None, documents: None }, Err(e)) => {
            let shown = e.to_string();
            if shown.contains(text) && shown.starts_with(&file) {
                Ok(())
            } else {
                Err(format!("error {shown:?} does not start with the file name and contain {text:?}"))
            }
        }
        (Expected { documents: Some(n), path: None, reason: None, text: None }, Ok(outcomes)) => {
            if outcomes.len() == *n { Ok(()) } else { Err(format!("{} documents, expected {n}", outcomes.len())) }
        }
        (Expected { path: Some(path), reason: Some(reason), text: None, documents: None }, Ok(outcomes)) => {
            if outcomes.is_empty() {
                return Err("no document at all".to_owned());
            }
            let text = String::from_utf8_lossy(&bytes);
            let mut wrong = Vec::new();
            for o in &outcomes {
                match o {
                    ManifestOutcome::Accepted(p) => wrong.push(format!("ACCEPTED {}", p.display_name())),
                    ManifestOutcome::Rejected(e) => {
                        if let Err(w) = check_rejection(&file, &text, e, path, reason) {
                            wrong.push(format!("document {}: {w}", e.document));
                        }
                    }
                }
            }
            if wrong.is_empty() { Ok(()) } else { Err(wrong.join("\n    ")) }
        }
        (want, got) => Err(format!("expected {want:?}, got {got:?}")),
    }
}

#[test]
fn every_corpus_file_is_rejected_with_its_expected_message() {
    let files = corpus_files();
    let mut expected = expectations();
    assert!(files.len() >= 50, "the corpus has {} files", files.len());
    let mut failures = Vec::new();
    for path in &files {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let Some(want) = expected.remove(&name) else {
            failures.push(format!("{name}: not listed in EXPECTED.yaml"));
            continue;
        };
        if let Err(why) = check_file(path, &want) {
            failures.push(format!("{name}: {why}"));
        }
    }
    for name in expected.keys() {
        failures.push(format!("{name}: listed in EXPECTED.yaml, but there is no such file"));
    }
    assert!(failures.is_empty(), "{} of {} files:\n  {}", failures.len(), files.len(), failures.join("\n  "));
}

/// A CNP whose one egress rule allows `cidrs` (flow style, so the text stays small).
fn cnp_with_cidrs(name: &str, cidrs: &[String]) -> String {
    format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: {name}}}\n\
         spec:\n  endpointSelector: {{}}\n  egress:\n  - toCIDR: [{}]\n",
        cidrs.join(",")
    )
}

fn timed<T>(what: &str, f: impl FnOnce() -> T) -> T {
    let started = Instant::now();
    let out = f();
    assert!(started.elapsed() < TIME_LIMIT, "{what} took {:?}", started.elapsed());
    out
}

#[test]
fn a_text_over_the_size_limit_is_refused_before_parsing() {
    let mut text = cnp_with_cidrs("big", &["10.0.0.0/8".to_owned()]);
    text.push_str("# ");
    text.push_str(&"x".repeat(MAX_TEXT_BYTES));
    let err = timed("an oversized text", || parse_manifests(&text, "big.yaml")).unwrap_err();
    assert!(matches!(err, ParseError::TooLarge { bytes, limit: MAX_TEXT_BYTES, .. } if bytes == text.len()));
    assert!(err.to_string().starts_with("big.yaml: the text has"), "{err}");
    let err = parse_manifest_bytes(text.as_bytes(), "big.yaml").unwrap_err();
    assert!(matches!(err, ParseError::TooLarge { .. }), "{err}");
}

#[test]
fn a_document_over_the_value_limit_is_refused() {
    let cidrs = vec!["1".to_owned(); MAX_VALUES_PER_DOCUMENT];
    let text =
        format!("{}---\n{}", cnp_with_cidrs("first", &["10.0.0.0/8".to_owned()]), cnp_with_cidrs("huge", &cidrs));
    assert!(text.len() < MAX_TEXT_BYTES);
    let err = timed("a document of too many values", || parse_manifests(&text, "huge.yaml")).unwrap_err();
    assert_eq!(
        err,
        ParseError::TooManyValues { origin: "huge.yaml".into(), document: 2, limit: MAX_VALUES_PER_DOCUMENT }
    );
}

#[test]
fn a_large_realistic_policy_is_still_accepted() {
    // 20,000 distinct /32s: far more than real policies name, well inside the limits.
    let cidrs: Vec<String> =
        (0..20_000u32).map(|i| format!("10.{}.{}.{}/32", i >> 16, (i >> 8) & 255, i & 255)).collect();
    let text = cnp_with_cidrs("many-cidrs", &cidrs);
    let outcomes = timed("a large policy", || parse_manifests(&text, "large.yaml")).unwrap();
    let [ManifestOutcome::Accepted(p)] = &outcomes[..] else { panic!("{outcomes:?}") };
    assert_eq!(p.rules[0].egress[0].peers.list().len(), 20_000);
}

#[test]
fn nesting_ten_thousand_levels_deep_is_refused_quickly() {
    for (open, close) in [("[", "]"), ("{a: ", "}")] {
        let text = format!("kind: {}{}\n", open.repeat(10_000), close.repeat(10_000));
        let err = timed("deep nesting", || parse_manifests(&text, "deep.yaml")).unwrap_err();
        assert!(err.to_string().contains(&format!("are nested more than {MAX_DEPTH} levels deep")), "{err}");
    }
}

#[test]
fn alias_bombs_of_any_shape_are_refused_quickly() {
    // Wide: one anchor of n values used n times (n² values); deep: nine aliases per
    // level (9^levels values).
    for n in [600usize, 3_000, 20_000] {
        let text = format!("a: &a [{}]\nb: [{}]\n", vec!["1"; n].join(","), vec!["*a"; n].join(","));
        let result = timed("a wide alias bomb", || parse_manifests(&text, "wide.yaml"));
        let err = result.expect_err("the document is over a limit");
        assert!(
            matches!(err, ParseError::TooManyValues { .. }) || err.to_string().contains("repetition limit"),
            "{n}: {err}"
        );
    }
    let mut text = "l0: &l0 [lol,lol,lol,lol,lol,lol,lol,lol,lol]\n".to_owned();
    for i in 1..30 {
        let _ = writeln!(text, "l{i}: &l{i} [{}]", vec![format!("*l{}", i - 1); 9].join(","));
    }
    let err = timed("a deep alias bomb", || parse_manifests(&text, "deep-aliases.yaml")).unwrap_err();
    assert!(matches!(err, ParseError::TooManyValues { .. }) || err.to_string().contains("repetition limit"), "{err}");
}
