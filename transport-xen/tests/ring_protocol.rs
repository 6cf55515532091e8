// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The shared-ring protocol between `BackRing` and `FrontRing` over plain page-aligned memory: request and
//! response flow, the event-index notification rules of ring.h, producer-overflow detection, bounds.

use std::alloc::{alloc_zeroed, dealloc, Layout};

use transport_xen::blkif::abi::SRING_HEADER;
use transport_xen::blkif::{
    encode, BackRing, BlkifLayout, BlkifRequest, BlkifResponse, BlkifSegment, FrontRing, RawRequest, RingError,
    OP_READ, RSP_OKAY, X86_32, X86_64,
};

struct Pages {
    ptr: *mut u8,
    layout: Layout,
}

impl Pages {
    fn new(pages: usize) -> Pages {
        let layout = Layout::from_size_align(pages * 4096, 4096).expect("layout");
        // SAFETY: non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        assert!(!ptr.is_null());
        Pages { ptr, layout }
    }
    fn len(&self) -> usize {
        self.layout.size()
    }
}

impl Drop for Pages {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout; the rings using it are dropped first.
        unsafe { dealloc(self.ptr, self.layout) };
    }
}

fn rings<L: BlkifLayout>(mem: &Pages) -> (FrontRing<L>, BackRing<L>) {
    // SAFETY: `mem` outlives both rings in every test (declared first, dropped last).
    unsafe { (FrontRing::init(mem.ptr, mem.len()).expect("front"), BackRing::new(mem.ptr, mem.len()).expect("back")) }
}

fn read_req<L: BlkifLayout>(id: u64) -> RawRequest {
    encode::rw::<L>(
        OP_READ,
        id,
        id * 8,
        &[BlkifSegment { gref: 100 + u32::try_from(id % 1000).expect("small"), first_sect: 0, last_sect: 7 }],
    )
}

fn flow<L: BlkifLayout>() {
    let mem = Pages::new(1);
    let (mut front, mut back) = rings::<L>(&mem);
    assert_eq!((front.size(), back.size()), (32, 32));
    for id in 1..=5 {
        assert!(front.put_request(&read_req::<L>(id)));
    }
    assert!(front.push_requests(), "req_event starts at 1: the first requests notify");
    assert_eq!(back.unconsumed(), Ok(5));
    let mut raw = RawRequest::default();
    let mut req = BlkifRequest::default();
    for id in 1..=5 {
        assert!(back.next_request(&mut raw));
        req.decode::<L>(&raw, 0).expect("valid");
        assert_eq!((req.id, req.sector, req.segments[0].gref), (id, id * 8, 100 + u32::try_from(id).expect("small")));
    }
    assert!(!back.next_request(&mut raw), "nothing more to copy");
    assert_eq!(back.outstanding(), 5);
    for id in 1..=5 {
        assert!(back.put_response(&BlkifResponse { id, operation: OP_READ, status: RSP_OKAY }));
    }
    assert!(!back.put_response(&BlkifResponse { id: 9, operation: OP_READ, status: RSP_OKAY }), "no request left");
    assert!(back.push_responses(), "rsp_event starts at 1");
    let got: Vec<u64> = std::iter::from_fn(|| front.take_response()).map(|r| r.id).collect();
    assert_eq!(got, vec![1, 2, 3, 4, 5]);

    // The frontend did not re-arm rsp_event: more responses are published without an event.
    assert!(front.put_request(&read_req::<L>(6)));
    front.push_requests();
    assert_eq!(back.unconsumed(), Ok(1));
    assert!(back.next_request(&mut raw));
    assert!(back.put_response(&BlkifResponse { id: 6, operation: OP_READ, status: RSP_OKAY }));
    assert!(!back.push_responses(), "no event asked for");
    assert!(front.final_check_for_responses(), "the final check sees the published response");
    assert_eq!(front.take_response().map(|r| r.id), Some(6));
    assert!(!front.final_check_for_responses(), "re-armed: rsp_event = rsp_cons + 1");
    assert!(front.put_request(&read_req::<L>(7)));
    front.push_requests();
    assert_eq!(back.unconsumed(), Ok(1));
    assert!(back.next_request(&mut raw));
    assert!(back.put_response(&BlkifResponse { id: 7, operation: OP_READ, status: RSP_OKAY }));
    assert!(back.push_responses(), "the re-armed frontend gets its event");
}

#[test]
fn request_response_flow_and_response_events() {
    flow::<X86_64>();
    flow::<X86_32>();
}

#[test]
fn request_events_follow_the_backends_final_check() {
    let mem = Pages::new(1);
    let (mut front, mut back) = rings::<X86_64>(&mem);
    let mut raw = RawRequest::default();
    assert!(front.put_request(&read_req::<X86_64>(1)));
    assert!(front.push_requests());
    assert_eq!(back.unconsumed(), Ok(1));
    assert!(back.next_request(&mut raw));
    // Without the backend re-arming, further requests do not notify.
    assert!(front.put_request(&read_req::<X86_64>(2)));
    assert!(!front.push_requests(), "req_event still 1");
    assert_eq!(back.final_check_for_requests(), Ok(1), "the final check finds the new request");
    assert!(back.next_request(&mut raw));
    assert_eq!(back.final_check_for_requests(), Ok(0));
    assert!(front.put_request(&read_req::<X86_64>(3)));
    assert!(front.push_requests(), "re-armed: req_event = req_cons + 1");
}

#[test]
fn producer_overflow_halts_and_consumption_is_bounded() {
    let mem = Pages::new(1);
    let (mut front, mut back) = rings::<X86_32>(&mem);
    let size = back.size();
    front.set_req_prod_raw(size);
    assert_eq!(back.unconsumed(), Ok(size), "exactly a ring's worth is legal");
    front.set_req_prod_raw(size + 1);
    assert!(matches!(back.unconsumed(), Err(RingError::ProducerOverflow { ahead, .. }) if ahead == size + 1));
    front.set_req_prod_raw(u32::MAX);
    assert!(matches!(back.unconsumed(), Err(RingError::ProducerOverflow { .. })), "a producer behind us");
    // Consumed-but-unanswered requests bound what may be consumed.
    front.set_req_prod_raw(size);
    assert_eq!(back.unconsumed(), Ok(size));
    let mut raw = RawRequest::default();
    for _ in 0..size {
        assert!(back.next_request(&mut raw));
    }
    front.set_req_prod_raw(size + size / 2);
    assert!(back.unconsumed().is_err(), "{} ahead of rsp_prod 0", size + size / 2);
    for id in 0..u64::from(size / 2) {
        assert!(back.put_response(&BlkifResponse { id, operation: 0, status: 0 }));
    }
    assert_eq!(back.unconsumed(), Ok(size / 2), "half answered: half a ring more may come");
}

#[test]
fn many_laps_keep_indexes_masked() {
    let mem = Pages::new(2);
    let (mut front, mut back) = rings::<X86_32>(&mem);
    let mut raw = RawRequest::default();
    let mut req = BlkifRequest::default();
    for id in 1..=(10 * u64::from(front.size())) {
        assert!(front.put_request(&read_req::<X86_32>(id)));
        front.push_requests();
        assert_eq!(back.unconsumed(), Ok(1));
        assert!(back.next_request(&mut raw));
        req.decode::<X86_32>(&raw, 0).expect("valid");
        assert_eq!(req.id, id);
        assert!(back.put_response(&BlkifResponse { id, operation: OP_READ, status: RSP_OKAY }));
        back.push_responses();
        assert_eq!(front.take_response().map(|r| r.id), Some(id));
    }
}

#[test]
fn responses_carry_no_stale_bytes() {
    let mem = Pages::new(1);
    let (mut front, mut back) = rings::<X86_64>(&mem);
    // The slot still holds the request (id = all ones overlaps the response's padding).
    let mut raw = encode::rw::<X86_64>(OP_READ, u64::MAX, 0, &[]);
    raw.bytes[9..16].fill(0xff);
    assert!(front.put_request(&raw));
    front.push_requests();
    assert_eq!(back.unconsumed(), Ok(1));
    let mut copy = RawRequest::default();
    assert!(back.next_request(&mut copy));
    assert!(back.put_response(&BlkifResponse { id: 0x0102, operation: 3, status: -2 }));
    back.push_responses();
    let b = front.response_bytes(0);
    assert_eq!(&b[..16], &[2, 1, 0, 0, 0, 0, 0, 0, 3, 0, 0xfe, 0xff, 0, 0, 0, 0]);
    // SAFETY: reading the header we own.
    let header = unsafe { std::slice::from_raw_parts(mem.ptr, SRING_HEADER) };
    assert_eq!(&header[8..12], &1u32.to_le_bytes(), "rsp_prod published");
}

#[test]
fn bad_areas_are_refused() {
    let mem = Pages::new(1);
    // SAFETY: sizes within the allocation.
    unsafe {
        assert!(BackRing::<X86_64>::new(mem.ptr, 100).is_err(), "too small for one entry");
        assert!(BackRing::<X86_64>::new(mem.ptr.add(4), 2048).is_err(), "misaligned");
        assert!(BackRing::<X86_64>::new(std::ptr::null_mut(), 4096).is_err());
    }
}
