//! Typed bulk access to the maps the agent writes, over any [`MapBackend`]: writes and
//! deletes in batches where the backend's [`WriteMode`] and the map allow (falling back to
//! one element at a time, for good, for a map that refuses a batch command), and whole-map
//! reads (in batches for hash maps, else key by key). The kernel maps and the fake run the
//! same code.
use aya::Pod;

use super::{DatapathError, MapBackend, WriteMode, sys};
use crate::mapstate::WritableMap;

/// Elements per batch call: bounds the buffers and the time the kernel spends per call.
pub const BATCH: usize = 4096;

/// Writes (adds or replaces) `entries` into `map`. `K` and `V` must be the map's kernel key
/// and value types (for the LPM tries, `lpm_trie::Key<prefix>`). On error, the entries
/// before the failing one are written.
pub fn upsert<B, K, V>(b: &mut B, map: WritableMap, entries: &[(K, V)]) -> Result<(), DatapathError>
where
    B: MapBackend + ?Sized,
    K: Pod,
    V: Pod,
{
    check_layout::<K>(map, size_of::<V>())?;
    if entries.is_empty() {
        return Ok(());
    }
    let mut start = 0;
    if batched(b, map) {
        while start < entries.len() {
            let chunk = &entries[start..(start + BATCH).min(entries.len())];
            let keys: Vec<K> = chunk.iter().map(|(k, _)| *k).collect();
            let values: Vec<V> = chunk.iter().map(|(_, v)| *v).collect();
            match b.update_batch(map, bytes_of(&keys), bytes_of(&values), chunk.len()) {
                Ok(()) => start += chunk.len(),
                Err(p) if p.done == 0 && start == 0 && sys::batch_unsupported(&p.error) => {
                    tracing::debug!(map = map.name(), error = %p.error, "no batch updates for this map; writing one entry at a time");
                    b.refuse_batch(map);
                    break;
                }
                Err(p) => return Err(write_error(map, "update", start + p.done, entries.len(), p.error)),
            }
        }
        if start == entries.len() {
            return Ok(());
        }
    }
    for (i, (k, v)) in entries.iter().enumerate().skip(start) {
        b.update_elem(map, bytes_of(std::slice::from_ref(k)), bytes_of(std::slice::from_ref(v)))
            .map_err(|e| write_error(map, "update", i, entries.len(), e))?;
    }
    Ok(())
}

/// Deletes `keys` from `map` (keys already gone are fine).
pub fn delete<B, K>(b: &mut B, map: WritableMap, keys: &[K]) -> Result<(), DatapathError>
where
    B: MapBackend + ?Sized,
    K: Pod,
{
    check_layout::<K>(map, map.spec().value_size as usize)?;
    if keys.is_empty() {
        return Ok(());
    }
    let mut start = 0;
    if batched(b, map) {
        while start < keys.len() {
            let chunk = &keys[start..(start + BATCH).min(keys.len())];
            match b.delete_batch(map, bytes_of(chunk), chunk.len()) {
                Ok(()) => start += chunk.len(),
                // A key that is not there: skip it and go on after it.
                Err(p) if p.error.raw_os_error() == Some(libc::ENOENT) => start += p.done + 1,
                Err(p) if p.done == 0 && start == 0 && sys::batch_unsupported(&p.error) => {
                    tracing::debug!(map = map.name(), error = %p.error, "no batch deletes for this map; deleting one entry at a time");
                    b.refuse_batch(map);
                    break;
                }
                Err(p) => return Err(write_error(map, "delete", start + p.done, keys.len(), p.error)),
            }
        }
        if start >= keys.len() {
            return Ok(());
        }
    }
    for (i, k) in keys.iter().enumerate().skip(start) {
        match b.delete_elem(map, bytes_of(std::slice::from_ref(k))) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(write_error(map, "delete", i, keys.len(), e)),
        }
    }
    Ok(())
}

/// Every entry of hash map `map`, read in batches (`BPF_MAP_LOOKUP_BATCH`); `None` when the
/// write mode is one element at a time or the backend has no batch lookup for it.
pub fn read_batched<B, K, V>(b: &B, map: WritableMap) -> Result<Option<Vec<(K, V)>>, DatapathError>
where
    B: MapBackend + ?Sized,
    K: Pod,
    V: Pod,
{
    check_layout::<K>(map, size_of::<V>())?;
    if b.write_mode() != WriteMode::Batched {
        return Ok(None);
    }
    let (ks, vs) = (size_of::<K>(), size_of::<V>());
    let mut keys = vec![0u8; BATCH * ks];
    let mut values = vec![0u8; BATCH * vs];
    let mut token = None;
    let mut out = Vec::new();
    loop {
        match b.lookup_batch(map, &mut token, &mut keys, &mut values, BATCH) {
            Ok((n, done)) => {
                for i in 0..n {
                    out.push((read_at::<K>(&keys, i), read_at::<V>(&values, i)));
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

/// Every entry of `map`: hash maps in batches where possible, LPM tries (whose batch
/// lookup takes a whole key as its token) and the rest key by key.
pub fn read_all<B, K, V>(b: &B, map: WritableMap) -> Result<Vec<(K, V)>, DatapathError>
where
    B: MapBackend + ?Sized,
    K: Pod,
    V: Pod,
{
    if !map.is_trie()
        && let Some(all) = read_batched(b, map)?
    {
        return Ok(all);
    }
    check_layout::<K>(map, size_of::<V>())?;
    let read_err = |source| DatapathError::MapRead { map: map.name(), source };
    let mut key = vec![0u8; size_of::<K>()];
    let mut next = vec![0u8; size_of::<K>()];
    let mut value = vec![0u8; size_of::<V>()];
    let mut out = Vec::new();
    let mut first = true;
    while b.next_key(map, (!first).then_some(&key[..]), &mut next).map_err(read_err)? {
        first = false;
        std::mem::swap(&mut key, &mut next);
        // An entry deleted since its key was listed is skipped.
        if b.lookup_elem(map, &key, &mut value).map_err(read_err)? {
            out.push((read_at::<K>(&key, 0), read_at::<V>(&value, 0)));
        }
    }
    Ok(out)
}

fn batched<B: MapBackend + ?Sized>(b: &B, map: WritableMap) -> bool {
    b.write_mode() == WriteMode::Batched && !b.batch_refused(map)
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
pub(crate) fn bytes_of<T: Pod>(v: &[T]) -> &[u8] {
    // SAFETY: `T: Pod` is plain data (`#[repr(C)]`, explicit padding, no pointers), so its
    // bytes may be read; the length covers exactly the slice.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

/// The `i`-th `T` of a buffer of `T`s laid out back to back.
pub(crate) fn read_at<T: Pod>(bytes: &[u8], i: usize) -> T {
    let size = size_of::<T>();
    assert!(bytes.len() >= (i + 1) * size, "a buffer of {} bytes has no element {i} of {size}", bytes.len());
    // SAFETY: the bytes are in bounds (checked above); `T` is plain data, valid for any
    // bytes, read unaligned.
    unsafe { std::ptr::read_unaligned(bytes.as_ptr().add(i * size).cast::<T>()) }
}
