// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The seam between the xenbus control plane and the ring data plane: what the state machine learned from the
//! frontend, and what the backend advertises.

use crate::services::{DomId, EvtchnPort, GrantRef};

/// Largest ring we accept: 2^4 = 16 pages per ring (`max-ring-page-order`).
pub const MAX_RING_PAGE_ORDER: u32 = 4;
/// Segments we accept per indirect request (`feature-max-indirect-segments`).
pub const MAX_INDIRECT_SEGMENTS: u32 = 256;
/// Queues we accept (`multi-queue-max-queues`); the daemon may lower it to its core count.
pub const MAX_QUEUES: u32 = 4;

/// The request/response layout the frontend uses (`protocol` node).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlkifAbi {
    /// `x86_64-abi`: 8-byte aligned `id`, 112-byte requests.
    X86_64,
    /// `x86_32-abi`, and the default when there is no `protocol` node: 4-byte aligned `id`, 108-byte requests.
    X86_32,
}

impl BlkifAbi {
    /// Parse a `protocol` node; `None` (no node) means x86_32, as blkif.h specifies.
    pub fn from_protocol_node(value: Option<&[u8]>) -> Result<BlkifAbi, String> {
        match value {
            None => Ok(BlkifAbi::X86_32),
            Some(b"x86_64-abi") => Ok(BlkifAbi::X86_64),
            Some(b"x86_32-abi") => Ok(BlkifAbi::X86_32),
            Some(other) => Err(format!("unsupported protocol {:?}", String::from_utf8_lossy(other))),
        }
    }
}

/// One queue's shared ring as the frontend published it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueRing {
    /// Grant refs of the ring pages (`ring-ref` or `ring-ref0..N`), 1 << ring-page-order of them.
    pub ring_refs: Vec<GrantRef>,
    /// The frontend's event-channel port (`event-channel`).
    pub remote_port: EvtchnPort,
}

/// Everything the data plane needs to serve a connected frontend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectConfig {
    /// The frontend's domain.
    pub frontend_domid: DomId,
    /// Request layout.
    pub abi: BlkifAbi,
    /// One entry per queue (`multi-queue-num-queues`, default 1).
    pub queues: Vec<QueueRing>,
    /// The frontend asked for persistent grants and we offered them.
    pub persistent_grants: bool,
    /// The indirect segment limit we advertised (0: no indirect requests).
    pub max_indirect_segments: u32,
}
