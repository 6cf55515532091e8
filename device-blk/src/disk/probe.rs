// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What the disk is: opening it (O_DIRECT where it works), its geometry (a file's from statx, a block device's from
//! its ioctls and sysfs), the alignment direct I/O needs, and a block device's diskseq.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use super::{DirectIo, DiskError, DiskKind, DiskOptions};
use crate::geometry::Geometry;
use crate::units::{BlockSize, Sector};

// Block-layer ioctls from <linux/fs.h> (all return through a pointer argument).
const BLKROGET: libc::c_ulong = 0x125e; // _IO(0x12, 94), int
const BLKSSZGET: libc::c_ulong = 0x1268; // _IO(0x12, 104), int
const BLKPBSZGET: libc::c_ulong = 0x127b; // _IO(0x12, 123), unsigned int
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272; // _IOR(0x12, 114, size_t)
const BLKGETDISKSEQ: libc::c_ulong = 0x8008_1280; // _IOR(0x12, 128, __u64)

pub(super) fn open_file(path: &Path, options: &DiskOptions) -> Result<(File, bool), DiskError> {
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
pub(super) fn skip_access_times(file: &File, path: &Path) {
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
pub(super) fn supports_direct_io(file: &File) -> bool {
    match statx_dio_align(file) {
        Some((_mem, offset)) => offset != 0,
        // Unknown (old kernel): the open succeeded, trust it.
        None => true,
    }
}

/// `(stx_dio_mem_align, stx_dio_offset_align)` if the kernel reports them.
pub(super) fn statx_dio_align(file: &File) -> Option<(u32, u32)> {
    // SAFETY: statx is plain old data; all-zero is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: valid descriptor, empty path with AT_EMPTY_PATH, and a properly sized out-buffer.
    let rc =
        unsafe { libc::statx(file.as_raw_fd(), c"".as_ptr(), libc::AT_EMPTY_PATH, libc::STATX_DIOALIGN, &mut stx) };
    (rc == 0 && stx.stx_mask & libc::STATX_DIOALIGN != 0).then_some((stx.stx_dio_mem_align, stx.stx_dio_offset_align))
}

/// Whether `file` (of `kind`) is a regular file on tmpfs (`fstatfs`; a failure counts as "no").
pub(super) fn file_in_memory(file: &File, kind: DiskKind) -> bool {
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

/// The memory alignment O_DIRECT needs on `file`: statx where the kernel reports it (files on most file systems,
/// block devices since 6.11), else the device's DMA alignment from sysfs, else the logical block size.
pub(super) fn direct_io_memory_alignment(file: &File, kind: DiskKind, geometry: &Geometry) -> usize {
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

pub(super) fn file_geometry(file: &File, meta: &std::fs::Metadata, direct: bool) -> Geometry {
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

pub(super) fn block_device_geometry(file: &File, path: &Path, major: u32, minor: u32) -> Result<Geometry, DiskError> {
    let fd = file.as_raw_fd();
    let geo_err = |what, source| DiskError::Geometry { path: path.to_path_buf(), what, cause: source };
    let size = block_device_bytes(file).map_err(|e| geo_err("BLKGETSIZE64", e))?;
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

/// A block device's size in bytes (`BLKGETSIZE64`).
pub(super) fn block_device_bytes(file: &File) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points to a live u64.
    if unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

/// The opened block device's disk sequence number by `BLKGETDISKSEQ` (Linux 5.15+).
pub(super) fn diskseq_of(file: &File) -> io::Result<u64> {
    let mut seq: u64 = 0;
    // SAFETY: BLKGETDISKSEQ writes one u64 through the pointer, which points to a live u64.
    if unsafe { libc::ioctl(file.as_raw_fd(), BLKGETDISKSEQ, &mut seq) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(seq)
}

/// The disk sequence number of the opened block device: `BLKGETDISKSEQ` on the descriptor, else sysfs.
pub(super) fn read_diskseq(file: &File, major: u32, minor: u32) -> io::Result<u64> {
    let ioctl_err = match diskseq_of(file) {
        Ok(seq) => return Ok(seq),
        Err(e) => e,
    };
    // The sysfs fallback names the same device by number; it is read after the open, so it describes the disk
    // behind this descriptor unless the minor is reused in between (which the ioctl path excludes).
    let text = std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/diskseq")).map_err(|_| ioctl_err)?;
    text.trim().parse().map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "unparsable sysfs diskseq"))
}
