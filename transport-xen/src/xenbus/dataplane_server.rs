// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The real data plane ([`Dataplane`]) behind the control plane's [`RingServer`] seam.

use std::os::fd::RawFd;
use std::sync::Arc;

use device_blk::{Disk, EngineKind};

use crate::connect::ConnectConfig;
use crate::dataplane::{Dataplane, DataplaneError, DataplaneOptions};
use crate::services::{EventChannelOpener, GrantTable, XenError};
use crate::xenbus::device::Fatal;
use crate::xenbus::rings::{RingServer, RunningRings};

/// The real data plane ([`Dataplane`]) as a [`RingServer`]: grant table, event-channel opener, engine and options
/// are fixed per process; each connect starts one `Dataplane` (one worker thread per queue).
pub struct DataplaneServer<G, O> {
    grants: Arc<G>,
    evtchn: O,
    engine: EngineKind,
    options: DataplaneOptions,
}

impl<G, O> std::fmt::Debug for DataplaneServer<G, O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataplaneServer").field("engine", &self.engine).field("options", &self.options).finish()
    }
}

impl<G: GrantTable + 'static, O: EventChannelOpener> DataplaneServer<G, O> {
    /// A server mapping grants through `grants` and binding ports through `evtchn`.
    pub fn new(grants: Arc<G>, evtchn: O, engine: EngineKind, options: DataplaneOptions) -> Self {
        DataplaneServer { grants, evtchn, engine, options }
    }
}

impl<G: GrantTable + 'static, O: EventChannelOpener> RingServer for DataplaneServer<G, O> {
    fn start(&self, disk: Arc<Disk>, config: &ConnectConfig) -> Result<Box<dyn RunningRings>, Fatal> {
        match Dataplane::start(disk, self.engine, self.grants.clone(), &self.evtchn, config, &self.options) {
            Ok(dataplane) => Ok(Box::new(dataplane)),
            Err(e) => Err(Fatal::new(dataplane_errno(&e), format!("connecting the rings: {e}"))),
        }
    }
}

/// The errno for a data plane that would not start (the cause's, where it has one).
fn dataplane_errno(e: &DataplaneError) -> i32 {
    let xen = |source: &XenError| match source {
        XenError::Os { errno, .. } => *errno,
        XenError::NotFound { .. } => libc::ENOENT,
        XenError::Access { .. } => libc::EACCES,
        _ => libc::EIO,
    };
    match e {
        DataplaneError::Config(_) | DataplaneError::Ring { .. } => libc::EINVAL,
        DataplaneError::MapRing { cause, .. } | DataplaneError::Evtchn { cause, .. } => xen(cause),
        DataplaneError::Io { cause, .. } => cause.raw_os_error().unwrap_or(libc::EIO),
        DataplaneError::Engine { .. } => libc::EIO,
    }
}

impl RunningRings for Dataplane {
    fn fatal_fd(&self) -> Option<RawFd> {
        Some(Dataplane::fatal_fd(self))
    }

    fn fatal_error(&self) -> Option<String> {
        Dataplane::fatal_error(self)
    }

    fn kick(&self) {
        Dataplane::kick(self);
    }

    fn activity(&self) -> u64 {
        Dataplane::activity(self)
    }

    fn stop(self: Box<Self>) {
        Dataplane::stop(*self);
    }
}
