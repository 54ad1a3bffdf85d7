//! A job's `speed` limit (bytes per second), as QEMU's ratelimit.h: time
//! is cut into 100 ms slices, each with a quota of bytes; a chunk that
//! goes past the quota extends the slice by as much, and the job sleeps
//! until the slice ends. Pure: the clock is passed in.

use std::time::{Duration, Instant};

const SLICE: Duration = Duration::from_millis(100);

#[derive(Debug, Default)]
pub struct RateLimit {
    slice_start: Option<Instant>,
    slice_end: Option<Instant>,
    dispatched: u64,
}

impl RateLimit {
    /// How long to wait after sending `n` bytes at `now`, with `speed`
    /// bytes per second (0: no limit).
    pub fn delay(&mut self, speed: u64, now: Instant, n: u64) -> Duration {
        if speed == 0 {
            return Duration::ZERO;
        }
        let quota = (speed as u128 * SLICE.as_nanos() / 1_000_000_000).max(1) as u64;
        if self.slice_end.is_none_or(|end| end < now) {
            self.slice_start = Some(now);
            self.slice_end = Some(now + SLICE);
            self.dispatched = 0;
        }
        self.dispatched += n;
        if self.dispatched < quota {
            return Duration::ZERO;
        }
        let start = self.slice_start.unwrap_or(now);
        let slices = self.dispatched as f64 / quota as f64;
        let end = start + SLICE.mul_f64(slices);
        self.slice_end = Some(end);
        end.saturating_duration_since(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_average_rate_is_the_speed() {
        let mut r = RateLimit::default();
        let t0 = Instant::now();
        let mut now = t0;
        // 10 MiB in 64 KiB chunks at 1 MiB/s: 10 s of sleeping.
        for _ in 0..160 {
            now += r.delay(1 << 20, now, 64 << 10);
        }
        let took = (now - t0).as_secs_f64();
        assert!((9.5..=10.1).contains(&took), "{took}");
    }

    #[test]
    fn no_speed_means_no_wait_and_small_chunks_go_at_once() {
        let mut r = RateLimit::default();
        let now = Instant::now();
        assert_eq!(r.delay(0, now, 1 << 30), Duration::ZERO);
        assert_eq!(r.delay(10 << 20, now, 4096), Duration::ZERO);
        // A chunk bigger than a slice's quota waits for its share.
        let d = r.delay(1 << 20, now, 1 << 20);
        assert!(d > Duration::from_millis(900), "{d:?}");
    }
}
