// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Confinement of an engine's ring with `IORING_REGISTER_RESTRICTIONS`.
//!
//! Work handed to io_uring never passes through seccomp: without an allowlist, a queue thread taken over by a
//! hostile guest could open files, create sockets or connect through its ring even where the daemon's filter
//! forbids the matching system calls. The allowlist installed here, while the ring is still disabled, leaves the
//! ring able to do exactly what the engine asks of it:
//!
//! - submission opcodes: the reads and writes the engine builds (`READ`, `WRITE`, `READV`, `WRITEV`, the
//!   `*_FIXED` forms where the kernel has fixed vectored I/O), `FSYNC`, `FALLOCATE`, and `URING_CMD` only for a
//!   block device whose discards go through `BLOCK_URING_CMD_DISCARD`. The `NOP` that stands for an ioctl step
//!   never reaches the ring and is left out;
//! - submission flags: `IOSQE_FIXED_FILE` is *required*, so every entry names a slot of the registered file
//!   table (which holds the disk alone) and no other descriptor of the process; `IOSQE_ASYNC` (the `EAGAIN`
//!   retry) is the only other flag allowed;
//! - register operations: none for an engine of its own. The kernel enforces the list from
//!   `IORING_REGISTER_ENABLE_RINGS` on, so what the engine registers before its first submit (the disk, the
//!   completion eventfd, a transport's bounce pool through
//!   [`register_buffer`](crate::engine::IoEngine::register_buffer)) is unaffected, while swapping the file table
//!   or registering anything afterwards fails with `EACCES`. A thread's ring shared by the queues of several
//!   disks ([`SharedUring::open_ended`](super::SharedUring::open_ended)) allows one: `IORING_REGISTER_FILES_UPDATE`,
//!   so that a lane can put its disk into the sparse file table when its queue starts and take it out when it
//!   stops. That lets code running on the thread put any descriptor of the process into the table, and read or
//!   write it through the ring: no more than the `read`/`write`/`pread64`/`pwrite64` system calls the thread's
//!   seccomp filter allows it on any descriptor anyway; opening, connecting or sending stay refused. Such a ring
//!   also allows `URING_CMD` wherever the kernel has it (a regular file refuses the command with `EOPNOTSUPP`).
//!
//! Rings need `IORING_SETUP_R_DISABLED` (Linux 5.10, the same release as restrictions) to be restricted. On an
//! older kernel the ring works unrestricted: a warning is logged and
//! [`UringEngine::restricted`](super::UringEngine::restricted) reports it, so that the daemon can tell the
//! operator (or insist on the synchronous engine). A disabled ring whose restrictions the kernel refuses is an
//! error, not a silent downgrade.

use std::io;

use io_uring::register::Restriction;
use io_uring::{opcode, squeue, IoUring, Probe};

/// Opcodes every engine needs; all of them predate `IORING_SETUP_R_DISABLED`.
const BASE_OPS: [u8; 8] = [
    opcode::Read::CODE,
    opcode::Write::CODE,
    opcode::Readv::CODE,
    opcode::Writev::CODE,
    opcode::ReadFixed::CODE,
    opcode::WriteFixed::CODE,
    opcode::Fsync::CODE,
    opcode::Fallocate::CODE,
];

/// Opcodes of fixed vectored I/O, used only from a registered buffer (Linux 6.15+).
pub(super) const FIXED_VECTORED_OPS: [u8; 2] = [opcode::ReadvFixed::CODE, opcode::WritevFixed::CODE];

/// Whether the kernel behind `probe` has every opcode of `ops`.
pub(super) fn supports(probe: Option<&Probe>, ops: &[u8]) -> bool {
    probe.is_some_and(|probe| ops.iter().all(|&op| probe.is_supported(op)))
}

/// The submission opcodes an engine may issue: the base set, fixed vectored I/O where the kernel has it, and the
/// discard command where the engine uses it. Opcodes the kernel does not know are left out (it refuses the whole
/// list otherwise); the engine never issues them anyway.
pub(super) fn allowed_ops(probe: Option<&Probe>, discard_cmd: bool) -> Vec<u8> {
    let mut ops = BASE_OPS.to_vec();
    if supports(probe, &FIXED_VECTORED_OPS) {
        ops.extend_from_slice(&FIXED_VECTORED_OPS);
    }
    if discard_cmd {
        ops.push(opcode::UringCmd16::CODE);
    }
    ops
}

/// `IORING_REGISTER_FILES_UPDATE` from `<linux/io_uring.h>`.
const REGISTER_FILES_UPDATE: u8 = 6;

/// What a ring may do beyond the base set.
#[derive(Clone, Copy, Debug)]
pub(super) struct Allow {
    /// `URING_CMD` (block-device discards through `BLOCK_URING_CMD_DISCARD`).
    pub discard_cmd: bool,
    /// `IORING_REGISTER_FILES_UPDATE` (a thread's ring whose lanes come and go with their disks).
    pub file_updates: bool,
}

/// Install the allowlist on `ring` if it is still disabled; returns whether the ring is restricted.
pub(super) fn confine(ring: &IoUring, disabled: bool, probe: Option<&Probe>, allow: Allow) -> io::Result<bool> {
    if !disabled {
        tracing::warn!(
            "io_uring: the kernel cannot create disabled rings (Linux 5.10+), so this ring is not restricted: \
             a compromised queue thread could use it to open files or sockets unseen by seccomp"
        );
        return Ok(false);
    }
    let ops = allowed_ops(probe, allow.discard_cmd);
    let mut list: Vec<Restriction> = ops.iter().map(|&op| Restriction::sqe_op(op)).collect();
    list.push(Restriction::sqe_flags_required(squeue::Flags::FIXED_FILE.bits()));
    list.push(Restriction::sqe_flags_allowed(squeue::Flags::ASYNC.bits()));
    if allow.file_updates {
        list.push(Restriction::register_op(REGISTER_FILES_UPDATE));
    }
    ring.submitter().register_restrictions(&mut list)?;
    tracing::debug!(?ops, ?allow, "io_uring: ring restricted to the engine's operations on its registered disks");
    Ok(true)
}
