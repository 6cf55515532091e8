// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The model of `blkif_dataplane`: the status each request must be answered with, from its decoding, its grants
//! and the disk geometry (independent of the data plane's code beyond the blkif decoder it shares with blkfront's
//! encoding).

use device_blk::Status;
use transport_xen::blkif::{BlkifLayout, BlkifOp, RawRequest, RSP_EOPNOTSUPP, RSP_ERROR, RSP_OKAY};
use transport_xen::connect::MAX_INDIRECT_SEGMENTS;
use transport_xen::grant_memory::segment_address;
use transport_xen::services::XEN_PAGE_SIZE;

use super::{page_of, Fixture, Plan, Scratch};

/// The operation a response must echo (the decoder's choice: for indirect requests, the indirect operation)
/// and the status the model expects (`None`: either outcome is right).
/// (`s`: the input's indirect pages, and scratch for the model.)
pub(super) fn expected<L: BlkifLayout>(
    f: &Fixture,
    plan: &Plan,
    raw: &RawRequest,
    geometry: &device_blk::Geometry,
    s: &mut Scratch,
) -> (u8, Option<i16>) {
    let max_indirect = if plan.flags & 0x20 != 0 { MAX_INDIRECT_SEGMENTS as usize } else { 0 };
    let status = status::<L>(f, plan, raw, geometry, max_indirect, s);
    (s.req.operation, status)
}

/// (Every field of `s.req` the model reads is set by `decode`, and `s.dev` by `reset`: nothing of the request
/// before leaks in.)
fn status<L: BlkifLayout>(
    f: &Fixture,
    plan: &Plan,
    raw: &RawRequest,
    geometry: &device_blk::Geometry,
    max_indirect: usize,
    s: &mut Scratch,
) -> Option<i16> {
    let persistent = plan.flags & 0x08 != 0;
    let req = &mut s.req;
    if let Err(fault) = req.decode::<L>(raw, max_indirect) {
        return Some(fault.status());
    }
    if let Some(ind) = req.indirect {
        let copy = &mut s.copy;
        copy.clear();
        for &g in &ind.grefs[..ind.pages] {
            if g == f.ind[0].1 || g == f.ind[1].1 {
                let k = usize::from(g != f.ind[0].1);
                copy.extend_from_slice(&s.indirect[k * XEN_PAGE_SIZE..(k + 1) * XEN_PAGE_SIZE]);
            } else if g == f.ro[0].1 || g == f.ro[1].1 {
                copy.extend_from_slice(&f.ro_pattern);
            } else if super::slot_of(f, g).is_some() {
                // A ring slot's page as descriptor page: the segments are whatever that ring holds when the
                // backend reads it (requests and responses, or what reads put there), and may name the ring in
                // use; counted as harming it.
                s.harms_ring = true;
                return None;
            } else {
                return Some(RSP_ERROR);
            }
        }
        if req.set_indirect_segments(copy).is_err() {
            return Some(RSP_ERROR);
        }
    }
    if req.op == (BlkifOp::Discard { secure: true }) && plan.flags & 0x40 == 0 {
        return Some(RSP_EOPNOTSUPP);
    }
    let has_data = !req.segments.is_empty();
    let kind = match req.op {
        BlkifOp::Read => device_blk::RequestKind::Read,
        BlkifOp::Discard { secure } => device_blk::RequestKind::Discard { secure },
        _ => device_blk::RequestKind::Write,
    };
    let dev = &mut s.dev;
    dev.reset(kind, device_blk::Sector(req.sector));
    dev.discard_sectors = req.nr_sectors;
    dev.segments.extend(req.segments.iter().enumerate().map(|(i, s)| segment_address(i, s)));
    let data_phase = has_data || matches!(req.op, BlkifOp::Read | BlkifOp::Write | BlkifOp::Discard { .. });
    if data_phase {
        if let Err(e) = dev.validate(geometry) {
            return Some(match e.status() {
                Status::Ok => RSP_OKAY,
                Status::IoError => RSP_ERROR,
                Status::Unsupported => RSP_EOPNOTSUPP,
            });
        }
    }
    let to_guest = req.op == BlkifOp::Read;
    // A read into a page of the ring in use rewrites the guest's own ring while the backend serves it; a read into
    // another slot's page may rewrite the ring of the lane there.
    if to_guest {
        let ring_pages = 1 << plan.ring;
        for seg in &req.segments {
            match super::slot_of(f, seg.gref) {
                Some((k, i)) if k == plan.slot && i < ring_pages => s.harms_ring = true,
                Some((k, _)) if k != plan.slot => s.written_slots |= 1 << k,
                _ => {}
            }
        }
    }
    let mut unsure = false;
    for s in &req.segments {
        match page_of(f, s.gref) {
            None => return Some(RSP_ERROR),
            Some((_, false)) if to_guest => return Some(RSP_ERROR),
            // Persistent grants are mapped writable while the cache has room.
            Some((_, false)) if persistent && plan.flags & 0x10 == 0 => unsure = true,
            Some(_) => {}
        }
    }
    if unsure {
        None
    } else {
        Some(RSP_OKAY)
    }
}
