// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Live statistics: per-queue counters and latency histograms that the queue's worker updates with relaxed
//! atomics (no lock, no allocation on the I/O path) and that a control thread reads at any time.
//!
//! The [`Registry`] keeps every queue's counters for the life of the process: when a connection ends, its queues'
//! totals are folded into a per-series base (same labels), so the next connection's counters continue from there
//! and the exported counters stay monotonic across VMM reconnects. Rendering lives in the private `render` module.
//!
//! [`LatencyHistogram`] is log-linear: 16 linear steps in every power of two of nanoseconds, so quantiles are
//! within ~6 % from 16 ns to hours. The benches and the demo use the same histogram, through
//! [`LatencyHistogram::record`] and [`LatencyHistogram::quantile`].

mod render;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::request::{RequestError, RequestKind, Status};

const SUB_BUCKETS: usize = 16;
const BUCKETS: usize = 64 * SUB_BUCKETS;

/// A latency histogram updated with relaxed atomics.
#[derive(Debug)]
pub struct LatencyHistogram {
    buckets: Box<[AtomicU64]>,
    /// Sum of the recorded latencies, in nanoseconds (Prometheus' `_sum`).
    sum_ns: AtomicU64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram { buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(), sum_ns: AtomicU64::new(0) }
    }
}

fn bucket_of(ns: u64) -> usize {
    let ns = ns.max(1);
    let exp = 63 - ns.leading_zeros() as usize;
    let sub = if exp >= 4 { (ns >> (exp - 4)) & 0xf } else { ns & 0xf };
    // `sub` < 16 by the mask.
    exp * SUB_BUCKETS + usize::from(u8::try_from(sub).unwrap_or(0))
}

fn lower_bound(bucket: usize) -> u64 {
    let (exp, sub) = (bucket / SUB_BUCKETS, (bucket % SUB_BUCKETS) as u64);
    if exp >= 4 {
        (1u64 << exp) | (sub << (exp - 4))
    } else {
        sub
    }
}

impl LatencyHistogram {
    /// Record one sample.
    pub fn record(&self, latency: Duration) {
        let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        self.buckets[bucket_of(ns)].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Sum of the recorded latencies.
    pub fn sum(&self) -> Duration {
        Duration::from_nanos(self.sum_ns.load(Ordering::Relaxed))
    }

    /// Samples recorded.
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    /// Add another histogram's samples to this one.
    pub fn merge(&self, other: &LatencyHistogram) {
        for (a, b) in self.buckets.iter().zip(other.buckets.iter()) {
            a.fetch_add(b.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        self.sum_ns.fetch_add(other.sum_ns.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    /// The `q` quantile (0.0..=1.0), as the lower bound of its bucket; zero when empty.
    pub fn quantile(&self, q: f64) -> Duration {
        let counts: Vec<u64> = self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return Duration::ZERO;
        }
        // Rank of the sample, 1-based; float-to-int conversion saturates, which is what we want.
        #[allow(clippy::cast_possible_truncation)]
        let rank = ((total as f64) * q.clamp(0.0, 1.0)).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, n) in counts.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Duration::from_nanos(lower_bound(i));
            }
        }
        Duration::from_nanos(lower_bound(BUCKETS - 1))
    }

    /// Cumulative counts at the Prometheus bucket bounds `le` (seconds), plus the total.
    fn cumulative(&self, bounds_ns: &[u64]) -> (Vec<u64>, u64) {
        let counts: Vec<u64> = self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).collect();
        let out = bounds_ns
            .iter()
            .map(|&le| counts.iter().enumerate().filter(|(i, _)| lower_bound(*i) < le).map(|(_, n)| n).sum())
            .collect();
        (out, counts.iter().sum())
    }
}

/// Operation classes with a histogram of their own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpClass {
    /// Reads.
    Read,
    /// Writes.
    Write,
    /// Flushes.
    Flush,
    /// Discards and write-zeroes.
    Discard,
    /// Everything else (GET_ID).
    Other,
}

impl OpClass {
    const ALL: [OpClass; 5] = [OpClass::Read, OpClass::Write, OpClass::Flush, OpClass::Discard, OpClass::Other];

    /// The class of a request kind.
    pub fn of(kind: RequestKind) -> OpClass {
        match kind {
            RequestKind::Read => OpClass::Read,
            RequestKind::Write => OpClass::Write,
            RequestKind::Flush => OpClass::Flush,
            RequestKind::Discard { .. } | RequestKind::WriteZeroes { .. } => OpClass::Discard,
            RequestKind::GetId => OpClass::Other,
        }
    }

    fn name(self) -> &'static str {
        match self {
            OpClass::Read => "read",
            OpClass::Write => "write",
            OpClass::Flush => "flush",
            OpClass::Discard => "discard",
            OpClass::Other => "other",
        }
    }
}

/// Counters and latency histograms of one queue.
#[derive(Debug, Default)]
pub struct QueueStats {
    requests: [AtomicU64; 5],
    latency: [LatencyHistogram; 5],
    /// Bytes read from the disk into guest memory.
    pub bytes_read: AtomicU64,
    /// Bytes written from guest memory to the disk.
    pub bytes_written: AtomicU64,
    /// Requests refused before any I/O (bounds, alignment, read-only, malformed).
    pub errors_invalid: AtomicU64,
    /// Requests the disk failed (I/O errors, short transfers).
    pub errors_io: AtomicU64,
    /// Requests answered "unsupported".
    pub errors_unsupported: AtomicU64,
    /// Requests submitted and not yet finished.
    pub in_flight: AtomicU64,
}

impl QueueStats {
    /// A request of `kind` was started.
    pub fn started(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    /// A request of `kind` finished after `latency`, moving `bytes`, with `status` (and its error, if any).
    pub fn finished(
        &self,
        kind: RequestKind,
        latency: Duration,
        bytes: u64,
        status: Status,
        error: Option<&RequestError>,
    ) {
        let class = OpClass::of(kind) as usize;
        self.requests[class].fetch_add(1, Ordering::Relaxed);
        self.latency[class].record(latency);
        // Saturating: a finish without a start (immediate refusals) must not wrap the gauge.
        let _ = self.in_flight.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| Some(n.saturating_sub(1)));
        match (status, error) {
            (Status::Ok, _) => match kind {
                RequestKind::Read | RequestKind::GetId => self.bytes_read.fetch_add(bytes, Ordering::Relaxed),
                RequestKind::Write => self.bytes_written.fetch_add(bytes, Ordering::Relaxed),
                _ => 0,
            },
            (Status::Unsupported, _) => self.errors_unsupported.fetch_add(1, Ordering::Relaxed),
            (Status::IoError, Some(RequestError::Io { .. } | RequestError::ShortTransfer { .. })) => {
                self.errors_io.fetch_add(1, Ordering::Relaxed)
            }
            (Status::IoError, _) => self.errors_invalid.fetch_add(1, Ordering::Relaxed),
        };
    }

    /// Requests finished of `class`.
    pub fn requests(&self, class: OpClass) -> u64 {
        self.requests[class as usize].load(Ordering::Relaxed)
    }

    /// The latency histogram of `class`.
    pub fn latency(&self, class: OpClass) -> &LatencyHistogram {
        &self.latency[class as usize]
    }

    /// Add `other`'s counters and histograms to these (and its in-flight gauge if `gauge`).
    fn absorb(&self, other: &QueueStats, gauge: bool) {
        let add = |a: &AtomicU64, b: &AtomicU64| {
            a.fetch_add(b.load(Ordering::Relaxed), Ordering::Relaxed);
        };
        for (a, b) in self.requests.iter().zip(&other.requests) {
            add(a, b);
        }
        for (a, b) in self.latency.iter().zip(&other.latency) {
            a.merge(b);
        }
        add(&self.bytes_read, &other.bytes_read);
        add(&self.bytes_written, &other.bytes_written);
        add(&self.errors_invalid, &other.errors_invalid);
        add(&self.errors_io, &other.errors_io);
        add(&self.errors_unsupported, &other.errors_unsupported);
        if gauge {
            add(&self.in_flight, &other.in_flight);
        }
    }
}

/// Labels of a queue in the registry (e.g. `[("transport", "xen"), ("domid", "7"), ("devid", "51712"), ("queue",
/// "0")]`).
pub type Labels = Vec<(&'static str, String)>;

/// One series of the registry: the queues registered under the same labels over the process' life.
#[derive(Debug)]
struct Series {
    labels: Labels,
    /// Totals of the queues whose connection ended (their in-flight gauge is dropped: nothing is in flight).
    ended: QueueStats,
    /// Queues still held by a worker (and by the registry).
    live: Vec<Arc<QueueStats>>,
}

/// Every queue of the process, for the control socket and the metrics endpoint. Queues register when created;
/// a series (one set of labels) lives as long as the process, so its counters never go backwards.
#[derive(Debug, Default)]
pub struct Registry {
    series: Mutex<Vec<Series>>,
}

impl Registry {
    /// A new registry.
    pub fn new() -> Arc<Registry> {
        Arc::new(Registry::default())
    }

    /// Register a queue's stats under `labels`. A queue registered again under labels already known (the same
    /// queue index after a reconnect) adds to that series.
    pub fn register(&self, labels: Labels, stats: &Arc<QueueStats>) {
        let mut series = self.series.lock().unwrap_or_else(PoisonError::into_inner);
        match series.iter_mut().find(|s| s.labels == labels) {
            Some(s) => s.live.push(Arc::clone(stats)),
            None => series.push(Series { labels, ended: QueueStats::default(), live: vec![Arc::clone(stats)] }),
        }
    }

    /// Every series with its totals (ended connections plus live queues), in registration order. Queues only the
    /// registry still holds are folded into their series' base here, off the I/O path.
    pub fn snapshot(&self) -> Vec<(Labels, QueueStats)> {
        let mut series = self.series.lock().unwrap_or_else(PoisonError::into_inner);
        series
            .iter_mut()
            .map(|s| {
                let mut live = Vec::with_capacity(s.live.len());
                for stats in s.live.drain(..) {
                    // `try_unwrap` succeeds only for the last reference, and synchronises with the worker's drop:
                    // every update it made is visible.
                    match Arc::try_unwrap(stats) {
                        Ok(ended) => s.ended.absorb(&ended, false),
                        Err(stats) => live.push(stats),
                    }
                }
                s.live = live;
                let total = QueueStats::default();
                total.absorb(&s.ended, false);
                for stats in &s.live {
                    total.absorb(stats, true);
                }
                (s.labels.clone(), total)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_within_bucket_resolution() {
        let h = LatencyHistogram::default();
        for us in 1..=1000u64 {
            h.record(Duration::from_micros(us));
        }
        assert_eq!(h.count(), 1000);
        let p50 = h.quantile(0.5).as_secs_f64() * 1e6;
        let p99 = h.quantile(0.99).as_secs_f64() * 1e6;
        assert!((470.0..=510.0).contains(&p50), "p50 {p50}");
        assert!((920.0..=1000.0).contains(&p99), "p99 {p99}");
        assert_eq!(LatencyHistogram::default().quantile(0.5), Duration::ZERO);
    }

    #[test]
    fn counters_classify_outcomes_and_reports_render() {
        let registry = Registry::new();
        let stats = Arc::new(QueueStats::default());
        registry.register(vec![("transport", "test".into()), ("queue", "0".into())], &stats);
        stats.started();
        stats.finished(RequestKind::Read, Duration::from_micros(80), 4096, Status::Ok, None);
        stats.finished(
            RequestKind::Write,
            Duration::from_micros(90),
            0,
            Status::IoError,
            Some(&RequestError::ReadOnly),
        );
        let io = RequestError::Io { errno: libc::EIO };
        stats.finished(RequestKind::Write, Duration::from_micros(90), 0, Status::IoError, Some(&io));
        stats.finished(RequestKind::GetId, Duration::from_micros(1), 0, Status::Unsupported, None);
        assert_eq!(stats.bytes_read.load(Ordering::Relaxed), 4096);
        assert_eq!(stats.errors_invalid.load(Ordering::Relaxed), 1);
        assert_eq!(stats.errors_io.load(Ordering::Relaxed), 1);
        assert_eq!(stats.errors_unsupported.load(Ordering::Relaxed), 1);
        assert_eq!(stats.in_flight.load(Ordering::Relaxed), 0, "never wraps below zero");
        let text = registry.render_text();
        assert!(text.contains("[transport=test queue=0]") && text.contains("read"), "{text}");
        let prom = registry.render_prometheus();
        assert!(prom.contains(r#"blkbackd_read_bytes_total{transport="test",queue="0"} 4096"#), "{prom}");
        assert!(prom.contains(r#"op="read",le="+Inf"} 1"#), "{prom}");
        assert!(prom.contains(r#"blkbackd_request_duration_seconds_sum{transport="test",queue="0",op="read"} 0.00008"#));
        assert_eq!(Registry::new().render_text(), "no queues yet\n");
    }

    #[test]
    fn a_series_keeps_counting_after_its_queue_is_dropped_and_registered_again() {
        let registry = Registry::new();
        let labels = || vec![("transport", "test".into()), ("queue", "0".into())];
        let write = |stats: &QueueStats| {
            stats.started();
            stats.finished(RequestKind::Write, Duration::from_micros(50), 4096, Status::Ok, None);
        };
        let first = Arc::new(QueueStats::default());
        registry.register(labels(), &first);
        write(&first);
        write(&first);
        first.started(); // left in flight when the connection went away: not counted afterwards
        drop(first);
        let prom = registry.render_prometheus();
        assert!(prom.contains(r#"blkbackd_written_bytes_total{transport="test",queue="0"} 8192"#), "{prom}");
        assert!(prom.contains(r#"blkbackd_in_flight_requests{transport="test",queue="0"} 0"#), "{prom}");

        let second = Arc::new(QueueStats::default());
        registry.register(labels(), &second);
        write(&second);
        let prom = registry.render_prometheus();
        assert!(prom.contains(r#"blkbackd_written_bytes_total{transport="test",queue="0"} 12288"#), "{prom}");
        assert!(prom.contains(r#"blkbackd_requests_total{transport="test",queue="0",op="write"} 3"#), "{prom}");
        let count = r#"blkbackd_request_duration_seconds_count{transport="test",queue="0",op="write"} 3"#;
        assert!(prom.contains(count), "{prom}");
        assert_eq!(prom.matches("# TYPE blkbackd_written_bytes_total counter").count(), 1, "{prom}");
        assert_eq!(registry.snapshot().len(), 1, "one series per label set");
    }

    #[test]
    fn every_prometheus_family_has_help_and_type_and_histograms_are_complete() {
        let registry = Registry::new();
        let stats = Arc::new(QueueStats::default());
        registry.register(vec![("queue", "0".into())], &stats);
        for us in [5, 30, 700, 3_000_000] {
            stats.finished(RequestKind::Read, Duration::from_micros(us), 512, Status::Ok, None);
        }
        let prom = registry.render_prometheus();
        let mut family = "";
        for line in prom.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                family = rest.split(' ').next().unwrap_or_default();
                continue;
            }
            if line.starts_with("# TYPE ") {
                assert!(line.starts_with(&format!("# TYPE {family} ")), "TYPE without HELP: {line}");
                continue;
            }
            let name = line.split(['{', ' ']).next().unwrap_or_default();
            assert!(name.starts_with(family), "{name} outside its family {family}");
        }
        let buckets: Vec<u64> = prom
            .lines()
            .filter(|l| l.starts_with("blkbackd_request_duration_seconds_bucket") && l.contains(r#"op="read""#))
            .map(|l| l.rsplit(' ').next().and_then(|n| n.parse().ok()).expect("a count"))
            .collect();
        assert!(buckets.windows(2).all(|w| w[0] <= w[1]), "cumulative: {buckets:?}");
        assert_eq!(buckets.first(), Some(&1));
        assert_eq!(buckets.last(), Some(&4), "+Inf holds every sample");
        assert!(prom.contains(r#"le="+Inf"} 4"#) && prom.contains(r#"_count{queue="0",op="read"} 4"#), "{prom}");
        assert!(prom.contains(r#"_sum{queue="0",op="read"} 3.000735"#), "{prom}");
    }
}
