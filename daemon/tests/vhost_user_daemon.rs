// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The `blkbackd vhost-user` process: graceful shutdown on SIGTERM/SIGINT (socket removed, in-flight requests
//! answered), one-line setup errors with exit code 1 (usage errors: exit code 2), the socket file's life, and the
//! diskseq pin on real loop devices.

// Test constants (status codes, offsets of a few MiB) are narrowed freely.
#![allow(clippy::cast_possible_truncation)]

mod vhost_user_client;

use std::os::unix::net::UnixListener;
use std::path::Path;

use test_kit::fill_pattern_at;
use test_kit::LoopDevice;
use vhost_user_client::daemon::PROCESS_TIMEOUT;
use vhost_user_client::{BlkClient, Daemon, Op, Scratch};

const DISK: usize = 1 << 20;

/// The setup error line: exactly one `blkbackd: error:` line, and it is the last line.
fn error_line(stderr: &str) -> &str {
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("blkbackd: error: ")).collect();
    assert_eq!(errors.len(), 1, "one error line expected:\n{stderr}");
    assert_eq!(stderr.lines().last(), Some(errors[0]), "the error line comes last:\n{stderr}");
    errors[0]
}

fn vhost_user_args<'a>(socket: &'a Path, disk: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args =
        vec!["vhost-user", "--socket", socket.to_str().expect("UTF-8"), "--disk", disk.to_str().expect("UTF-8")];
    args.extend_from_slice(extra);
    args
}

#[test]
fn sigterm_and_sigint_stop_an_idle_daemon_and_remove_its_socket() {
    for signal in [libc::SIGTERM, libc::SIGINT] {
        let scratch = Scratch::new(DISK, 0);
        let mut daemon = Daemon::start(&scratch.socket, &scratch.disk, &[]);
        daemon.signal(signal);
        let status = daemon.wait(PROCESS_TIMEOUT);
        assert_eq!(status.code(), Some(0), "signal {signal}:\n{}", daemon.stderr());
        assert!(!scratch.socket.exists(), "the socket file is removed");
    }
}

#[test]
fn sigterm_with_a_frontend_connected_answers_in_flight_requests_and_exits() {
    let scratch = Scratch::new(8 * DISK, 0);
    let mut daemon = Daemon::start(&scratch.socket, &scratch.disk, &["--queues", "2"]);
    let mut client = BlkClient::connect(&scratch.socket, 1, 256, true, 8 * DISK).expect("connect");
    assert_eq!(client.run_one(Op::Flush), 0);
    let ops: Vec<Op> = (0..64usize)
        .map(|i| Op::Write { offset: (i * (128 << 10)) as u64, at: i * (128 << 10), len: 128 << 10 })
        .collect();
    for (i, _) in ops.iter().enumerate() {
        fill_pattern_at(i as u64, 0, client.mem.bytes_mut(i * (128 << 10)..(i + 1) * (128 << 10)));
    }
    assert_eq!(client.start(&ops), 64);
    // The worker takes every available chain in one batch, so once one has completed all 64 were taken.
    client.wait_for_completion();
    daemon.signal(libc::SIGTERM);
    let status = daemon.wait(PROCESS_TIMEOUT);
    assert_eq!(status.code(), Some(0), "{}", daemon.stderr());
    assert!(!scratch.socket.exists(), "the socket file is removed");
    let log = daemon.stderr();
    assert!(log.contains("frontend disconnected") && log.contains("stopped"), "{log}");
    let mut answered = client.reap();
    answered.sort_unstable();
    assert_eq!(answered, (0..64).map(|i| (i, 0)).collect::<Vec<_>>(), "every request taken was answered");
    let image = std::fs::read(&scratch.disk).expect("image");
    assert!(image == client.mem.bytes(0..8 * DISK), "every answered write is on disk");
}

#[test]
fn setup_errors_exit_1_with_one_line() {
    let scratch = Scratch::new(DISK, 0);
    let missing = scratch.dir.path().join("missing.img");

    let (status, stderr) = Daemon::run_to_exit(&vhost_user_args(&scratch.socket, &missing, &[]));
    assert_eq!(status.code(), Some(1), "{stderr}");
    let line = error_line(&stderr);
    assert!(line.contains("missing.img") && line.contains("No such file"), "{line}");

    let (status, stderr) = Daemon::run_to_exit(&vhost_user_args(&scratch.socket, &scratch.disk, &["--diskseq", "7"]));
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(error_line(&stderr).contains("regular file"), "{stderr}");

    // Usage errors are clap's whole message and exit code 2 (tests/cli.rs checks their text).
    let (status, stderr) =
        Daemon::run_to_exit(&vhost_user_args(&scratch.socket, &scratch.disk, &["--diskseq", "seven"]));
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.starts_with("error: invalid value 'seven' for '--diskseq <N>'"), "{stderr}");

    let (status, stderr) =
        Daemon::run_to_exit(&vhost_user_args(&scratch.socket, &scratch.disk, &["--queue-size", "100"]));
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("'100' for '--queue-size <N>'"), "{stderr}");

    let (status, stderr) =
        Daemon::run_to_exit(&vhost_user_args(&scratch.socket, &scratch.disk, &["--serial", "123456789012345678901"]));
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(error_line(&stderr).contains("20 bytes"), "{stderr}");
    assert!(!scratch.socket.exists(), "no socket is left behind by a failed start");
}

#[test]
fn a_socket_in_use_is_refused_and_a_stale_one_replaced() {
    let scratch = Scratch::new(DISK, 0);
    let live = UnixListener::bind(&scratch.socket).expect("a live listener");
    let (status, stderr) = Daemon::run_to_exit(&vhost_user_args(&scratch.socket, &scratch.disk, &[]));
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(error_line(&stderr).contains("in use"), "{stderr}");
    assert!(scratch.socket.exists(), "someone else's socket is left alone");
    drop(live); // the file stays, nobody listens: stale

    let mut daemon = Daemon::start(&scratch.socket, &scratch.disk, &[]);
    let mut client = BlkClient::connect(&scratch.socket, 1, 16, false, 4096).expect("connect");
    assert_eq!(client.run_one(Op::Read { offset: 0, at: 0, len: 4096 }), 0);
    drop(client);
    daemon.signal(libc::SIGTERM);
    assert_eq!(daemon.wait(PROCESS_TIMEOUT).code(), Some(0));

    let not_a_socket = scratch.dir.path().join("plain-file");
    std::fs::write(&not_a_socket, b"keep me").expect("write");
    let (status, stderr) = Daemon::run_to_exit(&vhost_user_args(&not_a_socket, &scratch.disk, &[]));
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(error_line(&stderr).contains("not a socket"), "{stderr}");
    assert_eq!(std::fs::read(&not_a_socket).expect("read"), b"keep me");
}

#[test]
fn the_diskseq_pin_serves_the_right_loop_device_and_refuses_another() {
    let scratch = Scratch::new(DISK, 0x3c);
    let Some(_lock) = test_kit::loop_devices() else { return };
    let device = LoopDevice::attach(&scratch.disk).expect("losetup");
    let seq = device.diskseq();
    let dev = device.path.as_path();

    let hex = format!("{seq:#x}");
    let mut daemon = Daemon::start(&scratch.socket, dev, &["--diskseq", &hex]);
    let mut client = BlkClient::connect(&scratch.socket, 1, 16, false, 4096).expect("connect");
    assert_eq!(u64::from(client.config().capacity), (DISK / 512) as u64);
    assert_eq!(client.run_one(Op::Read { offset: 0, at: 0, len: 4096 }), 0);
    assert!(client.mem.bytes(0..4096).iter().all(|&b| b == 0x3c));
    drop(client);
    daemon.signal(libc::SIGTERM);
    assert_eq!(daemon.wait(PROCESS_TIMEOUT).code(), Some(0));

    let wrong = (seq + 1000).to_string();
    let (status, stderr) = Daemon::run_to_exit(&vhost_user_args(&scratch.socket, dev, &["--diskseq", &wrong]));
    assert_eq!(status.code(), Some(1), "{stderr}");
    let line = error_line(&stderr);
    assert!(line.contains(&wrong) && line.contains(&seq.to_string()), "names both numbers: {line}");
}
