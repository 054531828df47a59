//! Plans in the order they are written: no flow allowed (or denied) before and after a
//! change flips while the real applier writes the plan over the fake maps; and snapshots of
//! plans for fixture scenarios.
use std::sync::{Arc, Mutex};

use palisade_common::{PolicyLengthsKey, direction, policy_length_bit};

use super::testing::*;
use super::*;
use crate::datapath::{apply_plan, read_state};

/// Flows whose verdict is the same before and after but differs after some element the
/// applier writes (fake maps holding `before`, plan `p`).
fn transient_flips(before: &MapState, after: &MapState, p: &Plan) -> Vec<String> {
    let stable: Vec<(Flow, bool)> = flows()
        .into_iter()
        .filter_map(|f| {
            let (a, b) = (allowed(before, f.0, f.1, f.2, f.3), allowed(after, f.0, f.1, f.2, f.3));
            (a == b).then_some((f, a))
        })
        .collect();
    let mut fake = fake_holding(before);
    let flips = Arc::new(Mutex::new(Vec::new()));
    let seen = flips.clone();
    fake.on_write(move |maps| {
        let s = read_state(maps).unwrap();
        let step = maps.last_write().map(|w| format!("{:?} {}", w.op, w.map)).unwrap_or_default();
        for (f, want) in &stable {
            if allowed(&s, f.0, f.1, f.2, f.3) != *want {
                let what = if *want { "dropped" } else { "allowed" };
                seen.lock().unwrap().push(format!("{f:?} {what} after {step}"));
            }
        }
    });
    apply_plan(&mut fake, p, before, &MapLimits::UNLIMITED).unwrap();
    assert_eq!(&fake.state(), after, "the plan turns `before` into `after`");
    flips.lock().unwrap().clone()
}

#[test]
fn no_flow_flips_while_a_plan_is_applied() {
    for (name, before, after) in transitions() {
        let p = plan(&after, &before);
        assert_eq!(transient_flips(&before, &after, &p), Vec::<String>::new(), "{name}:\n{:#?}", p.describe());
    }
}

#[test]
fn clearing_length_bits_before_the_deletes_would_drop_flows() {
    // The same change with the bitmaps written at their final value up front (no
    // widening step): X's TCP/80 is dropped in between. This is what the two-step
    // POLICY_LENGTHS writes prevent, and what the check above would catch.
    let (_, before, after) = transitions().pop().unwrap();
    let mut naive = plan(&after, &before);
    for (k, v) in naive.policy_lengths_narrow.drain(..) {
        naive.policy_lengths.updates.retain(|(u, _)| *u != k);
        naive.policy_lengths.updates.push((k, v));
    }
    naive.policy_lengths.updates.sort();
    let flips = transient_flips(&before, &after, &naive);
    assert!(flips.iter().any(|f| f.contains(&format!("(0, {X}, 6, 80) dropped"))), "{flips:?}");
}

#[test]
fn length_bits_widen_before_deletes_and_narrow_after() {
    let (_, before, after) = transitions().swap_remove(3); // exact port to any port
    let p = plan(&after, &before);
    let lk = PolicyLengthsKey::new(EP, direction::INGRESS, X);
    assert_eq!(p.policy_lengths.updates, vec![(lk, policy_length_bit(72) | policy_length_bit(88))]);
    assert_eq!(p.policy_lengths_narrow, vec![(lk, policy_length_bit(72))]);
    assert_eq!(
        p.describe(),
        vec![
            "add policy ep 3 ingress identity 300 TCP/any -> allow cookie 1",
            "set policy lengths ep 3 ingress identity 300 -> /72 /88",
            "delete policy ep 3 ingress identity 300 TCP/80",
            "narrow policy lengths ep 3 ingress identity 300 -> /72",
        ]
    );
}

#[test]
fn endpoint_is_enforced_after_its_entries_and_deleted_before_them() {
    let (_, before, after) = transitions().swap_remove(4); // enforcement switched on
    let d = plan(&after, &before).describe();
    let pos = |prefix: &str| d.iter().position(|l| l.starts_with(prefix)).unwrap();
    assert!(pos("add policy") < pos("update endpoint"), "{d:#?}");
    assert!(pos("set policy lengths") < pos("update endpoint"), "{d:#?}");
    let mut gone = after.clone();
    gone.endpoints.clear();
    gone.policy.clear();
    gone.policy_lengths.clear();
    let d = plan(&gone, &after).describe();
    let pos = |prefix: &str| d.iter().position(|l| l.starts_with(prefix)).unwrap();
    assert!(pos("delete endpoint") < pos("delete policy "), "{d:#?}");
    assert!(pos("delete policy ") < pos("delete policy lengths"), "{d:#?}");
}

// -----------------------------------------------------------------------------------
// Snapshots of plans for fixture scenarios.

fn scenario_state(file: &str, skip_policies: usize, jar: &mut CookieJar) -> MapState {
    use palisade_cli::offline::{scenario_endpoint_spec, scenario_policy_files, scenario_reserved_entries};
    use palisade_node::explain::offline::{OfflineState, PodInput};
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/scenarios").join(file);
    let plan = palisade_scenario::load(&path).unwrap();
    let files: Vec<(String, Vec<u8>)> = scenario_policy_files(&plan)
        .unwrap()
        .into_iter()
        .skip(skip_policies)
        .map(|(n, t)| (n, t.into_bytes()))
        .collect();
    let pods: Vec<PodInput> = plan
        .pods
        .iter()
        .map(|p| PodInput { namespace: p.namespace.clone(), name: p.name.clone(), spec: scenario_endpoint_spec(p) })
        .collect();
    let st =
        OfflineState::build(&plan.namespaces, &pods, &scenario_reserved_entries(&plan), &files, "default").unwrap();
    let inputs = st.inputs();
    let mappings: Vec<EndpointMapping> = st
        .endpoints()
        .iter()
        .map(|e| EndpointMapping {
            id: e.id,
            ifindex: 100 + u32::from(e.id),
            identity: e.identity,
            ipv4: e.ipv4,
            ipv6: e.ipv6,
        })
        .collect();
    encode(inputs.desired.unwrap(), &mappings, inputs.ipcache, jar)
}

#[test]
fn plan_snapshot_seed_from_empty() {
    let s = scenario_state("seed-allow-frontend-to-backend.yaml", 0, &mut CookieJar::default());
    insta::assert_yaml_snapshot!("plan_seed_from_empty", plan(&s, &MapState::default()).describe());
}

#[test]
fn plan_snapshot_deny_beats_allow_from_empty() {
    let s = scenario_state("cnp-ingress-deny-beats-allow.yaml", 0, &mut CookieJar::default());
    insta::assert_yaml_snapshot!("plan_deny_beats_allow_from_empty", plan(&s, &MapState::default()).describe());
}

#[test]
fn plan_snapshot_stacked_policy_removed() {
    // Two stacked policies select x/a; the first is removed.
    // One cookie jar, as in the map writer: an entry's cookie only changes with its rules.
    let mut jar = CookieJar::default();
    let both = scenario_state("knp-stacked-policies.yaml", 0, &mut jar);
    let one = scenario_state("knp-stacked-policies.yaml", 1, &mut jar);
    let p = plan(&one, &both);
    assert!(!p.is_empty());
    // Written by the applier, the plan ends in the new state.
    let mut fake = fake_holding(&both);
    apply_plan(&mut fake, &p, &both, &MapLimits::UNLIMITED).unwrap();
    assert_eq!(fake.state(), one);
    insta::assert_yaml_snapshot!("plan_stacked_policy_removed", p.describe());
    insta::assert_yaml_snapshot!("plan_stacked_policy_added_back", plan(&both, &one).describe());
}
