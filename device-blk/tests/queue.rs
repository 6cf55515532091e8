// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `BlockQueue` over both real engines: backpressure, GET_ID, I/O errors, short transfers, limits.

// Test arithmetic on small sizes and offsets (all far below 32 bits).
#![allow(clippy::cast_possible_truncation)]

mod common;

use std::os::unix::fs::FileExt;
use std::time::Duration;

use common::*;
use device_blk::engine::IOV_MAX;
use device_blk::{EngineKind, RequestError, RequestKind, Status};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

#[test]
fn a_full_queue_refuses_and_returns_the_cookie() {
    let dir = tempfile::tempdir().expect("tempdir");
    for kind in ENGINES {
        let disk = open(&image(dir.path(), "disk.img", &pattern(64 * 1024, 1)), false);
        let mut q = queue::<usize>(&disk, kind, 4);
        let mem = guest_memory(&[]);
        for i in 0..4u64 {
            assert!(q.has_room(), "{kind:?}: room for request {i}");
            let read = data_request(RequestKind::Read, i * 8, &[(i * 4096, 4096)]);
            // SAFETY: `mem` outlives the queue's use of it (everything is drained below).
            assert!(unsafe { q.submit(&read, &mem, i as usize) }.is_ok());
        }
        assert!(!q.has_room(), "{kind:?}: four slots taken");
        assert_eq!(q.in_flight(), 4);
        let extra = data_request(RequestKind::Read, 0, &[(0, 512)]);
        // SAFETY: as above.
        assert_eq!(unsafe { q.submit(&extra, &mem, 99) }, Err(99), "{kind:?}: the cookie comes back");
        let flush = device_blk::Request::new(RequestKind::Flush);
        // SAFETY: as above.
        assert_eq!(unsafe { q.submit(&flush, &mem, 100) }, Err(100), "{kind:?}: even for a request without data");
        q.submit_batch().expect("kick");
        let done = collect(&mut q, 4);
        assert!(done.iter().all(|f| f.status == Status::Ok && f.bytes_to_guest == 4096), "{kind:?}: {done:?}");
        assert!(q.has_room() && q.in_flight() == 0, "{kind:?}: slots freed");
        let image = pattern(64 * 1024, 1);
        assert_eq!(guest_bytes(&mem)[..16384], image[..16384], "{kind:?}: data read");
    }
}

#[test]
fn get_id_writes_the_serial_and_truncates_to_the_buffer() {
    let dir = tempfile::tempdir().expect("tempdir");
    for kind in ENGINES {
        let disk = open(&image(dir.path(), "disk.img", &[0u8; 4096]), true);
        let mut q = queue(&disk, kind, 8);
        let mem = guest_memory(&[0xee]);
        let whole = data_request(RequestKind::GetId, 0, &[(0x100, 20)]);
        let short = data_request(RequestKind::GetId, 0, &[(0x200, 8)]);
        let split = data_request(RequestKind::GetId, 0, &[(0x300, 5), (0x400, 64)]);
        let outside = data_request(RequestKind::GetId, 0, &[(GUEST_BYTES as u64, 20)]);
        let done = run_batch(&mut q, &mem, &[whole, short, split, outside]);
        let outcome: Vec<_> = done.iter().map(|f| (f.status, f.bytes_to_guest)).collect();
        assert_eq!(outcome, [(Status::Ok, 20), (Status::Ok, 8), (Status::Ok, 20), (Status::IoError, 0)], "{kind:?}");
        assert!(matches!(done[3].error, Some(RequestError::GuestMemory { .. })), "{kind:?}");
        let at = |addr: u64, len: usize| {
            let mut buf = vec![0u8; len];
            mem.read_slice(&mut buf, GuestAddress(addr)).expect("read");
            buf
        };
        assert_eq!(at(0x100, 21), [&SERIAL[..], &[0xee]].concat(), "{kind:?}: exactly 20 bytes");
        assert_eq!(at(0x200, 9), [&SERIAL[..8], &[0xee]].concat(), "{kind:?}: truncated to the buffer");
        assert_eq!([at(0x300, 5), at(0x400, 15)].concat(), SERIAL, "{kind:?}: split over two segments");
    }
}

#[test]
fn a_full_file_system_fails_the_write_with_an_io_error() {
    for kind in ENGINES {
        let mount = match Mount::tmpfs("1M") {
            Ok(m) => m,
            Err(why) => {
                eprintln!("skipping: cannot mount a 1 MiB tmpfs: {why}");
                return;
            }
        };
        let path = mount.path().join("disk.img");
        std::fs::File::create(&path).and_then(|f| f.set_len(4 << 20)).expect("sparse 4 MiB image");
        let disk = open(&path, false);
        let mut q = queue(&disk, kind, 4);
        let mem = guest_memory(&pattern(1000, 3));
        let mut statuses = Vec::new();
        for i in 0..32u64 {
            let write = data_request(RequestKind::Write, i * 128, &[(0, 64 * 1024)]);
            let done = run_one(&mut q, &mem, &write);
            statuses.push((done.status, done.error.clone()));
            if done.status != Status::Ok {
                break;
            }
        }
        let (status, error) = statuses.last().expect("some writes").clone();
        assert_eq!(status, Status::IoError, "{kind:?}: {statuses:?}");
        assert_eq!(error, Some(RequestError::Io { errno: libc::ENOSPC }), "{kind:?}");
        assert!(statuses.len() > 4, "{kind:?}: the first writes fit: {statuses:?}");
        // The queue keeps serving: a read of what was written still works.
        let read = data_request(RequestKind::Read, 0, &[(REGION as u64, 4096)]);
        assert_eq!(run_one(&mut q, &mem, &read).status, Status::Ok, "{kind:?}");
    }
}

/// Image of 64 KiB, then cut to 41 KiB: a read of 32..48 KiB in four 4 KiB segments finds only 9 KiB, ending
/// 1 KiB into the third segment.
const CUT: u64 = 41 * 1024;

fn four_segment_read() -> device_blk::Request {
    data_request(RequestKind::Read, 64, &[(0, 4096), (8192, 4096), (16384, 4096), (24576, 4096)])
}

#[test]
fn a_read_past_the_end_of_a_shrunk_image_is_a_short_transfer() {
    let dir = tempfile::tempdir().expect("tempdir");
    for kind in ENGINES {
        let path = image(dir.path(), "disk.img", &pattern(64 * 1024, 9));
        let disk = open(&path, false);
        std::fs::OpenOptions::new().write(true).open(&path).and_then(|f| f.set_len(CUT)).expect("shrink");
        let mut q = queue(&disk, kind, 4);
        let mem = guest_memory(&[0]);
        let done = run_one(&mut q, &mem, &four_segment_read());
        assert_eq!(done.status, Status::IoError, "{kind:?}");
        assert_eq!(done.error, Some(RequestError::ShortTransfer { done: 9 * 1024, wanted: 16 * 1024 }), "{kind:?}");
        let guest = guest_bytes(&mem);
        let source = pattern(64 * 1024, 9);
        assert_eq!(guest[..4096], source[32768..36864], "{kind:?}");
        assert_eq!(guest[8192..12288], source[36864..40960], "{kind:?}");
        assert_eq!(guest[16384..17408], source[40960..41984], "{kind:?}: the partial segment");
    }
}

#[test]
fn the_uring_engine_continues_a_short_read_for_the_remainder() {
    let dir = tempfile::tempdir().expect("tempdir");
    let source = pattern(64 * 1024, 5);
    let path = image(dir.path(), "disk.img", &source);
    let disk = open(&path, false);
    let file = std::fs::OpenOptions::new().write(true).open(&path).expect("open image");
    file.set_len(CUT).expect("shrink");
    let mut q = queue::<usize>(&disk, EngineKind::IoUring, 4);
    let mem = guest_memory(&[0]);
    // SAFETY: `mem` outlives the request (collected below).
    assert!(unsafe { q.submit(&four_segment_read(), &mem, 7) }.is_ok());
    q.submit_batch().expect("kick");
    // The first READV completes short (9 KiB); before the engine sees it, the image grows back.
    assert!(wait_readable(q.completion_fd(), Duration::from_secs(5)), "first completion");
    file.write_all_at(&source[CUT as usize..], CUT).expect("grow back");
    let done = collect(&mut q, 1);
    assert_eq!((done[0].status, done[0].bytes_to_guest, done[0].cookie), (Status::Ok, 16384, 7), "{:?}", done[0]);
    let guest = guest_bytes(&mem);
    for (i, seg) in [0usize, 8192, 16384, 24576].into_iter().enumerate() {
        let disk_at = 32768 + i * 4096;
        assert_eq!(guest[seg..seg + 4096], source[disk_at..disk_at + 4096], "segment {i}");
    }
}

#[test]
fn a_queue_built_on_one_thread_serves_on_another() {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = open(&image(dir.path(), "disk.img", &[0u8; 65536]), false);
    for kind in ENGINES {
        let mut q = queue::<usize>(&disk, kind, 8);
        let worker = std::thread::spawn(move || {
            let mem = guest_memory(&pattern(4096, 2));
            let write = data_request(RequestKind::Write, 0, &[(0, 4096)]);
            let read = data_request(RequestKind::Read, 0, &[(8192, 4096)]);
            let w = run_one(&mut q, &mem, &write).status;
            let r = run_one(&mut q, &mem, &read).status;
            (w, r, guest_bytes(&mem)[8192..12288] == pattern(4096, 2)[..])
        });
        assert_eq!(worker.join().expect("worker"), (Status::Ok, Status::Ok, true), "{kind:?}");
    }
}

#[test]
fn more_host_buffers_than_iov_max_are_refused_alike() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("disk.img");
    std::fs::File::create(&path).and_then(|f| f.set_len(8 << 20)).expect("sparse image");
    let disk = open(&path, false);
    // 1300 separate one-page regions: a 20 KiB segment starting 512 bytes into a page touches 6 of them.
    let ranges: Vec<_> = (0..1300u64).map(|i| (GuestAddress(i * 4096), 4096)).collect();
    let mem = GuestMemoryMmap::from_ranges(&ranges).expect("guest memory");
    let segments: Vec<(u64, u32)> = (0..200u64).map(|i| (i * 24576 + 512, 20480)).collect();
    for kind in ENGINES {
        let mut q = queue(&disk, kind, 4);
        let done = run_one(&mut q, &mem, &data_request(RequestKind::Write, 0, &segments));
        assert_eq!(done.status, Status::IoError, "{kind:?}");
        assert_eq!(done.error, Some(RequestError::TooManySegments { count: IOV_MAX + 1, max: IOV_MAX }), "{kind:?}");
        // 170 such segments make 1020 iovecs: fine.
        let done = run_one(&mut q, &mem, &data_request(RequestKind::Write, 0, &segments[..170]));
        assert_eq!(done.status, Status::Ok, "{kind:?}: {:?}", done.error);
    }
}
