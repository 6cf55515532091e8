//! I/O engines: where validated requests meet the disk.
//!
//! An engine takes operations on host buffers (`iovec`s the [`BlockQueue`](crate::BlockQueue) resolved from guest
//! memory), submits them in batches, and reports completions by token. Its completion eventfd becomes readable
//! when completions are waiting, so the queue's event loop can poll it next to the guest's kick.

use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;

use crate::disk::{Disk, DiskKind};

mod sync;
mod uring;

pub use sync::SyncEngine;
pub use uring::UringEngine;

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
pub enum EngineError {
    /// No room for another operation until completions are reaped.
    #[error("the engine is full ({0} operations in flight)")]
    Full(usize),
    /// Setting up or submitting failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Cause.
        source: io::Error,
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

impl EngineKind {
    /// Build an engine of this kind for `disk` with room for `depth` operations in flight.
    pub fn build(self, disk: Arc<Disk>, depth: u32) -> Result<Box<dyn IoEngine>, EngineError> {
        match self {
            EngineKind::Sync => Ok(Box::new(SyncEngine::new(disk, depth)?)),
            EngineKind::IoUring => Ok(Box::new(UringEngine::new(disk, depth)?)),
            EngineKind::Auto => match UringEngine::new(disk.clone(), depth) {
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

    /// An eventfd that is readable while completions wait to be reaped.
    fn completion_fd(&self) -> RawFd;

    /// Operations that may be in flight at once.
    fn capacity(&self) -> usize;

    /// Operations enqueued and not yet reaped.
    fn in_flight(&self) -> usize;

    /// A short name for logs and stats.
    fn name(&self) -> &'static str;
}

/// Run a discard or write-zeroes synchronously on `disk`; the engines share this for operations the kernel
/// offers no asynchronous form of (BLKDISCARD/BLKZEROOUT) and for the sync engine.
pub(crate) fn blocking_range_op(disk: &Disk, op: &IoOp<'_>) -> Result<u64, i32> {
    use std::os::fd::AsRawFd;
    let fd = disk.file().as_raw_fd();
    let (offset, len) = match *op {
        IoOp::Discard { offset, len, .. } | IoOp::WriteZeroes { offset, len, .. } => (offset, len),
        _ => return Err(libc::EINVAL),
    };
    let rc = match (disk.kind(), op) {
        (DiskKind::BlockDevice { .. }, IoOp::Discard { secure, .. }) => {
            let range = [offset, len];
            let request = if *secure { crate::disk::BLKSECDISCARD } else { crate::disk::BLKDISCARD };
            // SAFETY: BLKDISCARD/BLKSECDISCARD read a u64[2] through the pointer.
            unsafe { libc::ioctl(fd, request, range.as_ptr()) }
        }
        (DiskKind::BlockDevice { .. }, _) => {
            let range = [offset, len];
            // SAFETY: BLKZEROOUT reads a u64[2] through the pointer.
            unsafe { libc::ioctl(fd, crate::disk::BLKZEROOUT, range.as_ptr()) }
        }
        (DiskKind::File, _) => {
            let mode = file_range_mode(op);
            let (Ok(off), Ok(l)) = (libc::off64_t::try_from(offset), libc::off64_t::try_from(len)) else {
                return Err(libc::EINVAL);
            };
            // SAFETY: fallocate on a valid descriptor with plain integer arguments.
            unsafe { libc::fallocate64(fd, mode, off, l) }
        }
    };
    if rc < 0 {
        Err(io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO))
    } else {
        Ok(len)
    }
}

/// The `fallocate` mode for a discard or write-zeroes on a regular file.
pub(crate) fn file_range_mode(op: &IoOp<'_>) -> libc::c_int {
    match op {
        // A punched hole reads back as zeroes, so it serves discard and unmapping write-zeroes alike.
        IoOp::Discard { .. } | IoOp::WriteZeroes { unmap: true, .. } => {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        }
        _ => libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
    }
}
