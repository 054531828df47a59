//! Resolves every policy fixture (fixtures/policies/*.yaml) against one fixed set of
//! endpoints and snapshots the outcome: accepted policies with their warnings, rejected
//! documents with their errors, and the desired state of every endpoint.
//!
//! The endpoints: frontend, backend and other in namespaces `default` (10.0.1.1-3) and
//! `prod` (10.0.2.1-3). Identities are allocated in that order: 256..=258 in default,
//! 259..=261 in prod. A pod address inside a NetworkPolicy ipBlock gets an address
//! identity (the pod's labels and an `ipblock:` label per block that holds the address),
//! as in the agent; the snapshot lists them under `address_identities`.
//!
//! When policies name CIDRs, the snapshot also shows which identity a few addresses
//! (the pods and some outside ones) get by longest-prefix match, as the datapath would.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;

use palisade_policy::model::Protocol;
use palisade_policy::{
    CidrIdentities, DesiredState, EndpointView, IdentityAllocator, LabelSet, ManifestOutcome, NamedPort, Policy,
    parse_manifests, resolve_full,
};
use serde::Serialize;

struct Fixture {
    identities: IdentityAllocator,
    endpoints: Vec<EndpointView>,
    names: BTreeMap<u16, String>,
    addresses: BTreeMap<IpAddr, u32>,
}

/// Outside addresses whose identity the snapshots show when policies name CIDRs.
const OUTSIDE: [&str; 8] =
    ["10.0.1.200", "10.5.5.5", "10.96.0.1", "172.16.5.9", "172.16.9.9", "192.0.2.1", "203.0.113.7", "8.8.8.8"];

fn fixture() -> Fixture {
    let mut f = Fixture {
        identities: IdentityAllocator::new(),
        endpoints: Vec::new(),
        names: BTreeMap::new(),
        addresses: BTreeMap::new(),
    };
    let mut id = 0;
    for (subnet, (ns, ns_labels)) in [("default", vec![]), ("prod", vec![("env", "prod")])].into_iter().enumerate() {
        let ns_labels: BTreeMap<String, String> =
            ns_labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        for (app, extra) in [("frontend", None), ("backend", Some(("tier", "api"))), ("other", None)] {
            id += 1;
            let mut labels = BTreeMap::from([("app".to_owned(), app.to_owned())]);
            if let Some((k, v)) = extra {
                labels.insert(k.to_owned(), v.to_owned());
            }
            let ip: IpAddr = format!("10.0.{}.{}", subnet + 1, (id - 1) % 3 + 1).parse().unwrap();
            let labels = LabelSet::for_pod(ns, &ns_labels, &labels, "default", "default");
            let identity = f.identities.allocate(&labels);
            f.addresses.insert(ip, identity);
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
    /// Address -> identity as the datapath finds it: a pod address's address identity,
    /// or the pod's identity, or the longest CIDR prefix (no match: world-ipv4, 9); only
    /// when policies name CIDRs.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    addresses: BTreeMap<String, u32>,
    desired: DesiredState,
}

/// The identity the datapath would find for `ip`.
fn lookup(f: &Fixture, desired: &DesiredState, ip: IpAddr) -> u32 {
    let host = (ip, if ip.is_ipv4() { 32 } else { 128 });
    if let Some(id) = desired.address_ipcache.get(&host) {
        return *id;
    }
    if let Some(id) = f.addresses.get(&ip) {
        return *id;
    }
    let host = palisade_policy::Prefix::host(ip);
    desired
        .cidr_ipcache
        .iter()
        .filter_map(|((addr, len), id)| {
            let p = palisade_policy::Prefix::new(*addr, *len)?;
            p.contains(&host).then_some((*len, *id))
        })
        .max()
        .map_or(9, |(_, id)| id)
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
        let f = fixture();
        let cidrs = CidrIdentities::for_policies(&policies);
        let desired = resolve_full(&policies, &f.endpoints, &f.identities, &cidrs, &f.addresses);
        let mut addresses = BTreeMap::new();
        if !desired.cidr_ipcache.is_empty() {
            let probes = f.addresses.keys().copied().chain(OUTSIDE.iter().map(|a| a.parse().unwrap()));
            for ip in probes.collect::<Vec<_>>() {
                addresses.insert(ip.to_string(), lookup(&f, &desired, ip));
            }
        }
        let outcome = Outcome {
            endpoints: f.names.clone(),
            accepted: policies
                .iter()
                .map(|p| Accepted { policy: p.display_name(), warnings: p.warnings.clone() })
                .collect(),
            rejected,
            addresses,
            desired,
        };
        insta::assert_yaml_snapshot!(stem, outcome);
    }
}
