//! The identity universe: every identity a peer can have (the allocator's pod and reserved
//! identities, the CIDR identities of the policies' prefixes, the address identities of
//! pod addresses inside ipBlocks), with the indexes that let a selection find its
//! candidates without testing every identity.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::cidr::{CidrBlock, Prefix};
use crate::identity;
use crate::labels::{LabelSet, source};
use crate::model::{Entity, Peer};
use crate::selector::{EndpointSelector, Operator};

/// One identity a peer can have.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Member {
    pub labels: LabelSet,
    /// Whether some label has the `k8s` source (a pod's identity): computed once.
    pub k8s: bool,
    /// CIDR identities: the prefix.
    pub cidr: Option<Prefix>,
    /// Address identities: the pod identity they stand for.
    pub base: Option<u32>,
}

impl Member {
    pub fn pod(labels: LabelSet) -> Member {
        Member::new(labels, None, None)
    }

    pub fn cidr(prefix: Prefix) -> Member {
        Member::new(crate::cidr::cidr_labels(&prefix), Some(prefix), None)
    }

    pub fn address(labels: LabelSet, pod: u32) -> Member {
        Member::new(labels, None, Some(pod))
    }

    fn new(labels: LabelSet, cidr: Option<Prefix>, base: Option<u32>) -> Member {
        let k8s = labels.has_source(source::K8S);
        Member { labels, k8s, cidr, base }
    }
}

/// Identities that appear in or leave the universe in one update.
#[derive(Debug, Default)]
pub(super) struct MemberChanges {
    pub removed: BTreeSet<u32>,
    pub added: BTreeMap<u32, Member>,
}

impl MemberChanges {
    pub fn is_empty(&self) -> bool {
        self.removed.is_empty() && self.added.is_empty()
    }
}

/// key -> value -> ids.
#[derive(Clone, Debug, Default)]
pub(super) struct LabelIndex {
    by_key: HashMap<String, HashMap<String, BTreeSet<u32>>>,
}

impl LabelIndex {
    pub fn add(&mut self, id: u32, labels: &LabelSet) {
        for l in labels.iter() {
            let values = match self.by_key.get_mut(&l.key) {
                Some(v) => v,
                None => self.by_key.entry(l.key.clone()).or_default(),
            };
            match values.get_mut(&l.value) {
                Some(ids) => {
                    ids.insert(id);
                }
                None => {
                    values.insert(l.value.clone(), BTreeSet::from([id]));
                }
            }
        }
    }

    fn remove(&mut self, id: u32, labels: &LabelSet) {
        for l in labels.iter() {
            if let Some(values) = self.by_key.get_mut(&l.key)
                && let Some(ids) = values.get_mut(&l.value)
            {
                ids.remove(&id);
                if ids.is_empty() {
                    values.remove(&l.value);
                }
            }
        }
    }

    /// The ids that can match `sel`: those of its most selective `In` requirement, or
    /// `None` (every id is a candidate).
    pub fn candidates(&self, sel: &EndpointSelector) -> Option<Vec<u32>> {
        let mut best: Option<Vec<u32>> = None;
        for r in sel.requirements() {
            if r.operator != Operator::In {
                continue;
            }
            let values = self.by_key.get(&r.key.key);
            let mut ids: Vec<u32> = r
                .values
                .iter()
                .filter_map(|v| values.and_then(|vals| vals.get(v)))
                .flat_map(|s| s.iter().copied())
                .collect();
            if r.values.len() > 1 {
                ids.sort_unstable();
                ids.dedup();
            }
            if best.as_ref().is_none_or(|b| ids.len() < b.len()) {
                best = Some(ids);
            }
        }
        best
    }

    /// Every id with some value for `key`.
    fn with_key(&self, key: &str) -> impl Iterator<Item = u32> + '_ {
        self.by_key.get(key).into_iter().flat_map(|values| values.values().flatten().copied())
    }
}

/// Every identity a peer can have, indexed.
#[derive(Clone, Debug, Default)]
pub(super) struct Universe {
    members: BTreeMap<u32, Member>,
    index: LabelIndex,
    /// Reserved and CIDR identities: the only ones entities (but `cluster`) and CIDR
    /// peers select.
    special: BTreeSet<u32>,
    /// CIDR identities, by prefix (for range queries).
    cidr_ids: BTreeMap<Prefix, u32>,
}

impl Universe {
    pub fn get(&self, id: u32) -> Option<&Member> {
        self.members.get(&id)
    }

    /// The CIDR identities in the universe, by prefix.
    pub fn cidr_ids(&self) -> &BTreeMap<Prefix, u32> {
        &self.cidr_ids
    }

    pub fn insert(&mut self, id: u32, member: Member) {
        self.index.add(id, &member.labels);
        if member.cidr.is_some() || identity::is_reserved(id) {
            self.special.insert(id);
        }
        if let Some(p) = member.cidr {
            self.cidr_ids.insert(p, id);
        }
        self.members.insert(id, member);
    }

    pub fn remove(&mut self, id: u32) -> Option<Member> {
        let member = self.members.remove(&id)?;
        self.index.remove(id, &member.labels);
        self.special.remove(&id);
        if let Some(p) = member.cidr {
            self.cidr_ids.remove(&p);
        }
        Some(member)
    }

    /// The identities among the candidates of `peer` that pass `test` (candidates: those
    /// the label index or the prefix index finds for it, or every identity).
    pub fn members_of(&self, peer: &Peer, test: impl Fn(u32, &Member) -> bool) -> BTreeSet<u32> {
        let test = |id: &u32| test(*id, &self.members[id]);
        match peer {
            Peer::Endpoints(sel) => match self.index.candidates(sel) {
                Some(ids) => ids.into_iter().filter(test).collect(),
                None => self.members.keys().filter(|id| test(id)).copied().collect(),
            },
            Peer::Entity(Entity::Cluster) => self.members.keys().filter(|id| test(id)).copied().collect(),
            Peer::Cidr(block) => self.cidr_candidates(block).filter(test).collect(),
            Peer::IpBlock(block) => {
                // Address identities carry the block's label: the index has them.
                let mut out: BTreeSet<u32> = self.cidr_candidates(block).filter(&test).collect();
                out.extend(self.index.with_key(&block.label_key()).filter(&test));
                out
            }
            Peer::Entity(_) => self.special.iter().filter(|id| test(id)).copied().collect(),
        }
    }

    /// The identities a CIDR block can select: the CIDR identities of the prefixes in its
    /// range (found by a range query, not by testing every one) and the world identities.
    fn cidr_candidates(&self, block: &CidrBlock) -> impl Iterator<Item = u32> + '_ {
        let (lo, hi) = block.cidr.inner_bounds();
        self.cidr_ids.range(lo..=hi).map(|(_, id)| *id).chain(
            [identity::WORLD, identity::WORLD_IPV4, identity::WORLD_IPV6]
                .into_iter()
                .filter(|id| self.members.contains_key(id)),
        )
    }
}
