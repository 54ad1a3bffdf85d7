//! Fault injection with `blkdebug` under qcow2: for every debug event our
//! qcow2 raises, and errno EIO and ENOSPC, a guest workload (reads of
//! allocated, compressed and backing data; overwrites of clusters shared
//! with an internal snapshot; partial-cluster writes that copy on write;
//! allocating writes that grow the refcount table; write-zeroes, discards,
//! flushes; a block_resize that grows the L1 table) runs on
//! qcow2 -> blkdebug (one `once` rule) -> file. Then:
//!
//! - the rule fired (the daemon logs each injection);
//! - the guest saw the export's error policy and nothing else: with
//!   `report` at most one request failed, with IOERR, and one
//!   BLOCK_IO_ERROR (action report, `nospace` for ENOSPC) said so; with
//!   `stop` no request failed: the one hit was parked, BLOCK_IO_ERROR
//!   (action stop) came, and `cont` retried it;
//! - after a clean shutdown `qemu-img check` finds no corruption (leaked
//!   clusters allowed), the internal snapshot reads exactly as before, and
//!   every write that was acknowledged reads back (qemu-img convert);
//! - a rule on an event raised while the image opens (`reftable_load`,
//!   `none`) makes the daemon refuse to start with the errno's message and
//!   leaves the image as it was.
//!
//! `BLKDEBUG_EVENTS=l2_load,cow_read` runs a subset;
//! scripts/blkdebug-matrix.sh runs the whole matrix with `once=off` too.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use common::client::{image_bytes, qemu_img};
use common::*;
use vm_memory::Bytes;

const K: u64 = 1024;
const M: u64 = 1 << 20;

/// Where the template puts things, and how large it is.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Geometry {
    size: u64,
    /// block_resize target: past what the L1 table covers.
    resized: u64,
    /// Guest bytes written (then shared with snapshot s1) from 0.
    prefill: u64,
    /// 8 KiB of compressed clusters here.
    compressed: u64,
    /// 1 MiB of backing data here (unallocated in the image).
    backing: u64,
    /// Where the allocating writes go.
    fresh: u64,
    /// Whether they must outgrow the first refcount table cluster (16 MiB
    /// of file with 1 KiB clusters and 64-bit refcounts).
    grow_reftable: bool,
}

/// For every event but the refcount-table growth ones: 4 MiB.
const SMALL: Geometry = Geometry {
    size: 4 * M,
    resized: 5 * M,
    prefill: 256 * K,
    compressed: M,
    backing: 2 * M,
    fresh: 3 * M,
    grow_reftable: false,
};

/// For the events of a refcount table growing: the file starts close to
/// the 16 MiB the first table cluster covers.
const BIG: Geometry = Geometry {
    size: 32 * M,
    resized: 33 * M,
    prefill: 15872 * K,
    compressed: 20 * M,
    backing: 24 * M,
    fresh: 16 * M,
    grow_reftable: true,
};

/// Events that only a growing refcount table raises.
const GROWTH_EVENTS: &[&str] = &[
    "reftable_grow",
    "refblock_alloc_write_blocks",
    "refblock_alloc_write_table",
    "refblock_alloc_switch_table",
];

fn geometry(event: &str) -> Geometry {
    if GROWTH_EVENTS.contains(&event) {
        BIG
    } else {
        SMALL
    }
}

/// The events our qcow2 raises in this workload (all of them but the
/// open-time ones below), as QEMU 7.2 names them.
const EVENTS: &[&str] = &[
    "l1_update",
    "l1_grow_alloc_table",
    "l1_grow_write_table",
    "l1_grow_activate_table",
    "l2_load",
    "l2_update",
    "l2_alloc_cow_read",
    "l2_alloc_write",
    "read_aio",
    "read_backing_aio",
    "read_compressed",
    "write_aio",
    "cow_read",
    "cow_write",
    "reftable_grow",
    "reftable_update",
    "refblock_load",
    "refblock_update_part",
    "refblock_alloc",
    "refblock_alloc_hookup",
    "refblock_alloc_write",
    "refblock_alloc_write_blocks",
    "refblock_alloc_write_table",
    "refblock_alloc_switch_table",
    "cluster_alloc",
    "cluster_free",
    "flush_to_os",
    "flush_to_disk",
    "pwritev",
    "pwritev_done",
    "cluster_alloc_space",
];

/// Raised while the image opens: the open's next read fails.
const OPEN_EVENTS: &[&str] = &["reftable_load", "none"];

/// The template image every case starts from, built once.
struct Template {
    _dir: tempfile::TempDir,
    ov: PathBuf,
    /// What the guest reads, and what snapshot `s1` holds.
    guest: Vec<u8>,
    /// Bytes of new allocations that push the file past what one
    /// refcount table cluster covers (so the table grows).
    grow_bytes: u64,
}

fn template(g: Geometry) -> &'static Template {
    static SMALL_T: OnceLock<Template> = OnceLock::new();
    static BIG_T: OnceLock<Template> = OnceLock::new();
    let cell = if g.grow_reftable { &BIG_T } else { &SMALL_T };
    cell.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.raw");
        let f = std::fs::File::create(&base).unwrap();
        f.set_len(g.size).unwrap();
        write_file_at(&base, g.backing, &pattern(7, M as usize));
        let ov = dir.path().join("ov.qcow2");
        let (ovs, bs) = (ov.to_str().unwrap(), base.to_str().unwrap());
        // 1 KiB clusters with 64-bit refcounts: a refcount block covers
        // 128 KiB of file, the first refcount table cluster 16 MiB.
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("cluster_size=1024,refcount_bits=64,backing_file={bs},backing_fmt=raw"),
            ovs,
            &g.size.to_string(),
        ]);
        qemu_io(
            ovs,
            &[
                &format!("write -P 0x22 0 {}", g.prefill),
                &format!("write -c -P 0x33 {} 8k", g.compressed),
            ],
        );
        qemu_img(&["snapshot", "-c", "s1", ovs]);
        let hdr = read_file_at(&ov, 0, 64);
        let rt_clusters = u32::from_be_bytes(hdr[56..60].try_into().unwrap());
        assert_eq!(rt_clusters, 1, "the template's refcount table grew already");
        let file_size = std::fs::metadata(&ov).unwrap().len();
        assert!(file_size < 16 * M, "template file is {file_size} bytes");
        let grow_bytes = if g.grow_reftable {
            (16 * M - file_size + 512 * K).div_ceil(64 * K) * 64 * K
        } else {
            // A few refcount blocks' worth (128 KiB of file each).
            512 * K
        };
        let guest = image_bytes(&ov);
        assert_eq!(guest.len() as u64, g.size);
        Template {
            _dir: dir,
            ov,
            guest,
            grow_bytes,
        }
    })
}

fn qemu_io(img: &str, cmds: &[&str]) {
    let mut args = vec!["-f", "qcow2"];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(img);
    let out = std::process::Command::new("qemu-io")
        .args(&args)
        .output()
        .expect("qemu-io");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !text.contains("error") && !text.contains("failed"),
        "qemu-io {args:?}: {text}"
    );
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Policy {
    Report,
    Stop,
    /// `report` with a rule without `once`: it fails every request after
    /// its event (the long variant only).
    ReportAlways,
}

impl Policy {
    fn name(self) -> &'static str {
        match self {
            Policy::Report | Policy::ReportAlways => "report",
            Policy::Stop => "stop",
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Op {
    Read(u64, u64),
    /// Offset, length, pattern seed.
    Write(u64, u64, u64),
    Zeroes(u64, u64),
    Discard(u64, u64),
    Flush,
    Resize(u64),
}

fn workload(g: Geometry, grow_bytes: u64) -> Vec<Op> {
    use Op::*;
    let mut ops = vec![
        Read(0, 64 * K),
        Read(g.compressed, 8 * K),
        Read(g.backing, 8 * K),
        Write(8 * K, 4 * K, 1),      // clusters (and L2 table) shared with s1
        Write(64 * K + 512, 512, 2), // half of a shared cluster: copy on write
        Write(g.backing + 512, 512, 3), // half a cluster over backing data
        Flush,
    ];
    // Allocations (until the file outgrows the first refcount table
    // cluster, for BIG).
    let mut off = g.fresh;
    let mut seed = 100;
    while off < g.fresh + grow_bytes {
        ops.push(Write(off, 64 * K, seed));
        off += 64 * K;
        seed += 1;
    }
    ops.extend([
        Flush,
        Read(g.fresh, 64 * K),
        Zeroes(g.prefill / 2, 8 * K), // shared clusters
        Discard(g.prefill / 2 + 32 * K, 8 * K),
        Flush,
        Resize(g.resized),
        Write(g.size + 512, 512, 4), // a fresh cluster, half written
        Write(g.size + 8 * K, 4 * K, 5),
        Flush,
        Read(8 * K, 4 * K),
        Read(g.size, 16 * K),
    ]);
    ops
}

/// What the guest may read back: known bytes, or None where a failed (or
/// advisory) request left either old or new data.
struct Model {
    bytes: Vec<Option<u8>>,
}

impl Model {
    fn set(&mut self, off: u64, data: Option<&[u8]>, len: u64) {
        let end = (off + len) as usize;
        if self.bytes.len() < end {
            self.bytes.resize(end, Some(0));
        }
        for i in 0..len as usize {
            self.bytes[off as usize + i] = data.map(|d| d[i]);
        }
    }

    fn check(&self, what: &str, off: u64, got: &[u8]) -> Result<(), String> {
        for (i, g) in got.iter().enumerate() {
            if let Some(Some(w)) = self.bytes.get(off as usize + i) {
                if w != g {
                    return Err(format!(
                        "{what}: byte {} is {g:#x}, the acknowledged writes say {w:#x}",
                        off as usize + i
                    ));
                }
            }
        }
        Ok(())
    }
}

struct Outcome {
    /// (op, status) of each guest request that did not succeed.
    failed: Vec<(Op, u8)>,
    events: Vec<serde_json::Value>,
}

/// Submits one request and waits for it; under `stop`, a request parked
/// by the policy is resumed with `cont` once its BLOCK_IO_ERROR arrived.
fn run_chain(
    vm: &mut Vm,
    qmp: &mut Qmp,
    descs: &[Desc],
    status: vm_memory::GuestAddress,
    events: &mut Vec<serde_json::Value>,
) -> u8 {
    let head = vm.queues[0].add_chain(&vm.mem, descs);
    vm.queues[0].kick();
    loop {
        // Not a deadline: how often to look for a parking event meanwhile.
        let used = vm.queues[0].wait_used(&vm.mem, 1, Duration::from_millis(100));
        if let Some(u) = used.first() {
            assert_eq!(u.id, u32::from(head));
            return vm.status_at(status);
        }
        if let Some(ev) = qmp.try_event(Duration::from_millis(1)) {
            if ev["event"] == "BLOCK_IO_ERROR" && ev["data"]["action"] == "stop" {
                let r = qmp.execute("cont", serde_json::json!({}));
                assert!(r.get("return").is_some(), "cont: {r}");
            }
            events.push(ev);
        }
    }
}

fn guest_op(vm: &mut Vm, qmp: &mut Qmp, op: Op, ev: &mut Vec<serde_json::Value>) -> (u8, Vec<u8>) {
    vm.reset_alloc();
    match op {
        Op::Read(off, len) => {
            let h = vm.write_header(T_IN, off / 512);
            let d = vm.alloc(len);
            let s = vm.status_buf();
            let mut descs = vec![Desc::r(h, 16)];
            descs.extend(split_segments(d, len as u32, false));
            descs.push(Desc::w(s, 1));
            let st = run_chain(vm, qmp, &descs, s, ev);
            let mut buf = vec![0u8; len as usize];
            vm.mem.read_slice(&mut buf, d).unwrap();
            (st, buf)
        }
        Op::Write(off, len, seed) => {
            let data = pattern(seed, len as usize);
            let h = vm.write_header(T_OUT, off / 512);
            let d = vm.alloc(len);
            vm.mem.write_slice(&data, d).unwrap();
            let s = vm.status_buf();
            let mut descs = vec![Desc::r(h, 16)];
            descs.extend(split_segments(d, len as u32, true));
            descs.push(Desc::w(s, 1));
            (run_chain(vm, qmp, &descs, s, ev), data)
        }
        Op::Zeroes(off, len) | Op::Discard(off, len) => {
            let t = if matches!(op, Op::Zeroes(..)) {
                T_WRITE_ZEROES
            } else {
                T_DISCARD
            };
            let h = vm.write_header(t, 0);
            let d = vm.alloc(16);
            let mut r = [0u8; 16];
            r[0..8].copy_from_slice(&(off / 512).to_le_bytes());
            r[8..12].copy_from_slice(&((len / 512) as u32).to_le_bytes());
            vm.mem.write_slice(&r, d).unwrap();
            let s = vm.status_buf();
            let descs = [Desc::r(h, 16), Desc::r(d, 16), Desc::w(s, 1)];
            (run_chain(vm, qmp, &descs, s, ev), Vec::new())
        }
        Op::Flush => {
            let h = vm.write_header(T_FLUSH, 0);
            let s = vm.status_buf();
            let descs = [Desc::r(h, 16), Desc::w(s, 1)];
            (run_chain(vm, qmp, &descs, s, ev), Vec::new())
        }
        Op::Resize(_) => unreachable!("not a guest request"),
    }
}

fn daemon_args(event: &str, errno: i32, once: bool, policy: Policy) -> Vec<String> {
    vec![
        "--blockdev".into(),
        "driver=file,node-name=f,filename={dir}/ov.qcow2".into(),
        "--blockdev".into(),
        format!(
            "driver=blkdebug,node-name=dbg,image=f,inject-error.0.event={event},inject-error.0.errno={errno},inject-error.0.once={}",
            if once { "on" } else { "off" }
        ),
        "--blockdev".into(),
        "driver=qcow2,node-name=q,file=dbg,discard=unmap".into(),
        "--export".into(),
        format!(
            "type=vhost-user-blk,id=e,node-name=q,addr.type=unix,addr.path={{sock}},writable=on,on-write-error={p},on-read-error={p}",
            p = policy.name()
        ),
        "--chardev".into(),
        "socket,id=m,path={dir}/qmp.sock,server=on,wait=off".into(),
        "--monitor".into(),
        "chardev=m".into(),
    ]
}

fn case_dir(g: Geometry) -> (tempfile::TempDir, PathBuf) {
    let t = template(g);
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("ov.qcow2");
    std::fs::copy(&t.ov, &img).unwrap();
    (dir, img)
}

/// `qemu-img check`: no corruption (0, or 3: leaks only).
fn check_image(img: &Path) -> Result<String, String> {
    let out = std::process::Command::new("qemu-img")
        .args(["check", img.to_str().unwrap()])
        .output()
        .expect("qemu-img check");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    match out.status.code() {
        Some(0) | Some(3) => Ok(text),
        c => Err(format!("qemu-img check exit {c:?}:\n{text}")),
    }
}

/// Runs `cases` on two threads (each case has its own daemon and image);
/// returns the failures.
fn run_cases(cases: Vec<(&'static str, i32, Policy)>) -> (usize, Vec<String>) {
    template(SMALL);
    if cases.iter().any(|c| geometry(c.0).grow_reftable) {
        template(BIG);
    }
    let n = cases.len();
    let queue = std::sync::Mutex::new(cases);
    let failures = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| loop {
                let Some((event, errno, policy)) = queue.lock().unwrap().pop() else {
                    return;
                };
                if let Err(e) = run_case(event, errno, policy) {
                    failures
                        .lock()
                        .unwrap()
                        .push(format!("{event} errno {errno} {policy:?}: {e}"));
                }
            });
        }
    });
    (n, failures.into_inner().unwrap())
}

/// Runs one case; Err describes what went wrong.
fn run_case(event: &str, errno: i32, policy: Policy) -> Result<(), String> {
    run_case_with(event, errno, policy, "")
}

/// [`run_case`] with more blkdebug options appended (`,key=value...`).
fn run_case_with(event: &str, errno: i32, policy: Policy, extra: &str) -> Result<(), String> {
    let g = geometry(event);
    let t = template(g);
    let (dir, img) = case_dir(g);
    let once = policy != Policy::ReportAlways;
    let mut args = daemon_args(event, errno, once, policy);
    args[3].push_str(extra);
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut d = Daemon::start_in(dir, &argv);
    // Writes acknowledged since the last flush that succeeded: without
    // `once` the shutdown's flush fails too, so only flushed writes count.
    let mut unflushed: Vec<(u64, u64)> = Vec::new();
    let mut qmp = Qmp::connect(&d.dir.path().join("qmp.sock"));
    let mut vm = Vm::connect(&d.socket, VmOptions::default());
    let mut model = Model {
        bytes: t.guest.iter().map(|&b| Some(b)).collect(),
    };
    let mut out = Outcome {
        failed: Vec::new(),
        events: Vec::new(),
    };
    let mut resized = false;
    for op in workload(g, t.grow_bytes) {
        if let Op::Resize(size) = op {
            let r = qmp.execute(
                "block_resize",
                serde_json::json!({"node-name": "q", "size": size}),
            );
            if r.get("return").is_some() {
                resized = true;
                model.set(
                    g.size,
                    Some(&vec![0u8; (size - g.size) as usize]),
                    size - g.size,
                );
            }
            continue;
        }
        if let Op::Read(off, _) | Op::Write(off, ..) = op {
            if off >= g.size && !resized {
                continue;
            }
        }
        let (st, data) = guest_op(&mut vm, &mut qmp, op, &mut out.events);
        if st != S_OK {
            out.failed.push((op, st));
        }
        match op {
            Op::Write(off, len, _) | Op::Zeroes(off, len) | Op::Discard(off, len) => {
                unflushed.push((off, len))
            }
            Op::Flush if st == S_OK => unflushed.clear(),
            _ => {}
        }
        match op {
            Op::Read(off, _) if st == S_OK => model.check(&format!("{op:?}"), off, &data)?,
            Op::Write(off, len, _) => model.set(off, (st == S_OK).then_some(&data[..]), len),
            Op::Zeroes(off, len) => model.set(
                off,
                (st == S_OK).then_some(&vec![0u8; len as usize][..]),
                len,
            ),
            // A discard is advisory: old data or zeroes.
            Op::Discard(off, len) => model.set(off, None, len),
            _ => {}
        }
    }
    while let Some(ev) = qmp.try_event(Duration::from_millis(10)) {
        out.events.push(ev);
    }
    drop(vm);
    drop(qmp);
    let status = d.terminate();
    let log = d.log();
    let ctx = |e: String| format!("{e}\n--- daemon log (tail)\n{}", tail(&log, 30));
    if status.code().is_none() || log.contains("panicked") {
        return Err(ctx(format!("the daemon did not exit cleanly: {status}")));
    }
    let injected = log.matches("blkdebug node 'dbg': injecting errno").count();
    if policy == Policy::ReportAlways {
        if injected == 0 {
            return Err(ctx("the rule never fired".into()));
        }
    } else if injected != 1 {
        return Err(ctx(format!(
            "the rule fired {injected} times (once=on: exactly once expected)"
        )));
    }
    let io_errors: Vec<&serde_json::Value> = out
        .events
        .iter()
        .filter(|e| e["event"] == "BLOCK_IO_ERROR")
        .collect();
    for e in &io_errors {
        let d = &e["data"];
        if d["action"] != policy.name() || d["nospace"] != (errno == libc::ENOSPC) {
            return Err(ctx(format!("unexpected BLOCK_IO_ERROR: {e}")));
        }
    }
    match policy {
        Policy::Report => {
            if out.failed.len() > 1 || out.failed.iter().any(|&(_, st)| st != S_IOERR) {
                return Err(ctx(format!(
                    "one injected error failed these requests: {:?}",
                    out.failed
                )));
            }
            if io_errors.len() != out.failed.len() {
                return Err(ctx(format!(
                    "{} requests failed but {} BLOCK_IO_ERROR events came",
                    out.failed.len(),
                    io_errors.len()
                )));
            }
        }
        Policy::ReportAlways => {
            if out.failed.iter().any(|&(_, st)| st != S_IOERR)
                || io_errors.len() != out.failed.len()
            {
                return Err(ctx(format!(
                    "failed requests {:?}, {} BLOCK_IO_ERROR events",
                    out.failed,
                    io_errors.len()
                )));
            }
            for (off, len) in unflushed {
                model.set(off, None, len);
            }
        }
        Policy::Stop => {
            if !out.failed.is_empty() || io_errors.len() > 1 {
                return Err(ctx(format!(
                    "with stop the guest saw failures {:?} ({} BLOCK_IO_ERROR)",
                    out.failed,
                    io_errors.len()
                )));
            }
        }
    }
    let img_s = img.to_str().unwrap();
    check_image(&img).map_err(ctx)?;
    let snap = img.with_extension("s1.raw");
    qemu_img(&[
        "convert",
        "-l",
        "snapshot.name=s1",
        "-O",
        "raw",
        img_s,
        snap.to_str().unwrap(),
    ]);
    let s1 = std::fs::read(&snap).unwrap();
    // qemu-img reads a snapshot at the image's current size (its
    // load_tmp keeps the size): past the snapshot's own, zeroes.
    let (s1, past) = s1.split_at(t.guest.len().min(s1.len()));
    if s1 != t.guest || past.iter().any(|&b| b != 0) {
        let at = s1.iter().zip(&t.guest).position(|(a, b)| a != b);
        return Err(ctx(format!(
            "snapshot s1 no longer reads as it did: {} bytes (was {}), first difference at {at:?}",
            s1.len(),
            t.guest.len()
        )));
    }
    let now = image_bytes(&img);
    model.check("after reopening", 0, &now).map_err(ctx)?;
    if resized != (now.len() as u64 == g.resized) {
        return Err(ctx(format!(
            "image size {} after resize={resized}",
            now.len()
        )));
    }
    Ok(())
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn selected(all: &[&'static str]) -> Vec<&'static str> {
    match std::env::var("BLKDEBUG_EVENTS") {
        Ok(s) => all
            .iter()
            .copied()
            .filter(|e| s.split(',').any(|x| x == *e))
            .collect(),
        Err(_) => all.to_vec(),
    }
}

#[test]
fn every_qcow2_event_with_eio_and_enospc_keeps_the_image_sound_and_acknowledged_data() {
    let cases = selected(EVENTS)
        .into_iter()
        .flat_map(|e| {
            [
                (e, libc::EIO, Policy::Report),
                (e, libc::ENOSPC, Policy::Report),
            ]
        })
        .collect();
    let (n, failures) = run_cases(cases);
    assert!(
        failures.is_empty(),
        "{} of {n} cases failed:\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

#[test]
fn with_stop_the_failed_request_is_parked_and_cont_retries_it() {
    let all = [
        "write_aio",
        "cluster_alloc",
        "l2_update",
        "refblock_alloc",
        "cow_read",
        "read_aio",
    ];
    let cases = selected(&all)
        .into_iter()
        .map(|e| (e, libc::ENOSPC, Policy::Stop))
        .collect();
    let (n, failures) = run_cases(cases);
    assert!(
        failures.is_empty(),
        "{} of {n} cases failed:\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

#[test]
fn a_rule_on_an_open_time_event_fails_the_open_and_leaves_the_image() {
    for event in selected(OPEN_EVENTS) {
        for errno in [libc::EIO, libc::ENOSPC] {
            let (dir, img) = case_dir(SMALL);
            let before = std::fs::read(&img).unwrap();
            let args: Vec<String> = daemon_args(event, errno, true, Policy::Report)
                .into_iter()
                .map(|a| {
                    a.replace("{dir}", dir.path().to_str().unwrap())
                        .replace("{sock}", dir.path().join("vub.sock").to_str().unwrap())
                })
                .collect();
            let argv: Vec<&str> = args.iter().map(String::as_str).collect();
            let (code, err) = run_daemon(&argv);
            let msg = std::io::Error::from_raw_os_error(errno).to_string();
            let msg = msg.split(" (os error").next().unwrap();
            assert_eq!(code, 1, "{event}/{errno}: {err}");
            assert!(err.contains(msg), "{event}/{errno}: no '{msg}' in: {err}");
            assert_eq!(std::fs::read(&img).unwrap(), before, "{event}/{errno}");
            check_image(&img).unwrap();
        }
    }
}

/// The long variant (scripts/blkdebug-matrix.sh): every event with EIO
/// and ENOSPC, under `report` with and without `once`, and under `stop`.
#[test]
#[ignore]
fn full_matrix() {
    let cases = selected(EVENTS)
        .into_iter()
        .flat_map(|e| {
            [libc::EIO, libc::ENOSPC]
                .into_iter()
                .flat_map(move |errno| {
                    [Policy::Report, Policy::ReportAlways, Policy::Stop]
                        .into_iter()
                        .map(move |p| (e, errno, p))
                })
        })
        .collect();
    let (n, failures) = run_cases(cases);
    eprintln!("{n} cases, {} failed", failures.len());
    assert!(
        failures.is_empty(),
        "{} of {n} cases failed:\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

/// A rule gated by a state that an earlier event sets: the L1 write of the
/// flush after the resize fails (the first L1 update after the L1 table
/// grew). The entry that links the new L2 table must still reach the disk
/// with the next flush: the writes after the resize read back. Before the
/// fix a failed L1 cluster write left the dirty set and was never retried.
#[test]
fn a_failed_l1_write_is_retried_by_the_next_flush() {
    let extra =
        ",inject-error.0.state=2,set-state.0.event=l1_grow_activate_table,set-state.0.new_state=2";
    for errno in [libc::EIO, libc::ENOSPC] {
        run_case_with("l1_update", errno, Policy::Report, extra).unwrap();
    }
}
