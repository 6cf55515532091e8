// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A queue's bounce pool for the grant-copy path: page-aligned anonymous memory handed out page by page.
//!
//! The pool is one mapping, so it can be registered with io_uring as one fixed buffer once the engine offers
//! buffer registration; pages are allocated per request and returned after completion.

use crate::services::XEN_PAGE_SIZE;

/// Page-granular bounce memory of one queue.
#[derive(Debug)]
pub struct BouncePool {
    base: *mut u8,
    pages: usize,
    free: Vec<u32>,
}

// SAFETY: the pool owns its mapping; the raw pointer is only its address.
unsafe impl Send for BouncePool {}

impl BouncePool {
    /// A pool of `pages` pages (reserved lazily: untouched pages cost no memory).
    pub fn new(pages: usize) -> std::io::Result<BouncePool> {
        let pages = pages.clamp(1, u32::MAX as usize);
        // SAFETY: a fresh private anonymous mapping; no existing memory is affected.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                pages * XEN_PAGE_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let free = (0..u32::try_from(pages).unwrap_or(u32::MAX)).rev().collect();
        Ok(BouncePool { base: base.cast(), pages, free })
    }

    /// Pages in the pool.
    pub fn pages(&self) -> usize {
        self.pages
    }

    /// Pages free now.
    pub fn free_pages(&self) -> usize {
        self.free.len()
    }

    /// The pool's memory (for buffer registration): address and length.
    pub fn as_raw(&self) -> (*mut u8, usize) {
        (self.base, self.pages * XEN_PAGE_SIZE)
    }

    /// Take `count` pages into `out`; `false` (taking none) if fewer are free.
    pub fn alloc(&mut self, count: usize, out: &mut Vec<u32>) -> bool {
        if count > self.free.len() {
            return false;
        }
        let at = self.free.len() - count;
        out.extend(self.free.drain(at..).rev());
        true
    }

    /// Return pages taken with [`alloc`](Self::alloc).
    pub fn release(&mut self, pages: &mut Vec<u32>) {
        self.free.extend(pages.drain(..).filter(|&p| (p as usize) < self.pages));
    }

    /// Address of page `page` (`page < pages()`).
    pub fn page_ptr(&self, page: u32) -> *mut u8 {
        let page = (page as usize).min(self.pages - 1);
        self.base.wrapping_add(page * XEN_PAGE_SIZE)
    }
}

impl Drop for BouncePool {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`; requests using it are finished before the pool is dropped.
        unsafe { libc::munmap(self.base.cast(), self.pages * XEN_PAGE_SIZE) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_come_and_go() {
        let mut pool = BouncePool::new(4).expect("pool");
        let mut a = Vec::new();
        assert!(pool.alloc(3, &mut a));
        let mut b = Vec::new();
        assert!(!pool.alloc(2, &mut b), "only one page left");
        assert!(b.is_empty());
        let ptrs: Vec<usize> = a.iter().map(|&p| pool.page_ptr(p) as usize).collect();
        assert!(ptrs.iter().all(|p| p % XEN_PAGE_SIZE == 0));
        // SAFETY: a page of the pool, owned by this test.
        unsafe { pool.page_ptr(a[0]).write_bytes(7, XEN_PAGE_SIZE) };
        pool.release(&mut a);
        assert_eq!((pool.free_pages(), a.len()), (4, 0));
        assert!(pool.alloc(4, &mut b));
    }
}
