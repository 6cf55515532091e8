//! `blkbackd vhost-user`: serve a disk to one vhost-user-blk frontend after another.

use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use device_blk::stats::Registry;
use device_blk::vhost_user::ServeError;
use device_blk::virtio::{default_serial, serial_from_str};
use device_blk::{Disk, EngineKind, VhostUserBlkOptions, VhostUserBlkServer};
use vhost::vhost_user::Listener;

use crate::cli::VhostUserArgs;
use crate::control::ControlServer;
use crate::sandbox::{self, CapSet, Role};
use crate::signals::Shutdown;

/// Open the disk, listen on the socket, and serve until a shutdown is requested.
pub fn run(args: &VhostUserArgs, shutdown: &Arc<Shutdown>) -> anyhow::Result<()> {
    let disk = Arc::new(Disk::open(&args.disk.path, &args.disk.options())?);
    let serial = match &args.serial {
        Some(s) => serial_from_str(s)?,
        None => default_serial(&disk),
    };
    let options = VhostUserBlkOptions {
        num_queues: args.queues,
        queue_size: args.queue_size,
        io_depth: args.io_depth,
        engine: args.engine.into(),
        batching: args.io_batching.into(),
        serial,
        stats: Some(Registry::new()),
        poll_us: args.poll_us,
        ..VhostUserBlkOptions::new(serial)
    };
    let mut control = match (&args.control, &options.stats) {
        (Some(path), Some(registry)) => Some(ControlServer::bind(path, registry.clone())?),
        _ => None,
    };
    let server = VhostUserBlkServer::new(Arc::clone(&disk), options)?;
    probe_engine(&disk, args.engine.into(), server.options().effective_io_depth())?;
    let socket = SocketFile::bind(&args.socket)?;
    let mut listener = Listener::from(socket.listener.try_clone().context("cannot duplicate the socket")?);
    // Everything is open: from here on no root, no capability, and only the system calls serving needs. The other
    // threads start afterwards and inherit it.
    sandbox::drop_privileges(args.sandbox.user.as_ref(), CapSet::EMPTY)?;
    sandbox::lock_down(Role::VhostUser, args.sandbox.seccomp)?;
    shutdown.listen().context("cannot set up signal handling")?;
    if let Some(control) = &mut control {
        control.start()?;
    }
    tracing::info!(
        socket = %args.socket.display(), disk = %args.disk.path.display(), queues = args.queues,
        queue_size = args.queue_size, poll_us = args.poll_us, serial = %String::from_utf8_lossy(&serial).trim_end_matches('\0'),
        "serving vhost-user-blk"
    );
    while wait_for_frontend(&socket.listener, shutdown)? {
        let connection = match server.accept(&mut listener) {
            Ok(connection) => connection,
            Err(e @ ServeError::Setup(_)) => return Err(e.into()),
            Err(error) => {
                tracing::warn!(%error, "cannot accept the frontend");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if let Some(handle) = connection.shutdown_handle() {
            shutdown.set_hook(Some(Box::new(move || handle.shutdown())));
        }
        let result = connection.wait();
        shutdown.set_hook(None);
        if let Err(error) = result {
            tracing::warn!(%error, "frontend session ended with an error");
        }
    }
    tracing::info!("stopped");
    Ok(())
}

/// Fail at startup, not at the guest's first request, if the chosen engine cannot be built here. (Each queue
/// builds its own engine on its own thread later.)
fn probe_engine(disk: &Arc<Disk>, kind: EngineKind, depth: u32) -> anyhow::Result<()> {
    let engine = kind.build(Arc::clone(disk), depth).context("cannot create the I/O engine")?;
    tracing::debug!(engine = engine.name(), "I/O engine available");
    Ok(())
}

/// Wait until a frontend connects (`true`) or a shutdown is requested (`false`).
fn wait_for_frontend(listener: &UnixListener, shutdown: &Shutdown) -> anyhow::Result<bool> {
    loop {
        if shutdown.is_requested() {
            return Ok(false);
        }
        let mut fds = [
            libc::pollfd { fd: listener.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: shutdown.wake_fd(), events: libc::POLLIN, revents: 0 },
        ];
        // SAFETY: `fds` is a valid array of two pollfd structures for the duration of the call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e).context("poll on the vhost-user socket");
        }
        if fds[1].revents != 0 || shutdown.is_requested() {
            return Ok(false);
        }
        if fds[0].revents & libc::POLLIN != 0 {
            return Ok(true);
        }
        if fds[0].revents != 0 {
            bail!("the vhost-user socket failed (poll events {:#x})", fds[0].revents);
        }
    }
}

/// The listening socket; its file is removed when this is dropped, if it is still ours.
struct SocketFile {
    path: PathBuf,
    id: (u64, u64),
    listener: UnixListener,
}

impl SocketFile {
    /// Listen on `path`. A socket file nobody listens on (left by a crashed process) is replaced; a live one
    /// or anything that is not a socket is an error.
    fn bind(path: &Path) -> anyhow::Result<SocketFile> {
        let shown = path.display();
        let listener = match UnixListener::bind(path) {
            Ok(listener) => listener,
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                let meta = fs::symlink_metadata(path).with_context(|| format!("cannot listen on {shown}"))?;
                if !meta.file_type().is_socket() {
                    bail!("cannot listen on {shown}: it exists and is not a socket");
                }
                match UnixStream::connect(path) {
                    Ok(_) => bail!("cannot listen on {shown}: the socket is in use by a running process"),
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                        tracing::info!(socket = %shown, "replacing a stale socket file nobody listens on");
                        fs::remove_file(path).with_context(|| format!("cannot remove the stale socket {shown}"))?;
                        UnixListener::bind(path).with_context(|| format!("cannot listen on {shown}"))?
                    }
                    Err(e) => return Err(e).with_context(|| format!("cannot listen on {shown}: the socket exists")),
                }
            }
            Err(e) => return Err(e).with_context(|| format!("cannot listen on {shown}")),
        };
        let meta = fs::metadata(path).with_context(|| format!("cannot stat the socket {shown}"))?;
        Ok(SocketFile { path: path.to_path_buf(), id: (meta.dev(), meta.ino()), listener })
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let ours = fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.id);
        if ours {
            if let Err(error) = fs::remove_file(&self.path) {
                tracing::warn!(socket = %self.path.display(), %error, "cannot remove the socket");
            }
        }
    }
}
