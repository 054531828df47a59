//! The kernel's view of policy, as plain values: what the maps should hold ([`MapState`]),
//! built from the resolver's output by [`encode`], and the smallest set of changes that
//! turns what is loaded into what is desired ([`Plan`], made by [`plan`]).
//!
//! This is the one adapter between the policy model (which knows nothing of BPF) and the
//! map encoding. It does no I/O, so plans can be printed, tested and snapshotted.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use palisade_common::{
    EndpointInfo, IpcacheValue, Ipv4Prefix, Ipv6Prefix, POLICY_PREFIX_FIXED, POLICY_PREFIX_PROTO, PolicyKey,
    PolicyLengthsKey, PolicyValue, direction, endpoint_flags, policy_flags, policy_length_bit,
};
use palisade_policy::model::Direction;
use palisade_policy::resolve::{DesiredState, EndpointPolicy, EntryKey, RuleOrigin};
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

/// Every endpoint's policy entries as last encoded, with the policy they were encoded
/// from: the resolver hands an unchanged endpoint's policy on as the same shared value, so
/// [`encode_cached`] encodes (and looks up the cookies of) only the endpoints that changed.
#[derive(Debug, Default)]
pub struct EncodeCache {
    endpoints: HashMap<u16, EncodedEndpoint>,
}

/// An endpoint's policy and its entries, encoded.
type EncodedEndpoint = (Arc<EndpointPolicy>, Vec<(PolicyMapKey, PolicyValue)>);

/// Encodes the desired state for the kernel. `ipcache` maps prefixes to identities; host
/// prefixes (/32, /128) go to the host maps, shorter ones to the LPM tries.
pub fn encode(
    desired: &DesiredState,
    endpoints: &[EndpointMapping],
    ipcache: &BTreeMap<(std::net::IpAddr, u8), u32>,
    cookies: &mut CookieJar,
) -> MapState {
    encode_cached(desired, endpoints, ipcache, cookies, &mut EncodeCache::default())
}

/// [`encode`], reusing the entries of endpoints whose policy is the one `cache` encoded.
/// The cache keeps the endpoints encoded this time only (the cookies of others may be
/// gone from the jar).
pub fn encode_cached(
    desired: &DesiredState,
    endpoints: &[EndpointMapping],
    ipcache: &BTreeMap<(std::net::IpAddr, u8), u32>,
    cookies: &mut CookieJar,
    cache: &mut EncodeCache,
) -> MapState {
    let mut out = MapState::default();
    let mut kept = HashMap::with_capacity(endpoints.len());
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
            let entry = match cache.endpoints.remove(&ep.id) {
                Some((p, v)) if Arc::ptr_eq(&p, pol) => (p, v),
                _ => {
                    let v = pol
                        .entries
                        .iter()
                        .map(|(k, v)| {
                            let (prefix, key) = policy_key(ep.id, k);
                            let value = PolicyValue {
                                flags: if v.deny { policy_flags::DENY } else { 0 },
                                cookie: cookies.cookie(&v.origins),
                                prefix_len: prefix,
                            };
                            ((prefix, key), value)
                        })
                        .collect();
                    (pol.clone(), v)
                }
            };
            out.policy.extend(entry.1.iter().copied());
            kept.insert(ep.id, entry);
        }
    }
    cache.endpoints = kept;
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

/// One merge walk over both (sorted) maps.
fn diff<K: Ord + Clone, V: PartialEq + Clone>(desired: &BTreeMap<K, V>, loaded: &BTreeMap<K, V>) -> MapPlan<K, V> {
    use std::cmp::Ordering;
    let mut p = MapPlan::default();
    let (mut d, mut l) = (desired.iter().peekable(), loaded.iter().peekable());
    loop {
        match (d.peek(), l.peek()) {
            (None, None) => break,
            (Some((k, v)), None) => {
                p.adds.push(((*k).clone(), (*v).clone()));
                d.next();
            }
            (None, Some((k, _))) => {
                p.deletes.push((*k).clone());
                l.next();
            }
            (Some((dk, dv)), Some((lk, lv))) => match dk.cmp(lk) {
                Ordering::Less => {
                    p.adds.push(((*dk).clone(), (*dv).clone()));
                    d.next();
                }
                Ordering::Greater => {
                    p.deletes.push((*lk).clone());
                    l.next();
                }
                Ordering::Equal => {
                    if dv != lv {
                        p.updates.push(((*dk).clone(), (*dv).clone()));
                    }
                    d.next();
                    l.next();
                }
            },
        }
    }
    p
}

/// The changes that turn `loaded` into `desired`, map by map.
///
/// The map writer applies them in this order (and [`Plan::describe`] lists them in it), so
/// that no flow allowed before and after sees a drop in between, and an endpoint is only
/// enforced once the entries it needs are there:
///
/// 1. POLICY adds and updates (invisible to the datapath until their length bit is set);
/// 2. POLICY_LENGTHS adds and widening updates: bits are only *set* here (an update that
///    also clears bits writes old | new), so every entry, old or new, stays reachable;
/// 3. ipcache adds and updates (an address moves to its new identity once the new
///    identity's entries are reachable);
/// 4. ENDPOINTS adds and updates (enforcement switches on last);
/// 5. ENDPOINTS deletes;
/// 6. POLICY deletes;
/// 7. POLICY_LENGTHS narrowing updates (`policy_lengths_narrow`: the final bitmaps, which
///    clear the bits of lengths no entry has any more), then POLICY_LENGTHS deletes;
/// 8. ipcache deletes.
///
/// A map near its size cannot hold old and new entries at once: the adds that do not fit
/// beside the old entries wait until that map's deletes are done (see
/// `map_writer::apply_plan`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub endpoints: MapPlan<u32, EndpointInfo>,
    pub ipcache_v4: MapPlan<V4Key, IpcacheValue>,
    pub ipcache_v6: MapPlan<V6Key, IpcacheValue>,
    pub ipcache_host_v4: MapPlan<Ipv4Prefix, IpcacheValue>,
    pub ipcache_host_v6: MapPlan<Ipv6Prefix, IpcacheValue>,
    pub policy: MapPlan<PolicyMapKey, PolicyValue>,
    /// `updates` only set bits (step 2); see `policy_lengths_narrow`.
    pub policy_lengths: MapPlan<PolicyLengthsKey, u32>,
    /// The final bitmaps of updates that clear bits, written after the POLICY deletes.
    pub policy_lengths_narrow: Vec<(PolicyLengthsKey, u32)>,
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
            && self.policy_lengths_narrow.is_empty()
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
            + self.policy_lengths_narrow.len()
    }

    /// One line per operation, in the order the map writer applies them, for logs and
    /// snapshots.
    pub fn describe(&self) -> Vec<String> {
        let mut out = Vec::new();
        let ep = |k: &u32, v: &EndpointInfo| {
            format!("endpoint if{k} id={} identity={} flags={:#x}", v.endpoint_id, v.identity, v.flags)
        };
        let v4 = |(len, p): &V4Key| format!("{}/{len}", Ipv4Addr::from(p.addr));
        let v6 = |(len, p): &V6Key| format!("{}/{len}", Ipv6Addr::from(p.addr));
        let host4 = |p: &Ipv4Prefix| format!("{}/32", Ipv4Addr::from(p.addr));
        let host6 = |p: &Ipv6Prefix| format!("{}/128", Ipv6Addr::from(p.addr));
        // 1. POLICY upserts.
        for (k, v) in &self.policy.adds {
            out.push(format!("add policy {} -> {}", describe_policy_key(k), describe_policy_value(v)));
        }
        for (k, v) in &self.policy.updates {
            out.push(format!("update policy {} -> {}", describe_policy_key(k), describe_policy_value(v)));
        }
        // 2. POLICY_LENGTHS: bits set.
        for (k, v) in self.policy_lengths.adds.iter().chain(&self.policy_lengths.updates) {
            out.push(format!("set policy lengths {} -> {}", describe_lengths_key(k), describe_lengths(*v)));
        }
        // 3. ipcache upserts.
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
        // 4. ENDPOINTS upserts.
        for (k, v) in &self.endpoints.adds {
            out.push(format!("add {}", ep(k, v)));
        }
        for (k, v) in &self.endpoints.updates {
            out.push(format!("update {}", ep(k, v)));
        }
        // 5.-8. Deletes and narrowing.
        for k in &self.endpoints.deletes {
            out.push(format!("delete endpoint if{k}"));
        }
        for k in &self.policy.deletes {
            out.push(format!("delete policy {}", describe_policy_key(k)));
        }
        for (k, v) in &self.policy_lengths_narrow {
            out.push(format!("narrow policy lengths {} -> {}", describe_lengths_key(k), describe_lengths(*v)));
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

/// The smallest set of changes from `loaded` to `desired`, in the order of [`Plan`].
pub fn plan(desired: &MapState, loaded: &MapState) -> Plan {
    let mut lengths = diff(&desired.policy_lengths, &loaded.policy_lengths);
    // Updates of a bitmap: bits are set before the POLICY deletes, cleared after them.
    let mut widen = Vec::new();
    let mut narrow = Vec::new();
    for (k, new) in lengths.updates.drain(..) {
        let old = loaded.policy_lengths.get(&k).copied().unwrap_or(0);
        if new & !old != 0 {
            widen.push((k, new | old));
        }
        if old & !new != 0 {
            narrow.push((k, new));
        }
    }
    lengths.updates = widen;
    Plan {
        endpoints: diff(&desired.endpoints, &loaded.endpoints),
        ipcache_v4: diff(&desired.ipcache_v4, &loaded.ipcache_v4),
        ipcache_v6: diff(&desired.ipcache_v6, &loaded.ipcache_v6),
        ipcache_host_v4: diff(&desired.ipcache_host_v4, &loaded.ipcache_host_v4),
        ipcache_host_v6: diff(&desired.ipcache_host_v6, &loaded.ipcache_host_v6),
        policy: diff(&desired.policy, &loaded.policy),
        policy_lengths: lengths,
        policy_lengths_narrow: narrow,
    }
}

/// The sizes (`max_entries`) of the maps the agent writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapLimits {
    pub endpoints: u32,
    pub ipcache_v4: u32,
    pub ipcache_v6: u32,
    pub ipcache_host_v4: u32,
    pub ipcache_host_v6: u32,
    pub policy: u32,
    pub policy_lengths: u32,
}

impl MapLimits {
    /// No limit (for tests and offline tools).
    pub const UNLIMITED: MapLimits = MapLimits {
        endpoints: u32::MAX,
        ipcache_v4: u32::MAX,
        ipcache_v6: u32::MAX,
        ipcache_host_v4: u32::MAX,
        ipcache_host_v6: u32::MAX,
        policy: u32::MAX,
        policy_lengths: u32::MAX,
    };
}

/// A map the desired state does not fit in.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Overflow {
    /// The map's name (`palisade_common::map_names`).
    pub map: &'static str,
    /// Entries the desired state needs in it.
    pub needed: usize,
    /// Entries it holds at most.
    pub max: u32,
}

/// What fits of a desired state: the state to load, the maps that overflowed and the
/// endpoint directions that fail closed because of it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fitted {
    pub state: MapState,
    pub overflows: Vec<Overflow>,
    /// (endpoint id, direction byte) enforced with no entries: everything denied.
    pub fail_closed: BTreeSet<(u16, u8)>,
    /// Endpoint ids left out of ENDPOINTS (the datapath does not see them at all).
    pub not_loaded: BTreeSet<u16>,
}

/// Cuts `desired` down to what the maps can hold, never by silently dropping entries:
///
/// - POLICY / POLICY_LENGTHS: the entries of one endpoint in one direction are kept or
///   dropped as a whole. Directions are taken in order, those whose entries are already
///   loaded unchanged (`applied`) first, then by endpoint and direction, and kept while
///   they fit; a direction that does not fit *fails closed*: it is marked enforced with no
///   entries, so it denies everything (a subset of what the policy allows) until a later
///   state fits.
/// - ipcache: when a prefix does not fit, a peer could be taken for another identity, so
///   every enforced direction of every endpoint fails closed. The prefixes already loaded
///   are kept first.
/// - ENDPOINTS: an endpoint left out is not seen by the datapath at all; this cannot fail
///   closed, it is reported. Endpoints already loaded are kept first, then by ifindex.
pub fn fit(desired: MapState, limits: &MapLimits, applied: &MapState) -> Fitted {
    let mut s = desired;
    let mut out = Fitted::default();

    // ENDPOINTS.
    if s.endpoints.len() > limits.endpoints as usize {
        out.overflows.push(Overflow {
            map: palisade_common::map_names::ENDPOINTS,
            needed: s.endpoints.len(),
            max: limits.endpoints,
        });
        let mut order: Vec<u32> = s.endpoints.keys().copied().collect();
        order.sort_by_key(|k| (applied.endpoints.get(k) != s.endpoints.get(k), *k));
        for k in order.into_iter().skip(limits.endpoints as usize) {
            if let Some(info) = s.endpoints.remove(&k) {
                let id = info.endpoint_id as u16;
                out.not_loaded.insert(id);
                s.policy.retain(|(_, pk), _| pk.endpoint_id() != id);
            }
        }
    }

    // ipcache.
    let mut ipcache_overflow = false;
    ipcache_overflow |= cut(&mut s.ipcache_v4, &applied.ipcache_v4, limits.ipcache_v4, "IPCACHE_V4", &mut out);
    ipcache_overflow |= cut(&mut s.ipcache_v6, &applied.ipcache_v6, limits.ipcache_v6, "IPCACHE_V6", &mut out);
    ipcache_overflow |=
        cut(&mut s.ipcache_host_v4, &applied.ipcache_host_v4, limits.ipcache_host_v4, "IPCACHE_HOST_V4", &mut out);
    ipcache_overflow |=
        cut(&mut s.ipcache_host_v6, &applied.ipcache_host_v6, limits.ipcache_host_v6, "IPCACHE_HOST_V6", &mut out);
    if ipcache_overflow {
        for info in s.endpoints.values() {
            let id = info.endpoint_id as u16;
            if info.flags & endpoint_flags::INGRESS_ENFORCED != 0 {
                out.fail_closed.insert((id, direction::INGRESS));
            }
            if info.flags & endpoint_flags::EGRESS_ENFORCED != 0 {
                out.fail_closed.insert((id, direction::EGRESS));
            }
        }
    }

    // POLICY and POLICY_LENGTHS, one (endpoint, direction) at a time. (The bitmaps
    // [`encode`] made hold unless endpoints were left out above.)
    if !out.not_loaded.is_empty() {
        s.policy_lengths = policy_lengths(&s.policy);
    }
    let (need_policy, need_lengths) = (s.policy.len(), s.policy_lengths.len());
    let policy_over = need_policy > limits.policy as usize;
    let lengths_over = need_lengths > limits.policy_lengths as usize;
    if policy_over {
        out.overflows.push(Overflow {
            map: palisade_common::map_names::POLICY,
            needed: need_policy,
            max: limits.policy,
        });
    }
    if lengths_over {
        out.overflows.push(Overflow {
            map: palisade_common::map_names::POLICY_LENGTHS,
            needed: need_lengths,
            max: limits.policy_lengths,
        });
    }
    if policy_over || lengths_over {
        let group = |m: &BTreeMap<PolicyMapKey, PolicyValue>| {
            let mut g: BTreeMap<(u16, u8), BTreeMap<PolicyMapKey, PolicyValue>> = BTreeMap::new();
            for (k, v) in m {
                g.entry((k.1.endpoint_id(), k.1.direction)).or_default().insert(*k, *v);
            }
            g
        };
        let wanted = group(&s.policy);
        let loaded = group(&applied.policy);
        let mut order: Vec<(u16, u8)> = wanted.keys().copied().collect();
        order.sort_by_key(|g| (loaded.get(g) != wanted.get(g), *g));
        let (mut used_policy, mut used_lengths) = (0usize, 0usize);
        for g in order {
            let entries = &wanted[&g];
            let lengths: BTreeSet<PolicyLengthsKey> = entries.keys().map(|(_, k)| k.lengths_key()).collect();
            if used_policy + entries.len() <= limits.policy as usize
                && used_lengths + lengths.len() <= limits.policy_lengths as usize
            {
                used_policy += entries.len();
                used_lengths += lengths.len();
            } else {
                out.fail_closed.insert(g);
            }
        }
    }

    // Fail closed: enforced, no entries.
    if !out.fail_closed.is_empty() {
        let closed = &out.fail_closed;
        s.policy.retain(|(_, k), _| !closed.contains(&(k.endpoint_id(), k.direction)));
        for info in s.endpoints.values_mut() {
            let id = info.endpoint_id as u16;
            if closed.contains(&(id, direction::INGRESS)) {
                info.flags |= endpoint_flags::INGRESS_ENFORCED;
            }
            if closed.contains(&(id, direction::EGRESS)) {
                info.flags |= endpoint_flags::EGRESS_ENFORCED;
            }
        }
        // Directions of endpoints not in ENDPOINTS cannot fail closed.
        let present: BTreeSet<u16> = s.endpoints.values().map(|i| i.endpoint_id as u16).collect();
        out.fail_closed.retain(|(id, _)| present.contains(id));
    }
    s.policy_lengths = policy_lengths(&s.policy);
    out.state = s;
    out
}

/// Keeps at most `max` entries of `m`, those in `applied` with the same value first;
/// records an overflow when entries had to go.
fn cut<K: Ord + Clone, V: PartialEq>(
    m: &mut BTreeMap<K, V>,
    applied: &BTreeMap<K, V>,
    max: u32,
    map: &'static str,
    out: &mut Fitted,
) -> bool {
    if m.len() <= max as usize {
        return false;
    }
    out.overflows.push(Overflow { map, needed: m.len(), max });
    let mut order: Vec<K> = m.keys().cloned().collect();
    order.sort_by_key(|k| applied.get(k) != m.get(k));
    for k in order.into_iter().skip(max as usize) {
        m.remove(&k);
    }
    true
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
                "delete policy ep 3 egress identity any UDP/any",
                "delete policy ep 3 ingress identity 300 TCP/8080-8081",
                "narrow policy lengths ep 3 ingress identity 300 -> /64 /88",
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

    // -----------------------------------------------------------------------------------
    // Plan order: no flow allowed (or denied) before and after a change flips in between.

    const IF: u32 = 10;
    const EP: u16 = 3;
    const X: u32 = 300;
    const Y: u32 = 301;

    fn state(flags: u32, entries: &[(EntryKey, bool)]) -> MapState {
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
    fn longest(s: &MapState, dir: u8, peer: u32, protocol: u8, port: u16) -> Option<PolicyValue> {
        let bits = *s.policy_lengths.get(&PolicyLengthsKey::new(EP, dir, peer))?;
        let key = PolicyKey::new(EP, dir, peer, protocol, port);
        (POLICY_PREFIX_FIXED..=palisade_common::POLICY_PREFIX_FULL)
            .rev()
            .filter(|len| bits & policy_length_bit(*len) != 0)
            .find_map(|len| s.policy.get(&(len, PolicyKey { prefix_len: 0, ..key.at_prefix(len) })).copied())
    }

    /// The datapath's verdict for a new flow of peer identity `peer` (true: allowed).
    fn allowed(s: &MapState, dir: u8, peer: u32, protocol: u8, port: u16) -> bool {
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

    type Flow = (u8, u32, u8, u16);

    fn flows() -> Vec<Flow> {
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

    /// Applies `p` to `s` one map operation at a time, in the map writer's order (see
    /// [`Plan`]), calling `check` after each.
    fn apply_stepwise(s: &mut MapState, p: &Plan, check: &mut dyn FnMut(&MapState, &str)) {
        for (k, v) in p.policy.adds.iter().chain(&p.policy.updates) {
            s.policy.insert(*k, *v);
            check(s, "policy upsert");
        }
        for (k, v) in p.policy_lengths.adds.iter().chain(&p.policy_lengths.updates) {
            s.policy_lengths.insert(*k, *v);
            check(s, "lengths set");
        }
        for (k, v) in p.ipcache_v4.adds.iter().chain(&p.ipcache_v4.updates) {
            s.ipcache_v4.insert(*k, *v);
        }
        for (k, v) in p.ipcache_host_v4.adds.iter().chain(&p.ipcache_host_v4.updates) {
            s.ipcache_host_v4.insert(*k, *v);
        }
        for (k, v) in p.ipcache_v6.adds.iter().chain(&p.ipcache_v6.updates) {
            s.ipcache_v6.insert(*k, *v);
        }
        for (k, v) in p.ipcache_host_v6.adds.iter().chain(&p.ipcache_host_v6.updates) {
            s.ipcache_host_v6.insert(*k, *v);
        }
        for (k, v) in p.endpoints.adds.iter().chain(&p.endpoints.updates) {
            s.endpoints.insert(*k, *v);
            check(s, "endpoint upsert");
        }
        for k in &p.endpoints.deletes {
            s.endpoints.remove(k);
            check(s, "endpoint delete");
        }
        for k in &p.policy.deletes {
            s.policy.remove(k);
            check(s, "policy delete");
        }
        for (k, v) in &p.policy_lengths_narrow {
            s.policy_lengths.insert(*k, *v);
            check(s, "lengths narrow");
        }
        for k in &p.policy_lengths.deletes {
            s.policy_lengths.remove(k);
            check(s, "lengths delete");
        }
        for k in &p.ipcache_v4.deletes {
            s.ipcache_v4.remove(k);
        }
        for k in &p.ipcache_host_v4.deletes {
            s.ipcache_host_v4.remove(k);
        }
        for k in &p.ipcache_v6.deletes {
            s.ipcache_v6.remove(k);
        }
        for k in &p.ipcache_host_v6.deletes {
            s.ipcache_host_v6.remove(k);
        }
    }

    /// Flows whose verdict is the same before and after but differs at some step.
    fn transient_flips(before: &MapState, after: &MapState, p: &Plan) -> Vec<String> {
        let stable: Vec<(Flow, bool)> = flows()
            .into_iter()
            .filter_map(|f| {
                let (a, b) = (allowed(before, f.0, f.1, f.2, f.3), allowed(after, f.0, f.1, f.2, f.3));
                (a == b).then_some((f, a))
            })
            .collect();
        let mut flips = Vec::new();
        let mut s = before.clone();
        apply_stepwise(&mut s, p, &mut |s, step| {
            for (f, want) in &stable {
                if allowed(s, f.0, f.1, f.2, f.3) != *want {
                    flips.push(format!("{f:?} {} after {step}", if *want { "dropped" } else { "allowed" }));
                }
            }
        });
        assert_eq!(&s, after, "the plan turns `before` into `after`");
        flips
    }

    const BOTH: u32 = endpoint_flags::INGRESS_ENFORCED | endpoint_flags::EGRESS_ENFORCED;

    fn ing(identity: u32, protocol: u8, port: u16, port_prefix_len: u8) -> EntryKey {
        key(Direction::Ingress, identity, protocol, port, port_prefix_len)
    }

    /// (name, before, after): changes where old and new entries overlap in what they allow.
    fn transitions() -> Vec<(&'static str, MapState, MapState)> {
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

    #[test]
    fn no_flow_flips_while_a_plan_is_applied() {
        for (name, before, after) in transitions() {
            let p = plan(&after, &before);
            assert_eq!(transient_flips(&before, &after, &p), Vec::<String>::new(), "{name}:\n{:#?}", p.describe());
        }
    }

    #[test]
    fn clearing_length_bits_before_the_deletes_would_drop_flows() {
        // The same change with the bitmaps written at their final value up front (no
        // widening step): X's TCP/80 is dropped in between. This is what the two-step
        // POLICY_LENGTHS writes prevent, and what the check above would catch.
        let (_, before, after) = transitions().pop().unwrap();
        let mut naive = plan(&after, &before);
        for (k, v) in naive.policy_lengths_narrow.drain(..) {
            naive.policy_lengths.updates.retain(|(u, _)| *u != k);
            naive.policy_lengths.updates.push((k, v));
        }
        naive.policy_lengths.updates.sort();
        let flips = transient_flips(&before, &after, &naive);
        assert!(flips.iter().any(|f| f.contains(&format!("(0, {X}, 6, 80) dropped"))), "{flips:?}");
    }

    #[test]
    fn length_bits_widen_before_deletes_and_narrow_after() {
        let (_, before, after) = transitions().swap_remove(3); // exact port to any port
        let p = plan(&after, &before);
        let lk = PolicyLengthsKey::new(EP, direction::INGRESS, X);
        assert_eq!(p.policy_lengths.updates, vec![(lk, policy_length_bit(72) | policy_length_bit(88))]);
        assert_eq!(p.policy_lengths_narrow, vec![(lk, policy_length_bit(72))]);
        assert_eq!(
            p.describe(),
            vec![
                "add policy ep 3 ingress identity 300 TCP/any -> allow cookie 1",
                "set policy lengths ep 3 ingress identity 300 -> /72 /88",
                "delete policy ep 3 ingress identity 300 TCP/80",
                "narrow policy lengths ep 3 ingress identity 300 -> /72",
            ]
        );
    }

    #[test]
    fn endpoint_is_enforced_after_its_entries_and_deleted_before_them() {
        let (_, before, after) = transitions().swap_remove(4); // enforcement switched on
        let d = plan(&after, &before).describe();
        let pos = |prefix: &str| d.iter().position(|l| l.starts_with(prefix)).unwrap();
        assert!(pos("add policy") < pos("update endpoint"), "{d:#?}");
        assert!(pos("set policy lengths") < pos("update endpoint"), "{d:#?}");
        let mut gone = after.clone();
        gone.endpoints.clear();
        gone.policy.clear();
        gone.policy_lengths.clear();
        let d = plan(&gone, &after).describe();
        let pos = |prefix: &str| d.iter().position(|l| l.starts_with(prefix)).unwrap();
        assert!(pos("delete endpoint") < pos("delete policy "), "{d:#?}");
        assert!(pos("delete policy ") < pos("delete policy lengths"), "{d:#?}");
    }

    // -----------------------------------------------------------------------------------
    // Map limits.

    fn two_endpoints() -> MapState {
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

    #[test]
    fn what_fits_is_loaded_as_is() {
        let s = two_endpoints();
        let limits = MapLimits { policy: 8, policy_lengths: 4, ..MapLimits::UNLIMITED };
        let f = fit(s.clone(), &limits, &MapState::default());
        assert_eq!(f.state, s);
        assert!(f.overflows.is_empty() && f.fail_closed.is_empty());
    }

    #[test]
    fn a_direction_that_does_not_fit_fails_closed() {
        let s = two_endpoints();
        // 8 entries needed, 6 available: endpoint 1 (both directions, 4 entries) and
        // endpoint 2's egress (1) fit; endpoint 2's ingress (3) does not.
        let limits = MapLimits { policy: 6, ..MapLimits::UNLIMITED };
        let f = fit(s.clone(), &limits, &MapState::default());
        assert_eq!(f.overflows, vec![Overflow { map: "POLICY", needed: 8, max: 6 }]);
        assert_eq!(f.fail_closed, BTreeSet::from([(2, direction::INGRESS)]));
        assert_eq!(f.state.policy.len(), 5);
        assert!(f.state.policy.keys().all(|(_, k)| !(k.endpoint_id() == 2 && k.direction == direction::INGRESS)));
        assert_eq!(f.state.endpoints[&11].flags & endpoint_flags::INGRESS_ENFORCED, endpoint_flags::INGRESS_ENFORCED);
        assert_eq!(f.state.policy_lengths, policy_lengths(&f.state.policy));
        assert!(f.state.policy.len() <= 6);
        // What fails closed denies: nothing of endpoint 2's ingress is reachable.
        for port in [80, 81, 82] {
            assert!(!allowed_for(&f.state, 11, 2, direction::INGRESS, X, proto::TCP, port));
            assert!(allowed_for(&f.state, 10, 1, direction::INGRESS, X, proto::TCP, port));
        }
    }

    fn allowed_for(s: &MapState, ifindex: u32, ep: u16, dir: u8, peer: u32, protocol: u8, port: u16) -> bool {
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

    #[test]
    fn loaded_directions_keep_their_room() {
        // Endpoint 2's ingress is loaded; endpoint 1's is new and there is room for one of
        // them: the new one fails closed, the loaded one is not disturbed.
        let s = two_endpoints();
        let mut applied = s.clone();
        applied.policy.retain(|(_, k), _| k.endpoint_id() == 2);
        let limits = MapLimits { policy: 5, ..MapLimits::UNLIMITED };
        let f = fit(s, &limits, &applied);
        assert_eq!(f.fail_closed, BTreeSet::from([(1, direction::INGRESS)]));
        assert!(f.state.policy.keys().any(|(_, k)| k.endpoint_id() == 2 && k.direction == direction::INGRESS));
    }

    #[test]
    fn policy_lengths_overflow_fails_closed_too() {
        let limits = MapLimits { policy_lengths: 3, ..MapLimits::UNLIMITED };
        let f = fit(two_endpoints(), &limits, &MapState::default());
        assert_eq!(f.overflows, vec![Overflow { map: "POLICY_LENGTHS", needed: 4, max: 3 }]);
        assert_eq!(f.fail_closed, BTreeSet::from([(2, direction::EGRESS)]));
        assert!(f.state.policy_lengths.len() <= 3);
    }

    #[test]
    fn ipcache_overflow_fails_every_enforced_direction_closed() {
        let mut s = two_endpoints();
        s.endpoints.get_mut(&11).unwrap().flags = endpoint_flags::INGRESS_ENFORCED;
        s.policy.retain(|(_, k), _| !(k.endpoint_id() == 2 && k.direction == direction::EGRESS));
        for i in 0..3u8 {
            s.ipcache_host_v4.insert(Ipv4Prefix { addr: [10, 0, 0, i] }, IpcacheValue { identity: X, flags: 0 });
        }
        let limits = MapLimits { ipcache_host_v4: 2, ..MapLimits::UNLIMITED };
        let f = fit(s, &limits, &MapState::default());
        assert_eq!(f.overflows, vec![Overflow { map: "IPCACHE_HOST_V4", needed: 3, max: 2 }]);
        assert_eq!(f.state.ipcache_host_v4.len(), 2);
        assert_eq!(
            f.fail_closed,
            BTreeSet::from([(1, direction::INGRESS), (1, direction::EGRESS), (2, direction::INGRESS)])
        );
        assert!(f.state.policy.is_empty() && f.state.policy_lengths.is_empty());
    }

    #[test]
    fn endpoints_that_do_not_fit_are_reported_not_loaded() {
        let limits = MapLimits { endpoints: 1, ..MapLimits::UNLIMITED };
        let f = fit(two_endpoints(), &limits, &MapState::default());
        assert_eq!(f.overflows, vec![Overflow { map: "ENDPOINTS", needed: 2, max: 1 }]);
        assert_eq!(f.not_loaded, BTreeSet::from([2]));
        assert!(f.state.policy.keys().all(|(_, k)| k.endpoint_id() == 1));
    }

    #[test]
    fn recovery_when_room_returns() {
        let s = two_endpoints();
        let limits = MapLimits { policy: 6, ..MapLimits::UNLIMITED };
        let closed = fit(s.clone(), &limits, &MapState::default());
        // One of endpoint 2's ingress entries goes (a policy deleted): now it fits.
        let mut smaller = s.clone();
        let (len, k) = policy_key(2, &ing(X, proto::TCP, 82, 16));
        smaller.policy.remove(&(len, k));
        smaller.policy_lengths = policy_lengths(&smaller.policy);
        let smaller_limits = MapLimits { policy: 7, ..MapLimits::UNLIMITED };
        let f = fit(smaller.clone(), &smaller_limits, &closed.state);
        assert!(f.overflows.is_empty() && f.fail_closed.is_empty());
        assert_eq!(f.state, smaller);
        let p = plan(&f.state, &closed.state);
        assert_eq!(p.policy.adds.len(), 2, "{:#?}", p.describe());
    }

    // -----------------------------------------------------------------------------------
    // Snapshots of plans for fixture scenarios.

    fn scenario_state(file: &str, skip_policies: usize, jar: &mut CookieJar) -> MapState {
        use palisade_cli::offline::{scenario_endpoint_spec, scenario_policy_files, scenario_reserved_entries};
        use palisade_node::explain::offline::{OfflineState, PodInput};
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/scenarios").join(file);
        let plan = palisade_scenario::load(&path).unwrap();
        let files: Vec<(String, Vec<u8>)> = scenario_policy_files(&plan)
            .unwrap()
            .into_iter()
            .skip(skip_policies)
            .map(|(n, t)| (n, t.into_bytes()))
            .collect();
        let pods: Vec<PodInput> = plan
            .pods
            .iter()
            .map(|p| PodInput { namespace: p.namespace.clone(), name: p.name.clone(), spec: scenario_endpoint_spec(p) })
            .collect();
        let st =
            OfflineState::build(&plan.namespaces, &pods, &scenario_reserved_entries(&plan), &files, "default").unwrap();
        let inputs = st.inputs();
        let mappings: Vec<EndpointMapping> = st
            .endpoints()
            .iter()
            .map(|e| EndpointMapping {
                id: e.id,
                ifindex: 100 + u32::from(e.id),
                identity: e.identity,
                ipv4: e.ipv4,
                ipv6: e.ipv6,
            })
            .collect();
        encode(inputs.desired.unwrap(), &mappings, inputs.ipcache, jar)
    }

    #[test]
    fn plan_snapshot_seed_from_empty() {
        let s = scenario_state("seed-allow-frontend-to-backend.yaml", 0, &mut CookieJar::default());
        insta::assert_yaml_snapshot!("plan_seed_from_empty", plan(&s, &MapState::default()).describe());
    }

    #[test]
    fn plan_snapshot_deny_beats_allow_from_empty() {
        let s = scenario_state("cnp-ingress-deny-beats-allow.yaml", 0, &mut CookieJar::default());
        insta::assert_yaml_snapshot!("plan_deny_beats_allow_from_empty", plan(&s, &MapState::default()).describe());
    }

    #[test]
    fn plan_snapshot_stacked_policy_removed() {
        // Two stacked policies select x/a; the first is removed.
        // One cookie jar, as in the map writer: an entry's cookie only changes with its rules.
        let mut jar = CookieJar::default();
        let both = scenario_state("knp-stacked-policies.yaml", 0, &mut jar);
        let one = scenario_state("knp-stacked-policies.yaml", 1, &mut jar);
        let p = plan(&one, &both);
        assert!(!p.is_empty());
        // Applied step by step, the plan ends in the new state.
        let mut s = both.clone();
        apply_stepwise(&mut s, &p, &mut |_, _| {});
        assert_eq!(s, one);
        insta::assert_yaml_snapshot!("plan_stacked_policy_removed", p.describe());
        insta::assert_yaml_snapshot!("plan_stacked_policy_added_back", plan(&both, &one).describe());
    }
}
