// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The virtio-blk descriptor-chain parser (`device_blk::virtio::parse_chain`) on chains that `virtio-queue`
//! iterates out of fuzzed guest memory: a 16-entry split queue (laid out by `virtio-queue`'s `MockSplitQueue`)
//! whose descriptors, head index and memory contents (headers, ranges, indirect tables) are all fuzzed, in guest
//! memory of two regions with a hole between them.
//!
//! Layout: `u8` seg_max - 1, `u16` head index, 16 descriptors (`u32` address selector, `u32` length, `u16`
//! flags, `u16` next), then bytes copied to guest address 0x1000. An address selector with the top bit set
//! means `u64::MAX - (sel & 0xffff)` (overflow), else `sel % 0x22000` (both regions, the hole, past the end).
//!
//! Invariants: the parser agrees with an independent reading of virtio 1.2 section 5.2.6 (same outcome, same
//! error, same status byte, same request); parsing is repeatable into a reused request; a parsed request has at
//! most `seg_max` segments, and validating it against a disk either fails or yields a range inside the disk.

use device_blk::virtio::{parse_chain, ChainError, Parsed, HEADER_BYTES};
use device_blk::{Geometry, Request, RequestKind, Sector, Segment, Status};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueOwnedT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::input::{Reader, Writer};

const QUEUE_SIZE: u16 = 16;
const BLOB: u64 = 0x1000;
const BLOB_MAX: usize = 0x7000;

thread_local! {
    static MEM: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1_0000), (GuestAddress(0x2_0000), 0x1000)])
        .expect("guest memory");
}

fn address(sel: u32) -> u64 {
    if sel & 0x8000_0000 != 0 {
        u64::MAX - u64::from(sel & 0xffff)
    } else {
        u64::from(sel) % 0x2_2000
    }
}

/// The independent reading of the spec: what `parse_chain` must return, and the request when it parses.
fn model(descs: &[Descriptor], mem: &GuestMemoryMmap, seg_max: usize) -> (Parsed, Option<Request>) {
    let Some(head) = descs.first() else {
        return (Parsed::Unanswerable { error: ChainError::Empty }, None);
    };
    // A header, `seg_max` segments (one at least), the status and one more are read; a longer chain is not.
    let max = seg_max.max(1) + 3;
    if descs.len() > max {
        return (Parsed::Unanswerable { error: ChainError::TooLong { max } }, None);
    }
    if descs.len() == 1 {
        return (Parsed::Unanswerable { error: ChainError::NoStatus }, None);
    }
    let last = descs[descs.len() - 1];
    let status = if !last.is_write_only() {
        Err(ChainError::StatusReadOnly)
    } else if last.len() == 0 {
        Err(ChainError::StatusEmpty)
    } else {
        match last.addr().0.checked_add(u64::from(last.len()) - 1) {
            None => Err(ChainError::StatusOutsideMemory { addr: u64::MAX }),
            Some(a) if !mem.address_in_range(GuestAddress(a)) => Err(ChainError::StatusOutsideMemory { addr: a }),
            Some(a) => Ok(GuestAddress(a)),
        }
    };
    let status = match status {
        Ok(s) => s,
        Err(error) => return (Parsed::Unanswerable { error }, None),
    };
    match shape(head, &descs[1..descs.len() - 1], mem, seg_max) {
        Ok(req) => (Parsed::Request { status }, Some(req)),
        Err(error) => (Parsed::Refused { status, error }, None),
    }
}

fn shape(head: &Descriptor, data: &[Descriptor], mem: &GuestMemoryMmap, seg_max: usize) -> Result<Request, ChainError> {
    if head.is_write_only() {
        return Err(ChainError::HeaderWritable);
    }
    if (head.len() as usize) < HEADER_BYTES {
        return Err(ChainError::HeaderTooShort { len: head.len() });
    }
    let mut raw = [0u8; 16];
    mem.read_slice(&mut raw, head.addr()).map_err(|_| ChainError::HeaderOutsideMemory { addr: head.addr().0 })?;
    let ty = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
    let sector = u64::from_le_bytes([raw[8], raw[9], raw[10], raw[11], raw[12], raw[13], raw[14], raw[15]]);
    let (mut kind, name) = match ty {
        VIRTIO_BLK_T_IN => (RequestKind::Read, "read"),
        VIRTIO_BLK_T_OUT => (RequestKind::Write, "write"),
        VIRTIO_BLK_T_FLUSH => (RequestKind::Flush, "flush"),
        VIRTIO_BLK_T_GET_ID => (RequestKind::GetId, "get-id"),
        VIRTIO_BLK_T_DISCARD => (RequestKind::Discard { secure: false }, "discard"),
        VIRTIO_BLK_T_WRITE_ZEROES => (RequestKind::WriteZeroes { unmap: false }, "write-zeroes"),
        other => return Err(ChainError::UnknownType(other)),
    };
    let mut req = Request::new(kind);
    req.sector = Sector(sector);
    let mut ranges = 0u32;
    for d in data {
        let found = if d.is_write_only() { "device-writable" } else { "driver-readable" };
        match kind {
            RequestKind::Flush => return Err(ChainError::UnexpectedData),
            RequestKind::Read | RequestKind::GetId | RequestKind::Write => {
                if d.is_write_only() == (kind == RequestKind::Write) {
                    return Err(ChainError::WrongDirection { op: name, found });
                }
                if req.segments.len() >= seg_max {
                    return Err(ChainError::TooManySegments { max: seg_max });
                }
                req.segments.push(Segment { addr: d.addr(), len: d.len() });
            }
            RequestKind::Discard { .. } | RequestKind::WriteZeroes { .. } => {
                if d.is_write_only() {
                    return Err(ChainError::WrongDirection { op: name, found });
                }
                if d.len() == 0 || d.len() % 16 != 0 {
                    return Err(ChainError::BadRangePayload { len: d.len() });
                }
                ranges += d.len() / 16;
                if ranges > 1 {
                    return Err(ChainError::TooManyRanges);
                }
                let mut r = [0u8; 16];
                mem.read_slice(&mut r, d.addr()).map_err(|_| ChainError::RangeOutsideMemory { addr: d.addr().0 })?;
                let flags = u32::from_le_bytes([r[12], r[13], r[14], r[15]]);
                if flags & !1 != 0 {
                    return Err(ChainError::ReservedFlags { flags });
                }
                kind = match kind {
                    RequestKind::Discard { .. } if flags & 1 != 0 => return Err(ChainError::DiscardUnmap),
                    RequestKind::WriteZeroes { .. } => RequestKind::WriteZeroes { unmap: flags & 1 != 0 },
                    k => k,
                };
                req.kind = kind;
                req.sector = Sector(u64::from_le_bytes([r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7]]));
                req.discard_sectors = u64::from(u32::from_le_bytes([r[8], r[9], r[10], r[11]]));
            }
        }
    }
    if matches!(kind, RequestKind::Discard { .. } | RequestKind::WriteZeroes { .. }) && ranges == 0 {
        return Err(ChainError::MissingRange);
    }
    Ok(req)
}

/// Run one input.
pub fn run(data: &[u8]) {
    MEM.with(|mem| run_on(mem, data));
}

fn run_on(mem: &GuestMemoryMmap, data: &[u8]) {
    let mut r = Reader::new(data);
    let seg_max = usize::from(r.u8()) + 1;
    let head = r.u16();
    let descs: Vec<RawDescriptor> = (0..QUEUE_SIZE)
        .map(|_| RawDescriptor::from(Descriptor::new(address(r.u32()), r.u32(), r.u16(), r.u16())))
        .collect();
    let blob = r.bytes(BLOB_MAX);

    // Fresh memory: zeroes, the queue, the blob.
    let zero = vec![0u8; 0x1_0000];
    mem.write_slice(&zero, GuestAddress(0)).expect("clear");
    mem.write_slice(&zero[..0x1000], GuestAddress(0x2_0000)).expect("clear");
    let vq = MockSplitQueue::new(mem, QUEUE_SIZE);
    for (i, d) in descs.iter().enumerate() {
        vq.desc_table().store(i as u16, *d).expect("descriptor");
    }
    mem.write_obj(head.to_le(), vq.avail_addr().unchecked_add(4)).expect("avail ring");
    mem.write_obj(1u16.to_le(), vq.avail_addr().unchecked_add(2)).expect("avail idx");
    mem.write_slice(blob, GuestAddress(BLOB)).expect("blob");

    let mut queue: Queue = vq.create_queue().expect("queue");
    let chain = match queue.iter(mem) {
        Ok(mut avail) => avail.next(),
        Err(_) => None,
    };
    let Some(chain) = chain else {
        return; // virtio-queue refused the head index: nothing reaches our parser.
    };
    let listed: Vec<Descriptor> = chain.clone().collect();
    let (want, want_req) = model(&listed, mem, seg_max);

    // A reused request that held something else before.
    let mut req = Request::with_capacity();
    req.reset(RequestKind::Write, Sector(99));
    req.segments.extend((0..7).map(|i| Segment { addr: GuestAddress(i), len: 512 }));
    req.discard_sectors = 5;
    let got = parse_chain(chain.clone(), mem, seg_max, &mut req);
    assert_eq!(got, want, "chain {listed:?}");
    if let Some(want_req) = &want_req {
        assert_eq!(&req, want_req, "chain {listed:?}");
    }
    let mut again = Request::default();
    assert_eq!(parse_chain(chain, mem, seg_max, &mut again), got, "parsing is not repeatable");
    if let Parsed::Request { .. } = got {
        assert_eq!(again, req);
        assert!(req.segments.len() <= seg_max);
        let geometry = Geometry::for_tests(Sector(2048));
        if let Ok(range) = req.validate(&geometry) {
            assert!(range.offset + range.len <= geometry.size_bytes());
        }
    }
    if let Parsed::Refused { error, .. } | Parsed::Unanswerable { error } = got {
        assert!(matches!(error.status(), Status::IoError | Status::Unsupported));
    }
}

/// One seed: seg_max, head, descriptors `(addr, len, flags, next)`, and blob contents.
fn seed(seg_max: u8, head: u16, descs: &[(u32, u32, u16, u16)], blob: &[(u64, &[u8])]) -> Vec<u8> {
    let mut w = Writer::new();
    w.u8(seg_max - 1).u16(head);
    for i in 0..QUEUE_SIZE as usize {
        let (a, l, f, n) = descs.get(i).copied().unwrap_or_default();
        w.u32(a).u32(l).u16(f).u16(n);
    }
    let mut bytes = vec![0u8; blob.iter().map(|(a, b)| (*a - BLOB) as usize + b.len()).max().unwrap_or(0)];
    for (a, b) in blob {
        let off = (*a - BLOB) as usize;
        bytes[off..off + b.len()].copy_from_slice(b);
    }
    w.bytes(&bytes);
    w.finish()
}

fn header(ty: u32, sector: u64) -> Vec<u8> {
    let mut h = vec![0u8; 16];
    h[..4].copy_from_slice(&ty.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    h
}

fn range(sector: u64, sectors: u32, flags: u32) -> Vec<u8> {
    let mut r = sector.to_le_bytes().to_vec();
    r.extend_from_slice(&sectors.to_le_bytes());
    r.extend_from_slice(&flags.to_le_bytes());
    r
}

/// Seed inputs.
pub fn seeds() -> Vec<Vec<u8>> {
    let (n, w, ind) = (VRING_DESC_F_NEXT as u16, VRING_DESC_F_WRITE as u16, VRING_DESC_F_INDIRECT as u16);
    let read = header(VIRTIO_BLK_T_IN, 8);
    let write = header(VIRTIO_BLK_T_OUT, 16);
    let discard = header(VIRTIO_BLK_T_DISCARD, 0);
    let wz = header(VIRTIO_BLK_T_WRITE_ZEROES, 0);
    let getid = header(VIRTIO_BLK_T_GET_ID, 0);
    let flush = header(VIRTIO_BLK_T_FLUSH, 0);
    let r = range(64, 8, 0);
    let r_unmap = range(64, 8, 1);
    // An indirect table at 0x3000: header, one data buffer, status.
    let mut table = Vec::new();
    for (a, l, f, nx) in [(0x1000u64, 16u32, n, 1u16), (0x4000, 4096, n | w, 2), (0x5000, 1, w, 0)] {
        table.extend_from_slice(&a.to_le_bytes());
        table.extend_from_slice(&l.to_le_bytes());
        table.extend_from_slice(&f.to_le_bytes());
        table.extend_from_slice(&nx.to_le_bytes());
    }
    vec![
        seed(
            4,
            0,
            &[(0x1000, 16, n, 1), (0x4000, 4096, n | w, 2), (0x6000, 512, n | w, 3), (0x5000, 1, w, 0)],
            &[(0x1000, &read)],
        ),
        seed(4, 0, &[(0x1000, 16, n, 1), (0x4000, 1024, n, 2), (0x5000, 1, w, 0)], &[(0x1000, &write)]),
        seed(
            1,
            0,
            &[(0x1000, 16, n, 1), (0x4000, 512, n | w, 2), (0x4200, 512, n | w, 3), (0x5000, 1, w, 0)],
            &[(0x1000, &read)],
        ),
        seed(4, 0, &[(0x1000, 16, n, 1), (0x2000, 16, n, 2), (0x5000, 1, w, 0)], &[(0x1000, &discard), (0x2000, &r)]),
        seed(4, 0, &[(0x1000, 16, n, 1), (0x2000, 16, n, 2), (0x5000, 1, w, 0)], &[(0x1000, &wz), (0x2000, &r_unmap)]),
        seed(
            4,
            0,
            &[(0x1000, 16, n, 1), (0x2000, 16, n, 2), (0x5000, 1, w, 0)],
            &[(0x1000, &discard), (0x2000, &r_unmap)],
        ),
        seed(4, 0, &[(0x1000, 16, n, 1), (0x2000, 32, n, 2), (0x5000, 1, w, 0)], &[(0x1000, &wz), (0x2000, &r)]),
        seed(4, 0, &[(0x1000, 16, n, 1), (0x4000, 20, n | w, 2), (0x5000, 1, w, 0)], &[(0x1000, &getid)]),
        seed(4, 0, &[(0x1000, 16, n, 1), (0x5000, 1, w, 0)], &[(0x1000, &flush)]),
        seed(4, 0, &[(0x1000, 16, n, 1), (0xFFFF, 2, w, 0)], &[(0x1000, &flush)]),
        seed(4, 0, &[(0x1000, 16, n, 1), (0x4000, 512, n | w, 0), (0x5000, 1, w, 1)], &[(0x1000, &read)]),
        seed(4, 0, &[(0x3000, 48, ind, 0)], &[(0x1000, &read), (0x3000, &table)]),
        seed(4, 0, &[(0x1000, 16, n, 1), (0x8000_0010, 8, w, 0)], &[(0x1000, &flush)]),
        seed(4, 3, &[(0x1000, 16, n, 1), (0x5000, 1, w, 0)], &[(0x1000, &header(99, 0))]),
    ]
}
