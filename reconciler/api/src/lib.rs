//! The palisade agent's local API as its users see it: the request and response bodies
//! ([`types`], JSON over HTTP/1.1 on a unix socket) and the [`Client`] the CLI, the CNI
//! plugin and the testbed call it with. The agent serves these types
//! (`palisade_agent::api::server`). Nothing here pulls in the agent's runtime: no actor,
//! eBPF or Kubernetes crate, so the small binaries stay small.
pub mod client;
pub mod flow;
pub mod types;

pub use client::{Client, ClientError, FlowStream, LineStream, MonitorStream};
