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
//!
//! Every actor runs under [`supervise::start_supervised`]: a panic restarts it in place,
//! and [`Agent::resync`] makes every source hand in its state again while the resolver
//! holds the map writer back (the same gate a starting agent goes through).
pub mod endpoints;
pub mod identity;
pub mod map_writer;
pub mod policy_watch;
pub mod resolver;
pub mod supervise;

use std::cell::RefCell;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use actix::prelude::*;
use tokio::sync::broadcast;

use crate::api::types::MonitorEvent;
use crate::datapath::{
    AttachMode, Datapath, DatapathConfig, DatapathError, EventReader, MapBackend, MapSizes, Programs,
};
use crate::monitor::{DecodeContext, decode};
use crate::state::{EndpointRegistry, StateDir};
use supervise::start_supervised;

/// How the agent runs.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub bpffs: PathBuf,
    pub policy_dir: PathBuf,
    /// Where the endpoint registry and reserved prefixes are saved (see [`crate::state`]).
    pub state_dir: PathBuf,
    pub cluster: String,
    /// Time between full compares of the kernel maps with what was applied; zero: none.
    pub repair_interval: Duration,
    pub policy_rescan_interval: Duration,
    /// How often endpoints are checked for vanished interfaces.
    pub interface_check_interval: Duration,
    /// Another source (Kubernetes) must sync before anything is applied: it marks itself
    /// listed and calls [`Agent::resync_local`] once it has listed everything.
    pub external_sources: bool,
    /// Enables `POST /v1/debug/panic/{actor}` (tests only).
    pub fault_injection: bool,
    /// Sizes of the eBPF maps.
    pub map_sizes: MapSizes,
    /// How programs are attached; `None`: tcx where the kernel has it.
    pub attach_mode: Option<AttachMode>,
    /// Flow records kept for `palisade observe` (`--flow-buffer-size`).
    pub flow_buffer_size: usize,
    /// This node's name in flow records (default: the host name).
    pub node_name: String,
    /// `--policy-enforcement` and `--policy-audit-mode`.
    pub policy_mode: resolver::PolicyMode,
}

impl AgentConfig {
    /// The defaults of the command line for these directories.
    pub fn new(bpffs: PathBuf, policy_dir: PathBuf, state_dir: PathBuf) -> AgentConfig {
        AgentConfig {
            bpffs,
            policy_dir,
            state_dir,
            cluster: "default".into(),
            repair_interval: Duration::from_secs(10),
            policy_rescan_interval: Duration::from_secs(2),
            interface_check_interval: Duration::from_secs(1),
            external_sources: false,
            fault_injection: false,
            map_sizes: MapSizes::default(),
            attach_mode: None,
            flow_buffer_size: crate::flows::DEFAULT_BUFFER_SIZE,
            node_name: std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_default(),
            policy_mode: resolver::PolicyMode::default(),
        }
    }
}

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot start the datapath: {0}")]
    Datapath(#[from] DatapathError),
    #[error(
        "state directory {dir}: {source}; fix or remove the file (removing it forgets the endpoints registered so far)"
    )]
    State { dir: PathBuf, source: std::io::Error },
}

/// What a source outside the actors (Kubernetes) must hand in again on a resync: what the
/// restarted actor lost.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Forgotten {
    /// The policy watch restarted: policies handed in as text are gone.
    pub policies: bool,
    /// The identity cache restarted: other nodes' pods are gone.
    pub remote_endpoints: bool,
}

/// A resync request to an external source; it answers on `done` once it handed everything
/// in again.
pub struct ResendRequest {
    pub forgotten: Forgotten,
    pub done: tokio::sync::oneshot::Sender<()>,
}

/// Where resync requests for an external source go (registered by the source), and
/// whether it has listed everything once.
#[derive(Clone, Default)]
pub struct ExternalSource {
    requests: Arc<std::sync::Mutex<Option<tokio::sync::mpsc::UnboundedSender<ResendRequest>>>>,
    listed: Arc<std::sync::atomic::AtomicBool>,
}

impl ExternalSource {
    /// The source has listed everything once (or waiting for it was given up): resyncs may
    /// open the gate from now on.
    pub fn mark_listed(&self) {
        self.listed.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn listed(&self) -> bool {
        self.listed.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Registers the source; it receives a request on every resync.
    pub fn register(&self) -> tokio::sync::mpsc::UnboundedReceiver<ResendRequest> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        if let Ok(mut slot) = self.requests.lock() {
            *slot = Some(tx);
        }
        rx
    }

    /// Asks the source to hand in again what was forgotten; waits (bounded) for it.
    async fn resend(&self, forgotten: Forgotten) {
        let tx = self.requests.lock().ok().and_then(|s| s.clone());
        let Some(tx) = tx else { return };
        let (done, wait) = tokio::sync::oneshot::channel();
        if tx.send(ResendRequest { forgotten, done }).is_ok()
            && tokio::time::timeout(Duration::from_secs(30), wait).await.is_err()
        {
            tracing::warn!("the Kubernetes source did not resend in time");
        }
    }
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
    /// The flow records (`palisade observe`).
    pub flows: crate::flows::FlowStore,
    pub config: AgentConfig,
    /// Endpoint names and cookie attributions (the map writer keeps them current), for
    /// the API's read-back of the kernel maps.
    pub decode: Arc<RwLock<DecodeContext>>,
    /// The Kubernetes source, when it runs.
    pub external: ExternalSource,
    /// Notified whenever the endpoint tracker hands a change to the resolver.
    pub endpoints_changed: Arc<tokio::sync::Notify>,
    /// The kvstore connection and its options, once kvstore mode runs (its status and
    /// metrics).
    pub kvstore: Arc<std::sync::OnceLock<(Arc<crate::kvstore::Kv>, crate::kvstore::KvOptions)>>,
}

impl Agent {
    /// Loads (or adopts) the datapath, restores the endpoint registry, and starts every
    /// actor under supervision. Nothing is written to the maps until every source has
    /// handed in its state ([`Agent::resync`], called here unless
    /// [`AgentConfig::external_sources`]). Must run inside an actix system.
    pub fn start(config: AgentConfig) -> Result<Agent, StartError> {
        let registry = restore(&config)?;
        let mut datapath =
            Datapath::load_with_sizes(&DatapathConfig { pin_dir: config.bpffs.clone() }, &config.map_sizes)?;
        if let Some(mode) = config.attach_mode {
            datapath.set_attach_mode(mode);
        }
        // Links of interfaces that went away while no agent ran.
        match datapath.prune_stale_links() {
            Ok(gone) if !gone.is_empty() => {
                tracing::info!(interfaces = ?gone, "removed the link pins of vanished interfaces");
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "pruning stale link pins failed"),
        }
        let reader = datapath.take_events()?;
        let decode = Arc::new(RwLock::new(DecodeContext::default()));
        let map_writer = map_writer::MapWriter::new(datapath, decode.clone(), config.repair_interval)?;
        Ok(Agent::start_actors(config, &registry, map_writer, decode, Some(reader)))
    }

    /// [`Agent::start`] over any map backend and program attachment: the fakes
    /// (`datapath::FakeMaps`, `datapath::FakePrograms`) in tests without root. There are no
    /// verdict events; `config.bpffs` and `config.map_sizes` are not used.
    pub fn start_over(
        config: AgentConfig,
        maps: Box<dyn MapBackend + Send>,
        programs: Box<dyn Programs + Send>,
        timers: map_writer::WriterTimers,
    ) -> Result<Agent, StartError> {
        let registry = restore(&config)?;
        let decode = Arc::new(RwLock::new(DecodeContext::default()));
        let map_writer = map_writer::MapWriter::over(maps, programs, decode.clone(), timers)?;
        Ok(Agent::start_actors(config, &registry, map_writer, decode, None))
    }

    /// Starts every actor under supervision, the map writer being `map_writer`, and the
    /// verdict-event feed from `events_reader`.
    fn start_actors(
        config: AgentConfig,
        registry: &EndpointRegistry,
        map_writer: map_writer::MapWriter,
        decode_ctx: Arc<RwLock<DecodeContext>>,
        events_reader: Option<EventReader>,
    ) -> Agent {
        let state = StateDir::new(&config.state_dir);
        let decode_shared = decode_ctx.clone();
        // Filled once every actor runs; a restarted actor's hook resyncs through it.
        let cell: Rc<RefCell<Option<Agent>>> = Rc::default();
        let hook = {
            let cell = cell.clone();
            move |name: &'static str| {
                let agent = cell.borrow().clone();
                if let Some(agent) = agent {
                    // At once, before the restarted actor hands in anything (its `started`
                    // may publish a partial state): the resolver applies nothing until the
                    // resync below is through.
                    agent.resolver.do_send(resolver::HoldUntilSynced);
                    let forgotten =
                        Forgotten { policies: name == "policy_watch", remote_endpoints: name == "identity_cache" };
                    actix_rt::spawn(async move {
                        match agent.resync_with(Some(forgotten)).await {
                            Ok(rev) => {
                                supervise::record_resync(name, rev);
                                tracing::info!(actor = name, revision = rev, "state rebuilt after the restart");
                            }
                            Err(e) => tracing::error!(actor = name, error = %e, "resync after a restart failed"),
                        }
                    });
                }
            }
        };
        let map_writer = start_supervised("map_writer", map_writer, hook.clone());
        let resolver =
            start_supervised("resolver", resolver::Resolver::new(map_writer.clone(), config.policy_mode), hook.clone());
        let identities = start_supervised(
            "identity_cache",
            identity::IdentityCache::new(resolver.clone(), Some(state.clone())),
            hook.clone(),
        );
        let endpoints_changed = Arc::new(tokio::sync::Notify::new());
        let endpoints = start_supervised(
            "endpoint_tracker",
            endpoints::EndpointTracker::new(
                config.cluster.clone(),
                identities.clone(),
                resolver.clone(),
                Some(state),
                registry,
                config.interface_check_interval,
                endpoints_changed.clone(),
            ),
            hook.clone(),
        );
        let policy_watch = start_supervised(
            "policy_watch",
            policy_watch::PolicyWatch::new(config.policy_dir.clone(), resolver.clone(), config.policy_rescan_interval),
            hook,
        );
        let (events, _) = broadcast::channel(4096);
        let flows = crate::flows::FlowStore::new(config.flow_buffer_size);
        if let Ok(mut d) = decode_ctx.write() {
            d.node_name.clone_from(&config.node_name);
        }
        if let Some(reader) = events_reader {
            feed_events(reader, decode_ctx, events.clone(), flows.clone());
        }
        let agent = Agent {
            policy_watch,
            endpoints,
            identities,
            resolver,
            map_writer,
            events,
            flows,
            config,
            external: ExternalSource::default(),
            decode: decode_shared,
            endpoints_changed,
            kvstore: Arc::default(),
        };
        *cell.borrow_mut() = Some(agent.clone());
        if !agent.config.external_sources {
            let a = agent.clone();
            actix_rt::spawn(async move {
                match a.resync().await {
                    Ok(rev) => tracing::info!(revision = rev, "policy directory read and endpoints restored"),
                    Err(e) => tracing::error!(error = %e, "initial sync failed"),
                }
            });
        }
        agent
    }

    /// Makes every source hand its whole state to the resolver (the policy directory is
    /// re-read, the Kubernetes source runs a reconcile pass), then lets the resolver apply:
    /// at start (the sources-synced gate) and after an actor restart. The gate is closed
    /// meanwhile, so the kernel keeps what it has until everything is in. Answers the
    /// revision that includes everything.
    pub async fn resync(&self) -> Result<u64, actix::MailboxError> {
        self.resync_with(Some(Forgotten::default())).await
    }

    /// As [`Agent::resync`], without asking the Kubernetes source (which calls this itself
    /// once it has listed everything).
    pub async fn resync_local(&self) -> Result<u64, actix::MailboxError> {
        self.resync_with(None).await
    }

    async fn resync_with(&self, external: Option<Forgotten>) -> Result<u64, actix::MailboxError> {
        self.resolver.send(resolver::HoldUntilSynced).await?;
        self.policy_watch.send(policy_watch::Resync).await?;
        if let Err(e) = self.endpoints.send(endpoints::Republish).await? {
            tracing::warn!(error = %e, "republishing endpoints failed");
        }
        self.identities.send(identity::Republish).await?;
        if let Some(forgotten) = external {
            self.external.resend(forgotten).await;
        }
        if self.config.external_sources && !self.external.listed() {
            // Still starting: the Kubernetes source opens the gate once it has listed all.
            return self.resolver.send(resolver::CurrentRevision).await;
        }
        self.resolver.send(resolver::SourcesSynced).await
    }
}

/// The endpoint registry saved in the state directory, without the endpoints whose
/// interface is gone.
fn restore(config: &AgentConfig) -> Result<EndpointRegistry, StartError> {
    endpoints::restore_registry(&StateDir::new(&config.state_dir))
        .map_err(|source| StartError::State { dir: config.state_dir.clone(), source })
}

/// How long the verdict-event reader waits after a wake-up for more events to read at
/// once: the most a flow record or monitor event is delayed by the batching.
const EVENT_BATCH_WINDOW: Duration = Duration::from_millis(10);

/// Decodes the verdict events of `reader` (naming things with `names`) onto `events` and
/// into the flow buffer, on a thread of its own (not the actors' thread: a burst of drops
/// must not delay the actors).
fn feed_events(
    mut reader: EventReader,
    names: Arc<RwLock<DecodeContext>>,
    events: broadcast::Sender<MonitorEvent>,
    flows: crate::flows::FlowStore,
) {
    let spawned = std::thread::Builder::new().name("verdict-events".into()).spawn(move || {
        let runtime = match tokio::runtime::Builder::new_current_thread().enable_io().build() {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "cannot start the verdict-event reader; no monitor or flows");
                return;
            }
        };
        runtime.block_on(async move {
            let mut batch = Vec::new();
            loop {
                batch.clear();
                if let Err(e) = reader.next_batch(&mut batch).await {
                    tracing::error!(error = %e, "reading verdict events failed; the monitor stops");
                    return;
                }
                // The first event after a quiet spell woke this thread; the ones that follow
                // within the window are read with it, so a burst of new flows costs one
                // wake-up per window instead of one per event (the kernel wakes the reader
                // only once it has caught up).
                if batch.len() < crate::datapath::MAX_BATCH {
                    flows.wait_window(EVENT_BATCH_WINDOW);
                    reader.drain(&mut batch);
                }
                // Read for every batch (two vDSO clock reads): the wall clock may be stepped
                // (time sync, a resumed VM), and a stale offset would put this agent's records
                // out of order with another agent's records of the same packets.
                let offset = crate::flows::monotonic_to_unix_offset();
                let Ok(ctx) = names.read() else { return };
                for ev in &batch {
                    if events.receiver_count() > 0 {
                        let _ = events.send(decode(ev, &ctx));
                    }
                    let unix_ns = u64::try_from(i128::from(ev.ts_ns) + offset).unwrap_or(0);
                    let flow = crate::flows::to_flow(ev, &ctx, unix_ns);
                    tracing::debug!(verdict = %flow.verdict, summary = %flow.summary, "flow");
                    crate::metrics::global().flow_recorded(&flow);
                    flows.push(unix_ns, flow);
                }
                flows.window_done();
            }
        });
    });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the verdict-event thread; no monitor or flows");
    }
}
