// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Privilege separation for a Xen block backend: a privileged supervisor and one unprivileged worker process per
//! guest, joined by a socket pair.
//!
//! The worker runs the ordinary [`XenBackend`](crate::xenbus::XenBackend) over the service traits that
//! [`client`] implements by asking the supervisor; the supervisor's [`broker`] answers, within the guest's
//! [`policy`], on a xenstore connection of its own, and hands over the descriptors the worker may not open
//! itself (its disks, event-channel handles restricted to its guest, its grant device), and registers the worker's
//! grant maps as its guest's ([`client::BrokeredGrants`]: gntdev has no per-domain restriction of its own), within
//! a budget of grant pages per worker ([`grants`]). [`wire`] is the message
//! format; everything the broker decodes comes from a process a guest may have taken over.

pub mod broker;
pub mod client;
pub mod grants;
pub mod policy;
pub mod wire;

#[cfg(test)]
mod tests;
