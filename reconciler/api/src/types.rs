//! Request and response bodies of the agent's local API (JSON over HTTP/1.1 on a unix
//! socket). The CLI, the CNI plugin and the testbed all use these types.
//!
//! Routes (all under `/v1`):
//!
//! | method | path | body | answer |
//! |---|---|---|---|
//! | GET | `/v1/status` | | [`Status`] |
//! | PUT | `/v1/namespaces/{name}` | [`NamespaceSpec`] | [`Ack`] |
//! | PUT | `/v1/endpoints/{namespace}/{name}` | [`EndpointSpec`] | [`EndpointStatus`] |
//! | DELETE | `/v1/endpoints/{namespace}/{name}` | | [`Ack`] |
//! | GET | `/v1/endpoints` | | `Vec<`[`EndpointStatus`]`>` |
//! | PUT | `/v1/ipcache` | [`IpcacheEntrySpec`] | [`Ack`] |
//! | GET | `/v1/ipcache` | | `Vec<`[`IpcacheEntry`]`>`, read back from the kernel maps |
//! | GET | `/v1/bpf/policy?endpoint=NS/NAME\|ID` | | [`BpfPolicy`], read back from the kernel maps |
//! | GET | `/v1/identities` | | `Vec<`[`IdentityInfo`]`>` |
//! | GET | `/v1/policies` | | `Vec<`[`PolicyStatus`]`>` |
//! | POST | `/v1/policies/rescan` | | [`Ack`] with the revision that includes the directory as it is now |
//! | GET | `/v1/wait?revision=N&timeout_ms=M` | | [`Status`] once every endpoint realized N (408 on timeout) |
//! | GET | `/v1/monitor` | | a stream of [`MonitorEvent`], one JSON document per line |
//! | POST | `/v1/explain` | [`ExplainRequest`] | [`Explanation`] |
//! | POST | `/v1/flows` | [`FlowQuery`](crate::flow::FlowQuery) | a stream of [`FlowsResponse`](crate::flow::FlowsResponse), one JSON document per line |
//!
//! Errors come back as a non-2xx status with an [`ApiError`] body.
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};

/// Labels of a namespace (as `kubectl get ns -o yaml` shows them).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NamespaceSpec {
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// A named container port of a pod.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PortSpec {
    pub name: String,
    pub port: u16,
    /// `TCP`, `UDP` or `SCTP`.
    pub protocol: String,
}

/// What a CNI plugin (or the testbed) tells the agent about a pod on this node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EndpointSpec {
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default = "default_service_account")]
    pub service_account: String,
    #[serde(default)]
    pub ipv4: Option<Ipv4Addr>,
    #[serde(default)]
    pub ipv6: Option<Ipv6Addr>,
    /// Host-side interface name (the veth peer in the node's namespace).
    pub interface: String,
    /// Named ports (for policies that name a port).
    #[serde(default)]
    pub ports: Vec<PortSpec>,
}

fn default_service_account() -> String {
    "default".into()
}

/// An endpoint as the agent holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointStatus {
    pub id: u16,
    pub namespace: String,
    pub name: String,
    pub identity: u32,
    /// Security labels (`source:key=value`) the identity stands for.
    pub security_labels: Vec<String>,
    pub ipv4: Option<Ipv4Addr>,
    pub ipv6: Option<Ipv6Addr>,
    pub interface: String,
    pub ifindex: u32,
    pub ingress_enforced: bool,
    pub egress_enforced: bool,
    /// Revision realized in the kernel for this endpoint.
    pub realized_revision: u64,
    /// Policy entries loaded for this endpoint.
    pub policy_entries: usize,
    /// Directions (`ingress`, `egress`) that deny everything because their policy entries
    /// do not fit in the maps (see `mapErrors` in [`Status`]).
    #[serde(default)]
    pub fail_closed: Vec<String>,
}

/// Reserved identities an address can be given through the API.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReservedEntity {
    Host,
    RemoteNode,
    KubeApiserver,
    Health,
    Ingress,
}

/// Gives an address or prefix outside this node's pods a reserved identity.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IpcacheEntrySpec {
    /// An address (`10.0.0.1`) or prefix (`10.0.0.0/24`).
    pub cidr: String,
    pub entity: ReservedEntity,
}

/// The pods of other nodes, with their labels, for an agent that shares no store with them
/// (a cluster in file mode): the file `palisade-agent --remote-endpoints FILE` watches
/// (JSON). Each pod's address gets the identity of its label set, derived exactly as for
/// a local pod, so a policy selects it by labels on every node. The kvstore (etcd) mode
/// replaces this file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RemoteEndpoints {
    /// The labels of the namespaces the pods are in.
    #[serde(default)]
    pub namespaces: BTreeMap<String, BTreeMap<String, String>>,
    #[serde(default)]
    pub pods: Vec<RemotePod>,
}

/// A pod of another node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RemotePod {
    pub namespace: String,
    pub name: String,
    /// The node it runs on (for people reading the file).
    #[serde(default)]
    pub node: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default = "default_service_account")]
    pub service_account: String,
    #[serde(default)]
    pub ipv4: Option<Ipv4Addr>,
    #[serde(default)]
    pub ipv6: Option<Ipv6Addr>,
    /// Its named container ports (egress rules naming a port resolve it on the destination).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortSpec>,
}

/// One identity and what it stands for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IdentityInfo {
    pub id: u32,
    pub labels: Vec<String>,
    pub references: u32,
}

/// Whether a manifest is enforced.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyStatus {
    /// File (or source) the manifest came from.
    pub source: String,
    pub kind: String,
    pub namespace: Option<String>,
    pub name: String,
    /// `true` when accepted and part of the policy repository.
    pub enforced: bool,
    /// Why it was rejected (kind, name, field path, reason), when it was.
    pub error: Option<String>,
    /// Parts of the manifest that are accepted but not enforced (L7 rules...).
    #[serde(default)]
    pub warnings: Vec<String>,
    /// The revision at which this manifest last changed.
    pub revision: u64,
    /// In audit mode (annotation `palisade.io/audit: "true"`): accepted and resolved, but
    /// only reported on (AUDIT flows), never enforced.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub audit: bool,
}

/// The agent as a whole.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    /// Current revision of the desired state: increases with every accepted change of
    /// policies, endpoints or identities.
    pub revision: u64,
    /// Lowest revision realized in the kernel over all endpoints (equals `revision` when
    /// everything is loaded).
    pub realized_revision: u64,
    pub endpoints: usize,
    pub identities: usize,
    pub policies: usize,
    pub rejected_policies: usize,
    /// "tcx" or "clsact".
    pub attach_mode: String,
    pub bpffs: String,
    pub warnings: Vec<String>,
    /// When `revision` was accepted (ms since the Unix epoch; 0: none yet).
    #[serde(default)]
    pub revision_accepted_unix_ms: u64,
    /// When `realized_revision` was accepted and when it was realized in the kernel (ms
    /// since the Unix epoch): their difference is that revision's policy-to-kernel latency.
    #[serde(default)]
    pub realized_revision_accepted_unix_ms: u64,
    #[serde(default)]
    pub realized_revision_unix_ms: u64,
    /// What does not fit in the eBPF maps (which map, entries needed and available, who
    /// fails closed, what to do); empty when everything fits.
    #[serde(default)]
    pub map_errors: Vec<String>,
    /// Map writer counters since the agent started.
    #[serde(default)]
    pub datapath_counters: DatapathCounters,
    /// The kvstore connection (`--kvstore`); absent without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kvstore: Option<KvstoreStatus>,
}

/// The kvstore connection of an agent in kvstore mode: how it stands, what it published
/// and learnt, and its counters since the agent started.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KvstoreStatus {
    /// "etcd".
    pub backend: String,
    pub endpoints: Vec<String>,
    pub cluster: String,
    pub node: String,
    /// "ok" (etcd answers, a lease is held), "failing" (the last request got no answer:
    /// see `lastError`, `failingSinceUnixMs`), "no-lease" (answers, no lease yet) or
    /// "connecting" (no request answered yet).
    pub state: String,
    /// The lease this node's keys live under (0: none).
    pub lease_id: i64,
    pub lease_ttl_seconds: u64,
    /// When etcd last answered, and since when it has not (0: never / it does).
    pub last_ok_unix_ms: u64,
    pub failing_since_unix_ms: u64,
    /// The latest failure, also when past (`state` says whether it still holds).
    pub last_error: Option<String>,
    /// etcd requests answered and failed.
    pub operations: u64,
    pub failed_operations: u64,
    pub lease_grants: u64,
    pub leases_lost: u64,
    /// Complete lists of the store (at start and after each broken watch).
    pub store_lists: u64,
    /// The store revision the watcher has seen up to.
    pub watch_revision: i64,
    pub watch_events: u64,
    /// Cluster-wide identity allocations answered, and attempts another node won first.
    pub allocations: u64,
    pub lost_races: u64,
    /// Label sets this node holds a per-node key for, and its pod addresses published.
    pub published_identities: usize,
    pub published_addresses: usize,
    /// Label sets whose number etcd gives other labels: their pods are not published.
    pub conflicted_identities: usize,
    /// Other nodes' pod addresses and node addresses this agent knows.
    pub remote_addresses: usize,
    pub remote_nodes: usize,
}

/// Counters of the map writer, monotonic since the agent started.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DatapathCounters {
    /// Periodic full compares of the kernel maps with what the agent applied.
    pub drift_checks: u64,
    /// Map operations made to undo changes made to the maps behind the agent's back.
    pub drift_repairs: u64,
    /// Applies whose desired state did not fit in a map (see `mapErrors`).
    pub map_overflows: u64,
    /// Applies that failed and were retried.
    pub apply_failures: u64,
}

/// A decoded verdict event from the datapath.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MonitorEvent {
    /// Nanoseconds, `CLOCK_MONOTONIC`.
    pub ts_ns: u64,
    pub endpoint_id: u32,
    /// `namespace/name` of the endpoint, when known.
    pub endpoint: Option<String>,
    /// "ingress" or "egress" (the endpoint's point of view).
    pub direction: String,
    /// "allow" or "drop".
    pub verdict: String,
    /// Reason name, e.g. "policy-denied".
    pub reason: String,
    /// "L3-only", "L3-L4", "L4-only", "all" or "none".
    pub match_kind: String,
    pub src: String,
    pub dst: String,
    pub src_port: u16,
    pub dst_port: u16,
    /// "TCP", "UDP", "SCTP", "ICMP", "ICMPv6" or the number.
    pub protocol: String,
    pub peer_identity: u32,
    /// Policies whose rules produced the deciding entry (`Kind/namespace/name`).
    #[serde(default)]
    pub policies: Vec<String>,
}

/// Empty success answer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// Revision of the desired state after the call (see [`Status::revision`]).
    pub revision: u64,
}

/// Error answer body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    pub error: String,
}

/// A flow to explain. `from` and `to` are each a pod (`namespace/name`), an address, or a
/// label set (`namespace:key=value,key=value`; a pod that may not exist yet).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExplainRequest {
    pub from: String,
    pub to: String,
    /// Destination port; for ICMP the type (default 8, echo request).
    #[serde(default)]
    pub port: Option<u16>,
    /// `TCP`, `UDP`, `SCTP`, `ICMP` or ICMPv6.
    pub protocol: String,
}

/// One side's decision.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SideDecision {
    /// The endpoint whose policy decides this side (`namespace/name`), if it is local.
    pub endpoint: Option<String>,
    /// `allowed`, `denied`, `default-deny`, `not-selected`, `not-local`, or `fail-closed`
    /// (the endpoint's entries do not fit in the maps: it denies everything).
    pub decision: String,
    /// The policy entry that decided, e.g. `ingress from 256 TCP/8080`.
    pub entry: Option<String>,
    /// The rules behind that entry: `Kind namespace/name spec.ingress[0]`.
    pub rules: Vec<String>,
    /// When `ClusterNetworkPolicies` (or v1alpha1 admin policies) are in force: how the
    /// tiers decided this side, one line per step (Pass hops first, then the tier that
    /// decided, with its priority and rule).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tiers: Vec<String>,
    /// For `default-deny`: the policies (`Kind namespace/name`) that select the endpoint
    /// for this direction and so put it into default deny.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub default_deny_by: Vec<String>,
    /// For `default-deny`: the allow rule of those policies that came nearest to allowing
    /// the flow and what the flow lacks for it (see `palisade_policy::explain::Nearest`),
    /// e.g. `CiliumNetworkPolicy default/p spec.ingress[0], which the flow misses by: port
    /// 8080/TCP`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nearest_rule: Option<String>,
}

/// Why a flow passes or not: the source's egress and the destination's ingress.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Explanation {
    pub from: String,
    pub to: String,
    pub protocol: String,
    pub port: u16,
    pub from_identity: u32,
    pub to_identity: u32,
    pub egress: SideDecision,
    pub ingress: SideDecision,
    /// `allow` when both sides pass, else `deny`.
    pub verdict: String,
}

/// One entry of the kernel's ipcache (address or prefix -> identity), as read back from
/// the maps.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IpcacheEntry {
    /// `10.200.1.11/32`, `10.0.0.0/8`, `fd00::1/128`.
    pub prefix: String,
    pub identity: u32,
    /// The identity's labels (empty when the agent does not know the identity).
    pub labels: Vec<String>,
    /// The local pod (`namespace/name`) whose address this is, if one is.
    pub endpoint: Option<String>,
}

/// What the kernel's POLICY map holds for one endpoint, decoded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BpfPolicy {
    /// `namespace/name`.
    pub endpoint: String,
    pub endpoint_id: u16,
    pub identity: u32,
    /// Host-side interface index the ENDPOINTS map has the endpoint under (0 when it has
    /// no entry: the programs then pass its traffic unenforced).
    pub ifindex: u32,
    /// Enforcement flags of the kernel's ENDPOINTS entry.
    pub ingress_enforced: bool,
    pub egress_enforced: bool,
    pub entries: Vec<BpfPolicyEntry>,
}

/// One POLICY map entry, decoded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BpfPolicyEntry {
    /// `ingress` or `egress`.
    pub direction: String,
    /// Peer identity; 0 = any peer.
    pub identity: u32,
    /// The peer identity's labels (`["any"]` for 0).
    pub labels: Vec<String>,
    /// `ANY` (every protocol), `TCP`, `UDP`, `SCTP`, `ICMP`, ICMPv6.
    pub protocol: String,
    /// `any`, a port (`8080`), a range (`8000-8003`); for ICMP the type.
    pub port: String,
    /// `allow` or `deny`.
    pub action: String,
    /// The entry's prefix length in the map (64..=88).
    pub prefix_len: u8,
    /// Attribution number the datapath reports in verdict events.
    pub cookie: u32,
    /// The policies behind the entry (`Kind namespace/name`), or the built-in entry's name.
    pub policies: Vec<String>,
    /// The rules behind the entry (`Kind namespace/name spec.ingress[0]`).
    pub rules: Vec<String>,
    /// An entry of the audit view (audit mode): looked up only to report AUDIT verdicts,
    /// never enforced.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub audit_view: bool,
    /// False if `POLICY_LENGTHS` does not list the entry's length: the datapath would never
    /// look it up (a bug or a half-written update).
    pub probed: bool,
}
