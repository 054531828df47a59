//! Map writer actor: the only writer of eBPF maps. It holds the desired state, reads the
//! loaded state back from the kernel, applies the smallest plan (adds and updates before
//! deletes), attaches the programs to new pod interfaces, re-checks periodically to repair
//! drift, and reports the realized revision.
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use actix::prelude::*;
use palisade_common::{PolicyKey, config as bpf_config};
use palisade_policy::model::Policy;
use palisade_policy::resolve::DesiredState;
use tokio::sync::oneshot;

use super::identity::Prefix;
use crate::datapath::{Datapath, MapSet};
use crate::endpoint::LocalEndpoint;
use crate::mapstate::{CookieJar, EndpointMapping, MapState, Plan, encode, plan};
use crate::monitor::DecodeContext;

/// What the map writer last applied, per endpoint.
#[derive(Clone, Debug, Default)]
pub struct RealizedEndpoint {
    pub realized_revision: u64,
    pub policy_entries: usize,
    pub ingress_enforced: bool,
    pub egress_enforced: bool,
}

pub struct MapWriter {
    datapath: Datapath,
    maps: MapSet,
    cookies: CookieJar,
    /// Interfaces the programs are attached to.
    attached: BTreeSet<String>,
    last: Option<ApplyDesired>,
    realized_revision: u64,
    realized: BTreeMap<u16, RealizedEndpoint>,
    waiters: Vec<(u64, oneshot::Sender<u64>)>,
    decode: Arc<RwLock<DecodeContext>>,
    repair_interval: Duration,
    warnings: Vec<String>,
}

impl MapWriter {
    pub fn new(
        mut datapath: Datapath,
        decode: Arc<RwLock<DecodeContext>>,
        repair_interval: Duration,
    ) -> Result<Self, crate::datapath::DatapathError> {
        let mut maps = datapath.take_maps()?;
        maps.config.set(bpf_config::FLAGS, bpf_config::FLAG_EMIT_ALLOW_EVENTS, 0)?;
        Ok(MapWriter {
            datapath,
            maps,
            cookies: CookieJar::default(),
            attached: BTreeSet::new(),
            last: None,
            realized_revision: 0,
            realized: BTreeMap::new(),
            waiters: Vec::new(),
            decode,
            repair_interval,
            warnings: Vec::new(),
        })
    }

    /// Reads what the kernel maps hold.
    fn dump(&self) -> Result<MapState, crate::datapath::DatapathError> {
        let mut s = MapState::default();
        for item in self.maps.endpoints.iter() {
            let (k, v) = item?;
            s.endpoints.insert(k, v);
        }
        for item in self.maps.ipcache_v4.iter() {
            let (k, v) = item?;
            s.ipcache_v4.insert((k.prefix_len(), k.data()), v);
        }
        for item in self.maps.ipcache_v6.iter() {
            let (k, v) = item?;
            s.ipcache_v6.insert((k.prefix_len(), k.data()), v);
        }
        for item in self.maps.ipcache_host_v4.iter() {
            let (k, v) = item?;
            s.ipcache_host_v4.insert(k, v);
        }
        for item in self.maps.ipcache_host_v6.iter() {
            let (k, v) = item?;
            s.ipcache_host_v6.insert(k, v);
        }
        for item in self.maps.policy.iter() {
            let (k, v) = item?;
            s.policy.insert((u32::from(k.prefix_len), PolicyKey { prefix_len: 0, ..k }), v);
        }
        for item in self.maps.policy_lengths.iter() {
            let (k, v) = item?;
            s.policy_lengths.insert(k, v);
        }
        Ok(s)
    }

    /// Applies a plan: adds and updates first (policy entries, then the prefix lengths that
    /// make the datapath probe for them, ipcache, then endpoints so that an endpoint becomes
    /// enforced only once its entries are there), then deletes (policy entries before the
    /// lengths that pointed at them).
    fn apply_plan(&mut self, p: &Plan) -> Result<(), crate::datapath::DatapathError> {
        use aya::maps::lpm_trie::Key;
        for (k, v) in p.policy.adds.iter().chain(&p.policy.updates) {
            self.maps.policy.insert(k.1.at_prefix(k.0), v, 0)?;
        }
        for (k, v) in p.policy_lengths.adds.iter().chain(&p.policy_lengths.updates) {
            self.maps.policy_lengths.insert(k, v, 0)?;
        }
        for (k, v) in p.ipcache_v4.adds.iter().chain(&p.ipcache_v4.updates) {
            self.maps.ipcache_v4.insert(&Key::new(k.0, k.1), v, 0)?;
        }
        for (k, v) in p.ipcache_v6.adds.iter().chain(&p.ipcache_v6.updates) {
            self.maps.ipcache_v6.insert(&Key::new(k.0, k.1), v, 0)?;
        }
        for (k, v) in p.ipcache_host_v4.adds.iter().chain(&p.ipcache_host_v4.updates) {
            self.maps.ipcache_host_v4.insert(k, v, 0)?;
        }
        for (k, v) in p.ipcache_host_v6.adds.iter().chain(&p.ipcache_host_v6.updates) {
            self.maps.ipcache_host_v6.insert(k, v, 0)?;
        }
        for (k, v) in p.endpoints.adds.iter().chain(&p.endpoints.updates) {
            self.maps.endpoints.insert(k, v, 0)?;
        }
        for k in &p.endpoints.deletes {
            ignore_missing(self.maps.endpoints.remove(k))?;
        }
        for k in &p.policy.deletes {
            ignore_missing(self.maps.policy.remove(&k.1.at_prefix(k.0)))?;
        }
        for k in &p.policy_lengths.deletes {
            ignore_missing(self.maps.policy_lengths.remove(k))?;
        }
        for k in &p.ipcache_v4.deletes {
            ignore_missing(self.maps.ipcache_v4.remove(&Key::new(k.0, k.1)))?;
        }
        for k in &p.ipcache_v6.deletes {
            ignore_missing(self.maps.ipcache_v6.remove(&Key::new(k.0, k.1)))?;
        }
        for k in &p.ipcache_host_v4.deletes {
            ignore_missing(self.maps.ipcache_host_v4.remove(k))?;
        }
        for k in &p.ipcache_host_v6.deletes {
            ignore_missing(self.maps.ipcache_host_v6.remove(k))?;
        }
        // Last: established flows are re-checked against everything written above.
        self.maps.bump_policy_generation()?;
        Ok(())
    }

    /// Attaches to new interfaces and detaches from gone ones.
    fn sync_attachments(&mut self, endpoints: &[LocalEndpoint]) {
        let wanted: BTreeSet<String> = endpoints.iter().map(|e| e.interface.clone()).collect();
        for ifname in wanted.difference(&self.attached.clone()) {
            match self.datapath.attach(ifname) {
                Ok(_) => {
                    tracing::info!(interface = %ifname, mode = %self.datapath.attach_mode(), "programs attached");
                    self.attached.insert(ifname.clone());
                }
                Err(e) => tracing::error!(interface = %ifname, error = %e, "attaching the programs failed; will retry"),
            }
        }
        for ifname in self.attached.clone().difference(&wanted) {
            if let Err(e) = self.datapath.detach(ifname) {
                tracing::warn!(interface = %ifname, error = %e, "detaching the programs failed");
            }
            self.attached.remove(ifname);
        }
    }

    /// Makes the kernel match `msg`; returns the number of map operations.
    fn reconcile(&mut self, msg: &ApplyDesired) -> Result<usize, crate::datapath::DatapathError> {
        let started = Instant::now();
        self.sync_attachments(&msg.endpoints);
        // Only endpoints whose programs are attached go into the maps.
        let mappings: Vec<EndpointMapping> = msg
            .endpoints
            .iter()
            .filter(|e| self.attached.contains(&e.interface))
            .map(|e| EndpointMapping { id: e.id, ifindex: e.ifindex, identity: e.identity, ipv4: e.ipv4, ipv6: e.ipv6 })
            .collect();
        let desired = encode(&msg.desired, &mappings, &msg.ipcache, &mut self.cookies);
        let loaded = self.dump()?;
        let p = plan(&desired, &loaded);
        if !p.is_empty() {
            for line in p.describe().iter().take(200) {
                tracing::debug!(revision = msg.revision, "{line}");
            }
            // Metrics hook (ops): endpoint regenerations and their duration.
            let applied = self.apply_plan(&p);
            crate::metrics::global().plan_applied(&p, applied.is_ok(), started.elapsed());
            applied?;
        }
        let live: BTreeSet<u32> = desired.policy.values().map(|v| v.cookie).collect();
        self.cookies.retain(&live);
        // Realized state per endpoint.
        self.realized.clear();
        for m in &mappings {
            let pol = msg.desired.endpoints.get(&m.id);
            self.realized.insert(
                m.id,
                RealizedEndpoint {
                    realized_revision: msg.revision,
                    policy_entries: pol.map(|p| p.entries.len()).unwrap_or(0),
                    ingress_enforced: pol.is_some_and(|p| p.ingress_enforced),
                    egress_enforced: pol.is_some_and(|p| p.egress_enforced),
                },
            );
        }
        let all_attached = mappings.len() == msg.endpoints.len();
        if all_attached {
            self.realized_revision = self.realized_revision.max(msg.revision);
            // Metrics hook (ops): implementation delay of every change up to this revision.
            crate::metrics::global().revision_realized(self.realized_revision);
            crate::revisions::realized(self.realized_revision);
        }
        // What the monitor needs to name things.
        if let Ok(mut d) = self.decode.write() {
            d.endpoints = msg.endpoints.iter().map(|e| (u32::from(e.id), e.full_name())).collect();
            d.set_cookies(&self.cookies, &live);
        }
        tracing::info!(
            revision = msg.revision,
            operations = p.len(),
            endpoints = mappings.len(),
            policy_entries = desired.policy.len(),
            elapsed_us = started.elapsed().as_micros() as u64,
            "datapath reconciled"
        );
        let realized = self.realized_revision;
        let waiters = std::mem::take(&mut self.waiters);
        for (rev, tx) in waiters {
            if rev <= realized {
                let _ = tx.send(realized);
            } else if !tx.is_closed() {
                self.waiters.push((rev, tx));
            }
        }
        Ok(p.len())
    }

    fn repair(&mut self) {
        let Some(last) = self.last.take() else { return };
        match self.reconcile(&last) {
            Ok(0) => {}
            Ok(n) => {
                tracing::warn!(operations = n, "repaired drift in the eBPF maps (changed behind the agent's back)")
            }
            Err(e) => tracing::error!(error = %e, "periodic datapath check failed"),
        }
        self.last = Some(last);
    }
}

fn ignore_missing(r: Result<(), aya::maps::MapError>) -> Result<(), aya::maps::MapError> {
    match r {
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

impl Actor for MapWriter {
    type Context = Context<Self>;
    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.run_interval(self.repair_interval, |act, _| act.repair());
    }
}

/// The desired state at a revision.
#[derive(Message, Clone)]
#[rtype(result = "()")]
pub struct ApplyDesired {
    pub revision: u64,
    pub desired: Arc<DesiredState>,
    pub endpoints: Arc<Vec<LocalEndpoint>>,
    pub ipcache: Arc<BTreeMap<Prefix, u32>>,
    pub policies: Arc<Vec<Policy>>,
}

impl Handler<ApplyDesired> for MapWriter {
    type Result = ();
    fn handle(&mut self, msg: ApplyDesired, _: &mut Context<Self>) {
        let span = tracing::info_span!("reconcile", revision = msg.revision);
        let _g = span.enter();
        if let Err(e) = self.reconcile(&msg) {
            tracing::error!(error = %e, "applying the desired state failed; the periodic check retries");
            self.warnings = vec![format!("last apply failed: {e}")];
        } else {
            self.warnings.clear();
        }
        self.last = Some(msg);
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
        if self.realized_revision >= msg.revision {
            let r = self.realized_revision;
            return Box::pin(async move { Some(r) });
        }
        let (tx, rx) = oneshot::channel();
        self.waiters.push((msg.revision, tx));
        Box::pin(async move { tokio::time::timeout(msg.timeout, rx).await.ok().and_then(Result::ok) })
    }
}

/// What is realized: the revision, per-endpoint state, attach mode and warnings.
#[derive(Message)]
#[rtype(result = "RealizedState")]
pub struct GetRealized;

#[derive(Clone, Debug, Default)]
pub struct RealizedState {
    pub revision: u64,
    pub endpoints: BTreeMap<u16, RealizedEndpoint>,
    pub attach_mode: String,
    pub warnings: Vec<String>,
}

impl Handler<GetRealized> for MapWriter {
    type Result = MessageResult<GetRealized>;
    fn handle(&mut self, _: GetRealized, _: &mut Context<Self>) -> Self::Result {
        MessageResult(RealizedState {
            revision: self.realized_revision,
            endpoints: self.realized.clone(),
            attach_mode: self.datapath.attach_mode().to_string(),
            warnings: self.warnings.clone(),
        })
    }
}
