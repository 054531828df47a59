//! The resolver that keeps its work: [`PolicyResolver`] holds policies, endpoints and
//! identities, resolves everything once, and afterwards updates only what a change
//! touches: an identity, a policy, an endpoint.
//!
//! Its parts, one module each: [`compile`] (policies -> numbered peers, requires and peer
//! rules), [`universe`] (every identity a peer can have, indexed), [`addresses`] (the
//! address identities of pod addresses inside ipBlocks), [`selections`] (the selection
//! cache), [`contributions`] (per endpoint: which peer rules apply to which selections,
//! and the raw entries they make) and [`verdicts`] (raw entries -> entries: denies win).
//! This file holds them together and says, step by step, what an update changes.
//!
//! How it works:
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

mod addresses;
mod compile;
mod contributions;
mod selections;
mod tiered;
mod universe;
mod verdicts;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use super::{DesiredState, EndpointPolicy, EndpointView};
use crate::cidr::{CidrIdentities, Prefix};
use crate::identity::IdentityAllocator;
use crate::model::{NamedPort, Policy};
use addresses::{AddressIdentities, Pods};
use compile::{CompiledRules, PolicyId, policy_id};
use contributions::{Contributions, Sources};
use selections::Selections;
use universe::{LabelIndex, Member, MemberChanges, Universe};

pub use addresses::ADDRESS_IDENTITY_BASE;

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

/// What the resolver was given, as last set.
#[derive(Clone, Debug)]
struct Inputs {
    policies: Arc<Vec<Policy>>,
    endpoints: Vec<EndpointView>,
    identities: Arc<IdentityAllocator>,
    /// Pod address -> pod identity (local and remote pods).
    addresses: BTreeMap<IpAddr, u32>,
    cidrs: CidrIdentities,
    /// Other nodes' pods' named ports, by identity (egress named ports resolve on them).
    remote_named_ports: BTreeMap<u32, Vec<NamedPort>>,
}

/// The policies and endpoints the state reflects: the next update compares the inputs
/// with these.
#[derive(Clone, Debug, Default)]
struct Applied {
    policies: Arc<Vec<Policy>>,
    endpoints: HashMap<u16, EndpointView>,
    remote_named_ports: BTreeMap<u32, Vec<NamedPort>>,
}

/// What one update found to do.
#[derive(Debug, Default)]
struct Work {
    /// Identities that appeared or disappeared.
    identities: BTreeSet<u32>,
    /// Endpoints using a selection whose members changed: only the entries of
    /// `identities` are recomputed on them.
    affected: BTreeSet<u16>,
    /// Endpoints computed in full.
    recompute: BTreeSet<u16>,
}

/// Resolves policies for the local endpoints and keeps the result current, incrementally
/// when identities or pod addresses change (see the module documentation).
#[derive(Clone, Debug)]
pub struct PolicyResolver {
    options: Options,
    inputs: Inputs,
    applied: Applied,
    rules: CompiledRules,
    universe: Universe,
    address_ids: AddressIdentities,
    selections: Selections,
    contributions: Contributions,
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
            inputs: Inputs {
                policies: Arc::default(),
                endpoints: Vec::new(),
                identities: Arc::new(IdentityAllocator::new()),
                addresses: BTreeMap::new(),
                cidrs: CidrIdentities::new(),
                remote_named_ports: BTreeMap::new(),
            },
            applied: Applied::default(),
            rules: CompiledRules::default(),
            universe: Universe::default(),
            address_ids: AddressIdentities::default(),
            selections: Selections::default(),
            contributions: Contributions::default(),
            state: DesiredState::default(),
            stale: true,
        }
    }

    /// New policies; the next [`PolicyResolver::update`] recomputes the endpoints the
    /// policies that changed (by name) select, and what their CIDR identities and
    /// ipBlocks change. CIDR identities keep their numbers while their prefix is still
    /// named.
    pub fn set_policies(&mut self, policies: Arc<Vec<Policy>>) {
        self.inputs.cidrs.sync(&policies);
        self.inputs.policies = policies;
    }

    /// As [`PolicyResolver::set_policies`], with CIDR identities for the prefixes that
    /// `numbered` names (a superset of `policies`): audit mode resolves the enforced
    /// policies alone and all of them together, and both must give a prefix the same
    /// identity (the audit resolver takes these with
    /// [`PolicyResolver::set_cidr_identities`]).
    pub fn set_policies_numbering(&mut self, policies: Arc<Vec<Policy>>, numbered: &[Policy]) {
        self.inputs.cidrs.sync(numbered);
        self.inputs.policies = policies;
    }

    /// Uses these CIDR identities (instead of numbering the policies' prefixes itself).
    pub fn set_cidr_identities(&mut self, cidrs: CidrIdentities) {
        self.inputs.cidrs = cidrs;
        self.stale = true;
    }

    /// New local endpoints; the next [`PolicyResolver::update`] recomputes those that are
    /// new or changed (and, when named ports changed, those whose rules name ports).
    pub fn set_endpoints(&mut self, endpoints: Vec<EndpointView>) {
        self.inputs.endpoints = endpoints;
    }

    /// The other nodes' pods' named ports, by identity; the next [`PolicyResolver::update`]
    /// recomputes the endpoints with rules that name ports when they changed.
    pub fn set_remote_named_ports(&mut self, ports: BTreeMap<u32, Vec<NamedPort>>) {
        self.inputs.remote_named_ports = ports;
    }

    /// Sets identities and pod addresses without resolving (the next
    /// [`PolicyResolver::resolve`] resolves everything).
    pub fn set_identities(&mut self, identities: Arc<IdentityAllocator>, addresses: BTreeMap<IpAddr, u32>) {
        self.inputs.identities = identities;
        self.inputs.addresses = addresses;
        self.stale = true;
    }

    pub fn policies(&self) -> &Arc<Vec<Policy>> {
        &self.inputs.policies
    }

    pub fn cidr_identities(&self) -> &CidrIdentities {
        &self.inputs.cidrs
    }

    pub fn identities(&self) -> &Arc<IdentityAllocator> {
        &self.inputs.identities
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
        !Arc::ptr_eq(&self.applied.policies, &self.inputs.policies)
            || self.inputs.endpoints.len() != self.applied.endpoints.len()
            || self.inputs.endpoints.iter().any(|e| self.applied.endpoints.get(&e.id) != Some(e))
    }

    /// Resolves everything (when nothing was resolved yet or policies or endpoints
    /// changed since the last time) and answers the desired state.
    pub fn resolve(&mut self) -> &DesiredState {
        if self.stale || self.inputs_changed() {
            self.rebuild();
        }
        &self.state
    }

    /// Brings the state up to date with every input: `identities` is the new allocator,
    /// `changed` lists the identities that were allocated or freed since the last call (a
    /// number freed and allocated again with other labels may be listed once), `addresses`
    /// the pod addresses now; policies and endpoints are those last set. Incremental:
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
    pub fn update(
        &mut self,
        identities: Arc<IdentityAllocator>,
        changed: &[u32],
        addresses: BTreeMap<IpAddr, u32>,
    ) -> Changes {
        self.inputs.identities = identities;
        let old_addresses = std::mem::replace(&mut self.inputs.addresses, addresses);
        if self.stale {
            self.rebuild();
            return Changes { full: true, ..Changes::default() };
        }
        let mut work = Work::default();
        let mut members = self.pod_identity_changes(changed);
        let changed: BTreeSet<u32> = changed.iter().copied().collect();
        let touched = addresses::touched_addresses(&old_addresses, &self.inputs.addresses, &changed);
        self.sync_address_identities(touched, &mut members);
        self.apply_member_changes(members, &mut work);
        if !Arc::ptr_eq(&self.applied.policies, &self.inputs.policies) && !self.apply_policy_changes(&mut work) {
            self.rebuild();
            return Changes { full: true, ..Changes::default() };
        }
        let dropped = self.apply_endpoint_changes(&mut work.recompute);
        let mut changes = Changes { identities: work.identities.len(), endpoints: 0, entries: dropped, full: false };
        for ep in &work.recompute {
            changes.entries += self.recompute_endpoint(*ep);
        }
        changes.endpoints = work.recompute.len();
        for ep in work.affected.difference(&work.recompute) {
            if self.contributions.get(*ep).is_some() {
                changes.entries += self.update_identity_entries(*ep, &work.identities);
                changes.endpoints += 1;
            }
        }
        changes
    }

    /// The pod identities among `changed` that appear, go or have other labels now.
    fn pod_identity_changes(&self, changed: &[u32]) -> MemberChanges {
        let mut out = MemberChanges::default();
        for &id in changed {
            let now = self.inputs.identities.get(id).map(|l| Member::pod(l.clone()));
            let before = self.universe.get(id);
            if before == now.as_ref() {
                continue;
            }
            if before.is_some() {
                out.removed.insert(id);
            }
            if let Some(m) = now {
                out.added.insert(id, m);
            }
        }
        out
    }

    /// Brings the address identities of `addresses` up to date (and the state's address
    /// ipcache); adds the identities that appear and go to `changes`.
    fn sync_address_identities(&mut self, addresses: impl IntoIterator<Item = IpAddr>, changes: &mut MemberChanges) {
        let pods = Pods { identities: &self.inputs.identities, addresses: &self.inputs.addresses };
        let universe = &self.universe;
        self.address_ids.sync(addresses, &pods, &mut self.state, changes, |id, m| universe.get(id) == Some(m));
    }

    /// Takes identities out of the universe and puts others in, and the selections with
    /// it; notes the endpoints whose selections changed and the identities in `work`.
    fn apply_member_changes(&mut self, changes: MemberChanges, work: &mut Work) {
        for &id in &changes.removed {
            if self.universe.remove(id).is_none() {
                continue;
            }
            self.selections.remove_member(id, &mut work.affected);
            work.identities.insert(id);
        }
        for (id, member) in changes.added {
            self.selections.add_member(id, &member, &self.rules, &mut work.affected);
            self.universe.insert(id, member);
            work.identities.insert(id);
        }
    }

    /// Applies the policies set since the last update: compiles those that are new or
    /// changed, notes the endpoints old and new rules select for recomputing, and the CIDR
    /// and address identities that follow from the policies' prefixes and ipBlocks.
    /// Answers false when a full resolution is due instead (two policies with one name,
    /// or many compiled rules left behind).
    fn apply_policy_changes(&mut self, work: &mut Work) -> bool {
        let policies = self.inputs.policies.clone();
        let mut now: HashMap<PolicyId, &Policy> = HashMap::with_capacity(policies.len());
        for p in policies.iter() {
            if now.insert(policy_id(p), p).is_some() {
                return false;
            }
        }
        let applied = std::mem::replace(&mut self.applied.policies, policies.clone());
        let before: HashMap<PolicyId, &Policy> = applied.iter().map(|p| (policy_id(p), p)).collect();
        let gone: Vec<&PolicyId> = before.iter().filter(|(id, p)| now.get(*id) != Some(*p)).map(|(id, _)| id).collect();
        for id in gone {
            for fi in self.rules.remove_policy(id) {
                self.endpoints_selected_by(fi, &mut work.recompute);
            }
        }
        for (id, p) in &now {
            if before.get(id) != Some(p) {
                for fi in self.rules.replace_policy(id.clone(), p) {
                    self.endpoints_selected_by(fi, &mut work.recompute);
                }
            }
        }
        self.apply_cidr_identity_changes(work);
        // ipBlocks: address identities follow them.
        if self.address_ids.set_ip_blocks(self.rules.ip_blocks()) {
            let pods = Pods { identities: &self.inputs.identities, addresses: &self.inputs.addresses };
            let all = self.address_ids.all_addresses(&pods);
            let mut changes = MemberChanges::default();
            self.sync_address_identities(all, &mut changes);
            self.apply_member_changes(changes, work);
        }
        !self.rules.too_many_dead()
    }

    /// The CIDR identities of the prefixes the policies name now, in place of those in
    /// the universe (and the state's CIDR ipcache with them).
    fn apply_cidr_identity_changes(&mut self, work: &mut Work) {
        let wanted: BTreeMap<Prefix, u32> = self.inputs.cidrs.iter().map(|(p, id)| (*p, id)).collect();
        let have = self.universe.cidr_ids();
        let changes = MemberChanges {
            removed: have.iter().filter(|(p, id)| wanted.get(*p) != Some(*id)).map(|(_, id)| *id).collect(),
            added: wanted
                .iter()
                .filter(|(p, id)| have.get(*p) != Some(*id))
                .map(|(p, id)| (*id, Member::cidr(*p)))
                .collect(),
        };
        if !changes.is_empty() {
            self.apply_member_changes(changes, work);
            self.state.cidr_ipcache = self.inputs.cidrs.ipcache();
            self.state.cidr_identities = self.inputs.cidrs.labels();
        }
    }

    /// Adds the endpoints flat rule `fi` selects to `out`.
    fn endpoints_selected_by(&self, fi: usize, out: &mut BTreeSet<u16>) {
        let subject = &self.rules.rule(fi).subject;
        out.extend(self.inputs.endpoints.iter().filter(|e| subject.matches(&e.labels)).map(|e| e.id));
    }

    /// Applies the endpoints set since the last update: drops those that went, adds the
    /// new and changed ones to `recompute` (and, when named ports changed, every endpoint
    /// with a rule that names ports); answers the entries of the endpoints dropped.
    fn apply_endpoint_changes(&mut self, recompute: &mut BTreeSet<u16>) -> usize {
        let mut named = self.applied.remote_named_ports != self.inputs.remote_named_ports;
        if named {
            self.applied.remote_named_ports.clone_from(&self.inputs.remote_named_ports);
        }
        let current: BTreeSet<u16> = self.inputs.endpoints.iter().map(|e| e.id).collect();
        let mut gone: Vec<u16> = Vec::new();
        self.applied.endpoints.retain(|id, ep| {
            let keep = current.contains(id);
            if !keep {
                named |= !ep.named_ports.is_empty();
                gone.push(*id);
            }
            keep
        });
        for ep in &self.inputs.endpoints {
            match self.applied.endpoints.get(&ep.id) {
                Some(old) if old == ep => continue,
                Some(old) => {
                    named |= old.named_ports != ep.named_ports
                        || (!ep.named_ports.is_empty() && old.identity != ep.identity);
                }
                None => named |= !ep.named_ports.is_empty(),
            }
            recompute.insert(ep.id);
            self.applied.endpoints.insert(ep.id, ep.clone());
        }
        let mut dropped = 0;
        for id in gone {
            dropped += self.drop_endpoint(id);
            recompute.remove(&id);
        }
        if named {
            recompute.extend(self.contributions.iter().filter(|(_, c)| c.names_ports(&self.rules)).map(|(id, _)| id));
        }
        dropped
    }

    /// Forgets endpoint `ep`: its contributions, its entries, its use of selections;
    /// answers how many entries it had.
    fn drop_endpoint(&mut self, ep: u16) -> usize {
        self.contributions.forget(ep, &mut self.selections);
        self.state.endpoints.remove(&ep).map_or(0, |p| p.entries.len())
    }

    fn position(&self, ep: u16) -> Option<usize> {
        self.inputs.endpoints.iter().position(|e| e.id == ep)
    }

    /// Computes endpoint `ep` in full (the rules that select it, its contributions, its
    /// entries); answers how many entries changed.
    fn recompute_endpoint(&mut self, ep: u16) -> usize {
        let Some(i) = self.position(ep) else { return 0 };
        self.contributions.forget(ep, &mut self.selections);
        let labels = &self.inputs.endpoints[i].labels;
        let mut selecting: Vec<usize> =
            self.rules.live().filter(|fi| self.rules.rule(*fi).subject.matches(labels)).collect();
        selecting.sort_unstable();
        self.contributions.compute(ep, &selecting, &self.rules, &mut self.selections, &self.universe);
        let new = self.endpoint_policy(i);
        self.replace_endpoint_policy(ep, new)
    }

    /// Makes `new` endpoint `ep`'s policy (unless it is the same); answers how many
    /// entries changed.
    fn replace_endpoint_policy(&mut self, ep: u16, new: EndpointPolicy) -> usize {
        let old = self.state.endpoints.get(&ep).cloned().unwrap_or_default();
        let n = verdicts::count_changes(old.entries.iter(), new.entries.iter());
        if n > 0
            || old.ingress_enforced != new.ingress_enforced
            || old.egress_enforced != new.egress_enforced
            || !self.state.endpoints.contains_key(&ep)
        {
            self.state.endpoints.insert(ep, Arc::new(new));
        }
        n
    }

    /// The full desired policy of endpoint `i` (of the inputs), from its contributions.
    fn endpoint_policy(&mut self, i: usize) -> EndpointPolicy {
        let ep = &self.inputs.endpoints[i];
        let st = self.contributions.get(ep.id).expect("contributions are computed before entries");
        let sources = Sources {
            rules: &self.rules,
            selections: &self.selections,
            universe: &self.universe,
            endpoints: &self.inputs.endpoints,
            remote_named_ports: &self.inputs.remote_named_ports,
        };
        let raw = contributions::raw_entries(&sources, ep, st, None);
        let entries = verdicts::decide(&raw, &[], &mut self.rules.origins);
        let mut policy = EndpointPolicy {
            ingress_enforced: st.enforce[0],
            egress_enforced: st.enforce[1],
            entries: entries.into_iter().collect(),
            audit: None,
        };
        super::open_directions_without_default_deny(&mut policy);
        if self.options.allow_localhost {
            super::allow_localhost(&mut policy);
        }
        if !st.tiered.is_empty() {
            let sources = Sources {
                rules: &self.rules,
                selections: &self.selections,
                universe: &self.universe,
                endpoints: &self.inputs.endpoints,
                remote_named_ports: &self.inputs.remote_named_ports,
            };
            let flat = tiered::flatten(&policy, st, &sources, ep);
            flat.apply(&mut policy, &mut self.rules.origins);
        }
        policy
    }

    /// Recomputes the entries of identities `ids` on endpoint `ep`; answers how many
    /// entries changed.
    fn update_identity_entries(&mut self, ep: u16, ids: &BTreeSet<u32>) -> usize {
        let Some(i) = self.position(ep) else { return 0 };
        let st = self.contributions.get(ep).expect("only endpoints with contributions are updated");
        // A direction with deny rules but no default deny, or one that tiered rules
        // select: every identity's entries depend on the others (see `tiered`).
        if st.deny_without_default || !st.tiered.is_empty() {
            let new = self.endpoint_policy(i);
            return self.replace_endpoint_policy(ep, new);
        }
        let sources = Sources {
            rules: &self.rules,
            selections: &self.selections,
            universe: &self.universe,
            endpoints: &self.inputs.endpoints,
            remote_named_ports: &self.inputs.remote_named_ports,
        };
        let raw = contributions::raw_entries(&sources, &self.inputs.endpoints[i], st, Some(ids));
        let old_policy = self.state.endpoints.get(&ep).cloned().unwrap_or_default();
        // Denies for any peer: an identity change never changes them.
        let new = verdicts::decide(&raw, &verdicts::any_peer_denies(&old_policy), &mut self.rules.origins);
        let old = verdicts::entries_of(&old_policy, ids);
        let n = verdicts::count_changes(old.iter().copied(), new.iter().map(|(k, v)| (k, v)));
        if n == 0 {
            return 0;
        }
        let old_keys: Vec<_> = old.iter().map(|(k, _)| **k).collect();
        // Copy-on-write: the endpoint's entries are copied when the previous state is still
        // shared (the map writer holds it); the cost of an update on an endpoint is that copy.
        let policy = Arc::make_mut(self.state.endpoints.entry(ep).or_default());
        for k in old_keys {
            policy.entries.remove(&k);
        }
        policy.entries.extend(new);
        n
    }

    /// Resolves everything from scratch (keeping identity numbers that stay in use).
    fn rebuild(&mut self) {
        self.rules = CompiledRules::compile_all(&self.inputs.policies);
        self.address_ids.set_ip_blocks(self.rules.ip_blocks());
        self.applied.policies = self.inputs.policies.clone();
        self.rebuild_universe();
        // Which rules select which endpoint.
        let endpoints = &self.inputs.endpoints;
        let mut ep_index = LabelIndex::default();
        for (i, ep) in endpoints.iter().enumerate() {
            ep_index.add(i as u32, &ep.labels);
        }
        let mut selecting: Vec<Vec<usize>> = vec![Vec::new(); endpoints.len()];
        let mut live: Vec<usize> = self.rules.live().collect();
        live.sort_unstable();
        for fi in live {
            let subject = &self.rules.rule(fi).subject;
            let candidates: Vec<u32> =
                ep_index.candidates(subject).unwrap_or_else(|| (0..endpoints.len() as u32).collect());
            for i in candidates {
                if subject.matches(&endpoints[i as usize].labels) {
                    selecting[i as usize].push(fi);
                }
            }
        }
        // Contributions and selections.
        self.selections = Selections::default();
        self.contributions = Contributions::default();
        for (ep, rules) in endpoints.iter().zip(&selecting) {
            self.contributions.compute(ep.id, rules, &self.rules, &mut self.selections, &self.universe);
        }
        self.applied.endpoints = endpoints.iter().map(|e| (e.id, e.clone())).collect();
        self.applied.remote_named_ports.clone_from(&self.inputs.remote_named_ports);
        // Entries.
        let mut all = BTreeMap::new();
        for i in 0..self.inputs.endpoints.len() {
            all.insert(self.inputs.endpoints[i].id, Arc::new(self.endpoint_policy(i)));
        }
        self.state.endpoints = all;
        self.state.cidr_ipcache = self.inputs.cidrs.ipcache();
        self.state.cidr_identities = self.inputs.cidrs.labels();
        self.stale = false;
    }

    /// The universe from scratch: the allocator's identities, the CIDR identities, the
    /// address identities (brought up to date first).
    fn rebuild_universe(&mut self) {
        self.universe = Universe::default();
        for (id, labels, _) in self.inputs.identities.iter() {
            self.universe.insert(id, Member::pod(labels.clone()));
        }
        for (prefix, id) in self.inputs.cidrs.iter() {
            self.universe.insert(id, Member::cidr(*prefix));
        }
        let pods = Pods { identities: &self.inputs.identities, addresses: &self.inputs.addresses };
        // Labels of kept identities may be those of freed pod identities: recheck all.
        let all = self.address_ids.all_addresses(&pods);
        self.address_ids.sync(all, &pods, &mut self.state, &mut MemberChanges::default(), |_, _| false);
        for (id, m) in self.address_ids.members(&pods) {
            self.universe.insert(id, m);
        }
    }
}
