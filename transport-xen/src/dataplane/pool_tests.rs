// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The pool thread's shared io_uring and lanes given up off the thread.

use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use device_blk::disk::DirectIo;
use device_blk::engine::{Completion, IoEngine, IoOp, UringLane};
use device_blk::{Disk, DiskOptions};
use vmm_sys_util::epoll::{Epoll, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::*;
use crate::dataplane::worker::{RingTask, SOURCES};

fn disk_in(dir: &Path) -> Arc<Disk> {
    let path = dir.join("disk.img");
    std::fs::write(&path, vec![7u8; 1 << 16]).expect("image");
    Arc::new(Disk::open(&path, &DiskOptions::default().with_direct_io(DirectIo::Off)).expect("disk"))
}

/// Whether any io_uring of this process has `path` in its registered file table (its `fdinfo` lists them).
fn registered(path: &Path) -> bool {
    let needle = path.to_string_lossy().into_owned();
    std::fs::read_dir("/proc/self/fdinfo").expect("fdinfo").flatten().any(|e| {
        std::fs::read_to_string(e.path()).is_ok_and(|info| info.contains("UserFiles") && info.contains(&needle))
    })
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !done() {
        assert!(Instant::now() < deadline, "{what} within 5 s");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A ring that reads one block through its lane on its first turn (which enables the thread's io_uring on the
/// pool thread) and ends when its stop eventfd fires.
struct OneRead {
    lane: UringLane,
    buf: Vec<u8>,
    /// The read's iovec array (it must outlive the submission, which may come at the end of the thread's pass).
    iov: [libc::iovec; 1],
    started: bool,
    read: Arc<AtomicBool>,
    /// Wait within the first turn for the read, and say here whether it completed before the turn returned.
    within_turn: Option<Arc<AtomicBool>>,
    idle: EventFd,
    stop: Arc<EventFd>,
}

impl RingTask for OneRead {
    fn sources(&self) -> [(RawFd, EventSet); SOURCES] {
        [
            (self.idle.as_raw_fd(), EventSet::IN),
            (self.lane.completion_fd(), EventSet::IN | EventSet::EDGE_TRIGGERED),
            (self.stop.as_raw_fd(), EventSet::IN),
        ]
    }

    fn attach(&mut self, _pool_epoll: Arc<Epoll>) {}

    fn turn(&mut self, fired: u8) -> bool {
        if !self.started {
            self.started = true;
            self.iov[0] = libc::iovec { iov_base: self.buf.as_mut_ptr().cast(), iov_len: self.buf.len() };
            // SAFETY: the buffer and the iovec array live in the task, which ends only after the read was reaped.
            unsafe { self.lane.enqueue(IoOp::Read { offset: 0, iovecs: &self.iov }, 1) }.expect("enqueue");
            self.lane.submit().expect("submit");
            if let Some(within) = &self.within_turn {
                let deadline = Instant::now() + Duration::from_secs(5);
                while !self.lane.has_completions() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(1));
                }
                within.store(self.lane.has_completions(), Ordering::SeqCst);
            }
        }
        if self.lane.has_completions() {
            let read = &self.read;
            self.lane.reap_ready(&mut |c: Completion| read.store(c.result == Ok(4096), Ordering::SeqCst));
        }
        fired & 0b100 == 0 || !self.read.load(Ordering::SeqCst)
    }

    fn wake_at(&self) -> Option<Instant> {
        None
    }

    fn report(&self, message: &str) {
        panic!("ring reported: {message}");
    }

    fn completions_pending(&mut self) -> bool {
        self.lane.has_completions()
    }
}

/// A [`OneRead`] of `lane` to hand to a pool thread, built there (the iovec array holds a raw pointer, which is
/// not `Send`).
fn one_read(
    lane: UringLane,
    read: Arc<AtomicBool>,
    within_turn: Option<Arc<AtomicBool>>,
    stop: Arc<EventFd>,
) -> NewRing {
    Box::new(move || {
        let task = OneRead {
            lane,
            buf: vec![0; 4096],
            iov: [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }],
            started: false,
            read,
            within_turn,
            idle: EventFd::new(EFD_NONBLOCK).expect("eventfd"),
            stop,
        };
        Some(Box::new(task) as Box<dyn RingTask>)
    })
}

#[test]
fn a_lane_given_up_off_the_thread_leaves_the_file_table_without_waiting_for_an_event() {
    let (dir_a, dir_b) = (tempfile::tempdir().expect("dir"), tempfile::tempdir().expect("dir"));
    let (disk_a, disk_b) = (disk_in(dir_a.path()), disk_in(dir_b.path()));
    let path_b = dir_b.path().join("disk.img");
    let pool = IoThreads::new(1);
    // Two queues seated on the one thread; both lanes registered while the thread's ring is still disabled.
    let seat_a = pool.seat(None).expect("seat a");
    let lane_a = seat_a.engine(disk_a, 4).expect("lane a");
    let seat_b = pool.seat(None).expect("seat b");
    let lane_b = seat_b.engine(disk_b, 4).expect("lane b");
    assert!(registered(&path_b));
    // Queue a starts on the thread, whose first submission enables the ring.
    let (read, stop) = (Arc::new(AtomicBool::new(false)), Arc::new(EventFd::new(EFD_NONBLOCK).expect("eventfd")));
    let handed = seat_a.hand_over(one_read(lane_a, read.clone(), None, stop.clone())).expect("handed");
    wait_for("queue a's read on the pool thread", || read.load(Ordering::SeqCst));
    // Queue b's start fails on this thread after its lane was made: the lane goes here, where the kernel refuses
    // to change the enabled ring's file table, and the thread, with nothing to do, sleeps.
    // (Whether the file is still registered in between is not asserted: an event of queue a's could come late
    // and give the thread a pass, which would take it out as well.)
    drop(lane_b);
    drop(seat_b);
    wait_for("queue b's disk out of the ring's file table", || !registered(&path_b));
    stop.write(1).expect("stop");
    handed.wait_released();
    assert_eq!(pool.rings_per_thread(), [0]);
}

#[test]
fn a_ring_alone_on_its_thread_submits_within_its_own_turn() {
    // With one ring to serve, the thread opens no round of its shared io_uring: the ring's submission goes to the
    // kernel in its own pass (as with a thread of its own), so the enter that submits also runs the completion
    // work the kernel holds and the pass answers it, instead of a second turn after the round's end.
    let dir = tempfile::tempdir().expect("dir");
    let disk = disk_in(dir.path());
    let pool = IoThreads::new(1);
    let seat = pool.seat(None).expect("seat");
    let lane = seat.engine(disk, 4).expect("lane");
    let (within, stop) = (Arc::new(AtomicBool::new(false)), Arc::new(EventFd::new(EFD_NONBLOCK).expect("eventfd")));
    let handed = seat
        .hand_over(one_read(lane, Arc::new(AtomicBool::new(false)), Some(within.clone()), stop.clone()))
        .expect("handed");
    wait_for("the ring's first turn", || within.load(Ordering::SeqCst));
    stop.write(1).expect("stop");
    handed.wait_released();
}

#[test]
fn rings_made_in_advance_serve_the_threads_started_later() {
    // A process that may make no io_uring once locked down makes its threads' rings first: each thread started
    // later takes one (the thread enables it at its first submission) instead of making its own.
    let dir = tempfile::tempdir().expect("dir");
    let disk = disk_in(dir.path());
    let pool = IoThreads::new(2);
    assert_eq!(pool.make_rings().expect("io_uring"), 2, "one per thread");
    assert_eq!(pool.make_rings().expect("io_uring"), 2, "made once");
    let made: Vec<RawFd> = pool.0.made.lock().expect("made").iter().map(SharedUring::completion_fd).collect();
    let (seat_a, seat_b) = (pool.seat(None).expect("seat a"), pool.seat(None).expect("seat b"));
    assert_eq!(pool.rings_per_thread(), [1, 1], "two threads");
    let lane_a = seat_a.engine(disk.clone(), 4).expect("lane a");
    let lane_b = seat_b.engine(disk, 4).expect("lane b");
    let used = [lane_a.shared_ring().completion_fd(), lane_b.shared_ring().completion_fd()];
    assert_ne!(used[0], used[1], "a ring per thread");
    assert!(used.iter().all(|fd| made.contains(fd)), "the threads took the rings made in advance");
    assert!(pool.0.made.lock().expect("made").is_empty());
    assert_eq!(pool.make_rings().expect("nothing to make"), 0, "every thread has its ring");
    // The ring serves on the thread that takes it.
    let (read, stop) = (Arc::new(AtomicBool::new(false)), Arc::new(EventFd::new(EFD_NONBLOCK).expect("eventfd")));
    let handed = seat_a.hand_over(one_read(lane_a, read.clone(), None, stop.clone())).expect("handed");
    wait_for("the read on the ring made in advance", || read.load(Ordering::SeqCst));
    stop.write(1).expect("stop");
    handed.wait_released();
    drop((lane_b, seat_b));
}

#[test]
fn a_nearly_full_thread_ring_gives_a_queue_the_room_it_has_left() {
    // A worker that may make no ring would give a queue that finds no room synchronous I/O on the shared thread:
    // it gets what room is left instead, down to MIN_LANE_DEPTH.
    let dir = tempfile::tempdir().expect("dir");
    let disk = disk_in(dir.path());
    let pool = IoThreads::new(1);
    let seats: Vec<Seat> = (0..4).map(|_| pool.seat(None).expect("seat")).collect();
    let big = seats[0].engine(disk.clone(), SHARED_LIMIT - 100).expect("lane");
    assert_eq!(big.capacity(), (SHARED_LIMIT - 100) as usize);
    let fitted = seats[1].engine(disk.clone(), 512).expect("fitted lane");
    assert_eq!(fitted.capacity(), 100, "the room left");
    assert!(seats[2].engine(disk.clone(), 512).is_none(), "no room at all: an engine of its own");
    drop(fitted);
    let small = seats[2].engine(disk.clone(), 8).expect("a queue shallower than the floor");
    assert_eq!(small.capacity(), 8);
    // Less room left than the floor: a deep queue gets none of it.
    drop(big);
    let full = seats[3].engine(disk.clone(), SHARED_LIMIT - 8 - MIN_LANE_DEPTH + 1).expect("lane");
    assert_eq!(full.shared_ring().room(), (MIN_LANE_DEPTH - 1) as usize);
    assert!(seats[0].engine(disk, 512).is_none(), "below the floor: an engine of its own");
}
