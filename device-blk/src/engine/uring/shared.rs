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
//!   Operations that finished without the ring (inline, or refused) are likewise signalled on the eventfd only at
//!   `end_round`, and only if no lane reaped them by then. Outside rounds a lane submits at once, as an engine of its own would.
//! - **Completion eventfd.** The lanes share the ring's eventfd: the thread watches it once. Whichever lane reaps
//!   sorts every lane's completions, so after a lane reaped the others must be looked at
//!   ([`has_completions`](IoEngine::has_completions) tells, with no system call) before the thread sleeps: the
//!   eventfd was cleared for all of them. A lane that clears the eventfd signals it again if anything waits for
//!   any lane, so the thread's sleep is never left without a wake-up.
//! - **Threads.** Like the ring, the lanes belong to one thread once the ring is enabled (`SINGLE_ISSUER`). The
//!   mutex around the ring is only ever taken by that thread on the data path; others read only a lane's own
//!   counters.
//! - **Disks.** [`SharedUring::new`] serves the queues of one disk, with a lane for each made up front.
//!   [`SharedUring::open_ended`] serves queues of any disks, as they come: [`SharedUring::add_lane`] puts the
//!   lane's disk in a slot of the ring's sparse table of registered files and makes room for the lane's depth in
//!   the slot table; dropping the lane takes the disk out of the table again (so the ring holds no reference to a
//!   closed disk, and a loop device set to clear itself on close goes away) and frees the lane for the next. A
//!   lane dropped with operations in flight stays retired until the ring reaped them.

use std::collections::VecDeque;
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use super::{CompletionMode, UringEngine};
use crate::disk::Disk;
use crate::engine::{Batching, Completion, EngineError, IoEngine, IoOp};

/// Bits of a ring token that carry the lane's own token (the lane's index is above them).
const LANE_SHIFT: u32 = 32;

/// Where a lane of the ring stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LaneUse {
    /// Not handed out (made up front, or freed by a lane that went).
    Free,
    /// A [`UringLane`] uses it.
    Taken,
    /// Its lane went with operations in flight: reused once the ring reaped them.
    Retired,
}

struct LaneState {
    /// Completions reaped for the lane and not handed out yet.
    ready: VecDeque<Completion>,
    /// Operations it may have in flight (counted in the ring's room while it is taken or retired).
    depth: usize,
    /// Operations enqueued and not reaped from the ring yet.
    outstanding: usize,
    state: LaneUse,
}

struct Core {
    engine: UringEngine,
    lanes: Vec<LaneState>,
    /// Lanes are added as queues come ([`SharedUring::open_ended`]).
    open_ended: bool,
    /// Operations the lanes taken or retired may have in flight together, and the most the ring takes.
    reserved: usize,
    limit: usize,
}

impl Core {
    /// Reap the ring (see [`IoEngine::reap_ready`]) into the lanes' lists.
    fn reap_into_lanes(&mut self) {
        let (lanes, reserved) = (&mut self.lanes, &mut self.reserved);
        self.engine.reap_ready(&mut |Completion { token, result }| {
            let lane = usize::try_from(token >> LANE_SHIFT).unwrap_or(usize::MAX);
            let Some(lane) = lanes.get_mut(lane) else {
                tracing::error!(token, "shared io_uring completed an operation of no lane");
                return;
            };
            lane.outstanding = lane.outstanding.saturating_sub(1);
            match lane.state {
                LaneUse::Taken => lane.ready.push_back(Completion { token: token & ((1 << LANE_SHIFT) - 1), result }),
                LaneUse::Retired if lane.outstanding == 0 => {
                    lane.state = LaneUse::Free;
                    *reserved = reserved.saturating_sub(lane.depth);
                }
                _ => {}
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
        Self::with_mode(disk, lanes, depth, batching, CompletionMode::Deferred)
    }

    /// As [`new`](Self::new), with a ring that one thread after another may own
    /// ([`CompletionMode::Portable`]): made before a process locks itself down (and may make no ring any more),
    /// it serves the lanes of each later connection's thread in turn.
    pub fn portable(disk: Arc<Disk>, lanes: usize, depth: u32, batching: Batching) -> Result<Self, EngineError> {
        Self::with_mode(disk, lanes, depth, batching, CompletionMode::Portable)
    }

    fn with_mode(
        disk: Arc<Disk>,
        lanes: usize,
        depth: u32,
        batching: Batching,
        mode: CompletionMode,
    ) -> Result<Self, EngineError> {
        let depth = depth.clamp(1, super::MAX_ENTRIES);
        let count = u32::try_from(lanes.max(1)).unwrap_or(u32::MAX);
        let slots = depth.saturating_mul(count);
        let mut engine = UringEngine::with_slots(Arc::clone(&disk), slots, slots, mode)?;
        engine.set_batching(batching);
        let depth = depth as usize;
        let lane = || LaneState { ready: VecDeque::with_capacity(depth), depth, outstanding: 0, state: LaneUse::Free };
        let core = Core {
            lanes: (0..lanes.max(1)).map(|_| lane()).collect(),
            open_ended: false,
            reserved: 0,
            limit: slots as usize,
            engine,
        };
        Ok(SharedUring::with_core(core, disk.buffer_alignment()))
    }

    /// A ring for the queues of any disks, added as they come with [`add_lane`](Self::add_lane): room for `files`
    /// disks' lanes at once, and for `limit` operations in flight over all of them (the completion queue's
    /// size: at most 4096); `entries` submission entries (a fuller round is submitted in pieces).
    pub fn open_ended(files: u32, entries: u32, limit: u32, batching: Batching) -> Result<Self, EngineError> {
        let limit = limit.clamp(1, super::MAX_ENTRIES);
        let mut engine = UringEngine::open_ended(files.max(1), entries, limit, CompletionMode::Deferred)?;
        engine.set_batching(batching);
        let core = Core { lanes: Vec::new(), open_ended: true, reserved: 0, limit: limit as usize, engine };
        Ok(SharedUring::with_core(core, 1))
    }

    fn with_core(core: Core, alignment: usize) -> Self {
        let (fd, restricted) = (core.engine.completion_fd(), core.engine.restricted());
        SharedUring { core: Arc::new(Mutex::new(core)), fd, alignment, restricted }
    }

    /// Operations a new lane could still have in flight on a ring made by [`open_ended`](Self::open_ended) (the
    /// ring's limit less what the lanes taken or retired hold); 0 on a ring of fixed lanes.
    pub fn room(&self) -> usize {
        let core = self.lock();
        if core.open_ended {
            core.limit.saturating_sub(core.reserved)
        } else {
            0
        }
    }

    /// A lane of `depth` operations on `disk`, on a ring made by [`open_ended`](Self::open_ended). Fails when the
    /// ring has no room left for the disk or the depth (the caller then gives the queue an engine of its own).
    /// Call it on the thread that uses the ring, or before that thread's first submission: a ring that thread
    /// enabled takes registrations from it alone.
    pub fn add_lane(&self, disk: Arc<Disk>, depth: u32) -> Result<UringLane, EngineError> {
        self.add_lane_within(disk, depth, depth)
    }

    /// As [`add_lane`](Self::add_lane), with as many of `depth` operations as the ring has room for, if that is at
    /// least `least` (the lane's [`capacity`](IoEngine::capacity) says how many it got): decided under the ring's
    /// lock, so two queues starting at once cannot both count on the same room.
    pub fn add_lane_within(&self, disk: Arc<Disk>, depth: u32, least: u32) -> Result<UringLane, EngineError> {
        let depth = depth.clamp(1, super::MAX_ENTRIES) as usize;
        let least = (least.max(1) as usize).min(depth);
        let mut core = self.lock();
        if !core.open_ended {
            return Err(EngineError::Full(core.lanes.len()));
        }
        let room = core.limit.saturating_sub(core.reserved);
        if room < least {
            return Err(EngineError::Full(core.limit));
        }
        let depth = depth.min(room);
        let alignment = disk.buffer_alignment();
        let file = core.engine.add_file(disk)?;
        let lane = match core.lanes.iter().position(|l| l.state == LaneUse::Free) {
            Some(lane) => lane,
            None => {
                core.lanes.push(LaneState { ready: VecDeque::new(), depth, outstanding: 0, state: LaneUse::Free });
                core.lanes.len() - 1
            }
        };
        let state = &mut core.lanes[lane];
        state.state = LaneUse::Taken;
        state.depth = depth;
        state.ready.clear();
        state.ready.reserve(depth);
        core.reserved += depth;
        // The slot table only grows: slots a lane that went left free serve the next.
        let missing = core.reserved.saturating_sub(core.engine.capacity());
        if missing > 0 {
            core.engine.add_slots(missing);
        }
        let ring = SharedUring { alignment, ..self.clone() };
        Ok(UringLane { ring, lane: lane as u64, file: Some(file), depth, in_flight: 0 })
    }

    fn lock(&self) -> MutexGuard<'_, Core> {
        self.core.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The next lane made up front, or `None` once every lane the ring was built for is handed out.
    pub fn lane(&self) -> Option<UringLane> {
        let mut core = self.lock();
        if core.open_ended {
            return None;
        }
        let lane = core.lanes.iter().position(|l| l.state == LaneUse::Free)?;
        core.lanes[lane].state = LaneUse::Taken;
        let depth = core.lanes[lane].depth;
        core.reserved += depth;
        Some(UringLane { ring: self.clone(), lane: lane as u64, file: None, depth, in_flight: 0 })
    }

    /// Lanes in use now (for tests and statistics).
    pub fn lanes_in_use(&self) -> usize {
        self.lock().lanes.iter().filter(|l| l.state == LaneUse::Taken).count()
    }

    /// The completion eventfd every lane shares.
    pub fn completion_fd(&self) -> RawFd {
        self.fd
    }

    /// Start a round: lanes' submissions wait for [`end_round`](Self::end_round). Call on the ring's thread
    /// (it also applies file table changes made by lanes added or dropped on other threads).
    pub fn begin_round(&self) {
        let mut core = self.lock();
        core.engine.sync_files();
        core.engine.set_deferred(true);
        core.engine.new_blocking_round();
    }

    /// Within a round: submit what its lanes queued so far if that is at least `batch` entries (the round goes
    /// on). A thread with many queues bounds how long the first queue's requests wait for the round's end while
    /// keeping batches large.
    pub fn submit_if_at_least(&self, batch: usize) {
        let mut core = self.lock();
        if core.engine.queued() < batch {
            return;
        }
        if let Err(error) = core.engine.flush() {
            tracing::error!(%error, "submitting to the shared io_uring failed");
        }
    }

    /// Apply the file table changes made by lanes added or dropped on other threads (as
    /// [`begin_round`](Self::begin_round) does): for the ring's thread when it serves its lanes without a round.
    pub fn apply_file_changes(&self) {
        self.lock().engine.sync_files();
    }

    /// Whether a round is open ([`begin_round`](Self::begin_round) without its [`end_round`](Self::end_round)).
    pub fn in_round(&self) -> bool {
        self.lock().engine.is_deferred()
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
    /// The lane's disk in the ring's file table (`None`: the disk of a ring made by [`SharedUring::new`]).
    file: Option<u32>,
    depth: usize,
    in_flight: usize,
}

impl Drop for UringLane {
    fn drop(&mut self) {
        let mut core = self.ring.lock();
        let core = &mut *core;
        if let Some(file) = self.file {
            core.engine.remove_file(file);
        }
        let Some(lane) = usize::try_from(self.lane).ok().and_then(|lane| core.lanes.get_mut(lane)) else { return };
        lane.ready.clear();
        if lane.outstanding == 0 {
            lane.state = LaneUse::Free;
            core.reserved = core.reserved.saturating_sub(lane.depth);
        } else {
            // Its room stays taken until the ring reaped what is in flight.
            lane.state = LaneUse::Retired;
        }
    }
}

impl std::fmt::Debug for UringLane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringLane").field("lane", &self.lane).field("in_flight", &self.in_flight).finish()
    }
}

impl UringLane {
    /// The ring the lane is part of (for its rounds).
    pub fn shared_ring(&self) -> SharedUring {
        self.ring.clone()
    }

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
        let Some(state) = usize::try_from(*lane).ok().and_then(|lane| core.lanes.get_mut(lane)) else { return };
        while let Some(completion) = state.ready.pop_front() {
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
        let tag = self.lane << LANE_SHIFT | token;
        // SAFETY: the caller's contract is the ring's: the buffers stay valid until this token is reaped, which
        // the lane hands out only after the ring reaped it.
        unsafe { core.engine.enqueue_on(self.file.unwrap_or(0), op, tag) }?;
        if let Some(lane) = usize::try_from(self.lane).ok().and_then(|lane| core.lanes.get_mut(lane)) {
            lane.outstanding += 1;
        }
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
        let own =
            usize::try_from(self.lane).ok().and_then(|lane| core.lanes.get(lane)).is_some_and(|l| !l.ready.is_empty());
        own || core.engine.completions_waiting()
    }

    fn clear_completion_signal(&mut self) {
        let mut core = self.ring.lock();
        core.engine.clear_completion_signal();
        // The eventfd is every lane's: a clear for this lane must not swallow another lane's signal. With deferred
        // task work the kernel signals only the first piece of work, so a swallowed signal never comes back and
        // the thread would sleep on finished requests of the other lane. Whatever waits for any lane signals again.
        if core.engine.completions_waiting() || core.lanes.iter().any(|lane| !lane.ready.is_empty()) {
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
