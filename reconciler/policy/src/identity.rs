//! Numeric security identities: label set -> number, with reference counts.
//!
//! The reserved identities have fixed numbers (the same as Cilium's and as
//! `palisade_common::identity`, which this crate does not depend on) and are always
//! registered. Label sets get numbers from [`FIRST_CLUSTER`] on; a number whose last
//! reference is released is free, and the lowest free number is handed out first.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::Serialize;

use crate::labels::LabelSet;

// The numbers are the datapath's (and Cilium's): one definition, in the ABI crate.
pub use palisade_common::identity::{
    ANY, FIRST_CLUSTER, HEALTH, HOST, INGRESS, INIT, KUBE_APISERVER, LOCAL_SCOPE, REMOTE_NODE, UNMANAGED, WORLD,
    WORLD_IPV4, WORLD_IPV6,
};

/// The reserved identities: number and name (the name is the `reserved:` label key).
pub const RESERVED: [(u32, &str); 10] = [
    (HOST, "host"),
    (WORLD, "world"),
    (UNMANAGED, "unmanaged"),
    (HEALTH, "health"),
    (INIT, "init"),
    (REMOTE_NODE, "remote-node"),
    (KUBE_APISERVER, "kube-apiserver"),
    (INGRESS, "ingress"),
    (WORLD_IPV4, "world-ipv4"),
    (WORLD_IPV6, "world-ipv6"),
];

/// Whether `id` is one of the reserved identities.
pub fn is_reserved(id: u32) -> bool {
    (1..FIRST_CLUSTER).contains(&id)
}

#[derive(Clone, Debug, Serialize)]
struct Slot {
    labels: LabelSet,
    /// References; reserved identities are never counted or freed.
    refs: u32,
}

/// Allocates identities for label sets and counts references to them.
#[derive(Clone, Debug)]
pub struct IdentityAllocator {
    by_id: BTreeMap<u32, Slot>,
    by_labels: HashMap<LabelSet, u32>,
    /// Numbers below `next` that were freed.
    free: BTreeSet<u32>,
    next: u32,
}

impl Default for IdentityAllocator {
    fn default() -> Self {
        IdentityAllocator::new()
    }
}

impl IdentityAllocator {
    /// An allocator holding only the reserved identities.
    pub fn new() -> IdentityAllocator {
        let mut a = IdentityAllocator {
            by_id: BTreeMap::new(),
            by_labels: HashMap::new(),
            free: BTreeSet::new(),
            next: FIRST_CLUSTER,
        };
        for (id, name) in RESERVED {
            let labels = LabelSet::reserved(name);
            a.by_labels.insert(labels.clone(), id);
            a.by_id.insert(id, Slot { labels, refs: 0 });
        }
        a
    }

    /// The identity of `labels`, allocated if new; adds one reference. A reserved label
    /// set returns its reserved number (not counted).
    pub fn allocate(&mut self, labels: &LabelSet) -> u32 {
        if let Some(&id) = self.by_labels.get(labels) {
            if !is_reserved(id) {
                self.by_id.get_mut(&id).expect("maps agree").refs += 1;
            }
            return id;
        }
        let id = if let Some(id) = self.free.pop_first() {
            id
        } else {
            let id = self.next;
            self.next += 1;
            id
        };
        self.by_labels.insert(labels.clone(), id);
        self.by_id.insert(id, Slot { labels: labels.clone(), refs: 1 });
        id
    }

    /// As [`IdentityAllocator::allocate`], but a new label set gets number `wanted` when it
    /// is a free cluster number (how a restarted agent keeps the numbers its maps hold).
    pub fn allocate_as(&mut self, labels: &LabelSet, wanted: u32) -> u32 {
        let known = self.by_labels.contains_key(labels);
        let free = (FIRST_CLUSTER..LOCAL_SCOPE).contains(&wanted) && !self.by_id.contains_key(&wanted);
        if known || !free {
            return self.allocate(labels);
        }
        if wanted >= self.next {
            self.free.extend(self.next..wanted);
            self.next = wanted + 1;
        } else {
            self.free.remove(&wanted);
        }
        self.by_labels.insert(labels.clone(), wanted);
        self.by_id.insert(wanted, Slot { labels: labels.clone(), refs: 1 });
        wanted
    }

    /// Drops one reference; returns true when that freed the identity. Unknown and
    /// reserved identities are left alone (false).
    pub fn release(&mut self, id: u32) -> bool {
        if is_reserved(id) {
            return false;
        }
        let Some(slot) = self.by_id.get_mut(&id) else {
            return false;
        };
        slot.refs -= 1;
        if slot.refs > 0 {
            return false;
        }
        let slot = self.by_id.remove(&id).expect("just seen");
        self.by_labels.remove(&slot.labels);
        self.free.insert(id);
        true
    }

    pub fn get(&self, id: u32) -> Option<&LabelSet> {
        self.by_id.get(&id).map(|s| &s.labels)
    }

    pub fn lookup(&self, labels: &LabelSet) -> Option<u32> {
        self.by_labels.get(labels).copied()
    }

    /// References held on `id` (0 for reserved and unknown identities).
    pub fn refs(&self, id: u32) -> u32 {
        self.by_id.get(&id).map_or(0, |s| s.refs)
    }

    /// Every identity with its labels and reference count, in numeric order (reserved
    /// ones first, with 0 references).
    pub fn iter(&self) -> impl Iterator<Item = (u32, &LabelSet, u32)> {
        self.by_id.iter().map(|(id, s)| (*id, &s.labels, s.refs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::labels::Label;

    fn set(app: &str) -> LabelSet {
        [Label::k8s("app", app)].into_iter().collect()
    }

    #[test]
    fn reserved_identities_are_preregistered() {
        let a = IdentityAllocator::new();
        assert_eq!(a.get(HOST).unwrap().to_string(), "reserved:host");
        assert_eq!(a.get(WORLD_IPV6).unwrap().to_string(), "reserved:world,reserved:world-ipv6");
        assert_eq!(a.lookup(&LabelSet::reserved("kube-apiserver")), Some(7));
        assert_eq!(a.iter().count(), 10);
    }

    #[test]
    fn same_labels_same_identity_counted() {
        let mut a = IdentityAllocator::new();
        let web = a.allocate(&set("web"));
        assert_eq!(web, FIRST_CLUSTER);
        assert_eq!(a.allocate(&set("web")), web);
        assert_eq!(a.allocate(&set("db")), FIRST_CLUSTER + 1);
        assert_eq!(a.refs(web), 2);
        assert!(!a.release(web), "one reference left");
        assert_eq!(a.get(web), Some(&set("web")));
        assert!(a.release(web), "last reference frees it");
        assert_eq!(a.get(web), None);
        assert_eq!(a.lookup(&set("web")), None);
        assert!(!a.release(web), "already free");
    }

    #[test]
    fn freed_numbers_are_reused_lowest_first() {
        let mut a = IdentityAllocator::new();
        let ids: Vec<u32> = ["a", "b", "c"].iter().map(|n| a.allocate(&set(n))).collect();
        assert!(a.release(ids[2]));
        assert!(a.release(ids[0]));
        assert_eq!(a.allocate(&set("d")), ids[0]);
        assert_eq!(a.allocate(&set("e")), ids[2]);
        assert_eq!(a.allocate(&set("f")), FIRST_CLUSTER + 3);
    }

    #[test]
    fn reserved_are_never_freed() {
        let mut a = IdentityAllocator::new();
        assert_eq!(a.allocate(&LabelSet::reserved("host")), HOST);
        assert!(!a.release(HOST));
        assert!(a.get(HOST).is_some());
    }

    #[test]
    fn allocate_as_keeps_a_wanted_free_number() {
        let mut a = IdentityAllocator::new();
        assert_eq!(a.allocate_as(&set("b"), FIRST_CLUSTER + 2), FIRST_CLUSTER + 2);
        // Known labels keep their number and gain a reference.
        assert_eq!(a.allocate_as(&set("b"), FIRST_CLUSTER + 7), FIRST_CLUSTER + 2);
        assert_eq!(a.refs(FIRST_CLUSTER + 2), 2);
        // A taken number is not given twice.
        assert_eq!(a.allocate_as(&set("c"), FIRST_CLUSTER + 2), FIRST_CLUSTER);
        assert_eq!(a.allocate_as(&set("d"), FIRST_CLUSTER + 1), FIRST_CLUSTER + 1);
        assert_eq!(a.allocate(&set("e")), FIRST_CLUSTER + 3);
        // Reserved and local-scope numbers are never taken this way.
        assert_eq!(a.allocate_as(&set("f"), HOST), FIRST_CLUSTER + 4);
        assert_eq!(a.allocate_as(&set("g"), LOCAL_SCOPE | 5), FIRST_CLUSTER + 5);
    }
}
