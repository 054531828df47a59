//! The kernel's view of policy, as plain values: what the maps should hold ([`MapState`]),
//! built from the resolver's output by [`encode`], cut to the map sizes by [`fit`], and
//! the smallest set of changes that turns what is loaded into what is desired ([`Plan`],
//! made by [`plan`], written in the order of [`Plan::steps`]).
//!
//! This is the one adapter between the policy model (which knows nothing of BPF) and the
//! map encoding. It does no I/O, so plans can be printed, tested and snapshotted; the
//! datapath writes them (`datapath::apply_plan`).
//!
//! - [`table`]: the one list of the maps the agent writes, and what is generated from it;
//! - [`encode`](mod@encode): desired state -> map contents;
//! - [`fit`](mod@fit): map contents -> what fits in the maps (failing closed);
//! - [`plan`](mod@plan): the changes between two contents, and their order;
//! - [`describe`]: plans in words.
mod describe;
mod encode;
mod fit;
mod plan;
pub mod table;
#[cfg(test)]
pub(crate) mod testing;
#[cfg(test)]
mod tests;

use palisade_common::{Ipv4Prefix, Ipv6Prefix, PolicyKey};

pub use describe::{DescribeKey, DescribeValue, describe_lengths_key, describe_policy_key};
pub use encode::{
    CookieJar, EncodeCache, EndpointMapping, direction_byte, encode, encode_cached, policy_key, policy_lengths,
};
pub use fit::{Fitted, Overflow, fit};
pub use plan::{MapPlan, Part, Room, Step, Writes, plan};
pub use table::{IntoKernel, MapLimits, MapRole, MapState, MapVisitor, Plan, TableMap, WritableMap, map};

/// An IPv4 ipcache key: (prefix length, address).
pub type V4Key = (u32, Ipv4Prefix);
/// An IPv6 ipcache key: (prefix length, address).
pub type V6Key = (u32, Ipv6Prefix);
/// A policy key with its prefix length.
pub type PolicyMapKey = (u32, PolicyKey);
