//! Queues, notifications, connections, drains and the daemon's life cycle.

mod common;

use std::os::unix::process::CommandExt;
use std::time::Duration;

use common::*;
use vhost::vhost_user::VhostUserFrontend;
use vhost::{VhostBackend, VhostUserMemoryRegionInfo};
use vm_memory::{Bytes, GuestAddress};

const MIB: u64 = 1 << 20;

/// Makes `n` writes of `len` bytes available on queue `q` (one kick) and
/// returns (head, sector, seed, status address) of each.
fn submit_writes(
    vm: &mut Vm,
    q: usize,
    n: usize,
    len: u32,
    first_sector: u64,
) -> Vec<(u16, u64, u64, GuestAddress)> {
    let mut out = Vec::new();
    for i in 0..n {
        let sector = first_sector + i as u64 * u64::from(len) / 512;
        let seed = (q * 1000 + i) as u64;
        let h = vm.write_header(T_OUT, sector);
        let d = vm.alloc(u64::from(len));
        vm.mem.write_slice(&pattern(seed, len as usize), d).unwrap();
        let s = vm.status_buf();
        let mut descs = vec![Desc::r(h, 16)];
        descs.extend(split_segments(d, len, true));
        descs.push(Desc::w(s, 1));
        let head = vm.queues[q].add_chain(&vm.mem, &descs);
        out.push((head, sector, seed, s));
    }
    vm.queues[q].kick();
    out
}

fn wait_first_completion(vm: &Vm, q: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while vm.queues[q].used_idx(&vm.mem) == 0 {
        assert!(std::time::Instant::now() < deadline, "no completion");
        std::thread::yield_now();
    }
}

#[test]
fn four_queues_on_four_iothreads_serve_requests_in_parallel() {
    let d = Daemon::raw(64 * MIB, &["--num-queues", "4", "--num-iothreads", "4"]);
    let mut vm = Vm::connect(
        &d.socket,
        VmOptions {
            num_queues: 4,
            ..Default::default()
        },
    );
    let mut all = Vec::new();
    for q in 0..4 {
        all.push(submit_writes(
            &mut vm,
            q,
            16,
            65536,
            q as u64 * 16 * MIB / 512,
        ));
    }
    for (q, reqs) in all.iter().enumerate() {
        let used = vm.queues[q].wait_used(&vm.mem, reqs.len(), Duration::from_secs(20));
        assert_eq!(used.len(), reqs.len(), "queue {q} completed everything");
        for &(_, sector, seed, s) in reqs {
            assert_eq!(vm.status_at(s), S_OK);
            assert_eq!(
                read_file_at(&d.image(), sector * 512, 65536),
                pattern(seed, 65536)
            );
        }
    }
}

#[test]
fn event_idx_suppresses_notifications_until_used_event_is_passed() {
    let d = Daemon::raw(16 * MIB, &[]);
    let mut vm = Vm::connect(
        &d.socket,
        VmOptions {
            event_idx: true,
            ..Default::default()
        },
    );
    assert_ne!(vm.features & VIRTIO_RING_F_EVENT_IDX, 0);
    // Ask to be notified only after 10 more completions.
    vm.queues[0].set_used_event(&vm.mem, 10);
    let _ = vm.queues[0].take_call();
    assert_eq!(vm.write(0, 0, &[1u8; 512]), S_OK);
    std::thread::sleep(Duration::from_millis(50));
    assert!(
        !vm.queues[0].take_call(),
        "no notification before used_event"
    );
    // Now ask for a notification on the next completion.
    let next = vm.queues[0].last_used;
    vm.queues[0].set_used_event(&vm.mem, next);
    assert_eq!(vm.write(0, 0, &[2u8; 512]), S_OK);
    std::thread::sleep(Duration::from_millis(20));
    assert!(
        vm.queues[0].take_call(),
        "notification once used_event is passed"
    );
}

#[test]
fn without_event_idx_every_batch_is_notified() {
    let d = Daemon::raw(16 * MIB, &[]);
    let mut vm = Vm::connect(&d.socket, VmOptions::default());
    assert_eq!(vm.features & VIRTIO_RING_F_EVENT_IDX, 0);
    for i in 0..3u8 {
        let _ = vm.queues[0].take_call();
        assert_eq!(vm.write(0, 0, &[i; 512]), S_OK);
        std::thread::sleep(Duration::from_millis(20));
        assert!(vm.queues[0].take_call(), "notified after request {i}");
    }
}

#[test]
fn indirect_descriptor_tables_carry_whole_requests() {
    let d = Daemon::raw(16 * MIB, &[]);
    let mut vm = Vm::connect(&d.socket, VmOptions::default());
    let data = pattern(11, 3 * 4096);
    let h = vm.write_header(T_OUT, 64);
    let buf = vm.alloc(data.len() as u64);
    vm.mem.write_slice(&data, buf).unwrap();
    let s = vm.status_buf();
    let table = vm.alloc(16 * 5);
    let descs = [
        Desc::r(h, 16),
        Desc::r(buf, 4096),
        Desc::r(GuestAddress(buf.0 + 4096), 4096),
        Desc::r(GuestAddress(buf.0 + 8192), 4096),
        Desc::w(s, 1),
    ];
    for (i, d) in descs.iter().enumerate() {
        let next = (i + 1 < descs.len()).then_some(i as u16 + 1);
        VirtQueue::write_desc_at(&vm.mem, table, i as u16, *d, next);
    }
    let (st, _) = vm.run_chain(0, &[Desc::indirect(table, 5)], s);
    assert_eq!(st, S_OK);
    assert_eq!(read_file_at(&d.image(), 64 * 512, data.len()), data);
}

#[test]
fn reconnecting_frontend_finds_the_data_intact() {
    let d = Daemon::raw(16 * MIB, &[]);
    let data = pattern(12, 8192);
    {
        let mut vm = Vm::connect(&d.socket, VmOptions::default());
        assert_eq!(vm.write(0, 100, &data), S_OK);
    }
    // The daemon drops the old connection's state and accepts the next.
    for _ in 0..3 {
        let mut vm = Vm::connect(
            &d.socket,
            VmOptions {
                num_queues: 2,
                ..Default::default()
            },
        );
        let (st, back) = vm.read(1, 100, 8192);
        assert_eq!(st, S_OK);
        assert_eq!(back, data);
    }
}

#[test]
fn get_vring_base_answers_only_after_requests_in_flight_complete() {
    let d = Daemon::raw(80 * MIB, &[]);
    let mut vm = Vm::connect(&d.socket, VmOptions::default());
    let reqs = submit_writes(&mut vm, 0, 40, 1 << 20, 0);
    // The worker pops the whole batch before it returns the first request,
    // so once one is back, the other 39 are popped and (mostly) in flight.
    wait_first_completion(&vm, 0);
    let base = vm.frontend.get_vring_base(0).expect("GET_VRING_BASE");
    assert_eq!(base as usize, reqs.len(), "every request was popped");
    // Everything popped up to `base` is already in the used ring.
    let used = vm.queues[0].used_idx(&vm.mem);
    assert_eq!(
        u32::from(used),
        base,
        "used index equals the returned ring base"
    );
    let done = vm.queues[0].wait_used(&vm.mem, base as usize, Duration::from_secs(1));
    for u in done {
        let (_, sector, seed, s) = reqs.iter().find(|r| u32::from(r.0) == u.id).unwrap();
        assert_eq!(vm.status_at(*s), S_OK);
        assert_eq!(
            read_file_at(&d.image(), sector * 512, 1 << 20),
            pattern(*seed, 1 << 20)
        );
    }
}

#[test]
fn reset_device_drains_and_restores_the_write_cache_default() {
    let d = Daemon::raw(80 * MIB, &[]);
    let mut vm = Vm::connect(&d.socket, VmOptions::default());
    vm.set_writeback(false);
    assert_eq!(vm.config(32, 1), vec![0]);
    let reqs = submit_writes(&mut vm, 0, 32, 1 << 20, 0);
    vm.frontend.reset_device().expect("RESET_DEVICE");
    let popped = vm.queues[0].used_idx(&vm.mem);
    assert!(usize::from(popped) <= reqs.len());
    assert_eq!(vm.config(32, 1), vec![1], "write cache back to its default");
}

#[test]
fn sigterm_with_requests_in_flight_drains_flushes_and_exits_zero() {
    let mut d = Daemon::raw(80 * MIB, &[]);
    let socket = d.socket.clone();
    let mut vm = Vm::connect(&d.socket, VmOptions::default());
    let reqs = submit_writes(&mut vm, 0, 40, 1 << 20, 0);
    wait_first_completion(&vm, 0);
    let status = d.terminate();
    assert!(status.success(), "exit status {status}");
    assert!(!socket.exists(), "socket removed at exit");
    let used = vm.queues[0].wait_used(&vm.mem, reqs.len(), Duration::from_millis(100));
    assert_eq!(
        used.len(),
        reqs.len(),
        "every popped request completed before exit"
    );
    for u in &used {
        let (_, sector, seed, s) = reqs.iter().find(|r| u32::from(r.0) == u.id).unwrap();
        assert_eq!(vm.status_at(*s), S_OK);
        assert_eq!(
            read_file_at(&d.image(), sector * 512, 1 << 20),
            pattern(*seed, 1 << 20)
        );
    }
}

#[test]
fn pidfile_is_written_once_listening_and_removed_at_exit() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("d.pid");
    let mut d = Daemon::start_in(
        dir,
        &[
            "--blockdev",
            "driver=null-co,node-name=n0",
            "--export",
            "vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path={sock}",
            "--pidfile",
            "{dir}/d.pid",
        ],
    );
    // The pidfile appears once the exports and monitors listen, with the
    // pid already in it: a reader never finds it empty.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !pidfile.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "pidfile never appeared"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(pid, d.pid());
    assert!(d.terminate().success());
    assert!(!pidfile.exists());
}

#[test]
fn daemonize_returns_once_the_socket_listens() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    let pidfile = dir.path().join("d.pid");
    let export = format!(
        "vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path={}",
        sock.display()
    );
    let (code, err) = run_daemon(&[
        "--blockdev",
        "driver=null-co,node-name=n0",
        "--export",
        &export,
        "--daemonize",
        "--pidfile",
        pidfile.to_str().unwrap(),
        "--log-file",
        dir.path().join("d.log").to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(sock.exists(), "socket listens when the parent returns");
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let mut vm = Vm::connect(&sock, VmOptions::default());
    assert_eq!(vm.flush(0), S_OK);
    drop(vm);
    // SAFETY: kill only takes a pid and a signal number.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    // SAFETY: signal 0 only checks that the process exists.
    while unsafe { libc::kill(pid, 0) } == 0 {
        assert!(std::time::Instant::now() < deadline, "daemon did not exit");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!sock.exists());
}

#[test]
fn listening_socket_passed_as_fd_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fd.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let img = dir.path().join("disk.img");
    std::fs::File::create(&img).unwrap().set_len(MIB).unwrap();
    let fd = std::os::fd::AsRawFd::as_raw_fd(&listener);
    let mut cmd = std::process::Command::new(daemon_bin());
    cmd.args(["--image", img.to_str().unwrap(), "--fd", "3"]);
    // SAFETY: dup2 in the child before exec; it only manipulates fds.
    unsafe {
        cmd.pre_exec(move || {
            // dup2 onto itself would keep close-on-exec set: clear it instead.
            let r = if fd == 3 {
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, 3)
            };
            if r < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    drop(listener);
    let mut vm = Vm::connect(&path, VmOptions::default());
    assert_eq!(vm.write(0, 0, &[5u8; 512]), S_OK);
    assert_eq!(read_file_at(&img, 0, 512), vec![5u8; 512]);
    drop(vm);
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn stale_socket_file_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("vub.sock"), b"stale").unwrap();
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

#[test]
fn invalid_options_fail_at_start_naming_the_option() {
    let cases: &[(&[&str], &str)] = &[
        (
            &[
                "--blockdev",
                "driver=file,node-name=f0",
                "--export",
                "vhost-user-blk,id=e,node-name=f0,addr.type=unix,addr.path=/tmp/x",
            ],
            "filename",
        ),
        (
            &[
                "--blockdev",
                "driver=null-co,node-name=n0",
                "--export",
                "vhost-user-blk,id=e,node-name=n0,addr.type=unix,addr.path=/tmp/x,num-queues=0",
            ],
            "num-queues",
        ),
        (
            &[
                "--blockdev",
                "driver=file,node-name=f0,filename=/nonexistent/disk.img",
                "--export",
                "vhost-user-blk,id=e,node-name=f0,addr.type=unix,addr.path=/tmp/x",
            ],
            "/nonexistent/disk.img",
        ),
        (
            &[
                "--blockdev",
                "driver=null-co,node-name=n0",
                "--export",
                "vhost-user-blk,id=e,node-name=missing,addr.type=unix,addr.path=/tmp/x",
            ],
            "missing",
        ),
        (
            &[
                "--blockdev",
                "driver=null-co,node-name=n0,read-only=on",
                "--export",
                "vhost-user-blk,id=e,node-name=n0,addr.type=unix,addr.path=/tmp/x,writable=on",
            ],
            "read-only",
        ),
        (
            &[
                "--blockdev",
                "driver=null-co,node-name=n0",
                "--blockdev",
                "driver=null-co,node-name=n0",
                "--export",
                "vhost-user-blk,id=e,node-name=n0,addr.type=unix,addr.path=/tmp/x",
            ],
            "'n0' is already in use",
        ),
        (&["--bogus-flag"], "bogus"),
    ];
    for (args, needle) in cases {
        let (code, err) = run_daemon(args);
        assert_eq!(code, 1, "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: '{needle}' not in: {err}");
    }
}

#[test]
fn memory_regions_added_and_removed_while_queues_run() {
    let d = Daemon::raw(16 * MIB, &[]);
    let mut vm = Vm::connect(&d.socket, VmOptions::default());
    assert_eq!(vm.write(0, 0, &[1u8; 4096]), S_OK);
    regions_added_and_removed(&mut vm);
}

/// The same with a polling iothread that keeps its memory snapshot across
/// requests while it polls (worker.rs, MemCache): a region added must be
/// seen by the next request, a region removed must be gone for it.
#[test]
fn memory_regions_added_and_removed_while_an_iothread_polls() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::File::create(dir.path().join("disk.img"))
        .unwrap()
        .set_len(16 * MIB)
        .unwrap();
    let d = Daemon::start_in(
        dir,
        &[
            "--blockdev",
            "driver=file,node-name=n0,filename={dir}/disk.img",
            "--export",
            "vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path={sock},writable=on,poll-max-ns=1000000000",
        ],
    );
    let mut vm = Vm::connect(
        &d.socket,
        VmOptions {
            event_idx: true,
            ..Default::default()
        },
    );
    // Productive events double the poll window up to a second: the
    // iothread then stays in its poll loop, snapshot held, while the
    // memory table changes below.
    for _ in 0..30 {
        assert_eq!(vm.write(0, 0, &[1u8; 4096]), S_OK);
    }
    regions_added_and_removed(&mut vm);
}

fn regions_added_and_removed(vm: &mut Vm) {
    // A second region at 1 GiB, from its own memfd.
    let extra =
        vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(1 << 30), 1 << 20)]).unwrap();
    let file = {
        let name = std::ffi::CString::new("extra").unwrap();
        // SAFETY: valid C string and flags.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        // SAFETY: fresh fd that we own.
        let f = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        f.set_len(1 << 20).unwrap();
        f
    };
    let map = vm_memory::GuestMemoryMmap::<()>::from_ranges_with_files([(
        GuestAddress(1 << 30),
        1 << 20,
        Some(vm_memory::FileOffset::new(file.try_clone().unwrap(), 0)),
    )])
    .unwrap();
    drop(extra);
    let region = VhostUserMemoryRegionInfo {
        guest_phys_addr: 1 << 30,
        memory_size: 1 << 20,
        userspace_addr: vm_memory::GuestMemoryBackend::get_host_address(&map, GuestAddress(1 << 30))
            .unwrap() as u64,
        mmap_offset: 0,
        mmap_handle: std::os::fd::AsRawFd::as_raw_fd(&file),
    };
    vm.frontend.add_mem_region(&region).expect("ADD_MEM_REG");
    // A read into the new region.
    let data = pattern(13, 4096);
    assert_eq!(vm.write(0, 8, &data), S_OK);
    let h = vm.write_header(T_IN, 8);
    let s = vm.status_buf();
    let (st, _) = vm.run_chain(
        0,
        &[
            Desc::r(h, 16),
            Desc::w(GuestAddress(1 << 30), 4096),
            Desc::w(s, 1),
        ],
        s,
    );
    assert_eq!(st, S_OK);
    let mut back = vec![0u8; 4096];
    map.read_slice(&mut back, GuestAddress(1 << 30)).unwrap();
    assert_eq!(back, data);
    // Remove it: a buffer there is now outside guest memory.
    vm.frontend.remove_mem_region(&region).expect("REM_MEM_REG");
    let h = vm.write_header(T_IN, 8);
    let s = vm.status_buf();
    let (st, _) = vm.run_chain(
        0,
        &[
            Desc::r(h, 16),
            Desc::w(GuestAddress(1 << 30), 4096),
            Desc::w(s, 1),
        ],
        s,
    );
    assert_eq!(st, S_IOERR);
    vm.reset_alloc();
    let (st, back) = vm.read(0, 8, 4096);
    assert_eq!(st, S_OK);
    assert_eq!(back, data);
}

#[test]
fn synchronous_fallback_engine_serves_every_request_type() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::File::create(dir.path().join("disk.img"))
        .unwrap()
        .set_len(16 * MIB)
        .unwrap();
    let d = Daemon::start_env(
        dir,
        &[
            "--image",
            "{dir}/disk.img",
            "--socket",
            "{sock}",
            "--writethrough",
        ],
        &[("VUB_FORCE_SYNC_IO", "1")],
    );
    assert!(d.log().contains("I/O engine: sync"), "{}", d.log());
    let mut vm = Vm::connect(&d.socket, VmOptions::default());
    let data = pattern(21, 3 * MIB as usize);
    assert_eq!(vm.write(0, 0, &data), S_OK);
    assert_eq!(read_file_at(&d.image(), 0, data.len()), data);
    let (st, back) = vm.read(0, 0, data.len() as u32);
    assert_eq!(st, S_OK);
    assert_eq!(back, data);
    assert_eq!(vm.flush(0), S_OK);
    assert_eq!(vm.ranges(0, T_DISCARD, &[(0, 8, 0)]), S_OK);
    assert_eq!(vm.ranges(0, T_WRITE_ZEROES, &[(8, 8, 0)]), S_OK);
    assert!(read_file_at(&d.image(), 0, 8192).iter().all(|&b| b == 0));
}

#[test]
fn queues_share_iothreads_as_num_iothreads_says() {
    let d = Daemon::start(&[
        "--blockdev",
        "driver=null-co,node-name=n0,size=64M,read-zeroes=on",
        "--export",
        "vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path={sock},writable=on,num-queues=4,num-iothreads=2",
    ]);
    let mut vm = Vm::connect(
        &d.socket,
        VmOptions {
            num_queues: 4,
            ..Default::default()
        },
    );
    let mut all = Vec::new();
    for q in 0..4 {
        all.push(submit_writes(&mut vm, q, 8, 4096, 0));
    }
    for (q, reqs) in all.iter().enumerate() {
        let used = vm.queues[q].wait_used(&vm.mem, reqs.len(), Duration::from_secs(10));
        assert_eq!(used.len(), reqs.len(), "queue {q}");
        assert!(reqs.iter().all(|r| vm.status_at(r.3) == S_OK));
    }
    let threads = std::fs::read_dir(format!("/proc/{}/task", d.pid()))
        .unwrap()
        .count();
    assert!(threads >= 2);
}

#[test]
fn memory_table_replaced_while_requests_are_in_flight() {
    let d = Daemon::raw(80 * MIB, &[]);
    let mut vm = Vm::connect(&d.socket, VmOptions::default());
    let reqs = submit_writes(&mut vm, 0, 40, 1 << 20, 0);
    // The same layout again, as a VMM does after a memory hot-plug event.
    let regions: Vec<VhostUserMemoryRegionInfo> = vm
        .opts
        .regions
        .iter()
        .scan(0u64, |off, &(gpa, size)| {
            let r = VhostUserMemoryRegionInfo {
                guest_phys_addr: gpa,
                memory_size: size,
                userspace_addr: vm_memory::GuestMemoryBackend::get_host_address(
                    &vm.mem,
                    GuestAddress(gpa),
                )
                .unwrap() as u64,
                mmap_offset: *off,
                mmap_handle: vm.memfd_raw(),
            };
            *off += size;
            Some(r)
        })
        .collect();
    vm.frontend.set_mem_table(&regions).expect("SET_MEM_TABLE");
    let used = vm.queues[0].wait_used(&vm.mem, reqs.len(), Duration::from_secs(20));
    assert_eq!(used.len(), reqs.len());
    for &(_, sector, seed, s) in &reqs {
        assert_eq!(vm.status_at(s), S_OK);
        assert_eq!(
            read_file_at(&d.image(), sector * 512, 1 << 20),
            pattern(seed, 1 << 20)
        );
    }
    vm.reset_alloc();
    assert_eq!(vm.write(0, 0, &[3u8; 4096]), S_OK);
}

#[test]
fn graph_changes_under_continuous_verified_io_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::File::create(dir.path().join("disk.img"))
        .unwrap()
        .set_len(32 * MIB)
        .unwrap();
    let d = Daemon::start_in(
        dir,
        &[
            "--blockdev",
            "driver=file,node-name=f0,filename={dir}/disk.img",
            "--blockdev",
            "driver=raw,node-name=d0,file=f0",
            "--export",
            "vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path={sock},writable=on,num-queues=2",
            "--chardev",
            "socket,id=m,path={dir}/qmp.sock,server=on,wait=off",
            "--monitor",
            "chardev=m",
        ],
    );
    let qmp_path = d.dir.path().join("qmp.sock");
    let mut vm = Vm::connect(
        &d.socket,
        VmOptions {
            num_queues: 2,
            ..Default::default()
        },
    );
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let changer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut q = Qmp::connect(&qmp_path);
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // Grow, then shrink back: both drain the export.
                let size = if n % 2 == 0 { 48 * MIB } else { 32 * MIB };
                let r = q.execute(
                    "block_resize",
                    serde_json::json!({"node-name": "d0", "size": size}),
                );
                assert!(r.get("return").is_some(), "{r}");
                let r = q.execute(
                    "block-set-write-threshold",
                    serde_json::json!({"node-name": "f0", "write-threshold": 1 << 20}),
                );
                assert!(r.get("return").is_some(), "{r}");
                n += 1;
            }
            n
        })
    };
    // Rounds of 16 writes per queue in flight, each verified by a read.
    let mut rounds = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while std::time::Instant::now() < deadline {
        let mut all = Vec::new();
        for q in 0..2 {
            all.push(submit_writes(
                &mut vm,
                q,
                16,
                65536,
                (q as u64 * 16 + rounds % 4) * MIB / 512,
            ));
        }
        for (q, reqs) in all.iter().enumerate() {
            let used = vm.queues[q].wait_used(&vm.mem, reqs.len(), Duration::from_secs(20));
            assert_eq!(
                used.len(),
                reqs.len(),
                "round {rounds} queue {q}: requests lost"
            );
            for &(_, _, _, s) in reqs {
                assert_eq!(
                    vm.status_at(s),
                    S_OK,
                    "round {rounds} queue {q}: request failed"
                );
            }
        }
        vm.reset_alloc();
        for reqs in &all {
            for &(_, sector, seed, _) in reqs {
                let (st, back) = vm.read(0, sector, 65536);
                assert_eq!(st, S_OK);
                assert!(
                    back == pattern(seed, 65536),
                    "round {rounds}: data at sector {sector} wrong"
                );
            }
        }
        rounds += 1;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let changes = changer.join().unwrap();
    eprintln!("{changes} graph changes during {rounds} rounds of verified I/O");
    assert!(
        changes > 2 && rounds > 2,
        "changes {changes}, rounds {rounds}"
    );
}

#[test]
fn resize_sends_a_config_change_to_the_connected_frontend() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["a.img", "b.img"] {
        std::fs::File::create(dir.path().join(name))
            .unwrap()
            .set_len(16 * MIB)
            .unwrap();
    }
    let d = Daemon::start_in(
        dir,
        &[
            "--blockdev",
            "driver=file,node-name=fa,filename={dir}/a.img",
            "--blockdev",
            "driver=raw,node-name=a,file=fa",
            "--blockdev",
            "driver=file,node-name=fb,filename={dir}/b.img",
            "--blockdev",
            "driver=raw,node-name=b,file=fb",
            "--export",
            "vhost-user-blk,id=ea,node-name=a,addr.type=unix,addr.path={sock},writable=on",
            "--export",
            "vhost-user-blk,id=eb,node-name=b,addr.type=unix,addr.path={dir}/b.sock,writable=on",
            "--chardev",
            "socket,id=m,path={dir}/qmp.sock,server=on,wait=off",
            "--monitor",
            "chardev=m",
        ],
    );
    // Two frontends from one process: each notice must reach its own channel.
    let opts = VmOptions {
        backend_channel: true,
        ..Default::default()
    };
    let mut va = Vm::connect(&d.socket, opts.clone());
    let mut vb = Vm::connect(&d.dir.path().join("b.sock"), opts);
    for v in [&va, &vb] {
        v.backend_channel
            .as_ref()
            .unwrap()
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
    }
    let mut q = Qmp::connect(&d.dir.path().join("qmp.sock"));
    let r = q.execute(
        "block_resize",
        serde_json::json!({"node-name": "b", "size": 32 * MIB}),
    );
    assert!(r.get("return").is_some(), "{r}");
    let mut msg = [0u8; 12];
    std::io::Read::read_exact(vb.backend_channel.as_mut().unwrap(), &mut msg)
        .expect("CONFIG_CHANGE_MSG for b");
    assert_eq!(
        u32::from_le_bytes(msg[0..4].try_into().unwrap()),
        2,
        "CONFIG_CHANGE_MSG"
    );
    assert_eq!(vb.capacity_sectors(), 32 * MIB / 512);
    // Nothing for a: its disk did not change.
    va.backend_channel
        .as_ref()
        .unwrap()
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    assert!(std::io::Read::read(va.backend_channel.as_mut().unwrap(), &mut msg).is_err());
    assert_eq!(va.capacity_sectors(), 16 * MIB / 512);
    // The new size serves I/O at the new end.
    assert_eq!(vb.write(0, 32 * MIB / 512 - 8, &[7u8; 4096]), S_OK);
}

#[test]
fn polling_iothreads_serve_every_request() {
    let d = Daemon::start(&[
        "--blockdev",
        "driver=null-co,node-name=n0,size=64M,read-zeroes=on",
        "--export",
        "vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path={sock},writable=on,num-queues=2,poll-max-ns=200000",
    ]);
    let mut vm = Vm::connect(
        &d.socket,
        VmOptions {
            num_queues: 2,
            event_idx: true,
            ..Default::default()
        },
    );
    // Many small batches, so the pollers grow, find work and shrink.
    for round in 0..50 {
        let mut all = Vec::new();
        for q in 0..2 {
            all.push(submit_writes(&mut vm, q, 1 + round % 8, 4096, 0));
        }
        for (q, reqs) in all.iter().enumerate() {
            let used = vm.queues[q].wait_used(&vm.mem, reqs.len(), Duration::from_secs(10));
            assert_eq!(used.len(), reqs.len(), "round {round} queue {q}");
            assert!(reqs.iter().all(|r| vm.status_at(r.3) == S_OK));
        }
        vm.reset_alloc();
    }
}

fn throttled_daemon(extra: &[&str]) -> Daemon {
    let mut args = vec![
        "--object",
        "throttle-group,id=tg0,limits.iops-total=1",
        "--blockdev",
        "driver=null-co,node-name=n0,size=64M,read-zeroes=on",
        "--blockdev",
        "driver=throttle,node-name=t0,throttle-group=tg0,file=n0",
        "--export",
        "vhost-user-blk,id=e0,node-name=t0,addr.type=unix,addr.path={sock},writable=on",
    ];
    args.extend_from_slice(extra);
    Daemon::start(&args)
}

#[test]
fn get_vring_base_does_not_wait_behind_an_io_limit() {
    // At 1 IOPS, 30 requests would take 30 s; a drain lets them through.
    let d = throttled_daemon(&[]);
    let mut vm = Vm::connect(&d.socket, VmOptions::default());
    let reqs = submit_writes(&mut vm, 0, 30, 4096, 0);
    wait_first_completion(&vm, 0);
    // The queue also runs once when it is enabled, which may overlap with
    // publishing: give the kick time to pop the rest (they then wait on
    // the 1 IOPS limit for seconds).
    std::thread::sleep(Duration::from_millis(200));
    let base = vm.frontend.get_vring_base(0).expect("GET_VRING_BASE");
    assert_eq!(base as usize, reqs.len());
    assert_eq!(
        u32::from(vm.queues[0].used_idx(&vm.mem)),
        base,
        "all completed before the answer"
    );
    let used = vm.queues[0].wait_used(&vm.mem, reqs.len(), Duration::from_secs(1));
    assert!(used.iter().all(|u| {
        let r = reqs.iter().find(|r| u32::from(r.0) == u.id).unwrap();
        vm.status_at(r.3) == S_OK
    }));
}

#[test]
fn sigterm_does_not_wait_behind_an_io_limit() {
    let mut d = throttled_daemon(&[]);
    let mut vm = Vm::connect(&d.socket, VmOptions::default());
    let reqs = submit_writes(&mut vm, 0, 30, 4096, 0);
    wait_first_completion(&vm, 0);
    std::thread::sleep(Duration::from_millis(200));
    let started = std::time::Instant::now();
    assert!(d.terminate().success());
    // Not a timing assertion on performance: without the drain bypass the
    // daemon would still be waiting for its limit (30 s).
    assert!(started.elapsed() < Duration::from_secs(20));
    let used = vm.queues[0].wait_used(&vm.mem, reqs.len(), Duration::from_millis(100));
    assert_eq!(used.len(), reqs.len());
}

#[test]
fn a_second_daemon_cannot_write_an_image_in_use() {
    let d = Daemon::raw(16 * MIB, &[]);
    let img = d.image();
    let other = d.dir.path().join("other.sock");
    let (code, err) = run_daemon(&[
        "--image",
        img.to_str().unwrap(),
        "--socket",
        other.to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("Failed to get") && err.contains("lock"),
        "{err}"
    );
    // The running daemon is unaffected.
    let mut vm = Vm::connect(&d.socket, VmOptions::default());
    assert_eq!(vm.write(0, 0, &[1u8; 512]), S_OK);
}

#[test]
fn qemu_img_cannot_write_an_image_in_use_but_may_read_it() {
    let mut d = Daemon::raw(16 * MIB, &[]);
    let img = d.image();
    let qemu_img = |args: &[&str]| {
        std::process::Command::new("qemu-img")
            .args(args)
            .arg(&img)
            .args(if args[0] == "resize" {
                &["32M"][..]
            } else {
                &[][..]
            })
            .output()
            .expect("qemu-img is installed by scripts/guest/install-deps.sh")
    };
    // QEMU's own lock check refuses a writer while we write...
    let resize = qemu_img(&["resize", "-f", "raw"]);
    assert!(!resize.status.success());
    let msg = String::from_utf8_lossy(&resize.stderr);
    assert!(msg.contains("Failed to get \"write\" lock"), "{msg}");
    // ...and lets a reader look (raw carries no metadata to keep consistent).
    let info = qemu_img(&["info", "-f", "raw"]);
    assert!(
        info.status.success(),
        "{}",
        String::from_utf8_lossy(&info.stderr)
    );
    assert!(d.terminate().success());
    let resize = qemu_img(&["resize", "-f", "raw"]);
    assert!(
        resize.status.success(),
        "free once the daemon is gone: {}",
        String::from_utf8_lossy(&resize.stderr)
    );
}

#[test]
fn locking_off_lets_a_second_opener_in_and_readers_are_welcome() {
    let d = Daemon::raw(16 * MIB, &[]);
    let img = d.image();
    let filename = format!(
        "driver=file,node-name=f1,filename={},locking=off",
        img.display()
    );
    let dir = d.dir.path().to_path_buf();
    let sock = dir.join("off.sock");
    let export = format!(
        "vhost-user-blk,id=e1,node-name=d1,addr.type=unix,addr.path={},writable=on",
        sock.display()
    );
    let mut child = std::process::Command::new(daemon_bin())
        .args([
            "--blockdev",
            &filename,
            "--blockdev",
            "driver=raw,node-name=d1,file=f1",
            "--export",
            &export,
        ])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_listening(&mut child, &sock, "daemon with locking=off");
    let _ = child.kill();
    let _ = child.wait();
    // A read-only opener shares writing: it may read an image in use.
    let ro_sock = dir.join("ro.sock");
    let mut reader = std::process::Command::new(daemon_bin())
        .args([
            "--image",
            img.to_str().unwrap(),
            "--socket",
            ro_sock.to_str().unwrap(),
            "--readonly",
        ])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_listening(&mut reader, &ro_sock, "read-only daemon");
    let _ = reader.kill();
    let _ = reader.wait();
}

/// Waits for `child` to create `sock`; fails if it exits first.
fn wait_listening(child: &mut std::process::Child, sock: &std::path::Path, what: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !common::listening(sock) {
        assert!(child.try_wait().unwrap().is_none(), "{what} exited");
        assert!(
            std::time::Instant::now() < deadline,
            "{what} never listened"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn daemonize_with_a_bad_configuration_exits_one_with_the_message() {
    let (code, err) = run_daemon(&[
        "--image",
        "/nonexistent/disk.img",
        "--socket",
        "/tmp/vub-never.sock",
        "--daemonize",
        "--log-file",
        "/dev/null",
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("/nonexistent/disk.img"), "{err}");
}
