// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The `/dev/xen` ioctl ABI: request numbers and `#[repr(C)]` argument structs, transcribed from the Linux uapi
//! headers `include/uapi/xen/{evtchn,gntdev,gntalloc}.h`, and one checked `ioctl` call.
//!
//! Every request is `_IOC(_IOC_NONE, type, nr, sizeof(struct))` in the asm-generic encoding (x86 and Arm, the
//! architectures Xen runs on): `dir << 30 | size << 16 | type << 8 | nr`, with `_IOC_NONE` = 0.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

#[cfg(not(any(target_arch = "x86", target_arch = "x86_64", target_arch = "arm", target_arch = "aarch64")))]
compile_error!("the /dev/xen ioctl encoding here is asm-generic (x86, Arm): check _IOC for this architecture");

/// The request type of this platform's `ioctl(2)`.
pub type IoctlRequest = libc::Ioctl;

const IOC_SIZEBITS: u32 = 14;

/// `_IOC(_IOC_NONE, ty, nr, size)`.
pub const fn ioc_none(ty: u8, nr: u8, size: usize) -> IoctlRequest {
    assert!(size < (1 << IOC_SIZEBITS), "ioctl argument too large for _IOC");
    // The assert bounds `size` to 14 bits, so the conversion is lossless.
    #[allow(clippy::cast_possible_truncation)]
    let size = size as u32;
    ((size << 16) | ((ty as u32) << 8) | nr as u32) as IoctlRequest
}

// --------------------------------------------------------------------------------------------------------------
// evtchn.h

/// `struct ioctl_evtchn_bind_interdomain`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct EvtchnBindInterdomain {
    /// The remote domain.
    pub remote_domain: u32,
    /// Its port.
    pub remote_port: u32,
}

/// `struct ioctl_evtchn_bind_unbound_port`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct EvtchnBindUnboundPort {
    /// The domain allowed to bind the new port.
    pub remote_domain: u32,
}

/// `struct ioctl_evtchn_unbind` and `struct ioctl_evtchn_notify` (same layout).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct EvtchnPortArg {
    /// A local port.
    pub port: u32,
}

/// `struct ioctl_evtchn_restrict_domid`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct EvtchnRestrictDomid {
    /// The only domain this handle may bind to from now on.
    pub domid: u16,
}

/// `IOCTL_EVTCHN_BIND_UNBOUND_PORT`.
pub const IOCTL_EVTCHN_BIND_UNBOUND_PORT: IoctlRequest =
    ioc_none(b'E', 2, std::mem::size_of::<EvtchnBindUnboundPort>());
/// `IOCTL_EVTCHN_BIND_INTERDOMAIN`.
pub const IOCTL_EVTCHN_BIND_INTERDOMAIN: IoctlRequest = ioc_none(b'E', 1, std::mem::size_of::<EvtchnBindInterdomain>());
/// `IOCTL_EVTCHN_UNBIND`.
pub const IOCTL_EVTCHN_UNBIND: IoctlRequest = ioc_none(b'E', 3, std::mem::size_of::<EvtchnPortArg>());
/// `IOCTL_EVTCHN_NOTIFY`.
pub const IOCTL_EVTCHN_NOTIFY: IoctlRequest = ioc_none(b'E', 4, std::mem::size_of::<EvtchnPortArg>());
/// `IOCTL_EVTCHN_RESET` (no argument).
pub const IOCTL_EVTCHN_RESET: IoctlRequest = ioc_none(b'E', 5, 0);
/// `IOCTL_EVTCHN_RESTRICT_DOMID`.
pub const IOCTL_EVTCHN_RESTRICT_DOMID: IoctlRequest = ioc_none(b'E', 6, std::mem::size_of::<EvtchnRestrictDomid>());

// --------------------------------------------------------------------------------------------------------------
// gntdev.h

/// `struct ioctl_gntdev_grant_ref`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct GntdevGrantRef {
    /// Granting domain.
    pub domid: u32,
    /// Grant reference.
    pub gref: u32,
}

/// `struct ioctl_gntdev_map_grant_ref` with its one-element `refs` (the size the request number encodes); the real
/// argument is this header followed by `count` refs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct GntdevMapGrantRef {
    /// Number of refs.
    pub count: u32,
    /// Padding.
    pub pad: u32,
    /// Out: the mmap offset of the batch.
    pub index: u64,
    /// The refs (variable length).
    pub refs: [GntdevGrantRef; 1],
}

/// `struct ioctl_gntdev_unmap_grant_ref`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct GntdevUnmapGrantRef {
    /// The offset the map returned.
    pub index: u64,
    /// Pages.
    pub count: u32,
    /// Padding.
    pub pad: u32,
}

/// `struct ioctl_gntdev_set_max_grants`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct GntdevSetMaxGrants {
    /// Maximum grants mapped at once by this handle.
    pub count: u32,
}

/// `struct ioctl_gntdev_unmap_notify` (and `ioctl_gntalloc_unmap_notify`, same layout).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct GntdevUnmapNotify {
    /// Offset in the device of a byte of the page (the byte to clear with [`UNMAP_NOTIFY_CLEAR_BYTE`]).
    pub index: u64,
    /// `UNMAP_NOTIFY_*` flags.
    pub action: u32,
    /// Local event-channel port to notify with [`UNMAP_NOTIFY_SEND_EVENT`].
    pub event_channel_port: u32,
}

/// The foreign side of a grant-copy segment.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct GntCopyForeign {
    /// Grant reference.
    pub gref: u32,
    /// Offset in the page.
    pub offset: u16,
    /// Granting domain.
    pub domid: u16,
}

/// The `source`/`dest` union of `struct gntdev_grant_copy_segment`: a local virtual address or a foreign grant.
#[repr(C)]
#[derive(Clone, Copy)]
pub union GntCopyPtr {
    /// Local buffer (`void __user *`).
    pub virt: usize,
    /// Foreign page.
    pub foreign: GntCopyForeign,
}

impl std::fmt::Debug for GntCopyPtr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GntCopyPtr")
    }
}

/// `struct gntdev_grant_copy_segment`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct GntdevGrantCopySegment {
    /// Source.
    pub source: GntCopyPtr,
    /// Destination.
    pub dest: GntCopyPtr,
    /// Bytes.
    pub len: u16,
    /// `GNTCOPY_*` flags saying which sides are grants.
    pub flags: u16,
    /// Out: `GNTST_*`.
    pub status: i16,
}

impl Default for GntdevGrantCopySegment {
    fn default() -> Self {
        GntdevGrantCopySegment {
            source: GntCopyPtr { virt: 0 },
            dest: GntCopyPtr { virt: 0 },
            len: 0,
            flags: 0,
            status: 0,
        }
    }
}

/// `struct ioctl_gntdev_grant_copy`.
#[repr(C)]
#[derive(Debug)]
pub struct GntdevGrantCopy {
    /// Number of segments.
    pub count: u32,
    /// The segments.
    pub segments: *mut GntdevGrantCopySegment,
}

/// `IOCTL_GNTDEV_MAP_GRANT_REF`.
pub const IOCTL_GNTDEV_MAP_GRANT_REF: IoctlRequest = ioc_none(b'G', 0, std::mem::size_of::<GntdevMapGrantRef>());
/// `IOCTL_GNTDEV_UNMAP_GRANT_REF`.
pub const IOCTL_GNTDEV_UNMAP_GRANT_REF: IoctlRequest = ioc_none(b'G', 1, std::mem::size_of::<GntdevUnmapGrantRef>());
/// `IOCTL_GNTDEV_SET_MAX_GRANTS`.
pub const IOCTL_GNTDEV_SET_MAX_GRANTS: IoctlRequest = ioc_none(b'G', 3, std::mem::size_of::<GntdevSetMaxGrants>());
/// `IOCTL_GNTDEV_SET_UNMAP_NOTIFY`.
pub const IOCTL_GNTDEV_SET_UNMAP_NOTIFY: IoctlRequest = ioc_none(b'G', 7, std::mem::size_of::<GntdevUnmapNotify>());
/// `IOCTL_GNTDEV_GRANT_COPY`.
pub const IOCTL_GNTDEV_GRANT_COPY: IoctlRequest = ioc_none(b'G', 8, std::mem::size_of::<GntdevGrantCopy>());

/// Clear the byte at the notify index when the page is unmapped.
pub const UNMAP_NOTIFY_CLEAR_BYTE: u32 = 0x1;
/// Send an event on the notify port when the page is unmapped.
pub const UNMAP_NOTIFY_SEND_EVENT: u32 = 0x2;
/// Grant copy: the source is a grant (Xen's `GNTCOPY_source_gref`).
pub const GNTCOPY_SOURCE_GREF: u16 = 1 << 0;
/// Grant copy: the destination is a grant (Xen's `GNTCOPY_dest_gref`).
pub const GNTCOPY_DEST_GREF: u16 = 1 << 1;

// --------------------------------------------------------------------------------------------------------------
// gntalloc.h

/// `struct ioctl_gntalloc_alloc_gref` with its one-element `gref_ids`; the real argument has `count` of them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct GntallocAllocGref {
    /// The domain given access.
    pub domid: u16,
    /// `GNTALLOC_FLAG_WRITABLE` or 0.
    pub flags: u16,
    /// Pages.
    pub count: u32,
    /// Out: the mmap offset.
    pub index: u64,
    /// Out: the grant refs (variable length).
    pub gref_ids: [u32; 1],
}

/// `struct ioctl_gntalloc_dealloc_gref`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct GntallocDeallocGref {
    /// The offset the allocation returned.
    pub index: u64,
    /// Pages.
    pub count: u32,
}

/// The granted domain may write.
pub const GNTALLOC_FLAG_WRITABLE: u16 = 1;
/// `IOCTL_GNTALLOC_ALLOC_GREF`.
pub const IOCTL_GNTALLOC_ALLOC_GREF: IoctlRequest = ioc_none(b'G', 5, std::mem::size_of::<GntallocAllocGref>());
/// `IOCTL_GNTALLOC_DEALLOC_GREF`.
pub const IOCTL_GNTALLOC_DEALLOC_GREF: IoctlRequest = ioc_none(b'G', 6, std::mem::size_of::<GntallocDeallocGref>());

// --------------------------------------------------------------------------------------------------------------

/// `ioctl(fd, request, arg)`, returning the non-negative result or the errno.
///
/// # Safety
/// `arg` must be what `request` expects on `fd`: null for argument-less requests, otherwise a pointer to a live,
/// properly sized object (including any variable-length tail the kernel reads or writes) that stays valid and
/// unaliased for the duration of the call; pointers embedded in it must satisfy the same rules.
pub unsafe fn ioctl<T>(fd: BorrowedFd<'_>, request: IoctlRequest, arg: *mut T) -> io::Result<libc::c_int> {
    // SAFETY: the caller guarantees `arg` matches `request`; `fd` is a live descriptor for the call.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), request, arg) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{align_of, offset_of, size_of};

    #[test]
    fn request_numbers_match_the_uapi_encoding() {
        // Values as a C compiler computes the uapi macros on x86_64.
        assert_eq!(IOCTL_EVTCHN_BIND_INTERDOMAIN, 0x0008_4501);
        assert_eq!(IOCTL_EVTCHN_BIND_UNBOUND_PORT, 0x0004_4502);
        assert_eq!(IOCTL_EVTCHN_UNBIND, 0x0004_4503);
        assert_eq!(IOCTL_EVTCHN_NOTIFY, 0x0004_4504);
        assert_eq!(IOCTL_EVTCHN_RESET, 0x0000_4505);
        assert_eq!(IOCTL_EVTCHN_RESTRICT_DOMID, 0x0002_4506);
        assert_eq!(IOCTL_GNTDEV_MAP_GRANT_REF, 0x0018_4700);
        assert_eq!(IOCTL_GNTDEV_UNMAP_GRANT_REF, 0x0010_4701);
        assert_eq!(IOCTL_GNTDEV_SET_MAX_GRANTS, 0x0004_4703);
        assert_eq!(IOCTL_GNTDEV_SET_UNMAP_NOTIFY, 0x0010_4707);
        assert_eq!(IOCTL_GNTDEV_GRANT_COPY, 0x0010_4708);
        assert_eq!(IOCTL_GNTALLOC_ALLOC_GREF, 0x0018_4705);
        assert_eq!(IOCTL_GNTALLOC_DEALLOC_GREF, 0x0010_4706);
    }

    #[test]
    fn evtchn_layouts() {
        assert_eq!(size_of::<EvtchnBindInterdomain>(), 8);
        assert_eq!(offset_of!(EvtchnBindInterdomain, remote_port), 4);
        assert_eq!(size_of::<EvtchnBindUnboundPort>(), 4);
        assert_eq!(size_of::<EvtchnPortArg>(), 4);
        assert_eq!(size_of::<EvtchnRestrictDomid>(), 2);
    }

    #[test]
    fn gntdev_layouts() {
        assert_eq!(size_of::<GntdevGrantRef>(), 8);
        assert_eq!(offset_of!(GntdevGrantRef, gref), 4);
        assert_eq!(size_of::<GntdevMapGrantRef>(), 24);
        assert_eq!(offset_of!(GntdevMapGrantRef, pad), 4);
        assert_eq!(offset_of!(GntdevMapGrantRef, index), 8);
        assert_eq!(offset_of!(GntdevMapGrantRef, refs), 16);
        assert_eq!(size_of::<GntdevUnmapGrantRef>(), 16);
        assert_eq!(offset_of!(GntdevUnmapGrantRef, count), 8);
        assert_eq!(size_of::<GntdevSetMaxGrants>(), 4);
        assert_eq!(size_of::<GntdevUnmapNotify>(), 16);
        assert_eq!(offset_of!(GntdevUnmapNotify, action), 8);
        assert_eq!(offset_of!(GntdevUnmapNotify, event_channel_port), 12);
        assert_eq!(size_of::<GntCopyForeign>(), 8);
        assert_eq!(offset_of!(GntCopyForeign, offset), 4);
        assert_eq!(offset_of!(GntCopyForeign, domid), 6);
        assert_eq!(size_of::<GntCopyPtr>(), 8);
        assert_eq!(size_of::<GntdevGrantCopySegment>(), 24);
        assert_eq!(align_of::<GntdevGrantCopySegment>(), 8);
        assert_eq!(offset_of!(GntdevGrantCopySegment, dest), 8);
        assert_eq!(offset_of!(GntdevGrantCopySegment, len), 16);
        assert_eq!(offset_of!(GntdevGrantCopySegment, flags), 18);
        assert_eq!(offset_of!(GntdevGrantCopySegment, status), 20);
        assert_eq!(size_of::<GntdevGrantCopy>(), 16);
        assert_eq!(offset_of!(GntdevGrantCopy, segments), 8);
    }

    #[test]
    fn gntalloc_layouts() {
        assert_eq!(size_of::<GntallocAllocGref>(), 24);
        assert_eq!(offset_of!(GntallocAllocGref, flags), 2);
        assert_eq!(offset_of!(GntallocAllocGref, count), 4);
        assert_eq!(offset_of!(GntallocAllocGref, index), 8);
        assert_eq!(offset_of!(GntallocAllocGref, gref_ids), 16);
        assert_eq!(size_of::<GntallocDeallocGref>(), 16);
    }

    #[test]
    fn ioctl_reports_errno() {
        // /dev/null is not a Xen device: the kernel answers ENOTTY, through the same checked path.
        use std::os::fd::AsFd;
        let null = std::fs::File::open("/dev/null").expect("open /dev/null");
        let mut arg = EvtchnPortArg { port: 1 };
        // SAFETY: `arg` is a live, correctly sized argument for this request; /dev/null rejects it.
        let err = unsafe { ioctl(null.as_fd(), IOCTL_EVTCHN_NOTIFY, &mut arg) }.expect_err("no ioctls on /dev/null");
        assert_eq!(err.raw_os_error(), Some(libc::ENOTTY));
    }
}
