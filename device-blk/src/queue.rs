// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The per-queue request pipeline shared by every transport: validate, resolve guest buffers, submit to the
//! engine, and hand back completions with the transport's cookie and a [`Status`].

use std::collections::VecDeque;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryMmap};

use crate::engine::{Completion, EngineError, IoEngine, IoOp, IOV_MAX};
use crate::geometry::Geometry;
use crate::request::{Request, RequestError, RequestKind, Segment, Status, ID_BYTES};
use crate::stats::QueueStats;

/// A request the queue is done with.
#[derive(Debug)]
pub struct Finished<C> {
    /// The transport's cookie, as given to [`BlockQueue::submit`].
    pub cookie: C,
    /// What to tell the guest.
    pub status: Status,
    /// Bytes written into guest memory (reads and get-id), for transports that report it.
    pub bytes_to_guest: u32,
    /// Why it failed, for logs and stats.
    pub error: Option<RequestError>,
}

/// The iovecs (and logged read segments) a slot has room for from its first request on.
const SLOT_ROOM: usize = 16;

#[derive(Debug)]
struct Slot<C> {
    cookie: Option<C>,
    iovecs: Vec<libc::iovec>,
    /// A read's guest segments, marked dirty when it completes (see [`BlockQueue::drain_logged`]).
    reads: Vec<Segment>,
    expected: u64,
    kind: RequestKind,
    started: Instant,
}

// SAFETY: the raw pointers in `iovecs` are only addresses of guest buffers that the owning queue hands to its
// engine; they are never dereferenced outside the engine's contract, so moving the slot between threads is sound.
unsafe impl<C: Send> Send for Slot<C> {}

/// A cookie that owns the guest memory its request's segments name, for [`BlockQueue::submit_owned`] (as a
/// vhost-user request's cookie holds an `Arc` of the memory snapshot it was parsed from).
///
/// # Safety
/// [`guest_memory`](OwnsGuestMemory::guest_memory) must return the same memory every time, that memory must stay
/// mapped (not unmapped, not remapped) for as long as the cookie lives, and it must not move when the cookie moves
/// (it lives behind a pointer the cookie holds, such as an `Arc`).
pub unsafe trait OwnsGuestMemory {
    /// The guest memory type.
    type Memory: GuestMemoryBackend;
    /// The memory the request's segments name.
    fn guest_memory(&self) -> &Self::Memory;
}

// SAFETY: an `Arc`'s target does not move with the `Arc`, and lives as long as it.
unsafe impl<M: GuestMemoryBackend> OwnsGuestMemory for std::sync::Arc<M> {
    type Memory = M;
    fn guest_memory(&self) -> &M {
        self
    }
}

/// One queue's pipeline over an [`IoEngine`]: a slab of in-flight slots indexed by the engine token, with no
/// allocation per request once warm, and backpressure through [`has_room`](BlockQueue::has_room).
pub struct BlockQueue<C> {
    geometry: Geometry,
    /// The disk's live size, if the queue follows resizes ([`BlockQueue::follow_capacity`]).
    capacity: Option<Arc<AtomicU64>>,
    serial: [u8; ID_BYTES],
    engine: Box<dyn IoEngine>,
    slots: Vec<Slot<C>>,
    free: Vec<u32>,
    ready: VecDeque<Finished<C>>,
    unsubmitted: bool,
    /// When the batch being built (everything since the last kick) started: one clock read per batch, not per
    /// request (in a Xen PV domain, where there is no vDSO clock, each read is a system call).
    batch_started: Option<Instant>,
    /// Between [`begin_round`](BlockQueue::begin_round) and [`end_round`](BlockQueue::end_round): the clock read
    /// of the round, if one was made yet (shared by the round's submissions and drains).
    round: Option<Option<Instant>>,
    /// Alignment host buffers need (the engine's, from the disk's direct-I/O memory alignment).
    buffer_alignment: usize,
    /// Keep each read's guest segments for [`drain_logged`](BlockQueue::drain_logged) ([`log_reads`](BlockQueue::log_reads)).
    log_reads: bool,
    stats: Arc<QueueStats>,
}

impl<C> std::fmt::Debug for BlockQueue<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockQueue")
            .field("engine", &self.engine.name())
            .field("slots", &self.slots.len())
            .field("free", &self.free.len())
            .finish()
    }
}

impl<C> BlockQueue<C> {
    /// A queue for a disk of `geometry`, answering GET_ID with `serial`, doing I/O through `engine`.
    pub fn new(geometry: Geometry, serial: [u8; ID_BYTES], engine: Box<dyn IoEngine>) -> Self {
        Self::with_stats(geometry, serial, engine, Arc::new(QueueStats::default()))
    }

    /// As [`new`](Self::new), counting into `stats` instead of counters of its own (e.g. counters several queues
    /// of one thread share when nobody reports them per queue: a queue's histograms are 40 KiB to make and zero).
    pub fn with_stats(
        geometry: Geometry,
        serial: [u8; ID_BYTES],
        engine: Box<dyn IoEngine>,
        stats: Arc<QueueStats>,
    ) -> Self {
        let depth = engine.capacity();
        // A slot's buffers get their room with its first request (`SLOT_ROOM`) and keep it, so nothing is allocated
        // per request once warm, and a queue pays only for the depth its transport uses. One clock read for all.
        let now = Instant::now();
        let slots = (0..depth)
            .map(|_| Slot {
                cookie: None,
                iovecs: Vec::new(),
                reads: Vec::new(),
                expected: 0,
                kind: RequestKind::Flush,
                started: now,
            })
            .collect();
        let free = (0..u32::try_from(depth).unwrap_or(u32::MAX)).rev().collect();
        let buffer_alignment = engine.buffer_alignment().max(1);
        BlockQueue {
            geometry,
            capacity: None,
            log_reads: false,
            serial,
            engine,
            slots,
            free,
            ready: VecDeque::with_capacity(depth),
            unsubmitted: false,
            batch_started: None,
            round: None,
            buffer_alignment,
            stats,
        }
    }

    /// This queue's live counters and latency histograms (register them with a
    /// [`Registry`](crate::stats::Registry) to report them).
    pub fn stats(&self) -> &Arc<QueueStats> {
        &self.stats
    }

    /// Serve the disk at the size `capacity` holds (in sectors) from now on, as it grows
    /// ([`Disk::capacity_handle`](crate::Disk::capacity_handle)); read once per request.
    pub fn follow_capacity(mut self, capacity: Arc<AtomicU64>) -> Self {
        self.capacity = Some(capacity);
        self
    }

    /// Keep each read's guest segments until it completes, so that [`drain_logged`](Self::drain_logged) can mark
    /// the pages it wrote dirty. Only for guest memory with a dirty bitmap: without it a read costs no copy.
    pub fn log_reads(mut self) -> Self {
        self.log_reads = true;
        self
    }

    /// The disk's geometry, with its size as it is now.
    pub fn geometry(&mut self) -> &Geometry {
        if let Some(capacity) = &self.capacity {
            self.geometry.capacity = crate::units::Sector(capacity.load(Ordering::Acquire));
        }
        &self.geometry
    }

    /// Whether another request can be submitted now.
    pub fn has_room(&self) -> bool {
        !self.free.is_empty()
    }

    /// Requests submitted and not yet drained.
    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len() + self.ready.len()
    }

    /// The engine's completion eventfd, for the queue's event loop.
    pub fn completion_fd(&self) -> RawFd {
        self.engine.completion_fd()
    }

    /// The engine's name.
    pub fn engine_name(&self) -> &'static str {
        self.engine.name()
    }

    /// Whether the engine's io_uring is restricted ([`IoEngine::ring_restricted`]).
    pub fn engine_ring_restricted(&self) -> Option<bool> {
        self.engine.ring_restricted()
    }

    /// Validate `request` and start it, the safe way: the cookie owns the guest memory the request's segments
    /// name ([`OwnsGuestMemory`]), and the queue keeps the cookie until the request comes out of
    /// [`drain`](BlockQueue::drain), so the memory stays mapped for as long as the I/O may touch it. Otherwise as
    /// [`submit`](BlockQueue::submit).
    pub fn submit_owned(&mut self, request: &Request, cookie: C) -> Result<(), C>
    where
        C: OwnsGuestMemory,
    {
        let mem: *const C::Memory = cookie.guest_memory();
        // SAFETY: `OwnsGuestMemory` promises the memory does not move with the cookie and stays mapped while the
        // cookie lives; the queue holds the cookie until the request is drained (or hands it back at once).
        unsafe { self.submit(request, &*mem, cookie) }
    }

    /// Validate `request` and start it. Requests that fail validation (or need no I/O, like GET_ID) finish at
    /// once and come out of the next [`drain`](BlockQueue::drain). Returns the cookie back if no slot is free.
    /// Prefer [`submit_owned`](BlockQueue::submit_owned), whose cookie owns the memory.
    ///
    /// # Safety
    /// The guest memory that `request`'s segments name in `mem` must stay mapped, and must not be unmapped or
    /// reused, until this request's cookie has come out of [`drain`](BlockQueue::drain). Transports keep a
    /// reference to the mapping (vhost-user: the memory snapshot; Xen: the grant mapping) in the cookie or slot.
    pub unsafe fn submit<M: GuestMemoryBackend>(&mut self, request: &Request, mem: &M, cookie: C) -> Result<(), C> {
        let Some(&index) = self.free.last() else {
            return Err(cookie);
        };
        let range = match request.validate(self.geometry()) {
            Ok(range) => range,
            Err(error) => {
                self.finish_now(request.kind, cookie, Err(error));
                return Ok(());
            }
        };
        if request.kind == RequestKind::GetId {
            let result = self.write_serial(request, mem);
            self.finish_now(request.kind, cookie, result);
            return Ok(());
        }
        let slot_index = index as usize;
        let slot = &mut self.slots[slot_index];
        slot.iovecs.clear();
        slot.reads.clear();
        if slot.iovecs.capacity() == 0 {
            // The slot's first request (whatever its kind: the slot serves any kind later).
            slot.iovecs.reserve(SLOT_ROOM);
            if self.log_reads {
                slot.reads.reserve(SLOT_ROOM);
            }
        }
        if self.log_reads && request.kind == RequestKind::Read {
            // Copied, not allocated once warm: the slot's vector keeps its capacity.
            slot.reads.extend_from_slice(&request.segments);
        }
        if request.kind.has_data() {
            if let Err(error) = resolve_segments(request, mem, self.buffer_alignment, &mut slot.iovecs) {
                self.finish_now(request.kind, cookie, Err(error));
                return Ok(());
            }
        }
        let op = match request.kind {
            RequestKind::Read => IoOp::Read { offset: range.offset, iovecs: &slot.iovecs },
            RequestKind::Write => IoOp::Write { offset: range.offset, iovecs: &slot.iovecs },
            RequestKind::Flush => IoOp::Flush,
            RequestKind::Discard { secure } => IoOp::Discard { offset: range.offset, len: range.len, secure },
            RequestKind::WriteZeroes { unmap } => IoOp::WriteZeroes { offset: range.offset, len: range.len, unmap },
            RequestKind::GetId => return Err(cookie), // handled above
        };
        // SAFETY: the iovecs point into `mem`, which the caller keeps mapped until the cookie is drained; the
        // iovec array lives in the slot, untouched until the slot is freed in `drain`.
        match unsafe { self.engine.enqueue(op, u64::from(index)) } {
            Ok(()) => {
                let started = match self.batch_started {
                    Some(at) => at,
                    None => {
                        let now = self.round_now();
                        *self.batch_started.insert(now)
                    }
                };
                let slot = &mut self.slots[slot_index];
                slot.cookie = Some(cookie);
                slot.expected = if request.kind.has_data() { range.len } else { 0 };
                slot.kind = request.kind;
                slot.started = started;
                self.stats.started();
                self.free.pop();
                self.unsubmitted = true;
                Ok(())
            }
            Err(EngineError::Full(_)) => Err(cookie),
            Err(error) => {
                tracing::warn!(%error, "engine refused a request");
                self.finish_now(request.kind, cookie, Err(RequestError::Io { errno: libc::EIO }));
                Ok(())
            }
        }
    }

    /// Start a round of the caller's event loop: until [`end_round`](BlockQueue::end_round), the submissions and
    /// drains share one clock read for their latency figures (made at the first that needs it), instead of one
    /// per submitted batch and one per drain. In a Xen PV domain, with no vDSO clock, each read is a system call.
    /// A round is meant to be short (one look at the work, no sleeping in between): a latency measured inside it
    /// is off by at most the round's length.
    pub fn begin_round(&mut self) {
        self.round = Some(None);
    }

    /// End the round [`begin_round`](BlockQueue::begin_round) started: later submissions and drains read the
    /// clock again.
    pub fn end_round(&mut self) {
        self.round = None;
    }

    /// Now, from the round's clock read if there is a round (made now if it is the round's first).
    fn round_now(&mut self) -> Instant {
        match &mut self.round {
            Some(Some(at)) => *at,
            Some(none) => *none.insert(Instant::now()),
            None => Instant::now(),
        }
    }

    /// Submit everything started since the last call to the kernel, in one batch (the engine's own "kick";
    /// not to be confused with a guest's notification, which transports call a kick).
    pub fn submit_batch(&mut self) -> Result<(), EngineError> {
        self.batch_started = None;
        if self.unsubmitted {
            self.unsubmitted = false;
            self.engine.submit()?;
        }
        Ok(())
    }

    /// Hand every finished request to `on_finished`: immediate ones first, then the engine's completions.
    /// Clears the completion eventfd.
    ///
    /// Marks nothing dirty: for guest memory without a dirty bitmap (a Xen grant mapping, `GuestMemoryMmap<()>`).
    /// With a bitmap, use [`drain_logged`](BlockQueue::drain_logged).
    pub fn drain(&mut self, on_finished: impl FnMut(Finished<C>)) {
        self.drain_with::<GuestMemoryMmap<()>>(true, None, on_finished);
    }

    /// Like [`drain`](BlockQueue::drain), but leave the completion eventfd alone (see
    /// [`IoEngine::reap_ready`]): for pollers, and for event handlers other than the completion eventfd's own,
    /// which then need no system call when nothing has finished.
    pub fn drain_ready(&mut self, on_finished: impl FnMut(Finished<C>)) {
        self.drain_with::<GuestMemoryMmap<()>>(false, None, on_finished);
    }

    /// Like [`drain`](BlockQueue::drain) (or [`drain_ready`](BlockQueue::drain_ready) if `clear` is false), and
    /// mark the guest pages each completed read wrote dirty in the bitmap of its memory, `mem_of(&cookie)`,
    /// before `on_finished` sees it. The queue must have been built with [`log_reads`](Self::log_reads). Everything else the device writes into guest memory (the GET_ID string,
    /// through [`Bytes`]; the transport's status byte and used ring) goes through `vm-memory`, which marks it.
    ///
    /// # Why at completion, not at submission
    /// The engine writes the data with the guest's pages resolved to host pointers, behind the bitmap's back, at
    /// some moment between submission and completion. A migrating VMM copies the pages whose bit is set and
    /// clears the bit, pass after pass, until the last pass with the device stopped (for vhost-user, after
    /// `GET_VRING_BASE`, which waits for every request in flight). Marking only at submission (where
    /// cloud-hypervisor's block device marks) is not enough: a pass between submission and the data landing
    /// copies the stale page and clears the bit, and nothing sets it again. Marking here, after the engine reported the
    /// data written and before the used ring tells the guest, is right in every case: a pass before this mark
    /// sees the bit again on the next pass (the page is copied once more, with the data), and the last pass
    /// comes after every in-flight request has been drained, so after every mark. Reads that failed or came
    /// short are marked too: the kernel may have written part of the buffer.
    ///
    /// Cost: per completed read, one `get_slices` walk and one `mark_dirty` per segment; with a `()` bitmap this
    /// compiles to the region look-up alone.
    pub fn drain_logged<M: GuestMemoryBackend>(
        &mut self,
        clear: bool,
        mem_of: fn(&C) -> &M,
        on_finished: impl FnMut(Finished<C>),
    ) {
        debug_assert!(self.log_reads, "drain_logged on a queue built without log_reads: no read is marked");
        self.drain_with(clear, Some(mem_of), on_finished);
    }

    /// Whether a drain may hand out something now, judged without a system call where the engine can.
    pub fn has_finished(&mut self) -> bool {
        !self.ready.is_empty() || (self.in_flight() > 0 && self.engine.has_completions())
    }

    /// Clear the completion eventfd before sleeping on it; then check [`has_finished`](BlockQueue::has_finished)
    /// once more, as a completion may have come in between.
    pub fn clear_completion_signal(&mut self) {
        self.engine.clear_completion_signal();
    }

    fn drain_with<M: GuestMemoryBackend>(
        &mut self,
        clear: bool,
        mem_of: Option<fn(&C) -> &M>,
        mut on_finished: impl FnMut(Finished<C>),
    ) {
        while let Some(f) = self.ready.pop_front() {
            on_finished(f);
        }
        let slots = &mut self.slots;
        let free = &mut self.free;
        let stats = &self.stats;
        // Requests reaped together share their end time (one clock read per drain, see `batch_started`; or the
        // round's, see `begin_round`).
        let mut reaped_at: Option<Instant> = self.round.flatten();
        let mut on_complete = |Completion { token, result }| {
            let Some(slot) = usize::try_from(token).ok().and_then(|i| slots.get_mut(i)) else {
                tracing::error!(token, "engine returned an unknown token");
                return;
            };
            let Some(cookie) = slot.cookie.take() else {
                tracing::error!(token, "engine completed a free slot");
                return;
            };
            let outcome = match result {
                Ok(done) if done >= slot.expected => Ok(slot.expected),
                Ok(done) => Err(RequestError::ShortTransfer { done, wanted: slot.expected }),
                Err(errno) => Err(RequestError::Io { errno }),
            };
            let to_guest = if slot.kind == RequestKind::Read { slot.expected } else { 0 };
            if let (RequestKind::Read, Some(mem_of)) = (slot.kind, mem_of) {
                mark_dirty(mem_of(&cookie), &slot.reads);
            }
            // `token` came from a u32 slot index.
            free.push(u32::try_from(token).unwrap_or(0));
            let done = finished(cookie, outcome.map(|_| to_guest));
            let latency = reaped_at.get_or_insert_with(Instant::now).saturating_duration_since(slot.started);
            stats.finished(slot.kind, latency, slot.expected, done.status, done.error.as_ref());
            on_finished(done);
        };
        if clear {
            self.engine.reap(&mut on_complete);
        } else {
            self.engine.reap_ready(&mut on_complete);
        }
        if let (Some(round), Some(at)) = (self.round.as_mut(), reaped_at) {
            round.get_or_insert(at);
        }
    }

    fn finish_now(&mut self, kind: RequestKind, cookie: C, result: Result<u64, RequestError>) {
        let done = finished(cookie, result);
        let bytes = u64::from(done.bytes_to_guest);
        self.stats.finished(kind, std::time::Duration::ZERO, bytes, done.status, done.error.as_ref());
        self.ready.push_back(done);
    }

    fn write_serial<M: GuestMemoryBackend>(&self, request: &Request, mem: &M) -> Result<u64, RequestError> {
        let mut written = 0usize;
        for seg in &request.segments {
            if written == ID_BYTES {
                break;
            }
            let n = (seg.len as usize).min(ID_BYTES - written);
            mem.write_slice(&self.serial[written..written + n], seg.addr)
                .map_err(|_| RequestError::GuestMemory { addr: seg.addr.0, len: n as u64 })?;
            written += n;
        }
        Ok(written as u64)
    }
}

fn finished<C>(cookie: C, result: Result<u64, RequestError>) -> Finished<C> {
    match result {
        Ok(bytes) => Finished {
            cookie,
            status: Status::Ok,
            bytes_to_guest: u32::try_from(bytes).unwrap_or(u32::MAX),
            error: None,
        },
        Err(error) => Finished { cookie, status: error.status(), bytes_to_guest: 0, error: Some(error) },
    }
}

/// Mark the pages of `segments` dirty in `mem`'s bitmap. A segment (or the part of it) no longer in guest memory
/// is skipped: there is no page to log.
fn mark_dirty<M: GuestMemoryBackend>(mem: &M, segments: &[Segment]) {
    for seg in segments {
        for slice in mem.get_slices(seg.addr, seg.len as usize).map_while(Result::ok) {
            slice.bitmap().mark_dirty(0, slice.len());
        }
    }
}

/// Turn a request's guest segments into host iovecs, splitting at memory-region boundaries, and check the buffer
/// alignment direct I/O needs (`align`) and the system-call limit of [`IOV_MAX`] iovecs. Pieces that follow each
/// other in host memory (consecutive segments on consecutive pages of one mapping) become one iovec: the kernel
/// takes the pages of direct I/O one iovec at a time, with a page-table walk (and, for pages it cannot pin the
/// fast way, such as Xen grant mappings, the memory-map lock) per iovec.
fn resolve_segments<M: GuestMemoryBackend>(
    request: &Request,
    mem: &M,
    align: usize,
    out: &mut Vec<libc::iovec>,
) -> Result<(), RequestError> {
    for seg in &request.segments {
        let bad = || RequestError::GuestMemory { addr: seg.addr.0, len: u64::from(seg.len) };
        let mut guest_addr = seg.addr.0;
        for slice in mem.get_slices(seg.addr, seg.len as usize) {
            let slice = slice.map_err(|_| bad())?;
            let ptr = slice.ptr_guard_mut().as_ptr();
            if (ptr as usize) % align != 0 {
                let align = u32::try_from(align).unwrap_or(u32::MAX);
                // Name the guest's address (the host address means nothing to whoever reads the log).
                return Err(RequestError::Misaligned { what: "guest buffer address", value: guest_addr, align });
            }
            guest_addr = guest_addr.wrapping_add(slice.len() as u64);
            if let Some(last) = out.last_mut().filter(|v| (v.iov_base as usize).wrapping_add(v.iov_len) == ptr as usize)
            {
                // Both pieces are valid for the access: one iovec covers exactly the two.
                last.iov_len += slice.len();
                continue;
            }
            if out.len() == IOV_MAX {
                return Err(RequestError::TooManySegments { count: IOV_MAX + 1, max: IOV_MAX });
            }
            out.push(libc::iovec { iov_base: ptr.cast(), iov_len: slice.len() });
        }
    }
    Ok(())
}
