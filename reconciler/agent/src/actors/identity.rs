//! Identity cache actor: label set -> numeric identity with reference counts, the
//! addresses given reserved identities through the API (host, remote nodes, API server),
//! and the pods of other nodes (Kubernetes mode), whose addresses map to the identity of
//! their label set so traffic from them has an identity. Every change is pushed to the
//! resolver as a snapshot.
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use actix::prelude::*;
use palisade_common::identity as reserved;
use palisade_policy::identity::IdentityAllocator;
use palisade_policy::labels::LabelSet;

use super::resolver::{IdentitiesChanged, Resolver};
use crate::api::types::{IdentityInfo, ReservedEntity};
use crate::error::AgentError;

/// An IP prefix: (address, prefix length).
pub type Prefix = (IpAddr, u8);

/// Parses `10.0.0.1` or `10.0.0.0/24` (host bits must be zero).
pub fn parse_prefix(s: &str) -> Result<Prefix, AgentError> {
    let bad = |reason: String| AgentError::InvalidCidr { cidr: s.to_string(), reason };
    let (addr, len) = match s.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (s, None),
    };
    let addr: IpAddr = addr.parse().map_err(|_| bad("not an IPv4 or IPv6 address".into()))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let len = match len {
        None => max,
        Some(l) => {
            l.parse::<u8>().ok().filter(|l| *l <= max).ok_or_else(|| bad(format!("prefix length must be 0..={max}")))?
        }
    };
    let masked = mask(addr, len);
    if masked != addr {
        return Err(bad(format!("host bits are set; did you mean {masked}/{len}?")));
    }
    Ok((addr, len))
}

/// `addr` with the bits after `len` cleared.
pub fn mask(addr: IpAddr, len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let m = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            IpAddr::V4((u32::from(a) & m).into())
        }
        IpAddr::V6(a) => {
            let m = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            IpAddr::V6((u128::from(a) & m).into())
        }
    }
}

/// The reserved identity of an entity the API can give an address.
pub fn entity_identity(e: ReservedEntity) -> u32 {
    match e {
        ReservedEntity::Host => reserved::HOST,
        ReservedEntity::RemoteNode => reserved::REMOTE_NODE,
        ReservedEntity::KubeApiserver => reserved::KUBE_APISERVER,
        ReservedEntity::Health => reserved::HEALTH,
        ReservedEntity::Ingress => reserved::INGRESS,
    }
}

/// A pod of another node: its identity (one reference held) and its addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteEndpoint {
    pub identity: u32,
    pub ips: Vec<IpAddr>,
}

/// The ipcache entries for addresses that are not this node's pods: reserved prefixes and
/// the pods of other nodes. Plain state; the actor holds the identity references.
#[derive(Clone, Debug, Default)]
pub struct ExternalIpcache {
    reserved: BTreeMap<Prefix, u32>,
    remote: BTreeMap<String, RemoteEndpoint>,
}

impl ExternalIpcache {
    /// Sets a reserved prefix; true when it changed.
    pub fn upsert_reserved(&mut self, prefix: Prefix, identity: u32) -> bool {
        self.reserved.insert(prefix, identity) != Some(identity)
    }

    /// Sets a remote endpoint; answers the endpoint it replaced (whose identity reference
    /// is to be released).
    pub fn upsert_remote(&mut self, key: &str, ep: RemoteEndpoint) -> Option<RemoteEndpoint> {
        self.remote.insert(key.to_string(), ep)
    }

    /// Removes a remote endpoint; answers it.
    pub fn remove_remote(&mut self, key: &str) -> Option<RemoteEndpoint> {
        self.remote.remove(key)
    }

    pub fn remote(&self) -> &BTreeMap<String, RemoteEndpoint> {
        &self.remote
    }

    /// The remote pods' addresses with their identities, but those a reserved host entry
    /// takes (a host-network pod shares its node's address).
    pub fn pod_addresses(&self) -> BTreeMap<IpAddr, u32> {
        let mut out = BTreeMap::new();
        for ep in self.remote.values() {
            for ip in &ep.ips {
                let len = if ip.is_ipv4() { 32 } else { 128 };
                if !self.reserved.contains_key(&(*ip, len)) {
                    out.insert(*ip, ep.identity);
                }
            }
        }
        out
    }

    /// Host routes of remote pods, then reserved prefixes (which win on the same prefix:
    /// a host-network pod shares its node's address).
    pub fn entries(&self) -> BTreeMap<Prefix, u32> {
        let mut out = BTreeMap::new();
        for ep in self.remote.values() {
            for ip in &ep.ips {
                let len = if ip.is_ipv4() { 32 } else { 128 };
                out.insert((*ip, len), ep.identity);
            }
        }
        out.extend(self.reserved.iter().map(|(k, v)| (*k, *v)));
        out
    }
}

pub struct IdentityCache {
    allocator: IdentityAllocator,
    ipcache: ExternalIpcache,
    /// Identities allocated or freed since the last publish: the resolver updates only
    /// what they touch.
    changed: Vec<u32>,
    resolver: Addr<Resolver>,
    state: Option<crate::state::StateDir>,
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

/// Takes a reference on the identity of `labels`, allocating it if new.
#[derive(Message)]
#[rtype(result = "u32")]
pub struct AllocateIdentity {
    pub labels: LabelSet,
}

impl Handler<AllocateIdentity> for IdentityCache {
    type Result = u32;
    fn handle(&mut self, msg: AllocateIdentity, _: &mut Self::Context) -> u32 {
        let id = self.allocate(&msg.labels);
        if !self.changed.is_empty() {
            self.publish();
        }
        id
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
        if self.ipcache.upsert_reserved(prefix, id) {
            self.save_reserved(&msg.cidr, msg.entity);
            self.publish();
        }
        Ok(())
    }
}

/// Adds or replaces a pod of another node (key e.g. `namespace/name`): takes a reference
/// on the identity of `labels` and maps `ips` to it. Answers the identity.
#[derive(Message)]
#[rtype(result = "u32")]
pub struct UpsertRemoteEndpoint {
    pub key: String,
    pub labels: LabelSet,
    pub ips: Vec<IpAddr>,
}

impl Handler<UpsertRemoteEndpoint> for IdentityCache {
    type Result = u32;
    fn handle(&mut self, msg: UpsertRemoteEndpoint, _: &mut Self::Context) -> u32 {
        let mut ips = msg.ips;
        ips.sort();
        ips.dedup();
        let id = self.allocate(&msg.labels);
        let new = RemoteEndpoint { identity: id, ips };
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
                    labels: labels.iter().map(|l| l.to_string()).collect(),
                    references: refs,
                })
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_parse_and_reject_host_bits() {
        assert_eq!(parse_prefix("10.0.0.1").unwrap(), ("10.0.0.1".parse().unwrap(), 32));
        assert_eq!(parse_prefix("10.0.0.0/8").unwrap(), ("10.0.0.0".parse().unwrap(), 8));
        assert_eq!(parse_prefix("fd00::/64").unwrap(), ("fd00::".parse().unwrap(), 64));
        let e = parse_prefix("10.0.0.1/8").unwrap_err().to_string();
        assert!(e.contains("did you mean 10.0.0.0/8"), "{e}");
        assert!(parse_prefix("10.0.0.0/33").is_err());
        assert!(parse_prefix("nonsense").is_err());
    }

    #[test]
    fn remote_endpoints_map_their_addresses_and_reserved_prefixes_win() {
        let mut c = ExternalIpcache::default();
        let a: IpAddr = "10.1.0.5".parse().unwrap();
        let v6: IpAddr = "fd00::5".parse().unwrap();
        assert!(c.upsert_remote("shop/web", RemoteEndpoint { identity: 300, ips: vec![a, v6] }).is_none());
        let e = c.entries();
        assert_eq!(e.get(&(a, 32)), Some(&300));
        assert_eq!(e.get(&(v6, 128)), Some(&300));
        // A host-network pod shares the node address, which is reserved.
        assert!(c.upsert_reserved((a, 32), reserved::REMOTE_NODE));
        assert_eq!(c.entries().get(&(a, 32)), Some(&reserved::REMOTE_NODE));
        let old = c.upsert_remote("shop/web", RemoteEndpoint { identity: 301, ips: vec![v6] }).unwrap();
        assert_eq!(old.identity, 300);
        assert_eq!(c.entries().get(&(v6, 128)), Some(&301));
        assert_eq!(c.remove_remote("shop/web").unwrap().identity, 301);
        assert_eq!(c.entries().len(), 1);
        assert!(c.remove_remote("shop/web").is_none());
    }
}
