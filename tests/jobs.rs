//! Block jobs under continuous verified guest I/O: libblkio is the guest
//! (the model-checked random workload of tests/common/client.rs on one
//! queue, over a region of the disk), QMP starts the job, and qemu-img
//! judges the images once the daemon has stopped (SIGTERM).
//!
//! ```text
//!   guest thread --libblkio--> export --> node (moves on a pivot)
//!     \-- model of the disk, every read checked --\
//!   test --QMP--> block-stream / block-commit /     qemu-img convert/check/info
//!                 blockdev-mirror / blockdev-backup      == model
//! ```
//!
//! The guest runs in rounds of `ROUND_OPS` requests from a thread that is
//! started before the job and stopped only after the job has completed
//! (or, where the test says so, after a pivot and one more full round).
//!
//! `VUB_JOBS_DAEMON=qemu-storage-daemon cargo test --test jobs` runs the
//! same tests against QEMU's daemon, which takes the same command line.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use blkio::Blkioq;
use common::client::*;
use common::*;
use serde_json::{json, Value};

/// Size of every virtual disk.
const SIZE: u64 = 16 * MIB;
/// Requests in flight in the guest workload.
const DEPTH: usize = 8;
/// Requests per round of the guest workload.
const ROUND_OPS: usize = 150;
/// Longest wait for a job event.
const EVENT_TIMEOUT: Duration = Duration::from_secs(30);

/// The daemon under test: ours, or the one `VUB_JOBS_DAEMON` names.
fn daemon_binary() -> String {
    std::env::var("VUB_JOBS_DAEMON").unwrap_or_else(|_| daemon_bin().to_string())
}

// ---------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------

/// A daemon with one qcow2 node `node` over `{dir}/image` (backing from the
/// image header), exported with two queues, plus a QMP monitor; and a
/// libblkio guest with one queue.
struct Rig {
    d: Daemon,
    dir: PathBuf,
    qmp: Qmp,
    c: Client,
}

impl Rig {
    fn start(dir: tempfile::TempDir, node: &str, image: &str) -> Rig {
        let blockdev = format!(
            "driver=qcow2,node-name={node},discard=ignore,file.driver=file,file.filename={{dir}}/{image}"
        );
        let export = format!(
            "type=vhost-user-blk,id=e0,node-name={node},addr.type=unix,addr.path={{sock}},writable=on,num-queues=2"
        );
        let d = Daemon::start_bin(
            &daemon_binary(),
            dir,
            &[
                "--chardev",
                "socket,id=mon0,path={dir}/qmp.sock,server=on,wait=off",
                "--monitor",
                "chardev=mon0",
                "--blockdev",
                &blockdev,
                "--export",
                &export,
            ],
            &[],
        );
        let dir = d.dir.path().to_path_buf();
        // The monitor may still be between bind and listen.
        let sock = dir.join("qmp.sock");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(&sock).is_err() {
            assert!(Instant::now() < deadline, "QMP socket never accepted");
            std::thread::sleep(Duration::from_millis(10));
        }
        let qmp = Qmp::connect(&sock);
        let c = Client::start(
            &d.socket,
            ClientOptions {
                queues: 1,
                buf_len: DEPTH * SLOT,
                ..Default::default()
            },
        );
        Rig { d, dir, qmp, c }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Disconnects the guest and stops the daemon with SIGTERM; returns
    /// the temp dir with the images for the judge.
    fn stop(self) -> tempfile::TempDir {
        let Rig { mut d, qmp, c, .. } = self;
        drop(c);
        drop(qmp);
        let st = d.terminate();
        assert!(st.success(), "daemon exit: {st:?}\n{}", d.log());
        std::mem::replace(&mut d.dir, tempfile::tempdir().unwrap())
    }
}

fn qemu_io(img: &Path, cmd: &str) {
    let out = std::process::Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", cmd, img.to_str().unwrap()])
        .output()
        .expect("qemu-io");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && text.contains("wrote"),
        "qemu-io {cmd}: {text}"
    );
}

fn create(img: &Path, backing: Option<&str>) {
    let size = SIZE.to_string();
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if let Some(b) = backing {
        args.extend_from_slice(&["-b", b, "-F", "qcow2"]);
    }
    args.push(img.to_str().unwrap());
    if backing.is_none() {
        args.push(&size);
    }
    qemu_img(&args);
}

/// base.qcow2 <- mid.qcow2 <- top.qcow2: base has data in [0, 6M), mid in
/// [4M, 10M) (over base in [4M, 6M)), top in [14M, 15M). Returns the
/// disk's bytes as qemu-img sees them through top.
fn make_chain(dir: &Path) -> Vec<u8> {
    create(&dir.join("base.qcow2"), None);
    create(&dir.join("mid.qcow2"), Some("base.qcow2"));
    create(&dir.join("top.qcow2"), Some("mid.qcow2"));
    qemu_io(&dir.join("base.qcow2"), "write -P 0xb1 0 6M");
    qemu_io(&dir.join("base.qcow2"), "write -P 0xb2 1M 64k");
    qemu_io(&dir.join("mid.qcow2"), "write -P 0x3d 4M 6M");
    qemu_io(&dir.join("mid.qcow2"), "write -z 8M 256k");
    qemu_io(&dir.join("top.qcow2"), "write -P 0x7e 14M 1M");
    let model = image_bytes(&dir.join("top.qcow2"));
    assert_eq!(model.len() as u64, SIZE);
    assert_eq!(model[(5 * MIB) as usize], 0x3d);
    assert_eq!(model[(3 * MIB) as usize], 0xb1);
    model
}

/// A single qcow2 image `name` that qemu-img made from a pattern; the
/// pattern is returned.
fn make_patterned(dir: &Path, name: &str, seed: u64) -> Vec<u8> {
    let model = pattern(seed, SIZE as usize);
    let raw = dir.join(format!("{name}.raw"));
    std::fs::write(&raw, &model).unwrap();
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        raw.to_str().unwrap(),
        dir.join(name).to_str().unwrap(),
    ]);
    model
}

fn assert_check_clean(img: &Path) {
    let check = qemu_img(&["check", img.to_str().unwrap()]);
    assert!(check.contains("No errors were found"), "{img:?}: {check}");
}

fn backing_file(img: &Path) -> Option<String> {
    let info = qemu_img(&["info", "--output=json", img.to_str().unwrap()]);
    let v: Value = serde_json::from_str(&info).unwrap();
    v["backing-filename"].as_str().map(str::to_string)
}

/// The extents allocated in `img` itself (not in its backing chain), as
/// (offset, length) pairs from qemu-img map.
fn allocated_extents(img: &Path) -> Vec<(u64, u64)> {
    let map = qemu_img(&["map", "--output=json", img.to_str().unwrap()]);
    let v: Value = serde_json::from_str(&map).unwrap_or_else(|e| panic!("{e}: {map}"));
    v.as_array()
        .unwrap()
        .iter()
        .filter(|e| e["depth"] == 0 && (e["data"] == true || e["zero"] == true))
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect()
}

// ---------------------------------------------------------------------------
// QMP
// ---------------------------------------------------------------------------

fn ok(qmp: &mut Qmp, cmd: &str, args: Value) -> Value {
    let r = qmp.execute(cmd, args.clone());
    assert!(r.get("return").is_some(), "{cmd} {args}: {r}");
    r["return"].clone()
}

/// Waits for the job event `name` of `job`; any other end of the job
/// first (an error, a cancel, a completion with an error) fails the test.
fn job_event(qmp: &mut Qmp, job: &str, name: &str) -> Value {
    loop {
        let ev = qmp.wait_event_of(
            &[
                name,
                "BLOCK_JOB_COMPLETED",
                "BLOCK_JOB_CANCELLED",
                "BLOCK_JOB_ERROR",
            ],
            EVENT_TIMEOUT,
        );
        if ev["data"]["device"] != job {
            continue;
        }
        assert!(
            ev["event"] == name && ev["data"].get("error").is_none(),
            "waiting for {name} of {job}, got {ev}"
        );
        return ev;
    }
}

/// The node name of the format (qcow2) node over the file `file`.
fn node_of(qmp: &mut Qmp, file: &str) -> String {
    let nodes = ok(qmp, "query-named-block-nodes", json!({}));
    let found: Vec<&Value> = nodes
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| {
            n["drv"] == "qcow2"
                && n["file"]
                    .as_str()
                    .is_some_and(|f| f == file || f.ends_with(&format!("/{file}")))
        })
        .collect();
    assert_eq!(found.len(), 1, "one qcow2 node over {file}: {nodes}");
    found[0]["node-name"].as_str().unwrap().to_string()
}

fn export_node(qmp: &mut Qmp) -> String {
    let exports = ok(qmp, "query-block-exports", json!({}));
    let e0 = exports
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["id"] == "e0")
        .unwrap_or_else(|| panic!("no export e0: {exports}"));
    e0["node-name"].as_str().unwrap().to_string()
}

fn add_qcow2(qmp: &mut Qmp, node: &str, path: &Path) {
    ok(
        qmp,
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": node, "discard": "ignore",
               "file": {"driver": "file", "filename": path.to_str().unwrap()}}),
    );
}

// ---------------------------------------------------------------------------
// The guest
// ---------------------------------------------------------------------------

/// Steers the guest thread: it counts finished rounds and stops after
/// round `stop_at` (none until the test says).
struct Ctl {
    rounds: AtomicUsize,
    stop_at: AtomicUsize,
    /// The guest thread panicked (a verification failed).
    failed: AtomicBool,
}

impl Ctl {
    /// Lets the round in progress finish and `more` further rounds run.
    fn stop_after(&self, more: usize) {
        let at = self.rounds.load(Ordering::SeqCst) + 1 + more;
        self.stop_at.fetch_min(at, Ordering::SeqCst);
    }

    /// Waits until `n` rounds have finished.
    fn wait_rounds(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.rounds.load(Ordering::SeqCst) < n {
            assert!(!self.failed.load(Ordering::SeqCst), "the guest failed");
            assert!(Instant::now() < deadline, "guest rounds stalled");
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// Stops the guest thread if the test panics, so the scope can end.
struct StopOnDrop<'a>(&'a Ctl);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.stop_after(0);
    }
}

/// Marks the guest failed if its thread panics.
struct FailOnPanic<'a>(&'a Ctl);

impl Drop for FailOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.failed.store(true, Ordering::SeqCst);
        }
    }
}

#[derive(Default, Debug)]
struct Totals {
    rounds: usize,
    reads: usize,
    writes: usize,
    zeroes_or_discards: usize,
}

/// Runs `body` while a guest thread runs verified rounds of the workload
/// on `q` over `[base, base + model.len())`; `body` ends the guest with
/// `Ctl::stop_after` (if it does not, the round in progress is the last).
/// The guest flushes after its last round.
fn with_guest<R>(
    q: &mut Blkioq,
    bufs: usize,
    base: u64,
    model: &mut [u8],
    seed: u64,
    body: impl FnOnce(&Ctl) -> R,
) -> (R, Totals) {
    let ctl = Ctl {
        rounds: AtomicUsize::new(0),
        stop_at: AtomicUsize::new(usize::MAX),
        failed: AtomicBool::new(false),
    };
    let len = model.len();
    std::thread::scope(|s| {
        let ctl = &ctl;
        let guest = s.spawn(move || {
            let _mark = FailOnPanic(ctl);
            let mut t = Totals::default();
            while t.rounds < ctl.stop_at.load(Ordering::SeqCst) {
                let w = Workload {
                    seed: seed.wrapping_mul(1000) + t.rounds as u64,
                    ops: ROUND_OPS,
                    depth: DEPTH,
                    lbs: 512,
                    poll: false,
                    time_cap: Duration::from_secs(60),
                    discard_keeps_data: true,
                };
                let tally = run_workload(q, bufs, base, model, &w);
                t.reads += tally.reads;
                t.writes += tally.writes;
                t.zeroes_or_discards += tally.write_zeroes + tally.discards;
                t.rounds += 1;
                ctl.rounds.store(t.rounds, Ordering::SeqCst);
            }
            let f = flush(q, false);
            assert_eq!(f, 0, "final flush: {}", errno_name(f));
            t
        });
        let guard = StopOnDrop(ctl);
        let r = body(ctl);
        if ctl.stop_at.load(Ordering::SeqCst) == usize::MAX {
            ctl.stop_after(0);
        }
        // A failed verification is the test's failure.
        let t = guest
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        drop(guard);
        eprintln!("guest over [{base}, +{len}): {t:?}");
        assert!(t.reads > 0 && t.writes > 0, "{t:?}");
        (r, t)
    })
}

/// Runs a job while the guest writes: the guest finishes a round first,
/// `start` starts the job, `end` waits for its end (and may do more, e.g.
/// complete it); then the round in progress and `more` rounds run.
fn job_under_guest(
    rig: &mut Rig,
    region: std::ops::Range<u64>,
    model: &mut [u8],
    seed: u64,
    more: usize,
    start: impl FnOnce(&mut Qmp),
    end: impl FnOnce(&mut Qmp),
) {
    let bufs = rig.c.buf(0);
    let qmp = &mut rig.qmp;
    let q = &mut rig.c.queues[0];
    let m = &mut model[region.start as usize..region.end as usize];
    with_guest(q, bufs, region.start, m, seed, |ctl| {
        ctl.wait_rounds(1);
        let t0 = Instant::now();
        start(qmp);
        end(qmp);
        eprintln!(
            "job ran {:?} under the guest (round {} then)",
            t0.elapsed(),
            ctl.rounds.load(Ordering::SeqCst)
        );
        assert!(
            ctl.rounds.load(Ordering::SeqCst) < ctl.stop_at.load(Ordering::SeqCst),
            "the guest stopped before the job ended"
        );
        ctl.stop_after(more);
    });
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

/// block-stream of top (no base) copies base's and mid's data into top
/// while the guest reads (backing data included) and writes; top ends up
/// with no backing file and the guest's disk.
#[test]
fn stream_flattens_the_chain_while_the_guest_writes() {
    let dir = tempfile::tempdir().unwrap();
    let mut model = make_chain(dir.path());
    let mut rig = Rig::start(dir, "top", "top.qcow2");
    job_under_guest(
        &mut rig,
        2 * MIB..10 * MIB,
        &mut model,
        0x57,
        0,
        |qmp| {
            ok(
                qmp,
                "block-stream",
                json!({"job-id": "s0", "device": "top", "speed": 3 * MIB}),
            );
        },
        |qmp| {
            job_event(qmp, "s0", "BLOCK_JOB_COMPLETED");
        },
    );
    let dir = rig.stop();
    let dir = dir.path();
    let top = dir.join("top.qcow2");
    assert_eq!(backing_file(&top), None, "top still has a backing file");
    assert_check_clean(&top);
    assert_bytes_eq("top vs model", 0, &image_bytes(&top), &model);
}

/// block-commit of mid into base (top stays active) while the guest
/// writes to top: base alone then holds mid's view from before the job,
/// top's backing file is base, and top reads as the guest's disk.
#[test]
fn commit_merges_mid_into_base_while_the_guest_writes() {
    let dir = tempfile::tempdir().unwrap();
    let mut model = make_chain(dir.path());
    let mid_before = image_bytes(&dir.path().join("mid.qcow2"));
    let mut rig = Rig::start(dir, "top", "top.qcow2");
    let mid = node_of(&mut rig.qmp, "mid.qcow2");
    let base = node_of(&mut rig.qmp, "base.qcow2");
    job_under_guest(
        &mut rig,
        2 * MIB..10 * MIB,
        &mut model,
        0xc0,
        0,
        |qmp| {
            ok(
                qmp,
                "block-commit",
                json!({"job-id": "c0", "device": "top", "top-node": mid,
                       "base-node": base, "speed": 4 * MIB}),
            );
        },
        |qmp| {
            job_event(qmp, "c0", "BLOCK_JOB_COMPLETED");
        },
    );
    let dir = rig.stop();
    let dir = dir.path();
    let top = dir.join("top.qcow2");
    let base_img = dir.join("base.qcow2");
    let backing = backing_file(&top).expect("top has a backing file");
    assert!(backing.ends_with("base.qcow2"), "top's backing: {backing}");
    assert_check_clean(&top);
    assert_check_clean(&base_img);
    assert_bytes_eq("top vs model", 0, &image_bytes(&top), &model);
    assert_bytes_eq(
        "base vs mid before",
        0,
        &image_bytes(&base_img),
        &mid_before,
    );
}

/// Active commit (top and mid into base): READY, block-job-complete while
/// the guest writes, and the export serves base from then on; the guest
/// keeps going, verified, on base.
#[test]
fn active_commit_pivots_the_export_to_base() {
    let dir = tempfile::tempdir().unwrap();
    let mut model = make_chain(dir.path());
    let mut rig = Rig::start(dir, "top", "top.qcow2");
    let base = node_of(&mut rig.qmp, "base.qcow2");
    let base2 = base.clone();
    let mut pivoted_to = String::new();
    job_under_guest(
        &mut rig,
        2 * MIB..10 * MIB,
        &mut model,
        0xac,
        1,
        |qmp| {
            ok(
                qmp,
                "block-commit",
                json!({"job-id": "c0", "device": "top", "base-node": base2}),
            );
        },
        |qmp| {
            job_event(qmp, "c0", "BLOCK_JOB_READY");
            ok(qmp, "block-job-complete", json!({"device": "c0"}));
            job_event(qmp, "c0", "BLOCK_JOB_COMPLETED");
            pivoted_to = export_node(qmp);
        },
    );
    assert_eq!(pivoted_to, base, "the export's node after the pivot");
    let dir = rig.stop();
    let dir = dir.path();
    let base_img = dir.join("base.qcow2");
    assert_check_clean(&base_img);
    assert_bytes_eq("base vs model", 0, &image_bytes(&base_img), &model);
}

/// blockdev-mirror sync=full from src to a fresh qcow2 `tgt`: READY,
/// complete while the guest writes; the export serves tgt, which ends up
/// as the guest's disk.
fn mirror_pivots(copy_mode: &str) {
    let dir = tempfile::tempdir().unwrap();
    let mut model = make_patterned(dir.path(), "src.qcow2", 0x5c);
    let tgt_img = dir.path().join("tgt.qcow2");
    create(&tgt_img, None);
    let mut rig = Rig::start(dir, "src", "src.qcow2");
    add_qcow2(&mut rig.qmp, "tgt", &tgt_img);
    let mut pivoted_to = String::new();
    job_under_guest(
        &mut rig,
        4 * MIB..12 * MIB,
        &mut model,
        0x1a,
        1,
        |qmp| {
            ok(
                qmp,
                "blockdev-mirror",
                json!({"job-id": "m0", "device": "src", "target": "tgt",
                       "sync": "full", "copy-mode": copy_mode}),
            );
        },
        |qmp| {
            job_event(qmp, "m0", "BLOCK_JOB_READY");
            ok(qmp, "block-job-complete", json!({"device": "m0"}));
            job_event(qmp, "m0", "BLOCK_JOB_COMPLETED");
            pivoted_to = export_node(qmp);
        },
    );
    assert_eq!(pivoted_to, "tgt", "the export's node after the pivot");
    let dir = rig.stop();
    let dir = dir.path();
    assert_check_clean(&dir.join("src.qcow2"));
    assert_check_clean(&tgt_img);
    assert_bytes_eq("target vs model", 0, &image_bytes(&tgt_img), &model);
}

#[test]
fn mirror_pivots_the_export_to_the_target_background() {
    mirror_pivots("background");
}

#[test]
fn mirror_pivots_the_export_to_the_target_write_blocking() {
    mirror_pivots("write-blocking");
}

/// A mirror that reached READY under the guest, then (guest stopped)
/// block-job-cancel: it completes without a pivot, and target, source and
/// model agree.
#[test]
fn mirror_cancelled_after_ready_leaves_a_consistent_copy() {
    let dir = tempfile::tempdir().unwrap();
    let mut model = make_patterned(dir.path(), "src.qcow2", 0x6d);
    let tgt_img = dir.path().join("tgt.qcow2");
    create(&tgt_img, None);
    let mut rig = Rig::start(dir, "src", "src.qcow2");
    add_qcow2(&mut rig.qmp, "tgt", &tgt_img);
    job_under_guest(
        &mut rig,
        4 * MIB..12 * MIB,
        &mut model,
        0xca,
        0,
        |qmp| {
            ok(
                qmp,
                "blockdev-mirror",
                json!({"job-id": "m0", "device": "src", "target": "tgt",
                       "sync": "full"}),
            );
        },
        |qmp| {
            job_event(qmp, "m0", "BLOCK_JOB_READY");
        },
    );
    // The guest has stopped (and flushed): cancel the ready job.
    ok(&mut rig.qmp, "block-job-cancel", json!({"device": "m0"}));
    job_event(&mut rig.qmp, "m0", "BLOCK_JOB_COMPLETED");
    assert_eq!(export_node(&mut rig.qmp), "src");
    let dir = rig.stop();
    let dir = dir.path();
    let src_img = dir.join("src.qcow2");
    assert_check_clean(&src_img);
    assert_check_clean(&tgt_img);
    assert_bytes_eq("source vs model", 0, &image_bytes(&src_img), &model);
    assert_bytes_eq("target vs model", 0, &image_bytes(&tgt_img), &model);
}

/// blockdev-backup sync=full under a guest that writes all over its
/// region from the moment the job starts: the target holds the disk as
/// it was at the start (copy-before-write), the source the guest's disk.
#[test]
fn backup_is_a_point_in_time_copy_while_the_guest_writes() {
    backup_point_in_time(false);
}

/// The same with drive-backup (issue 24): the target file is created by
/// the command (mode absolute-paths) and its node goes with the job.
#[test]
fn drive_backup_is_a_point_in_time_copy_while_the_guest_writes() {
    backup_point_in_time(true);
}

fn backup_point_in_time(drive: bool) {
    let dir = tempfile::tempdir().unwrap();
    let mut model = make_patterned(dir.path(), "src.qcow2", 0xba);
    let tgt_img = dir.path().join("tgt.qcow2");
    if !drive {
        create(&tgt_img, None);
    }
    let mut rig = Rig::start(dir, "src", "src.qcow2");
    if !drive {
        add_qcow2(&mut rig.qmp, "tgt", &tgt_img);
    }
    let region = 2 * MIB..14 * MIB;
    let bufs = rig.c.buf(0);
    // A verified phase before the backup point.
    let m = &mut model[region.start as usize..region.end as usize];
    with_guest(&mut rig.c.queues[0], bufs, region.start, m, 0xb0, |ctl| {
        ctl.wait_rounds(1)
    });
    let at_start = model.clone();
    if drive {
        ok(
            &mut rig.qmp,
            "drive-backup",
            json!({"job-id": "b0", "device": "src", "target": tgt_img.to_str().unwrap(),
                   "format": "qcow2", "sync": "full", "speed": 8 * MIB}),
        );
    } else {
        ok(
            &mut rig.qmp,
            "blockdev-backup",
            json!({"job-id": "b0", "device": "src", "target": "tgt", "sync": "full",
                   "speed": 8 * MIB}),
        );
    }
    let t0 = Instant::now();
    let qmp = &mut rig.qmp;
    let m = &mut model[region.start as usize..region.end as usize];
    with_guest(&mut rig.c.queues[0], bufs, region.start, m, 0xb1, |ctl| {
        job_event(qmp, "b0", "BLOCK_JOB_COMPLETED");
        assert!(
            ctl.rounds.load(Ordering::SeqCst) > 0,
            "no guest round during the backup"
        );
        eprintln!("backup ran {:?}", t0.elapsed());
    });
    let dir = rig.stop();
    let dir = dir.path();
    let src_img = dir.join("src.qcow2");
    assert_check_clean(&src_img);
    assert_check_clean(&tgt_img);
    assert_bytes_eq(
        "backup vs disk at its start",
        0,
        &image_bytes(&tgt_img),
        &at_start,
    );
    assert_bytes_eq("source vs model", 0, &image_bytes(&src_img), &model);
}

/// A full backup and bitmap b0 in one transaction, then two incremental
/// backups (each a qcow2 over the previous backup) while the guest goes on
/// writing: each backup, read through its chain, is the disk at its point.
#[test]
fn incremental_backups_replay_to_each_backup_point() {
    let dir = tempfile::tempdir().unwrap();
    let mut model = make_patterned(dir.path(), "src.qcow2", 0x1c);
    let full_img = dir.path().join("full.qcow2");
    create(&full_img, None);
    let mut rig = Rig::start(dir, "src", "src.qcow2");
    add_qcow2(&mut rig.qmp, "full", &full_img);
    let region = 2 * MIB..14 * MIB;
    let bufs = rig.c.buf(0);
    let speed = 8 * MIB;

    let mut points = vec![(full_img.clone(), model.clone())];
    let r = rig.qmp.execute(
        "transaction",
        json!({"actions": [
            {"type": "block-dirty-bitmap-add", "data": {"node": "src", "name": "b0"}},
            {"type": "blockdev-backup", "data": {"job-id": "full", "device": "src",
             "target": "full", "sync": "full", "speed": speed}},
        ]}),
    );
    assert!(
        r.get("return").is_some(),
        "transaction with blockdev-backup: {r}"
    );
    let mut job = "full".to_string();
    for n in 1..=3 {
        // The guest writes while the previous backup runs, and a round
        // after it, so the next backup has something to copy.
        let qmp = &mut rig.qmp;
        let m = &mut model[region.start as usize..region.end as usize];
        let t0 = Instant::now();
        with_guest(
            &mut rig.c.queues[0],
            bufs,
            region.start,
            m,
            0x10 + n,
            |ctl| {
                job_event(qmp, &job, "BLOCK_JOB_COMPLETED");
                eprintln!("backup {job} ran {:?}", t0.elapsed());
                ctl.stop_after(1);
            },
        );
        if n == 3 {
            break;
        }
        // Guest stopped: the next backup point. The previous target goes
        // (as after any backup) and is opened again as the new one's backing.
        ok(&mut rig.qmp, "blockdev-del", json!({"node-name": job}));
        let prev = points.last().unwrap().0.clone();
        let img = rig.path(&format!("inc-{n}.qcow2"));
        create(&img, Some(prev.file_name().unwrap().to_str().unwrap()));
        job = format!("inc{n}");
        add_qcow2(&mut rig.qmp, &job, &img);
        points.push((img, model.clone()));
        ok(
            &mut rig.qmp,
            "blockdev-backup",
            json!({"job-id": job, "device": "src", "target": job, "sync": "incremental",
                   "bitmap": "b0", "speed": speed}),
        );
    }
    let dir = rig.stop();
    let dir = dir.path();
    let src_img = dir.join("src.qcow2");
    assert_check_clean(&src_img);
    assert_bytes_eq("source vs model", 0, &image_bytes(&src_img), &model);
    for (i, (img, want)) in points.iter().enumerate() {
        assert_check_clean(img);
        if i > 0 {
            // Incremental: only what the guest dirtied is in the image.
            let extents = allocated_extents(img);
            assert!(!extents.is_empty(), "{img:?} holds nothing");
            let outside = extents
                .into_iter()
                .find(|&(start, len)| start < region.start || start + len > region.end);
            assert_eq!(
                outside, None,
                "{img:?} holds clusters the guest never wrote"
            );
        }
        assert_bytes_eq(
            &format!("{img:?} vs the disk at its backup point"),
            0,
            &image_bytes(img),
            want,
        );
    }
}

// ---------------------------------------------------------------------------
// blockdev-reopen of a qcow2 node (issue 24)
// ---------------------------------------------------------------------------

/// The file node under the qcow2 node `node`.
fn file_child_of(qmp: &mut Qmp, node: &str) -> String {
    let graph = ok(qmp, "x-debug-query-block-graph", json!({}));
    let id_of = |name: &str| {
        graph["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["name"] == name)
            .map(|n| n["id"].clone())
    };
    let parent = id_of(node).unwrap_or_else(|| panic!("no node {node}: {graph}"));
    let edge = graph["edges"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["parent"] == parent && e["name"] == "file")
        .unwrap_or_else(|| panic!("no file edge under {node}: {graph}"));
    graph["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == edge["child"])
        .unwrap()["name"]
        .as_str()
        .unwrap()
        .to_string()
}

/// The ranges `img` itself holds (data or zero clusters), read with
/// force-share while the daemon has the image open.
fn own_extents_shared(img: &Path) -> Vec<(u64, u64)> {
    let map = qemu_img(&["map", "-U", "--output=json", img.to_str().unwrap()]);
    let v: Value = serde_json::from_str(&map).unwrap_or_else(|e| panic!("{e}: {map}"));
    v.as_array()
        .unwrap()
        .iter()
        .filter(|e| e["depth"] == 0 && (e["data"] == true || e["zero"] == true))
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect()
}

/// The disk after the backing node changes: what top holds stays, the
/// rest reads from the new backing, and zeroes past its end (`None`:
/// zeroes).
fn rebase_model(model: &mut [u8], top: &Path, new_backing: Option<&[u8]>) {
    let own = own_extents_shared(top);
    let len = model.len();
    let mut off = 0usize;
    let mut fill = |from: usize, to: usize| {
        let b = new_backing.unwrap_or(&[]);
        let mid = to.min(b.len()).max(from);
        if mid > from {
            model[from..mid].copy_from_slice(&b[from..mid]);
        }
        model[mid..to].fill(0);
    };
    for (s, l) in own {
        fill(off, s as usize);
        off = (s + l) as usize;
    }
    fill(off, len);
}

/// blockdev-reopen of the exported qcow2 node while a verified guest
/// reads and writes: the same options (a no-op), read-only refused while
/// the export writes, then `backing` changed to another node (the
/// guest's reads of clusters top does not hold come from it) and to null
/// (they read zeroes). Between the phases the guest stops and the model
/// takes the new backing's data where top holds nothing (qemu-img map -U
/// of top). At the end qemu-img finds top clean and equal to the model
/// without a backing file.
#[test]
fn qcow2_reopen_changes_the_backing_under_the_guest() {
    let dir = tempfile::tempdir().unwrap();
    let mut model = make_patterned(dir.path(), "base.qcow2", 11);
    create(&dir.path().join("top.qcow2"), Some("base.qcow2"));
    // The new backing node is smaller (6 MiB, as QEMU accepts): past its
    // end top's holes read zeroes.
    let other = pattern(22, (6 * MIB) as usize);
    let raw = dir.path().join("other.raw");
    std::fs::write(&raw, &other).unwrap();
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        raw.to_str().unwrap(),
        dir.path().join("other.qcow2").to_str().unwrap(),
    ]);
    let mut rig = Rig::start(dir, "top", "top.qcow2");
    let base = node_of(&mut rig.qmp, "base.qcow2");
    let file = file_child_of(&mut rig.qmp, "top");
    let top_img = rig.path("top.qcow2");
    let other_img = rig.path("other.qcow2");
    // Each phase's guest works on a region of its own that top does not
    // hold yet: its reads of what it has not written come from the
    // backing node of the phase.
    let regions = [0..4 * MIB, 4 * MIB..8 * MIB, 8 * MIB..12 * MIB];
    let reopen = |backing: Value, extra: Value| {
        let mut o = json!({"driver": "qcow2", "node-name": "top", "file": file,
                           "discard": "ignore", "backing": backing});
        if let Value::Object(m) = extra {
            for (k, v) in m {
                o[k] = v;
            }
        }
        json!({"options": [o]})
    };
    let bufs = rig.c.buf(0);
    let phase = |rig: &mut Rig, model: &mut [u8], seed: u64, cmd: &dyn Fn(&mut Qmp)| {
        let region = regions[seed as usize - 1].clone();
        let held = own_extents_shared(&top_img);
        assert!(
            held.iter()
                .all(|&(s, l)| s + l <= region.start || s >= region.end),
            "top holds {held:?}"
        );
        let qmp = &mut rig.qmp;
        let q = &mut rig.c.queues[0];
        let m = &mut model[region.start as usize..region.end as usize];
        with_guest(q, bufs, region.start, m, seed, |ctl| {
            ctl.wait_rounds(1);
            cmd(qmp);
            ctl.stop_after(0);
        });
    };
    // The same backing: nothing changes; read-only is refused while the
    // export writes, and nothing changes either.
    phase(&mut rig, &mut model, 1, &|qmp| {
        ok(qmp, "blockdev-reopen", reopen(json!(base), json!({})));
        let r = qmp.execute(
            "blockdev-reopen",
            reopen(json!(base), json!({"read-only": true})),
        );
        let e = r["error"]["desc"].as_str().unwrap_or_default().to_string();
        // Ours names the writer; QEMU: "Read-only block node 'top'
        // cannot support read-write users".
        assert!(
            e.contains("export 'e0'") || e.contains("cannot support read-write users"),
            "{r}"
        );
    });
    // Another backing node.
    ok(
        &mut rig.qmp,
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "other", "read-only": true,
               "file": {"driver": "file", "filename": other_img.to_str().unwrap()}}),
    );
    ok(
        &mut rig.qmp,
        "blockdev-reopen",
        reopen(json!("other"), json!({})),
    );
    // The backing image opened from top's header was top's alone: it
    // went with its edge (QEMU closes it too).
    let nodes = ok(&mut rig.qmp, "query-named-block-nodes", json!({}));
    assert!(
        !nodes
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["node-name"] == base.as_str()),
        "{nodes}"
    );
    rebase_model(&mut model, &top_img, Some(&other));
    phase(&mut rig, &mut model, 2, &|_| {});
    // No backing node: top's holes read zeroes.
    ok(
        &mut rig.qmp,
        "blockdev-reopen",
        reopen(Value::Null, json!({})),
    );
    rebase_model(&mut model, &top_img, None);
    phase(&mut rig, &mut model, 3, &|_| {});
    // The old backing nodes can go: nothing uses them.
    ok(&mut rig.qmp, "blockdev-del", json!({"node-name": "other"}));
    let dir = rig.stop();
    let top_img = dir.path().join("top.qcow2");
    assert_check_clean(&top_img);
    let raw = dir.path().join("top.alone.raw");
    let json_top = format!(
        "json:{{\"driver\": \"qcow2\", \"backing\": null, \"file\": {{\"driver\": \"file\", \"filename\": \"{}\"}}}}",
        top_img.display()
    );
    qemu_img(&["convert", "-O", "raw", &json_top, raw.to_str().unwrap()]);
    assert_bytes_eq(
        "top without backing vs model",
        0,
        &std::fs::read(&raw).unwrap(),
        &model,
    );
}
