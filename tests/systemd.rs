//! systemd: socket activation (run under `systemd-socket-activate`, which
//! passes LISTEN_FDS/LISTEN_PID/LISTEN_FDNAMES as systemd does) and
//! sd_notify (a NOTIFY_SOCKET datagram listener in the test).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::client::{new_instance, prop_u64};
use common::{daemon_bin, wait_timeout};

const ACTIVATE: &str = "/usr/bin/systemd-socket-activate";
/// Longest wait for one message from the daemon.
const WAIT: Duration = Duration::from_secs(20);

struct Activated {
    child: Option<Child>,
    dir: tempfile::TempDir,
    notify: UnixDatagram,
}

impl Activated {
    /// Runs the daemon under systemd-socket-activate with one listening
    /// socket per (file name, fd name) in `sockets`, NOTIFY_SOCKET set and
    /// `env` added; `{dir}` in an argument is the temp dir. The activator
    /// execs the daemon on the first connection: the returned stream is
    /// that connection, to the first socket.
    fn start(
        dir: tempfile::TempDir,
        sockets: &[(&str, &str)],
        args: &[&str],
        env: &[&str],
    ) -> (Activated, UnixStream) {
        let d = dir.path().to_str().unwrap().to_string();
        let notify_path = dir.path().join("notify");
        let notify = UnixDatagram::bind(&notify_path).unwrap();
        notify.set_read_timeout(Some(WAIT)).unwrap();
        let mut cmd = Command::new(ACTIVATE);
        for (file, _) in sockets {
            cmd.arg("-l").arg(format!("{d}/{file}"));
        }
        let names: Vec<&str> = sockets.iter().map(|(_, n)| *n).collect();
        if !names.iter().all(|n| n.is_empty()) {
            cmd.arg(format!("--fdname={}", names.join(":")));
        }
        cmd.arg("-E")
            .arg(format!("NOTIFY_SOCKET={}", notify_path.display()))
            .arg("-E")
            .arg("RUST_LOG=info");
        for e in env {
            cmd.arg("-E").arg(e);
        }
        cmd.arg(daemon_bin())
            .args(args.iter().map(|a| a.replace("{dir}", &d)))
            .stdin(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("daemon.log")).unwrap());
        let child = cmd.spawn().expect("systemd-socket-activate");
        let first = dir.path().join(sockets[0].0);
        let deadline = Instant::now() + WAIT;
        let conn = loop {
            if let Ok(c) = UnixStream::connect(&first) {
                break c;
            }
            assert!(Instant::now() < deadline, "activator never listened");
            std::thread::sleep(Duration::from_millis(10));
        };
        (
            Activated {
                child: Some(child),
                dir,
                notify,
            },
            conn,
        )
    }

    /// The next notification, or None if none came in time.
    fn next_message(&self) -> Option<String> {
        let mut buf = [0u8; 4096];
        let n = self.notify.recv(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    /// Waits for a notification that holds `line`; returns every message
    /// received until then.
    fn wait_for(&self, line: &str) -> Vec<String> {
        let mut seen = Vec::new();
        loop {
            match self.next_message() {
                Some(m) => {
                    let hit = m.lines().any(|l| l == line);
                    seen.push(m);
                    if hit {
                        return seen;
                    }
                }
                None => panic!(
                    "no {line} within {WAIT:?}; got {seen:?}\n--- daemon log\n{}",
                    self.log()
                ),
            }
        }
    }

    fn path(&self, f: &str) -> std::path::PathBuf {
        self.dir.path().join(f)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().unwrap();
        // SAFETY: kill only takes a pid and a signal number.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        wait_timeout(&mut c, Duration::from_secs(60)).expect("no exit after SIGTERM")
    }
}

impl Drop for Activated {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A temp dir holding a raw image `disk.img` of `size` bytes.
fn dir_with_image(size: u64) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::File::create(dir.path().join("disk.img"))
        .unwrap()
        .set_len(size)
        .unwrap();
    dir
}

/// One QMP exchange on a connected monitor stream: greeting, capabilities,
/// then `cmd`'s reply line.
fn qmp(conn: UnixStream, cmd: &str) -> String {
    conn.set_read_timeout(Some(WAIT)).unwrap();
    let mut w = conn.try_clone().unwrap();
    let mut r = BufReader::new(conn);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert!(line.contains("QMP"), "greeting: {line}");
    w.write_all(b"{\"execute\":\"qmp_capabilities\"}\n")
        .unwrap();
    line.clear();
    r.read_line(&mut line).unwrap();
    assert!(line.contains("return"), "{line}");
    w.write_all(cmd.as_bytes()).unwrap();
    w.write_all(b"\n").unwrap();
    line.clear();
    r.read_line(&mut line).unwrap();
    line
}

#[test]
fn sockets_passed_by_systemd_serve_the_export_and_the_monitor() {
    // The monitor's socket comes first: the test's connection to it starts
    // the daemon and then is its first QMP client.
    let dir_args = [
        "--blockdev",
        "driver=file,node-name=f0,filename={dir}/disk.img",
        "--blockdev",
        "driver=raw,node-name=d0,file=f0",
        "--export",
        "type=vhost-user-blk,id=vm1-disk,node-name=d0,writable=on,addr.type=unix,addr.path={dir}/unused.sock",
        "--chardev",
        "socket,id=qmp0,path={dir}/unused-qmp.sock",
        "--monitor",
        "chardev=qmp0",
    ];
    let size = 4 << 20;
    let (mut a, mon) = Activated::start(
        dir_with_image(size),
        &[("qmp.sock", "qmp0"), ("vub.sock", "vm1-disk")],
        &dir_args,
        &[],
    );
    let seen = a.wait_for("READY=1");
    let ready = seen.last().unwrap();
    assert!(
        ready.contains("STATUS="),
        "READY=1 comes with a STATUS=: {ready:?}"
    );
    // Every export listens by then: a frontend attaches without waiting.
    let mut b = new_instance(&a.path("vub.sock"), false);
    b.connect()
        .expect("vhost-user connect on the activated socket");
    assert_eq!(prop_u64(&b, "capacity"), size);
    drop(b);
    let reply = qmp(mon, r#"{"execute":"query-block-exports"}"#);
    assert!(reply.contains("vm1-disk"), "{reply}");
    // Nothing was bound at the configured paths.
    assert!(!a.path("unused.sock").exists());
    assert!(!a.path("unused-qmp.sock").exists());

    let status = a.terminate();
    let seen = a.wait_for("STOPPING=1");
    assert!(status.success(), "{status}\n{}", a.log());
    assert!(seen.iter().all(|m| !m.contains("READY=1")));
    // The sockets are the .socket unit's: left in place.
    assert!(a.path("vub.sock").exists(), "activated socket unlinked");
    assert!(a.path("qmp.sock").exists(), "activated socket unlinked");
}

#[test]
fn one_unnamed_socket_serves_the_short_form_export_and_the_watchdog_pings() {
    let (a, conn) = Activated::start(
        dir_with_image(1 << 20),
        &[("vub.sock", "")],
        &["--image", "{dir}/disk.img", "--socket", "{dir}/unused.sock"],
        &["WATCHDOG_USEC=200000"],
    );
    drop(conn);
    a.wait_for("READY=1");
    // Two pings prove a thread that repeats them, not a one-off.
    a.wait_for("WATCHDOG=1");
    a.wait_for("WATCHDOG=1");
    let mut b = new_instance(&a.path("vub.sock"), false);
    b.connect()
        .expect("vhost-user connect on the activated socket");
    assert_eq!(prop_u64(&b, "capacity"), 1 << 20);
}

#[test]
fn a_socket_nobody_claims_is_refused_at_start() {
    let (mut a, _conn) = Activated::start(
        dir_with_image(1 << 20),
        &[("vub.sock", "export0"), ("other.sock", "nosuchexport")],
        &["--image", "{dir}/disk.img", "--socket", "{dir}/unused.sock"],
        &[],
    );
    // Left in a.child: killed on drop if it runs on.
    let status = wait_timeout(a.child.as_mut().unwrap(), WAIT).expect("daemon did not exit");
    a.child = None;
    assert!(!status.success());
    let log = a.log();
    assert!(log.contains("'nosuchexport'"), "{log}");
    assert!(a.next_message_now().is_none());
}

impl Activated {
    fn next_message_now(&self) -> Option<String> {
        self.notify.set_nonblocking(true).unwrap();
        self.next_message()
    }
}

/// The unit templates in systemd/ pass `systemd-analyze verify` (with
/// ExecStart= pointed at the built daemon, which the check requires to
/// exist).
#[test]
fn unit_templates_verify() {
    let dir = tempfile::tempdir().unwrap();
    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd");
    for f in ["vhost-user-blkd@.service", "vhost-user-blkd@.socket"] {
        let text = std::fs::read_to_string(units.join(f)).unwrap();
        std::fs::write(
            dir.path().join(f),
            text.replace("/usr/bin/vhost-user-blkd", daemon_bin()),
        )
        .unwrap();
    }
    let out = Command::new("systemd-analyze")
        .args([
            "verify",
            "--man=no",
            "vhost-user-blkd@vm1.service",
            "vhost-user-blkd@vm1.socket",
        ])
        .current_dir(dir.path())
        .output()
        .expect("systemd-analyze");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && err.trim().is_empty(), "{err}");
}
