// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Real loop devices over files, detached on drop (also when a test panics).
//!
//! Tests that use loop devices hold the process's [`LoopLock`] ([`loop_devices`]): the host's loop devices are
//! shared, and a test that reuses a device node must not race another test's attach. Nothing assumes a
//! particular free loop number.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use crate::{command, is_root, utf8};

static LOOP_LOCK: Mutex<()> = Mutex::new(());

/// The process's loop-device lock: one loop-device test at a time in this process.
#[derive(Debug)]
pub struct LoopLock(#[allow(dead_code)] MutexGuard<'static, ()>);

/// Why loop devices cannot be used here, if they cannot: not root, no `/dev/loop-control`, no `losetup`.
pub fn unavailable() -> Option<String> {
    if !is_root() {
        Some("not running as root".to_string())
    } else if !Path::new("/dev/loop-control").exists() {
        Some("/dev/loop-control is absent".to_string())
    } else {
        command("losetup", &["--version"]).err()
    }
}

/// Take the loop-device lock if loop devices can be used here; else say why not on stderr and return `None`:
/// the test then returns early (`let Some(_lock) = loop_devices() else { return };`).
pub fn loop_devices() -> Option<LoopLock> {
    if let Some(why) = unavailable() {
        eprintln!("skipping: loop devices unavailable: {why}");
        return None;
    }
    Some(LoopLock(LOOP_LOCK.lock().unwrap_or_else(PoisonError::into_inner)))
}

/// A loop device over a file, detached on drop.
#[derive(Debug)]
pub struct LoopDevice {
    /// `/dev/loopN`.
    pub path: PathBuf,
}

impl LoopDevice {
    /// Attach `file` to a free loop device, or why not.
    pub fn attach(file: &Path) -> Result<LoopDevice, String> {
        Self::attach_with(file, &[])
    }

    /// Attach `file` to a free loop device with extra `losetup` options (e.g. `-r`, `--sector-size 4096`).
    pub fn attach_with(file: &Path, options: &[&str]) -> Result<LoopDevice, String> {
        if !is_root() {
            return Err("not running as root".into());
        }
        if !Path::new("/dev/loop-control").exists() {
            return Err("/dev/loop-control is absent".into());
        }
        let args: Vec<&str> = options.iter().copied().chain(["-f", "--show", utf8(file)?]).collect();
        // Another process may take the free device between losetup's look-up and its attach: try again.
        let mut last = String::new();
        for _ in 0..5 {
            match command("losetup", &args) {
                Ok(dev) => return Ok(LoopDevice { path: PathBuf::from(dev) }),
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(last)
    }

    /// Attach `file` to the given (free) device node, or why not.
    pub fn attach_at(dev: &Path, file: &Path) -> Result<LoopDevice, String> {
        command("losetup", &[utf8(dev)?, utf8(file)?]).map(|_| LoopDevice { path: dev.to_path_buf() })
    }

    /// `loopN`.
    pub fn name(&self) -> &str {
        self.path.file_name().and_then(|n| n.to_str()).expect("device name")
    }

    fn sysfs(&self, attribute: &str) -> String {
        let path = format!("/sys/block/{}/{attribute}", self.name());
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        text.trim().to_string()
    }

    /// The disk sequence number sysfs shows (what a toolstack would pin).
    pub fn diskseq(&self) -> u64 {
        self.sysfs("diskseq").parse().expect("numeric diskseq")
    }

    /// The device number (major, minor).
    pub fn major_minor(&self) -> (u32, u32) {
        let dev = self.sysfs("dev");
        let (major, minor) = dev.split_once(':').expect("major:minor");
        (major.parse().expect("major"), minor.parse().expect("minor"))
    }

    /// Size in bytes as the kernel sees it now.
    pub fn size(&self) -> u64 {
        self.sysfs("size").parse::<u64>().expect("sectors") * 512
    }

    /// Make the device as big as its backing file is now (`losetup -c`).
    pub fn refresh_capacity(&self) -> Result<(), String> {
        command("losetup", &["-c", utf8(&self.path)?]).map(drop)
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let dev = self.path.to_string_lossy();
        if let Err(e) = command("losetup", &["-d", &dev]) {
            eprintln!("cannot detach {dev}: {e}");
        }
    }
}
