// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Data isolation over vhost-user, with the real `blkbackd` and a real vhost-user client building exact descriptor
//! chains: on disks whose size is not a multiple of 4 KiB nor of 512, the last whole block reads and writes, any
//! request touching what lies beyond is refused with `IOERR`, the partial sector at the end of the image is never
//! modified, and the device writes nothing into the client's memory outside the data descriptor (nor into the
//! data buffer of a refused read).

// Test sizes (a few MiB) are narrowed freely.
#![allow(clippy::cast_possible_truncation)]

mod vhost_user_client;

use std::os::unix::fs::FileExt;

use test_kit::fill_pattern_at;
use vhost_user_client::{Daemon, Desc, RawClient, Scratch};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};

const MIB: usize = 1 << 20;
const DISK_CANARY: u8 = 0xc5;
const MEM_CANARY: u8 = 0xa7;
/// The data buffer sits at this offset of the client's memory, with as much canary before and after it.
const BUF: usize = 64 << 10;

const HEADER: Desc = Desc::Header { len: 16, writable: false };
const STATUS: Desc = Desc::Status { len: 1, writable: true };
const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;

fn odd_disk(size: usize) {
    let scratch = Scratch::new(size, 0);
    let mut daemon = Daemon::start(&scratch.socket, &scratch.disk, &[]);
    let mut client = RawClient::connect(&scratch.socket, 3 * BUF).expect("connect");
    let config = client.config();
    let (capacity, block) = (u64::from(config.capacity), u32::from(config.blk_size) as usize);
    let exposed = capacity as usize * 512;
    assert_eq!(exposed, size / block * block, "{size}: only whole blocks are exposed");
    // The image: a pattern over what is exposed, a canary in the partial block at the end.
    let mut content = vec![0u8; exposed];
    fill_pattern_at(9, 0, &mut content);
    let image = std::fs::OpenOptions::new().write(true).open(&scratch.disk).expect("open the image");
    image.write_all_at(&content, 0).expect("fill");
    image.write_all_at(&vec![DISK_CANARY; size - exposed], exposed as u64).expect("canary");
    let last = capacity - (block / 512) as u64;
    let data = |len: usize, writable| Desc::Data { at: BUF, len: len as u32, writable };
    let canary_outside = |client: &RawClient, len: usize, what: &str| {
        assert!(client.mem.bytes(0..BUF).iter().all(|&b| b == MEM_CANARY), "{size} {what}: written before the buffer");
        let after = client.mem.bytes(BUF + len..3 * BUF);
        assert!(after.iter().all(|&b| b == MEM_CANARY), "{size} {what}: written after the buffer");
    };

    // The last whole block reads what is on disk, and nothing else of the client's memory changes.
    client.mem.bytes_mut(0..3 * BUF).fill(MEM_CANARY);
    let answer = client.submit(VIRTIO_BLK_T_IN, last, None, &[HEADER, data(block, true), STATUS]);
    assert_eq!((answer.status, answer.used_len), (OK, block as u32 + 1), "{size}: read the last block");
    assert!(client.mem.bytes(BUF..BUF + block) == &content[exposed - block..], "{size}: the last block's bytes");
    canary_outside(&client, block, "read of the last block");

    // Reads touching anything beyond are refused, and write nothing at all.
    for (sector, len, what) in [
        (last, 2 * block, "read across the end"),
        (capacity, block, "read at the capacity"),
        (capacity + 8, block, "read beyond the capacity"),
    ] {
        client.mem.bytes_mut(0..3 * BUF).fill(MEM_CANARY);
        let answer = client.submit(VIRTIO_BLK_T_IN, sector, None, &[HEADER, data(len, true), STATUS]);
        assert_eq!((answer.status, answer.used_len), (IOERR, 1), "{size}: {what}");
        canary_outside(&client, 0, what);
    }

    // The last whole block takes a write; writes touching anything beyond are refused.
    let mut new = vec![0u8; 2 * block];
    fill_pattern_at(10, 0, &mut new);
    client.mem.bytes_mut(BUF..BUF + 2 * block).copy_from_slice(&new);
    let answer = client.submit(VIRTIO_BLK_T_OUT, last, None, &[HEADER, data(block, false), STATUS]);
    assert_eq!((answer.status, answer.used_len), (OK, 1), "{size}: write the last block");
    for (sector, len, what) in [(last, 2 * block, "write across the end"), (capacity, block, "write at the capacity")] {
        let answer = client.submit(VIRTIO_BLK_T_OUT, sector, None, &[HEADER, data(len, false), STATUS]);
        assert_eq!((answer.status, answer.used_len), (IOERR, 1), "{size}: {what}");
    }
    let file = std::fs::read(&scratch.disk).expect("read the image");
    assert_eq!(file.len(), size, "{size}: the image did not grow");
    assert!(file[..exposed - block] == content[..exposed - block], "{size}: nothing before the last block changed");
    assert!(file[exposed - block..exposed] == new[..block], "{size}: the last block holds the write");
    assert!(file[exposed..].iter().all(|&b| b == DISK_CANARY), "{size}: the partial block at the end is untouched");
    assert!(daemon.is_running());
}

#[test]
fn disk_of_1_mib_plus_1536_bytes() {
    odd_disk(MIB + 1536);
}

#[test]
fn disk_of_1_mib_plus_100_bytes() {
    odd_disk(MIB + 100);
}

#[test]
fn disk_of_1_mib_plus_1636_bytes() {
    odd_disk(MIB + 1636);
}

/// A read into a buffer in the middle of a page writes exactly that buffer: the bytes around it in the same page
/// keep their canary.
#[test]
fn a_read_writes_only_its_data_descriptor() {
    let (scratch, content) = Scratch::with_pattern(MIB, 11);
    let _daemon = Daemon::start(&scratch.socket, &scratch.disk, &[]);
    let mut client = RawClient::connect(&scratch.socket, 3 * BUF).expect("connect");
    let block = u32::from(client.config().blk_size) as usize;
    for (at, sector) in [(BUF + 512, 8u64), (BUF + 1024, 100), (BUF + 4096 - block, 2000)] {
        // Buffers at 512-byte offsets need a device buffer alignment of at most 512; skip shapes it cannot take.
        if at % block != 0 && block > 512 {
            continue;
        }
        client.mem.bytes_mut(0..3 * BUF).fill(MEM_CANARY);
        let desc = Desc::Data { at, len: block as u32, writable: true };
        let answer = client.submit(VIRTIO_BLK_T_IN, sector, None, &[HEADER, desc, STATUS]);
        assert_eq!((answer.status, answer.used_len), (OK, block as u32 + 1));
        let from = sector as usize * 512;
        assert!(client.mem.bytes(at..at + block) == &content[from..from + block], "read at {at}");
        assert!(client.mem.bytes(0..at).iter().all(|&b| b == MEM_CANARY), "written before {at}");
        assert!(client.mem.bytes(at + block..3 * BUF).iter().all(|&b| b == MEM_CANARY), "written after {at}");
    }
}
