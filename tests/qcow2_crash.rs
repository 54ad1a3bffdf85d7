//! Crash safety of the qcow2 driver: the daemon killed with SIGKILL in the
//! middle of a write load, ten times. Every image opens, `qemu-img check`
//! finds no corruption (leaked clusters at most), and every write
//! acknowledged before the last completed flush is there.
//!
//! ```text
//!   2 threads --libblkio, 2 queues--> daemon --qcow2--> top.qcow2 (16 MiB)
//!       \-- tracker: per 4 KiB block, the writes in order, which completed,
//!           which a completed flush covers
//!   main: SIGKILL the daemon after a few flushes, requests in flight
//!   then: qemu-img check, qemu-img convert -> raw, every block judged;
//!         reopen with the daemon, read it all back, SIGTERM, check again
//! ```
//!
//! Every block a write writes carries (block index, generation) in its
//! first 16 bytes and a pattern derived from both after that, so a block of
//! the image tells which write put it there. Writes in flight never overlap,
//! so the writes of one block are ordered: once write `d` of a block is
//! covered by a completed flush (it completed before the flush was
//! submitted), the block must hold write `d` or a later one.
//!
//! Rounds 0-4 use lazy_refcounts=off, rounds 5-9 lazy_refcounts=on; rounds
//! 3, 4, 8 and 9 write over a backing file qemu-img made. `QCOW2_CRASH_SEED`
//! fixes the seed (the kill timing still varies).

mod common;

use std::mem::MaybeUninit;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, Errno, MemoryRegion, ReqFlags};
use common::*;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const DRIVER: &str = "virtio-blk-vhost-user";

const IMG_SIZE: u64 = 16 * MIB;
/// The unit of the model: every write is a whole number of blocks.
const BLOCK: u64 = 4 * KIB;
const NBLOCKS: u64 = IMG_SIZE / BLOCK;
/// Largest write, in blocks (64 KiB).
const MAX_WRITE_BLOCKS: u64 = 16;
/// Requests in flight per queue.
const DEPTH: usize = 16;
const QUEUES: usize = 2;
/// A flush after this many writes (from either queue).
const FLUSH_EVERY: usize = 20;
/// user_data of a flush: this bit plus the flush's index.
const FLUSH_TAG: usize = 1 << 40;
/// Longest wait for a completion before the test declares a hang.
const IO_TIMEOUT: Duration = Duration::from_secs(20);
const ROUNDS: usize = 10;
/// First word of a block: its index xor this.
const MAGIC: u64 = 0x5143_4f57_3243_5253;

// ---------------------------------------------------------------------------
// Data patterns
// ---------------------------------------------------------------------------

/// splitmix64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.0)
    }

    /// Uniform in `[0, n)`.
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(n)) >> 64) as u64
    }
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Writes the content of block `idx` as generation `gen` wrote it (gen 0:
/// the backing file) into `out` (BLOCK bytes).
fn block_pattern_into(idx: u64, gen: u64, out: &mut [u8]) {
    debug_assert_eq!(out.len(), BLOCK as usize);
    let mut x = mix(idx.wrapping_mul(0x1000_0000_01b3) ^ gen.rotate_left(32) ^ MAGIC);
    for (i, w) in out.chunks_exact_mut(8).enumerate() {
        let v = match i {
            0 => idx ^ MAGIC,
            1 => gen,
            _ => {
                x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
                mix(x)
            }
        };
        w.copy_from_slice(&v.to_le_bytes());
    }
}

fn block_pattern(idx: u64, gen: u64) -> Vec<u8> {
    let mut v = vec![0u8; BLOCK as usize];
    block_pattern_into(idx, gen, &mut v);
    v
}

/// What a block of the image holds.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Found {
    Zero,
    /// The pattern of generation `.0` for this block.
    Gen(u64),
    /// A whole pattern, of another block.
    Misplaced {
        block: u64,
        gen: u64,
    },
    /// Neither: `sectors` is a bit mask of the 512-byte sectors that match
    /// the pattern the header names (a torn write shows as a partial mask).
    Garbage {
        word0: u64,
        word1: u64,
        sectors: u8,
    },
}

fn decode(idx: u64, data: &[u8]) -> Found {
    if data.iter().all(|&b| b == 0) {
        return Found::Zero;
    }
    let word0 = u64::from_le_bytes(data[0..8].try_into().unwrap());
    let word1 = u64::from_le_bytes(data[8..16].try_into().unwrap());
    let claimed = word0 ^ MAGIC;
    if claimed < NBLOCKS {
        let want = block_pattern(claimed, word1);
        if want == data {
            return if claimed == idx {
                Found::Gen(word1)
            } else {
                Found::Misplaced {
                    block: claimed,
                    gen: word1,
                }
            };
        }
        let mut sectors = 0u8;
        for (s, (a, b)) in data.chunks(512).zip(want.chunks(512)).enumerate() {
            if a == b {
                sectors |= 1 << s;
            }
        }
        return Found::Garbage {
            word0,
            word1,
            sectors,
        };
    }
    Found::Garbage {
        word0,
        word1,
        sectors: 0,
    }
}

// ---------------------------------------------------------------------------
// The model of what was written
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq)]
enum State {
    InFlight,
    /// Completed with success; the number is its place in the order of
    /// completions the test observed (1, 2, ...).
    Done(u64),
    Failed(i32),
}

#[derive(Clone, Debug)]
struct WriteRec {
    offset: u64,
    len: u64,
    queue: usize,
    state: State,
}

#[derive(Clone, Debug)]
struct FlushRec {
    queue: usize,
    /// Writes whose completion number is at most this one completed before
    /// the flush was submitted.
    covers: u64,
    state: State,
}

#[derive(Default)]
struct Tracker {
    /// Generation g is writes[g - 1].
    writes: Vec<WriteRec>,
    flushes: Vec<FlushRec>,
    /// Write completions observed so far.
    completed: u64,
    writes_since_flush: usize,
    /// The largest `covers` of a completed flush.
    durable: u64,
    flushes_done: usize,
    /// Generations in flight.
    in_flight: Vec<u64>,
    /// Per block, the generations that wrote it, in order.
    history: Vec<Vec<u64>>,
    /// Set (under the lock) just before the SIGKILL: failures are
    /// expected from then on.
    killed: bool,
    /// Requests in flight when the daemon was killed: (writes, flushes).
    at_kill: (usize, usize),
}

impl Tracker {
    fn new() -> Tracker {
        Tracker {
            history: vec![Vec::new(); NBLOCKS as usize],
            ..Default::default()
        }
    }

    fn write(&self, gen: u64) -> &WriteRec {
        &self.writes[gen as usize - 1]
    }

    fn overlaps_in_flight(&self, offset: u64, len: u64) -> bool {
        self.in_flight.iter().any(|&g| {
            let w = self.write(g);
            w.offset < offset + len && offset < w.offset + w.len
        })
    }

    fn covered(&self, gen: u64) -> bool {
        matches!(self.write(gen).state, State::Done(n) if n <= self.durable)
    }

    /// The flush that made `gen` durable (the first completed one covering it).
    fn covering_flush(&self, gen: u64) -> String {
        let State::Done(n) = self.write(gen).state else {
            return "none".into();
        };
        match self
            .flushes
            .iter()
            .position(|f| f.state == State::Done(0) && f.covers >= n)
        {
            Some(id) => format!(
                "#{id} (queue {}, covering completions up to #{})",
                self.flushes[id].queue, self.flushes[id].covers
            ),
            None => "none".into(),
        }
    }

    fn describe(&self, gen: u64) -> String {
        let w = self.write(gen);
        format!(
            "gen {gen} (write of {} KiB at {:#x} on queue {}, {:?})",
            w.len / KIB,
            w.offset,
            w.queue,
            w.state
        )
    }
}

// ---------------------------------------------------------------------------
// libblkio
// ---------------------------------------------------------------------------

/// A started libblkio instance with one mapped buffer region.
struct Client {
    // Queues drop before the instance: their rings live in its memory.
    queues: Vec<Blkioq>,
    region: MemoryRegion,
    /// Only kept alive (and dropped last).
    _blkio: Blkio,
}

impl Client {
    fn start(socket: &Path, queues: usize, buf_len: usize) -> Client {
        let mut blkio = Blkio::new(DRIVER).expect("libblkio instance");
        blkio
            .set_str("path", socket.to_str().unwrap())
            .expect("set path");
        blkio
            .connect()
            .unwrap_or_else(|e| panic!("connect: {e} ({:?})", e.errno()));
        blkio
            .set_i32("num-queues", queues as i32)
            .expect("num-queues");
        let started = blkio
            .start()
            .unwrap_or_else(|e| panic!("start: {e} ({:?})", e.errno()));
        assert_eq!(started.queues.len(), queues);
        let align = blkio
            .get_u64("mem-region-alignment")
            .expect("mem-region-alignment")
            .max(4096) as usize;
        let len = buf_len.div_ceil(align) * align;
        let region = blkio.alloc_mem_region(len).expect("alloc_mem_region");
        blkio.map_mem_region(&region).expect("map_mem_region");
        Client {
            queues: started.queues,
            region,
            _blkio: blkio,
        }
    }

    fn buf(&self) -> usize {
        self.region.addr
    }
}

/// Drops an instance whose daemon is gone, on another thread: if that
/// hangs, the instance is leaked (the thread stays blocked) instead of
/// hanging the test.
fn drop_dead_client(c: Client) -> &'static str {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        // Fields drop in order: the queues before the instance.
        drop(c);
        let _ = tx.send(());
    });
    match rx.recv_timeout(Duration::from_secs(5)) {
        Ok(()) => "dropped",
        Err(_) => "leaked (drop hung)",
    }
}

/// Copies `data` into mapped buffer memory at `addr`.
fn fill(addr: usize, data: &[u8]) {
    // SAFETY: callers pass an address inside the mapped region of the
    // test's libblkio instance with data.len() bytes after it, that no
    // request in flight uses.
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), addr as *mut u8, data.len()) };
}

/// Copies `len` bytes of mapped buffer memory at `addr` out.
fn peek(addr: usize, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    // SAFETY: as for `fill`.
    unsafe { std::ptr::copy_nonoverlapping(addr as *const u8, v.as_mut_ptr(), len) };
    v
}

/// Waits for at least one completion (at most `max`); (user_data, ret).
fn wait_some(q: &mut Blkioq, max: usize) -> Vec<(usize, i32)> {
    let mut c: Vec<MaybeUninit<Completion>> = (0..max).map(|_| MaybeUninit::uninit()).collect();
    let mut t = IO_TIMEOUT;
    let n = match q.do_io(&mut c, 1, Some(&mut t), None) {
        Ok(n) => n,
        Err(e) if e.errno() == Errno::TIME => panic!("no completion within {IO_TIMEOUT:?}"),
        Err(e) => panic!("do_io: {e} ({:?})", e.errno()),
    };
    c[..n]
        .iter()
        .map(|c| {
            // SAFETY: do_io initialised the first n completions.
            let c = unsafe { c.assume_init_read() };
            (c.user_data, c.ret)
        })
        .collect()
}

fn errno_name(ret: i32) -> String {
    format!("{ret} ({})", std::io::Error::from_raw_os_error(-ret))
}

// ---------------------------------------------------------------------------
// The write load
// ---------------------------------------------------------------------------

/// One queue's share of the load, until `stop`. Errors before the kill
/// are returned (and raise `failed`).
fn worker(
    qi: usize,
    q: &mut Blkioq,
    bufs: usize,
    seed: u64,
    tracker: &Mutex<Tracker>,
    stop: &AtomicBool,
) -> Result<(), String> {
    let mut rng = Rng(seed);
    // The generation each buffer slot is in flight with.
    let mut slots: Vec<Option<u64>> = vec![None; DEPTH];
    let mut comps: Vec<MaybeUninit<Completion>> =
        (0..2 * DEPTH).map(|_| MaybeUninit::uninit()).collect();
    let mut last_progress = Instant::now();
    let mut data = vec![0u8; (MAX_WRITE_BLOCKS * BLOCK) as usize];
    loop {
        if stop.load(Ordering::SeqCst) {
            return Ok(());
        }
        {
            let mut t = tracker.lock().unwrap();
            if !t.killed {
                while let Some(slot) = slots.iter().position(Option::is_none) {
                    if t.writes_since_flush >= FLUSH_EVERY {
                        t.writes_since_flush = 0;
                        let id = t.flushes.len();
                        let covers = t.completed;
                        t.flushes.push(FlushRec {
                            queue: qi,
                            covers,
                            state: State::InFlight,
                        });
                        q.flush(FLUSH_TAG | id, ReqFlags::empty());
                        continue;
                    }
                    // A range no write in flight touches.
                    let mut pick = None;
                    for _ in 0..16 {
                        let n = 1 + rng.below(MAX_WRITE_BLOCKS);
                        let first = rng.below(NBLOCKS - n + 1);
                        if !t.overlaps_in_flight(first * BLOCK, n * BLOCK) {
                            pick = Some((first, n));
                            break;
                        }
                    }
                    let Some((first, n)) = pick else { break };
                    let gen = t.writes.len() as u64 + 1;
                    t.writes.push(WriteRec {
                        offset: first * BLOCK,
                        len: n * BLOCK,
                        queue: qi,
                        state: State::InFlight,
                    });
                    t.in_flight.push(gen);
                    t.writes_since_flush += 1;
                    for b in first..first + n {
                        t.history[b as usize].push(gen);
                    }
                    let len = (n * BLOCK) as usize;
                    for (k, chunk) in data[..len].chunks_exact_mut(BLOCK as usize).enumerate() {
                        block_pattern_into(first + k as u64, gen, chunk);
                    }
                    let addr = bufs + slot * (MAX_WRITE_BLOCKS * BLOCK) as usize;
                    fill(addr, &data[..len]);
                    q.write(
                        first * BLOCK,
                        addr as *const u8,
                        len,
                        slot,
                        ReqFlags::empty(),
                    );
                    slots[slot] = Some(gen);
                }
            }
        }
        let mut timeout = Duration::from_millis(20);
        let n = match q.do_io(&mut comps, 1, Some(&mut timeout), None) {
            Ok(n) => n,
            Err(e) if e.errno() == Errno::TIME => 0,
            Err(e) => {
                if tracker.lock().unwrap().killed {
                    return Ok(());
                }
                return Err(format!("queue {qi}: do_io: {e} ({:?})", e.errno()));
            }
        };
        if n == 0 {
            let t = tracker.lock().unwrap();
            if !t.killed && last_progress.elapsed() > IO_TIMEOUT {
                return Err(format!(
                    "queue {qi}: no completion within {IO_TIMEOUT:?} ({} writes in flight)",
                    t.in_flight.len()
                ));
            }
            continue;
        }
        last_progress = Instant::now();
        let mut t = tracker.lock().unwrap();
        for c in &comps[..n] {
            // SAFETY: do_io initialised the first n completions.
            let c = unsafe { c.assume_init_read() };
            if c.user_data & FLUSH_TAG != 0 {
                let id = c.user_data & !FLUSH_TAG;
                if c.ret == 0 {
                    t.flushes[id].state = State::Done(0);
                    t.durable = t.durable.max(t.flushes[id].covers);
                    t.flushes_done += 1;
                } else {
                    t.flushes[id].state = State::Failed(c.ret);
                    if !t.killed {
                        return Err(format!(
                            "queue {qi}: flush #{id} failed before the kill: {}",
                            errno_name(c.ret)
                        ));
                    }
                }
                continue;
            }
            let gen = slots[c.user_data]
                .take()
                .expect("completion of a free slot");
            t.in_flight.retain(|&g| g != gen);
            if c.ret == 0 {
                t.completed += 1;
                let done = t.completed;
                t.writes[gen as usize - 1].state = State::Done(done);
            } else {
                t.writes[gen as usize - 1].state = State::Failed(c.ret);
                if !t.killed {
                    return Err(format!(
                        "queue {qi}: {} failed before the kill: {}",
                        t.describe(gen),
                        errno_name(c.ret)
                    ));
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// qemu-img and the daemon
// ---------------------------------------------------------------------------

fn run(cmd: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        Ok(text)
    } else {
        Err(format!("{cmd} {args:?} failed ({}): {text}", out.status))
    }
}

/// The result of `qemu-img check`.
#[derive(Debug)]
struct Check {
    code: i32,
    leaks: u64,
    corruptions: u64,
    check_errors: u64,
    text: String,
}

impl Check {
    fn summary(&self) -> String {
        format!(
            "exit {} ({} leaked, {} corruptions, {} check errors)",
            self.code, self.leaks, self.corruptions, self.check_errors
        )
    }
}

fn qemu_img_check(img: &Path) -> Check {
    let out = Command::new("qemu-img")
        .args(["check", "--output=json", img.to_str().unwrap()])
        .output()
        .expect("qemu-img");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let text = stdout.clone() + &String::from_utf8_lossy(&out.stderr);
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap_or_default();
    let field = |name: &str| v.get(name).and_then(|x| x.as_u64()).unwrap_or(0);
    Check {
        code: out.status.code().unwrap_or(-1),
        leaks: field("leaks"),
        corruptions: field("corruptions"),
        check_errors: field("check-errors"),
        text,
    }
}

/// The guest-visible content of the image, as qemu-img reads it.
fn qemu_img_content(img: &Path, out: &Path) -> Result<Vec<u8>, String> {
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "qcow2",
            "-O",
            "raw",
            img.to_str().unwrap(),
            out.to_str().unwrap(),
        ],
    )?;
    let v = std::fs::read(out).map_err(|e| format!("{out:?}: {e}"))?;
    if v.len() as u64 != IMG_SIZE {
        return Err(format!("qemu-img convert gave {} bytes", v.len()));
    }
    Ok(v)
}

/// Serves `img` with `queues` queues; the daemon's socket and log live in a
/// fresh directory under `dir`.
fn start_daemon(dir: &Path, img: &Path, queues: usize) -> Daemon {
    let blockdev = format!(
        "driver=qcow2,node-name=d0,file.driver=file,file.filename={}",
        img.to_str().unwrap()
    );
    let export = format!(
        "type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path={{sock}},writable=on,num-queues={queues}"
    );
    let sub = tempfile::tempdir_in(dir).expect("temp dir");
    Daemon::start_in(sub, &["--blockdev", &blockdev, "--export", &export])
}

/// Keeps the daemon's log next to the image and fails on a panic in it.
fn save_log(d: &Daemon, dir: &Path, name: &str) -> Result<(), String> {
    let log = d.log();
    let _ = std::fs::write(dir.join(name), &log);
    if log.contains("panicked") || log.contains("RUST_BACKTRACE") {
        return Err(format!(
            "panic in the daemon log {name}:\n{}",
            tail(&log, 40)
        ));
    }
    Ok(())
}

fn tail(s: &str, lines: usize) -> String {
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

// ---------------------------------------------------------------------------
// One round
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
struct Config {
    lazy: bool,
    backing: bool,
}

/// What a round saw, for the test log.
struct Report {
    writes: usize,
    writes_done: usize,
    flushes_done: usize,
    at_kill: (usize, usize),
    load_ms: u128,
    check_after_kill: String,
    check_after_reopen: String,
    durable_blocks: usize,
    newer_blocks: usize,
    dropped: &'static str,
}

fn create_image(dir: &Path, cfg: Config) -> Result<PathBuf, String> {
    let top = dir.join("top.qcow2");
    let mut args: Vec<String> = vec!["create".into()];
    if cfg.lazy {
        args.extend(["-o".into(), "lazy_refcounts=on".into()]);
    }
    if cfg.backing {
        let raw = dir.join("base.raw");
        let mut base = vec![0u8; IMG_SIZE as usize];
        for (i, b) in base.chunks_exact_mut(BLOCK as usize).enumerate() {
            block_pattern_into(i as u64, 0, b);
        }
        std::fs::write(&raw, &base).map_err(|e| e.to_string())?;
        let base_q = dir.join("base.qcow2");
        run(
            "qemu-img",
            &[
                "convert",
                "-f",
                "raw",
                "-O",
                "qcow2",
                raw.to_str().unwrap(),
                base_q.to_str().unwrap(),
            ],
        )?;
        std::fs::remove_file(&raw).map_err(|e| e.to_string())?;
        args.extend([
            "-b".into(),
            "base.qcow2".into(),
            "-F".into(),
            "qcow2".into(),
        ]);
    }
    args.push(top.to_str().unwrap().into());
    args.push(IMG_SIZE.to_string());
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    run(daemon_bin(), &a)?;
    Ok(top)
}

/// Judges every block of `img` (the guest-visible content) against the
/// tracker: (blocks that hold their durable write, blocks that hold a
/// later one).
fn verify(round: usize, cfg: Config, img: &[u8], t: &Tracker) -> Result<(usize, usize), String> {
    let mut errors = Vec::new();
    let mut durable_blocks = 0;
    let mut newer_blocks = 0;
    for (i, data) in img.chunks_exact(BLOCK as usize).enumerate() {
        let idx = i as u64;
        let hist = &t.history[i];
        let d = hist.iter().rposition(|&g| t.covered(g));
        let found = decode(idx, data);
        let initial = if cfg.backing {
            Found::Gen(0)
        } else {
            Found::Zero
        };
        let ok = match (d, found) {
            (Some(d), Found::Gen(g)) => {
                let ok = hist[d..].contains(&g);
                if ok && g == hist[d] {
                    durable_blocks += 1;
                } else if ok {
                    newer_blocks += 1;
                }
                ok
            }
            (None, Found::Gen(g)) if g != 0 => {
                let ok = hist.contains(&g);
                newer_blocks += usize::from(ok);
                ok
            }
            (None, f) => f == initial,
            _ => false,
        };
        if ok {
            continue;
        }
        let expected = match d {
            Some(d) => format!(
                "durable {}, made durable by completed flush {}, or a later write: [{}]",
                t.describe(hist[d]),
                t.covering_flush(hist[d]),
                hist[d + 1..]
                    .iter()
                    .map(|&g| t.describe(g))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            None => format!(
                "{initial:?} (nothing durable) or one of: [{}]",
                hist.iter()
                    .map(|&g| t.describe(g))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        let found_s = match found {
            Found::Gen(g) if g > 0 && g as usize <= t.writes.len() => {
                format!("{found:?} = {}", t.describe(g))
            }
            _ => format!("{found:?}"),
        };
        errors.push(format!(
            "round {round}: block {i} (disk offset {:#x}): found {found_s}; expected {expected}",
            idx * BLOCK
        ));
    }
    if errors.is_empty() {
        return Ok((durable_blocks, newer_blocks));
    }
    let n = errors.len();
    errors.truncate(12);
    Err(format!(
        "{n} block(s) wrong (lazy_refcounts={}, backing={}, durable up to completion #{}, {} writes, {} flushes completed):\n{}",
        cfg.lazy,
        cfg.backing,
        t.durable,
        t.writes.len(),
        t.flushes_done,
        errors.join("\n")
    ))
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<u64> {
    a.iter().zip(b).position(|(x, y)| x != y).map(|p| p as u64)
}

fn round(r: usize, cfg: Config, seed: u64, dir: &Path) -> Result<Report, String> {
    let img = create_image(dir, cfg)?;
    let mut rng = Rng(seed);

    // 1. The write load, and the kill.
    let mut d = start_daemon(dir, &img, QUEUES);
    let pid = d.pid();
    let mut c = Client::start(
        &d.socket,
        QUEUES,
        QUEUES * DEPTH * (MAX_WRITE_BLOCKS * BLOCK) as usize,
    );
    let bufs = c.buf();
    let tracker = Mutex::new(Tracker::new());
    let stop = AtomicBool::new(false);
    let failed = AtomicBool::new(false);
    // Kill once this many flushes completed, plus a random delay.
    let want_flushes = 2 + rng.below(30) as usize;
    let delay = Duration::from_millis(rng.below(300));
    let started = Instant::now();
    let worker_seeds: Vec<u64> = (0..QUEUES).map(|_| rng.next()).collect();
    let results: Vec<Result<(), String>> = std::thread::scope(|s| {
        let handles: Vec<_> = c
            .queues
            .iter_mut()
            .enumerate()
            .map(|(qi, q)| {
                let (tracker, stop, failed) = (&tracker, &stop, &failed);
                let seed = worker_seeds[qi];
                let slots = bufs + qi * DEPTH * (MAX_WRITE_BLOCKS * BLOCK) as usize;
                s.spawn(move || {
                    let r = worker(qi, q, slots, seed, tracker, stop);
                    if r.is_err() {
                        failed.store(true, Ordering::SeqCst);
                    }
                    r
                })
            })
            .collect();
        let deadline = Instant::now() + Duration::from_secs(10);
        while tracker.lock().unwrap().flushes_done < want_flushes
            && Instant::now() < deadline
            && !failed.load(Ordering::SeqCst)
        {
            std::thread::sleep(Duration::from_millis(2));
        }
        std::thread::sleep(delay);
        {
            let mut t = tracker.lock().unwrap();
            t.killed = true;
            let flushes_in_flight = t
                .flushes
                .iter()
                .filter(|f| f.state == State::InFlight)
                .count();
            t.at_kill = (t.in_flight.len(), flushes_in_flight);
            // SAFETY: kill only takes a pid and a signal number.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let child = d.child.as_mut().unwrap();
        let status = wait_timeout(child, Duration::from_secs(10));
        stop.store(true, Ordering::SeqCst);
        let results = handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("worker panicked".into())))
            .collect();
        match status {
            Some(s) if s.signal() == Some(libc::SIGKILL) => results,
            other => vec![Err(format!(
                "the daemon did not die of our SIGKILL: {other:?}\n{}",
                tail(&d.log(), 40)
            ))],
        }
    });
    let load_ms = started.elapsed().as_millis();
    save_log(&d, dir, "daemon-load.log")?;
    let log = d.log();
    drop(d);
    for res in results {
        res.map_err(|e| format!("{e}\ndaemon log:\n{}", tail(&log, 40)))?;
    }
    let dropped = drop_dead_client(c);
    let t = tracker.into_inner().unwrap();
    if t.flushes_done == 0 {
        return Err("no flush completed before the kill: nothing to verify".into());
    }

    // 2. The image as the crash left it.
    let check1 = qemu_img_check(&img);
    // A dirty lazy-refcounts image may fail the check until it is repaired.
    let check1_ok = cfg.lazy || (matches!(check1.code, 0 | 3) && check1.corruptions == 0);
    if !check1_ok {
        return Err(format!(
            "qemu-img check after the kill: {}\n{}",
            check1.summary(),
            check1.text
        ));
    }
    let content = qemu_img_content(&img, &dir.join("after-kill.raw"))?;
    let (durable_blocks, newer_blocks) = verify(r, cfg, &content, &t)?;

    // 3. Reopened by the daemon (which repairs a dirty image): it reads
    // what qemu-img read, and closes the image clean.
    let mut d = start_daemon(dir, &img, 1);
    {
        let mut c = Client::start(&d.socket, 1, MIB as usize);
        let buf = c.buf();
        let q = &mut c.queues[0];
        for off in (0..IMG_SIZE).step_by(MIB as usize) {
            q.read(off, buf as *mut u8, MIB as usize, 0, ReqFlags::empty());
            let done = wait_some(q, 1);
            if done[0].1 != 0 {
                return Err(format!(
                    "read of {off:#x} after reopening: {}",
                    errno_name(done[0].1)
                ));
            }
            let got = peek(buf, MIB as usize);
            let want = &content[off as usize..(off + MIB) as usize];
            if let Some(p) = first_difference(&got, want) {
                let at = off + p;
                let b = at / BLOCK;
                let s = (b * BLOCK - off) as usize;
                return Err(format!(
                    "after reopening, the daemon reads block {b} (disk offset {at:#x}) as {:?}, qemu-img read {:?}",
                    decode(b, &got[s..s + BLOCK as usize]),
                    decode(b, &want[s..s + BLOCK as usize])
                ));
            }
        }
    }
    let status = d.terminate();
    save_log(&d, dir, "daemon-reopen.log")?;
    if !status.success() {
        return Err(format!(
            "the reopened daemon exited with {status:?}\n{}",
            tail(&d.log(), 40)
        ));
    }
    drop(d);
    let check2 = qemu_img_check(&img);
    let check2_ok = if cfg.lazy {
        check2.code == 0
    } else {
        matches!(check2.code, 0 | 3) && check2.corruptions == 0
    };
    if !check2_ok {
        return Err(format!(
            "qemu-img check after reopening and SIGTERM (after the kill: {}): {}\n{}",
            check1.summary(),
            check2.summary(),
            check2.text
        ));
    }
    let content2 = qemu_img_content(&img, &dir.join("after-reopen.raw"))?;
    if let Some(p) = first_difference(&content2, &content) {
        let b = p / BLOCK;
        let s = (b * BLOCK) as usize;
        return Err(format!(
            "reopening changed the content: block {b} (disk offset {p:#x}) was {:?}, is {:?}",
            decode(b, &content[s..s + BLOCK as usize]),
            decode(b, &content2[s..s + BLOCK as usize])
        ));
    }

    Ok(Report {
        writes: t.writes.len(),
        writes_done: t.completed as usize,
        flushes_done: t.flushes_done,
        at_kill: t.at_kill,
        load_ms,
        check_after_kill: check1.summary(),
        check_after_reopen: check2.summary(),
        durable_blocks,
        newer_blocks,
        dropped,
    })
}

#[test]
fn sigkill_during_a_write_load_loses_no_flushed_write_and_corrupts_nothing() {
    let base_seed = std::env::var("QCOW2_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("QCOW2_CRASH_SEED={base_seed}");
    let started = Instant::now();
    for r in 0..ROUNDS {
        let cfg = Config {
            lazy: r >= ROUNDS / 2,
            backing: matches!(r % 5, 3 | 4),
        };
        let seed = mix(base_seed ^ (r as u64).wrapping_mul(0x51_7cc1_b727_220a));
        let dir = tempfile::tempdir().expect("temp dir");
        let t0 = Instant::now();
        match round(r, cfg, seed, dir.path()) {
            Ok(rep) => eprintln!(
                "round {r} (lazy_refcounts={}, backing={}): {} writes ({} completed), {} flushes completed, \
                 killed after {} ms with {} writes and {} flushes in flight; \
                 {} blocks hold their flushed write, {} a later one; \
                 check after kill: {}; after reopen: {}; client {}; {:.1} s",
                cfg.lazy,
                cfg.backing,
                rep.writes,
                rep.writes_done,
                rep.flushes_done,
                rep.load_ms,
                rep.at_kill.0,
                rep.at_kill.1,
                rep.durable_blocks,
                rep.newer_blocks,
                rep.check_after_kill,
                rep.check_after_reopen,
                rep.dropped,
                t0.elapsed().as_secs_f64()
            ),
            Err(e) => {
                let kept = dir.keep();
                panic!(
                    "round {r} (lazy_refcounts={}, backing={}, QCOW2_CRASH_SEED={base_seed}) failed; \
                     image and daemon logs kept in {}:\n{e}",
                    cfg.lazy,
                    cfg.backing,
                    kept.display()
                );
            }
        }
    }
    eprintln!(
        "{ROUNDS} rounds in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}
