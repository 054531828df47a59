//! Restart without disruption: the real agent is restarted 12 times (SIGTERM and SIGKILL
//! alternating; four times right after a policy file was rewritten, before the agent could
//! apply it) while a client keeps probing the server: port 80 must always connect, port 81
//! must never. After every restart the agent has restored its endpoints (same ids and
//! identities, nothing registered again), applied the policy file as it is now (port 82
//! follows the file's version), and on a restart without a policy change it wrote nothing
//! to the maps (every apply since it started planned zero operations). Needs root and the binaries built (`cargo build --bins`).
mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use palisade_testbed::agent::StopHow;
use palisade_testbed::netns;
use palisade_testbed::report::Observed;
use palisade_testbed::scenario::{HostRef, IpFamily};
use palisade_testbed::session::Session;

/// Version 2 of the policy: port 82 allowed too, written as a range with a second rule.
const V2_EXTRA: &str =
    "[{fromEndpoints: [{matchLabels: {app: client}}], toPorts: [{ports: [{port: '82', endPort: 82, protocol: TCP}]}]}]";

const RESTARTS: usize = 12;
/// Bounds of the background probing.
const MAX_ROUNDS: usize = 20_000;
const MAX_PROBING: Duration = Duration::from_mins(4);

/// Map operations of every apply since the agent last started ("datapath loaded"), from its log.
fn operations_since_start(log: &Path) -> Vec<u64> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let start = text.rfind("datapath loaded").unwrap_or(0);
    text[start..]
        .lines()
        .filter(|l| l.contains("datapath reconciled"))
        .filter_map(|l| {
            let rest = l.split("operations=").nth(1)?;
            rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
        })
        .collect()
}

#[test]
fn restarts_keep_enforcing_with_zero_wrong_verdicts_privileged() {
    palisade_privileged::require_root!();
    let (plan, names, opts) = agent_run(&client_server_scenario("restart", &[82]), "rs", &[]);
    let rt = runtime();
    rt.block_on(async {
        let mut session = Session::up(&plan, &opts, &names).await.expect("the scenario comes up");
        let policy = &plan.policies[0];
        let v1 = palisade_policy::yaml::to_string(&policy.manifest).unwrap();
        let mut m2 = policy.manifest.clone();
        let extra: palisade_policy::yaml::Value = palisade_policy::yaml::from_str(V2_EXTRA).unwrap();
        m2["spec"]["ingress"].as_array_mut().unwrap().extend(extra.as_array().unwrap().iter().cloned());
        let v2 = palisade_policy::yaml::to_string(&m2).unwrap();
        let port82 = plan.probes[2].clone();
        assert_eq!(session.probe(&port82).await.observed, Observed::Deny);

        let before = session.client().unwrap().endpoints().await.unwrap();
        let key = |e: &palisade_api::types::EndpointStatus| (e.namespace.clone(), e.name.clone(), e.id, e.identity);
        let mut before: Vec<_> = before.iter().map(key).collect();
        before.sort();
        assert_eq!(before.len(), 2);

        let server = session.topology().host(&plan, &HostRef::Pod(1)).unwrap().addr(IpFamily::IPv4).unwrap();
        let client_ns = session.topology().host(&plan, &HostRef::Pod(0)).unwrap().netns.open().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let prober = {
            let stop = stop.clone();
            std::thread::spawn(move || probe_continuously(client_ns, server, [80, 81], stop, MAX_ROUNDS, MAX_PROBING))
        };

        let mut current_v2 = false;
        let mut no_change_ops = Vec::new();
        let mut restart_times = Vec::new();
        let mut change_ops = Vec::new();
        for i in 0..RESTARTS {
            let how = if i % 2 == 0 { StopHow::Term } else { StopHow::Kill };
            let mid_change = i % 3 == 1;
            if mid_change {
                // A new version lands, and the agent dies before it could apply it.
                current_v2 = !current_v2;
                session.dirs().write_policy(&policy.file_name, if current_v2 { &v2 } else { &v1 }).unwrap();
            }
            let t0 = Instant::now();
            let exit = session.restart_agent(how).await.unwrap_or_else(|e| panic!("restart {i} ({how:?}): {e}"));
            let took = t0.elapsed();
            restart_times.push(took);
            eprintln!("restart {i}: {how:?} (exit {exit}), policy change: {mid_change}, {took:?} until applied");
            let ops = operations_since_start(session.agent_log().unwrap());
            if mid_change {
                // Only the policy entries that changed (port 82 added or removed).
                change_ops.push(ops);
            } else {
                no_change_ops.push(ops);
            }
            // Endpoints restored, not registered again: same ids and identities.
            let mut now: Vec<_> = session.client().unwrap().endpoints().await.unwrap().iter().map(key).collect();
            now.sort();
            assert_eq!(now, before, "restart {i}: the endpoints were not restored as they were");
            // The file as it is now is what is enforced.
            let r = session.probe(&port82).await;
            let want = if current_v2 { Observed::Allow } else { Observed::Deny };
            assert_eq!(r.observed, want, "restart {i}: port 82 with policy v{}: {r:?}", if current_v2 { 2 } else { 1 });
        }
        stop.store(true, Ordering::Relaxed);
        let tally = prober.join().expect("the prober ends");
        eprintln!("across {RESTARTS} restarts, {tally}; map operations of restarts without a change: {no_change_ops:?}");
        restart_times.sort();
        eprintln!(
            "map operations of restarts in the middle of a change: {change_ops:?}; stop to first apply of the new agent: median {:?}, max {:?}",
            restart_times[restart_times.len() / 2],
            restart_times[restart_times.len() - 1]
        );
        assert!(tally.wrong.is_empty(), "wrong verdicts: {:#?}", tally.wrong);
        assert!(tally.rounds >= RESTARTS, "too few probe rounds: {tally:?}");
        for (i, ops) in change_ops.iter().enumerate() {
            // v1 and v2 differ by one policy entry: a restarted agent writes at most that.
            assert!(ops.iter().sum::<u64>() <= 1, "restart in a change #{i} wrote more than the difference: {ops:?}");
        }
        for (i, ops) in no_change_ops.iter().enumerate() {
            assert!(!ops.is_empty(), "restart without a change #{i}: no apply logged");
            assert!(
                ops.iter().all(|n| *n == 0),
                "restart without a change #{i} wrote to the maps: {ops:?} (log {:?})",
                session.agent_log()
            );
        }
        session.down().await;
    });
    assert_eq!(netns::list_with_prefix(&names.prefix), Vec::<String>::new());
}
