//! What the map writer has realized: per endpoint (entries loaded, enforcement, directions
//! failing closed), the realized revision and those waiting for one ([`RevisionWaiters`]),
//! and its counters; all reported through `GET /v1/status`.
use std::collections::BTreeMap;

use palisade_common::{direction, endpoint_flags};
use tokio::sync::oneshot;

use crate::mapstate::{EndpointMapping, Fitted, MapLimits};

/// What the map writer last applied, per endpoint.
#[derive(Clone, Debug, Default)]
pub struct RealizedEndpoint {
    pub realized_revision: u64,
    pub policy_entries: usize,
    pub ingress_enforced: bool,
    pub egress_enforced: bool,
    /// Directions ("ingress", "egress") denied entirely because their entries do not fit
    /// in the maps.
    pub fail_closed: Vec<String>,
}

/// Counters of the map writer (monotonic, since the agent started).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriterCounters {
    /// Periodic full compares of the kernel maps with what was applied.
    pub drift_checks: u64,
    /// Map operations made to undo changes made behind the agent's back.
    pub drift_repairs: u64,
    /// Applies whose desired state did not fit in a map.
    pub map_overflows: u64,
    /// Applies that failed (retried).
    pub apply_failures: u64,
}

/// What is realized: the revision, per-endpoint state, attach mode and warnings.
#[derive(Clone, Debug, Default)]
pub struct RealizedState {
    pub revision: u64,
    pub endpoints: BTreeMap<u16, RealizedEndpoint>,
    pub attach_mode: String,
    pub warnings: Vec<String>,
    /// What did not fit in the maps at the last apply (empty when everything fits).
    pub map_errors: Vec<String>,
    pub counters: WriterCounters,
    /// The sizes of the maps the agent writes.
    pub limits: Option<MapLimits>,
}

/// The realized state of every endpoint of `mappings` at `revision`: what is loaded
/// (`fitted.state`), not what was asked for.
pub fn realized_endpoints(
    revision: u64,
    mappings: &[EndpointMapping],
    fitted: &Fitted,
) -> BTreeMap<u16, RealizedEndpoint> {
    let mut entries: BTreeMap<u16, usize> = BTreeMap::new();
    for (_, k) in fitted.state.policy.keys() {
        *entries.entry(k.endpoint_id()).or_default() += 1;
    }
    let flags: BTreeMap<u16, u32> = fitted.state.endpoints.values().map(|i| (i.endpoint_id as u16, i.flags)).collect();
    mappings
        .iter()
        .map(|m| {
            let f = flags.get(&m.id).copied().unwrap_or(0);
            let closed = |d: u8, name: &str| fitted.fail_closed.contains(&(m.id, d)).then(|| name.to_string());
            let realized = RealizedEndpoint {
                realized_revision: revision,
                policy_entries: entries.get(&m.id).copied().unwrap_or(0),
                ingress_enforced: f & endpoint_flags::INGRESS_ENFORCED != 0,
                egress_enforced: f & endpoint_flags::EGRESS_ENFORCED != 0,
                fail_closed: [closed(direction::INGRESS, "ingress"), closed(direction::EGRESS, "egress")]
                    .into_iter()
                    .flatten()
                    .collect(),
            };
            (m.id, realized)
        })
        .collect()
}

/// The realized revision, and who waits for a later one.
#[derive(Debug, Default)]
pub struct RevisionWaiters {
    realized: u64,
    waiting: Vec<(u64, oneshot::Sender<u64>)>,
}

impl RevisionWaiters {
    /// The highest revision realized so far.
    pub fn realized(&self) -> u64 {
        self.realized
    }

    /// `revision` is realized (the realized revision never goes back): answers everyone
    /// waiting for it or an earlier one, forgets those who stopped waiting.
    pub fn realize(&mut self, revision: u64) {
        self.realized = self.realized.max(revision);
        let realized = self.realized;
        for (rev, tx) in std::mem::take(&mut self.waiting) {
            if rev <= realized {
                let _ = tx.send(realized);
            } else if !tx.is_closed() {
                self.waiting.push((rev, tx));
            }
        }
    }

    /// The realized revision if it is `revision` or later, else a receiver answered once it
    /// is.
    pub fn wait(&mut self, revision: u64) -> Result<u64, oneshot::Receiver<u64>> {
        if self.realized >= revision {
            return Ok(self.realized);
        }
        let (tx, rx) = oneshot::channel();
        self.waiting.push((revision, tx));
        Err(rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waiters_are_answered_once_their_revision_is_realized() {
        let mut w = RevisionWaiters::default();
        let mut early = w.wait(2).unwrap_err();
        let mut late = w.wait(5).unwrap_err();
        let gone = w.wait(4).unwrap_err();
        drop(gone);
        w.realize(3);
        assert_eq!(early.try_recv(), Ok(3));
        assert!(late.try_recv().is_err(), "5 is not realized yet");
        assert_eq!(w.waiting.len(), 1, "the waiter that gave up is forgotten");
        w.realize(1);
        assert_eq!(w.realized(), 3, "the realized revision never goes back");
        assert_eq!(w.wait(3).ok(), Some(3));
        w.realize(7);
        assert_eq!(late.try_recv(), Ok(7));
        assert!(w.waiting.is_empty());
    }
}
