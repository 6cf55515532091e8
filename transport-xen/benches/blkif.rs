// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Micro-benchmarks of the blkif hot path, for both ABIs: a request decoded and its shape checked
//! ([`BlkifRequest::decode`], plus [`BlkifRequest::set_indirect_segments`] for indirect requests), turned into the
//! `device-blk` request (as the data plane does) and validated against the disk ([`Request::validate`]); and one
//! request's whole trip through a shared ring in memory (frontend produces, backend copies it out once, decodes,
//! validates, answers; frontend takes the response).
//!
//! Not included: grant mapping or copying of the indirect descriptor pages and data pages (the grant table's
//! cost, measured end to end by `blkback-bench xen-emulated`).
//!
//! `cargo bench -p transport-xen --bench blkif`; under `cargo test --benches` each benchmark runs once.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use device_blk::{Geometry, Request, RequestKind, Sector};
use transport_xen::blkif::{
    encode, BackRing, BlkifLayout, BlkifOp, BlkifRequest, BlkifResponse, BlkifSegment, FrontRing, RawRequest, OP_READ,
    OP_WRITE, RSP_ERROR, RSP_OKAY, X86_32, X86_64,
};
use transport_xen::connect::MAX_INDIRECT_SEGMENTS;
use transport_xen::grant_memory::segment_address;

const PAGE: usize = 4096;

/// One page-aligned shared ring page.
#[repr(C, align(4096))]
struct RingPage([u8; PAGE]);

fn geometry() -> Geometry {
    Geometry { direct_io: true, write_zeroes: false, ..Geometry::for_tests(Sector(1 << 30)) }
}

fn segments(n: usize) -> Vec<BlkifSegment> {
    (0..n).map(|i| BlkifSegment { gref: 100 + u32::try_from(i).unwrap_or(0), first_sect: 0, last_sect: 7 }).collect()
}

/// The data plane's per-request work on a copied-out request: decode and check its shape, fill indirect segments
/// from a copy of the descriptor pages, build the `device-blk` request, validate it against the disk.
fn parse_and_validate<L: BlkifLayout>(
    raw: &RawRequest,
    descriptors: &[u8],
    req: &mut BlkifRequest,
    dev: &mut Request,
    geometry: &Geometry,
) -> bool {
    let max_indirect = MAX_INDIRECT_SEGMENTS as usize;
    if req.decode::<L>(raw, max_indirect).is_err() || req.set_indirect_segments(descriptors).is_err() {
        return false;
    }
    let kind = match req.op {
        BlkifOp::Read => RequestKind::Read,
        BlkifOp::Write | BlkifOp::WriteBarrier | BlkifOp::Flush => RequestKind::Write,
        BlkifOp::Discard { secure } => RequestKind::Discard { secure },
    };
    dev.reset(kind, Sector(req.sector));
    dev.discard_sectors = req.nr_sectors;
    dev.segments.extend(req.segments.iter().enumerate().map(|(i, s)| segment_address(i, s)));
    dev.validate(geometry).is_ok()
}

fn decode_abi<L: BlkifLayout>(c: &mut Criterion, abi: &str) {
    let geometry = geometry();
    let mut group = c.benchmark_group(format!("blkif parse+validate {abi}"));
    let (mut req, mut dev) = (BlkifRequest::default(), Request::with_capacity());
    for n in [1, 11] {
        let raw = encode::rw::<L>(OP_READ, 7, 2048, &segments(n));
        assert!(parse_and_validate::<L>(&raw, &[], &mut req, &mut dev, &geometry));
        let name = if n == 1 {
            "direct read 4k (1 segment)".to_string()
        } else {
            format!("direct read {}k ({n} segments)", n * 4)
        };
        group.bench_function(name, |b| {
            b.iter(|| black_box(parse_and_validate::<L>(black_box(&raw), &[], &mut req, &mut dev, &geometry)))
        });
    }
    for n in [32u16, 256] {
        let descriptors: Vec<u8> = segments(usize::from(n)).iter().flat_map(BlkifSegment::encode).collect();
        let raw = encode::indirect::<L>(OP_WRITE, 9, 4096, n, &[40]);
        assert!(parse_and_validate::<L>(&raw, &descriptors, &mut req, &mut dev, &geometry));
        group.bench_function(
            format!(
                "indirect write {} ({n} segments)",
                if n == 256 { "1m".to_string() } else { format!("{}k", n * 4) }
            ),
            |b| {
                b.iter(|| {
                    black_box(parse_and_validate::<L>(black_box(&raw), &descriptors, &mut req, &mut dev, &geometry))
                })
            },
        );
    }
    let bad = encode::rw::<L>(OP_READ, 7, geometry.capacity.0, &segments(1));
    assert!(!parse_and_validate::<L>(&bad, &[], &mut req, &mut dev, &geometry));
    group.bench_function("direct read beyond the end (refused)", |b| {
        b.iter(|| black_box(parse_and_validate::<L>(black_box(&bad), &[], &mut req, &mut dev, &geometry)))
    });
    group.finish();
}

/// One 4 KiB read through a one-page shared ring: frontend puts and pushes; backend reads `req_prod`, copies the
/// request out, decodes, validates, answers and pushes; frontend takes the response.
fn ring_abi<L: BlkifLayout>(c: &mut Criterion, abi: &str) {
    let geometry = geometry();
    let mut page = Box::new(RingPage([0; PAGE]));
    let base = page.0.as_mut_ptr();
    // SAFETY: `page` is one page-aligned, writable page that outlives both ring handles (dropped at the end of
    // this function, after them: declared first, dropped last); the two handles share it as the frontend and backend of a real ring do.
    let mut front = unsafe { FrontRing::<L>::init(base, PAGE) }.expect("front ring");
    // SAFETY: as above.
    let mut back = unsafe { BackRing::<L>::new(base, PAGE) }.expect("back ring");
    let raw = encode::rw::<L>(OP_READ, 3, 2048, &segments(1));
    let (mut copy, mut req, mut dev) = (RawRequest::default(), BlkifRequest::default(), Request::with_capacity());
    let mut trip = || -> bool {
        front.put_request(&raw);
        front.push_requests();
        let mut answered = 0;
        if back.unconsumed().unwrap_or(0) > 0 && back.next_request(&mut copy) {
            let ok = parse_and_validate::<L>(&copy, &[], &mut req, &mut dev, &geometry);
            let status = if ok { RSP_OKAY } else { RSP_ERROR };
            back.put_response(&BlkifResponse { id: req.id, operation: req.operation, status });
            back.push_responses();
        }
        while let Some(rsp) = front.take_response() {
            answered += usize::from(rsp.status == RSP_OKAY);
        }
        answered == 1
    };
    assert!(trip(), "a request goes round the ring");
    c.benchmark_group("blkif ring round trip")
        .bench_function(format!("{abi} direct read 4k"), |b| b.iter(|| black_box(trip())));
}

fn benches(c: &mut Criterion) {
    decode_abi::<X86_64>(c, "x86_64");
    decode_abi::<X86_32>(c, "x86_32");
    ring_abi::<X86_64>(c, "x86_64");
    ring_abi::<X86_32>(c, "x86_32");
}

criterion_group!(blkif, benches);
criterion_main!(blkif);
