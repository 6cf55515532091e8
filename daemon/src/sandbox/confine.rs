// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The confinement of a guest's worker process, done once while it is still root and single-threaded, after it
//! received every descriptor it will ever need from the supervisor:
//!
//! 1. a mount namespace of its own whose root is an empty, read-only, 4 KiB tmpfs (`chroot` into it): a path
//!    resolves to nothing, whether `open(2)` or an io_uring ring's `OPENAT` asks;
//! 2. a network namespace of its own with no interface up: no socket, made directly or through an io_uring ring,
//!    reaches anything (abstract Unix sockets are per network namespace too), but for vsock, which has no
//!    network namespaces (before Linux 7.0): only a process that cannot make rings of its own is kept from it
//!    (the vhost-user server; see README, "What a compromised worker can and cannot do");
//! 3. `no_new_privs`, an empty capability bounding set, then the unprivileged user (groups, gid, uid), and every
//!    capability set emptied.
//!
//! The system call filter comes after, once the worker's own objects are set up (see [`super::lock_down`]).
//!
//! `blkbackd vhost-user` takes the first two steps too ([`isolate`]), with a user namespace of its own when it
//! has no `CAP_SYS_ADMIN` to make them with (the packaged unit runs it as the `blkbackd` user).

use std::ffi::CString;
use std::io;

use anyhow::Context;

use super::caps::{self, CapSet};
use super::user::UserSpec;

/// Where the empty root is mounted inside the worker's own mount namespace (any existing directory does: the
/// mount is invisible outside the namespace).
const EMPTY_ROOT_MOUNT_POINT: &str = "/tmp";

/// Confine this process (see the module documentation) and become `user`.
pub fn confine_worker(user: &UserSpec) -> anyhow::Result<()> {
    super::ensure_single_threaded()?;
    caps::no_new_privs().context("cannot set no_new_privs")?;
    // SAFETY: unshare with namespace flags only.
    check(unsafe { libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWNET) })
        .context("cannot enter a mount and network namespace of its own (the worker needs root to start)")?;
    empty_root().context("cannot switch to an empty root")?;
    caps::limit_bounding_set(CapSet::EMPTY).context("cannot empty the capability bounding set")?;
    user.switch().with_context(|| format!("cannot switch to user {user}"))?;
    caps::set_only(CapSet::EMPTY).context("cannot drop every capability")?;
    // SAFETY: plain system calls without arguments.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    tracing::info!(uid, gid, "worker confined: empty read-only root, own network namespace, no capabilities");
    Ok(())
}

/// Steps 1 and 2 for a process that may not be root: a mount namespace whose root is empty and a network
/// namespace of its own. Without `CAP_SYS_ADMIN`, a user namespace of its own comes first (mapping only its own
/// uid and gid, so ids stay what they are), which gives the capabilities to make the other two; the caller drops
/// them afterwards as it drops the rest. Returns how: `"cap_sys_admin"` or `"user namespace"`.
pub fn isolate() -> anyhow::Result<&'static str> {
    let effective = caps::get().context("cannot read the capabilities")?.effective;
    let privileged = effective.has(caps::CAP_SYS_ADMIN) && effective.has(caps::CAP_SYS_CHROOT);
    let how = if privileged {
        // SAFETY: unshare with namespace flags only.
        check(unsafe { libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWNET) })
            .context("cannot enter a mount and network namespace of its own")?;
        "cap_sys_admin"
    } else {
        const HINT: &str = "blkbackd has no CAP_SYS_ADMIN and CAP_SYS_CHROOT, and this host does not let an \
             unprivileged user namespace do it (sysctl kernel.unprivileged_userns_clone or \
             user.max_user_namespaces, AppArmor's apparmor_restrict_unprivileged_userns, a container's filter); \
             give it CAP_SYS_ADMIN and CAP_SYS_CHROOT at start (it drops them before serving), or --no-namespaces";
        // SAFETY: plain system calls without arguments.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        // SAFETY: unshare with namespace flags only.
        check(unsafe { libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNS | libc::CLONE_NEWNET) })
            .with_context(|| format!("cannot enter a user, mount and network namespace of its own: {HINT}"))?;
        map_own_ids(uid, gid)
            .with_context(|| format!("cannot map its own uid and gid in its user namespace: {HINT}"))?;
        empty_root().with_context(|| format!("cannot switch to an empty root in its user namespace: {HINT}"))?;
        return Ok("user namespace");
    };
    empty_root().context("cannot switch to an empty root")?;
    Ok(how)
}

/// In a fresh user namespace: map `uid` and `gid` to themselves (setgroups denied, as an unprivileged process
/// must).
fn map_own_ids(uid: libc::uid_t, gid: libc::gid_t) -> io::Result<()> {
    std::fs::write("/proc/self/setgroups", "deny")?;
    std::fs::write("/proc/self/uid_map", format!("{uid} {uid} 1\n"))?;
    std::fs::write("/proc/self/gid_map", format!("{gid} {gid} 1\n"))
}

fn empty_root() -> io::Result<()> {
    let cstr = |s: &str| CString::new(s).map_err(io::Error::other);
    let (none, root, target, tmpfs) = (cstr("none")?, cstr("/")?, cstr(EMPTY_ROOT_MOUNT_POINT)?, cstr("tmpfs")?);
    let options = cstr("size=4k,nr_inodes=1,mode=0555")?;
    // SAFETY: every pointer is a NUL-terminated string alive for the call (or null where the kernel allows it).
    unsafe {
        // Nothing we mount may propagate back to the host's namespace.
        check(libc::mount(
            none.as_ptr(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ))?;
        let flags = libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
        check(libc::mount(tmpfs.as_ptr(), target.as_ptr(), tmpfs.as_ptr(), flags, options.as_ptr().cast()))?;
        check(libc::chdir(target.as_ptr()))?;
        check(libc::chroot(c".".as_ptr()))?;
        check(libc::chdir(root.as_ptr()))?;
    }
    Ok(())
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}
