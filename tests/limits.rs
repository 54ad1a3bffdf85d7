//! Limits a frontend cannot exceed (issue 18, item 5): memory regions
//! (count and total size), queue index and size, message sizes. Each is
//! refused with a log line naming the limit and the value, that connection
//! ends, and the daemon goes on serving its other export and the next
//! connection to the same one.

mod common;

use std::io::Read;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

/// A daemon with two exports: `e0` on `d.socket` with `e0_opts` appended to
/// its options, and `e1` on `{dir}/other.sock` with the defaults; and a VM
/// connected to `e1`, which must be served throughout.
fn setup(e0_opts: &str) -> (Daemon, Vm) {
    let dir = tempfile::tempdir().unwrap();
    for img in ["disk.img", "other.img"] {
        std::fs::File::create(dir.path().join(img))
            .unwrap()
            .set_len(16 * MIB)
            .unwrap();
    }
    let e0 = format!(
        "vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path={{sock}},writable=on{e0_opts}"
    );
    let d = Daemon::start_in(
        dir,
        &[
            "--blockdev",
            "driver=file,node-name=f0,filename={dir}/disk.img",
            "--blockdev",
            "driver=raw,node-name=d0,file=f0",
            "--blockdev",
            "driver=file,node-name=f1,filename={dir}/other.img",
            "--blockdev",
            "driver=raw,node-name=d1,file=f1",
            "--export",
            &e0,
            "--export",
            "vhost-user-blk,id=e1,node-name=d1,addr.type=unix,addr.path={dir}/other.sock,writable=on",
        ],
    );
    let other_sock = d.dir.path().join("other.sock");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !listening(&other_sock) {
        assert!(Instant::now() < deadline, "second export never listened");
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut other = Vm::connect(&other_sock, VmOptions::default());
    assert_serving(&mut other);
    (d, other)
}

/// A write and a read on queue 0.
fn assert_serving(vm: &mut Vm) {
    vm.reset_alloc();
    let data = pattern(7, 4096);
    assert_eq!(vm.write(0, 8, &data), S_OK, "write");
    let (st, back) = vm.read(0, 8, 4096);
    assert_eq!(st, S_OK, "read");
    assert_eq!(back, data);
}

/// After a refusal: the daemon runs, the other export's frontend (connected
/// all along) is served, a new connection to `e0` is served, and the log
/// names the limit (`times` refusals so far).
fn assert_refused_and_alive(d: &mut Daemon, other: &mut Vm, logged: &str, times: usize) {
    assert!(d.alive(), "daemon died:\n{}", d.log());
    assert_serving(other);
    let mut vm = Vm::connect(&d.socket, VmOptions::default());
    assert_serving(&mut vm);
    // The warning is written before the connection is torn down; the
    // serving above took longer than that.
    let deadline = Instant::now() + Duration::from_secs(10);
    while d.log().matches(logged).count() < times {
        assert!(
            Instant::now() < deadline,
            "log does not say {logged:?} {times} times:\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until the daemon closes `s` (EOF or a reset), reading and
/// dropping whatever it sent first (a NACK).
fn assert_closed(s: &UnixStream) {
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match (&*s).read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => panic!("the daemon kept the connection open: {e}"),
        }
    }
}

/// A connection with features and protocol features negotiated (REPLY_ACK
/// on every message), no memory table yet: the vhost crate's frontend, and
/// a second handle on its socket for raw messages. The frontend believes
/// the device has 256 queues, so it sends any index it is given.
fn negotiated(socket: &Path) -> (Frontend, UnixStream) {
    let s = UnixStream::connect(socket).expect("connect");
    let raw = s.try_clone().unwrap();
    let mut f = Frontend::from_stream(s, 256);
    f.set_owner().unwrap();
    let features = f.get_features().unwrap();
    let pf = f.get_protocol_features().unwrap();
    f.set_protocol_features(
        pf & (VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ),
    )
    .unwrap();
    f.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    f.set_features(features & (VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES))
        .unwrap();
    (f, raw)
}

/// Version 1 in the header flags.
const V1: u32 = 0x1;
const NEED_REPLY: u32 = 0x8;

/// Sends a raw message: the header says `size` (which may lie about the
/// body that follows), with `fds` attached.
fn send_raw(s: &UnixStream, request: u32, size: u32, body: &[u8], fds: &[RawFd]) {
    let mut msg = Vec::with_capacity(12 + body.len());
    msg.extend_from_slice(&request.to_le_bytes());
    msg.extend_from_slice(&(V1 | NEED_REPLY).to_le_bytes());
    msg.extend_from_slice(&size.to_le_bytes());
    msg.extend_from_slice(body);
    s.send_with_fds(&[&msg[..]], fds).expect("send");
}

// Request codes (vhost-user.rst).
const GET_FEATURES: u32 = 1;
const SET_MEM_TABLE: u32 = 5;
const SET_VRING_KICK: u32 = 12;
const GET_CONFIG: u32 = 24;
const ADD_MEM_REG: u32 = 37;

/// One memory region as SET_MEM_TABLE and ADD_MEM_REG carry it.
fn region_bytes(gpa: u64, size: u64, user_addr: u64, offset: u64) -> Vec<u8> {
    [gpa, size, user_addr, offset]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect()
}

fn region(gpa: u64, size: u64, fd: &std::fs::File, offset: u64) -> VhostUserMemoryRegionInfo {
    VhostUserMemoryRegionInfo {
        guest_phys_addr: gpa,
        memory_size: size,
        // A made-up frontend address: the daemon only translates ring
        // addresses with it.
        userspace_addr: 0x7f00_0000_0000 + gpa,
        mmap_offset: offset,
        mmap_handle: fd.as_raw_fd(),
    }
}

fn vm_opts(regions: Vec<(u64, u64)>) -> VmOptions {
    VmOptions {
        regions,
        ..VmOptions::default()
    }
}

// ---------------------------------------------------------------------------
// Memory regions: count
// ---------------------------------------------------------------------------

/// max-mem-regions=4: GET_MAX_MEM_SLOTS says 4; a SET_MEM_TABLE of 5
/// regions is refused, and so is a fifth region added to four.
#[test]
fn more_regions_than_max_mem_regions_are_refused() {
    let (mut d, mut other) = setup(",max-mem-regions=4");
    let (mut f, raw) = negotiated(&d.socket);
    assert_eq!(f.get_max_mem_slots().unwrap(), 4);
    drop((f, raw));

    let five = vm_opts(vec![
        (0, 16 * MIB),
        (16 * MIB, 16 * MIB),
        (32 * MIB, 16 * MIB),
        (48 * MIB, 8 * MIB),
        (56 * MIB, 8 * MIB),
    ]);
    assert!(
        Vm::try_connect(&d.socket, five).is_err(),
        "a table of 5 regions was accepted"
    );
    assert_refused_and_alive(&mut d, &mut other, FIVE_OVER_FOUR, 1);

    let four = vm_opts(vec![
        (0, 16 * MIB),
        (16 * MIB, 16 * MIB),
        (32 * MIB, 16 * MIB),
        (48 * MIB, 16 * MIB),
    ]);
    let mut vm = Vm::connect(&d.socket, four);
    assert_serving(&mut vm);
    let extra = memfd(4 * KIB);
    assert!(
        vm.frontend
            .add_mem_region(&region(64 * MIB, 4 * KIB, &extra, 0))
            .is_err(),
        "a fifth region was added"
    );
    assert!(vm.frontend.get_features().is_err(), "connection still open");
    drop(vm);
    assert_refused_and_alive(&mut d, &mut other, FIVE_OVER_FOUR, 2);
}

const FIVE_OVER_FOUR: &str =
    "5 guest memory regions exceed the export's max-mem-regions (4); memory update refused";

/// By default a frontend may map the 509 regions GET_MAX_MEM_SLOTS
/// promises, one by one (ADD_MEM_REG), and not one more: the library
/// itself never counted them.
#[test]
fn default_max_mem_regions_is_509() {
    let (mut d, mut other) = setup("");
    let (mut f, raw) = negotiated(&d.socket);
    assert_eq!(f.get_max_mem_slots().unwrap(), 509);
    let file = memfd(510 * 4 * KIB);
    for i in 0..509 {
        let r = region(i * 4 * KIB, 4 * KIB, &file, i * 4 * KIB);
        f.add_mem_region(&r)
            .unwrap_or_else(|e| panic!("region {i} refused: {e}\n{}", d.log()));
    }
    let r = region(509 * 4 * KIB, 4 * KIB, &file, 509 * 4 * KIB);
    assert!(f.add_mem_region(&r).is_err(), "region 510 was accepted");
    assert_closed(&raw);
    assert_refused_and_alive(
        &mut d,
        &mut other,
        "510 guest memory regions exceed the export's max-mem-regions (509); \
         memory update refused",
        1,
    );
}

// ---------------------------------------------------------------------------
// Memory regions: total size
// ---------------------------------------------------------------------------

/// max-guest-memory=64M: 80 MiB in one SET_MEM_TABLE is refused; 64 MiB is
/// served, and 4 KiB more by ADD_MEM_REG is refused.
#[test]
fn more_guest_memory_than_max_guest_memory_is_refused() {
    let (mut d, mut other) = setup(",max-guest-memory=64M");
    let big = vm_opts(vec![(0, 48 * MIB), (48 * MIB, 32 * MIB)]);
    assert!(
        Vm::try_connect(&d.socket, big).is_err(),
        "80 MiB of guest memory were accepted"
    );
    assert_refused_and_alive(
        &mut d,
        &mut other,
        "83886080 bytes of guest memory exceed the export's max-guest-memory (67108864); \
         memory update refused",
        1,
    );

    // The default VM has exactly 64 MiB.
    let mut vm = Vm::connect(&d.socket, VmOptions::default());
    assert_serving(&mut vm);
    let extra = memfd(4 * KIB);
    assert!(
        vm.frontend
            .add_mem_region(&region(MEM_SIZE, 4 * KIB, &extra, 0))
            .is_err(),
        "a region past max-guest-memory was added"
    );
    assert!(vm.frontend.get_features().is_err(), "connection still open");
    drop(vm);
    assert_refused_and_alive(
        &mut d,
        &mut other,
        "67112960 bytes of guest memory exceed the export's max-guest-memory (67108864); \
         memory update refused",
        1,
    );
}

/// The default max-guest-memory is 1 TiB: a region of exactly 1 TiB is
/// mapped (a sparse memfd: nothing is allocated), 64 KiB more is not.
#[test]
fn default_max_guest_memory_is_one_tib() {
    let (mut d, mut other) = setup("");
    const TIB: u64 = 1 << 40;
    let file = memfd(TIB + 64 * KIB);
    let (f, raw) = negotiated(&d.socket);
    f.set_mem_table(&[region(0, TIB, &file, 0)])
        .unwrap_or_else(|e| panic!("1 TiB refused: {e}\n{}", d.log()));
    drop((f, raw));
    let (f, raw) = negotiated(&d.socket);
    assert!(
        f.set_mem_table(&[region(0, TIB + 64 * KIB, &file, 0)])
            .is_err(),
        "1 TiB + 64 KiB accepted"
    );
    assert_closed(&raw);
    assert_refused_and_alive(
        &mut d,
        &mut other,
        "1099511693312 bytes of guest memory exceed the export's max-guest-memory \
         (1099511627776); memory update refused",
        1,
    );
}

// ---------------------------------------------------------------------------
// Queues: index and size
// ---------------------------------------------------------------------------

/// num-queues=2: every vring request for queue 2 is refused and ends the
/// connection; queue 1 is accepted.
#[test]
fn vring_requests_beyond_num_queues_are_refused() {
    let (mut d, mut other) = setup(",num-queues=2");
    let file = memfd(MIB);
    type Request = fn(&mut Frontend, usize) -> bool;
    let requests: [(&str, Request); 8] = [
        ("SET_VRING_NUM", |f, q| f.set_vring_num(q, 256).is_ok()),
        ("SET_VRING_ADDR", |f, q| {
            f.set_vring_addr(
                q,
                &VringConfigData {
                    queue_max_size: 256,
                    queue_size: 256,
                    flags: 0,
                    desc_table_addr: 0x7f00_0000_0000,
                    used_ring_addr: 0x7f00_0001_0000,
                    avail_ring_addr: 0x7f00_0002_0000,
                    log_addr: None,
                },
            )
            .is_ok()
        }),
        ("SET_VRING_BASE", |f, q| f.set_vring_base(q, 0).is_ok()),
        ("GET_VRING_BASE", |f, q| f.get_vring_base(q).is_ok()),
        ("SET_VRING_KICK", |f, q| {
            f.set_vring_kick(q, &eventfd()).is_ok()
        }),
        ("SET_VRING_CALL", |f, q| {
            f.set_vring_call(q, &eventfd()).is_ok()
        }),
        ("SET_VRING_ERR", |f, q| {
            f.set_vring_err(q, &eventfd()).is_ok()
        }),
        ("SET_VRING_ENABLE", |f, q| {
            f.set_vring_enable(q, true).is_ok()
        }),
    ];
    for (i, (name, req)) in requests.into_iter().enumerate() {
        let (mut f, raw) = negotiated(&d.socket);
        f.set_mem_table(&[region(0, MIB, &file, 0)]).unwrap();
        if name != "GET_VRING_BASE" {
            // The last queue is fine (GET_VRING_BASE of a ring never
            // started is left out: it waits for nothing, but proves nothing).
            assert!(req(&mut f, 1), "{name} for queue 1 refused\n{}", d.log());
        }
        assert!(!req(&mut f, 2), "{name} for queue 2 accepted");
        assert_closed(&raw);
        assert_refused_and_alive(
            &mut d,
            &mut other,
            "vring index 2 out of range: the device has 2 queues",
            i + 1,
        );
    }
}

/// queue-size=256: SET_VRING_NUM of 0, 512 and sizes that are not powers
/// of two (a split ring's must be) are refused; 1, 128 and 256 are taken.
#[test]
fn vring_sizes_out_of_range_or_not_powers_of_two_are_refused() {
    let (mut d, mut other) = setup(",queue-size=256");
    for ok in [1, 128, 256] {
        let (f, _raw) = negotiated(&d.socket);
        f.set_vring_num(0, ok)
            .unwrap_or_else(|e| panic!("queue size {ok} refused: {e}\n{}", d.log()));
    }
    for bad in [0u16, 512, 100, 255, 3] {
        let (f, raw) = negotiated(&d.socket);
        assert!(
            f.set_vring_num(0, bad).is_err(),
            "queue size {bad} accepted"
        );
        assert_closed(&raw);
        assert_refused_and_alive(
            &mut d,
            &mut other,
            &format!("vring 0 requested queue size {bad}: not a power of two from 1 to 256"),
            1,
        );
    }
}

// ---------------------------------------------------------------------------
// Message sizes
// ---------------------------------------------------------------------------

/// A header whose size field is over the protocol's 4096-byte limit ends
/// the connection before the body is read.
#[test]
fn message_size_over_the_protocol_limit_is_refused() {
    let (mut d, mut other) = setup("");
    let (_f, raw) = negotiated(&d.socket);
    send_raw(&raw, GET_FEATURES, 4097, &[], &[]);
    assert_closed(&raw);
    assert_refused_and_alive(
        &mut d,
        &mut other,
        "invalid message (a header whose size field is over the 4096-byte message limit",
        1,
    );
}

/// GET_CONFIG and SET_CONFIG beyond the 256-byte config space (QEMU's
/// VHOST_USER_MAX_CONFIG_SIZE) end the connection; 256 bytes are read.
#[test]
fn config_access_beyond_256_bytes_is_refused() {
    let (mut d, mut other) = setup("");
    let (mut f, raw) = negotiated(&d.socket);
    let (_, payload) = f
        .get_config(0, 256, VhostUserConfigFlags::WRITABLE, &[0u8; 256])
        .expect("GET_CONFIG of 256 bytes");
    assert_eq!(payload.len(), 256);
    // Raw: the vhost crate's frontend would wait for ever for the payload
    // of a daemon that answers with none and keeps the connection.
    let mut body = Vec::new();
    for v in [0u32, 300, 0] {
        body.extend_from_slice(&v.to_le_bytes());
    }
    body.extend_from_slice(&[0u8; 300]);
    send_raw(&raw, GET_CONFIG, body.len() as u32, &body, &[]);
    assert_closed(&raw);
    assert_refused_and_alive(
        &mut d,
        &mut other,
        "GET_CONFIG of 300 bytes at offset 0 is beyond the 256-byte config space; \
         ending the connection",
        1,
    );
    let (mut f, raw) = negotiated(&d.socket);
    assert!(f
        .set_config(200, VhostUserConfigFlags::WRITABLE, &[0u8; 100])
        .is_err());
    assert_closed(&raw);
    assert_refused_and_alive(
        &mut d,
        &mut other,
        "SET_CONFIG of 100 bytes at offset 200 is beyond the 256-byte config space",
        1,
    );
}

/// More than the 32 file descriptors a message may carry: every one of
/// them is closed at once, and the connection ends. (The vhost crate drops
/// that read and reads on, so the message's body is taken for the next
/// header, which is invalid: the connection ends at the next message.)
#[test]
fn more_than_32_fds_on_a_message_are_closed_and_end_the_connection() {
    let (mut d, mut other) = setup("");
    let (_f, raw) = negotiated(&d.socket);
    // memfds with a name of their own, to find them in /proc/PID/fd.
    let files: Vec<std::fs::File> = (0..33)
        .map(|_| {
            // SAFETY: memfd_create with a valid name; the File owns the fd.
            unsafe {
                let fd = libc::memfd_create(c"vub-limits-fd".as_ptr(), libc::MFD_CLOEXEC);
                assert!(fd >= 0);
                std::os::fd::FromRawFd::from_raw_fd(fd)
            }
        })
        .collect();
    let raw_fds: Vec<RawFd> = files.iter().map(|f| f.as_raw_fd()).collect();
    send_raw(&raw, SET_VRING_KICK, 8, &0u64.to_le_bytes(), &raw_fds);
    send_raw(&raw, GET_FEATURES, 0, &[], &[]);
    assert_closed(&raw);
    assert_refused_and_alive(&mut d, &mut other, "invalid message (", 1);
    // None of the 33 stayed open in the daemon.
    let held = |pid: i32| {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .flatten()
            .filter(|e| {
                std::fs::read_link(e.path())
                    .is_ok_and(|p| p.to_string_lossy().contains("vub-limits-fd"))
            })
            .count()
    };
    assert_eq!(
        held(d.pid()),
        0,
        "the daemon kept descriptors of the message"
    );
}

/// SET_MEM_TABLE whose region count disagrees with its body (3 claimed, 1
/// there), or is over the 32 a message can carry, ends the connection.
#[test]
fn set_mem_table_claiming_more_regions_than_it_holds_is_refused() {
    let (mut d, mut other) = setup("");
    let file = memfd(MIB);
    let fd = file.as_raw_fd();
    // Claims 3, holds 1 (and one fd).
    let mut body = Vec::new();
    body.extend_from_slice(&3u32.to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes());
    body.extend(region_bytes(0, MIB, 0x7f00_0000_0000, 0));
    let (_f, raw) = negotiated(&d.socket);
    send_raw(&raw, SET_MEM_TABLE, body.len() as u32, &body, &[fd]);
    assert_closed(&raw);
    assert_refused_and_alive(&mut d, &mut other, "invalid message (", 1);
    // Claims and holds 33 regions, with 32 fds.
    let mut body = Vec::new();
    body.extend_from_slice(&33u32.to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes());
    for i in 0..33u64 {
        body.extend(region_bytes(
            i * 4 * KIB,
            4 * KIB,
            0x7f00_0000_0000 + i * 4 * KIB,
            0,
        ));
    }
    let (_f, raw) = negotiated(&d.socket);
    send_raw(&raw, SET_MEM_TABLE, body.len() as u32, &body, &[fd; 32]);
    assert_closed(&raw);
    assert_refused_and_alive(&mut d, &mut other, "invalid message (", 2);
}

/// ADD_MEM_REG with a body of the wrong size, a region of size 0, or one
/// whose end overflows (guest or frontend address, file offset), ends the
/// connection. The vhost crate checks the body's size only; a frontend
/// address that overflowed was accepted, and the next SET_VRING_ADDR
/// overflowed computing the region's end.
#[test]
fn add_mem_reg_with_a_bad_size_is_refused() {
    let (mut d, mut other) = setup("");
    let file = memfd(MIB);
    let fd = file.as_raw_fd();
    // The body is 8 bytes of padding and one region (40 bytes).
    let body = |gpa: u64, size: u64, ua: u64, offset: u64| {
        let mut b = 0u64.to_le_bytes().to_vec();
        b.extend(region_bytes(gpa, size, ua, offset));
        b
    };
    let ua = 0x7f00_0000_0000;
    let top = u64::MAX - 4095;
    let cases: [(Vec<u8>, &str); 5] = [
        (body(0, MIB, ua, 0)[..32].to_vec(), "invalid message ("),
        (
            body(0, 0, ua, 0),
            "ADD_MEM_REG of 0 bytes at guest address 0x0, frontend address 0x7f0000000000, \
             file offset 0x0: empty, or ends beyond 2^64",
        ),
        (
            body(top, MIB, ua, 0),
            "ADD_MEM_REG of 1048576 bytes at guest address 0xfffffffffffff000, \
             frontend address 0x7f0000000000, file offset 0x0: empty, or ends beyond 2^64",
        ),
        (
            body(0, MIB, top, 0),
            "ADD_MEM_REG of 1048576 bytes at guest address 0x0, frontend address \
             0xfffffffffffff000, file offset 0x0: empty, or ends beyond 2^64",
        ),
        (
            body(0, MIB, ua, top),
            "ADD_MEM_REG of 1048576 bytes at guest address 0x0, frontend address \
             0x7f0000000000, file offset 0xfffffffffffff000: empty, or ends beyond 2^64",
        ),
    ];
    for (b, logged) in cases {
        let (f, raw) = negotiated(&d.socket);
        send_raw(&raw, ADD_MEM_REG, b.len() as u32, &b, &[fd]);
        // A frontend that goes on regardless: rings in the region.
        let _ = f.set_vring_addr(
            0,
            &VringConfigData {
                queue_max_size: 256,
                queue_size: 256,
                flags: 0,
                desc_table_addr: top,
                used_ring_addr: top + 0x100,
                avail_ring_addr: top + 0x200,
                log_addr: None,
            },
        );
        assert_closed(&raw);
        assert_refused_and_alive(&mut d, &mut other, logged, 1);
    }
    // A well-formed ADD_MEM_REG is taken.
    let (mut f, _raw) = negotiated(&d.socket);
    f.add_mem_region(&region(0, MIB, &file, 0))
        .unwrap_or_else(|e| panic!("a good region refused: {e}\n{}", d.log()));
}
