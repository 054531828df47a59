//! Read-only views of what the kernel holds, for the operator surface (`palisade ipcache
//! list`, `palisade bpf policy get`, `/metrics`): each call opens the maps pinned under the
//! agent's bpffs directory and reads them back, independently of the map writer (which
//! stays their only writer). What these functions return is what the datapath sees, not
//! what the agent wants it to see.
//!
//! Every call does blocking map syscalls: run it off the actor thread
//! (`tokio::task::spawn_blocking`).
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

use aya::maps::{HashMap, LpmTrie, Map, MapData, MapInfo, PerCpuArray};
use palisade_common::{
    COUNTER_SLOTS, Counter, CtKey, CtValue, EndpointInfo, FragKey, FragValue, IpcacheValue, Ipv4Prefix, Ipv6Prefix,
    PolicyKey, PolicyLengthsKey, PolicyValue, map_names, policy_length_bit,
};

/// Why the pinned maps cannot be read.
#[derive(Debug, thiserror::Error)]
#[error("reading the pinned map {map} under {dir}: {source}")]
pub struct KernelReadError {
    pub map: &'static str,
    pub dir: String,
    #[source]
    pub source: aya::maps::MapError,
}

fn open(dir: &Path, name: &'static str) -> Result<Map, KernelReadError> {
    let err = |source| KernelReadError { map: name, dir: dir.display().to_string(), source };
    let data = MapData::from_pin(dir.join(name)).map_err(err)?;
    Map::from_map_data(data).map_err(err)
}

fn typed<T: TryFrom<Map, Error = aya::maps::MapError>>(dir: &Path, name: &'static str) -> Result<T, KernelReadError> {
    T::try_from(open(dir, name)?).map_err(|source| KernelReadError {
        map: name,
        dir: dir.display().to_string(),
        source,
    })
}

/// One ipcache entry as loaded: the prefix and its identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpcacheRow {
    pub addr: IpAddr,
    pub prefix_len: u8,
    pub identity: u32,
}

/// Every entry of the four ipcache maps (host entries and LPM tries), sorted by prefix.
pub fn ipcache(dir: &Path) -> Result<Vec<IpcacheRow>, KernelReadError> {
    let mut out = Vec::new();
    let host4: HashMap<MapData, Ipv4Prefix, IpcacheValue> = typed(dir, map_names::IPCACHE_HOST_V4)?;
    for (k, v) in host4.iter().filter_map(Result::ok) {
        out.push(IpcacheRow { addr: IpAddr::V4(Ipv4Addr::from(k.addr)), prefix_len: 32, identity: v.identity });
    }
    let host6: HashMap<MapData, Ipv6Prefix, IpcacheValue> = typed(dir, map_names::IPCACHE_HOST_V6)?;
    for (k, v) in host6.iter().filter_map(Result::ok) {
        out.push(IpcacheRow { addr: IpAddr::V6(Ipv6Addr::from(k.addr)), prefix_len: 128, identity: v.identity });
    }
    let trie4: LpmTrie<MapData, Ipv4Prefix, IpcacheValue> = typed(dir, map_names::IPCACHE_V4)?;
    for (k, v) in trie4.iter().filter_map(Result::ok) {
        out.push(IpcacheRow {
            addr: IpAddr::V4(Ipv4Addr::from(k.data().addr)),
            prefix_len: k.prefix_len() as u8,
            identity: v.identity,
        });
    }
    let trie6: LpmTrie<MapData, Ipv6Prefix, IpcacheValue> = typed(dir, map_names::IPCACHE_V6)?;
    for (k, v) in trie6.iter().filter_map(Result::ok) {
        out.push(IpcacheRow {
            addr: IpAddr::V6(Ipv6Addr::from(k.data().addr)),
            prefix_len: k.prefix_len() as u8,
            identity: v.identity,
        });
    }
    out.sort_by_key(|r| (r.addr, r.prefix_len));
    Ok(out)
}

/// One POLICY entry as loaded, with whether POLICY_LENGTHS makes the datapath probe it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolicyRow {
    /// The key as stored (cut to its prefix; `key.prefix_len` is the length).
    pub key: PolicyKey,
    pub value: PolicyValue,
    /// False when POLICY_LENGTHS does not mark this entry's length for its (endpoint,
    /// direction, identity): the datapath would never find it.
    pub probed: bool,
}

/// The ENDPOINTS entry of endpoint `endpoint_id` (by host-side ifindex), if it is loaded.
pub fn endpoint(dir: &Path, endpoint_id: u16) -> Result<Option<(u32, EndpointInfo)>, KernelReadError> {
    let eps: HashMap<MapData, u32, EndpointInfo> = typed(dir, map_names::ENDPOINTS)?;
    Ok(eps.iter().filter_map(Result::ok).find(|(_, v)| v.endpoint_id == u32::from(endpoint_id)))
}

/// Every POLICY entry of endpoint `endpoint_id`, sorted (direction, identity, protocol,
/// port, length).
pub fn policy_of(dir: &Path, endpoint_id: u16) -> Result<Vec<PolicyRow>, KernelReadError> {
    let policy: HashMap<MapData, PolicyKey, PolicyValue> = typed(dir, map_names::POLICY)?;
    let lengths: HashMap<MapData, PolicyLengthsKey, u32> = typed(dir, map_names::POLICY_LENGTHS)?;
    let mut out: Vec<PolicyRow> = policy
        .iter()
        .filter_map(Result::ok)
        .filter(|(k, _)| k.endpoint_id() == endpoint_id)
        .map(|(key, value)| {
            let bits = lengths.get(&key.lengths_key(), 0).unwrap_or(0);
            let probed = (64..=88).contains(&u32::from(key.prefix_len))
                && bits & policy_length_bit(u32::from(key.prefix_len)) != 0;
            PolicyRow { key, value, probed }
        })
        .collect();
    out.sort_by_key(|r| (r.key.direction, r.key.identity(), r.key.protocol, r.key.dport(), r.key.prefix_len));
    Ok(out)
}

/// The COUNTERS array summed over CPUs: (reason, direction, packets and bytes) for every
/// slot, zero ones included.
pub fn counters(dir: &Path) -> Result<Vec<(u8, u8, Counter)>, KernelReadError> {
    let arr: PerCpuArray<MapData, Counter> = typed(dir, map_names::COUNTERS)?;
    let mut out = Vec::with_capacity(COUNTER_SLOTS as usize);
    for i in 0..COUNTER_SLOTS {
        let per_cpu = arr.get(&i, 0).map_err(|source| KernelReadError {
            map: map_names::COUNTERS,
            dir: dir.display().to_string(),
            source,
        })?;
        let mut total = Counter::default();
        for c in per_cpu.iter() {
            total.packets += c.packets;
            total.bytes += c.bytes;
        }
        out.push(((i / 2) as u8, (i % 2) as u8, total));
    }
    Ok(out)
}

/// How full a map is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapFill {
    pub name: &'static str,
    pub entries: u64,
    pub max_entries: u32,
}

/// Maps whose fill is worth watching: every hash, LRU and LPM map of the datapath.
pub const PRESSURE_MAPS: [&str; 9] = [
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

/// Counts the keys of every map of [`PRESSURE_MAPS`] (one syscall per key) and reads its
/// size. A map that cannot be opened is left out.
pub fn map_fill(dir: &Path) -> Vec<MapFill> {
    fn hash<K: aya::Pod, V: aya::Pod>(dir: &Path, name: &'static str) -> Option<u64> {
        let m: HashMap<MapData, K, V> = typed(dir, name).ok()?;
        Some(m.keys().filter(Result::is_ok).count() as u64)
    }
    fn trie<K: aya::Pod, V: aya::Pod>(dir: &Path, name: &'static str) -> Option<u64> {
        let m: LpmTrie<MapData, K, V> = typed(dir, name).ok()?;
        Some(m.keys().filter(Result::is_ok).count() as u64)
    }
    let mut out = Vec::new();
    for name in PRESSURE_MAPS {
        let Ok(info) = MapInfo::from_pin(dir.join(name)) else { continue };
        let entries = match name {
            map_names::ENDPOINTS => hash::<u32, EndpointInfo>(dir, name),
            map_names::IPCACHE_V4 => trie::<Ipv4Prefix, IpcacheValue>(dir, name),
            map_names::IPCACHE_V6 => trie::<Ipv6Prefix, IpcacheValue>(dir, name),
            map_names::IPCACHE_HOST_V4 => hash::<Ipv4Prefix, IpcacheValue>(dir, name),
            map_names::IPCACHE_HOST_V6 => hash::<Ipv6Prefix, IpcacheValue>(dir, name),
            map_names::POLICY => hash::<PolicyKey, PolicyValue>(dir, name),
            map_names::POLICY_LENGTHS => hash::<PolicyLengthsKey, u32>(dir, name),
            map_names::CONNTRACK => hash::<CtKey, CtValue>(dir, name),
            map_names::FRAGMENTS => hash::<FragKey, FragValue>(dir, name),
            _ => None,
        };
        if let Some(entries) = entries {
            out.push(MapFill { name, entries, max_entries: info.max_entries() });
        }
    }
    out
}
