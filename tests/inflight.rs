//! Exactly-once crash recovery (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD): a
//! frontend that keeps the daemon's inflight buffer, as QEMU's
//! vhost-user-blk does, drives a guest-like workload on two queues while
//! the daemon is SIGKILLed and restarted on the same socket and image.
//!
//! The guest driver here behaves like Linux's: a request's descriptor head
//! goes back to a free list when it completes and is reused at once (LIFO),
//! and a write never overlaps another request still in flight, a read
//! never a write (so submission order is the order the image must
//! reflect). Writes go
//! through a throttle node limited in write IOPS while reads are not, so
//! on every queue requests complete out of order. The image is qcow2 with
//! the write cache off (writethrough=on): a completed write is durable,
//! metadata included, so what the guest saw completed must survive a
//! SIGKILL (with the cache on, a write not yet flushed may be lost with
//! the daemon, as with QEMU). After each restart the
//! frontend sets the buffer back and each vring's base at its used index
//! (QEMU's fallback when GET_VRING_BASE got no answer).
//!
//! Every request must complete exactly once: a completion for a head that
//! is not in flight (a request replayed after it completed, or a reused
//! head's new request run twice) fails, so does a request that never
//! completes, a read that does not return the model's data, and a final
//! image that differs from the model.
//!
//! `VUB_TEST_NO_INFLIGHT=1` runs the same frontend without negotiating the
//! feature (QEMU with an older backend) to show the failure it prevents.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use common::client::{qemu_img, Rng};
use common::queue::Desc;
use common::*;
use vm_memory::{Bytes, GuestAddress};

const QUEUES: usize = 2;
const QSIZE: u16 = 64;
/// Requests in flight per queue at most.
const DEPTH: usize = 40;
/// Writes and reads land in the first AREA bytes, so that they overlap.
const AREA: u64 = 2 << 20;
const IMG: u64 = 16 << 20;
/// Per-head slot in guest memory: indirect table, header and status in
/// the first page, data after.
const SLOT: u64 = 68 << 10;
const MAX_LEN: u64 = 32 << 10;

#[derive(Clone)]
struct Req {
    id: u64,
    write: bool,
    offset: u64,
    len: u64,
    /// A write's data, or what a read must return.
    data: Vec<u8>,
}

struct Driver {
    rng: Rng,
    model: Vec<u8>,
    free: Vec<Vec<u16>>,
    /// Head -> request, per queue.
    busy: Vec<HashMap<u16, Req>>,
    next_id: u64,
    completed: u64,
    /// Completions that overtook an older request of their queue.
    out_of_order: u64,
}

impl Driver {
    fn new() -> Driver {
        Driver {
            rng: Rng(0x1f1f_2026),
            model: vec![0; AREA as usize],
            free: (0..QUEUES).map(|_| (0..QSIZE).rev().collect()).collect(),
            busy: (0..QUEUES).map(|_| HashMap::new()).collect(),
            next_id: 0,
            completed: 0,
            out_of_order: 0,
        }
    }

    fn in_flight(&self) -> usize {
        self.busy.iter().map(HashMap::len).sum()
    }

    /// Whether a request in flight conflicts with a new one: a write
    /// with anything, a read with a write.
    fn conflicts(&self, write: bool, offset: u64, len: u64) -> bool {
        self.busy
            .iter()
            .flat_map(|b| b.values())
            .any(|r| (write || r.write) && r.offset < offset + len && offset < r.offset + r.len)
    }

    fn slot(q: usize, head: u16) -> u64 {
        DATA_BASE + (q as u64 * u64::from(QSIZE) + u64::from(head)) * SLOT
    }

    /// Submits one request on queue `q` if the rules allow; true if it did.
    fn submit(&mut self, vm: &mut Vm, q: usize) -> bool {
        if self.busy[q].len() >= DEPTH {
            return false;
        }
        let Some(&head) = self.free[q].last() else {
            return false;
        };
        let write = self.rng.chance(70);
        let len = (1 + self.rng.below(MAX_LEN / 4096)) * 4096;
        let offset = self.rng.below((AREA - len) / 4096 + 1) * 4096;
        if self.conflicts(write, offset, len) {
            return false;
        }
        self.free[q].pop();
        let id = self.next_id;
        self.next_id += 1;
        let (o, l) = (offset as usize, len as usize);
        let data = if write {
            let d = pattern(id + 1, l);
            self.model[o..o + l].copy_from_slice(&d);
            d
        } else {
            self.model[o..o + l].to_vec()
        };
        let slot = Self::slot(q, head);
        let (table, hdr, status, buf) = (slot, slot + 64, slot + 96, slot + 4096);
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&(if write { T_OUT } else { T_IN }).to_le_bytes());
        h[8..16].copy_from_slice(&(offset / 512).to_le_bytes());
        vm.mem.write_slice(&h, GuestAddress(hdr)).unwrap();
        vm.mem.write_obj(0xffu8, GuestAddress(status)).unwrap();
        let data_desc = if write {
            vm.mem.write_slice(&data, GuestAddress(buf)).unwrap();
            Desc::r(GuestAddress(buf), len as u32)
        } else {
            vm.mem
                .write_slice(&vec![0xee; l], GuestAddress(buf))
                .unwrap();
            Desc::w(GuestAddress(buf), len as u32)
        };
        let t = GuestAddress(table);
        VirtQueue::write_desc_at(&vm.mem, t, 0, Desc::r(GuestAddress(hdr), 16), Some(1));
        VirtQueue::write_desc_at(&vm.mem, t, 1, data_desc, Some(2));
        VirtQueue::write_desc_at(&vm.mem, t, 2, Desc::w(GuestAddress(status), 1), None);
        vm.queues[q].write_desc(&vm.mem, head, Desc::indirect(t, 3), None);
        vm.queues[q].push_avail(&vm.mem, head);
        self.busy[q].insert(
            head,
            Req {
                id,
                write,
                offset,
                len,
                data,
            },
        );
        true
    }

    /// Takes the completions the daemon published; panics on one that
    /// breaks exactly-once.
    fn reap(&mut self, vm: &mut Vm) -> usize {
        let mut n = 0;
        for q in 0..QUEUES {
            for u in vm.queues[q].wait_used(&vm.mem, 0, Duration::ZERO) {
                let head = u.id as u16;
                let Some(req) = self.busy[q].remove(&head) else {
                    panic!(
                        "queue {q}: completion for head {head}, which is not in flight \
                         (a request completed twice, or a reused head's request ran twice)"
                    );
                };
                let slot = Self::slot(q, head);
                let st: u8 = vm.mem.read_obj(GuestAddress(slot + 96)).unwrap();
                assert_eq!(
                    st,
                    S_OK,
                    "queue {q}: request {} ({} at {:#x}+{:#x}) failed",
                    req.id,
                    if req.write { "write" } else { "read" },
                    req.offset,
                    req.len
                );
                if !req.write {
                    let mut got = vec![0u8; req.len as usize];
                    vm.mem
                        .read_slice(&mut got, GuestAddress(slot + 4096))
                        .unwrap();
                    if got != req.data {
                        let first = got.iter().zip(&req.data).position(|(a, b)| a != b);
                        let first = first.unwrap_or(0);
                        panic!(
                            "queue {q}: read {} at {:#x}+{:#x} returned other data than the \
                             writes completed before it, from byte {:#x} ({:02x?} instead of {:02x?})",
                            req.id,
                            req.offset,
                            req.len,
                            req.offset as usize + first,
                            &got[first..(first + 8).min(got.len())],
                            &req.data[first..(first + 8).min(got.len())],
                        );
                    }
                }
                if self.busy[q].values().any(|r| r.id < req.id) {
                    self.out_of_order += 1;
                }
                self.free[q].push(head);
                self.completed += 1;
                n += 1;
            }
        }
        n
    }

    /// Submits and reaps until `done` more requests completed.
    fn run(&mut self, vm: &mut Vm, done: u64, what: &str) {
        let target = self.completed + done;
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.completed < target {
            for q in 0..QUEUES {
                let mut submitted = false;
                for _ in 0..8 {
                    submitted |= self.submit(vm, q);
                }
                if submitted {
                    vm.queues[q].kick();
                }
            }
            if self.reap(vm) == 0 {
                std::thread::sleep(Duration::from_micros(300));
            }
            assert!(
                Instant::now() < deadline,
                "{what}: {} of {done} requests completed in 60 s",
                done + self.completed - target
            );
        }
    }

    /// Submits until every queue is full (or no request fits the rules).
    fn fill(&mut self, vm: &mut Vm) {
        for q in 0..QUEUES {
            for _ in 0..4 * DEPTH {
                self.submit(vm, q);
            }
            vm.queues[q].kick();
        }
    }

    /// Waits until every request in flight completed.
    fn drain(&mut self, vm: &mut Vm, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.in_flight() > 0 {
            if self.reap(vm) == 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
            if Instant::now() > deadline {
                let ids: Vec<u64> = self
                    .busy
                    .iter()
                    .flat_map(|b| b.values().map(|r| r.id))
                    .collect();
                panic!(
                    "{what}: {} requests never completed (ids {ids:?}): skipped after the restart",
                    ids.len()
                );
            }
        }
    }
}

fn daemon_args() -> Vec<&'static str> {
    vec![
        "--object",
        "throttle-group,id=tg0,limits.iops-write=400",
        "--blockdev",
        "driver=qcow2,node-name=q0,file.driver=file,file.filename={dir}/disk.qcow2",
        "--blockdev",
        "driver=throttle,node-name=t0,throttle-group=tg0,file=q0",
        "--export",
        "vhost-user-blk,id=e0,node-name=t0,addr.type=unix,addr.path={sock},writable=on,num-queues=2,queue-size=64,writethrough=on",
    ]
}

fn kill9(d: &mut Daemon) {
    let mut child = d.child.take().expect("daemon running");
    // SAFETY: kill only takes a pid and a signal number.
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    child.wait().unwrap();
}

/// Waits until no process holds a lock on `img`: the kernel closes a
/// killed process's files only once the io_uring requests it left have
/// completed, so its image locks outlive it for a moment.
fn wait_unlocked(img: &Path) {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(img).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        // SAFETY: flock is plain data; zeroed is valid (l_pid 0 for OFD).
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = libc::F_WRLCK as i16;
        fl.l_whence = libc::SEEK_SET as i16;
        // SAFETY: F_OFD_GETLK on our descriptor with a live flock.
        let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
        assert_eq!(r, 0, "F_OFD_GETLK");
        if fl.l_type == libc::F_UNLCK as i16 {
            return;
        }
        assert!(Instant::now() < deadline, "the killed daemon's lock stays");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The restarted daemon, on the same directory (image, socket path).
fn restart(d: &mut Daemon) -> Daemon {
    wait_unlocked(&d.dir.path().join("disk.qcow2"));
    let dir = std::mem::replace(&mut d.dir, tempfile::tempdir().unwrap());
    let log = std::fs::read_to_string(dir.path().join("daemon.log")).unwrap_or_default();
    std::fs::write(dir.path().join("daemon.log.old"), log.as_bytes()).unwrap();
    Daemon::start_in(dir, &daemon_args())
}

#[test]
fn sigkill_mid_flight_every_request_runs_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        img.to_str().unwrap(),
        &IMG.to_string(),
    ]);
    let mut d = Daemon::start_in(dir, &daemon_args());
    let use_inflight = std::env::var_os("VUB_TEST_NO_INFLIGHT").is_none();
    let opts = VmOptions {
        num_queues: QUEUES,
        queue_size: QSIZE,
        inflight: use_inflight,
        ..VmOptions::default()
    };
    let mut vm = Vm::connect(&d.socket, opts);
    if use_inflight {
        let (info, _) = vm
            .inflight
            .as_ref()
            .expect("the daemon offers INFLIGHT_SHMFD");
        assert_eq!(
            (info.num_queues, info.queue_size, info.mmap_offset),
            (2, QSIZE, 0)
        );
        // Two regions of align_up(16 + 16 * 64, 64) bytes.
        assert_eq!(info.mmap_size, 2 * 1088);
    }
    let mut drv = Driver::new();
    let mut killed_in_flight = Vec::new();
    for round in 0..4 {
        drv.run(&mut vm, 150, &format!("round {round}"));
        // Kill with the queues full: writes wait on the IOPS limit, reads
        // that came after them are done.
        drv.fill(&mut vm);
        std::thread::sleep(Duration::from_millis(20));
        drv.reap(&mut vm);
        let n = drv.in_flight();
        kill9(&mut d);
        killed_in_flight.push(n);
        d = restart(&mut d);
        vm.reconnect(&d.socket).expect("reconnect");
        // No kick: the driver waits for what it submitted before the kill,
        // which the daemon must resubmit (or take) on its own.
        drv.drain(&mut vm, &format!("restart {round}"));
    }
    drv.run(&mut vm, 150, "after the last restart");
    drv.drain(&mut vm, "end");
    eprintln!(
        "{} requests, {} completed out of order, in flight at each SIGKILL: {killed_in_flight:?}",
        drv.completed, drv.out_of_order
    );
    assert!(
        killed_in_flight.iter().all(|&n| n > 0),
        "every kill must catch requests in flight: {killed_in_flight:?}"
    );
    assert!(drv.out_of_order > 0, "no request completed out of order");
    if use_inflight {
        assert!(
            d.log().contains("resumes from the inflight buffer"),
            "the restarted daemon resubmitted nothing: {}",
            d.log()
        );
    }

    // The image holds what the guest wrote, in the order it wrote it.
    for off in (0..AREA).step_by(1 << 20) {
        let (st, got) = vm.read(0, off / 512, 1 << 20);
        assert_eq!(st, S_OK);
        let want = &drv.model[off as usize..(off + (1 << 20)) as usize];
        if got != want {
            let first = got.iter().zip(want).position(|(a, b)| a != b).unwrap();
            panic!(
                "image differs from the model at byte {:#x}",
                off as usize + first
            );
        }
    }
    drop(vm);
    assert!(d.terminate().success());
    let img = d.dir.path().join("disk.qcow2");
    let check = check_image(&img);
    eprintln!("qemu-img check: {}", check.trim());
}

/// qemu-img check's report (leaks allowed, no corruption).
fn check_image(img: &Path) -> String {
    let out = std::process::Command::new("qemu-img")
        .args(["check", img.to_str().unwrap()])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code().is_some_and(|c| c == 0 || c == 3),
        "qemu-img check: {text}"
    );
    text
}
