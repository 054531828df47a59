//! Resolves every policy fixture (fixtures/policies/*.yaml) against one fixed set of
//! endpoints and snapshots the outcome: accepted policies with their warnings, rejected
//! documents with their errors, and the desired state of every endpoint.
//!
//! The endpoints: frontend, backend and other in namespaces `default` and `prod`.
//! Identities are allocated in that order: 256..=258 in default, 259..=261 in prod.

use std::collections::BTreeMap;
use std::path::Path;

use palisade_policy::model::Protocol;
use palisade_policy::{
    DesiredState, EndpointView, IdentityAllocator, LabelSet, ManifestOutcome, NamedPort, Policy, parse_manifests,
    resolve,
};
use serde::Serialize;

struct Fixture {
    identities: IdentityAllocator,
    endpoints: Vec<EndpointView>,
    names: BTreeMap<u16, String>,
}

fn fixture() -> Fixture {
    let mut f = Fixture { identities: IdentityAllocator::new(), endpoints: Vec::new(), names: BTreeMap::new() };
    let mut id = 0;
    for (ns, ns_labels) in [("default", vec![]), ("prod", vec![("env", "prod")])] {
        let ns_labels: BTreeMap<String, String> =
            ns_labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        for (app, extra) in [("frontend", None), ("backend", Some(("tier", "api"))), ("other", None)] {
            id += 1;
            let mut labels = BTreeMap::from([("app".to_owned(), app.to_owned())]);
            if let Some((k, v)) = extra {
                labels.insert(k.to_owned(), v.to_owned());
            }
            let labels = LabelSet::for_pod(ns, &ns_labels, &labels, "default", "default");
            let identity = f.identities.allocate(&labels);
            let named_ports = if app == "backend" {
                vec![NamedPort { name: "http".into(), port: 8080, protocol: Protocol::Tcp }]
            } else {
                vec![]
            };
            f.names.insert(id, format!("{ns}/{app} (identity {identity})"));
            f.endpoints.push(EndpointView { id, namespace: ns.to_owned(), identity, labels, named_ports });
        }
    }
    f
}

#[derive(Serialize)]
struct Outcome {
    endpoints: BTreeMap<u16, String>,
    accepted: Vec<Accepted>,
    rejected: Vec<String>,
    desired: DesiredState,
}

#[derive(Serialize)]
struct Accepted {
    policy: String,
    warnings: Vec<String>,
}

fn fixtures_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/policies")
}

#[test]
fn endpoint_identities() {
    let f = fixture();
    let table: BTreeMap<u32, String> =
        f.identities.iter().filter(|(id, _, _)| *id >= 256).map(|(id, labels, _)| (id, labels.to_string())).collect();
    insta::assert_yaml_snapshot!("identities", table);
}

#[test]
fn policy_fixtures_resolve_to_the_reviewed_state() {
    let f = fixture();
    let mut files: Vec<_> = std::fs::read_dir(fixtures_dir())
        .expect("fixtures/policies exists")
        .map(|e| e.expect("readable dir").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 5, "fixtures found: {files:?}");
    for path in files {
        let stem = path.file_stem().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&path).unwrap();
        let outcomes = parse_manifests(&text, &format!("{stem}.yaml")).expect("fixtures are readable YAML");
        let mut policies: Vec<Policy> = Vec::new();
        let mut rejected = Vec::new();
        for o in outcomes {
            match o {
                ManifestOutcome::Accepted(p) => policies.push(p),
                ManifestOutcome::Rejected(e) => rejected.push(e.to_string()),
            }
        }
        let outcome = Outcome {
            endpoints: f.names.clone(),
            accepted: policies
                .iter()
                .map(|p| Accepted { policy: p.display_name(), warnings: p.warnings.clone() })
                .collect(),
            rejected,
            desired: resolve(&policies, &f.endpoints, &f.identities),
        };
        insta::assert_yaml_snapshot!(stem, outcome);
    }
}
