// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `blkbackd xen`: the Xen host service. A small privileged supervisor ([`supervisor`]) watches `backend/vbd`
//! and runs one unprivileged worker process per guest domain ([`worker`], `blkbackd xen-worker`), which serves
//! that guest's vbds through the transport's xenbus backend and data plane. The worker opens nothing itself: the
//! supervisor's broker (`transport_xen::separation`) opens its disks (with the diskseq pin) and event-channel
//! handles (restricted to the guest), hands it the descriptors over a socket, and carries its xenstore requests
//! within the guest's policy.
//!
//! `blkbackd xen --cleanup D [--devid N]` is the path for a backend that died: it moves every vbd of domain D
//! (or only `backend/vbd/D/N`) to Closed, writes an `error` node and answers the requests the dead backend left
//! on the rings with an I/O error, so the guest's I/O fails instead of hanging.

pub mod cleanup;
pub mod metrics;
mod process;
pub mod scrape;
pub mod supervisor;
pub mod worker;

use std::path::Path;

use anyhow::{anyhow, Context};
use transport_xen::xen::{XenBusStore, EVTCHN_DEVICE, GNTDEV_DEVICE, XENBUS_DEVICE, XENSTORED_SOCKETS};

use crate::cli::{GrantModeArg, XenServingArgs};
use transport_xen::grant_memory::GrantMode;

pub use supervisor::run;
pub use worker::run as run_worker;

/// `--cleanup D [--devid N]`.
pub fn run_cleanup(backend_domid: u16, domid: u16, devid: Option<u32>) -> anyhow::Result<()> {
    let store = open_store()?;
    let domain_path = store.get_domain_path(backend_domid).context("reading the backend domain's path")?;
    cleanup::cleanup(&store, &domain_path, domid, devid)
}

/// Connect to xenstore, or say in one line why this is not a Xen domain we can serve from.
pub fn open_store() -> anyhow::Result<XenBusStore> {
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

/// `--grant-mode` with `--direct-grants` as the data plane takes it: the mode, and whether a frontend without
/// persistent grants gets grant copy. Grant copy names domains, so only a worker with direct grant access may use
/// it.
pub fn grant_mode(serving: &XenServingArgs) -> anyhow::Result<(GrantMode, bool)> {
    match (serving.grant_mode, serving.direct_grants) {
        (GrantModeArg::Copy, false) => anyhow::bail!(
            "--grant-mode copy needs --direct-grants (grant copy names domains: only a worker that maps grants by \
             itself can use it)"
        ),
        (GrantModeArg::Auto, direct) => Ok((GrantMode::Map, direct)),
        (GrantModeArg::Map, _) => Ok((GrantMode::Map, false)),
        (GrantModeArg::Copy, true) => Ok((GrantMode::Copy, false)),
    }
}
