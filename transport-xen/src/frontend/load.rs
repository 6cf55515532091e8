// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Workloads for the blkfront emulator: fill and verify a whole disk, and a random read/write load at a fixed
//! queue depth that verifies every read against what was last written and measures IOPS and latency.
//!
//! Data is self-describing: every 512-byte sector written holds a pattern derived from its sector number and a
//! generation, so any misplaced, stale or torn data is detected without keeping a copy of the disk.

use std::time::{Duration, Instant};

use device_blk::stats::LatencyHistogram;

use crate::blkif::RSP_OKAY;

use super::blkfront::Blkfront;
use super::handshake::FrontError;
use super::queue::{Completion, IoRequest};

const SECTOR: usize = 512;

/// A small deterministic PRNG (xorshift64*), so workloads need no dependency and are reproducible.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed` (0 is replaced by a constant).
    pub fn new(seed: u64) -> Rng {
        Rng(if seed == 0 { 0x9e37_79b9_7f4a_7c15 } else { seed })
    }

    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A value in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next_u64() % (n.max(1) as u64)).unwrap_or(0)
    }
}

/// Fill `out` with the pattern of the sectors starting at `sector`, generation `generation`.
pub fn fill_pattern(out: &mut [u8], sector: u64, generation: u32) {
    for (i, chunk) in out.chunks_mut(SECTOR).enumerate() {
        let s = sector + i as u64;
        let mut rng = Rng::new(s.wrapping_mul(0x1000_0000_01b3) ^ u64::from(generation).wrapping_mul(0x9e37_79b9));
        for (j, word) in chunk.chunks_mut(8).enumerate() {
            let v = match j {
                0 => s,
                1 => u64::from(generation),
                _ => rng.next_u64(),
            };
            word.copy_from_slice(&v.to_le_bytes()[..word.len()]);
        }
    }
}

/// The first sector of `data` (read at `sector`) that does not hold generation `generation`'s pattern.
pub fn check_pattern(data: &[u8], sector: u64, generation: u32) -> Option<u64> {
    let mut expect = vec![0u8; SECTOR];
    data.chunks(SECTOR).enumerate().find_map(|(i, chunk)| {
        let s = sector + i as u64;
        fill_pattern(&mut expect, s, generation);
        (chunk != &expect[..chunk.len()]).then_some(s)
    })
}

fn fail(what: String) -> FrontError {
    FrontError::Ring(what)
}

fn check_status(c: &Completion, what: &str) -> Result<(), FrontError> {
    if c.status == RSP_OKAY {
        Ok(())
    } else {
        Err(fail(format!("{what} (tag {}) failed with status {}", c.tag, c.status)))
    }
}

/// Write the whole disk (`sectors` sectors) with generation `generation` in `chunk`-byte requests kept `depth`
/// deep, then read it all back and verify. Returns the bytes verified.
pub fn fill_and_verify(
    front: &mut Blkfront<'_>,
    sectors: u64,
    chunk: usize,
    depth: usize,
    generation: u32,
) -> Result<u64, FrontError> {
    let chunk = chunk.min(front.max_request_bytes()) / SECTOR * SECTOR;
    let chunk_sectors = (chunk / SECTOR) as u64;
    let mut buf = vec![0u8; chunk];
    for pass in [true, false] {
        let mut next = 0u64;
        let mut done = Vec::new();
        loop {
            while next < sectors && front.in_flight(0) < depth {
                let n = chunk_sectors.min(sectors - next);
                let len = usize::try_from(n).unwrap_or(0) * SECTOR;
                let request = if pass {
                    fill_pattern(&mut buf[..len], next, generation);
                    IoRequest::Write { sector: next, data: &buf[..len] }
                } else {
                    IoRequest::Read { sector: next, len }
                };
                if !front.submit(0, &request, next)? {
                    break;
                }
                next += n;
            }
            front.kick(0)?;
            if front.in_flight(0) == 0 {
                break;
            }
            done.clear();
            front.poll(0, &mut done)?;
            for c in &done {
                check_status(c, if pass { "write" } else { "read" })?;
                if let Some(bad) = (!pass).then(|| check_pattern(&c.data, c.tag, generation)).flatten() {
                    return Err(fail(format!("verify: sector {bad} does not hold what was written")));
                }
            }
        }
    }
    Ok(sectors * SECTOR as u64)
}

/// Read every block at depth `depth` and check it holds generation `gens[b]`. Returns the bytes verified.
pub fn verify_blocks(
    front: &mut Blkfront<'_>,
    gens: &[u32],
    block_bytes: usize,
    depth: usize,
) -> Result<u64, FrontError> {
    let block_sectors = (block_bytes / SECTOR).max(1) as u64;
    let mut next = 0usize;
    let mut done = Vec::new();
    loop {
        while next < gens.len() && front.in_flight(0) < depth {
            let request = IoRequest::Read { sector: next as u64 * block_sectors, len: block_bytes };
            if !front.submit(0, &request, next as u64)? {
                break;
            }
            next += 1;
        }
        front.kick(0)?;
        if front.in_flight(0) == 0 {
            return Ok(gens.len() as u64 * block_bytes as u64);
        }
        done.clear();
        front.poll(0, &mut done)?;
        for c in &done {
            check_status(c, "read")?;
            let block =
                usize::try_from(c.tag).ok().filter(|&b| b < gens.len()).ok_or_else(|| fail("bad tag".into()))?;
            if let Some(bad) = check_pattern(&c.data, block as u64 * block_sectors, gens[block]) {
                return Err(fail(format!("verify: sector {bad} does not hold the last write")));
            }
        }
    }
}

/// Results of a random load.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadStats {
    /// Queue depth.
    pub depth: usize,
    /// Operations completed.
    pub ops: u64,
    /// Reads (all verified).
    pub reads: u64,
    /// Writes.
    pub writes: u64,
    /// Wall time.
    pub elapsed: Duration,
    /// Median latency.
    pub p50: Duration,
    /// 99th percentile latency.
    pub p99: Duration,
}

impl LoadStats {
    /// Operations per second.
    pub fn iops(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

#[derive(Clone, Copy, Debug)]
struct InFlight {
    start: Instant,
    block: usize,
    write: bool,
}

/// Random reads and writes of `block_bytes` at queue depth `depth` for `duration`, over a disk whose block `b`
/// holds generation `gens[b]` (as [`fill_and_verify`] leaves them: all the same). Every read is verified; at most
/// one request is in flight per block, so the expected content is always known; `gens` is kept up to date.
pub fn random_load(
    front: &mut Blkfront<'_>,
    gens: &mut [u32],
    block_bytes: usize,
    depth: usize,
    duration: Duration,
    seed: u64,
) -> Result<LoadStats, FrontError> {
    random_load_mix(front, gens, block_bytes, depth, duration, seed, 50)
}

/// [`random_load`] with `read_percent` % reads (0: writes only, 100: reads only).
pub fn random_load_mix(
    front: &mut Blkfront<'_>,
    gens: &mut [u32],
    block_bytes: usize,
    depth: usize,
    duration: Duration,
    seed: u64,
    read_percent: usize,
) -> Result<LoadStats, FrontError> {
    let block_sectors = (block_bytes / SECTOR).max(1) as u64;
    let blocks = gens.len();
    if blocks < depth * 2 {
        return Err(fail(format!("disk of {blocks} blocks too small for depth {depth}")));
    }
    let mut busy = vec![false; gens.len()];
    let mut slots: Vec<Option<InFlight>> = vec![None; depth];
    let latencies = LatencyHistogram::default();
    let mut rng = Rng::new(seed);
    let mut stats = LoadStats { depth, ..LoadStats::default() };
    let mut buf = vec![0u8; block_bytes];
    let mut done = Vec::new();
    let queues = front.queue_count();
    let start = Instant::now();
    loop {
        let running = start.elapsed() < duration;
        for (slot, entry) in slots.iter_mut().enumerate().filter(|(_, e)| e.is_none()) {
            if !running {
                break;
            }
            let block = loop {
                let b = rng.below(blocks);
                if !busy[b] {
                    break b;
                }
            };
            let write = rng.below(100) >= read_percent;
            let sector = block as u64 * block_sectors;
            let request = if write {
                let g = gens[block].wrapping_add(1);
                gens[block] = g;
                fill_pattern(&mut buf, sector, g);
                IoRequest::Write { sector, data: &buf }
            } else {
                IoRequest::Read { sector, len: block_bytes }
            };
            if !front.submit(slot % queues, &request, slot as u64)? {
                return Err(fail("ring full below the ring size".into()));
            }
            busy[block] = true;
            *entry = Some(InFlight { start: Instant::now(), block, write });
        }
        for q in 0..queues {
            front.kick(q)?;
        }
        if slots.iter().all(Option::is_none) {
            break;
        }
        for q in 0..queues {
            if front.in_flight(q) == 0 {
                continue;
            }
            done.clear();
            front.poll(q, &mut done)?;
            for c in &done {
                let Some(f) = usize::try_from(c.tag).ok().and_then(|i| slots.get_mut(i)).and_then(Option::take) else {
                    return Err(fail(format!("completion for unknown tag {}", c.tag)));
                };
                latencies.record(f.start.elapsed());
                busy[f.block] = false;
                check_status(c, if f.write { "write" } else { "read" })?;
                stats.ops += 1;
                if f.write {
                    stats.writes += 1;
                } else {
                    stats.reads += 1;
                    let sector = f.block as u64 * block_sectors;
                    if let Some(bad) = check_pattern(&c.data, sector, gens[f.block]) {
                        return Err(fail(format!("verify: sector {bad} does not hold the last write")));
                    }
                }
            }
        }
    }
    stats.elapsed = start.elapsed();
    stats.p50 = latencies.quantile(0.50);
    stats.p99 = latencies.quantile(0.99);
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_identify_sector_and_generation() {
        let mut a = vec![0u8; 4096];
        fill_pattern(&mut a, 80, 3);
        assert_eq!(check_pattern(&a, 80, 3), None);
        assert_eq!(check_pattern(&a, 80, 4), Some(80));
        assert_eq!(check_pattern(&a[512..], 81, 3), None);
        assert_eq!(check_pattern(&a, 81, 3), Some(81));
        a[2000] ^= 1;
        assert_eq!(check_pattern(&a, 80, 3), Some(83));
    }

    #[test]
    fn rng_is_deterministic_and_bounded() {
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        for _ in 0..100 {
            let v = a.below(10);
            assert!(v < 10);
            assert_eq!(v, b.below(10));
        }
    }
}
