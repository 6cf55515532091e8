// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Adaptive polling (`DataplaneOptions::poll_us`): after a round that took requests or answered some, a queue's
//! worker keeps looking at its shared ring and its engine's completions until nothing has happened for the
//! polling time, then re-arms the ring's request event index, looks once more and only then sleeps in epoll
//! again. (The completion eventfd is edge-triggered: nothing needs clearing before sleeping.)
//!
//! While it polls, the request event index is left behind, so the frontend's `RING_PUSH_REQUESTS_AND_CHECK_NOTIFY`
//! finds no notification needed: a busy frontend stops sending events and the worker stops waking up for them
//! (each costs the guest a hypercall and us an epoll round). A pass that finds nothing costs one load of
//! `req_prod`, a look at the io_uring completion ring (shared memory) and a `sched_yield`, so that the thread our
//! work wakes gets the CPU first; every few passes, and whenever a pass finds nothing, a zero-timeout
//! `epoll_wait` sees the stop request and frontend events. An idle worker does not poll at all: polling starts
//! only after a round that did work and ends after the polling time without any.
//!
//! A frontend cannot keep us polling with nothing to do: only requests it really queues (each answered, good or
//! bad) extend the polling time, exactly as they would keep an event-driven worker busy.

use std::time::Instant;

use vmm_sys_util::epoll::EpollEvent;

use super::{QueueStats, Worker};
use crate::blkif::BlkifLayout;
use crate::services::{EventChannel, GrantTable};

/// Busy passes between two looks at epoll (the stop request, frontend events).
const PASSES_PER_EPOLL_CHECK: u32 = 64;

impl<L: BlkifLayout, G: GrantTable, E: EventChannel> Worker<L, G, E> {
    /// Poll until the ring and the engine were quiet for the polling time (or the queue stops or halts).
    pub(super) fn poll_for_work(&mut self, events: &mut [EpollEvent]) {
        QueueStats::add(&self.stats.poll_periods, 1);
        let budget = self.config.poll;
        let started = Instant::now();
        let mut last_work = started;
        let mut passes = 0u32;
        self.polling = true;
        loop {
            if self.stopping || self.halted {
                break;
            }
            let busy = self.pass();
            passes = passes.wrapping_add(1);
            if busy {
                last_work = Instant::now();
            }
            if !busy || passes % PASSES_PER_EPOLL_CHECK == 0 {
                self.look_at_epoll(events);
            }
            if self.config.shared && started.elapsed() >= budget {
                // Other rings wait for this thread: end the period; a final look decides whether the pool comes
                // back to this ring at once (the request event index is set again either way).
                let found = self.rearm();
                self.more_work = self.more_work || found;
                break;
            }
            if busy {
                continue;
            }
            if last_work.elapsed() < budget {
                std::thread::yield_now();
                continue;
            }
            // Quiet for the whole polling time: ask for events again, then look once more, since a request or a
            // completion may have come in between.
            if !self.rearm() {
                break;
            }
            last_work = Instant::now();
        }
        self.polling = false;
    }

    /// Re-arm the request event index and take what came in meanwhile. Returns whether there was something
    /// (polling goes on, with the event index left behind again).
    pub(super) fn rearm(&mut self) -> bool {
        // Not polling: the pass consumes what is there and then sets the request event index (a final check).
        self.polling = false;
        let found = self.pass();
        self.polling = found;
        found
    }

    /// Take in what epoll has ready without waiting (the stop eventfd, the event channel).
    fn look_at_epoll(&mut self, events: &mut [EpollEvent]) {
        match self.wait_events(0, events) {
            Ok(n) => self.dispatch(&events[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => tracing::debug!(queue = self.index, error = %e, "epoll_wait (polling) failed"),
        }
    }
}
