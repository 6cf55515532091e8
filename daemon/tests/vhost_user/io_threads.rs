// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `blkbackd vhost-user --io-threads N`: fewer I/O threads than queues serve every queue (data verified, each
//! queue's own counters), the process has exactly N I/O threads (named `blkbackd-io<n>`), and a count out of range
//! is a usage error (exit code 2, clap's message).

use crate::vhost_user_client;

use std::process::Command;
use std::time::Instant;

use test_kit::fill_pattern_at;
use vhost_user_client::daemon::blkbackd;
use vhost_user_client::{BlkClient, Daemon, Op, Scratch, IO_TIMEOUT};

const DISK: usize = 1 << 20;
const BLOCK: usize = 16 << 10;

/// The kernel's flag of io_uring's own worker threads (`PF_IO_WORKER`): they show their creator's name until they
/// rename themselves, so a count of names must skip them.
const PF_IO_WORKER: u64 = 0x10;

/// The names of the threads of `pid` (`/proc/PID/task/*/comm`), io_uring's workers left out.
fn thread_names(pid: libc::pid_t) -> Vec<String> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task")).expect("/proc/PID/task") {
        let task = entry.expect("task entry").path();
        // A thread may end between the listing and the reads.
        let (Ok(name), Ok(stat)) =
            (std::fs::read_to_string(task.join("comm")), std::fs::read_to_string(task.join("stat")))
        else {
            continue;
        };
        // `stat`: "tid (comm) state ppid pgrp session tty_nr tpgid flags ..."; comm may hold spaces and parentheses.
        let flags = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(6)?.parse::<u64>().ok());
        if flags.is_some_and(|f| f & PF_IO_WORKER == 0) {
            names.push(name.trim_end().to_string());
        }
    }
    names.sort();
    names
}

/// The I/O threads of `pid`, once there are `expected` of them (each names itself as it starts serving; waits
/// for that, failing after [`IO_TIMEOUT`]).
fn io_threads(pid: libc::pid_t, expected: usize) -> Vec<String> {
    let start = Instant::now();
    loop {
        let io: Vec<String> = thread_names(pid).into_iter().filter(|n| n.starts_with("blkbackd-io")).collect();
        if io.len() >= expected || start.elapsed() > IO_TIMEOUT {
            return io;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Write a pattern over the whole disk and read it back, spread over all `queues` of a `--io-threads threads`
/// daemon; check the data, each queue's counters and the I/O threads.
fn serve(queues: usize, threads: usize) {
    let scratch = Scratch::new(DISK, 0);
    let control = scratch.dir.path().join("ctl.sock");
    let control_arg = control.to_str().expect("UTF-8");
    let (q, t) = (queues.to_string(), threads.to_string());
    let daemon =
        Daemon::start(&scratch.socket, &scratch.disk, &["--queues", &q, "--io-threads", &t, "--control", control_arg]);
    let mut client = BlkClient::connect(&scratch.socket, queues, 128, true, 2 * DISK).expect("connect");
    fill_pattern_at(11, 0, client.mem.bytes_mut(0..DISK));
    // The client spreads requests round-robin over its queues: each queue gets DISK / BLOCK / queues of each kind.
    let writes: Vec<Op> =
        (0..DISK / BLOCK).map(|i| Op::Write { offset: (i * BLOCK) as u64, at: i * BLOCK, len: BLOCK }).collect();
    assert!(client.run(&writes, 16).iter().all(|&r| r == 0), "{queues} queues, {threads} threads: writes");
    let reads: Vec<Op> =
        (0..DISK / BLOCK).map(|i| Op::Read { offset: (i * BLOCK) as u64, at: DISK + i * BLOCK, len: BLOCK }).collect();
    assert!(client.run(&reads, 16).iter().all(|&r| r == 0), "{queues} queues, {threads} threads: reads");
    assert!(client.mem.bytes(DISK..2 * DISK) == client.mem.bytes(0..DISK), "the data read back differs");

    let io = io_threads(daemon.pid(), threads);
    let expected: Vec<String> = (0..threads).map(|n| format!("blkbackd-io{n}")).collect();
    assert_eq!(io, expected, "{queues} queues, {threads} threads: the I/O threads");
    let all = thread_names(daemon.pid());
    assert!(!all.iter().any(|n| n == "vring_worker"), "every vring worker is an I/O thread: {all:?}");

    let out = Command::new(blkbackd()).args(["stats", "--control", control_arg]).output().expect("blkbackd stats");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let blocks = DISK / BLOCK;
    for queue in 0..queues {
        let share = (blocks + queues - 1 - queue) / queues * BLOCK;
        let section = text
            .split("[transport=vhost-user ")
            .find(|s| s.starts_with(&format!("queue={queue}]")))
            .unwrap_or_else(|| panic!("no counters for queue {queue}:\n{text}"));
        assert!(
            section.contains(&format!("bytes_read {share} ")) && section.contains(&format!("bytes_written {share} ")),
            "queue {queue} served its share ({share} bytes each way):\n{section}"
        );
    }
    drop(client);
}

#[test]
fn two_io_threads_serve_four_queues() {
    serve(4, 2);
}

#[test]
fn one_io_thread_serves_three_queues_and_four_threads_four() {
    serve(3, 1);
    serve(4, 4);
}

#[test]
fn an_io_thread_count_out_of_range_is_a_usage_error() {
    let scratch = Scratch::new(DISK, 0);
    let socket = scratch.socket.to_str().expect("UTF-8");
    let disk = scratch.disk.to_str().expect("UTF-8");
    for (extra, message) in [
        (&["--io-threads", "0"][..], "invalid value '0' for '--io-threads <N>'"),
        (&["--io-threads", "65"], "invalid value '65' for '--io-threads <N>'"),
        (
            &["--io-threads", "3", "--queues", "2"],
            "invalid value '3' for '--io-threads <N>': more I/O threads than queues (2)",
        ),
        (&["--io-threads", "2"], "invalid value '2' for '--io-threads <N>': more I/O threads than queues (1)"),
    ] {
        let mut args = vec!["vhost-user", "--socket", socket, "--disk", disk];
        args.extend_from_slice(extra);
        let (status, stderr) = Daemon::run_to_exit(&args);
        assert_eq!(status.code(), Some(2), "{extra:?}: {stderr}");
        assert!(stderr.starts_with(&format!("error: {message}")), "{extra:?}: {stderr}");
        assert!(!scratch.socket.exists(), "{extra:?}: nothing was served");
    }
}
