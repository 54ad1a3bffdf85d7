//! vhost-user message sequences from a fake frontend, through the daemon's
//! real connection code: an export of a null-co node (2 queues, one
//! iothread) served by `Server::serve_one`, i.e. vhost-user-backend's
//! request handler over the daemon's VhostUserBlk backend, its worker
//! thread and the request path.
//!
//! Input: two bytes giving the length L of the script, L bytes of script,
//! then the content of guest memory (two 64 KiB memfds, the first then the
//! second). The script is a sequence of operations, each an opcode byte and
//! its little-endian arguments (missing bytes read as zero):
//!
//! ```text
//!   0 SET_OWNER                 1 RESET_OWNER        2 GET_FEATURES
//!   3 SET_FEATURES u64          4 GET_PROTOCOL_FEATURES
//!   5 SET_PROTOCOL_FEATURES u64 6 SET_MEM_TABLE n:u8 n x region
//!   7 ADD_MEM_REG region        8 REM_MEM_REG region
//!   9 SET_VRING_NUM q:u8 num:u16
//!  10 SET_VRING_ADDR q:u8 size:u16 flags:u32 desc:u64 used:u64 avail:u64
//!  11 SET_VRING_BASE q:u8 base:u16      12 GET_VRING_BASE q:u8
//!  13 SET_VRING_CALL q:u8     14 SET_VRING_KICK q:u8
//!  15 kick q:u8, then wait up to 20 ms for the call (if 13 and 14 were)
//!  16 SET_VRING_ENABLE q:u8 on:u8       17 GET_CONFIG off:u32 size:u32 flags:u32
//!  18 SET_CONFIG off:u32 flags:u32 len:u8 bytes  19 RESET_DEVICE
//!  20 GET_QUEUE_NUM           21 GET_MAX_MEM_SLOTS 22 SET_BACKEND_REQ_FD
//!  23 SET_VRING_ERR q:u8
//!  24 a raw message: request:u32 flags:u32 size:u32 len:u8 body bytes
//!  25 guest memory write: memfd:u8 offset:u16 len:u8 bytes
//!  region = memfd:u8 gpa:u64 size:u64 uaddr:u64 mmap_offset:u64
//! ```
//!
//! The frontend checks what it sends (vhost's Frontend); opcode 24 writes
//! anything. Replies time out after 10 s (a daemon that stops answering is
//! then found by libFuzzer's -timeout when the connection is closed).
#![no_main]

use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vhost_user_blkd::block::{BlockBackend, Graph};
use vhost_user_blkd::config::export::VhostUserBlkOptions;
use vhost_user_blkd::config::ExportConfig;
use vhost_user_blkd::drivers::BlockdevOptions;
use vhost_user_blkd::io::EngineKind;
use vhost_user_blkd::vhost_user::{ExportState, Server};
use vmm_sys_util::eventfd::EventFd;

const MEMFD_SIZE: u64 = 64 << 10;
const QUEUES: usize = 2;

struct Setup {
    _graph: Graph,
    socket: PathBuf,
    server: Mutex<Option<Server>>,
}

fn setup() -> &'static Setup {
    static SETUP: OnceLock<Setup> = OnceLock::new();
    SETUP.get_or_init(|| {
        // RUST_LOG=debug shows what the daemon made of a reproduced input.
        let _ = env_logger::try_init();
        let dir = std::env::temp_dir().join(format!("vub-fuzz-vhost-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("socket directory");
        let socket = dir.join("fz.sock");
        let o: BlockdevOptions = serde_json::from_value(serde_json::json!({
            "driver": "null-co", "node-name": "n0", "size": 1 << 20, "read-zeroes": true,
        }))
        .expect("null-co options");
        let mut graph = Graph::new();
        let node = graph.add(&o).expect("null-co node");
        let blk = Arc::new(BlockBackend::new("fz", node, true).expect("backend"));
        let e: VhostUserBlkOptions = serde_json::from_value(serde_json::json!({
            "id": "fz", "node-name": "n0", "writable": true, "num-queues": QUEUES,
            "num-iothreads": 1, "serial": "fuzz",
            "addr": {"type": "unix", "path": socket.to_str().expect("UTF-8 path")},
        }))
        .expect("export options");
        let config = ExportConfig::try_from(e).expect("export config");
        let export = Arc::new(ExportState::new(config, blk, EngineKind::Sync));
        let server = Server::bind(export).expect("bind the export's socket");
        Setup {
            _graph: graph,
            socket,
            server: Mutex::new(Some(server)),
        }
    })
}

/// Reads little-endian fields off the script; zero past its end.
struct Script<'a>(&'a [u8]);

impl Script<'_> {
    fn bytes(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a
    }
    fn u(&mut self, n: usize) -> u64 {
        let mut v = [0u8; 8];
        let b = self.bytes(n);
        v[..b.len()].copy_from_slice(b);
        u64::from_le_bytes(v)
    }
    fn u8(&mut self) -> u8 {
        self.u(1) as u8
    }
    fn u16(&mut self) -> u16 {
        self.u(2) as u16
    }
    fn u32(&mut self) -> u32 {
        self.u(4) as u32
    }
    fn u64(&mut self) -> u64 {
        self.u(8)
    }
}

fn memfd(name: &str, content: &[u8]) -> OwnedFd {
    let cname = std::ffi::CString::new(name).expect("no NUL");
    // SAFETY: memfd_create takes a NUL-terminated name and flags.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut f = std::fs::File::from(fd);
    f.set_len(MEMFD_SIZE).expect("size the memfd");
    f.write_all(&content[..content.len().min(MEMFD_SIZE as usize)])
        .expect("fill the memfd");
    f.into()
}

fn region(s: &mut Script, fds: &[OwnedFd; 2]) -> VhostUserMemoryRegionInfo {
    let fd = &fds[usize::from(s.u8() % 2)];
    VhostUserMemoryRegionInfo {
        guest_phys_addr: s.u64(),
        memory_size: s.u64(),
        userspace_addr: s.u64(),
        mmap_offset: s.u64(),
        mmap_handle: fd.as_raw_fd(),
    }
}

/// VUB_FUZZ_TRACE=1: each operation and its result on stderr (for
/// reading a reproduced input).
fn trace() -> bool {
    static TRACE: OnceLock<bool> = OnceLock::new();
    *TRACE.get_or_init(|| std::env::var_os("VUB_FUZZ_TRACE").is_some())
}

/// Waits (at most 20 ms) for the daemon to signal a used buffer.
fn wait_call(call: &EventFd) {
    let mut pfd = libc::pollfd {
        fd: call.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one live pollfd for a descriptor we own.
    if unsafe { libc::poll(&mut pfd, 1, 20) } > 0 {
        let _ = call.read();
    }
}

fn run(script: &[u8], memory: &[u8]) {
    let fds = [
        memfd("guest0", memory),
        memfd("guest1", memory.get(MEMFD_SIZE as usize..).unwrap_or(&[])),
    ];
    let Ok(stream) = UnixStream::connect(&setup().socket) else {
        return;
    };
    let timeout = Some(Duration::from_secs(10));
    stream.set_read_timeout(timeout).expect("read timeout");
    stream.set_write_timeout(timeout).expect("write timeout");
    let mut raw = stream.try_clone().expect("clone the stream");
    let mut fe = Frontend::from_stream(stream, QUEUES as u64);
    let kicks: Vec<EventFd> = (0..QUEUES)
        .map(|_| EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"))
        .collect();
    let calls: Vec<EventFd> = (0..QUEUES)
        .map(|_| EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"))
        .collect();
    let (backend_req, _backend_req_peer) = UnixStream::pair().expect("socketpair");
    let mut s = Script(script);
    let mut guest_writes = [
        std::fs::File::from(fds[0].try_clone().expect("dup")),
        std::fs::File::from(fds[1].try_clone().expect("dup")),
    ];
    // Queues with a kick and a call fd given (a kick then waits for the call).
    let mut wired = [(false, false); QUEUES];
    while !s.0.is_empty() {
        let q = |s: &mut Script| usize::from(s.u8()) % (QUEUES + 1);
        let opcode = s.u8() % 26;
        let r = match opcode {
            0 => fe.set_owner().map(drop),
            1 => fe.reset_owner().map(drop),
            2 => fe.get_features().map(drop),
            3 => fe.set_features(s.u64()).map(drop),
            4 => fe.get_protocol_features().map(drop),
            5 => fe
                .set_protocol_features(VhostUserProtocolFeatures::from_bits_truncate(s.u64()))
                .map(drop),
            6 => {
                let n = usize::from(s.u8() % 4);
                let regions: Vec<_> = (0..n).map(|_| region(&mut s, &fds)).collect();
                fe.set_mem_table(&regions).map(drop)
            }
            7 => fe.add_mem_region(&region(&mut s, &fds)).map(drop),
            8 => fe.remove_mem_region(&region(&mut s, &fds)).map(drop),
            9 => {
                let q = q(&mut s);
                fe.set_vring_num(q, s.u16())
            }
            10 => {
                let q = q(&mut s);
                let size = s.u16();
                let c = VringConfigData {
                    queue_max_size: size,
                    queue_size: size,
                    flags: s.u32(),
                    desc_table_addr: s.u64(),
                    used_ring_addr: s.u64(),
                    avail_ring_addr: s.u64(),
                    log_addr: None,
                };
                fe.set_vring_addr(q, &c)
            }
            11 => {
                let q = q(&mut s);
                fe.set_vring_base(q, s.u16())
            }
            12 => fe.get_vring_base(q(&mut s)).map(|base| {
                if trace() {
                    eprintln!("vring base {base}");
                }
            }),
            13 => {
                let q = q(&mut s);
                let r = fe.set_vring_call(q, &calls[q % QUEUES]);
                wired[q % QUEUES].1 |= r.is_ok();
                r
            }
            14 => {
                let q = q(&mut s);
                let r = fe.set_vring_kick(q, &kicks[q % QUEUES]);
                wired[q % QUEUES].0 |= r.is_ok();
                r
            }
            15 => {
                let q = q(&mut s) % QUEUES;
                let r = kicks[q].write(1).map_err(vhost::Error::IOError);
                // As a guest waits for its request: the worker runs it
                // before a later GET_VRING_BASE stops the queue.
                if wired[q] == (true, true) {
                    wait_call(&calls[q]);
                }
                r
            }
            16 => {
                let q = q(&mut s);
                fe.set_vring_enable(q, s.u8() & 1 != 0)
            }
            17 => {
                let (off, size, flags) = (s.u32(), s.u32() % 4096, s.u32());
                let buf = vec![0u8; size as usize];
                fe.get_config(
                    off,
                    size,
                    VhostUserConfigFlags::from_bits_truncate(flags),
                    &buf,
                )
                .map(drop)
            }
            18 => {
                let (off, flags, len) = (s.u32(), s.u32(), usize::from(s.u8()));
                let buf = s.bytes(len).to_vec();
                fe.set_config(off, VhostUserConfigFlags::from_bits_truncate(flags), &buf)
            }
            19 => fe.reset_device(),
            20 => fe.get_queue_num().map(drop),
            21 => fe.get_max_mem_slots().map(drop),
            22 => fe.set_backend_request_fd(&backend_req),
            23 => {
                let q = q(&mut s);
                fe.set_vring_err(q, &calls[q % QUEUES])
            }
            24 => {
                let (req, flags, size, len) = (s.u32(), s.u32(), s.u32(), usize::from(s.u8()));
                let mut msg = Vec::with_capacity(12 + len);
                msg.extend_from_slice(&req.to_le_bytes());
                msg.extend_from_slice(&flags.to_le_bytes());
                msg.extend_from_slice(&size.to_le_bytes());
                msg.extend_from_slice(s.bytes(len));
                raw.write_all(&msg).map_err(vhost::Error::IOError)
            }
            _ => {
                use std::os::unix::fs::FileExt;
                let f = &mut guest_writes[usize::from(s.u8() % 2)];
                let (off, len) = (u64::from(s.u16()), usize::from(s.u8()));
                let bytes = s.bytes(len).to_vec();
                f.write_all_at(&bytes, off).map_err(vhost::Error::IOError)
            }
        };
        if trace() {
            eprintln!("op {opcode}: {r:?}");
        }
        // A frontend whose connection the daemon ended stops.
        if let Err(vhost::Error::VhostUserProtocol(
            vhost::vhost_user::Error::SocketBroken(_)
            | vhost::vhost_user::Error::Disconnected
            | vhost::vhost_user::Error::PartialMessage,
        )) = r
        {
            break;
        }
    }
    drop(fe);
    drop(raw);
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let len = usize::from(u16::from_le_bytes([data[0], data[1]]));
    let rest = &data[2..];
    let (script, memory) = rest.split_at(len.min(rest.len()));
    let setup = setup();
    let mut server = setup
        .server
        .lock()
        .expect("one run at a time")
        .take()
        .expect("the server is back from the last run");
    let serving = std::thread::spawn(move || {
        let _ = server.serve_one();
        server
    });
    run(script, memory);
    let server = serving.join().expect("serve_one does not panic");
    *setup.server.lock().expect("one run at a time") = Some(server);
});
