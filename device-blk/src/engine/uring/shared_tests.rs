// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The shared ring's lanes: each gets back only its own completions, none takes more than its depth, and a round
//! holds submissions back until it ends.

// Block numbers of these small images fit in a byte.
#![allow(clippy::cast_possible_truncation)]

use std::time::{Duration, Instant};

use super::super::tests::{disk, readable, scratch_dir, Buffers, BLOCK};
use super::*;

/// Enqueue one-block reads of blocks `first..first + iovecs.len()` with tokens `0..`, and submit.
fn read(lane: &mut UringLane, iovecs: &[libc::iovec], first: usize) {
    for (i, iov) in iovecs.iter().enumerate() {
        let op = IoOp::Read { offset: ((first + i) * BLOCK) as u64, iovecs: std::slice::from_ref(iov) };
        // SAFETY: the buffers outlive the lane's use (every test reaps all before they go).
        unsafe { lane.enqueue(op, i as u64) }.expect("enqueue");
    }
    lane.submit().expect("submit");
}

/// Reap `lanes` until each has `want` completions (5 s at most), as an I/O thread would: whichever lane sees
/// the signal first, then every lane with completions waiting.
fn reap_all(lanes: &mut [&mut UringLane], want: usize) -> Vec<Vec<Completion>> {
    let mut done = vec![Vec::new(); lanes.len()];
    let deadline = Instant::now() + Duration::from_secs(5);
    while done.iter().any(|d| d.len() < want) {
        assert!(Instant::now() < deadline, "completions within 5 s: {done:?}");
        for (lane, out) in lanes.iter_mut().zip(&mut done) {
            if lane.has_completions() {
                lane.reap_ready(&mut |c| out.push(c));
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    done
}

#[test]
fn each_lane_gets_its_own_completions_and_at_most_its_depth() {
    let dir = scratch_dir();
    let disk = disk(dir.path(), 8);
    let ring = SharedUring::new(Arc::clone(&disk), 2, 4, Batching::Whole).expect("ring");
    let (mut a, mut b) = (ring.lane().expect("lane 0"), ring.lane().expect("lane 1"));
    assert!(ring.lane().is_none(), "only the lanes the ring was built for");
    assert_eq!(a.completion_fd(), b.completion_fd(), "one completion eventfd for the thread");
    let (mut buf_a, mut buf_b) = (Buffers::new(4), Buffers::new(4));
    let (iov_a, iov_b) = (buf_a.iovecs(), buf_b.iovecs());
    read(&mut a, &iov_a, 0);
    // SAFETY: refused before anything is queued.
    let full = unsafe { a.enqueue(IoOp::Read { offset: 0, iovecs: &iov_a[..1] }, 9) };
    assert!(matches!(full, Err(EngineError::Full(4))), "a lane takes at most its depth: {full:?}");
    read(&mut b, &iov_b, 4);
    let done = reap_all(&mut [&mut a, &mut b], 4);
    for (lane, got) in done.iter().enumerate() {
        let mut tokens: Vec<u64> = got.iter().map(|c| c.token).collect();
        tokens.sort_unstable();
        assert_eq!(tokens, [0, 1, 2, 3], "lane {lane}: its own tokens, once each");
        assert!(got.iter().all(|c| c.result == Ok(BLOCK as u64)), "lane {lane}: {got:?}");
    }
    assert_eq!((a.in_flight(), b.in_flight()), (0, 0));
    for i in 0..4 {
        assert!(buf_a.block(i).iter().all(|&x| x == i as u8), "lane 0 read block {i}");
        assert!(buf_b.block(i).iter().all(|&x| x == (i + 4) as u8), "lane 1 read block {}", i + 4);
    }
    assert!(!a.has_completions() && !b.has_completions(), "everything reaped");
}

#[test]
fn a_round_submits_every_lane_at_its_end() {
    let dir = scratch_dir();
    let disk = disk(dir.path(), 8);
    let ring = SharedUring::new(Arc::clone(&disk), 2, 4, Batching::Unplugged).expect("ring");
    let (mut a, mut b) = (ring.lane().expect("lane 0"), ring.lane().expect("lane 1"));
    let (mut buf_a, mut buf_b) = (Buffers::new(3), Buffers::new(3));
    let (iov_a, iov_b) = (buf_a.iovecs(), buf_b.iovecs());
    ring.begin_round();
    read(&mut a, &iov_a, 0);
    read(&mut b, &iov_b, 3);
    // Nothing reached the kernel: nothing can complete, and the lanes' reaps submit nothing either.
    std::thread::sleep(Duration::from_millis(20));
    assert!(!a.has_completions() && !b.has_completions(), "held until the round ends");
    a.reap_ready(&mut |c| panic!("completed before submission: {c:?}"));
    assert!(!readable(a.completion_fd()));
    ring.end_round();
    let done = reap_all(&mut [&mut a, &mut b], 3);
    assert!(done.iter().all(|d| d.len() == 3 && d.iter().all(|c| c.result == Ok(BLOCK as u64))), "{done:?}");
    assert!(buf_b.block(2).iter().all(|&x| x == 5), "lane 1 read block 5");
    // Outside a round a lane submits at once.
    read(&mut a, &iov_a[..1], 7);
    let done = reap_all(&mut [&mut a], 1);
    assert_eq!(done[0].len(), 1);
    assert!(buf_a.block(0).iter().all(|&x| x == 7));
}

/// The completion eventfd is the whole ring's: a lane that clears it (a thread about to sleep re-arms each queue
/// in turn) must not swallow the signal of another lane's completion. With deferred task work the kernel signals
/// only the first piece of work, so a swallowed signal never comes back and the thread sleeps on a finished
/// request (seen as a rare hang of two polling vhost-user queues under backpressure).
#[test]
fn clearing_the_signal_for_one_lane_keeps_it_for_another_lanes_completions() {
    let dir = scratch_dir();
    let disk = disk(dir.path(), 8);
    let ring = SharedUring::new(Arc::clone(&disk), 2, 4, Batching::Unplugged).expect("ring");
    let (mut a, mut b) = (ring.lane().expect("lane 0"), ring.lane().expect("lane 1"));
    let mut buf_b = Buffers::new(2);
    let iov_b = buf_b.iovecs();
    read(&mut b, &iov_b, 2);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !readable(b.completion_fd()) {
        assert!(Instant::now() < deadline, "lane 1's reads signalled within 5 s");
        std::thread::sleep(Duration::from_millis(1));
    }
    // Lane 0 has nothing in flight; it clears the signal before its thread would sleep.
    a.clear_completion_signal();
    assert!(!a.has_completions() || a.in_flight() == 0, "lane 0 owns nothing");
    assert!(readable(a.completion_fd()), "lane 1's completions still wake the thread");
    let done = reap_all(&mut [&mut b], 2);
    assert!(done[0].iter().all(|c| c.result == Ok(BLOCK as u64)), "{done:?}");
    // Cleared with nothing waiting for any lane, the signal stays cleared.
    b.clear_completion_signal();
    assert!(!readable(b.completion_fd()), "no spurious wake-up once everything is reaped");
}

/// The ring's registered files that any io_uring of this process lists in its fdinfo under `path`.
fn registered_anywhere(path: &std::path::Path) -> bool {
    let needle = path.to_string_lossy().into_owned();
    std::fs::read_dir("/proc/self/fdinfo").expect("fdinfo").flatten().any(|e| {
        std::fs::read_to_string(e.path()).is_ok_and(|info| info.contains("UserFiles") && info.contains(&needle))
    })
}

#[test]
fn lanes_of_different_disks_read_their_own_disk_and_leave_the_file_table_when_dropped() {
    let (dir_a, dir_b) = (scratch_dir(), scratch_dir());
    let (disk_a, disk_b) = (disk(dir_a.path(), 8), disk(dir_b.path(), 16));
    let ring = SharedUring::open_ended(2, 8, 8, Batching::Whole).expect("ring");
    assert!(ring.lane().is_none(), "an open-ended ring makes no lane up front");
    let mut a = ring.add_lane(Arc::clone(&disk_a), 4).expect("lane a");
    let mut b = ring.add_lane(Arc::clone(&disk_b), 4).expect("lane b");
    assert!(matches!(ring.add_lane(Arc::clone(&disk_a), 1), Err(EngineError::Full(8))), "depth over the limit");
    let (mut buf_a, mut buf_b) = (Buffers::new(4), Buffers::new(4));
    let (iov_a, iov_b) = (buf_a.iovecs(), buf_b.iovecs());
    ring.begin_round();
    read(&mut a, &iov_a, 4);
    read(&mut b, &iov_b, 10);
    ring.end_round();
    let done = reap_all(&mut [&mut a, &mut b], 4);
    assert!(done.iter().all(|d| d.iter().all(|c| c.result == Ok(BLOCK as u64))), "{done:?}");
    for i in 0..4 {
        assert!(buf_a.block(i).iter().all(|&x| x == (i + 4) as u8), "lane a read its disk's block {}", i + 4);
        assert!(buf_b.block(i).iter().all(|&x| x == (i + 10) as u8), "lane b read its disk's block {}", i + 10);
    }
    let path_b = dir_b.path().join("disk.img");
    assert!(registered_anywhere(&path_b), "lane b's disk is in the ring's file table");
    drop(b);
    assert!(!registered_anywhere(&path_b), "a dropped lane's disk leaves the file table");
    assert_eq!(ring.lanes_in_use(), 1);
    // The lane's room and file slot serve the next lane, here added by another thread after the ring's thread
    // enabled it (a queue started while the thread serves others): the kernel takes the registration from the
    // ring's thread only, so it waits for that thread's next use of the ring.
    let add = std::thread::spawn({
        let (ring, disk_b) = (ring.clone(), Arc::clone(&disk_b));
        move || ring.add_lane(disk_b, 4)
    });
    let mut c = add.join().expect("thread").expect("lane c, added by another thread");
    read(&mut c, &iov_b[..2], 14);
    let done = reap_all(&mut [&mut c], 2);
    assert!(done[0].iter().all(|c| c.result == Ok(BLOCK as u64)), "{done:?}");
    assert!(buf_b.block(1).iter().all(|&x| x == 15), "lane c read its disk");
    assert!(registered_anywhere(&path_b));
    // Dropped on another thread, the lane leaves the kernel's table at the ring thread's next round.
    std::thread::spawn(move || drop(c)).join().expect("thread");
    ring.begin_round();
    ring.end_round();
    assert!(!registered_anywhere(&path_b), "a lane dropped on another thread left the file table");
    assert_eq!(ring.lanes_in_use(), 1);
}

#[test]
fn a_lane_dropped_with_operations_in_flight_is_not_reused_until_they_are_reaped() {
    let dir = scratch_dir();
    let disk = disk(dir.path(), 8);
    let ring = SharedUring::open_ended(4, 8, 16, Batching::Whole).expect("ring");
    let mut a = ring.add_lane(Arc::clone(&disk), 4).expect("lane a");
    let mut bufs = Buffers::new(4);
    let iov = bufs.iovecs();
    read(&mut a, &iov, 0);
    let lane_a = a.lane;
    drop(a);
    let mut b = ring.add_lane(Arc::clone(&disk), 4).expect("lane b");
    assert_ne!(b.lane, lane_a, "the retired lane still has reads in flight");
    let mut other = Buffers::new(1);
    let iov_b = other.iovecs();
    read(&mut b, &iov_b, 3);
    let done = reap_all(&mut [&mut b], 1);
    assert_eq!(done[0].iter().map(|c| c.token).collect::<Vec<_>>(), [0], "only lane b's own completion");
    // Once the ring reaped the retired lane's reads, its lane is free for the next.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        b.reap_ready(&mut |c| panic!("lane b has nothing more: {c:?}"));
        let c = ring.add_lane(Arc::clone(&disk), 4).expect("lane c");
        if c.lane == lane_a {
            break;
        }
        assert!(Instant::now() < deadline, "the retired lane freed within 5 s");
        drop(c);
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn a_round_submits_early_only_once_a_batch_is_queued() {
    let dir = scratch_dir();
    let disk = disk(dir.path(), 8);
    let ring = SharedUring::open_ended(2, 8, 8, Batching::Whole).expect("ring");
    let mut a = ring.add_lane(Arc::clone(&disk), 4).expect("lane");
    let mut bufs = Buffers::new(4);
    let iov = bufs.iovecs();
    ring.begin_round();
    read(&mut a, &iov[..2], 0);
    ring.submit_if_at_least(3);
    std::thread::sleep(Duration::from_millis(20));
    assert!(!a.has_completions(), "two entries are no batch of three: still held");
    let op = IoOp::Read { offset: 2 * BLOCK as u64, iovecs: &iov[2..3] };
    // SAFETY: the buffers outlive the lane's use (reaped below).
    unsafe { a.enqueue(op, 2) }.expect("enqueue");
    ring.submit_if_at_least(3);
    let done = reap_all(&mut [&mut a], 3);
    assert_eq!(done[0].len(), 3, "the batch went out before the round's end: {done:?}");
    ring.end_round();
    assert!(buf_block_is(&bufs, 2, 2));
}

fn buf_block_is(bufs: &Buffers, block: usize, value: u8) -> bool {
    bufs.block(block).iter().all(|&x| x == value)
}

/// The lanes of one round share one blocking budget: with a nil budget, two 10 GiB discards by ioctl (ten pieces
/// of 2 GiB) on two lanes of one thread's ring take a round per piece, whichever lanes reap in it.
#[test]
fn lanes_of_a_round_share_one_blocking_budget() {
    let Some(_lock) = test_kit::loop_devices() else { return };
    let dir = scratch_dir();
    let path = dir.path().join("sparse.img");
    std::fs::File::create(&path).and_then(|f| f.set_len(10 << 30)).expect("sparse image");
    let dev = test_kit::LoopDevice::attach(&path).expect("loop device");
    let disk = Arc::new(Disk::open(&dev.path, &crate::disk::DiskOptions::default()).expect("open the loop device"));
    let ring = SharedUring::new(disk, 2, 4, Batching::Whole).expect("ring");
    {
        // As on kernels before 6.12, and one ioctl per round.
        let mut core = ring.lock();
        if let Some(file) = core.engine.files.get_mut(super::super::DISK_FILE) {
            file.discard_cmd = false;
        }
        core.engine.blocking_budget = Duration::ZERO;
    }
    let (mut a, mut b) = (ring.lane().expect("lane 0"), ring.lane().expect("lane 1"));
    ring.begin_round();
    for (lane, token) in [(&mut a, 1), (&mut b, 2)] {
        // SAFETY: a discard names no memory.
        unsafe { lane.enqueue(IoOp::Discard { offset: 0, len: 10 << 30, secure: false }, token) }.expect("enqueue");
        lane.submit().expect("submit");
    }
    ring.end_round();
    let (mut rounds, mut done) = (0, Vec::new());
    let deadline = Instant::now() + Duration::from_secs(20);
    while done.len() < 2 {
        assert!(Instant::now() < deadline, "not done after 20 s: {done:?}");
        rounds += 1;
        ring.begin_round();
        for lane in [&mut a, &mut b] {
            if lane.has_completions() {
                lane.reap_ready(&mut |c| done.push(c));
            }
        }
        ring.end_round();
    }
    assert!(done.iter().all(|c| c.result == Ok(0)), "{done:?}");
    assert!(rounds >= 9, "ten ioctls, the first when enqueued, one per round after: {rounds} rounds");
}

/// A lane dropped while one of its operations waits for the blocking budget takes it along (cancelled): the
/// operation never runs on the disk that gets the lane's file index next.
#[test]
fn a_dropped_lanes_waiting_ioctls_are_cancelled() {
    let Some(_lock) = test_kit::loop_devices() else { return };
    let dir = scratch_dir();
    let path = dir.path().join("sparse.img");
    std::fs::File::create(&path).and_then(|f| f.set_len(4 << 30)).expect("sparse image");
    let dev = test_kit::LoopDevice::attach(&path).expect("loop device");
    let disk = Arc::new(Disk::open(&dev.path, &crate::disk::DiskOptions::default()).expect("open the loop device"));
    let ring = SharedUring::open_ended(4, 64, 64, Batching::Whole).expect("ring");
    let mut lane = ring.add_lane(Arc::clone(&disk), 4).expect("lane");
    {
        let mut core = ring.lock();
        let file = lane.file.expect("a file of its own");
        if let Some(file) = core.engine.files.get_mut(file) {
            file.discard_cmd = false;
        }
        core.engine.blocking_budget = Duration::ZERO;
    }
    // SAFETY: a discard names no memory.
    unsafe { lane.enqueue(IoOp::Discard { offset: 0, len: 4 << 30, secure: false }, 7) }.expect("enqueue");
    lane.submit().expect("submit");
    assert_eq!(ring.lock().engine.blocking.len(), 1, "the second 2 GiB piece waits for the next round");
    drop(lane);
    assert!(ring.lock().engine.blocking.is_empty(), "the waiting piece left with its lane");
    let mut next = ring.add_lane(disk, 4).expect("the next lane takes the file index");
    assert_eq!(ring.lock().engine.finished.front().map(|&(_, r)| r), Some(Err(libc::ECANCELED)));
    next.reap_ready(&mut |c| panic!("a dropped lane's operation reached another lane: {c:?}"));
    assert!(ring.lock().engine.finished.is_empty(), "the cancelled operation was reaped (its slot is free)");
}
