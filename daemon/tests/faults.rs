// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Disk errors of real failing storage reach the guest as `VIRTIO_BLK_S_IOERR`, never as success: the real
//! `blkbackd vhost-user` serves storage that really fails, and the virtio-blk driver of `virtio-driver` checks
//! every status.
//!
//! - A sparse image on a full tmpfs: writes into holes cannot be allocated (ENOSPC), while reads, overwrites of
//!   allocated blocks and flushes keep working, and writes succeed again once space is freed.
//! - The same through a block device: a loop device over that image.
//! - A file system whose device is cut short under it: reads and writes of the file's blocks beyond the
//!   device's new end fail in the block layer (EIO), the rest of the file still works.
//!
//! No device-mapper target is used: the `error` target would need `dm-mod` in the kernel, which CI hosts may
//! lack; the cut-off loop device gives real block-layer EIO with nothing but loop devices.

// Test constants (offsets of a few MiB, status codes) are narrowed freely.
#![allow(clippy::cast_possible_truncation)]

mod vhost_user_client;

use std::fs::File;
use std::io::Write;
use std::path::Path;

use test_kit::fill_pattern_at;
use test_kit::storage::{fill_up, physical_blocks, sparse_file, Ext4OnLoop};
use test_kit::{LoopDevice, Mount};
use vhost_user_client::{BlkClient, Daemon, Op};

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;
/// What the driver reports for `VIRTIO_BLK_S_IOERR`.
const IOERR: i32 = -libc::EIO;

/// Image layout on the tmpfs: 2 MiB, of which the first 256 KiB are allocated.
const IMAGE: usize = 2 * MIB;
const ALLOCATED: usize = 256 * KIB;

/// Guest RAM layout of the client: where reads land and writes come from.
const READ_AT: usize = 0;
const WRITE_AT: usize = 512 * KIB;
const GUEST: usize = MIB;

fn skip(test: &str, why: &str) {
    eprintln!("skipping {test}: {why}");
}

/// A full tmpfs holding a sparse image (allocated start, pattern seed 1) and a filler taking the rest.
struct FullTmpfs {
    /// Unmounted when the test is done (declared first in each test, so dropped last).
    _mount: Mount,
    image: std::path::PathBuf,
    filler: std::path::PathBuf,
}

impl FullTmpfs {
    fn new() -> Result<FullTmpfs, String> {
        let mount = Mount::tmpfs("4m")?;
        let image = mount.path().join("disk.img");
        let mut data = vec![0u8; ALLOCATED];
        fill_pattern_at(1, 0, &mut data);
        sparse_file(&image, IMAGE as u64, &data);
        let filler = fill_up(mount.path(), "filler");
        Ok(FullTmpfs { _mount: mount, image, filler })
    }

    fn make_room(&self) {
        std::fs::remove_file(&self.filler).expect("remove the filler");
    }
}

/// The daemon on `disk` with `engine`, and a connected one-queue client.
fn serve(dir: &Path, disk: &Path, engine: &str) -> (Daemon, BlkClient) {
    let socket = dir.join("vhost.sock");
    let daemon = Daemon::start(&socket, disk, &["--engine", engine]);
    let client = BlkClient::connect(&socket, 1, 128, false, GUEST).expect("connect");
    (daemon, client)
}

/// Against a full tmpfs behind `disk` (the image itself, or a device over it): holes cannot be written, the
/// rest works, and freeing space makes hole writes work.
fn full_tmpfs_case(tmpfs: &FullTmpfs, disk: &Path, engine: &str) {
    let dir = tempfile::tempdir().expect("socket dir");
    let (_daemon, mut client) = serve(dir.path(), disk, engine);
    fill_pattern_at(2, 0, client.mem.bytes_mut(WRITE_AT..WRITE_AT + 256 * KIB));
    client.mem.bytes_mut(READ_AT..READ_AT + 256 * KIB).fill(0xee);
    let hole = MIB as u64;
    let ops = [
        Op::Read { offset: 0, at: READ_AT, len: 64 * KIB },
        Op::Write { offset: hole, at: WRITE_AT, len: 64 * KIB },
        Op::Read { offset: hole + (512 * KIB) as u64, at: READ_AT + 64 * KIB, len: 16 * KIB },
        Op::Write { offset: 64 * KIB as u64, at: WRITE_AT + 64 * KIB, len: 16 * KIB },
        Op::WriteZeroes { offset: hole + (128 * KIB) as u64, len: 64 * KIB as u64, unmap: false },
        Op::Flush,
        Op::Write { offset: (IMAGE - 4 * KIB) as u64, at: WRITE_AT, len: 4 * KIB },
        Op::Write { offset: hole + (256 * KIB) as u64, at: WRITE_AT, len: 4 * KIB },
    ];
    let results = client.run(&ops, 8);
    assert_eq!(
        results,
        [0, IOERR, 0, 0, IOERR, 0, IOERR, IOERR],
        "{engine} on {}: reads, an overwrite and a flush succeed, every allocation fails",
        disk.display()
    );
    let mut expected = vec![0u8; 64 * KIB];
    fill_pattern_at(1, 0, &mut expected);
    assert!(client.mem.bytes(READ_AT..READ_AT + 64 * KIB) == expected.as_slice(), "{engine}: allocated data");
    assert!(client.mem.bytes(READ_AT + 64 * KIB..READ_AT + 80 * KIB).iter().all(|&b| b == 0), "{engine}: hole");

    // Once there is room, the very same writes succeed and read back.
    tmpfs.make_room();
    let results = client.run(
        &[
            Op::Write { offset: hole, at: WRITE_AT, len: 64 * KIB },
            Op::WriteZeroes { offset: hole + (128 * KIB) as u64, len: 64 * KIB as u64, unmap: false },
            Op::Flush,
        ],
        1,
    );
    assert_eq!(results, [0, 0, 0], "{engine}: writes succeed with free space");
    let results = client.run(&[Op::Read { offset: hole, at: READ_AT, len: 64 * KIB }], 1);
    assert_eq!(results, [0]);
    assert!(client.mem.bytes(READ_AT..READ_AT + 64 * KIB) == client.mem.bytes(WRITE_AT..WRITE_AT + 64 * KIB));
    let image = std::fs::read(&tmpfs.image).expect("read the image");
    assert!(
        image[64 * KIB..80 * KIB] == *client.mem.bytes(WRITE_AT + 64 * KIB..WRITE_AT + 80 * KIB),
        "{engine}: the overwrite of an allocated block reached the image"
    );
    assert!(image[MIB..MIB + 64 * KIB] == *client.mem.bytes(WRITE_AT..WRITE_AT + 64 * KIB), "{engine}: new data");
}

#[test]
fn writes_into_holes_of_an_image_on_a_full_tmpfs_are_ioerr_and_the_rest_keeps_working() {
    for engine in ["io-uring", "sync"] {
        let tmpfs = match FullTmpfs::new() {
            Ok(t) => t,
            Err(why) => return skip("the full-tmpfs test", &why),
        };
        full_tmpfs_case(&tmpfs, &tmpfs.image, engine);
    }
}

#[test]
fn a_loop_device_over_a_full_tmpfs_fails_writes_into_holes_with_ioerr() {
    let tmpfs = match FullTmpfs::new() {
        Ok(t) => t,
        Err(why) => return skip("the loop-over-full-tmpfs test", &why),
    };
    let device = match LoopDevice::attach(&tmpfs.image) {
        Ok(d) => d,
        Err(why) => return skip("the loop-over-full-tmpfs test", &why),
    };
    full_tmpfs_case(&tmpfs, &device.path, "io-uring");
}

#[test]
fn blocks_beyond_the_end_of_a_cut_device_fail_with_ioerr_through_a_file_system() {
    let fs = match Ext4OnLoop::new(64) {
        Ok(fs) => fs,
        Err(why) => return skip("the cut-device test", &why),
    };
    // Data first, so that the image's blocks lie in the middle of the device.
    let mut filler = File::create(fs.mount.path().join("filler")).expect("filler");
    filler.write_all(&vec![0xf1u8; 16 * MIB]).expect("write the filler");
    filler.sync_all().expect("sync the filler");
    const LEN: usize = 4 * MIB;
    let image_path = fs.mount.path().join("disk.img");
    let mut content = vec![0u8; LEN];
    fill_pattern_at(3, 0, &mut content);
    let mut image = File::create(&image_path).expect("image");
    image.write_all(&content).expect("write the image");
    image.sync_all().expect("sync the image");
    let physical: Vec<u64> =
        physical_blocks(&image, LEN as u64).into_iter().map(|b| b.expect("every block allocated")).collect();
    drop(image);

    let dir = tempfile::tempdir().expect("socket dir");
    let (_daemon, mut client) = serve(dir.path(), &image_path, "io-uring");
    assert_eq!(client.run(&[Op::Read { offset: 0, at: READ_AT, len: 64 * KIB }], 1), [0], "before the cut");

    // The device loses everything from the block holding the image's middle on.
    let cut = physical[LEN / 4096 / 2];
    fs.cut_device(cut);
    let lost = |block: usize| physical[block] + 4096 > cut;
    let (good, bad): (Vec<usize>, Vec<usize>) = (0..LEN / 4096).partition(|&b| !lost(b));
    assert!(!good.is_empty() && !bad.is_empty(), "the cut splits the image: {} good, {} lost", good.len(), bad.len());

    // Every 4 KiB block of the image in turn: reads of lost blocks fail, the others return the image's data.
    client.mem.bytes_mut(READ_AT..READ_AT + LEN / 8).fill(0xee);
    let step = 8; // every eighth block, to keep the run short
    let blocks: Vec<usize> = (0..LEN / 4096).step_by(step).collect();
    let reads: Vec<Op> = blocks
        .iter()
        .enumerate()
        .map(|(i, &b)| Op::Read { offset: (b * 4096) as u64, at: READ_AT + i * 4096, len: 4096 })
        .collect();
    let results = client.run(&reads, 16);
    for (i, &b) in blocks.iter().enumerate() {
        if lost(b) {
            assert_eq!(results[i], IOERR, "read of block {b}, beyond the device's end");
        } else {
            assert_eq!(results[i], 0, "read of block {b}, before the cut");
            let got = client.mem.bytes(READ_AT + i * 4096..READ_AT + (i + 1) * 4096);
            assert!(got == &content[b * 4096..(b + 1) * 4096], "block {b} reads back the image's data");
        }
    }

    // A read spanning the cut fails as a whole; writes fail beyond the end and succeed before it.
    let (last_good, first_bad) = (*good.last().expect("good"), bad[0]);
    fill_pattern_at(4, 0, client.mem.bytes_mut(WRITE_AT..WRITE_AT + 8 * KIB));
    let results = client.run(
        &[
            Op::Read { offset: (first_bad.saturating_sub(2) * 4096) as u64, at: READ_AT, len: 16 * KIB },
            Op::Write { offset: (first_bad * 4096) as u64, at: WRITE_AT, len: 4 * KIB },
            Op::Write { offset: (last_good * 4096) as u64, at: WRITE_AT + 4 * KIB, len: 4 * KIB },
            Op::Read { offset: (last_good * 4096) as u64, at: READ_AT + 16 * KIB, len: 4 * KIB },
        ],
        1,
    );
    assert_eq!(results, [IOERR, IOERR, 0, 0], "spanning read, lost write, good write, good read");
    assert!(
        client.mem.bytes(READ_AT + 16 * KIB..READ_AT + 20 * KIB)
            == client.mem.bytes(WRITE_AT + 4 * KIB..WRITE_AT + 8 * KIB),
        "the write before the cut reads back"
    );
}
