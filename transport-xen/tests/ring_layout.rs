// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The layout constants against the C structures of Xen's `public/io/blkif.h` and `ring.h`, transcribed as
//! `#[repr(C)]` structs: natural alignment for x86_64, 4-byte alignment of 64-bit fields for x86_32 (the i386
//! System V ABI), so the compiler computes the offsets the C compiler does.

use std::mem::{offset_of, size_of};

use transport_xen::blkif::abi::{
    BlkifLayout, REQ_BYTE1, REQ_HALF2, REQ_OPERATION, RSP_ID, RSP_OPERATION, RSP_STATUS, SEGMENT_SIZE, SEG_FIRST_SECT,
    SEG_LAST_SECT, SRING_HEADER,
};
use transport_xen::blkif::{X86_32, X86_64};

#[repr(C)]
struct Segment {
    gref: u32,
    first_sect: u8,
    last_sect: u8,
}

/// The shared ring header of `DEFINE_RING_TYPES` (the `pvt` union is 44 bytes + 4 bytes of padding).
#[repr(C)]
struct SringHeader {
    req_prod: u32,
    req_event: u32,
    rsp_prod: u32,
    rsp_event: u32,
    pad: [u8; 48],
}

macro_rules! blkif_structs {
    ($modname:ident, $repr:meta) => {
        mod $modname {
            use super::Segment;
            #[$repr]
            pub struct Request {
                pub operation: u8,
                pub nr_segments: u8,
                pub handle: u16,
                pub id: u64,
                pub sector_number: u64,
                pub seg: [Segment; 11],
            }
            #[$repr]
            pub struct Discard {
                pub operation: u8,
                pub flag: u8,
                pub handle: u16,
                pub id: u64,
                pub sector_number: u64,
                pub nr_sectors: u64,
            }
            #[$repr]
            pub struct Indirect {
                pub operation: u8,
                pub indirect_op: u8,
                pub nr_segments: u16,
                pub id: u64,
                pub sector_number: u64,
                pub handle: u16,
                pub indirect_grefs: [u32; 8],
            }
            #[$repr]
            pub struct Response {
                pub id: u64,
                pub operation: u8,
                pub status: i16,
            }
        }
    };
}

blkif_structs!(c64, repr(C));
blkif_structs!(c32, repr(C, packed(4)));

macro_rules! check_layout {
    ($l:ty, $c:ident) => {{
        assert_eq!(<$l>::REQUEST_SIZE, size_of::<$c::Request>());
        assert_eq!(<$l>::RESPONSE_SIZE, size_of::<$c::Response>());
        assert_eq!(<$l>::ENTRY_SIZE, size_of::<$c::Request>().max(size_of::<$c::Response>()));
        assert_eq!(REQ_OPERATION, offset_of!($c::Request, operation));
        assert_eq!(REQ_BYTE1, offset_of!($c::Request, nr_segments));
        assert_eq!(REQ_BYTE1, offset_of!($c::Discard, flag));
        assert_eq!(REQ_BYTE1, offset_of!($c::Indirect, indirect_op));
        assert_eq!(REQ_HALF2, offset_of!($c::Request, handle));
        assert_eq!(REQ_HALF2, offset_of!($c::Indirect, nr_segments));
        assert_eq!(<$l>::REQ_ID, offset_of!($c::Request, id));
        assert_eq!(<$l>::REQ_ID, offset_of!($c::Discard, id));
        assert_eq!(<$l>::REQ_ID, offset_of!($c::Indirect, id));
        assert_eq!(<$l>::REQ_SECTOR, offset_of!($c::Request, sector_number));
        assert_eq!(<$l>::REQ_SECTOR, offset_of!($c::Discard, sector_number));
        assert_eq!(<$l>::REQ_SECTOR, offset_of!($c::Indirect, sector_number));
        assert_eq!(<$l>::REQ_SEGMENTS, offset_of!($c::Request, seg));
        assert_eq!(<$l>::DISCARD_NR_SECTORS, offset_of!($c::Discard, nr_sectors));
        assert_eq!(<$l>::INDIRECT_HANDLE, offset_of!($c::Indirect, handle));
        assert_eq!(<$l>::INDIRECT_GREFS, offset_of!($c::Indirect, indirect_grefs));
        assert!(size_of::<$c::Discard>() <= <$l>::REQUEST_SIZE);
        assert!(size_of::<$c::Indirect>() <= <$l>::REQUEST_SIZE);
        assert_eq!(RSP_ID, offset_of!($c::Response, id));
        assert_eq!(RSP_OPERATION, offset_of!($c::Response, operation));
        assert_eq!(RSP_STATUS, offset_of!($c::Response, status));
    }};
}

#[test]
fn x86_64_matches_c() {
    check_layout!(X86_64, c64);
    assert_eq!((X86_64::REQUEST_SIZE, X86_64::RESPONSE_SIZE, X86_64::REQ_ID), (112, 16, 8));
}

#[test]
fn x86_32_matches_c() {
    check_layout!(X86_32, c32);
    assert_eq!((X86_32::REQUEST_SIZE, X86_32::RESPONSE_SIZE, X86_32::REQ_ID), (108, 12, 4));
}

#[test]
fn segment_and_header() {
    assert_eq!(SEGMENT_SIZE, size_of::<Segment>());
    assert_eq!(SEG_FIRST_SECT, offset_of!(Segment, first_sect));
    assert_eq!(SEG_LAST_SECT, offset_of!(Segment, last_sect));
    assert_eq!(SRING_HEADER, size_of::<SringHeader>());
    assert_eq!(4096 / SEGMENT_SIZE, transport_xen::blkif::SEGMENTS_PER_INDIRECT_PAGE);
}

#[test]
fn ring_sizes_are_the_power_of_two_rounddown() {
    // __RING_SIZE = rounddown_pow_of_two((pages * 4096 - 64) / entry).
    for (pages, size64, size32) in [(1usize, 32u32, 32u32), (2, 64, 64), (4, 128, 128), (8, 256, 256), (16, 512, 512)] {
        assert_eq!(X86_64::ring_size(pages * 4096), size64, "{pages} pages");
        assert_eq!(X86_32::ring_size(pages * 4096), size32, "{pages} pages");
    }
    assert_eq!(X86_64::ring_size(64 + 112 * 3), 2);
    assert_eq!(X86_64::ring_size(64), 0);
    assert_eq!(X86_64::ring_size(0), 0);
}
