// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `blkback-bench`: side-by-side benchmarks of blkbackd against the backends it replaces.
//!
//! `blkback-bench vhost-user` serves one file with qemu-storage-daemon and with blkbackd (and any `--variant`
//! configurations of it), alternating, drives them with the same vhost-user-blk client, runs fio with io_uring on
//! the file itself as the raw ceiling, and prints IOPS, p50/p99 latency, server CPU per I/O and the ratios to qsd
//! and to raw. `blkback-bench memory` reports blkbackd's resident memory per queue count. Figures are only
//! comparable inside one run.

// Measurement arithmetic converts between counts, floats and sizes that are small by construction.
#![allow(clippy::cast_possible_truncation)]

mod client;
mod lab;
mod lab_cpu;
mod micro;
mod proc_usage;
mod scaling;
mod servers;
mod syscall_cost;
mod xen_emulated;
mod xen_scaling;

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use client::Workload;
use servers::{Running, Server};

#[derive(Parser, Debug)]
#[command(version, about = "Side-by-side benchmarks of blkbackd against its peers")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// blkbackd vs qemu-storage-daemon over vhost-user-blk, same file, same client.
    VhostUser(VhostUserArgs),
    /// The Xen data path on the emulated host vs raw host io_uring (fio) on the same file.
    XenEmulated(xen_emulated::XenEmulatedArgs),
    /// Resident memory of `blkbackd vhost-user` per queue count: at start, and connected and idle after I/O.
    Memory(MemoryArgs),
    /// The criterion micro-benchmarks' results (`cargo bench`) as one Markdown table.
    MicroTable(micro::MicroTableArgs),
    /// The real Xen lab's side-by-side run (kernel blkback, qdisk, blkbackd) as one Markdown table.
    LabTable(lab::LabTableArgs),
    /// The real Xen lab's backend CPU per I/O (benches/lab/cpu-per-io.sh: kernel blkback, qdisk, blkbackd).
    LabCpuTable(lab_cpu::LabCpuTableArgs),
    /// CPU per system call and per wake-up of a sleeping thread on this machine (for the real lab's dom0).
    SyscallCost(syscall_cost::SyscallCostArgs),
}

#[derive(clap::Args, Debug)]
struct MemoryArgs {
    /// The blkbackd binary to measure.
    #[arg(long, default_value = "target/release/blkbackd")]
    blkbackd: PathBuf,
    /// Directory for the disk file and the socket.
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
    /// Queue counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    queues: Vec<usize>,
    /// Extra blkbackd arguments (e.g. `--poll-us 50`).
    #[arg(long, default_value = "")]
    extra: String,
    /// Append the Markdown table to this file.
    #[arg(long)]
    markdown: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
struct VhostUserArgs {
    /// The blkbackd binary to measure.
    #[arg(long, default_value = "target/release/blkbackd")]
    blkbackd: PathBuf,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Rounds (each round runs every server once per workload, alternating the order).
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Disk file size in MiB (filled with data before the first run).
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// Directory for the disk file and sockets (must support O_DIRECT for a fair comparison).
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
    /// Queue counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    queues: Vec<usize>,
    /// Extra blkbackd configurations to measure as well, e.g. `--variant="--poll-us 50"`.
    #[arg(long)]
    variant: Vec<String>,
    /// Append the Markdown table to this file.
    #[arg(long)]
    markdown: Option<PathBuf>,
    /// Only the workloads whose name contains one of these (e.g. `--only "seqread,QD1"`); default: all.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// cloud-hypervisor's `vhost_user_block` binary to measure as well (busy polling); default: the one on
    /// `PATH`, if any (`cargo build --release -p vhost_user_block` in a cloud-hypervisor checkout).
    #[arg(long)]
    ch_block: Option<PathBuf>,
    /// Leave out cloud-hypervisor's `vhost_user_block` even if it is on `PATH`.
    #[arg(long)]
    no_ch: bool,
    /// Leave out the raw host io_uring row (fio on the file itself, one job per queue).
    #[arg(long)]
    no_raw: bool,
}

const WORKLOADS: [Workload; 4] = [
    Workload { name: "randread 4k QD1", read: true, random: true, block_size: 4096, queue_depth: 1 },
    Workload { name: "randread 4k QD32", read: true, random: true, block_size: 4096, queue_depth: 32 },
    Workload { name: "randwrite 4k QD32", read: false, random: true, block_size: 4096, queue_depth: 32 },
    Workload { name: "seqread 128k QD8", read: true, random: false, block_size: 128 * 1024, queue_depth: 8 },
];

pub(crate) struct Row {
    pub(crate) workload: &'static str,
    pub(crate) queues: usize,
    pub(crate) server: String,
    pub(crate) iops: f64,
    pub(crate) p50_us: f64,
    pub(crate) p99_us: f64,
    pub(crate) cpu_us_per_io: f64,
    pub(crate) errors: u64,
}

/// Append a Markdown `text` (and a newline) to the file at `path`, made if missing: every table's `--markdown`.
pub(crate) fn append_markdown(path: &std::path::Path, text: &str) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    writeln!(f, "{text}").with_context(|| format!("appending to {}", path.display()))
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::VhostUser(args) => vhost_user(args),
        Command::XenEmulated(args) => {
            let table = xen_emulated::run(&args)?;
            println!("{table}");
            Ok(())
        }
        Command::Memory(args) => memory(args),
        Command::LabTable(args) => {
            println!("{}", lab::run(&args)?);
            Ok(())
        }
        Command::LabCpuTable(args) => {
            println!("{}", lab_cpu::run(&args)?);
            Ok(())
        }
        Command::SyscallCost(args) => {
            println!("{}", syscall_cost::run(&args)?);
            Ok(())
        }
        Command::MicroTable(args) => {
            println!("{}", micro::run(&args)?);
            Ok(())
        }
    }
}

/// Start blkbackd per queue count, sample its memory, drive every queue for a second (4 KiB random reads at
/// QD32, then 128 KiB sequential reads at QD8), let it idle with the frontend connected, sample again, and
/// measure its CPU use while idle (e.g. with `--extra="--poll-us 50"`: a poller must go back to sleep).
fn memory(args: MemoryArgs) -> Result<()> {
    const SIZE: u64 = 64 << 20;
    /// How long the idle, connected server's CPU use is sampled.
    const IDLE_CPU_WINDOW: Duration = Duration::from_secs(2);
    let disk = args.dir.join(format!("blkback-mem-{}.img", std::process::id()));
    fill_disk(&disk, SIZE).with_context(|| format!("creating {}", disk.display()))?;
    let _cleanup = RemoveOnDrop(disk.clone());
    let server = Server::Blkbackd {
        binary: args.blkbackd.clone(),
        extra: args.extra.split_whitespace().map(str::to_string).collect(),
    };
    let mut table = String::from(
        "| queues | threads | RSS at start KiB | RSS idle after I/O KiB | private (anon) KiB | binary (file) KiB | guest RAM touched (shmem) KiB | CPU % idle, connected |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    for &queues in &args.queues {
        let running = Running::start(&server, &disk, &args.dir, queues)?;
        std::thread::sleep(Duration::from_millis(200));
        let start = running.memory()?;
        let socket = running.socket().to_string_lossy().into_owned();
        let mut idle = None;
        client::run(&socket, queues, WORKLOADS[1], Duration::from_millis(500), SIZE)?;
        let mut idle_cpu = Duration::ZERO;
        client::run_and_hold(&socket, queues, WORKLOADS[3], Duration::from_millis(500), SIZE, &mut || {
            std::thread::sleep(Duration::from_millis(500));
            idle = Some(running.memory()?);
            let cpu0 = running.cpu_time()?;
            std::thread::sleep(IDLE_CPU_WINDOW);
            idle_cpu = running.cpu_time()?.saturating_sub(cpu0);
            Ok(())
        })?;
        let idle = idle.context("no sample")?;
        table.push_str(&format!(
            "| {queues} | {} | {} | {} | {} | {} | {} | {:.2} |\n",
            idle.threads,
            start.rss,
            idle.rss,
            idle.anon,
            idle.file,
            idle.shmem,
            idle_cpu.as_secs_f64() * 100.0 / IDLE_CPU_WINDOW.as_secs_f64()
        ));
    }
    println!("{table}");
    if let Some(path) = args.markdown {
        append_markdown(&path, &table)?;
    }
    Ok(())
}

fn vhost_user(args: VhostUserArgs) -> Result<()> {
    let disk = args.dir.join(format!("blkback-bench-{}.img", std::process::id()));
    let disk_bytes = args.size_mib * 1024 * 1024;
    fill_disk(&disk, disk_bytes).with_context(|| format!("creating {}", disk.display()))?;
    let _cleanup = RemoveOnDrop(disk.clone());
    // Everyone opens the file with O_DIRECT (tmpfs supports it since Linux 6.6); say so when it does not work.
    let direct_note = match direct_io_works(&disk) {
        Ok(()) => format!("O_DIRECT on {}: works.", args.dir.display()),
        Err(error) => {
            let note = format!("O_DIRECT on {}: FAILS ({error}); the servers fall back or fail.", args.dir.display());
            eprintln!("note: {note}");
            note
        }
    };
    let mut servers = vec![Server::Qsd, Server::Blkbackd { binary: args.blkbackd.clone(), extra: vec![] }];
    for v in &args.variant {
        servers.push(Server::Blkbackd {
            binary: args.blkbackd.clone(),
            extra: v.split_whitespace().map(str::to_string).collect(),
        });
    }
    if let Some(binary) = ch_block(&args) {
        servers.push(Server::CloudHypervisor { binary });
    }
    if !args.no_raw {
        servers.push(Server::RawFio);
    }
    let duration = Duration::from_secs(args.seconds);
    let mut rows: Vec<Row> = Vec::new();
    for &queues in &args.queues {
        for workload in WORKLOADS {
            if !args.only.is_empty() && !args.only.iter().any(|o| workload.name.contains(o.as_str())) {
                continue;
            }
            let mut per_server: Vec<Vec<Sample>> = (0..servers.len()).map(|_| Vec::new()).collect();
            for round in 0..args.rounds {
                // Alternate the order so neither server always runs on a warmer cache.
                let order: Vec<usize> =
                    if round % 2 == 0 { (0..servers.len()).collect() } else { (0..servers.len()).rev().collect() };
                for i in order {
                    let sample = measure(&servers[i], &disk, &args.dir, queues, workload, duration, disk_bytes)
                        .with_context(|| format!("{} {}", servers[i].label(), workload.name))?;
                    eprintln!(
                        "  {:<28} {:<20} q{} round {}: {:>9.0} IOPS",
                        servers[i].label(),
                        workload.name,
                        queues,
                        round + 1,
                        sample.measured.iops()
                    );
                    per_server[i].push(sample);
                }
            }
            for (i, runs) in per_server.iter().enumerate() {
                rows.push(merge(workload.name, queues, servers[i].label(), runs));
            }
        }
    }
    let mut table = format!("{direct_note}\n\n{}", render(&rows));
    if let Some(scaling) = scaling::render_scaling(&rows) {
        table.push_str(
            "\nCPU per I/O per queue count (×qsd: same queue count; ×own 1-queue: the same server with one queue):\n\n",
        );
        table.push_str(&scaling);
    }
    if let Some(vs_raw) = scaling::render_vs_raw(&rows) {
        table.push_str("\nAgainst raw fio on the same file (latency added: the server's percentile minus fio's):\n\n");
        table.push_str(&vs_raw);
    }
    println!("{table}");
    if let Some(path) = args.markdown {
        append_markdown(&path, &table)?;
    }
    Ok(())
}

/// cloud-hypervisor's `vhost_user_block`: the one given, or the one on `PATH` (unless `--no-ch`).
fn ch_block(args: &VhostUserArgs) -> Option<PathBuf> {
    if args.no_ch {
        return None;
    }
    if let Some(path) = &args.ch_block {
        return Some(path.clone());
    }
    let found = std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|d| d.join("vhost_user_block")).find(|p| p.is_file()));
    if found.is_none() {
        eprintln!("note: no vhost_user_block on PATH: the cloud-hypervisor row is left out (see --ch-block)");
    }
    found
}

/// One measurement of one contender.
struct Sample {
    measured: client::Measured,
    /// CPU time the server used (fio: its own, submitting and reaping included).
    cpu: Duration,
    /// Latency percentiles (p50, p99) in µs where the contender reports them itself (fio) instead of the client's
    /// histogram.
    percentiles: Option<(f64, f64)>,
}

/// Run `workload` once against `server` (started for this run; fio runs on the file itself).
fn measure(
    server: &Server,
    disk: &std::path::Path,
    dir: &std::path::Path,
    queues: usize,
    workload: Workload,
    duration: Duration,
    disk_bytes: u64,
) -> Result<Sample> {
    if let Server::RawFio = server {
        let f = servers::fio(disk, workload, queues, duration, disk_bytes)?;
        let measured = client::Measured { ios: f.ios, elapsed: f.elapsed, ..Default::default() };
        return Ok(Sample { measured, cpu: f.cpu, percentiles: Some((f.p50_us, f.p99_us)) });
    }
    let running = Running::start(server, disk, dir, queues)?;
    let cpu0 = running.cpu_time()?;
    let socket = running.socket().to_string_lossy().into_owned();
    let measured = client::run(&socket, queues, workload, duration, disk_bytes)?;
    let cpu = running.cpu_time()?.saturating_sub(cpu0);
    Ok(Sample { measured, cpu, percentiles: None })
}

/// The table row of a contender's rounds: counts and histograms merged (reported percentiles averaged).
fn merge(workload: &'static str, queues: usize, server: String, runs: &[Sample]) -> Row {
    let mut merged = client::Measured::default();
    let mut cpu = Duration::ZERO;
    let (mut p50, mut p99, mut reported) = (0.0, 0.0, 0usize);
    for s in runs {
        merged.ios += s.measured.ios;
        merged.errors += s.measured.errors;
        merged.elapsed += s.measured.elapsed;
        merged.latency.merge(&s.measured.latency);
        cpu += s.cpu;
        if let Some((a, b)) = s.percentiles {
            (p50, p99, reported) = (p50 + a, p99 + b, reported + 1);
        }
    }
    let (p50_us, p99_us) = if reported > 0 {
        (p50 / reported as f64, p99 / reported as f64)
    } else {
        (merged.latency.quantile(0.50).as_secs_f64() * 1e6, merged.latency.quantile(0.99).as_secs_f64() * 1e6)
    };
    Row {
        workload,
        queues,
        server,
        iops: merged.iops(),
        p50_us,
        p99_us,
        cpu_us_per_io: cpu.as_secs_f64() * 1e6 / merged.ios.max(1) as f64,
        errors: merged.errors,
    }
}

fn render(rows: &[Row]) -> String {
    let mut out = String::from(
        "| workload | queues | server | IOPS | ×qsd | ×ch | ×raw | p50 µs | p99 µs | server CPU µs/IO | CPU ×qsd | errors |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let find = |pred: &dyn Fn(&Row) -> bool| {
            rows.iter().find(|b| b.workload == r.workload && b.queues == r.queues && pred(b))
        };
        // A ratio to a contender left out of this run is a dash, not NaN.
        let versus = |pred: &dyn Fn(&Row) -> bool, of: &dyn Fn(&Row) -> f64| {
            find(pred).map_or_else(|| "—".to_string(), |b| format!("{:.2}", of(r) / of(b).max(1e-9)))
        };
        let iops = |x: &Row| x.iops;
        let ratio = versus(&|b| b.server.starts_with("qemu"), &iops);
        let cpu_ratio = versus(&|b| b.server.starts_with("qemu"), &|x| x.cpu_us_per_io);
        let ch = versus(&|b| b.server.starts_with("cloud-hypervisor"), &iops);
        let raw = versus(&|b| b.server == servers::RAW_LABEL, &iops);
        out.push_str(&format!(
            "| {} | {} | {} | {:.0} | {} | {} | {} | {:.1} | {:.1} | {:.2} | {} | {} |\n",
            r.workload,
            r.queues,
            r.server,
            r.iops,
            ratio,
            ch,
            raw,
            r.p50_us,
            r.p99_us,
            r.cpu_us_per_io,
            cpu_ratio,
            r.errors
        ));
    }
    out
}

/// Write real data over the whole file so reads hit allocated blocks (a sparse file would flatter everyone).
pub(crate) fn fill_disk(path: &std::path::Path, bytes: u64) -> Result<()> {
    let mut f = std::fs::File::create(path)?;
    let chunk: Vec<u8> = (0..1024 * 1024u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        f.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    f.sync_all()?;
    Ok(())
}

/// Open `path` with O_DIRECT and read its first 4 KiB into an aligned buffer.
fn direct_io_works(path: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(path)?;
    let layout = std::alloc::Layout::from_size_align(4096, 4096).map_err(std::io::Error::other)?;
    // SAFETY: a non-zero size layout; freed below with the same layout.
    let buf = unsafe { std::alloc::alloc(layout) };
    if buf.is_null() {
        return Err(std::io::Error::other("out of memory"));
    }
    // SAFETY: `buf` points to 4096 writable bytes, owned here until the dealloc below.
    let result = file.read_at(unsafe { std::slice::from_raw_parts_mut(buf, 4096) }, 0).map(|_| ());
    // SAFETY: allocated above with this layout.
    unsafe { std::alloc::dealloc(buf, layout) };
    result
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(server: &str, iops: f64, cpu_us_per_io: f64) -> Row {
        let server = server.to_string();
        Row { workload: "randread 4k QD1", queues: 1, server, iops, p50_us: 1.0, p99_us: 2.0, cpu_us_per_io, errors: 0 }
    }

    #[test]
    fn ratios_to_contenders_left_out_are_dashes() {
        let rows = [row("qemu-storage-daemon", 100.0, 4.0), row("blkbackd", 150.0, 2.0)];
        let table = render(&rows);
        assert!(table.contains("| randread 4k QD1 | 1 | blkbackd | 150 | 1.50 | — | — | 1.0 | 2.0 | 2.00 | 0.50 | 0 |"));
        assert!(!table.contains("NaN"), "{table}");
        let raw = [row(servers::RAW_LABEL, 200.0, 1.0), row("blkbackd", 150.0, 2.0)];
        assert!(render(&raw).contains("| blkbackd | 150 | — | — | 0.75 |"), "{}", render(&raw));
    }
}
