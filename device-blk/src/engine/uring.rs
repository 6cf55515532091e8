//! The io_uring engine: one ring per queue, the disk registered as a fixed file, every operation of a kick
//! submitted with one `io_uring_enter`, completions signalled on an eventfd registered with the ring.
//!
//! Each operation occupies a slot of a table allocated once; the slot index is the entry's `user_data` and holds
//! the operation's [`OpState`], so a short transfer, a fallback or an `EAGAIN` retry is resubmitted from the slot
//! when its completion is reaped, without allocating. Block-layer ioctls that io_uring cannot issue
//! (`BLKSECDISCARD`, and `BLKDISCARD` on kernels without `BLOCK_URING_CMD_DISCARD`) run synchronously on the
//! calling thread.
//!
//! The ring is created disabled and enabled by the first [`submit`](IoEngine::submit), so that with
//! `IORING_SETUP_SINGLE_ISSUER` the ring belongs to the thread that submits (the queue's worker), not to the thread
//! that built the engine. After that first submit the engine must stay on that thread.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use io_uring::{opcode, squeue, types, IoUring, Probe};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::op::{run_blocking, OpState, Progress, Step};
use super::{Completion, EngineError, IoEngine, IoOp};
use crate::disk::{Disk, DiskKind};

/// Index of the disk in the ring's registered file table.
const DISK_FIXED_FD: types::Fixed = types::Fixed(0);

/// `BLOCK_URING_CMD_DISCARD` from `<linux/blkdev.h>`: `_IO(0x12, 0)`.
const BLOCK_URING_CMD_DISCARD: u32 = 0x1200;

/// One operation in flight.
#[derive(Debug)]
struct Slot {
    /// The caller's token.
    token: u64,
    /// The operation, while one of its steps is on the ring.
    state: Option<OpState>,
}

/// io_uring engine over one disk.
pub struct UringEngine {
    disk: Arc<Disk>,
    ring: IoUring,
    eventfd: EventFd,
    /// Fixed table of operation slots (never resized: no allocation after construction).
    slots: Vec<Slot>,
    /// Free slot indices.
    free: Vec<u32>,
    /// Operations that finished without a completion entry (ioctls, refused operations), in order.
    finished: VecDeque<(u32, Result<u64, i32>)>,
    /// The ring was created disabled and has not been enabled yet.
    disabled: bool,
    /// The submission queue holds entries the kernel has not taken yet.
    sq_pending: bool,
    /// Use `BLOCK_URING_CMD_DISCARD` for block-device discards.
    discard_cmd: bool,
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
            .field("discard_cmd", &self.discard_cmd)
            .finish()
    }
}

impl UringEngine {
    /// A ring with `depth` submission entries (at most 4096; rounded up to a power of two by the kernel).
    pub fn new(disk: Arc<Disk>, depth: u32) -> Result<Self, EngineError> {
        let depth = depth.clamp(1, 4096);
        let io = |what| move |source| EngineError::Io { what, source };
        // The completion queue holds twice the operations that can be in flight, so it never overflows.
        let (ring, disabled) = match IoUring::builder()
            .setup_cqsize(depth.saturating_mul(2))
            .setup_single_issuer()
            .setup_coop_taskrun()
            .setup_submit_all()
            .setup_r_disabled()
            .build(depth)
        {
            Ok(ring) => (ring, true),
            // Kernels before 6.0 lack some of these flags.
            Err(_) => (
                IoUring::builder().setup_cqsize(depth.saturating_mul(2)).build(depth).map_err(io("io_uring_setup"))?,
                false,
            ),
        };
        ring.submitter().register_files(&[disk.file().as_raw_fd()]).map_err(io("io_uring register files"))?;
        let eventfd = EventFd::new(EFD_NONBLOCK).map_err(io("eventfd"))?;
        ring.submitter().register_eventfd(eventfd.as_raw_fd()).map_err(io("io_uring register eventfd"))?;
        let discard_cmd = matches!(disk.kind(), DiskKind::BlockDevice { .. }) && {
            let mut probe = Probe::new();
            ring.submitter().register_probe(&mut probe).is_ok() && probe.is_supported(opcode::UringCmd16::CODE)
        };
        let capacity = usize::try_from(depth).unwrap_or(1);
        let slots = (0..capacity).map(|_| Slot { token: 0, state: None }).collect();
        let free = (0..depth).rev().collect();
        Ok(UringEngine {
            disk,
            ring,
            eventfd,
            slots,
            free,
            finished: VecDeque::with_capacity(capacity),
            disabled,
            sq_pending: false,
            discard_cmd,
        })
    }

    /// Whether block-device discards go through `BLOCK_URING_CMD_DISCARD` (else the `BLKDISCARD` ioctl).
    pub fn uses_discard_command(&self) -> bool {
        self.discard_cmd
    }

    /// Issue the next step of the operation in slot `index`: ioctls run here until a step needs the ring, which is
    /// queued; an operation that finishes on the way is recorded in `finished`.
    fn issue(&mut self, index: u32, mut state: OpState, mut retry: bool) {
        loop {
            // SAFETY: the operation's iovecs stay valid until it is reaped (the `enqueue` contract).
            let step = unsafe { state.step() };
            if matches!(step, Step::Ioctl { .. }) {
                // SAFETY: an ioctl step names no guest memory.
                let result = unsafe { run_blocking(self.disk.file().as_raw_fd(), step) };
                match state.advance(result) {
                    Progress::Done(result) => return self.finished.push_back((index, result)),
                    Progress::Continue { retry: again } => {
                        retry = again;
                        continue;
                    }
                }
            }
            let mut entry = entry_for(step).user_data(u64::from(index));
            if retry {
                // Retry after EAGAIN from the kernel's blocking worker context, where it cannot recur for lack of
                // a non-blocking resource.
                entry = entry.flags(squeue::Flags::ASYNC);
            }
            // SAFETY: the entry names the disk (a registered file) and buffers the `enqueue` contract keeps valid
            // until this slot's operation is reaped.
            if unsafe { self.ring.submission().push(&entry) }.is_err() {
                // Cannot happen: the queue has room for every slot and each slot has at most one entry queued.
                return self.finished.push_back((index, Err(libc::EBUSY)));
            }
            if let Some(slot) = self.slots.get_mut(index as usize) {
                slot.state = Some(state);
            }
            self.sq_pending = true;
            return;
        }
    }

    /// Hand the queued entries to the kernel. What it cannot take now (EAGAIN, EBUSY) stays queued, and the
    /// completion eventfd is signalled so that the next [`reap`](IoEngine::reap) tries again.
    fn flush_submissions(&mut self) -> Result<(), EngineError> {
        if !self.sq_pending {
            return Ok(());
        }
        if self.disabled {
            self.ring
                .submitter()
                .register_enable_rings()
                .map_err(|source| EngineError::Io { what: "io_uring enable rings", source })?;
            self.disabled = false;
        }
        loop {
            match self.ring.submit() {
                Ok(_) => break,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EBUSY)) => {
                    tracing::debug!("io_uring submit deferred: {e}");
                    break;
                }
                Err(source) => return Err(EngineError::Io { what: "io_uring_enter", source }),
            }
        }
        self.sq_pending = !self.ring.submission().is_empty();
        if self.sq_pending {
            self.signal()?;
        }
        Ok(())
    }

    fn signal(&self) -> Result<(), EngineError> {
        self.eventfd.write(1).map_err(|source| EngineError::Io { what: "eventfd write", source })
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
}

/// The submission entry for one step.
fn entry_for(step: Step) -> squeue::Entry {
    match step {
        Step::Vectored { write: false, iovecs, count, offset } => {
            opcode::Readv::new(DISK_FIXED_FD, iovecs, count).offset(offset).build()
        }
        Step::Vectored { write: true, iovecs, count, offset } => {
            opcode::Writev::new(DISK_FIXED_FD, iovecs, count).offset(offset).build()
        }
        Step::Single { write: false, buf, len, offset } => {
            opcode::Read::new(DISK_FIXED_FD, buf, len).offset(offset).build()
        }
        Step::Single { write: true, buf, len, offset } => {
            opcode::Write::new(DISK_FIXED_FD, buf.cast_const(), len).offset(offset).build()
        }
        Step::Fsync => opcode::Fsync::new(DISK_FIXED_FD).flags(types::FsyncFlags::DATASYNC).build(),
        Step::Fallocate { mode, offset, len } => {
            opcode::Fallocate::new(DISK_FIXED_FD, len).offset(offset).mode(mode).build()
        }
        Step::DiscardCmd { offset, len } => {
            // The command's `addr3` (the first 8 bytes of the command area) is the length, `addr` the offset.
            let mut cmd = [0u8; 16];
            cmd[..8].copy_from_slice(&len.to_ne_bytes());
            opcode::UringCmd16::new(DISK_FIXED_FD, BLOCK_URING_CMD_DISCARD).addr(Some(offset)).cmd(cmd).build()
        }
        // Ioctls never reach the ring (`issue` runs them); an invalid opcode would fail the entry cleanly.
        Step::Ioctl { .. } => opcode::Nop::new().build(),
    }
}

impl IoEngine for UringEngine {
    unsafe fn enqueue(&mut self, op: IoOp<'_>, token: u64) -> Result<(), EngineError> {
        let Some(index) = self.free.pop() else {
            return Err(EngineError::Full(self.slots.len()));
        };
        if let Some(slot) = self.slots.get_mut(index as usize) {
            slot.token = token;
        }
        match OpState::start(&op, self.disk.kind(), self.discard_cmd) {
            Ok(state) => self.issue(index, state, false),
            Err(errno) => self.finished.push_back((index, Err(errno))),
        }
        Ok(())
    }

    fn submit(&mut self) -> Result<(), EngineError> {
        if !self.finished.is_empty() {
            self.signal()?;
        }
        self.flush_submissions()
    }

    fn reap(&mut self, on_complete: &mut dyn FnMut(Completion)) {
        // Clear the eventfd first: a completion posted after this read signals it again.
        let _ = self.eventfd.read();
        self.report_finished(on_complete);
        loop {
            let Some(cqe) = self.ring.completion().next() else { break };
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
                self.discard_cmd = false;
            }
            match state.advance(i64::from(result)) {
                Progress::Done(result) => self.complete(index, result, on_complete),
                Progress::Continue { retry } => self.issue(index, state, retry),
            }
            self.report_finished(on_complete);
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
        self.disk.buffer_alignment()
    }

    fn name(&self) -> &'static str {
        "io_uring"
    }
}
