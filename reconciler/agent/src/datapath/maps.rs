//! Typed handles on the datapath's maps ([`MapSet`]), counter totals, the expected
//! layout of every map (used to refuse pinned maps left by an incompatible version), the
//! configurable map sizes ([`MapSizes`]), and the map writer's bulk writes: batched where
//! the kernel supports it for the map ([`WriteMode`]), one element at a time otherwise.
use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::AsFd;
use std::path::Path;

use aya::Pod;
use aya::maps::{Array, HashMap, IterableMap, LpmTrie, Map, MapData, MapType, PerCpuArray, lpm_trie::Key};
use palisade_common::{
    COUNTER_SLOTS, Counter, CtKey, CtValue, EndpointInfo, FragKey, FragValue, IpcacheValue, Ipv4Prefix, Ipv6Prefix,
    PolicyKey, PolicyLengthsKey, PolicyValue, config, counter_index, map_names, map_sizes, policy_length_bit, reason,
};

use super::{DatapathError, sys};

/// The datapath's maps, typed. The map writer is their only writer.
pub struct MapSet {
    /// Host-side interface index -> endpoint.
    pub endpoints: HashMap<MapData, u32, EndpointInfo>,
    /// Prefixes shorter than /32 (the datapath looks host entries up first, in
    /// `ipcache_host_v4`; a /32 here still works, behind the host entry).
    pub ipcache_v4: LpmTrie<MapData, Ipv4Prefix, IpcacheValue>,
    /// Prefixes shorter than /128.
    pub ipcache_v6: LpmTrie<MapData, Ipv6Prefix, IpcacheValue>,
    /// Host entries: /32 addresses.
    pub ipcache_host_v4: HashMap<MapData, Ipv4Prefix, IpcacheValue>,
    /// Host entries: /128 addresses.
    pub ipcache_host_v6: HashMap<MapData, Ipv6Prefix, IpcacheValue>,
    /// Keys cut to their prefix length ([`PolicyKey::at_prefix`]); see
    /// [`MapSet::insert_policy`].
    pub policy: HashMap<MapData, PolicyKey, PolicyValue>,
    /// (endpoint, direction, identity) -> bitmap of the prefix lengths `policy` holds for it.
    pub policy_lengths: HashMap<MapData, PolicyLengthsKey, u32>,
    /// An LRU hash in the kernel; aya's `HashMap` reads and writes it.
    pub conntrack: HashMap<MapData, CtKey, CtValue>,
    pub counters: PerCpuArray<MapData, Counter>,
    pub config: Array<MapData, u32>,
    /// How [`MapSet::upsert`] and [`MapSet::delete`] reach the kernel.
    write_mode: WriteMode,
    /// Maps whose batch commands the kernel refused: written one element at a time.
    no_batch: BTreeSet<&'static str>,
}

/// How bulk writes reach the kernel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WriteMode {
    /// BPF_MAP_UPDATE_BATCH / BPF_MAP_DELETE_BATCH, falling back to one element at a time
    /// for maps (or kernels) that do not support them.
    #[default]
    Batched,
    /// One BPF_MAP_UPDATE_ELEM / BPF_MAP_DELETE_ELEM per element.
    PerEntry,
}

/// The maps the map writer writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum WritableMap {
    Endpoints,
    IpcacheV4,
    IpcacheV6,
    IpcacheHostV4,
    IpcacheHostV6,
    Policy,
    PolicyLengths,
}

impl WritableMap {
    pub const ALL: [WritableMap; 7] = [
        WritableMap::Endpoints,
        WritableMap::IpcacheV4,
        WritableMap::IpcacheV6,
        WritableMap::IpcacheHostV4,
        WritableMap::IpcacheHostV6,
        WritableMap::Policy,
        WritableMap::PolicyLengths,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            WritableMap::Endpoints => map_names::ENDPOINTS,
            WritableMap::IpcacheV4 => map_names::IPCACHE_V4,
            WritableMap::IpcacheV6 => map_names::IPCACHE_V6,
            WritableMap::IpcacheHostV4 => map_names::IPCACHE_HOST_V4,
            WritableMap::IpcacheHostV6 => map_names::IPCACHE_HOST_V6,
            WritableMap::Policy => map_names::POLICY,
            WritableMap::PolicyLengths => map_names::POLICY_LENGTHS,
        }
    }

    fn spec(self) -> &'static MapSpec {
        MAP_SPECS.iter().find(|s| s.name == self.name()).expect("every writable map has a spec")
    }
}

/// Elements per batch call: bounds the buffers and the time the kernel spends per call.
const BATCH: usize = 4096;

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

/// Maps whose size can be configured (hash maps, LPM tries, LRU hashes).
pub const RESIZABLE: [&str; 9] = [
    map_names::ENDPOINTS,
    map_names::IPCACHE_V4,
    map_names::IPCACHE_V6,
    map_names::IPCACHE_HOST_V4,
    map_names::IPCACHE_HOST_V6,
    map_names::POLICY,
    map_names::POLICY_LENGTHS,
    map_names::CONNTRACK,
    map_names::FRAGMENTS,
];

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
        self.no_batch.iter().copied().collect()
    }

    fn data(&self, map: WritableMap) -> &MapData {
        match map {
            WritableMap::Endpoints => self.endpoints.map(),
            WritableMap::IpcacheV4 => self.ipcache_v4.map(),
            WritableMap::IpcacheV6 => self.ipcache_v6.map(),
            WritableMap::IpcacheHostV4 => self.ipcache_host_v4.map(),
            WritableMap::IpcacheHostV6 => self.ipcache_host_v6.map(),
            WritableMap::Policy => self.policy.map(),
            WritableMap::PolicyLengths => self.policy_lengths.map(),
        }
    }

    /// The kernel's `max_entries` of `map`.
    pub fn max_entries(&self, map: WritableMap) -> Result<u32, DatapathError> {
        let info = self.data(map).info().map_err(|e| DatapathError::map_access(map.name(), "read the size of", e))?;
        Ok(info.max_entries())
    }

    /// Writes (adds or replaces) `entries` into `map`: in batches when the mode and the
    /// kernel allow, else one at a time. `K` and `V` must be the map's key and value types
    /// (for the LPM tries, `Key<prefix>`). On error, the entries before the failing one are
    /// written.
    pub fn upsert<K: Pod, V: Pod>(&mut self, map: WritableMap, entries: &[(K, V)]) -> Result<(), DatapathError> {
        check_layout::<K>(map, size_of::<V>())?;
        if entries.is_empty() {
            return Ok(());
        }
        let name = map.name();
        let batched = self.write_mode == WriteMode::Batched && !self.no_batch.contains(name);
        let fd = self.data(map).fd().as_fd();
        let mut start = 0;
        if batched {
            while start < entries.len() {
                let chunk = &entries[start..(start + BATCH).min(entries.len())];
                let keys: Vec<K> = chunk.iter().map(|(k, _)| *k).collect();
                let values: Vec<V> = chunk.iter().map(|(_, v)| *v).collect();
                match sys::map_update_batch(fd, bytes_of(&keys), bytes_of(&values), chunk.len(), 0) {
                    Ok(()) => start += chunk.len(),
                    Err(p) if p.done == 0 && start == 0 && sys::batch_unsupported(&p.error) => {
                        tracing::debug!(map = name, error = %p.error, "no batch updates for this map; writing one entry at a time");
                        self.no_batch.insert(name);
                        break;
                    }
                    Err(p) => return Err(write_error(map, "update", start + p.done, entries.len(), p.error)),
                }
            }
            if start == entries.len() {
                return Ok(());
            }
        }
        let fd = self.data(map).fd().as_fd();
        for (i, (k, v)) in entries.iter().enumerate().skip(start) {
            sys::map_update_elem(fd, bytes_of(std::slice::from_ref(k)), bytes_of(std::slice::from_ref(v)), 0)
                .map_err(|e| write_error(map, "update", i, entries.len(), e))?;
        }
        Ok(())
    }

    /// Deletes `keys` from `map` (keys already gone are fine): in batches when the mode and
    /// the kernel allow, else one at a time.
    pub fn delete<K: Pod>(&mut self, map: WritableMap, keys: &[K]) -> Result<(), DatapathError> {
        check_layout::<K>(map, map.spec().value_size as usize)?;
        if keys.is_empty() {
            return Ok(());
        }
        let name = map.name();
        let batched = self.write_mode == WriteMode::Batched && !self.no_batch.contains(name);
        let fd = self.data(map).fd().as_fd();
        let mut start = 0;
        if batched {
            while start < keys.len() {
                let chunk = &keys[start..(start + BATCH).min(keys.len())];
                match sys::map_delete_batch(fd, bytes_of(chunk), chunk.len()) {
                    Ok(()) => start += chunk.len(),
                    // A key that is not there: skip it and go on after it.
                    Err(p) if p.error.raw_os_error() == Some(libc::ENOENT) => start += p.done + 1,
                    Err(p) if p.done == 0 && start == 0 && sys::batch_unsupported(&p.error) => {
                        tracing::debug!(map = name, error = %p.error, "no batch deletes for this map; deleting one entry at a time");
                        self.no_batch.insert(name);
                        break;
                    }
                    Err(p) => return Err(write_error(map, "delete", start + p.done, keys.len(), p.error)),
                }
            }
            if start >= keys.len() {
                return Ok(());
            }
        }
        let fd = self.data(map).fd().as_fd();
        for (i, k) in keys.iter().enumerate().skip(start) {
            match sys::map_delete_elem(fd, bytes_of(std::slice::from_ref(k))) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(write_error(map, "delete", i, keys.len(), e)),
            }
        }
        Ok(())
    }

    /// Every entry of hash map `map`, read in batches (BPF_MAP_LOOKUP_BATCH); `None` when
    /// the kernel has no batch lookup for it (read it entry by entry then).
    pub fn read_batched<K: Pod, V: Pod>(&self, map: WritableMap) -> Result<Option<Vec<(K, V)>>, DatapathError> {
        check_layout::<K>(map, size_of::<V>())?;
        if self.write_mode != WriteMode::Batched {
            return Ok(None);
        }
        let fd = self.data(map).fd().as_fd();
        let (ks, vs) = (size_of::<K>(), size_of::<V>());
        let mut keys = vec![0u8; BATCH * ks];
        let mut values = vec![0u8; BATCH * vs];
        let mut token = None;
        let mut out = Vec::new();
        loop {
            match sys::map_lookup_batch(fd, &mut token, &mut keys, &mut values, BATCH) {
                Ok((n, done)) => {
                    for i in 0..n {
                        // SAFETY: the kernel wrote `n` keys and values of these sizes; `K` and
                        // `V` are plain data, read unaligned from the byte buffers.
                        let (k, v) = unsafe {
                            (
                                std::ptr::read_unaligned(keys.as_ptr().add(i * ks).cast::<K>()),
                                std::ptr::read_unaligned(values.as_ptr().add(i * vs).cast::<V>()),
                            )
                        };
                        out.push((k, v));
                    }
                    if done {
                        return Ok(Some(out));
                    }
                }
                Err(e) if out.is_empty() && token.is_none() && sys::batch_unsupported(&e) => return Ok(None),
                Err(e) => {
                    return Err(DatapathError::MapWrite {
                        map: map.name(),
                        op: "batch read",
                        done: out.len(),
                        total: 0,
                        source: e,
                    });
                }
            }
        }
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
    /// POLICY, POLICY_LENGTHS or the ipcache: the next forward packet of every established
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
    /// marks that length in POLICY_LENGTHS, in that order, so the datapath never probes for
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

    pub(crate) fn from_maps(take: &mut dyn FnMut(&'static str) -> Option<Map>) -> Result<MapSet, DatapathError> {
        fn conv<T>(name: &'static str, map: Option<Map>) -> Result<T, DatapathError>
        where
            T: TryFrom<Map, Error = aya::maps::MapError>,
        {
            let map = map.ok_or(DatapathError::MapMissing { map: name })?;
            T::try_from(map).map_err(|e| DatapathError::MapType { map: name, source: Box::new(e) })
        }
        Ok(MapSet {
            endpoints: conv(map_names::ENDPOINTS, take(map_names::ENDPOINTS))?,
            ipcache_v4: conv(map_names::IPCACHE_V4, take(map_names::IPCACHE_V4))?,
            ipcache_v6: conv(map_names::IPCACHE_V6, take(map_names::IPCACHE_V6))?,
            ipcache_host_v4: conv(map_names::IPCACHE_HOST_V4, take(map_names::IPCACHE_HOST_V4))?,
            ipcache_host_v6: conv(map_names::IPCACHE_HOST_V6, take(map_names::IPCACHE_HOST_V6))?,
            policy: conv(map_names::POLICY, take(map_names::POLICY))?,
            policy_lengths: conv(map_names::POLICY_LENGTHS, take(map_names::POLICY_LENGTHS))?,
            conntrack: conv(map_names::CONNTRACK, take(map_names::CONNTRACK))?,
            counters: conv(map_names::COUNTERS, take(map_names::COUNTERS))?,
            config: conv(map_names::CONFIG, take(map_names::CONFIG))?,
            write_mode: WriteMode::default(),
            no_batch: BTreeSet::new(),
        })
    }
}

fn check_layout<K>(map: WritableMap, value_size: usize) -> Result<(), DatapathError> {
    let spec = map.spec();
    if size_of::<K>() != spec.key_size as usize || value_size != spec.value_size as usize {
        return Err(DatapathError::MapWrite {
            map: map.name(),
            op: "write",
            done: 0,
            total: 0,
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "key/value of {} and {} bytes, the map has {} and {}",
                    size_of::<K>(),
                    value_size,
                    spec.key_size,
                    spec.value_size
                ),
            ),
        });
    }
    Ok(())
}

fn write_error(map: WritableMap, op: &'static str, done: usize, total: usize, source: std::io::Error) -> DatapathError {
    if op == "update" && sys::map_full(&source) {
        return DatapathError::MapFull { map: map.name(), done, total, source };
    }
    DatapathError::MapWrite { map: map.name(), op, done, total, source }
}

/// The bytes of a slice of plain-data values, as the kernel reads them.
fn bytes_of<T: Pod>(v: &[T]) -> &[u8] {
    // SAFETY: `T: Pod` is plain data (`#[repr(C)]`, explicit padding, no pointers), so its
    // bytes may be read; the length covers exactly the slice.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
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

/// Every map of the object, as the programs declare it.
pub(crate) const MAP_SPECS: [MapSpec; 12] = [
    spec::<u32, EndpointInfo>(map_names::ENDPOINTS, MapType::Hash, map_sizes::ENDPOINTS),
    spec::<Key<Ipv4Prefix>, IpcacheValue>(map_names::IPCACHE_V4, MapType::LpmTrie, map_sizes::IPCACHE_V4),
    spec::<Key<Ipv6Prefix>, IpcacheValue>(map_names::IPCACHE_V6, MapType::LpmTrie, map_sizes::IPCACHE_V6),
    spec::<Ipv4Prefix, IpcacheValue>(map_names::IPCACHE_HOST_V4, MapType::Hash, map_sizes::IPCACHE_HOST_V4),
    spec::<Ipv6Prefix, IpcacheValue>(map_names::IPCACHE_HOST_V6, MapType::Hash, map_sizes::IPCACHE_HOST_V6),
    spec::<PolicyKey, PolicyValue>(map_names::POLICY, MapType::Hash, map_sizes::POLICY),
    spec::<PolicyLengthsKey, u32>(map_names::POLICY_LENGTHS, MapType::Hash, map_sizes::POLICY_LENGTHS),
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
