// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The backend's side of the blkif shared ring (`transport_xen::blkif::BackRing`), both ABIs, on 1, 2 or 4 pages
//! whose every byte the fuzzed frontend controls, driven by a fuzzed script of frontend writes and backend calls
//! and checked against a model of ring.h.
//!
//! Layout: `u8` flags (bit 0: x86_32; bits 1-2: 1 << n pages), `u16` length for a second, possibly too small,
//! attach; then ops until the input ends (at most [`MAX_OPS`]): `u8` op, then by `op % 8`: 0 `u32` req_prod;
//! 1 `u8` req_prod increment; 2 `u16` offset and `u8`-length bytes written by the frontend; 3 `unconsumed`;
//! 4 `u8` count of `next_request`; 5 `put_response` with `u64` id, `u8` operation, `u16` status;
//! 6 `push_responses`; 7 `final_check_for_requests`.
//!
//! Invariants: the ring size is the largest power of two that fits; a producer more than a ring ahead of the
//! responses is reported (`ProducerOverflow`) and never consumed; consumed-but-unanswered requests never exceed
//! the ring; each request is copied from exactly its slot; the backend writes only the response slot it fills,
//! `rsp_prod` when it publishes and `req_event` when it re-arms, nothing else; the notify decisions are ring.h's.

use std::alloc::{alloc_zeroed, dealloc, Layout};

use transport_xen::blkif::abi::{REQ_EVENT, REQ_PROD, RSP_EVENT, RSP_PROD, SRING_HEADER};
use transport_xen::blkif::{BackRing, BlkifLayout, BlkifResponse, RawRequest, RingError, X86_32, X86_64};
use transport_xen::services::XEN_PAGE_SIZE;

use crate::input::{Reader, Writer};

/// Most operations one input runs.
pub const MAX_OPS: usize = 256;

/// Page-aligned zeroed memory standing for the granted ring pages.
struct Pages {
    ptr: *mut u8,
    layout: Layout,
}

impl Pages {
    fn new(bytes: usize) -> Pages {
        let layout = Layout::from_size_align(bytes, XEN_PAGE_SIZE).expect("layout");
        // SAFETY: a non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "out of memory");
        Pages { ptr, layout }
    }
    fn bytes(&self) -> &[u8] {
        // SAFETY: `layout.size()` initialised bytes, alive while `self` is.
        unsafe { std::slice::from_raw_parts(self.ptr, self.layout.size()) }
    }
    fn write(&self, off: usize, data: &[u8]) {
        let n = data.len().min(self.layout.size().saturating_sub(off));
        // SAFETY: `off + n` is within the allocation.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(off), n) };
    }
    fn u32_at(&self, off: usize) -> u32 {
        let b = self.bytes();
        u32::from_ne_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
    }
}

impl Drop for Pages {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.ptr, self.layout) };
    }
}

fn run_abi<L: BlkifLayout>(pages: usize, small: usize, r: &mut Reader<'_>) {
    let bytes = pages * XEN_PAGE_SIZE;
    let mem = Pages::new(bytes);

    // Attaching to too small an area fails; any area gets the largest power of two of entries that fits.
    let small = small % (bytes + 1);
    let fit = L::ring_size(small);
    // SAFETY: `small <= bytes` bytes of the allocation.
    match unsafe { BackRing::<L>::new(mem.ptr, small) } {
        Ok(ring) => {
            assert!(fit > 0 && fit.is_power_of_two() && ring.size() == fit);
            assert!(SRING_HEADER + fit as usize * L::ENTRY_SIZE <= small);
            assert!(SRING_HEADER + 2 * fit as usize * L::ENTRY_SIZE > small, "a larger ring would fit");
        }
        Err(e) => assert!(fit == 0 && matches!(e, RingError::BadArea { .. })),
    }

    // SAFETY: the allocation holds `bytes` bytes and outlives the ring.
    let mut ring = unsafe { BackRing::<L>::new(mem.ptr, bytes) }.expect("a page holds a ring");
    let size = ring.size();
    let mask = size - 1;
    let (mut req_cons, mut rsp_pvt, mut rsp_published, mut avail) = (0u32, 0u32, 0u32, 0u32);
    let mut shadow = mem.bytes().to_vec();
    let entry = |idx: u32| SRING_HEADER + (idx & mask) as usize * L::ENTRY_SIZE;
    let mut raw = RawRequest::default();

    for _ in 0..MAX_OPS {
        if r.is_empty() {
            break;
        }
        let unconsumed_model = |mem: &Pages, req_cons: u32, rsp_pvt: u32| {
            let req_prod = mem.u32_at(REQ_PROD);
            let ahead = req_prod.wrapping_sub(rsp_pvt);
            if ahead > size {
                Err(RingError::ProducerOverflow { req_prod, rsp_prod: rsp_pvt, ahead, size })
            } else {
                Ok(req_prod.wrapping_sub(req_cons).min(size - req_cons.wrapping_sub(rsp_pvt)))
            }
        };
        let op = r.u8() % 8;
        match op {
            0 => shadow[REQ_PROD..REQ_PROD + 4].copy_from_slice(&r.u32().to_ne_bytes()),
            1 => {
                let v = mem.u32_at(REQ_PROD).wrapping_add(u32::from(r.u8()));
                shadow[REQ_PROD..REQ_PROD + 4].copy_from_slice(&v.to_ne_bytes());
            }
            2 => {
                let off = usize::from(r.u16()) % bytes;
                let data = r.short_bytes();
                let n = data.len().min(bytes - off);
                shadow[off..off + n].copy_from_slice(&data[..n]);
            }
            3 => {
                let want = unconsumed_model(&mem, req_cons, rsp_pvt);
                assert_eq!(ring.unconsumed(), want);
                if let Ok(n) = want {
                    avail = n;
                }
            }
            4 => {
                for _ in 0..r.u8() {
                    let got = ring.next_request(&mut raw);
                    assert_eq!(got, avail > 0, "next_request with {avail} available");
                    if !got {
                        break;
                    }
                    let e = entry(req_cons);
                    assert_eq!(&raw.bytes[..L::REQUEST_SIZE], &shadow[e..e + L::REQUEST_SIZE], "request copy");
                    assert!(raw.bytes[L::REQUEST_SIZE..].iter().all(|&b| b == 0));
                    req_cons = req_cons.wrapping_add(1);
                    avail -= 1;
                }
            }
            5 => {
                let rsp = BlkifResponse { id: r.u64(), operation: r.u8(), status: r.u16() as i16 };
                let outstanding = req_cons.wrapping_sub(rsp_pvt);
                assert_eq!(ring.put_response(&rsp), outstanding > 0);
                if outstanding > 0 {
                    let e = entry(rsp_pvt);
                    shadow[e..e + L::RESPONSE_SIZE].copy_from_slice(&rsp.encode::<L>()[..L::RESPONSE_SIZE]);
                    rsp_pvt = rsp_pvt.wrapping_add(1);
                    // Each response is published as it is written (`rsp_prod`), the event decided at the push.
                    shadow[RSP_PROD..RSP_PROD + 4].copy_from_slice(&rsp_pvt.to_ne_bytes());
                }
            }
            6 => {
                let (old, new) = (rsp_published, rsp_pvt);
                let want = if old == new {
                    false
                } else {
                    rsp_published = new;
                    new.wrapping_sub(mem.u32_at(RSP_EVENT)) < new.wrapping_sub(old)
                };
                assert_eq!(ring.push_responses(), want, "notify decision");
            }
            _ => {
                let first = unconsumed_model(&mem, req_cons, rsp_pvt);
                let want = match first {
                    Ok(0) => {
                        shadow[REQ_EVENT..REQ_EVENT + 4].copy_from_slice(&req_cons.wrapping_add(1).to_ne_bytes());
                        // Nothing else writes the ring in between: the second look sees the same producer.
                        first
                    }
                    other => other,
                };
                assert_eq!(ring.final_check_for_requests(), want);
                if let Ok(n) = want {
                    avail = n;
                }
            }
        }
        if op < 3 {
            // The frontend's write.
            mem.write(0, &shadow);
        } else {
            assert_eq!(mem.bytes(), &shadow[..], "the backend wrote other bytes than its slots and indexes");
        }
        assert_eq!((ring.req_cons(), ring.rsp_prod_pvt()), (req_cons, rsp_pvt));
        assert!(ring.outstanding() <= size, "more requests in flight than the ring holds");
    }
}

/// Run one input.
pub fn run(data: &[u8]) {
    let mut r = Reader::new(data);
    let flags = r.u8();
    let pages = 1usize << ((flags >> 1) % 3);
    let small = usize::from(r.u16());
    if flags & 1 == 0 {
        run_abi::<X86_64>(pages, small, &mut r);
    } else {
        run_abi::<X86_32>(pages, small, &mut r);
    }
}

/// Seed inputs.
pub fn seeds() -> Vec<Vec<u8>> {
    use transport_xen::blkif::{encode, BlkifSegment, OP_READ};
    let req = encode::rw::<X86_64>(OP_READ, 42, 8, &[BlkifSegment { gref: 9, first_sect: 0, last_sect: 7 }]);
    let mut out = Vec::new();
    for flags in [0u8, 1, 2, 5] {
        let mut w = Writer::new();
        w.u8(flags).u16(0x1000);
        // Two requests published, consumed, answered, pushed; then a final check re-arms.
        w.u8(2).u16(64).short_bytes(&req.bytes);
        w.u8(2).u16(64 + 112).short_bytes(&req.bytes);
        w.u8(1).u8(2).u8(3).u8(4).u8(2);
        w.u8(5).u64(42).u8(OP_READ).u16(0);
        w.u8(5).u64(43).u8(OP_READ).u16(0xffff);
        w.u8(6).u8(7);
        // Then a producer far ahead: overflow.
        w.u8(0).u32(1000).u8(3).u8(4).u8(1).u8(7);
        out.push(w.finish());
    }
    let mut w = Writer::new();
    w.u8(0).u16(100);
    w.u8(0).u32(u32::MAX).u8(3).u8(1).u8(40).u8(3).u8(4).u8(255).u8(5).u64(1).u8(0).u16(0).u8(6);
    out.push(w.finish());
    out
}
