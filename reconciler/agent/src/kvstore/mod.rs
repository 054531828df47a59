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
//!   address) and its node entry, under its lease, level-based: every poll compares what
//!   the endpoint tracker holds with what was written under the current lease; a lost
//!   lease (expired while etcd was away, or etcd wiped) means a new lease and everything
//!   written again.
//! - **Watching**: every key under `cilium/state/`; other nodes' pod addresses map to the
//!   identity of their number in the ipcache (through the identity cache's remote
//!   endpoints, as file mode and the Kubernetes source do), other nodes' addresses to
//!   remote-node.
//!
//! Fail closed: while etcd cannot be reached, a label set no local pod has yet cannot get a
//! number (its pod's registration fails with an error saying so, and nothing new is
//! enforced as allowed); what was learnt before stays as it was, and an address nobody
//! published is world.
pub mod layout;
pub mod sync;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, GetOptions, PutOptions, Txn, TxnOp};
use palisade_policy::identity::{FIRST_CLUSTER, LOCAL_SCOPE};
use palisade_policy::labels::LabelSet;

use layout::{IDS, id_key, label_key, parse_label_key, value_prefix};

/// Attempts of one allocation before it gives up (each lost race re-reads the store).
pub const MAX_ATTEMPTS: u32 = 64;

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
    /// Time between two comparisons of this node's endpoints with what is published.
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
}

/// A master key: its identity, label set key form and revision.
#[derive(Clone, Debug)]
struct Master {
    id: u32,
    labels: String,
    mod_revision: i64,
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

    /// Whether `key` under `cilium/state/identities/v1/value/` is this node's.
    pub fn is_own_value_key(&self, key: &str) -> bool {
        key.starts_with(layout::VALUES) && key.rsplit_once('/').is_some_and(|(_, node)| node == self.node)
    }

    /// `fut`, bounded by the request timeout.
    pub async fn bounded<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, KvError> {
        match tokio::time::timeout(self.op_timeout, fut).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(KvError::Timeout(self.op_timeout)),
        }
    }

    /// Grants a new lease for this node (not yet the current one).
    pub async fn grant(&self, ttl: Duration) -> Result<i64, KvError> {
        let ttl = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let mut c = self.client();
        Ok(self.bounded(c.lease_grant(ttl, None)).await?.id())
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
        let resp = self.bounded(c.get(IDS, Some(GetOptions::new().with_prefix()))).await?;
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
    /// one republishing into an emptied store, keeps its numbers), else the lowest free one.
    pub async fn allocate(&self, labels: &LabelSet, wanted: Option<u32>) -> Result<u32, KvError> {
        let lkey = label_key(labels);
        if parse_label_key(&lkey).is_none() {
            return Err(KvError::Invalid(format!("an empty label set has no cluster identity ({labels})")));
        }
        let prefix = value_prefix(&lkey);
        let mine = self.own_value_key(&lkey);
        for _ in 0..MAX_ATTEMPTS {
            let lease = self.wait_lease().await?;
            let put_mine =
                |id: u32| TxnOp::put(mine.clone(), id.to_string(), Some(PutOptions::new().with_lease(lease)));
            let mut c = self.client();
            let holders = self.bounded(c.get(prefix.clone(), Some(GetOptions::new().with_prefix()))).await?;
            if let Some(kv) = holders.kvs().first() {
                // Held already: take that number, with its master key as it should be.
                let id: u32 = String::from_utf8_lossy(kv.value()).trim().parse().map_err(|_| {
                    KvError::Invalid(format!("{}: {:?} is not an identity", kv.key_str().unwrap_or("?"), kv.value()))
                })?;
                let txn = Txn::new()
                    .when([Compare::value(id_key(id), CompareOp::Equal, lkey.clone())])
                    .and_then([put_mine(id)]);
                if self.bounded(c.txn(txn)).await?.succeeded() {
                    return Ok(id);
                }
                // The master key is gone (collected, or the store was emptied and is being
                // refilled): put it back with the number the holders use.
                let txn = Txn::new()
                    .when([Compare::create_revision(id_key(id), CompareOp::Equal, 0)])
                    .and_then([TxnOp::put(id_key(id), lkey.clone(), None), put_mine(id)]);
                if self.bounded(c.txn(txn)).await?.succeeded() {
                    return Ok(id);
                }
                let c2 = self.masters().await?;
                if c2.iter().any(|m| m.id == id && m.labels != lkey) {
                    return Err(KvError::Conflict { id, labels: labels.to_string() });
                }
                continue;
            }
            // Nobody holds it: the number asked for if it is free (the node keeps its
            // numbers), else an unused master key of the same labels (not yet collected),
            // else a new one.
            let masters = self.masters().await?;
            let stale = masters.iter().find(|m| m.labels == lkey).map(|m| m.id);
            let used: BTreeSet<u32> = masters.iter().map(|m| m.id).collect();
            let (id, fresh) = match (wanted, stale) {
                (Some(w), _) if (FIRST_CLUSTER..LOCAL_SCOPE).contains(&w) && !used.contains(&w) => (w, true),
                (_, Some(id)) => (id, false),
                _ => ((FIRST_CLUSTER..LOCAL_SCOPE).find(|n| !used.contains(n)).ok_or(KvError::Exhausted)?, true),
            };
            let master_cmp = if fresh {
                Compare::create_revision(id_key(id), CompareOp::Equal, 0)
            } else {
                Compare::value(id_key(id), CompareOp::Equal, lkey.clone())
            };
            // No key under the prefix: compared over the range, the condition holds for
            // every key in it, and for none.
            let nobody = Compare::create_revision(prefix.clone(), CompareOp::Equal, 0).with_prefix();
            let mut ops = vec![put_mine(id)];
            if fresh {
                ops.insert(0, TxnOp::put(id_key(id), lkey.clone(), None));
            }
            let txn = Txn::new().when([master_cmp, nobody]).and_then(ops);
            if self.bounded(c.txn(txn)).await?.succeeded() {
                return Ok(id);
            }
        }
        Err(KvError::Contention(labels.to_string()))
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
        let masters = self.masters().await?;
        let mut c = self.client();
        let mut now = BTreeMap::new();
        let mut deleted = 0;
        for m in masters {
            let prefix = value_prefix(&m.labels);
            let held =
                self.bounded(c.get(prefix.clone(), Some(GetOptions::new().with_prefix().with_count_only()))).await?;
            if held.count() > 0 {
                continue;
            }
            if candidates.get(&m.id) == Some(&m.mod_revision) {
                let txn = Txn::new()
                    .when([
                        Compare::mod_revision(id_key(m.id), CompareOp::Equal, m.mod_revision),
                        Compare::create_revision(prefix, CompareOp::Equal, 0).with_prefix(),
                    ])
                    .and_then([TxnOp::delete(id_key(m.id), None)]);
                if self.bounded(c.txn(txn)).await?.succeeded() {
                    tracing::info!(identity = m.id, labels = %m.labels, "kvstore: unused identity collected");
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
        self.bounded(c.put(key, value, Some(PutOptions::new().with_lease(lease)))).await?;
        Ok(())
    }

    /// Deletes one of this node's keys.
    pub async fn delete(&self, key: String) -> Result<(), KvError> {
        self.own_deletes().insert(key.clone());
        let mut c = self.client();
        let resp = self.bounded(c.delete(key.clone(), None)).await;
        if !matches!(&resp, Ok(r) if r.deleted() > 0) {
            // No delete event will come for it.
            self.own_deletes().remove(&key);
        }
        resp?;
        Ok(())
    }
}
