//! Bad manifests change nothing that is enforced, in the real agent: for a sample of
//! fixtures/invalid, a generated scenario puts the bad manifest (`expectRejected: true`)
//! next to a valid policy; the testbed checks that the agent rejects it, that enforcement
//! is the same before and after, and that the valid policy still decides the probes.
//! Needs root, and palisade-agent built next to palisade-testbed (`cargo build --bins`).
mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use palisade_policy::yaml::{self, Value};

/// Corpus files that are one YAML mapping (a scenario holds manifests as YAML, so files
/// that are not YAML, or not UTF-8, cannot be carried; the policy crate's corpus test
/// covers them), chosen to cover each part of validation once.
const SAMPLE: [&str; 10] = [
    "port-70000.yaml",
    "end-port-below-port.yaml",
    "cidr-except-outside.yaml",
    "label-key-invalid.yaml",
    "node-selector.yaml",
    "icmps-and-toports.yaml",
    "name-invalid-dns.yaml",
    "kind-unknown.yaml",
    "unknown-field-in-rule.yaml",
    "knp-port-zero.yaml",
];

/// A sample file whose bad manifest takes the valid policy's name: the accepted version
/// must stay in force.
const SAME_NAME: &str = "port-70000.yaml";

const VALID: &str = include_str!("scenarios/invalid-corpus-valid-policy.yaml");

/// The scenario for one bad manifest: client -> server, where only port 80 is allowed.
fn scenario(file: &str, mut bad: Value) -> Value {
    let map = bad.as_object_mut().unwrap_or_else(|| panic!("{file} is not one YAML mapping"));
    map.insert("expectRejected".to_owned(), true.into());
    if file == SAME_NAME {
        bad["metadata"]["name"] = "allow-http".into();
        bad["metadata"]["namespace"] = "default".into();
    }
    let valid: Value = yaml::from_str(VALID).unwrap();
    let stem = file.trim_end_matches(".yaml");
    let text = format!(
        "name: invalid-corpus-{stem}\n\
         namespaces: {{default: {{}}}}\n\
         pods:\n\
         - {{name: client, namespace: default, labels: {{app: client}}}}\n\
         - {{name: server, namespace: default, labels: {{app: server}}, \
              ports: [{{port: 80, protocol: TCP}}, {{port: 443, protocol: TCP}}]}}\n\
         policies: []\n\
         probes:\n\
         - {{from: default/client, to: default/server, port: 80, protocol: TCP, expect: allow}}\n\
         - {{from: default/client, to: default/server, port: 443, protocol: TCP, expect: deny}}\n"
    );
    let mut doc: Value = yaml::from_str(&text).unwrap();
    doc["policies"] = Value::Array(vec![valid, bad]);
    doc
}

#[test]
fn bad_manifests_change_nothing_that_is_enforced_privileged() {
    palisade_privileged::require_root!();
    built_agent();
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/invalid");
    let dir = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    for name in SAMPLE {
        let text = std::fs::read_to_string(corpus.join(name)).unwrap();
        let bad: Value = yaml::from_str(&text).unwrap();
        let path = dir.path().join(name);
        std::fs::write(&path, yaml::to_string(&scenario(name, bad)).unwrap()).unwrap();
        files.push(path.display().to_string());
    }

    let started = Instant::now();
    let mut args = vec!["run", "--json"];
    args.extend(files.iter().map(String::as_str));
    let (pid, out) = run(&args);
    let elapsed = started.elapsed();
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "stdout:\n{stdout}\nstderr:\n{stderr}");

    let doc: serde_json::Value = serde_json::from_str(&stdout).expect("one JSON document on stdout");
    let scenarios = doc["scenarios"].as_array().expect("scenarios");
    assert_eq!(scenarios.len(), SAMPLE.len(), "{stdout}");
    for s in scenarios {
        let probes = s["probes"].as_array().expect("probes");
        assert_eq!(probes.len(), 2, "{s}");
        for p in probes {
            assert_eq!(p["observed"], p["expect"], "{}: {p}", s["name"]);
        }
    }
    assert_eq!(leftovers(pid), Vec::<String>::new(), "the run left things behind");
    assert!(elapsed < Duration::from_mins(1), "{} scenarios took {elapsed:?}", SAMPLE.len());
}
