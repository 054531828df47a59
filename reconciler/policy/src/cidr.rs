//! IP prefixes, CIDR blocks with holes (`except`), and what the rest of the crate needs
//! to turn them into identities:
//!
//! - [`CidrIdentities`]: one node-local identity (scope bit [`LOCAL_SCOPE`]) per distinct
//!   prefix that some policy names, with stable numbers while the prefix stays in use.
//!   The agent writes prefix -> identity into the ipcache; longest-prefix match in the
//!   kernel then gives every outside address the identity of the most specific named
//!   prefix (pod addresses are /32 or /128 entries of their own, so CIDR selectors of
//!   Cilium policies never reach pods, as in Cilium).
//! - [`IPBLOCK_SOURCE`]: the label source of Kubernetes NetworkPolicy ipBlock
//!   membership, which the resolver gives to the pod addresses inside an ipBlock (address
//!   identities), so that an ipBlock also selects pod addresses, as Kubernetes means it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::{Serialize, Serializer};

use crate::identity::LOCAL_SCOPE;
use crate::labels::{Label, LabelSet, source};
use crate::model::{Peer, Policy};

/// An IP prefix with the bits past its length cleared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Prefix {
    addr: IpAddr,
    len: u8,
}

/// How a prefix was written, when it was accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Written {
    /// As it is.
    Exact,
    /// A bare address: a host prefix.
    Address,
    /// With bits set past the prefix length; they were cleared.
    HostBitsCleared,
}

impl Prefix {
    /// The prefix of `addr` of length `len` (bits past `len` are cleared); `None` when
    /// `len` is longer than the address.
    pub fn new(addr: IpAddr, len: u8) -> Option<Prefix> {
        let bits = max_len(addr);
        (len <= bits).then(|| Prefix { addr: mask(addr, len), len })
    }

    /// The host prefix of one address (/32 or /128).
    pub fn host(addr: IpAddr) -> Prefix {
        Prefix { addr, len: max_len(addr) }
    }

    /// Parses `10.0.0.0/8`, `fd00::/64` or a bare address. The error says what is wrong.
    pub fn parse(text: &str) -> Result<(Prefix, Written), String> {
        let (addr_text, len_text) = match text.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (text, None),
        };
        let addr: IpAddr = addr_text
            .parse()
            .map_err(|_| format!("{text:?} is not a CIDR: {addr_text:?} is not an IPv4 or IPv6 address"))?;
        let Some(len_text) = len_text else {
            return Ok((Prefix::host(addr), Written::Address));
        };
        let len = len_text
            .parse::<u8>()
            .ok()
            .filter(|l| *l <= max_len(addr) && !len_text.starts_with('+') && !len_text.is_empty())
            .ok_or_else(|| {
                format!("{text:?} is not a CIDR: the prefix length must be a number from 0 to {}", max_len(addr))
            })?;
        let prefix = Prefix { addr: mask(addr, len), len };
        let written = if prefix.addr == addr { Written::Exact } else { Written::HostBitsCleared };
        Ok((prefix, written))
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix_len(&self) -> u8 {
        self.len
    }

    pub fn is_ipv4(&self) -> bool {
        self.addr.is_ipv4()
    }

    /// Whether this is `0.0.0.0/0` or `::/0`.
    pub fn is_everything(&self) -> bool {
        self.len == 0
    }

    /// Whether `other` lies inside this prefix (a prefix contains itself).
    pub fn contains(&self, other: &Prefix) -> bool {
        self.addr.is_ipv4() == other.addr.is_ipv4() && other.len >= self.len && mask(other.addr, self.len) == self.addr
    }

    /// Bounds that every prefix inside this one lies between, in the order of [`Prefix`]
    /// (address, then length): for a range query over an ordered set of prefixes. A
    /// prefix in the range lies inside this one when its length is at least this one's.
    pub fn inner_bounds(&self) -> (Prefix, Prefix) {
        let last = match self.addr {
            IpAddr::V4(a) => {
                let host = u32::MAX.checked_shr(u32::from(self.len)).unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(a) | host))
            }
            IpAddr::V6(a) => {
                let host = u128::MAX.checked_shr(u32::from(self.len)).unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(a) | host))
            }
        };
        (Prefix { addr: self.addr, len: 0 }, Prefix { addr: last, len: u8::MAX })
    }

    /// Whether `ip` lies inside this prefix.
    pub fn contains_ip(&self, ip: IpAddr) -> bool {
        self.contains(&Prefix::host(ip))
    }

    /// The `(address, length)` pair the agent's ipcache uses.
    pub fn as_pair(&self) -> (IpAddr, u8) {
        (self.addr, self.len)
    }
}

fn max_len(addr: IpAddr) -> u8 {
    if addr.is_ipv4() { 32 } else { 128 }
}

fn mask(addr: IpAddr, len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let m = if len == 0 { 0 } else { u32::MAX << (32 - u32::from(len)) };
            IpAddr::V4(Ipv4Addr::from(u32::from(a) & m))
        }
        IpAddr::V6(a) => {
            let m = if len == 0 { 0 } else { u128::MAX << (128 - u32::from(len)) };
            IpAddr::V6(Ipv6Addr::from(u128::from(a) & m))
        }
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl Serialize for Prefix {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A prefix minus some prefixes inside it (`fromCIDRSet`, `ipBlock`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct CidrBlock {
    pub cidr: Prefix,
    /// Each lies inside `cidr` (the parser checks it).
    pub except: Vec<Prefix>,
}

impl CidrBlock {
    /// Whether every address of `p` is in the block: inside the cidr and inside no except.
    /// (A named prefix that only partly overlaps an except is never inside it, since
    /// except prefixes are named prefixes too and so have identities of their own.)
    pub fn covers(&self, p: &Prefix) -> bool {
        self.cidr.contains(p) && !self.except.iter().any(|e| e.contains(p))
    }

    /// Whether `ip` is in the block.
    pub fn contains_ip(&self, ip: IpAddr) -> bool {
        self.covers(&Prefix::host(ip))
    }

    /// Every prefix the block names.
    pub fn prefixes(&self) -> impl Iterator<Item = &Prefix> {
        std::iter::once(&self.cidr).chain(self.except.iter())
    }

    /// The key of the `ipblock:` label a pod inside this block carries:
    /// `10.0.0.0/8` or `10.0.0.0/8 except 10.1.0.0/16,10.2.0.0/16`.
    pub fn label_key(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for CidrBlock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.cidr)?;
        for (i, e) in self.except.iter().enumerate() {
            f.write_str(if i == 0 { " except " } else { "," })?;
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Every prefix the policies name in CIDR peers and ipBlocks (cidr and except), except
/// `0.0.0.0/0` and `::/0`: those are the world identities, which every address that
/// matches no named prefix already gets.
pub fn named_prefixes(policies: &[Policy]) -> BTreeSet<Prefix> {
    let mut out = BTreeSet::new();
    for peer in all_peers(policies) {
        if let Peer::Cidr(block) | Peer::IpBlock(block) = peer {
            out.extend(block.prefixes().filter(|p| !p.is_everything()).copied());
        }
    }
    out
}

fn all_peers(policies: &[Policy]) -> impl Iterator<Item = &Peer> {
    policies
        .iter()
        .flat_map(|p| p.rules.iter())
        .flat_map(|r| r.ingress.iter().chain(r.egress.iter()))
        .flat_map(|pr| pr.peers.list().iter())
}

/// The labels of the CIDR identity of `prefix`: `cidr:<prefix>`, `reserved:world` and
/// `reserved:world-ipv4` or `reserved:world-ipv6` (so `reserved:world` selectors and the
/// `world` entity select every CIDR identity, as in Cilium).
pub fn cidr_labels(prefix: &Prefix) -> LabelSet {
    let family = if prefix.is_ipv4() { "world-ipv4" } else { "world-ipv6" };
    [Label::new(source::CIDR, &prefix.to_string(), ""), Label::reserved("world"), Label::reserved(family)]
        .into_iter()
        .collect()
}

/// Node-local identities for the prefixes policies name. Numbers start at
/// `LOCAL_SCOPE | 1` and stay the same while a prefix stays in use, so the kernel sees
/// no churn when unrelated policies change; a freed number is reused lowest first, but
/// only by a later [`CidrIdentities::sync`] than the one that freed it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CidrIdentities {
    by_prefix: BTreeMap<Prefix, u32>,
    free: BTreeSet<u32>,
    next: u32,
}

impl CidrIdentities {
    pub fn new() -> CidrIdentities {
        CidrIdentities { by_prefix: BTreeMap::new(), free: BTreeSet::new(), next: LOCAL_SCOPE | 1 }
    }

    /// Identities for exactly the prefixes these policies name, numbered in prefix order.
    pub fn for_policies(policies: &[Policy]) -> CidrIdentities {
        let mut ids = CidrIdentities::new();
        ids.sync(policies);
        ids
    }

    /// Makes the identities those of the prefixes `policies` name: keeps the numbers of
    /// prefixes still named, frees the others, numbers new ones. Returns whether
    /// anything changed.
    pub fn sync(&mut self, policies: &[Policy]) -> bool {
        self.sync_prefixes(named_prefixes(policies))
    }

    /// As [`CidrIdentities::sync`], with the prefixes given.
    pub fn sync_prefixes(&mut self, wanted: BTreeSet<Prefix>) -> bool {
        let gone: Vec<Prefix> = self.by_prefix.keys().filter(|p| !wanted.contains(p)).copied().collect();
        let new: Vec<Prefix> = wanted.into_iter().filter(|p| !self.by_prefix.contains_key(p)).collect();
        let changed = !gone.is_empty() || !new.is_empty();
        for p in new {
            let id = if let Some(id) = self.free.pop_first() {
                id
            } else {
                let id = self.next;
                self.next += 1;
                id
            };
            self.by_prefix.insert(p, id);
        }
        for p in gone {
            let id = self.by_prefix.remove(&p).expect("listed above");
            self.free.insert(id);
        }
        changed
    }

    pub fn get(&self, prefix: &Prefix) -> Option<u32> {
        self.by_prefix.get(prefix).copied()
    }

    /// Every prefix with its identity, in prefix order.
    pub fn iter(&self) -> impl Iterator<Item = (&Prefix, u32)> {
        self.by_prefix.iter().map(|(p, id)| (p, *id))
    }

    pub fn len(&self) -> usize {
        self.by_prefix.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_prefix.is_empty()
    }

    /// What the agent writes into the ipcache: prefix -> identity.
    pub fn ipcache(&self) -> BTreeMap<(IpAddr, u8), u32> {
        self.iter().map(|(p, id)| (p.as_pair(), id)).collect()
    }

    /// Every identity with its labels, by number.
    pub fn labels(&self) -> BTreeMap<u32, LabelSet> {
        self.iter().map(|(p, id)| (id, cidr_labels(p))).collect()
    }
}

/// The source of the labels that record the membership of a pod address in Kubernetes
/// NetworkPolicy ipBlocks (on address identities, see [`crate::resolve::PolicyResolver`]).
/// Only ipBlock peers look at it.
pub const IPBLOCK_SOURCE: &str = "ipblock";

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Prefix {
        Prefix::parse(text).unwrap().0
    }

    #[test]
    fn parse_and_show() {
        assert_eq!(Prefix::parse("10.0.0.0/8").unwrap(), (p("10.0.0.0/8"), Written::Exact));
        assert_eq!(Prefix::parse("10.1.2.3").unwrap(), (p("10.1.2.3/32"), Written::Address));
        assert_eq!(Prefix::parse("10.1.2.3/8").unwrap(), (p("10.0.0.0/8"), Written::HostBitsCleared));
        assert_eq!(p("fd00::1/64").to_string(), "fd00::/64");
        assert_eq!(p("0.0.0.0/0").prefix_len(), 0);
        for bad in ["10.0.0.0/33", "10.0.0/8", "fd00::/129", "10.0.0.0/", "10.0.0.0/-1", "x", "10.0.0.0/+8"] {
            assert!(Prefix::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn containment() {
        assert!(p("10.0.0.0/8").contains(&p("10.1.0.0/16")));
        assert!(p("10.0.0.0/8").contains(&p("10.0.0.0/8")));
        assert!(!p("10.1.0.0/16").contains(&p("10.0.0.0/8")));
        assert!(!p("10.0.0.0/8").contains(&p("11.0.0.0/16")));
        assert!(p("0.0.0.0/0").contains(&p("1.2.3.4/32")));
        assert!(!p("0.0.0.0/0").contains(&p("::/0")), "families never mix");
        let block = CidrBlock { cidr: p("10.0.0.0/8"), except: vec![p("10.96.0.0/12")] };
        assert!(block.covers(&p("10.0.0.0/8")));
        assert!(!block.covers(&p("10.96.0.0/12")));
        assert!(!block.covers(&p("10.96.1.0/24")));
        assert!(block.contains_ip("10.1.1.1".parse().unwrap()));
        assert!(!block.contains_ip("10.97.0.1".parse().unwrap()));
        assert_eq!(block.label_key(), "10.0.0.0/8 except 10.96.0.0/12");
    }

    #[test]
    fn cidr_identities_keep_their_numbers() {
        let mut ids = CidrIdentities::new();
        assert!(ids.sync_prefixes([p("10.0.0.0/8"), p("192.168.0.0/16")].into()));
        assert_eq!(ids.get(&p("10.0.0.0/8")), Some(LOCAL_SCOPE | 1));
        assert_eq!(ids.get(&p("192.168.0.0/16")), Some(LOCAL_SCOPE | 2));
        assert!(!ids.sync_prefixes([p("10.0.0.0/8"), p("192.168.0.0/16")].into()), "no change");
        // 1.0.0.0/8 sorts first but does not renumber the others.
        assert!(ids.sync_prefixes([p("1.0.0.0/8"), p("192.168.0.0/16")].into()));
        assert_eq!(ids.get(&p("192.168.0.0/16")), Some(LOCAL_SCOPE | 2));
        assert_eq!(ids.get(&p("1.0.0.0/8")), Some(LOCAL_SCOPE | 3), "the freed number waits a sync");
        assert_eq!(ids.get(&p("10.0.0.0/8")), None);
        ids.sync_prefixes([p("1.0.0.0/8"), p("192.168.0.0/16"), p("fd00::/8")].into());
        assert_eq!(ids.get(&p("fd00::/8")), Some(LOCAL_SCOPE | 1), "then it is reused");
        assert_eq!(ids.labels()[&(LOCAL_SCOPE | 1)].to_string(), "cidr:fd00::/8,reserved:world,reserved:world-ipv6");
        assert_eq!(ids.ipcache()[&("192.168.0.0".parse().unwrap(), 16)], LOCAL_SCOPE | 2);
    }
}
