// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The production filters refuse what they must and allow what serving needs, and Xen data-plane workers on the
//! emulated host serve every request type with no capability under the worker filter.
//!
//! A filter cannot be removed, so the refusals run in a child process: this test binary again, running only
//! [`child`] with the scenario in `BLKBACKD_SANDBOX_CHILD`. The parent checks that the child died of `SIGSYS`
//! and that its last words name the forbidden call.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Command, ExitStatus};
use std::sync::Arc;

use device_blk::EngineKind;
use transport_xen::blkif::{RSP_EOPNOTSUPP, RSP_OKAY};
use transport_xen::dataplane::{DataplaneOptions, IoThreads};
use transport_xen::emulated::EmulatedHost;
use transport_xen::frontend::load::{check_pattern, fill_pattern};
use transport_xen::frontend::{BackendThread, Blkfront, BlkfrontConfig, DiskSpec, IoRequest, Toolstack, XVDA};
use transport_xen::grant_memory::GrantMode;
use transport_xen::xenbus::dataplane_server::DataplaneServer;
use transport_xen::xenbus::{BackendConfig, Scope};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::*;
use rings::{ring_reach, HostSocket};

mod rings;

const CHILD_ENV: &str = "BLKBACKD_SANDBOX_CHILD";
/// A child that got through its scenario.
const ALLOWED: i32 = 42;
/// A child whose forbidden call came back.
const SURVIVED: i32 = 3;
/// A child whose `open` was refused with `EACCES`.
const REFUSED: i32 = 4;
/// A child that reached a host file or socket through an io_uring ring of its own making.
const EXPOSED: i32 = 5;
/// A child that could make no io_uring ring of its own (`EPERM`).
const NO_RING: i32 = 6;

/// Run `scenario` in a child: its exit status and stderr.
fn in_child(scenario: &str) -> (ExitStatus, String) {
    let out = Command::new(std::env::current_exe().expect("the test binary"))
        .args(["--exact", "sandbox::tests::child", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, scenario)
        .output()
        .expect("run the child");
    (out.status, String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Assert that `scenario` was ended by `SIGSYS` for system call `nr`.
fn assert_refused(scenario: &str, nr: libc::c_long, name: &str) -> String {
    let (status, stderr) = in_child(scenario);
    assert_eq!(status.signal(), Some(libc::SIGSYS), "{scenario}: {status}\n{stderr}");
    let line = format!("blkbackd: seccomp: forbidden system call {nr} ({name}) in thread ");
    assert!(stderr.contains(&line), "{scenario}: no {line:?} in:\n{stderr}");
    stderr
}

/// The child side: nothing unless started by [`in_child`].
#[test]
fn child() {
    let Ok(scenario) = std::env::var(CHILD_ENV) else { return };
    // No core dump of a test child killed on purpose.
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    let code = run_scenario(&scenario);
    std::process::exit(code);
}

fn run_scenario(scenario: &str) -> i32 {
    let (role, mode, action) = scenario.split_once(' ').map_or(("", "", ""), |(role, action)| {
        let (mode, action) = action.split_once(' ').unwrap_or(("enforce", action));
        (role, mode, action)
    });
    let mode = if mode == "log" { SeccompMode::Log } else { SeccompMode::Enforce };
    let existing = std::env::current_exe().expect("the test binary");
    // What a worker holds before it locks itself down: a device, and its socket to the supervisor.
    let held = Held {
        device: File::open("/dev/null").expect("open /dev/null"),
        supervisor: std::os::unix::net::UnixDatagram::pair().expect("socket pair"),
    };
    let (role, access) = match role.strip_suffix("-direct") {
        Some(role) => (role, GrantAccess::Direct),
        None => (role, GrantAccess::Brokered),
    };
    match role {
        "vhost-user" => lock_down(Role::VhostUser, mode).expect("vhost-user filter"),
        "xen-guest" | "xen-worker" => lock_down(Role::XenGuest(access), mode).expect("xen guest filter"),
        "confined" => {
            let nobody = UserSpec::parse("65534:65534").expect("uid 65534");
            return in_fork(|| {
                confine_worker(&nobody).expect("confine");
                confined_reach(&existing)
            });
        }
        "vhost-user-ring" => {
            // As `blkbackd vhost-user` locks itself down, in a single-threaded fork, then reach out through a
            // ring of its own. `action`: `locked` (namespaces and filter, as it runs), `namespaces` (without the
            // filter), `exposed` (neither).
            let isolation = if action == "exposed" { Isolation::None } else { Isolation::Namespaces };
            let host_socket = HostSocket::new();
            let nobody = UserSpec::parse("65534:65534").expect("uid 65534");
            return in_fork(|| {
                drop_privileges(Some(&nobody), CapSet::EMPTY, isolation).expect("drop privileges");
                if action == "locked" {
                    lock_down(Role::VhostUser, mode).expect("vhost-user filter");
                }
                ring_reach(&host_socket.path)
            });
        }
        "xen-guest-ring" => {
            // As `blkbackd xen-worker` confines itself and locks down, in a single-threaded fork, then reach out
            // through a ring of its own. `action`: `locked` (as it runs), `confined` (without the filter).
            let host_socket = HostSocket::new();
            let nobody = UserSpec::parse("65534:65534").expect("uid 65534");
            return in_fork(|| {
                confine_worker(&nobody).expect("confine");
                if action == "locked" {
                    lock_down(Role::XenGuest(access), mode).expect("xen guest filter");
                }
                ring_reach(&host_socket.path)
            });
        }
        other => panic!("unknown role {other:?}"),
    }
    if role == "xen-worker" {
        let init = xen_worker_init(mode, access).expect("worker hook");
        // A worker gets its descriptors from the control thread.
        let evt = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        let action = action.to_string();
        let thread = std::thread::Builder::new().name("blkif-d9-q0".into()).spawn(move || {
            init.run(0).expect("the worker sandboxes itself");
            forbidden_or_allowed(&action, existing, Some(evt), &held)
        });
        return thread.expect("spawn").join().expect("join");
    }
    forbidden_or_allowed(action, existing, None, &held)
}

/// Run `check` in a single-threaded fork (the test harness runs a scenario on a thread of its own, and privileges
/// are dropped only in a process with one thread): its exit code, `SURVIVED` if it panicked or was killed.
fn in_fork(check: impl FnOnce() -> i32 + std::panic::UnwindSafe) -> i32 {
    // SAFETY: the child only runs `check`, which confines itself, checks and exits; the parent waits for it.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let code = std::panic::catch_unwind(check);
        // SAFETY: _exit is always safe to call.
        unsafe { libc::_exit(code.unwrap_or(SURVIVED)) };
    }
    let mut status = 0;
    // SAFETY: waiting for the child we forked; `status` is a valid out-pointer.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        SURVIVED
    }
}

/// Descriptors a child opened before its filter: a device for ioctls, and a socket pair.
struct Held {
    device: File,
    supervisor: (std::os::unix::net::UnixDatagram, std::os::unix::net::UnixDatagram),
}

/// An ioctl on /dev/null (which answers `ENOTTY` to everything): `ALLOWED` if the filter let it through.
fn ioctl_on(device: &File, request: libc::c_ulong) -> i32 {
    let mut arg = [0u64; 8];
    // SAFETY: /dev/null reads nothing of the argument, a live 64-byte buffer for the call.
    let rc = unsafe { libc::ioctl(device.as_raw_fd(), request as _, arg.as_mut_ptr()) };
    assert_eq!((rc, std::io::Error::last_os_error().raw_os_error()), (-1, Some(libc::ENOTTY)));
    ALLOWED
}

fn forbidden_or_allowed(action: &str, existing: PathBuf, evt: Option<EventFd>, held: &Held) -> i32 {
    use transport_xen::xen::ioctl as xen;
    match action {
        // The grant-device calls that name a granting domain, and the one that does not.
        "gntdev-map" => return ioctl_on(&held.device, xen::IOCTL_GNTDEV_MAP_GRANT_REF),
        "gntdev-copy" => return ioctl_on(&held.device, xen::IOCTL_GNTDEV_GRANT_COPY),
        "gntdev-notify" => return ioctl_on(&held.device, xen::IOCTL_GNTDEV_SET_UNMAP_NOTIFY),
        "gntdev-unmap" => return ioctl_on(&held.device, xen::IOCTL_GNTDEV_UNMAP_GRANT_REF),
        // A brokered grant map: a request to the supervisor and its answer.
        "supervisor-call" => {
            let (worker, supervisor) = &held.supervisor;
            worker.send(b"map").expect("send");
            let mut buf = [0u8; 8];
            assert_eq!(supervisor.recv(&mut buf).expect("recv"), 3);
            supervisor.send(b"index").expect("send");
            assert_eq!(worker.recv(&mut buf).expect("recv"), 5);
            return ALLOWED;
        }
        "socket" => {
            // SAFETY: socket(2) with constant arguments; the descriptor (if any) is closed at exit.
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
            return if fd >= 0 { ALLOWED } else { SURVIVED };
        }
        "exec" => {
            let error = std::os::unix::process::CommandExt::exec(&mut Command::new("/bin/true"));
            eprintln!("exec failed: {error}");
        }
        "fork" => {
            // SAFETY: the child, if there were one, exits at once without touching anything.
            if unsafe { libc::fork() } == 0 {
                // SAFETY: _exit is always safe to call.
                unsafe { libc::_exit(0) };
            }
        }
        "mmap-exec" => {
            // SAFETY: an anonymous mapping nobody uses; the call is expected to be refused.
            unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_EXEC,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
        }
        "open" => match File::open(&existing) {
            Err(e) if e.raw_os_error() == Some(libc::EACCES) => return REFUSED,
            Err(e) => panic!("open failed with {e}, not EACCES"),
            Ok(_) => {}
        },
        "create" => {
            let path = std::env::temp_dir().join(format!("blkbackd-sandbox-{}", std::process::id()));
            match OpenOptions::new().write(true).create(true).truncate(true).open(path) {
                Err(e) if e.raw_os_error() == Some(libc::EACCES) => return REFUSED,
                other => panic!("create: {other:?}, not EACCES"),
            }
        }
        "new-ring" => {
            // A ring of its own: refused with EPERM by the vhost-user filter.
            return match io_uring::IoUring::new(4) {
                Err(e) if e.raw_os_error() == Some(libc::EPERM) => REFUSED,
                Err(e) => panic!("io_uring_setup: {e}, not EPERM"),
                Ok(_) => SURVIVED,
            };
        }
        "mmap-far" => {
            // An offset gntdev would cut to 32 bits of pages.
            // SAFETY: a read-only mapping of /dev/null, expected to be refused before it is made.
            unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ,
                    libc::MAP_SHARED,
                    held.device.as_raw_fd(),
                    1 << 44,
                )
            };
        }
        "vfork-thread" => {
            // Without CLONE_VM the kernel refuses it (EINVAL) if the filter lets it through.
            // SAFETY: a clone the kernel refuses, or the filter traps; nothing runs in a new task.
            unsafe { libc::syscall(libc::SYS_clone, libc::CLONE_THREAD | libc::CLONE_VFORK, 0, 0, 0, 0) };
        }
        "fcntl-setsig" => {
            // SAFETY: an fcntl on a descriptor this child holds, expected to be refused.
            // F_SETSIG (10, `<fcntl.h>` with _GNU_SOURCE; not in the libc crate).
            unsafe { libc::fcntl(held.device.as_raw_fd(), 10, libc::SIGCONT) };
        }
        "fcntl-setown" => {
            // SAFETY: as above.
            unsafe { libc::fcntl(held.device.as_raw_fd(), libc::F_SETOWN, libc::getpid()) };
        }
        "self-sigcont" => {
            // SAFETY: SIGCONT to this running thread does nothing, if the filter lets it through.
            unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), libc::gettid(), libc::SIGCONT) };
        }
        "unlink" => {
            // SAFETY: a NUL-terminated path; the call is expected to be refused.
            unsafe { libc::unlinkat(libc::AT_FDCWD, c"/nonexistent-blkbackd".as_ptr(), 0) };
        }
        "serve" => {
            match evt {
                Some(evt) => serve(&evt),
                None => std::thread::Builder::new()
                    .name("worker".into())
                    .spawn(|| {
                        let evt = EventFd::new(EFD_NONBLOCK).expect("eventfd");
                        // What a process does with a disk handed over (`Disk::from_parts`): is it on tmpfs?
                        // SAFETY: an all-zero `statfs` is a valid value of the plain C struct.
                        let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
                        // SAFETY: `fs` is a live, writable `statfs` for the call; the descriptor is open.
                        assert_eq!(unsafe { libc::fstatfs(evt.as_raw_fd(), &mut fs) }, 0, "fstatfs");
                        serve(&evt)
                    })
                    .expect("spawn")
                    .join()
                    .expect("join"),
            }
            return ALLOWED;
        }
        other => panic!("unknown action {other:?}"),
    }
    SURVIVED
}

/// In a confined worker (no filter yet, to see what the confinement alone holds back): files by path, through
/// `open` and through an io_uring ring, and the network are out of reach; the user is 65534 with no capability.
fn confined_reach(existing: &std::path::Path) -> i32 {
    // SAFETY: plain system calls without arguments.
    let (uid, euid, gid) = unsafe { (libc::getuid(), libc::geteuid(), libc::getgid()) };
    assert_eq!((uid, euid, gid), (65534, 65534, 65534), "the worker's user");
    let caps = super::caps::get().expect("capget");
    assert_eq!((caps.effective, caps.permitted), (CapSet::EMPTY, CapSet::EMPTY), "no capability");
    for path in [existing.to_str().expect("UTF-8"), "/etc/passwd", "/dev/xen/xenbus", "/proc/self/status", "/"] {
        match File::open(path) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) && path != "/" => {}
            Ok(_) if path == "/" => {}
            other => panic!("open {path}: {other:?} (the root must be empty)"),
        }
    }
    let dir = std::fs::read_dir("/").expect("the empty root").count();
    assert_eq!(dir, 0, "the root is empty");
    assert!(File::create("/x").is_err(), "the root is read-only");
    // An io_uring ring resolves paths in the same empty root.
    let mut ring = io_uring::IoUring::new(4).expect("io_uring");
    let name = c"/etc/passwd";
    let open = io_uring::opcode::OpenAt::new(io_uring::types::Fd(libc::AT_FDCWD), name.as_ptr()).build();
    // SAFETY: `name` outlives the submission, which completes before this function returns.
    unsafe { ring.submission().push(&open).expect("push") };
    ring.submit_and_wait(1).expect("submit");
    let cqe = ring.completion().next().expect("completion");
    assert_eq!(cqe.result(), -libc::ENOENT, "io_uring OPENAT in the empty root");
    // No network: only an unconfigured loopback exists in the worker's namespace.
    let sock =
        std::net::TcpStream::connect_timeout(&"127.0.0.1:22".parse().expect("addr"), std::time::Duration::from_secs(1));
    let err = sock.expect_err("no network");
    assert_eq!(err.raw_os_error(), Some(libc::ENETUNREACH), "{err}");
    ALLOWED
}

/// What the daemon's threads do after the lock-down: epoll over an eventfd, memory, clocks, hashing, logs.
fn serve(evt: &EventFd) {
    let epoll = Epoll::new().expect("epoll");
    epoll.ctl(ControlOperation::Add, evt.as_raw_fd(), EpollEvent::new(EventSet::IN, 1)).expect("epoll_ctl");
    evt.write(1).expect("write");
    let mut events = [EpollEvent::default(); 1];
    assert_eq!(epoll.wait(1000, &mut events).expect("epoll_wait"), 1);
    let mut map = std::collections::HashMap::new();
    map.insert(std::time::Instant::now(), vec![0u8; 8 << 20]);
    tracing::info!(entries = map.len(), "a log line");
    eprintln!("served");
}

#[test]
fn forbidden_calls_end_the_process_with_sigsys_and_a_line_naming_them() {
    assert_refused("vhost-user socket", libc::SYS_socket, "socket");
    assert_refused("vhost-user exec", libc::SYS_execve, "execve");
    assert_refused("vhost-user mmap-exec", libc::SYS_mmap, "mmap");
    // Opening files is answered EACCES rather than trapped (glibc and std open files lazily and cope).
    for scenario in ["vhost-user open", "xen-guest open", "xen-worker open", "xen-guest create"] {
        let (status, stderr) = in_child(scenario);
        assert_eq!(status.code(), Some(REFUSED), "{scenario}: {status}\n{stderr}");
    }
    // glibc's fork is clone without CLONE_THREAD.
    assert_refused("vhost-user fork", libc::SYS_clone, "clone");
    // Its file keeper removes its files: it may not remove any itself.
    assert_refused("vhost-user unlink", libc::SYS_unlinkat, "unlinkat");
    assert_refused("xen-guest socket", libc::SYS_socket, "socket");
    assert_refused("xen-guest exec", libc::SYS_execve, "execve");
    assert_refused("xen-guest fork", libc::SYS_clone, "clone");
    assert_refused("xen-guest unlink", libc::SYS_unlinkat, "unlinkat");
    let stderr = assert_refused("xen-worker socket", libc::SYS_socket, "socket");
    assert!(stderr.contains("in thread blkif-d9-q0 (tid "), "the worker thread is named:\n{stderr}");
    assert_refused("xen-worker exec", libc::SYS_execve, "execve");
    // What could keep a stop of the worker (to count its grant maps) from completing, or name a registration by
    // an alias of its offset.
    assert_refused("xen-guest mmap-far", libc::SYS_mmap, "mmap");
    assert_refused("xen-guest vfork-thread", libc::SYS_clone, "clone");
    assert_refused("xen-guest self-sigcont", libc::SYS_tgkill, "tgkill");
    assert_refused("vhost-user vfork-thread", libc::SYS_clone, "clone");
    for role in ["xen-guest", "vhost-user"] {
        assert_refused(&format!("{role} fcntl-setsig"), libc::SYS_fcntl, "fcntl");
        assert_refused(&format!("{role} fcntl-setown"), libc::SYS_fcntl, "fcntl");
    }
}

/// Linux's gntdev lets any holder map or copy the grants of any domain that granted to this one: a worker
/// confined with brokered grants (the default) cannot make the calls that name a domain (the supervisor registers
/// its maps, as its guest's), nor send events to other handles' ports on unmap; with `--direct-grants` it can.
#[test]
fn a_worker_cannot_name_another_domain_to_the_grant_device() {
    for role in ["xen-guest", "xen-worker"] {
        assert_refused(&format!("{role} gntdev-map"), libc::SYS_ioctl, "ioctl");
        assert_refused(&format!("{role} gntdev-copy"), libc::SYS_ioctl, "ioctl");
        assert_refused(&format!("{role} gntdev-notify"), libc::SYS_ioctl, "ioctl");
        // Dropping a registration is the supervisor's too: it counts the worker's grant pages by them.
        assert_refused(&format!("{role} gntdev-unmap"), libc::SYS_ioctl, "ioctl");
        let (status, stderr) = in_child(&format!("{role} supervisor-call"));
        assert_eq!(status.code(), Some(ALLOWED), "{role} supervisor-call: {status}\n{stderr}");
        for allowed in ["gntdev-map", "gntdev-copy", "gntdev-unmap"] {
            let (status, stderr) = in_child(&format!("{role}-direct {allowed}"));
            assert_eq!(status.code(), Some(ALLOWED), "{role}-direct {allowed}: {status}\n{stderr}");
        }
    }
}

#[test]
fn a_confined_worker_reaches_no_file_and_no_network() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: confining a worker needs root (namespaces, chroot)");
        return;
    }
    let (status, stderr) = in_child("confined none confined");
    assert_eq!(status.code(), Some(ALLOWED), "{status}\n{stderr}");
}

#[test]
fn what_serving_needs_is_allowed_and_log_mode_allows_everything() {
    for scenario in ["vhost-user serve", "xen-guest serve", "xen-worker serve", "vhost-user log socket"] {
        let (status, stderr) = in_child(scenario);
        assert_eq!(status.code(), Some(ALLOWED), "{scenario}: {status}\n{stderr}");
        assert!(!stderr.contains("forbidden"), "{scenario}:\n{stderr}");
    }
}

/// A temporary disk image, removed on drop.
struct Image(PathBuf);

impl Image {
    fn new_in(dir: &std::path::Path, tag: &str, bytes: u64) -> Image {
        let path = dir.join(format!("blkbackd-sandbox-{}-{tag}.img", std::process::id()));
        File::create(&path).and_then(|f| f.set_len(bytes)).expect("create the image");
        Image(path)
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// `/proc/self/task/<tid>/status` of this process's threads named `name`.
fn thread_status(name: &str) -> Vec<String> {
    let mut found = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").expect("/proc/self/task").flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim_end() == name {
            found.push(std::fs::read_to_string(task.path().join("status")).expect("status"));
        }
    }
    found
}

fn field<'a>(status: &'a str, key: &str) -> &'a str {
    status.lines().find_map(|l| l.strip_prefix(key)).map(str::trim).unwrap_or_else(|| panic!("no {key} in {status}"))
}

#[test]
fn xen_workers_serve_every_request_with_no_capability_under_the_worker_filter() {
    // The last case serves both queues on one I/O thread (`--io-threads 1`, the daemon's default), whose io_uring
    // takes each queue's disk into its file table and out again when the vbd closes, under the worker filter. The
    // image of the fifth is on tmpfs, where small reads (and writes alone on the ring) run inline on the I/O thread.
    let cases = [
        (1u16, GrantMode::Map, true, EngineKind::Auto, false, false),
        (2, GrantMode::Copy, false, EngineKind::Sync, false, false),
        (3, GrantMode::Map, false, EngineKind::Auto, false, false),
        (4, GrantMode::Map, true, EngineKind::Auto, true, false),
        (5, GrantMode::Map, true, EngineKind::Auto, true, true),
    ];
    for (domid, grant_mode, persistent, engine, pooled, on_tmpfs) in cases {
        let dir = if on_tmpfs { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
        let image = Image::new_in(&dir, &domid.to_string(), 8 << 20);
        let host = EmulatedHost::new().expect("emulated host");
        // The emulated host's grants make no system call: the strictest filter serves them.
        let init = xen_worker_init(SeccompMode::Enforce, GrantAccess::Brokered).expect("worker hook");
        let options = {
            let mut o = DataplaneOptions::default();
            o.grant_mode = grant_mode;
            o.worker_init = Some(init);
            o.io_threads = pooled.then(|| IoThreads::new(1));
            o
        };
        let rings = DataplaneServer::new(Arc::new(host.grant_table(0)), host.evtchn_opener(0), engine, options);
        let backend =
            BackendThread::spawn(&host, Arc::new(rings), BackendConfig::default(), Scope::AllDomains).expect("backend");
        let guest = host.add_guest(domid, 1024).expect("guest");
        let toolstack = Toolstack::new(Arc::new(host.xenstore().expect("xenstore")));
        toolstack.add_disk(&DiskSpec::new(domid, image.0.to_str().expect("UTF-8"))).expect("attach");
        let config = BlkfrontConfig { queues: 2, persistent, ring_page_order: 1, ..BlkfrontConfig::default() };
        let mut front = Blkfront::connect(&guest, XVDA, config).expect("connect");
        assert_eq!(front.queue_count(), 2);

        for queue in 0..2 {
            let sector = 1024 * queue as u64;
            let mut data = vec![0u8; 64 << 10];
            fill_pattern(&mut data, sector, domid.into());
            let write = front.request(queue, &IoRequest::Write { sector, data: &data }).expect("write");
            assert_eq!(write.status, RSP_OKAY);
            let barrier = front.request(queue, &IoRequest::Barrier { sector: sector + 512, data: &data[..4096] });
            assert_eq!(barrier.expect("barrier").status, RSP_OKAY);
            assert_eq!(front.request(queue, &IoRequest::Flush).expect("flush").status, RSP_OKAY);
            let discard = front.request(queue, &IoRequest::Discard { sector: sector + 64, sectors: 8, secure: false });
            assert_eq!(discard.expect("discard").status, RSP_OKAY);
            let secure = front.request(queue, &IoRequest::Discard { sector, sectors: 8, secure: true });
            assert_eq!(secure.expect("secure discard").status, RSP_EOPNOTSUPP);
        }
        // A worker runs its hook before it serves: every queue answered, so every worker is sandboxed.
        let names: Vec<String> = if pooled {
            vec!["blkif-io0".into()]
        } else {
            (0..2).map(|queue| format!("blkif-d{domid}-q{queue}")).collect()
        };
        for (queue, name) in names.iter().enumerate() {
            let status = thread_status(name);
            assert_eq!(status.len(), 1, "one worker thread {name}");
            for (key, want) in [("CapEff:", "0000000000000000"), ("CapPrm:", "0000000000000000"), ("Seccomp:", "2")] {
                assert_eq!(field(&status[0], key), want, "queue {queue} {key}\n{}", status[0]);
            }
            assert_eq!(field(&status[0], "NoNewPrivs:"), "1");
        }

        let back = front.read(0, 64 << 10).expect("read");
        assert_eq!(check_pattern(&back[..32 << 10], 0, domid.into()), None, "domain {domid}");
        assert!(back[32 << 10..36 << 10].iter().all(|&b| b == 0), "the discarded range reads as zeroes");
        front.close().expect("close");
        backend.stop().expect("the backend stops");
        assert_eq!(host.live_mappings(), 0, "the sandboxed workers unmapped every grant");
        if !pooled {
            assert!(thread_status(&format!("blkif-d{domid}-q0")).is_empty(), "the workers ended");
        }
    }
}
