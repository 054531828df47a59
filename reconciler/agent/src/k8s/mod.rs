//! Kubernetes mode: the agent's policies, namespaces and pods come from the API server.
//!
//! kube-rs à la carte: watchers feed in-memory mirrors (the reflector-store pattern, see
//! [`mirror`]), and a level-based reconcile pass ([`run`], logic in [`sync`]) hands the
//! differences to the actors. Policy objects become virtual files of the policy watch
//! (`kube:Kind/namespace/name`), so the API and the policy directory share validation and
//! the last-good-version rule; each CNP/CCNP gets this node's verdict in `status.nodes`,
//! each ClusterNetworkPolicy/ANP/BANP this node's condition in `status.conditions`.
//! Pods of this node become endpoints once their host-side interface is known (route to
//! the pod address, or a CNI registration); all other pods feed the ipcache with the
//! identity of their label set.
pub mod crd;
pub mod mirror;
pub mod route;
pub mod run;
pub mod sync;
pub mod translate;

pub use run::{KubeOptions, run};
