//! `blkback-bench xen-emulated`: the Xen data path on the emulated host (the blkfront emulator driving the shared
//! ring with real grants in memfd guest memory, our backend on io_uring) against raw host io_uring (fio) on the
//! same O_DIRECT file, alternating, as ratios.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use device_blk::EngineKind;
use transport_xen::dataplane::DataplaneOptions;
use transport_xen::emulated::EmulatedHost;
use transport_xen::frontend::load::{fill_and_verify, random_load_mix};
use transport_xen::frontend::{BackendThread, Blkfront, BlkfrontConfig, DiskSpec, Indirect, Toolstack, XVDA};
use transport_xen::grant_memory::GrantMode;
use transport_xen::xenbus::{BackendConfig, DataplaneServer, Scope};

/// Options of the run.
#[derive(clap::Args, Debug)]
pub struct XenEmulatedArgs {
    /// Seconds per measurement.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Rounds (contenders alternate their order each round).
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Disk file size in MiB.
    #[arg(long, default_value_t = 256)]
    size_mib: u64,
    /// Directory of the disk file (must support O_DIRECT).
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
    /// Also measure grant copy (in place of grant map).
    #[arg(long)]
    copy: bool,
}

struct Workload {
    name: &'static str,
    read_percent: usize,
    depth: usize,
    fio_rw: &'static str,
}

const WORKLOADS: [Workload; 3] = [
    Workload { name: "randread 4k QD1", read_percent: 100, depth: 1, fio_rw: "randread" },
    Workload { name: "randread 4k QD32", read_percent: 100, depth: 32, fio_rw: "randread" },
    Workload { name: "randwrite 4k QD32", read_percent: 0, depth: 32, fio_rw: "randwrite" },
];

#[derive(Default, Clone, Copy)]
struct Figure {
    iops: f64,
    p50_us: f64,
    p99_us: f64,
}

/// Run the comparison and return the Markdown table.
pub fn run(args: &XenEmulatedArgs) -> Result<String> {
    let disk = args.dir.join(format!("blkback-bench-xen-{}.img", std::process::id()));
    let bytes = args.size_mib << 20;
    // Real data everywhere: reads of a sparse file's holes would flatter the raw baseline.
    crate::fill_disk(&disk, bytes).with_context(|| format!("creating {}", disk.display()))?;
    let _cleanup = Remove(disk.clone());
    let duration = Duration::from_secs(args.seconds);
    let mut modes = vec![("blkbackd (grant map, persistent)", GrantMode::Map, true)];
    if args.copy {
        modes.push(("blkbackd (grant copy)", GrantMode::Copy, false));
    }
    let mut rows =
        String::from("| workload | contender | IOPS | ×raw | p50 µs | p99 µs |\n|---|---|---|---|---|---|\n");
    for w in &WORKLOADS {
        let mut raw = Vec::new();
        let mut ours: Vec<Vec<Figure>> = vec![Vec::new(); modes.len()];
        for round in 0..args.rounds {
            let raw_first = round % 2 == 0;
            if raw_first {
                raw.push(fio(&disk, w, args.seconds)?);
            }
            for (i, &(_, mode, persistent)) in modes.iter().enumerate() {
                ours[i].push(emulated(&disk, bytes, w, duration, mode, persistent, round as u64)?);
            }
            if !raw_first {
                raw.push(fio(&disk, w, args.seconds)?);
            }
        }
        let raw = mean(&raw);
        rows.push_str(&format!(
            "| {} | raw io_uring (fio) | {:.0} | 1.00 | {:.1} | {:.1} |\n",
            w.name, raw.iops, raw.p50_us, raw.p99_us
        ));
        for (i, (label, ..)) in modes.iter().enumerate() {
            let f = mean(&ours[i]);
            rows.push_str(&format!(
                "| {} | {} | {:.0} | {:.2} | {:.1} | {:.1} |\n",
                w.name,
                label,
                f.iops,
                f.iops / raw.iops.max(1e-9),
                f.p50_us,
                f.p99_us
            ));
        }
    }
    Ok(rows)
}

fn mean(v: &[Figure]) -> Figure {
    let n = v.len().max(1) as f64;
    Figure {
        iops: v.iter().map(|f| f.iops).sum::<f64>() / n,
        p50_us: v.iter().map(|f| f.p50_us).sum::<f64>() / n,
        p99_us: v.iter().map(|f| f.p99_us).sum::<f64>() / n,
    }
}

/// One measurement through the emulated host: backend, blkfront handshake, fill, random load.
fn emulated(
    disk: &Path,
    bytes: u64,
    w: &Workload,
    duration: Duration,
    mode: GrantMode,
    persistent: bool,
    seed: u64,
) -> Result<Figure> {
    let host = EmulatedHost::new()?;
    let options = DataplaneOptions { grant_mode: mode, ..DataplaneOptions::default() };
    let rings = DataplaneServer::new(Arc::new(host.grant_table(0)), host.evtchn_opener(0), EngineKind::Auto, options);
    let backend = BackendThread::spawn(&host, Arc::new(rings), BackendConfig::default(), Scope::AllDomains)?;
    let guest = host.add_guest(1, 8192)?;
    let toolstack = Toolstack::new(Arc::new(host.xenstore()?));
    toolstack.add_disk(&DiskSpec::new(1, disk.to_str().context("disk path is not UTF-8")?))?;
    let config =
        BlkfrontConfig { ring_page_order: 2, persistent, indirect: Indirect::WhenNeeded, ..Default::default() };
    let mut front = Blkfront::connect(&guest, XVDA, config)?;
    let sectors = front.info().sectors;
    if sectors * 512 != bytes {
        bail!("backend reports {sectors} sectors");
    }
    fill_and_verify(&mut front, sectors, 128 << 10, 16, 1)?;
    let blocks = usize::try_from(bytes / 4096)?;
    let mut gens = vec![1u32; blocks];
    let stats = random_load_mix(&mut front, &mut gens, 4096, w.depth, duration, seed, w.read_percent)?;
    front.close()?;
    backend.stop()?;
    Ok(Figure { iops: stats.iops(), p50_us: stats.p50.as_secs_f64() * 1e6, p99_us: stats.p99.as_secs_f64() * 1e6 })
}

/// Raw host io_uring on the same file: fio, O_DIRECT, same block size and depth.
fn fio(disk: &Path, w: &Workload, seconds: u64) -> Result<Figure> {
    let out = Command::new("fio")
        .args([
            "--name=raw",
            &format!("--filename={}", disk.display()),
            &format!("--rw={}", w.fio_rw),
            "--bs=4k",
            &format!("--iodepth={}", w.depth),
            "--ioengine=io_uring",
            "--direct=1",
            &format!("--runtime={seconds}"),
            "--time_based=1",
            "--randrepeat=0",
            "--output-format=terse",
            "--terse-version=3",
        ])
        .output()
        .context("running fio (scripts/install-deps installs it)")?;
    if !out.status.success() {
        bail!("fio failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.starts_with("3;")).context("no terse line from fio")?;
    let fields: Vec<&str> = line.split(';').collect();
    // Terse v3: read IOPS is field 8, write IOPS field 49 (1-based); each direction's completion-latency
    // percentiles follow as "P%=usec" fields, reads first.
    let (iops_field, section) = if w.read_percent > 0 { (7, 0) } else { (48, 1) };
    let iops: f64 = fields.get(iops_field).context("terse IOPS")?.parse()?;
    let pct = |p: &str| -> f64 {
        fields.iter().filter_map(|f| f.strip_prefix(p)).nth(section).and_then(|v| v.parse().ok()).unwrap_or(f64::NAN)
    };
    Ok(Figure { iops, p50_us: pct("50.000000%="), p99_us: pct("99.000000%=") })
}

struct Remove(PathBuf);

impl Drop for Remove {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
