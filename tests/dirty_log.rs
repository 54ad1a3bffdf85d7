//! Live migration's dirty log (issue 20): a frontend negotiates
//! VHOST_USER_PROTOCOL_F_LOG_SHMFD, shares a log with SET_LOG_BASE and acks
//! VHOST_F_LOG_ALL, as QEMU does when a migration starts; the daemon must
//! then set the bit of every 4 KiB guest page it writes (read data, the
//! status byte, the used element and the used index) and of no other page,
//! and mark nothing while LOG_ALL is not acked.

mod common;

use std::collections::BTreeSet;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use common::queue::Desc;
use common::*;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::VhostUserFrontend;
use vhost::{VhostBackend, VhostUserDirtyLogRegion};
use vm_memory::{Bytes, GuestAddress};

const VHOST_F_LOG_ALL: u64 = 1 << 26;
const PAGE: u64 = 4096;
/// One bit per page of the test VM's memory.
const LOG_SIZE: u64 = MEM_SIZE / PAGE / 8;

/// The pages whose bits are set in the log.
fn marked(log: &File) -> BTreeSet<u64> {
    let mut buf = vec![0u8; LOG_SIZE as usize];
    log.read_exact_at(&mut buf, 0).unwrap();
    let mut pages = BTreeSet::new();
    for (i, b) in buf.iter().enumerate() {
        for bit in 0..8 {
            if b & (1 << bit) != 0 {
                pages.insert(i as u64 * 8 + bit);
            }
        }
    }
    pages
}

fn clear(log: &File) {
    log.write_all_at(&vec![0u8; LOG_SIZE as usize], 0).unwrap();
}

fn pages(addr: u64, len: u64) -> impl Iterator<Item = u64> {
    addr / PAGE..=(addr + len - 1) / PAGE
}

/// The pages a completion at used index `idx` writes on queue 0: its used
/// element, the used index and the avail_event field, logged at `at` (the
/// used ring itself, or the SET_VRING_ADDR log address).
fn used_pages_at(vm: &Vm, at: u64, idx: u16) -> BTreeSet<u64> {
    let size = u64::from(vm.queues[0].size);
    let elem = at + 4 + 8 * (u64::from(idx) % size);
    pages(elem, 8)
        .chain(pages(at + 2, 2))
        .chain(pages(at + 4 + 8 * size, 2))
        .collect()
}

fn used_pages(vm: &Vm, idx: u16) -> BTreeSet<u64> {
    used_pages_at(vm, vm.queues[0].used.0, idx)
}

/// A read of 9 sectors into two buffers, the first across a page boundary;
/// returns the pages the daemon writes (data, status, used ring).
fn read_chain(vm: &mut Vm) -> BTreeSet<u64> {
    let used = vm.queues[0].used.0;
    read_chain_logged_at(vm, used)
}

/// As `read_chain`, with the used ring logged at `used_log`.
fn read_chain_logged_at(vm: &mut Vm, used_log: u64) -> BTreeSet<u64> {
    let h = vm.write_header(T_IN, 0);
    let d1 = GuestAddress(vm.alloc(3 * PAGE).0 + 100);
    let d2 = vm.alloc(PAGE);
    let _gap = vm.alloc(PAGE);
    let s = vm.status_buf();
    let idx = vm.queues[0].last_used;
    let descs = [
        Desc::r(h, 16),
        Desc::w(d1, 4096),
        Desc::w(d2, 512),
        Desc::w(s, 1),
    ];
    let (st, len) = vm.run_chain(0, &descs, s);
    assert_eq!((st, len), (S_OK, 4096 + 512 + 1), "the read completes");
    vm.reset_alloc();
    let mut want: BTreeSet<u64> = pages(d1.0, 4096)
        .chain(pages(d2.0, 512))
        .chain(pages(s.0, 1))
        .collect();
    want.extend(used_pages_at(vm, used_log, idx));
    want
}

#[test]
fn reads_mark_the_pages_they_write_and_only_those() {
    let d = Daemon::raw(1 << 20, &[]);
    let mut vm = Vm::connect(
        &d.socket,
        VmOptions {
            log: true,
            // The used ring spans three pages: its avail_event field is
            // not on the page of its index.
            queue_size: 1024,
            ..Default::default()
        },
    );
    let offered = vm.frontend.get_features().unwrap();
    assert_ne!(offered & VHOST_F_LOG_ALL, 0, "VHOST_F_LOG_ALL offered");
    let pf = vm.frontend.get_protocol_features().unwrap();
    assert!(
        pf.contains(VhostUserProtocolFeatures::LOG_SHMFD),
        "LOG_SHMFD offered"
    );

    let log = set_log(&vm);

    // A log but no LOG_ALL: nothing is marked.
    read_chain(&mut vm);
    assert_eq!(marked(&log), BTreeSet::new(), "marked without LOG_ALL");

    // LOG_ALL: a read marks its data, status and used-ring pages.
    vm.frontend
        .set_features(vm.features | VHOST_F_LOG_ALL)
        .unwrap();
    let want = read_chain(&mut vm);
    assert_eq!(marked(&log), want, "pages marked by a read");
    clear(&log);

    // A write marks its status and used-ring pages, not the data it read.
    let idx = vm.queues[0].last_used;
    let h = vm.write_header(T_OUT, 8);
    let data = vm.alloc(PAGE);
    vm.mem.write_slice(&[0x5a; 4096], data).unwrap();
    let s = vm.status_buf();
    let (st, _) = vm.run_chain(0, &[Desc::r(h, 16), Desc::r(data, 4096), Desc::w(s, 1)], s);
    assert_eq!(st, S_OK);
    vm.reset_alloc();
    let mut want: BTreeSet<u64> = pages(s.0, 1).collect();
    want.extend(used_pages(&vm, idx));
    assert_eq!(marked(&log), want, "pages marked by a write");
    clear(&log);

    // LOG_ALL off again (a cancelled migration): nothing is marked.
    vm.frontend.set_features(vm.features).unwrap();
    read_chain(&mut vm);
    assert_eq!(
        marked(&log),
        BTreeSet::new(),
        "marked after LOG_ALL was cleared"
    );
}

fn set_log(vm: &Vm) -> File {
    let log = memfd(LOG_SIZE);
    vm.frontend
        .set_log_base(
            0,
            Some(VhostUserDirtyLogRegion {
                mmap_size: LOG_SIZE,
                mmap_offset: 0,
                mmap_handle: log.as_raw_fd(),
            }),
        )
        .expect("SET_LOG_BASE");
    log
}

/// The spec: with VHOST_VRING_F_LOG in SET_VRING_ADDR, the used ring is
/// logged at the log address given there (QEMU gives the used ring's
/// guest-physical address; here another one, to tell them apart); and
/// SET_LOG_FD's eventfd is signalled once the used ring is marked.
#[test]
fn used_ring_is_logged_at_the_vring_log_address_and_the_log_fd_is_kicked() {
    let d = Daemon::raw(1 << 20, &[]);
    let alias = MEM_SIZE - 64 * PAGE;
    let mut vm = Vm::connect(
        &d.socket,
        VmOptions {
            log: true,
            used_log: Some(alias),
            ..Default::default()
        },
    );
    let log = set_log(&vm);
    let kick = vmm_sys_util::eventfd::EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
    vm.frontend
        .set_log_fd(kick.as_raw_fd())
        .expect("SET_LOG_FD accepted");
    assert!(
        kick.read().is_err(),
        "not kicked before anything was logged"
    );
    vm.frontend
        .set_features(vm.features | VHOST_F_LOG_ALL)
        .unwrap();
    let want = read_chain_logged_at(&mut vm, alias);
    let got = marked(&log);
    assert_eq!(got, want, "used ring logged at the log address");
    assert!(
        !got.contains(&(vm.queues[0].used.0 / PAGE)),
        "the used ring's own page is not marked"
    );
    assert!(kick.read().unwrap() >= 1, "SET_LOG_FD's eventfd signalled");
}

/// Postcopy needs userfaultfd on guest memory, which the daemon does not
/// do: it does not offer VHOST_USER_PROTOCOL_F_PAGEFAULT (so QEMU refuses
/// the postcopy-ram capability), and a frontend sending POSTCOPY_ADVISE
/// anyway loses its connection with a message saying why; the daemon
/// serves the next one.
#[test]
fn postcopy_is_refused_with_a_clear_message() {
    use std::os::unix::net::UnixStream;
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;
    const PAGEFAULT: u64 = 1 << 8;
    const POSTCOPY_ADVISE: u32 = 28;

    let d = Daemon::raw(1 << 20, &[]);
    let mut vm = Vm::connect(&d.socket, VmOptions::default());
    let pf = vm.frontend.get_protocol_features().unwrap();
    assert_eq!(pf.bits() & PAGEFAULT, 0, "PAGEFAULT not offered");
    drop(vm);

    let s = UnixStream::connect(&d.socket).unwrap();
    let mut msg = Vec::new();
    for v in [POSTCOPY_ADVISE, 0x1 | 0x8, 0] {
        msg.extend_from_slice(&v.to_le_bytes());
    }
    s.send_with_fds(&[&msg[..]], &[]).unwrap();
    let mut buf = [0u8; 64];
    let n = std::io::Read::read(&mut &s, &mut buf).unwrap_or(0);
    assert_eq!(n, 0, "the connection ends without a reply");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !d.log().contains("postcopy migration is not supported") {
        assert!(
            std::time::Instant::now() < deadline,
            "no clear message in the log:\n{}",
            d.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let mut vm = Vm::connect(&d.socket, VmOptions::default());
    let s = vm.status_buf();
    let h = vm.write_header(T_IN, 0);
    let data = vm.alloc(PAGE);
    let (st, _) = vm.run_chain(0, &[Desc::r(h, 16), Desc::w(data, 512), Desc::w(s, 1)], s);
    assert_eq!(st, S_OK, "the next connection is served");
}
