//! Issue 17, items 1, 6 and 8: QEMU's backend program conventions
//! (`--print-capabilities`, `--socket-path`, `--blk-file`, `--read-only`),
//! the short form's format (`--format raw|qcow2`, probed otherwise, with
//! QEMU's guard on probed raw images), the iothread default and the start
//! line, the `help` subcommand.

mod common;

use std::process::Command;

use common::*;

const MIB: u64 = 1 << 20;

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(daemon_bin()).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img").args(args).output().unwrap();
    assert!(out.status.success(), "qemu-img {args:?}: {out:?}");
}

#[test]
fn print_capabilities_is_a_vhost_user_json_block_backend() {
    let (code, out, err) = run(&["--print-capabilities"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    // docs/interop/vhost-user.json: VHostUserBackendType 'block',
    // VHostUserBackendBlockFeature [ 'read-only', 'blk-file' ].
    assert_eq!(v["type"], "block");
    let features: Vec<&str> = v["features"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    assert_eq!(features, ["read-only", "blk-file"]);
    // The description file shipped for /usr/share/qemu/vhost-user/.
    let desc = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/share/qemu/vhost-user/50-vhost-user-blkd.json"
    );
    let d: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(desc).unwrap()).unwrap();
    assert_eq!(d["type"], "block");
    assert!(d["binary"].as_str().unwrap().ends_with("/vhost-user-blkd"));
    assert!(d["description"].is_string());
}

#[test]
fn help_subcommand_and_create_in_help() {
    let (code, out, _) = run(&["help"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("--blk-file") && out.contains("--socket-path"),
        "{out}"
    );
    let (code, out, _) = run(&["help", "create"]);
    assert_eq!(code, 0);
    assert!(out.contains("usage: vhost-user-blkd create"), "{out}");
    let (code, out, _) = run(&["--help"]);
    assert_eq!(code, 0);
    assert!(out.contains("vhost-user-blkd create"), "{out}");
    let (code, _, err) = run(&["help", "nope"]);
    assert_eq!(code, 1, "{err}");
}

/// `--blk-file`, `--socket-path`, `--read-only`: the export is read-only
/// (VIRTIO_BLK_F_RO, writes fail); the start line says how many iothreads
/// (at most one per CPU) and how to attach.
#[test]
fn backend_convention_options_serve_read_only() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::File::create(dir.path().join("disk.img"))
        .unwrap()
        .set_len(4 * MIB)
        .unwrap();
    let d = Daemon::start_in(
        dir,
        &[
            "--blk-file",
            "{dir}/disk.img",
            "--socket-path",
            "{sock}",
            "--read-only",
        ],
    );
    let mut vm = Vm::connect(&d.socket, VmOptions::default());
    assert_ne!(vm.features & VIRTIO_BLK_F_RO, 0, "read-only offered");
    assert_eq!(vm.capacity_sectors(), 4 * MIB / 512);
    assert_ne!(vm.write(0, 0, &[1u8; 512]), S_OK);
    let log = d.log();
    let cpus = std::thread::available_parallelism().unwrap().get().min(16);
    assert!(
        log.contains(&format!("16 queues, {cpus} iothreads, read-only")),
        "{log}"
    );
    let sock = d.socket.display().to_string();
    assert!(
        log.contains(&format!(
            "path={sock},reconnect=1 -device vhost-user-blk-pci,chardev=vub-export0,num-queues=16"
        )),
        "{log}"
    );
    assert!(
        log.contains(&format!(
            "--disk vhost_user=true,socket={sock},num_queues=16"
        )),
        "{log}"
    );
}

/// The default is at most the online CPUs; num-iothreads still overrides it.
#[test]
fn iothreads_default_to_at_most_the_cpus() {
    let d = Daemon::start(&[
        "--blockdev",
        "driver=null-co,node-name=n0,size=64M",
        "--export",
        "vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path={sock},num-queues=64",
        "--export",
        "vhost-user-blk,id=e1,node-name=n0,addr.type=unix,addr.path={dir}/e1.sock,num-queues=8,num-iothreads=8",
    ]);
    let cpus = std::thread::available_parallelism().unwrap().get().min(64);
    let log = d.log();
    assert!(
        log.contains(&format!(
            "e0: vhost-user-blk on {}, 64 queues, {cpus} iothreads",
            d.socket.display()
        )),
        "{log}"
    );
    assert!(log.contains("8 queues, 8 iothreads"), "{log}");
}

fn start_short(dir: tempfile::TempDir, img: &str, extra: &[&str]) -> Daemon {
    let mut args = vec!["--image", img, "--socket", "{sock}"];
    args.extend_from_slice(extra);
    Daemon::start_in(dir, &args)
}

/// Without --format a qcow2 image is probed and served as qcow2 (the guest
/// sees its virtual size); with --format raw it is served raw, with a
/// warning.
#[test]
fn short_form_probes_qcow2_and_serves_it_raw_only_when_told() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "32M"]);
    let file_size = std::fs::metadata(&img).unwrap().len();
    let mut d = start_short(dir, "{dir}/d.qcow2", &[]);
    {
        let mut vm = Vm::connect(&d.socket, VmOptions::default());
        assert_eq!(vm.capacity_sectors(), 32 * MIB / 512);
        assert_eq!(vm.write(0, 8, &pattern(7, 4096)), S_OK);
        assert_eq!(vm.read(0, 8, 4096), (S_OK, pattern(7, 4096)));
    }
    assert!(d.log().contains("format probed: qcow2"), "{}", d.log());
    assert!(d.terminate().success());
    let dir = std::mem::replace(&mut d.dir, tempfile::tempdir().unwrap());
    drop(d);
    let out = Command::new("qemu-img")
        .args(["check", dir.path().join("d.qcow2").to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");

    let d = start_short(dir, "{dir}/d.qcow2", &["--format", "raw", "--read-only"]);
    let mut vm = Vm::connect(&d.socket, VmOptions::default());
    let size = std::fs::metadata(d.dir.path().join("d.qcow2"))
        .unwrap()
        .len();
    assert!(size >= file_size);
    assert_eq!(vm.capacity_sectors(), size / 512);
    assert_eq!(&vm.read(0, 0, 512).1[..4], b"QFI\xfb");
    assert!(
        d.log()
            .contains("serving an image with a qcow2 header as raw"),
        "{}",
        d.log()
    );
}

/// Another format's header (here qed, which we cannot open): refused
/// without --format, served raw with --format raw and a warning.
#[test]
fn short_form_refuses_an_unsupported_format_header_unless_format_raw() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.qed");
    qemu_img(&["create", "-q", "-f", "qed", img.to_str().unwrap(), "16M"]);
    let sock = dir.path().join("s.sock");
    // Bounded: a daemon that served the image would run until killed.
    let errf = dir.path().join("err.log");
    let mut child = Command::new(daemon_bin())
        .args(["--image", img.to_str().unwrap(), "--socket"])
        .arg(&sock)
        .stderr(std::fs::File::create(&errf).unwrap())
        .spawn()
        .unwrap();
    let status = wait_timeout(&mut child, std::time::Duration::from_secs(20));
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let err = std::fs::read_to_string(&errf).unwrap();
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{err}");
    assert!(
        err.contains("qed header") && err.contains("--format raw"),
        "{err}"
    );
    assert!(!sock.exists());
    let (code, _, err) = run(&[
        "--image",
        img.to_str().unwrap(),
        "--socket",
        "s",
        "--format",
        "vmdk",
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("only raw and qcow2"), "{err}");
    let d = start_short(dir, "{dir}/d.qed", &["--format", "raw"]);
    assert!(d.log().contains("with a qed header as raw"), "{}", d.log());
}

fn qcow2_header_sector() -> Vec<u8> {
    let mut s = vec![0u8; 512];
    s[..8].copy_from_slice(b"QFI\xfb\0\0\0\x03");
    s
}

/// QEMU's rule for probed raw images: the guest cannot write a format header
/// into the first sector (or the next start would probe it as, say, qcow2
/// with a backing file of the guest's choosing); other writes there pass.
/// With --format raw it can.
#[test]
fn a_probed_raw_image_refuses_a_format_header_in_sector_0() {
    let mut d = Daemon::raw(4 * MIB, &[]);
    let img = d.image();
    {
        let mut vm = Vm::connect(&d.socket, VmOptions::default());
        assert_eq!(vm.write(0, 0, &qcow2_header_sector()), S_IOERR);
        let mut two = qcow2_header_sector();
        two.extend_from_slice(&[5u8; 512]);
        assert_eq!(vm.write(0, 0, &two), S_IOERR);
        assert_eq!(vm.write(0, 0, &[9u8; 1024]), S_OK);
        // Beyond the first sector anything goes.
        assert_eq!(vm.write(0, 1, &qcow2_header_sector()), S_OK);
    }
    assert_eq!(read_file_at(&img, 0, 4), [9u8; 4]);
    assert!(d
        .log()
        .contains("refused a write that would give the probed raw image a format header"));
    assert!(d.terminate().success());
    let dir = std::mem::replace(&mut d.dir, tempfile::tempdir().unwrap());
    drop(d);
    let d = start_short(dir, "{dir}/disk.img", &["--format", "raw"]);
    let mut vm = Vm::connect(&d.socket, VmOptions::default());
    assert_eq!(vm.write(0, 0, &qcow2_header_sector()), S_OK);
    assert_eq!(read_file_at(&d.image(), 0, 4), *b"QFI\xfb");
}

/// scripts/install.sh into a DESTDIR: the binary, and the description file
/// naming the installed binary, which answers --print-capabilities.
#[test]
fn install_script_installs_binary_and_description() {
    let dest = tempfile::tempdir().unwrap();
    let out = Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/install.sh"))
        .env("DESTDIR", dest.path())
        .env("PREFIX", "/opt/vub")
        .env("BIN", daemon_bin())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let desc = dest
        .path()
        .join("opt/vub/share/qemu/vhost-user/50-vhost-user-blkd.json");
    let d: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(desc).unwrap()).unwrap();
    assert_eq!(d["binary"], "/opt/vub/bin/vhost-user-blkd");
    let bin = dest.path().join("opt/vub/bin/vhost-user-blkd");
    let caps = Command::new(&bin)
        .arg("--print-capabilities")
        .output()
        .unwrap();
    assert!(caps.status.success());
    let v: serde_json::Value = serde_json::from_slice(&caps.stdout).unwrap();
    assert_eq!(v["type"], d["type"]);
}
