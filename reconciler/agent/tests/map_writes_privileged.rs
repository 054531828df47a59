//! Kernel tests of the map writer's map access (need root and bpffs at /sys/fs/bpf): bulk
//! writes batched and one at a time, plans applied to real maps, maps near and over their
//! size, drift made through a second handle on the pinned maps and repaired, and pinned maps
//! of another size refused. Every datapath is loaded in a private pin directory
//! (`/sys/fs/bpf/palisade-mw-<pid>-<n>`) removed by a guard even on panic.
mod common;
use common::PinDir;

use palisade_agent::actors::map_writer::{apply_plan, read_state};
use palisade_agent::datapath::{Datapath, DatapathError, MapSet, MapSizes, WritableMap, WriteMode};
use palisade_agent::mapstate::{MapLimits, MapState, plan, policy_lengths};
use palisade_common::{
    EndpointInfo, IpcacheValue, Ipv4Prefix, POLICY_PREFIX_FULL, PolicyKey, PolicyLengthsKey, PolicyValue, direction,
    endpoint_flags, map_names, proto,
};

struct Fixture {
    // Field order is drop order: handles first, then the pins.
    maps: MapSet,
    _dp: Datapath,
    pins: PinDir,
}

fn load(sizes: &[&str]) -> Fixture {
    let pins = PinDir::new("mw");
    let sizes = MapSizes::with_overrides(sizes).unwrap();
    let mut dp = Datapath::load_with_sizes(&pins.config(), &sizes).expect("the datapath loads");
    let maps = dp.take_maps().unwrap();
    Fixture { maps, _dp: dp, pins }
}

fn limits(maps: &MapSet) -> MapLimits {
    let m = |w| maps.max_entries(w).unwrap();
    MapLimits {
        endpoints: m(WritableMap::Endpoints),
        ipcache_v4: m(WritableMap::IpcacheV4),
        ipcache_v6: m(WritableMap::IpcacheV6),
        ipcache_host_v4: m(WritableMap::IpcacheHostV4),
        ipcache_host_v6: m(WritableMap::IpcacheHostV6),
        policy: m(WritableMap::Policy),
        policy_lengths: m(WritableMap::PolicyLengths),
    }
}

/// `n` policy entries of endpoint `ep`, ingress, one per peer identity starting at `first`.
fn state(ep: u16, first: u32, n: u32) -> MapState {
    let mut s = MapState::default();
    s.endpoints.insert(
        100 + u32::from(ep),
        EndpointInfo {
            endpoint_id: u32::from(ep),
            identity: 1000,
            flags: endpoint_flags::INGRESS_ENFORCED,
            ..Default::default()
        },
    );
    for id in first..first + n {
        let k = PolicyKey::new(ep, direction::INGRESS, id, proto::TCP, 80);
        s.policy.insert((POLICY_PREFIX_FULL, k), PolicyValue { flags: 0, cookie: 1, prefix_len: POLICY_PREFIX_FULL });
        s.ipcache_host_v4
            .insert(Ipv4Prefix { addr: [10, 1, (id >> 8) as u8, id as u8] }, IpcacheValue { identity: id, flags: 0 });
    }
    s.policy_lengths = policy_lengths(&s.policy);
    s
}

fn policy_entries(n: u32) -> Vec<(PolicyKey, PolicyValue)> {
    (0..n)
        .map(|i| {
            let k = PolicyKey::new(1, direction::INGRESS, 300 + i, proto::TCP, 80).at_prefix(POLICY_PREFIX_FULL);
            (k, PolicyValue { flags: 0, cookie: i, prefix_len: POLICY_PREFIX_FULL })
        })
        .collect()
}

#[test]
fn bulk_writes_batched_and_one_at_a_time_privileged() {
    for mode in [WriteMode::Batched, WriteMode::PerEntry] {
        let mut f = load(&[]);
        f.maps.set_write_mode(mode);
        let entries = policy_entries(5000);
        f.maps.upsert(WritableMap::Policy, &entries).unwrap();
        let loaded = read_state(&f.maps).unwrap();
        assert_eq!(loaded.policy.len(), 5000, "{mode:?}");
        for (k, v) in &entries {
            assert_eq!(f.maps.policy.get(k, 0).unwrap(), *v, "{mode:?}");
        }
        // Replacing values in place.
        let replaced: Vec<_> = entries.iter().map(|(k, v)| (*k, PolicyValue { cookie: v.cookie + 1, ..*v })).collect();
        f.maps.upsert(WritableMap::Policy, &replaced).unwrap();
        assert_eq!(f.maps.policy.get(&replaced[42].0, 0).unwrap().cookie, 43);
        // Deleting, with keys that are not there among them (skipped, not an error).
        let mut keys: Vec<PolicyKey> = entries.iter().map(|(k, _)| *k).collect();
        f.maps.delete(WritableMap::Policy, &keys[..100]).unwrap();
        keys.insert(3, PolicyKey::new(9, direction::EGRESS, 1, proto::UDP, 53).at_prefix(POLICY_PREFIX_FULL));
        f.maps.delete(WritableMap::Policy, &keys).unwrap();
        assert!(read_state(&f.maps).unwrap().policy.is_empty(), "{mode:?}");
        // Hash maps take batches on this kernel; LPM tries may not (then one at a time).
        if mode == WriteMode::Batched {
            assert!(!f.maps.unbatched_maps().contains(&map_names::POLICY), "{:?}", f.maps.unbatched_maps());
        }
    }
}

#[test]
fn lpm_trie_writes_work_whatever_the_kernel_batches_privileged() {
    use aya::maps::lpm_trie::Key;
    let mut f = load(&[]);
    let entries: Vec<(Key<Ipv4Prefix>, IpcacheValue)> = (0..300u32)
        .map(|i| {
            (
                Key::new(24, Ipv4Prefix { addr: [10, (i >> 8) as u8, i as u8, 0] }),
                IpcacheValue { identity: i, flags: 0 },
            )
        })
        .collect();
    f.maps.upsert(WritableMap::IpcacheV4, &entries).unwrap();
    assert_eq!(read_state(&f.maps).unwrap().ipcache_v4.len(), 300);
    let keys: Vec<Key<Ipv4Prefix>> = entries.iter().map(|(k, _)| *k).collect();
    f.maps.delete(WritableMap::IpcacheV4, &keys).unwrap();
    assert!(read_state(&f.maps).unwrap().ipcache_v4.is_empty());
    eprintln!("maps written one entry at a time on this kernel: {:?}", f.maps.unbatched_maps());
}

#[test]
fn a_full_map_is_a_clear_error_privileged() {
    for mode in [WriteMode::Batched, WriteMode::PerEntry] {
        let mut f = load(&["POLICY=64"]);
        f.maps.set_write_mode(mode);
        assert_eq!(f.maps.max_entries(WritableMap::Policy).unwrap(), 64);
        let err = f.maps.upsert(WritableMap::Policy, &policy_entries(100)).unwrap_err();
        match &err {
            DatapathError::MapFull { map, done, total, .. } => {
                assert_eq!((*map, *done, *total), (map_names::POLICY, 64, 100), "{mode:?}");
            }
            other => panic!("{mode:?}: expected MapFull, got {other:?}"),
        }
        let text = err.to_string();
        assert!(text.contains("POLICY is full") && text.contains("--map-size POLICY="), "{text}");
    }
}

#[test]
fn plans_apply_to_real_maps_even_near_their_size_privileged() {
    // 40 entries loaded, 40 others wanted, room for 64: old and new together do not fit, so
    // the adds that do not fit wait for the deletes.
    let mut f = load(&["POLICY=64", "IPCACHE_HOST_V4=64"]);
    let lim = limits(&f.maps);
    let old = state(1, 300, 40);
    let p = plan(&old, &MapState::default());
    apply_plan(&mut f.maps, &p, &MapState::default(), &lim).unwrap();
    assert_eq!(read_state(&f.maps).unwrap(), old);
    let new = state(1, 1000, 40);
    let p = plan(&new, &old);
    assert_eq!((p.policy.adds.len(), p.policy.deletes.len()), (40, 40));
    apply_plan(&mut f.maps, &p, &old, &lim).unwrap();
    assert_eq!(read_state(&f.maps).unwrap(), new);
    // Read by batch (above) and entry by entry: the same.
    f.maps.set_write_mode(WriteMode::PerEntry);
    assert_eq!(read_state(&f.maps).unwrap(), new);
}

#[test]
fn batched_and_entry_by_entry_reads_agree_privileged() {
    let mut f = load(&[]);
    let lim = limits(&f.maps);
    // More entries than one batch call returns.
    let mut s = state(1, 300, 6000);
    s.endpoints.extend(state(2, 300, 0).endpoints);
    apply_plan(&mut f.maps, &plan(&s, &MapState::default()), &MapState::default(), &lim).unwrap();
    let batched = read_state(&f.maps).unwrap();
    f.maps.set_write_mode(WriteMode::PerEntry);
    let single = read_state(&f.maps).unwrap();
    assert_eq!(batched, single);
    assert_eq!(batched, s);
}

#[test]
fn drift_made_through_the_pins_is_found_and_repaired_privileged() {
    let mut f = load(&[]);
    let lim = limits(&f.maps);
    let applied = state(1, 300, 20);
    apply_plan(&mut f.maps, &plan(&applied, &MapState::default()), &MapState::default(), &lim).unwrap();

    // Someone else, through the pinned maps: deletes one policy entry, alters another,
    // adds a stray one, clears the endpoint's flags and drops an ipcache entry.
    {
        let mut other = MapSet::open_pinned(&f.pins.0).expect("the pinned maps open");
        let ((len, k0), _) = applied.policy.iter().next().unwrap();
        other.policy.remove(&k0.at_prefix(*len)).unwrap();
        let ((len, k1), v1) = applied.policy.iter().nth(1).unwrap();
        other
            .policy
            .insert(k1.at_prefix(*len), PolicyValue { flags: palisade_common::policy_flags::DENY, ..*v1 }, 0)
            .unwrap();
        let stray = PolicyKey::new(1, direction::INGRESS, 7, proto::UDP, 53).at_prefix(POLICY_PREFIX_FULL);
        other.policy.insert(stray, PolicyValue { flags: 0, cookie: 9, prefix_len: POLICY_PREFIX_FULL }, 0).unwrap();
        other.policy_lengths.insert(PolicyLengthsKey::new(1, direction::INGRESS, 7), 1 << 24, 0).unwrap();
        other.endpoints.insert(101, EndpointInfo { flags: 0, ..applied.endpoints[&101] }, 0).unwrap();
        let (host, _) = applied.ipcache_host_v4.iter().next().unwrap();
        other.ipcache_host_v4.remove(host).unwrap();
    }

    let kernel = read_state(&f.maps).unwrap();
    assert_ne!(kernel, applied);
    let repair = plan(&applied, &kernel);
    let d = repair.describe();
    assert_eq!(
        (repair.policy.adds.len(), repair.policy.updates.len(), repair.policy.deletes.len()),
        (1, 1, 1),
        "{d:#?}"
    );
    assert_eq!(repair.endpoints.updates.len(), 1, "{d:#?}");
    assert_eq!(repair.ipcache_host_v4.adds.len(), 1, "{d:#?}");
    assert_eq!(repair.policy_lengths.deletes.len(), 1, "{d:#?}");
    apply_plan(&mut f.maps, &repair, &kernel, &lim).unwrap();
    assert_eq!(read_state(&f.maps).unwrap(), applied);
    assert!(plan(&applied, &read_state(&f.maps).unwrap()).is_empty());
}

#[test]
fn pinned_maps_of_another_size_are_refused_privileged() {
    let f = load(&["POLICY=128"]);
    drop(f.maps);
    #[allow(clippy::used_underscore_binding, reason = "the datapath is kept alive by the fixture and dropped here")]
    drop(f._dp);
    let sizes = MapSizes::with_overrides(&["POLICY=256"]).unwrap();
    let err = Datapath::load_with_sizes(&f.pins.config(), &sizes).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, DatapathError::PinnedMapSize { pinned: 128, configured: 256, .. }), "{text}");
    assert!(text.contains("--map-size POLICY=128"), "{text}");
    // The same size adopts the pinned maps.
    let sizes = MapSizes::with_overrides(&["POLICY=128"]).unwrap();
    Datapath::load_with_sizes(&f.pins.config(), &sizes).expect("the pinned maps are adopted");
}

#[test]
fn map_size_flags_are_checked() {
    assert!(MapSizes::with_overrides(&["POLICY=1024", "ipcache_v4=8"]).is_ok());
    for bad in ["POLICY", "POLICY=x", "POLICY=0", "EVENTS=8", "NOPE=8"] {
        let e = MapSizes::with_overrides(&[bad]).unwrap_err();
        assert!(e.contains("map size"), "{bad}: {e}");
    }
    let s = MapSizes::with_overrides(&["policy=1024"]).unwrap();
    assert_eq!(s.get(map_names::POLICY), 1024);
    assert_eq!(s.get(map_names::ENDPOINTS), palisade_common::map_sizes::ENDPOINTS);
}
