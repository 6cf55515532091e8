// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! An emulated Xen host, so the whole transport runs in tests and the demo without a hypervisor.
//!
//! [`EmulatedHost`] holds an in-memory xenstore ([`EmulatedXenStore`]), an event-channel switch
//! ([`EvtchnSwitch`]) and the domains' grant tables ([`GrantHost`]); [`EmulatedHost::add_guest`] creates a guest
//! domain ([`GuestDomain`]) whose memory is a memfd, so grant maps made by the backend are truly shared with it.
//! Each service implements the trait of [`crate::services`] that a real `/dev/xen` implementation implements.

pub mod evtchn;
pub mod grants;
pub mod host;
pub mod ring_frontend;
pub mod xenstore;

pub use evtchn::{EmulatedEventChannel, EmulatedEvtchnOpener, EvtchnSwitch};
pub use grants::{EmulatedGrantTable, EmulatedMapping, GrantHost};
pub use host::{EmulatedHost, GuestDomain};
pub use ring_frontend::{GrantedPages, RingFrontend};
pub use xenstore::EmulatedXenStore;
