// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Completion delivery of the io_uring engine on the running kernel: deferred task work is run and reaped in
//! full, and a poller sees waiting completions without a system call.

// Block numbers of these small images fit in a byte.
#![allow(clippy::cast_possible_truncation)]

use std::io::Write;
use std::time::{Duration, Instant};

use io_uring::{opcode, squeue, types};

use super::*;
use crate::disk::{DirectIo, DiskOptions};

pub(super) const BLOCK: usize = 4096;

pub(super) fn disk(dir: &std::path::Path, blocks: usize) -> Arc<Disk> {
    let path = dir.join("disk.img");
    let mut f = std::fs::File::create(&path).expect("create image");
    let data: Vec<u8> = (0..blocks * BLOCK).map(|i| (i / BLOCK) as u8).collect();
    f.write_all(&data).expect("fill image");
    // O_DIRECT where the file system allows it, so that reads really complete later, as task work.
    let options = DiskOptions { read_only: true, direct_io: DirectIo::Auto, expected_diskseq: None };
    Arc::new(Disk::open(&path, &options).expect("open image"))
}

/// Whether the running kernel is at least `major.minor`.
fn kernel_at_least(major: u32, minor: u32) -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release.trim().split(['.', '-']).map(|p| p.parse::<u32>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0)) >= (major, minor)
}

pub(super) fn readable(fd: RawFd) -> bool {
    let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd, no timeout.
    unsafe { libc::poll(&mut pfd, 1, 0) == 1 }
}

/// Enqueue `count` one-block reads into `buf` (block `i` into slot `i`) with tokens `0..count`, and submit.
fn read_blocks(engine: &mut UringEngine, iovecs: &[libc::iovec], count: usize) {
    for (i, iov) in iovecs.iter().take(count).enumerate() {
        let op = IoOp::Read { offset: (i * BLOCK) as u64, iovecs: std::slice::from_ref(iov) };
        // SAFETY: `iovecs` and the buffer they point to outlive the engine's use (every test reaps all).
        unsafe { engine.enqueue(op, i as u64) }.expect("enqueue");
    }
    engine.submit().expect("submit");
}

/// Page-aligned buffers (as direct I/O needs) of `blocks` blocks.
pub(super) struct Buffers {
    raw: Vec<u8>,
    blocks: usize,
}

impl Buffers {
    pub(super) fn new(blocks: usize) -> Self {
        Buffers { raw: vec![0u8; (blocks + 1) * BLOCK], blocks }
    }

    fn start(&self) -> usize {
        self.raw.as_ptr().align_offset(BLOCK)
    }

    pub(super) fn iovecs(&mut self) -> Vec<libc::iovec> {
        let (start, len) = (self.start(), self.blocks * BLOCK);
        self.raw[start..start + len]
            .chunks_mut(BLOCK)
            .map(|c| libc::iovec { iov_base: c.as_mut_ptr().cast(), iov_len: c.len() })
            .collect()
    }

    pub(super) fn block(&self, i: usize) -> &[u8] {
        let at = self.start() + i * BLOCK;
        &self.raw[at..at + BLOCK]
    }
}

/// A directory on a file system that takes O_DIRECT (not tmpfs), where there is one.
pub(super) fn scratch_dir() -> tempfile::TempDir {
    tempfile::tempdir_in("/var/tmp").or_else(|_| tempfile::tempdir()).expect("tempdir")
}

#[test]
fn a_batch_larger_than_one_round_of_task_work_is_reaped_in_full() {
    const COUNT: usize = 100;
    let dir = scratch_dir();
    let disk = disk(dir.path(), COUNT);
    let cases = [
        (CompletionMode::Deferred, Batching::Whole),
        (CompletionMode::Deferred, Batching::Unplugged),
        (CompletionMode::Cooperative, Batching::Whole),
    ];
    for (mode, batching) in cases {
        let mut engine = UringEngine::with_mode(Arc::clone(&disk), 128, mode).expect("engine");
        engine.set_batching(batching);
        if kernel_at_least(6, 1) {
            assert_eq!(engine.completion_mode(), mode, "the kernel accepts {mode:?}");
        }
        let mut buf = Buffers::new(COUNT);
        let iovecs = buf.iovecs();
        read_blocks(&mut engine, &iovecs, COUNT);
        // Let every read finish, so that the kernel holds all of them as task work at once.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !readable(engine.completion_fd()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(50));
        let mut done = Vec::new();
        engine.reap(&mut |c| done.push(c));
        assert_eq!(done.len(), COUNT, "{mode:?} {batching:?}: one reap returns every finished read");
        assert!(done.iter().all(|c| c.result == Ok(BLOCK as u64)), "{mode:?}: {done:?}");
        assert_eq!(engine.in_flight(), 0);
        for i in 0..COUNT {
            assert!(buf.block(i).iter().all(|&b| b == i as u8), "{mode:?}: block {i} read correctly");
        }
    }
}

#[test]
fn a_poller_sees_completions_in_shared_memory_and_clears_the_signal_before_sleeping() {
    let dir = scratch_dir();
    let disk = disk(dir.path(), 8);
    for mode in [CompletionMode::Deferred, CompletionMode::Cooperative] {
        let mut engine = UringEngine::with_mode(Arc::clone(&disk), 8, mode).expect("engine");
        assert!(!engine.has_completions(), "{mode:?}: nothing submitted yet");
        let mut buf = Buffers::new(4);
        let iovecs = buf.iovecs();
        read_blocks(&mut engine, &iovecs, 4);
        let mut done = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while done.len() < 4 {
            assert!(Instant::now() < deadline, "{mode:?}: completions seen by polling within 5 s");
            if engine.has_completions() {
                engine.reap_ready(&mut |c| done.push(c));
            }
            std::hint::spin_loop();
        }
        assert!(done.iter().all(|c| c.result == Ok(BLOCK as u64)), "{mode:?}: {done:?}");
        assert!(!engine.has_completions(), "{mode:?}: everything reaped");
        engine.clear_completion_signal();
        assert!(!readable(engine.completion_fd()), "{mode:?}: the eventfd is clear before sleeping");
        // The next completion signals it again.
        read_blocks(&mut engine, &iovecs, 1);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !readable(engine.completion_fd()) {
            assert!(Instant::now() < deadline, "{mode:?}: a new completion signals the eventfd");
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut more = Vec::new();
        engine.reap(&mut |c| more.push(c));
        assert_eq!(more.len(), 1, "{mode:?}");
    }
}

/// Reap until `count` operations completed (or 5 s passed).
fn reap_n(engine: &mut UringEngine, count: usize) -> Vec<Completion> {
    let mut done = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while done.len() < count && Instant::now() < deadline {
        engine.reap(&mut |c| done.push(c));
        std::thread::sleep(Duration::from_millis(1));
    }
    done
}

#[test]
fn reads_from_a_registered_buffer_use_fixed_io_and_others_do_not() {
    let dir = scratch_dir();
    let disk = disk(dir.path(), 8);
    let mut engine = UringEngine::new(Arc::clone(&disk), 8).expect("engine");
    let mut pool = Buffers::new(4);
    let pool_iovecs = pool.iovecs();
    let (base, len) = (pool_iovecs[0].iov_base.cast::<u8>(), 4 * BLOCK);
    // SAFETY: `pool` outlives the engine (declared before it is dropped below).
    let fixed = unsafe { engine.register_buffer(base, len) };
    if !fixed {
        eprintln!("skipping: this kernel has no fixed vectored I/O (Linux 6.15+)");
        return;
    }
    // SAFETY: as above.
    let again = unsafe { engine.register_buffer(base, len) };
    assert!(!again, "one registered buffer per engine");
    // One vectored read of blocks 2 and 3 into the pool's slots 0 and 1, one single-buffer read of block 5
    // into slot 3: both inside the registered buffer.
    let two = [pool_iovecs[0], pool_iovecs[1]];
    // SAFETY: the buffers and iovec arrays outlive the operations (reaped below).
    unsafe { engine.enqueue(IoOp::Read { offset: 2 * BLOCK as u64, iovecs: &two }, 1) }.expect("enqueue");
    // SAFETY: as above.
    unsafe { engine.enqueue(IoOp::Read { offset: 5 * BLOCK as u64, iovecs: &pool_iovecs[3..4] }, 2) }.expect("enqueue");
    // A read into memory outside it takes the plain path.
    let mut other = Buffers::new(1);
    let other_iovecs = other.iovecs();
    // SAFETY: as above.
    unsafe { engine.enqueue(IoOp::Read { offset: 7 * BLOCK as u64, iovecs: &other_iovecs }, 3) }.expect("enqueue");
    engine.submit().expect("submit");
    let mut done = reap_n(&mut engine, 3);
    done.sort_by_key(|c| c.token);
    let results: Vec<_> = done.iter().map(|c| (c.token, c.result.as_ref().ok().copied())).collect();
    assert_eq!(results, vec![(1, Some(2 * BLOCK as u64)), (2, Some(BLOCK as u64)), (3, Some(BLOCK as u64))]);
    assert_eq!(engine.fixed_ops(), 2, "the two reads inside the registered buffer went through fixed I/O");
    assert!(pool.block(0).iter().all(|&b| b == 2) && pool.block(1).iter().all(|&b| b == 3));
    assert!(pool.block(3).iter().all(|&b| b == 5));
    assert!(other.block(0).iter().all(|&b| b == 7));
    drop(engine);
}

/// Push `entry` onto the engine's ring behind its back, submit it alone and return its completion's result.
fn submit_raw(engine: &mut UringEngine, entry: squeue::Entry) -> i32 {
    const RAW: u64 = u64::MAX;
    let ring = engine.ring_mut();
    // SAFETY: whatever the entry points to (a path) outlives the wait for its completion below.
    unsafe { ring.submission().push(&entry.user_data(RAW)) }.expect("room on the ring");
    ring.submit_and_wait(1).expect("io_uring_enter");
    let cqe = ring.completion().next().expect("a completion");
    assert_eq!(cqe.user_data(), RAW, "the completion of the raw entry");
    cqe.result()
}

/// A ring enabled by the engine's first submit, with nothing in flight.
fn enabled_engine(disk: &Arc<Disk>, mode: CompletionMode) -> UringEngine {
    let mut engine = UringEngine::with_mode(Arc::clone(disk), 8, mode).expect("engine");
    let mut buf = Buffers::new(1);
    let iovecs = buf.iovecs();
    read_blocks(&mut engine, &iovecs, 1);
    let done = reap_n(&mut engine, 1);
    assert_eq!(done.first().map(|c| c.result), Some(Ok(BLOCK as u64)), "{mode:?}: a read through the engine");
    engine
}

#[test]
fn the_ring_refuses_operations_the_engine_never_issues() {
    use std::os::unix::ffi::OsStrExt;

    let dir = scratch_dir();
    let disk = disk(dir.path(), 8);
    let path = std::ffi::CString::new(dir.path().join("disk.img").as_os_str().as_bytes()).expect("path");
    for mode in [CompletionMode::Deferred, CompletionMode::Cooperative] {
        let mut engine = enabled_engine(&disk, mode);
        assert!(engine.restricted(), "{mode:?}: this kernel (5.10+) restricts the ring");
        assert_eq!(engine.ring_restricted(), Some(true));
        let open = opcode::OpenAt::new(types::Fd(libc::AT_FDCWD), path.as_ptr()).flags(libc::O_RDONLY).build();
        assert_eq!(submit_raw(&mut engine, open), -libc::EACCES, "{mode:?}: OPENAT refused");
        let socket = opcode::Socket::new(libc::AF_INET, libc::SOCK_STREAM, 0).build();
        assert_eq!(submit_raw(&mut engine, socket), -libc::EACCES, "{mode:?}: SOCKET refused");
        // An opcode outside the list is refused even with the required flag.
        let nop = opcode::Nop::new().build().flags(squeue::Flags::FIXED_FILE);
        assert_eq!(submit_raw(&mut engine, nop), -libc::EACCES, "{mode:?}: NOP refused");
        // An allowed opcode on a descriptor outside the registered file table is refused.
        let mut block = Buffers::new(1);
        let target = block.iovecs()[0];
        let raw = types::Fd(disk.file().as_raw_fd());
        let read = opcode::Read::new(raw, target.iov_base.cast(), BLOCK as u32).build();
        assert_eq!(submit_raw(&mut engine, read), -libc::EACCES, "{mode:?}: READ on a raw descriptor refused");
        // The registered file table cannot be changed to point at another file.
        let other = std::fs::File::open(dir.path()).expect("open the directory");
        let update = engine.ring_mut().submitter().register_files_update(0, &[other.as_raw_fd()]);
        assert_eq!(update.map_err(|e| e.raw_os_error()), Err(Some(libc::EACCES)), "{mode:?}: file table locked");
        // The engine itself carries on.
        let mut buf = Buffers::new(1);
        let iovecs = buf.iovecs();
        read_blocks(&mut engine, &iovecs, 1);
        let done = reap_n(&mut engine, 1);
        assert_eq!(done.first().map(|c| c.result), Some(Ok(BLOCK as u64)), "{mode:?}: the engine still reads");
    }
}

#[test]
fn a_buffer_offered_after_the_first_submit_is_not_registered() {
    let dir = scratch_dir();
    let disk = disk(dir.path(), 8);
    let mut engine = enabled_engine(&disk, CompletionMode::Deferred);
    let mut pool = Buffers::new(2);
    let iovecs = pool.iovecs();
    // SAFETY: `pool` outlives the engine (dropped first, below).
    let fixed = unsafe { engine.register_buffer(iovecs[0].iov_base.cast(), 2 * BLOCK) };
    assert!(!fixed, "a restricted ring takes no registration once enabled");
    read_blocks(&mut engine, &iovecs, 2);
    let done = reap_n(&mut engine, 2);
    assert!(done.len() == 2 && done.iter().all(|c| c.result == Ok(BLOCK as u64)), "{done:?}");
    assert_eq!(engine.fixed_ops(), 0, "the plain path served the reads");
    drop(engine);
}

/// Blocking ioctl steps (block-device discards before Linux 6.12) run only within a round's budget, at least one
/// per round; the rest wait for the next round, and everything else is answered in between. Here the budget is
/// nil, so a discard of a whole 10 GiB loop device (five ioctls of 2 GiB) takes five rounds, and a read queued
/// behind it is answered before it finishes.
#[test]
fn blocking_ioctls_are_spread_over_rounds_and_other_requests_pass_them() {
    let Some(_lock) = test_kit::loop_devices() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("sparse.img");
    std::fs::File::create(&path).and_then(|f| f.set_len(10 << 30)).expect("sparse image");
    let dev = test_kit::LoopDevice::attach(&path).expect("loop device");
    let disk = Arc::new(Disk::open(&dev.path, &DiskOptions::default()).expect("open the loop device"));
    let mut engine = UringEngine::new(disk, 8).expect("engine");
    // As on kernels before 6.12, and one ioctl per round.
    if let Some(file) = engine.files.get_mut(DISK_FILE) {
        file.discard_cmd = false;
    }
    engine.blocking_budget = Duration::ZERO;
    let mut buf = vec![0u8; 2 * BLOCK];
    let aligned = buf.as_mut_ptr().align_offset(BLOCK);
    let iovecs = [libc::iovec { iov_base: buf[aligned..].as_mut_ptr().cast(), iov_len: BLOCK }];
    // SAFETY: a discard names no memory; the read's buffer and iovec outlive its completion, awaited below.
    unsafe {
        engine.enqueue(IoOp::Discard { offset: 0, len: 10 << 30, secure: false }, 1).expect("enqueue discard");
        engine.enqueue(IoOp::Read { offset: 0, iovecs: &iovecs }, 2).expect("enqueue read");
    }
    engine.submit().expect("submit");
    let (mut rounds, mut done) = (0, Vec::new());
    let deadline = Instant::now() + Duration::from_secs(20);
    while done.len() < 2 {
        assert!(Instant::now() < deadline, "not done after 20 s: {done:?}");
        if !readable(engine.completion_fd()) {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        rounds += 1;
        engine.reap(&mut |c| done.push((rounds, c)));
    }
    let round_of = |token| done.iter().find(|(_, c)| c.token == token).map(|&(round, c)| (round, c.result));
    let (discard_round, discard) = round_of(1).expect("the discard was answered");
    let (read_round, read) = round_of(2).expect("the read was answered");
    assert_eq!((discard, read), (Ok(0), Ok(BLOCK as u64)));
    // The first piece ran when the discard was enqueued, each later one in a round of its own.
    assert!(discard_round >= 4, "the discard's five ioctls ran in {discard_round} rounds");
    assert!(read_round < discard_round, "the read waited for the discard (rounds {read_round}, {discard_round})");
}
