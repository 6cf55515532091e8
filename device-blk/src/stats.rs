//! Live statistics: per-queue counters and latency histograms that the queue's worker updates with relaxed
//! atomics (no lock, no allocation on the I/O path) and that a control thread reads at any time.
//!
//! [`LatencyHistogram`] is log-linear: 16 linear steps in every power of two of nanoseconds, so quantiles are
//! within ~6 % from 16 ns to hours. The benches and the demo use the same histogram, through
//! [`LatencyHistogram::record`] and [`LatencyHistogram::quantile`].

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use crate::request::{RequestError, RequestKind, Status};

const SUB_BUCKETS: usize = 16;
const BUCKETS: usize = 64 * SUB_BUCKETS;

/// A latency histogram updated with relaxed atomics.
#[derive(Debug)]
pub struct LatencyHistogram {
    buckets: Box<[AtomicU64]>,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram { buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect() }
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
}

/// Labels of a queue in the registry (e.g. `[("transport", "xen"), ("domid", "7"), ("devid", "51712"), ("queue",
/// "0")]`).
pub type Labels = Vec<(&'static str, String)>;

/// Every live queue of the process, for the control socket. Queues register when created and disappear from
/// reports when their stats are dropped.
#[derive(Debug, Default)]
pub struct Registry {
    queues: Mutex<Vec<(Labels, Weak<QueueStats>)>>,
}

impl Registry {
    /// A new registry.
    pub fn new() -> Arc<Registry> {
        Arc::new(Registry::default())
    }

    /// Register a queue's stats under `labels`.
    pub fn register(&self, labels: Labels, stats: &Arc<QueueStats>) {
        let mut queues = self.queues.lock().unwrap_or_else(PoisonError::into_inner);
        queues.retain(|(_, weak)| weak.strong_count() > 0);
        queues.push((labels, Arc::downgrade(stats)));
    }

    fn live(&self) -> Vec<(Labels, Arc<QueueStats>)> {
        let queues = self.queues.lock().unwrap_or_else(PoisonError::into_inner);
        queues.iter().filter_map(|(labels, weak)| Some((labels.clone(), weak.upgrade()?))).collect()
    }

    /// A human-readable report: one block per queue.
    pub fn render_text(&self) -> String {
        let mut out = String::new();
        let live = self.live();
        if live.is_empty() {
            out.push_str("no active queues\n");
        }
        for (labels, s) in live {
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

    /// The Prometheus text exposition format.
    pub fn render_prometheus(&self) -> String {
        const LE_US: [u64; 12] = [10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 100_000, 1_000_000];
        let bounds_ns: Vec<u64> = LE_US.iter().map(|us| us * 1000).collect();
        let live = self.live();
        let mut out = String::new();
        let label_set = |labels: &Labels, extra: &[(&str, &str)]| -> String {
            let mut parts: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{}\"", escape(v))).collect();
            parts.extend(extra.iter().map(|(k, v)| format!("{k}=\"{v}\"")));
            format!("{{{}}}", parts.join(","))
        };
        type Getter = fn(&QueueStats) -> u64;
        let gauges: [(&str, &str, Getter); 6] = [
            ("blkbackd_in_flight", "gauge", |s| s.in_flight.load(Ordering::Relaxed)),
            ("blkbackd_read_bytes_total", "counter", |s| s.bytes_read.load(Ordering::Relaxed)),
            ("blkbackd_written_bytes_total", "counter", |s| s.bytes_written.load(Ordering::Relaxed)),
            ("blkbackd_invalid_requests_total", "counter", |s| s.errors_invalid.load(Ordering::Relaxed)),
            ("blkbackd_io_errors_total", "counter", |s| s.errors_io.load(Ordering::Relaxed)),
            ("blkbackd_unsupported_requests_total", "counter", |s| s.errors_unsupported.load(Ordering::Relaxed)),
        ];
        for (name, kind, get) in gauges {
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for (labels, s) in &live {
                let _ = writeln!(out, "{name}{} {}", label_set(labels, &[]), get(s));
            }
        }
        let _ = writeln!(out, "# TYPE blkbackd_request_duration_seconds histogram");
        for (labels, s) in &live {
            for class in OpClass::ALL {
                let (cumulative, total) = s.latency(class).cumulative(&bounds_ns);
                if total == 0 {
                    continue;
                }
                for (le, n) in LE_US.iter().zip(&cumulative) {
                    let le = format!("{}", *le as f64 / 1e6);
                    let set = label_set(labels, &[("op", class.name()), ("le", &le)]);
                    let _ = writeln!(out, "blkbackd_request_duration_seconds_bucket{set} {n}");
                }
                let set = label_set(labels, &[("op", class.name()), ("le", "+Inf")]);
                let _ = writeln!(out, "blkbackd_request_duration_seconds_bucket{set} {total}");
                let set = label_set(labels, &[("op", class.name())]);
                let _ = writeln!(out, "blkbackd_request_duration_seconds_count{set} {total}");
            }
        }
        out
    }
}

fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
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
        drop(stats);
        assert_eq!(registry.render_text(), "no active queues\n");
    }
}
