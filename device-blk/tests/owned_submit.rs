// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The safe submit: a cookie that owns the guest memory keeps it mapped until the request is drained, even when
//! the caller let go of every other handle right after submitting.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use device_blk::{BlockQueue, Disk, DiskOptions, EngineKind, Request, RequestKind, Sector, Segment, Status};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

type Mem = GuestMemoryMmap<()>;

#[test]
fn an_owning_cookie_keeps_the_memory_until_the_read_is_drained() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("disk.img");
    let data: Vec<u8> = (0..1u32 << 16).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&path, &data).expect("write image");
    let disk = Arc::new(Disk::open(&path, &DiskOptions::default()).expect("open"));
    let engine = EngineKind::Auto.build(disk.clone(), 8).expect("engine");
    let mut queue: BlockQueue<Arc<Mem>> = BlockQueue::new(*disk.geometry(), [0; 20], engine);

    let mem = Arc::new(Mem::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("guest memory"));
    let weak: Weak<Mem> = Arc::downgrade(&mem);
    let mut request = Request::with_capacity();
    request.reset(RequestKind::Read, Sector(8));
    request.segments.push(Segment { addr: GuestAddress(0x4000), len: 8192 });
    // Our only handle goes into the cookie: nothing but the queue keeps the memory now.
    assert!(queue.submit_owned(&request, mem).is_ok(), "a free slot");
    assert!(weak.upgrade().is_some(), "the queue holds the memory while the read is in flight");
    queue.submit_batch().expect("kick");

    let mut done = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while done.is_empty() {
        assert!(Instant::now() < deadline, "the read never completed");
        queue.drain(|finished| done.push(finished));
    }
    let finished = done.pop().expect("one");
    assert_eq!(finished.status, Status::Ok);
    let mut read = vec![0u8; 8192];
    finished.cookie.read_slice(&mut read, GuestAddress(0x4000)).expect("read guest memory");
    assert_eq!(read, data[4096..4096 + 8192], "the disk's sectors 8..24 landed in guest memory");
    drop(finished);
    assert!(weak.upgrade().is_none(), "once drained, the memory goes with the cookie");
}
