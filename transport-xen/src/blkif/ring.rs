// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The shared ring, as Xen's `public/io/ring.h` defines it, from the backend's side ([`BackRing`]) and, for test
//! frontends and the blkfront emulator, from the frontend's side ([`FrontRing`]).
//!
//! The ring memory is shared with an untrusted peer. Indexes are read and written as 32-bit atomics, entries are
//! copied with volatile 32-bit accesses, and every index is masked before it addresses an entry, so nothing the
//! peer writes can make us read or write outside the ring. Memory ordering follows ring.h:
//! - consumer: read the producer index, then a read barrier (`xen_rmb`), then the entries;
//! - producer: write the entries, a write barrier (`xen_wmb`), then the producer index, then a full barrier
//!   (`xen_mb`) before reading the peer's event index to decide whether to notify;
//! - before sleeping: set our event index, full barrier, look once more (`RING_FINAL_CHECK_FOR_*`).

use std::marker::PhantomData;
use std::sync::atomic::{fence, AtomicU32, Ordering};

use super::abi::{
    BlkifLayout, MAX_REQUEST_SIZE, MAX_RESPONSE_SIZE, REQ_EVENT, REQ_PROD, RSP_EVENT, RSP_PROD, SRING_HEADER,
};
use super::request::{BlkifResponse, RawRequest, RSP_ERROR};

/// Why a ring cannot be served.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RingError {
    /// The mapped area is too small for a single entry, or misaligned.
    #[error("a ring of {bytes} bytes at {addr:#x} cannot hold an entry")]
    BadArea {
        /// Bytes mapped.
        bytes: usize,
        /// Address.
        addr: usize,
    },
    /// The frontend published more requests than the ring holds (`RING_REQUEST_PROD_OVERFLOW`).
    #[error(
        "frontend provided bogus ring requests: req_prod {req_prod} is {ahead} entries past rsp_prod {rsp_prod} \
         on a ring of {size}; ring halted"
    )]
    ProducerOverflow {
        /// The frontend's `req_prod`.
        req_prod: u32,
        /// Our private response producer.
        rsp_prod: u32,
        /// `req_prod - rsp_prod`.
        ahead: u32,
        /// Ring size.
        size: u32,
    },
}

/// The mapped shared ring: header and entries, addressed only through masked indexes.
#[derive(Debug)]
struct Shared<L> {
    base: *mut u8,
    size: u32,
    _layout: PhantomData<L>,
}

impl<L: BlkifLayout> Shared<L> {
    /// # Safety
    /// `base` must be valid for reads and writes of `bytes` bytes for the life of the value.
    unsafe fn new(base: *mut u8, bytes: usize) -> Result<Self, RingError> {
        let size = L::ring_size(bytes);
        if base.is_null() || (base as usize) % 64 != 0 || size == 0 {
            return Err(RingError::BadArea { bytes, addr: base as usize });
        }
        Ok(Shared { base, size, _layout: PhantomData })
    }

    fn index(&self, offset: usize) -> &AtomicU32 {
        // SAFETY: the four ring words lie within the first 16 bytes of the (64-byte aligned) area, valid for the
        // life of `self`; the peer accesses them concurrently, which is what atomics are for.
        unsafe { AtomicU32::from_ptr(self.base.add(offset).cast()) }
    }

    fn entry(&self, idx: u32) -> *mut u8 {
        let slot = (idx & (self.size - 1)) as usize;
        // SAFETY: slot < size, and SRING_HEADER + size * ENTRY_SIZE <= bytes by the ring-size computation.
        unsafe { self.base.add(SRING_HEADER + slot * L::ENTRY_SIZE) }
    }

    /// Copy `len` bytes (a multiple of 4) out of the entry for `idx` with volatile 32-bit reads.
    fn read_entry(&self, idx: u32, out: &mut [u8], len: usize) {
        let src = self.entry(idx).cast::<u32>();
        for (i, chunk) in out[..len].chunks_exact_mut(4).enumerate() {
            // SAFETY: `i * 4 < len <= ENTRY_SIZE`, inside the entry; entries are 4-byte aligned.
            let word = unsafe { src.add(i).read_volatile() };
            chunk.copy_from_slice(&word.to_ne_bytes());
        }
    }

    /// Write `len` bytes (a multiple of 4) into the entry for `idx` with volatile 32-bit writes.
    fn write_entry(&self, idx: u32, bytes: &[u8], len: usize) {
        let dst = self.entry(idx).cast::<u32>();
        for (i, chunk) in bytes[..len].chunks_exact(4).enumerate() {
            let word = u32::from_ne_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            // SAFETY: as in `read_entry`.
            unsafe { dst.add(i).write_volatile(word) };
        }
    }
}

/// The backend's side of one shared ring (`BACK_RING`): consumes requests, produces responses.
#[derive(Debug)]
pub struct BackRing<L> {
    ring: Shared<L>,
    req_cons: u32,
    rsp_prod_pvt: u32,
    /// `rsp_prod` when the frontend was last considered for an event (never re-read from the shared page).
    rsp_published: u32,
    /// Requests known to be available (`req_prod` as read, bounded).
    req_avail: u32,
}

// SAFETY: the ring area is shared memory the owner keeps mapped; the raw pointer is only its address, used by one
// thread at a time through `&mut self`.
unsafe impl<L> Send for BackRing<L> {}

impl<L: BlkifLayout> BackRing<L> {
    /// Attach to a ring the frontend initialised, starting at index 0 (`BACK_RING_INIT`).
    ///
    /// # Safety
    /// `base` must be valid for reads and writes of `bytes` bytes (the mapped ring pages) for the life of the
    /// value. The contents may change at any time (they belong to the peer).
    pub unsafe fn new(base: *mut u8, bytes: usize) -> Result<Self, RingError> {
        // SAFETY: forwarded contract.
        let ring = unsafe { Shared::new(base, bytes) }?;
        Ok(BackRing { ring, req_cons: 0, rsp_prod_pvt: 0, rsp_published: 0, req_avail: 0 })
    }

    /// Attach to a ring that another backend served and left (it died): resume after the last response it
    /// published (`rsp_prod` as the shared page says), so every request from there to `req_prod` counts as
    /// unanswered. The page belongs to the peer: a bogus `rsp_prod` only makes [`unconsumed`](Self::unconsumed)
    /// report an overflow or fewer requests, never an access outside the ring.
    ///
    /// # Safety
    /// As for [`new`](Self::new).
    pub unsafe fn resume(base: *mut u8, bytes: usize) -> Result<Self, RingError> {
        // SAFETY: forwarded contract.
        let ring = unsafe { Shared::new(base, bytes) }?;
        let rsp_prod = ring.index(RSP_PROD).load(Ordering::Relaxed);
        fence(Ordering::Acquire);
        Ok(BackRing { ring, req_cons: rsp_prod, rsp_prod_pvt: rsp_prod, rsp_published: rsp_prod, req_avail: 0 })
    }

    /// Entries in the ring.
    pub fn size(&self) -> u32 {
        self.ring.size
    }

    /// Our request consumer index.
    pub fn req_cons(&self) -> u32 {
        self.req_cons
    }

    /// Our private response producer index.
    pub fn rsp_prod_pvt(&self) -> u32 {
        self.rsp_prod_pvt
    }

    /// Requests consumed and not yet answered.
    pub fn outstanding(&self) -> u32 {
        self.req_cons.wrapping_sub(self.rsp_prod_pvt)
    }

    /// Read `req_prod` and return how many requests may be consumed now (`RING_HAS_UNCONSUMED_REQUESTS`, bounded
    /// so that consumed-but-unanswered requests never exceed the ring). A producer more than a ring ahead of our
    /// responses is `RING_REQUEST_PROD_OVERFLOW`: the ring must be halted.
    pub fn unconsumed(&mut self) -> Result<u32, RingError> {
        let req_prod = self.ring.index(REQ_PROD).load(Ordering::Relaxed);
        // xen_rmb(): see the requests up to `req_prod` only after reading it.
        fence(Ordering::Acquire);
        let ahead = req_prod.wrapping_sub(self.rsp_prod_pvt);
        if ahead > self.ring.size {
            return Err(RingError::ProducerOverflow {
                req_prod,
                rsp_prod: self.rsp_prod_pvt,
                ahead,
                size: self.ring.size,
            });
        }
        let reqs = req_prod.wrapping_sub(self.req_cons);
        let room = self.ring.size - self.outstanding();
        self.req_avail = reqs.min(room);
        Ok(self.req_avail)
    }

    /// Copy the next request out of the ring (once; everything after works on the copy). `false` if the last
    /// [`unconsumed`](Self::unconsumed) reported none left.
    pub fn next_request(&mut self, out: &mut RawRequest) -> bool {
        if self.req_avail == 0 {
            return false;
        }
        self.ring.read_entry(self.req_cons, &mut out.bytes, L::REQUEST_SIZE);
        out.bytes[L::REQUEST_SIZE..].fill(0);
        self.req_cons = self.req_cons.wrapping_add(1);
        self.req_avail -= 1;
        true
    }

    /// Write a response into the next response slot and publish it at once (`rsp_prod`), without an event:
    /// [`push_responses`](Self::push_responses) decides whether the frontend gets one. Refused (`false`) if every
    /// consumed request is already answered.
    ///
    /// Responses and requests share the ring's slots, so a response written and left unpublished overwrites a
    /// request that nothing else remembers: if this process died then, whoever answers what it left (the
    /// supervisor, [`resume`](Self::resume)) would read that slot as a request. Publishing each response as it is
    /// written leaves at most the slot being written ambiguous, for the few instructions it takes.
    pub fn put_response(&mut self, rsp: &BlkifResponse) -> bool {
        if self.outstanding() == 0 {
            return false;
        }
        let bytes: [u8; MAX_RESPONSE_SIZE] = rsp.encode::<L>();
        self.ring.write_entry(self.rsp_prod_pvt, &bytes, L::RESPONSE_SIZE);
        self.rsp_prod_pvt = self.rsp_prod_pvt.wrapping_add(1);
        // xen_wmb(): the frontend sees the response before the new producer index.
        fence(Ordering::Release);
        self.ring.index(RSP_PROD).store(self.rsp_prod_pvt, Ordering::Relaxed);
        true
    }

    /// Answer every request the frontend queued that we have not consumed with `BLKIF_RSP_ERROR` (its id and its
    /// response operation echoed: an indirect request's `indirect_op`), for a ring that is being given up: a
    /// frontend waits for an answer to every request it queued (Linux blkfront's removal of the disk waits for
    /// them forever). At most a ring's worth, as
    /// [`unconsumed`](Self::unconsumed) bounds it; a bogus producer is its error and nothing is answered.
    /// Returns how many were answered; [`push_responses`](Self::push_responses) then says whether to notify.
    pub fn fail_unconsumed(&mut self) -> Result<u32, RingError> {
        let mut raw = RawRequest::default();
        let avail = self.unconsumed()?;
        let mut answered = 0;
        for _ in 0..avail {
            if !self.next_request(&mut raw) {
                break;
            }
            let operation = raw.response_operation();
            self.put_response(&BlkifResponse { id: raw.id::<L>(), operation, status: RSP_ERROR });
            answered += 1;
        }
        Ok(answered)
    }

    /// The responses since the last call are published already: say whether the frontend wants an event for them
    /// (`RING_PUSH_RESPONSES_AND_CHECK_NOTIFY`).
    pub fn push_responses(&mut self) -> bool {
        let old = self.rsp_published;
        let new = self.rsp_prod_pvt;
        if old == new {
            return false;
        }
        self.rsp_published = new;
        // xen_mb(): the producer index is visible before we read the frontend's event index.
        fence(Ordering::SeqCst);
        let rsp_event = self.ring.index(RSP_EVENT).load(Ordering::Relaxed);
        new.wrapping_sub(rsp_event) < new.wrapping_sub(old)
    }

    /// Before waiting for an event: ask for one at the next request and look once more
    /// (`RING_FINAL_CHECK_FOR_REQUESTS`). Returns the requests available now.
    pub fn final_check_for_requests(&mut self) -> Result<u32, RingError> {
        let n = self.unconsumed()?;
        if n > 0 {
            return Ok(n);
        }
        self.ring.index(REQ_EVENT).store(self.req_cons.wrapping_add(1), Ordering::Relaxed);
        // xen_mb(): the event index is visible before we read the producer index again.
        fence(Ordering::SeqCst);
        self.unconsumed()
    }
}

/// The frontend's side of one shared ring (`FRONT_RING`), for test frontends and the blkfront emulator.
#[derive(Debug)]
pub struct FrontRing<L> {
    ring: Shared<L>,
    req_prod_pvt: u32,
    rsp_cons: u32,
}

// SAFETY: as for `BackRing`.
unsafe impl<L> Send for FrontRing<L> {}

impl<L: BlkifLayout> FrontRing<L> {
    /// Initialise the shared ring (`SHARED_RING_INIT`: indexes 0, event indexes 1, padding zeroed) and attach.
    ///
    /// # Safety
    /// `base` must be valid for reads and writes of `bytes` bytes for the life of the value.
    pub unsafe fn init(base: *mut u8, bytes: usize) -> Result<Self, RingError> {
        // SAFETY: forwarded contract.
        let ring = unsafe { Shared::new(base, bytes) }?;
        // SAFETY: the header is the first 64 bytes of the area.
        unsafe { std::ptr::write_bytes(base, 0, SRING_HEADER) };
        ring.index(REQ_EVENT).store(1, Ordering::Relaxed);
        ring.index(RSP_EVENT).store(1, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        Ok(FrontRing { ring, req_prod_pvt: 0, rsp_cons: 0 })
    }

    /// Entries in the ring.
    pub fn size(&self) -> u32 {
        self.ring.size
    }

    /// Requests that may be queued now (`RING_FREE_REQUESTS`).
    pub fn free_requests(&self) -> u32 {
        self.ring.size - self.req_prod_pvt.wrapping_sub(self.rsp_cons)
    }

    /// Write a request into the next slot (not yet visible). `false` if the ring is full.
    pub fn put_request(&mut self, raw: &RawRequest) -> bool {
        if self.free_requests() == 0 {
            return false;
        }
        self.ring.write_entry(self.req_prod_pvt, &raw.bytes, L::REQUEST_SIZE);
        self.req_prod_pvt = self.req_prod_pvt.wrapping_add(1);
        true
    }

    /// Publish the requests and say whether the backend wants an event (`RING_PUSH_REQUESTS_AND_CHECK_NOTIFY`).
    pub fn push_requests(&mut self) -> bool {
        let old = self.ring.index(REQ_PROD).load(Ordering::Relaxed);
        let new = self.req_prod_pvt;
        fence(Ordering::Release);
        self.ring.index(REQ_PROD).store(new, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        let req_event = self.ring.index(REQ_EVENT).load(Ordering::Relaxed);
        new.wrapping_sub(req_event) < new.wrapping_sub(old)
    }

    /// Take the next published response, if any (`RING_HAS_UNCONSUMED_RESPONSES` + `RING_GET_RESPONSE`).
    pub fn take_response(&mut self) -> Option<BlkifResponse> {
        let rsp_prod = self.ring.index(RSP_PROD).load(Ordering::Relaxed);
        fence(Ordering::Acquire);
        if rsp_prod == self.rsp_cons {
            return None;
        }
        let mut b = [0u8; MAX_RESPONSE_SIZE];
        self.ring.read_entry(self.rsp_cons, &mut b, L::RESPONSE_SIZE);
        self.rsp_cons = self.rsp_cons.wrapping_add(1);
        Some(BlkifResponse::decode::<L>(&b))
    }

    /// The raw bytes of the response slot for index `idx` (for checking that no stale bytes remain).
    pub fn response_bytes(&self, idx: u32) -> [u8; MAX_RESPONSE_SIZE] {
        let mut b = [0u8; MAX_RESPONSE_SIZE];
        self.ring.read_entry(idx, &mut b, L::RESPONSE_SIZE);
        b
    }

    /// Before waiting: ask for an event at the next response and look once more (`RING_FINAL_CHECK_FOR_RESPONSES`).
    pub fn final_check_for_responses(&mut self) -> bool {
        let has = |r: &Self| r.ring.index(RSP_PROD).load(Ordering::Relaxed) != r.rsp_cons;
        if has(self) {
            return true;
        }
        self.ring.index(RSP_EVENT).store(self.rsp_cons.wrapping_add(1), Ordering::Relaxed);
        fence(Ordering::SeqCst);
        has(self)
    }

    /// Write a request into the next slot whether or not the ring has room for it (hostile frontends in tests:
    /// one that refills slots as soon as the backend wrote their response, before the responses are published).
    /// [`push_requests`](Self::push_requests) publishes it.
    pub fn put_request_unchecked(&mut self, raw: &RawRequest) {
        self.ring.write_entry(self.req_prod_pvt, &raw.bytes, L::REQUEST_SIZE);
        self.req_prod_pvt = self.req_prod_pvt.wrapping_add(1);
    }

    /// Overwrite the shared `req_prod` (hostile frontends in tests).
    pub fn set_req_prod_raw(&mut self, value: u32) {
        fence(Ordering::Release);
        self.ring.index(REQ_PROD).store(value, Ordering::Relaxed);
    }

    /// The shared `rsp_prod`.
    pub fn rsp_prod(&self) -> u32 {
        self.ring.index(RSP_PROD).load(Ordering::Acquire)
    }

    /// Our private request producer.
    pub fn req_prod_pvt(&self) -> u32 {
        self.req_prod_pvt
    }

    /// Our response consumer.
    pub fn rsp_cons(&self) -> u32 {
        self.rsp_cons
    }

    /// Whether the shared `rsp_prod` claims more responses than we have requests outstanding (what Linux
    /// blkfront checks with `RING_RESPONSE_PROD_OVERFLOW`): a backend that broke the protocol.
    pub fn responses_overflow(&self) -> bool {
        self.rsp_prod().wrapping_sub(self.rsp_cons) > self.req_prod_pvt.wrapping_sub(self.rsp_cons)
    }
}

/// Copies of [`MAX_REQUEST_SIZE`] bytes are used for both ABIs.
const _: () = assert!(MAX_REQUEST_SIZE % 4 == 0);
