// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `blkback-bench lab-cpu-table`: the backend's CPU time per I/O in the real Xen lab, kernel blkback vs QEMU qdisk
//! vs `blkbackd xen`, from the `cpu-per-io:` lines of `benches/lab/cpu-per-io.sh` (one per peer, job and round),
//! as Markdown: per job and peer the median IOPS, CPU µs per I/O and context switches per I/O, then blkbackd's
//! ratios to both peers against the targets of issue 14 (CPU per I/O ≤ 0.5× qdisk's and ≤ 1.0× kernel blkback's,
//! IOPS ≥ 1.0× both), and its CPU per I/O against the `raw` run's (fio in dom0 on the same kind of loop device, no
//! guest: the floor of a userspace backend's I/O path there).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{ensure, Context, Result};

/// Options of the table.
#[derive(clap::Args, Debug)]
pub struct LabCpuTableArgs {
    /// The dom0 script's output (`xen-lab exec 'bash /mnt/host/bin/cpu-per-io.sh' > FILE`).
    #[arg(long)]
    input: PathBuf,
    /// Append the Markdown tables to this file.
    #[arg(long)]
    markdown: Option<PathBuf>,
}

/// One run of one peer on one job.
#[derive(Debug, Clone, PartialEq)]
struct Run {
    peer: String,
    job: String,
    round: u32,
    /// Read + write IOPS.
    iops: f64,
    /// The backend's CPU time per I/O (µs).
    us_per_io: f64,
    /// The part of it spent in user space (µs), if given.
    user_us_per_io: Option<f64>,
    /// All of dom0's busy CPU time per I/O in the same window (µs), if given.
    dom0_us_per_io: Option<f64>,
    /// The backend's context switches per I/O, if given.
    switches_per_io: Option<f64>,
}

/// A `cpu-per-io:` line's `key=value` fields; `None` for another line.
fn fields(line: &str) -> Option<BTreeMap<&str, &str>> {
    let rest = line.trim_end().split_once("cpu-per-io: ")?.1;
    Some(rest.split_whitespace().filter_map(|kv| kv.split_once('=')).collect())
}

/// The successful runs, and the failed ones as `peer job round: why`.
fn parse(text: &str) -> (Vec<Run>, Vec<String>) {
    let mut runs = Vec::new();
    let mut failed = Vec::new();
    for line in text.lines() {
        let Some(f) = fields(line) else { continue };
        let get = |key: &str| f.get(key).copied().unwrap_or("?");
        let number = |key: &str| f.get(key).and_then(|v| v.parse::<f64>().ok());
        let name = format!("{} {} round {}", get("peer"), get("job"), get("round"));
        if get("status") != "ok" {
            failed.push(format!("{name}: {}", get("why")));
            continue;
        }
        let (Some(read), Some(write), Some(us_per_io), Some(round)) = (
            number("read_iops"),
            number("write_iops"),
            number("us_per_io"),
            f.get("round").and_then(|v| v.parse().ok()),
        ) else {
            failed.push(format!("{name}: unreadable line"));
            continue;
        };
        runs.push(Run {
            peer: get("peer").to_string(),
            job: get("job").to_string(),
            round,
            iops: read + write,
            us_per_io,
            user_us_per_io: number("user_us_per_io"),
            dom0_us_per_io: number("dom0_us_per_io"),
            switches_per_io: number("switches_per_io"),
        });
    }
    (runs, failed)
}

fn median(values: &mut [f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    Some(if values.len().is_multiple_of(2) { f64::midpoint(values[mid - 1], values[mid]) } else { values[mid] })
}

/// Median IOPS, µs per I/O (all, in user space), dom0 µs per I/O and context switches per I/O of one peer on one
/// job.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Medians {
    iops: f64,
    us_per_io: f64,
    user_us_per_io: Option<f64>,
    dom0_us_per_io: Option<f64>,
    switches_per_io: Option<f64>,
}

fn medians(runs: &[&Run]) -> Option<Medians> {
    let mut iops: Vec<f64> = runs.iter().map(|r| r.iops).collect();
    let mut cpu: Vec<f64> = runs.iter().map(|r| r.us_per_io).collect();
    let mut user: Vec<f64> = runs.iter().filter_map(|r| r.user_us_per_io).collect();
    let mut dom0: Vec<f64> = runs.iter().filter_map(|r| r.dom0_us_per_io).collect();
    let mut switches: Vec<f64> = runs.iter().filter_map(|r| r.switches_per_io).collect();
    Some(Medians {
        iops: median(&mut iops)?,
        us_per_io: median(&mut cpu)?,
        user_us_per_io: median(&mut user),
        dom0_us_per_io: median(&mut dom0),
        switches_per_io: median(&mut switches),
    })
}

const PEERS: [(&str, &str); 4] = [
    ("kernel", "kernel blkback"),
    ("qdisk", "QEMU qdisk"),
    ("blkbackd", "blkbackd xen"),
    ("raw", "raw io_uring in dom0 (fio, no guest)"),
];

fn job_label(job: &str) -> String {
    match job {
        "4k" => "randrw 50/50 4k QD16".to_string(),
        "1m" => "randrw 50/50 1M QD4".to_string(),
        other => other.to_string(),
    }
}

/// The two tables.
fn render(runs: &[Run], failed: &[String]) -> Result<String> {
    let mut jobs: Vec<&str> = Vec::new();
    for run in runs {
        if !jobs.contains(&run.job.as_str()) {
            jobs.push(&run.job);
        }
    }
    let mut out = String::from(
        "| fio job (domU) | backend | runs | read+write IOPS per run | median IOPS | backend CPU µs/I/O per run | \
         median µs/I/O | of it in user space (median) | context switches per I/O (median) | dom0 busy µs/I/O (median) \
         |\n|---|---|---|---|---|---|---|---|---|---|\n",
    );
    // The four peers first, then any other (e.g. `blkbackd-before`, an older build side by side).
    let mut peers: Vec<(&str, &str)> = PEERS.to_vec();
    for run in runs {
        if !peers.iter().any(|(p, _)| *p == run.peer) {
            peers.push((&run.peer, &run.peer));
        }
    }
    let mut by_job: BTreeMap<&str, BTreeMap<&str, Medians>> = BTreeMap::new();
    for job in &jobs {
        for &(peer, label) in &peers {
            let mut these: Vec<&Run> = runs.iter().filter(|r| r.job == *job && r.peer == peer).collect();
            these.sort_by_key(|r| r.round);
            let Some(m) = medians(&these) else { continue };
            by_job.entry(job).or_default().insert(peer, m);
            let per_run = |f: fn(&Run) -> f64, digits: usize| {
                these.iter().map(|r| format!("{:.digits$}", f(r))).collect::<Vec<_>>().join(", ")
            };
            writeln!(
                out,
                "| {} | {label} | {} | {} | {:.0} | {} | {:.1} | {} | {} | {} |",
                job_label(job),
                these.len(),
                per_run(|r| r.iops, 0),
                m.iops,
                per_run(|r| r.us_per_io, 1),
                m.us_per_io,
                m.user_us_per_io.map_or("—".to_string(), |v| format!("{v:.1}")),
                m.switches_per_io.map_or("—".to_string(), |v| format!("{v:.3}")),
                m.dom0_us_per_io.map_or("—".to_string(), |v| format!("{v:.0}")),
            )?;
        }
    }
    out.push_str(
        "\n| fio job (domU) | blkbackd/qdisk CPU per I/O (target ≤ 0.5) | blkbackd/kernel CPU per I/O (target ≤ 1.0) | \
         blkbackd/qdisk IOPS (target ≥ 1.0) | blkbackd/kernel IOPS (target ≥ 1.0) | blkbackd/raw CPU per I/O (no \
         target: raw is the floor) |\n|---|---|---|---|---|---|\n",
    );
    for job in &jobs {
        let Some(m) = by_job.get(job) else { continue };
        let ratio = |peer: &str, cpu: bool, target: Option<f64>| -> String {
            let (Some(ours), Some(theirs)) = (m.get("blkbackd"), m.get(peer)) else { return "—".to_string() };
            let (a, b) = if cpu { (ours.us_per_io, theirs.us_per_io) } else { (ours.iops, theirs.iops) };
            if b <= 0.0 {
                return "—".to_string();
            }
            let r = a / b;
            let Some(target) = target else { return format!("{r:.2}") };
            let met = if cpu { r <= target } else { r >= target };
            format!("{r:.2} ({})", if met { "met" } else { "missed" })
        };
        writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} |",
            job_label(job),
            ratio("qdisk", true, Some(0.5)),
            ratio("kernel", true, Some(1.0)),
            ratio("qdisk", false, Some(1.0)),
            ratio("kernel", false, Some(1.0)),
            ratio("raw", true, None),
        )?;
    }
    if !failed.is_empty() {
        writeln!(out, "\nFailed runs (left out): {}.", failed.join("; "))?;
    }
    ensure!(!runs.is_empty(), "no successful cpu-per-io runs{}", if failed.is_empty() { "" } else { " (all failed)" });
    Ok(out)
}

/// Render the tables (also appended to `--markdown`).
pub fn run(args: &LabCpuTableArgs) -> Result<String> {
    let text = std::fs::read_to_string(&args.input)
        .with_context(|| format!("reading the cpu-per-io output {}", args.input.display()))?;
    let (runs, failed) = parse(&text);
    let out = render(&runs, &failed).with_context(|| format!("in {}", args.input.display()))?;
    if let Some(path) = &args.markdown {
        crate::append_markdown(path, &out)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const OUTPUT: &str = "\
cpu-note: [631.07] dom0 6.1.0-57-amd64, 2 vCPUs, CLK_TCK=100; rounds=2
cpu-per-io: peer=kernel job=4k round=1 status=ok read_iops=400 write_iops=410 ios=12150 runtime_ms=15000 backend_cpu_ms=600 us_per_io=49.4 dom0_busy_ms=9000 dom0_us_per_io=740.7 tasks=1
cpu-note: peer=kernel job=4k round=1 domid=1 ticks per pid: 321:60
cpu-per-io: peer=qdisk job=4k round=1 status=ok read_iops=300 write_iops=300 ios=9000 runtime_ms=15000 backend_cpu_ms=1800 us_per_io=200.0 dom0_busy_ms=9000 dom0_us_per_io=1000.0 tasks=1
cpu-per-io: peer=blkbackd job=4k round=1 status=ok read_iops=420 write_iops=420 ios=12600 runtime_ms=15000 backend_cpu_ms=1000 us_per_io=79.4 user_us_per_io=20.0 switches_per_io=0.150 tasks=2
cpu-per-io: peer=blkbackd job=4k round=2 status=ok read_iops=440 write_iops=440 ios=13200 runtime_ms=15000 backend_cpu_ms=1000 us_per_io=75.8 user_us_per_io=30.0 tasks=2
cpu-per-io: peer=blkbackd job=4k round=3 status=ok read_iops=400 write_iops=400 ios=12000 runtime_ms=15000 backend_cpu_ms=1000 us_per_io=83.3 user_us_per_io=10.0 tasks=2
cpu-per-io: peer=kernel job=1m round=1 status=ok read_iops=20 write_iops=20 ios=600 runtime_ms=15000 backend_cpu_ms=60 us_per_io=100.0 tasks=1
cpu-per-io: peer=blkbackd job=1m round=1 status=ok read_iops=10 write_iops=10 ios=300 runtime_ms=15000 backend_cpu_ms=60 us_per_io=200.0 tasks=2
cpu-per-io: peer=qdisk job=1m round=1 status=fail why=no-fio-start
cpu-per-io: peer=raw job=4k round=1 status=ok read_iops=2000 write_iops=2000 ios=60000 runtime_ms=15000 backend_cpu_ms=2382 us_per_io=39.7 user_us_per_io=15.0 dom0_busy_ms=15000 dom0_us_per_io=250.0 switches_per_io=0.050 tasks=1
cpu-per-io: peer=blkbackd-before job=1m round=1 status=ok read_iops=5 write_iops=5 ios=150 runtime_ms=15000 backend_cpu_ms=60 us_per_io=400.0 tasks=2
";

    #[test]
    fn parses_the_runs_and_the_failures() {
        let (runs, failed) = parse(OUTPUT);
        assert_eq!(runs.len(), 9);
        assert_eq!(
            runs[0],
            Run {
                peer: "kernel".into(),
                job: "4k".into(),
                round: 1,
                iops: 810.0,
                us_per_io: 49.4,
                user_us_per_io: None,
                dom0_us_per_io: Some(740.7),
                switches_per_io: None,
            }
        );
        assert_eq!(runs[2].dom0_us_per_io, None);
        assert_eq!(runs[2].user_us_per_io, Some(20.0));
        assert_eq!(runs[2].switches_per_io, Some(0.15));
        assert_eq!(failed, vec!["qdisk 1m round 1: no-fio-start".to_string()]);
    }

    #[test]
    fn renders_medians_and_ratios() {
        let (runs, failed) = parse(OUTPUT);
        let table = render(&runs, &failed).expect("table");
        // blkbackd 4k: median of 840, 880, 800 IOPS, of 79.4, 75.8, 83.3 µs and of 20, 30, 10 µs in user space
        assert!(
            table.contains(
                "| randrw 50/50 4k QD16 | blkbackd xen | 3 | 840, 880, 800 | 840 | 79.4, 75.8, 83.3 | 79.4 | 20.0 | 0.150 | — |"
            ),
            "{table}"
        );
        // CPU: 79.4 / 200 = 0.40 of qdisk's (met), 79.4 / 49.4 = 1.61 of the kernel's (missed);
        // IOPS: 840 / 600 = 1.40, 840 / 810 = 1.04; CPU 79.4 / 39.7 = 2.00 of raw's (no target)
        assert!(
            table.contains("| randrw 50/50 4k QD16 | 0.40 (met) | 1.61 (missed) | 1.40 (met) | 1.04 (met) | 2.00 |"),
            "{table}"
        );
        // raw gets its row, its IOPS not compared with a guest's
        assert!(
            table.contains(
                "| randrw 50/50 4k QD16 | raw io_uring in dom0 (fio, no guest) | 1 | 4000 | 4000 | 39.7 | 39.7 | 15.0 | \
                 0.050 | 250 |"
            ),
            "{table}"
        );
        // no qdisk or raw run at 1 MiB: their ratios are left blank
        assert!(table.contains("| randrw 50/50 1M QD4 | — | 2.00 (missed) | — | 0.50 (missed) | — |"), "{table}");
        assert!(table.contains("Failed runs (left out): qdisk 1m round 1: no-fio-start."), "{table}");
        // another peer gets its own row, after the three
        assert!(
            table.contains("| randrw 50/50 1M QD4 | blkbackd-before | 1 | 10 | 10 | 400.0 | 400.0 | — | — | — |"),
            "{table}"
        );
    }

    #[test]
    fn median_of_even_and_odd_counts() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&mut []), None);
    }

    #[test]
    fn no_run_is_an_error() {
        let (runs, failed) = parse("cpu-per-io: peer=kernel job=4k round=1 status=fail why=xl-create\n");
        assert!(runs.is_empty());
        assert!(render(&runs, &failed).is_err());
    }
}
