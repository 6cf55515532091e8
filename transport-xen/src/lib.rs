// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Xen blkif backend transport for `device-blk`.
//!
//! Xen services (xenstore, event channels, grant tables) sit behind the traits of [`services`], with real
//! (`/dev/xen`) and emulated (`emulated`, feature `test-utils`) implementations; the blkif shared ring and the xenbus backend state machine are
//! built on those traits and on `device-blk`'s `BlockQueue`.

#![warn(missing_docs)]

pub mod blkif;
pub mod connect;
pub mod dataplane;
// Test doubles (the emulated Xen host, the blkfront emulator): only in tests, or with `test-utils`.
#[cfg(any(test, feature = "test-utils"))]
pub mod emulated;
#[cfg(any(test, feature = "test-utils"))]
pub mod frontend;
pub mod grant_memory;
pub mod keyed_map;
pub mod separation;
pub mod services;
pub mod xen;
pub mod xenbus;
