//! Map writer actor: the message plumbing around [`Writer`] (`crate::writer`), the only
//! writer of eBPF maps. It coalesces desired states ([`ApplyDesired`]: a burst is applied
//! once, at its latest), runs the retry and drift-check timers, and answers
//! [`WaitRealized`] and [`GetRealized`].
use std::sync::{Arc, RwLock};
use std::time::Duration;

use actix::prelude::*;
use palisade_common::config as bpf_config;

use crate::datapath::{Datapath, DatapathError, MapBackend, Programs};
pub use crate::datapath::{apply_plan, read_state};
use crate::monitor::DecodeContext;
pub use crate::writer::{
    Desired as ApplyDesired, RealizedEndpoint, RealizedState, WriterCounters, explain_fail_closed,
};
use crate::writer::{Desired, Writer};

/// How often the map writer's timers run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriterTimers {
    /// Between full compares of the maps with what was applied; zero: none.
    pub drift_interval: Duration,
    /// Between retries of a failed apply.
    pub retry_interval: Duration,
    /// Between retries of failed attachments when the drift check is off.
    pub attach_retry_interval: Duration,
}

impl WriterTimers {
    /// The agent's timers, with a drift check every `drift_interval` (zero: none).
    pub fn new(drift_interval: Duration) -> WriterTimers {
        WriterTimers {
            drift_interval,
            retry_interval: Duration::from_secs(2),
            attach_retry_interval: Duration::from_secs(10),
        }
    }
}

pub struct MapWriter {
    writer: Writer,
    /// The latest desired state handed in and not applied yet.
    pending: Option<Desired>,
    timers: WriterTimers,
}

impl MapWriter {
    /// The map writer of the loaded datapath: writes its maps, attaches its programs.
    /// `drift_interval`: time between full compares of the kernel maps with what was
    /// applied (zero turns them off).
    pub fn new(
        mut datapath: Datapath,
        decode: Arc<RwLock<DecodeContext>>,
        drift_interval: Duration,
    ) -> Result<Self, DatapathError> {
        let mut maps = datapath.take_maps()?;
        maps.config.set(bpf_config::FLAGS, bpf_config::FLAG_EMIT_ALLOW_EVENTS, 0)?;
        MapWriter::over(Box::new(maps), Box::new(datapath), decode, WriterTimers::new(drift_interval))
    }

    /// A map writer of any backend: the kernel's, or the fakes in tests.
    pub fn over(
        maps: Box<dyn MapBackend + Send>,
        programs: Box<dyn Programs + Send>,
        decode: Arc<RwLock<DecodeContext>>,
        timers: WriterTimers,
    ) -> Result<Self, DatapathError> {
        Ok(MapWriter { writer: Writer::new(maps, programs, decode)?, pending: None, timers })
    }
}

impl Actor for MapWriter {
    type Context = Context<Self>;
    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.run_interval(self.timers.retry_interval, |act, _| act.writer.retry());
        if self.timers.drift_interval.is_zero() {
            tracing::info!("periodic drift check of the eBPF maps is off");
            ctx.run_interval(self.timers.attach_retry_interval, |act, _| act.writer.periodic(false));
        } else {
            ctx.run_interval(self.timers.drift_interval, |act, _| act.writer.periodic(true));
        }
    }
}

impl Message for Desired {
    type Result = ();
}

/// A desired state waits in `pending` until the messages already queued are handled,
/// so that a burst of revisions is applied once, at its latest.
impl Handler<Desired> for MapWriter {
    type Result = ();
    fn handle(&mut self, msg: Desired, ctx: &mut Context<Self>) {
        if self.pending.replace(msg).is_none() {
            ctx.notify(ApplyPending);
        }
    }
}

/// Applies the latest desired state handed in (see [`ApplyDesired`]).
#[derive(Message)]
#[rtype(result = "()")]
struct ApplyPending;

impl Handler<ApplyPending> for MapWriter {
    type Result = ();
    fn handle(&mut self, _: ApplyPending, _: &mut Context<Self>) {
        let Some(msg) = self.pending.take() else { return };
        let span = tracing::info_span!("reconcile", revision = msg.revision);
        let _g = span.enter();
        self.writer.apply(msg);
    }
}

/// Waits until `revision` is realized (answers the realized revision), or times out
/// (answers `None`).
#[derive(Message)]
#[rtype(result = "Option<u64>")]
pub struct WaitRealized {
    pub revision: u64,
    pub timeout: Duration,
}

impl Handler<WaitRealized> for MapWriter {
    type Result = ResponseFuture<Option<u64>>;
    fn handle(&mut self, msg: WaitRealized, _: &mut Context<Self>) -> Self::Result {
        match self.writer.wait(msg.revision) {
            Ok(r) => Box::pin(async move { Some(r) }),
            Err(rx) => Box::pin(async move { tokio::time::timeout(msg.timeout, rx).await.ok().and_then(Result::ok) }),
        }
    }
}

/// What is realized: the revision, per-endpoint state, attach mode and warnings.
#[derive(Message)]
#[rtype(result = "RealizedState")]
pub struct GetRealized;

impl Handler<GetRealized> for MapWriter {
    type Result = MessageResult<GetRealized>;
    fn handle(&mut self, _: GetRealized, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.writer.realized_state())
    }
}
