//! Resolver actor: holds the latest policies, local endpoints and identities, numbers
//! every change with a revision, and turns them into the desired state of every endpoint
//! (with the pure resolver of palisade-policy), which it hands to the map writer.
//!
//! Bursts coalesce: every input marks the state dirty and one recompute runs after the
//! messages already queued.
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use actix::prelude::*;
use palisade_policy::CidrIdentities;
use palisade_policy::identity::IdentityAllocator;
use palisade_policy::model::Policy;
use palisade_policy::resolve::{DesiredState, EndpointView, resolve_with_cidrs};

use super::identity::Prefix;
use super::map_writer::{ApplyDesired, MapWriter};
use crate::endpoint::LocalEndpoint;

/// A resolution's output: the desired state and the ipcache.
type Resolved = (Arc<DesiredState>, Arc<BTreeMap<Prefix, u32>>);

pub struct Resolver {
    policies: Arc<Vec<Policy>>,
    endpoints: Arc<Vec<LocalEndpoint>>,
    allocator: Arc<IdentityAllocator>,
    /// Addresses that are not local pods: reserved prefixes and other nodes' pods.
    external_ipcache: Arc<BTreeMap<Prefix, u32>>,
    /// Node-local identities of the prefixes policies name; numbers stay while in use.
    cidrs: CidrIdentities,
    revision: u64,
    dirty: bool,
    /// False until every source has handed in its state ([`SourcesSynced`]): until then
    /// nothing is sent to the map writer, so a starting (or restarted) agent never applies
    /// a partial view (say, no endpoints yet) over what the pinned maps enforce.
    synced: bool,
    /// What was last handed to the map writer (for explanations).
    last: Option<Resolved>,
    map_writer: Addr<MapWriter>,
}

impl Resolver {
    pub fn new(map_writer: Addr<MapWriter>) -> Self {
        Resolver {
            policies: Arc::default(),
            endpoints: Arc::default(),
            allocator: Arc::new(IdentityAllocator::new()),
            external_ipcache: Arc::default(),
            cidrs: CidrIdentities::new(),
            revision: 0,
            dirty: false,
            synced: false,
            last: None,
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
            ctx.notify(Recompute);
        }
        self.revision
    }

    fn recompute(&mut self) {
        if !self.synced {
            return;
        }
        self.dirty = false;
        let started = Instant::now();
        let views: Vec<EndpointView> = self
            .endpoints
            .iter()
            .map(|e| EndpointView {
                id: e.id,
                namespace: e.namespace.clone(),
                identity: e.identity,
                labels: e.labels.clone(),
                named_ports: e.named_ports.clone(),
            })
            .collect();
        let mut desired = resolve_with_cidrs(&self.policies, &views, &self.allocator, &self.cidrs);
        allow_localhost(&mut desired);
        // Later entries win on the same prefix: CIDR identities, then other nodes' pods and
        // reserved addresses (node, API server), then the local endpoints' own addresses.
        let ipcache = crate::endpoint::assemble_ipcache(&desired.cidr_ipcache, &self.external_ipcache, &self.endpoints);
        tracing::debug!(
            revision = self.revision,
            endpoints = views.len(),
            policies = self.policies.len(),
            elapsed_us = started.elapsed().as_micros() as u64,
            "resolved"
        );
        let (desired, ipcache) = (Arc::new(desired), Arc::new(ipcache));
        self.last = Some((desired.clone(), ipcache.clone()));
        self.map_writer.do_send(ApplyDesired {
            revision: self.revision,
            desired,
            endpoints: self.endpoints.clone(),
            ipcache,
            policies: self.policies.clone(),
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
        self.policies = msg.policies;
        self.cidrs.sync(&self.policies);
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
        self.endpoints = msg.endpoints;
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
}

impl Handler<IdentitiesChanged> for Resolver {
    type Result = u64;
    fn handle(&mut self, msg: IdentitiesChanged, ctx: &mut Context<Self>) -> u64 {
        self.allocator = msg.allocator;
        self.external_ipcache = msg.ipcache;
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
        *self = Resolver { revision: self.revision, ..Resolver::new(self.map_writer.clone()) };
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
        let inputs = crate::explain::ExplainInputs {
            policies: &self.policies,
            endpoints: &self.endpoints,
            allocator: &self.allocator,
            cidrs: &self.cidrs,
            desired: self.last.as_ref().map(|(d, _)| d.as_ref()),
            ipcache: self.last.as_ref().map(|(_, i)| i.as_ref()).unwrap_or(&empty),
            cluster: &msg.cluster,
        };
        crate::explain::explain(&msg.request, &inputs)
    }
}

/// The node itself may always reach its pods (kubelet probes), as Cilium's default
/// `allow-localhost` does: every ingress-enforced endpoint gets an allow for the host
/// identity, any protocol and port, with no rule behind it. A deny for the host (or for any
/// peer) on some port still wins there, as for every allow.
pub fn allow_localhost(desired: &mut DesiredState) {
    use palisade_policy::model::Direction;
    use palisade_policy::resolve::{EntryKey, EntryValue};
    for ep in desired.endpoints.values_mut() {
        if ep.ingress_enforced {
            let key = EntryKey {
                direction: Direction::Ingress,
                identity: palisade_common::identity::HOST,
                protocol: 0,
                port: 0,
                port_prefix_len: 0,
            };
            ep.entries.entry(key).or_insert_with(EntryValue::default);
        }
    }
}
