// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Extra views of a `blkback-bench vhost-user` run: CPU per I/O per queue count (against qsd and against the same
//! server's own one-queue figure), and each contender against raw fio on the same file (IOPS, latency added).

use crate::{servers, Row};

/// The workloads of the per-queue-count table.
const SCALING_WORKLOADS: [&str; 2] = ["randread 4k QD32", "randwrite 4k QD32"];

/// Whether `row` is a vhost-user server (not fio on the file).
fn is_server(row: &Row) -> bool {
    row.server != servers::RAW_LABEL
}

fn ratio(a: f64, b: Option<f64>) -> String {
    b.map_or_else(|| "—".to_string(), |b| format!("{:.2}", a / b.max(1e-9)))
}

/// CPU µs per I/O of every server at every queue count measured, for the QD32 random workloads: `×qsd` (same
/// queue count) and `×1q` (the same server with one queue). `None` unless more than one queue count was measured.
pub(crate) fn render_scaling(rows: &[Row]) -> Option<String> {
    let mut counts: Vec<usize> = rows.iter().map(|r| r.queues).collect();
    counts.sort_unstable();
    counts.dedup();
    if counts.len() < 2 {
        return None;
    }
    let mut out = String::from(
        "| workload | server | queues | IOPS | IOPS ×qsd | server CPU µs/IO | CPU ×qsd | CPU ×own 1-queue |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    for workload in SCALING_WORKLOADS {
        let mut names: Vec<&str> = Vec::new();
        for r in rows.iter().filter(|r| r.workload == workload && is_server(r)) {
            if !names.contains(&r.server.as_str()) {
                names.push(&r.server);
            }
        }
        for name in names {
            let find = |server: &dyn Fn(&Row) -> bool, queues: usize| {
                rows.iter().find(|r| r.workload == workload && r.queues == queues && server(r))
            };
            let own_1q = find(&|r| r.server == name, 1).map(|r| r.cpu_us_per_io);
            for &queues in &counts {
                let Some(r) = find(&|r| r.server == name, queues) else { continue };
                let qsd = find(&|r| r.server.starts_with("qemu"), queues);
                out.push_str(&format!(
                    "| {workload} | {name} | {queues} | {:.0} | {} | {:.2} | {} | {} |\n",
                    r.iops,
                    ratio(r.iops, qsd.map(|q| q.iops)),
                    r.cpu_us_per_io,
                    ratio(r.cpu_us_per_io, qsd.map(|q| q.cpu_us_per_io)),
                    ratio(r.cpu_us_per_io, own_1q),
                ));
            }
        }
    }
    Some(out)
}

/// Every server against raw fio on the same file: IOPS ×raw, the latency it adds (p50, p99, µs) and its CPU per
/// I/O ×fio's. `None` without a raw row.
pub(crate) fn render_vs_raw(rows: &[Row]) -> Option<String> {
    if !rows.iter().any(|r| !is_server(r)) {
        return None;
    }
    let mut out = String::from(
        "| workload | queues | server | IOPS ×raw | p50 µs added over raw | p99 µs added over raw | CPU µs/IO ×raw |\n\
         |---|---|---|---|---|---|---|\n",
    );
    for r in rows.iter().filter(|r| is_server(r)) {
        let Some(raw) = rows.iter().find(|b| b.workload == r.workload && b.queues == r.queues && !is_server(b)) else {
            continue;
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {:+.1} | {:+.1} | {} |\n",
            r.workload,
            r.queues,
            r.server,
            ratio(r.iops, Some(raw.iops)),
            r.p50_us - raw.p50_us,
            r.p99_us - raw.p99_us,
            ratio(r.cpu_us_per_io, Some(raw.cpu_us_per_io)),
        ));
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(workload: &'static str, queues: usize, server: &str, iops: f64, cpu: f64) -> Row {
        Row {
            workload,
            queues,
            server: server.to_string(),
            iops,
            p50_us: 10.0 * cpu,
            p99_us: 20.0 * cpu,
            cpu_us_per_io: cpu,
            errors: 0,
        }
    }

    #[test]
    fn scaling_compares_to_qsd_and_to_the_own_one_queue_figure() {
        let w = "randread 4k QD32";
        let rows = [
            row(w, 1, "qemu-storage-daemon", 100.0, 6.0),
            row(w, 1, "blkbackd", 150.0, 3.0),
            row(w, 8, "qemu-storage-daemon", 100.0, 8.0),
            row(w, 8, "blkbackd", 200.0, 4.0),
            row(w, 8, servers::RAW_LABEL, 300.0, 2.0),
        ];
        let table = render_scaling(&rows).expect("two queue counts");
        assert!(table.contains("| randread 4k QD32 | blkbackd | 8 | 200 | 2.00 | 4.00 | 0.50 | 1.33 |"), "{table}");
        assert!(!table.contains(servers::RAW_LABEL), "{table}");
        assert!(render_scaling(&rows[..2]).is_none());
        let raw = render_vs_raw(&rows).expect("a raw row");
        assert!(raw.contains("| randread 4k QD32 | 8 | blkbackd | 0.67 | +20.0 | +40.0 | 2.00 |"), "{raw}");
        assert!(render_vs_raw(&rows[..2]).is_none());
    }
}
