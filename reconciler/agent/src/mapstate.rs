//! The kernel's view of policy, as plain values: what the maps should hold ([`MapState`]),
//! built from the resolver's output by [`encode`], and the smallest set of changes that
//! turns what is loaded into what is desired ([`Plan`], made by [`plan`]).
//!
//! This is the one adapter between the policy model (which knows nothing of BPF) and the
//! map encoding. It does no I/O, so plans can be printed, tested and snapshotted.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{Ipv4Addr, Ipv6Addr};

use palisade_common::{
    EndpointInfo, IpcacheValue, Ipv4Prefix, Ipv6Prefix, POLICY_PREFIX_FIXED, POLICY_PREFIX_PROTO, PolicyKey,
    PolicyLengthsKey, PolicyValue, direction, endpoint_flags, policy_flags, policy_length_bit,
};
use palisade_policy::model::Direction;
use palisade_policy::resolve::{DesiredState, EntryKey, RuleOrigin};
use serde::Serialize;

/// A local endpoint as the map writer needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointMapping {
    pub id: u16,
    pub ifindex: u32,
    pub identity: u32,
    pub ipv4: Option<Ipv4Addr>,
    pub ipv6: Option<Ipv6Addr>,
}

/// An IPv4 ipcache key: (prefix length, address).
pub type V4Key = (u32, Ipv4Prefix);
/// An IPv6 ipcache key: (prefix length, address).
pub type V6Key = (u32, Ipv6Prefix);
/// A policy key with its prefix length.
pub type PolicyMapKey = (u32, PolicyKey);

/// Contents of the maps the agent owns (not conntrack, events or counters).
///
/// The ipcache is split the way the datapath reads it: host entries (/32, /128) in hash
/// maps, which the programs look up first (a host entry is always the longest prefix, and a
/// hash lookup costs the same at any size), every shorter prefix in the LPM tries.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapState {
    pub endpoints: BTreeMap<u32, EndpointInfo>,
    /// Prefixes shorter than /32.
    pub ipcache_v4: BTreeMap<V4Key, IpcacheValue>,
    /// Prefixes shorter than /128.
    pub ipcache_v6: BTreeMap<V6Key, IpcacheValue>,
    /// /32 host entries.
    pub ipcache_host_v4: BTreeMap<Ipv4Prefix, IpcacheValue>,
    /// /128 host entries.
    pub ipcache_host_v6: BTreeMap<Ipv6Prefix, IpcacheValue>,
    /// Policy entries by (prefix length, key); the key's own `prefix_len` byte is zero here
    /// (the map writer cuts keys with [`PolicyKey::at_prefix`] when it writes them).
    pub policy: BTreeMap<PolicyMapKey, PolicyValue>,
    /// For every (endpoint, direction, identity) with policy entries, the bitmap of their
    /// prefix lengths ([`policy_length_bit`]): the lengths the datapath probes.
    pub policy_lengths: BTreeMap<PolicyLengthsKey, u32>,
}

/// Gives every distinct set of rule origins a stable number (the `cookie` in policy
/// values and verdict events), so the datapath can say which policies decided.
#[derive(Debug, Default)]
pub struct CookieJar {
    by_origins: HashMap<BTreeSet<RuleOrigin>, u32>,
    by_cookie: BTreeMap<u32, BTreeSet<RuleOrigin>>,
    next: u32,
}

impl CookieJar {
    pub fn cookie(&mut self, origins: &BTreeSet<RuleOrigin>) -> u32 {
        if let Some(c) = self.by_origins.get(origins) {
            return *c;
        }
        self.next += 1;
        let c = self.next;
        self.by_origins.insert(origins.clone(), c);
        self.by_cookie.insert(c, origins.clone());
        c
    }

    pub fn origins(&self, cookie: u32) -> Option<&BTreeSet<RuleOrigin>> {
        self.by_cookie.get(&cookie)
    }

    /// Forgets cookies not in `live`, so the jar does not grow without bound.
    pub fn retain(&mut self, live: &BTreeSet<u32>) {
        self.by_cookie.retain(|c, _| live.contains(c));
        self.by_origins.retain(|_, c| live.contains(c));
    }
}

/// The BPF direction byte of a policy direction.
pub fn direction_byte(d: Direction) -> u8 {
    match d {
        Direction::Ingress => direction::INGRESS,
        Direction::Egress => direction::EGRESS,
    }
}

/// The BPF key and prefix length of a resolved entry.
pub fn policy_key(endpoint_id: u16, k: &EntryKey) -> PolicyMapKey {
    let prefix = if k.protocol == 0 { POLICY_PREFIX_FIXED } else { POLICY_PREFIX_PROTO + u32::from(k.port_prefix_len) };
    let (protocol, port) = if k.protocol == 0 {
        (0, 0)
    } else if k.port_prefix_len == 0 {
        (k.protocol, 0)
    } else {
        // Bits below the prefix are zero, so equal entries have equal keys.
        let mask = u16::MAX.checked_shl(16 - u32::from(k.port_prefix_len)).unwrap_or(0);
        (k.protocol, k.port & mask)
    };
    (prefix, PolicyKey::new(endpoint_id, direction_byte(k.direction), k.identity, protocol, port))
}

/// Encodes the desired state for the kernel. `ipcache` maps prefixes to identities; host
/// prefixes (/32, /128) go to the host maps, shorter ones to the LPM tries.
pub fn encode(
    desired: &DesiredState,
    endpoints: &[EndpointMapping],
    ipcache: &BTreeMap<(std::net::IpAddr, u8), u32>,
    cookies: &mut CookieJar,
) -> MapState {
    let mut out = MapState::default();
    for ep in endpoints {
        let pol = desired.endpoints.get(&ep.id);
        let mut flags = 0;
        if pol.is_some_and(|p| p.ingress_enforced) {
            flags |= endpoint_flags::INGRESS_ENFORCED;
        }
        if pol.is_some_and(|p| p.egress_enforced) {
            flags |= endpoint_flags::EGRESS_ENFORCED;
        }
        let mut info =
            EndpointInfo { endpoint_id: u32::from(ep.id), identity: ep.identity, flags, ..Default::default() };
        if let Some(v4) = ep.ipv4 {
            info.flags |= endpoint_flags::HAS_IPV4;
            info.ipv4 = v4.octets();
        }
        if let Some(v6) = ep.ipv6 {
            info.flags |= endpoint_flags::HAS_IPV6;
            info.ipv6 = v6.octets();
        }
        out.endpoints.insert(ep.ifindex, info);
        if let Some(pol) = pol {
            for (k, v) in &pol.entries {
                let (prefix, key) = policy_key(ep.id, k);
                let value = PolicyValue {
                    flags: if v.deny { policy_flags::DENY } else { 0 },
                    cookie: cookies.cookie(&v.origins),
                    prefix_len: prefix,
                };
                out.policy.insert((prefix, key), value);
            }
        }
    }
    out.policy_lengths = policy_lengths(&out.policy);
    for ((addr, len), identity) in ipcache {
        let value = IpcacheValue { identity: *identity, flags: 0 };
        match addr {
            std::net::IpAddr::V4(a) if *len >= 32 => {
                out.ipcache_host_v4.insert(Ipv4Prefix { addr: a.octets() }, value);
            }
            std::net::IpAddr::V4(a) => {
                out.ipcache_v4.insert((u32::from(*len), Ipv4Prefix { addr: a.octets() }), value);
            }
            std::net::IpAddr::V6(a) if *len >= 128 => {
                out.ipcache_host_v6.insert(Ipv6Prefix { addr: a.octets() }, value);
            }
            std::net::IpAddr::V6(a) => {
                out.ipcache_v6.insert((u32::from(*len), Ipv6Prefix { addr: a.octets() }), value);
            }
        }
    }
    out
}

/// The POLICY_LENGTHS content for `policy`: per (endpoint, direction, identity), the bitmap
/// of its entries' prefix lengths.
pub fn policy_lengths(policy: &BTreeMap<PolicyMapKey, PolicyValue>) -> BTreeMap<PolicyLengthsKey, u32> {
    let mut out: BTreeMap<PolicyLengthsKey, u32> = BTreeMap::new();
    for (prefix, key) in policy.keys() {
        *out.entry(key.lengths_key()).or_default() |= policy_length_bit(*prefix);
    }
    out
}

/// Changes to one map: upserts (adds and updates) applied before deletes, so that an
/// allowed flow never sees a transient gap.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MapPlan<K, V> {
    pub adds: Vec<(K, V)>,
    pub updates: Vec<(K, V)>,
    pub deletes: Vec<K>,
}

impl<K, V> Default for MapPlan<K, V> {
    fn default() -> Self {
        MapPlan { adds: Vec::new(), updates: Vec::new(), deletes: Vec::new() }
    }
}

impl<K, V> MapPlan<K, V> {
    pub fn is_empty(&self) -> bool {
        self.adds.is_empty() && self.updates.is_empty() && self.deletes.is_empty()
    }
    pub fn len(&self) -> usize {
        self.adds.len() + self.updates.len() + self.deletes.len()
    }
}

fn diff<K: Ord + Clone, V: PartialEq + Clone>(desired: &BTreeMap<K, V>, loaded: &BTreeMap<K, V>) -> MapPlan<K, V> {
    let mut p = MapPlan::default();
    for (k, v) in desired {
        match loaded.get(k) {
            None => p.adds.push((k.clone(), v.clone())),
            Some(old) if old != v => p.updates.push((k.clone(), v.clone())),
            Some(_) => {}
        }
    }
    for k in loaded.keys() {
        if !desired.contains_key(k) {
            p.deletes.push(k.clone());
        }
    }
    p
}

/// The changes that turn `loaded` into `desired`, map by map.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub endpoints: MapPlan<u32, EndpointInfo>,
    pub ipcache_v4: MapPlan<V4Key, IpcacheValue>,
    pub ipcache_v6: MapPlan<V6Key, IpcacheValue>,
    pub ipcache_host_v4: MapPlan<Ipv4Prefix, IpcacheValue>,
    pub ipcache_host_v6: MapPlan<Ipv6Prefix, IpcacheValue>,
    pub policy: MapPlan<PolicyMapKey, PolicyValue>,
    pub policy_lengths: MapPlan<PolicyLengthsKey, u32>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
            && self.ipcache_v4.is_empty()
            && self.ipcache_v6.is_empty()
            && self.ipcache_host_v4.is_empty()
            && self.ipcache_host_v6.is_empty()
            && self.policy.is_empty()
            && self.policy_lengths.is_empty()
    }

    /// Number of map operations.
    pub fn len(&self) -> usize {
        self.endpoints.len()
            + self.ipcache_v4.len()
            + self.ipcache_v6.len()
            + self.ipcache_host_v4.len()
            + self.ipcache_host_v6.len()
            + self.policy.len()
            + self.policy_lengths.len()
    }

    /// One line per operation, for logs and snapshots.
    pub fn describe(&self) -> Vec<String> {
        let mut out = Vec::new();
        let ep = |k: &u32, v: &EndpointInfo| {
            format!("endpoint if{k} id={} identity={} flags={:#x}", v.endpoint_id, v.identity, v.flags)
        };
        for (k, v) in &self.endpoints.adds {
            out.push(format!("add {}", ep(k, v)));
        }
        for (k, v) in &self.endpoints.updates {
            out.push(format!("update {}", ep(k, v)));
        }
        let v4 = |(len, p): &V4Key| format!("{}/{len}", Ipv4Addr::from(p.addr));
        let v6 = |(len, p): &V6Key| format!("{}/{len}", Ipv6Addr::from(p.addr));
        let host4 = |p: &Ipv4Prefix| format!("{}/32", Ipv4Addr::from(p.addr));
        let host6 = |p: &Ipv6Prefix| format!("{}/128", Ipv6Addr::from(p.addr));
        for (k, v) in &self.ipcache_v4.adds {
            out.push(format!("add ipcache {} -> {}", v4(k), v.identity));
        }
        for (k, v) in &self.ipcache_v4.updates {
            out.push(format!("update ipcache {} -> {}", v4(k), v.identity));
        }
        for (k, v) in &self.ipcache_v6.adds {
            out.push(format!("add ipcache {} -> {}", v6(k), v.identity));
        }
        for (k, v) in &self.ipcache_v6.updates {
            out.push(format!("update ipcache {} -> {}", v6(k), v.identity));
        }
        for (k, v) in &self.ipcache_host_v4.adds {
            out.push(format!("add ipcache {} -> {}", host4(k), v.identity));
        }
        for (k, v) in &self.ipcache_host_v4.updates {
            out.push(format!("update ipcache {} -> {}", host4(k), v.identity));
        }
        for (k, v) in &self.ipcache_host_v6.adds {
            out.push(format!("add ipcache {} -> {}", host6(k), v.identity));
        }
        for (k, v) in &self.ipcache_host_v6.updates {
            out.push(format!("update ipcache {} -> {}", host6(k), v.identity));
        }
        for (k, v) in &self.policy.adds {
            out.push(format!("add policy {} -> {}", describe_policy_key(k), describe_policy_value(v)));
        }
        for (k, v) in &self.policy.updates {
            out.push(format!("update policy {} -> {}", describe_policy_key(k), describe_policy_value(v)));
        }
        for (k, v) in self.policy_lengths.adds.iter().chain(&self.policy_lengths.updates) {
            out.push(format!("set policy lengths {} -> {}", describe_lengths_key(k), describe_lengths(*v)));
        }
        for k in &self.policy.deletes {
            out.push(format!("delete policy {}", describe_policy_key(k)));
        }
        for k in &self.policy_lengths.deletes {
            out.push(format!("delete policy lengths {}", describe_lengths_key(k)));
        }
        for k in &self.ipcache_v4.deletes {
            out.push(format!("delete ipcache {}", v4(k)));
        }
        for k in &self.ipcache_v6.deletes {
            out.push(format!("delete ipcache {}", v6(k)));
        }
        for k in &self.ipcache_host_v4.deletes {
            out.push(format!("delete ipcache {}", host4(k)));
        }
        for k in &self.ipcache_host_v6.deletes {
            out.push(format!("delete ipcache {}", host6(k)));
        }
        for k in &self.endpoints.deletes {
            out.push(format!("delete endpoint if{k}"));
        }
        out
    }
}

/// A policy key in words: `ep 3 ingress identity 257 TCP/8080`.
pub fn describe_policy_key((prefix, k): &PolicyMapKey) -> String {
    let dir = if k.direction == direction::INGRESS { "ingress" } else { "egress" };
    let id = match k.identity() {
        0 => "any".to_string(),
        n => n.to_string(),
    };
    let l4 = if *prefix <= POLICY_PREFIX_FIXED {
        "any".to_string()
    } else {
        let proto = crate::monitor::protocol_name(k.protocol);
        let port_bits = prefix - POLICY_PREFIX_PROTO;
        match port_bits {
            0 => format!("{proto}/any"),
            16 => format!("{proto}/{}", k.dport()),
            b => {
                let lo = k.dport();
                let hi = lo | (u16::MAX >> b);
                format!("{proto}/{lo}-{hi}")
            }
        }
    };
    format!("ep {} {dir} identity {id} {l4}", k.endpoint_id())
}

/// A POLICY_LENGTHS key in words: `ep 3 ingress identity 257`.
pub fn describe_lengths_key(k: &PolicyLengthsKey) -> String {
    let dir = if k.direction == direction::INGRESS { "ingress" } else { "egress" };
    let id = match k.identity() {
        0 => "any".to_string(),
        n => n.to_string(),
    };
    format!("ep {} {dir} identity {id}", k.endpoint_id())
}

/// A POLICY_LENGTHS bitmap in words: `/64 /72 /88`.
fn describe_lengths(bits: u32) -> String {
    let lens: Vec<String> = (POLICY_PREFIX_FIXED..=palisade_common::POLICY_PREFIX_FULL)
        .filter(|l| bits & policy_length_bit(*l) != 0)
        .map(|l| format!("/{l}"))
        .collect();
    lens.join(" ")
}

fn describe_policy_value(v: &PolicyValue) -> String {
    let action = if v.flags & policy_flags::DENY != 0 { "deny" } else { "allow" };
    format!("{action} cookie {}", v.cookie)
}

/// The smallest set of changes from `loaded` to `desired`.
pub fn plan(desired: &MapState, loaded: &MapState) -> Plan {
    Plan {
        endpoints: diff(&desired.endpoints, &loaded.endpoints),
        ipcache_v4: diff(&desired.ipcache_v4, &loaded.ipcache_v4),
        ipcache_v6: diff(&desired.ipcache_v6, &loaded.ipcache_v6),
        ipcache_host_v4: diff(&desired.ipcache_host_v4, &loaded.ipcache_host_v4),
        ipcache_host_v6: diff(&desired.ipcache_host_v6, &loaded.ipcache_host_v6),
        policy: diff(&desired.policy, &loaded.policy),
        policy_lengths: diff(&desired.policy_lengths, &loaded.policy_lengths),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use palisade_common::proto;
    use palisade_policy::resolve::EntryValue;

    fn key(direction: Direction, identity: u32, protocol: u8, port: u16, port_prefix_len: u8) -> EntryKey {
        EntryKey { direction, identity, protocol, port, port_prefix_len }
    }

    #[test]
    fn policy_key_prefixes() {
        let (p, k) = policy_key(3, &key(Direction::Ingress, 257, proto::TCP, 8080, 16));
        assert_eq!(p, 88);
        assert_eq!(k.dport(), 8080);
        let (p, k) = policy_key(3, &key(Direction::Egress, 0, 0, 0, 0));
        assert_eq!(p, 64);
        assert_eq!((k.protocol, k.dport(), k.identity()), (0, 0, 0));
        let (p, k) = policy_key(3, &key(Direction::Egress, 9, proto::UDP, 8081, 15));
        assert_eq!(p, 87);
        assert_eq!(k.dport(), 8080, "bits below the prefix are cleared");
        assert_eq!(describe_policy_key(&(p, k)), "ep 3 egress identity 9 UDP/8080-8081");
    }

    #[test]
    fn plan_adds_updates_deletes() {
        let mut desired = MapState::default();
        let mut loaded = MapState::default();
        let k1 = policy_key(1, &key(Direction::Ingress, 300, proto::TCP, 80, 16));
        let k2 = policy_key(1, &key(Direction::Ingress, 301, proto::TCP, 80, 16));
        let k3 = policy_key(1, &key(Direction::Ingress, 302, proto::TCP, 80, 16));
        let v = |cookie| PolicyValue { flags: 0, cookie, prefix_len: 88 };
        desired.policy.insert(k1, v(1));
        desired.policy.insert(k2, v(2));
        loaded.policy.insert(k2, v(1));
        loaded.policy.insert(k3, v(1));
        let p = plan(&desired, &loaded);
        assert_eq!(p.policy.adds, vec![(k1, v(1))]);
        assert_eq!(p.policy.updates, vec![(k2, v(2))]);
        assert_eq!(p.policy.deletes, vec![k3]);
        assert!(plan(&desired, &desired).is_empty());
    }

    #[test]
    fn host_prefixes_go_to_the_host_maps() {
        use std::net::IpAddr;
        let mut ipcache = BTreeMap::new();
        ipcache.insert((IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), 32), 300);
        ipcache.insert((IpAddr::V4(Ipv4Addr::new(10, 0, 0, 0)), 8), 301);
        ipcache.insert((IpAddr::V6("fd00::1".parse().unwrap()), 128), 302);
        ipcache.insert((IpAddr::V6("fd00::".parse().unwrap()), 64), 303);
        let s = encode(&DesiredState::default(), &[], &ipcache, &mut CookieJar::default());
        let v = |identity| IpcacheValue { identity, flags: 0 };
        assert_eq!(
            s.ipcache_host_v4.into_iter().collect::<Vec<_>>(),
            vec![(Ipv4Prefix { addr: [10, 0, 0, 1] }, v(300))]
        );
        assert_eq!(
            s.ipcache_v4.into_iter().collect::<Vec<_>>(),
            vec![((8, Ipv4Prefix { addr: [10, 0, 0, 0] }), v(301))]
        );
        let fd1: Ipv6Addr = "fd00::1".parse().unwrap();
        assert_eq!(
            s.ipcache_host_v6.into_iter().collect::<Vec<_>>(),
            vec![(Ipv6Prefix { addr: fd1.octets() }, v(302))]
        );
        assert_eq!(s.ipcache_v6.keys().map(|k| k.0).collect::<Vec<_>>(), vec![64]);
    }

    #[test]
    fn host_entry_in_the_trie_moves_to_the_host_map() {
        // A /32 left in the trie (by an older agent) is re-added as a host entry and then
        // removed from the trie: adds come before deletes, so the address never loses its
        // identity.
        let v = IpcacheValue { identity: 300, flags: 0 };
        let addr = Ipv4Prefix { addr: [10, 0, 0, 1] };
        let mut loaded = MapState::default();
        loaded.ipcache_v4.insert((32, addr), v);
        let mut desired = MapState::default();
        desired.ipcache_host_v4.insert(addr, v);
        let p = plan(&desired, &loaded);
        assert_eq!(p.ipcache_host_v4.adds, vec![(addr, v)]);
        assert_eq!(p.ipcache_v4.deletes, vec![(32, addr)]);
        assert_eq!(p.len(), 2);
        assert_eq!(
            p.describe(),
            vec!["add ipcache 10.0.0.1/32 -> 300".to_string(), "delete ipcache 10.0.0.1/32".to_string()]
        );
        assert!(plan(&desired, &desired).is_empty());
    }

    #[test]
    fn policy_lengths_follow_the_entries() {
        let mut desired = MapState::default();
        let v = PolicyValue { flags: 0, cookie: 1, prefix_len: 88 };
        for k in [
            key(Direction::Ingress, 300, proto::TCP, 80, 16),
            key(Direction::Ingress, 300, proto::TCP, 8080, 15),
            key(Direction::Ingress, 300, 0, 0, 0),
            key(Direction::Egress, 0, proto::UDP, 0, 0),
        ] {
            desired.policy.insert(policy_key(3, &k), v);
        }
        desired.policy_lengths = policy_lengths(&desired.policy);
        let lk = |d, id| PolicyLengthsKey::new(3, d, id);
        assert_eq!(
            desired.policy_lengths.clone().into_iter().collect::<Vec<_>>(),
            vec![
                (lk(direction::INGRESS, 300), policy_length_bit(64) | policy_length_bit(87) | policy_length_bit(88)),
                (lk(direction::EGRESS, 0), policy_length_bit(72)),
            ]
        );
        // Dropping the range entry clears its length; dropping the last egress entry drops
        // the bitmap, after the entry.
        let mut next = desired.clone();
        next.policy.remove(&policy_key(3, &key(Direction::Ingress, 300, proto::TCP, 8080, 15)));
        next.policy.remove(&policy_key(3, &key(Direction::Egress, 0, proto::UDP, 0, 0)));
        next.policy_lengths = policy_lengths(&next.policy);
        let p = plan(&next, &desired);
        assert_eq!(
            p.describe(),
            vec![
                "set policy lengths ep 3 ingress identity 300 -> /64 /88",
                "delete policy ep 3 egress identity any UDP/any",
                "delete policy ep 3 ingress identity 300 TCP/8080-8081",
                "delete policy lengths ep 3 egress identity any",
            ]
        );
    }

    #[test]
    fn cookies_are_stable_per_origin_set() {
        let mut jar = CookieJar::default();
        let o = EntryValue::default().origins;
        let a = jar.cookie(&o);
        assert_eq!(jar.cookie(&o), a);
        jar.retain(&BTreeSet::new());
        assert!(jar.origins(a).is_none());
    }
}
