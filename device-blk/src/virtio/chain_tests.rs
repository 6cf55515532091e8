// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Parser tests on real descriptor chains, built in guest memory by `virtio-queue`'s driver-side mock.

// Small constants (ring flags, test addresses) are narrowed freely here.
#![allow(clippy::cast_possible_truncation)]

use proptest::prelude::*;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;

const MEM_SIZE: u64 = 0x40_0000;
const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x30_0000;
const SEG_MAX: usize = 4;

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).expect("guest memory")
}

fn header(mem: &GuestMemoryMmap, virtio_type: u32, sector: u64) {
    let mut raw = [0u8; 16];
    raw[..4].copy_from_slice(&virtio_type.to_le_bytes());
    raw[8..].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&raw, GuestAddress(HDR)).expect("header");
}

fn range(mem: &GuestMemoryMmap, sector: u64, sectors: u32, flags: u32) {
    let mut raw = [0u8; 16];
    raw[..8].copy_from_slice(&sector.to_le_bytes());
    raw[8..12].copy_from_slice(&sectors.to_le_bytes());
    raw[12..].copy_from_slice(&flags.to_le_bytes());
    mem.write_slice(&raw, GuestAddress(DATA)).expect("range");
}

fn desc(addr: u64, len: u32, device_writable: bool) -> RawDescriptor {
    let flags = if device_writable { VRING_DESC_F_WRITE as u16 } else { 0 };
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
}

fn hdr() -> RawDescriptor {
    desc(HDR, 16, false)
}

fn status() -> RawDescriptor {
    desc(STATUS, 1, true)
}

fn parse(mem: &GuestMemoryMmap, descs: &[RawDescriptor]) -> (Parsed, Request) {
    let mut request = Request::with_capacity();
    let parsed = parse_into(mem, descs, &mut request);
    (parsed, request)
}

fn parse_into(mem: &GuestMemoryMmap, descs: &[RawDescriptor], request: &mut Request) -> Parsed {
    let vq = MockSplitQueue::new(mem, 16);
    let chain = vq.build_desc_chain(descs).expect("descriptor chain");
    parse_chain(chain, mem, SEG_MAX, request)
}

fn refused(parsed: Parsed) -> ChainError {
    match parsed {
        Parsed::Refused { status, error } => {
            assert_eq!(status, GuestAddress(STATUS));
            error
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn unanswerable(parsed: Parsed) -> ChainError {
    match parsed {
        Parsed::Unanswerable { error } => error,
        other => panic!("expected an unanswerable chain, got {other:?}"),
    }
}

#[test]
fn read_write_flush_and_get_id_parse() {
    let mem = &memory();
    header(mem, VIRTIO_BLK_T_IN, 8);
    let (parsed, req) = parse(mem, &[hdr(), desc(DATA, 4096, true), desc(DATA + 8192, 512, true), status()]);
    assert_eq!(parsed, Parsed::Request { status: GuestAddress(STATUS) });
    assert_eq!((req.kind, req.sector), (RequestKind::Read, Sector(8)));
    assert_eq!(
        req.segments,
        vec![Segment { addr: GuestAddress(DATA), len: 4096 }, Segment { addr: GuestAddress(DATA + 8192), len: 512 }]
    );

    header(mem, VIRTIO_BLK_T_OUT, 3);
    let (parsed, req) = parse(mem, &[hdr(), desc(DATA, 512, false), status()]);
    assert!(matches!(parsed, Parsed::Request { .. }));
    assert_eq!((req.kind, req.sector, req.segments.len()), (RequestKind::Write, Sector(3), 1));

    header(mem, VIRTIO_BLK_T_FLUSH, 0);
    let (parsed, req) = parse(mem, &[hdr(), status()]);
    assert!(matches!(parsed, Parsed::Request { .. }));
    assert_eq!(req.kind, RequestKind::Flush);

    header(mem, VIRTIO_BLK_T_GET_ID, 0);
    let (parsed, req) = parse(mem, &[hdr(), desc(DATA, 20, true), status()]);
    assert!(matches!(parsed, Parsed::Request { .. }));
    assert_eq!((req.kind, req.segments.len()), (RequestKind::GetId, 1));
}

#[test]
fn the_status_is_the_last_byte_of_the_last_descriptor() {
    let mem = &memory();
    header(mem, VIRTIO_BLK_T_FLUSH, 0);
    let (parsed, _) = parse(mem, &[hdr(), desc(STATUS, 4, true)]);
    assert_eq!(parsed, Parsed::Request { status: GuestAddress(STATUS + 3) });
}

#[test]
fn chains_without_a_usable_status_byte_are_unanswerable() {
    let mem = &memory();
    header(mem, VIRTIO_BLK_T_IN, 0);
    let data = desc(DATA, 512, true);
    assert_eq!(unanswerable(parse(mem, &[hdr(), data, desc(STATUS, 1, false)]).0), ChainError::StatusReadOnly);
    assert_eq!(unanswerable(parse(mem, &[hdr(), data, desc(STATUS, 0, true)]).0), ChainError::StatusEmpty);
    assert_eq!(unanswerable(parse(mem, &[hdr()]).0), ChainError::NoStatus);
    assert_eq!(
        unanswerable(parse(mem, &[hdr(), data, desc(MEM_SIZE, 1, true)]).0),
        ChainError::StatusOutsideMemory { addr: MEM_SIZE }
    );
    assert!(matches!(
        unanswerable(parse(mem, &[hdr(), data, desc(u64::MAX, 2, true)]).0),
        ChainError::StatusOutsideMemory { .. }
    ));
}

#[test]
fn bad_headers_are_refused_with_ioerr() {
    let mem = &memory();
    header(mem, VIRTIO_BLK_T_IN, 0);
    let data = desc(DATA, 512, true);
    let short = refused(parse(mem, &[desc(HDR, 8, false), data, status()]).0);
    assert_eq!(short, ChainError::HeaderTooShort { len: 8 });
    assert_eq!(short.status(), Status::IoError);
    assert_eq!(refused(parse(mem, &[desc(HDR, 16, true), data, status()]).0), ChainError::HeaderWritable);
    assert_eq!(
        refused(parse(mem, &[desc(MEM_SIZE - 8, 16, false), data, status()]).0),
        ChainError::HeaderOutsideMemory { addr: MEM_SIZE - 8 }
    );
}

#[test]
fn data_in_the_wrong_direction_is_refused() {
    let mem = &memory();
    header(mem, VIRTIO_BLK_T_IN, 0);
    let err = refused(parse(mem, &[hdr(), desc(DATA, 512, false), status()]).0);
    assert!(matches!(err, ChainError::WrongDirection { op: "read", .. }), "{err}");
    header(mem, VIRTIO_BLK_T_OUT, 0);
    let err = refused(parse(mem, &[hdr(), desc(DATA, 512, false), desc(DATA, 512, true), status()]).0);
    assert!(matches!(err, ChainError::WrongDirection { op: "write", .. }), "{err}");
    assert_eq!(err.status(), Status::IoError);
    header(mem, VIRTIO_BLK_T_GET_ID, 0);
    assert!(matches!(
        refused(parse(mem, &[hdr(), desc(DATA, 20, false), status()]).0),
        ChainError::WrongDirection { .. }
    ));
    header(mem, VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(refused(parse(mem, &[hdr(), desc(DATA, 512, true), status()]).0), ChainError::UnexpectedData);
}

#[test]
fn segments_beyond_seg_max_are_refused() {
    let mem = &memory();
    header(mem, VIRTIO_BLK_T_IN, 0);
    let mut descs = vec![hdr()];
    descs.extend((0..SEG_MAX as u64).map(|i| desc(DATA + i * 512, 512, true)));
    descs.push(status());
    assert!(matches!(parse(mem, &descs).0, Parsed::Request { .. }));
    descs.insert(1, desc(DATA, 512, true));
    assert_eq!(refused(parse(mem, &descs).0), ChainError::TooManySegments { max: SEG_MAX });
}

/// A chain is read to [`max_chain_len`] descriptors at most (an indirect table may list 65535): one segment too
/// many still gets its error status, a longer chain is left unanswerable without reading the rest.
#[test]
fn a_chain_is_read_only_as_far_as_a_request_can_reach() {
    let mem = &memory();
    header(mem, VIRTIO_BLK_T_IN, 0);
    let max = max_chain_len(SEG_MAX);
    assert_eq!(max, SEG_MAX + 3);
    let chain = |data: usize| {
        let mut descs = vec![hdr()];
        descs.extend((0..data as u64).map(|i| desc(DATA + (i % 8) * 512, 512, true)));
        descs.push(status());
        descs
    };
    let descs = chain(SEG_MAX + 1);
    assert_eq!(descs.len(), max);
    assert_eq!(refused(parse(mem, &descs).0), ChainError::TooManySegments { max: SEG_MAX });
    let long = chain(60_000);
    let mut read = 0usize;
    let mut request = Request::with_capacity();
    let counted = long.iter().map(|&d| {
        read += 1;
        Descriptor::from(d)
    });
    let parsed = parse_chain(counted, mem, SEG_MAX, &mut request);
    assert!(matches!(parsed, Parsed::Unanswerable { error: ChainError::TooLong { max: m } } if m == max), "{parsed:?}");
    assert_eq!(read, max + 1, "read one descriptor past the bound, not 60002");
}

#[test]
fn unknown_types_are_unsupported() {
    let mem = &memory();
    header(mem, 10, 0); // VIRTIO_BLK_T_GET_LIFETIME
    let err = refused(parse(mem, &[hdr(), desc(DATA, 16, true), status()]).0);
    assert_eq!(err, ChainError::UnknownType(10));
    assert_eq!(err.status(), Status::Unsupported);
    assert!(!err.is_malformed());
}

#[test]
fn discard_and_write_zeroes_carry_one_range() {
    let mem = &memory();
    header(mem, VIRTIO_BLK_T_DISCARD, 999);
    range(mem, 16, 8, 0);
    let (parsed, req) = parse(mem, &[hdr(), desc(DATA, 16, false), status()]);
    assert!(matches!(parsed, Parsed::Request { .. }));
    assert_eq!((req.kind, req.sector, req.discard_sectors), (RequestKind::Discard { secure: false }, Sector(16), 8));

    header(mem, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    range(mem, 32, 4, 1);
    let (parsed, req) = parse(mem, &[hdr(), desc(DATA, 16, false), status()]);
    assert!(matches!(parsed, Parsed::Request { .. }));
    assert_eq!((req.kind, req.sector, req.discard_sectors), (RequestKind::WriteZeroes { unmap: true }, Sector(32), 4));
    range(mem, 32, 4, 0);
    assert_eq!(parse(mem, &[hdr(), desc(DATA, 16, false), status()]).1.kind, RequestKind::WriteZeroes { unmap: false });
}

#[test]
fn bad_ranges_are_refused() {
    let mem = &memory();
    header(mem, VIRTIO_BLK_T_DISCARD, 0);
    range(mem, 0, 8, 1);
    let err = refused(parse(mem, &[hdr(), desc(DATA, 16, false), status()]).0);
    assert_eq!((err, err.status()), (ChainError::DiscardUnmap, Status::Unsupported));
    range(mem, 0, 8, 2);
    let err = refused(parse(mem, &[hdr(), desc(DATA, 16, false), status()]).0);
    assert_eq!((err, err.status()), (ChainError::ReservedFlags { flags: 2 }, Status::Unsupported));
    range(mem, 0, 8, 0);
    let err = refused(parse(mem, &[hdr(), desc(DATA, 8, false), status()]).0);
    assert_eq!((err, err.status()), (ChainError::BadRangePayload { len: 8 }, Status::IoError));
    let err = refused(parse(mem, &[hdr(), desc(DATA, 32, false), status()]).0);
    assert_eq!((err, err.status()), (ChainError::TooManyRanges, Status::Unsupported));
    let two = [hdr(), desc(DATA, 16, false), desc(DATA, 16, false), status()];
    assert_eq!(refused(parse(mem, &two).0), ChainError::TooManyRanges);
    assert_eq!(refused(parse(mem, &[hdr(), status()]).0), ChainError::MissingRange);
    assert!(matches!(
        refused(parse(mem, &[hdr(), desc(DATA, 16, true), status()]).0),
        ChainError::WrongDirection { .. }
    ));
    header(mem, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    assert_eq!(
        refused(parse(mem, &[hdr(), desc(MEM_SIZE - 8, 16, false), status()]).0),
        ChainError::RangeOutsideMemory { addr: MEM_SIZE - 8 }
    );
}

#[test]
fn the_request_slot_is_reset_between_chains() {
    let mem = &memory();
    let mut request = Request::with_capacity();
    let capacity = request.segments.capacity();
    header(mem, VIRTIO_BLK_T_IN, 4);
    parse_into(mem, &[hdr(), desc(DATA, 512, true), desc(DATA, 512, true), status()], &mut request);
    header(mem, VIRTIO_BLK_T_FLUSH, 0);
    assert!(matches!(parse_into(mem, &[hdr(), status()], &mut request), Parsed::Request { .. }));
    assert_eq!((request.kind, request.sector, request.segments.len()), (RequestKind::Flush, Sector(0), 0));
    assert_eq!(request.segments.capacity(), capacity, "the segment allocation is reused");
}

#[test]
fn indirect_chains_parse_like_direct_ones() {
    let mem = &memory();
    header(mem, VIRTIO_BLK_T_IN, 2);
    let table = GuestAddress(0x38_0000);
    let entries = [(HDR, 16, 0), (DATA, 1024, VRING_DESC_F_WRITE), (STATUS, 1, VRING_DESC_F_WRITE)];
    for (i, &(addr, len, flags)) in entries.iter().enumerate() {
        let next = u16::try_from(i + 1).expect("small");
        let flags = if i + 1 < entries.len() { flags | VRING_DESC_F_NEXT } else { flags };
        let raw = RawDescriptor::from(SplitDescriptor::new(addr, len, u16::try_from(flags).expect("flags"), next));
        mem.write_obj(raw, table.unchecked_add(16 * i as u64)).expect("indirect table");
    }
    let head = RawDescriptor::from(SplitDescriptor::new(table.0, 48, VRING_DESC_F_INDIRECT as u16, 0));
    let (parsed, req) = parse(mem, &[head]);
    assert_eq!(parsed, Parsed::Request { status: GuestAddress(STATUS) });
    assert_eq!((req.kind, req.sector, req.data_len()), (RequestKind::Read, Sector(2), 1024));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Whatever a guest puts in a chain, the parser neither panics nor lets a request through with more
    /// segments than advertised or a status byte outside guest memory.
    #[test]
    fn hostile_chains_never_break_the_parser(
        virtio_type in prop_oneof![0u32..16, any::<u32>()],
        sector in any::<u64>(),
        descs in proptest::collection::vec((0u64..MEM_SIZE + 0x1000, 0u32..0x3000, any::<bool>()), 1..10),
    ) {
        let mem = &memory();
        header(mem, virtio_type, sector);
        let raw: Vec<RawDescriptor> = descs.iter().map(|&(addr, len, w)| desc(addr, len, w)).collect();
        let mut request = Request::with_capacity();
        match parse_into(mem, &raw, &mut request) {
            Parsed::Request { status } => {
                prop_assert!(mem.address_in_range(status));
                prop_assert!(request.segments.len() <= SEG_MAX);
            }
            Parsed::Refused { status, .. } => prop_assert!(mem.address_in_range(status)),
            Parsed::Unanswerable { .. } => {}
        }
    }
}
