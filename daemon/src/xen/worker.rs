// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `blkbackd xen-worker`: one guest's vbds, in a process of their own, started by the supervisor.
//!
//! It inherits one descriptor, its channel to the supervisor, and asks for the rest (its event socket and its
//! grant device) with `Hello`; then, still root and single-threaded, it confines itself (empty read-only root,
//! network namespace of its own, the unprivileged user, no capability: [`sandbox::confine_worker`]), makes its
//! I/O threads' io_uring rings, and installs the [`Role::XenGuest`] system call filter, which refuses new rings. From then on it serves the guest's vbds with the transport's xenbus
//! backend; everything it needs that a path would name (disks, event-channel handles, xenstore) comes through the
//! supervisor ([`super::client`]).

use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::sync::Arc;

use anyhow::{bail, Context};
use device_blk::stats::Registry;
use transport_xen::dataplane::{DataplaneOptions, IoThreads};
use transport_xen::xen::GntDev;
use transport_xen::xenbus::dataplane_server::DataplaneServer;
use transport_xen::xenbus::RingServer;
use transport_xen::xenbus::{BackendConfig, Scope, XenBackend};

use crate::cli::{EngineArg, XenServingArgs, XenWorkerArgs};
use crate::control::ControlServer;
use crate::sandbox::{self, GrantAccess, Role};
use crate::signals::Shutdown;
use transport_xen::separation::client::{BrokeredDisks, BrokeredEvtchn, BrokeredGrants, BrokeredStore, Channel};

/// Serve one guest until SIGTERM (or the supervisor goes away).
pub fn run(args: &XenWorkerArgs, shutdown: &Arc<Shutdown>) -> anyhow::Result<()> {
    let Some(user) = args.sandbox.user.as_ref() else {
        bail!("a worker needs --user (blkbackd xen passes it)");
    };
    let rpc = inherited_channel(args.channel_fd)?;
    let channel = Arc::new(Channel::new(rpc));
    let welcomed = channel.hello().context("asking the supervisor for the worker's descriptors")?;
    sandbox::confine_worker(user)?;
    let store = BrokeredStore::new(channel.clone(), welcomed.events).context("setting up the event socket")?;
    let grants = welcomed.grants;
    let registry = Registry::new();
    let mut control = welcomed
        .control
        .map(|(listener, path)| ControlServer::from_listener(listener, path, registry.clone()))
        .transpose()?;
    let access = if args.serving.direct_grants { GrantAccess::Direct } else { GrantAccess::Brokered };
    let worker_init = sandbox::xen_worker_init(args.sandbox.seccomp, access)?;
    let serving = &args.serving;
    let io_threads = io_threads_with_rings(serving)?;
    sandbox::lock_down(Role::XenGuest(access), args.sandbox.seccomp)?;
    shutdown.listen().context("cannot set up signal handling")?;

    let (grant_mode, copy_without_persistent) = super::grant_mode(serving)?;
    let persistent_grants = !serving.no_persistent && grant_mode == transport_xen::grant_memory::GrantMode::Map;
    let options = {
        let mut o = DataplaneOptions::default();
        o.grant_mode = grant_mode;
        o.copy_without_persistent = copy_without_persistent;
        o.stats = Some(registry);
        o.worker_init = Some(worker_init);
        o.poll_us = serving.poll_us;
        o.io_threads = Some(io_threads);
        o
    };
    let (evtchn, engine) = (BrokeredEvtchn(channel.clone()), serving.engine.into());
    let grants = GntDev::from_file(grants);
    let rings: Arc<dyn RingServer> = if serving.direct_grants {
        Arc::new(DataplaneServer::new(Arc::new(grants), evtchn, engine, options))
    } else {
        let brokered = BrokeredGrants::new(channel.clone(), grants, args.domid);
        Arc::new(DataplaneServer::new(Arc::new(brokered), evtchn, engine, options))
    };
    let config = {
        let mut o = BackendConfig::default();
        o.domain_path = args.domain_path.clone();
        o.max_queues = serving.max_queues;
        o.persistent_grants = persistent_grants;
        o
    };
    let mut backend = XenBackend::new(Arc::new(store), rings, config, Scope::Domain(args.domid))
        .context("watching the guest's vbd directory")?
        .with_disk_opener(Arc::new(BrokeredDisks { channel, domid: args.domid }));
    tracing::info!(
        domid = args.domid,
        grant_mode = ?serving.grant_mode,
        direct_grants = serving.direct_grants,
        "worker serving the guest's vbds"
    );
    if let Some(control) = &mut control {
        let resize = backend.resize_handle();
        control.set_resize(Arc::new(move || {
            resize.request();
            "resize check requested: a disk that grew is announced to the guest now (its frontend reads the new \
             size); a disk that shrank is refused and logged"
                .to_string()
        }));
        control.start()?;
    }
    let stop = backend.stop_handle();
    shutdown.set_hook(Some(Box::new(move || stop.stop())));
    let result = backend.run().context("the supervisor's channel or xenstore failed: every data plane was stopped");
    shutdown.set_hook(None);
    result?;
    tracing::info!(domid = args.domid, "worker stopped");
    Ok(())
}

/// The worker's I/O threads, with their io_uring rings made now: after the lock-down the process may make none
/// (its filter answers `io_uring_setup` with `EPERM`), because its filter would not see what a ring of its own
/// did (open a path, connect a socket: vsock has no network namespace). The threads serve every ring of every vbd
/// of the guest on these rings, restricted to their own operations on the disks the supervisor hands over.
fn io_threads_with_rings(serving: &XenServingArgs) -> anyhow::Result<IoThreads> {
    let threads = IoThreads::new(serving.io_threads.into());
    if matches!(serving.engine, EngineArg::Sync) {
        return Ok(threads);
    }
    match threads.make_rings() {
        Ok(rings) => tracing::debug!(rings, "the I/O threads' io_uring rings are made"),
        Err(error) if matches!(serving.engine, EngineArg::IoUring) => {
            return Err(error).context("making the I/O threads' io_uring rings (--engine io-uring)")
        }
        Err(error) => tracing::warn!(%error, "no io_uring for the I/O threads: their queues use synchronous I/O"),
    }
    Ok(threads)
}

/// The channel descriptor the supervisor left open for us: it must be a socket.
fn inherited_channel(fd: i32) -> anyhow::Result<UnixDatagram> {
    if fd < 3 {
        bail!("--channel-fd {fd}: not an inherited descriptor");
    }
    // SAFETY: fstat on a descriptor number only reads its metadata; an unused number fails with EBADF.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `stat` is a valid out-buffer.
    if unsafe { libc::fstat(fd, &mut stat) } != 0 {
        bail!(
            "--channel-fd {fd}: {} (blkbackd xen-worker is started by blkbackd xen)",
            std::io::Error::last_os_error()
        );
    }
    if stat.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        bail!("--channel-fd {fd}: not a socket (blkbackd xen-worker is started by blkbackd xen)");
    }
    // SAFETY: the descriptor is open (fstat succeeded), a socket, and handed to this process to own; nothing else
    // in the process uses it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    Ok(UnixDatagram::from(owned))
}
