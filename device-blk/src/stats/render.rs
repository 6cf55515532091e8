// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The two reports of a [`Registry`]: a human-readable one and the Prometheus text exposition format (version
//! 0.0.4, what `text/plain; version=0.0.4` announces): every family has `# HELP` and `# TYPE`, counters end in
//! `_total`, histograms have cumulative `_bucket{le=...}` lines ending in `+Inf`, `_sum` in seconds and `_count`.
//!
//! Written here rather than with `prometheus-client`: that crate encodes OpenMetrics (`# EOF`, counter families
//! typed without their `_total`), which a scraper told `version=0.0.4` reads differently, and its metric types
//! would be a second copy of the counters the queue workers already keep in atomics.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;

use super::{Labels, OpClass, QueueStats, Registry};

/// Histogram bucket bounds, in microseconds.
const LE_US: [u64; 12] = [10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 100_000, 1_000_000];

type Getter = fn(&QueueStats) -> u64;

/// The per-queue families that are one number each: name, type, help, value.
const SCALARS: [(&str, &str, &str, Getter); 6] = [
    ("blkbackd_in_flight_requests", "gauge", "Requests submitted to the disk and not yet answered.", |s| {
        s.in_flight.load(Ordering::Relaxed)
    }),
    ("blkbackd_read_bytes_total", "counter", "Bytes read from the disk into guest memory.", |s| {
        s.bytes_read.load(Ordering::Relaxed)
    }),
    ("blkbackd_written_bytes_total", "counter", "Bytes written from guest memory to the disk.", |s| {
        s.bytes_written.load(Ordering::Relaxed)
    }),
    (
        "blkbackd_invalid_requests_total",
        "counter",
        "Requests refused before any I/O (bounds, alignment, read-only, malformed).",
        |s| s.errors_invalid.load(Ordering::Relaxed),
    ),
    ("blkbackd_io_errors_total", "counter", "Requests the disk failed (I/O errors, short transfers).", |s| {
        s.errors_io.load(Ordering::Relaxed)
    }),
    ("blkbackd_unsupported_requests_total", "counter", "Requests answered as unsupported.", |s| {
        s.errors_unsupported.load(Ordering::Relaxed)
    }),
];

impl Registry {
    /// A human-readable report: one block per queue.
    pub fn render_text(&self) -> String {
        let mut out = String::new();
        let series = self.snapshot();
        if series.is_empty() {
            out.push_str("no queues yet\n");
        }
        for (labels, s) in series {
            let name: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let _ = writeln!(out, "[{}]", name.join(" "));
            let _ = writeln!(
                out,
                "  in_flight {}  bytes_read {}  bytes_written {}  errors: invalid {} io {} unsupported {}",
                s.in_flight.load(Ordering::Relaxed),
                s.bytes_read.load(Ordering::Relaxed),
                s.bytes_written.load(Ordering::Relaxed),
                s.errors_invalid.load(Ordering::Relaxed),
                s.errors_io.load(Ordering::Relaxed),
                s.errors_unsupported.load(Ordering::Relaxed),
            );
            for class in OpClass::ALL {
                let n = s.requests(class);
                if n == 0 {
                    continue;
                }
                let h = s.latency(class);
                let _ = writeln!(
                    out,
                    "  {:<8} {:>12} requests  p50 {:>9.1} us  p99 {:>9.1} us  p99.9 {:>9.1} us",
                    class.name(),
                    n,
                    h.quantile(0.5).as_secs_f64() * 1e6,
                    h.quantile(0.99).as_secs_f64() * 1e6,
                    h.quantile(0.999).as_secs_f64() * 1e6,
                );
            }
        }
        out
    }

    /// The Prometheus text exposition format (0.0.4).
    pub fn render_prometheus(&self) -> String {
        let series = self.snapshot();
        let mut out = String::new();
        for (name, kind, help, get) in SCALARS {
            family(&mut out, name, kind, help);
            for (labels, s) in &series {
                let _ = writeln!(out, "{name}{} {}", label_set(labels, &[]), get(s));
            }
        }
        family(&mut out, "blkbackd_requests_total", "counter", "Requests answered, by operation.");
        for (labels, s) in &series {
            for class in OpClass::ALL {
                let set = label_set(labels, &[("op", class.name())]);
                let _ = writeln!(out, "blkbackd_requests_total{set} {}", s.requests(class));
            }
        }
        let name = "blkbackd_request_duration_seconds";
        family(
            &mut out,
            name,
            "histogram",
            "Time from submitting a request to the disk to its completion, by operation.",
        );
        let bounds_ns: Vec<u64> = LE_US.iter().map(|us| us * 1000).collect();
        for (labels, s) in &series {
            for class in OpClass::ALL {
                let h = s.latency(class);
                let (cumulative, total) = h.cumulative(&bounds_ns);
                if total == 0 {
                    continue;
                }
                let op = class.name();
                for (le, n) in LE_US.iter().zip(&cumulative) {
                    let le = format!("{}", *le as f64 / 1e6);
                    let _ = writeln!(out, "{name}_bucket{} {n}", label_set(labels, &[("op", op), ("le", &le)]));
                }
                let _ = writeln!(out, "{name}_bucket{} {total}", label_set(labels, &[("op", op), ("le", "+Inf")]));
                let set = label_set(labels, &[("op", op)]);
                let _ = writeln!(out, "{name}_sum{set} {}", h.sum().as_secs_f64());
                let _ = writeln!(out, "{name}_count{set} {total}");
            }
        }
        out
    }
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn label_set(labels: &Labels, extra: &[(&str, &str)]) -> String {
    let parts: Vec<String> = labels
        .iter()
        .map(|(k, v)| (*k, v.as_str()))
        .chain(extra.iter().copied())
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
        .collect();
    format!("{{{}}}", parts.join(","))
}

fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}
