// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The file keeper of a confined `blkbackd vhost-user`: a small process forked before the confinement that
//! removes the server's socket files and pid file when the server ends, however it ends.
//!
//! The server's root is an empty read-only tmpfs, so it cannot reach those files by path, and it must not hold
//! a descriptor of their directories either (a ring or a call relative to it would reach the other files there,
//! e.g. other instances' sockets in `/run/blkbackd`). The keeper is the one that can, and it takes no order from
//! the server: its only input is one byte or the end of a socket pair. On either it removes each file whose path
//! still names the file the server created (device and inode), answers one byte, and exits. A server taken over
//! by its guest can at most have its own files removed early.
//!
//! The keeper holds nothing else: every descriptor but stderr and its end of the pair is closed, it runs as the
//! server's user (`--user`) with no capability, `no_new_privs`, ignores the termination signals (a service manager's stop signals the whole group;
//! the server's end of the pair is what ends the keeper) and runs under the [`Role::Keeper`] filter. The server
//! reaps nothing: `SIGCHLD` is ignored, so the keeper never lingers as a zombie.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use anyhow::Context;

use super::caps::{self, CapSet};
use super::seccomp::{self, Role};
use super::user::UserSpec;
use super::SeccompMode;
use crate::owned_path::FileId;

/// How long a server that ends waits for its keeper to have removed the files.
const FINISH_TIMEOUT: Duration = Duration::from_secs(2);
/// The keeper's name, as `ps` shows it.
const NAME: &[u8] = b"blkbackd-keep\0";

/// The server's side of its file keeper: dropping it (or [`finish`](FileKeeper::finish)) has the files removed.
#[derive(Debug)]
pub struct FileKeeper {
    channel: Option<UnixStream>,
    pid: libc::pid_t,
}

impl FileKeeper {
    /// Fork the keeper of `files` (call while the process has one thread, before confining it). The keeper runs
    /// under its own system call filter in `seccomp` mode.
    /// It runs as `user` if given, as the server will: a file is removed if its directory lets that user, as the
    /// server itself would have done.
    pub fn spawn(files: Vec<FileId>, user: Option<&UserSpec>, seccomp: SeccompMode) -> anyhow::Result<FileKeeper> {
        super::ensure_single_threaded()?;
        let (server, keeper) = UnixStream::pair().context("cannot create the file keeper's socket pair")?;
        // SAFETY: setting a signal's disposition; no handler is installed.
        if unsafe { libc::signal(libc::SIGCHLD, libc::SIG_IGN) } == libc::SIG_ERR {
            return Err(std::io::Error::last_os_error()).context("cannot have the file keeper reaped");
        }
        // SAFETY: the process has one thread (checked above), so the child may run any code; it ends with _exit.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(std::io::Error::last_os_error()).context("cannot fork the file keeper");
        }
        if pid == 0 {
            drop(server);
            // The keeper's own filter, built here: it names the keeper's pid (the only one it may signal). A panic
            // must not unwind into the server's code.
            let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                match seccomp::filters(Role::Keeper, seccomp) {
                    Ok(filters) => keep(&files, keeper, user, &filters),
                    Err(error) => {
                        tracing::error!(
                            error = format!("{error:#}"),
                            "the file keeper has no filter; files left behind"
                        );
                        1
                    }
                }
            }))
            .unwrap_or(1);
            // SAFETY: ends the child without running the parent's destructors or atexit handlers.
            unsafe { libc::_exit(code) };
        }
        drop(keeper);
        let shown: Vec<_> = files.iter().map(|f| f.path().display().to_string()).collect();
        tracing::debug!(pid, files = ?shown, "file keeper started");
        Ok(FileKeeper { channel: Some(server), pid })
    }

    /// Have the files removed now and wait (at most [`FINISH_TIMEOUT`]) until the keeper says it is done.
    pub fn finish(&mut self) {
        let Some(mut channel) = self.channel.take() else { return };
        let done = channel
            .write_all(&[1])
            .and_then(|()| channel.set_read_timeout(Some(FINISH_TIMEOUT)))
            .and_then(|()| channel.read(&mut [0u8; 1]));
        match done {
            Ok(1) => tracing::debug!(pid = self.pid, "file keeper done"),
            other => tracing::warn!(pid = self.pid, outcome = ?other, "the file keeper did not confirm"),
        }
    }
}

impl Drop for FileKeeper {
    fn drop(&mut self) {
        self.finish();
    }
}

/// The keeper's life, in the child; returns its exit code.
fn keep(files: &[FileId], channel: UnixStream, user: Option<&UserSpec>, filters: &[seccompiler::BpfProgram]) -> i32 {
    let mut channel = match isolate(channel, user, filters) {
        Ok(channel) => channel,
        Err(error) => {
            // Without its own restrictions the keeper does not run: the files stay (the next start replaces a
            // stale socket), which is less harm than an unconfined process.
            tracing::error!(error = format!("{error:#}"), "the file keeper cannot restrict itself; files left behind");
            return 1;
        }
    };
    let mut byte = [0u8; 1];
    loop {
        match channel.read(&mut byte) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            // A byte (the server ends) or the end of the pair (the server is gone, whatever killed it).
            _ => break,
        }
    }
    for file in files {
        match file.remove_if_current() {
            Ok(true) => tracing::debug!(path = %file.path().display(), "removed"),
            Ok(false) => tracing::debug!(path = %file.path().display(), "gone or replaced: left alone"),
            Err(error) => tracing::warn!(path = %file.path().display(), %error, "cannot remove the file"),
        }
    }
    let _ = channel.write_all(&byte);
    0
}

/// Everything the keeper gives up before it waits: descriptors, signals, capabilities, system calls.
fn isolate(
    channel: UnixStream,
    user: Option<&UserSpec>,
    filters: &[seccompiler::BpfProgram],
) -> anyhow::Result<UnixStream> {
    const CHANNEL_FD: i32 = 3;
    let original = channel.as_raw_fd();
    // SAFETY: dup2 onto a number this process then owns (nothing when it is that number already).
    if original != CHANNEL_FD && unsafe { libc::dup2(original, CHANNEL_FD) } < 0 {
        return Err(std::io::Error::last_os_error()).context("dup2");
    }
    std::mem::forget(channel);
    // Nothing but stderr and the channel: stdin, stdout, the original of the channel if it took a standard
    // number (stdio closed at start), and everything above the channel. The forgotten original is owned by no
    // live Rust object, and its number is never used again.
    let below = if original < CHANNEL_FD { Some(original) } else { None };
    for fd in [Some(libc::STDIN_FILENO), Some(libc::STDOUT_FILENO), below].into_iter().flatten() {
        // SAFETY: closing a descriptor no live Rust object owns here (a number closed twice gives EBADF).
        unsafe { libc::close(fd) };
    }
    // SAFETY: as above, for every descriptor above the channel.
    if unsafe { libc::syscall(libc::SYS_close_range, CHANNEL_FD + 1, libc::c_uint::MAX, 0) } < 0 {
        return Err(std::io::Error::last_os_error()).context("close_range");
    }
    // SAFETY: CHANNEL_FD is the duplicate made above, owned by nothing else.
    let channel = unsafe { UnixStream::from_raw_fd(CHANNEL_FD) };
    for signal in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGQUIT] {
        // SAFETY: setting a signal's disposition; no handler is installed.
        unsafe { libc::signal(signal, libc::SIG_IGN) };
    }
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes.
    unsafe { libc::prctl(libc::PR_SET_NAME, NAME.as_ptr() as libc::c_ulong, 0, 0, 0) };
    caps::no_new_privs().context("no_new_privs")?;
    caps::limit_bounding_set(CapSet::EMPTY).context("bounding set")?;
    if let Some(user) = user {
        user.switch().with_context(|| format!("cannot switch to user {user}"))?;
    }
    caps::set_only(CapSet::EMPTY).context("capabilities")?;
    if !filters.is_empty() {
        super::sigsys::install().context("SIGSYS handler")?;
    }
    for program in filters {
        seccompiler::apply_filter(program).map_err(|e| anyhow::anyhow!("system call filter: {e}"))?;
    }
    Ok(channel)
}
