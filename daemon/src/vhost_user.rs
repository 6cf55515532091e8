// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `blkbackd vhost-user`: serve a disk to one vhost-user-blk frontend after another.

mod listen;
mod resize;

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use device_blk::stats::Registry;
use device_blk::virtio::{default_serial, serial_from_str};
use device_blk::{Disk, EngineKind};
use vhost::vhost_user::Listener;
use vhost_user_blk::ServeError;
use vhost_user_blk::{VhostUserBlkOptions, VhostUserBlkServer};

use crate::cli::VhostUserArgs;
use crate::control::ControlServer;
use crate::metrics_http::MetricsServer;
use crate::notify::Notifier;
use crate::sandbox::{self, CapSet, FileKeeper, Isolation, Role};
use crate::signals::Shutdown;

pub use listen::{activation_requested, capabilities_json, capabilities_requested, parse_group, parse_mode};
use listen::{Access, PidFile, SocketFile};

/// Open the disk, listen on the socket, and serve until a shutdown is requested.
pub fn run(args: &VhostUserArgs, shutdown: &Arc<Shutdown>) -> anyhow::Result<()> {
    // Declared first, dropped last: the keeper removes the files once the threads serving on them are gone.
    let mut _keeper: Option<FileKeeper> = None;
    // Inherited descriptors first, before anything opened here could take the number of one that was not passed;
    // the systemd notification socket before the system call filter forbids creating sockets.
    let inherited = listen::inherited(args.fd, args.socket_path.as_deref())?;
    let notifier = Notifier::from_env().context("systemd readiness (NOTIFY_SOCKET)")?;
    let disk = Arc::new(Disk::open(&args.disk.path, &args.disk.options())?);
    let serial = match &args.serial {
        Some(s) => serial_from_str(s)?,
        None => default_serial(&disk),
    };
    let mut options = VhostUserBlkOptions::new(serial);
    options.num_queues = args.queues;
    options.io_threads = args.io_threads;
    options.queue_size = args.queue_size;
    options.io_depth = args.io_depth;
    options.engine = args.engine.into();
    options.batching = args.io_batching.into();
    options.stats = Some(Registry::new());
    options.poll_us = args.poll_us;
    let mut control = match (&args.control, &options.stats) {
        (Some(path), Some(registry)) => Some(ControlServer::bind(path, registry.clone())?),
        _ => None,
    };
    let mut metrics = match (&args.metrics_listen, &options.stats) {
        (Some(addr), Some(registry)) => Some(MetricsServer::bind(addr, registry.clone())?),
        _ => None,
    };
    let server = VhostUserBlkServer::new(Arc::clone(&disk), options)?;
    probe_engine(&disk, args.engine.into(), server.options().effective_io_depth())?;
    let (mut socket, shown) = match (inherited, &args.socket_path) {
        (Some(listener), _) => {
            let shown = inherited_name(&listener, args.fd);
            (Socket::Inherited(listener), shown)
        }
        (None, Some(path)) => {
            let access = Access { mode: args.socket_mode, group: args.socket_group };
            (Socket::Bound(SocketFile::bind(path, access)?), path.display().to_string())
        }
        (None, None) => bail!("no socket to listen on: give --socket-path PATH or --fd N"),
    };
    let mut listener = Listener::from(socket.listener().try_clone().context("cannot duplicate the socket")?);
    let mut pidfile = args.pidfile.as_deref().map(PidFile::write).transpose()?;
    // (Before the files are handed over: on this error their owners still remove them.)
    sandbox::check_user_switch(args.sandbox.user.as_ref())?;
    // The files created here are removed on exit by a keeper process: this one will not see them any more.
    let files: Vec<_> = [
        socket.hand_over(),
        control.as_mut().and_then(ControlServer::hand_over),
        metrics.as_mut().and_then(MetricsServer::hand_over),
        pidfile.as_mut().and_then(PidFile::hand_over),
    ]
    .into_iter()
    .flatten()
    .collect();
    if !files.is_empty() {
        match FileKeeper::spawn(files.clone(), args.sandbox.user.as_ref(), args.sandbox.seccomp) {
            Ok(spawned) => _keeper = Some(spawned),
            Err(error) => {
                // Not confined yet: remove them here, as their owners would have.
                for file in &files {
                    let _ = file.remove_if_current();
                }
                return Err(error);
            }
        }
    }
    // Everything is open: from here on no root, no capability, no file or network by name, and only the system
    // calls serving needs. The other threads start afterwards and inherit it.
    let isolation = if args.no_namespaces { Isolation::None } else { Isolation::Namespaces };
    sandbox::drop_privileges(args.sandbox.user.as_ref(), CapSet::EMPTY, isolation)?;
    sandbox::lock_down(Role::VhostUser, args.sandbox.seccomp)?;
    shutdown.listen().context("cannot set up signal handling")?;
    if let Some(control) = &mut control {
        control.set_resize(resize::control_hook(server.resize_handle()));
        control.start()?;
    }
    let _size_watcher = resize::spawn_watcher(server.resize_handle(), Arc::clone(shutdown))?;
    if let Some(metrics) = &mut metrics {
        metrics.start()?;
    }
    tracing::info!(
        socket = %shown, disk = %args.disk.path.display(), queues = args.queues,
        io_threads = server.options().effective_io_threads(),
        queue_size = args.queue_size, poll_us = args.poll_us, serial = %String::from_utf8_lossy(&serial).trim_end_matches('\0'),
        "serving vhost-user-blk"
    );
    if let Err(error) = notifier.ready() {
        tracing::warn!(error = format!("{error:#}"), "cannot tell systemd that blkbackd is ready");
    }
    while wait_for_frontend(socket.listener(), shutdown)? {
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
            let backend = Arc::clone(connection.backend());
            shutdown.set_hook(Some(Box::new(move || {
                // Answer (and signal) every request in flight while the frontend still listens, then close the
                // socket: a frontend that sees the disconnect first takes the used index as where to resume and
                // never looks at answers (or interrupts) that come later, and a guest would wait for them forever.
                backend.shutdown();
                handle.shutdown();
            })));
        }
        let result = connection.wait();
        shutdown.set_hook(None);
        if let Err(error) = result {
            tracing::warn!(%error, "frontend session ended with an error");
        }
    }
    if let Err(error) = notifier.stopping() {
        tracing::debug!(error = format!("{error:#}"), "cannot tell systemd that blkbackd stops");
    }
    tracing::info!("stopped");
    Ok(())
}

/// The socket we listen on: bound here (its file removed on exit) or inherited (left to whoever made it).
enum Socket {
    Bound(SocketFile),
    Inherited(UnixListener),
}

impl Socket {
    fn listener(&self) -> &UnixListener {
        match self {
            Socket::Bound(file) => &file.listener,
            Socket::Inherited(listener) => listener,
        }
    }

    /// The file of a socket we bound, for whoever removes it on exit.
    fn hand_over(&mut self) -> Option<crate::owned_path::FileId> {
        match self {
            Socket::Bound(file) => file.hand_over(),
            Socket::Inherited(_) => None,
        }
    }
}

/// How an inherited socket is named in the log: its descriptor, how it came, and its path if it has one.
fn inherited_name(listener: &UnixListener, fd: Option<i32>) -> String {
    let how = match fd {
        Some(fd) => format!("fd {fd} (--fd)"),
        None => "fd 3 (socket activation)".to_string(),
    };
    match listener.local_addr().ok().and_then(|a| a.as_pathname().map(|p| p.display().to_string())) {
        Some(path) => format!("{path}, {how}"),
        None => how,
    }
}

/// Fail at startup, not at the guest's first request, if the chosen engine cannot be built here. (Each queue
/// builds its own engine on the I/O thread that serves it, later.)
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
