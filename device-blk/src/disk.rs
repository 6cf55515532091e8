// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Opening the disk: a regular file or a block device, O_DIRECT where possible, geometry, and the diskseq pin.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::geometry::Geometry;
use crate::units::{BlockSize, Sector};

// Block-layer ioctls from <linux/fs.h> (all take or return through a pointer argument).
const BLKROGET: libc::c_ulong = 0x125e; // _IO(0x12, 94), int
const BLKSSZGET: libc::c_ulong = 0x1268; // _IO(0x12, 104), int
const BLKPBSZGET: libc::c_ulong = 0x127b; // _IO(0x12, 123), unsigned int
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272; // _IOR(0x12, 114, size_t)
const BLKGETDISKSEQ: libc::c_ulong = 0x8008_1280; // _IOR(0x12, 128, __u64)
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
                let mut actual: u64 = 0;
                // SAFETY: BLKGETDISKSEQ writes one u64 through the pointer.
                let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETDISKSEQ, &mut actual) };
                if rc == 0 && actual != diskseq {
                    return Err(DiskError::DiskseqMismatch { path, expected: diskseq, actual });
                }
                let mut size: u64 = 0;
                // SAFETY: BLKGETSIZE64 writes one u64 through the pointer.
                if unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size) } < 0 {
                    let source = io::Error::last_os_error();
                    return Err(DiskError::Geometry { path, what: "BLKGETSIZE64", cause: source });
                }
                size
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
            DiskKind::BlockDevice { .. } => {
                let mut size: u64 = 0;
                // SAFETY: BLKGETSIZE64 writes one u64 through the pointer.
                if unsafe { libc::ioctl(self.file.as_raw_fd(), BLKGETSIZE64, &mut size) } < 0 {
                    return Err(geo_err("BLKGETSIZE64", io::Error::last_os_error()));
                }
                size
            }
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

fn open_file(path: &Path, options: &DiskOptions) -> Result<(File, bool), DiskError> {
    let open = |direct: bool| {
        let mut o = OpenOptions::new();
        o.read(true).write(!options.read_only);
        let mut flags = libc::O_CLOEXEC;
        if direct {
            flags |= libc::O_DIRECT;
        }
        o.custom_flags(flags).open(path)
    };
    let err = |source| DiskError::Open { path: path.to_path_buf(), cause: source };
    if options.direct_io == DirectIo::Off {
        return open(false).map(|f| (f, false)).map_err(err);
    }
    match open(true) {
        Ok(file) => {
            if supports_direct_io(&file) {
                return Ok((file, true));
            }
            if options.direct_io == DirectIo::Required {
                return Err(DiskError::DirectIoUnsupported { path: path.to_path_buf() });
            }
            open(false).map(|f| (f, false)).map_err(err)
        }
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) && options.direct_io == DirectIo::Auto => {
            tracing::debug!(path = %path.display(), "O_DIRECT refused by the file system, using buffered I/O");
            open(false).map(|f| (f, false)).map_err(err)
        }
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            Err(DiskError::DirectIoUnsupported { path: path.to_path_buf() })
        }
        Err(e) => Err(err(e)),
    }
}

/// Stop the kernel from keeping the access time of a regular `file` as the guest reads it (`O_NOATIME`, set on the
/// open file description, so it goes with the descriptor to a worker): every read otherwise checks whether the
/// access time is due (`touch_atime`, about 3 % of the I/O thread's time for 4 KiB reads of a file on tmpfs),
/// and a disk image's access time tells nothing a backend should keep. Only the file's owner (or `CAP_FOWNER`)
/// may set it; for anyone else the file stays as it was.
fn skip_access_times(file: &File, path: &Path) {
    let fd = file.as_raw_fd();
    // SAFETY: F_GETFL on a valid descriptor, no pointer argument.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 || flags & libc::O_NOATIME != 0 {
        return;
    }
    // SAFETY: F_SETFL with an integer argument on a valid descriptor.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NOATIME) } < 0 {
        let error = io::Error::last_os_error();
        tracing::debug!(path = %path.display(), %error, "access times stay on (O_NOATIME refused)");
    }
}

/// Whether direct I/O really works on `file`: statx's DIOALIGN where the kernel reports it.
fn supports_direct_io(file: &File) -> bool {
    match statx_dio_align(file) {
        Some((_mem, offset)) => offset != 0,
        // Unknown (old kernel): the open succeeded, trust it.
        None => true,
    }
}

/// `(stx_dio_mem_align, stx_dio_offset_align)` if the kernel reports them.
fn statx_dio_align(file: &File) -> Option<(u32, u32)> {
    // SAFETY: statx is plain old data; all-zero is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: valid descriptor, empty path with AT_EMPTY_PATH, and a properly sized out-buffer.
    let rc =
        unsafe { libc::statx(file.as_raw_fd(), c"".as_ptr(), libc::AT_EMPTY_PATH, libc::STATX_DIOALIGN, &mut stx) };
    (rc == 0 && stx.stx_mask & libc::STATX_DIOALIGN != 0).then_some((stx.stx_dio_mem_align, stx.stx_dio_offset_align))
}

/// The memory alignment O_DIRECT needs on `file`: statx where the kernel reports it (files on most file systems,
/// block devices since 6.11), else the device's DMA alignment from sysfs, else the logical block size.
/// Whether `file` (of `kind`) is a regular file on tmpfs (`fstatfs`; a failure counts as "no").
fn file_in_memory(file: &File, kind: DiskKind) -> bool {
    if kind != DiskKind::File {
        return false;
    }
    // SAFETY: an all-zero `statfs` is a valid value of the plain C struct.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `fs` is a live, writable `statfs` for the duration of the call; the descriptor is the disk's own.
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut fs) } != 0 {
        return false;
    }
    fs.f_type == libc::TMPFS_MAGIC
}

fn direct_io_memory_alignment(file: &File, kind: DiskKind, geometry: &Geometry) -> usize {
    let reported = statx_dio_align(file).map(|(mem, _)| mem).filter(|mem| *mem > 0);
    let from_sysfs = || match kind {
        DiskKind::BlockDevice { major, minor, .. } => {
            let text = std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/queue/dma_alignment")).ok()?;
            text.trim().parse::<u32>().ok()?.checked_add(1)
        }
        DiskKind::File => None,
    };
    let align = reported.or_else(from_sysfs).unwrap_or(geometry.logical_block_size.bytes());
    let align = if align.is_power_of_two() { align } else { geometry.logical_block_size.bytes() };
    usize::try_from(align).unwrap_or(4096)
}

fn file_geometry(file: &File, meta: &std::fs::Metadata, direct: bool) -> Geometry {
    let dio_align = if direct { statx_dio_align(file).map(|(_, off)| off).unwrap_or(512) } else { 512 };
    let logical = BlockSize::new(dio_align).unwrap_or(BlockSize::SECTOR);
    let fs_block = u32::try_from(meta.blksize()).ok().and_then(BlockSize::new).unwrap_or(BlockSize::PAGE);
    Geometry {
        capacity: Sector::from_bytes_floor(meta.len()),
        logical_block_size: logical,
        physical_block_size: fs_block.max(logical),
        read_only: false,
        direct_io: direct,
        discard: true,
        write_zeroes: true,
        discard_granularity: fs_block.bytes(),
    }
}

fn block_device_geometry(file: &File, path: &Path, major: u32, minor: u32) -> Result<Geometry, DiskError> {
    let fd = file.as_raw_fd();
    let geo_err = |what, source| DiskError::Geometry { path: path.to_path_buf(), what, cause: source };
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer.
    if unsafe { libc::ioctl(fd, BLKGETSIZE64, &mut size) } < 0 {
        return Err(geo_err("BLKGETSIZE64", io::Error::last_os_error()));
    }
    let mut lbs: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer.
    if unsafe { libc::ioctl(fd, BLKSSZGET, &mut lbs) } < 0 {
        return Err(geo_err("BLKSSZGET", io::Error::last_os_error()));
    }
    let mut pbs: libc::c_uint = 0;
    // SAFETY: BLKPBSZGET writes one unsigned int through the pointer.
    if unsafe { libc::ioctl(fd, BLKPBSZGET, &mut pbs) } < 0 {
        return Err(geo_err("BLKPBSZGET", io::Error::last_os_error()));
    }
    let mut ro: libc::c_int = 0;
    // SAFETY: BLKROGET writes one int through the pointer.
    if unsafe { libc::ioctl(fd, BLKROGET, &mut ro) } < 0 {
        return Err(geo_err("BLKROGET", io::Error::last_os_error()));
    }
    let logical = u32::try_from(lbs).ok().and_then(BlockSize::new).unwrap_or(BlockSize::SECTOR);
    let physical = BlockSize::new(pbs).unwrap_or(logical).max(logical);
    let queue_attr = |name: &str| -> Option<u64> {
        std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/queue/{name}")).ok()?.trim().parse().ok()
    };
    let discard = queue_attr("discard_max_bytes").is_some_and(|v| v > 0);
    let granularity = queue_attr("discard_granularity").and_then(|g| u32::try_from(g).ok()).filter(|g| *g > 0);
    Ok(Geometry {
        capacity: Sector::from_bytes_floor(size),
        logical_block_size: logical,
        physical_block_size: physical,
        read_only: ro != 0,
        direct_io: false,
        discard,
        // fallocate(ZERO_RANGE) on a block device (BLKZEROOUT semantics) writes zero pages where the device has no
        // write-zeroes command.
        write_zeroes: true,
        discard_granularity: granularity.unwrap_or(logical.bytes()),
    })
}

/// The disk sequence number of the opened block device: `BLKGETDISKSEQ` on the descriptor, else sysfs.
fn read_diskseq(file: &File, major: u32, minor: u32) -> io::Result<u64> {
    let mut seq: u64 = 0;
    // SAFETY: BLKGETDISKSEQ writes one u64 through the pointer.
    if unsafe { libc::ioctl(file.as_raw_fd(), BLKGETDISKSEQ, &mut seq) } == 0 {
        return Ok(seq);
    }
    let ioctl_err = io::Error::last_os_error();
    // The sysfs fallback names the same device by number; it is read after the open, so it describes the disk
    // behind this descriptor unless the minor is reused in between (which the ioctl path excludes).
    let text = std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/diskseq")).map_err(|_| ioctl_err)?;
    text.trim().parse().map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "unparsable sysfs diskseq"))
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
