//! Hostile guest (and frontend) input: every malformed chain gets a status
//! where it has room for one, goes back on the used ring, and the daemon
//! keeps serving.

mod common;

use std::time::Duration;

use common::*;
use vhost::vhost_user::VhostUserFrontend;
use vhost::VhostBackend;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

const MIB: u64 = 1 << 20;

fn setup() -> (Daemon, Vm) {
    let d = Daemon::raw(16 * MIB, &["--serial", "hostile"]);
    let vm = Vm::connect(&d.socket, VmOptions::default());
    (d, vm)
}

/// A normal write and read still work on queue 0.
fn assert_serving(vm: &mut Vm) {
    vm.reset_alloc();
    let data = pattern(99, 4096);
    assert_eq!(vm.write(0, 8, &data), S_OK, "daemon still serves writes");
    let (st, back) = vm.read(0, 8, 4096);
    assert_eq!(st, S_OK, "daemon still serves reads");
    assert_eq!(back, data);
}

/// Submits `descs` and returns the single completion's (status byte at `s`, used len).
fn run(vm: &mut Vm, descs: &[Desc], s: GuestAddress) -> (u8, u32) {
    let r = vm.run_chain(0, descs, s);
    vm.reset_alloc();
    r
}

#[test]
fn header_in_a_device_writable_descriptor_gets_ioerr() {
    let (_d, mut vm) = setup();
    let h = vm.write_header(T_IN, 0);
    let s = vm.status_buf();
    assert_eq!(
        run(&mut vm, &[Desc::w(h, 16), Desc::w(s, 1)], s),
        (S_IOERR, 1)
    );
    assert_serving(&mut vm);
}

#[test]
fn status_in_a_read_only_descriptor_is_not_written() {
    let (_d, mut vm) = setup();
    let h = vm.write_header(T_IN, 0);
    let s = vm.status_buf();
    // No writable byte at all: nothing to write a status into.
    assert_eq!(run(&mut vm, &[Desc::r(h, 16), Desc::r(s, 1)], s), (0xff, 0));
    // A readable descriptor after a writable one breaks the layout rule.
    let h = vm.write_header(T_IN, 0);
    let d = vm.alloc(512);
    let s = vm.status_buf();
    let used = {
        let head =
            vm.queues[0].add_chain(&vm.mem, &[Desc::r(h, 16), Desc::w(d, 512), Desc::r(s, 1)]);
        vm.queues[0].kick();
        let u = vm.queues[0].wait_used(&vm.mem, 1, Duration::from_secs(10));
        assert_eq!(u[0].id, u32::from(head));
        u[0]
    };
    assert_eq!(used.len, 1);
    assert_eq!(
        vm.mem.read_obj::<u8>(GuestAddress(d.0 + 511)).unwrap(),
        S_IOERR
    );
    assert_eq!(vm.status_at(s), 0xff, "read-only status byte untouched");
    assert_serving(&mut vm);
}

#[test]
fn head_only_chain_is_returned_with_length_zero() {
    let (_d, mut vm) = setup();
    let h = vm.write_header(T_OUT, 0);
    let s = vm.status_buf();
    assert_eq!(run(&mut vm, &[Desc::r(h, 16)], s), (0xff, 0));
    assert_serving(&mut vm);
}

#[test]
fn zero_length_descriptors_are_skipped() {
    let (_d, mut vm) = setup();
    let data = pattern(1, 4096);
    assert_eq!(vm.write(0, 0, &data), S_OK);
    let h = vm.write_header(T_IN, 0);
    let z = vm.alloc(16);
    let d = vm.alloc(4096);
    let s = vm.status_buf();
    let (st, len) = run(
        &mut vm,
        &[
            Desc::r(h, 16),
            Desc::w(z, 0),
            Desc::w(d, 4096),
            Desc::w(z, 0),
            Desc::w(s, 1),
        ],
        s,
    );
    assert_eq!((st, len), (S_OK, 4097));
    let mut back = vec![0u8; 4096];
    vm.mem.read_slice(&mut back, d).unwrap();
    assert_eq!(back, data);
    assert_serving(&mut vm);
}

#[test]
fn huge_descriptor_gets_ioerr() {
    let (_d, mut vm) = setup();
    let h = vm.write_header(T_IN, 0);
    let d = vm.alloc(4096);
    let s = vm.status_buf();
    assert_eq!(
        run(
            &mut vm,
            &[Desc::r(h, 16), Desc::w(d, 0xffff_f000), Desc::w(s, 1)],
            s
        )
        .0,
        S_IOERR
    );
    // A chain of more than 4 GiB is illegal (virtio 1.2, 2.7.5.2): it is cut
    // before the status descriptor, so it returns with nothing written.
    let h = vm.write_header(T_OUT, 0);
    let s = vm.status_buf();
    assert_eq!(
        run(
            &mut vm,
            &[Desc::r(h, 16), Desc::r(d, u32::MAX), Desc::w(s, 1)],
            s
        ),
        (0xff, 0)
    );
    assert_serving(&mut vm);
}

#[test]
fn descriptor_loop_is_cut_and_returned() {
    let (_d, mut vm) = setup();
    let h = vm.write_header(T_IN, 0);
    let d = vm.alloc(512);
    let s = vm.status_buf();
    let q = &mut vm.queues[0];
    // 0 -> 1 -> 2 -> 0 -> ...
    q.write_desc(&vm.mem, 0, Desc::r(h, 16), Some(1));
    q.write_desc(&vm.mem, 1, Desc::w(d, 512), Some(2));
    q.write_desc(&vm.mem, 2, Desc::w(s, 1), Some(0));
    q.push_avail(&vm.mem, 0);
    q.kick();
    let used = q.wait_used(&vm.mem, 1, Duration::from_secs(10));
    assert_eq!(used.len(), 1, "looping chain returned");
    // Move the harness past the descriptors we used by hand.
    vm.queues[0].add_chain(&vm.mem, &[Desc::r(h, 16), Desc::w(s, 1)]);
    vm.queues[0].kick();
    vm.queues[0].wait_used(&vm.mem, 1, Duration::from_secs(10));
    assert_serving(&mut vm);
}

#[test]
fn chain_longer_than_the_queue_in_an_indirect_table_gets_ioerr() {
    let (_d, mut vm) = setup();
    let n = 1100u32; // more than seg_max (1022) and the queue (256)
    let h = vm.write_header(T_OUT, 0);
    let d = vm.alloc(512 * u64::from(n));
    let s = vm.status_buf();
    let table = vm.alloc(16 * u64::from(n + 2));
    VirtQueue::write_desc_at(&vm.mem, table, 0, Desc::r(h, 16), Some(1));
    for i in 0..n {
        VirtQueue::write_desc_at(
            &vm.mem,
            table,
            (i + 1) as u16,
            Desc::r(GuestAddress(d.0 + 512 * u64::from(i)), 512),
            Some((i + 2) as u16),
        );
    }
    VirtQueue::write_desc_at(&vm.mem, table, (n + 1) as u16, Desc::w(s, 1), None);
    assert_eq!(
        run(&mut vm, &[Desc::indirect(table, n + 2)], s),
        (S_IOERR, 1)
    );
    assert_serving(&mut vm);
}

#[test]
fn more_data_segments_than_seg_max_get_ioerr() {
    let (_d, mut vm) = setup();
    let c = vm.config(12, 4);
    let seg_max = u32::from_le_bytes(c.try_into().unwrap());
    let n = seg_max + 1;
    let h = vm.write_header(T_IN, 0);
    let d = vm.alloc(512 * u64::from(n));
    let s = vm.status_buf();
    let table = vm.alloc(16 * u64::from(n + 2));
    VirtQueue::write_desc_at(&vm.mem, table, 0, Desc::r(h, 16), Some(1));
    for i in 0..n {
        VirtQueue::write_desc_at(
            &vm.mem,
            table,
            (i + 1) as u16,
            Desc::w(GuestAddress(d.0 + 512 * u64::from(i)), 512),
            Some((i + 2) as u16),
        );
    }
    VirtQueue::write_desc_at(&vm.mem, table, (n + 1) as u16, Desc::w(s, 1), None);
    assert_eq!(run(&mut vm, &[Desc::indirect(table, n + 2)], s).0, S_IOERR);
    assert_serving(&mut vm);
}

#[test]
fn indirect_tables_with_bad_lengths_are_returned() {
    let (_d, mut vm) = setup();
    let h = vm.write_header(T_IN, 0);
    let s = vm.status_buf();
    let table = vm.alloc(64);
    VirtQueue::write_desc_at(&vm.mem, table, 0, Desc::r(h, 16), Some(1));
    VirtQueue::write_desc_at(&vm.mem, table, 1, Desc::w(s, 1), None);
    for len in [17u32, 0, 8] {
        let bad = Desc {
            addr: table.0,
            len,
            flags: 4,
        };
        let (_, used_len) = vm.run_chain(0, &[bad], s);
        assert_eq!(
            used_len, 0,
            "indirect length {len}: no status can be written"
        );
    }
    // An indirect descriptor inside an indirect table.
    let inner = vm.alloc(32);
    VirtQueue::write_desc_at(&vm.mem, inner, 0, Desc::indirect(table, 2), None);
    let (_, used_len) = vm.run_chain(0, &[Desc::indirect(inner, 1)], s);
    assert_eq!(used_len, 0);
    // An indirect table outside guest memory.
    let (_, used_len) = vm.run_chain(0, &[Desc::indirect(GuestAddress(1 << 40), 2)], s);
    assert_eq!(used_len, 0);
    vm.reset_alloc();
    assert_serving(&mut vm);
}

#[test]
fn buffers_outside_guest_memory_get_ioerr() {
    let (_d, mut vm) = setup();
    let h = vm.write_header(T_IN, 0);
    let s = vm.status_buf();
    let outside = GuestAddress(MEM_SIZE - 100);
    assert_eq!(
        run(
            &mut vm,
            &[Desc::r(h, 16), Desc::w(outside, 512), Desc::w(s, 1)],
            s
        )
        .0,
        S_IOERR
    );
    let h = vm.write_header(T_OUT, 0);
    let s = vm.status_buf();
    assert_eq!(
        run(
            &mut vm,
            &[
                Desc::r(h, 16),
                Desc::r(GuestAddress(1 << 40), 512),
                Desc::w(s, 1)
            ],
            s
        )
        .0,
        S_IOERR
    );
    // Header outside memory.
    let s = vm.status_buf();
    assert_eq!(
        run(
            &mut vm,
            &[Desc::r(GuestAddress(u64::MAX - 8), 16), Desc::w(s, 1)],
            s
        )
        .0,
        S_IOERR
    );
    // Status outside memory: nothing is written, the chain still returns.
    let h = vm.write_header(T_FLUSH, 0);
    let s = vm.status_buf();
    let (_, len) = run(
        &mut vm,
        &[Desc::r(h, 16), Desc::w(GuestAddress(u64::MAX), 1)],
        s,
    );
    assert_eq!(len, 0);
    assert_serving(&mut vm);
}

#[test]
fn buffer_spanning_two_adjacent_regions_is_served_and_one_into_a_gap_is_not() {
    let d = Daemon::raw(16 * MIB, &[]);
    let regions = vec![(0, 32 * MIB), (32 * MIB, 32 * MIB)];
    let mut vm = Vm::connect(
        &d.socket,
        VmOptions {
            regions,
            ..Default::default()
        },
    );
    let data = pattern(3, 8192);
    let h = vm.write_header(T_OUT, 16);
    let across = GuestAddress(32 * MIB - 4096);
    vm.mem.write_slice(&data, across).unwrap();
    let s = vm.status_buf();
    assert_eq!(
        run(
            &mut vm,
            &[Desc::r(h, 16), Desc::r(across, 8192), Desc::w(s, 1)],
            s
        )
        .0,
        S_OK
    );
    assert_eq!(read_file_at(&d.image(), 16 * 512, 8192), data);
    drop(vm);

    let gap = vec![(0, 32 * MIB), (48 * MIB, 16 * MIB)];
    let mut vm = Vm::connect(
        &d.socket,
        VmOptions {
            regions: gap,
            ..Default::default()
        },
    );
    let h = vm.write_header(T_OUT, 16);
    let s = vm.status_buf();
    assert_eq!(
        run(
            &mut vm,
            &[
                Desc::r(h, 16),
                Desc::r(GuestAddress(32 * MIB - 4096), 8192),
                Desc::w(s, 1)
            ],
            s
        )
        .0,
        S_IOERR
    );
    assert_serving(&mut vm);
}

#[test]
fn sectors_at_and_beyond_capacity_and_near_u64_max_get_ioerr() {
    let (_d, mut vm) = setup();
    let cap = vm.capacity_sectors();
    assert_eq!(vm.read(0, cap - 1, 512).0, S_OK);
    assert_eq!(vm.read(0, cap, 512).0, S_IOERR);
    assert_eq!(vm.read(0, cap - 1, 1024).0, S_IOERR);
    assert_eq!(vm.write(0, cap + 1000, &[0u8; 512]), S_IOERR);
    assert_eq!(vm.read(0, u64::MAX, 512).0, S_IOERR);
    assert_eq!(
        vm.read(0, u64::MAX / 512, 4096).0,
        S_IOERR,
        "sector * 512 + length overflows"
    );
    assert_eq!(vm.write(0, u64::MAX / 512 - 1, &[0u8; 4096]), S_IOERR);
    assert_eq!(vm.ranges(0, T_DISCARD, &[(u64::MAX - 4, 8, 0)]), S_IOERR);
    assert_eq!(vm.ranges(0, T_WRITE_ZEROES, &[(cap - 4, 8, 0)]), S_IOERR);
    assert_serving(&mut vm);
}

#[test]
fn misaligned_lengths_get_ioerr() {
    let (_d, mut vm) = setup();
    assert_eq!(vm.read(0, 0, 100).0, S_IOERR);
    assert_eq!(vm.write(0, 0, &[1u8; 513]), S_IOERR);
    assert_serving(&mut vm);
}

#[test]
fn discard_and_write_zeroes_with_bad_segments_or_flags_are_refused() {
    let (_d, mut vm) = setup();
    // Range list lengths that are not whole 16-byte ranges.
    for (t, len) in [(T_DISCARD, 15u32), (T_WRITE_ZEROES, 0), (T_DISCARD, 17)] {
        let h = vm.write_header(t, 0);
        let r = vm.alloc(32);
        let s = vm.status_buf();
        let mut descs = vec![Desc::r(h, 16)];
        if len > 0 {
            descs.push(Desc::r(r, len));
        }
        descs.push(Desc::w(s, 1));
        assert_eq!(run(&mut vm, &descs, s).0, S_IOERR, "type {t} len {len}");
    }
    // Too many ranges.
    let many: Vec<(u64, u32, u32)> = (0..33).map(|i| (i * 8, 8, 0)).collect();
    assert_eq!(vm.ranges(0, T_DISCARD, &many), S_IOERR);
    // Reserved flags, and UNMAP on a discard, are unsupported.
    assert_eq!(vm.ranges(0, T_WRITE_ZEROES, &[(0, 8, 2)]), S_UNSUPP);
    assert_eq!(
        vm.ranges(0, T_WRITE_ZEROES, &[(0, 8, 0x8000_0000)]),
        S_UNSUPP
    );
    assert_eq!(vm.ranges(0, T_DISCARD, &[(0, 8, 1)]), S_UNSUPP);
    // More sectors than the advertised maximum.
    let c = vm.config(36, 4);
    let max = u32::from_le_bytes(c.try_into().unwrap());
    assert_eq!(vm.ranges(0, T_DISCARD, &[(0, max + 1, 0)]), S_IOERR);
    // Misaligned to nothing on 512-byte sectors, but a zero-length range is fine.
    assert_eq!(vm.ranges(0, T_DISCARD, &[(0, 0, 0)]), S_OK);
    assert_serving(&mut vm);
}

#[test]
fn same_head_made_available_twice_is_served_once() {
    let (_d, mut vm) = setup();
    let h = vm.write_header(T_FLUSH, 0);
    let s = vm.status_buf();
    let head = vm.queues[0].add_chain(&vm.mem, &[Desc::r(h, 16), Desc::w(s, 1)]);
    vm.queues[0].push_avail(&vm.mem, head);
    vm.queues[0].kick();
    let used = vm.queues[0].wait_used(&vm.mem, 2, Duration::from_millis(300));
    assert_eq!(used.len(), 1, "the duplicate is not returned a second time");
    assert_eq!(used[0].id, u32::from(head));
    assert_serving(&mut vm);
}

#[test]
fn head_index_beyond_the_queue_size_is_dropped() {
    let (_d, mut vm) = setup();
    vm.queues[0].push_avail(&vm.mem, 300);
    vm.queues[0].push_avail(&vm.mem, u16::MAX);
    vm.queues[0].kick();
    std::thread::sleep(Duration::from_millis(50));
    assert_serving(&mut vm);
}

#[test]
fn avail_index_jumping_past_the_queue_size_does_not_kill_the_daemon() {
    let (d, vm) = setup();
    let q = &vm.queues[0];
    vm.mem
        .write_obj(1000u16, GuestAddress(q.avail.0 + 2))
        .unwrap();
    q.kick();
    std::thread::sleep(Duration::from_millis(50));
    drop(vm);
    let mut vm = Vm::connect(&d.socket, VmOptions::default());
    assert_serving(&mut vm);
}

#[test]
fn vring_index_out_of_range_ends_that_connection_only() {
    let (d, vm) = setup();
    drop(vm);
    // The vhost crate's frontend refuses an index beyond the queues it was
    // told of without sending anything: tell it of 256, so that the daemon
    // gets the requests. (tests/limits.rs has every vring request.)
    let connect = || {
        let f = vhost::vhost_user::Frontend::connect(&d.socket, 256).unwrap();
        f.set_owner().unwrap();
        f
    };
    // No REPLY_ACK: the refusal shows as the connection's end.
    let f = connect();
    let _ = f.set_vring_num(200, 256);
    f.get_features().expect_err("connection still open");
    let f = connect();
    f.get_vring_base(77).unwrap_err();
    f.get_features().expect_err("connection still open");
    let mut vm = Vm::connect(&d.socket, VmOptions::default());
    assert_serving(&mut vm);
    assert!(d
        .log()
        .contains("vring index 200 out of range: the device has 16 queues"));
}

#[test]
fn get_config_larger_than_the_struct_is_zero_padded() {
    let (_d, mut vm) = setup();
    let c = vm.config(0, 128);
    assert_eq!(c.len(), 128);
    assert!(c[72..].iter().all(|&b| b == 0));
    assert_eq!(vm.config(200, 56), vec![0u8; 56]);
    assert_serving(&mut vm);
}

#[test]
fn config_writes_outside_the_writeback_byte_are_refused() {
    let (_d, mut vm) = setup();
    let cap = vm.capacity_sectors();
    let _ = vm.frontend.set_config(
        0,
        vhost::vhost_user::message::VhostUserConfigFlags::WRITABLE,
        &[0xff; 8],
    );
    drop(vm);
    let mut vm = Vm::connect(&_d.socket, VmOptions::default());
    assert_eq!(vm.capacity_sectors(), cap);
    assert_serving(&mut vm);
}

/// A small xorshift generator, seeded per run for reproducibility.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn rarely(&mut self) -> bool {
        self.below(8) == 0
    }
}

#[test]
fn random_chains_always_come_back_and_the_daemon_keeps_serving() {
    let (_d, mut vm) = setup();
    let seed = std::env::var("VUB_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_1234_u64);
    let mut rng = Rng(seed | 1);
    let types = [
        T_IN,
        T_OUT,
        T_FLUSH,
        T_GET_ID,
        T_DISCARD,
        T_WRITE_ZEROES,
        2,
        99,
    ];
    let cap = vm.capacity_sectors();
    for round in 0..400 {
        let t = types[rng.below(types.len() as u64) as usize];
        let sector = if rng.rarely() {
            rng.next()
        } else {
            rng.below(cap + 16)
        };
        let h = vm.write_header(t, sector);
        let mut descs = vec![Desc::r(h, 16)];
        if rng.rarely() {
            descs[0].flags = 2;
        }
        for _ in 0..rng.below(4) {
            let len = if rng.rarely() {
                rng.next() as u32
            } else {
                512 * (1 + rng.below(8) as u32)
            };
            let addr = if rng.rarely() {
                GuestAddress(rng.next())
            } else {
                vm.alloc(u64::from(len.min(1 << 16)))
            };
            let writable = if rng.rarely() {
                rng.below(2) == 0
            } else {
                t != T_OUT && t != T_DISCARD && t != T_WRITE_ZEROES
            };
            descs.push(Desc {
                addr: addr.0,
                len: len.min(if addr.0 > MEM_SIZE { u32::MAX } else { 1 << 16 }),
                flags: if writable { 2 } else { 0 },
            });
        }
        let s = vm.status_buf();
        if !rng.rarely() {
            descs.push(Desc::w(s, 1));
        }
        let head = vm.queues[0].add_chain(&vm.mem, &descs);
        vm.queues[0].kick();
        let used = vm.queues[0].wait_used(&vm.mem, 1, Duration::from_secs(10));
        assert_eq!(
            used.len(),
            1,
            "round {round} (seed {seed}): chain {descs:?} never came back"
        );
        assert_eq!(used[0].id, u32::from(head));
        vm.reset_alloc();
        if round % 50 == 0 {
            assert_serving(&mut vm);
        }
    }
    assert_serving(&mut vm);
}

/// A daemon with a QMP monitor at `{dir}/qmp.sock`.
fn daemon_with_qmp() -> Daemon {
    daemon_with_qmp_opts("")
}

/// Like `daemon_with_qmp`, with `opts` appended to the export's options.
fn daemon_with_qmp_opts(opts: &str) -> Daemon {
    let dir = tempfile::tempdir().unwrap();
    std::fs::File::create(dir.path().join("disk.img"))
        .unwrap()
        .set_len(16 * MIB)
        .unwrap();
    Daemon::start_in(
        dir,
        &[
            "--blockdev",
            "driver=file,node-name=f0,filename={dir}/disk.img",
            "--blockdev",
            "driver=raw,node-name=d0,file=f0",
            "--export",
            &format!(
                "vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path={{sock}},writable=on{opts}"
            ),
            "--chardev",
            "socket,id=m,path={dir}/qmp.sock,server=on,wait=off",
            "--monitor",
            "chardev=m",
        ],
    )
}

/// Publishes `n` writes on queue 0 and kicks, without waiting for them.
fn submit_writes(vm: &mut Vm, n: u64) {
    let data = pattern(7, 4096);
    for i in 0..n {
        let h = vm.write_header(T_OUT, 8 * i);
        let d = vm.alloc(4096);
        vm.mem.write_slice(&data, d).unwrap();
        let s = vm.status_buf();
        vm.queues[0].add_chain(&vm.mem, &[Desc::r(h, 16), Desc::r(d, 4096), Desc::w(s, 1)]);
    }
    vm.queues[0].kick();
}

/// Issue 15 (4): a frontend broke the protocol (a refused SET_CONFIG, its
/// only memory region removed), published requests and went away. Requests
/// popped after the connection ended were never returned nor cancelled and
/// stayed counted as in flight (4 tries in 10), so every later drain
/// (block_resize, shutdown) waited its full 30 s timeout. 180 tries: before
/// the fix, 10 runs of 10 left 106 to 276 requests counted.
#[test]
fn requests_of_a_dead_connection_never_stay_in_flight() {
    let mut d = daemon_with_qmp();
    let mut qmp = Qmp::connect(&d.dir.path().join("qmp.sock"));
    let in_flight = |qmp: &mut Qmp| {
        let r = qmp.execute("query-blockstats", serde_json::json!({}));
        r["return"][0]["stats"]["x-in-flight"]
            .as_u64()
            .unwrap_or_else(|| panic!("{r}"))
    };
    let tries = 180;
    for i in 0..tries {
        let mut vm = Vm::connect(&d.socket, VmOptions::default());
        let region = vhost::VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: MEM_SIZE,
            userspace_addr: vm.mem.get_host_address(GuestAddress(0)).unwrap() as u64,
            mmap_offset: 0,
            mmap_handle: vm.memfd_raw(),
        };
        match i % 3 {
            // Refused: the daemon ends the connection while the kicks are
            // still registered.
            0 => {
                let _ = vm.frontend.set_config(
                    0,
                    vhost::vhost_user::message::VhostUserConfigFlags::WRITABLE,
                    &[0xff; 8],
                );
                submit_writes(&mut vm, 16);
            }
            // The only region removed, then requests published.
            1 => {
                let _ = vm.frontend.remove_mem_region(&region);
                submit_writes(&mut vm, 16);
            }
            // Requests published, then their memory removed under them.
            _ => {
                submit_writes(&mut vm, 16);
                let _ = vm.frontend.remove_mem_region(&region);
            }
        }
        drop(vm);
    }
    // One frontend at a time: this one is served only once the server has
    // finished with every earlier connection.
    let mut vm = Vm::connect(&d.socket, VmOptions::default());
    assert_serving(&mut vm);
    assert_eq!(
        in_flight(&mut qmp),
        0,
        "requests of {tries} dead connections still counted in flight"
    );
    // And a drain does not wait for them (it would for its 30 s timeout).
    let t = std::time::Instant::now();
    let r = qmp.execute(
        "block_resize",
        serde_json::json!({"node-name": "d0", "size": 32 * MIB}),
    );
    assert!(r.get("return").is_some(), "{r}");
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "block_resize took {:?}",
        t.elapsed()
    );
    assert_serving(&mut vm);
    // Nor does the shutdown's drain.
    drop(vm);
    let t = std::time::Instant::now();
    let status = d.terminate();
    assert!(status.success(), "{status:?}");
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "shutdown took {:?}",
        t.elapsed()
    );
}

/// Where the truncation tests cut the guest's memfd: the rings (at 1 MiB)
/// and the data area (from 16 MiB) stay, `FAR` is gone.
const KEEP: u64 = 32 * MIB;
const FAR: u64 = 48 * MIB;

/// Publishes `descs` on queue 0, truncates the guest's memfd to `KEEP`
/// (after the chain is written: our own accesses beyond it would fault
/// too), kicks, and returns what came back on the used ring.
fn publish_then_truncate(d: &mut Daemon, vm: &mut Vm, descs: &[Desc]) -> Vec<queue::Used> {
    let head = vm.queues[0].add_chain(&vm.mem, descs);
    // SAFETY: ftruncate on the test VM's memfd; the test touches nothing
    // beyond KEEP afterwards.
    assert_eq!(unsafe { libc::ftruncate(vm.memfd_raw(), KEEP as i64) }, 0);
    vm.queues[0].kick();
    let used = vm.queues[0].wait_used(&vm.mem, 1, Duration::from_secs(5));
    assert_alive(d);
    for u in &used {
        assert_eq!(u.id, u32::from(head));
    }
    used
}

/// The daemon process still runs (it used to die of SIGBUS).
fn assert_alive(d: &mut Daemon) {
    let status = d.child.as_mut().expect("daemon").try_wait().unwrap();
    assert!(status.is_none(), "daemon died: {status:?}\n{}", d.log());
}

/// A daemon with two exports: `e0` on `d.socket` and `e1` on
/// `{dir}/other.sock`, and a VM connected to each.
fn setup_two() -> (Daemon, Vm, Vm) {
    let dir = tempfile::tempdir().unwrap();
    for img in ["disk.img", "other.img"] {
        std::fs::File::create(dir.path().join(img))
            .unwrap()
            .set_len(16 * MIB)
            .unwrap();
    }
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
            "vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path={sock},writable=on",
            "--export",
            "vhost-user-blk,id=e1,node-name=d1,addr.type=unix,addr.path={dir}/other.sock,writable=on",
        ],
    );
    let other_sock = d.dir.path().join("other.sock");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !listening(&other_sock) {
        assert!(
            std::time::Instant::now() < deadline,
            "second export never listened"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let vm = Vm::connect(&d.socket, VmOptions::default());
    let mut other = Vm::connect(&other_sock, VmOptions::default());
    assert_serving(&mut other);
    (d, vm, other)
}

/// The daemon ended the connection whose memory vanished, serves the next
/// one, and the other export's frontend, connected all along, was served
/// throughout.
fn assert_survived(d: &mut Daemon, vm: Vm, other: &mut Vm) {
    assert_serving(other);
    drop(vm);
    let mut vm = Vm::connect(&d.socket, VmOptions::default());
    assert_serving(&mut vm);
    assert_alive(d);
    assert!(
        d.log().contains("memory vanished"),
        "the connection was not ended:\n{}",
        d.log()
    );
}

/// Issue 15 (5): a request header beyond the end of the (truncated) memfd
/// was read with SIGBUS, killing the daemon. Now the request fails and that
/// connection ends.
#[test]
fn header_in_truncated_guest_memory_does_not_kill_the_daemon() {
    let (mut d, mut vm, mut other) = setup_two();
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&T_IN.to_le_bytes());
    vm.mem.write_slice(&h, GuestAddress(FAR)).unwrap();
    let data = vm.alloc(512);
    let s = vm.status_buf();
    let descs = [
        Desc::r(GuestAddress(FAR), 16),
        Desc::w(data, 512),
        Desc::w(s, 1),
    ];
    let used = publish_then_truncate(&mut d, &mut vm, &descs);
    assert_eq!(used.len(), 1, "the request came back");
    assert_eq!(vm.status_at(s), S_IOERR);
    assert_survived(&mut d, vm, &mut other);
}

/// Issue 15 (5): the status byte beyond the end of the memfd.
#[test]
fn status_in_truncated_guest_memory_does_not_kill_the_daemon() {
    let (mut d, mut vm, mut other) = setup_two();
    let h = vm.write_header(T_IN, 0);
    let data = vm.alloc(512);
    let descs = [
        Desc::r(h, 16),
        Desc::w(data, 512),
        Desc::w(GuestAddress(FAR), 1),
    ];
    publish_then_truncate(&mut d, &mut vm, &descs);
    assert_survived(&mut d, vm, &mut other);
}

/// Issue 15 (5): the GET_ID buffer beyond the end of the memfd. The request
/// gets IOERR (its status byte is still there), not success for an id
/// written into nothing.
#[test]
fn get_id_buffer_in_truncated_guest_memory_does_not_kill_the_daemon() {
    let (mut d, mut vm, mut other) = setup_two();
    let h = vm.write_header(T_GET_ID, 0);
    let s = vm.status_buf();
    let descs = [
        Desc::r(h, 16),
        Desc::w(GuestAddress(FAR), 20),
        Desc::w(s, 1),
    ];
    let used = publish_then_truncate(&mut d, &mut vm, &descs);
    assert_eq!(used.len(), 1, "the request came back");
    assert_eq!(vm.status_at(s), S_IOERR);
    assert_survived(&mut d, vm, &mut other);
}

/// A vhost-user frontend without the harness's guest memory: it offers a
/// `region_size` region backed by a memfd of `file_size` bytes, mapped at
/// a made-up frontend address (the daemon never sees our mapping).
fn offer_region_beyond_its_file(socket: &std::path::Path, add_mem_reg: bool) -> bool {
    use std::os::fd::{AsRawFd, FromRawFd};
    use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures};
    use vhost::vhost_user::Frontend;
    use vhost::{VhostUserMemoryRegionInfo, VringConfigData};

    // SAFETY: memfd_create with a valid name; the fd is owned by the File.
    let file = unsafe {
        let fd = libc::memfd_create(c"small".as_ptr(), libc::MFD_CLOEXEC);
        assert!(fd >= 0);
        std::fs::File::from_raw_fd(fd)
    };
    file.set_len(4096).unwrap();
    let ua = 0x7f00_0000_0000u64;
    let mut f = Frontend::connect(socket, 1).expect("connect");
    f.set_owner().unwrap();
    let features = f.get_features().unwrap();
    let pf = f.get_protocol_features().unwrap();
    f.set_protocol_features(
        pf & (VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::MQ),
    )
    .unwrap();
    f.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    f.set_features(features & (VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES))
        .unwrap();
    let region = VhostUserMemoryRegionInfo {
        guest_phys_addr: 0,
        memory_size: 16 * MIB,
        userspace_addr: ua,
        mmap_offset: 0,
        mmap_handle: file.as_raw_fd(),
    };
    let accepted = if add_mem_reg {
        f.add_mem_region(&region).is_ok()
    } else {
        f.set_mem_table(&[region]).is_ok()
    };
    // Whatever the answer, go on as a frontend that ignores it: rings in
    // the part of the region the file does not have, and a kick.
    let kick = eventfd();
    let call = eventfd();
    let _ = f.set_vring_num(0, 256);
    let _ = f.set_vring_addr(
        0,
        &VringConfigData {
            queue_max_size: 256,
            queue_size: 256,
            flags: 0,
            desc_table_addr: ua + MIB,
            used_ring_addr: ua + MIB + 0x1_0000,
            avail_ring_addr: ua + MIB + 0x2_0000,
            log_addr: None,
        },
    );
    let _ = f.set_vring_base(0, 0);
    let _ = f.set_vring_call(0, &call);
    let _ = f.set_vring_kick(0, &kick);
    let _ = f.set_vring_enable(0, true);
    let _ = kick.write(1);
    std::thread::sleep(Duration::from_millis(200));
    accepted
}

/// Issue 15 (5): a 16 MiB region backed by a 4 KiB file was accepted, and
/// the first look at a ring beyond the file's end killed the daemon with
/// SIGBUS. The memory update is refused now (SET_MEM_TABLE and
/// ADD_MEM_REG), that connection ends, the daemon serves the next one.
#[test]
fn region_larger_than_its_file_is_refused() {
    let (mut d, vm) = setup();
    drop(vm);
    for add_mem_reg in [false, true] {
        let accepted = offer_region_beyond_its_file(&d.socket, add_mem_reg);
        assert_alive(&mut d);
        assert!(!accepted, "a region beyond its file was accepted");
        let mut vm = Vm::connect(&d.socket, VmOptions::default());
        assert_serving(&mut vm);
    }
    assert!(d
        .log()
        .contains("needs 16777216 bytes of its file, which has 4096"));
}

/// The SIGBUS handler only absorbs faults in guest memory: any other SIGBUS
/// still ends the process with that signal.
#[test]
fn a_sigbus_outside_guest_memory_still_kills() {
    let (mut d, mut vm) = setup();
    assert_serving(&mut vm);
    // SAFETY: kill only takes a pid and a signal number.
    unsafe { libc::kill(d.pid(), libc::SIGBUS) };
    let mut child = d.child.take().unwrap();
    let status = wait_timeout(&mut child, Duration::from_secs(10)).expect("daemon exits");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGBUS), "{status:?}");
}

/// Data buffers beyond the end of the memfd are reached by the kernel
/// (io_uring), which fails with EFAULT rather than SIGBUS: IOERR, and that
/// is the guest's fault, not the storage's (no error policy).
#[test]
fn data_buffers_in_truncated_guest_memory_get_ioerr() {
    // With `stop` the export used to stop on EFAULT and park the request.
    let mut d = daemon_with_qmp_opts(",on-read-error=stop,on-write-error=stop");
    let mut vm = Vm::connect(&d.socket, VmOptions::default());
    for t in [T_IN, T_OUT] {
        let h = vm.write_header(t, 0);
        let s = vm.status_buf();
        let data = GuestAddress(FAR);
        let desc = if t == T_IN {
            Desc::w(data, 4096)
        } else {
            Desc::r(data, 4096)
        };
        let used = publish_then_truncate(&mut d, &mut vm, &[Desc::r(h, 16), desc, Desc::w(s, 1)]);
        assert_eq!(used.len(), 1, "the request came back");
        assert_eq!(vm.status_at(s), S_IOERR);
        vm.reset_alloc();
    }
    assert_alive(&mut d);
    // The connection goes on (the kernel's EFAULT poisons nothing).
    assert!(!d.log().contains("memory vanished"), "{}", d.log());
    drop(vm);
    let mut vm = Vm::connect(&d.socket, VmOptions::default());
    assert_serving(&mut vm);
}
