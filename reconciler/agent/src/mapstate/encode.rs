//! Encoding: the resolver's desired state as the kernel's maps should hold it
//! ([`encode`]): endpoint records, policy entries cut to their prefixes with the cookies
//! of their rules, the bitmaps of prefix lengths, and the ipcache split into host entries
//! and shorter prefixes.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use palisade_common::{
    EndpointInfo, IpcacheValue, Ipv4Prefix, Ipv6Prefix, POLICY_PREFIX_FIXED, POLICY_PREFIX_PROTO, PolicyKey,
    PolicyLengthsKey, PolicyValue, direction, endpoint_flags, ipcache_flags, policy_flags, policy_length_bit,
    policy_view,
};
use palisade_policy::model::Direction;
use palisade_policy::resolve::{DesiredState, EndpointPolicy, EntryKey, RuleOrigin};

use super::PolicyMapKey;
use super::table::MapState;

/// A local endpoint as the map writer needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointMapping {
    pub id: u16,
    pub ifindex: u32,
    pub identity: u32,
    pub ipv4: Option<Ipv4Addr>,
    pub ipv6: Option<Ipv6Addr>,
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
    ipcache: &BTreeMap<(IpAddr, u8), u32>,
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
    ipcache: &BTreeMap<(IpAddr, u8), u32>,
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
        for d in pol.map(|p| p.audited_directions().collect::<Vec<_>>()).unwrap_or_default() {
            flags |= match d {
                Direction::Ingress => endpoint_flags::INGRESS_AUDIT,
                Direction::Egress => endpoint_flags::EGRESS_AUDIT,
            };
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
                    let mut v: Vec<_> = pol
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
                    // The audit view's entries, of the directions where it differs.
                    let audited: Vec<Direction> = pol.audited_directions().collect();
                    if let Some(view) = pol.audit.as_ref().filter(|_| !audited.is_empty()) {
                        v.extend(view.entries.iter().filter(|(k, _)| audited.contains(&k.direction)).map(|(k, v)| {
                            let (prefix, key) = policy_key(ep.id, k);
                            let value = PolicyValue {
                                flags: if v.deny { policy_flags::DENY } else { 0 },
                                cookie: cookies.cookie(&v.origins),
                                prefix_len: prefix,
                            };
                            ((prefix, key.in_view(policy_view::AUDIT)), value)
                        }));
                    }
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
            IpAddr::V4(a) if *len >= 32 => {
                out.ipcache_host_v4.insert(Ipv4Prefix { addr: a.octets() }, value);
            }
            IpAddr::V4(a) => {
                out.ipcache_v4.insert((u32::from(*len), Ipv4Prefix { addr: a.octets() }), value);
            }
            IpAddr::V6(a) if *len >= 128 => {
                out.ipcache_host_v6.insert(Ipv6Prefix { addr: a.octets() }, value);
            }
            IpAddr::V6(a) => {
                out.ipcache_v6.insert((u32::from(*len), Ipv6Prefix { addr: a.octets() }), value);
            }
        }
    }
    // Local endpoints' addresses are marked: the datapath drops a packet to a pod that claims
    // such a source and does not come from that pod's interface (or the node).
    for ep in endpoints {
        if let Some(v) = ep.ipv4.and_then(|a| out.ipcache_host_v4.get_mut(&Ipv4Prefix { addr: a.octets() })) {
            v.flags |= ipcache_flags::LOCAL_ENDPOINT;
        }
        if let Some(v) = ep.ipv6.and_then(|a| out.ipcache_host_v6.get_mut(&Ipv6Prefix { addr: a.octets() })) {
            v.flags |= ipcache_flags::LOCAL_ENDPOINT;
        }
    }
    out
}

impl MapState {
    /// Every ipcache entry, whichever map holds it (the inverse of [`encode`]'s split into
    /// host entries and shorter prefixes): (address, prefix length) and identity, in map
    /// order.
    pub fn ipcache_entries(&self) -> Vec<((IpAddr, u8), u32)> {
        let mut out = Vec::new();
        let prefix = |len: u32| len as u8;
        for ((len, p), v) in &self.ipcache_v4 {
            out.push(((IpAddr::V4(Ipv4Addr::from(p.addr)), prefix(*len)), v.identity));
        }
        for ((len, p), v) in &self.ipcache_v6 {
            out.push(((IpAddr::V6(Ipv6Addr::from(p.addr)), prefix(*len)), v.identity));
        }
        for (p, v) in &self.ipcache_host_v4 {
            out.push(((IpAddr::V4(Ipv4Addr::from(p.addr)), 32), v.identity));
        }
        for (p, v) in &self.ipcache_host_v6 {
            out.push(((IpAddr::V6(Ipv6Addr::from(p.addr)), 128), v.identity));
        }
        out
    }
}

/// The `POLICY_LENGTHS` content for `policy`: per (endpoint, direction, identity), the bitmap
/// of its entries' prefix lengths.
pub fn policy_lengths(policy: &BTreeMap<PolicyMapKey, PolicyValue>) -> BTreeMap<PolicyLengthsKey, u32> {
    let mut out: BTreeMap<PolicyLengthsKey, u32> = BTreeMap::new();
    for (prefix, key) in policy.keys() {
        *out.entry(key.lengths_key()).or_default() |= policy_length_bit(*prefix);
    }
    out
}

#[cfg(test)]
mod tests {
    use palisade_common::proto;
    use palisade_policy::resolve::EntryValue;

    use super::*;
    use crate::mapstate::describe_policy_key;
    use crate::mapstate::testing::key;

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
    fn host_prefixes_go_to_the_host_maps() {
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
    fn cookies_are_stable_per_origin_set() {
        let mut jar = CookieJar::default();
        let o = EntryValue::default().origins;
        let a = jar.cookie(&o);
        assert_eq!(jar.cookie(&o), a);
        jar.retain(&BTreeSet::new());
        assert!(jar.origins(a).is_none());
    }
}
