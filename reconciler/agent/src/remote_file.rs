//! Other nodes' pods from a file (`--remote-endpoints FILE`): the file mode of a cluster,
//! where the agents share no store. Whoever runs the nodes (the testbed) writes each agent
//! a JSON file of the pods of the other nodes with their labels
//! ([`palisade_api::types::RemoteEndpoints`]); the agent reads it at start and whenever it
//! changes, and maps every such pod's addresses to the identity of its label set, derived
//! as for a local pod (pod and namespace labels, service account, cluster). Identities
//! stay node-local numbers: the same label set may have another number on another node,
//! but every node's own policy entries and ipcache use its own numbers, so each node
//! judges a cross-node flow by the peer's labels. The kvstore (etcd) mode replaces this
//! file and makes the numbers cluster-wide.
//!
//! Level-based: every read compares the whole file with what was handed to the identity
//! cache and sends the difference. A file that cannot be read or parsed changes nothing
//! (what was known stays as it was). Everything is handed in again every
//! [`RESEND_EVERY`] polls, so an identity cache restarted after a panic has the pods back.
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use palisade_api::types::{EndpointSpec, RemoteEndpoints};
use palisade_node::endpoint::endpoint_labels;

use crate::actors::Agent;
use crate::actors::identity::RemoveRemoteEndpoint;
use crate::k8s::mirror::plan;
use crate::k8s::sync::RemoteSpec;

/// Polls between two complete hand-ins of an unchanged file.
pub const RESEND_EVERY: u32 = 10;

/// How the file is watched.
#[derive(Clone, Debug)]
pub struct RemoteFileOptions {
    pub path: PathBuf,
    /// This agent's cluster name (`io.cilium.k8s.policy.cluster` of the pods).
    pub cluster: String,
    /// Time between two reads.
    pub poll: Duration,
}

/// Parses the file (JSON; an empty file lists nothing).
pub fn parse(bytes: &[u8]) -> Result<RemoteEndpoints, String> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(RemoteEndpoints::default());
    }
    serde_json::from_slice(bytes).map_err(|e| e.to_string())
}

/// The label set and addresses of every pod of the file, by `namespace/name`, and what is
/// wrong with the pods left out (no address, namespace not in the file, listed twice).
pub fn desired(file: &RemoteEndpoints, cluster: &str) -> (BTreeMap<String, RemoteSpec>, Vec<String>) {
    let mut out = BTreeMap::new();
    let mut problems = Vec::new();
    for (i, pod) in file.pods.iter().enumerate() {
        let key = format!("{}/{}", pod.namespace, pod.name);
        let Some(ns_labels) = file.namespaces.get(&pod.namespace) else {
            problems.push(format!("pods[{i}] {key}: namespace {:?} is not under `namespaces`", pod.namespace));
            continue;
        };
        let ips: Vec<IpAddr> = pod.ipv4.map(IpAddr::V4).into_iter().chain(pod.ipv6.map(IpAddr::V6)).collect();
        if ips.is_empty() {
            problems.push(format!("pods[{i}] {key}: neither ipv4 nor ipv6"));
            continue;
        }
        let spec = EndpointSpec {
            labels: pod.labels.clone(),
            service_account: pod.service_account.clone(),
            ipv4: pod.ipv4,
            ipv6: pod.ipv6,
            interface: String::new(),
            ports: pod.ports.clone(),
        };
        let labels = endpoint_labels(&pod.namespace, ns_labels, &spec, cluster);
        if out.insert(key.clone(), RemoteSpec::new(labels, ips, &pod.ports)).is_some() {
            problems.push(format!("pods[{i}] {key}: listed twice (the last one counts)"));
        }
    }
    (out, problems)
}

/// Watches the file until the agent stops.
pub async fn run(agent: Agent, opts: RemoteFileOptions) {
    let path = opts.path.display().to_string();
    tracing::info!(file = %path, "other nodes' pods come from this file");
    let mut applied: BTreeMap<String, RemoteSpec> = BTreeMap::new();
    let mut last: Option<Vec<u8>> = None;
    let mut polls: u32 = 0;
    let mut missing_reported = false;
    loop {
        polls = polls.wrapping_add(1);
        match std::fs::read(&opts.path) {
            Ok(bytes) => {
                missing_reported = false;
                let changed = last.as_deref() != Some(bytes.as_slice());
                let resend = polls.is_multiple_of(RESEND_EVERY);
                if changed || resend {
                    match parse(&bytes) {
                        Ok(file) => {
                            let (want, problems) = desired(&file, &opts.cluster);
                            if changed {
                                for p in &problems {
                                    tracing::warn!(file = %path, "remote pod left out: {p}");
                                }
                                tracing::info!(file = %path, pods = want.len(), "remote endpoints read");
                            }
                            apply(&agent, &mut applied, &want, resend && !changed).await;
                        }
                        Err(e) if changed => tracing::error!(
                            file = %path,
                            error = %e,
                            "the remote endpoints file is not valid; the pods read before stay as they were"
                        ),
                        Err(_) => {}
                    }
                    last = Some(bytes);
                }
            }
            Err(e) => {
                if !missing_reported {
                    tracing::warn!(file = %path, error = %e, "cannot read the remote endpoints file; the pods read before stay as they were");
                    missing_reported = true;
                }
            }
        }
        tokio::time::sleep(opts.poll).await;
    }
}

/// Sends the identity cache the difference between `applied` and `want` (everything in
/// `want` when `all`), and records what it took.
async fn apply(
    agent: &Agent,
    applied: &mut BTreeMap<String, RemoteSpec>,
    want: &BTreeMap<String, RemoteSpec>,
    all: bool,
) {
    let base = if all { BTreeMap::new() } else { applied.clone() };
    let p = plan(&base, want);
    for (key, spec) in p.upserts {
        match agent.identities.send(spec.upsert(&key, None)).await {
            Ok(id) => {
                tracing::debug!(pod = %key, identity = id, "remote pod mapped");
                applied.insert(key, spec);
            }
            Err(e) => tracing::error!(error = %e, "identity cache unavailable; will retry"),
        }
    }
    let gone: Vec<String> = applied.keys().filter(|k| !want.contains_key(*k)).cloned().collect();
    for key in gone {
        if agent.identities.send(RemoveRemoteEndpoint { key: key.clone() }).await.is_ok() {
            applied.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pods_get_the_labels_of_a_local_pod_and_bad_entries_are_named() {
        let file = parse(
            br#"{"namespaces": {"shop": {"env": "prod"}},
                 "pods": [
                   {"namespace": "shop", "name": "web", "node": "node-b", "labels": {"app": "web"}, "ipv4": "10.201.1.10"},
                   {"namespace": "shop", "name": "noaddr"},
                   {"namespace": "other", "name": "x", "ipv4": "10.201.1.11"}
                 ]}"#,
        )
        .unwrap();
        let (want, problems) = desired(&file, "c1");
        assert_eq!(want.len(), 1);
        let web = &want["shop/web"];
        assert_eq!(web.ips, vec!["10.201.1.10".parse::<IpAddr>().unwrap()]);
        let labels = web.labels.to_string();
        for l in ["app=web", "io.kubernetes.pod.namespace=shop", "namespace.labels.env=prod", "cluster=c1"] {
            assert!(labels.contains(l), "{labels} lacks {l}");
        }
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].contains("shop/noaddr") && problems[1].contains("not under `namespaces`"), "{problems:?}");
    }

    #[test]
    fn an_empty_file_lists_nothing_and_junk_is_an_error() {
        assert_eq!(parse(b"  \n").unwrap(), RemoteEndpoints::default());
        assert!(parse(b"{\"pods\": [{\"name\": 1}]}").is_err());
        assert!(parse(b"{\"pod\": []}").unwrap_err().contains("unknown field"));
    }
}
