// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `blkback-bench lab-table`: the real Xen lab's side-by-side run (`xen-lab run-domu-fio --kernel --qdisk
//! --userspace …`) as one Markdown table with ratios, read from the run's `summary.txt`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{ensure, Context, Result};

/// Options of the table.
#[derive(clap::Args, Debug)]
pub struct LabTableArgs {
    /// The lab run's `summary.txt` (`$XENLAB_DIR/results/latest/summary.txt`).
    #[arg(long, default_value = "/tmp/xen-lab/results/latest/summary.txt")]
    summary: PathBuf,
    /// Append the Markdown table to this file.
    #[arg(long)]
    markdown: Option<PathBuf>,
}

/// One peer's rounds: (read IOPS, write IOPS, verified) per round.
#[derive(Debug, Default)]
struct Peer {
    rounds: Vec<(f64, f64, bool)>,
    job: String,
}

impl Peer {
    fn mean_total(&self) -> f64 {
        self.rounds.iter().map(|(r, w, _)| r + w).sum::<f64>() / self.rounds.len().max(1) as f64
    }
}

/// Parse `xen-lab: NAME#N JOB: read R IOPS, write W IOPS, verify OK` lines (`NAME JOB: ...` when the lab ran one
/// round), keyed by peer name.
fn parse(summary: &str) -> BTreeMap<String, Peer> {
    let mut peers: BTreeMap<String, Peer> = BTreeMap::new();
    for line in summary.lines() {
        let Some(rest) = line.strip_prefix("xen-lab: ") else { continue };
        let Some((peer, rest)) = rest.split_once(' ') else { continue };
        let name = peer.split_once('#').map_or(peer, |(name, _round)| name);
        let Some((job, figures)) = rest.split_once(": ") else { continue };
        let number_before = |key: &str| -> Option<f64> {
            let at = figures.find(key)?;
            figures[..at].split_whitespace().last()?.parse().ok()
        };
        let (Some(read), Some(write)) = (
            number_before(" IOPS, write"),
            figures.rfind(" IOPS").and_then(|at| figures[..at].split_whitespace().last()?.parse().ok()),
        ) else {
            continue;
        };
        let peer = peers.entry(name.to_string()).or_default();
        peer.job = job.to_string();
        peer.rounds.push((read, write, figures.contains("verify OK")));
    }
    peers
}

/// Render the table (also appended to `--markdown`).
pub fn run(args: &LabTableArgs) -> Result<String> {
    let summary = std::fs::read_to_string(&args.summary)
        .with_context(|| format!("reading the lab summary {}", args.summary.display()))?;
    let peers = parse(&summary);
    ensure!(!peers.is_empty(), "no peer results in {}", args.summary.display());
    let base = |name: &str| peers.get(name).map(Peer::mean_total);
    let ratio =
        |value: f64, base: Option<f64>| base.map_or("—".to_string(), |b| format!("{:.2}", value / b.max(1.0)));
    let mut out = String::from(
        "| backend | fio job (in the domU) | rounds | read+write IOPS per round | mean | ×kernel blkback | ×qdisk | \
         verify |\n|---|---|---|---|---|---|---|---|\n",
    );
    let order = ["kernel-blkback", "qdisk", "userspace"];
    let mut names: Vec<&String> = peers.keys().collect();
    names.sort_by_key(|n| order.iter().position(|o| o == n).unwrap_or(order.len()));
    for name in names {
        let peer = &peers[name];
        let label = if name == "userspace" { "blkbackd (userspace)" } else { name.as_str() };
        let per_round: Vec<String> = peer.rounds.iter().map(|(r, w, _)| format!("{:.0}", r + w)).collect();
        let mean = peer.mean_total();
        let verified = peer.rounds.iter().all(|(_, _, ok)| *ok);
        writeln!(
            out,
            "| {label} | {} | {} | {} | {mean:.0} | {} | {} | {} |",
            peer.job,
            peer.rounds.len(),
            per_round.join(", "),
            ratio(mean, base("kernel-blkback")),
            ratio(mean, base("qdisk")),
            if verified { "OK" } else { "FAILED" }
        )?;
    }
    if let Some(path) = &args.markdown {
        crate::append_markdown(path, &out)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_lab_summary() {
        let summary = "xen-lab: kernel-blkback#1 randrw 4k qd16 15s loop: read 583 IOPS, write 583 IOPS, verify OK\n\
                       xen-lab: qdisk#1 randrw 4k qd16 15s loop: read 558 IOPS, write 559 IOPS, verify OK\n\
                       xen-lab: userspace#1 randrw 4k qd16 15s loop: read 616 IOPS, write 616 IOPS, verify OK\n\
                       xen-lab: userspace#2 randrw 4k qd16 15s loop: read 589 IOPS, write 589 IOPS, verify OK\n\
                       unrelated line\n";
        let peers = parse(summary);
        assert_eq!(peers.len(), 3);
        assert_eq!(peers["userspace"].rounds, vec![(616.0, 616.0, true), (589.0, 589.0, true)]);
        assert_eq!(peers["qdisk"].job, "randrw 4k qd16 15s loop");
        assert!((peers["userspace"].mean_total() - 1205.0).abs() < 1e-9);
    }

    #[test]
    fn parses_a_one_round_summary() {
        let summary = "xen-lab: kernel-blkback randrw 4k qd16 15s loop: read 464 IOPS, write 466 IOPS, verify OK\n\
                       xen-lab: userspace randrw 4k qd16 15s loop: read 503 IOPS, write 506 IOPS, verify OK\n";
        let peers = parse(summary);
        assert_eq!(peers.len(), 2);
        assert_eq!(peers["userspace"].rounds, vec![(503.0, 506.0, true)]);
        assert_eq!(peers["kernel-blkback"].job, "randrw 4k qd16 15s loop");
    }
}
