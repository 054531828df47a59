//! An upgrade over the conntrack layout before issue 17 (40-byte key by the flow's first
//! packet, 32-byte value, one entry per flow) carries the live flows over: a flow the
//! programs opened is written into a CONNTRACK map of the old layout (as the old programs
//! kept it), pinned where the agent's maps live; loading the datapath then finds the flow
//! in the new layout, and the flow's reply passes as a reply where policy alone (ingress
//! default deny) drops it. Needs root and bpffs.
mod common;
#[path = "common/frames.rs"]
mod frames;

use std::ffi::CString;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use common::PinDir;
use frames::*;
use palisade_agent::datapath::{Datapath, Hook};
use palisade_common::{CtKey, CtValue, ct_dir, direction, proto, reason};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_MAP_TYPE_HASH: u32 = 1;

fn bpf(cmd: libc::c_long, attr: &mut [u64; 16]) -> libc::c_long {
    // SAFETY: `attr` is a zeroed `bpf_attr` of 128 bytes, the fields of `cmd` set.
    unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), size_of::<[u64; 16]>()) }
}

/// The old CONNTRACK map, pinned at `path`, holding `entries`.
fn pin_old_conntrack(path: &std::path::Path, entries: &[([u8; 40], [u8; 32])]) {
    let mut attr = [0u64; 16];
    // map_type, key_size | value_size, max_entries.
    attr[0] = u64::from(BPF_MAP_TYPE_HASH) | (40u64 << 32);
    attr[1] = 32 | (1024u64 << 32);
    let fd = bpf(BPF_MAP_CREATE, &mut attr);
    assert!(fd >= 0, "BPF_MAP_CREATE: {}", std::io::Error::last_os_error());
    // SAFETY: the kernel just returned this descriptor to us.
    let fd = unsafe { OwnedFd::from_raw_fd(RawFd::try_from(fd).unwrap()) };
    let raw = u64::try_from(std::os::fd::AsRawFd::as_raw_fd(&fd)).unwrap();
    for (k, v) in entries {
        let mut attr = [0u64; 16];
        attr[0] = raw;
        attr[1] = k.as_ptr() as u64;
        attr[2] = v.as_ptr() as u64;
        assert_eq!(bpf(BPF_MAP_UPDATE_ELEM, &mut attr), 0, "update: {}", std::io::Error::last_os_error());
    }
    let c = CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let mut attr = [0u64; 16];
    attr[0] = c.as_ptr() as u64;
    attr[1] = raw;
    assert_eq!(bpf(BPF_OBJ_PIN, &mut attr), 0, "pin {}: {}", path.display(), std::io::Error::last_os_error());
}

/// A flow of the new layout as the old programs kept it: the entry of its first packet's
/// tuple.
fn old_layout(key: &CtKey, value: &CtValue) -> ([u8; 40], [u8; 32]) {
    let o = (0..2).find(|&o| value.orig[o].last_seen_ns != 0).expect("a flow");
    let (src, dst, sport, dport) = if o == ct_dir::LOW_TO_HIGH {
        (key.saddr, key.daddr, key.sport_be, key.dport_be)
    } else {
        (key.daddr, key.saddr, key.dport_be, key.sport_be)
    };
    let mut k = [0u8; 40];
    k[..16].copy_from_slice(&src);
    k[16..32].copy_from_slice(&dst);
    k[32..34].copy_from_slice(&sport);
    k[34..36].copy_from_slice(&dport);
    k[36] = key.protocol;
    k[37] = key.family;
    let f = &value.orig[o];
    let mut v = [0u8; 32];
    v[..8].copy_from_slice(&f.last_seen_ns.to_ne_bytes());
    v[8..16].copy_from_slice(&f.last_seen_ns.to_ne_bytes());
    v[16..20].copy_from_slice(&f.flags.to_ne_bytes());
    v[20..24].copy_from_slice(&f.cookie.to_ne_bytes());
    v[24..28].copy_from_slice(&f.policy_gen[0].to_ne_bytes());
    v[28..32].copy_from_slice(&f.policy_gen[1].to_ne_bytes());
    (k, v)
}

/// The pod may open TCP/8080 to PEER; its ingress is default deny.
fn configure(fx: &mut Fixture) {
    fx.endpoint(LO, enforced_pod());
    fx.host4(POD, 1000, palisade_common::ipcache_flags::LOCAL_ENDPOINT);
    fx.host4(PEER, PEER_ID, 0);
    fx.rule(EP_ID, direction::EGRESS, PEER_ID, proto::TCP, Some(8080), false);
}

#[test]
fn flows_of_the_old_conntrack_layout_are_carried_over_on_upgrade() {
    let syn = ipv4(POD, PEER, proto::TCP, &tcp(40000, 8080, SYN));
    let syn_ack = ipv4(PEER, POD, proto::TCP, &tcp(8080, 40000, SYN | ACK));

    // Without conntrack the reply is just a packet to a default-deny ingress.
    let mut fresh = Fixture::new("ct-upgrade-fresh");
    configure(&mut fresh);
    assert!(fresh.observe(Hook::ToPod, &syn_ack).out.dropped(), "no flow: the ingress denies the reply");

    // The flow opened by the programs, as the old programs would have kept it.
    let mut before = Fixture::new("ct-upgrade-before");
    configure(&mut before);
    assert!(before.observe(Hook::FromPod, &syn).out.passed());
    let flows: Vec<(CtKey, CtValue)> = before.maps.conntrack.iter().map(Result::unwrap).collect();
    assert_eq!(flows.len(), 1, "{flows:?}");
    let old = old_layout(&flows[0].0, &flows[0].1);

    // The upgrade: the old map pinned where the new agent loads its maps.
    let pins = PinDir::new("ct-upgrade");
    std::fs::create_dir_all(&pins.0).unwrap();
    pin_old_conntrack(&pins.0.join("CONNTRACK"), &[old]);
    let mut dp = Datapath::load(&pins.config()).unwrap_or_else(|e| panic!("loading over the old map: {e}"));
    let maps = dp.take_maps().expect("maps");
    let events = dp.take_events().expect("events");
    let mut after = Fixture { dp, maps, events, _pins: pins };
    configure(&mut after);
    let carried: Vec<(CtKey, CtValue)> = after.maps.conntrack.iter().map(Result::unwrap).collect();
    assert_eq!(carried, flows, "the flow is in the new map as the programs keep it");
    let o = after.observe(Hook::ToPod, &syn_ack);
    assert!(o.out.passed(), "the carried flow's reply passes: {o:?}");
    assert_eq!(o.moved, vec![(reason::ALLOWED_REPLY, direction::INGRESS)], "{o:?}");
}
