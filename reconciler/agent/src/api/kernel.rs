//! Read-only views of what the kernel holds, for the operator surface (`palisade ipcache
//! list`, `palisade bpf policy get`, `/metrics`): each call opens the maps pinned under the
//! agent's bpffs directory and reads them back, independently of the map writer (which
//! stays their only writer). What these functions return is what the datapath sees, not
//! what the agent wants it to see.
//!
//! Every call does blocking map syscalls: run it off the actor thread
//! (`tokio::task::spawn_blocking`).
use std::net::IpAddr;
use std::path::Path;

use aya::maps::{HashMap, Map, MapData, PerCpuArray};
use palisade_common::{
    COUNTER_SLOTS, Counter, EndpointInfo, PolicyKey, PolicyLengthsKey, PolicyValue, map_names, policy_length_bit,
};

use crate::datapath::{DatapathError, MapSet, RESIZABLE, WritableMap, pinned_map_fill, read_maps};

/// Why the pinned maps cannot be read.
#[derive(Debug, thiserror::Error)]
#[error("reading the pinned map {map} under {dir}: {source}")]
pub struct KernelReadError {
    pub map: &'static str,
    pub dir: String,
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

fn open(dir: &Path, name: &'static str) -> Result<Map, KernelReadError> {
    let err = |source| KernelReadError { map: name, dir: dir.display().to_string(), source: Box::new(source) };
    let data = MapData::from_pin(dir.join(name)).map_err(err)?;
    Map::from_map_data(data).map_err(err)
}

fn typed<T: TryFrom<Map, Error = aya::maps::MapError>>(dir: &Path, name: &'static str) -> Result<T, KernelReadError> {
    T::try_from(open(dir, name)?).map_err(|source| KernelReadError {
        map: name,
        dir: dir.display().to_string(),
        source: Box::new(source),
    })
}

/// One ipcache entry as loaded: the prefix and its identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpcacheRow {
    pub addr: IpAddr,
    pub prefix_len: u8,
    pub identity: u32,
}

/// Every entry of the ipcache maps (host entries and LPM tries), sorted by prefix.
pub fn ipcache(dir: &Path) -> Result<Vec<IpcacheRow>, KernelReadError> {
    let err = |source: DatapathError| KernelReadError {
        map: "IPCACHE_*",
        dir: dir.display().to_string(),
        source: Box::new(source),
    };
    let maps = MapSet::open_pinned(dir).map_err(err)?;
    let state = read_maps(&maps, WritableMap::ipcache()).map_err(err)?;
    let mut out: Vec<IpcacheRow> = state
        .ipcache_entries()
        .into_iter()
        .map(|((addr, prefix_len), identity)| IpcacheRow { addr, prefix_len, identity })
        .collect();
    out.sort_by_key(|r| (r.addr, r.prefix_len));
    Ok(out)
}

/// One POLICY entry as loaded, with whether `POLICY_LENGTHS` makes the datapath probe it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolicyRow {
    /// The key as stored (cut to its prefix; `key.prefix_len` is the length).
    pub key: PolicyKey,
    pub value: PolicyValue,
    /// False when `POLICY_LENGTHS` does not mark this entry's length for its (endpoint,
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
            source: Box::new(source),
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
pub const PRESSURE_MAPS: [&str; RESIZABLE.len()] = RESIZABLE;

/// Counts the keys of every map of [`PRESSURE_MAPS`] (one syscall per key) and reads its
/// size. A map that cannot be opened is left out.
pub fn map_fill(dir: &Path) -> Vec<MapFill> {
    PRESSURE_MAPS
        .into_iter()
        .filter_map(|name| {
            let (entries, max_entries) = pinned_map_fill(&dir.join(name))?;
            Some(MapFill { name, entries, max_entries })
        })
        .collect()
}
