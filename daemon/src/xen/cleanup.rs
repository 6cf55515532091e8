// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `blkbackd xen --cleanup D`: close the vbds of a domain whose backend died, and answer what its rings hold.

use std::time::Duration;

use anyhow::Context;
use transport_xen::services::DomId;
use transport_xen::services::XenStore;
use transport_xen::xen::{EvtchnOpener, GntDev};
use transport_xen::xenbus::cleanup::vbds_of;
use transport_xen::xenbus::{close_vbd, close_vbd_failing_io, Cleanup, VbdId};

/// What `--cleanup` writes into the `error` node.
pub const CLEANUP_REASON: &str = "blkbackd for this domain exited; the device is closed";
/// How long `--cleanup` keeps answering requests a frontend still queues after the close.
const CLEANUP_SETTLE: Duration = Duration::from_millis(500);

/// Move the vbds of `domid` (all, or only `devid`) served from `domain_path` to Closed, with an `error` node, and
/// answer the requests left on their rings with an I/O error (where this domain can still map them).
pub fn cleanup(store: &dyn XenStore, domain_path: &str, domid: DomId, devid: Option<u32>) -> anyhow::Result<()> {
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
