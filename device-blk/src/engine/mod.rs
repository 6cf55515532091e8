// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! I/O engines: where validated requests meet the disk.
//!
//! An engine takes operations on host buffers (`iovec`s the [`BlockQueue`](crate::BlockQueue) resolved from guest
//! memory), submits them in batches, and reports completions by token. Its completion eventfd becomes readable
//! when completions are waiting, so the queue's event loop can poll it next to the guest's kick.
//!
//! # Semantics (identical in both engines)
//! Both engines carry out an [`IoOp`] by the same step logic (module `op`), so they differ only in *when* the
//! system calls happen, never in what a request does or how it ends:
//! - Read/write: `preadv`/`pwritev` (io_uring `READV`/`WRITEV` on a registered file). A short transfer is continued
//!   for the remainder; a transfer of 0 bytes (end of file, e.g. the image shrank) completes with the bytes done so
//!   far, which the queue reports as [`RequestError::ShortTransfer`](crate::RequestError::ShortTransfer). An error
//!   after partial progress fails the operation with that errno. More than [`IOV_MAX`] iovecs fail with `EINVAL`.
//! - Flush: `fdatasync`.
//! - Discard: on a file, `fallocate(PUNCH_HOLE | KEEP_SIZE)`; on a block device `BLKDISCARD`
//!   (io_uring: `BLOCK_URING_CMD_DISCARD`, falling back to the ioctl where the kernel lacks it), secure discard
//!   `BLKSECDISCARD`.
//! - Write-zeroes with unmap: `fallocate(PUNCH_HOLE | KEEP_SIZE)` (on a block device the kernel zeroes with
//!   unmap; where the device cannot, it falls back to write-zeroes without unmap).
//! - Write-zeroes without unmap: `fallocate(ZERO_RANGE | KEEP_SIZE)` (block devices: `BLKZEROOUT` semantics);
//!   where a file system refuses it (tmpfs), punch a hole and allocate the range again.
//! - A step failing with `EAGAIN` is retried up to 4 times (io_uring: forced into the kernel's blocking worker
//!   with `IOSQE_ASYNC`), `EINTR` always; then the errno is the result.
//! - Completions of flush, discard and write-zeroes carry `Ok(0)`; reads and writes the bytes transferred.

use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;

use crate::disk::Disk;

#[cfg(any(test, feature = "test-utils"))]
pub mod fault;
mod op;
mod sync;
mod uring;

pub use op::IOV_MAX;
pub use sync::SyncEngine;
pub use uring::{CompletionMode, SharedUring, UringEngine, UringLane, COMPLETION_MODE_CAP};

/// One operation on the disk. Byte offsets and lengths were validated against the disk.
#[derive(Debug)]
pub enum IoOp<'a> {
    /// Read into the buffers.
    Read {
        /// Byte offset on the disk.
        offset: u64,
        /// Host buffers, in order.
        iovecs: &'a [libc::iovec],
    },
    /// Write from the buffers.
    Write {
        /// Byte offset on the disk.
        offset: u64,
        /// Host buffers, in order.
        iovecs: &'a [libc::iovec],
    },
    /// Make completed writes durable (`fdatasync`).
    Flush,
    /// Discard a byte range.
    Discard {
        /// Byte offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
        /// Secure erase (block devices: BLKSECDISCARD).
        secure: bool,
    },
    /// Zero a byte range; `unmap` allows deallocation.
    WriteZeroes {
        /// Byte offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
        /// The range may be deallocated.
        unmap: bool,
    },
}

/// A finished operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// The token given to [`IoEngine::enqueue`].
    pub token: u64,
    /// Bytes transferred, or the errno.
    pub result: Result<u64, i32>,
}

/// Engine failures (not request failures: those come back in [`Completion::result`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// No room for another operation until completions are reaped.
    #[error("the engine is full ({0} operations in flight)")]
    Full(usize),
    /// Setting up or submitting failed.
    #[error("{what}: {cause}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Cause.
        cause: io::Error,
    },
}

/// Which engine to build.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EngineKind {
    /// io_uring if the kernel allows it, else synchronous.
    #[default]
    Auto,
    /// io_uring only.
    IoUring,
    /// Synchronous `preadv`/`pwritev` (the reference).
    Sync,
}

/// Turns each queue's freshly built engine into the one it uses: a seam for wrappers such as
/// `fault::FaultPlan::wrapper` (fault injection in tests) or instrumentation. Transports apply it on the
/// queue's own thread, right after building the engine.
#[derive(Clone)]
pub struct EngineWrapper(Arc<WrapFn>);

/// What an [`EngineWrapper`] calls.
type WrapFn = dyn Fn(Box<dyn IoEngine>) -> Box<dyn IoEngine> + Send + Sync;

impl EngineWrapper {
    /// Wrap engines with `wrap`.
    pub fn new(wrap: impl Fn(Box<dyn IoEngine>) -> Box<dyn IoEngine> + Send + Sync + 'static) -> Self {
        EngineWrapper(Arc::new(wrap))
    }

    /// Apply the wrapper to `engine`.
    pub fn wrap(&self, engine: Box<dyn IoEngine>) -> Box<dyn IoEngine> {
        (self.0)(engine)
    }
}

impl std::fmt::Debug for EngineWrapper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EngineWrapper")
    }
}

/// How a batch of operations is handed to the kernel (io_uring engine; the synchronous engine runs each at
/// once anyway).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Batching {
    /// Everything queued since the last submit in one `io_uring_enter`. With three entries or more, io_uring
    /// plugs the block layer for the batch: the requests wait until the whole batch is issued and adjacent ones
    /// are merged into bigger requests.
    #[default]
    Whole,
    /// At most two entries per `io_uring_enter`, below io_uring's plugging threshold: each request reaches the
    /// device as soon as it is issued, with the boundaries the guest gave it (as QEMU's backends do). More system
    /// calls for large batches; on the virtual disk measured in `docs/performance.md` it gave higher IOPS for 4 KiB
    /// random reads at QD32 and for 128 KiB sequential reads (which plugging merged into 512 KiB requests).
    Unplugged,
    /// [`Unplugged`](Batching::Unplugged) where requests reach a block layer (a block device, or a file on a file
    /// system over one), [`Whole`](Batching::Whole) for a file on tmpfs (in memory): there is no block layer
    /// to plug, what the ring carries there goes to io_uring's worker threads (the file cannot be read or written
    /// without blocking; small reads do not reach the ring at all, see [`Disk::in_memory`]), and one system call
    /// hands the batch over at once (`docs/performance.md`, tmpfs rows: more IOPS for less CPU).
    Auto,
}

impl Batching {
    /// What this batching means for `disk` ([`Auto`](Batching::Auto) resolved; the others as they are).
    pub fn for_disk(self, disk: &Disk) -> Batching {
        match self {
            Batching::Auto if disk.in_memory() => Batching::Whole,
            Batching::Auto => Batching::Unplugged,
            other => other,
        }
    }
}

impl EngineKind {
    /// Build an engine of this kind for `disk` with room for `depth` operations in flight.
    pub fn build(self, disk: Arc<Disk>, depth: u32) -> Result<Box<dyn IoEngine>, EngineError> {
        self.build_with(disk, depth, Batching::default())
    }

    /// [`build`](EngineKind::build) with the submission `batching` given.
    pub fn build_with(self, disk: Arc<Disk>, depth: u32, batching: Batching) -> Result<Box<dyn IoEngine>, EngineError> {
        let uring = |disk| {
            UringEngine::new(disk, depth).map(|mut engine| {
                engine.set_batching(batching);
                engine
            })
        };
        match self {
            EngineKind::Sync => Ok(Box::new(SyncEngine::new(disk, depth)?)),
            EngineKind::IoUring => Ok(Box::new(uring(disk)?)),
            EngineKind::Auto => match uring(disk.clone()) {
                Ok(engine) => Ok(Box::new(engine)),
                Err(e) => {
                    tracing::warn!(error = %e, "io_uring unavailable, falling back to synchronous I/O");
                    Ok(Box::new(SyncEngine::new(disk, depth)?))
                }
            },
        }
    }
}

/// An I/O engine: one per queue, never shared between threads.
pub trait IoEngine: Send {
    /// Queue `op`; it is handed to the kernel by the next [`submit`](IoEngine::submit).
    ///
    /// Fails with [`EngineError::Full`] when `capacity()` operations are in flight.
    ///
    /// # Safety
    /// Every `iovec` in `op` must point to memory that stays valid, and that nothing else reads (for a read) or
    /// writes, until the completion carrying `token` has been returned by [`reap`](IoEngine::reap).
    /// The `iovec` array itself must stay valid and unchanged for as long too.
    unsafe fn enqueue(&mut self, op: IoOp<'_>, token: u64) -> Result<(), EngineError>;

    /// Submit everything queued since the last call, in one system call where the engine can.
    fn submit(&mut self) -> Result<(), EngineError>;

    /// Hand every available completion to `on_complete` and clear the completion eventfd.
    fn reap(&mut self, on_complete: &mut dyn FnMut(Completion));

    /// Like [`reap`](IoEngine::reap), but leave the completion eventfd alone: for a caller that polls, reaps
    /// without a system call where it can, and clears the eventfd with
    /// [`clear_completion_signal`](IoEngine::clear_completion_signal) only before it sleeps on it.
    fn reap_ready(&mut self, on_complete: &mut dyn FnMut(Completion)) {
        self.reap(on_complete);
    }

    /// Whether a [`reap_ready`](IoEngine::reap_ready) may find something, judged without a system call where the
    /// engine can (the io_uring engine reads its rings' shared memory). Never `false` while something is ready.
    fn has_completions(&mut self) -> bool {
        true
    }

    /// Clear the completion eventfd (the next signal is then a new completion). A poller calls it before it
    /// sleeps, then checks [`has_completions`](IoEngine::has_completions) once more.
    fn clear_completion_signal(&mut self) {}

    /// An eventfd that is readable while completions wait to be reaped.
    fn completion_fd(&self) -> RawFd;

    /// Operations that may be in flight at once.
    fn capacity(&self) -> usize;

    /// Operations enqueued and not yet reaped.
    fn in_flight(&self) -> usize;

    /// The alignment in bytes that host buffers of reads and writes need (the disk's direct-I/O memory
    /// alignment; 1 for buffered I/O). Queues refuse guest buffers that are not aligned to it.
    fn buffer_alignment(&self) -> usize;

    /// A short name for logs and stats.
    fn name(&self) -> &'static str;

    /// Whether the engine's io_uring is restricted to its own operations on the disk: `None` for an engine
    /// without a ring (every system call it makes passes seccomp), `Some(false)` for a ring that could reach
    /// anything the process can (kernels before 5.10).
    fn ring_restricted(&self) -> Option<bool> {
        None
    }

    /// Offer `len` bytes at `base` (a transport's bounce buffer pool) as a registered buffer: reads and writes
    /// whose buffers all lie inside it then skip the kernel's per-request page pinning. Returns whether the
    /// engine uses it (the default, and kernels without fixed vectored I/O, do not: nothing changes then).
    /// Offer it before the first [`submit`](IoEngine::submit): a restricted io_uring accepts no registration
    /// after that.
    ///
    /// # Safety
    /// The memory stays mapped for as long as the engine exists.
    unsafe fn register_buffer(&mut self, base: *mut u8, len: usize) -> bool {
        let _ = (base, len);
        false
    }
}
