//! Endpoint tracker actor: the pods of this node (fed by the local API, which a CNI plugin
//! or the testbed calls), their namespaces' labels, and the identity each one holds.
//!
//! The registry is saved in the state directory after every change (atomically; the
//! registrations of a burst share one save, and each is answered once it is saved) and
//! restored when the agent starts, so endpoints survive restarts; entries whose interface
//! is gone by then are dropped. While running, the tracker checks every
//! [`crate::actors::AgentConfig::interface_check_interval`] that each endpoint's interface
//! still exists with the same index, and at once when netlink reports a link removed: one
//! that disappeared (a pod deleted abruptly, its network namespace gone) is removed like a
//! DELETE would, which releases its identity reference and removes its map entries.
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use palisade_policy::labels::LabelSet;
use palisade_policy::resolve::NamedPort;

use super::identity::{AllocateIdentity, IdentityCache, ReleaseIdentity};
use super::resolver::{EndpointsChanged, Resolver};
use crate::api::types::{EndpointSpec, NamespaceSpec};
use crate::endpoint::{LocalEndpoint, ifindex};
use crate::error::AgentError;
use crate::state::{EndpointRegistry, SavedEndpoint, StateDir};

pub struct EndpointTracker {
    cluster: String,
    namespaces: BTreeMap<String, BTreeMap<String, String>>,
    specs: BTreeMap<(String, String), EndpointSpec>,
    endpoints: BTreeMap<(String, String), LocalEndpoint>,
    identities: Addr<IdentityCache>,
    resolver: Addr<Resolver>,
    state: Option<StateDir>,
    interface_check: Duration,
    /// The netlink listener runs (started once; it outlives actor restarts).
    netlink: bool,
    /// Endpoint ids given to registrations still waiting for their identity.
    reserved: BTreeSet<u16>,
    /// Registrations waiting for the next save and publish of the registry ([`Flush`]):
    /// each gets the revision that includes it.
    flush_waiters: Vec<tokio::sync::oneshot::Sender<u64>>,
}

impl EndpointTracker {
    /// A tracker holding the endpoints of `registry` (whose identity references the
    /// identity cache took when it loaded the same registry), saving to `state`.
    pub fn new(
        cluster: String,
        identities: Addr<IdentityCache>,
        resolver: Addr<Resolver>,
        state: Option<StateDir>,
        registry: &EndpointRegistry,
        interface_check: Duration,
    ) -> Self {
        let mut t = EndpointTracker {
            cluster,
            namespaces: BTreeMap::new(),
            specs: BTreeMap::new(),
            endpoints: BTreeMap::new(),
            identities,
            resolver,
            state,
            interface_check,
            netlink: false,
            reserved: BTreeSet::new(),
            flush_waiters: Vec::new(),
        };
        t.load(registry);
        t
    }

    /// Takes the namespaces and endpoints of a saved registry.
    fn load(&mut self, reg: &EndpointRegistry) {
        self.namespaces = reg.namespaces.clone();
        self.specs.clear();
        self.endpoints.clear();
        for saved in &reg.endpoints {
            let named_ports =
                saved.spec.ports.iter().filter_map(|p| NamedPort::new(&p.name, p.port, &p.protocol).ok()).collect();
            let key = (saved.namespace.clone(), saved.name.clone());
            self.specs.insert(key.clone(), saved.spec.clone());
            self.endpoints.insert(
                key,
                LocalEndpoint {
                    id: saved.id,
                    namespace: saved.namespace.clone(),
                    name: saved.name.clone(),
                    labels: saved.labels.iter().map(|l| palisade_policy::labels::Label::parse(l)).collect(),
                    identity: saved.identity,
                    ipv4: saved.spec.ipv4,
                    ipv6: saved.spec.ipv6,
                    interface: saved.spec.interface.clone(),
                    ifindex: saved.ifindex,
                    named_ports,
                },
            );
        }
    }

    /// The registry as it is now.
    fn registry(&self) -> EndpointRegistry {
        EndpointRegistry {
            version: crate::state::VERSION,
            namespaces: self.namespaces.clone(),
            endpoints: self
                .endpoints
                .iter()
                .filter_map(|(key, ep)| {
                    Some(SavedEndpoint {
                        namespace: ep.namespace.clone(),
                        name: ep.name.clone(),
                        id: ep.id,
                        identity: ep.identity,
                        labels: ep.labels.iter().map(|l| l.to_string()).collect(),
                        ifindex: ep.ifindex,
                        spec: self.specs.get(key)?.clone(),
                    })
                })
                .collect(),
        }
    }

    /// Saves and publishes the registry soon: once for every change made before the
    /// messages already queued are handled (a burst of registrations writes the file and
    /// copies the endpoints once, not once per pod). The receiver gets the revision that
    /// includes the change, once the registry holding it is saved.
    fn flush_soon(&mut self, ctx: &mut Context<Self>) -> tokio::sync::oneshot::Receiver<u64> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.flush_waiters.is_empty() {
            ctx.notify(Flush);
        }
        self.flush_waiters.push(tx);
        rx
    }

    /// Saves the registry (after every change).
    fn persist(&self) {
        let Some(state) = &self.state else { return };
        if let Err(e) = state.save_endpoints(&self.registry()) {
            tracing::error!(dir = %state.path.display(), error = %e, "saving the endpoint registry failed; a restart would not restore the latest endpoints");
        }
    }

    /// Removes endpoints whose interface disappeared (or was replaced by another interface
    /// with the same name); answers their names.
    fn drop_vanished(&mut self) -> Vec<String> {
        // One listing of every interface (a netlink dump) rather than one lookup per
        // endpoint: with a thousand endpoints that is 1 call instead of 1,000 every check.
        let present: Option<std::collections::HashMap<String, u32>> = nix::net::if_::if_nameindex()
            .ok()
            .map(|all| all.iter().map(|i| (i.name().to_string_lossy().into_owned(), i.index())).collect());
        let index_of = |name: &str| match &present {
            Some(map) => map.get(name).copied(),
            None => ifindex(name),
        };
        let gone: Vec<(String, String)> = self
            .endpoints
            .iter()
            .filter(|(_, ep)| index_of(&ep.interface) != Some(ep.ifindex))
            .map(|(k, _)| k.clone())
            .collect();
        let mut names = Vec::new();
        for key in gone {
            self.specs.remove(&key);
            if let Some(old) = self.endpoints.remove(&key) {
                tracing::warn!(endpoint = %old.full_name(), interface = %old.interface, "interface disappeared; endpoint removed");
                self.identities.do_send(ReleaseIdentity { id: old.identity });
                names.push(old.full_name());
            }
        }
        if !names.is_empty() {
            self.persist();
        }
        names
    }

    fn free_id(&self) -> Result<u16, AgentError> {
        let used: BTreeSet<u16> = self.endpoints.values().map(|e| e.id).chain(self.reserved.iter().copied()).collect();
        (1..=u16::MAX).find(|id| !used.contains(id)).ok_or(AgentError::EndpointIdsExhausted)
    }

    fn labels_for(&self, namespace: &str, spec: &EndpointSpec) -> LabelSet {
        let ns_labels = self.namespaces.get(namespace).cloned().unwrap_or_default();
        crate::endpoint::endpoint_labels(namespace, &ns_labels, spec, &self.cluster)
    }

    /// Gives every endpoint for which `pick` is true the label set its spec now derives,
    /// with a new identity where the set changed; answers the new revision.
    fn relabel(&mut self, pick: impl Fn(&LocalEndpoint) -> bool) -> AtomicResponse<Self, Result<u64, AgentError>> {
        let mut relabel = Vec::new();
        for (key, ep) in &self.endpoints {
            if !pick(ep) {
                continue;
            }
            let labels = self.labels_for(&ep.namespace, &self.specs[key]);
            if labels != ep.labels {
                relabel.push((key.clone(), labels));
            }
        }
        let identities = self.identities.clone();
        AtomicResponse::new(Box::pin(
            async move {
                let mut out = Vec::new();
                for (key, labels) in relabel {
                    let id = identities.send(AllocateIdentity { labels: labels.clone() }).await?;
                    out.push((key, labels, id));
                }
                Ok::<_, actix::MailboxError>(out)
            }
            .into_actor(self)
            .then(|res, act, _| {
                let rev = res.map(|changes| {
                    for (key, labels, id) in changes {
                        if let Some(ep) = act.endpoints.get_mut(&key) {
                            act.identities.do_send(ReleaseIdentity { id: ep.identity });
                            tracing::info!(endpoint = %ep.full_name(), old = ep.identity, new = id, "endpoint relabelled");
                            ep.labels = labels;
                            ep.identity = id;
                        }
                    }
                    act.persist();
                    act.publish()
                });
                async move { Ok(rev?.await?) }.into_actor(act)
            }),
        ))
    }

    fn publish(&self) -> Request<Resolver, EndpointsChanged> {
        let endpoints: Vec<LocalEndpoint> = self.endpoints.values().cloned().collect();
        self.resolver.send(EndpointsChanged { endpoints: Arc::new(endpoints) })
    }

    /// Validates a spec and builds the endpoint, without its identity.
    fn build(&self, namespace: &str, name: &str, spec: &EndpointSpec) -> Result<LocalEndpoint, AgentError> {
        if !self.namespaces.contains_key(namespace) {
            return Err(AgentError::UnknownNamespace { namespace: namespace.into(), name: name.into() });
        }
        let idx = ifindex(&spec.interface).ok_or_else(|| AgentError::InterfaceNotFound {
            namespace: namespace.into(),
            name: name.into(),
            interface: spec.interface.clone(),
        })?;
        if spec.ipv4.is_none() && spec.ipv6.is_none() {
            return Err(AgentError::InvalidEndpoint {
                namespace: namespace.into(),
                name: name.into(),
                reason: "it has neither an IPv4 nor an IPv6 address; give at least one".into(),
            });
        }
        let mut named_ports = Vec::new();
        for p in &spec.ports {
            let port = NamedPort::new(&p.name, p.port, &p.protocol).map_err(|reason| AgentError::InvalidEndpoint {
                namespace: namespace.into(),
                name: name.into(),
                reason,
            })?;
            named_ports.push(port);
        }
        let id = match self.endpoints.get(&(namespace.to_string(), name.to_string())) {
            Some(old) => old.id,
            None => self.free_id()?,
        };
        Ok(LocalEndpoint {
            id,
            namespace: namespace.into(),
            name: name.into(),
            labels: self.labels_for(namespace, spec),
            identity: 0,
            ipv4: spec.ipv4,
            ipv6: spec.ipv6,
            interface: spec.interface.clone(),
            ifindex: idx,
            named_ports,
        })
    }
}

impl Actor for EndpointTracker {
    type Context = Context<Self>;
    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.run_interval(self.interface_check, |_, ctx| ctx.notify(CheckInterfaces));
        if !self.netlink {
            self.netlink = true;
            watch_link_removals(ctx.address());
        }
    }
}

/// Checks now that every endpoint's interface still exists (removes those that vanished).
#[derive(Message)]
#[rtype(result = "()")]
pub struct CheckInterfaces;

impl Handler<CheckInterfaces> for EndpointTracker {
    type Result = ();
    fn handle(&mut self, _: CheckInterfaces, _: &mut Context<Self>) {
        if !self.drop_vanished().is_empty() {
            self.resolver.do_send(EndpointsChanged { endpoints: Arc::new(self.endpoints.values().cloned().collect()) });
        }
    }
}

/// Listens for link removals (netlink, RTMGRP_LINK) on a thread of its own and asks the
/// tracker to check its interfaces on each. Without netlink the periodic check remains.
fn watch_link_removals(tracker: Addr<EndpointTracker>) {
    use std::os::fd::AsRawFd;

    use nix::errno::Errno;
    use nix::sys::socket::{
        AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, socket,
    };
    const RTMGRP_LINK: u32 = 1;
    const RTM_DELLINK: u16 = 17;
    const HEADER: usize = 16;
    let sock = match socket(AddressFamily::Netlink, SockType::Raw, SockFlag::SOCK_CLOEXEC, SockProtocol::NetlinkRoute) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "no netlink socket; vanished interfaces are found by the periodic check only");
            return;
        }
    };
    if let Err(e) = bind(sock.as_raw_fd(), &NetlinkAddr::new(0, RTMGRP_LINK)) {
        tracing::warn!(error = %e, "cannot listen for link changes; vanished interfaces are found by the periodic check only");
        return;
    }
    let spawned = std::thread::Builder::new().name("link-watch".into()).spawn(move || {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match recv(sock.as_raw_fd(), &mut buf, MsgFlags::empty()) {
                Ok(n) => n,
                // Messages were lost: check anyway.
                Err(Errno::ENOBUFS) => {
                    tracker.do_send(CheckInterfaces);
                    continue;
                }
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "netlink listener stopped; the periodic check remains");
                    return;
                }
            };
            // Each message starts with a struct nlmsghdr (u32 length, u16 type, u16 flags,
            // u32 seq, u32 pid); messages are 4-byte aligned.
            let mut off = 0;
            let mut removed = false;
            while off + HEADER <= n {
                let len = u32::from_ne_bytes([buf[off], buf[off + 1], buf[off + 2], buf[off + 3]]) as usize;
                removed |= u16::from_ne_bytes([buf[off + 4], buf[off + 5]]) == RTM_DELLINK;
                if len < HEADER {
                    break;
                }
                off += (len + 3) & !3;
            }
            if removed {
                if !tracker.connected() {
                    return;
                }
                tracker.do_send(CheckInterfaces);
            }
        }
    });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the netlink listener; the periodic check remains");
    }
}

/// After a panic: the registry comes back from the state directory, as saved after the
/// last change (the identity references it holds were never dropped).
impl Supervised for EndpointTracker {
    fn restarting(&mut self, _: &mut Context<Self>) {
        let reg = match &self.state {
            Some(state) => state.load_endpoints().unwrap_or_else(|e| {
                tracing::error!(error = %e, "cannot read the endpoint registry; keeping the endpoints in memory");
                self.registry()
            }),
            None => self.registry(),
        };
        self.load(&reg);
    }
}

/// Reads the saved registry for a starting agent, drops the endpoints whose interface is
/// gone (pods deleted while no agent ran) and saves the result.
pub fn restore_registry(state: &StateDir) -> std::io::Result<EndpointRegistry> {
    let mut reg = state.load_endpoints()?;
    let before = reg.endpoints.len();
    reg.endpoints.retain(|e| {
        let keep = ifindex(&e.spec.interface) == Some(e.ifindex);
        if !keep {
            tracing::info!(endpoint = %format!("{}/{}", e.namespace, e.name), interface = %e.spec.interface, "saved endpoint dropped: its interface is gone");
        }
        keep
    });
    if reg.endpoints.len() != before {
        state.save_endpoints(&reg)?;
    }
    tracing::info!(endpoints = reg.endpoints.len(), namespaces = reg.namespaces.len(), "endpoint registry restored");
    Ok(reg)
}

/// Hands the current endpoints to the resolver again; answers the revision.
#[derive(Message)]
#[rtype(result = "Result<u64, AgentError>")]
pub struct Republish;

impl Handler<Republish> for EndpointTracker {
    type Result = ResponseFuture<Result<u64, AgentError>>;
    fn handle(&mut self, _: Republish, _: &mut Context<Self>) -> Self::Result {
        let rev = self.publish();
        Box::pin(async move { Ok(rev.await?) })
    }
}

/// Adds or replaces an endpoint; answers it with its identity and the new revision.
#[derive(Message)]
#[rtype(result = "Result<(LocalEndpoint, u64), AgentError>")]
pub struct UpsertEndpoint {
    pub namespace: String,
    pub name: String,
    pub spec: EndpointSpec,
}

/// Not atomic: while one registration waits for its identity and its revision, others
/// go on (a node starting many pods registers them together, and the resolver takes
/// their changes in one go). The endpoint id is reserved at once, so two registrations
/// in flight never share one.
impl Handler<UpsertEndpoint> for EndpointTracker {
    type Result = ResponseActFuture<Self, Result<(LocalEndpoint, u64), AgentError>>;
    fn handle(&mut self, msg: UpsertEndpoint, _: &mut Context<Self>) -> Self::Result {
        let ep = match self.build(&msg.namespace, &msg.name, &msg.spec) {
            Ok(ep) => ep,
            Err(e) => return Box::pin(fut::ready(Err(e))),
        };
        let reserved = self.reserved.insert(ep.id);
        let identities = self.identities.clone();
        let labels = ep.labels.clone();
        Box::pin(
            async move { identities.send(AllocateIdentity { labels }).await }
                .into_actor(self)
                .then(move |res, act, ctx| {
                    if reserved {
                        act.reserved.remove(&ep.id);
                    }
                    let result = res.map(|identity| {
                        let key = (msg.namespace.clone(), msg.name.clone());
                        // The same pod registered twice at once: the later one keeps the
                        // id the earlier one took.
                        let id = act.endpoints.get(&key).map_or(ep.id, |old| old.id);
                        let ep = LocalEndpoint { identity, id, ..ep };
                        act.specs.insert(key.clone(), msg.spec);
                        if let Some(old) = act.endpoints.insert(key, ep.clone()) {
                            act.identities.do_send(ReleaseIdentity { id: old.identity });
                        }
                        tracing::info!(endpoint = %ep.full_name(), id = ep.id, identity = ep.identity, interface = %ep.interface, "endpoint upserted");
                        (ep, act.flush_soon(ctx))
                    });
                    async move {
                        match result {
                            // Answered once the registry holding it is on disk (a restart
                            // right after the answer still knows the pod) and the resolver
                            // has it.
                            Ok((ep, rev)) => Ok((ep, rev.await.map_err(|_| actix::MailboxError::Closed)?)),
                            Err(e) => Err(AgentError::from(e)),
                        }
                    }
                    .into_actor(act)
                }),
        )
    }
}

/// Saves and publishes the registry for the changes waiting in `flush_waiters`.
#[derive(Message)]
#[rtype(result = "()")]
struct Flush;

impl Handler<Flush> for EndpointTracker {
    type Result = ();
    fn handle(&mut self, _: Flush, ctx: &mut Context<Self>) {
        self.persist();
        let waiters = std::mem::take(&mut self.flush_waiters);
        let rev = self.publish();
        ctx.spawn(
            async move {
                if let Ok(rev) = rev.await {
                    for tx in waiters {
                        let _ = tx.send(rev);
                    }
                }
            }
            .into_actor(self),
        );
    }
}

/// Removes an endpoint; answers the new revision.
#[derive(Message)]
#[rtype(result = "Result<u64, AgentError>")]
pub struct DeleteEndpoint {
    pub namespace: String,
    pub name: String,
}

impl Handler<DeleteEndpoint> for EndpointTracker {
    type Result = ResponseFuture<Result<u64, AgentError>>;
    fn handle(&mut self, msg: DeleteEndpoint, _: &mut Context<Self>) -> Self::Result {
        let key = (msg.namespace.clone(), msg.name.clone());
        self.specs.remove(&key);
        match self.endpoints.remove(&key) {
            None => {
                Box::pin(async move { Err(AgentError::EndpointNotFound { namespace: msg.namespace, name: msg.name }) })
            }
            Some(old) => {
                tracing::info!(endpoint = %old.full_name(), "endpoint removed");
                self.identities.do_send(ReleaseIdentity { id: old.identity });
                self.persist();
                let rev = self.publish();
                Box::pin(async move { Ok(rev.await?) })
            }
        }
    }
}

/// Sets a namespace's labels; endpoints in it get new label sets (and identities).
#[derive(Message)]
#[rtype(result = "Result<u64, AgentError>")]
pub struct UpsertNamespace {
    pub name: String,
    pub spec: NamespaceSpec,
}

impl Handler<UpsertNamespace> for EndpointTracker {
    type Result = AtomicResponse<Self, Result<u64, AgentError>>;
    fn handle(&mut self, msg: UpsertNamespace, _: &mut Context<Self>) -> Self::Result {
        self.namespaces.insert(msg.name.clone(), msg.spec.labels);
        self.relabel(|ep| ep.namespace == msg.name)
    }
}

/// Every endpoint.
#[derive(Message)]
#[rtype(result = "Vec<LocalEndpoint>")]
pub struct ListEndpoints;

impl Handler<ListEndpoints> for EndpointTracker {
    type Result = MessageResult<ListEndpoints>;
    fn handle(&mut self, _: ListEndpoints, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.endpoints.values().cloned().collect())
    }
}

/// The spec each endpoint was last given, by (namespace, name).
#[derive(Message)]
#[rtype(result = "BTreeMap<(String, String), EndpointSpec>")]
pub struct ListEndpointSpecs;

impl Handler<ListEndpointSpecs> for EndpointTracker {
    type Result = MessageResult<ListEndpointSpecs>;
    fn handle(&mut self, _: ListEndpointSpecs, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.specs.clone())
    }
}
