// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Test support for the vhost-user end-to-end tests: the `blkbackd` process, guest RAM, and two drivers on
//! the `virtio-driver` crate's vhost-user transport (its virtio-blk driver, and a raw one that can build any
//! descriptor chain).
//!
//! This is a directory module so that Cargo does not build it as a test target of its own.

// Each test file uses a different part of this module.
#![allow(dead_code, unused_imports)]

pub mod blk;
pub mod daemon;
pub mod frontend;
pub mod memory;
pub mod raw;

use std::os::fd::RawFd;
use std::path::PathBuf;
use std::time::Duration;

pub use blk::{BlkClient, Op};
pub use daemon::Daemon;
pub use memory::SharedMem;
pub use raw::{Desc, Outcome, RawClient, UNTOUCHED};

/// How long a request may take before a test fails instead of hanging.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Wait until at least one of `fds` is readable (panics after [`IO_TIMEOUT`]); the indices of the readable ones.
pub fn wait_readable(fds: &[RawFd]) -> Vec<usize> {
    let mut pfds: Vec<libc::pollfd> =
        fds.iter().map(|&fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 }).collect();
    let timeout = libc::c_int::try_from(IO_TIMEOUT.as_millis()).expect("timeout fits");
    loop {
        let n = libc::nfds_t::try_from(pfds.len()).expect("few fds");
        // SAFETY: `pfds` is a valid array of `n` pollfd structures.
        let rc = unsafe { libc::poll(pfds.as_mut_ptr(), n, timeout) };
        if rc < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        assert!(rc > 0, "no completion within {IO_TIMEOUT:?} (poll returned {rc})");
        return pfds.iter().enumerate().filter(|(_, p)| p.revents != 0).map(|(i, _)| i).collect();
    }
}

/// A temporary directory with a disk image of `size` bytes filled with `fill`, and a socket path.
pub struct Scratch {
    /// Keeps the directory alive.
    pub dir: tempfile::TempDir,
    /// The disk image.
    pub disk: PathBuf,
    /// Where the daemon listens.
    pub socket: PathBuf,
}

impl Scratch {
    /// A directory with a `size`-byte image of `fill` bytes.
    pub fn new(size: usize, fill: u8) -> Scratch {
        let dir = tempfile::tempdir().expect("temp dir");
        let disk = dir.path().join("disk.img");
        std::fs::write(&disk, vec![fill; size]).expect("write the image");
        let socket = dir.path().join("vhost.sock");
        Scratch { dir, disk, socket }
    }

    /// A directory with a `size`-byte image holding the pattern of `seed` ([`test_kit::pattern`]), and that
    /// content.
    pub fn with_pattern(size: usize, seed: u64) -> (Scratch, Vec<u8>) {
        let scratch = Scratch::new(size, 0);
        let content = test_kit::pattern(size, seed);
        std::fs::write(&scratch.disk, &content).expect("write the image");
        (scratch, content)
    }
}
