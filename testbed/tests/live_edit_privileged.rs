//! A policy edited while the agent runs: the scenario is brought up through the library
//! ([`Session`]), probed, then its policy file is rewritten in the agent's policy directory
//! and the agent, started with periodic re-reads effectively off, must pick the change up
//! through its directory watch alone; enforcement follows with real packets, allow -> deny
//! -> allow. Needs root and the binaries built (`cargo build --bins`).
mod common;

use common::*;
use palisade_testbed::netns;
use palisade_testbed::report::Observed;
use palisade_testbed::scenario::PlanProbe;
use palisade_testbed::session::Session;

/// Runs `p` and returns what it observed, with its detail for messages.
async fn observe(session: &Session, p: &PlanProbe) -> (Observed, String) {
    let r = session.probe(p).await;
    (r.observed, format!("{} -> {} {:?}/{}: {:?}", r.from, r.to, r.port, r.protocol, r.detail))
}

#[test]
fn editing_a_watched_policy_file_changes_enforcement_privileged() {
    palisade_privileged::require_root!();
    // Re-reads every hour: only the agent's directory watch can notice the edits in time.
    let scenario = client_server_scenario("live-edit", &[]);
    let (plan, names, opts) = agent_run(&scenario, "le", &["--policy-rescan-secs", "3600"]);
    let rt = runtime();
    rt.block_on(async {
        let session = Session::up(&plan, &opts, &names).await.expect("the scenario comes up");
        let (port80, port81) = (&plan.probes[0], &plan.probes[1]);
        let policy = &plan.policies[0];
        let original = palisade_policy::yaml::to_string(&policy.manifest).unwrap();
        assert!(session.policy_dir().join(&policy.file_name).is_file());

        let (o, d) = observe(&session, port80).await;
        assert_eq!(o, Observed::Allow, "{d}");
        let (o, d) = observe(&session, port81).await;
        assert_eq!(o, Observed::Deny, "{d}");

        // Allow 81 instead of 80: 80 is now denied, 81 allowed.
        let edited = original.replace("port: \"80\"", "port: \"81\"");
        assert_ne!(edited, original, "the manifest's port is written as expected:\n{original}");
        let before = session.status().await.unwrap().revision;
        let st = session.write_policy_file(&policy.file_name, &edited).await.expect("the agent takes the edit in");
        assert!(st.enforced, "{st:?}");
        assert!(st.revision > before, "{st:?} after revision {before}");
        let (o, d) = observe(&session, port80).await;
        assert_eq!(o, Observed::Deny, "{d}");
        assert!(d.contains("ingress of default/server"), "{d}");
        let (o, d) = observe(&session, port81).await;
        assert_eq!(o, Observed::Allow, "{d}");

        // A deny rule added to the original allow: deny wins.
        let mut manifest = policy.manifest.clone();
        let deny: palisade_policy::yaml::Value = palisade_policy::yaml::from_str(
            "[{fromEndpoints: [{matchLabels: {app: client}}], toPorts: [{ports: [{port: '80', protocol: TCP}]}]}]",
        )
        .unwrap();
        manifest["spec"].as_object_mut().unwrap().insert("ingressDeny".to_owned(), deny);
        let with_deny = palisade_policy::yaml::to_string(&manifest).unwrap();
        let st = session.write_policy_file(&policy.file_name, &with_deny).await.expect("the agent takes the edit in");
        assert!(st.enforced, "{st:?}\n{with_deny}");
        let r = session.probe(port80).await;
        assert_eq!(r.observed, Observed::Deny, "{r:?}");
        assert!(r.detail.as_deref().unwrap_or_default().contains("deny rule"), "{r:?}");

        // And back: the original manifest, the original verdicts.
        let st = session.write_policy_file(&policy.file_name, &original).await.expect("the agent takes the edit in");
        assert!(st.enforced, "{st:?}");
        let (o, d) = observe(&session, port80).await;
        assert_eq!(o, Observed::Allow, "{d}");
        let (o, d) = observe(&session, port81).await;
        assert_eq!(o, Observed::Deny, "{d}");

        session.down().await;
    });
    assert_eq!(netns::list_with_prefix(&names.prefix), Vec::<String>::new());
    assert!(!std::env::temp_dir().join(format!("palisade-testbed-{}", names.tag)).exists());
}
