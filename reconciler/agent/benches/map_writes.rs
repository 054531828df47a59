//! Map write benchmark: how many entries per second the map writer puts into and takes out
//! of the kernel maps, one `BPF_MAP_UPDATE_ELEM` / `BPF_MAP_DELETE_ELEM` per entry against
//! `BPF_MAP_UPDATE_BATCH` / `BPF_MAP_DELETE_BATCH` (4096 entries per call), through the same
//! calls the map writer makes ([`MapSet::upsert`], [`MapSet::delete`], and a whole plan
//! with [`apply_plan`]), and the drift check's full read of the maps ([`read_state`]:
//! entry by entry, or `BPF_MAP_LOOKUP_BATCH` for the hash maps).
//!
//! ```text
//! sudo cargo bench -p palisade-agent --bench map_writes
//! ... --bench map_writes -- --entries 100000 --runs 5
//! ```
//!
//! Needs root and bpffs at /sys/fs/bpf. The maps live in a private pin directory
//! (`/sys/fs/bpf/palisade-bench-mw-<pid>`) removed on exit, also on panic.
use std::path::PathBuf;
use std::time::{Duration, Instant};

use aya::maps::lpm_trie::Key;
use palisade_agent::actors::map_writer::{apply_plan, read_state};
use palisade_agent::datapath::{Datapath, DatapathConfig, MapSet, WritableMap, WriteMode, map_limits};
use palisade_agent::mapstate::{MapState, plan, policy_lengths};
use palisade_common::{
    EndpointInfo, IpcacheValue, Ipv4Prefix, POLICY_PREFIX_FULL, PolicyKey, PolicyValue, endpoint_flags, proto,
};

struct Pins(PathBuf);

impl Drop for Pins {
    fn drop(&mut self) {
        if let Err(e) = Datapath::uninstall(&self.0) {
            eprintln!("cleaning up {}: {e}", self.0.display());
        }
    }
}

fn policy_entries(n: u32) -> Vec<(PolicyKey, PolicyValue)> {
    (0..n)
        .map(|i| {
            let ep = (i / 2000) as u16 + 1;
            let k = PolicyKey::new(ep, (i % 2) as u8, 256 + i / 2, proto::TCP, 80 + (i % 7) as u16)
                .at_prefix(POLICY_PREFIX_FULL);
            (k, PolicyValue { flags: 0, cookie: i, prefix_len: POLICY_PREFIX_FULL })
        })
        .collect()
}

fn host_entries(n: u32) -> Vec<(Ipv4Prefix, IpcacheValue)> {
    (0..n)
        .map(|i| (Ipv4Prefix { addr: (0x0a00_0000 + i).to_be_bytes() }, IpcacheValue { identity: i, flags: 0 }))
        .collect()
}

fn trie_entries(n: u32) -> Vec<(Key<Ipv4Prefix>, IpcacheValue)> {
    (0..n)
        .map(|i| {
            (
                Key::new(24, Ipv4Prefix { addr: (0x0b00_0000 + (i << 8)).to_be_bytes() }),
                IpcacheValue { identity: i, flags: 0 },
            )
        })
        .collect()
}

/// A realistic desired state: `n` policy entries over endpoints of 2000 entries each, one
/// ipcache host entry per peer identity.
fn desired(n: u32) -> MapState {
    let mut s = MapState::default();
    for ((k, v), i) in policy_entries(n).into_iter().zip(0u32..) {
        let ep = k.endpoint_id();
        s.endpoints.insert(
            1000 + u32::from(ep),
            EndpointInfo {
                endpoint_id: u32::from(ep),
                identity: 100_000 + u32::from(ep),
                flags: endpoint_flags::INGRESS_ENFORCED | endpoint_flags::EGRESS_ENFORCED,
                ..Default::default()
            },
        );
        s.policy.insert((POLICY_PREFIX_FULL, PolicyKey { prefix_len: 0, ..k }), v);
        if i % 2 == 0 {
            s.ipcache_host_v4.insert(
                Ipv4Prefix { addr: (0x0a00_0000 + i).to_be_bytes() },
                IpcacheValue { identity: k.identity(), flags: 0 },
            );
        }
    }
    s.policy_lengths = policy_lengths(&s.policy);
    s
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

fn main() {
    let mut entries: u32 = 100_000;
    let mut runs = 3;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--entries" => entries = args.next().and_then(|v| v.parse().ok()).expect("--entries N"),
            "--runs" => runs = args.next().and_then(|v| v.parse().ok()).expect("--runs N"),
            "--bench" => {}
            other => panic!("unknown argument {other}; use --entries N --runs N"),
        }
    }
    assert!(nix::unistd::geteuid().is_root(), "the benchmark loads eBPF maps: run it as root");
    let pins = Pins(PathBuf::from(format!("/sys/fs/bpf/palisade-bench-mw-{}", std::process::id())));
    let mut dp = Datapath::load(&DatapathConfig { pin_dir: pins.0.clone() }).expect("the datapath loads");
    let mut maps: MapSet = dp.take_maps().unwrap();
    let limits = map_limits(&maps).unwrap();

    let policy = policy_entries(entries);
    let policy_keys: Vec<PolicyKey> = policy.iter().map(|(k, _)| *k).collect();
    let hosts = host_entries(entries);
    let host_keys: Vec<Ipv4Prefix> = hosts.iter().map(|(k, _)| *k).collect();
    let tries = trie_entries(entries.min(65_536));
    let trie_keys: Vec<Key<Ipv4Prefix>> = tries.iter().map(|(k, _)| *k).collect();
    let state = desired(entries);
    let plan_ops = plan(&state, &MapState::default()).len();

    println!("map writes: {entries} entries per case ({} for the LPM trie), median of {runs} runs", tries.len());
    println!("{:<34} {:>14} {:>14} {:>8}", "case", "per entry /s", "batched /s", "ratio");
    let mut cases: Vec<(&str, usize, [Vec<Duration>; 2])> = vec![
        ("POLICY (hash) insert", policy.len(), Default::default()),
        ("POLICY (hash) delete", policy.len(), Default::default()),
        ("IPCACHE_HOST_V4 (hash) insert", hosts.len(), Default::default()),
        ("IPCACHE_HOST_V4 (hash) delete", hosts.len(), Default::default()),
        ("IPCACHE_V4 (LPM trie) insert", tries.len(), Default::default()),
        ("IPCACHE_V4 (LPM trie) delete", tries.len(), Default::default()),
        ("whole plan from empty (ops)", plan_ops, Default::default()),
        ("whole plan to empty (ops)", plan_ops, Default::default()),
    ];
    // The drift check's full read of the maps (entry by entry, as `read_state` does).
    let mut dumps: [Vec<Duration>; 2] = Default::default();
    let dump_entries =
        state.policy.len() + state.policy_lengths.len() + state.endpoints.len() + state.ipcache_host_v4.len();
    for _ in 0..runs {
        for (mi, mode) in [WriteMode::PerEntry, WriteMode::Batched].into_iter().enumerate() {
            maps.set_write_mode(mode);
            let mut time = |i: usize, f: &mut dyn FnMut(&mut MapSet)| {
                let t = Instant::now();
                f(&mut maps);
                cases[i].2[mi].push(t.elapsed());
            };
            time(0, &mut |m| m.upsert(WritableMap::Policy, &policy).unwrap());
            time(1, &mut |m| m.delete(WritableMap::Policy, &policy_keys).unwrap());
            time(2, &mut |m| m.upsert(WritableMap::IpcacheHostV4, &hosts).unwrap());
            time(3, &mut |m| m.delete(WritableMap::IpcacheHostV4, &host_keys).unwrap());
            time(4, &mut |m| m.upsert(WritableMap::IpcacheV4, &tries).unwrap());
            time(5, &mut |m| m.delete(WritableMap::IpcacheV4, &trie_keys).unwrap());
            let empty = MapState::default();
            let fill = plan(&state, &empty);
            time(6, &mut |m| apply_plan(m, &fill, &empty, &limits).unwrap());
            let t = Instant::now();
            let read = read_state(&maps).unwrap();
            dumps[mi].push(t.elapsed());
            assert_eq!(read, state, "the plan loaded the state");
            let drain = plan(&empty, &state);
            let mut time = |i: usize, f: &mut dyn FnMut(&mut MapSet)| {
                let t = Instant::now();
                f(&mut maps);
                cases[i].2[mi].push(t.elapsed());
            };
            time(7, &mut |m| apply_plan(m, &drain, &state, &limits).unwrap());
            assert_eq!(read_state(&maps).unwrap(), empty, "the plan emptied the maps");
        }
    }
    for (name, n, [single, batched]) in cases {
        let (s, b) = (rate(n, median(single)), rate(n, median(batched)));
        println!("{name:<34} {s:>14.0} {b:>14.0} {:>7.1}x", b / s);
    }
    let [single, batched] = dumps;
    let (s, b) = (median(single), median(batched));
    println!(
        "{:<34} {:>14.0} {:>14.0} {:>7.1}x   ({dump_entries} entries: {:.0} ms / {:.0} ms)",
        "full read (drift check)",
        rate(dump_entries, s),
        rate(dump_entries, b),
        s.as_secs_f64() / b.as_secs_f64(),
        s.as_secs_f64() * 1000.0,
        b.as_secs_f64() * 1000.0
    );
    println!("maps the kernel refused batches for: {:?}", maps.unbatched_maps());
    drop(maps);
    drop(dp);
    drop(pins);
}
