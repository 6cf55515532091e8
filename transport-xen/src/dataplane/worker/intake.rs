// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Taking requests from the ring: copy each out once, decode and check the copy, bind its pages and submit it
//! to the engine (or answer it at once), with a bounded amount of work per round.

use std::sync::atomic::Ordering;

use super::{QueueStats, Start, Worker};
use crate::blkif::{BlkifLayout, BlkifOp, RSP_EOPNOTSUPP, RSP_ERROR, RSP_OKAY};
use crate::dataplane::slot::{blkif_status, Phase};
use crate::grant_memory::BindError;
use crate::services::{EventChannel, GrantTable};

impl<L: BlkifLayout, G: GrantTable, E: EventChannel> Worker<L, G, E> {
    /// Consume requests while there is room, then re-arm the event index and look once more; at most a ring's
    /// worth of requests per call.
    ///
    /// The bound matters against a frontend that keeps queueing requests we answer at once (an unknown operation,
    /// a grant it never gave): each frees its slot, so without a bound the final check would find more work
    /// every time and this loop would never give the event loop a chance to see the stop request. When the
    /// budget runs out, `more_work` tells the event loop to come back at once, after publishing the responses
    /// and looking at its events (the way Linux's blkback thread yields after a batch).
    pub(super) fn process_ring(&mut self) {
        self.more_work = false;
        self.backpressure = false;
        self.start_held();
        let mut budget = self.ring.size();
        loop {
            if self.halted || self.stopping {
                return;
            }
            let avail = match self.ring.unconsumed() {
                Ok(n) => n,
                Err(e) => return self.halt(&e),
            };
            for _ in 0..avail.min(budget) {
                if self.held.is_some() || self.barrier_active || !self.slots.available() || !self.queue.has_room() {
                    // Backpressure: completions bring us back here; no final check, so no event is asked for.
                    self.backpressure = true;
                    self.submit_batch();
                    return;
                }
                if !self.ring.next_request(&mut self.raw) {
                    break;
                }
                budget -= 1;
                QueueStats::add(&self.stats.requests, 1);
                if self.polling {
                    QueueStats::add(&self.stats.polled_requests, 1);
                }
                self.taken += 1;
                let Some(idx) = self.slots.take() else { break };
                self.accept(idx);
            }
            self.submit_batch();
            if self.polling {
                // The request event index stays behind: the frontend need not notify while we look anyway.
                return;
            }
            if budget == 0 {
                // No final check: the next round makes it (the event loop does not sleep before that).
                self.more_work = true;
                return;
            }
            match self.ring.final_check_for_requests() {
                Ok(0) => return,
                Ok(_) => continue,
                Err(e) => return self.halt(&e),
            }
        }
    }

    pub(super) fn submit_batch(&mut self) {
        if std::mem::take(&mut self.unkicked) {
            match self.queue.submit_batch() {
                Ok(()) => QueueStats::add(&self.stats.kicks, 1),
                Err(e) => {
                    // Retried on the next wake-up; requests stay in flight (their pages mapped) until answered.
                    self.unkicked = true;
                    if !self.halted {
                        self.halted = true;
                        self.stats.halted.store(true, Ordering::SeqCst);
                        self.fatal.report(format!("queue {}: I/O engine: {e}", self.index));
                    }
                }
            }
        }
    }

    /// Decode and check a freshly copied request in slot `idx`, then start it (or answer it at once).
    fn accept(&mut self, idx: u32) {
        let slot = &mut self.slots[idx];
        if let Err(fault) = slot.req.decode::<L>(&self.raw, self.config.max_indirect) {
            tracing::debug!(queue = self.index, %fault, "request refused");
            return self.finish(idx, fault.status());
        }
        if slot.req.indirect.is_some() {
            if let Err(fault) = self.mapper.load_indirect(&mut slot.req) {
                tracing::debug!(queue = self.index, %fault, "indirect request refused");
                return self.finish(idx, fault.status());
            }
        }
        if matches!(slot.req.op, BlkifOp::Discard { secure: true }) && !self.config.discard_secure {
            return self.finish(idx, RSP_EOPNOTSUPP);
        }
        slot.plan();
        if slot.has_data_phase() {
            if let Err(e) = slot.dev.validate(self.queue.geometry()) {
                tracing::debug!(queue = self.index, error = %e, "request refused");
                return self.finish(idx, blkif_status(e.status()));
            }
        }
        if let Start::Held = self.start(idx) {
            self.held = Some(idx);
        }
    }

    pub(super) fn start_held(&mut self) {
        if let Some(idx) = self.held.take() {
            if let Start::Held = self.start(idx) {
                self.held = Some(idx);
            }
        }
    }

    /// Bind the pages of slot `idx` and submit its first phase; a barrier waits for every other request.
    fn start(&mut self, idx: u32) -> Start {
        let others = self.in_use() - 1;
        let slot = &mut self.slots[idx];
        if slot.barrier && others > 0 {
            return Start::Held;
        }
        if slot.pages.is_empty() && !slot.req.segments.is_empty() {
            match self.mapper.bind(&slot.req, &mut slot.pages) {
                Ok(()) => {}
                Err(BindError::Busy) => return Start::Held,
                Err(BindError::Fault(fault)) => {
                    tracing::debug!(queue = self.index, %fault, "request refused");
                    self.finish(idx, fault.status());
                    return Start::Going;
                }
            }
        }
        if slot.barrier {
            self.barrier_active = true;
        }
        self.submit_phase(idx);
        Start::Going
    }

    /// Submit the next phase of slot `idx`.
    pub(super) fn submit_phase(&mut self, idx: u32) {
        let slot = &mut self.slots[idx];
        let request = match slot.next_phase() {
            Some(Phase::Data) => &slot.dev,
            Some(Phase::Flush) => &self.flush,
            None => return self.finish(idx, RSP_OKAY),
        };
        // SAFETY: the request's pages stay bound in `slot.pages` (and `slot.pages.memory` unchanged) until the
        // slot is finished, which happens only after its cookie came out of `drain`.
        if unsafe { self.queue.submit(request, &slot.pages.memory, idx) }.is_err() {
            tracing::error!(queue = self.index, "engine full although a slot was free");
            return self.finish(idx, RSP_ERROR);
        }
        self.unkicked = true;
    }

    /// The ring is given up: answer every request left on it with `BLKIF_RSP_ERROR` and notify the frontend
    /// whatever event index it left (it must look at the ring now). Not on a halted ring: its producer is bogus.
    pub(super) fn fail_unconsumed(&mut self) {
        if self.halted {
            return;
        }
        match self.ring.fail_unconsumed() {
            Ok(0) => {}
            Ok(answered) => {
                self.answered = self.answered.wrapping_add(u64::from(answered));
                for counter in [&self.stats.requests, &self.stats.responses, &self.stats.errors] {
                    QueueStats::add(counter, u64::from(answered));
                }
                self.ring.push_responses();
                QueueStats::add(&self.stats.notifications, 1);
                if let Err(e) = self.evtchn.notify(self.port) {
                    tracing::warn!(queue = self.index, error = %e, "evtchn notify failed");
                }
                tracing::info!(
                    queue = self.index,
                    answered,
                    "answered the requests left on the ring with an I/O error"
                );
            }
            Err(e) => tracing::debug!(queue = self.index, error = %e, "requests left on the ring not answered"),
        }
    }
}
