//! The one table of the maps the agent writes ([`writable_maps!`]): ENDPOINTS, the four
//! ipcache maps, POLICY and `POLICY_LENGTHS`, each with its name, the key and value
//! [`MapState`] holds for it, and its layout in the kernel.
//!
//! Everything that exists once per map is generated from that list: the fields of
//! [`MapState`], [`Plan`] and [`MapLimits`], the [`WritableMap`] enum, one marker type per
//! map in [`map`] with its [`TableMap`] impl (how generic code reaches that map's part of a
//! state or a plan, and converts its keys for the kernel), and the datapath's typed handles
//! (`datapath::MapSet`). Code that does the same for every map is written once, generically,
//! and reaches the maps with [`WritableMap::visit`]; code that treats maps differently
//! names them ([`Plan::steps`] says in which order they are written, `encode` where an
//! entry goes).
use std::collections::BTreeMap;
use std::fmt::Debug;

use aya::Pod;
use aya::maps::lpm_trie::Key as LpmKey;
use palisade_common::PolicyKey;

use super::describe::{DescribeKey, DescribeValue};
use super::plan::MapPlan;

/// Calls `$callback!` with the maps the agent writes, one row each:
///
/// `Variant field NAME (Role): StateKey => Value, kernel KIND KernelKey [, narrowed in FIELD];`
///
/// - `NAME`: the map's constant in `palisade_common::map_names` and `map_sizes`;
/// - `Role`: what the map is for ([`MapRole`]);
/// - `StateKey => Value`: one entry as [`MapState`] holds it;
/// - `kernel hash K`: a BPF hash map with key `K`; `kernel lpm P`: an LPM trie whose keys
///   are `lpm_trie::Key<P>`; the state key converts to that ([`IntoKernel`]);
/// - `narrowed in FIELD`: the [`Plan`] field of the map's updates that are written after
///   the deletes (see [`Plan::steps`]).
macro_rules! writable_maps {
    ($callback:ident) => {
        $callback! {
            /// Host-side interface index -> endpoint: endpoint id, identity, enforcement flags,
            /// addresses.
            Endpoints endpoints ENDPOINTS (Endpoints):
                u32 => palisade_common::EndpointInfo, kernel hash u32;
            /// Prefixes shorter than /32 (an LPM trie; the datapath looks host entries up
            /// first, in `IPCACHE_HOST_V4`).
            IpcacheV4 ipcache_v4 IPCACHE_V4 (Ipcache):
                $crate::mapstate::V4Key => palisade_common::IpcacheValue, kernel lpm palisade_common::Ipv4Prefix;
            /// Prefixes shorter than /128 (an LPM trie).
            IpcacheV6 ipcache_v6 IPCACHE_V6 (Ipcache):
                $crate::mapstate::V6Key => palisade_common::IpcacheValue, kernel lpm palisade_common::Ipv6Prefix;
            /// /32 host entries (pods, nodes): a hash map, looked up before the trie.
            IpcacheHostV4 ipcache_host_v4 IPCACHE_HOST_V4 (Ipcache):
                palisade_common::Ipv4Prefix => palisade_common::IpcacheValue, kernel hash palisade_common::Ipv4Prefix;
            /// /128 host entries: a hash map, looked up before the trie.
            IpcacheHostV6 ipcache_host_v6 IPCACHE_HOST_V6 (Ipcache):
                palisade_common::Ipv6Prefix => palisade_common::IpcacheValue, kernel hash palisade_common::Ipv6Prefix;
            /// Policy entries by (prefix length, key). Here the key's own `prefix_len` byte is
            /// zero; in the kernel, keys are cut to their prefix length
            /// ([`palisade_common::PolicyKey::at_prefix`]).
            Policy policy POLICY (Policy):
                $crate::mapstate::PolicyMapKey => palisade_common::PolicyValue, kernel hash palisade_common::PolicyKey;
            /// For every (endpoint, direction, identity) with policy entries, the bitmap of
            /// their prefix lengths ([`palisade_common::policy_length_bit`]): the lengths the
            /// datapath probes.
            PolicyLengths policy_lengths POLICY_LENGTHS (PolicyLengths):
                palisade_common::PolicyLengthsKey => u32, kernel hash palisade_common::PolicyLengthsKey,
                narrowed in policy_lengths_narrow;
        }
    };
}
pub(crate) use writable_maps;

/// The kernel key type of a table row's `kernel` column.
macro_rules! kernel_key {
    (hash $k:ty) => { $k };
    (lpm $p:ty) => { aya::maps::lpm_trie::Key<$p> };
}
pub(crate) use kernel_key;

/// What a writable map is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapRole {
    Endpoints,
    /// Address -> identity: the datapath's peer lookup.
    Ipcache,
    Policy,
    PolicyLengths,
}

/// One writable map at the type level: its key and value, where it sits in a [`MapState`]
/// and a [`Plan`], and its kernel key. Implemented by the markers in [`map`]; generic code
/// gets one from [`WritableMap::visit`].
pub trait TableMap {
    const MAP: WritableMap;
    /// The key in the kernel map.
    type Kernel: Pod;
    type Key: Ord + Copy + Debug + IntoKernel<Self::Kernel> + DescribeKey;
    type Value: Copy + PartialEq + Debug + Pod + DescribeValue;
    fn state(s: &MapState) -> &BTreeMap<Self::Key, Self::Value>;
    fn state_mut(s: &mut MapState) -> &mut BTreeMap<Self::Key, Self::Value>;
    fn plan(p: &Plan) -> &MapPlan<Self::Key, Self::Value>;
    fn plan_mut(p: &mut Plan) -> &mut MapPlan<Self::Key, Self::Value>;
    /// Updates written after the deletes (empty for every map but `POLICY_LENGTHS`).
    fn narrowed(p: &Plan) -> &[(Self::Key, Self::Value)];
}

/// Code run for one map, whichever it is: [`WritableMap::visit`] calls `visit` with that
/// map's [`TableMap`].
pub trait MapVisitor {
    type Output;
    fn visit<M: TableMap>(self, m: M) -> Self::Output;
}

/// How a [`MapState`] key is written in its kernel map (`K`), and read back.
pub trait IntoKernel<K> {
    fn to_kernel(&self) -> K;
    fn from_kernel(k: K) -> Self;
}

/// Keys that are the same in the state and the kernel.
impl<T: Pod> IntoKernel<T> for T {
    fn to_kernel(&self) -> T {
        *self
    }
    fn from_kernel(k: T) -> T {
        k
    }
}

/// LPM trie keys: (prefix length, data).
impl<P: Pod> IntoKernel<LpmKey<P>> for (u32, P) {
    fn to_kernel(&self) -> LpmKey<P> {
        LpmKey::new(self.0, self.1)
    }
    fn from_kernel(k: LpmKey<P>) -> Self {
        (k.prefix_len(), k.data())
    }
}

/// Policy keys: cut to their prefix length in the kernel, with the length in the key.
impl IntoKernel<PolicyKey> for (u32, PolicyKey) {
    fn to_kernel(&self) -> PolicyKey {
        self.1.at_prefix(self.0)
    }
    fn from_kernel(k: PolicyKey) -> Self {
        (u32::from(k.prefix_len), PolicyKey { prefix_len: 0, ..k })
    }
}

/// `narrowed in FIELD` of a row, or nothing.
macro_rules! narrowed {
    ($p:ident) => {{
        let _ = $p;
        &[]
    }};
    ($p:ident, $field:ident) => {
        &$p.$field
    };
}

macro_rules! define_table {
    ($(
        $(#[doc = $doc:literal])*
        $Variant:ident $field:ident $NAME:ident ($role:ident):
            $Key:ty => $Value:ty, kernel $kind:ident $Kernel:ty $(, narrowed in $narrow:ident)?;
    )*) => {
        /// One of the maps the agent writes (not conntrack, fragments, events, counters or
        /// config, which the datapath owns or which are settings).
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum WritableMap {
            $( $(#[doc = $doc])* $Variant, )*
        }

        impl WritableMap {
            /// How many there are.
            pub const COUNT: usize = [$(stringify!($Variant)),*].len();
            /// Every writable map, in table order.
            pub const ALL: [WritableMap; Self::COUNT] = [$(WritableMap::$Variant),*];

            /// The map's pinned name (`palisade_common::map_names`).
            pub const fn name(self) -> &'static str {
                match self {
                    $(WritableMap::$Variant => palisade_common::map_names::$NAME,)*
                }
            }

            /// The size the programs declare (`palisade_common::map_sizes`).
            pub const fn declared_size(self) -> u32 {
                match self {
                    $(WritableMap::$Variant => palisade_common::map_sizes::$NAME,)*
                }
            }

            pub const fn role(self) -> MapRole {
                match self {
                    $(WritableMap::$Variant => MapRole::$role,)*
                }
            }

            /// Whether the map is an LPM trie (else a hash map).
            pub const fn is_trie(self) -> bool {
                match self {
                    $(WritableMap::$Variant => is_trie!($kind),)*
                }
            }

            /// Runs `v` with this map's [`TableMap`].
            pub fn visit<V: MapVisitor>(self, v: V) -> V::Output {
                match self {
                    $(WritableMap::$Variant => v.visit(map::$Variant),)*
                }
            }
        }

        /// One marker type per writable map, for generic code ([`TableMap`]).
        pub mod map {
            $(
                $(#[doc = $doc])*
                #[derive(Clone, Copy, Debug, Default)]
                pub struct $Variant;
            )*
        }

        $(
            impl TableMap for map::$Variant {
                const MAP: WritableMap = WritableMap::$Variant;
                type Kernel = kernel_key!($kind $Kernel);
                type Key = $Key;
                type Value = $Value;
                fn state(s: &MapState) -> &BTreeMap<$Key, $Value> {
                    &s.$field
                }
                fn state_mut(s: &mut MapState) -> &mut BTreeMap<$Key, $Value> {
                    &mut s.$field
                }
                fn plan(p: &Plan) -> &MapPlan<$Key, $Value> {
                    &p.$field
                }
                fn plan_mut(p: &mut Plan) -> &mut MapPlan<$Key, $Value> {
                    &mut p.$field
                }
                fn narrowed(p: &Plan) -> &[($Key, $Value)] {
                    narrowed!(p $(, $narrow)?)
                }
            }
        )*

        /// Contents of the maps the agent owns, one field per [`WritableMap`].
        ///
        /// The ipcache is split the way the datapath reads it: host entries (/32, /128) in
        /// hash maps, which the programs look up first (a host entry is always the longest
        /// prefix, and a hash lookup costs the same at any size), every shorter prefix in
        /// the LPM tries.
        #[derive(Clone, Debug, Default, PartialEq, Eq)]
        pub struct MapState {
            $( $(#[doc = $doc])* pub $field: BTreeMap<$Key, $Value>, )*
        }

        impl MapState {
            /// Number of entries of `map`.
            pub fn len_of(&self, map: WritableMap) -> usize {
                match map {
                    $(WritableMap::$Variant => self.$field.len(),)*
                }
            }
        }

        /// The changes that turn a loaded [`MapState`] into a desired one, map by map (made
        /// by `mapstate::plan`). [`Plan::steps`] is the order they are written in.
        ///
        /// `POLICY_LENGTHS` updates are split: `policy_lengths.updates` only set bits (an
        /// update that also clears bits writes old | new), written before the POLICY
        /// deletes; `policy_lengths_narrow` holds the final bitmaps of the updates that
        /// clear bits, written after them.
        #[derive(Clone, Debug, Default, PartialEq, Eq)]
        pub struct Plan {
            $( pub $field: MapPlan<$Key, $Value>, )*
            $( $(
                /// Updates written after the deletes: bitmaps that lose bits, at their
                /// final value.
                pub $narrow: Vec<($Key, $Value)>,
            )? )*
        }

        impl Plan {
            pub fn is_empty(&self) -> bool {
                true $(&& self.$field.is_empty())* $($(&& self.$narrow.is_empty())?)*
            }

            /// Number of map operations.
            pub fn len(&self) -> usize {
                0 $(+ self.$field.len())* $($(+ self.$narrow.len())?)*
            }
        }

        /// The sizes (`max_entries`) of the maps the agent writes.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub struct MapLimits {
            $( pub $field: u32, )*
        }

        impl MapLimits {
            /// No limit (for tests and offline tools).
            pub const UNLIMITED: MapLimits = MapLimits { $($field: u32::MAX,)* };

            /// The size of `map`.
            pub fn get(&self, map: WritableMap) -> u32 {
                match map {
                    $(WritableMap::$Variant => self.$field,)*
                }
            }

            pub fn set(&mut self, map: WritableMap, max_entries: u32) {
                match map {
                    $(WritableMap::$Variant => self.$field = max_entries,)*
                }
            }
        }
    };
}

macro_rules! is_trie {
    (hash) => {
        false
    };
    (lpm) => {
        true
    };
}

writable_maps!(define_table);

impl WritableMap {
    /// The ipcache maps, in table order.
    pub fn ipcache() -> impl Iterator<Item = WritableMap> {
        WritableMap::ALL.into_iter().filter(|m| m.role() == MapRole::Ipcache)
    }
}

impl std::fmt::Display for WritableMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
