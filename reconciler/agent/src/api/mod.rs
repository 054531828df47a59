//! The agent's local API: types, client and (in `server`) the HTTP server on a unix socket.
pub mod client;
pub mod types;

pub use client::{Client, ClientError, MonitorStream};
