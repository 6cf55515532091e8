// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A worker as a ring of an I/O thread pool: built on the pool thread, watched by the thread's epoll, served one
//! bounded turn at a time.

use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::Instant;

use vmm_sys_util::epoll::{Epoll, EpollEvent, EventSet};

use super::{QueueSetup, QueueStats, Worker, TOKEN_COMPLETION, TOKEN_EVTCHN, TOKEN_STOP};
use crate::blkif::BlkifLayout;
use crate::services::{EventChannel, GrantTable};

/// A ring served by a thread of an I/O thread pool, built on that thread (`None`: it could not be set up, and
/// said so on the fatal channel).
pub(crate) fn task<L, G, E>(setup: QueueSetup<L, G, E>) -> Option<Box<dyn RingTask>>
where
    L: BlkifLayout + 'static,
    G: GrantTable + 'static,
    E: EventChannel + 'static,
{
    Worker::build(setup, false).map(|w| Box::new(w) as Box<dyn RingTask>)
}

/// The kinds of a ring's event sources, as indexes of [`RingTask::sources`] and bits of a turn's `fired`.
pub(crate) const SOURCES: usize = 3;

/// A ring as a thread of the I/O thread pool sees it: its event sources, which the thread watches in its own
/// epoll, and a bounded turn.
pub(crate) trait RingTask {
    /// The ring's event sources (event channel, engine completions, stop request) and how to watch them.
    fn sources(&self) -> [(RawFd, EventSet); SOURCES];
    /// The thread's epoll now watches the sources: a source the ring stops watching leaves it too.
    fn attach(&mut self, pool_epoll: Arc<Epoll>);
    /// Take in the events of the sources whose bits are set in `fired` and do one round (at most a ring's worth
    /// of requests, and a bounded polling period). Returns `false` once the ring stopped and released everything.
    fn turn(&mut self, fired: u8) -> bool;
    /// When the ring wants a turn without an event: now (work left by a round that used its budget), or when a
    /// delayed unmask is due.
    fn wake_at(&self) -> Option<Instant>;
    /// Report a fatal error of the ring (its pool thread could not be prepared, or a turn panicked).
    fn report(&self, message: &str);
    /// Whether the ring's engine holds completions to take (judged without a system call).
    fn completions_pending(&mut self) -> bool;
}

impl<L: BlkifLayout, G: GrantTable, E: EventChannel> RingTask for Worker<L, G, E> {
    fn sources(&self) -> [(RawFd, EventSet); SOURCES] {
        [
            (self.evtchn.fd(), EventSet::IN),
            (self.queue.completion_fd(), EventSet::IN | EventSet::EDGE_TRIGGERED),
            (self.signals.fd(), EventSet::IN),
        ]
    }

    fn attach(&mut self, pool_epoll: Arc<Epoll>) {
        self.pool_epoll = Some(pool_epoll);
    }

    fn turn(&mut self, fired: u8) -> bool {
        let mut events = [EpollEvent::default(); SOURCES];
        if !self.finished() {
            let mut n = 0;
            for token in [TOKEN_EVTCHN, TOKEN_COMPLETION, TOKEN_STOP] {
                if fired & (1 << token) != 0 {
                    events[n] = EpollEvent::new(EventSet::IN, token);
                    n += 1;
                }
            }
            if n > 0 {
                QueueStats::add(&self.stats.wakeups, 1);
            }
            self.dispatch(&events[..n]);
            self.round(&mut events);
        }
        if self.finished() {
            self.shutdown();
            return false;
        }
        true
    }

    fn wake_at(&self) -> Option<Instant> {
        if self.more_work {
            Some(Instant::now())
        } else {
            self.unmask_at
        }
    }

    fn report(&self, message: &str) {
        self.fatal.report(format!("queue {}: {message}", self.index));
    }

    fn completions_pending(&mut self) -> bool {
        self.queue.has_finished()
    }
}
