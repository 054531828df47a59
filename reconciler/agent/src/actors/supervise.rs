//! Supervision: every actor runs under [`start_supervised`], which catches a panic in any of
//! its handlers, restarts the actor in place (same address, so nobody holding it notices;
//! the message being handled is lost and pending replies fail) and calls a hook. The
//! actor's [`Supervised::restarting`] drops the state the panic may have left half-done and
//! reloads what it owns from its source of truth (policy files, the state directory); the
//! hook then makes every source hand its state to the resolver again, which recomputes the
//! desired state, and the map writer plans it against a fresh dump of the pinned maps.
//!
//! An actor that keeps panicking ([`MAX_RESTARTS`] within [`RESTART_WINDOW`]) ends the
//! process: the datapath stays loaded, and whatever restarts the agent (the DaemonSet)
//! starts it afresh.
//!
//! Fault injection (tests only): with `--fault-injection`, `POST /v1/debug/panic/{actor}`
//! sends [`InjectPanic`] to one actor, which panics in its handler.
use std::collections::BTreeMap;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{self, Poll};
use std::time::{Duration, Instant};

use actix::dev::ContextFut;
use actix::prelude::*;

/// Restarts allowed within [`RESTART_WINDOW`] before the process gives up.
pub const MAX_RESTARTS: usize = 5;
pub const RESTART_WINDOW: Duration = Duration::from_mins(1);

/// Restarts per actor since the process started.
static RESTARTS: Mutex<BTreeMap<&'static str, u64>> = Mutex::new(BTreeMap::new());

/// How many times each actor was restarted after a panic.
pub fn restarts() -> BTreeMap<&'static str, u64> {
    RESTARTS.lock().map(|m| m.clone()).unwrap_or_default()
}

/// Resyncs completed after a restart, per actor: (count, revision of the last one).
static RESYNCED: Mutex<BTreeMap<&'static str, (u64, u64)>> = Mutex::new(BTreeMap::new());

/// Records that the resync after a restart of `actor` completed at `revision`.
pub fn record_resync(actor: &'static str, revision: u64) {
    if let Ok(mut m) = RESYNCED.lock() {
        let e = m.entry(actor).or_default();
        e.0 += 1;
        e.1 = revision;
    }
}

/// Per actor: how many resyncs after a restart completed, and the last one's revision.
pub fn resyncs() -> BTreeMap<&'static str, (u64, u64)> {
    RESYNCED.lock().map(|m| m.clone()).unwrap_or_default()
}

/// Starts `act` on the current arbiter under a supervisor that restarts it after a panic
/// and then calls `on_restart(name)`.
pub fn start_supervised<A>(name: &'static str, act: A, on_restart: impl Fn(&'static str) + 'static) -> Addr<A>
where
    A: Actor<Context = Context<A>> + Supervised,
{
    let ctx = Context::new();
    let addr = ctx.address();
    let fut = ctx.into_future(act);
    actix_rt::spawn(PanicSupervisor { name, fut, on_restart: Box::new(on_restart), recent: Vec::new() });
    addr
}

struct PanicSupervisor<A: Actor<Context = Context<A>>> {
    name: &'static str,
    fut: ContextFut<A, Context<A>>,
    on_restart: Box<dyn Fn(&'static str)>,
    recent: Vec<Instant>,
}

impl<A> Future for PanicSupervisor<A>
where
    A: Actor<Context = Context<A>> + Supervised,
{
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut task::Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        loop {
            let polled = catch_unwind(AssertUnwindSafe(|| Pin::new(&mut this.fut).poll(cx)));
            match polled {
                Ok(Poll::Pending) => return Poll::Pending,
                // Stopped on purpose (every address dropped): done.
                Ok(Poll::Ready(())) => return Poll::Ready(()),
                Err(payload) => {
                    let what = panic_text(payload.as_ref());
                    let now = Instant::now();
                    this.recent.retain(|t| now.duration_since(*t) < RESTART_WINDOW);
                    this.recent.push(now);
                    if let Ok(mut m) = RESTARTS.lock() {
                        *m.entry(this.name).or_default() += 1;
                    }
                    if this.recent.len() > MAX_RESTARTS {
                        tracing::error!(actor = this.name, panic = %what, "actor keeps panicking ({} times within {:?}); exiting, the datapath stays loaded", this.recent.len(), RESTART_WINDOW);
                        std::process::exit(70);
                    }
                    tracing::error!(actor = this.name, panic = %what, "actor panicked; restarting it and rebuilding its state from the sources of truth");
                    if !this.fut.restart() {
                        return Poll::Ready(());
                    }
                    (this.on_restart)(this.name);
                }
            }
        }
    }
}

fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".into()
    }
}

/// Makes the receiving actor panic in its handler (fault injection for tests).
#[derive(Message)]
#[rtype(result = "()")]
pub struct InjectPanic;

macro_rules! panics_on_request {
    ($($actor:ty),*) => {$(
        impl Handler<InjectPanic> for $actor {
            type Result = ();
            fn handle(&mut self, _: InjectPanic, _: &mut Context<Self>) {
                panic!("fault injection: {} panics on request", stringify!($actor));
            }
        }
    )*};
}

panics_on_request!(
    super::policy_watch::PolicyWatch,
    super::endpoints::EndpointTracker,
    super::identity::IdentityCache,
    super::resolver::Resolver,
    super::map_writer::MapWriter
);

/// The map writer keeps its handles (datapath, maps) across a restart: nothing it holds
/// besides them is authoritative. The resync that follows a restart makes the resolver
/// send the full desired state again, which the map writer plans against a fresh dump of
/// the pinned maps, attaching again (adopting the pinned links) where needed.
impl Supervised for super::map_writer::MapWriter {}
