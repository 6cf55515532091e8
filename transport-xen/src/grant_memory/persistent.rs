// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Persistent grants (`feature-persistent`): grants the frontend reuses for every request stay mapped, up to a
//! bound per ring, least recently used evicted beyond it.
//!
//! Misses of one request are mapped in one batch; the batch is a *group* whose pages are cached individually
//! and unmapped together, when the whole group is evicted. A group is only evicted when no in-flight request
//! holds it (requests hold an `Rc` of every group they use), so the number of cached grants never exceeds the
//! bound and nothing in use is ever unmapped.

use std::rc::Rc;

use crate::keyed_map::{KeyedMap, KeyedState};
use crate::services::{GrantMapping, GrantRef, XEN_PAGE_SIZE};

/// Persistent grants kept per ring (Linux blkback's `xen_blkif_max_pgrants` default).
pub const MAX_PERSISTENT_GRANTS: usize = 1056;

#[derive(Debug)]
struct Entry {
    /// Index of the group in `PersistentGrants::groups`.
    group: usize,
    page: usize,
}

#[derive(Debug)]
struct Group<M> {
    mapping: Rc<M>,
    refs: Vec<GrantRef>,
    last_use: u64,
}

/// The cache of one ring.
///
/// The grant refs (the frontend's choice) are looked up in a [`KeyedMap`] (the standard library's keyed hash); the
/// groups (our own numbering) sit in a slab indexed by the entries, so a hit costs one hash look-up, not two.
#[derive(Debug)]
pub struct PersistentGrants<M> {
    entries: KeyedMap<GrantRef, Entry>,
    /// The groups by index; a freed index (in `free_groups`) is reused. At most one group per cached grant.
    groups: Vec<Option<Group<M>>>,
    free_groups: Vec<usize>,
    limit: usize,
    clock: u64,
    evictions: u64,
}

impl<M: GrantMapping> PersistentGrants<M> {
    /// An empty cache holding at most `limit` grants.
    pub fn new(limit: usize) -> Self {
        PersistentGrants {
            entries: KeyedMap::with_capacity_and_hasher(limit.min(MAX_PERSISTENT_GRANTS), KeyedState::default()),
            groups: Vec::new(),
            free_groups: Vec::new(),
            limit,
            clock: 0,
            evictions: 0,
        }
    }

    /// Grants cached.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Mappings (batches) alive in the cache.
    pub fn mappings(&self) -> usize {
        self.groups.len() - self.free_groups.len()
    }

    /// Groups evicted so far.
    pub fn evictions(&self) -> u64 {
        self.evictions
    }

    /// The page of a cached grant and the mapping it belongs to (to hold while in use); marks it recently used.
    pub fn lookup(&mut self, gref: GrantRef) -> Option<(*mut u8, Rc<M>)> {
        let e = self.entries.get(&gref)?;
        let g = self.groups.get_mut(e.group)?.as_mut()?;
        self.clock += 1;
        g.last_use = self.clock;
        // `page < mapping.pages()` by construction in `insert`.
        let ptr = g.mapping.as_ptr().wrapping_add(e.page * XEN_PAGE_SIZE);
        Some((ptr, g.mapping.clone()))
    }

    /// Evict least recently used idle groups until `needed` more grants fit; returns whether they do.
    pub fn make_room(&mut self, needed: usize) -> bool {
        while self.entries.len() + needed > self.limit {
            let victim = self
                .groups
                .iter()
                .enumerate()
                .filter_map(|(id, g)| g.as_ref().map(|g| (id, g)))
                .filter(|(_, g)| Rc::strong_count(&g.mapping) == 1)
                .min_by_key(|(_, g)| g.last_use)
                .map(|(id, _)| id);
            let Some(id) = victim else {
                return false;
            };
            if let Some(g) = self.groups.get_mut(id).and_then(Option::take) {
                for r in &g.refs {
                    self.entries.remove(r);
                }
                self.free_groups.push(id);
                self.evictions += 1;
            }
        }
        true
    }

    /// Cache a batch `mapping` of `refs` (distinct, not cached yet, page `i` = `refs[i]`); returns the mapping to
    /// hold while in use. Call [`make_room`](Self::make_room) first.
    pub fn insert(&mut self, mapping: M, refs: &[GrantRef]) -> Rc<M> {
        self.clock += 1;
        let mapping = Rc::new(mapping);
        let group = Group { mapping: mapping.clone(), refs: refs.to_vec(), last_use: self.clock };
        let id = match self.free_groups.pop() {
            Some(id) => {
                self.groups[id] = Some(group);
                id
            }
            None => {
                self.groups.push(Some(group));
                self.groups.len() - 1
            }
        };
        for (page, &r) in refs.iter().enumerate().take(mapping.pages()) {
            self.entries.insert(r, Entry { group: id, page });
        }
        mapping
    }

    /// Unmap everything (the caller guarantees no request holds a group any more).
    pub fn clear(&mut self) {
        self.entries.clear();
        self.groups.clear();
        self.free_groups.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::emulated::EmulatedHost;
    use crate::services::{GrantTable, MapAccess};

    #[test]
    fn lru_eviction_skips_groups_in_use() {
        let host = EmulatedHost::new().expect("host");
        let guest = host.add_guest(3, 16).expect("guest");
        let table = host.grant_table(0);
        let refs: Vec<GrantRef> = (0..8).map(|p| guest.grant_access(p, false).expect("grant")).collect();
        let map = |r: &[GrantRef]| table.map(3, r, MapAccess::ReadWrite).expect("map");
        let mut cache = PersistentGrants::new(4);
        assert!(cache.make_room(2));
        let a = cache.insert(map(&refs[0..2]), &refs[0..2]);
        assert!(cache.make_room(2));
        drop(cache.insert(map(&refs[2..4]), &refs[2..4]));
        assert_eq!((cache.len(), host.live_mappings()), (4, 2));
        // Group A is older but held by a request: B is evicted instead.
        assert!(cache.make_room(2));
        assert!(cache.lookup(refs[2]).is_none() && cache.lookup(refs[0]).is_some());
        assert_eq!((cache.evictions(), host.live_mappings()), (1, 1));
        // C takes the place B left in the group slab.
        let c = cache.insert(map(&refs[4..6]), &refs[4..6]);
        let c_base = c.as_ptr();
        drop(c);
        assert_eq!(cache.mappings(), 2);
        // Nothing idle is old enough while A is held and C is full: no room for 3 more.
        let c_hold = cache.lookup(refs[4]).map(|(_, g)| g);
        assert!(!cache.make_room(3));
        drop((a, c_hold));
        // Now A (least recently used) goes first, then C.
        let (p, _) = cache.lookup(refs[5]).expect("cached");
        assert_eq!(p, c_base.wrapping_add(XEN_PAGE_SIZE), "the second page of C");
        assert!(cache.make_room(2));
        assert!(cache.lookup(refs[0]).is_none() && cache.lookup(refs[4]).is_some());
        cache.clear();
        assert_eq!((cache.len(), cache.mappings(), host.live_mappings()), (0, 0, 0));
    }
}
