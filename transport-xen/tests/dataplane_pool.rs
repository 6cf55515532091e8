// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The I/O thread pool (`DataplaneOptions::io_threads`): several rings of several data planes on few threads,
//! each ring served (verified data through every queue of every vbd), a halted ring and an event storm on a
//! shared thread do not stop the others, and stopping releases everything while the other rings go on. The
//! rings of a thread share its io_uring, whatever their disks, and a stopped vbd's disk leaves its file table.

mod dataplane_util;

use std::time::{Duration, Instant};

use dataplane_util::{pattern, Bed, BedConfig, Shape, TIMEOUT};
use transport_xen::blkif::{RSP_OKAY, X86_32, X86_64};
use transport_xen::dataplane::{DataplaneOptions, IoThreads, QueueStats};

fn pooled(pool: &IoThreads, queues: usize) -> BedConfig {
    let options = {
        let mut o = DataplaneOptions::default();
        o.io_threads = Some(pool.clone());
        o
    };
    BedConfig { queues, options, ..BedConfig::default() }
}

/// Whether any io_uring of this process has `path` in its registered file table (its `fdinfo` lists them).
fn in_an_io_uring_file_table(path: &std::path::Path) -> bool {
    let needle = path.to_string_lossy().into_owned();
    std::fs::read_dir("/proc/self/fdinfo").expect("fdinfo").flatten().any(|e| {
        std::fs::read_to_string(e.path()).is_ok_and(|info| info.contains("UserFiles") && info.contains(&needle))
    })
}

/// Write a pattern through queue `q` at `sector` and read it back.
fn write_and_read(bed: &mut Bed<X86_64>, q: usize, sector: u64, seed: u64) {
    let data = pattern(8192, seed);
    let (statuses, _) = bed.transfer(q, Some(&data), sector, 16, Shape::Direct);
    assert_eq!(statuses, [RSP_OKAY], "write through queue {q}");
    let (statuses, back) = bed.transfer(q, None, sector, 16, Shape::Direct);
    assert_eq!(statuses, [RSP_OKAY], "read through queue {q}");
    assert!(back == data, "queue {q} read other data than it wrote");
    assert_eq!(bed.file_bytes(sector * 512, data.len()), data, "queue {q}: the file has the data");
}

#[test]
fn several_vbds_and_queues_share_a_bounded_set_of_threads() {
    let pool = IoThreads::new(2);
    let mut beds: Vec<Bed<X86_64>> = (0..3).map(|_| Bed::new(pooled(&pool, 2))).collect();
    // Six rings on two threads, the least-loaded thread taking each new ring.
    assert_eq!(pool.rings_per_thread(), [3, 3]);
    for bed in &beds {
        assert_eq!(bed.dp().engine(), "io_uring (shared)", "each queue is a lane of its thread's io_uring");
    }
    for round in 0..3u64 {
        for (b, bed) in beds.iter_mut().enumerate() {
            for q in 0..2 {
                write_and_read(bed, q, (round * 8 + q as u64) * 16, round * 100 + b as u64 * 10 + q as u64);
            }
        }
    }
    for bed in &beds {
        for q in 0..2 {
            let stats = bed.dp().stats(q).expect("queue");
            assert_eq!(QueueStats::get(&stats.responses), 6, "every ring was served");
        }
    }
    // Stopping one vbd releases its grants and ports while the others keep serving.
    let mut first = beds.remove(0);
    let first_path = first.file.path().to_path_buf();
    assert!(in_an_io_uring_file_table(&first_path), "a running vbd's disk is in its thread's io_uring");
    first.stop();
    assert_eq!(pool.rings_per_thread().iter().sum::<usize>(), 4);
    // Its disk left the shared io_uring's file table: the ring keeps no stopped vbd's file open (a loop device
    // set to clear itself on close goes away with the vbd).
    assert!(!in_an_io_uring_file_table(&first_path), "a stopped vbd's disk stays registered with an io_uring");
    assert!(in_an_io_uring_file_table(beds[0].file.path()), "the other vbds' disks stay");
    write_and_read(&mut beds[1], 1, 512, 7);
    // A new vbd goes to the threads that serve fewer rings.
    beds.push(Bed::new(pooled(&pool, 1)));
    assert_eq!(pool.rings_per_thread().iter().sum::<usize>(), 5);
    write_and_read(beds.last_mut().expect("new"), 0, 1024, 8);
    for bed in &mut beds {
        bed.stop();
    }
    assert_eq!(pool.rings_per_thread(), [0, 0], "every ring left its thread");
}

#[test]
fn a_halted_ring_does_not_stop_the_rings_sharing_its_thread() {
    let pool = IoThreads::new(1);
    let mut hostile = Bed::<X86_64>::new(pooled(&pool, 1));
    let mut honest = Bed::<X86_32>::new(pooled(&pool, 1));
    assert_eq!(pool.rings_per_thread(), [2]);
    let size = hostile.fronts[0].ring().size();
    hostile.fronts[0].ring().set_req_prod_raw(size * 3);
    hostile.fronts[0].notify().expect("notify");
    let deadline = Instant::now() + TIMEOUT;
    while !hostile.dp().halted() {
        assert!(Instant::now() < deadline, "ring not halted");
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(hostile.dp().fatal_error().expect("message").contains("halted"));
    for i in 0..20u64 {
        let data = pattern(4096, i);
        let (statuses, _) = honest.transfer(0, Some(&data), i * 8, 8, Shape::Direct);
        assert_eq!(statuses, [RSP_OKAY], "honest write {i}");
    }
    // The halted ring's frontend keeps notifying: the shared thread does not spin on it.
    let stats = hostile.dp().stats(0).expect("queue 0");
    let wakeups = QueueStats::get(&stats.wakeups);
    for _ in 0..50 {
        hostile.fronts[0].notify().expect("notify");
    }
    let (statuses, _) = honest.transfer(0, None, 0, 8, Shape::Direct);
    assert_eq!(statuses, [RSP_OKAY]);
    assert!(QueueStats::get(&stats.wakeups) <= wakeups + 1, "the halted ring kept taking events");
    assert!(!honest.dp().halted());
    hostile.stop();
    honest.stop();
    assert_eq!(pool.rings_per_thread(), [0]);
}

#[test]
fn an_event_storm_on_a_shared_thread_does_not_stop_its_neighbour() {
    let pool = IoThreads::new(1);
    let mut storm = Bed::<X86_64>::new(pooled(&pool, 1));
    let mut quiet = Bed::<X86_64>::new(pooled(&pool, 1));
    let front = storm.fronts.remove(0);
    let stormer = std::thread::spawn(move || {
        // Notifications without requests, as fast as the guest can send them.
        for _ in 0..20_000 {
            front.notify().expect("notify");
        }
        front
    });
    for i in 0..20u64 {
        write_and_read(&mut quiet, 0, i * 16, i);
    }
    storm.fronts.insert(0, stormer.join().expect("storm"));
    write_and_read(&mut storm, 0, 4096, 99);
    storm.stop();
    quiet.stop();
}
