// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Serving a disk to one vhost-user frontend after another on a listening socket.

use std::sync::{Arc, Mutex, PoisonError, Weak};

use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{Error as DaemonError, ShutdownHandle, VhostUserDaemon};

use super::{config_change, ChannelError, OptionsError, VhostUserBlkBackend, VhostUserBlkOptions};
use device_blk::disk::{Disk, DiskError, SizeChange};

/// A vhost-user failure, with the library's message (its error type carries no `std::error::Error`).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
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
    /// The device of the frontend connected now, if any (for [`ResizeHandle`]).
    current: Arc<Mutex<Weak<VhostUserBlkBackend>>>,
    /// The I/O threads' rings, made once and served on by every connection's threads in turn.
    rings: Vec<device_blk::engine::SharedUring>,
}

impl VhostUserBlkServer {
    /// A server for `disk`.
    pub fn new(disk: Arc<Disk>, options: VhostUserBlkOptions) -> Result<Self, OptionsError> {
        options.validate()?;
        // Read while the process may still ask (before a daemon locks its system calls down).
        config_change::scan_limit();
        // Likewise `Batching::Auto` looks at the disk's file system now, not on the I/O threads.
        let options = VhostUserBlkOptions { batching: options.batching.for_disk(&disk), ..options };
        // And the rings, before a daemon forbids itself new ones.
        let rings = super::thread_rings(&disk, &options);
        Ok(VhostUserBlkServer { disk, options, current: Arc::new(Mutex::new(Weak::new())), rings })
    }

    /// A handle that looks at the disk's size again and tells the connected frontend when it grew.
    pub fn resize_handle(&self) -> ResizeHandle {
        ResizeHandle { disk: Arc::clone(&self.disk), current: Arc::clone(&self.current) }
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
        let backend = VhostUserBlkBackend::with_rings(Arc::clone(&self.disk), self.options.clone(), self.rings.clone())
            .map(Arc::new)
            .map_err(|e| ServeError::Setup(e.to_string()))?;
        let daemon =
            VhostUserDaemon::new("blkbackd-vhost-user".to_string(), Arc::clone(&backend), backend.guest_memory())
                .map_err(|e| ServeError::Setup(e.to_string()))?;
        *self.current.lock().unwrap_or_else(PoisonError::into_inner) = Arc::downgrade(&backend);
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

/// Looks at the served disk's size again (a file extended, a loop device re-read with `losetup -c`, a logical
/// volume extended) and announces growth to the connected frontend ([`VhostUserBlkServer::resize_handle`]).
#[derive(Clone, Debug)]
pub struct ResizeHandle {
    disk: Arc<Disk>,
    current: Arc<Mutex<Weak<VhostUserBlkBackend>>>,
}

/// What a [`ResizeHandle::check`] found and did.
#[derive(Debug)]
#[non_exhaustive]
pub enum ResizeOutcome {
    /// The size is what the device already serves.
    Unchanged(SizeChange),
    /// The disk grew and the connected frontend was told (it reads the new capacity).
    Announced(SizeChange),
    /// The disk grew; no frontend is connected (the next one reads the new capacity).
    NoFrontend(SizeChange),
    /// The disk grew and the device serves the new size, but the frontend could not be told: it sees the new
    /// size when it next reads the configuration (at the latest when it reconnects).
    NotAnnounced(SizeChange, ChannelError),
}

impl std::fmt::Display for ResizeOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let grew = |f: &mut std::fmt::Formatter<'_>, change: &SizeChange| match change {
            SizeChange::Grown { from, to } => write!(f, "the disk grew from {} to {} sectors", from.0, to.0),
            SizeChange::Unchanged(size) => write!(f, "the disk's size is unchanged: {} sectors", size.0),
        };
        match self {
            ResizeOutcome::Unchanged(change) => grew(f, change),
            ResizeOutcome::Announced(change) => {
                grew(f, change)?;
                f.write_str("; the frontend was told and reads the new capacity")
            }
            ResizeOutcome::NoFrontend(change) => {
                grew(f, change)?;
                f.write_str("; no frontend is connected (the next one sees the new capacity)")
            }
            ResizeOutcome::NotAnnounced(change, error) => {
                grew(f, change)?;
                write!(f, "; the frontend could not be told ({error}): it sees the new capacity when it reconnects")
            }
        }
    }
}

impl ResizeHandle {
    /// Read the disk's size; if it grew, serve the new size and tell the connected frontend. A disk that shrank
    /// is refused ([`DiskError::Shrunk`]) and the old size stays in force.
    pub fn check(&self) -> Result<ResizeOutcome, DiskError> {
        let change = self.disk.refresh_size()?;
        if matches!(change, SizeChange::Unchanged(_)) {
            return Ok(ResizeOutcome::Unchanged(change));
        }
        let backend = self.current.lock().unwrap_or_else(PoisonError::into_inner).upgrade();
        let outcome = match backend {
            None => ResizeOutcome::NoFrontend(change),
            Some(backend) => match backend.announce_config_change() {
                Ok(()) => ResizeOutcome::Announced(change),
                Err(error) => ResizeOutcome::NotAnnounced(change, error),
            },
        };
        tracing::info!(outcome = %outcome, "disk size checked");
        Ok(outcome)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use device_blk::disk::DiskOptions;
    use device_blk::units::Sector;

    #[test]
    fn growth_is_served_and_reported_and_a_shrink_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("disk.img");
        std::fs::write(&path, vec![0u8; 8192]).expect("write");
        let disk = Arc::new(Disk::open(&path, &DiskOptions::default()).expect("open"));
        let server = VhostUserBlkServer::new(Arc::clone(&disk), VhostUserBlkOptions::new([0; 20])).expect("server");
        let handle = server.resize_handle();
        assert!(matches!(handle.check(), Ok(ResizeOutcome::Unchanged(SizeChange::Unchanged(Sector(16))))));

        let file = std::fs::OpenOptions::new().write(true).open(&path).expect("open for writing");
        file.set_len(16384).expect("grow");
        let outcome = handle.check().expect("grown");
        let grown = SizeChange::Grown { from: Sector(16), to: Sector(32) };
        assert!(matches!(outcome, ResizeOutcome::NoFrontend(c) if c == grown), "{outcome}");
        assert_eq!(
            outcome.to_string(),
            "the disk grew from 16 to 32 sectors; no frontend is connected (the next one sees the new capacity)"
        );
        // A device made now (the next frontend's) has the new capacity in its configuration space.
        let device = VhostUserBlkBackend::new(Arc::clone(&disk), VhostUserBlkOptions::new([0; 20])).expect("device");
        assert_eq!(device.config().capacity, 32);
        // With a device but no channel from its frontend, the growth is served and the reason given.
        *server.current.lock().expect("lock") = Arc::downgrade(&Arc::new(device));
        file.set_len(8192).expect("shrink");
        let err = handle.check().expect_err("a shrink is refused");
        assert!(matches!(err, DiskError::Shrunk { .. }), "{err}");
        assert_eq!(disk.capacity(), Sector(32), "the size served stays");
    }

    #[test]
    fn a_device_whose_frontend_gave_no_channel_says_so() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("disk.img");
        std::fs::write(&path, vec![0u8; 8192]).expect("write");
        let disk = Arc::new(Disk::open(&path, &DiskOptions::default()).expect("open"));
        let server = VhostUserBlkServer::new(Arc::clone(&disk), VhostUserBlkOptions::new([0; 20])).expect("server");
        let device =
            Arc::new(VhostUserBlkBackend::new(Arc::clone(&disk), VhostUserBlkOptions::new([0; 20])).expect("device"));
        *server.current.lock().expect("lock") = Arc::downgrade(&device);
        std::fs::OpenOptions::new().write(true).open(&path).and_then(|f| f.set_len(12288)).expect("grow");
        let outcome = server.resize_handle().check().expect("grown");
        assert!(matches!(outcome, ResizeOutcome::NotAnnounced(_, ChannelError::Unusable(_))), "{outcome}");
        assert!(outcome.to_string().contains("no back-end request channel"), "{outcome}");
        assert_eq!(device.config().capacity, 24);
    }
}
