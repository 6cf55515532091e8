// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Least privilege: once `blkbackd` has opened what it needs, it gives up root, its capabilities and most system
//! calls, so that a guest that took over a data-path thread holds as little as possible.
//!
//! # vhost-user
//! Everything is open before the first frontend connects (disk, listening socket, control socket), and while the
//! process still has one thread it:
//! 1. forks its [`FileKeeper`], which removes its socket and pid files when it ends (it cannot reach them after
//!    the next step),
//! 2. sets `no_new_privs` (exec can never grant privileges again),
//! 3. unless `--no-namespaces`: moves to a mount namespace whose root is an empty read-only tmpfs and a network
//!    namespace of its own ([`confine::isolate`]; a user namespace first when it lacks `CAP_SYS_ADMIN`), because
//!    the filter cannot see into an io_uring ring, which could otherwise open or connect to anything by name,
//! 4. started as root: removes every capability from the bounding set and locks `SECBIT_NOROOT`,
//! 5. with `--user`: takes the user's groups, gid and uid (real, effective and saved), which clears every
//!    capability,
//! 6. empties its effective, permitted, inheritable and ambient capability sets (also without `--user`),
//! 7. installs the [`Role::VhostUser`] system call filter on every thread (`SECCOMP_FILTER_FLAG_TSYNC`).
//!
//! Only then does it start its other threads (signals, control socket, and per connection the protocol and queue
//! threads), which inherit all of it: every thread runs with no capability, under the filter. Reconnecting
//! frontends need no privilege: accepting on the listening socket, guest memory and eventfds passed over it,
//! new threads and epoll are all allowed, and each connection's I/O threads serve on the io_uring rings made
//! before the lock-down (a new ring is refused).
//!
//! # Xen
//! The supervisor (`blkbackd xen`) keeps root: it opens disks (with the diskseq pin), `/dev/xen` devices and
//! xenstore connections as guests come, and starts workers. Each guest's worker (`blkbackd xen-worker`) starts
//! as root with one inherited socket, receives its descriptors, and then, while single-threaded,
//! [confines](confine_worker) itself: a mount namespace whose root is an empty read-only tmpfs, a network
//! namespace of its own, `no_new_privs`, an empty bounding set, the unprivileged user (`--user`, default
//! `blkbackd`), no capability. It then installs the [`Role::XenGuest`] filter on the whole process (no `open`:
//! `EACCES`; no `socket`, `exec`, `unlink`, new processes); each data-plane thread ([`xen_worker_init`]) adds
//! the stricter [`Role::XenWorker`] filter for itself: its ring, grants, event channel and disk, nothing else.
//!
//! # `--seccomp`
//! `enforce` (default): a call outside the list ends the process with `SIGSYS` after one line on stderr naming the
//! call and the thread (see [`sigsys`]); opening a file where that is not allowed fails with `EACCES` instead
//! (glibc and std open files lazily and cope with the refusal, e.g. a panic's backtrace). `log`: the kernel logs
//! such calls (`dmesg`, audit) and lets them through, for developing the list. `off`: no filter (users and
//! capabilities are still dropped).
//!
//! Caveats: an io_uring ring performs its operations in the kernel, where seccomp does not see them. The engine's
//! rings are restricted to their own operations (`IORING_REGISTER_RESTRICTIONS`); the vhost-user process and
//! each Xen worker make their rings before the lock-down and may make none after (`EPERM`: a ring of their own
//! could reach vsock, which no network namespace stops), and their empty root and network namespace hold
//! whatever gets past that. With
//! `--user`, the socket files are removed on exit only if their directory is writable by that user (the keeper
//! runs as it); a file left behind is replaced at the next start.

mod caps;
mod confine;
mod keeper;
mod seccomp;
mod sigsys;
mod user;

#[cfg(test)]
mod tests;

use std::sync::Arc;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use transport_xen::dataplane::WorkerInit;

pub use caps::CapSet;
use caps::{CAP_DAC_OVERRIDE, CAP_KILL, CAP_SETGID, CAP_SETPCAP, CAP_SETUID, CAP_SYS_ADMIN, CAP_SYS_CHROOT};

/// What the Xen supervisor keeps: opening disks owned by others (`DAC_OVERRIDE`), signalling its workers, which
/// run as another user (`KILL`), and what each worker, started as root, needs to confine itself before it drops
/// everything (`SYS_ADMIN` for its namespaces and empty root, `SYS_CHROOT`, `SETPCAP` to empty its bounding set,
/// `SETUID`/`SETGID` to become its user). The same set as `blkbackd-xen.service`'s `CapabilityBoundingSet=`.
pub const XEN_SUPERVISOR_CAPS: CapSet =
    CapSet::of(&[CAP_DAC_OVERRIDE, CAP_KILL, CAP_SYS_ADMIN, CAP_SYS_CHROOT, CAP_SETPCAP, CAP_SETUID, CAP_SETGID]);
pub use confine::confine_worker;
pub use keeper::FileKeeper;
pub use seccomp::{GrantAccess, Role};
pub use user::UserSpec;

/// `--seccomp`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SeccompMode {
    /// An unexpected system call ends the process with a log line naming it.
    Enforce,
    /// Unexpected system calls are logged by the kernel and allowed (for developing the list).
    Log,
    /// No system call filter.
    Off,
}

/// `--user` and `--seccomp`, for the serving subcommands.
#[derive(Clone, Debug, Args)]
pub struct SandboxArgs {
    /// vhost-user: once the disk and sockets are open, run as this user: NAME (with its groups), UID or UID:GID
    /// (default: stay the user blkbackd started as; every capability is dropped either way). xen: the user of
    /// the guests' worker processes (default: the `blkbackd` system user the package creates); the supervisor
    /// stays root.
    #[arg(long, value_name = "NAME|UID[:GID]", value_parser = UserSpec::parse)]
    pub user: Option<UserSpec>,
    /// System call filter: `enforce` (an unexpected system call ends blkbackd with a log line naming it), `log`
    /// (the kernel logs unexpected calls and allows them), `off`.
    #[arg(long, value_enum, value_name = "MODE", default_value_t = SeccompMode::Enforce)]
    pub seccomp: SeccompMode,
}

/// Whether a process gives up its view of the host's files and network too (`--no-namespaces` says no).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isolation {
    /// A mount namespace whose root is empty and read-only, and a network namespace of its own
    /// ([`confine::isolate`]).
    Namespaces,
    /// The host's mount and network namespaces.
    None,
}

/// Give up privileges while the process has one thread: `no_new_privs`, the host's files and network
/// (`isolation`), the bounding set (as root), the user (`user`), and every capability but `keep` (those the
/// process has of them). Returns the capabilities kept.
pub fn drop_privileges(user: Option<&UserSpec>, keep: CapSet, isolation: Isolation) -> anyhow::Result<CapSet> {
    ensure_single_threaded()?;
    caps::no_new_privs().context("cannot set no_new_privs")?;
    if isolation == Isolation::Namespaces {
        let how = confine::isolate()?;
        if let (Some(user), "user namespace") = (user, how) {
            bail!(
                "cannot switch to user {user}: in a user namespace of its own blkbackd maps only its own ids \
                 (--user needs blkbackd started as root with CAP_SYS_ADMIN and CAP_SYS_CHROOT, or --no-namespaces)"
            );
        }
        tracing::info!(with = how, "isolated: empty read-only root, own network namespace");
    }
    caps::limit_bounding_set(keep).context("cannot limit the capability bounding set")?;
    let keep = keep.and(caps::get().context("cannot read the capabilities")?.permitted);
    if let Some(user) = user {
        caps::keep_across_setuid(keep != CapSet::EMPTY).context("cannot keep capabilities across the user switch")?;
        user.switch().map_err(|e| {
            let hint =
                if e.raw_os_error() == Some(libc::EPERM) { " (--user needs blkbackd started as root)" } else { "" };
            anyhow::anyhow!("cannot switch to user {user}: {e}{hint}")
        })?;
        caps::keep_across_setuid(false).context("cannot reset PR_SET_KEEPCAPS")?;
    }
    caps::set_only(keep).with_context(|| format!("cannot drop capabilities (keeping {keep})"))?;
    // SAFETY: plain system calls without arguments.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    tracing::info!(user = user.map(|u| u.shown.as_str()), uid, gid, capabilities = %keep, "privileges dropped");
    Ok(keep)
}

/// Fail now, with the reason, if `user` is given but this process cannot switch to it (it is not root).
pub fn check_user_switch(user: Option<&UserSpec>) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    match user {
        Some(user) if !root => {
            bail!("cannot switch to user {user}: Operation not permitted (--user needs blkbackd started as root)")
        }
        _ => Ok(()),
    }
}

/// The Xen supervisor's restriction, while it has one thread: `no_new_privs`, and every capability outside
/// [`XEN_SUPERVISOR_CAPS`] gone from all its sets, the bounding set included (so its workers cannot get them
/// back either). Returns what it kept.
pub fn restrict_supervisor() -> anyhow::Result<CapSet> {
    ensure_single_threaded()?;
    caps::no_new_privs().context("cannot set no_new_privs")?;
    caps::drop_bounding(XEN_SUPERVISOR_CAPS).context("cannot limit the capability bounding set")?;
    let keep = XEN_SUPERVISOR_CAPS.and(caps::get().context("cannot read the capabilities")?.permitted);
    caps::set_only(keep).with_context(|| format!("cannot drop capabilities (keeping {keep})"))?;
    tracing::info!(capabilities = %keep, "supervisor restricted: no_new_privs, bounding set limited");
    Ok(keep)
}

/// Install `role`'s system call filter on every thread of the process (`mode` off: none).
pub fn lock_down(role: Role, mode: SeccompMode) -> anyhow::Result<()> {
    let programs = seccomp::filters(role, mode)?;
    if programs.is_empty() {
        tracing::warn!("system call filter off (--seccomp off)");
        return Ok(());
    }
    sigsys::install().context("cannot install the SIGSYS handler")?;
    for program in &programs {
        seccompiler::apply_filter_all_threads(program)
            .map_err(|e| anyhow::anyhow!("cannot install the system call filter: {e}"))?;
    }
    tracing::info!(?role, mode = ?mode, "system call filter installed");
    Ok(())
}

/// The hook each Xen data-plane worker runs on its own thread before serving: drop every capability and add the
/// [`Role::XenWorker`] filter (in `mode`) to the thread. A worker that cannot do so does not serve.
pub fn xen_worker_init(mode: SeccompMode, access: GrantAccess) -> anyhow::Result<WorkerInit> {
    let programs = Arc::new(seccomp::filters(Role::XenWorker(access), mode)?);
    if !programs.is_empty() {
        sigsys::install().context("cannot install the SIGSYS handler")?;
    }
    Ok(WorkerInit::new(move |queue| {
        caps::no_new_privs()?;
        caps::set_only(CapSet::EMPTY)?;
        for program in programs.iter() {
            seccompiler::apply_filter(program).map_err(std::io::Error::other)?;
        }
        tracing::debug!(queue, "worker sandboxed: no capabilities, worker system call filter");
        Ok(())
    }))
}

/// Capabilities and uids are per thread: dropping them is only whole while the process has one thread.
pub(crate) fn ensure_single_threaded() -> anyhow::Result<()> {
    let tasks = match std::fs::read_dir("/proc/self/task") {
        Ok(tasks) => tasks.count(),
        Err(e) => bail!("cannot count this process's threads in /proc/self/task: {e} (is /proc mounted?)"),
    };
    if tasks != 1 {
        bail!("internal error: privileges must be dropped before any thread starts ({tasks} threads run)");
    }
    Ok(())
}
