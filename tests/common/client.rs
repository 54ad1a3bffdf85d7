//! The libblkio guest (the `blkio` crate, driver `virtio-blk-vhost-user`)
//! shared by tests/blkio.rs and tests/jobs.rs: a started instance with one
//! mapped buffer region, completion helpers, and the seeded random workload
//! that checks every read against an in-memory model of the disk; plus
//! qemu-img as the judge of images.

use std::mem::MaybeUninit;
use std::path::Path;
use std::time::{Duration, Instant};

use blkio::{iovec, Blkio, Blkioq, Completion, Errno, MemoryRegion, ReqFlags};

use super::pattern;

pub const KIB: u64 = 1 << 10;
pub const MIB: u64 = 1 << 20;
pub const DRIVER: &str = "virtio-blk-vhost-user";
/// Longest wait for one completion before the test declares a hang.
pub const IO_TIMEOUT: Duration = Duration::from_secs(20);

pub fn new_instance(socket: &Path, read_only: bool) -> Blkio {
    let mut b = Blkio::new(DRIVER).expect("libblkio instance");
    b.set_str("path", socket.to_str().unwrap())
        .expect("set path");
    if read_only {
        b.set_bool("read-only", true).expect("set read-only");
    }
    b
}

pub fn prop_i32(b: &Blkio, name: &str) -> i32 {
    b.get_i32(name)
        .unwrap_or_else(|e| panic!("property {name}: {e}"))
}

pub fn prop_u64(b: &Blkio, name: &str) -> u64 {
    b.get_u64(name)
        .unwrap_or_else(|e| panic!("property {name}: {e}"))
}

// ---------------------------------------------------------------------------
// A started instance
// ---------------------------------------------------------------------------

/// A started libblkio instance with one mapped buffer region.
pub struct Client {
    // Queues are declared before the instance so they drop first: their
    // rings live in memory the instance owns.
    pub queues: Vec<Blkioq>,
    pub poll_queues: Vec<Blkioq>,
    pub region: MemoryRegion,
    pub blkio: Blkio,
}

#[derive(Clone, Copy)]
pub struct ClientOptions {
    pub queues: i32,
    pub poll_queues: i32,
    /// libblkio's queue-size (None: its default, 256).
    pub queue_size: Option<i32>,
    /// Bytes of buffer memory to map.
    pub buf_len: usize,
    pub read_only: bool,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            queues: 1,
            poll_queues: 0,
            queue_size: None,
            buf_len: 4 * MIB as usize,
            read_only: false,
        }
    }
}

impl Client {
    pub fn start(socket: &Path, o: ClientOptions) -> Client {
        let mut blkio = new_instance(socket, o.read_only);
        blkio
            .connect()
            .unwrap_or_else(|e| panic!("connect: {e} ({:?})", e.errno()));
        if let Some(qs) = o.queue_size {
            blkio.set_i32("queue-size", qs).expect("set queue-size");
        }
        blkio.set_i32("num-queues", o.queues).expect("num-queues");
        blkio
            .set_i32("num-poll-queues", o.poll_queues)
            .expect("num-poll-queues");
        let started = blkio
            .start()
            .unwrap_or_else(|e| panic!("start: {e} ({:?})", e.errno()));
        assert_eq!(started.queues.len(), o.queues as usize);
        assert_eq!(started.poll_queues.len(), o.poll_queues as usize);
        let align = prop_u64(&blkio, "mem-region-alignment").max(4096) as usize;
        let len = o.buf_len.div_ceil(align) * align;
        let region = blkio.alloc_mem_region(len).expect("alloc_mem_region");
        blkio.map_mem_region(&region).expect("map_mem_region");
        Client {
            queues: started.queues,
            poll_queues: started.poll_queues,
            region,
            blkio,
        }
    }

    /// Address `off` bytes into the mapped buffer region.
    pub fn buf(&self, off: usize) -> usize {
        assert!(off <= self.region.len);
        self.region.addr + off
    }
}

/// Copies `data` into mapped buffer memory at `addr`.
pub fn fill(addr: usize, data: &[u8]) {
    // SAFETY: callers pass an address inside a memory region allocated by
    // the test's libblkio instance, with at least data.len() bytes after it,
    // that no request in flight uses.
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), addr as *mut u8, data.len()) };
}

/// Copies `len` bytes of mapped buffer memory at `addr` out.
pub fn peek(addr: usize, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    // SAFETY: as for `fill`.
    unsafe { std::ptr::copy_nonoverlapping(addr as *const u8, v.as_mut_ptr(), len) };
    v
}

/// The bytes an iovec array names, concatenated.
pub fn gather(iov: &[iovec]) -> Vec<u8> {
    let mut out = Vec::with_capacity(iov.iter().map(|v| v.iov_len).sum());
    for v in iov {
        out.extend_from_slice(&peek(v.iov_base as usize, v.iov_len));
    }
    out
}

/// Scatters `data` over an iovec array of the same total length.
pub fn scatter(iov: &[iovec], data: &[u8]) {
    let mut done = 0;
    for v in iov {
        fill(v.iov_base as usize, &data[done..done + v.iov_len]);
        done += v.iov_len;
    }
    assert_eq!(done, data.len());
}

/// Waits for at least one completion (at most `max`): event queues block in
/// do_io with min_completions 1; poll queues spin with min_completions 0.
/// Returns (user_data, ret) pairs.
pub fn wait_some(q: &mut Blkioq, poll: bool, max: usize) -> Vec<(usize, i32)> {
    let mut c: Vec<MaybeUninit<Completion>> = (0..max).map(|_| MaybeUninit::uninit()).collect();
    let deadline = Instant::now() + IO_TIMEOUT;
    loop {
        let n = if poll {
            q.do_io(&mut c, 0, None, None)
        } else {
            let mut t = IO_TIMEOUT;
            q.do_io(&mut c, 1, Some(&mut t), None)
        };
        let n = match n {
            Ok(n) => n,
            Err(e) if e.errno() == Errno::TIME => panic!("no completion within {IO_TIMEOUT:?}"),
            Err(e) => panic!("do_io: {e} ({:?})", e.errno()),
        };
        if n > 0 {
            return c[..n]
                .iter()
                .map(|c| {
                    // SAFETY: do_io initialised the first n completions.
                    let c = unsafe { c.assume_init_read() };
                    (c.user_data, c.ret)
                })
                .collect();
        }
        assert!(
            Instant::now() < deadline,
            "no completion within {IO_TIMEOUT:?}"
        );
        std::thread::yield_now();
    }
}

/// Waits for exactly `n` completions; returns ret by user_data (which must
/// be 0..n).
pub fn wait_all(q: &mut Blkioq, poll: bool, n: usize) -> Vec<i32> {
    let mut rets = vec![None; n];
    let mut got = 0;
    while got < n {
        for (ud, ret) in wait_some(q, poll, n - got) {
            assert!(ud < n, "completion with unknown user_data {ud}");
            assert!(rets[ud].is_none(), "second completion for request {ud}");
            rets[ud] = Some(ret);
            got += 1;
        }
    }
    rets.into_iter().map(Option::unwrap).collect()
}

/// Submits one request with `submit(q, user_data = 0)` and returns its ret.
pub fn one(q: &mut Blkioq, submit: impl FnOnce(&mut Blkioq)) -> i32 {
    submit(q);
    wait_all(q, false, 1)[0]
}

pub fn flush(q: &mut Blkioq, poll: bool) -> i32 {
    q.flush(0, ReqFlags::empty());
    wait_all(q, poll, 1)[0]
}

pub fn errno_name(ret: i32) -> String {
    if ret == 0 {
        "ok".into()
    } else {
        format!("{ret} ({})", std::io::Error::from_raw_os_error(-ret))
    }
}

/// Asserts `got == want` byte for byte, naming the first differing offset
/// (`base` is the disk offset of byte 0) instead of dumping both buffers.
pub fn assert_bytes_eq(what: &str, base: u64, got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if got == want {
        return;
    }
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        let end = (i + 16).min(got.len());
        panic!(
            "{what}: first difference at disk offset {} (byte {i} of {}): got {:02x?}, want {:02x?}",
            base + i as u64,
            got.len(),
            &got[i..end],
            &want[i..end]
        );
    }
}

// ---------------------------------------------------------------------------
// The random workload
// ---------------------------------------------------------------------------

/// splitmix64.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, n)`.
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(n)) >> 64) as u64
    }

    pub fn chance(&mut self, pct: u64) -> bool {
        self.below(100) < pct
    }
}

/// Largest read or write of the workload.
pub const MAX_BS: u64 = 256 * KIB;
/// Largest discard or write-zeroes of the workload.
pub const MAX_RANGE: u64 = MIB;
/// Most segments of a readv/writev.
pub const MAX_SEGS: u64 = 8;
/// Bytes left unused between the segments of one vectored request, so they
/// are not contiguous in memory.
pub const SEG_GAP: usize = 40;
/// Buffer memory per in-flight request: the data, a misaligned start and the
/// gaps between segments.
pub const SLOT: usize = MAX_BS as usize + 8 * KIB as usize;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Kind {
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
}

/// One request in flight.
pub struct Op {
    pub kind: Kind,
    /// Disk offset and length (none for flushes).
    pub offset: u64,
    pub len: u64,
    pub vectored: bool,
    pub flags: ReqFlags,
    /// The request's buffer, one entry unless vectored.
    pub iov: Vec<iovec>,
    /// What a write writes.
    pub data: Vec<u8>,
}

impl Op {
    pub fn describe(&self) -> String {
        format!(
            "{:?}{} of {} bytes at {} (flags {:?}, {} segment(s))",
            self.kind,
            if self.vectored { "v" } else { "" },
            self.len,
            self.offset,
            self.flags,
            self.iov.len()
        )
    }

    pub fn overlaps(&self, offset: u64, len: u64) -> bool {
        self.kind != Kind::Flush && self.offset < offset + len && offset < self.offset + self.len
    }
}

pub struct Workload {
    pub seed: u64,
    /// Requests to submit.
    pub ops: usize,
    /// Most requests in flight at once.
    pub depth: usize,
    /// Logical block size: every offset and length is a multiple of it.
    pub lbs: u64,
    pub poll: bool,
    /// Stop submitting (and drain) after this long, whatever `ops` says.
    pub time_cap: Duration,
    /// Discards leave the data as it was (a node with discard=ignore).
    pub discard_keeps_data: bool,
}

/// What a workload did (for the failure messages and the test log).
#[derive(Default, Debug)]
pub struct Tally {
    pub reads: usize,
    pub writes: usize,
    pub vectored: usize,
    pub fua: usize,
    pub flushes: usize,
    pub discards: usize,
    pub write_zeroes: usize,
    pub no_unmap: usize,
    pub peak_in_flight: usize,
}

/// A length in `[lbs, 2^max_exp]`, a multiple of `lbs`, skewed to small
/// sizes (uniform power of two, then uniform below it).
pub fn pick_len(rng: &mut Rng, lbs: u64, max_exp: u64, limit: u64) -> u64 {
    let e = 9 + rng.below(max_exp - 8);
    let units = ((1u64 << e) / lbs).max(1);
    ((1 + rng.below(units)) * lbs).min(limit / lbs * lbs)
}

/// Splits `len` bytes at `addr` into 2..=MAX_SEGS segments cut at random
/// byte boundaries (virtio does not require aligned segments), with gaps.
pub fn pick_segments(rng: &mut Rng, addr: usize, len: u64) -> Vec<iovec> {
    let n = (2 + rng.below(MAX_SEGS - 1)).min(len);
    let mut cuts: Vec<u64> = (1..n).map(|_| 1 + rng.below(len - 1)).collect();
    cuts.push(0);
    cuts.push(len);
    cuts.sort_unstable();
    cuts.dedup();
    let mut iov = Vec::new();
    let mut at = addr;
    for w in cuts.windows(2) {
        let seg = (w[1] - w[0]) as usize;
        iov.push(iovec {
            iov_base: at as *mut libc::c_void,
            iov_len: seg,
        });
        at += seg + SEG_GAP;
    }
    iov
}

/// Makes the next request for buffer slot `buf`, or None when every range
/// tried overlaps a request in flight (the caller then waits).
pub fn next_op(
    rng: &mut Rng,
    w: &Workload,
    base: u64,
    size: u64,
    buf: usize,
    in_flight: &[Option<Op>],
) -> Option<Op> {
    let r = rng.below(100);
    let kind = match r {
        // Few flushes and FUA writes: each is an fdatasync on the host.
        0..=35 => Kind::Write,
        36..=71 => Kind::Read,
        72..=73 => Kind::Flush,
        74..=86 => Kind::Discard,
        _ => Kind::WriteZeroes,
    };
    if kind == Kind::Flush {
        return Some(Op {
            kind,
            offset: base,
            len: 0,
            vectored: false,
            flags: ReqFlags::empty(),
            iov: Vec::new(),
            data: Vec::new(),
        });
    }
    let data_op = matches!(kind, Kind::Read | Kind::Write);
    let (max_exp, limit) = if data_op {
        (MAX_BS.trailing_zeros(), MAX_BS)
    } else {
        (MAX_RANGE.trailing_zeros(), MAX_RANGE)
    };
    let len = pick_len(rng, w.lbs, u64::from(max_exp), limit.min(size));
    // A few tries for a range that no request in flight touches, so the
    // model stays deterministic.
    let offset = (0..4).find_map(|_| {
        let off = base + rng.below((size - len) / w.lbs + 1) * w.lbs;
        (!in_flight.iter().flatten().any(|op| op.overlaps(off, len))).then_some(off)
    })?;
    let mut flags = ReqFlags::empty();
    let mut vectored = false;
    let mut iov = Vec::new();
    let mut data = Vec::new();
    match kind {
        Kind::Read | Kind::Write => {
            vectored = rng.chance(50);
            if vectored {
                iov = pick_segments(rng, buf, len);
            } else {
                // Buffers need no alignment: start at any byte.
                let at = buf + rng.below(4096) as usize;
                iov.push(iovec {
                    iov_base: at as *mut libc::c_void,
                    iov_len: len as usize,
                });
            }
            if kind == Kind::Write {
                data = pattern(rng.next(), len as usize);
                if rng.chance(5) {
                    flags = ReqFlags::FUA;
                }
            }
        }
        Kind::WriteZeroes => {
            if rng.chance(50) {
                flags = ReqFlags::NO_UNMAP;
            }
        }
        Kind::Discard | Kind::Flush => {}
    }
    Some(Op {
        kind,
        offset,
        len,
        vectored,
        flags,
        iov,
        data,
    })
}

pub fn submit(q: &mut Blkioq, op: &Op, user_data: usize) {
    match op.kind {
        Kind::Read => {
            // Poison the buffer so a short read cannot pass for data.
            for v in &op.iov {
                fill(v.iov_base as usize, &vec![0xee; v.iov_len]);
            }
            if op.vectored {
                q.readv(
                    op.offset,
                    op.iov.as_ptr(),
                    op.iov.len() as u32,
                    user_data,
                    op.flags,
                );
            } else {
                q.read(
                    op.offset,
                    op.iov[0].iov_base.cast(),
                    op.iov[0].iov_len,
                    user_data,
                    op.flags,
                );
            }
        }
        Kind::Write => {
            scatter(&op.iov, &op.data);
            if op.vectored {
                q.writev(
                    op.offset,
                    op.iov.as_ptr(),
                    op.iov.len() as u32,
                    user_data,
                    op.flags,
                );
            } else {
                q.write(
                    op.offset,
                    op.iov[0].iov_base.cast(),
                    op.iov[0].iov_len,
                    user_data,
                    op.flags,
                );
            }
        }
        Kind::Flush => q.flush(user_data, op.flags),
        Kind::Discard => q.discard(op.offset, op.len, user_data, op.flags),
        Kind::WriteZeroes => q.write_zeroes(op.offset, op.len, user_data, op.flags),
    }
}

/// Runs `w` on `q` over the disk range `[base, base + model.len())`, keeping
/// up to `w.depth` requests in flight (refilled as they complete, never two
/// overlapping ones), each with its own slot of `SLOT` bytes of mapped
/// memory from `bufs`. Every read is compared with `model` when it
/// completes; writes, discards and write-zeroes update `model` when they
/// complete (discard punches a hole in the image file, so it reads back as
/// zeroes). Ends with every request completed.
pub fn run_workload(
    q: &mut Blkioq,
    bufs: usize,
    base: u64,
    model: &mut [u8],
    w: &Workload,
) -> Tally {
    let size = model.len() as u64;
    let mut rng = Rng(w.seed);
    let mut slots: Vec<Option<Op>> = (0..w.depth).map(|_| None).collect();
    let mut free: Vec<usize> = (0..w.depth).rev().collect();
    let mut tally = Tally::default();
    let mut submitted = 0;
    let stop_at = Instant::now() + w.time_cap;
    loop {
        while submitted < w.ops && !free.is_empty() && Instant::now() < stop_at {
            let slot = *free.last().unwrap();
            let Some(op) = next_op(&mut rng, w, base, size, bufs + slot * SLOT, &slots) else {
                break;
            };
            free.pop();
            submit(q, &op, slot);
            slots[slot] = Some(op);
            submitted += 1;
        }
        let in_flight = w.depth - free.len();
        tally.peak_in_flight = tally.peak_in_flight.max(in_flight);
        if in_flight == 0 {
            break;
        }
        for (slot, ret) in wait_some(q, w.poll, w.depth) {
            let op = slots
                .get_mut(slot)
                .and_then(Option::take)
                .unwrap_or_else(|| panic!("completion for idle slot {slot}"));
            free.push(slot);
            assert_eq!(
                ret,
                0,
                "{} failed: {} (after {tally:?})",
                op.describe(),
                errno_name(ret)
            );
            let range = (op.offset - base) as usize..(op.offset - base + op.len) as usize;
            match op.kind {
                Kind::Read => {
                    tally.reads += 1;
                    tally.vectored += usize::from(op.vectored);
                    assert_bytes_eq(
                        &format!("{} returned", op.describe()),
                        op.offset,
                        &gather(&op.iov),
                        &model[range],
                    );
                }
                Kind::Write => {
                    tally.writes += 1;
                    tally.vectored += usize::from(op.vectored);
                    tally.fua += usize::from(op.flags.contains(ReqFlags::FUA));
                    model[range].copy_from_slice(&op.data);
                }
                Kind::Flush => tally.flushes += 1,
                Kind::Discard => {
                    tally.discards += 1;
                    if !w.discard_keeps_data {
                        model[range].fill(0);
                    }
                }
                Kind::WriteZeroes => {
                    tally.write_zeroes += 1;
                    tally.no_unmap += usize::from(op.flags.contains(ReqFlags::NO_UNMAP));
                    model[range].fill(0);
                }
            }
        }
    }
    eprintln!("workload seed {:#x}: {tally:?}", w.seed);
    tally
}

/// Asserts the workload got through a meaningful mix (it stops early only
/// if the machine is extremely slow; then the counts say how far it got).
pub fn assert_mix(t: &Tally) {
    assert!(t.reads > 0 && t.writes > 0 && t.vectored > 0, "{t:?}");
    assert!(
        t.discards > 0 && t.write_zeroes > 0 && t.no_unmap > 0,
        "{t:?}"
    );
    assert!(t.flushes > 0 && t.fua > 0, "{t:?}");
    assert!(
        t.peak_in_flight > 1,
        "requests were never in flight together: {t:?}"
    );
}

// ---------------------------------------------------------------------------
// qemu-img as the judge
// ---------------------------------------------------------------------------

/// Runs qemu-img; panics with its output unless it succeeds.
pub fn qemu_img(args: &[&str]) -> String {
    let out = std::process::Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "qemu-img {args:?}: {text}");
    text
}

/// qemu-img's view of an image (with its backing chain) as raw bytes.
pub fn image_bytes(img: &Path) -> Vec<u8> {
    let out = img.with_extension("dump.raw");
    qemu_img(&[
        "convert",
        "-O",
        "raw",
        img.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    std::fs::read(&out).unwrap()
}
