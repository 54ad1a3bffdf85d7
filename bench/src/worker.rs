//! Per-queue submit/refill loop.

use crate::hist::Histogram;
use anyhow::{anyhow, bail, Result};
use blkio::{Blkioq, Completion, Errno, ReqFlags};
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// How long an event-mode `do_io()` may block without any completion before
/// the run is declared stuck.
const STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Event-mode waits are cut into slices this long so the abort flag is seen
/// even when the backend has stopped answering.
const WAIT_SLICE: Duration = Duration::from_millis(200);

/// Access pattern of one worker.
#[derive(Clone, Copy, Debug)]
pub enum Pattern {
    /// Uniformly random `bs`-aligned offsets in `[0, size)`.
    Random { size: u64 },
    /// Sequential within `[start, end)`, wrapping around.
    Sequential { start: u64, end: u64 },
}

/// Everything one queue's thread needs; plain data so it can cross threads.
#[derive(Clone, Copy, Debug)]
pub struct WorkerConfig {
    pub queue_index: usize,
    pub pattern: Pattern,
    /// Percentage of reads (0..=100); 100 = read only, 0 = write only.
    pub read_pct: u32,
    pub bs: u64,
    pub iodepth: usize,
    pub poll: bool,
    /// Buffer segments per request (1 unless bs exceeds the device's max segment size).
    pub segments: usize,
    /// Start address of this queue's `iodepth * bs` bytes inside the mapped memory region.
    pub buf_base: usize,
    pub seed: u64,
    pub ramp_end: Instant,
    pub end: Instant,
}

/// Counters and latency histograms for one direction.
#[derive(Clone, Default)]
pub struct DirResult {
    pub ios: u64,
    pub bytes: u64,
    pub hist: Histogram,
}

impl DirResult {
    pub fn merge(&mut self, other: &DirResult) {
        self.ios += other.ios;
        self.bytes += other.bytes;
        self.hist.merge(&other.hist);
    }
}

/// What a worker measured inside the window `[ramp_end, end)`.
#[derive(Clone, Default)]
pub struct WorkerResult {
    pub read: DirResult,
    pub write: DirResult,
    /// `do_io()` calls made in the window and completions they returned
    /// (batching efficiency).
    pub do_io_calls: u64,
    pub do_io_completions: u64,
}

/// splitmix64: tiny, fast, good enough for offsets.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, n)` (Lemire's multiply-shift; bias is negligible here).
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(n)) >> 64) as u64
    }
}

#[derive(Clone, Copy)]
struct Slot {
    submitted: Instant,
    offset: u64,
    is_write: bool,
}

struct Generator {
    cfg: WorkerConfig,
    rng: Rng,
    seq_next: u64,
}

impl Generator {
    fn next(&mut self) -> (u64, bool) {
        let bs = self.cfg.bs;
        let offset = match self.cfg.pattern {
            Pattern::Random { size } => self.rng.below(size / bs) * bs,
            Pattern::Sequential { start, end } => {
                let off = self.seq_next;
                self.seq_next += bs;
                if self.seq_next + bs > end {
                    self.seq_next = start;
                }
                off
            }
        };
        let is_write = match self.cfg.read_pct {
            100 => false,
            0 => true,
            pct => self.rng.below(100) >= u64::from(pct),
        };
        (offset, is_write)
    }
}

/// Runs the submit/refill loop on `q` until `cfg.end`, then drains.
pub fn run(mut q: Blkioq, cfg: WorkerConfig, abort: &AtomicBool) -> Result<WorkerResult> {
    let bs = cfg.bs as usize;
    let seg_len = bs.div_ceil(cfg.segments);
    let start = match cfg.pattern {
        Pattern::Sequential { start, .. } => start,
        Pattern::Random { .. } => 0,
    };
    let mut gen = Generator {
        cfg,
        rng: Rng(cfg.seed),
        seq_next: start,
    };

    // Per-slot iovec arrays, only used when a request needs more than one
    // segment. Allocated once; never resized, so the pointers handed to
    // readv/writev stay valid while requests are in flight.
    let mut iovecs: Vec<blkio::iovec> = Vec::new();
    if cfg.segments > 1 {
        for slot in 0..cfg.iodepth {
            let base = cfg.buf_base + slot * bs;
            let mut done = 0;
            while done < bs {
                let len = seg_len.min(bs - done);
                iovecs.push(blkio::iovec {
                    iov_base: (base + done) as *mut libc::c_void,
                    iov_len: len,
                });
                done += len;
            }
        }
    }
    let iov_per_slot = if cfg.segments > 1 {
        iovecs.len() / cfg.iodepth
    } else {
        0
    };

    let now = Instant::now();
    let mut slots = vec![
        Slot {
            submitted: now,
            offset: 0,
            is_write: false,
        };
        cfg.iodepth
    ];
    let mut completions: Vec<MaybeUninit<Completion>> =
        (0..cfg.iodepth).map(|_| MaybeUninit::uninit()).collect();

    let mut submit = |q: &mut Blkioq, slots: &mut [Slot], slot: usize, now: Instant| {
        let (offset, is_write) = gen.next();
        slots[slot] = Slot {
            submitted: now,
            offset,
            is_write,
        };
        let buf = cfg.buf_base + slot * bs;
        let flags = ReqFlags::empty();
        if cfg.segments > 1 {
            let iov = iovecs[slot * iov_per_slot..].as_ptr();
            let cnt = iov_per_slot as u32;
            if is_write {
                q.writev(offset, iov, cnt, slot, flags);
            } else {
                q.readv(offset, iov, cnt, slot, flags);
            }
        } else if is_write {
            q.write(offset, buf as *const u8, bs, slot, flags);
        } else {
            q.read(offset, buf as *mut u8, bs, slot, flags);
        }
    };

    let mut res = WorkerResult::default();
    let mut inflight = 0usize;
    for slot in 0..cfg.iodepth {
        submit(&mut q, &mut slots, slot, Instant::now());
        inflight += 1;
    }

    let min_completions = if cfg.poll { 0 } else { 1 };
    let mut measuring = false;
    let mut stopping = false;
    let mut last_progress = Instant::now();

    loop {
        let n = if cfg.poll {
            q.do_io(&mut completions, min_completions, None, None)
        } else {
            let mut timeout = WAIT_SLICE;
            q.do_io(&mut completions, min_completions, Some(&mut timeout), None)
        };
        let n = match n {
            Ok(n) => n,
            // Timed-out completions are kept by libblkio for the next call.
            Err(e) if e.errno() == Errno::TIME => 0,
            Err(e) => bail!("queue {}: do_io failed: {e}", cfg.queue_index),
        };
        let now = Instant::now();
        if abort.load(Ordering::Relaxed) {
            // Another thread (or the backend monitor) reports the error; the
            // requests still in flight are abandoned, their buffers stay
            // mapped until the Blkio instance is dropped.
            return Ok(res);
        }

        if !measuring && now >= cfg.ramp_end {
            res = WorkerResult::default();
            measuring = true;
        }
        if !stopping && now >= cfg.end {
            stopping = true;
        }
        let in_window = measuring && now < cfg.end;
        if in_window {
            res.do_io_calls += 1;
            res.do_io_completions += n as u64;
        }

        for c in &completions[..n] {
            // SAFETY: do_io() initialised the first n elements.
            let c = unsafe { c.assume_init_read() };
            let slot = c.user_data;
            let s = slots[slot];
            inflight -= 1;
            if c.ret != 0 {
                let err = std::io::Error::from_raw_os_error(-c.ret);
                return Err(anyhow!(
                    "queue {}: {} of {} bytes at offset {} failed: {err}",
                    cfg.queue_index,
                    if s.is_write { "write" } else { "read" },
                    bs,
                    s.offset
                ));
            }
            if in_window {
                let dir = if s.is_write {
                    &mut res.write
                } else {
                    &mut res.read
                };
                dir.ios += 1;
                dir.bytes += bs as u64;
                dir.hist
                    .record(now.saturating_duration_since(s.submitted).as_nanos() as u64);
            }
            if !stopping {
                submit(&mut q, &mut slots, slot, now);
                inflight += 1;
            }
        }

        if stopping && inflight == 0 {
            break;
        }
        if n > 0 {
            last_progress = now;
        } else if now.duration_since(last_progress) > STALL_TIMEOUT {
            bail!(
                "queue {}: no completion within {:?} ({inflight} requests in flight)",
                cfg.queue_index,
                STALL_TIMEOUT
            );
        }
    }

    if !measuring {
        // Window never started (cannot happen unless the clock misbehaves).
        res = WorkerResult::default();
    }
    Ok(res)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gen(pattern: Pattern, read_pct: u32) -> Generator {
        let now = Instant::now();
        let start = match pattern {
            Pattern::Sequential { start, .. } => start,
            Pattern::Random { .. } => 0,
        };
        Generator {
            cfg: WorkerConfig {
                queue_index: 0,
                pattern,
                read_pct,
                bs: 4096,
                iodepth: 1,
                poll: false,
                segments: 1,
                buf_base: 0,
                seed: 42,
                ramp_end: now,
                end: now,
            },
            rng: Rng(42),
            seq_next: start,
        }
    }

    #[test]
    fn random_offsets_are_aligned_and_in_range() {
        let mut g = gen(Pattern::Random { size: 1 << 20 }, 50);
        let mut writes = 0;
        for _ in 0..10_000 {
            let (off, w) = g.next();
            assert_eq!(off % 4096, 0);
            assert!(off + 4096 <= 1 << 20);
            writes += u32::from(w);
        }
        assert!((4000..6000).contains(&writes), "writes {writes}");
    }

    #[test]
    fn sequential_wraps_within_range() {
        let mut g = gen(
            Pattern::Sequential {
                start: 8192,
                end: 8192 + 3 * 4096,
            },
            100,
        );
        let offs: Vec<u64> = (0..5).map(|_| g.next().0).collect();
        assert_eq!(offs, vec![8192, 12288, 16384, 8192, 12288]);
        assert!(!g.next().1);
    }
}
