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

use std::os::fd::AsRawFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::worker::{RingTask, SOURCES};
use super::WorkerInit;

/// The most threads a pool may have.
pub const MAX_IO_THREADS: usize = 64;

/// The token of a thread's wake-up eventfd (a ring's sources use `slot * STRIDE + kind`).
const TOKEN_NEW: u64 = u64::MAX;
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
    threads: Mutex<Vec<Arc<Inbox>>>,
}

/// What a pool thread is handed.
struct Inbox {
    /// Every handle of the pool is gone: the thread ends once its rings are.
    closed: AtomicBool,
    rings: AtomicUsize,
    new: Mutex<Vec<NewRing>>,
    wake: EventFd,
}

impl std::fmt::Debug for IoThreads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoThreads").field("count", &self.0.count).finish()
    }
}

impl IoThreads {
    /// A pool of `count` threads (1..=[`MAX_IO_THREADS`]; other values are clamped).
    pub fn new(count: usize) -> IoThreads {
        IoThreads(Arc::new(Pool { count: count.clamp(1, MAX_IO_THREADS), threads: Mutex::new(Vec::new()) }))
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

    /// Hand `ring` to the thread serving the fewest rings (a new thread while fewer than `count` run; `init` runs
    /// on a new thread before it serves).
    pub(crate) fn add(&self, ring: NewRing, init: Option<&WorkerInit>) -> std::io::Result<()> {
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
                    wake: EventFd::new(EFD_NONBLOCK)?,
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
        inbox.new.lock().unwrap_or_else(PoisonError::into_inner).push(ring);
        // The ring is handed over: it must not fail now. A write fails only on a counter at its maximum, which
        // wakes the thread all the same.
        let _ = inbox.wake.write(1);
        Ok(())
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
        let new = std::mem::take(&mut *self.inbox.new.lock().unwrap_or_else(PoisonError::into_inner));
        for build in new {
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
            let added = (base..).zip(task.sources()).try_for_each(|(token, (fd, events))| {
                self.epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
            });
            if let Err(e) = added {
                self.forget(task.as_ref());
                task.report(&format!("epoll_ctl (I/O thread): {e}"));
                self.inbox.rings.fetch_sub(1, Ordering::Relaxed);
                continue;
            }
            task.attach(self.epoll.clone());
            if slot == self.slots.len() {
                self.slots.push(None);
                self.ready.push(0);
            }
            self.slots[slot] = Some(task);
            self.ready[slot] = FIRST_TURN;
        }
    }

    /// Stop watching `task`'s sources (before it is dropped: their descriptors close).
    fn forget(&self, task: &dyn RingTask) {
        for (fd, _) in task.sources() {
            let _ = self.epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
    }

    /// How long the thread may sleep: until the earliest ring wants a turn without an event (-1: no such ring).
    fn timeout(&self) -> i32 {
        let Some(at) = self.slots.iter().flatten().filter_map(|t| t.wake_at()).min() else { return -1 };
        let wait = at.saturating_duration_since(Instant::now());
        if wait.is_zero() {
            return 0;
        }
        i32::try_from(wait.as_millis() + 1).unwrap_or(i32::MAX)
    }

    /// One turn for every ring that had events or wants one now; rings that finished (or panicked) go.
    fn turns(&mut self) {
        for slot in 0..self.slots.len() {
            let Some(task) = self.slots[slot].as_mut() else { continue };
            let fired = std::mem::take(&mut self.ready[slot]);
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
                // Counted out first: `Dataplane::stop` returns as soon as the ring is dropped.
                self.inbox.rings.fetch_sub(1, Ordering::Relaxed);
                if let Some(task) = self.slots[slot].take() {
                    self.forget(task.as_ref());
                    // Dropping the ring releases what is left and tells `Dataplane::stop` it is gone.
                    drop(task);
                }
            }
        }
    }
}

/// A pool thread's body: ends when every handle of the pool is gone and its last ring stopped.
fn serve(inbox: &Inbox, epoll: &Arc<Epoll>, init: Option<&WorkerInit>, index: usize) {
    let init_error = init.and_then(|i| i.run(index).err()).map(|e| e.to_string());
    let mut rings = Rings { slots: Vec::new(), ready: Vec::new(), epoll, inbox };
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
                token => {
                    let (slot, kind) = (token / STRIDE, token % STRIDE);
                    if let Some(r) = usize::try_from(slot).ok().and_then(|s| rings.ready.get_mut(s)) {
                        *r |= 1 << kind;
                    }
                }
            }
        }
        rings.turns();
        if inbox.closed.load(Ordering::SeqCst) && rings.slots.iter().all(Option::is_none) {
            let new = inbox.new.lock().unwrap_or_else(PoisonError::into_inner);
            if new.is_empty() {
                return;
            }
        }
    }
}
