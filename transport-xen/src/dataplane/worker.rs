// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! One queue's worker: the epoll loop over the event channel, the engine's completions and the control plane's
//! signals (stop, kick).

use std::os::fd::RawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use device_blk::engine::SharedUring;
use device_blk::{BlockQueue, Finished, Request, RequestKind, Status};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::signals::QueueSignals;
use super::slot::{blkif_status, Slots};
use super::{FatalState, QueueStats};
use crate::blkif::{BlkifLayout, BlkifOp, BlkifResponse, RawRequest, RingError};
use crate::blkif::{MAX_DIRECT_SEGMENTS, RSP_ERROR, RSP_OKAY};
use crate::dataplane::mapped_ring::MappedRing;
use crate::grant_memory::{BouncePool, SegmentMapper};
use crate::services::{DomId, EventChannel, EvtchnPort, GrantTable};

mod intake;
mod poll;
mod task;

pub(crate) use task::{task, RingTask, SOURCES};

const TOKEN_EVTCHN: u64 = 0;
const TOKEN_COMPLETION: u64 = 1;
const TOKEN_STOP: u64 = 2;

/// Events in a row that may find no request before the port's unmask is delayed (a notify that races with a
/// batch we were already taking is normal; a stream of them is a storm).
const SPURIOUS_FREE: u32 = 2;
/// Longest delay of the unmask after spurious events.
const MAX_UNMASK_DELAY: Duration = Duration::from_millis(64);

/// Fixed per-queue settings.
#[derive(Clone, Debug)]
pub(crate) struct WorkerConfig {
    /// In-flight slots (= engine depth).
    pub depth: usize,
    /// Advertised indirect segment limit (0: none).
    pub max_indirect: usize,
    /// How the guest's pages are reached.
    pub mode: crate::grant_memory::GrantMode,
    /// Persistent grant limit, if the frontend uses persistent grants.
    pub persistent: Option<usize>,
    /// Secure discard was advertised.
    pub discard_secure: bool,
    /// Adaptive polling: after a round that did work, keep looking at the ring and the completions until
    /// nothing happened for this long (zero: never poll).
    pub poll: Duration,
    /// The ring shares its thread with others (an I/O thread pool): a polling period ends after the polling time
    /// even while the ring keeps it busy, so that the other rings get their turn.
    pub shared: bool,
}

/// Everything a worker gets from `Dataplane::start` (all of it `Send`).
pub(crate) struct QueueSetup<L, G: GrantTable, E> {
    pub index: usize,
    pub ring: MappedRing<L, G::Mapping>,
    pub evtchn: E,
    pub port: EvtchnPort,
    pub queue: BlockQueue<u32>,
    pub pool: Option<BouncePool>,
    pub grants: Arc<G>,
    pub domid: DomId,
    pub config: WorkerConfig,
    pub signals: Arc<QueueSignals>,
    pub fatal: Arc<FatalState>,
    pub stats: Arc<QueueStats>,
    /// Run on this thread before serving.
    pub init: Option<super::WorkerInit>,
    /// The pool thread's io_uring, when the queue's engine is a lane of it: its rounds span a pass over the
    /// thread's rings, and a polling period submits at once (see `Worker::round`).
    pub thread_ring: Option<SharedUring>,
    /// The pool thread's spare slots, which the queue's slots come from and go back to.
    pub spares: Option<Arc<super::slot::SpareSlots>>,
}

/// What starting a request did.
enum Start {
    /// Submitted (or finished at once).
    Going,
    /// Must wait (barrier behind in-flight requests, bounce pool exhausted).
    Held,
}

struct Worker<L, G: GrantTable, E> {
    index: usize,
    // Field order is drop order: the engine goes first (the bounce pool may be registered with it, and nothing is
    // in flight by then); requests and the mapper release their grants before the ring (which owns the mapping of
    // its pages) and the event channel go.
    queue: BlockQueue<u32>,
    slots: Slots<G::Mapping>,
    mapper: SegmentMapper<G>,
    ring: MappedRing<L, G::Mapping>,
    evtchn: E,
    port: EvtchnPort,
    held: Option<u32>,
    barrier_active: bool,
    flush: Request,
    raw: RawRequest,
    finished: Vec<Finished<u32>>,
    ports: Vec<EvtchnPort>,
    config: WorkerConfig,
    /// The ring's own epoll over its sources: for the worker's own thread loop, and for polling periods (which look
    /// at the sources without waiting). A ring on a pool thread that does not poll has none: the thread's epoll
    /// watches its sources (two system calls per source and one epoll less per start and stop).
    epoll: Option<Epoll>,
    /// On a pool thread: the thread's epoll, which watches the ring's sources too (a source taken off the ring's
    /// epoll is taken off this one as well).
    pool_epoll: Option<Arc<Epoll>>,
    signals: Arc<QueueSignals>,
    stopping: bool,
    halted: bool,
    unpushed: bool,
    /// Requests submitted to the engine since the last kick.
    unkicked: bool,
    /// The event channel fired in this round of the loop; its ports are unmasked after the ring was looked at.
    evtchn_fired: bool,
    /// Requests taken from the ring so far, and at the end of the last event's round: an event is spurious if no
    /// request was taken since the previous one (requests a completion round took before the frontend's notify
    /// was read count as that notify's work).
    taken: u64,
    taken_at_event: u64,
    /// Events in a row that brought no request.
    spurious: u32,
    /// Ports whose unmask is delayed, and until when (late EOI: a frontend that notifies without queueing
    /// anything wakes us at a decreasing rate instead of keeping a CPU busy).
    unmask_at: Option<Instant>,
    /// Responses written so far (with `taken`, what tells a round that did work).
    answered: u64,
    /// In a polling pass: the ring's request event index is left behind (the frontend need not notify).
    polling: bool,
    /// The last look at the ring stopped at its budget with requests left: the event loop comes back to the ring
    /// without sleeping (it only looks at its events in between).
    more_work: bool,
    /// The last look at the ring stopped for lack of room (a held request, a barrier, no free slot): completions
    /// bring it back.
    backpressure: bool,
    fatal: Arc<FatalState>,
    stats: Arc<QueueStats>,
    thread_ring: Option<SharedUring>,
}

/// Reports a worker that ends without being stopped (a panic) on the fatal channel.
struct DeathWatch {
    fatal: Arc<FatalState>,
    index: usize,
}

impl Drop for DeathWatch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.fatal.report(format!("queue {}: worker thread died", self.index));
        }
    }
}

/// The worker thread's body.
pub(crate) fn run<L: BlkifLayout, G: GrantTable + 'static, E: EventChannel>(setup: QueueSetup<L, G, E>) {
    let _watch = DeathWatch { fatal: setup.fatal.clone(), index: setup.index };
    if let Some(Err(e)) = setup.init.as_ref().map(|init| init.run(setup.index)) {
        setup.fatal.report(format!("queue {}: cannot prepare the worker thread: {e}", setup.index));
        return;
    }
    if let Some(mut w) = Worker::build(setup, true) {
        w.event_loop();
        w.shutdown();
    }
}

impl<L: BlkifLayout, G: GrantTable, E: EventChannel> Worker<L, G, E> {
    /// Set up the worker from `setup` on the calling thread (`own_loop`: a thread of its own, which waits in the
    /// ring's epoll); `None` after a fatal error (reported).
    fn build(setup: QueueSetup<L, G, E>, own_loop: bool) -> Option<Self> {
        let epoll = match (own_loop || !setup.config.poll.is_zero()).then(Epoll::new).transpose() {
            Ok(e) => e,
            Err(e) => {
                setup.fatal.report(format!("queue {}: epoll: {e}", setup.index));
                // Nothing was consumed yet: dropping the setup unmaps and unbinds.
                return None;
            }
        };
        let max_segments = MAX_DIRECT_SEGMENTS.max(setup.config.max_indirect);
        let mapper =
            SegmentMapper::new(setup.grants, setup.domid, setup.config.mode, setup.config.persistent, setup.pool);
        let w = Worker {
            index: setup.index,
            slots: Slots::new(setup.config.depth, max_segments, setup.spares),
            mapper,
            queue: setup.queue,
            ring: setup.ring,
            evtchn: setup.evtchn,
            port: setup.port,
            held: None,
            barrier_active: false,
            flush: Request::new(RequestKind::Flush),
            raw: RawRequest::default(),
            finished: Vec::with_capacity(setup.config.depth),
            ports: Vec::new(),
            config: setup.config,
            epoll,
            pool_epoll: None,
            signals: setup.signals,
            stopping: false,
            halted: false,
            unpushed: false,
            unkicked: false,
            evtchn_fired: false,
            taken: 0,
            taken_at_event: 0,
            spurious: 0,
            unmask_at: None,
            answered: 0,
            polling: false,
            more_work: false,
            backpressure: false,
            fatal: setup.fatal,
            stats: setup.stats,
            thread_ring: setup.thread_ring,
        };
        // The completion eventfd is watched edge-triggered: every completion the engine posts signals it anew, so
        // it never needs to be read (a system call per round saved; `complete` looks at the completion ring
        // itself).
        if let Some(epoll) = &w.epoll {
            for (token, (fd, events)) in (0u64..).zip(w.sources()) {
                if let Err(e) = epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(events, token)) {
                    w.fatal.report(format!("queue {}: epoll_ctl: {e}", w.index));
                    return None;
                }
            }
        }
        Some(w)
    }

    /// Stopped, and nothing in flight any more.
    fn finished(&self) -> bool {
        self.stopping && self.in_use() == 0
    }
}

impl<L: BlkifLayout, G: GrantTable, E: EventChannel> Worker<L, G, E> {
    fn in_use(&self) -> usize {
        self.slots.in_use()
    }

    fn event_loop(&mut self) {
        let mut events = [EpollEvent::default(); 3];
        // The frontend may have queued requests before we bound the port.
        self.round(&mut events);
        loop {
            if self.finished() {
                return;
            }
            // Work left on the ring by a round that used its budget: look at the events (the stop request) without
            // waiting, then take the next share.
            let timeout = if self.more_work {
                0
            } else {
                self.unmask_at.map_or(-1, |at| {
                    i32::try_from(at.saturating_duration_since(Instant::now()).as_millis() + 1).unwrap_or(i32::MAX)
                })
            };
            let n = match self.wait_events(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Never abandon I/O in flight (its pages must stay mapped): poll until stopped.
                    tracing::error!(queue = self.index, error = %e, "epoll_wait failed, polling");
                    std::thread::sleep(std::time::Duration::from_millis(10));
                    // The signals are looked at too: they say whether a stop was asked for (one that was not would
                    // abandon the ring without a word).
                    events[0] = EpollEvent::new(EventSet::IN, TOKEN_EVTCHN);
                    events[1] = EpollEvent::new(EventSet::IN, TOKEN_COMPLETION);
                    events[2] = EpollEvent::new(EventSet::IN, TOKEN_STOP);
                    3
                }
            };
            if n > 0 || timeout != 0 {
                QueueStats::add(&self.stats.wakeups, 1);
            }
            self.dispatch(&events[..n]);
            self.round(&mut events);
        }
    }

    /// Take completions and requests, submit, answer; with polling on, poll after a round that did work.
    fn round(&mut self, events: &mut [EpollEvent]) {
        // A round that does work is followed by polling: leave the request event index behind from the start, or
        // the frontend would notify for the next request anyway.
        self.polling = !self.config.poll.is_zero();
        let busy = self.pass();
        // A round without work re-arms (`rearm` makes the final check that polling skipped) before sleeping.
        if self.polling && (busy || self.rearm()) {
            // On a pool thread's shared io_uring, submissions may wait for the end of the pass over the thread's
            // rings; a polling period waits for its own requests' completions, so it submits them at once (and
            // opens the round again after, if one was open).
            let in_round = self.thread_ring.as_ref().is_some_and(|ring| ring.in_round());
            if let Some(ring) = self.thread_ring.as_ref().filter(|_| in_round) {
                ring.end_round();
            }
            self.poll_for_work(events);
            if let Some(ring) = self.thread_ring.as_ref().filter(|_| in_round) {
                ring.begin_round();
            }
        }
        self.polling = false;
    }

    /// One look at everything: answer what finished, take what the frontend queued, submit, publish the
    /// responses, settle the event that woke us. Returns whether a request was taken or answered.
    ///
    /// New requests go first: the `io_uring_enter` that submits them also runs the completion work the kernel
    /// holds for the ring (`GETEVENTS`), so the completions reaped after it come from the completion ring without
    /// a system call of their own (reaping first made two `io_uring_enter` per round that did both). Slots and
    /// engine room cannot run out for lack of that reap: both are as deep as the ring, and the frontend queues a
    /// request only into room a response we already wrote freed. Requests held back (a barrier, an exhausted
    /// bounce pool) are taken once the completions are in.
    fn pass(&mut self) -> bool {
        let before = self.progress();
        // One clock read for the pass's latency figures (a system call in a Xen PV dom0), not one per submitted
        // batch and one per drain.
        self.queue.begin_round();
        self.process_ring();
        self.submit_batch();
        if self.queue.has_finished() {
            self.complete();
            if self.backpressure {
                self.process_ring();
                self.submit_batch();
            }
        }
        // A request the completions started (the next phase of one, a held one) or the second look at the ring
        // took may have finished on the spot (refused by the engine): no eventfd says so, so come back at once.
        if self.queue.has_finished() {
            self.more_work = true;
        }
        self.queue.end_round();
        // Whatever the round queued went out: nothing else may come to submit it (a held request started by the
        // completions once stayed queued here, and its frontend waited forever). Only a failed submission, which
        // halts the ring, leaves entries for a later try.
        debug_assert!(!self.unkicked || self.halted, "queue {}: a round ended with requests not submitted", self.index);
        self.push();
        self.after_round();
        self.progress() != before
    }

    /// Handle what epoll reported, and a delayed unmask that is due.
    fn dispatch(&mut self, events: &[EpollEvent]) {
        for ev in events {
            match ev.data() {
                TOKEN_EVTCHN => self.on_evtchn(),
                TOKEN_STOP => self.on_stop(),
                _ => {}
            }
        }
        if self.unmask_at.is_some_and(|at| Instant::now() >= at) {
            self.unmask_at = None;
            self.unmask_ports();
        }
    }

    /// After the ring was looked at: settle the event that woke us, if one did.
    fn after_round(&mut self) {
        if std::mem::take(&mut self.evtchn_fired) {
            let brought_work = self.taken != self.taken_at_event;
            self.taken_at_event = self.taken;
            self.end_of_event(brought_work);
        }
    }

    /// Requests taken plus responses written: changes when a round did something.
    fn progress(&self) -> u64 {
        self.taken.wrapping_add(self.answered)
    }

    /// The ring was looked at after an event: unmask its port now if requests came since the previous event (or
    /// after only a few events in a row without any), else later, the delay doubling with each further spurious event up to
    /// [`MAX_UNMASK_DELAY`] (what Linux's backends do with late EOI since XSA-332). A masked port keeps what the
    /// frontend notifies pending, and unmasking delivers it: nothing is lost, a storm just gets slow.
    fn end_of_event(&mut self, brought_work: bool) {
        if self.halted || self.stopping {
            return;
        }
        if brought_work {
            self.spurious = 0;
        } else {
            self.spurious = self.spurious.saturating_add(1);
        }
        if self.spurious <= SPURIOUS_FREE {
            self.unmask_ports();
            return;
        }
        let shift = (self.spurious - SPURIOUS_FREE - 1).min(16);
        let delay = Duration::from_millis(1u64 << shift).min(MAX_UNMASK_DELAY);
        QueueStats::add(&self.stats.spurious_delays, 1);
        self.unmask_at = Some(Instant::now() + delay);
    }

    fn unmask_ports(&mut self) {
        for i in 0..self.ports.len() {
            let port = self.ports[i];
            if let Err(e) = self.evtchn.unmask(port) {
                tracing::warn!(queue = self.index, port, error = %e, "evtchn: unmask failed");
            }
        }
    }

    /// Wait up to `timeout` ms (-1: no limit) for events of the ring's own epoll.
    fn wait_events(&self, timeout: i32, events: &mut [EpollEvent]) -> std::io::Result<usize> {
        match &self.epoll {
            Some(epoll) => epoll.wait(timeout, events),
            None => Err(std::io::Error::new(std::io::ErrorKind::Unsupported, "the ring has no epoll of its own")),
        }
    }

    fn remove_fd(&self, fd: RawFd) {
        if let Some(epoll) = &self.epoll {
            let _ = epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
        if let Some(pool) = &self.pool_epoll {
            let _ = pool.ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
    }

    fn on_evtchn(&mut self) {
        self.ports.clear();
        if let Err(e) = self.evtchn.pending(&mut self.ports) {
            tracing::warn!(queue = self.index, error = %e, "evtchn: reading pending ports failed");
        }
        if self.halted || self.stopping {
            // A halted ring takes no more events: the port stays masked and off the loop, so a frontend that keeps
            // notifying cannot make us spin.
            self.remove_fd(self.evtchn.fd());
            return;
        }
        // Unmasked once the ring was looked at (`end_of_event`).
        self.evtchn_fired = true;
    }

    /// The control plane asked for something: a kick (notify the frontend now: a closing Linux blkfront restarts
    /// the block queues it stopped only on an event, and the requests held there are dispatched only then), a stop.
    fn on_stop(&mut self) {
        let asked = self.signals.take();
        if asked.kick && !self.halted {
            QueueStats::add(&self.stats.notifications, 1);
            if let Err(e) = self.evtchn.notify(self.port) {
                tracing::warn!(queue = self.index, error = %e, "evtchn notify failed");
            }
        }
        if asked.stop && !self.stopping {
            tracing::debug!(queue = self.index, in_flight = self.in_use(), "stopping");
            self.stopping = true;
            self.remove_fd(self.signals.fd());
            self.remove_fd(self.evtchn.fd());
        }
    }

    fn halt(&mut self, err: &RingError) {
        if self.halted {
            return;
        }
        self.halted = true;
        self.stats.halted.store(true, Ordering::SeqCst);
        self.remove_fd(self.evtchn.fd());
        self.fatal.report(format!("queue {}: {err}", self.index));
    }

    /// Take the engine's completions (from its completion ring: the eventfd is edge-triggered and never read):
    /// advance multi-phase requests, answer the rest.
    fn complete(&mut self) {
        let mut finished = std::mem::take(&mut self.finished);
        self.queue.drain_ready(|f| finished.push(f));
        for f in finished.drain(..) {
            let idx = f.cookie;
            if f.status != Status::Ok {
                if let Some(e) = &f.error {
                    tracing::debug!(queue = self.index, error = %e, "request failed");
                }
                self.finish(idx, blkif_status(f.status));
                continue;
            }
            let slot = &mut self.slots[idx];
            if !slot.done() {
                self.submit_phase(idx);
                continue;
            }
            let status = match self.mapper.finish(&slot.req, &mut slot.pages) {
                Ok(()) => RSP_OKAY,
                Err(fault) => {
                    tracing::debug!(queue = self.index, %fault, "delivering read data failed");
                    RSP_ERROR
                }
            };
            self.finish(idx, status);
        }
        self.finished = finished;
        // A request held back (a barrier behind the ones that just finished, a bind that waited for bounce pages)
        // starts now and goes out with this batch: nothing else may come to submit it (the ring can be empty, and
        // the frontend waits for its answer).
        self.start_held();
        self.submit_batch();
    }

    /// Answer slot `idx` with `status`, release its pages and free it.
    fn finish(&mut self, idx: u32, status: i16) {
        let slot = &mut self.slots[idx];
        self.mapper.release(&mut slot.pages);
        let rsp = BlkifResponse { id: slot.req.id, operation: slot.req.operation, status };
        if !self.ring.put_response(&rsp) {
            tracing::error!(queue = self.index, "response without an outstanding request");
        }
        QueueStats::add(&self.stats.responses, 1);
        self.answered += 1;
        if status == RSP_OKAY {
            let bytes = slot.dev.data_len();
            match slot.req.op {
                BlkifOp::Read => QueueStats::add(&self.stats.read_bytes, bytes),
                BlkifOp::Write | BlkifOp::WriteBarrier | BlkifOp::Flush => {
                    QueueStats::add(&self.stats.write_bytes, bytes)
                }
                BlkifOp::Discard { .. } => {}
            }
        } else {
            QueueStats::add(&self.stats.errors, 1);
        }
        if slot.barrier {
            slot.barrier = false;
            self.barrier_active = false;
        }
        slot.dev.segments.clear();
        self.slots.free(idx);
        self.unpushed = true;
    }

    /// Publish responses and notify the frontend if it asked for it: once per batch.
    fn push(&mut self) {
        if !self.unpushed {
            return;
        }
        self.unpushed = false;
        if self.ring.push_responses() {
            QueueStats::add(&self.stats.notifications, 1);
            if let Err(e) = self.evtchn.notify(self.port) {
                tracing::warn!(queue = self.index, error = %e, "evtchn notify failed");
            }
        }
    }

    /// After the loop: nothing is in flight. Answer what the frontend queued since our last look with an I/O
    /// error (a frontend that has not yet seen the vbd close may still have queued requests, and Linux blkfront
    /// waits for an answer to each before it can remove the disk), then release every grant and the port.
    fn shutdown(&mut self) {
        self.complete();
        self.push();
        self.fail_unconsumed();
        self.mapper.clear_persistent();
        if let Err(e) = self.evtchn.unbind(self.port) {
            tracing::debug!(queue = self.index, error = %e, "evtchn unbind");
        }
        tracing::debug!(
            queue = self.index,
            ring_pages = crate::services::GrantMapping::pages(self.ring.mapping()),
            slots = self.slots.made(),
            "queue stopped"
        );
    }
}
