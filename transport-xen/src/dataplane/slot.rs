// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! One in-flight request of a queue: the decoded blkif request, its `device-blk` form, the pages it holds, and
//! the steps (phases) it still has to run.

use std::sync::{Arc, Mutex, PoisonError};

use device_blk::{Request, RequestKind, Sector, Status};

use crate::blkif::{BlkifOp, BlkifRequest, RSP_EOPNOTSUPP, RSP_ERROR, RSP_OKAY};
use crate::grant_memory::{segment_address, GrantMemory, RequestPages};

/// One step of a request on the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Phase {
    /// `fdatasync`.
    Flush,
    /// The request's own operation (read, write or discard).
    Data,
}

/// An in-flight slot.
#[derive(Debug)]
pub(crate) struct Slot<M> {
    pub req: BlkifRequest,
    pub dev: Request,
    pub pages: RequestPages<M>,
    phases: [Phase; 2],
    count: usize,
    next: usize,
    /// A write barrier: runs alone.
    pub barrier: bool,
}

impl<M> Slot<M> {
    /// A slot with room for `max_segments` segments (the most a request of its queue may carry: 11 without
    /// indirect segments, not `device-blk`'s maximum).
    pub fn new(max_segments: usize) -> Self {
        let mut dev = Request::default();
        dev.segments.reserve_exact(max_segments);
        Slot {
            req: BlkifRequest::default(),
            dev,
            pages: RequestPages::new(max_segments),
            phases: [Phase::Data; 2],
            count: 0,
            next: 0,
            barrier: false,
        }
    }

    /// A slot on the buffers of a slot whose queue is gone, with room for `max_segments` segments.
    fn reuse(spare: SpareSlot, max_segments: usize) -> Self {
        let SpareSlot { mut req, mut dev, mut memory } = spare;
        req.segments.clear();
        dev.segments.clear();
        dev.segments.reserve_exact(max_segments);
        memory.clear();
        memory.reserve(max_segments);
        Slot {
            req,
            dev,
            pages: RequestPages::with_memory(memory),
            phases: [Phase::Data; 2],
            count: 0,
            next: 0,
            barrier: false,
        }
    }

    /// Build the `device-blk` request and the phase plan from the decoded blkif request.
    pub fn plan(&mut self) {
        let has_data = !self.req.segments.is_empty();
        let kind = match self.req.op {
            BlkifOp::Read => RequestKind::Read,
            BlkifOp::Write | BlkifOp::WriteBarrier | BlkifOp::Flush => RequestKind::Write,
            BlkifOp::Discard { secure } => RequestKind::Discard { secure },
        };
        self.dev.reset(kind, Sector(self.req.sector));
        self.dev.discard_sectors = self.req.nr_sectors;
        for (i, s) in self.req.segments.iter().enumerate() {
            self.dev.segments.push(segment_address(i, s));
        }
        let (phases, count): ([Phase; 2], usize) = match self.req.op {
            BlkifOp::Read | BlkifOp::Write | BlkifOp::Discard { .. } => ([Phase::Data, Phase::Data], 1),
            BlkifOp::Flush if has_data => ([Phase::Data, Phase::Flush], 2),
            BlkifOp::WriteBarrier if has_data => ([Phase::Flush, Phase::Data], 2),
            BlkifOp::Flush | BlkifOp::WriteBarrier => ([Phase::Flush, Phase::Flush], 1),
        };
        self.phases = phases;
        self.count = count;
        self.next = 0;
        self.barrier = self.req.op == BlkifOp::WriteBarrier;
    }

    /// Whether the plan has a data phase (which the disk must accept before anything runs).
    pub fn has_data_phase(&self) -> bool {
        self.phases[..self.count].contains(&Phase::Data)
    }

    /// The next phase to run, advancing.
    pub fn next_phase(&mut self) -> Option<Phase> {
        let p = self.phases[..self.count].get(self.next).copied();
        self.next += 1;
        p
    }

    /// Whether every phase has run.
    pub fn done(&self) -> bool {
        self.next >= self.count
    }
}

/// The buffers of a slot whose queue is gone (its request, device request and page table), for a later queue of
/// the same I/O thread.
#[derive(Debug)]
pub(crate) struct SpareSlot {
    req: BlkifRequest,
    dev: Request,
    memory: GrantMemory,
}

/// The spare slots an I/O thread keeps for its next queues ([`IoThreads::with_spare_slots`](super::IoThreads)),
/// at most `limit`: a queue that starts takes its slots from here before it makes new ones, and gives them back
/// when it goes.
#[derive(Debug)]
pub(crate) struct SpareSlots {
    limit: usize,
    spares: Mutex<Vec<SpareSlot>>,
}

impl SpareSlots {
    /// Room for `limit` spare slots (none kept yet).
    pub fn new(limit: usize) -> Self {
        SpareSlots { limit, spares: Mutex::new(Vec::new()) }
    }

    /// Spare slots kept now.
    pub fn len(&self) -> usize {
        self.spares.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    fn take(&self) -> Option<SpareSlot> {
        self.spares.lock().unwrap_or_else(PoisonError::into_inner).pop()
    }

    /// Keep the buffers of `slots` (released, nothing in flight) up to the limit; the rest are freed.
    fn keep<M>(&self, slots: &mut Vec<Slot<M>>) {
        let mut spares = self.spares.lock().unwrap_or_else(PoisonError::into_inner);
        while spares.len() < self.limit {
            let Some(slot) = slots.pop() else { break };
            if !slot.pages.is_empty() {
                // Still holds grants (a worker that died with requests in flight): not kept.
                continue;
            }
            let Slot { req, dev, pages, .. } = slot;
            spares.push(SpareSlot { req, dev, memory: pages.memory });
        }
    }
}

/// A queue's in-flight slots, indexed by the engine cookie. A slot is made the first time every slot made so far is
/// in use, at most `depth` of them, and kept: a queue's memory follows the depth its frontend actually uses (a data
/// plane that serves a few requests builds a few slots, not one per ring entry), and once warm nothing is
/// allocated per request.
#[derive(Debug)]
pub(crate) struct Slots<M> {
    slots: Vec<Slot<M>>,
    /// The slots made and not in use (the one freed last is taken first).
    free: Vec<u32>,
    depth: usize,
    /// The segments a slot has room for.
    max_segments: usize,
    /// Where slots are taken from before new ones are made, and go when the queue does.
    spares: Option<Arc<SpareSlots>>,
}

impl<M> Slots<M> {
    /// Room for `depth` slots of `max_segments` segments each; none made yet.
    pub fn new(depth: usize, max_segments: usize, spares: Option<Arc<SpareSlots>>) -> Self {
        Slots { slots: Vec::with_capacity(depth), free: Vec::with_capacity(depth), depth, max_segments, spares }
    }

    /// Slots in use.
    pub fn in_use(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Slots made so far.
    pub fn made(&self) -> usize {
        self.slots.len()
    }

    /// Whether [`take`](Self::take) would give a slot.
    pub fn available(&self) -> bool {
        !self.free.is_empty() || self.slots.len() < self.depth
    }

    /// A slot for a request: a free one, else a new one while fewer than `depth` exist.
    pub fn take(&mut self) -> Option<u32> {
        if let Some(idx) = self.free.pop() {
            return Some(idx);
        }
        if self.slots.len() >= self.depth {
            return None;
        }
        let idx = u32::try_from(self.slots.len()).ok()?;
        let slot = match self.spares.as_ref().and_then(|s| s.take()) {
            Some(spare) => Slot::reuse(spare, self.max_segments),
            None => Slot::new(self.max_segments),
        };
        self.slots.push(slot);
        Some(idx)
    }

    /// Give slot `idx` back.
    pub fn free(&mut self, idx: u32) {
        self.free.push(idx);
    }
}

impl<M> Drop for Slots<M> {
    fn drop(&mut self) {
        if let Some(spares) = self.spares.take() {
            spares.keep(&mut self.slots);
        }
    }
}

impl<M> std::ops::Index<u32> for Slots<M> {
    type Output = Slot<M>;
    fn index(&self, idx: u32) -> &Slot<M> {
        &self.slots[idx as usize]
    }
}

impl<M> std::ops::IndexMut<u32> for Slots<M> {
    fn index_mut(&mut self, idx: u32) -> &mut Slot<M> {
        &mut self.slots[idx as usize]
    }
}

/// A `device-blk` status as a blkif response status.
pub(crate) fn blkif_status(status: Status) -> i16 {
    match status {
        Status::Ok => RSP_OKAY,
        Status::IoError => RSP_ERROR,
        Status::Unsupported => RSP_EOPNOTSUPP,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_has_room_for_its_queues_largest_request_only() {
        let direct = Slot::<()>::new(11);
        assert!((11..256).contains(&direct.dev.segments.capacity()), "{}", direct.dev.segments.capacity());
        let indirect = Slot::<()>::new(256);
        assert!(indirect.dev.segments.capacity() >= 256);
        // A spare of a direct queue grows to an indirect queue's size when reused there.
        let spares = Arc::new(SpareSlots::new(4));
        let mut slots = Slots::<()>::new(2, 11, Some(spares.clone()));
        assert_eq!(slots.take(), Some(0));
        slots.free(0);
        drop(slots);
        assert_eq!(spares.len(), 1);
        let mut slots = Slots::<()>::new(2, 256, Some(spares.clone()));
        assert_eq!((slots.take(), spares.len()), (Some(0), 0));
        assert!(slots[0].dev.segments.capacity() >= 256 && slots[0].pages.memory.capacity() >= 256);
        assert_eq!((slots.take(), slots.take(), slots.in_use()), (Some(1), None, 2));
    }
}
