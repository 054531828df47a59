//! When each revision was accepted (the resolver numbered a change of policies, endpoints
//! or identities) and when it was realized (the map writer finished writing a desired
//! state that includes it): the timestamps behind the policy-to-kernel latency. The API
//! status shows them; a metrics module can register an observer that gets the latency of
//! every realized revision.
//!
//! One clock per process: the agent runs one resolver and one map writer.
use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Accepted revisions kept until realized (older ones are dropped unobserved).
pub const PENDING_LIMIT: usize = 4096;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RevisionTimes {
    /// The latest accepted revision and when (ms since the Unix epoch).
    pub accepted_revision: u64,
    pub accepted_unix_ms: u64,
    /// The latest realized revision, when it was accepted and when it was realized.
    pub realized_revision: u64,
    pub realized_accepted_unix_ms: u64,
    pub realized_unix_ms: u64,
}

struct Clock {
    pending: VecDeque<(u64, Instant, u64)>,
    times: RevisionTimes,
    observer: Option<fn(Duration)>,
}

static CLOCK: Mutex<Clock> = Mutex::new(Clock { pending: VecDeque::new(), times: RevisionTimes::ZERO, observer: None });

impl RevisionTimes {
    const ZERO: RevisionTimes = RevisionTimes {
        accepted_revision: 0,
        accepted_unix_ms: 0,
        realized_revision: 0,
        realized_accepted_unix_ms: 0,
        realized_unix_ms: 0,
    };
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// The resolver accepted `revision` now.
pub fn accepted(revision: u64) {
    let Ok(mut c) = CLOCK.lock() else { return };
    let ms = unix_ms();
    if c.pending.len() >= PENDING_LIMIT {
        c.pending.pop_front();
    }
    c.pending.push_back((revision, Instant::now(), ms));
    c.times.accepted_revision = revision;
    c.times.accepted_unix_ms = ms;
}

/// Everything up to `revision` is in the kernel now: each pending revision it covers is
/// realized (the observer gets its latency).
pub fn realized(revision: u64) {
    let Ok(mut c) = CLOCK.lock() else { return };
    if revision <= c.times.realized_revision && c.times.realized_unix_ms != 0 {
        return;
    }
    let now = Instant::now();
    let ms = unix_ms();
    let mut accepted_ms = None;
    while c.pending.front().is_some_and(|(r, _, _)| *r <= revision) {
        let (_, at, at_ms) = c.pending.pop_front().expect("just seen");
        if let Some(observe) = c.observer {
            observe(now.duration_since(at));
        }
        accepted_ms = Some(at_ms);
    }
    c.times.realized_revision = revision;
    c.times.realized_unix_ms = ms;
    if let Some(a) = accepted_ms {
        c.times.realized_accepted_unix_ms = a;
    }
}

/// The current timestamps.
pub fn times() -> RevisionTimes {
    CLOCK.lock().map(|c| c.times).unwrap_or_default()
}

/// Registers the function that gets the accept-to-realize latency of every revision.
pub fn set_observer(f: fn(Duration)) {
    if let Ok(mut c) = CLOCK.lock() {
        c.observer = Some(f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static SEEN: Mutex<Vec<Duration>> = Mutex::new(Vec::new());

    fn observe(d: Duration) {
        SEEN.lock().unwrap().push(d);
    }

    #[test]
    fn realizing_a_revision_observes_every_revision_it_covers() {
        set_observer(observe);
        accepted(1);
        accepted(2);
        accepted(3);
        let t = times();
        assert_eq!(t.accepted_revision, 3);
        assert!(t.accepted_unix_ms > 0);
        realized(2);
        assert_eq!(SEEN.lock().unwrap().len(), 2, "revisions 1 and 2");
        let t = times();
        assert_eq!(t.realized_revision, 2);
        assert!(t.realized_unix_ms >= t.realized_accepted_unix_ms && t.realized_accepted_unix_ms > 0);
        // Realizing the same revision again observes nothing new.
        realized(2);
        assert_eq!(SEEN.lock().unwrap().len(), 2);
        realized(3);
        assert_eq!(SEEN.lock().unwrap().len(), 3);
    }
}
