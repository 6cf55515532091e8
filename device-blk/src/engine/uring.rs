//! The io_uring engine: one ring per queue, the disk registered as a fixed file, every operation of a kick
//! submitted with one `io_uring_enter`, completions signalled on an eventfd registered with the ring.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use io_uring::{opcode, squeue, types, IoUring};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{blocking_range_op, file_range_mode, Completion, EngineError, IoEngine, IoOp};
use crate::disk::{Disk, DiskKind};

/// Index of the disk in the ring's registered file table.
const DISK_FIXED_FD: types::Fixed = types::Fixed(0);

/// io_uring engine over one disk.
pub struct UringEngine {
    disk: Arc<Disk>,
    ring: IoUring,
    eventfd: EventFd,
    capacity: usize,
    in_flight: usize,
    /// Operations completed without the ring (block-device discard/zero-out ioctls), reaped with the rest.
    inline_done: VecDeque<Completion>,
}

impl std::fmt::Debug for UringEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringEngine").field("capacity", &self.capacity).field("in_flight", &self.in_flight).finish()
    }
}

impl UringEngine {
    /// A ring with `depth` submission entries (rounded up to a power of two by the kernel).
    pub fn new(disk: Arc<Disk>, depth: u32) -> Result<Self, EngineError> {
        let depth = depth.clamp(1, 4096);
        let io = |what| move |source| EngineError::Io { what, source };
        let ring = IoUring::builder()
            .setup_cqsize(depth.saturating_mul(2))
            .setup_single_issuer()
            .setup_coop_taskrun()
            .build(depth)
            .or_else(|_| IoUring::builder().setup_cqsize(depth.saturating_mul(2)).build(depth))
            .map_err(io("io_uring_setup"))?;
        ring.submitter().register_files(&[disk.file().as_raw_fd()]).map_err(io("io_uring register files"))?;
        let eventfd = EventFd::new(EFD_NONBLOCK).map_err(io("eventfd"))?;
        ring.submitter().register_eventfd(eventfd.as_raw_fd()).map_err(io("io_uring register eventfd"))?;
        let capacity = usize::try_from(depth).unwrap_or(1);
        Ok(UringEngine { disk, ring, eventfd, capacity, in_flight: 0, inline_done: VecDeque::with_capacity(capacity) })
    }

    fn entry(&self, op: &IoOp<'_>) -> Result<squeue::Entry, i32> {
        Ok(match *op {
            IoOp::Read { offset, iovecs } => {
                let n = u32::try_from(iovecs.len()).map_err(|_| libc::EINVAL)?;
                opcode::Readv::new(DISK_FIXED_FD, iovecs.as_ptr(), n).offset(offset).build()
            }
            IoOp::Write { offset, iovecs } => {
                let n = u32::try_from(iovecs.len()).map_err(|_| libc::EINVAL)?;
                opcode::Writev::new(DISK_FIXED_FD, iovecs.as_ptr(), n).offset(offset).build()
            }
            IoOp::Flush => opcode::Fsync::new(DISK_FIXED_FD).flags(types::FsyncFlags::DATASYNC).build(),
            IoOp::Discard { offset, len, .. } | IoOp::WriteZeroes { offset, len, .. } => {
                opcode::Fallocate::new(DISK_FIXED_FD, len).offset(offset).mode(file_range_mode(op)).build()
            }
        })
    }
}

impl IoEngine for UringEngine {
    unsafe fn enqueue(&mut self, op: IoOp<'_>, token: u64) -> Result<(), EngineError> {
        if self.in_flight >= self.capacity {
            return Err(EngineError::Full(self.capacity));
        }
        let on_block_device = matches!(self.disk.kind(), DiskKind::BlockDevice { .. });
        if on_block_device && matches!(op, IoOp::Discard { .. } | IoOp::WriteZeroes { .. }) {
            // No asynchronous BLKDISCARD/BLKZEROOUT in io_uring's portable opcodes: do it here.
            let result = blocking_range_op(&self.disk, &op);
            self.inline_done.push_back(Completion { token, result });
            self.in_flight += 1;
            return Ok(());
        }
        let entry = match self.entry(&op) {
            Ok(e) => e.user_data(token),
            Err(errno) => {
                self.inline_done.push_back(Completion { token, result: Err(errno) });
                self.in_flight += 1;
                return Ok(());
            }
        };
        // SAFETY: the caller guarantees the buffers and the iovec array stay valid until this token is reaped;
        // the entry refers to nothing else (the disk is a registered file owned by `self.disk`).
        if unsafe { self.ring.submission().push(&entry) }.is_err() {
            // The submission queue holds `capacity` entries and we never have more in flight.
            return Err(EngineError::Full(self.capacity));
        }
        self.in_flight += 1;
        Ok(())
    }

    fn submit(&mut self) -> Result<(), EngineError> {
        if !self.inline_done.is_empty() {
            self.eventfd.write(1).map_err(|source| EngineError::Io { what: "eventfd write", source })?;
        }
        loop {
            match self.ring.submit() {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) || e.raw_os_error() == Some(libc::EBUSY) => {
                    // The kernel is short of resources; what is not consumed stays queued for the next submit.
                    tracing::debug!("io_uring submit deferred: {e}");
                    return Ok(());
                }
                Err(source) => return Err(EngineError::Io { what: "io_uring_enter", source }),
            }
        }
    }

    fn reap(&mut self, on_complete: &mut dyn FnMut(Completion)) {
        // Clear the eventfd first: a completion posted after this read signals it again.
        let _ = self.eventfd.read();
        while let Some(c) = self.inline_done.pop_front() {
            self.in_flight -= 1;
            on_complete(c);
        }
        for cqe in self.ring.completion() {
            self.in_flight = self.in_flight.saturating_sub(1);
            let result = cqe.result();
            let result = if result < 0 { Err(-result) } else { Ok(u64::from(result.unsigned_abs())) };
            on_complete(Completion { token: cqe.user_data(), result });
        }
    }

    fn completion_fd(&self) -> RawFd {
        self.eventfd.as_raw_fd()
    }

    fn capacity(&self) -> usize {
        self.capacity
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn name(&self) -> &'static str {
        "io_uring"
    }
}
