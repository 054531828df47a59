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
use palisade_policy::resolve::{EndpointView, resolve_with_cidrs};

use super::identity::Prefix;
use super::map_writer::{ApplyDesired, MapWriter};
use crate::endpoint::LocalEndpoint;

pub struct Resolver {
    policies: Arc<Vec<Policy>>,
    endpoints: Arc<Vec<LocalEndpoint>>,
    allocator: Arc<IdentityAllocator>,
    reserved_ipcache: Arc<BTreeMap<Prefix, u32>>,
    /// Node-local identities of the prefixes policies name; numbers stay while in use.
    cidrs: CidrIdentities,
    revision: u64,
    dirty: bool,
    map_writer: Addr<MapWriter>,
}

impl Resolver {
    pub fn new(map_writer: Addr<MapWriter>) -> Self {
        Resolver {
            policies: Arc::default(),
            endpoints: Arc::default(),
            allocator: Arc::new(IdentityAllocator::new()),
            reserved_ipcache: Arc::default(),
            cidrs: CidrIdentities::new(),
            revision: 0,
            dirty: false,
            map_writer,
        }
    }

    fn changed(&mut self, ctx: &mut Context<Self>) -> u64 {
        self.revision += 1;
        if !self.dirty {
            self.dirty = true;
            ctx.notify(Recompute);
        }
        self.revision
    }

    fn recompute(&mut self) {
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
        let desired = resolve_with_cidrs(&self.policies, &views, &self.allocator, &self.cidrs);
        // Later entries win on the same prefix: CIDR identities, then reserved addresses
        // (node, API server), then the endpoints' own addresses.
        let mut ipcache: BTreeMap<Prefix, u32> = desired.cidr_ipcache.clone();
        ipcache.extend(self.reserved_ipcache.iter().map(|(k, v)| (*k, *v)));
        for e in self.endpoints.iter() {
            if let Some(v4) = e.ipv4 {
                ipcache.insert((v4.into(), 32), e.identity);
            }
            if let Some(v6) = e.ipv6 {
                ipcache.insert((v6.into(), 128), e.identity);
            }
        }
        tracing::debug!(
            revision = self.revision,
            endpoints = views.len(),
            policies = self.policies.len(),
            elapsed_us = started.elapsed().as_micros() as u64,
            "resolved"
        );
        self.map_writer.do_send(ApplyDesired {
            revision: self.revision,
            desired: Arc::new(desired),
            endpoints: self.endpoints.clone(),
            ipcache: Arc::new(ipcache),
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

/// The identities (or reserved prefixes) changed.
#[derive(Message)]
#[rtype(result = "u64")]
pub struct IdentitiesChanged {
    pub allocator: Arc<IdentityAllocator>,
    pub reserved_ipcache: Arc<BTreeMap<Prefix, u32>>,
}

impl Handler<IdentitiesChanged> for Resolver {
    type Result = u64;
    fn handle(&mut self, msg: IdentitiesChanged, ctx: &mut Context<Self>) -> u64 {
        self.allocator = msg.allocator;
        self.reserved_ipcache = msg.reserved_ipcache;
        self.changed(ctx)
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
