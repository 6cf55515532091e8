// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `blkback-bench xen-emulated`: the Xen data path on the emulated host against raw host io_uring on the same
//! O_DIRECT file, alternating, as ratios.
//!
//! Ours: the emulated Xen host (xenstore, event channels, grant tables over memfd guest memory), the xenbus
//! backend with the real data plane (io_uring, O_DIRECT) serving the file, and the blkfront emulator in the same
//! process driving the shared ring with real grants, one variant per grant mode (map with persistent grants,
//! map per request, grant copy). Raw: fio with `--ioengine=io_uring --direct=1` on the file itself, same block
//! size and depth. Each measurement starts a fresh backend and frontend (connect, sanity read, load, close, no
//! grant left mapped); contenders alternate their order every round.
//!
//! Besides IOPS and latency, the table gives CPU time and wake-ups (voluntary context switches) per I/O: for ours
//! the backend's queue worker threads (`blkif-*`) and, separately, the emulated guest's thread (the blkfront
//! emulator, which a real guest pays on its own vCPUs); for raw, fio's processes.

use std::fmt::Write as _;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use device_blk::disk::DirectIo;
use device_blk::stats::LatencyHistogram;
use device_blk::EngineKind;
use transport_xen::dataplane::DataplaneOptions;
use transport_xen::emulated::EmulatedHost;
use transport_xen::frontend::load::{fill_and_verify, random_load_mix, Rng};
use transport_xen::frontend::{
    BackendThread, Blkfront, BlkfrontConfig, Completion, DiskSpec, Indirect, IoRequest, Toolstack, XVDA,
};
use transport_xen::grant_memory::GrantMode;
use transport_xen::xenbus::{BackendConfig, DataplaneServer, Scope};

use crate::proc_usage::{thread_usage, worker_usage, Usage};
use crate::xen_scaling::ScalingArgs;

/// Options of the run.
#[derive(clap::Args, Debug)]
pub struct XenEmulatedArgs {
    /// Seconds per measurement.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Rounds (contenders alternate their order each round; figures are merged over the rounds).
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Disk file size in MiB (filled with data first).
    #[arg(long, default_value_t = 256)]
    size_mib: u64,
    /// Directory of the disk file (must support O_DIRECT).
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
    /// Backend variants, one row each: `map-persistent` (grant map, persistent grants: the default when the
    /// frontend offers them), `map` (map and unmap per request), `copy` (grant copy through a bounce pool),
    /// `copy-unregistered` (the pool not an io_uring fixed buffer), `map-persistent-poll` (persistent grants and
    /// adaptive polling for `--poll-us`).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "map-persistent,map,copy")]
    variants: Vec<Variant>,
    /// Polling time of the `map-persistent-poll` variant (µs).
    #[arg(long, default_value_t = 50)]
    poll_us: u32,
    /// Only the workloads whose name contains one of these (e.g. `--only QD32`); default: all.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// blkfront `ring-page-order` (0..=4; order 0 is a 32-entry ring).
    #[arg(long, default_value_t = 2)]
    ring_order: u32,
    /// Check every read against what was written (the emulated guest pays a pattern check per byte, and the
    /// whole disk is written and verified before each measurement); default: one sanity read per measurement.
    #[arg(long)]
    verify: bool,
    /// Append the Markdown table (and where we stand against the target) to this file.
    #[arg(long)]
    markdown: Option<PathBuf>,
    /// The parts to run: `comparison` (the variants against raw host io_uring), `scaling` (the backend's CPU per
    /// I/O across queues and vbds, see the `--scaling-*` options).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "comparison,scaling")]
    parts: Vec<Part>,
    #[command(flatten)]
    scaling: ScalingArgs,
}

/// A part of the run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Part {
    /// The backend variants against raw host io_uring (fio) per workload.
    Comparison,
    /// The backend's CPU per I/O and IOPS at 1, 2, 4 queues and 1, 4, 16 vbds, against 1 queue / 1 vbd.
    Scaling,
}

/// How our backend reaches the guest's pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Variant {
    /// Grant map with persistent grants (both sides offer `feature-persistent`).
    MapPersistent,
    /// Grant map and unmap per request (no persistent grants).
    Map,
    /// Grant copy into and out of the queue's bounce pool (registered with io_uring as a fixed buffer).
    Copy,
    /// Grant copy, the bounce pool not registered with io_uring (plain vectored I/O).
    CopyUnregistered,
    /// Grant map with persistent grants, and adaptive polling (`--poll-us`).
    MapPersistentPoll,
}

impl Variant {
    fn label(self) -> &'static str {
        match self {
            Variant::MapPersistent => "blkbackd (grant map, persistent)",
            Variant::Map => "blkbackd (grant map per request)",
            Variant::Copy => "blkbackd (grant copy)",
            Variant::CopyUnregistered => "blkbackd (grant copy, pool not registered)",
            Variant::MapPersistentPoll => "blkbackd (grant map, persistent, polling)",
        }
    }

    pub(crate) fn grant_mode(self) -> GrantMode {
        match self {
            Variant::Copy | Variant::CopyUnregistered => GrantMode::Copy,
            Variant::MapPersistent | Variant::Map | Variant::MapPersistentPoll => GrantMode::Map,
        }
    }

    pub(crate) fn persistent(self) -> bool {
        matches!(self, Variant::MapPersistent | Variant::MapPersistentPoll)
    }
}

#[derive(Clone, Copy, Debug)]
struct Workload {
    name: &'static str,
    read: bool,
    depth: usize,
}

impl Workload {
    fn fio_rw(self) -> &'static str {
        if self.read {
            "randread"
        } else {
            "randwrite"
        }
    }
}

const WORKLOADS: [Workload; 3] = [
    Workload { name: "randread 4k QD1", read: true, depth: 1 },
    Workload { name: "randread 4k QD32", read: true, depth: 32 },
    Workload { name: "randwrite 4k QD32", read: false, depth: 32 },
];

/// The workload the target is about, and the target.
const TARGET_WORKLOAD: &str = "randread 4k QD32";
const TARGET_RATIO: f64 = 0.5;

const BLOCK: usize = 4096;
const GUEST_DOMID: u16 = 1;
/// Guest memory: rings, and data pages for the fill's 16 requests of 128 KiB in flight (and 32 of 4 KiB).
const GUEST_PAGES: usize = 8192;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Contender {
    Raw,
    Ours(Variant),
}

impl Contender {
    fn label(self) -> &'static str {
        match self {
            Contender::Raw => "raw io_uring (fio)",
            Contender::Ours(v) => v.label(),
        }
    }
}

/// One measurement.
#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    ios: u64,
    elapsed: Duration,
    p50_us: f64,
    p99_us: f64,
    /// Ours: the queue workers' (`blkif-*` threads); raw: fio's.
    backend: Usage,
    /// Ours: the emulated guest's (the blkfront emulator's thread); raw: none.
    guest: Option<Usage>,
}

/// Per-I/O figures of a [`Usage`].
#[derive(Clone, Copy, Debug)]
struct PerIo {
    cpu_us: f64,
    wakeups: f64,
}

impl PerIo {
    fn of(u: Usage, ios: u64) -> PerIo {
        let n = ios.max(1) as f64;
        PerIo { cpu_us: u.cpu.as_secs_f64() * 1e6 / n, wakeups: u.wakeups as f64 / n }
    }
}

/// A contender's rounds, merged.
#[derive(Clone, Copy, Debug)]
struct Row {
    workload: &'static str,
    contender: Contender,
    iops: f64,
    p50_us: f64,
    p99_us: f64,
    backend: PerIo,
    guest: Option<PerIo>,
}

/// Run the comparison; returns the Markdown table and the summary (also appended to `--markdown`).
pub fn run(args: &XenEmulatedArgs) -> Result<String> {
    ensure!(args.rounds > 0 && args.seconds > 0, "--rounds and --seconds must be positive");
    // Figures are ratios within one run; the load says how quiet the machine was.
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    eprintln!("xen-emulated: load average before the run: {}", load.trim());
    let disk = args.dir.join(format!("blkback-bench-xen-{}.img", std::process::id()));
    let bytes = args.size_mib << 20;
    // Real data everywhere: reads of a sparse file's holes would flatter the raw baseline.
    crate::fill_disk(&disk, bytes).with_context(|| format!("creating {}", disk.display()))?;
    let _cleanup = Remove(disk.clone());
    let mut out = String::new();
    if args.parts.contains(&Part::Comparison) {
        out.push_str(&comparison(args, &disk, bytes)?);
    }
    if args.parts.contains(&Part::Scaling) {
        if !out.is_empty() {
            out.push('\n');
        }
        out.push_str(
            "Backend CPU per I/O across queues (one vbd) and vbds (one queue each) served by one backend, at a \
             fixed total queue depth (×1×1: against 1 vbd × 1 queue):\n\n",
        );
        let s = &args.scaling;
        out.push_str(&crate::xen_scaling::run(s, &disk, bytes, args.seconds, args.rounds, args.ring_order)?);
    }
    if let Some(path) = &args.markdown {
        crate::append_markdown(path, &out)?;
    }
    Ok(out)
}

/// The comparison part: every variant against raw host io_uring, per workload.
fn comparison(args: &XenEmulatedArgs, disk: &Path, bytes: u64) -> Result<String> {
    let mut contenders = vec![Contender::Raw];
    contenders.extend(args.variants.iter().map(|&v| Contender::Ours(v)));
    let mut rows = Vec::new();
    for w in WORKLOADS {
        if !args.only.is_empty() && !args.only.iter().any(|o| w.name.contains(o.as_str())) {
            continue;
        }
        let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); contenders.len()];
        for round in 0..args.rounds {
            // Alternate the order so that no contender always runs on a warmer (or more tired) machine.
            let order: Vec<usize> =
                if round % 2 == 0 { (0..contenders.len()).collect() } else { (0..contenders.len()).rev().collect() };
            for i in order {
                let c = contenders[i];
                let sample = match c {
                    Contender::Raw => fio(disk, w, args.seconds),
                    Contender::Ours(v) => emulated(disk, bytes, w, v, args, round as u64 + 1),
                }
                .with_context(|| format!("{} {}", c.label(), w.name))?;
                eprintln!(
                    "  {:<34} {:<18} round {}: {:>8.0} IOPS",
                    c.label(),
                    w.name,
                    round + 1,
                    sample.ios as f64 / sample.elapsed.as_secs_f64().max(1e-9)
                );
                samples[i].push(sample);
            }
        }
        rows.extend(contenders.iter().zip(&samples).map(|(&c, s)| merge(w.name, c, s)));
    }
    let mut out = render(&rows);
    out.push_str(&summary(&rows));
    Ok(out)
}

fn merge(workload: &'static str, contender: Contender, samples: &[Sample]) -> Row {
    let n = samples.len().max(1) as f64;
    let ios: u64 = samples.iter().map(|s| s.ios).sum::<u64>().max(1);
    let elapsed: f64 = samples.iter().map(|s| s.elapsed.as_secs_f64()).sum();
    let guest: Option<Usage> = samples.iter().map(|s| s.guest).sum();
    Row {
        workload,
        contender,
        iops: ios as f64 / elapsed.max(1e-9),
        p50_us: samples.iter().map(|s| s.p50_us).sum::<f64>() / n,
        p99_us: samples.iter().map(|s| s.p99_us).sum::<f64>() / n,
        backend: PerIo::of(samples.iter().map(|s| s.backend).sum(), ios),
        guest: guest.map(|g| PerIo::of(g, ios)),
    }
}

fn raw_of<'a>(rows: &'a [Row], workload: &str) -> Option<&'a Row> {
    rows.iter().find(|r| r.workload == workload && r.contender == Contender::Raw)
}

fn render(rows: &[Row]) -> String {
    let mut out = String::from(
        "| workload | contender | IOPS | ×raw | p50 µs | p99 µs | CPU µs/IO: backend / guest | \
         wake-ups/IO: backend / guest |\n|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let ratio = raw_of(rows, r.workload).map_or(f64::NAN, |b| r.iops / b.iops.max(1e-9));
        let (guest_cpu, guest_wakeups) = r
            .guest
            .map_or_else(|| ("—".into(), "—".into()), |g| (format!("{:.2}", g.cpu_us), format!("{:.2}", g.wakeups)));
        let _ = writeln!(
            out,
            "| {} | {} | {:.0} | {:.2} | {:.1} | {:.1} | {:.2} / {} | {:.2} / {} |",
            r.workload,
            r.contender.label(),
            r.iops,
            ratio,
            r.p50_us,
            r.p99_us,
            r.backend.cpu_us,
            guest_cpu,
            r.backend.wakeups,
            guest_wakeups
        );
    }
    out
}

fn summary(rows: &[Row]) -> String {
    let Some(raw) = raw_of(rows, TARGET_WORKLOAD) else {
        return String::new();
    };
    let ours: Vec<String> = rows
        .iter()
        .filter(|r| r.workload == TARGET_WORKLOAD && r.contender != Contender::Raw)
        .map(|r| {
            let ratio = r.iops / raw.iops.max(1e-9);
            let verdict = if ratio >= TARGET_RATIO { "met" } else { "not met" };
            format!("{} {ratio:.2}× ({verdict})", r.contender.label())
        })
        .collect();
    if ours.is_empty() {
        return String::new();
    }
    format!("\nTarget ≥ {TARGET_RATIO}× raw host io_uring at {TARGET_WORKLOAD}: {}.\n", ours.join("; "))
}

/// One measurement through the emulated host: backend, blkfront handshake, sanity read (or whole-disk fill and
/// verify), random load, close; no grant may stay mapped.
fn emulated(
    disk: &Path,
    bytes: u64,
    w: Workload,
    variant: Variant,
    args: &XenEmulatedArgs,
    seed: u64,
) -> Result<Sample> {
    let host = EmulatedHost::new()?;
    let options = {
        let mut o = DataplaneOptions::default();
        o.grant_mode = variant.grant_mode();
        o.register_bounce_pool = variant != Variant::CopyUnregistered;
        o.poll_us = if variant == Variant::MapPersistentPoll { args.poll_us } else { 0 };
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
    let guest = host.add_guest(GUEST_DOMID, GUEST_PAGES)?;
    let toolstack = Toolstack::new(Arc::new(host.xenstore()?));
    toolstack.add_disk(&DiskSpec::new(GUEST_DOMID, disk.to_str().context("disk path is not UTF-8")?))?;
    let config = BlkfrontConfig {
        ring_page_order: args.ring_order,
        persistent: variant.persistent(),
        indirect: Indirect::WhenNeeded,
        ..BlkfrontConfig::default()
    };
    let mut front = Blkfront::connect(&guest, XVDA, config)?;
    let outcome = measure(&mut front, disk, bytes, w, args, seed);
    let closed = front.close().context("closing the device");
    let stopped = backend.stop().context("stopping the backend");
    let sample = outcome?;
    closed?;
    stopped?;
    ensure!(host.live_mappings() == 0, "{} grant mappings left after the backend stopped", host.live_mappings());
    Ok(sample)
}

fn measure(
    front: &mut Blkfront<'_>,
    disk: &Path,
    bytes: u64,
    w: Workload,
    args: &XenEmulatedArgs,
    seed: u64,
) -> Result<Sample> {
    let sectors = front.info().sectors;
    ensure!(sectors * 512 == bytes, "backend reports {sectors} sectors for {bytes} bytes");
    let blocks = usize::try_from(bytes / BLOCK as u64)?;
    let duration = Duration::from_secs(args.seconds);
    if args.verify {
        fill_and_verify(front, sectors, 128 << 10, 16, 1)?;
        let mut gens = vec![1u32; blocks];
        let percent = if w.read { 100 } else { 0 };
        let (backend0, guest0) = (worker_usage()?, thread_usage()?);
        let stats = random_load_mix(front, &mut gens, BLOCK, w.depth, duration, seed, percent)?;
        return Ok(Sample {
            ios: stats.ops,
            elapsed: stats.elapsed,
            p50_us: stats.p50.as_secs_f64() * 1e6,
            p99_us: stats.p99.as_secs_f64() * 1e6,
            backend: worker_usage()? - backend0,
            guest: Some(thread_usage()? - guest0),
        });
    }
    sanity_read(front, disk, blocks, seed)?;
    let latency = LatencyHistogram::default();
    let (backend0, guest0) = (worker_usage()?, thread_usage()?);
    let (ios, elapsed) = drive(front, w, blocks, duration, seed, &latency)?;
    Ok(Sample {
        ios,
        elapsed,
        p50_us: latency.quantile(0.50).as_secs_f64() * 1e6,
        p99_us: latency.quantile(0.99).as_secs_f64() * 1e6,
        backend: worker_usage()? - backend0,
        guest: Some(thread_usage()? - guest0),
    })
}

/// Read 64 KiB somewhere through the ring and compare it with the file.
pub(crate) fn sanity_read(front: &mut Blkfront<'_>, disk: &Path, blocks: usize, seed: u64) -> Result<()> {
    const LEN: usize = 64 << 10;
    let block = Rng::new(seed).below(blocks.saturating_sub(LEN / BLOCK).max(1));
    let sector = block as u64 * (BLOCK / 512) as u64;
    let through_ring = front.read(sector, LEN)?;
    let mut direct = vec![0u8; LEN];
    std::fs::File::open(disk)?.read_exact_at(&mut direct, sector * 512)?;
    ensure!(through_ring == direct, "sanity read at sector {sector}: the data differs from the file's");
    Ok(())
}

/// The random load without data checks (as fio does it): keep `depth` requests of 4 KiB in flight at random
/// block offsets for `duration`; latency from submission to the completion being seen.
fn drive(
    front: &mut Blkfront<'_>,
    w: Workload,
    blocks: usize,
    duration: Duration,
    seed: u64,
    latency: &LatencyHistogram,
) -> Result<(u64, Duration)> {
    let mut rng = Rng::new(seed);
    let data: Vec<u8> = (0..BLOCK).map(|i| (i % 251) as u8 ^ 0x5a).collect();
    let mut started: Vec<Option<Instant>> = vec![None; w.depth];
    let mut free: Vec<usize> = (0..w.depth).rev().collect();
    let mut done: Vec<Completion> = Vec::with_capacity(w.depth);
    let mut ios = 0u64;
    let start = Instant::now();
    loop {
        let running = start.elapsed() < duration;
        while let Some(slot) = if running { free.pop() } else { None } {
            let sector = rng.below(blocks) as u64 * (BLOCK / 512) as u64;
            let request =
                if w.read { IoRequest::Read { sector, len: BLOCK } } else { IoRequest::Write { sector, data: &data } };
            started[slot] = Some(Instant::now());
            ensure!(front.submit(0, &request, slot as u64)?, "ring full below the ring size");
        }
        front.kick(0)?;
        if free.len() == w.depth {
            return Ok((ios, start.elapsed()));
        }
        done.clear();
        front.poll(0, &mut done)?;
        for c in &done {
            let slot = usize::try_from(c.tag)?;
            let t = started.get_mut(slot).and_then(Option::take).context("completion for an idle slot")?;
            latency.record(t.elapsed());
            ensure!(c.status == 0, "request failed with status {}", c.status);
            ios += 1;
            free.push(slot);
        }
    }
}

/// Raw host io_uring on the same file: fio, O_DIRECT, same block size and depth, uniform random offsets.
fn fio(disk: &Path, w: Workload, seconds: u64) -> Result<Sample> {
    let wakeups0 = children_wakeups()?;
    let out = Command::new("fio")
        .args(["--name=raw", "--ioengine=io_uring", "--direct=1", "--bs=4k", "--time_based"])
        .args(["--randrepeat=0", "--norandommap", "--lat_percentiles=1", "--output-format=json"])
        .arg(format!("--rw={}", w.fio_rw()))
        .arg(format!("--iodepth={}", w.depth))
        .arg(format!("--runtime={seconds}"))
        .arg(format!("--filename={}", disk.display()))
        .stdin(Stdio::null())
        .output()
        .context("running fio (scripts/install-deps installs it)")?;
    if !out.status.success() {
        bail!("fio failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let mut sample = parse_fio_json(&String::from_utf8_lossy(&out.stdout), w.read)?;
    sample.backend.wakeups = children_wakeups()?.saturating_sub(wakeups0);
    Ok(sample)
}

/// Voluntary context switches of every finished child process (fio's, counted like our threads'; fio's own
/// `ctx` adds preemptions).
fn children_wakeups() -> Result<u64> {
    // SAFETY: an all-zero `rusage` is a valid value of the plain C struct.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a valid, writable `rusage` for the call.
    if unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) } != 0 {
        return Err(std::io::Error::last_os_error()).context("getrusage");
    }
    Ok(u64::try_from(usage.ru_nvcsw).unwrap_or(0))
}

/// Figures of fio's JSON report (its first job, the direction measured).
fn parse_fio_json(text: &str, read: bool) -> Result<Sample> {
    // fio may print notes before the JSON document.
    let json = text.find('{').map(|i| &text[i..]).context("no JSON in fio's output")?;
    let doc: serde_json::Value = serde_json::from_str(json).context("parsing fio's JSON")?;
    let job = &doc["jobs"][0];
    let dir = &job[if read { "read" } else { "write" }];
    let number = |v: &serde_json::Value, what: &str| v.as_f64().with_context(|| format!("fio JSON: no {what}"));
    let ios = dir["total_ios"].as_u64().context("fio JSON: no total_ios")?;
    let runtime_ms = number(&dir["runtime"], "runtime")?;
    let pct = |p: &str| dir["lat_ns"]["percentile"][p].as_f64().map_or(f64::NAN, |ns| ns / 1e3);
    let cpu_share = (number(&job["usr_cpu"], "usr_cpu")? + number(&job["sys_cpu"], "sys_cpu")?) / 100.0;
    let elapsed = Duration::from_secs_f64(runtime_ms / 1e3);
    Ok(Sample {
        ios,
        elapsed,
        p50_us: pct("50.000000"),
        p99_us: pct("99.000000"),
        backend: Usage { cpu: elapsed.mul_f64(cpu_share.max(0.0)), wakeups: 0 },
        guest: None,
    })
}

struct Remove(PathBuf);

impl Drop for Remove {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fio_json_figures() {
        let text = r#"note: both iodepth >= 1 and synchronous I/O engine are selected
{"jobs": [{"usr_cpu": 10.0, "sys_cpu": 40.0,
  "read": {"total_ios": 5000, "runtime": 2000, "lat_ns": {"percentile": {"50.000000": 45056, "99.000000": 280576}}},
  "write": {"total_ios": 0, "runtime": 0, "lat_ns": {}}}]}"#;
        let s = parse_fio_json(text, true).expect("parses");
        assert_eq!((s.ios, s.elapsed), (5000, Duration::from_secs(2)));
        assert!((s.p50_us - 45.056).abs() < 1e-9 && (s.p99_us - 280.576).abs() < 1e-9);
        assert_eq!(s.backend, Usage { cpu: Duration::from_secs(1), wakeups: 0 });
        assert!(parse_fio_json(text, false).expect("parses").p50_us.is_nan());
        assert!(parse_fio_json("fio: error", true).is_err());
    }

    #[test]
    fn the_summary_says_where_we_stand() {
        let row = |contender, iops| Row {
            workload: TARGET_WORKLOAD,
            contender,
            iops,
            p50_us: 1.0,
            p99_us: 2.0,
            backend: PerIo { cpu_us: 3.0, wakeups: 0.5 },
            guest: None,
        };
        let rows = [row(Contender::Raw, 100.0), row(Contender::Ours(Variant::Copy), 40.0)];
        let text = summary(&rows);
        assert!(text.contains("blkbackd (grant copy) 0.40× (not met)"), "{text}");
        assert!(render(&rows).contains("| randread 4k QD32 | blkbackd (grant copy) | 40 | 0.40 |"));
    }
}
