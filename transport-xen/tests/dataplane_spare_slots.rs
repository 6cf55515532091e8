// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! An I/O thread pool that keeps spare slots (`IoThreads::with_spare_slots`) gives the slots of a stopped queue to
//! the next queue it starts: a data plane started after another stopped makes none of the slots (request, device
//! request, page table) its predecessor made, whatever their sizes; without spares each start makes them anew.
//!
//! A counting global allocator counts the allocations of every thread but the test thread while it plays the
//! guest. This binary holds a single test, so nothing else runs while it measures.

mod dataplane_util;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

use dataplane_util::{pattern, Bed, BedConfig, Shape};
use device_blk::EngineKind;
use transport_xen::blkif::{RSP_OKAY, X86_64};
use transport_xen::dataplane::{DataplaneOptions, IoThreads};

struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// Set while the test thread plays the guest.
    static GUEST: Cell<bool> = const { Cell::new(false) };
}

fn count() {
    if !GUEST.try_with(Cell::get).unwrap_or(false) {
        ALLOCATIONS.fetch_add(1, Ordering::SeqCst);
    }
}

// SAFETY: every call is forwarded unchanged to `System`, which upholds the `GlobalAlloc` contract; counting only
// touches an atomic and a const-initialised thread-local, neither of which allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: forwarded unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// On a fresh bed on `pool` (indirect segments advertised when `indirect`): start a data plane, write 32 pages in
/// three requests taken together (three slots), stop. Returns the allocations of everything but the guest.
fn cycle(pool: &IoThreads, indirect: bool) -> usize {
    let mut options = DataplaneOptions::default();
    options.io_threads = Some(pool.clone());
    let max_indirect = if indirect { 256 } else { 0 };
    let config = BedConfig { order: 1, max_indirect, engine: EngineKind::Sync, options, ..BedConfig::default() };
    let mut bed = Bed::<X86_64>::new(config);
    bed.stop();
    let data = pattern(32 * 4096, 5);
    let before = ALLOCATIONS.load(Ordering::SeqCst);
    bed.dp = Some(bed.start().expect("data plane"));
    GUEST.with(|g| g.set(true));
    let (statuses, _) = bed.transfer(0, Some(&data), 0, 256, Shape::Direct);
    GUEST.with(|g| g.set(false));
    bed.stop();
    assert_eq!(statuses, [RSP_OKAY; 3]);
    ALLOCATIONS.load(Ordering::SeqCst) - before
}

#[test]
fn a_pool_thread_gives_the_slots_of_a_stopped_queue_to_the_next() {
    let (plain, spare) = (IoThreads::new(1), IoThreads::with_spare_slots(1, 8));
    for _ in 0..2 {
        cycle(&plain, false);
        cycle(&spare, false);
    }
    assert_eq!((plain.spare_slots(), spare.spare_slots()), (0, 3), "the three slots are kept after stop");
    let (without, with) = (cycle(&plain, false), cycle(&spare, false));
    eprintln!("a start and a stop: {without} allocations, {with} with spare slots");
    // Each slot made is at least its request's segments, the device request's and the page table.
    assert!(with + 3 * 3 <= without, "with spare slots {with} allocations, without {without}");
    // A queue with indirect segments takes the spares (growing them once), and gives them back.
    cycle(&spare, true);
    assert_eq!(spare.spare_slots(), 3);
    let (without, with) = (cycle(&plain, true), cycle(&spare, true));
    assert!(with + 3 * 3 <= without, "indirect: with spare slots {with} allocations, without {without}");
}
