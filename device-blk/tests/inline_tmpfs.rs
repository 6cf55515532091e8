// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A small read of a file on tmpfs, or a small write that finds the io_uring idle, runs inline on the calling thread
//! (no worker-thread hand-over); overlapping writes, large transfers, and any on a file over a block layer go
//! through the ring. Run inline, an operation has finished when `enqueue` returns: before any submission, a reap
//! hands it over.

use std::os::fd::RawFd;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use device_blk::disk::DirectIo;
use device_blk::engine::{Batching, SharedUring, UringEngine};
use device_blk::{Completion, Disk, DiskOptions, IoEngine, IoOp};

const BLOCK: usize = 4096;

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| u8::try_from(i * 13 % 251).unwrap_or(0)).collect()
}

fn disk_in(dir: &Path) -> Arc<Disk> {
    let path = dir.join("disk.img");
    std::fs::write(&path, pattern(1 << 20)).expect("image");
    Arc::new(Disk::open(&path, &DiskOptions::default().with_direct_io(DirectIo::Off)).expect("disk"))
}

fn tmpfs_disk() -> (tempfile::TempDir, Arc<Disk>) {
    let dir = tempfile::tempdir_in("/dev/shm").expect("a directory on /dev/shm (tmpfs)");
    let disk = disk_in(dir.path());
    assert!(disk.in_memory(), "a file on /dev/shm is in memory");
    (dir, disk)
}

fn iovec(buf: &mut [u8]) -> libc::iovec {
    libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() }
}

fn wait_readable(fd: RawFd) {
    let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut pfd, 1, 100) };
}

/// Reap until `count` completions came, submitting and waiting on the completion eventfd as a transport does.
fn collect(engine: &mut dyn IoEngine, count: usize) -> Vec<Completion> {
    let mut done = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while done.len() < count {
        assert!(Instant::now() < deadline, "only {} of {count} operations completed", done.len());
        engine.submit().expect("submit");
        engine.reap(&mut |c| done.push(c));
        if done.len() < count {
            wait_readable(engine.completion_fd());
        }
    }
    done
}

#[test]
fn small_reads_on_tmpfs_run_inline_and_only_a_write_alone_does() {
    let (_dir, disk) = tmpfs_disk();
    let image = pattern(1 << 20);
    let mut engine = UringEngine::new(disk.clone(), 8).expect("io_uring");

    // Alone on an idle ring: finished before anything is submitted.
    let mut buf = vec![0u8; BLOCK];
    let iov = [iovec(&mut buf)];
    // SAFETY: `buf` and `iov` outlive the operation, which is reaped below.
    unsafe { engine.enqueue(IoOp::Read { offset: 3 * BLOCK as u64, iovecs: &iov }, 1) }.expect("enqueue");
    assert_eq!(engine.inline_ops(), 1, "a lone 4 KiB read of a tmpfs file runs inline");
    let mut done = Vec::new();
    engine.reap_ready(&mut |c| done.push(c));
    assert_eq!(done.len(), 1, "an inline read has finished when enqueue returns, with nothing submitted");
    assert_eq!((done[0].token, done[0].result), (1, Ok(BLOCK as u64)));
    assert_eq!(buf[..], image[3 * BLOCK..4 * BLOCK], "the inline read returns the file's data");

    // Four reads at once: each runs inline (a read of tmpfs is a copy out of the page cache).
    let mut bufs = vec![vec![0u8; BLOCK]; 4];
    let iovs: Vec<[libc::iovec; 1]> = bufs.iter_mut().map(|b| [iovec(b)]).collect();
    for (i, iov) in iovs.iter().enumerate() {
        let offset = (10 + i * 7) as u64 * BLOCK as u64;
        // SAFETY: the buffers and iovecs outlive the operations, which are all reaped below.
        unsafe { engine.enqueue(IoOp::Read { offset, iovecs: iov }, 10 + i as u64) }.expect("enqueue");
    }
    assert_eq!(engine.inline_ops(), 5, "overlapping small reads run inline too");
    let mut done = collect(&mut engine, 4);
    done.sort_by_key(|c| c.token);
    for (i, c) in done.iter().enumerate() {
        assert_eq!((c.token, c.result), (10 + i as u64, Ok(BLOCK as u64)));
        let offset = (10 + i * 7) * BLOCK;
        assert_eq!(bufs[i][..], image[offset..offset + BLOCK], "read {i} returns the file's data");
    }

    // Three writes at once: the first finds the ring idle and runs inline, the other two overlap it and go
    // through the ring (a write may allocate pages; io_uring's workers write in parallel).
    let mut blocks: Vec<Vec<u8>> = (0..3u8).map(|i| vec![0x30 + i; BLOCK]).collect();
    let iovs: Vec<[libc::iovec; 1]> = blocks.iter_mut().map(|b| [iovec(b)]).collect();
    for (i, iov) in iovs.iter().enumerate() {
        let offset = (40 + i) as u64 * BLOCK as u64;
        // SAFETY: the buffers and iovecs outlive the operations, which are all reaped below.
        unsafe { engine.enqueue(IoOp::Write { offset, iovecs: iov }, 40 + i as u64) }.expect("enqueue");
    }
    assert_eq!(engine.inline_ops(), 6, "only the first of overlapping writes runs inline");
    let done = collect(&mut engine, 3);
    assert!(done.iter().all(|c| c.result == Ok(BLOCK as u64)), "{done:?}");
    let file = std::fs::read(disk.path()).expect("read the image back");
    for i in 0..3 {
        let block = &file[(40 + i) * BLOCK..(41 + i) * BLOCK];
        assert!(block.iter().all(|&b| usize::from(b) == 0x30 + i), "write {i} reached the file");
    }

    // A write alone runs inline too, and lands in the file.
    let mut data = vec![0xa5u8; 2 * BLOCK];
    let iov = [iovec(&mut data)];
    // SAFETY: `data` and `iov` outlive the operation, which is reaped below.
    unsafe { engine.enqueue(IoOp::Write { offset: 0, iovecs: &iov }, 20) }.expect("enqueue");
    assert_eq!(engine.inline_ops(), 7);
    let done = collect(&mut engine, 1);
    assert_eq!((done[0].token, done[0].result), (20, Ok(2 * BLOCK as u64)));
    let file = std::fs::read(disk.path()).expect("read the image back");
    assert!(file[..2 * BLOCK].iter().all(|&b| b == 0xa5), "the inline write reached the file");

    // A large transfer never runs inline (it would hold the thread and its other queues).
    let mut big = vec![0u8; 128 * 1024];
    let iov = [iovec(&mut big)];
    // SAFETY: `big` and `iov` outlive the operation, which is reaped below.
    unsafe { engine.enqueue(IoOp::Read { offset: 0, iovecs: &iov }, 30) }.expect("enqueue");
    assert_eq!(engine.inline_ops(), 7, "a 128 KiB read goes through the ring");
    let done = collect(&mut engine, 1);
    assert_eq!((done[0].token, done[0].result), (30, Ok(128 * 1024)));
}

#[test]
fn a_lane_of_a_shared_ring_runs_a_lone_transfer_inline() {
    let (_dir, disk) = tmpfs_disk();
    let image = pattern(1 << 20);
    let ring = SharedUring::new(disk, 2, 8, Batching::Auto).expect("shared io_uring");
    let mut lane = ring.lane().expect("a lane");
    let mut buf = vec![0u8; BLOCK];
    let iov = [iovec(&mut buf)];
    ring.begin_round();
    // SAFETY: `buf` and `iov` outlive the operation, which is reaped below.
    unsafe { lane.enqueue(IoOp::Read { offset: 5 * BLOCK as u64, iovecs: &iov }, 7) }.expect("enqueue");
    assert!(lane.has_completions(), "finished within the round, before the ring submitted anything");
    lane.submit().expect("submit");
    let mut done = Vec::new();
    lane.reap_ready(&mut |c| done.push(c));
    ring.end_round();
    assert_eq!(done.len(), 1);
    assert_eq!((done[0].token, done[0].result), (7, Ok(BLOCK as u64)));
    assert_eq!(buf[..], image[5 * BLOCK..6 * BLOCK]);
    assert!(
        !readable(ring.completion_fd()),
        "reaped within its round, an inline completion costs no eventfd signal (nor a wake-up of the thread)"
    );

    // Not reaped by the end of the round: the round's end signals it, so the thread does not sleep on it.
    ring.begin_round();
    // SAFETY: as above.
    unsafe { lane.enqueue(IoOp::Read { offset: 6 * BLOCK as u64, iovecs: &iov }, 8) }.expect("enqueue");
    lane.submit().expect("submit");
    assert!(!readable(ring.completion_fd()), "not signalled within the round");
    ring.end_round();
    assert!(readable(ring.completion_fd()), "an unreaped completion is signalled when the round ends");
    let mut done = Vec::new();
    lane.reap(&mut |c| done.push(c));
    assert_eq!((done.len(), done[0].token, done[0].result), (1, 8, Ok(BLOCK as u64)));
    assert_eq!(buf[..], image[6 * BLOCK..7 * BLOCK]);
}

/// Whether `fd` is readable now.
fn readable(fd: RawFd) -> bool {
    let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut pfd, 1, 0) == 1 }
}

#[test]
fn a_file_over_a_block_layer_never_runs_inline() {
    // The build's own directory is on the machine's disk (ext4 on a virtual disk here and in CI).
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("a directory under the target directory");
    let disk = disk_in(dir.path());
    assert!(!disk.in_memory());
    let mut engine = UringEngine::new(disk, 8).expect("io_uring");
    let mut buf = vec![0u8; BLOCK];
    let iov = [iovec(&mut buf)];
    // SAFETY: `buf` and `iov` outlive the operation, which is reaped below.
    unsafe { engine.enqueue(IoOp::Read { offset: 0, iovecs: &iov }, 1) }.expect("enqueue");
    assert_eq!(engine.inline_ops(), 0, "a file over a block layer is read through the ring");
    let done = collect(&mut engine, 1);
    assert_eq!((done[0].token, done[0].result), (1, Ok(BLOCK as u64)));
    assert_eq!(buf[..], pattern(BLOCK)[..]);
}
