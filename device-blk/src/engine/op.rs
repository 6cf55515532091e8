// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The one definition of what an [`IoOp`] does to the disk, shared by both engines.
//!
//! An operation is carried out as a short sequence of system-call-sized [`Step`]s: a read or write continues after
//! a short transfer, a write-zeroes falls back to other `fallocate` modes where the file system refuses the first,
//! a block-device discard falls back from `IORING_OP_URING_CMD` to the `BLKDISCARD` ioctl, and a step that failed
//! with `EAGAIN` is retried a few times. [`OpState::advance`] decides the next step from the previous result; the
//! synchronous engine executes each step at once, the io_uring engine turns it into a submission entry. Because
//! the decision logic is this one function, both engines give the same results for the same operations.
//!
//! Nothing here allocates: an `OpState` is plain data that refers to the caller's `iovec` array.

use std::io;
use std::os::fd::RawFd;

use super::IoOp;
use crate::disk::{DiskKind, BLKDISCARD, BLKSECDISCARD};

/// Most `iovec`s one vectored system call accepts (`UIO_MAXIOV`); more is `EINVAL` in both engines.
pub const IOV_MAX: usize = 1024;

/// How often a step that failed with `EAGAIN` is tried again before the operation fails.
const MAX_EAGAIN_RETRIES: u8 = 4;

/// `fallocate` mode: punch a hole (reads back zeroes, frees the blocks).
const PUNCH: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
/// `fallocate` mode: zero the range, keeping it allocated.
const ZERO_RANGE: i32 = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
/// `fallocate` mode: allocate the range (unwritten blocks read back zeroes).
const ALLOCATE: i32 = libc::FALLOC_FL_KEEP_SIZE;

/// Most bytes one discard or write-zeroes system call covers: a larger request (a Xen guest may discard its
/// whole disk in one request; blkif has no limit to advertise) is done in pieces of this size, one system call
/// each, so no single call takes longer than one of the largest requests a virtio guest may send.
pub(crate) const RANGE_CHUNK: u64 = crate::request::MAX_DISCARD_SECTORS * crate::units::SECTOR_SIZE;

/// One system call's worth of an operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// `preadv`/`pwritev` of `count` iovecs starting at `iovecs`.
    Vectored {
        /// Write (else read).
        write: bool,
        /// First iovec (inside the caller's array).
        iovecs: *const libc::iovec,
        /// Number of iovecs.
        count: u32,
        /// Byte offset on the disk.
        offset: u64,
    },
    /// `pread`/`pwrite` of one buffer: a transfer of a single iovec (the usual 4 KiB request), or the rest of one
    /// that a short transfer split (no iovec array for the kernel to copy in).
    Single {
        /// Write (else read).
        write: bool,
        /// Host buffer.
        buf: *mut u8,
        /// Length in bytes.
        len: u32,
        /// Byte offset on the disk.
        offset: u64,
    },
    /// `fdatasync`.
    Fsync,
    /// `fallocate(mode, offset, len)` (regular files; on block devices the kernel maps it to write-zeroes).
    Fallocate {
        /// `fallocate` mode.
        mode: i32,
        /// Byte offset.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// `IORING_OP_URING_CMD` `BLOCK_URING_CMD_DISCARD` (io_uring engine on block devices only).
    DiscardCmd {
        /// Byte offset.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// A block-layer range ioctl (`BLKDISCARD`, `BLKSECDISCARD`) on `[offset, len]`.
    Ioctl {
        /// The request number.
        request: libc::c_ulong,
        /// Byte offset.
        offset: u64,
        /// Length.
        len: u64,
    },
}

/// Where a discard or write-zeroes stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RangeStage {
    /// Punch a hole (discard on a file, write-zeroes with unmap).
    Punch,
    /// Zero the range in place.
    ZeroRange,
    /// `ZERO_RANGE` was refused (e.g. tmpfs): punch, then allocate again.
    PunchThenAllocate,
    /// The second half of `PunchThenAllocate`.
    Allocate,
    /// Block-device discard through io_uring.
    DiscardCmd,
    /// Block-device discard or secure discard by ioctl.
    Ioctl(libc::c_ulong),
}

/// The state of one operation between steps.
#[derive(Clone, Copy, Debug)]
pub(crate) enum OpState {
    /// A read or a write that may take several steps.
    Transfer {
        /// Write (else read).
        write: bool,
        /// The caller's iovec array.
        iovecs: *const libc::iovec,
        /// Its length.
        count: usize,
        /// Byte offset of the first byte.
        offset: u64,
        /// Bytes asked for.
        total: u64,
        /// Bytes transferred so far.
        done: u64,
        /// `EAGAIN` retries of the current step.
        retries: u8,
    },
    /// `fdatasync`.
    Flush {
        /// `EAGAIN` retries.
        retries: u8,
    },
    /// Discard or write-zeroes, in pieces of at most [`RANGE_CHUNK`] bytes.
    Range {
        /// Current stage.
        stage: RangeStage,
        /// The stage each piece starts with (a fallback found on one piece is kept for the next).
        first: RangeStage,
        /// On a block device (write-zeroes with unmap falls back to zeroing in place there).
        block_device: bool,
        /// Byte offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Bytes of the finished pieces.
        done: u64,
        /// `EAGAIN` retries of the current stage.
        retries: u8,
    },
}

/// What to do after a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Progress {
    /// Run [`OpState::step`] next; `retry` says the previous step is repeated after `EAGAIN` (the io_uring engine
    /// then forces it into the kernel's blocking worker context).
    Continue {
        /// The same step again after `EAGAIN`.
        retry: bool,
    },
    /// The operation is finished: bytes transferred (0 for flush, discard and write-zeroes) or the errno.
    Done(Result<u64, i32>),
}

impl OpState {
    /// The state of `op` before its first step on a disk of `kind`; `discard_cmd` says the engine can use
    /// `BLOCK_URING_CMD_DISCARD`. Fails with an errno for an operation no step can serve.
    pub(crate) fn start(op: &IoOp<'_>, kind: DiskKind, discard_cmd: bool) -> Result<OpState, i32> {
        let block_device = matches!(kind, DiskKind::BlockDevice { .. });
        let range =
            |stage, offset, len| OpState::Range { stage, first: stage, block_device, offset, len, done: 0, retries: 0 };
        Ok(match *op {
            IoOp::Read { offset, iovecs } | IoOp::Write { offset, iovecs } => {
                if iovecs.len() > IOV_MAX {
                    return Err(libc::EINVAL);
                }
                let total = iovecs.iter().map(|v| v.iov_len as u64).fold(0u64, u64::saturating_add);
                let write = matches!(op, IoOp::Write { .. });
                OpState::Transfer {
                    write,
                    iovecs: iovecs.as_ptr(),
                    count: iovecs.len(),
                    offset,
                    total,
                    done: 0,
                    retries: 0,
                }
            }
            IoOp::Flush => OpState::Flush { retries: 0 },
            IoOp::Discard { offset, len, secure } => {
                let stage = match (block_device, secure) {
                    (false, _) => RangeStage::Punch,
                    (true, true) => RangeStage::Ioctl(BLKSECDISCARD),
                    (true, false) if discard_cmd => RangeStage::DiscardCmd,
                    (true, false) => RangeStage::Ioctl(BLKDISCARD),
                };
                range(stage, offset, len)
            }
            IoOp::WriteZeroes { offset, len, unmap } => {
                range(if unmap { RangeStage::Punch } else { RangeStage::ZeroRange }, offset, len)
            }
        })
    }

    /// The next system call to make.
    ///
    /// # Safety
    /// For transfers, the caller's iovec array given to [`start`](OpState::start) must still be valid (the
    /// engines' `enqueue` contract guarantees it until the operation completes).
    pub(crate) unsafe fn step(&self) -> Step {
        match *self {
            OpState::Transfer { write, iovecs, count, offset, done, .. } => {
                // SAFETY: the caller keeps the array valid (this function's contract).
                let slice = unsafe { std::slice::from_raw_parts(iovecs, count) };
                let position = offset.saturating_add(done);
                match remainder(slice, done) {
                    Remainder::Whole(index) => match one_buffer(&slice[index..]) {
                        // One buffer left: without the vector (the kernel copies no iovec array in for it).
                        Some((buf, len)) => Step::Single { write, buf, len, offset: position },
                        None => Step::Vectored {
                            write,
                            iovecs: iovecs.wrapping_add(index),
                            // `count <= IOV_MAX` was checked in `start`.
                            count: u32::try_from(count - index).unwrap_or(u32::MAX),
                            offset: position,
                        },
                    },
                    Remainder::Split { buf, len } => Step::Single { write, buf, len, offset: position },
                }
            }
            OpState::Flush { .. } => Step::Fsync,
            OpState::Range { stage, offset, len, done, .. } => {
                let (offset, len) = range_piece(offset, len, done);
                match stage {
                    RangeStage::Punch | RangeStage::PunchThenAllocate => Step::Fallocate { mode: PUNCH, offset, len },
                    RangeStage::ZeroRange => Step::Fallocate { mode: ZERO_RANGE, offset, len },
                    RangeStage::Allocate => Step::Fallocate { mode: ALLOCATE, offset, len },
                    RangeStage::DiscardCmd => Step::DiscardCmd { offset, len },
                    RangeStage::Ioctl(request) => Step::Ioctl { request, offset, len },
                }
            }
        }
    }

    /// Account for the result of the last step (bytes, or a negative errno) and say what comes next.
    pub(crate) fn advance(&mut self, result: i64) -> Progress {
        let errno = (result < 0).then(|| i32::try_from(-result).unwrap_or(libc::EIO));
        if errno == Some(libc::EINTR) {
            return Progress::Continue { retry: true };
        }
        if errno == Some(libc::EAGAIN) {
            let retries = match self {
                OpState::Transfer { retries, .. } | OpState::Flush { retries } | OpState::Range { retries, .. } => {
                    retries
                }
            };
            if *retries < MAX_EAGAIN_RETRIES {
                *retries += 1;
                return Progress::Continue { retry: true };
            }
            return Progress::Done(Err(libc::EAGAIN));
        }
        match self {
            OpState::Transfer { total, done, retries, .. } => match errno {
                Some(e) => Progress::Done(Err(e)),
                // End of file: report what was transferred; the queue turns it into a short-transfer error.
                None if result == 0 => Progress::Done(Ok(*done)),
                None => {
                    *done = done.saturating_add(result.unsigned_abs()).min(*total);
                    *retries = 0;
                    if *done >= *total {
                        Progress::Done(Ok(*total))
                    } else {
                        Progress::Continue { retry: false }
                    }
                }
            },
            OpState::Flush { .. } => Progress::Done(errno.map_or(Ok(0), Err)),
            OpState::Range { stage, first, block_device, len, done, retries, .. } => {
                let next = match (*stage, errno) {
                    // The second half of the same piece.
                    (RangeStage::PunchThenAllocate, None) => {
                        *stage = RangeStage::Allocate;
                        *retries = 0;
                        return Progress::Continue { retry: false };
                    }
                    // A piece done: the next one, if any.
                    (_, None) => {
                        *done = done.saturating_add(RANGE_CHUNK).min(*len);
                        if *done >= *len {
                            return Progress::Done(Ok(0));
                        }
                        *stage = *first;
                        *retries = 0;
                        return Progress::Continue { retry: false };
                    }
                    (RangeStage::ZeroRange, Some(libc::EOPNOTSUPP)) if !*block_device => {
                        Some(RangeStage::PunchThenAllocate)
                    }
                    // A device without write-zeroes-with-unmap still zeroes (by writing zeroes if need be).
                    (RangeStage::Punch, Some(libc::EOPNOTSUPP)) if *block_device => Some(RangeStage::ZeroRange),
                    // The kernel has no io_uring discard for block devices (before 6.12): use the ioctl.
                    (RangeStage::DiscardCmd, Some(libc::EOPNOTSUPP | libc::EINVAL)) => {
                        Some(RangeStage::Ioctl(BLKDISCARD))
                    }
                    _ => None,
                };
                match next {
                    // A fallback: this piece again the other way, and every later piece too.
                    Some(next) => {
                        *stage = next;
                        *first = next;
                        *retries = 0;
                        Progress::Continue { retry: false }
                    }
                    None => Progress::Done(errno.map_or(Ok(0), Err)),
                }
            }
        }
    }
}

/// The piece of the range `(offset, len)` after `done` bytes: `(offset, len)` of at most [`RANGE_CHUNK`] bytes.
fn range_piece(offset: u64, len: u64, done: u64) -> (u64, u64) {
    (offset.saturating_add(done), len.saturating_sub(done).min(RANGE_CHUNK))
}

/// Where a transfer resumes inside the caller's iovecs.
#[derive(Debug, PartialEq, Eq)]
enum Remainder {
    /// At the start of iovec `index` (the rest of the array follows unchanged).
    Whole(usize),
    /// Inside an iovec: the rest of it.
    Split { buf: *mut u8, len: u32 },
}

/// Locate byte `done` of the transfer in `iovecs`. `done` is below the total, so it lies inside some iovec.
fn remainder(iovecs: &[libc::iovec], done: u64) -> Remainder {
    if done == 0 {
        return Remainder::Whole(0);
    }
    let mut skip = done;
    for (index, v) in iovecs.iter().enumerate() {
        let len = v.iov_len as u64;
        if skip == 0 {
            return Remainder::Whole(index);
        }
        if skip < len {
            // `skip < len`, and `len` came from a `usize`, so both conversions are lossless.
            let skip_bytes = usize::try_from(skip).unwrap_or(usize::MAX);
            let rest = u32::try_from(len - skip).unwrap_or(u32::MAX);
            return Remainder::Split { buf: v.iov_base.cast::<u8>().wrapping_add(skip_bytes), len: rest };
        }
        skip -= len;
    }
    Remainder::Whole(iovecs.len())
}

/// The buffer of `rest` if it holds exactly one whose length fits a single call's.
fn one_buffer(rest: &[libc::iovec]) -> Option<(*mut u8, u32)> {
    match rest {
        [v] => u32::try_from(v.iov_len).ok().map(|len| (v.iov_base.cast(), len)),
        _ => None,
    }
}

/// Execute one step with a blocking system call on `fd`; returns bytes or a negative errno, as a CQE would.
///
/// # Safety
/// The buffers a transfer step names must be valid for the access (the engines' `enqueue` contract).
pub(crate) unsafe fn run_blocking(fd: RawFd, step: Step) -> i64 {
    let off = |offset: u64| libc::off64_t::try_from(offset).ok();
    let rc: i64 = match step {
        Step::Vectored { write, iovecs, count, offset } => {
            let (Some(off), Ok(cnt)) = (off(offset), libc::c_int::try_from(count)) else {
                return -i64::from(libc::EINVAL);
            };
            // SAFETY: `iovecs[..count]` describe buffers valid for the access (this function's contract).
            let n = unsafe {
                if write {
                    libc::pwritev64(fd, iovecs, cnt, off)
                } else {
                    libc::preadv64(fd, iovecs, cnt, off)
                }
            };
            n as i64
        }
        Step::Single { write, buf, len, offset } => {
            let Some(off) = off(offset) else { return -i64::from(libc::EINVAL) };
            let len = len as usize;
            // SAFETY: `buf[..len]` is the tail of a buffer valid for the access (this function's contract).
            let n = unsafe {
                if write {
                    libc::pwrite64(fd, buf.cast_const().cast(), len, off)
                } else {
                    libc::pread64(fd, buf.cast(), len, off)
                }
            };
            n as i64
        }
        // SAFETY: fdatasync on a descriptor.
        Step::Fsync => i64::from(unsafe { libc::fdatasync(fd) }),
        Step::Fallocate { mode, offset, len } => {
            let (Some(o), Some(l)) = (off(offset), off(len)) else { return -i64::from(libc::EINVAL) };
            // SAFETY: fallocate with plain integer arguments.
            i64::from(unsafe { libc::fallocate64(fd, mode, o, l) })
        }
        // Only the io_uring engine issues the command; here it is the ioctl it stands for.
        Step::DiscardCmd { offset, len } => ioctl_range(fd, BLKDISCARD, offset, len),
        Step::Ioctl { request, offset, len } => ioctl_range(fd, request, offset, len),
    };
    if rc < 0 {
        -i64::from(io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO))
    } else {
        rc
    }
}

fn ioctl_range(fd: RawFd, request: libc::c_ulong, offset: u64, len: u64) -> i64 {
    let range = [offset, len];
    // SAFETY: the block-layer range ioctls read a `u64[2]` through the pointer, which points to `range`.
    i64::from(unsafe { libc::ioctl(fd, request, range.as_ptr()) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iov(buf: &mut [u8]) -> libc::iovec {
        libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() }
    }

    #[test]
    fn a_short_transfer_resumes_inside_and_between_iovecs() {
        let (mut a, mut b) = (vec![0u8; 4096], vec![0u8; 4096]);
        let iovecs = [iov(&mut a), iov(&mut b)];
        let op = IoOp::Read { offset: 8192, iovecs: &iovecs };
        let mut state = OpState::start(&op, DiskKind::File, false).expect("start");
        // SAFETY: `iovecs` outlives every call below.
        let first = unsafe { state.step() };
        assert_eq!(first, Step::Vectored { write: false, iovecs: iovecs.as_ptr(), count: 2, offset: 8192 });
        assert_eq!(state.advance(1000), Progress::Continue { retry: false });
        // SAFETY: as above.
        let split = unsafe { state.step() };
        assert_eq!(
            split,
            Step::Single { write: false, buf: a.as_mut_ptr().wrapping_add(1000), len: 3096, offset: 9192 }
        );
        assert_eq!(state.advance(3096), Progress::Continue { retry: false });
        // SAFETY: as above.
        let whole = unsafe { state.step() };
        assert_eq!(whole, Step::Single { write: false, buf: b.as_mut_ptr(), len: 4096, offset: 12288 });
        assert_eq!(state.advance(-i64::from(libc::EAGAIN)), Progress::Continue { retry: true });
        assert_eq!(state.advance(0), Progress::Done(Ok(4096)), "end of file reports what was done");
    }

    #[test]
    fn a_transfer_of_one_buffer_goes_without_the_vector() {
        let mut a = vec![0u8; 4096];
        let iovecs = [iov(&mut a)];
        let op = IoOp::Write { offset: 4096, iovecs: &iovecs };
        let mut state = OpState::start(&op, DiskKind::File, false).expect("start");
        // SAFETY: `iovecs` outlives the call.
        let step = unsafe { state.step() };
        assert_eq!(step, Step::Single { write: true, buf: a.as_mut_ptr(), len: 4096, offset: 4096 });
        assert_eq!(state.advance(4096), Progress::Done(Ok(4096)));
    }

    #[test]
    fn eagain_is_retried_a_bounded_number_of_times() {
        let mut state = OpState::start(&IoOp::Flush, DiskKind::File, false).expect("start");
        for _ in 0..MAX_EAGAIN_RETRIES {
            assert_eq!(state.advance(-i64::from(libc::EAGAIN)), Progress::Continue { retry: true });
        }
        assert_eq!(state.advance(-i64::from(libc::EAGAIN)), Progress::Done(Err(libc::EAGAIN)));
    }

    /// A range larger than [`RANGE_CHUNK`] is done a piece at a time, and a fallback found on one piece is kept for
    /// the next.
    #[test]
    fn a_large_range_goes_in_pieces() {
        // SAFETY: range steps refer to no memory.
        let step = |s: &OpState| unsafe { s.step() };
        let (gib, len) = (1u64 << 30, 5u64 << 30);
        let op = IoOp::Discard { offset: 4096, len, secure: false };
        let mut state = OpState::start(&op, DiskKind::File, false).expect("start");
        for (offset, piece) in [(4096, 2 * gib), (4096 + 2 * gib, 2 * gib)] {
            assert_eq!(step(&state), Step::Fallocate { mode: PUNCH, offset, len: piece });
            assert_eq!(state.advance(0), Progress::Continue { retry: false });
        }
        assert_eq!(step(&state), Step::Fallocate { mode: PUNCH, offset: 4096 + 4 * gib, len: gib });
        assert_eq!(state.advance(0), Progress::Done(Ok(0)));

        let op = IoOp::WriteZeroes { offset: 0, len: 3 * gib, unmap: false };
        let mut state = OpState::start(&op, DiskKind::File, false).expect("start");
        assert_eq!(step(&state), Step::Fallocate { mode: ZERO_RANGE, offset: 0, len: 2 * gib });
        assert_eq!(state.advance(-i64::from(libc::EOPNOTSUPP)), Progress::Continue { retry: false });
        for (offset, piece) in [(0, 2 * gib), (2 * gib, gib)] {
            assert_eq!(step(&state), Step::Fallocate { mode: PUNCH, offset, len: piece });
            assert_eq!(state.advance(0), Progress::Continue { retry: false });
            assert_eq!(step(&state), Step::Fallocate { mode: ALLOCATE, offset, len: piece });
            let last = offset == 2 * gib;
            let want = if last { Progress::Done(Ok(0)) } else { Progress::Continue { retry: false } };
            assert_eq!(state.advance(0), want);
        }
        // An error on a later piece fails the whole operation.
        let op = IoOp::Discard { offset: 0, len: 3 * gib, secure: false };
        let mut state = OpState::start(&op, DiskKind::File, false).expect("start");
        assert_eq!(state.advance(0), Progress::Continue { retry: false });
        assert_eq!(state.advance(-i64::from(libc::EIO)), Progress::Done(Err(libc::EIO)));
    }

    #[test]
    fn write_zeroes_falls_back_where_zero_range_is_refused() {
        let op = IoOp::WriteZeroes { offset: 0, len: 4096, unmap: false };
        let mut state = OpState::start(&op, DiskKind::File, false).expect("start");
        // SAFETY: range steps refer to no memory.
        let step = |s: &OpState| unsafe { s.step() };
        assert_eq!(step(&state), Step::Fallocate { mode: ZERO_RANGE, offset: 0, len: 4096 });
        assert_eq!(state.advance(-i64::from(libc::EOPNOTSUPP)), Progress::Continue { retry: false });
        assert_eq!(step(&state), Step::Fallocate { mode: PUNCH, offset: 0, len: 4096 });
        assert_eq!(state.advance(0), Progress::Continue { retry: false });
        assert_eq!(step(&state), Step::Fallocate { mode: ALLOCATE, offset: 0, len: 4096 });
        assert_eq!(state.advance(0), Progress::Done(Ok(0)));

        let bdev = DiskKind::BlockDevice { major: 7, minor: 0, diskseq: 1 };
        let op = IoOp::Discard { offset: 0, len: 4096, secure: false };
        let mut state = OpState::start(&op, bdev, true).expect("start");
        assert_eq!(step(&state), Step::DiscardCmd { offset: 0, len: 4096 });
        assert_eq!(state.advance(-i64::from(libc::EOPNOTSUPP)), Progress::Continue { retry: false });
        assert_eq!(step(&state), Step::Ioctl { request: BLKDISCARD, offset: 0, len: 4096 });
        assert_eq!(state.advance(-i64::from(libc::EOPNOTSUPP)), Progress::Done(Err(libc::EOPNOTSUPP)));
    }

    #[test]
    fn too_many_iovecs_are_refused_before_any_io() {
        let iovecs = vec![libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 512 }; IOV_MAX + 1];
        let op = IoOp::Write { offset: 0, iovecs: &iovecs };
        assert_eq!(OpState::start(&op, DiskKind::File, false).err(), Some(libc::EINVAL));
    }
}
