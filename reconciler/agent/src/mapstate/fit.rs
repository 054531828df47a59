//! Fitting: a desired state cut down to what the maps can hold ([`fit`]), failing closed
//! rather than dropping entries silently, and the overflows it reports.
use std::collections::{BTreeMap, BTreeSet};

use palisade_common::{PolicyLengthsKey, PolicyValue, direction, endpoint_flags};
use serde::Serialize;

use super::PolicyMapKey;
use super::encode::policy_lengths;
use super::table::{MapLimits, MapState, MapVisitor, TableMap, WritableMap};

/// A map the desired state does not fit in.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Overflow {
    /// The map's name (`palisade_common::map_names`).
    pub map: &'static str,
    /// Entries the desired state needs in it.
    pub needed: usize,
    /// Entries it holds at most.
    pub max: u32,
}

/// What fits of a desired state: the state to load, the maps that overflowed and the
/// endpoint directions that fail closed because of it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fitted {
    pub state: MapState,
    pub overflows: Vec<Overflow>,
    /// (endpoint id, direction byte) enforced with no entries: everything denied.
    pub fail_closed: BTreeSet<(u16, u8)>,
    /// Endpoint ids left out of ENDPOINTS (the datapath does not see them at all).
    pub not_loaded: BTreeSet<u16>,
}

/// Cuts `desired` down to what the maps can hold, never by silently dropping entries:
///
/// - POLICY / `POLICY_LENGTHS`: the entries of one endpoint in one direction are kept or
///   dropped as a whole. Directions are taken in order, those whose entries are already
///   loaded unchanged (`applied`) first, then by endpoint and direction, and kept while
///   they fit; a direction that does not fit *fails closed*: it is marked enforced with no
///   entries, so it denies everything (a subset of what the policy allows) until a later
///   state fits.
/// - ipcache: when a prefix does not fit, a peer could be taken for another identity, so
///   every enforced direction of every endpoint fails closed. The prefixes already loaded
///   are kept first.
/// - ENDPOINTS: an endpoint left out has no record, and the datapath drops everything on an
///   interface without one (`no-endpoint`): it fails closed, and is reported. Endpoints
///   already loaded are kept first, then by ifindex.
pub fn fit(desired: MapState, limits: &MapLimits, applied: &MapState) -> Fitted {
    let mut s = desired;
    let mut out = Fitted::default();

    // ENDPOINTS.
    if s.endpoints.len() > limits.endpoints as usize {
        out.overflows.push(Overflow {
            map: palisade_common::map_names::ENDPOINTS,
            needed: s.endpoints.len(),
            max: limits.endpoints,
        });
        let mut order: Vec<u32> = s.endpoints.keys().copied().collect();
        order.sort_by_key(|k| (applied.endpoints.get(k) != s.endpoints.get(k), *k));
        for k in order.into_iter().skip(limits.endpoints as usize) {
            if let Some(info) = s.endpoints.remove(&k) {
                let id = info.endpoint_id as u16;
                out.not_loaded.insert(id);
                s.policy.retain(|(_, pk), _| pk.endpoint_id() != id);
            }
        }
    }

    // ipcache.
    let mut ipcache = CutIpcache { state: &mut s, applied, limits, out: &mut out, overflow: false };
    for m in WritableMap::ipcache() {
        m.visit(&mut ipcache);
    }
    let ipcache_overflow = ipcache.overflow;
    if ipcache_overflow {
        for info in s.endpoints.values() {
            let id = info.endpoint_id as u16;
            if info.flags & endpoint_flags::INGRESS_ENFORCED != 0 {
                out.fail_closed.insert((id, direction::INGRESS));
            }
            if info.flags & endpoint_flags::EGRESS_ENFORCED != 0 {
                out.fail_closed.insert((id, direction::EGRESS));
            }
        }
    }

    // POLICY and POLICY_LENGTHS, one (endpoint, direction) at a time. (The bitmaps
    // [`encode`] made hold unless endpoints were left out above.)
    if !out.not_loaded.is_empty() {
        s.policy_lengths = policy_lengths(&s.policy);
    }
    let (need_policy, need_lengths) = (s.policy.len(), s.policy_lengths.len());
    let policy_over = need_policy > limits.policy as usize;
    let lengths_over = need_lengths > limits.policy_lengths as usize;
    if policy_over {
        out.overflows.push(Overflow {
            map: palisade_common::map_names::POLICY,
            needed: need_policy,
            max: limits.policy,
        });
    }
    if lengths_over {
        out.overflows.push(Overflow {
            map: palisade_common::map_names::POLICY_LENGTHS,
            needed: need_lengths,
            max: limits.policy_lengths,
        });
    }
    if policy_over || lengths_over {
        let group = |m: &BTreeMap<PolicyMapKey, PolicyValue>| {
            let mut g: BTreeMap<(u16, u8), BTreeMap<PolicyMapKey, PolicyValue>> = BTreeMap::new();
            for (k, v) in m {
                g.entry((k.1.endpoint_id(), k.1.direction)).or_default().insert(*k, *v);
            }
            g
        };
        let wanted = group(&s.policy);
        let loaded = group(&applied.policy);
        let mut order: Vec<(u16, u8)> = wanted.keys().copied().collect();
        order.sort_by_key(|g| (loaded.get(g) != wanted.get(g), *g));
        let (mut used_policy, mut used_lengths) = (0usize, 0usize);
        for g in order {
            let entries = &wanted[&g];
            let lengths: BTreeSet<PolicyLengthsKey> = entries.keys().map(|(_, k)| k.lengths_key()).collect();
            if used_policy + entries.len() <= limits.policy as usize
                && used_lengths + lengths.len() <= limits.policy_lengths as usize
            {
                used_policy += entries.len();
                used_lengths += lengths.len();
            } else {
                out.fail_closed.insert(g);
            }
        }
    }

    // Fail closed: enforced, no entries.
    if !out.fail_closed.is_empty() {
        let closed = &out.fail_closed;
        s.policy.retain(|(_, k), _| !closed.contains(&(k.endpoint_id(), k.direction)));
        for info in s.endpoints.values_mut() {
            let id = info.endpoint_id as u16;
            if closed.contains(&(id, direction::INGRESS)) {
                info.flags |= endpoint_flags::INGRESS_ENFORCED;
            }
            if closed.contains(&(id, direction::EGRESS)) {
                info.flags |= endpoint_flags::EGRESS_ENFORCED;
            }
        }
        // Directions of endpoints not in ENDPOINTS cannot fail closed.
        let present: BTreeSet<u16> = s.endpoints.values().map(|i| i.endpoint_id as u16).collect();
        out.fail_closed.retain(|(id, _)| present.contains(id));
    }
    s.policy_lengths = policy_lengths(&s.policy);
    out.state = s;
    out
}

/// Cuts one ipcache map to its size ([`cut`]).
struct CutIpcache<'a> {
    state: &'a mut MapState,
    applied: &'a MapState,
    limits: &'a MapLimits,
    out: &'a mut Fitted,
    overflow: bool,
}

impl MapVisitor for &mut CutIpcache<'_> {
    type Output = ();
    fn visit<M: TableMap>(self, _: M) {
        let (map, max) = (M::MAP.name(), self.limits.get(M::MAP));
        self.overflow |= cut(M::state_mut(self.state), M::state(self.applied), max, map, self.out);
    }
}

/// Keeps at most `max` entries of `m`, those in `applied` with the same value first;
/// records an overflow when entries had to go.
fn cut<K: Ord + Clone, V: PartialEq>(
    m: &mut BTreeMap<K, V>,
    applied: &BTreeMap<K, V>,
    max: u32,
    map: &'static str,
    out: &mut Fitted,
) -> bool {
    if m.len() <= max as usize {
        return false;
    }
    out.overflows.push(Overflow { map, needed: m.len(), max });
    let mut order: Vec<K> = m.keys().cloned().collect();
    order.sort_by_key(|k| applied.get(k) != m.get(k));
    for k in order.into_iter().skip(max as usize) {
        m.remove(&k);
    }
    true
}

#[cfg(test)]
mod tests {
    use palisade_common::{IpcacheValue, Ipv4Prefix, direction, endpoint_flags, proto};

    use super::*;
    use crate::mapstate::testing::*;
    use crate::mapstate::{plan, policy_key};

    #[test]
    fn what_fits_is_loaded_as_is() {
        let s = two_endpoints();
        let limits = MapLimits { policy: 8, policy_lengths: 4, ..MapLimits::UNLIMITED };
        let f = fit(s.clone(), &limits, &MapState::default());
        assert_eq!(f.state, s);
        assert!(f.overflows.is_empty() && f.fail_closed.is_empty());
    }

    #[test]
    fn a_direction_that_does_not_fit_fails_closed() {
        let s = two_endpoints();
        // 8 entries needed, 6 available: endpoint 1 (both directions, 4 entries) and
        // endpoint 2's egress (1) fit; endpoint 2's ingress (3) does not.
        let limits = MapLimits { policy: 6, ..MapLimits::UNLIMITED };
        let f = fit(s.clone(), &limits, &MapState::default());
        assert_eq!(f.overflows, vec![Overflow { map: "POLICY", needed: 8, max: 6 }]);
        assert_eq!(f.fail_closed, BTreeSet::from([(2, direction::INGRESS)]));
        assert_eq!(f.state.policy.len(), 5);
        assert!(f.state.policy.keys().all(|(_, k)| !(k.endpoint_id() == 2 && k.direction == direction::INGRESS)));
        assert_eq!(f.state.endpoints[&11].flags & endpoint_flags::INGRESS_ENFORCED, endpoint_flags::INGRESS_ENFORCED);
        assert_eq!(f.state.policy_lengths, policy_lengths(&f.state.policy));
        assert!(f.state.policy.len() <= 6);
        // What fails closed denies: nothing of endpoint 2's ingress is reachable.
        for port in [80, 81, 82] {
            assert!(!allowed_for(&f.state, 11, 2, direction::INGRESS, X, proto::TCP, port));
            assert!(allowed_for(&f.state, 10, 1, direction::INGRESS, X, proto::TCP, port));
        }
    }

    #[test]
    fn loaded_directions_keep_their_room() {
        // Endpoint 2's ingress is loaded; endpoint 1's is new and there is room for one of
        // them: the new one fails closed, the loaded one is not disturbed.
        let s = two_endpoints();
        let mut applied = s.clone();
        applied.policy.retain(|(_, k), _| k.endpoint_id() == 2);
        let limits = MapLimits { policy: 5, ..MapLimits::UNLIMITED };
        let f = fit(s, &limits, &applied);
        assert_eq!(f.fail_closed, BTreeSet::from([(1, direction::INGRESS)]));
        assert!(f.state.policy.keys().any(|(_, k)| k.endpoint_id() == 2 && k.direction == direction::INGRESS));
    }

    #[test]
    fn policy_lengths_overflow_fails_closed_too() {
        let limits = MapLimits { policy_lengths: 3, ..MapLimits::UNLIMITED };
        let f = fit(two_endpoints(), &limits, &MapState::default());
        assert_eq!(f.overflows, vec![Overflow { map: "POLICY_LENGTHS", needed: 4, max: 3 }]);
        assert_eq!(f.fail_closed, BTreeSet::from([(2, direction::EGRESS)]));
        assert!(f.state.policy_lengths.len() <= 3);
    }

    #[test]
    fn ipcache_overflow_fails_every_enforced_direction_closed() {
        let mut s = two_endpoints();
        s.endpoints.get_mut(&11).unwrap().flags = endpoint_flags::INGRESS_ENFORCED;
        s.policy.retain(|(_, k), _| !(k.endpoint_id() == 2 && k.direction == direction::EGRESS));
        for i in 0..3u8 {
            s.ipcache_host_v4.insert(Ipv4Prefix { addr: [10, 0, 0, i] }, IpcacheValue { identity: X, flags: 0 });
        }
        let limits = MapLimits { ipcache_host_v4: 2, ..MapLimits::UNLIMITED };
        let f = fit(s, &limits, &MapState::default());
        assert_eq!(f.overflows, vec![Overflow { map: "IPCACHE_HOST_V4", needed: 3, max: 2 }]);
        assert_eq!(f.state.ipcache_host_v4.len(), 2);
        assert_eq!(
            f.fail_closed,
            BTreeSet::from([(1, direction::INGRESS), (1, direction::EGRESS), (2, direction::INGRESS)])
        );
        assert!(f.state.policy.is_empty() && f.state.policy_lengths.is_empty());
    }

    #[test]
    fn endpoints_that_do_not_fit_are_reported_not_loaded() {
        let limits = MapLimits { endpoints: 1, ..MapLimits::UNLIMITED };
        let f = fit(two_endpoints(), &limits, &MapState::default());
        assert_eq!(f.overflows, vec![Overflow { map: "ENDPOINTS", needed: 2, max: 1 }]);
        assert_eq!(f.not_loaded, BTreeSet::from([2]));
        assert!(f.state.policy.keys().all(|(_, k)| k.endpoint_id() == 1));
    }

    #[test]
    fn recovery_when_room_returns() {
        let s = two_endpoints();
        let limits = MapLimits { policy: 6, ..MapLimits::UNLIMITED };
        let closed = fit(s.clone(), &limits, &MapState::default());
        // One of endpoint 2's ingress entries goes (a policy deleted): now it fits.
        let mut smaller = s.clone();
        let (len, k) = policy_key(2, &ing(X, proto::TCP, 82, 16));
        smaller.policy.remove(&(len, k));
        smaller.policy_lengths = policy_lengths(&smaller.policy);
        let smaller_limits = MapLimits { policy: 7, ..MapLimits::UNLIMITED };
        let f = fit(smaller.clone(), &smaller_limits, &closed.state);
        assert!(f.overflows.is_empty() && f.fail_closed.is_empty());
        assert_eq!(f.state, smaller);
        let p = plan(&f.state, &closed.state);
        assert_eq!(p.policy.adds.len(), 2, "{:#?}", p.describe());
    }
}
