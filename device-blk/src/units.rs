// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Newtypes for the units a block device speaks in.

use std::fmt;

/// Size of the sector unit used by every block protocol we serve (virtio-blk and blkif): 512 bytes.
pub const SECTOR_SIZE: u64 = 512;
/// `log2(SECTOR_SIZE)`.
pub const SECTOR_SHIFT: u32 = 9;

/// A position or a count in 512-byte sectors, whatever the disk's logical block size.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Sector(pub u64);

impl Sector {
    /// The byte offset of this sector, or `None` if it does not fit in a `u64`.
    pub fn to_bytes(self) -> Option<u64> {
        self.0.checked_mul(SECTOR_SIZE)
    }

    /// The whole number of sectors in `bytes` (rounded down).
    pub fn from_bytes_floor(bytes: u64) -> Sector {
        Sector(bytes >> SECTOR_SHIFT)
    }

    /// `self + count`, or `None` on overflow.
    pub fn checked_add(self, count: u64) -> Option<Sector> {
        self.0.checked_add(count).map(Sector)
    }
}

impl fmt::Display for Sector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sector {}", self.0)
    }
}

/// A block size in bytes: a power of two between 512 and 64 KiB.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BlockSize(u32);

impl BlockSize {
    /// 512 bytes, the protocols' sector.
    pub const SECTOR: BlockSize = BlockSize(512);
    /// 4 KiB.
    pub const PAGE: BlockSize = BlockSize(4096);

    /// A block size, if `bytes` is a power of two in `512..=65536`.
    pub fn new(bytes: u32) -> Option<BlockSize> {
        (bytes.is_power_of_two() && (512..=65536).contains(&bytes)).then_some(BlockSize(bytes))
    }

    /// The size in bytes.
    pub fn bytes(self) -> u32 {
        self.0
    }

    /// The size in bytes as `u64`.
    pub fn bytes_u64(self) -> u64 {
        u64::from(self.0)
    }

    /// Number of 512-byte sectors in one block.
    pub fn sectors(self) -> u64 {
        u64::from(self.0) / SECTOR_SIZE
    }

    /// Whether `value` is a multiple of this block size.
    pub fn divides(self, value: u64) -> bool {
        value & (u64::from(self.0) - 1) == 0
    }
}

impl fmt::Display for BlockSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} bytes", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_size_accepts_only_powers_of_two_in_range() {
        assert!(BlockSize::new(512).is_some());
        assert!(BlockSize::new(4096).is_some());
        assert!(BlockSize::new(65536).is_some());
        assert!(BlockSize::new(256).is_none());
        assert!(BlockSize::new(1000).is_none());
        assert!(BlockSize::new(131072).is_none());
        assert_eq!(BlockSize::PAGE.sectors(), 8);
        assert!(BlockSize::PAGE.divides(8192));
        assert!(!BlockSize::PAGE.divides(512));
    }

    #[test]
    fn sector_arithmetic_detects_overflow() {
        assert_eq!(Sector(1).to_bytes(), Some(512));
        assert_eq!(Sector(u64::MAX).to_bytes(), None);
        assert_eq!(Sector(u64::MAX).checked_add(1), None);
        assert_eq!(Sector::from_bytes_floor(1023), Sector(1));
    }
}
