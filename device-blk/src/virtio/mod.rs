// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! virtio-blk: request parsing from `virtio-queue` descriptor chains, the device configuration space, feature
//! bits, and the device serial (GET_ID).
//!
//! The parser turns one descriptor chain into the transport-neutral [`Request`](crate::Request) (shape checks:
//! lengths, directions, segment counts, the discard/write-zeroes range); everything about the disk (bounds,
//! read-only, alignment) is checked later by [`Request::validate`](crate::Request::validate) in the
//! [`BlockQueue`](crate::BlockQueue). Statuses are mapped once, by [`status_code`].

mod chain;
mod config;
mod serial;

pub use chain::{max_chain_len, parse_chain, ChainError, Parsed, HEADER_BYTES, RANGE_BYTES};
pub use config::{device_features, BlkConfig, CONFIG_SPACE_SIZE, MAX_RANGE_SEGMENTS};
pub use serial::{default_serial, serial_from_str, SerialError};

use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP};

use crate::request::{Status, MAX_SEGMENTS};

/// The virtio-blk status byte for `status`.
pub fn status_code(status: Status) -> u8 {
    let code = match status {
        Status::Ok => VIRTIO_BLK_S_OK,
        Status::IoError => VIRTIO_BLK_S_IOERR,
        Status::Unsupported => VIRTIO_BLK_S_UNSUPP,
    };
    // The status codes are 0, 1 and 2.
    u8::try_from(code).unwrap_or(u8::MAX)
}

/// The `seg_max` we advertise for a queue of `queue_size` descriptors: as many data segments as fit next to
/// the header and status descriptors in a ring without indirect descriptors, at most [`MAX_SEGMENTS`].
pub fn seg_max_for(queue_size: u16) -> u32 {
    let fits = u32::from(queue_size).saturating_sub(2).max(1);
    fits.min(u32::try_from(MAX_SEGMENTS).unwrap_or(u32::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes_follow_the_spec() {
        assert_eq!(status_code(Status::Ok), 0);
        assert_eq!(status_code(Status::IoError), 1);
        assert_eq!(status_code(Status::Unsupported), 2);
    }

    #[test]
    fn seg_max_leaves_room_for_header_and_status() {
        assert_eq!(seg_max_for(4), 2);
        assert_eq!(seg_max_for(128), 126);
        assert_eq!(seg_max_for(256), 254);
        assert_eq!(seg_max_for(1024), 256);
        assert_eq!(seg_max_for(1), 1);
    }
}
