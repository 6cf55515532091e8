// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Dirty-page logging for live migration: every byte the device writes into guest memory sets the dirty bit of
//! its page in the memory's bitmap (here vm-memory's `AtomicBitmap`), and nothing else does.
//!
//! Read data lands through host pointers behind vm-memory's back, so the queue marks it itself when the read
//! completes ([`BlockQueue::drain_logged`]); GET_ID strings go through vm-memory, which marks them.

// Test addresses are a few pages (far below 32 bits).
#![allow(clippy::cast_possible_truncation)]

mod common;

use std::sync::Arc;

use common::*;
use device_blk::{BlockQueue, Finished, Request, RequestKind, Status};
use vm_memory::bitmap::{AtomicBitmap, Bitmap};
use vm_memory::mmap::MmapRegion;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

type Mem = GuestMemoryMmap<AtomicBitmap>;

const PAGE: u64 = 4096;

/// Each request's memory travels in its cookie, as a transport's memory snapshot does.
struct Cookie {
    id: usize,
    mem: Arc<Mem>,
}

fn cookie_memory(cookie: &Cookie) -> &Mem {
    &cookie.mem
}

/// Two adjacent 64 KiB regions (a segment can span both), zeroed, with every bit clear.
fn bitmap_memory() -> Arc<Mem> {
    let mem =
        Mem::from_ranges(&[(GuestAddress(0), REGION), (GuestAddress(REGION as u64), REGION)]).expect("guest memory");
    Arc::new(mem)
}

/// The guest pages whose dirty bit is set.
fn dirty_pages(mem: &Mem) -> Vec<u64> {
    (0..GUEST_BYTES as u64 / PAGE)
        .filter(|&page| {
            let addr = GuestAddress(page * PAGE);
            mem.find_region(addr).is_some_and(|r| r.bitmap().dirty_at((addr.0 - r.start_addr().0) as usize))
        })
        .collect()
}

/// Submit `requests` (cookie = index) as one batch and drain them with logging, in cookie order.
fn run_logged(queue: &mut BlockQueue<Cookie>, mem: &Arc<Mem>, requests: &[Request]) -> Vec<Finished<Cookie>> {
    for (id, r) in requests.iter().enumerate() {
        // SAFETY: each cookie holds an `Arc` of `mem`, which stays mapped until the cookie is drained.
        let submitted = unsafe { queue.submit(r, &**mem, Cookie { id, mem: Arc::clone(mem) }) };
        assert!(submitted.is_ok(), "queue full at request {id}");
    }
    queue.submit_batch().expect("kick");
    let mut done = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while done.len() < requests.len() {
        queue.drain_logged(true, cookie_memory, |f| done.push(f));
        assert!(std::time::Instant::now() < deadline, "requests did not finish");
        wait_readable(queue.completion_fd(), std::time::Duration::from_millis(50));
    }
    done.sort_by_key(|f| f.cookie.id);
    done
}

#[test]
fn reads_and_get_id_dirty_exactly_the_pages_they_write() {
    let dir = tempfile::tempdir().expect("temp dir");
    let disk = open(&image(dir.path(), "disk.img", &pattern(1 << 20, 3)), false);
    for kind in ENGINES {
        let mem = bitmap_memory();
        let mut queue: BlockQueue<Cookie> = queue(&disk, kind, 16).log_reads();
        let requests = [
            // 8 KiB into pages 2 and 3.
            data_request(RequestKind::Read, 0, &[(2 * PAGE, 8192)]),
            // Two segments, the second across the region boundary (pages 15 and 16) in two host mappings.
            data_request(RequestKind::Read, 64, &[(5 * PAGE, 4096), (15 * PAGE, 8192)]),
            // 512 bytes into the middle of page 20: the whole page is dirty.
            data_request(RequestKind::Read, 200, &[(20 * PAGE + 1024, 512)]),
            // A write's source pages are only read: never dirty.
            data_request(RequestKind::Write, 300, &[(8 * PAGE, 8192)]),
            // GET_ID into page 25 (through vm-memory's `Bytes`).
            data_request(RequestKind::GetId, 0, &[(25 * PAGE + 8, 20)]),
            // A read refused before any I/O (past the end of the disk) writes nothing.
            data_request(RequestKind::Read, 1 << 20, &[(28 * PAGE, 4096)]),
        ];
        let done = run_logged(&mut queue, &mem, &requests);
        let statuses: Vec<Status> = done.iter().map(|f| f.status).collect();
        assert_eq!(statuses, [Status::Ok, Status::Ok, Status::Ok, Status::Ok, Status::Ok, Status::IoError], "{kind:?}");
        assert_eq!(dirty_pages(&mem), [2, 3, 5, 15, 16, 20, 25], "{kind:?}: dirty pages");

        // The data really landed where the dirty bits say.
        let mut page2 = vec![0u8; 8192];
        mem.read_slice(&mut page2, GuestAddress(2 * PAGE)).expect("read back");
        assert_eq!(page2, pattern(1 << 20, 3)[..8192], "{kind:?}");
    }
}

#[test]
fn a_pass_between_submission_and_completion_does_not_lose_the_read() {
    // A migrating VMM copies the dirty pages and clears their bits while requests are in flight. A read whose
    // page was copied (and its bit cleared) before its data landed must leave the bit set again, or the last
    // pass skips the page and the destination keeps the stale data: the mark comes when the read completes.
    let dir = tempfile::tempdir().expect("temp dir");
    let disk = open(&image(dir.path(), "disk.img", &pattern(1 << 20, 5)), false);
    for kind in ENGINES {
        let mem = bitmap_memory();
        let mut queue: BlockQueue<Cookie> = queue(&disk, kind, 4).log_reads();
        let read = data_request(RequestKind::Read, 8, &[(6 * PAGE, 8192)]);
        // SAFETY: the cookie holds an `Arc` of `mem`, which stays mapped until the cookie is drained.
        let submitted = unsafe { queue.submit(&read, &*mem, Cookie { id: 0, mem: Arc::clone(&mem) }) };
        assert!(submitted.is_ok());
        queue.submit_batch().expect("kick");
        // The VMM's pass: copy, then clear every bit.
        for region in mem.iter() {
            MmapRegion::bitmap(region).reset();
        }
        let mut done = Vec::new();
        while done.is_empty() {
            queue.drain_logged(true, cookie_memory, |f| done.push(f));
            wait_readable(queue.completion_fd(), std::time::Duration::from_millis(50));
        }
        assert_eq!(done[0].status, Status::Ok, "{kind:?}");
        assert_eq!(dirty_pages(&mem), [6, 7], "{kind:?}: the completed read is dirty after the pass");
    }
}
