//! Carrying live state over a change of a state map's layout, so that an upgrade does not
//! cost established connections.
//!
//! CONNTRACK before issue 17: one entry per flow, keyed by the flow's tuple as its first
//! packet had it (40-byte key), with a 32-byte value (`last_seen_ns`, `created_ns`, flags,
//! cookie, two policy generations). Now: one entry per pair of ends, keyed by the ends in
//! address order ([`CtKey::normalised`]), the value holding a flow per orientation
//! ([`CtValue::orig`]). A pinned map of the old layout is read, unpinned, and its flows are
//! written into the new map once the new programs' maps exist. The programs still
//! attached keep the old map until they are replaced; flows they open in between (a few
//! milliseconds) are not carried over and meet policy again on their next packet.
use std::os::fd::AsFd;
use std::path::Path;

use aya::maps::MapData;
use palisade_common::{CtKey, CtOrig, CtValue, map_names};

use super::error::DatapathError;
use super::loader::remove_file;
use super::sys;

/// Key and value sizes of the CONNTRACK layout before issue 17.
const OLD_KEY: usize = 40;
const OLD_VALUE: usize = 32;

/// The flows of a CONNTRACK map of the old layout pinned in `pin_dir`, converted to the
/// current layout, after unpinning it; empty when there is none (or it has the current
/// layout, or another one: [`super::loader`] then refuses it as before).
pub fn take_old_conntrack(pin_dir: &Path) -> Result<Vec<(CtKey, CtValue)>, DatapathError> {
    let path = pin_dir.join(map_names::CONNTRACK);
    if !path.exists() {
        return Ok(Vec::new());
    }
    let Ok(data) = MapData::from_pin(&path) else { return Ok(Vec::new()) };
    let Ok(info) = data.info() else { return Ok(Vec::new()) };
    if info.key_size() as usize != OLD_KEY || info.value_size() as usize != OLD_VALUE {
        return Ok(Vec::new());
    }
    let fd = data.fd().as_fd();
    let (mut key, mut next) = ([0u8; OLD_KEY], [0u8; OLD_KEY]);
    let mut value = [0u8; OLD_VALUE];
    let mut old = Vec::new();
    let mut first = true;
    while sys::map_get_next_key(fd, (!first).then_some(&key[..]), &mut next)
        .map_err(|e| DatapathError::io("read the old conntrack map", &path, e))?
    {
        first = false;
        key = next;
        if sys::map_lookup_elem(fd, &key, &mut value)
            .map_err(|e| DatapathError::io("read the old conntrack map", &path, e))?
        {
            old.push((key, value));
        }
    }
    remove_file(&path)?;
    let flows = convert(&old);
    tracing::warn!(
        pin = %path.display(),
        old_entries = old.len(),
        carried = flows.len(),
        "conntrack map of the layout before issue 17: its flows are carried over into the new layout"
    );
    Ok(flows)
}

/// Old entries to new ones: each old entry becomes the orientation of its tuple in the
/// entry of its ends (two old entries of one pair of ends, one per orientation, share a
/// new entry).
fn convert(old: &[([u8; OLD_KEY], [u8; OLD_VALUE])]) -> Vec<(CtKey, CtValue)> {
    let mut out: std::collections::HashMap<CtKey, CtValue> = std::collections::HashMap::new();
    for (k, v) in old {
        let addr = |at: usize| -> [u8; 16] { k[at..at + 16].try_into().expect("16 bytes") };
        let port = |at: usize| u16::from_be_bytes([k[at], k[at + 1]]);
        let (saddr, daddr, sport, dport, protocol, family) = (addr(0), addr(16), port(32), port(34), k[36], k[37]);
        let u64_at = |at: usize| u64::from_ne_bytes(v[at..at + 8].try_into().expect("8 bytes"));
        let u32_at = |at: usize| u32::from_ne_bytes(v[at..at + 4].try_into().expect("4 bytes"));
        let orig = CtOrig {
            last_seen_ns: u64_at(0),
            flags: u32_at(16),
            cookie: u32_at(20),
            policy_gen: [u32_at(24), u32_at(28)],
        };
        let (key, orientation) = CtKey::normalised(&saddr, &daddr, sport, dport, protocol, family);
        out.entry(key).or_default().orig[orientation] = orig;
    }
    out.into_iter().collect()
}

/// Writes the carried flows into the CONNTRACK map now pinned in `pin_dir`.
pub fn put_conntrack(pin_dir: &Path, flows: &[(CtKey, CtValue)]) -> Result<(), DatapathError> {
    if flows.is_empty() {
        return Ok(());
    }
    let path = pin_dir.join(map_names::CONNTRACK);
    let data = MapData::from_pin(&path)
        .map_err(|e| DatapathError::io("open the new conntrack map", &path, std::io::Error::other(e.to_string())))?;
    let fd = data.fd().as_fd();
    for (k, v) in flows {
        // SAFETY: both are `repr(C)` plain data of the programs' map layout.
        let (kb, vb) = unsafe { (as_bytes(k), as_bytes(v)) };
        sys::map_update_elem(fd, kb, vb, 0).map_err(|e| DatapathError::io("carry a flow over", &path, e))?;
    }
    Ok(())
}

/// # Safety
/// `T` must be plain data without padding the kernel could misread (the map's layout).
unsafe fn as_bytes<T>(v: &T) -> &[u8] {
    // SAFETY: `v` is a valid reference; the slice covers exactly its bytes and lives as long.
    unsafe { std::slice::from_raw_parts(std::ptr::from_ref(v).cast::<u8>(), size_of::<T>()) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use palisade_common::{ct_dir, ct_flags, proto};

    fn old_entry(s: [u8; 4], d: [u8; 4], sp: u16, dp: u16, last: u64, flags: u32) -> ([u8; OLD_KEY], [u8; OLD_VALUE]) {
        let mut k = [0u8; OLD_KEY];
        k[..4].copy_from_slice(&s);
        k[16..20].copy_from_slice(&d);
        k[32..34].copy_from_slice(&sp.to_be_bytes());
        k[34..36].copy_from_slice(&dp.to_be_bytes());
        k[36] = proto::TCP;
        k[37] = 4;
        let mut v = [0u8; OLD_VALUE];
        v[..8].copy_from_slice(&last.to_ne_bytes());
        v[8..16].copy_from_slice(&(last - 5).to_ne_bytes());
        v[16..20].copy_from_slice(&flags.to_ne_bytes());
        v[20..24].copy_from_slice(&7u32.to_ne_bytes());
        v[24..28].copy_from_slice(&3u32.to_ne_bytes());
        v[28..32].copy_from_slice(&4u32.to_ne_bytes());
        (k, v)
    }

    #[test]
    fn old_entries_become_orientations_of_their_pair_of_ends() {
        let ok = ct_flags::EGRESS_OK | ct_flags::INGRESS_OK;
        let old = [
            // 10.0.0.9:40000 -> 10.0.0.2:80, opened by the higher address.
            old_entry([10, 0, 0, 9], [10, 0, 0, 2], 40000, 80, 100, ok),
            // The same two ends, a flow opened the other way (simultaneous open).
            old_entry([10, 0, 0, 2], [10, 0, 0, 9], 80, 40000, 200, ok | ct_flags::SEEN_REPLY),
            old_entry([10, 0, 0, 1], [10, 0, 0, 2], 5000, 443, 300, ok),
        ];
        let new = convert(&old);
        assert_eq!(new.len(), 2, "{new:?}");
        // Keyed by the lower address: 10.0.0.2 with 10.0.0.9, 10.0.0.1 with 10.0.0.2.
        let find = |low: [u8; 4]| new.iter().find(|(k, _)| k.saddr[..4] == low).unwrap();
        let (k, v) = find([10, 0, 0, 2]);
        assert_eq!((k.saddr[..4].to_vec(), u16::from_be_bytes(k.sport_be)), (vec![10, 0, 0, 2], 80));
        assert_eq!(v.orig[ct_dir::HIGH_TO_LOW].last_seen_ns, 100);
        assert_eq!(v.orig[ct_dir::LOW_TO_HIGH].last_seen_ns, 200);
        assert_eq!(v.orig[ct_dir::LOW_TO_HIGH].flags, ok | ct_flags::SEEN_REPLY);
        assert_eq!((v.orig[ct_dir::HIGH_TO_LOW].cookie, v.orig[ct_dir::HIGH_TO_LOW].policy_gen), (7, [3, 4]));
        let (k, v) = find([10, 0, 0, 1]);
        assert_eq!(u16::from_be_bytes(k.dport_be), 443);
        assert_eq!(v.orig[ct_dir::LOW_TO_HIGH].last_seen_ns, 300);
        assert_eq!(v.orig[ct_dir::HIGH_TO_LOW], CtOrig::default());
    }
}
