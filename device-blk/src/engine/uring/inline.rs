// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Operations run inline: a small read or write of a disk in memory (a file on tmpfs) that finds the ring idle
//! runs at once on the calling thread, with `preadv`/`pwritev`, instead of going through the ring.
//!
//! tmpfs has no asynchronous path: io_uring cannot read or write it without blocking, so it hands every such
//! operation to one of its worker threads (io-wq), and the completion comes back to the ring's thread as task
//! work. For a request alone on the ring (a guest at queue depth 1) that is two thread hand-overs and a wake-up of
//! the ring's thread for a copy of a few KiB; run inline it is the copy. Measured with the vhost-user bench on
//! `/dev/shm` (`docs/performance.md`): the synchronous engine answered 4 KiB reads at QD1 in 14.8 µs p50 where
//! io_uring took 36.9 µs, but at QD32 io_uring's workers copy on other CPUs in parallel (writes: 1.2–1.4× the
//! IOPS). So only an operation that finds nothing else in flight or queued runs inline; once requests overlap they
//! go through the ring as before. The size bound keeps the time an inline copy holds the thread (and the other
//! queues it serves) short.

use std::os::fd::RawFd;

use super::super::op::{run_blocking, OpState, Progress};
use super::IoOp;
use crate::disk::Disk;

/// The largest read or write run inline, in bytes.
pub(super) const INLINE_MAX_BYTES: usize = 64 * 1024;

/// Whether `op` on `disk` runs inline, on a ring that is `idle` (no operation in flight or queued).
pub(super) fn runs_inline(disk: &Disk, op: &IoOp<'_>, idle: bool) -> bool {
    if !idle || !disk.in_memory() {
        return false;
    }
    let (IoOp::Read { iovecs, .. } | IoOp::Write { iovecs, .. }) = op else { return false };
    let mut bytes = 0usize;
    iovecs.iter().all(|v| {
        bytes = bytes.saturating_add(v.iov_len);
        bytes <= INLINE_MAX_BYTES
    })
}

/// Run the operation `state` stands for to its end with blocking system calls on `fd` (short transfers go on
/// from where they stopped, as on the ring).
///
/// # Safety
/// The operation's iovecs and buffers are valid for the access for the duration of the call.
pub(super) unsafe fn run_to_end(fd: RawFd, mut state: OpState) -> Result<u64, i32> {
    loop {
        // SAFETY: the buffers are valid during this call (this function's contract).
        let result = unsafe { run_blocking(fd, state.step()) };
        if let Progress::Done(result) = state.advance(result) {
            return result;
        }
    }
}
