//! The NBD server against clients no one here wrote (qemu-img, nbdinfo,
//! nbdcopy, libnbd's Python bindings in tests/nbd/edge_cases.py) and
//! against qemu-storage-daemon 7.2 serving the same image; a raw-socket
//! client for what libnbd refuses to send; the QMP side (nbd-server-start/
//! stop, block-export-add/del type=nbd).

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{Daemon, Qmp};
use serde_json::json;

const MIB: u64 = 1 << 20;

fn sh(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// A 64 MiB qcow2: data at [0, 1M), a disabled bitmap bm0 (64 KiB
/// granules) marking [2M, +64K), [10M, +192K) and the zero cluster at
/// [20M, +64K), written after it was added.
fn test_image(dir: &Path) -> PathBuf {
    let img = dir.join("d.qcow2");
    sh("qemu-img", &["create", "-q", "-f", "qcow2", p(&img), "64M"]);
    sh(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x11 0 1M", p(&img)],
    );
    sh(
        "qemu-img",
        &["bitmap", "--add", "-g", "64k", p(&img), "bm0"],
    );
    sh(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x22 2M 64k",
            "-c",
            "write -P 0x33 10M 192k",
            "-c",
            "write -z 20M 64k",
            p(&img),
        ],
    );
    sh("qemu-img", &["bitmap", "--disable", p(&img), "bm0"]);
    img
}

fn nbd_args(img: &str, export: &str) -> Vec<String> {
    vec![
        "--blockdev".into(),
        format!("driver=file,node-name=f,filename={img}"),
        "--blockdev".into(),
        "driver=qcow2,node-name=d,file=f".into(),
        "--nbd-server".into(),
        "addr.type=unix,addr.path={sock}".into(),
        "--export".into(),
        format!("type=nbd,id=e0,node-name=d,{export}"),
    ]
}

fn start(dir: tempfile::TempDir, img: &Path, export: &str) -> Daemon {
    let args = nbd_args(p(img), export);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let d = Daemon::start_in(dir, &args);
    // Descriptor and thread baselines are taken once it is set up.
    d.wait_ready();
    d
}

fn uri(sock: &Path, name: &str) -> String {
    format!("nbd+unix:///{name}?socket={}", sock.display())
}

/// What each client prints of the export (the socket path made neutral).
fn views(sock: &Path) -> Vec<(String, String)> {
    let u = uri(sock, "disk");
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={},export=disk",
        sock.display()
    );
    let bitmap_opts = format!("{opts},x-dirty-bitmap=qemu:dirty-bitmap:bm0");
    let cases: Vec<(&str, Vec<&str>)> = vec![
        ("nbdinfo", vec![u.as_str()]),
        ("nbdinfo", vec!["--map", u.as_str()]),
        ("nbdinfo", vec!["--map=qemu:allocation-depth", u.as_str()]),
        ("nbdinfo", vec!["--map=qemu:dirty-bitmap:bm0", u.as_str()]),
        ("nbdinfo", vec!["--json", "--list", u.as_str()]),
        (
            "qemu-img",
            vec!["map", "--output=json", "--image-opts", opts.as_str()],
        ),
        (
            "qemu-img",
            vec!["map", "--output=json", "--image-opts", bitmap_opts.as_str()],
        ),
    ];
    cases
        .into_iter()
        .map(|(cmd, args)| {
            let out = sh(cmd, &args).replace(p(sock), "SOCKET");
            (format!("{cmd} {}", args[..args.len() - 1].join(" ")), out)
        })
        .collect()
}

#[test]
fn nbdinfo_and_qemu_img_map_see_what_qemu_storage_daemon_serves() {
    let dir = tempfile::tempdir().unwrap();
    let img = test_image(dir.path());
    let qdir = tempfile::tempdir().unwrap();
    let qimg = qdir.path().join("d.qcow2");
    std::fs::copy(&img, &qimg).unwrap();
    let export = "name=disk,description=a disk,bitmaps.0=bm0,allocation-depth=on";
    let ours = start(dir, &img, export);
    let args = nbd_args(p(&qimg), export);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let qsd = Daemon::start_bin("qemu-storage-daemon", qdir, &args, &[]);
    let a = views(&ours.socket);
    let b = views(&qsd.socket);
    for ((what, x), (_, y)) in a.iter().zip(&b) {
        assert_eq!(x, y, "{what}: ours, then qemu-storage-daemon's");
    }
    // The bitmap's dirty extents, as a backup client sees them.
    assert!(
        a[3].1.contains("2097152       65536    1  dirty")
            && a[3].1.contains("10485760      196608    1  dirty"),
        "{}",
        a[3].1
    );
}

#[test]
fn qemu_img_and_nbdcopy_read_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let img = test_image(dir.path());
    let raw = dir.path().join("ref.raw");
    sh("qemu-img", &["convert", "-O", "raw", p(&img), p(&raw)]);
    let d = start(dir, &img, "name=disk");
    let u = uri(&d.socket, "disk");
    sh("qemu-img", &["compare", "-f", "raw", p(&raw), &u]);
    let conv = d.dir.path().join("conv.raw");
    sh("qemu-img", &["convert", "-O", "raw", &u, p(&conv)]);
    sh("cmp", &[p(&raw), p(&conv)]);
    let copy = d.dir.path().join("copy.raw");
    sh("nbdcopy", &[&u, p(&copy)]);
    sh("cmp", &[p(&raw), p(&copy)]);
    // nbdcopy used several connections (multi-conn on a read-only export).
    let info = sh("nbdinfo", &[&u]);
    assert!(info.contains("can_multi_conn: true"), "{info}");
}

#[test]
fn writes_zeroes_trims_and_flushes_reach_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("w.raw");
    let want = dir.path().join("want.raw");
    let src = dir.path().join("src.raw");
    sh("qemu-img", &["create", "-q", "-f", "raw", p(&img), "16M"]);
    std::fs::write(&src, common::pattern(7, 16 << 20)).unwrap();
    let d = Daemon::start_in(
        dir,
        &[
            "--blockdev",
            &format!("driver=file,node-name=f,filename={},discard=unmap", p(&img)),
            "--blockdev",
            "driver=raw,node-name=d,file=f,discard=unmap",
            "--nbd-server",
            "addr.type=unix,addr.path={sock}",
            "--export",
            "type=nbd,id=e0,node-name=d,name=w,writable=on",
        ],
    );
    let u = uri(&d.socket, "w");
    let info = sh("nbdinfo", &[&u]);
    for f in [
        "is_read_only: false",
        "can_zero: true",
        "can_trim: true",
        "can_fua: true",
        // As QEMU 7.2: one BlockBackend for all connections, so a flush
        // on one covers the writes of all.
        "can_multi_conn: true",
    ] {
        assert!(info.contains(f), "{f}: {info}");
    }
    sh("nbdcopy", &[p(&src), &u]);
    let ops = [
        "write -z 1M 512k",
        "write -z -u 4M 1M",
        "discard 8M 64k",
        "write -P 0x5a -f 12M 4k",
        "flush",
    ];
    let mut args = vec!["-f", "raw"];
    for o in &ops {
        args.extend(["-c", o]);
    }
    let mut local = args.clone();
    args.push(&u);
    sh("qemu-io", &args);
    std::fs::copy(&src, &want).unwrap();
    local.push(p(&want));
    sh("qemu-io", &local);
    sh(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", p(&want), &u],
    );
}

// ---------------------------------------------------------------------------
// QMP

fn qmp_daemon(dir: tempfile::TempDir, img: &Path) -> (Daemon, Qmp) {
    let d = Daemon::start_in(
        dir,
        &[
            "--chardev",
            "socket,id=m,path={sock},server=on,wait=off",
            "--monitor",
            "chardev=m",
            "--blockdev",
            &format!("driver=file,node-name=f,filename={}", p(img)),
            "--blockdev",
            "driver=qcow2,node-name=d,file=f",
            // nbd-server-start on a TCP port the kernel picks.
            "--allow-tcp-bind",
            "0",
        ],
    );
    let q = Qmp::connect(&d.socket);
    (d, q)
}

fn ok(r: &serde_json::Value) {
    assert!(r.get("return").is_some(), "{r}");
}

fn err(r: &serde_json::Value) -> String {
    r["error"]["desc"]
        .as_str()
        .unwrap_or_else(|| panic!("expected an error: {r}"))
        .to_string()
}

#[test]
fn qmp_starts_and_stops_the_server_and_its_exports() {
    let dir = tempfile::tempdir().unwrap();
    let img = test_image(dir.path());
    let (d, mut q) = qmp_daemon(dir, &img);
    let sock = d.dir.path().join("nbd.sock");
    let export = json!({"type": "nbd", "id": "e0", "node-name": "d", "name": "disk",
                        "bitmaps": ["bm0"]});
    assert_eq!(
        err(&q.execute("block-export-add", export.clone())),
        "NBD server not running"
    );
    // QEMU's SocketAddressLegacy, as libvirt sends it.
    ok(&q.execute(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": p(&sock)}}}),
    ));
    assert_eq!(
        err(&q.execute(
            "nbd-server-start",
            json!({"addr": {"type": "unix", "data": {"path": p(&sock)}}})
        )),
        "NBD server already running"
    );
    ok(&q.execute("block-export-add", export.clone()));
    let r = q.execute("query-block-exports", json!({}));
    assert_eq!(r["return"][0]["type"], "nbd", "{r}");
    assert_eq!(r["return"][0]["node-name"], "d", "{r}");
    // The exported bitmap is busy: not removable meanwhile (QEMU's words).
    let busy = err(&q.execute(
        "block-dirty-bitmap-remove",
        json!({"node": "d", "name": "bm0"}),
    ));
    assert!(busy.contains("in use"), "{busy}");
    assert!(
        sh("nbdinfo", &["--list", &uri(&sock, "")]).contains("export=\"disk\""),
        "listed"
    );
    let bad = err(&q.execute(
        "block-export-add",
        json!({"type": "nbd", "id": "e1", "node-name": "d", "bitmaps": ["nope"]}),
    ));
    assert_eq!(bad, "Bitmap 'nope' is not found");
    ok(&q.execute("block-export-del", json!({"id": "e0"})));
    let ev = q.wait_event("BLOCK_EXPORT_DELETED", Duration::from_secs(10));
    assert_eq!(ev["data"]["id"], "e0", "{ev}");
    ok(&q.execute(
        "block-dirty-bitmap-remove",
        json!({"node": "d", "name": "bm0"}),
    ));
    ok(&q.execute(
        "block-export-add",
        json!({"type": "nbd", "id": "e2", "node-name": "d"}),
    ));
    ok(&q.execute("nbd-server-stop", json!({})));
    let ev = q.wait_event("BLOCK_EXPORT_DELETED", Duration::from_secs(10));
    assert_eq!(ev["data"]["id"], "e2", "{ev}");
    assert!(!sock.exists(), "socket file left behind");
    assert_eq!(
        err(&q.execute("nbd-server-stop", json!({}))),
        "NBD server not running"
    );
    // TCP, on a port the kernel picks.
    ok(&q.execute(
        "nbd-server-start",
        json!({"addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": "0"}}}),
    ));
    ok(&q.execute(
        "block-export-add",
        json!({"type": "nbd", "id": "e3", "node-name": "d"}),
    ));
    let addr = q.execute("x-nbd-server-query", json!({}));
    let addr = addr["return"]["addr"].as_str().unwrap().to_string();
    let info = sh("nbdinfo", &[&format!("nbd://{addr}/d")]);
    assert!(info.contains("export-size: 67108864"), "{info}");
    ok(&q.execute("nbd-server-stop", json!({})));
}

#[test]
fn max_connections_limits_the_clients() {
    let dir = tempfile::tempdir().unwrap();
    let img = test_image(dir.path());
    let args = [
        "--blockdev".to_string(),
        format!("driver=file,node-name=f,filename={}", p(&img)),
        "--blockdev".into(),
        "driver=qcow2,node-name=d,file=f".into(),
        "--nbd-server".into(),
        "addr.type=unix,addr.path={sock},max-connections=2".into(),
        "--export".into(),
        "type=nbd,id=e0,node-name=d,name=disk".into(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let d = Daemon::start_in(tempfile::tempdir().unwrap(), &args);
    let a = Raw::connect(&d.socket);
    let b = Raw::connect(&d.socket);
    // The third is closed before the greeting.
    let mut c = UnixStream::connect(&d.socket).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 8];
    assert_eq!(
        c.read(&mut buf).unwrap_or(0),
        0,
        "a third client was served"
    );
    drop((a, b));
    // Once they are gone, others are served again.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut s = UnixStream::connect(&d.socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        if s.read(&mut buf).unwrap_or(0) == 8 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never served again");
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------
// A raw client: what libnbd will not send.

const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
const REQ_MAGIC: u32 = 0x2560_9513;

struct Raw {
    s: UnixStream,
}

impl Raw {
    /// Connects and reads the greeting; sends the client flags
    /// (FIXED_NEWSTYLE | NO_ZEROES).
    fn connect(path: &Path) -> Raw {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut r = Raw { s };
        let mut g = [0u8; 18];
        r.s.read_exact(&mut g).unwrap();
        assert_eq!(&g[0..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        r.s.write_all(&3u32.to_be_bytes()).unwrap();
        r
    }

    fn opt(&mut self, opt: u32, data: &[u8]) {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.s.write_all(&b).unwrap();
    }

    /// One option reply: (option, type, payload).
    fn reply(&mut self) -> (u32, u32, Vec<u8>) {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(
            u64::from_be_bytes(h[0..8].try_into().unwrap()),
            0x3e889045565a9
        );
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut d = vec![0u8; len as usize];
        self.s.read_exact(&mut d).unwrap();
        (
            u32::from_be_bytes(h[8..12].try_into().unwrap()),
            u32::from_be_bytes(h[12..16].try_into().unwrap()),
            d,
        )
    }

    /// Replies up to the ACK or an error; the last one's type.
    fn final_reply(&mut self) -> u32 {
        loop {
            let (_, t, _) = self.reply();
            if t == 1 || t & (1 << 31) != 0 {
                return t;
            }
        }
    }

    fn go(&mut self, name: &str) {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&3u16.to_be_bytes());
        self.opt(7, &d);
        assert_eq!(self.final_reply(), 1, "GO refused");
    }

    fn request(&mut self, kind: u16, flags: u16, cookie: u64, off: u64, len: u32) {
        let mut b = REQ_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&off.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        self.s.write_all(&b).unwrap();
    }

    /// A simple reply: (error, cookie).
    fn simple(&mut self) -> (u32, u64) {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(u32::from_be_bytes(h[0..4].try_into().unwrap()), 0x67446698);
        (
            u32::from_be_bytes(h[4..8].try_into().unwrap()),
            u64::from_be_bytes(h[8..16].try_into().unwrap()),
        )
    }

    /// True when the server closed the connection.
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0) | Err(_))
    }
}

fn fds_of(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

fn threads_of(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .count()
}

/// Waits until `f` holds (a client's thread ends after its socket).
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(std::time::Instant::now() < deadline, "never: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn malformed_input_gets_the_protocol_error_or_a_closed_connection() {
    let dir = tempfile::tempdir().unwrap();
    let img = test_image(dir.path());
    let d = start(dir, &img, "name=disk");
    let sock = d.socket.clone();

    // Unknown client flags: closed without an option phase.
    let mut s = UnixStream::connect(&sock).unwrap();
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    s.write_all(&0x8000_0000u32.to_be_bytes()).unwrap();
    let mut r = Raw { s };
    assert!(r.closed(), "unknown client flags accepted");

    let mut r = Raw::connect(&sock);
    // Unknown option: NBD_REP_ERR_UNSUP, and the session goes on.
    r.opt(0x1234, b"junk");
    assert_eq!(r.final_reply(), (1 << 31) | 1);
    // LIST with data, INFO truncated: NBD_REP_ERR_INVALID.
    r.opt(3, b"x");
    assert_eq!(r.final_reply(), (1 << 31) | 3);
    r.opt(6, &[0, 0, 0, 9, b'd']);
    assert_eq!(r.final_reply(), (1 << 31) | 3);
    // A name longer than its option: invalid, not a read past the end.
    r.opt(7, &[0xff, 0xff, 0xff, 0xff]);
    assert_eq!(r.final_reply(), (1 << 31) | 3);
    // SET_META_CONTEXT before STRUCTURED_REPLY: invalid.
    let mut q = 4u32.to_be_bytes().to_vec();
    q.extend_from_slice(b"disk");
    q.extend_from_slice(&1u32.to_be_bytes());
    q.extend_from_slice(&15u32.to_be_bytes());
    q.extend_from_slice(b"base:allocation");
    r.opt(10, &q);
    assert_eq!(r.final_reply(), (1 << 31) | 3);
    // An unknown export: NBD_REP_ERR_UNKNOWN.
    let mut n = 4u32.to_be_bytes().to_vec();
    n.extend_from_slice(b"nope");
    n.extend_from_slice(&0u16.to_be_bytes());
    r.opt(7, &n);
    assert_eq!(r.final_reply(), (1 << 31) | 6);
    // A 100 KiB option: drained and refused as too big; still in step.
    r.opt(0x99, &vec![0u8; 100 << 10]);
    assert_eq!(r.final_reply(), (1 << 31) | 9);
    r.go("disk");
    // Transmission, simple replies.
    r.request(0, 0, 1, 0, 4096);
    let (e, c) = r.simple();
    assert_eq!((e, c), (0, 1));
    let mut data = vec![0u8; 4096];
    r.s.read_exact(&mut data).unwrap();
    assert!(data.iter().all(|&b| b == 0x11));
    // Out of bounds, past 2^64, a zero-length read, an unknown command,
    // unknown flags, block status without a context, a write to a
    // read-only export (payload consumed): each its error, in order.
    let size = 64 * MIB;
    r.request(0, 0, 2, size - 512, 1024);
    assert_eq!(r.simple(), (22, 2));
    r.request(0, 0, 3, u64::MAX - 10, 512);
    assert_eq!(r.simple(), (22, 3));
    r.request(0x77, 0, 4, 0, 512);
    assert_eq!(r.simple(), (22, 4));
    r.request(0, 0x4000, 5, 0, 512);
    assert_eq!(r.simple(), (22, 5));
    r.request(7, 0, 6, 0, 512);
    assert_eq!(r.simple(), (22, 6));
    r.request(1, 0, 7, 0, 8);
    r.s.write_all(b"12345678").unwrap();
    assert_eq!(r.simple(), (1, 7));
    // A read above the 32 MiB limit: EINVAL (simple replies), no data.
    r.request(0, 0, 8, 0, 33 << 20);
    assert_eq!(r.simple(), (22, 8));
    r.request(3, 0, 9, 0, 0);
    assert_eq!(r.simple(), (0, 9));
    // A bad request magic cannot be resynchronised: closed.
    r.s.write_all(&[0xde; 28]).unwrap();
    assert!(r.closed(), "bad request magic accepted");

    // A write over the limit is refused and the connection closed (its
    // payload is not read).
    let mut w = Raw::connect(&sock);
    w.go("disk");
    w.request(1, 0, 1, 0, 64 << 20);
    assert_eq!(w.simple(), (22, 1));
    assert!(w.closed());

    // A 4 GiB option: refused as too big, then closed.
    let mut o = Raw::connect(&sock);
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&0x99u32.to_be_bytes());
    b.extend_from_slice(&u32::MAX.to_be_bytes());
    o.s.write_all(&b).unwrap();
    assert_eq!(o.final_reply(), (1 << 31) | 9);
    assert!(o.closed());

    // Going away in the middle of a 32 MiB reply, many times.
    for i in 0..20 {
        let mut m = Raw::connect(&sock);
        m.go("disk");
        m.request(0, 0, i, 0, 32 << 20);
        let mut part = [0u8; 1000];
        m.s.read_exact(&mut part).unwrap();
        drop(m);
    }
    // The daemon still serves, and every client's descriptors and thread
    // are gone.
    let pid = d.pid();
    let (fds, threads) = (fds_of(pid), threads_of(pid));
    let raw = d.dir.path().join("ref.raw");
    sh(
        "qemu-img",
        &["convert", "-O", "raw", &uri(&sock, "disk"), p(&raw)],
    );
    eventually("descriptors back", || fds_of(pid) <= fds);
    eventually("threads back", || threads_of(pid) <= threads);
}

#[test]
fn a_thousand_connections_leave_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let img = test_image(dir.path());
    let d = start(dir, &img, "name=disk");
    let pid = d.pid();
    // One client first, so that lazily made things (thread stacks, the
    // allocator's arenas) exist before the baseline.
    Raw::connect(&d.socket).go("disk");
    eventually("first client gone", || threads_of(pid) <= 3 + 1);
    let (fds, threads) = (fds_of(pid), threads_of(pid));
    for i in 0..1000u64 {
        let mut r = Raw::connect(&d.socket);
        match i % 3 {
            0 => {
                r.opt(2, &[]); // ABORT
                let _ = r.closed();
            }
            1 => {
                r.go("disk");
                r.request(0, 0, i, (i % 64) * MIB, 512);
                assert_eq!(r.simple(), (0, i));
                let mut b = [0u8; 512];
                r.s.read_exact(&mut b).unwrap();
                r.request(2, 0, 0, 0, 0); // DISC
                assert!(r.closed());
            }
            _ => drop(r), // gone in the handshake
        }
    }
    eventually("descriptors back", || fds_of(pid) <= fds);
    eventually("threads back", || threads_of(pid) <= threads);
    println!(
        "1000 connections: fds {} -> {}, threads {} -> {}",
        fds,
        fds_of(pid),
        threads,
        threads_of(pid)
    );
}

#[test]
fn libnbd_edge_cases() {
    let dir = tempfile::tempdir().unwrap();
    let img = test_image(dir.path());
    let rw = dir.path().join("rw.qcow2");
    sh("qemu-img", &["create", "-q", "-f", "qcow2", p(&rw), "64M"]);
    let d = Daemon::start_in(
        dir,
        &[
            "--blockdev",
            &format!("driver=file,node-name=f,filename={}", p(&img)),
            "--blockdev",
            "driver=qcow2,node-name=d,file=f",
            "--nbd-server",
            "addr.type=unix,addr.path={sock}",
            "--export",
            "type=nbd,id=e0,node-name=d,name=disk,bitmaps.0=bm0,allocation-depth=on",
            "--blockdev",
            &format!("driver=file,node-name=rf,filename={}", p(&rw)),
            "--blockdev",
            "driver=qcow2,node-name=n,file=rf",
            "--export",
            "type=nbd,id=e1,node-name=n,name=rw,writable=on",
        ],
    );
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/nbd/edge_cases.py");
    let out = Command::new("/usr/bin/python3")
        .args([script, p(&d.socket)])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}");
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---------------------------------------------------------------------------
// TLS

/// A CA, a server certificate (localhost, 127.0.0.1) and a client one,
/// laid out as QEMU's tls-creds-x509 wants: `srv/` (ca-cert.pem,
/// server-cert.pem, server-key.pem), `cli/` (ca-cert.pem, client-cert.pem,
/// client-key.pem); `other/` has a client of another CA.
fn make_certs(dir: &Path) {
    let script = r#"
set -e
ca() {
  openssl req -x509 -newkey rsa:2048 -nodes -keyout $1-key.pem -out $1-cert.pem -days 2 \
    -subj "/CN=$1" -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
}
leaf() { # ca name cn ext
  openssl req -newkey rsa:2048 -nodes -keyout $2-key.pem -out $2.csr -subj "/CN=$3" 2>/dev/null
  printf "$4" > $2.ext
  openssl x509 -req -in $2.csr -CA $1-cert.pem -CAkey $1-key.pem -CAcreateserial \
    -out $2-cert.pem -days 2 -extfile $2.ext 2>/dev/null
}
ca ca; ca ca2
leaf ca server localhost "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n"
leaf ca client client "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n"
leaf ca2 client2 client "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n"
mkdir -p srv cli other nocert
cp ca-cert.pem server-cert.pem server-key.pem srv/
cp ca-cert.pem client-cert.pem client-key.pem cli/
cp ca-cert.pem other/ && cp client2-cert.pem other/client-cert.pem && cp client2-key.pem other/client-key.pem
cp ca-cert.pem nocert/
"#;
    let out = Command::new("bash")
        .args(["-c", script])
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn fails(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(!out.status.success(), "{cmd} {args:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn tls_with_qemu_img_and_nbdinfo() {
    let dir = tempfile::tempdir().unwrap();
    let d0 = dir.path().to_path_buf();
    make_certs(&d0);
    let img = test_image(&d0);
    let raw = d0.join("ref.raw");
    sh("qemu-img", &["convert", "-O", "raw", p(&img), p(&raw)]);
    let srv = d0.join("srv");
    let d = Daemon::start_in(
        dir,
        &[
            "--chardev",
            "socket,id=m,path={sock},server=on,wait=off",
            "--monitor",
            "chardev=m",
            "--object",
            &format!("tls-creds-x509,id=tls0,dir={},endpoint=server", p(&srv)),
            "--blockdev",
            &format!("driver=file,node-name=f,filename={}", p(&img)),
            "--blockdev",
            "driver=qcow2,node-name=d,file=f",
            "--allow-tcp-bind",
            "0",
        ],
    );
    let mut q = Qmp::connect(&d.socket);
    assert_eq!(
        err(&q.execute(
            "nbd-server-start",
            json!({"addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": "0"}},
                   "tls-creds": "nope"})
        )),
        "No TLS credentials with id 'nope'"
    );
    ok(&q.execute(
        "nbd-server-start",
        json!({"addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": "0"}},
               "tls-creds": "tls0"}),
    ));
    ok(&q.execute(
        "block-export-add",
        json!({"type": "nbd", "id": "e0", "node-name": "d", "name": "disk",
               "bitmaps": ["bm0"]}),
    ));
    let addr = q.execute("x-nbd-server-query", json!({}));
    let addr = addr["return"]["addr"].as_str().unwrap().to_string();
    let port = addr.rsplit(':').next().unwrap().to_string();
    let tls_uri = |certs: &str| {
        format!(
            "nbds://127.0.0.1:{port}/disk?tls-certificates={}",
            d0.join(certs).display()
        )
    };
    // nbdinfo (libnbd, GnuTLS) with the client certificate.
    let info = sh("nbdinfo", &[&tls_uri("cli")]);
    assert!(info.contains("with TLS"), "{info}");
    let map = sh("nbdinfo", &["--map=qemu:dirty-bitmap:bm0", &tls_uri("cli")]);
    assert!(map.contains("2097152       65536    1  dirty"), "{map}");
    // qemu-img (QEMU's GnuTLS client) compares the image through TLS.
    let opts = format!(
        "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},export=disk,tls-creds=t"
    );
    let object = format!(
        "tls-creds-x509,id=t,dir={},endpoint=client",
        d0.join("cli").display()
    );
    let reference = format!("driver=raw,file.driver=file,file.filename={}", p(&raw));
    sh(
        "qemu-img",
        &[
            "compare",
            "--object",
            &object,
            "--image-opts",
            &opts,
            &reference,
        ],
    );
    // Without TLS, a certificate of another CA, or no certificate while
    // the server verifies its peers: refused.
    let plain = fails("nbdinfo", &[&format!("nbd://127.0.0.1:{port}/disk")]);
    assert!(!plain.is_empty());
    fails("nbdinfo", &[&tls_uri("other")]);
    fails("nbdinfo", &[&tls_uri("nocert")]);
    // The daemon survived all of it and still serves.
    sh("nbdinfo", &[&tls_uri("cli")]);
    ok(&q.execute("nbd-server-stop", json!({})));
}

#[test]
fn sigterm_with_clients_connected_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let img = test_image(dir.path());
    let mut d = start(dir, &img, "name=disk");
    // One client in transmission, one in the handshake, one that only
    // connected: none of them holds the daemon up.
    let mut a = Raw::connect(&d.socket);
    a.go("disk");
    a.request(0, 0, 1, 0, 4096);
    assert_eq!(a.simple(), (0, 1));
    let mut b4096 = [0u8; 4096];
    a.s.read_exact(&mut b4096).unwrap();
    let _b = Raw::connect(&d.socket);
    let _c = UnixStream::connect(&d.socket).unwrap();
    let st = d.terminate();
    assert!(st.success(), "{st}");
    assert!(a.closed());
}

#[test]
fn nbd_server_start_over_tcp_needs_allow_tcp_bind() {
    // Without --allow-tcp-bind the monitor's filter has no TCP socket: the
    // command is refused with a message before any call (the call would
    // kill the daemon).
    let d = Daemon::start(&[
        "--chardev",
        "socket,id=m,path={sock},server=on,wait=off",
        "--monitor",
        "chardev=m",
    ]);
    let mut q = Qmp::connect(&d.socket);
    let e = err(&q.execute(
        "nbd-server-start",
        json!({"addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": "0"}}}),
    ));
    assert!(e.contains("--allow-tcp-bind"), "{e}");
    // A UNIX socket is fine.
    let sock = d.dir.path().join("nbd.sock");
    ok(&q.execute(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "path": p(&sock)}}),
    ));
    ok(&q.execute("nbd-server-stop", json!({})));
}
