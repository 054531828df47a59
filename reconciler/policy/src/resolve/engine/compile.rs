//! Policies compiled for resolution: every distinct peer, `requires` selector and peer
//! rule gets a number, every rule (policy, rule index) becomes a [`FlatRule`] naming its
//! peer rules and their peers by number, and every peer rule has the origin entries
//! carry. Numbers stay while the compilation lives, so selections (peer + requires)
//! survive policy changes: a changed policy is compiled anew and appended, its old rules
//! are left behind ([`CompiledRules::dead`]) until the next full compilation.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use super::super::{PortNames, RuleOrigin, l4_blocks};
use crate::cidr::CidrBlock;
use crate::identity;
use crate::model::{
    Direction, Entity, Peer, Peers, Policy, PolicyKind, Port, PortRule, Protocol, Rule, TierPlace, Verdict,
};
use crate::selector::EndpointSelector;

/// A policy's name: policies with the same name replace each other.
pub(super) type PolicyId = (PolicyKind, Option<String>, String);

pub(super) fn policy_id(p: &Policy) -> PolicyId {
    (p.kind, p.namespace.clone(), p.name.clone())
}

/// A peer rule of some policy, compiled.
#[derive(Clone, Debug)]
pub(super) struct CompiledPeerRule {
    pub direction: Direction,
    pub verdict: Verdict,
    /// Its number in [`Origins`].
    pub origin: u32,
    pub ports: Vec<PortRule>,
    /// The L4 blocks when they depend on nothing (no named port).
    pub fixed_blocks: Option<Vec<(u8, u16, u8)>>,
    /// `fromRequires` / `toRequires` (selector numbers), sorted.
    pub requires: Vec<u32>,
}

/// A peer as a compiled rule names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum PeerRef {
    /// Every peer (identity 0).
    Any,
    /// [`CompiledRules::peer`] `n`.
    Peer(u32),
}

/// Where the rule of a tiered policy stands among all tiered rules: tier, priority, then
/// the policy's kind and name (policies of one priority are ordered by name, so that the
/// order is the same however the rules were compiled).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct TierOrder {
    pub place: TierPlace,
    pub kind: PolicyKind,
    pub name: String,
}

/// One rule of one policy, compiled.
#[derive(Clone, Debug)]
pub(super) struct FlatRule {
    /// `Some` for the rules of Admin and Baseline tier policies: their peer rules are
    /// ordered (first match decides) and they enforce nothing.
    pub order: Option<TierOrder>,
    pub subject: EndpointSelector,
    /// Whether the rule puts ingress, egress under default deny.
    pub enforce: [bool; 2],
    /// (compiled peer rule, its peers).
    pub peer_rules: Vec<(u32, Vec<PeerRef>)>,
}

/// The origin of every compiled peer rule, and the shared sets entries hold.
#[derive(Clone, Debug, Default)]
pub(super) struct Origins {
    all: Vec<RuleOrigin>,
    /// The set of each single origin.
    single: Vec<Arc<BTreeSet<RuleOrigin>>>,
    /// Sets of several origins (sorted numbers), made once.
    combined: HashMap<Vec<u32>, Arc<BTreeSet<RuleOrigin>>>,
}

impl Origins {
    fn push(&mut self, origin: RuleOrigin) -> u32 {
        self.single.push(Arc::new(BTreeSet::from([origin.clone()])));
        self.all.push(origin);
        (self.all.len() - 1) as u32
    }

    /// The shared set of these origins (sorted, not empty).
    pub fn set_of(&mut self, sorted: impl Iterator<Item = u32> + Clone) -> Arc<BTreeSet<RuleOrigin>> {
        let mut it = sorted.clone();
        let first = it.next().expect("at least one origin");
        if it.all(|o| o == first) {
            return self.single[first as usize].clone();
        }
        let mut ids: Vec<u32> = sorted.collect();
        ids.dedup();
        if let Some(set) = self.combined.get(&ids) {
            return set.clone();
        }
        let set: Arc<BTreeSet<RuleOrigin>> = Arc::new(ids.iter().map(|o| self.all[*o as usize].clone()).collect());
        self.combined.insert(ids, set.clone());
        set
    }
}

/// The compiled rules of the policies the state reflects.
#[derive(Clone, Debug, Default)]
pub(super) struct CompiledRules {
    peers: Vec<Peer>,
    /// Peer -> its number in `peers`.
    peer_ids: HashMap<Peer, u32>,
    requires: Vec<EndpointSelector>,
    peer_rules: Vec<CompiledPeerRule>,
    pub origins: Origins,
    /// Append-only between full compilations.
    flat_rules: Vec<FlatRule>,
    /// The flat rules of every policy, by name.
    by_policy: HashMap<PolicyId, Vec<usize>>,
    /// Flat rules of policies that changed or went, left behind.
    dead: usize,
}

impl CompiledRules {
    /// The policies compiled afresh (numbers start again).
    pub fn compile_all(policies: &[Policy]) -> CompiledRules {
        let mut out = CompiledRules::default();
        for p in policies {
            let fis = out.compile_policy(p);
            out.by_policy.entry(policy_id(p)).or_default().extend(fis);
        }
        out
    }

    /// Compiles `p` (new or changed) and makes its rules the live ones under its name;
    /// answers their numbers.
    pub fn replace_policy(&mut self, id: PolicyId, p: &Policy) -> Vec<usize> {
        let fis = self.compile_policy(p);
        self.by_policy.insert(id, fis.clone());
        fis
    }

    /// Takes the rules of policy `id` out of the live ones (they stay behind as dead);
    /// answers their numbers.
    pub fn remove_policy(&mut self, id: &PolicyId) -> Vec<usize> {
        let fis = self.by_policy.remove(id).unwrap_or_default();
        self.dead += fis.len();
        fis
    }

    /// Whether more rules are left behind than are live (and then some): time to
    /// compile afresh.
    pub fn too_many_dead(&self) -> bool {
        let live: usize = self.by_policy.values().map(Vec::len).sum();
        self.dead > live + 1024
    }

    /// The live flat rules, in no particular order.
    pub fn live(&self) -> impl Iterator<Item = usize> + '_ {
        self.by_policy.values().flatten().copied()
    }

    pub fn rule(&self, fi: usize) -> &FlatRule {
        &self.flat_rules[fi]
    }

    pub fn peer_rule(&self, pr: u32) -> &CompiledPeerRule {
        &self.peer_rules[pr as usize]
    }

    pub fn peer(&self, peer: u32) -> &Peer {
        &self.peers[peer as usize]
    }

    pub fn require(&self, r: u32) -> &EndpointSelector {
        &self.requires[r as usize]
    }

    /// The distinct ipBlocks of the live rules.
    pub fn ip_blocks(&self) -> Vec<CidrBlock> {
        let mut blocks: BTreeSet<CidrBlock> = BTreeSet::new();
        for fi in self.live() {
            for (_, refs) in &self.flat_rules[fi].peer_rules {
                for r in refs {
                    if let PeerRef::Peer(p) = r
                        && let Peer::IpBlock(b) = &self.peers[*p as usize]
                    {
                        blocks.insert(b.clone());
                    }
                }
            }
        }
        blocks.into_iter().collect()
    }

    /// Compiles one policy's rules (appended to the flat rules); answers their numbers.
    fn compile_policy(&mut self, p: &Policy) -> Vec<usize> {
        let mut out = Vec::new();
        for (ri, rule) in p.rules.iter().enumerate() {
            let flat = self.compile_rule(p, ri, rule);
            out.push(self.flat_rules.len());
            self.flat_rules.push(flat);
        }
        out
    }

    fn compile_rule(&mut self, p: &Policy, ri: usize, rule: &Rule) -> FlatRule {
        let mut flat = FlatRule {
            order: p.tier.map(|place| TierOrder { place, kind: p.kind, name: p.name.clone() }),
            subject: rule.subject.clone(),
            enforce: [rule.enforce_ingress, rule.enforce_egress],
            peer_rules: Vec::new(),
        };
        for direction in Direction::BOTH {
            for (i, pr) in rule.peer_rules(direction).iter().enumerate() {
                let origin = self.origins.push(RuleOrigin {
                    kind: p.kind,
                    namespace: p.namespace.clone(),
                    name: p.name.clone(),
                    direction,
                    rule_index: ri,
                    peer_rule_index: i,
                    path: pr.path.clone(),
                    tier: p.tier,
                });
                let fixed = pr.ports.iter().all(|r| !matches!(r.port, Port::Named(_)));
                let ports = if pr.ports.is_empty() {
                    vec![PortRule { protocol: Protocol::Any, port: Port::Any }]
                } else {
                    pr.ports.clone()
                };
                let fixed_blocks = fixed.then(|| {
                    let mut out: Vec<(u8, u16, u8)> = ports
                        .iter()
                        .flat_map(|r| l4_blocks(r, direction, identity::ANY, None, PortNames::none()))
                        .collect();
                    out.sort_unstable();
                    out.dedup();
                    out
                });
                let mut requires: Vec<u32> = pr.requires.iter().map(|s| self.intern_require(s)).collect();
                requires.sort_unstable();
                requires.dedup();
                let idx = self.peer_rules.len() as u32;
                self.peer_rules.push(CompiledPeerRule {
                    direction,
                    verdict: pr.verdict,
                    origin,
                    ports,
                    fixed_blocks,
                    requires,
                });
                let refs = match &pr.peers {
                    Peers::Any => vec![PeerRef::Any],
                    Peers::Only(list) => list
                        .iter()
                        .filter_map(|peer| match peer {
                            Peer::Entity(Entity::All) => Some(PeerRef::Any),
                            Peer::Entity(Entity::None) => None,
                            other => Some(PeerRef::Peer(self.intern_peer(other))),
                        })
                        .collect(),
                };
                flat.peer_rules.push((idx, refs));
            }
        }
        flat
    }

    fn intern_peer(&mut self, peer: &Peer) -> u32 {
        let next = self.peer_ids.len() as u32;
        let id = *self.peer_ids.entry(peer.clone()).or_insert(next);
        if id == next {
            self.peers.push(peer.clone());
        }
        id
    }

    fn intern_require(&mut self, sel: &EndpointSelector) -> u32 {
        if let Some(i) = self.requires.iter().position(|s| s == sel) {
            i as u32
        } else {
            self.requires.push(sel.clone());
            (self.requires.len() - 1) as u32
        }
    }
}
