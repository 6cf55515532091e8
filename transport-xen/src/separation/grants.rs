// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The grant pages a worker may hold, bounded by its broker ([`GrantLedger`]).
//!
//! Linux's gntdev takes a page of the backend domain's memory (ballooned out, outside any cgroup) for every grant
//! registered on an open file, and keeps it until the registration and every mapping of it are gone (a mapping
//! cut in pieces, or shrunk, still holds the whole batch); Xen takes a maptrack entry of the backend domain for
//! every grant mapped. Both are shared by every guest this domain serves. A worker its guest took over could
//! otherwise have grants registered and mapped without end, and starve the other guests' backends. So the broker
//! keeps a budget per worker, charged with whole registrations:
//!
//! - **Only the broker registers and unregisters.** The worker's filter refuses both calls; it asks for maps
//!   ([`Request::MapGrants`](super::wire::Request)) and mmaps and munmaps what it got. What the worker holds is
//!   therefore at most the registrations the broker made and has not dropped: the ledger's charge.
//! - **A registration is dropped once nothing of it is mapped.** When a new registration would pass the budget
//!   (then with a backoff while that frees nothing), or every [`RECLAIM_EVERY_REGISTRATIONS`] registrations or
//!   [`RECLAIM_EVERY`] pages, the broker stops the worker (`SIGSTOP`, waited for at most [`STOP_TIMEOUT`]),
//!   reads its memory map (`/proc/<pid>/maps`, opened when the worker started, while it could still be read),
//!   drops every registration no piece of which is mapped (a piece keeps its file offset, inside its
//!   registration's range; offsets are compared as gntdev reads them, cut to 32 bits of pages), and lets the
//!   worker go on (`SIGCONT`). Stopped, the worker can neither hide a mapping from the read (move it behind the
//!   read's position) nor map what is being dropped; dropped, a registration can no longer be mapped. A map that
//!   still finds no room is refused (`ENOSPC`): its own guest's I/O fails, nobody else's. A mapping of the
//!   device that is of no registration ends the worker's session.
//! - **What the worker cannot do to that**: its filter refuses `CLONE_VFORK` and every signal to itself but
//!   `SIGABRT` and `SIGSYS` (either could keep a stop from completing or end it early), an owner or a signal for
//!   a descriptor's events (`F_SETOWN`, `F_SETSIG`: its guest's notifications could then send it `SIGCONT`), and
//!   mmap offsets and lengths gntdev would cut to 32 bits.
//!
//! A worker that maps and unmaps per request (a frontend without persistent grants) leaves registrations behind
//! until the next reclaim: at most 256 of them (gntdev keeps an open file's registrations in a list that each
//! registration, mmap and drop walks, so a longer one costs every request).
//!
//! On a PV backend domain each grant page a worker maps takes two maptrack entries (its user mapping and the
//! kernel's). Kernels before 6.1 (5.15.75 among the stable ones) leak the grants of a gntdev mapping split by a
//! partial unmap, outside any budget.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::services::{DomId, GrantRef, XenError, XEN_PAGE_SIZE};
use crate::xen::GntDev;

/// The grant pages a worker may hold by default (256 MiB of the backend domain's memory): room for 15 vbds of 4
/// queues with full persistent-grant caches (1 056 grants and up to 16 ring pages a queue).
pub const DEFAULT_GRANT_PAGE_BUDGET: u64 = 65_536;

/// A worker's grant device as its broker uses it.
pub trait WorkerGrantDevice: Send {
    /// Register `refs` of `domid` on the worker's device; their offset in it (bytes).
    fn register(&self, domid: DomId, refs: &[GrantRef]) -> Result<u64, XenError>;
    /// Drop the registration of `pages` at `index`; whether it is gone.
    fn unregister(&self, index: u64, pages: usize) -> bool;
    /// Stop the worker until [`resume`](Self::resume): it then maps and unmaps nothing.
    fn stop(&mut self) -> Result<(), XenError>;
    /// Let a stopped worker go on.
    fn resume(&mut self);
    /// The parts of the device the worker has mapped: (file offset, length), in bytes.
    fn mapped(&mut self) -> Result<Vec<(u64, u64)>, XenError>;
}

/// What a worker's ledger holds and has done, for the service's metrics: updated by the ledger after every map it
/// is asked for, read by any thread.
#[derive(Debug, Default)]
pub struct GrantFigures {
    /// Grant pages charged to the worker now (its registrations not dropped).
    pub pages: AtomicU64,
    /// The grant pages it may hold.
    pub budget: AtomicU64,
    /// Maps refused because it held its budget (`ENOSPC`: its guest's requests fail).
    pub refused: AtomicU64,
    /// Times it was stopped so that what it no longer maps could be dropped.
    pub reclaims: AtomicU64,
}

/// The grant pages one worker holds, kept within a budget (see the module's documentation).
pub struct GrantLedger {
    figures: Arc<GrantFigures>,
    device: Box<dyn WorkerGrantDevice>,
    budget: u64,
    /// The registrations made and not dropped: offset (bytes) → pages.
    registered: BTreeMap<u64, usize>,
    charged: u64,
    /// Registrations and pages made since the last reclaim.
    since_reclaim: (u64, u64),
    reclaims: u64,
    /// After a reclaim forced by the budget that freed nothing: no such reclaim before this, and the next wait
    /// twice as long (a worker at its budget could otherwise have it stopped and its map read at every request).
    backoff: Option<(Instant, Duration)>,
    /// Why the worker is to be treated as hostile, once it is.
    misbehaved: Option<String>,
}

/// Registrations made after which the broker drops what the worker no longer maps, budget or not: gntdev keeps
/// the registrations of an open file in a list that each registration, mmap and drop walks.
pub const RECLAIM_EVERY_REGISTRATIONS: u64 = 256;
/// Pages registered after which the broker does the same (16 MiB).
pub const RECLAIM_EVERY: u64 = 4096;
/// The longest wait for a worker to stop before a reclaim gives up (the map asked for is then refused).
pub const STOP_TIMEOUT: Duration = Duration::from_secs(1);
const BACKOFF_FIRST: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

impl std::fmt::Debug for GrantLedger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrantLedger").field("budget", &self.budget).field("charged", &self.charged).finish()
    }
}

impl GrantLedger {
    /// A ledger for the worker behind `device`, which may hold `budget` grant pages.
    pub fn new(device: Box<dyn WorkerGrantDevice>, budget: u64) -> GrantLedger {
        let figures = Arc::new(GrantFigures::default());
        figures.budget.store(budget, Ordering::Relaxed);
        GrantLedger {
            figures,
            device,
            budget,
            registered: BTreeMap::new(),
            charged: 0,
            since_reclaim: (0, 0),
            reclaims: 0,
            backoff: None,
            misbehaved: None,
        }
    }

    /// Register `refs` of `domid` for the worker, within its budget: their offset, or `ENOSPC` when what it
    /// holds leaves no room for them. After an error, [`misbehaved`](Self::misbehaved) says whether the worker
    /// is to be stopped for good.
    pub fn register(&mut self, domid: DomId, refs: &[GrantRef]) -> Result<u64, XenError> {
        let result = self.register_within_budget(domid, refs);
        let figures = &self.figures;
        figures.pages.store(self.charged, Ordering::Relaxed);
        figures.reclaims.store(self.reclaims, Ordering::Relaxed);
        if matches!(result, Err(XenError::Os { errno: libc::ENOSPC, .. })) {
            figures.refused.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    fn register_within_budget(&mut self, domid: DomId, refs: &[GrantRef]) -> Result<u64, XenError> {
        let wanted = refs.len() as u64;
        let over_budget = self.charged + wanted > self.budget;
        let periodic =
            self.since_reclaim.0 + 1 > RECLAIM_EVERY_REGISTRATIONS || self.since_reclaim.1 + wanted > RECLAIM_EVERY;
        let backing_off = self.backoff.is_some_and(|(until, _)| Instant::now() < until);
        if periodic || (over_budget && !backing_off) {
            if let Err(e) = self.reclaim() {
                // Within the budget the map goes on (a worker whose thread sits in the kernel for a while keeps
                // serving); beyond it, it waits out the backoff like a reclaim that freed nothing.
                tracing::warn!(domid, error = %e, "could not drop the worker's unmapped grant registrations");
                if !over_budget {
                    return self.make(domid, refs);
                }
            }
            if self.charged + wanted > self.budget {
                if !backing_off {
                    tracing::warn!(
                        domid,
                        held = self.charged,
                        wanted,
                        budget = self.budget,
                        "grant maps refused: the worker holds its budget of grant pages"
                    );
                }
                let wait = self.backoff.map_or(BACKOFF_FIRST, |(_, wait)| (wait * 2).min(BACKOFF_MAX));
                self.backoff = Some((Instant::now() + wait, wait));
            }
        }
        if let Some(why) = &self.misbehaved {
            return Err(XenError::Os { what: why.clone(), errno: libc::EPERM });
        }
        if self.charged + wanted > self.budget {
            return Err(XenError::Os {
                what: format!(
                    "registering {wanted} grant(s): the worker holds {} grant pages, of the {} it may hold \
                     (blkbackd xen --max-grant-pages)",
                    self.charged, self.budget
                ),
                errno: libc::ENOSPC,
            });
        }
        self.make(domid, refs)
    }

    /// Register `refs` (within the budget) and charge them.
    fn make(&mut self, domid: DomId, refs: &[GrantRef]) -> Result<u64, XenError> {
        let index = self.device.register(domid, refs)?;
        // gntdev hands out an offset only once: one still on the books was dropped after all.
        if let Some(stale) = self.registered.insert(index, refs.len()) {
            self.charged -= stale as u64;
        }
        self.charged += refs.len() as u64;
        self.since_reclaim.0 += 1;
        self.since_reclaim.1 += refs.len() as u64;
        self.backoff = None;
        Ok(index)
    }

    /// Why the worker is to be stopped for good (a mapping of the grant device that is of no registration the
    /// broker made), if it is.
    pub fn misbehaved(&self) -> Option<&str> {
        self.misbehaved.as_deref()
    }

    /// Drop, with the worker stopped, every registration of which nothing is mapped.
    fn reclaim(&mut self) -> Result<(), XenError> {
        self.reclaims += 1;
        self.since_reclaim = (0, 0);
        self.device.stop()?;
        let mapped = self.device.mapped();
        let result = mapped.map(|mapped| self.drop_unmapped(&mapped));
        self.device.resume();
        result
    }

    fn drop_unmapped(&mut self, mapped: &[(u64, u64)]) {
        let page = XEN_PAGE_SIZE as u64;
        let mut in_use = std::collections::BTreeSet::new();
        for &(offset, len) in mapped {
            // As gntdev finds the registration an mmap names: by the page offset cut to 32 bits (`int index =
            // vma->vm_pgoff`), so an offset above 2^44 names the registration its low bits name.
            let first = ((offset / page) & u64::from(u32::MAX)) * page;
            let hit = self.registered.range(..=first).next_back().filter(|(&index, &pages)| {
                first < index + pages as u64 * page && first + len <= index + pages as u64 * page
            });
            match hit {
                Some((&index, _)) => {
                    in_use.insert(index);
                }
                None => {
                    self.misbehaved.get_or_insert_with(|| {
                        format!(
                            "a mapping of the grant device at offset {offset:#x} ({len} bytes) that is of no \
                             registration the broker made"
                        )
                    });
                }
            }
        }
        if self.misbehaved.is_some() {
            // What it maps is not what we know of: drop nothing (the broker ends its session).
            return;
        }
        let GrantLedger { device, registered, charged, .. } = self;
        registered.retain(|&index, &mut pages| {
            // Charged still if the drop failed: the pages may be held.
            let dropped = !in_use.contains(&index) && device.unregister(index, pages);
            if dropped {
                *charged -= pages as u64;
            }
            !dropped
        });
    }

    /// Grant pages charged to the worker now.
    pub fn charged(&self) -> u64 {
        self.charged
    }

    /// How many times the worker was stopped to drop what it no longer maps.
    pub fn reclaims(&self) -> u64 {
        self.reclaims
    }

    /// The ledger's figures, as other threads read them.
    pub fn figures(&self) -> Arc<GrantFigures> {
        Arc::clone(&self.figures)
    }
}

/// A worker's grant device in the supervisor: the duplicate of the descriptor handed to the worker (the same open
/// file, so the same registrations), the worker's memory map, and a pidfd to stop and resume it by.
#[derive(Debug)]
pub struct WorkerGntDev {
    device: GntDev,
    /// The grant device's identity in a memory map (the device number of its file system, and its inode).
    identity: (u64, u64),
    maps: File,
    pidfd: OwnedFd,
}

impl WorkerGntDev {
    /// The device `file` (a duplicate of the worker's) of child process `pid`. Call it before the worker gives up
    /// its privileges: its memory map is read through the descriptor opened now. The worker must be a child of
    /// this process (it is waited for when stopped).
    pub fn new(file: File, pid: u32) -> Result<WorkerGntDev, XenError> {
        let meta = file.metadata().map_err(|e| XenError::os("gntdev: fstat", &e))?;
        let path = format!("/proc/{pid}/maps");
        let maps = File::open(&path).map_err(|e| XenError::os(format!("opening {path}"), &e))?;
        let pidfd = pidfd_open(pid).map_err(|e| XenError::os(format!("pidfd_open {pid}"), &e))?;
        Ok(WorkerGntDev { device: GntDev::from_file(file), identity: (meta.dev(), meta.ino()), maps, pidfd })
    }

    fn signal(&self, signal: libc::c_int) -> std::io::Result<()> {
        // SAFETY: pidfd_send_signal on our pidfd with no siginfo.
        let rc = unsafe {
            libc::syscall(libc::SYS_pidfd_send_signal, self.pidfd.as_raw_fd(), signal, std::ptr::null::<u8>(), 0)
        };
        if rc < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    }
}

impl WorkerGrantDevice for WorkerGntDev {
    fn register(&self, domid: DomId, refs: &[GrantRef]) -> Result<u64, XenError> {
        self.device.register_refs(domid, refs)
    }

    fn unregister(&self, index: u64, pages: usize) -> bool {
        match self.device.unregister_refs(index, pages) {
            // ENOENT: gntdev holds no such registration (any more).
            Ok(()) => true,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => true,
            Err(e) => {
                tracing::error!(%e, index, pages, "gntdev: dropping a worker's registration failed");
                false
            }
        }
    }

    fn stop(&mut self) -> Result<(), XenError> {
        self.signal(libc::SIGSTOP).map_err(|e| XenError::os("stopping the worker", &e))?;
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            // SAFETY: an all-zero siginfo is a valid out-buffer.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            // Left reportable (WNOWAIT): the supervisor's own wait for the worker's end must still see it.
            let flags = libc::WSTOPPED | libc::WEXITED | libc::WNOWAIT | libc::WNOHANG;
            // SAFETY: waitid on our pidfd (P_PIDFD) with a valid siginfo out-pointer.
            let rc = unsafe { libc::waitid(libc::P_PIDFD, self.pidfd.as_raw_fd() as libc::id_t, &mut info, flags) };
            if rc < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                self.resume();
                return Err(XenError::os("waiting for the worker to stop", &e));
            }
            // SAFETY: waitid filled `info` (or left it zeroed, si_pid 0, for a worker not stopped yet).
            let pid = unsafe { info.si_pid() };
            if pid != 0 {
                return match info.si_code {
                    libc::CLD_STOPPED | libc::CLD_TRAPPED => Ok(()),
                    _ => Err(XenError::Os { what: "the worker ended".into(), errno: libc::ESRCH }),
                };
            }
            // Not every thread has stopped yet (one may be in the kernel on a slow disk; a hostile worker may keep
            // one from stopping): give up after a while, and let it go on.
            if Instant::now() >= deadline {
                self.resume();
                return Err(XenError::Os {
                    what: format!("the worker did not stop within {STOP_TIMEOUT:?} to have its grant maps counted"),
                    errno: libc::EAGAIN,
                });
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    fn resume(&mut self) {
        if let Err(e) = self.signal(libc::SIGCONT) {
            tracing::warn!(%e, "cannot resume the worker after counting its grant maps");
        }
    }

    fn mapped(&mut self) -> Result<Vec<(u64, u64)>, XenError> {
        let mut text = Vec::new();
        self.maps
            .seek(SeekFrom::Start(0))
            .and_then(|_| self.maps.read_to_end(&mut text))
            .map_err(|e| XenError::os("reading the worker's memory map", &e))?;
        Ok(mappings_of(&String::from_utf8_lossy(&text), self.identity))
    }
}

/// The mappings of the file `identity` (device number, inode) in a memory map's text (`/proc/<pid>/maps`:
/// `start-end perms offset major:minor inode [path]`, numbers in hex but the inode): (file offset, length).
pub fn mappings_of(maps: &str, identity: (u64, u64)) -> Vec<(u64, u64)> {
    let (dev, ino) = identity;
    let (major, minor) = (u64::from(libc::major(dev)), u64::from(libc::minor(dev)));
    let mut found = Vec::new();
    for line in maps.lines() {
        let mut fields = line.split_ascii_whitespace();
        let (Some(range), Some(_perms), Some(offset), Some(device), Some(inode)) =
            (fields.next(), fields.next(), fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let same_device = device.split_once(':').is_some_and(|(ma, mi)| {
            u64::from_str_radix(ma, 16).ok() == Some(major) && u64::from_str_radix(mi, 16).ok() == Some(minor)
        });
        if !same_device || inode.parse::<u64>().ok() != Some(ino) {
            continue;
        }
        let hex = |t: &str| u64::from_str_radix(t, 16).ok();
        if let (Some((start, end)), Some(offset)) = (range.split_once('-'), hex(offset)) {
            if let (Some(start), Some(end)) = (hex(start), hex(end)) {
                found.push((offset, end.saturating_sub(start)));
            }
        }
    }
    found
}

/// A pidfd for process `pid` (`pidfd_open(2)`, Linux 5.3): signals and waits that cannot reach another process
/// that took the number after it ended.
pub fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags; it returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, libc::c_long::from(pid), 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(std::io::Error::other)?;
    // SAFETY: a fresh descriptor the kernel just gave us, owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
#[path = "grants_tests.rs"]
mod tests;
