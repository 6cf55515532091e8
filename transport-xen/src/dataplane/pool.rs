// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A bounded set of I/O threads serving the rings of every data plane of a process ([`IoThreads`]).
//!
//! Without a pool each ring gets a thread of its own; at many rings (queues × vbds) that costs a thread wake-up
//! per notification per ring, and the CPU per I/O grows with the ring count. With a pool of N threads, a ring goes
//! to the thread serving the fewest rings (threads are started as rings come, up to N). A thread waits in one
//! epoll on the rings' own epoll descriptors and gives every ring that has events (or work left, or a delayed
//! unmask due) one turn per pass: one round, at most a ring's worth of requests, and a polling period cut at the
//! polling time (the thread's epoll watches the rings' sources themselves: a turn needs no further system call
//! to learn what fired). A ring whose frontend keeps it busy therefore gets one round per pass like every other ring on
//! its thread, and cannot starve them.
//!
//! Each thread has one io_uring for all its rings, whatever their disks (`device_blk`'s open-ended
//! [`SharedUring`]): a ring's queue gets a lane of it when it starts ([`Seat::engine`]), and a pass is one round of
//! the shared ring, so the requests every ring took in the pass go to the kernel in one `io_uring_enter` at its
//! end (with one io_uring per ring, each ring's turn made its own, carrying a request or two at many vbds), and one
//! completion eventfd wakes the thread for all of them. Whichever ring reaps sorts every lane's completions: after
//! a pass, rings whose lanes hold completions get a turn without waiting for an event (the eventfd already fired
//! for them). A queue whose lane cannot be had (the ring's room is taken, no io_uring) builds an engine of its own.
//!
//! A ring handed to a thread gets a ticket ([`Handed`]); the thread marks it released once it dropped the ring
//! and freed its memory, so [`Dataplane::stop`](super::Dataplane::stop) returns only when nothing of the ring is
//! left (the signal lives in the thread's [`Inbox`], which outlives the ring: no memory of the ring is freed after
//! it).

use std::os::fd::AsRawFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, PoisonError};
use std::time::Instant;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use device_blk::engine::{Batching, EngineError, IoEngine, SharedUring, UringLane};
use device_blk::stats::QueueStats;
use device_blk::Disk;

use super::slot::SpareSlots;
use super::worker::{RingTask, SOURCES};
use super::WorkerInit;

/// The most threads a pool may have.
pub const MAX_IO_THREADS: usize = 64;
/// The most spare slots a pool thread keeps ([`IoThreads::with_spare_slots`]).
pub const MAX_SPARE_SLOTS: usize = 1024;

/// The token of a thread's wake-up eventfd (a ring's sources use `slot * STRIDE + kind`).
const TOKEN_NEW: u64 = u64::MAX;
/// The token of the completion eventfd of the thread's shared io_uring.
const TOKEN_SHARED: u64 = u64::MAX - 1;
/// The kind of a ring's completion source: its index in `RingTask::sources`, and its bit in `ready`.
const COMPLETION_KIND: usize = 1;
const COMPLETION: u8 = 1 << COMPLETION_KIND;
/// Disks (queues) a thread's shared io_uring serves at most; queues beyond get engines of their own.
const SHARED_FILES: u32 = 256;
/// The fewest operations in flight a queue's lane is given where its thread's io_uring is nearly full (below,
/// the queue gets an engine of its own).
pub(crate) const MIN_LANE_DEPTH: u32 = 16;
/// Submission entries of a thread's shared io_uring (a fuller pass is submitted in pieces).
const SHARED_ENTRIES: u32 = 256;
/// Operations in flight over all the lanes of a thread's shared io_uring (its completion queue's size).
const SHARED_LIMIT: u32 = 4096;
/// Entries of a pass submitted before its end once this many are queued (so that the first rings' requests do
/// not wait for the whole pass at many rings; well above the block layer's plugging threshold).
const SHARED_BATCH: usize = 16;
const STRIDE: u64 = 4;
/// A ring's first turn (its frontend may have queued requests before its port was bound), in its `ready` bits.
const FIRST_TURN: u8 = 0x80;
/// The event channel and the completions (the kinds before the stop request's, see `RingTask::sources`).
const SOURCES_BUT_STOP: u8 = (1 << (SOURCES - 1)) - 1;
/// Most epoll events taken per wait.
const EVENTS: usize = 64;

/// A ring to serve, built on the thread that serves it.
pub(crate) type NewRing = Box<dyn FnOnce() -> Option<Box<dyn RingTask>> + Send>;

/// A bounded set of I/O threads shared by every [`Dataplane`](super::Dataplane) started with (a clone of) it.
/// Threads are started as rings come; they end once every handle is dropped and their rings stopped.
#[derive(Clone)]
pub struct IoThreads(Arc<Pool>);

struct Pool {
    count: usize,
    /// Spare slots each thread keeps ([`IoThreads::with_spare_slots`]).
    spare_slots: usize,
    threads: Mutex<Vec<Arc<Inbox>>>,
    /// Shared io_urings made in advance ([`IoThreads::make_rings`]) for the threads not started yet.
    made: Mutex<Vec<SharedUring>>,
}

/// What a pool thread is handed.
struct Inbox {
    /// Every handle of the pool is gone: the thread ends once its rings are.
    closed: AtomicBool,
    rings: AtomicUsize,
    /// The rings handed over and not yet taken by the thread, with their tickets.
    new: Mutex<Vec<(u64, NewRing)>>,
    wake: EventFd,
    /// The next ticket.
    tickets: AtomicU64,
    /// The tickets of the rings handed over and not released yet; `released` is signalled when one goes.
    unreleased: Mutex<Vec<u64>>,
    released: Condvar,
    /// The io_uring the thread's rings share, made with the first lane (`None`: io_uring is not available).
    ring: OnceLock<Option<SharedUring>>,
    /// The `device-blk` counters of the thread's queues that nobody reports (a data plane started without a stats
    /// registry): one set for all of them, made once, instead of 40 KiB of histograms made and zeroed per queue.
    unreported: OnceLock<Arc<QueueStats>>,
    /// The slots of the thread's stopped queues kept for its next ones (`None`: none kept).
    spares: Option<Arc<SpareSlots>>,
}

impl Inbox {
    fn shared(&self) -> Option<&SharedUring> {
        self.ring.get().and_then(Option::as_ref)
    }
}

impl std::fmt::Debug for IoThreads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoThreads").field("count", &self.0.count).finish()
    }
}

impl IoThreads {
    /// A pool of `count` threads (1..=[`MAX_IO_THREADS`]; other values are clamped).
    pub fn new(count: usize) -> IoThreads {
        IoThreads::with_spare_slots(count, 0)
    }

    /// As [`new`](Self::new), each thread keeping the in-flight slots (a request's buffers: up to 14 KiB each with
    /// indirect segments, under 1 KiB without) of the queues it stopped, at most `spare_slots` (at most
    /// [`MAX_SPARE_SLOTS`]), for the queues it starts later: a data plane started after another one stopped then
    /// makes no slot its predecessor made (e.g. a fuzzer that starts one per input). The memory stays with the
    /// thread while no queue uses it.
    pub fn with_spare_slots(count: usize, spare_slots: usize) -> IoThreads {
        IoThreads(Arc::new(Pool {
            count: count.clamp(1, MAX_IO_THREADS),
            spare_slots: spare_slots.min(MAX_SPARE_SLOTS),
            threads: Mutex::new(Vec::new()),
            made: Mutex::new(Vec::new()),
        }))
    }

    /// Make now the shared io_uring of every thread the pool may still start, instead of with each thread's first
    /// lane: for a process that forbids itself `io_uring_setup` once it has locked itself down (a ring made
    /// afterwards could do what its system call filter forbids: the filter does not see what a ring does). Each
    /// ring goes to the thread that starts next, for the pool's lifetime; a thread started with none left (or
    /// where this failed) makes its own with its first lane, as without this call. Fails if a ring cannot be made
    /// (no io_uring: the queues then get engines of their own).
    pub fn make_rings(&self) -> Result<usize, EngineError> {
        let started = self.0.threads.lock().unwrap_or_else(PoisonError::into_inner).len();
        let mut made = self.0.made.lock().unwrap_or_else(PoisonError::into_inner);
        while started + made.len() < self.0.count {
            made.push(SharedUring::open_ended(SHARED_FILES, SHARED_ENTRIES, SHARED_LIMIT, Batching::Whole)?);
        }
        Ok(made.len())
    }

    /// Spare slots the threads keep now ([`with_spare_slots`](Self::with_spare_slots)).
    pub fn spare_slots(&self) -> usize {
        let threads = self.0.threads.lock().unwrap_or_else(PoisonError::into_inner);
        threads.iter().filter_map(|t| t.spares.as_ref()).map(|s| s.len()).sum()
    }

    /// The most threads the pool runs.
    pub fn count(&self) -> usize {
        self.0.count
    }

    /// Rings each started thread serves now.
    pub fn rings_per_thread(&self) -> Vec<usize> {
        let threads = self.0.threads.lock().unwrap_or_else(PoisonError::into_inner);
        threads.iter().map(|t| t.rings.load(Ordering::Relaxed)).collect()
    }

    /// A ring made in advance for the next thread ([`make_rings`](Self::make_rings)), if one is left.
    fn take_made_ring(&self) -> OnceLock<Option<SharedUring>> {
        let ring = OnceLock::new();
        if let Some(made) = self.0.made.lock().unwrap_or_else(PoisonError::into_inner).pop() {
            let _ = ring.set(Some(made));
        }
        ring
    }

    /// A place for a ring on the thread serving the fewest rings (a new thread while fewer than `count` run;
    /// `init` runs on a new thread before it serves). The ring is counted on that thread from now on.
    pub(crate) fn seat(&self, init: Option<&WorkerInit>) -> std::io::Result<Seat> {
        let mut threads = self.0.threads.lock().unwrap_or_else(PoisonError::into_inner);
        let idle = threads.iter().min_by_key(|t| t.rings.load(Ordering::Relaxed)).cloned();
        let inbox = match idle {
            Some(t) if threads.len() >= self.0.count || t.rings.load(Ordering::Relaxed) == 0 => t,
            _ => {
                let index = threads.len();
                let inbox = Arc::new(Inbox {
                    closed: AtomicBool::new(false),
                    rings: AtomicUsize::new(0),
                    new: Mutex::new(Vec::new()),
                    wake: EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
                    tickets: AtomicU64::new(0),
                    unreleased: Mutex::new(Vec::new()),
                    released: Condvar::new(),
                    ring: self.take_made_ring(),
                    unreported: OnceLock::new(),
                    spares: (self.0.spare_slots > 0).then(|| Arc::new(SpareSlots::new(self.0.spare_slots))),
                });
                let epoll = Arc::new(Epoll::new()?);
                epoll.ctl(ControlOperation::Add, inbox.wake.as_raw_fd(), EpollEvent::new(EventSet::IN, TOKEN_NEW))?;
                let (served, init) = (inbox.clone(), init.cloned());
                std::thread::Builder::new()
                    .name(format!("blkif-io{index}"))
                    .spawn(move || serve(&served, &epoll, init.as_ref(), index))?;
                threads.push(inbox.clone());
                inbox
            }
        };
        inbox.rings.fetch_add(1, Ordering::Relaxed);
        Ok(Seat { inbox: Some(inbox) })
    }
}

/// A ring's place on a pool thread ([`IoThreads::seat`]): gives the ring's queue a lane of the thread's io_uring,
/// then takes the ring to the thread. Dropped without [`hand_over`](Seat::hand_over), it leaves the count.
pub(crate) struct Seat {
    inbox: Option<Arc<Inbox>>,
}

impl Seat {
    /// A lane of the thread's shared io_uring for a queue of up to `depth` on `disk` (the ring is made with the
    /// thread's first lane, unless made in advance); `None` where there is none to be had (the caller builds an
    /// engine of its own). Where the ring has room for fewer operations than `depth`, though for at least
    /// [`MIN_LANE_DEPTH`] (or `depth` if less), the lane gets that room: its queue keeps the rest waiting in its
    /// ring, where an engine of its own could be synchronous I/O (a process that may make no new ring) and would
    /// hold the thread's other rings while it works. The lane's depth is its
    /// [`capacity`](device_blk::engine::IoEngine::capacity).
    pub(crate) fn engine(&self, disk: Arc<Disk>, depth: u32) -> Option<UringLane> {
        let inbox = self.inbox.as_ref()?;
        let ring = inbox.ring.get_or_init(|| {
            SharedUring::open_ended(SHARED_FILES, SHARED_ENTRIES, SHARED_LIMIT, Batching::Whole)
                .inspect_err(|error| tracing::debug!(%error, "no shared io_uring for the I/O thread"))
                .ok()
        });
        let lane = ring.as_ref()?.add_lane_within(disk, depth, MIN_LANE_DEPTH);
        if let Some(lane) = lane.as_ref().ok().filter(|lane| lane.capacity() < depth as usize) {
            tracing::info!(
                depth,
                fitted = lane.capacity(),
                "the I/O thread's io_uring is nearly full: the queue gets fewer in flight"
            );
        }
        lane.inspect_err(|error: &EngineError| {
            tracing::debug!(%error, "the I/O thread's io_uring has no room for the queue; it gets an engine of its own")
        })
        .ok()
    }

    /// Counters for a queue of the thread whose counters nobody reads: shared by every such queue of the thread
    /// (only the thread updates them).
    pub(crate) fn unreported_stats(&self) -> Option<Arc<QueueStats>> {
        self.inbox.as_ref().map(|inbox| inbox.unreported.get_or_init(Arc::default).clone())
    }

    /// Where the queue's slots come from and go (the thread's spare slots), if the pool keeps any.
    pub(crate) fn spare_slots(&self) -> Option<Arc<SpareSlots>> {
        self.inbox.as_ref().and_then(|inbox| inbox.spares.clone())
    }

    /// Hand `ring` to the thread; [`Handed::wait_released`] waits until the thread released it.
    pub(crate) fn hand_over(mut self, ring: NewRing) -> Option<Handed> {
        let inbox = self.inbox.take()?;
        let ticket = inbox.tickets.fetch_add(1, Ordering::Relaxed);
        inbox.unreleased.lock().unwrap_or_else(PoisonError::into_inner).push(ticket);
        inbox.new.lock().unwrap_or_else(PoisonError::into_inner).push((ticket, ring));
        // The ring is handed over: it must not fail now. A write fails only on a counter at its maximum, which
        // wakes the thread all the same.
        let _ = inbox.wake.write(1);
        Some(Handed { inbox, ticket })
    }
}

/// A ring handed to a pool thread ([`Seat::hand_over`]).
pub(crate) struct Handed {
    inbox: Arc<Inbox>,
    ticket: u64,
}

impl std::fmt::Debug for Handed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handed").field("ticket", &self.ticket).finish()
    }
}

impl Handed {
    /// Wait until the thread dropped the ring (after it stopped, or failed to start) and freed all of it.
    pub(crate) fn wait_released(self) {
        let mut unreleased = self.inbox.unreleased.lock().unwrap_or_else(PoisonError::into_inner);
        while unreleased.contains(&self.ticket) {
            unreleased = self.inbox.released.wait(unreleased).unwrap_or_else(PoisonError::into_inner);
        }
    }
}

/// Marks a ring released when dropped: held by the thread next to the ring, and dropped after it (also when the
/// ring could not be built, and when the thread unwinds).
struct Release<'a> {
    inbox: &'a Inbox,
    ticket: u64,
}

impl Drop for Release<'_> {
    fn drop(&mut self) {
        let mut unreleased = self.inbox.unreleased.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(i) = unreleased.iter().position(|&t| t == self.ticket) {
            unreleased.swap_remove(i);
        }
        self.inbox.released.notify_all();
    }
}

impl Drop for Seat {
    fn drop(&mut self) {
        if let Some(inbox) = self.inbox.take() {
            inbox.rings.fetch_sub(1, Ordering::Relaxed);
            // A lane made for the ring and dropped on this thread (a start that failed after making it) may have
            // left its disk in the thread's io_uring, whose file table only the thread may change once it enabled
            // the ring: a pass of the thread (`begin_round`) takes it out, so wake it rather than wait for an event.
            let _ = inbox.wake.write(1);
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let threads = self.threads.get_mut().unwrap_or_else(PoisonError::into_inner);
        for t in threads.iter() {
            t.closed.store(true, Ordering::SeqCst);
            let _ = t.wake.write(1);
        }
    }
}

/// A pool thread's rings, by slot (the slot is the ring's epoll token).
struct Rings<'a> {
    slots: Vec<Option<Box<dyn RingTask>>>,
    /// Per slot: what marks the ring released (after `slots`: a thread that unwinds drops its rings first).
    releases: Vec<Option<Release<'a>>>,
    /// The rings taken from the inbox (kept for its capacity).
    incoming: Vec<(u64, NewRing)>,
    /// Per slot: the ring's completions come through the thread's shared io_uring.
    on_shared: Vec<bool>,
    /// The shared io_uring's completion eventfd is in the thread's epoll.
    shared_watched: bool,
    /// The ring's sources that fired since its last turn (bits by kind, or [`FIRST_TURN`]).
    ready: Vec<u8>,
    epoll: &'a Arc<Epoll>,
    inbox: &'a Inbox,
}

impl Rings<'_> {
    /// Build the rings handed over and add them to the epoll (each gets a first turn: its frontend may have queued
    /// requests before the port was bound).
    fn take_new(&mut self, init_error: Option<&str>) {
        let _ = self.inbox.wake.read();
        let mut new = std::mem::take(&mut self.incoming);
        std::mem::swap(&mut new, &mut *self.inbox.new.lock().unwrap_or_else(PoisonError::into_inner));
        for (ticket, build) in new.drain(..) {
            // Declared before the task: on every path below that gives up the ring, the task goes first.
            let release = Release { inbox: self.inbox, ticket };
            let mut task = match catch_unwind(AssertUnwindSafe(build)) {
                Ok(Some(task)) => task,
                Ok(None) | Err(_) => {
                    self.inbox.rings.fetch_sub(1, Ordering::Relaxed);
                    continue;
                }
            };
            if let Some(e) = init_error {
                task.report(&format!("cannot prepare the I/O thread: {e}"));
                self.inbox.rings.fetch_sub(1, Ordering::Relaxed);
                continue;
            }
            let slot = self.slots.iter().position(Option::is_none).unwrap_or(self.slots.len());
            let base = slot as u64 * STRIDE;
            let shared_fd = self.inbox.shared().map(SharedUring::completion_fd);
            let on_shared = shared_fd.is_some_and(|fd| task.sources()[COMPLETION_KIND].0 == fd);
            if let Some(fd) = shared_fd.filter(|_| on_shared && !self.shared_watched) {
                let events = EventSet::IN | EventSet::EDGE_TRIGGERED;
                match self.epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(events, TOKEN_SHARED)) {
                    Ok(()) => self.shared_watched = true,
                    Err(e) => {
                        task.report(&format!("epoll_ctl (I/O thread's io_uring): {e}"));
                        self.inbox.rings.fetch_sub(1, Ordering::Relaxed);
                        continue;
                    }
                }
            }
            // The shared io_uring's eventfd is watched once, for every ring on it.
            let added = (base..).zip(task.sources()).enumerate().try_for_each(|(kind, (token, (fd, events)))| {
                if on_shared && kind == COMPLETION_KIND {
                    return Ok(());
                }
                self.epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
            });
            if let Err(e) = added {
                self.forget(task.as_ref(), on_shared);
                task.report(&format!("epoll_ctl (I/O thread): {e}"));
                self.inbox.rings.fetch_sub(1, Ordering::Relaxed);
                continue;
            }
            task.attach(self.epoll.clone());
            if slot == self.slots.len() {
                self.slots.push(None);
                self.releases.push(None);
                self.ready.push(0);
                self.on_shared.push(false);
            }
            self.slots[slot] = Some(task);
            self.releases[slot] = Some(release);
            self.ready[slot] = FIRST_TURN;
            self.on_shared[slot] = on_shared;
        }
        self.incoming = new;
    }

    /// Stop watching `task`'s sources (before it is dropped: their descriptors close), but for the shared
    /// io_uring's eventfd, which serves the other rings.
    fn forget(&self, task: &dyn RingTask, on_shared: bool) {
        for (kind, (fd, _)) in task.sources().into_iter().enumerate() {
            if on_shared && kind == COMPLETION_KIND {
                continue;
            }
            let _ = self.epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
    }

    /// A ring on the shared io_uring whose lane holds completions, or has operations in flight while the ring
    /// has completions to sort (after its eventfd fired, or after another ring's reap sorted them once the
    /// eventfd's signal was taken), gets a turn; rings with nothing in flight do not.
    fn shared_completions(&mut self) {
        for slot in 0..self.slots.len() {
            if !self.on_shared[slot] {
                continue;
            }
            if self.slots[slot].as_mut().is_some_and(|task| task.completions_pending()) {
                self.ready[slot] |= COMPLETION;
            }
        }
    }

    /// Rings that get a turn in this pass (an event fired for them, or they want one now).
    /// (The clock is read only for a ring that wants a turn at a time: a system call in a PV dom0.)
    fn with_work(&self) -> usize {
        let mut now = None;
        self.slots
            .iter()
            .zip(&self.ready)
            .filter(|(task, &fired)| {
                task.as_ref().is_some_and(|t| {
                    fired != 0 || t.wake_at().is_some_and(|at| at <= *now.get_or_insert_with(Instant::now))
                })
            })
            .count()
    }

    /// How long the thread may sleep: until the earliest ring wants a turn without an event (-1: no such ring).
    fn timeout(&self) -> i32 {
        if self.ready.iter().any(|&r| r != 0) {
            return 0;
        }
        let Some(at) = self.slots.iter().flatten().filter_map(|t| t.wake_at()).min() else { return -1 };
        let wait = at.saturating_duration_since(Instant::now());
        if wait.is_zero() {
            return 0;
        }
        i32::try_from(wait.as_millis() + 1).unwrap_or(i32::MAX)
    }

    /// One turn for every ring that had events or wants one now; rings that finished (or panicked) go.
    fn turns(&mut self) {
        let shared = self.inbox.shared();
        for slot in 0..self.slots.len() {
            if let Some(ring) = shared {
                // Requests of the rings before in the pass go out once they make a batch.
                ring.submit_if_at_least(SHARED_BATCH);
            }
            let fired = std::mem::take(&mut self.ready[slot]);
            let Some(task) = self.slots[slot].as_mut() else { continue };
            // (`wake_at` says "now" as the time it is called.)
            if fired == 0 && task.wake_at().is_none_or(|at| at > Instant::now()) {
                continue;
            }
            let alive = match catch_unwind(AssertUnwindSafe(|| task.turn(fired & !FIRST_TURN))) {
                Ok(alive) => alive,
                Err(_) => {
                    task.report("worker died");
                    false
                }
            };
            if !alive {
                // Counted out first: `Dataplane::stop` returns as soon as the ring is released.
                self.inbox.rings.fetch_sub(1, Ordering::Relaxed);
                if let Some(task) = self.slots[slot].take() {
                    let on_shared = std::mem::take(&mut self.on_shared[slot]);
                    self.forget(task.as_ref(), on_shared);
                    // Dropping the ring releases what is left (grants, port, engine) and frees its memory.
                    drop(task);
                }
                // Only then is `Dataplane::stop` told: nothing of the ring is freed after it returns.
                drop(self.releases[slot].take());
            }
        }
    }
}

/// A pool thread's body: ends when every handle of the pool is gone and its last ring stopped.
fn serve(inbox: &Inbox, epoll: &Arc<Epoll>, init: Option<&WorkerInit>, index: usize) {
    let init_error = init.and_then(|i| i.run(index).err()).map(|e| e.to_string());
    let mut rings = Rings {
        slots: Vec::new(),
        releases: Vec::new(),
        incoming: Vec::new(),
        on_shared: Vec::new(),
        shared_watched: false,
        ready: Vec::new(),
        epoll,
        inbox,
    };
    let mut events = [EpollEvent::default(); EVENTS];
    loop {
        let n = match epoll.wait(rings.timeout(), &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => 0,
            Err(e) => {
                // Never abandon a ring (its pages stay mapped while I/O is in flight): look at every ring.
                tracing::error!(thread = index, error = %e, "epoll_wait failed, polling");
                std::thread::sleep(std::time::Duration::from_millis(10));
                // (Not the stop request: only its eventfd says it came.)
                rings.ready.iter_mut().for_each(|r| *r |= SOURCES_BUT_STOP);
                0
            }
        };
        for ev in &events[..n] {
            match ev.data() {
                TOKEN_NEW => rings.take_new(init_error.as_deref()),
                TOKEN_SHARED => rings.shared_completions(),
                token => {
                    let (slot, kind) = (token / STRIDE, token % STRIDE);
                    if let Some(r) = usize::try_from(slot).ok().and_then(|s| rings.ready.get_mut(s)) {
                        *r |= 1 << kind;
                    }
                }
            }
        }
        // One round of the shared io_uring when several rings have work: what their turns queue goes to the
        // kernel at its end, together. A ring alone submits in its own pass, as a ring with a thread of its own
        // does: the `io_uring_enter` that submits also runs the completion work the kernel holds, and the pass
        // answers those completions at once. (Deferred to the round's end, they were posted after the pass, and
        // the ring needed a second turn to answer them: in the real lab, twice the wake-ups and frontend
        // notifications per I/O, and 1.18× the CPU per I/O of one thread per ring.)
        let shared = inbox.shared();
        let round = shared.filter(|_| rings.with_work() > 1);
        match (round, shared) {
            (Some(ring), _) => ring.begin_round(),
            (None, Some(ring)) => ring.apply_file_changes(),
            (None, None) => {}
        }
        rings.turns();
        if let Some(ring) = round {
            ring.end_round();
        }
        if shared.is_some() {
            rings.shared_completions();
        }
        if inbox.closed.load(Ordering::SeqCst) && rings.slots.iter().all(Option::is_none) {
            let new = inbox.new.lock().unwrap_or_else(PoisonError::into_inner);
            if new.is_empty() {
                return;
            }
        }
    }
}

#[cfg(test)]
#[path = "pool_tests.rs"]
mod tests;
