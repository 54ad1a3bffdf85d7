//! Every request type through a real vhost-user connection, checked against
//! the image file on the host.

mod common;

use common::*;

const MIB: u64 = 1 << 20;

#[test]
fn config_space_reports_capacity_queues_and_limits() {
    let d = Daemon::raw(64 * MIB, &["--num-queues", "4"]);
    let mut vm = Vm::connect(&d.socket, VmOptions::default());
    let c = vm.config(0, 60);
    assert_eq!(
        u64::from_le_bytes(c[0..8].try_into().unwrap()),
        64 * MIB / 512
    );
    assert_eq!(
        u32::from_le_bytes(c[20..24].try_into().unwrap()),
        512,
        "blk_size"
    );
    assert_eq!(c[32], 1, "write cache on by default");
    assert_eq!(
        u16::from_le_bytes(c[34..36].try_into().unwrap()),
        4,
        "num_queues"
    );
    assert!(
        u32::from_le_bytes(c[36..40].try_into().unwrap()) > 0,
        "max_discard_sectors"
    );
    assert!(
        u32::from_le_bytes(c[48..52].try_into().unwrap()) > 0,
        "max_write_zeroes_sectors"
    );
    assert_eq!(vm.frontend_queue_num(), 4);
}

#[test]
fn write_then_read_round_trips_and_lands_in_the_image() {
    let d = Daemon::raw(16 * MIB, &[]);
    let mut vm = Vm::connect(&d.socket, VmOptions::default());
    let data = pattern(1, 64 * 1024);
    assert_eq!(vm.write(0, 2048, &data), S_OK);
    assert_eq!(read_file_at(&d.image(), 2048 * 512, data.len()), data);
    let (st, back) = vm.read(0, 2048, data.len() as u32);
    assert_eq!(st, S_OK);
    assert_eq!(back, data);
}

#[test]
fn read_returns_what_the_host_wrote_in_the_image() {
    let d = Daemon::raw(16 * MIB, &[]);
    let data = pattern(2, 8192);
    write_file_at(&d.image(), 10 * MIB, &data);
    let mut vm = Vm::connect(&d.socket, VmOptions::default());
    let (st, back) = vm.read(0, 10 * MIB / 512, 8192);
    assert_eq!(st, S_OK);
    assert_eq!(back, data);
}

#[test]
fn flush_succeeds() {
    let d = Daemon::raw(16 * MIB, &[]);
    let mut vm = Vm::connect(&d.socket, VmOptions::default());
    assert_eq!(vm.flush(0), S_OK);
}

#[test]
fn get_id_returns_the_serial_padded_to_20_bytes() {
    let d = Daemon::raw(16 * MIB, &["--serial", "vub-serial-1"]);
    let mut vm = Vm::connect(&d.socket, VmOptions::default());
    let (st, id, used) = vm.get_id(0, 20);
    assert_eq!(st, S_OK);
    assert_eq!(&id[..12], b"vub-serial-1");
    assert!(id[12..].iter().all(|&b| b == 0));
    assert_eq!(used, 21);
}

#[test]
fn get_id_with_a_short_buffer_writes_what_fits() {
    let d = Daemon::raw(16 * MIB, &["--serial", "ABCDEFGHIJKL"]);
    let mut vm = Vm::connect(&d.socket, VmOptions::default());
    let (st, id, used) = vm.get_id(0, 8);
    assert_eq!(st, S_OK);
    assert_eq!(&id, b"ABCDEFGH");
    assert_eq!(used, 9);
}

#[test]
fn discard_punches_a_hole_that_reads_back_as_zeroes() {
    let d = Daemon::raw(16 * MIB, &[]);
    let mut vm = Vm::connect(&d.socket, VmOptions::default());
    let data = pattern(3, (2 * MIB) as usize);
    assert_eq!(vm.write(0, 0, &data), S_OK);
    assert_eq!(vm.flush(0), S_OK);
    assert_eq!(vm.ranges(0, T_DISCARD, &[(1024, 2048, 0)]), S_OK);
    let back = read_file_at(&d.image(), 512 * 1024, MIB as usize);
    assert!(
        back.iter().all(|&b| b == 0),
        "discarded range reads as zeroes"
    );
    assert_eq!(read_file_at(&d.image(), 0, 512 * 1024), data[..512 * 1024]);
}

#[test]
fn write_zeroes_with_and_without_unmap_read_back_as_zeroes() {
    let d = Daemon::raw(16 * MIB, &[]);
    let mut vm = Vm::connect(&d.socket, VmOptions::default());
    let data = pattern(4, (4 * MIB) as usize);
    assert_eq!(vm.write(0, 0, &data[..MIB as usize]), S_OK);
    assert_eq!(vm.write(0, 2048, &data[..MIB as usize]), S_OK);
    assert_eq!(
        vm.ranges(0, T_WRITE_ZEROES, &[(8, 16, 0), (2048, 8, 1)]),
        S_OK
    );
    let (st, back) = vm.read(0, 0, 16 * 512);
    assert_eq!(st, S_OK);
    assert_eq!(&back[..4096], &data[..4096]);
    assert!(back[4096..].iter().all(|&b| b == 0));
    assert!(read_file_at(&d.image(), MIB, 4096).iter().all(|&b| b == 0));
    assert_eq!(read_file_at(&d.image(), MIB + 4096, 4096), data[4096..8192]);
}

#[test]
fn several_ranges_in_one_discard_are_all_applied() {
    let d = Daemon::raw(16 * MIB, &[]);
    let mut vm = Vm::connect(&d.socket, VmOptions::default());
    let data = pattern(5, MIB as usize);
    assert_eq!(vm.write(0, 0, &data), S_OK);
    assert_eq!(
        vm.ranges(0, T_DISCARD, &[(0, 8, 0), (64, 8, 0), (128, 8, 0)]),
        S_OK
    );
    for s in [0u64, 64, 128] {
        assert!(read_file_at(&d.image(), s * 512, 4096)
            .iter()
            .all(|&b| b == 0));
    }
    assert_eq!(read_file_at(&d.image(), 8 * 512, 512), data[4096..4608]);
}

#[test]
fn unknown_request_type_is_unsupported() {
    let d = Daemon::raw(16 * MIB, &[]);
    let mut vm = Vm::connect(&d.socket, VmOptions::default());
    let h = vm.write_header(99, 0);
    let s = vm.status_buf();
    let (st, len) = vm.run_chain(0, &[Desc::r(h, 16), Desc::w(s, 1)], s);
    assert_eq!(st, S_UNSUPP);
    assert_eq!(len, 1);
}

#[test]
fn read_only_export_refuses_writes_and_advertises_ro() {
    let d = Daemon::raw(16 * MIB, &["--readonly"]);
    let mut vm = Vm::connect(&d.socket, VmOptions::default());
    assert_ne!(vm.features & VIRTIO_BLK_F_RO, 0);
    assert_eq!(vm.write(0, 0, &[1u8; 512]), S_IOERR);
    assert_eq!(vm.ranges(0, T_DISCARD, &[(0, 8, 0)]), S_IOERR);
    assert_eq!(vm.ranges(0, T_WRITE_ZEROES, &[(0, 8, 0)]), S_IOERR);
    let (st, _) = vm.read(0, 0, 512);
    assert_eq!(st, S_OK);
    assert!(read_file_at(&d.image(), 0, 512).iter().all(|&b| b == 0));
}

#[test]
fn writethrough_export_starts_with_the_cache_off_and_the_guest_can_turn_it_on() {
    let d = Daemon::raw(16 * MIB, &["--writethrough"]);
    let mut vm = Vm::connect(&d.socket, VmOptions::default());
    assert_eq!(vm.config(32, 1), vec![0]);
    vm.set_writeback(true);
    assert_eq!(vm.config(32, 1), vec![1]);
    assert_eq!(vm.write(0, 0, &[7u8; 4096]), S_OK);
}

#[test]
fn logical_block_size_4096_is_reported_and_enforced() {
    let d = Daemon::raw(16 * MIB, &["--logical-block-size", "4096"]);
    let mut vm = Vm::connect(&d.socket, VmOptions::default());
    let c = vm.config(20, 4);
    assert_eq!(u32::from_le_bytes(c.try_into().unwrap()), 4096);
    assert_eq!(vm.write(0, 8, &[1u8; 4096]), S_OK);
    assert_eq!(
        vm.write(0, 1, &[1u8; 4096]),
        S_IOERR,
        "sector not 4k-aligned"
    );
    assert_eq!(
        vm.write(0, 8, &[1u8; 512]),
        S_IOERR,
        "length not a multiple of 4k"
    );
}

#[test]
fn null_co_export_serves_reads_as_zeroes() {
    let d = Daemon::start(&[
        "--blockdev",
        "driver=null-co,node-name=n0,size=64M,read-zeroes=on",
        "--export",
        "type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path={sock},writable=on,num-queues=1",
    ]);
    let mut vm = Vm::connect(&d.socket, VmOptions::default());
    assert_eq!(vm.capacity_sectors(), 64 * MIB / 512);
    assert_eq!(vm.write(0, 0, &[9u8; 4096]), S_OK);
    let (st, back) = vm.read(0, 0, 4096);
    assert_eq!(st, S_OK);
    assert!(back.iter().all(|&b| b == 0));
}

#[test]
fn raw_offset_and_size_window_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(8 * MIB)
        .unwrap();
    let d = Daemon::start_in(
        dir,
        &[
            "--blockdev",
            "driver=file,node-name=f0,filename={dir}/disk.img",
            "--blockdev",
            "driver=raw,node-name=d0,file=f0,offset=1M,size=2M",
            "--export",
            "vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path={sock},writable=on",
        ],
    );
    let mut vm = Vm::connect(&d.socket, VmOptions::default());
    assert_eq!(vm.capacity_sectors(), 2 * MIB / 512);
    let data = pattern(6, 4096);
    assert_eq!(vm.write(0, 0, &data), S_OK);
    assert_eq!(read_file_at(&d.image(), MIB, 4096), data);
    assert_eq!(
        vm.write(0, 2 * MIB / 512, &data),
        S_IOERR,
        "past the window"
    );
}

#[test]
fn o_direct_file_serves_aligned_and_unaligned_guest_buffers() {
    let d = Daemon::raw(16 * MIB, &["--direct"]);
    let mut vm = Vm::connect(&d.socket, VmOptions::default());
    // Aligned buffers go straight to the file.
    let data = pattern(7, 64 * 1024);
    assert_eq!(vm.write(0, 0, &data), S_OK);
    let (st, back) = vm.read(0, 0, data.len() as u32);
    assert_eq!(st, S_OK);
    assert_eq!(back, data);
    // A buffer at an odd guest address needs a bounce buffer.
    let h = vm.write_header(T_OUT, 256);
    let buf = vm.alloc(8192);
    let odd = vm_memory::GuestAddress(buf.0 + 3);
    let data2 = pattern(8, 4096);
    vm_memory::Bytes::write_slice(&vm.mem, &data2, odd).unwrap();
    let s = vm.status_buf();
    let (st, _) = vm.run_chain(0, &[Desc::r(h, 16), Desc::r(odd, 4096), Desc::w(s, 1)], s);
    assert_eq!(st, S_OK);
    assert_eq!(read_file_at(&d.image(), 256 * 512, 4096), data2);
}
