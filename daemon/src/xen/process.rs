// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The supervisor's process plumbing: how a worker is started (its descriptor 3, its process group, SIGTERM when
//! the supervisor dies), signalled and waited for.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::process::Child;
use std::time::Duration;

use transport_xen::services::{DomId, XenError};
use transport_xen::xen::EvtchnDevice;

/// In the child, before exec: the channel at descriptor 3 (inheritable), a process group of its own, SIGTERM
/// when the supervisor dies.
pub fn child_setup(channel: RawFd, supervisor: libc::pid_t) -> std::io::Result<()> {
    let check = |rc: libc::c_int| if rc < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) };
    // SAFETY: plain system calls on integers.
    unsafe {
        if channel == 3 {
            check(libc::fcntl(3, libc::F_SETFD, 0))?;
        } else {
            check(libc::dup2(channel, 3))?;
        }
        check(libc::setpgid(0, 0))?;
        check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM))?;
        if libc::getppid() != supervisor {
            return Err(std::io::Error::other("the supervisor is gone"));
        }
    }
    Ok(())
}

/// A new event-channel handle that can only bind to `domid`'s ports.
pub fn restricted_evtchn(domid: DomId) -> Result<std::fs::File, XenError> {
    let device = EvtchnDevice::open()?;
    device.restrict_domid(domid)?;
    Ok(device.into_file())
}

pub fn signal(child: &Child, signal: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill with a pid we spawned and have not reaped yet (so it cannot have been reused).
        unsafe { libc::kill(pid, signal) };
    }
}

pub fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags; it returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_long, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = RawFd::try_from(fd).map_err(std::io::Error::other)?;
    // SAFETY: a fresh descriptor the kernel just gave us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `poll(2)` until one of `fds` is readable or `timeout` passes.
pub fn wait_readable(fds: &[RawFd], timeout: Duration) -> std::io::Result<()> {
    let mut pollfds: Vec<libc::pollfd> =
        fds.iter().map(|&fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 }).collect();
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: `pollfds` is a valid array of `pollfds.len()` entries for the duration of the call.
    let rc = unsafe { libc::poll(pollfds.as_mut_ptr(), pollfds.len() as libc::nfds_t, ms) };
    if rc < 0 {
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
    Ok(())
}
