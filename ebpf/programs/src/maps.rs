//! The maps of the datapath, named as in `palisade_common::map_names` and pinned by name
//! so that the agent finds (and a restarted agent reuses) them under its pin directory.
use crate::parse::Packet;
use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};
use palisade_common::{
    COUNTER_SLOTS, Counter, CtKey, CtValue, EndpointInfo, FragKey, FragValue, IpcacheValue, Ipv4Prefix, Ipv6Prefix,
    PolicyKey, PolicyLengthsKey, PolicyValue, config, map_sizes,
};

#[map]
pub static ENDPOINTS: HashMap<u32, EndpointInfo> = HashMap::pinned(map_sizes::ENDPOINTS, 0);

#[map]
pub static IPCACHE_V4: LpmTrie<Ipv4Prefix, IpcacheValue> = LpmTrie::pinned(map_sizes::IPCACHE_V4, 0);

#[map]
pub static IPCACHE_V6: LpmTrie<Ipv6Prefix, IpcacheValue> = LpmTrie::pinned(map_sizes::IPCACHE_V6, 0);

/// Host entries (/32): allocated as they are added (the map may stay mostly empty).
#[map]
pub static IPCACHE_HOST_V4: HashMap<Ipv4Prefix, IpcacheValue> =
    HashMap::pinned(map_sizes::IPCACHE_HOST_V4, BPF_F_NO_PREALLOC);

#[map]
pub static IPCACHE_HOST_V6: HashMap<Ipv6Prefix, IpcacheValue> =
    HashMap::pinned(map_sizes::IPCACHE_HOST_V6, BPF_F_NO_PREALLOC);

#[map]
pub static POLICY: HashMap<PolicyKey, PolicyValue> = HashMap::pinned(map_sizes::POLICY, BPF_F_NO_PREALLOC);

#[map]
pub static POLICY_LENGTHS: HashMap<PolicyLengthsKey, u32> =
    HashMap::pinned(map_sizes::POLICY_LENGTHS, BPF_F_NO_PREALLOC);

#[map]
pub static CONNTRACK: LruHashMap<CtKey, CtValue> = LruHashMap::pinned(map_sizes::CONNTRACK, 0);

#[map]
pub static EVENTS: RingBuf = RingBuf::pinned(map_sizes::EVENTS_BYTES, 0);

#[map]
pub static COUNTERS: PerCpuArray<Counter> = PerCpuArray::pinned(COUNTER_SLOTS, 0);

#[map]
pub static CONFIG: Array<u32> = Array::pinned(config::SLOTS, 0);

#[map]
pub static FRAGMENTS: LruHashMap<FragKey, FragValue> = LruHashMap::pinned(map_sizes::FRAGMENTS, 0);

/// What the program keeps off its 512-byte stack while it handles one packet.
pub struct Scratch {
    /// The parsed packet.
    pub pkt: Packet,
    /// The CONNTRACK key being looked up (the packet's, or the one an ICMP error quotes).
    pub ct: CtKey,
    /// A new CONNTRACK entry being built.
    pub new_entry: CtValue,
    /// The packet's orientations in its CONNTRACK entry (see `conntrack::orientations`).
    pub orient: [u32; 2],
    /// Audit mode: non-zero when the packet is to be looked up in the audit view (bit 0;
    /// the peer identity in the high 32 bits). Kept here, where the verifier does not track
    /// values, and read after the verdict: the audit lookup is then checked once, not once
    /// per path that leads to it.
    pub audit: u64,
}

/// Scratch space of one packet (not pinned: nothing outside the program reads it).
#[map]
pub static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);
