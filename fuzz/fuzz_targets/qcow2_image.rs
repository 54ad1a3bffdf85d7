//! qcow2 open and I/O on a mutated image: the input is the image file
//! (header, extensions, L1/L2 tables, refcounts, snapshots, bitmaps,
//! compressed descriptors -- whatever the bytes say). It is written to a
//! file in TMPDIR (tmpfs under scripts/fuzz.sh) each run (the driver works on a `file` node), then opened
//! read-only and read; opened read-write, read, written, zeroed,
//! discarded, flushed, snapshotted, resized and closed; and opened again
//! read-only to read what close wrote.
//!
//! The backing file named by a header is not opened (`backing: null`): a
//! mutated name may point anywhere on the host.
#![no_main]

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use futures::executor::block_on;
use libfuzzer_sys::fuzz_target;
use vhost_user_blkd::block::{Graph, Node};
use vhost_user_blkd::drivers::qcow2::SnapshotRef;
use vhost_user_blkd::drivers::BlockdevOptions;
use vhost_user_blkd::io::IoVecs;

const KIB: u64 = 1024;
/// Largest image tried (libFuzzer's -max_len keeps inputs far smaller).
const MAX_IMAGE: usize = 4 << 20;

fn image_path() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        // scripts/fuzz.sh points TMPDIR at a scratch directory on tmpfs
        // that it removes.
        let dir = std::env::temp_dir().join(format!("vub-fuzz-qcow2-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("image directory");
        dir.join("img.qcow2")
    })
}

struct Img {
    graph: Graph,
    node: Arc<Node>,
}

impl Img {
    fn open(read_only: bool) -> Option<Img> {
        let path = image_path().to_str().expect("UTF-8 path").to_string();
        let o = serde_json::json!({
            "driver": "qcow2", "node-name": "q", "read-only": read_only,
            "discard": "unmap", "backing": null,
            "file": {"driver": "file", "node-name": "q-file", "filename": path,
                     "read-only": read_only, "locking": "off"},
        });
        let opts: BlockdevOptions = serde_json::from_value(o).expect("qcow2 options");
        let mut graph = Graph::new();
        let node = graph.add(&opts).ok()?;
        Some(Img { graph, node })
    }

    fn close(self) {
        self.node.close();
        drop(self.node);
        drop(self.graph);
    }
}

/// A small deterministic generator seeded from the image.
struct Rng(u64);

impl Rng {
    fn new(data: &[u8]) -> Rng {
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        for b in data.iter().take(4096) {
            h = (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
        }
        Rng(h | 1)
    }
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

fn read_some(img: &Img, rng: &mut Rng) {
    let size = img.node.size();
    if size == 0 {
        return;
    }
    let mut ranges = vec![(0, 64 * KIB), (size.saturating_sub(4 * KIB), 4 * KIB)];
    for _ in 0..2 {
        ranges.push((rng.below(size) & !511, 32 * KIB));
    }
    for (off, len) in ranges {
        let len = len.min(size - off.min(size));
        if len == 0 {
            continue;
        }
        let (iov, _v) = IoVecs::bounce(len as usize, 4096);
        let _ = block_on(img.node.preadv(off, &iov));
        let _ = block_on(img.node.block_status(off, len));
    }
}

fn write_some(img: &Img, rng: &mut Rng) {
    let size = img.node.size();
    if size < 64 * KIB || img.node.is_read_only() {
        return;
    }
    let (iov, v) = IoVecs::bounce(4096, 4096);
    v.with_bytes(&iov, |b| b.fill(0x5a));
    let _ = block_on(img.node.pwritev(rng.below(size / 4096) * 4096, &iov, false));
    let (iov, _v) = IoVecs::bounce(1536, 4096);
    let _ = block_on(
        img.node
            .pwritev(rng.below(size / 512 - 4) * 512, &iov, false),
    );
    let _ = block_on(img.node.pwrite_zeroes(
        rng.below(size / (64 * KIB)) * 64 * KIB,
        64 * KIB,
        rng.below(2) == 0,
        false,
    ));
    let _ = block_on(
        img.node
            .pdiscard(rng.below(size / (64 * KIB)) * 64 * KIB, 64 * KIB),
    );
    let _ = block_on(img.node.flush());
    if let Some(q) = img.node.internal_snapshots() {
        match rng.below(5) {
            0 => {
                let _ = block_on(q.snapshot_create("f", (1, 2)));
            }
            1 => {
                if let Some(s) = q.snapshots().first() {
                    let id = s.id.clone();
                    let _ = block_on(q.snapshot_delete(&SnapshotRef {
                        id: Some(&id),
                        name: None,
                    }));
                }
            }
            2 => {
                if let Some(s) = q.snapshots().last() {
                    let name = s.name.clone();
                    let _ = block_on(q.snapshot_goto(
                        &img.node,
                        &SnapshotRef {
                            id: None,
                            name: Some(&name),
                        },
                    ));
                }
            }
            3 => {
                let _ = img.node.truncate(size + 1024 * KIB);
            }
            _ => {}
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() > MAX_IMAGE {
        return;
    }
    std::fs::write(image_path(), data).expect("write the image to tmpfs");
    let mut rng = Rng::new(data);
    if let Some(img) = Img::open(true) {
        read_some(&img, &mut rng);
        img.close();
    }
    if let Some(img) = Img::open(false) {
        read_some(&img, &mut rng);
        write_some(&img, &mut rng);
        read_some(&img, &mut rng);
        img.close();
        if let Some(img) = Img::open(true) {
            read_some(&img, &mut rng);
            img.close();
        }
    }
});
