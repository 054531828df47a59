//! Offline explain (no agent, no root): every probe of every fixture scenario, explained on
//! the state an agent would hold for the scenario (the same pods, addresses, entities and
//! manifests the testbed gives the real agent), must get the verdict the scenario expects.
//! The privileged runs then check the kernel against the live agent's explain, probe by probe.
mod common;

use common::{cluster_fixture, fixture, scenario_files};
use palisade_cli::offline::scenario_state;
use palisade_node::explain::explain;
use palisade_testbed::explain_check;
use palisade_testbed::scenario::{self, Expect};

#[test]
fn offline_explain_agrees_with_every_fixture_expectation() {
    let mut checked = 0;
    let mut wrong = Vec::new();
    for file in scenario_files(&fixture("")) {
        let file = std::path::Path::new(&file);
        let plan = scenario::load(file).unwrap();
        if !plan.agent_args.is_empty() {
            // Agent flags (agent-wide audit, the enforcement switch) are not modelled offline.
            continue;
        }
        let state = scenario_state(&plan, None).unwrap();
        for p in &plan.probes {
            let req = explain_check::request(&plan, p).unwrap();
            let e = explain(&req, &state.inputs()).unwrap_or_else(|e| panic!("{}: {req:?}: {e}", file.display()));
            let expected = match p.expect {
                // An audit hit passes: what is enforced allows it.
                Expect::Allow | Expect::Audit => "allow",
                Expect::Deny => "deny",
            };
            if e.verdict != expected {
                wrong.push(format!(
                    "{} probes[{}] {req:?}: expected {expected}, explain says {e:?}",
                    file.display(),
                    p.index
                ));
            }
            checked += 1;
        }
    }
    assert!(checked > 400, "only {checked} probes checked");
    assert!(wrong.is_empty(), "{} of {checked} disagree:\n{}", wrong.len(), wrong.join("\n"));
}

#[test]
fn offline_explain_names_the_rules_and_world_addresses_get_cidr_identities() {
    let file = fixture("seed-allow-frontend-to-backend.yaml");
    let plan = scenario::load(&file).unwrap();
    let state = scenario_state(&plan, None).unwrap();
    // The testbed's addresses: the first pod gets 10.200.1.10.
    let frontend = state.endpoints().iter().find(|e| e.full_name() == "default/frontend").unwrap();
    assert_eq!(frontend.ipv4, plan.pods[0].ipv4);
    assert_eq!(frontend.ipv4.unwrap().to_string(), "10.200.1.10");
    let req = |from: &str, to: &str, port| palisade_api::types::ExplainRequest {
        from: from.into(),
        to: to.into(),
        port: Some(port),
        protocol: "TCP".into(),
    };
    let e = explain(&req("default/frontend", "default/backend", 8080), &state.inputs()).unwrap();
    assert_eq!(e.verdict, "allow");
    assert_eq!(e.ingress.rules, vec!["CiliumNetworkPolicy default/allow-frontend-to-backend spec.ingress[0]"]);
    let e = explain(&req("default/frontend", "default/backend", 9090), &state.inputs()).unwrap();
    assert_eq!((e.verdict.as_str(), e.ingress.decision.as_str()), ("deny", "default-deny"));
    // By address, as the testbed names world and entity hosts.
    let e = explain(&req("10.200.1.10", "10.200.1.11", 8080), &state.inputs()).unwrap();
    assert_eq!(e.verdict, "allow");
    // The node (entity host) may always reach its pods (allow-localhost).
    let e = explain(&req("10.200.0.1", "default/backend", 9090), &state.inputs()).unwrap();
    assert_eq!((e.verdict.as_str(), e.from_identity), ("allow", 1));

    let world = fixture("world-cidr-except.yaml");
    let plan = scenario::load(&world).unwrap();
    let state = scenario_state(&plan, None).unwrap();
    for p in plan.probes.iter().filter(|p| matches!(p.to, scenario::HostRef::World(_))) {
        let e = explain(&explain_check::request(&plan, p).unwrap(), &state.inputs()).unwrap();
        assert_eq!(e.ingress.decision, "not-local", "{e:?}");
        assert!(e.to_identity == 2 || e.to_identity == 9 || e.to_identity >= 1 << 24, "{e:?}");
    }
}

#[test]
fn a_policy_directory_replaces_the_scenarios_policies() {
    let file = fixture("seed-allow-frontend-to-backend.yaml");
    let plan = scenario::load(&file).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("web.yaml"),
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: web, namespace: default}\nspec:\n  endpointSelector: {matchLabels: {app: backend}}\n  ingress:\n    - fromEndpoints: [{matchLabels: {app: other}}]\n      toPorts: [{ports: [{port: \"9090\", protocol: TCP}]}]\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("broken.yaml"),
        "kind: CiliumNetworkPolicy\nmetadata: {name: b}\nspec: {nonsense: 1}\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("notes.txt"), "not a manifest").unwrap();
    let state = scenario_state(&plan, Some(dir.path())).unwrap();
    let rejected: Vec<_> = state.statuses().iter().filter(|s| !s.enforced).collect();
    assert_eq!(rejected.len(), 1, "{:?}", state.statuses());
    let req = |from: &str, port| palisade_api::types::ExplainRequest {
        from: from.into(),
        to: "default/backend".into(),
        port: Some(port),
        protocol: "TCP".into(),
    };
    assert_eq!(explain(&req("default/frontend", 8080), &state.inputs()).unwrap().verdict, "deny");
    let e = explain(&req("default/other", 9090), &state.inputs()).unwrap();
    assert_eq!(e.verdict, "allow");
    assert!(e.ingress.rules[0].contains("default/web"), "{e:?}");
}

/// Scenarios with several nodes, explained offline as each node's agent would: the egress
/// side on the source's node, the ingress side on the destination's (the other nodes'
/// pods remote, known by their labels), combined as the testbed combines the live agents'.
#[test]
fn offline_explain_of_each_node_agrees_with_the_cluster_fixtures() {
    use palisade_cli::offline::scenario_state_for_node;
    let mut checked = 0;
    let mut wrong = Vec::new();
    for file in scenario_files(&cluster_fixture("")) {
        let file = std::path::Path::new(&file);
        let plan = scenario::load(file).unwrap();
        assert!(plan.is_multi_node(), "{}", file.display());
        let states: Vec<_> = (0..plan.nodes.len()).map(|k| scenario_state_for_node(&plan, k, None).unwrap()).collect();
        for p in &plan.probes {
            let req = explain_check::request(&plan, p).unwrap();
            let (src, dst) = (plan.node_of(&p.from), plan.node_of(&p.to));
            let at = |k: usize| explain(&req, &states[k].inputs()).unwrap();
            let e = if src == dst { at(src) } else { explain_check::combine(at(src), at(dst)) };
            let expected = if p.expect == Expect::Deny { "deny" } else { "allow" };
            if e.verdict != expected {
                wrong.push(format!("{} probes[{}] {req:?}: expected {expected}, got {e:?}", file.display(), p.index));
            }
            checked += 1;
        }
    }
    assert!(checked >= 40, "only {checked} probes checked");
    assert!(wrong.is_empty(), "{} of {checked} disagree:\n{}", wrong.len(), wrong.join("\n"));
}

/// With `ClusterNetworkPolicies` in force, each side lists the tier steps: Pass hops, then
/// the tier, priority and rule that decided (or the NetworkPolicy tier, or nothing).
#[test]
fn offline_explain_shows_the_tier_priority_rule_and_pass_hops() {
    let explain_in = |file: &str, from: &str, to: &str, port: u16| {
        let path = fixture(file);
        let plan = scenario::load(&path).unwrap();
        let state = scenario_state(&plan, None).unwrap();
        let req = palisade_api::types::ExplainRequest {
            from: from.into(),
            to: to.into(),
            port: Some(port),
            protocol: "TCP".into(),
        };
        explain(&req, &state.inputs()).unwrap()
    };
    let e = explain_in("tier-admin-deny-beats-network-policy.yaml", "snakes/snake", "lions/lion", 80);
    assert_eq!(e.verdict, "deny");
    assert_eq!(
        e.ingress.tiers,
        vec!["Admin tier, priority 10: ClusterNetworkPolicy pass-example spec.ingress[0]: Deny (decides)"]
    );
    // Dropped like every peer the NetworkPolicy does not allow: no entry of its own.
    assert_eq!(e.ingress.decision, "default-deny");
    assert_eq!(e.ingress.rules, vec!["ClusterNetworkPolicy pass-example spec.ingress[0] (Admin tier, priority 10)"]);

    let e = explain_in("tier-admin-pass-to-network-policy.yaml", "snakes/snake", "lions/lion", 80);
    assert_eq!(e.verdict, "allow");
    assert_eq!(
        e.ingress.tiers,
        vec![
            "Admin tier, priority 10: ClusterNetworkPolicy pass-example spec.ingress[0]: Pass (on to the next tier)",
            "NetworkPolicy tier: a policy of it selects lions/lion for ingress: its verdict decides",
        ]
    );
    assert_eq!(e.ingress.rules, vec!["NetworkPolicy lions/allow-snakes spec.ingress[0]"]);

    let e = explain_in("tier-admin-pass-to-baseline.yaml", "snakes/snake", "lions/lion", 8080);
    assert_eq!(e.verdict, "deny");
    assert_eq!(e.ingress.tiers.len(), 2, "{:?}", e.ingress.tiers);
    assert!(e.ingress.tiers[0].ends_with("Pass (on to the next tier)"));
    assert_eq!(
        e.ingress.tiers[1],
        "Baseline tier, priority 0: ClusterNetworkPolicy default spec.ingress[0]: Deny (decides: no \
         NetworkPolicy-tier policy selects lions/lion for ingress)"
    );

    let e = explain_in("tier-admin-pass-to-baseline.yaml", "snakes/snake", "lions/lion", 9000);
    assert_eq!(e.verdict, "allow");
    assert!(e.ingress.tiers.last().unwrap().starts_with("no tier decides"), "{:?}", e.ingress.tiers);

    // Without tiered policies nothing changes.
    let e = explain_in("seed-allow-frontend-to-backend.yaml", "default/frontend", "default/backend", 8080);
    assert!(e.ingress.tiers.is_empty() && e.egress.tiers.is_empty());
}

/// A default deny names the policies that select the endpoint in that direction, and only
/// those: the other namespace's copy of the seed policy does not select `default/backend`,
/// and an enforced direction without a default deny names none.
#[test]
fn offline_explain_names_the_policies_behind_a_default_deny() {
    let file = fixture("seed-allow-frontend-to-backend.yaml");
    let plan = scenario::load(&file).unwrap();
    let state = scenario_state(&plan, None).unwrap();
    let req = |from: &str, to: &str, port| palisade_api::types::ExplainRequest {
        from: from.into(),
        to: to.into(),
        port: Some(port),
        protocol: "TCP".into(),
    };
    let e = explain(&req("default/frontend", "default/backend", 9090), &state.inputs()).unwrap();
    assert_eq!(e.ingress.decision, "default-deny");
    assert_eq!(e.ingress.default_deny_by, vec!["CiliumNetworkPolicy default/allow-frontend-to-backend"]);
    assert!(e.egress.default_deny_by.is_empty(), "{e:?}");
    let e = explain(&req("other-team/other", "other-team/backend", 8080), &state.inputs()).unwrap();
    assert_eq!(e.ingress.default_deny_by, vec!["CiliumNetworkPolicy other-team/allow-frontend-to-backend"]);
    let allowed = explain(&req("default/frontend", "default/backend", 8080), &state.inputs()).unwrap();
    assert!(allowed.ingress.default_deny_by.is_empty());
    assert_eq!(allowed.ingress.nearest_rule, None);
}

/// A default deny names the nearest allow rule and what the flow lacks for it: frontend on
/// 9090 lacks the port, `other` on 8080 the label, the other namespace's frontend the
/// namespace.
#[test]
fn offline_explain_names_the_nearest_rule_of_a_default_deny() {
    let file = fixture("seed-allow-frontend-to-backend.yaml");
    let plan = scenario::load(&file).unwrap();
    let state = scenario_state(&plan, None).unwrap();
    let near = |from: &str, port| {
        let req = palisade_api::types::ExplainRequest {
            from: from.into(),
            to: "default/backend".into(),
            port: Some(port),
            protocol: "TCP".into(),
        };
        let e = explain(&req, &state.inputs()).unwrap();
        assert_eq!(e.ingress.decision, "default-deny", "{e:?}");
        e.ingress.nearest_rule.unwrap()
    };
    let rule = "CiliumNetworkPolicy default/allow-frontend-to-backend spec.ingress[0], which the flow misses by:";
    assert_eq!(near("default/frontend", 9090), format!("{rule} port 8080/TCP"));
    assert_eq!(near("default/other", 8080), format!("{rule} label app=frontend"));
    assert_eq!(near("other-team/frontend", 8080), format!("{rule} namespace default"));
    assert_eq!(near("default/other", 9090), format!("{rule} label app=frontend, port 8080/TCP"));
}
