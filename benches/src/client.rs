// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A vhost-user-blk load generator: the same client (virtio-driver's vhost-user front end) drives every server.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use virtio_driver::{VhostUser, VirtioBlkQueue, VirtioBlkTransport, VirtioFeatureFlags};

use device_blk::stats::LatencyHistogram;

/// What one run does.
#[derive(Clone, Copy, Debug)]
pub struct Workload {
    /// Short name for the table.
    pub name: &'static str,
    /// Reads (true) or writes.
    pub read: bool,
    /// Random (true) or sequential offsets.
    pub random: bool,
    /// Bytes per request.
    pub block_size: usize,
    /// Requests in flight per queue.
    pub queue_depth: usize,
}

/// What one run measured.
#[derive(Debug, Default)]
pub struct Measured {
    /// Completed requests.
    pub ios: u64,
    /// Wall time of the measurement.
    pub elapsed: Duration,
    /// Completion latencies.
    pub latency: LatencyHistogram,
    /// Requests that came back with an error.
    pub errors: u64,
}

impl Measured {
    /// Requests per second.
    pub fn iops(&self) -> f64 {
        self.ios as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Connect to `socket` with `queues` queues and run `workload` for `duration` on a disk of `disk_bytes`.
pub fn run(socket: &str, queues: usize, workload: Workload, duration: Duration, disk_bytes: u64) -> Result<Measured> {
    run_and_hold(socket, queues, workload, duration, disk_bytes, &mut || Ok(()))
}

/// [`run`], then call `hold` while still connected (an idle frontend, e.g. to sample the server's memory).
pub fn run_and_hold(
    socket: &str,
    queues: usize,
    workload: Workload,
    duration: Duration,
    disk_bytes: u64,
    hold: &mut dyn FnMut() -> Result<()>,
) -> Result<Measured> {
    let features = VirtioFeatureFlags::VERSION_1.bits()
        | virtio_driver::VirtioBlkFeatureFlags::MQ.bits()
        | virtio_driver::VirtioBlkFeatureFlags::FLUSH.bits()
        | virtio_driver::VirtioBlkFeatureFlags::SEG_MAX.bits()
        | virtio_driver::VirtioBlkFeatureFlags::BLK_SIZE.bits();
    let vhost = VhostUser::new(socket, features).with_context(|| format!("connecting to {socket}"))?;
    let transport: Arc<RwLock<Box<VirtioBlkTransport>>> = Arc::new(RwLock::new(Box::new(vhost)));
    // Each request takes three descriptors (header, data, status); 256 is what VMMs use.
    let queue_size: u16 = 256;

    // Buffers live in one memfd the server maps, `queue_depth` per queue.
    let per_queue = workload.block_size * workload.queue_depth;
    let total = per_queue * queues;
    let memfd = memfd(total)?;
    // SAFETY: mapping a fresh memfd of `total` bytes shared; unmapped when `Mapping` drops.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            total,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            memfd.as_raw_fd(),
            0,
        )
    };
    if base == libc::MAP_FAILED {
        bail!("mmap of the buffer memfd: {}", std::io::Error::last_os_error());
    }
    let _mapping = Mapping { addr: base, len: total };
    let mut guard = transport.write().map_err(|_| anyhow::anyhow!("transport lock poisoned"))?;
    let vqs =
        VirtioBlkQueue::<(usize, Instant)>::setup_queues(&mut **guard, queues, queue_size).context("setup_queues")?;
    guard.map_mem_region(base as usize, total, memfd.as_raw_fd(), 0).context("map_mem_region")?;
    let completion_fds: Vec<_> = (0..queues).map(|q| guard.get_completion_fd(q)).collect();
    let notifiers: Vec<_> = (0..queues).map(|q| guard.get_submission_notifier(q)).collect();
    drop(guard);

    let blocks = disk_bytes / workload.block_size as u64;
    let results: Vec<Result<Measured>> = std::thread::scope(|s| {
        let handles: Vec<_> = vqs
            .into_iter()
            .enumerate()
            .map(|(q, vq)| {
                let notifier = &notifiers[q];
                let done_fd = completion_fds[q].clone();
                let buf_base = base as usize + q * per_queue;
                s.spawn(move || drive_queue(vq, &**notifier, &done_fd, buf_base, workload, blocks, duration, q as u64))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("client thread panicked"))))
            .collect()
    });
    let mut total_m = Measured::default();
    for r in results {
        let m = r?;
        total_m.ios += m.ios;
        total_m.errors += m.errors;
        total_m.elapsed = total_m.elapsed.max(m.elapsed);
        total_m.latency.merge(&m.latency);
    }
    hold()?;
    Ok(total_m)
}

#[allow(clippy::too_many_arguments)]
fn drive_queue(
    mut vq: VirtioBlkQueue<'_, (usize, Instant)>,
    notifier: &dyn virtio_driver::QueueNotifier,
    done_fd: &virtio_driver::EventFd,
    buf_base: usize,
    w: Workload,
    blocks: u64,
    duration: Duration,
    seed: u64,
) -> Result<Measured> {
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15 ^ (seed + 1).wrapping_mul(0x2545_F491_4F6C_DD1D));
    let mut next_seq = seed.wrapping_mul(blocks / 4 + 1) % blocks.max(1);
    let mut offset_for = |rng: &mut XorShift| -> u64 {
        let block = if w.random {
            rng.next() % blocks
        } else {
            next_seq = (next_seq + 1) % blocks;
            next_seq
        };
        block * w.block_size as u64
    };
    let mut m = Measured::default();
    let start = Instant::now();
    let mut in_flight = 0usize;
    let submit = |vq: &mut VirtioBlkQueue<'_, (usize, Instant)>, slot: usize, off: u64| -> Result<()> {
        let ptr = (buf_base + slot * w.block_size) as *mut u8;
        // SAFETY: slot `slot` of this queue's part of the mapped memfd; only one request uses it at a time.
        unsafe {
            if w.read {
                vq.read_raw(off, ptr, w.block_size, (slot, Instant::now()))?;
            } else {
                vq.write_raw(off, ptr, w.block_size, (slot, Instant::now()))?;
            }
        }
        Ok(())
    };
    for slot in 0..w.queue_depth {
        submit(&mut vq, slot, offset_for(&mut rng))?;
        in_flight += 1;
    }
    if avail_notif_needed(&mut vq) {
        notifier.notify()?;
    }
    let mut finished: Vec<(usize, Instant, i32)> = Vec::with_capacity(w.queue_depth);
    while in_flight > 0 {
        wait_readable(done_fd.as_raw_fd())?;
        let _ = done_fd.read();
        finished.clear();
        finished.extend(vq.completions().map(|c| (c.context.0, c.context.1, c.ret)));
        let now = Instant::now();
        let stop = now.duration_since(start) >= duration;
        for &(slot, issued, ret) in &finished {
            in_flight -= 1;
            m.ios += 1;
            if ret != 0 {
                m.errors += 1;
            }
            m.latency.record(now.duration_since(issued));
            if !stop {
                submit(&mut vq, slot, offset_for(&mut rng))?;
                in_flight += 1;
            }
        }
        if !finished.is_empty() && !stop && avail_notif_needed(&mut vq) {
            notifier.notify()?;
        }
    }
    m.elapsed = start.elapsed();
    Ok(m)
}

/// Whether the device wants a kick for what was just published. Without EVENT_IDX (this client does not
/// negotiate it) virtio-driver 0.6 reads the used ring's NO_NOTIFY flag with only an acquire load after its release
/// store of the avail index, so the CPU may read the flag before the index is visible: against a device that
/// polls (and so sets and clears NO_NOTIFY all the time) the client then skips a kick the device needs and waits
/// forever (seen with `blkbackd --poll-us` at QD1). The full fence is the `virtio_mb()` a Linux driver has there.
fn avail_notif_needed(vq: &mut VirtioBlkQueue<'_, (usize, Instant)>) -> bool {
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    vq.avail_notif_needed()
}

fn wait_readable(fd: i32) -> Result<()> {
    let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    loop {
        // SAFETY: one valid pollfd.
        let rc = unsafe { libc::poll(&mut pfd, 1, 10_000) };
        if rc > 0 {
            return Ok(());
        }
        if rc == 0 {
            bail!("no completion within 10 s: the server hangs");
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e.into());
        }
    }
}

fn memfd(len: usize) -> Result<OwnedFd> {
    // SAFETY: plain syscall with a valid C string.
    let fd = unsafe { libc::memfd_create(c"blkback-bench".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        bail!("memfd_create: {}", std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = libc::off_t::try_from(len).context("buffer size")?;
    // SAFETY: valid descriptor.
    if unsafe { libc::ftruncate(owned.as_raw_fd(), len) } < 0 {
        bail!("ftruncate: {}", std::io::Error::last_os_error());
    }
    Ok(owned)
}

struct Mapping {
    addr: *mut libc::c_void,
    len: usize,
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping was created by mmap with this address and length and is no longer used.
        unsafe { libc::munmap(self.addr, self.len) };
    }
}

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}
