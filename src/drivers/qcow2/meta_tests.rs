//! Unit tests of the metadata layer on a real image file.
//!
//! ```text
//!   build::create --> tempfile <--file node (sync engine)-- Meta under test
//!                        \--> qemu-img check (the oracle, after flush_all)
//! ```
//!
//! The fake file is a `file` node over a temporary file: test threads get
//! the synchronous I/O engine, so `block_on` drives every request to the
//! end without an iothread. Images have 512-byte clusters so that refcount
//! blocks and the refcount table fill up after a few thousand clusters.

use std::collections::HashMap;
use std::process::Command;
use std::sync::Arc;

use futures::executor::block_on;

use super::*;
use crate::drivers::qcow2::build::{self, CreateOptions};
use crate::drivers::{CacheOptions, DiscardMode, FileDriver, FileOptions, Locking};

const CS: u64 = 512;

/// An image file, its file node and the metadata opened on it.
struct Img {
    _dir: tempfile::TempDir,
    path: String,
    f: Arc<Node>,
    m: Meta,
}

/// The header of the image under `f`, as on disk.
fn disk_header(f: &Node) -> header::Header {
    let b = block_on(read_buf(f, 0, 4096)).expect("read header");
    header::Header::parse(&b, file_len(f)).expect("parse header")
}

/// The length of the file now (the node's size is the one at open).
fn file_len(f: &Node) -> u64 {
    let name = crate::drivers::file_name_of(f).expect("a file node");
    std::fs::metadata(name).expect("stat").len()
}

fn file_node(path: &str) -> Arc<Node> {
    let d = FileDriver::open(&FileOptions {
        node_name: "file".into(),
        filename: path.into(),
        read_only: false,
        // No fdatasync: these tests look at what is written and in which
        // order, not at what survives a power cut; syncs only cost time.
        cache: CacheOptions {
            direct: false,
            no_flush: true,
        },
        discard: DiscardMode::Unmap,
        locking: Locking::Off,
        auto_read_only: false,
        detect_zeroes: Default::default(),
        force_share: false,
        active: None,
        aio: Default::default(),
    })
    .expect("open file node");
    Node::new("file".into(), Box::new(d), false)
}

/// Metadata of the image under `f`, as the driver opens it, with caches of
/// `l2_tables` L2 tables and `rb_tables` refcount blocks.
fn open_meta(f: &Node, l2_tables: u64, rb_tables: u64) -> Meta {
    let h = disk_header(f);
    let g = Geo::new(&h);
    let l1_bytes = (u64::from(h.l1_size) * 8).div_ceil(g.cs) * g.cs;
    let l1 = decode_be64(&block_on(read_buf(f, h.l1_table_offset, l1_bytes as usize)).unwrap());
    let rt_bytes = u64::from(h.refcount_table_clusters) * g.cs;
    let rt =
        decode_be64(&block_on(read_buf(f, h.refcount_table_offset, rt_bytes as usize)).unwrap());
    Meta::new(
        g,
        "img",
        l1,
        h.l1_table_offset,
        h.l1_size,
        rt,
        h.refcount_table_offset,
        h.refcount_table_clusters,
        file_len(f),
        l2_tables * g.cs,
        rb_tables * g.cs,
        512,
    )
}

/// A new image of `size` bytes with 512-byte clusters.
fn image(size: u64, refcount_bits: u32, l2_tables: u64, rb_tables: u64) -> Img {
    image_cs(size, CS, refcount_bits, l2_tables, rb_tables)
}

fn image_cs(size: u64, cs: u64, refcount_bits: u32, l2_tables: u64, rb_tables: u64) -> Img {
    let o = CreateOptions {
        size,
        cluster_size: cs,
        refcount_bits,
        ..CreateOptions::default()
    };
    image_opts(&o, l2_tables, rb_tables)
}

fn image_opts(o: &CreateOptions, l2_tables: u64, rb_tables: u64) -> Img {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("t.qcow2").to_str().unwrap().to_string();
    build::create(&path, o).expect("create image");
    let f = file_node(&path);
    let m = open_meta(&f, l2_tables, rb_tables);
    Img {
        _dir: dir,
        path,
        f,
        m,
    }
}

impl Img {
    fn rc(&mut self, c: u64) -> u64 {
        block_on(self.m.refcount(&self.f, c)).expect("refcount")
    }

    /// Allocates `n` clusters; returns the first one's index.
    fn alloc(&mut self, n: u64) -> u64 {
        let off = block_on(self.m.alloc(&self.f, n)).expect("alloc");
        let cs = self.m.g.cs;
        assert_eq!(off % cs, 0, "allocation at {off:#x} is not cluster aligned");
        off / cs
    }

    fn update(&mut self, c: u64, delta: i64) -> Result<u64, BlockError> {
        block_on(self.m.update_refcount(&self.f, c, delta, (0, 0)))
    }

    /// Maps guest cluster `gc` to a new data cluster, as an allocating
    /// write does (the data first, then the entry); returns the cluster.
    fn map(&mut self, gc: u64) -> u64 {
        let l2 = block_on(self.m.l2_for_write(&self.f, gc)).expect("l2_for_write");
        let data = self.alloc(1);
        let cs = self.m.g.cs;
        let fill = vec![gc as u8; cs as usize];
        block_on(write_buf(&self.f, data * cs, &fill)).expect("write data");
        self.m.set_entry(l2, gc, (data * cs) | COPIED, 0);
        data
    }

    /// The L2 entry of guest cluster `gc`, through the cache.
    fn entry(&mut self, gc: u64) -> u64 {
        block_on(self.m.entry(&self.f, gc)).expect("entry").0
    }

    fn flush_all(&mut self) {
        block_on(self.m.flush_all(&self.f, true)).expect("flush_all");
    }

    /// The refcount of cluster `c` as the file holds it (header, refcount
    /// table and block read from disk, no cache).
    fn disk_rc(&self, c: u64) -> u64 {
        let h = disk_header(&self.f);
        let g = Geo::new(&h);
        let bi = c >> g.rb_bits;
        let t = read_buf_sync(
            &self.f,
            h.refcount_table_offset,
            u64::from(h.refcount_table_clusters) * g.cs,
        );
        let rt = decode_be64(&t);
        let Some(&rb) = rt.get(bi as usize) else {
            return 0;
        };
        if rb == 0 {
            return 0;
        }
        let b = read_buf_sync(&self.f, rb & OFFSET_MASK, g.cs);
        get_refcount(&b, g.refcount_order, c & (g.rb_entries() - 1))
    }

    /// The L2 entry of guest cluster `gc` as the file holds it, found
    /// through the in-memory L1 (whose writes may still be pending).
    fn disk_entry(&self, gc: u64) -> u64 {
        let l2 = self.m.l1[(gc >> self.m.g.l2_bits) as usize] & OFFSET_MASK;
        let t = decode_be64(&read_buf_sync(&self.f, l2, self.m.g.cs));
        t[(gc & (self.m.g.l2_entries() - 1)) as usize]
    }
}

fn read_buf_sync(f: &Node, off: u64, len: u64) -> Vec<u8> {
    block_on(read_buf(f, off, len as usize)).expect("read")
}

/// `qemu-img check` of the image: exit status and text.
fn qemu_img_check(path: &str) -> (i32, String) {
    let out = Command::new("qemu-img")
        .args(["check", "-f", "qcow2", path])
        .output()
        .expect("run qemu-img (7.2 is the oracle of these tests)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

fn assert_clean(path: &str) {
    let (code, text) = qemu_img_check(path);
    assert!(
        code == 0 && text.contains("No errors were found"),
        "qemu-img check {path}: exit {code}\n{text}"
    );
}

// ---- allocation ----

#[test]
fn alloc_takes_contiguous_runs_past_the_metadata() {
    let mut t = image(1 << 20, 16, 16, 16);
    // A new image: header, L1, one refcount block, the refcount table.
    let end = t.m.end_cluster;
    assert_eq!(end, 4, "fixture layout changed");
    for c in 0..end {
        assert_eq!(t.rc(c), 1, "metadata cluster {c}");
    }
    let a = t.alloc(3);
    assert_eq!(a, end);
    for c in a..a + 3 {
        assert_eq!(t.rc(c), 1);
    }
    assert_eq!(t.rc(a + 3), 0);
    assert_eq!(t.m.end_cluster, a + 3);
    assert_eq!(t.alloc(1), a + 3);
    assert_eq!(t.alloc(5), a + 4);
    assert_eq!(t.m.end_cluster, a + 9);
    // Nothing reached the disk yet: the refcount block is written back
    // by a flush.
    assert_eq!(t.disk_rc(a), 0);
    t.flush_all();
    for c in a..a + 9 {
        assert_eq!(t.disk_rc(c), 1, "cluster {c} on disk");
    }
    assert_eq!(t.disk_rc(a + 9), 0);
}

#[test]
fn alloc_is_first_fit_and_reuses_freed_clusters() {
    let mut t = image(1 << 20, 16, 16, 16);
    let c: Vec<u64> = (0..10).map(|_| t.alloc(1)).collect();
    assert!(c.windows(2).all(|w| w[1] == w[0] + 1), "{c:?}");
    let end = c[9] + 1;
    // Holes: one cluster (c1), then three (c4..=c6).
    for &x in &[c[1], c[4], c[5], c[6]] {
        assert_eq!(t.update(x, -1).unwrap(), 0);
    }
    // First fit: the 1-cluster hole is too small for 2, the 3-cluster one
    // is the first that fits (not the end of the image).
    assert_eq!(t.alloc(2), c[4]);
    // The hole skipped on the way is remembered and used next.
    assert_eq!(t.alloc(1), c[1]);
    assert_eq!(t.alloc(1), c[6]);
    // No hole left: the end.
    assert_eq!(t.alloc(1), end);
    assert_eq!(t.alloc(2), end + 1);
    // Freeing behind the search start moves it back.
    t.update(c[0], -1).unwrap();
    assert_eq!(t.alloc(1), c[0]);
    // A run never straddles a cluster in use.
    t.update(c[2], -1).unwrap();
    t.update(c[8], -1).unwrap();
    t.update(c[9], -1).unwrap();
    assert_eq!(t.alloc(2), c[8]);
    assert_eq!(t.alloc(1), c[2]);
    for x in c {
        assert_eq!(t.rc(x), 1, "cluster {x}");
    }
}

#[test]
fn alloc_fills_refcount_blocks_and_grows_the_table_and_qemu_img_agrees() {
    // 64-bit refcounts in 512-byte clusters: 64 clusters per refcount
    // block, and one cluster of refcount table covers 4096 clusters.
    let mut t = image(4 << 20, 64, 256, 8);
    let g = t.m.g;
    assert_eq!(g.rb_entries(), 64);
    assert_eq!(t.m.reftable_clusters, 1);
    let old_table = t.m.reftable_offset / CS;
    let mut data = Vec::new();
    for gc in 0..4200 {
        data.push(t.map(gc));
    }
    // The table grew and moved; the header on disk says where.
    assert!(t.m.reftable_clusters > 1, "{}", t.m.reftable_clusters);
    assert_ne!(t.m.reftable_offset / CS, old_table);
    let h = disk_header(&t.f);
    assert_eq!(h.refcount_table_offset, t.m.reftable_offset);
    assert_eq!(h.refcount_table_clusters, t.m.reftable_clusters);
    // The old table is free again, the new one counted.
    assert_eq!(t.rc(old_table), 0);
    let new_table = t.m.reftable_offset / CS;
    for c in new_table..new_table + u64::from(t.m.reftable_clusters) {
        assert_eq!(t.rc(c), 1, "reftable cluster {c}");
    }
    // Every block the image needs exists, is counted, and no allocation
    // returned a metadata cluster.
    let end = t.m.end_cluster;
    let blocks: Vec<u64> =
        t.m.reftable
            .iter()
            .map(|e| (e & OFFSET_MASK) / CS)
            .collect();
    for bi in 0..end.div_ceil(g.rb_entries()) {
        let b = blocks[bi as usize];
        assert_ne!(b, 0, "no refcount block for index {bi}");
        assert_eq!(t.rc(b), 1, "refcount block {b}");
        assert_eq!(
            t.m.overlap(b * CS + 8, 8),
            Some(format!("a refcount block (cluster {b})"))
        );
    }
    let mut seen = std::collections::HashSet::new();
    for &d in &data {
        assert!(seen.insert(d), "cluster {d} allocated twice");
        assert!(!blocks.contains(&d), "data cluster {d} is a refcount block");
        assert!(
            !(new_table..new_table + u64::from(t.m.reftable_clusters)).contains(&d),
            "data cluster {d} is in the refcount table"
        );
        assert!(!t.m.l2_set.contains(&d), "data cluster {d} is an L2 table");
        assert_eq!(t.rc(d), 1);
    }
    t.flush_all();
    for &d in data.iter().step_by(97) {
        assert_eq!(t.disk_rc(d), 1, "cluster {d} on disk");
    }
    assert_clean(&t.path);
    // The overlap check follows the table.
    assert_eq!(
        t.m.overlap(new_table * CS, 1).as_deref(),
        Some("the refcount table")
    );
    assert_eq!(t.m.overlap(old_table * CS, CS), None);
    // A reopen sees the same refcounts.
    let mut m = open_meta(&t.f, 4, 4);
    for &d in data.iter().step_by(13) {
        assert_eq!(block_on(m.refcount(&t.f, d)).unwrap(), 1);
    }
    assert_eq!(block_on(m.refcount(&t.f, old_table)).unwrap(), 0);
}

#[test]
fn alloc_never_returns_metadata_whose_refcount_was_lost() {
    // Each kind of metadata, its refcount dropped to zero as a broken
    // image would have it: the allocator finds it free, the overlap check
    // refuses it and marks the image corrupt.
    type Which = fn(&Img) -> u64;
    let cases: [(&str, Which); 4] = [
        ("the header", |_| 0),
        ("the active L1 table", |t| t.m.l1_offset / CS),
        ("a refcount block (cluster 2)", |t| {
            (t.m.reftable[0] & OFFSET_MASK) / CS
        }),
        ("an L2 table", |t| (t.m.l1[0] & OFFSET_MASK) / CS),
    ];
    for (what, cluster) in cases {
        let mut t = image(1 << 20, 16, 16, 16);
        t.map(0);
        let c = cluster(&t);
        assert_eq!(t.update(c, -1).unwrap(), 0, "{what}");
        let e = block_on(t.m.alloc(&t.f, 1)).expect_err(what);
        let msg = e.to_string();
        assert!(matches!(e, BlockError::Corrupt { .. }), "{what}: {msg}");
        assert!(
            msg.contains(&format!("allocated cluster {c} overlaps {what}")),
            "{what}: {msg}"
        );
        assert!(t.m.corrupt, "{what}");
        // No more allocations once corrupt.
        let e = block_on(t.m.alloc(&t.f, 1)).expect_err(what).to_string();
        assert!(e.contains("the image is marked corrupt"), "{e}");
    }
}

#[test]
fn alloc_refuses_refcounts_that_claim_everything_past_the_end() {
    // 1-bit refcounts: a block covers 4096 clusters. Blocks 0..=17 on disk
    // all ones claim every cluster up to 18 * 4096, far past the end.
    let mut t = image(1 << 20, 1, 16, 4);
    let rbe = t.m.g.rb_entries();
    assert_eq!(rbe, 4096);
    let ones = vec![0xffu8; CS as usize];
    let b0 = t.m.reftable[0] & OFFSET_MASK;
    block_on(write_buf(&t.f, b0, &ones)).unwrap();
    for bi in 1..=17u64 {
        let off = bi * rbe * CS;
        block_on(write_buf(&t.f, off, &ones)).unwrap();
        t.m.reftable[bi as usize] = off;
    }
    let end = t.m.end_cluster;
    let e = block_on(t.m.alloc(&t.f, 1)).expect_err("allocated past a hostile refcount run");
    let msg = e.to_string();
    assert!(matches!(e, BlockError::Corrupt { .. }), "{msg}");
    let limit = end + 1 + (1 << 16);
    assert!(
        msg.contains(&format!("refcounts claim clusters past cluster {limit}")),
        "{msg}"
    );
    assert!(t.m.corrupt);
}

/// Brings the refcount of `c` from 1 to `v` in steps that fit an i64.
fn raise_to(t: &mut Img, c: u64, v: u64) {
    let mut now = t.rc(c);
    while now < v {
        let step = (v - now).min(i64::MAX as u64);
        now = t.update(c, step as i64).expect("raise");
    }
    assert_eq!(now, v);
}

#[test]
fn refcount_updates_stop_at_the_limits_of_every_width() {
    for order in 0..=6u32 {
        let bits = 1u32 << order;
        let mut t = image(1 << 20, bits, 16, 16);
        let max = t.m.g.max_refcount();
        assert_eq!(
            max,
            if bits == 64 {
                u64::MAX
            } else {
                (1 << bits) - 1
            }
        );
        // Three neighbours, so that a write spilling over an entry's
        // bits shows.
        let c = t.alloc(3) + 1;
        raise_to(&mut t, c, max);
        assert_eq!(t.rc(c - 1), 1, "{bits} bits: left neighbour");
        assert_eq!(t.rc(c + 1), 1, "{bits} bits: right neighbour");
        // One more is refused and changes nothing.
        let e = t.update(c, 1).expect_err("past the maximum");
        let msg = e.to_string();
        // The same refusal at every width: past the maximum is a limit of
        // the format, not corruption (64 bits overflow the u64 itself).
        assert!(
            matches!(e, BlockError::Unsupported { .. })
                && msg.contains(&format!("would exceed {max} (refcount_bits {bits})")),
            "{bits} bits: {msg}"
        );
        assert_eq!(t.rc(c), max, "{bits} bits");
        assert!(!t.m.corrupt, "{bits} bits");
        // On disk as written, with the neighbours intact.
        t.flush_all();
        assert_eq!(t.disk_rc(c), max, "{bits} bits on disk");
        assert_eq!(t.disk_rc(c - 1), 1, "{bits} bits on disk");
        assert_eq!(t.disk_rc(c + 1), 1, "{bits} bits on disk");
        // Down to zero; below is corruption, refused, nothing changed.
        let mut now = max;
        while now > 0 {
            let step = now.min(i64::MAX as u64);
            now = t.update(c, -(step as i64)).unwrap();
        }
        let e = t.update(c, -1).expect_err("below zero");
        assert!(
            matches!(e, BlockError::Corrupt { .. })
                && e.to_string()
                    .contains(&format!("refcount of cluster {c} would go from 0 by -1")),
            "{bits} bits: {e}"
        );
        assert_eq!(t.rc(c), 0);
        assert_eq!(t.rc(c - 1), 1);
        assert_eq!(t.rc(c + 1), 1);
        // The freed cluster is the next allocation.
        assert_eq!(t.alloc(1), c, "{bits} bits");
    }
}

#[test]
fn refcount_widths_read_as_qemu_img_reads_them() {
    for bits in [1u32, 2, 4, 8, 16, 32, 64] {
        let mut t = image(1 << 20, bits, 16, 16);
        // Enough clusters to need a second refcount block with 32- and
        // 64-bit refcounts (128 and 64 entries a block).
        let data: Vec<u64> = (0..300).map(|gc| t.map(gc)).collect();
        t.flush_all();
        assert_clean(&t.path);
        // A count above the references is a leak that qemu-img reports
        // with the count it read: our encoding is QEMU's.
        let c = data[150];
        let max = t.m.g.max_refcount();
        if max == 1 {
            assert!(t.update(c, 1).is_err(), "1-bit refcount above 1");
            continue;
        }
        raise_to(&mut t, c, max);
        // A shared cluster's entry has no COPIED flag.
        let (e, _, l2) = block_on(t.m.entry(&t.f, 150)).unwrap();
        t.m.set_entry(l2, 150, e & !COPIED, 0);
        t.flush_all();
        let (code, text) = qemu_img_check(&t.path);
        assert_eq!(code, 3, "{bits} bits:\n{text}");
        assert!(
            text.contains(&format!("Leaked cluster {c} refcount={max} reference=1")),
            "{bits} bits:\n{text}"
        );
        assert!(
            text.contains("1 leaked clusters were found"),
            "{bits} bits:\n{text}"
        );
    }
}

// ---- unreferences ----

/// Points guest cluster `gc` at a new data cluster and queues the old one's
/// unreference, as an overwrite of a cluster that cannot be written in
/// place does; returns (old, new).
fn remap(t: &mut Img, gc: u64) -> (u64, u64) {
    let old = (t.entry(gc) & OFFSET_MASK) / CS;
    assert_ne!(old, 0);
    let new = t.map(gc);
    t.m.queue_unref(old);
    (old, new)
}

#[test]
fn unrefs_wait_for_the_tables_then_for_in_flight_io() {
    let mut t = image(1 << 20, 16, 16, 16);
    for gc in 0..4 {
        t.map(gc);
    }
    t.flush_all();
    let (a, _) = remap(&mut t, 0);
    // Queued: still counted, and not handed out again.
    assert_eq!(t.rc(a), 1);
    let covered = block_on(t.m.write_tables(&t.f)).unwrap();
    assert_eq!(covered, vec![a]);
    // The tables that dropped `a` are written; the new mapping of gc 0 is
    // on disk.
    assert_ne!(t.disk_entry(0) & OFFSET_MASK, a * CS);
    // Queued after the write started: not covered by it.
    let (b, _) = remap(&mut t, 1);
    assert_eq!(block_on(t.m.write_tables(&t.f)).unwrap(), vec![b]);
    // Not durable yet: applying does nothing.
    block_on(t.m.apply_unrefs(&t.f, true)).unwrap();
    assert_eq!(t.rc(a), 1);
    t.m.unrefs_durable(covered);
    // Durable, but a request may still use the old mapping.
    block_on(t.m.apply_unrefs(&t.f, false)).unwrap();
    assert_eq!(t.rc(a), 1);
    block_on(t.m.apply_unrefs(&t.f, true)).unwrap();
    assert_eq!(t.rc(a), 0);
    // `b`'s covering write was never declared durable.
    assert_eq!(t.rc(b), 1);
    // The freed cluster is allocated again.
    assert_eq!(t.map(10), a);
    // A flush with requests in flight makes c's unref ready but keeps it...
    let (c, _) = remap(&mut t, 2);
    block_on(t.m.flush(&t.f, false)).unwrap();
    assert_eq!(t.rc(c), 1);
    // ...and the next one with none applies it.
    block_on(t.m.flush(&t.f, true)).unwrap();
    assert_eq!(t.rc(c), 0);
    // b's covered list was dropped above: it leaks, as qemu-img says,
    // and nothing else is wrong.
    t.flush_all();
    let (code, text) = qemu_img_check(&t.path);
    assert_eq!(code, 3, "{text}");
    assert!(
        text.contains(&format!("Leaked cluster {b} refcount=1 reference=0")),
        "{text}"
    );
    assert!(text.contains("1 leaked clusters were found"), "{text}");
}

#[test]
fn unrefs_stay_queued_when_the_table_write_fails() {
    let mut t = image(1 << 20, 16, 16, 16);
    t.map(0);
    t.map(1);
    t.flush_all();
    let (a, _) = remap(&mut t, 0);
    t.f.set_read_only(true);
    let e = block_on(t.m.write_tables(&t.f)).expect_err("write to a read-only node");
    assert!(matches!(e, BlockError::ReadOnly { .. }), "{e}");
    t.f.set_read_only(false);
    let (b, _) = remap(&mut t, 1);
    assert_eq!(block_on(t.m.write_tables(&t.f)).unwrap(), vec![a, b]);
}

#[test]
fn applied_unrefs_punch_only_clusters_that_became_free() {
    let mut t = image(1 << 20, 16, 16, 16);
    t.m.pass_discard = true;
    let shared = t.map(5);
    let single = t.map(6);
    // `shared` has a second reference (a snapshot's, say).
    t.update(shared, 1).unwrap();
    t.flush_all();
    remap(&mut t, 5);
    remap(&mut t, 6);
    block_on(t.m.flush(&t.f, true)).unwrap();
    assert_eq!(t.rc(shared), 1);
    assert_eq!(t.rc(single), 0);
    // map() filled each cluster with its guest cluster number.
    assert_eq!(read_buf_sync(&t.f, shared * CS, CS), vec![5u8; CS as usize]);
    assert_eq!(read_buf_sync(&t.f, single * CS, CS), vec![0u8; CS as usize]);
}

// ---- caches ----

#[test]
fn l2_cache_smaller_than_the_working_set_writes_back_and_rereads() {
    // Two L2 tables cached; six in use (64 entries a table).
    let mut t = image(4 << 20, 16, 2, 16);
    let per = t.m.g.l2_entries();
    let gcs: Vec<u64> = (0..6).flat_map(|k| [k * per, k * per + 7]).collect();
    let mut want = Vec::new();
    for &gc in &gcs {
        want.push((gc, t.map(gc)));
    }
    // The first table was evicted dirty, with no flush: its entries are
    // on disk, and so are the refcounts of what they point to (written
    // before the table), in the on-disk refcount table of the header.
    for &(gc, d) in &want[..2] {
        assert_eq!(t.disk_entry(gc), (d * CS) | COPIED, "guest cluster {gc}");
        assert_eq!(t.disk_rc(d), 1, "data cluster {d}");
        let l2 = (t.m.l1[(gc / per) as usize] & OFFSET_MASK) / CS;
        assert_eq!(t.disk_rc(l2), 1, "L2 table {l2}");
    }
    // Every entry reads back, most of them through a reload.
    for &(gc, d) in want.iter().rev() {
        assert_eq!(t.entry(gc), (d * CS) | COPIED, "guest cluster {gc}");
    }
    for &(gc, d) in &want {
        assert_eq!(t.entry(gc), (d * CS) | COPIED, "guest cluster {gc}");
    }
    // A change to a reloaded table is written back on its next eviction.
    let gc = gcs[0];
    let l2 = block_on(t.m.l2_for_write(&t.f, gc)).unwrap();
    t.m.set_entry(l2, gc, ZERO, 0);
    for &g2 in &gcs[4..] {
        t.entry(g2);
    }
    assert_eq!(t.disk_entry(gc), ZERO);
    assert_eq!(t.entry(gc), ZERO);
    // Nothing was lost or counted twice. The cluster gc 0 pointed to is
    // unreferenced now: the one leak.
    t.flush_all();
    let (code, text) = qemu_img_check(&t.path);
    assert_eq!(code, 3, "{text}");
    assert!(
        text.contains(&format!(
            "Leaked cluster {} refcount=1 reference=0",
            want[0].1
        )),
        "{text}"
    );
    assert!(text.contains("1 leaked clusters were found"), "{text}");
}

#[test]
fn l2_eviction_with_lazy_refcounts_leaves_refcounts_for_the_close() {
    let mut t = image(4 << 20, 16, 2, 16);
    t.m.lazy = true;
    let per = t.m.g.l2_entries();
    let first = t.map(0);
    for k in 1..4 {
        t.map(k * per);
    }
    assert_eq!(t.disk_entry(0), (first * CS) | COPIED);
    assert_eq!(t.disk_rc(first), 0);
    // flush() keeps them in memory too; flush_all() writes them.
    block_on(t.m.flush(&t.f, true)).unwrap();
    assert_eq!(t.disk_rc(first), 0);
    t.flush_all();
    assert_eq!(t.disk_rc(first), 1);
    assert_clean(&t.path);
}

#[test]
fn refcount_block_cache_writes_back_evicted_blocks() {
    // 64-bit refcounts: 64 clusters a block; four blocks cached.
    let mut t = image(1 << 20, 64, 64, 4);
    let data: Vec<u64> = (0..600).map(|gc| t.map(gc)).collect();
    let blocks = t.m.reftable.iter().filter(|&&e| e != 0).count();
    assert!(blocks >= 9, "{blocks} refcount blocks");
    // The first blocks went to disk when evicted, before any flush (the
    // table pointing to new ones waits for a flush: read them through the
    // table in memory).
    let g = t.m.g;
    for &d in &data[..64] {
        let rb = t.m.reftable[(d >> g.rb_bits) as usize] & OFFSET_MASK;
        let b = read_buf_sync(&t.f, rb, CS);
        let i = d & (g.rb_entries() - 1);
        assert_eq!(get_refcount(&b, g.refcount_order, i), 1, "data cluster {d}");
    }
    for &d in &data {
        assert_eq!(t.rc(d), 1, "data cluster {d}");
    }
    t.flush_all();
    assert_clean(&t.path);
}

// ---- tables and checks ----

#[test]
fn overlap_names_the_metadata_a_range_touches() {
    let mut t = image(1 << 20, 16, 16, 16);
    // Header at cluster 0, L1 (32 entries, 256 bytes) at 1, refcount
    // block at 2, refcount table at 3.
    assert_eq!((t.m.l1_offset, t.m.l1_size), (CS, 32));
    assert_eq!(t.m.reftable[0], 2 * CS);
    assert_eq!(t.m.reftable_offset, 3 * CS);
    let o = |t: &Img, off: u64, len: u64| t.m.overlap(off, len);
    assert_eq!(o(&t, 0, 1).as_deref(), Some("the header"));
    assert_eq!(o(&t, CS - 1, 1).as_deref(), Some("the header"));
    assert_eq!(o(&t, CS, 1).as_deref(), Some("the active L1 table"));
    assert_eq!(o(&t, CS + 255, 1).as_deref(), Some("the active L1 table"));
    // The L1 table's bytes, not its whole cluster.
    assert_eq!(o(&t, CS + 256, 256), None);
    assert_eq!(
        o(&t, CS + 256, 257).as_deref(),
        Some("a refcount block (cluster 2)")
    );
    assert_eq!(
        o(&t, 3 * CS - 1, 1).as_deref(),
        Some("a refcount block (cluster 2)")
    );
    assert_eq!(o(&t, 3 * CS, 1).as_deref(), Some("the refcount table"));
    assert_eq!(o(&t, 4 * CS, 100 * CS), None);
    // A range over several: the first listed wins.
    assert_eq!(o(&t, 0, 4 * CS).as_deref(), Some("the header"));
    // L2 tables enter and leave with their L1 entries.
    let d = t.map(0);
    let l2 = (t.m.l1[0] & OFFSET_MASK) / CS;
    assert_eq!(
        o(&t, l2 * CS + 8, 8),
        Some(format!("an L2 table (cluster {l2})"))
    );
    assert_eq!(o(&t, d * CS, CS), None);
    t.m.set_l1(0, (d * CS) | COPIED);
    assert_eq!(o(&t, l2 * CS, CS), None);
    assert_eq!(
        o(&t, d * CS, CS),
        Some(format!("an L2 table (cluster {d})"))
    );
    t.m.set_l1(0, 0);
    assert_eq!(o(&t, d * CS, CS), None);
    // Other fixed ranges (snapshot tables) count as they are listed.
    t.m.fixed
        .push((10 * CS + 100, 10 * CS + 200, "the snapshot table".into()));
    assert_eq!(o(&t, 10 * CS, 100), None);
    assert_eq!(o(&t, 10 * CS, 101).as_deref(), Some("the snapshot table"));
}

#[test]
fn l1_entries_are_checked_before_use() {
    // 4 KiB clusters: an offset can be 512-aligned and not cluster aligned.
    let mut t = image_cs(64 << 20, 4096, 16, 16, 16);
    let cs = t.m.g.cs;
    let per = t.m.g.l2_entries();
    let len = t.m.l1.len();
    assert!(len as u32 >= t.m.l1_size);
    t.m.l1[1] = 0x1200 | COPIED;
    let e = t.m.l1_entry_checked(1).expect_err("unaligned L2 offset");
    assert!(
        matches!(e, BlockError::Corrupt { .. })
            && e.to_string()
                .contains("L2 table offset 0x1200 is not cluster aligned"),
        "{e}"
    );
    for r in [
        block_on(t.m.entry(&t.f, per)).map(|_| ()),
        block_on(t.m.l2_for_write(&t.f, per + 3)).map(|_| ()),
    ] {
        let e = r.expect_err("used an unaligned L2 offset").to_string();
        assert!(e.contains("not cluster aligned"), "{e}");
    }
    let e = t.m.l1_entry_checked(len).expect_err("past the table");
    assert!(
        e.to_string()
            .contains(&format!("L1 index {len} beyond the table")),
        "{e}"
    );
    // Flags pass through; an aligned offset is fine.
    t.m.l1[2] = (7 * cs) | COPIED;
    assert_eq!(t.m.l1_entry_checked(2).unwrap(), (7 * cs) | COPIED);
    assert_eq!(t.m.l1_entry_checked(0).unwrap(), 0);
    // Guest clusters past the L1 table read as unallocated, and are not
    // written.
    let past = u64::from(t.m.l1_size) * per;
    assert_eq!(block_on(t.m.entry(&t.f, past)).unwrap(), (0, 0, 0));
    let e = block_on(t.m.l2_for_write(&t.f, past)).expect_err("past L1");
    assert!(e.to_string().contains("is beyond the L1 table"), "{e}");
}

#[test]
fn unaligned_refcount_blocks_are_corruption() {
    let mut t = image_cs(1 << 20, 4096, 16, 16, 16);
    t.m.reftable[0] = 0x1200;
    let e = block_on(t.m.refcount(&t.f, 5)).expect_err("unaligned block");
    assert!(
        matches!(e, BlockError::Corrupt { .. })
            && e.to_string()
                .contains("refcount block offset 0x1200 is not cluster aligned"),
        "{e}"
    );
    assert!(block_on(t.m.alloc(&t.f, 1)).is_err());
}

#[test]
fn l2_for_write_copies_a_shared_table() {
    let mut t = image(1 << 20, 16, 16, 16);
    let d = t.map(3);
    let old = (t.m.l1[0] & OFFSET_MASK) / CS;
    t.flush_all();
    // As after an internal snapshot: the table has two references and the
    // L1 entry no COPIED flag.
    t.update(old, 1).unwrap();
    t.m.set_l1(0, old * CS);
    let new = block_on(t.m.l2_for_write(&t.f, 3)).unwrap() / CS;
    assert_ne!(new, old);
    assert_eq!(t.m.l1[0], (new * CS) | COPIED);
    assert_eq!(t.rc(new), 1);
    // The copy has the entries; the old table loses this reference once
    // the new one is on disk.
    assert_eq!(t.entry(3), (d * CS) | COPIED);
    assert_eq!(t.rc(old), 2);
    block_on(t.m.flush(&t.f, true)).unwrap();
    assert_eq!(t.rc(old), 1);
    assert_eq!(t.disk_entry(3), (d * CS) | COPIED);
    // A table with COPIED is written in place.
    assert_eq!(block_on(t.m.l2_for_write(&t.f, 3)).unwrap() / CS, new);
}

#[test]
fn grow_l1_moves_the_table_and_frees_the_old_one() {
    let mut t = image(1 << 20, 16, 16, 16);
    let d = t.map(5);
    let (old_off, old_size) = (t.m.l1_offset, t.m.l1_size);
    assert_eq!(old_size, 32);
    // 8 MiB: 16384 clusters, 256 L1 entries in 4 clusters.
    block_on(t.m.grow_l1(&t.f, 256, 8 << 20)).unwrap();
    let h = disk_header(&t.f);
    assert_eq!(
        (h.size, h.l1_size, h.l1_table_offset),
        (8 << 20, 256, t.m.l1_offset)
    );
    assert_ne!(t.m.l1_offset, old_off);
    assert_eq!(t.rc(old_off / CS), 0);
    for c in 0..4 {
        assert_eq!(t.rc(t.m.l1_offset / CS + c), 1);
    }
    assert_eq!(
        t.m.overlap(t.m.l1_offset + 255 * 8, 8).as_deref(),
        Some("the active L1 table")
    );
    // The old entries came along; the new ones work.
    assert_eq!(t.entry(5), (d * CS) | COPIED);
    let far = 255 * t.m.g.l2_entries() + 3;
    let d2 = t.map(far);
    t.flush_all();
    let mut m = open_meta(&t.f, 4, 4);
    let (e, _, _) = block_on(m.entry(&t.f, far)).unwrap();
    assert_eq!(e, (d2 * CS) | COPIED);
    assert_clean(&t.path);
}

/// A small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) % n
    }
}

#[test]
fn a_mixed_workload_on_small_caches_stays_consistent() {
    // Allocating writes, runs, overwrites of shared clusters, discards and
    // flushes with and without requests in flight, over two L2 tables and
    // four refcount blocks of cache; with 64-bit refcounts the refcount
    // table grows.
    for bits in [16u32, 64] {
        let mut t = image(8 << 20, bits, 2, 4);
        let cs = t.m.g.cs;
        let guest = 8 * 2048u64;
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ u64::from(bits));
        let mut model: HashMap<u64, u64> = HashMap::new();
        for step in 0..3000u64 {
            match rng.below(10) {
                // A run of clusters for consecutive guest clusters.
                0..=3 => {
                    let n = 1 + rng.below(8);
                    let gc0 = rng.below(guest - n);
                    let run = t.alloc(n);
                    let fill = vec![step as u8; (n * cs) as usize];
                    block_on(write_buf(&t.f, run * cs, &fill)).unwrap();
                    for i in 0..n {
                        let gc = gc0 + i;
                        let l2 = block_on(t.m.l2_for_write(&t.f, gc)).unwrap();
                        let (old, _) = t.m.entry_in(l2, gc);
                        t.m.set_entry(l2, gc, ((run + i) * cs) | COPIED, 0);
                        if old & OFFSET_MASK != 0 {
                            t.m.queue_unref((old & OFFSET_MASK) / cs);
                        }
                        model.insert(gc, run + i);
                    }
                }
                // An overwrite that moves the cluster.
                4..=5 => {
                    let gc = rng.below(guest);
                    if model.contains_key(&gc) {
                        let (_, new) = remap(&mut t, gc);
                        model.insert(gc, new);
                    }
                }
                // A discard.
                6..=7 => {
                    let gc = rng.below(guest);
                    if let Some(old) = model.remove(&gc) {
                        let l2 = block_on(t.m.l2_for_write(&t.f, gc)).unwrap();
                        t.m.set_entry(l2, gc, 0, 0);
                        t.m.queue_unref(old);
                    }
                }
                8 => block_on(t.m.flush(&t.f, rng.below(2) == 0)).unwrap(),
                _ => {
                    let gc = rng.below(guest);
                    let want = model.get(&gc).map_or(0, |&h| (h * cs) | COPIED);
                    assert_eq!(t.entry(gc), want, "{bits} bits, step {step}, gc {gc}");
                }
            }
        }
        if bits == 64 {
            assert!(t.m.reftable_clusters >= 2, "the table did not grow");
        }
        block_on(t.m.flush(&t.f, true)).unwrap();
        // Every unreference is applied after a second flush with no
        // request in flight.
        block_on(t.m.flush(&t.f, true)).unwrap();
        t.flush_all();
        for (&gc, &h) in &model {
            assert_eq!(t.entry(gc), (h * cs) | COPIED, "{bits} bits, gc {gc}");
            assert_eq!(t.rc(h), 1, "{bits} bits, cluster {h}");
        }
        assert_clean(&t.path);
    }
}

#[test]
fn alloc_of_a_run_that_covers_whole_refcount_blocks() {
    // 16-bit refcounts in 512-byte clusters: 256 clusters a block. A run
    // of 600 clusters from the end of a new image covers block 1 (clusters
    // 256..512) whole: its refcount block must go elsewhere.
    let mut t = image(1 << 20, 16, 16, 16);
    let end = t.m.end_cluster;
    let run = block_on(t.m.alloc(&t.f, 600)).expect("alloc of 600 clusters") / CS;
    assert_eq!(run, end);
    for c in run..run + 600 {
        assert_eq!(t.rc(c), 1, "cluster {c}");
    }
    for bi in 0..3 {
        let b = (t.m.reftable[bi] & OFFSET_MASK) / CS;
        assert_ne!(b, 0, "block {bi}");
        assert!(
            !(run..run + 600).contains(&b),
            "block {bi} at {b} is in the run"
        );
        assert_eq!(t.rc(b), 1, "block {bi} at {b}");
    }
}

#[test]
fn grow_l1_by_more_than_a_refcount_block() {
    // Resizing 1 MiB to 1 GiB with 512-byte clusters and 16-bit refcounts:
    // 32768 L1 entries, 512 clusters of table, which cover a refcount
    // block (256 clusters) whole. With 64-bit refcounts (64 clusters a
    // block, 4096 in the first refcount table) to ~10 GiB: 320000
    // entries, 5000 clusters, past the end of the refcount table too.
    for (bits, entries) in [(16u32, 32768u64), (64, 320_000)] {
        let mut t = image(1 << 20, bits, 16, 16);
        let d = t.map(5);
        let size = entries * t.m.g.l2_entries() * CS;
        block_on(t.m.grow_l1(&t.f, entries, size)).expect("grow_l1");
        assert_eq!(t.entry(5), (d * CS) | COPIED);
        let l1 = t.m.l1_offset / CS;
        let clusters = (entries * 8).div_ceil(CS);
        for c in l1..l1 + clusters {
            assert_eq!(t.rc(c), 1, "{bits} bits: L1 cluster {c}");
        }
        let far = entries * t.m.g.l2_entries() - 1;
        t.map(far);
        t.flush_all();
        assert_eq!(disk_header(&t.f).size, size);
        assert_clean(&t.path);
    }
}

#[test]
fn a_refcount_block_placed_past_a_run_is_not_put_on_a_counted_cluster() {
    // A hostile image counts cluster 604 (past the end of the file) in a
    // refcount block at cluster 2000. A run of 600 from cluster 4 covers
    // block 1 whole; its refcount block would go at 604, which is in use
    // as far as the refcounts say: refused, and nothing points there.
    let mut t = image(1 << 20, 16, 16, 16);
    assert_eq!(t.m.end_cluster, 4);
    let mut counts = vec![0u64; 256];
    counts[(604 - 512) as usize] = 1;
    let block = encode_refblock(&t.m.g, &counts);
    block_on(write_buf(&t.f, 2000 * CS, &block)).unwrap();
    t.m.reftable[2] = 2000 * CS;
    let e = block_on(t.m.alloc(&t.f, 600)).expect_err("refblock on a counted cluster");
    assert!(
        matches!(e, BlockError::Corrupt { .. }) && e.to_string().contains("cluster 604"),
        "{e}"
    );
    assert_eq!(t.m.reftable[1], 0);
    assert!(!t.m.rb_set.contains(&604));
    assert_eq!(t.rc(604), 1);
}

#[test]
fn extended_l2_entries_keep_their_bitmaps_through_eviction() {
    // 16 KiB clusters with extended L2 entries: 1024 entries (two words
    // each) a table; two tables cached, four in use.
    let mut t = image_opts(
        &CreateOptions {
            size: 64 << 20,
            cluster_size: 16384,
            extended_l2: true,
            ..CreateOptions::default()
        },
        2,
        4,
    );
    let g = t.m.g;
    assert!(g.extended);
    assert_eq!(g.words_per_entry(), 2);
    let per = g.l2_entries();
    assert_eq!(per, 1024);
    let mut want = Vec::new();
    for k in 0..4u64 {
        let gc = k * per + 2 * k + 1;
        let l2 = block_on(t.m.l2_for_write(&t.f, gc)).unwrap();
        let d = t.alloc(1);
        block_on(write_buf(&t.f, d * g.cs, &vec![7u8; g.cs as usize])).unwrap();
        // Subclusters 0..=k allocated, subcluster 20 + k reads as zeroes.
        let bitmap = ((1u64 << (k + 1)) - 1) | (1 << (32 + 20 + k));
        t.m.set_entry(l2, gc, (d * g.cs) | COPIED, bitmap);
        want.push((gc, (d * g.cs) | COPIED, bitmap));
    }
    // Evicted and on disk: entry word, then bitmap.
    let (gc, e, b) = want[0];
    let l2 = t.m.l1[0] & OFFSET_MASK;
    let words = decode_be64(&read_buf_sync(&t.f, l2, g.cs));
    let i = (gc & (per - 1)) as usize * 2;
    assert_eq!((words[i], words[i + 1]), (e, b));
    for &(gc, e, b) in &want {
        let (ge, gb, _) = block_on(t.m.entry(&t.f, gc)).unwrap();
        assert_eq!((ge, gb), (e, b), "guest cluster {gc}");
        assert_eq!(sc_state(&g, ge, gb, 0).unwrap(), Sc::Data(e & OFFSET_MASK));
        assert_eq!(sc_state(&g, ge, gb, 20 + (gc / per)).unwrap(), Sc::Zero);
        assert_eq!(sc_state(&g, ge, gb, 31).unwrap(), Sc::Unallocated);
        // The neighbours are untouched.
        assert_eq!(t.entry(gc + 1), 0);
    }
    t.flush_all();
    assert_clean(&t.path);
}
