//! Offline `palisade policy explain --scenario FILE [--policies DIR]`: the state an agent
//! would hold after being told what the testbed tells it about a scenario (namespaces, pods
//! at the testbed's addresses, reserved entity addresses) and after reading the policy
//! files, built by `palisade-node` (the agent's own code) without an agent or root.
use std::path::Path;

use palisade_api::types::{EndpointSpec, IpcacheEntrySpec, PortSpec, RemoteEndpoints, RemotePod, ReservedEntity};
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
/// (Of the first node, in a scenario with several: see [`scenario_reserved_entries_for_node`].)
pub fn scenario_reserved_entries(plan: &Plan) -> Vec<IpcacheEntrySpec> {
    scenario_reserved_entries_for_node(plan, 0)
}

/// The reserved addresses the testbed registers with the agent of node `node`: that node's
/// own address as host, every other node's as remote node, then the simulated remote node
/// and the API server, in the scenario's families.
pub fn scenario_reserved_entries_for_node(plan: &Plan, node: usize) -> Vec<IpcacheEntrySpec> {
    let mut out = Vec::new();
    let mut push = |v4: Option<std::net::Ipv4Addr>, v6: Option<std::net::Ipv6Addr>, entity: ReservedEntity| {
        if let Some(v4) = v4.filter(|_| plan.has_family(IpFamily::IPv4)) {
            out.push(IpcacheEntrySpec { cidr: format!("{v4}/32"), entity });
        }
        if let Some(v6) = v6.filter(|_| plan.has_family(IpFamily::IPv6)) {
            out.push(IpcacheEntrySpec { cidr: format!("{v6}/128"), entity });
        }
    };
    for n in &plan.nodes {
        let entity = if n.index == node { ReservedEntity::Host } else { ReservedEntity::RemoteNode };
        push(n.ipv4, n.ipv6, entity);
    }
    for (entity, reserved) in
        [(Entity::RemoteNode, ReservedEntity::RemoteNode), (Entity::KubeApiserver, ReservedEntity::KubeApiserver)]
    {
        let (v4, v6) = entity.addresses();
        push(Some(v4), Some(v6), reserved);
    }
    out
}

/// What the agent of node `node` is told about the other nodes' pods in file mode
/// (`palisade-agent --remote-endpoints FILE`): every pod of another node that is not
/// host-network (those have their node's address), with its labels and addresses, and the
/// labels of every namespace.
pub fn scenario_remote_endpoints(plan: &Plan, node: usize) -> RemoteEndpoints {
    RemoteEndpoints {
        namespaces: plan.namespaces.clone(),
        pods: plan
            .pods
            .iter()
            .filter(|p| p.node != node && !p.host_network)
            .map(|p| RemotePod {
                namespace: p.namespace.clone(),
                name: p.name.clone(),
                node: Some(plan.nodes[p.node].name.clone()),
                labels: p.labels.clone(),
                service_account: p.service_account.clone(),
                ipv4: p.ipv4,
                ipv6: p.ipv6,
                ports: scenario_endpoint_spec(p).ports,
            })
            .collect(),
    }
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

/// The pods of a scenario as the agent's API receives them (host-network pods are not
/// endpoints). A scenario with several nodes is explained as if one agent held every pod.
pub fn scenario_pods(plan: &Plan) -> Vec<PodInput> {
    plan.pods
        .iter()
        .filter(|p| !p.host_network)
        .map(|p| PodInput { namespace: p.namespace.clone(), name: p.name.clone(), spec: scenario_endpoint_spec(p) })
        .collect()
}

/// As [`scenario_state`], for the agent of node `node` of a scenario with several nodes: its
/// own pods as endpoints, the other nodes' pods as remote endpoints (their labels, as its
/// remote endpoints file gives them), its own address as host and the other nodes' as
/// remote node.
pub fn scenario_state_for_node(
    plan: &Plan,
    node: usize,
    policy_dir: Option<&Path>,
) -> Result<OfflineState, ScenarioStateError> {
    let files = match policy_dir {
        Some(dir) => read_policy_dir(dir)?,
        None => scenario_policy_files(plan)?.into_iter().map(|(n, t)| (n, t.into_bytes())).collect(),
    };
    let cluster = plan.cluster.as_deref().unwrap_or(DEFAULT_CLUSTER);
    let (local, remote): (Vec<PodInput>, Vec<PodInput>) = scenario_pods(plan).into_iter().partition(|input| {
        plan.pods.iter().any(|p| p.node == node && p.namespace == input.namespace && p.name == input.name)
    });
    Ok(OfflineState::build_with_remote(
        &plan.namespaces,
        &local,
        &remote,
        &scenario_reserved_entries_for_node(plan, node),
        &files,
        cluster,
    )?)
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
