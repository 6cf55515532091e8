// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The io_uring engine and the synchronous engine give the same results.
//!
//! Random sequences of reads, writes, flushes, discards, write-zeroes and GET_IDs — valid and invalid ones — run
//! through a real `BlockQueue` over each engine, on two image files with the same initial content and two guest
//! memories with the same initial content. Requests that do not conflict are submitted together as one batch (so
//! io_uring really runs them concurrently). Every status, error and byte count must match, and so must the final
//! images and guest memories; both must also match a plain in-memory model of what the successful requests do.

// Test arithmetic on small sizes and offsets (all far below 32 bits).
#![allow(clippy::cast_possible_truncation)]

mod common;

use common::*;
use device_blk::{EngineKind, Finished, Geometry, RequestKind, Status, SECTOR_SIZE};
use proptest::prelude::*;

/// Image size: 64 KiB, 128 sectors.
const DISK_SECTORS: u64 = 128;
const DISK_BYTES: usize = (DISK_SECTORS * SECTOR_SIZE) as usize;
const DEPTH: u32 = 16;

/// One request of a test sequence.
#[derive(Clone, Debug)]
enum Op {
    Read { sector: u64, segments: Vec<(u64, u32)> },
    Write { sector: u64, segments: Vec<(u64, u32)> },
    Flush,
    Discard { sector: u64, sectors: u64, secure: bool },
    WriteZeroes { sector: u64, sectors: u64, unmap: bool },
    GetId { addr: u64, len: u32 },
}

impl Op {
    fn request(&self) -> device_blk::Request {
        match self {
            Op::Read { sector, segments } => data_request(RequestKind::Read, *sector, segments),
            Op::Write { sector, segments } => data_request(RequestKind::Write, *sector, segments),
            Op::Flush => device_blk::Request::new(RequestKind::Flush),
            Op::Discard { sector, sectors, secure } => {
                range_request(RequestKind::Discard { secure: *secure }, *sector, *sectors)
            }
            Op::WriteZeroes { sector, sectors, unmap } => {
                range_request(RequestKind::WriteZeroes { unmap: *unmap }, *sector, *sectors)
            }
            Op::GetId { addr, len } => data_request(RequestKind::GetId, 0, &[(*addr, *len)]),
        }
    }

    /// Byte range on the disk (saturating; invalid requests get their nominal range).
    fn disk_range(&self) -> Option<(u64, u64)> {
        let span = |sector: u64, bytes: u64| {
            let start = sector.saturating_mul(SECTOR_SIZE);
            (start, start.saturating_add(bytes))
        };
        match self {
            Op::Read { sector, segments } | Op::Write { sector, segments } => {
                Some(span(*sector, segments.iter().map(|s| u64::from(s.1)).sum()))
            }
            Op::Discard { sector, sectors, .. } | Op::WriteZeroes { sector, sectors, .. } => {
                Some(span(*sector, sectors.saturating_mul(SECTOR_SIZE)))
            }
            Op::Flush | Op::GetId { .. } => None,
        }
    }

    fn memory_ranges(&self) -> Vec<(u64, u64)> {
        match self {
            Op::Read { segments, .. } | Op::Write { segments, .. } => {
                segments.iter().map(|&(a, l)| (a, a.saturating_add(u64::from(l)))).collect()
            }
            Op::GetId { addr, len } => vec![(*addr, addr.saturating_add(u64::from(*len)))],
            _ => Vec::new(),
        }
    }

    fn modifies_disk(&self) -> bool {
        matches!(self, Op::Write { .. } | Op::Discard { .. } | Op::WriteZeroes { .. })
    }

    fn writes_memory(&self) -> bool {
        matches!(self, Op::Read { .. } | Op::GetId { .. })
    }

    /// Whether running `self` and `other` concurrently could give a different result than in order.
    fn conflicts(&self, other: &Op) -> bool {
        let overlap = |a: (u64, u64), b: (u64, u64)| a.0 < b.1 && b.0 < a.1;
        let disk = match (self.disk_range(), other.disk_range()) {
            (Some(a), Some(b)) => overlap(a, b) && (self.modifies_disk() || other.modifies_disk()),
            _ => false,
        };
        let memory = (self.writes_memory() || other.writes_memory())
            && self.memory_ranges().iter().any(|a| other.memory_ranges().iter().any(|b| overlap(*a, *b)));
        disk || memory
    }
}

/// Group `ops` into batches of mutually non-conflicting requests, in order.
fn batches(ops: &[Op]) -> Vec<&[Op]> {
    let mut out = Vec::new();
    let mut start = 0;
    for i in 0..ops.len() {
        let full = i - start >= DEPTH as usize;
        if full || ops[start..i].iter().any(|o| o.conflicts(&ops[i])) {
            out.push(&ops[start..i]);
            start = i;
        }
    }
    if start < ops.len() {
        out.push(&ops[start..]);
    }
    out
}

fn sector() -> impl Strategy<Value = u64> {
    prop_oneof![
        8 => 0..DISK_SECTORS,
        1 => (DISK_SECTORS - 4)..(DISK_SECTORS + 4), // at and past the end
        1 => (u64::MAX - 8)..=u64::MAX,              // sector + length overflows
        1 => (u64::MAX / SECTOR_SIZE - 4)..=(u64::MAX / SECTOR_SIZE),
    ]
}

fn segment_len() -> impl Strategy<Value = u32> {
    prop_oneof![
        30 => (1u32..=4).prop_map(|n| n * 512),
        1 => Just(0u32),      // zero length
        1 => Just(100u32),    // not a multiple of 512
        1 => Just(4096 + 256),
    ]
}

/// Segments at increasing guest addresses (no two overlap), the first one anywhere, sometimes misaligned or
/// straddling the two guest memory regions, sometimes running off the end of guest memory.
fn segments() -> impl Strategy<Value = Vec<(u64, u32)>> {
    let start = prop_oneof![
        6 => (0..GUEST_BYTES as u64 / 512).prop_map(|a| a * 512),
        2 => (1u64..=4).prop_map(|k| REGION as u64 - k * 512), // straddles the region boundary
        1 => (0..GUEST_BYTES as u64 / 512).prop_map(|a| a * 512 + 8), // misaligned for O_DIRECT
    ];
    let shape = prop_oneof![
        6 => prop::collection::vec((segment_len(), 0u64..=2), 1..=12),
        1 => prop::collection::vec((Just(512u32), Just(0u64)), 64..=300), // many segments, up to too many
        1 => Just(Vec::new()),                                         // no segment at all
    ];
    (start, shape).prop_map(|(start, shape)| {
        let mut addr = start;
        shape
            .into_iter()
            .map(|(len, gap)| {
                let seg = (addr, len);
                addr = addr.saturating_add(u64::from(len)).saturating_add(gap * 512);
                seg
            })
            .collect()
    })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (sector(), segments()).prop_map(|(sector, segments)| Op::Read { sector, segments }),
        5 => (sector(), segments()).prop_map(|(sector, segments)| Op::Write { sector, segments }),
        1 => Just(Op::Flush),
        2 => (sector(), 0u64..=24, prop::bool::weighted(0.1))
            .prop_map(|(sector, sectors, secure)| Op::Discard { sector, sectors, secure }),
        2 => (sector(), 0u64..=24, any::<bool>())
            .prop_map(|(sector, sectors, unmap)| Op::WriteZeroes { sector, sectors, unmap }),
        1 => ((0..GUEST_BYTES as u64 - 64), prop_oneof![Just(20u32), Just(8u32), Just(64u32)])
            .prop_map(|(addr, len)| Op::GetId { addr, len }),
    ]
}

/// What one engine did: per-request outcomes, then the image and guest memory at the end.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    results: Vec<(Status, Option<device_blk::RequestError>, u32)>,
    image: Vec<u8>,
    memory: Vec<u8>,
    geometry: Geometry,
}

fn run_engine(kind: EngineKind, dir: &std::path::Path, seed: u8, read_only: bool, ops: &[Op]) -> Outcome {
    let path = image(dir, &format!("{kind:?}.img"), &pattern(DISK_BYTES, u64::from(seed)));
    let disk = open(&path, read_only);
    let mut queue = queue(&disk, kind, DEPTH);
    let mem = guest_memory(&pattern(977, u64::from(seed.wrapping_add(1))));
    let mut results = Vec::with_capacity(ops.len());
    for batch in batches(ops) {
        let requests: Vec<_> = batch.iter().map(Op::request).collect();
        let done = run_batch(&mut queue, &mem, &requests);
        results.extend(done.into_iter().map(|f: Finished<usize>| (f.status, f.error, f.bytes_to_guest)));
    }
    drop(queue);
    let geometry = *disk.geometry();
    Outcome { results, image: std::fs::read(&path).expect("read image"), memory: guest_bytes(&mem), geometry }
}

/// Whether `op` must succeed on a disk of `geometry`: it passes validation, its buffers lie in guest memory, and
/// they are 512-byte aligned where the disk uses O_DIRECT.
fn must_succeed(op: &Op, geometry: &Geometry) -> bool {
    let in_memory = op.memory_ranges().iter().all(|&(_, end)| end <= GUEST_BYTES as u64);
    let aligned = match op {
        Op::Read { segments, .. } | Op::Write { segments, .. } => {
            !geometry.direct_io || segments.iter().all(|&(addr, _)| addr % 512 == 0)
        }
        _ => true,
    };
    op.request().validate(geometry).is_ok() && in_memory && aligned
}

/// Apply the requests that succeeded to plain byte vectors.
fn model(seed: u8, ops: &[Op], results: &[(Status, Option<device_blk::RequestError>, u32)]) -> (Vec<u8>, Vec<u8>) {
    let mut disk = pattern(DISK_BYTES, u64::from(seed));
    let mut mem = guest_bytes(&guest_memory(&pattern(977, u64::from(seed.wrapping_add(1)))));
    for (op, (status, _, _)) in ops.iter().zip(results) {
        if *status != Status::Ok {
            continue;
        }
        let at = |x: u64| usize::try_from(x).expect("small");
        match op {
            Op::Read { sector, segments } | Op::Write { sector, segments } => {
                let mut pos = at(sector * SECTOR_SIZE);
                for &(addr, len) in segments {
                    let (a, l) = (at(addr), len as usize);
                    if matches!(op, Op::Read { .. }) {
                        mem[a..a + l].copy_from_slice(&disk[pos..pos + l]);
                    } else {
                        disk[pos..pos + l].copy_from_slice(&mem[a..a + l]);
                    }
                    pos += l;
                }
            }
            Op::Discard { sector, sectors, .. } | Op::WriteZeroes { sector, sectors, .. } => {
                let start = at(sector * SECTOR_SIZE);
                disk[start..start + at(sectors * SECTOR_SIZE)].fill(0);
            }
            Op::GetId { addr, len } => {
                let n = (*len as usize).min(SERIAL.len());
                mem[at(*addr)..at(*addr) + n].copy_from_slice(&SERIAL[..n]);
            }
            Op::Flush => {}
        }
    }
    (disk, mem)
}

fn check(dir: &std::path::Path, seed: u8, read_only: bool, ops: &[Op]) -> Result<(), TestCaseError> {
    let sync = run_engine(EngineKind::Sync, dir, seed, read_only, ops);
    let uring = run_engine(EngineKind::IoUring, dir, seed, read_only, ops);
    for (i, (s, u)) in sync.results.iter().zip(&uring.results).enumerate() {
        prop_assert_eq!(s, u, "request {} ({:?}) differs between the engines", i, ops[i]);
    }
    prop_assert!(sync.image == uring.image, "final images differ");
    prop_assert!(sync.memory == uring.memory, "final guest memories differ");
    for (i, op) in ops.iter().enumerate() {
        if must_succeed(op, &sync.geometry) {
            prop_assert_eq!(
                &sync.results[i].0,
                &Status::Ok,
                "valid request {} ({:?}) failed: {:?}",
                i,
                op,
                sync.results[i]
            );
        }
    }
    let (disk, mem) = model(seed, ops, &sync.results);
    prop_assert!(sync.image == disk, "the image differs from the model");
    prop_assert!(sync.memory == mem, "guest memory differs from the model");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, failure_persistence: None, ..ProptestConfig::default() })]

    /// On the default temporary file system (ext4 here: O_DIRECT with 512-byte alignment).
    #[test]
    fn engines_agree_on_the_temp_file_system(
        seed in any::<u8>(),
        read_only in prop::bool::weighted(0.15),
        ops in prop::collection::vec(op(), 1..40),
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        check(dir.path(), seed, read_only, &ops)?;
    }

    /// On tmpfs, which refuses FALLOC_FL_ZERO_RANGE: write-zeroes takes the punch-and-allocate fallback.
    #[test]
    fn engines_agree_on_tmpfs(
        seed in any::<u8>(),
        ops in prop::collection::vec(op(), 1..40),
    ) {
        let Ok(dir) = tempfile::tempdir_in("/dev/shm") else {
            eprintln!("skipping: no /dev/shm tmpfs");
            return Ok(());
        };
        check(dir.path(), seed, false, &ops)?;
    }
}

#[test]
fn many_segments_spanning_both_regions_read_back_what_was_written() {
    let dir = tempfile::tempdir().expect("tempdir");
    for kind in ENGINES {
        let path = image(dir.path(), "disk.img", &vec![0u8; DISK_BYTES]);
        let disk = open(&path, false);
        let mut q = queue(&disk, kind, DEPTH);
        let mem = guest_memory(&pattern(4093, 7));
        // 96 segments of 512 bytes from 24 KiB below the region boundary: the middle ones cross into region 2.
        let base = REGION as u64 - 24 * 1024;
        let segments: Vec<(u64, u32)> = (0..96).map(|i| (base + i * 512, 512)).collect();
        let write = data_request(RequestKind::Write, 8, &segments);
        assert_eq!(run_one(&mut q, &mem, &write).status, Status::Ok, "{kind:?}");
        let image = std::fs::read(&path).expect("read image");
        let guest = guest_bytes(&mem);
        let (b, n) = (base as usize, 96 * 512);
        assert_eq!(image[4096..4096 + n], guest[b..b + n], "{kind:?}: image holds the guest data");
        let read_to = data_request(RequestKind::Read, 8, &[(0, 48 * 1024)]);
        let done = run_one(&mut q, &mem, &read_to);
        assert_eq!((done.status, done.bytes_to_guest), (Status::Ok, 48 * 1024), "{kind:?}");
        assert_eq!(guest_bytes(&mem)[..48 * 1024], guest[b..b + n], "{kind:?}: read back");
    }
}
