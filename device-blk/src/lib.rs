//! Transport-neutral block device core.
//!
//! A guest's ring (a virtqueue or a Xen blkif ring) is parsed by its transport into a [`Request`] whose data
//! segments are addresses in a `vm-memory` [`GuestMemoryBackend`](vm_memory::GuestMemoryBackend). The request is
//! validated once against the [`Geometry`] of the open [`Disk`], handed to a [`BlockQueue`], which resolves the
//! segments into host buffers and submits them to an [`IoEngine`] (io_uring, or synchronous `preadv`/`pwritev`).
//! Completions come back with the transport's cookie and a [`Status`], which the transport turns into its own
//! response. The core knows nothing of the transport.

pub mod disk;
pub mod engine;
pub mod geometry;
pub mod queue;
pub mod request;
pub mod stats;
pub mod units;
pub mod vhost_user;
pub mod virtio;

pub use disk::{Disk, DiskError, DiskKind, DiskOptions};
pub use engine::{Completion, EngineError, EngineKind, IoEngine, IoOp};
pub use geometry::Geometry;
pub use queue::{BlockQueue, Finished};
pub use request::{DiskRange, Request, RequestError, RequestKind, Segment, Status, ID_BYTES, MAX_SEGMENTS};
pub use units::{BlockSize, Sector, SECTOR_SIZE};
pub use vhost_user::{Connection, VhostUserBlkBackend, VhostUserBlkOptions, VhostUserBlkServer};
