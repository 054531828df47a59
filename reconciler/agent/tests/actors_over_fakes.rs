//! The actors as they run in the agent, over the fake maps and program attachments (no
//! root, no kernel): the sources-synced gate, burst coalescing in the map writer, a
//! panicking actor restarted and resynced, a failed apply retried, an endpoint realized
//! once its programs attach. The kernel side of the same paths is covered by the
//! `*_privileged` tests and the testbed.
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use palisade_agent::actors::endpoints::{DeleteEndpoint, UpsertEndpoint, UpsertNamespace};
use palisade_agent::actors::map_writer::{ApplyDesired, GetRealized, MapWriter, WaitRealized, WriterTimers};
use palisade_agent::actors::{Agent, AgentConfig, supervise};
use palisade_agent::api::types::{EndpointSpec, NamespaceSpec};
use palisade_agent::datapath::fake::FakeOp;
use palisade_agent::datapath::{FakeMaps, FakePrograms, WritableMap};
use palisade_agent::endpoint::LocalEndpoint;
use palisade_common::endpoint_flags;

/// Fast timers, so retries happen within a test; no drift check.
const TIMERS: WriterTimers = WriterTimers {
    drift_interval: Duration::ZERO,
    retry_interval: Duration::from_millis(200),
    attach_retry_interval: Duration::from_millis(100),
};

/// Waits for revisions that should come; a bound, not a sleep.
const REALIZED_IN: Duration = Duration::from_secs(10);

const POLICY: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: backend-from-docs, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: backend}}
  ingress:
    - fromCIDR: [192.0.2.0/24]
      toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
"#;

/// A policy directory holding [`POLICY`] and an empty state directory, removed on drop.
struct Dirs {
    _tmp: tempfile::TempDir,
    policies: PathBuf,
    state: PathBuf,
}

impl Dirs {
    fn new() -> Dirs {
        let tmp = tempfile::tempdir().unwrap();
        let (policies, state) = (tmp.path().join("policies"), tmp.path().join("state"));
        std::fs::create_dir_all(&policies).unwrap();
        std::fs::write(policies.join("backend.yaml"), POLICY).unwrap();
        Dirs { _tmp: tmp, policies, state }
    }

    fn config(&self, external_sources: bool) -> AgentConfig {
        let mut c = AgentConfig::new(PathBuf::from("/nonexistent/bpffs"), self.policies.clone(), self.state.clone());
        c.external_sources = external_sources;
        c
    }
}

fn start(dirs: &Dirs, external_sources: bool) -> (Agent, FakeMaps, FakePrograms) {
    let (maps, programs) = (FakeMaps::new(), FakePrograms::default());
    let agent =
        Agent::start_over(dirs.config(external_sources), Box::new(maps.clone()), Box::new(programs.clone()), TIMERS)
            .expect("the agent starts over the fakes");
    (agent, maps, programs)
}

/// Registers `default/backend` (app=backend, 10.0.0.2) on the loopback interface (the
/// endpoint tracker checks that the interface exists); answers the revision.
async fn register_backend(agent: &Agent) -> u64 {
    agent
        .endpoints
        .send(UpsertNamespace { name: "default".into(), spec: NamespaceSpec::default() })
        .await
        .unwrap()
        .unwrap();
    let spec = EndpointSpec {
        labels: BTreeMap::from([("app".to_string(), "backend".to_string())]),
        service_account: "default".into(),
        ipv4: Some(Ipv4Addr::new(10, 0, 0, 2)),
        ipv6: None,
        interface: "lo".into(),
        ports: Vec::new(),
    };
    let (_, rev) = agent
        .endpoints
        .send(UpsertEndpoint { namespace: "default".into(), name: "backend".into(), spec })
        .await
        .unwrap()
        .unwrap();
    rev
}

async fn realized(writer: &Addr<MapWriter>, revision: u64, timeout: Duration) -> Option<u64> {
    writer.send(WaitRealized { revision, timeout }).await.unwrap()
}

/// What the backend's policy puts in the maps: its endpoint record enforcing ingress, its
/// entries, the CIDR in the trie and its own address.
fn assert_backend_enforced(maps: &FakeMaps) {
    let s = maps.state();
    let lo = palisade_agent::datapath::ifindex("lo").unwrap();
    assert_eq!(s.endpoints[&lo].flags & endpoint_flags::INGRESS_ENFORCED, endpoint_flags::INGRESS_ENFORCED, "{s:?}");
    assert!(!s.policy.is_empty() && !s.policy_lengths.is_empty(), "{s:?}");
    assert_eq!(s.ipcache_v4.keys().map(|(len, p)| (*len, p.addr)).collect::<Vec<_>>(), vec![(24, [192, 0, 2, 0])]);
    assert!(s.ipcache_host_v4.contains_key(&palisade_common::Ipv4Prefix { addr: [10, 0, 0, 2] }), "{s:?}");
}

#[actix::test]
async fn nothing_is_applied_before_the_sources_are_synced() {
    let dirs = Dirs::new();
    let (agent, maps, programs) = start(&dirs, true);
    let rev = register_backend(&agent).await;
    // The Kubernetes source (here: nobody) has not listed yet: the gate stays closed.
    assert_eq!(realized(&agent.map_writer, rev, Duration::from_millis(300)).await, None);
    assert!(maps.writes().is_empty(), "written before the sources were synced: {:?}", maps.writes());
    assert!(programs.attached().is_empty());

    agent.external.mark_listed();
    let synced = agent.resync_local().await.unwrap();
    assert!(synced > rev);
    assert!(realized(&agent.map_writer, synced, REALIZED_IN).await.is_some_and(|r| r >= synced));
    assert_backend_enforced(&maps);
    assert_eq!(programs.attached().into_iter().collect::<Vec<_>>(), vec!["lo".to_string()]);
}

#[actix::test]
async fn a_panicking_resolver_is_restarted_and_resynced_without_touching_the_maps() {
    let dirs = Dirs::new();
    let (agent, maps, _programs) = start(&dirs, false);
    let rev = register_backend(&agent).await;
    assert!(realized(&agent.map_writer, rev, REALIZED_IN).await.is_some());
    assert_backend_enforced(&maps);
    let (before, writes) = (maps.state(), maps.writes().len());

    // The handler panics: the reply is lost, the supervisor restarts the resolver (which
    // forgets every input) and the resync makes every source hand its state in again.
    assert!(agent.resolver.send(supervise::InjectPanic).await.is_err());
    let deadline = Instant::now() + REALIZED_IN;
    let resync = loop {
        if let Some((_, rev)) = supervise::resyncs().get("resolver") {
            break *rev;
        }
        assert!(Instant::now() < deadline, "no resync after the resolver restarted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(supervise::restarts().get("resolver"), Some(&1));
    assert!(realized(&agent.map_writer, resync, REALIZED_IN).await.is_some());
    // The restarted resolver never handed on a partial view: the maps were not touched.
    assert_eq!(maps.writes().len(), writes, "{:?}", &maps.writes()[writes..]);
    assert_eq!(maps.state(), before);

    // And it works again: the endpoint's removal reaches the maps.
    let rev = agent
        .endpoints
        .send(DeleteEndpoint { namespace: "default".into(), name: "backend".into() })
        .await
        .unwrap()
        .unwrap();
    assert!(realized(&agent.map_writer, rev, REALIZED_IN).await.is_some());
    assert!(maps.state().endpoints.is_empty());
}

/// The desired state of revision `revision`: no endpoints, `hosts` in the ipcache.
fn hosts_only(revision: u64, hosts: &[u8]) -> ApplyDesired {
    let ipcache = hosts.iter().map(|h| ((IpAddr::V4(Ipv4Addr::new(10, 0, 1, *h)), 32), 300 + u32::from(*h))).collect();
    ApplyDesired {
        revision,
        desired: Arc::default(),
        endpoints: Arc::default(),
        ipcache: Arc::new(ipcache),
        policies: Arc::default(),
        remote_names: Arc::default(),
    }
}

fn map_writer(maps: &FakeMaps, programs: &FakePrograms) -> Addr<MapWriter> {
    MapWriter::over(Box::new(maps.clone()), Box::new(programs.clone()), Arc::default(), TIMERS).unwrap().start()
}

#[actix::test]
async fn a_burst_of_desired_states_is_applied_once_at_its_latest() {
    let maps = FakeMaps::new();
    let writer = map_writer(&maps, &FakePrograms::default());
    for rev in 1..=50u8 {
        writer.do_send(hosts_only(u64::from(rev), &[rev]));
    }
    assert_eq!(realized(&writer, 50, REALIZED_IN).await, Some(50));
    // Only the latest state was written: one entry, one plan.
    let writes = maps.writes();
    assert_eq!(writes.len(), 1, "{writes:?}");
    assert_eq!(maps.generation(), 1);
    let s = maps.state();
    assert_eq!(s.ipcache_host_v4.values().map(|v| v.identity).collect::<Vec<_>>(), vec![350]);
}

#[actix::test]
async fn a_failed_apply_is_reported_and_retried() {
    let maps = FakeMaps::new();
    let writer = map_writer(&maps, &FakePrograms::default());
    // The second of three host entries fails, once.
    maps.fail(Some(WritableMap::IpcacheHostV4), FakeOp::Update, 1, libc::EIO);
    writer.send(hosts_only(1, &[1, 2, 3])).await.unwrap();
    let status = writer.send(GetRealized).await.unwrap();
    assert_eq!((status.revision, status.counters.apply_failures), (0, 1));
    assert!(status.warnings.iter().any(|w| w.contains("IPCACHE_HOST_V4")), "{:?}", status.warnings);
    assert_eq!(maps.state().ipcache_host_v4.len(), 1, "written up to the failure");

    // The retry timer applies it again, from what the maps hold.
    assert_eq!(realized(&writer, 1, REALIZED_IN).await, Some(1));
    let status = writer.send(GetRealized).await.unwrap();
    assert!(status.warnings.is_empty(), "{:?}", status.warnings);
    assert_eq!(status.counters.apply_failures, 1);
    assert_eq!(maps.state().ipcache_host_v4.len(), 3);
    assert_eq!(maps.writes().len(), 3, "the entry written before the failure is not written again");
}

#[actix::test]
async fn an_endpoint_is_realized_once_its_programs_attach() {
    let (maps, programs) = (FakeMaps::new(), FakePrograms::default());
    let writer = map_writer(&maps, &programs);
    programs.fail_attach("lxc1", true);
    let endpoint = LocalEndpoint {
        id: 1,
        namespace: "default".into(),
        name: "pod-1".into(),
        labels: palisade_policy::labels::LabelSet::default(),
        identity: 1001,
        ipv4: Some(Ipv4Addr::new(10, 0, 0, 1)),
        ipv6: None,
        interface: "lxc1".into(),
        ifindex: 41,
        named_ports: Vec::new(),
    };
    writer.do_send(ApplyDesired { endpoints: Arc::new(vec![endpoint]), ..hosts_only(1, &[]) });
    assert_eq!(realized(&writer, 1, Duration::from_millis(300)).await, None);
    assert!(maps.state().endpoints.is_empty(), "an endpoint without programs is not loaded");
    programs.fail_attach("lxc1", false);
    // The attach retry timer (the drift check is off) attaches and loads it.
    assert_eq!(realized(&writer, 1, REALIZED_IN).await, Some(1));
    assert!(maps.state().endpoints.contains_key(&41));
}
