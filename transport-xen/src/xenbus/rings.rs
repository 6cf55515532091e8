// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The control plane's view of the data plane: start serving a connected frontend's rings, learn when a ring
//! halted, stop. Injected into the state machine so it runs with the real `Dataplane` or any other server.

use std::os::fd::RawFd;
use std::sync::Arc;

use device_blk::Disk;

use crate::connect::ConnectConfig;
use crate::xenbus::device::Fatal;

/// Starts the data plane for a connected vbd.
pub trait RingServer: Send + Sync {
    /// Map the rings of `config`, bind their event channels and start serving requests on `disk`.
    ///
    /// Errors become the vbd's `error` node (and state Closing), so they should say what failed (a grant that
    /// would not map, a port that would not bind).
    fn start(&self, disk: Arc<Disk>, config: &ConnectConfig) -> Result<Box<dyn RunningRings>, Fatal>;
}

/// A running data plane for one vbd.
pub trait RunningRings: Send {
    /// A descriptor that becomes readable when a ring halted on a fatal error (the supervisor polls it).
    fn fatal_fd(&self) -> Option<RawFd>;

    /// Why a ring halted, if one did.
    fn fatal_error(&self) -> Option<String>;

    /// Notify the frontend on every ring once, whatever its event indexes say; serving goes on (a closing Linux
    /// blkfront dispatches the requests it held back only after an event from the backend).
    fn kick(&self) {}

    /// Requests taken plus responses written so far: unchanged while the rings are quiet. A server that cannot
    /// tell says 0 (always quiet).
    fn activity(&self) -> u64 {
        0
    }

    /// Stop serving: drain in-flight I/O, answer every request, unmap every grant, unbind every port.
    fn stop(self: Box<Self>);
}
