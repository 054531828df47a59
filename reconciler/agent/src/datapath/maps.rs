//! Typed handles on the datapath's maps ([`MapSet`], its writable maps generated from the
//! map table, `mapstate::table`), the kernel's [`MapBackend`] on their descriptors, counter
//! totals, the expected layout of every map (used to refuse pinned maps left by an
//! incompatible version) and the configurable map sizes ([`MapSizes`]).
use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;

use aya::Pod;
use aya::maps::{Array, HashMap, IterableMap, LpmTrie, Map, MapData, MapType, PerCpuArray};
use palisade_common::{
    COUNTER_SLOTS, Counter, CtKey, CtValue, FragKey, FragValue, PolicyKey, PolicyValue, config, counter_index,
    map_names, map_sizes, policy_length_bit, reason,
};

use super::sys::{self, PartialWrite};
use super::{DatapathError, MapBackend, WriteMode, bulk};
use crate::mapstate::WritableMap;
use crate::mapstate::table::{kernel_key, writable_maps};

/// The aya handle type of a table row's `kernel` column.
macro_rules! kernel_handle {
    (hash $k:ty, $v:ty) => { HashMap<MapData, $k, $v> };
    (lpm $p:ty, $v:ty) => { LpmTrie<MapData, $p, $v> };
}

/// The BPF map type of a table row's `kernel` column.
macro_rules! kernel_map_type {
    (hash) => {
        MapType::Hash
    };
    (lpm) => {
        MapType::LpmTrie
    };
}

macro_rules! define_map_set {
    ($(
        $(#[doc = $doc:literal])*
        $Variant:ident $field:ident $NAME:ident ($role:ident):
            $Key:ty => $Value:ty, kernel $kind:ident $Kernel:ty $(, narrowed in $narrow:ident)?;
    )*) => {
        /// The datapath's maps, typed: one field per [`WritableMap`], then the maps the
        /// datapath writes itself or that hold settings. The map writer is the only writer
        /// of the writable ones.
        pub struct MapSet {
            $( $(#[doc = $doc])* pub $field: kernel_handle!($kind $Kernel, $Value), )*
            /// An LRU hash in the kernel; aya's `HashMap` reads and writes it.
            pub conntrack: HashMap<MapData, CtKey, CtValue>,
            pub counters: PerCpuArray<MapData, Counter>,
            pub config: Array<MapData, u32>,
            /// How [`MapSet::upsert`] and [`MapSet::delete`] reach the kernel.
            write_mode: WriteMode,
            /// Maps whose batch commands the kernel refused: written one element at a time.
            no_batch: BTreeSet<WritableMap>,
        }

        impl MapSet {
            fn data(&self, map: WritableMap) -> &MapData {
                match map {
                    $(WritableMap::$Variant => self.$field.map(),)*
                }
            }

            pub(crate) fn from_maps(
                take: &mut dyn FnMut(&'static str) -> Option<Map>,
            ) -> Result<MapSet, DatapathError> {
                fn conv<T>(name: &'static str, map: Option<Map>) -> Result<T, DatapathError>
                where
                    T: TryFrom<Map, Error = aya::maps::MapError>,
                {
                    let map = map.ok_or(DatapathError::MapMissing { map: name })?;
                    T::try_from(map).map_err(|e| DatapathError::MapType { map: name, source: Box::new(e) })
                }
                Ok(MapSet {
                    $($field: conv(map_names::$NAME, take(map_names::$NAME))?,)*
                    conntrack: conv(map_names::CONNTRACK, take(map_names::CONNTRACK))?,
                    counters: conv(map_names::COUNTERS, take(map_names::COUNTERS))?,
                    config: conv(map_names::CONFIG, take(map_names::CONFIG))?,
                    write_mode: WriteMode::default(),
                    no_batch: BTreeSet::new(),
                })
            }
        }

        /// The layouts of the writable maps, in table order.
        const WRITABLE_SPECS: [MapSpec; WritableMap::COUNT] = [
            $(spec::<kernel_key!($kind $Kernel), $Value>(
                map_names::$NAME,
                kernel_map_type!($kind),
                map_sizes::$NAME,
            ),)*
        ];
    };
}

writable_maps!(define_map_set);

impl WritableMap {
    /// The layout the map must have for the programs of this build.
    pub(crate) fn spec(self) -> &'static MapSpec {
        &WRITABLE_SPECS[self as usize]
    }
}

/// Number of entries of every map whose size can be configured. Unlisted maps keep the
/// size the programs declare ([`palisade_common::map_sizes`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapSizes {
    sizes: BTreeMap<&'static str, u32>,
}

impl Default for MapSizes {
    fn default() -> Self {
        let sizes = MAP_SPECS.iter().filter(|s| RESIZABLE.contains(&s.name)).map(|s| (s.name, s.max_entries)).collect();
        MapSizes { sizes }
    }
}

/// Maps whose size can be configured (hash maps, LPM tries, LRU hashes): the writable maps,
/// conntrack and fragments.
pub const RESIZABLE: [&str; WritableMap::COUNT + 2] = {
    let mut out = [map_names::CONNTRACK; WritableMap::COUNT + 2];
    let mut i = 0;
    while i < WritableMap::COUNT {
        out[i] = WritableMap::ALL[i].name();
        i += 1;
    }
    out[WritableMap::COUNT + 1] = map_names::FRAGMENTS;
    out
};

impl MapSizes {
    /// The defaults with `overrides` applied: each `NAME=ENTRIES` (map name as in
    /// [`RESIZABLE`], case-insensitive; entries 1..=2^24).
    pub fn with_overrides<S: AsRef<str>>(overrides: &[S]) -> Result<MapSizes, String> {
        let mut out = MapSizes::default();
        for o in overrides {
            let o = o.as_ref().trim();
            if o.is_empty() {
                continue;
            }
            let (name, n) = o.split_once('=').ok_or_else(|| {
                format!("map size {o:?}: expected NAME=ENTRIES, e.g. POLICY=524288 (maps: {})", RESIZABLE.join(", "))
            })?;
            let name = name.trim().to_ascii_uppercase();
            let key = RESIZABLE
                .iter()
                .find(|r| **r == name)
                .ok_or_else(|| format!("map size {o:?}: no resizable map {name} (maps: {})", RESIZABLE.join(", ")))?;
            let n: u32 = n.trim().parse().map_err(|_| format!("map size {o:?}: {:?} is not a number", n.trim()))?;
            if !(1..=1 << 24).contains(&n) {
                return Err(format!("map size {o:?}: entries must be between 1 and 16777216"));
            }
            out.sizes.insert(key, n);
        }
        Ok(out)
    }

    /// Entries of map `name` (its declared size when it is not resizable).
    pub fn get(&self, name: &str) -> u32 {
        self.sizes
            .get(name)
            .copied()
            .or_else(|| MAP_SPECS.iter().find(|s| s.name == name).map(|s| s.max_entries))
            .unwrap_or(0)
    }

    /// Sets the entries of a resizable map (ignored for other maps).
    pub fn set(&mut self, name: &str, entries: u32) {
        if let Some(k) = RESIZABLE.iter().find(|r| **r == name) {
            self.sizes.insert(k, entries);
        }
    }

    /// `(name, entries)` of every resizable map.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, u32)> + '_ {
        self.sizes.iter().map(|(k, v)| (*k, *v))
    }
}

/// How full the map pinned at `path` is, whatever its type: its number of keys (one
/// `BPF_MAP_GET_NEXT_KEY` per key) and its `max_entries`; `None` when it cannot be opened.
pub fn pinned_map_fill(path: &Path) -> Option<(u64, u32)> {
    let data = MapData::from_pin(path).ok()?;
    let info = data.info().ok()?;
    let fd = data.fd().as_fd();
    let (mut key, mut next) = (vec![0u8; info.key_size() as usize], vec![0u8; info.key_size() as usize]);
    let mut keys = 0u64;
    // A failing call ends the count, as the end of the keys does.
    while matches!(sys::map_get_next_key(fd, (keys > 0).then_some(&key[..]), &mut next), Ok(true)) {
        keys += 1;
        std::mem::swap(&mut key, &mut next);
    }
    Some((keys, info.max_entries()))
}

/// Counters summed over all CPUs, one per (reason, direction).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CounterTotals {
    slots: Vec<Counter>,
}

impl CounterTotals {
    /// Packets and bytes for `reason` in `direction` (from the pod's point of view).
    pub fn get(&self, reason: u8, direction: u8) -> Counter {
        self.slots.get(counter_index(reason, direction) as usize).copied().unwrap_or_default()
    }

    /// Every non-zero (reason, direction, counter).
    pub fn nonzero(&self) -> impl Iterator<Item = (u8, u8, Counter)> + '_ {
        self.slots.iter().enumerate().filter(|(_, c)| c.packets != 0 || c.bytes != 0).map(|(i, c)| {
            let (r, d) = ((i / 2) as u8, (i % 2) as u8);
            (r, d, *c)
        })
    }

    /// Packets dropped, all reasons and directions.
    pub fn dropped_packets(&self) -> u64 {
        self.nonzero().filter(|(r, _, _)| reason::is_drop(*r)).map(|(_, _, c)| c.packets).sum()
    }
}

impl MapSet {
    /// Opens the maps pinned under `pin_dir` (by a running or stopped agent), for tools and
    /// tests that look at or tamper with what the agent wrote.
    pub fn open_pinned(pin_dir: &Path) -> Result<MapSet, DatapathError> {
        MapSet::from_maps(&mut |name| {
            let data = MapData::from_pin(pin_dir.join(name)).ok()?;
            let ty = data.info().ok()?.map_type().ok()?;
            Some(match ty {
                MapType::Hash => Map::HashMap(data),
                MapType::LruHash => Map::LruHashMap(data),
                MapType::LpmTrie => Map::LpmTrie(data),
                MapType::PerCpuArray => Map::PerCpuArray(data),
                MapType::Array => Map::Array(data),
                _ => return None,
            })
        })
    }

    /// How bulk writes reach the kernel (batched by default).
    pub fn set_write_mode(&mut self, mode: WriteMode) {
        self.write_mode = mode;
    }

    /// Maps whose batch commands the kernel refused (written one element at a time).
    pub fn unbatched_maps(&self) -> Vec<&'static str> {
        self.no_batch.iter().map(|m| m.name()).collect()
    }

    fn fd(&self, map: WritableMap) -> BorrowedFd<'_> {
        self.data(map).fd().as_fd()
    }

    /// The kernel's `max_entries` of `map`.
    pub fn max_entries(&self, map: WritableMap) -> Result<u32, DatapathError> {
        let info = self.data(map).info().map_err(|e| DatapathError::map_access(map.name(), "read the size of", e))?;
        Ok(info.max_entries())
    }

    /// Writes (adds or replaces) `entries` into `map`: in batches when the mode and the
    /// kernel allow, else one at a time ([`bulk::upsert`]). `K` and `V` must be the map's key
    /// and value types (for the LPM tries, `Key<prefix>`). On error, the entries before the
    /// failing one are written.
    pub fn upsert<K: Pod, V: Pod>(&mut self, map: WritableMap, entries: &[(K, V)]) -> Result<(), DatapathError> {
        bulk::upsert(self, map, entries)
    }

    /// Deletes `keys` from `map` (keys already gone are fine): in batches when the mode and
    /// the kernel allow, else one at a time.
    pub fn delete<K: Pod>(&mut self, map: WritableMap, keys: &[K]) -> Result<(), DatapathError> {
        bulk::delete(self, map, keys)
    }

    /// Every entry of hash map `map`, read in batches (`BPF_MAP_LOOKUP_BATCH`); `None` when
    /// the kernel has no batch lookup for it (read it entry by entry then).
    pub fn read_batched<K: Pod, V: Pod>(&self, map: WritableMap) -> Result<Option<Vec<(K, V)>>, DatapathError> {
        bulk::read_batched(self, map)
    }

    /// Sums the per-CPU counters.
    pub fn sum_counters(&self) -> Result<CounterTotals, DatapathError> {
        let mut slots = vec![Counter::default(); COUNTER_SLOTS as usize];
        for (i, slot) in slots.iter_mut().enumerate() {
            let per_cpu = self
                .counters
                .get(&(i as u32), 0)
                .map_err(|e| DatapathError::map_access(map_names::COUNTERS, "read", e))?;
            for c in per_cpu.iter() {
                slot.packets += c.packets;
                slot.bytes += c.bytes;
            }
        }
        Ok(CounterTotals { slots })
    }

    /// Turns the events for newly allowed flows on or off (drops are always reported).
    pub fn set_allow_events(&mut self, on: bool) -> Result<(), DatapathError> {
        let mut flags =
            self.config.get(&config::FLAGS, 0).map_err(|e| DatapathError::map_access(map_names::CONFIG, "read", e))?;
        if on {
            flags |= config::FLAG_EMIT_ALLOW_EVENTS;
        } else {
            flags &= !config::FLAG_EMIT_ALLOW_EVENTS;
        }
        self.config.set(config::FLAGS, flags, 0).map_err(|e| DatapathError::map_access(map_names::CONFIG, "write", e))
    }

    /// Moves the policy generation (`config::POLICY_GEN`) on, after a change of ENDPOINTS,
    /// POLICY, `POLICY_LENGTHS` or the ipcache: the next forward packet of every established
    /// flow is checked against policy in full again instead of by its conntrack entry's
    /// remembered verdict. Never returns to 0 (which means "no generation").
    pub fn bump_policy_generation(&mut self) -> Result<u32, DatapathError> {
        let g = self
            .config
            .get(&config::POLICY_GEN, 0)
            .map_err(|e| DatapathError::map_access(map_names::CONFIG, "read", e))?;
        let next = match g.wrapping_add(1) {
            0 => 1,
            n => n,
        };
        self.config
            .set(config::POLICY_GEN, next, 0)
            .map_err(|e| DatapathError::map_access(map_names::CONFIG, "write", e))?;
        Ok(next)
    }

    /// Adds (or replaces) the policy entry `key` of prefix length `prefix_len` (64..=88) and
    /// marks that length in `POLICY_LENGTHS`, in that order, so the datapath never probes for
    /// an entry before it is there, then moves the policy generation on. For tests and tools:
    /// the map writer applies whole plans (which also clear lengths no entry uses any more).
    pub fn insert_policy(&mut self, prefix_len: u32, key: PolicyKey, value: PolicyValue) -> Result<(), DatapathError> {
        self.policy
            .insert(key.at_prefix(prefix_len), value, 0)
            .map_err(|e| DatapathError::map_access(map_names::POLICY, "write", e))?;
        let lk = key.lengths_key();
        let bits = match self.policy_lengths.get(&lk, 0) {
            Ok(b) => b,
            Err(aya::maps::MapError::KeyNotFound) => 0,
            Err(e) => return Err(DatapathError::map_access(map_names::POLICY_LENGTHS, "read", e)),
        };
        self.policy_lengths
            .insert(lk, bits | policy_length_bit(prefix_len), 0)
            .map_err(|e| DatapathError::map_access(map_names::POLICY_LENGTHS, "write", e))?;
        self.bump_policy_generation().map(|_| ())
    }

    /// Removes the policy entry `key` of prefix length `prefix_len`. Its length stays marked
    /// (a marked length without entries costs the datapath one lookup, nothing else), then
    /// moves the policy generation on.
    pub fn remove_policy(&mut self, prefix_len: u32, key: PolicyKey) -> Result<(), DatapathError> {
        self.policy
            .remove(&key.at_prefix(prefix_len))
            .map_err(|e| DatapathError::map_access(map_names::POLICY, "delete", e))?;
        self.bump_policy_generation().map(|_| ())
    }

    /// Removes every conntrack entry (replies of existing flows then need policy again).
    pub fn flush_conntrack(&mut self) -> Result<usize, DatapathError> {
        let keys: Vec<CtKey> = self.conntrack.keys().filter_map(Result::ok).collect();
        let mut removed = 0;
        for k in &keys {
            match self.conntrack.remove(k) {
                Ok(()) => removed += 1,
                Err(aya::maps::MapError::KeyNotFound | aya::maps::MapError::ElementNotFound) => {}
                Err(e) => return Err(DatapathError::map_access(map_names::CONNTRACK, "delete", e)),
            }
        }
        Ok(removed)
    }
}

/// The layout a map must have for the programs of this build.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct MapSpec {
    pub name: &'static str,
    pub map_type: MapType,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
}

impl std::fmt::Display for MapSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "type {:?}, key {} B, value {} B, {} entries",
            self.map_type, self.key_size, self.value_size, self.max_entries
        )
    }
}

const fn spec<K, V>(name: &'static str, map_type: MapType, max_entries: u32) -> MapSpec {
    MapSpec { name, map_type, key_size: size_of::<K>() as u32, value_size: size_of::<V>() as u32, max_entries }
}

/// The maps of the object that the agent does not write.
const OTHER_SPECS: [MapSpec; 5] = [
    spec::<CtKey, CtValue>(map_names::CONNTRACK, MapType::LruHash, map_sizes::CONNTRACK),
    MapSpec {
        name: map_names::EVENTS,
        map_type: MapType::RingBuf,
        key_size: 0,
        value_size: 0,
        max_entries: map_sizes::EVENTS_BYTES,
    },
    spec::<u32, Counter>(map_names::COUNTERS, MapType::PerCpuArray, COUNTER_SLOTS),
    spec::<u32, u32>(map_names::CONFIG, MapType::Array, config::SLOTS),
    spec::<FragKey, FragValue>(map_names::FRAGMENTS, MapType::LruHash, map_sizes::FRAGMENTS),
];

/// Every map of the object, as the programs declare it: the writable maps, then the rest.
pub(crate) const MAP_SPECS: [MapSpec; WritableMap::COUNT + OTHER_SPECS.len()] = {
    let mut out = [OTHER_SPECS[0]; WritableMap::COUNT + OTHER_SPECS.len()];
    let mut i = 0;
    while i < out.len() {
        out[i] = if i < WritableMap::COUNT { WRITABLE_SPECS[i] } else { OTHER_SPECS[i - WritableMap::COUNT] };
        i += 1;
    }
    out
};

/// The name of every map of the object (and of its pin), in [`MAP_SPECS`] order.
pub const MAP_NAMES: [&str; MAP_SPECS.len()] = {
    let mut out = [""; MAP_SPECS.len()];
    let mut i = 0;
    while i < out.len() {
        out[i] = MAP_SPECS[i].name;
        i += 1;
    }
    out
};

/// The pinned kernel maps: each command is one bpf(2) call on the map's descriptor.
impl MapBackend for MapSet {
    fn max_entries(&self, map: WritableMap) -> Result<u32, DatapathError> {
        MapSet::max_entries(self, map)
    }
    fn update_batch(&mut self, map: WritableMap, keys: &[u8], values: &[u8], count: usize) -> Result<(), PartialWrite> {
        sys::map_update_batch(self.fd(map), keys, values, count, 0)
    }
    fn delete_batch(&mut self, map: WritableMap, keys: &[u8], count: usize) -> Result<(), PartialWrite> {
        sys::map_delete_batch(self.fd(map), keys, count)
    }
    fn lookup_batch(
        &self,
        map: WritableMap,
        token: &mut Option<u64>,
        keys: &mut [u8],
        values: &mut [u8],
        count: usize,
    ) -> io::Result<(usize, bool)> {
        sys::map_lookup_batch(self.fd(map), token, keys, values, count)
    }
    fn update_elem(&mut self, map: WritableMap, key: &[u8], value: &[u8]) -> io::Result<()> {
        sys::map_update_elem(self.fd(map), key, value, 0)
    }
    fn delete_elem(&mut self, map: WritableMap, key: &[u8]) -> io::Result<()> {
        sys::map_delete_elem(self.fd(map), key)
    }
    fn lookup_elem(&self, map: WritableMap, key: &[u8], value: &mut [u8]) -> io::Result<bool> {
        sys::map_lookup_elem(self.fd(map), key, value)
    }
    fn next_key(&self, map: WritableMap, key: Option<&[u8]>, next: &mut [u8]) -> io::Result<bool> {
        sys::map_get_next_key(self.fd(map), key, next)
    }
    fn bump_policy_generation(&mut self) -> Result<u32, DatapathError> {
        MapSet::bump_policy_generation(self)
    }
    fn write_mode(&self) -> WriteMode {
        self.write_mode
    }
    fn batch_refused(&self, map: WritableMap) -> bool {
        self.no_batch.contains(&map)
    }
    fn refuse_batch(&mut self, map: WritableMap) {
        self.no_batch.insert(map);
    }
}
