//! The qcow2 driver in process, judged by qemu-img.
//!
//! ```text
//!   random ops --> qcow2 node (our driver) ----> image file --qemu-img check
//!        \-------> Vec<u8> model --> raw file ---qemu-img compare--^
//! ```
//!
//! Also: images qemu-img made (every cluster size, v2/v3, extended L2,
//! compressed, backing chains, internal snapshots) read back as qemu-img
//! wrote them; malformed images are refused with a message, never a panic;
//! an image left dirty (lazy refcounts, no close) is repaired on open.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use futures::executor::block_on;
use serde_json::json;
use vhost_user_blkd::block::{Graph, Node};
use vhost_user_blkd::drivers::{Allocation, BlockdevOptions};
use vhost_user_blkd::io::IoVecs;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_vhost-user-blkd")
}

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().expect(cmd);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd} {args:?} failed: {text}");
    text
}

fn create(path: &Path, opts: &str, size: u64) {
    let mut args = vec!["create".to_string()];
    if !opts.is_empty() {
        args.push("-o".into());
        args.push(opts.into());
    }
    args.push(path.to_str().unwrap().into());
    args.push(size.to_string());
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    run(bin(), &a);
}

/// `qemu-img check`: no errors and no leaks.
fn check_clean(path: &Path) {
    let out = Command::new("qemu-img")
        .args(["check", path.to_str().unwrap()])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && text.contains("No errors were found"),
        "qemu-img check {path:?}:\n{text}"
    );
}

fn compare(a: &Path, fa: &str, b: &Path, fb: &str) {
    run(
        "qemu-img",
        &[
            "compare",
            "-f",
            fa,
            "-F",
            fb,
            a.to_str().unwrap(),
            b.to_str().unwrap(),
        ],
    );
}

struct Img {
    graph: Graph,
    node: Arc<Node>,
}

fn open_with(path: &Path, extra: serde_json::Value) -> Result<Img, String> {
    let mut o = json!({
        "driver": "qcow2", "node-name": "q",
        "file": {"driver": "file", "node-name": "q-file", "filename": path.to_str().unwrap()},
        "discard": "unmap",
    });
    for (k, v) in extra.as_object().unwrap() {
        o[k] = v.clone();
    }
    let opts: BlockdevOptions = serde_json::from_value(o).map_err(|e| e.to_string())?;
    let mut graph = Graph::new();
    let node = graph.add(&opts).map_err(|e| {
        let mut s = e.to_string();
        if let Some(src) = std::error::Error::source(&e) {
            s.push_str(&format!(": {src}"));
        }
        s
    })?;
    Ok(Img { graph, node })
}

fn open(path: &Path) -> Img {
    open_with(path, json!({})).unwrap()
}

impl Img {
    fn write(&self, off: u64, data: &[u8]) {
        let (iov, view) = IoVecs::bounce(data.len(), 4096);
        view.with_bytes(&iov, |b| b.copy_from_slice(data));
        block_on(self.node.pwritev(off, &iov, false)).unwrap();
    }
    fn read(&self, off: u64, len: u64) -> Vec<u8> {
        let (iov, view) = IoVecs::bounce(len as usize, 4096);
        block_on(self.node.preadv(off, &iov)).unwrap();
        view.with_bytes(&iov, |b| b.to_vec())
    }
    fn close(self) {
        self.node.close();
        drop(self.node);
        drop(self.graph);
    }
}

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

fn fill(rng: &mut Rng, len: usize) -> Vec<u8> {
    let seed = rng.next();
    (0..len)
        .map(|i| (seed.wrapping_mul(i as u64 + 1) >> 13) as u8 | 1)
        .collect()
}

/// Random writes, zeroes, discards, flushes, resizes and reopens on a
/// qcow2 node and on a Vec<u8>; always equal, and qemu-img agrees.
fn model_run(create_opts: &str, backing: bool, seed: u64) {
    model_run_sized(create_opts, backing, seed, 8 * MIB);
}

fn model_run_sized(create_opts: &str, backing: bool, seed: u64, start_size: u64) {
    model_run_with(create_opts, backing, seed, start_size, json!({}));
}

fn model_run_with(
    create_opts: &str,
    backing: bool,
    seed: u64,
    start_size: u64,
    node_opts: serde_json::Value,
) {
    let dir = tmp();
    let img = dir.path().join("top.qcow2");
    let mut size = start_size;
    let mut model = vec![0u8; size as usize];
    if backing {
        // A base made by qemu-img from random data.
        let raw = dir.path().join("base.raw");
        let mut rng = Rng(seed ^ 0xabc);
        let data = fill(&mut rng, (size / 2) as usize);
        std::fs::write(&raw, &data).unwrap();
        let base = dir.path().join("base.qcow2");
        run(
            "qemu-img",
            &[
                "convert",
                "-f",
                "raw",
                "-O",
                "qcow2",
                raw.to_str().unwrap(),
                base.to_str().unwrap(),
            ],
        );
        model[..data.len()].copy_from_slice(&data);
        let mut args = vec!["create", "-b", "base.qcow2", "-F", "qcow2"];
        if !create_opts.is_empty() {
            args.push("-o");
            args.push(create_opts);
        }
        let p = img.to_str().unwrap().to_string();
        let s = size.to_string();
        args.push(&p);
        args.push(&s);
        run(bin(), &args);
    } else {
        create(&img, create_opts, size);
    }
    let mut q = open_with(&img, node_opts.clone()).unwrap();
    let mut rng = Rng(seed);
    for step in 0..300 {
        let op = rng.below(100);
        let off = rng.below(size / 512) * 512;
        let len =
            ((rng.below(64) + 1) * 512 * if rng.below(4) == 0 { 16 } else { 1 }).min(size - off);
        match op {
            0..=54 => {
                let data = fill(&mut rng, len as usize);
                q.write(off, &data);
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
            55..=64 => {
                let unmap = rng.below(2) == 0;
                block_on(q.node.pwrite_zeroes(off, len, unmap, false)).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            }
            65..=72 => {
                // Discard: the driver may drop whole clusters; the model
                // takes what the image reads afterwards.
                block_on(q.node.pdiscard(off, len)).unwrap();
                let now = q.read(off, len);
                let before = &model[off as usize..(off + len) as usize];
                for (i, (&a, &b)) in now.iter().zip(before).enumerate() {
                    assert!(
                        a == b || a == 0 || backing,
                        "step {step}: discard changed byte {i} to {a}"
                    );
                }
                model[off as usize..(off + len) as usize].copy_from_slice(&now);
            }
            73..=80 => {
                let got = q.read(off, len);
                assert!(
                    got == model[off as usize..(off + len) as usize],
                    "step {step}: read at {off} len {len} differs"
                );
            }
            81..=85 => block_on(q.node.flush()).unwrap(),
            86..=89 => {
                q.close();
                q = open_with(&img, node_opts.clone()).unwrap();
            }
            90..=92 if !backing => {
                let new = size + rng.below(4) * (start_size / 8) + 512 * rng.below(8);
                q.node.truncate(new).unwrap();
                size = new;
                model.resize(size as usize, 0);
            }
            _ => {
                let got = q.read(0, size);
                assert!(got == model, "step {step}: full read differs");
            }
        }
    }
    assert!(q.read(0, size) == model, "final read differs");
    q.close();
    check_clean(&img);
    let raw = dir.path().join("model.raw");
    std::fs::write(&raw, &model).unwrap();
    compare(&img, "qcow2", &raw, "raw");
}

#[test]
fn model_default_image() {
    model_run("", false, 1);
}

#[test]
fn model_small_clusters_v2() {
    // Small clusters mean many per request: a smaller disk keeps this quick.
    model_run_sized("compat=0.10,cluster_size=512", false, 2, MIB);
}

#[test]
fn model_4k_clusters_1bit_refcounts() {
    model_run("cluster_size=4k,refcount_bits=1", false, 3);
}

#[test]
fn model_2m_clusters_64bit_refcounts() {
    model_run("cluster_size=2M,refcount_bits=64", false, 4);
}

/// Caches of two L2 tables and four refcount blocks: every path through
/// eviction (dirty L2 tables after their refcounts) runs.
#[test]
fn model_tiny_caches() {
    model_run_with(
        "cluster_size=4k",
        true,
        11,
        8 * MIB,
        json!({"l2-cache-size": 1, "refcount-cache-size": 1}),
    );
}

#[test]
fn model_extended_l2() {
    model_run("extended_l2=on,cluster_size=64k", false, 5);
}

#[test]
fn model_preallocated_metadata() {
    model_run("preallocation=metadata,cluster_size=16k", false, 6);
}

#[test]
fn model_lazy_refcounts() {
    model_run("lazy_refcounts=on", false, 7);
}

#[test]
fn model_with_backing() {
    model_run("", true, 8);
}

#[test]
fn model_with_backing_extended_l2() {
    model_run("extended_l2=on", true, 9);
}

#[test]
fn model_with_backing_v2() {
    model_run("compat=0.10", true, 10);
}

/// Random data of `size` bytes with holes and zero runs, as a raw file.
fn random_raw(dir: &Path, size: u64, seed: u64) -> (PathBuf, Vec<u8>) {
    let mut rng = Rng(seed);
    let mut data = vec![0u8; size as usize];
    let mut off = 0;
    while off < size {
        let len = ((rng.below(32) + 1) * 4 * KIB).min(size - off);
        if rng.below(3) != 0 {
            let chunk = fill(&mut rng, len as usize);
            data[off as usize..(off + len) as usize].copy_from_slice(&chunk);
        }
        off += len;
    }
    let p = dir.join(format!("data-{seed}.raw"));
    std::fs::write(&p, &data).unwrap();
    (p, data)
}

fn read_all(path: &Path) -> Vec<u8> {
    let q = open_with(path, json!({"read-only": true, "file": {"driver": "file", "node-name": "q-file", "filename": path.to_str().unwrap(), "read-only": true}})).unwrap();
    let size = q.node.size();
    let v = q.read(0, size);
    q.close();
    v
}

#[test]
fn reads_what_qemu_img_wrote() {
    let dir = tmp();
    let size = 6 * MIB;
    let (raw, data) = random_raw(dir.path(), size, 42);
    // Every cluster size, then the other format variants.
    let mut cases: Vec<String> = (9..=21)
        .map(|b| format!("cluster_size={}", 1u64 << b))
        .collect();
    for o in [
        "compat=0.10",
        "compat=0.10,cluster_size=1024",
        "extended_l2=on",
        "extended_l2=on,cluster_size=16k",
        "extended_l2=on,cluster_size=2M",
        "refcount_bits=1",
        "refcount_bits=64",
    ] {
        cases.push(o.to_string());
    }
    for (i, o) in cases.iter().enumerate() {
        let img = dir.path().join(format!("img{i}.qcow2"));
        run(
            "qemu-img",
            &[
                "convert",
                "-f",
                "raw",
                "-O",
                "qcow2",
                "-o",
                o,
                raw.to_str().unwrap(),
                img.to_str().unwrap(),
            ],
        );
        assert!(
            read_all(&img) == data,
            "image made with -o {o} reads differently"
        );
    }
    // Compressed.
    let img = dir.path().join("compressed.qcow2");
    run(
        "qemu-img",
        &[
            "convert",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            raw.to_str().unwrap(),
            img.to_str().unwrap(),
        ],
    );
    let info = run("qemu-img", &["check", img.to_str().unwrap()]);
    assert!(info.contains("compressed clusters"), "{info}");
    assert!(read_all(&img) == data, "compressed image reads differently");
}

#[test]
fn writes_over_compressed_clusters() {
    let dir = tmp();
    let (raw, mut data) = random_raw(dir.path(), 4 * MIB, 43);
    let img = dir.path().join("c.qcow2");
    run(
        "qemu-img",
        &[
            "convert",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            raw.to_str().unwrap(),
            img.to_str().unwrap(),
        ],
    );
    let q = open(&img);
    let mut rng = Rng(5);
    for _ in 0..50 {
        let off = rng.below(4 * MIB / 512 - 16) * 512;
        let chunk = fill(&mut rng, 8192);
        q.write(off, &chunk);
        data[off as usize..off as usize + 8192].copy_from_slice(&chunk);
    }
    assert!(q.read(0, 4 * MIB) == data);
    q.close();
    check_clean(&img);
    assert!(read_all(&img) == data);
}

#[test]
fn three_deep_chain_made_by_qemu_img() {
    let dir = tmp();
    let size = 4 * MIB;
    let d = dir.path();
    let p = |n: &str| d.join(n).to_str().unwrap().to_string();
    run(
        "qemu-img",
        &["create", "-f", "qcow2", &p("base.qcow2"), &size.to_string()],
    );
    run("qemu-io", &["-c", "write -P 0x11 0 3M", &p("base.qcow2")]);
    run(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            &p("mid.qcow2"),
        ],
    );
    run("qemu-io", &["-c", "write -P 0x22 1M 1M", &p("mid.qcow2")]);
    run(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "mid.qcow2",
            "-F",
            "qcow2",
            &p("top.qcow2"),
        ],
    );
    run(
        "qemu-io",
        &[
            "-c",
            "write -P 0x33 1536K 64K",
            "-c",
            "write -z 2M 64K",
            &p("top.qcow2"),
        ],
    );
    let mut want = vec![0u8; size as usize];
    want[..3 * MIB as usize].fill(0x11);
    want[MIB as usize..2 * MIB as usize].fill(0x22);
    want[1536 * KIB as usize..1600 * KIB as usize].fill(0x33);
    want[2 * MIB as usize..2 * MIB as usize + 64 * KIB as usize].fill(0);
    let q = open_with(
        &d.join("top.qcow2"),
        json!({"read-only": true, "file": {"driver": "file", "node-name": "q-file", "filename": p("top.qcow2"), "read-only": true}}),
    )
    .unwrap();
    assert!(q.read(0, size) == want, "chain reads differently");
    // Block status says where each part comes from.
    let st = |off| block_on(q.node.block_status(off, 64 * KIB)).unwrap();
    assert_eq!((st(0).kind, st(0).depth), (Allocation::Data, 2));
    assert_eq!((st(MIB).kind, st(MIB).depth), (Allocation::Data, 1));
    assert_eq!(
        (st(1536 * KIB).kind, st(1536 * KIB).depth),
        (Allocation::Data, 0)
    );
    assert_eq!((st(2 * MIB).kind, st(2 * MIB).depth), (Allocation::Zero, 0));
    assert_eq!(st(3 * MIB).kind, Allocation::Unallocated);
    q.close();
}

#[test]
fn writes_keep_the_backing_file_untouched() {
    let dir = tmp();
    let d = dir.path();
    let p = |n: &str| d.join(n).to_str().unwrap().to_string();
    run(
        "qemu-img",
        &["create", "-f", "qcow2", &p("base.qcow2"), "2M"],
    );
    run("qemu-io", &["-c", "write -P 0x5a 0 2M", &p("base.qcow2")]);
    let before = std::fs::read(p("base.qcow2")).unwrap();
    run(
        bin(),
        &["create", "-b", "base.qcow2", "-F", "qcow2", &p("top.qcow2")],
    );
    let q = open(&d.join("top.qcow2"));
    q.write(4096, &[0xa5; 512]);
    block_on(q.node.pwrite_zeroes(65536, 65536, true, false)).unwrap();
    let got = q.read(0, 2 * MIB);
    q.close();
    assert_eq!(std::fs::read(p("base.qcow2")).unwrap(), before);
    assert!(got[..4096].iter().all(|&b| b == 0x5a));
    assert!(got[4096..4608].iter().all(|&b| b == 0xa5));
    assert!(got[4608..65536].iter().all(|&b| b == 0x5a));
    assert!(got[65536..131072].iter().all(|&b| b == 0));
    assert!(got[131072..].iter().all(|&b| b == 0x5a));
    check_clean(&d.join("top.qcow2"));
}

#[test]
fn images_with_internal_snapshots() {
    let dir = tmp();
    let d = dir.path();
    let p = |n: &str| d.join(n).to_str().unwrap().to_string();
    run("qemu-img", &["create", "-f", "qcow2", &p("s.qcow2"), "4M"]);
    run("qemu-io", &["-c", "write -P 0x01 0 4M", &p("s.qcow2")]);
    run("qemu-img", &["snapshot", "-c", "first", &p("s.qcow2")]);
    run("qemu-io", &["-c", "write -P 0x02 1M 1M", &p("s.qcow2")]);
    run("qemu-img", &["snapshot", "-c", "second", &p("s.qcow2")]);
    // Our writes must copy shared clusters, leaving both snapshots intact.
    let q = open(&d.join("s.qcow2"));
    q.write(0, &vec![0x03; 128 * KIB as usize]);
    q.write(MIB, &vec![0x04; 4096]);
    block_on(q.node.pwrite_zeroes(3 * MIB, 64 * KIB, true, false)).unwrap();
    q.close();
    check_clean(&d.join("s.qcow2"));
    let list = run("qemu-img", &["snapshot", "-l", &p("s.qcow2")]);
    assert!(list.contains("first") && list.contains("second"), "{list}");
    let cur = read_all(&d.join("s.qcow2"));
    assert!(cur[..128 * KIB as usize].iter().all(|&b| b == 3));
    assert!(cur[MIB as usize..MIB as usize + 4096]
        .iter()
        .all(|&b| b == 4));
    assert!(cur[3 * MIB as usize..3 * MIB as usize + 65536]
        .iter()
        .all(|&b| b == 0));
    // Reverting to each snapshot shows its data.
    for (snap, mid) in [("first", 0x01u8), ("second", 0x02u8)] {
        let copy = d.join(format!("{snap}.qcow2"));
        std::fs::copy(d.join("s.qcow2"), &copy).unwrap();
        run(
            "qemu-img",
            &["snapshot", "-a", snap, copy.to_str().unwrap()],
        );
        let v = read_all(&copy);
        assert!(v[..MIB as usize].iter().all(|&b| b == 1), "{snap}");
        assert!(
            v[MIB as usize..2 * MIB as usize].iter().all(|&b| b == mid),
            "{snap}"
        );
        assert!(v[2 * MIB as usize..].iter().all(|&b| b == 1), "{snap}");
    }
}

#[test]
fn dirty_image_is_repaired_on_open() {
    let dir = tmp();
    let img = dir.path().join("lazy.qcow2");
    create(&img, "lazy_refcounts=on", 8 * MIB);
    let q = open(&img);
    let mut rng = Rng(77);
    let mut model = vec![0u8; 8 * MIB as usize];
    for _ in 0..40 {
        let off = rng.below(8 * MIB / 512 - 64) * 512;
        let data = fill(&mut rng, 16 * 1024);
        q.write(off, &data);
        model[off as usize..off as usize + data.len()].copy_from_slice(&data);
    }
    block_on(q.node.flush()).unwrap();
    // "Crash": no close, so refcounts were never written and the dirty
    // bit stays set.
    drop(q);
    let out = Command::new("qemu-img")
        .args(["check", img.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "a dirty lazy image should need repair"
    );
    let q = open(&img);
    assert!(q.read(0, 8 * MIB) == model);
    q.close();
    check_clean(&img);
    let info = run("qemu-img", &["info", img.to_str().unwrap()]);
    assert!(info.contains("lazy refcounts: true"), "{info}");
}

#[test]
fn corrupt_images_open_read_only() {
    let dir = tmp();
    let img = dir.path().join("c.qcow2");
    create(&img, "", MIB);
    // Set the corrupt bit.
    let mut b = std::fs::read(&img).unwrap();
    b[79] |= 2;
    std::fs::write(&img, &b).unwrap();
    let e = open_with(&img, json!({})).err().unwrap();
    assert!(
        e.contains("marked corrupt") && e.contains("read-only"),
        "{e}"
    );
    let ro = open_with(
        &img,
        json!({"read-only": true, "file": {"driver": "file", "node-name": "q-file", "filename": img.to_str().unwrap(), "read-only": true}}),
    );
    assert!(ro.is_ok());
}

#[test]
fn malformed_images_are_refused() {
    let dir = tmp();
    let good = dir.path().join("good.qcow2");
    create(&good, "", 4 * MIB);
    {
        let q = open(&good);
        q.write(0, &[7u8; 65536]);
        q.close();
    }
    let orig = std::fs::read(&good).unwrap();
    let be64 = |v: u64| v.to_be_bytes().to_vec();
    let be32 = |v: u32| v.to_be_bytes().to_vec();
    let cases: Vec<(&str, usize, Vec<u8>, &str)> = vec![
        ("bad magic", 0, be32(0x1234_5678), "magic"),
        ("version 4", 4, be32(4), "version"),
        ("cluster bits 8", 20, be32(8), "cluster size"),
        ("cluster bits 40", 20, be32(40), "cluster size"),
        ("huge size", 24, be64(u64::MAX), "too large"),
        ("L1 too small", 36, be32(0), "too small"),
        ("L1 huge", 36, be32(u32::MAX), "too large"),
        ("L1 misaligned", 40, be64(12345), "not cluster aligned"),
        ("L1 beyond EOF", 40, be64(1 << 50), "beyond the end"),
        ("L1 on the header", 40, be64(0), "not cluster aligned"),
        ("reftable size 0", 56, be32(0), "empty"),
        ("reftable huge", 56, be32(u32::MAX), "too large"),
        ("reftable misaligned", 48, be64(100), "not cluster aligned"),
        ("reftable beyond EOF", 48, be64(1 << 40), "beyond the end"),
        (
            "backing name beyond cluster",
            8,
            be64(65530),
            "beyond the first cluster",
        ),
        ("many snapshots", 60, be32(1 << 30), "too many"),
        (
            "unknown incompatible",
            72,
            be64(1 << 40),
            "unsupported incompatible",
        ),
        ("external data file", 72, be64(1 << 2), "external data file"),
        ("refcount order 9", 96, be32(9), "refcount_order"),
        ("short header_length", 100, be32(50), "header_length"),
        ("encryption", 32, be32(1), "encrypted"),
    ];
    for (what, off, bytes, msg) in cases {
        let mut b = orig.clone();
        b[off..off + bytes.len()].copy_from_slice(&bytes);
        if what == "backing name beyond cluster" {
            b[16..20].copy_from_slice(&100u32.to_be_bytes());
        }
        let p = dir.path().join("bad.qcow2");
        std::fs::write(&p, &b).unwrap();
        let e = open_with(&p, json!({})).err();
        let e = e.unwrap_or_else(|| panic!("{what}: opened"));
        assert!(e.contains(msg), "{what}: {e}");
    }
    // Truncated files.
    for len in [0usize, 50, 100, 4096, 65536 + 100] {
        let p = dir.path().join("short.qcow2");
        std::fs::write(&p, &orig[..len.min(orig.len())]).unwrap();
        let r = open_with(&p, json!({}));
        if let Ok(q) = r {
            // Opened: reads must fail or return data, never panic.
            let (iov, _v) = IoVecs::bounce(65536, 4096);
            let _ = block_on(q.node.preadv(0, &iov));
        }
    }
    // An L2 table pointing into the header: reads fail with an error, a
    // write marks the image corrupt instead of overwriting metadata.
    let mut b = orig.clone();
    let l1 = u64::from_be_bytes(b[40..48].try_into().unwrap()) as usize;
    let l2 =
        (u64::from_be_bytes(b[l1..l1 + 8].try_into().unwrap()) & 0x00ff_ffff_ffff_fe00) as usize;
    b[l2..l2 + 8].copy_from_slice(&(0x8000_0000_0000_0000u64 | 0x10000).to_be_bytes()); // the L1 table's cluster
    let p = dir.path().join("overlap.qcow2");
    std::fs::write(&p, &b).unwrap();
    let q = open(&p);
    let (iov, _v) = IoVecs::bounce(512, 4096);
    let e = block_on(q.node.pwritev(0, &iov, false)).unwrap_err();
    assert!(e.to_string().contains("corrupt"), "{e}");
    assert!(q.node.is_read_only());
    drop(q);
    let b = std::fs::read(&p).unwrap();
    assert_eq!(b[79] & 2, 2, "the corrupt bit is set on disk");
}

#[test]
fn backing_chain_limits() {
    let dir = tmp();
    let d = dir.path();
    let p = |n: &str| d.join(n).to_str().unwrap().to_string();
    // An image that is its own backing file.
    run(bin(), &["create", &p("loop.qcow2"), "1M"]);
    run(
        bin(),
        &[
            "create",
            "-b",
            "loop.qcow2",
            "-F",
            "qcow2",
            &p("loop2.qcow2"),
        ],
    );
    std::fs::rename(p("loop2.qcow2"), p("loop.qcow2")).unwrap();
    let ro = json!({"read-only": true, "file": {"driver": "file", "node-name": "q-file", "filename": p("loop.qcow2"), "read-only": true}});
    let e = open_with(&d.join("loop.qcow2"), ro).err().unwrap();
    assert!(e.contains("deeper than 16"), "{e}");
    // Writable, the image's own lock stops the loop at once.
    let e = open_with(&d.join("loop.qcow2"), json!({})).err().unwrap();
    assert!(e.contains("lock"), "{e}");
    // A missing backing file is named.
    run(
        bin(),
        &[
            "create",
            "-b",
            "gone.qcow2",
            "-F",
            "qcow2",
            "-o",
            "size=1M",
            &p("orphan.qcow2"),
        ],
    );
    let e = open_with(&d.join("orphan.qcow2"), json!({})).err().unwrap();
    assert!(e.contains("gone.qcow2"), "{e}");
    // backing: null opens without it.
    let q = open_with(&d.join("orphan.qcow2"), json!({"backing": null})).unwrap();
    q.close();
}

#[test]
fn create_options_are_checked() {
    let dir = tmp();
    let p = dir.path().join("x.qcow2");
    let p = p.to_str().unwrap();
    for (opts, msg) in [
        ("cluster_size=1000", "power of two"),
        ("compat=0.10,lazy_refcounts=on", "lazy_refcounts"),
        ("extended_l2=on,cluster_size=4k", "extended_l2"),
        ("refcount_bits=3", "refcount_bits"),
        ("preallocation=most", "preallocation"),
        ("frob=1", "unknown option"),
    ] {
        let out = Command::new(bin())
            .args(["create", "-o", opts, p, "1M"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(msg), "{opts}: {err}");
    }
    for prealloc in ["off", "metadata", "falloc", "full"] {
        run(
            bin(),
            &[
                "create",
                "-o",
                &format!("preallocation={prealloc}"),
                p,
                "3M",
            ],
        );
        check_clean(Path::new(p));
        let info = run("qemu-img", &["info", "--output=json", p]);
        assert!(info.contains("\"virtual-size\": 3145728"), "{info}");
    }
}

#[test]
fn header_extensions_survive_our_header_updates() {
    let dir = tmp();
    let img = dir.path().join("ext.qcow2");
    run(
        "qemu-img",
        &["create", "-f", "qcow2", img.to_str().unwrap(), "4M"],
    );
    // Replace the end marker of the extension list by an extension QEMU
    // does not know, then a new end marker.
    let mut b = std::fs::read(&img).unwrap();
    let be32 = |b: &[u8], o: usize| u32::from_be_bytes(b[o..o + 4].try_into().unwrap());
    let mut off = be32(&b, 100) as usize;
    while be32(&b, off) != 0 {
        off += 8 + (be32(&b, off + 4) as usize).div_ceil(8) * 8;
    }
    b[off..off + 4].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    b[off + 4..off + 8].copy_from_slice(&5u32.to_be_bytes());
    b[off + 8..off + 13].copy_from_slice(b"hello");
    b[off + 16..off + 24].fill(0);
    std::fs::write(&img, &b).unwrap();
    let ext_area = |b: &[u8]| b[104..off + 24].to_vec();
    let before = ext_area(&b);
    // Lazy refcounts (dirty bit set and cleared), writes, a resize that
    // grows the L1 table.
    let q = open_with(&img, json!({"lazy-refcounts": true})).unwrap();
    q.write(0, &[1u8; 65536]);
    q.node.truncate(64 << 30).unwrap();
    q.write(63 << 30, &[2u8; 4096]);
    q.close();
    let after = std::fs::read(&img).unwrap();
    assert_eq!(ext_area(&after), before, "extensions changed");
    check_clean(&img);
    let info = run("qemu-img", &["info", img.to_str().unwrap()]);
    assert!(
        info.contains("64 GiB") && info.contains("lazy refcounts: true"),
        "{info}"
    );
    let q = open(&img);
    assert_eq!(q.read(63 << 30, 4096), vec![2u8; 4096]);
    q.close();
}

#[test]
fn overlapping_tables_are_refused() {
    let dir = tmp();
    let img = dir.path().join("o.qcow2");
    create(&img, "", MIB);
    let mut b = std::fs::read(&img).unwrap();
    let reftable = b[48..56].to_vec();
    b[40..48].copy_from_slice(&reftable);
    std::fs::write(&img, &b).unwrap();
    let e = open_with(&img, json!({})).err().unwrap();
    assert!(e.contains("overlap"), "{e}");
}

// ---------------------------------------------------------------------------
// Internal snapshots
// ---------------------------------------------------------------------------

use vhost_user_blkd::drivers::qcow2::SnapshotRef;
use vhost_user_blkd::drivers::InternalSnapshots;

fn q2(img: &Img) -> &dyn InternalSnapshots {
    img.node.internal_snapshots().expect("a qcow2 node")
}

fn by_name(name: &str) -> SnapshotRef<'_> {
    SnapshotRef {
        id: None,
        name: Some(name),
    }
}

/// The image as `qemu-img snapshot -a` reverts a copy of it to `snap`.
fn reverted(img: &Path, snap: &str) -> Vec<u8> {
    let copy = img.with_extension(format!("{snap}.qcow2"));
    std::fs::copy(img, &copy).unwrap();
    run(
        "qemu-img",
        &["snapshot", "-a", snap, copy.to_str().unwrap()],
    );
    check_clean(&copy);
    let raw = copy.with_extension("raw");
    run(
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            copy.to_str().unwrap(),
            raw.to_str().unwrap(),
        ],
    );
    std::fs::read(raw).unwrap()
}

#[test]
fn internal_snapshots_qemu_img_lists_and_reverts() {
    let dir = tmp();
    for opts in ["", "extended_l2=on", "compat=0.10,cluster_size=4k"] {
        let img = dir.path().join("i.qcow2");
        create(&img, opts, 4 * MIB);
        let q = open(&img);
        let mut rng = Rng(31);
        let mut model = vec![0u8; 4 * MIB as usize];
        let mut states = Vec::new();
        for round in 0..3 {
            for _ in 0..20 {
                let off = rng.below(4 * MIB / 512 - 130) * 512;
                let n = 512 * (1 + rng.below(128)) as usize;
                let data = fill(&mut rng, n);
                q.write(off, &data);
                model[off as usize..off as usize + data.len()].copy_from_slice(&data);
            }
            let name = format!("s{round}");
            let s = block_on(q2(&q).snapshot_create(&name, (1_700_000_000 + round, 5))).unwrap();
            assert_eq!(s.id, (round + 1).to_string());
            states.push((name, model.clone()));
        }
        // Duplicate names are refused.
        let e = block_on(q2(&q).snapshot_create("s1", (0, 0))).unwrap_err();
        assert!(e.to_string().contains("already exists"), "{e}");
        // More writes after the last snapshot, including over shared clusters.
        q.write(0, &vec![0xee; 256 * 1024]);
        model[..256 * 1024].fill(0xee);
        block_on(q.node.pwrite_zeroes(MIB, 128 * 1024, true, false)).unwrap();
        model[MIB as usize..MIB as usize + 128 * 1024].fill(0);
        assert!(q.read(0, 4 * MIB) == model);
        q.close();
        check_clean(&img);
        let list = run("qemu-img", &["snapshot", "-l", img.to_str().unwrap()]);
        for (name, _) in &states {
            assert!(list.contains(name.as_str()), "{opts}: {list}");
        }
        for (name, want) in &states {
            assert!(
                &reverted(&img, name) == want,
                "{opts}: snapshot {name} differs"
            );
        }
        // The daemon reads the current state back after reopen, and lists
        // the snapshots with their metadata.
        let q = open(&img);
        assert!(q.read(0, 4 * MIB) == model);
        let snaps = q2(&q).snapshots();
        assert_eq!(snaps.len(), 3);
        assert_eq!(
            (
                snaps[2].name.as_str(),
                snaps[2].date_sec,
                snaps[2].date_nsec
            ),
            ("s2", 1_700_000_002, 5)
        );
        assert_eq!(snaps[0].disk_size, Some(4 * MIB));
        // Delete the middle one: the others still revert exactly.
        block_on(q2(&q).snapshot_delete(&by_name("s1"))).unwrap();
        let e = block_on(q2(&q).snapshot_delete(&by_name("s1"))).unwrap_err();
        assert!(e.to_string().contains("not found"), "{e}");
        q.close();
        check_clean(&img);
        let list = run("qemu-img", &["snapshot", "-l", img.to_str().unwrap()]);
        assert!(
            !list.contains(" s1 ") && list.contains("s0") && list.contains("s2"),
            "{list}"
        );
        assert!(reverted(&img, "s0") == states[0].1);
        assert!(reverted(&img, "s2") == states[2].1);
        std::fs::remove_file(&img).unwrap();
    }
}

#[test]
fn snapshots_made_by_qemu_img_are_deleted_and_reverted_by_us() {
    let dir = tmp();
    let img = dir.path().join("q.qcow2");
    let p = img.to_str().unwrap();
    run("qemu-img", &["create", "-f", "qcow2", p, "2M"]);
    run("qemu-io", &["-c", "write -P 0x01 0 2M", p]);
    run("qemu-img", &["snapshot", "-c", "one", p]);
    run("qemu-io", &["-c", "write -P 0x02 0 1M", p]);
    run("qemu-img", &["snapshot", "-c", "two", p]);
    run("qemu-io", &["-c", "write -P 0x03 1M 1M", p]);
    let q = open(&img);
    let snaps = q2(&q).snapshots();
    assert_eq!(
        snaps.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
        ["one", "two"]
    );
    // By id and name together: both must match.
    let e = block_on(q2(&q).snapshot_delete(&SnapshotRef {
        id: Some("2"),
        name: Some("one"),
    }))
    .unwrap_err();
    assert!(e.to_string().contains("not found"), "{e}");
    block_on(q2(&q).snapshot_delete(&SnapshotRef {
        id: Some("1"),
        name: None,
    }))
    .unwrap();
    // Revert the live node to "two".
    block_on(q2(&q).snapshot_goto(&q.node, &by_name("two"))).unwrap();
    let v = q.read(0, 2 * MIB);
    assert!(v[..MIB as usize].iter().all(|&b| b == 2) && v[MIB as usize..].iter().all(|&b| b == 1));
    // Writes after the revert do not change the snapshot.
    q.write(0, &[9u8; 4096]);
    q.close();
    check_clean(&img);
    let list = run("qemu-img", &["snapshot", "-l", p]);
    assert!(!list.contains("one") && list.contains("two"), "{list}");
    let two = reverted(&img, "two");
    assert!(
        two[..MIB as usize].iter().all(|&b| b == 2) && two[MIB as usize..].iter().all(|&b| b == 1)
    );
}

#[test]
fn hundreds_of_snapshots() {
    let dir = tmp();
    let img = dir.path().join("h.qcow2");
    create(&img, "cluster_size=4k", MIB);
    let q = open(&img);
    for i in 0..300u32 {
        q.write(u64::from(i % 256) * 4096, &[i as u8; 4096]);
        block_on(q2(&q).snapshot_create(&format!("snap-{i}"), (i, 0))).unwrap();
    }
    q.close();
    check_clean(&img);
    let t = std::time::Instant::now();
    let q = open(&img);
    let opened = t.elapsed();
    assert_eq!(q2(&q).snapshots().len(), 300);
    eprintln!("opening an image with 300 snapshots took {opened:?}");
    block_on(q2(&q).snapshot_delete(&by_name("snap-150"))).unwrap();
    q.close();
    check_clean(&img);
    let list = run("qemu-img", &["snapshot", "-l", img.to_str().unwrap()]);
    assert_eq!(list.matches("snap-").count(), 299);
    let v = reverted(&img, "snap-299");
    assert_eq!(v[43 * 4096], 43);
}

/// Random corruption of a real image's metadata (header, L1, refcount
/// table and blocks, L2 tables): opening, reading everything, writing and
/// flushing never panic; each either works or fails with an error.
#[test]
fn randomly_corrupted_metadata_never_panics() {
    let dir = tmp();
    let good = dir.path().join("good.qcow2");
    // Small clusters so metadata is dense; a backing-free image with data,
    // zero clusters, and compressed clusters from qemu-img.
    let (raw, _) = random_raw(dir.path(), 2 * MIB, 7);
    run(
        "qemu-img",
        &[
            "convert",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4096",
            raw.to_str().unwrap(),
            good.to_str().unwrap(),
        ],
    );
    run(
        "qemu-io",
        &[
            "-c",
            "write -P 0x44 64k 64k",
            "-c",
            "write -z 256k 64k",
            good.to_str().unwrap(),
        ],
    );
    let orig = std::fs::read(&good).unwrap();
    // Metadata lives in the first clusters and wherever the tables point;
    // flip bytes in the first 64 KiB and at table offsets.
    let be64 = |o: usize| u64::from_be_bytes(orig[o..o + 8].try_into().unwrap()) as usize;
    let l1 = be64(40);
    let rt = be64(48);
    let targets = [
        0usize,
        l1,
        rt,
        be64(rt) & !0x1ff,
        be64(l1) & 0x00ff_ffff_ffff_fe00,
    ];
    let mut rng = Rng(0xc0ffee);
    let mut opened = 0;
    for round in 0..200 {
        let mut b = orig.clone();
        for _ in 0..1 + rng.below(24) {
            let base = targets[rng.below(targets.len() as u64) as usize];
            let at = (base + rng.below(512) as usize * 8).min(b.len() - 8);
            // Whole table entries: random offsets, flags, all ones, zero.
            let v: u64 = match rng.below(5) {
                0 => rng.next(),
                1 => u64::MAX,
                2 => 0,
                3 => (rng.below(1 << 20) << 12) | (rng.next() & (0xc000_0000_0000_0001)),
                _ => rng.below(orig.len() as u64 * 2) & !0x1ff,
            };
            b[at..at + 8].copy_from_slice(&v.to_be_bytes());
        }
        let p = dir.path().join("fuzz.qcow2");
        std::fs::write(&p, &b).unwrap();
        let Ok(q) = open_with(&p, json!({})) else {
            continue;
        };
        opened += 1;
        let size = q.node.size().min(4 * MIB);
        let mut off = 0;
        while off < size {
            let (iov, _v) = IoVecs::bounce(65536.min((size - off) as usize), 4096);
            let _ = block_on(q.node.preadv(off, &iov));
            off += 65536;
        }
        if !q.node.is_read_only() {
            let (iov, _v) = IoVecs::bounce(4096, 4096);
            let _ = block_on(q.node.pwritev(rng.below(size / 4096) * 4096, &iov, false));
            let _ = block_on(q.node.pwrite_zeroes(0, 65536, round % 2 == 0, false));
            let _ = block_on(q.node.flush());
        }
        q.close();
    }
    eprintln!("{opened} of 200 corrupted images opened");
}

/// Refcount blocks that claim every cluster (every refcount table entry
/// pointing at one block full of ones): an allocation gives up with an
/// error instead of scanning billions of clusters.
#[test]
fn refcounts_claiming_everything_do_not_hang_allocation() {
    let dir = tmp();
    let img = dir.path().join("r.qcow2");
    create(&img, "", 4 * MIB);
    let mut b = std::fs::read(&img).unwrap();
    let be64 = |b: &[u8], o: usize| u64::from_be_bytes(b[o..o + 8].try_into().unwrap()) as usize;
    let rt = be64(&b, 48);
    let rb = be64(&b, rt);
    b[rb..rb + 65536].fill(0xff);
    let entry = (rb as u64).to_be_bytes();
    for i in 0..8192 {
        b[rt + i * 8..rt + i * 8 + 8].copy_from_slice(&entry);
    }
    std::fs::write(&img, &b).unwrap();
    let q = open(&img);
    let (iov, _v) = IoVecs::bounce(4096, 4096);
    let e = block_on(q.node.pwritev(0, &iov, false)).unwrap_err();
    assert!(e.to_string().contains("refcounts claim"), "{e}");
}

/// With discard=unmap on the qcow2 node (inherited by its inline file
/// node), freed clusters are punched out of the image file.
#[test]
fn discarded_clusters_free_space_in_the_file() {
    use std::os::unix::fs::MetadataExt;
    let dir = tmp();
    let img = dir.path().join("d.qcow2");
    create(&img, "", 16 * MIB);
    let q = open(&img);
    q.write(0, &vec![0x5a; 8 * MIB as usize]);
    block_on(q.node.flush()).unwrap();
    let full = std::fs::metadata(&img).unwrap().blocks() * 512;
    block_on(q.node.pdiscard(0, 8 * MIB)).unwrap();
    block_on(q.node.flush()).unwrap();
    let after = std::fs::metadata(&img).unwrap().blocks() * 512;
    assert!(q.read(0, 8 * MIB).iter().all(|&b| b == 0));
    q.close();
    assert!(
        full >= 8 * MIB && after < full - 6 * MIB,
        "allocated {full} -> {after}"
    );
    check_clean(&img);
}

// ---------------------------------------------------------------------------
// Persistent dirty bitmaps
// ---------------------------------------------------------------------------

use vhost_user_blkd::block::bitmap::DirtyBitmap;

/// x-debug-block-dirty-bitmap-sha256 of `bitmap` as qemu-storage-daemon
/// computes it after loading the image read-only.
fn qsd_bitmap_sha256(img: &Path, bitmap: &str) -> String {
    use std::io::{BufRead, BufReader, Write};
    let dir = img.parent().unwrap();
    let mon = dir.join("qsd-qmp.sock");
    let _ = std::fs::remove_file(&mon);
    let mut qsd = Command::new("qemu-storage-daemon")
        .args([
            "--blockdev",
            &format!(
                "driver=qcow2,node-name=n0,read-only=on,file.driver=file,file.filename={},file.read-only=on",
                img.display()
            ),
            "--chardev",
            &format!("socket,id=m0,path={},server=on,wait=off", mon.display()),
            "--monitor",
            "chardev=m0",
        ])
        .spawn()
        .expect("qemu-storage-daemon");
    for _ in 0..200 {
        if mon.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let s = std::os::unix::net::UnixStream::connect(&mon).expect("QSD monitor");
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut w = s;
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let mut ask = |cmd: serde_json::Value| -> serde_json::Value {
        writeln!(w, "{cmd}").unwrap();
        loop {
            let mut l = String::new();
            r.read_line(&mut l).unwrap();
            let v: serde_json::Value = serde_json::from_str(&l).unwrap();
            if v.get("event").is_none() {
                return v;
            }
        }
    };
    ask(json!({"execute": "qmp_capabilities"}));
    let v = ask(json!({"execute": "x-debug-block-dirty-bitmap-sha256",
                       "arguments": {"node": "n0", "name": bitmap}}));
    let _ = qsd.kill();
    let _ = qsd.wait();
    v["return"]["sha256"]
        .as_str()
        .unwrap_or_else(|| panic!("{v}"))
        .to_string()
}

#[test]
fn persistent_bitmaps_round_trip_with_qemu() {
    let dir = tmp();
    let img = dir.path().join("bm.qcow2");
    create(&img, "", 8 * MIB);
    let p = img.to_str().unwrap();
    // One bitmap made by qemu-img, one by us.
    run("qemu-img", &["bitmap", "--add", "-g", "65536", p, "qb"]);
    let q = open(&img);
    let loaded: Vec<String> = q
        .node
        .bitmaps()
        .iter()
        .map(|b| b.name().to_string())
        .collect();
    assert_eq!(loaded, ["qb"]);
    let mut list = q.node.bitmaps().to_vec();
    list.push(Arc::new(
        DirtyBitmap::new("ours", 8 * MIB, 4096, true, true).unwrap(),
    ));
    q.node.set_bitmaps(list);
    for off in [0u64, 65536 * 3 + 4096, 5 * MIB, 8 * MIB - 512] {
        q.write(off, &[1u8; 512]);
    }
    block_on(q.node.pwrite_zeroes(2 * MIB, 256 * 1024, false, false)).unwrap();
    let ours: Vec<(String, u64, String)> = q
        .node
        .bitmaps()
        .iter()
        .map(|b| (b.name().to_string(), b.count(), b.sha256()))
        .collect();
    q.close();
    check_clean(&img);
    let info = run("qemu-img", &["info", "--output=json", p]);
    assert!(
        info.contains("\"qb\"") && info.contains("\"ours\"") && info.contains("auto"),
        "{info}"
    );
    // qemu-storage-daemon loads the same bits.
    for (name, _, sha) in &ours {
        assert_eq!(&qsd_bitmap_sha256(&img, name), sha, "bitmap {name}");
    }
    // And so do we, after a restart.
    let q = open(&img);
    let again: Vec<(String, u64, String)> = q
        .node
        .bitmaps()
        .iter()
        .map(|b| (b.name().to_string(), b.count(), b.sha256()))
        .collect();
    assert_eq!(again, ours);
    // A crash (no close) leaves them marked in use: the next open drops
    // them, and the image stays clean.
    drop(q);
    let info = run("qemu-img", &["info", "--output=json", p]);
    assert!(info.contains("in-use"), "{info}");
    let q = open(&img);
    assert!(q.node.bitmaps().is_empty());
    q.close();
    check_clean(&img);
    let info = run("qemu-img", &["info", "--output=json", p]);
    assert!(!info.contains("\"qb\""), "{info}");
}

// ---------------------------------------------------------------------------
// The copy-on-read filter
// ---------------------------------------------------------------------------

#[test]
fn copy_on_read_fills_the_top_image_from_the_chain() {
    let dir = tmp();
    let d = dir.path();
    let p = |n: &str| d.join(n).to_str().unwrap().to_string();
    run(
        "qemu-img",
        &["create", "-f", "qcow2", &p("base.qcow2"), "4M"],
    );
    run("qemu-io", &["-c", "write -P 0x11 0 2M", &p("base.qcow2")]);
    run(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            &p("mid.qcow2"),
        ],
    );
    run("qemu-io", &["-c", "write -P 0x22 1M 512K", &p("mid.qcow2")]);
    run(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "mid.qcow2",
            "-F",
            "qcow2",
            &p("top.qcow2"),
        ],
    );
    let base_before = std::fs::read(p("base.qcow2")).unwrap();
    for (bottom, copied_base) in [(None, true), (Some("top-backing"), false)] {
        let top = d.join("top.qcow2");
        std::fs::copy(d.join("top.qcow2"), d.join("top-orig.qcow2")).ok();
        let mut graph = Graph::new();
        let o: BlockdevOptions = serde_json::from_value(json!({
            "driver": "qcow2", "node-name": "top",
            "file": {"driver": "file", "filename": top.to_str().unwrap()},
        }))
        .unwrap();
        graph.add(&o).unwrap();
        let mut cor = json!({"driver": "copy-on-read", "node-name": "cor", "file": "top"});
        if let Some(b) = bottom {
            cor["bottom"] = json!(b);
        }
        let cor: BlockdevOptions = serde_json::from_value(cor).unwrap();
        let node = graph.add(&cor).unwrap();
        let img = Img { graph, node };
        let mut want = vec![0u8; 4 * MIB as usize];
        want[..2 * MIB as usize].fill(0x11);
        want[MIB as usize..MIB as usize + 512 * 1024].fill(0x22);
        assert!(img.read(0, 4 * MIB) == want);
        // A write through the filter lands in the top image.
        img.write(3 * MIB, &[0x33; 4096]);
        want[3 * MIB as usize..3 * MIB as usize + 4096].fill(0x33);
        // The filter holds nothing; the image under it writes its metadata.
        img.graph.get("top").unwrap().close();
        img.close();
        check_clean(&top);
        // What the reads copied is now allocated in the top image itself.
        let map = run("qemu-img", &["map", "--output=json", top.to_str().unwrap()]);
        let depth_of = |off: u64| -> i64 {
            let v: serde_json::Value = serde_json::from_str(&map).unwrap();
            v.as_array()
                .unwrap()
                .iter()
                .find(|e| {
                    let s = e["start"].as_u64().unwrap();
                    s <= off && off < s + e["length"].as_u64().unwrap()
                })
                .map(|e| e["depth"].as_i64().unwrap())
                .unwrap()
        };
        assert_eq!(depth_of(MIB + 4096), 0, "mid's data copied: {map}");
        assert_eq!(
            depth_of(4096) == 0,
            copied_base,
            "base's data copied or not: {map}"
        );
        assert_eq!(depth_of(3 * MIB), 0);
        let raw = d.join("top.raw");
        run(
            "qemu-img",
            &[
                "convert",
                "-O",
                "raw",
                top.to_str().unwrap(),
                raw.to_str().unwrap(),
            ],
        );
        assert!(std::fs::read(&raw).unwrap() == want);
        // Fresh top for the next round.
        std::fs::remove_file(&top).unwrap();
        run(
            "qemu-img",
            &[
                "create",
                "-f",
                "qcow2",
                "-b",
                "mid.qcow2",
                "-F",
                "qcow2",
                &p("top.qcow2"),
            ],
        );
    }
    assert_eq!(std::fs::read(p("base.qcow2")).unwrap(), base_before);
}

// ---------------------------------------------------------------------------
// Reopening a backing image read-write (block-commit's target)
// ---------------------------------------------------------------------------

/// base.qcow2 (2M, 0x11 in its first 1M) under top.qcow2, made by
/// qemu-img; returns the path of the top image.
fn commit_chain(d: &Path) -> PathBuf {
    let p = |n: &str| d.join(n).to_str().unwrap().to_string();
    run(
        "qemu-img",
        &["create", "-f", "qcow2", &p("base.qcow2"), "2M"],
    );
    run("qemu-io", &["-c", "write -P 0x11 0 1M", &p("base.qcow2")]);
    run(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            &p("top.qcow2"),
        ],
    );
    d.join("top.qcow2")
}

fn qcow2_of(node: &Node) -> &vhost_user_blkd::drivers::Qcow2Driver {
    node.block_driver()
        .as_any()
        .downcast_ref()
        .expect("a qcow2 node")
}

fn write_node(node: &Node, off: u64, data: &[u8]) -> Result<(), String> {
    let (iov, view) = IoVecs::bounce(data.len(), 4096);
    view.with_bytes(&iov, |b| b.copy_from_slice(data));
    block_on(node.pwritev(off, &iov, false)).map_err(|e| e.to_string())
}

/// The backing node and its file node are read-only, its file node holds
/// no write lock, and writes to it are refused.
fn assert_still_read_only(img: &Img) {
    let base = img.graph.get("q-backing").unwrap();
    let file = img.graph.get("q-backing-file").unwrap();
    assert!(base.is_read_only() && qcow2_of(&base).is_read_only());
    assert!(file.is_read_only());
    let (taken, _) = file
        .protocol_file()
        .expect("a file node")
        .held_locks()
        .unwrap();
    assert!(!taken.contains(vhost_user_blkd::block::Perm::WRITE));
    assert!(write_node(&base, 0, &[0x99; 4096]).is_err());
}

#[test]
fn reopened_backing_image_takes_writes_and_is_read_only_again() {
    let dir = tmp();
    let d = dir.path();
    let img = open(&commit_chain(d));
    let base = img.graph.get("q-backing").unwrap();
    assert!(write_node(&base, 0, &[0x99; 4096]).is_err());

    qcow2_of(&base).reopen_writable(&base).unwrap();
    assert!(!base.is_read_only() && !qcow2_of(&base).is_read_only());
    assert!(!img.graph.get("q-backing-file").unwrap().is_read_only());
    // In place (over qemu-io's data) and allocating.
    write_node(&base, 512 * KIB, &[0x22; 64 * KIB as usize]).unwrap();
    write_node(&base, 1536 * KIB, &[0x33; 64 * KIB as usize]).unwrap();
    let mut want = vec![0u8; 2 * MIB as usize];
    want[..MIB as usize].fill(0x11);
    want[512 * KIB as usize..576 * KIB as usize].fill(0x22);
    want[1536 * KIB as usize..1600 * KIB as usize].fill(0x33);
    // The overlay sees them through its backing edge.
    assert!(img.read(0, 2 * MIB) == want);
    // A writer holds the write lock: qemu-io cannot even read the image.
    let base_path = d.join("base.qcow2");
    let busy = Command::new("qemu-io")
        .args(["-r", "-c", "read 0 4k", base_path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&busy.stderr).contains("lock"),
        "qemu-io opened an image we write: {busy:?}"
    );

    base.set_read_only(true);
    qcow2_of(&base).make_read_only();
    assert!(qcow2_of(&base).is_read_only());
    assert!(write_node(&base, 0, &[0x99; 4096]).is_err());
    // Written out and unlocked for writing while still open.
    check_clean(&base_path);
    img.close();
    check_clean(&base_path);
    check_clean(&d.join("top.qcow2"));
    let raw = d.join("want.raw");
    std::fs::write(&raw, &want).unwrap();
    compare(&base_path, "qcow2", &raw, "raw");
}

#[test]
fn reopen_writable_refuses_while_another_process_shares_no_writes() {
    let dir = tmp();
    let d = dir.path();
    let top = commit_chain(d);
    let base_path = d.join("base.qcow2");
    // Another open of the image (its own descriptor and locks, as another
    // process would have): read-only, and sharing no writes.
    let other = open_with(
        &base_path,
        json!({"node-name": "other", "read-only": true,
               "file": {"driver": "file", "node-name": "other-file",
                        "filename": base_path.to_str().unwrap(), "read-only": true}}),
    )
    .unwrap();
    let img = open(&top);
    let base = img.graph.get("q-backing").unwrap();

    let e = qcow2_of(&base).reopen_writable(&base).unwrap_err();
    assert!(
        e.contains("'q-backing'") && e.contains("Failed to get \"write\" lock"),
        "{e}"
    );
    assert_still_read_only(&img);
    // Nothing was left behind: once the other user is gone, it works.
    other.close();
    qcow2_of(&base).reopen_writable(&base).unwrap();
    write_node(&base, 0, &[0x44; 4096]).unwrap();
    base.set_read_only(true);
    qcow2_of(&base).make_read_only();
    img.close();
    check_clean(&base_path);
}

#[test]
fn reopen_writable_refuses_while_another_parent_shares_no_writes() {
    let dir = tmp();
    let d = dir.path();
    let mut img = open(&commit_chain(d));
    // A second format node on the backing image's file node.
    let peek: BlockdevOptions = serde_json::from_value(json!({
        "driver": "qcow2", "node-name": "peek", "read-only": true,
        "file": "q-backing-file", "backing": null,
    }))
    .unwrap();
    img.graph.add(&peek).unwrap();
    let base = img.graph.get("q-backing").unwrap();

    let e = qcow2_of(&base).reopen_writable(&base).unwrap_err();
    assert!(e.contains("'q-backing'") && e.contains("'peek'"), "{e}");
    assert_still_read_only(&img);
    img.graph.remove("peek").unwrap();
    img.close();
    check_clean(&d.join("base.qcow2"));
}

#[test]
fn reopened_backing_image_keeps_its_persistent_bitmaps() {
    let dir = tmp();
    let d = dir.path();
    let top = commit_chain(d);
    let base_path = d.join("base.qcow2");
    let bp = base_path.to_str().unwrap();
    run("qemu-img", &["bitmap", "--add", "-g", "65536", bp, "b0"]);
    let img = open(&top);
    let base = img.graph.get("q-backing").unwrap();
    assert_eq!(base.bitmaps().len(), 1);

    qcow2_of(&base).reopen_writable(&base).unwrap();
    // In use on disk while we write (a crash leaves it inconsistent).
    let info = run("qemu-img", &["info", "-U", "--output=json", bp]);
    assert!(info.contains("in-use"), "{info}");
    write_node(&base, 1536 * KIB, &[0x33; 4096]).unwrap();
    assert_eq!(base.bitmaps()[0].count(), 64 * KIB);
    base.set_read_only(true);
    qcow2_of(&base).make_read_only();
    img.close();

    // Stored afresh, consistent, with the write recorded.
    check_clean(&base_path);
    let info = run("qemu-img", &["info", "--output=json", bp]);
    assert!(
        info.contains("\"b0\"") && info.contains("auto") && !info.contains("in-use"),
        "{info}"
    );
    let again = open_with(&base_path, json!({"read-only": true, "file": {"driver": "file", "node-name": "q-file", "filename": bp, "read-only": true}})).unwrap();
    assert_eq!(again.node.bitmaps()[0].count(), 64 * KIB);
    again.close();
}

/// Runs a command that must fail; returns its output.
fn run_fails(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().expect(cmd);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{cmd} {args:?} succeeded: {text}");
    text
}

/// qemu-storage-daemon holding `img` open read-write (as a VM's disk)
/// until dropped. It writes its pid file once the image is open.
struct Holder(std::process::Child);

impl Holder {
    fn new(img: &Path, dir: &Path) -> Holder {
        let pidfile = dir.join("qsd.pid");
        let child = Command::new("qemu-storage-daemon")
            .args([
                "--blockdev",
                &format!("driver=file,node-name=f,filename={}", img.display()),
                "--blockdev",
                "driver=qcow2,node-name=q,file=f",
                "--pidfile",
                pidfile.to_str().unwrap(),
            ])
            .spawn()
            .expect("qemu-storage-daemon");
        let mut h = Holder(child);
        while !pidfile.exists() {
            assert!(
                h.0.try_wait().unwrap().is_none(),
                "qemu-storage-daemon exited"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        h
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `vhost-user-blkd create` onto an image another process has open (and
/// locked): refused as qemu-img refuses it, before anything is truncated;
/// the image keeps its bytes and its inode.
#[test]
fn create_refuses_an_image_another_process_has_open() {
    use std::os::unix::fs::MetadataExt;
    let dir = tmp();
    let img = dir.path().join("live.qcow2");
    let p = img.to_str().unwrap();
    run("qemu-img", &["create", "-f", "qcow2", p, "4M"]);
    run("qemu-io", &["-c", "write -P 0x5a 0 1M", p]);
    let before = std::fs::read(&img).unwrap();
    let ino = std::fs::metadata(&img).unwrap().ino();
    let _holder = Holder::new(&img, dir.path());
    let theirs = run_fails("qemu-img", &["create", "-f", "qcow2", p, "1M"]);
    assert!(theirs.contains("Failed to get \"write\" lock"), "{theirs}");
    for fmt in ["qcow2", "raw"] {
        let ours = run_fails(bin(), &["create", "-f", fmt, p, "1M"]);
        assert!(
            ours.contains("Failed to get \"write\" lock"),
            "{fmt}: {ours}"
        );
        assert_eq!(std::fs::read(&img).unwrap(), before, "{fmt}: image changed");
        assert_eq!(std::fs::metadata(&img).unwrap().ino(), ino);
    }
}

/// A backing file without a backing format is refused, as qemu-img
/// (since 6.1) refuses it: a format probed from the backing file's content
/// is what a guest controls.
#[test]
fn create_refuses_a_backing_file_without_a_format() {
    let dir = tmp();
    let d = dir.path();
    let base = d.join("base.qcow2");
    run(
        "qemu-img",
        &["create", "-f", "qcow2", base.to_str().unwrap(), "4M"],
    );
    let top = d.join("top.qcow2");
    let t = top.to_str().unwrap();
    let theirs = run_fails(
        "qemu-img",
        &["create", "-f", "qcow2", "-b", "base.qcow2", t],
    );
    assert!(
        theirs.contains("Backing file specified without backing format"),
        "{theirs}"
    );
    for args in [
        vec!["create", "-b", "base.qcow2", t],
        vec!["create", "-b", "base.qcow2", t, "4M"],
        vec!["create", "-o", "backing_file=base.qcow2", t, "4M"],
    ] {
        let ours = run_fails(bin(), &args);
        assert!(
            ours.contains("Backing file specified without backing format"),
            "{args:?}: {ours}"
        );
        assert!(!top.exists(), "{args:?} created the image");
    }
    run(bin(), &["create", "-b", "base.qcow2", "-F", "qcow2", t]);
    let info = run("qemu-img", &["info", "--output=json", t]);
    assert!(
        info.contains("\"backing-filename-format\": \"qcow2\""),
        "{info}"
    );
}

/// Removes the backing format extension of a qcow2 image made by
/// qemu-img (which always records one now): as an old image would be.
fn forget_backing_format(img: &Path) {
    let mut b = std::fs::read(img).unwrap();
    let magic = 0xE279_2ACAu32.to_be_bytes();
    let at = (72..4096)
        .step_by(8)
        .find(|&i| b[i..i + 4] == magic)
        .expect("backing format extension");
    // Its type becomes the end of the extensions.
    b[at..at + 4].copy_from_slice(&[0; 4]);
    std::fs::write(img, &b).unwrap();
}

/// The files a graph has open.
fn open_files(img: &Img) -> Vec<String> {
    img.graph
        .nodes()
        .filter_map(|n| vhost_user_blkd::drivers::file_name_of(n))
        .collect()
}

/// A raw backing image whose content a guest made look like a qcow2 image
/// naming a host file: an overlay that records no backing format must not
/// open that host file (the probed format may not name further files).
/// A probed qcow2 backing image that names nothing still opens.
#[test]
fn a_probed_backing_image_never_opens_files_its_content_names() {
    let dir = tmp();
    let d = dir.path();
    let p = |n: &str| d.join(n).to_str().unwrap().to_string();
    std::fs::write(d.join("secret"), vec![0x77u8; MIB as usize]).unwrap();
    // What the guest wrote into its raw disk: a qcow2 header naming the
    // host file.
    run(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            &p("secret"),
            "-F",
            "raw",
            &p("disk.raw"),
            "1M",
        ],
    );
    run(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "disk.raw",
            "-F",
            "raw",
            &p("top.qcow2"),
            "1M",
        ],
    );
    forget_backing_format(&d.join("top.qcow2"));
    match open_with(&d.join("top.qcow2"), json!({})) {
        Ok(img) => panic!("opened, with {:?}", open_files(&img)),
        Err(e) => assert!(e.contains("probed"), "{e}"),
    }
    // A probed qcow2 backing image without a backing file of its own, and
    // a probed raw one, open and read.
    run(
        "qemu-img",
        &["create", "-f", "qcow2", &p("plain.qcow2"), "1M"],
    );
    run("qemu-io", &["-c", "write -P 0x42 0 64k", &p("plain.qcow2")]);
    std::fs::write(d.join("plain.raw"), vec![0x43u8; MIB as usize]).unwrap();
    for (base, fmt, byte) in [("plain.qcow2", "qcow2", 0x42u8), ("plain.raw", "raw", 0x43)] {
        let top = format!("top-{fmt}.qcow2");
        run(
            "qemu-img",
            &[
                "create",
                "-f",
                "qcow2",
                "-b",
                base,
                "-F",
                fmt,
                &p(&top),
                "1M",
            ],
        );
        forget_backing_format(&d.join(&top));
        let img = open_with(&d.join(&top), json!({})).unwrap();
        assert_eq!(img.read(0, 4096), vec![byte; 4096], "{fmt}");
        assert!(open_files(&img).contains(&p(base)));
    }
}
