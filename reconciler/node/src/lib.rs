//! What a palisade agent knows about its node, as plain values and functions: no actor
//! runtime, no kernel, no Kubernetes. The agent's actors hold these and feed them
//! (`palisade-agent` re-exports them at its own paths: `endpoint`, `explain`,
//! `actors::identity`, `actors::policy_watch`); the CLI builds the same state offline for
//! `palisade policy explain --scenario/--policies`, so both explain with one code path.
//!
//! - [`endpoint`]: a local pod as the agent tracks it, its security labels, the pod
//!   addresses and the ipcache handed to the map writer;
//! - [`ipcache`]: prefixes, reserved entities, the addresses that are not this node's pods;
//! - [`sources`]: the policy repository (files and API objects, each manifest's status);
//! - [`explain`]: why a flow passes or not, from the resolved state, online or offline.
pub mod endpoint;
pub mod explain;
pub mod ipcache;
pub mod sources;
