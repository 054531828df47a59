//! The ipcache pieces that are not this node's pods, as plain state: IP prefixes (parsing,
//! masking), the reserved identities the API can give an address, and [`ExternalIpcache`]
//! (reserved prefixes and the pods of other nodes). The agent's identity cache actor holds
//! one and the identity references behind it.
use std::collections::BTreeMap;
use std::net::IpAddr;

use palisade_api::types::ReservedEntity;
use palisade_common::identity as reserved;
use palisade_policy::resolve::NamedPort;

/// A prefix that does not parse, or has host bits set.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("ipcache entry {cidr:?}: {reason}")]
pub struct InvalidPrefix {
    pub cidr: String,
    pub reason: String,
}

/// An IP prefix: (address, prefix length).
pub type Prefix = (IpAddr, u8);

/// Parses `10.0.0.1` or `10.0.0.0/24` (host bits must be zero).
pub fn parse_prefix(s: &str) -> Result<Prefix, InvalidPrefix> {
    let bad = |reason: String| InvalidPrefix { cidr: s.to_string(), reason };
    let (addr, len) = match s.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (s, None),
    };
    let addr: IpAddr = addr.parse().map_err(|_| bad("not an IPv4 or IPv6 address".into()))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let len = match len {
        None => max,
        Some(l) => {
            l.parse::<u8>().ok().filter(|l| *l <= max).ok_or_else(|| bad(format!("prefix length must be 0..={max}")))?
        }
    };
    let masked = mask(addr, len);
    if masked != addr {
        return Err(bad(format!("host bits are set; did you mean {masked}/{len}?")));
    }
    Ok((addr, len))
}

/// `addr` with the bits after `len` cleared.
pub fn mask(addr: IpAddr, len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let m = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            IpAddr::V4((u32::from(a) & m).into())
        }
        IpAddr::V6(a) => {
            let m = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            IpAddr::V6((u128::from(a) & m).into())
        }
    }
}

/// The reserved identity of an entity the API can give an address.
pub fn entity_identity(e: ReservedEntity) -> u32 {
    match e {
        ReservedEntity::Host => reserved::HOST,
        ReservedEntity::RemoteNode => reserved::REMOTE_NODE,
        ReservedEntity::KubeApiserver => reserved::KUBE_APISERVER,
        ReservedEntity::Health => reserved::HEALTH,
        ReservedEntity::Ingress => reserved::INGRESS,
    }
}

/// A pod of another node: its identity (one reference held), its addresses and its named
/// ports (egress rules that name a port resolve it on the destination pod).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteEndpoint {
    pub identity: u32,
    pub ips: Vec<IpAddr>,
    pub named_ports: Vec<NamedPort>,
}

/// The ipcache entries for addresses that are not this node's pods: reserved prefixes and
/// the pods of other nodes. Plain state; the actor holds the identity references.
#[derive(Clone, Debug, Default)]
pub struct ExternalIpcache {
    reserved: BTreeMap<Prefix, u32>,
    remote: BTreeMap<String, RemoteEndpoint>,
}

impl ExternalIpcache {
    /// Sets a reserved prefix; true when it changed.
    pub fn upsert_reserved(&mut self, prefix: Prefix, identity: u32) -> bool {
        self.reserved.insert(prefix, identity) != Some(identity)
    }

    /// The reserved identity of exactly this prefix, if any.
    pub fn reserved(&self, prefix: &Prefix) -> Option<u32> {
        self.reserved.get(prefix).copied()
    }

    /// Removes a reserved prefix; true when it was there.
    pub fn remove_reserved(&mut self, prefix: &Prefix) -> bool {
        self.reserved.remove(prefix).is_some()
    }

    /// Sets a remote endpoint; answers the endpoint it replaced (whose identity reference
    /// is to be released).
    pub fn upsert_remote(&mut self, key: &str, ep: RemoteEndpoint) -> Option<RemoteEndpoint> {
        self.remote.insert(key.to_string(), ep)
    }

    /// Removes a remote endpoint; answers it.
    pub fn remove_remote(&mut self, key: &str) -> Option<RemoteEndpoint> {
        self.remote.remove(key)
    }

    pub fn remote(&self) -> &BTreeMap<String, RemoteEndpoint> {
        &self.remote
    }

    /// The remote pods' named ports, by identity (sorted, without duplicates).
    pub fn remote_named_ports(&self) -> BTreeMap<u32, Vec<NamedPort>> {
        let mut out: BTreeMap<u32, Vec<NamedPort>> = BTreeMap::new();
        for ep in self.remote.values().filter(|ep| !ep.named_ports.is_empty()) {
            out.entry(ep.identity).or_default().extend(ep.named_ports.iter().cloned());
        }
        for ports in out.values_mut() {
            ports.sort();
            ports.dedup();
        }
        out
    }

    /// The remote pods' addresses with their identities, but those a reserved host entry
    /// takes (a host-network pod shares its node's address).
    pub fn pod_addresses(&self) -> BTreeMap<IpAddr, u32> {
        let mut out = BTreeMap::new();
        for ep in self.remote.values() {
            for ip in &ep.ips {
                let len = if ip.is_ipv4() { 32 } else { 128 };
                if !self.reserved.contains_key(&(*ip, len)) {
                    out.insert(*ip, ep.identity);
                }
            }
        }
        out
    }

    /// Host routes of remote pods, then reserved prefixes (which win on the same prefix:
    /// a host-network pod shares its node's address).
    pub fn entries(&self) -> BTreeMap<Prefix, u32> {
        let mut out = BTreeMap::new();
        for ep in self.remote.values() {
            for ip in &ep.ips {
                let len = if ip.is_ipv4() { 32 } else { 128 };
                out.insert((*ip, len), ep.identity);
            }
        }
        out.extend(self.reserved.iter().map(|(k, v)| (*k, *v)));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_parse_and_reject_host_bits() {
        assert_eq!(parse_prefix("10.0.0.1").unwrap(), ("10.0.0.1".parse().unwrap(), 32));
        assert_eq!(parse_prefix("10.0.0.0/8").unwrap(), ("10.0.0.0".parse().unwrap(), 8));
        assert_eq!(parse_prefix("fd00::/64").unwrap(), ("fd00::".parse().unwrap(), 64));
        let e = parse_prefix("10.0.0.1/8").unwrap_err().to_string();
        assert!(e.contains("did you mean 10.0.0.0/8"), "{e}");
        assert!(parse_prefix("10.0.0.0/33").is_err());
        assert!(parse_prefix("nonsense").is_err());
    }

    #[test]
    fn remote_endpoints_map_their_addresses_and_reserved_prefixes_win() {
        let mut c = ExternalIpcache::default();
        let a: IpAddr = "10.1.0.5".parse().unwrap();
        let v6: IpAddr = "fd00::5".parse().unwrap();
        assert!(
            c.upsert_remote("shop/web", RemoteEndpoint { identity: 300, ips: vec![a, v6], named_ports: Vec::new() })
                .is_none()
        );
        let e = c.entries();
        assert_eq!(e.get(&(a, 32)), Some(&300));
        assert_eq!(e.get(&(v6, 128)), Some(&300));
        // A host-network pod shares the node address, which is reserved.
        assert!(c.upsert_reserved((a, 32), reserved::REMOTE_NODE));
        assert_eq!(c.entries().get(&(a, 32)), Some(&reserved::REMOTE_NODE));
        let old = c
            .upsert_remote("shop/web", RemoteEndpoint { identity: 301, ips: vec![v6], named_ports: Vec::new() })
            .unwrap();
        assert_eq!(old.identity, 300);
        assert_eq!(c.entries().get(&(v6, 128)), Some(&301));
        assert_eq!(c.remove_remote("shop/web").unwrap().identity, 301);
        assert_eq!(c.entries().len(), 1);
        assert!(c.remove_remote("shop/web").is_none());
    }
}
