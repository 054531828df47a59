//! The endpoint registry as a plain struct ([`Registry`]), which the endpoint tracker actor
//! (`actors::endpoints`) drives and tests drive without actix: the namespaces of the node
//! with their labels, the pods with their specs, node-local ids and identities, and the
//! ids reserved by registrations still waiting for their identity. It validates specs,
//! derives each pod's security labels, and says which identity references to take and
//! drop; the actor talks to the identity cache, saves the registry and publishes it.
use std::collections::{BTreeMap, BTreeSet};

use palisade_policy::labels::{Label, LabelSet};
use palisade_policy::resolve::NamedPort;

use crate::api::types::EndpointSpec;
use crate::endpoint::LocalEndpoint;
use crate::error::AgentError;
use crate::state::{EndpointRegistry, SavedEndpoint, StateDir};

/// (namespace, name) of a pod.
pub type EndpointKey = (String, String);

/// The pods and namespaces of this node.
#[derive(Clone, Debug, Default)]
pub struct Registry {
    cluster: String,
    namespaces: BTreeMap<String, BTreeMap<String, String>>,
    specs: BTreeMap<EndpointKey, EndpointSpec>,
    endpoints: BTreeMap<EndpointKey, LocalEndpoint>,
    /// Endpoint ids given to registrations still waiting for their identity.
    reserved: BTreeSet<u16>,
}

impl Registry {
    /// An empty registry of a node in `cluster`.
    pub fn new(cluster: String) -> Registry {
        Registry { cluster, ..Registry::default() }
    }

    /// Takes the namespaces and endpoints of a saved registry (replacing what it held).
    pub fn load(&mut self, reg: &EndpointRegistry) {
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
                    labels: saved.labels.iter().map(|l| Label::parse(l)).collect(),
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

    /// The registry as it is saved.
    pub fn saved(&self) -> EndpointRegistry {
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
                        labels: ep.labels.iter().map(std::string::ToString::to_string).collect(),
                        ifindex: ep.ifindex,
                        spec: self.specs.get(key)?.clone(),
                    })
                })
                .collect(),
        }
    }

    /// Every endpoint, by (namespace, name).
    pub fn endpoints(&self) -> Vec<LocalEndpoint> {
        self.endpoints.values().cloned().collect()
    }

    /// The spec each endpoint was last given.
    pub fn specs(&self) -> &BTreeMap<EndpointKey, EndpointSpec> {
        &self.specs
    }

    /// Validates a spec and builds the endpoint, without its identity (0): its namespace
    /// must be known, its interface exist (`index_of` finds interface indexes), it needs an
    /// address, and its named ports must be valid. A pod registered again keeps its id.
    pub fn build(
        &self,
        namespace: &str,
        name: &str,
        spec: &EndpointSpec,
        index_of: impl Fn(&str) -> Option<u32>,
    ) -> Result<LocalEndpoint, AgentError> {
        if !self.namespaces.contains_key(namespace) {
            return Err(AgentError::UnknownNamespace { namespace: namespace.into(), name: name.into() });
        }
        let idx = index_of(&spec.interface).ok_or_else(|| AgentError::InterfaceNotFound {
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

    /// Reserves `id` for a registration waiting for its identity; false if it was already.
    pub fn reserve(&mut self, id: u16) -> bool {
        self.reserved.insert(id)
    }

    pub fn release_reservation(&mut self, id: u16) {
        self.reserved.remove(&id);
    }

    /// Adds or replaces endpoint `ep` (built by [`Registry::build`]) with its `identity`
    /// and `spec`. The same pod registered twice at once: the later registration keeps the
    /// id the earlier one took. Answers the endpoint as held, and the identity of the
    /// endpoint it replaced (a reference to release).
    pub fn insert(&mut self, ep: LocalEndpoint, identity: u32, spec: EndpointSpec) -> (LocalEndpoint, Option<u32>) {
        let key = (ep.namespace.clone(), ep.name.clone());
        let id = self.endpoints.get(&key).map_or(ep.id, |old| old.id);
        let ep = LocalEndpoint { identity, id, ..ep };
        self.specs.insert(key.clone(), spec);
        let old = self.endpoints.insert(key, ep.clone());
        (ep, old.map(|o| o.identity))
    }

    /// Removes an endpoint; answers it (its identity is a reference to release).
    pub fn remove(&mut self, namespace: &str, name: &str) -> Option<LocalEndpoint> {
        let key = (namespace.to_string(), name.to_string());
        self.specs.remove(&key);
        self.endpoints.remove(&key)
    }

    /// Removes the endpoints whose interface is gone or has another index now (another
    /// interface under the same name); `index_of` finds interface indexes. Answers them.
    pub fn remove_vanished(&mut self, index_of: impl Fn(&str) -> Option<u32>) -> Vec<LocalEndpoint> {
        let gone: Vec<EndpointKey> = self
            .endpoints
            .iter()
            .filter(|(_, ep)| index_of(&ep.interface) != Some(ep.ifindex))
            .map(|(k, _)| k.clone())
            .collect();
        gone.into_iter().filter_map(|(namespace, name)| self.remove(&namespace, &name)).collect()
    }

    /// Sets a namespace's labels.
    pub fn set_namespace(&mut self, name: String, labels: BTreeMap<String, String>) {
        self.namespaces.insert(name, labels);
    }

    /// The endpoints for which `pick` is true whose spec now derives another label set
    /// (after a namespace's labels changed), with that label set.
    pub fn relabelled(&self, pick: impl Fn(&LocalEndpoint) -> bool) -> Vec<(EndpointKey, LabelSet)> {
        self.endpoints
            .iter()
            .filter(|(_, ep)| pick(ep))
            .filter_map(|(key, ep)| {
                let labels = self.labels_for(&ep.namespace, &self.specs[key]);
                (labels != ep.labels).then(|| (key.clone(), labels))
            })
            .collect()
    }

    /// Gives endpoint `key` its new labels and identity; answers the endpoint and its old
    /// identity (a reference to release), or `None` when it went away meanwhile.
    pub fn relabel(&mut self, key: &EndpointKey, labels: LabelSet, identity: u32) -> Option<(LocalEndpoint, u32)> {
        let ep = self.endpoints.get_mut(key)?;
        let old = std::mem::replace(&mut ep.identity, identity);
        ep.labels = labels;
        Some((ep.clone(), old))
    }

    fn free_id(&self) -> Result<u16, AgentError> {
        let used: BTreeSet<u16> = self.endpoints.values().map(|e| e.id).chain(self.reserved.iter().copied()).collect();
        (1..=u16::MAX).find(|id| !used.contains(id)).ok_or(AgentError::EndpointIdsExhausted)
    }

    fn labels_for(&self, namespace: &str, spec: &EndpointSpec) -> LabelSet {
        let ns_labels = self.namespaces.get(namespace).cloned().unwrap_or_default();
        crate::endpoint::endpoint_labels(namespace, &ns_labels, spec, &self.cluster)
    }
}

/// Reads the saved registry for a starting agent, drops the endpoints whose interface is
/// gone (pods deleted while no agent ran; `index_of` finds interface indexes) and saves
/// the result.
pub fn restore(state: &StateDir, index_of: impl Fn(&str) -> Option<u32>) -> std::io::Result<EndpointRegistry> {
    let mut reg = state.load_endpoints()?;
    let before = reg.endpoints.len();
    reg.endpoints.retain(|e| {
        let keep = index_of(&e.spec.interface) == Some(e.ifindex);
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

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::api::types::PortSpec;

    fn spec(interface: &str, app: &str) -> EndpointSpec {
        EndpointSpec {
            labels: BTreeMap::from([("app".to_string(), app.to_string())]),
            service_account: "default".into(),
            ipv4: Some(Ipv4Addr::new(10, 0, 0, 1)),
            ipv6: None,
            interface: interface.into(),
            ports: Vec::new(),
        }
    }

    /// Interfaces lxc1..lxc9 exist with index 100 + n.
    fn index_of(name: &str) -> Option<u32> {
        name.strip_prefix("lxc").and_then(|n| n.parse::<u32>().ok()).filter(|n| *n < 10).map(|n| 100 + n)
    }

    fn registry() -> Registry {
        let mut r = Registry::new("default".into());
        r.set_namespace("shop".into(), BTreeMap::from([("team".to_string(), "a".to_string())]));
        r
    }

    fn register(r: &mut Registry, name: &str, spec: EndpointSpec, identity: u32) -> (LocalEndpoint, Option<u32>) {
        let ep = r.build("shop", name, &spec, index_of).unwrap();
        r.insert(ep, identity, spec)
    }

    #[test]
    fn specs_are_checked_with_clear_errors() {
        let r = registry();
        let err = |ns: &str, s: EndpointSpec| r.build(ns, "p", &s, index_of).unwrap_err().to_string();
        assert!(err("nope", spec("lxc1", "a")).contains("nope"));
        assert!(err("shop", spec("eth9", "a")).contains("eth9"));
        let mut no_address = spec("lxc1", "a");
        no_address.ipv4 = None;
        assert!(err("shop", no_address).contains("neither an IPv4 nor an IPv6 address"));
        let mut bad_port = spec("lxc1", "a");
        bad_port.ports = vec![PortSpec { name: "Not A Name".into(), port: 80, protocol: "TCP".into() }];
        assert!(matches!(r.build("shop", "p", &bad_port, index_of), Err(AgentError::InvalidEndpoint { .. })));
    }

    #[test]
    fn ids_are_kept_reused_and_never_shared_with_a_reservation() {
        let mut r = registry();
        let (a, old) = register(&mut r, "a", spec("lxc1", "a"), 300);
        assert_eq!((a.id, a.identity, a.ifindex, old), (1, 300, 101, None));
        // Registered again: same id, the old identity is to be released.
        let (again, old) = register(&mut r, "a", spec("lxc1", "b"), 301);
        assert_eq!((again.id, old), (1, Some(300)));
        // An id reserved by a registration in flight is not given out.
        assert!(r.reserve(2));
        let b = r.build("shop", "b", &spec("lxc2", "b"), index_of).unwrap();
        assert_eq!(b.id, 3);
        r.release_reservation(2);
        assert_eq!(r.build("shop", "c", &spec("lxc3", "c"), index_of).unwrap().id, 2);
        // Removed: its id is free again.
        assert_eq!(r.remove("shop", "a").map(|e| e.identity), Some(301));
        assert_eq!(r.build("shop", "d", &spec("lxc4", "d"), index_of).unwrap().id, 1);
    }

    #[test]
    fn labels_come_from_the_pod_and_its_namespace_and_follow_the_namespace() {
        let mut r = registry();
        let (a, _) = register(&mut r, "a", spec("lxc1", "web"), 300);
        let text: Vec<String> = a.labels.iter().map(std::string::ToString::to_string).collect();
        assert!(text.iter().any(|l| l.ends_with("app=web")), "{text:?}");
        assert!(text.iter().any(|l| l.contains("namespace.labels.team=a")), "{text:?}");
        assert!(r.relabelled(|_| true).is_empty(), "nothing changed");
        r.set_namespace("shop".into(), BTreeMap::from([("team".to_string(), "b".to_string())]));
        let changed = r.relabelled(|ep| ep.namespace == "shop");
        assert_eq!(changed.len(), 1);
        let (key, labels) = changed.into_iter().next().unwrap();
        let (ep, old) = r.relabel(&key, labels, 302).unwrap();
        assert_eq!((ep.identity, old), (302, 300));
        assert!(ep.labels.iter().any(|l| l.to_string().contains("namespace.labels.team=b")));
    }

    #[test]
    fn vanished_interfaces_remove_their_endpoints() {
        let mut r = registry();
        register(&mut r, "a", spec("lxc1", "a"), 300);
        register(&mut r, "b", spec("lxc2", "b"), 301);
        // lxc1 is gone; lxc2 is another interface now (index changed).
        let gone = r.remove_vanished(|name| (name == "lxc2").then_some(999));
        let mut names: Vec<String> = gone.iter().map(palisade_node::endpoint::LocalEndpoint::full_name).collect();
        names.sort();
        assert_eq!(names, vec!["shop/a", "shop/b"]);
        assert!(r.endpoints().is_empty() && r.specs().is_empty());
    }

    #[test]
    fn the_saved_registry_loads_back_the_same() {
        let mut r = registry();
        register(&mut r, "a", spec("lxc1", "a"), 300);
        let saved = r.saved();
        let mut back = Registry::new("default".into());
        back.load(&saved);
        assert_eq!(back.endpoints(), r.endpoints());
        assert_eq!(back.saved(), saved);
    }
}
