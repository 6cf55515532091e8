// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The virtio-blk device configuration space (`struct virtio_blk_config`) and the feature bits we offer.

use std::mem::{offset_of, size_of};

use virtio_bindings::virtio_blk::{
    virtio_blk_config, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use crate::geometry::Geometry;
use crate::request::MAX_DISCARD_SECTORS;
use crate::units::SECTOR_SIZE;

/// Bytes of configuration space we answer for: the whole `struct virtio_blk_config` of the newest spec (fields
/// of features we do not offer read as zero).
pub const CONFIG_SPACE_SIZE: usize = size_of::<virtio_blk_config>();

/// Ranges per discard or write-zeroes request (`max_discard_seg`, `max_write_zeroes_seg`).
pub const MAX_RANGE_SEGMENTS: u32 = 1;

/// The device configuration a virtio-blk driver reads, in host byte order (see [`BlkConfig::to_bytes`]).
///
/// Geometry (`cylinders`/`heads`/`sectors`), `wce` and the secure-erase and zoned fields are not offered and
/// read as zero.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlkConfig {
    /// Disk size in 512-byte sectors.
    pub capacity: u64,
    /// Largest data segment (only with `VIRTIO_BLK_F_SIZE_MAX`, which we do not offer: 0).
    pub size_max: u32,
    /// Most data segments per request.
    pub seg_max: u32,
    /// Logical block size in bytes.
    pub blk_size: u32,
    /// log2(physical block size / logical block size).
    pub physical_block_exp: u8,
    /// Offset of the first aligned logical block.
    pub alignment_offset: u8,
    /// Suggested minimum I/O size, in logical blocks.
    pub min_io_size: u16,
    /// Suggested optimal I/O size, in logical blocks (0: no hint).
    pub opt_io_size: u32,
    /// Number of request queues.
    pub num_queues: u16,
    /// Largest discard, in sectors.
    pub max_discard_sectors: u32,
    /// Ranges per discard request.
    pub max_discard_seg: u32,
    /// Discard alignment, in sectors.
    pub discard_sector_alignment: u32,
    /// Largest write-zeroes, in sectors.
    pub max_write_zeroes_sectors: u32,
    /// Ranges per write-zeroes request.
    pub max_write_zeroes_seg: u32,
    /// 1 if a write-zeroes with the unmap flag may deallocate.
    pub write_zeroes_may_unmap: u8,
}

impl BlkConfig {
    /// The configuration of a device serving a disk of `geometry` with `num_queues` queues and `seg_max`.
    pub fn new(geometry: &Geometry, num_queues: u16, seg_max: u32) -> Self {
        let logical = geometry.logical_block_size;
        let blocks_per_physical = geometry.physical_block_size.bytes() / logical.bytes();
        let physical_block_exp = u8::try_from(blocks_per_physical.trailing_zeros()).unwrap_or(0);
        let granularity = u64::from(geometry.discard_granularity).max(logical.bytes_u64());
        let discard_sector_alignment = u32::try_from(granularity / SECTOR_SIZE).unwrap_or(u32::MAX).max(1);
        let max_range = u32::try_from(MAX_DISCARD_SECTORS).unwrap_or(u32::MAX);
        BlkConfig {
            capacity: geometry.capacity.0,
            size_max: 0,
            seg_max,
            blk_size: logical.bytes(),
            physical_block_exp,
            alignment_offset: 0,
            min_io_size: u16::try_from(blocks_per_physical).unwrap_or(1),
            opt_io_size: 0,
            num_queues,
            max_discard_sectors: max_range,
            max_discard_seg: MAX_RANGE_SEGMENTS,
            discard_sector_alignment,
            max_write_zeroes_sectors: max_range,
            max_write_zeroes_seg: MAX_RANGE_SEGMENTS,
            write_zeroes_may_unmap: u8::from(geometry.discard),
        }
    }

    /// The configuration space as the driver sees it: little-endian, laid out as `struct virtio_blk_config`.
    pub fn to_bytes(&self) -> [u8; CONFIG_SPACE_SIZE] {
        let mut b = [0u8; CONFIG_SPACE_SIZE];
        let mut put = |offset: usize, bytes: &[u8]| b[offset..offset + bytes.len()].copy_from_slice(bytes);
        put(offset_of!(virtio_blk_config, capacity), &self.capacity.to_le_bytes());
        put(offset_of!(virtio_blk_config, size_max), &self.size_max.to_le_bytes());
        put(offset_of!(virtio_blk_config, seg_max), &self.seg_max.to_le_bytes());
        put(offset_of!(virtio_blk_config, blk_size), &self.blk_size.to_le_bytes());
        put(offset_of!(virtio_blk_config, physical_block_exp), &[self.physical_block_exp]);
        put(offset_of!(virtio_blk_config, alignment_offset), &[self.alignment_offset]);
        put(offset_of!(virtio_blk_config, min_io_size), &self.min_io_size.to_le_bytes());
        put(offset_of!(virtio_blk_config, opt_io_size), &self.opt_io_size.to_le_bytes());
        put(offset_of!(virtio_blk_config, num_queues), &self.num_queues.to_le_bytes());
        put(offset_of!(virtio_blk_config, max_discard_sectors), &self.max_discard_sectors.to_le_bytes());
        put(offset_of!(virtio_blk_config, max_discard_seg), &self.max_discard_seg.to_le_bytes());
        put(offset_of!(virtio_blk_config, discard_sector_alignment), &self.discard_sector_alignment.to_le_bytes());
        put(offset_of!(virtio_blk_config, max_write_zeroes_sectors), &self.max_write_zeroes_sectors.to_le_bytes());
        put(offset_of!(virtio_blk_config, max_write_zeroes_seg), &self.max_write_zeroes_seg.to_le_bytes());
        put(offset_of!(virtio_blk_config, write_zeroes_may_unmap), &[self.write_zeroes_may_unmap]);
        b
    }

    /// `size` bytes of the configuration space from `offset`, zero beyond its end (what a vhost-user
    /// `GET_CONFIG` answers).
    pub fn read(&self, offset: u32, size: u32) -> Vec<u8> {
        let bytes = self.to_bytes();
        let mut out = vec![0u8; size as usize];
        let start = (offset as usize).min(CONFIG_SPACE_SIZE);
        let end = start.saturating_add(out.len()).min(CONFIG_SPACE_SIZE);
        out[..end - start].copy_from_slice(&bytes[start..end]);
        out
    }
}

/// The virtio feature bits a device serving a disk of `geometry` offers (device-independent ring features
/// included; transports add their own, like vhost-user's `PROTOCOL_FEATURES`).
///
/// Discard and write-zeroes are offered only on a writable disk that supports them; `RO` on a read-only disk.
/// Indirect descriptors are offered so that a driver can put a whole request in one ring slot.
pub fn device_features(geometry: &Geometry) -> u64 {
    let bit = |b: u32| 1u64 << b;
    let mut features = bit(VIRTIO_F_VERSION_1)
        | bit(VIRTIO_RING_F_EVENT_IDX)
        | bit(VIRTIO_RING_F_INDIRECT_DESC)
        | bit(VIRTIO_BLK_F_SEG_MAX)
        | bit(VIRTIO_BLK_F_BLK_SIZE)
        | bit(VIRTIO_BLK_F_TOPOLOGY)
        | bit(VIRTIO_BLK_F_FLUSH)
        | bit(VIRTIO_BLK_F_MQ);
    if geometry.read_only {
        features |= bit(VIRTIO_BLK_F_RO);
    } else {
        if geometry.discard {
            features |= bit(VIRTIO_BLK_F_DISCARD);
        }
        if geometry.write_zeroes {
            features |= bit(VIRTIO_BLK_F_WRITE_ZEROES);
        }
    }
    features
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::units::Sector;

    fn geometry() -> Geometry {
        Geometry::for_tests(Sector(2048))
    }

    fn le32(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
    }

    #[test]
    fn config_space_is_laid_out_as_the_spec_says() {
        let b = BlkConfig::new(&geometry(), 2, 126).to_bytes();
        assert_eq!(CONFIG_SPACE_SIZE, 96);
        assert_eq!(&b[0..8], &2048u64.to_le_bytes()); // capacity
        assert_eq!(le32(&b, 12), 126); // seg_max
        assert_eq!(le32(&b, 20), 512); // blk_size
        assert_eq!(b[24], 3); // physical_block_exp: 4096 = 512 << 3
        assert_eq!(b[25], 0); // alignment_offset
        assert_eq!(u16::from_le_bytes([b[26], b[27]]), 8); // min_io_size in logical blocks
        assert_eq!(u16::from_le_bytes([b[34], b[35]]), 2); // num_queues
        assert_eq!(le32(&b, 36), 1 << 22); // max_discard_sectors
        assert_eq!(le32(&b, 40), 1); // max_discard_seg
        assert_eq!(le32(&b, 44), 8); // discard_sector_alignment
        assert_eq!(le32(&b, 48), 1 << 22); // max_write_zeroes_sectors
        assert_eq!(le32(&b, 52), 1); // max_write_zeroes_seg
        assert_eq!(b[56], 1); // write_zeroes_may_unmap
        assert!(b[57..].iter().all(|&x| x == 0));
    }

    #[test]
    fn partial_reads_are_zero_padded() {
        let config = BlkConfig::new(&geometry(), 1, 126);
        assert_eq!(config.read(0, 8), 2048u64.to_le_bytes().to_vec());
        assert_eq!(config.read(90, 20), vec![0u8; 20]);
        assert_eq!(config.read(1000, 4), vec![0u8; 4]);
        assert_eq!(config.read(0, 60).len(), 60);
    }

    #[test]
    fn features_follow_the_disk() {
        let has = |f: u64, bit: u32| f & (1 << bit) != 0;
        let f = device_features(&geometry());
        assert!(has(f, VIRTIO_F_VERSION_1) && has(f, VIRTIO_RING_F_EVENT_IDX) && has(f, VIRTIO_BLK_F_FLUSH));
        assert!(has(f, VIRTIO_BLK_F_DISCARD) && has(f, VIRTIO_BLK_F_WRITE_ZEROES) && has(f, VIRTIO_BLK_F_MQ));
        assert!(!has(f, VIRTIO_BLK_F_RO));
        let mut g = geometry();
        g.read_only = true;
        let f = device_features(&g);
        assert!(has(f, VIRTIO_BLK_F_RO) && !has(f, VIRTIO_BLK_F_DISCARD) && !has(f, VIRTIO_BLK_F_WRITE_ZEROES));
    }
}
