//! `blkbackd xen`: serve the vbds of one guest (or of every guest) on the real Xen services of this domain:
//! xenstore over `/dev/xen/xenbus` (or xenstored's socket), event channels over `/dev/xen/evtchn`, grants over
//! `/dev/xen/gntdev`. Runs until SIGTERM/SIGINT, then closes every vbd (the frontends see Closed).
//!
//! `blkbackd xen --cleanup D` is the supervisor path for a backend that died: it moves every vbd of domain D to
//! Closed and writes an `error` node, so the guest's I/O fails instead of hanging.

use std::sync::Arc;

use anyhow::Context;
use device_blk::stats::Registry;
use transport_xen::dataplane::DataplaneOptions;
use transport_xen::services::DomId;
use transport_xen::xen::{EvtchnOpener, GntDev, XenBusStore};
use transport_xen::xenbus::dataplane_server::DataplaneServer;
use transport_xen::xenbus::{close_all_vbds, BackendConfig, Scope, XenBackend};

use crate::cli::XenArgs;
use crate::control::ControlServer;
use crate::signals::Shutdown;

/// Run `blkbackd xen`.
pub fn run(args: &XenArgs, shutdown: &Arc<Shutdown>) -> anyhow::Result<()> {
    let store = XenBusStore::open().context(
        "cannot reach xenstore (no /dev/xen/xenbus and no xenstored socket): run blkbackd xen in dom0 or a driver \
         domain with the xenfs/xen-gntdev/xen-evtchn modules loaded",
    )?;
    let domain_path = store.get_domain_path(args.backend_domid).context("reading the backend domain's path")?;
    if let Some(domid) = args.cleanup {
        return cleanup(&store, &domain_path, domid);
    }
    let grants = GntDev::open().context("opening /dev/xen/gntdev (load xen-gntdev)")?;
    let registry = Registry::new();
    let _control = args.control.as_deref().map(|path| ControlServer::start(path, registry.clone())).transpose()?;
    let options =
        DataplaneOptions { grant_mode: args.grant_mode.into(), stats: Some(registry), ..DataplaneOptions::default() };
    let rings = DataplaneServer::new(Arc::new(grants), EvtchnOpener::default(), args.engine.into(), options);
    let config = BackendConfig {
        domain_path,
        max_queues: args.max_queues,
        persistent_grants: !args.no_persistent,
        ..BackendConfig::default()
    };
    let scope = args.frontend_domid.map_or(Scope::AllDomains, Scope::Domain);
    let mut backend = XenBackend::new(Arc::new(store), Arc::new(rings), config, scope)
        .context("watching the backend's vbd directory")?;
    let stop = backend.stop_handle();
    shutdown.set_hook(Some(Box::new(move || stop.stop())));
    let result = backend.run().context("xenstore connection lost; every vbd was closed");
    shutdown.set_hook(None);
    result?;
    tracing::info!("stopped");
    Ok(())
}

/// Move every vbd of `domid` served from `domain_path` to Closed, with an `error` node saying why.
fn cleanup(store: &XenBusStore, domain_path: &str, domid: DomId) -> anyhow::Result<()> {
    let closed = close_all_vbds(store, domain_path, domid, "blkbackd for this domain exited; the device is closed")
        .with_context(|| format!("closing the vbds of domain {domid}"))?;
    tracing::info!(domid, closed, "cleanup done");
    Ok(())
}
