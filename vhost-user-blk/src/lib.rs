// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! vhost-user-blk over the [`device_blk`] core: the [`VhostUserBackend`] serving a [`Disk`], and a server that
//! accepts one frontend connection after another. The core knows nothing of vhost-user; this crate is the thin
//! adapter (virtqueues in, [`BlockQueue`](device_blk::BlockQueue) requests out), as `transport-xen` is for blkif.
//!
//! Threads: vhost-user-backend runs the protocol on one thread and vring worker threads, our I/O threads
//! ([`VhostUserBlkOptions::io_threads`] of them; queue `q` is served by thread `q % io_threads`, see
//! `threads`). Each I/O thread has one io_uring ([`SharedUring`](device_blk::engine::SharedUring)) whose lanes
//! are its queues' engines, submitted once per round for all of them, with one completion eventfd in the same
//! epoll as the kicks of all the thread's queues. A queue's worker owns its [`BlockQueue`](device_blk::BlockQueue)
//! and lane, created on its thread at the first kick, so one thread does all of a queue's work with no locking
//! shared between threads on the data path (the per-queue mutex is only ever contended by `GET_VRING_BASE` and
//! teardown, which wait for in-flight requests).
//!
//! Every connection gets a fresh backend and fresh workers ([`VhostUserBlkServer::accept`]); when the frontend
//! leaves, in-flight requests are finished and answered before the workers stop ([`Connection::wait`]). The disk's
//! growth is served and announced to the frontend ([`ResizeHandle`]); with the frontend's dirty log, every write
//! into guest memory is logged ([`DirtyBitmap`]).

#![warn(missing_docs)]

mod config_change;
mod dirty;
mod poll;
mod server;
mod threads;
mod worker;

pub use config_change::ChannelError;
pub use dirty::DirtyBitmap;
pub use server::{Connection, ResizeHandle, ResizeOutcome, ServeError, VhostUserBlkServer};
pub use threads::IO_THREAD_NAME;
pub use worker::{AtomicGuestMemory, BlkVring, GuestMemory};

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError, RwLock};
use std::time::Duration;

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::Backend;
use vhost_user_backend::{VhostUserBackend, VringEpollHandler};
use vm_memory::GuestMemoryAtomic;

use device_blk::stats::Registry;
use vmm_sys_util::epoll::EventSet;

use config_change::{BackendChannel, KnownSockets};
use device_blk::disk::Disk;
use device_blk::engine::{Batching, EngineKind, SharedUring};
use device_blk::request::ID_BYTES;
use device_blk::virtio::{device_features, seg_max_for, BlkConfig};
use threads::{Event, HandlerRegistrar, Layout, Registrar, ThreadSlot};
use worker::QueueWorker;

/// Most queues a device may have (vhost-user-backend maps queues to threads with a 64-bit mask).
pub const MAX_QUEUES: u16 = 64;
/// Largest queue size (the split virtqueue limit).
pub const MAX_QUEUE_SIZE: u16 = 32768;
/// Queue size when the user gives none.
pub const DEFAULT_QUEUE_SIZE: u16 = 256;
/// Longest adaptive polling time (µs): beyond a second, polling is just a busy loop.
pub use device_blk::MAX_POLL_US;

/// The epoll handler type of our backend's worker threads.
pub type BlkEpollHandler = VringEpollHandler<Arc<VhostUserBlkBackend>>;

/// How a disk is served over vhost-user-blk: [`VhostUserBlkOptions::new`], then set the fields (new fields may
/// come, so it is built only that way outside this crate).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct VhostUserBlkOptions {
    /// Request queues.
    pub num_queues: u16,
    /// I/O threads serving them (queue `q` by thread `q % io_threads`), at most `num_queues`. `None`:
    /// [`default_io_threads`].
    pub io_threads: Option<u16>,
    /// Largest queue size the frontend may set (a power of two).
    pub queue_size: u16,
    /// Most requests in flight per queue (the engine's depth); further chains wait in the avail ring until
    /// completions make room. `None`: the queue size, so that a full ring never waits.
    pub io_depth: Option<u32>,
    /// The I/O engine of each queue.
    pub engine: EngineKind,
    /// How each queue's engine submits a batch (default: [`Batching::Auto`]: unplugged, which keeps the guest's
    /// request boundaries, where requests reach a block layer; whole for a file in memory).
    pub batching: Batching,
    /// The GET_ID answer.
    pub serial: [u8; ID_BYTES],
    /// Where each queue's counters and latency histograms are registered for the control socket.
    pub stats: Option<Arc<Registry>>,
    /// Adaptive polling: after a kick or a completion, a queue's worker keeps polling its avail ring and its
    /// engine's completions, with guest kicks disabled, until nothing has happened for this many microseconds;
    /// then it re-arms kicks and sleeps. 0 (the default): never poll.
    pub poll_us: u32,
    /// Applied to each queue's I/O engine once built (e.g. fault injection in tests).
    pub engine_wrapper: Option<device_blk::engine::EngineWrapper>,
}

impl VhostUserBlkOptions {
    /// One queue of [`DEFAULT_QUEUE_SIZE`] with the default engine, answering GET_ID with `serial`.
    pub fn new(serial: [u8; ID_BYTES]) -> Self {
        VhostUserBlkOptions {
            num_queues: 1,
            io_threads: None,
            queue_size: DEFAULT_QUEUE_SIZE,
            io_depth: None,
            engine: EngineKind::default(),
            batching: Batching::Auto,
            serial,
            stats: None,
            poll_us: 0,
            engine_wrapper: None,
        }
    }

    /// Check the limits.
    pub fn validate(&self) -> Result<(), OptionsError> {
        if !(1..=MAX_QUEUES).contains(&self.num_queues) {
            return Err(OptionsError::Queues(self.num_queues));
        }
        if !self.queue_size.is_power_of_two() || !(4..=MAX_QUEUE_SIZE).contains(&self.queue_size) {
            return Err(OptionsError::QueueSize(self.queue_size));
        }
        if let Some(threads) = self.io_threads {
            if !(1..=self.num_queues).contains(&threads) {
                return Err(OptionsError::IoThreads { threads, queues: self.num_queues });
            }
        }
        if self.io_depth == Some(0) {
            return Err(OptionsError::IoDepth);
        }
        if self.poll_us > MAX_POLL_US {
            return Err(OptionsError::PollUs(self.poll_us));
        }
        Ok(())
    }

    /// I/O threads serving the queues.
    pub fn effective_io_threads(&self) -> u16 {
        self.io_threads.unwrap_or_else(|| default_io_threads(self.num_queues))
    }

    /// Requests in flight per queue.
    pub fn effective_io_depth(&self) -> u32 {
        self.io_depth.unwrap_or(u32::from(self.queue_size))
    }
}

/// Options out of range.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OptionsError {
    /// Queue count out of range.
    #[error("{0} queues requested; between 1 and {max} are supported", max = MAX_QUEUES)]
    Queues(u16),
    /// Queue size out of range.
    #[error("queue size {0} is not a power of two between 4 and {max}", max = MAX_QUEUE_SIZE)]
    QueueSize(u16),
    /// An I/O thread count out of range.
    #[error("{threads} I/O threads requested for {queues} queues; between 1 and the number of queues are supported")]
    IoThreads {
        /// Threads requested.
        threads: u16,
        /// Queues.
        queues: u16,
    },
    /// An I/O depth of zero.
    #[error("the I/O depth must be at least 1")]
    IoDepth,
    /// A polling time out of range.
    #[error("a polling time of {0} µs is more than {max} µs", max = MAX_POLL_US)]
    PollUs(u32),
}

/// I/O threads when none are asked for: one, serving every queue (as qemu-storage-daemon's single iothread does).
/// Measured (docs/performance.md, 2026-12-04): CPU per I/O grows with the number of threads, since a thread that
/// serves fewer queues wakes for a smaller share of the I/O and spends more of its time going to sleep and waking
/// up (8 queues, 4k random read QD32: 3.1 µs per I/O with one thread, 3.6 with two, 4.5 with four, 4.9 with
/// eight), while IOPS stayed the same or better with one thread. One thread's ceiling is a CPU's worth of I/O
/// (about 300k IOPS at 3 µs each); past that, give `io_threads` explicitly.
pub fn default_io_threads(queues: u16) -> u16 {
    DEFAULT_IO_THREADS.min(queues.max(1))
}

/// See [`default_io_threads`].
pub const DEFAULT_IO_THREADS: u16 = 1;

/// A queue's worker and what others use to wait for it.
struct QueueSlot {
    worker: Mutex<Option<QueueWorker>>,
    /// Signalled when the worker has nothing in flight and someone waits (`waiters > 0`).
    idle: Condvar,
    waiters: AtomicUsize,
}

impl QueueSlot {
    fn lock(&self) -> MutexGuard<'_, Option<QueueWorker>> {
        self.worker.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Block until the queue has no request in flight. Requests are never abandoned: while the disk is slow
    /// this waits, saying so every few seconds.
    fn wait_idle(&self, index: usize) {
        // Count ourselves before taking the lock: a polling worker sees it and lets go of the lock.
        self.waiters.fetch_add(1, Ordering::SeqCst);
        let mut guard = self.lock();
        loop {
            let in_flight = guard.as_ref().map_or(0, QueueWorker::in_flight);
            if in_flight == 0 {
                break;
            }
            let (g, timeout) =
                self.idle.wait_timeout(guard, Duration::from_secs(5)).unwrap_or_else(PoisonError::into_inner);
            guard = g;
            if timeout.timed_out() {
                tracing::warn!(queue = index, in_flight, "still waiting for in-flight requests to complete");
            }
        }
        self.waiters.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The io_uring of each I/O thread `options` call for, made now so that the threads of every later connection
/// serve on them (one connection after another): a process that then forbids itself new rings (`blkbackd
/// vhost-user` does, because the system call filter cannot see what a ring does) keeps io_uring. Empty for the
/// synchronous engine, or where the kernel refuses (each thread then makes its own, or each queue an engine).
pub fn thread_rings(disk: &Arc<Disk>, options: &VhostUserBlkOptions) -> Vec<SharedUring> {
    if options.engine == EngineKind::Sync {
        return Vec::new();
    }
    let layout = Layout { queues: options.num_queues, threads: options.effective_io_threads() };
    let depth = options.effective_io_depth();
    let batching = options.batching.for_disk(disk);
    let rings: Result<Vec<_>, _> = (0..layout.threads)
        .map(|t| SharedUring::portable(Arc::clone(disk), layout.queues_of(t).len(), depth, batching))
        .collect();
    rings.unwrap_or_else(|error| {
        tracing::debug!(%error, "no io_uring made in advance; each connection's threads make their own");
        Vec::new()
    })
}

/// The vhost-user-blk device of one frontend connection.
pub struct VhostUserBlkBackend {
    disk: Arc<Disk>,
    options: VhostUserBlkOptions,
    config: BlkConfig,
    features: u64,
    seg_max: usize,
    mem: RwLock<AtomicGuestMemory>,
    queues: Vec<QueueSlot>,
    layout: Layout,
    threads: Vec<ThreadSlot>,
    registrars: OnceLock<Vec<Box<dyn Registrar>>>,
    /// Set by [`shutdown`](Self::shutdown): kicks are ignored, no chain is popped any more.
    stopping: AtomicBool,
    /// The unnamed socket pairs the process had before the frontend connected (to tell its channel apart).
    known_sockets: KnownSockets,
    /// The frontend's channel for back-end requests (config-change messages), once given and identified.
    backend_channel: Mutex<Result<BackendChannel, ChannelError>>,
}

impl std::fmt::Debug for VhostUserBlkBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserBlkBackend")
            .field("disk", &self.disk.path())
            .field("options", &self.options)
            .field("io_threads", &self.layout.threads)
            .field("features", &format_args!("{:#x}", self.features))
            .finish()
    }
}

impl VhostUserBlkBackend {
    /// A device for `disk`; `options` must have passed [`VhostUserBlkOptions::validate`].
    pub fn new(disk: Arc<Disk>, options: VhostUserBlkOptions) -> io::Result<Self> {
        Self::with_rings(disk, options, Vec::new())
    }

    /// As [`new`](Self::new), with the io_uring of each I/O thread made in advance ([`thread_rings`]; a thread
    /// without one makes its own).
    pub fn with_rings(disk: Arc<Disk>, options: VhostUserBlkOptions, rings: Vec<SharedUring>) -> io::Result<Self> {
        options.validate().map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        // `Batching::Auto` is resolved here (a system call), not on the I/O threads, which may be sandboxed.
        let options = VhostUserBlkOptions { batching: options.batching.for_disk(&disk), ..options };
        let geometry = *disk.geometry();
        let seg_max = seg_max_for(options.queue_size);
        let queues = (0..options.num_queues)
            .map(|_| QueueSlot { worker: Mutex::new(None), idle: Condvar::new(), waiters: AtomicUsize::new(0) })
            .collect();
        let layout = Layout { queues: options.num_queues, threads: options.effective_io_threads() };
        let mut rings = rings.into_iter();
        let threads = (0..layout.threads)
            .map(|t| ThreadSlot::new(layout.queues_of(t), rings.next()))
            .collect::<io::Result<Vec<_>>>()?;
        Ok(VhostUserBlkBackend {
            config: BlkConfig::new(&geometry, options.num_queues, seg_max),
            // LOG_ALL: we log our writes to guest memory (and the used ring) once the frontend gives us a log
            // (frontends refuse to migrate a VM whose device lacks it).
            features: device_features(&geometry)
                | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
                | VhostUserVirtioFeatures::LOG_ALL.bits(),
            seg_max: seg_max as usize,
            mem: RwLock::new(GuestMemoryAtomic::new(GuestMemory::new())),
            disk,
            options,
            queues,
            layout,
            threads,
            registrars: OnceLock::new(),
            stopping: AtomicBool::new(false),
            known_sockets: KnownSockets::now(),
            backend_channel: Mutex::new(Err(ChannelError::NotGiven)),
        })
    }

    /// The guest memory handle to give `VhostUserDaemon::new` (the one the handler updates).
    pub fn guest_memory(&self) -> AtomicGuestMemory {
        self.mem.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// The device configuration, with the disk's capacity as it is now (it grows with the disk).
    pub fn config(&self) -> BlkConfig {
        BlkConfig { capacity: self.disk.capacity().0, ..self.config }
    }

    /// Tell the frontend that the configuration changed (the disk grew): it reads the configuration space again
    /// and interrupts the guest, whose driver reads the new capacity. Fails when the frontend gave no back-end
    /// request channel or it broke; the frontend then sees the new size when it next reads the configuration
    /// (at the latest when it reconnects).
    pub fn announce_config_change(&self) -> Result<(), ChannelError> {
        let channel = self.backend_channel.lock().unwrap_or_else(PoisonError::into_inner);
        match &*channel {
            Ok(channel) => channel.send_config_change(),
            Err(e) => Err(ChannelError::Unusable(e.to_string())),
        }
    }

    /// Hand over the daemon's epoll handlers (one per I/O thread), so that workers can register their engine's
    /// eventfds; registers each thread's exit eventfd, and has each thread name itself. Call once, before serving.
    pub fn attach(&self, handlers: &[Arc<BlkEpollHandler>]) -> io::Result<()> {
        let registrars =
            handlers.iter().map(|h| Box::new(HandlerRegistrar(Arc::downgrade(h))) as Box<dyn Registrar>).collect();
        self.attach_registrars(registrars)
    }

    fn attach_registrars(&self, registrars: Vec<Box<dyn Registrar>>) -> io::Result<()> {
        if registrars.len() != self.threads.len() {
            return Err(io::Error::other(format!(
                "{} epoll handlers for {} I/O threads",
                registrars.len(),
                self.threads.len()
            )));
        }
        let n = self.options.num_queues;
        for (thread, registrar) in self.threads.iter().zip(&registrars) {
            registrar.register(thread.exit.as_raw_fd(), EventSet::IN, Event::exit_id(n))?;
            registrar.register(thread.name.as_raw_fd(), EventSet::IN, Event::name_id(n))?;
            thread.name.write(1)?;
        }
        self.registrars.set(registrars).map_err(|_| io::Error::other("epoll handlers attached twice"))
    }

    /// Wait until no queue has a request in flight (each finished request answered to the guest).
    pub fn quiesce(&self) {
        for (index, slot) in self.queues.iter().enumerate() {
            slot.wait_idle(index);
        }
    }

    /// Stop taking requests, finish (and answer) those in flight, and end every I/O thread.
    pub fn shutdown(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.quiesce();
        for (index, thread) in self.threads.iter().enumerate() {
            if let Err(error) = thread.exit.write(1) {
                tracing::error!(thread = index, %error, "cannot stop the I/O thread");
            }
        }
    }

    /// The number of I/O threads.
    pub fn io_threads(&self) -> usize {
        self.threads.len()
    }

    /// Create queue `index`'s worker on the calling (I/O) thread, whose `local`th queue it is, and watch its
    /// completion and resume eventfds.
    fn start_worker(&self, index: usize, local: usize) -> io::Result<QueueWorker> {
        let o = &self.options;
        let thread = index % usize::from(self.layout.threads.max(1));
        let worker = QueueWorker::new(index, &self.disk, o, self.seg_max, self.thread_ring(thread).as_ref())
            .map_err(|e| io::Error::other(format!("queue {index}: cannot create the I/O engine: {e}")))?;
        let registrar = self
            .registrars
            .get()
            .and_then(|r| r.get(thread))
            .ok_or_else(|| io::Error::other(format!("queue {index}: no epoll handler attached")))?;
        // Edge-triggered: each completion signal wakes the worker once, and the worker need not read the eventfd
        // (one system call less per wake-up); a poller clears it before sleeping, so a signal it already served
        // is not reported again (epoll re-checks readiness before reporting).
        let events = EventSet::IN | EventSet::EDGE_TRIGGERED;
        let n = o.num_queues;
        if let Some(fd) = worker.own_completion_fd() {
            registrar.register(fd, events, Event::completion_id(n, local))?;
        }
        registrar.register(worker.resume_fd(), EventSet::IN, Event::resume_id(n, local))?;
        if let Some(registry) = &o.stats {
            registry.register(vec![("transport", "vhost-user".into()), ("queue", index.to_string())], worker.stats());
        }
        Ok(worker)
    }
}

impl VhostUserBackend for VhostUserBlkBackend {
    /// The crate's replaceable bitmap behind a cheap check ([`DirtyBitmap`]): `SET_LOG_BASE` points every
    /// region's bitmap at the frontend's log, and from then on every write into guest memory (read data, see
    /// [`BlockQueue::drain_logged`](device_blk::BlockQueue::drain_logged); status bytes, GET_ID strings and the used
    /// ring, through vm-memory) sets the bits of its pages.
    type Bitmap = DirtyBitmap;
    type Vring = BlkVring;

    fn num_queues(&self) -> usize {
        usize::from(self.options.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.options.queue_size)
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn acked_features(&self, features: u64) {
        tracing::debug!(features = format_args!("{features:#x}"), "frontend acknowledged features");
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::LOG_SHMFD
            | VhostUserProtocolFeatures::BACKEND_REQ
    }

    fn reset_device(&self) {
        self.quiesce();
    }

    fn set_event_idx(&self, enabled: bool) {
        // Each queue reads it from its `Queue` (vhost-user-backend sets it there too).
        tracing::debug!(enabled, "EVENT_IDX negotiated");
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.config().read(offset, size)
    }

    fn set_backend_req_fd(&self, handle: Backend) {
        let mut channel = self.backend_channel.lock().unwrap_or_else(PoisonError::into_inner);
        // A channel given earlier on this connection closes first, so that it is not taken for the new one.
        *channel = Err(ChannelError::NotGiven);
        *channel = BackendChannel::identify(handle, &self.known_sockets);
        match &*channel {
            Ok(c) => tracing::debug!(channel = ?c, "the frontend gave a back-end request channel"),
            Err(error) => tracing::warn!(%error, "the disk's growth cannot be announced to this frontend"),
        }
    }

    fn set_config(&self, _offset: u32, _buf: &[u8]) -> io::Result<()> {
        Err(io::Error::new(io::ErrorKind::PermissionDenied, "the virtio-blk configuration space is read-only"))
    }

    fn update_memory(&self, mem: AtomicGuestMemory) -> io::Result<()> {
        *self.mem.write().unwrap_or_else(PoisonError::into_inner) = mem;
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        self.layout.masks()
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        let index = queue_index as usize;
        match self.queues.get(index) {
            Some(slot) => slot.wait_idle(index),
            None => return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("no queue {queue_index}"))),
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[BlkVring],
        thread_id: usize,
    ) -> io::Result<()> {
        self.thread_event(device_event, vrings, thread_id)
    }
}
