// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The grant pages a worker may hold, bounded by its broker ([`GrantLedger`]).
//!
//! Linux's gntdev takes a page of the backend domain's memory (ballooned out, outside any cgroup) for every grant
//! registered on an open file until the registration and every mapping of it are gone, and Xen a maptrack entry
//! of the backend domain for every grant mapped; both are shared by every guest this domain serves. A worker its
//! guest took over could otherwise have grants registered and mapped without end, and starve the other guests'
//! backends of memory and maptrack entries. So the broker keeps a budget per worker:
//!
//! - **Registrations are short-lived.** A registration's only use is to be mmapped once (a PV domain allows no
//!   more); the worker drops it right after its mmap ([`BrokeredGrants`](super::client::BrokeredGrants)), the
//!   mapping living on in the worker's address space. Before each new registration the broker drops the previous
//!   one itself (a worker that did not is not trusted to), so at most one request's refs are registered and not
//!   mapped at any time. Only the broker registers (the worker's filter refuses the call), so the previous
//!   registration's offset cannot name anything else.
//! - **Mappings are counted where the worker cannot hide them**: in its address space, read from
//!   `/proc/<pid>/maps` ([`WorkerGntDev`]; the file is opened when the worker starts, while it may still be read).
//!   Every mapping the worker makes is of a registration made since, so the pages it holds are at most those it
//!   had mapped at the last count plus those registered since; the broker counts again only when that sum would
//!   pass the budget, and refuses the registration (`ENOSPC`) if what is really mapped leaves no room. A worker
//!   that unmaps gets room again.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;

use crate::services::{DomId, GrantRef, XenError, XEN_PAGE_SIZE};
use crate::xen::GntDev;

/// The grant pages a worker may hold by default (256 MiB of the backend domain's memory): room for 15 vbds of 4
/// queues with full persistent-grant caches (1 056 grants and up to 16 ring pages a queue).
pub const DEFAULT_GRANT_PAGE_BUDGET: u64 = 65_536;

/// A worker's grant device as its broker uses it.
pub trait WorkerGrantDevice: Send {
    /// Register `refs` of `domid` on the worker's device; their offset in it.
    fn register(&self, domid: DomId, refs: &[GrantRef]) -> Result<u64, XenError>;
    /// Drop the registration of `pages` at `index`, if it is still there (the worker may have dropped it).
    fn unregister(&self, index: u64, pages: usize);
    /// The grant pages the worker has mapped now.
    fn mapped_pages(&mut self) -> Result<u64, XenError>;
}

/// The grant pages one worker holds, kept within a budget (see the module's documentation).
pub struct GrantLedger {
    device: Box<dyn WorkerGrantDevice>,
    budget: u64,
    /// The last registration (offset, pages): mapped by now, or never to be.
    pending: Option<(u64, usize)>,
    /// Pages the worker had mapped at the last count.
    counted: u64,
    /// Pages registered since the last count.
    since_count: u64,
    counts: u64,
}

impl std::fmt::Debug for GrantLedger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrantLedger")
            .field("budget", &self.budget)
            .field("counted", &self.counted)
            .field("since_count", &self.since_count)
            .finish()
    }
}

impl GrantLedger {
    /// A ledger for the worker behind `device`, which may hold `budget` grant pages.
    pub fn new(device: Box<dyn WorkerGrantDevice>, budget: u64) -> GrantLedger {
        GrantLedger { device, budget, pending: None, counted: 0, since_count: 0, counts: 0 }
    }

    /// Register `refs` of `domid` for the worker, within its budget: their offset, or `ENOSPC` when the pages it
    /// holds leave no room for them.
    pub fn register(&mut self, domid: DomId, refs: &[GrantRef]) -> Result<u64, XenError> {
        // Dropped first: from now on the previous registration can no longer be mapped, so a count taken below
        // sees every mapping of it there will ever be.
        if let Some((index, pages)) = self.pending.take() {
            self.device.unregister(index, pages);
        }
        let wanted = refs.len() as u64;
        if self.counted + self.since_count + wanted > self.budget {
            self.counted = self.device.mapped_pages()?;
            self.since_count = 0;
            self.counts += 1;
            if self.counted + wanted > self.budget {
                tracing::warn!(
                    domid,
                    mapped = self.counted,
                    wanted,
                    budget = self.budget,
                    "grant map refused: the worker holds its budget of grant pages"
                );
                return Err(XenError::Os {
                    what: format!(
                        "registering {wanted} grant(s): the worker has {} grant pages mapped, of the {} it may hold \
                         (blkbackd xen --max-grant-pages)",
                        self.counted, self.budget
                    ),
                    errno: libc::ENOSPC,
                });
            }
        }
        let index = self.device.register(domid, refs)?;
        self.since_count += wanted;
        self.pending = Some((index, refs.len()));
        Ok(index)
    }

    /// How many times the worker's mappings were counted.
    pub fn counts(&self) -> u64 {
        self.counts
    }
}

/// A worker's grant device in the supervisor: the duplicate of the descriptor handed to the worker (the same open
/// file, so the same registrations), and the worker's memory map.
#[derive(Debug)]
pub struct WorkerGntDev {
    device: GntDev,
    /// The grant device's identity in a memory map (the device number of its file system, and its inode).
    identity: (u64, u64),
    maps: File,
}

impl WorkerGntDev {
    /// The device `file` (a duplicate of the worker's), counted in the memory map of process `pid`. Call it
    /// before the worker gives up its privileges: the map is read through the descriptor opened now.
    pub fn new(file: File, pid: u32) -> Result<WorkerGntDev, XenError> {
        let meta = file.metadata().map_err(|e| XenError::os("gntdev: fstat", &e))?;
        let path = format!("/proc/{pid}/maps");
        let maps = File::open(&path).map_err(|e| XenError::os(format!("opening {path}"), &e))?;
        Ok(WorkerGntDev { device: GntDev::from_file(file), identity: (meta.dev(), meta.ino()), maps })
    }
}

impl WorkerGrantDevice for WorkerGntDev {
    fn register(&self, domid: DomId, refs: &[GrantRef]) -> Result<u64, XenError> {
        self.device.register_refs(domid, refs)
    }

    fn unregister(&self, index: u64, pages: usize) {
        // Fails where the worker dropped it already, as it should have.
        let _ = self.device.unregister_refs(index, pages);
    }

    fn mapped_pages(&mut self) -> Result<u64, XenError> {
        let mut text = String::new();
        self.maps
            .seek(SeekFrom::Start(0))
            .and_then(|_| self.maps.read_to_string(&mut text))
            .map_err(|e| XenError::os("reading the worker's memory map", &e))?;
        Ok(mapped_pages_of(&text, self.identity))
    }
}

/// The pages of the mappings of the file `identity` (device number, inode) in a memory map's text
/// (`/proc/<pid>/maps`: `start-end perms offset major:minor inode [path]`, numbers in hex but the inode).
pub fn mapped_pages_of(maps: &str, identity: (u64, u64)) -> u64 {
    let (dev, ino) = identity;
    // The kernel prints MAJOR and MINOR of the device number, which for a file system's anonymous device fit
    // libc's split.
    let (major, minor) = (u64::from(libc::major(dev)), u64::from(libc::minor(dev)));
    let mut bytes = 0u64;
    for line in maps.lines() {
        let mut fields = line.split_ascii_whitespace();
        let (Some(range), Some(_perms), Some(_offset), Some(device), Some(inode)) =
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
        if let Some((start, end)) = range.split_once('-') {
            if let (Ok(start), Ok(end)) = (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16)) {
                bytes += end.saturating_sub(start);
            }
        }
    }
    bytes.div_ceil(XEN_PAGE_SIZE as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A grant device whose registrations and mapped pages the test sets: registered (index, pages), dropped
    /// offsets, and the pages "mapped".
    #[derive(Default)]
    struct Log {
        registered: Vec<(u64, usize)>,
        unregistered: Vec<u64>,
        mapped: u64,
        counted: u64,
    }

    struct FakeDevice(Arc<Mutex<Log>>);

    impl WorkerGrantDevice for FakeDevice {
        fn register(&self, _domid: DomId, refs: &[GrantRef]) -> Result<u64, XenError> {
            let mut log = self.0.lock().expect("log");
            let index = 0x1000 * (log.registered.len() as u64 + 1);
            log.registered.push((index, refs.len()));
            Ok(index)
        }

        fn unregister(&self, index: u64, _pages: usize) {
            self.0.lock().expect("log").unregistered.push(index);
        }

        fn mapped_pages(&mut self) -> Result<u64, XenError> {
            let mut log = self.0.lock().expect("log");
            log.counted += 1;
            Ok(log.mapped)
        }
    }

    fn ledger(budget: u64) -> (GrantLedger, Arc<Mutex<Log>>) {
        let log = Arc::new(Mutex::new(Log::default()));
        (GrantLedger::new(Box::new(FakeDevice(log.clone())), budget), log)
    }

    #[test]
    fn the_previous_registration_is_dropped_before_the_next() {
        let (mut ledger, log) = ledger(1 << 20);
        let first = ledger.register(7, &[1, 2]).expect("first");
        assert!(log.lock().expect("log").unregistered.is_empty());
        let second = ledger.register(7, &[3]).expect("second");
        assert_eq!(log.lock().expect("log").unregistered, [first], "one unmapped registration at a time");
        ledger.register(7, &[4]).expect("third");
        assert_eq!(log.lock().expect("log").unregistered, [first, second]);
        assert_eq!(ledger.counts(), 0, "far from the budget: the map is not read");
    }

    #[test]
    fn a_worker_that_keeps_its_mappings_is_refused_at_its_budget_and_gets_room_when_it_unmaps() {
        let (mut ledger, log) = ledger(100);
        // A worker that maps everything it gets and keeps it.
        let refs: Vec<GrantRef> = (0..40).collect();
        for _ in 0..2 {
            ledger.register(7, &refs).expect("within the budget");
            log.lock().expect("log").mapped += 40;
        }
        assert_eq!(ledger.counts(), 0);
        let refused = ledger.register(7, &refs).expect_err("80 mapped + 40 > 100");
        assert!(matches!(refused, XenError::Os { errno: libc::ENOSPC, .. }), "{refused:?}");
        assert!(refused.to_string().contains("--max-grant-pages"), "{refused}");
        assert_eq!(ledger.counts(), 1);
        // Twenty fit.
        ledger.register(7, &refs[..20]).expect("80 + 20 fit");
        log.lock().expect("log").mapped += 20;
        assert!(ledger.register(7, &[1]).is_err(), "100 mapped: full");
        // It unmaps half: room again.
        log.lock().expect("log").mapped = 50;
        ledger.register(7, &refs).expect("50 + 40 fit");
        assert_eq!(log.lock().expect("log").registered.len(), 4, "refused registrations were never made");
    }

    #[test]
    fn a_worker_that_unmaps_as_it_goes_is_counted_rarely() {
        // A frontend without persistent grants: every request mapped and unmapped.
        let (mut ledger, log) = ledger(1000);
        for _ in 0..10_000 {
            ledger.register(7, &[1, 2, 3, 4]).expect("always room");
        }
        let counted = log.lock().expect("log").counted;
        assert!(counted <= 45, "the map read {counted} times for 10 000 maps of 4 pages and a budget of 1000");
        assert_eq!(counted, ledger.counts());
    }

    #[test]
    fn mappings_of_a_file_are_counted_from_a_real_memory_map() {
        let file = tempfile::tempfile().expect("file");
        file.set_len(16 * XEN_PAGE_SIZE as u64).expect("size");
        let meta = file.metadata().expect("stat");
        let map = |pages: usize, offset: usize| {
            // SAFETY: a fresh shared read-only mapping of the file, chosen by the kernel, unmapped below.
            let ptr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    pages * XEN_PAGE_SIZE,
                    libc::PROT_READ,
                    libc::MAP_SHARED,
                    std::os::fd::AsRawFd::as_raw_fd(&file),
                    libc::off_t::try_from(offset * XEN_PAGE_SIZE).expect("small"),
                )
            };
            assert_ne!(ptr, libc::MAP_FAILED);
            (ptr, pages * XEN_PAGE_SIZE)
        };
        let (a, b) = (map(3, 0), map(5, 8));
        let maps = std::fs::read_to_string("/proc/self/maps").expect("maps");
        assert_eq!(mapped_pages_of(&maps, (meta.dev(), meta.ino())), 8);
        assert_eq!(mapped_pages_of(&maps, (meta.dev(), meta.ino() + 1)), 0, "another file");
        for (ptr, len) in [a, b] {
            // SAFETY: exactly the mappings made above, unused after this.
            unsafe { libc::munmap(ptr, len) };
        }
        let maps = std::fs::read_to_string("/proc/self/maps").expect("maps");
        assert_eq!(mapped_pages_of(&maps, (meta.dev(), meta.ino())), 0);
        assert_eq!(mapped_pages_of("garbage\n00-zz r 0 0:0 1\n", (0, 1)), 0);
    }
}
