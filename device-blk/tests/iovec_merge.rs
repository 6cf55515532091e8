// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Segments that follow each other in host memory reach the engine as one iovec (the kernel takes direct I/O's
//! pages one iovec at a time); segments apart stay apart, and the data lands where each segment says.

use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use device_blk::{
    BlockQueue, Completion, Disk, DiskOptions, EngineError, EngineKind, IoEngine, IoOp, Request, RequestKind, Sector,
    Segment, Status,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

type Mem = GuestMemoryMmap<()>;

/// Logs the iovec lengths of every transfer it is given.
struct Recording {
    inner: Box<dyn IoEngine>,
    iovecs: Arc<Mutex<Vec<Vec<usize>>>>,
}

impl IoEngine for Recording {
    unsafe fn enqueue(&mut self, op: IoOp<'_>, token: u64) -> Result<(), EngineError> {
        if let IoOp::Read { iovecs, .. } | IoOp::Write { iovecs, .. } = &op {
            self.iovecs.lock().expect("log").push(iovecs.iter().map(|v| v.iov_len).collect());
        }
        // SAFETY: the caller's promise about `op`'s memory is passed on unchanged.
        unsafe { self.inner.enqueue(op, token) }
    }
    fn submit(&mut self) -> Result<(), EngineError> {
        self.inner.submit()
    }
    fn reap(&mut self, on_complete: &mut dyn FnMut(Completion)) {
        self.inner.reap(on_complete)
    }
    fn completion_fd(&self) -> RawFd {
        self.inner.completion_fd()
    }
    fn capacity(&self) -> usize {
        self.inner.capacity()
    }
    fn in_flight(&self) -> usize {
        self.inner.in_flight()
    }
    fn buffer_alignment(&self) -> usize {
        self.inner.buffer_alignment()
    }
    fn name(&self) -> &'static str {
        self.inner.name()
    }
}

#[test]
fn adjacent_segments_become_one_iovec_and_read_right() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("disk.img");
    let data: Vec<u8> = (0..1u32 << 16).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&path, &data).expect("write image");
    let disk = Arc::new(Disk::open(&path, &DiskOptions::default()).expect("open"));
    let log = Arc::new(Mutex::new(Vec::new()));
    let engine =
        Box::new(Recording { inner: EngineKind::Auto.build(disk.clone(), 8).expect("engine"), iovecs: log.clone() });
    let mut queue: BlockQueue<u32> = BlockQueue::new(*disk.geometry(), [0; 20], engine);
    let mem = Mem::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("guest memory");

    // Sectors 0..24 into three pages: two adjacent (0x4000, 0x5000), then one apart (0x8000).
    let mut read = Request::with_capacity();
    read.reset(RequestKind::Read, Sector(0));
    for addr in [0x4000, 0x5000, 0x8000] {
        read.segments.push(Segment { addr: GuestAddress(addr), len: 4096 });
    }
    // SAFETY: `mem` outlives the request, which is drained below.
    assert!(unsafe { queue.submit(&read, &mem, 1) }.is_ok());
    queue.submit_batch().expect("submit");
    let mut done = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while done.is_empty() {
        assert!(Instant::now() < deadline, "the read never completed");
        queue.drain(|f| done.push(f));
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(done[0].status, Status::Ok);
    assert_eq!(*log.lock().expect("log"), vec![vec![8192, 4096]], "adjacent pages merged, the third apart");
    for (i, addr) in [0x4000u64, 0x5000, 0x8000].into_iter().enumerate() {
        let mut page = vec![0u8; 4096];
        mem.read_slice(&mut page, GuestAddress(addr)).expect("read guest memory");
        assert_eq!(page, data[i * 4096..(i + 1) * 4096], "segment {i}");
    }
}
