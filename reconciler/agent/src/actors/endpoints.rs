//! Endpoint tracker actor: the pods of this node (fed by the local API, which a CNI plugin
//! or the testbed calls), their namespaces' labels, and the identity each one holds. The
//! registry itself is a plain struct ([`crate::endpoint_registry::Registry`]) and the
//! netlink decoding lives in [`crate::link_watch`]; the actor talks to the identity cache
//! and the resolver, saves, and runs the interface checks.
//!
//! The registry is saved in the state directory after every change (atomically; the
//! registrations of a burst share one save, and each is answered once it is saved) and
//! restored when the agent starts, so endpoints survive restarts; entries whose interface
//! is gone by then are dropped. While running, the tracker checks every
//! [`crate::actors::AgentConfig::interface_check_interval`] that each endpoint's interface
//! still exists with the same index, and at once when netlink reports a link removed: one
//! that disappeared (a pod deleted abruptly, its network namespace gone) is removed like a
//! DELETE would, which releases its identity reference and removes its map entries.
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;

use super::identity::{AllocateIdentity, IdentityCache, ReleaseIdentity};
use super::resolver::{EndpointsChanged, Resolver};
use crate::api::types::{EndpointSpec, NamespaceSpec};
use crate::endpoint::{LocalEndpoint, ifindex};
use crate::endpoint_registry::Registry;
use crate::error::AgentError;
use crate::state::{EndpointRegistry, StateDir};

pub struct EndpointTracker {
    registry: Registry,
    identities: Addr<IdentityCache>,
    resolver: Addr<Resolver>,
    state: Option<StateDir>,
    interface_check: Duration,
    /// The netlink listener runs (started once; it outlives actor restarts).
    netlink: bool,
    /// Registrations waiting for the next save and publish of the registry ([`Flush`]):
    /// each gets the revision that includes it.
    flush_waiters: Vec<tokio::sync::oneshot::Sender<u64>>,
    /// Told after every change handed to the resolver (the kvstore publisher waits on it).
    changed: Arc<tokio::sync::Notify>,
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
        changed: Arc<tokio::sync::Notify>,
    ) -> Self {
        let mut r = Registry::new(cluster);
        r.load(registry);
        EndpointTracker {
            registry: r,
            identities,
            resolver,
            state,
            interface_check,
            netlink: false,
            flush_waiters: Vec::new(),
            changed,
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
        if let Err(e) = state.save_endpoints(&self.registry.saved()) {
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
        let mut names = Vec::new();
        for old in self.registry.remove_vanished(index_of) {
            tracing::warn!(endpoint = %old.full_name(), interface = %old.interface, "interface disappeared; endpoint removed");
            self.identities.do_send(ReleaseIdentity { id: old.identity });
            names.push(old.full_name());
        }
        if !names.is_empty() {
            self.persist();
        }
        names
    }

    /// Gives every endpoint for which `pick` is true the label set its spec now derives,
    /// with a new identity where the set changed; answers the new revision.
    fn relabel(&mut self, pick: impl Fn(&LocalEndpoint) -> bool) -> AtomicResponse<Self, Result<u64, AgentError>> {
        let relabel = self.registry.relabelled(pick);
        let identities = self.identities.clone();
        AtomicResponse::new(Box::pin(
            async move {
                let mut out = Vec::new();
                for (key, labels) in relabel {
                    let got = identities.send(AllocateIdentity { labels: labels.clone() }).await;
                    match got.map_err(AgentError::from).and_then(|r| r) {
                        Ok(id) => out.push((key, labels, id)),
                        Err(e) => {
                            // None of them is relabelled: give back what was taken.
                            for (_, _, id) in out {
                                identities.do_send(ReleaseIdentity { id });
                            }
                            return Err(e);
                        }
                    }
                }
                Ok::<_, AgentError>(out)
            }
            .into_actor(self)
            .then(|res, act, _| {
                let rev = res.map(|changes| {
                    for (key, labels, id) in changes {
                        if let Some((ep, old)) = act.registry.relabel(&key, labels, id) {
                            act.identities.do_send(ReleaseIdentity { id: old });
                            tracing::info!(endpoint = %ep.full_name(), old, new = id, "endpoint relabelled");
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
        self.changed.notify_one();
        self.resolver.send(EndpointsChanged { endpoints: Arc::new(self.registry.endpoints()) })
    }
}

impl Actor for EndpointTracker {
    type Context = Context<Self>;
    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.run_interval(self.interface_check, |_, ctx| ctx.notify(CheckInterfaces));
        if !self.netlink {
            self.netlink = true;
            let tracker = ctx.address();
            crate::link_watch::watch_link_removals(move || {
                if !tracker.connected() {
                    return false;
                }
                tracker.do_send(CheckInterfaces);
                true
            });
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
            self.resolver.do_send(EndpointsChanged { endpoints: Arc::new(self.registry.endpoints()) });
        }
    }
}

/// After a panic: the registry comes back from the state directory, as saved after the
/// last change (the identity references it holds were never dropped).
impl Supervised for EndpointTracker {
    fn restarting(&mut self, _: &mut Context<Self>) {
        let reg = match &self.state {
            Some(state) => state.load_endpoints().unwrap_or_else(|e| {
                tracing::error!(error = %e, "cannot read the endpoint registry; keeping the endpoints in memory");
                self.registry.saved()
            }),
            None => self.registry.saved(),
        };
        self.registry.load(&reg);
    }
}

/// Reads the saved registry for a starting agent, drops the endpoints whose interface is
/// gone (pods deleted while no agent ran) and saves the result.
pub fn restore_registry(state: &StateDir) -> std::io::Result<EndpointRegistry> {
    crate::endpoint_registry::restore(state, ifindex)
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
        let ep = match self.registry.build(&msg.namespace, &msg.name, &msg.spec, ifindex) {
            Ok(ep) => ep,
            Err(e) => return Box::pin(fut::ready(Err(e))),
        };
        let reserved = self.registry.reserve(ep.id);
        let identities = self.identities.clone();
        let labels = ep.labels.clone();
        Box::pin(
            async move { identities.send(AllocateIdentity { labels }).await.map_err(AgentError::from).and_then(|r| r) }
                .into_actor(self)
                .then(move |res, act, ctx| {
                    if reserved {
                        act.registry.release_reservation(ep.id);
                    }
                    let result = res.map(|identity| {
                        let (ep, old) = act.registry.insert(ep, identity, msg.spec);
                        if let Some(old) = old {
                            act.identities.do_send(ReleaseIdentity { id: old });
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
                            Err(e) => Err(e),
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
        match self.registry.remove(&msg.namespace, &msg.name) {
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
        self.registry.set_namespace(msg.name.clone(), msg.spec.labels);
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
        MessageResult(self.registry.endpoints())
    }
}

/// The spec each endpoint was last given, by (namespace, name).
#[derive(Message)]
#[rtype(result = "BTreeMap<(String, String), EndpointSpec>")]
pub struct ListEndpointSpecs;

impl Handler<ListEndpointSpecs> for EndpointTracker {
    type Result = MessageResult<ListEndpointSpecs>;
    fn handle(&mut self, _: ListEndpointSpecs, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.registry.specs().clone())
    }
}
