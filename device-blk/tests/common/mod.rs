// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Shared pieces of device-blk's integration tests: guest memory, disks in files, and a loop that runs requests
//! through a real [`BlockQueue`] and waits on its completion eventfd like a transport's event loop.

#![allow(dead_code)] // each test binary uses a different part

use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use device_blk::disk::DirectIo;
use device_blk::{
    BlockQueue, Disk, DiskOptions, EngineKind, Finished, Request, RequestKind, Sector, Segment, ID_BYTES,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

// The workspace's test kit: byte patterns, commands, mounts, loop devices.
#[allow(unused_imports)]
pub use test_kit::{command, is_root, pattern, LoopDevice, Mount};

/// Size of each of the two guest memory regions.
pub const REGION: usize = 64 * 1024;
/// Guest memory: two adjacent regions (separate host mappings), so a segment can span both.
pub const GUEST_BYTES: usize = 2 * REGION;

/// The serial every test queue answers GET_ID with.
pub const SERIAL: [u8; ID_BYTES] = *b"device-blk-serial-01";

/// Guest memory of two adjacent 64 KiB regions filled with `fill` (repeated).
pub fn guest_memory(fill: &[u8]) -> GuestMemoryMmap {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), REGION), (GuestAddress(REGION as u64), REGION)])
        .expect("guest memory");
    if !fill.is_empty() {
        let bytes: Vec<u8> = fill.iter().copied().cycle().take(GUEST_BYTES).collect();
        mem.write_slice(&bytes, GuestAddress(0)).expect("fill guest memory");
    }
    mem
}

/// All of guest memory.
pub fn guest_bytes(mem: &GuestMemoryMmap) -> Vec<u8> {
    let mut out = vec![0u8; GUEST_BYTES];
    mem.read_slice(&mut out, GuestAddress(0)).expect("read guest memory");
    out
}

/// Write `content` to a new file `name` in `dir`.
pub fn image(dir: &Path, name: &str, content: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, content).expect("write image");
    path
}

/// Open `path` read-write (or read-only) with automatic O_DIRECT.
pub fn open(path: &Path, read_only: bool) -> Arc<Disk> {
    let options = DiskOptions::default().with_read_only(read_only).with_direct_io(DirectIo::Auto);
    Arc::new(Disk::open(path, &options).expect("open disk"))
}

/// A queue over `disk` with an engine of `kind` and `depth` slots.
pub fn queue<C>(disk: &Arc<Disk>, kind: EngineKind, depth: u32) -> BlockQueue<C> {
    let engine = kind.build(disk.clone(), depth).expect("engine");
    BlockQueue::new(*disk.geometry(), SERIAL, engine)
}

/// The two engines the tests compare.
pub const ENGINES: [EngineKind; 2] = [EngineKind::Sync, EngineKind::IoUring];

/// A read or write request of `segments` (guest address, length) at `sector`.
pub fn data_request(kind: RequestKind, sector: u64, segments: &[(u64, u32)]) -> Request {
    let mut r = Request::with_capacity();
    r.reset(kind, Sector(sector));
    r.segments.extend(segments.iter().map(|&(addr, len)| Segment { addr: GuestAddress(addr), len }));
    r
}

/// A discard or write-zeroes request.
pub fn range_request(kind: RequestKind, sector: u64, sectors: u64) -> Request {
    let mut r = Request::new(kind);
    r.sector = Sector(sector);
    r.discard_sectors = sectors;
    r
}

/// Wait until `fd` is readable (or `timeout` passes).
pub fn wait_readable(fd: RawFd, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: one valid pollfd.
    let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
    rc > 0
}

/// Drain `queue` until `count` requests have finished, waiting on its completion fd; panics after 10 s.
pub fn collect<C>(queue: &mut BlockQueue<C>, count: usize) -> Vec<Finished<C>> {
    let mut out = Vec::with_capacity(count);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        queue.drain(|f| out.push(f));
        if out.len() >= count {
            return out;
        }
        assert!(Instant::now() < deadline, "only {} of {count} requests finished", out.len());
        wait_readable(queue.completion_fd(), Duration::from_millis(100));
    }
}

/// Submit `requests` as one batch (cookie = index), kick once, and return the results in cookie order.
pub fn run_batch(queue: &mut BlockQueue<usize>, mem: &GuestMemoryMmap, requests: &[Request]) -> Vec<Finished<usize>> {
    for (i, r) in requests.iter().enumerate() {
        // SAFETY: `mem` outlives the batch: everything is drained before this function returns.
        let submitted = unsafe { queue.submit(r, mem, i) };
        assert!(submitted.is_ok(), "queue full at request {i}");
    }
    queue.submit_batch().expect("kick");
    let mut done = collect(queue, requests.len());
    done.sort_by_key(|f| f.cookie);
    done
}

/// Run one request alone.
pub fn run_one(queue: &mut BlockQueue<usize>, mem: &GuestMemoryMmap, request: &Request) -> Finished<usize> {
    run_batch(queue, mem, std::slice::from_ref(request)).pop().expect("one result")
}
