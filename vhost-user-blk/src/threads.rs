// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! I/O threads: which thread serves which queues, the events of a thread's epoll, and one round of a thread's
//! work.
//!
//! The number of I/O threads is chosen apart from the number of queues: queue `q` is served by thread
//! `q % threads` (vhost-user-backend spawns one vring worker per mask [`Layout::masks`] returns, and hands each
//! the vrings of its mask, in queue order). A thread's epoll holds the kick eventfds of all its queues, their
//! resume eventfds, the completion eventfd of the thread's io_uring, and the thread's exit and naming eventfds, so
//! one `epoll_wait` covers all its queues.
//!
//! The thread's queues share one io_uring ([`SharedUring`]: a lane of the configured depth per queue, so a queue
//! never takes another's slots), made when the thread starts its first queue. A round submits the requests of all
//! its queues together when it ends (one `io_uring_enter` per batch, not per queue), and runs the completion task
//! work once for all of them; one eventfd signals completions for all. (With the synchronous engine, or where
//! io_uring is refused, each queue has an engine and a completion eventfd of its own, as before.)
//!
//! Every event starts a round over *all* the thread's queues: the queue the event is for, then each other queue
//! with work waiting (finished requests, or chains in its avail ring), each at most a ring's worth of chains
//! (the bounded round of [`QueueWorker`](super::worker::QueueWorker)). So a busy or hostile queue, whose worker
//! comes back through its resume eventfd round after round, never keeps the thread from its other queues: each
//! of its rounds serves them too. Only the owning thread ever takes a queue's worker lock and vring lock on the
//! data path (the vhost-user protocol thread takes them for `GET_VRING_BASE` and teardown).

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::Ordering;
use std::sync::{OnceLock, PoisonError, Weak};

use vhost_user_backend::VringT;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::worker::{avail_pending, QueueWorker};
use super::{AtomicGuestMemory, BlkEpollHandler, BlkVring, VhostUserBlkBackend};
use device_blk::engine::{EngineKind, SharedUring};

/// Prefix of the I/O threads' names (`blkbackd-io0`, `blkbackd-io1`, ...), as `/proc/PID/task/*/comm` shows them.
pub const IO_THREAD_NAME: &str = "blkbackd-io";

/// How queues map to I/O threads: queue `q` to thread `q % threads`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Layout {
    pub(super) queues: u16,
    pub(super) threads: u16,
}

impl Layout {
    /// The queue mask of each thread, for `VhostUserBackend::queues_per_thread`.
    pub(super) fn masks(&self) -> Vec<u64> {
        (0..self.threads)
            .map(|t| (t..self.queues).step_by(usize::from(self.threads.max(1))).fold(0u64, |m, q| m | 1u64 << q))
            .collect()
    }

    /// The queues of thread `thread`, in the order vhost-user-backend hands it their vrings.
    pub(super) fn queues_of(&self, thread: u16) -> Vec<usize> {
        (thread..self.queues).step_by(usize::from(self.threads.max(1))).map(usize::from).collect()
    }
}

/// What an epoll event of an I/O thread is for. Ids up to `num_queues` belong to vhost-user-backend (the
/// thread's vrings' kicks, by their position in the thread, and its own vring-enable event); ours follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Event {
    /// The guest kicked the thread's `n`th queue (or the ring was just enabled).
    Kick(usize),
    /// The engine of the thread's `n`th queue signalled completions.
    Completion(usize),
    /// The thread's `n`th queue used up its round's budget and left chains for the next round.
    Resume(usize),
    /// Stop the thread.
    Exit,
    /// Name the thread (sent once, right after attaching).
    Name,
    /// Not ours.
    Unknown(u16),
}

impl Event {
    fn base(num_queues: u16) -> u64 {
        u64::from(num_queues) + 1
    }

    /// The epoll id of the exit event.
    pub(super) fn exit_id(num_queues: u16) -> u64 {
        Self::base(num_queues)
    }

    /// The epoll id of the naming event.
    pub(super) fn name_id(num_queues: u16) -> u64 {
        Self::base(num_queues) + 1
    }

    /// The epoll id of the completions of the thread's `local`th queue.
    pub(super) fn completion_id(num_queues: u16, local: usize) -> u64 {
        Self::base(num_queues) + 2 + 2 * local as u64
    }

    /// The epoll id of the resume eventfd of the thread's `local`th queue.
    pub(super) fn resume_id(num_queues: u16, local: usize) -> u64 {
        Self::base(num_queues) + 3 + 2 * local as u64
    }

    /// Decode an event id of a thread serving `local_queues` queues.
    pub(super) fn decode(id: u16, num_queues: u16, local_queues: usize) -> Event {
        let id64 = u64::from(id);
        let base = Self::base(num_queues);
        if usize::from(id) < local_queues {
            return Event::Kick(usize::from(id));
        }
        if id64 == base {
            return Event::Exit;
        }
        if id64 == base + 1 {
            return Event::Name;
        }
        match id64.checked_sub(base + 2).and_then(|n| usize::try_from(n).ok()) {
            Some(n) if n / 2 < local_queues => {
                if n % 2 == 0 {
                    Event::Completion(n / 2)
                } else {
                    Event::Resume(n / 2)
                }
            }
            _ => Event::Unknown(id),
        }
    }
}

/// Where a thread's own eventfds go: its epoll (the vring worker's handler), or a test's event loop.
pub(super) trait Registrar: Send + Sync {
    /// Watch `fd` for `events`, reporting `data` as the event id.
    fn register(&self, fd: RawFd, events: EventSet, data: u64) -> io::Result<()>;
}

/// A vring worker's epoll. Weak: the handler holds the backend.
pub(super) struct HandlerRegistrar(pub(super) Weak<BlkEpollHandler>);

impl Registrar for HandlerRegistrar {
    fn register(&self, fd: RawFd, events: EventSet, data: u64) -> io::Result<()> {
        let handler = self.0.upgrade().ok_or_else(|| io::Error::other("the vring worker is gone"))?;
        handler.register_listener(fd, events, data)
    }
}

/// An I/O thread's own state.
pub(super) struct ThreadSlot {
    /// Its queues (global indices), in the order of its vrings.
    pub(super) queues: Vec<usize>,
    /// Written to stop the thread.
    pub(super) exit: EventFd,
    /// Written once to have the thread name itself.
    pub(super) name: EventFd,
    /// The io_uring all its queues share (each through a lane of its own depth), made by the thread when it
    /// starts its first queue; `None` for the synchronous engine, or where io_uring is not available (each queue
    /// then builds an engine of its own, as the options say).
    ring: OnceLock<Option<SharedUring>>,
    /// A ring made in advance (by the server, before the process locked itself down), used instead of a new one.
    premade: Option<SharedUring>,
}

impl ThreadSlot {
    pub(super) fn new(queues: Vec<usize>, premade: Option<SharedUring>) -> io::Result<Self> {
        let (exit, name) =
            (EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC)?, EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC)?);
        Ok(ThreadSlot { queues, exit, name, ring: OnceLock::new(), premade })
    }

    /// Start a round over the thread's queues: their submissions go out together when the returned guard drops.
    pub(super) fn round(&self) -> Round<'_> {
        let ring = self.ring.get().and_then(Option::as_ref);
        if let Some(ring) = ring {
            ring.begin_round();
        }
        Round(ring)
    }
}

/// A round of an I/O thread over its queues (see [`ThreadSlot::round`]): submits the round's requests, all
/// queues' together, when dropped.
pub(super) struct Round<'a>(Option<&'a SharedUring>);

impl Drop for Round<'_> {
    fn drop(&mut self) {
        if let Some(ring) = self.0 {
            ring.end_round();
        }
    }
}

/// Name the calling thread `blkbackd-io<thread>` (at most 15 bytes, the kernel's limit).
fn name_thread(thread: usize) {
    let mut name = format!("{IO_THREAD_NAME}{thread}").into_bytes();
    name.truncate(15);
    name.push(0);
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes from the pointer, which `name` is
    // for the duration of the call.
    let rc = unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr() as libc::c_ulong, 0, 0, 0) };
    if rc != 0 {
        tracing::debug!(thread, error = %io::Error::last_os_error(), "cannot name the I/O thread");
    }
}

impl VhostUserBlkBackend {
    /// The io_uring of I/O thread `thread`, made on first use (call on that thread) with a lane for each of its
    /// queues, its completion eventfd watched by the thread's epoll as the completion event of its first queue
    /// (every round serves all the thread's queues anyway).
    pub(super) fn thread_ring(&self, thread: usize) -> Option<SharedUring> {
        let slot = self.threads.get(thread)?;
        slot.ring.get_or_init(|| self.make_thread_ring(thread, slot)).clone()
    }

    fn make_thread_ring(&self, thread: usize, slot: &ThreadSlot) -> Option<SharedUring> {
        let o = &self.options;
        if o.engine == EngineKind::Sync {
            return None;
        }
        let ring = match &slot.premade {
            Some(ring) => ring.clone(),
            None => SharedUring::new(self.disk.clone(), slot.queues.len(), o.effective_io_depth(), o.batching)
                .inspect_err(|error| tracing::debug!(thread, %error, "no shared io_uring; one engine per queue"))
                .ok()?,
        };
        let registrar = self.registrars.get().and_then(|r| r.get(thread))?;
        let events = EventSet::IN | EventSet::EDGE_TRIGGERED;
        let id = Event::completion_id(o.num_queues, 0);
        if let Err(error) = registrar.register(ring.completion_fd(), events, id) {
            tracing::warn!(thread, %error, "cannot watch the shared io_uring; one engine per queue");
            return None;
        }
        tracing::debug!(thread, queues = slot.queues.len(), "I/O thread's io_uring shared by its queues");
        Some(ring)
    }

    /// One event of I/O thread `thread_id` (whose vrings are `vrings`): the round it starts over the thread's
    /// queues. An error ends the thread.
    pub(super) fn thread_event(&self, device_event: u16, vrings: &[BlkVring], thread_id: usize) -> io::Result<()> {
        let thread = self.threads.get(thread_id).ok_or_else(|| io::Error::other("event for an unknown thread"))?;
        let local_queues = thread.queues.len().min(vrings.len());
        let (local, kind) = match Event::decode(device_event, self.options.num_queues, local_queues) {
            Event::Exit => {
                let _ = thread.exit.read();
                self.finish_thread(thread, vrings);
                // The only way to end a vring worker's loop from the backend is an error from this function:
                // vhost-user-backend 0.24's own `exit_event` leaks its eventfd on every connection.
                return Err(io::Error::new(io::ErrorKind::Interrupted, "I/O thread stopped"));
            }
            Event::Name => {
                let _ = thread.name.read();
                name_thread(thread_id);
                return Ok(());
            }
            Event::Unknown(other) => {
                tracing::debug!(thread = thread_id, event = other, "unexpected event");
                return Ok(());
            }
            Event::Kick(n) => (n, Event::Kick(n)),
            Event::Completion(n) => (n, Event::Completion(n)),
            Event::Resume(n) => (n, Event::Resume(n)),
        };
        let stopping = self.stopping.load(Ordering::SeqCst);
        let mem = self.mem.read().unwrap_or_else(PoisonError::into_inner);
        let round = thread.round();
        let mut work = self.serve_event(thread, local, kind, vrings, &mem, stopping)?;
        for other in (0..local_queues).filter(|&n| n != local) {
            work |= self.serve_waiting(thread, other, vrings, &mem, stopping);
        }
        drop(round);
        drop(mem);
        if work && self.options.poll_us > 0 {
            self.poll_thread(thread, &vrings[..local_queues]);
        }
        Ok(())
    }

    /// The event's own queue: start its worker at its first kick, then one bounded round. Returns whether a round
    /// ran (polling may follow).
    fn serve_event(
        &self,
        thread: &ThreadSlot,
        local: usize,
        kind: Event,
        vrings: &[BlkVring],
        mem: &AtomicGuestMemory,
        stopping: bool,
    ) -> io::Result<bool> {
        let (Some(&index), Some(vring)) = (thread.queues.get(local), vrings.get(local)) else {
            return Ok(false);
        };
        let Some(slot) = self.queues.get(index) else {
            return Ok(false);
        };
        if stopping && matches!(kind, Event::Kick(_)) {
            return Ok(false);
        }
        let mut guard = slot.lock();
        let worker = match (&mut *guard, kind) {
            (Some(worker), _) => worker,
            (None, Event::Kick(_)) => guard.insert(self.start_worker(index, local).inspect_err(|error| {
                tracing::error!(queue = index, %error, "cannot start the queue");
            })?),
            (None, _) => return Ok(false),
        };
        match kind {
            Event::Kick(_) => worker.on_kick(vring, mem),
            Event::Completion(_) => worker.on_completion(vring, mem, !stopping),
            Event::Resume(_) => worker.on_resume(vring, mem, !stopping),
            _ => return Ok(false),
        }
        notify_idle(slot, worker);
        Ok(true)
    }

    /// Another queue of the thread: if it has work waiting, one bounded round (as a kick would). Costs two loads
    /// and no system call when it has none. Returns whether a round ran.
    fn serve_waiting(
        &self,
        thread: &ThreadSlot,
        local: usize,
        vrings: &[BlkVring],
        mem: &AtomicGuestMemory,
        stopping: bool,
    ) -> bool {
        let (Some(&index), Some(vring)) = (thread.queues.get(local), vrings.get(local)) else {
            return false;
        };
        let Some(slot) = self.queues.get(index) else {
            return false;
        };
        let mut guard = slot.lock();
        let Some(worker) = guard.as_mut() else {
            return false;
        };
        let finished = worker.has_finished();
        // A queue at its depth makes room by answering what finished: it may pop then too, or the chains it left
        // in the ring for want of room would wait for a kick the guest need not send.
        let may_pop = !stopping && (finished || worker.has_room()) && {
            let ring = vring.get_ref();
            ring.is_enabled() && avail_pending(&ring, mem)
        };
        if !finished && !may_pop {
            return false;
        }
        worker.on_completion(vring, mem, may_pop);
        notify_idle(slot, worker);
        true
    }

    /// The exit event: wait for and answer every request in flight on the thread's queues.
    fn finish_thread(&self, thread: &ThreadSlot, vrings: &[BlkVring]) {
        let mem = self.mem.read().unwrap_or_else(PoisonError::into_inner);
        for (&index, vring) in thread.queues.iter().zip(vrings) {
            if let Some(slot) = self.queues.get(index) {
                if let Some(worker) = slot.lock().as_mut() {
                    worker.finish_in_flight(vring, &mem);
                }
            }
        }
    }
}

/// Wake whoever waits for the queue to go idle, if it is.
pub(super) fn notify_idle(slot: &super::QueueSlot, worker: &QueueWorker) {
    if worker.in_flight() == 0 && slot.waiters.load(Ordering::SeqCst) > 0 {
        slot.idle.notify_all();
    }
}

#[cfg(test)]
#[path = "threads_tests.rs"]
mod tests;
