//! Inactive nodes and the handoff of an image between two daemons (issue
//! 20, QEMU 10's `active` option and blockdev-set-active):
//!
//! ```text
//!   daemon A (active, writes) ----\
//!                                  image  <- qemu-img check, qemu-io
//!   daemon B (active=off) --------/
//!   A: blockdev-set-active false   (written back, write lock released)
//!   B: blockdev-set-active true    (locks taken, image read again)
//! ```
//!
//! Each daemon serves its node to a test frontend (tests/common's Vm), so
//! what a guest sees on either side is checked through vhost-user.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;

fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ok(r: &Value) -> &Value {
    r.get("return")
        .unwrap_or_else(|| panic!("command failed: {r}"))
}

fn err(r: &Value) -> String {
    r.pointer("/error/desc")
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("command succeeded: {r}"))
        .to_string()
}

/// A daemon over `img` (in `dir`): `blockdevs` then one export `e` of
/// node `node` on `{dir}/NAME.sock`, and a monitor on `{dir}/NAME.qmp`.
fn daemon(dir: &Path, name: &str, blockdevs: &[String], export: &str) -> (Daemon, Qmp, PathBuf) {
    let sub = tempfile::Builder::new()
        .prefix(name)
        .tempdir_in(dir)
        .unwrap();
    let sock = sub.path().join("vub.sock");
    let qmp = sub.path().join("qmp.sock");
    let mut args: Vec<String> = Vec::new();
    for b in blockdevs {
        args.push("--blockdev".into());
        args.push(b.clone());
    }
    args.push("--export".into());
    args.push(format!("{export},addr.type=unix,addr.path={{sock}}"));
    args.push("--chardev".into());
    args.push(format!(
        "socket,id=m,path={},server=on,wait=off",
        qmp.display()
    ));
    args.push("--monitor".into());
    args.push("chardev=m".into());
    // The images live in `dir`, outside the daemon's own temp dir.
    args.push("--allow-path".into());
    args.push(dir.display().to_string());
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let d = Daemon::start_in(sub, &refs);
    let q = Qmp::connect(&qmp);
    (d, q, sock)
}

fn node_info(q: &mut Qmp, node: &str) -> Value {
    let r = q.execute("query-named-block-nodes", json!({}));
    ok(&r)
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == node)
        .unwrap_or_else(|| panic!("no node {node}: {r}"))
        .clone()
}

fn vm(sock: &Path) -> Vm {
    let v = Vm::connect(
        sock,
        VmOptions {
            backend_channel: true,
            ..Default::default()
        },
    );
    v.backend_channel
        .as_ref()
        .unwrap()
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    v
}

/// Raw image: B opens it inactive while A writes (no lock conflict); B's
/// activation fails while A holds the image and harms nothing; A writes,
/// resizes and inactivates; B activates, its guest sees A's last writes
/// and the new capacity (with a config change), and B writes.
#[test]
fn raw_handoff_between_two_daemons() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(16 * MIB)
        .unwrap();
    let i = img.display();
    let (_a, mut qa, sa) = daemon(
        dir.path(),
        "a",
        &[
            format!("driver=file,node-name=fa,filename={i}"),
            "driver=raw,node-name=a,file=fa".into(),
        ],
        "vhost-user-blk,id=ea,node-name=a,writable=on,allow-inactive=on",
    );
    let mut va = vm(&sa);
    let p1 = pattern(1, 8192);
    assert_eq!(va.write(0, 0, &p1), S_OK);

    // B opens the image A writes: inactive, it takes no write lock.
    let (_b, mut qb, sb) = daemon(
        dir.path(),
        "b",
        &[
            format!("driver=file,node-name=fb,filename={i},active=off"),
            "driver=raw,node-name=b,file=fb,active=off".into(),
        ],
        "vhost-user-blk,id=eb,node-name=b,writable=on,allow-inactive=on",
    );
    assert_eq!(node_info(&mut qb, "b")["active"], false);
    assert_eq!(node_info(&mut qb, "fb")["active"], false);
    assert_eq!(node_info(&mut qa, "a")["active"], true);
    let mut vb = vm(&sb);
    // Reads work on the inactive node; writes fail with an I/O error.
    let (st, data) = vb.read(0, 0, 8192);
    assert_eq!((st, &data[..]), (S_OK, &p1[..]));
    assert_eq!(vb.write(0, 64, &[9u8; 4096]), S_IOERR);

    // B cannot take over while A holds the image: QEMU's lock error, and
    // nothing changed on either side.
    let e = err(&qb.execute("blockdev-set-active", json!({"active": true})));
    assert!(
        e.contains("Failed to get \"write\" lock") && e.contains("another process"),
        "{e}"
    );
    assert_eq!(node_info(&mut qb, "b")["active"], false);
    assert_eq!(node_info(&mut qb, "fb")["active"], false);
    assert_eq!(vb.write(0, 64, &[9u8; 4096]), S_IOERR);
    let p2 = pattern(2, 8192);
    assert_eq!(va.write(0, 0, &p2), S_OK);
    assert_eq!(read_file_at(&img, 64 * 512, 4096), vec![0u8; 4096]);

    // A node under an active parent stays active (QEMU's words).
    let e = err(&qa.execute(
        "blockdev-set-active",
        json!({"node-name": "fa", "active": false}),
    ));
    assert_eq!(e, "Node has active parent node");
    assert_eq!(node_info(&mut qa, "fa")["active"], true);

    // A resizes, then hands over.
    ok(&qa.execute("block_resize", json!({"node-name": "a", "size": 32 * MIB})));
    ok(&qa.execute("blockdev-set-active", json!({"active": false})));
    assert_eq!(node_info(&mut qa, "a")["active"], false);
    assert_eq!(node_info(&mut qa, "fa")["active"], false);
    assert_eq!(va.write(0, 0, &[3u8; 512]), S_IOERR);
    let e = err(&qa.execute("block_resize", json!({"node-name": "a", "size": 48 * MIB})));
    assert!(e.contains("'a'") && e.contains("inactive"), "{e}");

    ok(&qb.execute(
        "blockdev-set-active",
        json!({"node-name": "b", "active": true}),
    ));
    assert_eq!(node_info(&mut qb, "b")["active"], true);
    assert_eq!(node_info(&mut qb, "fb")["active"], true);
    // The capacity A gave the disk, with a config change for B's guest.
    let mut msg = [0u8; 12];
    std::io::Read::read_exact(vb.backend_channel.as_mut().unwrap(), &mut msg)
        .expect("CONFIG_CHANGE_MSG after the activation");
    assert_eq!(u32::from_le_bytes(msg[0..4].try_into().unwrap()), 2);
    assert_eq!(vb.capacity_sectors(), 32 * MIB / 512);
    let (st, data) = vb.read(0, 0, 8192);
    assert_eq!((st, &data[..]), (S_OK, &p2[..]));
    let p3 = pattern(3, 4096);
    assert_eq!(vb.write(0, 64, &p3), S_OK);
    assert_eq!(vb.flush(0), S_OK);
    assert_eq!(read_file_at(&img, 64 * 512, 4096), p3);
    // Now A cannot take it back.
    let e = err(&qa.execute("blockdev-set-active", json!({"active": true})));
    assert!(e.contains("Failed to get \"write\" lock"), "{e}");
}

/// qcow2: A allocates clusters and adds a persistent bitmap while B has
/// the image open inactive; A inactivates; B activates and sees A's L1/L2
/// tables, refcounts and bitmap (not what it read when it opened), and its
/// own allocations do not land on A's clusters: qemu-img check is clean.
#[test]
fn qcow2_handoff_rereads_tables_and_bitmaps() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    let i = img.display().to_string();
    sh(&["qemu-img", "create", "-q", "-f", "qcow2", &i, "16M"]);
    let (mut a, mut qa, sa) = daemon(
        dir.path(),
        "a",
        &[format!(
            "driver=qcow2,node-name=a,file.driver=file,file.filename={i},lazy-refcounts=on"
        )],
        "vhost-user-blk,id=ea,node-name=a,writable=on,allow-inactive=on",
    );
    // Lazy refcounts: A keeps the dirty bit set while it writes.
    let dirty = || read_file_at(&img, 72, 8)[7] & 1 == 1;
    assert!(dirty(), "A set the dirty bit");
    // B opens it before A writes anything: its first view is empty.
    let (_b, mut qb, sb) = daemon(
        dir.path(),
        "b",
        &[format!(
            "driver=qcow2,node-name=b,file.driver=file,file.filename={i},active=off"
        )],
        "vhost-user-blk,id=eb,node-name=b,writable=on,allow-inactive=on",
    );
    // The inline file child inherits the inactive state.
    assert_eq!(node_info(&mut qb, "b")["active"], false);
    assert_eq!(node_info(&mut qb, "b-file")["active"], false);
    let mut va = vm(&sa);
    let mut vb = vm(&sb);
    ok(&qa.execute(
        "block-dirty-bitmap-add",
        json!({"node": "a", "name": "bm0", "persistent": true}),
    ));
    // Clusters in different L2 tables' reach and the last cluster.
    let writes: Vec<(u64, Vec<u8>)> = [0u64, 3 * MIB, 9 * MIB, 16 * MIB - 65536]
        .iter()
        .enumerate()
        .map(|(k, off)| (off / 512, pattern(10 + k as u64, 65536)))
        .collect();
    for (sector, data) in &writes {
        assert_eq!(va.write(0, *sector, data), S_OK);
    }
    ok(&qa.execute(
        "blockdev-set-active",
        json!({"node-name": "a", "active": false}),
    ));
    assert_eq!(node_info(&mut qa, "a")["active"], false);
    // Written back: the image is consistent with A inactive (the dirty
    // bit cleared), its bitmap stored and no longer in use.
    assert!(!dirty(), "A cleared the dirty bit as it inactivated");
    let check = sh(&["qemu-img", "check", "-U", &i]);
    assert!(check.contains("No errors were found"), "{check}");
    let info = sh(&["qemu-img", "info", "-U", &i]);
    assert!(info.contains("bm0") && !info.contains("in-use"), "{info}");

    ok(&qb.execute(
        "blockdev-set-active",
        json!({"node-name": "b", "active": true}),
    ));
    for (sector, data) in &writes {
        let (st, got) = vb.read(0, *sector, 65536);
        assert_eq!(st, S_OK);
        assert!(got == *data, "B reads A's data at sector {sector}");
    }
    let nb = node_info(&mut qb, "b");
    assert_eq!(nb["active"], true);
    let bitmaps = nb["dirty-bitmaps"].as_array().cloned().unwrap_or_default();
    let bm = bitmaps
        .iter()
        .find(|b| b["name"] == "bm0")
        .unwrap_or_else(|| panic!("bitmap bm0 not on B: {nb}"));
    assert_eq!(bm["count"], 4 * 65536, "{bm}");
    // B allocates clusters of its own: A's stay as they are.
    let mine = pattern(99, 65536);
    for off in [MIB, 5 * MIB, 12 * MIB] {
        assert_eq!(vb.write(0, off / 512, &mine), S_OK);
    }
    for (sector, data) in &writes {
        let (_, got) = vb.read(0, *sector, 65536);
        assert!(
            got == *data,
            "A's data at sector {sector} survives B's writes"
        );
    }
    // B's writes are in its copy of the bitmap too.
    let nb = node_info(&mut qb, "b");
    let bm = nb["dirty-bitmaps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == "bm0")
        .unwrap()
        .clone();
    assert_eq!(bm["count"], 7 * 65536, "{bm}");
    ok(&qb.execute("blockdev-set-active", json!({"active": false})));
    let check = sh(&["qemu-img", "check", "-U", &i]);
    assert!(check.contains("No errors were found"), "{check}");
    // Everyone's data, as qemu-io reads it.
    for (sector, data) in &writes {
        let at = sector * 512;
        let mut b = String::new();
        b.push_str(&format!("read -P {} {at} 1", data[0]));
        sh(&["qemu-io", "-r", "-U", "-f", "qcow2", "-c", &b, &i]);
    }
    sh(&[
        "qemu-io",
        "-r",
        "-U",
        "-f",
        "qcow2",
        "-c",
        &format!("read -P {} {} 1", mine[0], 5 * MIB),
        &i,
    ]);
    // And back to A (a migration that failed late): A reads B's clusters
    // and bitmap bits, and allocates more without touching them.
    ok(&qa.execute(
        "blockdev-set-active",
        json!({"node-name": "a", "active": true}),
    ));
    let (st, got) = va.read(0, 5 * MIB / 512, 65536);
    assert_eq!(st, S_OK);
    assert!(got == mine, "A reads what B wrote");
    let more = pattern(77, 65536);
    assert_eq!(va.write(0, 7 * MIB / 512, &more), S_OK);
    let na = node_info(&mut qa, "a");
    let bm = na["dirty-bitmaps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == "bm0")
        .unwrap()
        .clone();
    assert_eq!(bm["count"], 8 * 65536, "{bm}");
    for (sector, data) in &writes {
        let (_, got) = va.read(0, *sector, 65536);
        assert!(got == *data, "A's first data at sector {sector}");
    }
    ok(&qa.execute("blockdev-set-active", json!({"active": false})));
    let check = sh(&["qemu-img", "check", "-U", &i]);
    assert!(check.contains("No errors were found"), "{check}");
    // An inactive daemon exits cleanly and writes nothing as it does.
    let image = std::fs::read(&img).unwrap();
    drop(va);
    assert!(a.terminate().success(), "{}", a.log());
    assert!(std::fs::read(&img).unwrap() == image, "written at exit");
}

/// An inactive node refuses writes from QMP with its name; an export
/// without allow-inactive activates its node (as QEMU's blk_exp_add) and
/// fails with the lock error while another process holds the image; a
/// writable export without allow-inactive keeps its node from being
/// inactivated.
#[test]
fn exports_and_qmp_on_inactive_nodes() {
    const QSD: &str = "/usr/bin/qemu-storage-daemon";
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    let i = img.display().to_string();
    sh(&["qemu-img", "create", "-q", "-f", "qcow2", &i, "16M"]);
    let (_a, mut qa, _sa) = daemon(
        dir.path(),
        "a",
        &[format!(
            "driver=qcow2,node-name=a,file.driver=file,file.filename={i},active=off"
        )],
        "vhost-user-blk,id=ea,node-name=a,writable=on,allow-inactive=on",
    );
    let e = err(&qa.execute("block_resize", json!({"node-name": "a", "size": 32 * MIB})));
    assert!(e.contains("'a'") && e.contains("inactive"), "{e}");
    // qemu-storage-daemon 7.2 opens the image for writing: our inactive
    // node does not stand in its way.
    // Nothing is skipped (scripts/test.sh): scripts/guest/install-deps.sh
    // installs it.
    assert!(Path::new(QSD).exists(), "{QSD} is missing");
    let qdir = tempfile::tempdir_in(dir.path()).unwrap();
    let qsd = Daemon::start_bin(
        QSD,
        qdir,
        &[
            "--blockdev",
            &format!("driver=file,node-name=f0,filename={i}"),
            "--blockdev",
            "driver=qcow2,node-name=q0,file=f0",
            "--export",
            "type=vhost-user-blk,id=x0,node-name=q0,writable=on,addr.type=unix,addr.path={sock}",
        ],
        &[],
    );
    let mut vq = Vm::connect(&qsd.socket, VmOptions::default());
    assert_eq!(vq.write(0, 0, &pattern(5, 4096)), S_OK);
    // Activation fails while it holds the image.
    let e = err(&qa.execute(
        "blockdev-set-active",
        json!({"node-name": "a", "active": true}),
    ));
    assert!(e.contains("Failed to get \"write\" lock"), "{e}");
    assert_eq!(node_info(&mut qa, "a")["active"], false);
    // An export without allow-inactive activates its node: refused too.
    let e = err(&qa.execute(
        "block-export-add",
        json!({"type": "vhost-user-blk", "id": "e2", "node-name": "a",
               "addr": {"type": "unix", "path": dir.path().join("e2.sock")}}),
    ));
    assert!(e.contains("Failed to get \"write\" lock"), "{e}");
    drop(vq);
    // SIGTERM: qemu-storage-daemon writes its qcow2 caches as it exits.
    let mut qsd = qsd;
    assert!(qsd.terminate().success());
    // qsd gone: the export activates the node and serves it.
    ok(&qa.execute(
        "block-export-add",
        json!({"type": "vhost-user-blk", "id": "e2", "node-name": "a", "writable": true,
               "addr": {"type": "unix", "path": dir.path().join("e2.sock")}}),
    ));
    assert_eq!(node_info(&mut qa, "a")["active"], true);
    let mut v2 = Vm::connect(&dir.path().join("e2.sock"), VmOptions::default());
    let (st, data) = v2.read(0, 0, 4096);
    assert_eq!(st, S_OK);
    assert!(
        data == pattern(5, 4096),
        "e2 reads what qemu-storage-daemon wrote"
    );
    // e2 writes and was not allowed to go inactive: refused.
    let e = err(&qa.execute(
        "blockdev-set-active",
        json!({"node-name": "a", "active": false}),
    ));
    assert!(
        e.contains("Failed to inactivate node: Operation not permitted") && e.contains("'e2'"),
        "{e}"
    );
    assert_eq!(node_info(&mut qa, "a")["active"], true);
    assert_eq!(v2.write(0, 8, &[1u8; 512]), S_OK);
}

/// What changes an inactive qcow2 image from QMP is refused with the
/// node's name: internal snapshots, persistent bitmaps, the backing file
/// name, a job's target, the size; the image stays as it was.
#[test]
fn qmp_metadata_writes_on_an_inactive_node_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    let i = img.display().to_string();
    let base = dir.path().join("base.qcow2");
    let b = base.display().to_string();
    sh(&["qemu-img", "create", "-q", "-f", "qcow2", &b, "16M"]);
    sh(&[
        "qemu-img", "create", "-q", "-f", "qcow2", "-b", &b, "-F", "qcow2", &i,
    ]);
    let before = (std::fs::read(&img).unwrap(), std::fs::read(&base).unwrap());
    let (_a, mut qa, _sa) = daemon(
        dir.path(),
        "a",
        &[
            format!("driver=qcow2,node-name=a,file.driver=file,file.filename={i},active=off"),
            "driver=null-co,node-name=src,size=16M".into(),
        ],
        "vhost-user-blk,id=ea,node-name=a,writable=on,allow-inactive=on",
    );
    let refused = [
        (
            "blockdev-snapshot-internal-sync",
            json!({"device": "a", "name": "s1"}),
        ),
        (
            "block-dirty-bitmap-add",
            json!({"node": "a", "name": "b1", "persistent": true}),
        ),
        (
            "change-backing-file",
            json!({"device": "a", "image-node-name": "a", "backing-file": "/x"}),
        ),
        (
            "blockdev-mirror",
            json!({"job-id": "m", "device": "src", "target": "a", "sync": "full"}),
        ),
        (
            "blockdev-backup",
            json!({"job-id": "k", "device": "src", "target": "a", "sync": "full"}),
        ),
        ("block_resize", json!({"node-name": "a", "size": 32 * MIB})),
        ("block-stream", json!({"job-id": "s", "device": "a"})),
    ];
    for (cmd, args) in refused {
        let e = err(&qa.execute(cmd, args));
        assert!(e.contains("'a'") && e.contains("inactive"), "{cmd}: {e}");
    }
    // The backing file opened from the header is inactive too: commit
    // into it is refused.
    assert_eq!(node_info(&mut qa, "a-backing")["active"], false);
    let e = err(&qa.execute("block-commit", json!({"job-id": "c", "device": "a"})));
    assert!(e.contains("'a-backing'") && e.contains("inactive"), "{e}");
    let after = (std::fs::read(&img).unwrap(), std::fs::read(&base).unwrap());
    assert!(after == before, "the images changed");
}

/// A block job on a node keeps it from being inactivated, as QEMU refuses
/// while a job's BlockBackend needs write access; once the job is gone,
/// the node goes inactive.
#[test]
fn a_block_job_keeps_its_nodes_active() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(16 * MIB)
        .unwrap();
    let (_a, mut qa, _sa) = daemon(
        dir.path(),
        "a",
        &[
            format!("driver=file,node-name=fa,filename={}", img.display()),
            "driver=raw,node-name=a,file=fa".into(),
            "driver=null-co,node-name=t,size=16M".into(),
        ],
        "vhost-user-blk,id=ea,node-name=a,writable=on,allow-inactive=on",
    );
    ok(&qa.execute(
        "blockdev-mirror",
        json!({"job-id": "m0", "device": "a", "target": "t", "sync": "full"}),
    ));
    qa.wait_event("BLOCK_JOB_READY", Duration::from_secs(30));
    for args in [
        json!({"active": false}),
        json!({"node-name": "a", "active": false}),
    ] {
        let e = err(&qa.execute("blockdev-set-active", args));
        assert!(
            e.starts_with("Failed to inactivate node: Operation not permitted")
                && e.contains("block job"),
            "{e}"
        );
        assert_eq!(node_info(&mut qa, "a")["active"], true);
        assert_eq!(node_info(&mut qa, "t")["active"], true);
    }
    ok(&qa.execute("block-job-cancel", json!({"device": "m0"})));
    qa.wait_event("BLOCK_JOB_COMPLETED", Duration::from_secs(30));
    // The job lets go of its nodes as it ends, not always by the time the
    // event is sent: the command is retried until the job has left.
    let mut last = Value::Null;
    for _ in 0..100 {
        last = qa.execute(
            "blockdev-set-active",
            json!({"node-name": "a", "active": false}),
        );
        if last.get("return").is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    ok(&last);
    assert_eq!(node_info(&mut qa, "a")["active"], false);
}

/// A node used by two nodes goes inactive with the last of them (QEMU's
/// bdrv_has_bds_parent), and with both when every node is inactivated.
#[test]
fn a_shared_child_follows_its_last_active_parent() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(16 * MIB)
        .unwrap();
    let (_a, mut qa, _sa) = daemon(
        dir.path(),
        "a",
        &[
            format!("driver=file,node-name=fa,filename={}", img.display()),
            "driver=raw,node-name=a,file=fa".into(),
            "driver=raw,node-name=a2,file=fa,read-only=on".into(),
        ],
        "vhost-user-blk,id=ea,node-name=a,writable=on,allow-inactive=on",
    );
    let active =
        |q: &mut Qmp| ["a", "a2", "fa"].map(|n| node_info(q, n)["active"].as_bool().unwrap());
    ok(&qa.execute(
        "blockdev-set-active",
        json!({"node-name": "a", "active": false}),
    ));
    assert_eq!(active(&mut qa), [false, true, true], "a2 still uses fa");
    ok(&qa.execute(
        "blockdev-set-active",
        json!({"node-name": "a2", "active": false}),
    ));
    assert_eq!(active(&mut qa), [false, false, false]);
    ok(&qa.execute("blockdev-set-active", json!({"active": true})));
    assert_eq!(active(&mut qa), [true, true, true]);
    // Every node, with one that cannot go (a writable export without
    // allow-inactive on z): refused before any node changed.
    ok(&qa.execute(
        "blockdev-add",
        json!({"driver": "null-co", "node-name": "z", "size": 16 * MIB}),
    ));
    ok(&qa.execute(
        "block-export-add",
        json!({"type": "vhost-user-blk", "id": "ez", "node-name": "z", "writable": true,
               "addr": {"type": "unix", "path": dir.path().join("z.sock")}}),
    ));
    let e = err(&qa.execute("blockdev-set-active", json!({"active": false})));
    assert!(e.contains("export 'ez'"), "{e}");
    assert_eq!(active(&mut qa), [true, true, true], "nothing changed");
    ok(&qa.execute("block-export-del", json!({"id": "ez"})));
    qa.wait_event("BLOCK_EXPORT_DELETED", Duration::from_secs(10));
    ok(&qa.execute("blockdev-set-active", json!({"active": false})));
    assert_eq!(active(&mut qa), [false, false, false], "all of them");
    // An inactive node serves inactive parents only (QEMU's words).
    let e = err(&qa.execute(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "r2", "file": "fa"}),
    ));
    assert!(
        e.contains("Inactive 'fa' can't be a file child of active 'r2'"),
        "{e}"
    );
    ok(&qa.execute(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "r3", "file": "fa", "active": false, "read-only": true}),
    ));
    assert_eq!(node_info(&mut qa, "r3")["active"], false);
    // The write lock is gone: qemu-io may write the image now.
    let i = img.display().to_string();
    sh(&["qemu-io", "-f", "raw", "-c", "write -P 7 0 4k", &i]);
}

/// An activation that fails after the file node took its locks (the other
/// process changed the image's geometry: `qemu-img amend` to 32-bit
/// refcounts) puts the file node back: no write lock is left behind, and
/// the image stays the other process's to use.
#[test]
fn a_failed_activation_leaves_no_lock_behind() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    let i = img.display().to_string();
    sh(&["qemu-img", "create", "-q", "-f", "qcow2", &i, "16M"]);
    let (_a, mut qa, _sa) = daemon(
        dir.path(),
        "a",
        &[format!(
            "driver=qcow2,node-name=a,file.driver=file,file.filename={i},active=off"
        )],
        "vhost-user-blk,id=ea,node-name=a,writable=on,allow-inactive=on",
    );
    sh(&[
        "qemu-img",
        "amend",
        "-f",
        "qcow2",
        "-o",
        "refcount_bits=32",
        &i,
    ]);
    let e = err(&qa.execute("blockdev-set-active", json!({"active": true})));
    assert!(e.contains("geometry changed"), "{e}");
    assert_eq!(node_info(&mut qa, "a")["active"], false);
    assert_eq!(node_info(&mut qa, "a-file")["active"], false);
    // No write lock of ours: qemu-io writes the image.
    sh(&["qemu-io", "-f", "qcow2", "-c", "write -P 3 0 64k", &i]);
    let check = sh(&["qemu-img", "check", &i]);
    assert!(check.contains("No errors were found"), "{check}");
}
