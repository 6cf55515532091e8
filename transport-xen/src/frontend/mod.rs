// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The guest side of the emulated Xen host (feature `test-utils`): a blkfront emulator that performs Linux
//! blkfront's handshake and I/O over real grants and event channels, and the toolstack's part (libxl and the
//! `block` hotplug script) that creates vbds.

pub mod bed;
pub mod blkfront;
pub mod handshake;
pub mod load;
pub mod queue;
pub mod toolstack;
pub mod wait;

pub use bed::BackendThread;
pub use blkfront::{Blkfront, BlkfrontConfig};
pub use handshake::{BackendInfo, BackendLimits, FrontError, Publication, PublishedRing};
pub use queue::{Completion, Indirect, IoRequest, QueueFeatures, QueueIo};
pub use toolstack::{frontend_path, DiskSpec, Toolstack, XVDA};
pub use wait::{wait_for, wait_for_value, WaitError};
