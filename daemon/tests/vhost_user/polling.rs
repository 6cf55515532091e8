// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Adaptive polling (`blkbackd vhost-user --poll-us N`) beyond the data round trips of `vhost_user.rs`: an idle
//! polling daemon sleeps (a resource bound, not a timing assertion: it would fail by burning a core), and a
//! frontend that leaves while the daemon polls does not take the daemon with it.

use crate::vhost_user_client;

use std::time::{Duration, Instant};

use test_kit::fill_pattern_at;
use vhost_user_client::{BlkClient, Daemon, Op, Scratch};

const DISK: usize = 1 << 20;

/// CPU time (user + system, all threads) the process has used, from `/proc/PID/stat`.
fn cpu_time(pid: libc::pid_t) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/PID/stat");
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let fields: Vec<&str> = stat.rsplit_once(')').expect("stat format").1.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    // SAFETY: sysconf has no preconditions.
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).unwrap_or(100).max(1);
    Duration::from_millis(ticks * 1000 / hz)
}

/// Write and read back a few requests, so that every queue has polled at least once.
fn exercise(client: &mut BlkClient, seed: u64) {
    let len = 64 << 10;
    fill_pattern_at(seed, 0, client.mem.bytes_mut(0..len));
    let ops: Vec<Op> = (0..16)
        .map(|i| Op::Write { offset: (i * 4096) as u64, at: i * 4096, len: 4096 })
        .chain((0..16).map(|i| Op::Read { offset: (i * 4096) as u64, at: len + i * 4096, len: 4096 }))
        .collect();
    let results = client.run(&ops[..16], 4);
    assert!(results.iter().all(|&r| r == 0), "writes: {results:?}");
    let results = client.run(&ops[16..], 4);
    assert!(results.iter().all(|&r| r == 0), "reads: {results:?}");
    assert!(client.mem.bytes(0..len) == client.mem.bytes(len..2 * len), "read back what was written");
}

#[test]
fn an_idle_polling_daemon_sleeps() {
    let scratch = Scratch::new(DISK, 0);
    let daemon = Daemon::start(&scratch.socket, &scratch.disk, &["--queues", "2", "--poll-us", "1000"]);
    let mut client = BlkClient::connect(&scratch.socket, 2, 64, true, 256 << 10).expect("connect");
    exercise(&mut client, 7);
    // Connected and idle (as a guest that does no I/O): after at most 1 ms of polling per queue, both sleep.
    std::thread::sleep(Duration::from_millis(100));
    let (t0, cpu0) = (Instant::now(), cpu_time(daemon.pid()));
    std::thread::sleep(Duration::from_millis(1500));
    let (wall, cpu) = (t0.elapsed(), cpu_time(daemon.pid()).saturating_sub(cpu0));
    assert!(
        cpu.as_secs_f64() < 0.05 * wall.as_secs_f64(),
        "an idle daemon with --poll-us used {cpu:?} of CPU in {wall:?} (bound: 5 %)"
    );
    // And it still answers at once when the guest comes back.
    exercise(&mut client, 8);
}

#[test]
fn frontends_leaving_while_the_daemon_polls_do_not_end_it() {
    let scratch = Scratch::new(4 * DISK, 0);
    let mut daemon = Daemon::start(&scratch.socket, &scratch.disk, &["--poll-us", "100000"]);
    for round in 0..3u64 {
        let mut client = BlkClient::connect(&scratch.socket, 1, 256, round % 2 == 0, 4 * DISK).expect("connect");
        exercise(&mut client, round);
        fill_pattern_at(round, 0, client.mem.bytes_mut(0..4 * DISK));
        let ops: Vec<Op> = (0..64usize)
            .map(|i| Op::Write { offset: (i as u64) * (64 << 10), at: i * (64 << 10), len: 64 << 10 })
            .collect();
        assert_eq!(client.start(&ops), 64);
        // Gone without waiting, while the queue polls (for up to 100 ms after its last work).
    }
    let mut client = BlkClient::connect(&scratch.socket, 1, 64, false, 256 << 10).expect("connect after the storm");
    exercise(&mut client, 99);
    assert!(daemon.is_running());
}
