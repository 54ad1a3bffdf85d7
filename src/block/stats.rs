//! I/O accounting of a BlockBackend: operations, bytes, failures and time per
//! kind of request. Lock-free counters; each queue's requests add to them.
//!
//! An iothread that serves one export counts that export's requests on the
//! thread and adds them to the shared counters once per batch, before the
//! batch's completions reach the guest ([`defer_on_this_thread`],
//! [`publish_deferred`]): three or four atomic additions per request cost
//! more than the rest of the accounting (each locked instruction waits for
//! the thread's pending stores, guest memory writes among them).

use std::cell::Cell;
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

/// This thread's counts for one BlockStats, not yet added to it.
struct Deferred {
    stats: Cell<*const BlockStats>,
    /// Per kind: ops, bytes, failed, total_time_ns.
    counts: [[Cell<u64>; 4]; 5],
    highest: Cell<u64>,
    pending: Cell<bool>,
}

thread_local! {
    static DEFERRED: Deferred = const {
        Deferred {
            stats: Cell::new(std::ptr::null()),
            counts: [const { [const { Cell::new(0) }; 4] }; 5],
            highest: Cell::new(0),
            pending: Cell::new(false),
        }
    };
}

/// From now on, this thread counts `stats`' completions itself until
/// [`publish_deferred`] adds them (other BlockStats are counted at once).
///
/// # Safety
/// `stats` must stay alive until this thread calls [`stop_deferring`] or
/// defers for another BlockStats (which publishes first).
pub unsafe fn defer_on_this_thread(stats: &BlockStats) {
    publish_deferred();
    DEFERRED.with(|d| d.stats.set(stats));
}

/// Adds this thread's deferred counts to their BlockStats.
pub fn publish_deferred() {
    DEFERRED.with(|d| {
        if !d.pending.replace(false) {
            return;
        }
        // SAFETY: defer_on_this_thread's contract keeps it alive.
        let Some(stats) = (unsafe { d.stats.get().as_ref() }) else {
            return;
        };
        for (k, c) in stats.kinds.iter().zip(d.counts.iter()) {
            let fields = [&k.ops, &k.bytes, &k.failed, &k.total_time_ns];
            for (field, n) in fields.into_iter().zip(c.iter()) {
                let n = n.replace(0);
                if n > 0 {
                    field.fetch_add(n, Ordering::Relaxed);
                }
            }
        }
        let h = d.highest.replace(0);
        if h > 0 {
            stats.wr_highest_offset.fetch_max(h, Ordering::Relaxed);
        }
    });
}

/// Publishes and stops deferring on this thread.
pub fn stop_deferring() {
    publish_deferred();
    DEFERRED.with(|d| d.stats.set(std::ptr::null()));
}

impl BlockStats {
    /// This thread's deferred counts, if they are this BlockStats'.
    fn deferred<R>(&self, f: impl FnOnce(&Deferred) -> R) -> Option<R> {
        DEFERRED.with(|d| {
            std::ptr::eq(d.stats.get(), self).then(|| {
                d.pending.set(true);
                f(d)
            })
        })
    }

    pub fn kind(&self, kind: IoKind) -> &KindStats {
        &self.kinds[kind as usize]
    }

    pub fn record_done(&self, kind: IoKind, bytes: u64, started: Instant, ok: bool) {
        let now = crate::io::now();
        let ns =
            u64::try_from(now.saturating_duration_since(started).as_nanos()).unwrap_or(u64::MAX);
        let deferred = self.deferred(|d| {
            let c = &d.counts[kind as usize];
            if ok {
                c[0].set(c[0].get() + 1);
                c[1].set(c[1].get() + bytes);
            } else {
                c[2].set(c[2].get() + 1);
            }
            c[3].set(c[3].get().saturating_add(ns));
        });
        if deferred.is_none() {
            let k = self.kind(kind);
            if ok {
                k.ops.fetch_add(1, Ordering::Relaxed);
                k.bytes.fetch_add(bytes, Ordering::Relaxed);
            } else {
                k.failed.fetch_add(1, Ordering::Relaxed);
            }
            k.total_time_ns.fetch_add(ns, Ordering::Relaxed);
        }
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
        if self
            .deferred(|d| d.highest.set(d.highest.get().max(end)))
            .is_none()
        {
            self.wr_highest_offset.fetch_max(end, Ordering::Relaxed);
        }
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

    #[test]
    fn deferred_counts_reach_the_stats_when_published() {
        let mine = BlockStats::default();
        let other = BlockStats::default();
        let t = Instant::now();
        // SAFETY: both outlive the stop_deferring below.
        unsafe { defer_on_this_thread(&mine) };
        mine.record_done(IoKind::Read, 4096, t, true);
        mine.record_done(IoKind::Read, 512, t, true);
        mine.record_done(IoKind::Write, 4096, t, false);
        mine.record_write_end(8192);
        mine.record_write_end(4096);
        other.record_done(IoKind::Read, 4096, t, true);
        // Not in yet, except for the BlockStats this thread does not defer.
        assert_eq!(mine.kind(IoKind::Read).ops.load(Ordering::Relaxed), 0);
        assert_eq!(mine.wr_highest_offset.load(Ordering::Relaxed), 0);
        assert_eq!(other.kind(IoKind::Read).ops.load(Ordering::Relaxed), 1);
        publish_deferred();
        assert_eq!(mine.kind(IoKind::Read).ops.load(Ordering::Relaxed), 2);
        assert_eq!(mine.kind(IoKind::Read).bytes.load(Ordering::Relaxed), 4608);
        assert_eq!(mine.kind(IoKind::Write).ops.load(Ordering::Relaxed), 0);
        assert_eq!(mine.kind(IoKind::Write).failed.load(Ordering::Relaxed), 1);
        assert_eq!(mine.wr_highest_offset.load(Ordering::Relaxed), 8192);
        // Another thread counts at once.
        std::thread::scope(|s| {
            s.spawn(|| mine.record_done(IoKind::Flush, 0, t, true));
        });
        assert_eq!(mine.kind(IoKind::Flush).ops.load(Ordering::Relaxed), 1);
        // Stopping publishes what is left.
        mine.record_done(IoKind::Read, 1, t, true);
        stop_deferring();
        assert_eq!(mine.kind(IoKind::Read).ops.load(Ordering::Relaxed), 3);
        mine.record_done(IoKind::Read, 1, t, true);
        assert_eq!(mine.kind(IoKind::Read).ops.load(Ordering::Relaxed), 4);
    }
}
