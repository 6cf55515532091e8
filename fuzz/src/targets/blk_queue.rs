// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `device_blk::BlockQueue`'s submit path with the synchronous engine on a real file, guest memory of three
//! regions (two adjacent, one after a hole), and a fuzzed batch of requests, checked against a byte-exact model
//! of the disk and the guest memory.
//!
//! Layout: `u8` flags (bit 0: read-only disk; bit 1: geometry claims 16 sectors more than the file has; bits 2-3:
//! logical block size 512 << n), `u8` queue depth, then up to [`MAX_REQUESTS`] requests: `u8` kind, `u8` sector,
//! `u8` discard sectors, `u8` segment count (at most 7), per segment `u32` address and `u16` length.
//!
//! Invariants: every cookie comes back exactly once with the status the model predicts; a read puts exactly the
//! disk's bytes into its segments, a write puts exactly the segments' bytes on the disk, discard and write-zeroes
//! zero exactly their range; nothing else changes, in guest memory (outside the segments) or on the disk
//! (beyond the request's range, including the partial sector after the last whole one); reads past the end of
//! the file are I/O errors, never success.

use std::cell::RefCell;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use device_blk::disk::DirectIo;
use device_blk::{
    BlockQueue, Disk, DiskOptions, EngineKind, Finished, Request, RequestKind, Sector, Segment, Status, ID_BYTES,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::blk_validate::{block_size, kind};
use crate::input::{Reader, Writer};

/// Most requests one input submits.
pub const MAX_REQUESTS: usize = 32;
/// Guest memory regions `(start, len)`: two adjacent, then a hole, then one more.
const REGIONS: [(u64, usize); 3] = [(0, 0x8000), (0x8000, 0x4000), (0x1_0000, 0x4000)];
/// One past the highest guest address.
const MEM_END: u64 = 0x1_4000;
/// The file: 128 whole sectors and a partial one the guest must never see.
const FILE_LEN: u64 = 128 * 512 + 100;
const SERIAL: [u8; ID_BYTES] = *b"fuzz-serial-0123456\0";

/// Built once per process. Between inputs the guest memory, the file and the model hold the patterns again:
/// each input restores only what it changed ([`Model::mem_dirty`], [`Model::file_dirty`]), after checking that
/// nothing else changed.
struct Fixture {
    _dir: tempfile::TempDir,
    rw: Arc<Disk>,
    ro: Arc<Disk>,
    mem: GuestMemoryMmap,
    mem_pattern: Vec<u8>,
    disk_pattern: Vec<u8>,
    model: Model,
    /// Scratch for reading the guest memory and the file back.
    scratch: Vec<u8>,
    /// An input is running (or panicked): the next one starts with a full reset.
    busy: bool,
}

thread_local! {
    static FIXTURE: RefCell<Option<Fixture>> = const { RefCell::new(None) };
}

fn fixture() -> Fixture {
    let shm = std::path::Path::new("/dev/shm");
    let dir = if shm.is_dir() { tempfile::tempdir_in(shm) } else { tempfile::tempdir() }.expect("temp dir");
    let path = dir.path().join("disk.img");
    std::fs::write(&path, vec![0u8; FILE_LEN as usize]).expect("disk file");
    let off = |read_only| DiskOptions::default().with_read_only(read_only).with_direct_io(DirectIo::Off);
    let rw = Arc::new(Disk::open(&path, &off(false)).expect("open rw"));
    let ro = Arc::new(Disk::open(&path, &off(true)).expect("open ro"));
    assert_eq!(rw.geometry().capacity, Sector(128));
    let ranges: Vec<(GuestAddress, usize)> = REGIONS.iter().map(|&(s, l)| (GuestAddress(s), l)).collect();
    let mem = GuestMemoryMmap::from_ranges(&ranges).expect("guest memory");
    let (mem_pattern, disk_pattern) = (pattern(MEM_END as usize, 7, 3), pattern(FILE_LEN as usize, 13, 5));
    let model = Model {
        mem: mem_pattern.clone(),
        unknown: vec![false; MEM_END as usize],
        file: disk_pattern.clone(),
        file_unknown: vec![false; FILE_LEN as usize],
        mem_dirty: 0..MEM_END as usize,
        file_dirty: 0..FILE_LEN as usize,
    };
    let scratch = Vec::with_capacity(MEM_END as usize);
    Fixture { _dir: dir, rw, ro, mem, mem_pattern, disk_pattern, model, scratch, busy: true }
}

/// `a ∪ b` as one range (an empty range adds nothing).
fn span(a: &std::ops::Range<usize>, start: usize, end: usize) -> std::ops::Range<usize> {
    if start >= end {
        a.clone()
    } else if a.is_empty() {
        start..end
    } else {
        a.start.min(start)..a.end.max(end)
    }
}

impl Fixture {
    /// Put the patterns back where the last input changed them (everywhere after a panic or at the start), in the
    /// guest memory, the file and the model.
    fn restore(&mut self) {
        if self.busy {
            self.model.mem_dirty = 0..MEM_END as usize;
            self.model.file_dirty = 0..FILE_LEN as usize;
        }
        let m = &mut self.model;
        let dirty = std::mem::replace(&mut m.mem_dirty, 0..0);
        for &(start, len) in &REGIONS {
            let (s, e) = ((start as usize).max(dirty.start), (start as usize + len).min(dirty.end));
            if s < e {
                self.mem.write_slice(&self.mem_pattern[s..e], GuestAddress(s as u64)).expect("reset memory");
            }
        }
        let (s, e) = (dirty.start.min(m.mem.len()), dirty.end.min(m.mem.len()));
        m.mem[s..e].copy_from_slice(&self.mem_pattern[s..e]);
        m.unknown[s..e].fill(false);

        let dirty = std::mem::replace(&mut m.file_dirty, 0..0);
        let file = self.rw.file();
        if m.file.len() != FILE_LEN as usize || self.busy {
            file.set_len(FILE_LEN).expect("truncate");
            m.file.truncate(FILE_LEN as usize);
            m.file_unknown.truncate(FILE_LEN as usize);
        }
        let (s, e) = (dirty.start.min(FILE_LEN as usize), dirty.end.min(FILE_LEN as usize));
        if s < e {
            file.write_all_at(&self.disk_pattern[s..e], s as u64).expect("reset disk");
            m.file[s..e].copy_from_slice(&self.disk_pattern[s..e]);
            m.file_unknown[s..e].fill(false);
        }
        self.busy = false;
    }
}

fn mapped(addr: u64, len: u64) -> bool {
    let end = addr.saturating_add(len);
    let in_low = end <= 0xC000;
    let in_high = addr >= 0x1_0000 && end <= MEM_END;
    in_low || in_high
}

/// The model of guest memory (addresses `0..MEM_END`; the hole is never touched) and of the file.
struct Model {
    mem: Vec<u8>,
    /// Guest bytes whose content the model cannot predict (a failed read's buffers).
    unknown: Vec<bool>,
    file: Vec<u8>,
    file_unknown: Vec<bool>,
    /// Guest addresses this input may have changed.
    mem_dirty: std::ops::Range<usize>,
    /// File offsets this input may have changed (past the end too: the file may grow).
    file_dirty: std::ops::Range<usize>,
}

impl Model {
    fn touch_mem(&mut self, start: usize, end: usize) {
        self.mem_dirty = span(&self.mem_dirty, start, end);
    }
    fn touch_file(&mut self, start: usize, end: usize) {
        self.file_dirty = span(&self.file_dirty, start, end);
    }
    fn segment(&self, s: &Segment) -> std::ops::Range<usize> {
        s.addr.0 as usize..s.addr.0 as usize + s.len as usize
    }
    fn forget_segments(&mut self, req: &Request) {
        for s in &req.segments {
            // A partly mapped buffer may be partly written.
            let start = (s.addr.0 as usize).min(self.unknown.len());
            let end = (s.addr.0 as usize + s.len as usize).min(self.unknown.len());
            self.unknown[start..end].fill(true);
            self.touch_mem(start, end);
        }
    }
}

/// What the model expects for `req`: the status (`None`: either) and the bytes delivered to the guest.
fn apply(m: &mut Model, req: &Request, geometry: &device_blk::Geometry) -> (Option<Status>, u32) {
    let range = match req.validate(geometry) {
        Ok(range) => range,
        Err(e) => return (Some(e.status()), 0),
    };
    let (off, len) = (range.offset as usize, range.len as usize);
    match req.kind {
        RequestKind::Flush => (Some(Status::Ok), 0),
        RequestKind::GetId => {
            let mut written = 0;
            for s in &req.segments {
                if written == ID_BYTES {
                    break;
                }
                let n = (s.len as usize).min(ID_BYTES - written);
                if n > 0 && !mapped(s.addr.0, n as u64) {
                    m.forget_segments(req);
                    return (Some(Status::IoError), 0);
                }
                if n > 0 {
                    let a = s.addr.0 as usize;
                    m.mem[a..a + n].copy_from_slice(&SERIAL[written..written + n]);
                    m.touch_mem(a, a + n);
                }
                written += n;
            }
            (Some(Status::Ok), written as u32)
        }
        RequestKind::Read | RequestKind::Write => {
            if req.segments.iter().any(|s| !mapped(s.addr.0, u64::from(s.len))) {
                return (Some(Status::IoError), 0);
            }
            if req.kind == RequestKind::Write {
                let mut pos = off;
                for s in &req.segments {
                    let seg = m.segment(s);
                    let n = seg.len();
                    if m.file.len() < pos + n {
                        m.file.resize(pos + n, 0);
                        m.file_unknown.resize(pos + n, false);
                    }
                    m.file[pos..pos + n].copy_from_slice(&m.mem[seg.clone()]);
                    // Bytes a failed read left undefined stay undefined on the disk.
                    m.file_unknown[pos..pos + n].copy_from_slice(&m.unknown[seg]);
                    m.touch_file(pos, pos + n);
                    pos += n;
                }
                return (Some(Status::Ok), 0);
            }
            if off + len > m.file.len() {
                // Past the end of the file: a short read, which must be an error; the buffers are undefined.
                m.forget_segments(req);
                return (Some(Status::IoError), 0);
            }
            let mut pos = off;
            for s in &req.segments {
                let r = m.segment(s);
                let n = r.len();
                m.mem[r.clone()].copy_from_slice(&m.file[pos..pos + n]);
                m.unknown[r.clone()].copy_from_slice(&m.file_unknown[pos..pos + n]);
                m.touch_mem(r.start, r.end);
                pos += n;
            }
            (Some(Status::Ok), len as u32)
        }
        RequestKind::Discard { .. } | RequestKind::WriteZeroes { .. } => {
            // Punch-hole or zero-range with KEEP_SIZE: the file never grows; a file system may refuse (then the
            // range is left as it was, or partly zeroed: unknown).
            let end = (off + len).min(m.file.len());
            if off < end {
                m.file[off..end].fill(0);
                m.file_unknown[off..end].fill(true);
                m.touch_file(off, end);
            }
            (None, 0)
        }
    }
}

fn decode_requests(r: &mut Reader<'_>) -> Vec<Request> {
    let mut out = Vec::new();
    while !r.is_empty() && out.len() < MAX_REQUESTS {
        let mut req = Request::new(kind(r.u8()));
        req.sector = Sector(u64::from(r.u8()));
        req.discard_sectors = u64::from(r.u8());
        for _ in 0..r.u8() % 8 {
            let addr = u64::from(r.u32()) % (MEM_END + 0x1000);
            req.segments.push(Segment { addr: GuestAddress(addr), len: u32::from(r.u16()) });
        }
        out.push(req);
    }
    out
}

/// `actual` equals `model` except where `unknown` says the model cannot tell (`base`: the first byte's address).
/// Compared in blocks first: most blocks are equal, and a comparison per byte costs much under the fuzzer.
fn same_but_unknown(actual: &[u8], model: &[u8], unknown: &[bool], base: usize, what: &str) {
    const BLOCK: usize = 256;
    for (k, (a, m)) in actual.chunks(BLOCK).zip(model.chunks(BLOCK)).enumerate() {
        if a == m {
            continue;
        }
        for (j, (&b, &want)) in a.iter().zip(m).enumerate() {
            let i = k * BLOCK + j;
            assert!(unknown[i] || b == want, "{what} {:#x} is {b:#x}, model {want:#x}", base + i);
        }
    }
}

fn pattern(len: usize, mul: usize, add: usize) -> Vec<u8> {
    (0..len).map(|i| ((i * mul + add) % 251) as u8).collect()
}

/// Run one input.
pub fn run(data: &[u8]) {
    FIXTURE.with(|f| {
        let mut f = f.borrow_mut();
        let f = f.get_or_insert_with(fixture);
        run_on(f, data);
    });
}

fn run_on(f: &mut Fixture, data: &[u8]) {
    let mut r = Reader::new(data);
    let flags = r.u8();
    let depth = u32::from(r.u8() % 8) + 1;
    let requests = decode_requests(&mut r);

    // The disk and the memory hold the known patterns again (what the last input changed is put back).
    f.restore();
    f.busy = true;
    let disk = if flags & 1 != 0 { f.ro.clone() } else { f.rw.clone() };
    let mut geometry = *disk.geometry();
    if flags & 2 != 0 {
        geometry.capacity = Sector(geometry.capacity.0 + 16);
    }
    geometry.logical_block_size = block_size((flags >> 2) & 3);
    geometry.physical_block_size = geometry.logical_block_size;

    let engine = EngineKind::Sync.build(disk.clone(), depth).expect("engine");
    let mut queue: BlockQueue<usize> = BlockQueue::new(geometry, SERIAL, engine);
    let mut expected = Vec::with_capacity(requests.len());
    let mut finished: Vec<Option<Finished<usize>>> = (0..requests.len()).map(|_| None).collect();
    let collect = |queue: &mut BlockQueue<usize>, finished: &mut Vec<Option<Finished<usize>>>| {
        queue.submit_batch().expect("submit the batch");
        queue.drain(|done| {
            let i = done.cookie;
            assert!(finished[i].is_none(), "cookie {i} came back twice");
            finished[i] = Some(done);
        });
    };
    let model = &mut f.model;
    for (i, req) in requests.iter().enumerate() {
        expected.push(apply(model, req, &geometry));
        let mut cookie = i;
        loop {
            // SAFETY: the guest memory lives in the fixture, mapped for the whole run.
            match unsafe { queue.submit(req, &f.mem, cookie) } {
                Ok(()) => break,
                Err(c) => {
                    assert!(!queue.has_room(), "submit refused with room left");
                    cookie = c;
                    collect(&mut queue, &mut finished);
                }
            }
        }
    }
    collect(&mut queue, &mut finished);
    assert_eq!(queue.in_flight(), 0);

    for (i, (done, (status, to_guest))) in finished.iter().zip(&expected).enumerate() {
        let done = done.as_ref().unwrap_or_else(|| panic!("request {i} never finished"));
        let req = &requests[i];
        if let Some(status) = status {
            assert_eq!(done.status, *status, "request {i} {req:?}: {:?}", done.error);
        }
        if done.status == Status::Ok {
            assert_eq!(done.bytes_to_guest, *to_guest, "request {i} {req:?}");
        } else {
            assert_eq!(done.bytes_to_guest, 0);
        }
    }

    // All of the memory and all of the file, not only what the model changed: nothing else may change.
    let actual = &mut f.scratch;
    for &(start, len) in &REGIONS {
        let s = start as usize;
        actual.resize(len, 0);
        f.mem.read_slice(actual, GuestAddress(start)).expect("read memory");
        same_but_unknown(actual, &model.mem[s..s + len], &model.unknown[s..s + len], s, "guest byte");
    }
    let file = disk.file();
    let len = file.metadata().expect("disk metadata").len() as usize;
    assert_eq!(len, model.file.len(), "disk length");
    actual.resize(len, 0);
    file.read_exact_at(actual, 0).expect("read disk");
    same_but_unknown(actual, &model.file, &model.file_unknown, 0, "disk byte");
    if flags & 2 == 0 {
        assert_eq!(&actual[128 * 512..], &f.disk_pattern[128 * 512..], "the partial last sector changed");
    }
    f.busy = false;
}

/// Seed inputs.
pub fn seeds() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let req = |w: &mut Writer, kind: u8, sector: u8, discard: u8, segs: &[(u32, u16)]| {
        w.u8(kind).u8(sector).u8(discard).u8(segs.len() as u8);
        for &(a, l) in segs {
            w.u32(a).u16(l);
        }
    };
    let mut w = Writer::new();
    w.u8(0).u8(3);
    req(&mut w, 1, 0, 0, &[(0x1000, 4096), (0x7e00, 1024)]); // write across adjacent regions
    req(&mut w, 0, 0, 0, &[(0x1_0000, 4096), (0x2000, 1024)]); // read it back elsewhere
    req(&mut w, 2, 0, 0, &[]);
    req(&mut w, 3, 4, 4, &[]);
    req(&mut w, 4 | 0x80, 8, 2, &[]);
    req(&mut w, 5, 0, 0, &[(0x3000, 8), (0x3100, 64)]);
    req(&mut w, 0, 127, 0, &[(0x4000, 512)]);
    out.push(w.finish());

    let mut w = Writer::new();
    w.u8(2).u8(1);
    req(&mut w, 0, 130, 0, &[(0x5000, 1024)]); // past the file, inside the claimed capacity
    req(&mut w, 1, 140, 0, &[(0x5000, 512)]);
    req(&mut w, 0, 0, 0, &[(0xBE00, 1024)]); // into the hole
    req(&mut w, 5, 0, 0, &[(0xBFF8, 20)]);
    out.push(w.finish());

    let mut w = Writer::new();
    w.u8(1 | 4).u8(0);
    req(&mut w, 1, 0, 0, &[(0, 1024)]);
    req(&mut w, 0, 2, 0, &[(0, 1024)]);
    req(&mut w, 0, 0, 0, &[(0, 1024), (0, 1024)]);
    out.push(w.finish());
    out
}
