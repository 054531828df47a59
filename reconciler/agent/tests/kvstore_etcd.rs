//! The kvstore mode against a real etcd (Debian's etcd-server; each test starts its own on
//! 127.0.0.1 with free ports and a temp data dir, stopped by PID when the test ends): the
//! cluster-wide allocator (one number for one label set whoever asks, concurrently; numbers
//! kept across an emptied store; unused ones collected; fail closed while etcd is away),
//! and two agents over the fake maps sharing identities and pod addresses through it.
//! No root needed.
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::GetOptions;
use palisade_agent::actors::endpoints::{UpsertEndpoint, UpsertNamespace};
use palisade_agent::actors::identity::{ListIdentities, UseKvstore};
use palisade_agent::actors::map_writer::WriterTimers;
use palisade_agent::actors::{Agent, AgentConfig};
use palisade_agent::api::types::{EndpointSpec, NamespaceSpec};
use palisade_agent::datapath::{FakeMaps, FakePrograms};
use palisade_agent::kvstore::layout::{IDS, VALUES, label_key};
use palisade_agent::kvstore::{Kv, KvError, KvOptions};
use palisade_policy::labels::{Label, LabelSet};
use palisade_privileged::etcd::{self, Etcd};

const OP_TIMEOUT: Duration = Duration::from_secs(2);

/// A started etcd, or `None` (the skip reported) where it is not installed.
fn etcd_or_skip() -> Option<Etcd> {
    if !etcd::installed() {
        palisade_privileged::skip("needs etcd (Debian's etcd-server; ci/setup.sh installs it)");
        return None;
    }
    Some(Etcd::start_local().expect("etcd starts"))
}

fn set(app: &str) -> LabelSet {
    [Label::k8s("app", app), Label::k8s("io.kubernetes.pod.namespace", "default")].into_iter().collect()
}

/// A node's connection with a lease of `ttl` (not kept alive: tests that need it alive
/// are shorter than the TTL).
async fn node(etcd: &Etcd, name: &str, ttl: Duration) -> Kv {
    let kv = Kv::connect(&[etcd.url()], name, OP_TIMEOUT).await.unwrap();
    let lease = kv.grant(ttl).await.unwrap();
    kv.set_lease(lease);
    kv
}

/// Master keys: id -> labels key form.
async fn masters(kv: &Kv) -> BTreeMap<u32, String> {
    let mut c = kv.client();
    let resp = c.get(IDS, Some(GetOptions::new().with_prefix())).await.unwrap();
    resp.kvs()
        .iter()
        .map(|kv| {
            let id = kv.key_str().unwrap().strip_prefix(IDS).unwrap().parse().unwrap();
            (id, kv.value_str().unwrap().to_string())
        })
        .collect()
}

/// Per-node keys of one label set: node -> id.
async fn holders(kv: &Kv, labels: &LabelSet) -> BTreeMap<String, u32> {
    let prefix = format!("{VALUES}{}/", label_key(labels));
    let mut c = kv.client();
    let resp = c.get(prefix.clone(), Some(GetOptions::new().with_prefix())).await.unwrap();
    resp.kvs()
        .iter()
        .map(|kv| {
            (kv.key_str().unwrap().strip_prefix(&prefix).unwrap().to_string(), kv.value_str().unwrap().parse().unwrap())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_label_set_asked_by_every_node_at_once_gets_one_identity() {
    let Some(etcd) = etcd_or_skip() else { return };
    let mut nodes = Vec::new();
    for i in 0..6 {
        nodes.push(Arc::new(node(&etcd, &format!("node-{i}"), Duration::from_mins(1)).await));
    }
    let apps = ["web", "db", "cache", "queue"];
    // Every node asks for every label set, all at the same moment.
    let mut tasks = Vec::new();
    for kv in &nodes {
        for app in apps {
            let kv = kv.clone();
            tasks.push(tokio::spawn(async move { (kv.node().to_string(), app, kv.allocate(&set(app), None).await) }));
        }
    }
    let mut by_app: BTreeMap<&str, BTreeSet<u32>> = BTreeMap::new();
    for t in tasks {
        let (node, app, id) = t.await.unwrap();
        let id = id.unwrap_or_else(|e| panic!("{node} {app}: {e}"));
        by_app.entry(app).or_default().insert(id);
    }
    for (app, ids) in &by_app {
        assert_eq!(ids.len(), 1, "{app} got several identities: {ids:?}");
    }
    let ids: BTreeSet<u32> = by_app.values().flatten().copied().collect();
    assert_eq!(ids.len(), apps.len(), "distinct label sets share a number: {by_app:?}");
    // Nodes that lost a race pick among the lowest few free numbers (at most 1024), not
    // all the lowest one again.
    assert!(ids.iter().all(|id| (256..256 + 1024 + 4).contains(id)), "among the lowest free numbers: {ids:?}");
    let m = masters(&nodes[0]).await;
    assert_eq!(m.len(), apps.len(), "one master key per label set: {m:?}");
    for app in apps {
        let id = *by_app[app].first().unwrap();
        assert_eq!(m[&id], label_key(&set(app)));
        let h = holders(&nodes[0], &set(app)).await;
        assert_eq!(h.len(), nodes.len(), "every node holds {app}: {h:?}");
        assert!(h.values().all(|v| *v == id), "{h:?}");
    }
    // Each node proposing another free number for the same new label set (as restarted
    // agents with different saved numbers would): still one number.
    let mut tasks = Vec::new();
    for (i, kv) in nodes.iter().enumerate() {
        let kv = kv.clone();
        let wanted = 500 + u32::try_from(i).unwrap();
        tasks.push(tokio::spawn(async move { kv.allocate(&set("contended"), Some(wanted)).await }));
    }
    let mut got = BTreeSet::new();
    for t in tasks {
        got.insert(t.await.unwrap().unwrap());
    }
    assert_eq!(got.len(), 1, "one label set, several numbers: {got:?}");
    let m = masters(&nodes[0]).await;
    assert_eq!(m.values().filter(|l| **l == label_key(&set("contended"))).count(), 1, "{m:?}");
}

/// A node whose cache misses many numbers others took (no watcher here, as in the bench's
/// allocators; in an agent, a lagging one) reads the master keys again after a few lost
/// races instead of learning them one lost race each (which ran past the attempts limit
/// with ten nodes allocating at once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_keeps_losing_races_reads_the_numbers_taken_again() {
    let Some(etcd) = etcd_or_skip() else { return };
    let a = node(&etcd, "node-a", Duration::from_mins(1)).await;
    let b = node(&etcd, "node-b", Duration::from_mins(1)).await;
    // node-b's cache is loaded now, with one number taken.
    let first = b.allocate(&set("b-first"), None).await.unwrap();
    for i in 0..300 {
        a.allocate(&set(&format!("a-{i}")), None).await.unwrap();
    }
    let before = b.status(&options("node-b")).lost_races;
    let id = b.allocate(&set("b-second"), None).await.unwrap();
    let lost = b.status(&options("node-b")).lost_races - before;
    assert_eq!(masters(&b).await.get(&id).map(|l| l.contains("app=b-second")), Some(true));
    assert!(id > first + 300, "a number the 300 others left free: {id}");
    // Four lost races (the lowest numbers in its stale view, then the lowest 4, 16, 64),
    // then the read; learning one number per race it would lose again with the lowest 256.
    assert_eq!(lost, 4, "lost races before it found a free number");
}

fn options(node: &str) -> KvOptions {
    KvOptions {
        endpoints: vec![],
        cluster: "default".into(),
        node: node.into(),
        node_addresses: vec![],
        lease_ttl: Duration::from_mins(1),
        poll: Duration::from_secs(1),
        op_timeout: OP_TIMEOUT,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numbers_survive_an_emptied_store_and_unused_ones_are_collected() {
    let Some(mut etcd) = etcd_or_skip() else { return };
    let a = node(&etcd, "node-a", Duration::from_mins(1)).await;
    let b = node(&etcd, "node-b", Duration::from_mins(1)).await;
    let web = a.allocate(&set("web"), None).await.unwrap();
    let db = a.allocate(&set("db"), None).await.unwrap();
    assert_eq!((web, db), (256, 257));
    assert_eq!(b.allocate(&set("db"), None).await.unwrap(), db, "a held label set keeps its number");
    // A number asked for (a restarted agent's) is given when free.
    assert_eq!(b.allocate(&set("api"), Some(400)).await.unwrap(), 400);
    assert_eq!(a.allocate(&set("api"), Some(401)).await.unwrap(), 400, "held already: the holders' number wins");

    // etcd wiped: the agents publish again with the numbers they hold (db first, by b,
    // so the order of republishing does not decide the numbers).
    etcd.wipe(true).unwrap();
    for kv in [&a, &b] {
        let lease = kv.grant(Duration::from_mins(1)).await.unwrap();
        kv.set_lease(lease);
    }
    assert!(masters(&a).await.is_empty());
    assert_eq!(b.allocate(&set("db"), Some(db)).await.unwrap(), db);
    assert_eq!(a.allocate(&set("web"), Some(web)).await.unwrap(), web);
    assert_eq!(a.allocate(&set("db"), Some(db)).await.unwrap(), db);
    assert_eq!(masters(&a).await, BTreeMap::from([(web, label_key(&set("web"))), (db, label_key(&set("db")))]));

    // Released by every holder: collected on the second pass, not the first.
    a.release(&label_key(&set("web"))).await.unwrap();
    let mut candidates = BTreeMap::new();
    assert_eq!(a.collect_unused(&mut candidates).await.unwrap(), 0);
    assert_eq!(candidates.keys().copied().collect::<Vec<_>>(), vec![web]);
    // Taken again in between: not collected.
    b.allocate(&set("web"), None).await.unwrap();
    assert_eq!(a.collect_unused(&mut candidates).await.unwrap(), 0);
    b.release(&label_key(&set("web"))).await.unwrap();
    assert_eq!(a.collect_unused(&mut candidates).await.unwrap(), 0);
    assert_eq!(a.collect_unused(&mut candidates).await.unwrap(), 1);
    assert_eq!(masters(&a).await.keys().copied().collect::<Vec<_>>(), vec![db]);
    // The freed number is the lowest free one again.
    assert_eq!(a.allocate(&set("new"), None).await.unwrap(), web);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nodes_references_go_with_its_lease_and_nothing_new_is_given_while_etcd_is_away() {
    let Some(mut etcd) = etcd_or_skip() else { return };
    let a = node(&etcd, "node-a", Duration::from_secs(2)).await;
    let id = a.allocate(&set("web"), None).await.unwrap();
    assert_eq!(holders(&a, &set("web")).await.len(), 1);
    // Not kept alive: etcd drops the per-node key with the lease (the master stays until
    // collected).
    let start = Instant::now();
    while !holders(&a, &set("web")).await.is_empty() {
        assert!(start.elapsed() < Duration::from_secs(10), "the lease never expired");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let e = a.allocate(&set("web"), None).await.unwrap_err();
    assert!(e.lease_lost(), "{e}");

    let lease = a.grant(Duration::from_mins(1)).await.unwrap();
    a.set_lease(lease);
    assert_eq!(a.allocate(&set("web"), None).await.unwrap(), id, "the unused master key is reused");
    etcd.stop();
    let start = Instant::now();
    let e = a.allocate(&set("other"), None).await.unwrap_err();
    assert!(start.elapsed() < OP_TIMEOUT * 3, "bounded: {:?}", start.elapsed());
    assert!(matches!(e, KvError::Timeout(_) | KvError::Etcd(_)), "{e}");
    assert!(e.to_string().starts_with("kvstore: "), "{e}");
}

// --- two agents over the fake maps, one etcd ---

const TIMERS: WriterTimers = WriterTimers {
    drift_interval: Duration::ZERO,
    retry_interval: Duration::from_millis(200),
    attach_retry_interval: Duration::from_millis(100),
};

struct FakeNode {
    _tmp: tempfile::TempDir,
    agent: Agent,
    maps: FakeMaps,
    /// The lease keeper and publisher (aborted: the node is gone, its lease expires).
    publisher: tokio::task::JoinHandle<()>,
}

async fn fake_node(etcd: &Etcd, name: &str, address: Ipv4Addr) -> FakeNode {
    let tmp = tempfile::tempdir().unwrap();
    let (policies, state) = (tmp.path().join("policies"), tmp.path().join("state"));
    std::fs::create_dir_all(&policies).unwrap();
    let config = AgentConfig::new(PathBuf::from("/nonexistent/bpffs"), policies, state);
    let maps = FakeMaps::new();
    let agent = Agent::start_over(config, Box::new(maps.clone()), Box::new(FakePrograms::default()), TIMERS).unwrap();
    let opts = KvOptions {
        endpoints: vec![etcd.url()],
        cluster: "default".into(),
        node: name.into(),
        node_addresses: vec![IpAddr::V4(address)],
        lease_ttl: Duration::from_secs(3),
        poll: Duration::from_millis(50),
        op_timeout: OP_TIMEOUT,
    };
    let kv = Arc::new(Kv::connect(&opts.endpoints, name, OP_TIMEOUT).await.unwrap());
    agent.identities.send(UseKvstore(kv.clone())).await.unwrap();
    let publisher = actix_rt::spawn(palisade_agent::kvstore::sync::run(agent.clone(), kv, opts));
    agent
        .endpoints
        .send(UpsertNamespace { name: "default".into(), spec: NamespaceSpec::default() })
        .await
        .unwrap()
        .unwrap();
    FakeNode { _tmp: tmp, agent, maps, publisher }
}

/// Registers `default/<name>` (app=<app>) on the loopback interface; answers its identity.
async fn register(n: &FakeNode, name: &str, app: &str, ip: Ipv4Addr) -> Result<u32, String> {
    let spec = EndpointSpec {
        labels: BTreeMap::from([("app".to_string(), app.to_string())]),
        service_account: "default".into(),
        ipv4: Some(ip),
        ipv6: None,
        interface: "lo".into(),
        ports: Vec::new(),
    };
    let r =
        n.agent.endpoints.send(UpsertEndpoint { namespace: "default".into(), name: name.into(), spec }).await.unwrap();
    r.map(|(ep, _)| ep.identity).map_err(|e| e.to_string())
}

/// The identity of the label set whose `app` is `app` on this agent.
async fn identity_of(n: &FakeNode, app: &str) -> Option<u32> {
    let ids = n.agent.identities.send(ListIdentities).await.unwrap();
    ids.into_iter().find(|i| i.labels.iter().any(|l| l == &format!("k8s:app={app}"))).map(|i| i.id)
}

/// The label set whose `app` is `app` on this agent.
async fn set_of(n: &FakeNode, app: &str) -> LabelSet {
    let ids = n.agent.identities.send(ListIdentities).await.unwrap();
    let info = ids.into_iter().find(|i| i.labels.iter().any(|l| l == &format!("k8s:app={app}"))).unwrap();
    info.labels.iter().map(|l| Label::parse(l)).collect()
}

/// The node's kvstore status as `GET /v1/status` reports it.
fn kv_status(n: &FakeNode) -> palisade_agent::api::types::KvstoreStatus {
    let (kv, opts) = n.agent.kvstore.get().expect("kvstore mode runs");
    kv.status(opts)
}

/// The node's `palisade_kvstore_*` metrics.
fn metrics_of(n: &FakeNode) -> String {
    let mut out = String::new();
    n.agent.kvstore.get().expect("kvstore mode runs").0.render_metrics(&mut out);
    out
}

/// Waits (bounded) until `cond` holds.
async fn eventually(what: &str, mut cond: impl AsyncFnMut() -> bool) {
    let start = Instant::now();
    while !cond().await {
        assert!(start.elapsed() < Duration::from_secs(20), "not within 20 s: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// [`register`] for a node's first pod: the registration may come before the publisher has
/// its lease, so it is retried (every 100 ms, at most 10 s).
async fn register_first(node: &FakeNode, name: &str, app: &str, ip: Ipv4Addr) -> u32 {
    let start = Instant::now();
    loop {
        match register(node, name, app, ip).await {
            Ok(id) => return id,
            Err(e) => assert!(start.elapsed() < Duration::from_secs(10), "registering {name}: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[actix::test]
async fn two_agents_share_identities_and_pod_addresses_through_etcd() {
    let Some(mut etcd) = etcd_or_skip() else { return };
    let a = fake_node(&etcd, "node-a", Ipv4Addr::new(10, 200, 0, 1)).await;
    let b = fake_node(&etcd, "node-b", Ipv4Addr::new(10, 201, 0, 1)).await;
    let web_ip = Ipv4Addr::new(10, 200, 1, 10);
    let web = register_first(&a, "web", "web", web_ip).await;
    let db = register(&b, "db", "db", Ipv4Addr::new(10, 201, 1, 10)).await.unwrap();
    assert_ne!(web, db);
    // The same label set on the other node gets the same number.
    assert_eq!(register(&b, "web2", "web", Ipv4Addr::new(10, 201, 1, 11)).await.unwrap(), web);
    eventually("node-b knows node-a's web with its number", async || identity_of(&b, "web").await == Some(web)).await;
    eventually("node-a knows node-b's db with its number", async || identity_of(&a, "db").await == Some(db)).await;
    // node-a's ipcache (the kernel maps, here the fakes) maps node-b's pod to db, and
    // node-b's address to remote-node.
    let has = |maps: &FakeMaps, ip: [u8; 4]| {
        maps.state().ipcache_host_v4.contains_key(&palisade_common::Ipv4Prefix { addr: ip })
    };
    eventually("node-a's maps hold node-b's db", async || has(&a.maps, [10, 201, 1, 10])).await;
    // What `palisade status` says of the connection: up, with what each node published
    // and learnt.
    eventually("node-a's kvstore status counts what it published and learnt", async || {
        let k = kv_status(&a);
        k.state == "ok" && k.published_addresses == 1 && k.remote_addresses == 2 && k.remote_nodes == 1
    })
    .await;
    let k = kv_status(&a);
    assert!(k.lease_id != 0 && k.lease_grants == 1 && k.allocations >= 1 && k.last_ok_unix_ms > 0, "{k:?}");
    assert_eq!((k.published_identities, k.failing_since_unix_ms, k.conflicted_identities), (1, 0, 0), "{k:?}");

    // A key of node-a removed behind its back (an operator, a bad script): node-a puts it
    // back.
    let probe = Kv::connect(&[etcd.url()], "probe", OP_TIMEOUT).await.unwrap();
    let web_key = format!("cilium/state/ip/v1/default/{web_ip}");
    let mut c = probe.client();
    assert_eq!(c.delete(web_key.clone(), None).await.unwrap().deleted(), 1);
    eventually("node-a publishes its removed key again", async || {
        let mut c = probe.client();
        c.get(web_key.clone(), None).await.is_ok_and(|r| r.count() == 1)
    })
    .await;
    // Its per-node key of web too (no watcher reads per-node keys: the collection pass,
    // every 2 x TTL, finds it missing).
    let value_key = format!(
        "cilium/state/identities/v1/value/{}/node-a",
        palisade_agent::kvstore::layout::label_key(&set_of(&a, "web").await)
    );
    assert_eq!(c.delete(value_key.clone(), None).await.unwrap().deleted(), 1);
    eventually("node-a writes its removed per-node key again", async || {
        let mut c = probe.client();
        c.get(value_key.clone(), None).await.is_ok_and(|r| r.count() == 1)
    })
    .await;

    // etcd wiped: both agents publish again, the numbers stay.
    etcd.wipe(true).unwrap();
    let probe = Kv::connect(&[etcd.url()], "probe", OP_TIMEOUT).await.unwrap();
    eventually("both identities are back in etcd with their numbers", async || {
        let m = masters(&probe).await;
        m.get(&web).is_some_and(|l| l.contains("app=web")) && m.get(&db).is_some_and(|l| l.contains("app=db"))
    })
    .await;
    eventually("both nodes' pod addresses are back", async || {
        let mut c = probe.client();
        let r = c.get("cilium/state/ip/v1/default/", Some(GetOptions::new().with_prefix().with_count_only())).await;
        r.is_ok_and(|r| r.count() == 3)
    })
    .await;
    assert!(has(&a.maps, [10, 201, 1, 10]), "what node-a knew stayed enforced across the wipe");

    // Fail closed: with etcd away, a new label set cannot be registered.
    etcd.stop();
    let e = register(&a, "new", "new", Ipv4Addr::new(10, 200, 1, 12)).await.unwrap_err();
    assert!(e.contains("kvstore") && e.contains("nothing new is allowed"), "{e}");
    let k = kv_status(&a);
    assert_eq!(k.state, "failing", "{k:?}");
    assert!(k.failing_since_unix_ms > 0 && k.failed_operations > 0, "{k:?}");
    assert!(k.last_error.as_deref().is_some_and(|e| e.contains("kvstore")), "{k:?}");
    assert!(metrics_of(&a).contains("palisade_kvstore_up{backend=\"etcd\"} 0\n"));
    // A label set held already still registers (its number is known here), but cannot be
    // published: node-b does not know web3 (world there) until etcd is back.
    assert_eq!(register(&a, "web3", "web", Ipv4Addr::new(10, 200, 1, 13)).await.unwrap(), web);
    // And a pod removed on node-b meanwhile stays known on node-a until etcd is back.
    b.agent
        .endpoints
        .send(palisade_agent::actors::endpoints::DeleteEndpoint { namespace: "default".into(), name: "web2".into() })
        .await
        .unwrap()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(has(&a.maps, [10, 201, 1, 10]), "known remote pods stay while etcd is away");
    assert!(has(&a.maps, [10, 201, 1, 11]), "nothing is forgotten while etcd is away");
    assert!(!has(&b.maps, [10, 200, 1, 13]), "web3 is not known on node-b before etcd is back");
    etcd.restart(true).unwrap();
    let back = Instant::now();
    eventually("node-b learns web3 and node-a forgets web2 once etcd is back", async || {
        has(&b.maps, [10, 200, 1, 13]) && !has(&a.maps, [10, 201, 1, 11])
    })
    .await;
    eprintln!("converged {:?} after etcd came back", back.elapsed());
    eventually("node-b's kvstore status is ok again", async || kv_status(&b).state == "ok").await;
    assert!(metrics_of(&b).contains("palisade_kvstore_up{backend=\"etcd\"} 1\n"));
    assert!(metrics_of(&b).contains("palisade_kvstore_store_lists_total"));
    assert!(has(&a.maps, [10, 201, 1, 10]));

    // node-b gone for good (nothing keeps its lease alive): once the lease expires node-a
    // forgets node-b's pods and node-b's address is no longer remote-node.
    let ident = |maps: &FakeMaps, ip: [u8; 4]| {
        maps.state().ipcache_host_v4.get(&palisade_common::Ipv4Prefix { addr: ip }).map(|v| v.identity)
    };
    assert_eq!(ident(&a.maps, [10, 201, 0, 1]), Some(palisade_common::identity::REMOTE_NODE));
    b.publisher.abort();
    eventually("node-a forgets node-b after its lease expired", async || {
        !has(&a.maps, [10, 201, 1, 10]) && ident(&a.maps, [10, 201, 0, 1]).is_none()
    })
    .await;
    assert!(has(&a.maps, [10, 200, 1, 10]), "node-a's own pod stays");
}

/// Bad kvstore flags: the agent says what is wrong and exits before touching anything
/// (the bpffs directory given is never created).
#[test]
fn bad_kvstore_flags_are_refused_with_what_to_do() {
    let tmp = tempfile::tempdir().unwrap();
    let bpffs = tmp.path().join("bpffs");
    let run = |extra: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_palisade-agent"))
            .arg("--bpffs")
            .arg(&bpffs)
            .arg("--state-dir")
            .arg(tmp.path().join("state"))
            .args(["--metrics-address", "off"])
            .args(extra)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{extra:?}: {out:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let e = run(&["--kvstore", "etcd"]);
    assert!(e.contains("--kvstore etcd needs --kvstore-endpoints"), "{e}");
    let e = run(&["--kvstore", "etcd", "--kvstore-endpoints", "127.0.0.1:2379"]);
    assert!(e.contains("is not an http:// or https:// URL"), "{e}");
    let e = run(&["--kvstore", "etcd", "--kvstore-endpoints", "http://127.0.0.1:2379"]);
    assert!(e.contains("--node-name"), "{e}");
    let e = run(&["--kvstore", "etcd", "--kvstore-endpoints", "http://127.0.0.1:2379", "--node-name", "a"]);
    assert!(e.contains("--node-address"), "{e}");
    let both = [
        "--kvstore",
        "etcd",
        "--kvstore-endpoints",
        "http://127.0.0.1:2379",
        "--node-name",
        "a",
        "--node-address",
        "10.0.0.1",
        "--remote-endpoints",
        "/nonexistent",
    ];
    let e = run(&both);
    assert!(e.contains("choose one"), "{e}");
    let e = run(&[&both[..8], &["--kvstore-lease-ttl", "0"]].concat());
    assert!(e.contains("--kvstore-lease-ttl 0: must be 1..=3600"), "{e}");
    assert!(!bpffs.exists(), "a refused start created {}", bpffs.display());
}

/// After a wipe someone else's labels took this node's number first: the node does not
/// publish that label set's pods under it (other nodes would give them the wrong labels),
/// and publishes them once the number is free again.
#[actix::test]
async fn a_number_taken_by_other_labels_is_not_published_until_it_is_free() {
    let Some(mut etcd) = etcd_or_skip() else { return };
    let a = fake_node(&etcd, "node-a", Ipv4Addr::new(10, 200, 0, 1)).await;
    let web_ip = Ipv4Addr::new(10, 200, 1, 10);
    let web = register_first(&a, "web", "web", web_ip).await;
    etcd.wipe(true).unwrap();
    // At once, before node-a notices its lease is gone (it keeps it alive every second).
    let probe = Kv::connect(&[etcd.url()], "probe", OP_TIMEOUT).await.unwrap();
    let mut c = probe.client();
    c.put(format!("{IDS}{web}"), "k8s:app=evil;", None).await.unwrap();
    let node_key = "cilium/state/nodes/v1/default/node-a";
    let ip_key = format!("cilium/state/ip/v1/default/{web_ip}");
    let count = async |key: &str| {
        let mut c = probe.client();
        c.get(key, None).await.map_or(-1, |r| r.count())
    };
    eventually("node-a publishes itself again", async || count(node_key).await == 1).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(count(&ip_key).await, 0, "web published under a number etcd gives other labels");
    assert!(holders(&probe, &set_of_web()).await.is_empty(), "node-a holds no reference on another number");
    // The number free again: node-a publishes web with it (after its retry interval).
    c.delete(format!("{IDS}{web}"), None).await.unwrap();
    eventually("web is published once its number is free", async || count(&ip_key).await == 1).await;
    assert_eq!(masters(&probe).await.get(&web).map(|l| l.contains("k8s:app=web;")), Some(true));
}

/// web's label set as a fake node derives it (namespace default, service account default).
fn set_of_web() -> LabelSet {
    LabelSet::for_pod(
        "default",
        &BTreeMap::new(),
        &BTreeMap::from([("app".to_string(), "web".to_string())]),
        "default",
        "default",
    )
}
