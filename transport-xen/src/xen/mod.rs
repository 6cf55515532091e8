// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The real Xen services behind the traits of [`crate::services`], on Linux's `/dev/xen` interfaces, with no C
//! library: thin safe wrappers of the character devices and their ioctls (numbers and structs from the Linux uapi
//! headers, see [`ioctl`]).
//!
//! - [`XenBusStore`]: xenstore over `/dev/xen/xenbus` or xenstored's socket ([`wire`] is the protocol codec).
//! - [`EvtchnDevice`] / [`EvtchnOpener`]: event channels over `/dev/xen/evtchn`.
//! - [`GntDev`] / [`GntMapping`]: grant maps and grant copy over `/dev/xen/gntdev`.
//! - [`GntAlloc`] / [`GntShare`]: granting our own pages (`/dev/xen/gntalloc`), for probes and lab tests.

pub mod evtchn;
pub mod gntalloc;
pub mod gntdev;
pub mod ioctl;
pub mod wire;
pub mod xenstore;

pub use evtchn::{EvtchnDevice, EvtchnOpener, EVTCHN_DEVICE};
pub use gntalloc::{GntAlloc, GntShare, GNTALLOC_DEVICE};
pub use gntdev::{gntst_name, GntDev, GntMapping, GNTDEV_DEVICE};
pub use xenstore::{XenBusStore, XsTransport, XENBUS_DEVICE, XENSTORED_SOCKETS};
