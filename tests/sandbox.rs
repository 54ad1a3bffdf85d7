//! The sandbox (src/sandbox): every thread filtered and without new
//! privileges while serving, a forbidden call from each thread class kills
//! the daemon with a line naming it, Landlock keeps QMP inside the allowed
//! paths, `--user` switches every thread, capabilities are gone.
//!
//! The kill tests use the daemon's probe hook: with
//! `VHOST_USER_BLKD_SANDBOX_PROBE=CLASS:CALL`, the first thread of CLASS
//! makes CALL right after its filter is in place.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::json;

const MIB: u64 = 1 << 20;

/// The fields `keys` of /proc/PID/task/TID/status for every thread.
fn thread_status(pid: i32, keys: &[&str]) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let t = t.unwrap().path();
        let Ok(status) = std::fs::read_to_string(t.join("status")) else {
            continue; // the thread ended meanwhile
        };
        let comm = std::fs::read_to_string(t.join("comm"))
            .unwrap_or_default()
            .trim()
            .to_string();
        let vals = keys
            .iter()
            .map(|k| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(&format!("{k}:")))
                    .unwrap_or("?")
                    .trim()
                    .to_string()
            })
            .collect();
        out.push((comm, vals));
    }
    out
}

/// A daemon over a qcow2 image with an export, a QMP monitor and a
/// throttle group, plus `extra` arguments.
fn serving(extra: &[&str]) -> Daemon {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    let ok = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg("64M")
        .status()
        .unwrap();
    assert!(ok.success());
    let mut args = vec![
        "--object",
        "throttle-group,id=tg0,limits.iops-total=100000",
        "--blockdev",
        "driver=file,node-name=f0,filename={dir}/disk.qcow2",
        "--blockdev",
        "driver=qcow2,node-name=q0,file=f0",
        "--blockdev",
        "driver=throttle,node-name=t0,throttle-group=tg0,file=q0",
        "--export",
        "type=vhost-user-blk,id=e0,node-name=t0,writable=on,num-queues=2,addr.type=unix,addr.path={sock}",
        "--chardev",
        "socket,id=m0,path={dir}/qmp.sock,server=on,wait=off",
        "--monitor",
        "chardev=m0",
    ];
    args.extend_from_slice(extra);
    Daemon::start_in(dir, &args)
}

#[test]
fn every_thread_is_filtered_and_without_new_privileges_while_serving() {
    let mut d = serving(&[]);
    let mut qmp = Qmp::connect(&d.dir.path().join("qmp.sock"));
    // A job thread too: a mirror into a null target, which stays (ready)
    // until it is cancelled.
    let r = qmp.execute(
        "blockdev-add",
        json!({"driver": "null-co", "node-name": "n0", "size": 64 * MIB}),
    );
    assert!(r.get("return").is_some(), "{r}");
    let r = qmp.execute(
        "blockdev-mirror",
        json!({"job-id": "j0", "device": "q0", "target": "n0", "sync": "full"}),
    );
    assert!(r.get("return").is_some(), "{r}");
    let mut vm = Vm::connect(
        &d.socket,
        VmOptions {
            num_queues: 2,
            ..VmOptions::default()
        },
    );
    // Each queue's iothread has served a request (and so taken its own
    // filter).
    for q in 0..2 {
        assert_eq!(vm.write(q, 0, &pattern(q as u64, 4096)), 0);
        assert_eq!(vm.flush(q), 0);
    }
    let threads = thread_status(d.pid(), &["Seccomp", "NoNewPrivs", "CapEff", "CapPrm"]);
    let names: Vec<&str> = threads.iter().map(|(c, _)| c.as_str()).collect();
    eprintln!("threads (Seccomp, NoNewPrivs, CapEff, CapPrm): {threads:?}");
    for want in [
        "vub-qmp",
        "vub-qmp-client",
        "vub-accept-e0",
        "vring_worker",
        "job-j0",
        "vub-throttle-tg",
        "vub-events",
    ] {
        assert!(
            names.iter().any(|n| n.starts_with(want)),
            "no {want} thread among {names:?}"
        );
    }
    for (comm, v) in &threads {
        assert_eq!(
            (v[0].as_str(), v[1].as_str()),
            ("2", "1"),
            "thread {comm}: Seccomp {} NoNewPrivs {}",
            v[0],
            v[1]
        );
        assert_eq!(
            (v[2].as_str(), v[3].as_str()),
            ("0000000000000000", "0000000000000000"),
            "thread {comm} kept capabilities"
        );
    }
    let r = qmp.execute("block-job-cancel", json!({"device": "j0", "force": true}));
    assert!(r.get("return").is_some(), "{r}");
    drop(vm);
    assert!(d.terminate().success(), "{}", d.log());
}

const PROBE_ARGS: [&str; 10] = [
    "--blockdev",
    "driver=file,node-name=f0,filename={dir}/disk.img",
    "--blockdev",
    "driver=raw,node-name=d0,file=f0",
    "--export",
    "type=vhost-user-blk,id=e0,node-name=d0,writable=on,addr.type=unix,addr.path={sock}",
    "--chardev",
    "socket,id=m0,path={dir}/qmp.sock,server=on,wait=off",
    "--monitor",
    "chardev=m0",
];

fn probe_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::File::create(dir.path().join("disk.img"))
        .unwrap()
        .set_len(4 * MIB)
        .unwrap();
    dir
}

/// Starts the daemon with the probe hook for `class` making `call`; for a
/// class whose threads run from the start, waits for it to die; else
/// `then` makes such a thread run first. Returns (signal, log).
fn killed_by_probe(
    class: &str,
    call: &str,
    then: Option<&dyn Fn(&Daemon)>,
) -> (Option<i32>, String) {
    let probe = format!("{class}:{call}");
    let env = [("VHOST_USER_BLKD_SANDBOX_PROBE", probe.as_str())];
    let (mut child, log_path, _dir) = match then {
        Some(then) => {
            let mut d = Daemon::start_env(probe_dir(), &PROBE_ARGS, &env);
            then(&d);
            let child = d.child.take().unwrap();
            let log = d.dir.path().join("daemon.log");
            let dir = std::mem::replace(&mut d.dir, tempfile::tempdir().unwrap());
            (child, log, dir)
        }
        None => {
            // It dies before it listens: started by hand.
            let dir = probe_dir();
            let d = dir.path().to_str().unwrap().to_string();
            let args: Vec<String> = PROBE_ARGS
                .iter()
                .map(|a| {
                    a.replace("{dir}", &d)
                        .replace("{sock}", &format!("{d}/vub.sock"))
                })
                .collect();
            let log = dir.path().join("daemon.log");
            let child = Command::new(daemon_bin())
                .args(&args)
                .envs(env)
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .unwrap();
            (child, log, dir)
        }
    };
    let status = wait_timeout(&mut child, Duration::from_secs(30));
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    let Some(status) = status else {
        let _ = child.kill();
        panic!("{probe}: the daemon survived\n{log}");
    };
    (status.signal(), log)
}

fn assert_killed(class: &str, call: &str, then: Option<&dyn Fn(&Daemon)>) {
    let (signal, log) = killed_by_probe(class, call, then);
    assert_eq!(signal, Some(libc::SIGSYS), "{class}:{call}\n{log}");
    let line = format!("({class}) made the forbidden system call {call}");
    assert!(log.contains(&line), "no '{line}' in\n{log}");
}

fn first_request(d: &Daemon) {
    // The worker's first event may come during the set-up already (and
    // kill the daemon there).
    let Ok(mut vm) = Vm::try_connect(&d.socket, VmOptions::default()) else {
        return;
    };
    // A flush, kicked but not waited for: the daemon dies first.
    let h = vm.write_header(T_FLUSH, 0);
    let s = vm.status_buf();
    vm.queues[0].add_chain(&vm.mem, &[Desc::r(h, 16), Desc::w(s, 1)]);
    vm.queues[0].kick();
}

fn start_a_job(d: &Daemon) {
    let mut qmp = Qmp::connect(&d.dir.path().join("qmp.sock"));
    qmp.execute(
        "blockdev-add",
        json!({"driver": "null-co", "node-name": "n0", "size": 4 * MIB}),
    );
    // The job's thread may kill the daemon before the reply arrives: the
    // client then sees the connection close, which is expected here.
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        qmp.execute(
            "blockdev-backup",
            json!({"job-id": "j0", "device": "d0", "target": "n0", "sync": "full"}),
        )
    }));
}

#[test]
fn a_forbidden_call_from_any_thread_class_kills_the_daemon_and_says_why() {
    // These classes have threads as soon as the daemon serves.
    assert_killed("main", "execve", None);
    assert_killed("monitor", "execve", None);
    assert_killed("vhost-user", "ptrace", None);
    assert_killed("helper", "execve", None);
    // The iothread takes its filter at its first event: a request.
    assert_killed("iothread", "execve", Some(&first_request));
    assert_killed("iothread", "socket", Some(&first_request));
    // A job thread: started over QMP.
    assert_killed("job", "execve", Some(&start_a_job));
}

#[test]
fn a_unix_socket_is_allowed_where_an_inet_one_is_not() {
    // The monitor may create UNIX sockets (block-export-add) but no other
    // family: the probe's socket(AF_INET) kills.
    assert_killed("monitor", "socket", None);
    // With the sandbox off nothing is refused: the probe's call returns
    // and the daemon goes on.
    let mut d = Daemon::start_env(
        probe_dir(),
        &[
            "--image",
            "{dir}/disk.img",
            "--socket",
            "{sock}",
            "--sandbox",
            "off",
        ],
        &[("VHOST_USER_BLKD_SANDBOX_PROBE", "main:socket")],
    );
    let mut vm = Vm::connect(&d.socket, VmOptions::default());
    assert_eq!(vm.flush(0), 0);
    assert!(d.alive(), "{}", d.log());
    drop(vm);
    assert!(d.terminate().success());
}

fn qmp_error(r: &serde_json::Value) -> String {
    r["error"]["desc"].as_str().unwrap_or_default().to_string()
}

#[test]
fn landlock_keeps_qmp_inside_the_allowed_paths() {
    let outside = tempfile::tempdir().unwrap();
    let secret = outside.path().join("secret.img");
    std::fs::write(&secret, vec![0x5a; 4096]).unwrap();
    let d = serving(&[]);
    let allowed = d.dir.path();
    // The test helper allows the daemon's temp dir ({dir}); `outside` is
    // another directory.
    let mut qmp = Qmp::connect(&allowed.join("qmp.sock"));
    let r = qmp.execute(
        "blockdev-add",
        json!({"driver": "file", "node-name": "x", "filename": secret}),
    );
    let e = qmp_error(&r);
    assert!(
        e.contains("Permission denied") && e.contains("outside the paths the sandbox allows"),
        "{r}"
    );
    // Nor can it create a file there, or bind a socket there.
    let r = qmp.execute(
        "blockdev-create",
        json!({"job-id": "c0", "options": {"driver": "file", "filename": outside.path().join("new.img"), "size": MIB}}),
    );
    let created = r.get("return").is_some();
    if created {
        let ev = qmp.wait_event("JOB_STATUS_CHANGE", Duration::from_secs(10));
        let _ = ev;
    }
    assert!(!outside.path().join("new.img").exists(), "{r}");
    let r = qmp.execute(
        "block-export-add",
        json!({"type": "vhost-user-blk", "id": "e9", "node-name": "q0",
               "addr": {"type": "unix", "path": outside.path().join("e9.sock")}}),
    );
    assert!(r.get("error").is_some(), "{r}");
    // /etc/shadow, the case the issue began with, is refused by Landlock
    // (not by permissions: the daemon runs as root here).
    let r = qmp.execute(
        "blockdev-add",
        json!({"driver": "file", "node-name": "s", "filename": "/etc/shadow", "read-only": true}),
    );
    assert!(
        qmp_error(&r).contains("outside the paths the sandbox allows"),
        "{r}"
    );
    // Inside the allowed directory everything works: create, open, export.
    let inside = allowed.join("inside.img");
    std::fs::write(&inside, vec![0u8; 1 << 20]).unwrap();
    let r = qmp.execute(
        "blockdev-add",
        json!({"driver": "file", "node-name": "in", "filename": inside}),
    );
    assert!(r.get("return").is_some(), "{r}");
    let r = qmp.execute(
        "block-export-add",
        json!({"type": "vhost-user-blk", "id": "e1", "node-name": "in", "writable": true,
               "addr": {"type": "unix", "path": allowed.join("e1.sock")}}),
    );
    assert!(r.get("return").is_some(), "{r}");
    let mut vm = Vm::connect(&allowed.join("e1.sock"), VmOptions::default());
    assert_eq!(vm.write(0, 0, &pattern(7, 4096)), 0);
    assert_eq!(read_file_at(&inside, 0, 4096), pattern(7, 4096));
}

#[test]
fn sandbox_off_opens_what_permissions_allow() {
    let outside = tempfile::tempdir().unwrap();
    let other = outside.path().join("other.img");
    std::fs::write(&other, vec![0u8; 4096]).unwrap();
    let d = serving(&["--sandbox", "off"]);
    let mut qmp = Qmp::connect(&d.dir.path().join("qmp.sock"));
    let r = qmp.execute(
        "blockdev-add",
        json!({"driver": "file", "node-name": "x", "filename": other}),
    );
    assert!(r.get("return").is_some(), "{r}");
}

/// uid 65534 must be able to reach `path` for the --user test.
fn world_readable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn user_switches_every_thread_after_the_images_are_open() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("not root: --user cannot be tested");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    world_readable(dir.path());
    // A root-only image: opened before the switch, so still served.
    let img = dir.path().join("root-only.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&img, std::fs::Permissions::from_mode(0o600)).unwrap();
    let another = dir.path().join("another-root-only.img");
    std::fs::write(&another, vec![0u8; 4096]).unwrap();
    std::fs::set_permissions(&another, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut d = Daemon::start_in(
        dir,
        &[
            "--image",
            "{dir}/root-only.img",
            "--socket",
            "{sock}",
            "--chardev",
            "socket,id=m0,path={dir}/qmp.sock,server=on,wait=off",
            "--monitor",
            "chardev=m0",
            "--user",
            "nobody",
        ],
    );
    let mut vm = Vm::connect(&d.socket, VmOptions::default());
    assert_eq!(vm.write(0, 8, &pattern(3, 4096)), 0);
    assert_eq!(vm.flush(0), 0);
    assert_eq!(
        read_file_at(&d.dir.path().join("root-only.img"), 4096, 4096),
        pattern(3, 4096)
    );
    for (comm, v) in thread_status(d.pid(), &["Uid", "Gid", "CapEff", "Seccomp"]) {
        assert!(
            v[0].split_whitespace().all(|u| u == "65534"),
            "{comm}: Uid {}",
            v[0]
        );
        assert!(
            v[1].split_whitespace().all(|g| g == "65534"),
            "{comm}: Gid {}",
            v[1]
        );
        assert_eq!(v[2], "0000000000000000", "{comm}");
        assert_eq!(v[3], "2", "{comm}");
    }
    // Files opened later are opened as nobody: a root-only one is refused
    // even inside the allowed directory.
    let mut qmp = Qmp::connect(&d.dir.path().join("qmp.sock"));
    let r = qmp.execute(
        "blockdev-add",
        json!({"driver": "file", "node-name": "x", "filename": another}),
    );
    assert!(qmp_error(&r).contains("Permission denied"), "{r}");
    drop(vm);
    assert!(d.terminate().success(), "{}", d.log());
}

#[test]
fn user_needs_root_and_a_known_name() {
    let (code, out) = run_daemon(&[
        "--image",
        "/dev/null",
        "--socket",
        "/tmp/x.sock",
        "--user",
        "no-such-user-here",
    ]);
    assert_eq!(code, 1);
    assert!(out.contains("--user 'no-such-user-here': no user"), "{out}");
    let (code, out) = run_daemon(&[
        "--image",
        "/dev/null",
        "--socket",
        "/tmp/x.sock",
        "--run-with",
        "chroot=/x",
    ]);
    assert_eq!(code, 1);
    assert!(out.contains("only user=USER[:GROUP] is supported"), "{out}");
    let (code, out) = run_daemon(&[
        "--image",
        "/dev/null",
        "--socket",
        "/tmp/x.sock",
        "--sandbox",
        "maybe",
    ]);
    assert_eq!(code, 1);
    assert!(out.contains("'maybe' is not one of on, off, log"), "{out}");
}

#[test]
fn sandbox_log_mode_serves_and_filters_every_thread() {
    let mut d = serving(&["--sandbox", "log"]);
    let mut vm = Vm::connect(&d.socket, VmOptions::default());
    assert_eq!(vm.flush(0), 0);
    for (comm, v) in thread_status(d.pid(), &["Seccomp"]) {
        assert_eq!(v[0], "2", "{comm}");
    }
    assert!(d.log().contains("--sandbox log"), "{}", d.log());
    drop(vm);
    assert!(d.terminate().success(), "{}", d.log());
}
