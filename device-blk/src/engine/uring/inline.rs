// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Operations run inline: a small read of a disk in memory (a file on tmpfs), or a small write that finds the ring
//! idle, runs at once on the calling thread with `preadv`/`pwritev` instead of going through the ring.
//!
//! tmpfs has no asynchronous path: io_uring cannot read or write it without blocking, so it hands every such
//! operation to one of its worker threads (io-wq), and the completion comes back to the ring's thread as task
//! work: two thread hand-overs and a wake-up of the ring's thread for a copy of a few KiB. Run inline it is the
//! copy. Measured with the vhost-user bench on `/dev/shm` (2 CPUs, `docs/performance.md`):
//! - reads: the synchronous engine beat io_uring at QD1 (14.8 against 36.9 µs p50) and at QD32 too (1.1–1.2×
//!   the IOPS with 1 and 4 queues, for less CPU). A read of tmpfs is a copy out of the page cache (a hole reads
//!   the zero page), so every small read runs inline;
//! - writes may allocate pages (and reclaim to get them), and at QD32 io-wq's parallel workers wrote more (1.2–1.4×
//!   the IOPS in two runs of three): a write runs inline only when it finds nothing else in flight or queued (a
//!   guest at queue depth 1), else it goes through the ring as before.
//!
//! The size bound keeps the time one inline copy holds the thread (and the other queues it serves) short; a round
//! takes at most a ring's worth of requests from a queue, so the time inline copies can take per round is bounded
//! too.

use std::os::fd::RawFd;

use super::super::op::{run_blocking, OpState, Progress};
use super::IoOp;

/// The largest read or write run inline, in bytes.
pub(super) const INLINE_MAX_BYTES: usize = 64 * 1024;

/// Whether `op`, on a disk in memory, runs inline; `idle` says whether the ring has no operation in flight or
/// queued (asked only for a write).
pub(super) fn runs_inline(op: &IoOp<'_>, idle: impl FnOnce() -> bool) -> bool {
    let iovecs = match op {
        IoOp::Read { iovecs, .. } => iovecs,
        IoOp::Write { iovecs, .. } if idle() => iovecs,
        _ => return false,
    };
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
