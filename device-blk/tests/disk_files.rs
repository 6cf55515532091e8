// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Geometry and O_DIRECT of disks in regular files, on the default temporary file system and on tmpfs.

mod common;

use std::path::Path;

use common::*;
use device_blk::disk::DirectIo;
use device_blk::{BlockSize, Disk, DiskError, DiskOptions, Sector};

fn open_with(path: &Path, direct_io: DirectIo) -> Result<Disk, DiskError> {
    Disk::open(path, &DiskOptions::default().with_direct_io(direct_io))
}

#[test]
fn file_geometry_is_in_sectors_with_sensible_block_sizes() {
    for dir in [tempfile::tempdir().ok(), tempfile::tempdir_in("/dev/shm").ok()].into_iter().flatten() {
        // 1 MiB and 300 bytes: the partial sector is never exposed.
        let path = image(dir.path(), "disk.img", &vec![7u8; (1 << 20) + 300]);
        let disk = open_with(&path, DirectIo::Auto).expect("open");
        let g = *disk.geometry();
        let where_ = dir.path().display();
        assert_eq!(g.capacity, Sector(2048), "{where_}");
        assert_eq!(g.logical_block_size, BlockSize::SECTOR, "{where_}");
        assert!(g.physical_block_size >= BlockSize::PAGE, "{where_}: the file system block, {g:?}");
        assert!(g.discard && g.write_zeroes && !g.read_only, "{where_}: {g:?}");
        assert!(g.discard_granularity >= 512, "{where_}");
        if g.direct_io {
            assert!(disk.buffer_alignment().is_power_of_two() && disk.buffer_alignment() <= 4096, "{where_}");
        } else {
            assert_eq!(disk.buffer_alignment(), 1, "{where_}");
        }
        let buffered = open_with(&path, DirectIo::Off).expect("open buffered");
        assert!(!buffered.geometry().direct_io, "{where_}");
        assert_eq!(buffered.buffer_alignment(), 1, "{where_}");
        assert_eq!(buffered.geometry().capacity, g.capacity, "{where_}");
    }
}

#[test]
fn ext4_takes_o_direct_when_the_temp_dir_is_on_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = image(dir.path(), "disk.img", &[0u8; 8192]);
    let fs = command("stat", &["-f", "-c", "%T", dir.path().to_str().expect("path")]).unwrap_or_default();
    if fs != "ext2/ext3" {
        eprintln!("skipping: {} is on {fs:?}, not ext4", dir.path().display());
        return;
    }
    let disk = open_with(&path, DirectIo::Required).expect("ext4 supports O_DIRECT");
    assert!(disk.geometry().direct_io);
    assert_eq!(disk.buffer_alignment(), 512, "statx stx_dio_mem_align on this ext4");
}

#[test]
fn an_image_smaller_than_a_sector_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = image(dir.path(), "tiny.img", &[1u8; 511]);
    let err = open_with(&path, DirectIo::Auto).expect_err("empty");
    assert!(matches!(err, DiskError::Empty { block_size: 512, .. }), "{err}");
    assert!(err.to_string().contains("tiny.img"), "{err}");
}

/// A regular file is opened without access-time upkeep (`O_NOATIME`, on the open file description, so it goes
/// with a descriptor handed to a worker): a guest's reads leave the image's access time alone. The file here
/// belongs to the test's user, who may always set it.
#[test]
fn reads_leave_the_access_time_of_an_image_alone() {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    for dir in [tempfile::tempdir().ok(), tempfile::tempdir_in("/dev/shm").ok()].into_iter().flatten() {
        let path = image(dir.path(), "disk.img", &[3u8; 8192]);
        // An access time in 2001 (older than the modification: even `relatime` would update it).
        let old = libc::timespec { tv_sec: 1_000_000_000, tv_nsec: 0 };
        let times = [old, libc::timespec { tv_sec: 0, tv_nsec: libc::UTIME_OMIT }];
        let cpath = std::ffi::CString::new(path.to_str().expect("path")).expect("path");
        // SAFETY: a NUL-terminated path and an array of two timespecs.
        assert_eq!(unsafe { libc::utimensat(libc::AT_FDCWD, cpath.as_ptr(), times.as_ptr(), 0) }, 0);
        for direct_io in [DirectIo::Auto, DirectIo::Off] {
            let disk = open_with(&path, direct_io).expect("open");
            // SAFETY: F_GETFL on the disk's open descriptor.
            let flags = unsafe { libc::fcntl(disk.file().as_raw_fd(), libc::F_GETFL) };
            assert_ne!(flags & libc::O_NOATIME, 0, "{}: {direct_io:?}", dir.path().display());
            // (Aligned for O_DIRECT.)
            #[repr(C, align(4096))]
            struct Page([u8; 4096]);
            let mut page = Box::new(Page([0; 4096]));
            disk.file().read_exact_at(&mut page.0, 0).expect("read");
            let atime = std::fs::metadata(&path).expect("stat").accessed().expect("atime");
            let secs = atime.duration_since(std::time::UNIX_EPOCH).expect("after the epoch").as_secs();
            assert_eq!(
                secs,
                1_000_000_000,
                "{}: {direct_io:?}: the read touched the access time",
                dir.path().display()
            );
        }
    }
}
