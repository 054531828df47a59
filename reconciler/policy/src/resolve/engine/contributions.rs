//! Per endpoint, its *contributions*: (compiled peer rule, the peers it applies to) for
//! every peer rule of every rule that selects the endpoint, and whether it is enforced per
//! direction. An endpoint's raw entries are its contributions' member identities x the
//! peer rules' L4 blocks ([`raw_entries`]), before [`super::verdicts`] decides them.

use std::collections::{BTreeMap, BTreeSet};

use super::super::{EndpointView, EntryKey, NamedPort, PortNames, l4_blocks};
use super::compile::{CompiledPeerRule, CompiledRules, PeerRef, TierOrder};
use super::selections::{SelKey, Selections};
use super::universe::Universe;
use super::verdicts::Raw;
use crate::identity;
use crate::model::{Direction, Peer, Verdict};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum PeerSet {
    Any,
    Sel(usize),
}

#[derive(Clone, Copy, Debug)]
struct Contribution {
    rule: u32,
    peers: PeerSet,
}

/// A peer rule of an Admin or Baseline tier policy selecting the endpoint, with its
/// place in the evaluation order.
#[derive(Clone, Debug)]
pub(super) struct TieredContribution {
    /// (tier order of its rule, position of the peer rule in its rule).
    pub order: (TierOrder, usize),
    pub rule: u32,
    pub peers: Vec<PeerSet>,
}

/// What the rules selecting one endpoint give it.
#[derive(Clone, Debug, Default)]
pub(super) struct EndpointContributions {
    /// The NetworkPolicy tier's.
    contributions: Vec<Contribution>,
    /// The Admin and Baseline tiers', in evaluation order (Admin by priority, then
    /// Baseline by priority; rule order within a policy).
    pub tiered: Vec<TieredContribution>,
    pub enforce: [bool; 2],
    /// Whether some direction has deny rules without default deny: then the direction
    /// holds its denies and one allow for any peer, and updates recompute the endpoint.
    pub deny_without_default: bool,
}

impl EndpointContributions {
    /// Whether some contribution has a named port (its L4 blocks depend on the endpoints).
    pub fn names_ports(&self, rules: &CompiledRules) -> bool {
        self.contributions.iter().any(|c| rules.peer_rule(c.rule).fixed_blocks.is_none())
            || self.tiered.iter().any(|c| rules.peer_rule(c.rule).fixed_blocks.is_none())
    }

    /// Whether some Admin or Baseline tier rule selects the endpoint in `direction`.
    pub fn tiered_in(&self, direction: Direction, rules: &CompiledRules) -> bool {
        self.tiered.iter().any(|c| rules.peer_rule(c.rule).direction == direction)
    }
}

/// The contributions of every endpoint the state reflects.
#[derive(Clone, Debug, Default)]
pub(super) struct Contributions {
    by_endpoint: BTreeMap<u16, EndpointContributions>,
}

impl Contributions {
    pub fn get(&self, ep: u16) -> Option<&EndpointContributions> {
        self.by_endpoint.get(&ep)
    }

    pub fn iter(&self) -> impl Iterator<Item = (u16, &EndpointContributions)> {
        self.by_endpoint.iter().map(|(id, c)| (*id, c))
    }

    /// Endpoint `ep`'s contributions from the flat rules `selecting` it (sorted): its
    /// selections are made if new and note the endpoint as a user.
    pub fn compute(
        &mut self,
        ep: u16,
        selecting: &[usize],
        rules: &CompiledRules,
        selections: &mut Selections,
        universe: &Universe,
    ) {
        // The requires of every peer rule of one direction and verdict apply to all of them.
        let mut requires: BTreeMap<(Direction, Verdict), Vec<u32>> = BTreeMap::new();
        for &fi in selecting {
            for (pr, _) in &rules.rule(fi).peer_rules {
                let c = rules.peer_rule(*pr);
                requires.entry((c.direction, c.verdict)).or_default().extend(c.requires.iter().copied());
            }
        }
        for r in requires.values_mut() {
            r.sort_unstable();
            r.dedup();
        }
        let mut st = EndpointContributions::default();
        for &fi in selecting {
            let flat = rules.rule(fi);
            if let Some(order) = &flat.order {
                for (position, (pr, refs)) in flat.peer_rules.iter().enumerate() {
                    let peers = refs
                        .iter()
                        .map(|r| match *r {
                            PeerRef::Any => PeerSet::Any,
                            PeerRef::Peer(peer) => PeerSet::Sel(selections.use_for(
                                SelKey { peer, requires: Vec::new() },
                                ep,
                                rules,
                                universe,
                            )),
                        })
                        .collect();
                    st.tiered.push(TieredContribution { order: (order.clone(), position), rule: *pr, peers });
                }
                continue;
            }
            st.enforce[0] |= flat.enforce[0];
            st.enforce[1] |= flat.enforce[1];
            for (pr, refs) in &flat.peer_rules {
                let c = rules.peer_rule(*pr);
                for r in refs {
                    let peers = match *r {
                        PeerRef::Any => PeerSet::Any,
                        PeerRef::Peer(peer) => {
                            let requires = match rules.peer(peer) {
                                Peer::Endpoints(_) => {
                                    requires.get(&(c.direction, c.verdict)).cloned().unwrap_or_default()
                                }
                                _ => Vec::new(),
                            };
                            PeerSet::Sel(selections.use_for(SelKey { peer, requires }, ep, rules, universe))
                        }
                    };
                    st.contributions.push(Contribution { rule: *pr, peers });
                }
            }
        }
        for (d, direction) in Direction::BOTH.into_iter().enumerate() {
            if !st.enforce[d]
                && st.contributions.iter().any(|c| {
                    let r = rules.peer_rule(c.rule);
                    r.direction == direction && r.verdict == Verdict::Deny
                })
            {
                st.deny_without_default = true;
            }
        }
        st.tiered.sort_by(|a, b| a.order.cmp(&b.order));
        self.by_endpoint.insert(ep, st);
    }

    /// Takes endpoint `ep`'s contributions out, and the endpoint out of its selections'
    /// users.
    pub fn forget(&mut self, ep: u16, selections: &mut Selections) {
        let Some(st) = self.by_endpoint.remove(&ep) else { return };
        for c in st.contributions {
            if let PeerSet::Sel(s) = c.peers {
                selections.stop_using(s, ep);
            }
        }
        for c in st.tiered {
            for p in c.peers {
                if let PeerSet::Sel(s) = p {
                    selections.stop_using(s, ep);
                }
            }
        }
    }
}

/// What raw entries are made of: the compiled rules, the selections' members, the
/// universe (the pod behind an address identity), the local endpoints and the other
/// nodes' pods' named ports (by identity).
pub(super) struct Sources<'a> {
    pub rules: &'a CompiledRules,
    pub selections: &'a Selections,
    pub universe: &'a Universe,
    pub endpoints: &'a [EndpointView],
    pub remote_named_ports: &'a BTreeMap<u32, Vec<NamedPort>>,
}

impl Sources<'_> {
    /// Where egress named ports are looked up.
    pub fn port_names(&self) -> PortNames<'_> {
        PortNames { local: self.endpoints, remote: self.remote_named_ports }
    }
}

/// The raw entries of endpoint `ep` from its contributions `st`, for every identity
/// (`only: None`) or for these identities; sorted, without duplicates.
pub(super) fn raw_entries(
    src: &Sources,
    ep: &EndpointView,
    st: &EndpointContributions,
    only: Option<&BTreeSet<u32>>,
) -> Vec<Raw> {
    let mut raw = Vec::new();
    let push = |c: &CompiledPeerRule, peer: u32, raw: &mut Vec<Raw>| {
        let deny = c.verdict == Verdict::Deny;
        let mut emit = |(protocol, port, port_prefix_len): (u8, u16, u8)| {
            let key = EntryKey { direction: c.direction, identity: peer, protocol, port, port_prefix_len };
            raw.push(Raw::new(&key, deny, c.origin));
        };
        if let Some(blocks) = &c.fixed_blocks {
            blocks.iter().copied().for_each(&mut emit);
        } else {
            // Named ports resolve on the destination: for egress, the local endpoints
            // of the peer's pod identity.
            let base = src.universe.get(peer).and_then(|m| m.base).unwrap_or(peer);
            for r in &c.ports {
                l4_blocks(r, c.direction, base, Some(ep), src.port_names()).into_iter().for_each(&mut emit);
            }
        }
    };
    for contribution in &st.contributions {
        let c = src.rules.peer_rule(contribution.rule);
        match (contribution.peers, only) {
            (PeerSet::Any, None) => push(c, identity::ANY, &mut raw),
            (PeerSet::Any, Some(_)) => {}
            (PeerSet::Sel(s), None) => {
                for &id in src.selections.members(s) {
                    push(c, id, &mut raw);
                }
            }
            (PeerSet::Sel(s), Some(ids)) => {
                let members = src.selections.members(s);
                for &id in ids {
                    if members.contains(&id) {
                        push(c, id, &mut raw);
                    }
                }
            }
        }
    }
    raw.sort_unstable();
    raw.dedup();
    raw
}
