//! The guest of the soak (scripts/soak.py): a verifying load generator over
//! the raw vhost-user frontend of tests/common. It keeps requests in flight
//! on every queue (reads, writes, flushes, discards, write-zeroes; 512 B to
//! 256 KiB, some split into several segments), remembers what every write
//! put on the disk and compares every read with that model. On commands
//! from its standard input it drains and reconnects, or resets the device
//! as QEMU does on a guest reset, with requests in flight (those the
//! device took must complete before GET_VRING_BASE answers; those it did
//! not take are dropped, and must never happen). At `stop` it reads the
//! whole disk back once, writes the model to a file and prints its counts.
//!
//! Run by scripts/soak.py, not by `cargo test` (ignored; it needs a daemon):
//!
//! ```text
//! SOAK_SOCKET=/path/vub.sock SOAK_SIZE=67108864 target/debug/deps/soak-HASH \
//!     --ignored --exact soak_load --nocapture
//! stdin:  reconnect | reset | reset-device | stop     (one per line)
//! stdout: "SOAK ok <command>" after each, "SOAK result {json}" at the end
//! ```
//!
//! Discards may or may not zero what they cover (a qcow2 cluster partly
//! covered keeps its data, a hole in a raw file reads zeroes): a discarded
//! sector may read back as its old content or as zeroes, and the first
//! read settles which, after which it must stay so.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::client::Rng;
use common::*;
use vhost::vhost_user::VhostUserFrontend;
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

const SECTOR: u64 = 512;
/// Descriptors reserved for each request slot of a queue.
const DESCS_PER_SLOT: u16 = 16;
/// Guest memory of one slot: header, status, range, then the data.
const SLOT_MEM: u64 = 272 << 10;
const DATA_OFF: u64 = 4096;
const MAX_BS: u64 = 256 << 10;
const MAX_RANGE: u64 = 1 << 20;
const SEG_GAP: u64 = 40;
/// A request in flight longer than this is a hang.
const HANG: Duration = Duration::from_secs(120);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
}

struct Op {
    kind: Kind,
    offset: u64,
    len: u64,
    /// Data segments (guest address, length).
    segs: Vec<(u64, u64)>,
    status: u64,
    /// What a write writes.
    data: Vec<u8>,
    unmap: bool,
    since: Instant,
    /// Its place in the avail ring (the ring's index before it was added).
    avail_pos: u16,
    generation: u64,
}

impl Op {
    fn overlaps(&self, off: u64, len: u64) -> bool {
        self.kind != Kind::Flush && self.offset < off + len && off < self.offset + self.len
    }
    fn describe(&self) -> String {
        format!(
            "{:?} of {} bytes at {} ({} segment(s), generation {})",
            self.kind,
            self.len,
            self.offset,
            self.segs.len(),
            self.generation
        )
    }
}

#[derive(Default)]
struct Stats {
    reads: u64,
    writes: u64,
    flushes: u64,
    discards: u64,
    write_zeroes: u64,
    read_bytes: u64,
    write_bytes: u64,
    vectored: u64,
    io_errors: u64,
    mismatches: u64,
    settled_zero: u64,
    settled_old: u64,
    reconnects: u64,
    resets_stop: u64,
    resets_device: u64,
    /// Requests a reset left in the avail ring, never taken by the
    /// device (they are dropped, as a guest's reset drops them).
    abandoned: u64,
    /// Requests in flight when a reset stopped the rings.
    in_flight_at_reset: u64,
    final_read_bytes: u64,
    peak_in_flight: usize,
}

/// Data for a write of generation `gen`: each sector starts with its disk
/// offset and the generation (so a mismatch tells whose data was found),
/// the rest is pseudo-random.
fn write_data(offset: u64, len: u64, gen: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len as usize);
    let mut x = gen.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ offset | 1;
    let mut at = offset;
    while (out.len() as u64) < len {
        out.extend_from_slice(&at.to_le_bytes());
        out.extend_from_slice(&gen.to_le_bytes());
        for _ in 0..(SECTOR as usize - 16) / 8 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            out.extend_from_slice(&x.to_le_bytes());
        }
        at += SECTOR;
    }
    out
}

struct Load {
    socket: PathBuf,
    opts: VmOptions,
    vm: Vm,
    depth: u16,
    size: u64,
    model: Vec<u8>,
    /// Sectors a discard covered that no read has seen since: they may
    /// read as the model says or as zeroes.
    maybe_zero: Vec<bool>,
    /// Per queue: slot -> request in flight.
    slots: Vec<Vec<Option<Op>>>,
    in_flight: usize,
    rng: Rng,
    generation: u64,
    stats: Stats,
    mismatch_log: Vec<String>,
}

impl Load {
    fn slot_base(&self, q: usize, s: usize) -> u64 {
        DATA_BASE + (q as u64 * u64::from(self.depth) + s as u64) * SLOT_MEM
    }

    fn ranges_in_flight_overlap(&self, off: u64, len: u64) -> bool {
        self.slots
            .iter()
            .flatten()
            .flatten()
            .any(|op| op.overlaps(off, len))
    }

    fn pick_len(&mut self, max: u64) -> u64 {
        // A power of two from 512 B up to max, then uniform below it:
        // skewed to small requests, several block sizes.
        let max_exp = u64::from(max.trailing_zeros());
        let e = 9 + self.rng.below(max_exp - 8);
        let units = (1u64 << e) / SECTOR;
        (1 + self.rng.below(units)) * SECTOR
    }

    /// Makes the next request for slot `s` of queue `q`, or None if the
    /// ranges tried overlap requests in flight.
    fn make_op(&mut self, q: usize, s: usize, kind: Option<Kind>, at: Option<u64>) -> Option<Op> {
        let base = self.slot_base(q, s);
        let kind = kind.unwrap_or_else(|| match self.rng.below(100) {
            0..=39 => Kind::Read,
            40..=74 => Kind::Write,
            75..=77 => Kind::Flush,
            78..=89 => Kind::Discard,
            _ => Kind::WriteZeroes,
        });
        let mut op = Op {
            kind,
            offset: 0,
            len: 0,
            segs: Vec::new(),
            status: base + 32,
            data: Vec::new(),
            unmap: false,
            since: Instant::now(),
            avail_pos: 0,
            generation: 0,
        };
        if kind == Kind::Flush {
            return Some(op);
        }
        let data_op = matches!(kind, Kind::Read | Kind::Write);
        let len = match at {
            Some(off) => MAX_BS.min(self.size - off),
            None => self.pick_len(if data_op { MAX_BS } else { MAX_RANGE }),
        };
        let offset = match at {
            Some(off) => off,
            None => (0..4).find_map(|_| {
                let off = self.rng.below((self.size - len) / SECTOR + 1) * SECTOR;
                (!self.ranges_in_flight_overlap(off, len)).then_some(off)
            })?,
        };
        op.offset = offset;
        op.len = len;
        if data_op {
            let data = base + DATA_OFF + self.rng.below(64);
            if at.is_none() && self.rng.chance(40) {
                // 2..8 segments cut at random bytes, with gaps between.
                let n = 2 + self.rng.below(7);
                let mut cuts: Vec<u64> = (1..n).map(|_| 1 + self.rng.below(len - 1)).collect();
                cuts.push(0);
                cuts.push(len);
                cuts.sort_unstable();
                cuts.dedup();
                let mut a = data;
                for w in cuts.windows(2) {
                    op.segs.push((a, w[1] - w[0]));
                    a += w[1] - w[0] + SEG_GAP;
                }
            } else {
                op.segs.push((data, len));
            }
        }
        if kind == Kind::Write {
            self.generation += 1;
            op.generation = self.generation;
            op.data = write_data(offset, len, self.generation);
        }
        op.unmap = kind == Kind::WriteZeroes && self.rng.chance(50);
        Some(op)
    }

    fn submit(&mut self, q: usize, s: usize, mut op: Op) {
        let mem = &self.vm.mem;
        let base = self.slot_base(q, s);
        let t = match op.kind {
            Kind::Read => T_IN,
            Kind::Write => T_OUT,
            Kind::Flush => T_FLUSH,
            Kind::Discard => T_DISCARD,
            Kind::WriteZeroes => T_WRITE_ZEROES,
        };
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&t.to_le_bytes());
        let sector = if matches!(op.kind, Kind::Read | Kind::Write) {
            op.offset / SECTOR
        } else {
            0
        };
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(base)).unwrap();
        mem.write_obj(0xffu8, GuestAddress(op.status)).unwrap();
        let mut descs = vec![Desc::r(GuestAddress(base), 16)];
        match op.kind {
            Kind::Read => {
                for &(a, l) in &op.segs {
                    mem.write_slice(&vec![0xee; l as usize], GuestAddress(a))
                        .unwrap();
                    descs.push(Desc::w(GuestAddress(a), l as u32));
                }
            }
            Kind::Write => {
                let mut done = 0usize;
                for &(a, l) in &op.segs {
                    mem.write_slice(&op.data[done..done + l as usize], GuestAddress(a))
                        .unwrap();
                    done += l as usize;
                    descs.push(Desc::r(GuestAddress(a), l as u32));
                }
            }
            Kind::Discard | Kind::WriteZeroes => {
                let mut r = [0u8; 16];
                r[0..8].copy_from_slice(&(op.offset / SECTOR).to_le_bytes());
                r[8..12].copy_from_slice(&((op.len / SECTOR) as u32).to_le_bytes());
                r[12..16].copy_from_slice(&u32::from(op.unmap).to_le_bytes());
                mem.write_slice(&r, GuestAddress(base + 64)).unwrap();
                descs.push(Desc::r(GuestAddress(base + 64), 16));
            }
            Kind::Flush => {}
        }
        descs.push(Desc::w(GuestAddress(op.status), 1));
        let vq = &mut self.vm.queues[q];
        let head = s as u16 * DESCS_PER_SLOT;
        for (i, d) in descs.iter().enumerate() {
            let i = i as u16;
            let next = (usize::from(i) + 1 < descs.len()).then_some(head + i + 1);
            vq.write_desc(mem, head + i, *d, next);
        }
        op.since = Instant::now();
        op.avail_pos = vq.avail_idx;
        vq.push_avail(mem, head);
        self.slots[q][s] = Some(op);
        self.in_flight += 1;
        self.stats.peak_in_flight = self.stats.peak_in_flight.max(self.in_flight);
    }

    /// Fills every free slot; kicks the queues that got requests.
    fn fill(&mut self) {
        for q in 0..self.slots.len() {
            let mut added = false;
            for s in 0..self.slots[q].len() {
                if self.slots[q][s].is_some() {
                    continue;
                }
                let Some(op) = self.make_op(q, s, None, None) else {
                    break;
                };
                self.submit(q, s, op);
                added = true;
            }
            if added {
                self.vm.queues[q].kick();
            }
        }
    }

    /// Collects completions; returns how many.
    fn reap(&mut self) -> usize {
        let mut n = 0;
        for q in 0..self.slots.len() {
            let used = self.vm.queues[q].wait_used(&self.vm.mem, 0, Duration::ZERO);
            for u in used {
                let s = (u.id / u32::from(DESCS_PER_SLOT)) as usize;
                let op = self.slots[q]
                    .get_mut(s)
                    .and_then(Option::take)
                    .unwrap_or_else(|| panic!("queue {q}: completion of idle head {}", u.id));
                self.in_flight -= 1;
                n += 1;
                self.complete(q, op);
            }
        }
        n
    }

    fn complete(&mut self, q: usize, op: Op) {
        let st: u8 = self.vm.mem.read_obj(GuestAddress(op.status)).unwrap();
        if st != S_OK {
            self.stats.io_errors += 1;
            self.log_mismatch(format!(
                "queue {q}: {} failed with status {st}",
                op.describe()
            ));
            // The data of a failed write is unknown from here on.
            if op.kind != Kind::Flush && op.kind != Kind::Read {
                let r = op.offset as usize..(op.offset + op.len) as usize;
                self.maybe_zero[r.start / 512..r.end / 512].fill(false);
            }
            return;
        }
        let r = op.offset as usize..(op.offset + op.len) as usize;
        match op.kind {
            Kind::Read => {
                self.stats.reads += 1;
                self.stats.read_bytes += op.len;
                self.stats.vectored += u64::from(op.segs.len() > 1);
                let mut got = Vec::with_capacity(op.len as usize);
                for &(a, l) in &op.segs {
                    let mut b = vec![0u8; l as usize];
                    self.vm.mem.read_slice(&mut b, GuestAddress(a)).unwrap();
                    got.extend_from_slice(&b);
                }
                self.verify(q, &op, &got);
            }
            Kind::Write => {
                self.stats.writes += 1;
                self.stats.write_bytes += op.len;
                self.stats.vectored += u64::from(op.segs.len() > 1);
                self.model[r.clone()].copy_from_slice(&op.data);
                self.maybe_zero[r.start / 512..r.end / 512].fill(false);
            }
            Kind::Flush => self.stats.flushes += 1,
            Kind::Discard => {
                self.stats.discards += 1;
                self.maybe_zero[r.start / 512..r.end / 512].fill(true);
            }
            Kind::WriteZeroes => {
                self.stats.write_zeroes += 1;
                self.model[r.clone()].fill(0);
                self.maybe_zero[r.start / 512..r.end / 512].fill(false);
            }
        }
    }

    fn verify(&mut self, q: usize, op: &Op, got: &[u8]) {
        for (i, sector) in got.chunks(SECTOR as usize).enumerate() {
            let off = op.offset as usize + i * SECTOR as usize;
            let want = &self.model[off..off + SECTOR as usize];
            let sn = off / SECTOR as usize;
            if sector == want {
                if self.maybe_zero[sn] {
                    self.maybe_zero[sn] = false;
                    self.stats.settled_old += 1;
                }
                continue;
            }
            if self.maybe_zero[sn] && sector.iter().all(|&b| b == 0) {
                self.maybe_zero[sn] = false;
                self.model[off..off + SECTOR as usize].fill(0);
                self.stats.settled_zero += 1;
                continue;
            }
            self.stats.mismatches += 1;
            let tag = |b: &[u8]| {
                format!(
                    "[offset {} generation {}]",
                    u64::from_le_bytes(b[0..8].try_into().unwrap()),
                    u64::from_le_bytes(b[8..16].try_into().unwrap())
                )
            };
            let msg = format!(
                "queue {q}: {} read sector {sn} (disk offset {off}): got {} {:02x?}, want {} {:02x?}{}",
                op.describe(),
                tag(sector),
                &sector[..24],
                tag(want),
                &want[..24],
                if self.maybe_zero[sn] { " or zeroes" } else { "" }
            );
            self.log_mismatch(msg);
            // Adopt what was read so one bad write is reported once.
            self.model[off..off + SECTOR as usize].copy_from_slice(sector);
            self.maybe_zero[sn] = false;
        }
    }

    fn log_mismatch(&mut self, m: String) {
        eprintln!("SOAK ERROR {m}");
        if self.mismatch_log.len() < 100 {
            self.mismatch_log.push(m);
        }
    }

    fn check_hang(&self) {
        for (q, slots) in self.slots.iter().enumerate() {
            for op in slots.iter().flatten() {
                assert!(
                    op.since.elapsed() < HANG,
                    "queue {q}: {} has not completed in {HANG:?}",
                    op.describe()
                );
            }
        }
    }

    fn wait_progress(&mut self) {
        if self.reap() == 0 {
            self.check_hang();
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    fn drain(&mut self) {
        while self.in_flight > 0 {
            self.wait_progress();
        }
    }

    /// Rings set up from scratch on queue `q` (what a guest driver does
    /// after a reset), as Vm::connect does.
    fn setup_queue(&mut self, q: usize) {
        let size = self.opts.queue_size;
        let base = 0x10_0000 + q as u64 * 0x4_0000;
        let vq = VirtQueue::new(
            size,
            GuestAddress(base),
            GuestAddress(base + 0x1_0000),
            GuestAddress(base + 0x2_0000),
            self.vm.features & VIRTIO_RING_F_EVENT_IDX != 0,
        );
        vq.init(&self.vm.mem);
        let hva = |a: GuestAddress| self.vm.mem.get_host_address(a).unwrap() as u64;
        let cfg = VringConfigData {
            queue_max_size: size,
            queue_size: size,
            flags: 0,
            desc_table_addr: hva(vq.desc),
            used_ring_addr: hva(vq.used),
            avail_ring_addr: hva(vq.avail),
            log_addr: None,
        };
        let f = &mut self.vm.frontend;
        f.set_vring_num(q, size).expect("SET_VRING_NUM");
        f.set_vring_addr(q, &cfg).expect("SET_VRING_ADDR");
        f.set_vring_base(q, 0).expect("SET_VRING_BASE");
        f.set_vring_call(q, &vq.call).expect("SET_VRING_CALL");
        f.set_vring_kick(q, &vq.kick).expect("SET_VRING_KICK");
        f.set_vring_enable(q, true).expect("SET_VRING_ENABLE");
        self.vm.queues[q] = vq;
    }

    fn reconnect(&mut self) {
        self.drain();
        // The daemon serves one frontend at a time: end this connection
        // before the next one is set up (its memory is dropped after).
        let fd = std::os::fd::AsRawFd::as_raw_fd(&self.vm.frontend);
        // SAFETY: shutdown on the frontend's own socket, which stays open
        // (and owned by it) until the Vm is dropped below.
        unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
        let vm = Vm::connect(&self.socket, self.opts.clone());
        self.vm = vm;
        self.stats.reconnects += 1;
    }

    /// A guest reset as QEMU 7.2 does it for vhost-user-blk, with requests
    /// in flight: the rings are disabled and stopped (GET_VRING_BASE),
    /// then started again from scratch: features, memory table, every
    /// ring. GET_VRING_BASE answers once every request the device took
    /// has completed; its answer is where the device stopped in the avail
    /// ring: what is before it must be in the used ring, what is after it
    /// was never taken, and the guest drops it (its writes never happen).
    fn reset(&mut self, device: bool) {
        self.stats.in_flight_at_reset += self.in_flight as u64;
        let n = self.vm.queues.len();
        for q in 0..n {
            self.vm
                .frontend
                .set_vring_enable(q, false)
                .expect("SET_VRING_ENABLE 0");
            let base = self.vm.frontend.get_vring_base(q).expect("GET_VRING_BASE") as u16;
            let used = self.vm.queues[q].used_idx(&self.vm.mem);
            if used != base {
                self.log_mismatch(format!(
                    "queue {q}: GET_VRING_BASE answered {base} with the used index at {used}"
                ));
                self.stats.mismatches += 1;
            }
        }
        self.reap();
        for q in 0..n {
            let avail = self.vm.queues[q].avail_idx;
            let used = self.vm.queues[q].last_used;
            for s in 0..self.slots[q].len() {
                let Some(op) = self.slots[q][s].take() else {
                    continue;
                };
                self.in_flight -= 1;
                // Taken by the device (before `used` in the avail ring)
                // but not completed: the reset lost it.
                let taken = op.avail_pos.wrapping_sub(used) >= avail.wrapping_sub(used);
                if taken {
                    self.stats.io_errors += 1;
                    self.log_mismatch(format!(
                        "queue {q}: {} was taken but not completed at the reset",
                        op.describe()
                    ));
                } else {
                    self.stats.abandoned += 1;
                }
            }
        }
        if device {
            self.vm.frontend.reset_device().expect("RESET_DEVICE");
            self.stats.resets_device += 1;
        } else {
            self.stats.resets_stop += 1;
        }
        self.vm
            .frontend
            .set_features(self.vm.features)
            .expect("SET_FEATURES");
        let regions: Vec<VhostUserMemoryRegionInfo> = {
            let mut off = 0;
            self.opts
                .regions
                .iter()
                .map(|&(gpa, size)| {
                    let r = VhostUserMemoryRegionInfo {
                        guest_phys_addr: gpa,
                        memory_size: size,
                        userspace_addr: self.vm.mem.get_host_address(GuestAddress(gpa)).unwrap()
                            as u64,
                        mmap_offset: off,
                        mmap_handle: self.vm.memfd_raw(),
                    };
                    off += size;
                    r
                })
                .collect()
        };
        self.vm
            .frontend
            .set_mem_table(&regions)
            .expect("SET_MEM_TABLE");
        for q in 0..n {
            self.setup_queue(q);
        }
    }

    /// Reads the whole disk once, in order, verifying every sector.
    fn read_all(&mut self) {
        self.drain();
        let mut next = 0u64;
        while next < self.size || self.in_flight > 0 {
            for q in 0..self.slots.len() {
                let mut added = false;
                for s in 0..self.slots[q].len() {
                    if next >= self.size || self.slots[q][s].is_some() {
                        continue;
                    }
                    let op = self.make_op(q, s, Some(Kind::Read), Some(next)).unwrap();
                    next += op.len;
                    self.stats.final_read_bytes += op.len;
                    self.submit(q, s, op);
                    added = true;
                }
                if added {
                    self.vm.queues[q].kick();
                }
            }
            self.wait_progress();
        }
    }

    fn result(&self) -> serde_json::Value {
        let s = &self.stats;
        serde_json::json!({
            "reads": s.reads, "writes": s.writes, "flushes": s.flushes,
            "discards": s.discards, "write_zeroes": s.write_zeroes,
            "read_bytes": s.read_bytes, "write_bytes": s.write_bytes,
            "vectored": s.vectored, "io_errors": s.io_errors,
            "mismatches": s.mismatches, "settled_zero": s.settled_zero,
            "settled_old": s.settled_old, "reconnects": s.reconnects,
            "resets_stop": s.resets_stop, "resets_device": s.resets_device,
            "abandoned": s.abandoned, "in_flight_at_reset": s.in_flight_at_reset,
            "final_read_bytes": s.final_read_bytes,
            "peak_in_flight": s.peak_in_flight,
            "queues": self.slots.len(), "depth": self.depth, "size": self.size,
            "errors": self.mismatch_log,
        })
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .map(|v| v.parse().unwrap_or_else(|_| panic!("{name}={v:?}")))
        .unwrap_or(default)
}

#[test]
#[ignore = "the soak's guest: run by scripts/soak.py against a running daemon"]
fn soak_load() {
    let Ok(socket) = std::env::var("SOAK_SOCKET") else {
        eprintln!("SOAK_SOCKET not set: nothing to do (scripts/soak.py runs this)");
        return;
    };
    let socket = PathBuf::from(socket);
    let queues = env_u64("SOAK_QUEUES", 4) as usize;
    let depth = env_u64("SOAK_DEPTH", 8) as u16;
    let size = env_u64("SOAK_SIZE", 64 << 20);
    let seed = env_u64("SOAK_SEED", 0x50a4);
    assert!(size % SECTOR == 0 && size >= 2 * MAX_RANGE);
    assert!(u32::from(depth) * u32::from(DESCS_PER_SLOT) <= 256 && queues <= 16);
    assert!(DATA_BASE + queues as u64 * u64::from(depth) * SLOT_MEM <= MEM_SIZE);
    let opts = VmOptions {
        num_queues: queues,
        queue_size: 256,
        event_idx: true,
        ..VmOptions::default()
    };
    let vm = Vm::connect(&socket, opts.clone());
    let mut load = Load {
        socket,
        opts,
        vm,
        depth,
        size,
        model: vec![0; size as usize],
        maybe_zero: vec![false; (size / SECTOR) as usize],
        slots: (0..queues)
            .map(|_| (0..depth).map(|_| None).collect())
            .collect(),
        in_flight: 0,
        rng: Rng(seed),
        generation: 0,
        stats: Stats::default(),
        mismatch_log: Vec::new(),
    };
    // The disk starts as zeroes (a fresh image): read it all once to check.
    load.read_all();

    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.send(line.trim().to_string()).is_err() {
                break;
            }
        }
        let _ = tx.send("stop".into());
    });
    let say = |m: &str| {
        let mut o = std::io::stdout().lock();
        writeln!(o, "SOAK {m}").unwrap();
        o.flush().unwrap();
    };
    say("ok started");
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    loop {
        match rx.try_recv() {
            Ok(cmd) => {
                *counts.entry(cmd.clone()).or_default() += 1;
                match cmd.as_str() {
                    "reconnect" => load.reconnect(),
                    "reset" => load.reset(false),
                    "reset-device" => load.reset(true),
                    "stop" => break,
                    "" => continue,
                    other => panic!("unknown command {other:?}"),
                }
                say(&format!("ok {cmd}"));
            }
            Err(mpsc::TryRecvError::Empty) => {}
            Err(mpsc::TryRecvError::Disconnected) => break,
        }
        load.fill();
        load.wait_progress();
    }
    load.drain();
    load.read_all();
    if let Ok(path) = std::env::var("SOAK_MODEL_OUT") {
        std::fs::write(&path, &load.model).expect("write the model");
    }
    let result = load.result();
    say(&format!("result {result}"));
    assert_eq!(load.stats.io_errors, 0, "guest I/O errors: {result}");
    assert_eq!(
        load.stats.mismatches, 0,
        "verification mismatches: {result}"
    );
}
