//! The agent's actors and how they are wired:
//!
//! ```text
//! PolicyWatch --PoliciesChanged--> Resolver <--EndpointsChanged-- EndpointTracker
//!                                   ^    |                            |
//!                  IdentitiesChanged|    |ApplyDesired                | Allocate/ReleaseIdentity
//!                                   |    v                            v
//!                      IdentityCache     MapWriter --> pinned eBPF maps, tc attachments
//! ```
//!
//! Each actor owns its state; the logic they run lives in plain modules (palisade-policy,
//! [`crate::mapstate`], [`crate::monitor`]) that tests drive without actix or a kernel.
pub mod endpoints;
pub mod identity;
pub mod map_writer;
pub mod policy_watch;
pub mod resolver;

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use actix::prelude::*;
use tokio::sync::broadcast;

use crate::api::types::MonitorEvent;
use crate::datapath::{Datapath, DatapathConfig, DatapathError, MapSizes};
use crate::monitor::{DecodeContext, decode};

/// How the agent runs.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub bpffs: PathBuf,
    pub policy_dir: PathBuf,
    pub cluster: String,
    /// Time between full compares of the kernel maps with what was applied; zero: none.
    pub repair_interval: Duration,
    pub policy_rescan_interval: Duration,
    /// Sizes of the eBPF maps.
    pub map_sizes: MapSizes,
}

/// Addresses of the running actors, and the verdict-event feed.
#[derive(Clone)]
pub struct Agent {
    pub policy_watch: Addr<policy_watch::PolicyWatch>,
    pub endpoints: Addr<endpoints::EndpointTracker>,
    pub identities: Addr<identity::IdentityCache>,
    pub resolver: Addr<resolver::Resolver>,
    pub map_writer: Addr<map_writer::MapWriter>,
    pub events: broadcast::Sender<MonitorEvent>,
    pub config: AgentConfig,
}

impl Agent {
    /// Loads the datapath and starts every actor. Must run inside an actix system.
    pub fn start(config: AgentConfig) -> Result<Agent, DatapathError> {
        let mut datapath =
            Datapath::load_with_sizes(&DatapathConfig { pin_dir: config.bpffs.clone() }, &config.map_sizes)?;
        let mut reader = datapath.take_events()?;
        let decode_ctx = Arc::new(RwLock::new(DecodeContext::default()));
        let map_writer = map_writer::MapWriter::new(datapath, decode_ctx.clone(), config.repair_interval)?.start();
        let resolver = resolver::Resolver::new(map_writer.clone()).start();
        let identities = identity::IdentityCache::new(resolver.clone()).start();
        let endpoints =
            endpoints::EndpointTracker::new(config.cluster.clone(), identities.clone(), resolver.clone()).start();
        let policy_watch = policy_watch::PolicyWatch::new(
            config.policy_dir.clone(),
            resolver.clone(),
            endpoints.clone(),
            config.policy_rescan_interval,
        )
        .start();
        let (events, _) = broadcast::channel(4096);
        let tx = events.clone();
        actix_rt::spawn(async move {
            let mut batch = Vec::new();
            loop {
                batch.clear();
                if let Err(e) = reader.next_batch(&mut batch).await {
                    tracing::error!(error = %e, "reading verdict events failed; the monitor stops");
                    return;
                }
                let Ok(ctx) = decode_ctx.read() else { return };
                for ev in &batch {
                    let m = decode(ev, &ctx);
                    tracing::debug!(endpoint = ?m.endpoint, verdict = %m.verdict, reason = %m.reason, src = %m.src, dst = %m.dst, dport = m.dst_port, proto = %m.protocol, "verdict");
                    let _ = tx.send(m);
                }
            }
        });
        Ok(Agent { policy_watch, endpoints, identities, resolver, map_writer, events, config })
    }
}
