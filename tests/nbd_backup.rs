//! Pull-mode backup over NBD, end to end, as docs/BACKUP.md describes it:
//! a full backup (persistent bitmap + fleecing + NBD export, copied by
//! qemu-img convert) and an incremental one (transaction [new bitmap,
//! old one disabled, blockdev-backup sync=none into a fleecing overlay],
//! NBD export of the overlay with the old bitmap, copied by a libnbd
//! client that reads only the dirty extents into an overlay of the full
//! backup on qemu-nbd), while a vhost-user guest keeps writing. The chain
//! must equal the disk at each backup's instant, and the client must have
//! read exactly the granules the guest wrote in between.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{Daemon, Qmp, Vm, VmOptions, S_OK};
use serde_json::json;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 16 * MIB;
const GRAN: u64 = 64 << 10;

fn sh(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn ok(r: &serde_json::Value) {
    assert!(r.get("return").is_some(), "{r}");
}

/// The guest: writes 4 KiB at pseudo-random places, mirrored into `live`
/// (what the disk holds now); returns the offsets written.
struct Guest {
    vm: Vm,
    live: Vec<u8>,
    seed: u64,
}

impl Guest {
    fn write(&mut self) -> u64 {
        self.seed = self
            .seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let off = ((self.seed >> 33) % (SIZE / 4096)) * 4096;
        let data = common::pattern(self.seed, 4096);
        assert_eq!(self.vm.write(0, off / 512, &data), S_OK);
        self.live[off as usize..off as usize + 4096].copy_from_slice(&data);
        off
    }

    /// Writes until `child` exits (at least `min` writes); the offsets.
    fn write_while(&mut self, child: &mut Child, min: usize) -> Vec<u64> {
        let mut offs = Vec::new();
        loop {
            offs.push(self.write());
            if offs.len() >= min && child.try_wait().unwrap().is_some() {
                break;
            }
        }
        let st = child.wait().unwrap();
        assert!(st.success(), "backup client failed: {st}");
        offs
    }
}

fn granules(offs: &[u64]) -> BTreeSet<u64> {
    offs.iter().map(|o| o / GRAN).collect()
}

fn bitmap_count(q: &mut Qmp, name: &str) -> u64 {
    let r = q.execute("query-named-block-nodes", json!({}));
    for n in r["return"].as_array().unwrap() {
        if n["node-name"] == "src" {
            for b in n["dirty-bitmaps"].as_array().into_iter().flatten() {
                if b["name"] == name {
                    return b["count"].as_u64().unwrap();
                }
            }
        }
    }
    panic!("no bitmap {name}: {r}");
}

/// Adds a fleecing overlay `node` (an empty qcow2 whose backing is src).
fn add_fleece(q: &mut Qmp, dir: &Path, node: &str) {
    let f = dir.join(format!("{node}.qcow2"));
    sh("qemu-img", &["create", "-q", "-f", "qcow2", p(&f), "16M"]);
    ok(&q.execute(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": node,
               "file": {"driver": "file", "filename": p(&f)}, "backing": "src"}),
    ));
}

/// Ends a backup: export, fleecing job and overlay go.
fn finish(q: &mut Qmp, export: &str, job: &str, node: &str) {
    ok(&q.execute("block-export-del", json!({"id": export})));
    q.wait_event("BLOCK_EXPORT_DELETED", Duration::from_secs(10));
    ok(&q.execute("block-job-cancel", json!({"device": job})));
    q.wait_event("BLOCK_JOB_CANCELLED", Duration::from_secs(10));
    ok(&q.execute("blockdev-del", json!({"node-name": node})));
}

#[test]
fn full_then_incremental_pull_backup_while_the_guest_writes() {
    let dir = tempfile::tempdir().unwrap();
    let d0 = dir.path().to_path_buf();
    let src = d0.join("src.qcow2");
    sh("qemu-img", &["create", "-q", "-f", "qcow2", p(&src), "16M"]);
    sh(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x11 0 6M", p(&src)],
    );
    let qmp = d0.join("qmp.sock");
    let nbd = d0.join("nbd.sock");
    let d = Daemon::start_in(
        dir,
        &[
            "--blockdev",
            &format!("driver=file,node-name=f0,filename={}", p(&src)),
            "--blockdev",
            "driver=qcow2,node-name=src,file=f0",
            "--export",
            "type=vhost-user-blk,id=vu,node-name=src,addr.type=unix,addr.path={sock},writable=on",
            "--chardev",
            &format!("socket,id=m,path={},server=on,wait=off", p(&qmp)),
            "--monitor",
            "chardev=m",
            "--nbd-server",
            &format!("addr.type=unix,addr.path={}", p(&nbd)),
        ],
    );
    let mut q = Qmp::connect(&qmp);
    let mut live = vec![0u8; SIZE as usize];
    live[..6 * MIB as usize].fill(0x11);
    let mut g = Guest {
        vm: Vm::connect(&d.socket, VmOptions::default()),
        live,
        seed: 42,
    };
    for _ in 0..50 {
        g.write();
    }

    // Full backup: the bitmap starts at the instant of the fleecing view.
    add_fleece(&mut q, &d0, "fl0");
    ok(&q.execute(
        "transaction",
        json!({"actions": [
            {"type": "block-dirty-bitmap-add",
             "data": {"node": "src", "name": "bm0", "persistent": true, "granularity": GRAN}},
            {"type": "blockdev-backup",
             "data": {"job-id": "fleece0", "device": "src", "target": "fl0", "sync": "none"}}]}),
    ));
    let at_full = g.live.clone();
    ok(&q.execute(
        "block-export-add",
        json!({"type": "nbd", "id": "full", "node-name": "fl0", "name": "full"}),
    ));
    let full = d0.join("full.qcow2");
    let uri = |name: &str| format!("nbd+unix:///{name}?socket={}", nbd.display());
    let mut client = Command::new("qemu-img")
        .args(["convert", "-O", "qcow2", &uri("full"), p(&full)])
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut between = g.write_while(&mut client, 50);
    let during_full = between.len();
    let ref_full = d0.join("ref-full.raw");
    std::fs::write(&ref_full, &at_full).unwrap();
    sh(
        "qemu-img",
        &[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            p(&full),
            p(&ref_full),
        ],
    );
    finish(&mut q, "full", "fleece0", "fl0");

    for _ in 0..50 {
        between.push(g.write());
    }

    // Incremental: a new bitmap records from the instant on; the old one,
    // disabled at the same instant, says what changed since the full one.
    add_fleece(&mut q, &d0, "fl1");
    ok(&q.execute(
        "transaction",
        json!({"actions": [
            {"type": "block-dirty-bitmap-add",
             "data": {"node": "src", "name": "bm1", "persistent": true, "granularity": GRAN}},
            {"type": "block-dirty-bitmap-disable", "data": {"node": "src", "name": "bm0"}},
            {"type": "blockdev-backup",
             "data": {"job-id": "fleece1", "device": "src", "target": "fl1", "sync": "none"}}]}),
    ));
    let at_inc = g.live.clone();
    let dirty = granules(&between);
    assert_eq!(bitmap_count(&mut q, "bm0"), dirty.len() as u64 * GRAN);
    ok(&q.execute(
        "block-export-add",
        json!({"type": "nbd", "id": "inc", "node-name": "fl1", "name": "inc",
               "bitmaps": ["bm0"]}),
    ));
    let inc = d0.join("inc.qcow2");
    sh(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            p(&full),
            "-F",
            "qcow2",
            p(&inc),
        ],
    );
    let dst = d0.join("dst.sock");
    let mut qnbd = Command::new("qemu-nbd")
        .args(["-f", "qcow2", "-t", "-k", p(&dst), p(&inc)])
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !common::listening(&dst) {
        assert!(
            std::time::Instant::now() < deadline,
            "qemu-nbd never listened"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = d0.join("pull.json");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/nbd/pull_backup.py");
    let mut client = Command::new("/usr/bin/python3")
        .args([
            script,
            &uri("inc"),
            "bm0",
            &format!("nbd+unix://?socket={}", dst.display()),
        ])
        .stdout(std::fs::File::create(&out).unwrap())
        .spawn()
        .unwrap();
    let after = g.write_while(&mut client, 50);
    let _ = qnbd.kill();
    let _ = qnbd.wait();
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    println!(
        "guest writes: {during_full} during the full copy, {} during the incremental copy",
        after.len()
    );
    println!(
        "incremental: {} dirty granules of 64 KiB written between the backups, \
         client read {} bytes in {} requests ({} extents) of {SIZE}",
        dirty.len(),
        report["read_bytes"],
        report["reads"],
        report["extents"].as_array().unwrap().len()
    );
    // Exactly the granules written between the two instants were read.
    let mut read_granules = BTreeSet::new();
    for e in report["extents"].as_array().unwrap() {
        let (start, len) = (e[0].as_u64().unwrap(), e[1].as_u64().unwrap());
        assert!(start % GRAN == 0 && len % GRAN == 0, "{e}");
        read_granules.extend(start / GRAN..(start + len) / GRAN);
    }
    assert_eq!(read_granules, dirty);
    assert_eq!(
        report["read_bytes"].as_u64().unwrap(),
        dirty.len() as u64 * GRAN
    );
    // The chain full <- inc is the disk at the incremental's instant.
    let ref_inc = d0.join("ref-inc.raw");
    std::fs::write(&ref_inc, &at_inc).unwrap();
    sh(
        "qemu-img",
        &["compare", "-f", "qcow2", "-F", "raw", p(&inc), p(&ref_inc)],
    );
    finish(&mut q, "inc", "fleece1", "fl1");
    // The next incremental starts from bm1: what the guest wrote since.
    assert_eq!(
        bitmap_count(&mut q, "bm1"),
        granules(&after).len() as u64 * GRAN
    );
    ok(&q.execute(
        "block-dirty-bitmap-remove",
        json!({"node": "src", "name": "bm0"}),
    ));
    // And the disk itself is what the guest wrote.
    drop(g.vm);
    let disk = d0.join("disk.raw");
    std::fs::write(&disk, &g.live).unwrap();
    let nbd_uri = uri("all");
    ok(&q.execute(
        "block-export-add",
        json!({"type": "nbd", "id": "all", "node-name": "src", "name": "all"}),
    ));
    sh("qemu-img", &["compare", "-f", "raw", p(&disk), &nbd_uri]);
}

/// Readers of a fleecing view race with the guest's writes to the same
/// clusters: each read must see the point in time (the target's read hook
/// serialises it with copy-before-write).
#[test]
fn fleecing_reads_never_see_the_guest_writes() {
    let dir = tempfile::tempdir().unwrap();
    let d0 = dir.path().to_path_buf();
    let src = d0.join("src.qcow2");
    sh("qemu-img", &["create", "-q", "-f", "qcow2", p(&src), "4M"]);
    sh(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x11 0 4M", p(&src)],
    );
    let qmp = d0.join("qmp.sock");
    let nbd = d0.join("nbd.sock");
    let d = Daemon::start_in(
        dir,
        &[
            "--blockdev",
            &format!("driver=file,node-name=f0,filename={}", p(&src)),
            "--blockdev",
            "driver=qcow2,node-name=src,file=f0",
            "--export",
            "type=vhost-user-blk,id=vu,node-name=src,addr.type=unix,addr.path={sock},writable=on",
            "--chardev",
            &format!("socket,id=m,path={},server=on,wait=off", p(&qmp)),
            "--monitor",
            "chardev=m",
            "--nbd-server",
            &format!("addr.type=unix,addr.path={}", p(&nbd)),
        ],
    );
    let mut q = Qmp::connect(&qmp);
    let f = d0.join("fl.qcow2");
    sh("qemu-img", &["create", "-q", "-f", "qcow2", p(&f), "4M"]);
    // Reads through the overlay to the disk are slowed down (a throttle
    // filter between them): the guest's write has all the time it needs
    // to land between a reader's look at the overlay and its read below.
    ok(&q.execute(
        "object-add",
        json!({"qom-type": "throttle-group", "id": "tg", "limits": {"bps-read": 16 * MIB}}),
    ));
    ok(&q.execute(
        "blockdev-add",
        json!({"driver": "throttle", "node-name": "slow", "throttle-group": "tg",
               "file": "src"}),
    ));
    ok(&q.execute(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "fl",
               "file": {"driver": "file", "filename": p(&f)}, "backing": "slow"}),
    ));
    ok(&q.execute(
        "blockdev-backup",
        json!({"job-id": "j", "device": "src", "target": "fl", "sync": "none"}),
    ));
    ok(&q.execute(
        "block-export-add",
        json!({"type": "nbd", "id": "e", "node-name": "fl", "name": "fl"}),
    ));
    let mut vm = Vm::connect(&d.socket, VmOptions::default());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/nbd/read_loop.py");
    let uri = format!("nbd+unix:///fl?socket={}", nbd.display());
    // Four readers (as nbdcopy's connections) against the guest.
    let mut readers: Vec<Child> = (0..4)
        .map(|_| {
            Command::new("/usr/bin/python3")
                .args([script, &uri, "2", "0x11"])
                .spawn()
                .unwrap()
        })
        .collect();
    let mut seed = 7u64;
    let mut writes = 0;
    while readers.iter_mut().any(|c| c.try_wait().unwrap().is_none()) {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let off = ((seed >> 33) % (4 * MIB / 4096)) * 4096;
        assert_eq!(vm.write(0, off / 512, &[0x99; 4096]), S_OK);
        writes += 1;
    }
    println!("{writes} guest writes during the reads");
    for mut c in readers {
        assert!(c.wait().unwrap().success(), "a reader saw the guest's data");
    }
}
