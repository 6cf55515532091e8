// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The xenbus side of the block backend: the per-vbd state machine that negotiates with the frontend through
//! xenstore, the parsers for every node it reads, and the supervisor that runs one state machine per vbd.
//!
//! The data plane is injected through [`RingServer`], so the control plane runs unchanged over the real
//! `Dataplane` and in tests.

pub mod backend;
pub mod cleanup;
pub mod dataplane_server;
pub mod device;
pub mod frontend_nodes;
pub mod nodes;
pub mod rings;
pub mod state;
pub mod supervisor;

pub use backend::{BackendConfig, Phase, VbdBackend, VbdStatus, VDISK_CDROM, VDISK_READONLY, VDISK_REMOVABLE};
pub use cleanup::{close_all_vbds, close_vbd, close_vbd_failing_io, Cleanup};
pub use dataplane_server::DataplaneServer;
pub use device::{DeviceSource, Fatal};
pub use rings::{RingServer, RunningRings};
pub use state::{VbdId, VbdPaths, XenbusState};
pub use supervisor::{ResizeHandle, Scope, StopHandle, XenBackend};
