// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! End to end: the real `blkbackd` serves an image file over vhost-user to the virtio-blk driver of the
//! `virtio-driver` crate (its vhost-user frontend), and the data goes through to the file. The submodules (one
//! test binary, less to link) test the dirty log of live migration, adaptive polling and `--io-threads`.

// Test constants (status codes, offsets of a few MiB) are narrowed freely.
#![allow(clippy::cast_possible_truncation)]

mod vhost_user_client;

/// More of the vhost-user service, in this test binary (one less to link): in `tests/vhost_user/`.
mod vhost_user {
    mod dirty_log;
    mod io_threads;
    mod polling;
}

use test_kit::fill_pattern_at;
use vhost_user_client::{BlkClient, Daemon, Desc, Op, RawClient, Scratch};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_GET_ID,
};

const DISK: usize = 4 << 20;
const EIO: i32 = -libc::EIO;

/// Operations covering `[0, DISK)` with sizes from 4 KiB to 64 KiB; guest buffers at the same offset + `base`.
fn covering(base: usize, write: bool) -> Vec<Op> {
    const SIZES: [usize; 6] = [4096, 65536, 8192, 12288, 32768, 16384];
    let (mut ops, mut offset, mut i) = (Vec::new(), 0usize, 0usize);
    while offset < DISK {
        let len = SIZES[i % SIZES.len()].min(DISK - offset);
        let (off, at) = (offset as u64, base + offset);
        ops.push(if write { Op::Write { offset: off, at, len } } else { Op::Read { offset: off, at, len } });
        offset += len;
        i += 1;
    }
    ops
}

/// Write a fresh pattern over the whole disk at each queue depth, read it back and compare, in guest memory
/// and in the image file.
/// `io_depth` below the client's depth makes the daemon leave chains in the ring until completions make room.
fn round_trip(queues: usize, engine: &str, event_idx: bool, io_depth: Option<&str>) {
    round_trip_with(queues, engine, event_idx, io_depth, &[]);
}

/// [`round_trip`] with more daemon arguments.
fn round_trip_with(queues: usize, engine: &str, event_idx: bool, io_depth: Option<&str>, extra: &[&str]) {
    round_trip_in(queues, engine, event_idx, io_depth, extra, None);
}

/// [`round_trip_with`], the daemon's io_uring rings capped at completion mode `mode` (`cooperative`,
/// `interrupting`: what kernels before 6.1 and 5.19 give) if given.
fn round_trip_in(
    queues: usize,
    engine: &str,
    event_idx: bool,
    io_depth: Option<&str>,
    extra: &[&str],
    mode: Option<&str>,
) {
    let scratch = Scratch::new(DISK, 0);
    let queue_arg = queues.to_string();
    let mut args = vec!["--queues", &queue_arg, "--engine", engine];
    if let Some(depth) = io_depth {
        args.extend(["--io-depth", depth]);
    }
    args.extend(extra);
    let mut command = std::process::Command::new(vhost_user_client::daemon::blkbackd());
    command.args(["vhost-user", "--socket"]).arg(&scratch.socket).arg("--disk").arg(&scratch.disk).args(&args);
    if let Some(mode) = mode {
        command.env("BLKBACKD_IO_URING_COMPLETION", mode);
    }
    let mut _daemon = Daemon::spawn_command(command, &scratch.socket);
    _daemon.wait_listening();
    let mut client = BlkClient::connect(&scratch.socket, queues, 128, event_idx, 2 * DISK).expect("connect");
    assert_eq!(client.features() & (1 << 29) != 0, event_idx, "EVENT_IDX negotiated as asked");
    for (seed, depth) in [1usize, 16, 64].into_iter().enumerate() {
        let seed = seed as u64 + 100 * queues as u64;
        fill_pattern_at(seed, 0, client.mem.bytes_mut(0..DISK));
        client.mem.bytes_mut(DISK..2 * DISK).fill(0);
        let writes = client.run(&covering(0, true), depth);
        assert!(writes.iter().all(|&r| r == 0), "writes at depth {depth}: {writes:?}");
        let reads = client.run(&covering(DISK, false), depth);
        assert!(reads.iter().all(|&r| r == 0), "reads at depth {depth}: {reads:?}");
        assert!(client.mem.bytes(0..DISK) == client.mem.bytes(DISK..2 * DISK), "read back differs at depth {depth}");
        assert_eq!(client.run_one(Op::Flush), 0, "flush");
        let file = std::fs::read(&scratch.disk).expect("read the image");
        assert!(file == client.mem.bytes(0..DISK), "image differs from what was written at depth {depth}");
    }
}

#[test]
fn pattern_round_trip_one_queue_io_uring_event_idx() {
    round_trip(1, "io-uring", true, None);
}

#[test]
fn pattern_round_trip_two_queues_io_uring_backpressure() {
    round_trip(2, "io-uring", false, Some("8"));
}

/// Kernels before 6.1 (before 5.19) give rings no deferred (no cooperative) task work: completions are posted
/// whenever the thread enters the kernel, so a queue of the thread may find its finished requests while another
/// queue is served. A queue at its depth then answers them and must take the chains it left in the ring too (it
/// did not: the guest waited forever, here "no completion within 10s").
#[test]
fn pattern_round_trip_two_queues_io_uring_backpressure_in_older_kernels_completion_modes() {
    for mode in ["cooperative", "interrupting"] {
        round_trip_in(2, "io-uring", false, Some("8"), &[], Some(mode));
    }
}

#[test]
fn pattern_round_trip_two_queues_sync_engine_event_idx_backpressure() {
    round_trip(2, "sync", true, Some("4"));
}

/// Adaptive polling: the driver skips kicks while the device polls (it honours `VRING_USED_F_NO_NOTIFY` and the
/// avail event), so a device that failed to re-arm kicks before sleeping would leave requests unanswered here.
#[test]
fn pattern_round_trip_one_queue_polling_event_idx() {
    round_trip_with(1, "io-uring", true, None, &["--poll-us", "200"]);
}

#[test]
fn pattern_round_trip_two_queues_polling_backpressure() {
    round_trip_with(2, "io-uring", false, Some("8"), &["--poll-us", "200"]);
}

#[test]
fn pattern_round_trip_two_queues_sync_engine_polling() {
    round_trip_with(2, "sync", false, None, &["--poll-us", "50"]);
}

#[test]
fn discard_and_write_zeroes_read_back_as_zeros() {
    let scratch = Scratch::new(DISK, 0);
    let _daemon = Daemon::start(&scratch.socket, &scratch.disk, &[]);
    let mut client = BlkClient::connect(&scratch.socket, 1, 128, true, 2 * DISK).expect("connect");
    let features = client.features();
    assert!(features & (1 << VIRTIO_BLK_F_DISCARD) != 0 && features & (1 << VIRTIO_BLK_F_WRITE_ZEROES) != 0);
    fill_pattern_at(7, 0, client.mem.bytes_mut(0..DISK));
    assert!(client.run(&covering(0, true), 8).iter().all(|&r| r == 0));
    let zeroed = [(64 << 10, 64 << 10), (256 << 10, 128 << 10), (1 << 20, 64 << 10)];
    let ops = [
        Op::Discard { offset: zeroed[0].0, len: zeroed[0].1 },
        Op::WriteZeroes { offset: zeroed[1].0, len: zeroed[1].1, unmap: false },
        Op::WriteZeroes { offset: zeroed[2].0, len: zeroed[2].1, unmap: true },
    ];
    assert_eq!(client.run(&ops, 3), vec![0, 0, 0]);
    assert!(client.run(&covering(DISK, false), 16).iter().all(|&r| r == 0));
    let mut expected = client.mem.bytes(0..DISK).to_vec();
    for (offset, len) in zeroed {
        expected[offset as usize..(offset + len) as usize].fill(0);
    }
    assert!(client.mem.bytes(DISK..2 * DISK) == expected.as_slice(), "zeroed ranges or their neighbours are wrong");
    assert!(std::fs::read(&scratch.disk).expect("image") == expected, "image differs");
}

#[test]
fn a_read_only_disk_refuses_writes_with_ioerr() {
    let scratch = Scratch::new(DISK, 0x5a);
    let _daemon = Daemon::start(&scratch.socket, &scratch.disk, &["--read-only"]);
    let mut client = BlkClient::connect(&scratch.socket, 1, 128, false, 1 << 20).expect("connect");
    let features = client.features();
    assert!(features & (1 << VIRTIO_BLK_F_RO) != 0, "RO offered");
    assert!(features & (1 << VIRTIO_BLK_F_DISCARD) == 0, "no discard on a read-only disk");
    client.mem.bytes_mut(0..4096).fill(0x11);
    let results = client.run(
        &[
            Op::Write { offset: 0, at: 0, len: 4096 },
            Op::Discard { offset: 0, len: 4096 },
            Op::WriteZeroes { offset: 4096, len: 4096, unmap: false },
            Op::Read { offset: 8192, at: 8192, len: 4096 },
            Op::Flush,
        ],
        1,
    );
    assert_eq!(results, vec![EIO, EIO, EIO, 0, 0]);
    assert!(client.mem.bytes(8192..12288).iter().all(|&b| b == 0x5a), "reads still work");
    assert!(std::fs::read(&scratch.disk).expect("image").iter().all(|&b| b == 0x5a), "the image is untouched");
}

#[test]
fn config_space_and_get_id() {
    let scratch = Scratch::new(DISK, 0);
    let _daemon = Daemon::start(
        &scratch.socket,
        &scratch.disk,
        &["--queues", "2", "--queue-size", "128", "--serial", "vhost-e2e-serial"],
    );
    {
        let client = BlkClient::connect(&scratch.socket, 2, 128, true, 4096).expect("connect");
        let config = client.config();
        assert_eq!(u64::from(config.capacity), (DISK / 512) as u64);
        assert_eq!(u32::from(config.seg_max), 126);
        assert_eq!(u16::from(config.num_queues), 2);
        let blk_size = u32::from(config.blk_size);
        assert!(blk_size.is_power_of_two() && (512..=4096).contains(&blk_size), "blk_size {blk_size}");
        let features = client.features();
        for bit in
            [VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ]
        {
            assert!(features & (1 << bit) != 0, "feature bit {bit} negotiated");
        }
        assert!(features & (1 << VIRTIO_BLK_F_RO) == 0);
    }
    let mut raw = RawClient::connect(&scratch.socket, 4096).expect("connect raw");
    let get_id = [Desc::Header { len: 16, writable: false }, Desc::Id, Desc::Status { len: 1, writable: true }];
    let answer = raw.submit(VIRTIO_BLK_T_GET_ID, 0, None, &get_id);
    assert_eq!(answer.status, VIRTIO_BLK_S_OK as u8);
    assert_eq!(&answer.id, b"vhost-e2e-serial\0\0\0\0");
    assert_eq!(answer.used_len, 21, "20 id bytes and the status byte");
}

#[test]
fn the_default_serial_is_the_file_name() {
    let scratch = Scratch::new(1 << 20, 0);
    let _daemon = Daemon::start(&scratch.socket, &scratch.disk, &[]);
    let mut raw = RawClient::connect(&scratch.socket, 4096).expect("connect raw");
    let get_id = [Desc::Header { len: 16, writable: false }, Desc::Id, Desc::Status { len: 1, writable: true }];
    let answer = raw.submit(VIRTIO_BLK_T_GET_ID, 0, None, &get_id);
    assert_eq!(answer.status, VIRTIO_BLK_S_OK as u8);
    assert_eq!(&answer.id[..9], b"disk.img\0");
}
