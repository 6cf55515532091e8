// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Building an engine's ring, its table of registered files, and the submission entry of each step.

use std::ops::Range;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use io_uring::{opcode, squeue, types, IoUring};

use super::CompletionMode;
use crate::disk::{Disk, DiskKind};
use crate::engine::op::Step;
use crate::engine::EngineError;

/// `BLOCK_URING_CMD_DISCARD` from `<linux/blkdev.h>`: `_IO(0x12, 0)`.
const BLOCK_URING_CMD_DISCARD: u32 = 0x1200;

/// A disk in the ring's registered file table.
pub(super) struct RingFile {
    pub disk: Arc<Disk>,
    /// Block-device discards go through `BLOCK_URING_CMD_DISCARD` (else the `BLKDISCARD` ioctl).
    pub discard_cmd: bool,
}

/// The ring's registered files, by fixed-file index: one disk for an engine of its own, or a sparse table whose
/// slots lanes fill and empty as they come and go (a thread's ring shared by the queues of several disks).
///
/// Once a `SINGLE_ISSUER` ring is enabled, the kernel takes registrations only from its thread (`EEXIST` from any
/// other). A file added or removed on another thread is therefore marked, and [`sync`](Self::sync) puts the
/// kernel's table right on the ring's thread, before that thread's next operation on the table's files.
pub(super) struct FileTable {
    entries: Vec<Entry>,
    /// The kernel offers `BLOCK_URING_CMD_DISCARD` (and the ring allows it).
    discard_cmd: bool,
    /// Some entry differs from the kernel's table.
    pending: bool,
}

struct Entry {
    file: Option<RingFile>,
    /// The kernel's table holds the file in this slot.
    in_kernel: bool,
}

impl FileTable {
    /// Register `disk` as the ring's only file (index 0).
    pub fn single(ring: &IoUring, disk: Arc<Disk>, discard_supported: bool) -> Result<Self, EngineError> {
        ring.submitter()
            .register_files(&[disk.file().as_raw_fd()])
            .map_err(|cause| EngineError::Io { what: "io_uring register files", cause })?;
        let discard_cmd = discard_supported && matches!(disk.kind(), DiskKind::BlockDevice { .. });
        let entry = Entry { file: Some(RingFile { disk, discard_cmd }), in_kernel: true };
        Ok(FileTable { entries: vec![entry], discard_cmd: discard_supported, pending: false })
    }

    /// Register a table of `slots` empty files.
    pub fn sparse(ring: &IoUring, slots: u32, discard_supported: bool) -> Result<Self, EngineError> {
        let submitter = ring.submitter();
        // Sparse registration needs Linux 5.19; before that a table of -1 descriptors does the same.
        if submitter.register_files_sparse(slots).is_err() {
            let empty = vec![-1; slots as usize];
            submitter
                .register_files(&empty)
                .map_err(|cause| EngineError::Io { what: "io_uring register a sparse file table", cause })?;
        }
        let entries = (0..slots).map(|_| Entry { file: None, in_kernel: false }).collect();
        Ok(FileTable { entries, discard_cmd: discard_supported, pending: false })
    }

    pub fn get(&self, index: u32) -> Option<&RingFile> {
        self.entries.get(index as usize).and_then(|e| e.file.as_ref())
    }

    pub fn get_mut(&mut self, index: u32) -> Option<&mut RingFile> {
        self.entries.get_mut(index as usize).and_then(|e| e.file.as_mut())
    }

    /// Put `disk` in a free slot of the table (in the kernel's too, or on the ring's thread's next
    /// [`sync`](Self::sync)); returns its index.
    pub fn add(&mut self, ring: &IoUring, disk: Arc<Disk>) -> Result<u32, EngineError> {
        let full = EngineError::Full(self.entries.len());
        let index = self.entries.iter().position(|e| e.file.is_none() && !e.in_kernel).ok_or(full)?;
        let fixed = u32::try_from(index).map_err(|_| EngineError::Full(self.entries.len()))?;
        let fd = disk.file().as_raw_fd();
        let discard_cmd = self.discard_cmd && matches!(disk.kind(), DiskKind::BlockDevice { .. });
        match update(ring, fixed, fd) {
            Ok(()) => self.entries[index].in_kernel = true,
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => self.pending = true,
            Err(cause) => return Err(EngineError::Io { what: "io_uring files update", cause }),
        }
        self.entries[index].file = Some(RingFile { disk, discard_cmd });
        Ok(fixed)
    }

    /// Empty slot `index` (the kernel drops its reference to the file once no operation on it is left).
    pub fn remove(&mut self, ring: &IoUring, index: u32) {
        let Some(entry) = self.entries.get_mut(index as usize) else { return };
        entry.file = None;
        if entry.in_kernel {
            match update(ring, index, -1) {
                Ok(()) => entry.in_kernel = false,
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => self.pending = true,
                Err(error) => {
                    tracing::error!(%error, index, "io_uring: cannot take a file out of the table; retrying later");
                    self.pending = true;
                }
            }
        }
    }

    /// Make the kernel's table match this one (a no-op unless a change from another thread is pending). Call on
    /// the ring's thread.
    pub fn sync(&mut self, ring: &IoUring) {
        if !self.pending {
            return;
        }
        self.pending = false;
        for (index, entry) in (0u32..).zip(self.entries.iter_mut()) {
            let want = entry.file.as_ref().map(|f| f.disk.file().as_raw_fd());
            if want.is_some() == entry.in_kernel {
                continue;
            }
            match update(ring, index, want.unwrap_or(-1)) {
                Ok(()) => entry.in_kernel = want.is_some(),
                Err(error) => {
                    tracing::error!(%error, index, "io_uring: cannot update the file table");
                    self.pending = true;
                }
            }
        }
    }
}

fn update(ring: &IoUring, index: u32, fd: RawFd) -> std::io::Result<()> {
    match ring.submitter().register_files_update(index, &[fd])? {
        1 => Ok(()),
        _ => Err(std::io::ErrorKind::Other.into()),
    }
}

/// Create a ring of `entries` submission entries and `cq_entries` completion entries (room for every operation
/// that can be in flight, so that it never overflows), disabled where the kernel allows it (so that it can be
/// restricted), with the best completion mode from `preferred` down that the kernel accepts.
pub(super) fn build_ring(
    entries: u32,
    cq_entries: u32,
    preferred: CompletionMode,
) -> std::io::Result<(IoUring, bool, CompletionMode)> {
    let modes = [CompletionMode::Deferred, CompletionMode::Cooperative, CompletionMode::Portable];
    let best = capped_mode(preferred);
    for mode in modes.into_iter().skip_while(|&m| m != best) {
        let mut builder = IoUring::builder();
        builder.setup_cqsize(cq_entries).setup_submit_all().setup_r_disabled();
        if mode != CompletionMode::Portable {
            builder.setup_single_issuer();
        }
        builder.setup_taskrun_flag();
        if mode == CompletionMode::Deferred {
            builder.setup_defer_taskrun();
        } else {
            builder.setup_coop_taskrun();
        }
        match builder.build(entries) {
            Ok(ring) => return Ok((ring, true, mode)),
            Err(error) => tracing::debug!(?mode, %error, "io_uring setup refused; trying the next mode"),
        }
    }
    // Kernels before 5.19 lack these flags; from 5.10 on, the ring can still be created disabled.
    match IoUring::builder().setup_cqsize(cq_entries).setup_r_disabled().build(entries) {
        Ok(ring) => return Ok((ring, true, CompletionMode::Interrupting)),
        Err(error) => tracing::debug!(%error, "io_uring refuses disabled rings; trying a plain one"),
    }
    let ring = IoUring::builder().setup_cqsize(cq_entries).build(entries)?;
    Ok((ring, false, CompletionMode::Interrupting))
}

/// The environment variable that caps the completion mode a ring may use: `cooperative` or `interrupting`, the
/// modes kernels before 6.1 and before 5.19 give, so that tests on a newer kernel cover them too.
pub const COMPLETION_MODE_CAP: &str = "BLKBACKD_IO_URING_COMPLETION";

/// `preferred`, or the mode [`COMPLETION_MODE_CAP`] caps it at if that is a lesser one.
fn capped_mode(preferred: CompletionMode) -> CompletionMode {
    let rank = |mode| match mode {
        CompletionMode::Deferred => 0,
        CompletionMode::Cooperative | CompletionMode::Portable => 1,
        CompletionMode::Interrupting => 2,
    };
    let cap = match std::env::var(COMPLETION_MODE_CAP).as_deref() {
        Ok("cooperative") => CompletionMode::Cooperative,
        Ok("interrupting") => CompletionMode::Interrupting,
        _ => return preferred,
    };
    if rank(cap) > rank(preferred) {
        cap
    } else {
        preferred
    }
}

/// The submission entry for one step on registered file `file`.
pub(super) fn entry_for(step: Step, file: types::Fixed) -> squeue::Entry {
    match step {
        Step::Vectored { write: false, iovecs, count, offset } => {
            opcode::Readv::new(file, iovecs, count).offset(offset).build()
        }
        Step::Vectored { write: true, iovecs, count, offset } => {
            opcode::Writev::new(file, iovecs, count).offset(offset).build()
        }
        Step::Single { write: false, buf, len, offset } => opcode::Read::new(file, buf, len).offset(offset).build(),
        Step::Single { write: true, buf, len, offset } => {
            opcode::Write::new(file, buf.cast_const(), len).offset(offset).build()
        }
        Step::Fsync => opcode::Fsync::new(file).flags(types::FsyncFlags::DATASYNC).build(),
        Step::Fallocate { mode, offset, len } => opcode::Fallocate::new(file, len).offset(offset).mode(mode).build(),
        Step::DiscardCmd { offset, len } => {
            // The command's `addr3` (the first 8 bytes of the command area) is the length, `addr` the offset.
            let mut cmd = [0u8; 16];
            cmd[..8].copy_from_slice(&len.to_ne_bytes());
            opcode::UringCmd16::new(file, BLOCK_URING_CMD_DISCARD).addr(Some(offset)).cmd(cmd).build()
        }
        // Ioctls never reach the ring (`issue` runs them); an invalid opcode would fail the entry cleanly.
        Step::Ioctl { .. } => opcode::Nop::new().build(),
    }
}

/// The entry for `step` on `file` from the registered buffer (index 0) covering `region`, if every buffer of the
/// step lies inside it.
pub(super) fn fixed_entry_for(step: Step, file: types::Fixed, region: &Range<usize>) -> Option<squeue::Entry> {
    let inside = |base: *const u8, len: usize| {
        let start = base as usize;
        start >= region.start && start.checked_add(len).is_some_and(|end| end <= region.end)
    };
    match step {
        Step::Vectored { write, iovecs, count, offset } => {
            // SAFETY: the operation's iovec array stays valid until it is reaped (the `enqueue` contract).
            let list = unsafe { std::slice::from_raw_parts(iovecs, count as usize) };
            if !list.iter().all(|v| inside(v.iov_base.cast_const().cast(), v.iov_len)) {
                return None;
            }
            Some(if write {
                opcode::WritevFixed::new(file, iovecs, count, 0).offset(offset).build()
            } else {
                opcode::ReadvFixed::new(file, iovecs, count, 0).offset(offset).build()
            })
        }
        Step::Single { write, buf, len, offset } if inside(buf.cast_const(), len as usize) => Some(if write {
            opcode::WriteFixed::new(file, buf.cast_const(), len, 0).offset(offset).build()
        } else {
            opcode::ReadFixed::new(file, buf, len, 0).offset(offset).build()
        }),
        _ => None,
    }
}
