// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! blkif request decoding (`transport_xen::blkif::BlkifRequest::decode` and `set_indirect_segments`) for both
//! ABIs, including the segment descriptors of indirect pages, and the response codec.
//!
//! Layout: `u8` flags (bit 0: x86_32 ABI), `u16` advertised indirect segment limit, 112 bytes of request as
//! copied out of the ring, `u64` response id, `u8` response operation, `u16` response status, then the bytes of
//! the indirect descriptor pages (zero-padded to the pages the request names).
//!
//! Invariants: every decoded segment stays inside its 4 KiB page with 1 to 8 sectors; segment counts respect
//! the operation (1..=11 direct for read/write, 0..=11 for flush/barrier, 1..=min(limit, 2048) indirect with
//! `ceil(n / 512)` pages); `id` and `operation` are known even for a refused request; only unknown operations
//! are answered `EOPNOTSUPP`; a decoded request re-encodes (the crate's own encoders) to one that decodes the
//! same; turned into a `device-blk` request (at `segment_address`) every buffer lies inside the request's
//! pages; a response encodes fully and decodes to itself.

use device_blk::{BlockSize, Geometry, Request, RequestKind, Sector};
use transport_xen::blkif::{
    encode, BlkifLayout, BlkifOp, BlkifRequest, BlkifResponse, RawRequest, RequestFault, MAX_DIRECT_SEGMENTS,
    MAX_INDIRECT_PAGES, OP_DISCARD, OP_FLUSH_DISKCACHE, OP_INDIRECT, OP_READ, OP_WRITE, OP_WRITE_BARRIER,
    RSP_EOPNOTSUPP, RSP_ERROR, SEGMENTS_PER_INDIRECT_PAGE, X86_32, X86_64,
};
use transport_xen::grant_memory::segment_address;
use transport_xen::services::XEN_PAGE_SIZE;

use crate::input::{Reader, Writer};

fn check_segments(req: &BlkifRequest) {
    for s in &req.segments {
        assert!(s.first_sect <= s.last_sect && s.last_sect < 8, "segment {s:?} accepted");
        assert!(!s.is_empty() && s.len() <= 4096 && s.offset() + s.len() <= 4096);
    }
}

fn run_abi<L: BlkifLayout>(raw: &RawRequest, max_indirect: usize, pages: &[u8]) {
    let mut req = BlkifRequest::default();
    // A reused request that held an indirect request before.
    req.segments.resize(300, Default::default());
    let result = req.decode::<L>(raw, max_indirect);
    assert_eq!(req.id, raw.id::<L>());
    let op = raw.operation();
    // Indirect requests are answered with their indirect operation, as Linux blkback does.
    let echoed = if op == OP_INDIRECT && max_indirect > 0 { raw.bytes[1] } else { op };
    assert_eq!(req.operation, echoed);
    match &result {
        Err(fault) => {
            let known = matches!(op, OP_READ | OP_WRITE | OP_WRITE_BARRIER | OP_FLUSH_DISKCACHE | OP_DISCARD)
                || (op == OP_INDIRECT && max_indirect > 0);
            let unknown = !known;
            assert_eq!(matches!(fault, RequestFault::UnknownOperation(_)), unknown, "{fault}");
            assert_eq!(fault.status(), if unknown { RSP_EOPNOTSUPP } else { RSP_ERROR });
            return;
        }
        Ok(()) => check_segments(&req),
    }
    let n = req.segments.len();
    match (op, req.op) {
        (OP_READ, BlkifOp::Read) | (OP_WRITE, BlkifOp::Write) => assert!((1..=MAX_DIRECT_SEGMENTS).contains(&n)),
        (OP_WRITE_BARRIER, BlkifOp::WriteBarrier) | (OP_FLUSH_DISKCACHE, BlkifOp::Flush) => {
            assert!(n <= MAX_DIRECT_SEGMENTS)
        }
        (OP_DISCARD, BlkifOp::Discard { .. }) => assert_eq!(n, 0),
        (OP_INDIRECT, BlkifOp::Read | BlkifOp::Write) => assert_eq!(n, 0, "segments come from the pages"),
        other => panic!("operation {other:?} decoded"),
    }

    // Re-encode and decode again: the same request.
    let again = match req.indirect {
        Some(ind) => {
            let inner = if req.op == BlkifOp::Read { OP_READ } else { OP_WRITE };
            encode::indirect::<L>(inner, req.id, req.sector, ind.nr_segments, &ind.grefs)
        }
        None if op == OP_DISCARD => {
            encode::discard::<L>(req.id, req.sector, req.nr_sectors, req.op == BlkifOp::Discard { secure: true })
        }
        None => encode::rw::<L>(op, req.id, req.sector, &req.segments),
    };
    let mut second = BlkifRequest::default();
    second.decode::<L>(&again, max_indirect).expect("a re-encoded request decodes");
    assert_eq!(second, req, "decode(encode(x)) != x");

    if let Some(ind) = req.indirect {
        let count = usize::from(ind.nr_segments);
        assert!(count >= 1 && count <= max_indirect.min(MAX_INDIRECT_PAGES * SEGMENTS_PER_INDIRECT_PAGE));
        assert_eq!(ind.pages, count.div_ceil(SEGMENTS_PER_INDIRECT_PAGE));
        let mut copy = pages.to_vec();
        copy.resize(ind.pages * XEN_PAGE_SIZE, 0);
        match req.set_indirect_segments(&copy) {
            Ok(()) => {
                assert_eq!(req.segments.len(), count);
                check_segments(&req);
            }
            Err(fault) => assert_eq!(fault.status(), RSP_ERROR),
        }
        // A copy one byte short of the descriptors is refused, never read past.
        assert!(req.set_indirect_segments(&copy[..count * 8 - 1]).is_err(), "a short descriptor copy was accepted");
        req.set_indirect_segments(&copy).ok();
    }

    // The device-blk request: each segment at page i of the request's memory.
    let kind = match req.op {
        BlkifOp::Read => RequestKind::Read,
        _ => RequestKind::Write,
    };
    let mut dev = Request::new(kind);
    dev.sector = Sector(req.sector);
    for (i, s) in req.segments.iter().enumerate() {
        let seg = segment_address(i, s);
        let page = (i * XEN_PAGE_SIZE) as u64;
        assert!(seg.addr.0 >= page && seg.addr.0 + u64::from(seg.len) <= page + XEN_PAGE_SIZE as u64);
        dev.segments.push(seg);
    }
    let geometry = Geometry { physical_block_size: BlockSize::SECTOR, ..Geometry::for_tests(Sector(1 << 21)) };
    if let Ok(range) = dev.validate(&geometry) {
        assert_eq!(range.len, dev.data_len());
        assert!(range.offset + range.len <= geometry.size_bytes());
    }
}

/// Run one input.
pub fn run(data: &[u8]) {
    let mut r = Reader::new(data);
    let flags = r.u8();
    let max_indirect = usize::from(r.u16());
    let raw = RawRequest { bytes: r.array() };
    let rsp = BlkifResponse { id: r.u64(), operation: r.u8(), status: r.u16() as i16 };
    let pages = r.rest();
    if flags & 1 == 0 {
        run_abi::<X86_64>(&raw, max_indirect, pages);
    } else {
        // The copy out of an x86_32 ring leaves the bytes past its 108-byte requests zero.
        let mut raw = raw;
        raw.bytes[X86_32::REQUEST_SIZE..].fill(0);
        run_abi::<X86_32>(&raw, max_indirect, pages);
    }
    for encoded in [rsp.encode::<X86_64>(), rsp.encode::<X86_32>()] {
        assert_eq!(BlkifResponse::decode::<X86_64>(&encoded), rsp);
        assert!(encoded[X86_64::RESPONSE_SIZE..].iter().all(|&b| b == 0));
        assert_eq!(encoded[9], 0, "response padding");
    }
}

fn seed(abi32: bool, max_indirect: u16, raw: &RawRequest, pages: &[u8]) -> Vec<u8> {
    let mut w = Writer::new();
    w.u8(u8::from(abi32)).u16(max_indirect).bytes(&raw.bytes).u64(7).u8(OP_READ).u16(0xffff).bytes(pages);
    w.finish()
}

/// Seed inputs.
pub fn seeds() -> Vec<Vec<u8>> {
    use transport_xen::blkif::BlkifSegment;
    let seg = |gref, first, last| BlkifSegment { gref, first_sect: first, last_sect: last };
    let mut page = vec![0u8; 2 * XEN_PAGE_SIZE];
    for (i, chunk) in page.chunks_exact_mut(8).enumerate() {
        chunk.copy_from_slice(&seg(100 + i as u32, (i % 8) as u8, 7).encode());
    }
    let mut out = Vec::new();
    for abi32 in [false, true] {
        macro_rules! both {
            ($f:ident ( $($a:expr),* )) => {
                if abi32 { encode::$f::<X86_32>($($a),*) } else { encode::$f::<X86_64>($($a),*) }
            };
        }
        out.push(seed(abi32, 0, &both!(rw(OP_READ, 1, 8, &[seg(9, 0, 7), seg(10, 2, 3)])), &[]));
        out.push(seed(abi32, 0, &both!(rw(OP_WRITE, 2, 0, &[seg(9, 0, 7); 11])), &[]));
        out.push(seed(abi32, 0, &both!(rw(OP_FLUSH_DISKCACHE, 3, 0, &[])), &[]));
        out.push(seed(abi32, 0, &both!(rw(OP_WRITE_BARRIER, 4, 0, &[seg(1, 3, 2)])), &[]));
        out.push(seed(abi32, 0, &both!(discard(5, 1000, 64, true)), &[]));
        out.push(seed(abi32, 256, &both!(indirect(OP_READ, 6, 8, 256, &[11])), &page[..XEN_PAGE_SIZE]));
        out.push(seed(abi32, 1024, &both!(indirect(OP_WRITE, 7, 8, 600, &[11, 12])), &page));
        out.push(seed(abi32, 256, &both!(indirect(OP_DISCARD, 8, 0, 4, &[1])), &[]));
    }
    out
}
