// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Real failing storage for the fault and durability tests: a small file system that can be filled up
//! (ENOSPC), sparse images, reads past every cache, where a file's blocks lie, and a file system on a loop device
//! whose end is cut off (EIO from the block layer).

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use crate::{command, utf8, LoopDevice, Mount};

/// Fill the file system holding `dir` with a file `name` until it has no space left; returns the file, whose
/// removal makes room again.
pub fn fill_up(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    let mut file = File::create(&path).expect("create the filler file");
    let chunk = vec![0xf1u8; 64 << 10];
    let mut piece = chunk.len();
    while piece > 0 {
        match file.write(&chunk[..piece]) {
            Ok(0) => break,
            Ok(_) => {}
            // Try smaller pieces until not even a page fits.
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => piece /= 2,
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
    file.sync_all().expect("sync the filler");
    path
}

/// A sparse file of `size` bytes at `path` that starts with `data` (allocated) and is a hole after it.
pub fn sparse_file(path: &Path, size: u64, data: &[u8]) {
    let mut file = File::create(path).expect("create the image");
    file.write_all(data).expect("write the image's data");
    file.set_len(size).expect("size the image");
    file.sync_all().expect("sync the image");
}

/// Read `len` bytes at `offset` of `path` with O_DIRECT (past any cache of the device or file).
pub fn read_direct(path: &Path, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    const ALIGN: usize = 4096;
    let file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(path)?;
    let mut raw = vec![0u8; len + ALIGN];
    let start = raw.as_ptr().align_offset(ALIGN);
    let buf = &mut raw[start..start + len];
    file.read_exact_at(buf, offset)?;
    Ok(buf.to_vec())
}

/// The physical byte offset on its device of every 4 KiB block of `file` (FIEMAP), `None` for a hole.
pub fn physical_blocks(file: &File, len: u64) -> Vec<Option<u64>> {
    const FS_IOC_FIEMAP: libc::c_ulong = 0xc020_660b;
    const FIEMAP_FLAG_SYNC: u32 = 1;
    const EXTENTS: usize = 64;
    // `struct fiemap` (32 bytes) followed by `struct fiemap_extent`s (56 bytes each), as u64 words.
    let mut buf = vec![0u64; (32 + 56 * EXTENTS) / 8];
    buf[1] = len; // fm_length (fm_start = 0)
    buf[2] = u64::from(FIEMAP_FLAG_SYNC); // fm_flags; fm_mapped_extents = 0
    buf[3] = EXTENTS as u64; // fm_extent_count; reserved = 0
                             // SAFETY: FIEMAP reads the header and writes at most `fm_extent_count` extents into `buf`, which has room.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), FS_IOC_FIEMAP, buf.as_mut_ptr()) };
    assert_eq!(rc, 0, "FIEMAP: {}", io::Error::last_os_error());
    let mapped = (buf[2] >> 32) as usize;
    let mut blocks = vec![None; (len / 4096) as usize];
    for e in 0..mapped.min(EXTENTS) {
        // fe_logical, fe_physical, fe_length at words 0..3 of the extent.
        let w = 4 + e * 7;
        let (logical, physical, length) = (buf[w], buf[w + 1], buf[w + 2]);
        for off in (0..length).step_by(4096) {
            if let Some(slot) = blocks.get_mut(((logical + off) / 4096) as usize) {
                *slot = Some(physical + off);
            }
        }
    }
    blocks
}

/// An ext4 file system (no journal) on a loop device over a file, mounted: a file system whose device can be
/// cut short under it, so that reading blocks beyond the new end fails in the block layer with EIO.
#[derive(Debug)]
pub struct Ext4OnLoop {
    // Field order is drop order: unmount, then detach, then remove the backing file.
    /// The mounted file system.
    pub mount: Mount,
    /// Its device.
    pub device: LoopDevice,
    backing: PathBuf,
    _dir: tempfile::TempDir,
}

impl Ext4OnLoop {
    /// A fresh file system of `mib` MiB, or why not.
    pub fn new(mib: u64) -> Result<Ext4OnLoop, String> {
        command("mkfs.ext4", &["-V"])?;
        let dir = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
        let backing = dir.path().join("fs.img");
        File::create(&backing).and_then(|f| f.set_len(mib << 20)).map_err(|e| format!("backing file: {e}"))?;
        // No journal and no lazy initialisation: nothing the file system writes later lies far from its start.
        command(
            "mkfs.ext4",
            &["-q", "-F", "-b", "4096", "-O", "^has_journal", "-E", "lazy_itable_init=0", utf8(&backing)?],
        )?;
        let device = LoopDevice::attach(&backing)?;
        let mount = Mount::device(&device.path)?;
        Ok(Ext4OnLoop { mount, device, backing, _dir: dir })
    }

    /// Cut the device to its first `bytes` bytes (the file system above it stays mounted).
    pub fn cut_device(&self, bytes: u64) {
        File::options().write(true).open(&self.backing).and_then(|f| f.set_len(bytes)).expect("truncate backing");
        self.device.refresh_capacity().expect("losetup -c");
        assert_eq!(self.device.size(), bytes, "the loop device shrank");
    }
}
