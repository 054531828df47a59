//! The resolver that keeps its work: [`PolicyResolver`] holds policies, endpoints and
//! identities, resolves everything once, and afterwards updates only what a change
//! touches: an identity, a policy, an endpoint.
//!
//! How it is organised:
//!
//! - **Peers are compiled once.** Every distinct peer of every policy (an endpoint
//!   selector, an entity, a CIDR block, an ipBlock) gets a number; with the `requires` in
//!   force for an endpoint, a peer becomes a *selection* (peer + requires). Selections are
//!   shared by every endpoint and rule that uses them.
//! - **Selection cache.** Each selection knows its member identities and the endpoints
//!   that use it. Members are found through a label index (key -> value -> identities) from
//!   the selector's most selective `In` requirement, so a selector is matched against its
//!   candidates, not against every identity; a CIDR block takes the CIDR identities of its
//!   address range from a prefix-ordered index (a range query).
//! - **Compiled rules are append-only.** A policy's rules are compiled on their own (peer
//!   numbers are interned and stay, so selections survive); a changed policy is compiled
//!   anew and its old rules are left behind until the next full resolution, which comes
//!   once more rules are left behind than are live.
//! - **Per endpoint**, the resolver keeps its *contributions*: (peer rule, selection). Its
//!   entries are the contributions' members x the peer rules' L4 blocks, denies win.
//! - **An identity appears or disappears**: it is tested against every selection; the
//!   endpoints that use a selection whose membership changed are the affected ones; for
//!   each, only the entries of that identity are recomputed and written. Every entry of an
//!   identity depends only on the contributions whose selection holds it and on the
//!   endpoint's denies for any peer, which an identity change does not touch; the one
//!   exception (a direction with deny rules but no default deny, where every allow is
//!   replaced by one allow for any peer) recomputes that endpoint in full.
//! - **A policy changes** (added, removed, or different under the same name): the
//!   endpoints its old and its new rules select are computed in full; the CIDR identities
//!   it adds or drops, and the address identities of ipBlocks it adds or drops, are
//!   identity changes as above.
//! - **An endpoint comes or changes**: it alone is computed; one that goes is dropped.
//!   Named ports resolve on the local endpoints, so a change of named ports (or of the
//!   identity of an endpoint with named ports) also recomputes the endpoints whose rules
//!   name ports.
//!
//! Pods inside a Kubernetes NetworkPolicy ipBlock: an ipBlock is a set of addresses, and a
//! pod may have one address inside it and another (of the other family) outside. So the
//! membership is not a label of the pod's identity: every pod address inside some ipBlock
//! gets an *address identity*, node-local, whose labels are the pod's labels plus one
//! `ipblock:<block>` label per ipBlock that contains that address. The ipcache maps the
//! address to it ([`DesiredState::address_ipcache`]); selectors that match the pod match it
//! too (it has the pod's labels), and an ipBlock peer selects exactly the address
//! identities carrying its label. Addresses of one pod with the same membership share one.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use super::{
    DesiredState, EndpointPolicy, EndpointView, EntryKey, EntryValue, RuleOrigin, endpoint_selectable, l4_blocks,
};
use crate::cidr::{CidrBlock, CidrIdentities, IPBLOCK_SOURCE, Prefix};
use crate::identity::{self, IdentityAllocator};
use crate::labels::{Label, LabelSet, source};
use crate::model::{Direction, Entity, Peer, Peers, Policy, PolicyKind, PortRule, Rule, Verdict};
use crate::selector::{EndpointSelector, Operator};

/// Address identities are numbered from here: node-local scope, upper half (CIDR
/// identities count up from the bottom of the same scope).
pub const ADDRESS_IDENTITY_BASE: u32 = identity::LOCAL_SCOPE | (1 << 23);

/// Options of a [`PolicyResolver`].
#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    /// Give every ingress-enforced endpoint an allow for the host identity, any protocol
    /// and port, with no rule behind it (Cilium's `allow-localhost`: kubelet probes).
    pub allow_localhost: bool,
}

/// What an incremental update changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Identities that appeared or disappeared (pod, CIDR and address identities).
    pub identities: usize,
    /// Endpoints whose entries were recomputed.
    pub endpoints: usize,
    /// Policy entries added, removed or changed, over all endpoints.
    pub entries: usize,
    /// Whether the update fell back to full resolution.
    pub full: bool,
}

/// One identity a peer can have.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Member {
    labels: LabelSet,
    /// Whether some label has the `k8s` source (a pod's identity): computed once.
    k8s: bool,
    /// CIDR identities: the prefix.
    cidr: Option<Prefix>,
    /// Address identities: the pod identity they stand for.
    base: Option<u32>,
}

impl Member {
    fn new(labels: LabelSet, cidr: Option<Prefix>, base: Option<u32>) -> Member {
        let k8s = labels.has_source(source::K8S);
        Member { labels, k8s, cidr, base }
    }
}

/// A peer with the requires in force: what a selection selects.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct SelKey {
    peer: u32,
    /// Requires (selector numbers), sorted; only for endpoint selectors.
    requires: Vec<u32>,
}

#[derive(Clone, Debug)]
struct Selection {
    key: SelKey,
    members: BTreeSet<u32>,
    /// Endpoints with a contribution that uses this selection.
    users: BTreeSet<u16>,
}

/// A peer rule of some policy, compiled.
#[derive(Clone, Debug)]
struct CompiledPeerRule {
    direction: Direction,
    verdict: Verdict,
    origin: u32,
    ports: Vec<PortRule>,
    /// The L4 blocks when they depend on nothing (no named port).
    fixed_blocks: Option<Vec<(u8, u16, u8)>>,
    /// `fromRequires` / `toRequires` (selector numbers), sorted.
    requires: Vec<u32>,
}

/// A peer as a compiled rule names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PeerRef {
    /// Every peer (identity 0).
    Any,
    /// `peers[n]`.
    Peer(u32),
}

/// One rule of one policy, compiled.
#[derive(Clone, Debug)]
struct FlatRule {
    subject: EndpointSelector,
    /// Whether the rule puts ingress, egress under default deny.
    enforce: [bool; 2],
    /// (compiled peer rule, its peers).
    peer_rules: Vec<(u32, Vec<PeerRef>)>,
}

/// A policy's name: policies with the same name replace each other.
type PolicyId = (PolicyKind, Option<String>, String);

fn policy_id(p: &Policy) -> PolicyId {
    (p.kind, p.namespace.clone(), p.name.clone())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PeerSet {
    Any,
    Sel(usize),
}

#[derive(Clone, Copy, Debug)]
struct Contribution {
    rule: u32,
    peers: PeerSet,
}

#[derive(Clone, Debug, Default)]
struct EndpointState {
    contributions: Vec<Contribution>,
    enforce: [bool; 2],
    /// Whether some direction has deny rules without default deny: then the direction
    /// holds its denies and one allow for any peer, and updates recompute the endpoint.
    deny_without_default: bool,
}

/// key -> value -> ids.
#[derive(Clone, Debug, Default)]
struct LabelIndex {
    by_key: HashMap<String, HashMap<String, BTreeSet<u32>>>,
}

impl LabelIndex {
    fn add(&mut self, id: u32, labels: &LabelSet) {
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
    fn candidates(&self, sel: &EndpointSelector) -> Option<Vec<u32>> {
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
}

/// Numbers for address identities, keyed by their label set, stable while in use.
#[derive(Clone, Debug, Default)]
struct AddressIdentities {
    by_labels: HashMap<LabelSet, (u32, usize)>,
    labels: BTreeMap<u32, LabelSet>,
    free: BTreeSet<u32>,
    next: u32,
}

impl AddressIdentities {
    /// Takes a reference on the identity of `labels`; answers it and whether it is new.
    fn acquire(&mut self, labels: &LabelSet) -> (u32, bool) {
        if let Some((id, refs)) = self.by_labels.get_mut(labels) {
            *refs += 1;
            return (*id, false);
        }
        let id = self.free.pop_first().unwrap_or_else(|| {
            let id = ADDRESS_IDENTITY_BASE + self.next;
            self.next += 1;
            id
        });
        self.by_labels.insert(labels.clone(), (id, 1));
        self.labels.insert(id, labels.clone());
        (id, true)
    }

    /// Drops a reference; answers whether that freed the identity.
    fn release(&mut self, id: u32) -> bool {
        let Some(labels) = self.labels.get(&id) else { return false };
        let slot = self.by_labels.get_mut(labels).expect("maps agree");
        slot.1 -= 1;
        if slot.1 > 0 {
            return false;
        }
        let labels = self.labels.remove(&id).expect("just seen");
        self.by_labels.remove(&labels);
        self.free.insert(id);
        true
    }
}

/// Resolves policies for the local endpoints and keeps the result current, incrementally
/// when identities or pod addresses change (see the module documentation).
#[derive(Clone, Debug)]
pub struct PolicyResolver {
    options: Options,
    policies: Arc<Vec<Policy>>,
    endpoints: Vec<EndpointView>,
    identities: Arc<IdentityAllocator>,
    /// Pod address -> pod identity (local and remote pods).
    addresses: BTreeMap<IpAddr, u32>,
    cidrs: CidrIdentities,
    address_ids: AddressIdentities,
    /// Pod address -> its address identity (addresses inside some ipBlock).
    address_of: BTreeMap<IpAddr, u32>,
    /// Distinct ipBlocks of the policies.
    ip_blocks: Vec<CidrBlock>,

    peers: Vec<Peer>,
    /// Peer -> its number in `peers` (numbers stay while the compilation lives, so
    /// selections survive policy changes).
    peer_ids: HashMap<Peer, u32>,
    requires: Vec<EndpointSelector>,
    rules: Vec<CompiledPeerRule>,
    origins: Vec<RuleOrigin>,
    origin_sets: HashMap<Vec<u32>, Arc<BTreeSet<RuleOrigin>>>,
    /// The set of each single origin.
    single_origins: Vec<Arc<BTreeSet<RuleOrigin>>>,

    universe: BTreeMap<u32, Member>,
    index: LabelIndex,
    /// Reserved and CIDR identities: the only ones entities (but `cluster`) and CIDR
    /// peers select.
    special: BTreeSet<u32>,
    selections: Vec<Selection>,
    selection_of: HashMap<SelKey, usize>,
    /// Per flattened rule (policy, rule index): its compiled peer rules and their peers.
    /// Append-only between full resolutions: a changed policy's rules are compiled anew
    /// and the old ones are left behind (`dead_rules` counts them).
    flat_rules: Vec<FlatRule>,
    /// The flat rules of every policy the state reflects, by name.
    policy_rules: HashMap<PolicyId, Vec<usize>>,
    dead_rules: usize,
    /// The policies and endpoints the state reflects (the next update compares the
    /// current ones with these).
    applied_policies: Arc<Vec<Policy>>,
    applied_endpoints: HashMap<u16, EndpointView>,
    /// CIDR identities in the universe, by prefix (for range queries).
    cidr_ids: BTreeMap<Prefix, u32>,
    endpoint_state: BTreeMap<u16, EndpointState>,
    state: DesiredState,
    /// Nothing resolved yet, or an update cannot be done incrementally: the next
    /// resolution is a full one.
    stale: bool,
}

impl Default for PolicyResolver {
    fn default() -> Self {
        PolicyResolver::new(Options::default())
    }
}

impl PolicyResolver {
    pub fn new(options: Options) -> PolicyResolver {
        PolicyResolver {
            options,
            policies: Arc::default(),
            endpoints: Vec::new(),
            identities: Arc::new(IdentityAllocator::new()),
            addresses: BTreeMap::new(),
            cidrs: CidrIdentities::new(),
            address_ids: AddressIdentities::default(),
            address_of: BTreeMap::new(),
            ip_blocks: Vec::new(),
            peers: Vec::new(),
            peer_ids: HashMap::new(),
            requires: Vec::new(),
            rules: Vec::new(),
            origins: Vec::new(),
            origin_sets: HashMap::new(),
            single_origins: Vec::new(),
            universe: BTreeMap::new(),
            index: LabelIndex::default(),
            special: BTreeSet::new(),
            selections: Vec::new(),
            selection_of: HashMap::new(),
            flat_rules: Vec::new(),
            policy_rules: HashMap::new(),
            dead_rules: 0,
            applied_policies: Arc::default(),
            applied_endpoints: HashMap::new(),
            cidr_ids: BTreeMap::new(),
            endpoint_state: BTreeMap::new(),
            state: DesiredState::default(),
            stale: true,
        }
    }

    /// New policies; the next [`PolicyResolver::update_identities`] recomputes the
    /// endpoints the policies that changed (by name) select, and what their CIDR
    /// identities and ipBlocks change. CIDR identities keep their numbers while their
    /// prefix is still named.
    pub fn set_policies(&mut self, policies: Arc<Vec<Policy>>) {
        self.cidrs.sync(&policies);
        self.policies = policies;
    }

    /// Uses these CIDR identities (instead of numbering the policies' prefixes itself).
    pub fn set_cidr_identities(&mut self, cidrs: CidrIdentities) {
        self.cidrs = cidrs;
        self.stale = true;
    }

    /// New local endpoints; the next [`PolicyResolver::update_identities`] recomputes
    /// those that are new or changed (and, when named ports changed, those whose egress
    /// rules name ports).
    pub fn set_endpoints(&mut self, endpoints: Vec<EndpointView>) {
        self.endpoints = endpoints;
    }

    /// Sets identities and pod addresses without resolving (the next
    /// [`PolicyResolver::resolve`] resolves everything).
    pub fn set_identities(&mut self, identities: Arc<IdentityAllocator>, addresses: BTreeMap<IpAddr, u32>) {
        self.identities = identities;
        self.addresses = addresses;
        self.stale = true;
    }

    pub fn policies(&self) -> &Arc<Vec<Policy>> {
        &self.policies
    }

    pub fn cidr_identities(&self) -> &CidrIdentities {
        &self.cidrs
    }

    pub fn identities(&self) -> &Arc<IdentityAllocator> {
        &self.identities
    }

    /// The current desired state (as of the last resolve or update).
    pub fn state(&self) -> &DesiredState {
        &self.state
    }

    /// Whether the next resolution is a full one.
    pub fn is_stale(&self) -> bool {
        self.stale
    }

    /// Whether policies or endpoints were set since the state was last brought up to date.
    fn inputs_changed(&self) -> bool {
        !Arc::ptr_eq(&self.applied_policies, &self.policies)
            || self.endpoints.len() != self.applied_endpoints.len()
            || self.endpoints.iter().any(|e| self.applied_endpoints.get(&e.id) != Some(e))
    }

    /// Resolves everything (when nothing was resolved yet or policies or endpoints
    /// changed since the last time) and answers the desired state.
    pub fn resolve(&mut self) -> &DesiredState {
        if self.stale || self.inputs_changed() {
            self.rebuild();
        }
        &self.state
    }

    /// Brings the state up to date with the current inputs: `identities` is the new
    /// allocator, `changed` lists the identities that were allocated or freed since the
    /// last call (a number freed and allocated again with other labels may be listed
    /// once), `addresses` the pod addresses now; policies and endpoints are those last
    /// set. Incremental:
    ///
    /// - an identity that appears or disappears updates only its own entries, on the
    ///   endpoints whose selections it is in;
    /// - a policy that changes (added, removed, or different under the same name)
    ///   recomputes the endpoints its old and new rules select; the CIDR identities and
    ///   ipBlock address identities it adds or drops are identity changes as above;
    /// - an endpoint that appears or changes is computed, one that goes is dropped; when
    ///   named ports change, the endpoints with rules that name ports are recomputed.
    ///
    /// Falls back to full resolution when nothing was resolved yet, and now and then to
    /// drop the compiled rules of policies that changed.
    pub fn update_identities(
        &mut self,
        identities: Arc<IdentityAllocator>,
        changed: &[u32],
        addresses: BTreeMap<IpAddr, u32>,
    ) -> Changes {
        self.identities = identities;
        let old_addresses = std::mem::replace(&mut self.addresses, addresses);
        if self.stale {
            self.rebuild();
            return Changes { full: true, ..Changes::default() };
        }
        // Pod identities: labels now, by id.
        let mut removed: BTreeSet<u32> = BTreeSet::new();
        let mut added: BTreeMap<u32, Member> = BTreeMap::new();
        for &id in changed {
            let now = self.identities.get(id).map(|l| Member::new(l.clone(), None, None));
            let before = self.universe.get(&id);
            if before == now.as_ref() {
                continue;
            }
            if before.is_some() {
                removed.insert(id);
            }
            if let Some(m) = now {
                added.insert(id, m);
            }
        }
        // Address identities of the addresses that changed or whose pod identity did.
        let changed_set: BTreeSet<u32> = changed.iter().copied().collect();
        let mut touched: Vec<IpAddr> = Vec::new();
        // One merge walk over both (sorted) maps.
        let (mut old, mut new) = (old_addresses.iter().peekable(), self.addresses.iter().peekable());
        loop {
            match (old.peek(), new.peek()) {
                (None, None) => break,
                (Some((a, _)), None) => {
                    touched.push(**a);
                    old.next();
                }
                (None, Some((b, _))) => {
                    touched.push(**b);
                    new.next();
                }
                (Some((a, ia)), Some((b, ib))) => match a.cmp(b) {
                    std::cmp::Ordering::Less => {
                        touched.push(**a);
                        old.next();
                    }
                    std::cmp::Ordering::Greater => {
                        touched.push(**b);
                        new.next();
                    }
                    std::cmp::Ordering::Equal => {
                        if ia != ib || changed_set.contains(ib) || changed_set.contains(ia) {
                            touched.push(**a);
                        }
                        old.next();
                        new.next();
                    }
                },
            }
        }
        let synced = self.sync_addresses(touched);
        self.merge_address_changes(synced, &mut removed, &mut added);
        let mut affected: BTreeSet<u16> = BTreeSet::new();
        let mut ids: BTreeSet<u32> = BTreeSet::new();
        self.apply_members(removed, added, &mut affected, &mut ids);
        // Endpoints to compute in full.
        let mut recompute: BTreeSet<u16> = BTreeSet::new();
        if !Arc::ptr_eq(&self.applied_policies, &self.policies)
            && !self.apply_policies(&mut recompute, &mut affected, &mut ids)
        {
            self.rebuild();
            return Changes { full: true, ..Changes::default() };
        }
        let dropped = self.apply_endpoints(&mut recompute);
        let mut changes = Changes { identities: ids.len(), endpoints: 0, entries: dropped, full: false };
        for ep in &recompute {
            changes.entries += self.recompute_endpoint(*ep);
        }
        changes.endpoints = recompute.len();
        for ep in affected.difference(&recompute) {
            if self.endpoint_state.contains_key(ep) {
                changes.entries += self.update_endpoint(*ep, &ids);
                changes.endpoints += 1;
            }
        }
        changes
    }

    /// Takes identities out of the universe and puts others in, updating the selections;
    /// adds the endpoints whose selections changed to `affected` and the identities to
    /// `ids`.
    fn apply_members(
        &mut self,
        removed: BTreeSet<u32>,
        added: BTreeMap<u32, Member>,
        affected: &mut BTreeSet<u16>,
        ids: &mut BTreeSet<u32>,
    ) {
        for id in &removed {
            let Some(member) = self.universe.remove(id) else { continue };
            self.index.remove(*id, &member.labels);
            self.special.remove(id);
            if let Some(p) = member.cidr {
                self.cidr_ids.remove(&p);
            }
            for sel in &mut self.selections {
                if sel.members.remove(id) {
                    affected.extend(sel.users.iter().copied());
                }
            }
            ids.insert(*id);
        }
        for (id, member) in added {
            for sel in &mut self.selections {
                if selects(&self.peers, &self.requires, &sel.key, id, &member) {
                    sel.members.insert(id);
                    affected.extend(sel.users.iter().copied());
                }
            }
            self.add_member(id, member);
            ids.insert(id);
        }
    }

    /// Applies the policies set since the last update (see
    /// [`PolicyResolver::update_identities`]); answers false when a full resolution is
    /// due instead (two policies with one name, or many compiled rules left behind).
    fn apply_policies(
        &mut self,
        recompute: &mut BTreeSet<u16>,
        affected: &mut BTreeSet<u16>,
        ids: &mut BTreeSet<u32>,
    ) -> bool {
        let policies = self.policies.clone();
        let mut now: HashMap<PolicyId, &Policy> = HashMap::with_capacity(policies.len());
        for p in policies.iter() {
            if now.insert(policy_id(p), p).is_some() {
                return false;
            }
        }
        let applied = std::mem::replace(&mut self.applied_policies, policies.clone());
        let before: HashMap<PolicyId, &Policy> = applied.iter().map(|p| (policy_id(p), p)).collect();
        let mut gone: Vec<PolicyId> = Vec::new();
        for (id, p) in &before {
            if now.get(id) != Some(p) {
                gone.push(id.clone());
            }
        }
        for id in gone {
            for fi in self.policy_rules.remove(&id).unwrap_or_default() {
                self.endpoints_selected_by(fi, recompute);
                self.dead_rules += 1;
            }
        }
        for (id, p) in &now {
            if before.get(id) != Some(p) {
                let fis = self.compile_policy(p);
                for &fi in &fis {
                    self.endpoints_selected_by(fi, recompute);
                }
                self.policy_rules.insert(id.clone(), fis);
            }
        }
        // CIDR identities the policies name now.
        let wanted: BTreeMap<Prefix, u32> = self.cidrs.iter().map(|(p, id)| (*p, id)).collect();
        let mut removed: BTreeSet<u32> = BTreeSet::new();
        let mut added: BTreeMap<u32, Member> = BTreeMap::new();
        for (p, id) in &self.cidr_ids {
            if wanted.get(p) != Some(id) {
                removed.insert(*id);
            }
        }
        for (p, id) in &wanted {
            if self.cidr_ids.get(p) != Some(id) {
                added.insert(*id, Member::new(crate::cidr::cidr_labels(p), Some(*p), None));
            }
        }
        if !removed.is_empty() || !added.is_empty() {
            self.apply_members(removed, added, affected, ids);
            self.state.cidr_ipcache = self.cidrs.ipcache();
            self.state.cidr_identities = self.cidrs.labels();
        }
        // ipBlocks: address identities follow them.
        let blocks = self.live_ip_blocks();
        if blocks != self.ip_blocks {
            self.ip_blocks = blocks;
            let mut all: BTreeSet<IpAddr> = self.addresses.keys().copied().collect();
            all.extend(self.address_of.keys().copied());
            let synced = self.sync_addresses(all);
            let (mut removed, mut added) = (BTreeSet::new(), BTreeMap::new());
            self.merge_address_changes(synced, &mut removed, &mut added);
            self.apply_members(removed, added, affected, ids);
        }
        let live: usize = self.policy_rules.values().map(Vec::len).sum();
        self.dead_rules <= live + 1024
    }

    /// Adds the address identities that [`PolicyResolver::sync_addresses`] freed and took
    /// to `removed` and `added`; one freed and taken again with the same labels in the same
    /// update is neither.
    fn merge_address_changes(
        &self,
        (gone, new): (Vec<u32>, Vec<(u32, Member)>),
        removed: &mut BTreeSet<u32>,
        added: &mut BTreeMap<u32, Member>,
    ) {
        removed.extend(gone);
        for (id, m) in new {
            if removed.contains(&id) && self.universe.get(&id) == Some(&m) {
                removed.remove(&id);
                continue;
            }
            added.insert(id, m);
        }
    }

    /// Adds the endpoints flat rule `fi` selects to `out`.
    fn endpoints_selected_by(&self, fi: usize, out: &mut BTreeSet<u16>) {
        let subject = &self.flat_rules[fi].subject;
        out.extend(self.endpoints.iter().filter(|e| subject.matches(&e.labels)).map(|e| e.id));
    }

    /// The distinct ipBlocks of the live rules.
    fn live_ip_blocks(&self) -> Vec<CidrBlock> {
        let mut blocks: BTreeSet<CidrBlock> = BTreeSet::new();
        for fi in self.policy_rules.values().flatten() {
            for (_, refs) in &self.flat_rules[*fi].peer_rules {
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

    /// Applies the endpoints set since the last update: drops those that went, adds the
    /// new and changed ones to `recompute` (and, when named ports changed, every endpoint
    /// with a rule that names ports); answers the entries of the endpoints dropped.
    fn apply_endpoints(&mut self, recompute: &mut BTreeSet<u16>) -> usize {
        let mut dropped = 0;
        let mut named = false;
        let current: BTreeSet<u16> = self.endpoints.iter().map(|e| e.id).collect();
        let mut gone: Vec<u16> = Vec::new();
        self.applied_endpoints.retain(|id, ep| {
            let keep = current.contains(id);
            if !keep {
                named |= !ep.named_ports.is_empty();
                gone.push(*id);
            }
            keep
        });
        let mut changed: Vec<usize> = Vec::new();
        for (i, ep) in self.endpoints.iter().enumerate() {
            match self.applied_endpoints.get(&ep.id) {
                Some(old) if old == ep => continue,
                Some(old) => {
                    named |= old.named_ports != ep.named_ports
                        || (!ep.named_ports.is_empty() && old.identity != ep.identity);
                }
                None => named |= !ep.named_ports.is_empty(),
            }
            changed.push(i);
        }
        for i in changed {
            let ep = &self.endpoints[i];
            recompute.insert(ep.id);
            self.applied_endpoints.insert(ep.id, ep.clone());
        }
        for id in gone {
            dropped += self.drop_endpoint(id);
            recompute.remove(&id);
        }
        if named {
            for (id, st) in &self.endpoint_state {
                if st.contributions.iter().any(|c| self.rules[c.rule as usize].fixed_blocks.is_none()) {
                    recompute.insert(*id);
                }
            }
        }
        dropped
    }

    /// Takes endpoint `ep`'s state out, and the endpoint out of its selections' users.
    fn forget_contributions(&mut self, ep: u16) {
        for c in self.endpoint_state.remove(&ep).map(|st| st.contributions).unwrap_or_default() {
            if let PeerSet::Sel(s) = c.peers {
                self.selections[s].users.remove(&ep);
            }
        }
    }

    /// Forgets endpoint `ep`: its state, its entries, its use of selections; answers how
    /// many entries it had.
    fn drop_endpoint(&mut self, ep: u16) -> usize {
        self.forget_contributions(ep);
        self.state.endpoints.remove(&ep).map_or(0, |p| p.entries.len())
    }

    /// Computes endpoint `ep` in full (the rules that select it, its contributions, its
    /// entries); answers how many entries changed.
    fn recompute_endpoint(&mut self, ep: u16) -> usize {
        let Some(i) = self.position(ep) else { return 0 };
        self.forget_contributions(ep);
        let labels = &self.endpoints[i].labels;
        let mut rules: Vec<usize> = self
            .policy_rules
            .values()
            .flatten()
            .copied()
            .filter(|fi| self.flat_rules[*fi].subject.matches(labels))
            .collect();
        rules.sort_unstable();
        let st = self.endpoint_state_for(ep, &rules);
        self.endpoint_state.insert(ep, st);
        let new = self.endpoint_policy(i);
        let old = self.state.endpoints.get(&ep).cloned().unwrap_or_default();
        let n = count_changes(old.entries.iter(), new.entries.iter());
        if n > 0
            || old.ingress_enforced != new.ingress_enforced
            || old.egress_enforced != new.egress_enforced
            || !self.state.endpoints.contains_key(&ep)
        {
            self.state.endpoints.insert(ep, Arc::new(new));
        }
        n
    }

    fn add_member(&mut self, id: u32, member: Member) {
        self.index.add(id, &member.labels);
        if member.cidr.is_some() || identity::is_reserved(id) {
            self.special.insert(id);
        }
        if let Some(p) = member.cidr {
            self.cidr_ids.insert(p, id);
        }
        self.universe.insert(id, member);
    }

    /// The labels of the address identity of a pod address: its pod's labels and one
    /// `ipblock:` label per ipBlock that contains it; `None` when no ipBlock does.
    fn address_labels(&self, addr: IpAddr) -> Option<LabelSet> {
        let pod = self.identities.get(*self.addresses.get(&addr)?)?;
        let mut blocks = self.ip_blocks.iter().filter(|b| b.contains_ip(addr)).peekable();
        blocks.peek()?;
        let mut labels = pod.clone();
        for b in blocks {
            labels.insert(Label::new(IPBLOCK_SOURCE, &b.label_key(), ""));
        }
        Some(labels)
    }

    /// Brings the address identities of `addresses` up to date; answers the identities
    /// freed and the ones newly taken (with their members). Also updates the state's
    /// address ipcache and labels.
    fn sync_addresses(&mut self, addresses: impl IntoIterator<Item = IpAddr>) -> (Vec<u32>, Vec<(u32, Member)>) {
        let mut gone = Vec::new();
        let mut new = Vec::new();
        for addr in addresses {
            let labels = self.address_labels(addr);
            let old = self.address_of.get(&addr).copied();
            if let (Some(old), Some(l)) = (old, &labels)
                && self.address_ids.labels.get(&old) == Some(l)
            {
                continue;
            }
            let host = (addr, if addr.is_ipv4() { 32 } else { 128 });
            if let Some(old) = old {
                self.address_of.remove(&addr);
                self.state.address_ipcache.remove(&host);
                if self.address_ids.release(old) {
                    self.state.address_identities.remove(&old);
                    gone.push(old);
                }
            }
            if let Some(labels) = labels {
                let (id, fresh) = self.address_ids.acquire(&labels);
                self.address_of.insert(addr, id);
                self.state.address_ipcache.insert(host, id);
                if fresh {
                    self.state.address_identities.insert(id, labels.clone());
                    new.push((id, Member::new(labels, None, Some(self.addresses[&addr]))));
                }
            }
        }
        (gone, new)
    }

    /// Compiles the policies afresh: peers, requires, peer rules and origins get numbers.
    fn compile(&mut self) {
        self.peers.clear();
        self.peer_ids.clear();
        self.requires.clear();
        self.rules.clear();
        self.origins.clear();
        self.origin_sets.clear();
        self.single_origins.clear();
        self.flat_rules.clear();
        self.policy_rules.clear();
        self.dead_rules = 0;
        let policies = self.policies.clone();
        for p in policies.iter() {
            let fis = self.compile_policy(p);
            self.policy_rules.entry(policy_id(p)).or_default().extend(fis);
        }
        self.ip_blocks = self.live_ip_blocks();
        self.applied_policies = policies;
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
            subject: rule.subject.clone(),
            enforce: [rule.enforce_ingress, rule.enforce_egress],
            peer_rules: Vec::new(),
        };
        for direction in Direction::BOTH {
            for (i, pr) in rule.peer_rules(direction).iter().enumerate() {
                let origin = self.origins.len() as u32;
                let o = RuleOrigin {
                    kind: p.kind,
                    namespace: p.namespace.clone(),
                    name: p.name.clone(),
                    direction,
                    rule_index: ri,
                    peer_rule_index: i,
                    path: pr.path.clone(),
                };
                self.single_origins.push(Arc::new(BTreeSet::from([o.clone()])));
                self.origins.push(o);
                let fixed = pr.ports.iter().all(|r| !matches!(r.port, crate::model::Port::Named(_)));
                let ports = if pr.ports.is_empty() {
                    vec![PortRule { protocol: crate::model::Protocol::Any, port: crate::model::Port::Any }]
                } else {
                    pr.ports.clone()
                };
                let fixed_blocks = fixed.then(|| {
                    let mut out: Vec<(u8, u16, u8)> =
                        ports.iter().flat_map(|r| l4_blocks(r, direction, identity::ANY, None, &[])).collect();
                    out.sort_unstable();
                    out.dedup();
                    out
                });
                let idx = self.rules.len() as u32;
                self.rules.push(CompiledPeerRule {
                    direction,
                    verdict: pr.verdict,
                    origin,
                    ports,
                    fixed_blocks,
                    requires: Vec::new(),
                });
                let mut req: Vec<u32> = pr.requires.iter().map(|s| intern_selector(&mut self.requires, s)).collect();
                req.sort_unstable();
                req.dedup();
                self.rules[idx as usize].requires = req;
                let refs = match &pr.peers {
                    Peers::Any => vec![PeerRef::Any],
                    Peers::Only(list) => list
                        .iter()
                        .filter_map(|peer| match peer {
                            Peer::Entity(Entity::All) => Some(PeerRef::Any),
                            Peer::Entity(Entity::None) => None,
                            other => {
                                let next = self.peer_ids.len() as u32;
                                let id = *self.peer_ids.entry(other.clone()).or_insert(next);
                                if id == next {
                                    self.peers.push(other.clone());
                                }
                                Some(PeerRef::Peer(id))
                            }
                        })
                        .collect(),
                };
                flat.peer_rules.push((idx, refs));
            }
        }
        flat
    }

    /// Resolves everything from scratch (keeping identity numbers that stay in use).
    fn rebuild(&mut self) {
        self.compile();
        // Universe: allocator identities, CIDR identities, address identities.
        self.universe.clear();
        self.index = LabelIndex::default();
        self.special.clear();
        self.cidr_ids.clear();
        let pods: Vec<(u32, LabelSet)> = self.identities.iter().map(|(id, l, _)| (id, l.clone())).collect();
        for (id, labels) in pods {
            self.add_member(id, Member::new(labels, None, None));
        }
        let cidrs: Vec<(Prefix, u32)> = self.cidrs.iter().map(|(p, id)| (*p, id)).collect();
        for (prefix, id) in cidrs {
            self.add_member(id, Member::new(crate::cidr::cidr_labels(&prefix), Some(prefix), None));
        }
        let mut all: BTreeSet<IpAddr> = self.addresses.keys().copied().collect();
        all.extend(self.address_of.keys().copied());
        // Labels of kept identities may be those of freed pod identities: recheck all.
        let _ = self.sync_addresses(all);
        let kept: Vec<(u32, Member)> = self
            .address_of
            .iter()
            .map(|(addr, id)| (*id, self.addresses[addr]))
            .collect::<BTreeMap<u32, u32>>()
            .into_iter()
            .map(|(id, base)| (id, Member::new(self.address_ids.labels[&id].clone(), None, Some(base))))
            .collect();
        for (id, m) in kept {
            self.add_member(id, m);
        }
        // Which rules select which endpoint.
        let mut ep_index = LabelIndex::default();
        for (i, ep) in self.endpoints.iter().enumerate() {
            ep_index.add(i as u32, &ep.labels);
        }
        let mut selecting: Vec<Vec<usize>> = vec![Vec::new(); self.endpoints.len()];
        let mut live: Vec<usize> = self.policy_rules.values().flatten().copied().collect();
        live.sort_unstable();
        for fi in live {
            let subject = &self.flat_rules[fi].subject;
            let candidates: Vec<u32> =
                ep_index.candidates(subject).unwrap_or_else(|| (0..self.endpoints.len() as u32).collect());
            for i in candidates {
                if subject.matches(&self.endpoints[i as usize].labels) {
                    selecting[i as usize].push(fi);
                }
            }
        }
        // Contributions and selections.
        self.selections.clear();
        self.selection_of.clear();
        self.endpoint_state.clear();
        for (i, rules) in selecting.iter().enumerate() {
            let ep_id = self.endpoints[i].id;
            let st = self.endpoint_state_for(ep_id, rules);
            self.endpoint_state.insert(ep_id, st);
        }
        self.applied_endpoints = self.endpoints.iter().map(|e| (e.id, e.clone())).collect();
        // Entries.
        let mut endpoints = BTreeMap::new();
        for i in 0..self.endpoints.len() {
            let ep_id = self.endpoints[i].id;
            endpoints.insert(ep_id, Arc::new(self.endpoint_policy(i)));
        }
        self.state.endpoints = endpoints;
        self.state.cidr_ipcache = self.cidrs.ipcache();
        self.state.cidr_identities = self.cidrs.labels();
        self.stale = false;
    }

    /// The contributions of endpoint `ep_id` from the flat rules that select it (their
    /// selections are made if new and note the endpoint as a user).
    fn endpoint_state_for(&mut self, ep_id: u16, rules: &[usize]) -> EndpointState {
        let mut requires: BTreeMap<(Direction, Verdict), Vec<u32>> = BTreeMap::new();
        for &fi in rules {
            for (pr, _) in &self.flat_rules[fi].peer_rules {
                let c = &self.rules[*pr as usize];
                requires.entry((c.direction, c.verdict)).or_default().extend(c.requires.iter().copied());
            }
        }
        for r in requires.values_mut() {
            r.sort_unstable();
            r.dedup();
        }
        let mut st = EndpointState::default();
        for &fi in rules {
            st.enforce[0] |= self.flat_rules[fi].enforce[0];
            st.enforce[1] |= self.flat_rules[fi].enforce[1];
            for k in 0..self.flat_rules[fi].peer_rules.len() {
                let pr = self.flat_rules[fi].peer_rules[k].0;
                let (direction, verdict) = (self.rules[pr as usize].direction, self.rules[pr as usize].verdict);
                for n in 0..self.flat_rules[fi].peer_rules[k].1.len() {
                    let r = self.flat_rules[fi].peer_rules[k].1[n];
                    let peers = match r {
                        PeerRef::Any => PeerSet::Any,
                        PeerRef::Peer(peer) => {
                            let requires = match self.peers[peer as usize] {
                                Peer::Endpoints(_) => requires.get(&(direction, verdict)).cloned().unwrap_or_default(),
                                _ => Vec::new(),
                            };
                            let s = self.selection(SelKey { peer, requires });
                            self.selections[s].users.insert(ep_id);
                            PeerSet::Sel(s)
                        }
                    };
                    st.contributions.push(Contribution { rule: pr, peers });
                }
            }
        }
        for (d, direction) in Direction::BOTH.into_iter().enumerate() {
            if !st.enforce[d]
                && st.contributions.iter().any(|c| {
                    let r = &self.rules[c.rule as usize];
                    r.direction == direction && r.verdict == Verdict::Deny
                })
            {
                st.deny_without_default = true;
            }
        }
        st
    }

    /// The selection for `key`, made (with its members) if new.
    fn selection(&mut self, key: SelKey) -> usize {
        if let Some(&s) = self.selection_of.get(&key) {
            return s;
        }
        let members = self.members_of(&key);
        let s = self.selections.len();
        self.selections.push(Selection { key: key.clone(), members, users: BTreeSet::new() });
        self.selection_of.insert(key, s);
        s
    }

    fn members_of(&self, key: &SelKey) -> BTreeSet<u32> {
        let test = |id: &u32| selects(&self.peers, &self.requires, key, *id, &self.universe[id]);
        match &self.peers[key.peer as usize] {
            Peer::Endpoints(sel) => match self.index.candidates(sel) {
                Some(ids) => ids.into_iter().filter(|id| test(id)).collect(),
                None => self.universe.keys().filter(|id| test(id)).copied().collect(),
            },
            Peer::Entity(Entity::Cluster) => self.universe.keys().filter(|id| test(id)).copied().collect(),
            Peer::Cidr(block) => self.cidr_candidates(block).filter(|id| test(id)).collect(),
            Peer::IpBlock(block) => {
                // Address identities carry the block's label: the index has them.
                let mut out: BTreeSet<u32> = self.cidr_candidates(block).filter(|id| test(id)).collect();
                if let Some(values) = self.index.by_key.get(&block.label_key()) {
                    out.extend(values.values().flatten().filter(|id| test(id)));
                }
                out
            }
            _ => self.special.iter().filter(|id| test(id)).copied().collect(),
        }
    }

    /// The identities a CIDR block can select: the CIDR identities of the prefixes in its
    /// range (found by a range query, not by testing every one) and the world identities.
    fn cidr_candidates(&self, block: &CidrBlock) -> impl Iterator<Item = u32> + '_ {
        let (lo, hi) = block.cidr.inner_bounds();
        self.cidr_ids.range(lo..=hi).map(|(_, id)| *id).chain(
            [identity::WORLD, identity::WORLD_IPV4, identity::WORLD_IPV6]
                .into_iter()
                .filter(|id| self.universe.contains_key(id)),
        )
    }

    fn position(&self, ep: u16) -> Option<usize> {
        self.endpoints.iter().position(|e| e.id == ep)
    }

    /// The raw entries of endpoint `i` from its contributions, for every identity
    /// (`only: None`) or for these identities.
    fn raw_entries(&self, i: usize, only: Option<&BTreeSet<u32>>) -> Vec<Raw> {
        let ep = &self.endpoints[i];
        let st = &self.endpoint_state[&ep.id];
        let mut raw = Vec::new();
        let push = |c: &CompiledPeerRule, peer: u32, raw: &mut Vec<Raw>| {
            let deny = c.verdict == Verdict::Deny;
            let mut emit = |(protocol, port, port_prefix_len): (u8, u16, u8)| {
                let key = EntryKey { direction: c.direction, identity: peer, protocol, port, port_prefix_len };
                raw.push(Raw::new(&key, deny, c.origin));
            };
            match &c.fixed_blocks {
                Some(blocks) => blocks.iter().copied().for_each(&mut emit),
                None => {
                    // Named ports resolve on the destination: for egress, the local endpoints
                    // of the peer's pod identity.
                    let base = self.universe.get(&peer).and_then(|m| m.base).unwrap_or(peer);
                    for r in &c.ports {
                        l4_blocks(r, c.direction, base, Some(ep), &self.endpoints).into_iter().for_each(&mut emit);
                    }
                }
            }
        };
        for contribution in &st.contributions {
            let c = &self.rules[contribution.rule as usize];
            match (contribution.peers, only) {
                (PeerSet::Any, None) => push(c, identity::ANY, &mut raw),
                (PeerSet::Any, Some(_)) => {}
                (PeerSet::Sel(s), None) => {
                    for &id in &self.selections[s].members {
                        push(c, id, &mut raw);
                    }
                }
                (PeerSet::Sel(s), Some(ids)) => {
                    let members = &self.selections[s].members;
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

    /// Turns sorted raw entries into entries: denies, and the allows no deny covers
    /// (`extra_denies`: denies for any peer from outside `raw`).
    fn finish(&mut self, raw: &[Raw], extra_denies: &BTreeMap<EntryKey, ()>) -> Vec<(EntryKey, EntryValue)> {
        // An allow is covered by a deny of its own identity or of any identity whose L4
        // part holds the allow's (the datapath takes the longest match per identity, and
        // the exact identity first). Denies for any peer are few: a list; the others are
        // sorted, and an allow looks at those of its identity only.
        let (any, mut specific): (Vec<EntryKey>, Vec<EntryKey>) = extra_denies
            .keys()
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
        let mut i = 0;
        while i < raw.len() {
            let bits = raw[i].key_bits();
            let key = raw[i].key();
            let mut j = i;
            while j < raw.len() && raw[j].key_bits() == bits {
                j += 1;
            }
            let group = &raw[i..j];
            // Sorted by (key, deny, origin): denies last.
            let first_deny = group.iter().position(|e| e.deny());
            if let Some(d) = first_deny {
                out.push((key, EntryValue { deny: true, origins: self.origin_set(&group[d..]) }));
            } else if no_denies || !covered(&key) {
                out.push((key, EntryValue { deny: false, origins: self.origin_set(group) }));
            }
            i = j;
        }
        out
    }

    /// The shared origin set of a group of raw entries (origins sorted).
    fn origin_set(&mut self, group: &[Raw]) -> Arc<BTreeSet<RuleOrigin>> {
        let first = group[0].origin();
        if group.iter().all(|e| e.origin() == first) {
            return self.single_origins[first as usize].clone();
        }
        let mut ids: Vec<u32> = group.iter().map(|e| e.origin()).collect();
        ids.dedup();
        if let Some(set) = self.origin_sets.get(&ids) {
            return set.clone();
        }
        let set: Arc<BTreeSet<RuleOrigin>> = Arc::new(ids.iter().map(|o| self.origins[*o as usize].clone()).collect());
        self.origin_sets.insert(ids, set.clone());
        set
    }

    /// The full desired policy of endpoint `i`.
    fn endpoint_policy(&mut self, i: usize) -> EndpointPolicy {
        let raw = self.raw_entries(i, None);
        let entries = self.finish(&raw, &BTreeMap::new());
        let st = &self.endpoint_state[&self.endpoints[i].id];
        let mut policy = EndpointPolicy {
            ingress_enforced: st.enforce[0],
            egress_enforced: st.enforce[1],
            entries: entries.into_iter().collect(),
        };
        super::open_directions_without_default_deny(&mut policy);
        if self.options.allow_localhost {
            super::allow_localhost(&mut policy);
        }
        policy
    }

    /// Recomputes the entries of identities `ids` on endpoint `ep`; answers how many
    /// entries changed.
    fn update_endpoint(&mut self, ep: u16, ids: &BTreeSet<u32>) -> usize {
        let Some(i) = self.position(ep) else { return 0 };
        if self.endpoint_state[&ep].deny_without_default {
            let new = self.endpoint_policy(i);
            let old = self.state.endpoints.get(&ep).cloned().unwrap_or_default();
            let n = count_changes(old.entries.iter(), new.entries.iter());
            if n > 0 || old.ingress_enforced != new.ingress_enforced || old.egress_enforced != new.egress_enforced {
                self.state.endpoints.insert(ep, Arc::new(new));
            }
            return n;
        }
        let raw = self.raw_entries(i, Some(ids));
        let old_policy = self.state.endpoints.get(&ep).cloned().unwrap_or_default();
        // Denies for any peer: an identity change never changes them.
        let mut any_denies: BTreeMap<EntryKey, ()> = BTreeMap::new();
        for direction in Direction::BOTH {
            let lo = EntryKey { direction, identity: identity::ANY, protocol: 0, port: 0, port_prefix_len: 0 };
            let hi = EntryKey { protocol: u8::MAX, port: u16::MAX, port_prefix_len: u8::MAX, ..lo };
            any_denies.extend(old_policy.entries.range(lo..=hi).filter(|(_, v)| v.deny).map(|(k, _)| (*k, ())));
        }
        let new = self.finish(&raw, &any_denies);
        let mut old: Vec<(&EntryKey, &EntryValue)> = Vec::new();
        for direction in Direction::BOTH {
            for &id in ids {
                let lo = EntryKey { direction, identity: id, protocol: 0, port: 0, port_prefix_len: 0 };
                let hi = EntryKey { protocol: u8::MAX, port: u16::MAX, port_prefix_len: u8::MAX, ..lo };
                old.extend(old_policy.entries.range(lo..=hi));
            }
        }
        old.sort_by_key(|(k, _)| **k);
        let n = count_changes(old.iter().copied(), new.iter().map(|(k, v)| (k, v)));
        if n == 0 {
            return 0;
        }
        let old_keys: Vec<EntryKey> = old.iter().map(|(k, _)| **k).collect();
        // Copy-on-write: the endpoint's entries are copied when the previous state is still
        // shared (the map writer holds it); the cost of an update on an endpoint is that copy.
        let policy = Arc::make_mut(self.state.endpoints.entry(ep).or_default());
        for k in old_keys {
            policy.entries.remove(&k);
        }
        policy.entries.extend(new);
        n
    }
}

/// A raw entry packed for fast sorting: (key, deny, origin) in one number, ordered as
/// the tuple (direction, identity, protocol, port, prefix length, deny, origin).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Raw(u128);

impl Raw {
    fn new(k: &EntryKey, deny: bool, origin: u32) -> Raw {
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

/// Whether selection `key` selects identity `id`.
fn selects(peers: &[Peer], requires: &[EndpointSelector], key: &SelKey, id: u32, m: &Member) -> bool {
    match &peers[key.peer as usize] {
        Peer::Endpoints(sel) => {
            (m.k8s || endpoint_selectable(sel, &m.labels))
                && sel.matches(&m.labels)
                && key.requires.iter().all(|r| requires[*r as usize].matches(&m.labels))
        }
        Peer::Entity(e) => entity_selects(*e, m),
        Peer::Cidr(block) => cidr_selects(block, id, m),
        Peer::IpBlock(block) => {
            cidr_selects(block, id, m) || m.labels.get(&block.label_key()).is_some_and(|l| l.source == IPBLOCK_SOURCE)
        }
    }
}

fn has_reserved(m: &Member, name: &str) -> bool {
    m.labels.get(name).is_some_and(|l| l.source == source::RESERVED)
}

fn entity_selects(entity: Entity, m: &Member) -> bool {
    match entity {
        Entity::All | Entity::None => false,
        Entity::Cluster => {
            m.k8s
                || [
                    Entity::Host,
                    Entity::RemoteNode,
                    Entity::Init,
                    Entity::Health,
                    Entity::Unmanaged,
                    Entity::KubeApiserver,
                    Entity::Ingress,
                ]
                .iter()
                .any(|e| has_reserved(m, e.as_str()))
        }
        named => has_reserved(m, named.as_str()),
    }
}

/// The CIDR identities of the prefixes inside the block, and for `0.0.0.0/0` or `::/0`
/// the world identities of that family.
fn cidr_selects(block: &CidrBlock, id: u32, m: &Member) -> bool {
    if m.cidr.is_some_and(|p| block.covers(&p)) {
        return true;
    }
    block.cidr.is_everything()
        && (id == identity::WORLD
            || id == if block.cidr.is_ipv4() { identity::WORLD_IPV4 } else { identity::WORLD_IPV6 })
}

fn intern_selector(table: &mut Vec<EndpointSelector>, sel: &EndpointSelector) -> u32 {
    match table.iter().position(|s| s == sel) {
        Some(i) => i as u32,
        None => {
            table.push(sel.clone());
            (table.len() - 1) as u32
        }
    }
}

/// The number of keys added, removed or with another value, between two sorted entry
/// lists.
fn count_changes<'a>(
    old: impl Iterator<Item = (&'a EntryKey, &'a EntryValue)>,
    new: impl Iterator<Item = (&'a EntryKey, &'a EntryValue)>,
) -> usize {
    let old: BTreeMap<&EntryKey, &EntryValue> = old.collect();
    let new: BTreeMap<&EntryKey, &EntryValue> = new.collect();
    let mut n = old.iter().filter(|(k, v)| new.get(*k) != Some(*v)).count();
    n += new.keys().filter(|k| !old.contains_key(*k)).count();
    n
}
