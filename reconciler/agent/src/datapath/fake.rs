//! In-memory stand-ins for the kernel's maps ([`FakeMaps`]) and program attachments
//! ([`FakePrograms`]), so the map writer, its applier and the actors run in tests without
//! root. A fake beside the real thing: the kernel tests (`*_privileged`) cover the real
//! maps with the same code above the backend.
//!
//! [`FakeMaps`] answers the map commands of [`MapBackend`] as the kernel does for the maps
//! the agent writes:
//! - hash maps, and LPM tries: a trie key is a prefix length (u32) and data; keys equal on
//!   their first prefix-length bits are one entry; a lookup answers the longest prefix that
//!   matches; a prefix length beyond the data is `EINVAL`;
//! - batch calls that write element by element, stop at the first that fails and report
//!   how many were done; a delete batch stops at a missing key (`ENOENT`); a batch lookup
//!   of a hash map answers in pieces with a token, a trie has none the agent can use;
//! - a full map: a hash map answers `E2BIG`, a trie `ENOSPC` (replacing an entry of a full
//!   map works, as in kernels since 6.13);
//! - on demand: a call that fails ([`FakeMaps::fail`]), a map without batch commands
//!   ([`FakeMaps::refuse_batches`]), a hook run after every element written or deleted
//!   ([`FakeMaps::on_write`], with the maps as they are then), and the log of every element
//!   written ([`FakeMaps::writes`]).
use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use super::sys::PartialWrite;
use super::{DatapathError, MapBackend, MapSizes, Programs, WriteMode, read_state};
use crate::mapstate::{MapLimits, MapState, WritableMap};

/// `ENOTSUPP` (kernel-internal, but what the kernel answers for a missing batch command).
const ENOTSUPP: i32 = 524;

/// What an element operation does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FakeOp {
    Update,
    Delete,
}

/// A failure armed with [`FakeMaps::fail`]: the element operation `op` on `map` (any map
/// when `None`) after `after` more of them succeeded fails with `errno`, once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    pub map: Option<WritableMap>,
    pub op: FakeOp,
    pub after: usize,
    pub errno: i32,
}

/// One element written or deleted, in the order the maps saw them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Written {
    pub map: WritableMap,
    pub op: FakeOp,
    /// The key as written (kernel layout).
    pub key: Vec<u8>,
}

/// Run after every element written or deleted.
type Observer = Box<dyn FnMut(&FakeKernel) + Send>;

/// The fake maps themselves; [`FakeMaps`] is a shared handle on them. Implements
/// [`MapBackend`], so a hook ([`FakeMaps::on_write`]) can read them with `read_state`.
pub struct FakeKernel {
    maps: BTreeMap<WritableMap, FakeMap>,
    generation: u32,
    write_mode: WriteMode,
    refused: BTreeSet<WritableMap>,
    failures: Vec<Failure>,
    log: Vec<Written>,
    observer: Option<Observer>,
}

/// One map.
struct FakeMap {
    trie: bool,
    key_size: usize,
    value_size: usize,
    max_entries: usize,
    /// Whether the map has the batch commands.
    batch: bool,
    /// By canonical key (a trie's data cut to its prefix): (key as written, value).
    entries: BTreeMap<Vec<u8>, (Vec<u8>, Vec<u8>)>,
}

fn errno(e: i32) -> io::Error {
    io::Error::from_raw_os_error(e)
}

impl FakeMap {
    fn new(map: WritableMap, max_entries: u32) -> FakeMap {
        let spec = map.spec();
        FakeMap {
            trie: map.is_trie(),
            key_size: spec.key_size as usize,
            value_size: spec.value_size as usize,
            max_entries: max_entries as usize,
            batch: true,
            entries: BTreeMap::new(),
        }
    }

    /// The key that names an entry: a trie's prefix length and its data cut to it.
    fn canonical(&self, key: &[u8]) -> io::Result<Vec<u8>> {
        if key.len() != self.key_size {
            return Err(errno(libc::EINVAL));
        }
        if !self.trie {
            return Ok(key.to_vec());
        }
        let len = u32::from_ne_bytes([key[0], key[1], key[2], key[3]]) as usize;
        let data = &key[4..];
        if len > data.len() * 8 {
            return Err(errno(libc::EINVAL));
        }
        Ok(cut_prefix(len, data))
    }

    fn update(&mut self, key: &[u8], value: &[u8]) -> io::Result<()> {
        if value.len() != self.value_size {
            return Err(errno(libc::EINVAL));
        }
        let canonical = self.canonical(key)?;
        if !self.entries.contains_key(&canonical) && self.entries.len() >= self.max_entries {
            return Err(errno(if self.trie { libc::ENOSPC } else { libc::E2BIG }));
        }
        self.entries.insert(canonical, (key.to_vec(), value.to_vec()));
        Ok(())
    }

    fn delete(&mut self, key: &[u8]) -> io::Result<()> {
        let canonical = self.canonical(key)?;
        match self.entries.remove(&canonical) {
            Some(_) => Ok(()),
            None => Err(errno(libc::ENOENT)),
        }
    }

    /// The value of `key`; a trie answers its longest matching prefix.
    fn lookup(&self, key: &[u8]) -> io::Result<Option<&[u8]>> {
        let canonical = self.canonical(key)?;
        if !self.trie {
            return Ok(self.entries.get(&canonical).map(|(_, v)| v.as_slice()));
        }
        let len = u32::from_ne_bytes([key[0], key[1], key[2], key[3]]) as usize;
        Ok((0..=len).rev().find_map(|l| self.entries.get(&cut_prefix(l, &key[4..])).map(|(_, v)| v.as_slice())))
    }
}

/// `len` as the key's prefix length, then `data` with the bits past `len` cleared.
fn cut_prefix(len: usize, data: &[u8]) -> Vec<u8> {
    let mut out = (len as u32).to_ne_bytes().to_vec();
    out.extend(data.iter().enumerate().map(|(i, b)| {
        let keep = len.saturating_sub(i * 8).min(8);
        if keep == 0 { 0 } else { b & (0xffu8 << (8 - keep)) }
    }));
    out
}

impl FakeKernel {
    fn new(size_of: impl Fn(WritableMap) -> u32) -> FakeKernel {
        FakeKernel {
            maps: WritableMap::ALL.into_iter().map(|m| (m, FakeMap::new(m, size_of(m)))).collect(),
            generation: 0,
            write_mode: WriteMode::default(),
            refused: BTreeSet::new(),
            failures: Vec::new(),
            log: Vec::new(),
            observer: None,
        }
    }

    /// The element written or deleted last.
    pub fn last_write(&self) -> Option<&Written> {
        self.log.last()
    }

    fn map(&self, map: WritableMap) -> &FakeMap {
        &self.maps[&map]
    }

    /// Fires an armed failure for this element operation, if one is due.
    fn failure(&mut self, map: WritableMap, op: FakeOp) -> Option<io::Error> {
        let due = self.failures.iter_mut().position(|f| {
            if f.op != op || f.map.is_some_and(|m| m != map) {
                return false;
            }
            if f.after == 0 {
                return true;
            }
            f.after -= 1;
            false
        })?;
        Some(errno(self.failures.remove(due).errno))
    }

    /// One element written or deleted: logged, then the hook runs.
    fn written(&mut self, map: WritableMap, op: FakeOp, key: &[u8]) {
        self.log.push(Written { map, op, key: key.to_vec() });
        if let Some(mut observe) = self.observer.take() {
            observe(self);
            self.observer = Some(observe);
        }
    }

    fn write(&mut self, map: WritableMap, key: &[u8], value: &[u8]) -> io::Result<()> {
        if let Some(e) = self.failure(map, FakeOp::Update) {
            return Err(e);
        }
        self.maps.get_mut(&map).expect("every writable map").update(key, value)?;
        self.written(map, FakeOp::Update, key);
        Ok(())
    }

    fn remove(&mut self, map: WritableMap, key: &[u8]) -> io::Result<()> {
        if let Some(e) = self.failure(map, FakeOp::Delete) {
            return Err(e);
        }
        self.maps.get_mut(&map).expect("every writable map").delete(key)?;
        self.written(map, FakeOp::Delete, key);
        Ok(())
    }

    fn batch_supported(&self, map: WritableMap) -> Result<(), PartialWrite> {
        if self.map(map).batch { Ok(()) } else { Err(PartialWrite { done: 0, error: errno(ENOTSUPP) }) }
    }
}

impl MapBackend for FakeKernel {
    fn max_entries(&self, map: WritableMap) -> Result<u32, DatapathError> {
        Ok(self.map(map).max_entries as u32)
    }

    fn update_batch(&mut self, map: WritableMap, keys: &[u8], values: &[u8], count: usize) -> Result<(), PartialWrite> {
        self.batch_supported(map)?;
        let (ks, vs) = (self.map(map).key_size, self.map(map).value_size);
        if keys.len() != count * ks || values.len() != count * vs {
            return Err(PartialWrite { done: 0, error: errno(libc::EINVAL) });
        }
        for i in 0..count {
            self.write(map, &keys[i * ks..(i + 1) * ks], &values[i * vs..(i + 1) * vs])
                .map_err(|error| PartialWrite { done: i, error })?;
        }
        Ok(())
    }

    fn delete_batch(&mut self, map: WritableMap, keys: &[u8], count: usize) -> Result<(), PartialWrite> {
        self.batch_supported(map)?;
        let ks = self.map(map).key_size;
        if keys.len() != count * ks {
            return Err(PartialWrite { done: 0, error: errno(libc::EINVAL) });
        }
        for i in 0..count {
            self.remove(map, &keys[i * ks..(i + 1) * ks]).map_err(|error| PartialWrite { done: i, error })?;
        }
        Ok(())
    }

    fn lookup_batch(
        &self,
        map: WritableMap,
        token: &mut Option<u64>,
        keys: &mut [u8],
        values: &mut [u8],
        count: usize,
    ) -> io::Result<(usize, bool)> {
        let m = self.map(map);
        if !m.batch {
            return Err(errno(ENOTSUPP));
        }
        // The kernel's batch lookup of a trie takes a whole key as its token: not offered.
        if m.trie {
            return Err(errno(libc::EINVAL));
        }
        if keys.len() < count * m.key_size || values.len() < count * m.value_size {
            return Err(errno(libc::EINVAL));
        }
        let from = token.unwrap_or(0) as usize;
        let mut n = 0;
        for (k, v) in m.entries.values().skip(from).take(count) {
            keys[n * m.key_size..(n + 1) * m.key_size].copy_from_slice(k);
            values[n * m.value_size..(n + 1) * m.value_size].copy_from_slice(v);
            n += 1;
        }
        *token = Some((from + n) as u64);
        Ok((n, from + n >= m.entries.len()))
    }

    fn update_elem(&mut self, map: WritableMap, key: &[u8], value: &[u8]) -> io::Result<()> {
        self.write(map, key, value)
    }

    fn delete_elem(&mut self, map: WritableMap, key: &[u8]) -> io::Result<()> {
        self.remove(map, key)
    }

    fn lookup_elem(&self, map: WritableMap, key: &[u8], value: &mut [u8]) -> io::Result<bool> {
        let m = self.map(map);
        match m.lookup(key)? {
            Some(v) if value.len() == v.len() => {
                value.copy_from_slice(v);
                Ok(true)
            }
            Some(_) => Err(errno(libc::EINVAL)),
            None => Ok(false),
        }
    }

    fn next_key(&self, map: WritableMap, key: Option<&[u8]>, next: &mut [u8]) -> io::Result<bool> {
        let m = self.map(map);
        let after = match key {
            Some(k) => Some(m.canonical(k)?).filter(|c| m.entries.contains_key(c)),
            None => None,
        };
        let found = match &after {
            Some(c) => m.entries.range::<Vec<u8>, _>((std::ops::Bound::Excluded(c), std::ops::Bound::Unbounded)).next(),
            None => m.entries.iter().next(),
        };
        match found {
            Some((_, (k, _))) if next.len() == k.len() => {
                next.copy_from_slice(k);
                Ok(true)
            }
            Some(_) => Err(errno(libc::EINVAL)),
            None => Ok(false),
        }
    }

    fn bump_policy_generation(&mut self) -> Result<u32, DatapathError> {
        self.generation = match self.generation.wrapping_add(1) {
            0 => 1,
            n => n,
        };
        Ok(self.generation)
    }

    fn write_mode(&self) -> WriteMode {
        self.write_mode
    }

    fn batch_refused(&self, map: WritableMap) -> bool {
        self.refused.contains(&map)
    }

    fn refuse_batch(&mut self, map: WritableMap) {
        self.refused.insert(map);
    }
}

/// A shared handle on fake maps: the map writer holds one, the test another.
#[derive(Clone)]
pub struct FakeMaps {
    kernel: Arc<Mutex<FakeKernel>>,
}

impl Default for FakeMaps {
    fn default() -> Self {
        FakeMaps::new()
    }
}

impl FakeMaps {
    /// Empty maps of the sizes the programs declare.
    pub fn new() -> FakeMaps {
        FakeMaps::with_sizes(&MapSizes::default())
    }

    /// Empty maps of the given sizes (as `--map-size` sets them).
    pub fn with_sizes(sizes: &MapSizes) -> FakeMaps {
        FakeMaps::from_kernel(FakeKernel::new(|m| sizes.get(m.name())))
    }

    /// Empty maps of the sizes `limits`.
    pub fn with_limits(limits: &MapLimits) -> FakeMaps {
        FakeMaps::from_kernel(FakeKernel::new(|m| limits.get(m)))
    }

    fn from_kernel(kernel: FakeKernel) -> FakeMaps {
        FakeMaps { kernel: Arc::new(Mutex::new(kernel)) }
    }

    fn lock(&self) -> MutexGuard<'_, FakeKernel> {
        // A test that panicked while holding the lock has failed already.
        self.kernel.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// What the maps hold, read as the map writer reads them.
    pub fn state(&self) -> MapState {
        read_state(&*self.lock()).expect("the fake maps can always be read")
    }

    /// Arms a failure: the `after + 1`-th element operation `op` on `map` (any map: `None`)
    /// from now on fails with `errno`, once.
    pub fn fail(&self, map: Option<WritableMap>, op: FakeOp, after: usize, errno: i32) {
        self.lock().failures.push(Failure { map, op, after, errno });
    }

    /// Failures armed and not fired yet.
    pub fn pending_failures(&self) -> Vec<Failure> {
        self.lock().failures.clone()
    }

    /// `map` has no batch commands (as on kernels without them): they answer `ENOTSUPP`.
    pub fn refuse_batches(&self, map: WritableMap) {
        if let Some(m) = self.lock().maps.get_mut(&map) {
            m.batch = false;
        }
    }

    /// How bulk writes reach these maps.
    pub fn set_write_mode(&self, mode: WriteMode) {
        self.lock().write_mode = mode;
    }

    /// Maps written one element at a time because they refused a batch command.
    pub fn unbatched_maps(&self) -> Vec<WritableMap> {
        self.lock().refused.iter().copied().collect()
    }

    /// Runs `hook` after every element written or deleted, with the maps as they are then
    /// (`read_state` reads them). Replaces an earlier hook.
    pub fn on_write(&self, hook: impl FnMut(&FakeKernel) + Send + 'static) {
        self.lock().observer = Some(Box::new(hook));
    }

    /// Every element written or deleted so far, in order.
    pub fn writes(&self) -> Vec<Written> {
        self.lock().log.clone()
    }

    /// The policy generation (moved on after every plan written).
    pub fn generation(&self) -> u32 {
        self.lock().generation
    }
}

/// Forwards to the shared maps.
impl MapBackend for FakeMaps {
    fn max_entries(&self, map: WritableMap) -> Result<u32, DatapathError> {
        self.lock().max_entries(map)
    }
    fn update_batch(&mut self, map: WritableMap, keys: &[u8], values: &[u8], count: usize) -> Result<(), PartialWrite> {
        self.lock().update_batch(map, keys, values, count)
    }
    fn delete_batch(&mut self, map: WritableMap, keys: &[u8], count: usize) -> Result<(), PartialWrite> {
        self.lock().delete_batch(map, keys, count)
    }
    fn lookup_batch(
        &self,
        map: WritableMap,
        token: &mut Option<u64>,
        keys: &mut [u8],
        values: &mut [u8],
        count: usize,
    ) -> io::Result<(usize, bool)> {
        self.lock().lookup_batch(map, token, keys, values, count)
    }
    fn update_elem(&mut self, map: WritableMap, key: &[u8], value: &[u8]) -> io::Result<()> {
        self.lock().update_elem(map, key, value)
    }
    fn delete_elem(&mut self, map: WritableMap, key: &[u8]) -> io::Result<()> {
        self.lock().delete_elem(map, key)
    }
    fn lookup_elem(&self, map: WritableMap, key: &[u8], value: &mut [u8]) -> io::Result<bool> {
        self.lock().lookup_elem(map, key, value)
    }
    fn next_key(&self, map: WritableMap, key: Option<&[u8]>, next: &mut [u8]) -> io::Result<bool> {
        self.lock().next_key(map, key, next)
    }
    fn bump_policy_generation(&mut self) -> Result<u32, DatapathError> {
        self.lock().bump_policy_generation()
    }
    fn write_mode(&self) -> WriteMode {
        self.lock().write_mode()
    }
    fn batch_refused(&self, map: WritableMap) -> bool {
        self.lock().batch_refused(map)
    }
    fn refuse_batch(&mut self, map: WritableMap) {
        self.lock().refuse_batch(map);
    }
}

/// Program attachments in memory: every interface attaches, but those told to fail.
#[derive(Clone, Default)]
pub struct FakePrograms {
    state: Arc<Mutex<FakeAttachments>>,
}

#[derive(Default)]
struct FakeAttachments {
    attached: BTreeSet<String>,
    failing: BTreeSet<String>,
}

impl FakePrograms {
    fn lock(&self) -> MutexGuard<'_, FakeAttachments> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Interfaces the programs are attached to.
    pub fn attached(&self) -> BTreeSet<String> {
        self.lock().attached.clone()
    }

    /// Attaching to `ifname` fails (`on`) or works again.
    pub fn fail_attach(&self, ifname: &str, on: bool) {
        let mut s = self.lock();
        if on {
            s.failing.insert(ifname.to_string());
        } else {
            s.failing.remove(ifname);
        }
    }
}

impl Programs for FakePrograms {
    fn attach(&mut self, ifname: &str) -> Result<u32, DatapathError> {
        let mut s = self.lock();
        if s.failing.contains(ifname) {
            return Err(DatapathError::InterfaceNotFound { ifname: ifname.to_string() });
        }
        s.attached.insert(ifname.to_string());
        Ok(s.attached.iter().position(|i| i == ifname).map_or(0, |p| p as u32 + 1))
    }
    fn detach(&mut self, ifname: &str) -> Result<(), DatapathError> {
        self.lock().attached.remove(ifname);
        Ok(())
    }
    fn attach_mode(&self) -> String {
        "fake".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::{bulk, sys};
    use aya::maps::lpm_trie::Key;
    use palisade_common::{IpcacheValue, Ipv4Prefix};

    fn v(identity: u32) -> IpcacheValue {
        IpcacheValue { identity, flags: 0 }
    }

    #[test]
    fn a_trie_matches_the_longest_prefix_and_keys_are_cut_to_their_prefix() {
        let mut f = FakeMaps::new();
        let p = |len, addr| Key::new(len, Ipv4Prefix { addr });
        bulk::upsert(&mut f, WritableMap::IpcacheV4, &[(p(8, [10, 0, 0, 0]), v(1)), (p(16, [10, 1, 0, 0]), v(2))])
            .unwrap();
        // The same /8 with other bits past the prefix is the same entry.
        bulk::upsert(&mut f, WritableMap::IpcacheV4, &[(p(8, [10, 9, 9, 9]), v(3))]).unwrap();
        assert_eq!(f.state().ipcache_v4.len(), 2);
        let lookup = |f: &FakeMaps, addr| {
            let mut out = [0u8; 8];
            let key = p(32, addr);
            let found =
                f.lookup_elem(WritableMap::IpcacheV4, bulk::bytes_of(std::slice::from_ref(&key)), &mut out).unwrap();
            found.then(|| bulk::read_at::<IpcacheValue>(&out, 0).identity)
        };
        assert_eq!(lookup(&f, [10, 1, 2, 3]), Some(2));
        assert_eq!(lookup(&f, [10, 2, 2, 3]), Some(3));
        assert_eq!(lookup(&f, [11, 0, 0, 1]), None);
        let err = bulk::upsert(&mut f, WritableMap::IpcacheV4, &[(p(33, [1, 2, 3, 4]), v(4))]).unwrap_err();
        assert!(err.to_string().contains("Invalid argument"), "{err}");
    }

    #[test]
    fn full_maps_answer_as_the_kernel_does() {
        let limits = MapLimits { ipcache_v4: 2, ipcache_host_v4: 2, ..MapLimits::UNLIMITED };
        let mut f = FakeMaps::with_limits(&limits);
        let hosts: Vec<_> = (1..=3u8).map(|i| (Ipv4Prefix { addr: [10, 0, 0, i] }, v(u32::from(i)))).collect();
        let err = bulk::upsert(&mut f, WritableMap::IpcacheHostV4, &hosts).unwrap_err();
        match err {
            DatapathError::MapFull { done, total, source, .. } => {
                assert_eq!((done, total, source.raw_os_error()), (2, 3, Some(libc::E2BIG)));
                assert!(sys::map_full(&source));
            }
            other => panic!("expected MapFull, got {other}"),
        }
        // Replacing an entry of a full map works.
        bulk::upsert(&mut f, WritableMap::IpcacheHostV4, &[(hosts[0].0, v(9))]).unwrap();
        let tries: Vec<_> = (1..=3u8).map(|i| (Key::new(24, Ipv4Prefix { addr: [10, i, 0, 0] }), v(1))).collect();
        match bulk::upsert(&mut f, WritableMap::IpcacheV4, &tries).unwrap_err() {
            DatapathError::MapFull { source, .. } => assert_eq!(source.raw_os_error(), Some(libc::ENOSPC)),
            other => panic!("expected MapFull, got {other}"),
        }
    }

    #[test]
    fn batches_fall_back_to_single_elements_where_refused() {
        let mut f = FakeMaps::new();
        f.refuse_batches(WritableMap::IpcacheHostV4);
        let hosts: Vec<_> = (1..=3u8).map(|i| (Ipv4Prefix { addr: [10, 0, 0, i] }, v(1))).collect();
        bulk::upsert(&mut f, WritableMap::IpcacheHostV4, &hosts).unwrap();
        assert_eq!(f.unbatched_maps(), vec![WritableMap::IpcacheHostV4]);
        // Deletes with a missing key among them: skipped.
        let mut keys: Vec<_> = hosts.iter().map(|(k, _)| *k).collect();
        keys.insert(1, Ipv4Prefix { addr: [10, 9, 9, 9] });
        bulk::delete(&mut f, WritableMap::IpcacheHostV4, &keys).unwrap();
        bulk::upsert(&mut f, WritableMap::Endpoints, &[(7u32, palisade_common::EndpointInfo::default())]).unwrap();
        bulk::delete(&mut f, WritableMap::Endpoints, &[1u32, 7, 8]).unwrap();
        assert_eq!(f.state(), MapState::default());
        assert!(sys::batch_unsupported(&errno(ENOTSUPP)));
    }

    #[test]
    fn an_injected_failure_stops_a_batch_where_it_fires() {
        let mut f = FakeMaps::new();
        f.fail(Some(WritableMap::IpcacheHostV4), FakeOp::Update, 1, libc::EIO);
        let hosts: Vec<_> = (1..=3u8).map(|i| (Ipv4Prefix { addr: [10, 0, 0, i] }, v(1))).collect();
        match bulk::upsert(&mut f, WritableMap::IpcacheHostV4, &hosts).unwrap_err() {
            DatapathError::MapWrite { done, total, source, .. } => {
                assert_eq!((done, total, source.raw_os_error()), (1, 3, Some(libc::EIO)));
            }
            other => panic!("expected MapWrite, got {other}"),
        }
        assert_eq!(f.state().ipcache_host_v4.len(), 1);
        assert!(f.pending_failures().is_empty(), "fired once");
        bulk::upsert(&mut f, WritableMap::IpcacheHostV4, &hosts).unwrap();
        assert_eq!(f.state().ipcache_host_v4.len(), 3);
    }

    #[test]
    fn reads_in_batches_and_key_by_key_agree() {
        let mut f = FakeMaps::new();
        let hosts: Vec<_> = (0..10_000u32).map(|i| (Ipv4Prefix { addr: i.to_be_bytes() }, v(i))).collect();
        bulk::upsert(&mut f, WritableMap::IpcacheHostV4, &hosts).unwrap();
        let batched: Vec<(Ipv4Prefix, IpcacheValue)> =
            bulk::read_batched(&f, WritableMap::IpcacheHostV4).unwrap().expect("hash maps read in batches");
        f.set_write_mode(WriteMode::PerEntry);
        let single: Vec<(Ipv4Prefix, IpcacheValue)> = bulk::read_all(&f, WritableMap::IpcacheHostV4).unwrap();
        assert_eq!(batched.len(), 10_000);
        assert_eq!(batched, single);
    }
}
