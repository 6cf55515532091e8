// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A counting global allocator for tests that check what code allocates: it counts the allocations (and their
//! bytes) of every thread, except while the current thread is inside [`Counting::uncounted`] (the test playing the
//! guest or the hypervisor). A test binary installs it with
//! `#[global_allocator] static ALLOCATOR: test_kit::alloc::Counting = test_kit::alloc::Counting::new();`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

thread_local! {
    /// Above 0 while the current thread runs code whose allocations are not counted.
    static UNCOUNTED: Cell<u32> = const { Cell::new(0) };
}

/// Forwards to [`System`], counting as the module says.
pub struct Counting {
    allocations: AtomicUsize,
    bytes: AtomicUsize,
}

impl Counting {
    /// No allocation counted yet.
    pub const fn new() -> Self {
        Counting { allocations: AtomicUsize::new(0), bytes: AtomicUsize::new(0) }
    }

    /// Allocations (and reallocations) counted so far.
    pub fn allocations(&self) -> usize {
        self.allocations.load(Ordering::SeqCst)
    }

    /// Bytes they asked for (for a reallocation, what it grew by).
    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::SeqCst)
    }

    /// Run `f` on this thread without counting its allocations (nests).
    pub fn uncounted<T>(&self, f: impl FnOnce() -> T) -> T {
        UNCOUNTED.with(|n| n.set(n.get() + 1));
        let out = f();
        UNCOUNTED.with(|n| n.set(n.get() - 1));
        out
    }

    fn count(&self, bytes: usize) {
        // (`try_with`: a thread's allocations while its thread-locals are torn down count.)
        if UNCOUNTED.try_with(|n| n.get() == 0).unwrap_or(true) {
            self.allocations.fetch_add(1, Ordering::SeqCst);
            self.bytes.fetch_add(bytes, Ordering::SeqCst);
        }
    }
}

impl Default for Counting {
    fn default() -> Self {
        Self::new()
    }
}

// SAFETY: every call is forwarded unchanged to `System`, which upholds the `GlobalAlloc` contract; counting only
// touches atomics and a const-initialised thread-local, none of which allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.count(layout.size());
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // (The growth only: the bytes a realloc adds.)
        self.count(new_size.saturating_sub(layout.size()));
        // SAFETY: forwarded unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}
