//! Serving a disk to one vhost-user frontend after another on a listening socket.

use std::sync::Arc;

use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{Error as DaemonError, ShutdownHandle, VhostUserDaemon};

use super::{OptionsError, VhostUserBlkBackend, VhostUserBlkOptions};
use crate::disk::Disk;

/// A vhost-user failure, with the library's message (its error type carries no `std::error::Error`).
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Creating the device, its threads or its epoll registrations failed.
    #[error("cannot set up the vhost-user device: {0}")]
    Setup(String),
    /// Accepting a connection failed.
    #[error("cannot accept a vhost-user connection: {0}")]
    Accept(String),
    /// The frontend broke the protocol (the connection is closed).
    #[error("vhost-user connection failed: {0}")]
    Protocol(String),
}

/// Serves one disk over vhost-user-blk: each accepted frontend gets a fresh device.
#[derive(Debug)]
pub struct VhostUserBlkServer {
    disk: Arc<Disk>,
    options: VhostUserBlkOptions,
}

impl VhostUserBlkServer {
    /// A server for `disk`.
    pub fn new(disk: Arc<Disk>, options: VhostUserBlkOptions) -> Result<Self, OptionsError> {
        options.validate()?;
        Ok(VhostUserBlkServer { disk, options })
    }

    /// The disk served.
    pub fn disk(&self) -> &Arc<Disk> {
        &self.disk
    }

    /// The options.
    pub fn options(&self) -> &VhostUserBlkOptions {
        &self.options
    }

    /// Build a device with its worker threads, accept the next frontend on `listener` (blocks until one
    /// connects) and start serving it on a thread of its own.
    pub fn accept(&self, listener: &mut Listener) -> Result<Connection, ServeError> {
        let backend = VhostUserBlkBackend::new(Arc::clone(&self.disk), self.options.clone())
            .map(Arc::new)
            .map_err(|e| ServeError::Setup(e.to_string()))?;
        let daemon =
            VhostUserDaemon::new("blkbackd-vhost-user".to_string(), Arc::clone(&backend), backend.guest_memory())
                .map_err(|e| ServeError::Setup(e.to_string()))?;
        let mut connection = Connection { daemon, backend, finished: false };
        connection
            .backend
            .attach(&connection.daemon.get_epoll_handlers())
            .map_err(|e| ServeError::Setup(e.to_string()))?;
        connection.daemon.start(listener).map_err(|e| ServeError::Accept(e.to_string()))?;
        tracing::info!("vhost-user frontend connected");
        Ok(connection)
    }
}

/// One frontend's session. Dropping it disconnects the frontend (after finishing in-flight requests).
pub struct Connection {
    daemon: VhostUserDaemon<Arc<VhostUserBlkBackend>>,
    backend: Arc<VhostUserBlkBackend>,
    finished: bool,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection").field("backend", &self.backend).field("finished", &self.finished).finish()
    }
}

impl Connection {
    /// A handle that disconnects the frontend from another thread (e.g. on SIGTERM); [`wait`](Self::wait)
    /// then returns.
    pub fn shutdown_handle(&self) -> Option<ShutdownHandle> {
        self.daemon.shutdown_handle()
    }

    /// The device of this connection.
    pub fn backend(&self) -> &Arc<VhostUserBlkBackend> {
        &self.backend
    }

    /// Serve until the frontend disconnects (or a [`shutdown_handle`](Self::shutdown_handle) is used), then
    /// finish and answer every in-flight request and stop the worker threads.
    ///
    /// A frontend that simply goes away is not an error; one that broke the protocol is.
    pub fn wait(mut self) -> Result<(), ServeError> {
        let result = self.daemon.wait();
        self.finish();
        tracing::info!("vhost-user frontend disconnected");
        match result {
            Ok(()) => Ok(()),
            Err(DaemonError::HandleRequest(VhostUserError::Disconnected | VhostUserError::PartialMessage)) => Ok(()),
            Err(e) => Err(ServeError::Protocol(e.to_string())),
        }
    }

    fn finish(&mut self) {
        if self.finished {
            return;
        }
        self.finished = true;
        self.backend.shutdown();
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        if !self.finished {
            self.daemon.request_shutdown();
            let _ = self.daemon.wait();
            self.finish();
        }
    }
}
