//! The agent's local API: the HTTP server on a unix socket, and the kernel read-backs it
//! serves. The types and the client live in the `palisade-api` crate (re-exported here as
//! `types` and `client`, so the agent's own paths stay `crate::api::types::...`).
pub mod kernel;
pub mod server;

pub use palisade_api::{Client, ClientError, MonitorStream, client, types};
