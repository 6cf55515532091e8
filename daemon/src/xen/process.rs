// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The supervisor's process plumbing: how a worker is started (its descriptor 3, its process group, SIGTERM when
//! the supervisor dies), signalled and waited for.

use std::os::fd::RawFd;
use std::process::Child;
use std::time::Duration;

use transport_xen::services::{DomId, XenError};
use transport_xen::xen::EvtchnDevice;

/// `close_range(2)`'s flag: mark the range close-on-exec instead of closing it (Linux 5.11).
const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;

/// In the child, before exec: the channel at descriptor 3 (inheritable) and no other descriptor above the
/// standard three, a process group of its own, SIGTERM when the supervisor dies.
///
/// Every descriptor above 3 is closed even if it lacks close-on-exec: a worker is hostile once its guest takes it
/// over, and an inherited descriptor of the supervisor (an eventfd that stops its xenstore reader, another
/// worker's socket) would be a way out of its confinement.
pub fn child_setup(channel: RawFd, supervisor: libc::pid_t) -> std::io::Result<()> {
    let check = |rc: libc::c_int| if rc < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) };
    // SAFETY: plain system calls on integers.
    unsafe {
        if channel == 3 {
            check(libc::fcntl(3, libc::F_SETFD, 0))?;
        } else {
            check(libc::dup2(channel, 3))?;
        }
        // Close-on-exec rather than closed now: std's own error pipe (close-on-exec already) must live until the
        // exec, to report a failed one.
        if libc::syscall(libc::SYS_close_range, 4u32, u32::MAX, CLOSE_RANGE_CLOEXEC) != 0 {
            // Before Linux 5.11: one by one, up to the descriptor limit the supervisor could have reached.
            let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
            let top = if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 { limit.rlim_cur } else { 65536 };
            for fd in 4..libc::c_int::try_from(top.min(1 << 20)).unwrap_or(1 << 20) {
                libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
            }
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

pub use transport_xen::separation::grants::pidfd_open;

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

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    use std::process::Command;

    use super::*;

    /// A worker starts with its channel at 3 and nothing else of the supervisor's: not even a descriptor
    /// someone forgot to make close-on-exec (an eventfd of the supervisor's xenstore reader once was).
    #[test]
    fn a_worker_inherits_its_channel_and_nothing_else() {
        // SAFETY: eventfd and fcntl with integer arguments; the descriptors are closed here and below.
        let leaked = unsafe {
            let fd = libc::eventfd(0, 0);
            // Above 3 whatever the test harness holds, and not close-on-exec (F_DUPFD does not set it).
            let high = libc::fcntl(fd, libc::F_DUPFD, 64);
            libc::close(fd);
            high
        };
        assert!(leaked >= 64, "eventfd: {}", std::io::Error::last_os_error());
        let (channel, _peer) = std::os::unix::net::UnixDatagram::pair().expect("socket pair");
        let fd = channel.as_raw_fd();
        // SAFETY: getpid has no preconditions.
        let supervisor = unsafe { libc::getpid() };
        let script = format!(
            "test -e /proc/self/fd/3 && echo channel; test -e /proc/self/fd/{leaked} && echo leaked; \
             ls /proc/self/fd | wc -l"
        );
        let mut command = Command::new("/bin/sh");
        command.args(["-c", &script]);
        // SAFETY: the hook makes only async-signal-safe system calls (see `child_setup`).
        unsafe { command.pre_exec(move || child_setup(fd, supervisor)) };
        let out = command.output().expect("run the child");
        // SAFETY: closing the descriptor this test opened.
        unsafe { libc::close(leaked) };
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{out:?}");
        // 0, 1, 2, the channel, and the directory `ls` reads.
        assert_eq!(stdout.lines().collect::<Vec<_>>(), ["channel", "5"], "{stdout}");
    }
}
