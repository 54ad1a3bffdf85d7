//! I/O accounting of a BlockBackend: operations, bytes, failures and time per
//! kind of request. Lock-free counters; each queue's requests add to them.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoKind {
    Read = 0,
    Write = 1,
    Flush = 2,
    Discard = 3,
    WriteZeroes = 4,
}

impl IoKind {
    pub const ALL: [IoKind; 5] = [
        IoKind::Read,
        IoKind::Write,
        IoKind::Flush,
        IoKind::Discard,
        IoKind::WriteZeroes,
    ];
}

/// Counters of one kind of request.
#[derive(Default, Debug)]
pub struct KindStats {
    pub ops: AtomicU64,
    pub bytes: AtomicU64,
    pub failed: AtomicU64,
    pub invalid: AtomicU64,
    pub total_time_ns: AtomicU64,
}

/// A latency histogram (block-latency-histogram-set): `bins[i]` counts
/// requests whose latency falls in `[boundaries[i-1], boundaries[i])`, in ns.
#[derive(Debug)]
pub struct LatencyHistogram {
    pub boundaries: Vec<u64>,
    pub bins: Vec<AtomicU64>,
}

impl LatencyHistogram {
    /// None unless `boundaries` is strictly increasing.
    pub fn new(boundaries: Vec<u64>) -> Option<Self> {
        if boundaries.windows(2).any(|w| w[0] >= w[1]) {
            return None;
        }
        let bins = (0..=boundaries.len()).map(|_| AtomicU64::new(0)).collect();
        Some(LatencyHistogram { boundaries, bins })
    }

    fn record(&self, ns: u64) {
        let i = self.boundaries.partition_point(|&b| b <= ns);
        self.bins[i].fetch_add(1, Ordering::Relaxed);
    }
}

/// The histogram slots QEMU has: read, write, zap (discard), flush.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HistogramKind {
    Read = 0,
    Write = 1,
    Zap = 2,
    Flush = 3,
}

/// Accounting of one BlockBackend.
#[derive(Default, Debug)]
pub struct BlockStats {
    kinds: [KindStats; 5],
    /// One past the highest byte ever written.
    pub wr_highest_offset: AtomicU64,
    last_access_ns: AtomicU64,
    /// Set while any histogram is, so that requests skip the lock otherwise.
    histograms_on: AtomicBool,
    histograms: [RwLock<Option<Arc<LatencyHistogram>>>; 4],
}

impl BlockStats {
    pub fn kind(&self, kind: IoKind) -> &KindStats {
        &self.kinds[kind as usize]
    }

    pub fn record_done(&self, kind: IoKind, bytes: u64, started: Instant, ok: bool) {
        let k = self.kind(kind);
        if ok {
            k.ops.fetch_add(1, Ordering::Relaxed);
            k.bytes.fetch_add(bytes, Ordering::Relaxed);
        } else {
            k.failed.fetch_add(1, Ordering::Relaxed);
        }
        let now = crate::io::now();
        let ns =
            u64::try_from(now.saturating_duration_since(started).as_nanos()).unwrap_or(u64::MAX);
        k.total_time_ns.fetch_add(ns, Ordering::Relaxed);
        if self.histograms_on.load(Ordering::Relaxed) {
            let slot = match kind {
                IoKind::Read => HistogramKind::Read,
                IoKind::Write | IoKind::WriteZeroes => HistogramKind::Write,
                IoKind::Discard => HistogramKind::Zap,
                IoKind::Flush => HistogramKind::Flush,
            };
            if let Some(h) = self.histograms[slot as usize]
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
            {
                h.record(ns);
            }
        }
        self.last_access_ns
            .store(since_start(now), Ordering::Relaxed);
    }

    pub fn record_invalid(&self, kind: IoKind) {
        self.kind(kind).invalid.fetch_add(1, Ordering::Relaxed);
    }

    pub fn record_write_end(&self, end: u64) {
        self.wr_highest_offset.fetch_max(end, Ordering::Relaxed);
    }

    /// Sets (or with None, removes) one histogram.
    pub fn set_histogram(&self, kind: HistogramKind, h: Option<LatencyHistogram>) {
        *self.histograms[kind as usize]
            .write()
            .unwrap_or_else(|e| e.into_inner()) = h.map(Arc::new);
        let any = self
            .histograms
            .iter()
            .any(|h| h.read().unwrap_or_else(|e| e.into_inner()).is_some());
        self.histograms_on.store(any, Ordering::Relaxed);
    }

    pub fn histogram(&self, kind: HistogramKind) -> Option<Arc<LatencyHistogram>> {
        self.histograms[kind as usize]
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Time since the last completed request, if any.
    pub fn idle_time(&self) -> Option<Duration> {
        let last = self.last_access_ns.load(Ordering::Relaxed);
        (last != 0).then(|| Duration::from_nanos(monotonic_ns().saturating_sub(last)))
    }
}

fn start() -> Instant {
    use std::sync::OnceLock;
    static START: OnceLock<Instant> = OnceLock::new();
    *START.get_or_init(Instant::now)
}

/// `t` as nanoseconds since the first use of the stats (never 0).
fn since_start(t: Instant) -> u64 {
    u64::try_from(t.saturating_duration_since(start()).as_nanos()).unwrap_or(u64::MAX) + 1
}

fn monotonic_ns() -> u64 {
    since_start(Instant::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_bins_split_at_boundaries() {
        let h = LatencyHistogram::new(vec![10, 100]).unwrap();
        for ns in [0, 9, 10, 99, 100, 5000] {
            h.record(ns);
        }
        let bins: Vec<u64> = h.bins.iter().map(|b| b.load(Ordering::Relaxed)).collect();
        assert_eq!(bins, vec![2, 2, 2]);
    }

    #[test]
    fn histogram_boundaries_must_increase() {
        assert!(LatencyHistogram::new(vec![10, 10]).is_none());
        assert!(LatencyHistogram::new(vec![]).is_some());
    }
}
