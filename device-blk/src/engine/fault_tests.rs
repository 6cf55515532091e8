// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Tests of the fault-injection engine (`fault.rs`).

// Offsets of these small images fit in any integer.
#![allow(clippy::cast_possible_truncation)]

use std::time::{Duration, Instant};

use super::*;
use crate::disk::{DirectIo, Disk, DiskOptions};
use crate::engine::{SyncEngine, UringEngine};

const BLOCK: usize = 4096;
const EIO: Result<u64, i32> = Err(libc::EIO);

fn iov(buf: &mut [u8]) -> libc::iovec {
    libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() }
}

fn read(offset: u64, iovecs: &[libc::iovec]) -> IoOp<'_> {
    IoOp::Read { offset, iovecs }
}

#[test]
fn rules_pick_operations_by_kind_range_count_and_times() {
    let mut buf = [0u8; 1024];
    let one = [iov(&mut buf)];
    let plan = FaultPlan::new();
    let writes = plan.add(FaultRule::new(libc::EIO).on(OpKind::Write).on(OpKind::Discard).range(4096..8192));
    let third_flush = plan.add(FaultRule::new(libc::ENOSPC).on(OpKind::Flush).every(3).once());
    let write = |offset| IoOp::Write { offset, iovecs: &one };
    let fault = |errno| Some(Fault { errno, point: FaultPoint::Refuse });

    assert_eq!(plan.decide(&write(3072)), None, "[3072, 4096) ends where the range starts");
    assert_eq!(plan.decide(&write(3073)), fault(libc::EIO), "one byte inside");
    assert_eq!(plan.decide(&write(8191)), fault(libc::EIO));
    assert_eq!(plan.decide(&write(8192)), None, "past the range");
    assert_eq!(plan.decide(&read(5000, &one)), None, "reads are not chosen");
    assert_eq!(plan.decide(&IoOp::Discard { offset: 0, len: 4097, secure: false }), fault(libc::EIO));
    assert_eq!(plan.decide(&IoOp::WriteZeroes { offset: 4096, len: 512, unmap: true }), None);
    assert_eq!((plan.matched(writes), plan.injected(writes)), (3, 3));

    let flushes: Vec<_> = (0..7).map(|_| plan.decide(&IoOp::Flush)).collect();
    assert_eq!(flushes, [None, None, fault(libc::ENOSPC), None, None, None, None], "the third, once");
    assert_eq!((plan.matched(third_flush), plan.injected(third_flush)), (7, 1));
    assert_eq!(plan.total_injected(), 4);

    // The first rule that fires wins; every matching rule counts the operation.
    let plan = FaultPlan::new();
    let every_other = plan.add(FaultRule::new(libc::EIO).every(2).at(FaultPoint::Complete));
    let all = plan.add(FaultRule::new(libc::EROFS).on(OpKind::Read));
    let got: Vec<_> = (0..4).map(|_| plan.decide(&read(0, &one)).map(|f| (f.errno, f.point))).collect();
    let (eio, erofs) = ((libc::EIO, FaultPoint::Complete), (libc::EROFS, FaultPoint::Refuse));
    assert_eq!(got, [Some(erofs), Some(eio), Some(erofs), Some(eio)]);
    assert_eq!((plan.injected(every_other), plan.injected(all), plan.matched(all)), (2, 2, 4));
    assert!(plan.remove(all) && !plan.remove(all));
    assert_eq!((plan.injected(all), plan.total_injected()), (0, 4), "removed rules keep the total");
    plan.clear();
    assert_eq!(plan.decide(&read(0, &one)), None, "an empty plan fails nothing");
}

/// A file of `blocks` blocks, block `i` filled with byte `i`, opened buffered (no alignment to care about).
fn disk(dir: &std::path::Path, blocks: usize) -> (std::path::PathBuf, Arc<Disk>) {
    let path = dir.join("disk.img");
    let data: Vec<u8> = (0..blocks * BLOCK).map(|i| (i / BLOCK) as u8).collect();
    std::fs::write(&path, data).expect("write image");
    let options = DiskOptions { direct_io: DirectIo::Off, ..DiskOptions::default() };
    let disk = Arc::new(Disk::open(&path, &options).expect("open image"));
    (path, disk)
}

fn engines(disk: &Arc<Disk>, depth: u32) -> Vec<Box<dyn IoEngine>> {
    vec![
        Box::new(SyncEngine::new(disk.clone(), depth).expect("sync engine")),
        Box::new(UringEngine::new(disk.clone(), depth).expect("io_uring engine")),
    ]
}

fn readable(fd: RawFd, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut pfd, 1, ms) == 1 }
}

/// Wait on the completion eventfd, as an event loop does, and reap until `count` completions came; sorted by
/// token.
fn wait_for(engine: &mut dyn IoEngine, count: usize) -> Vec<(u64, Result<u64, i32>)> {
    let mut done = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while done.len() < count {
        assert!(Instant::now() < deadline, "{} of {count} completions", done.len());
        if readable(engine.completion_fd(), Duration::from_millis(100)) {
            engine.reap(&mut |c| done.push((c.token, c.result)));
        }
    }
    done.sort_by_key(|&(token, _)| token);
    done
}

#[test]
fn injected_failures_complete_through_the_eventfd_and_spare_the_rest_of_the_batch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (path, disk) = disk(dir.path(), 8);
    for inner in engines(&disk, 8) {
        let name = inner.name();
        let plan = FaultPlan::new();
        let refuse = plan.add(FaultRule::new(libc::EIO).on(OpKind::Write).range(4096..8192));
        let late = plan.add(FaultRule::new(libc::ENOSPC).on(OpKind::Write).range(8192..12288).at(FaultPoint::Complete));
        plan.add(FaultRule::new(libc::EIO).on(OpKind::Flush).once());
        let mut engine = FaultyEngine::new(inner, plan.clone());
        let mut bufs = [[0xa0u8; BLOCK], [0xa1; BLOCK], [0xa2; BLOCK], [0xa3; BLOCK], [0; BLOCK]];
        let iovecs: Vec<libc::iovec> = bufs.iter_mut().map(|b| iov(b)).collect();
        let ops = [
            IoOp::Write { offset: 0, iovecs: &iovecs[0..1] },
            IoOp::Write { offset: 4096, iovecs: &iovecs[1..2] },
            IoOp::Write { offset: 8192, iovecs: &iovecs[2..3] },
            IoOp::Write { offset: 12288, iovecs: &iovecs[3..4] },
            read(16384, &iovecs[4..5]),
            IoOp::Flush,
        ];
        for (token, op) in ops.into_iter().enumerate() {
            // SAFETY: the buffers and `iovecs` outlive the engine's use: everything is reaped below.
            unsafe { engine.enqueue(op, token as u64) }.expect("enqueue");
        }
        engine.submit().expect("submit");
        let done = wait_for(&mut engine, 6);
        let expected = [(0, Ok(4096)), (1, EIO), (2, Err(libc::ENOSPC)), (3, Ok(4096)), (4, Ok(4096)), (5, EIO)];
        assert_eq!(done, expected, "{name}");
        assert_eq!(engine.in_flight(), 0, "{name}");
        assert!(bufs[4].iter().all(|&b| b == 4), "{name}: the read in the same batch got its data");
        let file = std::fs::read(&path).expect("read image");
        let block = |i: usize| &file[i * BLOCK..(i + 1) * BLOCK];
        assert!(block(0).iter().all(|&b| b == 0xa0), "{name}: write 0 reached the disk");
        assert!(block(1).iter().all(|&b| b == 1), "{name}: the refused write never reached the disk");
        assert!(block(2).iter().all(|&b| b == 0xa2), "{name}: the write failed late had reached the disk");
        assert!(block(3).iter().all(|&b| b == 0xa3), "{name}: write 3 reached the disk");
        assert_eq!((plan.injected(refuse), plan.injected(late), plan.total_injected()), (1, 1, 3), "{name}");

        // Without rules the same engine carries on normally.
        plan.clear();
        // SAFETY: as above.
        unsafe { engine.enqueue(IoOp::Write { offset: 4096, iovecs: &iovecs[1..2] }, 7) }.expect("enqueue");
        // SAFETY: no buffers.
        unsafe { engine.enqueue(IoOp::Flush, 8) }.expect("enqueue");
        engine.submit().expect("submit");
        assert_eq!(wait_for(&mut engine, 2), [(7, Ok(4096)), (8, Ok(0))], "{name}");
        std::fs::write(&path, (0..8 * BLOCK).map(|i| (i / BLOCK) as u8).collect::<Vec<_>>()).expect("reset");
    }
}

#[test]
fn pollers_see_refused_operations_and_capacity_counts_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_path, disk) = disk(dir.path(), 4);
    for inner in engines(&disk, 2) {
        let name = inner.name();
        let plan = FaultPlan::new();
        plan.add(FaultRule::new(libc::EIO).on(OpKind::Flush));
        let mut engine = FaultyEngine::new(inner, plan);
        assert_eq!(engine.capacity(), 2);
        for token in 0..2 {
            // SAFETY: a flush names no memory.
            unsafe { engine.enqueue(IoOp::Flush, token) }.expect("enqueue");
        }
        // SAFETY: as above.
        let full = unsafe { engine.enqueue(IoOp::Flush, 9) };
        assert!(matches!(full, Err(EngineError::Full(2))), "{name}: {full:?}");
        assert_eq!(engine.in_flight(), 2);
        assert!(engine.has_completions(), "{name}: seen without a system call");
        engine.submit().expect("submit");
        assert!(readable(engine.completion_fd(), Duration::ZERO), "{name}: a sleeper would wake up");

        let mut got = Vec::new();
        engine.reap_ready(&mut |c| got.push((c.token, c.result)));
        assert_eq!(got, [(0, EIO), (1, EIO)], "{name}");
        engine.clear_completion_signal();
        assert!(!readable(engine.completion_fd(), Duration::ZERO), "{name}: cleared");
        assert!(!engine.has_completions() && engine.in_flight() == 0, "{name}");
    }
}
