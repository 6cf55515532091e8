// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What starting and stopping a data plane costs does not follow the ring's depth, only what the frontend uses:
//! in-flight slots (the worker's and the `device-blk` queue's buffers) are made on first use and kept, so a data
//! plane that serves one request at a time on a 512-entry ring allocates as much as one on an 8-entry ring; the
//! indirect-page buffer is made only for a frontend that sends indirect requests; and a data plane on an I/O
//! thread without a stats registry does not make latency histograms that nobody would read.
//!
//! A counting global allocator counts the allocations (and their bytes) of every thread but the test thread while
//! it plays the guest. This binary holds a single test, so nothing else runs while it measures.

mod dataplane_util;

use dataplane_util::{pattern, Bed, BedConfig, Shape};
use device_blk::stats::Registry;
use device_blk::EngineKind;
use test_kit::alloc::Counting;
use transport_xen::blkif::{RSP_OKAY, X86_64};
use transport_xen::dataplane::{DataplaneOptions, IoThreads};

#[global_allocator]
static ALLOCATOR: Counting = Counting::new();

/// A bed on `pool` with a 512-entry ring (indirect segments advertised), at most `depth` requests in flight.
fn bed(pool: &IoThreads, depth: u32, registry: bool) -> Bed<X86_64> {
    let mut options = DataplaneOptions::default();
    options.io_threads = Some(pool.clone());
    options.max_in_flight = depth;
    options.stats = registry.then(Registry::new);
    let config = BedConfig { order: 4, max_indirect: 256, engine: EngineKind::Sync, options, ..BedConfig::default() };
    let mut bed = Bed::<X86_64>::new(config);
    // Warm up: the pool thread and the emulated host's tables exist and have their capacity.
    bed.stop();
    for _ in 0..2 {
        cycle(&mut bed);
    }
    bed
}

/// Start a data plane, write and read back 4 pages (one request at a time), stop: the allocations and bytes
/// allocated by everything but the guest.
fn cycle(bed: &mut Bed<X86_64>) -> (usize, usize) {
    let data = pattern(4 * 4096, 3);
    let before = (ALLOCATOR.allocations(), ALLOCATOR.bytes());
    bed.dp = Some(bed.restart().expect("data plane"));
    let ((written, _), (read, back)) = ALLOCATOR.uncounted(|| {
        (bed.transfer(0, Some(&data), 0, 32, Shape::Direct), bed.transfer(0, None, 0, 32, Shape::Direct))
    });
    bed.stop();
    assert_eq!((written, read), (vec![RSP_OKAY], vec![RSP_OKAY]));
    assert!(back == data, "the data came back");
    (ALLOCATOR.allocations() - before.0, ALLOCATOR.bytes() - before.1)
}

#[test]
fn start_and_stop_cost_what_the_frontend_uses_not_the_ring_depth() {
    let pool = IoThreads::new(1);
    let (mut shallow, mut deep, mut reported) = (bed(&pool, 8, false), bed(&pool, 512, false), bed(&pool, 8, true));
    let (few, few_bytes) = cycle(&mut shallow);
    let (many, many_bytes) = cycle(&mut deep);
    let (with_registry, with_registry_bytes) = cycle(&mut reported);
    eprintln!(
        "depth 8: {few} allocations ({few_bytes} bytes); depth 512: {many} ({many_bytes}); \
         with a registry: {with_registry} ({with_registry_bytes})"
    );
    // Eagerly made slots cost 5 allocations each (the worker's request, device request and page table, the
    // queue's iovecs and read log): 2500 more at depth 512.
    assert!(many <= few + 4, "depth 512 made {many} allocations, depth 8 {few}: slots made up front");
    // No 32 KiB indirect-page buffer for a frontend that sends none, no histograms nobody reads (5 x 8 KiB), no
    // 4 KiB device request per slot for requests of at most 11 segments.
    assert!(few_bytes < 32 * 1024, "a data plane serving one direct request allocated {few_bytes} bytes");
    assert!(
        with_registry_bytes >= few_bytes + 5 * 8 * 1024,
        "with a registry the queue has histograms of its own ({with_registry_bytes} vs {few_bytes} bytes)"
    );
}
