// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! One blkfront queue: a shared ring in guest memory, its event channel, and requests whose data pages are
//! really granted to the backend (per request, or once and reused with persistent grants; direct or indirect).
//!
//! Grants of a finished request are revoked at once; Xen (and the emulated grant table) refuses to revoke a grant
//! that is still mapped, so a backend that leaks a mapping is caught at the request that leaked it.

use std::time::{Duration, Instant};

use vm_memory::Bytes;

use crate::blkif::{
    encode, BlkifLayout, BlkifSegment, FrontRing, RawRequest, MAX_DIRECT_SEGMENTS, MAX_INDIRECT_PAGES, OP_DISCARD,
    OP_FLUSH_DISKCACHE, OP_INDIRECT, OP_READ, OP_WRITE, OP_WRITE_BARRIER, SEGMENTS_PER_INDIRECT_PAGE,
};
use crate::emulated::{EmulatedEventChannel, GuestDomain};
use crate::services::{DomId, EventChannel, EvtchnPort, GrantRef, XEN_PAGE_SIZE};

use super::handshake::{FrontError, PublishedRing};
use super::wait::poll_readable;

const SECTOR: usize = 512;

/// When to use indirect requests (if the backend offers them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Indirect {
    /// Never: requests are limited to 11 segments.
    Off,
    /// When a request has more than 11 segments (what Linux does).
    #[default]
    WhenNeeded,
    /// For every read and write.
    Always,
}

/// A request to the backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoRequest<'a> {
    /// Read `len` bytes (a multiple of 512) at `sector`.
    Read {
        /// First sector.
        sector: u64,
        /// Bytes.
        len: usize,
    },
    /// Write `data` at `sector`.
    Write {
        /// First sector.
        sector: u64,
        /// The data (a multiple of 512 bytes).
        data: &'a [u8],
    },
    /// A write with barrier semantics (`BLKIF_OP_WRITE_BARRIER`).
    Barrier {
        /// First sector.
        sector: u64,
        /// The data.
        data: &'a [u8],
    },
    /// `BLKIF_OP_FLUSH_DISKCACHE` with no data.
    Flush,
    /// `BLKIF_OP_DISCARD`.
    Discard {
        /// First sector.
        sector: u64,
        /// Sectors.
        sectors: u64,
        /// `BLKIF_DISCARD_SECURE`.
        secure: bool,
    },
}

/// A finished request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Completion {
    /// The caller's tag.
    pub tag: u64,
    /// `BLKIF_RSP_*`.
    pub status: i16,
    /// The data of a successful read.
    pub data: Vec<u8>,
}

/// What the queue may use, learned from the backend at connect.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueFeatures {
    /// Persistent grants (both sides agreed).
    pub persistent: bool,
    /// Indirect policy.
    pub indirect: Indirect,
    /// The backend's `feature-max-indirect-segments`.
    pub max_indirect_segments: u32,
}

/// One queue's operations, independent of the ABI.
pub trait QueueIo {
    /// The published ring (grant refs and port).
    fn published(&self) -> PublishedRing;
    /// Set what was negotiated.
    fn set_features(&mut self, features: QueueFeatures);
    /// Most data bytes one request may carry.
    fn max_request_bytes(&self) -> usize;
    /// Queue a request; `Ok(false)` if the ring is full.
    fn submit(&mut self, request: &IoRequest<'_>, tag: u64) -> Result<bool, FrontError>;
    /// Publish queued requests and notify the backend if it asked for it.
    fn kick(&mut self) -> Result<(), FrontError>;
    /// Requests queued and not yet completed.
    fn in_flight(&self) -> usize;
    /// Ring entries.
    fn ring_size(&self) -> usize;
    /// Wait up to `timeout` for completions and move them into `out` (returns when at least one arrived).
    fn poll(&mut self, out: &mut Vec<Completion>, timeout: Duration) -> Result<(), FrontError>;
    /// Overwrite the shared `req_prod` (hostile-frontend tests) and notify.
    fn set_req_prod_raw(&mut self, value: u32) -> Result<(), FrontError>;
    /// Revoke every grant and free every page; fails if the backend still maps any of them.
    fn teardown(&mut self) -> Result<(), FrontError>;
}

#[derive(Debug)]
struct Shadow {
    tag: u64,
    op: u8,
    pages: Vec<(usize, GrantRef)>,
    indirect: Vec<(usize, GrantRef)>,
    read_len: usize,
}

/// A queue of ABI `L`.
#[derive(Debug)]
pub struct FrontQueue<'g, L: BlkifLayout> {
    guest: &'g GuestDomain,
    backend: DomId,
    ring: FrontRing<L>,
    ring_first: usize,
    ring_grefs: Vec<GrantRef>,
    evtchn: EmulatedEventChannel,
    port: EvtchnPort,
    shadow: Vec<Option<Shadow>>,
    free_ids: Vec<u32>,
    free_pages: Vec<usize>,
    persistent_free: Vec<(usize, GrantRef)>,
    persistent_all: Vec<(usize, GrantRef)>,
    features: QueueFeatures,
    ports: Vec<EvtchnPort>,
    torn_down: bool,
}

fn ring_err(what: impl std::fmt::Display) -> FrontError {
    FrontError::Ring(what.to_string())
}

impl<'g, L: BlkifLayout> FrontQueue<'g, L> {
    /// Allocate and initialise a ring of `2^order` pages, grant it to `backend`, allocate an unbound port.
    pub fn new(guest: &'g GuestDomain, backend: DomId, order: u32) -> Result<Self, FrontError> {
        let pages = 1usize << order;
        let first = guest.alloc_pages(pages).ok_or_else(|| ring_err("guest memory exhausted (ring)"))?;
        let base = guest.page_ptr(first).ok_or_else(|| ring_err("ring page outside guest memory"))?;
        // SAFETY: `pages` contiguous pages of the guest's memory, which outlives `'g` and so this queue; the
        // backend accesses them only through the ring protocol.
        let ring = unsafe { FrontRing::<L>::init(base, pages * XEN_PAGE_SIZE) }.map_err(ring_err)?;
        let ring_grefs =
            (0..pages).map(|p| guest.grant_access_to(backend, first + p, false)).collect::<Result<Vec<_>, _>>()?;
        let mut evtchn = guest.evtchn()?;
        let port = evtchn.alloc_unbound(backend)?;
        let size = ring.size() as usize;
        Ok(FrontQueue {
            guest,
            backend,
            ring,
            ring_first: first,
            ring_grefs,
            evtchn,
            port,
            shadow: (0..size).map(|_| None).collect(),
            free_ids: (0..u32::try_from(size).unwrap_or(u32::MAX)).rev().collect(),
            free_pages: Vec::new(),
            persistent_free: Vec::new(),
            persistent_all: Vec::new(),
            features: QueueFeatures::default(),
            ports: Vec::new(),
            torn_down: false,
        })
    }

    fn max_segments(&self) -> usize {
        let indirect = match self.features.indirect {
            Indirect::Off => 0,
            _ => (self.features.max_indirect_segments as usize).min(MAX_INDIRECT_PAGES * SEGMENTS_PER_INDIRECT_PAGE),
        };
        indirect.max(MAX_DIRECT_SEGMENTS)
    }

    fn page(&mut self) -> Result<usize, FrontError> {
        match self.free_pages.pop() {
            Some(p) => Ok(p),
            None => self.guest.alloc_pages(1).ok_or_else(|| ring_err("guest memory exhausted (data)")),
        }
    }

    /// A granted page: from the persistent pool, or a fresh grant (`readonly` from the backend's view).
    fn granted_page(&mut self, readonly: bool) -> Result<(usize, GrantRef), FrontError> {
        if self.features.persistent {
            if let Some(pg) = self.persistent_free.pop() {
                return Ok(pg);
            }
            let page = self.page()?;
            // Persistent grants are mapped read-write whatever the first use (blkif.h, note 8).
            let gref = self.guest.grant_access_to(self.backend, page, false)?;
            self.persistent_all.push((page, gref));
            return Ok((page, gref));
        }
        let page = self.page()?;
        Ok((page, self.guest.grant_access_to(self.backend, page, readonly)?))
    }

    fn release(&mut self, pages: Vec<(usize, GrantRef)>) -> Result<(), FrontError> {
        let mut leaked = None;
        for (page, gref) in pages {
            if self.features.persistent && self.persistent_all.iter().any(|&(_, g)| g == gref) {
                self.persistent_free.push((page, gref));
                continue;
            }
            match self.guest.end_access(gref) {
                Ok(()) => self.free_pages.push(page),
                Err(e) => leaked = Some(ring_err(format!("grant {gref} still in use after its response: {e}"))),
            }
        }
        leaked.map_or(Ok(()), Err)
    }

    fn write_page(&self, page: usize, data: &[u8]) -> Result<(), FrontError> {
        self.guest.memory().write_slice(data, GuestDomain::page_addr(page)).map_err(ring_err)
    }

    fn build_data(
        &mut self,
        id: u32,
        op: u8,
        sector: u64,
        data: Option<&[u8]>,
        len: usize,
    ) -> Result<RawRequest, FrontError> {
        if len == 0 || len % SECTOR != 0 {
            return Err(ring_err(format!("request length {len} is not a positive multiple of 512")));
        }
        let nseg = len.div_ceil(XEN_PAGE_SIZE);
        if nseg > self.max_segments() {
            return Err(ring_err(format!("{len} bytes need {nseg} segments, more than {}", self.max_segments())));
        }
        let readonly = data.is_some();
        let mut pages = Vec::with_capacity(nseg);
        let mut segments = Vec::with_capacity(nseg);
        for i in 0..nseg {
            let chunk = (len - i * XEN_PAGE_SIZE).min(XEN_PAGE_SIZE);
            let (page, gref) = self.granted_page(readonly)?;
            pages.push((page, gref));
            if let Some(d) = data {
                self.write_page(page, &d[i * XEN_PAGE_SIZE..i * XEN_PAGE_SIZE + chunk])?;
            }
            let last = u8::try_from(chunk / SECTOR - 1).unwrap_or(7);
            segments.push(BlkifSegment { gref, first_sect: 0, last_sect: last });
        }
        let use_indirect = self.features.max_indirect_segments > 0
            && op != OP_WRITE_BARRIER
            && match self.features.indirect {
                Indirect::Off => false,
                Indirect::WhenNeeded => nseg > MAX_DIRECT_SEGMENTS,
                Indirect::Always => true,
            };
        let mut indirect = Vec::new();
        let raw = if use_indirect {
            for descriptors in segments.chunks(SEGMENTS_PER_INDIRECT_PAGE) {
                let (page, gref) = self.granted_page(true)?;
                let bytes: Vec<u8> = descriptors.iter().flat_map(|s| s.encode()).collect();
                self.write_page(page, &bytes)?;
                indirect.push((page, gref));
            }
            let grefs: Vec<GrantRef> = indirect.iter().map(|&(_, g)| g).collect();
            let n = u16::try_from(nseg).map_err(ring_err)?;
            encode::indirect::<L>(op, u64::from(id), sector, n, &grefs)
        } else {
            encode::rw::<L>(op, u64::from(id), sector, &segments)
        };
        let expected_op = op;
        self.shadow[id as usize] =
            Some(Shadow { tag: 0, op: expected_op, pages, indirect, read_len: if data.is_none() { len } else { 0 } });
        Ok(raw)
    }

    fn complete(&mut self, id: u64, operation: u8, status: i16, out: &mut Vec<Completion>) -> Result<(), FrontError> {
        let slot = usize::try_from(id).ok().filter(|&i| i < self.shadow.len());
        let Some(shadow) = slot.and_then(|i| self.shadow[i].take()) else {
            return Err(ring_err(format!("response for unknown request id {id}")));
        };
        if operation != shadow.op {
            return Err(ring_err(format!("response operation {operation} for a request of operation {}", shadow.op)));
        }
        let mut data = Vec::new();
        if shadow.read_len > 0 && status == crate::blkif::RSP_OKAY {
            data.resize(shadow.read_len, 0);
            for (i, &(page, _)) in shadow.pages.iter().enumerate() {
                let start = i * XEN_PAGE_SIZE;
                let end = (start + XEN_PAGE_SIZE).min(shadow.read_len);
                self.guest
                    .memory()
                    .read_slice(&mut data[start..end], GuestDomain::page_addr(page))
                    .map_err(ring_err)?;
            }
        }
        let tag = shadow.tag;
        self.release(shadow.pages)?;
        self.release(shadow.indirect)?;
        self.free_ids.push(u32::try_from(id).unwrap_or(0));
        out.push(Completion { tag, status, data });
        Ok(())
    }
}

impl<L: BlkifLayout> QueueIo for FrontQueue<'_, L> {
    fn published(&self) -> PublishedRing {
        PublishedRing { refs: self.ring_grefs.clone(), port: self.port }
    }

    fn set_features(&mut self, features: QueueFeatures) {
        self.features = features;
    }

    fn max_request_bytes(&self) -> usize {
        self.max_segments() * XEN_PAGE_SIZE
    }

    fn submit(&mut self, request: &IoRequest<'_>, tag: u64) -> Result<bool, FrontError> {
        if self.ring.free_requests() == 0 {
            return Ok(false);
        }
        let Some(id) = self.free_ids.pop() else { return Ok(false) };
        let built = match *request {
            IoRequest::Read { sector, len } => self.build_data(id, OP_READ, sector, None, len),
            IoRequest::Write { sector, data } => self.build_data(id, OP_WRITE, sector, Some(data), data.len()),
            IoRequest::Barrier { sector, data } => {
                self.build_data(id, OP_WRITE_BARRIER, sector, Some(data), data.len())
            }
            IoRequest::Flush => {
                self.shadow[id as usize] =
                    Some(Shadow { tag, op: OP_FLUSH_DISKCACHE, pages: Vec::new(), indirect: Vec::new(), read_len: 0 });
                Ok(encode::rw::<L>(OP_FLUSH_DISKCACHE, u64::from(id), 0, &[]))
            }
            IoRequest::Discard { sector, sectors, secure } => {
                self.shadow[id as usize] =
                    Some(Shadow { tag, op: OP_DISCARD, pages: Vec::new(), indirect: Vec::new(), read_len: 0 });
                Ok(encode::discard::<L>(u64::from(id), sector, sectors, secure))
            }
        };
        let raw = match built {
            Ok(raw) => raw,
            Err(e) => {
                if let Some(s) = self.shadow[id as usize].take() {
                    let _ = self.release(s.pages);
                    let _ = self.release(s.indirect);
                }
                self.free_ids.push(id);
                return Err(e);
            }
        };
        if let Some(s) = self.shadow[id as usize].as_mut() {
            s.tag = tag;
        }
        debug_assert!(raw.operation() != OP_INDIRECT || self.features.max_indirect_segments > 0);
        Ok(self.ring.put_request(&raw))
    }

    fn kick(&mut self) -> Result<(), FrontError> {
        if self.ring.push_requests() {
            self.evtchn.notify(self.port)?;
        }
        Ok(())
    }

    fn in_flight(&self) -> usize {
        self.shadow.len() - self.free_ids.len()
    }

    fn ring_size(&self) -> usize {
        self.shadow.len()
    }

    fn poll(&mut self, out: &mut Vec<Completion>, timeout: Duration) -> Result<(), FrontError> {
        let deadline = Instant::now() + timeout;
        let before = out.len();
        loop {
            while let Some(rsp) = self.ring.take_response() {
                self.complete(rsp.id, rsp.operation, rsp.status, out)?;
            }
            if out.len() > before || self.in_flight() == 0 {
                return Ok(());
            }
            if self.ring.final_check_for_responses() {
                continue;
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(ring_err(format!("no response within {timeout:?} ({} in flight)", self.in_flight())));
            }
            poll_readable(self.evtchn.fd(), deadline - now);
            self.ports.clear();
            self.evtchn.pending(&mut self.ports)?;
            for i in 0..self.ports.len() {
                self.evtchn.unmask(self.ports[i])?;
            }
        }
    }

    fn set_req_prod_raw(&mut self, value: u32) -> Result<(), FrontError> {
        self.ring.set_req_prod_raw(value);
        self.evtchn.notify(self.port)?;
        Ok(())
    }

    fn teardown(&mut self) -> Result<(), FrontError> {
        if self.torn_down {
            return Ok(());
        }
        self.torn_down = true;
        let mut grants: Vec<(usize, GrantRef)> = self.persistent_all.drain(..).collect();
        self.persistent_free.clear();
        let persistent = grants.len();
        for s in self.shadow.iter_mut().filter_map(Option::take) {
            // Pages of the persistent pool are already listed once.
            for pg in s.pages.into_iter().chain(s.indirect) {
                if !grants[..persistent].contains(&pg) {
                    grants.push(pg);
                }
            }
        }
        let mut failed = Vec::new();
        for (page, gref) in grants {
            match self.guest.end_access(gref) {
                Ok(()) => self.guest.free_pages(page, 1),
                Err(e) => failed.push(format!("{gref}: {e}")),
            }
        }
        for &gref in &self.ring_grefs {
            if let Err(e) = self.guest.end_access(gref) {
                failed.push(format!("ring {gref}: {e}"));
            }
        }
        if failed.is_empty() {
            self.guest.free_pages(self.ring_first, self.ring_grefs.len());
        }
        for page in self.free_pages.drain(..) {
            self.guest.free_pages(page, 1);
        }
        match failed.first() {
            None => Ok(()),
            Some(first) => {
                Err(ring_err(format!("{} grants still mapped by the backend (first: {first})", failed.len())))
            }
        }
    }
}

impl<L: BlkifLayout> Drop for FrontQueue<'_, L> {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            tracing::warn!(error = %e, "blkfront queue teardown");
        }
    }
}
