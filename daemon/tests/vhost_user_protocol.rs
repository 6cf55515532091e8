// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Hostile and unlucky frontends: malformed descriptor chains built on a real split virtqueue, frontends that
//! disconnect (with requests in flight) and reconnect. The daemon answers or drops each bad chain as the virtio
//! spec says and keeps serving.

// Test constants (status codes, offsets of a few MiB) are narrowed freely.
#![allow(clippy::cast_possible_truncation)]

mod vhost_user_client;

use test_kit::fill_pattern_at;
use vhost_user_client::{BlkClient, Daemon, Desc, Op, Outcome, RawClient, Scratch, UNTOUCHED};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};

const DISK: usize = 1 << 20;
const SECTORS: u64 = (DISK / 512) as u64;
const FILL: u8 = 0xab;
const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

const HEADER: Desc = Desc::Header { len: 16, writable: false };
const STATUS: Desc = Desc::Status { len: 1, writable: true };

fn data(at: usize, len: u32, writable: bool) -> Desc {
    Desc::Data { at, len, writable }
}

/// A good read of the first 4 KiB into guest RAM at 0: the daemon still serves.
fn good_read(raw: &mut RawClient) {
    raw.mem.bytes_mut(0..4096).fill(0);
    let answer = raw.submit(VIRTIO_BLK_T_IN, 0, None, &[HEADER, data(0, 4096, true), STATUS]);
    assert_eq!((answer.status, answer.used_len), (OK, 4097), "a good read after a bad request");
    assert!(raw.mem.bytes(0..4096).iter().all(|&b| b == FILL));
}

struct Case {
    name: &'static str,
    virtio_type: u32,
    sector: u64,
    range: Option<(u64, u32, u32)>,
    descs: Vec<Desc>,
    status: u8,
    used_len: u32,
}

#[test]
fn malformed_requests_are_refused_or_dropped_and_the_daemon_keeps_serving() {
    let scratch = Scratch::new(DISK, FILL);
    let mut daemon = Daemon::start(&scratch.socket, &scratch.disk, &["--queue-size", "16"]);
    let mut raw = RawClient::connect(&scratch.socket, 1 << 16).expect("connect");
    raw.mem.bytes_mut(8192..16384).fill(0x11);
    let write_src = data(8192, 4096, false);
    let cases = [
        Case {
            name: "status descriptor read-only",
            virtio_type: VIRTIO_BLK_T_IN,
            sector: 0,
            range: None,
            descs: vec![HEADER, data(4096, 512, true), Desc::Status { len: 1, writable: false }],
            status: UNTOUCHED,
            used_len: 0,
        },
        Case {
            name: "no status descriptor at all",
            virtio_type: VIRTIO_BLK_T_IN,
            sector: 0,
            range: None,
            descs: vec![HEADER],
            status: UNTOUCHED,
            used_len: 0,
        },
        Case {
            name: "header too short",
            virtio_type: VIRTIO_BLK_T_OUT,
            sector: 0,
            range: None,
            descs: vec![Desc::Header { len: 8, writable: false }, write_src, STATUS],
            status: IOERR,
            used_len: 1,
        },
        Case {
            name: "header device-writable",
            virtio_type: VIRTIO_BLK_T_OUT,
            sector: 0,
            range: None,
            descs: vec![Desc::Header { len: 16, writable: true }, write_src, STATUS],
            status: IOERR,
            used_len: 1,
        },
        Case {
            name: "sector past the end",
            virtio_type: VIRTIO_BLK_T_OUT,
            sector: SECTORS - 4,
            range: None,
            descs: vec![HEADER, write_src, STATUS],
            status: IOERR,
            used_len: 1,
        },
        Case {
            name: "sector + length overflowing",
            virtio_type: VIRTIO_BLK_T_IN,
            sector: u64::MAX - 3,
            range: None,
            descs: vec![HEADER, data(4096, 4096, true), STATUS],
            status: IOERR,
            used_len: 1,
        },
        Case {
            name: "read into a driver-readable buffer",
            virtio_type: VIRTIO_BLK_T_IN,
            sector: 0,
            range: None,
            descs: vec![HEADER, data(8192, 4096, false), STATUS],
            status: IOERR,
            used_len: 1,
        },
        Case {
            name: "write from a device-writable buffer",
            virtio_type: VIRTIO_BLK_T_OUT,
            sector: 0,
            range: None,
            descs: vec![HEADER, data(8192, 4096, true), STATUS],
            status: IOERR,
            used_len: 1,
        },
        Case {
            name: "unknown request type",
            virtio_type: 10,
            sector: 0,
            range: None,
            descs: vec![HEADER, data(4096, 16, true), STATUS],
            status: UNSUPP,
            used_len: 1,
        },
        Case {
            name: "discard with the unmap flag",
            virtio_type: VIRTIO_BLK_T_DISCARD,
            sector: 0,
            range: Some((0, 8, 1)),
            descs: vec![HEADER, Desc::Range { len: 16 }, STATUS],
            status: UNSUPP,
            used_len: 1,
        },
        Case {
            name: "write-zeroes with reserved flags",
            virtio_type: VIRTIO_BLK_T_WRITE_ZEROES,
            sector: 0,
            range: Some((0, 8, 0x8)),
            descs: vec![HEADER, Desc::Range { len: 16 }, STATUS],
            status: UNSUPP,
            used_len: 1,
        },
        Case {
            name: "short discard range",
            virtio_type: VIRTIO_BLK_T_DISCARD,
            sector: 0,
            range: Some((0, 8, 0)),
            descs: vec![HEADER, Desc::Range { len: 8 }, STATUS],
            status: IOERR,
            used_len: 1,
        },
        Case {
            name: "discard past the end",
            virtio_type: VIRTIO_BLK_T_DISCARD,
            sector: 0,
            range: Some((SECTORS - 1, 8, 0)),
            descs: vec![HEADER, Desc::Range { len: 16 }, STATUS],
            status: IOERR,
            used_len: 1,
        },
        Case {
            name: "get-id without a buffer",
            virtio_type: VIRTIO_BLK_T_GET_ID,
            sector: 0,
            range: None,
            descs: vec![HEADER, STATUS],
            status: IOERR,
            used_len: 1,
        },
    ];
    for case in &cases {
        let Outcome { status, used_len, .. } = raw.submit(case.virtio_type, case.sector, case.range, &case.descs);
        assert_eq!((status, used_len), (case.status, case.used_len), "{}", case.name);
        good_read(&mut raw);
    }
    assert!(raw.mem.bytes(8192..16384).iter().all(|&b| b == 0x11), "no read landed in a driver-readable buffer");
    drop(raw);
    assert!(std::fs::read(&scratch.disk).expect("image").iter().all(|&b| b == FILL), "no bad request wrote");
    // A new frontend is served as usual.
    let mut client = BlkClient::connect(&scratch.socket, 1, 16, true, 8192).expect("reconnect");
    assert_eq!(client.run_one(Op::Read { offset: 4096, at: 0, len: 4096 }), 0);
    assert!(client.mem.bytes(0..4096).iter().all(|&b| b == FILL));
    assert!(daemon.is_running());
    let log = daemon.stderr();
    assert_eq!(log.matches("malformed request (further ones").count(), 1, "one warning per queue:\n{log}");
}

#[test]
fn frontends_reconnect_one_after_another() {
    let scratch = Scratch::new(DISK, 0);
    let mut daemon = Daemon::start(&scratch.socket, &scratch.disk, &["--queues", "2"]);
    {
        let mut first = BlkClient::connect(&scratch.socket, 1, 64, true, 256 << 10).expect("first connection");
        fill_pattern_at(3, 0, first.mem.bytes_mut(0..256 << 10));
        assert_eq!(first.run_one(Op::Write { offset: 0, at: 0, len: 256 << 10 }), 0);
    }
    for round in 0..3 {
        let mut next = BlkClient::connect(&scratch.socket, 2, 64, round % 2 == 0, 512 << 10).expect("reconnect");
        assert_eq!(next.run_one(Op::Read { offset: 0, at: 256 << 10, len: 256 << 10 }), 0);
        let mut expected = vec![0u8; 256 << 10];
        fill_pattern_at(3, 0, &mut expected);
        assert!(next.mem.bytes(256 << 10..512 << 10) == expected.as_slice(), "round {round}");
    }
    assert!(daemon.is_running());
}

#[test]
fn a_frontend_leaving_with_requests_in_flight_does_not_end_the_daemon() {
    let scratch = Scratch::new(4 * DISK, 0);
    let mut daemon = Daemon::start(&scratch.socket, &scratch.disk, &[]);
    for round in 0..3u64 {
        let mut client = BlkClient::connect(&scratch.socket, 1, 256, true, 4 * DISK).expect("connect");
        fill_pattern_at(round, 0, client.mem.bytes_mut(0..4 * DISK));
        let ops: Vec<Op> = (0..64)
            .map(|i| Op::Write { offset: i * (64 << 10), at: (i as usize) * (64 << 10), len: 64 << 10 })
            .collect();
        assert_eq!(client.start(&ops), 64);
        // Gone without waiting: the daemon must finish (or refuse) what it took and accept the next frontend.
    }
    let mut client = BlkClient::connect(&scratch.socket, 1, 64, false, 8192).expect("connect after the storm");
    fill_pattern_at(99, 0, client.mem.bytes_mut(0..4096));
    assert_eq!(
        client.run(&[Op::Write { offset: 0, at: 0, len: 4096 }, Op::Read { offset: 0, at: 4096, len: 4096 }], 1),
        [0, 0]
    );
    assert!(client.mem.bytes(0..4096) == client.mem.bytes(4096..8192));
    assert!(daemon.is_running());
}
