// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `Batching::Auto`: unplugged where requests reach a block layer, whole for a file on tmpfs.

use std::path::Path;

use device_blk::disk::DirectIo;
use device_blk::engine::Batching;
use device_blk::{Disk, DiskOptions};

fn disk_in(dir: &Path) -> Disk {
    let path = dir.join("disk.img");
    std::fs::write(&path, vec![0u8; 1 << 16]).expect("image");
    Disk::open(&path, &DiskOptions::default().with_direct_io(DirectIo::Off)).expect("disk")
}

#[test]
fn auto_batches_whole_on_tmpfs_and_unplugged_over_a_block_layer() {
    let shm = tempfile::tempdir_in("/dev/shm").expect("a directory on /dev/shm (tmpfs)");
    let on_tmpfs = disk_in(shm.path());
    assert_eq!(Batching::Auto.for_disk(&on_tmpfs), Batching::Whole, "a tmpfs file has no block layer to plug");
    assert_eq!(Batching::Unplugged.for_disk(&on_tmpfs), Batching::Unplugged, "an explicit choice stands");
    // The build's own directory is on the machine's disk (ext4 on a virtual disk here and in CI).
    let var = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("a directory under the target directory");
    let on_disk = disk_in(var.path());
    assert_eq!(Batching::Auto.for_disk(&on_disk), Batching::Unplugged, "a file over a block device");
    assert_eq!(Batching::Whole.for_disk(&on_disk), Batching::Whole);
}
