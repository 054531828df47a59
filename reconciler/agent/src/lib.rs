//! palisade's node agent: actors that reconcile policies and endpoints into eBPF maps, the
//! datapath loader, and the local API.
pub mod api;
pub mod datapath;
