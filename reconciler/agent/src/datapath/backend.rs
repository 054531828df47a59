//! What the map writer needs of the datapath, as two traits, each implemented by the kernel
//! and by a fake beside it (`datapath::fake`, for tests without root):
//!
//! - [`MapBackend`]: the bpf(2) map commands on the maps the agent writes, on raw bytes
//!   and with the kernel's errno values: the pinned maps ([`MapSet`](super::MapSet)) or
//!   [`FakeMaps`](super::FakeMaps). The typed writes the map writer makes on top of them
//!   (batched, one element at a time where a map refuses batches) are in
//!   [`bulk`](super::bulk), the same code for both.
//! - [`Programs`]: attaching the tc programs to pod interfaces: the loaded
//!   [`Datapath`](super::Datapath) or [`FakePrograms`](super::FakePrograms).
use std::io;

use super::DatapathError;
use super::sys::PartialWrite;
use crate::mapstate::WritableMap;

/// How bulk writes reach the kernel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WriteMode {
    /// `BPF_MAP_UPDATE_BATCH` / `BPF_MAP_DELETE_BATCH`, falling back to one element at a time
    /// for maps (or kernels) that do not support them.
    #[default]
    Batched,
    /// One `BPF_MAP_UPDATE_ELEM` / `BPF_MAP_DELETE_ELEM` per element.
    PerEntry,
}

/// The map commands of bpf(2), on the maps the agent writes ([`WritableMap`]). Keys and
/// values are the map's bytes, back to back (`count` of them in batch calls); errors are
/// the kernel's (`E2BIG` from a full hash map, `ENOSPC` from a full LPM trie, `ENOENT`
/// for a missing key, `ENOTSUPP`/`EINVAL` for a batch command the map does not have).
/// A batch call that fails has done the first [`PartialWrite::done`] elements.
pub trait MapBackend {
    /// The map's `max_entries`.
    fn max_entries(&self, map: WritableMap) -> Result<u32, DatapathError>;
    /// `BPF_MAP_UPDATE_BATCH` (`BPF_ANY`).
    fn update_batch(&mut self, map: WritableMap, keys: &[u8], values: &[u8], count: usize) -> Result<(), PartialWrite>;
    /// `BPF_MAP_DELETE_BATCH`: stops at the first missing key (`ENOENT`).
    fn delete_batch(&mut self, map: WritableMap, keys: &[u8], count: usize) -> Result<(), PartialWrite>;
    /// `BPF_MAP_LOOKUP_BATCH` of a hash map: up to `count` elements after `token` (`None`:
    /// from the start); answers how many were read and whether the map is done, and sets
    /// `token` for the next call.
    fn lookup_batch(
        &self,
        map: WritableMap,
        token: &mut Option<u64>,
        keys: &mut [u8],
        values: &mut [u8],
        count: usize,
    ) -> io::Result<(usize, bool)>;
    /// `BPF_MAP_UPDATE_ELEM` (`BPF_ANY`).
    fn update_elem(&mut self, map: WritableMap, key: &[u8], value: &[u8]) -> io::Result<()>;
    /// `BPF_MAP_DELETE_ELEM`.
    fn delete_elem(&mut self, map: WritableMap, key: &[u8]) -> io::Result<()>;
    /// `BPF_MAP_LOOKUP_ELEM` (an LPM trie answers the longest prefix match); `false`: none.
    fn lookup_elem(&self, map: WritableMap, key: &[u8], value: &mut [u8]) -> io::Result<bool>;
    /// `BPF_MAP_GET_NEXT_KEY`: the key after `key` (`None`, or a key not in the map: the
    /// first); `false` when there is none.
    fn next_key(&self, map: WritableMap, key: Option<&[u8]>, next: &mut [u8]) -> io::Result<bool>;
    /// Moves the policy generation (`CONFIG[POLICY_GEN]`) on, after a plan is written:
    /// established flows are checked against policy in full again.
    fn bump_policy_generation(&mut self) -> Result<u32, DatapathError>;
    /// How bulk writes go.
    fn write_mode(&self) -> WriteMode;
    /// Whether `map` refused a batch command: it is written one element at a time.
    fn batch_refused(&self, map: WritableMap) -> bool;
    /// Remembers that `map` refused a batch command.
    fn refuse_batch(&mut self, map: WritableMap);
}

/// Attaching the tc programs to the host side of pod interfaces.
pub trait Programs {
    /// Attaches both programs to `ifname` (idempotent); answers its index.
    fn attach(&mut self, ifname: &str) -> Result<u32, DatapathError>;
    /// Detaches them (fine when the interface is gone).
    fn detach(&mut self, ifname: &str) -> Result<(), DatapathError>;
    /// How programs are attached, for status (`tcx`, `clsact`).
    fn attach_mode(&self) -> String;
}

impl Programs for super::Datapath {
    fn attach(&mut self, ifname: &str) -> Result<u32, DatapathError> {
        super::Datapath::attach(self, ifname)
    }
    fn detach(&mut self, ifname: &str) -> Result<(), DatapathError> {
        super::Datapath::detach(self, ifname)
    }
    fn attach_mode(&self) -> String {
        super::Datapath::attach_mode(self).to_string()
    }
}
