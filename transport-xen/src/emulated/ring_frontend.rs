// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The guest side of one blkif ring on the emulated host: ring pages in guest memory granted to dom0, an unbound
//! event-channel port, and helpers to grant data pages, submit requests and wait for responses.
//!
//! It speaks only the ring protocol (no xenbus handshake): tests of the data plane and the blkfront emulator build
//! on it.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::evtchn::EmulatedEventChannel;
use super::host::GuestDomain;
use crate::blkif::{BlkifLayout, BlkifResponse, FrontRing, RawRequest};
use crate::connect::QueueRing;
use crate::services::{DomId, EventChannel, EvtchnPort, GrantRef, XenError, XEN_PAGE_SIZE};

/// Pages of a guest granted to the backend.
#[derive(Debug)]
pub struct GrantedPages {
    /// First page (guest page number).
    pub first: usize,
    /// One grant ref per page.
    pub grefs: Vec<GrantRef>,
}

/// One ring of an emulated frontend.
#[derive(Debug)]
pub struct RingFrontend<L: BlkifLayout> {
    guest: Arc<GuestDomain>,
    ring: FrontRing<L>,
    ring_pages: GrantedPages,
    evtchn: EmulatedEventChannel,
    port: EvtchnPort,
    backend: DomId,
}

fn nomem(what: &str) -> XenError {
    XenError::Os { what: what.to_owned(), errno: libc::ENOMEM }
}

impl<L: BlkifLayout> RingFrontend<L> {
    /// A ring of `1 << order` pages in `guest`'s memory, granted writable to `backend`, initialised, with an
    /// unbound port for `backend`.
    pub fn new(guest: Arc<GuestDomain>, order: u32, backend: DomId) -> Result<Self, XenError> {
        let pages = 1usize << order.min(8);
        let ring_pages = grant_pages(&guest, backend, pages, false)?;
        let base = guest.page_ptr(ring_pages.first).ok_or_else(|| nomem("ring page"))?;
        // SAFETY: `pages` consecutive guest pages, contiguous in the guest's mapping, kept (allocated and
        // granted) until this value is dropped.
        let ring = unsafe { FrontRing::<L>::init(base, pages * XEN_PAGE_SIZE) }
            .map_err(|e| XenError::Protocol { what: "ring", detail: e.to_string() })?;
        let mut evtchn = guest.evtchn()?;
        let port = evtchn.alloc_unbound(backend)?;
        Ok(RingFrontend { guest, ring, ring_pages, evtchn, port, backend })
    }

    /// Initialise the shared ring again (`SHARED_RING_INIT`, our indexes back to 0), as a frontend does before it
    /// connects again: a backend that attaches starts at index 0 (`BACK_RING_INIT`). Any response not taken yet
    /// is gone.
    pub fn reinit_ring(&mut self) -> Result<(), XenError> {
        let pages = self.ring_pages.grefs.len();
        let base = self.guest.page_ptr(self.ring_pages.first).ok_or_else(|| nomem("ring page"))?;
        // SAFETY: as in `new`: the same pages, kept until this value is dropped.
        self.ring = unsafe { FrontRing::<L>::init(base, pages * XEN_PAGE_SIZE) }
            .map_err(|e| XenError::Protocol { what: "ring", detail: e.to_string() })?;
        Ok(())
    }

    /// What the frontend publishes for this ring (`ring-ref*`, `event-channel`).
    pub fn queue_ring(&self) -> QueueRing {
        QueueRing { ring_refs: self.ring_pages.grefs.clone(), remote_port: self.port }
    }

    /// The guest.
    pub fn guest(&self) -> &Arc<GuestDomain> {
        &self.guest
    }

    /// The shared ring, frontend side (for hostile tests: raw requests, raw indexes).
    pub fn ring(&mut self) -> &mut FrontRing<L> {
        &mut self.ring
    }

    /// Our event-channel port.
    pub fn port(&self) -> EvtchnPort {
        self.port
    }

    /// Notify the backend.
    pub fn notify(&self) -> Result<(), XenError> {
        self.evtchn.notify(self.port)
    }

    /// Grant `count` fresh contiguous pages to the backend.
    pub fn grant_pages(&self, count: usize, readonly: bool) -> Result<GrantedPages, XenError> {
        grant_pages(&self.guest, self.backend, count, readonly)
    }

    /// Revoke and free pages from [`grant_pages`](Self::grant_pages).
    pub fn release_pages(&self, pages: GrantedPages) -> Result<(), XenError> {
        release(&self.guest, pages)
    }

    /// Queue `requests`, publish them and notify if the backend asked for it. Returns how many fit.
    pub fn submit(&mut self, requests: &[RawRequest]) -> Result<usize, XenError> {
        let mut n = 0;
        for r in requests {
            if !self.ring.put_request(r) {
                break;
            }
            n += 1;
        }
        if self.ring.push_requests() {
            self.notify()?;
        }
        Ok(n)
    }

    /// Collect at least `count` responses (every published one), waiting on the event channel up to `timeout`.
    /// Like blkfront, re-arms the response event index (`RING_FINAL_CHECK_FOR_RESPONSES`) before returning.
    pub fn wait_responses(&mut self, count: usize, timeout: Duration) -> Result<Vec<BlkifResponse>, String> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::with_capacity(count);
        loop {
            if self.ring.responses_overflow() {
                let slots: Vec<String> = (0..self.ring.req_prod_pvt().min(8))
                    .map(|i| format!("{:?}", &self.ring.response_bytes(i)[..12]))
                    .collect();
                return Err(format!(
                    "the backend published responses up to {} while requests {}..{} were outstanding (slots {})",
                    self.ring.rsp_prod(),
                    self.ring.rsp_cons(),
                    self.ring.req_prod_pvt(),
                    slots.join(" ")
                ));
            }
            while let Some(r) = self.ring.take_response() {
                out.push(r);
            }
            let more = self.ring.final_check_for_responses();
            if out.len() >= count && !more {
                return Ok(out);
            }
            if more {
                continue;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!("{} of {count} responses after {timeout:?}", out.len()));
            }
            self.wait_event(left);
        }
    }

    /// Wait up to `timeout` for an event on our port; acknowledge and unmask it. Returns whether one came.
    pub fn wait_event(&mut self, timeout: Duration) -> bool {
        let mut pfd = libc::pollfd { fd: self.evtchn.fd().as_raw_fd(), events: libc::POLLIN, revents: 0 };
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX).max(1);
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&mut pfd, 1, ms) } == 1;
        let mut ports = Vec::new();
        let _ = self.evtchn.pending(&mut ports);
        for p in ports {
            let _ = self.evtchn.unmask(p);
        }
        ready
    }
}

fn grant_pages(guest: &GuestDomain, backend: DomId, count: usize, readonly: bool) -> Result<GrantedPages, XenError> {
    let first = guest.alloc_pages(count).ok_or_else(|| nomem("guest pages"))?;
    let mut grefs = Vec::with_capacity(count);
    for page in first..first + count {
        match guest.grant_access_to(backend, page, readonly) {
            Ok(g) => grefs.push(g),
            Err(e) => {
                for g in grefs {
                    let _ = guest.end_access(g);
                }
                guest.free_pages(first, count);
                return Err(e);
            }
        }
    }
    Ok(GrantedPages { first, grefs })
}

fn release(guest: &GuestDomain, pages: GrantedPages) -> Result<(), XenError> {
    let mut result = Ok(());
    for &g in &pages.grefs {
        if let Err(e) = guest.end_access(g) {
            result = Err(e);
        }
    }
    if result.is_ok() {
        guest.free_pages(pages.first, pages.grefs.len());
    }
    result
}

impl<L: BlkifLayout> Drop for RingFrontend<L> {
    fn drop(&mut self) {
        let pages = GrantedPages { first: self.ring_pages.first, grefs: std::mem::take(&mut self.ring_pages.grefs) };
        if let Err(e) = release(&self.guest, pages) {
            tracing::warn!(error = %e, "ring frontend: ring pages still mapped by the backend");
        }
    }
}
