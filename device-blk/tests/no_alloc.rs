// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Once warm, the request path (submit, kick, reap, drain) of both engines allocates nothing.
//!
//! This binary counts every heap allocation with a global allocator and holds a single test, so nothing else
//! allocates while it measures.

// Test arithmetic on small sizes and offsets (all far below 32 bits).
#![allow(clippy::cast_possible_truncation)]

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use device_blk::{BlockQueue, Request, RequestKind, Status};
use vm_memory::GuestMemoryMmap;

/// Counts allocations and reallocations, then defers to the system allocator.
struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded unchanged to `System`, which upholds the `GlobalAlloc` contract.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Submit every request, kick, and drain until all are back; no allocation in here.
fn round(queue: &mut BlockQueue<usize>, mem: &GuestMemoryMmap, requests: &[Request]) -> usize {
    for (i, r) in requests.iter().enumerate() {
        // SAFETY: `mem` outlives the round: everything is drained before returning.
        assert!(unsafe { queue.submit(r, mem, i) }.is_ok());
    }
    queue.submit_batch().expect("kick");
    let (mut finished, mut ok) = (0, 0);
    while finished < requests.len() {
        queue.drain(|f| {
            finished += 1;
            ok += usize::from(f.status == Status::Ok);
        });
        if finished < requests.len() {
            wait_readable(queue.completion_fd(), Duration::from_millis(100));
        }
    }
    ok
}

#[test]
fn the_warm_request_path_does_not_allocate() {
    let dir = tempfile::tempdir().expect("tempdir");
    for kind in ENGINES {
        let disk = open(&image(dir.path(), "disk.img", &pattern(256 * 1024, 1)), false);
        let mut queue = queue(&disk, kind, 16);
        let mem = guest_memory(&pattern(1000, 2));
        let mut requests = Vec::new();
        for i in 0..6u64 {
            let segments: Vec<(u64, u32)> = (0..4).map(|s| (i * 16384 + s * 4096, 4096)).collect();
            let kind = if i % 2 == 0 { RequestKind::Write } else { RequestKind::Read };
            requests.push(data_request(kind, i * 64, &segments));
        }
        // A segment across the two guest memory regions.
        requests.push(data_request(RequestKind::Read, 400, &[(REGION as u64 - 2048, 8192)]));
        requests.push(range_request(RequestKind::Discard { secure: false }, 320, 16));
        requests.push(range_request(RequestKind::WriteZeroes { unmap: false }, 352, 16));
        requests.push(Request::new(RequestKind::Flush));
        requests.push(data_request(RequestKind::GetId, 0, &[(100_000, 20)]));
        // Refused at validation: past the end.
        requests.push(data_request(RequestKind::Read, 1 << 20, &[(0, 512)]));
        for _ in 0..3 {
            assert_eq!(round(&mut queue, &mem, &requests), requests.len() - 1, "{kind:?}: warm-up");
        }
        let before = ALLOCATIONS.load(Ordering::Relaxed);
        assert!(before > 0, "the counter counts (setup allocated)");
        for _ in 0..20 {
            round(&mut queue, &mem, &requests);
        }
        let allocations = ALLOCATIONS.load(Ordering::Relaxed) - before;
        assert_eq!(allocations, 0, "{kind:?}: 20 rounds of {} requests allocated {allocations} times", requests.len());
    }
}
