// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The synchronous engine: every operation runs to completion with blocking system calls at enqueue time. The
//! reference the io_uring engine is tested against, and the fallback where io_uring is unavailable.
//!
//! It runs the very same step logic as the io_uring engine ([`OpState`]), so short transfers, fallbacks and
//! `EAGAIN` retries behave alike; the one difference is that a block-device discard always uses the `BLKDISCARD`
//! ioctl (the io_uring engine prefers the asynchronous `BLOCK_URING_CMD_DISCARD` and falls back to the ioctl).

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::op::{run_blocking, OpState, Progress};
use super::{Completion, EngineError, IoEngine, IoOp};
use crate::disk::Disk;

/// Does each operation as it is enqueued; completions wait in a queue until reaped.
#[derive(Debug)]
pub struct SyncEngine {
    disk: Arc<Disk>,
    done: VecDeque<Completion>,
    capacity: usize,
    eventfd: EventFd,
}

impl SyncEngine {
    /// An engine for `disk` holding up to `depth` unreaped completions.
    pub fn new(disk: Arc<Disk>, depth: u32) -> Result<Self, EngineError> {
        let eventfd = EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC)
            .map_err(|source| EngineError::Io { what: "eventfd", cause: source })?;
        let capacity = usize::try_from(depth.max(1)).unwrap_or(1);
        Ok(SyncEngine { disk, done: VecDeque::with_capacity(capacity), capacity, eventfd })
    }

    /// Run `op` to completion.
    ///
    /// # Safety
    /// The buffers `op` names must be valid for the access for the duration of the call.
    unsafe fn run(&self, op: &IoOp<'_>) -> Result<u64, i32> {
        let fd = self.disk.file().as_raw_fd();
        let mut state = OpState::start(op, self.disk.kind(), false)?;
        loop {
            // SAFETY: the iovec array and the buffers are valid during this call (this function's contract).
            let result = unsafe { run_blocking(fd, state.step()) };
            if let Progress::Done(result) = state.advance(result) {
                return result;
            }
        }
    }
}

impl IoEngine for SyncEngine {
    unsafe fn enqueue(&mut self, op: IoOp<'_>, token: u64) -> Result<(), EngineError> {
        if self.done.len() >= self.capacity {
            return Err(EngineError::Full(self.capacity));
        }
        // SAFETY: the caller guarantees the buffers stay valid until the completion is reaped, which is later.
        let result = unsafe { self.run(&op) };
        self.done.push_back(Completion { token, result });
        Ok(())
    }

    fn submit(&mut self) -> Result<(), EngineError> {
        if !self.done.is_empty() {
            self.eventfd.write(1).map_err(|source| EngineError::Io { what: "eventfd write", cause: source })?;
        }
        Ok(())
    }

    fn reap(&mut self, on_complete: &mut dyn FnMut(Completion)) {
        // Nothing to do if the counter is zero (EAGAIN on the non-blocking eventfd).
        let _ = self.eventfd.read();
        while let Some(c) = self.done.pop_front() {
            on_complete(c);
        }
    }

    fn has_completions(&mut self) -> bool {
        !self.done.is_empty()
    }

    fn completion_fd(&self) -> RawFd {
        self.eventfd.as_raw_fd()
    }

    fn capacity(&self) -> usize {
        self.capacity
    }

    fn in_flight(&self) -> usize {
        self.done.len()
    }

    fn buffer_alignment(&self) -> usize {
        self.disk.buffer_alignment()
    }

    fn name(&self) -> &'static str {
        "sync"
    }
}
