//! A pod on this node as the agent tracks it: the record and what is derived from it live
//! in `palisade-node` (re-exported here); this module adds what needs the agent's network
//! namespace.
pub use palisade_node::endpoint::*;

/// Index of a network interface in the agent's network namespace.
pub fn ifindex(name: &str) -> Option<u32> {
    nix::net::if_::if_nametoindex(name).ok()
}
