//! The agent's side of the kvstore: the node's lease, publishing its pods and itself, and
//! watching the other nodes'. See the parent module for the semantics.
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{EventType, GetOptions, LeaseKeepAliveStream, LeaseKeeper, WatchOptions};
use palisade_policy::labels::LabelSet;

use super::layout::{self, Entry, IpEntry, KvNamedPort, NodeAddress, NodeEntry, label_key};
use super::{Kv, KvError, KvOptions};
use crate::actors::Agent;
use crate::actors::endpoints::ListEndpoints;
use crate::actors::identity::{RemoveRemoteEndpoint, SetKvstoreNodes};
use crate::api::types::PortSpec;
use crate::k8s::sync::RemoteSpec;

/// Runs the lease, the publisher and the watcher until the agent stops ([`restore`] first).
pub async fn run(agent: Agent, kv: Arc<Kv>, opts: KvOptions) {
    let restored = restore(&agent, &opts).await;
    Box::pin(run_restored(agent, kv, opts, restored)).await;
}

/// [`run`] after [`restore`] (which the agent awaits before its API answers and its other
/// sources start).
pub async fn run_restored(agent: Agent, kv: Arc<Kv>, opts: KvOptions, restored: Restored) {
    let _ = agent.kvstore.set((kv.clone(), opts.clone()));
    tracing::info!(endpoints = ?opts.endpoints, node = %opts.node, cluster = %opts.cluster, ttl = ?opts.lease_ttl, "kvstore mode: identities, pods and nodes shared through etcd");
    actix_rt::spawn(watch(agent.clone(), kv.clone(), opts.clone(), restored));
    publish_loop(agent, kv, opts).await;
}

/// What the watcher knew when the agent last saved it, handed to the identity cache again.
pub struct Restored {
    store: Store,
    mirror: Mirror,
}

/// The other nodes' pods and nodes as the kvstore taught them before a restart (the state
/// directory keeps them), handed to the identity cache before the store answers: an agent
/// restarted while etcd is away keeps judging their flows as before instead of as world.
/// The first list replaces them (what it lacks goes at once if it continues the saved
/// history, after the grace otherwise).
pub async fn restore(agent: &Agent, opts: &KvOptions) -> Restored {
    let dir = crate::state::StateDir::new(&agent.config.state_dir);
    let snapshot: Snapshot<'static> = dir.load_kvstore().unwrap_or_else(|e| {
        tracing::warn!(error = %e, "kvstore: what the store taught before the restart is unreadable; starting without it");
        Snapshot::default()
    });
    let store = Store::from_snapshot(&snapshot, &opts.cluster);
    let mut mirror = Mirror::new();
    if !store.ips.is_empty() || !store.nodes.is_empty() {
        mirror.apply(agent, &store, opts).await;
        tracing::info!(
            revision = store.revision,
            addresses = mirror.applied.len(),
            nodes = mirror.remote_nodes.len(),
            "kvstore: what the store taught before the restart restored until it answers"
        );
    }
    Restored { store, mirror }
}

/// The watched store as the state directory keeps it.
#[derive(Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Snapshot<'a> {
    revision: i64,
    /// Every key with its value and the revision it was written at.
    keys: std::borrow::Cow<'a, BTreeMap<String, (String, i64)>>,
}

/// How long a label set whose number etcd gives other labels waits before it is tried again.
const CONFLICT_RETRY: Duration = Duration::from_secs(10);

/// What was written under the current lease.
#[derive(Default)]
struct Published {
    /// Label set key form -> identity.
    values: BTreeMap<String, u32>,
    ips: BTreeMap<IpAddr, String>,
    node: Option<String>,
    /// Identities whose number etcd gives another label set, with when that was seen:
    /// their pods are not published, and the label set is tried again after
    /// [`CONFLICT_RETRY`].
    conflicted: BTreeMap<u32, Instant>,
}

/// Logs a failure at most every few seconds (an etcd that is away fails every poll).
struct Quiet {
    last: Option<Instant>,
}

impl Quiet {
    fn warn(&mut self, what: &str, e: &KvError) {
        if self.last.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) {
            tracing::warn!(error = %e, "kvstore: {what}; what is known stays as it was, retrying");
            self.last = Some(Instant::now());
        }
    }
}

/// Wait before trying again after a failure (etcd away, lease lost).
const RETRY: Duration = Duration::from_millis(200);

/// Publishes when the endpoint tracker reports a change, and at least every
/// [`KvOptions::poll`] (lease keep-alive, garbage collection, a republish asked by the
/// watcher); after a failure, again in [`RETRY`].
async fn publish_loop(agent: Agent, kv: Arc<Kv>, opts: KvOptions) {
    let mut p = Publisher {
        published: Published::default(),
        keeper: None,
        last_alive: Instant::now(),
        quiet: Quiet { last: None },
        gc_candidates: BTreeMap::new(),
        last_gc: Instant::now(),
        lease_used: 0,
        superseded: None,
    };
    let changed = agent.endpoints_changed.clone();
    let mut wait = Duration::ZERO;
    loop {
        let until_alive = (opts.lease_ttl / 3).saturating_sub(p.last_alive.elapsed());
        tokio::select! {
            () = changed.notified() => {}
            () = tokio::time::sleep(wait.min(until_alive)) => {}
        }
        wait = if p.step(&agent, &kv, &opts).await { opts.poll } else { RETRY };
    }
}

/// The publisher's state between two rounds.
struct Publisher {
    published: Published,
    keeper: Option<(LeaseKeeper, LeaseKeepAliveStream)>,
    last_alive: Instant,
    quiet: Quiet,
    gc_candidates: BTreeMap<u32, i64>,
    last_gc: Instant,
    /// The lease published under last, and one it replaced whose keys have not been
    /// revoked yet (after a lost lease: etcd may still hold the old one, restored when it
    /// came back, with keys of pods gone meanwhile under it).
    lease_used: i64,
    superseded: Option<i64>,
}

impl Publisher {
    /// One round: the lease, its keep-alive, publishing, collecting. Answers whether it
    /// went through.
    async fn step(&mut self, agent: &Agent, kv: &Kv, opts: &KvOptions) -> bool {
        if kv.lease() == 0 {
            match kv.grant(opts.lease_ttl).await {
                Ok(id) => {
                    tracing::info!(lease = id, "kvstore: lease granted; publishing this node's state");
                    kv.set_lease(id);
                    kv.health().counters.lease_grants += 1;
                    if self.lease_used != 0 {
                        self.superseded = Some(self.lease_used);
                    }
                    self.lease_used = id;
                    self.published = Published::default();
                    self.keeper = None;
                    self.last_alive = Instant::now();
                }
                Err(e) => {
                    self.quiet.warn("cannot get a lease", &e);
                    return false;
                }
            }
        }
        if self.last_alive.elapsed() >= opts.lease_ttl / 3 {
            match keep_alive(kv, &mut self.keeper).await {
                Ok(ttl) if ttl > 0 => self.last_alive = Instant::now(),
                Ok(_) => {
                    tracing::warn!(
                        lease = kv.lease(),
                        "kvstore: the lease is gone (expired or the store was emptied); publishing again under a new one"
                    );
                    kv.set_lease(0);
                    kv.health().counters.leases_lost += 1;
                    return false;
                }
                Err(e) => {
                    self.keeper = None;
                    self.quiet.warn("keeping the lease alive failed", &e);
                    if self.last_alive.elapsed() > opts.lease_ttl {
                        kv.set_lease(0);
                    }
                    return false;
                }
            }
        }
        if kv.take_dirty() {
            self.published = Published::default();
        }
        let result = publish(agent, kv, opts, &mut self.published).await;
        {
            let mut h = kv.health();
            h.counters.published_identities = self.published.values.len();
            h.counters.published_addresses = self.published.ips.len();
            h.counters.conflicted_identities = self.published.conflicted.len();
        }
        if let (Ok(()), Some(old)) = (&result, self.superseded) {
            // Everything is written under the new lease: what is left under the old one is
            // what this node no longer has (a pod deleted while etcd was away).
            match kv.revoke(old).await {
                Ok(()) => {
                    tracing::info!(
                        lease = old,
                        "kvstore: the previous lease revoked (its keys not published again are gone)"
                    );
                    self.superseded = None;
                }
                Err(e) => self.quiet.warn("revoking the previous lease failed", &e),
            }
        }
        if let Err(e) = result {
            if e.lease_lost() {
                tracing::warn!("kvstore: the lease is gone; publishing again under a new one");
                kv.set_lease(0);
                kv.health().counters.leases_lost += 1;
            } else {
                self.quiet.warn("publishing failed", &e);
            }
            return false;
        }
        if self.last_gc.elapsed() >= opts.lease_ttl * 2 {
            self.last_gc = Instant::now();
            let own = self.published.values.keys().map(String::as_str);
            if let Err(e) = kv.collect_unused_checking(&mut self.gc_candidates, own).await {
                self.quiet.warn("collecting unused identities failed", &e);
            }
        }
        true
    }
}

/// One keep-alive of the current lease; answers the TTL etcd gives it (0: unknown lease).
async fn keep_alive(kv: &Kv, keeper: &mut Option<(LeaseKeeper, LeaseKeepAliveStream)>) -> Result<i64, KvError> {
    if keeper.is_none() {
        let mut c = kv.client();
        *keeper = Some(kv.bounded("keep-alive", c.lease_keep_alive(kv.lease())).await?);
    }
    let Some((k, s)) = keeper.as_mut() else { return Err(KvError::NoLease) };
    kv.bounded("keep-alive", k.keep_alive()).await?;
    match kv.bounded("keep-alive", s.message()).await? {
        Some(resp) => Ok(resp.ttl()),
        None => Err(KvError::Invalid("the keep-alive stream ended".into())),
    }
}

/// Brings what this node published in line with its endpoints.
async fn publish(agent: &Agent, kv: &Kv, opts: &KvOptions, published: &mut Published) -> Result<(), KvError> {
    let eps = agent
        .endpoints
        .send(ListEndpoints)
        .await
        .map_err(|e| KvError::Invalid(format!("endpoint tracker unavailable: {e}")))?;
    let Some(&host) = opts.node_addresses.first() else {
        return Err(KvError::Invalid("no node address".into()));
    };
    let mut values: BTreeMap<String, (LabelSet, u32)> = BTreeMap::new();
    let mut ips: BTreeMap<IpAddr, (u32, String)> = BTreeMap::new();
    for ep in &eps {
        values.insert(label_key(&ep.labels), (ep.labels.clone(), ep.identity));
        for ip in ep.ipv4.map(IpAddr::V4).into_iter().chain(ep.ipv6.map(IpAddr::V6)) {
            let named_ports = ep
                .named_ports
                .iter()
                .filter(|p| !p.name.is_empty())
                .map(|p| KvNamedPort {
                    name: p.name.clone(),
                    port: p.port,
                    protocol: crate::monitor::protocol_name(p.protocol.number()),
                })
                .collect();
            let entry = IpEntry {
                ip,
                host_ip: host,
                id: ep.identity,
                namespace: ep.namespace.clone(),
                pod: ep.name.clone(),
                named_ports,
            };
            ips.insert(ip, (ep.identity, serde_json::to_string(&entry).expect("plain struct")));
        }
    }
    for (lkey, (labels, id)) in &values {
        if published.values.get(lkey) == Some(id)
            || published.conflicted.get(id).is_some_and(|t| t.elapsed() < CONFLICT_RETRY)
        {
            continue;
        }
        let got = kv.allocate(labels, Some(*id)).await?;
        if got != *id {
            tracing::error!(identity = id, cluster_identity = got, labels = %labels, "kvstore: this node's identity has another number in etcd; its pods are not published (other nodes see them as world); tried again in {CONFLICT_RETRY:?}");
            published.conflicted.insert(*id, Instant::now());
            kv.release(lkey).await?;
            continue;
        }
        published.conflicted.remove(id);
        published.values.insert(lkey.clone(), *id);
    }
    let gone: Vec<String> = published.values.keys().filter(|k| !values.contains_key(*k)).cloned().collect();
    for lkey in gone {
        kv.release(&lkey).await?;
        published.values.remove(&lkey);
    }
    let prefix = layout::ip_prefix(&opts.cluster);
    for (ip, (id, json)) in &ips {
        if published.conflicted.contains_key(id) || published.ips.get(ip) == Some(json) {
            continue;
        }
        kv.put_leased(format!("{prefix}{ip}"), json.clone()).await?;
        published.ips.insert(*ip, json.clone());
    }
    let gone: Vec<IpAddr> = published.ips.keys().filter(|ip| !ips.contains_key(*ip)).copied().collect();
    for ip in gone {
        kv.delete(format!("{prefix}{ip}")).await?;
        published.ips.remove(&ip);
    }
    let node = NodeEntry {
        name: opts.node.clone(),
        cluster: opts.cluster.clone(),
        addresses: opts.node_addresses.iter().map(|ip| NodeAddress { kind: "InternalIP".into(), ip: *ip }).collect(),
    };
    let node = serde_json::to_string(&node).expect("plain struct");
    if published.node.as_ref() != Some(&node) {
        kv.put_leased(format!("{}{}", layout::nodes_prefix(&opts.cluster), opts.node), node.clone()).await?;
        published.node = Some(node);
    }
    Ok(())
}

/// What the store holds for this cluster, as the watcher knows it.
#[derive(Clone, Default)]
struct Store {
    identities: BTreeMap<u32, LabelSet>,
    ips: BTreeMap<String, IpEntry>,
    nodes: BTreeMap<String, NodeEntry>,
    /// Every key held, with its value and the revision it was last written at (the
    /// continuity check's evidence, and the state directory's snapshot).
    raw: BTreeMap<String, (String, i64)>,
    /// The store revision this is the state at.
    revision: i64,
}

impl Store {
    fn put(&mut self, cluster: &str, key: &str, value: &[u8], mod_revision: i64) {
        self.raw.insert(key.to_string(), (String::from_utf8_lossy(value).into_owned(), mod_revision));
        match layout::parse_entry(cluster, key, value) {
            Ok(Entry::Identity(id, labels)) => {
                self.identities.insert(id, labels);
            }
            Ok(Entry::Ip(e)) => {
                self.ips.insert(key.to_string(), e);
            }
            Ok(Entry::Node(n)) => {
                self.nodes.insert(key.to_string(), n);
            }
            Ok(Entry::Other) => {}
            Err(e) => tracing::warn!("kvstore: entry ignored: {e}"),
        }
    }

    fn delete(&mut self, key: &str) {
        self.raw.remove(key);
        if let Some(id) = key.strip_prefix(layout::IDS).and_then(|s| s.parse::<u32>().ok()) {
            self.identities.remove(&id);
        }
        self.ips.remove(key);
        self.nodes.remove(key);
    }

    /// Whether `fresh`, a new list of the store, continues the history `self` was
    /// watched up to: it is not older, every key in it written at or before `self`'s
    /// revision is one `self` holds from that same write, and there is at least one such
    /// key. Then what `fresh` lacks was deleted for real (during a broken watch); without
    /// that evidence (etcd wiped, or restored from another copy) it may be a store being
    /// refilled by its agents.
    fn continued_by(&self, fresh: &Store) -> bool {
        if fresh.revision < self.revision {
            return false;
        }
        let mut evidence = false;
        for (key, (_, rev)) in fresh.raw.iter().filter(|(_, (_, rev))| *rev <= self.revision) {
            if self.raw.get(key).map(|(_, r)| r) != Some(rev) {
                return false;
            }
            evidence = true;
        }
        evidence
    }

    fn from_snapshot(snapshot: &Snapshot<'_>, cluster: &str) -> Store {
        let mut store = Store { revision: snapshot.revision, ..Store::default() };
        for (key, (value, rev)) in snapshot.keys.iter() {
            store.put(cluster, key, value.as_bytes(), *rev);
        }
        store
    }

    /// `self`, and of `older` what `self` lacks.
    /// (The entries only: not the raw keys, which only the watched store needs.)
    fn merged(&self, older: &Store) -> Store {
        let mut out = Store {
            identities: older.identities.clone(),
            ips: older.ips.clone(),
            nodes: older.nodes.clone(),
            ..Store::default()
        };
        out.identities.extend(self.identities.iter().map(|(k, v)| (*k, v.clone())));
        out.ips.extend(self.ips.iter().map(|(k, v)| (k.clone(), v.clone())));
        out.nodes.extend(self.nodes.iter().map(|(k, v)| (k.clone(), v.clone())));
        out
    }

    fn is_empty(&self) -> bool {
        self.identities.is_empty() && self.ips.is_empty() && self.nodes.is_empty()
    }

    /// What the mirror is given: `self`, with `older`'s entries it lacks, copied only when
    /// there are any (each watch message costs a look at the store, not a copy of it).
    fn with_older<'a>(&'a self, older: &Store) -> std::borrow::Cow<'a, Store> {
        if older.is_empty() { std::borrow::Cow::Borrowed(self) } else { std::borrow::Cow::Owned(self.merged(older)) }
    }
}

/// When and at which revision the watcher last wrote the store to the state directory.
struct Saved {
    revision: i64,
    at: Instant,
}

impl Saved {
    /// Writes `store` when it moved on: at most every second while watching (`now`: at
    /// once, after a list and when the watch broke).
    fn maybe_save(&mut self, state: &crate::state::StateDir, store: &Store, now: bool) {
        if store.revision == self.revision || (!now && self.at.elapsed() < Duration::from_secs(1)) {
            return;
        }
        let snapshot = Snapshot { revision: store.revision, keys: std::borrow::Cow::Borrowed(&store.raw) };
        if let Err(e) = state.save_kvstore(&snapshot) {
            tracing::warn!(error = %e, "kvstore: saving what the store taught to the state directory failed");
        }
        self.revision = store.revision;
        self.at = Instant::now();
    }
}

/// The watcher's hand-ins to the identity cache.
struct Mirror {
    /// `kv/<ip>` -> (labels, address, identity) handed in.
    applied: BTreeMap<String, (RemoteSpec, u32)>,
    remote_nodes: BTreeSet<IpAddr>,
    last_full: Instant,
}

/// The other nodes' pods of `store` as remote endpoints (an address whose identity has no
/// master key yet is left out: it stays world).
fn desired(store: &Store, own: &[IpAddr]) -> BTreeMap<String, (RemoteSpec, u32)> {
    let mut out = BTreeMap::new();
    for e in store.ips.values() {
        if own.contains(&e.host_ip) {
            continue;
        }
        if let Some(labels) = store.identities.get(&e.id) {
            let ports: Vec<PortSpec> = e
                .named_ports
                .iter()
                .map(|p| PortSpec { name: p.name.clone(), port: p.port, protocol: p.protocol.clone() })
                .collect();
            let mut spec = RemoteSpec::new(labels.clone(), vec![e.ip], &ports);
            if !e.namespace.is_empty() && !e.pod.is_empty() {
                spec = spec.named(format!("{}/{}", e.namespace, e.pod));
            }
            out.insert(format!("kv/{}", e.ip), (spec, e.id));
        }
    }
    out
}

impl Mirror {
    fn new() -> Mirror {
        Mirror { applied: BTreeMap::new(), remote_nodes: BTreeSet::new(), last_full: Instant::now() }
    }

    async fn apply(&mut self, agent: &Agent, store: &Store, opts: &KvOptions) {
        let want = desired(store, &opts.node_addresses);
        let all = self.last_full.elapsed() > Duration::from_secs(5);
        if all {
            self.last_full = Instant::now();
        }
        for (key, (spec, id)) in &want {
            if !all && self.applied.get(key) == Some(&(spec.clone(), *id)) {
                continue;
            }
            match agent.identities.send(spec.upsert(key, Some(*id))).await {
                Ok(got) if got == *id => {
                    self.applied.insert(key.clone(), (spec.clone(), *id));
                }
                Ok(_) => {}
                Err(e) => tracing::error!(error = %e, "identity cache unavailable; will retry"),
            }
        }
        let gone: Vec<String> = self.applied.keys().filter(|k| !want.contains_key(*k)).cloned().collect();
        for key in gone {
            if agent.identities.send(RemoveRemoteEndpoint { key: key.clone() }).await.is_ok() {
                self.applied.remove(&key);
            }
        }
        let nodes: BTreeSet<IpAddr> = store
            .nodes
            .values()
            .filter(|n| n.name != opts.node)
            .flat_map(|n| n.addresses.iter().map(|a| a.ip))
            .filter(|ip| !opts.node_addresses.contains(ip))
            .collect();
        if all || nodes != self.remote_nodes {
            let msg = SetKvstoreNodes { addresses: nodes.clone() };
            if agent.identities.send(msg).await.is_ok() {
                self.remote_nodes = nodes;
            }
        }
    }
}

/// Lists and watches the master keys and the `ip` and `nodes` keys of `cilium/state/`;
/// after the watch breaks, lists again. What a new
/// list lacks of the previous one was deleted while the watch was broken if the list
/// continues the store's history ([`Store::continued_by`]), and goes at once; otherwise
/// (etcd wiped or restored: an emptied store refilled by the agents would make every
/// remote pod world for a moment) it is kept for twice the lease TTL. Deletions the watch
/// reports apply at once.
async fn watch(agent: Agent, kv: Arc<Kv>, opts: KvOptions, restored: Restored) {
    let Restored { mut store, mut mirror } = restored;
    let mut previous = Store::default();
    let state = crate::state::StateDir::new(&agent.config.state_dir);
    let mut saved = Saved { revision: store.revision, at: Instant::now() };
    let mut previous_until = Instant::now();
    let mut quiet = Quiet { last: None };
    let grace = opts.lease_ttl * 2;
    let mut first = true;
    loop {
        if !first {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        first = false;
        let mut c = kv.client();
        // The master keys, then the `ip` and `nodes` keys of the same revision.
        let ids = match kv.bounded("list", c.get(layout::IDS, Some(GetOptions::new().with_prefix()))).await {
            Ok(r) => r,
            Err(e) => {
                quiet.warn("listing the store failed", &e);
                continue;
            }
        };
        let revision = ids.header().map_or(0, etcd_client::ResponseHeader::revision);
        let rest = GetOptions::new().with_range(layout::STATE_END).with_revision(revision);
        let rest = match kv.bounded("list", c.get(layout::AFTER_VALUES, Some(rest))).await {
            Ok(r) => r,
            Err(e) => {
                quiet.warn("listing the store failed", &e);
                continue;
            }
        };
        {
            let mut h = kv.health();
            h.counters.store_lists += 1;
            h.counters.watch_revision = revision;
        }
        let mut fresh = Store::default();
        for kvp in ids.kvs().iter().chain(rest.kvs()) {
            if let Ok(key) = kvp.key_str() {
                fresh.put(&opts.cluster, key, kvp.value(), kvp.mod_revision());
            }
        }
        kv.replace_masters(ids.kvs().iter().filter_map(|kvp| {
            let id = kvp.key_str().ok()?.strip_prefix(layout::IDS)?.parse().ok()?;
            Some((id, String::from_utf8_lossy(kvp.value()).into_owned()))
        }));
        fresh.revision = revision;
        // A list that continues the history: what it lacks was deleted while the watch was
        // broken, gone at once. Otherwise it is kept for the grace.
        if !store.continued_by(&fresh) {
            previous = store.merged(&previous);
            previous_until = Instant::now() + grace;
        }
        store = fresh;
        tracing::info!(
            revision,
            identities = store.identities.len(),
            addresses = store.ips.len(),
            nodes = store.nodes.len(),
            "kvstore: store listed; watching"
        );
        mirror.apply(&agent, &store.with_older(&previous), &opts).await;
        saved.maybe_save(&state, &store, true);
        if let Ok(revision) = agent.resolver.send(crate::actors::resolver::CurrentRevision).await {
            crate::metrics::readiness().source_synced(crate::metrics::SOURCE_KVSTORE, revision);
        }
        // One stream, two watches: the master keys, and the `ip` and `nodes` keys.
        let options = WatchOptions::new().with_prefix().with_start_revision(revision + 1);
        let mut stream = match kv.bounded("watch", c.watch(layout::IDS, Some(options))).await {
            Ok(s) => s,
            Err(e) => {
                quiet.warn("watching the store failed", &e);
                continue;
            }
        };
        let options = WatchOptions::new().with_range(layout::STATE_END).with_start_revision(revision + 1);
        if let Err(e) = kv.bounded("watch", stream.watch(layout::AFTER_VALUES, Some(options))).await {
            quiet.warn("watching the store failed", &e);
            continue;
        }
        loop {
            let msg = match tokio::time::timeout(Duration::from_secs(1), stream.message()).await {
                Err(_) => None,
                Ok(Ok(Some(m))) => Some(m),
                Ok(Ok(None)) => break,
                Ok(Err(e)) => {
                    let e = KvError::Etcd(e);
                    kv.health().failed("watch", &e.to_string());
                    quiet.warn("the watch broke", &e);
                    break;
                }
            };
            // A quiet second (the 5 s refresh, the grace of `previous`) or events.
            let mut touched = msg.is_none();
            if let Some(m) = msg {
                if m.canceled() {
                    break;
                }
                {
                    let mut h = kv.health();
                    h.counters.watch_events += m.events().len() as u64;
                    if let Some(header) = m.header() {
                        store.revision = store.revision.max(header.revision());
                        h.counters.watch_revision = store.revision;
                    }
                }
                for ev in m.events() {
                    let Some(kvp) = ev.kv() else { continue };
                    let Ok(key) = kvp.key_str() else { continue };
                    touched = true;
                    if let Some(id) = key.strip_prefix(layout::IDS).and_then(|s| s.parse().ok()) {
                        let labels = (ev.event_type() == EventType::Put)
                            .then(|| String::from_utf8_lossy(kvp.value()).into_owned());
                        kv.note_master(id, labels);
                    }
                    match ev.event_type() {
                        EventType::Put => store.put(&opts.cluster, key, kvp.value(), kvp.mod_revision()),
                        EventType::Delete => {
                            let own_ip = store.ips.get(key).is_some_and(|e| opts.node_addresses.contains(&e.host_ip));
                            let own_node = key == format!("{}{}", layout::nodes_prefix(&opts.cluster), opts.node);
                            if own_ip || own_node {
                                kv.note_own_key_deleted(key);
                            }
                            store.delete(key);
                            previous.delete(key);
                        }
                    }
                }
            }
            if Instant::now() > previous_until && !previous.is_empty() {
                touched = true;
                previous = Store::default();
            }
            saved.maybe_save(&state, &store, false);
            if !touched {
                continue;
            }
            mirror.apply(&agent, &store.with_older(&previous), &opts).await;
            let mut h = kv.health();
            h.counters.remote_addresses = mirror.applied.len();
            h.counters.remote_nodes = mirror.remote_nodes.len();
        }
        // The watch broke: what it brought is kept for a restart before etcd is back.
        saved.maybe_save(&state, &store, true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use palisade_policy::labels::Label;

    #[test]
    fn remote_pods_need_their_identity_and_own_pods_are_skipped() {
        let mut s = Store::default();
        s.identities.insert(300, [Label::k8s("app", "web")].into_iter().collect());
        let own: IpAddr = "10.200.0.1".parse().unwrap();
        let other: IpAddr = "10.201.0.1".parse().unwrap();
        for (ip, host, id) in [("10.201.1.10", other, 300), ("10.201.1.11", other, 301), ("10.200.1.10", own, 300)] {
            let ip: IpAddr = ip.parse().unwrap();
            s.ips.insert(
                format!("k/{ip}"),
                IpEntry { ip, host_ip: host, id, namespace: "d".into(), pod: "p".into(), named_ports: Vec::new() },
            );
        }
        let want = desired(&s, &[own]);
        assert_eq!(want.keys().collect::<Vec<_>>(), ["kv/10.201.1.10"], "301 has no master key; 10.200.1.10 is ours");
        // The entry's pod name goes along (flow records name the pod by it); without one, none.
        assert_eq!(want["kv/10.201.1.10"].0.pod, "d/p");
        s.ips.values_mut().for_each(|e| e.pod.clear());
        assert_eq!(desired(&s, &[own])["kv/10.201.1.10"].0.pod, "");
    }

    #[test]
    fn a_list_continues_the_history_only_with_evidence_and_no_contradiction() {
        let store = |revision: i64, keys: &[(&str, i64)]| Store {
            raw: keys.iter().map(|(k, r)| ((*k).to_string(), (String::new(), *r))).collect(),
            revision,
            ..Store::default()
        };
        let watched =
            store(40, &[("cilium/state/identities/v1/id/256", 3), ("cilium/state/ip/v1/default/10.1.1.1", 30)]);
        // The same etcd after an outage: the master key unchanged, the pod key rewritten
        // under a new lease, another pod key deleted meanwhile.
        let after = store(55, &[("cilium/state/identities/v1/id/256", 3), ("cilium/state/ip/v1/default/10.1.1.1", 51)]);
        assert!(watched.continued_by(&after));
        // Wiped and refilled: older revision, or keys of the past written at other revisions.
        assert!(!watched.continued_by(&store(12, &[("cilium/state/identities/v1/id/256", 3)])));
        assert!(!watched.continued_by(&store(60, &[("cilium/state/identities/v1/id/256", 7)])));
        // Refilled past the old revision with nothing left from before: no evidence.
        assert!(!watched.continued_by(&store(60, &[("cilium/state/identities/v1/id/256", 45)])));
        // A key from before that the watch never showed: not the history it watched.
        let unknown = store(60, &[("cilium/state/identities/v1/id/256", 3), ("cilium/state/identities/v1/id/257", 20)]);
        assert!(!watched.continued_by(&unknown));
    }
}
