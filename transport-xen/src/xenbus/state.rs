// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! XenbusState (`xen/include/public/io/xenbus.h`) and the paths of one vbd.

use crate::services::DomId;
use crate::xenbus::nodes::{self, NodeError};

/// The state a xenbus driver publishes in its `state` node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum XenbusState {
    /// 0: no state (also what an absent or unreadable node means).
    Unknown,
    /// 1: the toolstack created the device.
    Initialising,
    /// 2: the backend waits for the hotplug script / frontend details.
    InitWait,
    /// 3: the frontend published its rings.
    Initialised,
    /// 4: connected.
    Connected,
    /// 5: closing (after an error, or on request).
    Closing,
    /// 6: closed.
    Closed,
    /// 7: reconfiguring (pvSCSI only).
    Reconfiguring,
    /// 8: reconfigured (pvSCSI only).
    Reconfigured,
}

impl XenbusState {
    const ALL: [XenbusState; 9] = [
        XenbusState::Unknown,
        XenbusState::Initialising,
        XenbusState::InitWait,
        XenbusState::Initialised,
        XenbusState::Connected,
        XenbusState::Closing,
        XenbusState::Closed,
        XenbusState::Reconfiguring,
        XenbusState::Reconfigured,
    ];

    /// The number written to xenstore.
    pub fn number(self) -> u32 {
        self as u32
    }

    /// The state with this number.
    pub fn from_number(n: u64) -> Option<XenbusState> {
        usize::try_from(n).ok().and_then(|i| Self::ALL.get(i)).copied()
    }

    /// Parse a `state` node.
    pub fn parse(value: &[u8]) -> Result<XenbusState, NodeError> {
        let n = nodes::parse_decimal("state", value, 0, 8)?;
        Ok(Self::from_number(n).unwrap_or(XenbusState::Unknown))
    }

    /// The node's value.
    pub fn as_node(self) -> String {
        self.number().to_string()
    }
}

impl std::fmt::Display for XenbusState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?} ({})", self, self.number())
    }
}

/// Which vbd: the frontend's domain and the device id (`backend/vbd/<domid>/<devid>`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VbdId {
    /// The frontend domain.
    pub domid: DomId,
    /// The virtual device number (`virtual-device`, e.g. 51712 for xvda).
    pub devid: u32,
}

impl std::fmt::Display for VbdId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "vbd {}/{}", self.domid, self.devid)
    }
}

/// The xenstore paths of one vbd's backend side.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VbdPaths {
    /// `<domain>/backend/vbd/<domid>/<devid>`.
    pub backend: String,
    /// Where `xenbus_dev_fatal` writes: `<domain>/error/backend/vbd/<domid>/<devid>/error`.
    pub error: String,
}

impl VbdPaths {
    /// The paths of `id` for a backend whose domain's xenstore home is `domain_path` (e.g. `/local/domain/0`).
    pub fn new(domain_path: &str, id: VbdId) -> VbdPaths {
        let relative = format!("backend/vbd/{}/{}", id.domid, id.devid);
        VbdPaths {
            backend: format!("{domain_path}/{relative}"),
            error: format!("{domain_path}/error/{relative}/error"),
        }
    }

    /// A node in the backend directory.
    pub fn node(&self, name: &str) -> String {
        format!("{}/{name}", self.backend)
    }
}

/// The `backend/vbd` directory of a backend domain.
pub fn vbd_root(domain_path: &str) -> String {
    format!("{domain_path}/backend/vbd")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_and_reject_garbage() {
        for s in XenbusState::ALL {
            assert_eq!(XenbusState::parse(s.as_node().as_bytes()), Ok(s));
        }
        assert!(XenbusState::parse(b"9").is_err());
        assert!(XenbusState::parse(b"").is_err());
        assert!(XenbusState::parse(b"4 ").is_err());
        assert_eq!(XenbusState::Connected.to_string(), "Connected (4)");
    }

    #[test]
    fn error_node_sits_under_the_domain_error_tree() {
        let p = VbdPaths::new("/local/domain/0", VbdId { domid: 3, devid: 51712 });
        assert_eq!(p.backend, "/local/domain/0/backend/vbd/3/51712");
        assert_eq!(p.error, "/local/domain/0/error/backend/vbd/3/51712/error");
        assert_eq!(p.node("state"), "/local/domain/0/backend/vbd/3/51712/state");
    }
}
