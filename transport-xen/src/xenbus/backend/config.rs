// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What a backend process offers its frontends, shared by every vbd it serves.

use device_blk::disk::DirectIo;

use crate::connect::{MAX_INDIRECT_SEGMENTS, MAX_QUEUES, MAX_RING_PAGE_ORDER};
use crate::xenbus::frontend_nodes::Advertised;

/// What the backend offers and where it lives; shared by every vbd of a process. `BackendConfig::default()`,
/// then set the fields (built only that way outside this crate).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct BackendConfig {
    /// The backend domain's xenstore home, `/local/domain/<backend domid>`.
    pub domain_path: String,
    /// `multi-queue-max-queues` (1..=[`MAX_QUEUES`]).
    pub max_queues: u32,
    /// `max-ring-page-order` (0..=[`MAX_RING_PAGE_ORDER`]).
    pub max_ring_page_order: u32,
    /// `feature-max-indirect-segments` (0 disables indirect requests).
    pub max_indirect_segments: u32,
    /// Offer persistent grants (`feature-persistent`).
    pub persistent_grants: bool,
    /// O_DIRECT policy for opened disks.
    pub direct_io: DirectIo,
}

impl Default for BackendConfig {
    fn default() -> Self {
        BackendConfig {
            domain_path: "/local/domain/0".to_string(),
            max_queues: MAX_QUEUES,
            max_ring_page_order: MAX_RING_PAGE_ORDER,
            max_indirect_segments: MAX_INDIRECT_SEGMENTS,
            persistent_grants: true,
            direct_io: DirectIo::Auto,
        }
    }
}

impl BackendConfig {
    /// The limits clamped to what the transport supports.
    pub fn clamped(mut self) -> Self {
        self.max_queues = self.max_queues.clamp(1, MAX_QUEUES);
        self.max_ring_page_order = self.max_ring_page_order.min(MAX_RING_PAGE_ORDER);
        self.max_indirect_segments = self.max_indirect_segments.min(MAX_INDIRECT_SEGMENTS);
        self
    }

    pub(super) fn advertised(&self) -> Advertised {
        Advertised {
            max_queues: self.max_queues,
            max_ring_page_order: self.max_ring_page_order,
            max_indirect_segments: self.max_indirect_segments,
            persistent_grants: self.persistent_grants,
        }
    }
}
