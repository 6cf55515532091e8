// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! One io_uring shared by the queues of one thread: each queue gets a [`UringLane`], an [`IoEngine`] of its own
//! depth over the thread's ring.
//!
//! A thread that serves several queues with an engine each pays, per round and per queue, an `io_uring_enter` to
//! submit, another to run the completion task work, and the kernel's signal of each ring's completion eventfd
//! (and the wake-up it brings). Over one ring, a round costs one submission and one task-work run for all the
//! thread's queues, and one completion eventfd wakes the thread for all of them.
//!
//! - **Tokens.** An operation's `user_data` is its slot in the ring's table, which holds the lane and the lane's
//!   token; reaped completions are sorted into per-lane lists (allocated once, as deep as the lane), and each lane
//!   hands out only its own.
//! - **Backpressure and fairness.** Each lane takes at most its depth of operations ([`EngineError::Full`]
//!   beyond), and the ring has a slot for every lane's full depth: a queue never takes another's slots.
//! - **Rounds.** Between [`SharedUring::begin_round`] and [`SharedUring::end_round`], a lane's
//!   [`submit`](IoEngine::submit) leaves its entries queued, and `end_round` submits the whole round's at once.
//!   Outside rounds a lane submits at once, as an engine of its own would.
//! - **Completion eventfd.** The lanes share the ring's eventfd: the thread watches it once. Whichever lane reaps
//!   sorts every lane's completions, so after a lane reaped the others must be looked at
//!   ([`has_completions`](IoEngine::has_completions) tells, with no system call) before the thread sleeps: the
//!   eventfd was cleared for all of them. A lane that clears the eventfd signals it again if anything waits for
//!   any lane, so the thread's sleep is never left without a wake-up.
//! - **Threads.** Like the ring, the lanes belong to one thread once the ring is enabled (`SINGLE_ISSUER`). The
//!   mutex around the ring is only ever taken by that thread on the data path; others read only a lane's own
//!   counters.

use std::collections::VecDeque;
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use super::{CompletionMode, UringEngine};
use crate::disk::Disk;
use crate::engine::{Batching, Completion, EngineError, IoEngine, IoOp};

/// Bits of a ring token that carry the lane's own token (the lane's index is above them).
const LANE_SHIFT: u32 = 32;

struct Core {
    engine: UringEngine,
    /// Completions reaped for each lane and not handed out yet.
    lanes: Vec<VecDeque<Completion>>,
    /// Depth of every lane.
    depth: usize,
    /// Lanes handed out so far.
    taken: usize,
}

impl Core {
    /// Reap the ring (see [`IoEngine::reap_ready`]) into the lanes' lists.
    fn reap_into_lanes(&mut self) {
        let lanes = &mut self.lanes;
        self.engine.reap_ready(&mut |Completion { token, result }| {
            let lane = usize::try_from(token >> LANE_SHIFT).unwrap_or(usize::MAX);
            match lanes.get_mut(lane) {
                Some(list) => list.push_back(Completion { token: token & ((1 << LANE_SHIFT) - 1), result }),
                None => tracing::error!(token, "shared io_uring completed an operation of no lane"),
            }
        });
    }
}

/// A thread's io_uring, shared by the lanes it hands out (one per queue). Cloning gives another handle to the
/// same ring.
#[derive(Clone)]
pub struct SharedUring {
    core: Arc<Mutex<Core>>,
    fd: RawFd,
    alignment: usize,
    restricted: bool,
}

impl std::fmt::Debug for SharedUring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedUring").field("fd", &self.fd).field("restricted", &self.restricted).finish()
    }
}

impl SharedUring {
    /// A ring over `disk` for `lanes` lanes of `depth` operations each (each at most 4096, as an engine of its own
    /// would be), submitting batches as `batching` says.
    pub fn new(disk: Arc<Disk>, lanes: usize, depth: u32, batching: Batching) -> Result<Self, EngineError> {
        let depth = depth.clamp(1, super::MAX_ENTRIES);
        let count = u32::try_from(lanes.max(1)).unwrap_or(u32::MAX);
        let slots = depth.saturating_mul(count);
        let mut engine = UringEngine::with_slots(Arc::clone(&disk), slots, slots, CompletionMode::Deferred)?;
        engine.set_batching(batching);
        let depth = depth as usize;
        let core = Core {
            lanes: (0..lanes.max(1)).map(|_| VecDeque::with_capacity(depth)).collect(),
            depth,
            taken: 0,
            engine,
        };
        let (fd, restricted) = (core.engine.completion_fd(), core.engine.restricted());
        Ok(SharedUring { core: Arc::new(Mutex::new(core)), fd, alignment: disk.buffer_alignment(), restricted })
    }

    fn lock(&self) -> MutexGuard<'_, Core> {
        self.core.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The next lane, or `None` once every lane the ring was built for is handed out.
    pub fn lane(&self) -> Option<UringLane> {
        let mut core = self.lock();
        let lane = core.taken;
        if lane >= core.lanes.len() {
            return None;
        }
        let depth = core.depth;
        core.taken += 1;
        Some(UringLane { ring: self.clone(), lane: lane as u64, depth, in_flight: 0 })
    }

    /// The completion eventfd every lane shares.
    pub fn completion_fd(&self) -> RawFd {
        self.fd
    }

    /// Start a round: lanes' submissions wait for [`end_round`](Self::end_round).
    pub fn begin_round(&self) {
        self.lock().engine.set_deferred(true);
    }

    /// End a round: submit everything its lanes queued, in one batch (as the batching allows).
    pub fn end_round(&self) {
        let mut core = self.lock();
        core.engine.set_deferred(false);
        if let Err(error) = core.engine.flush() {
            // The entries stay queued and the eventfd is signalled: the next round tries again.
            tracing::error!(%error, "submitting to the shared io_uring failed");
        }
    }
}

/// One queue's share of a [`SharedUring`]: an [`IoEngine`] of its own depth.
pub struct UringLane {
    ring: SharedUring,
    lane: u64,
    depth: usize,
    in_flight: usize,
}

impl std::fmt::Debug for UringLane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringLane").field("lane", &self.lane).field("in_flight", &self.in_flight).finish()
    }
}

impl UringLane {
    /// Reap the ring into the lanes' lists (all of it if `all`, else only if something waits), then hand this
    /// lane's completions to `on_complete`.
    fn reap_lane(&mut self, clear: bool, on_complete: &mut dyn FnMut(Completion)) {
        let UringLane { ring, lane, in_flight, .. } = self;
        let mut core = ring.lock();
        if clear {
            core.engine.clear_completion_signal();
        }
        if clear || core.engine.completions_waiting() {
            core.reap_into_lanes();
        }
        let Some(list) = usize::try_from(*lane).ok().and_then(|lane| core.lanes.get_mut(lane)) else { return };
        while let Some(completion) = list.pop_front() {
            *in_flight = in_flight.saturating_sub(1);
            on_complete(completion);
        }
    }
}

impl IoEngine for UringLane {
    unsafe fn enqueue(&mut self, op: IoOp<'_>, token: u64) -> Result<(), EngineError> {
        if self.in_flight >= self.depth || token >> LANE_SHIFT != 0 {
            return Err(EngineError::Full(self.depth));
        }
        let mut core = self.ring.lock();
        // SAFETY: the caller's contract is the ring's: the buffers stay valid until this token is reaped, which
        // the lane hands out only after the ring reaped it.
        unsafe { core.engine.enqueue(op, self.lane << LANE_SHIFT | token) }?;
        self.in_flight += 1;
        Ok(())
    }

    fn submit(&mut self) -> Result<(), EngineError> {
        self.ring.lock().engine.submit()
    }

    fn reap(&mut self, on_complete: &mut dyn FnMut(Completion)) {
        self.reap_lane(true, on_complete);
    }

    fn reap_ready(&mut self, on_complete: &mut dyn FnMut(Completion)) {
        self.reap_lane(false, on_complete);
    }

    fn has_completions(&mut self) -> bool {
        let mut core = self.ring.lock();
        let own = usize::try_from(self.lane).ok().and_then(|lane| core.lanes.get(lane)).is_some_and(|l| !l.is_empty());
        own || core.engine.completions_waiting()
    }

    fn clear_completion_signal(&mut self) {
        let mut core = self.ring.lock();
        core.engine.clear_completion_signal();
        // The eventfd is every lane's: a clear for this lane must not swallow another lane's signal. With deferred
        // task work the kernel signals only the first piece of work, so a swallowed signal never comes back and
        // the thread would sleep on finished requests of the other lane. Whatever waits for any lane signals again.
        if core.engine.completions_waiting() || core.lanes.iter().any(|list| !list.is_empty()) {
            if let Err(error) = core.engine.signal() {
                tracing::error!(%error, "cannot signal the shared io_uring's completion eventfd again");
            }
        }
    }

    fn completion_fd(&self) -> RawFd {
        self.ring.fd
    }

    fn capacity(&self) -> usize {
        self.depth
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn buffer_alignment(&self) -> usize {
        self.ring.alignment
    }

    fn name(&self) -> &'static str {
        "io_uring (shared)"
    }

    fn ring_restricted(&self) -> Option<bool> {
        Some(self.ring.restricted)
    }
}

#[cfg(test)]
#[path = "shared_tests.rs"]
mod tests;
