//! What a disk looks like to a guest: size, block sizes, capabilities.

use crate::units::{BlockSize, Sector};

/// Geometry and capabilities of an open disk, fixed for the life of the open descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Size in 512-byte sectors (rounded down: a trailing partial sector is never exposed).
    pub capacity: Sector,
    /// Smallest unit the disk can address (what O_DIRECT alignment is checked against).
    pub logical_block_size: BlockSize,
    /// The disk's physical block size (a hint for the guest's I/O sizes).
    pub physical_block_size: BlockSize,
    /// Writes, discards and write-zeroes are refused.
    pub read_only: bool,
    /// Buffers, offsets and lengths must be aligned to `logical_block_size` (the disk was opened with O_DIRECT).
    pub direct_io: bool,
    /// The disk can discard (BLKDISCARD on a block device, punch-hole on a file).
    pub discard: bool,
    /// The disk can write zeroes efficiently (fallocate ZERO_RANGE / BLKZEROOUT).
    pub write_zeroes: bool,
    /// Granularity of discards in bytes (the device's discard granularity, or the file system block size).
    pub discard_granularity: u32,
}

impl Geometry {
    /// Size in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.capacity.0.saturating_mul(crate::units::SECTOR_SIZE)
    }
}
