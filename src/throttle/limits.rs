//! Throttle limits and QEMU's leaky-bucket arithmetic (util/throttle.c),
//! pure code with an injected clock: `now` is nanoseconds on any monotonic
//! clock the caller chooses.
//!
//! ```text
//!   six buckets: bps {total, read, write}, iops {total, read, write}
//!   account(dir, bytes):  level += bytes (bps) / units (iops), for total and dir
//!   leak(now):            level -= avg * elapsed   (burst_level at max rate)
//!   wait(dir):            time until the fullest relevant bucket is below
//!                         its size (avg/10, or max * max-length with bursts)
//! ```

use serde::{Deserialize, Serialize};

use crate::opts;

/// Largest accepted rate, as QEMU's THROTTLE_VALUE_MAX.
pub const VALUE_MAX: u64 = 1_000_000_000_000_000;
const NS_PER_SEC: f64 = 1e9;

/// QAPI's ThrottleLimits (qapi/block-core.json): every field optional.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ThrottleLimits {
    #[serde(
        default,
        deserialize_with = "opts::opt_uint",
        skip_serializing_if = "Option::is_none"
    )]
    pub iops_total: Option<u64>,
    #[serde(
        default,
        deserialize_with = "opts::opt_uint",
        skip_serializing_if = "Option::is_none"
    )]
    pub iops_total_max: Option<u64>,
    #[serde(
        default,
        deserialize_with = "opts::opt_uint",
        skip_serializing_if = "Option::is_none"
    )]
    pub iops_total_max_length: Option<u64>,
    #[serde(
        default,
        deserialize_with = "opts::opt_uint",
        skip_serializing_if = "Option::is_none"
    )]
    pub iops_read: Option<u64>,
    #[serde(
        default,
        deserialize_with = "opts::opt_uint",
        skip_serializing_if = "Option::is_none"
    )]
    pub iops_read_max: Option<u64>,
    #[serde(
        default,
        deserialize_with = "opts::opt_uint",
        skip_serializing_if = "Option::is_none"
    )]
    pub iops_read_max_length: Option<u64>,
    #[serde(
        default,
        deserialize_with = "opts::opt_uint",
        skip_serializing_if = "Option::is_none"
    )]
    pub iops_write: Option<u64>,
    #[serde(
        default,
        deserialize_with = "opts::opt_uint",
        skip_serializing_if = "Option::is_none"
    )]
    pub iops_write_max: Option<u64>,
    #[serde(
        default,
        deserialize_with = "opts::opt_uint",
        skip_serializing_if = "Option::is_none"
    )]
    pub iops_write_max_length: Option<u64>,
    #[serde(
        default,
        deserialize_with = "opts::opt_size",
        skip_serializing_if = "Option::is_none"
    )]
    pub bps_total: Option<u64>,
    #[serde(
        default,
        deserialize_with = "opts::opt_size",
        skip_serializing_if = "Option::is_none"
    )]
    pub bps_total_max: Option<u64>,
    #[serde(
        default,
        deserialize_with = "opts::opt_uint",
        skip_serializing_if = "Option::is_none"
    )]
    pub bps_total_max_length: Option<u64>,
    #[serde(
        default,
        deserialize_with = "opts::opt_size",
        skip_serializing_if = "Option::is_none"
    )]
    pub bps_read: Option<u64>,
    #[serde(
        default,
        deserialize_with = "opts::opt_size",
        skip_serializing_if = "Option::is_none"
    )]
    pub bps_read_max: Option<u64>,
    #[serde(
        default,
        deserialize_with = "opts::opt_uint",
        skip_serializing_if = "Option::is_none"
    )]
    pub bps_read_max_length: Option<u64>,
    #[serde(
        default,
        deserialize_with = "opts::opt_size",
        skip_serializing_if = "Option::is_none"
    )]
    pub bps_write: Option<u64>,
    #[serde(
        default,
        deserialize_with = "opts::opt_size",
        skip_serializing_if = "Option::is_none"
    )]
    pub bps_write_max: Option<u64>,
    #[serde(
        default,
        deserialize_with = "opts::opt_uint",
        skip_serializing_if = "Option::is_none"
    )]
    pub bps_write_max_length: Option<u64>,
    #[serde(
        default,
        deserialize_with = "opts::opt_size",
        skip_serializing_if = "Option::is_none"
    )]
    pub iops_size: Option<u64>,
}

/// One bucket's name, average, maximum and burst length.
type BucketLimits = (&'static str, Option<u64>, Option<u64>, Option<u64>);

/// The direction of a request, for the read/write buckets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Read = 0,
    Write = 1,
}

#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Bucket {
    avg: f64,
    max: f64,
    burst_length: f64,
    level: f64,
    burst_level: f64,
}

impl Bucket {
    fn new(avg: Option<u64>, max: Option<u64>, length: Option<u64>) -> Self {
        Bucket {
            avg: avg.unwrap_or(0) as f64,
            max: max.unwrap_or(0) as f64,
            burst_length: length.unwrap_or(1) as f64,
            level: 0.0,
            burst_level: 0.0,
        }
    }

    fn leak(&mut self, delta_ns: f64) {
        let leak = self.avg * delta_ns / NS_PER_SEC;
        self.level = (self.level - leak).max(0.0);
        if self.burst_length > 1.0 {
            let leak = self.max * delta_ns / NS_PER_SEC;
            self.burst_level = (self.burst_level - leak).max(0.0);
        }
    }

    fn add(&mut self, units: f64) {
        self.level += units;
        if self.burst_length > 1.0 {
            self.burst_level += units;
        }
    }

    /// Nanoseconds until a request may go, as QEMU's throttle_compute_wait.
    fn wait_ns(&self) -> u64 {
        if self.avg == 0.0 {
            return 0;
        }
        let (bucket_size, burst_bucket_size) = if self.max == 0.0 {
            // Without a burst rate, still allow short bursts (avg / 10).
            (self.avg / 10.0, 0.0)
        } else {
            (self.max * self.burst_length, self.max / 10.0)
        };
        let extra = self.level - bucket_size;
        if extra > 0.0 {
            return (extra * NS_PER_SEC / self.avg) as u64;
        }
        if self.burst_length > 1.0 {
            let extra = self.burst_level - burst_bucket_size;
            if extra > 0.0 {
                return (extra * NS_PER_SEC / self.max) as u64;
            }
        }
        0
    }
}

// Bucket order.
const BPS_TOTAL: usize = 0;
const BPS_READ: usize = 1;
const BPS_WRITE: usize = 2;
const OPS_TOTAL: usize = 3;
const OPS_READ: usize = 4;
const OPS_WRITE: usize = 5;

/// The state of one throttle group's buckets.
#[derive(Clone, Debug)]
pub struct ThrottleState {
    limits: ThrottleLimits,
    buckets: [Bucket; 6],
    op_size: u64,
    previous_leak: u64,
}

impl ThrottleLimits {
    /// QEMU's throttle_is_valid, with its messages.
    pub fn validate(&self) -> Result<(), String> {
        let both = |t: Option<u64>, r: Option<u64>, w: Option<u64>| {
            t.unwrap_or(0) > 0 && (r.unwrap_or(0) > 0 || w.unwrap_or(0) > 0)
        };
        if both(self.bps_total, self.bps_read, self.bps_write)
            || both(self.iops_total, self.iops_read, self.iops_write)
            || both(self.bps_total_max, self.bps_read_max, self.bps_write_max)
            || both(self.iops_total_max, self.iops_read_max, self.iops_write_max)
        {
            return Err(
                "bps/iops/max total values and read/write values cannot be used at the same time"
                    .into(),
            );
        }
        if self.iops_size.unwrap_or(0) > 0
            && [self.iops_total, self.iops_read, self.iops_write]
                .iter()
                .all(|v| v.unwrap_or(0) == 0)
        {
            return Err("iops size requires an iops value to be set".into());
        }
        for (name, avg, max, len) in self.triples() {
            let (avg, max) = (avg.unwrap_or(0), max.unwrap_or(0));
            let len = len.unwrap_or(1);
            if avg > VALUE_MAX || max > VALUE_MAX {
                return Err(format!(
                    "bps/iops/max values must be within [0, {VALUE_MAX}] ({name})"
                ));
            }
            if len == 0 {
                return Err(format!("the burst length cannot be 0 ({name}-max-length)"));
            }
            if len > 1 && max == 0 {
                return Err(format!(
                    "burst length set without burst rate ({name}-max-length)"
                ));
            }
            if max > 0 && len > VALUE_MAX / max {
                return Err(format!(
                    "burst length too high for this burst rate ({name})"
                ));
            }
            if max > 0 && avg == 0 {
                return Err(format!(
                    "bps_max/iops_max require corresponding bps/iops values ({name}-max)"
                ));
            }
            if max > 0 && max < avg {
                return Err(format!(
                    "bps_max/iops_max cannot be lower than bps/iops ({name}-max)"
                ));
            }
        }
        Ok(())
    }

    fn triples(&self) -> [BucketLimits; 6] {
        [
            (
                "bps-total",
                self.bps_total,
                self.bps_total_max,
                self.bps_total_max_length,
            ),
            (
                "bps-read",
                self.bps_read,
                self.bps_read_max,
                self.bps_read_max_length,
            ),
            (
                "bps-write",
                self.bps_write,
                self.bps_write_max,
                self.bps_write_max_length,
            ),
            (
                "iops-total",
                self.iops_total,
                self.iops_total_max,
                self.iops_total_max_length,
            ),
            (
                "iops-read",
                self.iops_read,
                self.iops_read_max,
                self.iops_read_max_length,
            ),
            (
                "iops-write",
                self.iops_write,
                self.iops_write_max,
                self.iops_write_max_length,
            ),
        ]
    }

    /// Every field, unset ones as 0 (burst lengths as 1), as qom-get shows them.
    pub fn filled(&self) -> ThrottleLimits {
        let z = |v: Option<u64>| Some(v.unwrap_or(0));
        let one = |v: Option<u64>| Some(v.unwrap_or(1));
        ThrottleLimits {
            iops_total: z(self.iops_total),
            iops_total_max: z(self.iops_total_max),
            iops_total_max_length: one(self.iops_total_max_length),
            iops_read: z(self.iops_read),
            iops_read_max: z(self.iops_read_max),
            iops_read_max_length: one(self.iops_read_max_length),
            iops_write: z(self.iops_write),
            iops_write_max: z(self.iops_write_max),
            iops_write_max_length: one(self.iops_write_max_length),
            bps_total: z(self.bps_total),
            bps_total_max: z(self.bps_total_max),
            bps_total_max_length: one(self.bps_total_max_length),
            bps_read: z(self.bps_read),
            bps_read_max: z(self.bps_read_max),
            bps_read_max_length: one(self.bps_read_max_length),
            bps_write: z(self.bps_write),
            bps_write_max: z(self.bps_write_max),
            bps_write_max_length: one(self.bps_write_max_length),
            iops_size: z(self.iops_size),
        }
    }
}

impl ThrottleState {
    /// A state for `limits` (already validated), starting at `now`.
    pub fn new(limits: ThrottleLimits, now: u64) -> Self {
        let t = limits.triples();
        let buckets = std::array::from_fn(|i| Bucket::new(t[i].1, t[i].2, t[i].3));
        ThrottleState {
            op_size: limits.iops_size.unwrap_or(0),
            limits,
            buckets,
            previous_leak: now,
        }
    }

    pub fn limits(&self) -> &ThrottleLimits {
        &self.limits
    }

    /// Whether any limit is set.
    pub fn is_enabled(&self) -> bool {
        self.buckets.iter().any(|b| b.avg > 0.0)
    }

    fn leak(&mut self, now: u64) {
        if now <= self.previous_leak {
            return;
        }
        let delta = (now - self.previous_leak) as f64;
        self.previous_leak = now;
        for b in &mut self.buckets {
            b.leak(delta);
        }
    }

    fn relevant(dir: Direction) -> [usize; 4] {
        match dir {
            Direction::Read => [BPS_TOTAL, BPS_READ, OPS_TOTAL, OPS_READ],
            Direction::Write => [BPS_TOTAL, BPS_WRITE, OPS_TOTAL, OPS_WRITE],
        }
    }

    /// Nanoseconds a request in `dir` must wait at `now` (0: it may go).
    pub fn wait_ns(&mut self, now: u64, dir: Direction) -> u64 {
        self.leak(now);
        Self::relevant(dir)
            .iter()
            .map(|&i| self.buckets[i].wait_ns())
            .max()
            .unwrap_or(0)
    }

    /// Counts a request of `bytes` that goes now.
    pub fn account(&mut self, dir: Direction, bytes: u64) {
        let units = if self.op_size > 0 && bytes > self.op_size {
            bytes as f64 / self.op_size as f64
        } else {
            1.0
        };
        let [bt, bd, ot, od] = Self::relevant(dir);
        self.buckets[bt].add(bytes as f64);
        self.buckets[bd].add(bytes as f64);
        self.buckets[ot].add(units);
        self.buckets[od].add(units);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    fn limits(f: impl FnOnce(&mut ThrottleLimits)) -> ThrottleLimits {
        let mut l = ThrottleLimits::default();
        f(&mut l);
        l
    }

    /// Issues requests as fast as the state allows for `secs` of simulated
    /// time; returns how many went.
    fn run(st: &mut ThrottleState, dir: Direction, bytes: u64, secs: u64) -> u64 {
        run_between(st, dir, bytes, 0, secs)
    }

    /// The same, from second `from` to second `to` of simulated time.
    fn run_between(st: &mut ThrottleState, dir: Direction, bytes: u64, from: u64, to: u64) -> u64 {
        let (mut now, mut n) = (from * SEC, 0u64);
        // Unthrottled requests cost no simulated time: stop at a bound.
        while now < to * SEC && n < 10_000_000 {
            let w = st.wait_ns(now, dir);
            if w > 0 {
                now += w;
                continue;
            }
            st.account(dir, bytes);
            n += 1;
        }
        n
    }

    #[test]
    fn iops_limit_holds_over_time() {
        let mut st = ThrottleState::new(limits(|l| l.iops_total = Some(1000)), 0);
        let n = run(&mut st, Direction::Read, 4096, 10);
        // 10 s at 1000/s, plus the initial bucket of avg/10.
        assert!((10_000..=10_101).contains(&n), "{n}");
    }

    #[test]
    fn bps_limit_holds_and_counts_bytes() {
        let mut st = ThrottleState::new(limits(|l| l.bps_total = Some(10 << 20)), 0);
        let n = run(&mut st, Direction::Write, 64 << 10, 10);
        let bytes = n * (64 << 10);
        assert!(
            (100 << 20..=(101 << 20) + (64 << 10)).contains(&bytes),
            "{bytes}"
        );
    }

    #[test]
    fn burst_runs_at_max_for_max_length_then_falls_to_avg() {
        let l = limits(|l| {
            l.iops_total = Some(100);
            l.iops_total_max = Some(1000);
            l.iops_total_max_length = Some(5);
        });
        let mut st = ThrottleState::new(l, 0);
        // The burst bucket holds max * length = 5000 ops, taken at up to
        // 1000/s (plus 100/s refill).
        let first = run(&mut st, Direction::Read, 512, 5);
        assert!((5000..=5600).contains(&first), "{first}");
        // The burst bucket also leaks at avg while bursting, so the burst
        // lasts a little over max-length; measure the average after it.
        run_between(&mut st, Direction::Read, 512, 5, 10);
        let later = run_between(&mut st, Direction::Read, 512, 10, 20);
        assert!((900..=1100).contains(&later), "{later} in 10 s at 100/s");
    }

    #[test]
    fn read_and_write_limits_are_separate() {
        let mut st = ThrottleState::new(limits(|l| l.iops_read = Some(100)), 0);
        assert_eq!(
            run(&mut st, Direction::Write, 4096, 1),
            10_000_000,
            "writes are not limited"
        );
        let mut st = ThrottleState::new(limits(|l| l.iops_read = Some(100)), 0);
        assert!(run(&mut st, Direction::Read, 4096, 1) <= 111);
    }

    #[test]
    fn iops_size_counts_large_requests_as_several() {
        let l = limits(|l| {
            l.iops_total = Some(100);
            l.iops_size = Some(4096);
        });
        let mut st = ThrottleState::new(l, 0);
        let n = run(&mut st, Direction::Read, 16384, 10);
        assert!((250..=260).contains(&n), "{n}: each counts as 4");
    }

    #[test]
    fn elapsed_time_refills_the_bucket() {
        let mut st = ThrottleState::new(limits(|l| l.iops_total = Some(10)), 0);
        st.account(Direction::Read, 1);
        st.account(Direction::Read, 1);
        assert!(st.wait_ns(0, Direction::Read) > 0);
        assert_eq!(st.wait_ns(SEC, Direction::Read), 0);
    }

    #[test]
    fn validation_follows_qemu() {
        let bad = [
            (
                limits(|l| {
                    l.iops_total = Some(1);
                    l.iops_read = Some(1)
                }),
                "same time",
            ),
            (
                limits(|l| {
                    l.bps_total = Some(10);
                    l.bps_total_max = Some(5)
                }),
                "cannot be lower",
            ),
            (
                limits(|l| l.bps_total_max = Some(5)),
                "require corresponding",
            ),
            (
                limits(|l| {
                    l.iops_total = Some(1);
                    l.iops_total_max_length = Some(0)
                }),
                "cannot be 0",
            ),
            (
                limits(|l| {
                    l.iops_total = Some(1);
                    l.iops_total_max_length = Some(5)
                }),
                "without burst rate",
            ),
            (limits(|l| l.iops_total = Some(VALUE_MAX + 1)), "within"),
            (
                limits(|l| {
                    l.iops_total = Some(10);
                    l.iops_total_max = Some(VALUE_MAX);
                    l.iops_total_max_length = Some(2)
                }),
                "too high",
            ),
            (limits(|l| l.iops_size = Some(4096)), "iops size"),
        ];
        for (l, needle) in bad {
            let e = l.validate().unwrap_err();
            assert!(e.contains(needle), "{e}");
        }
        assert!(limits(|l| {
            l.iops_total = Some(u64::from(u32::MAX));
            l.bps_read = Some(VALUE_MAX)
        })
        .validate()
        .is_ok());
    }

    #[test]
    fn extreme_limits_do_not_overflow() {
        let mut st = ThrottleState::new(
            limits(|l| {
                l.bps_total = Some(VALUE_MAX);
                l.iops_total = Some(VALUE_MAX)
            }),
            0,
        );
        for _ in 0..1000 {
            st.account(Direction::Write, u64::MAX / 2);
        }
        let w = st.wait_ns(u64::MAX / 2, Direction::Write);
        assert!(w < 1000 * SEC);
    }
}
