//! Offline `palisade policy explain --scenario FILE [--policies DIR]`: the state an agent
//! would hold after being told what the testbed tells it about a scenario (namespaces, pods
//! at the testbed's addresses, reserved entity addresses) and after reading the policy
//! files, built by `palisade-node` (the agent's own code) without an agent or root.
use std::path::Path;

use palisade_api::types::{EndpointSpec, IpcacheEntrySpec, PortSpec, ReservedEntity};
use palisade_node::explain::offline::{DEFAULT_CLUSTER, OfflineError, OfflineState, PodInput, read_policy_dir};
use palisade_scenario::{Entity, IpFamily, Plan, PlanPod};

/// Why a scenario's offline state cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioStateError {
    #[error(transparent)]
    Scenario(#[from] palisade_scenario::ScenarioError),
    #[error("policy manifest {manifest} of the scenario cannot be written as YAML: {reason}")]
    Manifest { manifest: String, reason: String },
    #[error(transparent)]
    State(#[from] OfflineError),
}

/// What the testbed registers for a pod of a scenario (`PUT /v1/endpoints/ns/name`).
pub fn scenario_endpoint_spec(pod: &PlanPod) -> EndpointSpec {
    EndpointSpec {
        labels: pod.labels.clone(),
        service_account: pod.service_account.clone(),
        ipv4: pod.ipv4,
        ipv6: pod.ipv6,
        interface: pod.host_interface.clone(),
        ports: pod
            .ports
            .iter()
            .filter_map(|p| {
                p.name.as_ref().map(|n| PortSpec { name: n.clone(), port: p.port, protocol: p.protocol.to_string() })
            })
            .collect(),
    }
}

/// The reserved addresses the testbed registers for a scenario (`PUT /v1/ipcache`): the
/// node (host), the simulated remote node and the API server, in the scenario's families.
pub fn scenario_reserved_entries(plan: &Plan) -> Vec<IpcacheEntrySpec> {
    let mut out = Vec::new();
    for (entity, reserved) in [
        (Entity::Host, ReservedEntity::Host),
        (Entity::RemoteNode, ReservedEntity::RemoteNode),
        (Entity::KubeApiserver, ReservedEntity::KubeApiserver),
    ] {
        let (v4, v6) = entity.addresses();
        if plan.has_family(IpFamily::IPv4) {
            out.push(IpcacheEntrySpec { cidr: format!("{v4}/32"), entity: reserved });
        }
        if plan.has_family(IpFamily::IPv6) {
            out.push(IpcacheEntrySpec { cidr: format!("{v6}/128"), entity: reserved });
        }
    }
    out
}

/// The scenario's manifests as the testbed writes them into the policy directory
/// (file name, text), without those marked `expectRejected`.
pub fn scenario_policy_files(plan: &Plan) -> Result<Vec<(String, String)>, ScenarioStateError> {
    plan.policies
        .iter()
        .filter(|p| !p.expect_rejected)
        .map(|p| {
            let text =
                p.to_yaml().map_err(|e| ScenarioStateError::Manifest { manifest: p.label(), reason: e.to_string() })?;
            Ok((p.file_name.clone(), text))
        })
        .collect()
}

/// The pods of a scenario as the agent's API receives them.
pub fn scenario_pods(plan: &Plan) -> Vec<PodInput> {
    plan.pods
        .iter()
        .map(|p| PodInput { namespace: p.namespace.clone(), name: p.name.clone(), spec: scenario_endpoint_spec(p) })
        .collect()
}

/// A scenario as the testbed would bring it up: its namespaces, its pods at the addresses
/// the testbed gives them, the reserved entity addresses, and either its own manifests
/// (`policy_dir` `None`) or the files of `policy_dir`.
pub fn scenario_state(plan: &Plan, policy_dir: Option<&Path>) -> Result<OfflineState, ScenarioStateError> {
    let files = match policy_dir {
        Some(dir) => read_policy_dir(dir)?,
        None => scenario_policy_files(plan)?.into_iter().map(|(n, t)| (n, t.into_bytes())).collect(),
    };
    let cluster = plan.cluster.as_deref().unwrap_or(DEFAULT_CLUSTER);
    Ok(OfflineState::build(&plan.namespaces, &scenario_pods(plan), &scenario_reserved_entries(plan), &files, cluster)?)
}
