// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Disk errors through the whole per-queue pipeline: a [`BlockQueue`] over a [`FaultyEngine`] wrapping the real
//! engines on a real file. Every injected failure comes out as an I/O error status (never `Ok`), only the chosen
//! request fails, the queue keeps serving afterwards, and a polling event loop sees injected completions.

// Offsets and counts of these small images fit in any integer.
#![allow(clippy::cast_possible_truncation)]

mod common;

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::*;
use device_blk::engine::fault::{FaultPlan, FaultPoint, FaultRule, OpKind};
use device_blk::{BlockQueue, Disk, EngineKind, Finished, Request, RequestError, RequestKind, Status};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const BLOCK: usize = 4096;
const BLOCKS: usize = 16;

/// A queue over `disk` whose engine (of `kind`) follows `plan`.
fn faulty_queue(disk: &Arc<Disk>, kind: EngineKind, depth: u32, plan: &FaultPlan) -> BlockQueue<usize> {
    let engine = kind.build(disk.clone(), depth).expect("engine");
    BlockQueue::new(*disk.geometry(), SERIAL, plan.wrap(engine))
}

fn outcome(done: &[Finished<usize>]) -> Vec<(Status, Option<RequestError>)> {
    done.iter().map(|f| (f.status, f.error.clone())).collect()
}

fn io(errno: i32) -> (Status, Option<RequestError>) {
    (Status::IoError, Some(RequestError::Io { errno }))
}

const OK: (Status, Option<RequestError>) = (Status::Ok, None);

fn flush() -> Request {
    Request::new(RequestKind::Flush)
}

/// Block `i` of guest memory as a one-block request of `kind` at disk block `block`.
fn block_request(kind: RequestKind, block: usize, at: usize) -> Request {
    data_request(kind, (block * BLOCK / 512) as u64, &[((at * BLOCK) as u64, BLOCK as u32)])
}

#[test]
fn failed_reads_writes_and_flushes_are_io_errors_and_the_queue_keeps_serving() {
    let dir = tempfile::tempdir().expect("tempdir");
    let content = pattern(BLOCKS * BLOCK, 3);
    for kind in ENGINES {
        let path = image(dir.path(), "disk.img", &content);
        let disk = open(&path, false);
        let plan = FaultPlan::new();
        let mut q = faulty_queue(&disk, kind, 8, &plan);
        let mem = guest_memory(&[0x77]);
        let write = block_request(RequestKind::Write, 2, 0);
        let read = block_request(RequestKind::Read, 5, 1);
        let range = |kind| range_request(kind, 8, 8);
        let requests = [
            write.clone(),
            read.clone(),
            flush(),
            range(RequestKind::Discard { secure: false }),
            range(RequestKind::WriteZeroes { unmap: false }),
        ];
        for (errno, point) in [(libc::EIO, FaultPoint::Refuse), (libc::ENOSPC, FaultPoint::Complete)] {
            let rule = plan.add(FaultRule::new(errno).at(point));
            let done = run_batch(&mut q, &mem, &requests);
            assert_eq!(outcome(&done), vec![io(errno); 5], "{kind:?} {point:?}");
            assert!(done.iter().all(|f| f.bytes_to_guest == 0), "{kind:?} {point:?}: nothing reported read");
            assert_eq!(plan.injected(rule), 5);
            assert!(plan.remove(rule));
        }
        // The refused write never reached the disk; the late-failed one did (a device may fail after writing).
        let file = std::fs::read(&path).expect("image");
        assert_eq!(&file[2 * BLOCK..3 * BLOCK], &guest_bytes(&mem)[..BLOCK], "{kind:?}: the late failure wrote");

        // The same queue serves normally once the disk behaves.
        let good_write = block_request(RequestKind::Write, 3, 0);
        let done = run_batch(&mut q, &mem, &[good_write, read, flush()]);
        assert_eq!(outcome(&done), [OK, OK, OK], "{kind:?}: the queue recovered");
        assert_eq!(&guest_bytes(&mem)[BLOCK..2 * BLOCK], &content[5 * BLOCK..6 * BLOCK], "{kind:?}: read data");
        assert_eq!(q.in_flight(), 0);
    }
}

#[test]
fn an_injected_error_fails_only_its_own_request_in_a_batch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let content = pattern(BLOCKS * BLOCK, 9);
    for kind in ENGINES {
        let path = image(dir.path(), "disk.img", &content);
        let disk = open(&path, false);
        let plan = FaultPlan::new();
        // The write to block 4 is refused; the read of block 9 is carried out and then reported failed.
        plan.add(FaultRule::new(libc::EIO).on(OpKind::Write).range(4 * BLOCK as u64..5 * BLOCK as u64));
        plan.add(
            FaultRule::new(libc::EIO)
                .on(OpKind::Read)
                .range(9 * BLOCK as u64..9 * BLOCK as u64 + 1)
                .at(FaultPoint::Complete),
        );
        let mut q = faulty_queue(&disk, kind, 16, &plan);
        let mem = guest_memory(&[0x5a]);
        // Blocks 0..8 written from guest blocks 0..8 (guest block i holds 0x5a), blocks 8..12 read into 8..12.
        let mut batch: Vec<Request> = (0..8).map(|b| block_request(RequestKind::Write, b, b)).collect();
        batch.extend((8..12).map(|b| block_request(RequestKind::Read, b, b)));
        let done = run_batch(&mut q, &mem, &batch);
        for f in &done {
            let expected = if f.cookie == 4 || f.cookie == 9 { io(libc::EIO) } else { OK };
            assert_eq!((f.status, f.error.clone()), expected, "{kind:?}: request {}", f.cookie);
        }
        let file = std::fs::read(&path).expect("image");
        let guest = guest_bytes(&mem);
        for b in 0..8 {
            let block = &file[b * BLOCK..(b + 1) * BLOCK];
            if b == 4 {
                assert_eq!(block, &content[b * BLOCK..(b + 1) * BLOCK], "{kind:?}: the refused write left the disk");
            } else {
                assert!(block.iter().all(|&x| x == 0x5a), "{kind:?}: block {b} was written");
            }
        }
        for b in [8, 10, 11] {
            assert_eq!(&guest[b * BLOCK..(b + 1) * BLOCK], &content[b * BLOCK..(b + 1) * BLOCK], "{kind:?}: read {b}");
        }
    }
}

#[test]
fn every_nth_write_fails_under_load_and_the_disk_holds_exactly_the_acknowledged_writes() {
    let dir = tempfile::tempdir().expect("tempdir");
    for kind in ENGINES {
        let path = image(dir.path(), "disk.img", &vec![0u8; BLOCKS * BLOCK]);
        let disk = open(&path, false);
        let plan = FaultPlan::new();
        let rule = plan.add(FaultRule::new(libc::EIO).on(OpKind::Write).every(7));
        let mut q = faulty_queue(&disk, kind, 32, &plan);
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 * BLOCK)]).expect("guest memory");
        // Four rounds of 16 writes, one per disk block, each carrying its round and block number.
        let mut model = vec![0u8; BLOCKS * BLOCK];
        let mut failed = 0;
        for round in 1..=4u8 {
            let batch: Vec<Request> = (0..BLOCKS)
                .map(|b| {
                    let at = (usize::from(round) % 4) * BLOCKS + b;
                    mem.write_slice(&[round * 16 + b as u8; BLOCK], GuestAddress((at * BLOCK) as u64)).expect("fill");
                    block_request(RequestKind::Write, b, at)
                })
                .collect();
            for f in run_batch(&mut q, &mem, &batch) {
                match f.status {
                    Status::Ok => model[f.cookie * BLOCK..(f.cookie + 1) * BLOCK].fill(round * 16 + f.cookie as u8),
                    status => {
                        assert_eq!((status, f.error), io(libc::EIO), "{kind:?}");
                        failed += 1;
                    }
                }
            }
        }
        assert_eq!(failed, 64 / 7, "{kind:?}: every seventh write failed");
        assert_eq!(plan.injected(rule), failed);
        assert_eq!(std::fs::read(&path).expect("image"), model, "{kind:?}: the disk holds what was acknowledged");
    }
}

#[test]
fn a_polling_loop_sees_injected_completions_without_waiting_on_the_eventfd() {
    let dir = tempfile::tempdir().expect("tempdir");
    for kind in ENGINES {
        let disk = open(&image(dir.path(), "disk.img", &pattern(BLOCKS * BLOCK, 1)), false);
        let plan = FaultPlan::new();
        plan.add(FaultRule::new(libc::EIO).on(OpKind::Flush).every(2));
        let mut q = faulty_queue(&disk, kind, 8, &plan);
        let mem = guest_memory(&[]);
        let mut got = Vec::new();
        for round in 0..4usize {
            // SAFETY: `mem` outlives the requests: each round is drained before the next.
            assert!(unsafe { q.submit(&flush(), &mem, round) }.is_ok());
            q.submit_batch().expect("kick");
            let deadline = Instant::now() + Duration::from_secs(10);
            let before = got.len();
            while got.len() == before {
                assert!(Instant::now() < deadline, "{kind:?}: round {round} never finished");
                // As a poller does: look without a system call, reap what is ready, clear the signal only to sleep.
                if q.has_finished() {
                    q.drain_ready(|f| got.push((f.cookie, f.status)));
                } else {
                    q.clear_completion_signal();
                    if !q.has_finished() {
                        wait_readable(q.completion_fd(), Duration::from_millis(100));
                    }
                }
            }
        }
        let expected = [(0, Status::Ok), (1, Status::IoError), (2, Status::Ok), (3, Status::IoError)];
        assert_eq!(got, expected, "{kind:?}");
    }
}

#[test]
fn one_plan_steers_queues_on_several_threads() {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = open(&image(dir.path(), "disk.img", &pattern(BLOCKS * BLOCK, 4)), false);
    let plan = FaultPlan::new();
    let rule = plan.add(FaultRule::new(libc::EIO).on(OpKind::Read));
    // Both queues failed their reads / the plan was cleared.
    let (failed, cleared) = (Arc::new(Barrier::new(3)), Arc::new(Barrier::new(3)));
    let threads: Vec<_> = ENGINES
        .into_iter()
        .map(|kind| {
            let (disk, plan, failed, cleared) = (disk.clone(), plan.clone(), failed.clone(), cleared.clone());
            // An io_uring queue stays on the thread that first submitted.
            std::thread::spawn(move || {
                let mut q = faulty_queue(&disk, kind, 8, &plan);
                let mem = guest_memory(&[]);
                let reads: Vec<Request> = (0..8).map(|b| block_request(RequestKind::Read, b, b % 2)).collect();
                let done = run_batch(&mut q, &mem, &reads);
                failed.wait();
                cleared.wait();
                let after = run_one(&mut q, &mem, &block_request(RequestKind::Read, 1, 0));
                (kind, outcome(&done), after.status)
            })
        })
        .collect();
    failed.wait();
    assert_eq!(plan.injected(rule), 16, "both queues counted in the shared plan");
    plan.clear();
    cleared.wait();
    for t in threads {
        let (kind, before, after) = t.join().expect("queue thread");
        assert_eq!(before, vec![io(libc::EIO); 8], "{kind:?}: every read failed");
        assert_eq!(after, Status::Ok, "{kind:?}: the rule is gone for every queue");
    }
}

#[test]
fn an_injected_eopnotsupp_is_unsupported_and_other_errnos_are_io_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = open(&image(dir.path(), "disk.img", &pattern(BLOCKS * BLOCK, 2)), false);
    let plan = FaultPlan::new();
    let mut q = faulty_queue(&disk, EngineKind::IoUring, 8, &plan);
    let mem = guest_memory(&[]);
    let discard = range_request(RequestKind::Discard { secure: false }, 0, 8);
    for errno in [libc::EOPNOTSUPP, libc::EIO, libc::ENOSPC, libc::EROFS, libc::EAGAIN, libc::EINTR, libc::EPERM] {
        let rule = plan.add(FaultRule::new(errno).once());
        let done = run_one(&mut q, &mem, &discard);
        let status = if errno == libc::EOPNOTSUPP { Status::Unsupported } else { Status::IoError };
        assert_eq!((done.status, done.error), (status, Some(RequestError::Io { errno })), "errno {errno}");
        assert_eq!(plan.injected(rule), 1);
    }
    assert_eq!(run_one(&mut q, &mem, &discard).status, Status::Ok, "every rule was used up");
}
