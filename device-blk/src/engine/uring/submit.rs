// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Handing operations to the ring: queueing an operation's next step (running the ioctl steps io_uring cannot
//! issue on the way) and submitting the queued entries as the engine's batching says.
//!
//! An ioctl step (`BLKSECDISCARD`, and `BLKDISCARD` before Linux 6.12) blocks the thread that serves the ring, for
//! as long as the device takes over up to [`RANGE_CHUNK`](super::super::op::RANGE_CHUNK) bytes. So a round runs
//! ioctl steps only until they took [`BLOCKING_BUDGET`](super::BLOCKING_BUDGET) in all (at least one); the rest
//! wait in `blocking` for the next round (the completion eventfd is signalled so that one comes), and the thread
//! answers everything else in between: a guest discarding its whole disk, a ring's worth of requests at a time,
//! holds its other queues (and, on a shared ring, other disks) for one budget and one piece per round, not for
//! all of it. A round is a [`SharedUring`](super::SharedUring)'s, from `begin_round` (all its lanes' reaps
//! share one budget), else one `reap_ready`.

use std::os::fd::AsRawFd;
use std::time::Instant;

use io_uring::{squeue, types};

use super::super::op::{run_blocking, Progress, Step};
use super::{OpState, UringEngine, DISK_FILE, ENTER_GETEVENTS, UNPLUGGED_CHUNK};
use crate::engine::{Batching, EngineError};

impl UringEngine {
    /// Issue the next step of the operation in slot `index`: ioctls run here (within the round's budget, else the
    /// operation waits in `blocking`) until a step needs the ring, which is queued; an operation that finishes on
    /// the way is recorded in `finished`.
    pub(super) fn issue(&mut self, index: u32, mut state: OpState, mut retry: bool) {
        let file = self.slots.get(index as usize).map_or(DISK_FILE, |slot| slot.file);
        loop {
            // SAFETY: the operation's iovecs stay valid until it is reaped (the `enqueue` contract).
            let step = unsafe { state.step() };
            if matches!(step, Step::Ioctl { .. }) {
                if self.blocking_ran && self.blocking_spent >= self.blocking_budget {
                    // Come back for it: the eventfd brings the thread to its next round (one write for all that
                    // wait; `resume_blocking` writes again for those it leaves waiting).
                    if self.blocking.is_empty() {
                        self.signal_blocking();
                    }
                    return self.blocking.push_back((index, state));
                }
                self.blocking_ran = true;
                let fd = self.files.get(file).map_or(-1, |f| f.disk.file().as_raw_fd());
                let started = Instant::now();
                // SAFETY: an ioctl step names no guest memory (a file no longer registered gives EBADF).
                let result = unsafe { run_blocking(fd, step) };
                self.blocking_spent += started.elapsed();
                match state.advance(result) {
                    Progress::Done(result) => return self.finished.push_back((index, result)),
                    Progress::Continue { retry: again } => {
                        retry = again;
                        continue;
                    }
                }
            }
            let mut entry = self.entry(step, types::Fixed(file)).user_data(u64::from(index));
            if retry {
                // Retry after EAGAIN from the kernel's blocking worker context, where it cannot recur for lack of
                // a non-blocking resource.
                entry = entry.flags(squeue::Flags::ASYNC);
            }
            // SAFETY: the entry names the disk (a registered file) and buffers the `enqueue` contract keeps valid
            // until this slot's operation is reaped.
            let mut pushed = unsafe { self.ring.submission().push(&entry) }.is_ok();
            if !pushed {
                // A ring with more slots than entries (a shared ring): submit what is queued to make room.
                self.sq_pending = true;
                if let Err(error) = self.submit_queued() {
                    tracing::debug!(%error, "io_uring submission to make room failed");
                }
                // SAFETY: as above.
                pushed = unsafe { self.ring.submission().push(&entry) }.is_ok();
            }
            if !pushed {
                // The kernel took none of the queued entries: fail this one rather than wait.
                return self.finished.push_back((index, Err(libc::EBUSY)));
            }
            if let Some(slot) = self.slots.get_mut(index as usize) {
                slot.state = Some(state);
            }
            self.sq_pending = true;
            return;
        }
    }

    /// A new round: the blocking budget is whole again.
    pub(super) fn new_blocking_round(&mut self) {
        self.blocking_spent = std::time::Duration::ZERO;
        self.blocking_ran = false;
    }

    /// The operations that waited for the blocking budget go on (those that find it spent wait again, in order);
    /// outside a shared ring's round, this starts a round of its own.
    pub(super) fn resume_blocking(&mut self) {
        if !self.deferred {
            self.new_blocking_round();
        }
        let waiting = self.blocking.len();
        for _ in 0..waiting {
            let Some((index, state)) = self.blocking.pop_front() else { break };
            self.issue(index, state, false);
        }
        // `issue` signals only when it finds the queue empty, which it never does while older ones still wait.
        if waiting > 0 && !self.blocking.is_empty() {
            self.signal_blocking();
        }
    }

    fn signal_blocking(&self) {
        if let Err(error) = self.signal() {
            tracing::warn!(%error, "cannot signal the completion eventfd");
        }
    }

    /// Hand the queued entries to the kernel. What it cannot take now (EAGAIN, EBUSY) stays queued, and the
    /// completion eventfd is signalled so that the next [`reap`](IoEngine::reap) tries again.
    pub(super) fn flush_submissions(&mut self) -> Result<(), EngineError> {
        if self.deferred {
            return Ok(());
        }
        self.submit_queued()
    }

    /// [`flush_submissions`](Self::flush_submissions), deferred or not.
    pub(super) fn submit_queued(&mut self) -> Result<(), EngineError> {
        if !self.sq_pending {
            return Ok(());
        }
        if self.disabled {
            self.ring
                .submitter()
                .register_enable_rings()
                .map_err(|source| EngineError::Io { what: "io_uring enable rings", cause: source })?;
            self.disabled = false;
        }
        let chunk = match self.batching {
            // (`Auto` is resolved by `set_batching`; left so, on a ring over several disks, it batches whole.)
            Batching::Whole | Batching::Auto => u32::MAX,
            Batching::Unplugged => UNPLUGGED_CHUNK,
        };
        loop {
            let queued = u32::try_from(self.ring.submission().len()).unwrap_or(u32::MAX);
            if queued == 0 {
                break;
            }
            // Deferred completions are fetched by the same system call.
            let flags = if self.task_work_waiting() { ENTER_GETEVENTS } else { 0 };
            // SAFETY: the queued entries are valid (see `issue`); no argument pointer.
            match unsafe { self.ring.submitter().enter::<libc::sigset_t>(queued.min(chunk), 0, flags, None) } {
                Ok(0) => break, // Took nothing: keep the entries queued and try again later.
                Ok(_) => continue,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EBUSY)) => {
                    tracing::debug!("io_uring submit deferred: {e}");
                    break;
                }
                Err(source) => return Err(EngineError::Io { what: "io_uring_enter", cause: source }),
            }
        }
        self.sq_pending = !self.ring.submission().is_empty();
        if self.sq_pending {
            self.signal()?;
        }
        Ok(())
    }

    pub(super) fn signal(&self) -> Result<(), EngineError> {
        self.eventfd.write(1).map_err(|source| EngineError::Io { what: "eventfd write", cause: source })
    }
}
