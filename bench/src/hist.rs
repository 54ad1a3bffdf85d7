//! Fixed-size log-linear latency histogram.
//!
//! Values (nanoseconds) below `2^SUB_BITS` are recorded exactly. Above that,
//! every power-of-two range is split into `2^SUB_BITS` equal-width buckets, so
//! the relative error of a reported percentile is below `1 / 2^(SUB_BITS+1)`
//! (< 0.8 % with `SUB_BITS = 6`). The bucket array is allocated once; recording
//! a value is a couple of integer operations and never allocates.

use serde::Serialize;

const SUB_BITS: u32 = 6;
const SUB: u64 = 1 << SUB_BITS;
/// Highest most-significant-bit position tracked separately; larger values
/// are clamped into the top bucket (2^48 ns is ~78 hours).
const MAX_MSB: u32 = 47;
const GROUPS: usize = (MAX_MSB - SUB_BITS + 2) as usize;
const BUCKETS: usize = GROUPS * SUB as usize;

/// Latency histogram over nanosecond values.
#[derive(Clone)]
pub struct Histogram {
    buckets: Box<[u64; BUCKETS]>,
    count: u64,
    sum: u128,
    min: u64,
    max: u64,
}

/// Summary of a histogram, in microseconds.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct LatencySummary {
    pub min_us: f64,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p99_9_us: f64,
    pub max_us: f64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

impl Histogram {
    pub fn new() -> Self {
        Self {
            buckets: Box::new([0; BUCKETS]),
            count: 0,
            sum: 0,
            min: u64::MAX,
            max: 0,
        }
    }

    fn index(v: u64) -> usize {
        if v < SUB {
            return v as usize;
        }
        let msb = (63 - v.leading_zeros()).min(MAX_MSB);
        if msb == MAX_MSB && v >> MAX_MSB > 1 {
            return BUCKETS - 1;
        }
        let shift = msb - SUB_BITS;
        let group = (shift + 1) as usize;
        let mantissa = ((v >> shift) & (SUB - 1)) as usize;
        group * SUB as usize + mantissa
    }

    /// Inclusive lower and upper value of a bucket.
    fn bounds(idx: usize) -> (u64, u64) {
        let group = idx / SUB as usize;
        let mantissa = (idx % SUB as usize) as u64;
        if group == 0 {
            return (mantissa, mantissa);
        }
        let shift = (group - 1) as u32;
        let lo = (SUB + mantissa) << shift;
        let hi = ((SUB + mantissa + 1) << shift) - 1;
        (lo, hi)
    }

    #[inline]
    pub fn record(&mut self, ns: u64) {
        self.buckets[Self::index(ns)] += 1;
        self.count += 1;
        self.sum += u128::from(ns);
        self.min = self.min.min(ns);
        self.max = self.max.max(ns);
    }

    pub fn clear(&mut self) {
        self.buckets.fill(0);
        self.count = 0;
        self.sum = 0;
        self.min = u64::MAX;
        self.max = 0;
    }

    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.buckets.iter_mut().zip(other.buckets.iter()) {
            *a += *b;
        }
        self.count += other.count;
        self.sum += other.sum;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    /// Value (ns) at percentile `p` (0..=100): the midpoint of the bucket
    /// holding the sample of rank `ceil(p/100 * count)`, clamped to the
    /// observed min/max.
    pub fn percentile(&self, p: f64) -> f64 {
        if self.count == 0 {
            return 0.0;
        }
        let rank = ((p / 100.0) * self.count as f64).ceil().max(1.0) as u64;
        let mut seen = 0u64;
        for (idx, &n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                let (lo, hi) = Self::bounds(idx);
                let mid = (lo as f64 + hi as f64) / 2.0;
                return mid.clamp(self.min as f64, self.max as f64);
            }
        }
        self.max as f64
    }

    pub fn summary(&self) -> LatencySummary {
        if self.count == 0 {
            return LatencySummary::default();
        }
        let us = |ns: f64| ns / 1000.0;
        LatencySummary {
            min_us: us(self.min as f64),
            mean_us: us(self.sum as f64 / self.count as f64),
            p50_us: us(self.percentile(50.0)),
            p90_us: us(self.percentile(90.0)),
            p99_us: us(self.percentile(99.0)),
            p99_9_us: us(self.percentile(99.9)),
            max_us: us(self.max as f64),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_is_monotonic_and_bounds_contain_value() {
        let mut last = 0;
        let mut v = 0u64;
        while v < (1u64 << 40) {
            let idx = Histogram::index(v);
            assert!(idx >= last, "index not monotonic at {v}");
            let (lo, hi) = Histogram::bounds(idx);
            assert!(lo <= v && v <= hi, "{v} not in [{lo}, {hi}]");
            last = idx;
            v = if v < 4096 { v + 1 } else { v + v / 97 + 1 };
        }
        assert!(Histogram::index(u64::MAX) < BUCKETS);
    }

    #[test]
    fn percentiles_are_close() {
        let mut h = Histogram::new();
        for v in 1..=100_000u64 {
            h.record(v * 10);
        }
        let p50 = h.percentile(50.0);
        let p99 = h.percentile(99.0);
        assert!((p50 - 500_000.0).abs() / 500_000.0 < 0.01, "p50 {p50}");
        assert!((p99 - 990_000.0).abs() / 990_000.0 < 0.01, "p99 {p99}");
        assert_eq!(h.percentile(100.0), 1_000_000.0);
        let mut g = Histogram::new();
        g.merge(&h);
        assert_eq!(g.count(), 100_000);
        g.clear();
        assert_eq!(g.count(), 0);
    }
}
