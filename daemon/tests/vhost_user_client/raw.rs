// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A virtio-blk driver that builds arbitrary descriptor chains (including malformed ones) on a real split
//! virtqueue of `virtio-driver`, over its vhost-user transport.

use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;

use virtio_driver::virtqueue::{Virtqueue, VirtqueueLayout};
use virtio_driver::{iovec, EventFd, QueueNotifier, VhostUser, VirtioBlkConfig, VirtioFeatureFlags, VirtioTransport};

use super::blk::blk_features;
use super::memory::SharedMem;
use super::wait_readable;

/// What the status byte holds before the device writes it.
pub const UNTOUCHED: u8 = 0xff;

/// Per-request memory in the ring area (header, discard range, GET_ID buffer, status).
#[derive(Clone, Copy)]
#[repr(C, align(8))]
pub struct RawReq {
    header: [u8; 16],
    range: [u8; 16],
    id: [u8; 20],
    status: [u8; 4],
}

/// One descriptor of a chain to build.
#[derive(Clone, Copy, Debug)]
pub enum Desc {
    /// The first `len` bytes of the 16-byte header.
    Header { len: u32, writable: bool },
    /// The 16-byte discard/write-zeroes range; `len` may differ to build bad payloads (at most 16).
    Range { len: u32 },
    /// A data buffer in guest RAM.
    Data { at: usize, len: u32, writable: bool },
    /// A 20-byte buffer for GET_ID.
    Id,
    /// The status buffer: the status is its last byte (`len` at most 4).
    Status { len: u32, writable: bool },
}

/// How the device answered a chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// The status byte ([`UNTOUCHED`] if the device did not write it).
    pub status: u8,
    /// The used length the device reported.
    pub used_len: u32,
    /// The GET_ID buffer.
    pub id: [u8; 20],
}

/// A connected driver with one queue.
pub struct RawClient {
    vq: Virtqueue<'static, RawReq>,
    notifier: Box<dyn QueueNotifier>,
    call: Arc<EventFd>,
    transport: Box<VhostUser<VirtioBlkConfig, RawReq>>,
    /// Guest RAM for data buffers.
    pub mem: SharedMem,
    queue_size: u16,
    used_seen: usize,
}

impl RawClient {
    /// Connect to `socket` with one queue of 16 and `mem_len` bytes of guest RAM.
    pub fn connect(socket: &Path, mem_len: usize) -> io::Result<Self> {
        let queue_size = 16u16;
        let path = socket.to_str().expect("UTF-8 socket path");
        let mut transport = Box::new(VhostUser::<VirtioBlkConfig, RawReq>::new(path, blk_features(false))?);
        let features = VirtioFeatureFlags::from_bits_truncate(transport.get_features());
        let layout = VirtqueueLayout::new::<RawReq>(1, usize::from(queue_size), features)?;
        let ring = transport.alloc_queue_mem(&layout)?;
        // SAFETY: the ring memory is mapped by the transport, which this client owns and drops last.
        let ring: &'static mut [u8] = unsafe { std::slice::from_raw_parts_mut(ring.as_mut_ptr(), ring.len()) };
        let vq = Virtqueue::new(transport.iova_translator(), ring, queue_size, features)?;
        transport.setup_queues(std::slice::from_ref(&vq))?;
        let mem = SharedMem::new(mem_len)?;
        transport.map_mem_region(mem.addr(), mem.len(), mem.fd(), 0)?;
        let notifier = transport.get_submission_notifier(0);
        let call = transport.get_completion_fd(0);
        Ok(RawClient { vq, notifier, call, transport, mem, queue_size, used_seen: 0 })
    }

    /// The device configuration.
    pub fn config(&self) -> VirtioBlkConfig {
        self.transport.get_config().expect("GET_CONFIG")
    }

    /// Build a chain of `descs` for a request of `virtio_type` at `sector` (with `range` =
    /// `(sector, num_sectors, flags)` in the range buffer), submit it and wait for the answer.
    pub fn submit(&mut self, virtio_type: u32, sector: u64, range: Option<(u64, u32, u32)>, descs: &[Desc]) -> Outcome {
        let mem_base = self.mem.addr();
        let mut status_len = 1usize;
        self.vq
            .add_request(|req, add| {
                *req = RawReq { header: [0; 16], range: [0; 16], id: [0; 20], status: [UNTOUCHED; 4] };
                req.header[..4].copy_from_slice(&virtio_type.to_le_bytes());
                req.header[8..].copy_from_slice(&sector.to_le_bytes());
                if let Some((s, n, flags)) = range {
                    req.range[..8].copy_from_slice(&s.to_le_bytes());
                    req.range[8..12].copy_from_slice(&n.to_le_bytes());
                    req.range[12..].copy_from_slice(&flags.to_le_bytes());
                }
                for d in descs {
                    let (base, len, writable): (*mut u8, u32, bool) = match *d {
                        Desc::Header { len, writable } => (req.header.as_mut_ptr(), len.min(16), writable),
                        Desc::Range { len } => (req.range.as_mut_ptr(), len.min(16), false),
                        Desc::Data { at, len, writable } => ((mem_base + at) as *mut u8, len, writable),
                        Desc::Id => (req.id.as_mut_ptr(), 20, true),
                        Desc::Status { len, writable } => {
                            status_len = len.clamp(1, 4) as usize;
                            (req.status.as_mut_ptr(), len.min(4), writable)
                        }
                    };
                    add(iovec { iov_base: base.cast(), iov_len: len as usize }, writable)?;
                }
                Ok(())
            })
            .expect("queue the chain");
        if self.vq.avail_notif_needed() {
            self.notifier.notify().expect("kick");
        }
        loop {
            if let Some(c) = self.vq.completions().next() {
                // The device wrote the used element before publishing it, and the driver saw it published.
                let used_len = self.used_len_at(self.used_seen);
                self.used_seen += 1;
                return Outcome { status: c.req.status[status_len - 1], used_len, id: c.req.id };
            }
            for _ in wait_readable(&[self.call.as_raw_fd()]) {
                let _ = self.call.read();
            }
        }
    }

    /// The `len` field of used ring entry number `n` (counting from the connection's start).
    fn used_len_at(&self, n: usize) -> u32 {
        let slot = n % usize::from(self.queue_size);
        // `struct virtq_used`: le16 flags, le16 idx, then `struct virtq_used_elem { le32 id; le32 len; }`.
        let offset = 4 + 8 * slot + 4;
        // SAFETY: the used ring lies in the mapped ring memory, `queue_size` entries long; the read is of plain
        // bytes the device may be writing concurrently, hence volatile.
        let raw = unsafe { std::ptr::read_volatile(self.vq.device_area_ptr().add(offset).cast::<[u8; 4]>()) };
        u32::from_le_bytes(raw)
    }
}
