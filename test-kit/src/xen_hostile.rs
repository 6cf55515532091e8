// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Hostile frontends end to end, against the real data plane of a backend on the emulated host: a frontend that
//! speaks the ring protocol and writes its xenstore nodes by hand, and the cases it plays (event-channel storms,
//! producer indexes going backwards or racing ahead, state flipping randomly, floods of malformed requests,
//! responses never taken, closing mid-I/O, garbage state). Each case asserts its exact outcome and that the
//! backend's CPU stayed bounded while it ran; the runner checks bystanders after every case.
//!
//! Played by `transport-xen/tests/e2e_hostile.rs` (bystander: a second vbd in the same backend process) and
//! `daemon/tests/xen_hostile_process.rs` (bystander: a `blkbackd` process serving another guest as well).

use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::time::{Duration, Instant};

use transport_xen::blkif::{encode, BlkifSegment, RawRequest, OP_READ, RSP_EOPNOTSUPP, RSP_OKAY, X86_64};
use transport_xen::connect::BlkifAbi;
use transport_xen::dataplane::DataplaneOptions;
use transport_xen::emulated::{EmulatedXenStore, GrantedPages, GuestDomain, RingFrontend};
use transport_xen::frontend::handshake::{self, Publication, PublishedRing};
use transport_xen::frontend::{frontend_path, DiskSpec};
use transport_xen::services::{DomId, TxId, XenStore};
use transport_xen::xenbus::{BackendConfig, VbdId, XenbusState};

use crate::xen_bed::{XenBed, T};

/// A backend process's threads: the xenbus loop and the data-plane workers.
pub fn is_backend_thread(name: &str) -> bool {
    name == "blkback-xenbus" || name.starts_with("blkif-d")
}

/// An emulated host with a backend (real data plane) on its own thread and a toolstack: the [`XenBed`] the
/// hostile frontends play against.
pub struct HostileBed(XenBed);

impl Default for HostileBed {
    fn default() -> Self {
        Self::new()
    }
}

impl HostileBed {
    /// A host, a backend with the real data plane, a toolstack and a scratch directory.
    pub fn new() -> HostileBed {
        HostileBed(XenBed::real(BackendConfig::default(), DataplaneOptions::default()))
    }

    /// A guest with `pages` pages.
    pub fn guest(&self, domid: DomId, pages: usize) -> Arc<GuestDomain> {
        Arc::new(self.host.add_guest(domid, pages).expect("guest"))
    }

    /// Attach a 4 MiB image (`xvda`) to `domid`.
    pub fn add_disk(&self, domid: DomId) -> VbdId {
        let path = self.image(&format!("d{domid}.img"), 4);
        self.toolstack.add_disk(&DiskSpec::new(domid, path.to_str().expect("utf-8"))).expect("add disk")
    }
}

impl Deref for HostileBed {
    type Target = XenBed;
    fn deref(&self) -> &XenBed {
        &self.0
    }
}

impl DerefMut for HostileBed {
    fn deref_mut(&mut self) -> &mut XenBed {
        &mut self.0
    }
}

/// A frontend that knows only the ring protocol: one x86_64 ring, nodes written by hand, one data page.
pub struct RawFrontend {
    pub id: VbdId,
    pub ring: RingFrontend<X86_64>,
    pub store: EmulatedXenStore,
    pub fe: String,
    data: Option<GrantedPages>,
    next_id: u64,
}

impl RawFrontend {
    /// Attach a disk to `guest`, publish one ring and wait for Connected.
    pub fn connect(bed: &HostileBed, guest: &Arc<GuestDomain>) -> RawFrontend {
        let id = bed.add_disk(guest.domid());
        bed.wait_state(id, XenbusState::InitWait);
        let ring = RingFrontend::<X86_64>::new(guest.clone(), 0, 0).expect("ring");
        let store = guest.xenstore().expect("guest store");
        let fe = frontend_path(id);
        let q = ring.queue_ring();
        let publication = Publication {
            ring_page_order: 0,
            rings: vec![PublishedRing { refs: q.ring_refs, port: q.remote_port }],
            abi: Some(BlkifAbi::X86_64),
            persistent: false,
        };
        handshake::publish(&store, &fe, &publication).expect("publish");
        bed.wait_state(id, XenbusState::Connected);
        let data = Some(ring.grant_pages(1, false).expect("data page"));
        RawFrontend { id, ring, store, fe, data, next_id: 1 }
    }

    /// A one-page read at `sector` into the data page.
    pub fn read_request(&mut self, sector: u64) -> RawRequest {
        self.next_id += 1;
        let gref = self.data.as_ref().expect("data page").grefs[0];
        encode::rw::<X86_64>(OP_READ, self.next_id, sector, &[BlkifSegment { gref, first_sect: 0, last_sect: 7 }])
    }

    /// Submit `requests` and wait for their statuses (in submission order).
    pub fn roundtrip(&mut self, requests: &[RawRequest]) -> Vec<i16> {
        let n = self.ring.submit(requests).expect("submit");
        assert_eq!(n, requests.len(), "the ring has room");
        let mut got = self.ring.wait_responses(n, T).expect("responses");
        got.sort_by_key(|r| requests.iter().position(|q| q.id::<X86_64>() == r.id));
        got.iter().map(|r| r.status).collect()
    }

    /// One read through the ring; its status.
    pub fn read(&mut self, sector: u64) -> i16 {
        let r = self.read_request(sector);
        self.roundtrip(&[r])[0]
    }

    /// Write the frontend's `state` node (any bytes).
    pub fn write_state(&self, value: &[u8]) {
        self.store.write(TxId::NONE, &format!("{}/state", self.fe), value).expect("write state");
    }

    /// Revoke every grant: fails if the backend still maps one.
    pub fn teardown(mut self) -> Result<(), String> {
        match self.data.take() {
            Some(pages) => self.ring.release_pages(pages).map_err(|e| e.to_string()),
            None => Ok(()),
        }
    }
}

impl Drop for RawFrontend {
    fn drop(&mut self) {
        if let Some(pages) = self.data.take() {
            let _ = self.ring.release_pages(pages);
        }
    }
}

/// CPU time (user + system) used so far by this process's threads whose name satisfies `pred`.
pub fn threads_cpu(pred: impl Fn(&str) -> bool) -> Duration {
    task_cpu("/proc/self/task", pred)
}

/// CPU time used so far by the threads under `task_dir` (`/proc/<pid>/task`) whose name satisfies `pred`.
pub fn task_cpu(task_dir: &str, pred: impl Fn(&str) -> bool) -> Duration {
    // SAFETY: sysconf has no preconditions.
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).unwrap_or(100).max(1);
    let mut ticks = 0u64;
    for task in std::fs::read_dir(task_dir).expect("task directory").flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else { continue };
        // `pid (comm) state ...`: comm may hold spaces and parentheses; the other fields follow the last ')'.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else { continue };
        if !pred(&stat[open + 1..close]) {
            continue;
        }
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        // proc(5) numbers the fields from 1 with the state third: utime is field 14, stime field 15.
        let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        ticks += field(14) + field(15);
    }
    Duration::from_millis(ticks * 1000 / hz)
}

/// CPU time (user + system) used so far by the calling thread.
pub fn this_thread_cpu() -> Duration {
    // SAFETY: an all-zero rusage is a valid out-buffer.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid out-pointer for the duration of the call.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) };
    assert_eq!(rc, 0, "getrusage");
    let tv = |t: libc::timeval| {
        Duration::from_secs(u64::try_from(t.tv_sec).unwrap_or(0))
            + Duration::from_micros(u64::try_from(t.tv_usec).unwrap_or(0))
    };
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// How long an event-channel storm lasts at least.
pub const STORM: Duration = Duration::from_millis(400);

/// How long the backend is watched for idle CPU after each case.
pub const QUIET: Duration = Duration::from_millis(150);

/// Scheduler-tick granularity slack for CPU-time comparisons.
pub const CPU_SLACK: Duration = Duration::from_millis(50);

/// One hostile case: a name and the function that plays it on a fresh guest and asserts the outcome; it hands
/// back its frontend (for the toolstack to remove the vbd and the guest to revoke its grants) and the outcome as
/// text for the report.
pub struct Case {
    pub name: &'static str,
    pub play: fn(&HostileBed, &Arc<GuestDomain>) -> (RawFrontend, &'static str),
}

/// The cases, in the order they run.
pub fn cases() -> Vec<Case> {
    vec![
        Case { name: "event-channel storm with no requests", play: storm },
        Case { name: "producer index moved backwards", play: |b, g| producer(b, g, |rsp, _| rsp.wrapping_sub(100)) },
        Case { name: "producer index 2^31 ahead", play: |b, g| producer(b, g, |rsp, _| rsp.wrapping_add(1 << 31)) },
        Case { name: "producer index one past a full ring", play: |b, g| producer(b, g, |rsp, size| rsp + size + 1) },
        Case { name: "frontend state flipping randomly", play: state_flipping },
        Case { name: "flood of unknown operations", play: malformed_flood },
        Case { name: "responses never taken, notifications repeated", play: responses_never_taken },
        Case { name: "frontend Closed straight from Connected mid-I/O", play: closed_mid_io },
        Case { name: "state of 4096 bytes while connected", play: huge_state },
        Case { name: "rings rewritten and Initialised again while connected", play: republished },
    ]
}

/// Run every case on its own guest (domids from `first_domid`), calling `bystanders` after each; asserts that the
/// backend's threads used at most half of each case's wall time (plus tick slack). Returns (name, outcome).
pub fn run_cases(
    bed: &HostileBed,
    first_domid: DomId,
    bystanders: &mut dyn FnMut(&str),
) -> Vec<(&'static str, &'static str)> {
    let mut report = Vec::new();
    for (i, case) in cases().into_iter().enumerate() {
        let guest = bed.guest(first_domid + DomId::try_from(i).expect("few cases"), 256);
        let (mappings, ports) = (bed.host.live_mappings(), bed.host.evtchn_switch().open_ports(0));
        let (cpu0, t0) = (threads_cpu(is_backend_thread), Instant::now());
        let (frontend, outcome) = (case.play)(bed, &guest);
        let (cpu, wall) = (threads_cpu(is_backend_thread) - cpu0, t0.elapsed());
        assert!(cpu <= wall * 3 / 4 + CPU_SLACK, "{}: the backend used {cpu:?} of CPU in {wall:?}", case.name);
        // Whatever the frontend left behind, the backend is quiet once it stops: nothing spins.
        let idle0 = threads_cpu(is_backend_thread);
        std::thread::sleep(QUIET);
        let idle = threads_cpu(is_backend_thread) - idle0;
        assert!(idle <= CPU_SLACK, "{}: the backend used {idle:?} of CPU while the guest was quiet", case.name);
        // The toolstack removes the vbd, whatever state the case left it in; nothing of it may stay behind.
        bed.toolstack.remove(frontend.id).expect("remove");
        let deadline = Instant::now() + T;
        while bed.host.live_mappings() != mappings || bed.host.evtchn_switch().open_ports(0) != ports {
            assert!(Instant::now() < deadline, "{}: mappings or ports left behind", case.name);
            std::thread::sleep(Duration::from_millis(5));
        }
        frontend.teardown().unwrap_or_else(|e| panic!("{}: a grant is still mapped: {e}", case.name));
        bystanders(case.name);
        report.push((case.name, outcome));
    }
    report
}

fn storm(bed: &HostileBed, guest: &Arc<GuestDomain>) -> (RawFrontend, &'static str) {
    let mut f = RawFrontend::connect(bed, guest);
    assert_eq!(f.read(0), RSP_OKAY);
    let workers = format!("blkif-d{}-", guest.domid());
    let busy = || threads_cpu(|n| n.starts_with(&workers));
    let (cpu0, own0, t0) = (busy(), this_thread_cpu(), Instant::now());
    // Thousands of notifications, for long enough that scheduler ticks measure the worker's CPU time.
    let mut sent = 0u64;
    while sent < 20_000 || t0.elapsed() < STORM {
        f.ring.notify().expect("notify");
        sent += 1;
    }
    let (wall, cpu, own) = (t0.elapsed(), busy() - cpu0, this_thread_cpu() - own0);
    eprintln!("storm: {sent} notifications in {wall:?}, costing the guest {own:?} and the worker {cpu:?}");
    // Events coalesce (a delivered port stays masked until the worker unmasks it), and after a few events in a row
    // that bring no request the worker delays the unmask, doubling the delay up to 64 ms (late EOI): the storm
    // costs the worker a small fraction of what it costs the guest, and a few percent of a core.
    assert!(cpu <= own / 4 + CPU_SLACK, "the worker used {cpu:?} of CPU for {sent} notifications costing {own:?}");
    assert!(cpu <= wall / 10 + CPU_SLACK, "the worker used {cpu:?} of CPU during a storm of {wall:?}");
    assert!(f.ring.ring().take_response().is_none(), "no request, no response");
    assert_eq!(bed.state(f.id), Some(XenbusState::Connected));
    assert_eq!(bed.toolstack.error(f.id).expect("read"), None);
    assert_eq!(f.read(8), RSP_OKAY, "the ring still serves");
    (f, "no response; still Connected and serving; worker CPU <= 1/4 of the guest's own CPU for the storm and < 10% of its wall time (delayed unmask); quiet after")
}

fn producer(bed: &HostileBed, guest: &Arc<GuestDomain>, bad: fn(u32, u32) -> u32) -> (RawFrontend, &'static str) {
    let mut f = RawFrontend::connect(bed, guest);
    for s in 0..3 {
        assert_eq!(f.read(s * 8), RSP_OKAY);
    }
    let (rsp, size) = (f.ring.ring().rsp_prod(), f.ring.ring().size());
    f.ring.ring().set_req_prod_raw(bad(rsp, size));
    f.ring.notify().expect("notify");
    let error = bed.wait_fatal(f.id);
    assert!(error.starts_with("5 ring halted:") && error.contains("bogus ring requests"), "{error}");
    f.write_state(b"6");
    bed.wait_state(f.id, XenbusState::Closed);
    (f, "error node `5 ring halted: ...bogus ring requests...` + Closing; Closed once the frontend closes")
}

fn state_flipping(bed: &HostileBed, guest: &Arc<GuestDomain>) -> (RawFrontend, &'static str) {
    let mut f = RawFrontend::connect(bed, guest);
    assert_eq!(f.read(0), RSP_OKAY);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ u64::from(guest.domid());
    let huge = vec![b'3'; 4096];
    for _ in 0..500 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let digit = [b'0' + u8::try_from(x % 9).expect("a digit")];
        let value: &[u8] = match x % 12 {
            0..=8 => &digit,
            9 => b"garbage",
            10 => b"\xff\xfe",
            _ => &huge,
        };
        f.write_state(value);
    }
    f.write_state(b"6");
    bed.wait_state(f.id, XenbusState::Closed);
    (f, "every transition handled (no panic, no hang); Closed after the final Closed")
}

fn malformed_flood(bed: &HostileBed, guest: &Arc<GuestDomain>) -> (RawFrontend, &'static str) {
    let mut f = RawFrontend::connect(bed, guest);
    let size = usize::try_from(f.ring.ring().size()).expect("small");
    for round in 0..40u64 {
        let requests: Vec<RawRequest> = (0..size as u64)
            .map(|i| {
                let mut r = f.read_request(i);
                r.bytes[0] = 255; // the operation byte
                r
            })
            .collect();
        assert!(f.roundtrip(&requests).iter().all(|&s| s == RSP_EOPNOTSUPP), "round {round}");
    }
    assert_eq!(f.read(0), RSP_OKAY);
    assert_eq!(bed.state(f.id), Some(XenbusState::Connected));
    (f, "every request answered EOPNOTSUPP; still Connected and serving")
}

fn responses_never_taken(bed: &HostileBed, guest: &Arc<GuestDomain>) -> (RawFrontend, &'static str) {
    let mut f = RawFrontend::connect(bed, guest);
    let size = f.ring.ring().size();
    let requests: Vec<RawRequest> = (0..u64::from(size)).map(|i| f.read_request(i * 8)).collect();
    assert_eq!(f.ring.submit(&requests).expect("submit"), requests.len());
    let deadline = Instant::now() + T;
    while f.ring.ring().rsp_prod() != f.ring.ring().req_prod_pvt() {
        assert!(Instant::now() < deadline, "the backend answered everything on the ring");
        std::thread::sleep(Duration::from_millis(2));
    }
    for _ in 0..2000 {
        f.ring.notify().expect("notify");
    }
    let one_more = f.read_request(0);
    assert_eq!(f.ring.submit(&[one_more]).expect("submit"), 0, "the ring is full of unread responses");
    assert_eq!(bed.state(f.id), Some(XenbusState::Connected));
    let got = f.ring.wait_responses(requests.len(), T).expect("responses");
    assert!(got.iter().all(|r| r.status == RSP_OKAY) && got.len() == requests.len());
    assert_eq!(f.read(0), RSP_OKAY);
    (f, "every request answered once; still Connected; serves again once the responses are taken")
}

fn closed_mid_io(bed: &HostileBed, guest: &Arc<GuestDomain>) -> (RawFrontend, &'static str) {
    let mut f = RawFrontend::connect(bed, guest);
    let requests: Vec<RawRequest> = (0..32).map(|i| f.read_request(i * 8)).collect();
    assert_eq!(f.ring.submit(&requests).expect("submit"), 32);
    f.write_state(b"6");
    bed.wait_state(f.id, XenbusState::Closed);
    (f, "Closed; every grant unmapped")
}

fn huge_state(bed: &HostileBed, guest: &Arc<GuestDomain>) -> (RawFrontend, &'static str) {
    let f = RawFrontend::connect(bed, guest);
    f.write_state(&[b'4'; 4096]);
    bed.wait_state(f.id, XenbusState::Closed);
    (f, "an unreadable state counts as Unknown: data plane stopped, Closed")
}

fn republished(bed: &HostileBed, guest: &Arc<GuestDomain>) -> (RawFrontend, &'static str) {
    let mut f = RawFrontend::connect(bed, guest);
    for (name, value) in [("ring-ref", &b"4242"[..]), ("event-channel", b"77"), ("protocol", b"x86_32-abi")] {
        f.store.write(TxId::NONE, &format!("{}/{name}", f.fe), value).expect("rewrite");
    }
    f.write_state(b"3");
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(f.read(0), RSP_OKAY, "the connected rings keep serving");
    assert_eq!(bed.state(f.id), Some(XenbusState::Connected));
    (f, "ignored: still Connected on the rings of the connect")
}
