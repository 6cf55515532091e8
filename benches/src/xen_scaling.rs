// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `blkback-bench xen-emulated`, the scaling part: the backend's CPU per I/O and IOPS at 1, 2 and 4 queues of
//! one vbd, and at 1, 4 and 16 vbds of one queue each, all served by one backend, 4 KiB random reads and writes at
//! a fixed total queue depth; a table with ratios against the 1-queue / 1-vbd figure.
//!
//! The guest is one thread (a one-vCPU guest) that drives every ring in turn, the total depth split evenly over
//! the rings: the guest's work per I/O is the same in every shape, and only the backend's organisation changes.
//! The backend's CPU is the CPU time of its threads, by name, from `/proc/self/task/*/schedstat`: the data plane's
//! (`blkif-*`) and the control plane's (`blkback-xenbus`, idle while measuring); the guest's thread is measured
//! apart and never counted as the backend's.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use device_blk::disk::DirectIo;
use device_blk::EngineKind;
use transport_xen::dataplane::{DataplaneOptions, IoThreads, MAX_IO_THREADS};
use transport_xen::emulated::EmulatedHost;
use transport_xen::frontend::load::Rng;
use transport_xen::frontend::{
    BackendThread, Blkfront, BlkfrontConfig, Completion, DiskSpec, Indirect, IoRequest, Toolstack, XVDA,
};
use transport_xen::xenbus::{BackendConfig, DataplaneServer, Scope};

use crate::proc_usage::{thread_usage, usage, Usage};
use crate::xen_emulated::{sanity_read, Variant};

/// Options of the scaling part.
#[derive(clap::Args, Debug)]
pub struct ScalingArgs {
    /// Queue counts of one vbd to measure (the scaling part).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    scaling_queues: Vec<u32>,
    /// vbd counts (one queue each) served by one backend to measure (the scaling part).
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    scaling_vbds: Vec<u32>,
    /// Total queue depth of the scaling part, split evenly over the rings.
    #[arg(long, default_value_t = 32)]
    scaling_depth: usize,
    /// Backend variant of the scaling part.
    #[arg(long, value_enum, default_value = "map-persistent")]
    scaling_variant: Variant,
    /// Data-plane I/O threads of the backend, one set of rows each: N > 0 a pool of N threads shared by every ring
    /// (`blkbackd xen --io-threads N`; 1 is its default), 0 one thread per ring (the model before the pool).
    #[arg(long, value_delimiter = ',', default_value = "1,0")]
    scaling_io_threads: Vec<usize>,
}

/// The most rings a shape may have (the guest's memory and the thread count stay small).
const MAX_RINGS: u32 = 64;
/// Where the ratios must stay.
const FLAT_WITHIN: f64 = 1.5;
const BLOCK: usize = 4096;
const GUEST_DOMID: u16 = 1;
/// `virtual-device` numbers of successive xvd disks are 16 apart (xvda, xvdb, ...).
const DEVID_STEP: u32 = 16;

/// Queues per vbd and vbds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Shape {
    queues: u32,
    vbds: u32,
    /// The backend's I/O thread pool (0: one thread per ring).
    io_threads: usize,
}

impl Shape {
    fn rings(self) -> u32 {
        self.queues * self.vbds
    }

    fn label(self) -> String {
        let s = |n: u32| if n == 1 { "" } else { "s" };
        format!("{} vbd{} × {} queue{}", self.vbds, s(self.vbds), self.queues, s(self.queues))
    }

    fn threads_label(self) -> String {
        match self.io_threads {
            0 => "one per ring".to_string(),
            n => format!("pool of {n}"),
        }
    }

    /// The shape this one's ratios are against: 1 vbd × 1 queue, same threads.
    fn base(self) -> Shape {
        Shape { queues: 1, vbds: 1, io_threads: self.io_threads }
    }
}

#[derive(Clone, Copy, Debug)]
struct Load {
    name: &'static str,
    read: bool,
}

const LOADS: [Load; 2] = [Load { name: "randread 4k", read: true }, Load { name: "randwrite 4k", read: false }];

/// One measurement.
#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    ios: u64,
    elapsed: Duration,
    backend: Usage,
    guest: Usage,
    /// Data-plane threads (`blkif-*`) the backend ran.
    threads: usize,
}

/// A shape's rounds, merged.
#[derive(Clone, Debug)]
struct Row {
    load: &'static str,
    shape: Shape,
    threads: usize,
    iops: f64,
    backend_cpu_us: f64,
    backend_wakeups: f64,
    guest_cpu_us: f64,
}

/// The shapes, per thread setting: the queue counts of one vbd, then the vbd counts of one queue each (1 × 1
/// once, first).
fn shapes(args: &ScalingArgs) -> Result<Vec<Shape>> {
    let mut out = Vec::new();
    for &io_threads in &args.scaling_io_threads {
        ensure!(io_threads <= MAX_IO_THREADS, "--scaling-io-threads: at most {MAX_IO_THREADS}");
        let base = Shape { queues: 1, vbds: 1, io_threads };
        let more = args.scaling_queues.iter().map(|&queues| Shape { queues, ..base });
        for s in [base].into_iter().chain(more).chain(args.scaling_vbds.iter().map(|&vbds| Shape { vbds, ..base })) {
            ensure!(s.queues >= 1 && s.vbds >= 1, "queue and vbd counts must be positive");
            ensure!(s.rings() <= MAX_RINGS, "{}: at most {MAX_RINGS} rings", s.label());
            ensure!(args.scaling_depth >= s.rings() as usize, "--scaling-depth below the ring count of {}", s.label());
            if !out.contains(&s) {
                out.push(s);
            }
        }
    }
    Ok(out)
}

/// Run the scaling part on `disk` (`bytes` long); returns the Markdown table and its verdict.
pub fn run(
    args: &ScalingArgs,
    disk: &Path,
    bytes: u64,
    seconds: u64,
    rounds: usize,
    ring_order: u32,
) -> Result<String> {
    let shapes = shapes(args)?;
    let mut rows = Vec::new();
    for load in LOADS {
        let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); shapes.len()];
        for round in 0..rounds {
            // Alternate the order so that no shape always runs on a warmer (or more tired) machine.
            let order: Vec<usize> =
                if round % 2 == 0 { (0..shapes.len()).collect() } else { (0..shapes.len()).rev().collect() };
            for i in order {
                let shape = shapes[i];
                let seed = round as u64 + 1;
                let depth = args.scaling_depth;
                let m = Measurement { disk, bytes, load, shape, depth, seconds, ring_order, seed };
                let sample = m.run(args).with_context(|| format!("{} {}", shape.label(), load.name))?;
                eprintln!(
                    "  scaling {:<20} {:<12} {:<13} round {}: {:>8.0} IOPS, backend {:.2} µs/IO, {} threads",
                    shape.label(),
                    shape.threads_label(),
                    load.name,
                    round + 1,
                    sample.ios as f64 / sample.elapsed.as_secs_f64().max(1e-9),
                    sample.backend.cpu.as_secs_f64() * 1e6 / sample.ios.max(1) as f64,
                    sample.threads
                );
                samples[i].push(sample);
            }
        }
        rows.extend(shapes.iter().zip(&samples).map(|(&shape, s)| merge(load.name, shape, s)));
    }
    let mut out = render(&rows);
    out.push_str(&verdict(&rows));
    Ok(out)
}

fn merge(load: &'static str, shape: Shape, samples: &[Sample]) -> Row {
    let ios = samples.iter().map(|s| s.ios).sum::<u64>().max(1) as f64;
    let elapsed: f64 = samples.iter().map(|s| s.elapsed.as_secs_f64()).sum();
    let backend: Usage = samples.iter().map(|s| s.backend).sum();
    let guest: Usage = samples.iter().map(|s| s.guest).sum();
    Row {
        load,
        shape,
        threads: samples.iter().map(|s| s.threads).max().unwrap_or(0),
        iops: ios / elapsed.max(1e-9),
        backend_cpu_us: backend.cpu.as_secs_f64() * 1e6 / ios,
        backend_wakeups: backend.wakeups as f64 / ios,
        guest_cpu_us: guest.cpu.as_secs_f64() * 1e6 / ios,
    }
}

/// The row `shape`'s ratios are against.
fn base<'a>(rows: &'a [Row], load: &str, shape: Shape) -> Option<&'a Row> {
    rows.iter().find(|r| r.load == load && r.shape == shape.base())
}

fn render(rows: &[Row]) -> String {
    let mut out = String::from(
        "| workload | I/O threads | shape | rings | data-plane threads | IOPS | IOPS ×1×1 | backend CPU µs/IO | \
         CPU ×1×1 | backend wake-ups/IO | guest CPU µs/IO |\n|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let ratio = |of: &dyn Fn(&Row) -> f64| {
            base(rows, r.load, r.shape).map_or_else(|| "—".to_string(), |b| format!("{:.2}", of(r) / of(b).max(1e-9)))
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {:.0} | {} | {:.2} | {} | {:.2} | {:.2} |",
            r.load,
            r.shape.threads_label(),
            r.shape.label(),
            r.shape.rings(),
            r.threads,
            r.iops,
            ratio(&|x| x.iops),
            r.backend_cpu_us,
            ratio(&|x| x.backend_cpu_us),
            r.backend_wakeups,
            r.guest_cpu_us
        );
    }
    out
}

/// Whether the backend's CPU per I/O stays within [`FLAT_WITHIN`] of the 1 × 1 figure, per thread setting and
/// workload.
fn verdict(rows: &[Row]) -> String {
    let mut parts = Vec::new();
    let mut settings: Vec<Shape> = Vec::new();
    for r in rows {
        if !settings.contains(&r.shape.base()) {
            settings.push(r.shape.base());
        }
    }
    for setting in settings {
        for load in LOADS {
            let Some(b) = base(rows, load.name, setting) else { continue };
            let worst = rows
                .iter()
                .filter(|r| r.load == load.name && r.shape.base() == setting)
                .map(|r| (r.backend_cpu_us / b.backend_cpu_us.max(1e-9), r.shape))
                .max_by(|x, y| x.0.total_cmp(&y.0));
            if let Some((ratio, shape)) = worst {
                let met = if ratio <= FLAT_WITHIN { "met" } else { "not met" };
                let threads = setting.threads_label();
                parts.push(format!("{threads}, {}: worst {ratio:.2}× at {} ({met})", load.name, shape.label()));
            }
        }
    }
    if parts.is_empty() {
        return String::new();
    }
    format!("\nTarget: backend CPU per I/O within {FLAT_WITHIN}× of 1 vbd × 1 queue: {}.\n", parts.join("; "))
}

/// One shape, one workload, a fresh backend.
struct Measurement<'a> {
    disk: &'a Path,
    bytes: u64,
    load: Load,
    shape: Shape,
    /// Total queue depth.
    depth: usize,
    seconds: u64,
    ring_order: u32,
    seed: u64,
}

impl Measurement<'_> {
    /// Start a backend, attach the shape's vbds (all on the same file), connect a blkfront per vbd, sanity-read
    /// through each, drive the load, close; no grant may stay mapped.
    fn run(&self, args: &ScalingArgs) -> Result<Sample> {
        let host = EmulatedHost::new()?;
        let variant = args.scaling_variant;
        let options = {
            let mut o = DataplaneOptions::default();
            o.grant_mode = variant.grant_mode();
            o.register_bounce_pool = variant != Variant::CopyUnregistered;
            o.poll_us = if variant == Variant::MapPersistentPoll { 50 } else { 0 };
            o.io_threads = (self.shape.io_threads > 0).then(|| IoThreads::new(self.shape.io_threads));
            o
        };
        let rings =
            DataplaneServer::new(Arc::new(host.grant_table(0)), host.evtchn_opener(0), EngineKind::IoUring, options);
        let config = {
            let mut o = BackendConfig::default();
            o.persistent_grants = variant.persistent();
            o.direct_io = DirectIo::Required;
            o
        };
        let backend = BackendThread::spawn(&host, Arc::new(rings), config, Scope::AllDomains)?;
        // Rings, and the data pages of the sanity reads and of every request in flight.
        let guest = host.add_guest(GUEST_DOMID, 8192 + 64 * self.shape.rings() as usize)?;
        let toolstack = Toolstack::new(Arc::new(host.xenstore()?));
        let path = self.disk.to_str().context("disk path is not UTF-8")?;
        let devids: Vec<u32> = (0..self.shape.vbds).map(|k| XVDA + DEVID_STEP * k).collect();
        for &devid in &devids {
            toolstack.add_disk(&DiskSpec { devid, ..DiskSpec::new(GUEST_DOMID, path) })?;
        }
        let front_config = BlkfrontConfig {
            ring_page_order: self.ring_order,
            queues: self.shape.queues,
            persistent: variant.persistent(),
            indirect: Indirect::WhenNeeded,
            ..BlkfrontConfig::default()
        };
        let mut fronts = Vec::with_capacity(devids.len());
        let mut outcome = Ok(Sample::default());
        for &devid in &devids {
            match Blkfront::connect(&guest, devid, front_config.clone()) {
                Ok(f) => fronts.push(f),
                Err(e) => {
                    outcome = Err(anyhow::Error::new(e).context(format!("connecting vbd {devid}")));
                    break;
                }
            }
        }
        if outcome.is_ok() {
            outcome = self.measure(&mut fronts);
        }
        let mut closed = Ok(());
        for f in fronts {
            let c = f.close().context("closing a device");
            closed = closed.and(c);
        }
        let stopped = backend.stop().context("stopping the backend");
        // The next measurement counts the data-plane threads it finds: let this one's go first (a pool's threads
        // end just after the backend that held the pool).
        let deadline = Instant::now() + Duration::from_secs(5);
        while backend_usage().is_ok_and(|((_, threads), _)| threads > 0) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let sample = outcome?;
        closed?;
        stopped?;
        ensure!(host.live_mappings() == 0, "{} grant mappings left after the backend stopped", host.live_mappings());
        Ok(sample)
    }

    fn measure(&self, fronts: &mut [Blkfront<'_>]) -> Result<Sample> {
        let blocks = usize::try_from(self.bytes / BLOCK as u64)?;
        for (k, front) in fronts.iter_mut().enumerate() {
            ensure!(front.info().sectors * 512 == self.bytes, "vbd {k}: wrong size");
            let queues = front.queue_count();
            ensure!(queues == self.shape.queues as usize, "vbd {k}: {queues} queues negotiated");
            sanity_read(front, self.disk, blocks, self.seed + k as u64)?;
        }
        let per_ring = self.depth_per_ring(fronts.first().map_or(1, Blkfront::ring_size))?;
        let (backend0, guest0) = backend_usage()?;
        let (ios, elapsed) = self.drive(fronts, per_ring, blocks)?;
        let (backend1, guest1) = backend_usage()?;
        Ok(Sample { ios, elapsed, backend: backend1.0 - backend0.0, guest: guest1 - guest0, threads: backend1.1 })
    }

    fn depth_per_ring(&self, ring_size: usize) -> Result<usize> {
        let rings = self.shape.rings() as usize;
        ensure!(rings > 0, "no ring");
        // The total depth is checked against the ring count in `shapes`; a ring takes at most its size.
        Ok((self.depth.max(rings) / rings).clamp(1, ring_size.max(1)))
    }

    /// Keep `per_ring` 4 KiB requests in flight on every ring, at random blocks, for the measurement's time: each
    /// ring in turn gets its completions taken (waiting for one if it has requests in flight), its free slots
    /// refilled, and a kick.
    fn drive(&self, fronts: &mut [Blkfront<'_>], per_ring: usize, blocks: usize) -> Result<(u64, Duration)> {
        let queues = self.shape.queues as usize;
        let rings: Vec<(usize, usize)> = (0..fronts.len()).flat_map(|f| (0..queues).map(move |q| (f, q))).collect();
        let mut rng = Rng::new(self.seed);
        let data: Vec<u8> = (0..BLOCK).map(|i| (i % 251) as u8 ^ 0x5a).collect();
        let mut free: Vec<Vec<usize>> = vec![(0..per_ring).rev().collect(); rings.len()];
        let mut busy: Vec<Vec<bool>> = vec![vec![false; per_ring]; rings.len()];
        let mut done: Vec<Completion> = Vec::with_capacity(per_ring);
        let duration = Duration::from_secs(self.seconds);
        let mut ios = 0u64;
        let start = Instant::now();
        loop {
            let running = start.elapsed() < duration;
            let mut in_flight = 0;
            for (r, &(f, q)) in rings.iter().enumerate() {
                let front = &mut fronts[f];
                if front.in_flight(q) > 0 {
                    done.clear();
                    front.poll(q, &mut done)?;
                    for c in &done {
                        ensure!(c.status == 0, "request failed with status {}", c.status);
                        let slot = usize::try_from(c.tag)?;
                        let was = busy[r].get_mut(slot).map(std::mem::take);
                        ensure!(was == Some(true), "completion for an idle slot {slot}");
                        free[r].push(slot);
                        ios += 1;
                    }
                }
                while let Some(slot) = if running { free[r].pop() } else { None } {
                    let sector = rng.below(blocks) as u64 * (BLOCK / 512) as u64;
                    let request = if self.load.read {
                        IoRequest::Read { sector, len: BLOCK }
                    } else {
                        IoRequest::Write { sector, data: &data }
                    };
                    busy[r][slot] = true;
                    ensure!(front.submit(q, &request, slot as u64)?, "ring full below the ring size");
                }
                front.kick(q)?;
                in_flight += front.in_flight(q);
            }
            if !running && in_flight == 0 {
                return Ok((ios, start.elapsed()));
            }
        }
    }
}

/// The backend's usage (its data-plane threads `blkif-*` and its control thread `blkback-xenbus`) with the count
/// of data-plane threads, and the calling (guest) thread's usage.
fn backend_usage() -> Result<((Usage, usize), Usage)> {
    let mut total = Usage::default();
    let mut threads = 0;
    for entry in std::fs::read_dir("/proc/self/task")? {
        let dir = entry?.path();
        let Ok(comm) = std::fs::read_to_string(dir.join("comm")) else { continue };
        let comm = comm.trim_end();
        let data_plane = comm.starts_with("blkif-");
        if data_plane || comm == "blkback-xenbus" {
            threads += usize::from(data_plane);
            // A thread may end between the listing and the reads: it counts for nothing then.
            total = total + usage(&dir).unwrap_or_default();
        }
    }
    Ok(((total, threads), thread_usage()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(load: &'static str, queues: u32, vbds: u32, iops: f64, cpu: f64) -> Row {
        let shape = Shape { queues, vbds, io_threads: 1 };
        Row { load, shape, threads: 1, iops, backend_cpu_us: cpu, backend_wakeups: 0.5, guest_cpu_us: 1.0 }
    }

    #[test]
    fn ratios_are_against_one_vbd_one_queue_of_the_same_threads() {
        let mut rows = vec![
            row("randread 4k", 1, 1, 100.0, 2.0),
            row("randread 4k", 4, 1, 150.0, 2.5),
            row("randread 4k", 1, 16, 80.0, 4.0),
        ];
        let mut per_ring = row("randread 4k", 1, 1, 50.0, 1.0);
        per_ring.shape.io_threads = 0;
        rows.push(per_ring);
        let table = render(&rows);
        let line = "| randread 4k | pool of 1 | 1 vbd × 4 queues | 4 | 1 | 150 | 1.50 | 2.50 | 1.25 |";
        assert!(table.contains(line), "{table}");
        let line = "| randread 4k | pool of 1 | 16 vbds × 1 queue | 16 | 1 | 80 | 0.80 | 4.00 | 2.00 |";
        assert!(table.contains(line), "{table}");
        let line = "| randread 4k | one per ring | 1 vbd × 1 queue | 1 | 1 | 50 | 1.00 | 1.00 | 1.00 |";
        assert!(table.contains(line), "{table}");
        let v = verdict(&rows);
        assert_eq!(v.matches("pool of 1, randread 4k").count(), 1, "{v}");
        assert!(v.contains("pool of 1, randread 4k: worst 2.00× at 16 vbds × 1 queue (not met)"), "{v}");
        assert!(v.contains("one per ring, randread 4k: worst 1.00× at 1 vbd × 1 queue (met)"), "{v}");
        assert!(verdict(&rows[..2]).contains("worst 1.25× at 1 vbd × 4 queues (met)"));
    }

    #[test]
    fn shapes_start_with_one_by_one_and_bound_the_rings() {
        let args = |queues: Vec<u32>, vbds: Vec<u32>, io_threads: Vec<usize>| ScalingArgs {
            scaling_queues: queues,
            scaling_vbds: vbds,
            scaling_depth: 32,
            scaling_variant: Variant::MapPersistent,
            scaling_io_threads: io_threads,
        };
        let s = shapes(&args(vec![1, 2, 4], vec![1, 4, 16], vec![1, 0])).expect("valid");
        let labels: Vec<String> = s.iter().map(|s| format!("{} {}", s.threads_label(), s.label())).collect();
        let one = ["1 vbd × 1 queue", "1 vbd × 2 queues", "1 vbd × 4 queues", "4 vbds × 1 queue", "16 vbds × 1 queue"];
        let want: Vec<String> =
            ["pool of 1", "one per ring"].iter().flat_map(|t| one.iter().map(move |l| format!("{t} {l}"))).collect();
        assert_eq!(labels, want);
        assert!(shapes(&args(vec![0], vec![1], vec![1])).is_err());
        assert!(shapes(&args(vec![1], vec![65], vec![1])).is_err());
        assert!(shapes(&args(vec![1], vec![33], vec![1])).is_err(), "depth 32 below 33 rings");
        assert!(shapes(&args(vec![1], vec![1], vec![65])).is_err());
    }
}
