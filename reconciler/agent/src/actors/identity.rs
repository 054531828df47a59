//! Identity cache actor: label set -> numeric identity with reference counts, the
//! addresses given reserved identities through the API (host, remote nodes, API server),
//! and the pods of other nodes (Kubernetes mode), whose addresses map to the identity of
//! their label set so traffic from them has an identity. Every change is pushed to the
//! resolver as a snapshot.
use std::net::IpAddr;
use std::sync::Arc;

use actix::prelude::*;
use palisade_policy::identity::IdentityAllocator;
use palisade_policy::labels::LabelSet;
use palisade_policy::resolve::NamedPort;

use super::resolver::{IdentitiesChanged, Resolver};
use crate::api::types::{IdentityInfo, ReservedEntity};
use crate::error::AgentError;

pub use palisade_node::ipcache::{
    ExternalIpcache, InvalidPrefix, Prefix, RemoteEndpoint, entity_identity, mask, parse_prefix,
};

pub struct IdentityCache {
    allocator: IdentityAllocator,
    ipcache: ExternalIpcache,
    /// Identities allocated or freed since the last publish: the resolver updates only
    /// what they touch.
    changed: Vec<u32>,
    resolver: Addr<Resolver>,
    state: Option<crate::state::StateDir>,
    /// Kvstore mode: new label sets get their numbers from etcd.
    kv: Option<Arc<crate::kvstore::Kv>>,
    /// Kvstore mode: the other nodes' addresses that the node registry made remote-node
    /// (not saved: they come back from etcd; an address the API set is the API's).
    kv_nodes: std::collections::BTreeSet<Prefix>,
}

impl IdentityCache {
    /// A cache holding one reference for each endpoint of the saved registry (with the
    /// number it had, so the pinned maps stay right) and the saved reserved prefixes.
    pub fn new(resolver: Addr<Resolver>, state: Option<crate::state::StateDir>) -> Self {
        let mut c = IdentityCache {
            allocator: IdentityAllocator::new(),
            ipcache: ExternalIpcache::default(),
            changed: Vec::new(),
            resolver,
            state,
            kv: None,
            kv_nodes: std::collections::BTreeSet::new(),
        };
        c.load_state();
        c
    }

    fn load_state(&mut self) {
        let Some(state) = &self.state else { return };
        match state.load_endpoints() {
            Ok(reg) => {
                for ep in &reg.endpoints {
                    let labels: LabelSet = ep.labels.iter().map(|l| palisade_policy::labels::Label::parse(l)).collect();
                    let id = self.allocator.allocate_as(&labels, ep.identity);
                    if id != ep.identity {
                        tracing::warn!(endpoint = %format!("{}/{}", ep.namespace, ep.name), saved = ep.identity, now = id, "saved identity not restorable");
                    }
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot read the endpoint registry for identities"),
        }
        match state.load_reserved() {
            Ok(saved) => {
                for r in saved.entries {
                    match parse_prefix(&r.cidr) {
                        Ok(prefix) => {
                            self.ipcache.upsert_reserved(prefix, entity_identity(r.entity));
                        }
                        Err(e) => tracing::error!(error = %e, "saved reserved prefix ignored"),
                    }
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot read the saved reserved prefixes"),
        }
    }

    fn save_reserved(&self, cidr: &str, entity: ReservedEntity) {
        let Some(state) = &self.state else { return };
        let mut saved = state.load_reserved().unwrap_or_default();
        saved.entries.retain(|e| parse_prefix(&e.cidr).ok() != parse_prefix(cidr).ok());
        saved.entries.push(crate::state::SavedReserved { cidr: cidr.to_string(), entity });
        if let Err(e) = state.save_reserved(&saved) {
            tracing::error!(error = %e, "saving the reserved prefixes failed");
        }
    }

    /// Takes a reference on the identity of `labels`, noting a new identity.
    fn allocate(&mut self, labels: &LabelSet) -> u32 {
        let known = self.allocator.lookup(labels).is_some();
        let id = self.allocator.allocate(labels);
        if !known {
            tracing::info!(identity = id, labels = %labels, "identity allocated");
            self.changed.push(id);
        }
        id
    }

    /// Takes a reference on the identity of `labels` with number `wanted` (the cluster's);
    /// answers the number it has here, which differs only when `wanted` is taken here by
    /// other labels or the labels have another number here already.
    fn allocate_as(&mut self, labels: &LabelSet, wanted: u32) -> u32 {
        let known = self.allocator.lookup(labels).is_some();
        let id = self.allocator.allocate_as(labels, wanted);
        if !known {
            tracing::info!(identity = id, labels = %labels, "identity allocated");
            self.changed.push(id);
        }
        id
    }

    /// Drops a reference, noting a freed identity; answers whether it was freed.
    fn release(&mut self, id: u32) -> bool {
        let freed = self.allocator.release(id);
        if freed {
            tracing::info!(identity = id, "identity released");
            self.changed.push(id);
        }
        freed
    }

    /// Sends the resolver a snapshot (label sets are shared, so the copy is cheap) and the
    /// identities changed since the last one.
    fn publish(&mut self) {
        self.resolver.do_send(IdentitiesChanged {
            allocator: Arc::new(self.allocator.clone()),
            ipcache: Arc::new(self.ipcache.entries()),
            pod_addresses: Arc::new(self.ipcache.pod_addresses()),
            remote_named_ports: Arc::new(self.ipcache.remote_named_ports()),
            changed: std::mem::take(&mut self.changed),
        });
    }
}

impl Actor for IdentityCache {
    type Context = Context<Self>;
    fn started(&mut self, _ctx: &mut Self::Context) {
        self.publish();
    }
}

/// After a panic: references and reserved prefixes come back from the state directory
/// (the endpoint registry holds one reference per local endpoint). Other nodes' pods
/// come back with the Kubernetes source's next changes.
impl Supervised for IdentityCache {
    fn restarting(&mut self, _: &mut Self::Context) {
        self.allocator = IdentityAllocator::new();
        self.ipcache = ExternalIpcache::default();
        self.kv_nodes.clear();
        self.load_state();
    }
}

/// Hands the identities and the external ipcache to the resolver again.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Republish;

impl Handler<Republish> for IdentityCache {
    type Result = ();
    fn handle(&mut self, _: Republish, _: &mut Self::Context) {
        self.publish();
    }
}

/// Uses the kvstore for new label sets from now on (kvstore mode).
#[derive(Message)]
#[rtype(result = "()")]
pub struct UseKvstore(pub Arc<crate::kvstore::Kv>);

impl Handler<UseKvstore> for IdentityCache {
    type Result = ();
    fn handle(&mut self, msg: UseKvstore, _: &mut Self::Context) {
        self.kv = Some(msg.0);
    }
}

/// Takes a reference on the identity of `labels`, allocating it if new. In kvstore mode a
/// label set this node does not hold yet gets its number from etcd; while etcd cannot be
/// reached that fails (fail closed: the pod is not registered).
#[derive(Message)]
#[rtype(result = "Result<u32, AgentError>")]
pub struct AllocateIdentity {
    pub labels: LabelSet,
}

impl Handler<AllocateIdentity> for IdentityCache {
    type Result = ResponseActFuture<Self, Result<u32, AgentError>>;
    fn handle(&mut self, msg: AllocateIdentity, _: &mut Self::Context) -> Self::Result {
        let kv = match &self.kv {
            Some(kv) if self.allocator.lookup(&msg.labels).is_none() => kv.clone(),
            _ => {
                let id = self.allocate(&msg.labels);
                if !self.changed.is_empty() {
                    self.publish();
                }
                return Box::pin(fut::ready(Ok(id)));
            }
        };
        let labels = msg.labels;
        let asked = labels.clone();
        Box::pin(async move { kv.allocate(&asked, None).await }.into_actor(self).map(move |res, act, _| {
            let wanted = res.map_err(|e| AgentError::Kvstore(e.to_string()))?;
            let id = act.allocate_as(&labels, wanted);
            if id != wanted {
                act.release(id);
                if !act.changed.is_empty() {
                    act.publish();
                }
                return Err(AgentError::Kvstore(format!(
                    "identity {wanted} of {labels} from etcd is held here by other labels (or the labels hold {id} here)"
                )));
            }
            if !act.changed.is_empty() {
                act.publish();
            }
            Ok(id)
        }))
    }
}

/// Drops a reference taken with [`AllocateIdentity`].
#[derive(Message)]
#[rtype(result = "()")]
pub struct ReleaseIdentity {
    pub id: u32,
}

impl Handler<ReleaseIdentity> for IdentityCache {
    type Result = ();
    fn handle(&mut self, msg: ReleaseIdentity, _: &mut Self::Context) {
        if self.release(msg.id) {
            self.publish();
        }
    }
}

/// Gives a prefix a reserved identity.
#[derive(Message)]
#[rtype(result = "Result<(), AgentError>")]
pub struct UpsertReservedPrefix {
    pub cidr: String,
    pub entity: ReservedEntity,
}

impl Handler<UpsertReservedPrefix> for IdentityCache {
    type Result = Result<(), AgentError>;
    fn handle(&mut self, msg: UpsertReservedPrefix, _: &mut Self::Context) -> Self::Result {
        let prefix = parse_prefix(&msg.cidr)?;
        let id = entity_identity(msg.entity);
        // Set through the API: the API's from now on, whatever the node registry says.
        self.kv_nodes.remove(&prefix);
        if self.ipcache.upsert_reserved(prefix, id) {
            self.save_reserved(&msg.cidr, msg.entity);
            self.publish();
        }
        Ok(())
    }
}

/// Kvstore mode: the other nodes' addresses in the node registry, all of them (level-based).
/// New ones get remote-node unless the address has a reserved identity already; those the
/// registry made remote-node and no longer lists (a node gone, its lease expired) lose it.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SetKvstoreNodes {
    pub addresses: std::collections::BTreeSet<IpAddr>,
}

impl Handler<SetKvstoreNodes> for IdentityCache {
    type Result = ();
    fn handle(&mut self, msg: SetKvstoreNodes, _: &mut Self::Context) {
        let want: std::collections::BTreeSet<Prefix> =
            msg.addresses.iter().map(|ip| (*ip, if ip.is_ipv4() { 32 } else { 128 })).collect();
        let mut changed = false;
        for p in &want {
            if !self.kv_nodes.contains(p) && self.ipcache.reserved(p).is_none() {
                self.ipcache.upsert_reserved(*p, palisade_common::identity::REMOTE_NODE);
                self.kv_nodes.insert(*p);
                tracing::info!(address = %p.0, "kvstore: node address is remote-node");
                changed = true;
            }
        }
        let gone: Vec<Prefix> = self.kv_nodes.iter().filter(|p| !want.contains(*p)).copied().collect();
        for p in gone {
            self.kv_nodes.remove(&p);
            if self.ipcache.reserved(&p) == Some(palisade_common::identity::REMOTE_NODE) {
                self.ipcache.remove_reserved(&p);
                tracing::info!(address = %p.0, "kvstore: node gone from the registry; its address is world again");
                changed = true;
            }
        }
        if changed {
            self.publish();
        }
    }
}

/// Adds or replaces a pod of another node (key e.g. `namespace/name`): takes a reference
/// on the identity of `labels` and maps `ips` to it. Answers the identity. With
/// `identity` (kvstore mode: the cluster's number) the labels get that number; if this
/// node cannot give it to them (taken here by other labels), nothing is mapped (the
/// addresses stay world) and the answer is 0.
#[derive(Message)]
#[rtype(result = "u32")]
pub struct UpsertRemoteEndpoint {
    pub key: String,
    pub labels: LabelSet,
    pub ips: Vec<IpAddr>,
    pub named_ports: Vec<NamedPort>,
    pub identity: Option<u32>,
}

impl Handler<UpsertRemoteEndpoint> for IdentityCache {
    type Result = u32;
    fn handle(&mut self, msg: UpsertRemoteEndpoint, _: &mut Self::Context) -> u32 {
        let mut ips = msg.ips;
        ips.sort();
        ips.dedup();
        let id = match msg.identity {
            None => self.allocate(&msg.labels),
            Some(wanted) => {
                let id = self.allocate_as(&msg.labels, wanted);
                if id != wanted {
                    tracing::error!(endpoint = %msg.key, identity = wanted, here = id, labels = %msg.labels, "remote endpoint's identity is held here by other labels; its addresses stay world");
                    self.release(id);
                    if !self.changed.is_empty() {
                        self.publish();
                    }
                    return 0;
                }
                id
            }
        };
        let mut named_ports = msg.named_ports;
        named_ports.sort();
        named_ports.dedup();
        let new = RemoteEndpoint { identity: id, ips, named_ports };
        let old = self.ipcache.upsert_remote(&msg.key, new.clone());
        let mut changed = old.as_ref() != Some(&new);
        if let Some(old) = old {
            changed |= self.release(old.identity);
        }
        if changed {
            tracing::debug!(endpoint = %msg.key, identity = id, "remote endpoint upserted");
            self.publish();
        }
        id
    }
}

/// Removes a pod of another node; answers whether it was known.
#[derive(Message)]
#[rtype(result = "bool")]
pub struct RemoveRemoteEndpoint {
    pub key: String,
}

impl Handler<RemoveRemoteEndpoint> for IdentityCache {
    type Result = bool;
    fn handle(&mut self, msg: RemoveRemoteEndpoint, _: &mut Self::Context) -> bool {
        let Some(old) = self.ipcache.remove_remote(&msg.key) else { return false };
        self.release(old.identity);
        tracing::debug!(endpoint = %msg.key, "remote endpoint removed");
        self.publish();
        true
    }
}

/// Every identity with its labels and references.
#[derive(Message)]
#[rtype(result = "Vec<IdentityInfo>")]
pub struct ListIdentities;

impl Handler<ListIdentities> for IdentityCache {
    type Result = MessageResult<ListIdentities>;
    fn handle(&mut self, _: ListIdentities, _: &mut Self::Context) -> Self::Result {
        MessageResult(
            self.allocator
                .iter()
                .map(|(id, labels, refs)| IdentityInfo {
                    id,
                    labels: labels.iter().map(std::string::ToString::to_string).collect(),
                    references: refs,
                })
                .collect(),
        )
    }
}
