//! A log-linear latency histogram (no allocation per sample): 64 power-of-two buckets of 16 linear steps.

use std::time::Duration;

const SUB: usize = 16;

/// Latency histogram in nanoseconds with ~6 % resolution.
#[derive(Clone, Debug)]
pub struct Histogram {
    buckets: Vec<u64>,
    count: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram { buckets: vec![0; 64 * SUB], count: 0 }
    }
}

impl Histogram {
    /// Record one sample.
    pub fn record(&mut self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1);
        let exp = 63 - ns.leading_zeros() as usize;
        let sub = if exp >= 4 { ((ns >> (exp - 4)) & 0xf) as usize } else { (ns as usize) & 0xf };
        self.buckets[exp * SUB + sub] += 1;
        self.count += 1;
    }

    /// Add another histogram's samples.
    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.buckets.iter_mut().zip(&other.buckets) {
            *a += b;
        }
        self.count += other.count;
    }

    /// The `q` quantile (0..=1), as the bucket's lower bound.
    pub fn quantile(&self, q: f64) -> Duration {
        if self.count == 0 {
            return Duration::ZERO;
        }
        let target = ((self.count as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, &n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= target {
                let (exp, sub) = (i / SUB, (i % SUB) as u64);
                let ns = if exp >= 4 { (1u64 << exp) | (sub << (exp - 4)) } else { sub };
                return Duration::from_nanos(ns);
            }
        }
        Duration::MAX
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_within_bucket_resolution() {
        let mut h = Histogram::default();
        for us in 1..=1000u64 {
            h.record(Duration::from_micros(us));
        }
        let p50 = h.quantile(0.5).as_micros() as f64;
        let p99 = h.quantile(0.99).as_micros() as f64;
        assert!((470.0..=510.0).contains(&p50), "p50 {p50}");
        assert!((920.0..=1000.0).contains(&p99), "p99 {p99}");
    }
}
