// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The blkfront emulator: a guest's block frontend on the emulated host, doing what Linux xen-blkfront does.
//!
//! [`Blkfront::connect`] waits for the backend's InitWait, negotiates ring order and queues against the backend's
//! `max-ring-page-order` / `multi-queue-max-queues`, sets up each ring in guest memory (granted to the backend,
//! with an unbound event channel), publishes them with `talk_to_blkback`'s nodes and order, goes Initialised,
//! waits for the backend's Connected, reads the disk parameters and features, and goes Connected. Requests then
//! travel through the real shared rings with real grants; [`Blkfront::close`] closes like blkfront and verifies
//! that the backend unmapped every grant.

use std::time::Duration;

use crate::blkif::{RSP_OKAY, X86_32, X86_64};
use crate::connect::BlkifAbi;
use crate::emulated::{EmulatedXenStore, GuestDomain};
use crate::services::{read_optional, DomId, TxId};
use crate::xenbus::nodes;
use crate::xenbus::state::{VbdId, XenbusState};

use super::handshake::{self, BackendInfo, FrontError, Publication};
use super::queue::{Completion, FrontQueue, Indirect, IoRequest, QueueFeatures, QueueIo};
use super::toolstack::frontend_path;

/// How the emulated frontend behaves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlkfrontConfig {
    /// Request layout.
    pub abi: BlkifAbi,
    /// Write the `protocol` node (without it the backend must assume x86_32).
    pub write_protocol: bool,
    /// Wanted ring order (capped by the backend's `max-ring-page-order`).
    pub ring_page_order: u32,
    /// Wanted queues (capped by the backend's `multi-queue-max-queues`).
    pub queues: u32,
    /// Ask for persistent grants.
    pub persistent: bool,
    /// Indirect policy.
    pub indirect: Indirect,
    /// Longest wait for the backend or a response.
    pub timeout: Duration,
}

impl Default for BlkfrontConfig {
    fn default() -> Self {
        BlkfrontConfig {
            abi: BlkifAbi::X86_64,
            write_protocol: true,
            ring_page_order: 0,
            queues: 1,
            persistent: false,
            indirect: Indirect::WhenNeeded,
            timeout: Duration::from_secs(10),
        }
    }
}

/// A connected emulated blkfront.
pub struct Blkfront<'g> {
    store: EmulatedXenStore,
    frontend: String,
    backend: String,
    info: BackendInfo,
    queues: Vec<Box<dyn QueueIo + 'g>>,
    config: BlkfrontConfig,
    completions: Vec<Completion>,
    next_tag: u64,
}

impl std::fmt::Debug for Blkfront<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Blkfront").field("frontend", &self.frontend).field("queues", &self.queues.len()).finish()
    }
}

fn backend_error(what: impl Into<String>) -> FrontError {
    FrontError::Backend(what.into())
}

impl<'g> Blkfront<'g> {
    /// Perform blkfront's handshake for vbd `devid` of `guest`.
    pub fn connect(guest: &'g GuestDomain, devid: u32, config: BlkfrontConfig) -> Result<Blkfront<'g>, FrontError> {
        let store = guest.xenstore()?;
        let frontend = frontend_path(VbdId { domid: guest.domid(), devid });
        let read = |name: &str| read_optional(&store, TxId::NONE, &format!("{frontend}/{name}"));
        let backend = read("backend")?.ok_or_else(|| backend_error("no backend node"))?;
        let backend = nodes::parse_xenstore_path("backend", &backend).map_err(|e| backend_error(e.to_string()))?;
        let backend_id = read("backend-id")?.ok_or_else(|| backend_error("no backend-id node"))?;
        let backend_id: DomId =
            nodes::parse_domid("backend-id", &backend_id).map_err(|e| backend_error(e.to_string()))?;

        let t = config.timeout;
        let state = handshake::wait_backend(&store, &backend, t, |s| s >= XenbusState::InitWait)?;
        if state != XenbusState::InitWait {
            return Err(backend_error(format!("backend is {state}, not InitWait")));
        }
        let limits = handshake::read_backend_limits(&store, &backend)?;
        let order = config.ring_page_order.min(limits.max_ring_page_order);
        let nqueues = config.queues.clamp(1, limits.max_queues);
        let mut queues: Vec<Box<dyn QueueIo + 'g>> = Vec::new();
        for _ in 0..nqueues {
            queues.push(match config.abi {
                BlkifAbi::X86_64 => Box::new(FrontQueue::<X86_64>::new(guest, backend_id, order)?),
                BlkifAbi::X86_32 => Box::new(FrontQueue::<X86_32>::new(guest, backend_id, order)?),
            });
        }
        let publication = Publication {
            ring_page_order: order,
            rings: queues.iter().map(|q| q.published()).collect(),
            abi: config.write_protocol.then_some(config.abi),
            persistent: config.persistent,
        };
        handshake::publish(&store, &frontend, &publication)?;
        let state = handshake::wait_backend(&store, &backend, t, |s| s >= XenbusState::Connected)?;
        if state != XenbusState::Connected {
            return Err(backend_error(format!("backend went {state} instead of Connected")));
        }
        let info = handshake::read_backend_info(&store, &backend)?;
        let features = QueueFeatures {
            persistent: config.persistent && info.persistent,
            indirect: config.indirect,
            max_indirect_segments: info.max_indirect_segments,
        };
        for q in &mut queues {
            q.set_features(features);
        }
        handshake::switch_state(&store, &frontend, XenbusState::Connected)?;
        Ok(Blkfront { store, frontend, backend, info, queues, config, completions: Vec::new(), next_tag: 1 })
    }

    /// What the backend published.
    pub fn info(&self) -> &BackendInfo {
        &self.info
    }

    /// Queues in use.
    pub fn queue_count(&self) -> usize {
        self.queues.len()
    }

    /// The backend's xenstore directory.
    pub fn backend_path(&self) -> &str {
        &self.backend
    }

    /// The guest's xenstore connection.
    pub fn store(&self) -> &EmulatedXenStore {
        &self.store
    }

    /// Most bytes one request may carry.
    pub fn max_request_bytes(&self) -> usize {
        self.queues[0].max_request_bytes()
    }

    /// Ring entries per queue.
    pub fn ring_size(&self) -> usize {
        self.queues[0].ring_size()
    }

    /// Queue `request` on `queue` with `tag`; `Ok(false)` when the ring is full.
    pub fn submit(&mut self, queue: usize, request: &IoRequest<'_>, tag: u64) -> Result<bool, FrontError> {
        self.queue(queue)?.submit(request, tag)
    }

    /// Publish queued requests of `queue` (and notify the backend if it asked).
    pub fn kick(&mut self, queue: usize) -> Result<(), FrontError> {
        self.queue(queue)?.kick()
    }

    /// Requests in flight on `queue`.
    pub fn in_flight(&self, queue: usize) -> usize {
        self.queues.get(queue).map_or(0, |q| q.in_flight())
    }

    /// Wait for completions on `queue` (at least one, unless none is in flight).
    pub fn poll(&mut self, queue: usize, out: &mut Vec<Completion>) -> Result<(), FrontError> {
        let t = self.config.timeout;
        self.queue(queue)?.poll(out, t)
    }

    /// The raw shared `req_prod` of `queue` (hostile-frontend tests).
    pub fn set_req_prod_raw(&mut self, queue: usize, value: u32) -> Result<(), FrontError> {
        self.queue(queue)?.set_req_prod_raw(value)
    }

    fn queue(&mut self, queue: usize) -> Result<&mut Box<dyn QueueIo + 'g>, FrontError> {
        let n = self.queues.len();
        self.queues.get_mut(queue).ok_or_else(|| FrontError::Ring(format!("no queue {queue} (of {n})")))
    }

    /// Run one request on `queue` to completion and return it.
    pub fn request(&mut self, queue: usize, request: &IoRequest<'_>) -> Result<Completion, FrontError> {
        let tag = self.next_tag;
        self.next_tag += 1;
        if !self.submit(queue, request, tag)? {
            return Err(FrontError::Ring("ring full".into()));
        }
        self.kick(queue)?;
        let mut out = std::mem::take(&mut self.completions);
        out.clear();
        while !out.iter().any(|c| c.tag == tag) {
            self.poll(queue, &mut out)?;
        }
        let pos = out.iter().position(|c| c.tag == tag).unwrap_or(0);
        let done = out.swap_remove(pos);
        self.completions = out;
        Ok(done)
    }

    /// Read `len` bytes at `sector` (must succeed).
    pub fn read(&mut self, sector: u64, len: usize) -> Result<Vec<u8>, FrontError> {
        let c = self.request(0, &IoRequest::Read { sector, len })?;
        ok(c.status, "read")?;
        Ok(c.data)
    }

    /// Write `data` at `sector` (must succeed).
    pub fn write(&mut self, sector: u64, data: &[u8]) -> Result<(), FrontError> {
        ok(self.request(0, &IoRequest::Write { sector, data })?.status, "write")
    }

    /// Flush the disk cache; returns the status.
    pub fn flush(&mut self) -> Result<i16, FrontError> {
        Ok(self.request(0, &IoRequest::Flush)?.status)
    }

    /// Close as blkfront does: Closing, wait for the backend to close, Closed, then revoke every grant; fails if
    /// the backend still maps any of them.
    pub fn close(mut self) -> Result<(), FrontError> {
        let t = self.config.timeout;
        handshake::switch_state(&self.store, &self.frontend, XenbusState::Closing)?;
        self.wait_backend_closing(t)?;
        handshake::switch_state(&self.store, &self.frontend, XenbusState::Closed)?;
        self.wait_backend_closed(t)?;
        self.teardown()
    }

    /// After the backend (or the toolstack) closed the device: answer with Closed, wait for the backend's Closed
    /// and revoke every grant.
    pub fn finish_after_backend_close(mut self) -> Result<(), FrontError> {
        let t = self.config.timeout;
        self.wait_backend_closing(t)?;
        handshake::switch_state(&self.store, &self.frontend, XenbusState::Closed)?;
        self.wait_backend_closed(t)?;
        self.teardown()
    }

    /// Revoke every grant (the backend must have unmapped them) without any handshake.
    pub fn teardown(&mut self) -> Result<(), FrontError> {
        let errors: Vec<String> =
            self.queues.iter_mut().filter_map(|q| q.teardown().err()).map(|e| e.to_string()).collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(FrontError::Ring(errors.join("; ")))
        }
    }

    fn wait_backend_closing(&self, t: Duration) -> Result<(), FrontError> {
        // The backend's directory may already be gone (forced removal): that counts as closed.
        handshake::wait_for_backend_state(&self.store, &self.backend, t, |s| {
            s.is_none_or(|s| s >= XenbusState::Closing)
        })
    }

    fn wait_backend_closed(&self, t: Duration) -> Result<(), FrontError> {
        handshake::wait_for_backend_state(&self.store, &self.backend, t, |s| {
            s.is_none_or(|s| s == XenbusState::Closed || s == XenbusState::Unknown)
        })
    }
}

fn ok(status: i16, what: &str) -> Result<(), FrontError> {
    if status == RSP_OKAY {
        Ok(())
    } else {
        Err(FrontError::Ring(format!("{what} failed with status {status}")))
    }
}
