// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The hostile Xen frontends of transport-xen's suite (`test_kit::xen_hostile`), played against a
//! Xen backend on the emulated host in this process, while a `blkbackd vhost-user` process serves another guest
//! next to it: after every case that guest still reads back what it wrote, the other process is still running, and
//! its CPU stayed bounded; a second vbd of the Xen backend keeps working too.

// Test sizes (a few MiB) are narrowed freely.
#![allow(clippy::cast_possible_truncation)]

mod vhost_user_client;

use std::time::Instant;

use test_kit::fill_pattern_at;
use test_kit::xen_hostile::{cases, run_cases, task_cpu, HostileBed, CPU_SLACK};
use transport_xen::frontend::load::{check_pattern, fill_pattern};
use transport_xen::frontend::{Blkfront, BlkfrontConfig, XVDA};
use vhost_user_client::{BlkClient, Daemon, Op, Scratch};

const DISK: usize = 4 << 20;
const CHUNK: usize = 64 << 10;

#[test]
fn hostile_xen_frontends_leave_another_process_and_another_vbd_serving() {
    let scratch = Scratch::new(DISK, 0);
    let mut daemon = Daemon::start(&scratch.socket, &scratch.disk, &["--queues", "2"]);
    let mut vhost = BlkClient::connect(&scratch.socket, 2, 128, true, 2 * CHUNK).expect("connect the vhost client");
    let tasks = format!("/proc/{}/task", daemon.pid());
    let (daemon_cpu0, t0) = (task_cpu(&tasks, |_| true), Instant::now());

    let mut bed = HostileBed::new();
    let xen_guest = bed.guest(3, 512);
    bed.add_disk(3);
    let mut xen = Blkfront::connect(&xen_guest, XVDA, BlkfrontConfig::default()).expect("the second vbd connects");
    let mut round = 0u64;
    let mut check = |case: &str| {
        round += 1;
        // The guest of the other process: write a fresh pattern at a new place, read it back.
        let offset = (round as usize * CHUNK) % DISK;
        fill_pattern_at(round, offset as u64, vhost.mem.bytes_mut(0..CHUNK));
        vhost.mem.bytes_mut(CHUNK..2 * CHUNK).fill(0);
        let results = vhost.run(&[Op::Write { offset: offset as u64, at: 0, len: CHUNK }, Op::Flush], 1);
        assert_eq!(results, vec![0, 0], "after {case}: the other process's guest writes");
        assert_eq!(vhost.run_one(Op::Read { offset: offset as u64, at: CHUNK, len: CHUNK }), 0, "after {case}");
        assert!(vhost.mem.bytes(0..CHUNK) == vhost.mem.bytes(CHUNK..2 * CHUNK), "after {case}: read back differs");
        assert!(daemon.is_running(), "after {case}: blkbackd exited:\n{}", daemon.stderr());
        // The second vbd of the Xen backend process.
        let mut data = vec![0u8; 8192];
        fill_pattern(&mut data, 16, round as u32);
        xen.write(16, &data).unwrap_or_else(|e| panic!("after {case}: second vbd write: {e}"));
        let back = xen.read(16, data.len()).unwrap_or_else(|e| panic!("after {case}: second vbd read: {e}"));
        assert_eq!(check_pattern(&back, 16, round as u32), None, "after {case}");
    };
    let report = run_cases(&bed, 200, &mut check);
    assert_eq!(report.len(), cases().len());

    let (daemon_cpu, wall) = (task_cpu(&tasks, |_| true) - daemon_cpu0, t0.elapsed());
    assert!(daemon_cpu <= wall / 2 + CPU_SLACK, "blkbackd used {daemon_cpu:?} of CPU in {wall:?}");
    for (name, outcome) in &report {
        eprintln!("{name}: {outcome}");
    }
    xen.close().expect("the second vbd closes cleanly");
    bed.stop_backend();
    drop(vhost);
    daemon.signal(libc::SIGTERM);
    let status = daemon.wait(vhost_user_client::daemon::PROCESS_TIMEOUT);
    assert_eq!(status.code(), Some(0), "{}", daemon.stderr());
}
