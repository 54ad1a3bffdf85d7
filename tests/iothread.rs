//! x-blockdev-set-iothread: an export's queues move to the threads of
//! another iothread object (and to none, and back) while verified I/O
//! runs; the old threads end, the new ones serve; errors as
//! qemu-storage-daemon 7.2 gives them.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const QSD: &str = "/usr/bin/qemu-storage-daemon";
const BLOCK: usize = 4096;
/// Blocks the writer cycles over.
const BLOCKS: u64 = 64;

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

/// The same configuration for both daemons: two iothread objects, a raw
/// node over a file, an export of it on ioA (2 queues), and a null node
/// exported with fixed-iothread.
fn args() -> Vec<String> {
    [
        "--object",
        "iothread,id=ioA",
        "--object",
        "iothread,id=ioB,poll-max-ns=0",
        "--blockdev",
        "driver=file,node-name=f0,filename={dir}/disk.img",
        "--blockdev",
        "driver=raw,node-name=r0,file=f0",
        "--blockdev",
        "driver=null-co,node-name=n1,size=1048576",
        "--export",
        "type=vhost-user-blk,id=e0,node-name=r0,writable=on,num-queues=2,iothread=ioA,addr.type=unix,addr.path={sock}",
        "--export",
        "type=vhost-user-blk,id=e1,node-name=n1,iothread=ioA,fixed-iothread=on,addr.type=unix,addr.path={dir}/e1.sock",
        "--chardev",
        "socket,id=m,path={dir}/qmp.sock,server=on,wait=off",
        "--monitor",
        "chardev=m",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn start(bin: &str) -> (Daemon, Qmp) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::File::create(dir.path().join("disk.img"))
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let a = args();
    let refs: Vec<&str> = a.iter().map(String::as_str).collect();
    let d = Daemon::start_bin(bin, dir, &refs, &[]);
    let q = Qmp::connect(&d.dir.path().join("qmp.sock"));
    (d, q)
}

fn set(q: &mut Qmp, node: &str, iothread: Value, force: Option<bool>) -> Value {
    let mut a = json!({"node-name": node, "iothread": iothread});
    if let Some(f) = force {
        a["force"] = json!(f);
    }
    q.execute("x-blockdev-set-iothread", a)
}

/// The refusals, in the order QEMU checks.
fn error_cases(q: &mut Qmp) -> Vec<String> {
    vec![
        err(&set(q, "nope", json!("ioB"), None)),
        err(&set(q, "r0", json!("ioB"), None)),
        err(&set(q, "r0", json!("ioB"), Some(false))),
        err(&set(q, "r0", json!("nope"), Some(true))),
        err(&set(q, "n1", json!("ioB"), Some(true))),
        err(&q.execute("x-blockdev-set-iothread", json!({"node-name": "n1"}))),
    ]
}

#[test]
fn refusals_are_qemu_storage_daemons() {
    assert!(Path::new(QSD).exists(), "{QSD} is missing");
    let (_qsd, mut qq) = start(QSD);
    let (_d, mut q) = start(daemon_bin());
    let theirs = error_cases(&mut qq);
    let ours = error_cases(&mut q);
    assert_eq!(
        theirs[..5],
        ours[..5],
        "the refusals differ from qemu-storage-daemon 7.2's"
    );
    assert_eq!(
        theirs[0], "Failed to find node with node-name='nope'",
        "{theirs:?}"
    );
    // A missing parameter: both refuse (the wording is the monitor's).
    assert!(ours[5].contains("iothread"), "{ours:?}");
    // Both accept the moves of the live test (no frontend connected):
    // through the raw node's child without force (QEMU moves the whole
    // component, the export with it), to the main context, and back.
    for q in [&mut qq, &mut q] {
        ok(&set(q, "f0", json!("ioB"), None));
        ok(&set(q, "r0", Value::Null, Some(true)));
        ok(&set(q, "r0", json!("ioA"), Some(true)));
        ok(&set(q, "f0", json!("ioA"), Some(false)));
    }
}

fn export_info(q: &mut Qmp, id: &str) -> Value {
    let r = q.execute("query-block-exports", json!({}));
    ok(&r)
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["id"] == id)
        .unwrap_or_else(|| panic!("no export {id}: {r}"))
        .clone()
}

/// The ids of export `id`'s worker threads, once every one has started.
fn thread_ids(q: &mut Qmp, id: &str, n: usize) -> Vec<i32> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let e = export_info(q, id);
        let ids: Vec<i32> = e["x-thread-ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap() as i32)
            .collect();
        if ids.len() == n {
            return ids;
        }
        assert!(Instant::now() < deadline, "threads never started: {e}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn comm(pid: i32, tid: i32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm"))
        .ok()
        .map(|s| s.trim_end().to_string())
}

/// The thread's run time so far, in ns (schedstat's first field).
fn runtime_ns(pid: i32, tid: i32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/schedstat"))
        .unwrap_or_else(|e| panic!("thread {tid} of {pid}: {e}"));
    s.split_whitespace().next().unwrap().parse().unwrap()
}

fn wait_gone(pid: i32, tid: i32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{pid}/task/{tid}")).exists() {
        assert!(
            Instant::now() < deadline,
            "old thread {tid} ({:?}) still there",
            comm(pid, tid)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn moves_the_queues_to_new_threads_under_verified_io() {
    let (d, mut q) = start(daemon_bin());
    d.wait_ready();
    let pid = d.pid();
    let vm = Vm::connect(
        &d.socket,
        VmOptions {
            num_queues: 2,
            ..Default::default()
        },
    );
    // The writer: each block written with a new pattern on alternate
    // queues, read back and compared at once.
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let writer = {
        let (stop, done) = (stop.clone(), done.clone());
        std::thread::spawn(move || {
            let mut vm = vm;
            let mut last: BTreeMap<u64, u64> = BTreeMap::new();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let block = n % BLOCKS;
                let queue = (n % 2) as usize;
                let seed = n + 1;
                let data = pattern(seed, BLOCK);
                let sector = block * (BLOCK as u64 / 512);
                assert_eq!(vm.write(queue, sector, &data), S_OK, "write {n}");
                let (st, got) = vm.read(1 - queue, sector, BLOCK as u32);
                assert_eq!(st, S_OK, "read {n}");
                assert!(got == data, "block {block} read back wrong after write {n}");
                last.insert(block, seed);
                n += 1;
                done.store(n, Ordering::Relaxed);
            }
            assert_eq!(vm.flush(0), S_OK);
            (vm, last)
        })
    };
    let progress = |from: u64| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while done.load(Ordering::Relaxed) < from + 100 {
            assert!(!writer.is_finished(), "the writer stopped (a check failed)");
            assert!(Instant::now() < deadline, "I/O stalled at {from}");
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    progress(0);
    // One thread (one iothread named) serves both queues, named as QEMU
    // names the object's thread.
    let mut old = thread_ids(&mut q, "e0", 1);
    assert_eq!(comm(pid, old[0]).as_deref(), Some("IO ioA"));
    assert_eq!(export_info(&mut q, "e0")["x-iothread"], "ioA");
    for (node, target, force, name) in [
        ("f0", json!("ioB"), None, "IO ioB"),
        ("r0", Value::Null, Some(true), "vring_worker"),
        ("r0", json!("ioA"), Some(true), "IO ioA"),
        ("f0", json!("ioB"), Some(false), "IO ioB"),
    ] {
        let before = done.load(Ordering::Relaxed);
        ok(&set(&mut q, node, target.clone(), force));
        assert_eq!(export_info(&mut q, "e0")["x-iothread"], target);
        let new = thread_ids(&mut q, "e0", 1);
        assert_ne!(new, old, "moved to {target}: still the same thread");
        wait_gone(pid, old[0]);
        assert_eq!(comm(pid, new[0]).as_deref(), Some(name));
        // The requests after the move run there: the old thread is gone,
        // the new one runs while they complete.
        let t0 = runtime_ns(pid, new[0]);
        progress(before);
        progress(done.load(Ordering::Relaxed));
        assert!(
            runtime_ns(pid, new[0]) > t0,
            "thread {} did not run while requests completed",
            new[0]
        );
        old = new;
    }
    stop.store(true, Ordering::Relaxed);
    let (vm, last) = writer.join().expect("the writer's checks");
    let total = done.load(Ordering::Relaxed);
    assert!(total >= 800, "{total} requests");
    // Every block holds what was last written to it, on disk too.
    let img = d.dir.path().join("disk.img");
    for (&block, &seed) in &last {
        let got = read_file_at(&img, block * BLOCK as u64, BLOCK);
        assert!(got == pattern(seed, BLOCK), "block {block} on disk");
    }
    // A move without a frontend: the next connection's threads start
    // bound to the new object.
    drop(vm);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !thread_ids(&mut q, "e0", 0).is_empty() {
        assert!(Instant::now() < deadline);
    }
    ok(&set(&mut q, "r0", json!("ioA"), Some(true)));
    let mut vm = Vm::connect(&d.socket, VmOptions::default());
    assert_eq!(vm.write(0, 0, &pattern(7, BLOCK)), S_OK);
    let t = thread_ids(&mut q, "e0", 1);
    assert_eq!(comm(pid, t[0]).as_deref(), Some("IO ioA"));
    // The new threads poll as their object says.
    let log = d.log();
    assert!(
        log.contains("export e0: moved to iothread ioB (poll-max-ns 0)")
            && log.contains("export e0: moved to iothread ioA (poll-max-ns 32768)"),
        "{log}"
    );
    assert!(!log.contains("forbidden system call"));
}

/// A multiqueue export (a list of iothreads, as QEMU 9's) moves whole: each
/// of its threads is replaced by one of the new object's.
#[test]
fn a_multiqueue_export_moves_every_thread() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start_in(
        dir,
        &[
            "--object",
            "iothread,id=ioA",
            "--object",
            "iothread,id=ioB",
            "--blockdev",
            "driver=null-co,node-name=n0,size=1048576",
            "--export",
            "type=vhost-user-blk,id=e0,node-name=n0,writable=on,num-queues=2,iothread.0=ioA,iothread.1=ioB,addr.type=unix,addr.path={sock}",
            "--chardev",
            "socket,id=m,path={dir}/qmp.sock,server=on,wait=off",
            "--monitor",
            "chardev=m",
        ],
    );
    let mut q = Qmp::connect(&d.dir.path().join("qmp.sock"));
    let pid = d.pid();
    let mut vm = Vm::connect(
        &d.socket,
        VmOptions {
            num_queues: 2,
            ..Default::default()
        },
    );
    for queue in 0..2 {
        assert_eq!(vm.write(queue, 0, &pattern(1, BLOCK)), S_OK);
    }
    let old = thread_ids(&mut q, "e0", 2);
    let mut names: Vec<_> = old.iter().map(|&t| comm(pid, t).unwrap()).collect();
    names.sort();
    assert_eq!(names, ["IO ioA", "IO ioB"]);
    assert_eq!(
        export_info(&mut q, "e0")["x-iothread"],
        json!(["ioA", "ioB"])
    );
    ok(&set(&mut q, "n0", json!("ioB"), Some(true)));
    assert_eq!(export_info(&mut q, "e0")["x-iothread"], "ioB");
    for queue in 0..2 {
        assert_eq!(vm.write(queue, 0, &pattern(2, BLOCK)), S_OK);
    }
    let new = thread_ids(&mut q, "e0", 2);
    for t in &old {
        assert!(!new.contains(t));
        wait_gone(pid, *t);
    }
    for t in &new {
        assert_eq!(comm(pid, *t).as_deref(), Some("IO ioB"));
    }
}

/// Moves back to back, while one frontend after another connects, does
/// verified I/O on both queues and goes: every request completes, every
/// move succeeds or says why, and the daemon serves on.
#[test]
fn moves_race_with_connections_and_io() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::File::create(dir.path().join("disk.img"))
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let d = Daemon::start_in(
        dir,
        &[
            "--object",
            "iothread,id=ioA",
            "--object",
            "iothread,id=ioB",
            "--blockdev",
            "driver=file,node-name=f0,filename={dir}/disk.img",
            "--export",
            "type=vhost-user-blk,id=e0,node-name=f0,writable=on,num-queues=2,iothread.0=ioA,iothread.1=ioB,addr.type=unix,addr.path={sock}",
            "--chardev",
            "socket,id=m,path={dir}/qmp.sock,server=on,wait=off",
            "--monitor",
            "chardev=m",
        ],
    );
    let qmp = d.dir.path().join("qmp.sock");
    let stop = Arc::new(AtomicBool::new(false));
    let mover = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut q = Qmp::connect(&qmp);
            let targets = [json!("ioA"), Value::Null, json!("ioB")];
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                ok(&set(&mut q, "f0", targets[n % 3].clone(), Some(true)));
                n += 1;
            }
            n
        })
    };
    let mut requests = 0;
    for round in 0..10u64 {
        // Half the frontends keep an inflight buffer, as QEMU does: a new
        // thread's worker looks at it before its first pop.
        let mut vm = Vm::connect(
            &d.socket,
            VmOptions {
                num_queues: 2,
                inflight: round % 2 == 1,
                ..Default::default()
            },
        );
        for i in 0..20u64 {
            let seed = round * 100 + i + 1;
            let sector = (i % 8) * 8;
            let queue = (i % 2) as usize;
            assert_eq!(vm.write(queue, sector, &pattern(seed, BLOCK)), S_OK);
            let (st, got) = vm.read(1 - queue, sector, BLOCK as u32);
            assert_eq!(st, S_OK);
            assert!(got == pattern(seed, BLOCK), "round {round}, request {i}");
            requests += 2;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let moves = mover.join().expect("every move succeeds");
    assert!(moves >= 10, "{moves} moves");
    eprintln!("{moves} moves, {requests} requests");
    assert!(!d.log().contains("forbidden system call"));
    assert!(!d.log().contains("did not hand over"));
}

/// Requests an I/O limit holds back go on after a move (released by the
/// new thread's timerfd, or the group's fallback timer: a mutation that
/// leaves the new timerfd out of the epoll set still passes, so this shows
/// that throttled I/O survives moves, not which timer fired). 400 writes at
/// 500 per second on 2 queues, moved 4 times.
#[test]
fn throttled_requests_go_on_after_a_move() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::File::create(dir.path().join("disk.img"))
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let d = Daemon::start_in(
        dir,
        &[
            "--object",
            "iothread,id=ioA",
            "--object",
            "iothread,id=ioB",
            "--object",
            "throttle-group,id=tg0,limits.iops-total=500",
            "--blockdev",
            "driver=file,node-name=f0,filename={dir}/disk.img",
            "--blockdev",
            "driver=throttle,node-name=t0,throttle-group=tg0,file=f0",
            "--export",
            "type=vhost-user-blk,id=e0,node-name=t0,writable=on,num-queues=2,iothread=ioA,addr.type=unix,addr.path={sock}",
            "--chardev",
            "socket,id=m,path={dir}/qmp.sock,server=on,wait=off",
            "--monitor",
            "chardev=m",
        ],
    );
    let mut q = Qmp::connect(&d.dir.path().join("qmp.sock"));
    let mut vm = Vm::connect(
        &d.socket,
        VmOptions {
            num_queues: 2,
            ..Default::default()
        },
    );
    let targets = [json!("ioB"), Value::Null, json!("ioA"), json!("ioB")];
    let start = Instant::now();
    for i in 0..400u64 {
        if i % 100 == 50 {
            ok(&set(
                &mut q,
                "f0",
                targets[(i / 100) as usize].clone(),
                None,
            ));
        }
        assert_eq!(
            vm.write((i % 2) as usize, (i % 16) * 8, &pattern(i, BLOCK)),
            S_OK
        );
    }
    // The limit held (some requests waited on a timer) and was kept.
    assert!(
        start.elapsed() > Duration::from_millis(300),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(export_info(&mut q, "e0")["x-iothread"], "ioB");
}
