//! Removal of everything a run creates, whatever way the run ends.
//!
//! Every resource (network namespace, agent process, directory) registers its removal here
//! *before* it is created and holds a [`Guard`]. The guard runs the removal when dropped:
//! on success, on error and while unwinding from a panic. On SIGINT, SIGTERM or SIGHUP a
//! dedicated thread runs every removal still registered (newest first), waits for removals
//! other threads are in the middle of, and exits with 128 + the signal number.
use std::collections::BTreeMap;
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use nix::sys::signal::{SigSet, Signal};

type Action = Box<dyn FnOnce() + Send>;

#[derive(Default)]
struct State {
    next_id: u64,
    /// Registered removals by id (ids grow with registration order).
    actions: BTreeMap<u64, (String, Action)>,
    /// Removals being run right now by some thread.
    running: usize,
    /// A signal arrived: the process is being torn down.
    terminating: bool,
}

struct Registry {
    state: Mutex<State>,
    idle: Condvar,
}

fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(|| Registry { state: Mutex::new(State::default()), idle: Condvar::new() })
}

fn lock() -> MutexGuard<'static, State> {
    // A panic while holding the lock cannot leave the map half-updated: recover it.
    registry().state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The process is being torn down after a signal: nothing new may be created.
#[derive(Debug, thiserror::Error)]
#[error("interrupted: the testbed is cleaning up and exiting")]
pub struct Terminating;

/// Runs its removal when dropped (or by [`Guard::release`]).
#[must_use = "dropping the guard removes the resource at once"]
pub struct Guard {
    id: u64,
}

impl std::fmt::Debug for Guard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cleanup::Guard({})", self.id)
    }
}

/// Registers `action` (which must tolerate the resource not existing, or existing only in
/// part) as the removal of `what`. Call it before creating the resource.
pub fn register(what: impl Into<String>, action: impl FnOnce() + Send + 'static) -> Result<Guard, Terminating> {
    let mut st = lock();
    if st.terminating {
        return Err(Terminating);
    }
    st.next_id += 1;
    let id = st.next_id;
    st.actions.insert(id, (what.into(), Box::new(action)));
    Ok(Guard { id })
}

impl Guard {
    /// Runs the removal now.
    pub fn release(self) {
        drop(self);
    }

    /// Forgets the removal without running it (the resource is kept on purpose).
    pub fn disarm(self) {
        lock().actions.remove(&self.id);
        std::mem::forget(self);
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let action = {
            let mut st = lock();
            let a = st.actions.remove(&self.id);
            if a.is_some() {
                st.running += 1;
            }
            a
        };
        if let Some((_, action)) = action {
            action();
            let mut st = lock();
            st.running -= 1;
            registry().idle.notify_all();
        }
    }
}

/// Descriptions of the removals still registered (for tests and debugging).
pub fn pending() -> Vec<String> {
    lock().actions.values().map(|(w, _)| w.clone()).collect()
}

/// Runs every registered removal, newest first, and waits (bounded) for removals that other
/// threads are running. Afterwards nothing can be registered any more.
pub fn run_all() {
    let actions: Vec<(String, Action)> = {
        let mut st = lock();
        st.terminating = true;
        let taken = std::mem::take(&mut st.actions);
        st.running += taken.len();
        taken.into_values().rev().collect()
    };
    for (what, action) in actions {
        eprintln!("palisade-testbed: removing {what}");
        action();
        lock().running -= 1;
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut st = lock();
    while st.running > 0 {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            eprintln!("palisade-testbed: gave up waiting for {} removal(s) in progress", st.running);
            break;
        }
        st = registry().idle.wait_timeout(st, left).unwrap_or_else(std::sync::PoisonError::into_inner).0;
    }
}

/// Signals that stop a run.
const STOP_SIGNALS: [Signal; 3] = [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP];

/// Blocks the stop signals in the calling thread (and so in every thread it starts later)
/// and starts the thread that waits for them and cleans up. Call it first thing in `main`,
/// before any other thread exists. Child processes inherit the mask: one that must react to
/// signals (the agent) has to unblock them before exec.
pub fn install_signal_handler() -> std::io::Result<()> {
    let mut set = SigSet::empty();
    for s in STOP_SIGNALS {
        set.add(s);
    }
    set.thread_block().map_err(std::io::Error::from)?;
    std::thread::Builder::new().name("signals".into()).spawn(move || {
        loop {
            let Ok(sig) = set.wait() else { continue };
            eprintln!("palisade-testbed: {sig} received: removing everything this run created");
            run_all();
            std::process::exit(128 + sig as i32);
        }
    })?;
    Ok(())
}

/// Whether a signal's cleanup is under way (errors seen meanwhile are its consequences).
pub fn terminating() -> bool {
    lock().terminating
}

/// Call before the process exits normally: if a signal's cleanup is under way, waits for it
/// (that thread ends the process), so that `main` returning cannot cut it short.
pub fn finish() {
    let st = lock();
    if st.terminating {
        let _parked = registry().idle.wait_while(st, |_| true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn guard_runs_its_removal_once_when_dropped() {
        let n = Arc::new(AtomicUsize::new(0));
        let m = n.clone();
        let g = register("test resource a", move || {
            m.fetch_add(1, Ordering::SeqCst);
        })
        .unwrap();
        assert!(pending().iter().any(|w| w == "test resource a"));
        drop(g);
        assert_eq!(n.load(Ordering::SeqCst), 1);
        assert!(!pending().iter().any(|w| w == "test resource a"));
    }

    #[test]
    fn disarmed_guard_does_not_run() {
        let n = Arc::new(AtomicUsize::new(0));
        let m = n.clone();
        let g = register("test resource b", move || {
            m.fetch_add(1, Ordering::SeqCst);
        })
        .unwrap();
        g.disarm();
        assert_eq!(n.load(Ordering::SeqCst), 0);
        assert!(!pending().iter().any(|w| w == "test resource b"));
    }

    #[test]
    fn guard_runs_while_unwinding() {
        let n = Arc::new(AtomicUsize::new(0));
        let m = n.clone();
        let r = std::panic::catch_unwind(move || {
            let _g = register("test resource c", move || {
                m.fetch_add(1, Ordering::SeqCst);
            })
            .unwrap();
            panic!("boom");
        });
        assert!(r.is_err());
        assert_eq!(n.load(Ordering::SeqCst), 1);
    }
}
