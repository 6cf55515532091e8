// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The whole blkif ring consumer: `transport_xen::dataplane::Dataplane` (I/O thread, epoll loop, request copy,
//! decode, indirect pages, grant map / persistent grants / grant copy, `device-blk` queue with the synchronous
//! engine on a real file, responses and notifications) serving a fuzzed frontend on the emulated Xen host.
//!
//! The host, one guest, its granted pages (8 read-write data pages, 2 read-only pages, 2 indirect-descriptor
//! pages), 8 ring slots (4 pages and an event channel port each) and the I/O thread live for the whole process.
//! A data plane and its ring are kept across inputs as a "lane" and serve every later input of the same connection
//! (ABI, ring page order, features, in-flight limit): see `lanes` for what a lane carries from one input to the
//! next and how a failure that depends on it is reproduced (`BLKIF_DATAPLANE_FRESH=1`: a new lane per input). A new
//! lane's data plane starts after its first input queued its requests (its first turn finds them); a kept lane's
//! input queues where the last one stopped and notifies. The buffers an input fills (its requests, indirect pages,
//! expected answers, responses) are kept too, so an input allocates little (each allocation is dear under
//! AddressSanitizer). The lanes are served by one I/O thread (`DataplaneOptions::io_threads`, the production
//! default: `blkbackd xen --io-threads 1`); the same worker rounds serve a ring on a thread of its own
//! (`--io-threads 0`), whose thread loop the crate's tests cover.
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
//! hangs or dies; read-only and indirect pages are never written; after every input exactly the live lanes' ring
//! pages stay mapped (and persistent grants while a lane has them) and one port per lane stays bound, so after a
//! lane's `stop` nothing of it does.

use std::cell::RefCell;
use std::sync::Arc;
use std::time::Duration;

use device_blk::disk::DirectIo;
use device_blk::{Disk, DiskOptions, EngineKind};
use transport_xen::blkif::{
    encode, BlkifLayout, BlkifRequest, BlkifResponse, BlkifSegment, RawRequest, OP_DISCARD, OP_INDIRECT,
    RSP_EOPNOTSUPP, RSP_ERROR, RSP_OKAY, SEGMENTS_PER_INDIRECT_PAGE, X86_32, X86_64,
};
use transport_xen::connect::QueueRing;
use transport_xen::connect::{ConnectConfig, MAX_INDIRECT_SEGMENTS};
use transport_xen::dataplane::{Dataplane, DataplaneOptions, IoThreads, QueueStats};
use transport_xen::emulated::evtchn::{EmulatedEventChannel, EmulatedEvtchnOpener};
use transport_xen::emulated::grants::EmulatedGrantTable;
use transport_xen::emulated::{EmulatedHost, GuestDomain};
use transport_xen::grant_memory::GrantMode;
use transport_xen::services::{EventChannel, EvtchnPort, GrantRef, XEN_PAGE_SIZE};
use vm_memory::Bytes;

use crate::input::{Reader, Writer};

mod history;
mod lanes;
mod model;
#[cfg(test)]
mod tests;

use lanes::{Lane, LaneKey, Lanes, RingSlot, SLOTS, SLOT_PAGES};
use model::expected;

const DOMID: u16 = 7;
const DISK_BYTES: u64 = 1 << 20;
const WAIT: Duration = Duration::from_secs(20);
/// The first grant ref of the ring slots.
const RING_REFS_FROM: GrantRef = 0x1_0000;
/// How long a guest that corrupts its own ring is given before its data plane is stopped.
const SELF_HARM_WAIT: Duration = Duration::from_millis(20);
/// The id of an input's first request (the others follow).
const ID_BASE: u64 = 0xF00D_0000_0000_0000;

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
    /// The pages and ports the lanes' rings use.
    slots: Vec<RingSlot>,
    /// The rings served across inputs.
    lanes: Lanes,
    /// Dom0's grant table and event channels.
    grants: Arc<EmulatedGrantTable>,
    opener: EmulatedEvtchnOpener,
    /// Buffers every input reuses (taken by the input that runs).
    scratch: Option<Scratch>,
    /// The frontend's event channel (the slots' ports).
    evtchn: EmulatedEventChannel,
    /// Inputs whose responses were not checked because they harm their own ring (see `Scratch::harms_ring`).
    self_harming: u64,
    /// One I/O thread for every lane's data plane (as `blkbackd xen --io-threads` runs them).
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
    let mut evtchn = guest.evtchn().expect("event channel");
    let slots = (0..SLOTS)
        .map(|_| {
            let pages = grant(SLOT_PAGES, false);
            let port = evtchn.alloc_unbound(0).expect("unbound port");
            RingSlot { first: pages[0].0, grefs: pages.iter().map(|&(_, g)| g).collect(), port }
        })
        .collect();
    let (grants, opener) = (Arc::new(host.grant_table(0)), host.evtchn_opener(0));
    history::install_panic_hook();
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
        slots,
        lanes: Lanes::new(),
        grants,
        opener,
        scratch: Some(Scratch::default()),
        evtchn,
        self_harming: 0,
        // Keeps the slots of an ended data plane for the next one's (at most 64 in flight per data plane).
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
    /// Per request (its id is `ID_BASE` + its index): the operation and status expected. (Indexed, not hashed:
    /// SipHash per request and response was a few per cent of the target's time.)
    ids: Vec<(u8, Option<i16>)>,
    /// Per request: answered.
    seen: Vec<bool>,
    responses: Vec<BlkifResponse>,
    ports: Vec<EvtchnPort>,
    /// A request of this input, as the model decodes it, reads into a page of the ring in use or takes its
    /// descriptors from a ring's page (`model::expected` sets it).
    harms_ring: bool,
    /// The slots (a bit each) into whose pages a request of this input reads, but the ring in use: their lanes'
    /// rings may have been overwritten, so those lanes end after the input (`model::expected` sets it).
    written_slots: u32,
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

/// The slot whose pages include `gref`, and the page's index in it.
fn slot_of(f: &Fixture, gref: GrantRef) -> Option<(usize, usize)> {
    f.slots.iter().enumerate().find_map(|(k, s)| s.grefs.iter().position(|&g| g == gref).map(|i| (k, i)))
}

/// The page `gref` grants and whether it is writable. The slots' pages are writable pages like any other (reads
/// into the ring in use, or into another lane's, are caught by the model: `Scratch::harms_ring`,
/// `Scratch::written_slots`).
fn page_of(f: &Fixture, gref: GrantRef) -> Option<(usize, bool)> {
    let find = |list: &[(usize, GrantRef)]| list.iter().find(|&&(_, g)| g == gref).map(|&(p, _)| p);
    let ring = || slot_of(f, gref).map(|(k, i)| f.slots[k].first + i);
    find(&f.rw).or_else(ring).map(|p| (p, true)).or_else(|| find(&f.ro).or_else(|| find(&f.ind)).map(|p| (p, false)))
}

/// An input's settings; its requests and indirect pages go to `Scratch::requests` and `Scratch::indirect`.
struct Plan {
    flags: u8,
    /// The ring in use: its page order, and the slot holding it (set once the lane is known).
    ring: usize,
    slot: usize,
    forged: Option<u32>,
    in_flight: u32,
}

impl Plan {
    fn key(&self) -> LaneKey {
        LaneKey { flags: (self.flags & !0x06) | ((self.ring as u8) << 1), in_flight: self.in_flight }
    }
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
    Plan { flags, ring: usize::from((flags >> 1) & 3).min(2), slot: 0, forged, in_flight }
}

fn run_abi<L: BlkifLayout + 'static>(f: &mut Fixture, data: &[u8]) {
    let mut s = f.scratch.take().unwrap_or_default();
    let mut r = Reader::new(data);
    let mut plan = decode::<L>(f, &mut r, &mut s);
    let mut lane = lanes::lane_for::<L>(f, plan.key(), data);
    plan.slot = lane.slot;
    // (A failure writes the lane's inputs: `history`.)
    history::running(true);
    let started = lane.served() == 1;
    let keep = run_with::<L>(f, &plan, &mut lane, &mut s);
    history::running(false);
    if keep && !f.lanes.fresh {
        f.lanes.keep(lane);
    } else {
        lanes::end(f, lane);
    }
    while let Some(other) = f.lanes.take_slot(s.written_slots) {
        lanes::end(f, other);
    }
    // (Every page of every ring after a lane started; `lanes::end` checks them after a lane ended.)
    lanes::check_accounting(f, started);
    f.scratch = Some(s);
}

/// Run one input on `lane`; whether the lane may serve the next input of its key.
fn run_with<L: BlkifLayout + 'static>(f: &mut Fixture, plan: &Plan, lane: &mut Lane, s: &mut Scratch) -> bool {
    for (k, &(page, _)) in f.ind.iter().enumerate() {
        let bytes = &s.indirect[k * XEN_PAGE_SIZE..(k + 1) * XEN_PAGE_SIZE];
        f.guest.memory().write_slice(bytes, GuestDomain::page_addr(page)).expect("indirect page");
    }
    let port = f.slots[lane.slot].port;
    let front = lane.front::<L>();
    let size = front.ring.size();
    let rsp_before = front.ring.rsp_prod();
    let base = front.ring.req_prod_pvt();
    s.ids.clear();
    s.seen.clear();
    s.harms_ring = false;
    s.written_slots = 0;
    let disk = if plan.flags & 0x80 != 0 { &f.ro_disk } else { &f.rw_disk };
    let geometry = *disk.geometry();
    for i in 0..s.requests.len().min(size as usize) {
        let mut raw = s.requests[i];
        // Every response of the lane's earlier inputs was taken: none can carry one of these ids.
        let id = ID_BASE | i as u64;
        raw.put(L::REQ_ID, &id.to_le_bytes());
        assert!(front.ring.put_request(&raw));
        let want = expected::<L>(f, plan, &raw, &geometry, s);
        s.ids.push(want);
        s.seen.push(false);
    }
    // A guest that reads into its own ring's pages (or takes descriptors from a ring's page) corrupts its ring: it
    // may only harm itself, so then nothing is asserted about its responses (the backend must still stop
    // cleanly). The model decodes every request as the backend does, so this is known exactly: a ring's grant
    // ref that merely occurs among a request's bytes (a sector, an id) harms nothing, and such inputs are
    // checked like any other.
    let self_harm = s.harms_ring;
    let queued = s.requests.len().min(size as usize) as u32;
    let (published, notify) = match plan.forged {
        Some(v) => {
            // The slots up to a producer within the ring hold zeroes (requests with no segment), not requests of
            // the lane's earlier inputs.
            for _ in queued..v.min(size) {
                front.ring.put_request_unchecked(&RawRequest { bytes: [0; 112] });
            }
            front.ring.set_req_prod_raw(base.wrapping_add(v));
            (v, true)
        }
        None => (queued, front.ring.push_requests()),
    };

    let requests_before = match &lane.dp {
        Some(dp) => {
            // As blkfront: an event if the backend's event index asks for one (a kept lane's worker re-armed it
            // when its ring went idle; a request it would miss hangs the input). A forged producer always notifies.
            if notify {
                f.evtchn.notify(port).expect("notify");
            }
            dp.stats(0).map_or(0, |st| QueueStats::get(&st.requests))
        }
        None => {
            let config = ConnectConfig {
                frontend_domid: DOMID,
                abi: L::ABI,
                queues: vec![QueueRing {
                    ring_refs: f.slots[lane.slot].grefs[..lane.key.ring_pages()].to_vec(),
                    remote_port: port,
                }],
                persistent_grants: plan.flags & 0x08 != 0,
                max_indirect_segments: if plan.flags & 0x20 != 0 { MAX_INDIRECT_SEGMENTS } else { 0 },
            };
            let mut options = DataplaneOptions::default();
            options.grant_mode = if plan.flags & 0x10 != 0 { GrantMode::Copy } else { GrantMode::Map };
            options.max_in_flight = plan.in_flight;
            options.bounce_pages = 300;
            options.discard_secure = plan.flags & 0x40 != 0;
            options.io_threads = Some(f.io_thread.clone());
            let dp = Dataplane::start(disk.clone(), EngineKind::Sync, f.grants.clone(), &f.opener, &config, &options)
                .expect("data plane");
            lane.dp = Some(dp);
            // Once connected, an event whatever the ring holds (its first turn finds the requests anyway): the
            // event queues along the way are then made by the input that makes the lane, so that a kept lane's
            // input leaves nothing allocated (see `history`).
            f.evtchn.notify(port).expect("notify");
            0
        }
    };
    let (front, dp) = lane.split::<L>();
    let dp = dp.as_ref().expect("started");
    if self_harm {
        f.self_harming += 1;
        settle(dp, requests_before + u64::from(published.min(size)), SELF_HARM_WAIT);
    } else if published > size {
        wait_halted(dp, published, size);
        assert_eq!(front.ring.rsp_prod(), rsp_before, "requests of a bogus producer were answered");
    } else {
        front
            .wait_responses(&mut f.evtchn, published as usize, WAIT, &mut s.responses, &mut s.ports)
            .unwrap_or_else(|e| panic!("worker hung: {e}"));
        assert!(!dp.halted(), "halted on a valid producer: {:?}", dp.fatal_error());
        for rsp in &s.responses {
            assert!(matches!(rsp.status, RSP_OKAY | RSP_ERROR | RSP_EOPNOTSUPP), "status {}", rsp.status);
            let ours = rsp.id.checked_sub(ID_BASE).and_then(|i| usize::try_from(i).ok()).filter(|&i| i < s.ids.len());
            if let Some(i) = ours {
                let (operation, want) = s.ids[i];
                assert!(!std::mem::replace(&mut s.seen[i], true), "request {:#x} answered twice", rsp.id);
                assert_eq!(rsp.operation, operation, "response echoes another operation");
                if let Some(want) = want {
                    assert_eq!(rsp.status, want, "request {:#x} (flags {:#x})", rsp.id, plan.flags);
                }
            }
        }
        let answered_ours = s.ids.len().min(published as usize);
        let answered = s.seen.iter().filter(|&&a| a).count();
        assert_eq!(answered, answered_ours, "some requests were never answered");
    }
    let keep = !self_harm && plan.forged.is_none() && !dp.halted();
    if !keep {
        // Stopped here, so that the pages below are checked after its last write.
        if let Some(dp) = lane.dp.take() {
            dp.stop();
        }
    }

    let page = &mut f.page;
    for &(p, _) in &f.ro {
        f.guest.memory().read_slice(page, GuestDomain::page_addr(p)).expect("read");
        assert!(*page == f.ro_pattern, "a read-only grant was written");
    }
    for (k, &(p, _)) in f.ind.iter().enumerate() {
        f.guest.memory().read_slice(page, GuestDomain::page_addr(p)).expect("read");
        assert_eq!(&page[..], &s.indirect[k * XEN_PAGE_SIZE..(k + 1) * XEN_PAGE_SIZE], "an indirect page was written");
    }
    keep
}

/// A producer `published` entries ahead of a `size`-entry ring must halt it.
fn wait_halted(dp: &Dataplane, published: u32, size: u32) {
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
}

/// For a guest that corrupts its own ring, wait until the backend took `expected` requests in all (its counter
/// counts the lane's earlier inputs too) and answered every one it took (or halted the ring), at most `limit`: its
/// responses may land anywhere, so they are not waited for. The data plane is stopped after; most such inputs
/// settle in well under a millisecond, the rest (e.g. a read that rewrote the producer index) use the limit.
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
        if data.first().is_some_and(|b| b & 1 != 0) {
            run_abi::<X86_32>(f, data);
        } else {
            run_abi::<X86_64>(f, data);
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
