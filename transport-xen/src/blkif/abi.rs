// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The two blkif request/response layouts, as Xen's `public/io/blkif.h` and `ring.h` lay them out.
//!
//! The structures are identical except for the alignment of 64-bit fields: x86_64 aligns `id` to 8 bytes (so it
//! sits at offset 8 and a request is 112 bytes), x86_32 to 4 (offset 4, 108 bytes). Every other field follows
//! `id` at the same distance in both, so one [`BlkifLayout`] trait with per-ABI constants serves all code.
//!
//! ```text
//! blkif_request          x86_64  x86_32      blkif_request_discard  x86_64 x86_32
//!   u8  operation           0       0          u8  operation           0      0
//!   u8  nr_segments         1       1          u8  flag                1      1
//!   u16 handle              2       2          u16 handle              2      2
//!   u64 id                  8       4          u64 id                  8      4
//!   u64 sector_number      16      12          u64 sector_number      16     12
//!   seg[11] (8 bytes each) 24      20          u64 nr_sectors         24     20
//!   sizeof                112     108
//! blkif_request_indirect                     blkif_response
//!   u8  operation           0       0          u64 id                  0      0
//!   u8  indirect_op         1       1          u8  operation           8      8
//!   u16 nr_segments         2       2          i16 status             10     10
//!   u64 id                  8       4          sizeof                 16     12
//!   u64 sector_number      16      12
//!   u16 handle             24      20        blkif_request_segment: u32 gref @0, u8 first_sect @4,
//!   u32 indirect_grefs[8]  28      24          u8 last_sect @5, sizeof 8
//! ```
//! The shared ring starts with a 64-byte header (`req_prod`, `req_event`, `rsp_prod`, `rsp_event`, padding),
//! followed by entries the size of the larger of request and response.

use crate::connect::BlkifAbi;

/// Bytes of the shared ring header before the first entry.
pub const SRING_HEADER: usize = 64;
/// Offset of `req_prod` in the shared ring.
pub const REQ_PROD: usize = 0;
/// Offset of `req_event`.
pub const REQ_EVENT: usize = 4;
/// Offset of `rsp_prod`.
pub const RSP_PROD: usize = 8;
/// Offset of `rsp_event`.
pub const RSP_EVENT: usize = 12;

/// Offset of `operation` in every request variant.
pub const REQ_OPERATION: usize = 0;
/// Offset of `nr_segments` (read/write), `flag` (discard) and `indirect_op` (indirect).
pub const REQ_BYTE1: usize = 1;
/// Offset of `handle` (read/write/discard) and of the 16-bit `nr_segments` of an indirect request.
pub const REQ_HALF2: usize = 2;
/// Size of a `blkif_request_segment`.
pub const SEGMENT_SIZE: usize = 8;
/// Offset of `first_sect` in a segment.
pub const SEG_FIRST_SECT: usize = 4;
/// Offset of `last_sect` in a segment.
pub const SEG_LAST_SECT: usize = 5;

/// Offset of `id` in a response.
pub const RSP_ID: usize = 0;
/// Offset of `operation` in a response.
pub const RSP_OPERATION: usize = 8;
/// Offset of `status` in a response.
pub const RSP_STATUS: usize = 10;

/// Largest request of any ABI (for fixed-size local copies).
pub const MAX_REQUEST_SIZE: usize = 112;
/// Largest response of any ABI.
pub const MAX_RESPONSE_SIZE: usize = 16;

/// One blkif ABI's layout. Implemented by [`X86_64`] and [`X86_32`]; everything else is generic over it.
pub trait BlkifLayout: Copy + Send + Sync + std::fmt::Debug + Default + 'static {
    /// Which ABI this is.
    const ABI: BlkifAbi;
    /// `sizeof(struct blkif_request)`.
    const REQUEST_SIZE: usize;
    /// `sizeof(struct blkif_response)`.
    const RESPONSE_SIZE: usize;
    /// `offsetof(id)`, the same in every request variant.
    const REQ_ID: usize;

    /// `offsetof(sector_number)` (every variant).
    const REQ_SECTOR: usize = Self::REQ_ID + 8;
    /// `offsetof(seg)` of a read/write request.
    const REQ_SEGMENTS: usize = Self::REQ_ID + 16;
    /// `offsetof(nr_sectors)` of a discard request.
    const DISCARD_NR_SECTORS: usize = Self::REQ_ID + 16;
    /// `offsetof(handle)` of an indirect request.
    const INDIRECT_HANDLE: usize = Self::REQ_ID + 16;
    /// `offsetof(indirect_grefs)` of an indirect request.
    const INDIRECT_GREFS: usize = Self::REQ_ID + 20;
    /// Size of one ring entry (the union of request and response).
    const ENTRY_SIZE: usize =
        if Self::REQUEST_SIZE > Self::RESPONSE_SIZE { Self::REQUEST_SIZE } else { Self::RESPONSE_SIZE };

    /// Entries in a shared ring of `bytes` bytes (`__RING_SIZE`): the largest power of two that fits.
    fn ring_size(bytes: usize) -> u32 {
        let fit = bytes.saturating_sub(SRING_HEADER) / Self::ENTRY_SIZE;
        if fit == 0 {
            return 0;
        }
        let pow = 1usize << (usize::BITS - 1 - fit.leading_zeros());
        u32::try_from(pow).unwrap_or(1 << 31)
    }
}

/// The x86_64 layout (`protocol` = `x86_64-abi`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct X86_64;

/// The x86_32 layout (`protocol` = `x86_32-abi`, or no `protocol` node).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct X86_32;

impl BlkifLayout for X86_64 {
    const ABI: BlkifAbi = BlkifAbi::X86_64;
    const REQUEST_SIZE: usize = 112;
    const RESPONSE_SIZE: usize = 16;
    const REQ_ID: usize = 8;
}

impl BlkifLayout for X86_32 {
    const ABI: BlkifAbi = BlkifAbi::X86_32;
    const REQUEST_SIZE: usize = 108;
    const RESPONSE_SIZE: usize = 12;
    const REQ_ID: usize = 4;
}

// Layout sanity at compile time: the segment array ends exactly at the end of the request, the indirect request
// fits, and entries keep 32-bit ring words aligned.
const _: () = {
    assert!(X86_64::REQ_SEGMENTS + 11 * SEGMENT_SIZE == X86_64::REQUEST_SIZE);
    assert!(X86_32::REQ_SEGMENTS + 11 * SEGMENT_SIZE == X86_32::REQUEST_SIZE);
    assert!(X86_64::INDIRECT_GREFS + 8 * 4 <= X86_64::REQUEST_SIZE);
    assert!(X86_32::INDIRECT_GREFS + 8 * 4 <= X86_32::REQUEST_SIZE);
    assert!(X86_64::ENTRY_SIZE % 4 == 0 && X86_32::ENTRY_SIZE % 4 == 0);
    assert!(X86_64::RESPONSE_SIZE % 4 == 0 && X86_32::RESPONSE_SIZE % 4 == 0);
    assert!(X86_64::REQUEST_SIZE <= MAX_REQUEST_SIZE && X86_64::RESPONSE_SIZE <= MAX_RESPONSE_SIZE);
};
