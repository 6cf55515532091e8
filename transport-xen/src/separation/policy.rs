// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What a guest's worker may do in xenstore, through the supervisor: only its own guest's vbds.
//!
//! A worker of domain `D` served from backend domain path `P` may
//! - read, list and watch under `P/backend/vbd/D` (its vbds' backend nodes), `P/error/backend/vbd/D` and
//!   `/local/domain/D/device/vbd` (its frontends' nodes);
//! - write only the nodes a backend publishes, `P/backend/vbd/D/<devid>/<name>` for a `name` in
//!   [`WRITABLE`], and the `error` node `P/error/backend/vbd/D/<devid>/error`;
//! - nothing else: no other guest's nodes, no toolstack nodes, no `mkdir`, `rm` or permission changes. In
//!   particular the nodes that name the disk (`params`, `physical-device`, `diskseq`, `mode`, `script`, ...)
//!   are the toolstack's: the supervisor opens whatever they name as root, so a worker must never write them.
//!
//! Paths are compared component by component after a strict syntax check (absolute, no empty, `.` or `..`
//! components, no NUL, at most 3072 bytes), so `backend/vbd/1` never matches `backend/vbd/12`.

use crate::services::DomId;

/// xenstore's longest absolute path.
const MAX_PATH: usize = 3072;

/// The backend nodes a worker writes (what the probe, the connect and the seed's `opened` publish).
pub const WRITABLE: &[&str] = &[
    "state",
    "opened",
    "multi-queue-max-queues",
    "max-ring-page-order",
    "feature-persistent",
    "feature-flush-cache",
    "feature-barrier",
    "feature-max-indirect-segments",
    "feature-discard",
    "discard-granularity",
    "discard-alignment",
    "discard-secure",
    "sectors",
    "info",
    "sector-size",
    "physical-sector-size",
];

/// The longest value a worker may write (xenstored's limit for a guest's own nodes; every node a backend publishes
/// is a few bytes, the `error` node a line).
pub const MAX_VALUE: usize = 4096;
/// Most watches one worker may hold (xenstored's default quota for a guest; a worker needs a few per vbd).
pub const MAX_WATCHES: usize = 128;
/// Most transactions one worker may have open at once (xenstored's default quota for a guest).
pub const MAX_TRANSACTIONS: usize = 10;

/// Kinds of access, as the request needs them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// read, directory, get_perms, watch, unwatch.
    Read,
    /// write (mkdir, rm and set_perms are never allowed).
    Write,
}

/// The subtrees one worker may reach.
#[derive(Clone, Debug)]
pub struct Policy {
    backend: String,
    errors: String,
    frontends: String,
}

impl Policy {
    /// The policy of the worker of `domid`, served from the backend domain's home `domain_path`.
    pub fn for_guest(domain_path: &str, domid: DomId) -> Policy {
        let base = domain_path.trim_end_matches('/');
        Policy {
            backend: format!("{base}/backend/vbd/{domid}"),
            errors: format!("{base}/error/backend/vbd/{domid}"),
            frontends: format!("/local/domain/{domid}/device/vbd"),
        }
    }

    /// The backend directory of the vbd a permitted write `path` belongs to (`P/backend/vbd/D/<devid>`, for its
    /// backend nodes and its `error` node alike): a write is made only while that vbd exists, so that a worker
    /// cannot make xenstore (whose quotas do not hold for dom0) keep nodes of vbds that are not there.
    pub fn vbd_of_write(&self, path: &str) -> Option<String> {
        let devid = |root: &str| {
            let rest = path.strip_prefix(root)?.strip_prefix('/')?;
            rest.split_once('/').map(|(devid, _)| devid.to_string())
        };
        devid(&self.backend).or_else(|| devid(&self.errors)).map(|devid| format!("{}/{devid}", self.backend))
    }

    /// Whether `path` may be accessed as `access`; the error says why not.
    pub fn check(&self, path: &str, access: Access) -> Result<(), String> {
        well_formed(path)?;
        let allowed = match access {
            Access::Read => within(path, &self.backend) || within(path, &self.errors) || within(path, &self.frontends),
            Access::Write => {
                vbd_leaf(path, &self.backend).is_some_and(|name| WRITABLE.contains(&name))
                    || vbd_leaf(path, &self.errors) == Some("error")
            }
        };
        if allowed {
            Ok(())
        } else {
            let what = if access == Access::Read { "read" } else { "write" };
            Err(format!("{path}: outside this guest's vbds (may not {what})"))
        }
    }
}

/// The node name of `root/<devid>/<name>` (a decimal devid), if `path` is one.
fn vbd_leaf<'a>(path: &'a str, root: &str) -> Option<&'a str> {
    let rest = path.strip_prefix(root)?.strip_prefix('/')?;
    let (devid, name) = rest.split_once('/')?;
    (devid.parse::<u32>().is_ok() && !name.contains('/')).then_some(name)
}

/// `path` is `root` or below it.
fn within(path: &str, root: &str) -> bool {
    path == root || path.strip_prefix(root).is_some_and(|rest| rest.starts_with('/'))
}

fn well_formed(path: &str) -> Result<(), String> {
    if path.len() > MAX_PATH {
        return Err(format!("path of {} bytes (at most {MAX_PATH})", path.len()));
    }
    let Some(rest) = path.strip_prefix('/') else { return Err(format!("{path:?}: not an absolute path")) };
    if rest.split('/').any(|c| c.is_empty() || c == "." || c == ".." || c.contains('\0')) {
        return Err(format!("{path:?}: malformed path"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_reaches_its_own_guests_vbds_only() {
        let p = Policy::for_guest("/local/domain/0", 7);
        for path in [
            "/local/domain/0/backend/vbd/7/51712/state",
            "/local/domain/0/backend/vbd/7/51712/sectors",
            "/local/domain/0/backend/vbd/7/51712/opened",
            "/local/domain/0/error/backend/vbd/7/51712/error",
        ] {
            assert_eq!(p.check(path, Access::Write), Ok(()), "{path}");
            assert_eq!(p.check(path, Access::Read), Ok(()), "{path}");
        }
        for path in ["/local/domain/0/backend/vbd/7", "/local/domain/7/device/vbd/51712/ring-ref"] {
            assert_eq!(p.check(path, Access::Read), Ok(()), "{path}");
        }
        let refused = [
            ("/local/domain/0/backend/vbd/7", Access::Write),
            ("/local/domain/0/backend/vbd/7/51712", Access::Write),
            ("/local/domain/0/backend/vbd/7/51712/params", Access::Write),
            ("/local/domain/0/backend/vbd/7/51712/physical-device", Access::Write),
            ("/local/domain/0/backend/vbd/7/51712/diskseq", Access::Write),
            ("/local/domain/0/backend/vbd/7/51712/mode", Access::Write),
            ("/local/domain/0/backend/vbd/7/51712/frontend", Access::Write),
            ("/local/domain/0/backend/vbd/7/51712/state/x", Access::Write),
            ("/local/domain/0/backend/vbd/7/x/state", Access::Write),
            ("/local/domain/0/error/backend/vbd/7/51712/other", Access::Write),
            ("/local/domain/7/device/vbd/51712/state", Access::Write),
            ("/local/domain/0/backend/vbd/70/51712/state", Access::Read),
            ("/local/domain/0/backend/vbd/8/51712/params", Access::Read),
            ("/local/domain/0/backend/vbd", Access::Read),
            ("/local/domain/0/backend/vif/7/0", Access::Read),
            ("/local/domain/8/device/vbd/51712", Access::Read),
            ("/local/domain/7/name", Access::Read),
            ("/tool/xenstored", Access::Read),
            ("/local/domain/0/backend/vbd/7/../8", Access::Read),
            ("/local/domain/0/backend/vbd/7//x", Access::Read),
            ("/local/domain/0/backend/vbd/7/", Access::Read),
            ("/local/domain/0/backend/vbd/7/./x", Access::Write),
            ("local/domain/0/backend/vbd/7", Access::Read),
            ("/local/domain/0/backend/vbd/7/a\0b", Access::Read),
            ("", Access::Read),
        ];
        for (path, access) in refused {
            assert!(p.check(path, access).is_err(), "{path:?} {access:?} must be refused");
        }
        let long = format!("/local/domain/0/backend/vbd/7/{}", "x".repeat(4000));
        assert!(p.check(&long, Access::Read).is_err());
    }

    #[test]
    fn a_write_belongs_to_its_vbds_backend_directory() {
        let p = Policy::for_guest("/local/domain/0", 7);
        let vbd = Some("/local/domain/0/backend/vbd/7/51712".to_string());
        assert_eq!(p.vbd_of_write("/local/domain/0/backend/vbd/7/51712/state"), vbd);
        assert_eq!(p.vbd_of_write("/local/domain/0/error/backend/vbd/7/51712/error"), vbd);
        assert_eq!(p.vbd_of_write("/local/domain/7/device/vbd/51712/state"), None);
    }

    #[test]
    fn a_driver_domain_path_is_honoured() {
        let p = Policy::for_guest("/local/domain/5/", 9);
        assert_eq!(p.check("/local/domain/5/backend/vbd/9/1/state", Access::Write), Ok(()));
        assert!(p.check("/local/domain/0/backend/vbd/9/1/state", Access::Read).is_err());
    }
}
