// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Micro-benchmarks of the transport-neutral hot path: virtio-blk descriptor-chain parsing
//! ([`parse_chain`] over real chains that `virtio-queue`'s driver-side mock built in guest memory) and
//! [`Request::validate`].
//!
//! `cargo bench -p device-blk --bench virtio`; under `cargo test --benches` each benchmark runs once.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use device_blk::virtio::{parse_chain, Parsed};
use device_blk::{Geometry, Request, RequestKind, Sector, Segment};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM_SIZE: usize = 4 << 20;
const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x30_0000;
const QUEUE_SIZE: u16 = 64;
const SEG_MAX: usize = 62;
const PAGE: u32 = 4096;

fn desc(addr: u64, len: u32, device_writable: bool) -> RawDescriptor {
    let flags = if device_writable { u16::try_from(VRING_DESC_F_WRITE).unwrap_or(0) } else { 0 };
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
}

/// A chain: header (type, sector), `pages` data descriptors of 4 KiB (device-writable for reads), status byte.
fn chain_descriptors(mem: &GuestMemoryMmap, virtio_type: u32, sector: u64, pages: u32) -> Vec<RawDescriptor> {
    let mut header = [0u8; 16];
    header[..4].copy_from_slice(&virtio_type.to_le_bytes());
    header[8..].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&header, GuestAddress(HDR)).expect("header in guest memory");
    let writable = virtio_type == VIRTIO_BLK_T_IN;
    let mut descs = vec![desc(HDR, 16, false)];
    descs.extend((0..u64::from(pages)).map(|i| desc(DATA + i * u64::from(PAGE), PAGE, writable)));
    descs.push(desc(STATUS, 1, true));
    descs
}

fn geometry() -> Geometry {
    Geometry { direct_io: true, ..Geometry::for_tests(Sector(1 << 30)) }
}

fn parse(c: &mut Criterion) {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("guest memory");
    let geometry = geometry();
    let mut group = c.benchmark_group("virtio-blk parse_chain");
    let cases: [(&str, u32, u32); 4] = [
        ("read 4k (3 descriptors)", VIRTIO_BLK_T_IN, 1),
        ("write 4k (3 descriptors)", VIRTIO_BLK_T_OUT, 1),
        ("read 128k (34 descriptors)", VIRTIO_BLK_T_IN, 32),
        ("write 128k (34 descriptors)", VIRTIO_BLK_T_OUT, 32),
    ];
    for (name, virtio_type, pages) in cases {
        let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
        let chain = vq.build_desc_chain(&chain_descriptors(&mem, virtio_type, 8, pages)).expect("descriptor chain");
        let mut request = Request::with_capacity();
        assert!(matches!(parse_chain(chain.clone(), &mem, SEG_MAX, &mut request), Parsed::Request { .. }));
        assert_eq!(request.segments.len(), pages as usize, "{name}");
        group.bench_function(name, |b| {
            b.iter(|| black_box(parse_chain(black_box(chain.clone()), &mem, SEG_MAX, &mut request)))
        });
        group.bench_function(format!("{name} + validate"), |b| {
            b.iter(|| {
                let parsed = parse_chain(black_box(chain.clone()), &mem, SEG_MAX, &mut request);
                black_box((parsed, request.validate(&geometry)))
            })
        });
    }
    // A discard: header, one 16-byte range, status.
    let mut range = [0u8; 16];
    range[..8].copy_from_slice(&(1u64 << 20).to_le_bytes());
    range[8..12].copy_from_slice(&2048u32.to_le_bytes());
    let mut descs = chain_descriptors(&mem, VIRTIO_BLK_T_DISCARD, 0, 0);
    mem.write_slice(&range, GuestAddress(DATA)).expect("range in guest memory");
    descs.insert(1, desc(DATA, 16, false));
    let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
    let chain = vq.build_desc_chain(&descs).expect("descriptor chain");
    let mut request = Request::with_capacity();
    assert!(matches!(parse_chain(chain.clone(), &mem, SEG_MAX, &mut request), Parsed::Request { .. }));
    assert_eq!((request.kind, request.discard_sectors), (RequestKind::Discard { secure: false }, 2048));
    group.bench_function("discard (3 descriptors)", |b| {
        b.iter(|| black_box(parse_chain(black_box(chain.clone()), &mem, SEG_MAX, &mut request)))
    });
    group.finish();
}

fn validate(c: &mut Criterion) {
    let geometry = geometry();
    let mut group = c.benchmark_group("Request::validate");
    let data = |kind, pages: u32| {
        let mut r = Request::with_capacity();
        r.reset(kind, Sector(1 << 20));
        r.segments.extend(
            (0..u64::from(pages)).map(|i| Segment { addr: GuestAddress(DATA + i * u64::from(PAGE)), len: PAGE }),
        );
        r
    };
    let mut discard = Request::new(RequestKind::Discard { secure: false });
    discard.sector = Sector(1 << 20);
    discard.discard_sectors = 2048;
    let cases = [
        ("read 4k", data(RequestKind::Read, 1)),
        ("write 128k (32 segments)", data(RequestKind::Write, 32)),
        ("read 1m (256 segments)", data(RequestKind::Read, 256)),
        ("discard 1m", discard),
        ("flush", Request::new(RequestKind::Flush)),
    ];
    for (name, request) in &cases {
        request.validate(&geometry).expect("a valid request");
        group.bench_function(*name, |b| b.iter(|| black_box(black_box(request).validate(&geometry))));
    }
    // The refusal path costs no more than acceptance: a hostile request is answered as cheaply.
    let mut beyond = data(RequestKind::Read, 1);
    beyond.sector = Sector(geometry.capacity.0);
    beyond.validate(&geometry).expect_err("beyond the end");
    group.bench_function("read 4k beyond the end (refused)", |b| {
        b.iter(|| black_box(black_box(&beyond).validate(&geometry)))
    });
    group.finish();
}

criterion_group!(benches, parse, validate);
criterion_main!(benches);
