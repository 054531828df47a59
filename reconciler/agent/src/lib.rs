//! palisade's node agent: actors that reconcile policies and endpoints into eBPF maps, the
//! datapath loader, the local API, and the decoding of verdict events.
pub mod actors;
pub mod api;
pub mod datapath;
pub mod endpoint;
pub mod endpoint_registry;
pub mod error;
pub mod flows;
pub mod k8s;
pub mod kvstore;
pub mod link_watch;
pub mod mapstate;
pub mod metrics;
pub mod monitor;
pub mod remote_file;
pub mod revisions;
pub mod state;
pub mod writer;

/// Why a flow passes or not (`POST /v1/explain`): `palisade-node`'s, over the resolver's state.
pub use palisade_node::explain;
