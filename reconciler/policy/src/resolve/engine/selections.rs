//! The selection cache: a selection is a compiled peer with the `requires` in force for
//! an endpoint. Each knows its member identities and the endpoints that use it, so an
//! identity that appears or goes is tested against every selection once and the
//! endpoints it concerns are known.

use std::collections::{BTreeSet, HashMap};

use super::super::endpoint_selectable;
use super::compile::CompiledRules;
use super::universe::{Member, Universe};
use crate::cidr::{CidrBlock, IPBLOCK_SOURCE};
use crate::identity;
use crate::labels::source;
use crate::model::{Entity, Peer};

/// A peer with the requires in force: what a selection selects.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) struct SelKey {
    pub peer: u32,
    /// Requires (selector numbers), sorted; only for endpoint selectors.
    pub requires: Vec<u32>,
}

#[derive(Clone, Debug)]
struct Selection {
    key: SelKey,
    members: BTreeSet<u32>,
    /// Endpoints with a contribution that uses this selection.
    users: BTreeSet<u16>,
}

/// Every selection some endpoint uses (or used since the last full resolution).
#[derive(Clone, Debug, Default)]
pub(super) struct Selections {
    list: Vec<Selection>,
    by_key: HashMap<SelKey, usize>,
}

impl Selections {
    /// The selection for `key` with `ep` as a user, made (with its members) if new.
    pub fn use_for(&mut self, key: SelKey, ep: u16, rules: &CompiledRules, universe: &Universe) -> usize {
        let s = if let Some(&s) = self.by_key.get(&key) {
            s
        } else {
            let members = universe.members_of(rules.peer(key.peer), |id, m| selects(rules, &key, id, m));
            self.list.push(Selection { key: key.clone(), members, users: BTreeSet::new() });
            self.by_key.insert(key, self.list.len() - 1);
            self.list.len() - 1
        };
        self.list[s].users.insert(ep);
        s
    }

    /// `ep` no longer uses selection `s`.
    pub fn stop_using(&mut self, s: usize, ep: u16) {
        self.list[s].users.remove(&ep);
    }

    pub fn members(&self, s: usize) -> &BTreeSet<u32> {
        &self.list[s].members
    }

    /// Takes identity `id` out of every selection; adds the users of those it was in to
    /// `affected`.
    pub fn remove_member(&mut self, id: u32, affected: &mut BTreeSet<u16>) {
        for sel in &mut self.list {
            if sel.members.remove(&id) {
                affected.extend(sel.users.iter().copied());
            }
        }
    }

    /// Puts identity `id` into every selection that selects it; adds their users to
    /// `affected`.
    pub fn add_member(&mut self, id: u32, member: &Member, rules: &CompiledRules, affected: &mut BTreeSet<u16>) {
        for sel in &mut self.list {
            if selects(rules, &sel.key, id, member) {
                sel.members.insert(id);
                affected.extend(sel.users.iter().copied());
            }
        }
    }
}

/// Whether selection `key` selects identity `id`.
fn selects(rules: &CompiledRules, key: &SelKey, id: u32, m: &Member) -> bool {
    match rules.peer(key.peer) {
        Peer::Endpoints(sel) => {
            (m.k8s || endpoint_selectable(sel, &m.labels))
                && sel.matches(&m.labels)
                && key.requires.iter().all(|r| rules.require(*r).matches(&m.labels))
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
