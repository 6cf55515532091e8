// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A backend process on the emulated host: a [`XenBackend`] over its own dom0 xenstore connection, driven by its
//! own thread as `blkbackd xen` drives it, stopped (gracefully) on drop.

use std::sync::Arc;
use std::thread::JoinHandle;

use crate::emulated::EmulatedHost;
use crate::services::XenError;
use crate::xenbus::{BackendConfig, RingServer, Scope, StopHandle, XenBackend};

/// A running backend.
#[derive(Debug)]
pub struct BackendThread {
    stop: StopHandle,
    thread: Option<JoinHandle<Result<(), XenError>>>,
}

impl BackendThread {
    /// Start a backend serving `scope` on `host` with `rings` as its data plane.
    pub fn spawn(
        host: &EmulatedHost,
        rings: Arc<dyn RingServer>,
        config: BackendConfig,
        scope: Scope,
    ) -> Result<BackendThread, XenError> {
        let store = Arc::new(host.xenstore()?);
        let mut backend = XenBackend::new(store, rings, config, scope)?;
        let stop = backend.stop_handle();
        let thread = std::thread::Builder::new()
            .name("blkback-xenbus".into())
            .spawn(move || backend.run())
            .map_err(|e| XenError::os("spawn the backend thread", &e))?;
        Ok(BackendThread { stop, thread: Some(thread) })
    }

    /// Stop the backend (data planes stopped, vbds Closed) and return how its loop ended.
    pub fn stop(mut self) -> Result<(), XenError> {
        self.join()
    }

    fn join(&mut self) -> Result<(), XenError> {
        self.stop.stop();
        match self.thread.take().map(JoinHandle::join) {
            None => Ok(()),
            Some(Ok(result)) => result,
            Some(Err(_)) => Err(XenError::Protocol { what: "backend", detail: "the backend thread panicked".into() }),
        }
    }
}

impl Drop for BackendThread {
    fn drop(&mut self) {
        if let Err(e) = self.join() {
            tracing::error!(error = %e, "backend thread");
        }
    }
}
