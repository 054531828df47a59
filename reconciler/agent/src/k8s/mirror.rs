//! An in-memory store of one resource fed by a kube watcher: the reflector-store pattern,
//! with relists applied atomically. Objects listed between `Init` and `InitDone` are
//! buffered and replace the store at once, so a relist (after a 410 Gone or a reconnect)
//! never shows a half-empty cluster; nothing is removed while the API server is away.
use std::collections::BTreeMap;

use kube::ResourceExt;
use kube::runtime::watcher::Event;

/// `namespace/name`, or `name` for cluster-scoped objects.
pub fn object_key<K: ResourceExt>(obj: &K) -> String {
    match obj.namespace() {
        Some(ns) => format!("{ns}/{}", obj.name_any()),
        None => obj.name_any(),
    }
}

#[derive(Clone, Debug)]
pub struct Mirror<K> {
    objects: BTreeMap<String, K>,
    relist: Option<BTreeMap<String, K>>,
    synced: bool,
}

impl<K> Default for Mirror<K> {
    fn default() -> Self {
        Mirror { objects: BTreeMap::new(), relist: None, synced: false }
    }
}

impl<K: ResourceExt + Clone> Mirror<K> {
    /// Applies one watcher event; true when the visible content changed (or was replaced).
    pub fn apply(&mut self, event: Event<K>) -> bool {
        match event {
            Event::Init => {
                self.relist = Some(BTreeMap::new());
                false
            }
            Event::InitApply(obj) => {
                match self.relist.as_mut() {
                    Some(buf) => {
                        buf.insert(object_key(&obj), obj);
                    }
                    None => {
                        self.objects.insert(object_key(&obj), obj);
                    }
                }
                false
            }
            Event::InitDone => {
                if let Some(buf) = self.relist.take() {
                    self.objects = buf;
                }
                self.synced = true;
                true
            }
            Event::Apply(obj) => {
                self.objects.insert(object_key(&obj), obj);
                true
            }
            Event::Delete(obj) => self.objects.remove(&object_key(&obj)).is_some(),
        }
    }

    /// The API server does not serve the resource (its CRD is absent): the store is empty
    /// and counts as listed. True when that changed what is visible.
    pub fn not_served(&mut self) -> bool {
        let changed = !self.objects.is_empty() || !self.synced;
        self.objects.clear();
        self.relist = None;
        self.synced = true;
        changed
    }

    /// True once a first complete list was seen.
    pub fn synced(&self) -> bool {
        self.synced
    }

    pub fn objects(&self) -> impl Iterator<Item = &K> {
        self.objects.values()
    }

    pub fn get(&self, key: &str) -> Option<&K> {
        self.objects.get(key)
    }

    pub fn len(&self) -> usize {
        self.objects.len()
    }

    pub fn is_empty(&self) -> bool {
        self.objects.is_empty()
    }
}

/// The smallest change from `applied` to `desired`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan<Key, V> {
    pub upserts: Vec<(Key, V)>,
    pub removes: Vec<Key>,
}

impl<Key, V> Plan<Key, V> {
    pub fn is_empty(&self) -> bool {
        self.upserts.is_empty() && self.removes.is_empty()
    }
}

/// Compares what was applied with what is desired: new or different values are upserts,
/// keys no longer desired are removes.
pub fn plan<Key: Ord + Clone, V: PartialEq + Clone>(
    applied: &BTreeMap<Key, V>,
    desired: &BTreeMap<Key, V>,
) -> Plan<Key, V> {
    Plan {
        upserts: desired
            .iter()
            .filter(|(k, v)| applied.get(*k) != Some(*v))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        removes: applied.keys().filter(|k| !desired.contains_key(*k)).cloned().collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Namespace;

    fn ns(name: &str, rv: &str) -> Namespace {
        let mut n = Namespace::default();
        n.metadata.name = Some(name.into());
        n.metadata.resource_version = Some(rv.into());
        n
    }

    #[test]
    fn relist_replaces_the_store_at_once() {
        let mut m = Mirror::default();
        assert!(!m.synced());
        m.apply(Event::Init);
        m.apply(Event::InitApply(ns("a", "1")));
        m.apply(Event::InitApply(ns("b", "1")));
        assert!(m.is_empty(), "nothing visible before InitDone");
        assert!(m.apply(Event::InitDone));
        assert!(m.synced());
        assert_eq!(m.len(), 2);
        // A relist after 410 Gone: b is gone, c is new; until InitDone, the old state stays.
        m.apply(Event::Init);
        m.apply(Event::InitApply(ns("a", "5")));
        m.apply(Event::InitApply(ns("c", "5")));
        assert!(m.get("b").is_some());
        m.apply(Event::InitDone);
        assert!(m.get("b").is_none());
        assert_eq!(m.get("a").unwrap().metadata.resource_version.as_deref(), Some("5"));
        assert!(m.get("c").is_some());
        assert!(m.apply(Event::Delete(ns("c", "6"))));
        assert!(!m.apply(Event::Delete(ns("c", "6"))));
        assert!(m.apply(Event::Apply(ns("d", "7"))));
        assert_eq!(m.objects().count(), 2);
        // The resource is no longer served (its CRD was removed): empty, still listed.
        assert!(m.not_served());
        assert!(m.is_empty() && m.synced());
        assert!(!m.not_served());
    }

    #[test]
    fn plan_is_the_smallest_change() {
        let applied = BTreeMap::from([("a", 1), ("b", 2), ("c", 3)]);
        let desired = BTreeMap::from([("a", 1), ("b", 20), ("d", 4)]);
        let p = plan(&applied, &desired);
        assert_eq!(p.upserts, vec![("b", 20), ("d", 4)]);
        assert_eq!(p.removes, vec!["c"]);
        assert!(plan(&desired, &desired).is_empty());
    }
}
