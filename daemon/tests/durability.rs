// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! No acknowledged write is lost when `blkbackd` is killed: a vhost-user-blk driver writes checksummed records
//! with several requests in flight and a flush every few writes, the daemon gets `SIGKILL` at a random moment
//! in the middle of the load, and then the disk (a file, or a loop device read with O_DIRECT) must hold every
//! record whose write was acknowledged before a flush that was acknowledged too.
//!
//! A write counts as durable only if its completion was seen *before* a flush was submitted and that flush
//! completed OK (a flush covers the writes completed before it was issued, not those racing with it).
//! Records not proven durable may or may not be there, sector by sector, but nothing else may: every 512-byte
//! sector of the disk is zero or the sector of the record the driver wrote there.

// Test arithmetic on block numbers of a few hundred MiB.
#![allow(clippy::cast_possible_truncation)]

mod vhost_user_client;

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use virtio_driver::{
    EventFd, QueueNotifier, VhostUser, VirtioBlkConfig, VirtioBlkQueue, VirtioBlkReqBuf, VirtioTransport,
};

use test_kit::storage::read_direct;
use test_kit::LoopDevice;
use vhost_user_client::blk::blk_features;
use vhost_user_client::daemon::PROCESS_TIMEOUT;
use vhost_user_client::{Daemon, SharedMem, IO_TIMEOUT};

const BLOCK: usize = 4096;
/// Requests in flight.
const DEPTH: usize = 16;
const QUEUE_SIZE: u16 = 64;
/// A flush after this many writes.
const FLUSH_EVERY: u32 = 24;
/// Most records per run (128 MiB): the run is killed early if the load gets there.
const MAX_RECORDS: u64 = 32 << 10;
/// The sparse disk.
const DISK: u64 = 256 << 20;
/// Runs per test, each killed at a random moment.
const RUNS: usize = 3;
const MAGIC: [u8; 8] = *b"BLKDUR01";

/// FNV-1a.
fn checksum(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
}

/// Record `seq` of run `nonce`: magic, nonce, sequence number, pseudo-random payload, checksum of all that.
fn record(nonce: u64, seq: u64, out: &mut [u8]) {
    out[..8].copy_from_slice(&MAGIC);
    out[8..16].copy_from_slice(&nonce.to_le_bytes());
    out[16..24].copy_from_slice(&seq.to_le_bytes());
    let mut x = nonce ^ seq.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for chunk in out[24..BLOCK - 8].chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    let sum = checksum(&out[..BLOCK - 8]);
    out[BLOCK - 8..BLOCK].copy_from_slice(&sum.to_le_bytes());
}

/// A virtio-blk driver with one queue that submits and reaps without blocking, so that it can run a load
/// against a daemon that dies under it.
struct Driver {
    // Field order is drop order: the queue lives in memory the transport mapped.
    queue: VirtioBlkQueue<'static, usize>,
    notifier: Box<dyn QueueNotifier>,
    call: Arc<EventFd>,
    _transport: Box<VhostUser<VirtioBlkConfig, VirtioBlkReqBuf>>,
    /// One 4 KiB buffer per request slot.
    mem: SharedMem,
}

impl Driver {
    fn connect(socket: &Path) -> io::Result<Driver> {
        let path = socket.to_str().expect("UTF-8 socket path");
        let mut transport = Box::new(VhostUser::<VirtioBlkConfig, VirtioBlkReqBuf>::new(path, blk_features(false))?);
        let queue = VirtioBlkQueue::<usize>::setup_queues(&mut *transport, 1, QUEUE_SIZE)?.remove(0);
        let mem = SharedMem::new(DEPTH * BLOCK)?;
        transport.map_mem_region(mem.addr(), mem.len(), mem.fd(), 0)?;
        let notifier = transport.get_submission_notifier(0);
        let call = transport.get_completion_fd(0);
        Ok(Driver { queue, notifier, call, _transport: transport, mem })
    }

    /// Write slot `slot`'s buffer to block `block`.
    fn write(&mut self, block: u64, slot: usize) {
        let buf = self.mem.bytes(slot * BLOCK..(slot + 1) * BLOCK).as_ptr();
        // SAFETY: the buffer lies in guest RAM this driver owns and does not touch until the write completes.
        unsafe { self.queue.write_raw(block * BLOCK as u64, buf, BLOCK, slot) }.expect("queue a write");
    }

    fn flush(&mut self, slot: usize) {
        self.queue.flush(slot).expect("queue a flush");
    }

    fn kick(&mut self) {
        if self.queue.avail_notif_needed() {
            self.notifier.notify().expect("kick");
        }
    }

    /// Completions published so far: (slot, 0 or a negative errno).
    fn completions(&mut self) -> Vec<(usize, i32)> {
        self.queue.completions().map(|c| (c.context, c.ret)).collect()
    }

    /// Wait up to `timeout` for the device's notification.
    fn wait(&self, timeout: Duration) {
        let mut pfd = libc::pollfd { fd: self.call.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut pfd, 1, ms) } == 1 {
            let _ = self.call.read();
        }
    }
}

/// What a request slot holds.
#[derive(Debug)]
enum Pending {
    Write(u64),
    /// A flush and the records it makes durable.
    Flush(Vec<u64>),
}

/// What the driver knows about its records.
#[derive(Debug, Default)]
struct Log {
    /// Records submitted: `0..submitted`.
    submitted: u64,
    /// Writes acknowledged and not yet covered by a submitted flush.
    acked: Vec<u64>,
    /// Per record: acknowledged, then covered by an acknowledged flush.
    durable: Vec<bool>,
    flushes: u64,
}

impl Log {
    fn complete(&mut self, pending: Pending) {
        match pending {
            Pending::Write(seq) => self.acked.push(seq),
            Pending::Flush(covered) => {
                self.flushes += 1;
                for seq in covered {
                    self.durable[seq as usize] = true;
                }
            }
        }
    }

    fn highest_durable(&self) -> Option<u64> {
        self.durable.iter().rposition(|&d| d).map(|i| i as u64)
    }
}

/// Write records with [`DEPTH`] requests in flight until `kill_after`, then `SIGKILL` the daemon and take the
/// completions it published before it died.
fn load_and_kill(daemon: &mut Daemon, nonce: u64, kill_after: Duration) -> Log {
    let mut driver = Driver::connect(&daemon.socket).expect("connect");
    let mut log = Log { durable: vec![false; MAX_RECORDS as usize], ..Log::default() };
    let mut slots: Vec<Option<Pending>> = (0..DEPTH).map(|_| None).collect();
    let mut free: Vec<usize> = (0..DEPTH).collect();
    let mut since_flush = 0;
    let start = Instant::now();
    let mut progress = Instant::now();
    while start.elapsed() < kill_after && log.submitted < MAX_RECORDS {
        while let Some(slot) = free.pop() {
            if since_flush == FLUSH_EVERY {
                since_flush = 0;
                driver.flush(slot);
                slots[slot] = Some(Pending::Flush(std::mem::take(&mut log.acked)));
            } else if log.submitted < MAX_RECORDS {
                since_flush += 1;
                let seq = log.submitted;
                record(nonce, seq, driver.mem.bytes_mut(slot * BLOCK..(slot + 1) * BLOCK));
                driver.write(seq, slot);
                slots[slot] = Some(Pending::Write(seq));
                log.submitted += 1;
            } else {
                free.push(slot);
                break;
            }
        }
        driver.kick();
        let done = driver.completions();
        if done.is_empty() {
            assert!(progress.elapsed() < IO_TIMEOUT, "no completion within {IO_TIMEOUT:?}:\n{}", daemon.stderr());
            driver.wait(Duration::from_millis(10));
            continue;
        }
        progress = Instant::now();
        for (slot, ret) in done {
            let pending = slots[slot].take().expect("a completion for a slot in use");
            assert_eq!(ret, 0, "{pending:?} failed before the kill");
            log.complete(pending);
            free.push(slot);
        }
    }
    daemon.signal(libc::SIGKILL);
    let status = daemon.wait(PROCESS_TIMEOUT);
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(libc::SIGKILL), "killed");
    // What the daemon answered before it died is as acknowledged as anything before.
    for (slot, ret) in driver.completions() {
        let pending = slots[slot].take().expect("a completion for a slot in use");
        if ret == 0 {
            log.complete(pending);
        }
    }
    log
}

/// Check the disk's first blocks (`disk` holds the first `log.submitted` + 16 blocks) against the log.
fn verify(disk: &[u8], nonce: u64, log: &Log, run: &str) {
    let mut expected = vec![0u8; BLOCK];
    for seq in 0..disk.len() as u64 / BLOCK as u64 {
        let got = &disk[seq as usize * BLOCK..(seq as usize + 1) * BLOCK];
        if seq >= log.submitted {
            assert!(got.iter().all(|&b| b == 0), "{run}: block {seq} was never written, yet holds data");
            continue;
        }
        record(nonce, seq, &mut expected);
        if log.durable[seq as usize] {
            assert!(got == expected.as_slice(), "{run}: record {seq} was acknowledged and flushed, but is lost");
            assert_eq!(checksum(&got[..BLOCK - 8]).to_le_bytes(), got[BLOCK - 8..], "{run}: checksum of {seq}");
        } else {
            for (s, (g, e)) in got.chunks(512).zip(expected.chunks(512)).enumerate() {
                assert!(g == e || g.iter().all(|&b| b == 0), "{run}: sector {s} of record {seq} holds garbage");
            }
        }
    }
}

/// `RUNS` runs on a fresh sparse file each, served as a file or through a loop device over it; `read` gives
/// the first `len` bytes of what the daemon served, after the kill.
fn runs(through_loop: bool) {
    let mut rng = rand::thread_rng();
    for run in 0..RUNS {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("disk.img");
        std::fs::File::create(&file).and_then(|f| f.set_len(DISK)).expect("sparse disk");
        let device = if through_loop {
            match LoopDevice::attach(&file) {
                Ok(d) => Some(d),
                Err(why) => return eprintln!("skipping the loop-device durability test: {why}"),
            }
        } else {
            None
        };
        let served = device.as_ref().map_or(file.as_path(), |d| d.path.as_path());
        let mut daemon = Daemon::start(&dir.path().join("vhost.sock"), served, &[]);
        let nonce: u64 = rng.gen();
        let kill_after = Duration::from_millis(rng.gen_range(300..2000));
        let log = load_and_kill(&mut daemon, nonce, kill_after);
        let durable = log.durable.iter().filter(|&&d| d).count();
        let name = format!("run {run} on {}", served.display());
        eprintln!(
            "{name}: killed after {kill_after:?}: {} records submitted, {durable} durable (highest {:?}), {} flushes",
            log.submitted,
            log.highest_durable(),
            log.flushes
        );
        assert!(durable > 0, "{name}: the load made no record durable before the kill");
        let len = (log.submitted as usize + 16) * BLOCK;
        let disk = if through_loop {
            read_direct(served, 0, len).expect("O_DIRECT read of the loop device")
        } else {
            let mut buf = vec![0u8; len];
            std::fs::File::open(served).and_then(|f| f.read_exact_at(&mut buf, 0)).expect("read the file");
            buf
        };
        verify(&disk, nonce, &log, &name);
        // The killed daemon's file keeper removes its socket file (it sees the daemon's end of their socket pair
        // close, however the daemon died).
        let socket = dir.path().join("vhost.sock");
        let deadline = Instant::now() + Duration::from_secs(10);
        while socket.exists() {
            assert!(Instant::now() < deadline, "{name}: the killed daemon's socket file is still there after 10 s");
            std::thread::sleep(Duration::from_millis(10));
        }
        // The VMM's reconnect: a blkbackd started again on the same socket serves exactly the same data.
        let mut restarted = Daemon::start(&socket, served, &[]);
        assert_eq!(served_by(&socket, len), disk, "{name}: the restarted daemon serves what the disk holds");
        restarted.signal(libc::SIGTERM);
        assert_eq!(restarted.wait(Duration::from_secs(10)).code(), Some(0), "{name}: clean exit after the restart");
    }
}

/// The first `len` bytes of the disk as a freshly connected vhost-user client reads them from `socket`.
fn served_by(socket: &Path, len: usize) -> Vec<u8> {
    const CHUNK: usize = 1 << 20;
    let mut client = vhost_user_client::BlkClient::connect(socket, 1, 64, false, CHUNK).expect("reconnect");
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let n = CHUNK.min(len - out.len());
        let offset = u64::try_from(out.len()).expect("offset");
        assert_eq!(client.run_one(vhost_user_client::Op::Read { offset, at: 0, len: n }), 0, "read at {offset}");
        out.extend_from_slice(client.mem.bytes(0..n));
    }
    out
}

/// The check is not vacuous: a durable record that is lost or damaged, or data where nothing was written, fails
/// it; a record not proven durable may be missing or half there.
#[test]
fn the_check_catches_lost_records_and_stray_data() {
    let nonce = 7;
    let mut log = Log { submitted: 3, durable: vec![true, false, true], ..Log::default() };
    let mut disk = vec![0u8; 5 * BLOCK];
    for seq in 0..3 {
        record(nonce, seq, &mut disk[seq as usize * BLOCK..(seq as usize + 1) * BLOCK]);
    }
    verify(&disk, nonce, &log, "intact");
    disk[BLOCK + 512..2 * BLOCK].fill(0);
    verify(&disk, nonce, &log, "record 1 only partly written, never flushed");
    let fails = |disk: &[u8], log: &Log| std::panic::catch_unwind(|| verify(disk, nonce, log, "bad")).is_err();
    log.durable[1] = true;
    assert!(fails(&disk, &log), "a partly written durable record");
    log.durable[1] = false;
    let mut lost = disk.clone();
    lost[2 * BLOCK + 100] ^= 1;
    assert!(fails(&lost, &log), "a flipped bit in a durable record");
    let mut stray = disk.clone();
    stray[BLOCK + 600] = 1;
    assert!(fails(&stray, &log), "a sector of a pending record holding neither zeroes nor the record");
    let mut beyond = disk;
    beyond[4 * BLOCK] = 1;
    assert!(fails(&beyond, &log), "data in a block never written");
}

#[test]
fn acknowledged_and_flushed_writes_survive_sigkill_of_blkbackd_serving_a_file() {
    runs(false);
}

#[test]
fn acknowledged_and_flushed_writes_survive_sigkill_of_blkbackd_serving_a_loop_device() {
    runs(true);
}
