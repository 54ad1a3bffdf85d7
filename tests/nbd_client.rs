//! The `nbd` client driver against real NBD servers (qemu-nbd, nbdkit)
//! and a misbehaving one written here: requests from a vhost-user
//! frontend, blockdev-add over QMP, a backup job that skips holes,
//! reconnection after the server went away, and every broken reply an
//! I/O error rather than a hang or a crash.
//!
//! ```text
//!   test Vm --vhost-user--> daemon [nbd node] --NBD (unix|tcp)--> qemu-nbd / nbdkit / fake
//! ```

mod common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use vhost_user_blkd::nbd::proto;

const MIB: u64 = 1 << 20;

/// A server process, killed when dropped.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn tcp_listening(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

/// qemu-nbd serving `img` (raw) on a UNIX socket, persistent (-t).
fn qemu_nbd_unix(img: &Path, sock: &Path) -> Server {
    let _ = std::fs::remove_file(sock);
    let c = Command::new("qemu-nbd")
        .args(["-f", "raw", "-t", "--discard=unmap", "-k"])
        .arg(sock)
        .arg(img)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-nbd (apt-get install qemu-utils)");
    let s = Server(c);
    wait_for("qemu-nbd's socket", || UnixStream::connect(sock).is_ok());
    s
}

/// qemu-nbd on 127.0.0.1:`port`.
fn qemu_nbd_tcp(img: &Path, port: u16) -> Server {
    let c = Command::new("qemu-nbd")
        .args([
            "-f",
            "raw",
            "-t",
            "-b",
            "127.0.0.1",
            "-p",
            &port.to_string(),
        ])
        .arg(img)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-nbd");
    let s = Server(c);
    wait_for("qemu-nbd's port", || tcp_listening(port));
    s
}

/// A TCP port nobody listens on now.
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

fn raw_image(dir: &Path, size: u64) -> PathBuf {
    let img = dir.join("disk.img");
    std::fs::File::create(&img).unwrap().set_len(size).unwrap();
    img
}

fn export_arg(node: &str) -> String {
    format!("type=vhost-user-blk,id=e0,node-name={node},addr.type=unix,addr.path={{sock}},writable=on,num-queues=1")
}

#[test]
fn qemu_nbd_over_unix_serves_reads_writes_flush_trim_and_zeroes() {
    let dir = tempfile::tempdir().unwrap();
    let img = raw_image(dir.path(), 16 * MIB);
    let data = pattern(1, 64 * 1024);
    write_file_at(&img, MIB, &data);
    let nbd_sock = dir.path().join("nbd.sock");
    let _srv = qemu_nbd_unix(&img, &nbd_sock);
    let d = Daemon::start_in(
        dir,
        &[
            "--blockdev",
            "driver=nbd,node-name=n0,server.type=unix,server.path={dir}/nbd.sock,discard=unmap",
            "--export",
            &export_arg("n0"),
        ],
    );
    let mut vm = Vm::connect(&d.socket, VmOptions::default());
    assert_eq!(vm.capacity_sectors(), 16 * MIB / 512);
    // Data written before the server started comes back.
    let (st, got) = vm.read(0, MIB / 512, 64 * 1024);
    assert_eq!(st, S_OK);
    assert!(got == data, "read through nbd differs from the image");
    // A write reaches the image; a large one is split at the max payload
    // (qemu-nbd: 32 MiB) only if needed, and reads back.
    let w = pattern(2, 256 * 1024);
    assert_eq!(vm.write(0, 4 * MIB / 512, &w), S_OK);
    assert_eq!(vm.flush(0), S_OK);
    assert!(
        read_file_at(&img, 4 * MIB, w.len()) == w,
        "write not in the image"
    );
    let (st, got) = vm.read(0, 4 * MIB / 512, w.len() as u32);
    assert_eq!(st, S_OK);
    assert!(got == w);
    // Write-zeroes and discard.
    assert_eq!(
        vm.ranges(0, T_WRITE_ZEROES, &[(4 * MIB / 512, 64, 0)]),
        S_OK
    );
    assert!(read_file_at(&img, 4 * MIB, 32 * 1024)
        .iter()
        .all(|&b| b == 0));
    assert!(read_file_at(&img, 4 * MIB + 32 * 1024, 16) == w[32 * 1024..32 * 1024 + 16]);
    assert_eq!(vm.ranges(0, T_DISCARD, &[(4 * MIB / 512, 512, 0)]), S_OK);
    assert!(read_file_at(&img, 4 * MIB, 256 * 1024)
        .iter()
        .all(|&b| b == 0));
    let log = d.log();
    assert!(log.contains("structured replies"), "{log}");
}

#[test]
fn nbdkit_over_tcp_with_multi_conn() {
    let port = free_port();
    let c = Command::new("nbdkit")
        .args([
            "-f",
            "-i",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "memory",
            "32M",
        ])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nbdkit (scripts/guest/install-deps.sh installs it)");
    let _srv = Server(c);
    wait_for("nbdkit", || tcp_listening(port));
    let d = Daemon::start(&[
        "--blockdev",
        &format!(
            "driver=nbd,node-name=n0,server.type=inet,server.host=127.0.0.1,server.port={port}"
        ),
        "--export",
        &export_arg("n0"),
    ]);
    let log = d.log();
    // nbdkit's memory plugin sets CAN_MULTI_CONN.
    assert!(log.contains("2 connection(s)"), "{log}");
    let mut vm = Vm::connect(&d.socket, VmOptions::default());
    assert_eq!(vm.capacity_sectors(), 32 * MIB / 512);
    // Requests alternate between the connections; what one wrote the
    // other reads.
    for i in 0..8u64 {
        let w = pattern(10 + i, 8192);
        assert_eq!(vm.write(0, i * 64, &w), S_OK);
        assert_eq!(vm.flush(0), S_OK);
        let (st, got) = vm.read(0, i * 64, 8192);
        assert_eq!(st, S_OK);
        assert!(got == w, "round {i}");
    }
    // An unwritten area reads as zeroes (OFFSET_HOLE chunks).
    let (st, got) = vm.read(0, 16 * MIB / 512, 65536);
    assert_eq!(st, S_OK);
    assert!(got.iter().all(|&b| b == 0));
}

fn qmp_daemon(extra: &[&str]) -> (Daemon, Qmp) {
    let mut args = vec![
        "--chardev",
        "socket,id=m,path={dir}/qmp.sock,server=on,wait=off",
        "--monitor",
        "chardev=m",
    ];
    args.extend_from_slice(extra);
    let dir = tempfile::tempdir().unwrap();
    let qmp_path = dir.path().join("qmp.sock");
    // No export: wait for the monitor's socket instead.
    let d = Daemon::start_in(dir, &args_with_dummy_export(&args));
    wait_for("QMP", || listening(&qmp_path));
    let q = Qmp::connect(&qmp_path);
    (d, q)
}

/// Daemon::start waits for the export socket: give it a null one.
fn args_with_dummy_export<'a>(args: &[&'a str]) -> Vec<&'a str> {
    let mut v = args.to_vec();
    v.extend_from_slice(&[
        "--blockdev",
        "driver=null-co,node-name=dummy,size=1M",
        "--export",
        "type=vhost-user-blk,id=dummy,node-name=dummy,addr.type=unix,addr.path={sock}",
    ]);
    v
}

#[test]
fn blockdev_add_over_tcp_and_a_backup_that_skips_holes() {
    let srv_dir = tempfile::tempdir().unwrap();
    let img = raw_image(srv_dir.path(), 64 * MIB);
    write_file_at(&img, 8 * MIB, &pattern(3, MIB as usize));
    let port = free_port();
    let _srv = qemu_nbd_tcp(&img, port);
    let allow = port.to_string();

    // Without --allow-connect the sandbox refuses the port, and says how.
    let (_d0, mut q0) = qmp_daemon(&[]);
    let r = q0.execute(
        "blockdev-add",
        json!({"driver": "nbd", "node-name": "n0",
               "server": {"type": "inet", "host": "127.0.0.1", "port": allow}}),
    );
    let desc = r["error"]["desc"].as_str().unwrap_or_default().to_string();
    assert!(desc.contains("--allow-connect"), "{r}");

    let (d, mut q) = qmp_daemon(&["--allow-connect", &allow]);
    // A host name is refused (resolving it killed the daemon: glibc's
    // getaddrinfo calls uname, which the monitor may not).
    let r = q.execute(
        "blockdev-add",
        json!({"driver": "nbd", "node-name": "n0",
               "server": {"type": "inet", "host": "localhost", "port": allow}}),
    );
    let desc = r["error"]["desc"].as_str().unwrap_or_default().to_string();
    assert!(desc.contains("is not an IP address"), "{r}");
    let r = q.execute(
        "blockdev-add",
        json!({"driver": "nbd", "node-name": "n0", "read-only": true,
               "server": {"type": "inet", "host": "127.0.0.1", "port": allow}}),
    );
    assert!(r.get("return").is_some(), "{r}");
    let r = q.execute("query-named-block-nodes", json!({}));
    let n0 = r["return"]
        .as_array()
        .and_then(|a| a.iter().find(|n| n["node-name"] == "n0"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(n0["drv"], "nbd", "{r}");
    assert_eq!(n0["file"], format!("nbd://127.0.0.1:{port}"), "{n0}");
    assert_eq!(n0["ro"], true, "{n0}");
    let target = d.dir.path().join("target.img");
    std::fs::File::create(&target)
        .unwrap()
        .set_len(64 * MIB)
        .unwrap();
    let r = q.execute(
        "blockdev-add",
        json!({"driver": "file", "node-name": "t0", "filename": target, "discard": "unmap"}),
    );
    assert!(r.get("return").is_some(), "{r}");
    let r = q.execute(
        "blockdev-backup",
        json!({"job-id": "j", "device": "n0", "target": "t0", "sync": "full"}),
    );
    assert!(r.get("return").is_some(), "{r}");
    let ev = q.wait_event_of(&["BLOCK_JOB_COMPLETED"], Duration::from_secs(60));
    assert!(ev["data"].get("error").is_none(), "{ev}");
    assert!(read_file_at(&target, 8 * MIB, MIB as usize) == pattern(3, MIB as usize));
    // Only the data was copied: the target stays sparse (64 MiB of reads
    // and writes without block status).
    use std::os::unix::fs::MetadataExt;
    let allocated = std::fs::metadata(&target).unwrap().blocks() * 512;
    assert!(
        allocated <= 4 * MIB,
        "{allocated} bytes allocated in the backup target: holes were copied"
    );
}

// --- A misbehaving server -------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq)]
enum Misbehave {
    /// A correct server (with structured replies).
    None,
    /// Refuses STRUCTURED_REPLY: simple replies with the data.
    NoStructured,
    /// Refuses GO: the client falls back to EXPORT_NAME.
    NoGo,
    /// A read's data chunk covers only half of it (DONE set).
    ShortRead,
    /// Two chunks carry the first half; the second half is never sent.
    OverlappingChunks,
    /// A read's reply carries a cookie never sent.
    WrongCookie,
    /// A read gets an ERROR chunk.
    ErrorChunk,
    /// Half a read's data, then the connection closes.
    DisconnectMidReply,
    /// A chunk header with an absurd length.
    HugeChunk,
    /// Block size constraints (min 4096, max payload 64 KiB), and EINVAL
    /// for any request that breaks them.
    BlockSizes,
    /// Has base:allocation, but every BLOCK_STATUS gets an error chunk.
    BlockStatusError,
}

const FAKE_SIZE: u64 = 4 * MIB;

fn rd(s: &mut UnixStream, n: usize) -> Option<Vec<u8>> {
    let mut b = vec![0u8; n];
    s.read_exact(&mut b).ok()?;
    Some(b)
}

fn opt_reply(s: &mut UnixStream, opt: u32, typ: u32, data: &[u8]) {
    let h = proto::OptionReply {
        option: opt,
        typ,
        length: data.len() as u32,
    };
    s.write_all(&h.encode()).unwrap();
    s.write_all(data).unwrap();
}

/// Serves one connection; returns when the client goes or the
/// misbehaviour ended it.
fn fake_conn(mut s: UnixStream, m: Misbehave, disk: &mut [u8]) -> Option<()> {
    s.write_all(&proto::NBDMAGIC.to_be_bytes()).ok()?;
    s.write_all(&proto::IHAVEOPT.to_be_bytes()).ok()?;
    s.write_all(&(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES).to_be_bytes())
        .ok()?;
    rd(&mut s, 4)?;
    let flags = proto::FLAG_HAS_FLAGS | proto::FLAG_SEND_FLUSH;
    let mut structured = false;
    loop {
        let h = rd(&mut s, 16)?;
        let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let len = u32::from_be_bytes(h[12..16].try_into().unwrap()) as usize;
        let _data = rd(&mut s, len)?;
        match opt {
            proto::OPT_STRUCTURED_REPLY if m != Misbehave::NoStructured => {
                structured = true;
                opt_reply(&mut s, opt, proto::REP_ACK, &[]);
            }
            proto::OPT_GO if m != Misbehave::NoGo => {
                let mut info = vec![0, 0];
                info.extend_from_slice(&FAKE_SIZE.to_be_bytes());
                info.extend_from_slice(&flags.to_be_bytes());
                opt_reply(&mut s, opt, proto::REP_INFO, &info);
                if m == Misbehave::BlockSizes {
                    let mut bs = vec![0, 3];
                    for v in [4096u32, 4096, 65536] {
                        bs.extend_from_slice(&v.to_be_bytes());
                    }
                    opt_reply(&mut s, opt, proto::REP_INFO, &bs);
                }
                opt_reply(&mut s, opt, proto::REP_ACK, &[]);
                break;
            }
            proto::OPT_SET_META_CONTEXT if m == Misbehave::BlockStatusError => {
                let mut mc = 1u32.to_be_bytes().to_vec();
                mc.extend_from_slice(proto::CONTEXT_BASE_ALLOCATION.as_bytes());
                opt_reply(&mut s, opt, proto::REP_META_CONTEXT, &mc);
                opt_reply(&mut s, opt, proto::REP_ACK, &[]);
            }
            proto::OPT_EXPORT_NAME => {
                s.write_all(&FAKE_SIZE.to_be_bytes()).ok()?;
                s.write_all(&flags.to_be_bytes()).ok()?;
                break;
            }
            _ => opt_reply(&mut s, opt, proto::REP_ERR_UNSUP, &[]),
        }
    }
    loop {
        let r = proto::Request::decode(&rd(&mut s, proto::REQUEST_LEN)?).ok()?;
        let (off, len) = (r.offset as usize, r.length as usize);
        if m == Misbehave::BlockSizes
            && (r.typ == proto::CMD_READ || r.typ == proto::CMD_WRITE)
            && (off % 4096 != 0 || len % 4096 != 0 || len > 65536)
        {
            if r.typ == proto::CMD_WRITE {
                rd(&mut s, len)?;
            }
            let h = proto::ReplyHeader::Simple {
                error: proto::EINVAL,
                cookie: r.cookie,
            };
            s.write_all(&h.encode()).ok()?;
            continue;
        }
        match r.typ {
            proto::CMD_WRITE => {
                let d = rd(&mut s, len)?;
                disk[off..off + len].copy_from_slice(&d);
                let h = proto::ReplyHeader::Simple {
                    error: 0,
                    cookie: r.cookie,
                };
                s.write_all(&h.encode()).ok()?;
            }
            proto::CMD_READ => {
                let data = disk[off..off + len].to_vec();
                let chunk = |flags, typ, length| {
                    proto::ReplyHeader::Chunk {
                        flags,
                        typ,
                        cookie: r.cookie,
                        length,
                    }
                    .encode()
                };
                match m {
                    Misbehave::None
                    | Misbehave::NoGo
                    | Misbehave::BlockSizes
                    | Misbehave::BlockStatusError
                        if structured =>
                    {
                        s.write_all(&chunk(
                            proto::REPLY_FLAG_DONE,
                            proto::REPLY_TYPE_OFFSET_DATA,
                            len as u32 + 8,
                        ))
                        .ok()?;
                        s.write_all(&r.offset.to_be_bytes()).ok()?;
                        s.write_all(&data).ok()?;
                    }
                    Misbehave::ShortRead => {
                        let half = len / 2;
                        s.write_all(&chunk(
                            proto::REPLY_FLAG_DONE,
                            proto::REPLY_TYPE_OFFSET_DATA,
                            half as u32 + 8,
                        ))
                        .ok()?;
                        s.write_all(&r.offset.to_be_bytes()).ok()?;
                        s.write_all(&data[..half]).ok()?;
                    }
                    Misbehave::OverlappingChunks => {
                        let half = len / 2;
                        for flags in [0, proto::REPLY_FLAG_DONE] {
                            s.write_all(&chunk(
                                flags,
                                proto::REPLY_TYPE_OFFSET_DATA,
                                half as u32 + 8,
                            ))
                            .ok()?;
                            s.write_all(&r.offset.to_be_bytes()).ok()?;
                            s.write_all(&data[..half]).ok()?;
                        }
                    }
                    Misbehave::WrongCookie => {
                        let h = proto::ReplyHeader::Simple {
                            error: 0,
                            cookie: r.cookie ^ 0x5555,
                        };
                        s.write_all(&h.encode()).ok()?;
                    }
                    Misbehave::ErrorChunk => {
                        let e = proto::encode_error_chunk(proto::EIO, "injected");
                        s.write_all(&chunk(
                            proto::REPLY_FLAG_DONE,
                            proto::REPLY_TYPE_ERROR,
                            e.len() as u32,
                        ))
                        .ok()?;
                        s.write_all(&e).ok()?;
                    }
                    Misbehave::DisconnectMidReply => {
                        s.write_all(&chunk(
                            proto::REPLY_FLAG_DONE,
                            proto::REPLY_TYPE_OFFSET_DATA,
                            len as u32 + 8,
                        ))
                        .ok()?;
                        s.write_all(&r.offset.to_be_bytes()).ok()?;
                        s.write_all(&data[..len / 2]).ok()?;
                        return None;
                    }
                    Misbehave::HugeChunk => {
                        s.write_all(&chunk(
                            proto::REPLY_FLAG_DONE,
                            proto::REPLY_TYPE_OFFSET_DATA,
                            u32::MAX,
                        ))
                        .ok()?;
                    }
                    _ => {
                        // Simple reply, data after it.
                        let h = proto::ReplyHeader::Simple {
                            error: 0,
                            cookie: r.cookie,
                        };
                        s.write_all(&h.encode()).ok()?;
                        s.write_all(&data).ok()?;
                    }
                }
            }
            proto::CMD_BLOCK_STATUS => {
                let e = proto::encode_error_chunk(proto::EINVAL, "no block status today");
                let h = proto::ReplyHeader::Chunk {
                    flags: proto::REPLY_FLAG_DONE,
                    typ: proto::REPLY_TYPE_ERROR,
                    cookie: r.cookie,
                    length: e.len() as u32,
                };
                s.write_all(&h.encode()).ok()?;
                s.write_all(&e).ok()?;
            }
            proto::CMD_DISC => return Some(()),
            _ => {
                let h = proto::ReplyHeader::Simple {
                    error: 0,
                    cookie: r.cookie,
                };
                s.write_all(&h.encode()).ok()?;
            }
        }
    }
}

/// A fake server on `sock`, one connection after another; its disk
/// starts with pattern(7).
fn fake_server(sock: PathBuf, m: Misbehave) {
    let l = UnixListener::bind(&sock).unwrap();
    std::thread::spawn(move || {
        let mut disk = pattern(7, FAKE_SIZE as usize);
        for c in l.incoming() {
            let Ok(c) = c else { return };
            let _ = fake_conn(c, m, &mut disk);
        }
    });
}

/// A daemon whose export's node is an nbd client of a fake server.
fn against_fake(m: Misbehave) -> (Daemon, Vm) {
    against_fake_with(m, "")
}

fn against_fake_with(m: Misbehave, export_extra: &str) -> (Daemon, Vm) {
    let dir = tempfile::tempdir().unwrap();
    fake_server(dir.path().join("fake.sock"), m);
    let d = Daemon::start_in(
        dir,
        &[
            "--blockdev",
            "driver=nbd,node-name=n0,server.type=unix,server.path={dir}/fake.sock",
            "--export",
            &format!("{}{export_extra}", export_arg("n0")),
        ],
    );
    let vm = Vm::connect(&d.socket, VmOptions::default());
    (d, vm)
}

#[test]
fn servers_without_structured_replies_or_go_still_serve() {
    let want = pattern(7, FAKE_SIZE as usize);
    for m in [Misbehave::None, Misbehave::NoStructured, Misbehave::NoGo] {
        let (mut d, mut vm) = against_fake(m);
        assert_eq!(vm.capacity_sectors(), FAKE_SIZE / 512, "{m:?}");
        let (st, got) = vm.read(0, 8, 8192);
        assert_eq!(st, S_OK, "{m:?}: {}", d.log());
        assert!(got[..] == want[4096..4096 + 8192], "{m:?}: wrong data");
        let w = pattern(8, 4096);
        assert_eq!(vm.write(0, 100, &w), S_OK, "{m:?}");
        let (st, got) = vm.read(0, 100, 4096);
        assert_eq!(st, S_OK);
        assert!(got == w, "{m:?}");
        assert!(d.alive());
    }
}

#[test]
fn broken_replies_are_io_errors_not_hangs_or_crashes() {
    for m in [
        Misbehave::ShortRead,
        Misbehave::OverlappingChunks,
        Misbehave::WrongCookie,
        Misbehave::ErrorChunk,
        Misbehave::DisconnectMidReply,
        Misbehave::HugeChunk,
    ] {
        let (mut d, mut vm) = against_fake(m);
        let (st, _) = vm.read(0, 8, 8192);
        assert_eq!(st, S_IOERR, "{m:?}: {}", d.log());
        // The daemon lives on; writes still go (after a reconnection
        // where the reply broke the connection).
        assert!(d.alive(), "{m:?}");
        let w = pattern(9, 4096);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let st = vm.write(0, 200, &w);
            if st == S_OK {
                break;
            }
            assert!(Instant::now() < deadline, "{m:?}: writes fail for good");
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(d.alive(), "{m:?}");
    }
}

// --- Reconnection ---------------------------------------------------------

fn kill(srv: Server) {
    drop(srv);
}

#[test]
fn a_server_restarted_within_reconnect_delay_is_invisible_beyond_it_eio() {
    reconnect_case(false);
}

#[test]
fn reconnection_over_tcp() {
    // The network threads make the TCP connection themselves (seccomp:
    // socket, connect, setsockopt; Landlock: the node's port).
    reconnect_case(true);
}

fn reconnect_case(tcp: bool) {
    let dir = tempfile::tempdir().unwrap();
    let img = raw_image(dir.path(), 16 * MIB);
    let nbd_sock = dir.path().join("nbd.sock");
    let port = free_port();
    let start = move |img: &Path, sock: &Path| {
        if tcp {
            qemu_nbd_tcp(img, port)
        } else {
            qemu_nbd_unix(img, sock)
        }
    };
    let srv = start(&img, &nbd_sock);
    let server = if tcp {
        // A host name: resolved when the node opens (the network threads
        // that reconnect cannot read /etc/hosts).
        format!("server.type=inet,server.host=localhost,server.port={port}")
    } else {
        "server.type=unix,server.path={dir}/nbd.sock".to_string()
    };
    let d = Daemon::start_in(
        dir,
        &[
            "--blockdev",
            &format!("driver=nbd,node-name=n0,{server},reconnect-delay=3"),
            "--export",
            &export_arg("n0"),
        ],
    );
    let mut vm = Vm::connect(&d.socket, VmOptions::default());
    let w1 = pattern(20, 65536);
    assert_eq!(vm.write(0, 0, &w1), S_OK);
    assert_eq!(vm.flush(0), S_OK);

    // Kill the server; a write made while it is down waits and succeeds
    // once it is back (1 s later, within the 3 s delay).
    kill(srv);
    let img2 = img.clone();
    let sock2 = nbd_sock.clone();
    let restarter = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(1));
        start(&img2, &sock2)
    });
    let w2 = pattern(21, 65536);
    assert_eq!(vm.write(0, 1024, &w2), S_OK, "{}", d.log());
    assert_eq!(vm.flush(0), S_OK);
    let srv = restarter.join().unwrap();
    assert!(read_file_at(&img, 1024 * 512, w2.len()) == w2);
    let (st, got) = vm.read(0, 0, 65536);
    assert_eq!(st, S_OK);
    assert!(got == w1);
    assert!(d.log().contains("reconnected"), "{}", d.log());

    // Kill it for good: after the delay requests fail with EIO.
    kill(srv);
    let (st, _) = vm.read(0, 0, 4096);
    assert_eq!(st, S_IOERR);
    assert!(d.log().contains("connection to"), "{}", d.log());
}

#[test]
fn a_qcow2_image_over_nbd_on_the_command_line_opens_before_the_sandbox_is_armed() {
    // qcow2 reads its header while the node opens, before the sandbox is
    // armed and the nbd threads run: the opening thread does that I/O.
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    let ok = Command::new("qemu-img")
        .args([
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "preallocation=metadata",
        ])
        .arg(&img)
        .arg("8M")
        .status()
        .unwrap();
    assert!(ok.success());
    let nbd_sock = dir.path().join("nbd.sock");
    let _srv = qemu_nbd_unix(&img, &nbd_sock);
    let d = Daemon::start_in(
        dir,
        &[
            "--blockdev",
            "driver=nbd,node-name=n0,server.type=unix,server.path={dir}/nbd.sock",
            "--blockdev",
            "driver=qcow2,node-name=q0,file=n0",
            "--export",
            &export_arg("q0"),
        ],
    );
    let mut vm = Vm::connect(&d.socket, VmOptions::default());
    assert_eq!(vm.capacity_sectors(), 8 * MIB / 512);
    let w = pattern(30, 65536);
    assert_eq!(vm.write(0, 2048, &w), S_OK);
    assert_eq!(vm.flush(0), S_OK);
    let (st, got) = vm.read(0, 2048, 65536);
    assert_eq!(st, S_OK);
    assert!(got == w);
}

#[test]
fn open_timeout_waits_for_a_server_that_starts_late() {
    let dir = tempfile::tempdir().unwrap();
    let img = raw_image(dir.path(), 4 * MIB);
    let nbd_sock = dir.path().join("nbd.sock");
    let (d, mut q) = qmp_daemon(&[]);
    let server = json!({"type": "unix", "path": nbd_sock});
    // open-timeout 0 (the default): one attempt, refused at once.
    let r = q.execute(
        "blockdev-add",
        json!({"driver": "nbd", "node-name": "n0", "server": server}),
    );
    let desc = r["error"]["desc"].as_str().unwrap_or_default().to_string();
    assert!(desc.contains("Failed to connect"), "{r}");
    let (img2, sock2) = (img.clone(), nbd_sock.clone());
    let late = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(700));
        qemu_nbd_unix(&img2, &sock2)
    });
    let r = q.execute(
        "blockdev-add",
        json!({"driver": "nbd", "node-name": "n0", "server": server, "open-timeout": 10}),
    );
    assert!(r.get("return").is_some(), "{r} {}", d.log());
    let _srv = late.join().unwrap();
    // x-dirty-bitmap names a context the server must have (qemu-nbd
    // serves one client at a time: n0 goes first).
    let r = q.execute("blockdev-del", json!({"node-name": "n0"}));
    assert!(r.get("return").is_some(), "{r}");
    let r = q.execute(
        "blockdev-add",
        json!({"driver": "nbd", "node-name": "n1", "server": server, "read-only": true,
               "x-dirty-bitmap": "qemu:dirty-bitmap:nope"}),
    );
    let desc = r["error"]["desc"].as_str().unwrap_or_default().to_string();
    assert!(
        desc.contains("x-dirty-bitmap") && desc.contains("not found"),
        "{r}"
    );
}

#[test]
fn the_servers_block_size_constraints_are_honoured() {
    // The fake refuses (EINVAL) a read or write not aligned to 4096 or
    // longer than 64 KiB. The node's request alignment is the minimum
    // block size (an export needs logical-block-size=4096 over it, as over
    // a 4k-sector device with O_DIRECT); a 256 KiB request is split.
    let (mut d, mut vm) = against_fake_with(Misbehave::BlockSizes, ",logical-block-size=4096");
    let w = pattern(40, 256 * 1024);
    assert_eq!(vm.write(0, 64, &w), S_OK, "{}", d.log());
    let (st, got) = vm.read(0, 64, 256 * 1024);
    assert_eq!(st, S_OK, "{}", d.log());
    assert!(got == w);
    let want = pattern(7, FAKE_SIZE as usize);
    let (st, got) = vm.read(0, 1024, 8192);
    assert_eq!(st, S_OK);
    assert!(got[..] == want[512 * 1024..520 * 1024]);
    assert!(d.alive());
}

fn count(dir: String) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

#[test]
fn blockdev_del_closes_the_connections_and_ends_their_threads() {
    // nbdkit's memory plugin allows multi-conn: 2 connections, 4 threads
    // per node; 5 add/del cycles must leave threads and descriptors as
    // they were.
    let port = free_port();
    let c = Command::new("nbdkit")
        .args([
            "-f",
            "-i",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "memory",
            "8M",
        ])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nbdkit");
    let _srv = Server(c);
    wait_for("nbdkit", || tcp_listening(port));
    let allow = port.to_string();
    let (d, mut q) = qmp_daemon(&["--allow-connect", &allow]);
    // A host name is refused (resolving it killed the daemon: glibc's
    // getaddrinfo calls uname, which the monitor may not).
    let r = q.execute(
        "blockdev-add",
        json!({"driver": "nbd", "node-name": "n0",
               "server": {"type": "inet", "host": "localhost", "port": allow}}),
    );
    let desc = r["error"]["desc"].as_str().unwrap_or_default().to_string();
    assert!(desc.contains("is not an IP address"), "{r}");
    let pid = d.pid();
    let threads = || count(format!("/proc/{pid}/task"));
    let fds = || count(format!("/proc/{pid}/fd"));
    let (t0, f0) = (threads(), fds());
    for i in 0..5 {
        let r = q.execute(
            "blockdev-add",
            json!({"driver": "nbd", "node-name": "n0",
                   "server": {"type": "inet", "host": "127.0.0.1", "port": allow}}),
        );
        assert!(r.get("return").is_some(), "{r}");
        if i == 0 {
            assert_eq!(threads(), t0 + 4, "two connections, two threads each");
        }
        let r = q.execute("blockdev-del", json!({"node-name": "n0"}));
        assert!(r.get("return").is_some(), "{r}");
    }
    // The threads notice the closed sockets on their own. (At most as
    // many as before: a helper thread of the daemon may have ended.)
    let names = || {
        let mut v: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|d| {
                d.flatten()
                    .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
                    .map(|n| n.trim().to_string())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while threads() > t0 || fds() > f0 {
        assert!(
            Instant::now() < deadline,
            "threads {} (were {t0}): {:?}; descriptors {} (were {f0})",
            threads(),
            names(),
            fds()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !names().iter().any(|n| n.starts_with("nbd-")),
        "{:?}",
        names()
    );
    assert!(!d.log().contains("panicked"), "{}", d.log());
}

#[test]
fn x_dirty_bitmap_reads_the_bitmaps_context_as_qemu_does() {
    // qemu-nbd -B exports a qcow2 bitmap as qemu:dirty-bitmap:b0. With
    // x-dirty-bitmap, block status reports dirty areas as not data (QEMU's
    // convention, for qemu-img map): a backup then copies the clean data
    // (0x22 at 4 MiB, written before the bitmap existed) and writes
    // zeroes over the dirty 64 KiB (0x11 at 1 MiB).
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.qcow2");
    let run = |args: &[&str]| {
        let ok = Command::new(args[0])
            .args(&args[1..])
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(ok.success(), "{args:?}");
    };
    let img_s = img.to_str().unwrap();
    run(&["qemu-img", "create", "-q", "-f", "qcow2", img_s, "16M"]);
    run(&["qemu-io", "-c", "write -P 0x22 4M 64k", img_s]);
    run(&["qemu-img", "bitmap", "--add", img_s, "b0"]);
    run(&["qemu-io", "-c", "write -P 0x11 1M 64k", img_s]);
    let sock = dir.path().join("b.sock");
    let c = Command::new("qemu-nbd")
        .args(["-r", "-f", "qcow2", "-B", "b0", "-k"])
        .arg(&sock)
        .arg(&img)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-nbd");
    let _srv = Server(c);
    wait_for("qemu-nbd", || UnixStream::connect(&sock).is_ok());
    let (d, mut q) = qmp_daemon(&[]);
    let r = q.execute(
        "blockdev-add",
        json!({"driver": "nbd", "node-name": "n0", "read-only": true,
               "server": {"type": "unix", "path": sock},
               "x-dirty-bitmap": "qemu:dirty-bitmap:b0"}),
    );
    assert!(r.get("return").is_some(), "{r}");
    let target = d.dir.path().join("target.img");
    std::fs::File::create(&target)
        .unwrap()
        .set_len(16 * MIB)
        .unwrap();
    let r = q.execute(
        "blockdev-add",
        json!({"driver": "file", "node-name": "t0", "filename": target, "discard": "unmap"}),
    );
    assert!(r.get("return").is_some(), "{r}");
    let r = q.execute(
        "blockdev-backup",
        json!({"job-id": "j", "device": "n0", "target": "t0", "sync": "full"}),
    );
    assert!(r.get("return").is_some(), "{r}");
    let ev = q.wait_event_of(&["BLOCK_JOB_COMPLETED"], Duration::from_secs(60));
    assert!(ev["data"].get("error").is_none(), "{ev}");
    assert!(read_file_at(&target, 4 * MIB, 65536)
        .iter()
        .all(|&b| b == 0x22));
    assert!(read_file_at(&target, MIB, 65536).iter().all(|&b| b == 0));
}

#[test]
fn a_request_before_the_receiver_runs_waits_for_it() {
    // The receiver starts 1.5 s late (test hook): the guest's first read
    // comes before it and must queue; the iothread doing the I/O itself
    // was killed by seccomp ('vring_worker' (iothread) made the forbidden
    // system call sendto), as happened on a loaded machine.
    let dir = tempfile::tempdir().unwrap();
    let img = raw_image(dir.path(), 4 * MIB);
    write_file_at(&img, 0, &pattern(50, 4096));
    let nbd_sock = dir.path().join("nbd.sock");
    let _srv = qemu_nbd_unix(&img, &nbd_sock);
    let mut d = Daemon::start_env(
        dir,
        &[
            "--blockdev",
            "driver=nbd,node-name=n0,server.type=unix,server.path={dir}/nbd.sock",
            "--export",
            &export_arg("n0"),
        ],
        &[("VUB_DEBUG_NBD_START_DELAY_MS", "1500")],
    );
    let mut vm = Vm::connect(&d.socket, VmOptions::default());
    let (st, got) = vm.read(0, 0, 4096);
    assert_eq!(st, S_OK, "{}", d.log());
    assert!(got == pattern(50, 4096));
    assert!(d.alive(), "{}", d.log());
}

#[test]
fn a_block_status_error_makes_the_range_data_not_a_failed_job() {
    // The server offers base:allocation and then fails every BLOCK_STATUS:
    // as in QEMU the range is taken as data and a backup copies it all.
    let (d, mut q) = qmp_daemon(&[]);
    let sock = d.dir.path().join("fake.sock");
    fake_server(sock.clone(), Misbehave::BlockStatusError);
    let r = q.execute(
        "blockdev-add",
        json!({"driver": "nbd", "node-name": "n0", "read-only": true,
               "server": {"type": "unix", "path": sock}}),
    );
    assert!(r.get("return").is_some(), "{r}");
    let target = d.dir.path().join("target.img");
    std::fs::File::create(&target)
        .unwrap()
        .set_len(FAKE_SIZE)
        .unwrap();
    let r = q.execute(
        "blockdev-add",
        json!({"driver": "file", "node-name": "t0", "filename": target}),
    );
    assert!(r.get("return").is_some(), "{r}");
    let r = q.execute(
        "blockdev-backup",
        json!({"job-id": "j", "device": "n0", "target": "t0", "sync": "full"}),
    );
    assert!(r.get("return").is_some(), "{r}");
    let ev = q.wait_event_of(&["BLOCK_JOB_COMPLETED"], Duration::from_secs(60));
    assert!(ev["data"].get("error").is_none(), "{ev}");
    assert!(read_file_at(&target, 0, FAKE_SIZE as usize) == pattern(7, FAKE_SIZE as usize));
}
