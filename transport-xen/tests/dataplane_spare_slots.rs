// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! An I/O thread pool that keeps spare slots (`IoThreads::with_spare_slots`) gives the slots of a stopped queue to
//! the next queue it starts: a data plane started after another stopped makes none of the slots (request, device
//! request, page table) its predecessor made, whatever their sizes; without spares each start makes them anew.
//!
//! A counting global allocator counts the allocations of every thread but the test thread while it plays the
//! guest. This binary holds a single test, so nothing else runs while it measures.

mod dataplane_util;

use dataplane_util::{pattern, Bed, BedConfig, Shape};
use device_blk::EngineKind;
use test_kit::alloc::Counting;
use transport_xen::blkif::{RSP_OKAY, X86_64};
use transport_xen::dataplane::{DataplaneOptions, IoThreads};

#[global_allocator]
static ALLOCATOR: Counting = Counting::new();

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
    let before = ALLOCATOR.allocations();
    bed.dp = Some(bed.restart().expect("data plane"));
    let (statuses, _) = ALLOCATOR.uncounted(|| bed.transfer(0, Some(&data), 0, 256, Shape::Direct));
    bed.stop();
    assert_eq!(statuses, [RSP_OKAY; 3]);
    ALLOCATOR.allocations() - before
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
