// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The device serial a virtio-blk GET_ID request returns: at most 20 bytes, NUL-padded.

use crate::disk::{Disk, DiskKind};
use crate::request::ID_BYTES;

/// Why a user-given serial was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SerialError {
    /// Longer than the 20 bytes GET_ID can carry.
    #[error("serial {serial:?} is {len} bytes long; at most {max} bytes fit", max = ID_BYTES)]
    TooLong {
        /// The serial.
        serial: String,
        /// Its length in bytes.
        len: usize,
    },
    /// A NUL byte would end the serial early for the guest.
    #[error("serial {0:?} contains a NUL byte")]
    Nul(String),
}

/// The GET_ID answer for a user-given serial: its bytes, NUL-padded to 20.
pub fn serial_from_str(serial: &str) -> Result<[u8; ID_BYTES], SerialError> {
    let bytes = serial.as_bytes();
    if bytes.len() > ID_BYTES {
        return Err(SerialError::TooLong { serial: serial.to_string(), len: bytes.len() });
    }
    if bytes.contains(&0) {
        return Err(SerialError::Nul(serial.to_string()));
    }
    let mut id = [0u8; ID_BYTES];
    id[..bytes.len()].copy_from_slice(bytes);
    Ok(id)
}

/// A serial for a disk the user gave none for: `diskseq-<n>` for a block device with a disk sequence number
/// (stable for the life of the disk, unlike its minor), else the file name (its last 20 bytes, so that
/// distinguishing suffixes survive).
pub fn default_serial(disk: &Disk) -> [u8; ID_BYTES] {
    let text = match disk.kind() {
        DiskKind::BlockDevice { diskseq, .. } if diskseq != 0 => format!("diskseq-{diskseq}"),
        _ => disk.path().file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
    };
    let bytes: Vec<u8> = text.bytes().filter(|&b| b != 0).collect();
    let tail = &bytes[bytes.len().saturating_sub(ID_BYTES)..];
    let mut id = [0u8; ID_BYTES];
    id[..tail.len()].copy_from_slice(tail);
    id
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::DiskOptions;

    #[test]
    fn user_serials_are_nul_padded_and_bounded() {
        let id = serial_from_str("disk-1").expect("fits");
        assert_eq!(&id[..6], b"disk-1");
        assert!(id[6..].iter().all(|&b| b == 0));
        assert!(serial_from_str("12345678901234567890").is_ok());
        assert!(matches!(serial_from_str("123456789012345678901"), Err(SerialError::TooLong { len: 21, .. })));
        assert!(matches!(serial_from_str("a\0b"), Err(SerialError::Nul(_))));
    }

    #[test]
    fn default_serial_of_a_file_is_its_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a-rather-long-image-name.img");
        std::fs::write(&path, vec![0u8; 4096]).expect("write");
        let disk = Disk::open(&path, &DiskOptions::default()).expect("open");
        assert_eq!(&default_serial(&disk), b"-long-image-name.img");
    }
}
