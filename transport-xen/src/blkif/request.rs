// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Requests and responses: decoding a request copied out of the ring (then validating the copy), and encoding
//! (for frontends: the test frontend and the blkfront emulator).

use super::abi::{
    BlkifLayout, MAX_REQUEST_SIZE, MAX_RESPONSE_SIZE, REQ_BYTE1, REQ_HALF2, REQ_OPERATION, RSP_ID, RSP_OPERATION,
    RSP_STATUS, SEGMENT_SIZE, SEG_FIRST_SECT, SEG_LAST_SECT,
};
use crate::services::GrantRef;

/// `BLKIF_OP_READ`.
pub const OP_READ: u8 = 0;
/// `BLKIF_OP_WRITE`.
pub const OP_WRITE: u8 = 1;
/// `BLKIF_OP_WRITE_BARRIER`.
pub const OP_WRITE_BARRIER: u8 = 2;
/// `BLKIF_OP_FLUSH_DISKCACHE`.
pub const OP_FLUSH_DISKCACHE: u8 = 3;
/// `BLKIF_OP_RESERVED_1` (never valid).
pub const OP_RESERVED_1: u8 = 4;
/// `BLKIF_OP_DISCARD`.
pub const OP_DISCARD: u8 = 5;
/// `BLKIF_OP_INDIRECT`.
pub const OP_INDIRECT: u8 = 6;

/// `BLKIF_RSP_OKAY`.
pub const RSP_OKAY: i16 = 0;
/// `BLKIF_RSP_ERROR`.
pub const RSP_ERROR: i16 = -1;
/// `BLKIF_RSP_EOPNOTSUPP`.
pub const RSP_EOPNOTSUPP: i16 = -2;

/// `BLKIF_DISCARD_SECURE`.
pub const DISCARD_SECURE: u8 = 1;
/// `BLKIF_MAX_SEGMENTS_PER_REQUEST`.
pub const MAX_DIRECT_SEGMENTS: usize = 11;
/// `BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST`.
pub const MAX_INDIRECT_PAGES: usize = 8;
/// Segments per indirect page (`PAGE_SIZE / sizeof(struct blkif_request_segment)`).
pub const SEGMENTS_PER_INDIRECT_PAGE: usize = 4096 / SEGMENT_SIZE;
/// Sectors per page (the largest `last_sect` is 7).
pub const SECTORS_PER_PAGE: u8 = 8;

/// A request exactly as copied out of the shared ring: the only read of guest memory for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawRequest {
    /// The request's bytes (`L::REQUEST_SIZE` of them are meaningful).
    pub bytes: [u8; MAX_REQUEST_SIZE],
}

impl Default for RawRequest {
    fn default() -> Self {
        RawRequest { bytes: [0; MAX_REQUEST_SIZE] }
    }
}

impl RawRequest {
    fn u8_at(&self, off: usize) -> u8 {
        self.bytes[off]
    }
    fn u16_at(&self, off: usize) -> u16 {
        u16::from_le_bytes([self.bytes[off], self.bytes[off + 1]])
    }
    fn u32_at(&self, off: usize) -> u32 {
        let mut b = [0u8; 4];
        b.copy_from_slice(&self.bytes[off..off + 4]);
        u32::from_le_bytes(b)
    }
    fn u64_at(&self, off: usize) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.bytes[off..off + 8]);
        u64::from_le_bytes(b)
    }
    /// Store a little-endian value (for encoders and hostile tests).
    pub fn put(&mut self, off: usize, value: &[u8]) {
        self.bytes[off..off + value.len()].copy_from_slice(value);
    }
    /// The request's `operation` byte.
    pub fn operation(&self) -> u8 {
        self.u8_at(REQ_OPERATION)
    }
    /// The operation a response to this request carries: its `operation`, or for an indirect request its
    /// `indirect_op` (Linux blkfront, since the XSA-396 hardening, disables the device on any other).
    pub fn response_operation(&self) -> u8 {
        match self.operation() {
            OP_INDIRECT => self.u8_at(REQ_BYTE1),
            op => op,
        }
    }
    /// The request's `id` (at the same place in every variant).
    pub fn id<L: BlkifLayout>(&self) -> u64 {
        self.u64_at(L::REQ_ID)
    }
}

/// One data segment: a granted page and the inclusive sector range in it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlkifSegment {
    /// The granted page.
    pub gref: GrantRef,
    /// First sector in the page (inclusive).
    pub first_sect: u8,
    /// Last sector in the page (inclusive).
    pub last_sect: u8,
}

impl BlkifSegment {
    /// Decode an 8-byte `blkif_request_segment`.
    pub fn decode(b: &[u8; SEGMENT_SIZE]) -> BlkifSegment {
        BlkifSegment {
            gref: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            first_sect: b[SEG_FIRST_SECT],
            last_sect: b[SEG_LAST_SECT],
        }
    }

    /// Encode as a `blkif_request_segment` (padding zeroed).
    pub fn encode(&self) -> [u8; SEGMENT_SIZE] {
        let mut b = [0u8; SEGMENT_SIZE];
        b[..4].copy_from_slice(&self.gref.to_le_bytes());
        b[SEG_FIRST_SECT] = self.first_sect;
        b[SEG_LAST_SECT] = self.last_sect;
        b
    }

    /// `first_sect <= last_sect <= 7`.
    pub fn check(&self, index: usize) -> Result<(), RequestFault> {
        if self.first_sect > self.last_sect || self.last_sect >= SECTORS_PER_PAGE {
            return Err(RequestFault::SegmentSectors { index, first: self.first_sect, last: self.last_sect });
        }
        Ok(())
    }

    /// Byte offset of the first sector in the page.
    pub fn offset(&self) -> u32 {
        u32::from(self.first_sect) * 512
    }

    /// Length in bytes (valid after [`check`](Self::check)).
    pub fn len(&self) -> u32 {
        (u32::from(self.last_sect) + 1).saturating_sub(u32::from(self.first_sect)) * 512
    }

    /// Whether the segment covers no sectors (never after [`check`](Self::check)).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What a decoded request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlkifOp {
    /// Read into the segments.
    Read,
    /// Write from the segments.
    Write,
    /// Complete every earlier write, make it durable, then write the segments (if any).
    WriteBarrier,
    /// Write the segments (if any), then make every completed write durable.
    Flush,
    /// Discard `nr_sectors` from `sector`.
    Discard {
        /// `BLKIF_DISCARD_SECURE` was set.
        secure: bool,
    },
}

/// The indirect part of a `BLKIF_OP_INDIRECT` request: where its segment descriptors are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndirectPages {
    /// Segments in the request.
    pub nr_segments: u16,
    /// Grant refs of the pages holding the segment descriptors (`pages` of them are used).
    pub grefs: [GrantRef; MAX_INDIRECT_PAGES],
    /// Pages used: `ceil(nr_segments / 512)`.
    pub pages: usize,
}

/// A request decoded from its [`RawRequest`] copy, its shape validated. Reused across requests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlkifRequest {
    /// The guest's id, echoed in the response.
    pub id: u64,
    /// The operation byte echoed in the response: the request's, or for an indirect request its
    /// `indirect_op` (as Linux blkback answers and blkfront expects).
    pub operation: u8,
    /// The operation (for indirect requests, the indirect operation).
    pub op: BlkifOp,
    /// First sector.
    pub sector: u64,
    /// Sectors to discard (discard only).
    pub nr_sectors: u64,
    /// Data segments (for indirect requests, filled by the transport from the indirect pages).
    pub segments: Vec<BlkifSegment>,
    /// Set for indirect requests.
    pub indirect: Option<IndirectPages>,
}

impl Default for BlkifRequest {
    fn default() -> Self {
        BlkifRequest {
            id: 0,
            operation: 0,
            op: BlkifOp::Read,
            sector: 0,
            nr_sectors: 0,
            segments: Vec::with_capacity(MAX_DIRECT_SEGMENTS),
            indirect: None,
        }
    }
}

/// Why a request's shape is invalid (the disk-related rules are checked by `device-blk`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestFault {
    /// An operation we do not implement (or did not advertise).
    #[error("unsupported operation {0}")]
    UnknownOperation(u8),
    /// An indirect request whose indirect operation is not read or write.
    #[error("indirect request with operation {0}")]
    BadIndirectOperation(u8),
    /// Too few or too many segments.
    #[error("{count} segments, expected {min}..={max}")]
    SegmentCount {
        /// Segments in the request.
        count: usize,
        /// Fewest allowed.
        min: usize,
        /// Most allowed.
        max: usize,
    },
    /// A segment's sector range is empty or leaves its page.
    #[error("segment {index}: sectors {first}..={last} are not within a page")]
    SegmentSectors {
        /// Segment index.
        index: usize,
        /// `first_sect`.
        first: u8,
        /// `last_sect`.
        last: u8,
    },
    /// The indirect descriptor pages could not be read (bad grant).
    #[error("indirect segment pages are not accessible")]
    IndirectPages,
    /// The data pages could not be mapped or copied (bad or read-only grant).
    #[error("data pages are not accessible: {0}")]
    Grants(String),
}

impl RequestFault {
    /// The status the guest gets: `EOPNOTSUPP` for operations we do not offer, `ERROR` for anything else.
    pub fn status(&self) -> i16 {
        match self {
            RequestFault::UnknownOperation(_) => RSP_EOPNOTSUPP,
            _ => RSP_ERROR,
        }
    }
}

impl BlkifRequest {
    /// Decode and check the shape of `raw` into `self` (keeping the segment allocation). `max_indirect` is the
    /// `feature-max-indirect-segments` we advertised (0: indirect requests are unknown operations). Even on error
    /// `self.id` and `self.operation` are set, for the response.
    pub fn decode<L: BlkifLayout>(&mut self, raw: &RawRequest, max_indirect: usize) -> Result<(), RequestFault> {
        self.id = raw.id::<L>();
        self.operation = raw.operation();
        self.sector = raw.u64_at(L::REQ_SECTOR);
        self.nr_sectors = 0;
        self.segments.clear();
        self.indirect = None;
        let direct = |this: &mut Self, op: BlkifOp, min: usize| -> Result<(), RequestFault> {
            this.op = op;
            let count = usize::from(raw.u8_at(REQ_BYTE1));
            if count < min || count > MAX_DIRECT_SEGMENTS {
                return Err(RequestFault::SegmentCount { count, min, max: MAX_DIRECT_SEGMENTS });
            }
            for i in 0..count {
                let off = L::REQ_SEGMENTS + i * SEGMENT_SIZE;
                let mut b = [0u8; SEGMENT_SIZE];
                b.copy_from_slice(&raw.bytes[off..off + SEGMENT_SIZE]);
                let seg = BlkifSegment::decode(&b);
                seg.check(i)?;
                this.segments.push(seg);
            }
            Ok(())
        };
        match self.operation {
            OP_READ => direct(self, BlkifOp::Read, 1),
            OP_WRITE => direct(self, BlkifOp::Write, 1),
            // Linux blkfront sends flushes and barriers with or without data.
            OP_WRITE_BARRIER => direct(self, BlkifOp::WriteBarrier, 0),
            OP_FLUSH_DISKCACHE => direct(self, BlkifOp::Flush, 0),
            OP_DISCARD => {
                self.op = BlkifOp::Discard { secure: raw.u8_at(REQ_BYTE1) & DISCARD_SECURE != 0 };
                self.nr_sectors = raw.u64_at(L::DISCARD_NR_SECTORS);
                Ok(())
            }
            OP_INDIRECT if max_indirect > 0 => {
                // The response carries the indirect operation, as Linux blkback answers (and blkfront expects).
                self.operation = raw.response_operation();
                self.op = match raw.u8_at(REQ_BYTE1) {
                    OP_READ => BlkifOp::Read,
                    OP_WRITE => BlkifOp::Write,
                    other => return Err(RequestFault::BadIndirectOperation(other)),
                };
                let count = usize::from(raw.u16_at(REQ_HALF2));
                let max = max_indirect.min(MAX_INDIRECT_PAGES * SEGMENTS_PER_INDIRECT_PAGE);
                if count == 0 || count > max {
                    return Err(RequestFault::SegmentCount { count, min: 1, max });
                }
                let mut grefs = [0; MAX_INDIRECT_PAGES];
                for (i, g) in grefs.iter_mut().enumerate() {
                    *g = raw.u32_at(L::INDIRECT_GREFS + 4 * i);
                }
                let pages = count.div_ceil(SEGMENTS_PER_INDIRECT_PAGE);
                self.indirect = Some(IndirectPages { nr_segments: raw.u16_at(REQ_HALF2), grefs, pages });
                Ok(())
            }
            other => Err(RequestFault::UnknownOperation(other)),
        }
    }

    /// Fill the segments of an indirect request from a copy of its descriptor pages (`pages * 4096` bytes),
    /// checking each one.
    pub fn set_indirect_segments(&mut self, descriptors: &[u8]) -> Result<(), RequestFault> {
        let Some(ind) = self.indirect else {
            return Ok(());
        };
        let count = usize::from(ind.nr_segments);
        self.segments.clear();
        for (i, chunk) in descriptors.chunks_exact(SEGMENT_SIZE).take(count).enumerate() {
            let mut b = [0u8; SEGMENT_SIZE];
            b.copy_from_slice(chunk);
            let seg = BlkifSegment::decode(&b);
            seg.check(i)?;
            self.segments.push(seg);
        }
        if self.segments.len() != count {
            return Err(RequestFault::IndirectPages);
        }
        Ok(())
    }
}

/// A response as it goes into (or comes out of) the ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlkifResponse {
    /// The request's id.
    pub id: u64,
    /// The request's operation byte.
    pub operation: u8,
    /// `BLKIF_RSP_*`.
    pub status: i16,
}

impl BlkifResponse {
    /// Encode fully: every byte of the `L::RESPONSE_SIZE` bytes is set (padding zeroed).
    pub fn encode<L: BlkifLayout>(&self) -> [u8; MAX_RESPONSE_SIZE] {
        let mut b = [0u8; MAX_RESPONSE_SIZE];
        b[RSP_ID..RSP_ID + 8].copy_from_slice(&self.id.to_le_bytes());
        b[RSP_OPERATION] = self.operation;
        b[RSP_STATUS..RSP_STATUS + 2].copy_from_slice(&self.status.to_le_bytes());
        b
    }

    /// Decode the first `L::RESPONSE_SIZE` bytes.
    pub fn decode<L: BlkifLayout>(b: &[u8; MAX_RESPONSE_SIZE]) -> BlkifResponse {
        let mut id = [0u8; 8];
        id.copy_from_slice(&b[RSP_ID..RSP_ID + 8]);
        BlkifResponse {
            id: u64::from_le_bytes(id),
            operation: b[RSP_OPERATION],
            status: i16::from_le_bytes([b[RSP_STATUS], b[RSP_STATUS + 1]]),
        }
    }
}

/// Encoders of the request variants, for frontends.
pub mod encode {
    use super::*;

    /// A read, write, barrier or flush request with direct segments (at most 11 are encoded).
    pub fn rw<L: BlkifLayout>(operation: u8, id: u64, sector: u64, segments: &[BlkifSegment]) -> RawRequest {
        let mut r = RawRequest::default();
        let n = segments.len().min(MAX_DIRECT_SEGMENTS);
        r.bytes[REQ_OPERATION] = operation;
        r.bytes[REQ_BYTE1] = u8::try_from(n).unwrap_or(u8::MAX);
        r.put(L::REQ_ID, &id.to_le_bytes());
        r.put(L::REQ_SECTOR, &sector.to_le_bytes());
        for (i, s) in segments.iter().take(n).enumerate() {
            r.put(L::REQ_SEGMENTS + i * SEGMENT_SIZE, &s.encode());
        }
        r
    }

    /// A discard request.
    pub fn discard<L: BlkifLayout>(id: u64, sector: u64, nr_sectors: u64, secure: bool) -> RawRequest {
        let mut r = RawRequest::default();
        r.bytes[REQ_OPERATION] = OP_DISCARD;
        r.bytes[REQ_BYTE1] = if secure { DISCARD_SECURE } else { 0 };
        r.put(L::REQ_ID, &id.to_le_bytes());
        r.put(L::REQ_SECTOR, &sector.to_le_bytes());
        r.put(L::DISCARD_NR_SECTORS, &nr_sectors.to_le_bytes());
        r
    }

    /// An indirect request whose segment descriptors are in the pages `grefs` (at most 8 are encoded).
    pub fn indirect<L: BlkifLayout>(
        indirect_op: u8,
        id: u64,
        sector: u64,
        nr_segments: u16,
        grefs: &[GrantRef],
    ) -> RawRequest {
        let mut r = RawRequest::default();
        r.bytes[REQ_OPERATION] = OP_INDIRECT;
        r.bytes[REQ_BYTE1] = indirect_op;
        r.put(REQ_HALF2, &nr_segments.to_le_bytes());
        r.put(L::REQ_ID, &id.to_le_bytes());
        r.put(L::REQ_SECTOR, &sector.to_le_bytes());
        for (i, g) in grefs.iter().take(MAX_INDIRECT_PAGES).enumerate() {
            r.put(L::INDIRECT_GREFS + 4 * i, &g.to_le_bytes());
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blkif::abi::{X86_32, X86_64};

    fn seg(gref: u32, first: u8, last: u8) -> BlkifSegment {
        BlkifSegment { gref, first_sect: first, last_sect: last }
    }

    fn roundtrip<L: BlkifLayout>() {
        let mut req = BlkifRequest::default();
        let raw = encode::rw::<L>(OP_WRITE, 0xdead_beef_0102, 77, &[seg(9, 0, 7), seg(10, 2, 3)]);
        req.decode::<L>(&raw, 0).expect("valid");
        assert_eq!((req.id, req.op, req.sector, req.segments.len()), (0xdead_beef_0102, BlkifOp::Write, 77, 2));
        assert_eq!((req.segments[1].offset(), req.segments[1].len()), (1024, 1024));

        let raw = encode::discard::<L>(5, 1000, 64, true);
        req.decode::<L>(&raw, 0).expect("valid");
        assert_eq!((req.op, req.sector, req.nr_sectors), (BlkifOp::Discard { secure: true }, 1000, 64));

        let raw = encode::indirect::<L>(OP_READ, 6, 8, 513, &[11, 12]);
        assert_eq!(req.decode::<L>(&raw, 0), Err(RequestFault::UnknownOperation(OP_INDIRECT)), "not advertised");
        assert!(matches!(req.decode::<L>(&raw, 256), Err(RequestFault::SegmentCount { count: 513, .. })));
        let raw = encode::indirect::<L>(OP_READ, 6, 8, 256, &[11]);
        req.decode::<L>(&raw, 256).expect("valid");
        assert_eq!(req.indirect.map(|i| (i.nr_segments, i.grefs[0], i.pages)), Some((256, 11, 1)));
        assert_eq!(req.operation, OP_READ, "responses to indirect requests carry the indirect operation");
        let mut page = vec![0u8; 4096];
        for (i, chunk) in page.chunks_exact_mut(8).take(256).enumerate() {
            chunk.copy_from_slice(&seg(100 + u32::try_from(i).expect("small"), 0, 7).encode());
        }
        req.set_indirect_segments(&page).expect("segments");
        assert_eq!((req.segments.len(), req.segments[255].gref), (256, 355));
        page[8 * 17 + 4] = 6;
        page[8 * 17 + 5] = 5;
        assert!(matches!(req.set_indirect_segments(&page), Err(RequestFault::SegmentSectors { index: 17, .. })));

        let rsp = BlkifResponse { id: u64::MAX - 1, operation: OP_READ, status: RSP_EOPNOTSUPP };
        let bytes = rsp.encode::<L>();
        assert!(bytes[L::RESPONSE_SIZE..].iter().all(|&b| b == 0));
        assert_eq!((bytes[9], &bytes[12..16]), (0, &[0u8; 4][..]), "padding is zero");
        assert_eq!(BlkifResponse::decode::<L>(&bytes), rsp);
    }

    #[test]
    fn roundtrip_both_abis() {
        roundtrip::<X86_64>();
        roundtrip::<X86_32>();
    }

    #[test]
    fn shape_rules() {
        let mut req = BlkifRequest::default();
        let ok = [seg(1, 0, 7)];
        let twelve = [seg(1, 0, 7); 12];
        let mut raw = encode::rw::<X86_64>(OP_READ, 1, 0, &ok);
        raw.bytes[REQ_BYTE1] = 12;
        assert!(matches!(req.decode::<X86_64>(&raw, 0), Err(RequestFault::SegmentCount { count: 12, .. })));
        assert_eq!(req.id, 1, "the id is known even for a refused request");
        let raw = encode::rw::<X86_64>(OP_READ, 1, 0, &[]);
        assert!(matches!(req.decode::<X86_64>(&raw, 0), Err(RequestFault::SegmentCount { count: 0, .. })));
        let raw = encode::rw::<X86_64>(OP_FLUSH_DISKCACHE, 1, 0, &[]);
        req.decode::<X86_64>(&raw, 0).expect("empty flush");
        let raw = encode::rw::<X86_64>(OP_WRITE_BARRIER, 1, 0, &twelve[..11]);
        req.decode::<X86_64>(&raw, 0).expect("barrier with data");
        for (first, last) in [(3, 2), (0, 8), (8, 8), (255, 255)] {
            let raw = encode::rw::<X86_64>(OP_WRITE, 1, 0, &[seg(1, first, last)]);
            assert!(matches!(req.decode::<X86_64>(&raw, 0), Err(RequestFault::SegmentSectors { .. })));
        }
        for op in [OP_RESERVED_1, 7, 200, 255] {
            let raw = encode::rw::<X86_64>(op, 1, 0, &ok);
            let e = req.decode::<X86_64>(&raw, 256).expect_err("unknown");
            assert_eq!(e.status(), RSP_EOPNOTSUPP);
        }
        let raw = encode::indirect::<X86_32>(OP_DISCARD, 1, 0, 4, &[1]);
        assert_eq!(req.decode::<X86_32>(&raw, 256), Err(RequestFault::BadIndirectOperation(OP_DISCARD)));
        let raw = encode::indirect::<X86_32>(OP_WRITE, 1, 0, 0, &[1]);
        assert!(matches!(req.decode::<X86_32>(&raw, 256), Err(RequestFault::SegmentCount { count: 0, .. })));
    }
}
