// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Transport-neutral block device core.
//!
//! A guest's ring (a virtqueue or a Xen blkif ring) is parsed by its transport into a [`Request`] whose data
//! segments are addresses in a `vm-memory` [`GuestMemoryBackend`](vm_memory::GuestMemoryBackend). The request is
//! validated once against the [`Geometry`] of the open [`Disk`], handed to a [`BlockQueue`], which resolves the
//! segments into host buffers and submits them to an [`IoEngine`] (io_uring, or synchronous `preadv`/`pwritev`).
//! Completions come back with the transport's cookie and a [`Status`], which the transport turns into its own
//! response. The core knows nothing of the transport.
//!
//! # Embedding in a VMM
//!
//! A VMM that has its own virtqueue or ring code needs only the core: open the disk, give each queue a
//! [`BlockQueue`] with its own engine, hand it parsed requests, and answer what comes out of `drain`.
//!
//! ```
//! use std::sync::Arc;
//! use device_blk::{BlockQueue, Disk, DiskOptions, EngineKind, OwnsGuestMemory, Request, RequestKind, Sector, Segment, Status};
//! use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
//!
//! // What travels with a request: the VMM's id for it, and the guest memory it names (kept mapped by the `Arc`).
//! struct Cookie {
//!     id: u16,
//!     mem: Arc<GuestMemoryMmap>,
//! }
//! // SAFETY: the memory lives behind the cookie's `Arc`, mapped as long as the `Arc` lives.
//! unsafe impl OwnsGuestMemory for Cookie {
//!     type Memory = GuestMemoryMmap;
//!     fn guest_memory(&self) -> &GuestMemoryMmap {
//!         &self.mem
//!     }
//! }
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = tempfile::tempdir()?;
//! # let path = dir.path().join("disk.img");
//! # std::fs::write(&path, vec![0u8; 1 << 20])?;
//! // The disk (a file or a block device; pin a block device with `expected_diskseq`).
//! let disk = Arc::new(Disk::open(&path, &DiskOptions::default())?);
//! // One queue: an io_uring engine (or the synchronous fallback) with room for 32 requests in flight.
//! let engine = EngineKind::Auto.build(disk.clone(), 32)?;
//! let mut queue: BlockQueue<Cookie> = BlockQueue::new(*disk.geometry(), *b"my-vmm-disk-0\0\0\0\0\0\0\0", engine);
//!
//! // Guest memory as the VMM maps it; the guest put "hello" in a 4 KiB buffer at 0x1000.
//! let mem = Arc::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)])?);
//! mem.write_slice(b"hello", GuestAddress(0x1000))?;
//!
//! // The transport parses its ring into a reused `Request` (here: write 4 KiB at sector 8), with its own cookie.
//! let mut request = Request::with_capacity();
//! request.reset(RequestKind::Write, Sector(8));
//! request.segments.push(Segment { addr: GuestAddress(0x1000), len: 4096 });
//! // The cookie owns the memory: no `unsafe` at the call.
//! queue.submit_owned(&request, Cookie { id: 7, mem: mem.clone() }).map_err(|_| "queue full")?;
//! queue.submit_batch()?; // one submission for everything started since the last batch
//!
//! // The VMM's event loop polls `queue.completion_fd()`; here we just wait for the one completion.
//! let mut done = Vec::new();
//! while done.is_empty() {
//!     queue.drain(|finished| done.push((finished.cookie.id, finished.status)));
//! }
//! assert_eq!(done, [(7, Status::Ok)]);
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

pub mod disk;
pub mod engine;
pub mod geometry;
pub mod queue;
pub mod request;
pub mod stats;
pub mod units;
pub mod virtio;

pub use disk::{Disk, DiskError, DiskKind, DiskOptions, SizeChange};
pub use engine::{Completion, EngineError, EngineKind, IoEngine, IoOp};
pub use geometry::Geometry;
pub use queue::{BlockQueue, Finished, OwnsGuestMemory};
pub use request::{DiskRange, Request, RequestError, RequestKind, Segment, Status, ID_BYTES, MAX_SEGMENTS};
pub use units::{BlockSize, Sector, SECTOR_SIZE};

/// Longest adaptive polling time (µs) a transport's I/O thread may spin for completions before it sleeps: beyond a
/// second, polling is just a busy loop.
pub const MAX_POLL_US: u32 = 1_000_000;
