//! The `qcow2` format driver (docs/interop/qcow2.txt), with backing chains.
//!
//! ```text
//!   guest read  --map under the metadata lock--> extents
//!        Data -> file child   Zero -> zeroes   Unallocated -> backing child
//!        Compressed -> read + inflate
//!   guest write --in place?--yes--> file child (no lock held during I/O)
//!                          \--no---> allocate (or reuse) a cluster, mark the
//!                                    guest cluster busy, write head fill +
//!                                    data + tail fill, then update the L2 entry
//! ```
//!
//! Concurrency: requests from every iothread share one [`AsyncLock`] over
//! the metadata ([`meta::Meta`]); guest data moves without it. A guest
//! cluster with an allocating write in flight is *busy*: other writes,
//! write-zeroes and discards of it wait (QEMU's overlapping-request
//! serialisation), reads go on and see the old data. Clusters that lose
//! their last reference are freed only once no request that may still use
//! an old mapping is in flight (`data_inflight`).

mod bitmaps;
mod build;
mod cache;
mod chain;
mod header;
use crate::io::lock;
mod meta;
mod snap;

pub use build::{create, create_in, probe_size, CreateOptions, Preallocation};
pub use header::{parse_snapshots, Header, Snapshot};
pub use snap::SnapshotRef;

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Deserializer};

use self::lock::AsyncLock;
use self::meta::{Geo, Meta, Sc, COMPRESSED, COPIED, ZERO};
use super::{BlockdevOptions, BlockdevRef, DiscardMode};
use crate::block::{BlockError, Child, ChildRole, Graph, GraphError, Node, Perm};
use crate::io::IoVecs;
use crate::opts;

/// How far ahead of allocations the image file is grown.
const PREALLOC_STEP: u64 = 1 << 20;

/// How deep a backing chain may be.
pub const MAX_CHAIN_DEPTH: u32 = 16;

/// The autoclear feature bits in a version 3 header.
const OFF_AUTOCLEAR: u64 = header::OFF_INCOMPAT + 16;

thread_local! {
    /// Depth of the backing chain being opened on this thread.
    static OPEN_DEPTH: Cell<u32> = const { Cell::new(0) };
    /// The image being opened on this thread is a backing image whose
    /// format was probed from its content.
    static OPENING_PROBED: Cell<bool> = const { Cell::new(false) };
}

/// `backing`: absent (from the image header), `null` (none), or a node.
fn backing_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<BlockdevRef>>, D::Error> {
    let v: Option<BlockdevRef> = Option::deserialize(d)?;
    Ok(Some(match v {
        Some(BlockdevRef::Name(n)) if n.is_empty() || n == "null" => None,
        v => v,
    }))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OverlapCheck {
    None,
    Constant,
    Cached,
    All,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Qcow2Options {
    #[serde(default)]
    pub node_name: String,
    pub file: BlockdevRef,
    #[serde(default, deserialize_with = "backing_opt")]
    pub backing: Option<Option<BlockdevRef>>,
    #[serde(default, deserialize_with = "opts::bool")]
    pub read_only: bool,
    #[serde(default)]
    pub discard: DiscardMode,
    #[serde(default, deserialize_with = "opts::opt_size")]
    pub l2_cache_size: Option<u64>,
    #[serde(default, deserialize_with = "opts::opt_size")]
    pub refcount_cache_size: Option<u64>,
    #[serde(default, deserialize_with = "opts::opt_size")]
    pub cache_size: Option<u64>,
    #[serde(default, deserialize_with = "opts::opt_bool")]
    pub lazy_refcounts: Option<bool>,
    #[serde(default, deserialize_with = "opts::opt_bool")]
    pub pass_discard_request: Option<bool>,
    #[serde(default, deserialize_with = "opts::opt_bool")]
    pub pass_discard_snapshot: Option<bool>,
    #[serde(default, deserialize_with = "opts::opt_bool")]
    pub pass_discard_other: Option<bool>,
    #[serde(default)]
    pub overlap_check: Option<OverlapCheck>,
}

pub use crate::block::{Allocation, BlockStatus};

pub struct Qcow2Driver {
    name: String,
    file: Child,
    /// Set once more by an external snapshot (an overlay gets its backing).
    backing: crate::block::swap::Swap<Option<Child>>,
    g: Geo,
    size: AtomicU64,
    meta: AsyncLock<Meta>,
    /// Requests using a host mapping read under the lock.
    data_inflight: AtomicU64,
    align: u32,
    discard_unmap: AtomicBool,
    overlap_check: bool,
    header: Header,
    /// The backing file name in the header (change-backing-file rewrites it).
    backing_name: std::sync::Mutex<Option<String>>,
    snapshots: std::sync::Mutex<Vec<Snapshot>>,
    /// The dirty bit is set by us (lazy refcounts) and cleared at close.
    lazy: bool,
    closed: AtomicBool,
    /// Opened read-only; cleared by [`Qcow2Driver::reopen_writable`].
    read_only: AtomicBool,
    /// Made read-only after being writable (it became a backing image).
    demoted: AtomicBool,
    /// Persistent bitmaps read at open, until the node takes them.
    loaded_bitmaps: std::sync::Mutex<Vec<Arc<crate::block::bitmap::DirtyBitmap>>>,
    /// Where the stored bitmaps are on disk.
    stored_bitmaps: std::sync::Mutex<bitmaps::OnDisk>,
    /// The node this driver serves (its bitmaps are stored at close).
    node: std::sync::OnceLock<std::sync::Weak<Node>>,
}

fn open_err(node: &str, reason: impl Into<String>) -> GraphError {
    GraphError::Open {
        node: node.to_string(),
        reason: reason.into(),
    }
}

fn block_err(node: &str, e: BlockError) -> GraphError {
    open_err(node, e.to_string())
}

/// Guesses the format of a backing file (only ever for read-only nodes).
fn probe_format(path: &str) -> String {
    use std::io::Read;
    let mut magic = [0u8; 4];
    let ok = std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok();
    if ok && u32::from_be_bytes(magic) == header::MAGIC {
        "qcow2".into()
    } else {
        "raw".into()
    }
}

/// The options of a backing node opened from an image header.
fn backing_options(name: &str, path: &str, fmt: &str) -> Result<BlockdevOptions, String> {
    let json = match fmt {
        "qcow2" | "raw" => serde_json::json!({
            "driver": fmt,
            "node-name": name,
            "read-only": true,
            "file": {"driver": "file", "node-name": format!("{name}-file"),
                     "filename": path, "read-only": true},
        }),
        "file" => serde_json::json!({
            "driver": "file", "node-name": name, "filename": path, "read-only": true,
        }),
        other => return Err(format!("backing format '{other}' is not supported")),
    };
    serde_json::from_value(json).map_err(|e| e.to_string())
}

impl Qcow2Driver {
    pub fn open(o: &Qcow2Options, graph: &mut Graph) -> Result<Self, GraphError> {
        let name = o.node_name.as_str();
        let child = super::open_child(graph, name, &o.file, o.discard)?;
        // As QEMU's format drivers: no one else may write or resize the
        // file under the metadata, read-only or not.
        let (perm, shared) = if o.read_only {
            (
                Perm::CONSISTENT_READ,
                Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED,
            )
        } else {
            (
                Perm::CONSISTENT_READ | Perm::WRITE | Perm::RESIZE,
                Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED,
            )
        };
        let file = Child::attach(name, ChildRole::File, child, perm, shared)?;
        let f = file.node().clone();
        let file_size = f.size();
        let mut first = futures::executor::block_on(meta::read_buf(&f, 0, 4096))
            .map_err(|e| block_err(name, e))?;
        // The whole first cluster before parsing: extensions and the
        // backing file name may lie anywhere in it.
        let cluster_bits = u32::from_be_bytes([first[20], first[21], first[22], first[23]]);
        if (13..=21).contains(&cluster_bits) {
            first = futures::executor::block_on(meta::read_buf(&f, 0, 1 << cluster_bits))
                .map_err(|e| block_err(name, e))?;
        }
        let mut hdr = Header::parse(&first, file_size).map_err(|e| open_err(name, e))?;
        let g = Geo::new(&hdr);
        let file_align = u64::from(f.request_alignment());
        if file_align > g.cs {
            return Err(open_err(
                name,
                format!(
                    "clusters of {} bytes are smaller than the request alignment of '{}' ({file_align}); open it without cache.direct",
                    g.cs,
                    f.name()
                ),
            ));
        }
        let corrupt = hdr.incompatible & header::INCOMPAT_CORRUPT != 0;
        if corrupt && !o.read_only {
            return Err(open_err(
                name,
                "the image is marked corrupt: open it read-only (read-only=on), or repair it with 'qemu-img check -r all'",
            ));
        }
        if corrupt {
            log::warn!("node {name}: the image is marked corrupt; opened read-only");
        }

        let cs = g.cs;
        let l1_bytes = (u64::from(hdr.l1_size) * 8).div_ceil(cs) * cs;
        let l1 = if hdr.l1_size == 0 {
            Vec::new()
        } else {
            meta::decode_be64(
                &futures::executor::block_on(meta::read_buf(
                    &f,
                    hdr.l1_table_offset,
                    l1_bytes as usize,
                ))
                .map_err(|e| block_err(name, e))?,
            )
        };
        let rt_bytes = u64::from(hdr.refcount_table_clusters) * cs;
        let reftable = meta::decode_be64(
            &futures::executor::block_on(meta::read_buf(
                &f,
                hdr.refcount_table_offset,
                rt_bytes as usize,
            ))
            .map_err(|e| block_err(name, e))?,
        );
        let snapshots = if hdr.nb_snapshots > 0 {
            // Entries are at most 40 + 1024 + 2 * 65535 bytes; read what
            // the count can need, bounded by the file.
            let max = (u64::from(hdr.nb_snapshots) * 1200)
                .min(file_size.saturating_sub(hdr.snapshots_offset))
                .min(64 << 20);
            let b = futures::executor::block_on(meta::read_buf(
                &f,
                hdr.snapshots_offset,
                (max.max(512).div_ceil(4096) * 4096) as usize,
            ))
            .map_err(|e| block_err(name, e))?;
            let (s, _) =
                parse_snapshots(&b, hdr.nb_snapshots, cs).map_err(|e| open_err(name, e))?;
            s
        } else {
            Vec::new()
        };
        let snap_table_len = build::snapshot_table_len(&snapshots);

        let default_l2 = {
            let need = hdr.size.div_ceil(cs) * g.words_per_entry() as u64 * 8;
            need.clamp(cs * 2, 32 << 20)
        };
        let l2_cache = o
            .l2_cache_size
            .or(o.cache_size.map(|c| c * 3 / 4))
            .unwrap_or(default_l2);
        let rb_cache = o
            .refcount_cache_size
            .or(o.cache_size.map(|c| c / 4))
            .unwrap_or((l2_cache / 4).max(cs * 4));
        let header_io = (file_align.max(512)) as usize;
        let mut m = Meta::new(
            g,
            name,
            l1,
            hdr.l1_table_offset,
            hdr.l1_size,
            reftable,
            hdr.refcount_table_offset,
            hdr.refcount_table_clusters,
            file_size,
            l2_cache,
            rb_cache,
            header_io,
        );
        m.snap_offset = hdr.snapshots_offset;
        m.snap_len = snap_table_len;
        if hdr.nb_snapshots > 0 {
            m.fixed.push((
                hdr.snapshots_offset,
                hdr.snapshots_offset + snap_table_len,
                "the snapshot table".into(),
            ));
            for s in &snapshots {
                m.fixed.push((
                    s.l1_table_offset,
                    s.l1_table_offset + u64::from(s.l1_size) * 8,
                    format!("the L1 table of snapshot '{}'", s.id),
                ));
            }
        }

        m.backing_name_bytes = hdr.backing_file.as_ref().map(|b| b.as_bytes().to_vec());
        // Persistent bitmaps, when the header says they are consistent.
        let (loaded, on_disk) = match &hdr.bitmaps_ext {
            Some(ext) if hdr.autoclear & 1 != 0 => {
                futures::executor::block_on(bitmaps::load(&f, &m, ext, hdr.size))
                    .map_err(|e| open_err(name, format!("persistent bitmaps: {e}")))?
            }
            _ => (Vec::new(), bitmaps::OnDisk::default()),
        };
        let keep_bitmaps = !on_disk.tables.is_empty() || on_disk.dir_len > 0;
        if !o.read_only && keep_bitmaps {
            futures::executor::block_on(bitmaps::mark_in_use(&f, &on_disk))
                .map_err(|e| block_err(name, e))?;
        }

        let mut lazy = false;
        if !o.read_only {
            let dirty = hdr.incompatible & header::INCOMPAT_DIRTY != 0;
            if dirty {
                if hdr.extensions.contains(&header::EXT_BITMAPS) {
                    return Err(open_err(
                        name,
                        "the image was not closed cleanly and has persistent bitmaps: repair it with 'qemu-img check -r all'",
                    ));
                }
                log::warn!("node {name}: the image was not closed cleanly; rebuilding refcounts");
                futures::executor::block_on(build::rebuild_refcounts(&f, &hdr, &mut m, &snapshots))
                    .map_err(|e| open_err(name, format!("repairing refcounts: {e}")))?;
            }
            let mut compat = hdr.compatible;
            if let Some(want) = o.lazy_refcounts {
                if want && hdr.version < 3 {
                    return Err(open_err(
                        name,
                        "lazy refcounts need a version 3 image (compat=1.1)",
                    ));
                }
                if want {
                    compat |= header::COMPAT_LAZY_REFCOUNTS;
                } else {
                    compat &= !header::COMPAT_LAZY_REFCOUNTS;
                }
            }
            lazy = compat & header::COMPAT_LAZY_REFCOUNTS != 0;
            if hdr.version >= 3 {
                let mut incompat = hdr.incompatible & !header::INCOMPAT_DIRTY;
                if lazy {
                    incompat |= header::INCOMPAT_DIRTY;
                }
                // Autoclear bits we do not maintain (the bitmaps extension)
                // are cleared, so that their data is known to be stale.
                let mut fields = Vec::with_capacity(24);
                fields.extend_from_slice(&incompat.to_be_bytes());
                fields.extend_from_slice(&compat.to_be_bytes());
                // The bitmaps bit stays while we keep the bitmaps up to date.
                let autoclear = if keep_bitmaps { hdr.autoclear & 1 } else { 0 };
                fields.extend_from_slice(&autoclear.to_be_bytes());
                if incompat != hdr.incompatible
                    || compat != hdr.compatible
                    || autoclear != hdr.autoclear
                {
                    futures::executor::block_on(async {
                        m.write_header_field(&f, header::OFF_INCOMPAT, &fields)
                            .await?;
                        f.flush().await
                    })
                    .map_err(|e| block_err(name, e))?;
                    hdr.incompatible = incompat;
                    hdr.compatible = compat;
                    hdr.autoclear = autoclear;
                }
            }
        }
        m.lazy = lazy;
        let discard_unmap = o.discard == DiscardMode::Unmap;
        m.pass_discard = o.pass_discard_request.unwrap_or(discard_unmap);
        m.corrupt = corrupt;

        let backing = Self::open_backing(o, graph, &hdr, &f)?;
        let mut align = f.request_alignment();
        if let Some(b) = &backing {
            align = align.max(b.node().request_alignment());
        }
        Ok(Qcow2Driver {
            name: name.to_string(),
            file,
            backing: crate::block::swap::Swap::new(backing),
            g,
            size: AtomicU64::new(hdr.size),
            meta: AsyncLock::new(m),
            data_inflight: AtomicU64::new(0),
            align,
            discard_unmap: AtomicBool::new(discard_unmap),
            overlap_check: o.overlap_check != Some(OverlapCheck::None),
            backing_name: std::sync::Mutex::new(hdr.backing_file.clone()),
            header: hdr,
            snapshots: std::sync::Mutex::new(snapshots),
            lazy,
            closed: AtomicBool::new(false),
            read_only: AtomicBool::new(o.read_only),
            demoted: AtomicBool::new(false),
            loaded_bitmaps: std::sync::Mutex::new(loaded),
            stored_bitmaps: std::sync::Mutex::new(on_disk),
            node: std::sync::OnceLock::new(),
        })
    }

    fn open_backing(
        o: &Qcow2Options,
        graph: &mut Graph,
        hdr: &Header,
        f: &Node,
    ) -> Result<Option<Child>, GraphError> {
        let name = o.node_name.as_str();
        let node = match &o.backing {
            Some(None) => return Ok(None),
            Some(Some(r)) => super::open_child(graph, name, r, DiscardMode::Ignore)?,
            None => {
                let Some(bf) = &hdr.backing_file else {
                    return Ok(None);
                };
                // A backing file recorded without its format is probed, as
                // QEMU does; but its content is what a guest wrote when it
                // was a raw disk, so a probed image may name no further
                // file (QEMU would open it: a guest could make it read any
                // host file). Recording the formats fixes a real chain.
                if OPENING_PROBED.with(|p| p.get()) {
                    return Err(open_err(
                        name,
                        format!(
                            "its format was probed (the image above records no backing format), \
                             so the backing file '{bf}' its header names is not opened; \
                             record the backing formats ('qemu-img rebase -u -b FILE -F FMT')"
                        ),
                    ));
                }
                let depth = OPEN_DEPTH.with(|d| d.get());
                if depth + 1 >= MAX_CHAIN_DEPTH {
                    return Err(open_err(
                        name,
                        format!(
                            "the backing chain is deeper than {MAX_CHAIN_DEPTH} images (a loop?)"
                        ),
                    ));
                }
                let path = if bf.starts_with('/') || bf.contains(':') && !bf.contains('/') {
                    bf.clone()
                } else {
                    let own = super::file_name_of(f).unwrap_or_default();
                    let dir = std::path::Path::new(&own)
                        .parent()
                        .map(|p| p.to_path_buf())
                        .unwrap_or_default();
                    dir.join(bf).to_string_lossy().into_owned()
                };
                if !std::path::Path::new(&path).exists() {
                    return Err(open_err(
                        name,
                        format!("cannot open backing file '{path}' (from the image header): no such file"),
                    ));
                }
                let (fmt, probed) = match &hdr.backing_format {
                    Some(f) => (f.clone(), false),
                    None => (probe_format(&path), true),
                };
                let bname = format!("{name}-backing");
                let opts = backing_options(&bname, &path, &fmt).map_err(|e| open_err(name, e))?;
                OPEN_DEPTH.with(|d| d.set(depth + 1));
                let was = OPENING_PROBED.with(|p| p.replace(probed));
                let r = graph.add_implicit(&opts);
                OPENING_PROBED.with(|p| p.set(was));
                OPEN_DEPTH.with(|d| d.set(depth));
                r.map_err(|e| open_err(name, format!("backing file '{path}': {e}")))?
            }
        };
        if node.reaches(f) {
            return Err(open_err(name, "the backing node would make a loop"));
        }
        let depth = chain_depth(&node);
        if depth >= MAX_CHAIN_DEPTH {
            return Err(open_err(
                name,
                format!("the backing chain would be deeper than {MAX_CHAIN_DEPTH} images"),
            ));
        }
        // A backing node the user named (blockdev-add's `backing`) may be
        // written by its other users, as in QEMU, where a backing edge
        // shares writes when nothing above needs the data unchanged: image
        // fleecing puts an overlay on a disk the guest writes, and a
        // backup's copy-before-write keeps the overlay's view. Backing
        // files opened from a header share no writes.
        let mut shared = Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED;
        if matches!(&o.backing, Some(Some(BlockdevRef::Name(_)))) {
            shared = shared | Perm::WRITE;
        }
        Child::attach(
            name,
            ChildRole::Backing,
            node,
            Perm::CONSISTENT_READ,
            shared,
        )
        .map(Some)
    }

    pub fn file(&self) -> &Child {
        &self.file
    }

    pub fn backing(&self) -> Option<&Child> {
        self.backing.get().as_ref()
    }

    /// Gives an image without a backing node one (blockdev-snapshot). The
    /// caller holds the node's users in a drained section.
    pub fn set_backing(&self, child: Child) -> Result<(), String> {
        if self.backing().is_some() {
            return Err(format!("node '{}' already has a backing node", self.name));
        }
        self.backing.replace(Some(child));
        Ok(())
    }

    /// Undoes [`Qcow2Driver::make_read_only`] (a transaction aborted).
    pub fn make_writable(&self) {
        if self.read_only.load(Ordering::Acquire) {
            return;
        }
        self.demoted.store(false, Ordering::Release);
        self.file.set_perm(
            Perm::CONSISTENT_READ | Perm::WRITE | Perm::RESIZE,
            Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED,
        );
        if self.closed.swap(false, Ordering::AcqRel) && self.lazy {
            // Lazy refcounts: the dirty bit goes back on before writes.
            let f = self.f();
            let incompat = (self.header.incompatible | header::INCOMPAT_DIRTY).to_be_bytes();
            let r = futures::executor::block_on(async {
                let mut m = self.meta.lock().await;
                m.write_header_field(f, header::OFF_INCOMPAT, &incompat)
                    .await?;
                f.flush().await
            });
            if let Err(e) = r {
                log::error!("node {}: setting the dirty bit: {e}", self.name);
            }
        }
    }

    /// Makes the image read-only: metadata written, dirty bit cleared, the
    /// file child's write permission dropped (it becomes a backing image).
    pub fn make_read_only(&self) {
        self.demoted.store(true, Ordering::Release);
        self.close();
        self.file.set_perm(
            Perm::CONSISTENT_READ,
            Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED,
        );
    }

    /// Makes a read-only image writable: a backing image opened from an
    /// image header (`read-only`), or one made read-only by
    /// [`Qcow2Driver::make_read_only`]. block-commit writes into it, then
    /// calls `make_read_only` to turn it back into a backing image with
    /// everything written. Called inside a drained section over `node`
    /// (this driver's node). On an error nothing has changed.
    ///
    /// ```text
    ///   corrupt? dirty? -> refuse
    ///   file node read-only -> reopen its descriptor read-write
    ///   write + resize on the file: checked against the other parents
    ///     and other processes' locks, then taken
    ///   header: bitmaps marked in use, or autoclear bits cleared
    ///   node writable
    /// ```
    pub fn reopen_writable(&self, node: &Node) -> Result<(), String> {
        let opened_read_only = self.read_only.load(Ordering::Acquire);
        if !opened_read_only && !self.demoted.load(Ordering::Acquire) {
            return Ok(());
        }
        let name = &self.name;
        if futures::executor::block_on(self.meta.lock()).corrupt {
            return Err(format!(
                "node '{name}' is marked corrupt and cannot be made writable: repair the image with 'qemu-img check -r all'"
            ));
        }
        // A read-only open does not repair refcounts left stale by a crash
        // with lazy refcounts (a writable open does).
        if opened_read_only && self.header.incompatible & header::INCOMPAT_DIRTY != 0 {
            return Err(format!(
                "node '{name}' was not closed cleanly (its refcounts may be wrong) and cannot be made writable: repair the image with 'qemu-img check -r all'"
            ));
        }
        let f = self.f();
        let file_was_read_only = f.is_read_only();
        if file_was_read_only {
            let super::Driver::File(fd) = f.driver() else {
                return Err(format!(
                    "node '{name}' cannot be made writable: its file node '{}' ({}) is read-only",
                    f.name(),
                    f.driver_name()
                ));
            };
            fd.reopen_read_write(f)
                .map_err(|e| format!("node '{name}' cannot be made writable: {e}"))?;
        }
        let undo_file = || {
            if let (true, super::Driver::File(fd)) = (file_was_read_only, f.driver()) {
                if let Err(e) = fd.reopen_read_only(f) {
                    log::error!("node {name}: making the file read-only again: {e}");
                }
            }
        };
        if let Err(e) = self.take_write_perm() {
            undo_file();
            return Err(e);
        }
        if let Err(e) = futures::executor::block_on(self.prepare_first_write()) {
            self.file.set_perm(
                Perm::CONSISTENT_READ,
                Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED,
            );
            undo_file();
            return Err(format!("node '{name}' cannot be made writable: {e}"));
        }
        // Lazy refcounts stay as opened: off for an image opened read-only
        // (refcounts are written as clusters are allocated; no dirty bit).
        self.closed.store(false, Ordering::Release);
        self.demoted.store(false, Ordering::Release);
        self.read_only.store(false, Ordering::Release);
        node.set_read_only(false);
        log::info!("node {name}: reopened read-write");
        Ok(())
    }

    /// Takes write and resize permission on the file child, after checking
    /// them the way an edge being attached is checked: against what every
    /// other parent of the file node shares, and against the image locks
    /// of other processes. Restores the read-only permissions on an error.
    fn take_write_perm(&self) -> Result<(), String> {
        let f = self.f();
        let name = &self.name;
        let read = Perm::CONSISTENT_READ;
        let write = Perm::CONSISTENT_READ | Perm::WRITE | Perm::RESIZE;
        let shared = Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED;
        // The node keeps each parent's shared permissions to itself, and
        // `Child::set_perm` neither checks them nor fails on a lock it
        // cannot take. So: our edge shares everything for a moment, and a
        // probe edge asks for what the edge is to take; attaching it runs
        // the graph's permission check and takes the image locks.
        self.file.set_perm(read, Perm::ALL);
        let probe = Child::attach(
            &format!("{name} (reopen)"),
            ChildRole::File,
            self.file.node().clone(),
            write,
            shared,
        );
        let refused = match probe {
            Ok(probe) => {
                drop(probe);
                None
            }
            Err(GraphError::PermissionConflict { old_parent, .. }) => Some(format!(
                "node '{name}' cannot be made writable: '{old_parent}' uses its file node '{}' and does not share write permission on it",
                f.name()
            )),
            Err(GraphError::Open { reason, .. }) => {
                Some(format!("node '{name}' cannot be made writable: {reason}"))
            }
            Err(e) => Some(format!("node '{name}' cannot be made writable: {e}")),
        };
        if let Some(e) = refused {
            self.file.set_perm(read, shared);
            return Err(e);
        }
        self.file.set_perm(write, shared);
        // Another process may have locked the image since the probe.
        let locked = match f.driver() {
            super::Driver::File(fd) => fd
                .held_locks()
                .is_none_or(|(perm, _)| perm.contains(Perm::WRITE | Perm::RESIZE)),
            _ => true,
        };
        if !locked {
            self.file.set_perm(read, shared);
            return Err(format!(
                "node '{name}' cannot be made writable: the write lock on '{}' could not be taken (is another process using the image?)",
                f.name()
            ));
        }
        Ok(())
    }

    /// What the header needs before the first write of an image that was
    /// read-only. Persistent bitmaps we loaded are marked in use, as a
    /// writable open marks them: the node's writes keep them up to date,
    /// close stores them afresh with the autoclear bit, and a crash leaves
    /// them in use, which QEMU treats as inconsistent. Without bitmaps we
    /// keep, every autoclear bit is cleared (so QEMU knows any bitmaps in
    /// the file are stale), again as a writable open does. An image opened
    /// writable with lazy refcounts gets its dirty bit back.
    async fn prepare_first_write(&self) -> Result<(), BlockError> {
        let f = self.f();
        let mut m = self.meta.lock().await;
        let on_disk = self
            .stored_bitmaps
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let keep_bitmaps = !on_disk.tables.is_empty() || on_disk.dir_len > 0;
        if keep_bitmaps {
            bitmaps::mark_in_use(f, &on_disk).await?;
        }
        if self.header.version >= 3 {
            // From the file: close may have rewritten it since the open.
            let first = meta::read_buf(f, 0, m.header_io).await?;
            let at = OFF_AUTOCLEAR as usize;
            let now = u64::from_be_bytes(first[at..at + 8].try_into().unwrap_or([0; 8]));
            let autoclear = if keep_bitmaps { now & 1 } else { 0 };
            if autoclear != now {
                m.write_header_field(f, OFF_AUTOCLEAR, &autoclear.to_be_bytes())
                    .await?;
                f.flush().await?;
            }
        }
        if self.lazy {
            let incompat = (self.header.incompatible | header::INCOMPAT_DIRTY).to_be_bytes();
            m.write_header_field(f, header::OFF_INCOMPAT, &incompat)
                .await?;
            f.flush().await?;
        }
        Ok(())
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The backing file name the header records.
    pub fn backing_file_name(&self) -> Option<String> {
        self.backing_name
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// change-backing-file: rewrites the backing file name in the header
    /// (in place, after the header extensions, which stay as they are).
    /// The image may be a read-only backing image: the header is written
    /// through a descriptor of its own; nothing else of it changes.
    pub fn change_backing_file(&self, name: &str) -> Result<(), String> {
        use std::os::unix::fs::FileExt;
        if name.len() > header::MAX_BACKING_NAME as usize {
            return Err("the backing file name is too long".into());
        }
        // No header field update of ours may interleave.
        let mut meta_guard = futures::executor::block_on(self.meta.lock());
        meta_guard.backing_name_bytes = (!name.is_empty()).then(|| name.as_bytes().to_vec());
        let (file, hdr) = self.header_cluster()?;
        // Where the extensions end: the name goes right after them.
        let off = self.extension_end(&hdr);
        if name.is_empty() {
            let mut f = [0u8; 12];
            f[..8].copy_from_slice(&0u64.to_be_bytes());
            file.write_all_at(&f, 8).map_err(|e| e.to_string())?;
        } else {
            if off + name.len() > hdr.len() {
                return Err("the backing file name does not fit in the header cluster".into());
            }
            file.write_all_at(name.as_bytes(), off as u64)
                .map_err(|e| e.to_string())?;
            file.sync_data().map_err(|e| e.to_string())?;
            let mut f = Vec::with_capacity(12);
            f.extend_from_slice(&(off as u64).to_be_bytes());
            f.extend_from_slice(&(name.len() as u32).to_be_bytes());
            file.write_all_at(&f, 8).map_err(|e| e.to_string())?;
        }
        file.sync_data().map_err(|e| e.to_string())?;
        *self.backing_name.lock().unwrap_or_else(|e| e.into_inner()) =
            (!name.is_empty()).then(|| name.to_string());
        Ok(())
    }

    /// The internal snapshots, as the snapshot table lists them.
    pub fn snapshots(&self) -> Vec<Snapshot> {
        self.lock_snapshots().clone()
    }

    fn lock_snapshots(&self) -> std::sync::MutexGuard<'_, Vec<Snapshot>> {
        self.snapshots.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn cluster_size(&self) -> u64 {
        self.g.cs
    }

    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Relaxed)
    }

    pub fn request_alignment(&self) -> u32 {
        self.align
    }

    fn f(&self) -> &Node {
        self.file.node()
    }

    fn io_done(&self) {
        self.data_inflight.fetch_sub(1, Ordering::AcqRel);
    }

    fn no_io(&self) -> bool {
        self.data_inflight.load(Ordering::Acquire) == 0
    }

    async fn corrupt(&self, m: &mut Meta, node: &Node, reason: String) -> BlockError {
        if !m.corrupt {
            m.corrupt = true;
            log::error!(
                "node {}: image is corrupt: {reason}; no more writes",
                self.name
            );
            node.set_read_only(true);
            crate::events::global().emit(
                "BLOCK_IMAGE_CORRUPTED",
                serde_json::json!({
                    "device": "",
                    "node-name": self.name,
                    "msg": reason,
                    "fatal": true,
                }),
            );
            // Mark the image corrupt on disk, best effort.
            if self.header.version >= 3 {
                let f = self.f();
                let incompat = (self.header.incompatible | header::INCOMPAT_CORRUPT).to_be_bytes();
                if m.write_header_field(f, header::OFF_INCOMPAT, &incompat)
                    .await
                    .is_ok()
                {
                    let _ = f.flush().await;
                }
            }
        }
        m.corrupt_err(reason)
    }

    /// The extent at guest offset `pos`: what it reads as, and how many
    /// bytes (at most `want`) read the same way from consecutive places.
    async fn map(&self, m: &mut Meta, pos: u64, want: u64) -> Result<(Sc, u64), BlockError> {
        let g = self.g;
        let gc = pos >> g.cluster_bits;
        let (e, b, _) = m.entry(self.f(), gc).await?;
        let in_c = pos & (g.cs - 1);
        let i = in_c >> g.sc_bits;
        let st = meta::sc_state(&g, e, b, i).map_err(|r| m.corrupt_err(r))?;
        let mut n = ((i + 1) << g.sc_bits) - in_c;
        if let Sc::Compressed(_) = st {
            return Ok((st, (g.cs - in_c).min(want)));
        }
        // Extend over the following subclusters while they read the same
        // way (contiguous on the host for data), within this L2 table.
        let mut next = pos + n;
        while n < want {
            let ngc = next >> g.cluster_bits;
            if ngc >> g.l2_bits != gc >> g.l2_bits {
                break;
            }
            let (ne, nb) = if ngc == gc {
                (e, b)
            } else {
                let (ne, nb, _) = m.entry(self.f(), ngc).await?;
                (ne, nb)
            };
            let ni = (next & (g.cs - 1)) >> g.sc_bits;
            let nst = meta::sc_state(&g, ne, nb, ni).map_err(|r| m.corrupt_err(r))?;
            let same = match (st, nst) {
                (Sc::Data(h), Sc::Data(nh)) => nh == h + n,
                (Sc::Zero, Sc::Zero) | (Sc::Unallocated, Sc::Unallocated) => true,
                _ => false,
            };
            if !same {
                break;
            }
            n += g.sc_size();
            next += g.sc_size();
        }
        Ok((st, n.min(want)))
    }

    /// Reads `part` (guest bytes at `pos`) as the extent state `st` says.
    async fn read_extent(&self, st: Sc, pos: u64, part: &IoVecs) -> Result<(), BlockError> {
        match st {
            Sc::Data(h) => {
                let in_sc = pos & (self.g.sc_size() - 1);
                self.f().preadv(h + in_sc, part).await
            }
            Sc::Zero => {
                part.fill_zero();
                Ok(())
            }
            Sc::Unallocated => self.read_backing(pos, part).await,
            Sc::Compressed(entry) => self.read_compressed(entry, pos, part).await,
        }
    }

    async fn read_backing(&self, pos: u64, part: &IoVecs) -> Result<(), BlockError> {
        let Some(b) = self.backing() else {
            part.fill_zero();
            return Ok(());
        };
        let bsize = b.node().size();
        if pos >= bsize {
            part.fill_zero();
            return Ok(());
        }
        let n = part.len().min(bsize - pos);
        if n == part.len() {
            return b.node().preadv(pos, part).await;
        }
        b.node().preadv(pos, &part.head(n)).await?;
        part.tail(n).fill_zero();
        Ok(())
    }

    async fn read_compressed(&self, entry: u64, pos: u64, part: &IoVecs) -> Result<(), BlockError> {
        let g = self.g;
        let (off, len) = g.compressed(entry);
        let a = u64::from(self.f().request_alignment()).max(512);
        let start = off / a * a;
        let end = (off + len).div_ceil(a) * a;
        let raw = meta::read_buf(self.f(), start, (end - start) as usize).await?;
        let input = &raw[(off - start) as usize..(off - start + len) as usize];
        let mut out = vec![0u8; g.cs as usize];
        let mut z = flate2::Decompress::new(false);
        let r = z.decompress(input, &mut out, flate2::FlushDecompress::Finish);
        let ok = matches!(
            r,
            Ok(flate2::Status::StreamEnd) | Ok(flate2::Status::Ok) | Ok(flate2::Status::BufError)
        );
        if !ok || z.total_out() != g.cs {
            return Err(BlockError::Corrupt {
                node: self.name.clone(),
                reason: format!("compressed cluster at {off:#x} does not inflate to a cluster"),
            });
        }
        let in_c = (pos & (g.cs - 1)) as usize;
        part.copy_from(&out[in_c..in_c + part.len() as usize]);
        Ok(())
    }

    pub async fn preadv(&self, offset: u64, iov: &IoVecs) -> Result<(), BlockError> {
        let len = iov.len();
        let mut done = 0;
        while done < len {
            let pos = offset + done;
            let (st, n) = {
                let mut m = self.meta.lock().await;
                let r = self.map(&mut m, pos, len - done).await?;
                if matches!(r.0, Sc::Data(_) | Sc::Compressed(_)) {
                    self.data_inflight.fetch_add(1, Ordering::AcqRel);
                }
                r
            };
            let uses_host = matches!(st, Sc::Data(_) | Sc::Compressed(_));
            let part = if done == 0 && n == len {
                iov.clone()
            } else {
                iov.sub(done, n)
            };
            let r = self.read_extent(st, pos, &part).await;
            if uses_host {
                self.io_done();
            }
            r?;
            done += n;
        }
        Ok(())
    }

    /// Whether guest bytes `[pos, pos + n)` (in one cluster) can be written
    /// in place: their subclusters hold data in a cluster only this image
    /// uses. Returns the host offset of `pos`.
    fn in_place(&self, e: u64, b: u64, pos: u64, n: u64) -> Option<u64> {
        let g = self.g;
        if e & COMPRESSED != 0 || e & COPIED == 0 {
            return None;
        }
        let host = e & header::OFFSET_MASK;
        if host == 0 {
            return None;
        }
        let in_c = pos & (g.cs - 1);
        if !g.extended {
            return (e & ZERO == 0).then_some(host + in_c);
        }
        let first = in_c >> g.sc_bits;
        let last = (in_c + n - 1) >> g.sc_bits;
        let mask = ((1u64 << (last - first + 1)) - 1) << first;
        (b & mask == mask).then_some(host + in_c)
    }

    pub async fn pwritev(
        &self,
        node: &Node,
        offset: u64,
        iov: &IoVecs,
        fua: bool,
    ) -> Result<(), BlockError> {
        let len = iov.len();
        let mut done = 0;
        let mut allocated = false;
        while done < len {
            let (n, alloc) = self
                .write_some(node, offset + done, iov, done, len - done, fua)
                .await?;
            allocated |= alloc;
            done += n;
        }
        if fua && allocated {
            self.flush().await?;
        }
        Ok(())
    }

    /// Waits while guest cluster `gc` has an allocating write in flight.
    /// Returns the lock when it is free of one.
    async fn lock_idle_cluster(&self, gc: u64) -> lock::AsyncLockGuard<'_, Meta> {
        loop {
            let mut m = self.meta.lock().await;
            let Some(waiters) = m.busy.get_mut(&gc) else {
                return m;
            };
            let (notifier, wait) = lock::signal();
            waiters.push(notifier);
            drop(m);
            wait.await;
        }
    }

    async fn check_overlap(
        &self,
        m: &mut Meta,
        node: &Node,
        host: u64,
        n: u64,
    ) -> Result<(), BlockError> {
        if !self.overlap_check {
            return Ok(());
        }
        if let Some(what) = m.overlap(host, n) {
            let reason = format!("a data write at {host:#x} would overwrite {what}");
            return Err(self.corrupt(m, node, reason).await);
        }
        Ok(())
    }

    /// Writes some of the request (`iov` from `skip`, at guest `pos`):
    /// a run of in-place clusters, or one cluster that needs allocation.
    /// Returns the bytes written and whether metadata changed.
    async fn write_some(
        &self,
        node: &Node,
        pos: u64,
        iov: &IoVecs,
        skip: u64,
        want: u64,
        fua: bool,
    ) -> Result<(u64, bool), BlockError> {
        let g = self.g;
        let gc = pos >> g.cluster_bits;
        let in_c = pos & (g.cs - 1);
        let n = want.min(g.cs - in_c);
        let mut m = self.lock_idle_cluster(gc).await;
        if m.corrupt {
            return Err(m.corrupt_err("the image is marked corrupt"));
        }
        let (e, b, _) = m.entry(self.f(), gc).await?;
        if let Some(host) = self.in_place(e, b, pos, n) {
            // Extend over following clusters that are in place and
            // contiguous on the host.
            let mut total = n;
            while total < want {
                let ngc = (pos + total) >> g.cluster_bits;
                if ngc >> g.l2_bits != gc >> g.l2_bits || m.busy.contains_key(&ngc) {
                    break;
                }
                let (ne, nb, _) = m.entry(self.f(), ngc).await?;
                let nn = (want - total).min(g.cs);
                match self.in_place(ne, nb, pos + total, nn) {
                    Some(h) if h == host + total => total += nn,
                    _ => break,
                }
            }
            self.check_overlap(&mut m, node, host, total).await?;
            self.data_inflight.fetch_add(1, Ordering::AcqRel);
            drop(m);
            let part = if skip == 0 && total == iov.len() {
                iov.clone()
            } else {
                iov.sub(skip, total)
            };
            let r = self.f().pwritev(host, &part, fua).await;
            self.io_done();
            return r.map(|()| (total, false));
        }

        // Allocation (or filling subclusters of a cluster we own).
        let l2off = m.l2_for_write(self.f(), gc).await?;
        let (e, b) = m.entry_in(l2off, gc);
        let old_host = e & header::OFFSET_MASK;
        let compressed = e & COMPRESSED != 0;
        let reuse = !compressed && old_host != 0 && e & COPIED != 0;
        let moving = !reuse && (old_host != 0 || compressed);
        let (a, z) = if !g.extended || moving {
            (0, g.cs)
        } else {
            (
                in_c >> g.sc_bits << g.sc_bits,
                (in_c + n).div_ceil(g.sc_size()) << g.sc_bits,
            )
        };
        let end_before = m.end_cluster;
        let host = if reuse {
            old_host
        } else {
            m.alloc(self.f(), 1).await?
        };
        self.check_overlap(&mut m, node, host, g.cs).await?;
        if !reuse && host + g.cs > m.prealloc_end {
            // Grow the file ahead of the allocations, in steps: a write
            // that extends the file is far slower (ext4 serialises them).
            let end = (host + g.cs).max(m.prealloc_end + PREALLOC_STEP.max(g.cs));
            let from = m.prealloc_end.max(host);
            if let Err(e) = super::preallocate(self.f(), from, end - from).await {
                let _ = m
                    .update_refcount(self.f(), host >> g.cluster_bits, -1, (0, 0))
                    .await;
                return Err(e);
            }
            m.prealloc_end = end;
        }
        m.busy.insert(gc, Vec::new());
        self.data_inflight.fetch_add(1, Ordering::AcqRel);
        drop(m);

        let base = gc << g.cluster_bits;
        // A cluster past everything the file ever held reads as zeroes
        // already: when the fill would be zeroes too (nothing mapped, no
        // backing data there), write the guest's bytes alone.
        let fresh = !reuse
            && host >> g.cluster_bits >= end_before
            && old_host == 0
            && !compressed
            && self.backing().is_none_or(|bk| base >= bk.node().size());
        let result = async {
            if fresh {
                let part = if skip == 0 && n == iov.len() {
                    iov.clone()
                } else {
                    iov.sub(skip, n)
                };
                return self.f().pwritev(host + in_c, &part, fua).await;
            }
            let mut parts = Vec::with_capacity(3);
            if a < in_c {
                parts.push(self.read_old(e, b, base + a, in_c - a).await?);
            }
            parts.push(iov.sub(skip, n));
            if in_c + n < z {
                parts.push(self.read_old(e, b, base + in_c + n, z - in_c - n).await?);
            }
            let data = IoVecs::concat(parts);
            self.f().pwritev(host + a, &data, fua).await
        }
        .await;

        let mut m = self.meta.lock().await;
        let commit = async {
            result?;
            let l2off = m.l2_for_write(self.f(), gc).await?;
            let (ce, cb) = m.entry_in(l2off, gc);
            let (entry, bitmap) = if g.extended {
                let bits = if moving {
                    // Every subcluster now holds data in the new cluster.
                    u32::MAX as u64
                } else {
                    let first = a >> g.sc_bits;
                    let count = (z - a) >> g.sc_bits;
                    (((1u64 << count) - 1) << first) | (cb & 0xffff_ffff)
                };
                let zero = (cb >> 32) & !bits;
                let _ = ce;
                (host | COPIED, bits | (zero << 32))
            } else {
                (host | COPIED, 0)
            };
            m.set_entry(l2off, gc, entry, bitmap);
            if moving {
                if compressed {
                    for c in m.compressed_clusters(e) {
                        m.queue_unref(c);
                    }
                } else {
                    m.queue_unref(old_host >> g.cluster_bits);
                }
            }
            Ok::<(), BlockError>(())
        }
        .await;
        if commit.is_err() && !reuse {
            // Nothing points at the new cluster: give it back.
            let _ = m
                .update_refcount(self.f(), host >> g.cluster_bits, -1, (0, 0))
                .await;
        }
        m.busy.remove(&gc);
        self.io_done();
        drop(m);
        commit.map(|()| (n, true))
    }

    /// Guest bytes `[pos, pos + len)` of one cluster as the old entry
    /// `(e, b)` has them, in a new buffer.
    async fn read_old(&self, e: u64, b: u64, pos: u64, len: u64) -> Result<IoVecs, BlockError> {
        let g = self.g;
        let (buf, _view) = IoVecs::bounce(len as usize, 4096);
        let mut done = 0;
        while done < len {
            let p = pos + done;
            let i = (p & (g.cs - 1)) >> g.sc_bits;
            let st = meta::sc_state(&g, e, b, i).map_err(|r| BlockError::Corrupt {
                node: self.name.clone(),
                reason: r,
            })?;
            let n = (((i + 1) << g.sc_bits) - (p & (g.cs - 1))).min(len - done);
            let part = buf.sub(done, n);
            self.read_extent(st, p, &part).await?;
            done += n;
        }
        Ok(buf)
    }

    /// Writes dirty metadata under the lock, then syncs the file without
    /// it, so that guest I/O on other queues goes on during the fsync.
    pub async fn flush(&self) -> Result<(), BlockError> {
        let covered = self.meta.lock().await.write_tables(self.f()).await?;
        self.f().flush().await?;
        let mut m = self.meta.lock().await;
        m.unrefs_durable(covered);
        let no_io = self.no_io();
        m.apply_unrefs(self.f(), no_io).await
    }

    /// Makes guest cluster `gc` read as zeroes (or unallocated with
    /// `unallocate`) in metadata alone.
    async fn zero_cluster(
        &self,
        gc: u64,
        keep_host: bool,
        unallocate: bool,
    ) -> Result<(), BlockError> {
        let g = self.g;
        let mut m = self.lock_idle_cluster(gc).await;
        if m.corrupt {
            return Err(m.corrupt_err("the image is marked corrupt"));
        }
        let (e, b, l2) = m.entry(self.f(), gc).await?;
        if l2 == 0 && unallocate {
            return Ok(());
        }
        let _ = b;
        let l2off = m.l2_for_write(self.f(), gc).await?;
        let old_host = e & header::OFFSET_MASK;
        let compressed = e & COMPRESSED != 0;
        let keep = keep_host && !compressed && old_host != 0 && e & COPIED != 0;
        let (entry, bitmap) = match (g.extended, unallocate) {
            (false, true) => (0, 0),
            (false, false) if keep => (old_host | COPIED | ZERO, 0),
            (false, false) => (ZERO, 0),
            (true, true) => (0, 0),
            (true, false) if keep => (old_host | COPIED, (u32::MAX as u64) << 32),
            (true, false) => (0, (u32::MAX as u64) << 32),
        };
        m.set_entry(l2off, gc, entry, bitmap);
        if !keep {
            if compressed {
                for c in m.compressed_clusters(e) {
                    m.queue_unref(c);
                }
            } else if old_host != 0 {
                m.queue_unref(old_host >> g.cluster_bits);
            }
        }
        Ok(())
    }

    pub async fn pwrite_zeroes(
        &self,
        node: &Node,
        offset: u64,
        len: u64,
        may_unmap: bool,
        fua: bool,
    ) -> Result<(), BlockError> {
        let g = self.g;
        let may_unmap = may_unmap && self.discard_unmap.load(Ordering::Relaxed);
        let mut done = 0;
        let mut meta_changed = false;
        while done < len {
            let pos = offset + done;
            let in_c = pos & (g.cs - 1);
            let n = (len - done).min(g.cs - in_c);
            let whole = in_c == 0 && n == g.cs;
            if whole && g.version >= 3 {
                self.zero_cluster(pos >> g.cluster_bits, !may_unmap, false)
                    .await?;
                meta_changed = true;
            } else if whole && self.backing().is_none() && may_unmap {
                self.zero_cluster(pos >> g.cluster_bits, false, true)
                    .await?;
                meta_changed = true;
            } else {
                let (buf, _v) = IoVecs::bounce(n as usize, 4096);
                let mut d = 0;
                while d < n {
                    let (w, alloc) = self.write_some(node, pos + d, &buf, d, n - d, fua).await?;
                    meta_changed |= alloc;
                    d += w;
                }
            }
            done += n;
        }
        if fua && meta_changed {
            self.flush().await?;
        }
        Ok(())
    }

    pub async fn pdiscard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        if !self.discard_unmap.load(Ordering::Relaxed) {
            return Ok(());
        }
        let g = self.g;
        // Only whole clusters are discarded; partial ones are left as they
        // are (a discard is advisory).
        let first = offset.div_ceil(g.cs);
        let end = (offset + len) >> g.cluster_bits;
        for gc in first..end {
            if self.backing().is_some() {
                if g.version < 3 {
                    // Unallocating would expose the backing file.
                    return Ok(());
                }
                self.zero_cluster(gc, false, false).await?;
            } else {
                self.zero_cluster(gc, false, true).await?;
            }
        }
        Ok(())
    }

    /// Block status of guest `[offset, offset + len)` from its start: what
    /// the first extent is, how long, at which depth of the chain.
    pub async fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus, BlockError> {
        let (st, n) = {
            let mut m = self.meta.lock().await;
            self.map(&mut m, offset, len).await?
        };
        Ok(match st {
            Sc::Data(_) | Sc::Compressed(_) => BlockStatus {
                kind: Allocation::Data,
                len: n,
                depth: 0,
            },
            Sc::Zero => BlockStatus {
                kind: Allocation::Zero,
                len: n,
                depth: 0,
            },
            Sc::Unallocated => match self.backing() {
                None => BlockStatus {
                    kind: Allocation::Unallocated,
                    len: n,
                    depth: 0,
                },
                Some(b) => {
                    let bsize = b.node().size();
                    if offset >= bsize {
                        BlockStatus {
                            kind: Allocation::Unallocated,
                            len: n,
                            depth: 0,
                        }
                    } else {
                        let mut s = b.node().block_status(offset, n.min(bsize - offset)).await?;
                        s.depth += 1;
                        s
                    }
                }
            },
        })
    }

    /// block_resize: grows the image (shrinking is refused).
    pub fn truncate(&self, node: &Node, size: u64) -> Result<(), String> {
        let g = self.g;
        let old = self.size();
        if size < old {
            return Err(format!(
                "shrinking a qcow2 image ({old} -> {size} bytes) is not supported"
            ));
        }
        if size % 512 != 0 {
            return Err(format!("size {size} is not a multiple of 512"));
        }
        if size > header::MAX_IMAGE_SIZE {
            return Err(format!("size {size} is too large"));
        }
        if size == old {
            return Ok(());
        }
        let entries = size.div_ceil(g.cs).div_ceil(g.l2_entries());
        let f = self.f();
        futures::executor::block_on(async {
            let mut m = self.meta.lock().await;
            if m.corrupt {
                return Err(m.corrupt_err("the image is marked corrupt"));
            }
            if entries > u64::from(m.l1_size) {
                m.grow_l1(f, entries, size).await?;
            } else {
                m.flush(f, false).await?;
                m.write_header_field(f, header::OFF_SIZE, &size.to_be_bytes())
                    .await?;
                f.flush().await?;
            }
            Ok(())
        })
        .map_err(|e: BlockError| e.to_string())?;
        self.size.store(size, Ordering::Relaxed);
        // A backing file longer than the old size must not show through the
        // new area.
        if let Some(b) = self.backing() {
            let bsize = b.node().size();
            if bsize > old {
                let end = bsize.min(size);
                futures::executor::block_on(self.zero_range_meta(node, old, end - old))
                    .map_err(|e| e.to_string())?;
            }
        }
        Ok(())
    }

    async fn zero_range_meta(&self, node: &Node, offset: u64, len: u64) -> Result<(), BlockError> {
        let g = self.g;
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let in_c = pos & (g.cs - 1);
            let n = (end - pos).min(g.cs - in_c);
            if in_c == 0 && n == g.cs && g.version >= 3 {
                self.zero_cluster(pos >> g.cluster_bits, false, false)
                    .await?;
            } else {
                let (buf, _v) = IoVecs::bounce(n as usize, 4096);
                let mut d = 0;
                while d < n {
                    let (w, _) = self
                        .write_some(node, pos + d, &buf, d, n - d, false)
                        .await?;
                    d += w;
                }
            }
            pos += n;
        }
        self.flush().await
    }

    /// Writes everything, clears the dirty bit we set, and stops writes.
    pub fn close(&self) {
        if self.read_only.load(Ordering::Acquire) || self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        let f = self.f();
        let r = futures::executor::block_on(async {
            let mut m = self.meta.lock().await;
            if m.corrupt {
                return Ok(());
            }
            m.flush_all(f, self.no_io()).await?;
            let persistent: Vec<Arc<crate::block::bitmap::DirtyBitmap>> = self
                .node
                .get()
                .and_then(|w| w.upgrade())
                .map(|n| {
                    n.bitmaps()
                        .iter()
                        .filter(|b| b.is_persistent())
                        .cloned()
                        .collect()
                })
                .unwrap_or_default();
            let old = self
                .stored_bitmaps
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            let new = bitmaps::store(f, &mut m, &self.header, &persistent, &old).await?;
            *self
                .stored_bitmaps
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = new;
            if self.lazy {
                let incompat = self.header.incompatible & !header::INCOMPAT_DIRTY;
                m.write_header_field(f, header::OFF_INCOMPAT, &incompat.to_be_bytes())
                    .await?;
                f.flush().await?;
            }
            Ok::<(), BlockError>(())
        });
        if let Err(e) = r {
            log::error!("node {}: closing: {e}", self.name);
        }
    }

    /// Links the driver to its node (for storing the node's persistent
    /// bitmaps at close) and hands over the bitmaps read at open.
    pub fn attach_node(&self, node: &Arc<Node>) -> Vec<Arc<crate::block::bitmap::DirtyBitmap>> {
        let _ = self.node.set(Arc::downgrade(node));
        std::mem::take(
            &mut *self
                .loaded_bitmaps
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        )
    }

    /// Whether persistent bitmaps can be stored here.
    pub fn can_store_bitmaps(&self) -> bool {
        self.header.version >= 3 && !self.is_read_only()
    }

    /// Opened read-only, or made read-only since.
    pub fn is_read_only(&self) -> bool {
        self.read_only.load(Ordering::Acquire) || self.demoted.load(Ordering::Acquire)
    }

    pub fn is_lazy(&self) -> bool {
        self.lazy
    }
}

/// How many images are in the chain starting at `node` (following
/// backing children).
pub fn chain_depth(node: &Node) -> u32 {
    let mut depth = 1;
    let mut cur = node
        .children()
        .iter()
        .find(|c| c.role() == ChildRole::Backing)
        .map(|c| c.node().clone());
    while let Some(n) = cur {
        depth += 1;
        if depth > MAX_CHAIN_DEPTH + 1 {
            break;
        }
        cur = n
            .children()
            .iter()
            .find(|c| c.role() == ChildRole::Backing)
            .map(|c| c.node().clone());
    }
    depth
}
