//! The synchronous engine: `preadv`/`pwritev` at enqueue time. The reference the io_uring engine is tested
//! against, and the fallback where io_uring is disabled.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{blocking_range_op, Completion, EngineError, IoEngine, IoOp};
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
        let eventfd = EventFd::new(EFD_NONBLOCK).map_err(|source| EngineError::Io { what: "eventfd", source })?;
        let capacity = usize::try_from(depth.max(1)).unwrap_or(1);
        Ok(SyncEngine { disk, done: VecDeque::with_capacity(capacity), capacity, eventfd })
    }

    fn run(&self, op: &IoOp<'_>) -> Result<u64, i32> {
        let fd = self.disk.file().as_raw_fd();
        match *op {
            IoOp::Read { offset, iovecs } | IoOp::Write { offset, iovecs } => {
                let mut done: u64 = 0;
                let want: u64 = iovecs.iter().map(|v| v.iov_len as u64).sum();
                // Loop on short transfers, advancing through the iovecs.
                let mut scratch: [libc::iovec; 16] =
                    [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; 16];
                while done < want {
                    let n = fill_remaining(iovecs, done, &mut scratch);
                    let off = libc::off64_t::try_from(offset + done).map_err(|_| libc::EINVAL)?;
                    let cnt = libc::c_int::try_from(n).map_err(|_| libc::EINVAL)?;
                    // SAFETY: `scratch[..n]` describes buffers the caller of `enqueue` guaranteed valid.
                    let rc = unsafe {
                        if matches!(op, IoOp::Read { .. }) {
                            libc::preadv64(fd, scratch.as_ptr(), cnt, off)
                        } else {
                            libc::pwritev64(fd, scratch.as_ptr(), cnt, off)
                        }
                    };
                    if rc < 0 {
                        let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO);
                        if errno == libc::EINTR {
                            continue;
                        }
                        return Err(errno);
                    }
                    if rc == 0 {
                        break; // end of file: a short transfer the caller reports
                    }
                    done += rc as u64;
                }
                Ok(done)
            }
            IoOp::Flush => {
                // SAFETY: fdatasync on a valid descriptor.
                if unsafe { libc::fdatasync(fd) } < 0 {
                    return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO));
                }
                Ok(0)
            }
            IoOp::Discard { .. } | IoOp::WriteZeroes { .. } => blocking_range_op(&self.disk, op),
        }
    }
}

/// Copy the part of `iovecs` after the first `skip` bytes into `out` (at most its length); returns the count.
fn fill_remaining(iovecs: &[libc::iovec], mut skip: u64, out: &mut [libc::iovec]) -> usize {
    let mut n = 0;
    for v in iovecs {
        let len = v.iov_len as u64;
        if skip >= len {
            skip -= len;
            continue;
        }
        if n == out.len() {
            break;
        }
        // `skip < len <= usize::MAX`, so the cast is lossless.
        let skip_bytes = skip as usize;
        out[n] = libc::iovec {
            iov_base: v.iov_base.cast::<u8>().wrapping_add(skip_bytes).cast(),
            iov_len: v.iov_len - skip_bytes,
        };
        skip = 0;
        n += 1;
    }
    n
}

impl IoEngine for SyncEngine {
    unsafe fn enqueue(&mut self, op: IoOp<'_>, token: u64) -> Result<(), EngineError> {
        if self.done.len() >= self.capacity {
            return Err(EngineError::Full(self.capacity));
        }
        let result = self.run(&op);
        self.done.push_back(Completion { token, result });
        Ok(())
    }

    fn submit(&mut self) -> Result<(), EngineError> {
        if !self.done.is_empty() {
            self.eventfd.write(1).map_err(|source| EngineError::Io { what: "eventfd write", source })?;
        }
        Ok(())
    }

    fn reap(&mut self, on_complete: &mut dyn FnMut(Completion)) {
        let _ = self.eventfd.read();
        while let Some(c) = self.done.pop_front() {
            on_complete(c);
        }
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

    fn name(&self) -> &'static str {
        "sync"
    }
}
