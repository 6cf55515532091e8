// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The data plane: serve a connected frontend's rings on a disk.
//!
//! [`Dataplane::start`] maps each queue's ring, binds its event channel, builds its I/O engine, and spawns one
//! worker thread per queue, or hands the queue to an I/O thread pool ([`DataplaneOptions::io_threads`], see
//! [`IoThreads`]: a bounded set of threads serving the rings of every data plane of the process, one bounded
//! round per ring per pass; each thread's rings share one io_uring, whatever their disks, and its submissions go
//! out once per pass). A worker runs an epoll loop over the event channel, the engine's completion eventfd
//! and a stop eventfd. Per round it consumes the available requests, at most a ring's worth (copy out once, decode
//! and check the copy, bind the data pages, submit to `device-blk`'s `BlockQueue`), kicks the engine once, drains
//! completions into responses, releases their pages, and publishes the responses with at most one notification
//! per batch, as ring.h's `RING_PUSH_RESPONSES_AND_CHECK_NOTIFY` and `RING_FINAL_CHECK_FOR_REQUESTS` require.
//! A round that used its whole budget goes back to the event loop, which looks at its events without waiting and
//! starts the next round at once: however fast a frontend queues requests, the stop request is seen within a
//! round, so [`Dataplane::stop`] does not depend on the guest.
//!
//! Flush and barrier semantics:
//! - `FLUSH_DISKCACHE` without data: `fdatasync` (every write completed before it is durable when it completes).
//! - `FLUSH_DISKCACHE` with data (Linux blkfront's FUA/preflush writes): the write, then `fdatasync`; the response
//!   comes after both, so the data and every earlier completed write are durable.
//! - `WRITE_BARRIER`: nothing more is consumed from the ring until it completes; it waits until every earlier
//!   request of its queue has completed, then `fdatasync`, then its write (if it carries data). The completion
//!   that releases a held barrier submits it in the same batch: nothing else may come to do it.
//!
//! A ring whose frontend publishes more than a ring's worth of requests is halted: nothing more is consumed from
//! it, requests in flight are still answered, and the [fatal channel](Dataplane::fatal_fd) tells the xenbus state
//! machine to write the `error` node and go Closing. [`Dataplane::stop`] drains in-flight I/O, answers it, answers
//! every request still queued on a ring that is not halted with `BLKIF_RSP_ERROR` (a frontend waits for an answer
//! to each request it queued: Linux blkfront's removal of the disk, on a detach during I/O, waits for them), unmaps
//! every grant (ring pages, persistent grants) and unbinds the event channels.

pub mod abandon;
mod mapped_ring;
mod pool;
mod signals;
mod slot;
mod worker;

pub use pool::{IoThreads, MAX_IO_THREADS, MAX_SPARE_SLOTS};

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use device_blk::engine::{IoEngine, UringLane};
use device_blk::{BlockQueue, Disk, EngineError, EngineKind, ID_BYTES, MAX_SEGMENTS};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::blkif::{BlkifLayout, RingError, MAX_DIRECT_SEGMENTS, X86_32, X86_64};
use crate::connect::{BlkifAbi, ConnectConfig, QueueRing, MAX_INDIRECT_SEGMENTS, MAX_QUEUES, MAX_RING_PAGE_ORDER};
use crate::grant_memory::{BouncePool, GrantMode, MAX_PERSISTENT_GRANTS};
use device_blk::stats::Registry;

use crate::dataplane::mapped_ring::MappedRing;
use crate::services::{EventChannel, EventChannelOpener, GrantTable, MapAccess, XenError};
use worker::{QueueSetup, WorkerConfig};

/// How the data plane serves its queues: `DataplaneOptions::default()`, then set the fields (new fields may
/// come, so it is built only that way outside this crate).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct DataplaneOptions {
    /// Map grants or grant-copy through a bounce pool.
    pub grant_mode: GrantMode,
    /// Most requests in flight per queue (also capped by the ring size).
    pub max_in_flight: u32,
    /// Persistent grants kept mapped per queue when the frontend uses `feature-persistent`.
    pub persistent_grants_limit: usize,
    /// Pages of each queue's bounce pool (copy mode, and map mode for a frontend without persistent grants).
    pub bounce_pages: usize,
    /// We advertised `discard-secure` = 1 (else secure discards are answered `EOPNOTSUPP`).
    pub discard_secure: bool,
    /// Where each queue's counters and latency histograms are registered for the control socket.
    pub stats: Option<Arc<Registry>>,
    /// In map mode, grant-copy the data of a frontend that does not use persistent grants instead of mapping each
    /// request's grants. In a PV dom0 Linux's gntdev unmaps asynchronously (after the last page reference is
    /// gone), so a response can reach the frontend while its grants are still mapped, and Linux blkfront then
    /// disables the device ("backed has not unmapped grant"). Persistent grants are not affected (blkfront
    /// expects them to stay mapped).
    pub copy_without_persistent: bool,
    /// Run on each queue's worker thread before it serves (e.g. to drop the thread's capabilities and install a
    /// system call filter); a worker whose hook fails reports a fatal error and does not serve.
    pub worker_init: Option<WorkerInit>,
    /// Applied to each queue's I/O engine once built (e.g. fault injection in tests).
    pub engine_wrapper: Option<device_blk::engine::EngineWrapper>,
    /// Where there is a bounce pool, register it with the I/O engine (io_uring fixed buffers, where the kernel has
    /// fixed vectored I/O) so that reads and writes skip the per-request page pinning.
    pub register_bounce_pool: bool,
    /// Adaptive polling: after a round that took or answered requests, each worker keeps looking at its ring and
    /// its completions, with the frontend's notifications turned off, until nothing happened for this many
    /// microseconds; then it sleeps until the next event. 0: never poll. At most [`MAX_POLL_US`].
    pub poll_us: u32,
    /// Serve the rings on this bounded set of I/O threads, shared by every data plane started with (a clone of)
    /// it, several rings per thread, instead of one thread per ring. `worker_init` then runs once per pool thread
    /// (with the thread's index), and a polling period ends after `poll_us` even while its ring keeps it busy.
    pub io_threads: Option<IoThreads>,
}

/// The longest polling time [`DataplaneOptions::poll_us`] takes (the same bound as vhost-user's).
pub const MAX_POLL_US: u32 = device_blk::MAX_POLL_US;

/// A hook run on each data-plane worker thread before it serves, with the queue index.
#[derive(Clone)]
pub struct WorkerInit(Arc<dyn Fn(usize) -> std::io::Result<()> + Send + Sync>);

impl WorkerInit {
    /// Wrap `hook`.
    pub fn new(hook: impl Fn(usize) -> std::io::Result<()> + Send + Sync + 'static) -> Self {
        WorkerInit(Arc::new(hook))
    }

    /// Run the hook for queue `queue` on the calling thread.
    pub fn run(&self, queue: usize) -> std::io::Result<()> {
        (self.0)(queue)
    }
}

impl std::fmt::Debug for WorkerInit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WorkerInit")
    }
}

impl Default for DataplaneOptions {
    fn default() -> Self {
        DataplaneOptions {
            grant_mode: GrantMode::Map,
            max_in_flight: 512,
            persistent_grants_limit: MAX_PERSISTENT_GRANTS,
            bounce_pages: 4096,
            discard_secure: false,
            stats: None,
            copy_without_persistent: false,
            worker_init: None,
            engine_wrapper: None,
            register_bounce_pool: true,
            poll_us: 0,
            io_threads: None,
        }
    }
}

impl DataplaneOptions {
    /// The grant mode a connection uses, given whether the frontend uses persistent grants.
    pub fn effective_mode(&self, persistent_grants: bool) -> GrantMode {
        match self.grant_mode {
            GrantMode::Map if self.copy_without_persistent && !persistent_grants => GrantMode::Copy,
            mode => mode,
        }
    }
}

/// Why the data plane could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataplaneError {
    /// The connection parameters are unusable.
    #[error("invalid connection parameters: {0}")]
    Config(String),
    /// A ring's grant refs would not map.
    #[error("queue {queue}: cannot map the ring ({pages} pages): {cause}")]
    MapRing {
        /// Queue index.
        queue: usize,
        /// Ring pages.
        pages: usize,
        /// Cause.
        cause: XenError,
    },
    /// The mapped ring is unusable.
    #[error("queue {queue}: {cause}")]
    Ring {
        /// Queue index.
        queue: usize,
        /// Cause.
        cause: RingError,
    },
    /// The event channel would not open or bind.
    #[error("queue {queue}: cannot bind event channel port {remote_port}: {cause}")]
    Evtchn {
        /// Queue index.
        queue: usize,
        /// The frontend's port.
        remote_port: u32,
        /// Cause.
        cause: XenError,
    },
    /// The I/O engine could not be built.
    #[error("queue {queue}: cannot set up the I/O engine: {cause}")]
    Engine {
        /// Queue index.
        queue: usize,
        /// Cause.
        cause: EngineError,
    },
    /// Another system resource failed (eventfd, epoll, bounce pool, thread).
    #[error("queue {queue}: {what}: {cause}")]
    Io {
        /// Queue index.
        queue: usize,
        /// What failed.
        what: &'static str,
        /// Cause.
        cause: std::io::Error,
    },
}

/// Counters of one queue, updated by its worker (relaxed atomics: for stats, not synchronisation).
#[derive(Debug, Default)]
pub struct QueueStats {
    /// Requests consumed from the ring.
    pub requests: AtomicU64,
    /// Responses written.
    pub responses: AtomicU64,
    /// Responses with a status other than `BLKIF_RSP_OKAY`.
    pub errors: AtomicU64,
    /// Bytes read from the disk into guest memory.
    pub read_bytes: AtomicU64,
    /// Bytes written from guest memory to the disk.
    pub write_bytes: AtomicU64,
    /// Events sent to the frontend.
    pub notifications: AtomicU64,
    /// Event-loop wake-ups.
    pub wakeups: AtomicU64,
    /// Engine submissions (one per batch).
    pub kicks: AtomicU64,
    /// Events that found no request after several such in a row, whose unmask was therefore delayed (a frontend
    /// notifying without queueing: an event storm).
    pub spurious_delays: AtomicU64,
    /// Polling periods started (`poll_us` > 0: after a round that did work).
    pub poll_periods: AtomicU64,
    /// Requests taken while polling, with no event from the frontend.
    pub polled_requests: AtomicU64,
    /// The ring was halted on hostile input.
    pub halted: AtomicBool,
}

impl QueueStats {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// A counter's value.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// Where workers report fatal errors (a halted ring, a dead worker).
#[derive(Debug)]
pub(crate) struct FatalState {
    eventfd: EventFd,
    message: Mutex<Option<String>>,
    halted: AtomicBool,
}

impl FatalState {
    pub(crate) fn report(&self, message: String) {
        tracing::error!(%message, "data plane: fatal error");
        let mut m = self.message.lock().unwrap_or_else(PoisonError::into_inner);
        if m.is_none() {
            *m = Some(message);
        }
        self.halted.store(true, Ordering::SeqCst);
        let _ = self.eventfd.write(1);
    }
}

#[derive(Debug)]
struct QueueHandle {
    engine: &'static str,
    signals: Arc<signals::QueueSignals>,
    /// The queue's own worker thread, or (on an I/O thread pool) its ring as handed to the pool thread.
    thread: Option<JoinHandle<()>>,
    handed: Option<pool::Handed>,
    stats: Arc<QueueStats>,
}

/// A running data plane: one worker thread per queue, or its queues on an I/O thread pool. Dropping it stops it.
#[derive(Debug)]
pub struct Dataplane {
    queues: Vec<QueueHandle>,
    fatal: Arc<FatalState>,
    engine: &'static str,
}

fn check_config(config: &ConnectConfig) -> Result<(), DataplaneError> {
    let bad = |m: String| Err(DataplaneError::Config(m));
    if config.queues.is_empty() || config.queues.len() > MAX_QUEUES as usize {
        return bad(format!("{} queues (1..={MAX_QUEUES} supported)", config.queues.len()));
    }
    for (i, q) in config.queues.iter().enumerate() {
        let n = q.ring_refs.len();
        if n == 0 || !n.is_power_of_two() || n > 1 << MAX_RING_PAGE_ORDER {
            return bad(format!("queue {i}: {n} ring pages (a power of two up to {})", 1 << MAX_RING_PAGE_ORDER));
        }
    }
    if config.max_indirect_segments > MAX_INDIRECT_SEGMENTS {
        return bad(format!("{} indirect segments (at most {MAX_INDIRECT_SEGMENTS})", config.max_indirect_segments));
    }
    Ok(())
}

impl Dataplane {
    /// Serve `config`'s queues on `disk`: map every ring, bind every event channel and start one worker per queue.
    /// Errors say which queue and what failed; nothing stays mapped or bound after an error.
    pub fn start<G, O>(
        disk: Arc<Disk>,
        engine: EngineKind,
        grants: Arc<G>,
        evtchn: &O,
        config: &ConnectConfig,
        options: &DataplaneOptions,
    ) -> Result<Dataplane, DataplaneError>
    where
        G: GrantTable + 'static,
        O: EventChannelOpener,
    {
        check_config(config)?;
        let fatal = Arc::new(FatalState {
            eventfd: EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(|source| DataplaneError::Io {
                queue: 0,
                what: "eventfd",
                cause: source,
            })?,
            message: Mutex::new(None),
            halted: AtomicBool::new(false),
        });
        let mut dp = Dataplane { queues: Vec::with_capacity(config.queues.len()), fatal, engine: "none" };
        for (index, ring) in config.queues.iter().enumerate() {
            let handle = match config.abi {
                BlkifAbi::X86_64 => {
                    dp.start_queue::<X86_64, G, O>(index, ring, &disk, engine, &grants, evtchn, config, options)
                }
                BlkifAbi::X86_32 => {
                    dp.start_queue::<X86_32, G, O>(index, ring, &disk, engine, &grants, evtchn, config, options)
                }
            }?;
            dp.engine = handle.engine;
            dp.queues.push(handle);
        }
        tracing::info!(
            domid = config.frontend_domid, queues = config.queues.len(), abi = ?config.abi,
            persistent = config.persistent_grants, mode = ?options.effective_mode(config.persistent_grants),
            engine = dp.engine, "data plane started"
        );
        Ok(dp)
    }

    #[allow(clippy::too_many_arguments)]
    fn start_queue<L, G, O>(
        &self,
        index: usize,
        ring: &QueueRing,
        disk: &Arc<Disk>,
        engine: EngineKind,
        grants: &Arc<G>,
        evtchn: &O,
        config: &ConnectConfig,
        options: &DataplaneOptions,
    ) -> Result<QueueHandle, DataplaneError>
    where
        L: BlkifLayout,
        G: GrantTable + 'static,
        O: EventChannelOpener,
    {
        let domid = config.frontend_domid;
        let pages = ring.ring_refs.len();
        let ring_mapping = grants
            .map(domid, &ring.ring_refs, MapAccess::ReadWrite)
            .map_err(|source| DataplaneError::MapRing { queue: index, pages, cause: source })?;
        let back = MappedRing::<L, G::Mapping>::attach(ring_mapping)
            .map_err(|source| DataplaneError::Ring { queue: index, cause: source })?;
        let evtchn_err = |source| DataplaneError::Evtchn { queue: index, remote_port: ring.remote_port, cause: source };
        let mut channel = evtchn.open().map_err(evtchn_err)?;
        let port = channel.bind_interdomain(domid, ring.remote_port).map_err(evtchn_err)?;
        let depth = back.size().min(options.max_in_flight.max(1));
        let max_indirect = (config.max_indirect_segments as usize).min(MAX_SEGMENTS);
        let mode = options.effective_mode(config.persistent_grants);
        let spawn_error = |source| DataplaneError::Io { queue: index, what: "spawn worker", cause: source };
        // On an I/O thread pool, the queue's engine is a lane of its thread's io_uring where it can be.
        let seat = match &options.io_threads {
            Some(pool) => Some(pool.seat(options.worker_init.as_ref()).map_err(spawn_error)?),
            None => None,
        };
        let lane = seat.as_ref().filter(|_| engine != EngineKind::Sync).and_then(|s| s.engine(disk.clone(), depth));
        let thread_ring = lane.as_ref().map(UringLane::shared_ring);
        // A nearly full thread ring may give the lane less than asked for: the queue takes no more than that.
        let depth = lane.as_ref().map_or(depth, |lane| u32::try_from(lane.capacity()).unwrap_or(depth).min(depth));
        // Copy mode does its I/O on a bounce pool; so does map mode for a frontend without persistent grants,
        // which revokes each grant once answered (`SegmentMapper::new` says why the I/O must not use the mapping).
        let pool = match (mode, config.persistent_grants) {
            (GrantMode::Map, true) => None,
            // Room for at least one request of the largest size, or it could never start; no more than the
            // requests in flight can use.
            _ => {
                let largest = max_indirect.max(MAX_DIRECT_SEGMENTS);
                let pages = options.bounce_pages.min((depth as usize).saturating_mul(largest)).max(largest);
                Some(BouncePool::new(pages).map_err(|source| DataplaneError::Io {
                    queue: index,
                    what: "bounce pool",
                    cause: source,
                })?)
            }
        };
        let mut io = match lane {
            Some(lane) => Box::new(lane) as Box<dyn IoEngine>,
            None => engine
                .build(disk.clone(), depth)
                .map_err(|source| DataplaneError::Engine { queue: index, cause: source })?,
        };
        if let Some(pool) = pool.as_ref().filter(|_| options.register_bounce_pool) {
            let (base, len) = pool.as_raw();
            // SAFETY: the pool moves into the worker with the engine, and the worker drops the engine first.
            let fixed = unsafe { io.register_buffer(base, len) };
            tracing::debug!(queue = index, fixed, "bounce pool offered to the engine as a registered buffer");
        }
        let io = match &options.engine_wrapper {
            Some(wrapper) => wrapper.wrap(io),
            None => io,
        };
        let queue = match seat.as_ref().filter(|_| options.stats.is_none()).and_then(pool::Seat::unreported_stats) {
            Some(stats) => BlockQueue::with_stats(*disk.geometry(), [0; ID_BYTES], io, stats),
            None => BlockQueue::new(*disk.geometry(), [0; ID_BYTES], io),
        }
        .follow_capacity(disk.capacity_handle());
        if let Some(registry) = &options.stats {
            let labels =
                vec![("transport", "xen".to_string()), ("domid", domid.to_string()), ("queue", index.to_string())];
            registry.register(labels, queue.stats());
        }
        let engine_name = queue.engine_name();
        let signals = Arc::new(signals::QueueSignals::new().map_err(|source| DataplaneError::Io {
            queue: index,
            what: "eventfd",
            cause: source,
        })?);
        let stats = Arc::new(QueueStats::default());
        let setup = QueueSetup::<L, G, O::Channel> {
            index,
            ring: back,
            evtchn: channel,
            port,
            queue,
            pool,
            grants: grants.clone(),
            domid,
            config: WorkerConfig {
                depth: depth as usize,
                max_indirect,
                mode,
                persistent: config.persistent_grants.then_some(options.persistent_grants_limit),
                discard_secure: options.discard_secure,
                poll: std::time::Duration::from_micros(u64::from(options.poll_us.min(MAX_POLL_US))),
                shared: options.io_threads.is_some(),
            },
            signals: signals.clone(),
            fatal: self.fatal.clone(),
            stats: stats.clone(),
            init: options.worker_init.clone(),
            thread_ring,
            spares: seat.as_ref().and_then(pool::Seat::spare_slots),
        };
        // The worker logs inside the caller's span (the vbd) with its queue number.
        let span = tracing::info_span!("queue", queue = index);
        if let Some(seat) = seat {
            let setup = QueueSetup { init: None, ..setup };
            let ring: pool::NewRing = Box::new(move || span.in_scope(|| worker::task(setup)));
            let handed = seat.hand_over(ring);
            return Ok(QueueHandle { signals, thread: None, handed, stats, engine: engine_name });
        }
        let thread = std::thread::Builder::new()
            .name(format!("blkif-d{domid}-q{index}"))
            .spawn(move || span.in_scope(|| worker::run(setup)))
            .map_err(spawn_error)?;
        Ok(QueueHandle { signals, thread: Some(thread), handed: None, stats, engine: engine_name })
    }

    /// The I/O engine the queues use (`io_uring`, or `sync` where io_uring is unavailable).
    pub fn engine(&self) -> &'static str {
        self.engine
    }

    /// Number of queues.
    pub fn queues(&self) -> usize {
        self.queues.len()
    }

    /// Notify the frontend on every queue once, whatever its event indexes say; serving goes on.
    ///
    /// For a frontend that is closing: Linux blkfront stops its block queues, marks the disk dead and goes Closed,
    /// and a request the block layer handed over in between waits in a stopped queue. Only an event from the
    /// backend restarts those queues (its interrupt handler does); the request is then dispatched (to the ring, or
    /// ended by the guest for the dead disk). Its `del_gendisk` at removal waits for every request: one never
    /// dispatched hangs the guest's xenwatch. So the control plane kicks a closing frontend and keeps serving until
    /// the rings are quiet ([`activity`]).
    ///
    /// [`activity`]: Self::activity
    pub fn kick(&self) {
        for q in &self.queues {
            q.signals.request_kick();
        }
    }

    /// Requests taken plus responses written on every queue so far: unchanged while the rings are quiet.
    pub fn activity(&self) -> u64 {
        self.queues.iter().map(|q| QueueStats::get(&q.stats.requests) + QueueStats::get(&q.stats.responses)).sum()
    }

    /// Counters of queue `queue` (they stay readable after [`stop`](Self::stop)).
    pub fn stats(&self, queue: usize) -> Option<Arc<QueueStats>> {
        self.queues.get(queue).map(|q| q.stats.clone())
    }

    /// A descriptor that becomes readable when a ring halted or a worker died.
    pub fn fatal_fd(&self) -> RawFd {
        self.fatal.eventfd.as_raw_fd()
    }

    /// The first fatal error, if any (for the `error` node).
    pub fn fatal_error(&self) -> Option<String> {
        self.fatal.message.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Take the first fatal error (and clear the fatal fd); later calls return `None`.
    pub fn take_fatal(&self) -> Option<String> {
        let _ = self.fatal.eventfd.read();
        self.fatal.message.lock().unwrap_or_else(PoisonError::into_inner).take()
    }

    /// Whether a ring halted (or a worker died).
    pub fn halted(&self) -> bool {
        self.fatal.halted.load(Ordering::SeqCst)
    }

    /// Stop: every worker stops consuming, waits for its in-flight I/O, answers it, unmaps every grant and
    /// unbinds its event channel; then the threads are joined.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        // (Not again for queues already stopped: `stop` shuts down, then `drop` comes here once more.)
        for q in self.queues.iter().filter(|q| q.thread.is_some() || q.handed.is_some()) {
            q.signals.request_stop();
        }
        for q in &mut self.queues {
            if let Some(t) = q.thread.take() {
                if t.join().is_err() {
                    tracing::error!("data plane worker panicked");
                }
            }
            if let Some(handed) = q.handed.take() {
                // Returns once the pool thread dropped the worker and freed it.
                handed.wait_released();
            }
        }
    }
}

impl Drop for Dataplane {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_mode_copies_for_a_frontend_without_persistent_grants_when_asked() {
        let auto = DataplaneOptions { copy_without_persistent: true, ..DataplaneOptions::default() };
        assert_eq!(auto.effective_mode(true), GrantMode::Map);
        assert_eq!(auto.effective_mode(false), GrantMode::Copy);
        let map = DataplaneOptions::default();
        assert_eq!((map.effective_mode(true), map.effective_mode(false)), (GrantMode::Map, GrantMode::Map));
        let copy = DataplaneOptions { grant_mode: GrantMode::Copy, copy_without_persistent: true, ..map };
        assert_eq!((copy.effective_mode(true), copy.effective_mode(false)), (GrantMode::Copy, GrantMode::Copy));
    }
}
