// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What a disk looks like to a guest: size, block sizes, capabilities.

use crate::units::{BlockSize, Sector};

/// Geometry and capabilities of an open disk, fixed for the life of the open descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Size in 512-byte sectors (rounded down: a trailing partial sector is never exposed).
    pub capacity: Sector,
    /// Smallest unit the disk can address: disk offsets and lengths must be multiples of it (block devices:
    /// `BLKSSZGET`; files with O_DIRECT: statx `stx_dio_offset_align`; else 512). Host buffer addresses have their
    /// own, often smaller, alignment: [`Disk::buffer_alignment`](crate::Disk::buffer_alignment).
    pub logical_block_size: BlockSize,
    /// The disk's physical block size, a hint for the guest's I/O sizes (block devices: `BLKPBSZGET`; files: the
    /// file system's block size), never smaller than the logical block size.
    pub physical_block_size: BlockSize,
    /// Writes, discards and write-zeroes are refused.
    pub read_only: bool,
    /// The disk was opened with O_DIRECT: offsets and lengths must be aligned to `logical_block_size`, buffers to
    /// the disk's buffer alignment.
    pub direct_io: bool,
    /// The disk can discard (block devices whose queue has `discard_max_bytes > 0`: `BLKDISCARD` or
    /// `BLOCK_URING_CMD_DISCARD`; files: punch-hole, always offered).
    pub discard: bool,
    /// The disk can write zeroes (`fallocate` ZERO_RANGE or PUNCH_HOLE; on block devices the kernel writes zero
    /// pages where the device has no write-zeroes command, so it is always offered).
    pub write_zeroes: bool,
    /// Granularity of discards in bytes (the device's discard granularity, or the file system block size).
    pub discard_granularity: u32,
}

impl Geometry {
    /// Size in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.capacity.0.saturating_mul(crate::units::SECTOR_SIZE)
    }

    /// The geometry tests and benchmarks start from (feature `test-utils`): `capacity` sectors, 512-byte logical
    /// and 4 KiB physical blocks, writable, buffered I/O, discard (4 KiB granularity) and write-zeroes. Change
    /// what a test needs with struct update syntax.
    #[cfg(any(test, feature = "test-utils"))]
    pub fn for_tests(capacity: Sector) -> Geometry {
        Geometry {
            capacity,
            logical_block_size: BlockSize::SECTOR,
            physical_block_size: BlockSize::PAGE,
            read_only: false,
            direct_io: false,
            discard: true,
            write_zeroes: true,
            discard_granularity: 4096,
        }
    }
}
