// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Reading what the frontend published when it went Initialised: rings, event channels, protocol, features.
//!
//! The frontend's directory belongs to the guest: every node is hostile. The counts are parsed and bounded before
//! any per-queue or per-page node is read, so a frontend cannot make us read more than
//! `max_queues × 2^max_ring_page_order` ring references.

use crate::connect::{ConnectConfig, QueueRing};
use crate::services::{read_optional, DomId, TxId, XenError, XenStore};
use crate::xenbus::device::Fatal;
use crate::xenbus::nodes::{self, NodeError};

/// What the backend advertised, against which the frontend's choices are checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Advertised {
    /// `multi-queue-max-queues`.
    pub max_queues: u32,
    /// `max-ring-page-order`.
    pub max_ring_page_order: u32,
    /// `feature-max-indirect-segments` (0: none).
    pub max_indirect_segments: u32,
    /// `feature-persistent`.
    pub persistent_grants: bool,
}

/// A frontend node read inside `tx`: `Ok(None)` when absent, a guest error when unreadable.
fn read_node(store: &dyn XenStore, tx: TxId, path: &str) -> Result<Result<Option<Vec<u8>>, Fatal>, XenError> {
    match read_optional(store, tx, path) {
        Ok(v) => Ok(Ok(v)),
        Err(XenError::Access { what }) => Ok(Err(Fatal::new(libc::EACCES, format!("reading {path}: {what}")))),
        Err(e) => Err(e),
    }
}

/// Turn a node parse error into the fatal error for `path`.
fn bad(path: &str, e: NodeError) -> Fatal {
    Fatal::new(e.errno(), format!("reading {path}: {e}"))
}

/// Read the frontend's connection parameters inside `tx`.
///
/// The outer error is the store's (retry on [`XenError::Again`]); the inner one is the frontend's fault and
/// becomes the vbd's `error` node. Node names, locations and defaults are Linux blkback's: `ring-page-order`,
/// `protocol`, `feature-persistent` and `multi-queue-num-queues` at the frontend root; `ring-ref` (order 0) or
/// `ring-ref0..N` and `event-channel` at the root for one queue, under `queue-<i>/` for several.
pub fn read_connect_config(
    store: &dyn XenStore,
    tx: TxId,
    frontend: &str,
    frontend_domid: DomId,
    adv: Advertised,
) -> Result<Result<ConnectConfig, Fatal>, XenError> {
    macro_rules! node {
        ($path:expr) => {
            match read_node(store, tx, &$path)? {
                Ok(v) => v,
                Err(f) => return Ok(Err(f)),
            }
        };
    }
    macro_rules! guest {
        ($e:expr) => {
            match $e {
                Ok(v) => v,
                Err(f) => return Ok(Err(f)),
            }
        };
    }

    let protocol_path = format!("{frontend}/protocol");
    let protocol = node!(protocol_path);
    let abi = guest!(nodes::parse_protocol(protocol.as_deref())
        .map_err(|e| Fatal::new(libc::ENOSYS, format!("unknown fe protocol: {e}"))));

    let persistent_path = format!("{frontend}/feature-persistent");
    let frontend_persistent = match node!(persistent_path) {
        None => false,
        Some(v) => guest!(nodes::parse_flag("feature-persistent", &v).map_err(|e| bad(&persistent_path, e))),
    };

    let queues_path = format!("{frontend}/multi-queue-num-queues");
    let num_queues = match node!(queues_path) {
        None => 1,
        Some(v) => guest!(nodes::parse_num_queues(Some(&v), adv.max_queues).map_err(|e| match e {
            NodeError::OutOfRange { value, .. } => Fatal::new(
                libc::ENOSYS,
                format!("guest requested {value} queues, exceeding the maximum of {}.", adv.max_queues)
            ),
            e => bad(&queues_path, e),
        })),
    };

    let order_path = format!("{frontend}/ring-page-order");
    let ring_page_order = match node!(order_path) {
        None => None,
        Some(v) => Some(guest!(nodes::parse_ring_page_order(&v, adv.max_ring_page_order).map_err(|e| match e {
            NodeError::OutOfRange { value, .. } => Fatal::new(
                libc::EINVAL,
                format!("{frontend}/request {value} ring page order exceed max:{}", adv.max_ring_page_order)
            ),
            e => bad(&order_path, e),
        }))),
    };

    let mut queues = Vec::with_capacity(num_queues as usize);
    for q in 0..num_queues {
        let dir = if num_queues == 1 { frontend.to_string() } else { format!("{frontend}/queue-{q}") };
        let evtchn_path = format!("{dir}/event-channel");
        let remote_port = match node!(evtchn_path) {
            None => return Ok(Err(Fatal::new(libc::EINVAL, format!("reading {evtchn_path}: missing")))),
            Some(v) => guest!(nodes::parse_event_channel("event-channel", &v).map_err(|e| bad(&evtchn_path, e))),
        };
        let names: Vec<String> = match ring_page_order {
            None => vec!["ring-ref".to_string()],
            Some(order) => (0..1u32 << order).map(|i| format!("ring-ref{i}")).collect(),
        };
        let mut ring_refs = Vec::with_capacity(names.len());
        for name in names {
            let path = format!("{dir}/{name}");
            let gref = match node!(path) {
                None => return Ok(Err(Fatal::new(libc::EINVAL, format!("reading {path}: missing")))),
                Some(v) => guest!(nodes::parse_ring_ref(&name, &v).map_err(|e| bad(&path, e))),
            };
            ring_refs.push(gref);
        }
        queues.push(QueueRing { ring_refs, remote_port });
    }

    Ok(Ok(ConnectConfig {
        frontend_domid,
        abi,
        queues,
        persistent_grants: frontend_persistent && adv.persistent_grants,
        max_indirect_segments: adv.max_indirect_segments,
    }))
}

/// Whether the frontend's `device-type` says cdrom (`VDISK_CDROM`), as Linux blkback checks.
pub fn is_cdrom(store: &dyn XenStore, frontend: &str) -> bool {
    matches!(read_optional(store, TxId::NONE, &format!("{frontend}/device-type")), Ok(Some(v)) if v == b"cdrom")
}
