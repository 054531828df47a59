//! The tier chain flattened into entries the datapath's two lookups decide exactly.
//!
//! Per direction of an endpoint that some Admin or Baseline tier rule selects, the verdict
//! for a peer identity X and a (protocol, port) is: the Admin tier's rules in order
//! (priority, then rule order; Accept and Deny decide, Pass skips the rest of the tier);
//! then, when the NetworkPolicy tier enforces the direction, its verdict (the entries the
//! rest of the resolver made, looked up as the datapath does); else the Baseline tier's
//! rules in order; else allow.
//!
//! The datapath takes the longest match for X and the longest match for any peer, and a
//! deny from either wins. So the entries are made like this:
//!
//! - The (protocol, port) space of each identity is cut where some rule or entry that can
//!   concern it starts or ends, and the chain is evaluated once per piece. Protocols no
//!   rule names behave alike ("other protocols").
//! - *Any peer* (identity 0) gets what the chain gives an identity no rule names: allows
//!   and denies that cover its pieces exactly (an allow over a port range with a deny
//!   hole is an entry for the protocol plus entries for the hole). Where a piece has no
//!   verdict to give (a default drop inside a protocol whose other ports pass), a
//!   protocol-wide entry cannot be used; then every other protocol gets an entry of its
//!   own (up to 255: the price of "everything but TCP/9090", see docs/policy-tiers.md).
//! - Every identity X that a tiered rule or a NetworkPolicy-tier entry names, and whose
//!   verdicts differ somewhere from what any peer gets, gets a full cover: an entry for
//!   any protocol, and per protocol where it differs an entry and the ports that differ
//!   again. A default drop is a deny entry here. X's longest match then always decides
//!   for X, unless the any-peer lookup finds a deny, which would beat an allow of X: when
//!   some X is allowed where the chain denies every other peer, the any-peer denies are
//!   made default drops instead (same packets dropped, reason `policy-denied` instead of
//!   `deny-rule` for those other peers).

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use super::super::{EndpointPolicy, EndpointView, EntryKey, EntryValue, RuleOrigin, l4_blocks};
use super::compile::{CompiledPeerRule, CompiledRules, Origins};
use super::contributions::{EndpointContributions, PeerSet, Sources, TieredContribution};
use crate::identity;
use crate::model::{Direction, Tier, Verdict};
use crate::ports::{block_last, range_to_prefixes};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Allow,
    Deny,
    /// The NetworkPolicy tier enforces and nothing allows: dropped without a deny rule.
    Drop,
}

/// What decided one piece.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum By {
    /// A tiered peer rule (its origin number).
    Rule(u32),
    /// NetworkPolicy tier entries.
    Np(Arc<BTreeSet<RuleOrigin>>),
    /// Nothing: the default of the chain.
    Nothing,
}

#[derive(Clone, Debug)]
struct Decided {
    outcome: Outcome,
    by: Vec<By>,
}

/// A verdict for every (protocol, port) of one identity: `other` for the protocols not
/// in `protos`; per protocol of `protos` its port intervals (inclusive, covering
/// 0..=65535, adjacent ones with different outcomes).
#[derive(Clone, Debug)]
struct Target {
    other: Option<Decided>,
    protos: BTreeMap<u8, Vec<(u32, u32, Decided)>>,
}

/// The tiered rules of one direction and what they need to be evaluated.
struct Chain<'a> {
    direction: Direction,
    rules: &'a CompiledRules,
    src: &'a Sources<'a>,
    endpoint: &'a EndpointView,
    admin: Vec<&'a TieredContribution>,
    baseline: Vec<&'a TieredContribution>,
    np_enforced: bool,
    /// The NetworkPolicy tier's entries of this direction.
    np: BTreeMap<EntryKey, EntryValue>,
}

impl<'a> Chain<'a> {
    fn applies(&self, c: &TieredContribution, peer: u32) -> bool {
        c.peers.iter().any(|p| match p {
            PeerSet::Any => true,
            PeerSet::Sel(s) => peer != identity::ANY && self.src.selections.members(*s).contains(&peer),
        })
    }

    fn blocks(&self, c: &'a CompiledPeerRule, peer: u32) -> Cow<'a, [(u8, u16, u8)]> {
        if let Some(b) = &c.fixed_blocks {
            return Cow::Borrowed(b);
        }
        let base = self.src.universe.get(peer).and_then(|m| m.base).unwrap_or(peer);
        let mut out: Vec<(u8, u16, u8)> = c
            .ports
            .iter()
            .flat_map(|r| l4_blocks(r, c.direction, base, Some(self.endpoint), self.src.port_names()))
            .collect();
        out.sort_unstable();
        out.dedup();
        Cow::Owned(out)
    }

    /// The longest NetworkPolicy-tier entry of `peer` matching (protocol, port).
    fn np_longest(&self, peer: u32, protocol: u8, port: u16) -> Option<&EntryValue> {
        let lo = EntryKey { direction: self.direction, identity: peer, protocol: 0, port: 0, port_prefix_len: 0 };
        let hi = EntryKey { protocol: u8::MAX, port: u16::MAX, port_prefix_len: u8::MAX, ..lo };
        self.np
            .range(lo..=hi)
            .filter(|(k, _)| l4_matches(k, protocol, port))
            .max_by_key(|(k, _)| if k.protocol == 0 { 0 } else { 8 + k.port_prefix_len })
            .map(|(_, v)| v)
    }

    /// The tiered rules of one tier that apply to `peer`, in order, with their blocks.
    fn applied(&self, list: &[&'a TieredContribution], peer: u32) -> Vec<Applied<'a>> {
        list.iter()
            .filter(|c| self.applies(c, peer))
            .map(|c| {
                let rule = self.rules.peer_rule(c.rule);
                Applied { verdict: rule.verdict, origin: rule.origin, blocks: self.blocks(rule, peer) }
            })
            .collect()
    }

    /// The chain for one packet of `peer`, whose applicable rules are `admin` and
    /// `baseline`.
    fn eval(&self, peer: u32, admin: &[Applied], baseline: &[Applied], protocol: u8, port: u16) -> Decided {
        let decided = |outcome, by| Decided { outcome, by: vec![by] };
        let first = |list: &[Applied]| {
            list.iter()
                .find(|a| a.blocks.iter().any(|b| block_matches(*b, protocol, port)))
                .map(|a| (a.verdict, a.origin))
        };
        match first(admin) {
            Some((Verdict::Allow, o)) => return decided(Outcome::Allow, By::Rule(o)),
            Some((Verdict::Deny, o)) => return decided(Outcome::Deny, By::Rule(o)),
            Some((Verdict::Pass, _)) | None => {}
        }
        if self.np_enforced {
            let exact = if peer == identity::ANY { None } else { self.np_longest(peer, protocol, port) };
            let any = self.np_longest(identity::ANY, protocol, port);
            if let Some(v) = exact.filter(|v| v.deny).or_else(|| any.filter(|v| v.deny)) {
                return decided(Outcome::Deny, By::Np(v.origins.clone()));
            }
            if let Some(v) = exact.or(any) {
                return decided(Outcome::Allow, By::Np(v.origins.clone()));
            }
            return decided(Outcome::Drop, By::Nothing);
        }
        match first(baseline) {
            Some((Verdict::Allow, o)) => decided(Outcome::Allow, By::Rule(o)),
            Some((Verdict::Deny, o)) => decided(Outcome::Deny, By::Rule(o)),
            Some((Verdict::Pass, _)) | None => decided(Outcome::Allow, By::Nothing),
        }
    }

    /// The verdicts of `peer` over the whole (protocol, port) space.
    fn target(&self, peer: u32) -> Target {
        let admin = self.applied(&self.admin, peer);
        let baseline = self.applied(&self.baseline, peer);
        // Cut points per protocol: the blocks of every tiered rule that applies to the
        // peer, and the peer's and any peer's NetworkPolicy-tier entries.
        let mut cuts: BTreeMap<u8, BTreeSet<u32>> = BTreeMap::new();
        let mut add = |protocol: u8, port: u16, len: u8| {
            if protocol == 0 {
                return;
            }
            let set = cuts.entry(protocol).or_insert_with(|| BTreeSet::from([0, 65536]));
            if len > 0 {
                set.insert(u32::from(port));
                set.insert(u32::from(block_last(port, len)) + 1);
            }
        };
        for a in admin.iter().chain(&baseline) {
            for &(protocol, port, len) in a.blocks.iter() {
                add(protocol, port, len);
            }
        }
        for k in self.np_keys(peer).chain(self.np_keys(identity::ANY)) {
            add(k.protocol, k.port, k.port_prefix_len);
        }
        let other = (1..=255u8).find(|p| !cuts.contains_key(p)).map(|p| self.eval(peer, &admin, &baseline, p, 0));
        let protos = cuts
            .into_iter()
            .map(|(protocol, points)| {
                let points: Vec<u32> = points.into_iter().collect();
                let mut pieces: Vec<(u32, u32, Decided)> = Vec::new();
                for w in points.windows(2) {
                    let (lo, hi) = (w[0], w[1] - 1);
                    let d = self.eval(peer, &admin, &baseline, protocol, u16::try_from(lo).expect("ports fit"));
                    match pieces.last_mut() {
                        Some(last) if last.2.outcome == d.outcome => {
                            last.1 = hi;
                            for b in d.by {
                                if !last.2.by.contains(&b) {
                                    last.2.by.push(b);
                                }
                            }
                        }
                        _ => pieces.push((lo, hi, d)),
                    }
                }
                (protocol, pieces)
            })
            .collect();
        Target { other, protos }
    }

    /// The NetworkPolicy-tier keys of one identity.
    fn np_keys(&self, peer: u32) -> impl Iterator<Item = &EntryKey> {
        let lo = EntryKey { direction: self.direction, identity: peer, protocol: 0, port: 0, port_prefix_len: 0 };
        let hi = EntryKey { protocol: u8::MAX, port: u16::MAX, port_prefix_len: u8::MAX, ..lo };
        self.np.range(lo..=hi).map(|(k, _)| k)
    }
}

/// A tiered rule that applies to one peer: what it does, and its blocks for that peer.
struct Applied<'a> {
    verdict: Verdict,
    origin: u32,
    blocks: Cow<'a, [(u8, u16, u8)]>,
}

impl Target {
    /// The outcomes of the pieces of `protocol` that meet lo..=hi.
    fn outcomes_in(&self, protocol: u8, lo: u32, hi: u32) -> Vec<Outcome> {
        match self.protos.get(&protocol) {
            Some(pieces) => pieces.iter().filter(|p| p.0 <= hi && p.1 >= lo).map(|p| p.2.outcome).collect(),
            None => self.other.iter().map(|o| o.outcome).collect(),
        }
    }
}

fn l4_matches(k: &EntryKey, protocol: u8, port: u16) -> bool {
    block_matches((k.protocol, k.port, k.port_prefix_len), protocol, port)
}

fn block_matches((bp, bport, len): (u8, u16, u8), protocol: u8, port: u16) -> bool {
    if bp == 0 {
        return true;
    }
    if bp != protocol {
        return false;
    }
    let mask = u16::MAX.checked_shl(16 - u32::from(len)).unwrap_or(0);
    (port & mask) == (bport & mask)
}

/// One entry to make: (protocol, port, port prefix length), deny, what decided it.
type Made = (u8, u16, u8, bool, Vec<By>);

/// Entries whose lookup gives `outcome`s exactly, as described in the module
/// documentation. `with_none`: a Drop piece must find no entry (any peer), else it is a
/// deny entry (one identity's full cover).
fn encode(t: &Target, with_none: bool) -> Vec<Made> {
    let value = |o: Outcome| -> Option<bool> {
        match o {
            Outcome::Allow => Some(false),
            Outcome::Drop if with_none => None,
            Outcome::Deny | Outcome::Drop => Some(true),
        }
    };
    let mut out: Vec<Made> = Vec::new();
    let other = t.other.as_ref().and_then(|d| value(d.outcome).map(|v| (v, d.by.clone())));
    let has_none = |pieces: &[(u32, u32, Decided)]| pieces.iter().any(|p| value(p.2.outcome).is_none());
    // A protocol-wide entry for the other protocols cannot leave a piece of some named
    // protocol without an entry: then each other protocol gets its own.
    let per_protocol = other.is_some() && t.protos.values().any(|p| has_none(p));
    if let Some((deny, by)) = &other {
        if per_protocol {
            for p in (1..=255u8).filter(|p| !t.protos.contains_key(p)) {
                out.push((p, 0, 0, *deny, by.clone()));
            }
        } else {
            out.push((0, 0, 0, *deny, by.clone()));
        }
    }
    let parent = if per_protocol { None } else { other.as_ref().map(|(d, _)| *d) };
    for (&protocol, pieces) in &t.protos {
        // The value most of the ports have, as the protocol's entry (none when a piece
        // must stay without entry).
        let mut count: BTreeMap<Option<bool>, u64> = BTreeMap::new();
        for (lo, hi, d) in pieces {
            *count.entry(value(d.outcome)).or_default() += u64::from(hi - lo + 1);
        }
        let base = if has_none(pieces) {
            None
        } else {
            count.iter().filter(|(v, _)| v.is_some()).max_by_key(|(_, n)| **n).and_then(|(v, _)| *v)
        };
        let by: Vec<By> =
            pieces.iter().filter(|p| value(p.2.outcome) == base).flat_map(|p| p.2.by.iter().cloned()).collect();
        match (base, parent) {
            (Some(b), p) if Some(b) != p => out.push((protocol, 0, 0, b, by)),
            (Some(_), Some(_)) => {
                // The entry for any protocol decides these ports too: it names their rules.
                let any_protocol = out.iter_mut().find(|m| m.0 == 0).expect("the parent entry");
                for b in by {
                    if !any_protocol.4.contains(&b) {
                        any_protocol.4.push(b);
                    }
                }
            }
            // Pieces that must find no entry: only blocks for the others (and no entry
            // for any protocol above them, see `per_protocol`).
            _ => {}
        }
        for (lo, hi, d) in pieces {
            let v = value(d.outcome);
            if v == base || v.is_none() {
                continue;
            }
            for (port, len) in
                range_to_prefixes(u16::try_from(*lo).expect("ports fit"), u16::try_from(*hi).expect("ports fit"))
            {
                out.push((protocol, port, len, v.expect("some"), d.by.clone()));
            }
        }
    }
    out
}

/// Whether `t` passes and drops the same packets as `any` (Deny and Drop alike).
fn same_passes(t: &Target, any: &Target) -> bool {
    let passes = |o: Outcome| o == Outcome::Allow;
    if let Some(other) = &t.other
        && any.other.as_ref().is_some_and(|a| passes(a.outcome) != passes(other.outcome))
    {
        return false;
    }
    t.protos.iter().all(|(&protocol, pieces)| {
        pieces
            .iter()
            .all(|(lo, hi, d)| any.outcomes_in(protocol, *lo, *hi).into_iter().all(|o| passes(o) == passes(d.outcome)))
    })
}

/// Whether `t` allows some packet that `any` denies with a deny rule.
fn allowed_where_any_denies(t: &Target, any: &Target) -> bool {
    t.other
        .as_ref()
        .is_some_and(|o| o.outcome == Outcome::Allow && any.other.as_ref().is_some_and(|a| a.outcome == Outcome::Deny))
        || t.protos.iter().any(|(&protocol, pieces)| {
            pieces.iter().any(|(lo, hi, d)| {
                d.outcome == Outcome::Allow && any.outcomes_in(protocol, *lo, *hi).contains(&Outcome::Deny)
            })
        })
}

/// One flattened entry: key, deny, what decided it.
type FlatEntry = (EntryKey, bool, Vec<By>);

/// The flattened chain of the directions tiered rules select, to put in place of what
/// the NetworkPolicy tier made there ([`Flattened::apply`]).
pub(super) struct Flattened {
    /// (direction, enforced, entries: key, deny, what decided).
    directions: Vec<(Direction, bool, Vec<FlatEntry>)>,
}

impl Flattened {
    pub fn apply(self, policy: &mut EndpointPolicy, origins: &mut Origins) {
        for (direction, enforced, entries) in self.directions {
            policy.entries.retain(|k, _| k.direction != direction);
            match direction {
                Direction::Ingress => policy.ingress_enforced = enforced,
                Direction::Egress => policy.egress_enforced = enforced,
            }
            for (key, deny, by) in entries {
                policy.entries.insert(key, EntryValue { deny, origins: origin_set(&by, origins) });
            }
        }
    }
}

/// The flattened chain of every direction that a tiered rule selects `ep` for, from the
/// NetworkPolicy tier's `policy` (see the module documentation).
pub(super) fn flatten(
    policy: &EndpointPolicy,
    st: &EndpointContributions,
    src: &Sources,
    ep: &EndpointView,
) -> Flattened {
    let mut out = Flattened { directions: Vec::new() };
    for direction in Direction::BOTH {
        if !st.tiered_in(direction, src.rules) {
            continue;
        }
        let (admin, baseline): (Vec<&TieredContribution>, Vec<&TieredContribution>) = st
            .tiered
            .iter()
            .filter(|c| src.rules.peer_rule(c.rule).direction == direction)
            .partition(|c| c.order.0.place.tier == Tier::Admin);
        let enforced = match direction {
            Direction::Ingress => policy.ingress_enforced,
            Direction::Egress => policy.egress_enforced,
        };
        let np: BTreeMap<EntryKey, EntryValue> =
            policy.entries.iter().filter(|(k, _)| k.direction == direction).map(|(k, v)| (*k, v.clone())).collect();
        let chain =
            Chain { direction, rules: src.rules, src, endpoint: ep, admin, baseline, np_enforced: enforced, np };
        // The identities that rules name.
        let mut named: BTreeSet<u32> = chain.np.keys().map(|k| k.identity).filter(|i| *i != identity::ANY).collect();
        for c in chain.admin.iter().chain(&chain.baseline) {
            for p in &c.peers {
                if let PeerSet::Sel(s) = p {
                    named.extend(src.selections.members(*s).iter().copied());
                }
            }
        }
        let any = chain.target(identity::ANY);
        let mut made: Vec<(u32, Vec<Made>)> = Vec::new();
        let mut conflict = false;
        for &id in &named {
            let t = chain.target(id);
            if same_passes(&t, &any) {
                continue;
            }
            conflict |= allowed_where_any_denies(&t, &any);
            made.push((id, encode(&t, false)));
        }
        let mut any = any;
        if conflict {
            if let Some(o) = any.other.as_mut()
                && o.outcome == Outcome::Deny
            {
                o.outcome = Outcome::Drop;
            }
            for pieces in any.protos.values_mut() {
                for p in pieces.iter_mut() {
                    if p.2.outcome == Outcome::Deny {
                        p.2.outcome = Outcome::Drop;
                    }
                }
            }
        }
        let any_made = encode(&any, true);
        let all_allow = made.is_empty()
            && any.other.as_ref().is_none_or(|o| o.outcome == Outcome::Allow)
            && any.protos.values().flatten().all(|p| p.2.outcome == Outcome::Allow);
        let enforced = !all_allow;
        let mut entries = Vec::new();
        if enforced {
            made.push((identity::ANY, any_made));
            for (id, list) in made {
                for (protocol, port, port_prefix_len, deny, by) in list {
                    entries.push((EntryKey { direction, identity: id, protocol, port, port_prefix_len }, deny, by));
                }
            }
        }
        out.directions.push((direction, enforced, entries));
    }
    out
}

fn origin_set(by: &[By], origins: &mut Origins) -> Arc<BTreeSet<RuleOrigin>> {
    let mut rules: Vec<u32> = Vec::new();
    let mut sets: Vec<&Arc<BTreeSet<RuleOrigin>>> = Vec::new();
    for b in by {
        match b {
            By::Rule(o) => rules.push(*o),
            By::Np(s) => sets.push(s),
            By::Nothing => {}
        }
    }
    rules.sort_unstable();
    rules.dedup();
    match (rules.is_empty(), sets.as_slice()) {
        (true, []) => Arc::default(),
        (true, [one]) => (*one).clone(),
        (false, []) => origins.set_of(rules.iter().copied()),
        _ => {
            let mut all: BTreeSet<RuleOrigin> = BTreeSet::new();
            if !rules.is_empty() {
                all.extend(origins.set_of(rules.iter().copied()).iter().cloned());
            }
            for s in sets {
                all.extend(s.iter().cloned());
            }
            Arc::new(all)
        }
    }
}
