// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Least privilege of the real `blkbackd vhost-user` process: with `--user nobody` every thread (the ones started
//! for each connection too) runs as nobody with no capability, `no_new_privs` and the system call filter, while a
//! frontend does every kind of request and reconnects; started unprivileged it sandboxes itself all the same and
//! `--user` is a clear one-line error. Either way it serves from an empty root, in mount and network namespaces
//! of its own (started unprivileged, in a user namespace of its own too), and a file keeper removes its files.
//!
//! The refusal of forbidden calls, with the exact production filters, and the Xen data-plane threads on the
//! emulated host are tested in the daemon's own unit tests (`daemon/src/sandbox/tests.rs`): they need the filters
//! and the worker hook, which are private to the binary.
//!
//! These tests need root (to start the daemon as root and watch it drop to nobody); they say so and pass without.

// Test constants (offsets of a few MiB) are narrowed freely.
#![allow(clippy::cast_possible_truncation)]

mod vhost_user_client;

use std::ffi::CString;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use test_kit::fill_pattern_at;
use test_kit::is_root;
use vhost_user_client::daemon::{blkbackd, PROCESS_TIMEOUT};
use vhost_user_client::{BlkClient, Daemon, Desc, Op, RawClient, Scratch};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_GET_ID};

const DISK: usize = 4 << 20;
const NO_CAPS: &str = "0000000000000000";

/// nobody's uid and primary gid.
fn nobody() -> (libc::uid_t, libc::gid_t) {
    let name = CString::new("nobody").expect("no NUL");
    // SAFETY: a NUL-terminated name; the returned entry is read at once, before any other passwd call.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    assert!(!pw.is_null(), "this system has no user nobody");
    // SAFETY: non-null, so a valid passwd entry.
    unsafe { ((*pw).pw_uid, (*pw).pw_gid) }
}

/// Give `path` to `owner`, so that a daemon running as that user may remove its socket files there.
fn chown(path: &Path, (uid, gid): (libc::uid_t, libc::gid_t)) {
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).expect("chown");
}

/// The `/proc/<pid>/task/<tid>/status` of every thread of `pid`: (thread name, status).
fn threads(pid: libc::pid_t) -> Vec<(String, String)> {
    let dir = format!("/proc/{pid}/task");
    let mut out = Vec::new();
    for task in std::fs::read_dir(&dir).expect("the daemon's tasks").flatten() {
        let (Ok(comm), Ok(status)) =
            (std::fs::read_to_string(task.path().join("comm")), std::fs::read_to_string(task.path().join("status")))
        else {
            continue; // a thread that just ended
        };
        out.push((comm.trim_end().to_string(), status));
    }
    assert!(!out.is_empty(), "no threads in {dir}");
    out
}

fn field<'a>(status: &'a str, key: &str) -> &'a str {
    status.lines().find_map(|l| l.strip_prefix(key)).map(str::trim).unwrap_or_else(|| panic!("no {key} in {status}"))
}

/// Every thread of `pid` runs as `user` (real, effective, saved and file-system ids) with no capability at all,
/// `no_new_privs` and the filter; returns the thread names.
fn assert_sandboxed(pid: libc::pid_t, user: Option<(libc::uid_t, libc::gid_t)>) -> Vec<String> {
    let all = threads(pid);
    for (name, status) in &all {
        let context = format!("thread {name}:\n{status}");
        if let Some((uid, gid)) = user {
            let ids: Vec<&str> = field(status, "Uid:").split_whitespace().collect();
            assert_eq!(ids, vec![uid.to_string(); 4], "{context}");
            let ids: Vec<&str> = field(status, "Gid:").split_whitespace().collect();
            assert_eq!(ids, vec![gid.to_string(); 4], "{context}");
            assert_eq!(field(status, "Groups:"), gid.to_string(), "{context}");
        }
        for key in ["CapInh:", "CapPrm:", "CapEff:", "CapAmb:"] {
            assert_eq!(field(status, key), NO_CAPS, "{key} {context}");
        }
        if user.is_some() {
            assert_eq!(field(status, "CapBnd:"), NO_CAPS, "started as root, the bounding set is emptied: {context}");
        }
        assert_eq!(field(status, "NoNewPrivs:"), "1", "{context}");
        assert_eq!(field(status, "Seccomp:"), "2", "{context}");
    }
    all.into_iter().map(|(name, _)| name).collect()
}

/// The namespace `kind` (`mnt`, `net`, `user`) of process `pid`, as the kernel names it (`mnt:[4026531841]`).
fn namespace(pid: &str, kind: &str) -> String {
    let link = std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).expect("read the namespace link");
    link.to_string_lossy().into_owned()
}

/// `pid` serves from an empty root in mount and network namespaces of its own (and a user namespace of its own
/// if `own_user_namespace`), and its file keeper runs as `user` with no capability under its own filter.
fn assert_isolated(pid: libc::pid_t, own_user_namespace: bool, user: (libc::uid_t, libc::gid_t)) {
    let pid_text = pid.to_string();
    for kind in ["mnt", "net"] {
        assert_ne!(namespace(&pid_text, kind), namespace("self", kind), "{kind} namespace of its own");
    }
    assert_eq!(namespace(&pid_text, "user") != namespace("self", "user"), own_user_namespace, "user namespace");
    let root: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/root")).expect("its root").flatten().collect();
    assert!(root.is_empty(), "its root is empty: {root:?}");
    // Its file keeper: a child of its own, which holds nothing but its side of the pair.
    let keeper = std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("status")).ok().map(|s| (e.path(), s)))
        .find(|(_, status)| field(status, "PPid:") == pid_text && field(status, "Name:") == "blkbackd-keep");
    let (path, status) = keeper.unwrap_or_else(|| panic!("no file keeper among the children of {pid}"));
    let ids: Vec<&str> = field(&status, "Uid:").split_whitespace().collect();
    assert_eq!(ids, vec![user.0.to_string(); 4], "the keeper's user:\n{status}");
    for key in ["CapInh:", "CapPrm:", "CapEff:", "CapAmb:"] {
        assert_eq!(field(&status, key), NO_CAPS, "the keeper's {key}\n{status}");
    }
    assert_eq!(field(&status, "NoNewPrivs:"), "1", "the keeper:\n{status}");
    assert_eq!(field(&status, "Seccomp:"), "2", "the keeper:\n{status}");
    let fds = std::fs::read_dir(path.join("fd")).expect("the keeper's descriptors").count();
    assert_eq!(fds, 2, "the keeper holds stderr and its side of the pair");
}

/// Every request type of virtio-blk on two queues: writes, reads, flush, discard, write-zeroes.
fn every_request(client: &mut BlkClient) {
    let block = 64 << 10;
    for i in 0..8 {
        fill_pattern_at(i as u64, (i * block) as u64, client.mem.bytes_mut(i * block..(i + 1) * block));
    }
    let writes: Vec<Op> = (0..8).map(|i| Op::Write { offset: (i * block) as u64, at: i * block, len: block }).collect();
    assert_eq!(client.run(&writes, 8), vec![0; 8], "writes");
    assert_eq!(client.run_one(Op::Flush), 0, "flush");
    let reads: Vec<Op> =
        (0..8).map(|i| Op::Read { offset: (i * block) as u64, at: (8 + i) * block, len: block }).collect();
    assert_eq!(client.run(&reads, 8), vec![0; 8], "reads");
    assert!(client.mem.bytes(8 * block..16 * block) == client.mem.bytes(0..8 * block), "reads return the writes");
    assert_eq!(client.run_one(Op::Discard { offset: 0, len: 4096 }), 0, "discard");
    assert_eq!(client.run_one(Op::WriteZeroes { offset: 4096, len: 4096, unmap: false }), 0, "write zeroes");
    assert_eq!(client.run_one(Op::WriteZeroes { offset: 8192, len: 4096, unmap: true }), 0, "write zeroes, unmap");
    assert_eq!(client.run_one(Op::Read { offset: 0, at: 16 * block, len: 12288 }), 0);
    assert!(client.mem.bytes(16 * block..16 * block + 12288).iter().all(|&b| b == 0), "zeroed ranges read as zeroes");
}

#[test]
fn vhost_user_runs_as_nobody_with_no_capability_under_the_filter_across_reconnects() {
    if !is_root() {
        eprintln!("skipping: needs root (to start blkbackd as root and watch it drop to nobody)");
        return;
    }
    let user = nobody();
    let scratch = Scratch::new(DISK, 0);
    chown(scratch.dir.path(), user);
    let control = scratch.dir.path().join("ctl.sock");
    let control_arg = control.to_str().expect("UTF-8");
    let extra = ["--user", "nobody", "--seccomp", "enforce", "--queues", "2", "--control", control_arg];
    let mut daemon = Daemon::start(&scratch.socket, &scratch.disk, &extra);
    let pid = daemon.pid();
    // A new thread carries its parent's name until it runs and names itself: let the idle threads settle.
    let named = |names: &[(String, String)]| ["signals", "control"].iter().all(|t| names.iter().any(|(n, _)| n == t));
    let deadline = std::time::Instant::now() + PROCESS_TIMEOUT;
    while !named(&threads(pid)) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let idle = assert_sandboxed(pid, Some(user));
    assert!(idle.iter().any(|n| n == "signals") && idle.iter().any(|n| n == "control"), "{idle:?}");
    assert_isolated(pid, false, user);

    // First frontend: every request type on two queues; its threads are sandboxed too.
    let mut client = BlkClient::connect(&scratch.socket, 2, 128, true, 32 * (64 << 10)).expect("connect");
    every_request(&mut client);
    let serving = assert_sandboxed(pid, Some(user));
    assert!(serving.len() > idle.len(), "a connection starts threads: {idle:?} -> {serving:?}");
    drop(client);

    // Reconnect: GET_ID on a fresh connection, then a third one that reads what the first wrote.
    let mut raw = RawClient::connect(&scratch.socket, 4096).expect("reconnect");
    let get_id = [Desc::Header { len: 16, writable: false }, Desc::Id, Desc::Status { len: 1, writable: true }];
    let answer = raw.submit(VIRTIO_BLK_T_GET_ID, 0, None, &get_id);
    assert_eq!(answer.status, VIRTIO_BLK_S_OK as u8, "GET_ID");
    assert_eq!(&answer.id[..9], b"disk.img\0");
    drop(raw);
    let mut client = BlkClient::connect(&scratch.socket, 2, 128, false, 1 << 20).expect("connect again");
    // Blocks 1 to 7 of the first session's writes (block 0 was discarded and zeroed since).
    let (block, len) = (64 << 10, 7 * (64 << 10));
    assert_eq!(client.run_one(Op::Read { offset: block as u64, at: 0, len }), 0);
    let mut expected = vec![0u8; len];
    for (i, chunk) in expected.chunks_mut(block).enumerate() {
        fill_pattern_at((i + 1) as u64, ((i + 1) * block) as u64, chunk);
    }
    assert!(client.mem.bytes(0..len) == &expected[..], "the data survived the reconnects");
    assert_sandboxed(pid, Some(user));

    // The control socket answers from its sandboxed thread.
    let stats = Command::new(blkbackd()).args(["stats", "--control", control_arg]).output().expect("blkbackd stats");
    assert!(stats.status.success(), "{}", String::from_utf8_lossy(&stats.stderr));
    assert!(String::from_utf8_lossy(&stats.stdout).contains("[transport=vhost-user queue=1]"));
    drop(client);

    daemon.signal(libc::SIGTERM);
    let status = daemon.wait(PROCESS_TIMEOUT);
    let log = daemon.stderr();
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(log.contains("privileges dropped") && log.contains("system call filter installed"), "{log}");
    assert!(!log.contains("forbidden system call"), "{log}");
    assert!(!scratch.socket.exists() && !control.exists(), "nobody removed its socket files:\n{log}");
}

#[test]
fn started_unprivileged_it_still_sandboxes_itself_and_user_is_a_one_line_error() {
    if !is_root() {
        eprintln!("skipping: needs root (to start blkbackd as another user)");
        return;
    }
    let user = nobody();
    let scratch = Scratch::new(1 << 20, 0);
    chown(scratch.dir.path(), user);
    chown(&scratch.disk, user);
    let args = |extra: &[&str]| {
        let mut args = vec!["vhost-user", "--socket", scratch.socket.to_str().expect("UTF-8")];
        args.extend(["--disk", scratch.disk.to_str().expect("UTF-8")]);
        args.extend(extra);
        args.into_iter().map(String::from).collect::<Vec<_>>()
    };

    let out = Command::new(blkbackd())
        .args(args(&["--user", "nobody"]))
        .uid(user.0)
        .gid(user.1)
        .stdin(Stdio::null())
        .output()
        .expect("run blkbackd as nobody");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(last.starts_with("blkbackd: error: cannot switch to user nobody"), "{stderr}");
    assert!(last.contains("needs blkbackd started as root"), "{stderr}");
    assert!(!scratch.socket.exists(), "the socket file it bound is removed on that error too");

    // Without --user it serves, with no capability, no_new_privs and the filter.
    let mut child = Command::new(blkbackd())
        .args(args(&[]))
        .uid(user.0)
        .gid(user.1)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start blkbackd as nobody");
    let pid = libc::pid_t::try_from(child.id()).expect("pid fits");
    let deadline = std::time::Instant::now() + PROCESS_TIMEOUT;
    while !(scratch.socket.exists() && threads(pid).iter().any(|(name, _)| name == "signals")) {
        assert!(child.try_wait().expect("try_wait").is_none(), "blkbackd exited before listening");
        assert!(std::time::Instant::now() < deadline, "blkbackd did not listen within {PROCESS_TIMEOUT:?}");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_sandboxed(pid, None);
    // Without CAP_SYS_ADMIN it isolates itself in a user namespace of its own.
    assert_isolated(pid, true, user);
    let mut client = BlkClient::connect(&scratch.socket, 1, 64, false, 64 << 10).expect("connect");
    assert_eq!(client.run_one(Op::Write { offset: 0, at: 0, len: 4096 }), 0);
    assert_eq!(client.run_one(Op::Flush), 0);
    drop(client);
    // SAFETY: kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    assert_eq!(child.wait().expect("wait").code(), Some(0));
    assert!(!scratch.socket.exists(), "its keeper removed the socket file");
}
