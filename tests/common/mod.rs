//! A vhost-user frontend test harness: it plays the VMM over a real UNIX
//! socket against the daemon binary, with memfd-backed guest memory and split
//! virtqueues that the tests write descriptor by descriptor.
//!
//! ```text
//!   test --Frontend (vhost crate)--> daemon socket: features, mem table, vrings
//!   test --writes descriptors/avail--> memfd <--daemon reads/writes-- daemon
//!   test <--polls used ring---------- memfd
//! ```

#![allow(dead_code)]

pub mod client;
pub mod queue;

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserInflight, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub use queue::{Desc, VirtQueue};

pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
pub const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;
pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
pub const VIRTIO_BLK_F_MQ: u64 = 1 << 12;
pub const VIRTIO_BLK_F_DISCARD: u64 = 1 << 13;
pub const VIRTIO_BLK_F_WRITE_ZEROES: u64 = 1 << 14;

pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;
pub const T_DISCARD: u32 = 11;
pub const T_WRITE_ZEROES: u32 = 13;

pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;

/// Guest memory size of one test VM.
pub const MEM_SIZE: u64 = 64 << 20;
/// Where the test's data buffers start (queues live below).
pub const DATA_BASE: u64 = 16 << 20;

/// The daemon binary built by cargo for these tests.
pub fn daemon_bin() -> &'static str {
    env!("CARGO_BIN_EXE_vhost-user-blkd")
}

/// A running daemon, killed when dropped.
pub struct Daemon {
    pub child: Option<Child>,
    pub socket: PathBuf,
    pub dir: tempfile::TempDir,
}

impl Daemon {
    /// Starts the daemon with `args`; `{sock}` and `{dir}` in an argument are
    /// replaced by the socket path and the temp dir. Waits for the socket.
    pub fn start(args: &[&str]) -> Daemon {
        let dir = tempfile::tempdir().expect("temp dir");
        Daemon::start_in(dir, args)
    }

    pub fn start_in(dir: tempfile::TempDir, args: &[&str]) -> Daemon {
        Daemon::start_env(dir, args, &[])
    }

    /// Like `start_in`, with extra environment variables.
    pub fn start_env(dir: tempfile::TempDir, args: &[&str], env: &[(&str, &str)]) -> Daemon {
        Daemon::start_bin(daemon_bin(), dir, args, env)
    }

    /// Like `start_env` with another daemon binary that takes the same
    /// command line (e.g. qemu-storage-daemon, to check a test itself).
    pub fn start_bin(
        bin: &str,
        dir: tempfile::TempDir,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Daemon {
        let socket = dir.path().join("vub.sock");
        let args: Vec<String> = args
            .iter()
            .map(|a| {
                a.replace("{sock}", socket.to_str().unwrap())
                    .replace("{dir}", dir.path().to_str().unwrap())
            })
            .collect();
        let mut args = args;
        if bin == daemon_bin() && !args.iter().any(|a| a == "--allow-path") {
            // Tests add images and sockets in their temp dir over QMP: the
            // sandbox lets the daemon reach it (tests/sandbox.rs checks
            // what lies outside).
            args.push("--allow-path".into());
            args.push(dir.path().to_str().unwrap().to_string());
        }
        let log = File::create(dir.path().join("daemon.log")).expect("daemon log");
        let child = Command::new(bin)
            .args(&args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn daemon");
        let d = Daemon {
            child: Some(child),
            socket,
            dir,
        };
        d.wait_for_socket();
        d
    }

    /// Short form over a raw image `img` of the temp dir, plus `extra` args.
    pub fn raw(img_size: u64, extra: &[&str]) -> Daemon {
        let dir = tempfile::tempdir().expect("temp dir");
        let img = dir.path().join("disk.img");
        let f = File::create(&img).unwrap();
        f.set_len(img_size).unwrap();
        let mut args = vec!["--image", "{dir}/disk.img", "--socket", "{sock}"];
        args.extend_from_slice(extra);
        Daemon::start_in(dir, &args)
    }

    pub fn image(&self) -> PathBuf {
        self.dir.path().join("disk.img")
    }

    fn wait_for_socket(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        // The socket file appears at bind(), a moment before listen(): a
        // connect in between is refused. Wait until the kernel lists the
        // socket as listening (/proc/net/unix flag __SO_ACCEPTCON), which
        // does not take a connection from the daemon.
        while !self.socket.exists() || !listening(&self.socket) {
            if let Some(status) = self.child.as_ref().and(None::<ExitStatus>) {
                panic!("daemon exited: {status}");
            }
            assert!(Instant::now() < deadline, "daemon socket never appeared");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("daemon running");
        // SAFETY: kill only takes a pid and a signal number.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        match wait_timeout(&mut child, Duration::from_secs(60)) {
            Some(status) => status,
            None => {
                // Never leave it behind: an orphan would hold the test
                // runner's output pipe open (and the CI run with it).
                let _ = child.kill();
                let _ = child.wait();
                panic!("daemon did not exit after SIGTERM (killed)");
            }
        }
    }

    /// True while the daemon process is running.
    pub fn alive(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().unwrap().is_none(),
            None => false,
        }
    }
}

impl Daemon {
    /// What the daemon logged so far.
    /// Waits until the daemon says it is ready: set up and sandboxed
    /// (the socket is listening a little earlier, while the last threads
    /// and descriptors are made).
    pub fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.log().lines().any(|l| l.ends_with("] ready")) {
            assert!(Instant::now() < deadline, "never ready:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- daemon log\n{}", self.log());
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn wait_timeout(child: &mut Child, t: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + t;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs a daemon to completion with `args` (for start-up failures).
pub fn run_daemon(args: &[&str]) -> (i32, String) {
    let out = Command::new(daemon_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run daemon");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn memfd(size: u64) -> File {
    let name = std::ffi::CString::new("vub-test-guest").unwrap();
    // SAFETY: memfd_create takes a valid C string and flags.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create failed");
    // SAFETY: fd is a fresh descriptor that we own.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(size).unwrap();
    f
}

/// How the test VM negotiates.
#[derive(Clone, Debug)]
pub struct VmOptions {
    pub num_queues: usize,
    pub queue_size: u16,
    pub event_idx: bool,
    /// Guest memory as (guest address, size) regions, all from one memfd.
    pub regions: Vec<(u64, u64)>,
    /// Give the daemon a backend request channel (SET_BACKEND_REQ_FD).
    pub backend_channel: bool,
    /// Negotiate INFLIGHT_SHMFD when the daemon offers it, and get and set
    /// an inflight buffer as QEMU's vhost-user-blk does.
    pub inflight: bool,
    /// Negotiate LOG_SHMFD (live migration's dirty log) when offered.
    pub log: bool,
    /// A used-ring log address for every vring (SET_VRING_ADDR with
    /// VHOST_VRING_F_LOG), as QEMU gives while migrating.
    pub used_log: Option<u64>,
}

impl Default for VmOptions {
    fn default() -> Self {
        VmOptions {
            num_queues: 1,
            queue_size: 256,
            event_idx: false,
            regions: vec![(0, MEM_SIZE)],
            backend_channel: false,
            inflight: false,
            log: false,
            used_log: None,
        }
    }
}

/// A test VM: guest memory, a vhost-user frontend and its virtqueues.
pub struct Vm {
    pub mem: GuestMemoryMmap<()>,
    pub frontend: Frontend,
    pub queues: Vec<VirtQueue>,
    pub features: u64,
    pub opts: VmOptions,
    /// Our end of the backend request channel, if any.
    pub backend_channel: Option<std::os::unix::net::UnixStream>,
    /// The inflight buffer the daemon gave (GET_INFLIGHT_FD), kept across
    /// reconnections as QEMU keeps it.
    pub inflight: Option<(VhostUserInflight, File)>,
    memfd: File,
    next_buf: u64,
}

impl Vm {
    pub fn connect(socket: &Path, opts: VmOptions) -> Vm {
        Vm::try_connect(socket, opts).expect("vhost-user setup")
    }

    pub fn try_connect(socket: &Path, opts: VmOptions) -> Result<Vm, vhost::Error> {
        let total: u64 = opts.regions.iter().map(|r| r.1).sum();
        let file = memfd(total);
        let mut offset = 0;
        let mut ranges = Vec::new();
        for &(gpa, size) in &opts.regions {
            ranges.push((
                GuestAddress(gpa),
                size as usize,
                Some(FileOffset::new(file.try_clone().unwrap(), offset)),
            ));
            offset += size;
        }
        let mem = GuestMemoryMmap::<()>::from_ranges_with_files(ranges).expect("guest memory");
        let (mut frontend, features) = Vm::handshake(socket, &opts, &mem, &file)?;
        let inflight = if opts.inflight
            && frontend
                .get_protocol_features()?
                .contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD)
        {
            // As QEMU's vhost_user_blk_start: a fresh buffer, set back.
            let want = VhostUserInflight {
                mmap_size: 0,
                mmap_offset: 0,
                num_queues: opts.num_queues as u16,
                queue_size: opts.queue_size,
            };
            let (info, f) = frontend.get_inflight_fd(&want)?;
            frontend.set_inflight_fd(&info, f.as_raw_fd())?;
            Some((info, f))
        } else {
            None
        };
        let backend_channel = if opts.backend_channel {
            let (ours, theirs) = std::os::unix::net::UnixStream::pair().expect("socketpair");
            frontend.set_backend_request_fd(&theirs)?;
            Some(ours)
        } else {
            None
        };
        let mut vm = Vm {
            mem,
            frontend,
            queues: Vec::new(),
            features,
            opts: opts.clone(),
            backend_channel,
            inflight,
            memfd: file,
            next_buf: DATA_BASE,
        };
        for q in 0..opts.num_queues {
            vm.setup_queue(q)?;
        }
        Ok(vm)
    }

    /// Connects and negotiates as the VMM does, up to the memory table;
    /// returns the frontend and the features set.
    fn handshake(
        socket: &Path,
        opts: &VmOptions,
        mem: &GuestMemoryMmap<()>,
        file: &File,
    ) -> Result<(Frontend, u64), vhost::Error> {
        let mut frontend = Frontend::connect(socket, opts.num_queues as u64)?;
        frontend.set_owner()?;
        let offered = frontend.get_features()?;
        let mut wanted = VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_INDIRECT_DESC
            | VHOST_USER_F_PROTOCOL_FEATURES
            | VIRTIO_BLK_F_FLUSH
            | VIRTIO_BLK_F_MQ
            | VIRTIO_BLK_F_DISCARD
            | VIRTIO_BLK_F_WRITE_ZEROES
            | VIRTIO_BLK_F_RO
            | (1 << 1)
            | (1 << 2)
            | (1 << 6)
            | (1 << 10)
            | (1 << 11);
        if opts.event_idx {
            wanted |= VIRTIO_RING_F_EVENT_IDX;
        }
        let features = offered & wanted;
        let pf = frontend.get_protocol_features()?;
        let mut want_pf = VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::RESET_DEVICE
            | VhostUserProtocolFeatures::BACKEND_REQ;
        if opts.inflight {
            want_pf |= VhostUserProtocolFeatures::INFLIGHT_SHMFD;
        }
        if opts.log {
            want_pf |= VhostUserProtocolFeatures::LOG_SHMFD;
        }
        frontend.set_protocol_features(pf & want_pf)?;
        // Ask for a reply to every message (REPLY_ACK), as QEMU does for
        // memory updates: a call returns once the daemon has applied it.
        frontend.set_hdr_flags(vhost::vhost_user::message::VhostUserHeaderFlag::NEED_REPLY);
        frontend.set_features(features)?;
        let mut regions = Vec::new();
        let mut offset = 0;
        for &(gpa, size) in &opts.regions {
            regions.push(VhostUserMemoryRegionInfo {
                guest_phys_addr: gpa,
                memory_size: size,
                userspace_addr: mem.get_host_address(GuestAddress(gpa)).unwrap() as u64,
                mmap_offset: offset,
                mmap_handle: file.as_raw_fd(),
            });
            offset += size;
        }
        frontend.set_mem_table(&regions)?;
        Ok((frontend, features))
    }

    /// Reconnects to a daemon restarted on `socket` after the previous one
    /// died, as QEMU does with `reconnect=`: same guest memory and rings,
    /// the inflight buffer set back, and each vring's base at its used
    /// index (QEMU's fallback when GET_VRING_BASE could not be answered).
    pub fn reconnect(&mut self, socket: &Path) -> Result<(), vhost::Error> {
        let (mut frontend, features) = Vm::handshake(socket, &self.opts, &self.mem, &self.memfd)?;
        assert_eq!(
            features, self.features,
            "the restarted daemon offers the same features"
        );
        if let Some((info, f)) = &self.inflight {
            frontend.set_inflight_fd(info, f.as_raw_fd())?;
        }
        self.frontend = frontend;
        for q in 0..self.opts.num_queues {
            let base = self.queues[q].used_idx(&self.mem);
            self.start_queue(q, base)?;
        }
        Ok(())
    }

    fn hva(&self, gpa: u64) -> u64 {
        self.mem.get_host_address(GuestAddress(gpa)).unwrap() as u64
    }

    fn setup_queue(&mut self, q: usize) -> Result<(), vhost::Error> {
        let size = self.opts.queue_size;
        let base = 0x10_0000 + q as u64 * 0x4_0000;
        let vq = VirtQueue::new(
            size,
            GuestAddress(base),
            GuestAddress(base + 0x1_0000),
            GuestAddress(base + 0x2_0000),
            self.features & VIRTIO_RING_F_EVENT_IDX != 0,
        );
        vq.init(&self.mem);
        if q < self.queues.len() {
            self.queues[q] = vq;
        } else {
            self.queues.push(vq);
        }
        self.start_queue(q, 0)
    }

    /// Hands vring `q` (set up in guest memory) to the daemon, from avail
    /// index `base`.
    fn start_queue(&mut self, q: usize, base: u16) -> Result<(), vhost::Error> {
        let size = self.opts.queue_size;
        let vq = &self.queues[q];
        let (desc, used, avail) = (
            self.hva(vq.desc.0),
            self.hva(vq.used.0),
            self.hva(vq.avail.0),
        );
        self.frontend.set_vring_num(q, size)?;
        self.frontend.set_vring_addr(
            q,
            &VringConfigData {
                queue_max_size: size,
                queue_size: size,
                // VHOST_VRING_F_LOG with a log address.
                flags: u32::from(self.opts.used_log.is_some()),
                desc_table_addr: desc,
                used_ring_addr: used,
                avail_ring_addr: avail,
                log_addr: self.opts.used_log,
            },
        )?;
        self.frontend.set_vring_base(q, base)?;
        let vq = &self.queues[q];
        self.frontend.set_vring_call(q, &vq.call)?;
        self.frontend.set_vring_kick(q, &vq.kick)?;
        self.frontend.set_vring_enable(q, true)?;
        Ok(())
    }

    /// Allocates `len` bytes of guest memory for buffers (bump allocator).
    pub fn alloc(&mut self, len: u64) -> GuestAddress {
        let a = self.next_buf;
        self.next_buf = (self.next_buf + len.max(1) + 4095) & !4095;
        assert!(self.next_buf <= self.opts.regions.iter().map(|r| r.0 + r.1).max().unwrap());
        GuestAddress(a)
    }

    pub fn reset_alloc(&mut self) {
        self.next_buf = DATA_BASE;
    }

    pub fn write_header(&mut self, req_type: u32, sector: u64) -> GuestAddress {
        let a = self.alloc(16);
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&req_type.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, a).unwrap();
        a
    }

    pub fn status_buf(&mut self) -> GuestAddress {
        let a = self.alloc(1);
        self.mem.write_obj(0xffu8, a).unwrap();
        a
    }

    pub fn status_at(&self, a: GuestAddress) -> u8 {
        self.mem.read_obj(a).unwrap()
    }

    /// Submits a chain on queue `q` and waits for it; returns (status, used len).
    pub fn run_chain(&mut self, q: usize, descs: &[Desc], status: GuestAddress) -> (u8, u32) {
        let head = self.queues[q].add_chain(&self.mem, descs);
        self.queues[q].kick();
        let used = self.queues[q].wait_used(&self.mem, 1, Duration::from_secs(10));
        assert_eq!(used.len(), 1, "one completion expected");
        assert_eq!(used[0].id, u32::from(head), "completion for our head");
        (self.status_at(status), used[0].len)
    }

    /// A read of `len` bytes at `sector`: (status, data).
    pub fn read(&mut self, q: usize, sector: u64, len: u32) -> (u8, Vec<u8>) {
        let h = self.write_header(T_IN, sector);
        let d = self.alloc(u64::from(len));
        let s = self.status_buf();
        let mut descs = vec![Desc::r(h, 16)];
        descs.extend(split_segments(d, len, false));
        descs.push(Desc::w(s, 1));
        let (st, used_len) = self.run_chain(q, &descs, s);
        let mut buf = vec![0u8; len as usize];
        self.mem.read_slice(&mut buf, d).unwrap();
        if st == S_OK {
            assert_eq!(used_len, len + 1, "used length of a read");
        }
        self.reset_alloc();
        (st, buf)
    }

    /// A write of `data` at `sector`: status.
    pub fn write(&mut self, q: usize, sector: u64, data: &[u8]) -> u8 {
        let h = self.write_header(T_OUT, sector);
        let d = self.alloc(data.len() as u64);
        self.mem.write_slice(data, d).unwrap();
        let s = self.status_buf();
        let mut descs = vec![Desc::r(h, 16)];
        descs.extend(split_segments(d, data.len() as u32, true));
        descs.push(Desc::w(s, 1));
        let (st, _) = self.run_chain(q, &descs, s);
        self.reset_alloc();
        st
    }

    pub fn flush(&mut self, q: usize) -> u8 {
        let h = self.write_header(T_FLUSH, 0);
        let s = self.status_buf();
        let (st, _) = self.run_chain(q, &[Desc::r(h, 16), Desc::w(s, 1)], s);
        self.reset_alloc();
        st
    }

    /// Discard or write-zeroes with the given (sector, sectors, flags) ranges.
    pub fn ranges(&mut self, q: usize, req_type: u32, ranges: &[(u64, u32, u32)]) -> u8 {
        let h = self.write_header(req_type, 0);
        let d = self.alloc(16 * ranges.len() as u64);
        for (i, (sector, n, flags)) in ranges.iter().enumerate() {
            let mut r = [0u8; 16];
            r[0..8].copy_from_slice(&sector.to_le_bytes());
            r[8..12].copy_from_slice(&n.to_le_bytes());
            r[12..16].copy_from_slice(&flags.to_le_bytes());
            self.mem
                .write_slice(&r, GuestAddress(d.0 + 16 * i as u64))
                .unwrap();
        }
        let s = self.status_buf();
        let (st, _) = self.run_chain(
            q,
            &[
                Desc::r(h, 16),
                Desc::r(d, 16 * ranges.len() as u32),
                Desc::w(s, 1),
            ],
            s,
        );
        self.reset_alloc();
        st
    }

    pub fn get_id(&mut self, q: usize, buf_len: u32) -> (u8, Vec<u8>, u32) {
        let h = self.write_header(T_GET_ID, 0);
        let d = self.alloc(u64::from(buf_len));
        let s = self.status_buf();
        let (st, used) =
            self.run_chain(q, &[Desc::r(h, 16), Desc::w(d, buf_len), Desc::w(s, 1)], s);
        let mut buf = vec![0u8; buf_len as usize];
        self.mem.read_slice(&mut buf, d).unwrap();
        self.reset_alloc();
        (st, buf, used)
    }

    /// The device config space.
    pub fn config(&mut self, offset: u32, size: u32) -> Vec<u8> {
        let buf = vec![0u8; size as usize];
        let (_, payload) = self
            .frontend
            .get_config(offset, size, VhostUserConfigFlags::WRITABLE, &buf)
            .expect("GET_CONFIG");
        payload
    }

    pub fn capacity_sectors(&mut self) -> u64 {
        u64::from_le_bytes(self.config(0, 8).try_into().unwrap())
    }
}

/// Deterministic test data.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub fn read_file_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = File::open(path).unwrap();
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, offset).unwrap();
    buf
}

pub fn write_file_at(path: &Path, offset: u64, data: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(data, offset).unwrap();
}

/// A fresh eventfd (for tests that replace call/kick fds).
pub fn eventfd() -> EventFd {
    EventFd::new(EFD_NONBLOCK).unwrap()
}

impl Vm {
    /// A Vm over a connection and rings set up by the caller (a test that
    /// replays another frontend's message sequence), so that the request
    /// helpers (read, write, flush, ...) can drive its queues.
    pub fn from_parts(
        mem: GuestMemoryMmap<()>,
        frontend: Frontend,
        queues: Vec<VirtQueue>,
        features: u64,
        opts: VmOptions,
        memfd: File,
    ) -> Vm {
        Vm {
            mem,
            frontend,
            queues,
            features,
            opts,
            backend_channel: None,
            inflight: None,
            memfd,
            next_buf: DATA_BASE,
        }
    }
}

impl Vm {
    pub fn memfd_raw(&self) -> std::os::fd::RawFd {
        self.memfd.as_raw_fd()
    }

    pub fn frontend_queue_num(&mut self) -> u64 {
        self.frontend.get_queue_num().expect("GET_QUEUE_NUM")
    }

    /// Writes the config's writeback byte, as a guest toggling its cache.
    pub fn set_writeback(&mut self, on: bool) {
        self.frontend
            .set_config(32, VhostUserConfigFlags::WRITABLE, &[u8::from(on)])
            .expect("SET_CONFIG");
    }
}

/// Largest segment the daemon advertises (size_max).
pub const SIZE_MAX: u32 = 1 << 20;

/// Data descriptors for `len` bytes at `a`, each at most size_max.
pub fn split_segments(a: GuestAddress, len: u32, readable: bool) -> Vec<Desc> {
    let mut out = Vec::new();
    let mut off = 0u32;
    while off < len || (len == 0 && out.is_empty()) {
        let n = (len - off).min(SIZE_MAX);
        let addr = GuestAddress(a.0 + u64::from(off));
        out.push(if readable {
            Desc::r(addr, n)
        } else {
            Desc::w(addr, n)
        });
        off += n;
        if len == 0 {
            break;
        }
    }
    out
}

/// A minimal QMP client for tests that drive the monitor from Rust.
pub struct Qmp {
    stream: std::io::BufReader<std::os::unix::net::UnixStream>,
    /// Events read while waiting for a reply, oldest first, for `wait_event`.
    events: std::collections::VecDeque<serde_json::Value>,
    /// The start of a line a timed-out read left behind.
    partial: String,
}

impl Qmp {
    pub fn connect(path: &Path) -> Qmp {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !listening(path) {
            assert!(
                Instant::now() < deadline,
                "QMP socket {path:?} never listened"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let s = std::os::unix::net::UnixStream::connect(path).expect("QMP connect");
        let mut q = Qmp {
            stream: std::io::BufReader::new(s),
            events: std::collections::VecDeque::new(),
            partial: String::new(),
        };
        let greeting = q.read();
        assert!(greeting.get("QMP").is_some(), "{greeting}");
        let r = q.execute("qmp_capabilities", serde_json::json!({}));
        assert!(r.get("return").is_some(), "{r}");
        q
    }

    fn read(&mut self) -> serde_json::Value {
        self.read_until(None)
            .expect("QMP read without a deadline timed out")
    }

    /// Reads one message, or None once `deadline` has passed.
    fn read_until(&mut self, deadline: Option<Instant>) -> Option<serde_json::Value> {
        use std::io::BufRead;
        loop {
            let timeout = match deadline {
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return None;
                    }
                    Some(left)
                }
                None => None,
            };
            self.stream
                .get_ref()
                .set_read_timeout(timeout)
                .expect("QMP read timeout");
            match self.stream.read_line(&mut self.partial) {
                Ok(0) => panic!("QMP connection closed (partial line {:?})", self.partial),
                Ok(_) if self.partial.ends_with('\n') => {
                    let line = std::mem::take(&mut self.partial);
                    return Some(
                        serde_json::from_str(&line)
                            .unwrap_or_else(|e| panic!("QMP JSON: {e}: {line:?}")),
                    );
                }
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => panic!("QMP read: {e}"),
            }
        }
    }

    /// Waits up to `timeout` for the first event named in `names` (events
    /// that arrived during `execute` count, oldest first); returns it and
    /// drops the events before it. Panics on timeout, listing the events seen.
    pub fn wait_event_of(&mut self, names: &[&str], timeout: Duration) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let ev = match self.events.pop_front() {
                Some(ev) => ev,
                None => match self.read_until(Some(deadline)) {
                    Some(v) if v.get("event").is_some() => v,
                    Some(v) => panic!("QMP reply while waiting for {names:?}: {v}"),
                    None => panic!(
                        "no {names:?} event within {timeout:?}; events seen: {}",
                        serde_json::Value::Array(seen)
                    ),
                },
            };
            if names.iter().any(|n| ev["event"] == *n) {
                return ev;
            }
            seen.push(ev);
        }
    }

    /// `wait_event_of` for one event name.
    pub fn wait_event(&mut self, name: &str, timeout: Duration) -> serde_json::Value {
        self.wait_event_of(&[name], timeout)
    }

    /// The next event if one arrives within `timeout` (events that came
    /// during `execute` first), else None.
    pub fn try_event(&mut self, timeout: Duration) -> Option<serde_json::Value> {
        if let Some(ev) = self.events.pop_front() {
            return Some(ev);
        }
        match self.read_until(Some(Instant::now() + timeout)) {
            Some(v) if v.get("event").is_some() => Some(v),
            Some(v) => panic!("QMP reply while waiting for an event: {v}"),
            None => None,
        }
    }

    /// Runs a command; returns its reply (events before it are kept for
    /// `wait_event`).
    pub fn execute(&mut self, cmd: &str, args: serde_json::Value) -> serde_json::Value {
        use std::io::Write;
        let msg = serde_json::json!({"execute": cmd, "arguments": args});
        let mut s = self.stream.get_ref();
        writeln!(s, "{msg}").expect("QMP write");
        loop {
            let v = self.read();
            if v.get("event").is_none() {
                return v;
            }
            self.events.push_back(v);
        }
    }
}

/// Whether a UNIX socket bound at `path` is listening.
pub fn listening(path: &Path) -> bool {
    let want = path.to_string_lossy();
    std::fs::read_to_string("/proc/net/unix").is_ok_and(|t| {
        t.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() >= 8
                && f[7] == want
                && u32::from_str_radix(f[3], 16).is_ok_and(|flags| flags & 0x10000 != 0)
        })
    })
}
