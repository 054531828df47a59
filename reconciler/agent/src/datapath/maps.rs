//! Typed handles on the datapath's maps ([`MapSet`]), counter totals, and the expected
//! layout of every map, used to refuse pinned maps left by an incompatible version.
use aya::maps::{Array, HashMap, LpmTrie, Map, MapData, MapType, PerCpuArray, lpm_trie::Key};
use palisade_common::{
    COUNTER_SLOTS, Counter, CtKey, CtValue, EndpointInfo, FragKey, FragValue, IpcacheValue, Ipv4Prefix, Ipv6Prefix,
    PolicyKey, PolicyLengthsKey, PolicyValue, config, counter_index, map_names, map_sizes, policy_length_bit, reason,
};

use super::DatapathError;

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
        })
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
