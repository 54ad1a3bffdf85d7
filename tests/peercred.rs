//! Peer credentials (SO_PEERCRED) on the QMP monitor and the vhost-user
//! export sockets: a connection from another uid is closed before the QMP
//! greeting or any vhost-user reply, logged once for a burst, and the
//! daemon goes on serving allowed peers.
//!
//! The other uid is 65534 (nobody), by a `setpriv --reuid=65534
//! --regid=65534 --clear-groups /usr/bin/python3` client. The socket directory is
//! 0755 and the sockets 0777 (`--socket-mode`), so that the kernel lets
//! uid 65534 connect and only the daemon's check can refuse it; the tests
//! assert that the connect() itself succeeds. They need root (to switch to
//! uid 65534) and setpriv; without them they say so and pass.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const NOBODY: &str = "65534";

/// The system's Python: one under /root (pyenv) is out of uid 65534's reach.
const PYTHON: &str = "/usr/bin/python3";

/// The client run as uid 65534: connects `n` times to `path`; for `vhost`
/// sends VHOST_USER_GET_FEATURES first; prints one line per connection:
/// "closed" (EOF before any byte), "reply <first bytes>", "timeout", or
/// "connect-error <errno>" (the kernel refused the connect: permissions).
const CLIENT: &str = r#"
import socket, struct, sys
path, kind, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
for _ in range(n):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    try:
        s.connect(path)
    except OSError as e:
        print("connect-error", e.errno, flush=True)
        continue
    if kind == "vhost":
        try:
            # VHOST_USER_GET_FEATURES (1), flags: version 1, no payload.
            s.sendall(struct.pack("<III", 1, 1, 0))
        except OSError:
            pass
    try:
        data = s.recv(4096)
    except socket.timeout:
        print("timeout", flush=True)
        continue
    except ConnectionResetError:
        data = b""
    if data:
        print("reply", data[:120].decode("latin1").replace("\r", " ").replace("\n", " "), flush=True)
    else:
        print("closed", flush=True)
    s.close()
"#;

/// Whether these tests can run here (root, setpriv, python3).
fn can_switch_uid() -> bool {
    // SAFETY: geteuid takes no arguments and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root to connect as uid {NOBODY}");
        return false;
    }
    let ok = Command::new("setpriv")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("skipped: no setpriv (util-linux)");
        return false;
    }
    if !Path::new(PYTHON).exists() {
        eprintln!("skipped: no {PYTHON}");
        return false;
    }
    true
}

/// Runs the client as uid/gid 65534; one result line per connection.
fn as_nobody(path: &Path, kind: &str, n: usize) -> Vec<String> {
    let out = Command::new("setpriv")
        .args([
            "--reuid",
            NOBODY,
            "--regid",
            NOBODY,
            "--clear-groups",
            PYTHON,
            "-c",
            CLIENT,
        ])
        .arg(path)
        .arg(kind)
        .arg(n.to_string())
        .output()
        .expect("run setpriv");
    assert!(
        out.status.success(),
        "client as uid {NOBODY} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(lines.len(), n, "{lines:?}");
    lines
}

/// A temp dir uid 65534 can reach (tempfile makes them 0700).
fn open_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut p = dir.path().parent();
    while let Some(d) = p {
        let mode = std::fs::metadata(d).unwrap().permissions().mode();
        assert!(
            mode & 0o001 != 0,
            "{} is not searchable by others",
            d.display()
        );
        p = d.parent();
    }
    dir
}

fn assert_socket_open_to_all(path: &Path) {
    let mode = std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o777, "{}", path.display());
}

/// The daemon's refusal lines.
fn refusals(d: &Daemon) -> Vec<String> {
    d.log()
        .lines()
        .filter(|l| l.contains("refused a connection from"))
        .map(str::to_string)
        .collect()
}

/// A QMP monitor on `{sock}` (0777 in a 0755 dir) and a null export on
/// `{dir}/e0.sock`, plus `extra`.
fn daemon(extra: &[&str]) -> Daemon {
    let mut args = vec![
        "--socket-mode",
        "0777",
        "--chardev",
        "socket,id=m0,path={sock},server=on,wait=off",
        "--monitor",
        "chardev=m0",
        "--blockdev",
        "driver=null-co,node-name=n0",
        "--blockdev",
        "driver=null-co,node-name=n1",
        "--export",
        "vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path={dir}/e0.sock",
    ];
    args.extend_from_slice(extra);
    // One refusal line per burst, however slow the machine.
    Daemon::start_env(
        open_dir(),
        &args,
        &[("VUB_PEER_REFUSAL_LOG_INTERVAL_MS", "3600000")],
    )
}

/// A QMP client as root: greeting, negotiation, then commands.
struct Qmp {
    r: BufReader<UnixStream>,
}

impl Qmp {
    fn connect(path: &Path) -> Qmp {
        let s = UnixStream::connect(path).expect("QMP connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut q = Qmp {
            r: BufReader::new(s),
        };
        let g = q.value();
        assert!(g.get("QMP").is_some(), "{g}");
        assert_eq!(q.cmd("qmp_capabilities", json!({})), json!({"return": {}}));
        q
    }

    fn value(&mut self) -> Value {
        let mut l = String::new();
        let n = self.r.read_line(&mut l).expect("QMP read");
        assert!(n > 0, "QMP connection closed");
        serde_json::from_str(&l).unwrap_or_else(|e| panic!("QMP JSON {e}: {l:?}"))
    }

    fn cmd(&mut self, name: &str, args: Value) -> Value {
        let text = json!({"execute": name, "arguments": args}).to_string();
        let s = self.r.get_mut();
        s.write_all(text.as_bytes()).unwrap();
        s.write_all(b"\n").unwrap();
        loop {
            let v = self.value();
            if v.get("event").is_none() {
                return v;
            }
        }
    }
}

#[test]
fn qmp_refuses_another_uid_before_the_greeting_and_serves_root() {
    if !can_switch_uid() {
        return;
    }
    let mut d = daemon(&[]);
    assert_socket_open_to_all(&d.socket);
    let got = as_nobody(&d.socket, "qmp", 1);
    assert_eq!(got, ["closed"], "uid {NOBODY} must get no greeting");
    let lines = refusals(&d);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].contains("QMP monitor") && lines[0].contains("uid 65534 gid 65534"),
        "{lines:?}"
    );
    assert!(lines[0].contains("pid "), "{lines:?}");
    // Root, after the refused one, is served.
    let mut q = Qmp::connect(&d.socket);
    let v = q.cmd("query-version", json!({}));
    assert!(v["return"]["qemu"]["major"].is_u64(), "{v}");
    assert!(d.alive());
}

#[test]
fn allowed_uid_gets_the_qmp_greeting_and_vhost_user_replies() {
    if !can_switch_uid() {
        return;
    }
    for allow in [
        ["--allow-peer-uid", "nobody"],
        ["--allow-peer-gid", "65534"],
    ] {
        let d = daemon(&allow);
        let got = as_nobody(&d.socket, "qmp", 1);
        assert!(got[0].starts_with("reply {\"QMP\""), "{allow:?}: {got:?}");
        let got = as_nobody(&d.dir.path().join("e0.sock"), "vhost", 1);
        assert!(got[0].starts_with("reply"), "{allow:?}: {got:?}");
        assert_eq!(refusals(&d), Vec::<String>::new(), "{allow:?}");
    }
}

#[test]
fn vhost_user_refuses_another_uid_and_serves_the_allowed_frontend_next() {
    if !can_switch_uid() {
        return;
    }
    let mut d = daemon(&[]);
    let e0 = d.dir.path().join("e0.sock");
    assert_socket_open_to_all(&e0);
    // An export added at run time is checked too.
    let e1 = d.dir.path().join("e1.sock");
    let mut q = Qmp::connect(&d.socket);
    let r = q.cmd(
        "block-export-add",
        json!({"type": "vhost-user-blk", "id": "e1", "node-name": "n1",
               "addr": {"type": "unix", "path": e1}}),
    );
    assert_eq!(r, json!({"return": {}}));
    assert_socket_open_to_all(&e1);
    for (id, sock) in [("e0", &e0), ("e1", &e1)] {
        let got = as_nobody(sock, "vhost", 1);
        assert_eq!(got, ["closed"], "{id}: no reply to GET_FEATURES");
        let lines = refusals(&d);
        assert!(
            lines
                .iter()
                .any(|l| l.contains(&format!("export {id}:")) && l.contains("uid 65534")),
            "{id}: {lines:?}"
        );
        // The allowed frontend (root) connects next and is served.
        let mut vm = Vm::connect(sock, VmOptions::default());
        assert_eq!(vm.flush(0), S_OK, "{id}");
    }
    assert!(d.alive());
}

#[test]
fn a_burst_of_refusals_is_logged_once_per_socket() {
    if !can_switch_uid() {
        return;
    }
    let mut d = daemon(&[]);
    let e0 = d.dir.path().join("e0.sock");
    let fds = || {
        std::fs::read_dir(format!("/proc/{}/fd", d.pid()))
            .unwrap()
            .count()
    };
    // Counted once the daemon is set up: it makes descriptors after its
    // sockets listen (Landlock's ruleset; the iothreads, released when the
    // sandbox is armed, make their rings after "ready"), so the baseline
    // is a count that held for 100 ms.
    d.wait_ready();
    let mut before = fds();
    for _ in 0..100 {
        std::thread::sleep(std::time::Duration::from_millis(100));
        let now = fds();
        if now == before {
            break;
        }
        before = now;
    }
    assert_eq!(as_nobody(&d.socket, "qmp", 20), ["closed"; 20]);
    assert_eq!(as_nobody(&e0, "vhost", 20), ["closed"; 20]);
    // A refused connection is closed before the client sees its end.
    assert_eq!(
        fds(),
        before,
        "descriptors of refused connections left open"
    );
    // Each accept loop has moved on to the next connection: root is served
    // on both sockets, so all ten refusals were seen.
    let mut q = Qmp::connect(&d.socket);
    assert!(q.cmd("query-version", json!({}))["return"].is_object());
    let mut vm = Vm::connect(&e0, VmOptions::default());
    assert_eq!(vm.flush(0), S_OK);
    let lines = refusals(&d);
    assert_eq!(lines.len(), 2, "one line per socket: {lines:?}");
    assert_eq!(
        lines.iter().filter(|l| l.contains("QMP monitor")).count(),
        1
    );
    assert_eq!(lines.iter().filter(|l| l.contains("export e0:")).count(), 1);
    assert!(d.alive());
}

#[test]
fn a_socket_passed_as_a_file_descriptor_is_checked_too() {
    if !can_switch_uid() {
        return;
    }
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let dir = open_dir();
    let path = dir.path().join("passed.sock");
    // The orchestrator's socket, open to all: the daemon leaves its mode.
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).unwrap();
    let fd = listener.as_raw_fd();
    let log = std::fs::File::create(dir.path().join("daemon.log")).unwrap();
    let mut cmd = std::process::Command::new(daemon_bin());
    cmd.args([
        "--blockdev",
        "driver=null-co,node-name=n0",
        "--export",
        "vhost-user-blk,id=e0,node-name=n0,addr.type=fd,addr.str=3",
    ])
    .env("RUST_LOG", "info")
    .stdin(std::process::Stdio::null())
    .stderr(log);
    // SAFETY: dup2 and fcntl are async-signal-safe and take only
    // descriptor numbers; fd 3 is left without close-on-exec (dup2 onto
    // itself keeps the flag, hence the fcntl), so the daemon inherits it.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(fd, 3) < 0 || libc::fcntl(3, libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().expect("spawn daemon");
    drop(listener);
    let mut d = Daemon {
        child: Some(child),
        socket: path.clone(),
        dir,
    };
    // The connection waits in the backlog until the daemon accepts it.
    assert_eq!(as_nobody(&path, "vhost", 1), ["closed"]);
    let lines = refusals(&d);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("export e0:") && lines[0].contains("uid 65534"));
    let mut vm = Vm::connect(&path, VmOptions::default());
    assert_eq!(vm.flush(0), S_OK);
    assert!(d.alive());
}

#[test]
fn an_unknown_user_or_group_is_a_start_up_error_naming_it() {
    for (opt, name) in [
        ("--allow-peer-uid", "no-such-user-xyz"),
        ("--allow-peer-gid", "no-such-group-xyz"),
    ] {
        let list = format!("0,{name}");
        let (code, err) = run_daemon(&[
            "--blockdev",
            "driver=null-co,node-name=n0",
            "--export",
            "vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path=/nonexistent/x.sock",
            opt,
            &list,
        ]);
        assert_ne!(code, 0, "{opt}");
        assert!(
            err.contains(opt) && err.contains(&format!("'{name}'")),
            "{err}"
        );
    }
}
