// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Shared helpers of the workspace's tests (a dev-dependency only; never part of a shipped binary): real loop
//! devices and mounts that are torn down on drop, failing storage for the fault tests, deterministic byte
//! patterns, and the hostile Xen frontends played by transport-xen's and the daemon's tests.
//!
//! Where the host cannot provide a piece (not root, no loop devices, no mounts), the constructors say why, so
//! the test can skip with that message.

// Test helpers: a failed setup is a failed test.
#![allow(clippy::unwrap_used, missing_debug_implementations)]

pub mod alloc;
pub mod loop_device;
pub mod mount;
pub mod pattern;
pub mod storage;
pub mod xen_bed;
pub mod xen_hostile;

use std::path::Path;
use std::process::Command;

pub use loop_device::{loop_devices, LoopDevice, LoopLock};
pub use mount::Mount;
pub use pattern::{fill_pattern_at, pattern};

/// Whether this process runs as root (mounts and loop devices need it).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Run `program args...`: its trimmed stdout, or what went wrong.
pub fn command(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program).args(args).output().map_err(|e| format!("cannot run {program}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!("{program} {args:?}: {}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// `path` as UTF-8, or why not (the helpers pass paths to commands as strings).
pub fn utf8(path: &Path) -> Result<&str, String> {
    path.to_str().ok_or_else(|| format!("non-UTF-8 path {}", path.display()))
}
