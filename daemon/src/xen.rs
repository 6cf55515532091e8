//! `blkbackd xen`: serve the vbds of one guest (or of every guest) on the real Xen services of this domain:
//! xenstore over `/dev/xen/xenbus` (or xenstored's socket), event channels over `/dev/xen/evtchn`, grants over
//! `/dev/xen/gntdev`. Runs until SIGTERM/SIGINT, then closes every vbd (the frontends see Closed).
//!
//! `blkbackd xen --cleanup D [--devid N]` is the supervisor path for a backend that died: it moves every vbd of
//! domain D (or only `backend/vbd/D/N`) to Closed, writes an `error` node and answers the requests the dead
//! backend left on the rings with an I/O error, so the guest's I/O fails instead of hanging.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use device_blk::stats::Registry;
use transport_xen::dataplane::DataplaneOptions;
use transport_xen::grant_memory::GrantMode;
use transport_xen::services::DomId;
use transport_xen::xen::{
    EvtchnDevice, EvtchnOpener, GntDev, XenBusStore, EVTCHN_DEVICE, GNTDEV_DEVICE, XENBUS_DEVICE, XENSTORED_SOCKETS,
};
use transport_xen::xenbus::cleanup::vbds_of;
use transport_xen::xenbus::dataplane_server::DataplaneServer;
use transport_xen::xenbus::{close_vbd, close_vbd_failing_io, BackendConfig, Cleanup, Scope, VbdId, XenBackend};

use crate::cli::{GrantModeArg, XenArgs};
use crate::control::ControlServer;
use crate::sandbox::{self, Role, XEN_CONTROL_CAPS};
use crate::signals::Shutdown;

/// What `--cleanup` writes into the `error` node.
const CLEANUP_REASON: &str = "blkbackd for this domain exited; the device is closed";
/// How long `--cleanup` keeps answering requests a frontend still queues after the close.
const CLEANUP_SETTLE: Duration = Duration::from_millis(500);

/// Run `blkbackd xen`.
pub fn run(args: &XenArgs, shutdown: &Arc<Shutdown>) -> anyhow::Result<()> {
    if let Some(domid) = args.cleanup {
        let store = open_store()?;
        let domain_path = store.get_domain_path(args.backend_domid).context("reading the backend domain's path")?;
        return cleanup(&store, &domain_path, domid, args.devid);
    }
    // Drop to the control thread's set before anything starts a thread (xenstore's reader does): every thread
    // inherits it. Disks and event-channel devices are opened later, as guests connect.
    sandbox::drop_privileges(args.sandbox.user.as_ref(), XEN_CONTROL_CAPS)?;
    let store = open_store()?;
    let domain_path = store.get_domain_path(args.backend_domid).context("reading the backend domain's path")?;
    let grants = GntDev::open().map_err(|e| anyhow!("cannot map guest grants: {e} (is xen-gntdev loaded?)"))?;
    // Each queue opens its own event-channel device when it connects; fail now, not at the first guest.
    drop(EvtchnDevice::open().map_err(|e| anyhow!("cannot bind event channels: {e} (is xen-evtchn loaded?)"))?);
    let registry = Registry::new();
    let mut control = args.control.as_deref().map(|path| ControlServer::bind(path, registry.clone())).transpose()?;
    let worker_init = sandbox::xen_worker_init(args.sandbox.seccomp)?;
    sandbox::lock_down(Role::XenControl, args.sandbox.seccomp)?;
    shutdown.listen().context("cannot set up signal handling")?;
    if let Some(control) = &mut control {
        control.start()?;
    }
    let (grant_mode, copy_without_persistent) = match args.grant_mode {
        GrantModeArg::Auto => (GrantMode::Map, true),
        GrantModeArg::Map => (GrantMode::Map, false),
        GrantModeArg::Copy => (GrantMode::Copy, false),
    };
    // A copying backend gains nothing from persistent grants, and the frontend would copy into them for nothing.
    let persistent_grants = !args.no_persistent && grant_mode == GrantMode::Map;
    let options = DataplaneOptions {
        grant_mode,
        copy_without_persistent,
        stats: Some(registry),
        worker_init: Some(worker_init),
        poll_us: args.poll_us,
        ..DataplaneOptions::default()
    };
    tracing::info!(
        grant_mode = ?args.grant_mode, engine = ?args.engine, persistent_grants, max_queues = args.max_queues,
        poll_us = args.poll_us,
        "serving xen vbds"
    );
    let rings = DataplaneServer::new(Arc::new(grants), EvtchnOpener::default(), args.engine.into(), options);
    let config =
        BackendConfig { domain_path, max_queues: args.max_queues, persistent_grants, ..BackendConfig::default() };
    let scope = args.frontend_domid.map_or(Scope::AllDomains, Scope::Domain);
    let mut backend = XenBackend::new(Arc::new(store), Arc::new(rings), config, scope)
        .context("watching the backend's vbd directory")?;
    let stop = backend.stop_handle();
    shutdown.set_hook(Some(Box::new(move || stop.stop())));
    let result = backend.run().context(
        "xenstore connection lost: every data plane was stopped (the vbds stay as they were in xenstore; run \
         `blkbackd xen --cleanup D` to close them)",
    );
    shutdown.set_hook(None);
    result?;
    tracing::info!("stopped");
    Ok(())
}

/// Connect to xenstore, or say in one line why this is not a Xen domain we can serve from.
fn open_store() -> anyhow::Result<XenBusStore> {
    XenBusStore::open().map_err(|e| {
        let nothing_there =
            !Path::new(XENBUS_DEVICE).exists() && !XENSTORED_SOCKETS.iter().any(|s| Path::new(s).exists());
        if nothing_there {
            anyhow!(
                "not running in a Xen domain with xenstore access: neither {XENBUS_DEVICE} nor a xenstored socket \
                 ({}) exists (run blkbackd xen in dom0 or a driver domain, with xenfs and the xen-evtchn, \
                 xen-gntdev modules; {EVTCHN_DEVICE}, {GNTDEV_DEVICE} are needed too)",
                XENSTORED_SOCKETS.join(", ")
            )
        } else {
            anyhow!("not running in a Xen domain with xenstore access: {e}")
        }
    })
}

/// Move the vbds of `domid` (all, or only `devid`) served from `domain_path` to Closed, with an `error` node, and
/// answer the requests left on their rings with an I/O error (where this domain can still map them).
fn cleanup(store: &XenBusStore, domain_path: &str, domid: DomId, devid: Option<u32>) -> anyhow::Result<()> {
    let ids = match devid {
        Some(devid) => vec![VbdId { domid, devid }],
        None => vbds_of(store, domain_path, domid).with_context(|| format!("listing the vbds of domain {domid}"))?,
    };
    let grants = GntDev::open()
        .map_err(|e| tracing::warn!(error = %e, "cannot open the grant device: closing the vbds without answering their rings"))
        .ok();
    let (mut closed, mut answered) = (0, 0);
    for id in ids {
        let done = match &grants {
            Some(grants) => close_vbd_failing_io(
                store,
                grants,
                &EvtchnOpener::default(),
                domain_path,
                id,
                CLEANUP_REASON,
                CLEANUP_SETTLE,
            ),
            None => close_vbd(store, domain_path, id, CLEANUP_REASON).map(|closed| Cleanup { closed, answered: 0 }),
        }
        .with_context(|| format!("closing vbd {}/{}", id.domid, id.devid))?;
        closed += usize::from(done.closed);
        answered += done.answered;
    }
    tracing::info!(domid, ?devid, closed, answered, "cleanup done");
    Ok(())
}
