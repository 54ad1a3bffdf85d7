//! The `rbd` driver against a real single-node Ceph cluster
//! (scripts/ceph/cluster.sh: one monitor, one memstore OSD, cephx on),
//! started once for this test binary and stopped when it exits. Every
//! daemon runs under the default sandbox.
//!
//! ```text
//!   cluster (shared) <-- librbd <-- daemon --vhost-user--> Vm (tests/common)
//!                                     ^-- QMP: secret, blockdev-create/add,
//!                                         block-export-add, block_resize, cont
//! ```
//!
//! The failure test stops the OSD (SIGSTOP): it takes the cluster lock
//! for writing, the others for reading.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::sync::{OnceLock, RwLock};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

struct Cluster {
    dir: PathBuf,
    conf: PathBuf,
    key: String,
    osd_pid: i32,
}

static CLUSTER: OnceLock<Cluster> = OnceLock::new();
static OSD: RwLock<()> = RwLock::new(());

extern "C" fn stop_cluster() {
    if let Some(c) = CLUSTER.get() {
        let _ = Command::new("bash")
            .arg(repo().join("scripts/ceph/cluster.sh"))
            .arg("stop")
            .arg(&c.dir)
            .status();
        let _ = std::fs::remove_dir_all(&c.dir);
    }
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn cluster() -> &'static Cluster {
    CLUSTER.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("vub-ceph-")
            .tempdir()
            .expect("temp dir")
            .keep();
        let t0 = Instant::now();
        let out = Command::new("bash")
            .arg(repo().join("scripts/ceph/cluster.sh"))
            .arg("start")
            .arg(&dir)
            .output()
            .expect("run cluster.sh");
        // SAFETY: registers a plain extern "C" function to run at exit.
        unsafe { libc::atexit(stop_cluster) };
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "cluster.sh start failed (bash scripts/guest/install-deps.sh installs Ceph): {}{text}",
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("ceph cluster up in {:?}", t0.elapsed());
        let var = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("export {name}=")))
                .unwrap_or_else(|| panic!("{name} missing from {text}"))
                .to_string()
        };
        // The daemons' librados: short OSD timeouts for the failure test.
        let conf = dir.join("client.conf");
        let mut c = std::fs::read_to_string(var("CEPH_CONF")).unwrap();
        c.push_str("\n[client]\nrados osd op timeout = 3\n");
        std::fs::write(&conf, c).unwrap();
        Cluster {
            dir,
            conf,
            key: var("CEPH_ADMIN_KEY"),
            osd_pid: var("CEPH_OSD_PID").parse().unwrap(),
        }
    })
}

/// `rbd` CLI on the shared cluster.
fn rbd(args: &[&str]) -> String {
    let c = cluster();
    let out = Command::new("timeout")
        .arg("30")
        .arg("rbd")
        .arg("-c")
        .arg(c.dir.join("ceph.conf"))
        .args(args)
        .output()
        .expect("rbd");
    assert!(
        out.status.success(),
        "rbd {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn unique(name: &str) -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    format!(
        "{name}-{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

/// A daemon with QMP on {sock}, the cluster's key as secret `sec0`
/// (from a file, base64), allowed to read the cluster's directory.
fn daemon(env: &[(&str, &str)]) -> (Daemon, Qmp) {
    let c = cluster();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("key"), &c.key).unwrap();
    let d = Daemon::start_env(
        dir,
        &[
            "--chardev",
            "socket,id=mon0,path={sock},server=on,wait=off",
            "--monitor",
            "chardev=mon0",
            "--object",
            "secret,id=sec0,file={dir}/key,format=base64",
            "--allow-path",
            "{dir}",
            "--allow-path",
            c.dir.to_str().unwrap(),
        ],
        env,
    );
    let q = Qmp::connect(&d.socket);
    (d, q)
}

fn rbd_node(name: &str, image: &str) -> Value {
    json!({
        "driver": "rbd", "node-name": name, "pool": "rbd", "image": image,
        "conf": cluster().conf, "user": "admin", "key-secret": "sec0",
        "discard": "unmap", "cache": {"direct": true},
    })
}

fn ok(r: &Value) {
    assert!(r.get("return").is_some(), "{r}");
}

fn err(r: &Value) -> String {
    r["error"]["desc"]
        .as_str()
        .unwrap_or_else(|| panic!("expected an error: {r}"))
        .to_string()
}

fn export(q: &mut Qmp, d: &Daemon, node: &str, extra: Value) -> PathBuf {
    let sock = d.dir.path().join(format!("{node}.sock"));
    let mut args = json!({
        "type": "vhost-user-blk", "id": format!("e-{node}"), "node-name": node,
        "writable": true, "addr": {"type": "unix", "path": sock},
    });
    args.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    ok(&q.execute("block-export-add", args));
    sock
}

/// block-export-del once the daemon has seen the frontend go (the
/// disconnect reaches it a moment after the test drops its end).
fn del_export(q: &mut Qmp, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = q.execute("block-export-del", json!({ "id": id }));
        if r.get("return").is_some() {
            return;
        }
        assert!(
            err(&r).contains("has a connected frontend") && Instant::now() < deadline,
            "{r}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_job(q: &mut Qmp, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ev = q.wait_event("JOB_STATUS_CHANGE", Duration::from_secs(60));
        if ev["data"]["id"] == id && ev["data"]["status"] == "concluded" {
            break;
        }
        assert!(Instant::now() < deadline);
    }
    let jobs = q.execute("query-jobs", json!({}));
    let job = jobs["return"]
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["id"] == id)
        .cloned()
        .unwrap();
    assert!(job.get("error").is_none(), "job {id} failed: {job}");
    ok(&q.execute("job-dismiss", json!({"id": id})));
}

/// Every thread of the daemon, librados's own (messenger, timers,
/// finisher) included, runs under a seccomp filter with no_new_privs and
/// no capabilities; and librados did start threads of its own.
fn all_threads_confined(pid: i32) {
    let mut names = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let t = t.unwrap().path();
        let Ok(status) = std::fs::read_to_string(t.join("status")) else {
            continue;
        };
        let comm = std::fs::read_to_string(t.join("comm")).unwrap_or_default();
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{k}:")))
                .unwrap_or("?")
                .trim()
                .to_string()
        };
        assert_eq!(
            (field("Seccomp"), field("NoNewPrivs"), field("CapEff")),
            ("2".into(), "1".into(), "0000000000000000".into()),
            "thread {}",
            comm.trim()
        );
        names.push(comm.trim().to_string());
    }
    assert!(
        names.iter().any(|n| n.starts_with("msgr-worker")),
        "no librados messenger thread among {names:?}"
    );
}

#[test]
fn blockdev_create_then_io_resize_through_a_vhost_user_export() {
    let _g = OSD.read().unwrap_or_else(|e| e.into_inner());
    let (d, mut q) = daemon(&[]);
    let image = unique("io");
    let mut location = rbd_node("x", &image);
    let l = location.as_object_mut().unwrap();
    for k in ["driver", "node-name", "discard", "cache"] {
        l.remove(k);
    }
    ok(&q.execute(
        "blockdev-create",
        json!({"job-id": "c0", "options": {"driver": "rbd", "location": location, "size": 16 << 20}}),
    ));
    wait_job(&mut q, "c0");
    assert!(rbd(&["info", &format!("rbd/{image}")]).contains("size 16 MiB"));

    ok(&q.execute("blockdev-add", rbd_node("r0", &image)));
    let sock = export(&mut q, &d, "r0", json!({}));
    let mut vm = Vm::connect(&sock, VmOptions::default());
    assert_eq!(vm.capacity_sectors(), (16 << 20) / 512);
    all_threads_confined(d.pid());

    // Writes and reads across object boundaries (4 MiB objects).
    let data = pattern(1, 256 << 10);
    let at = ((4 << 20) - (100 << 10)) / 512;
    assert_eq!(vm.write(0, at, &data), S_OK);
    assert_eq!(vm.flush(0), S_OK);
    let (st, back) = vm.read(0, at, data.len() as u32);
    assert_eq!(st, S_OK);
    assert!(back == data, "read back differs");
    // The cluster has it (another client reads it).
    let out = cluster().dir.join(format!("{image}.export"));
    rbd(&["export", &format!("rbd/{image}"), out.to_str().unwrap()]);
    assert!(read_file_at(&out, at * 512, data.len()) == data);
    let _ = std::fs::remove_file(&out);

    // Write zeroes reads back as zeroes, across an object boundary;
    // a discard succeeds (librbd skips partial-object discards: what
    // they read as is not promised) and a whole-object one reads zeroes.
    let obj = (4 << 20) / 512;
    assert_eq!(vm.ranges(0, T_WRITE_ZEROES, &[(obj - 64, 128, 0)]), S_OK);
    let (st, back) = vm.read(0, obj - 64, 128 * 512);
    assert_eq!(st, S_OK);
    assert!(back.iter().all(|&b| b == 0), "write-zeroed range not zero");
    let (_, back) = vm.read(0, obj + 64, 512);
    let o = ((obj + 64 - at) * 512) as usize;
    assert!(back[..] == data[o..o + 512], "beyond the zeroed range");
    assert_eq!(vm.ranges(0, T_DISCARD, &[(at, 64, 0)]), S_OK);
    assert_eq!(vm.write(0, 2 * obj, &pattern(4, 4096)), S_OK);
    assert_eq!(vm.ranges(0, T_DISCARD, &[(2 * obj, obj as u32, 0)]), S_OK);
    let (_, back) = vm.read(0, 2 * obj, 4096);
    assert!(back.iter().all(|&b| b == 0), "discarded object not zero");

    // block_resize reaches the image.
    ok(&q.execute("block_resize", json!({"node-name": "r0", "size": 32 << 20})));
    assert!(rbd(&["info", &format!("rbd/{image}")]).contains("size 32 MiB"));
    assert_eq!(vm.capacity_sectors(), (32 << 20) / 512);
    let (st, _) = vm.read(0, (32 << 20) / 512 - 8, 4096);
    assert_eq!(st, S_OK);
    drop(vm);
    del_export(&mut q, "e-r0");
    let mut d = d;
    assert!(d.terminate().success(), "{}", d.log());
    // The daemon closed the image as it exited: no watcher is left behind
    // (rm refuses an image with watchers for 30 s after a client dies).
    rbd(&["rm", "--no-progress", &format!("rbd/{image}")]);
}

/// A mirror of a sparse rbd image copies only its allocated objects: the
/// target (a sparse file) ends with about 2 objects allocated, not 64 MiB.
/// Without block status every byte is data and the target is full.
#[test]
fn block_status_lets_mirror_skip_holes() {
    let _g = OSD.read().unwrap_or_else(|e| e.into_inner());
    let image = unique("sparse");
    rbd(&["create", "--size", "64M", &format!("rbd/{image}")]);
    let (d, mut q) = daemon(&[]);
    ok(&q.execute("blockdev-add", rbd_node("r0", &image)));
    let sock = export(&mut q, &d, "r0", json!({}));
    let mut vm = Vm::connect(&sock, VmOptions::default());
    assert_eq!(vm.write(0, 0, &pattern(2, 64 << 10)), S_OK);
    assert_eq!(vm.write(0, (40 << 20) / 512, &pattern(3, 64 << 10)), S_OK);
    assert_eq!(vm.flush(0), S_OK);
    drop(vm);
    let target = d.dir.path().join("t.raw");
    std::fs::File::create(&target)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    ok(&q.execute(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "t0", "discard": "unmap",
               "file": {"driver": "file", "filename": target, "discard": "unmap"}}),
    ));
    ok(&q.execute(
        "blockdev-mirror",
        json!({"job-id": "m0", "device": "r0", "target": "t0", "sync": "full"}),
    ));
    let t0 = Instant::now();
    q.wait_event("BLOCK_JOB_READY", Duration::from_secs(60));
    eprintln!("mirror ready in {:?}", t0.elapsed());
    ok(&q.execute("job-complete", json!({"id": "m0"})));
    q.wait_event("BLOCK_JOB_COMPLETED", Duration::from_secs(60));
    use std::os::unix::fs::MetadataExt;
    let allocated = std::fs::metadata(&target).unwrap().blocks() * 512;
    assert!(
        allocated <= 16 << 20,
        "target has {allocated} bytes allocated: holes were copied"
    );
    assert!(read_file_at(&target, 0, 64 << 10) == pattern(2, 64 << 10));
    assert!(read_file_at(&target, 40 << 20, 64 << 10) == pattern(3, 64 << 10));
    let mut d = d;
    assert!(d.terminate().success(), "{}", d.log());
}

#[test]
fn options_are_checked_and_the_key_is_never_shown() {
    let _g = OSD.read().unwrap_or_else(|e| e.into_inner());
    let image = unique("opts");
    rbd(&["create", "--size", "4M", &format!("rbd/{image}")]);
    let (d, mut q) = daemon(&[]);
    let key = cluster().key.clone();
    let mut cases: Vec<(Value, &str)> = Vec::new();
    let with = |k: &str, v: Value| {
        let mut n = rbd_node("bad", &image);
        n[k] = v;
        n
    };
    let without = |k: &str| {
        let mut n = rbd_node("bad", &image);
        n.as_object_mut().unwrap().remove(k);
        n
    };
    cases.push((without("pool"), "pool"));
    cases.push((without("image"), "image"));
    cases.push((
        with("encrypt", json!({"format": "luks", "key-secret": "sec0"})),
        "not supported",
    ));
    cases.push((with("snapshot", json!("s1")), "rbd snapshots are read-only"));
    cases.push((
        with("key-secret", json!("nope")),
        "No secret with id 'nope'",
    ));
    cases.push((
        with("auth-client-required", json!(["kerberos"])),
        "kerberos",
    ));
    cases.push((with("pool", json!("nopool")), "error opening pool nopool"));
    cases.push((
        with("image", json!("noimage")),
        "error reading header from noimage",
    ));
    cases.push((with("server", json!([{"host": "127.0.0.1"}])), "port"));
    cases.push((with("bogus", json!(1)), "bogus"));
    for (opts, want) in &cases {
        let e = err(&q.execute("blockdev-add", opts.clone()));
        assert!(e.contains(want), "{opts}: {e}");
        assert!(!e.contains(&key));
    }
    // A wrong key is refused by the cluster (cephx on).
    ok(&q.execute(
        "object-add",
        json!({"qom-type": "secret", "id": "wrong", "data": "AQBt0RZrAAAAABAAqVzqqgDMBbwmLdmy5ooP0g==", "format": "base64"}),
    ));
    let e = err(&q.execute("blockdev-add", with("key-secret", json!("wrong"))));
    assert!(e.contains("error connecting"), "{e}");
    // The right key inline, with explicit monitors and auth.
    ok(&q.execute(
        "object-add",
        json!({"qom-type": "secret", "id": "inline", "data": key, "format": "base64"}),
    ));
    let mut n = rbd_node("r1", &image);
    n["key-secret"] = json!("inline");
    n["server"] = json!([{"host": "127.0.0.1", "port": "3300"}]);
    n["auth-client-required"] = json!(["cephx"]);
    ok(&q.execute("blockdev-add", n));
    let e = err(&q.execute(
        "object-add",
        json!({"qom-type": "secret", "id": "inline", "data": "x"}),
    ));
    assert!(e.contains("duplicate"), "{e}");
    let e = err(&q.execute(
        "object-add",
        json!({"qom-type": "secret", "id": "b", "data": "not base64!", "format": "base64"}),
    ));
    assert!(e.contains("base64"), "{e}");
    // Nothing the daemon shows has the key: query results, the log.
    for cmd in [
        "query-named-block-nodes",
        "x-debug-query-block-graph",
        "query-block-exports",
        "query-jobs",
    ] {
        let r = q.execute(cmd, json!({}));
        assert!(!r.to_string().contains(&key), "{cmd} shows the key: {r}");
    }
    ok(&q.execute("blockdev-del", json!({"node-name": "r1"})));
    ok(&q.execute("object-del", json!({"id": "inline"})));
    let mut d = d;
    assert!(d.terminate().success(), "{}", d.log());
    let log = d.log();
    assert!(log.contains("rbd: opened"), "{log}");
    assert!(!log.contains(&key), "the log shows the key:\n{log}");
}

#[test]
fn a_missing_library_is_a_clear_error() {
    let _g = OSD.read().unwrap_or_else(|e| e.into_inner());
    let (_d, mut q) = daemon(&[
        ("VHOST_USER_BLKD_LIBRADOS", "/nonexistent/librados.so.2"),
        ("VHOST_USER_BLKD_LIBRBD", "/nonexistent/librbd.so.1"),
    ]);
    let e = err(&q.execute("blockdev-add", rbd_node("r0", "any")));
    assert!(
        e.contains(
            "the rbd driver needs /nonexistent/librados.so.2 (Debian: apt-get install librbd1)"
        ),
        "{e}"
    );
}

fn signal(pid: i32, sig: i32) {
    // SAFETY: kill takes a pid and a signal number.
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
}

/// The OSD stops (SIGSTOP) while the guest writes: librbd's requests time
/// out (rados_osd_op_timeout 3 s), the export's `stop` policy parks them
/// and emits BLOCK_IO_ERROR; once the OSD is back, `cont` retries them
/// and every write the guest saw acknowledged (before and after) reads
/// back.
#[test]
fn a_stopped_osd_stops_the_export_and_cont_loses_nothing() {
    let _g = OSD.write().unwrap_or_else(|e| e.into_inner());
    let osd = cluster().osd_pid;
    let image = unique("fail");
    rbd(&["create", "--size", "8M", &format!("rbd/{image}")]);
    let (d, mut q) = daemon(&[]);
    ok(&q.execute("blockdev-add", rbd_node("r0", &image)));
    let sock = export(
        &mut q,
        &d,
        "r0",
        json!({"on-write-error": "stop", "on-read-error": "stop"}),
    );
    let mut vm = Vm::connect(&sock, VmOptions::default());
    let before = pattern(10, 64 << 10);
    assert_eq!(vm.write(0, 0, &before), S_OK);

    struct Resume(i32);
    impl Drop for Resume {
        fn drop(&mut self) {
            signal(self.0, libc::SIGCONT);
        }
    }
    signal(osd, libc::SIGSTOP);
    let resume = Resume(osd);
    let during = pattern(11, 64 << 10);
    // The write parks: submit it without waiting for its completion.
    let h = vm.write_header(T_OUT, 256);
    let buf = vm.alloc(during.len() as u64);
    use vm_memory::Bytes;
    vm.mem.write_slice(&during, buf).unwrap();
    let s = vm.status_buf();
    let mut descs = vec![Desc::r(h, 16)];
    descs.extend(split_segments(buf, during.len() as u32, true));
    descs.push(Desc::w(s, 1));
    let head = vm.queues[0].add_chain(&vm.mem, &descs);
    vm.queues[0].kick();
    let ev = q.wait_event("BLOCK_IO_ERROR", Duration::from_secs(30));
    assert_eq!(ev["data"]["operation"], "write", "{ev}");
    assert_eq!(ev["data"]["action"], "stop", "{ev}");
    // Parked: the guest sees nothing yet.
    assert!(vm.queues[0]
        .wait_used(&vm.mem, 1, Duration::from_millis(500))
        .is_empty());
    drop(resume);
    ok(&q.execute("cont", json!({})));
    let used = vm.queues[0].wait_used(&vm.mem, 1, Duration::from_secs(30));
    assert_eq!(used.len(), 1);
    assert_eq!(used[0].id, u32::from(head));
    assert_eq!(vm.status_at(s), S_OK, "the retried write failed");
    vm.reset_alloc();
    let (st, back) = vm.read(0, 0, before.len() as u32);
    assert_eq!(st, S_OK);
    assert!(
        back == before,
        "a write acknowledged before the stop is lost"
    );
    let (st, back) = vm.read(0, 256, during.len() as u32);
    assert_eq!(st, S_OK);
    assert!(back == during, "the write retried by cont is lost");
    drop(vm);
    let mut d = d;
    assert!(d.terminate().success(), "{}", d.log());
}

/// An rbd node and its export on the command line (opened before the
/// sandbox is armed: its cluster threads get the cluster filter there).
#[test]
fn a_node_on_the_command_line_serves() {
    let _g = OSD.read().unwrap_or_else(|e| e.into_inner());
    let c = cluster();
    let image = unique("cmdline");
    rbd(&["create", "--size", "8M", &format!("rbd/{image}")]);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("key"), &c.key).unwrap();
    let blockdev = format!(
        "driver=rbd,node-name=r0,pool=rbd,image={image},conf={},user=admin,key-secret=sec0,server.0.host=127.0.0.1,server.0.port=6789",
        c.conf.display()
    );
    let mut d = Daemon::start_env(
        dir,
        &[
            "--object",
            "secret,id=sec0,file={dir}/key,format=base64",
            "--blockdev",
            &blockdev,
            "--export",
            "type=vhost-user-blk,id=e0,node-name=r0,addr.type=unix,addr.path={sock},writable=on",
        ],
        &[],
    );
    let mut vm = Vm::connect(&d.socket, VmOptions::default());
    let data = pattern(7, 128 << 10);
    assert_eq!(vm.write(0, 8, &data), S_OK);
    let (st, back) = vm.read(0, 8, data.len() as u32);
    assert_eq!(st, S_OK);
    assert!(back == data);
    drop(vm);
    assert!(d.terminate().success(), "{}", d.log());
    assert!(!d.log().contains(&c.key));
    rbd(&["rm", "--no-progress", &format!("rbd/{image}")]);
}

/// The live-migration handoff on an rbd image (docs/MIGRATION.md): B opens
/// it inactive while A writes; after A inactivates and B activates, B reads
/// what A wrote (librbd's cache dropped) and the size A grew it to, and B
/// writes.
#[test]
fn an_inactive_node_takes_over_what_another_client_wrote() {
    let _g = OSD.read().unwrap_or_else(|e| e.into_inner());
    let image = unique("handoff");
    rbd(&["create", "--size", "8M", &format!("rbd/{image}")]);
    let (da, mut qa) = daemon(&[]);
    let (db, mut qb) = daemon(&[]);
    let mut cached = rbd_node("r0", &image);
    // librbd's own cache on, so activation must drop it.
    cached.as_object_mut().unwrap().remove("cache");
    ok(&qa.execute("blockdev-add", cached.clone()));
    let mut inactive = cached.clone();
    inactive["active"] = json!(false);
    ok(&qb.execute("blockdev-add", inactive));
    let sa = export(&mut qa, &da, "r0", json!({"allow-inactive": true}));
    let sb = export(&mut qb, &db, "r0", json!({"allow-inactive": true}));
    let mut va = Vm::connect(&sa, VmOptions::default());
    let mut vb = Vm::connect(&sb, VmOptions::default());

    // B reads (and caches) the old data; its writes are refused.
    let (st, old) = vb.read(0, 8, 4096);
    assert_eq!(st, S_OK);
    assert!(old.iter().all(|&b| b == 0));
    assert_eq!(
        vb.write(0, 8, &pattern(9, 4096)),
        S_IOERR,
        "inactive B wrote"
    );

    let data = pattern(7, 4096);
    assert_eq!(va.write(0, 8, &data), S_OK);
    ok(&qa.execute("block_resize", json!({"node-name": "r0", "size": 16 << 20})));
    ok(&qa.execute("blockdev-set-active", json!({"active": false})));
    assert_eq!(va.write(0, 16, &data), S_IOERR, "inactive A wrote");
    ok(&qb.execute("blockdev-set-active", json!({"active": true})));

    let (st, back) = vb.read(0, 8, 4096);
    assert_eq!(st, S_OK);
    assert!(back == data, "B reads A's write after activating");
    assert_eq!(vb.capacity_sectors(), (16 << 20) / 512, "B sees A's resize");
    assert_eq!(vb.write(0, (12 << 20) / 512, &data), S_OK, "B writes");
    drop((va, vb));
    for (mut d, mut q) in [(da, qa), (db, qb)] {
        del_export(&mut q, "e-r0");
        assert!(d.terminate().success(), "{}", d.log());
    }
    rbd(&["rm", "--no-progress", &format!("rbd/{image}")]);
}
