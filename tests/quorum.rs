//! x-blockdev-change under verified guest I/O: libblkio is the guest (the
//! model-checked random workload of tests/common/client.rs, 8 requests in
//! flight) on a vhost-user export of a quorum node; QMP adds an nbd child
//! (qemu-nbd serving a file), removes it, adds a file child and removes it
//! while the guest runs. Every guest read is checked against the model as
//! it completes; after the daemon stopped, the three children that stayed
//! hold exactly the model.
//!
//! `VUB_QUORUM_DAEMON=qemu-storage-daemon cargo test --test quorum` runs
//! the same test against QEMU's daemon.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::client::*;
use common::*;
use serde_json::{json, Value};

const SIZE: u64 = 8 * MIB;
const DEPTH: usize = 8;
const ROUND_OPS: usize = 150;

fn ok(qmp: &mut Qmp, cmd: &str, args: Value) -> Value {
    let r = qmp.execute(cmd, args.clone());
    assert!(r.get("return").is_some(), "{cmd} {args}: {r}");
    r["return"].clone()
}

fn zero_file(p: &Path) {
    std::fs::File::create(p).unwrap().set_len(SIZE).unwrap();
}

/// Kills qemu-nbd when the test ends, however it ends.
struct Reap(std::process::Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn children_added_and_removed_while_the_guest_verifies_its_io() {
    let bin = std::env::var("VUB_QUORUM_DAEMON").unwrap_or_else(|_| daemon_bin().to_string());
    let dir = tempfile::tempdir().unwrap();
    for n in ["a", "b", "c", "n", "f"] {
        zero_file(&dir.path().join(format!("{n}.img")));
    }
    let nbd_sock = dir.path().join("qemu-nbd.sock");
    let _nbd = Reap(
        Command::new("qemu-nbd")
            .args(["-f", "raw", "-t", "-k"])
            .arg(&nbd_sock)
            .arg(dir.path().join("n.img"))
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu-nbd"),
    );
    let mut args: Vec<String> = vec![
        "--chardev".into(),
        "socket,id=mon0,path={dir}/qmp.sock,server=on,wait=off".into(),
        "--monitor".into(),
        "chardev=mon0".into(),
    ];
    for n in ["a", "b", "c"] {
        args.push("--blockdev".into());
        args.push(format!(
            "driver=file,node-name={n},filename={{dir}}/{n}.img"
        ));
    }
    args.extend([
        "--blockdev".into(),
        "driver=quorum,node-name=q,children.0=a,children.1=b,children.2=c,vote-threshold=2".into(),
        "--export".into(),
        "type=vhost-user-blk,id=e0,node-name=q,addr.type=unix,addr.path={sock},writable=on".into(),
    ]);
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut d = Daemon::start_bin(&bin, dir, &argv, &[]);
    let qmp_sock = d.dir.path().join("qmp.sock");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(&qmp_sock).is_err() || !nbd_sock.exists() {
        assert!(
            Instant::now() < deadline,
            "QMP or qemu-nbd socket never appeared"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut qmp = Qmp::connect(&qmp_sock);
    let mut c = Client::start(
        &d.socket,
        ClientOptions {
            queues: 1,
            buf_len: DEPTH * SLOT,
            ..Default::default()
        },
    );
    let mut model = vec![0u8; SIZE as usize];
    let bufs = c.buf(0);
    let q = &mut c.queues[0];
    let rounds = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let failed = AtomicBool::new(false);
    std::thread::scope(|s| {
        let (rounds, stop, failed, model) = (&rounds, &stop, &failed, &mut model);
        let guest = s.spawn(move || {
            let mut r = 0u64;
            let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                while !stop.load(Ordering::SeqCst) {
                    let w = Workload {
                        seed: 2400 + r,
                        ops: ROUND_OPS,
                        depth: DEPTH,
                        lbs: 512,
                        poll: false,
                        time_cap: Duration::from_secs(60),
                        discard_keeps_data: true,
                    };
                    run_workload(q, bufs, 0, model, &w);
                    r += 1;
                    rounds.store(r as usize, Ordering::SeqCst);
                }
                assert_eq!(flush(q, false), 0, "final flush");
            }));
            if let Err(p) = res {
                failed.store(true, Ordering::SeqCst);
                std::panic::resume_unwind(p);
            }
        });
        // Waits for `n` more whole rounds of the guest.
        let pass = |n: usize| {
            let want = rounds.load(Ordering::SeqCst) + 1 + n;
            let deadline = Instant::now() + Duration::from_secs(120);
            while rounds.load(Ordering::SeqCst) < want {
                assert!(!failed.load(Ordering::SeqCst), "the guest failed");
                assert!(Instant::now() < deadline, "guest rounds stalled");
                std::thread::sleep(Duration::from_millis(2));
            }
        };
        pass(1);
        ok(
            &mut qmp,
            "blockdev-add",
            json!({"driver": "nbd", "node-name": "n",
                   "server": {"type": "unix", "path": nbd_sock.to_str().unwrap()}}),
        );
        ok(
            &mut qmp,
            "x-blockdev-change",
            json!({"parent": "q", "node": "n"}),
        );
        pass(2);
        ok(
            &mut qmp,
            "x-blockdev-change",
            json!({"parent": "q", "child": "children.3"}),
        );
        pass(1);
        ok(
            &mut qmp,
            "blockdev-add",
            json!({"driver": "file", "node-name": "f",
                   "filename": d.dir.path().join("f.img").to_str().unwrap()}),
        );
        ok(
            &mut qmp,
            "x-blockdev-change",
            json!({"parent": "q", "node": "f"}),
        );
        // The index of the removed last child was given back.
        let g = ok(&mut qmp, "x-debug-query-block-graph", json!({}));
        let f_id = g["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["name"] == "f")
            .unwrap()["id"]
            .clone();
        assert!(
            g["edges"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["child"] == f_id && e["name"] == "children.3"),
            "{g}"
        );
        pass(2);
        ok(
            &mut qmp,
            "x-blockdev-change",
            json!({"parent": "q", "child": "children.3"}),
        );
        pass(1);
        stop.store(true, Ordering::SeqCst);
        guest
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p));
    });
    let n_rounds = rounds.load(Ordering::SeqCst);
    ok(&mut qmp, "blockdev-del", json!({"node-name": "n"}));
    ok(&mut qmp, "blockdev-del", json!({"node-name": "f"}));
    drop(c);
    drop(qmp);
    let st = d.terminate();
    assert!(st.success(), "daemon exit: {st:?}\n{}", d.log());
    eprintln!("{n_rounds} guest rounds of {ROUND_OPS} requests");
    for n in ["a", "b", "c"] {
        let got = std::fs::read(d.dir.path().join(format!("{n}.img"))).unwrap();
        assert_bytes_eq(&format!("{n}.img"), 0, &got, &model);
    }
}
