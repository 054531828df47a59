//! The agent's local API: types, client, and the HTTP server on a unix socket.
pub mod client;
pub mod kernel;
pub mod server;
pub mod types;

pub use client::{Client, ClientError, MonitorStream};
