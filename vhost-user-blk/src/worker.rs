// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! One queue's worker: pops descriptor chains, feeds the [`BlockQueue`], and answers completions.
//!
//! It runs on the I/O thread that serves the queue (see [`threads`](super::threads)), which owns the engine: an
//! io_uring ring with `SINGLE_ISSUER` may only be submitted to from the thread that created it.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use vhost_user_backend::{VringRwLock, VringState, VringT};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::dirty::DirtyBitmap;
use super::VhostUserBlkOptions;
use device_blk::disk::Disk;
use device_blk::engine::{EngineError, SharedUring};
use device_blk::queue::{BlockQueue, Finished, OwnsGuestMemory};
use device_blk::request::Request;
use device_blk::virtio::{parse_chain, status_code, ChainError, Parsed};

/// Guest memory as vhost-user-backend maps it, with the dirty bitmap that logs our writes into the frontend's
/// log once it sends `SET_LOG_BASE` (live migration, `VHOST_USER_PROTOCOL_F_LOG_SHMFD`); until then a write
/// costs one flag load (see [`DirtyBitmap`]).
pub type GuestMemory = GuestMemoryMmap<DirtyBitmap>;
/// The memory handle the vhost-user handler updates on `SET_MEM_TABLE`/`ADD_MEM_REGION`.
pub type AtomicGuestMemory = GuestMemoryAtomic<GuestMemory>;
/// The vring type of our backend.
pub type BlkVring = VringRwLock<AtomicGuestMemory>;

type RingState = VringState<AtomicGuestMemory>;

/// What travels with a request through the engine: where to answer, and the memory snapshot that keeps the
/// request's buffers mapped until it completes ([`OwnsGuestMemory`], for [`BlockQueue::submit_owned`]).
struct Cookie {
    head: u16,
    status: GuestAddress,
    mem: Arc<GuestMemory>,
}

// SAFETY: the snapshot lives behind the cookie's `Arc` (it does not move with the cookie) and stays mapped as long
// as the `Arc` does; `guest_memory` always returns that snapshot.
unsafe impl OwnsGuestMemory for Cookie {
    type Memory = GuestMemory;
    fn guest_memory(&self) -> &GuestMemory {
        &self.mem
    }
}

/// A queue's request pipeline and the state of its ring processing.
pub(super) struct QueueWorker {
    index: usize,
    queue: BlockQueue<Cookie>,
    request: Request,
    seg_max: usize,
    /// Chains were left in the avail ring for lack of room; completions resume popping.
    blocked: bool,
    /// The last pop found the avail ring broken (e.g. an index more than a ring ahead): nothing can be taken until
    /// the driver resets the queue, so neither re-arming nor polling may go round again for it.
    broken: bool,
    /// Malformed chains seen: the first is logged as a warning, the rest at debug level.
    malformed: u64,
    /// Signalled when a round stopped popping at its budget: the worker thread watches it and comes back for the
    /// rest without waiting for a kick (which a guest need not send for chains it already published).
    resume: EventFd,
    /// The engine is a lane of the thread's ring, whose completion eventfd the thread watches once for all.
    shared: bool,
}

impl QueueWorker {
    /// A worker for queue `index` with the engine `options` ask for: a lane of `ring` (its thread's io_uring)
    /// if there is one, else an engine of its own; call on the queue's thread.
    pub(super) fn new(
        index: usize,
        disk: &Arc<Disk>,
        options: &VhostUserBlkOptions,
        seg_max: usize,
        ring: Option<&SharedUring>,
    ) -> Result<Self, EngineError> {
        let depth = options.effective_io_depth();
        let lane = ring.and_then(SharedUring::lane);
        let shared = lane.is_some();
        let engine = match lane {
            Some(lane) => Box::new(lane),
            None => options.engine.build_with(Arc::clone(disk), depth, options.batching)?,
        };
        let engine = match &options.engine_wrapper {
            Some(wrapper) => wrapper.wrap(engine),
            None => engine,
        };
        let resume = EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC)
            .map_err(|source| EngineError::Io { what: "resume eventfd", cause: source })?;
        tracing::debug!(queue = index, engine = engine.name(), depth, "queue worker started");
        Ok(QueueWorker {
            index,
            queue: BlockQueue::new(*disk.geometry(), options.serial, engine)
                .follow_capacity(disk.capacity_handle())
                .log_reads(),
            request: Request::with_capacity(),
            seg_max,
            blocked: false,
            broken: false,
            malformed: 0,
            resume,
            shared,
        })
    }

    /// The eventfd signalled when a round left chains in the ring for the next one, for the worker's epoll
    /// (level-triggered; [`on_resume`](Self::on_resume) clears it).
    pub(super) fn resume_fd(&self) -> RawFd {
        self.resume.as_raw_fd()
    }

    /// The worker's own wake-up after a round that used its budget: take the next share, as a kick would
    /// (unless `may_pop` is false: the device is shutting down, and only completions are answered).
    pub(super) fn on_resume(&mut self, vring: &BlkVring, mem: &AtomicGuestMemory, may_pop: bool) {
        let _ = self.resume.read();
        self.run(vring, mem, may_pop, false);
    }

    /// The engine's completion eventfd (the thread's, for a lane of its ring).
    pub(super) fn completion_fd(&self) -> RawFd {
        self.queue.completion_fd()
    }

    /// The engine's completion eventfd if it is the worker's own (not its thread's ring's), for the epoll.
    pub(super) fn own_completion_fd(&self) -> Option<RawFd> {
        (!self.shared).then(|| self.queue.completion_fd())
    }

    /// The queue's live counters.
    pub(super) fn stats(&self) -> &Arc<device_blk::stats::QueueStats> {
        self.queue.stats()
    }

    /// Whether requests finished that are not answered yet (no system call).
    pub(super) fn has_finished(&mut self) -> bool {
        self.queue.has_finished()
    }

    /// Whether the engine takes another request.
    pub(super) fn has_room(&self) -> bool {
        self.queue.has_room()
    }

    /// Requests submitted and not yet answered.
    pub(super) fn in_flight(&self) -> usize {
        self.queue.in_flight()
    }

    /// The guest kicked (or the ring was just enabled): answer what completed, then take every available chain.
    /// The completion eventfd is left to its own event (no system call here unless something finished).
    pub(super) fn on_kick(&mut self, vring: &BlkVring, mem: &AtomicGuestMemory) {
        self.run(vring, mem, true, false);
    }

    /// The engine signalled completions (its eventfd is watched edge-triggered, so it is not read here): answer
    /// them, and take what the guest published meanwhile (unless `may_pop` is false: the device is shutting
    /// down).
    pub(super) fn on_completion(&mut self, vring: &BlkVring, mem: &AtomicGuestMemory, may_pop: bool) {
        // Chains the guest published meanwhile go out in the same submission as the completions are fetched
        // with (their kick, if any, then finds nothing left).
        self.run(vring, mem, may_pop, false);
    }

    /// Polling starts: the guest need not kick while the worker looks at the ring by itself. (With EVENT_IDX
    /// nothing is written: the avail event is simply not moved on while polling, so the guest kicks at most once.)
    pub(super) fn disable_kicks(&mut self, vring: &BlkVring) {
        if let Err(error) = vring.get_mut().disable_notification() {
            tracing::debug!(queue = self.index, %error, "cannot disable guest notifications");
        }
    }

    /// One polling pass: answer what finished and take what the guest published (without re-arming its kicks).
    /// Makes no system call unless there is work. Returns whether there was any.
    pub(super) fn poll_once(&mut self, vring: &BlkVring, mem: &AtomicGuestMemory, may_pop: bool) -> bool {
        let mut ring = vring.get_mut();
        let mut used = false;
        let mut progress = false;
        if self.queue.has_finished() {
            self.answer_finished(&mut ring, &mut used, false);
            progress = true;
        }
        if may_pop && self.queue.has_room() && avail_pending(&ring, mem) {
            let snapshot = mem.memory().into_inner();
            // What the budget leaves is taken by the next pass (polling goes on while there is work).
            let size = ring.get_queue().size();
            let mut budget = size;
            self.pop_available(&mut ring, &snapshot, &mut used, &mut budget);
            if let Err(error) = self.queue.submit_batch() {
                tracing::error!(queue = self.index, %error, "submitting to the I/O engine failed");
            }
            self.answer_finished(&mut ring, &mut used, false);
            // Only chains taken are progress: a broken avail ring stays "pending" for ever.
            progress |= budget < size;
        }
        if used {
            notify_guest(&mut ring, self.index);
        }
        progress
    }

    /// Polling ends: clear the completion eventfd and re-arm guest kicks, then look once more. Returns whether
    /// work came in meanwhile (chains published that no kick will announce, or finished requests), which the
    /// caller must still take care of (poll on, or run [`on_kick`](Self::on_kick)) before sleeping.
    pub(super) fn rearm(&mut self, vring: &BlkVring, may_pop: bool) -> bool {
        let mut ring = vring.get_mut();
        self.queue.clear_completion_signal();
        let published = match ring.enable_notification() {
            Ok(more) => more,
            Err(error) => {
                tracing::debug!(queue = self.index, %error, "cannot re-arm guest notifications");
                false
            }
        };
        (published && may_pop && self.queue.has_room()) || self.queue.has_finished()
    }

    /// Wait for and answer every request in flight, without taking new ones (the last thing before the worker
    /// thread ends, so that no I/O outlives the memory it targets).
    pub(super) fn finish_in_flight(&mut self, vring: &BlkVring, mem: &AtomicGuestMemory) {
        loop {
            self.run(vring, mem, false, true);
            if self.in_flight() == 0 {
                return;
            }
            let mut pfd = libc::pollfd { fd: self.completion_fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: one valid pollfd for the duration of the call.
            let rc = unsafe { libc::poll(&mut pfd, 1, 5000) };
            if rc == 0 {
                tracing::warn!(
                    queue = self.index,
                    in_flight = self.in_flight(),
                    "still waiting for in-flight requests"
                );
            }
        }
    }

    /// Answer what finished (clearing the completion eventfd if `clear`), then with `pop` take the available
    /// chains, at most a ring's worth (counting malformed ones, answered at once), and submit them in one batch.
    ///
    /// The bound keeps a guest that always publishes one more chain (one answered at once frees its slot, so
    /// backpressure never stops us) from holding the vring lock, and the worker thread, forever: the used entries
    /// are published, the locks released, and the resume eventfd brings the worker back for the rest after it
    /// has looked at its other events.
    fn run(&mut self, vring: &BlkVring, mem: &AtomicGuestMemory, pop: bool, clear: bool) {
        let mut ring = vring.get_mut();
        let mut used = false;
        if clear || self.queue.has_finished() {
            self.answer_finished(&mut ring, &mut used, clear);
        }
        if pop && used && !self.shared {
            // Tell the guest before spending time on new submissions: it can reuse those buffers meanwhile. (On
            // the thread's shared ring the submissions wait for the end of the round, so the one signal after the
            // pops comes as early: one eventfd write per queue and round, not two.)
            notify_guest(&mut ring, self.index);
            used = false;
        }
        let mut budget = ring.get_queue().size();
        let mut exhausted = false;
        if pop {
            let snapshot = mem.memory().into_inner();
            loop {
                exhausted = self.pop_all(&mut ring, &snapshot, &mut used, &mut budget);
                if let Err(error) = self.queue.submit_batch() {
                    tracing::error!(queue = self.index, %error, "submitting to the I/O engine failed");
                }
                // Requests refused at submit time and fast completions are answered in the same batch...
                if self.queue.has_finished() {
                    self.answer_finished(&mut ring, &mut used, false);
                }
                // ...and may have made room for chains left in the ring, which no later event would bring back
                // (their completion signal was consumed right here).
                if exhausted || !(self.blocked && self.queue.has_room()) {
                    break;
                }
            }
        }
        if used {
            notify_guest(&mut ring, self.index);
        }
        drop(ring);
        if exhausted {
            if let Err(error) = self.resume.write(1) {
                // Cannot happen short of a counter overflow; the guest's next kick resumes anyway.
                tracing::error!(queue = self.index, %error, "cannot signal the resume eventfd");
            }
        }
    }

    /// Pop chains until the ring is empty, the queue is full or `budget` chains were taken; with EVENT_IDX,
    /// re-arm the avail event and re-check, so that a chain published meanwhile is not left without a kick.
    /// Returns whether the budget ran out (chains may be left that no kick will announce).
    fn pop_all(&mut self, ring: &mut RingState, mem: &Arc<GuestMemory>, used: &mut bool, budget: &mut u16) -> bool {
        loop {
            if self.pop_available(ring, mem, used, budget) {
                return true;
            }
            // (A broken ring would make `enable_notification` report chains forever: its index is ahead.)
            if self.blocked || self.broken || !ring.get_queue().event_idx_enabled() {
                return false;
            }
            match ring.enable_notification() {
                Ok(true) => continue,
                Ok(false) => return false,
                Err(error) => {
                    tracing::debug!(queue = self.index, %error, "cannot re-arm guest notifications");
                    return false;
                }
            }
        }
    }

    /// Pop chains until the ring is empty, the queue is full or `budget` chains were taken (each chain counts,
    /// good or not). Returns whether the budget ran out.
    fn pop_available(
        &mut self,
        ring: &mut RingState,
        mem: &Arc<GuestMemory>,
        used: &mut bool,
        budget: &mut u16,
    ) -> bool {
        self.blocked = false;
        self.broken = false;
        loop {
            if !self.queue.has_room() {
                // Backpressure: leave the rest in the avail ring; the next completion resumes.
                self.blocked = true;
                return false;
            }
            if *budget == 0 {
                return true;
            }
            let q = ring.get_queue_mut();
            if !q.ready() || q.avail_ring() == 0 {
                return false;
            }
            let chain = match q.iter(&**mem) {
                Ok(mut available) => available.next(),
                Err(error) => {
                    // E.g. an avail index more than a ring ahead: nothing can be taken until the driver resets.
                    self.log_bad_ring(&error);
                    self.broken = true;
                    return false;
                }
            };
            let Some(chain) = chain else {
                return false;
            };
            *budget -= 1;
            let head = chain.head_index();
            match parse_chain(chain, &**mem, self.seg_max, &mut self.request) {
                Parsed::Request { status } => {
                    // The segments point into `mem`, and the cookie owns that very snapshot.
                    let cookie = Cookie { head, status, mem: Arc::clone(mem) };
                    if self.queue.submit_owned(&self.request, cookie).is_err() {
                        ring.get_queue_mut().go_to_previous_position();
                        self.blocked = true;
                        return false;
                    }
                }
                Parsed::Refused { status, error } => {
                    self.log_bad_chain(head, &error, true);
                    let len = match mem.write_obj(status_code(error.status()), status) {
                        Ok(()) => 1,
                        Err(_) => 0,
                    };
                    add_used(ring, head, len, self.index);
                    *used = true;
                }
                Parsed::Unanswerable { error } => {
                    self.log_bad_chain(head, &error, false);
                    add_used(ring, head, 0, self.index);
                    *used = true;
                }
            }
        }
    }

    /// Write the status byte of every finished request and put it in the used ring (clearing the completion
    /// eventfd if `clear`).
    fn answer_finished(&mut self, ring: &mut RingState, used: &mut bool, clear: bool) {
        let index = self.index;
        // Read data is logged in the drain, before the status byte and the used ring (both logged by vm-memory).
        let answer = |Finished { cookie: Cookie { head, status, mem }, status: result, bytes_to_guest, error }| {
            if let Some(error) = error {
                tracing::debug!(queue = index, head, %error, "request failed");
            }
            let len = match mem.write_obj(status_code(result), status) {
                Ok(()) => bytes_to_guest.saturating_add(1),
                Err(_) => {
                    tracing::debug!(queue = index, head, "status byte no longer in guest memory");
                    0
                }
            };
            add_used(ring, head, len, index);
            *used = true;
        };
        self.queue.drain_logged(clear, cookie_memory, answer);
    }

    fn log_bad_ring(&mut self, error: &virtio_queue::Error) {
        self.malformed += 1;
        if self.malformed == 1 {
            tracing::warn!(queue = self.index, %error, "guest broke the available ring (further errors at debug level)");
        } else {
            tracing::debug!(queue = self.index, %error, "broken available ring");
        }
    }

    fn log_bad_chain(&mut self, head: u16, error: &ChainError, answered: bool) {
        if !error.is_malformed() {
            tracing::debug!(queue = self.index, head, %error, "unsupported request");
            return;
        }
        self.malformed += 1;
        if self.malformed == 1 {
            tracing::warn!(
                queue = self.index, head, %error, answered,
                "guest sent a malformed request (further ones on this queue are logged at debug level)"
            );
        } else {
            tracing::debug!(queue = self.index, head, %error, answered, count = self.malformed, "malformed request");
        }
    }
}

/// The memory snapshot a request's buffers are in (where its read data is logged dirty).
fn cookie_memory(cookie: &Cookie) -> &GuestMemory {
    &cookie.mem
}

/// Whether the guest published chains not taken yet (one load from the avail ring).
pub(super) fn avail_pending(ring: &RingState, mem: &AtomicGuestMemory) -> bool {
    let q = ring.get_queue();
    q.ready() && q.avail_idx(&*mem.memory(), Ordering::Acquire).is_ok_and(|idx| idx.0 != q.next_avail())
}

fn add_used(ring: &mut RingState, head: u16, len: u32, queue: usize) {
    if head >= ring.get_queue().size() {
        // A head index outside the ring (a hostile avail entry) cannot be returned.
        tracing::debug!(queue, head, "not returning a chain with an out-of-ring head index");
        return;
    }
    if let Err(error) = ring.add_used(head, len) {
        tracing::debug!(queue, head, %error, "cannot add to the used ring");
    }
}

/// Signal the guest once for the batch, unless EVENT_IDX says it does not want it yet.
fn notify_guest(ring: &mut RingState, queue: usize) {
    let needed = ring.needs_notification().unwrap_or(true);
    if needed {
        if let Err(error) = ring.signal_used_queue() {
            tracing::debug!(queue, %error, "cannot signal the guest");
        }
    }
}

#[cfg(test)]
#[path = "worker_tests.rs"]
mod tests;
