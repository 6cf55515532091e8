// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The transport-neutral request: what every transport parses guest input into, validated once against the disk.

use vm_memory::GuestAddress;

use crate::geometry::Geometry;
use crate::units::{Sector, SECTOR_SIZE};

/// Most data segments one request may carry (Xen indirect requests reach 256; virtio `seg_max` is set below it).
pub const MAX_SEGMENTS: usize = 256;
/// Largest discard / write-zeroes request a virtio guest is told to send, in sectors, and the most one system call
/// covers. Requests are not refused above it: blkif has no limit to advertise, and Linux blkfront sends discards
/// of up to 4 GiB (or its whole disk); the engines split them into pieces of this size.
pub const MAX_DISCARD_SECTORS: u64 = 1 << 22; // 2 GiB
/// Length of a virtio-blk GET_ID answer (and of the serial we keep).
pub const ID_BYTES: usize = 20;

/// What a request asks the disk to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestKind {
    /// Read sectors into guest memory.
    Read,
    /// Write sectors from guest memory.
    Write,
    /// Make all completed writes durable.
    Flush,
    /// Discard (unmap) a range; `secure` asks for a secure erase (Xen's BLKIF_DISCARD_SECURE).
    Discard {
        /// Secure erase requested.
        secure: bool,
    },
    /// Write zeroes to a range; `unmap` lets the disk deallocate it.
    WriteZeroes {
        /// The disk may unmap the range.
        unmap: bool,
    },
    /// Return the device serial (virtio-blk GET_ID) into the data segments.
    GetId,
}

impl RequestKind {
    /// Whether the request changes the disk.
    pub fn modifies_disk(self) -> bool {
        matches!(self, Self::Write | Self::Discard { .. } | Self::WriteZeroes { .. })
    }

    /// Whether the request moves data to or from guest memory.
    pub fn has_data(self) -> bool {
        matches!(self, Self::Read | Self::Write | Self::GetId)
    }
}

/// One contiguous guest buffer of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Guest address of the first byte (in the transport's `GuestMemory`).
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
}

/// A request parsed out of a guest ring, owned by the backend (no reference into guest memory).
///
/// Transports keep one `Request` per in-flight slot and [`reset`](Request::reset) it, so that the segment list's
/// allocation is reused and the per-request path allocates nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// The operation.
    pub kind: RequestKind,
    /// First sector (for Read/Write/Discard/WriteZeroes).
    pub sector: Sector,
    /// Number of sectors for Discard/WriteZeroes (data requests derive it from the segments).
    pub discard_sectors: u64,
    /// Data buffers in guest memory, in disk order.
    pub segments: Vec<Segment>,
}

impl Default for Request {
    fn default() -> Self {
        Self::new(RequestKind::Flush)
    }
}

impl Request {
    /// An empty request of `kind` at sector 0.
    pub fn new(kind: RequestKind) -> Self {
        Request { kind, sector: Sector(0), discard_sectors: 0, segments: Vec::new() }
    }

    /// A request with room for `MAX_SEGMENTS` segments, for transports' in-flight slots.
    pub fn with_capacity() -> Self {
        let mut r = Self::default();
        r.segments.reserve_exact(MAX_SEGMENTS);
        r
    }

    /// Turn this slot into an empty request of `kind` at `sector`, keeping the segment allocation.
    pub fn reset(&mut self, kind: RequestKind, sector: Sector) {
        self.kind = kind;
        self.sector = sector;
        self.discard_sectors = 0;
        self.segments.clear();
    }

    /// Total bytes of all data segments (saturating; validation rejects anything near the limit).
    pub fn data_len(&self) -> u64 {
        self.segments.iter().map(|s| u64::from(s.len)).fold(0u64, u64::saturating_add)
    }

    /// Check the request against the disk once, before any I/O: every rule a hostile guest could break.
    ///
    /// On success returns the byte range `(offset, len)` on the disk the request touches (`(0, 0)` for
    /// flush and get-id).
    pub fn validate(&self, geometry: &Geometry) -> Result<DiskRange, RequestError> {
        if self.segments.len() > MAX_SEGMENTS {
            return Err(RequestError::TooManySegments { count: self.segments.len(), max: MAX_SEGMENTS });
        }
        if self.kind.modifies_disk() && geometry.read_only {
            return Err(RequestError::ReadOnly);
        }
        match self.kind {
            RequestKind::Flush => Ok(DiskRange::EMPTY),
            RequestKind::GetId => {
                if self.segments.is_empty() {
                    return Err(RequestError::ZeroLength);
                }
                Ok(DiskRange::EMPTY)
            }
            RequestKind::Discard { .. } | RequestKind::WriteZeroes { .. } => {
                let supported = match self.kind {
                    RequestKind::Discard { .. } => geometry.discard,
                    _ => geometry.write_zeroes,
                };
                if !supported {
                    return Err(RequestError::Unsupported);
                }
                if self.discard_sectors == 0 {
                    return Err(RequestError::ZeroLength);
                }
                let range = self.range_in_disk(self.discard_sectors, geometry)?;
                check_alignment(geometry, range.offset, range.len)?;
                Ok(range)
            }
            RequestKind::Read | RequestKind::Write => {
                if self.segments.is_empty() {
                    return Err(RequestError::ZeroLength);
                }
                let mut bytes: u64 = 0;
                for seg in &self.segments {
                    if seg.len == 0 {
                        return Err(RequestError::ZeroLength);
                    }
                    if u64::from(seg.len) % SECTOR_SIZE != 0 {
                        return Err(RequestError::Misaligned {
                            what: "segment length",
                            value: u64::from(seg.len),
                            align: 512,
                        });
                    }
                    if geometry.direct_io {
                        let align = geometry.logical_block_size;
                        if !align.divides(u64::from(seg.len)) {
                            return Err(RequestError::Misaligned {
                                what: "segment length",
                                value: u64::from(seg.len),
                                align: align.bytes(),
                            });
                        }
                    }
                    bytes = bytes.saturating_add(u64::from(seg.len));
                }
                let range = self.range_in_disk(bytes / SECTOR_SIZE, geometry)?;
                check_alignment(geometry, range.offset, range.len)?;
                Ok(range)
            }
        }
    }

    fn range_in_disk(&self, sectors: u64, geometry: &Geometry) -> Result<DiskRange, RequestError> {
        let end = self
            .sector
            .checked_add(sectors)
            .filter(|end| end.to_bytes().is_some())
            .ok_or(RequestError::Overflow { sector: self.sector.0, sectors })?;
        if end > geometry.capacity {
            return Err(RequestError::OutOfRange { sector: self.sector.0, sectors, capacity: geometry.capacity.0 });
        }
        // Both products fit: `end` converts to bytes and `sector <= end`.
        Ok(DiskRange { offset: self.sector.0 * SECTOR_SIZE, len: sectors * SECTOR_SIZE })
    }
}

fn check_alignment(geometry: &Geometry, offset: u64, len: u64) -> Result<(), RequestError> {
    let align = geometry.logical_block_size;
    if !align.divides(offset) {
        return Err(RequestError::Misaligned { what: "disk offset", value: offset, align: align.bytes() });
    }
    if !align.divides(len) {
        return Err(RequestError::Misaligned { what: "length", value: len, align: align.bytes() });
    }
    Ok(())
}

/// A validated byte range on the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskRange {
    /// Byte offset of the first byte.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

impl DiskRange {
    /// No range (flush, get-id).
    pub const EMPTY: DiskRange = DiskRange { offset: 0, len: 0 };
}

/// The status a transport reports for a request: the one mapping from errors to what a guest sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Done.
    Ok,
    /// Failed (virtio `VIRTIO_BLK_S_IOERR`, blkif `BLKIF_RSP_ERROR`).
    IoError,
    /// Not supported (virtio `VIRTIO_BLK_S_UNSUPP`, blkif `BLKIF_RSP_EOPNOTSUPP`).
    Unsupported,
}

/// Why a request was refused or failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// No data where data is needed, or a zero-length range.
    #[error("request has zero length")]
    ZeroLength,
    /// `sector + sectors` overflows 64-bit byte offsets.
    #[error("sector {sector} + {sectors} sectors overflows")]
    Overflow {
        /// First sector.
        sector: u64,
        /// Length in sectors.
        sectors: u64,
    },
    /// The request reaches past the end of the disk.
    #[error("sectors {sector}..{sector}+{sectors} lie beyond the end of the disk ({capacity} sectors)")]
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Length in sectors.
        sectors: u64,
        /// Disk size in sectors.
        capacity: u64,
    },
    /// A modifying request on a read-only disk.
    #[error("write to a read-only disk")]
    ReadOnly,
    /// Misaligned for the disk (O_DIRECT needs logical-block alignment).
    #[error("{what} {value} is not a multiple of {align} bytes")]
    Misaligned {
        /// Which value.
        what: &'static str,
        /// The value.
        value: u64,
        /// The alignment required.
        align: u32,
    },
    /// More segments than the protocol or disk allows.
    #[error("{count} segments exceed the maximum of {max}")]
    TooManySegments {
        /// Segments in the request.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// Unknown or unsupported operation.
    #[error("operation not supported")]
    Unsupported,
    /// A segment lies outside the guest memory the transport can access.
    #[error("guest buffer at {addr:#x}+{len} is not accessible")]
    GuestMemory {
        /// Guest address.
        addr: u64,
        /// Length.
        len: u64,
    },
    /// The disk returned an error (errno).
    #[error("disk I/O failed: {}", std::io::Error::from_raw_os_error(*errno))]
    Io {
        /// The errno.
        errno: i32,
    },
    /// The disk transferred fewer bytes than asked (e.g. the file shrank).
    #[error("short transfer: {done} of {wanted} bytes")]
    ShortTransfer {
        /// Bytes transferred.
        done: u64,
        /// Bytes requested.
        wanted: u64,
    },
}

impl RequestError {
    /// What the guest is told.
    pub fn status(&self) -> Status {
        match self {
            RequestError::Unsupported => Status::Unsupported,
            RequestError::Io { errno } if *errno == libc::EOPNOTSUPP => Status::Unsupported,
            _ => Status::IoError,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::units::BlockSize;

    fn geometry(capacity: u64) -> Geometry {
        Geometry::for_tests(Sector(capacity))
    }

    fn read(sector: u64, lens: &[u32]) -> Request {
        let mut r = Request::new(RequestKind::Read);
        r.sector = Sector(sector);
        r.segments = lens.iter().map(|&len| Segment { addr: GuestAddress(0x1000), len }).collect();
        r
    }

    #[test]
    fn accepts_a_request_that_ends_exactly_at_the_end() {
        let range = read(6, &[1024]).validate(&geometry(8)).expect("valid");
        assert_eq!(range, DiskRange { offset: 3072, len: 1024 });
    }

    #[test]
    fn refuses_past_the_end_and_overflow() {
        assert!(matches!(read(7, &[1024]).validate(&geometry(8)), Err(RequestError::OutOfRange { .. })));
        assert!(matches!(read(u64::MAX, &[512]).validate(&geometry(8)), Err(RequestError::Overflow { .. })));
        assert!(matches!(read(u64::MAX / 512, &[512]).validate(&geometry(8)), Err(RequestError::Overflow { .. })));
    }

    #[test]
    fn refuses_zero_length_and_odd_lengths() {
        assert_eq!(read(0, &[]).validate(&geometry(8)), Err(RequestError::ZeroLength));
        assert_eq!(read(0, &[0]).validate(&geometry(8)), Err(RequestError::ZeroLength));
        assert!(matches!(read(0, &[100]).validate(&geometry(8)), Err(RequestError::Misaligned { .. })));
    }

    #[test]
    fn direct_io_needs_logical_block_alignment() {
        let mut g = geometry(64);
        g.direct_io = true;
        g.logical_block_size = BlockSize::PAGE;
        assert!(read(8, &[4096]).validate(&g).is_ok());
        assert!(matches!(read(1, &[4096]).validate(&g), Err(RequestError::Misaligned { .. })));
        assert!(matches!(read(8, &[512]).validate(&g), Err(RequestError::Misaligned { .. })));
    }

    #[test]
    fn read_only_refuses_modifications_but_serves_reads_and_flush() {
        let mut g = geometry(8);
        g.read_only = true;
        let mut w = read(0, &[512]);
        w.kind = RequestKind::Write;
        assert_eq!(w.validate(&g), Err(RequestError::ReadOnly));
        let mut d = Request::new(RequestKind::Discard { secure: false });
        d.discard_sectors = 1;
        assert_eq!(d.validate(&g), Err(RequestError::ReadOnly));
        assert!(read(0, &[512]).validate(&g).is_ok());
        assert!(Request::new(RequestKind::Flush).validate(&g).is_ok());
    }

    #[test]
    fn too_many_segments_and_unsupported_discard() {
        let lens = vec![512u32; MAX_SEGMENTS + 1];
        assert!(matches!(read(0, &lens).validate(&geometry(1 << 20)), Err(RequestError::TooManySegments { .. })));
        let mut g = geometry(8);
        g.discard = false;
        let mut d = Request::new(RequestKind::Discard { secure: false });
        d.discard_sectors = 1;
        assert_eq!(d.validate(&g), Err(RequestError::Unsupported));
        assert_eq!(RequestError::Unsupported.status(), Status::Unsupported);
        assert_eq!(RequestError::ReadOnly.status(), Status::IoError);
    }
}
