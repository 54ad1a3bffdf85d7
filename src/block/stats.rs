//! I/O accounting of a BlockBackend: operations, bytes, failures and time per
//! kind of request. Lock-free counters; each queue's requests add to them.

use std::sync::atomic::{AtomicU64, Ordering};
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

/// Accounting of one BlockBackend.
#[derive(Default, Debug)]
pub struct BlockStats {
    kinds: [KindStats; 5],
    /// One past the highest byte ever written.
    pub wr_highest_offset: AtomicU64,
    last_access_ns: AtomicU64,
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
        let ns = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        k.total_time_ns.fetch_add(ns, Ordering::Relaxed);
        self.last_access_ns.store(monotonic_ns(), Ordering::Relaxed);
    }

    pub fn record_invalid(&self, kind: IoKind) {
        self.kind(kind).invalid.fetch_add(1, Ordering::Relaxed);
    }

    pub fn record_write_end(&self, end: u64) {
        self.wr_highest_offset.fetch_max(end, Ordering::Relaxed);
    }

    /// Time since the last completed request, if any.
    pub fn idle_time(&self) -> Option<Duration> {
        let last = self.last_access_ns.load(Ordering::Relaxed);
        (last != 0).then(|| Duration::from_nanos(monotonic_ns().saturating_sub(last)))
    }
}

fn monotonic_ns() -> u64 {
    use std::sync::OnceLock;
    static START: OnceLock<Instant> = OnceLock::new();
    let start = *START.get_or_init(Instant::now);
    u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX) + 1
}
