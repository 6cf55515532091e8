// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `blkbackd vhost-user` started the ways VMMs and service managers start it: socket activation as systemd does
//! it (`LISTEN_FDS`, `LISTEN_PID`, the socket as descriptor 3) with readiness on `NOTIFY_SOCKET`, a listening
//! socket passed with `--fd`, a `--pidfile`, and a socket that `--socket-mode`/`--socket-group` open to an
//! unprivileged VMM.

// Test constants and C structure sizes are narrowed freely.
#![allow(clippy::cast_possible_truncation)]

mod vhost_user_client;

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixDatagram, UnixListener};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use vhost_user_client::daemon::{blkbackd, PROCESS_TIMEOUT};
use vhost_user_client::{BlkClient, Daemon, Op, Scratch};

const DISK: usize = 1 << 20;

/// Have `command`'s process receive `fd` as descriptor `target` (open across exec), as a service manager passes
/// sockets.
fn pass_fd(command: &mut Command, fd: RawFd, target: RawFd) {
    // SAFETY: the closure runs in the child between fork and exec and calls only dup2 and fcntl, which are
    // async-signal-safe.
    unsafe {
        command.pre_exec(move || {
            if fd == target {
                // dup2 onto itself keeps close-on-exec: clear it.
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(fd, target) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// One read through a fresh frontend connection: the daemon serves on `socket`.
fn read_once(socket: &Path) {
    let mut client = BlkClient::connect(socket, 1, 16, false, 4096).expect("connect");
    assert_eq!(u64::from(client.config().capacity), (DISK / 512) as u64);
    assert_eq!(client.run_one(Op::Read { offset: 0, at: 0, len: 4096 }), 0);
}

fn stop(daemon: &mut Daemon) {
    daemon.signal(libc::SIGTERM);
    let status = daemon.wait(PROCESS_TIMEOUT);
    assert_eq!(status.code(), Some(0), "{}", daemon.stderr());
}

#[test]
fn socket_activation_serves_the_passed_socket_and_tells_systemd_it_is_ready() {
    let scratch = Scratch::new(DISK, 0);
    let listener = UnixListener::bind(&scratch.socket).expect("the socket unit's listener");
    let notify_path = scratch.dir.path().join("notify");
    let notify = UnixDatagram::bind(&notify_path).expect("the fake systemd notification socket");
    notify.set_read_timeout(Some(PROCESS_TIMEOUT)).expect("timeout");

    // As systemd does it: the socket as descriptor 3, LISTEN_FDS=1 and LISTEN_PID=the service's own pid (the
    // shell's `$$` is the pid blkbackd keeps across exec).
    let mut command = Command::new("sh");
    command
        .args(["-c", r#"LISTEN_PID=$$ exec "$0" "$@""#])
        .arg(blkbackd())
        .args(["vhost-user", "--disk"])
        .arg(&scratch.disk)
        .env("LISTEN_FDS", "1")
        .env("NOTIFY_SOCKET", &notify_path);
    pass_fd(&mut command, listener.as_raw_fd(), 3);
    let mut daemon = Daemon::spawn_command(command, &scratch.socket);
    drop(listener); // the daemon holds its own copy, as a service holds the socket unit's

    let mut buf = [0u8; 256];
    let n = notify.recv(&mut buf).unwrap_or_else(|e| panic!("no readiness message ({e}):\n{}", daemon.stderr()));
    assert_eq!(&buf[..n], b"READY=1", "{}", daemon.stderr());
    // The log line was written before READY=1, but the thread collecting stderr may not have read it yet.
    let deadline = std::time::Instant::now() + PROCESS_TIMEOUT;
    while !daemon.stderr().contains("socket activation") && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(daemon.stderr().contains("socket activation"), "{}", daemon.stderr());
    read_once(&scratch.socket);
    read_once(&scratch.socket); // a frontend that reconnects finds the same socket
    stop(&mut daemon);
    let n = notify.recv(&mut buf).expect("STOPPING=1");
    assert_eq!(&buf[..n], b"STOPPING=1");
    assert!(scratch.socket.exists(), "an inherited socket's file belongs to whoever made it");
}

#[test]
fn socket_activation_for_another_process_is_ignored() {
    let scratch = Scratch::new(DISK, 0);
    let mut command = Command::new(blkbackd());
    command.args(["vhost-user", "--disk"]).arg(&scratch.disk).env("LISTEN_FDS", "1").env("LISTEN_PID", "1");
    let mut daemon = Daemon::spawn_command(command, &scratch.socket);
    let status = daemon.wait(PROCESS_TIMEOUT);
    assert_eq!(status.code(), Some(1), "{}", daemon.stderr());
    let last = daemon.stderr().lines().last().unwrap_or_default().to_string();
    assert!(last.starts_with("blkbackd: error: no socket to listen on"), "{last}");
}

#[test]
fn fd_serves_an_inherited_listener_and_the_pidfile_lives_as_long_as_the_daemon() {
    let scratch = Scratch::new(DISK, 0);
    let listener = UnixListener::bind(&scratch.socket).expect("the VMM's listener");
    let pidfile = scratch.dir.path().join("blkbackd.pid");
    let mut command = Command::new(blkbackd());
    command.args(["vhost-user", "--fd", "7", "--pidfile"]).arg(&pidfile).arg("--disk").arg(&scratch.disk);
    pass_fd(&mut command, listener.as_raw_fd(), 7);
    let mut daemon = Daemon::spawn_command(command, &scratch.socket);
    drop(listener);
    daemon.wait_listening();
    assert!(daemon.stderr().contains("(--fd)"), "{}", daemon.stderr());
    let written = std::fs::read_to_string(&pidfile).expect("the pid file is written once listening");
    assert_eq!(written, format!("{}\n", daemon.pid()));
    read_once(&scratch.socket);
    stop(&mut daemon);
    assert!(!pidfile.exists(), "the pid file is removed on exit");
    assert!(scratch.socket.exists(), "an inherited socket's file belongs to whoever made it");

    let (status, stderr) = Daemon::run_to_exit(&["vhost-user", "--fd", "9", "--disk", "/dev/null"]);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("--fd 9: descriptor 9 is not open"), "{stderr}");
}

/// Whether a process with uid 65534 and group `gid` may connect to `socket` (`Err` with the errno otherwise).
/// Forked rather than run through a helper program: the child makes only async-signal-safe system calls.
fn connect_as_nobody(socket: &Path, gid: libc::gid_t) -> Result<(), i32> {
    // SAFETY: sockaddr_un is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = socket.as_os_str().as_bytes();
    assert!(bytes.len() < addr.sun_path.len(), "socket path too long");
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    let groups = [gid];
    // SAFETY: the child calls only async-signal-safe functions (setgroups, setgid, setuid, socket, connect,
    // _exit) on memory prepared before the fork; the parent waits for it.
    unsafe {
        let pid = libc::fork();
        assert!(pid >= 0, "fork");
        if pid == 0 {
            let code = if libc::setgroups(1, groups.as_ptr()) != 0 || libc::setgid(gid) != 0 || libc::setuid(65534) != 0
            {
                100
            } else {
                let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
                let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
                if fd < 0 {
                    101
                } else if libc::connect(fd, (&addr as *const libc::sockaddr_un).cast(), len) == 0 {
                    0
                } else {
                    *libc::__errno_location()
                }
            };
            libc::_exit(code);
        }
        let mut status = 0;
        assert_eq!(libc::waitpid(pid, &mut status, 0), pid, "waitpid");
        assert!(libc::WIFEXITED(status), "the client died: {status:#x}");
        match libc::WEXITSTATUS(status) {
            0 => Ok(()),
            code @ (100 | 101) => panic!("the client could not drop to uid 65534 or create a socket ({code})"),
            errno => Err(errno),
        }
    }
}

#[test]
fn socket_mode_and_group_let_an_unprivileged_vmm_connect() {
    if !test_kit::is_root() {
        eprintln!("skipping: changing a socket's group and connecting as another user needs root");
        return;
    }
    let scratch = Scratch::new(DISK, 0);
    // The directory must be searchable by the client; the daemon's umask leaves the socket to its owner.
    std::fs::set_permissions(scratch.dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod the dir");
    let start = |extra: &[&str]| {
        let mut command = Command::new(blkbackd());
        command.args(["vhost-user", "--socket-path"]).arg(&scratch.socket).arg("--disk").arg(&scratch.disk);
        command.args(extra);
        // SAFETY: umask is async-signal-safe and has no preconditions.
        unsafe {
            command.pre_exec(|| {
                libc::umask(0o077);
                Ok(())
            });
        }
        let mut daemon = Daemon::spawn_command(command, &scratch.socket);
        daemon.wait_listening();
        daemon
    };

    let mut daemon = start(&[]);
    assert_eq!(connect_as_nobody(&scratch.socket, 4242), Err(libc::EACCES), "without the options: refused");
    stop(&mut daemon);

    let mut daemon = start(&["--socket-mode", "0660", "--socket-group", "4242"]);
    let meta = std::fs::metadata(&scratch.socket).expect("socket");
    assert_eq!((meta.mode() & 0o777, meta.gid()), (0o660, 4242));
    assert_eq!(connect_as_nobody(&scratch.socket, 4242), Ok(()), "a member of the socket's group connects");
    assert_eq!(connect_as_nobody(&scratch.socket, 4343), Err(libc::EACCES), "others do not");
    stop(&mut daemon);

    let mut daemon = start(&["--socket-mode", "0666"]);
    assert_eq!(connect_as_nobody(&scratch.socket, 4343), Ok(()), "0666: anyone connects");
    read_once(&scratch.socket); // the daemon serves the next frontend after the probes
    stop(&mut daemon);
    assert!(!scratch.socket.exists(), "a socket it bound is removed on exit");
}
