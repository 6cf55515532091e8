// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The whole blkif ring consumer: `transport_xen::dataplane::Dataplane` (I/O thread, epoll loop, request copy,
//! decode, indirect pages, grant map / persistent grants / grant copy, `device-blk` queue with the synchronous
//! engine on a real file, responses and notifications) serving a fuzzed frontend on the emulated Xen host.
//!
//! The host, one guest, its granted pages (8 read-write data pages, 2 read-only pages, 2 indirect-descriptor
//! pages), its ring pages (one ring per page order, zeroed and initialised again for each input) and its event
//! channel port live for the whole process, so the grant refs an input sees never depend on the inputs before
//! it; each input gets a fresh data plane. The buffers an input fills (its requests, indirect pages, expected
//! answers, responses) and the connection parameters are kept too, so an input allocates little besides what the
//! data plane itself needs (each allocation is dear under AddressSanitizer). Its ring is served by one I/O thread that lives for the whole process
//! (`DataplaneOptions::io_threads`, the production default: `blkbackd xen --io-threads 1`), so an input hands its
//! ring to that thread and takes it back at `stop`, instead of spawning and joining a thread; the same worker
//! rounds serve a ring on a thread of its own (`--io-threads 0`), whose thread loop the crate's tests cover.
//!
//! Layout: `u8` flags (bit 0: x86_32; bits 1-2: ring page order 0..2; bit 3: persistent grants; bit 4: grant
//! copy; bit 5: indirect segments advertised; bit 6: secure discard advertised; bit 7: read-only disk), `u8`
//! flags2 (bit 0: publish a forged `req_prod`, given as `u32` next), `u8` in-flight limit, `u8` request count,
//! `u8` count of indirect-descriptor overrides, each `u16` index, `u8` page selector, `u8` first, `u8` last; then
//! per request `u8` mode: odd = 112 raw bytes; even = `u8` operation, `u8` byte 1 (count / flag / indirect op),
//! `u16` indirect segment count, `u16` sector, `u8` discard sectors, 11 × (`u8` page selector, `u8` first, `u8`
//! last). Page selectors pick a granted page or an invalid grant ref.
//!
//! Invariants: every published request is answered exactly once (same id and operation), with the status its
//! decoding, its grants and the disk geometry call for (a read into a read-only grant, a bad grant or a bad
//! segment is never `OKAY`); a producer more than a ring ahead halts the ring with no response; the worker never
//! hangs or dies; read-only and indirect pages are never written; after `stop` no grant stays mapped and no port
//! stays bound.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use device_blk::disk::DirectIo;
use device_blk::{Disk, DiskOptions, EngineKind};
use transport_xen::blkif::FrontRing;
use transport_xen::blkif::{
    encode, BlkifLayout, BlkifRequest, BlkifResponse, BlkifSegment, RawRequest, OP_DISCARD, OP_INDIRECT,
    RSP_EOPNOTSUPP, RSP_ERROR, RSP_OKAY, SEGMENTS_PER_INDIRECT_PAGE, X86_32, X86_64,
};
use transport_xen::connect::QueueRing;
use transport_xen::connect::{BlkifAbi, ConnectConfig, MAX_INDIRECT_SEGMENTS};
use transport_xen::dataplane::{Dataplane, DataplaneOptions, IoThreads, QueueStats};
use transport_xen::emulated::evtchn::{EmulatedEventChannel, EmulatedEvtchnOpener};
use transport_xen::emulated::grants::EmulatedGrantTable;
use transport_xen::emulated::{EmulatedHost, GuestDomain};
use transport_xen::grant_memory::GrantMode;
use transport_xen::services::{EventChannel, EvtchnPort, GrantRef, XEN_PAGE_SIZE};
use vm_memory::Bytes;

use crate::input::{Reader, Writer};

mod model;

use model::expected;

const DOMID: u16 = 7;
const DISK_BYTES: u64 = 1 << 20;
const WAIT: Duration = Duration::from_secs(20);
/// The first grant ref of the rings.
const RING_REFS_FROM: GrantRef = 0x1_0000;
/// How long a guest that corrupts its own ring is given before its data plane is stopped.
const SELF_HARM_WAIT: Duration = Duration::from_millis(20);

struct Fixture {
    host: EmulatedHost,
    guest: Arc<GuestDomain>,
    _dir: tempfile::TempDir,
    rw_disk: Arc<Disk>,
    ro_disk: Arc<Disk>,
    /// Read-write data pages `(page, gref)`.
    rw: Vec<(usize, GrantRef)>,
    /// Read-only pages.
    ro: Vec<(usize, GrantRef)>,
    /// Indirect-descriptor pages (granted read-only).
    ind: Vec<(usize, GrantRef)>,
    /// Both indirect pages before the overrides: 1024 valid descriptors (the same for every input).
    indirect_base: Vec<u8>,
    /// What a read-only page holds.
    ro_pattern: Vec<u8>,
    /// Scratch for reading a page back.
    page: Vec<u8>,
    /// The ring of each page order: its first page and its grant refs (granted writable to dom0).
    rings: Vec<(usize, Vec<GrantRef>)>,
    /// The connection to the ring of each page order (its ABI and features are set per input).
    configs: Vec<ConnectConfig>,
    /// Dom0's grant table and event channels.
    grants: Arc<EmulatedGrantTable>,
    opener: EmulatedEvtchnOpener,
    /// Buffers every input reuses (taken by the input that runs).
    scratch: Option<Scratch>,
    /// The frontend's event channel (its port, offered to dom0, is in `configs`; unbound again when a data plane
    /// stops).
    evtchn: EmulatedEventChannel,
    /// Inputs whose responses were not checked because they harm their own ring (see `Scratch::harms_ring`).
    self_harming: u64,
    /// One I/O thread for every input's data plane (as `blkbackd xen --io-threads` runs them): starting a data
    /// plane hands its ring to this thread instead of spawning a thread per input.
    io_thread: IoThreads,
}

fn fixture() -> Fixture {
    let host = EmulatedHost::new().expect("host");
    let guest = Arc::new(host.add_guest(DOMID, 512).expect("guest"));
    let grant = |count: usize, readonly: bool| -> Vec<(usize, GrantRef)> {
        let first = guest.alloc_pages(count).expect("guest pages");
        (first..first + count).map(|p| (p, guest.grant_access(p, readonly).expect("grant"))).collect()
    };
    let (rw, ro, ind) = (grant(8, false), grant(2, true), grant(2, true));
    for &(page, _) in &ro {
        guest.memory().write_slice(&[0x5a; XEN_PAGE_SIZE], GuestDomain::page_addr(page)).expect("ro pattern");
    }
    let shm = std::path::Path::new("/dev/shm");
    let dir = if shm.is_dir() { tempfile::tempdir_in(shm) } else { tempfile::tempdir() }.expect("temp dir");
    let path = dir.path().join("disk.img");
    std::fs::write(&path, vec![0u8; DISK_BYTES as usize]).expect("disk file");
    let open = |read_only| {
        let options = DiskOptions::default().with_read_only(read_only).with_direct_io(DirectIo::Off);
        Arc::new(Disk::open(&path, &options).expect("disk"))
    };
    let (rw_disk, ro_disk) = (open(false), open(true));
    let mut indirect_base = Vec::with_capacity(2 * XEN_PAGE_SIZE);
    for j in 0..2 * SEGMENTS_PER_INDIRECT_PAGE {
        indirect_base.extend_from_slice(&BlkifSegment { gref: rw[j % 8].1, first_sect: 0, last_sect: 7 }.encode());
    }
    let (ro_pattern, page) = (vec![0x5a; XEN_PAGE_SIZE], vec![0; XEN_PAGE_SIZE]);
    // Ring refs far from the data pages' (8..20), which fuzzed bytes name all the time: a guest that points a
    // buffer at its own ring harms only itself, and then its responses are not checked, so that must stay rare.
    loop {
        let g = guest.grant_access(rw[0].0, true).expect("grant");
        guest.end_access(g).expect("end access");
        if g >= RING_REFS_FROM - 1 {
            break;
        }
    }
    let rings: Vec<(usize, Vec<GrantRef>)> = (0..=2u32)
        .map(|order| {
            let pages = grant(1 << order, false);
            (pages[0].0, pages.iter().map(|&(_, g)| g).collect())
        })
        .collect();
    let mut evtchn = guest.evtchn().expect("event channel");
    let port = evtchn.alloc_unbound(0).expect("unbound port");
    let configs = rings
        .iter()
        .map(|(_, grefs)| ConnectConfig {
            frontend_domid: DOMID,
            abi: BlkifAbi::X86_64,
            queues: vec![QueueRing { ring_refs: grefs.clone(), remote_port: port }],
            persistent_grants: false,
            max_indirect_segments: 0,
        })
        .collect();
    let (grants, opener) = (Arc::new(host.grant_table(0)), host.evtchn_opener(0));
    Fixture {
        host,
        guest,
        _dir: dir,
        rw_disk,
        ro_disk,
        rw,
        ro,
        ind,
        indirect_base,
        ro_pattern,
        page,
        rings,
        configs,
        grants,
        opener,
        scratch: Some(Scratch::default()),
        evtchn,
        self_harming: 0,
        // Keeps the slots of an input's data plane for the next input's (at most 64 in flight per input).
        io_thread: IoThreads::with_spare_slots(1, 64),
    }
}

/// What an input fills, kept from one input to the next for the capacity (every field is cleared or overwritten
/// before it is read).
#[derive(Default)]
struct Scratch {
    requests: Vec<RawRequest>,
    /// Both indirect pages as this input writes them.
    indirect: Vec<u8>,
    /// The descriptor pages of an indirect request, as the model reads them.
    copy: Vec<u8>,
    req: BlkifRequest,
    dev: device_blk::Request,
    /// Per request id: the operation and status expected.
    ids: HashMap<u64, (u8, Option<i16>)>,
    seen: HashSet<u64>,
    responses: Vec<BlkifResponse>,
    ports: Vec<EvtchnPort>,
    /// A request of this input, as the model decodes it, reads into a page of the ring in use or takes its
    /// descriptors from a ring's page (`model::expected` sets it).
    harms_ring: bool,
}

/// Zeroes for the rings' pages.
static ZEROS: [u8; 4 * XEN_PAGE_SIZE] = [0; 4 * XEN_PAGE_SIZE];

/// The frontend's side of one input's ring (on the fixture's ring pages: it must not outlive the fixture).
struct Front<L: BlkifLayout> {
    ring: FrontRing<L>,
}

impl<L: BlkifLayout> Front<L> {
    /// The ring of page order `order`, initialised. Every ring is zeroed first: no request of an earlier input
    /// stays in a slot, and a page of another ring that an earlier input read into is blank again.
    fn new(f: &mut Fixture, order: u32, ports: &mut Vec<EvtchnPort>) -> Front<L> {
        for (first, grefs) in &f.rings {
            let addr = GuestDomain::page_addr(*first);
            f.guest.memory().write_slice(&ZEROS[..grefs.len() * XEN_PAGE_SIZE], addr).expect("clear ring");
        }
        let (first, ref grefs) = f.rings[order as usize];
        let bytes = grefs.len() * XEN_PAGE_SIZE;
        let base = f.guest.page_ptr(first).expect("ring page");
        // SAFETY: `grefs.len()` consecutive guest pages, contiguous in the guest's mapping, allocated for the
        // fixture's life (never freed); the ring lives only while one input runs on the fixture.
        let ring = unsafe { FrontRing::<L>::init(base, bytes) }.expect("ring");
        // An event the last data plane sent after its input was done: clear it.
        ports.clear();
        let _ = f.evtchn.pending(ports);
        for &p in ports.iter() {
            let _ = f.evtchn.unmask(p);
        }
        Front { ring }
    }

    /// At least `count` responses (every published one) into `out`, waiting on the event channel up to `timeout`;
    /// as blkfront, re-arms the response event index before returning (`RingFrontend::wait_responses`).
    fn wait_responses(
        &mut self,
        evtchn: &mut EmulatedEventChannel,
        count: usize,
        timeout: Duration,
        out: &mut Vec<BlkifResponse>,
        ports: &mut Vec<EvtchnPort>,
    ) -> Result<(), String> {
        let deadline = std::time::Instant::now() + timeout;
        out.clear();
        loop {
            while let Some(r) = self.ring.take_response() {
                out.push(r);
            }
            let more = self.ring.final_check_for_responses();
            if out.len() >= count && !more {
                return Ok(());
            }
            if more {
                continue;
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(format!("{} of {count} responses after {timeout:?}", out.len()));
            }
            let mut pfd = libc::pollfd { fd: evtchn.fd(), events: libc::POLLIN, revents: 0 };
            let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX).max(1);
            // SAFETY: one valid pollfd for the duration of the call.
            unsafe { libc::poll(&mut pfd, 1, ms) };
            ports.clear();
            let _ = evtchn.pending(ports);
            for &p in ports.iter() {
                let _ = evtchn.unmask(p);
            }
        }
    }
}

thread_local! {
    static FIXTURE: RefCell<Option<Fixture>> = const { RefCell::new(None) };
}

/// A data-segment page: 0..8 read-write, 8..10 read-only, 10..12 indirect pages, else an invalid ref.
fn data_gref(f: &Fixture, sel: u8) -> GrantRef {
    match usize::from(sel % 16) {
        i @ 0..=7 => f.rw[i].1,
        i @ 8..=9 => f.ro[i - 8].1,
        i @ 10..=11 => f.ind[i - 10].1,
        12 => 0,
        13 => 7,
        14 => u32::MAX,
        _ => 0x7fff_0000,
    }
}

/// An indirect-page ref: the indirect pages, the read-only pages, or an invalid ref (never a page whose content
/// changes while the input runs).
fn indirect_gref(f: &Fixture, sel: u8) -> GrantRef {
    match sel % 5 {
        0 => f.ind[0].1,
        1 => f.ind[1].1,
        2 => f.ro[0].1,
        3 => f.ro[1].1,
        _ => 0xffff_fff0,
    }
}

/// The page `gref` grants and whether it is writable. The pages of the rings of the other page orders are
/// writable pages like any other (reads into the ring in use are caught by the model: `Scratch::harms_ring`).
fn page_of(f: &Fixture, gref: GrantRef) -> Option<(usize, bool)> {
    let find = |list: &[(usize, GrantRef)]| list.iter().find(|&&(_, g)| g == gref).map(|&(p, _)| p);
    let ring = || f.rings.iter().find_map(|(first, grefs)| grefs.iter().position(|&g| g == gref).map(|i| first + i));
    find(&f.rw).or_else(ring).map(|p| (p, true)).or_else(|| find(&f.ro).or_else(|| find(&f.ind)).map(|p| (p, false)))
}

/// An input's settings; its requests and indirect pages go to `Scratch::requests` and `Scratch::indirect`.
struct Plan {
    flags: u8,
    /// The ring in use (its page order).
    ring: usize,
    forged: Option<u32>,
    in_flight: u32,
}

fn decode<L: BlkifLayout>(f: &Fixture, r: &mut Reader<'_>, s: &mut Scratch) -> Plan {
    let flags = r.u8();
    let flags2 = r.u8();
    let forged = (flags2 & 1 != 0).then(|| r.u32());
    let in_flight = u32::from(r.u8() % 64) + 1;
    let count = usize::from(r.u8() % 65);
    // Both indirect pages: 1024 valid descriptors, then the overrides.
    let indirect = &mut s.indirect;
    indirect.clear();
    indirect.extend_from_slice(&f.indirect_base);
    for _ in 0..r.u8() {
        let j = usize::from(r.u16()) % (2 * SEGMENTS_PER_INDIRECT_PAGE);
        let seg = BlkifSegment { gref: data_gref(f, r.u8()), first_sect: r.u8(), last_sect: r.u8() };
        indirect[j * 8..j * 8 + 8].copy_from_slice(&seg.encode());
    }
    let requests = &mut s.requests;
    requests.clear();
    for _ in 0..count {
        if r.is_empty() {
            break;
        }
        let raw = if r.u8() & 1 == 1 {
            RawRequest { bytes: r.array() }
        } else {
            let (op, byte1, nseg, sector, nr) = (r.u8(), r.u8(), r.u16(), u64::from(r.u16()), u64::from(r.u8()));
            // (Read in order: `from_fn` fills index 0 first.)
            let specs: [(u8, u8, u8); 11] = std::array::from_fn(|_| (r.u8(), r.u8(), r.u8()));
            let mut raw = match op {
                OP_DISCARD => encode::discard::<L>(0, sector, nr, false),
                OP_INDIRECT => {
                    let grefs: [GrantRef; 8] = std::array::from_fn(|i| indirect_gref(f, specs[i].0));
                    encode::indirect::<L>(byte1, 0, sector, nseg, &grefs)
                }
                _ => {
                    let segs: [BlkifSegment; 11] = std::array::from_fn(|i| {
                        let (sel, first, last) = specs[i];
                        BlkifSegment { gref: data_gref(f, sel), first_sect: first, last_sect: last }
                    });
                    encode::rw::<L>(op, 0, sector, &segs)
                }
            };
            raw.bytes[1] = byte1;
            raw
        };
        requests.push(raw);
    }
    Plan { flags, ring: usize::from((flags >> 1) & 3).min(2), forged, in_flight }
}

fn run_abi<L: BlkifLayout>(f: &mut Fixture, r: &mut Reader<'_>) {
    let mut s = f.scratch.take().unwrap_or_default();
    run_with::<L>(f, r, &mut s);
    f.scratch = Some(s);
}

fn run_with<L: BlkifLayout>(f: &mut Fixture, r: &mut Reader<'_>, s: &mut Scratch) {
    let plan = decode::<L>(f, r, s);
    for (k, &(page, _)) in f.ind.iter().enumerate() {
        let bytes = &s.indirect[k * XEN_PAGE_SIZE..(k + 1) * XEN_PAGE_SIZE];
        f.guest.memory().write_slice(bytes, GuestDomain::page_addr(page)).expect("indirect page");
    }
    let order = plan.ring as u32;
    let mut front = Front::<L>::new(f, order, &mut s.ports);
    let size = front.ring.size();
    s.ids.clear();
    s.harms_ring = false;
    let disk = if plan.flags & 0x80 != 0 { &f.ro_disk } else { &f.rw_disk };
    let geometry = *disk.geometry();
    for i in 0..s.requests.len().min(size as usize) {
        let mut raw = s.requests[i];
        // The ring was zeroed: no entry of an earlier input can carry one of these ids.
        let id = 0xF00D_0000_0000_0000 | i as u64;
        raw.put(L::REQ_ID, &id.to_le_bytes());
        assert!(front.ring.put_request(&raw));
        let want = expected::<L>(f, &plan, &raw, &geometry, s);
        s.ids.insert(id, want);
    }
    // A guest that reads into its own ring's pages (or takes descriptors from a ring's page) corrupts its ring: it
    // may only harm itself, so then nothing is asserted about its responses (the backend must still stop
    // cleanly). The model decodes every request as the backend does, so this is known exactly: a ring's grant
    // ref that merely occurs among a request's bytes (a sector, an id) harms nothing, and such inputs are
    // checked like any other.
    let self_harm = s.harms_ring;
    let published = match plan.forged {
        Some(v) => {
            front.ring.set_req_prod_raw(v);
            v
        }
        None => {
            front.ring.push_requests();
            front.ring.req_prod_pvt()
        }
    };

    let config = &mut f.configs[order as usize];
    config.abi = L::ABI;
    config.persistent_grants = plan.flags & 0x08 != 0;
    config.max_indirect_segments = if plan.flags & 0x20 != 0 { MAX_INDIRECT_SEGMENTS } else { 0 };
    let config = &f.configs[order as usize];
    let mut options = DataplaneOptions::default();
    options.grant_mode = if plan.flags & 0x10 != 0 { GrantMode::Copy } else { GrantMode::Map };
    options.max_in_flight = plan.in_flight;
    options.bounce_pages = 300;
    options.discard_secure = plan.flags & 0x40 != 0;
    options.io_threads = Some(f.io_thread.clone());
    let dp = Dataplane::start(disk.clone(), EngineKind::Sync, f.grants.clone(), &f.opener, config, &options)
        .expect("data plane");

    if self_harm {
        f.self_harming += 1;
        settle(&dp, u64::from(published.min(size)), SELF_HARM_WAIT);
    } else if published > size {
        let deadline = std::time::Instant::now() + WAIT;
        let ready = loop {
            let mut pfd = libc::pollfd { fd: dp.fatal_fd(), events: libc::POLLIN, revents: 0 };
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX);
            // SAFETY: one valid pollfd for the duration of the call.
            let n = unsafe { libc::poll(&mut pfd, 1, ms) };
            // libFuzzer's timeout alarm (SIGALRM) interrupts the wait now and then.
            if n >= 0 || std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                break n;
            }
        };
        assert_eq!(ready, 1, "a producer {published} entries ahead of a {size}-entry ring did not halt it");
        assert!(dp.halted());
        assert_eq!(front.ring.rsp_prod(), 0, "requests of a bogus producer were answered");
    } else {
        front
            .wait_responses(&mut f.evtchn, published as usize, WAIT, &mut s.responses, &mut s.ports)
            .unwrap_or_else(|e| panic!("worker hung: {e}"));
        assert!(!dp.halted(), "halted on a valid producer: {:?}", dp.fatal_error());
        let seen = &mut s.seen;
        seen.clear();
        for rsp in &s.responses {
            assert!(matches!(rsp.status, RSP_OKAY | RSP_ERROR | RSP_EOPNOTSUPP), "status {}", rsp.status);
            if let Some(&(operation, want)) = s.ids.get(&rsp.id) {
                assert!(seen.insert(rsp.id), "request {:#x} answered twice", rsp.id);
                assert_eq!(rsp.operation, operation, "response echoes another operation");
                if let Some(want) = want {
                    assert_eq!(rsp.status, want, "request {:#x} (flags {:#x})", rsp.id, plan.flags);
                }
            }
        }
        let answered_ours = s.ids.len().min(published as usize);
        assert_eq!(seen.len(), answered_ours, "some requests were never answered");
    }
    dp.stop();
    assert_eq!(f.host.live_mappings(), 0, "grant mappings leaked");
    assert_eq!(f.host.evtchn_switch().open_ports(0), 0, "backend ports left bound");

    let page = &mut f.page;
    for &(p, _) in &f.ro {
        f.guest.memory().read_slice(page, GuestDomain::page_addr(p)).expect("read");
        assert!(*page == f.ro_pattern, "a read-only grant was written");
    }
    for (k, &(p, _)) in f.ind.iter().enumerate() {
        f.guest.memory().read_slice(page, GuestDomain::page_addr(p)).expect("read");
        assert_eq!(&page[..], &s.indirect[k * XEN_PAGE_SIZE..(k + 1) * XEN_PAGE_SIZE], "an indirect page was written");
    }
}

/// For a guest that corrupts its own ring, wait until the backend took `expected` requests and answered every one
/// it took (or halted the ring), at most `limit`: its responses may land anywhere, so they are not waited for. The
/// data plane is stopped after; most such inputs settle in well under a millisecond, the rest (e.g. a read that
/// rewrote the producer index) use the limit.
fn settle(dp: &Dataplane, expected: u64, limit: Duration) {
    let Some(stats) = dp.stats(0) else { return };
    let deadline = std::time::Instant::now() + limit;
    while std::time::Instant::now() < deadline && !dp.halted() {
        let taken = QueueStats::get(&stats.requests);
        if taken >= expected && QueueStats::get(&stats.responses) >= taken {
            return;
        }
        std::thread::sleep(Duration::from_micros(20));
    }
}

/// Run one input.
pub fn run(data: &[u8]) {
    FIXTURE.with(|cell| {
        let mut cell = cell.borrow_mut();
        let f = cell.get_or_insert_with(fixture);
        let mut r = Reader::new(data);
        if data.first().is_some_and(|b| b & 1 != 0) {
            run_abi::<X86_32>(f, &mut r);
        } else {
            run_abi::<X86_64>(f, &mut r);
        }
    });
}

/// A structured request for the seeds.
fn request(w: &mut Writer, op: u8, byte1: u8, nseg: u16, sector: u16, nr: u8, segs: &[(u8, u8, u8)]) {
    w.u8(0).u8(op).u8(byte1).u16(nseg).u16(sector).u8(nr);
    for i in 0..11 {
        let (a, b, c) = segs.get(i).copied().unwrap_or((0, 0, 7));
        w.u8(a).u8(b).u8(c);
    }
}

/// Seed inputs.
pub fn seeds() -> Vec<Vec<u8>> {
    use transport_xen::blkif::{OP_FLUSH_DISKCACHE, OP_READ, OP_WRITE, OP_WRITE_BARRIER};
    let mut out = Vec::new();
    for flags in [0x20u8, 0x21, 0x2b, 0x35, 0x62, 0xa0] {
        let mut w = Writer::new();
        w.u8(flags).u8(0).u8(8).u8(10).u8(1).u16(3).u8(9).u8(0).u8(7);
        request(&mut w, OP_WRITE, 2, 0, 8, 0, &[(0, 0, 7), (1, 2, 5)]);
        request(&mut w, OP_READ, 2, 0, 8, 0, &[(2, 0, 7), (3, 2, 5)]);
        request(&mut w, OP_READ, 1, 0, 0, 0, &[(8, 0, 7)]);
        request(&mut w, OP_WRITE, 1, 0, 16, 0, &[(9, 0, 3)]);
        request(&mut w, OP_FLUSH_DISKCACHE, 0, 0, 0, 0, &[]);
        request(&mut w, OP_WRITE_BARRIER, 1, 0, 24, 0, &[(4, 0, 7)]);
        request(&mut w, OP_DISCARD, 1, 0, 64, 8, &[]);
        request(&mut w, OP_INDIRECT, OP_READ, 600, 128, 0, &[(0, 0, 0), (1, 0, 0)]);
        request(&mut w, OP_INDIRECT, OP_WRITE, 20, 2040, 0, &[(4, 0, 0)]);
        request(&mut w, 9, 1, 0, 0, 0, &[(12, 0, 7)]);
        out.push(w.finish());
    }
    let mut w = Writer::new();
    w.u8(0).u8(1).u32(1000).u8(4).u8(2).u8(0);
    request(&mut w, OP_READ, 1, 0, 0, 0, &[(0, 0, 7)]);
    request(&mut w, OP_READ, 1, 0, 0, 0, &[(0, 0, 7)]);
    out.push(w.finish());
    let mut w = Writer::new();
    w.u8(0).u8(1).u32(3).u8(4).u8(1).u8(0);
    w.u8(1).bytes(&[0xff; 112]);
    out.push(w.finish());
    out
}

#[cfg(test)]
mod tests {
    use transport_xen::blkif::{encode, BlkifSegment, OP_READ, OP_WRITE, X86_64};

    use super::*;

    /// The ring in use (page order 0) and the inputs found harming their own ring so far.
    fn ring_and_count() -> (GrantRef, u64) {
        FIXTURE.with(|cell| {
            let cell = cell.borrow();
            let f = cell.as_ref().expect("fixture");
            (f.rings[0].1[0], f.self_harming)
        })
    }

    /// An input of one raw request on the x86_64 ring of page order 0.
    fn one_raw(raw: &RawRequest) -> Vec<u8> {
        let mut w = Writer::new();
        w.u8(0).u8(0).u8(8).u8(1).u8(0).u8(1).bytes(&raw.bytes);
        w.finish()
    }

    /// Only an input that really reads into its own ring goes unchecked: a request whose bytes merely hold the
    /// ring's grant ref (here its sector, and a write from the ring page, which leaves the ring as it was) is
    /// checked like any other. (With a scan of the request bytes for the ring's refs, about a third of the
    /// committed corpus went unchecked.)
    #[test]
    fn only_reads_into_the_own_ring_go_unchecked() {
        run(&seeds()[0]);
        let (ring, before) = ring_and_count();
        let page = |gref| [BlkifSegment { gref, first_sect: 0, last_sect: 7 }];
        // (A sector beyond the disk: answered with an error, as the model expects.)
        run(&one_raw(&encode::rw::<X86_64>(OP_READ, 0, u64::from(ring), &page(9))));
        run(&one_raw(&encode::rw::<X86_64>(OP_WRITE, 0, 0, &page(ring))));
        assert_eq!(ring_and_count().1, before, "a request that leaves its ring alone went unchecked");
        run(&one_raw(&encode::rw::<X86_64>(OP_READ, 0, 0, &page(ring))));
        assert_eq!(ring_and_count().1, before + 1, "a read into the ring in use was not known as self-harm");
    }
}
