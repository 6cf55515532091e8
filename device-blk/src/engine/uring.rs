// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The io_uring engine: one ring per queue, the disk registered as a fixed file, every operation of a kick
//! submitted with one `io_uring_enter`, completions signalled on an eventfd registered with the ring. A thread's
//! ring can also serve several queues ([`SharedUring`]), of one disk or, with a sparse table of registered files,
//! of several (module `setup`).
//!
//! Each operation occupies a slot of a table allocated once; the slot index is the entry's `user_data` and holds
//! the operation's [`OpState`], so a short transfer, a fallback or an `EAGAIN` retry is resubmitted from the slot
//! when its completion is reaped, without allocating. Block-layer ioctls that io_uring cannot issue
//! (`BLKSECDISCARD`, and `BLKDISCARD` on kernels without `BLOCK_URING_CMD_DISCARD`) run synchronously on the
//! calling thread. A small read of a file on tmpfs, or a small write that finds the ring idle, runs inline on the
//! calling thread (module `inline`: tmpfs has no asynchronous path, and the kernel's worker-thread hand-over costs
//! more than the copy).
//!
//! The ring is created disabled and enabled by the first [`submit`](IoEngine::submit), so that with
//! `IORING_SETUP_SINGLE_ISSUER` the ring belongs to the thread that submits (the queue's worker), not to the thread
//! that built the engine. After that first submit the engine must stay on that thread. Before it is enabled, the
//! ring is restricted to the engine's own operations on the registered disk (module `restrict`).
//!
//! # Completion delivery
//! A finished read or write reaches the ring as kernel *task work* that must run on the submitting thread. Where
//! the kernel allows it (6.1+), the ring uses `IORING_SETUP_DEFER_TASKRUN`: the work waits until this thread asks
//! for it (an `io_uring_enter` with `GETEVENTS`, which [`submit`](IoEngine::submit) and
//! [`reap`](IoEngine::reap) make only when `IORING_SQ_TASKRUN` says work is waiting), the completion eventfd is
//! signalled when the first piece of work arrives, and a thread sleeping in `epoll_wait` is not interrupted with
//! `EINTR` (which `COOP_TASKRUN`, the fallback, does once per wake-up). A poller sees waiting work in the shared
//! `IORING_SQ_TASKRUN` flag without a system call ([`has_completions`](IoEngine::has_completions)). The kernel
//! runs at most a few dozen pieces of work per `GETEVENTS` and sets the flag again for the rest, so reaping loops
//! until the flag is clear.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use io_uring::{opcode, squeue, types, IoUring, Probe};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::op::{OpState, Progress, Step};
use super::{Batching, Completion, EngineError, IoEngine, IoOp};
use crate::disk::Disk;
pub use setup::COMPLETION_MODE_CAP;
use setup::{build_ring, entry_for, fixed_entry_for, FileTable};

mod inline;
mod restrict;
mod setup;
mod shared;
mod submit;

pub use shared::{SharedUring, UringLane};

/// Index of the disk in the registered file table of an engine of its own.
const DISK_FILE: u32 = 0;

/// `IORING_ENTER_GETEVENTS`: run waiting task work and post its completions.
const ENTER_GETEVENTS: u32 = 1;

/// How long a round's ioctl steps may block the thread in all before the rest wait for the next round (module
/// `submit`). A round always runs at least one.
const BLOCKING_BUDGET: Duration = Duration::from_millis(5);

/// Entries per `io_uring_enter` with [`Batching::Unplugged`]: io_uring plugs the block layer for more than two.
const UNPLUGGED_CHUNK: u32 = 2;

/// Pieces of deferred task work the kernel runs per `GETEVENTS` at most (`IO_LOCAL_TW_DEFAULT_MAX`); it sets
/// `IORING_SQ_TASKRUN` again for the rest, without signalling the eventfd.
const TASKRUN_ROUND: usize = 20;

/// Most submission entries of a ring.
const MAX_ENTRIES: u32 = 4096;

/// How the kernel delivers completion task work to the ring (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompletionMode {
    /// `DEFER_TASKRUN` + `TASKRUN_FLAG`: run when the owner asks (6.1+).
    Deferred,
    /// `COOP_TASKRUN` + `TASKRUN_FLAG`: run at the owner's next kernel entry (5.19+).
    Cooperative,
    /// As [`Cooperative`](Self::Cooperative), without `SINGLE_ISSUER`: one thread after another may own the ring
    /// (one at a time), so a ring made before a process locks itself down can serve the threads it starts later,
    /// e.g. each vhost-user frontend connection's (5.19+).
    Portable,
    /// Plain task work that interrupts the owner (older kernels).
    Interrupting,
}

/// The registered file table an engine starts with.
enum Table {
    /// One disk, for an engine of its own.
    Disk(Arc<Disk>),
    /// This many empty slots, filled as lanes come.
    Sparse(u32),
}

/// One operation in flight.
#[derive(Debug)]
struct Slot {
    /// The caller's token.
    token: u64,
    /// The registered file (disk) it works on.
    file: u32,
    /// The operation, while one of its steps is on the ring.
    state: Option<OpState>,
}

/// io_uring engine over one disk (or over the disks of a thread's lanes, see [`SharedUring`]).
pub struct UringEngine {
    files: FileTable,
    ring: IoUring,
    eventfd: EventFd,
    /// Fixed table of operation slots (never resized: no allocation after construction).
    slots: Vec<Slot>,
    /// Free slot indices.
    free: Vec<u32>,
    /// Operations that finished without a completion entry (ioctls, refused operations), in order.
    finished: VecDeque<(u32, Result<u64, i32>)>,
    /// Operations whose next step is a blocking ioctl that waits for the next round (module `submit`).
    blocking: VecDeque<(u32, OpState)>,
    /// Whether the round ran an ioctl step yet, the time they took, and how much a round may spend.
    blocking_ran: bool,
    blocking_spent: Duration,
    blocking_budget: Duration,
    /// The ring was created disabled and has not been enabled yet.
    disabled: bool,
    /// The submission queue holds entries the kernel has not taken yet.
    sq_pending: bool,
    /// How completions are delivered.
    mode: CompletionMode,
    /// How batches are submitted.
    batching: Batching,
    /// Leave queued entries for [`flush`](Self::flush) instead of submitting them in
    /// [`submit`](IoEngine::submit) and [`reap_ready`](IoEngine::reap_ready) (a [`SharedUring`]'s round).
    deferred: bool,
    /// The registered buffer (index 0), as host addresses `start..end`.
    fixed: Option<std::ops::Range<usize>>,
    /// Reads and writes issued from the registered buffer.
    fixed_ops: u64,
    /// Reads and writes run inline (module `inline`).
    inline_ops: u64,
    /// The kernel has fixed vectored I/O (`READV_FIXED`, `WRITEV_FIXED`).
    fixed_vectored: bool,
    /// The ring carries the engine's allowlist (`IORING_REGISTER_RESTRICTIONS`).
    restricted: bool,
}

// SAFETY: the raw pointers in the slots' `OpState`s are the caller's guest buffers and iovec arrays, which the
// `enqueue` contract keeps valid until the operation is reaped; the engine dereferences them only through system
// calls it makes itself, from whichever single thread owns the engine, so moving it between threads is sound.
unsafe impl Send for UringEngine {}

impl std::fmt::Debug for UringEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringEngine")
            .field("capacity", &self.slots.len())
            .field("in_flight", &self.in_flight())
            .field("discard_cmd", &self.uses_discard_command())
            .field("mode", &self.mode)
            .field("restricted", &self.restricted)
            .finish()
    }
}

impl UringEngine {
    /// A ring with `depth` submission entries (at most 4096; rounded up to a power of two by the kernel).
    pub fn new(disk: Arc<Disk>, depth: u32) -> Result<Self, EngineError> {
        Self::with_mode(disk, depth, CompletionMode::Deferred)
    }

    /// A ring as [`new`](Self::new) makes, with completions delivered as `preferred` says where the kernel
    /// allows it (else the next mode down the list of [`CompletionMode`]).
    pub fn with_mode(disk: Arc<Disk>, depth: u32, preferred: CompletionMode) -> Result<Self, EngineError> {
        let depth = depth.clamp(1, MAX_ENTRIES);
        Self::with_slots(disk, depth, depth, preferred)
    }

    /// A ring of `entries` submission entries (at most [`MAX_ENTRIES`]) with room for `slots` operations in
    /// flight: with more slots than entries, a full submission queue is submitted to make room.
    fn with_slots(disk: Arc<Disk>, entries: u32, slots: u32, preferred: CompletionMode) -> Result<Self, EngineError> {
        let entries = entries.clamp(1, MAX_ENTRIES);
        Self::build(Table::Disk(disk), entries, entries.saturating_mul(2), slots.max(1), preferred)
    }

    /// A ring with no disk yet: a sparse table of `files` registered files that
    /// [`add_file`](Self::add_file) fills, `entries` submission and `cq_entries` completion entries, and no slot
    /// until [`add_slots`](Self::add_slots) makes some. Its restrictions let the owner update the file table.
    fn open_ended(files: u32, entries: u32, cq_entries: u32, preferred: CompletionMode) -> Result<Self, EngineError> {
        let entries = entries.clamp(1, MAX_ENTRIES);
        Self::build(Table::Sparse(files), entries, cq_entries.max(entries), 0, preferred)
    }

    fn build(
        table: Table,
        entries: u32,
        cq_entries: u32,
        slots: u32,
        preferred: CompletionMode,
    ) -> Result<Self, EngineError> {
        let io = |what| move |source| EngineError::Io { what, cause: source };
        let (ring, disabled, mode) = build_ring(entries, cq_entries, preferred).map_err(io("io_uring_setup"))?;
        let eventfd = EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(io("eventfd"))?;
        ring.submitter().register_eventfd(eventfd.as_raw_fd()).map_err(io("io_uring register eventfd"))?;
        // Probed now: once the ring is enabled, its restrictions refuse every register operation they do not name.
        let mut probe = Probe::new();
        let probe = ring.submitter().register_probe(&mut probe).is_ok().then_some(probe);
        let discard_supported = restrict::supports(probe.as_ref(), &[opcode::UringCmd16::CODE]);
        let fixed_vectored = restrict::supports(probe.as_ref(), &restrict::FIXED_VECTORED_OPS);
        let (files, allow) = match table {
            Table::Disk(disk) => {
                let files = FileTable::single(&ring, disk, discard_supported)?;
                let discard_cmd = files.get(DISK_FILE).is_some_and(|f| f.discard_cmd);
                (files, restrict::Allow { discard_cmd, file_updates: false })
            }
            Table::Sparse(count) => {
                let files = FileTable::sparse(&ring, count, discard_supported)?;
                (files, restrict::Allow { discard_cmd: discard_supported, file_updates: true })
            }
        };
        let restricted =
            restrict::confine(&ring, disabled, probe.as_ref(), allow).map_err(io("io_uring register restrictions"))?;
        let capacity = usize::try_from(slots).unwrap_or(0);
        let free = (0..slots).rev().collect();
        let slots = (0..capacity).map(|_| Slot { token: 0, file: DISK_FILE, state: None }).collect();
        Ok(UringEngine {
            files,
            ring,
            eventfd,
            slots,
            free,
            finished: VecDeque::with_capacity(capacity),
            blocking: VecDeque::with_capacity(capacity),
            blocking_ran: false,
            blocking_spent: Duration::ZERO,
            blocking_budget: BLOCKING_BUDGET,
            disabled,
            sq_pending: false,
            mode,
            batching: Batching::Whole,
            deferred: false,
            fixed: None,
            fixed_ops: 0,
            inline_ops: 0,
            fixed_vectored,
            restricted,
        })
    }

    /// Whether the ring is restricted to the engine's operations on the disk. `false` only on kernels that cannot
    /// create disabled rings (before 5.10), where the ring could reach whatever the process can.
    pub fn restricted(&self) -> bool {
        self.restricted
    }

    /// The raw ring, for tests that submit what the engine never would.
    #[cfg(test)]
    fn ring_mut(&mut self) -> &mut IoUring {
        &mut self.ring
    }

    /// Reads and writes issued from the registered buffer so far ([`IoEngine::register_buffer`]).
    pub fn fixed_ops(&self) -> u64 {
        self.fixed_ops
    }

    /// Reads and writes run inline so far: small ones on a disk in memory (writes only when they found the ring
    /// idle; module `inline`).
    pub fn inline_ops(&self) -> u64 {
        self.inline_ops
    }

    /// Nothing in flight, queued or unreported.
    fn idle(&mut self) -> bool {
        self.free.len() == self.slots.len() && self.finished.is_empty() && self.ring.submission().is_empty()
    }

    /// The submission entry for `step` on `file`, from the registered buffer if every buffer of the step lies
    /// inside it.
    fn entry(&mut self, step: Step, file: types::Fixed) -> squeue::Entry {
        let Some(region) = self.fixed.clone() else { return entry_for(step, file) };
        match fixed_entry_for(step, file, &region) {
            Some(entry) => {
                self.fixed_ops += 1;
                entry
            }
            None => entry_for(step, file),
        }
    }

    /// Submit batches as `batching` says from now on.
    pub fn set_batching(&mut self, batching: Batching) {
        self.batching = match (batching, self.file_disk(DISK_FILE)) {
            (Batching::Auto, Some(disk)) => batching.for_disk(disk),
            _ => batching,
        };
    }

    /// How this ring gets its completions.
    pub fn completion_mode(&self) -> CompletionMode {
        self.mode
    }

    /// Whether the kernel holds completion task work that only a `GETEVENTS` entry runs (no system call).
    fn task_work_waiting(&mut self) -> bool {
        self.mode != CompletionMode::Interrupting && !self.disabled && self.ring.submission().taskrun()
    }

    /// Run the completion task work the kernel holds for this ring, posting its completions to the ring.
    fn run_task_work(&mut self) {
        // SAFETY: no submission entries are passed (`to_submit` 0) and no argument pointer.
        match unsafe { self.ring.submitter().enter::<libc::sigset_t>(0, 0, ENTER_GETEVENTS, None) } {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            Err(error) => tracing::debug!(%error, "io_uring_enter(GETEVENTS) failed"),
        }
    }

    /// Defer submissions (see [`deferred`](Self::deferred)) until [`flush`](Self::flush), or stop deferring.
    fn set_deferred(&mut self, deferred: bool) {
        self.deferred = deferred;
    }

    /// Whether submissions are deferred (a shared ring's round is open).
    fn is_deferred(&self) -> bool {
        self.deferred
    }

    /// Entries queued for submission.
    fn queued(&mut self) -> usize {
        self.ring.submission().len()
    }

    /// Submit every queued entry now (deferred or not).
    fn flush(&mut self) -> Result<(), EngineError> {
        if !self.finished.is_empty() {
            self.signal()?;
        }
        self.submit_queued()
    }

    /// Whether reaping may find something (finished operations, completion entries, task work), not counting
    /// entries still queued for submission; no system call.
    fn completions_waiting(&mut self) -> bool {
        !self.finished.is_empty()
            || !self.blocking.is_empty()
            || !self.ring.completion().is_empty()
            || self.task_work_waiting()
    }

    /// Whether block-device discards go through `BLOCK_URING_CMD_DISCARD` (else the `BLKDISCARD` ioctl).
    pub fn uses_discard_command(&self) -> bool {
        self.files.get(DISK_FILE).is_some_and(|f| f.discard_cmd)
    }

    /// Register `disk` in a free slot of the file table of an [`open_ended`](Self::open_ended) ring; returns the
    /// file's index for [`enqueue_on`](Self::enqueue_on). Call it on the thread that submits, or before the
    /// first submission.
    fn add_file(&mut self, disk: Arc<Disk>) -> Result<u32, EngineError> {
        self.files.add(&self.ring, disk)
    }

    /// Take file `index` out of the table (nothing may be in flight on it; operations on it still waiting for
    /// the blocking budget are cancelled, so that none can run on a disk that takes the index next).
    fn remove_file(&mut self, index: u32) {
        for _ in 0..self.blocking.len() {
            let Some((slot, state)) = self.blocking.pop_front() else { break };
            match self.slots.get(slot as usize).map(|s| s.file) {
                Some(file) if file == index => self.finished.push_back((slot, Err(libc::ECANCELED))),
                _ => self.blocking.push_back((slot, state)),
            }
        }
        self.files.remove(&self.ring, index);
    }

    /// Apply file table changes made on another thread (see [`FileTable`]); call on the ring's thread.
    fn sync_files(&mut self) {
        self.files.sync(&self.ring);
    }

    /// The disk registered as file `index`.
    fn file_disk(&self, index: u32) -> Option<&Arc<Disk>> {
        self.files.get(index).map(|f| &f.disk)
    }

    /// Make room for `count` more operations in flight.
    fn add_slots(&mut self, count: usize) {
        let first = u32::try_from(self.slots.len()).unwrap_or(u32::MAX);
        let count = u32::try_from(count).unwrap_or(0).min(u32::MAX - first);
        self.slots.extend((0..count).map(|_| Slot { token: 0, file: DISK_FILE, state: None }));
        self.free.extend((first..first + count).rev());
        self.finished.reserve(count as usize);
        self.blocking.reserve(count as usize);
    }

    /// [`IoEngine::enqueue`] on registered file `file`.
    ///
    /// # Safety
    /// As for [`IoEngine::enqueue`].
    unsafe fn enqueue_on(&mut self, file: u32, op: IoOp<'_>, token: u64) -> Result<(), EngineError> {
        self.sync_files();
        let Some((kind, discard_cmd, in_memory, fd)) =
            self.files.get(file).map(|f| (f.disk.kind(), f.discard_cmd, f.disk.in_memory(), f.disk.file().as_raw_fd()))
        else {
            return Err(EngineError::Io { what: "io_uring enqueue", cause: std::io::ErrorKind::NotFound.into() });
        };
        let inline = in_memory && inline::runs_inline(&op, || self.idle());
        let Some(index) = self.free.pop() else {
            return Err(EngineError::Full(self.slots.len()));
        };
        if let Some(slot) = self.slots.get_mut(index as usize) {
            slot.token = token;
            slot.file = file;
        }
        match OpState::start(&op, kind, discard_cmd) {
            Ok(state) if inline => {
                self.inline_ops += 1;
                // SAFETY: the operation's buffers stay valid until it is reaped (the `enqueue` contract), which
                // is after this call.
                let result = unsafe { inline::run_to_end(fd, state) };
                self.finished.push_back((index, result));
            }
            Ok(state) => self.issue(index, state, false),
            Err(errno) => self.finished.push_back((index, Err(errno))),
        }
        Ok(())
    }

    /// Report every operation in `finished` and free its slot.
    fn report_finished(&mut self, on_complete: &mut dyn FnMut(Completion)) {
        while let Some((index, result)) = self.finished.pop_front() {
            self.complete(index, result, on_complete);
        }
    }

    fn complete(&mut self, index: u32, result: Result<u64, i32>, on_complete: &mut dyn FnMut(Completion)) {
        let Some(slot) = self.slots.get_mut(index as usize) else { return };
        slot.state = None;
        let token = slot.token;
        self.free.push(index);
        on_complete(Completion { token, result });
    }

    /// Hand every completion entry on the ring to `on_complete` (resubmitting operations that need another
    /// step); returns how many there were.
    fn reap_ring(&mut self, on_complete: &mut dyn FnMut(Completion)) -> usize {
        let mut count = 0;
        loop {
            let Some(cqe) = self.ring.completion().next() else { return count };
            count += 1;
            let index = cqe.user_data();
            let state = u32::try_from(index)
                .ok()
                .and_then(|i| self.slots.get_mut(i as usize).map(|slot| (i, slot.state.take())));
            let Some((index, Some(mut state))) = state else {
                tracing::error!(index, "io_uring completed an entry of no operation");
                continue;
            };
            let result = cqe.result();
            // SAFETY: reading the step of a range operation touches no memory; for transfers the iovecs are valid.
            if result == -libc::EOPNOTSUPP && matches!(unsafe { state.step() }, Step::DiscardCmd { .. }) {
                tracing::debug!("the kernel refuses BLOCK_URING_CMD_DISCARD; using the BLKDISCARD ioctl");
                let file = self.slots.get(index as usize).map_or(DISK_FILE, |slot| slot.file);
                if let Some(f) = self.files.get_mut(file) {
                    f.discard_cmd = false;
                }
            }
            match state.advance(i64::from(result)) {
                Progress::Done(result) => self.complete(index, result, on_complete),
                Progress::Continue { retry } => self.issue(index, state, retry),
            }
            self.report_finished(on_complete);
        }
    }
}

impl IoEngine for UringEngine {
    unsafe fn enqueue(&mut self, op: IoOp<'_>, token: u64) -> Result<(), EngineError> {
        // SAFETY: the caller's contract is this function's.
        unsafe { self.enqueue_on(DISK_FILE, op, token) }
    }

    fn submit(&mut self) -> Result<(), EngineError> {
        // Within a shared ring's round, operations that finished without the ring are signalled when the round
        // ends, and only if no lane reaped them by then (`flush`): the thread does not sleep before that.
        if !self.finished.is_empty() && !self.deferred {
            self.signal()?;
        }
        self.flush_submissions()
    }

    fn reap(&mut self, on_complete: &mut dyn FnMut(Completion)) {
        // Clear the eventfd first: a completion posted after this read signals it again.
        let _ = self.eventfd.read();
        self.reap_ready(on_complete);
    }

    fn has_completions(&mut self) -> bool {
        self.sq_pending || self.completions_waiting()
    }

    fn clear_completion_signal(&mut self) {
        let _ = self.eventfd.read();
    }

    fn reap_ready(&mut self, on_complete: &mut dyn FnMut(Completion)) {
        self.resume_blocking();
        self.report_finished(on_complete);
        // Enough rounds for every operation in flight: leftovers would wake no sleeper.
        for _ in 0..self.slots.len() / TASKRUN_ROUND + 2 {
            let ran = self.task_work_waiting();
            if ran {
                self.run_task_work();
            }
            // A round that posted fewer than the kernel's cut-off ran everything that was waiting; work that
            // arrived since signals the eventfd anew (and sets the flag), so stop here and let the caller answer
            // what it has, rather than chase a busy device's completions one by one.
            if !(ran && self.reap_ring(on_complete) >= TASKRUN_ROUND && self.task_work_waiting()) {
                self.reap_ring(on_complete);
                break;
            }
        }
        if let Err(error) = self.flush_submissions() {
            // The entries stay queued; the next kick tries again and reports the error to the transport.
            tracing::warn!(%error, "io_uring resubmission failed");
        }
    }

    fn completion_fd(&self) -> RawFd {
        self.eventfd.as_raw_fd()
    }

    fn capacity(&self) -> usize {
        self.slots.len()
    }

    fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    fn buffer_alignment(&self) -> usize {
        self.file_disk(DISK_FILE).map_or(1, |disk| disk.buffer_alignment())
    }

    fn name(&self) -> &'static str {
        "io_uring"
    }

    fn ring_restricted(&self) -> Option<bool> {
        Some(self.restricted)
    }

    unsafe fn register_buffer(&mut self, base: *mut u8, len: usize) -> bool {
        if self.fixed.is_some() || !self.fixed_vectored || len == 0 {
            return false;
        }
        if self.restricted && !self.disabled {
            // The restrictions, in force since the first submit, refuse every register operation.
            tracing::warn!(len, "io_uring: a buffer offered after the first submit cannot be registered");
            return false;
        }
        let iovec = libc::iovec { iov_base: base.cast(), iov_len: len };
        // SAFETY: the caller keeps the memory mapped for the engine's life; the kernel pins its pages.
        match unsafe { self.ring.submitter().register_buffers(&[iovec]) } {
            Ok(()) => {
                self.fixed = Some(base as usize..(base as usize).saturating_add(len));
                true
            }
            Err(error) => {
                // E.g. RLIMIT_MEMLOCK for an unprivileged user: the plain vectored path serves as before.
                tracing::debug!(%error, len, "io_uring: buffer registration refused; not using fixed buffers");
                false
            }
        }
    }
}

#[cfg(test)]
#[path = "uring_tests.rs"]
mod tests;
