// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! [`GntAlloc`]: granting our own pages to a domain through Linux's `/dev/xen/gntalloc` (the frontend side of a
//! grant). A backend does not need it; it lets the real-Xen probe and lab tests create grants to map and copy
//! without a guest (dom0 granting pages to itself).

use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::ptr::NonNull;
use std::sync::Arc;

use super::ioctl::{self as uapi, GntallocAllocGref, GntallocDeallocGref};
use crate::services::{DomId, GrantRef, XenError, XEN_PAGE_SIZE};

/// Linux's grant-allocation device.
pub const GNTALLOC_DEVICE: &str = "/dev/xen/gntalloc";
/// Most pages granted in one allocation.
pub const MAX_ALLOC_BATCH: usize = 1024;

/// One open of `/dev/xen/gntalloc`.
#[derive(Clone, Debug)]
pub struct GntAlloc {
    file: Arc<File>,
}

impl GntAlloc {
    /// Open [`GNTALLOC_DEVICE`].
    pub fn open() -> Result<GntAlloc, XenError> {
        GntAlloc::open_path(Path::new(GNTALLOC_DEVICE))
    }

    /// Open a grant-allocation device at `path`.
    pub fn open_path(path: &Path) -> Result<GntAlloc, XenError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| XenError::os(format!("open {}", path.display()), &e))?;
        Ok(GntAlloc { file: Arc::new(file) })
    }

    /// Allocate `pages` zeroed pages, grant them to `domid` (writable or not) and map them for us.
    pub fn share(&self, domid: DomId, pages: usize, writable: bool) -> Result<GntShare, XenError> {
        let what = || format!("gntalloc: grant {pages} page(s) to domain {domid}");
        if pages == 0 || pages > MAX_ALLOC_BATCH {
            return Err(XenError::Os { what: format!("{} (1..={MAX_ALLOC_BATCH})", what()), errno: libc::EINVAL });
        }
        const HEADER_WORDS: usize = std::mem::offset_of!(GntallocAllocGref, gref_ids) / 4;
        // The kernel first copies the whole C struct (with its one-element array), so never pass less than that.
        let words_len = (HEADER_WORDS + pages).max(std::mem::size_of::<GntallocAllocGref>() / 4);
        let mut words = vec![0u32; words_len];
        let flags = if writable { uapi::GNTALLOC_FLAG_WRITABLE } else { 0 };
        let (d, f) = (domid.to_ne_bytes(), flags.to_ne_bytes());
        words[0] = u32::from_ne_bytes([d[0], d[1], f[0], f[1]]);
        words[1] = u32::try_from(pages).unwrap_or(u32::MAX);
        // SAFETY: `words` holds a complete allocation argument with room for `pages` grant ids; the kernel writes
        // the index and the ids inside it; it lives for the call.
        unsafe { uapi::ioctl(self.file.as_fd(), uapi::IOCTL_GNTALLOC_ALLOC_GREF, words.as_mut_ptr()) }
            .map_err(|e| XenError::os(what(), &e))?;
        let (lo, hi) = (words[2].to_ne_bytes(), words[3].to_ne_bytes());
        let index = u64::from_ne_bytes([lo[0], lo[1], lo[2], lo[3], hi[0], hi[1], hi[2], hi[3]]);
        let refs: Vec<GrantRef> = words[HEADER_WORDS..HEADER_WORDS + pages].to_vec();
        let len = pages * XEN_PAGE_SIZE;
        let dealloc = |file: &File| dealloc(file, index, pages);
        let Ok(offset) = libc::off_t::try_from(index) else {
            dealloc(&self.file);
            return Err(XenError::Os { what: format!("{}: index {index}", what()), errno: libc::EOVERFLOW });
        };
        // SAFETY: a fresh shared mapping chosen by the kernel of exactly the pages just allocated at `offset`.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                self.file.as_raw_fd(),
                offset,
            )
        };
        match NonNull::new(ptr.cast::<u8>()).filter(|_| ptr != libc::MAP_FAILED) {
            Some(ptr) => Ok(GntShare { file: Arc::clone(&self.file), ptr, pages, index, refs }),
            None => {
                let err = std::io::Error::last_os_error();
                dealloc(&self.file);
                Err(XenError::os(format!("{} (mmap)", what()), &err))
            }
        }
    }
}

fn dealloc(file: &File, index: u64, pages: usize) {
    let mut arg = GntallocDeallocGref { index, count: u32::try_from(pages).unwrap_or(u32::MAX) };
    // SAFETY: `arg` is the argument struct this request expects, alive for the call.
    if let Err(e) = unsafe { uapi::ioctl(file.as_fd(), uapi::IOCTL_GNTALLOC_DEALLOC_GREF, &mut arg) } {
        tracing::error!(%e, index, pages, "gntalloc: dealloc failed");
    }
}

/// Pages we granted, mapped in our address space; the grants end on drop (Xen frees the pages once no domain
/// maps them any more).
#[derive(Debug)]
pub struct GntShare {
    file: Arc<File>,
    ptr: NonNull<u8>,
    pages: usize,
    index: u64,
    refs: Vec<GrantRef>,
}

// SAFETY: plain shared memory plus a descriptor, not tied to a thread; only the raw pointer is handed out.
unsafe impl Send for GntShare {}
// SAFETY: `&GntShare` only reads fields; memory access through the pointer is the user's responsibility.
unsafe impl Sync for GntShare {}

impl GntShare {
    /// The grant refs, one per page, in order.
    pub fn refs(&self) -> &[GrantRef] {
        &self.refs
    }

    /// Our mapping of the pages.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.pages * XEN_PAGE_SIZE
    }

    /// Whether it shares nothing (never: allocations have at least one page).
    pub fn is_empty(&self) -> bool {
        self.pages == 0
    }
}

impl Drop for GntShare {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly the mapping mmap returned, unusable after drop.
        if unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len()) } != 0 {
            tracing::error!(err = %std::io::Error::last_os_error(), "gntalloc: munmap failed");
        }
        dealloc(&self.file, self.index, self.pages);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn share_on_a_non_gntalloc_file_fails_cleanly() {
        let dev = GntAlloc::open_path(Path::new("/dev/null")).expect("open /dev/null");
        let err = dev.share(0, 1, true).expect_err("not a gntalloc device");
        assert!(matches!(err, XenError::Os { errno: libc::ENOTTY, .. }), "{err}");
        assert!(dev.share(0, 0, true).is_err());
        assert!(dev.share(0, MAX_ALLOC_BATCH + 1, true).is_err());
    }
}
