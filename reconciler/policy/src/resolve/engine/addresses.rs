//! Address identities: every pod address inside some Kubernetes NetworkPolicy ipBlock gets
//! a node-local identity whose labels are the pod's labels plus one `ipblock:<block>`
//! label per ipBlock that contains the address (see the engine's module documentation).
//! Addresses of one pod with the same membership share one; numbers stay while in use.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use super::super::DesiredState;
use super::universe::{Member, MemberChanges};
use crate::IdentityAllocator;
use crate::cidr::{CidrBlock, IPBLOCK_SOURCE};
use crate::identity;
use crate::labels::{Label, LabelSet};

/// Address identities are numbered from here: node-local scope, upper half (CIDR
/// identities count up from the bottom of the same scope).
pub const ADDRESS_IDENTITY_BASE: u32 = identity::LOCAL_SCOPE | (1 << 23);

/// Numbers for address identities, keyed by their label set, stable while in use.
#[derive(Clone, Debug, Default)]
struct Numbers {
    by_labels: HashMap<LabelSet, (u32, usize)>,
    labels: BTreeMap<u32, LabelSet>,
    free: BTreeSet<u32>,
    next: u32,
}

impl Numbers {
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

/// The pods as the allocator and the address map know them.
pub(super) struct Pods<'a> {
    pub identities: &'a IdentityAllocator,
    /// Pod address -> pod identity (local and remote pods).
    pub addresses: &'a BTreeMap<IpAddr, u32>,
}

/// The address identities of the pod addresses inside the policies' ipBlocks.
#[derive(Clone, Debug, Default)]
pub(super) struct AddressIdentities {
    numbers: Numbers,
    /// Pod address -> its address identity (addresses inside some ipBlock).
    of: BTreeMap<IpAddr, u32>,
    /// Distinct ipBlocks of the policies.
    ip_blocks: Vec<CidrBlock>,
}

impl AddressIdentities {
    /// Uses these ipBlocks from now on; answers whether they differ from the last ones
    /// (then every address needs [`AddressIdentities::sync`]).
    pub fn set_ip_blocks(&mut self, blocks: Vec<CidrBlock>) -> bool {
        let changed = blocks != self.ip_blocks;
        self.ip_blocks = blocks;
        changed
    }

    /// Every address that has an address identity or may need one.
    pub fn all_addresses(&self, pods: &Pods) -> BTreeSet<IpAddr> {
        let mut all: BTreeSet<IpAddr> = pods.addresses.keys().copied().collect();
        all.extend(self.of.keys().copied());
        all
    }

    /// Every address identity in use, as a member of the universe.
    pub fn members(&self, pods: &Pods) -> Vec<(u32, Member)> {
        let bases: BTreeMap<u32, u32> = self.of.iter().map(|(addr, id)| (*id, pods.addresses[addr])).collect();
        bases.into_iter().map(|(id, base)| (id, Member::address(self.numbers.labels[&id].clone(), base))).collect()
    }

    /// Brings the address identities of `addresses` up to date, and the state's address
    /// ipcache and labels with them; adds the identities freed and newly taken to
    /// `changes` (one freed and taken again with the same labels is neither, when
    /// `universe_has` says the universe has it as it is).
    pub fn sync(
        &mut self,
        addresses: impl IntoIterator<Item = IpAddr>,
        pods: &Pods,
        state: &mut DesiredState,
        changes: &mut MemberChanges,
        universe_has: impl Fn(u32, &Member) -> bool,
    ) {
        let mut new = Vec::new();
        for addr in addresses {
            let labels = self.labels_of(addr, pods);
            let old = self.of.get(&addr).copied();
            if let (Some(old), Some(l)) = (old, &labels)
                && self.numbers.labels.get(&old) == Some(l)
            {
                continue;
            }
            let host = (addr, if addr.is_ipv4() { 32 } else { 128 });
            if let Some(old) = old {
                self.of.remove(&addr);
                state.address_ipcache.remove(&host);
                if self.numbers.release(old) {
                    state.address_identities.remove(&old);
                    changes.removed.insert(old);
                }
            }
            if let Some(labels) = labels {
                let (id, fresh) = self.numbers.acquire(&labels);
                self.of.insert(addr, id);
                state.address_ipcache.insert(host, id);
                if fresh {
                    state.address_identities.insert(id, labels.clone());
                    new.push((id, Member::address(labels, pods.addresses[&addr])));
                }
            }
        }
        for (id, m) in new {
            if changes.removed.contains(&id) && universe_has(id, &m) {
                changes.removed.remove(&id);
                continue;
            }
            changes.added.insert(id, m);
        }
    }

    /// The labels of the address identity of a pod address: its pod's labels and one
    /// `ipblock:` label per ipBlock that contains it; `None` when no ipBlock does.
    fn labels_of(&self, addr: IpAddr, pods: &Pods) -> Option<LabelSet> {
        let pod = pods.identities.get(*pods.addresses.get(&addr)?)?;
        let mut blocks = self.ip_blocks.iter().filter(|b| b.contains_ip(addr)).peekable();
        blocks.peek()?;
        let mut labels = pod.clone();
        for b in blocks {
            labels.insert(Label::new(IPBLOCK_SOURCE, &b.label_key(), ""));
        }
        Some(labels)
    }
}

/// The addresses whose address identity may have changed between `old` and `new` (pod
/// address -> pod identity): those in one map only, those whose pod identity changed, and
/// those whose pod identity is in `changed`. One merge walk over both (sorted) maps.
pub(super) fn touched_addresses(
    old: &BTreeMap<IpAddr, u32>,
    new: &BTreeMap<IpAddr, u32>,
    changed: &BTreeSet<u32>,
) -> Vec<IpAddr> {
    let mut touched: Vec<IpAddr> = Vec::new();
    let (mut old, mut new) = (old.iter().peekable(), new.iter().peekable());
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
                    if ia != ib || changed.contains(ib) || changed.contains(ia) {
                        touched.push(**a);
                    }
                    old.next();
                    new.next();
                }
            },
        }
    }
    touched
}
