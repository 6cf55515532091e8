// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Where `blkbackd vhost-user` listens and how a service manager sees it: a socket it binds (`--socket-path`,
//! with `--socket-mode`/`--socket-group` for a VMM under another user), a listening socket it inherits
//! (`--fd N`, or systemd socket activation through `LISTEN_FDS`/`LISTEN_PID`), the `--pidfile`, and the
//! `--print-capabilities` answer of the vhost-user backend conventions.

use std::ffi::{CString, OsStr, OsString};
use std::fs::{self, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use crate::owned_path::{FileId, OwnedPath};

/// The first descriptor systemd passes to an activated service (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;

/// `--print-capabilities`: the backend type and the conventional options this backend takes (`--read-only`, and
/// `--blk-file` as another name of `--disk`), as the `vhost-user.json` schema describes them.
pub fn capabilities_json() -> &'static str {
    "{\n  \"type\": \"block\",\n  \"features\": [\n    \"read-only\",\n    \"blk-file\"\n  ]\n}\n"
}

/// Whether the command line asks for `vhost-user --print-capabilities`; every other argument is then ignored,
/// as the conventions want (so a VMM may probe with whatever else it would pass).
pub fn capabilities_requested(args: impl IntoIterator<Item = OsString>) -> bool {
    let mut after_subcommand = false;
    for arg in args.into_iter().skip(1) {
        if arg == "--" {
            return false;
        }
        if arg == "vhost-user" {
            after_subcommand = true;
        } else if after_subcommand && arg == "--print-capabilities" {
            return true;
        }
    }
    false
}

/// `--socket-mode`: octal permission bits (`0660`, `660`).
pub fn parse_mode(text: &str) -> Result<u32, String> {
    match u32::from_str_radix(text, 8) {
        Ok(mode) if mode <= 0o777 => Ok(mode),
        _ => Err(format!("{text:?} is not octal permission bits between 0000 and 0777 (e.g. 0660)")),
    }
}

/// `--socket-group`: a group name (looked up now, while `/etc/group` and NSS may still be read) or a numeric gid.
pub fn parse_group(text: &str) -> Result<libc::gid_t, String> {
    if let Ok(gid) = text.parse::<libc::gid_t>() {
        return Ok(gid);
    }
    let name = CString::new(text).map_err(|_| format!("invalid group name {text:?}"))?;
    let mut buf: Vec<libc::c_char> = vec![0; 1024];
    loop {
        // SAFETY: `group` is plain old data; all-zero is a valid value.
        let mut group: libc::group = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::group = std::ptr::null_mut();
        // SAFETY: valid C string, out-structure, buffer of `buf.len()` bytes and result pointer for the call.
        let rc = unsafe { libc::getgrnam_r(name.as_ptr(), &mut group, buf.as_mut_ptr(), buf.len(), &mut found) };
        if rc == libc::ERANGE && buf.len() < 1 << 20 {
            buf.resize(buf.len() * 2, 0);
            continue;
        }
        if rc != 0 {
            return Err(format!("looking up group {text:?}: {}", io::Error::from_raw_os_error(rc)));
        }
        if found.is_null() {
            return Err(format!("no such group {text:?}"));
        }
        return Ok(group.gr_gid);
    }
}

/// An inherited listening socket: `--fd N`, or the one systemd passed with `LISTEN_FDS` (then the variables are
/// removed, so that nothing started later takes them for its own). `None` when there is neither. Call before
/// anything else opens a descriptor, which could otherwise take the number of one that was not passed.
pub fn inherited(fd: Option<RawFd>, socket_path: Option<&Path>) -> anyhow::Result<Option<UnixListener>> {
    let activated = activation_fds()?;
    match (fd, activated, socket_path) {
        (Some(_), Some(_), _) | (_, Some(_), Some(_)) => bail!(
            "started by socket activation (LISTEN_FDS) and given {}: use one or the other",
            if fd.is_some() { "--fd" } else { "--socket-path" }
        ),
        (Some(fd), None, _) => adopt(fd, &format!("--fd {fd}")).map(Some),
        (None, Some(count), None) => {
            if count != 1 {
                bail!(
                    "socket activation passed {count} sockets (LISTEN_FDS={count}); the socket unit must listen on one"
                );
            }
            let listener = adopt(LISTEN_FDS_START, "the socket-activation descriptor (LISTEN_FDS)")?;
            for name in ["LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"] {
                std::env::remove_var(name);
            }
            Ok(Some(listener))
        }
        (None, None, _) => Ok(None),
    }
}

/// Whether the process was started by socket activation (`LISTEN_FDS` set): the variable alone, for the command
/// line check that some socket was given.
pub fn activation_requested() -> bool {
    std::env::var_os("LISTEN_FDS").is_some()
}

/// How many descriptors systemd passed to *this* process: `LISTEN_PID` must be our pid (the variables may have
/// been inherited from a parent they were meant for).
fn activation_fds() -> anyhow::Result<Option<u32>> {
    let Some(fds) = std::env::var_os("LISTEN_FDS") else { return Ok(None) };
    let pid = std::env::var_os("LISTEN_PID").unwrap_or_default();
    let number = |value: &OsStr, name: &str| {
        value
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
            .with_context(|| format!("socket activation: {name}={} is not a number", value.to_string_lossy()))
    };
    if number(&pid, "LISTEN_PID")? != std::process::id() {
        tracing::debug!(listen_pid = %pid.to_string_lossy(), "LISTEN_FDS is meant for another process, ignored");
        return Ok(None);
    }
    number(&fds, "LISTEN_FDS").map(Some)
}

/// Take `fd` as our listening socket once it is checked to be one: open, a Unix stream socket, listening.
fn adopt(fd: RawFd, what: &str) -> anyhow::Result<UnixListener> {
    // SAFETY: `stat` is plain old data; all-zero is a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes one stat structure through the pointer; any descriptor number is safe to query.
    if unsafe { libc::fstat(fd, &mut st) } < 0 {
        let e = io::Error::last_os_error();
        bail!("{what}: descriptor {fd} is not open ({e}): the process that starts blkbackd must pass it");
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        bail!("{what}: descriptor {fd} is not a socket (is it the one the starting process passed?)");
    }
    let option = |name: libc::c_int| -> io::Result<libc::c_int> {
        let mut value: libc::c_int = 0;
        let mut len: libc::socklen_t = 4; // size_of::<c_int>()
                                          // SAFETY: getsockopt writes at most `len` bytes into `value`.
        let rc =
            unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, name, (&mut value as *mut libc::c_int).cast(), &mut len) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(value)
    };
    let query = |name, what_option| option(name).with_context(|| format!("{what}: cannot read {what_option}"));
    if query(libc::SO_DOMAIN, "SO_DOMAIN")? != libc::AF_UNIX || query(libc::SO_TYPE, "SO_TYPE")? != libc::SOCK_STREAM {
        bail!("{what}: descriptor {fd} is not a Unix stream socket (vhost-user needs AF_UNIX, SOCK_STREAM)");
    }
    if query(libc::SO_ACCEPTCONN, "SO_ACCEPTCONN")? == 0 {
        bail!("{what}: descriptor {fd} is a socket that does not listen (bind and listen before passing it)");
    }
    // SAFETY: `fd` is an open listening Unix socket that nothing in this process owns (we are called before
    // anything else is opened); the listener becomes its only owner.
    let listener = unsafe { UnixListener::from_raw_fd(fd) };
    // SAFETY: F_SETFD on a descriptor we own: it is not leaked into anything we might execute.
    if unsafe { libc::fcntl(listener.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error()).with_context(|| format!("{what}: cannot set close-on-exec"));
    }
    listener.set_nonblocking(false).with_context(|| format!("{what}: cannot make the socket blocking"))?;
    Ok(listener)
}

/// How a socket we create is shared: its permission bits and group.
#[derive(Clone, Copy, Debug, Default)]
pub struct Access {
    /// `--socket-mode`.
    pub mode: Option<u32>,
    /// `--socket-group`.
    pub group: Option<libc::gid_t>,
}

/// The listening socket we bound; its file is removed when this is dropped, if it is still ours (or by whoever
/// [`hand_over`](SocketFile::hand_over) gave it to).
pub struct SocketFile {
    path: PathBuf,
    file: OwnedPath,
    /// The socket.
    pub listener: UnixListener,
}

impl SocketFile {
    /// Listen on `path` and give the file `access`. A socket file nobody listens on (left by a crashed process)
    /// is replaced; a live one or anything that is not a socket is an error.
    pub fn bind(path: &Path, access: Access) -> anyhow::Result<SocketFile> {
        let shown = path.display();
        let listener = match UnixListener::bind(path) {
            Ok(listener) => listener,
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                let meta = fs::symlink_metadata(path).with_context(|| format!("cannot listen on {shown}"))?;
                if !meta.file_type().is_socket() {
                    bail!("cannot listen on {shown}: it exists and is not a socket");
                }
                match UnixStream::connect(path) {
                    Ok(_) => bail!("cannot listen on {shown}: the socket is in use by a running process"),
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                        tracing::info!(socket = %shown, "replacing a stale socket file nobody listens on");
                        fs::remove_file(path).with_context(|| format!("cannot remove the stale socket {shown}"))?;
                        UnixListener::bind(path).with_context(|| format!("cannot listen on {shown}"))?
                    }
                    Err(e) => return Err(e).with_context(|| format!("cannot listen on {shown}: the socket exists")),
                }
            }
            Err(e) => return Err(e).with_context(|| format!("cannot listen on {shown}")),
        };
        let file = OwnedPath::claim(path).with_context(|| format!("cannot stat the socket {shown}"))?;
        let socket = SocketFile { path: path.to_path_buf(), file, listener };
        socket.share(access)?;
        Ok(socket)
    }

    /// Give the socket file its group and mode. (On the path: a socket descriptor's own fchmod/fchown change
    /// the socket's inode in sockfs, not the file a client connects through.)
    fn share(&self, access: Access) -> anyhow::Result<()> {
        let shown = self.path.display();
        if access.mode.is_none() && access.group.is_none() {
            return Ok(());
        }
        if !self.is_ours() {
            bail!("{shown} was replaced by someone else while blkbackd set it up");
        }
        if let Some(gid) = access.group {
            std::os::unix::fs::lchown(&self.path, None, Some(gid)).map_err(|e| {
                let hint = if e.raw_os_error() == Some(libc::EPERM) {
                    " (blkbackd must run as root or be a member of that group)"
                } else {
                    ""
                };
                anyhow::anyhow!("cannot give {shown} the group {gid}: {e}{hint}")
            })?;
        }
        if let Some(mode) = access.mode {
            fs::set_permissions(&self.path, Permissions::from_mode(mode))
                .with_context(|| format!("cannot set the mode of {shown} to {mode:04o}"))?;
        }
        tracing::debug!(socket = %shown, mode = access.mode.map(|m| format!("{m:04o}")), group = access.group, "socket shared");
        Ok(())
    }

    fn is_ours(&self) -> bool {
        self.file.is_current()
    }

    /// Leave the removal of the socket file to whoever takes the returned id.
    pub fn hand_over(&mut self) -> Option<FileId> {
        self.file.hand_over()
    }
}

/// `--pidfile`: our pid, written once we listen; removed on drop if it is still the file we wrote and its
/// directory lets us (after `--user`, a root-owned directory does not).
pub struct PidFile {
    file: OwnedPath,
}

impl PidFile {
    /// Write the pid to `path` (replacing what is there).
    pub fn write(path: &Path) -> anyhow::Result<PidFile> {
        let shown = path.display();
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(path)
            .with_context(|| format!("cannot write the pid file {shown}"))?;
        writeln!(file, "{}", std::process::id()).with_context(|| format!("cannot write the pid file {shown}"))?;
        let meta = file.metadata().with_context(|| format!("cannot stat the pid file {shown}"))?;
        Ok(PidFile { file: OwnedPath::new(FileId::from_metadata(path, &meta)) })
    }

    /// Leave the removal of the pid file to whoever takes the returned id.
    pub fn hand_over(&mut self) -> Option<FileId> {
        self.file.hand_over()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_are_asked_for_after_the_subcommand_only() {
        let args = |list: &[&str]| list.iter().map(OsString::from).collect::<Vec<_>>();
        assert!(capabilities_requested(args(&["blkbackd", "vhost-user", "--print-capabilities"])));
        assert!(capabilities_requested(args(&[
            "blkbackd",
            "--log-format",
            "json",
            "vhost-user",
            "--queues",
            "0",
            "--print-capabilities"
        ])));
        assert!(!capabilities_requested(args(&["blkbackd", "xen", "--print-capabilities"])));
        assert!(!capabilities_requested(args(&["blkbackd", "vhost-user", "--", "--print-capabilities"])));
    }

    #[test]
    fn modes_and_groups_parse() {
        assert_eq!(parse_mode("0660"), Ok(0o660));
        assert_eq!(parse_mode("666"), Ok(0o666));
        for bad in ["0888", "4755", "rw", ""] {
            assert!(parse_mode(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_group("4242"), Ok(4242));
        assert_eq!(parse_group("root"), Ok(0));
        assert!(parse_group("no-such-group-blkbackd").expect_err("unknown").contains("no such group"));
    }
}
