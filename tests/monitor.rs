//! The management plane under abuse: QMP sessions by the thousand, panicking
//! commands, idle and hostile clients, duplicate keys, the pidfile, socket
//! paths already in use, and shutdown with parked writes.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// A daemon with only a QMP monitor (on `{sock}`), run under
/// `prlimit --nofile=256`, with `env` added to its environment.
fn monitor_daemon(extra: &[&str], env: &[(&str, &str)]) -> Daemon {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut args = vec![
        "--nofile=256",
        "--",
        daemon_bin(),
        "--chardev",
        "socket,id=m0,path={sock},server=on,wait=off",
        "--monitor",
        "chardev=m0",
    ];
    args.extend_from_slice(extra);
    // prlimit sets the limit on itself, then execs the daemon: same pid.
    Daemon::start_bin("prlimit", dir, &args, env)
}

/// (open fds, threads, RSS in KiB) of process `pid`.
fn usage(pid: i32) -> (usize, usize, u64) {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("/proc/PID/fd")
        .count();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} in /proc/{pid}/status"))
    };
    (fds, field("Threads:") as usize, field("VmRSS:"))
}

/// How many QMP client threads process `pid` has.
fn client_threads(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("/proc/PID/task")
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|c| c.trim() == "vub-qmp-client")
        .count()
}

/// Usage once every client thread has ended (a moment after its
/// connection closes; at most 10 s).
fn settle(pid: i32) -> (usize, usize, u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while client_threads(pid) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    usage(pid)
}

/// A raw QMP connection: lines in, lines out, with a read timeout so that a
/// daemon that never answers fails the test instead of hanging it.
struct Raw {
    r: BufReader<UnixStream>,
}

impl Raw {
    fn connect(path: &Path) -> std::io::Result<Raw> {
        let s = UnixStream::connect(path)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(Raw {
            r: BufReader::new(s),
        })
    }

    /// The next line, or None at EOF (or a reset connection).
    fn line(&mut self) -> std::io::Result<Option<String>> {
        let mut l = String::new();
        match self.r.read_line(&mut l) {
            Ok(0) => Ok(None),
            Ok(_) => Ok(Some(l)),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn value(&mut self) -> Value {
        let l = self
            .line()
            .expect("QMP read")
            .expect("QMP connection closed");
        serde_json::from_str(&l).unwrap_or_else(|e| panic!("QMP JSON {e}: {l:?}"))
    }

    fn send_bytes(&mut self, b: &[u8]) {
        let s = self.r.get_mut();
        s.write_all(b).expect("QMP write");
        s.write_all(b"\n").expect("QMP write");
    }

    /// Sends `text` verbatim and returns the next reply (events skipped).
    fn send_text(&mut self, text: &str) -> Value {
        self.send_bytes(text.as_bytes());
        loop {
            let v = self.value();
            if v.get("event").is_none() {
                return v;
            }
        }
    }

    fn cmd(&mut self, name: &str, args: Value) -> Value {
        self.send_text(&json!({"execute": name, "arguments": args}).to_string())
    }

    /// Connects, reads the greeting and negotiates.
    fn negotiated(path: &Path) -> Raw {
        let mut c = Raw::connect(path).expect("QMP connect");
        let g = c.value();
        assert!(g.get("QMP").is_some(), "{g}");
        let r = c.cmd("qmp_capabilities", json!({}));
        assert_eq!(r, json!({"return": {}}));
        c
    }
}

fn next(c: &mut Raw, what: &str) -> Result<Value, String> {
    let l = c
        .line()
        .map_err(|e| format!("{what}: {e}"))?
        .ok_or(format!("{what}: connection closed"))?;
    serde_json::from_str(&l).map_err(|e| format!("{what}: {e}: {l:?}"))
}

/// One whole session: greeting, negotiation, a command, close.
fn session(path: &Path) -> Result<(), String> {
    let mut c = Raw::connect(path).map_err(|e| format!("connect: {e}"))?;
    let g = next(&mut c, "greeting")?;
    if g.get("QMP").is_none() {
        return Err(format!("greeting: {g}"));
    }
    c.send_bytes(br#"{"execute": "qmp_capabilities"}"#);
    let r = next(&mut c, "qmp_capabilities")?;
    if r != json!({"return": {}}) {
        return Err(format!("qmp_capabilities: {r}"));
    }
    c.send_bytes(br#"{"execute": "query-version", "id": 7}"#);
    let r = next(&mut c, "query-version")?;
    if r["id"] != 7 || r.get("return").is_none() {
        return Err(format!("query-version: {r}"));
    }
    Ok(())
}

#[test]
fn a_thousand_qmp_sessions_leave_fds_threads_and_rss_flat() {
    let d = monitor_daemon(
        &[
            "--blockdev",
            "driver=null-co,node-name=n0",
            "--export",
            "vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path={dir}/e0.sock,num-queues=1",
        ],
        &[],
    );
    let pid = d.pid();
    // One session first, so that what is made once (the monitor's thread,
    // allocator arenas) is in the baseline.
    session(&d.socket).expect("first session");
    let base = settle(pid);
    for i in 0..1000 {
        if let Err(e) = session(&d.socket) {
            panic!("session {i}: {e}; daemon usage now {:?}", usage(pid));
        }
    }
    let after = settle(pid);
    eprintln!("1000 QMP sessions: (fds, threads, RSS KiB) {base:?} -> {after:?}");
    assert_eq!(after.0, base.0, "open fds");
    assert_eq!(after.1, base.1, "threads");
    assert!(
        after.2 < base.2 + 16 * 1024,
        "RSS grew from {} KiB to {} KiB",
        base.2,
        after.2
    );
    // And a VM still connects (before, the leaked fds left none for it).
    let mut vm = Vm::connect(&d.dir.path().join("e0.sock"), VmOptions::default());
    assert_eq!(vm.flush(0), S_OK);
}

/// x-debug-panic exists in debug builds only (as the tests are built).
#[cfg(debug_assertions)]
#[test]
fn panicking_commands_get_an_error_and_free_their_client_slot() {
    // No backtraces: symbolising one maps the debug info (100 MB of RSS).
    let d = monitor_daemon(&[], &[("RUST_BACKTRACE", "0")]);
    let pid = d.pid();
    session(&d.socket).expect("first session");
    let base = settle(pid);
    // More than the 64 client slots, each on a connection of its own.
    for i in 0..100 {
        let mut c = Raw::negotiated(&d.socket);
        let r = c.send_text(r#"{"execute": "x-debug-panic", "id": 1}"#);
        assert_eq!(r["error"]["class"], "GenericError", "call {i}: {r}");
        assert_eq!(r["id"], 1, "call {i}: {r}");
        assert!(
            r["error"]["desc"]
                .as_str()
                .is_some_and(|s| s.contains("internal error")),
            "call {i}: {r}"
        );
        // The connection goes on after the panic.
        let r = c.cmd("query-version", json!({}));
        assert!(r.get("return").is_some(), "call {i}: {r}");
    }
    // The management locks the panics held are usable: commands that take
    // the graph and the export table still work, from a new client.
    let mut c = Raw::negotiated(&d.socket);
    let r = c.cmd(
        "blockdev-add",
        json!({"driver": "null-co", "node-name": "n0"}),
    );
    assert_eq!(r, json!({"return": {}}));
    let r = c.cmd("query-named-block-nodes", json!({}));
    assert_eq!(r["return"][0]["node-name"], "n0", "{r}");
    let r = c.cmd("query-block-exports", json!({}));
    assert_eq!(r, json!({"return": []}));
    drop(c);
    let after = settle(pid);
    eprintln!("100 panicking commands: (fds, threads, RSS KiB) {base:?} -> {after:?}");
    assert_eq!((after.0, after.1), (base.0, base.1), "fds and threads");
}

/// Whether the daemon closes `c` (EOF) before the 10 s read timeout.
fn closed_by_daemon(c: &mut Raw) -> bool {
    loop {
        match c.line() {
            Ok(None) => return true,
            Ok(Some(_)) => continue,
            Err(_) => return false,
        }
    }
}

#[test]
fn idle_clients_that_never_negotiate_cannot_lock_management_out() {
    let d = monitor_daemon(&[], &[]);
    // Every slot taken by clients that read the greeting and sit there.
    let mut idle: Vec<Raw> = (0..64)
        .map(|_| {
            let mut c = Raw::connect(&d.socket).expect("connect");
            assert!(c.value().get("QMP").is_some());
            c
        })
        .collect();
    // A new client still gets in, and takes the oldest idle one's slot
    // (the new ones stay connected: every slot stays taken).
    let mut admitted = Vec::new();
    for (i, old) in idle.iter_mut().take(3).enumerate() {
        let mut c = Raw::negotiated(&d.socket);
        let r = c.cmd("query-version", json!({}));
        assert!(r.get("return").is_some(), "client {i}: {r}");
        assert!(closed_by_daemon(old), "idle client {i} was not closed");
        admitted.push(c);
    }
    assert!(
        d.log()
            .contains("closed the oldest one that has not negotiated"),
        "{}",
        d.log()
    );
}

#[test]
fn a_client_must_negotiate_in_time_and_may_idle_after() {
    let d = monitor_daemon(&[], &[("VUB_QMP_NEGOTIATION_TIMEOUT_MS", "300")]);
    let mut silent = Raw::connect(&d.socket).expect("connect");
    assert!(silent.value().get("QMP").is_some());
    // Sends half a command, byte by byte, and never finishes it.
    let mut dripping = Raw::connect(&d.socket).expect("connect");
    assert!(dripping.value().get("QMP").is_some());
    let mut ok = Raw::negotiated(&d.socket);
    let partial = br#"{"execute": "qmp_capab"#;
    let mut dripped = 0;
    for b in partial {
        if dripping.r.get_mut().write_all(&[*b]).is_err() {
            break; // closed already
        }
        dripped += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(closed_by_daemon(&mut silent), "silent client not closed");
    assert!(
        closed_by_daemon(&mut dripping),
        "dripping client not closed ({dripped} bytes sent)"
    );
    // The negotiated client was idle as long, and is still served.
    let r = ok.cmd("query-version", json!({}));
    assert!(r.get("return").is_some(), "{r}");
    assert!(
        d.log().contains("no qmp_capabilities within"),
        "{}",
        d.log()
    );
}

#[test]
fn with_every_slot_negotiated_a_new_client_is_refused_until_one_leaves() {
    let d = monitor_daemon(&[], &[]);
    let mut held: Vec<Raw> = (0..64).map(|_| Raw::negotiated(&d.socket)).collect();
    let mut extra = Raw::connect(&d.socket).expect("connect");
    assert!(closed_by_daemon(&mut extra), "65th client was served");
    drop(held.pop());
    // The slot frees once the client's thread has seen the close.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut c = Raw::connect(&d.socket).expect("connect");
        if let Ok(Some(g)) = c.line() {
            assert!(g.contains("QMP"), "{g}");
            break;
        }
        assert!(Instant::now() < deadline, "no slot freed");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn duplicate_keys_are_refused_as_qemu_does() {
    let d = monitor_daemon(&[], &[]);
    let mut c = Raw::negotiated(&d.socket);
    let want =
        json!({"error": {"class": "GenericError", "desc": "JSON parse error, duplicate key"}});
    for text in [
        r#"{"execute": "query-version", "execute": "quit"}"#,
        r#"{"execute": "query-version", "id": 1, "id": 2}"#,
        r#"{"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "a", "node-name": "b"}}"#,
        r#"{"execute": "x", "arguments": {"a": [{"k": 1, "k": 1}]}}"#,
    ] {
        assert_eq!(c.send_text(text), want, "{text}");
    }
    // Nothing of those ran, and the connection goes on.
    let r = c.cmd("query-named-block-nodes", json!({}));
    assert_eq!(r, json!({"return": []}));
}

/// Runs the daemon with `args` until it exits (at most 10 s: one that runs
/// on is killed, and its code is None) and returns its code and stderr.
fn run_briefly(args: &[&str]) -> (Option<i32>, String) {
    let err = tempfile::NamedTempFile::new().unwrap();
    let mut child = std::process::Command::new(daemon_bin())
        .args(args)
        .stdin(std::process::Stdio::null())
        .stderr(err.reopen().unwrap())
        .spawn()
        .unwrap();
    let status = wait_timeout(&mut child, Duration::from_secs(10));
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let text = std::fs::read_to_string(err.path()).unwrap();
    (status.and_then(|s| s.code()), text)
}

/// Waits for `path` to hold a pid; returns it.
fn read_pidfile(path: &Path) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(pid) = std::fs::read_to_string(path)
            .ok()
            .and_then(|s| s.trim().parse().ok())
        {
            return pid;
        }
        assert!(Instant::now() < deadline, "pidfile never written");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn the_pidfile_write_follows_no_symlink() {
    let dir = tempfile::tempdir().unwrap();
    let victim = dir.path().join("victim");
    std::fs::write(&victim, b"precious\n").unwrap();
    // The temporary sibling the pidfile is written through, planted as a
    // symlink to another file.
    std::os::unix::fs::symlink(&victim, dir.path().join("d.tmp")).unwrap();
    let pidfile = dir.path().join("d.pid");
    let mut d = Daemon::start_in(
        dir,
        &[
            "--chardev",
            "socket,id=m0,path={sock},server=on,wait=off",
            "--monitor",
            "chardev=m0",
            "--pidfile",
            "{dir}/d.pid",
        ],
    );
    assert_eq!(read_pidfile(&pidfile), d.pid());
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious\n");
    assert!(
        std::fs::symlink_metadata(&pidfile).unwrap().is_file(),
        "the pidfile is a file of its own"
    );
    assert!(d.terminate().success());
    assert!(!pidfile.exists());
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious\n");

    // A symlink at the pidfile's own path is refused, not followed.
    let dir = tempfile::tempdir().unwrap();
    let victim = dir.path().join("victim");
    std::fs::write(&victim, b"precious\n").unwrap();
    let pidfile = dir.path().join("d.pid");
    std::os::unix::fs::symlink(&victim, &pidfile).unwrap();
    let mon = format!(
        "socket,id=m0,path={},server=on,wait=off",
        dir.path().join("m.sock").display()
    );
    let (code, err) = run_briefly(&[
        "--chardev",
        &mon,
        "--monitor",
        "chardev=m0",
        "--pidfile",
        pidfile.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("pidfile"), "{err}");
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious\n");
}

#[test]
fn a_second_instance_with_the_same_pidfile_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("d.pid");
    let other_sock = dir.path().join("other.sock");
    let mut first = Daemon::start_in(
        dir,
        &[
            "--chardev",
            "socket,id=m0,path={sock},server=on,wait=off",
            "--monitor",
            "chardev=m0",
            "--pidfile",
            "{dir}/d.pid",
        ],
    );
    assert_eq!(read_pidfile(&pidfile), first.pid());
    let mut second = std::process::Command::new(daemon_bin())
        .args([
            "--chardev",
            &format!(
                "socket,id=m0,path={},server=on,wait=off",
                other_sock.display()
            ),
            "--monitor",
            "chardev=m0",
            "--pidfile",
            pidfile.to_str().unwrap(),
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_timeout(&mut second, Duration::from_secs(10));
    if status.is_none() {
        let _ = second.kill();
        let _ = second.wait();
        panic!(
            "the second instance runs; pidfile now says {:?}",
            std::fs::read_to_string(&pidfile)
        );
    }
    let mut err = String::new();
    std::io::Read::read_to_string(&mut second.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.unwrap().code(), Some(1), "{err}");
    assert!(err.contains("Cannot lock pid file"), "{err}");
    assert!(first.alive(), "the first instance runs on");
    assert_eq!(read_pidfile(&pidfile), first.pid());
    Raw::negotiated(&first.socket);
    assert!(first.terminate().success());
    assert!(!pidfile.exists());
}

#[test]
fn block_export_add_refuses_the_socket_path_of_a_live_server() {
    let dir = tempfile::tempdir().unwrap();
    let e0 = dir.path().join("e0.sock");
    let foreign = dir.path().join("foreign.sock");
    let d = Daemon::start_in(
        dir,
        &[
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
        ],
    );
    let listener = std::os::unix::net::UnixListener::bind(&foreign).unwrap();
    let mut c = Raw::negotiated(&d.socket);
    for (id, path) in [("e1", &e0), ("e2", &foreign)] {
        let r = c.cmd(
            "block-export-add",
            json!({"type": "vhost-user-blk", "id": id, "node-name": "n1",
                   "addr": {"type": "unix", "path": path}}),
        );
        let desc = r["error"]["desc"].as_str().unwrap_or_default();
        assert!(desc.contains("a server is listening"), "{id}: {r}");
    }
    let r = c.cmd("query-block-exports", json!({}));
    assert_eq!(r["return"].as_array().map(Vec::len), Some(1), "{r}");
    // Both servers still own their paths.
    let mut vm = Vm::connect(&e0, VmOptions::default());
    assert_eq!(vm.flush(0), S_OK);
    drop(vm);
    let _probe = UnixStream::connect(&foreign).expect("foreign server still reachable");
    listener.set_nonblocking(true).unwrap();
    assert!(
        listener.accept().is_ok(),
        "foreign server got the connection"
    );
    // A stale socket (its server gone) is replaced.
    drop(listener);
    let r = c.cmd(
        "block-export-add",
        json!({"type": "vhost-user-blk", "id": "e2", "node-name": "n1",
               "addr": {"type": "unix", "path": foreign}}),
    );
    assert_eq!(r, json!({"return": {}}));
    let mut vm = Vm::connect(&foreign, VmOptions::default());
    assert_eq!(vm.flush(0), S_OK);
}

#[test]
fn start_up_refuses_export_and_monitor_paths_a_live_server_listens_on() {
    let dir = tempfile::tempdir().unwrap();
    let live = dir.path().join("live.sock");
    let listener = std::os::unix::net::UnixListener::bind(&live).unwrap();
    let export = format!(
        "vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path={}",
        live.display()
    );
    let monitor = format!("socket,id=m0,path={},server=on,wait=off", live.display());
    let cases: [&[&str]; 2] = [
        &[
            "--blockdev",
            "driver=null-co,node-name=n0",
            "--export",
            &export,
        ],
        &["--chardev", &monitor, "--monitor", "chardev=m0"],
    ];
    for args in cases {
        let (code, err) = run_briefly(args);
        assert_eq!(code, Some(1), "{args:?}: {err}");
        assert!(err.contains("a server is listening"), "{args:?}: {err}");
        let _probe = UnixStream::connect(&live).expect("the live server keeps its path");
    }
    // Two exports of one daemon on the same path: the second is refused.
    let dup = dir.path().join("dup.sock");
    let e = |id: &str, node: &str| {
        format!(
            "vhost-user-blk,id={id},node-name={node},addr.type=unix,addr.path={}",
            dup.display()
        )
    };
    let (e0, e1) = (e("e0", "n0"), e("e1", "n1"));
    let (code, err) = run_briefly(&[
        "--blockdev",
        "driver=null-co,node-name=n0",
        "--blockdev",
        "driver=null-co,node-name=n1",
        "--export",
        &e0,
        "--export",
        &e1,
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("e1") && err.contains("a server is listening"),
        "{err}"
    );
    // A dead server's socket file is replaced.
    drop(listener);
    let dir = tempfile::tempdir().unwrap();
    drop(std::os::unix::net::UnixListener::bind(dir.path().join("vub.sock")).unwrap());
    let d = Daemon::start_in(
        dir,
        &[
            "--blockdev",
            "driver=null-co,node-name=n0",
            "--export",
            "vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path={sock}",
        ],
    );
    let mut vm = Vm::connect(&d.socket, VmOptions::default());
    assert_eq!(vm.flush(0), S_OK);
}

/// A small tmpfs, lazily unmounted when dropped (the test runs as root).
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(at: std::path::PathBuf, size: &str) -> Tmpfs {
        std::fs::create_dir(&at).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&at)
            .output()
            .expect("mount");
        assert!(
            out.status.success(),
            "cannot mount a tmpfs (the test needs root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(at)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[test]
fn sigterm_with_writes_parked_on_a_full_disk_exits_at_once_and_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let small = Tmpfs::mount(dir.path().join("small"), "1M");
    let img = small.0.join("full.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let file = format!("driver=file,node-name=f0,filename={}", img.display());
    let mut d = Daemon::start_in(
        dir,
        &[
            "--blockdev",
            &file,
            "--blockdev",
            "driver=raw,node-name=d0,file=f0",
            "--export",
            "vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path={sock},\
             writable=on,on-write-error=stop",
        ],
    );
    let mut vm = Vm::connect(&d.socket, VmOptions::default());
    // 2 MiB of writes onto a 1 MiB file system: the last ones park.
    let len = 64 << 10;
    let mut statuses = Vec::new();
    for i in 0..32u64 {
        let h = vm.write_header(T_OUT, i * len / 512);
        let data = vm.alloc(len);
        let s = vm.status_buf();
        vm.queues[0].add_chain(
            &vm.mem,
            &[Desc::r(h, 16), Desc::r(data, len as u32), Desc::w(s, 1)],
        );
        statuses.push(s);
    }
    vm.queues[0].kick();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !d.log().contains("stopped after an I/O error") {
        assert!(Instant::now() < deadline, "no write parked:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut child = d.child.take().unwrap();
    // SAFETY: kill only takes a pid and a signal number.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    // The shutdown drain waits up to 30 s for requests in flight; parked
    // ones must not count.
    let status = wait_timeout(&mut child, Duration::from_secs(15));
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
        panic!("still running 15 s after SIGTERM:\n{}", d.log());
    }
    let status = status.unwrap();
    let log = d.log();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("parked write"), "{log}");
    let done = vm.queues[0].used_idx(&vm.mem);
    let failed = statuses
        .iter()
        .filter(|s| vm.status_at(**s) == S_IOERR)
        .count();
    assert!(failed >= 1, "{done} completed, none failed:\n{log}");
    assert!(
        log.contains(&format!("{failed} parked write")),
        "{failed} writes failed:\n{log}"
    );
}

#[test]
fn a_start_up_failure_leaves_no_pidfile_behind() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("d.pid");
    let sock = dir.path().join("s.sock");
    let export = format!(
        "vhost-user-blk,id=e0,node-name=missing,addr.type=unix,addr.path={}",
        sock.display()
    );
    let (code, err) = run_briefly(&[
        "--blockdev",
        "driver=null-co,node-name=n0",
        "--export",
        &export,
        "--pidfile",
        pidfile.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(!pidfile.exists(), "{err}");
}

#[test]
fn blockdev_add_of_an_image_that_broke_the_parser_never_costs_a_client_slot() {
    // issue 15: backing_file_offset = 2^64-1 made the header parser panic;
    // each such blockdev-add took a client slot for good, and after 64 the
    // monitor refused everyone. Whatever the parser answers now (a panic
    // caught, or a proper error), it answers, and the monitor serves on.
    let d = monitor_daemon(&[], &[("RUST_BACKTRACE", "0")]);
    let img = d.dir.path().join("bad.qcow2");
    common::client::qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "1M"]);
    let mut bytes = std::fs::read(&img).unwrap();
    bytes[8..16].copy_from_slice(&u64::MAX.to_be_bytes());
    bytes[16..20].copy_from_slice(&10u32.to_be_bytes());
    std::fs::write(&img, bytes).unwrap();
    session(&d.socket).expect("first session");
    let base = settle(d.pid());
    for i in 0..70 {
        let mut c = Raw::negotiated(&d.socket);
        let r = c.cmd(
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": format!("q{i}"),
                   "file": {"driver": "file", "filename": img}}),
        );
        assert_eq!(r["error"]["class"], "GenericError", "call {i}: {r}");
    }
    // Nothing of the failed opens stays: no node, no open file.
    let mut c = Raw::negotiated(&d.socket);
    let r = c.cmd("query-named-block-nodes", json!({}));
    assert_eq!(r, json!({"return": []}));
    drop(c);
    let after = settle(d.pid());
    assert_eq!((after.0, after.1), (base.0, base.1), "fds and threads");
    // At start-up, the same image is an error (exit 1), not a crash.
    let opts = format!(
        "driver=qcow2,node-name=q,file.driver=file,file.filename={}",
        img.display()
    );
    let mon = format!(
        "socket,id=m1,path={},server=on,wait=off",
        d.dir.path().join("m1.sock").display()
    );
    let (code, err) = run_briefly(&[
        "--blockdev",
        &opts,
        "--chardev",
        &mon,
        "--monitor",
        "chardev=m1",
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("node q") || err.contains("'q'"), "{err}");
}
