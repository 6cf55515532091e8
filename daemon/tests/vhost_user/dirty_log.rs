// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Live migration over vhost-user: the daemon offers what a VMM needs to migrate a VM whose disk it serves
//! (`VHOST_F_LOG_ALL`, `VHOST_USER_PROTOCOL_F_LOG_SHMFD`; without them QEMU says "Migration disabled: vhost lacks
//! VHOST_F_LOG_ALL feature"), and once the frontend hands it a log and turns logging on, every page it writes
//! (read data, the status byte, the used ring, GET_ID strings) has its bit set in that log, and no other page.

// Test constants (a few pages, status codes) are narrowed freely.
#![allow(clippy::cast_possible_truncation)]

use crate::vhost_user_client;

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_client::frontend::{Buf, LogClient, PAGE, STATUS_PAGE, USED_PAGE};
use vhost_user_client::{Daemon, Scratch};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};

const DISK: usize = 1 << 20;
const MEM: usize = 1 << 20;
const OK: u8 = VIRTIO_BLK_S_OK as u8;

/// The pages every answered request dirties: the used ring and the status byte.
const ANSWER: [usize; 2] = [USED_PAGE, STATUS_PAGE];

fn with(extra: &[usize]) -> Vec<usize> {
    let mut pages: Vec<usize> = ANSWER.iter().chain(extra).copied().collect();
    pages.sort_unstable();
    pages
}

#[test]
fn reads_status_bytes_used_ring_and_get_id_are_logged_once_logging_is_on() {
    let (scratch, content) = Scratch::with_pattern(DISK, 7);
    let _daemon = Daemon::start(&scratch.socket, &scratch.disk, &[]);
    let mut client = LogClient::connect(&scratch.socket, MEM).expect("connect");

    assert_ne!(client.offered_features & VhostUserVirtioFeatures::LOG_ALL.bits(), 0, "VHOST_F_LOG_ALL offered");
    assert!(client.offered_protocol.contains(VhostUserProtocolFeatures::LOG_SHMFD), "LOG_SHMFD offered");

    // Before migration: no log, reads work.
    let read = |page: usize, len: u32| Buf { page, len, writable: true };
    assert_eq!(client.run(VIRTIO_BLK_T_IN, 0, &[read(0x10, 4096)]), (OK, 4097));

    client.enable_logging().expect("turn logging on");
    assert_eq!(client.dirty_pages(), Vec::<usize>::new(), "nothing written since the log was given");

    // A read of 8 KiB at sector 16 into pages 0x20 and 0x21.
    assert_eq!(client.run(VIRTIO_BLK_T_IN, 16, &[read(0x20, 8192)]), (OK, 8193));
    assert_eq!(client.mem.bytes(0x20 * PAGE..0x22 * PAGE), &content[8192..16384], "the data landed");
    assert_eq!(client.dirty_pages(), with(&[0x20, 0x21]), "read data, status byte and used ring");

    // Two buffers, one of 512 bytes in the middle of nowhere: each page touched, no other.
    client.clear_log();
    let bufs = [read(0x30, 4096), Buf { page: 0x40, len: 512, writable: true }];
    assert_eq!(client.run(VIRTIO_BLK_T_IN, 64, &bufs), (OK, 4609));
    assert_eq!(client.dirty_pages(), with(&[0x30, 0x40]));

    // A write only reads guest memory: its source page stays clean.
    client.clear_log();
    let source = Buf { page: 0x50, len: 8192, writable: false };
    assert_eq!(client.run(VIRTIO_BLK_T_OUT, 128, &[source]), (OK, 1));
    assert_eq!(client.dirty_pages(), with(&[]), "a write dirties only the status byte and the used ring");

    // GET_ID writes its 20 bytes through vm-memory.
    client.clear_log();
    assert_eq!(client.run(VIRTIO_BLK_T_GET_ID, 0, &[Buf { page: 0x60, len: 20, writable: true }]), (OK, 21));
    assert_eq!(client.dirty_pages(), with(&[0x60]));
}
