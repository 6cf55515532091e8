// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The worker's data path on a real vring in guest memory, driven from the test thread: every request is
//! answered with the right status and used length, and once warm nothing is allocated per request.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use vhost_user_backend::VringT;
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Address, Bytes, GuestAddress};

use super::*;
use device_blk::disk::{DirectIo, DiskOptions};
use device_blk::engine::EngineKind;
use device_blk::request::ID_BYTES;

/// Counts the allocations of the current thread.
struct CountingAllocator;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

fn count() {
    let _ = ALLOCATIONS.try_with(|c| c.set(c.get() + 1));
}

fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

// SAFETY: delegates to the system allocator; counting touches only a thread-local integer.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: the caller's contract is passed on unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

const QUEUE_SIZE: u16 = 256;
const HEADERS: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x30_0000;
const REQUESTS: u16 = 24;

/// The driver side: puts read/write chains of three descriptors in the ring.
struct Driver<'a> {
    mq: MockSplitQueue<'a, GuestMemory>,
    mem: &'a GuestMemory,
    next_desc: u16,
}

impl Driver<'_> {
    /// Publish `REQUESTS` requests (alternating 4 KiB writes and reads) numbered from `first`.
    fn publish(&mut self, first: u16) {
        if self.next_desc + 3 * REQUESTS > QUEUE_SIZE {
            self.next_desc = 0; // earlier chains are all used by now
        }
        let mut descs = Vec::new();
        for n in first..first + REQUESTS {
            let i = u64::from(n);
            let virtio_type = if n % 2 == 0 { VIRTIO_BLK_T_OUT } else { VIRTIO_BLK_T_IN };
            let mut header = [0u8; 16];
            header[..4].copy_from_slice(&virtio_type.to_le_bytes());
            header[8..].copy_from_slice(&((i % 64) * 8).to_le_bytes());
            self.mem.write_slice(&header, GuestAddress(HEADERS + 16 * i)).expect("header");
            self.mem.write_obj(0xffu8, GuestAddress(STATUS + i)).expect("status");
            let data_flags = if virtio_type == VIRTIO_BLK_T_IN { VRING_DESC_F_WRITE } else { 0 };
            let base = self.next_desc + 3 * (n - first);
            let flags = |f: u32| u16::try_from(f).expect("ring flag");
            descs.push(SplitDescriptor::new(HEADERS + 16 * i, 16, flags(VRING_DESC_F_NEXT), base + 1));
            descs.push(SplitDescriptor::new(
                DATA + 4096 * (i % 64),
                4096,
                flags(data_flags | VRING_DESC_F_NEXT),
                base + 2,
            ));
            descs.push(SplitDescriptor::new(STATUS + i, 1, flags(VRING_DESC_F_WRITE), 0));
        }
        let raw: Vec<RawDescriptor> = descs.into_iter().map(RawDescriptor::from).collect();
        self.mq.add_desc_chains(&raw, self.next_desc).expect("publish the chains");
        self.next_desc += 3 * REQUESTS;
    }

    fn used_idx(&self) -> u16 {
        self.mem.read_obj::<u16>(self.mq.used_addr().unchecked_add(2)).expect("used idx")
    }
}

/// Run the worker until `expected` requests are in the used ring, counting this thread's allocations.
fn serve(
    worker: &mut QueueWorker,
    vring: &BlkVring,
    atomic: &AtomicGuestMemory,
    driver: &Driver,
    expected: u16,
) -> u64 {
    let before = allocations();
    worker.on_kick(vring, atomic);
    while driver.used_idx() != expected {
        let mut pfd = libc::pollfd { fd: worker.completion_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        assert!(unsafe { libc::poll(&mut pfd, 1, 10_000) } > 0, "no completion within 10 s");
        worker.on_completion(vring, atomic, true);
    }
    allocations() - before
}

/// A disk, guest memory and a vring over a mock driver's queue.
struct Harness {
    _dir: tempfile::TempDir,
    disk: Arc<Disk>,
    atomic: AtomicGuestMemory,
    vring: BlkVring,
}

impl Harness {
    fn new() -> Harness {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("disk.img");
        std::fs::write(&path, vec![0u8; 1 << 20]).expect("image");
        let options = DiskOptions::default().with_direct_io(DirectIo::Off);
        let disk = Arc::new(Disk::open(&path, &options).expect("open"));
        let memory = GuestMemory::from_ranges(&[(GuestAddress(0), 4 << 20)]).expect("guest memory");
        let atomic = AtomicGuestMemory::new(memory);
        let vring = BlkVring::new(atomic.clone(), QUEUE_SIZE).expect("vring");
        Harness { _dir: dir, disk, atomic, vring }
    }

    /// The driver side, with the vring pointed at its queue.
    fn driver<'a>(&self, mem: &'a GuestMemory) -> Driver<'a> {
        let driver = Driver { mq: MockSplitQueue::new(mem, QUEUE_SIZE), mem, next_desc: 0 };
        self.vring.set_queue_size(QUEUE_SIZE);
        let (desc, avail, used) = (driver.mq.desc_table_addr(), driver.mq.avail_addr(), driver.mq.used_addr());
        self.vring.set_queue_info(desc.0, avail.0, used.0).expect("ring addresses");
        self.vring.set_queue_ready(true);
        self.vring.set_enabled(true);
        driver
    }

    fn worker(&self, engine: EngineKind) -> QueueWorker {
        let options = VhostUserBlkOptions { engine, io_depth: Some(32), ..VhostUserBlkOptions::new([0; ID_BYTES]) };
        QueueWorker::new(0, &self.disk, &options, 8, None).expect("worker")
    }
}

#[test]
fn every_request_is_answered_and_the_warm_path_allocates_nothing() {
    for engine in [EngineKind::Sync, EngineKind::IoUring] {
        let h = Harness::new();
        let snapshot = h.atomic.memory();
        let mut driver = h.driver(&snapshot);
        let used = driver.mq.used_addr();
        let mut worker = h.worker(engine);

        driver.publish(0);
        serve(&mut worker, &h.vring, &h.atomic, &driver, REQUESTS); // warm-up: slots, iovec arrays, thread state
        for round in 1..4u16 {
            driver.publish(round * REQUESTS);
            let allocated = serve(&mut worker, &h.vring, &h.atomic, &driver, (round + 1) * REQUESTS);
            assert_eq!(allocated, 0, "{engine:?}: allocations while serving {REQUESTS} requests");
        }
        for i in 0..u64::from(4 * REQUESTS) {
            assert_eq!(
                snapshot.read_obj::<u8>(GuestAddress(STATUS + i)).expect("status"),
                0,
                "request {i} answered OK"
            );
        }
        for slot in 0..usize::from(4 * REQUESTS) {
            let elem = used.unchecked_add(4 + 8 * slot as u64);
            let len = snapshot.read_obj::<u32>(elem.unchecked_add(4)).expect("used len");
            let id = snapshot.read_obj::<u32>(elem).expect("used id");
            let read = (id / 3) % 2 == 1;
            assert_eq!(len, if read { 4097 } else { 1 }, "used length of chain {id}");
        }
        assert_eq!(worker.in_flight(), 0);
    }
}

#[test]
fn a_broken_avail_ring_is_survived() {
    let h = Harness::new();
    let snapshot = h.atomic.memory();
    let mut driver = h.driver(&snapshot);
    let mut worker = h.worker(EngineKind::Sync);
    let avail_idx = driver.mq.avail_addr().unchecked_add(2);
    let avail_entry = |n: u16| driver.mq.avail_addr().unchecked_add(4 + 2 * u64::from(n % QUEUE_SIZE));

    // A head index outside the descriptor table: taken, but cannot be returned.
    snapshot.write_obj(999u16, avail_entry(0)).expect("avail entry");
    snapshot.write_obj(1u16, avail_idx).expect("avail idx");
    worker.on_kick(&h.vring, &h.atomic);
    assert_eq!(driver.used_idx(), 0, "nothing returned for an out-of-ring head");
    assert_eq!(h.vring.get_ref().get_queue().next_avail(), 1);

    // An avail index more than a ring ahead: nothing is taken, and nothing goes round for ever: neither the
    // re-arm with EVENT_IDX (which would see chains "published" again and again) nor a polling pass (which would
    // count the pending index as progress).
    snapshot.write_obj(1 + 2 * QUEUE_SIZE, avail_idx).expect("avail idx");
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watchdog = {
        let done = done.clone();
        std::thread::spawn(move || {
            let start = std::time::Instant::now();
            while start.elapsed() < std::time::Duration::from_secs(10) {
                if done.load(std::sync::atomic::Ordering::Acquire) {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            eprintln!("a broken avail ring kept the worker busy for 10 s");
            std::process::abort();
        })
    };
    for event_idx in [false, true] {
        h.vring.set_queue_event_idx(event_idx);
        worker.on_kick(&h.vring, &h.atomic);
        assert_eq!(h.vring.get_ref().get_queue().next_avail(), 1);
        assert!(!worker.poll_once(&h.vring, &h.atomic, true), "a broken ring is no progress (event idx {event_idx})");
    }
    h.vring.set_queue_event_idx(false);
    done.store(true, std::sync::atomic::Ordering::Release);
    watchdog.join().expect("watchdog");

    // Repaired by the driver: served again.
    snapshot.write_obj(1u16, avail_idx).expect("avail idx");
    driver.publish(1);
    serve(&mut worker, &h.vring, &h.atomic, &driver, REQUESTS);
    for i in 1..=u64::from(REQUESTS) {
        assert_eq!(snapshot.read_obj::<u8>(GuestAddress(STATUS + i)).expect("status"), 0, "request {i} answered OK");
    }
}

#[test]
fn disk_errors_injected_under_the_worker_reach_the_guest_as_ioerr() {
    use device_blk::engine::fault::{FaultPlan, FaultPoint, FaultRule, OpKind};
    for (engine, point) in [(EngineKind::Sync, FaultPoint::Refuse), (EngineKind::IoUring, FaultPoint::Complete)] {
        let h = Harness::new();
        let snapshot = h.atomic.memory();
        let mut driver = h.driver(&snapshot);
        let plan = FaultPlan::new();
        let rule = plan.add(FaultRule::new(libc::EIO).on(OpKind::Write).at(point));
        let options = VhostUserBlkOptions {
            engine,
            io_depth: Some(32),
            engine_wrapper: Some(plan.wrapper()),
            ..VhostUserBlkOptions::new([0; ID_BYTES])
        };
        let mut worker = QueueWorker::new(0, &h.disk, &options, 8, None).expect("worker");
        driver.publish(0);
        serve(&mut worker, &h.vring, &h.atomic, &driver, REQUESTS);
        for n in 0..u64::from(REQUESTS) {
            let status = snapshot.read_obj::<u8>(GuestAddress(STATUS + n)).expect("status");
            let write = n % 2 == 0;
            let expected = if write { u8::try_from(VIRTIO_BLK_S_IOERR).expect("status") } else { 0 };
            assert_eq!(status, expected, "{engine:?}/{point:?}: request {n} (write: {write})");
        }
        assert_eq!(plan.injected(rule), u64::from(REQUESTS / 2));
        // The same worker serves normally once the disk is healthy again.
        plan.clear();
        driver.publish(REQUESTS);
        serve(&mut worker, &h.vring, &h.atomic, &driver, 2 * REQUESTS);
        for n in u64::from(REQUESTS)..u64::from(2 * REQUESTS) {
            assert_eq!(snapshot.read_obj::<u8>(GuestAddress(STATUS + n)).expect("status"), 0, "request {n}");
        }
        assert_eq!(worker.in_flight(), 0);
    }
}

/// The hostile driver: keeps a full ring of chains published ahead of what the worker returned (each slot of the
/// avail ring is refilled as soon as its chain is in the used ring), all with head 0 (a lone header, no status
/// byte: malformed, returned at once without taking a slot), until `quit` or a few seconds have passed. Counts
/// every used entry it sees (the used index wraps at 2^16).
struct ChainStorm {
    quit: Arc<std::sync::atomic::AtomicBool>,
    used_total: Arc<std::sync::atomic::AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ChainStorm {
    fn start(mem: Arc<GuestMemory>, avail: GuestAddress, used: GuestAddress) -> ChainStorm {
        use std::sync::atomic::{AtomicBool, AtomicU64};
        let quit = Arc::new(AtomicBool::new(false));
        let used_total = Arc::new(AtomicU64::new(0));
        let (q, total) = (Arc::clone(&quit), Arc::clone(&used_total));
        let thread = std::thread::spawn(move || {
            // Runs until dropped (also when the test panics: the storm is dropped while unwinding). The bound only
            // keeps a thread from outliving a wedged test; it was 5 s, which eight settled rounds on two loaded
            // CPUs can exceed: the storm then stopped publishing and a later round "took nothing".
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
            let idx = |base: GuestAddress| base.unchecked_add(2);
            let mut published: u16 = mem.load(idx(avail), Ordering::Acquire).expect("avail idx");
            let mut last_used: u16 = mem.load(idx(used), Ordering::Acquire).expect("used idx");
            let mut seen = 0u64;
            while !q.load(Ordering::Relaxed) && std::time::Instant::now() < deadline {
                let now: u16 = mem.load(idx(used), Ordering::Acquire).expect("used idx");
                seen += u64::from(now.wrapping_sub(last_used));
                last_used = now;
                total.store(seen, Ordering::SeqCst);
                if published.wrapping_sub(now) >= QUEUE_SIZE {
                    std::hint::spin_loop();
                    continue;
                }
                let entry = avail.unchecked_add(4 + 2 * u64::from(published % QUEUE_SIZE));
                mem.write_obj(0u16, entry).expect("avail entry");
                published = published.wrapping_add(1);
                mem.store(published, idx(avail), Ordering::Release).expect("avail idx");
            }
        });
        ChainStorm { quit, used_total, thread: Some(thread) }
    }

    /// Used entries seen so far, once the storm has seen every entry the worker returned and published a full
    /// ring ahead of them again (call while the worker is not running). Waits on the rings themselves, not on
    /// time: on loaded CPUs the storm thread may not run for a while (a settling delay of 20 ms once measured a
    /// round as having taken nothing).
    fn settled_used(&self, mem: &GuestMemory, avail: GuestAddress, used: GuestAddress) -> u64 {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let idx = |base: GuestAddress| mem.load::<u16>(base.unchecked_add(2), Ordering::Acquire).expect("index");
        loop {
            let used_idx = idx(used);
            let seen = self.used_total.load(Ordering::SeqCst);
            let full = idx(avail).wrapping_sub(used_idx) == QUEUE_SIZE;
            if (full && seen % 65536 == u64::from(used_idx)) || std::time::Instant::now() > deadline {
                return seen;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
}

impl Drop for ChainStorm {
    fn drop(&mut self) {
        self.quit.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn readable(fd: RawFd) -> bool {
    let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut pfd, 1, 0) == 1 }
}

#[test]
fn a_guest_always_one_malformed_chain_ahead_gets_rounds_of_at_most_a_ring() {
    let h = Harness::new();
    let snapshot = h.atomic.memory();
    let driver = h.driver(&snapshot);
    let mut worker = h.worker(EngineKind::Sync);
    // Rings of our own (the mock's used ring overlaps the second half of its avail ring, which a driver going
    // round and round the ring reaches), over the mock's descriptor table.
    let (avail, used) = (GuestAddress(0x8000), GuestAddress(0x9000));
    h.vring.set_queue_info(driver.mq.desc_table_addr().0, avail.0, used.0).expect("ring addresses");
    // Descriptor 0: a lone 16-byte header, no status byte.
    let header = driver.mq.desc_table_addr();
    snapshot.write_obj(HEADERS, header).expect("descriptor address");
    snapshot.write_obj(16u32, header.unchecked_add(8)).expect("descriptor length");
    snapshot.write_obj(0u32, header.unchecked_add(12)).expect("descriptor flags and next");
    let storm = ChainStorm::start(h.atomic.memory().into_inner(), avail, used);
    std::thread::sleep(std::time::Duration::from_millis(20));

    let mut total = 0;
    for round in 0..8 {
        let before = storm.settled_used(&snapshot, avail, used);
        if round == 0 {
            worker.on_kick(&h.vring, &h.atomic);
        } else {
            assert!(readable(worker.resume_fd()), "round {round}: the worker asked to come back for the rest");
            worker.on_resume(&h.vring, &h.atomic, true);
        }
        let taken = storm.settled_used(&snapshot, avail, used) - before;
        // Each round returns after at most a ring's worth of chains, releasing the vring, and asks to be resumed
        // (the guest need not kick again for chains it already published).
        assert!(taken <= u64::from(QUEUE_SIZE), "round {round} took {taken} chains (ring of {QUEUE_SIZE})");
        assert!(taken > 0, "round {round} took nothing");
        total += taken;
    }
    assert!(readable(worker.resume_fd()), "the storm still goes on: the worker will be back");
    drop(storm);
    assert!(total > u64::from(QUEUE_SIZE), "the storm kept the worker busy over several rounds ({total} chains)");
    assert_eq!(worker.in_flight(), 0, "malformed chains take no slot");
}
