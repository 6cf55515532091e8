// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Per-request access to the guest's data pages: map (one batch per request, or persistent), or grant-copy
//! through the bounce pool; and reading the descriptor pages of indirect requests.
//!
//! A [`SegmentMapper`] belongs to one queue's worker thread (persistent mappings are shared with in-flight
//! requests through `Rc`), and so do the [`RequestPages`] of its in-flight slots.

use std::rc::Rc;
use std::sync::Arc;

use device_blk::Segment;
use vm_memory::GuestAddress;

use super::{BouncePool, GrantMemory, GrantMode, PersistentGrants};
use crate::blkif::{BlkifOp, BlkifRequest, BlkifSegment, RequestFault, MAX_INDIRECT_PAGES};
use crate::services::{
    gntst, CopySide, DomId, GrantCopyOp, GrantMapping, GrantRef, GrantTable, MapAccess, XEN_PAGE_SIZE,
};

/// Why a request's pages could not be bound.
#[derive(Debug)]
#[non_exhaustive]
pub enum BindError {
    /// Not now (the bounce pool is exhausted): retry after completions.
    Busy,
    /// Never: the request's grants are bad; answer it with an error.
    Fault(RequestFault),
}

/// What one in-flight request holds of the guest's memory: its [`GrantMemory`] and whatever backs it.
#[derive(Debug)]
pub struct RequestPages<M> {
    /// The request's data pages as guest memory.
    pub memory: GrantMemory,
    mapping: Option<M>,
    held: Vec<Rc<M>>,
    bounce: Vec<u32>,
    copy_back: bool,
}

impl<M> RequestPages<M> {
    /// Empty, with room for `pages` pages.
    pub fn new(pages: usize) -> Self {
        RequestPages {
            memory: GrantMemory::with_capacity(pages),
            mapping: None,
            held: Vec::new(),
            bounce: Vec::new(),
            copy_back: false,
        }
    }

    /// Empty, over `memory` (cleared; e.g. the page table of a slot whose queue is gone).
    pub(crate) fn with_memory(mut memory: GrantMemory) -> Self {
        memory.clear();
        RequestPages { memory, mapping: None, held: Vec::new(), bounce: Vec::new(), copy_back: false }
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.mapping.is_none() && self.held.is_empty() && self.bounce.is_empty()
    }
}

/// A page of a persistent mapping, and the mapping (held while the page is in use).
type CachedPage<M> = (*mut u8, Rc<M>);

/// The per-queue page binder.
#[derive(Debug)]
pub struct SegmentMapper<G: GrantTable> {
    grants: Arc<G>,
    domid: DomId,
    mode: GrantMode,
    persistent: Option<PersistentGrants<G::Mapping>>,
    pool: Option<BouncePool>,
    /// Per segment of the request being bound: host address of its page and whether it is writable (persistent
    /// grants; room for the most segments made with the first such request).
    ptrs: Vec<(usize, bool)>,
    misses: Vec<GrantRef>,
    ops: Vec<GrantCopyOp>,
    /// The descriptor pages of an indirect request, copied (made with the queue's first indirect request, and
    /// kept: a queue that sees none does not pay for them).
    indirect: Vec<u8>,
}

/// The `device-blk` segment for segment `index` of a request: page `index` of its [`GrantMemory`], at the
/// segment's first sector.
pub fn segment_address(index: usize, seg: &BlkifSegment) -> Segment {
    Segment { addr: GuestAddress((index * XEN_PAGE_SIZE) as u64 + u64::from(seg.offset())), len: seg.len() }
}

/// A page, as a grant-copy length.
const PAGE_U16: u16 = 4096;

/// Offsets and lengths of checked segments are at most 4096; anything larger is refused by the grant copy.
fn u16_of(v: u32) -> u16 {
    u16::try_from(v).unwrap_or(u16::MAX)
}

fn fault(what: &str, err: impl std::fmt::Display) -> BindError {
    BindError::Fault(RequestFault::Grants(format!("{what}: {err}")))
}

impl<G: GrantTable> SegmentMapper<G> {
    /// A binder for the grants of `domid` in `mode`, keeping up to `persistent` grants mapped if set
    /// (`feature-persistent`; map mode only). Copy mode, and map mode without persistent grants, do their I/O on
    /// `pool` (without one, their requests fail): in map mode the frontend then revokes each grant once answered,
    /// and Linux blkfront (since the XSA-396 hardening) disables the device when one is still mapped then; a page
    /// that took part in direct I/O can still be held by the block layer when the completion arrives, which defers
    /// gntdev's unmap.
    pub fn new(
        grants: Arc<G>,
        domid: DomId,
        mode: GrantMode,
        persistent: Option<usize>,
        pool: Option<BouncePool>,
    ) -> Self {
        let persistent = persistent.filter(|_| mode == GrantMode::Map).map(PersistentGrants::new);
        SegmentMapper {
            grants,
            domid,
            mode,
            persistent,
            pool,
            ptrs: Vec::new(),
            misses: Vec::new(),
            ops: Vec::new(),
            indirect: Vec::new(),
        }
    }

    /// The mode.
    pub fn mode(&self) -> GrantMode {
        self.mode
    }

    /// Persistent grants cached now.
    pub fn persistent_grants(&self) -> usize {
        self.persistent.as_ref().map_or(0, PersistentGrants::len)
    }

    /// Run a batch of grant copies, failing if any op failed.
    fn copy(&mut self, what: &str) -> Result<(), RequestFault> {
        // SAFETY: every local side of `ops` points into the bounce pool or our indirect buffer, both alive and
        // large enough (`offset + len <= 4096` within one of their pages).
        unsafe { self.grants.copy(&mut self.ops) }.map_err(|e| RequestFault::Grants(format!("{what}: {e}")))?;
        match self.ops.iter().position(|op| op.status != gntst::OKAY) {
            None => Ok(()),
            Some(i) => Err(RequestFault::Grants(format!("{what}: op {i} failed with status {}", self.ops[i].status))),
        }
    }

    /// Read the descriptor pages of an indirect request (mapped read-only in one batch, or grant-copied), copy
    /// them once, and fill the request's segments from the copy.
    pub fn load_indirect(&mut self, req: &mut BlkifRequest) -> Result<(), RequestFault> {
        let Some(ind) = req.indirect else {
            return Ok(());
        };
        if self.indirect.is_empty() {
            self.indirect = vec![0; MAX_INDIRECT_PAGES * XEN_PAGE_SIZE];
        }
        let pages = ind.pages.min(MAX_INDIRECT_PAGES);
        let grefs = &ind.grefs[..pages];
        let mode = self.mode;
        match mode {
            GrantMode::Map if self.load_indirect_persistent(grefs) => {}
            GrantMode::Map => {
                let m =
                    self.grants.map(self.domid, grefs, MapAccess::ReadOnly).map_err(|_| RequestFault::IndirectPages)?;
                // SAFETY: the mapping holds `pages` pages and lives until the end of this block; the guest may
                // change them meanwhile, which only changes what we copy.
                unsafe { std::ptr::copy_nonoverlapping(m.as_ptr(), self.indirect.as_mut_ptr(), pages * XEN_PAGE_SIZE) };
            }
            GrantMode::Copy => {
                let base = self.indirect.as_mut_ptr() as usize;
                self.ops.clear();
                for (i, &gref) in grefs.iter().enumerate() {
                    self.ops.push(GrantCopyOp {
                        source: CopySide::Grant { domid: self.domid, gref, offset: 0 },
                        dest: CopySide::Local(base + i * XEN_PAGE_SIZE),
                        len: PAGE_U16,
                        status: 0,
                    });
                }
                self.copy("indirect pages").map_err(|_| RequestFault::IndirectPages)?;
            }
        }
        req.set_indirect_segments(&self.indirect[..pages * XEN_PAGE_SIZE])
    }

    /// With persistent grants, copy the descriptor pages `grefs` into `self.indirect` from the persistent cache,
    /// mapping the missing ones into it; `false` (nothing done) if the cache cannot take them or the map fails
    /// (e.g. a page granted read-only), for the caller to map them for this request only.
    ///
    /// Linux blkfront takes indirect pages from its persistent grants and keeps one persistent only while the
    /// backend still has it mapped at completion: otherwise it revokes it and grants a fresh page next time.
    /// Unmapping them after every request (as the per-request path does) therefore makes blkfront cycle new
    /// grant refs through the shared pool, and the cache misses on data pages too (Linux blkback maps indirect
    /// pages through its persistent grants as well).
    fn load_indirect_persistent(&mut self, grefs: &[GrantRef]) -> bool {
        let Some(cache) = self.persistent.as_mut() else {
            return false;
        };
        // Hold the cached pages (so that making room cannot evict them) and gather the misses.
        let mut held: [Option<CachedPage<G::Mapping>>; MAX_INDIRECT_PAGES] = Default::default();
        self.misses.clear();
        for (slot, &gref) in held.iter_mut().zip(grefs) {
            *slot = cache.lookup(gref);
            if slot.is_none() && !self.misses.contains(&gref) {
                self.misses.push(gref);
            }
        }
        if !self.misses.is_empty() {
            if !cache.make_room(self.misses.len()) {
                return false;
            }
            let Ok(m) = self.grants.map(self.domid, &self.misses, MapAccess::ReadWrite) else {
                return false;
            };
            let group = cache.insert(m, &self.misses);
            for (slot, gref) in held.iter_mut().zip(grefs) {
                if slot.is_none() {
                    let page = self.misses.iter().position(|g| g == gref).unwrap_or(0);
                    *slot = Some((group.as_ptr().wrapping_add(page * XEN_PAGE_SIZE), group.clone()));
                }
            }
            tracing::trace!(misses = self.misses.len(), "mapped indirect pages persistently");
        }
        for (i, slot) in held.iter().take(grefs.len()).enumerate() {
            let Some((ptr, _group)) = slot else {
                return false;
            };
            // SAFETY: `ptr` is a page of a cached mapping held (by `held`) until the end of this function; the
            // guest may change it meanwhile, which only changes what we copy.
            unsafe {
                std::ptr::copy_nonoverlapping(*ptr, self.indirect.as_mut_ptr().add(i * XEN_PAGE_SIZE), XEN_PAGE_SIZE);
            }
        }
        true
    }

    /// Make the data pages of `req` accessible in `pages.memory`, segment `i` at
    /// [`segment_address`]`(i, segment)`.
    pub fn bind(&mut self, req: &BlkifRequest, pages: &mut RequestPages<G::Mapping>) -> Result<(), BindError> {
        if req.segments.is_empty() {
            return Ok(());
        }
        let to_guest = req.op == BlkifOp::Read;
        match self.mode {
            GrantMode::Map if self.persistent.is_some() => self.bind_persistent(req, pages, to_guest)?,
            GrantMode::Map => self.bind_mapped_bounce(req, pages, to_guest)?,
            GrantMode::Copy => self.bind_bounce(req, pages, to_guest)?,
        }
        Ok(())
    }

    fn bind_persistent(
        &mut self,
        req: &BlkifRequest,
        pages: &mut RequestPages<G::Mapping>,
        to_guest: bool,
    ) -> Result<(), BindError> {
        let Some(cache) = self.persistent.as_mut() else {
            return Err(BindError::Fault(RequestFault::Grants("no persistent grant cache".into())));
        };
        if self.ptrs.capacity() == 0 {
            self.ptrs.reserve_exact(crate::connect::MAX_INDIRECT_SEGMENTS as usize);
        }
        self.ptrs.clear();
        self.misses.clear();
        for s in &req.segments {
            match cache.lookup(s.gref) {
                Some((ptr, group)) => {
                    self.ptrs.push((ptr as usize, true));
                    pages.held.push(group);
                }
                None => {
                    self.ptrs.push((0, false));
                    if !self.misses.contains(&s.gref) {
                        self.misses.push(s.gref);
                    }
                }
            }
        }
        if !self.misses.is_empty() {
            // Persistent grants are mapped writable (they serve reads and writes); beyond the bound, this request's
            // misses are mapped for this request only, with its own access.
            let (base, persistent) = if cache.make_room(self.misses.len()) {
                let m = self.grants.map(self.domid, &self.misses, MapAccess::ReadWrite).map_err(|e| fault("map", e))?;
                let group = cache.insert(m, &self.misses);
                let base = group.as_ptr();
                pages.held.push(group);
                (base, true)
            } else {
                let access = if to_guest { MapAccess::ReadWrite } else { MapAccess::ReadOnly };
                let m = self.grants.map(self.domid, &self.misses, access).map_err(|e| fault("map", e))?;
                let base = m.as_ptr();
                pages.mapping = Some(m);
                (base, false)
            };
            for (i, s) in req.segments.iter().enumerate() {
                if self.ptrs[i].0 == 0 {
                    let page = self.misses.iter().position(|&g| g == s.gref).unwrap_or(0);
                    self.ptrs[i] = (base as usize + page * XEN_PAGE_SIZE, persistent || to_guest);
                }
            }
            tracing::trace!(misses = self.misses.len(), persistent, "mapped grants");
        }
        for &(p, writable) in &self.ptrs {
            // SAFETY: every page is inside a mapping held by `pages` (a cached group or the request's own
            // mapping) until release; cached groups are writable, a request's own mapping is when `to_guest`.
            unsafe { pages.memory.push(p as *mut u8, 1, writable) };
        }
        Ok(())
    }

    /// Map mode without persistent grants: the request's grants are mapped for it alone, and its I/O goes through
    /// bounce pages. A write's data is copied out of the mapping, which is dropped (unmapped) at once; a read's
    /// mapping is kept until [`finish`](SegmentMapper::finish) copies the data in. No page of a mapping ever
    /// takes part in I/O, so when the request is answered its grants are already unmapped (a page the block layer
    /// still held at the I/O's completion would have deferred gntdev's unmap past the response).
    fn bind_mapped_bounce(
        &mut self,
        req: &BlkifRequest,
        pages: &mut RequestPages<G::Mapping>,
        to_guest: bool,
    ) -> Result<(), BindError> {
        self.bounce_pages(req, pages)?;
        self.misses.clear();
        self.misses.extend(req.segments.iter().map(|s| s.gref));
        let access = if to_guest { MapAccess::ReadWrite } else { MapAccess::ReadOnly };
        let mapping = match self.grants.map(self.domid, &self.misses, access) {
            Ok(m) => m,
            Err(e) => {
                self.release(pages);
                return Err(fault("map", e));
            }
        };
        if to_guest {
            pages.mapping = Some(mapping);
            pages.copy_back = true;
            return Ok(());
        }
        let pool = self.pool.as_ref().ok_or_else(|| fault("bounce", "no bounce pool"))?;
        for (i, s) in req.segments.iter().enumerate() {
            let (offset, len) = (s.offset() as usize, s.len() as usize);
            let page = pool.page_ptr(pages.bounce[i]);
            // SAFETY: page `i` of the mapping (it maps one page per segment) and the request's bounce page `i`, both
            // alive; `offset + len <= 4096` (checked segments). The guest may change its page meanwhile, which only
            // changes what we write.
            unsafe {
                std::ptr::copy_nonoverlapping(mapping.as_ptr().add(i * XEN_PAGE_SIZE + offset), page.add(offset), len);
            }
        }
        Ok(())
    }

    /// Take a bounce page for each of `req`'s segments and make them its memory (segment `i` on page `i`).
    fn bounce_pages(&mut self, req: &BlkifRequest, pages: &mut RequestPages<G::Mapping>) -> Result<(), BindError> {
        let Some(pool) = self.pool.as_mut() else {
            return Err(BindError::Fault(RequestFault::Grants("no bounce pool".into())));
        };
        if !pool.alloc(req.segments.len(), &mut pages.bounce) {
            return Err(BindError::Busy);
        }
        for &page in &pages.bounce {
            // SAFETY: a pool page, owned by this request until release.
            unsafe { pages.memory.push(pool.page_ptr(page), 1, true) };
        }
        Ok(())
    }

    fn bind_bounce(
        &mut self,
        req: &BlkifRequest,
        pages: &mut RequestPages<G::Mapping>,
        to_guest: bool,
    ) -> Result<(), BindError> {
        self.bounce_pages(req, pages)?;
        self.ops.clear();
        if let Some(pool) = self.pool.as_ref().filter(|_| !to_guest) {
            for (i, s) in req.segments.iter().enumerate() {
                let page = pool.page_ptr(pages.bounce[i]);
                self.ops.push(GrantCopyOp {
                    source: CopySide::Grant { domid: self.domid, gref: s.gref, offset: u16_of(s.offset()) },
                    dest: CopySide::Local(page as usize + s.offset() as usize),
                    len: u16_of(s.len()),
                    status: 0,
                });
            }
        }
        pages.copy_back = to_guest;
        if !to_guest {
            if let Err(e) = self.copy("grant copy from the guest") {
                self.release(pages);
                return Err(BindError::Fault(e));
            }
        }
        Ok(())
    }

    /// After the request's I/O succeeded: deliver read data to the guest (copy mode, and map mode through the
    /// bounce pool).
    pub fn finish(&mut self, req: &BlkifRequest, pages: &mut RequestPages<G::Mapping>) -> Result<(), RequestFault> {
        if !pages.copy_back {
            return Ok(());
        }
        let Some(pool) = self.pool.as_ref() else {
            return Ok(());
        };
        if let Some(mapping) = pages.mapping.as_ref() {
            for (i, s) in req.segments.iter().enumerate() {
                let page = pool.page_ptr(pages.bounce.get(i).copied().unwrap_or(0));
                let (offset, len) = (s.offset() as usize, s.len() as usize);
                // SAFETY: a pool page of this request and page `i` of its writable mapping (one page per
                // segment, kept until release); `offset + len <= 4096` (checked segments).
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        page.add(offset),
                        mapping.as_ptr().add(i * XEN_PAGE_SIZE + offset),
                        len,
                    );
                }
            }
            return Ok(());
        }
        self.ops.clear();
        for (i, s) in req.segments.iter().enumerate() {
            let page = pool.page_ptr(pages.bounce.get(i).copied().unwrap_or(0));
            self.ops.push(GrantCopyOp {
                source: CopySide::Local(page as usize + s.offset() as usize),
                dest: CopySide::Grant { domid: self.domid, gref: s.gref, offset: u16_of(s.offset()) },
                len: u16_of(s.len()),
                status: 0,
            });
        }
        self.copy("grant copy to the guest")
    }

    /// Release everything a request holds: unmap its own mapping, drop its holds on persistent groups, return
    /// its bounce pages.
    pub fn release(&mut self, pages: &mut RequestPages<G::Mapping>) {
        pages.memory.clear();
        pages.mapping = None;
        pages.held.clear();
        pages.copy_back = false;
        if let Some(pool) = self.pool.as_mut() {
            pool.release(&mut pages.bounce);
        }
        pages.bounce.clear();
    }

    /// Unmap every persistent grant (all requests must have been released).
    pub fn clear_persistent(&mut self) {
        if let Some(cache) = self.persistent.as_mut() {
            cache.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blkif::IndirectPages;
    use crate::emulated::EmulatedHost;

    /// A guest page holding `count` segment descriptors of pages `data..data+count` (granted writable), and an
    /// indirect write request pointing at it.
    fn indirect_request(
        guest: &crate::emulated::GuestDomain,
        desc_page: usize,
        data: usize,
        count: usize,
    ) -> BlkifRequest {
        let desc_gref = guest.grant_access(desc_page, false).expect("grant the descriptor page");
        let base = guest.page_ptr(desc_page).expect("page");
        for i in 0..count {
            let gref = guest.grant_access(data + i, false).expect("grant a data page");
            let seg = BlkifSegment { gref, first_sect: 0, last_sect: 7 }.encode();
            // SAFETY: descriptor `i` (8 bytes) lies inside the guest's page `desc_page`, which the emulator owns.
            unsafe { std::ptr::copy_nonoverlapping(seg.as_ptr(), base.add(i * seg.len()), seg.len()) };
        }
        let mut grefs = [0; MAX_INDIRECT_PAGES];
        grefs[0] = desc_gref;
        let indirect = IndirectPages { nr_segments: u16::try_from(count).expect("count"), grefs, pages: 1 };
        BlkifRequest { op: BlkifOp::Write, indirect: Some(indirect), ..BlkifRequest::default() }
    }

    #[test]
    fn indirect_pages_stay_mapped_with_persistent_grants() {
        let host = EmulatedHost::new().expect("host");
        let guest = host.add_guest(5, 64).expect("guest");
        let mut mapper = SegmentMapper::new(Arc::new(host.grant_table(0)), 5, GrantMode::Map, Some(64), None);
        let template = indirect_request(&guest, 0, 1, 32);
        let desc_gref = template.indirect.expect("indirect").grefs[0];
        for round in 0..3 {
            let mut req = template.clone();
            mapper.load_indirect(&mut req).expect("load the descriptors");
            assert_eq!(req.segments.len(), 32);
            let mut pages = RequestPages::new(32);
            mapper.bind(&req, &mut pages).expect("bind");
            mapper.release(&mut pages);
            // The descriptor page and the 32 data pages, each mapped once (the first time) and kept: as Linux
            // blkback does, so blkfront keeps the indirect grant persistent instead of revoking it.
            assert_eq!((mapper.persistent_grants(), host.map_calls()), (33, 2), "round {round}");
            assert_eq!(host.grants().map_count(5, desc_gref), 1, "round {round}");
        }
        // blkfront's completion check: the backend still maps the page, so the grant is not ended.
        assert!(guest.end_access(desc_gref).is_err());
        mapper.clear_persistent();
        assert_eq!(host.live_mappings(), 0);
        assert!(guest.end_access(desc_gref).is_ok());
    }

    /// Without persistent grants the frontend revokes each grant once answered (Linux blkfront disables the
    /// device if one is still mapped then): a write's grants are unmapped before its I/O, a read's right after
    /// its data is copied in, and the I/O itself only ever touches bounce pages.
    #[test]
    fn without_persistent_grants_io_goes_through_bounce_pages() {
        use crate::emulated::GuestDomain;
        use vm_memory::Bytes;
        let host = EmulatedHost::new().expect("host");
        let guest = host.add_guest(5, 64).expect("guest");
        let pool = BouncePool::new(16).expect("pool");
        let mut mapper = SegmentMapper::new(Arc::new(host.grant_table(0)), 5, GrantMode::Map, None, Some(pool));
        let pattern: Vec<u8> = (0..XEN_PAGE_SIZE).map(|i| u8::try_from(i % 251).unwrap_or(0)).collect();
        guest.memory().write_slice(&pattern, GuestDomain::page_addr(1)).expect("guest data");
        // Sectors 2..=5 of the page.
        let seg = |gref| BlkifSegment { gref, first_sect: 2, last_sect: 5 };
        let (from, to) = (2 * 512, 6 * 512);

        let gref = guest.grant_access(1, true).expect("grant");
        let write = BlkifRequest { op: BlkifOp::Write, segments: vec![seg(gref)], ..BlkifRequest::default() };
        let mut pages = RequestPages::new(1);
        mapper.bind(&write, &mut pages).expect("bind a write");
        assert_eq!(host.live_mappings(), 0, "a write's grants are unmapped before its I/O");
        guest.end_access(gref).expect("the frontend may revoke the grant while the write is in flight");
        let mut data = vec![0u8; to - from];
        pages.memory.read_slice(&mut data, segment_address(0, &write.segments[0]).addr).expect("the I/O's view");
        assert!(data == pattern[from..to], "the write's data was copied into its bounce page");
        mapper.release(&mut pages);

        let gref = guest.grant_access(2, false).expect("grant");
        let read = BlkifRequest { op: BlkifOp::Read, segments: vec![seg(gref)], ..BlkifRequest::default() };
        mapper.bind(&read, &mut pages).expect("bind a read");
        assert_eq!(host.live_mappings(), 1, "a read's mapping waits for its data");
        pages.memory.write_slice(&pattern[from..to], segment_address(0, &read.segments[0]).addr).expect("the I/O");
        let mut page = vec![0u8; XEN_PAGE_SIZE];
        guest.memory().read_slice(&mut page, GuestDomain::page_addr(2)).expect("guest page");
        assert!(page.iter().all(|&b| b == 0), "the I/O wrote a bounce page, not the guest's");
        mapper.finish(&read, &mut pages).expect("copy the data in");
        mapper.release(&mut pages);
        assert_eq!(host.live_mappings(), 0);
        guest.end_access(gref).expect("nothing maps the grant once the read is answered");
        guest.memory().read_slice(&mut page, GuestDomain::page_addr(2)).expect("guest page");
        assert!(page[from..to] == pattern[from..to], "the read's data reached the guest");
        assert!(page[..from].iter().chain(&page[to..]).all(|&b| b == 0), "and nothing outside the segment");
    }

    #[test]
    fn indirect_pages_without_room_are_mapped_per_request() {
        let host = EmulatedHost::new().expect("host");
        let guest = host.add_guest(5, 64).expect("guest");
        // Room for the data pages only: the descriptor page is mapped for the request and unmapped at once.
        let mut mapper = SegmentMapper::new(Arc::new(host.grant_table(0)), 5, GrantMode::Map, Some(4), None);
        let mut req = indirect_request(&guest, 0, 1, 4);
        let mut pages = RequestPages::new(4);
        let mut hold = RequestPages::new(4);
        // Fill the cache with the data pages, held by an in-flight request.
        mapper.load_indirect(&mut req).expect("load");
        mapper.bind(&req, &mut hold).expect("bind");
        assert_eq!(mapper.persistent_grants(), 4);
        let mut again = req.clone();
        again.segments.clear();
        mapper.load_indirect(&mut again).expect("load without room");
        assert_eq!(again.segments, req.segments);
        // Still only the data pages' batch: the descriptor page's mapping is gone again.
        assert_eq!((mapper.persistent_grants(), host.live_mappings()), (4, 1));
        mapper.release(&mut hold);
        mapper.release(&mut pages);
    }
}
