// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Parsing one virtio-blk request out of a descriptor chain.
//!
//! Layout (virtio 1.2, 5.2.6): a driver-readable header descriptor (`le32 type; le32 ioprio; le64 sector`), data
//! descriptors (device-writable for reads and GET_ID, driver-readable for writes; for discard and write-zeroes
//! one driver-readable 16-byte `struct virtio_blk_discard_write_zeroes`), and a final device-writable descriptor
//! whose last byte receives the status. Every descriptor is read once from guest memory (the chain iterator
//! copies it out), so a guest changing the ring under us cannot make two checks see different values.

use std::mem::size_of;

use virtio_bindings::virtio_blk::{
    virtio_blk_discard_write_zeroes, virtio_blk_outhdr, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use crate::request::{Request, RequestKind, Segment, Status};
use crate::units::Sector;

/// Size of the request header (`struct virtio_blk_outhdr`).
pub const HEADER_BYTES: usize = size_of::<virtio_blk_outhdr>();
/// Size of one discard/write-zeroes range (`struct virtio_blk_discard_write_zeroes`).
pub const RANGE_BYTES: usize = size_of::<virtio_blk_discard_write_zeroes>();
const RANGE_LEN: u32 = 16;
const _: () = assert!(RANGE_LEN as usize == RANGE_BYTES);

/// What a descriptor chain turned out to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// The `Request` passed to [`parse_chain`] now holds a well-formed request; its status byte is at `status`.
    Request {
        /// Guest address of the status byte.
        status: GuestAddress,
    },
    /// The request is malformed or unsupported, but has a usable status byte: answer `error.status()` there at
    /// once, without touching the disk.
    Refused {
        /// Guest address of the status byte.
        status: GuestAddress,
        /// What was wrong.
        error: ChainError,
    },
    /// There is no usable status byte: the chain can only be returned to the driver with used length 0.
    Unanswerable {
        /// What was wrong.
        error: ChainError,
    },
}

/// Why a descriptor chain is not a well-formed virtio-blk request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ChainError {
    /// No descriptor at all (or the first one could not be read).
    #[error("empty descriptor chain")]
    Empty,
    /// A single descriptor: no room for both a header and a status byte.
    #[error("chain has a single descriptor, so no status descriptor")]
    NoStatus,
    /// The last descriptor is driver-readable, so the device may not write the status there.
    #[error("status descriptor is not device-writable")]
    StatusReadOnly,
    /// The last descriptor is empty.
    #[error("status descriptor has length 0")]
    StatusEmpty,
    /// The status byte lies outside guest memory.
    #[error("status byte at {addr:#x} is outside guest memory")]
    StatusOutsideMemory {
        /// Guest address.
        addr: u64,
    },
    /// The header descriptor is device-writable.
    #[error("header descriptor is device-writable")]
    HeaderWritable,
    /// The header descriptor is shorter than the 16-byte header.
    #[error("header descriptor has {len} bytes, the header needs 16")]
    HeaderTooShort {
        /// Its length.
        len: u32,
    },
    /// The header lies outside guest memory.
    #[error("header at {addr:#x} is outside guest memory")]
    HeaderOutsideMemory {
        /// Guest address.
        addr: u64,
    },
    /// A data descriptor points the wrong way for the operation.
    #[error("{op} request has a {found} data descriptor")]
    WrongDirection {
        /// The operation.
        op: &'static str,
        /// What the descriptor was.
        found: &'static str,
    },
    /// More data descriptors than the `seg_max` we advertised.
    #[error("more than {max} data segments")]
    TooManySegments {
        /// The advertised maximum.
        max: usize,
    },
    /// A chain longer than any request needs: it is not read to its end (so no status can be written).
    #[error("chain of more than {max} descriptors")]
    TooLong {
        /// The most descriptors read ([`max_chain_len`]).
        max: usize,
    },
    /// A flush carrying data descriptors.
    #[error("flush request carries data descriptors")]
    UnexpectedData,
    /// A discard/write-zeroes payload that is not a whole number of 16-byte ranges.
    #[error("{len}-byte discard/write-zeroes payload is not made of 16-byte ranges")]
    BadRangePayload {
        /// Payload length.
        len: u32,
    },
    /// More ranges than `max_discard_seg`/`max_write_zeroes_seg` (1).
    #[error("more discard/write-zeroes ranges than the one advertised")]
    TooManyRanges,
    /// A discard/write-zeroes without a range.
    #[error("discard/write-zeroes request without a range")]
    MissingRange,
    /// The range lies outside guest memory.
    #[error("discard/write-zeroes range at {addr:#x} is outside guest memory")]
    RangeOutsideMemory {
        /// Guest address.
        addr: u64,
    },
    /// The unmap flag on a discard (only write-zeroes may carry it).
    #[error("unmap flag set on a discard")]
    DiscardUnmap,
    /// Flags the spec reserves.
    #[error("reserved discard/write-zeroes flags {flags:#x}")]
    ReservedFlags {
        /// The flags.
        flags: u32,
    },
    /// A request type we do not implement.
    #[error("unsupported request type {0}")]
    UnknownType(u32),
}

impl ChainError {
    /// What the guest is told (virtio 1.2, 5.2.6.2: unknown flags and unmap on discard are `UNSUPP`).
    pub fn status(&self) -> Status {
        match self {
            ChainError::UnknownType(_)
            | ChainError::TooManyRanges
            | ChainError::DiscardUnmap
            | ChainError::ReservedFlags { .. } => Status::Unsupported,
            _ => Status::IoError,
        }
    }

    /// Whether the driver broke the protocol (as opposed to asking for something we do not implement).
    pub fn is_malformed(&self) -> bool {
        !matches!(self, ChainError::UnknownType(_))
    }
}

/// The most descriptors of one chain read with `seg_max` data segments advertised: a header, the segments, the
/// status, and one more (a chain with one segment too many is still answered, with an error status). The bound
/// keeps the work per chain small: an indirect table may list 65535 descriptors.
pub fn max_chain_len(seg_max: usize) -> usize {
    seg_max.max(1).saturating_add(3)
}

/// Parse the descriptors of one chain into `request` (reset first; its segment allocation is reused, nothing is
/// allocated), accepting at most `seg_max` data segments and reading at most [`max_chain_len`] descriptors.
///
/// `mem` is the guest memory the descriptors point into. Only the shape is checked here; the request's fit on
/// the disk is checked by [`Request::validate`].
pub fn parse_chain<M: GuestMemoryBackend>(
    descriptors: impl IntoIterator<Item = Descriptor>,
    mem: &M,
    seg_max: usize,
    request: &mut Request,
) -> Parsed {
    request.reset(RequestKind::Flush, Sector(0));
    let mut descriptors = descriptors.into_iter();
    let Some(head) = descriptors.next() else {
        return Parsed::Unanswerable { error: ChainError::Empty };
    };
    let mut shape: Result<Shape, ChainError> = read_header(&head, mem).and_then(|(kind, sector)| {
        let kind = request_kind(kind)?;
        request.reset(kind, Sector(sector));
        Ok(Shape { kind, ranges: 0, seg_max })
    });
    // The status descriptor is the last one, known only when the chain ends: hold one descriptor back.
    let mut last: Option<Descriptor> = None;
    let max = max_chain_len(seg_max);
    for (read, desc) in descriptors.enumerate() {
        // (`read` descriptors after the head were read before this one.)
        if read + 2 > max {
            return Parsed::Unanswerable { error: ChainError::TooLong { max } };
        }
        if let (Some(data), Ok(s)) = (last.replace(desc), shape.as_mut()) {
            if let Err(e) = s.add_data(&data, mem, request) {
                shape = Err(e);
            }
        }
    }
    let Some(status_desc) = last else {
        return Parsed::Unanswerable { error: ChainError::NoStatus };
    };
    let status = match status_byte(&status_desc, mem) {
        Ok(addr) => addr,
        Err(error) => return Parsed::Unanswerable { error },
    };
    match shape.and_then(|s| s.finish()) {
        Ok(()) => Parsed::Request { status },
        Err(error) => Parsed::Refused { status, error },
    }
}

/// The parser's state between data descriptors.
struct Shape {
    kind: RequestKind,
    ranges: u32,
    seg_max: usize,
}

impl Shape {
    fn add_data<M: GuestMemoryBackend>(
        &mut self,
        desc: &Descriptor,
        mem: &M,
        request: &mut Request,
    ) -> Result<(), ChainError> {
        let writable = desc.is_write_only();
        let found = if writable { "device-writable" } else { "driver-readable" };
        match self.kind {
            RequestKind::Flush => Err(ChainError::UnexpectedData),
            RequestKind::Read | RequestKind::GetId | RequestKind::Write => {
                let wants_writable = self.kind != RequestKind::Write;
                if writable != wants_writable {
                    return Err(ChainError::WrongDirection { op: op_name(self.kind), found });
                }
                if request.segments.len() >= self.seg_max {
                    return Err(ChainError::TooManySegments { max: self.seg_max });
                }
                request.segments.push(Segment { addr: desc.addr(), len: desc.len() });
                Ok(())
            }
            RequestKind::Discard { .. } | RequestKind::WriteZeroes { .. } => {
                if writable {
                    return Err(ChainError::WrongDirection { op: op_name(self.kind), found });
                }
                let len = desc.len();
                if len == 0 || len % RANGE_LEN != 0 {
                    return Err(ChainError::BadRangePayload { len });
                }
                self.ranges = self.ranges.saturating_add(len / RANGE_LEN);
                if self.ranges > super::MAX_RANGE_SEGMENTS {
                    return Err(ChainError::TooManyRanges);
                }
                self.read_range(desc.addr(), mem, request)
            }
        }
    }

    fn read_range<M: GuestMemoryBackend>(
        &mut self,
        addr: GuestAddress,
        mem: &M,
        request: &mut Request,
    ) -> Result<(), ChainError> {
        let mut raw = [0u8; RANGE_BYTES];
        mem.read_slice(&mut raw, addr).map_err(|_| ChainError::RangeOutsideMemory { addr: addr.0 })?;
        let [s0, s1, s2, s3, s4, s5, s6, s7, n0, n1, n2, n3, f0, f1, f2, f3] = raw;
        let sector = u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]);
        let num_sectors = u32::from_le_bytes([n0, n1, n2, n3]);
        let flags = u32::from_le_bytes([f0, f1, f2, f3]);
        let reserved = flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
        if reserved != 0 {
            return Err(ChainError::ReservedFlags { flags });
        }
        let unmap = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
        self.kind = match self.kind {
            RequestKind::Discard { .. } if unmap => return Err(ChainError::DiscardUnmap),
            RequestKind::WriteZeroes { .. } => RequestKind::WriteZeroes { unmap },
            kind => kind,
        };
        request.kind = self.kind;
        request.sector = Sector(sector);
        request.discard_sectors = u64::from(num_sectors);
        Ok(())
    }

    fn finish(self) -> Result<(), ChainError> {
        match self.kind {
            RequestKind::Discard { .. } | RequestKind::WriteZeroes { .. } if self.ranges == 0 => {
                Err(ChainError::MissingRange)
            }
            _ => Ok(()),
        }
    }
}

/// `(type, sector)` from the header descriptor.
fn read_header<M: GuestMemoryBackend>(desc: &Descriptor, mem: &M) -> Result<(u32, u64), ChainError> {
    if desc.is_write_only() {
        return Err(ChainError::HeaderWritable);
    }
    if (desc.len() as usize) < HEADER_BYTES {
        return Err(ChainError::HeaderTooShort { len: desc.len() });
    }
    let mut raw = [0u8; HEADER_BYTES];
    mem.read_slice(&mut raw, desc.addr()).map_err(|_| ChainError::HeaderOutsideMemory { addr: desc.addr().0 })?;
    let [t0, t1, t2, t3, _, _, _, _, s0, s1, s2, s3, s4, s5, s6, s7] = raw;
    Ok((u32::from_le_bytes([t0, t1, t2, t3]), u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7])))
}

fn request_kind(virtio_type: u32) -> Result<RequestKind, ChainError> {
    Ok(match virtio_type {
        VIRTIO_BLK_T_IN => RequestKind::Read,
        VIRTIO_BLK_T_OUT => RequestKind::Write,
        VIRTIO_BLK_T_FLUSH => RequestKind::Flush,
        VIRTIO_BLK_T_GET_ID => RequestKind::GetId,
        VIRTIO_BLK_T_DISCARD => RequestKind::Discard { secure: false },
        VIRTIO_BLK_T_WRITE_ZEROES => RequestKind::WriteZeroes { unmap: false },
        other => return Err(ChainError::UnknownType(other)),
    })
}

fn op_name(kind: RequestKind) -> &'static str {
    match kind {
        RequestKind::Read => "read",
        RequestKind::Write => "write",
        RequestKind::Flush => "flush",
        RequestKind::GetId => "get-id",
        RequestKind::Discard { .. } => "discard",
        RequestKind::WriteZeroes { .. } => "write-zeroes",
    }
}

/// The guest address of the status byte: the last byte of the final, device-writable descriptor.
fn status_byte<M: GuestMemoryBackend>(desc: &Descriptor, mem: &M) -> Result<GuestAddress, ChainError> {
    if !desc.is_write_only() {
        return Err(ChainError::StatusReadOnly);
    }
    let last = desc.len().checked_sub(1).ok_or(ChainError::StatusEmpty)?;
    let addr = desc.addr().checked_add(u64::from(last)).ok_or(ChainError::StatusOutsideMemory { addr: u64::MAX })?;
    if !mem.address_in_range(addr) {
        return Err(ChainError::StatusOutsideMemory { addr: addr.0 });
    }
    Ok(addr)
}

#[cfg(test)]
#[path = "chain_tests.rs"]
mod tests;
