//! The map writer's logic as a plain struct ([`Writer`]), which the map writer actor
//! (`actors::map_writer`) drives and tests drive without actix or root (over
//! [`FakeMaps`](crate::datapath::FakeMaps) and [`FakePrograms`](crate::datapath::FakePrograms)).
//!
//! For every desired state it attaches the programs to new pod interfaces, encodes the
//! state for the kernel (`mapstate::encode`), cuts it to the map sizes (`mapstate::fit`:
//! what does not fit fails closed, reported by [`overflow`]), plans it against what it
//! last applied (read from the maps at start and after a failed apply) and writes the plan
//! with the ordered applier (`datapath::apply_plan`). It keeps what is realized
//! ([`realized`]) and answers those waiting for a revision; periodically it compares the
//! maps with what it applied and repairs the difference (drift).
pub mod overflow;
pub mod realized;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use palisade_policy::model::Policy;
use palisade_policy::resolve::DesiredState;
use tokio::sync::oneshot;

pub use overflow::{explain_fail_closed, overflow_errors};
pub use realized::{RealizedEndpoint, RealizedState, RevisionWaiters, WriterCounters, realized_endpoints};

use crate::actors::identity::Prefix;
use crate::datapath::{DatapathError, MapBackend, Programs, apply_plan, map_limits, read_state};
use crate::endpoint::LocalEndpoint;
use crate::mapstate::{CookieJar, EncodeCache, EndpointMapping, Fitted, MapLimits, MapState, encode_cached, fit, plan};
use crate::monitor::DecodeContext;

/// Most plan lines logged per apply.
const MAX_LOGGED_OPERATIONS: usize = 200;

/// The desired state at a revision, as the resolver hands it to the map writer.
#[derive(Clone)]
pub struct Desired {
    pub revision: u64,
    pub desired: Arc<DesiredState>,
    pub endpoints: Arc<Vec<LocalEndpoint>>,
    pub ipcache: Arc<BTreeMap<Prefix, u32>>,
    pub policies: Arc<Vec<Policy>>,
}

/// How long each stage of one apply took.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StageTimes {
    /// Attaching the programs to new interfaces (and detaching from gone ones).
    pub attach: Duration,
    /// Encoding the desired state for the kernel.
    pub encode: Duration,
    /// Fitting it to the map sizes and planning it against what is loaded (including the
    /// read of the maps when what is loaded is not known).
    pub plan: Duration,
    /// Writing the plan.
    pub apply: Duration,
}

/// What one apply did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// Map operations written.
    pub operations: usize,
    pub times: StageTimes,
}

/// The map writer: the only writer of the maps of its [`MapBackend`].
pub struct Writer {
    maps: Box<dyn MapBackend + Send>,
    programs: Box<dyn Programs + Send>,
    limits: MapLimits,
    cookies: CookieJar,
    /// Interfaces the programs are attached to.
    attached: BTreeSet<String>,
    /// The last desired state handed in (applied or not).
    last: Option<Desired>,
    /// The policy entries of every endpoint as last encoded.
    encoded: EncodeCache,
    /// What the maps hold as far as the writer knows: what it last wrote. `None` at start
    /// (the first apply reads the maps, which adopts what an earlier agent left) and after
    /// a failed apply (the retry reads them again).
    applied: Option<MapState>,
    revisions: RevisionWaiters,
    realized: BTreeMap<u16, RealizedEndpoint>,
    decode: Arc<RwLock<DecodeContext>>,
    warnings: Vec<String>,
    /// Why the last apply could not load everything (maps too small).
    map_errors: Vec<String>,
    counters: WriterCounters,
}

impl Writer {
    /// A writer of `maps` attaching with `programs`; keeps `decode` (what the monitor
    /// needs to name endpoints and policies) current.
    pub fn new(
        maps: Box<dyn MapBackend + Send>,
        programs: Box<dyn Programs + Send>,
        decode: Arc<RwLock<DecodeContext>>,
    ) -> Result<Writer, DatapathError> {
        let limits = map_limits(&*maps)?;
        Ok(Writer {
            maps,
            programs,
            limits,
            cookies: CookieJar::default(),
            attached: BTreeSet::new(),
            last: None,
            encoded: EncodeCache::default(),
            applied: None,
            revisions: RevisionWaiters::default(),
            realized: BTreeMap::new(),
            decode,
            warnings: Vec::new(),
            map_errors: Vec::new(),
            counters: WriterCounters::default(),
        })
    }

    /// Makes the maps hold `desired` (the latest desired state): on failure, says so in
    /// status and leaves it to [`Writer::retry`].
    pub fn apply(&mut self, desired: Desired) {
        match self.reconcile(&desired) {
            Ok(_) => self.warnings.clear(),
            Err(e) => {
                self.counters.apply_failures += 1;
                tracing::error!(error = %e, "applying the desired state failed; retrying");
                self.warnings = vec![format!("last apply failed: {e}")];
            }
        }
        self.last = Some(desired);
    }

    /// Retries the last desired state if its apply failed.
    pub fn retry(&mut self) {
        if self.applied.is_some() {
            return;
        }
        let Some(last) = self.last.take() else { return };
        match self.reconcile(&last) {
            Ok(_) => {
                tracing::info!(revision = last.revision, "retried apply succeeded");
                self.warnings.clear();
            }
            Err(e) => {
                self.counters.apply_failures += 1;
                tracing::error!(error = %e, "retrying the apply failed; retrying again");
                self.warnings = vec![format!("last apply failed: {e}")];
            }
        }
        self.last = Some(last);
    }

    /// Attaches to interfaces whose attachment failed, then (when `drift_check`) compares
    /// every map with what was applied and repairs the difference.
    pub fn periodic(&mut self, drift_check: bool) {
        let missing =
            self.last.as_ref().is_some_and(|l| l.endpoints.iter().any(|e| !self.attached.contains(&e.interface)));
        if (missing || self.applied.is_none())
            && let Some(last) = self.last.take()
        {
            if let Err(e) = self.reconcile(&last) {
                self.counters.apply_failures += 1;
                tracing::error!(error = %e, "periodic apply failed");
            }
            self.last = Some(last);
        }
        if drift_check && let Err(e) = self.check_drift() {
            tracing::error!(error = %e, "the periodic compare of the eBPF maps failed; retrying");
            self.applied = None;
        }
    }

    /// The realized revision if it is `revision` or later, else a receiver answered once it
    /// is.
    pub fn wait(&mut self, revision: u64) -> Result<u64, oneshot::Receiver<u64>> {
        self.revisions.wait(revision)
    }

    /// What is realized, for status.
    pub fn realized_state(&self) -> RealizedState {
        RealizedState {
            revision: self.revisions.realized(),
            endpoints: self.realized.clone(),
            attach_mode: self.programs.attach_mode(),
            warnings: self.warnings.clone(),
            map_errors: self.map_errors.clone(),
            counters: self.counters,
            limits: Some(self.limits),
        }
    }

    /// Attaches to new interfaces and detaches from gone ones.
    fn sync_attachments(&mut self, endpoints: &[LocalEndpoint]) {
        let wanted: BTreeSet<String> = endpoints.iter().map(|e| e.interface.clone()).collect();
        // Each new tcx link costs the kernel an RCU grace period under the RTNL lock (about
        // 13 ms here; attaching from several threads gains nothing), so a node starting
        // many pods at once attaches them at that pace: see docs/benchmarks.md.
        for ifname in wanted.difference(&self.attached.clone()) {
            match self.programs.attach(ifname) {
                Ok(_) => {
                    tracing::info!(interface = %ifname, mode = %self.programs.attach_mode(), "programs attached");
                    self.attached.insert(ifname.clone());
                }
                Err(e) => tracing::error!(interface = %ifname, error = %e, "attaching the programs failed; will retry"),
            }
        }
        for ifname in self.attached.clone().difference(&wanted) {
            if let Err(e) = self.programs.detach(ifname) {
                tracing::warn!(interface = %ifname, error = %e, "detaching the programs failed");
            }
            self.attached.remove(ifname);
        }
    }

    /// Makes the maps match `msg`.
    fn reconcile(&mut self, msg: &Desired) -> Result<Applied, DatapathError> {
        let started = Instant::now();
        self.sync_attachments(&msg.endpoints);
        // Only endpoints whose programs are attached go into the maps.
        let mappings: Vec<EndpointMapping> = msg
            .endpoints
            .iter()
            .filter(|e| self.attached.contains(&e.interface))
            .map(|e| EndpointMapping { id: e.id, ifindex: e.ifindex, identity: e.identity, ipv4: e.ipv4, ipv6: e.ipv6 })
            .collect();
        let t_attach = started.elapsed();
        let desired = encode_cached(&msg.desired, &mappings, &msg.ipcache, &mut self.cookies, &mut self.encoded);
        let t_encode = started.elapsed();
        let loaded = match self.applied.take() {
            Some(a) => a,
            None => read_state(&*self.maps)?,
        };
        let fitted = fit(desired, &self.limits, &loaded);
        if !fitted.overflows.is_empty() {
            // Entries were cut, and the cookies only they use leave the jar below: encode
            // afresh next time.
            self.encoded = EncodeCache::default();
        }
        let p = plan(&fitted.state, &loaded);
        let t_plan = started.elapsed();
        if !p.is_empty() {
            for line in p.describe().iter().take(MAX_LOGGED_OPERATIONS) {
                tracing::debug!(revision = msg.revision, "{line}");
            }
            // On error `applied` stays unknown: the retry reads the maps.
            // Metrics hook (ops): endpoint regenerations and their duration.
            let applied = apply_plan(&mut *self.maps, &p, &loaded, &self.limits);
            crate::metrics::global().plan_applied(&p, applied.is_ok(), started.elapsed());
            applied?;
        }
        let t_apply = started.elapsed();
        let live: BTreeSet<u32> = fitted.state.policy.values().map(|v| v.cookie).collect();
        self.cookies.retain(&live);
        self.report_overflows(msg, &fitted);
        self.realized = realized_endpoints(msg.revision, &mappings, &fitted);
        let operations = p.len();
        let policy_entries = fitted.state.policy.len();
        self.applied = Some(fitted.state);
        if mappings.len() == msg.endpoints.len() {
            // Every endpoint is attached: the revision is realized.
            self.revisions.realize(msg.revision);
            // Metrics hook (ops): implementation delay of every change up to this revision.
            crate::metrics::global().revision_realized(self.revisions.realized());
            crate::revisions::realized(self.revisions.realized());
        } else {
            // Not realized; still forget those who stopped waiting.
            self.revisions.realize(0);
        }
        // What the monitor needs to name things.
        if let Ok(mut d) = self.decode.write() {
            d.endpoints = msg.endpoints.iter().map(|e| (u32::from(e.id), e.full_name())).collect();
            d.set_cookies(&self.cookies, &live);
        }
        let times = StageTimes {
            attach: t_attach,
            encode: t_encode - t_attach,
            plan: t_plan - t_encode,
            apply: t_apply - t_plan,
        };
        tracing::info!(
            revision = msg.revision,
            operations,
            endpoints = mappings.len(),
            policy_entries,
            elapsed_us = started.elapsed().as_micros() as u64,
            attach_us = times.attach.as_micros() as u64,
            encode_us = times.encode.as_micros() as u64,
            plan_us = times.plan.as_micros() as u64,
            apply_us = times.apply.as_micros() as u64,
            "datapath reconciled"
        );
        Ok(Applied { operations, times })
    }

    /// Says, loudly, what did not fit and what that means for which endpoints.
    fn report_overflows(&mut self, msg: &Desired, fitted: &Fitted) {
        if fitted.overflows.is_empty() {
            if !self.map_errors.is_empty() {
                tracing::info!("the desired state fits in the maps again; no endpoint fails closed any more");
            }
            self.map_errors.clear();
            return;
        }
        self.counters.map_overflows += 1;
        let names: BTreeMap<u16, String> = msg.endpoints.iter().map(|e| (e.id, e.full_name())).collect();
        let errors = overflow_errors(fitted, &names);
        for e in &errors {
            tracing::error!(revision = msg.revision, "{e}");
        }
        self.map_errors = errors;
    }

    /// Reads every map, compares with what was applied, and writes back the difference.
    fn check_drift(&mut self) -> Result<(), DatapathError> {
        if self.applied.is_none() {
            return Ok(());
        }
        self.counters.drift_checks += 1;
        let kernel = read_state(&*self.maps)?;
        self.repair_drift(&kernel)
    }

    /// Writes back what differs between `kernel` (what the maps hold, just read) and what
    /// was applied. Apart from reading the maps, this is the whole drift check: a reader
    /// elsewhere (another thread, an incremental walk) can hand its read in here.
    pub fn repair_drift(&mut self, kernel: &MapState) -> Result<(), DatapathError> {
        let Some(applied) = self.applied.take() else { return Ok(()) };
        let p = plan(&applied, kernel);
        if p.is_empty() {
            self.applied = Some(applied);
            return Ok(());
        }
        tracing::warn!(
            operations = p.len(),
            "the eBPF maps differ from what the agent wrote (changed behind its back); repairing"
        );
        for line in p.describe().iter().take(MAX_LOGGED_OPERATIONS) {
            tracing::warn!("repair: {line}");
        }
        apply_plan(&mut *self.maps, &p, kernel, &self.limits)?;
        self.counters.drift_repairs += p.len() as u64;
        self.applied = Some(applied);
        Ok(())
    }
}
