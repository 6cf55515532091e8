// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What a process reaches through an io_uring ring of its own making, which no system call filter sees: the
//! vhost-user server and a Xen worker, locked down, can make none; confined, such a ring would reach nothing.

use std::path::PathBuf;

use super::{in_child, ALLOWED, EXPOSED, NO_RING, REFUSED};

/// A listening socket on the host that anyone may connect to, removed on drop.
pub(super) struct HostSocket {
    pub(super) path: PathBuf,
    _listener: std::os::unix::net::UnixListener,
}

impl HostSocket {
    pub(super) fn new() -> HostSocket {
        use std::os::unix::fs::PermissionsExt;
        let path = std::env::temp_dir().join(format!("blkbackd-ring-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        HostSocket { path, _listener: listener }
    }
}

impl Drop for HostSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// What a vhost-user process that its guest took over reaches through an io_uring ring it makes itself (the
/// filter sees none of a ring's operations): `/etc/passwd` by `OPENAT`, and `host_socket` by `SOCKET` +
/// `CONNECT`. `NO_RING` if it can make no ring (`EPERM`), `ALLOWED` if it reaches neither, `EXPOSED` if it
/// reaches both.
pub(super) fn ring_reach(host_socket: &std::path::Path) -> i32 {
    use io_uring::{opcode, types};
    let mut ring = match io_uring::IoUring::new(4) {
        Ok(ring) => ring,
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => return NO_RING,
        Err(e) => panic!("io_uring_setup: {e}"),
    };
    let mut run = |entry: io_uring::squeue::Entry| {
        // SAFETY: every buffer an entry points to outlives this call, which waits for its completion.
        unsafe { ring.submission().push(&entry).expect("push") };
        ring.submit_and_wait(1).expect("submit");
        ring.completion().next().expect("completion").result()
    };
    let name = c"/etc/passwd";
    let opened = run(opcode::OpenAt::new(types::Fd(libc::AT_FDCWD), name.as_ptr()).build());
    let socket = run(opcode::Socket::new(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0).build());
    assert!(socket >= 0, "io_uring SOCKET: {socket} (the filter cannot see it)");
    // SAFETY: an all-zero sockaddr_un is valid; the path is copied in below, within its bounds.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::sa_family_t::try_from(libc::AF_UNIX).expect("fits");
    let bytes = host_socket.as_os_str().as_encoded_bytes();
    assert!(bytes.len() < addr.sun_path.len(), "socket path too long");
    for (dst, &src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    let len = libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_un>()).expect("fits");
    let sockaddr = std::ptr::addr_of!(addr).cast::<libc::sockaddr>();
    let connected = run(opcode::Connect::new(types::Fd(socket), sockaddr, len).build());
    match (opened, connected) {
        (o, c) if o >= 0 && c == 0 => EXPOSED,
        (o, c) if o == -libc::ENOENT && c == -libc::ENOENT => ALLOWED,
        other => panic!("OPENAT and CONNECT through a ring gave {other:?}"),
    }
}

/// The filter cannot see into an io_uring ring. A locked-down vhost-user process can make no ring of its own
/// (`EPERM`); its namespaces alone would leave such a ring no host file or socket to reach; with neither, a ring
/// reaches both (what a ring of its own could do, vsock included, which no namespace stops).
#[test]
fn a_vhost_user_process_reaches_no_host_file_or_socket_through_a_ring_of_its_own() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root (to start as root and drop to uid 65534 as the daemon does)");
        return;
    }
    for (action, want) in [("locked", NO_RING), ("namespaces", ALLOWED), ("exposed", EXPOSED)] {
        let (status, stderr) = in_child(&format!("vhost-user-ring enforce {action}"));
        assert_eq!(status.code(), Some(want), "{action}: {status}\n{stderr}");
    }
    // The refusal itself: the filter answers io_uring_setup with EPERM.
    let (status, stderr) = in_child("vhost-user new-ring");
    assert_eq!(status.code(), Some(REFUSED), "{status}\n{stderr}");
}

/// The same for a Xen worker: locked down, it can make no ring (`EPERM`); confined only, a ring of its own
/// reaches no host file or socket (but would reach vsock, which no namespace stops: hence the refusal).
#[test]
fn a_xen_worker_process_can_make_no_ring_of_its_own() {
    // The refusal itself, as the worker's process filter answers.
    let (status, stderr) = in_child("xen-guest new-ring");
    assert_eq!(status.code(), Some(REFUSED), "{status}\n{stderr}");
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped the rest: confining a worker needs root (namespaces, chroot)");
        return;
    }
    for (action, want) in [("locked", NO_RING), ("confined", ALLOWED)] {
        let (status, stderr) = in_child(&format!("xen-guest-ring enforce {action}"));
        assert_eq!(status.code(), Some(want), "{action}: {status}\n{stderr}");
    }
}
