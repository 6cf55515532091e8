// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `device_blk::Request::validate`, the one check of every request against the disk, against an independent model
//! computed in 128-bit arithmetic.
//!
//! Layout: geometry (`u64` capacity in sectors, `u8` logical and `u8` physical block size shifts, `u8` flags:
//! read-only, direct I/O, discard, write-zeroes), request (`u8` kind, `u64` sector, `u64` discard sectors,
//! `u16` segment count, then per segment `u64` address and `u32` length).
//!
//! Invariants: `validate` accepts exactly what the model accepts, with the same byte range; an accepted range
//! lies inside the disk and is aligned to the logical block size; only `Unsupported` maps to the "unsupported"
//! status.

use device_blk::{BlockSize, Geometry, Request, RequestError, RequestKind, Sector, Segment, Status, MAX_SEGMENTS};
use vm_memory::GuestAddress;

use crate::input::{Reader, Writer};

/// A block size from a fuzzed shift (512 << shift % 8).
pub fn block_size(shift: u8) -> BlockSize {
    BlockSize::new(512u32 << (shift % 8)).unwrap_or(BlockSize::SECTOR)
}

/// Decode a geometry (11 bytes).
pub fn geometry(r: &mut Reader<'_>) -> Geometry {
    let capacity = Sector(r.u64());
    let logical_block_size = block_size(r.u8());
    let physical_block_size = block_size(r.u8()).max(logical_block_size);
    let flags = r.u8();
    Geometry {
        capacity,
        logical_block_size,
        physical_block_size,
        read_only: flags & 1 != 0,
        direct_io: flags & 2 != 0,
        discard: flags & 4 != 0,
        write_zeroes: flags & 8 != 0,
        discard_granularity: 4096,
    }
}

/// A request kind from a fuzzed byte.
pub fn kind(b: u8) -> RequestKind {
    match b % 6 {
        0 => RequestKind::Read,
        1 => RequestKind::Write,
        2 => RequestKind::Flush,
        3 => RequestKind::Discard { secure: b & 0x80 != 0 },
        4 => RequestKind::WriteZeroes { unmap: b & 0x80 != 0 },
        _ => RequestKind::GetId,
    }
}

/// The independent model: the byte range a valid request touches, or `None`.
fn model(req: &Request, g: &Geometry) -> Option<(u64, u64)> {
    let lbs = u128::from(g.logical_block_size.bytes());
    if req.segments.len() > MAX_SEGMENTS || (g.read_only && req.kind.modifies_disk()) {
        return None;
    }
    let sectors: u128 = match req.kind {
        RequestKind::Flush => return Some((0, 0)),
        RequestKind::GetId => return (!req.segments.is_empty()).then_some((0, 0)),
        RequestKind::Discard { .. } | RequestKind::WriteZeroes { .. } => {
            let supported = if matches!(req.kind, RequestKind::Discard { .. }) { g.discard } else { g.write_zeroes };
            // No limit but the disk's: the engines split a large range (blkif advertises no maximum).
            if !supported || req.discard_sectors == 0 {
                return None;
            }
            u128::from(req.discard_sectors)
        }
        RequestKind::Read | RequestKind::Write => {
            if req.segments.is_empty() {
                return None;
            }
            let mut bytes = 0u128;
            for s in &req.segments {
                let len = u128::from(s.len);
                if len == 0 || len % 512 != 0 || (g.direct_io && len % lbs != 0) {
                    return None;
                }
                bytes += len;
            }
            bytes / 512
        }
    };
    let start = u128::from(req.sector.0);
    let end = start + sectors;
    if end > u128::from(u64::MAX) || end * 512 > u128::from(u64::MAX) || end > u128::from(g.capacity.0) {
        return None;
    }
    let (offset, len) = (start * 512, sectors * 512);
    if offset % lbs != 0 || len % lbs != 0 {
        return None;
    }
    Some((u64::try_from(offset).ok()?, u64::try_from(len).ok()?))
}

/// Decode a request: `u8` kind, `u64` sector, `u64` discard sectors, `u16` count, segments.
pub fn request(r: &mut Reader<'_>) -> Request {
    let mut req = Request::new(kind(r.u8()));
    req.sector = Sector(r.u64());
    req.discard_sectors = r.u64();
    let count = usize::from(r.u16()) % (MAX_SEGMENTS + 8);
    for _ in 0..count {
        req.segments.push(Segment { addr: GuestAddress(r.u64()), len: r.u32() });
    }
    req
}

/// Run one input.
pub fn run(data: &[u8]) {
    let mut r = Reader::new(data);
    let g = geometry(&mut r);
    let req = request(&mut r);
    let got = req.validate(&g);
    let want = model(&req, &g);
    assert_eq!(got.as_ref().ok().map(|d| (d.offset, d.len)), want, "validate {req:?} on {g:?}: {got:?}");
    match got {
        Ok(range) => {
            assert!(range.offset.checked_add(range.len).is_some_and(|end| end <= g.size_bytes()));
            assert!(g.logical_block_size.divides(range.offset) && g.logical_block_size.divides(range.len));
            if matches!(req.kind, RequestKind::Read | RequestKind::Write) {
                assert_eq!(range.len, req.data_len());
            }
        }
        Err(e) => assert_eq!(e.status() == Status::Unsupported, e == RequestError::Unsupported),
    }
}

/// Encode a geometry as [`geometry`] decodes it.
pub fn write_geometry(w: &mut Writer, capacity: u64, lbs_shift: u8, flags: u8) {
    w.u64(capacity).u8(lbs_shift).u8(lbs_shift).u8(flags);
}

/// Encode a request as [`request`] decodes it.
pub fn write_request(w: &mut Writer, kind: u8, sector: u64, discard: u64, segs: &[(u64, u32)]) {
    w.u8(kind).u64(sector).u64(discard).u16(segs.len() as u16);
    for &(addr, len) in segs {
        w.u64(addr).u32(len);
    }
}

/// Seed inputs.
pub fn seeds() -> Vec<Vec<u8>> {
    let one = |cap: u64, shift: u8, flags: u8, kind: u8, sector: u64, discard: u64, segs: &[(u64, u32)]| {
        let mut w = Writer::new();
        write_geometry(&mut w, cap, shift, flags);
        write_request(&mut w, kind, sector, discard, segs);
        w.finish()
    };
    vec![
        one(2048, 0, 0b1100, 0, 8, 0, &[(0x1000, 4096), (0x3000, 512)]),
        one(2048, 3, 0b0010, 1, 2040, 0, &[(0, 4096)]),
        one(2048, 0, 0b0001, 1, 0, 0, &[(0, 512)]),
        one(2048, 0, 0b1100, 3, 1024, 1024, &[]),
        one(2048, 0, 0b1100, 4 | 0x80, 2047, 2, &[]),
        one(u64::MAX, 0, 0, 0, u64::MAX / 512, 0, &[(0, 512)]),
        one(16, 0, 0, 2, 0, 0, &[]),
        one(16, 0, 0, 5, 0, 0, &[(0, 20)]),
    ]
}
