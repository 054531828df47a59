//! Plans: the smallest set of changes from what the maps hold to what they should hold
//! ([`plan`]), and the one order in which a plan is written ([`Plan::steps`]), which the
//! applier (`datapath::apply_plan`), [`Plan::describe`] and the tests all follow.
use std::collections::BTreeMap;

use serde::Serialize;

use super::table::{MapLimits, MapState, MapVisitor, Plan, TableMap, WritableMap};

/// Changes to one map: adds, updates (a key loaded with another value) and deletes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MapPlan<K, V> {
    pub adds: Vec<(K, V)>,
    pub updates: Vec<(K, V)>,
    pub deletes: Vec<K>,
}

impl<K, V> Default for MapPlan<K, V> {
    fn default() -> Self {
        MapPlan { adds: Vec::new(), updates: Vec::new(), deletes: Vec::new() }
    }
}

impl<K, V> MapPlan<K, V> {
    pub fn is_empty(&self) -> bool {
        self.adds.is_empty() && self.updates.is_empty() && self.deletes.is_empty()
    }
    pub fn len(&self) -> usize {
        self.adds.len() + self.updates.len() + self.deletes.len()
    }
}

/// One merge walk over both (sorted) maps.
fn diff<K: Ord + Clone, V: PartialEq + Clone>(desired: &BTreeMap<K, V>, loaded: &BTreeMap<K, V>) -> MapPlan<K, V> {
    use std::cmp::Ordering;
    let mut p = MapPlan::default();
    let (mut d, mut l) = (desired.iter().peekable(), loaded.iter().peekable());
    loop {
        match (d.peek(), l.peek()) {
            (None, None) => break,
            (Some((k, v)), None) => {
                p.adds.push(((*k).clone(), (*v).clone()));
                d.next();
            }
            (None, Some((k, _))) => {
                p.deletes.push((*k).clone());
                l.next();
            }
            (Some((dk, dv)), Some((lk, lv))) => match dk.cmp(lk) {
                Ordering::Less => {
                    p.adds.push(((*dk).clone(), (*dv).clone()));
                    d.next();
                }
                Ordering::Greater => {
                    p.deletes.push((*lk).clone());
                    l.next();
                }
                Ordering::Equal => {
                    if dv != lv {
                        p.updates.push(((*dk).clone(), (*dv).clone()));
                    }
                    d.next();
                    l.next();
                }
            },
        }
    }
    p
}

/// Diffs one map into the plan.
struct Diff<'a> {
    desired: &'a MapState,
    loaded: &'a MapState,
    plan: &'a mut Plan,
}

impl MapVisitor for &mut Diff<'_> {
    type Output = ();
    fn visit<M: TableMap>(self, _: M) {
        *M::plan_mut(self.plan) = diff(M::state(self.desired), M::state(self.loaded));
    }
}

/// The smallest set of changes from `loaded` to `desired`, written in the order of
/// [`Plan::steps`].
pub fn plan(desired: &MapState, loaded: &MapState) -> Plan {
    let mut out = Plan::default();
    let mut d = Diff { desired, loaded, plan: &mut out };
    for m in WritableMap::ALL {
        m.visit(&mut d);
    }
    // Updates of a bitmap: bits are set before the POLICY deletes, cleared after them.
    let mut widen = Vec::new();
    let mut narrow = Vec::new();
    for (k, new) in out.policy_lengths.updates.drain(..) {
        let old = loaded.policy_lengths.get(&k).copied().unwrap_or(0);
        if new & !old != 0 {
            widen.push((k, new | old));
        }
        if old & !new != 0 {
            narrow.push((k, new));
        }
    }
    out.policy_lengths.updates = widen;
    out.policy_lengths_narrow = narrow;
    out
}

/// Which of one map's changes a [`Step`] writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    /// The adds that fit beside the entries the map holds ([`Room`]): all of them unless
    /// the map is near its size.
    Adds,
    Updates,
    Deletes,
    /// The adds that did not fit beside the old entries, once the map's deletes are done.
    LateAdds,
    /// Updates written after the deletes ([`TableMap::narrowed`]).
    Narrowed,
}

/// One write of a plan: one part of one map's changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Step {
    pub map: WritableMap,
    pub part: Part,
}

impl Step {
    const fn new(map: WritableMap, part: Part) -> Step {
        Step { map, part }
    }
}

impl Plan {
    /// The order in which a plan is written, the only definition of it: the applier
    /// (`datapath::apply_plan`) writes the steps one after the other, [`Plan::describe`]
    /// lists them in it, and the tests that check no flow flips while a plan is applied
    /// drive the applier. The order is such that no flow allowed before and after sees a
    /// drop in between, and an endpoint is only enforced once the entries it needs are
    /// there:
    ///
    /// 1. POLICY adds and updates (invisible to the datapath until their length bit is set);
    /// 2. `POLICY_LENGTHS` adds and widening updates: bits are only *set* here, so every
    ///    entry, old or new, stays reachable;
    /// 3. ipcache adds and updates, map by map (an address moves to its new identity once
    ///    the new identity's entries are reachable);
    /// 4. ENDPOINTS adds and updates (enforcement switches on last);
    /// 5. ENDPOINTS deletes;
    /// 6. POLICY deletes;
    /// 7. `POLICY_LENGTHS` narrowing updates (`policy_lengths_narrow`: the final bitmaps,
    ///    which clear the bits of lengths no entry has any more), then `POLICY_LENGTHS`
    ///    deletes;
    /// 8. ipcache deletes.
    ///
    /// A map near its size cannot hold old and new entries at once: the adds that do not
    /// fit beside the old entries ([`Room`]) are written right after that map's deletes
    /// ([`Part::LateAdds`]).
    pub fn steps() -> Vec<Step> {
        use Part::{Adds, Deletes, LateAdds, Narrowed, Updates};
        use WritableMap::{Endpoints, Policy, PolicyLengths};
        let mut out = vec![
            Step::new(Policy, Adds),
            Step::new(Policy, Updates),
            Step::new(PolicyLengths, Adds),
            Step::new(PolicyLengths, Updates),
        ];
        out.extend(WritableMap::ipcache().flat_map(|m| [Step::new(m, Adds), Step::new(m, Updates)]));
        out.extend([
            Step::new(Endpoints, Adds),
            Step::new(Endpoints, Updates),
            Step::new(Endpoints, Deletes),
            Step::new(Endpoints, LateAdds),
            Step::new(Policy, Deletes),
            Step::new(Policy, LateAdds),
            Step::new(PolicyLengths, Narrowed),
            Step::new(PolicyLengths, Deletes),
            Step::new(PolicyLengths, LateAdds),
        ]);
        out.extend(WritableMap::ipcache().flat_map(|m| [Step::new(m, Deletes), Step::new(m, LateAdds)]));
        out
    }
}

/// The entries one step writes.
#[derive(Debug)]
pub enum Writes<'a, K, V> {
    Upserts(&'a [(K, V)]),
    Deletes(&'a [K]),
}

impl Step {
    /// What this step writes of `plan`, `M` being the step's map. `room` decides how the
    /// adds are split between [`Part::Adds`] and [`Part::LateAdds`].
    pub fn writes<'p, M: TableMap>(self, plan: &'p Plan, room: &Room) -> Writes<'p, M::Key, M::Value> {
        debug_assert_eq!(M::MAP, self.map, "the step's own map");
        let p = M::plan(plan);
        let now = room.of(self.map).min(p.adds.len());
        match self.part {
            Part::Adds => Writes::Upserts(&p.adds[..now]),
            Part::LateAdds => Writes::Upserts(&p.adds[now..]),
            Part::Updates => Writes::Upserts(&p.updates),
            Part::Narrowed => Writes::Upserts(M::narrowed(plan)),
            Part::Deletes => Writes::Deletes(&p.deletes),
        }
    }
}

/// How many new entries each map takes before its deletes are done: its size less what it
/// holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Room {
    free: [usize; WritableMap::COUNT],
}

impl Room {
    /// No map is ever full (describing a plan; maps far from their size).
    pub const UNLIMITED: Room = Room { free: [usize::MAX; WritableMap::COUNT] };

    /// The room left beside `loaded` in maps of sizes `limits`.
    pub fn new(loaded: &MapState, limits: &MapLimits) -> Room {
        let mut free = [0; WritableMap::COUNT];
        for m in WritableMap::ALL {
            free[m as usize] = (limits.get(m) as usize).saturating_sub(loaded.len_of(m));
        }
        Room { free }
    }

    pub fn of(&self, map: WritableMap) -> usize {
        self.free[map as usize]
    }
}

#[cfg(test)]
mod tests {
    use palisade_common::{
        IpcacheValue, Ipv4Prefix, PolicyLengthsKey, PolicyValue, direction, policy_length_bit, proto,
    };
    use palisade_policy::model::Direction;

    use super::*;
    use crate::mapstate::testing::key;
    use crate::mapstate::{policy_key, policy_lengths};

    #[test]
    fn plan_adds_updates_deletes() {
        let mut desired = MapState::default();
        let mut loaded = MapState::default();
        let k1 = policy_key(1, &key(Direction::Ingress, 300, proto::TCP, 80, 16));
        let k2 = policy_key(1, &key(Direction::Ingress, 301, proto::TCP, 80, 16));
        let k3 = policy_key(1, &key(Direction::Ingress, 302, proto::TCP, 80, 16));
        let v = |cookie| PolicyValue { flags: 0, cookie, prefix_len: 88 };
        desired.policy.insert(k1, v(1));
        desired.policy.insert(k2, v(2));
        loaded.policy.insert(k2, v(1));
        loaded.policy.insert(k3, v(1));
        let p = plan(&desired, &loaded);
        assert_eq!(p.policy.adds, vec![(k1, v(1))]);
        assert_eq!(p.policy.updates, vec![(k2, v(2))]);
        assert_eq!(p.policy.deletes, vec![k3]);
        assert!(plan(&desired, &desired).is_empty());
    }

    #[test]
    fn host_entry_in_the_trie_moves_to_the_host_map() {
        // A /32 left in the trie (by an older agent) is re-added as a host entry and then
        // removed from the trie: adds come before deletes, so the address never loses its
        // identity.
        let v = IpcacheValue { identity: 300, flags: 0 };
        let addr = Ipv4Prefix { addr: [10, 0, 0, 1] };
        let mut loaded = MapState::default();
        loaded.ipcache_v4.insert((32, addr), v);
        let mut desired = MapState::default();
        desired.ipcache_host_v4.insert(addr, v);
        let p = plan(&desired, &loaded);
        assert_eq!(p.ipcache_host_v4.adds, vec![(addr, v)]);
        assert_eq!(p.ipcache_v4.deletes, vec![(32, addr)]);
        assert_eq!(p.len(), 2);
        assert_eq!(
            p.describe(),
            vec!["add ipcache 10.0.0.1/32 -> 300".to_string(), "delete ipcache 10.0.0.1/32".to_string()]
        );
        assert!(plan(&desired, &desired).is_empty());
    }

    #[test]
    fn policy_lengths_follow_the_entries() {
        let mut desired = MapState::default();
        let v = PolicyValue { flags: 0, cookie: 1, prefix_len: 88 };
        for k in [
            key(Direction::Ingress, 300, proto::TCP, 80, 16),
            key(Direction::Ingress, 300, proto::TCP, 8080, 15),
            key(Direction::Ingress, 300, 0, 0, 0),
            key(Direction::Egress, 0, proto::UDP, 0, 0),
        ] {
            desired.policy.insert(policy_key(3, &k), v);
        }
        desired.policy_lengths = policy_lengths(&desired.policy);
        let lk = |d, id| PolicyLengthsKey::new(3, d, id);
        assert_eq!(
            desired.policy_lengths.clone().into_iter().collect::<Vec<_>>(),
            vec![
                (lk(direction::INGRESS, 300), policy_length_bit(64) | policy_length_bit(87) | policy_length_bit(88)),
                (lk(direction::EGRESS, 0), policy_length_bit(72)),
            ]
        );
        // Dropping the range entry clears its length; dropping the last egress entry drops
        // the bitmap, after the entry.
        let mut next = desired.clone();
        next.policy.remove(&policy_key(3, &key(Direction::Ingress, 300, proto::TCP, 8080, 15)));
        next.policy.remove(&policy_key(3, &key(Direction::Egress, 0, proto::UDP, 0, 0)));
        next.policy_lengths = policy_lengths(&next.policy);
        let p = plan(&next, &desired);
        assert_eq!(
            p.describe(),
            vec![
                "delete policy ep 3 egress identity any UDP/any",
                "delete policy ep 3 ingress identity 300 TCP/8080-8081",
                "narrow policy lengths ep 3 ingress identity 300 -> /64 /88",
                "delete policy lengths ep 3 egress identity any",
            ]
        );
    }
}
