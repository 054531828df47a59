//! The kvstore mode (`--kvstore etcd`): identities, pod addresses and nodes shared by every
//! agent of a cluster through etcd, in Cilium's layout ([`layout`]).
//!
//! - **Identities** are allocated cluster-wide ([`Kv::allocate`]): a label set already used
//!   somewhere keeps its number (its per-node keys say which); a new one gets the lowest
//!   free number by one transaction that creates the master key only if the number is free
//!   *and* no node holds the label set yet, so two nodes asking at once get one number
//!   (the loser's transaction fails and it reads the winner's). Each node keeps a per-node
//!   key per label set its pods use, under its lease; master keys no node uses any more
//!   are collected ([`Kv::collect_unused`]) after two passes.
//! - **Publishing** ([`sync::run`]): this node's pods' addresses (with identity and host
//!   address) and its node entry, under its lease, level-based: on every change the
//!   endpoint tracker reports (and at least every [`KvOptions::poll`]) it compares what
//!   the endpoint tracker holds with what was written under the current lease; a lost
//!   lease (expired while etcd was away, or etcd wiped) means a new lease and everything
//!   written again.
//! - **Watching**: the master keys and the `ip` and `nodes` keys (not the per-node keys: an
//!   allocation elsewhere is no event here; the collection pass checks this node's own);
//!   other nodes' pod addresses map to the
//!   identity of their number in the ipcache (through the identity cache's remote
//!   endpoints, as file mode and the Kubernetes source do), other nodes' addresses to
//!   remote-node.
//!
//! Fail closed: while etcd cannot be reached, a label set no local pod has yet cannot get a
//! number (its pod's registration fails with an error saying so, and nothing new is
//! enforced as allowed); what was learnt before stays as it was, and an address nobody
//! published is world.
pub mod health;
pub mod layout;
pub mod sync;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse};
use palisade_policy::identity::{FIRST_CLUSTER, LOCAL_SCOPE};
use palisade_policy::labels::LabelSet;

use layout::{IDS, VALUES, id_key, label_key, parse_label_key, value_prefix};

/// Attempts of one allocation before it gives up.
pub const MAX_ATTEMPTS: u32 = 64;

/// Lost races of one allocation after which the node reads every master key again.
const REFRESH_AFTER: u32 = 4;

/// Least time between two such reads by one node.
const REFRESH_EVERY: Duration = Duration::from_millis(100);

/// Why a kvstore operation failed.
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    #[error("kvstore: etcd did not answer within {0:?} (is it running and reachable at --kvstore-endpoints?)")]
    Timeout(Duration),
    #[error("kvstore: etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error(
        "kvstore: this node holds no lease yet (etcd not reached since the agent started or since the lease was lost)"
    )]
    NoLease,
    #[error(
        "kvstore: identity {id} of labels {labels} is held by other labels in etcd (a store restored from an old copy?)"
    )]
    Conflict { id: u32, labels: String },
    #[error("kvstore: no identity for {0} after {MAX_ATTEMPTS} attempts (too much contention)")]
    Contention(String),
    #[error("kvstore: no free identity number left")]
    Exhausted,
    #[error("kvstore: {0}")]
    Invalid(String),
}

impl KvError {
    /// etcd no longer knows the lease (it expired, or the store was wiped).
    pub fn lease_lost(&self) -> bool {
        matches!(self, KvError::Etcd(e) if e.to_string().contains("lease not found"))
    }
}

/// How the agent reaches etcd and what it publishes as.
#[derive(Clone, Debug)]
pub struct KvOptions {
    pub endpoints: Vec<String>,
    pub cluster: String,
    /// This node's name (its per-node keys and its node entry).
    pub node: String,
    /// This node's addresses: the first is the host address of its pods' entries.
    pub node_addresses: Vec<std::net::IpAddr>,
    /// Time-to-live of the node's lease; kept alive every third of it.
    pub lease_ttl: Duration,
    /// Longest time between two comparisons of this node's endpoints with what is
    /// published (each change of the endpoints starts one at once).
    pub poll: Duration,
    /// Bound on every single etcd request.
    pub op_timeout: Duration,
}

/// A connection to etcd on behalf of one node, and that node's current lease.
pub struct Kv {
    client: Client,
    node: String,
    /// The node's lease, 0 while it has none.
    lease: AtomicI64,
    op_timeout: Duration,
    /// Keys of this node that it is deleting itself (the watcher's delete events of the
    /// others mean someone else removed them).
    own_deletes: std::sync::Mutex<BTreeSet<String>>,
    /// Someone removed a key this node published: publish everything again.
    dirty: std::sync::atomic::AtomicBool,
    masters_seen: std::sync::Mutex<MasterCache>,
    /// Counts the random picks of [`MasterCache::pick`].
    picks: std::sync::atomic::AtomicU64,
    /// Allocation attempts waiting to go to etcd together ([`Kv::combined`]).
    queue: std::sync::Mutex<Vec<Queued>>,
    /// Held by the one task sending queued attempts.
    sender: tokio::sync::Mutex<()>,
    health: std::sync::Mutex<health::Health>,
    /// When the master keys were last read again after lost races.
    refreshed: std::sync::Mutex<Option<std::time::Instant>>,
}

/// Most attempts in one transaction (etcd's `--max-txn-ops` is 128 by default).
const MAX_BATCH: usize = 64;

/// An allocation attempt in the queue: its label set key, number, transaction, and
/// where its answer goes (an error of its own, or `None`: the batch failed, send alone).
struct Queued {
    lkey: String,
    id: u32,
    txn: Txn,
    tx: tokio::sync::oneshot::Sender<Result<etcd_client::TxnResponse, Option<KvError>>>,
}

/// A master key: its identity, label set key form and revision.
#[derive(Clone, Debug)]
struct Master {
    id: u32,
    labels: String,
    mod_revision: i64,
}

/// The widest choice of free numbers a node picks a new identity from after lost races.
const MAX_SPREAD: u32 = 1024;

/// What this node knows of the master keys, from its own transactions and their answers
/// and from the watcher. A hint for what to try: every allocation is checked by etcd.
struct MasterCache {
    /// Filled once from the store (the first allocation, or the watcher's list).
    loaded: bool,
    by_id: BTreeMap<u32, String>,
    by_labels: BTreeMap<String, u32>,
    /// Numbers this node's allocations in flight are trying.
    pending: BTreeSet<u32>,
    /// How many of the lowest free numbers a new label set picks from: 1 (the lowest)
    /// while this node wins its races, four times more on each lost one, a sixteenth
    /// less on each won one.
    /// Nodes allocating at once then spread over different numbers instead of all trying
    /// the lowest free one and all but one trying again.
    spread: u32,
}

impl Default for MasterCache {
    fn default() -> Self {
        MasterCache {
            loaded: false,
            by_id: BTreeMap::new(),
            by_labels: BTreeMap::new(),
            pending: BTreeSet::new(),
            spread: 1,
        }
    }
}

impl MasterCache {
    fn set(&mut self, id: u32, labels: Option<String>) {
        if let Some(old) = self.by_id.remove(&id)
            && self.by_labels.get(&old) == Some(&id)
        {
            self.by_labels.remove(&old);
        }
        if let Some(labels) = labels {
            self.by_labels.insert(labels.clone(), id);
            self.by_id.insert(id, labels);
        }
    }

    fn is_free(&self, id: u32) -> bool {
        (FIRST_CLUSTER..LOCAL_SCOPE).contains(&id) && !self.by_id.contains_key(&id) && !self.pending.contains(&id)
    }

    /// A free number for a new label set: the lowest, or one of the lowest [`Self::spread`].
    fn pick(&self, random: u64) -> Result<u32, KvError> {
        let k = u32::try_from(random % u64::from(self.spread.max(1))).unwrap_or(0);
        self.nth_free(k).or_else(|| self.nth_free(0)).ok_or(KvError::Exhausted)
    }

    /// The `k`-th free number (0: the lowest), walking the gaps between used ones.
    fn nth_free(&self, mut k: u32) -> Option<u32> {
        let mut used: Vec<u32> = self.by_id.keys().chain(self.pending.iter()).copied().collect();
        used.sort_unstable();
        let mut n = FIRST_CLUSTER;
        for u in used.into_iter().filter(|u| (FIRST_CLUSTER..LOCAL_SCOPE).contains(u)) {
            if u < n {
                continue;
            }
            let gap = u - n;
            if k < gap {
                return Some(n + k);
            }
            k -= gap;
            n = u + 1;
        }
        n.checked_add(k).filter(|id| *id < LOCAL_SCOPE)
    }

    /// Narrows slowly: a node that lost races keeps spreading while the others still
    /// allocate.
    fn won(&mut self) {
        self.spread = (self.spread - self.spread / 16).max(1);
        if self.spread < 16 {
            self.spread -= u32::from(self.spread > 1);
        }
    }

    fn lost(&mut self) {
        self.spread = (self.spread * 4).min(MAX_SPREAD);
    }
}

/// One allocation attempt: a single transaction.
#[derive(Clone, Copy, Debug)]
enum Try {
    /// Take the existing number `id` of the label set: its master key names the labels
    /// and every node holding the labels uses `id` (or none does); or the master key is
    /// gone (collected, or the store emptied and being refilled) and the holders use
    /// `id`: then it is put back.
    Take(u32),
    /// A new number: the master key is free and no node holds the labels.
    Fresh(u32),
}

impl Try {
    fn id(self) -> u32 {
        match self {
            Try::Take(id) | Try::Fresh(id) => id,
        }
    }

    fn txn(self, mine: &str, lkey: &str, lease: i64) -> Txn {
        let id = self.id();
        let prefix = value_prefix(lkey);
        let put_mine = || TxnOp::put(mine, id.to_string(), Some(PutOptions::new().with_lease(lease)));
        let put_master = || TxnOp::put(id_key(id), lkey, None);
        let names_labels = || Compare::value(id_key(id), CompareOp::Equal, lkey);
        let master_free = || Compare::create_revision(id_key(id), CompareOp::Equal, 0);
        // Over a range: holds for every key in it. A value compare fails on an empty range,
        // a create-revision compare of 0 holds only on an empty one.
        let holders_use = || Compare::value(prefix.as_str(), CompareOp::Equal, id.to_string()).with_prefix();
        let nobody = || Compare::create_revision(prefix.as_str(), CompareOp::Equal, 0).with_prefix();
        let look = [
            TxnOp::get(id_key(id), None),
            TxnOp::get(prefix.as_str(), Some(GetOptions::new().with_prefix().with_limit(1))),
        ];
        match self {
            Try::Fresh(_) => {
                Txn::new().when([master_free(), nobody()]).and_then([put_master(), put_mine()]).or_else(look)
            }
            Try::Take(_) => {
                let restore =
                    Txn::new().when([master_free(), holders_use()]).and_then([put_master(), put_mine()]).or_else(look);
                let unheld =
                    Txn::new().when([names_labels(), nobody()]).and_then([put_mine()]).or_else([TxnOp::txn(restore)]);
                Txn::new().when([names_labels(), holders_use()]).and_then([put_mine()]).or_else([TxnOp::txn(unheld)])
            }
        }
    }
}

/// What a failed attempt found: the master key of the number tried, and the number of
/// one node holding the labels.
#[derive(Debug)]
struct Seen {
    master: Option<String>,
    holder: Option<u32>,
}

impl Seen {
    /// `None`: the attempt (or one of its nested alternatives) succeeded.
    fn of(resp: &etcd_client::TxnResponse) -> Result<Option<Seen>, KvError> {
        if resp.succeeded() {
            return Ok(None);
        }
        let ops = resp.op_responses();
        match ops.as_slice() {
            [TxnOpResponse::Txn(inner)] => Seen::of(inner),
            [TxnOpResponse::Get(master), TxnOpResponse::Get(holders)] => {
                let master = master.kvs().first().map(|kv| String::from_utf8_lossy(kv.value()).into_owned());
                let holder = match holders.kvs().first() {
                    None => None,
                    Some(kv) => Some(String::from_utf8_lossy(kv.value()).trim().parse().map_err(|_| {
                        KvError::Invalid(format!(
                            "{}: {:?} is not an identity",
                            kv.key_str().unwrap_or("?"),
                            kv.value()
                        ))
                    })?),
                };
                Ok(Some(Seen { master, holder }))
            }
            other => Err(KvError::Invalid(format!("unexpected transaction answer: {} operations", other.len()))),
        }
    }
}

impl Kv {
    /// A client for `endpoints` (`http://host:port`); connects lazily, so an etcd that is
    /// not up yet is no error here.
    pub async fn connect(endpoints: &[String], node: &str, op_timeout: Duration) -> Result<Kv, KvError> {
        let options = ConnectOptions::new()
            .with_connect_timeout(op_timeout)
            .with_timeout(op_timeout)
            .with_keep_alive(Duration::from_secs(2), op_timeout);
        let client = Client::connect(endpoints, Some(options)).await?;
        Ok(Kv {
            client,
            node: node.to_string(),
            lease: AtomicI64::new(0),
            op_timeout,
            own_deletes: std::sync::Mutex::default(),
            dirty: std::sync::atomic::AtomicBool::new(false),
            masters_seen: std::sync::Mutex::default(),
            picks: std::sync::atomic::AtomicU64::new(0),
            queue: std::sync::Mutex::default(),
            sender: tokio::sync::Mutex::new(()),
            health: std::sync::Mutex::default(),
            refreshed: std::sync::Mutex::default(),
        })
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// A copy of the client (copies share the connection).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    pub fn lease(&self) -> i64 {
        self.lease.load(Ordering::SeqCst)
    }

    pub fn set_lease(&self, id: i64) {
        self.lease.store(id, Ordering::SeqCst);
    }

    fn own_deletes(&self) -> std::sync::MutexGuard<'_, BTreeSet<String>> {
        self.own_deletes.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The watcher saw `key`, one of this node's keys, deleted: unless this node deleted it
    /// itself, everything is published again (Cilium's "recreated on removal").
    pub fn note_own_key_deleted(&self, key: &str) {
        if !self.own_deletes().remove(key) {
            tracing::warn!(key, "kvstore: a key of this node was removed by someone else; publishing again");
            self.dirty.store(true, Ordering::SeqCst);
        }
    }

    /// Whether a key of this node was removed behind its back since the last call.
    pub fn take_dirty(&self) -> bool {
        self.dirty.swap(false, Ordering::SeqCst)
    }

    /// `fut`, a request of `kind` ("get", "txn", "watch", ...), bounded by the request
    /// timeout; counted in [`Kv::health`].
    pub async fn bounded<T>(
        &self,
        kind: &'static str,
        fut: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, KvError> {
        let r = match tokio::time::timeout(self.op_timeout, fut).await {
            Ok(r) => r.map_err(KvError::from),
            Err(_) => Err(KvError::Timeout(self.op_timeout)),
        };
        match &r {
            Ok(_) => self.health().answered(kind),
            Err(e) => self.health().failed(kind, &e.to_string()),
        }
        r
    }

    /// The connection's counters and latest outcome.
    pub fn health(&self) -> std::sync::MutexGuard<'_, health::Health> {
        self.health.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// How the connection stands, for `GET /v1/status`.
    pub fn status(&self, opts: &KvOptions) -> crate::api::types::KvstoreStatus {
        self.health().status(opts, self.lease())
    }

    /// The `palisade_kvstore_*` metrics.
    pub fn render_metrics(&self, out: &mut String) {
        self.health().render(out, self.lease());
    }

    /// Grants a new lease for this node (not yet the current one).
    pub async fn grant(&self, ttl: Duration) -> Result<i64, KvError> {
        let ttl = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let mut c = self.client();
        Ok(self.bounded("lease-grant", c.lease_grant(ttl, None)).await?.id())
    }

    /// Revokes `lease`, one this node held before its current one: the keys still under it
    /// (what was published then and is not any more) go at once instead of when it
    /// expires. A lease etcd no longer knows is no error.
    pub async fn revoke(&self, lease: i64) -> Result<(), KvError> {
        let mut c = self.client();
        match self.bounded("lease-revoke", c.lease_revoke(lease)).await {
            Err(e) if e.lease_lost() => Ok(()),
            r => r.map(|_| ()),
        }
    }

    /// The current lease; a node starting (or whose lease was just lost) may wait up to the
    /// request timeout for the publisher to get one.
    async fn wait_lease(&self) -> Result<i64, KvError> {
        let start = std::time::Instant::now();
        loop {
            let lease = self.lease();
            if lease != 0 {
                return Ok(lease);
            }
            if start.elapsed() >= self.op_timeout {
                return Err(KvError::NoLease);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// This node's key for a label set.
    fn own_value_key(&self, labels_key: &str) -> String {
        format!("{}{}", value_prefix(labels_key), self.node)
    }

    /// Every master key.
    async fn masters(&self) -> Result<Vec<Master>, KvError> {
        let mut c = self.client();
        let resp = self.bounded("get", c.get(IDS, Some(GetOptions::new().with_prefix()))).await?;
        let mut out = Vec::new();
        for kv in resp.kvs() {
            let Some(id) = kv.key_str().ok().and_then(|k| k.strip_prefix(IDS)).and_then(|s| s.parse().ok()) else {
                continue;
            };
            out.push(Master {
                id,
                labels: String::from_utf8_lossy(kv.value()).into_owned(),
                mod_revision: kv.mod_revision(),
            });
        }
        Ok(out)
    }

    /// The cluster-wide identity of `labels`, taking this node's reference on it (its
    /// per-node key under the current lease). A label set some node already holds keeps
    /// its number; a new one gets `wanted` if that number is free (a restarted agent, or
    /// one republishing into an emptied store, keeps its numbers), else an unused master
    /// key of the same labels, else the lowest free number (one of the lowest few after a
    /// lost race, see [`MasterCache::pick`]).
    ///
    /// Each attempt is one transaction; what this node knows of the master keys
    /// ([`MasterCache`]) only chooses what to try, and a failed attempt answers what the
    /// store holds, so a stale cache costs an attempt, never a wrong number.
    pub async fn allocate(&self, labels: &LabelSet, wanted: Option<u32>) -> Result<u32, KvError> {
        let lkey = label_key(labels);
        if parse_label_key(&lkey).is_none() {
            return Err(KvError::Invalid(format!("an empty label set has no cluster identity ({labels})")));
        }
        self.load_masters().await?;
        let mut next: Option<Try> = None;
        let mut lost_here = 0;
        for _ in 0..MAX_ATTEMPTS {
            let lease = self.wait_lease().await?;
            let mut reserved = None;
            let attempt = if let Some(t) = next.take() {
                t
            } else {
                let mut cache = self.cache();
                let known = cache.by_labels.get(&lkey).copied();
                let attempt = match wanted {
                    Some(w) if known != Some(w) && cache.is_free(w) => Try::Fresh(w),
                    _ => match known {
                        Some(id) => Try::Take(id),
                        None => Try::Fresh(cache.pick(self.random())?),
                    },
                };
                if let Try::Fresh(id) = attempt {
                    // Not picked by this node's other allocations while in flight.
                    cache.pending.insert(id);
                    reserved = Some(id);
                }
                attempt
            };
            let id = attempt.id();
            let resp = self.combined(&lkey, id, attempt.txn(&self.own_value_key(&lkey), &lkey, lease)).await;
            if let Some(id) = reserved {
                self.cache().pending.remove(&id);
            }
            let resp = resp?;
            let Some(seen) = Seen::of(&resp)? else {
                self.health().counters.allocations += 1;
                self.cache().set(id, Some(lkey));
                if matches!(attempt, Try::Fresh(_)) {
                    self.cache().won();
                }
                return Ok(id);
            };
            self.health().counters.lost_races += 1;
            if matches!(attempt, Try::Fresh(_)) && seen.holder.is_none() {
                self.cache().lost();
                lost_here += 1;
                if lost_here % REFRESH_AFTER == 0 {
                    // The cache misses many numbers others took (its watcher lags, or there
                    // is none): read them all rather than learn them one lost race each.
                    self.refresh_masters().await?;
                }
            }
            self.cache().set(id, seen.master.clone());
            match seen.holder {
                // Held by others under the number tried, yet its master key names other
                // labels: the store contradicts itself (restored from an old copy?).
                Some(h) if h == id && seen.master.as_ref().is_some_and(|m| *m != lkey) => {
                    return Err(KvError::Conflict { id, labels: labels.to_string() });
                }
                Some(h) => next = Some(Try::Take(h)),
                None => {}
            }
        }
        Err(KvError::Contention(labels.to_string()))
    }

    /// Sends `txn` (an attempt on `lkey` with number `id`), together with the attempts of
    /// this node's other allocations waiting at the same moment: one etcd transaction
    /// whose operations are their transactions, each decided on its own. Whoever holds the
    /// sender lock sends everything queued; the others' attempts wait in the queue for it,
    /// so a burst of new label sets costs a few round trips instead of one each. Attempts
    /// that would write the same key (same labels or number) go in different batches.
    async fn combined(&self, lkey: &str, id: u32, txn: Txn) -> Result<etcd_client::TxnResponse, KvError> {
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        self.queued().push(Queued { lkey: lkey.to_string(), id, txn: txn.clone(), tx });
        let answer = loop {
            tokio::select! {
                biased;
                answer = &mut rx => break answer,
                _sending = self.sender.lock() => while self.send_batch().await {},
            }
        };
        match answer {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(Some(e))) => Err(e),
            Ok(Err(None)) | Err(_) => self.bounded("txn", self.client().txn(txn)).await,
        }
    }

    fn queued(&self) -> std::sync::MutexGuard<'_, Vec<Queued>> {
        self.queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Sends one batch of the queue; answers whether there was one.
    async fn send_batch(&self) -> bool {
        let batch: Vec<Queued> = {
            let mut queue = self.queued();
            let (mut batch, mut keep) = (Vec::new(), Vec::new());
            for q in queue.drain(..) {
                let clash = batch.iter().any(|b: &Queued| b.lkey == q.lkey || b.id == q.id);
                if clash || batch.len() >= MAX_BATCH { keep.push(q) } else { batch.push(q) }
            }
            *queue = keep;
            batch
        };
        if batch.is_empty() {
            return false;
        }
        if let [one] = batch.as_slice() {
            let resp = self.bounded("txn", self.client().txn(one.txn.clone())).await.map_err(Some);
            if let Some(q) = batch.into_iter().next() {
                let _ = q.tx.send(resp);
            }
            return true;
        }
        let all = Txn::new().and_then(batch.iter().map(|q| TxnOp::txn(q.txn.clone())).collect::<Vec<_>>());
        match self.bounded("txn", self.client().txn(all)).await {
            Ok(resp) => {
                let mut answers = resp.op_responses().into_iter();
                for q in batch {
                    let answer = match answers.next() {
                        Some(TxnOpResponse::Txn(r)) => Ok(r),
                        _ => Err(None),
                    };
                    let _ = q.tx.send(answer);
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, attempts = batch.len(), "kvstore: a batch of allocations failed; each is sent alone");
                for q in batch {
                    let _ = q.tx.send(Err(None));
                }
            }
        }
        true
    }

    /// Reads every master key into the cache, once.
    async fn load_masters(&self) -> Result<(), KvError> {
        if self.cache().loaded {
            return Ok(());
        }
        let all = self.masters().await?;
        self.replace_masters(all.into_iter().map(|m| (m.id, m.labels)));
        Ok(())
    }

    /// Reads every master key into the cache again, at most every [`REFRESH_EVERY`] (the
    /// node's concurrent allocations share one read).
    async fn refresh_masters(&self) -> Result<(), KvError> {
        {
            let mut last = self.refreshed.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if last.is_some_and(|t| t.elapsed() < REFRESH_EVERY) {
                return Ok(());
            }
            *last = Some(std::time::Instant::now());
        }
        let all = self.masters().await?;
        self.replace_masters(all.into_iter().map(|m| (m.id, m.labels)));
        Ok(())
    }

    /// The watcher listed the store: these are all its master keys.
    pub fn replace_masters(&self, all: impl IntoIterator<Item = (u32, String)>) {
        let mut cache = self.cache();
        let (spread, pending) = (cache.spread, std::mem::take(&mut cache.pending));
        *cache = MasterCache { loaded: true, spread, pending, ..MasterCache::default() };
        for (id, labels) in all {
            cache.set(id, Some(labels));
        }
    }

    /// The watcher saw master key `id` put (`Some(labels key)`) or deleted.
    pub fn note_master(&self, id: u32, labels: Option<String>) {
        self.cache().set(id, labels);
    }

    fn random(&self) -> u64 {
        use std::hash::BuildHasher;
        std::collections::hash_map::RandomState::new().hash_one(self.picks.fetch_add(1, Ordering::Relaxed))
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, MasterCache> {
        self.masters_seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Drops this node's reference on `labels` (its per-node key).
    pub async fn release(&self, labels_key: &str) -> Result<(), KvError> {
        self.delete(self.own_value_key(labels_key)).await
    }

    /// Deletes the master keys that no node held at the last pass (`candidates`, with the
    /// revision seen then) and still holds none, unchanged; then records this pass's
    /// unheld ones. Answers how many were deleted. Each deletion is one transaction that
    /// checks both, so an allocation racing with it either keeps the key or starts anew.
    pub async fn collect_unused(&self, candidates: &mut BTreeMap<u32, i64>) -> Result<usize, KvError> {
        self.collect_unused_checking(candidates, std::iter::empty()).await
    }

    /// [`Kv::collect_unused`], and a check that this node's per-node keys of `own` (label
    /// set key forms it published) are all there: one someone else removed means
    /// everything is published again (the watcher does not read per-node keys).
    pub async fn collect_unused_checking(
        &self,
        candidates: &mut BTreeMap<u32, i64>,
        own: impl Iterator<Item = &str>,
    ) -> Result<usize, KvError> {
        let masters = self.masters().await?;
        let mut c = self.client();
        // Every per-node key, names only: the label sets some node holds.
        let values = self.bounded("get", c.get(VALUES, Some(GetOptions::new().with_prefix().with_keys_only()))).await?;
        let listed: BTreeSet<&str> = values.kvs().iter().filter_map(|kv| kv.key_str().ok()).collect();
        for lkey in own {
            let key = self.own_value_key(lkey);
            if !listed.contains(key.as_str()) {
                tracing::warn!(
                    key,
                    "kvstore: a per-node key of this node was removed by someone else; publishing again"
                );
                self.dirty.store(true, Ordering::SeqCst);
            }
        }
        let held: BTreeSet<&str> = values
            .kvs()
            .iter()
            .filter_map(|kv| kv.key_str().ok()?.strip_prefix(VALUES)?.rsplit_once('/').map(|(labels, _)| labels))
            .collect();
        let mut now = BTreeMap::new();
        let mut deleted = 0;
        for m in masters {
            if held.contains(m.labels.as_str()) {
                continue;
            }
            if candidates.get(&m.id) == Some(&m.mod_revision) {
                let txn = Txn::new()
                    .when([
                        Compare::mod_revision(id_key(m.id), CompareOp::Equal, m.mod_revision),
                        Compare::create_revision(value_prefix(&m.labels), CompareOp::Equal, 0).with_prefix(),
                    ])
                    .and_then([TxnOp::delete(id_key(m.id), None)]);
                if self.bounded("txn", c.txn(txn)).await?.succeeded() {
                    tracing::info!(identity = m.id, labels = %m.labels, "kvstore: unused identity collected");
                    self.cache().set(m.id, None);
                    deleted += 1;
                    continue;
                }
            }
            now.insert(m.id, m.mod_revision);
        }
        *candidates = now;
        Ok(deleted)
    }

    /// Puts `key` = `value` under the current lease.
    pub async fn put_leased(&self, key: String, value: String) -> Result<(), KvError> {
        let lease = self.lease();
        if lease == 0 {
            return Err(KvError::NoLease);
        }
        let mut c = self.client();
        self.bounded("put", c.put(key, value, Some(PutOptions::new().with_lease(lease)))).await?;
        Ok(())
    }

    /// Deletes one of this node's keys.
    pub async fn delete(&self, key: String) -> Result<(), KvError> {
        self.own_deletes().insert(key.clone());
        let mut c = self.client();
        let resp = self.bounded("delete", c.delete(key.clone(), None)).await;
        if !matches!(&resp, Ok(r) if r.deleted() > 0) {
            // No delete event will come for it.
            self.own_deletes().remove(&key);
        }
        resp?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(used: &[u32]) -> MasterCache {
        let mut c = MasterCache::default();
        for id in used {
            c.set(*id, Some(format!("labels-{id};")));
        }
        c
    }

    #[test]
    fn free_numbers_are_counted_over_the_gaps() {
        let mut c = cache(&[256, 257, 259, 300]);
        assert_eq!(c.nth_free(0), Some(258));
        assert_eq!(c.nth_free(1), Some(260));
        assert_eq!(c.nth_free(40), Some(299));
        assert_eq!(c.nth_free(41), Some(301));
        c.pending.insert(258);
        assert_eq!(c.nth_free(0), Some(260), "a number in flight is not free");
        assert!(!c.is_free(258) && !c.is_free(256) && c.is_free(260) && !c.is_free(FIRST_CLUSTER - 1));
        assert_eq!(c.nth_free(LOCAL_SCOPE), None);
        // The spread decides among how many of the lowest free numbers a pick falls.
        assert_eq!(c.pick(12345).unwrap(), 260);
        c.spread = 4;
        let picks: BTreeSet<u32> = (0..64).map(|r| c.pick(r).unwrap()).collect();
        assert_eq!(picks, BTreeSet::from([260, 261, 262, 263]));
    }

    #[test]
    fn the_spread_widens_on_lost_races_and_narrows_back() {
        let mut c = MasterCache::default();
        for _ in 0..10 {
            c.lost();
        }
        assert_eq!(c.spread, MAX_SPREAD);
        let mut wins = 0;
        while c.spread > 1 {
            c.won();
            wins += 1;
        }
        assert!((30..200).contains(&wins), "{wins} wins to narrow back");
    }

    #[test]
    fn a_number_given_other_labels_forgets_the_old_ones() {
        let mut c = cache(&[256]);
        c.set(256, Some("other;".into()));
        assert_eq!(c.by_labels.get("labels-256;"), None);
        assert_eq!(c.by_labels.get("other;"), Some(&256));
        c.set(256, None);
        assert!(c.by_id.is_empty() && c.by_labels.is_empty());
    }
}
