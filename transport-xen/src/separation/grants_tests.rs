// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The grant ledger against a fake device, and the Linux side against a real memory map and a real child.

use super::*;
use std::io::Write;
use std::sync::{Arc, Mutex};

/// A grant device whose mappings the test sets: the registrations made and dropped, the worker's mappings
/// (offset, length), whether it is stopped, and how often its map was read.
#[derive(Default)]
struct Log {
    registered: Vec<(u64, usize)>,
    /// The registrations not dropped, by offset.
    live: Vec<(u64, usize)>,
    unregistered: Vec<u64>,
    mapped: Vec<(u64, u64)>,
    stopped: bool,
    reads: u64,
}

struct FakeDevice(Arc<Mutex<Log>>);

impl WorkerGrantDevice for FakeDevice {
    fn register(&self, _domid: DomId, refs: &[GrantRef]) -> Result<u64, XenError> {
        let mut log = self.0.lock().expect("log");
        // As gntdev: the lowest free range of offsets.
        let mut index = 0;
        for &(i, pages) in &log.live {
            // gntdev takes a gap only if it is strictly larger than the batch.
            if index + ((refs.len() * XEN_PAGE_SIZE) as u64) < i {
                break;
            }
            index = index.max(i + (pages * XEN_PAGE_SIZE) as u64);
        }
        log.live.push((index, refs.len()));
        log.live.sort_unstable();
        log.registered.push((index, refs.len()));
        Ok(index)
    }

    fn unregister(&self, index: u64, _pages: usize) -> bool {
        let mut log = self.0.lock().expect("log");
        assert!(log.stopped, "a registration is dropped only with the worker stopped");
        log.live.retain(|&(i, _)| i != index);
        log.unregistered.push(index);
        true
    }

    fn stop(&mut self) -> Result<(), XenError> {
        self.0.lock().expect("log").stopped = true;
        Ok(())
    }

    fn resume(&mut self) {
        self.0.lock().expect("log").stopped = false;
    }

    fn mapped(&mut self) -> Result<Vec<(u64, u64)>, XenError> {
        let mut log = self.0.lock().expect("log");
        assert!(log.stopped, "the map is read with the worker stopped");
        log.reads += 1;
        Ok(log.mapped.clone())
    }
}

fn ledger(budget: u64) -> (GrantLedger, Arc<Mutex<Log>>) {
    let log = Arc::new(Mutex::new(Log::default()));
    (GrantLedger::new(Box::new(FakeDevice(log.clone())), budget), log)
}

const PAGE: u64 = XEN_PAGE_SIZE as u64;

#[test]
fn a_worker_that_keeps_pieces_of_its_mappings_is_charged_whole_registrations() {
    let (mut ledger, log) = ledger(100);
    let refs: Vec<GrantRef> = (0..40).collect();
    let a = ledger.register(7, &refs).expect("a");
    let b = ledger.register(7, &refs).expect("b");
    // The worker keeps one page of each mapping (gntdev keeps all 40 of each).
    log.lock().expect("log").mapped = vec![(a + 39 * PAGE, PAGE), (b, PAGE)];
    let refused = ledger.register(7, &refs).expect_err("80 held + 40 > 100");
    assert!(matches!(refused, XenError::Os { errno: libc::ENOSPC, .. }), "{refused:?}");
    assert!(refused.to_string().contains("--max-grant-pages"), "{refused}");
    assert_eq!((ledger.charged(), ledger.reclaims()), (80, 1));
    assert!(log.lock().expect("log").unregistered.is_empty(), "nothing of what it maps is dropped");
    assert!(!log.lock().expect("log").stopped, "the worker goes on");
    // It lets go of a entirely: room again, and a's registration is dropped.
    log.lock().expect("log").mapped = vec![(b, PAGE)];
    std::thread::sleep(BACKOFF_FIRST * 2);
    ledger.register(7, &refs).expect("40 + 40 fit");
    assert_eq!(log.lock().expect("log").unregistered, [a]);
    assert_eq!(ledger.charged(), 80);
    assert!(ledger.misbehaved().is_none());
}

#[test]
fn a_mapping_named_by_an_offset_gntdev_cuts_to_32_bits_counts_for_its_registration() {
    // gntdev reads an mmap's page offset as an int: offset I + 2^44 maps the registration at I.
    let (mut ledger, log) = ledger(8);
    let a = ledger.register(7, &[1; 8]).expect("a");
    log.lock().expect("log").mapped = vec![(a + (1 << 44) + PAGE, PAGE)];
    assert!(ledger.register(7, &[1]).is_err(), "a is still mapped: no room");
    assert!(log.lock().expect("log").unregistered.is_empty(), "a is not dropped");
    assert!(ledger.misbehaved().is_none(), "an alias gntdev accepts is no misbehaviour, only counted");
}

#[test]
fn a_mapping_of_no_registration_marks_the_worker_hostile() {
    let (mut ledger, log) = ledger(8);
    let a = ledger.register(7, &[1; 4]).expect("a");
    // A mapping that reaches past its registration (gntdev would not make it) is of none.
    log.lock().expect("log").mapped = vec![(a, 6 * PAGE)];
    assert!(ledger.register(7, &[1; 8]).is_err());
    assert!(ledger.misbehaved().is_some_and(|why| why.contains("no registration")), "{:?}", ledger.misbehaved());
}

#[test]
fn a_worker_at_its_budget_is_not_stopped_at_every_request() {
    let (mut ledger, log) = ledger(8);
    let a = ledger.register(7, &[1; 8]).expect("a");
    log.lock().expect("log").mapped = vec![(a, 8 * PAGE)];
    for _ in 0..100 {
        assert!(ledger.register(7, &[1]).is_err());
    }
    // A read at the first, then at most one per backoff period (10, 20, 40 ms, ...): a few, not 100, even on a
    // loaded machine.
    let reads = log.lock().expect("log").reads;
    assert!(reads <= 5, "backed off after a reclaim that freed nothing");
    // What the service's metrics read (another thread's view).
    let figures = ledger.figures();
    let read = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(read(&figures.pages), 8);
    assert_eq!(read(&figures.budget), 8);
    assert_eq!(read(&figures.refused), 100, "every refused map counted");
    assert_eq!(read(&figures.reclaims), reads);
    // Room again: the figures follow.
    log.lock().expect("log").mapped.clear();
    std::thread::sleep(BACKOFF_MAX + BACKOFF_FIRST);
    ledger.register(7, &[1; 2]).expect("room once a is dropped");
    assert_eq!((read(&figures.pages), read(&figures.refused)), (2, 100));
}

#[test]
fn registrations_the_worker_never_mapped_are_charged_until_dropped() {
    let (mut ledger, log) = ledger(10);
    ledger.register(7, &[1; 6]).expect("first");
    // Never mapped: dropped at the next reclaim, which the budget calls for.
    ledger.register(7, &[1; 6]).expect("room once the first is dropped");
    assert_eq!(log.lock().expect("log").unregistered.len(), 1);
    assert_eq!(ledger.charged(), 6);
}

#[test]
fn a_worker_that_unmaps_as_it_goes_is_stopped_once_per_reclaim_period() {
    // A frontend without persistent grants: every request mapped and unmapped at once.
    let (mut ledger, log) = ledger(DEFAULT_GRANT_PAGE_BUDGET);
    for _ in 0..10_000 {
        ledger.register(7, &[1, 2, 3, 4]).expect("always room");
    }
    let reads = log.lock().expect("log").reads;
    assert_eq!(reads, 10_000 / RECLAIM_EVERY_REGISTRATIONS, "one stop per {RECLAIM_EVERY_REGISTRATIONS} maps");
    assert!(ledger.charged() <= 4 * RECLAIM_EVERY_REGISTRATIONS, "the rest was dropped: {}", ledger.charged());
    // Large maps: one stop per RECLAIM_EVERY pages.
    let before = log.lock().expect("log").reads;
    for _ in 0..64 {
        ledger.register(7, &[1; 1024]).expect("always room");
    }
    assert_eq!(log.lock().expect("log").reads - before, 64 * 1024 / RECLAIM_EVERY);
}

#[test]
#[allow(clippy::cast_possible_truncation)] // a few pages
fn mappings_of_a_file_are_read_from_a_real_memory_map() {
    let file = tempfile::tempfile().expect("file");
    file.set_len(16 * PAGE).expect("size");
    let other = tempfile::tempfile().expect("another file, never mapped");
    let (meta, other_meta) = (file.metadata().expect("stat"), other.metadata().expect("stat"));
    let map = |pages: u64, offset: u64| {
        // SAFETY: a fresh shared read-only mapping of the file, chosen by the kernel, unmapped below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                (pages * PAGE) as usize,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                libc::off_t::try_from(offset * PAGE).expect("small"),
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED);
        (ptr, (pages * PAGE) as usize)
    };
    let (a, b) = (map(3, 0), map(5, 8));
    let maps = std::fs::read_to_string("/proc/self/maps").expect("maps");
    let mut found = mappings_of(&maps, (meta.dev(), meta.ino()));
    found.sort_unstable();
    assert_eq!(found, [(0, 3 * PAGE), (8 * PAGE, 5 * PAGE)]);
    let pages: u64 = mappings_of(&maps, (meta.dev(), meta.ino())).iter().map(|&(_, len)| len / PAGE).sum();
    assert_eq!(pages, 8);
    assert!(mappings_of(&maps, (other_meta.dev(), other_meta.ino())).is_empty(), "another file");
    // A piece keeps its offset.
    // SAFETY: the first page of mapping b, which nothing uses.
    unsafe { libc::munmap(b.0, PAGE as usize) };
    let maps = std::fs::read_to_string("/proc/self/maps").expect("maps");
    let mut found = mappings_of(&maps, (meta.dev(), meta.ino()));
    found.sort_unstable();
    assert_eq!(found, [(0, 3 * PAGE), (9 * PAGE, 4 * PAGE)]);
    // SAFETY: exactly what is left of the mappings made above, unused after this.
    unsafe {
        libc::munmap(a.0, a.1);
        libc::munmap(b.0.cast::<u8>().add(PAGE as usize).cast(), b.1 - PAGE as usize);
    }
    let maps = std::fs::read_to_string("/proc/self/maps").expect("maps");
    assert!(mappings_of(&maps, (meta.dev(), meta.ino())).is_empty());
    assert!(mappings_of("garbage\n00-zz r 0 0:0 1\n", (0, 1)).is_empty());
}

/// The state letter of process `pid` (`/proc/<pid>/stat`'s third field).
fn state(pid: libc::pid_t) -> char {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    stat.rsplit_once(") ").and_then(|(_, rest)| rest.chars().next()).expect("state")
}

#[test]
#[allow(clippy::cast_possible_truncation)] // a few pages
fn a_real_worker_is_stopped_read_and_resumed_and_its_end_is_still_reaped() {
    let file = tempfile::tempfile().expect("file");
    file.set_len(16 * PAGE).expect("size");
    let (mut go, child_end) = std::os::unix::net::UnixStream::pair().expect("pair");
    let (fd, go_fd) = (file.as_raw_fd(), go.as_raw_fd());
    // SAFETY: the child makes only async-signal-safe calls (mmap, read, write, _exit) before it exits.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork");
    if pid == 0 {
        // SAFETY: as above; the mappings are the child's own and end with it.
        unsafe {
            // It ends with the test (whatever becomes of the test), and holds no end of its own socket.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            libc::close(go_fd);
            let a = libc::mmap(std::ptr::null_mut(), 2 * PAGE as usize, libc::PROT_READ, libc::MAP_SHARED, fd, 0);
            let b = libc::mmap(
                std::ptr::null_mut(),
                3 * PAGE as usize,
                libc::PROT_READ,
                libc::MAP_SHARED,
                fd,
                (4 * PAGE) as libc::off_t,
            );
            let ready = u8::from(a != libc::MAP_FAILED && b != libc::MAP_FAILED);
            libc::write(child_end.as_raw_fd(), std::ptr::addr_of!(ready).cast(), 1);
            let mut byte = 0u8;
            libc::read(child_end.as_raw_fd(), std::ptr::addr_of_mut!(byte).cast(), 1);
            libc::_exit(7);
        }
    }
    // Killed and reaped if the test fails on the way (a child left stopped would hold the test's pipes).
    struct Reap(libc::pid_t);
    impl Drop for Reap {
        fn drop(&mut self) {
            // SAFETY: signalling and reaping our own child, if it is still there.
            unsafe {
                libc::kill(self.0, libc::SIGKILL);
                libc::waitpid(self.0, std::ptr::null_mut(), 0);
            }
        }
    }
    let reap = Reap(pid);
    let mut ready = [0u8];
    go.read_exact(&mut ready).expect("the child mapped");
    assert_eq!(ready, [1]);
    let mut device = WorkerGntDev::new(file.try_clone().expect("dup"), pid as u32).expect("device");
    device.stop().expect("stopped");
    assert_eq!(state(pid), 'T', "stopped");
    let mut mapped = device.mapped().expect("map read");
    mapped.sort_unstable();
    assert_eq!(mapped, [(0, 2 * PAGE), (4 * PAGE, 3 * PAGE)]);
    device.resume();
    let deadline = Instant::now() + Duration::from_secs(5);
    while state(pid) == 'T' {
        assert!(Instant::now() < deadline, "resumed");
        std::thread::sleep(Duration::from_millis(1));
    }
    go.write_all(&[0]).expect("let it end");
    let mut status = 0;
    // SAFETY: waiting for our own child with a valid out-pointer.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid, "the stop left its end to be reaped");
    std::mem::forget(reap);
    assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 7);
    assert!(device.stop().is_err(), "a worker that ended is not stopped");
}
