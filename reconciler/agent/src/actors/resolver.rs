//! Resolver actor: holds the latest policies, local endpoints and identities, numbers
//! every change with a revision, and turns them into the desired state of every endpoint
//! (with palisade-policy's [`PolicyResolver`]), which it hands to the map writer.
//!
//! Every change is incremental (palisade-policy's engine): a policy that changes
//! recomputes the endpoints its old and new rules select; an endpoint that comes or changes
//! is computed alone; identities appearing or disappearing (pods elsewhere in the cluster,
//! CIDR identities) and pod addresses changing recompute only the entries of those
//! identities, on the endpoints whose selections they are in. Every other endpoint's policy
//! is handed on as the same shared value, so the map writer's plan holds exactly the
//! entries that changed.
//!
//! Bursts coalesce: every input marks the state dirty and one recompute runs after the
//! messages already queued, at once when the last one is [`BURST_INTERVAL`] past, else
//! when it will be (a change on its own is resolved at once; during a burst, such as a
//! node starting a thousand pods, the changes of each interval are resolved together).
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use palisade_policy::identity::IdentityAllocator;
use palisade_policy::model::Policy;
use palisade_policy::resolve::{Changes, DesiredState, EndpointPolicy, NamedPort, Options, PolicyResolver};

use super::identity::{Prefix, RemotePodName};
use super::map_writer::{ApplyDesired, MapWriter};
use crate::endpoint::LocalEndpoint;

/// The least time between two recomputes while changes keep coming.
pub const BURST_INTERVAL: Duration = Duration::from_millis(20);

/// A resolution's output: the desired state and the ipcache.
type Resolved = (Arc<DesiredState>, Arc<BTreeMap<Prefix, u32>>);

/// Cilium's `--policy-enforcement`: when endpoints are under default deny.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Enforcement {
    /// A direction is default-deny once a policy selects the endpoint for it.
    #[default]
    Default,
    /// Every endpoint is default-deny in both directions, selected or not (the node may
    /// still reach its pods, as with `default`).
    Always,
    /// Nothing is enforced (and nothing audited): every packet passes policy.
    Never,
}

impl std::str::FromStr for Enforcement {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "default" => Ok(Enforcement::Default),
            "always" => Ok(Enforcement::Always),
            "never" => Ok(Enforcement::Never),
            other => Err(format!("--policy-enforcement must be default, always or never, not {other:?}")),
        }
    }
}

/// How the agent enforces policy: the enforcement switch and agent-wide audit mode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyMode {
    pub enforcement: Enforcement,
    /// `--policy-audit-mode`: every endpoint is in audit mode (its policy drops become
    /// AUDIT passes).
    pub audit_all: bool,
}

/// The resolver's state without the actor: inputs, the incremental resolver, and what a
/// recompute hands on.
pub struct ResolverState {
    policies: Arc<Vec<Policy>>,
    endpoints: Arc<Vec<LocalEndpoint>>,
    allocator: Arc<IdentityAllocator>,
    /// Addresses that are not local pods: reserved prefixes and other nodes' pods.
    external_ipcache: Arc<BTreeMap<Prefix, u32>>,
    /// Other nodes' pods' addresses and their identities.
    remote_addresses: Arc<BTreeMap<IpAddr, u32>>,
    /// Other nodes' pods' names by address (for flow records; not resolved on).
    pub remote_names: Arc<BTreeMap<IpAddr, Arc<RemotePodName>>>,
    /// Identities allocated or freed since the last recompute.
    changed_identities: Vec<u32>,
    /// Endpoints set since the last recompute.
    endpoints_changed: bool,
    /// The enforced policies (those not in audit mode).
    engine: PolicyResolver,
    /// All policies, audited ones included: the audit view. Only while some policy is
    /// in audit mode (else the audit view is the enforced resolution).
    audit_engine: Option<PolicyResolver>,
    mode: PolicyMode,
    /// Per endpoint: the enforced and audit resolutions, whether the endpoint was in audit
    /// mode, and the policy made of them (so an unchanged endpoint keeps the same value).
    combined: HashMap<u16, CombinedEntry>,
}

type CombinedEntry = (Arc<EndpointPolicy>, Option<Arc<EndpointPolicy>>, bool, Arc<EndpointPolicy>);

impl Default for ResolverState {
    fn default() -> Self {
        ResolverState {
            policies: Arc::default(),
            endpoints: Arc::default(),
            allocator: Arc::new(IdentityAllocator::new()),
            external_ipcache: Arc::default(),
            remote_addresses: Arc::default(),
            remote_names: Arc::default(),
            changed_identities: Vec::new(),
            endpoints_changed: false,
            engine: PolicyResolver::new(Options { allow_localhost: true }),
            audit_engine: None,
            mode: PolicyMode::default(),
            combined: HashMap::new(),
        }
    }
}

impl ResolverState {
    pub fn new(mode: PolicyMode) -> Self {
        ResolverState { mode, ..ResolverState::default() }
    }

    /// All policies, audited ones included.
    pub fn set_policies(&mut self, policies: Arc<Vec<Policy>>) {
        if policies.iter().any(|p| p.audit) {
            let enforced: Vec<Policy> = policies.iter().filter(|p| !p.audit).cloned().collect();
            self.engine.set_policies_numbering(Arc::new(enforced), &policies);
            let audit = self.audit_engine.get_or_insert_with(|| {
                let mut r = PolicyResolver::new(Options { allow_localhost: true });
                r.set_endpoints(self.endpoints.iter().map(LocalEndpoint::view).collect());
                r
            });
            audit.set_policies(policies.clone());
            // Both resolutions name a prefix by the same identity (the ipcache has one).
            if audit.cidr_identities() != self.engine.cidr_identities() {
                audit.set_cidr_identities(self.engine.cidr_identities().clone());
            }
        } else {
            self.engine.set_policies(policies.clone());
            self.audit_engine = None;
        }
        self.policies = policies;
    }

    /// New local endpoints; the resolver sees them at the next recompute (so a burst of
    /// them is converted once).
    pub fn set_endpoints(&mut self, endpoints: Arc<Vec<LocalEndpoint>>) {
        self.endpoints = endpoints;
        self.endpoints_changed = true;
    }

    /// New identities and addresses; `changed`: the identities allocated or freed since
    /// the previous call.
    pub fn set_identities(
        &mut self,
        allocator: Arc<IdentityAllocator>,
        external_ipcache: Arc<BTreeMap<Prefix, u32>>,
        remote_addresses: Arc<BTreeMap<IpAddr, u32>>,
        changed: &[u32],
    ) {
        self.allocator = allocator;
        self.external_ipcache = external_ipcache;
        self.remote_addresses = remote_addresses;
        self.changed_identities.extend_from_slice(changed);
    }

    /// The other nodes' pods' named ports (by identity), for egress rules that name ports.
    pub fn set_remote_named_ports(&mut self, ports: &BTreeMap<u32, Vec<NamedPort>>) {
        self.engine.set_remote_named_ports(ports.clone());
    }

    /// Brings the desired state up to date (in full after policy or endpoint changes,
    /// incrementally otherwise); answers it with the ipcache and what changed.
    pub fn recompute(&mut self) -> (Arc<DesiredState>, Arc<BTreeMap<Prefix, u32>>, Changes) {
        if std::mem::take(&mut self.endpoints_changed) {
            let views: Vec<_> = self.endpoints.iter().map(LocalEndpoint::view).collect();
            if let Some(a) = &mut self.audit_engine {
                a.set_endpoints(views.clone());
            }
            self.engine.set_endpoints(views);
        }
        let addresses = crate::endpoint::pod_addresses(&self.endpoints, &self.remote_addresses);
        let changed = std::mem::take(&mut self.changed_identities);
        let bring_up_to_date = |engine: &mut PolicyResolver, addresses| {
            if engine.is_stale() {
                engine.set_identities(self.allocator.clone(), addresses);
                engine.resolve();
                Changes { full: true, ..Changes::default() }
            } else {
                engine.update(self.allocator.clone(), &changed, addresses)
            }
        };
        if let Some(a) = &mut self.audit_engine {
            bring_up_to_date(a, addresses.clone());
        }
        let changes = bring_up_to_date(&mut self.engine, addresses);
        // Cheap: one shared reference per endpoint.
        let mut desired = self.engine.state().clone();
        self.combine(&mut desired);
        // Later entries win on the same prefix: CIDR identities, then other nodes' pods and
        // reserved addresses (node, API server), then the local endpoints' own addresses,
        // then the address identities of pod addresses inside ipBlocks.
        let ipcache = crate::endpoint::assemble_ipcache(&desired, &self.external_ipcache, &self.endpoints);
        (Arc::new(desired), Arc::new(ipcache), changes)
    }
}

impl ResolverState {
    /// Puts the audit views and the enforcement switch into `desired` (the enforced
    /// resolution): an endpoint in audit mode (agent-wide, or by the audit label on its
    /// pod or namespace) enforces nothing and has the full resolution as its audit view;
    /// any other endpoint enforces the enforced policies and has the resolution of all
    /// policies as its audit view where that differs. Nothing here changes what an
    /// endpoint not in audit mode enforces, whatever the audited policies say.
    fn combine(&mut self, desired: &mut DesiredState) {
        let mode = self.mode;
        let plain = mode.enforcement == Enforcement::Default && !mode.audit_all && self.audit_engine.is_none();
        if plain && !self.endpoints.iter().any(|e| palisade_policy::resolve::endpoint_audited(&e.labels)) {
            self.combined.clear();
            return;
        }
        let empty = Arc::new(EndpointPolicy::default());
        let mut kept = HashMap::with_capacity(self.endpoints.len());
        for e in self.endpoints.iter() {
            let enforced = desired.endpoints.get(&e.id).cloned().unwrap_or_else(|| empty.clone());
            let audited = self.audit_engine.as_ref().and_then(|a| a.state().endpoints.get(&e.id).cloned());
            let endpoint_audit = mode.audit_all || palisade_policy::resolve::endpoint_audited(&e.labels);
            let combined = match self.combined.remove(&e.id) {
                Some((p, a, ea, c))
                    if Arc::ptr_eq(&p, &enforced)
                        && a.as_ref().map(Arc::as_ptr) == audited.as_ref().map(Arc::as_ptr)
                        && ea == endpoint_audit =>
                {
                    c
                }
                _ => Arc::new(combine_endpoint(mode, &enforced, audited.as_deref(), endpoint_audit)),
            };
            desired.endpoints.insert(e.id, combined.clone());
            kept.insert(e.id, (enforced, audited, endpoint_audit, combined));
        }
        self.combined = kept;
    }
}

/// One endpoint's policy: `enforced` (the enforced policies' resolution), `audited` (all
/// policies', when some are in audit mode), in audit mode itself or not, under `mode`.
pub fn combine_endpoint(
    mode: PolicyMode,
    enforced: &EndpointPolicy,
    audited: Option<&EndpointPolicy>,
    endpoint_audit: bool,
) -> EndpointPolicy {
    if mode.enforcement == Enforcement::Never {
        return EndpointPolicy::default();
    }
    let mut base = if endpoint_audit { EndpointPolicy::default() } else { enforced.clone() };
    let mut view = audited.unwrap_or(enforced).clone();
    view.audit = None;
    base.audit = None;
    if mode.enforcement == Enforcement::Always {
        for p in [&mut base, &mut view] {
            p.ingress_enforced = true;
            p.egress_enforced = true;
            palisade_policy::resolve::allow_localhost(p);
        }
    }
    if palisade_policy::Direction::BOTH.iter().any(|d| !view.same_in(&base, *d)) {
        base.audit = Some(Arc::new(view));
    }
    base
}

pub struct Resolver {
    state: ResolverState,
    revision: u64,
    dirty: bool,
    /// False until every source has handed in its state ([`SourcesSynced`]): until then
    /// nothing is sent to the map writer, so a starting (or restarted) agent never applies
    /// a partial view (say, no endpoints yet) over what the pinned maps enforce.
    synced: bool,
    /// What was last handed to the map writer (for explanations).
    last: Option<Resolved>,
    /// When the last recompute ran.
    last_recompute: Option<Instant>,
    map_writer: Addr<MapWriter>,
}

impl Resolver {
    pub fn new(map_writer: Addr<MapWriter>, mode: PolicyMode) -> Self {
        Resolver {
            state: ResolverState::new(mode),
            revision: 0,
            dirty: false,
            synced: false,
            last: None,
            last_recompute: None,
            map_writer,
        }
    }

    fn changed(&mut self, ctx: &mut Context<Self>) -> u64 {
        self.revision += 1;
        // Metrics hook (ops): when this revision was accepted (implementation delay).
        crate::metrics::global().change_accepted(self.revision);
        crate::revisions::accepted(self.revision);
        if !self.dirty {
            self.dirty = true;
            match self.last_recompute.map(|t| t.elapsed()) {
                Some(since) if since < BURST_INTERVAL => {
                    ctx.notify_later(Recompute, BURST_INTERVAL.checked_sub(since).unwrap());
                }
                _ => {
                    ctx.notify(Recompute);
                }
            }
        }
        self.revision
    }

    fn recompute(&mut self) {
        if !self.synced {
            return;
        }
        self.dirty = false;
        let started = Instant::now();
        self.last_recompute = Some(started);
        let (desired, ipcache, changes) = self.state.recompute();
        tracing::debug!(
            revision = self.revision,
            endpoints = self.state.endpoints.len(),
            policies = self.state.policies.len(),
            full = changes.full,
            identities_changed = changes.identities,
            endpoints_updated = changes.endpoints,
            entries_changed = changes.entries,
            elapsed_us = started.elapsed().as_micros() as u64,
            "resolved"
        );
        self.last = Some((desired.clone(), ipcache.clone()));
        self.map_writer.do_send(ApplyDesired {
            revision: self.revision,
            desired,
            endpoints: self.state.endpoints.clone(),
            ipcache,
            policies: self.state.policies.clone(),
            remote_names: self.state.remote_names.clone(),
        });
    }
}

impl Actor for Resolver {
    type Context = Context<Self>;
}

#[derive(Message)]
#[rtype(result = "()")]
struct Recompute;

impl Handler<Recompute> for Resolver {
    type Result = ();
    fn handle(&mut self, _: Recompute, _: &mut Context<Self>) {
        if self.dirty {
            self.recompute();
        }
    }
}

/// The accepted policies changed; answers the new revision.
#[derive(Message)]
#[rtype(result = "u64")]
pub struct PoliciesChanged {
    pub policies: Arc<Vec<Policy>>,
}

impl Handler<PoliciesChanged> for Resolver {
    type Result = u64;
    fn handle(&mut self, msg: PoliciesChanged, ctx: &mut Context<Self>) -> u64 {
        self.state.set_policies(msg.policies);
        self.changed(ctx)
    }
}

/// The local endpoints changed.
#[derive(Message)]
#[rtype(result = "u64")]
pub struct EndpointsChanged {
    pub endpoints: Arc<Vec<LocalEndpoint>>,
}

impl Handler<EndpointsChanged> for Resolver {
    type Result = u64;
    fn handle(&mut self, msg: EndpointsChanged, ctx: &mut Context<Self>) -> u64 {
        self.state.set_endpoints(msg.endpoints);
        self.changed(ctx)
    }
}

/// The identities, reserved prefixes or other nodes' pods changed.
#[derive(Message)]
#[rtype(result = "u64")]
pub struct IdentitiesChanged {
    pub allocator: Arc<IdentityAllocator>,
    /// ipcache entries of addresses that are not local pods.
    pub ipcache: Arc<BTreeMap<Prefix, u32>>,
    /// Other nodes' pods' addresses, with their identities.
    pub pod_addresses: Arc<BTreeMap<IpAddr, u32>>,
    /// Other nodes' pods' named ports, by identity.
    pub remote_named_ports: Arc<BTreeMap<u32, Vec<NamedPort>>>,
    /// Other nodes' pods' names, by address (handed on to flow records).
    pub remote_names: Arc<BTreeMap<IpAddr, Arc<RemotePodName>>>,
    /// The identities allocated or freed since the previous message.
    pub changed: Vec<u32>,
}

impl Handler<IdentitiesChanged> for Resolver {
    type Result = u64;
    fn handle(&mut self, msg: IdentitiesChanged, ctx: &mut Context<Self>) -> u64 {
        self.state.set_identities(msg.allocator, msg.ipcache, msg.pod_addresses, &msg.changed);
        self.state.set_remote_named_ports(&msg.remote_named_ports);
        self.state.remote_names = msg.remote_names;
        self.changed(ctx)
    }
}

/// Every source (policies, endpoints, identities) has handed in its state: from now on
/// changes reach the map writer. Answers the revision that includes all of it.
#[derive(Message)]
#[rtype(result = "u64")]
pub struct SourcesSynced;

impl Handler<SourcesSynced> for Resolver {
    type Result = u64;
    fn handle(&mut self, _: SourcesSynced, ctx: &mut Context<Self>) -> u64 {
        if !self.synced {
            tracing::info!(revision = self.revision + 1, "sources synced; applying the desired state");
        }
        self.synced = true;
        let rev = self.changed(ctx);
        // Changes held back while not synced left the state dirty without a recompute queued.
        ctx.notify(Recompute);
        rev
    }
}

/// Closes the gate again until the next [`SourcesSynced`] (a resync starts with this, so
/// that a source handing in its state again never lets a partial view through).
#[derive(Message)]
#[rtype(result = "()")]
pub struct HoldUntilSynced;

impl Handler<HoldUntilSynced> for Resolver {
    type Result = ();
    fn handle(&mut self, _: HoldUntilSynced, _: &mut Context<Self>) {
        self.synced = false;
    }
}

/// Whether [`SourcesSynced`] was received (since the last restart).
#[derive(Message)]
#[rtype(result = "bool")]
pub struct IsSynced;

impl Handler<IsSynced> for Resolver {
    type Result = bool;
    fn handle(&mut self, _: IsSynced, _: &mut Context<Self>) -> bool {
        self.synced
    }
}

/// After a panic: forget every input (the resync that follows hands them in again) and
/// hold the map writer back until then. The revision only grows.
impl Supervised for Resolver {
    fn restarting(&mut self, _: &mut Context<Self>) {
        *self = Resolver { revision: self.revision, ..Resolver::new(self.map_writer.clone(), self.state.mode) };
    }
}

/// The current revision.
#[derive(Message)]
#[rtype(result = "u64")]
pub struct CurrentRevision;

impl Handler<CurrentRevision> for Resolver {
    type Result = u64;
    fn handle(&mut self, _: CurrentRevision, _: &mut Context<Self>) -> u64 {
        self.revision
    }
}

/// Explains a flow against the current state.
#[derive(Message)]
#[rtype(result = "Result<crate::api::types::Explanation, String>")]
pub struct Explain {
    pub request: crate::api::types::ExplainRequest,
    pub cluster: String,
}

impl Handler<Explain> for Resolver {
    type Result = Result<crate::api::types::Explanation, String>;
    fn handle(&mut self, msg: Explain, _: &mut Context<Self>) -> Self::Result {
        if self.dirty {
            self.recompute();
        }
        let empty = BTreeMap::new();
        // What is enforced: audited policies only report (the desired state explained
        // holds their audit views apart).
        let enforced: Vec<Policy> = self.state.policies.iter().filter(|p| !p.audit).cloned().collect();
        let inputs = crate::explain::ExplainInputs {
            policies: &enforced,
            endpoints: &self.state.endpoints,
            allocator: &self.state.allocator,
            cidrs: self.state.engine.cidr_identities(),
            desired: self.last.as_ref().map(|(d, _)| d.as_ref()),
            ipcache: self.last.as_ref().map_or(&empty, |(_, i)| i.as_ref()),
            cluster: &msg.cluster,
        };
        crate::explain::explain(&msg.request, &inputs)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::net::IpAddr;
    use std::sync::Arc;

    use palisade_policy::identity::IdentityAllocator;
    use palisade_policy::labels::LabelSet;
    use palisade_policy::synth::accepted_policies;

    use super::ResolverState;
    use crate::endpoint::LocalEndpoint;
    use crate::mapstate::{CookieJar, EndpointMapping, encode, plan};

    fn pod(app: &str, version: &str) -> LabelSet {
        let labels = BTreeMap::from([("app".to_owned(), app.to_owned()), ("version".to_owned(), version.to_owned())]);
        let ns = BTreeMap::from([("kubernetes.io/metadata.name".to_owned(), "shop".to_owned())]);
        LabelSet::for_pod("shop", &ns, &labels, "default", "default")
    }

    fn endpoint(id: u16, labels: LabelSet, identity: u32) -> LocalEndpoint {
        LocalEndpoint {
            id,
            namespace: "shop".into(),
            name: format!("pod-{id}"),
            labels,
            identity,
            ipv4: Some([10, 0, 0, id as u8].into()),
            ipv6: None,
            interface: format!("veth{id}"),
            ifindex: 100 + u32::from(id),
            named_ports: Vec::new(),
        }
    }

    /// A pod with a new identity appears on another node: the resolver recomputes only
    /// the entries for it, the endpoints it does not concern keep the very same policy
    /// value, and the map writer's plan from the previous state to the new one holds
    /// exactly the changed policy entries (plus the prefix lengths of the new identity
    /// and its ipcache entry).
    #[test]
    fn a_new_identity_elsewhere_changes_only_its_entries() {
        let yaml = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: backend, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: backend}}
  ingress:
    - fromEndpoints: [{matchLabels: {app: frontend}}]
      toPorts: [{ports: [{port: "8080", protocol: TCP}, {port: "9090", protocol: TCP}]}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: other, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: other}}
  ingress:
    - fromEndpoints: [{matchLabels: {app: other}}]
"#;
        let policies = accepted_policies(yaml, "t.yaml");
        let mut allocator = IdentityAllocator::new();
        let endpoints: Vec<LocalEndpoint> = [("frontend", 1), ("backend", 2), ("other", 3)]
            .into_iter()
            .map(|(app, id)| {
                let labels = pod(app, "v1");
                let identity = allocator.allocate(&labels);
                endpoint(id, labels, identity)
            })
            .collect();
        let mut state = ResolverState::default();
        state.set_policies(Arc::new(policies));
        state.set_endpoints(Arc::new(endpoints.clone()));
        state.set_identities(Arc::new(allocator.clone()), Arc::default(), Arc::default(), &[]);
        let (before, ipcache_before, changes) = state.recompute();
        assert!(changes.full);

        // frontend v2 appears elsewhere.
        let remote_ip: IpAddr = "10.9.0.7".parse().unwrap();
        let id = allocator.allocate(&pod("frontend", "v2"));
        let external = Arc::new(BTreeMap::from([((remote_ip, 32), id)]));
        let remote = Arc::new(BTreeMap::from([(remote_ip, id)]));
        state.set_identities(Arc::new(allocator.clone()), external, remote, &[id]);
        let (after, ipcache_after, changes) = state.recompute();
        assert!(!changes.full, "an identity change is incremental");
        assert_eq!((changes.identities, changes.endpoints, changes.entries), (1, 1, 2), "backend: 8080 and 9090");
        assert!(Arc::ptr_eq(&before.endpoints[&1], &after.endpoints[&1]), "frontend's policy is the same value");
        assert!(Arc::ptr_eq(&before.endpoints[&3], &after.endpoints[&3]), "other's policy is the same value");

        let mappings: Vec<EndpointMapping> = endpoints
            .iter()
            .map(|e| EndpointMapping { id: e.id, ifindex: e.ifindex, identity: e.identity, ipv4: e.ipv4, ipv6: e.ipv6 })
            .collect();
        let mut cookies = CookieJar::default();
        let loaded = encode(&before, &mappings, &ipcache_before, &mut cookies);
        let desired = encode(&after, &mappings, &ipcache_after, &mut cookies);
        let p = plan(&desired, &loaded);
        assert_eq!(p.policy.len(), changes.entries, "{:?}", p.describe());
        assert_eq!(p.policy.adds.len(), 2);
        assert_eq!(p.policy_lengths.len(), 1, "one new (endpoint, direction, identity)");
        assert_eq!(p.ipcache_host_v4.len(), 1, "the new pod's address");
        assert_eq!(p.len(), 4, "nothing else: {:?}", p.describe());

        // It goes away again: the same entries go.
        assert!(allocator.release(id));
        state.set_identities(Arc::new(allocator), Arc::default(), Arc::default(), &[id]);
        let (gone, ipcache_gone, changes) = state.recompute();
        assert_eq!((changes.full, changes.entries), (false, 2));
        let p = plan(&encode(&gone, &mappings, &ipcache_gone, &mut cookies), &desired);
        assert_eq!((p.policy.deletes.len(), p.len()), (2, 4), "{:?}", p.describe());
        assert_eq!(*gone.endpoints[&2], *before.endpoints[&2]);
    }

    const ENFORCED: &str = r"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: backend, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: backend}}
  ingress:
    - fromEndpoints: [{matchLabels: {app: frontend}}]
";

    const AUDITED: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: trial, namespace: shop, annotations: {palisade.io/audit: "true"}}
spec:
  endpointSelector: {matchLabels: {app: backend}}
  ingressDeny:
    - fromEndpoints: [{matchLabels: {app: frontend}}]
      toPorts: [{ports: [{port: "9090", protocol: TCP}]}]
  egress:
    - toEndpoints: [{matchLabels: {app: frontend}}]
"#;

    fn resolved(
        policies: &str,
        mode: super::PolicyMode,
        labels: &[LabelSet],
    ) -> std::collections::BTreeMap<u16, Arc<palisade_policy::resolve::EndpointPolicy>> {
        let mut allocator = IdentityAllocator::new();
        let endpoints: Vec<LocalEndpoint> = labels
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let identity = allocator.allocate(l);
                endpoint(u16::try_from(i + 1).unwrap(), l.clone(), identity)
            })
            .collect();
        let mut state = ResolverState::new(mode);
        state.set_policies(Arc::new(accepted_policies(policies, "t.yaml")));
        state.set_endpoints(Arc::new(endpoints));
        state.set_identities(Arc::new(allocator), Arc::default(), Arc::default(), &[]);
        state.recompute().0.endpoints.clone()
    }

    /// What is enforced with an audited policy is what is enforced without it; the audit
    /// view is all policies' resolution, kept only where it differs (the directions the
    /// datapath looks up twice).
    #[test]
    fn an_audited_policy_changes_nothing_enforced_and_is_the_audit_view() {
        use palisade_policy::Direction;
        let pods = [pod("frontend", "v1"), pod("backend", "v1")];
        let mode = super::PolicyMode::default();
        let without = resolved(ENFORCED, mode, &pods);
        let with = resolved(&format!("{ENFORCED}---{AUDITED}"), mode, &pods);
        for id in [1, 2] {
            assert!(with[&id].same_in(&without[&id], Direction::Ingress), "endpoint {id} ingress");
            assert!(with[&id].same_in(&without[&id], Direction::Egress), "endpoint {id} egress");
        }
        assert!(with[&1].audit.is_none(), "frontend: nothing audited selects it");
        let view = with[&2].audit.as_ref().expect("backend has an audit view");
        assert!(view.egress_enforced && !with[&2].egress_enforced, "the audited egress rule would isolate");
        assert!(view.entries.values().any(|v| v.deny), "the audited deny rule");
        assert_eq!(with[&2].audited_directions().collect::<Vec<_>>(), vec![Direction::Ingress, Direction::Egress]);
        // The same policy enforced: what the audit view said.
        let enforced = resolved(&format!("{ENFORCED}---{}", AUDITED.replace("\"true\"", "\"false\"")), mode, &pods);
        assert!(enforced[&2].same_in(view, Direction::Ingress) && enforced[&2].same_in(view, Direction::Egress));
    }

    /// Endpoint audit (agent-wide or by label) enforces nothing and audits everything;
    /// `always` isolates every endpoint; `never` enforces and audits nothing.
    #[test]
    fn endpoint_audit_and_the_enforcement_switch() {
        use super::{Enforcement, PolicyMode};
        let labelled = {
            let labels = BTreeMap::from([
                ("app".to_owned(), "backend".to_owned()),
                ("palisade.io/audit".to_owned(), "true".to_owned()),
            ]);
            let ns = BTreeMap::from([("kubernetes.io/metadata.name".to_owned(), "shop".to_owned())]);
            LabelSet::for_pod("shop", &ns, &labels, "default", "default")
        };
        let pods = [pod("frontend", "v1"), labelled];
        let by_label = resolved(ENFORCED, PolicyMode::default(), &pods);
        assert!(!by_label[&2].ingress_enforced && by_label[&2].entries.is_empty(), "the labelled pod enforces nothing");
        assert!(by_label[&2].audit.as_ref().is_some_and(|v| v.ingress_enforced), "... and audits its policy");

        let plain = [pod("frontend", "v1"), pod("backend", "v1")];
        let all = resolved(ENFORCED, PolicyMode { audit_all: true, ..PolicyMode::default() }, &plain);
        assert!(all.values().all(|p| !p.ingress_enforced && !p.egress_enforced));
        assert!(all[&2].audit.is_some() && all[&1].audit.is_none(), "only what a policy selects has a view");

        let always =
            resolved(ENFORCED, PolicyMode { enforcement: Enforcement::Always, ..PolicyMode::default() }, &plain);
        assert!(always.values().all(|p| p.ingress_enforced && p.egress_enforced && p.audit.is_none()));
        assert!(always[&1].entries.keys().any(|k| k.identity == palisade_common::identity::HOST), "allow-localhost");

        let never = resolved(
            &format!("{ENFORCED}---{AUDITED}"),
            PolicyMode { enforcement: Enforcement::Never, audit_all: true },
            &plain,
        );
        assert!(never.values().all(|p| **p == palisade_policy::resolve::EndpointPolicy::default()));
        assert_eq!(
            "sometimes".parse::<Enforcement>().unwrap_err(),
            "--policy-enforcement must be default, always or never, not \"sometimes\""
        );
    }
}
