// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The system call allow-lists, one per role, compiled to BPF with `seccompiler` (rust-vmm, as Firecracker and
//! cloud-hypervisor use it).
//!
//! Every role shares [`base`]: reading and writing descriptors it already holds, memory management without
//! executable mappings, futexes, clocks, signals and the calls the `SIGSYS` handler makes. On top of that:
//! - [`Role::VhostUser`] (the whole process, after the disk and sockets are open): threads (`clone` with
//!   `CLONE_THREAD` only: no new processes), sockets it already has (accept, messages with descriptors for guest
//!   memory and eventfds), `mmap` of guest memory, the io_uring rings made before (no new one: `EPERM`), eventfds
//!   and epoll; no `open` (`EACCES`), no
//!   `socket`, no `exec`, no `unlink` (its file keeper removes its files).
//! - [`Role::XenGuest`] (the whole process of one guest's worker, `blkbackd xen-worker`): the vhost-user set,
//!   plus the Xen and block-device ioctls and what its data-plane threads need to sandbox
//!   themselves; its I/O threads' rings are made before the lock-down too (no new one: `EPERM`); no `open`
//!   (`EACCES`), no `socket`, no `exec`, no `unlink`.
//! - [`Role::Keeper`] (the file keeper of a vhost-user server): waiting on its socket pair, looking at, moving
//!   aside and removing files by path, and nothing else: no `open`, `socket`, `exec`, threads or io_uring.
//! - [`Role::XenWorker`] (each data-plane thread, stacked on the process filter): only the data path: its event
//!   channel, grant maps (registered by the supervisor: [`GrantAccess`]), its disk through io_uring or
//!   `preadv`/`pwritev`, epoll. No `open` (`EACCES`), no `socket`, no new threads or rings.
//!
//! `ioctl` is allowed only for the request numbers each role issues.
//!
//! Two calls are answered with an error rather than trapped: `clone3` passes its flags in memory, which a filter
//! cannot read, so it gets `ENOSYS` and glibc creates threads with `clone`, whose flags the filter checks; and
//! where a role may not open files, `openat` gets `EACCES` (see [`open_calls`]).

use std::collections::BTreeMap;

use anyhow::Context;
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
};
use transport_xen::xen::ioctl as xen;

use super::SeccompMode;

/// Which allow-list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The whole `blkbackd vhost-user` process.
    VhostUser,
    /// One Xen data-plane worker thread.
    XenWorker(GrantAccess),
    /// The whole process of one guest's worker (`blkbackd xen-worker`): confined, fed descriptors by the
    /// supervisor. The data-plane threads add [`Role::XenWorker`] on top.
    XenGuest(GrantAccess),
    /// The file keeper of a confined vhost-user server: waits on its socket pair, then removes the server's
    /// files by path ([`super::keeper`]).
    Keeper,
}

/// Which grant-device calls a Xen role may make.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GrantAccess {
    /// Only mmap and munmap of the grant device: the calls that name a granting domain
    /// (`IOCTL_GNTDEV_MAP_GRANT_REF`, `IOCTL_GNTDEV_GRANT_COPY`) are the supervisor's, which makes them for the
    /// worker's guest only (Linux's gntdev restricts neither to a domain), and so is dropping a registration
    /// (`IOCTL_GNTDEV_UNMAP_GRANT_REF`), which the supervisor does once nothing of it is mapped: it counts what
    /// the worker holds by the registrations it made (`transport_xen::separation::grants`).
    Brokered,
    /// Also maps and copies of any domain's grants (`blkbackd xen --direct-grants`).
    Direct,
}

/// The grant-device ioctls of `access`.
fn gntdev_requests(access: GrantAccess) -> &'static [u64] {
    // Not even unregistering: the supervisor counts the worker's registrations, and drops them itself.
    const BROKERED: [u64; 0] = [];
    const DIRECT: [u64; 3] = [
        req(xen::IOCTL_GNTDEV_UNMAP_GRANT_REF),
        req(xen::IOCTL_GNTDEV_MAP_GRANT_REF),
        req(xen::IOCTL_GNTDEV_GRANT_COPY),
    ];
    match access {
        GrantAccess::Brokered => &BROKERED,
        GrantAccess::Direct => &DIRECT,
    }
}

// Block-device ioctls (`<linux/fs.h>`): size and geometry queries when a disk is opened, discards on the data path.
const BLKROGET: u64 = 0x125e;
const BLKSSZGET: u64 = 0x1268;
const BLKPBSZGET: u64 = 0x127b;
const BLKGETSIZE64: u64 = 0x8008_1272;
const BLKGETDISKSEQ: u64 = 0x8008_1280;
const BLK_DATA: [u64; 3] =
    [req(device_blk::disk::BLKDISCARD), req(device_blk::disk::BLKSECDISCARD), req(device_blk::disk::BLKZEROOUT)];

/// An ioctl request number as the filter compares it (its low 32 bits, as the kernel reads it).
#[allow(clippy::unnecessary_cast)] // `c_ulong` is `u64` here, not on every target
const fn req(request: libc::c_ulong) -> u64 {
    request as u64
}

/// `IORING_REGISTER_ENABLE_RINGS`: a ring created disabled is enabled by the thread that submits to it.
const IORING_REGISTER_ENABLE_RINGS: u64 = 12;
/// `IORING_REGISTER_FILES_UPDATE`: an I/O thread's ring, shared by the queues of several vbds, takes a queue's
/// disk into its file table when the queue starts and out when it stops (the ring's own restrictions allow that
/// operation and no other; see `device_blk`'s `engine::uring::restrict`).
const IORING_REGISTER_FILES_UPDATE: u64 = 6;

/// Rules under construction: `None` allows a call whatever its arguments.
#[derive(Default)]
struct Rules(BTreeMap<i64, Option<Vec<SeccompRule>>>);

impl Rules {
    /// Allow these calls with any arguments.
    fn any(&mut self, calls: &[libc::c_long]) {
        for &nr in calls {
            self.0.insert(nr, None);
        }
    }

    /// Allow `nr` when one of `conditions` (each a list that must all hold) holds.
    fn when(&mut self, nr: libc::c_long, conditions: Vec<Vec<SeccompCondition>>) -> anyhow::Result<()> {
        let mut rules = Vec::with_capacity(conditions.len());
        for c in conditions {
            rules.push(SeccompRule::new(c).context("seccomp rule")?);
        }
        // A call already allowed whatever its arguments stays so.
        if let Some(existing) = self.0.entry(nr).or_insert_with(|| Some(Vec::new())) {
            existing.extend(rules);
        }
        Ok(())
    }

    /// Allow `nr` when its 32-bit argument `arg` is one of `values`.
    fn arg_in(&mut self, nr: libc::c_long, arg: u8, values: &[u64]) -> anyhow::Result<()> {
        // No value: nothing allowed (a call with no rule at all would be allowed whatever its arguments).
        if values.is_empty() {
            return Ok(());
        }
        let conditions = values.iter().map(|&v| eq(arg, v).map(|c| vec![c])).collect::<anyhow::Result<_>>()?;
        self.when(nr, conditions)
    }

    /// Allow `nr` when its argument `arg` has none of the bits of `mask`.
    fn arg_without(&mut self, nr: libc::c_long, arg: u8, mask: u64) -> anyhow::Result<()> {
        let c = SeccompCondition::new(arg, SeccompCmpArgLen::Qword, SeccompCmpOp::MaskedEq(mask), 0)
            .context("seccomp condition")?;
        self.when(nr, vec![vec![c]])
    }

    /// Allow `nr` only when one of `conditions` holds, whatever was allowed of it before.
    fn only_when(&mut self, nr: libc::c_long, conditions: Vec<Vec<SeccompCondition>>) -> anyhow::Result<()> {
        self.0.insert(nr, Some(Vec::new()));
        self.when(nr, conditions)
    }

    fn compile(self, mismatch: SeccompAction) -> anyhow::Result<BpfProgram> {
        let rules = self.0.into_iter().map(|(nr, rules)| (nr, rules.unwrap_or_default())).collect();
        let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, target_arch()?)
            .context("building the seccomp filter")?;
        filter.try_into().context("compiling the seccomp filter")
    }
}

/// Argument `arg` (all 64 bits) with the bits of `mask` equal to those of `value`.
fn masked(arg: u8, mask: u64, value: u64) -> anyhow::Result<SeccompCondition> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Qword, SeccompCmpOp::MaskedEq(mask), value)
        .context("seccomp condition")
}

/// Argument `arg` below `2^bits`.
fn below_bit(arg: u8, bits: u32) -> anyhow::Result<SeccompCondition> {
    masked(arg, !((1u64 << bits) - 1), 0)
}

fn eq(arg: u8, value: u64) -> anyhow::Result<SeccompCondition> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value).context("seccomp condition")
}

fn target_arch() -> anyhow::Result<seccompiler::TargetArch> {
    std::env::consts::ARCH.try_into().context("seccomp filters are not supported on this architecture")
}

/// What every thread of every role does.
fn base(rules: &mut Rules) -> anyhow::Result<()> {
    rules.any(&[
        // Descriptors it holds: the disk, eventfds, event channels, sockets, stderr.
        libc::SYS_read,
        libc::SYS_readv,
        libc::SYS_write,
        libc::SYS_writev,
        libc::SYS_pread64,
        libc::SYS_pwrite64,
        libc::SYS_preadv,
        libc::SYS_pwritev,
        libc::SYS_preadv2,
        libc::SYS_pwritev2,
        libc::SYS_lseek,
        libc::SYS_close,
        libc::SYS_fdatasync,
        libc::SYS_fsync,
        libc::SYS_fallocate,
        libc::SYS_io_uring_enter,
        libc::SYS_epoll_create1,
        libc::SYS_epoll_ctl,
        libc::SYS_epoll_pwait,
        libc::SYS_epoll_pwait2,
        libc::SYS_ppoll,
        // Memory (mmap and mprotect: below, never executable).
        libc::SYS_munmap,
        libc::SYS_mremap,
        libc::SYS_madvise,
        libc::SYS_brk,
        // Threads, time, randomness (hash seeds).
        libc::SYS_futex,
        libc::SYS_sched_yield,
        libc::SYS_nanosleep,
        libc::SYS_clock_nanosleep,
        libc::SYS_clock_gettime,
        libc::SYS_clock_getres,
        libc::SYS_gettimeofday,
        libc::SYS_getrandom,
        libc::SYS_gettid,
        libc::SYS_getpid,
        libc::SYS_restart_syscall,
        libc::SYS_exit,
        libc::SYS_exit_group,
        // Signals: the alternate stack of a thread, masks, the SIGSYS handler's reset.
        libc::SYS_rt_sigreturn,
        libc::SYS_rt_sigprocmask,
        libc::SYS_rt_sigaction,
        libc::SYS_sigaltstack,
    ]);
    #[cfg(target_arch = "x86_64")]
    rules.any(&[libc::SYS_epoll_wait, libc::SYS_poll]);
    let exec = libc::PROT_EXEC as u64;
    rules.arg_without(libc::SYS_mmap, 2, exec)?;
    rules.arg_without(libc::SYS_mprotect, 2, exec)?;
    // Signals only to our own process (abort, and the SIGSYS handler's own end).
    // SAFETY: getpid cannot fail.
    let pid = u64::from(unsafe { libc::getpid() }.unsigned_abs());
    // Only the signals it sends itself: abort's, and the SIGSYS handler's (no SIGCONT, say, that would cut
    // short the stop its supervisor makes to count a Xen worker's grant maps).
    let own = |signal: libc::c_int| -> anyhow::Result<Vec<SeccompCondition>> {
        Ok(vec![eq(0, pid)?, eq(2, u64::from(signal.unsigned_abs()))?])
    };
    rules.when(libc::SYS_tgkill, vec![own(libc::SIGABRT)?, own(libc::SIGSYS)?])?;
    // The thread's name (for the SIGSYS line); no_new_privs, which only restricts (set again by each filter).
    rules.arg_in(libc::SYS_prctl, 0, &[libc::PR_GET_NAME as u64, libc::PR_SET_NO_NEW_PRIVS as u64])?;
    // Descriptor flags (std checks that a descriptor is open before closing it, in debug builds).
    rules.arg_in(libc::SYS_fcntl, 1, &[libc::F_GETFD as u64, libc::F_GETFL as u64])?;
    Ok(())
}

/// What a process-wide role adds to [`base`]: threads, the sockets and descriptors it holds, io_uring rings.
fn process(rules: &mut Rules) -> anyhow::Result<()> {
    rules.any(&[
        libc::SYS_set_robust_list,
        libc::SYS_rseq,
        libc::SYS_sched_getaffinity,
        // The signal thread's sigwait.
        libc::SYS_rt_sigtimedwait,
        libc::SYS_accept4,
        libc::SYS_recvmsg,
        libc::SYS_sendmsg,
        libc::SYS_recvfrom,
        libc::SYS_sendto,
        libc::SYS_shutdown,
        libc::SYS_setsockopt,
        libc::SYS_getsockopt,
        libc::SYS_getsockname,
        libc::SYS_getpeername,
        libc::SYS_eventfd2,
        libc::SYS_dup,
        libc::SYS_dup3,
        libc::SYS_fstat,
        // A disk handed over is looked at once: whether it is a file on tmpfs (`Disk::from_parts`).
        libc::SYS_fstatfs,
        libc::SYS_newfstatat,
        libc::SYS_statx,
        libc::SYS_io_uring_register,
    ]);
    #[cfg(target_arch = "x86_64")]
    rules.any(&[libc::SYS_accept, libc::SYS_dup2]);
    // Threads only, and never CLONE_VFORK (a parent waiting for a stopped child would keep a stop of the whole
    // process from ever completing).
    let thread = libc::CLONE_THREAD as u64;
    rules.when(libc::SYS_clone, vec![vec![masked(0, thread, thread)?, masked(0, libc::CLONE_VFORK as u64, 0)?]])?;
    rules.arg_in(libc::SYS_prctl, 0, &[libc::PR_SET_NAME as u64])?;
    // Descriptor and status flags, and duplicates (std's `try_clone`); never an owner or a signal for a
    // descriptor's events (F_SETOWN, F_SETSIG), which would let its guest's notifications signal the process
    // (a SIGCONT cutting short its supervisor's stop, say).
    let fcntl = [libc::F_GETFD, libc::F_SETFD, libc::F_GETFL, libc::F_SETFL, libc::F_DUPFD_CLOEXEC];
    rules.arg_in(libc::SYS_fcntl, 1, &fcntl.map(|c| u64::from(c.unsigned_abs())))?;
    rules.arg_in(
        libc::SYS_ioctl,
        1,
        &[req(libc::FIONBIO), req(libc::FIOCLEX), req(libc::FIONCLEX), req(libc::TCGETS)],
    )?;
    rules.arg_in(libc::SYS_ioctl, 1, &BLK_DATA)
}

/// What a guest's worker process adds to [`base`] and [`process`]: the Xen and block-device ioctls on the
/// descriptors the supervisor gave it, and letting its data-plane threads sandbox themselves. It opens nothing.
fn xen_guest(rules: &mut Rules, access: GrantAccess) -> anyhow::Result<()> {
    rules.any(&[libc::SYS_capget, libc::SYS_capset]);
    let ambient = eq(0, libc::PR_CAP_AMBIENT as u64)?;
    rules.when(libc::SYS_prctl, vec![vec![ambient, eq(1, libc::PR_CAP_AMBIENT_CLEAR_ALL as u64)?]])?;
    rules.arg_in(libc::SYS_seccomp, 0, &[u64::from(libc::SECCOMP_SET_MODE_FILTER)])?;
    rules.arg_in(libc::SYS_ioctl, 1, &[BLKROGET, BLKSSZGET, BLKPBSZGET, BLKGETSIZE64, BLKGETDISKSEQ])?;
    rules.arg_in(
        libc::SYS_ioctl,
        1,
        &[
            req(xen::IOCTL_EVTCHN_BIND_UNBOUND_PORT),
            req(xen::IOCTL_EVTCHN_BIND_INTERDOMAIN),
            req(xen::IOCTL_EVTCHN_UNBIND),
            req(xen::IOCTL_EVTCHN_NOTIFY),
            req(xen::IOCTL_EVTCHN_RESET),
            req(xen::IOCTL_EVTCHN_RESTRICT_DOMID),
        ],
    )?;
    rules.arg_in(libc::SYS_ioctl, 1, gntdev_requests(access))
}

/// What a Xen data-plane worker adds to [`base`]: its ring's grant maps (and, with direct access, copies), its
/// event channel, discards, enabling its io_uring ring at the first submission, and updating the file table of an
/// I/O thread's ring. With brokered grants it asks the supervisor to register each map: a request and its answer
/// on the supervisor's socket (`send`, `recv`), which the worker already holds.
fn xen_worker(rules: &mut Rules, access: GrantAccess) -> anyhow::Result<()> {
    rules.arg_in(libc::SYS_io_uring_register, 1, &[IORING_REGISTER_ENABLE_RINGS, IORING_REGISTER_FILES_UPDATE])?;
    rules.arg_in(libc::SYS_ioctl, 1, &[req(xen::IOCTL_EVTCHN_NOTIFY), req(xen::IOCTL_EVTCHN_UNBIND)])?;
    rules.arg_in(libc::SYS_ioctl, 1, gntdev_requests(access))?;
    if access == GrantAccess::Brokered {
        rules.any(&[libc::SYS_sendto, libc::SYS_recvfrom]);
    }
    rules.arg_in(libc::SYS_ioctl, 1, &BLK_DATA)
}

/// What the file keeper adds to [`base`]: its socket pair, and looking at and removing files by path.
fn keeper(rules: &mut Rules) {
    rules.any(&[
        libc::SYS_recvfrom,
        libc::SYS_sendto,
        libc::SYS_setsockopt,
        libc::SYS_fstat,
        libc::SYS_newfstatat,
        libc::SYS_statx,
        libc::SYS_unlinkat,
        libc::SYS_renameat2,
    ]);
    #[cfg(target_arch = "x86_64")]
    rules.any(&[libc::SYS_lstat, libc::SYS_unlink]);
}

/// `openat` (and `open`), where a role must not open files: answered `EACCES` rather than trapped, because glibc
/// and std open files lazily and cope with a refusal (malloc reads `/proc/sys/vm/overcommit_memory` the first
/// time a thread's arena shrinks; a backtrace reads the executable).
fn open_calls() -> Vec<libc::c_long> {
    let mut calls = vec![libc::SYS_openat];
    #[cfg(target_arch = "x86_64")]
    calls.push(libc::SYS_open);
    calls
}

/// A filter answering `calls` with `errno` and leaving everything else to the other filters.
fn errno_filter(calls: &[libc::c_long], errno: i32) -> anyhow::Result<BpfProgram> {
    let filter = SeccompFilter::new(
        calls.iter().map(|&nr| (nr, Vec::new())).collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(errno.unsigned_abs()),
        target_arch()?,
    )
    .context("building an errno filter")?;
    filter.try_into().context("compiling an errno filter")
}

/// The filters for `role` in `mode` (none when off), in the order to install them.
///
/// Besides the allow-list, a role may have filters that answer a call with an error instead: the kernel takes the
/// strictest answer of all filters, so the allow-list lets those calls through and the error wins.
pub fn filters(role: Role, mode: SeccompMode) -> anyhow::Result<Vec<BpfProgram>> {
    let mismatch = match mode {
        SeccompMode::Off => return Ok(Vec::new()),
        SeccompMode::Enforce => SeccompAction::Trap,
        SeccompMode::Log => SeccompAction::Log,
    };
    let mut rules = Rules::default();
    base(&mut rules)?;
    let clone3 = (vec![libc::SYS_clone3], libc::ENOSYS);
    let errors = match role {
        Role::VhostUser => {
            process(&mut rules)?;
            // The size of a block-device disk, read again when it may have grown.
            rules.arg_in(libc::SYS_ioctl, 1, &[BLKGETSIZE64])?;
            // No new io_uring ring: the filter cannot see what a ring does (a ring of its own could create and
            // connect any socket, vsock included, which has no network namespace). Its rings are made before
            // the lock-down and restricted to their own operations on the disk; an engine that tries for more
            // gets EPERM and falls back to synchronous I/O.
            vec![clone3, (open_calls(), libc::EACCES), (vec![libc::SYS_io_uring_setup], libc::EPERM)]
        }
        Role::XenGuest(access) => {
            process(&mut rules)?;
            xen_guest(&mut rules, access)?;
            // gntdev reads an mmap's page offset and length as ints: a larger offset or length would name
            // another registration than its own (and confuse its supervisor's count of grant maps) or reach a
            // kernel assertion. Nothing the worker maps comes near these bounds.
            let no_exec = masked(2, libc::PROT_EXEC as u64, 0)?;
            rules.only_when(libc::SYS_mmap, vec![vec![no_exec, below_bit(1, 40)?, below_bit(5, 43)?]])?;
            // No new io_uring ring, as for vhost-user: its I/O threads' rings are made before the lock-down.
            vec![clone3, (open_calls(), libc::EACCES), (vec![libc::SYS_io_uring_setup], libc::EPERM)]
        }
        Role::XenWorker(access) => {
            xen_worker(&mut rules, access)?;
            vec![(open_calls(), libc::EACCES)]
        }
        Role::Keeper => {
            keeper(&mut rules);
            vec![(open_calls(), libc::EACCES)]
        }
    };
    let mut programs = Vec::with_capacity(errors.len() + 1);
    for (calls, errno) in errors {
        rules.any(&calls);
        programs.push(errno_filter(&calls, errno)?);
    }
    // Last: in a process-wide role it forbids installing further filters.
    programs.push(rules.compile(mismatch)?);
    Ok(programs)
}
