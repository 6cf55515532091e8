// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Guest RAM of the test driver: a memfd mapped shared, so the daemon can map the same pages.

use std::io;
use std::ops::Range;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;

/// A shared memory region the driver puts data buffers in.
pub struct SharedMem {
    ptr: NonNull<u8>,
    len: usize,
    fd: OwnedFd,
}

// SAFETY: the mapping is plain memory owned by this value; access goes through `&self`/`&mut self`.
unsafe impl Send for SharedMem {}

impl SharedMem {
    /// `len` bytes of zeroed shared memory.
    pub fn new(len: usize) -> io::Result<Self> {
        // SAFETY: a valid NUL-terminated name and flags.
        let raw = unsafe { libc::memfd_create(c"guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: memfd_create returned a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let size = libc::off_t::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: plain ftruncate on our descriptor.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), size) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh shared mapping of the whole memfd; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned NULL"))?;
        Ok(SharedMem { ptr, len, fd })
    }

    /// Process address of the first byte (the IOVA the vhost-user driver uses).
    pub fn addr(&self) -> usize {
        self.ptr.as_ptr() as usize
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// The memfd.
    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Pointer to byte `offset` (which must be in bounds).
    pub fn ptr(&self, offset: usize) -> *mut u8 {
        assert!(offset <= self.len, "offset {offset} beyond {}", self.len);
        // SAFETY: in bounds of the mapping, checked above.
        unsafe { self.ptr.as_ptr().add(offset) }
    }

    /// The bytes in `range` (read only while the device is not writing them).
    pub fn bytes(&self, range: Range<usize>) -> &[u8] {
        assert!(range.start <= range.end && range.end <= self.len);
        // SAFETY: in bounds; the device writes these bytes only while a request on them is in flight, and the
        // tests read them after it completed.
        unsafe { std::slice::from_raw_parts(self.ptr(range.start), range.len()) }
    }

    /// The bytes in `range`, writable.
    pub fn bytes_mut(&mut self, range: Range<usize>) -> &mut [u8] {
        assert!(range.start <= range.end && range.end <= self.len);
        // SAFETY: in bounds, and `&mut self` makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr(range.start), range.len()) }
    }
}

impl Drop for SharedMem {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping created in `new`.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}
