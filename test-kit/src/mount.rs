// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! File systems mounted on fresh temporary directories, unmounted on drop.

use std::path::Path;

use crate::{command, is_root, utf8};

/// A file system mounted on a fresh temporary directory, lazily unmounted on drop (so a process still holding
/// a file there cannot keep the mount alive past the test).
#[derive(Debug)]
pub struct Mount {
    dir: tempfile::TempDir,
}

impl Mount {
    /// A tmpfs of `size` (as `mount -o size=` takes it, e.g. `"4m"`), or why not.
    pub fn tmpfs(size: &str) -> Result<Mount, String> {
        Self::run_mount(&["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
    }

    /// Mount the file system on `device`, or why not.
    pub fn device(device: &Path) -> Result<Mount, String> {
        Self::run_mount(&[utf8(device)?])
    }

    fn run_mount(args: &[&str]) -> Result<Mount, String> {
        if !is_root() {
            return Err("not running as root".into());
        }
        let dir = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
        let mut all = args.to_vec();
        all.push(utf8(dir.path())?);
        command("mount", &all)?;
        Ok(Mount { dir })
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Some(target) = self.dir.path().to_str() {
            if let Err(e) = command("umount", &["-l", target]) {
                eprintln!("cannot unmount {target}: {e}");
            }
        }
    }
}
