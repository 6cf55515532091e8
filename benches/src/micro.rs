// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `blkback-bench micro-table`: the criterion micro-benchmarks' results (`cargo bench -p device-blk -p
//! transport-xen`) as one Markdown table, read from criterion's `<target>/criterion/**/new/*.json`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{ensure, Context, Result};
use serde_json::Value;

/// Options of the table.
#[derive(clap::Args, Debug)]
pub struct MicroTableArgs {
    /// Criterion's output directory (`<target dir>/criterion`).
    #[arg(long, default_value = "target/criterion")]
    criterion_dir: PathBuf,
    /// Only results written at or after this time (seconds since the epoch), i.e. by this run.
    #[arg(long)]
    since: Option<u64>,
    /// Append the Markdown table to this file.
    #[arg(long)]
    markdown: Option<PathBuf>,
}

/// One benchmark's result.
#[derive(Clone, Debug, PartialEq)]
struct BenchResult {
    group: String,
    function: String,
    /// When criterion wrote it (results are listed in the order they ran).
    written: SystemTime,
    median_ns: f64,
    mean_ns: f64,
    mean_low_ns: f64,
    mean_high_ns: f64,
}

/// Collect the results and render the table (also appended to `--markdown`).
pub fn run(args: &MicroTableArgs) -> Result<String> {
    let since = args.since.map(|s| UNIX_EPOCH + Duration::from_secs(s));
    let mut results = Vec::new();
    collect(&args.criterion_dir, since, &mut results)
        .with_context(|| format!("reading {}", args.criterion_dir.display()))?;
    ensure!(!results.is_empty(), "no criterion results in {} (run `cargo bench` first)", args.criterion_dir.display());
    results.sort_by_key(|r| r.written);
    let table = render(&results);
    if let Some(path) = &args.markdown {
        crate::append_markdown(path, &table)?;
    }
    Ok(table)
}

/// Every `new/` result below `dir` written at or after `since`.
fn collect(dir: &Path, since: Option<SystemTime>, out: &mut Vec<BenchResult>) -> Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if !path.is_dir() {
            continue;
        }
        if path.file_name().is_some_and(|n| n == "new") {
            let (estimates, bench) = (path.join("estimates.json"), path.join("benchmark.json"));
            // A benchmark interrupted mid-way leaves an incomplete directory: not a result.
            let written = std::fs::metadata(&estimates).and_then(|m| m.modified());
            if let (Ok(written), true) = (written, bench.is_file()) {
                if since.is_none_or(|s| written >= s) {
                    out.push(parse(&read_json(&bench)?, &read_json(&estimates)?, written)?);
                }
            }
        } else {
            collect(&path, since, out)?;
        }
    }
    Ok(())
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

fn parse(bench: &Value, estimates: &Value, written: SystemTime) -> Result<BenchResult> {
    let text = |v: &Value, what: &str| v.as_str().map(str::to_string).with_context(|| format!("no {what}"));
    let ns = |v: &Value, what: &str| v.as_f64().with_context(|| format!("no {what}"));
    let mean = &estimates["mean"];
    Ok(BenchResult {
        group: text(&bench["group_id"], "group_id")?,
        function: bench["function_id"].as_str().unwrap_or_default().to_string(),
        written,
        median_ns: ns(&estimates["median"]["point_estimate"], "median")?,
        mean_ns: ns(&mean["point_estimate"], "mean")?,
        mean_low_ns: ns(&mean["confidence_interval"]["lower_bound"], "mean lower bound")?,
        mean_high_ns: ns(&mean["confidence_interval"]["upper_bound"], "mean upper bound")?,
    })
}

fn render(results: &[BenchResult]) -> String {
    let mut out = String::from("| benchmark | case | ns (median) | ns (mean, 95 % CI) |\n|---|---|---|---|\n");
    for r in results {
        let _ = writeln!(
            out,
            "| {} | {} | {:.1} | {:.1} [{:.1}, {:.1}] |",
            r.group, r.function, r.median_ns, r.mean_ns, r.mean_low_ns, r.mean_high_ns
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn criterion_results_become_rows() {
        let dir = std::env::temp_dir().join(format!("blkback-micro-{}", std::process::id()));
        let new = dir.join("group x").join("case y").join("new");
        std::fs::create_dir_all(&new).expect("dirs");
        let bench = r#"{"group_id":"blkif parse+validate x86_64","function_id":"direct read 4k (1 segment)"}"#;
        let estimates = r#"{"mean":{"point_estimate":21.5,"confidence_interval":{"lower_bound":21.0,"upper_bound":22.25}},
                            "median":{"point_estimate":21.25}}"#;
        std::fs::write(new.join("benchmark.json"), bench).expect("write");
        std::fs::write(new.join("estimates.json"), estimates).expect("write");
        // A `base/` copy (criterion's previous run) is not a result of this run.
        std::fs::create_dir_all(dir.join("group x").join("case y").join("base")).expect("dirs");
        let args = MicroTableArgs { criterion_dir: dir.clone(), since: Some(0), markdown: None };
        let table = run(&args).expect("table");
        assert!(
            table.contains("| blkif parse+validate x86_64 | direct read 4k (1 segment) | 21.2 | 21.5 [21.0, 22.2] |"),
            "{table}"
        );
        let later = MicroTableArgs { since: Some(4_000_000_000), ..args };
        assert!(run(&later).is_err(), "nothing new");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
