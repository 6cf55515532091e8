// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The supervisor path for a backend that died (`blkbackd xen --cleanup`, a hotplug script's `remove`, a service
//! manager's stop hook): move its vbds to Closed with an `error` node saying why, and answer the requests it left
//! on the rings with an I/O error, so that the guest's I/O fails instead of hanging.
//!
//! Closed alone is not enough for Linux blkfront: it stops queueing new requests and marks the disk dead, but the
//! requests already on the ring wait for a response forever (blkfront has no request timeout). Only for a backend
//! that is gone: a live backend serving the same rings would see its ring protocol broken.

use std::time::Duration;

use crate::connect::{ConnectConfig, MAX_INDIRECT_SEGMENTS, MAX_QUEUES, MAX_RING_PAGE_ORDER};
use crate::dataplane::abandon::fail_unanswered;
use crate::services::{
    read_optional, with_transaction, DomId, EventChannelOpener, GrantTable, TxId, XenError, XenStore,
};
use crate::xenbus::frontend_nodes::{read_connect_config, Advertised};
use crate::xenbus::nodes;
use crate::xenbus::state::{vbd_root, VbdId, VbdPaths, XenbusState};

/// Transaction retries of the supervisor path.
const TX_ATTEMPTS: u32 = 16;

/// What the supervisor path did to one vbd.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cleanup {
    /// The vbd existed and was moved to Closed.
    pub closed: bool,
    /// Requests left on its rings that were answered with an error.
    pub answered: usize,
}

/// Move every vbd of frontend domain `domid` served from `domain_path` to Closed, with an `error` node saying
/// `reason`. Returns how many vbds were closed. (Rings are not touched: see [`close_vbd_failing_io`].)
pub fn close_all_vbds(store: &dyn XenStore, domain_path: &str, domid: DomId, reason: &str) -> Result<usize, XenError> {
    let mut closed = 0;
    for id in vbds_of(store, domain_path, domid)? {
        if close_vbd(store, domain_path, id, reason)? {
            closed += 1;
        }
    }
    Ok(closed)
}

/// The vbds of frontend domain `domid` under `domain_path`'s `backend/vbd`.
pub fn vbds_of(store: &dyn XenStore, domain_path: &str, domid: DomId) -> Result<Vec<VbdId>, XenError> {
    let dir = format!("{}/{domid}", vbd_root(domain_path));
    let devids = match store.directory(TxId::NONE, &dir) {
        Ok(devids) => devids,
        Err(XenError::NotFound { .. }) => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    Ok(devids
        .iter()
        .filter_map(|d| nodes::parse_u32("devid", d.as_bytes(), 0, u32::MAX).ok())
        .map(|devid| VbdId { domid, devid })
        .collect())
}

/// Write the `error` node saying `reason` and move the vbd to Closed. Returns `false`, writing nothing, if the
/// vbd's directory does not exist (a removed device is never re-created).
pub fn close_vbd(store: &dyn XenStore, domain_path: &str, id: VbdId, reason: &str) -> Result<bool, XenError> {
    let paths = VbdPaths::new(domain_path, id);
    let state = paths.node("state");
    if read_optional(store, TxId::NONE, &state)?.is_none() {
        return Ok(false);
    }
    if let Err(e) = store.write(TxId::NONE, &paths.error, format!("{} {reason}", libc::EPIPE).as_bytes()) {
        tracing::warn!(vbd = %paths.backend, error = %e, "cannot write the error node");
    }
    let closed = XenbusState::Closed.as_node();
    let written = with_transaction(store, TX_ATTEMPTS, |tx| {
        if read_optional(store, tx, &state)?.is_none() {
            return Ok(false);
        }
        store.write(tx, &state, closed.as_bytes())?;
        Ok(true)
    })?;
    if written {
        tracing::info!(vbd = %paths.backend, "moved to Closed");
    }
    Ok(written)
}

/// [`close_vbd`], then answer every request left on the vbd's rings with `BLKIF_RSP_ERROR` (watching them for
/// `settle` more). The rings are those the frontend published, read before the close; a vbd that was not
/// Connected or Closing has none in use. Failing to answer (the frontend is gone, its nodes are bogus) is logged:
/// the vbd is closed anyway.
pub fn close_vbd_failing_io<G: GrantTable, O: EventChannelOpener>(
    store: &dyn XenStore,
    grants: &G,
    evtchn: &O,
    domain_path: &str,
    id: VbdId,
    reason: &str,
    settle: Duration,
) -> Result<Cleanup, XenError> {
    let rings = rings_in_use(store, domain_path, id)?;
    let closed = close_vbd(store, domain_path, id, reason)?;
    let mut answered = 0;
    if let Some(config) = rings.filter(|_| closed) {
        match fail_unanswered(grants, evtchn, &config, settle) {
            Ok(n) => answered = n,
            Err(e) => tracing::warn!(vbd = %id, error = %e, "cannot answer the requests left on the rings"),
        }
    }
    Ok(Cleanup { closed, answered })
}

/// The rings the frontend of `id` published, if the backend got as far as serving them (Connected or Closing).
fn rings_in_use(store: &dyn XenStore, domain_path: &str, id: VbdId) -> Result<Option<ConnectConfig>, XenError> {
    let paths = VbdPaths::new(domain_path, id);
    let state = read_optional(store, TxId::NONE, &paths.node("state"))?;
    if !matches!(state.as_deref().map(XenbusState::parse), Some(Ok(XenbusState::Connected | XenbusState::Closing))) {
        return Ok(None);
    }
    let frontend = read_optional(store, TxId::NONE, &paths.node("frontend"))?;
    let Some(Ok(frontend)) = frontend.map(|f| nodes::parse_xenstore_path("frontend", &f)) else { return Ok(None) };
    // Everything within what this transport ever advertises: the frontend chose within those limits.
    let adv = Advertised {
        max_queues: MAX_QUEUES,
        max_ring_page_order: MAX_RING_PAGE_ORDER,
        max_indirect_segments: MAX_INDIRECT_SEGMENTS,
        persistent_grants: true,
    };
    match with_transaction(store, TX_ATTEMPTS, |tx| read_connect_config(store, tx, &frontend, id.domid, adv)) {
        Ok(Ok(config)) => Ok(Some(config)),
        Ok(Err(fatal)) => {
            tracing::warn!(vbd = %id, error = %fatal.message, "the frontend's ring nodes are unusable");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_vbd_closes_one_vbd_and_never_recreates_a_removed_one() {
        let store = crate::emulated::EmulatedXenStore::new().expect("store");
        let dom0 = "/local/domain/0";
        let (a, b) = (VbdId { domid: 3, devid: 51712 }, VbdId { domid: 3, devid: 51728 });
        for id in [a, b] {
            store.write(TxId::NONE, &VbdPaths::new(dom0, id).node("state"), b"4").expect("write state");
        }
        assert_eq!(close_vbd(&store, dom0, a, "gone"), Ok(true));
        let read = |path: &str| store.read(TxId::NONE, path).ok();
        let paths_a = VbdPaths::new(dom0, a);
        assert_eq!(read(&paths_a.node("state")).as_deref(), Some(&b"6"[..]));
        assert!(read(&paths_a.error).is_some_and(|e| e.ends_with(b"gone")));
        assert_eq!(read(&VbdPaths::new(dom0, b).node("state")).as_deref(), Some(&b"4"[..]), "the other is untouched");
        let removed = VbdId { domid: 3, devid: 1 };
        assert_eq!(close_vbd(&store, dom0, removed, "gone"), Ok(false));
        let paths = VbdPaths::new(dom0, removed);
        assert!(read(&paths.backend).is_none() && read(&paths.error).is_none(), "nothing written for a removed vbd");
        assert_eq!(vbds_of(&store, dom0, 3), Ok(vec![a, b]));
        assert_eq!(vbds_of(&store, dom0, 4), Ok(vec![]));
    }

    #[test]
    fn requests_left_on_the_ring_of_a_dead_backend_fail() {
        use std::sync::Arc;

        use crate::blkif::{RawRequest, OP_READ, RSP_ERROR, X86_64};
        use crate::emulated::{EmulatedHost, RingFrontend};

        let host = EmulatedHost::new().expect("host");
        let store = host.xenstore().expect("store");
        let guest = Arc::new(host.add_guest(5, 64).expect("guest"));
        let mut fe = RingFrontend::<X86_64>::new(guest, 0, 0).expect("ring");
        let id = VbdId { domid: 5, devid: 51712 };
        let paths = VbdPaths::new("/local/domain/0", id);
        let frontend = "/local/domain/5/device/vbd/51712";
        let queue = fe.queue_ring();
        for (path, value) in [
            (paths.node("state"), "4".to_string()),
            (paths.node("frontend"), frontend.to_string()),
            (format!("{frontend}/ring-ref"), queue.ring_refs[0].to_string()),
            (format!("{frontend}/event-channel"), queue.remote_port.to_string()),
            (format!("{frontend}/protocol"), "x86_64-abi".to_string()),
            (format!("{frontend}/state"), "4".to_string()),
        ] {
            store.write(TxId::NONE, &path, value.as_bytes()).expect("write");
        }
        // The backend died with four requests on the ring.
        let requests: Vec<RawRequest> = (0..4u64)
            .map(|i| {
                let mut raw = RawRequest::default();
                raw.put(0, &[OP_READ, 1]);
                raw.put(8, &(40 + i).to_le_bytes());
                raw
            })
            .collect();
        assert_eq!(fe.submit(&requests).expect("submit"), 4);
        let (grants, evtchn) = (host.grant_table(0), host.evtchn_opener(0));
        let done = close_vbd_failing_io(&store, &grants, &evtchn, "/local/domain/0", id, "dead", Duration::ZERO)
            .expect("cleanup");
        assert_eq!(done, Cleanup { closed: true, answered: 4 });
        assert_eq!(store.read(TxId::NONE, &paths.node("state")).as_deref().ok(), Some(&b"6"[..]));
        let responses = fe.wait_responses(4, Duration::from_secs(5)).expect("answers");
        assert!(responses.iter().all(|r| r.status == RSP_ERROR), "{responses:?}");
        assert_eq!(responses.iter().map(|r| r.id).collect::<Vec<_>>(), vec![40, 41, 42, 43]);
        assert_eq!(host.live_mappings(), 0);
        // Already Closed: closed again, nothing left to answer.
        let again = close_vbd_failing_io(&store, &grants, &evtchn, "/local/domain/0", id, "dead", Duration::ZERO);
        assert_eq!(again, Ok(Cleanup { closed: true, answered: 0 }));
    }
}
