// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! On an I/O thread pool, `Dataplane::stop` returns only once the pool thread released everything of the ring,
//! its memory included: a start and a stop leave no allocation behind, and nothing of the ring is freed after
//! `stop` returned (the fuzzer counts mallocs and frees per input, and a stop that means "released" is what the
//! daemon relies on).
//!
//! A counting global allocator keeps the number of live allocations of the whole process. The pool thread's
//! frees are made slow (a millisecond each, before the memory is given back), so a stop that returned before the
//! thread was done would see them arrive afterwards. This binary holds a single test, so nothing else runs while
//! it measures.

mod dataplane_util;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Duration;

use dataplane_util::{Bed, BedConfig};
use transport_xen::blkif::X86_64;
use transport_xen::dataplane::{DataplaneOptions, IoThreads, WorkerInit};

/// Counts live allocations; frees on the pool thread are slow.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

thread_local! {
    /// Set on the pool thread (by the data plane's worker hook).
    static POOL_THREAD: Cell<bool> = const { Cell::new(false) };
}

// SAFETY: every call is forwarded unchanged to `System`, which upholds the `GlobalAlloc` contract; counting only
// touches an atomic and a const-initialised thread-local, and sleeping does not allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's layout.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            LIVE.fetch_add(1, Ordering::SeqCst);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if POOL_THREAD.try_with(Cell::get).unwrap_or(false) {
            std::thread::sleep(Duration::from_millis(1));
        }
        LIVE.fetch_sub(1, Ordering::SeqCst);
        // SAFETY: `ptr` was allocated by `System` with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded unchanged (one live allocation before and after).
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

#[test]
fn stop_returns_after_the_pool_thread_freed_the_ring() {
    let pool = IoThreads::new(1);
    let mut options = DataplaneOptions::default();
    options.io_threads = Some(pool.clone());
    options.worker_init = Some(WorkerInit::new(|_| {
        POOL_THREAD.with(|p| p.set(true));
        Ok(())
    }));
    let mut bed = Bed::<X86_64>::new(BedConfig { options, ..BedConfig::default() });
    // Warm up: the pool thread, its io_uring and its tables exist and have their capacity.
    bed.stop();
    for _ in 0..2 {
        bed.dp = Some(bed.restart().expect("data plane"));
        bed.stop();
    }
    for cycle in 0..5 {
        let before = LIVE.load(Ordering::SeqCst);
        let dp = bed.restart().expect("data plane");
        assert!(LIVE.load(Ordering::SeqCst) > before, "a started data plane holds memory");
        dp.stop();
        let at_stop = LIVE.load(Ordering::SeqCst);
        // Whatever the pool thread would still free comes within this (its frees take a millisecond each).
        std::thread::sleep(Duration::from_millis(100));
        let later = LIVE.load(Ordering::SeqCst);
        assert_eq!(later, at_stop, "cycle {cycle}: {} allocation(s) freed after stop returned", at_stop - later);
        assert_eq!(at_stop, before, "cycle {cycle}: a start and a stop left allocations behind");
    }
    assert_eq!(pool.rings_per_thread(), [0]);
}
