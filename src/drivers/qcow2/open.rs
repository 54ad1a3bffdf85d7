//! Opening an image (QEMU's qcow2_do_open): the file child attached, the
//! header read and checked, the L1 and refcount tables and the snapshot
//! table read, the metadata caches sized, persistent bitmaps loaded, the
//! header made ready for writes, then the backing chain opened (from
//! `backing`, or from the file name the header records).

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64};

use super::lock::AsyncLock;
use super::meta::{self, Geo, Meta};
use super::{
    bitmaps, build, header, parse_snapshots, Header, OverlapCheck, Qcow2Driver, Qcow2Options,
    Snapshot, MAX_CHAIN_DEPTH,
};
use crate::block::{BlockError, Child, ChildRole, Graph, GraphError, Node, Perm};
use crate::drivers::{BlockdevOptions, BlockdevRef, DiscardMode};

thread_local! {
    /// Depth of the backing chain being opened on this thread.
    static OPEN_DEPTH: Cell<u32> = const { Cell::new(0) };
    /// The image being opened on this thread is a backing image whose
    /// format was probed from its content.
    static OPENING_PROBED: Cell<bool> = const { Cell::new(false) };
}

fn open_err(node: &str, reason: impl Into<String>) -> GraphError {
    GraphError::Open {
        node: node.to_string(),
        reason: reason.into(),
    }
}

fn block_err(node: &str, e: BlockError) -> GraphError {
    // With the system's words for an I/O error ("...: Input/output error").
    match &e {
        BlockError::Io { source, .. } => {
            open_err(node, format!("{e}: {}", crate::block::os_text(source)))
        }
        _ => open_err(node, e.to_string()),
    }
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
    /// Opens the image of `o.file` (QEMU's qcow2_do_open), step by step.
    pub fn open(o: &Qcow2Options, graph: &mut Graph) -> Result<Self, GraphError> {
        let name = o.node_name.as_str();
        if let Some(fmt) = o.encrypt.as_ref().and_then(|e| e.format.as_deref()) {
            if fmt != "luks" {
                return Err(GraphError::Open {
                    node: name.to_string(),
                    reason: format!("encrypt.format '{fmt}' is not supported (only luks)"),
                });
            }
        }
        let secret = match o.encrypt.as_ref().and_then(|e| e.key_secret.as_deref()) {
            Some(id) => Some(crate::drivers::luks::secret_of(graph, Some(id)).map_err(
                |reason| GraphError::Open {
                    node: name.to_string(),
                    reason,
                },
            )?),
            None => None,
        };
        let file = attach_file(o, graph)?;
        let f = file.node().clone();
        // An inactive open (QEMU's BDRV_O_INACTIVE) reads and writes
        // nothing it does not need: the header is not prepared for
        // writes, persistent bitmaps are not loaded (activation does both).
        let active = crate::drivers::opening_active();
        let Loaded {
            hdr,
            g,
            m,
            snapshots,
            bitmaps: (loaded, on_disk),
            lazy,
        } = load(o, &f, active)?;
        let discard_unmap = o.discard == DiscardMode::Unmap;
        let crypto = match (hdr.crypto_ext, &secret) {
            (None, _) => None,
            (Some(_), None) => {
                return Err(GraphError::Open {
                    node: name.to_string(),
                    reason: "Parameter 'encrypt.key-secret' is required for cipher".into(),
                })
            }
            (Some((off, _)), Some(s)) => Some(
                futures::executor::block_on(crate::drivers::luks::Volume::unlock(
                    &f,
                    off,
                    s.bytes(),
                ))
                .map_err(|reason| GraphError::Open {
                    node: name.to_string(),
                    reason,
                })?,
            ),
        };
        let backing = Self::open_backing(o, graph, &hdr, &f)?;
        let mut align = f.request_alignment();
        if crypto.is_some() {
            align = align.max(crate::drivers::luks::format::SECTOR as u32);
        }
        if let Some(b) = &backing {
            align = align.max(b.node().request_alignment());
        }
        Ok(Qcow2Driver {
            name: name.to_string(),
            crypto,
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
            header: crate::block::swap::Swap::new(hdr),
            snapshots: std::sync::Mutex::new(snapshots),
            lazy: AtomicBool::new(lazy),
            closed: AtomicBool::new(false),
            read_only: AtomicBool::new(o.read_only),
            demoted: AtomicBool::new(false),
            loaded_bitmaps: std::sync::Mutex::new(loaded),
            stored_bitmaps: std::sync::Mutex::new(on_disk),
            node: std::sync::OnceLock::new(),
            opts: o.clone(),
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
            Some(Some(r)) => {
                crate::drivers::open_child(graph, name, "backing", r, DiscardMode::Ignore)?
            }
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
                    let own = crate::drivers::file_name_of(f).unwrap_or_default();
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
        let depth = 1 + node.backing_depth();
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
}

/// What an open (or an activation) reads from the image.
pub(super) struct Loaded {
    pub hdr: Header,
    pub g: Geo,
    pub m: Meta,
    pub snapshots: Vec<Snapshot>,
    pub bitmaps: (
        Vec<std::sync::Arc<crate::block::bitmap::DirtyBitmap>>,
        bitmaps::OnDisk,
    ),
    pub lazy: bool,
}

/// Reads the image's metadata from `f` (QEMU's qcow2_do_open after the
/// file is open): header, L1 and refcount tables, snapshot table,
/// persistent bitmaps; a writable `active` open also prepares the header
/// for writes (dirty repair, lazy refcounts, bitmaps marked in use).
pub(super) fn load(o: &Qcow2Options, f: &Node, active: bool) -> Result<Loaded, GraphError> {
    let name = o.node_name.as_str();
    let file_size = f.size();
    let mut hdr = read_header(name, f, file_size)?;
    let g = Geo::new(&hdr);
    let file_align = u64::from(f.request_alignment());
    let corrupt = check_openable(o, f, &hdr, &g)?;
    let tables = read_tables(name, f, &hdr, g.cs)?;
    let snapshots = read_snapshots(name, f, &hdr, file_size, g.cs)?;
    let mut m = new_meta(o, &hdr, g, tables, file_size, file_align, &snapshots);

    m.backing_name_bytes = hdr.backing_file.as_ref().map(|b| b.as_bytes().to_vec());
    // Persistent bitmaps, when the header says they are consistent.
    let (loaded, on_disk) = match &hdr.bitmaps_ext {
        Some(ext) if active && hdr.autoclear & 1 != 0 => {
            futures::executor::block_on(bitmaps::load(f, &m, ext, hdr.size))
                .map_err(|e| open_err(name, format!("persistent bitmaps: {e}")))?
        }
        _ => (Vec::new(), bitmaps::OnDisk::default()),
    };
    let keep_bitmaps = !on_disk.tables.is_empty() || on_disk.dir_len > 0;
    let writes = active && !o.read_only;
    if writes && keep_bitmaps {
        futures::executor::block_on(bitmaps::mark_in_use(f, &on_disk))
            .map_err(|e| block_err(name, e))?;
    }

    let lazy = if writes {
        prepare_header_for_writes(o, f, &mut hdr, &mut m, &snapshots, keep_bitmaps)?
    } else {
        false
    };
    m.lazy = lazy;
    let discard_unmap = o.discard == DiscardMode::Unmap;
    m.pass_discard = o.pass_discard_request.unwrap_or(discard_unmap);
    m.corrupt = corrupt;
    Ok(Loaded {
        hdr,
        g,
        m,
        snapshots,
        bitmaps: (loaded, on_disk),
        lazy,
    })
}

/// Opens the file child and attaches it with a format's permissions.
fn attach_file(o: &Qcow2Options, graph: &mut Graph) -> Result<Child, GraphError> {
    let name = o.node_name.as_str();
    let child = crate::drivers::open_child(graph, name, "file", &o.file, o.discard)?;
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
    Child::attach(name, ChildRole::File, child, perm, shared)
}

/// Reads and parses the header.
fn read_header(name: &str, f: &Node, file_size: u64) -> Result<Header, GraphError> {
    let mut first =
        futures::executor::block_on(meta::read_buf(f, 0, 4096)).map_err(|e| block_err(name, e))?;
    // The whole first cluster before parsing: extensions and the
    // backing file name may lie anywhere in it.
    let cluster_bits = u32::from_be_bytes([first[20], first[21], first[22], first[23]]);
    if (13..=21).contains(&cluster_bits) {
        first = futures::executor::block_on(meta::read_buf(f, 0, 1 << cluster_bits))
            .map_err(|e| block_err(name, e))?;
    }
    Header::parse(&first, file_size).map_err(|e| open_err(name, e))
}

/// Refuses clusters smaller than the file's request alignment and a
/// writable open of an image marked corrupt. Returns whether it is.
fn check_openable(o: &Qcow2Options, f: &Node, hdr: &Header, g: &Geo) -> Result<bool, GraphError> {
    let name = o.node_name.as_str();
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
    Ok(corrupt)
}

/// Reads the L1 table and the refcount table, in that order.
fn read_tables(
    name: &str,
    f: &Node,
    hdr: &Header,
    cs: u64,
) -> Result<(Vec<u64>, Vec<u64>), GraphError> {
    let l1_bytes = (u64::from(hdr.l1_size) * 8).div_ceil(cs) * cs;
    let l1 = if hdr.l1_size == 0 {
        Vec::new()
    } else {
        meta::decode_be64(
            &futures::executor::block_on(meta::read_buf(f, hdr.l1_table_offset, l1_bytes as usize))
                .map_err(|e| block_err(name, e))?,
        )
    };
    let rt_bytes = u64::from(hdr.refcount_table_clusters) * cs;
    f.debug_event(crate::block::DebugEvent::ReftableLoad);
    let reftable = meta::decode_be64(
        &futures::executor::block_on(meta::read_buf(
            f,
            hdr.refcount_table_offset,
            rt_bytes as usize,
        ))
        .map_err(|e| block_err(name, e))?,
    );
    Ok((l1, reftable))
}

/// Reads the snapshot table.
fn read_snapshots(
    name: &str,
    f: &Node,
    hdr: &Header,
    file_size: u64,
    cs: u64,
) -> Result<Vec<Snapshot>, GraphError> {
    if hdr.nb_snapshots == 0 {
        return Ok(Vec::new());
    }
    // Entries are at most 40 + 1024 + 2 * 65535 bytes; read what
    // the count can need, bounded by the file.
    let max = (u64::from(hdr.nb_snapshots) * 1200)
        .min(file_size.saturating_sub(hdr.snapshots_offset))
        .min(64 << 20);
    let b = futures::executor::block_on(meta::read_buf(
        f,
        hdr.snapshots_offset,
        (max.max(512).div_ceil(4096) * 4096) as usize,
    ))
    .map_err(|e| block_err(name, e))?;
    let (s, _) = parse_snapshots(&b, hdr.nb_snapshots, cs).map_err(|e| open_err(name, e))?;
    Ok(s)
}

/// The metadata state: caches sized from the options, and the places
/// no data write may touch (the snapshot table and snapshots' L1 tables).
fn new_meta(
    o: &Qcow2Options,
    hdr: &Header,
    g: Geo,
    (l1, reftable): (Vec<u64>, Vec<u64>),
    file_size: u64,
    file_align: u64,
    snapshots: &[Snapshot],
) -> Meta {
    let name = o.node_name.as_str();
    let cs = g.cs;
    let snap_table_len = build::snapshot_table_len(snapshots);
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
    m.crypt_method = hdr.crypt_method;
    if let Some((off, len)) = hdr.crypto_ext {
        m.fixed
            .push((off, off.saturating_add(len), "the encryption header".into()));
    }
    if hdr.nb_snapshots > 0 {
        m.fixed.push((
            hdr.snapshots_offset,
            hdr.snapshots_offset + snap_table_len,
            "the snapshot table".into(),
        ));
        for s in snapshots {
            m.fixed.push((
                s.l1_table_offset,
                s.l1_table_offset + u64::from(s.l1_size) * 8,
                format!("the L1 table of snapshot '{}'", s.id),
            ));
        }
    }
    m
}

/// A writable open: refcounts rebuilt after a crash (dirty bit), lazy
/// refcounts as asked, and the header's feature bits written as this
/// driver keeps them. Returns whether refcounts are lazy.
fn prepare_header_for_writes(
    o: &Qcow2Options,
    f: &Node,
    hdr: &mut Header,
    m: &mut Meta,
    snapshots: &[Snapshot],
    keep_bitmaps: bool,
) -> Result<bool, GraphError> {
    let name = o.node_name.as_str();
    let dirty = hdr.incompatible & header::INCOMPAT_DIRTY != 0;
    if dirty {
        if hdr.extensions.contains(&header::EXT_BITMAPS) {
            return Err(open_err(
                name,
                "the image was not closed cleanly and has persistent bitmaps: repair it with 'qemu-img check -r all'",
            ));
        }
        log::warn!("node {name}: the image was not closed cleanly; rebuilding refcounts");
        futures::executor::block_on(build::rebuild_refcounts(f, hdr, m, snapshots))
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
    let lazy = compat & header::COMPAT_LAZY_REFCOUNTS != 0;
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
        if incompat != hdr.incompatible || compat != hdr.compatible || autoclear != hdr.autoclear {
            futures::executor::block_on(async {
                m.write_header_field(f, header::OFF_INCOMPAT, &fields)
                    .await?;
                f.flush().await
            })
            .map_err(|e| block_err(name, e))?;
            hdr.incompatible = incompat;
            hdr.compatible = compat;
            hdr.autoclear = autoclear;
        }
    }
    Ok(lazy)
}
