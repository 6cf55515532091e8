// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! [`GntDev`]: grant mapping and grant copy through Linux's `/dev/xen/gntdev`.
//!
//! Mapping is two steps: `IOCTL_GNTDEV_MAP_GRANT_REF` registers a batch of refs and returns an offset ("index") in
//! the device, then `mmap` of exactly that many pages at that offset maps them (the hypervisor map happens here;
//! `PROT_READ` alone makes it a read-only grant map, which a read-only grant requires). [`GntMapping`] undoes both
//! on drop: `munmap`, then `IOCTL_GNTDEV_UNMAP_GRANT_REF`. In a PV domain each batch can be mmapped once only.
//!
//! Grant copy (`IOCTL_GNTDEV_GRANT_COPY`) copies between granted pages and our own memory without mapping; each
//! segment gets a `GNTST_*` status. We check the segments the kernel would reject as a whole batch (a grant side
//! crossing its page, two local sides) and fail only those, with `gntst::BAD_COPY_ARG`.

use std::fs::{File, OpenOptions};
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::ptr::NonNull;
use std::sync::Arc;

use super::ioctl::{
    self as uapi, GntCopyForeign, GntCopyPtr, GntdevGrantCopy, GntdevGrantCopySegment, GntdevGrantRef,
    GntdevMapGrantRef, GntdevSetMaxGrants, GntdevUnmapGrantRef, GntdevUnmapNotify,
};
use crate::services::{
    gntst, CopySide, DomId, EvtchnPort, GrantCopyOp, GrantMapping, GrantRef, GrantTable, MapAccess, XenError,
    XEN_PAGE_SIZE,
};

/// Linux's grant device.
pub const GNTDEV_DEVICE: &str = "/dev/xen/gntdev";
/// The gntdev module's global limit of mapped grants (its `limit` parameter).
pub const GNTDEV_LIMIT_PARAM: &str = "/sys/module/xen_gntdev/parameters/limit";
/// Most refs we map in one batch.
pub const MAX_MAP_BATCH: usize = 1 << 16;

/// A readable name for a `GNTST_*` status.
pub fn gntst_name(status: i16) -> &'static str {
    match status {
        gntst::OKAY => "okay",
        gntst::GENERAL_ERROR => "general error",
        gntst::BAD_DOMAIN => "bad domain",
        gntst::BAD_GNTREF => "bad grant ref",
        gntst::BAD_HANDLE => "bad handle",
        gntst::BAD_VIRT_ADDR => "bad virtual address",
        gntst::BAD_DEV_ADDR => "bad device address",
        gntst::NO_DEVICE_SPACE => "no device space",
        gntst::PERMISSION_DENIED => "permission denied",
        gntst::BAD_PAGE => "bad page",
        gntst::BAD_COPY_ARG => "bad copy argument",
        gntst::ADDRESS_TOO_BIG => "address too big",
        gntst::EAGAIN => "eagain (paged out, retry)",
        -13 => "no space",
        _ => "unknown status",
    }
}

/// One open of `/dev/xen/gntdev`; cheap to clone (the descriptor is shared, as are its mappings).
#[derive(Clone, Debug)]
pub struct GntDev {
    file: Arc<File>,
}

impl GntDev {
    /// Open [`GNTDEV_DEVICE`].
    pub fn open() -> Result<GntDev, XenError> {
        GntDev::open_path(Path::new(GNTDEV_DEVICE))
    }

    /// Open a grant device at `path`.
    pub fn open_path(path: &Path) -> Result<GntDev, XenError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| XenError::os(format!("open {}", path.display()), &e))?;
        Ok(GntDev { file: Arc::new(file) })
    }

    /// A grant device opened elsewhere (a privileged process passed it over a socket).
    pub fn from_file(file: File) -> GntDev {
        GntDev { file: Arc::new(file) }
    }

    /// Limit the grants this handle maps at once (`IOCTL_GNTDEV_SET_MAX_GRANTS`). `Ok(false)` when the kernel
    /// has no per-handle limit (Linux since 3.0 only has the module's global limit, [`GntDev::global_map_limit`]).
    pub fn set_max_grants(&self, count: u32) -> Result<bool, XenError> {
        let mut arg = GntdevSetMaxGrants { count };
        // SAFETY: `arg` is the argument struct this request expects, alive for the call.
        match unsafe { uapi::ioctl(self.file.as_fd(), uapi::IOCTL_GNTDEV_SET_MAX_GRANTS, &mut arg) } {
            Ok(_) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENOTTY) => Ok(false),
            Err(e) => Err(XenError::os(format!("gntdev: set max grants {count}"), &e)),
        }
    }

    /// The gntdev module's global limit of mapped grants, if the kernel exposes it.
    pub fn global_map_limit() -> Option<u64> {
        std::fs::read_to_string(GNTDEV_LIMIT_PARAM).ok()?.trim().parse().ok()
    }

    /// Map `refs` of `domid` contiguously, read-only or writable: [`GntDev::register_refs`], then
    /// [`GntDev::map_registered`].
    pub fn map_grants(&self, domid: DomId, refs: &[GrantRef], access: MapAccess) -> Result<GntMapping, XenError> {
        let index = self.register_refs(domid, refs)?;
        self.map_registered(index, refs.len(), access)
    }

    /// The first step of a map (`IOCTL_GNTDEV_MAP_GRANT_REF`): register `refs` of `domid` with this handle and
    /// return their offset in the device. Nothing is mapped yet; the hypervisor maps them when that offset is
    /// mmapped ([`GntDev::map_registered`]), by whoever holds this handle. This is the step that names the domain,
    /// so a confined worker leaves it to its supervisor, which registers only its guest's refs.
    pub fn register_refs(&self, domid: DomId, refs: &[GrantRef]) -> Result<u64, XenError> {
        let what = || format!("gntdev: register {} grant(s) of domain {domid}", refs.len());
        if refs.is_empty() || refs.len() > MAX_MAP_BATCH {
            return Err(XenError::Os {
                what: format!("{} (1..={MAX_MAP_BATCH} allowed)", what()),
                errno: libc::EINVAL,
            });
        }
        self.register(domid, refs).map_err(|e| XenError::os(what(), &e))
    }

    /// The second step of a map: mmap the `pages` grants registered at `index` by this process, read-only or
    /// writable. On failure the registration is undone; the mapping undoes it when it goes.
    pub fn map_registered(&self, index: u64, pages: usize, access: MapAccess) -> Result<GntMapping, XenError> {
        let mapped = self.mmap(index, pages, access);
        if mapped.is_err() {
            unregister(&self.file, index, pages);
        }
        mapped.map(|mut mapping| {
            mapping.registered = true;
            mapping
        })
    }

    /// mmap the `pages` grants another process registered at `index` on the same open file (a worker's
    /// supervisor), which also drops the registration: neither a failure nor the mapping's end touches it.
    pub fn map_brokered(&self, index: u64, pages: usize, access: MapAccess) -> Result<GntMapping, XenError> {
        self.mmap(index, pages, access)
    }

    fn mmap(&self, index: u64, pages: usize, access: MapAccess) -> Result<GntMapping, XenError> {
        let what = || format!("gntdev: map {pages} grant(s) registered at {index:#x}");
        if pages == 0 || pages > MAX_MAP_BATCH {
            return Err(XenError::Os {
                what: format!("{} (1..={MAX_MAP_BATCH} allowed)", what()),
                errno: libc::EINVAL,
            });
        }
        let len = pages * XEN_PAGE_SIZE;
        let prot = match access {
            MapAccess::ReadOnly => libc::PROT_READ,
            MapAccess::ReadWrite => libc::PROT_READ | libc::PROT_WRITE,
        };
        let mapped = libc::off_t::try_from(index)
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EOVERFLOW))
            .and_then(|offset| {
                // SAFETY: a fresh shared mapping chosen by the kernel (no fixed address, so nothing of ours is
                // replaced) of the device pages at `offset`; the kernel refuses an offset and length that are not
                // exactly one registered batch.
                let ptr = unsafe {
                    libc::mmap(
                        std::ptr::null_mut(),
                        len,
                        prot,
                        libc::MAP_SHARED,
                        std::os::fd::AsRawFd::as_raw_fd(&*self.file),
                        offset,
                    )
                };
                if ptr == libc::MAP_FAILED {
                    Err(std::io::Error::last_os_error())
                } else {
                    NonNull::new(ptr.cast::<u8>()).ok_or_else(|| std::io::Error::from_raw_os_error(libc::EFAULT))
                }
            });
        match mapped {
            Ok(ptr) => Ok(GntMapping { file: Arc::clone(&self.file), ptr, pages, index, access, registered: false }),
            // EINVAL/EFAULT here mostly mean a bad ref, a wrong domain or a read-only grant mapped writable.
            Err(e) => Err(XenError::os(format!("{} (mmap)", what()), &e)),
        }
    }

    /// `IOCTL_GNTDEV_MAP_GRANT_REF`: register the refs, return the mmap offset.
    fn register(&self, domid: DomId, refs: &[GrantRef]) -> std::io::Result<u64> {
        // The argument is the header (count, pad, index) followed by `count` (domid, ref) pairs; build it as u32
        // words, which have the layout of the C struct (checked against the offsets of `GntdevMapGrantRef`).
        const HEADER_WORDS: usize = std::mem::offset_of!(GntdevMapGrantRef, refs) / 4;
        const REF_WORDS: usize = std::mem::size_of::<GntdevGrantRef>() / 4;
        // The data plane maps at most one request's segments per call: those fit on the stack, so its per-request
        // path does not allocate (2 KiB); larger batches (probes, tools) take a heap buffer.
        const STACK_WORDS: usize = HEADER_WORDS + REF_WORDS * STACK_MAP_REFS;
        let needed = HEADER_WORDS + REF_WORDS * refs.len();
        let mut stack = [0u32; STACK_WORDS];
        let mut heap = Vec::new();
        let words: &mut [u32] = if needed <= STACK_WORDS {
            &mut stack[..needed]
        } else {
            heap.resize(needed, 0);
            &mut heap
        };
        // `refs.len()` is at most MAX_MAP_BATCH.
        words[0] = u32::try_from(refs.len()).unwrap_or(u32::MAX);
        for (pair, &gref) in words[HEADER_WORDS..].chunks_exact_mut(REF_WORDS).zip(refs) {
            pair[0] = u32::from(domid);
            pair[1] = gref;
        }
        // SAFETY: `words` holds a complete map argument with `refs.len()` trailing refs; the kernel reads the refs
        // and writes only the header's `index` field, all inside the buffer, which lives for the call.
        unsafe { uapi::ioctl(self.file.as_fd(), uapi::IOCTL_GNTDEV_MAP_GRANT_REF, words.as_mut_ptr()) }?;
        let index_offset = std::mem::offset_of!(GntdevMapGrantRef, index) / 4;
        let lo = words[index_offset].to_ne_bytes();
        let hi = words[index_offset + 1].to_ne_bytes();
        Ok(u64::from_ne_bytes([lo[0], lo[1], lo[2], lo[3], hi[0], hi[1], hi[2], hi[3]]))
    }

    /// Drop the registration of the batch of `pages` at `index` (registered on this open file, by whichever
    /// process): fails if there is none. A mapping of it stays until its `munmap`.
    pub fn unregister_refs(&self, index: u64, pages: usize) -> std::io::Result<()> {
        unregister_batch(&self.file, index, pages)
    }

    /// Run one chunk of grant-copy segments.
    fn copy_segments(&self, segments: &mut [GntdevGrantCopySegment]) -> Result<(), XenError> {
        let mut arg = GntdevGrantCopy {
            count: u32::try_from(segments.len()).unwrap_or(u32::MAX),
            segments: segments.as_mut_ptr(),
        };
        // SAFETY: `arg` points at `segments`, alive and exclusively borrowed for the call; the local addresses in
        // them are valid per `GrantTable::copy`'s contract, which our caller upholds.
        unsafe { uapi::ioctl(self.file.as_fd(), uapi::IOCTL_GNTDEV_GRANT_COPY, &mut arg) }
            .map_err(|e| XenError::os(format!("gntdev: grant copy of {} segment(s)", segments.len()), &e))?;
        Ok(())
    }
}

/// `IOCTL_GNTDEV_UNMAP_GRANT_REF` for a batch this process registered (after any mmap of it is gone), logged if
/// it fails.
fn unregister(file: &File, index: u64, pages: usize) {
    if let Err(e) = unregister_batch(file, index, pages) {
        tracing::error!(%e, index, pages, "gntdev: unmap grant ref failed (grants stay mapped until close)");
    }
}

/// `IOCTL_GNTDEV_UNMAP_GRANT_REF` of the batch of `pages` at `index`.
fn unregister_batch(file: &File, index: u64, pages: usize) -> std::io::Result<()> {
    let mut arg = GntdevUnmapGrantRef { index, count: u32::try_from(pages).unwrap_or(u32::MAX), pad: 0 };
    // SAFETY: `arg` is the argument struct this request expects, alive for the call.
    unsafe { uapi::ioctl(file.as_fd(), uapi::IOCTL_GNTDEV_UNMAP_GRANT_REF, &mut arg) }.map(drop)
}

/// Encode one side of a copy; `None` for a side the kernel would reject.
fn copy_side(side: CopySide, len: u16, flag: u16) -> Option<(GntCopyPtr, u16)> {
    match side {
        CopySide::Grant { domid, gref, offset } => (usize::from(offset) + usize::from(len) <= XEN_PAGE_SIZE)
            .then_some((GntCopyPtr { foreign: GntCopyForeign { gref, offset, domid } }, flag)),
        CopySide::Local(0) => None,
        CopySide::Local(addr) => Some((GntCopyPtr { virt: addr }, 0)),
    }
}

/// The kernel segment for an op, or `None` if it must fail with `gntst::BAD_COPY_ARG`.
fn segment_for(op: &GrantCopyOp) -> Option<GntdevGrantCopySegment> {
    if matches!((op.source, op.dest), (CopySide::Local(_), CopySide::Local(_))) {
        return None;
    }
    let (source, source_flag) = copy_side(op.source, op.len, uapi::GNTCOPY_SOURCE_GREF)?;
    let (dest, dest_flag) = copy_side(op.dest, op.len, uapi::GNTCOPY_DEST_GREF)?;
    Some(GntdevGrantCopySegment { source, dest, len: op.len, flags: source_flag | dest_flag, status: 0 })
}

/// Refs per map call whose ioctl argument is built on the stack: a whole request of the data plane.
const STACK_MAP_REFS: usize = crate::connect::MAX_INDIRECT_SEGMENTS as usize;

/// Segments per ioctl: a stack array, so a copy allocates nothing (the kernel batches 16 per hypercall).
const COPY_CHUNK: usize = 32;

impl GrantTable for GntDev {
    type Mapping = GntMapping;

    fn map(&self, domid: DomId, refs: &[GrantRef], access: MapAccess) -> Result<GntMapping, XenError> {
        self.map_grants(domid, refs, access)
    }

    unsafe fn copy(&self, ops: &mut [GrantCopyOp]) -> Result<(), XenError> {
        let mut segments = [GntdevGrantCopySegment::default(); COPY_CHUNK];
        let mut owners = [0usize; COPY_CHUNK];
        let mut n = 0;
        for i in 0..ops.len() {
            match segment_for(&ops[i]) {
                Some(segment) => {
                    segments[n] = segment;
                    owners[n] = i;
                    n += 1;
                }
                None => ops[i].status = gntst::BAD_COPY_ARG,
            }
            if n == COPY_CHUNK || (i + 1 == ops.len() && n > 0) {
                self.copy_segments(&mut segments[..n])?;
                for (segment, &owner) in segments[..n].iter().zip(&owners[..n]) {
                    ops[owner].status = segment.status;
                }
                n = 0;
            }
        }
        Ok(())
    }
}

/// A batch of grants mapped into our address space; unmapped on drop (`munmap`, then the unmap ioctl).
#[derive(Debug)]
pub struct GntMapping {
    file: Arc<File>,
    ptr: NonNull<u8>,
    pages: usize,
    index: u64,
    access: MapAccess,
    /// The batch was registered by this process: its registration goes with the mapping.
    registered: bool,
}

// SAFETY: the mapping is plain shared memory plus a descriptor; nothing in it is tied to the creating thread, and
// `GntMapping` hands out only the raw pointer (accessing the memory is the user's responsibility).
unsafe impl Send for GntMapping {}
// SAFETY: `&GntMapping` allows only reading the fields and an ioctl on the shared descriptor, which the kernel
// serializes.
unsafe impl Sync for GntMapping {}

impl GntMapping {
    /// The batch's offset in the device (what `IOCTL_GNTDEV_MAP_GRANT_REF` returned).
    pub fn index(&self) -> u64 {
        self.index
    }

    /// Ask the kernel to act when this mapping goes away, even if the process dies
    /// (`IOCTL_GNTDEV_SET_UNMAP_NOTIFY`): clear the byte at `clear_byte` (an offset in the mapping; writable
    /// mappings only) and/or send an event on `port` (a local port bound through `/dev/xen/evtchn`), so the
    /// granting domain learns that we are gone. `None` for both removes the notification.
    pub fn set_unmap_notify(&self, clear_byte: Option<usize>, port: Option<EvtchnPort>) -> Result<(), XenError> {
        let offset = clear_byte.unwrap_or(0);
        if offset >= self.len() || (clear_byte.is_some() && self.access == MapAccess::ReadOnly) {
            return Err(XenError::Os {
                what: format!(
                    "gntdev: unmap notify clearing byte {offset} of a {:?} mapping of {} bytes",
                    self.access,
                    self.len()
                ),
                errno: libc::EINVAL,
            });
        }
        let mut action = 0;
        if clear_byte.is_some() {
            action |= uapi::UNMAP_NOTIFY_CLEAR_BYTE;
        }
        if port.is_some() {
            action |= uapi::UNMAP_NOTIFY_SEND_EVENT;
        }
        let mut arg =
            GntdevUnmapNotify { index: self.index + offset as u64, action, event_channel_port: port.unwrap_or(0) };
        // SAFETY: `arg` is the argument struct this request expects, alive for the call.
        unsafe { uapi::ioctl(self.file.as_fd(), uapi::IOCTL_GNTDEV_SET_UNMAP_NOTIFY, &mut arg) }
            .map_err(|e| XenError::os(format!("gntdev: set unmap notify (port {port:?})"), &e))?;
        Ok(())
    }
}

impl GrantMapping for GntMapping {
    fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    fn pages(&self) -> usize {
        self.pages
    }

    fn access(&self) -> MapAccess {
        self.access
    }
}

impl Drop for GntMapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly the mapping mmap returned, and nobody can use it after drop.
        if unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len()) } != 0 {
            tracing::error!(err = %std::io::Error::last_os_error(), index = self.index, "gntdev: munmap failed");
        }
        if self.registered {
            unregister(&self.file, self.index, self.pages);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(source: CopySide, dest: CopySide, len: u16) -> GrantCopyOp {
        GrantCopyOp { source, dest, len, status: 1 }
    }

    #[test]
    fn segments_encode_both_directions() {
        let grant = CopySide::Grant { domid: 7, gref: 42, offset: 512 };
        let seg = segment_for(&op(grant, CopySide::Local(0x1000), 512)).expect("valid");
        assert_eq!(seg.flags, uapi::GNTCOPY_SOURCE_GREF);
        assert_eq!(seg.len, 512);
        // SAFETY: the source side was written as `foreign`, the dest side as `virt`.
        let (src, dst) = unsafe { (seg.source.foreign, seg.dest.virt) };
        assert_eq!((src.gref, src.offset, src.domid), (42, 512, 7));
        assert_eq!(dst, 0x1000);
        let seg = segment_for(&op(CopySide::Local(0x2000), grant, 100)).expect("valid");
        assert_eq!(seg.flags, uapi::GNTCOPY_DEST_GREF);
        let seg = segment_for(&op(grant, grant, 100)).expect("grant to grant is allowed");
        assert_eq!(seg.flags, uapi::GNTCOPY_SOURCE_GREF | uapi::GNTCOPY_DEST_GREF);
    }

    #[test]
    fn segments_the_kernel_would_reject_are_refused() {
        let grant = |offset| CopySide::Grant { domid: 1, gref: 2, offset };
        assert!(segment_for(&op(CopySide::Local(1), CopySide::Local(2), 1)).is_none());
        assert!(segment_for(&op(grant(4000), CopySide::Local(1), 97)).is_none());
        assert!(segment_for(&op(grant(4000), CopySide::Local(1), 96)).is_some());
        assert!(segment_for(&op(grant(0), CopySide::Local(0), 8)).is_none());
    }

    #[test]
    fn copy_on_a_non_gntdev_file_fails_and_marks_bad_ops() {
        let dev = GntDev::open_path(Path::new("/dev/null")).expect("open /dev/null");
        let buf = [0u8; 64];
        let mut ops = [op(CopySide::Local(1), CopySide::Local(2), 1)];
        // SAFETY: the only op is refused before any ioctl, so no address is touched.
        unsafe { dev.copy(&mut ops) }.expect("nothing submitted");
        assert_eq!(ops[0].status, gntst::BAD_COPY_ARG);
        let mut ops =
            [op(CopySide::Grant { domid: 1, gref: 2, offset: 0 }, CopySide::Local(buf.as_ptr() as usize), 64)];
        // SAFETY: the local side is a live 64-byte buffer; /dev/null rejects the ioctl anyway.
        let err = unsafe { dev.copy(&mut ops) }.expect_err("not a gntdev");
        assert!(matches!(err, XenError::Os { errno: libc::ENOTTY, .. }), "{err}");
        assert!(!dev.set_max_grants(16).expect("ENOTTY means no per-handle limit"));
        let err = dev.map_grants(1, &[1, 2], MapAccess::ReadOnly).expect_err("not a gntdev");
        assert!(matches!(err, XenError::Os { errno: libc::ENOTTY, .. }), "{err}");
        assert!(dev.map_grants(1, &[], MapAccess::ReadOnly).is_err());
    }

    #[test]
    fn status_names() {
        assert_eq!(gntst_name(gntst::OKAY), "okay");
        assert_eq!(gntst_name(gntst::BAD_GNTREF), "bad grant ref");
        assert_eq!(gntst_name(i16::MIN), "unknown status");
    }
}
