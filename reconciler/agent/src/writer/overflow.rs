//! What it means when a desired state does not fit in the maps, in words: the errors the
//! map writer reports in status and logs for each overflowing map ([`overflow_errors`]),
//! and the correction of an explanation for endpoint directions that fail closed
//! ([`explain_fail_closed`]).
use std::collections::BTreeMap;

use palisade_common::{direction, map_names};

use super::RealizedState;
use crate::api::types::{Explanation, SideDecision};
use crate::mapstate::Fitted;

/// One error per map that overflowed, saying which endpoints fail closed (or are left
/// out) and what to do; `names` names endpoints by id (`namespace/name`).
pub fn overflow_errors(fitted: &Fitted, names: &BTreeMap<u16, String>) -> Vec<String> {
    let name = |id: u16| names.get(&id).cloned().unwrap_or_else(|| format!("endpoint {id}"));
    let closed: Vec<String> = fitted
        .fail_closed
        .iter()
        .map(|(id, d)| format!("{} {}", name(*id), if *d == direction::INGRESS { "ingress" } else { "egress" }))
        .collect();
    fitted
        .overflows
        .iter()
        .map(|o| {
            let consequence = if o.map == map_names::ENDPOINTS {
                let left: Vec<String> = fitted.not_loaded.iter().map(|id| name(*id)).collect();
                format!(
                    "endpoints left out, failing closed (the datapath drops all their traffic: no-endpoint): {}",
                    left.join(", ")
                )
            } else if closed.is_empty() {
                "no endpoint direction had to fail closed".to_string()
            } else {
                format!("failing closed (denying all traffic) for: {}", closed.join(", "))
            };
            format!(
                "map {} is full: the desired state needs {} entries, the map holds at most {}; {consequence}. \
                 Raise its size with --map-size {}=N (PALISADE_MAP_SIZES); a pinned map keeps its size until its \
                 pin is removed",
                o.map, o.needed, o.max, o.map
            )
        })
        .collect()
}

/// Corrects an explanation (made from the resolver's desired state) for endpoint
/// directions that fail closed because their entries do not fit in the maps: that side
/// denies whatever the policy says. `ids` maps `namespace/name` to endpoint ids.
pub fn explain_fail_closed(e: &mut Explanation, realized: &RealizedState, ids: &BTreeMap<String, u16>) {
    let closed = |side: &SideDecision, dir: &str| {
        side.endpoint
            .as_ref()
            .and_then(|name| ids.get(name))
            .and_then(|id| realized.endpoints.get(id))
            .is_some_and(|r| r.fail_closed.iter().any(|d| d == dir))
    };
    let why = || {
        let mut rules = vec!["the endpoint's policy entries do not fit in the eBPF maps: it fails closed".to_string()];
        rules.extend(realized.map_errors.iter().cloned());
        rules
    };
    if closed(&e.egress, "egress") {
        e.egress.decision = "fail-closed".into();
        e.egress.entry = None;
        e.egress.rules = why();
        e.verdict = "deny".into();
    }
    if closed(&e.ingress, "ingress") {
        e.ingress.decision = "fail-closed".into();
        e.ingress.entry = None;
        e.ingress.rules = why();
        e.verdict = "deny".into();
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::mapstate::Overflow;

    #[test]
    fn an_overflow_says_who_fails_closed_and_what_to_do() {
        let fitted = Fitted {
            overflows: vec![Overflow { map: map_names::POLICY, needed: 8, max: 6 }],
            fail_closed: BTreeSet::from([(2, direction::INGRESS)]),
            ..Fitted::default()
        };
        let names = BTreeMap::from([(2, "default/backend".to_string())]);
        let errors = overflow_errors(&fitted, &names);
        assert_eq!(errors.len(), 1);
        let e = &errors[0];
        assert!(e.starts_with("map POLICY is full: the desired state needs 8 entries, the map holds at most 6"), "{e}");
        assert!(e.contains("failing closed (denying all traffic) for: default/backend ingress"), "{e}");
        assert!(e.contains("--map-size POLICY=N"), "{e}");
    }

    #[test]
    fn endpoints_left_out_are_named() {
        let fitted = Fitted {
            overflows: vec![Overflow { map: map_names::ENDPOINTS, needed: 2, max: 1 }],
            not_loaded: BTreeSet::from([7]),
            ..Fitted::default()
        };
        let errors = overflow_errors(&fitted, &BTreeMap::new());
        assert!(errors[0].contains(
            "endpoints left out, failing closed (the datapath drops all their traffic: no-endpoint): endpoint 7"
        ));
    }
}
