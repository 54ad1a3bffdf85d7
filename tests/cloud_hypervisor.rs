//! cloud-hypervisor as a frontend. It cannot boot a guest here (KVM only),
//! so these tests replay, message by message, what its vhost-user-blk
//! device does, as its sources do it (cloud-hypervisor at commit ae44c297,
//! vhost 0.17 on the wire):
//!
//! - `Blk::new` (virtio-devices/src/vhost_user/blk.rs) at VM creation:
//!   connect (retrying every 100 ms on ENOENT/ECONNREFUSED),
//!   SET_OWNER, GET_FEATURES, then `negotiate_features_vhost_user`
//!   (vu_common_ctrl.rs): acked = its features & the backend's, and when
//!   PROTOCOL_FEATURES is in there GET_PROTOCOL_FEATURES and
//!   SET_PROTOCOL_FEATURES (its set & the backend's), NEED_REPLY on every
//!   later message once REPLY_ACK is acked; GET_QUEUE_NUM when MQ is acked;
//!   one GET_CONFIG of the whole 60-byte `VirtioBlockConfig`, kept as the
//!   guest's config space (num_queues overwritten with its own count).
//!   SET_FEATURES is not sent yet.
//! - the guest: reads that cached config (no message), acks features; a
//!   write of the writeback byte is forwarded as SET_CONFIG.
//! - `activate` -> `setup_vhost_user`: SET_FEATURES (the guest's acks |
//!   PROTOCOL_FEATURES, & the backend's), SET_MEM_TABLE (one memfd per RAM
//!   region, mmap_offset 0), SET_VRING_NUM for every queue first, then per
//!   queue SET_VRING_ADDR (flags 0, no log), SET_VRING_BASE (the avail idx
//!   read from guest memory), SET_VRING_CALL, SET_VRING_KICK, and only then
//!   SET_VRING_ENABLE 1 for each queue. No SET_BACKEND_REQ_FD for block
//!   devices. GET_INFLIGHT_FD + SET_INFLIGHT_FD after the SET_VRING_NUMs
//!   only when the backend offers INFLIGHT_SHMFD (we do; qemu-storage-daemon
//!   7.2 does not).
//! - memory hotplug: ADD_MEM_REG (CONFIGURE_MEM_SLOTS acked).
//! - reset (guest reboot): SET_VRING_ENABLE 0 and GET_VRING_BASE per queue;
//!   the next activation repeats `setup_vhost_user` on the same connection.
//! - reconnect (`VhostUserEpollHandler::reconnect` on EPOLLHUP of the
//!   socket): connect again with the same retry loop, SET_OWNER,
//!   GET_FEATURES, SET_PROTOCOL_FEATURES with the set acked before (no GET),
//!   NEED_REPLY, then `setup_vhost_user` again with bases = the avail idx in
//!   guest memory. No GET_CONFIG.
//!
//! The daemon is attached with
//! `--disk vhost_user=true,socket=/path/to.sock,num_queues=N,queue_size=128`
//! and `--memory size=...,shared=on` (see README).

mod common;

use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::client::MIB;
use common::*;
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

// virtio feature bits, as cloud-hypervisor names them.
const BLK_F_SIZE_MAX: u64 = 1 << 1;
const BLK_F_SEG_MAX: u64 = 1 << 2;
const BLK_F_GEOMETRY: u64 = 1 << 4;
const BLK_F_RO: u64 = 1 << 5;
const BLK_F_BLK_SIZE: u64 = 1 << 6;
const BLK_F_FLUSH: u64 = 1 << 9;
const BLK_F_TOPOLOGY: u64 = 1 << 10;
const BLK_F_CONFIG_WCE: u64 = 1 << 11;
const BLK_F_MQ: u64 = 1 << 12;
const BLK_F_DISCARD: u64 = 1 << 13;
const BLK_F_WRITE_ZEROES: u64 = 1 << 14;
const BLK_F_SECURE_ERASE: u64 = 1 << 16;
const F_LOG_ALL: u64 = 1 << 26;
const F_INDIRECT_DESC: u64 = 1 << 28;
const F_EVENT_IDX: u64 = 1 << 29;
const F_PROTOCOL_FEATURES: u64 = 1 << 30;
const F_VERSION_1: u64 = 1 << 32;
const F_ACCESS_PLATFORM: u64 = 1 << 33;
const F_RING_PACKED: u64 = 1 << 34;
const F_IN_ORDER: u64 = 1 << 35;
const F_ORDER_PLATFORM: u64 = 1 << 36;
const F_NOTIFICATION_DATA: u64 = 1 << 38;
const F_RING_RESET: u64 = 1 << 40;

/// vhost_user/mod.rs DEFAULT_VIRTIO_FEATURES.
const CHV_DEFAULT_VIRTIO_FEATURES: u64 = F_INDIRECT_DESC
    | F_EVENT_IDX
    | F_VERSION_1
    | F_IN_ORDER
    | F_ORDER_PLATFORM
    | F_NOTIFICATION_DATA
    | F_PROTOCOL_FEATURES
    | F_LOG_ALL;

/// blk.rs `Blk::new`: the device and vring features it offers to negotiate.
fn chv_avail_features(num_queues: usize) -> u64 {
    let mut f = BLK_F_SIZE_MAX
        | BLK_F_SEG_MAX
        | BLK_F_GEOMETRY
        | BLK_F_RO
        | BLK_F_BLK_SIZE
        | BLK_F_FLUSH
        | BLK_F_TOPOLOGY
        | BLK_F_CONFIG_WCE
        | BLK_F_DISCARD
        | BLK_F_WRITE_ZEROES
        | CHV_DEFAULT_VIRTIO_FEATURES;
    if num_queues > 1 {
        f |= BLK_F_MQ;
    }
    f
}

/// blk.rs `Blk::new`: the protocol features it offers.
fn chv_avail_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD
        | VhostUserProtocolFeatures::LOG_SHMFD
        | VhostUserProtocolFeatures::DEVICE_STATE
}

/// What a Linux virtio-blk guest driver knows (its feature table plus the
/// ring's transport features); it acks these where offered.
const LINUX_GUEST_FEATURES: u64 = BLK_F_SEG_MAX
    | BLK_F_SIZE_MAX
    | BLK_F_GEOMETRY
    | BLK_F_RO
    | BLK_F_BLK_SIZE
    | BLK_F_FLUSH
    | BLK_F_TOPOLOGY
    | BLK_F_CONFIG_WCE
    | BLK_F_MQ
    | BLK_F_DISCARD
    | BLK_F_WRITE_ZEROES
    | BLK_F_SECURE_ERASE
    | F_INDIRECT_DESC
    | F_EVENT_IDX
    | F_VERSION_1
    | F_ACCESS_PLATFORM
    | F_RING_PACKED
    | F_IN_ORDER
    | F_ORDER_PLATFORM
    | F_NOTIFICATION_DATA
    | F_RING_RESET;

/// size_of::<block::VirtioBlockConfig>() in cloud-hypervisor (packed).
const CHV_CONFIG_LEN: u32 = 60;
/// cloud-hypervisor's default disk queue_size (vm_config.rs).
const CHV_QUEUE_SIZE: u16 = 128;
/// Guest RAM as cloud-hypervisor lays it out for a VM with memory above the
/// 32-bit hole: one region below, one from 4 GiB, each its own memfd.
const LOW_RAM: u64 = 32 << 20;
const HIGH_RAM_GPA: u64 = 1 << 32;
const HIGH_RAM: u64 = 16 << 20;

/// The state cloud-hypervisor keeps for one vhost-user-blk device.
struct ChvBlk {
    /// Blk::new: avail & backend, what the guest sees as device features.
    avail_features: u64,
    backend_features: u64,
    acked_protocol_features: VhostUserProtocolFeatures,
    /// The config space the guest reads (cached at creation).
    config: Vec<u8>,
    /// The inflight buffer, got once and set back at every activation and
    /// reconnection (the device's `inflight`).
    inflight: std::cell::RefCell<Option<(VhostUserInflight, std::fs::File)>>,
}

/// `connect_vhost_user` in client mode: retries every 100 ms while the
/// socket is missing or refuses, for at most 60 s.
fn chv_connect(socket: &Path, num_queues: usize) -> Frontend {
    let start = Instant::now();
    loop {
        match Frontend::connect(socket, num_queues as u64) {
            Ok(f) => return f,
            Err(vhost::Error::VhostUserProtocol(vhost::vhost_user::Error::SocketConnect(e)))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound
                        | std::io::ErrorKind::Interrupted
                        | std::io::ErrorKind::ConnectionRefused
                ) =>
            {
                assert!(
                    start.elapsed() < Duration::from_secs(60),
                    "cloud-hypervisor gives up after 60 s: {e}"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("cloud-hypervisor does not retry this connect error: {e}"),
        }
    }
}

/// `Blk::new` (no restored state).
fn chv_blk_new(socket: &Path, num_queues: usize) -> (Frontend, ChvBlk) {
    let mut vu = chv_connect(socket, num_queues);
    vu.set_owner().expect("SET_OWNER");
    let backend_features = vu.get_features().expect("GET_FEATURES");

    // negotiate_features_vhost_user
    let avail_pf = chv_avail_protocol_features();
    let acked_features = chv_avail_features(num_queues) & backend_features;
    let acked_pf = if acked_features & F_PROTOCOL_FEATURES != 0 {
        let backend_pf = vu.get_protocol_features().expect("GET_PROTOCOL_FEATURES");
        let acked = avail_pf & backend_pf;
        vu.set_protocol_features(acked)
            .expect("SET_PROTOCOL_FEATURES");
        acked
    } else {
        VhostUserProtocolFeatures::empty()
    };
    if acked_pf.contains(VhostUserProtocolFeatures::REPLY_ACK) {
        vu.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    }

    let backend_num_queues = if acked_pf.contains(VhostUserProtocolFeatures::MQ) {
        vu.get_queue_num().expect("GET_QUEUE_NUM") as usize
    } else {
        1
    };
    assert!(
        num_queues <= backend_num_queues,
        "cloud-hypervisor refuses the device: {num_queues} queues asked, backend has {backend_num_queues}"
    );

    let zeroes = vec![0u8; CHV_CONFIG_LEN as usize];
    let (_, mut config) = vu
        .get_config(0, CHV_CONFIG_LEN, VhostUserConfigFlags::WRITABLE, &zeroes)
        .expect("GET_CONFIG");
    // VirtioBlockConfig::from_slice takes exactly its size, else the guest
    // gets an all-zero config (capacity 0).
    assert_eq!(config.len(), CHV_CONFIG_LEN as usize, "config length");
    config[34..36].copy_from_slice(&(num_queues as u16).to_le_bytes());
    (
        vu,
        ChvBlk {
            avail_features: acked_features,
            backend_features,
            acked_protocol_features: acked_pf,
            config,
            inflight: std::cell::RefCell::new(None),
        },
    )
}

/// Guest RAM: a region per memfd, mmap_offset 0, as cloud-hypervisor's
/// memory manager with `shared=on` creates them.
fn chv_guest_memory() -> (GuestMemoryMmap<()>, Vec<std::fs::File>) {
    let low = memfd(LOW_RAM);
    let high = memfd(HIGH_RAM);
    let mem = GuestMemoryMmap::<()>::from_ranges_with_files(vec![
        (
            GuestAddress(0),
            LOW_RAM as usize,
            Some(FileOffset::new(low.try_clone().unwrap(), 0)),
        ),
        (
            GuestAddress(HIGH_RAM_GPA),
            HIGH_RAM as usize,
            Some(FileOffset::new(high.try_clone().unwrap(), 0)),
        ),
    ])
    .expect("guest memory");
    (mem, vec![low, high])
}

/// `update_mem_table`: one entry per region, straight from the mapping.
fn chv_mem_regions(mem: &GuestMemoryMmap<()>) -> Vec<VhostUserMemoryRegionInfo> {
    mem.iter()
        .map(|r| {
            let fo = r.file_offset().expect("vhost-user needs shared memory");
            VhostUserMemoryRegionInfo {
                guest_phys_addr: r.start_addr().0,
                memory_size: r.len(),
                userspace_addr: r.as_ptr() as u64,
                mmap_offset: fo.start(),
                mmap_handle: fo.file().as_raw_fd(),
            }
        })
        .collect()
}

/// Rings the guest driver sets up: in high RAM, as a guest may place them.
fn guest_rings(mem: &GuestMemoryMmap<()>, n: usize, event_idx: bool) -> Vec<VirtQueue> {
    (0..n)
        .map(|q| {
            let base = HIGH_RAM_GPA + q as u64 * 0x4000;
            let vq = VirtQueue::new(
                CHV_QUEUE_SIZE,
                GuestAddress(base),
                GuestAddress(base + 0x1000),
                GuestAddress(base + 0x2000),
                event_idx,
            );
            vq.init(mem);
            vq
        })
        .collect()
}

fn hva(mem: &GuestMemoryMmap<()>, gpa: GuestAddress) -> u64 {
    mem.get_host_address(gpa).unwrap() as u64
}

/// The avail idx in guest memory (what `queue.avail_idx(mem)` reads).
fn avail_idx(mem: &GuestMemoryMmap<()>, vq: &VirtQueue) -> u16 {
    u16::from_le(mem.read_obj(GuestAddress(vq.avail.0 + 2)).unwrap())
}

/// `setup_vhost_user` (activation, reboot and reconnect all run it).
fn chv_setup_vhost_user(
    vu: &mut Frontend,
    dev: &ChvBlk,
    mem: &GuestMemoryMmap<()>,
    queues: &[VirtQueue],
    acked_features: u64,
) {
    let acked = acked_features & dev.backend_features;
    vu.set_features(acked).expect("SET_FEATURES");
    vu.set_mem_table(&chv_mem_regions(mem))
        .expect("SET_MEM_TABLE");
    for (i, q) in queues.iter().enumerate() {
        vu.set_vring_num(i, q.size).expect("SET_VRING_NUM");
    }
    // Inflight tracking when the backend offers it (we do;
    // qemu-storage-daemon 7.2 does not): GET_INFLIGHT_FD the first time,
    // then SET_INFLIGHT_FD with the buffer kept, here and after a
    // reconnection.
    if dev
        .acked_protocol_features
        .contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD)
    {
        let mut kept = dev.inflight.borrow_mut();
        if kept.is_none() {
            let req = VhostUserInflight {
                mmap_size: 0,
                mmap_offset: 0,
                num_queues: queues.len() as u16,
                queue_size: queues[0].size,
            };
            *kept = Some(vu.get_inflight_fd(&req).expect("GET_INFLIGHT_FD"));
        }
        let (info, fd) = kept.as_ref().unwrap();
        vu.set_inflight_fd(info, fd.as_raw_fd())
            .expect("SET_INFLIGHT_FD");
    }
    for (i, q) in queues.iter().enumerate() {
        let cfg = VringConfigData {
            queue_max_size: CHV_QUEUE_SIZE,
            queue_size: q.size,
            flags: 0,
            desc_table_addr: hva(mem, q.desc),
            used_ring_addr: hva(mem, q.used),
            avail_ring_addr: hva(mem, q.avail),
            log_addr: None,
        };
        vu.set_vring_addr(i, &cfg).expect("SET_VRING_ADDR");
        vu.set_vring_base(i, avail_idx(mem, q))
            .expect("SET_VRING_BASE");
        vu.set_vring_call(i, &q.call).expect("SET_VRING_CALL");
        vu.set_vring_kick(i, &q.kick).expect("SET_VRING_KICK");
    }
    for i in 0..queues.len() {
        vu.set_vring_enable(i, true).expect("SET_VRING_ENABLE");
    }
}

/// The guest's acked features as `activate` passes them: what the driver
/// acked of the offered set, plus PROTOCOL_FEATURES kept from `Blk::new`.
fn guest_acked(dev: &ChvBlk) -> u64 {
    (LINUX_GUEST_FEATURES & dev.avail_features) | (dev.avail_features & F_PROTOCOL_FEATURES)
}

/// Creation + activation: a booted cloud-hypervisor guest's disk.
fn chv_boot(socket: &Path, num_queues: usize) -> (Vm, ChvBlk) {
    let (mut vu, dev) = chv_blk_new(socket, num_queues);
    let (mem, files) = chv_guest_memory();
    let acked = guest_acked(&dev);
    let queues = guest_rings(&mem, num_queues, acked & F_EVENT_IDX != 0);
    chv_setup_vhost_user(&mut vu, &dev, &mem, &queues, acked);
    let opts = VmOptions {
        num_queues,
        queue_size: CHV_QUEUE_SIZE,
        event_idx: acked & F_EVENT_IDX != 0,
        regions: vec![(0, LOW_RAM), (HIGH_RAM_GPA, HIGH_RAM)],
        backend_channel: false,
        inflight: false,
        log: false,
        used_log: None,
    };
    let memfd = files.into_iter().next().unwrap();
    (Vm::from_parts(mem, vu, queues, acked, opts, memfd), dev)
}

/// Reads `want.len()` bytes at `sector` on queue `q` and compares, naming
/// the first differing byte rather than printing both buffers.
fn check_read(vm: &mut Vm, q: usize, sector: u64, want: &[u8]) {
    let (st, got) = vm.read(q, sector, want.len() as u32);
    assert_eq!(st, S_OK, "read status, queue {q} sector {sector}");
    if let Some(i) = got.iter().zip(want).position(|(g, w)| g != w) {
        panic!("queue {q} sector {sector}: byte {i} differs");
    }
}

/// Compares image bytes with what was written, likewise.
fn check_image(path: &Path, offset: u64, want: &[u8]) {
    let got = read_file_at(path, offset, want.len());
    if let Some(i) = got.iter().zip(want).position(|(g, w)| g != w) {
        panic!("image at {offset}: byte {i} differs");
    }
}

fn le_u32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

#[test]
fn chv_creation_negotiates_what_cloud_hypervisor_expects() {
    let d = Daemon::raw(64 * MIB, &["--num-queues", "2"]);
    let (vu, dev) = chv_blk_new(&d.socket, 2);
    drop(vu);

    // Every device feature cloud-hypervisor offers and we implement is
    // acked; the ring features it would add and we lack are not.
    let want = BLK_F_SIZE_MAX
        | BLK_F_SEG_MAX
        | BLK_F_BLK_SIZE
        | BLK_F_FLUSH
        | BLK_F_TOPOLOGY
        | BLK_F_CONFIG_WCE
        | BLK_F_MQ
        | BLK_F_DISCARD
        | BLK_F_WRITE_ZEROES
        | F_INDIRECT_DESC
        | F_EVENT_IDX
        | F_VERSION_1
        | F_PROTOCOL_FEATURES;
    assert_eq!(
        dev.avail_features & want,
        want,
        "missing: {:#x}",
        want & !dev.avail_features
    );
    assert_eq!(dev.avail_features & BLK_F_RO, 0, "writable export");
    // No device state: the backend does not offer it, and cloud-hypervisor
    // then does without; inflight tracking and the dirty log (live
    // migration, issue 20) it takes.
    assert_eq!(
        dev.acked_protocol_features,
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
            | VhostUserProtocolFeatures::LOG_SHMFD
    );
    // The config as the guest sees it: capacity, blk_size, num_queues,
    // discard and write-zeroes limits non-zero (the guest driver turns
    // those off when they are 0).
    let c = &dev.config;
    assert_eq!(
        u64::from_le_bytes(c[0..8].try_into().unwrap()),
        64 * MIB / 512
    );
    assert_eq!(le_u32(c, 20), 512, "blk_size");
    assert_eq!(u16::from_le_bytes([c[34], c[35]]), 2, "num_queues");
    assert!(le_u32(c, 36) > 0, "max_discard_sectors");
    assert!(le_u32(c, 40) > 0, "max_discard_seg");
    assert!(le_u32(c, 48) > 0, "max_write_zeroes_sectors");
    assert!(le_u32(c, 52) > 0, "max_write_zeroes_seg");
}

#[test]
fn chv_guest_io_reboot_and_memory_hotplug() {
    let d = Daemon::raw(64 * MIB, &["--num-queues", "2"]);
    let (mut vm, dev) = chv_boot(&d.socket, 2);

    // I/O on both queues; the image file is the judge.
    let a = pattern(1, 64 * 1024);
    let b = pattern(2, 4096);
    assert_eq!(vm.write(0, 8, &a), S_OK);
    assert_eq!(vm.write(1, 1000, &b), S_OK);
    assert_eq!(vm.flush(1), S_OK);
    check_image(&d.image(), 8 * 512, &a);
    check_image(&d.image(), 1000 * 512, &b);
    check_read(&mut vm, 1, 8, &a);
    check_read(&mut vm, 0, 1000, &b);
    assert_eq!(vm.ranges(0, T_WRITE_ZEROES, &[(1000, 8, 0)]), S_OK);
    check_read(&mut vm, 0, 1000, &[0; 4096]);
    assert_eq!(vm.ranges(1, T_DISCARD, &[(2048, 2048, 0)]), S_OK);

    // The guest switches its cache to write through (sysfs cache_type):
    // cloud-hypervisor forwards the writeback byte with SET_CONFIG, and
    // NEED_REPLY makes the daemon's ack its answer.
    vm.set_writeback(false);
    assert_eq!(vm.config(32, 1), vec![0]);
    assert_eq!(vm.write(0, 3000, &b), S_OK);
    check_image(&d.image(), 3000 * 512, &b);
    vm.set_writeback(true);

    // Memory hotplug (--memory hotplug_size=...): ADD_MEM_REG, then a
    // request whose data buffer lies in the new region.
    let hp_gpa = HIGH_RAM_GPA + (1 << 30);
    let hp_len = 8 * MIB;
    let hp_file = memfd(hp_len);
    // SAFETY: maps a fresh memfd of hp_len bytes, shared, at an address of
    // the kernel's choosing; unmapped at the end of the test.
    let hp_ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            hp_len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            hp_file.as_raw_fd(),
            0,
        )
    };
    assert_ne!(hp_ptr, libc::MAP_FAILED);
    vm.frontend
        .add_mem_region(&VhostUserMemoryRegionInfo {
            guest_phys_addr: hp_gpa,
            memory_size: hp_len,
            userspace_addr: hp_ptr as u64,
            mmap_offset: 0,
            mmap_handle: hp_file.as_raw_fd(),
        })
        .expect("ADD_MEM_REG");
    let c = pattern(3, 8192);
    // SAFETY: hp_ptr maps hp_len >= c.len() bytes that only this test uses.
    unsafe { std::ptr::copy_nonoverlapping(c.as_ptr(), hp_ptr as *mut u8, c.len()) };
    let h = vm.write_header(T_OUT, 4096);
    let s = vm.status_buf();
    let (st, _) = vm.run_chain(
        0,
        &[
            Desc::r(h, 16),
            Desc::r(GuestAddress(hp_gpa), c.len() as u32),
            Desc::w(s, 1),
        ],
        s,
    );
    vm.reset_alloc();
    assert_eq!(st, S_OK);
    check_image(&d.image(), 4096 * 512, &c);

    // Guest reboot: reset_vhost_user (disable, GET_VRING_BASE per queue),
    // then the rebooted guest's driver sets up fresh rings and activation
    // runs setup_vhost_user again on the same connection.
    for (i, q) in vm.queues.iter().enumerate() {
        vm.frontend
            .set_vring_enable(i, false)
            .expect("SET_VRING_ENABLE 0");
        let base = vm.frontend.get_vring_base(i).expect("GET_VRING_BASE");
        assert_eq!(base, u32::from(q.avail_idx), "queue {i} stopped at");
    }
    let acked = guest_acked(&dev);
    let fresh = guest_rings(&vm.mem, 2, acked & F_EVENT_IDX != 0);
    chv_setup_vhost_user(&mut vm.frontend, &dev, &vm.mem, &fresh, acked);
    vm.queues = fresh;
    check_read(&mut vm, 0, 8, &a);
    check_read(&mut vm, 1, 4096, &c);

    // SAFETY: unmaps the region mapped above; no request is in flight.
    unsafe { libc::munmap(hp_ptr, hp_len as usize) };
}

/// Waits until the socket reports HUP, as cloud-hypervisor's epoll on the
/// vhost-user socket does before it reconnects.
fn wait_hup(fd: i32) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut p = libc::pollfd {
            fd,
            events: 0,
            revents: 0,
        };
        // SAFETY: polls one valid pollfd for 100 ms.
        let n = unsafe { libc::poll(&mut p, 1, 100) };
        if n == 1 && p.revents & libc::POLLHUP != 0 {
            return;
        }
        assert!(Instant::now() < deadline, "no HUP on the vhost-user socket");
    }
}

#[test]
fn chv_reconnects_to_a_restarted_daemon() {
    let mut d = Daemon::raw(64 * MIB, &["--num-queues", "2"]);
    let (mut vm, dev) = chv_boot(&d.socket, 2);
    let a = pattern(7, 32 * 1024);
    assert_eq!(vm.write(0, 64, &a), S_OK);
    assert_eq!(vm.write(1, 512, &a), S_OK);

    // The daemon is restarted (upgrade, crash, systemd restart).
    assert!(d.terminate().success());
    wait_hup(vm.frontend.as_raw_fd());
    // The guest queues a write while no daemon runs. cloud-hypervisor
    // then sends the avail index, past it, as the base: the daemon starts
    // after what it had taken instead (the inflight buffer), so it runs.
    let late = pattern(9, 4096);
    let h = vm.write_header(T_OUT, 3000);
    let buf = vm.alloc(4096);
    vm.mem.write_slice(&late, buf).unwrap();
    let st = vm.status_buf();
    let late_head = vm.queues[0].add_chain(
        &vm.mem,
        &[Desc::r(h, 16), Desc::r(buf, 4096), Desc::w(st, 1)],
    );
    vm.queues[0].kick();
    // Meanwhile cloud-hypervisor's first attempts fail, retryably.
    match Frontend::connect(&d.socket, 2) {
        Err(vhost::Error::VhostUserProtocol(vhost::vhost_user::Error::SocketConnect(e))) => {
            assert!(matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ))
        }
        Err(e) => panic!("a connect error cloud-hypervisor does not retry: {e}"),
        Ok(_) => panic!("connected to a daemon that exited"),
    }
    let log = std::fs::OpenOptions::new()
        .append(true)
        .open(d.dir.path().join("daemon.log"))
        .unwrap();
    let child = Command::new(daemon_bin())
        .args([
            "--image",
            d.image().to_str().unwrap(),
            "--socket",
            d.socket.to_str().unwrap(),
            "--num-queues",
            "2",
        ])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("restart daemon");
    d.child = Some(child);

    // reconnect_inner -> connect_vhost_user(client) with
    // reinitialize_vhost_user as `initialize`.
    let mut vu = chv_connect(&d.socket, 2);
    vu.set_owner().expect("SET_OWNER");
    let backend_features = vu.get_features().expect("GET_FEATURES");
    assert_eq!(backend_features, dev.backend_features, "same backend");
    let acked = guest_acked(&dev);
    // set_protocol_features_vhost_user: the set acked at creation, no GET.
    vu.set_protocol_features(dev.acked_protocol_features)
        .expect("SET_PROTOCOL_FEATURES");
    vu.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    // IN_ORDER was not acked (we do not offer it): the bases are the avail
    // indexes in guest memory, and the inflight buffer kept is set back
    // (the daemon starts each ring after what it had taken: nothing here,
    // the daemon was stopped with SIGTERM).
    assert_eq!(acked & F_IN_ORDER, 0);
    chv_setup_vhost_user(&mut vu, &dev, &vm.mem, &vm.queues, acked);
    vm.frontend = vu;
    let used = vm.queues[0].wait_used(&vm.mem, 1, Duration::from_secs(10));
    assert_eq!(
        used.len(),
        1,
        "the write queued while no daemon ran completes"
    );
    assert_eq!(used[0].id, u32::from(late_head));
    assert_eq!(vm.status_at(st), S_OK);
    vm.reset_alloc();
    check_image(&d.image(), 3000 * 512, &late);

    // The guest carries on where it was, on the same rings.
    check_read(&mut vm, 1, 64, &a);
    check_read(&mut vm, 0, 512, &a);
    let b = pattern(8, 4096);
    assert_eq!(vm.write(0, 2000, &b), S_OK);
    assert_eq!(vm.flush(0), S_OK);
    check_image(&d.image(), 2000 * 512, &b);
    // The rings went on from their old indexes, not from 0.
    assert!(vm.queues[0].avail_idx > 2 && vm.queues[1].avail_idx > 1);
}

/// The same replay against qemu-storage-daemon (QEMU's own vhost-user-blk
/// backend): checks the replay itself, not the daemon.
#[test]
fn chv_replay_also_drives_qemu_storage_daemon() {
    const QSD: &str = "/usr/bin/qemu-storage-daemon";
    if !Path::new(QSD).exists() {
        eprintln!("skipped: no {QSD}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::File::create(dir.path().join("disk.img"))
        .unwrap()
        .set_len(64 * MIB)
        .unwrap();
    let d = Daemon::start_bin(
        QSD,
        dir,
        &[
            "--blockdev",
            "driver=file,node-name=file0,filename={dir}/disk.img",
            "--blockdev",
            "driver=raw,node-name=disk0,file=file0",
            "--export",
            "type=vhost-user-blk,id=exp0,node-name=disk0,writable=on,num-queues=2,addr.type=unix,addr.path={sock}",
        ],
        &[],
    );
    let (mut vm, dev) = chv_boot(&d.socket, 2);
    // qemu-storage-daemon 7.2 ends with MQ | LOG_SHMFD | REPLY_ACK |
    // CONFIG | CONFIGURE_MEM_SLOTS.
    let pf = VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK;
    assert!(
        dev.acked_protocol_features.contains(pf),
        "{:?}",
        dev.acked_protocol_features
    );
    let a = pattern(11, 16 * 1024);
    assert_eq!(vm.write(0, 8, &a), S_OK);
    assert_eq!(vm.write(1, 100, &a), S_OK);
    assert_eq!(vm.flush(0), S_OK);
    check_image(&d.image(), 8 * 512, &a);
    check_read(&mut vm, 1, 8, &a);
    check_read(&mut vm, 0, 100, &a);
    // Guest reboot, as above.
    for (i, q) in vm.queues.iter().enumerate() {
        vm.frontend.set_vring_enable(i, false).unwrap();
        let base = vm.frontend.get_vring_base(i).expect("GET_VRING_BASE");
        assert_eq!(base, u32::from(q.avail_idx));
    }
    let acked = guest_acked(&dev);
    let fresh = guest_rings(&vm.mem, 2, acked & F_EVENT_IDX != 0);
    chv_setup_vhost_user(&mut vm.frontend, &dev, &vm.mem, &fresh, acked);
    vm.queues = fresh;
    check_read(&mut vm, 1, 100, &a);
}

/// cloud-hypervisor's defaults (`--disk vhost_user=true,socket=...`: one
/// queue of 128, so no MQ offered) against the short form's defaults.
#[test]
fn chv_defaults_against_short_form_defaults() {
    let d = Daemon::raw(64 * MIB, &[]);
    let (mut vm, dev) = chv_boot(&d.socket, 1);
    assert_eq!(dev.avail_features & BLK_F_MQ, 0, "MQ not offered by chv");
    assert_eq!(u16::from_le_bytes([dev.config[34], dev.config[35]]), 1);
    let a = pattern(21, 128 * 1024);
    assert_eq!(vm.write(0, 0, &a), S_OK);
    assert_eq!(vm.flush(0), S_OK);
    check_image(&d.image(), 0, &a);
    check_read(&mut vm, 0, 0, &a);
}
