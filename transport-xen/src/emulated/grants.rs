// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Emulated grant tables over guest memory that is a memfd owned by the emulated guest.
//!
//! A guest grants one of its pages to a domain ([`GrantHost::grant_access`]); the grantee maps grant refs with
//! [`EmulatedGrantTable`] (`GrantTable::map`): the referenced memfd pages are mapped contiguously into a reserved
//! region (`MAP_SHARED | MAP_FIXED`, `PROT_READ` for read-only maps), so what the backend maps *is* the guest's
//! memory. As with the real gntdev, a batch map fails as a whole when any ref is unknown, granted to another
//! domain, or read-only where write access is asked. Grant copy checks every op and reports a `GNTST_*` status
//! per op. A granted page stays granted while mapped (`end_access` fails with `EBUSY`, as Xen refuses to revoke
//! a grant in use). The host counts live mappings, map calls and copy calls for leak and batching tests.

use std::fs::File;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use std::os::fd::AsRawFd;

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::keyed_map::KeyedMap;
use crate::services::{
    gntst, CopySide, DomId, GrantCopyOp, GrantMapping, GrantRef, GrantTable, MapAccess, XenError, XEN_PAGE_SIZE,
};

/// First grant ref handed out (Linux reserves refs 0..8 for the toolstack and xenstore pages).
pub const FIRST_GRANT_REF: GrantRef = 8;
/// Most grant refs in one map batch.
pub const MAX_MAP_BATCH: usize = 4096;
/// Most grants one guest may have active.
pub const MAX_GRANTS_PER_DOMAIN: usize = 1 << 16;

#[derive(Debug)]
struct GrantEntry {
    page: usize,
    readonly: bool,
    grantee: DomId,
    maps: usize,
}

#[derive(Debug)]
struct DomainGrants {
    memfd: Arc<File>,
    /// The guest's own mapping of its memory (kept alive here for grant copy).
    memory: Arc<GuestMemoryMmap>,
    pages: usize,
    entries: KeyedMap<GrantRef, GrantEntry>,
    next_ref: GrantRef,
}

impl DomainGrants {
    fn page_ptr(&self, page: usize) -> Option<*mut u8> {
        let offset = u64::try_from(page.checked_mul(XEN_PAGE_SIZE)?).ok()?;
        self.memory.get_host_address(GuestAddress(offset)).ok()
    }
}

/// The host side of every domain's grant table; shared by the guests' handles and the grantees' tables.
#[derive(Debug, Default)]
pub struct GrantHost {
    domains: Mutex<KeyedMap<DomId, DomainGrants>>,
    live_mappings: AtomicUsize,
    map_calls: AtomicU64,
    /// `mmap` system calls made by map calls (a reservation and one per run of consecutive pages).
    mmaps: AtomicU64,
    copy_calls: AtomicU64,
    copy_ops: AtomicU64,
}

fn err(what: String, errno: i32) -> XenError {
    XenError::Os { what, errno }
}

impl GrantHost {
    fn lock(&self) -> MutexGuard<'_, KeyedMap<DomId, DomainGrants>> {
        self.domains.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Register `domid`'s memory (its memfd and its own mapping of it).
    pub(crate) fn add_domain(
        &self,
        domid: DomId,
        memfd: Arc<File>,
        memory: Arc<GuestMemoryMmap>,
        pages: usize,
    ) -> Result<(), XenError> {
        let mut d = self.lock();
        if d.contains_key(&domid) {
            return Err(err(format!("grants: domain {domid} exists"), libc::EEXIST));
        }
        d.insert(domid, DomainGrants { memfd, memory, pages, entries: KeyedMap::default(), next_ref: FIRST_GRANT_REF });
        Ok(())
    }

    /// Forget a domain's grant table (existing mappings keep the memory alive until unmapped).
    pub(crate) fn remove_domain(&self, domid: DomId) {
        self.lock().remove(&domid);
    }

    /// Grant `grantee` access to page `page` of `domid`'s memory.
    pub fn grant_access(
        &self,
        domid: DomId,
        grantee: DomId,
        page: usize,
        readonly: bool,
    ) -> Result<GrantRef, XenError> {
        let mut d = self.lock();
        let dom = d.get_mut(&domid).ok_or_else(|| err(format!("grants: no domain {domid}"), libc::ESRCH))?;
        if page >= dom.pages {
            return Err(err(format!("grants: domain {domid} has no page {page}"), libc::EINVAL));
        }
        if dom.entries.len() >= MAX_GRANTS_PER_DOMAIN {
            return Err(err(format!("grants: domain {domid} grant table full"), libc::ENOSPC));
        }
        let gref = loop {
            let r = dom.next_ref;
            dom.next_ref = dom.next_ref.checked_add(1).unwrap_or(FIRST_GRANT_REF);
            if !dom.entries.contains_key(&r) {
                break r;
            }
        };
        dom.entries.insert(gref, GrantEntry { page, readonly, grantee, maps: 0 });
        Ok(gref)
    }

    /// Revoke a grant; fails with `EBUSY` while the grantee has it mapped.
    pub fn end_access(&self, domid: DomId, gref: GrantRef) -> Result<(), XenError> {
        let mut d = self.lock();
        let dom = d.get_mut(&domid).ok_or_else(|| err(format!("grants: no domain {domid}"), libc::ESRCH))?;
        match dom.entries.get(&gref) {
            None => Err(err(format!("grants: domain {domid} has no grant {gref}"), libc::ENOENT)),
            Some(e) if e.maps > 0 => Err(err(format!("grants: grant {gref} of domain {domid} is mapped"), libc::EBUSY)),
            Some(_) => {
                dom.entries.remove(&gref);
                Ok(())
            }
        }
    }

    /// Active grants of `domid`.
    pub fn grant_count(&self, domid: DomId) -> usize {
        self.lock().get(&domid).map_or(0, |d| d.entries.len())
    }

    /// How many times a grant is mapped right now.
    pub fn map_count(&self, domid: DomId, gref: GrantRef) -> usize {
        self.lock().get(&domid).and_then(|d| d.entries.get(&gref)).map_or(0, |e| e.maps)
    }

    /// Mappings (batches) currently mapped by any grantee.
    pub fn live_mappings(&self) -> usize {
        self.live_mappings.load(Ordering::SeqCst)
    }

    /// `GrantTable::map` calls so far (successful or not).
    pub fn map_calls(&self) -> u64 {
        self.map_calls.load(Ordering::SeqCst)
    }

    /// `mmap` system calls made by map calls so far.
    pub fn mmaps(&self) -> u64 {
        self.mmaps.load(Ordering::SeqCst)
    }

    /// `GrantTable::copy` calls (batches) so far.
    pub fn copy_calls(&self) -> u64 {
        self.copy_calls.load(Ordering::SeqCst)
    }

    /// Grant-copy operations so far.
    pub fn copy_ops(&self) -> u64 {
        self.copy_ops.load(Ordering::SeqCst)
    }
}

/// A grantee's grant-table handle (what `/dev/xen/gntdev` is for a real backend).
#[derive(Clone, Debug)]
pub struct EmulatedGrantTable {
    host: Arc<GrantHost>,
    domid: DomId,
}

impl EmulatedGrantTable {
    /// A handle through which `domid` maps and copies grants.
    pub fn new(host: Arc<GrantHost>, domid: DomId) -> Self {
        EmulatedGrantTable { host, domid }
    }
}

/// Refs mapped contiguously into our address space; unmapped (and the grants released) on drop.
#[derive(Debug)]
pub struct EmulatedMapping {
    host: Arc<GrantHost>,
    ptr: *mut u8,
    pages: usize,
    access: MapAccess,
    domid: DomId,
    refs: Vec<GrantRef>,
}

// SAFETY: the mapping is plain shared memory owned by this value; the raw pointer is only its address.
unsafe impl Send for EmulatedMapping {}

impl GrantMapping for EmulatedMapping {
    fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }
    fn pages(&self) -> usize {
        self.pages
    }
    fn access(&self) -> MapAccess {
        self.access
    }
}

impl Drop for EmulatedMapping {
    fn drop(&mut self) {
        // SAFETY: `ptr..ptr + pages * 4096` is the region this value reserved and mapped; nothing else refers to
        // it once the mapping is dropped.
        unsafe { libc::munmap(self.ptr.cast(), self.pages * XEN_PAGE_SIZE) };
        let mut d = self.host.lock();
        if let Some(dom) = d.get_mut(&self.domid) {
            for r in &self.refs {
                if let Some(e) = dom.entries.get_mut(r) {
                    e.maps = e.maps.saturating_sub(1);
                }
            }
        }
        self.host.live_mappings.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Map the pages of `refs` (checked, not all consecutive) into one reserved region of `len` bytes, one mapping per
/// run of consecutive guest pages.
fn map_scattered(
    dom: &DomainGrants,
    refs: &[GrantRef],
    len: usize,
    prot: libc::c_int,
    mmaps: &AtomicU64,
) -> Result<*mut libc::c_void, XenError> {
    mmaps.fetch_add(1, Ordering::SeqCst);
    // SAFETY: a fresh anonymous PROT_NONE reservation; no existing memory is affected.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(XenError::os("gntdev: reserve address space", &std::io::Error::last_os_error()));
    }
    let page_of = |r: &GrantRef| dom.entries.get(r).map_or(0, |e| e.page);
    let mut i = 0;
    while i < refs.len() {
        let first = page_of(&refs[i]);
        let run = 1 + refs[i + 1..].iter().zip(1..).take_while(|&(r, k)| page_of(r) == first + k).count();
        let offset = libc::off_t::try_from(first * XEN_PAGE_SIZE).unwrap_or(libc::off_t::MAX);
        // SAFETY: replaces pages `i..i + run` of the reservation made above (MAP_FIXED inside our own region) with
        // a shared mapping of the guest's memfd pages `first..first + run`, which exist (checked when granted).
        let p = unsafe {
            libc::mmap(
                base.cast::<u8>().add(i * XEN_PAGE_SIZE).cast(),
                run * XEN_PAGE_SIZE,
                prot,
                libc::MAP_SHARED | libc::MAP_FIXED,
                dom.memfd.as_raw_fd(),
                offset,
            )
        };
        mmaps.fetch_add(1, Ordering::SeqCst);
        if p == libc::MAP_FAILED {
            let e = std::io::Error::last_os_error();
            // SAFETY: unmapping the region reserved above, which nothing else refers to.
            unsafe { libc::munmap(base, len) };
            return Err(XenError::os("gntdev: map guest page", &e));
        }
        i += run;
    }
    Ok(base)
}

impl GrantTable for EmulatedGrantTable {
    type Mapping = EmulatedMapping;

    fn map(&self, domid: DomId, refs: &[GrantRef], access: MapAccess) -> Result<EmulatedMapping, XenError> {
        self.host.map_calls.fetch_add(1, Ordering::SeqCst);
        if refs.is_empty() || refs.len() > MAX_MAP_BATCH {
            return Err(err(format!("gntdev: cannot map a batch of {} refs", refs.len()), libc::EINVAL));
        }
        let mut d = self.host.lock();
        let dom = d.get_mut(&domid).ok_or_else(|| err(format!("gntdev: no domain {domid}"), libc::ESRCH))?;
        // Check every ref first (the batch fails as a whole), and see whether their pages follow each other.
        let mut contiguous = true;
        let mut prev: Option<usize> = None;
        for &r in refs {
            let e = match dom.entries.get(&r) {
                Some(e) if e.grantee == self.domid => e,
                _ => return Err(err(format!("gntdev: domain {domid} has not granted ref {r} to us"), libc::EINVAL)),
            };
            if e.readonly && access == MapAccess::ReadWrite {
                return Err(err(format!("gntdev: ref {r} of domain {domid} is read-only"), libc::EPERM));
            }
            contiguous &= prev.is_none_or(|p| p.checked_add(1) == Some(e.page));
            prev = Some(e.page);
        }
        let len = refs.len() * XEN_PAGE_SIZE;
        let prot = match access {
            MapAccess::ReadOnly => libc::PROT_READ,
            MapAccess::ReadWrite => libc::PROT_READ | libc::PROT_WRITE,
        };
        let base = if contiguous {
            // Consecutive guest pages (the common case: a ring, a request's pages of one buffer): one mapping of
            // the memfd's range, no reservation.
            let first = dom.entries.get(&refs[0]).map_or(0, |e| e.page);
            let offset = libc::off_t::try_from(first * XEN_PAGE_SIZE).unwrap_or(libc::off_t::MAX);
            // SAFETY: a fresh shared mapping of the guest's memfd pages `first..first + refs.len()`, which exist
            // (checked when they were granted); no existing memory is affected.
            let p =
                unsafe { libc::mmap(std::ptr::null_mut(), len, prot, libc::MAP_SHARED, dom.memfd.as_raw_fd(), offset) };
            self.host.mmaps.fetch_add(1, Ordering::SeqCst);
            if p == libc::MAP_FAILED {
                return Err(XenError::os("gntdev: map guest pages", &std::io::Error::last_os_error()));
            }
            p
        } else {
            map_scattered(dom, refs, len, prot, &self.host.mmaps)?
        };
        for r in refs {
            if let Some(e) = dom.entries.get_mut(r) {
                e.maps += 1;
            }
        }
        self.host.live_mappings.fetch_add(1, Ordering::SeqCst);
        Ok(EmulatedMapping {
            host: self.host.clone(),
            ptr: base.cast(),
            pages: refs.len(),
            access,
            domid,
            refs: refs.to_vec(),
        })
    }

    unsafe fn copy(&self, ops: &mut [GrantCopyOp]) -> Result<(), XenError> {
        self.host.copy_calls.fetch_add(1, Ordering::SeqCst);
        self.host.copy_ops.fetch_add(ops.len() as u64, Ordering::SeqCst);
        let d = self.host.lock();
        let resolve = |side: CopySide, len: u16, dest: bool| -> Result<*mut u8, i16> {
            match side {
                CopySide::Local(addr) => Ok(addr as *mut u8),
                CopySide::Grant { domid, gref, offset } => {
                    let dom = d.get(&domid).ok_or(gntst::BAD_DOMAIN)?;
                    let e = dom.entries.get(&gref).filter(|e| e.grantee == self.domid).ok_or(gntst::BAD_GNTREF)?;
                    if usize::from(offset) + usize::from(len) > XEN_PAGE_SIZE {
                        return Err(gntst::BAD_COPY_ARG);
                    }
                    if dest && e.readonly {
                        return Err(gntst::PERMISSION_DENIED);
                    }
                    let page = dom.page_ptr(e.page).ok_or(gntst::GENERAL_ERROR)?;
                    // SAFETY: `offset + len <= 4096` inside a page of the guest's mapping.
                    Ok(unsafe { page.add(usize::from(offset)) })
                }
            }
        };
        for op in ops.iter_mut() {
            let src = resolve(op.source, op.len, false);
            let dst = resolve(op.dest, op.len, true);
            op.status = match (src, dst) {
                (Ok(s), Ok(t)) => {
                    // SAFETY: grant sides were checked to lie within a guest page; local sides are valid for `len`
                    // bytes by the caller's contract. `copy` allows overlap (two ops on one page). The guest may
                    // write its page concurrently: the bytes are copied as they are, never interpreted here.
                    unsafe { std::ptr::copy(s, t, usize::from(op.len)) };
                    gntst::OKAY
                }
                (Err(e), _) | (_, Err(e)) => e,
            };
        }
        Ok(())
    }
}
