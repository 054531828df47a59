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
use std::net::IpAddr;
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
    /// Other nodes' pods' names by address (flow records name them).
    pub remote_names: Arc<BTreeMap<IpAddr, Arc<palisade_node::ipcache::RemotePodName>>>,
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
        self.reapply("retrying the apply failed; retrying again");
    }

    /// Applies the last desired state again; on success the warning of an earlier failure
    /// goes, on failure `failed` is logged.
    fn reapply(&mut self, failed: &str) {
        let Some(last) = self.last.take() else { return };
        match self.reconcile(&last) {
            Ok(_) => {
                if !self.warnings.is_empty() {
                    tracing::info!(revision = last.revision, "applying again succeeded");
                }
                self.warnings.clear();
            }
            Err(e) => {
                self.counters.apply_failures += 1;
                tracing::error!(error = %e, "{failed}");
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
        if missing || self.applied.is_none() {
            self.reapply("periodic apply failed");
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
            crate::monitor::set_endpoint_names(&mut d, msg);
            for (id, r) in &self.realized {
                if let Some(e) = d.endpoint_info.get_mut(&u32::from(*id)) {
                    e.fail_closed =
                        [r.fail_closed.iter().any(|x| x == "ingress"), r.fail_closed.iter().any(|x| x == "egress")];
                }
            }
        }
        let times = StageTimes {
            attach: t_attach,
            encode: t_encode.checked_sub(t_attach).unwrap(),
            plan: t_plan.checked_sub(t_encode).unwrap(),
            apply: t_apply.checked_sub(t_plan).unwrap(),
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::net::Ipv4Addr;
    use std::sync::Arc;

    use palisade_common::{endpoint_flags, proto};
    use palisade_policy::labels::LabelSet;
    use palisade_policy::model::Direction;
    use palisade_policy::resolve::{DesiredState, EndpointPolicy, EntryKey, EntryValue};

    use super::*;
    use crate::datapath::fake::FakeOp;
    use crate::datapath::{FakeMaps, FakePrograms, WritableMap, bulk};

    fn endpoint(id: u16, ifindex: u32) -> LocalEndpoint {
        LocalEndpoint {
            id,
            namespace: "default".into(),
            name: format!("pod-{id}"),
            labels: LabelSet::default(),
            identity: 1000 + u32::from(id),
            ipv4: Some(Ipv4Addr::new(10, 0, 0, id as u8)),
            ipv6: None,
            interface: format!("lxc{id}"),
            ifindex,
            named_ports: Vec::new(),
        }
    }

    /// Endpoint 1 admits TCP to `ports` from identity 300 (ingress enforced); endpoint 2 is
    /// not enforced.
    fn desired(revision: u64, ports: &[u16]) -> Desired {
        let entries = ports
            .iter()
            .map(|port| {
                let key = EntryKey {
                    direction: Direction::Ingress,
                    identity: 300,
                    protocol: proto::TCP,
                    port: *port,
                    port_prefix_len: 16,
                };
                (key, EntryValue::default())
            })
            .collect();
        let policy = EndpointPolicy { ingress_enforced: true, egress_enforced: false, entries, audit: None };
        let endpoints = vec![endpoint(1, 11), endpoint(2, 12)];
        let ipcache = endpoints
            .iter()
            .map(|e| ((IpAddr::V4(e.ipv4.unwrap()), 32), e.identity))
            .chain([((IpAddr::V4(Ipv4Addr::new(192, 0, 2, 0)), 24), 300)])
            .collect();
        Desired {
            revision,
            desired: Arc::new(DesiredState {
                endpoints: BTreeMap::from([(1, Arc::new(policy))]),
                ..Default::default()
            }),
            endpoints: Arc::new(endpoints),
            ipcache: Arc::new(ipcache),
            policies: Arc::default(),
            remote_names: Arc::default(),
        }
    }

    fn writer(maps: &FakeMaps) -> Writer {
        Writer::new(Box::new(maps.clone()), Box::new(FakePrograms::default()), Arc::default()).unwrap()
    }

    #[test]
    fn a_desired_state_is_written_and_realized() {
        let maps = FakeMaps::new();
        let mut w = writer(&maps);
        let mut waiting = w.wait(3).unwrap_err();
        w.apply(desired(3, &[80, 81]));
        assert_eq!(waiting.try_recv(), Ok(3));
        let s = maps.state();
        assert_eq!(s.endpoints.len(), 2);
        assert_eq!(s.endpoints[&11].flags & endpoint_flags::INGRESS_ENFORCED, endpoint_flags::INGRESS_ENFORCED);
        assert_eq!(s.policy.len(), 2);
        assert_eq!((s.ipcache_host_v4.len(), s.ipcache_v4.len()), (2, 1));
        let r = w.realized_state();
        assert_eq!(r.revision, 3);
        assert_eq!(r.endpoints[&1].policy_entries, 2);
        assert!(r.endpoints[&1].ingress_enforced && !r.endpoints[&2].ingress_enforced);
        assert!(r.warnings.is_empty() && r.map_errors.is_empty());
        assert_eq!(maps.generation(), 1, "one plan, one generation");
    }

    #[test]
    fn a_starting_writer_adopts_what_the_maps_hold() {
        let maps = FakeMaps::new();
        writer(&maps).apply(desired(1, &[80]));
        let written = maps.writes().len();
        // A new agent over the same maps, same desired state: nothing to write.
        let mut again = writer(&maps);
        again.apply(desired(2, &[80]));
        assert_eq!(maps.writes().len(), written);
        assert_eq!(again.realized_state().revision, 2);
        // A change writes only the difference: one POLICY entry (the bit of its length is
        // set already).
        again.apply(desired(3, &[80, 443]));
        assert_eq!(maps.writes().len(), written + 1, "{:?}", maps.writes());
    }

    #[test]
    fn drift_behind_the_writers_back_is_repaired() {
        let maps = FakeMaps::new();
        let mut w = writer(&maps);
        w.apply(desired(1, &[80]));
        let applied = maps.state();
        // Someone else deletes the enforced endpoint's record and adds a stray ipcache entry.
        let mut other = maps.clone();
        bulk::delete(&mut other, WritableMap::Endpoints, &[11u32]).unwrap();
        let stray = palisade_common::Ipv4Prefix { addr: [10, 9, 9, 9] };
        bulk::upsert(&mut other, WritableMap::IpcacheHostV4, &[(stray, palisade_common::IpcacheValue::default())])
            .unwrap();
        assert_ne!(maps.state(), applied);
        w.periodic(true);
        assert_eq!(maps.state(), applied);
        let c = w.realized_state().counters;
        assert_eq!((c.drift_checks, c.drift_repairs), (1, 2));
        w.periodic(true);
        assert_eq!(w.realized_state().counters.drift_repairs, 2, "nothing more to repair");
    }

    #[test]
    fn what_does_not_fit_fails_closed_and_says_so() {
        let maps = FakeMaps::with_limits(&MapLimits { policy: 2, ..MapLimits::UNLIMITED });
        let mut w = writer(&maps);
        w.apply(desired(1, &[80, 81, 82]));
        let s = maps.state();
        assert!(s.policy.is_empty(), "endpoint 1's ingress does not fit: no entries");
        assert_eq!(s.endpoints[&11].flags & endpoint_flags::INGRESS_ENFORCED, endpoint_flags::INGRESS_ENFORCED);
        let r = w.realized_state();
        assert_eq!(r.endpoints[&1].fail_closed, vec!["ingress".to_string()]);
        assert_eq!(r.counters.map_overflows, 1);
        assert!(r.map_errors[0].contains("map POLICY is full") && r.map_errors[0].contains("default/pod-1 ingress"));
        assert_eq!(r.revision, 1, "failing closed is realized");
        // Room again: the entries are loaded, the errors go.
        w.apply(desired(2, &[80]));
        assert_eq!(maps.state().policy.len(), 1);
        let r = w.realized_state();
        assert!(r.map_errors.is_empty() && r.endpoints[&1].fail_closed.is_empty());
    }

    #[test]
    fn a_failed_apply_is_retried_from_what_the_maps_hold() {
        let maps = FakeMaps::new();
        let mut w = writer(&maps);
        // The second host entry fails (the first is written).
        maps.fail(Some(WritableMap::IpcacheHostV4), FakeOp::Update, 1, libc::EIO);
        w.apply(desired(1, &[80]));
        let r = w.realized_state();
        assert_eq!(r.revision, 0);
        assert_eq!(r.counters.apply_failures, 1);
        assert!(r.warnings[0].starts_with("last apply failed: map IPCACHE_HOST_V4"), "{:?}", r.warnings);
        assert_eq!(maps.state().ipcache_host_v4.len(), 1);
        w.retry();
        let r = w.realized_state();
        assert_eq!(r.revision, 1);
        assert!(r.warnings.is_empty());
        assert_eq!(maps.state().ipcache_host_v4.len(), 2);
        // The retry read the maps back: the entry written before the failure was not written again.
        let hosts = maps.writes().iter().filter(|w| w.map == WritableMap::IpcacheHostV4).count();
        assert_eq!(hosts, 2);
        // Nothing failed: nothing to retry.
        w.retry();
        assert_eq!(w.realized_state().counters.apply_failures, 1);
    }

    #[test]
    fn an_endpoint_is_realized_once_its_programs_are_attached() {
        let maps = FakeMaps::new();
        let programs = FakePrograms::default();
        programs.fail_attach("lxc2", true);
        let mut w = Writer::new(Box::new(maps.clone()), Box::new(programs.clone()), Arc::default()).unwrap();
        w.apply(desired(1, &[80]));
        assert_eq!(w.realized_state().revision, 0, "endpoint 2 is not attached");
        assert_eq!(maps.state().endpoints.keys().copied().collect::<Vec<_>>(), vec![11]);
        programs.fail_attach("lxc2", false);
        w.periodic(false);
        assert_eq!(w.realized_state().revision, 1);
        assert_eq!(maps.state().endpoints.len(), 2);
        assert_eq!(programs.attached().len(), 2);
    }
}
