//! What the kvstore connection has done and how it stands: counted at the one place every
//! etcd request passes ([`super::Kv::bounded`]) and where the publisher and the watcher
//! finish a round; reported by `GET /v1/status` (`palisade status`) and as
//! `palisade_kvstore_*` metrics.
use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::api::types::KvstoreStatus;
use crate::metrics::{header, sample};

/// Counters and the latest outcome; behind the connection's mutex.
#[derive(Default)]
pub struct Health {
    /// Requests by kind and outcome (`true`: answered).
    pub ops: BTreeMap<(&'static str, bool), u64>,
    pub last_ok: Option<SystemTime>,
    /// First failure of the current run of failures (`None` once a request is answered).
    pub failing_since: Option<SystemTime>,
    pub last_error: Option<String>,
    /// The counters and what was published and learnt (the other fields unused here).
    pub counters: KvstoreStatus,
}

impl Health {
    pub fn answered(&mut self, kind: &'static str) {
        *self.ops.entry((kind, true)).or_default() += 1;
        self.last_ok = Some(SystemTime::now());
        self.failing_since = None;
    }

    pub fn failed(&mut self, kind: &'static str, error: &str) {
        *self.ops.entry((kind, false)).or_default() += 1;
        self.failing_since.get_or_insert_with(SystemTime::now);
        self.last_error = Some(format!("{kind}: {error}"));
    }

    /// The status as the API reports it.
    pub fn status(&self, opts: &super::KvOptions, lease: i64) -> KvstoreStatus {
        let (ok, failed) = self.ops.iter().fold(
            (0, 0),
            |(ok, failed), ((_, answered), n)| {
                if *answered { (ok + n, failed) } else { (ok, failed + n) }
            },
        );
        let state = match (self.failing_since, self.last_ok, lease) {
            (Some(_), _, _) => "failing",
            (None, None, _) => "connecting",
            (None, Some(_), 0) => "no-lease",
            (None, Some(_), _) => "ok",
        };
        KvstoreStatus {
            backend: "etcd".into(),
            endpoints: opts.endpoints.clone(),
            cluster: opts.cluster.clone(),
            node: opts.node.clone(),
            state: state.into(),
            lease_id: lease,
            lease_ttl_seconds: opts.lease_ttl.as_secs(),
            last_ok_unix_ms: unix_ms(self.last_ok),
            failing_since_unix_ms: unix_ms(self.failing_since),
            last_error: self.last_error.clone(),
            operations: ok,
            failed_operations: failed,
            ..self.counters.clone()
        }
    }

    /// The `palisade_kvstore_*` metrics.
    pub fn render(&self, out: &mut String, lease: i64) {
        let up = u8::from(self.failing_since.is_none() && self.last_ok.is_some() && lease != 0);
        header(out, "palisade_kvstore_up", "gauge", "1 while etcd answers and this node holds a lease");
        sample(out, "palisade_kvstore_up", &[("backend", "etcd")], up);
        header(out, "palisade_kvstore_operations_total", "counter", "etcd requests, by kind and outcome");
        for ((kind, answered), n) in &self.ops {
            let outcome = if *answered { "success" } else { "fail" };
            sample(out, "palisade_kvstore_operations_total", &[("kind", kind), ("outcome", outcome)], n);
        }
        let since = self.failing_since.map_or(0.0, |t| t.elapsed().unwrap_or(Duration::ZERO).as_secs_f64());
        let values: [(&str, &str, &str, &dyn std::fmt::Display); 13] = [
            (
                "lease_grants_total",
                "counter",
                "Leases granted to this node (at start and after each lost lease)",
                &self.counters.lease_grants,
            ),
            (
                "leases_lost_total",
                "counter",
                "Leases etcd no longer knew (expired while it was away, or the store wiped)",
                &self.counters.leases_lost,
            ),
            (
                "store_lists_total",
                "counter",
                "Complete lists of cilium/state/ (at start and after each broken watch)",
                &self.counters.store_lists,
            ),
            ("watch_events_total", "counter", "Watch events received", &self.counters.watch_events),
            ("allocations_total", "counter", "Cluster-wide identity allocations answered", &self.counters.allocations),
            (
                "allocation_lost_races_total",
                "counter",
                "Allocation attempts that found the store changed by another node",
                &self.counters.lost_races,
            ),
            (
                "failing_seconds",
                "gauge",
                "Seconds since the current run of failed requests began (0 while etcd answers)",
                &since,
            ),
            (
                "published_identities",
                "gauge",
                "Label sets this node holds a per-node key for",
                &self.counters.published_identities,
            ),
            ("published_addresses", "gauge", "Pod addresses this node published", &self.counters.published_addresses),
            (
                "conflicted_identities",
                "gauge",
                "Label sets whose number etcd gives other labels (their pods not published)",
                &self.counters.conflicted_identities,
            ),
            (
                "remote_addresses",
                "gauge",
                "Other nodes' pod addresses handed to the ipcache",
                &self.counters.remote_addresses,
            ),
            ("remote_nodes", "gauge", "Other nodes' addresses known as remote-node", &self.counters.remote_nodes),
            ("lease_id", "gauge", "The lease this node's keys live under (0: none)", &lease),
        ];
        for (name, kind, help, v) in values {
            let name = format!("palisade_kvstore_{name}");
            header(out, &name, kind, help);
            sample(out, &name, &[], v);
        }
    }
}

fn unix_ms(t: Option<SystemTime>) -> u64 {
    t.and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> super::super::KvOptions {
        super::super::KvOptions {
            endpoints: vec!["http://127.0.0.1:2379".into()],
            cluster: "default".into(),
            node: "node-a".into(),
            node_addresses: vec![],
            lease_ttl: Duration::from_secs(4),
            poll: Duration::from_secs(1),
            op_timeout: Duration::from_secs(2),
        }
    }

    #[test]
    fn state_follows_the_last_answer_and_the_lease() {
        let mut h = Health::default();
        assert_eq!(h.status(&opts(), 0).state, "connecting");
        h.answered("grant");
        assert_eq!(h.status(&opts(), 0).state, "no-lease");
        assert_eq!(h.status(&opts(), 7).state, "ok");
        h.failed("txn", "etcd did not answer within 2s");
        let s = h.status(&opts(), 7);
        assert_eq!(s.state, "failing");
        assert!(s.failing_since_unix_ms > 0);
        assert_eq!(s.last_error.as_deref(), Some("txn: etcd did not answer within 2s"));
        assert_eq!((s.operations, s.failed_operations), (1, 1));
        h.answered("get");
        let s = h.status(&opts(), 7);
        assert_eq!((s.state.as_str(), s.failing_since_unix_ms), ("ok", 0));
        // The last error stays for the reader, the state says it is past.
        assert!(s.last_error.is_some());
    }

    #[test]
    fn metrics_count_by_kind_and_outcome() {
        let mut h = Health::default();
        h.answered("txn");
        h.answered("txn");
        h.failed("get", "x");
        let mut out = String::new();
        h.render(&mut out, 5);
        assert!(out.contains("palisade_kvstore_operations_total{kind=\"txn\",outcome=\"success\"} 2\n"), "{out}");
        assert!(out.contains("palisade_kvstore_operations_total{kind=\"get\",outcome=\"fail\"} 1\n"), "{out}");
        assert!(out.contains("palisade_kvstore_up{backend=\"etcd\"} 0\n"), "{out}");
        assert!(out.contains("palisade_kvstore_lease_id 5\n"), "{out}");
    }
}
