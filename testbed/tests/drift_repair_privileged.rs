//! Drift repair with the real agent and real packets: the scenario comes up (the agent
//! compares its maps with the kernel every second), then, behind the agent's back, through
//! the pinned maps, policy entries are deleted and altered, ipcache entries deleted and
//! altered, and the server's ENDPOINTS entry removed. Each time the kernel maps are checked
//! to really differ, the agent's repair counter must rise within a bounded wait, the maps
//! must hold again what the agent wrote, and probes must give the policy's verdicts again.
//! Needs root and the binaries built (`cargo build --bins`).
mod common;

use std::time::{Duration, Instant};

use common::*;
use palisade_agent::actors::map_writer::read_state;
use palisade_agent::datapath::MapSet;
use palisade_agent::mapstate::MapState;
use palisade_api::Client;
use palisade_api::types::EndpointStatus;
use palisade_common::{IpcacheValue, Ipv4Prefix, PolicyValue, direction, policy_flags};
use palisade_testbed::netns;
use palisade_testbed::report::Observed;
use palisade_testbed::scenario::PlanProbe;
use palisade_testbed::session::Session;

/// The longest the test waits for a repair (the agent checks every second).
const REPAIR_WAIT: Duration = Duration::from_secs(15);

async fn assert_policy_verdicts(session: &Session, probes: &[PlanProbe], when: &str) {
    let v = observe(session, probes).await;
    assert_eq!(v[0].0, Observed::Allow, "{when}: {}", v[0].1);
    assert_eq!(v[1].0, Observed::Deny, "{when}: {}", v[1].1);
}

async fn drift_repairs(client: &Client) -> u64 {
    client.status().await.expect("status").datapath_counters.drift_repairs
}

/// Waits (bounded) until the agent has made at least `ops` more repair operations than
/// `before` and the maps hold `want` again.
async fn wait_repaired(client: &Client, maps: &MapSet, before: u64, ops: u64, want: &MapState, what: &str) {
    let deadline = Instant::now() + REPAIR_WAIT;
    loop {
        let now = drift_repairs(client).await;
        if now >= before + ops && read_state(maps).unwrap() == *want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not repaired within {REPAIR_WAIT:?} (repairs {before} -> {now}, wanted +{ops})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn find<'a>(eps: &'a [EndpointStatus], name: &str) -> &'a EndpointStatus {
    eps.iter().find(|e| e.name == name).unwrap_or_else(|| panic!("endpoint {name} in {eps:?}"))
}

#[test]
fn drift_behind_the_agents_back_is_repaired_privileged() {
    palisade_privileged::require_root!();
    let scenario = client_server_scenario("drift-repair", &[]);
    let (plan, names, opts) = agent_run(&scenario, "dr", &["--repair-interval-secs", "1"]);
    let rt = runtime();
    rt.block_on(async {
        let session = Session::up(&plan, &opts, &names).await.expect("the scenario comes up");
        let client = Client::new(&session.dirs().socket);
        let probes = plan.probes.clone();
        assert_policy_verdicts(&session, &probes, "at start").await;

        let mut maps = MapSet::open_pinned(&session.dirs().bpffs).expect("the agent's pinned maps open");
        let written = read_state(&maps).unwrap();
        let eps = client.endpoints().await.unwrap();
        let (server, cl) = (find(&eps, "server"), find(&eps, "client"));
        let server_id = server.id;
        // The server's ingress entry for the client (TCP/80).
        let (&(len, key), &value) = written
            .policy
            .iter()
            .find(|((_, k), _)| {
                k.endpoint_id() == server_id && k.direction == direction::INGRESS && k.identity() == cl.identity
            })
            .expect("the server's entry for the client is loaded");
        assert!(written.policy.len() >= 2, "{:?}", written.policy);

        // 1. POLICY: the client's entry altered into a deny, every other entry of the
        //    server deleted.
        let before = drift_repairs(&client).await;
        maps.policy.insert(key.at_prefix(len), PolicyValue { flags: policy_flags::DENY, ..value }, 0).unwrap();
        let mut deleted = 0;
        for (l, k) in written.policy.keys() {
            if k.endpoint_id() == server_id && *k != key {
                maps.policy.remove(&k.at_prefix(*l)).unwrap();
                deleted += 1;
            }
        }
        assert!(deleted >= 1);
        assert_ne!(read_state(&maps).unwrap(), written, "the tampering reached the kernel");
        wait_repaired(&client, &maps, before, 1 + deleted, &written, "altered and deleted POLICY entries").await;
        assert_policy_verdicts(&session, &probes, "after the POLICY repair").await;

        // 2. IPCACHE: the client's address deleted, then given another identity.
        let client_ip = Ipv4Prefix { addr: cl.ipv4.expect("the client has an IPv4 address").octets() };
        assert_eq!(written.ipcache_host_v4[&client_ip].identity, cl.identity);
        let before = drift_repairs(&client).await;
        maps.ipcache_host_v4.remove(&client_ip).unwrap();
        assert_ne!(read_state(&maps).unwrap(), written);
        wait_repaired(&client, &maps, before, 1, &written, "deleted IPCACHE entry").await;
        assert_policy_verdicts(&session, &probes, "after the IPCACHE delete repair").await;
        let before = drift_repairs(&client).await;
        maps.ipcache_host_v4.insert(client_ip, IpcacheValue { identity: server.identity, flags: 0 }, 0).unwrap();
        assert_ne!(read_state(&maps).unwrap(), written);
        wait_repaired(&client, &maps, before, 1, &written, "altered IPCACHE entry").await;
        assert_policy_verdicts(&session, &probes, "after the IPCACHE update repair").await;

        // 3. ENDPOINTS: the server's entry removed (the datapath would stop enforcing it:
        //    port 81 would pass).
        let before = drift_repairs(&client).await;
        maps.endpoints.remove(&server.ifindex).unwrap();
        assert_ne!(read_state(&maps).unwrap(), written);
        wait_repaired(&client, &maps, before, 1, &written, "removed ENDPOINTS entry").await;
        assert_policy_verdicts(&session, &probes, "after the ENDPOINTS repair").await;

        let status = client.status().await.unwrap();
        assert!(status.datapath_counters.drift_checks >= 4, "{status:?}");
        assert!(status.map_errors.is_empty(), "{status:?}");
        drop(maps);
        session.down().await;
    });
    assert_eq!(netns::list_with_prefix(&names.prefix), Vec::<String>::new());
}
