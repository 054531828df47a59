//! Raw entries -> entries: the one place where what several rules say about the same
//! (direction, identity, protocol, port block) is decided. Today there is one precedence:
//! a deny wins over every allow, also over an allow of its identity that a broader deny
//! (of the identity or of any peer) covers, so that the datapath's longest-prefix lookup
//! can never find a more specific allow under a broader deny.
//!
//! Ordered policy tiers (`ClusterNetworkPolicy`: Admin tier by priority with Accept, Deny
//! and Pass, then the NetworkPolicy tier, then Baseline) would be decided here too: a raw
//! entry would carry its tier and priority besides the verdict, and this step would
//! flatten the chain into one verdict per key, as it flattens allows and denies now.

use std::collections::BTreeMap;

use super::super::{EndpointPolicy, EntryKey, EntryValue};
use super::compile::Origins;
use crate::identity;
use crate::model::Direction;

/// A raw entry packed for fast sorting: (key, deny, origin) in one number, ordered as
/// the tuple (direction, identity, protocol, port, prefix length, deny, origin).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Raw(u128);

impl Raw {
    pub fn new(k: &EntryKey, deny: bool, origin: u32) -> Raw {
        let direction: u128 = match k.direction {
            Direction::Ingress => 0,
            Direction::Egress => 1,
        };
        Raw(direction << 97
            | u128::from(k.identity) << 65
            | u128::from(k.protocol) << 57
            | u128::from(k.port) << 41
            | u128::from(k.port_prefix_len) << 33
            | u128::from(deny) << 32
            | u128::from(origin))
    }

    fn key_bits(self) -> u128 {
        self.0 >> 33
    }

    fn key(self) -> EntryKey {
        EntryKey {
            direction: if (self.0 >> 97) & 1 == 0 { Direction::Ingress } else { Direction::Egress },
            identity: (self.0 >> 65) as u32,
            protocol: (self.0 >> 57) as u8,
            port: (self.0 >> 41) as u16,
            port_prefix_len: (self.0 >> 33) as u8,
        }
    }

    fn deny(self) -> bool {
        (self.0 >> 32) & 1 == 1
    }

    fn origin(self) -> u32 {
        self.0 as u32
    }
}

/// The entries of sorted raw entries: the denies, and the allows no deny covers
/// (`extra_denies`: denies for any peer from outside `raw`, which an update of some
/// identities' entries keeps).
pub(super) fn decide(raw: &[Raw], extra_denies: &[EntryKey], origins: &mut Origins) -> Vec<(EntryKey, EntryValue)> {
    // An allow is covered by a deny of its own identity or of any identity whose L4
    // part holds the allow's (the datapath takes the longest match per identity, and
    // the exact identity first). Denies for any peer are few: a list; the others are
    // sorted, and an allow looks at those of its identity only.
    let (any, mut specific): (Vec<EntryKey>, Vec<EntryKey>) = extra_denies
        .iter()
        .copied()
        .chain(raw.iter().filter(|r| r.deny()).map(|r| r.key()))
        .partition(|d| d.identity == identity::ANY);
    specific.sort_unstable();
    let covered = |key: &EntryKey| {
        if any.iter().any(|d| d.direction == key.direction && key.l4_within(d)) {
            return true;
        }
        let from = specific.partition_point(|d| (d.direction, d.identity) < (key.direction, key.identity));
        specific[from..]
            .iter()
            .take_while(|d| (d.direction, d.identity) == (key.direction, key.identity))
            .any(|d| key.l4_within(d))
    };
    let no_denies = any.is_empty() && specific.is_empty();
    let mut out = Vec::new();
    for group in raw.chunk_by(|a, b| a.key_bits() == b.key_bits()) {
        let key = group[0].key();
        // Sorted by (key, deny, origin): denies last.
        let set_of = |group: &[Raw], origins: &mut Origins| origins.set_of(group.iter().map(|e| e.origin()));
        if let Some(d) = group.iter().position(|e| e.deny()) {
            out.push((key, EntryValue { deny: true, origins: set_of(&group[d..], origins) }));
        } else if no_denies || !covered(&key) {
            out.push((key, EntryValue { deny: false, origins: set_of(group, origins) }));
        }
    }
    out
}

/// The denies for any peer of `policy`, in key order.
pub(super) fn any_peer_denies(policy: &EndpointPolicy) -> Vec<EntryKey> {
    let mut out = Vec::new();
    for direction in Direction::BOTH {
        out.extend(
            policy.entries.range(identity_range(direction, identity::ANY)).filter(|(_, v)| v.deny).map(|(k, _)| *k),
        );
    }
    out
}

/// The entries of `policy` for these identities, in key order.
pub(super) fn entries_of<'a>(
    policy: &'a EndpointPolicy,
    ids: &std::collections::BTreeSet<u32>,
) -> Vec<(&'a EntryKey, &'a EntryValue)> {
    let mut old: Vec<(&EntryKey, &EntryValue)> = Vec::new();
    for direction in Direction::BOTH {
        for &id in ids {
            old.extend(policy.entries.range(identity_range(direction, id)));
        }
    }
    old.sort_by_key(|(k, _)| **k);
    old
}

/// Every key of one (direction, identity).
fn identity_range(direction: Direction, identity: u32) -> std::ops::RangeInclusive<EntryKey> {
    let lo = EntryKey { direction, identity, protocol: 0, port: 0, port_prefix_len: 0 };
    let hi = EntryKey { protocol: u8::MAX, port: u16::MAX, port_prefix_len: u8::MAX, ..lo };
    lo..=hi
}

/// The number of keys added, removed or with another value, between two sorted entry
/// lists.
pub(super) fn count_changes<'a>(
    old: impl Iterator<Item = (&'a EntryKey, &'a EntryValue)>,
    new: impl Iterator<Item = (&'a EntryKey, &'a EntryValue)>,
) -> usize {
    let old: BTreeMap<&EntryKey, &EntryValue> = old.collect();
    let new: BTreeMap<&EntryKey, &EntryValue> = new.collect();
    let mut n = old.iter().filter(|(k, v)| new.get(*k) != Some(*v)).count();
    n += new.keys().filter(|k| !old.contains_key(*k)).count();
    n
}
