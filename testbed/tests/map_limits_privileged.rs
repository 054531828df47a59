//! Map limits with the real agent and real packets: the agent runs with a POLICY map of 4
//! entries. The scenario's policy fits (the server admits the client on TCP/80); a second
//! policy for the server (a port range, many entries) does not: the server's ingress must
//! fail closed (the allowed port is dropped too), the agent's status must name the map, the
//! entries needed and available and the endpoint, and count the overflow; the endpoint
//! reports the direction as failed closed. Deleting the second policy makes room: the
//! server's ingress recovers (TCP/80 allowed again, TCP/81 still denied) and the error goes.
//! Needs root and the binaries built (`cargo build --bins`).
mod common;

use std::time::Duration;

use common::*;
use palisade_api::Client;
use palisade_api::types::EndpointStatus;
use palisade_testbed::netns;
use palisade_testbed::report::Observed;
use palisade_testbed::session::Session;

/// A port range 1000-1999: a dozen POLICY entries, more than the map holds.
const BIG_POLICY: &str = include_str!("scenarios/map-limits-big-policy.yaml");

const WAIT: Duration = Duration::from_secs(20);

async fn server(client: &Client) -> EndpointStatus {
    client.endpoints().await.unwrap().into_iter().find(|e| e.name == "server").expect("the server endpoint")
}

#[test]
fn overflowing_a_map_fails_closed_and_recovers_privileged() {
    palisade_privileged::require_root!();
    let scenario = client_server_scenario("map-limits", &[]);
    let (plan, names, opts) = agent_run(&scenario, "ml", &["--map-size", "POLICY=4"]);
    let rt = runtime();
    rt.block_on(async {
        let session = Session::up(&plan, &opts, &names).await.expect("the scenario comes up");
        let client = Client::new(&session.dirs().socket);
        let probes = plan.probes.clone();

        // The scenario's policy fits.
        let v = observe(&session, &probes).await;
        assert_eq!(v[0].0, Observed::Allow, "{}", v[0].1);
        assert_eq!(v[1].0, Observed::Deny, "{}", v[1].1);
        let status = client.status().await.unwrap();
        assert!(status.map_errors.is_empty(), "{status:?}");
        assert_eq!(status.datapath_counters.map_overflows, 0, "{status:?}");
        let fitting = server(&client).await.policy_entries;
        assert!((1..=4).contains(&fitting), "{fitting}");

        // The range policy does not fit: the server's ingress fails closed.
        let st = session.write_policy_file("server-range.yaml", BIG_POLICY).await.expect("the agent takes it in");
        assert!(st.enforced, "{st:?}");
        let status = client.status().await.unwrap();
        // Counted once per apply that did not fit (the policy change may take more than one).
        let overflows = status.datapath_counters.map_overflows;
        assert!(overflows >= 1, "{status:?}");
        assert_eq!(status.map_errors.len(), 1, "{status:?}");
        let e = &status.map_errors[0];
        for part in ["map POLICY is full", "holds at most 4", "default/server ingress", "--map-size POLICY="] {
            assert!(e.contains(part), "{part:?} missing in: {e}");
        }
        let ep = server(&client).await;
        assert_eq!(ep.fail_closed, vec!["ingress".to_string()], "{ep:?}");
        assert!(ep.ingress_enforced, "{ep:?}");
        assert_eq!(ep.policy_entries, 0, "{ep:?}");
        let v = observe(&session, &probes).await;
        assert_eq!(v[0].0, Observed::Deny, "failed closed: even the allowed port is dropped: {}", v[0].1);
        assert_eq!(v[1].0, Observed::Deny, "{}", v[1].1);
        // Its flow record says why: not a policy's default deny, the overflow.
        let query = palisade_api::flow::FlowQuery {
            whitelist: vec![palisade_api::flow::FlowFilter {
                verdict: vec!["DROPPED".into()],
                destination_pod: vec!["default/server".into()],
                port: vec![80],
                ..Default::default()
            }],
            last: Some(1),
            ..Default::default()
        };
        let mut flows = client.flows(&query).await.unwrap();
        let Some(palisade_api::flow::FlowsResponse::Flow(f)) = flows.next().await.unwrap() else {
            panic!("no flow record of the dropped TCP/80 probe")
        };
        assert_eq!(f.ingress_denied_by[0].policy_name(), "built-in fail-closed (map overflow)", "{f:?}");
        assert!(f.summary.starts_with("fail closed at the ingress of default/server"), "{f:?}");

        // Room returns: the range policy is deleted.
        std::fs::remove_file(session.policy_dir().join("server-range.yaml")).unwrap();
        let ack = client.rescan_policies().await.unwrap();
        client.wait_revision(ack.revision, WAIT).await.expect("the deletion is realized");
        let status = client.status().await.unwrap();
        assert!(status.map_errors.is_empty(), "{status:?}");
        assert!(status.datapath_counters.map_overflows >= overflows, "{status:?}");
        let ep = server(&client).await;
        assert!(ep.fail_closed.is_empty(), "{ep:?}");
        assert_eq!(ep.policy_entries, fitting, "{ep:?}");
        let v = observe(&session, &probes).await;
        assert_eq!(v[0].0, Observed::Allow, "recovered: {}", v[0].1);
        assert_eq!(v[1].0, Observed::Deny, "{}", v[1].1);

        session.down().await;
    });
    assert_eq!(netns::list_with_prefix(&names.prefix), Vec::<String>::new());
}
