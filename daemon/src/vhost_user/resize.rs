// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Disk growth over vhost-user: `blkbackd resize --control PATH` asks for a size check now, and a watcher checks
//! every second (a file extended, a loop device re-read with `losetup -c`, a logical volume extended: the kernel's
//! size change is seen within the second, as on the Xen side). Growth is announced to the connected frontend with
//! the config-change message; a disk that shrank is refused and logged once per size.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;
use vhost_user_blk::ResizeHandle;

use crate::control::ResizeHook;
use crate::signals::Shutdown;

/// How often the watcher looks at the disk's size.
const SIZE_CHECK: Duration = Duration::from_secs(1);

/// The answer of `blkbackd resize`: what the check found, or `error: …` (which the client exits non-zero on).
pub fn control_hook(handle: ResizeHandle) -> ResizeHook {
    Arc::new(move || match handle.check() {
        Ok(outcome) => outcome.to_string(),
        Err(error) => format!("error: {error}"),
    })
}

/// Check the disk's size every [`SIZE_CHECK`] until a shutdown is requested.
pub fn spawn_watcher(handle: ResizeHandle, shutdown: Arc<Shutdown>) -> anyhow::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("blkbackd-size".to_string())
        .spawn(move || {
            let mut last_error = String::new();
            while !shutdown.is_requested() {
                std::thread::sleep(SIZE_CHECK);
                match handle.check() {
                    Ok(_) => last_error.clear(),
                    Err(error) => {
                        let text = error.to_string();
                        if text != last_error {
                            tracing::warn!(error = %text, "the disk's size check failed; the size served stays as it was");
                            last_error = text;
                        }
                    }
                }
            }
        })
        .context("cannot start the disk size watcher")
}
