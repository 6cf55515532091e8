// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The fuzz targets. Each module documents its input layout and the invariants it asserts, and has `run` (one
//! input; panics on a violated invariant) and `seeds` (the committed seed corpus).

pub mod blk_queue;
pub mod blk_validate;
pub mod blkif_dataplane;
pub mod blkif_request;
pub mod blkif_ring;
pub mod virtio_chain;
pub mod worker_request;
pub mod xenbus_frontend;
pub mod xenbus_nodes;
pub mod xenstore_frames;
pub mod xenstore_payloads;
pub mod xenstore_peer;

/// One target: its name (the cargo-fuzz target and corpus directory), its runner, its seeds.
#[derive(Clone, Copy, Debug)]
pub struct Target {
    /// Name.
    pub name: &'static str,
    /// Runs one input.
    pub run: fn(&[u8]),
    /// The seed inputs.
    pub seeds: fn() -> Vec<Vec<u8>>,
}

macro_rules! targets {
    ($($m:ident),* $(,)?) => {
        /// Every target.
        pub const ALL: &[Target] = &[$(Target { name: stringify!($m), run: $m::run, seeds: $m::seeds }),*];
    };
}

targets!(
    xenstore_frames,
    xenstore_payloads,
    xenstore_peer,
    blk_validate,
    blk_queue,
    virtio_chain,
    blkif_request,
    blkif_ring,
    blkif_dataplane,
    xenbus_nodes,
    xenbus_frontend,
    worker_request,
);
