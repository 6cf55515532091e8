// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Granted pages as `vm-memory` guest memory, so that `device-blk` sees a Xen request like any other.
//!
//! A request's data pages become the regions of a small per-request [`GrantMemory`]: segment `i` of a request
//! lives at guest address `i * 4096 + first_sect * 512`, whatever backs page `i`:
//! - [`GrantMode::Map`] with persistent grants: pages of longer-lived mappings from the [`PersistentGrants`] cache
//!   (one region per page, merged when adjacent), or beyond its bound the request's grant refs mapped in one batch
//!   (one region);
//! - [`GrantMode::Map`] without: pages of the queue's [`BouncePool`]; the request's grant refs are mapped in one
//!   batch only to copy a write's data out (then unmapped, before the I/O) or a read's data in (after it), so
//!   that no mapped page takes part in I/O and every grant is unmapped when the request is answered;
//! - [`GrantMode::Copy`]: pages of the queue's [`BouncePool`], filled from the guest by grant copy before a write
//!   and copied to the guest after a read (the robust path in a PV dom0, see DESIGN.md).
//!
//! [`SegmentMapper`] does this per request and releases it after completion.
//!
//! Read-only mappings (the pages of a guest's write request) are exposed as regions too: `device-blk` only lets
//! the kernel read them. Writing to one through `Bytes` would fault; the data plane never does.

mod bounce;
mod mapper;
mod persistent;

use vm_memory::bitmap::BS;
use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryError, GuestMemoryRegion, GuestMemoryRegionBytes, GuestUsize,
    MemoryRegionAddress, VolatileSlice,
};

pub use bounce::BouncePool;
pub use mapper::{segment_address, BindError, RequestPages, SegmentMapper};
pub use persistent::{PersistentGrants, MAX_PERSISTENT_GRANTS};

use crate::services::XEN_PAGE_SIZE;

/// How a queue reaches the guest's data pages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GrantMode {
    /// Map the grant refs (gntdev). With persistent grants the I/O uses the mapped pages; without, a request's
    /// I/O goes through bounce pages and its mapping only lives while its data is copied (the frontend revokes
    /// each grant once answered).
    #[default]
    Map,
    /// Grant-copy between the guest's pages and a bounce pool, and do I/O on the pool.
    Copy,
}

/// One contiguous piece of a [`GrantMemory`]: host memory that the owner keeps mapped.
#[derive(Debug)]
pub struct GrantRegion {
    start: GuestAddress,
    host: *mut u8,
    len: usize,
    writable: bool,
}

// SAFETY: a region is an address range of a mapping that its owner keeps alive; it carries no thread affinity.
unsafe impl Send for GrantRegion {}
// SAFETY: as above; all access goes through volatile slices.
unsafe impl Sync for GrantRegion {}

impl GrantRegion {
    /// Whether the memory may be written.
    pub fn writable(&self) -> bool {
        self.writable
    }
}

impl GuestMemoryRegion for GrantRegion {
    type B = ();

    fn len(&self) -> GuestUsize {
        self.len as GuestUsize
    }

    fn start_addr(&self) -> GuestAddress {
        self.start
    }

    fn bitmap(&self) -> BS<'_, ()> {}

    fn get_host_address(&self, addr: MemoryRegionAddress) -> vm_memory::guest_memory::Result<*mut u8> {
        let offset =
            usize::try_from(addr.0).ok().filter(|&o| o < self.len).ok_or(GuestMemoryError::InvalidBackendAddress)?;
        // SAFETY: `offset < len`, inside the region.
        Ok(unsafe { self.host.add(offset) })
    }

    fn get_slice(
        &self,
        offset: MemoryRegionAddress,
        count: usize,
    ) -> vm_memory::guest_memory::Result<VolatileSlice<'_, BS<'_, ()>>> {
        let start = usize::try_from(offset.0).map_err(|_| GuestMemoryError::InvalidBackendAddress)?;
        let end = start.checked_add(count).ok_or(GuestMemoryError::InvalidBackendAddress)?;
        if end > self.len {
            return Err(GuestMemoryError::InvalidBackendAddress);
        }
        // SAFETY: `start..end` lies within the region, which the owner of the `GrantMemory` keeps mapped while the
        // memory (and so this borrow) exists; the guest may access it concurrently, hence volatile slices.
        Ok(unsafe { VolatileSlice::new(self.host.add(start), count) })
    }
}

impl GuestMemoryRegionBytes for GrantRegion {}

/// The guest memory of one request: page-aligned regions at guest addresses `0, 4096, ...`.
#[derive(Debug, Default)]
pub struct GrantMemory {
    regions: Vec<GrantRegion>,
    next: u64,
}

impl GrantMemory {
    /// An empty memory with room for `pages` regions.
    pub fn with_capacity(pages: usize) -> Self {
        GrantMemory { regions: Vec::with_capacity(pages), next: 0 }
    }

    /// The regions there is room for without allocating.
    pub fn capacity(&self) -> usize {
        self.regions.capacity()
    }

    /// Room for at least `pages` regions.
    pub fn reserve(&mut self, pages: usize) {
        self.regions.reserve(pages.saturating_sub(self.regions.len()));
    }

    /// Forget every region (keeping the allocation).
    pub fn clear(&mut self) {
        self.regions.clear();
        self.next = 0;
    }

    /// Bytes of guest address space used so far.
    pub fn size(&self) -> u64 {
        self.next
    }

    /// Append `pages` pages at `host` after the previous ones, returning the guest address of the first. Merged
    /// into the previous region when contiguous with it in host memory and of the same access.
    ///
    /// # Safety
    /// `host` must be valid for reads (and writes, if `writable`) of `pages * 4096` bytes for as long as this
    /// memory holds the region (until [`clear`](Self::clear) or drop).
    pub unsafe fn push(&mut self, host: *mut u8, pages: usize, writable: bool) -> GuestAddress {
        let start = GuestAddress(self.next);
        let len = pages * XEN_PAGE_SIZE;
        self.next += len as u64;
        if let Some(last) = self.regions.last_mut() {
            if last.writable == writable && last.host.wrapping_add(last.len) == host {
                last.len += len;
                return start;
            }
        }
        self.regions.push(GrantRegion { start, host, len, writable });
        start
    }
}

impl GuestMemoryBackend for GrantMemory {
    type R = GrantRegion;

    fn num_regions(&self) -> usize {
        self.regions.len()
    }

    fn find_region(&self, addr: GuestAddress) -> Option<&GrantRegion> {
        let i = match self.regions.binary_search_by_key(&addr, |r| r.start) {
            Ok(i) => i,
            Err(0) => return None,
            Err(i) => i - 1,
        };
        let r = &self.regions[i];
        (addr.0 - r.start.0 < r.len as u64).then_some(r)
    }

    fn iter(&self) -> impl Iterator<Item = &GrantRegion> {
        self.regions.iter()
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::Bytes;

    use super::*;

    #[test]
    fn regions_merge_and_resolve() {
        let mut buf = vec![0u8; 4 * XEN_PAGE_SIZE];
        let p = buf.as_mut_ptr();
        let mut mem = GrantMemory::with_capacity(4);
        // SAFETY: `buf` outlives `mem` and holds 4 pages.
        unsafe {
            assert_eq!(mem.push(p, 1, true), GuestAddress(0));
            assert_eq!(mem.push(p.add(XEN_PAGE_SIZE), 1, true), GuestAddress(4096));
            assert_eq!(mem.push(p.add(3 * XEN_PAGE_SIZE), 1, true), GuestAddress(8192));
        }
        assert_eq!(mem.num_regions(), 2);
        mem.write_slice(&[1, 2, 3], GuestAddress(8190)).expect("spans two regions");
        drop(mem);
        assert_eq!((buf[8190], buf[8191], buf[3 * XEN_PAGE_SIZE]), (1, 2, 3));
        let mem = GrantMemory::default();
        assert!(mem.find_region(GuestAddress(0)).is_none());
    }
}
