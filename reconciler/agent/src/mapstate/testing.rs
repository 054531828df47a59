//! The datapath's verdict on a [`MapState`] (a model of the programs' two policy lookups)
//! and the states the tests of plans, fits and the applier share.
use palisade_common::{
    EndpointInfo, POLICY_PREFIX_FIXED, PolicyKey, PolicyLengthsKey, PolicyValue, direction, endpoint_flags,
    policy_flags, policy_length_bit, proto,
};
use palisade_policy::model::Direction;
use palisade_policy::resolve::EntryKey;

use super::{MapState, policy_key, policy_lengths};

pub fn key(direction: Direction, identity: u32, protocol: u8, port: u16, port_prefix_len: u8) -> EntryKey {
    EntryKey { direction, identity, protocol, port, port_prefix_len }
}

pub const IF: u32 = 10;
pub const EP: u16 = 3;
pub const X: u32 = 300;
pub const Y: u32 = 301;

pub fn state(flags: u32, entries: &[(EntryKey, bool)]) -> MapState {
    let mut s = MapState::default();
    s.endpoints.insert(IF, EndpointInfo { endpoint_id: u32::from(EP), identity: 500, flags, ..Default::default() });
    for (k, deny) in entries {
        let (len, key) = policy_key(EP, k);
        let flags = if *deny { policy_flags::DENY } else { 0 };
        s.policy.insert((len, key), PolicyValue { flags, cookie: 1, prefix_len: len });
    }
    s.policy_lengths = policy_lengths(&s.policy);
    s
}

/// The datapath's POLICY lookup (ebpf/programs/src/policy.rs), on a [`MapState`].
pub fn longest(s: &MapState, dir: u8, peer: u32, protocol: u8, port: u16) -> Option<PolicyValue> {
    let bits = *s.policy_lengths.get(&PolicyLengthsKey::new(EP, dir, peer))?;
    let key = PolicyKey::new(EP, dir, peer, protocol, port);
    (POLICY_PREFIX_FIXED..=palisade_common::POLICY_PREFIX_FULL)
        .rev()
        .filter(|len| bits & policy_length_bit(*len) != 0)
        .find_map(|len| s.policy.get(&(len, PolicyKey { prefix_len: 0, ..key.at_prefix(len) })).copied())
}

/// The datapath's verdict for a new flow of peer identity `peer` (true: allowed).
pub fn allowed(s: &MapState, dir: u8, peer: u32, protocol: u8, port: u16) -> bool {
    let Some(info) = s.endpoints.get(&IF) else { return true };
    let bit =
        if dir == direction::INGRESS { endpoint_flags::INGRESS_ENFORCED } else { endpoint_flags::EGRESS_ENFORCED };
    if info.flags & bit == 0 {
        return true;
    }
    let deny = |v: &PolicyValue| v.flags & policy_flags::DENY != 0;
    let exact = longest(s, dir, peer, protocol, port);
    if exact.as_ref().is_some_and(deny) {
        return false;
    }
    let any = longest(s, dir, 0, protocol, port);
    if any.as_ref().is_some_and(deny) {
        return false;
    }
    exact.is_some() || any.is_some()
}

pub type Flow = (u8, u32, u8, u16);

pub fn flows() -> Vec<Flow> {
    let mut out = Vec::new();
    for dir in [direction::INGRESS, direction::EGRESS] {
        for peer in [X, Y] {
            for protocol in [proto::TCP, proto::UDP] {
                for port in [53, 79, 80, 81, 82, 443] {
                    out.push((dir, peer, protocol, port));
                }
            }
        }
    }
    out
}

pub const BOTH: u32 = endpoint_flags::INGRESS_ENFORCED | endpoint_flags::EGRESS_ENFORCED;

pub fn ing(identity: u32, protocol: u8, port: u16, port_prefix_len: u8) -> EntryKey {
    key(Direction::Ingress, identity, protocol, port, port_prefix_len)
}

/// (name, before, after): changes where old and new entries overlap in what they allow.
pub fn transitions() -> Vec<(&'static str, MapState, MapState)> {
    vec![
        (
            "any peer to one identity",
            state(BOTH, &[(ing(0, proto::TCP, 80, 16), false)]),
            state(BOTH, &[(ing(X, proto::TCP, 80, 16), false)]),
        ),
        (
            "one identity to any peer",
            state(BOTH, &[(ing(X, proto::TCP, 80, 16), false)]),
            state(BOTH, &[(ing(0, proto::TCP, 80, 16), false)]),
        ),
        (
            "range to exact ports",
            state(BOTH, &[(ing(X, proto::TCP, 80, 15), false)]),
            state(BOTH, &[(ing(X, proto::TCP, 80, 16), false), (ing(X, proto::TCP, 81, 16), false)]),
        ),
        (
            "exact port to any port",
            state(BOTH, &[(ing(X, proto::TCP, 80, 16), false)]),
            state(BOTH, &[(ing(X, proto::TCP, 0, 0), false)]),
        ),
        (
            "enforcement switched on",
            state(0, &[]),
            state(BOTH, &[(ing(X, proto::TCP, 80, 16), false), (ing(Y, 0, 0, 0), false)]),
        ),
        ("enforcement switched off", state(BOTH, &[(ing(X, proto::TCP, 80, 16), false)]), state(0, &[])),
        (
            "deny narrowed",
            state(BOTH, &[(ing(Y, 0, 0, 0), true), (ing(0, proto::TCP, 80, 16), false)]),
            state(BOTH, &[(ing(Y, proto::TCP, 80, 16), true), (ing(0, proto::TCP, 80, 16), false)]),
        ),
        (
            // Both bitmaps are updated, one loses /88, the other gains it: clearing first
            // would drop X's TCP/80 in between.
            "a length moves between two bitmaps",
            state(
                BOTH,
                &[
                    (ing(0, proto::TCP, 80, 16), false),
                    (ing(0, proto::UDP, 0, 0), false),
                    (ing(X, proto::UDP, 0, 0), false),
                ],
            ),
            state(
                BOTH,
                &[
                    (ing(0, proto::UDP, 0, 0), false),
                    (ing(X, proto::UDP, 0, 0), false),
                    (ing(X, proto::TCP, 80, 16), false),
                ],
            ),
        ),
    ]
}

pub fn two_endpoints() -> MapState {
    let mut s = MapState::default();
    for (ifindex, id) in [(10, 1u16), (11, 2)] {
        s.endpoints.insert(ifindex, EndpointInfo { endpoint_id: u32::from(id), flags: BOTH, ..Default::default() });
        for port in [80, 81, 82] {
            let (len, k) = policy_key(id, &ing(X, proto::TCP, port, 16));
            s.policy.insert((len, k), PolicyValue { flags: 0, cookie: 1, prefix_len: len });
        }
        let (len, k) = policy_key(id, &key(Direction::Egress, Y, 0, 0, 0));
        s.policy.insert((len, k), PolicyValue { flags: 0, cookie: 1, prefix_len: len });
    }
    s.policy_lengths = policy_lengths(&s.policy);
    s
}

pub fn allowed_for(s: &MapState, ifindex: u32, ep: u16, dir: u8, peer: u32, protocol: u8, port: u16) -> bool {
    // Re-key endpoint `ep` as the one `allowed` looks at.
    let mut t = MapState::default();
    t.endpoints.insert(IF, EndpointInfo { endpoint_id: u32::from(EP), ..s.endpoints[&ifindex] });
    for ((len, k), v) in &s.policy {
        if k.endpoint_id() == ep {
            let k = PolicyKey { endpoint_id_be: EP.to_be_bytes(), ..*k };
            t.policy.insert((*len, k), *v);
        }
    }
    t.policy_lengths = policy_lengths(&t.policy);
    allowed(&t, dir, peer, protocol, port)
}

/// Fake maps holding `state`, written through the applier.
pub fn fake_holding(state: &MapState) -> crate::datapath::FakeMaps {
    let mut fake = crate::datapath::FakeMaps::new();
    let p = super::plan(state, &MapState::default());
    crate::datapath::apply_plan(&mut fake, &p, &MapState::default(), &super::MapLimits::UNLIMITED)
        .expect("the fake maps take any state");
    assert_eq!(&fake.state(), state);
    fake
}
