// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The virtio-blk driver of the `virtio-driver` crate over its vhost-user transport, with guest RAM the test
//! controls and a queue-depth-limited batch runner.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::Arc;

use virtio_driver::{
    EventFd, QueueNotifier, VhostUser, VirtioBlkConfig, VirtioBlkFeatureFlags, VirtioBlkQueue, VirtioBlkReqBuf,
    VirtioFeatureFlags, VirtioTransport,
};

use super::memory::SharedMem;
use super::wait_readable;

/// One I/O of a batch. `at` is an offset in the client's [`SharedMem`].
#[derive(Clone, Debug)]
pub enum Op {
    /// Read `len` bytes at disk byte `offset` into guest RAM at `at`.
    Read { offset: u64, at: usize, len: usize },
    /// Write `len` bytes from guest RAM at `at` to disk byte `offset`.
    Write { offset: u64, at: usize, len: usize },
    /// Flush.
    Flush,
    /// Discard a byte range.
    Discard { offset: u64, len: u64 },
    /// Write zeroes to a byte range.
    WriteZeroes { offset: u64, len: u64, unmap: bool },
}

/// Every virtio-blk feature the driver may accept (what the device offers is what gets negotiated).
pub fn blk_features(event_idx: bool) -> u64 {
    let mut f = VirtioFeatureFlags::VERSION_1.bits() | VirtioBlkFeatureFlags::all().bits();
    if event_idx {
        f |= VirtioFeatureFlags::RING_EVENT_IDX.bits();
    }
    f
}

/// A connected virtio-blk driver.
pub struct BlkClient {
    // Field order is drop order: the queues live in memory the transport mapped.
    queues: Vec<VirtioBlkQueue<'static, usize>>,
    notifiers: Vec<Box<dyn QueueNotifier>>,
    calls: Vec<Arc<EventFd>>,
    transport: Box<VhostUser<VirtioBlkConfig, VirtioBlkReqBuf>>,
    /// Guest RAM for data buffers.
    pub mem: SharedMem,
    queue_size: u16,
}

impl BlkClient {
    /// Connect to `socket`, set up `queues` queues of `queue_size`, and map `mem_len` bytes of guest RAM.
    pub fn connect(socket: &Path, queues: usize, queue_size: u16, event_idx: bool, mem_len: usize) -> io::Result<Self> {
        let path = socket.to_str().expect("UTF-8 socket path");
        let mut transport =
            Box::new(VhostUser::<VirtioBlkConfig, VirtioBlkReqBuf>::new(path, blk_features(event_idx))?);
        let mut vqs = VirtioBlkQueue::<usize>::setup_queues(&mut *transport, queues, queue_size)?;
        for q in &mut vqs {
            // With EVENT_IDX the driver must publish used_event to be notified at all.
            q.set_used_notif_enabled(true);
        }
        let mem = SharedMem::new(mem_len)?;
        transport.map_mem_region(mem.addr(), mem.len(), mem.fd(), 0)?;
        let notifiers = (0..queues).map(|q| transport.get_submission_notifier(q)).collect();
        let calls = (0..queues).map(|q| transport.get_completion_fd(q)).collect();
        Ok(BlkClient { queues: vqs, notifiers, calls, transport, mem, queue_size })
    }

    /// The device configuration.
    pub fn config(&self) -> VirtioBlkConfig {
        self.transport.get_config().expect("GET_CONFIG")
    }

    /// The negotiated features.
    pub fn features(&self) -> u64 {
        self.transport.get_features()
    }

    /// Run one operation on queue 0 and return its result (0, or a negative errno).
    pub fn run_one(&mut self, op: Op) -> i32 {
        self.run(&[op], 1)[0]
    }

    /// Run `ops` with at most `depth` in flight, spread round-robin over the queues; each op's result is 0 or a
    /// negative errno (`-EIO` for `IOERR`, `-ENOTSUP` for `UNSUPP`).
    pub fn run(&mut self, ops: &[Op], depth: usize) -> Vec<i32> {
        let nq = self.queues.len();
        // A request takes at most three descriptors.
        let per_queue = usize::from(self.queue_size) / 3;
        let mut results: Vec<Option<i32>> = vec![None; ops.len()];
        let mut in_flight = vec![0usize; nq];
        let (mut next, mut done, mut turn) = (0usize, 0usize, 0usize);
        while done < ops.len() {
            let mut submitted = vec![false; nq];
            while next < ops.len() && in_flight.iter().sum::<usize>() < depth {
                let Some(q) = (0..nq).map(|i| (turn + i) % nq).find(|&q| in_flight[q] < per_queue) else {
                    break;
                };
                self.submit(q, &ops[next], next).expect("queue a request");
                in_flight[q] += 1;
                submitted[q] = true;
                next += 1;
                turn += 1;
            }
            for (q, _) in submitted.iter().enumerate().filter(|(_, s)| **s) {
                if self.queues[q].avail_notif_needed() {
                    self.notifiers[q].notify().expect("kick");
                }
            }
            let mut reaped = 0;
            for (q, queue) in self.queues.iter_mut().enumerate() {
                for c in queue.completions() {
                    assert!(results[c.context].replace(c.ret).is_none(), "request {} completed twice", c.context);
                    in_flight[q] -= 1;
                    reaped += 1;
                }
            }
            done += reaped;
            if reaped == 0 && done < ops.len() {
                let fds: Vec<RawFd> = self.calls.iter().map(|c| c.as_raw_fd()).collect();
                for ready in wait_readable(&fds) {
                    let _ = self.calls[ready].read();
                }
            }
        }
        results.into_iter().map(|r| r.expect("every request completed")).collect()
    }

    /// Queue `ops` on queue 0 (as many as fit) and kick, without waiting for anything: for tests that leave
    /// requests in flight. Returns how many were queued.
    pub fn start(&mut self, ops: &[Op]) -> usize {
        let fit = ops.len().min(usize::from(self.queue_size) / 3);
        for (i, op) in ops[..fit].iter().enumerate() {
            self.submit(0, op, i).expect("queue a request");
        }
        self.notifiers[0].notify().expect("kick");
        fit
    }

    /// Block until the device signals a completion on any queue.
    pub fn wait_for_completion(&mut self) {
        let fds: Vec<RawFd> = self.calls.iter().map(|c| c.as_raw_fd()).collect();
        for ready in wait_readable(&fds) {
            let _ = self.calls[ready].read();
        }
    }

    /// The completions available now, as `(index in the ops given to `start`, result)`.
    pub fn reap(&mut self) -> Vec<(usize, i32)> {
        self.queues.iter_mut().flat_map(|q| q.completions().map(|c| (c.context, c.ret)).collect::<Vec<_>>()).collect()
    }

    fn submit(&mut self, q: usize, op: &Op, context: usize) -> io::Result<()> {
        let queue = &mut self.queues[q];
        match *op {
            Op::Read { offset, at, len } => {
                let ptr = self.mem.bytes_mut(at..at + len).as_mut_ptr();
                // SAFETY: the buffer is in mapped guest RAM that outlives the request (the client owns both).
                unsafe { queue.read_raw(offset, ptr, len, context) }
            }
            Op::Write { offset, at, len } => {
                let ptr = self.mem.bytes(at..at + len).as_ptr();
                // SAFETY: as above.
                unsafe { queue.write_raw(offset, ptr, len, context) }
            }
            Op::Flush => queue.flush(context),
            Op::Discard { offset, len } => queue.discard(offset, len, context),
            Op::WriteZeroes { offset, len, unmap } => queue.write_zeroes(offset, len, unmap, context),
        }
    }
}
