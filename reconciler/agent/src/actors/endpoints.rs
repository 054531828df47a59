//! Endpoint tracker actor: the pods of this node (fed by the local API, which a CNI plugin
//! or the testbed calls), their namespaces' labels, and the identity each one holds.
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use actix::prelude::*;
use palisade_policy::labels::LabelSet;
use palisade_policy::model::Policy;
use palisade_policy::resolve::NamedPort;

use super::identity::{AllocateIdentity, IdentityCache, ReleaseIdentity};
use super::resolver::{EndpointsChanged, Resolver};
use crate::api::types::{EndpointSpec, NamespaceSpec};
use crate::endpoint::{LocalEndpoint, ifindex};
use crate::error::AgentError;

pub struct EndpointTracker {
    cluster: String,
    namespaces: BTreeMap<String, BTreeMap<String, String>>,
    specs: BTreeMap<(String, String), EndpointSpec>,
    endpoints: BTreeMap<(String, String), LocalEndpoint>,
    /// Accepted policies, for the ipBlock membership labels of each pod.
    policies: Arc<Vec<Policy>>,
    identities: Addr<IdentityCache>,
    resolver: Addr<Resolver>,
}

impl EndpointTracker {
    pub fn new(cluster: String, identities: Addr<IdentityCache>, resolver: Addr<Resolver>) -> Self {
        EndpointTracker {
            cluster,
            namespaces: BTreeMap::new(),
            specs: BTreeMap::new(),
            endpoints: BTreeMap::new(),
            policies: Arc::default(),
            identities,
            resolver,
        }
    }

    fn free_id(&self) -> Result<u16, AgentError> {
        let used: BTreeSet<u16> = self.endpoints.values().map(|e| e.id).collect();
        (1..=u16::MAX).find(|id| !used.contains(id)).ok_or(AgentError::EndpointIdsExhausted)
    }

    fn labels_for(&self, namespace: &str, spec: &EndpointSpec) -> LabelSet {
        let ns_labels = self.namespaces.get(namespace).cloned().unwrap_or_default();
        crate::endpoint::endpoint_labels(namespace, &ns_labels, spec, &self.cluster, &self.policies)
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
}

/// Adds or replaces an endpoint; answers it with its identity and the new revision.
#[derive(Message)]
#[rtype(result = "Result<(LocalEndpoint, u64), AgentError>")]
pub struct UpsertEndpoint {
    pub namespace: String,
    pub name: String,
    pub spec: EndpointSpec,
}

impl Handler<UpsertEndpoint> for EndpointTracker {
    type Result = AtomicResponse<Self, Result<(LocalEndpoint, u64), AgentError>>;
    fn handle(&mut self, msg: UpsertEndpoint, _: &mut Context<Self>) -> Self::Result {
        let ep = match self.build(&msg.namespace, &msg.name, &msg.spec) {
            Ok(ep) => ep,
            Err(e) => return AtomicResponse::new(Box::pin(fut::ready(Err(e)))),
        };
        let identities = self.identities.clone();
        let labels = ep.labels.clone();
        AtomicResponse::new(Box::pin(
            async move { identities.send(AllocateIdentity { labels }).await }
                .into_actor(self)
                .then(move |res, act, _| {
                    let result = res.map(|identity| {
                        let key = (msg.namespace.clone(), msg.name.clone());
                        let ep = LocalEndpoint { identity, ..ep };
                        act.specs.insert(key.clone(), msg.spec);
                        if let Some(old) = act.endpoints.insert(key, ep.clone()) {
                            act.identities.do_send(ReleaseIdentity { id: old.identity });
                        }
                        tracing::info!(endpoint = %ep.full_name(), id = ep.id, identity = ep.identity, interface = %ep.interface, "endpoint upserted");
                        (ep, act.publish())
                    });
                    async move {
                        match result {
                            Ok((ep, rev)) => Ok((ep, rev.await?)),
                            Err(e) => Err(AgentError::from(e)),
                        }
                    }
                    .into_actor(act)
                }),
        ))
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

/// The accepted policies changed: pods may have moved in or out of ipBlocks.
#[derive(Message)]
#[rtype(result = "Result<u64, AgentError>")]
pub struct PoliciesForLabels {
    pub policies: Arc<Vec<Policy>>,
}

impl Handler<PoliciesForLabels> for EndpointTracker {
    type Result = AtomicResponse<Self, Result<u64, AgentError>>;
    fn handle(&mut self, msg: PoliciesForLabels, _: &mut Context<Self>) -> Self::Result {
        self.policies = msg.policies;
        self.relabel(|_| true)
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
