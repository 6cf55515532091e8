// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Linux blkfront's side of the xenbus handshake, at the node level: what it reads from the backend and what it
//! writes, with its node names and order (`talk_to_blkback`, `blkfront_connect`, `blkfront_gather_backend_features`).
//!
//! The ring setup itself is in [`super::blkfront`]; these functions are also what the hostile-frontend tests use to
//! publish deliberately wrong values.

use std::time::Duration;

use crate::connect::BlkifAbi;
use crate::services::{read_optional, with_transaction, EvtchnPort, GrantRef, TxId, XenError, XenStore};
use crate::xenbus::nodes;
use crate::xenbus::state::XenbusState;

use super::wait::{wait_for, WaitError};

/// What the backend offers before the connection (read after it reaches InitWait).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendLimits {
    /// `max-ring-page-order` (default 0).
    pub max_ring_page_order: u32,
    /// `multi-queue-max-queues` (default 1).
    pub max_queues: u32,
}

/// What the backend published when it went Connected.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendInfo {
    /// `sectors` (512-byte units, as Linux uses it).
    pub sectors: u64,
    /// `info` (`VDISK_*` bits).
    pub info: u32,
    /// `sector-size`.
    pub sector_size: u32,
    /// `physical-sector-size` (default: `sector-size`).
    pub physical_sector_size: u32,
    /// `feature-flush-cache`.
    pub flush: bool,
    /// `feature-barrier`.
    pub barrier: bool,
    /// `feature-discard`.
    pub discard: bool,
    /// `discard-granularity`.
    pub discard_granularity: u32,
    /// `discard-alignment`.
    pub discard_alignment: u32,
    /// `discard-secure`.
    pub discard_secure: bool,
    /// `feature-persistent`.
    pub persistent: bool,
    /// `feature-max-indirect-segments` (0: none).
    pub max_indirect_segments: u32,
}

/// One queue's published ring: its grant refs (one per page) and event-channel port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublishedRing {
    /// `ring-ref` / `ring-refN`.
    pub refs: Vec<GrantRef>,
    /// `event-channel`.
    pub port: EvtchnPort,
}

/// The nodes `talk_to_blkback` writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Publication {
    /// `ring-page-order` (written only when above 0).
    pub ring_page_order: u32,
    /// One entry per queue (`queue-N/` directories when more than one).
    pub rings: Vec<PublishedRing>,
    /// `protocol` (`None`: not written, meaning x86_32).
    pub abi: Option<BlkifAbi>,
    /// `feature-persistent`.
    pub persistent: bool,
}

/// Errors of the frontend side.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrontError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] XenError),
    /// A wait ran out.
    #[error(transparent)]
    Wait(#[from] WaitError),
    /// The backend published something unusable or failed.
    #[error("backend: {0}")]
    Backend(String),
    /// A request failed or the ring misbehaved.
    #[error("ring: {0}")]
    Ring(String),
}

fn read_u64(store: &dyn XenStore, path: &str, default: Option<u64>) -> Result<u64, FrontError> {
    match read_optional(store, TxId::NONE, path)? {
        Some(v) => nodes::parse_decimal(path, &v, 0, u64::MAX).map_err(|e| FrontError::Backend(e.to_string())),
        None => default.ok_or_else(|| FrontError::Backend(format!("{path} missing"))),
    }
}

fn read_u32(store: &dyn XenStore, path: &str, default: Option<u32>) -> Result<u32, FrontError> {
    let v = read_u64(store, path, default.map(u64::from))?;
    u32::try_from(v).map_err(|_| FrontError::Backend(format!("{path} = {v} out of range")))
}

/// Read what the backend offers once it is in InitWait.
pub fn read_backend_limits(store: &dyn XenStore, backend: &str) -> Result<BackendLimits, FrontError> {
    Ok(BackendLimits {
        max_ring_page_order: read_u32(store, &format!("{backend}/max-ring-page-order"), Some(0))?,
        max_queues: read_u32(store, &format!("{backend}/multi-queue-max-queues"), Some(1))?.max(1),
    })
}

/// Publish the rings in one transaction, in `talk_to_blkback`'s order, then switch to Initialised.
pub fn publish(store: &dyn XenStore, frontend: &str, p: &Publication) -> Result<(), FrontError> {
    with_transaction(store, 16, |tx| {
        if p.ring_page_order > 0 {
            store.write(tx, &format!("{frontend}/ring-page-order"), p.ring_page_order.to_string().as_bytes())?;
        }
        if p.rings.len() == 1 {
            write_ring(store, tx, frontend, &p.rings[0], p.ring_page_order)?;
        } else {
            store.write(tx, &format!("{frontend}/multi-queue-num-queues"), p.rings.len().to_string().as_bytes())?;
            for (i, ring) in p.rings.iter().enumerate() {
                write_ring(store, tx, &format!("{frontend}/queue-{i}"), ring, p.ring_page_order)?;
            }
        }
        if let Some(abi) = p.abi {
            let protocol: &[u8] = match abi {
                BlkifAbi::X86_64 => b"x86_64-abi",
                BlkifAbi::X86_32 => b"x86_32-abi",
            };
            store.write(tx, &format!("{frontend}/protocol"), protocol)?;
        }
        store.write(tx, &format!("{frontend}/feature-persistent"), if p.persistent { b"1" } else { b"0" })
    })?;
    switch_state(store, frontend, XenbusState::Initialised)
}

/// `write_per_ring_nodes`: `ring-ref` for a one-page ring, `ring-refN` otherwise, then `event-channel`.
fn write_ring(store: &dyn XenStore, tx: TxId, dir: &str, ring: &PublishedRing, order: u32) -> Result<(), XenError> {
    if order == 0 && ring.refs.len() == 1 {
        store.write(tx, &format!("{dir}/ring-ref"), ring.refs[0].to_string().as_bytes())?;
    } else {
        for (i, gref) in ring.refs.iter().enumerate() {
            store.write(tx, &format!("{dir}/ring-ref{i}"), gref.to_string().as_bytes())?;
        }
    }
    store.write(tx, &format!("{dir}/event-channel"), ring.port.to_string().as_bytes())
}

/// Write the frontend's `state`.
pub fn switch_state(store: &dyn XenStore, frontend: &str, state: XenbusState) -> Result<(), FrontError> {
    store.write(TxId::NONE, &format!("{frontend}/state"), state.as_node().as_bytes())?;
    Ok(())
}

/// Wait until the backend's state satisfies `pred`.
pub fn wait_backend(
    store: &dyn XenStore,
    backend: &str,
    timeout: Duration,
    pred: impl Fn(XenbusState) -> bool,
) -> Result<XenbusState, FrontError> {
    Ok(wait_for(store, &format!("{backend}/state"), timeout, |v| {
        v.and_then(|v| XenbusState::parse(v).ok()).filter(|s| pred(*s))
    })?)
}

/// Read what the backend published when it went Connected (`blkfront_connect` and its feature gathering).
pub fn read_backend_info(store: &dyn XenStore, backend: &str) -> Result<BackendInfo, FrontError> {
    let node = |name: &str| format!("{backend}/{name}");
    let flag = |name: &str| -> Result<bool, FrontError> { Ok(read_u64(store, &node(name), Some(0))? != 0) };
    let sector_size = read_u32(store, &node("sector-size"), None)?;
    let discard = flag("feature-discard")?;
    Ok(BackendInfo {
        sectors: read_u64(store, &node("sectors"), None)?,
        info: read_u32(store, &node("info"), None)?,
        sector_size,
        physical_sector_size: read_u32(store, &node("physical-sector-size"), Some(sector_size))?,
        flush: flag("feature-flush-cache")?,
        barrier: flag("feature-barrier")?,
        discard,
        discard_granularity: if discard {
            read_u32(store, &node("discard-granularity"), Some(sector_size))?
        } else {
            0
        },
        discard_alignment: if discard { read_u32(store, &node("discard-alignment"), Some(0))? } else { 0 },
        discard_secure: discard && flag("discard-secure")?,
        persistent: flag("feature-persistent")?,
        max_indirect_segments: read_u32(store, &node("feature-max-indirect-segments"), Some(0))?,
    })
}

/// Wait until `pred` accepts the backend's state (`None`: the node or the whole directory is gone).
pub fn wait_for_backend_state(
    store: &dyn XenStore,
    backend: &str,
    timeout: Duration,
    pred: impl Fn(Option<XenbusState>) -> bool,
) -> Result<(), FrontError> {
    Ok(wait_for(store, &format!("{backend}/state"), timeout, |v| {
        pred(v.map(|v| XenbusState::parse(v).unwrap_or(XenbusState::Unknown))).then_some(())
    })?)
}
