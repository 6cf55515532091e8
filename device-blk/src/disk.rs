// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Opening the disk: a regular file or a block device, O_DIRECT where possible, geometry, and the diskseq pin.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::geometry::Geometry;
use crate::units::Sector;

mod probe;
use probe::{
    block_device_bytes, block_device_geometry, direct_io_memory_alignment, diskseq_of, file_geometry, file_in_memory,
    open_file, read_diskseq, skip_access_times,
};

// Block-layer ioctls from <linux/fs.h> that take a `[offset, len]` byte range (`u64[2]`); those that probe the
// device are in `probe`.
/// `_IO(0x12, 119)`: discard a `[offset, len]` byte range (`u64[2]`).
pub const BLKDISCARD: libc::c_ulong = 0x1277;
/// `_IO(0x12, 125)`: secure-discard a `[offset, len]` byte range.
pub const BLKSECDISCARD: libc::c_ulong = 0x127d;
/// `_IO(0x12, 127)`: write zeroes to a `[offset, len]` byte range.
pub const BLKZEROOUT: libc::c_ulong = 0x127f;

/// How to use O_DIRECT.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DirectIo {
    /// Use O_DIRECT where the file system supports it, buffered I/O elsewhere (e.g. tmpfs).
    #[default]
    Auto,
    /// Never use O_DIRECT.
    Off,
    /// Refuse to open a disk that cannot do O_DIRECT.
    Required,
}

/// How to open a disk: `DiskOptions::default()`, then the `with_*` methods (or set the fields).
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct DiskOptions {
    /// Open read-only and refuse every modifying request.
    pub read_only: bool,
    /// O_DIRECT policy.
    pub direct_io: DirectIo,
    /// The disk sequence number the block device must have (see [`Disk::open`]).
    pub expected_diskseq: Option<u64>,
}

impl DiskOptions {
    /// Open read-only (or not).
    pub fn with_read_only(mut self, read_only: bool) -> Self {
        self.read_only = read_only;
        self
    }

    /// The O_DIRECT policy.
    pub fn with_direct_io(mut self, direct_io: DirectIo) -> Self {
        self.direct_io = direct_io;
        self
    }

    /// Pin a block device to this disk sequence number.
    pub fn with_expected_diskseq(mut self, expected_diskseq: Option<u64>) -> Self {
        self.expected_diskseq = expected_diskseq;
        self
    }
}

/// What sits behind the descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskKind {
    /// A regular file (an image).
    File,
    /// A block device with its `major:minor` and disk sequence number.
    BlockDevice {
        /// Major number.
        major: u32,
        /// Minor number.
        minor: u32,
        /// `BLKGETDISKSEQ` of the opened device.
        diskseq: u64,
    },
}

/// Why a disk could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DiskError {
    /// `open(2)` failed.
    #[error("cannot open {path}: {cause}")]
    Open {
        /// Path.
        path: PathBuf,
        /// Cause.
        cause: io::Error,
    },
    /// Opening for writing was refused (a read-only mount, no write permission, a read-only device) but the disk
    /// can be read: serving it read-only is what the user most likely wants.
    #[error(
        "cannot open {path} for writing: {source}; it can be read: serve it read-only (blkbackd vhost-user \
         --read-only), or make it writable"
    )]
    NeedsReadOnly {
        /// Path.
        path: PathBuf,
        /// Why writing was refused.
        source: io::Error,
    },
    /// A regular file nobody may write (no `w` bit), asked for read-write: root could write it anyway, but the
    /// mode says the image is meant to stay as it is.
    #[error(
        "{path} has no write permission (mode {mode:04o}), so it is not served read-write, even to root: serve it \
         read-only (blkbackd vhost-user --read-only), or give it write permission (chmod u+w) if the guest may \
         change it"
    )]
    WriteProtected {
        /// Path.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// Neither a regular file nor a block device.
    #[error("{path} is neither a regular file nor a block device")]
    NotADisk {
        /// Path.
        path: PathBuf,
    },
    /// An ioctl or stat on the open descriptor failed.
    #[error("cannot read the geometry of {path} ({what}): {cause}")]
    Geometry {
        /// Path.
        path: PathBuf,
        /// The query that failed.
        what: &'static str,
        /// Cause.
        cause: io::Error,
    },
    /// The opened device is not the disk the toolstack named.
    #[error(
        "{path}: disk sequence number mismatch: expected {expected} ({expected:#x}), the opened device has \
         {actual} ({actual:#x}); the device node now belongs to another disk"
    )]
    DiskseqMismatch {
        /// Path.
        path: PathBuf,
        /// What the caller pinned.
        expected: u64,
        /// What the opened device reports.
        actual: u64,
    },
    /// A diskseq pin on something that has none.
    #[error("{path} is a regular file: only block devices have a disk sequence number, so it cannot be pinned")]
    DiskseqOnFile {
        /// Path.
        path: PathBuf,
    },
    /// The kernel reports no diskseq for the device (kernels before 5.15).
    #[error("cannot read the disk sequence number of {path}: {cause}")]
    DiskseqUnavailable {
        /// Path.
        path: PathBuf,
        /// Cause.
        cause: io::Error,
    },
    /// O_DIRECT was required but the file system refuses it.
    #[error("{path} does not support O_DIRECT")]
    DirectIoUnsupported {
        /// Path.
        path: PathBuf,
    },
    /// The disk became smaller while served.
    #[error(
        "{path} shrank from {} to {} sectors while served: refused (requests may address the blocks that went \
         away; detach the disk from the guest before shrinking it)", from.0, to.0
    )]
    Shrunk {
        /// Path.
        path: PathBuf,
        /// The size served.
        from: Sector,
        /// The size found.
        to: Sector,
    },
    /// The disk is smaller than one logical block.
    #[error("{path} is empty (smaller than one {block_size}-byte block)")]
    Empty {
        /// Path.
        path: PathBuf,
        /// Logical block size.
        block_size: u32,
    },
}

/// An open disk: the descriptor every queue's engine does I/O on, plus its fixed geometry.
///
/// `Disk` is shared between queues by `Arc`; there is no lock around it (each queue has its own engine).
#[derive(Debug)]
pub struct Disk {
    file: File,
    path: PathBuf,
    kind: DiskKind,
    geometry: Geometry,
    buffer_alignment: usize,
    /// The size in sectors now: it starts at `geometry.capacity` and only grows ([`Disk::refresh_size`]); the
    /// queues serving the disk read it for every request ([`BlockQueue::follow_capacity`](crate::BlockQueue)).
    capacity: Arc<AtomicU64>,
    /// A file on tmpfs (in memory), found when the disk is opened (see [`Disk::in_memory`]).
    in_memory: bool,
}

/// What [`Disk::refresh_size`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SizeChange {
    /// The same size as before.
    Unchanged(Sector),
    /// The disk grew: guests may now address up to `to`.
    Grown {
        /// The size before.
        from: Sector,
        /// The size now.
        to: Sector,
    },
}

impl Disk {
    /// Open `path` as the options say.
    ///
    /// With `expected_diskseq` set, the disk sequence number is read from the *opened descriptor*
    /// (`BLKGETDISKSEQ`, falling back to sysfs for the same `major:minor`) and the open is refused if it differs:
    /// a device node whose minor was reused for another disk is never served in its place.
    pub fn open(path: impl AsRef<Path>, options: &DiskOptions) -> Result<Disk, DiskError> {
        let path = path.as_ref().to_path_buf();
        let (file, direct) = open_file(&path, options).map_err(|e| read_only_hint(e, options))?;
        let meta = file.metadata().map_err(|source| DiskError::Geometry {
            path: path.clone(),
            what: "fstat",
            cause: source,
        })?;
        let file_type = meta.file_type();
        if file_type.is_file() && !options.read_only && meta.mode() & 0o222 == 0 {
            return Err(DiskError::WriteProtected { path, mode: meta.mode() & 0o7777 });
        }
        if file_type.is_file() {
            skip_access_times(&file, &path);
        }
        let (kind, mut geometry) = if file_type.is_block_device() {
            let rdev = meta.rdev();
            let (major, minor) = (libc::major(rdev), libc::minor(rdev));
            let diskseq = match read_diskseq(&file, major, minor) {
                Ok(seq) => seq,
                Err(source) if options.expected_diskseq.is_some() => {
                    return Err(DiskError::DiskseqUnavailable { path, cause: source })
                }
                Err(_) => 0,
            };
            let geometry = block_device_geometry(&file, &path, major, minor)?;
            (DiskKind::BlockDevice { major, minor, diskseq }, geometry)
        } else if file_type.is_file() {
            if options.expected_diskseq.is_some() {
                return Err(DiskError::DiskseqOnFile { path });
            }
            (DiskKind::File, file_geometry(&file, &meta, direct))
        } else {
            return Err(DiskError::NotADisk { path });
        };
        if let (Some(expected), DiskKind::BlockDevice { diskseq: actual, .. }) = (options.expected_diskseq, kind) {
            if expected != actual {
                return Err(DiskError::DiskseqMismatch { path, expected, actual });
            }
        }
        if geometry.read_only && !options.read_only {
            tracing::warn!(path = %path.display(), "the block device is read-only (BLKROGET): serving it read-only");
        }
        geometry.read_only |= options.read_only;
        geometry.direct_io = direct;
        // Never expose a trailing partial logical block: the guest addresses whole blocks only, so the tail could
        // be neither read nor written. Served with a warning rather than refused: images whose size is not a
        // multiple of the block size are common (raw exports, hand-made files) and the tail holds no guest data.
        let size = if kind == DiskKind::File { meta.len() } else { geometry.size_bytes() };
        let lbs_sectors = geometry.logical_block_size.sectors();
        geometry.capacity = Sector(geometry.capacity.0 / lbs_sectors * lbs_sectors);
        if geometry.capacity.0 == 0 {
            return Err(DiskError::Empty { path, block_size: geometry.logical_block_size.bytes() });
        }
        let left_out = size - geometry.size_bytes();
        if left_out > 0 {
            let block = geometry.logical_block_size.bytes();
            tracing::warn!(
                path = %path.display(), size, served = geometry.size_bytes(), left_out,
                "the disk is not a whole number of {block}-byte blocks: its last {left_out} bytes are not served"
            );
        }
        tracing::info!(
            path = %path.display(), ?kind, sectors = geometry.capacity.0, direct, read_only = geometry.read_only,
            "disk opened"
        );
        let buffer_alignment = if direct { direct_io_memory_alignment(&file, kind, &geometry) } else { 1 };
        let capacity = Arc::new(AtomicU64::new(geometry.capacity.0));
        let in_memory = file_in_memory(&file, kind);
        Ok(Disk { file, path, kind, geometry, buffer_alignment, capacity, in_memory })
    }

    /// A disk another process opened (and pinned) with [`Disk::open`] and handed over as a descriptor, with the
    /// geometry, kind and buffer alignment that process read: a sandboxed process that may not open files or read
    /// sysfs serves it as is.
    ///
    /// The descriptor is checked against what it is said to be: its file type, its `major:minor` and (for block
    /// devices) its disk sequence number as `BLKGETDISKSEQ` reports it; a capacity the descriptor cannot hold is
    /// refused. A mismatch means the sender is confused or hostile: nothing is served.
    pub fn from_parts(
        file: File,
        path: PathBuf,
        kind: DiskKind,
        geometry: Geometry,
        buffer_alignment: usize,
    ) -> Result<Disk, DiskError> {
        let meta = file.metadata().map_err(|source| DiskError::Geometry {
            path: path.clone(),
            what: "fstat",
            cause: source,
        })?;
        let actual_size = match kind {
            DiskKind::File if meta.file_type().is_file() => meta.len(),
            DiskKind::BlockDevice { major, minor, diskseq } if meta.file_type().is_block_device() => {
                let rdev = meta.rdev();
                if (libc::major(rdev), libc::minor(rdev)) != (major, minor) {
                    return Err(DiskError::NotADisk { path });
                }
                if let Some(actual) = diskseq_of(&file).ok().filter(|actual| *actual != diskseq) {
                    return Err(DiskError::DiskseqMismatch { path, expected: diskseq, actual });
                }
                match block_device_bytes(&file) {
                    Ok(size) => size,
                    Err(cause) => return Err(DiskError::Geometry { path, what: "BLKGETSIZE64", cause }),
                }
            }
            _ => return Err(DiskError::NotADisk { path }),
        };
        if geometry.size_bytes() > actual_size || geometry.capacity.0 == 0 {
            return Err(DiskError::Empty { path, block_size: geometry.logical_block_size.bytes() });
        }
        let buffer_alignment = if buffer_alignment.is_power_of_two() { buffer_alignment } else { 4096 };
        let capacity = Arc::new(AtomicU64::new(geometry.capacity.0));
        let in_memory = file_in_memory(&file, kind);
        Ok(Disk { file, path, kind, geometry, buffer_alignment, capacity, in_memory })
    }

    /// The same disk (a duplicate of its descriptor) with discards refused: a guest that was told the disk
    /// cannot discard (Xen's `discard-enable` = 0) gets "not supported" for every discard it sends anyway.
    pub fn without_discard(&self) -> io::Result<Disk> {
        let mut geometry = self.geometry;
        geometry.discard = false;
        Ok(Disk {
            file: self.file.try_clone()?,
            path: self.path.clone(),
            kind: self.kind,
            geometry,
            buffer_alignment: self.buffer_alignment,
            // The same disk: a resize is seen through both.
            capacity: self.capacity.clone(),
            in_memory: self.in_memory,
        })
    }

    /// Whether the disk is a file on tmpfs: its data is in memory, the kernel has no asynchronous path to it
    /// (io_uring hands every read and write to a worker thread), and no block layer is below it. Engines use it
    /// to run a request inline when that is cheaper than the hand-over (see `engine::uring`), and to choose
    /// how to batch ([`Batching::Auto`](crate::engine::Batching::Auto)).
    pub fn in_memory(&self) -> bool {
        self.in_memory
    }

    /// The size now, in sectors (what [`Disk::refresh_size`] last found; [`Geometry::capacity`] is the size at
    /// open).
    pub fn capacity(&self) -> Sector {
        Sector(self.capacity.load(Ordering::Acquire))
    }

    /// The shared live size, for queues that follow it.
    pub fn capacity_handle(&self) -> Arc<AtomicU64> {
        self.capacity.clone()
    }

    /// Read the size of the file or block device again (a file extended, a loop device re-read with
    /// `losetup -c`, a logical volume extended) and let every queue serve the new size. A disk only grows under a
    /// running guest: a smaller size is refused with [`DiskError::Shrunk`] (requests in flight may address the
    /// blocks that went away) and the old size stays in force.
    pub fn refresh_size(&self) -> Result<SizeChange, DiskError> {
        let geo_err = |what, source| DiskError::Geometry { path: self.path.clone(), what, cause: source };
        let bytes = match self.kind {
            DiskKind::File => self.file.metadata().map_err(|e| geo_err("fstat", e))?.len(),
            DiskKind::BlockDevice { .. } => block_device_bytes(&self.file).map_err(|e| geo_err("BLKGETSIZE64", e))?,
        };
        let lbs_sectors = self.geometry.logical_block_size.sectors();
        let now = Sector::from_bytes_floor(bytes).0 / lbs_sectors * lbs_sectors;
        let before = self.capacity.load(Ordering::Acquire);
        if now < before {
            return Err(DiskError::Shrunk { path: self.path.clone(), from: Sector(before), to: Sector(now) });
        }
        if now == before {
            return Ok(SizeChange::Unchanged(Sector(now)));
        }
        self.capacity.store(now, Ordering::Release);
        tracing::info!(path = %self.path.display(), from = before, to = now, "disk grew");
        Ok(SizeChange::Grown { from: Sector(before), to: Sector(now) })
    }

    /// The alignment in bytes that host memory buffers need for I/O on this disk: the direct-I/O memory alignment
    /// the kernel reports (statx `stx_dio_mem_align`, or the device's DMA alignment), 1 without O_DIRECT.
    ///
    /// It may be smaller than the logical block size (a 4096-byte-sector disk usually takes 512-byte aligned
    /// buffers), which is why it is separate from the offset and length alignment in [`Geometry`].
    pub fn buffer_alignment(&self) -> usize {
        self.buffer_alignment
    }

    /// The geometry the guest sees.
    pub fn geometry(&self) -> &Geometry {
        &self.geometry
    }

    /// The open descriptor.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// File or block device.
    pub fn kind(&self) -> DiskKind {
        self.kind
    }

    /// The path it was opened by.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// A refused read-write open of a disk that can be read becomes [`DiskError::NeedsReadOnly`] (the hint to pass
/// `--read-only`); every other error stays as it is.
fn read_only_hint(error: DiskError, options: &DiskOptions) -> DiskError {
    match error {
        DiskError::Open { path, cause: source }
            if !options.read_only
                && matches!(source.raw_os_error(), Some(libc::EROFS | libc::EACCES | libc::EPERM))
                && OpenOptions::new().read(true).custom_flags(libc::O_CLOEXEC).open(&path).is_ok() =>
        {
            DiskError::NeedsReadOnly { path, source }
        }
        other => other,
    }
}

/// Parse a diskseq as a user gives it on the command line: decimal (as sysfs shows it) or `0x` hex.
pub fn parse_diskseq_arg(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let parsed = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => t.parse::<u64>(),
    };
    match parsed {
        Ok(0) => Err("diskseq 0 is never assigned to a disk".to_string()),
        Ok(v) => Ok(v),
        Err(e) => Err(format!("invalid diskseq {text:?}: {e} (give decimal as in sysfs, or 0x-prefixed hex)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diskseq_argument_takes_decimal_and_hex() {
        assert_eq!(parse_diskseq_arg("42"), Ok(42));
        assert_eq!(parse_diskseq_arg("0x2a"), Ok(42));
        assert!(parse_diskseq_arg("0").is_err());
        assert!(parse_diskseq_arg("x").is_err());
        assert!(parse_diskseq_arg("0x").is_err());
        assert!(parse_diskseq_arg("99999999999999999999999").is_err());
    }

    #[test]
    fn file_geometry_and_pin_refusal() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("disk.img");
        std::fs::write(&path, vec![0u8; 8192 + 100]).expect("write");
        let disk = Disk::open(&path, &DiskOptions::default()).expect("open");
        assert_eq!(disk.kind(), DiskKind::File);
        assert_eq!(disk.geometry().capacity, Sector(16));
        assert!(!disk.geometry().read_only);
        let ro = Disk::open(&path, &DiskOptions { read_only: true, ..Default::default() }).expect("open ro");
        assert!(ro.geometry().read_only);
        let err = Disk::open(&path, &DiskOptions { expected_diskseq: Some(1), ..Default::default() })
            .expect_err("files cannot be pinned");
        assert!(matches!(err, DiskError::DiskseqOnFile { .. }), "{err}");
    }

    #[test]
    fn missing_file_and_non_disk_are_clear_errors() {
        let err = Disk::open("/nonexistent/disk.img", &DiskOptions::default()).expect_err("missing");
        assert!(err.to_string().contains("/nonexistent/disk.img"), "{err}");
        // The cause is said once: in the message, not again as the source a chain printer would add.
        let mut chain = err.to_string();
        let mut cause = std::error::Error::source(&err);
        while let Some(c) = cause {
            chain.push_str(&format!(": {c}"));
            cause = c.source();
        }
        assert_eq!(chain.matches("No such file or directory").count(), 1, "{chain}");
        let err = Disk::open("/dev/null", &DiskOptions::default()).expect_err("char device");
        assert!(matches!(err, DiskError::NotADisk { .. }), "{err}");
    }
}
