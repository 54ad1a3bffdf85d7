//! Process behaviour as an orchestrator sees it: signals, logs under
//! --daemonize, the mode and ownership of the sockets the daemon creates.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

fn null_export(sock: &std::path::Path) -> String {
    format!(
        "vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path={}",
        sock.display()
    )
}

/// Waits until the process `pid` (not our child) is gone.
fn wait_gone(pid: i32) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    // SAFETY: signal 0 only checks that the process exists.
    while unsafe { libc::kill(pid, 0) } == 0 {
        assert!(std::time::Instant::now() < deadline, "daemon did not exit");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn sighup_drains_and_exits_zero_like_sigterm() {
    let mut d = Daemon::raw(1 << 20, &[]);
    let socket = d.socket.clone();
    let mut vm = Vm::connect(&d.socket, VmOptions::default());
    assert_eq!(vm.write(0, 0, &pattern(7, 4096)), S_OK);
    let mut child = d.child.take().unwrap();
    // SAFETY: kill only takes a pid and a signal number.
    unsafe { libc::kill(child.id() as i32, libc::SIGHUP) };
    let status = wait_timeout(&mut child, Duration::from_secs(30)).expect("exit after SIGHUP");
    assert_eq!(status.code(), Some(0), "exit status {status}");
    assert!(!socket.exists(), "socket removed at exit");
    assert!(d.log().contains("signal 1"), "{}", d.log());
    assert_eq!(read_file_at(&d.image(), 0, 4096), pattern(7, 4096));
}

#[test]
fn daemonize_logs_to_the_log_file() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    let pidfile = dir.path().join("d.pid");
    let log = dir.path().join("d.log");
    let (code, err) = run_daemon(&[
        "--blockdev",
        "driver=null-co,node-name=n0",
        "--export",
        &null_export(&sock),
        "--daemonize",
        "--pidfile",
        pidfile.to_str().unwrap(),
        "--log-file",
        log.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // SAFETY: kill only takes a pid and a signal number.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    wait_gone(pid);
    let text = std::fs::read_to_string(&log).unwrap();
    // Lines from before and after the detach both reach the file.
    assert!(text.contains("ready"), "{text}");
    assert!(text.contains("draining and flushing"), "{text}");
    assert!(text.contains("exiting"), "{text}");
}

#[test]
fn log_file_without_daemonize_takes_the_log_too() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("d.log");
    let mut d = Daemon::start_in(
        dir,
        &[
            "--blockdev",
            "driver=null-co,node-name=n0",
            "--export",
            "vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path={sock}",
            "--log-file",
            "{dir}/d.log",
        ],
    );
    assert!(d.terminate().success());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("exiting"), "{text}");
}

#[test]
fn daemonize_without_a_place_for_its_logs_is_refused() {
    if std::path::Path::new("/dev/log").exists() {
        eprintln!("skipped: /dev/log exists here, so the logs go to syslog");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    let (code, err) = run_daemon(&[
        "--blockdev",
        "driver=null-co,node-name=n0",
        "--export",
        &null_export(&sock),
        "--daemonize",
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("--log-file"), "{err}");
    assert!(!sock.exists());
}

fn mode_of(p: &std::path::Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

/// Starts the daemon under umask 000 (the widest) with `extra` options and
/// a monitor, and watches the socket paths from the moment it starts:
/// every mode ever seen on them is returned.
fn start_watching(
    extra: &[&str],
) -> (
    tempfile::TempDir,
    Guard,
    Vec<u32>,
    std::path::PathBuf,
    std::path::PathBuf,
) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    let qmp = dir.path().join("qmp.sock");
    let mut args = vec![
        "--blockdev".to_string(),
        "driver=null-co,node-name=n0".into(),
        "--export".into(),
        null_export(&sock),
        "--chardev".into(),
        format!("socket,id=m0,path={}", qmp.display()),
        "--monitor".into(),
        "chardev=m0".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let log = std::fs::File::create(dir.path().join("daemon.log")).unwrap();
    let mut cmd = Command::new(daemon_bin());
    cmd.args(&args).stdin(Stdio::null()).stderr(log);
    // SAFETY: umask is async-signal-safe and touches nothing else.
    unsafe {
        cmd.pre_exec(|| {
            libc::umask(0);
            Ok(())
        });
    }
    let mut child = Guard(cmd.spawn().unwrap());
    let mut seen = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        for p in [&sock, &qmp] {
            if let Ok(m) = std::fs::symlink_metadata(p) {
                let mode = m.permissions().mode() & 0o7777;
                if !seen.contains(&mode) {
                    seen.push(mode);
                }
            }
        }
        if listening(&sock) && listening(&qmp) {
            break;
        }
        if let Some(s) = child.0.try_wait().unwrap() {
            panic!(
                "daemon exited: {s}: {}",
                std::fs::read_to_string(dir.path().join("daemon.log")).unwrap()
            );
        }
        assert!(std::time::Instant::now() < deadline, "never listened");
        std::thread::yield_now();
    }
    (dir, child, seen, sock, qmp)
}

/// Kills the daemon if a test panics before stopping it.
struct Guard(std::process::Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn stop(child: &mut std::process::Child) {
    // SAFETY: kill only takes a pid and a signal number.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let s = wait_timeout(child, Duration::from_secs(30)).expect("exit");
    assert!(s.success(), "{s}");
}

#[test]
fn socket_mode_and_group_apply_to_every_socket_from_the_start() {
    let (_dir, mut child, seen, sock, qmp) =
        start_watching(&["--socket-mode", "0660", "--socket-group", "disk"]);
    // Before its final mode a socket may be narrower (owner-only), never
    // wider: under umask 000 a plain bind() would show 0777.
    assert!(
        seen.iter().all(|m| m & !0o660 == 0),
        "modes seen (decimal): {seen:?}"
    );
    for p in [&sock, &qmp] {
        assert_eq!(mode_of(p), 0o660, "{}", p.display());
        assert_eq!(std::fs::metadata(p).unwrap().gid(), 6, "group disk");
    }
    // A socket added at run time gets them too.
    let mut q = Qmp::connect(&qmp);
    let sock2 = sock.with_file_name("s2.sock");
    let r = q.execute(
        "block-export-add",
        serde_json::json!({"type": "vhost-user-blk", "id": "e1", "node-name": "n0",
            "addr": {"type": "unix", "path": sock2}}),
    );
    assert!(r.get("return").is_some(), "{r}");
    assert_eq!(mode_of(&sock2), 0o660);
    assert_eq!(std::fs::metadata(&sock2).unwrap().gid(), 6);
    drop(q);
    stop(&mut child.0);
    assert!(!sock.exists() && !sock2.exists() && !qmp.exists());
}

#[test]
fn socket_owner_is_applied_when_root() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: not root");
        return;
    }
    let (_dir, mut child, seen, sock, qmp) = start_watching(&[
        "--socket-mode",
        "0600",
        "--socket-owner",
        "daemon",
        "--socket-group",
        "1",
    ]);
    assert!(
        seen.iter().all(|m| m & !0o600 == 0),
        "modes seen (decimal): {seen:?}"
    );
    for p in [&sock, &qmp] {
        let m = std::fs::metadata(p).unwrap();
        assert_eq!((m.uid(), m.gid()), (1, 1), "{}", p.display());
    }
    stop(&mut child.0);
}

#[test]
fn bad_socket_options_fail_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    let export = null_export(&sock);
    for (opt, val, want) in [
        ("--socket-mode", "0999", "--socket-mode"),
        ("--socket-mode", "04660", "--socket-mode"),
        ("--socket-group", "no-such-group-xyz", "no-such-group-xyz"),
        ("--socket-owner", "no-such-user-xyz", "no-such-user-xyz"),
    ] {
        let (code, err) = run_daemon(&[
            "--blockdev",
            "driver=null-co,node-name=n0",
            "--export",
            &export,
            opt,
            val,
        ]);
        assert_eq!(code, 1, "{opt} {val}: {err}");
        assert!(err.contains(want), "{opt} {val}: {err}");
        assert!(!sock.exists());
    }
}
