//! Map writer actor: the only writer of eBPF maps. It holds the desired state and what it
//! last applied, turns the difference into an explicit plan (adds and updates before
//! deletes, see [`Plan`]), cuts the desired state down to the map sizes (failing closed,
//! see [`fit`]), attaches the programs to new pod interfaces, compares the kernel maps with
//! what it applied periodically to repair drift, and reports the realized revision.
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use actix::prelude::*;
use aya::maps::lpm_trie::Key;
use palisade_common::{
    EndpointInfo, IpcacheValue, Ipv4Prefix, Ipv6Prefix, PolicyKey, PolicyLengthsKey, PolicyValue, config as bpf_config,
    direction, map_names,
};
use palisade_policy::model::Policy;
use palisade_policy::resolve::DesiredState;
use tokio::sync::oneshot;

use super::identity::Prefix;
use crate::datapath::{Datapath, DatapathError, MapSet, WritableMap};
use crate::endpoint::LocalEndpoint;
use crate::mapstate::{
    CookieJar, EncodeCache, EndpointMapping, Fitted, MapLimits, MapState, Plan, encode_cached, fit, plan,
};
use crate::monitor::DecodeContext;

/// How often a failed apply is retried.
const RETRY_INTERVAL: Duration = Duration::from_secs(2);
/// How often interfaces whose attachment failed are retried when the drift check is off.
const ATTACH_RETRY_INTERVAL: Duration = Duration::from_secs(10);
/// Most plan lines logged per apply.
const MAX_LOGGED_OPERATIONS: usize = 200;

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

pub struct MapWriter {
    datapath: Datapath,
    maps: MapSet,
    limits: MapLimits,
    cookies: CookieJar,
    /// Interfaces the programs are attached to.
    attached: BTreeSet<String>,
    last: Option<ApplyDesired>,
    /// The latest desired state handed in and not applied yet.
    pending: Option<ApplyDesired>,
    /// The policy entries of every endpoint as last encoded.
    encoded: EncodeCache,
    /// What the kernel maps hold as far as the agent knows: what it last wrote. `None` at
    /// start (the first apply reads the maps, which adopts what an earlier agent left) and
    /// after a failed apply (the retry reads them again).
    applied: Option<MapState>,
    realized_revision: u64,
    realized: BTreeMap<u16, RealizedEndpoint>,
    waiters: Vec<(u64, oneshot::Sender<u64>)>,
    decode: Arc<RwLock<DecodeContext>>,
    /// Zero: no periodic drift check.
    drift_interval: Duration,
    warnings: Vec<String>,
    /// Why the last apply could not load everything (maps too small).
    map_errors: Vec<String>,
    counters: WriterCounters,
}

impl MapWriter {
    /// `drift_interval`: time between full compares of the kernel maps with what was
    /// applied (zero turns them off).
    pub fn new(
        mut datapath: Datapath,
        decode: Arc<RwLock<DecodeContext>>,
        drift_interval: Duration,
    ) -> Result<Self, DatapathError> {
        let mut maps = datapath.take_maps()?;
        maps.config.set(bpf_config::FLAGS, bpf_config::FLAG_EMIT_ALLOW_EVENTS, 0)?;
        let limits = map_limits(&maps)?;
        Ok(MapWriter {
            datapath,
            maps,
            limits,
            cookies: CookieJar::default(),
            attached: BTreeSet::new(),
            last: None,
            pending: None,
            encoded: EncodeCache::default(),
            applied: None,
            realized_revision: 0,
            realized: BTreeMap::new(),
            waiters: Vec::new(),
            decode,
            drift_interval,
            warnings: Vec::new(),
            map_errors: Vec::new(),
            counters: WriterCounters::default(),
        })
    }

    /// Attaches to new interfaces and detaches from gone ones.
    fn sync_attachments(&mut self, endpoints: &[LocalEndpoint]) {
        let wanted: BTreeSet<String> = endpoints.iter().map(|e| e.interface.clone()).collect();
        // Each new tcx link costs the kernel an RCU grace period under the RTNL lock (about
        // 13 ms here; attaching from several threads gains nothing), so a node starting
        // many pods at once attaches them at that pace: see docs/benchmarks.md.
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
    fn reconcile(&mut self, msg: &ApplyDesired) -> Result<usize, DatapathError> {
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
            None => read_state(&self.maps)?,
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
            let applied = apply_plan(&mut self.maps, &p, &loaded, &self.limits);
            crate::metrics::global().plan_applied(&p, applied.is_ok(), started.elapsed());
            applied?;
        }
        let t_apply = started.elapsed();
        let live: BTreeSet<u32> = fitted.state.policy.values().map(|v| v.cookie).collect();
        self.cookies.retain(&live);
        self.report_overflows(msg, &fitted);
        // Realized state per endpoint: what is loaded, not what was asked for.
        self.realized.clear();
        let mut entries: BTreeMap<u16, usize> = BTreeMap::new();
        for (_, k) in fitted.state.policy.keys() {
            *entries.entry(k.endpoint_id()).or_default() += 1;
        }
        let flags: BTreeMap<u16, u32> =
            fitted.state.endpoints.values().map(|i| (i.endpoint_id as u16, i.flags)).collect();
        for m in &mappings {
            let f = flags.get(&m.id).copied().unwrap_or(0);
            let closed = |d: u8, name: &str| fitted.fail_closed.contains(&(m.id, d)).then(|| name.to_string());
            self.realized.insert(
                m.id,
                RealizedEndpoint {
                    realized_revision: msg.revision,
                    policy_entries: entries.get(&m.id).copied().unwrap_or(0),
                    ingress_enforced: f & palisade_common::endpoint_flags::INGRESS_ENFORCED != 0,
                    egress_enforced: f & palisade_common::endpoint_flags::EGRESS_ENFORCED != 0,
                    fail_closed: [closed(direction::INGRESS, "ingress"), closed(direction::EGRESS, "egress")]
                        .into_iter()
                        .flatten()
                        .collect(),
                },
            );
        }
        let operations = p.len();
        let policy_entries = fitted.state.policy.len();
        self.applied = Some(fitted.state);
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
            operations,
            endpoints = mappings.len(),
            policy_entries,
            elapsed_us = started.elapsed().as_micros() as u64,
            attach_us = t_attach.as_micros() as u64,
            encode_us = (t_encode - t_attach).as_micros() as u64,
            plan_us = (t_plan - t_encode).as_micros() as u64,
            apply_us = (t_apply - t_plan).as_micros() as u64,
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
        Ok(operations)
    }

    /// Says, loudly, what did not fit and what that means for which endpoints.
    fn report_overflows(&mut self, msg: &ApplyDesired, fitted: &Fitted) {
        if fitted.overflows.is_empty() {
            if !self.map_errors.is_empty() {
                tracing::info!("the desired state fits in the maps again; no endpoint fails closed any more");
            }
            self.map_errors.clear();
            return;
        }
        self.counters.map_overflows += 1;
        let names: BTreeMap<u16, String> = msg.endpoints.iter().map(|e| (e.id, e.full_name())).collect();
        let name = |id: u16| names.get(&id).cloned().unwrap_or_else(|| format!("endpoint {id}"));
        let closed: Vec<String> = fitted
            .fail_closed
            .iter()
            .map(|(id, d)| format!("{} {}", name(*id), if *d == direction::INGRESS { "ingress" } else { "egress" }))
            .collect();
        let mut errors = Vec::new();
        for o in &fitted.overflows {
            let consequence = if o.map == map_names::ENDPOINTS {
                let left: Vec<String> = fitted.not_loaded.iter().map(|id| name(*id)).collect();
                format!("endpoints left out, NOT enforced (the datapath does not see them): {}", left.join(", "))
            } else if closed.is_empty() {
                "no endpoint direction had to fail closed".to_string()
            } else {
                format!("failing closed (denying all traffic) for: {}", closed.join(", "))
            };
            errors.push(format!(
                "map {} is full: the desired state needs {} entries, the map holds at most {}; {consequence}. \
                 Raise its size with --map-size {}=N (PALISADE_MAP_SIZES); a pinned map keeps its size until its \
                 pin is removed",
                o.map, o.needed, o.max, o.map
            ));
        }
        for e in &errors {
            tracing::error!(revision = msg.revision, "{e}");
        }
        self.map_errors = errors;
    }

    /// Retries a failed apply.
    fn retry(&mut self) {
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

    /// Attaches to interfaces whose attachment failed, then (when on) compares every map
    /// with what was applied and repairs the difference.
    fn periodic(&mut self, drift_check: bool) {
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

    /// Reads every map, compares with what was applied, and writes back the difference.
    fn check_drift(&mut self) -> Result<(), DatapathError> {
        let Some(applied) = self.applied.take() else { return Ok(()) };
        self.counters.drift_checks += 1;
        let kernel = match read_state(&self.maps) {
            Ok(k) => k,
            Err(e) => {
                self.applied = Some(applied);
                return Err(e);
            }
        };
        let p = plan(&applied, &kernel);
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
        apply_plan(&mut self.maps, &p, &kernel, &self.limits)?;
        self.counters.drift_repairs += p.len() as u64;
        self.applied = Some(applied);
        Ok(())
    }
}

/// Corrects an explanation (made from the resolver's desired state) for endpoint
/// directions that fail closed because their entries do not fit in the maps: that side
/// denies whatever the policy says. `ids` maps `namespace/name` to endpoint ids.
pub fn explain_fail_closed(
    e: &mut crate::api::types::Explanation,
    realized: &RealizedState,
    ids: &BTreeMap<String, u16>,
) {
    let closed = |side: &crate::api::types::SideDecision, dir: &str| {
        side.endpoint
            .as_ref()
            .and_then(|name| ids.get(name))
            .and_then(|id| realized.endpoints.get(id))
            .is_some_and(|r| r.fail_closed.iter().any(|d| d == dir))
    };
    let why = || {
        let mut rules = vec!["the endpoint's policy entries do not fit in the eBPF maps: it fails closed".to_string()];
        rules.extend(realized.map_errors.iter().cloned());
        rules
    };
    if closed(&e.egress, "egress") {
        e.egress.decision = "fail-closed".into();
        e.egress.entry = None;
        e.egress.rules = why();
        e.verdict = "deny".into();
    }
    if closed(&e.ingress, "ingress") {
        e.ingress.decision = "fail-closed".into();
        e.ingress.entry = None;
        e.ingress.rules = why();
        e.verdict = "deny".into();
    }
}

/// The sizes of the maps the agent writes, as the kernel has them.
fn map_limits(maps: &MapSet) -> Result<MapLimits, DatapathError> {
    Ok(MapLimits {
        endpoints: maps.max_entries(WritableMap::Endpoints)?,
        ipcache_v4: maps.max_entries(WritableMap::IpcacheV4)?,
        ipcache_v6: maps.max_entries(WritableMap::IpcacheV6)?,
        ipcache_host_v4: maps.max_entries(WritableMap::IpcacheHostV4)?,
        ipcache_host_v6: maps.max_entries(WritableMap::IpcacheHostV6)?,
        policy: maps.max_entries(WritableMap::Policy)?,
        policy_lengths: maps.max_entries(WritableMap::PolicyLengths)?,
    })
}

/// Reads what the kernel maps the agent writes hold: hash maps in batches where the kernel
/// can, everything else entry by entry.
pub fn read_state(maps: &MapSet) -> Result<MapState, DatapathError> {
    let read = |name: &'static str| move |e| DatapathError::map_access(name, "read", e);
    let mut s = MapState::default();
    match maps.read_batched::<u32, EndpointInfo>(WritableMap::Endpoints)? {
        Some(all) => s.endpoints.extend(all),
        None => {
            for item in maps.endpoints.iter() {
                let (k, v) = item.map_err(read(map_names::ENDPOINTS))?;
                s.endpoints.insert(k, v);
            }
        }
    }
    for item in maps.ipcache_v4.iter() {
        let (k, v) = item.map_err(read(map_names::IPCACHE_V4))?;
        s.ipcache_v4.insert((k.prefix_len(), k.data()), v);
    }
    for item in maps.ipcache_v6.iter() {
        let (k, v) = item.map_err(read(map_names::IPCACHE_V6))?;
        s.ipcache_v6.insert((k.prefix_len(), k.data()), v);
    }
    match maps.read_batched::<Ipv4Prefix, IpcacheValue>(WritableMap::IpcacheHostV4)? {
        Some(all) => s.ipcache_host_v4.extend(all),
        None => {
            for item in maps.ipcache_host_v4.iter() {
                let (k, v) = item.map_err(read(map_names::IPCACHE_HOST_V4))?;
                s.ipcache_host_v4.insert(k, v);
            }
        }
    }
    match maps.read_batched::<Ipv6Prefix, IpcacheValue>(WritableMap::IpcacheHostV6)? {
        Some(all) => s.ipcache_host_v6.extend(all),
        None => {
            for item in maps.ipcache_host_v6.iter() {
                let (k, v) = item.map_err(read(map_names::IPCACHE_HOST_V6))?;
                s.ipcache_host_v6.insert(k, v);
            }
        }
    }
    let policy: Vec<(PolicyKey, PolicyValue)> = match maps.read_batched(WritableMap::Policy)? {
        Some(all) => all,
        None => maps.policy.iter().collect::<Result<_, _>>().map_err(read(map_names::POLICY))?,
    };
    for (k, v) in policy {
        s.policy.insert((u32::from(k.prefix_len), PolicyKey { prefix_len: 0, ..k }), v);
    }
    match maps.read_batched::<PolicyLengthsKey, u32>(WritableMap::PolicyLengths)? {
        Some(all) => s.policy_lengths.extend(all),
        None => {
            for item in maps.policy_lengths.iter() {
                let (k, v) = item.map_err(read(map_names::POLICY_LENGTHS))?;
                s.policy_lengths.insert(k, v);
            }
        }
    }
    Ok(s)
}

/// Splits `adds` into those that fit beside the `current` entries of a map of `max`
/// entries, and those that must wait until the map's deletes are done.
fn split_room<T>(adds: &[T], current: usize, max: u32) -> (&[T], &[T]) {
    let room = (max as usize).saturating_sub(current).min(adds.len());
    adds.split_at(room)
}

/// Applies plan `p` to the maps, which hold `loaded`, in the order [`Plan`] describes:
/// upserts first (POLICY, POLICY_LENGTHS bits set, ipcache, ENDPOINTS), then deletes
/// (ENDPOINTS, POLICY, POLICY_LENGTHS bits cleared and keys deleted, ipcache). Adds that do
/// not fit beside a map's old entries (`limits`) are written right after that map's deletes.
pub fn apply_plan(maps: &mut MapSet, p: &Plan, loaded: &MapState, limits: &MapLimits) -> Result<(), DatapathError> {
    use WritableMap::*;
    fn pol(e: &[((u32, PolicyKey), PolicyValue)]) -> Vec<(PolicyKey, PolicyValue)> {
        e.iter().map(|((len, k), v)| (k.at_prefix(*len), *v)).collect()
    }
    fn lpm<K: aya::Pod, V: Copy>(e: &[((u32, K), V)]) -> Vec<(Key<K>, V)> {
        e.iter().map(|((len, k), v)| (Key::new(*len, *k), *v)).collect()
    }
    fn lpm_keys<K: aya::Pod>(e: &[(u32, K)]) -> Vec<Key<K>> {
        e.iter().map(|(len, k)| Key::new(*len, *k)).collect()
    }

    // 1. POLICY adds and updates.
    let (policy_now, policy_later) = split_room(&p.policy.adds, loaded.policy.len(), limits.policy);
    maps.upsert(Policy, &pol(policy_now))?;
    maps.upsert(Policy, &pol(&p.policy.updates))?;
    // 2. POLICY_LENGTHS: only bits set.
    let (lengths_now, lengths_later) =
        split_room(&p.policy_lengths.adds, loaded.policy_lengths.len(), limits.policy_lengths);
    maps.upsert(PolicyLengths, lengths_now)?;
    maps.upsert(PolicyLengths, &p.policy_lengths.updates)?;
    // 3. ipcache adds and updates.
    let (v4_now, v4_later) = split_room(&p.ipcache_v4.adds, loaded.ipcache_v4.len(), limits.ipcache_v4);
    maps.upsert(IpcacheV4, &lpm(v4_now))?;
    maps.upsert(IpcacheV4, &lpm(&p.ipcache_v4.updates))?;
    let (v6_now, v6_later) = split_room(&p.ipcache_v6.adds, loaded.ipcache_v6.len(), limits.ipcache_v6);
    maps.upsert(IpcacheV6, &lpm(v6_now))?;
    maps.upsert(IpcacheV6, &lpm(&p.ipcache_v6.updates))?;
    let (h4_now, h4_later) = split_room(&p.ipcache_host_v4.adds, loaded.ipcache_host_v4.len(), limits.ipcache_host_v4);
    maps.upsert(IpcacheHostV4, h4_now)?;
    maps.upsert(IpcacheHostV4, &p.ipcache_host_v4.updates)?;
    let (h6_now, h6_later) = split_room(&p.ipcache_host_v6.adds, loaded.ipcache_host_v6.len(), limits.ipcache_host_v6);
    maps.upsert(IpcacheHostV6, h6_now)?;
    maps.upsert(IpcacheHostV6, &p.ipcache_host_v6.updates)?;
    // 4. ENDPOINTS adds and updates: enforcement switches on once its entries are there.
    let (ep_now, ep_later) = split_room(&p.endpoints.adds, loaded.endpoints.len(), limits.endpoints);
    maps.upsert(Endpoints, ep_now)?;
    maps.upsert(Endpoints, &p.endpoints.updates)?;
    // 5. ENDPOINTS deletes.
    maps.delete(Endpoints, &p.endpoints.deletes)?;
    maps.upsert(Endpoints, ep_later)?;
    // 6. POLICY deletes.
    maps.delete(Policy, &p.policy.deletes.iter().map(|(len, k)| k.at_prefix(*len)).collect::<Vec<_>>())?;
    maps.upsert(Policy, &pol(policy_later))?;
    // 7. POLICY_LENGTHS: bits cleared, keys deleted.
    maps.upsert(PolicyLengths, &p.policy_lengths_narrow)?;
    maps.delete(PolicyLengths, &p.policy_lengths.deletes)?;
    maps.upsert(PolicyLengths, lengths_later)?;
    // 8. ipcache deletes.
    maps.delete(IpcacheV4, &lpm_keys(&p.ipcache_v4.deletes))?;
    maps.upsert(IpcacheV4, &lpm(v4_later))?;
    maps.delete(IpcacheV6, &lpm_keys(&p.ipcache_v6.deletes))?;
    maps.upsert(IpcacheV6, &lpm(v6_later))?;
    maps.delete(IpcacheHostV4, &p.ipcache_host_v4.deletes)?;
    maps.upsert(IpcacheHostV4, h4_later)?;
    maps.delete(IpcacheHostV6, &p.ipcache_host_v6.deletes)?;
    maps.upsert(IpcacheHostV6, h6_later)?;
    // 9. Last: established flows are re-checked against everything written above (see
    //    `config::POLICY_GEN`).
    if !p.is_empty() {
        maps.bump_policy_generation()?;
    }
    Ok(())
}

impl Actor for MapWriter {
    type Context = Context<Self>;
    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.run_interval(RETRY_INTERVAL, |act, _| act.retry());
        if self.drift_interval.is_zero() {
            tracing::info!("periodic drift check of the eBPF maps is off");
            ctx.run_interval(ATTACH_RETRY_INTERVAL, |act, _| act.periodic(false));
        } else {
            ctx.run_interval(self.drift_interval, |act, _| act.periodic(true));
        }
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

/// A desired state waits in `pending` until the messages already queued are handled,
/// so that a burst of revisions is applied once, at its latest.
impl Handler<ApplyDesired> for MapWriter {
    type Result = ();
    fn handle(&mut self, msg: ApplyDesired, ctx: &mut Context<Self>) {
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
        if let Err(e) = self.reconcile(&msg) {
            self.counters.apply_failures += 1;
            tracing::error!(error = %e, "applying the desired state failed; retrying");
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
    /// What did not fit in the maps at the last apply (empty when everything fits).
    pub map_errors: Vec<String>,
    pub counters: WriterCounters,
    /// The sizes of the maps the agent writes.
    pub limits: Option<MapLimits>,
}

impl Handler<GetRealized> for MapWriter {
    type Result = MessageResult<GetRealized>;
    fn handle(&mut self, _: GetRealized, _: &mut Context<Self>) -> Self::Result {
        MessageResult(RealizedState {
            revision: self.realized_revision,
            endpoints: self.realized.clone(),
            attach_mode: self.datapath.attach_mode().to_string(),
            warnings: self.warnings.clone(),
            map_errors: self.map_errors.clone(),
            counters: self.counters,
            limits: Some(self.limits),
        })
    }
}
