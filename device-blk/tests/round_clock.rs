// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `BlockQueue::begin_round` / `end_round`: the submissions and drains of one round of a transport's event loop
//! share one clock read for their latency figures (in a Xen PV dom0 each read is a system call), and a round's
//! reading is not used once the round ended.

use std::sync::Arc;
use std::time::{Duration, Instant};

use device_blk::stats::OpClass;
use device_blk::{BlockQueue, Disk, DiskOptions, EngineKind, Request, RequestKind, Sector, Segment, Status};
use vm_memory::{GuestAddress, GuestMemoryMmap};

type Mem = GuestMemoryMmap<()>;

/// Time the read below surely takes to complete, and the least latency measured across it.
const PAUSE: Duration = Duration::from_millis(30);

struct Bed {
    _dir: tempfile::TempDir,
    queue: BlockQueue<u32>,
    mem: Mem,
    read: Request,
}

fn bed() -> Bed {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("disk.img");
    std::fs::write(&path, vec![7u8; 1 << 16]).expect("write image");
    let disk = Arc::new(Disk::open(&path, &DiskOptions::default()).expect("open"));
    let engine = EngineKind::Auto.build(disk.clone(), 8).expect("engine");
    let queue = BlockQueue::new(*disk.geometry(), [0; 20], engine);
    let mem = Mem::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("guest memory");
    let mut read = Request::with_capacity();
    read.reset(RequestKind::Read, Sector(8));
    read.segments.push(Segment { addr: GuestAddress(0x4000), len: 4096 });
    Bed { _dir: dir, queue, mem, read }
}

impl Bed {
    fn submit(&mut self) {
        // SAFETY: `self.mem` outlives the queue's use of it (drained below before the bed goes).
        assert!(unsafe { self.queue.submit(&self.read, &self.mem, 1) }.is_ok(), "a free slot");
        self.queue.submit_batch().expect("submit");
    }

    /// Drain until the read is back (the caller paused long enough for it to be complete already).
    fn drain(&mut self) {
        let mut done = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while done.is_empty() {
            assert!(Instant::now() < deadline, "the read never completed");
            self.queue.drain(|f| done.push(f));
        }
        assert_eq!(done[0].status, Status::Ok);
    }

    fn latency_sum(&self) -> Duration {
        self.queue.stats().latency(OpClass::Read).sum()
    }
}

#[test]
fn outside_a_round_each_submit_and_drain_reads_the_clock() {
    let mut bed = bed();
    bed.submit();
    std::thread::sleep(PAUSE);
    bed.drain();
    assert!(bed.latency_sum() >= PAUSE, "latency {:?}: measured across the pause", bed.latency_sum());
}

#[test]
fn inside_a_round_submit_and_drain_share_one_clock_read() {
    let mut bed = bed();
    bed.queue.begin_round();
    bed.submit();
    std::thread::sleep(PAUSE);
    bed.drain();
    bed.queue.end_round();
    // Started and reaped at the round's one reading.
    assert_eq!(bed.latency_sum(), Duration::ZERO);
}

#[test]
fn a_later_round_reads_the_clock_again() {
    let mut bed = bed();
    bed.queue.begin_round();
    bed.submit();
    bed.queue.end_round();
    std::thread::sleep(PAUSE);
    bed.queue.begin_round();
    bed.drain();
    bed.queue.end_round();
    assert!(bed.latency_sum() >= PAUSE, "latency {:?}: the first round's reading was reused", bed.latency_sum());
}
