// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The diskseq pin, block-device geometry, and discard / write-zeroes on REAL loop devices.
//!
//! Needs root and `/dev/loop-control` (CI has both); otherwise each test says why and returns. Tests that use loop
//! devices hold one lock, never assume a particular free loop number, and detach every device they attach in a
//! `Drop` guard, also when they fail.

// Test arithmetic on small sizes and offsets (all far below 32 bits).
#![allow(clippy::cast_possible_truncation)]

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use device_blk::disk::{parse_diskseq_arg, DirectIo};
use device_blk::engine::UringEngine;
use device_blk::{BlockSize, Disk, DiskError, DiskKind, DiskOptions, EngineKind, RequestError, RequestKind, Sector};
use device_blk::{Completion, IoEngine, IoOp, Status};
use test_kit::loop_devices;

/// Open the device, pinned to `expected_diskseq` if given.
fn open_pinned(dev: &LoopDevice, expected_diskseq: Option<u64>) -> Result<Disk, DiskError> {
    Disk::open(&dev.path, &DiskOptions::default().with_expected_diskseq(expected_diskseq))
}

/// Attach `file` to a free loop device with extra `losetup` options.
fn attach(file: &Path, options: &[&str]) -> LoopDevice {
    LoopDevice::attach_with(file, options).expect("losetup -f")
}

/// A 4 MiB backing file holding `pattern(.., seed)`.
fn backing_file(dir: &Path, name: &str, seed: u8) -> PathBuf {
    image(dir, name, &pattern(4 << 20, u64::from(seed)))
}

#[test]
fn the_right_diskseq_opens_the_device() {
    let Some(_lock) = loop_devices() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let dev = attach(&backing_file(dir.path(), "a.img", 1), &[]);
    let seq = dev.diskseq();
    assert_eq!(parse_diskseq_arg(&format!("{seq:#x}")), Ok(seq));
    let disk = open_pinned(&dev, Some(seq)).expect("pinned to the right diskseq");
    match disk.kind() {
        DiskKind::BlockDevice { major, diskseq, .. } => assert_eq!((major, diskseq), (7, seq)),
        other => panic!("not a block device: {other:?}"),
    }
    let g = disk.geometry();
    assert_eq!(g.capacity, Sector(8192), "4 MiB in 512-byte sectors");
    assert_eq!(g.logical_block_size, BlockSize::SECTOR);
    assert!(g.physical_block_size >= g.logical_block_size);
    assert!(!g.read_only && g.discard && g.write_zeroes, "{g:?}");
    // Unpinned opens work too and report the same diskseq.
    let unpinned = open_pinned(&dev, None).expect("unpinned");
    assert!(matches!(unpinned.kind(), DiskKind::BlockDevice { diskseq, .. } if diskseq == seq));
}

#[test]
fn a_wrong_diskseq_is_refused_naming_both_numbers() {
    let Some(_lock) = loop_devices() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let dev = attach(&backing_file(dir.path(), "a.img", 1), &[]);
    let seq = dev.diskseq();
    for wrong in [seq + 1000, seq - 1] {
        let err = open_pinned(&dev, Some(wrong)).expect_err("wrong diskseq");
        match &err {
            DiskError::DiskseqMismatch { expected, actual, .. } => assert_eq!((*expected, *actual), (wrong, seq)),
            other => panic!("expected DiskseqMismatch, got {other}"),
        }
        let text = err.to_string();
        assert!(text.contains(&wrong.to_string()) && text.contains(&seq.to_string()), "{text}");
        assert!(text.contains(dev.path.to_str().expect("path")), "{text}");
    }
}

#[test]
fn a_reused_loop_minor_is_refused_with_the_old_diskseq() {
    let Some(_lock) = loop_devices() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let (first, second) = (backing_file(dir.path(), "first.img", 1), backing_file(dir.path(), "second.img", 2));
    // Another process may take the freed minor between detach and re-attach: then try again on another one.
    for attempt in 0..5 {
        let dev = attach(&first, &[]);
        let old_seq = dev.diskseq();
        drop(open_pinned(&dev, Some(old_seq)).expect("the first disk opens pinned"));
        let node = dev.path.clone();
        drop(dev); // detach
        let Ok(reused) = LoopDevice::attach_at(&node, &second) else {
            eprintln!("attempt {attempt}: {} was taken before re-attaching; trying again", node.display());
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        let new_seq = reused.diskseq();
        assert!(new_seq > old_seq, "the re-used minor has a new diskseq ({old_seq} -> {new_seq})");
        let err = open_pinned(&reused, Some(old_seq)).expect_err("the old diskseq must not open the new disk");
        assert!(
            matches!(err, DiskError::DiskseqMismatch { expected, actual, .. } if expected == old_seq && actual == new_seq),
            "{err}"
        );
        // Pinned with the new number it is the second file's data.
        let disk = std::sync::Arc::new(open_pinned(&reused, Some(new_seq)).expect("new diskseq"));
        let mut q = queue(&disk, EngineKind::Sync, 4);
        let mem = guest_memory(&[0]);
        let done = run_one(&mut q, &mem, &data_request(RequestKind::Read, 0, &[(0, 4096)]));
        assert_eq!(done.status, Status::Ok);
        assert_eq!(guest_bytes(&mem)[..4096], pattern(4096, 2)[..], "the second file is served");
        return;
    }
    panic!("could not re-attach a freed loop minor in 5 attempts");
}

#[test]
fn a_read_only_loop_device_is_read_only() {
    let Some(_lock) = loop_devices() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let dev = attach(&backing_file(dir.path(), "a.img", 3), &["-r"]);
    let disk = std::sync::Arc::new(open_pinned(&dev, Some(dev.diskseq())).expect("open"));
    assert!(disk.geometry().read_only, "BLKROGET says read-only");
    for kind in ENGINES {
        let mut q = queue(&disk, kind, 4);
        let mem = guest_memory(&[0]);
        let write = run_one(&mut q, &mem, &data_request(RequestKind::Write, 0, &[(0, 4096)]));
        assert_eq!((write.status, write.error), (Status::IoError, Some(RequestError::ReadOnly)), "{kind:?}");
        let zeroes = run_one(&mut q, &mem, &range_request(RequestKind::WriteZeroes { unmap: false }, 0, 8));
        assert_eq!(zeroes.error, Some(RequestError::ReadOnly), "{kind:?}");
        let read = run_one(&mut q, &mem, &data_request(RequestKind::Read, 8, &[(0, 4096)]));
        assert_eq!(read.status, Status::Ok, "{kind:?}");
        assert_eq!(guest_bytes(&mem)[..4096], pattern(4 << 20, 3)[4096..8192], "{kind:?}");
    }
}

#[test]
fn a_4096_byte_sector_loop_device_reports_its_block_size() {
    let Some(_lock) = loop_devices() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let dev = attach(&backing_file(dir.path(), "a.img", 4), &["--sector-size", "4096"]);
    let disk = std::sync::Arc::new(open_pinned(&dev, None).expect("open"));
    let g = *disk.geometry();
    assert_eq!(g.logical_block_size, BlockSize::PAGE);
    assert!(g.physical_block_size >= BlockSize::PAGE);
    assert_eq!(g.capacity, Sector(8192), "capacity stays in 512-byte sectors");
    assert!(g.direct_io, "block devices take O_DIRECT");
    // Buffers need the device's DMA alignment, not the logical block size.
    assert!(disk.buffer_alignment() <= 512, "buffer alignment {}", disk.buffer_alignment());
    for kind in ENGINES {
        let mut q = queue(&disk, kind, 4);
        let mem = guest_memory(&pattern(4096, 9));
        // A 4 KiB write from a buffer that is only 512-byte aligned.
        let write = run_one(&mut q, &mem, &data_request(RequestKind::Write, 16, &[(512, 4096)]));
        assert_eq!(write.status, Status::Ok, "{kind:?}: {:?}", write.error);
        let read = run_one(&mut q, &mem, &data_request(RequestKind::Read, 16, &[(65536, 4096)]));
        assert_eq!(read.status, Status::Ok, "{kind:?}");
        assert_eq!(guest_bytes(&mem)[65536..69632], guest_bytes(&mem)[512..4608], "{kind:?}");
        // Less than a logical block, or not at a logical block boundary: refused before any I/O.
        let small = run_one(&mut q, &mem, &data_request(RequestKind::Read, 16, &[(0, 512)]));
        assert!(matches!(small.error, Some(RequestError::Misaligned { align: 4096, .. })), "{kind:?}");
        let odd = run_one(&mut q, &mem, &data_request(RequestKind::Read, 1, &[(0, 4096)]));
        assert!(matches!(odd.error, Some(RequestError::Misaligned { align: 4096, .. })), "{kind:?}");
    }
}

/// Kernel release as (major, minor).
fn kernel_version() -> (u32, u32) {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release.trim().split(['.', '-']).map(|p| p.parse().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

#[test]
fn discard_and_write_zeroes_on_a_loop_device_read_back_zeros() {
    let Some(_lock) = loop_devices() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let source = pattern(4 << 20, 5);
    for kind in ENGINES {
        let dev = attach(&backing_file(dir.path(), "a.img", 5), &[]);
        let disk = std::sync::Arc::new(open_pinned(&dev, Some(dev.diskseq())).expect("open"));
        let mut q = queue(&disk, kind, 8);
        let mem = guest_memory(&[0xaa]);
        // Three 64 KiB ranges, 1 MiB apart, each cleared by a different operation.
        let ops = [
            RequestKind::Discard { secure: false },
            RequestKind::WriteZeroes { unmap: false },
            RequestKind::WriteZeroes { unmap: true },
        ];
        for (i, op) in ops.into_iter().enumerate() {
            let sector = (i as u64 + 1) * 2048;
            let done = run_one(&mut q, &mem, &range_request(op, sector, 128));
            assert_eq!(done.status, Status::Ok, "{kind:?} {op:?}: {:?}", done.error);
        }
        let secure = run_one(&mut q, &mem, &range_request(RequestKind::Discard { secure: true }, 0, 8));
        assert_eq!(secure.status, Status::Unsupported, "{kind:?}: loop devices have no secure erase");
        for i in 1..=3u64 {
            // Read 4 KiB before, the 64 KiB range, and 4 KiB after.
            let start = i * 2048 - 8;
            let done = run_one(&mut q, &mem, &data_request(RequestKind::Read, start, &[(0, 72 * 1024)]));
            assert_eq!(done.status, Status::Ok, "{kind:?}");
            let got = guest_bytes(&mem);
            let at = (start * 512) as usize;
            assert_eq!(got[..4096], source[at..at + 4096], "{kind:?} range {i}: data before is kept");
            assert!(got[4096..69632].iter().all(|&b| b == 0), "{kind:?} range {i}: zeros");
            assert_eq!(got[69632..73728], source[at + 69632..at + 73728], "{kind:?} range {i}: data after is kept");
        }
        if kind == EngineKind::IoUring {
            uring_discard_command(&disk, &source);
        }
    }
}

/// The io_uring engine discards a block device with `BLOCK_URING_CMD_DISCARD` where the kernel has it (6.12+),
/// and with the ioctl elsewhere; either way the range reads back as zeros.
fn uring_discard_command(disk: &std::sync::Arc<Disk>, source: &[u8]) {
    let mut engine = UringEngine::new(disk.clone(), 4).expect("engine");
    let has_command = engine.uses_discard_command();
    assert_eq!(has_command, kernel_version() >= (6, 12), "kernel {:?}", kernel_version());
    let (offset, len) = (7u64 << 19, 64 * 1024u64); // at 3.5 MiB, away from the ranges cleared before
                                                    // SAFETY: a discard names no memory.
    unsafe { engine.enqueue(IoOp::Discard { offset, len, secure: false }, 42) }.expect("enqueue");
    engine.submit().expect("submit");
    let mut results = Vec::new();
    for _ in 0..100 {
        engine.reap(&mut |c| results.push(c));
        if !results.is_empty() {
            break;
        }
        wait_readable(engine.completion_fd(), Duration::from_millis(100));
    }
    assert_eq!(results, [Completion { token: 42, result: Ok(0) }]);
    assert_eq!(engine.uses_discard_command(), has_command, "no fallback was needed");
    let mut buf = vec![0xffu8; 128 * 1024];
    let file = std::fs::File::open(disk.path()).expect("open device");
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut buf, offset - 32 * 1024).expect("read device");
    let at = (offset - 32 * 1024) as usize;
    assert_eq!(buf[..32768], source[at..at + 32768], "data before is kept");
    assert!(buf[32768..32768 + 65536].iter().all(|&b| b == 0), "discarded range reads zeros");
    assert_eq!(buf[98304..], source[at + 98304..at + 131072], "data after is kept");
}

#[test]
fn a_loop_device_opened_without_direct_io_is_buffered() {
    let Some(_lock) = loop_devices() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let dev = attach(&backing_file(dir.path(), "a.img", 6), &[]);
    let options = DiskOptions::default().with_direct_io(DirectIo::Off);
    let disk = Disk::open(&dev.path, &options).expect("open");
    assert!(!disk.geometry().direct_io);
    assert_eq!(disk.buffer_alignment(), 1);
}
