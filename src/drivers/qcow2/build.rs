//! Building refcount structures from scratch: image creation, and the
//! repair of an image that was not closed cleanly (dirty bit, lazy
//! refcounts).
//!
//! Both count every reference to every cluster, then lay a new refcount
//! table and refcount blocks out past the end of everything in use, each
//! covering itself. The header switches to them only once they are on disk;
//! the old table and blocks are then simply free space.

use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;

use crate::block::{BlockError, Node};
use crate::drivers::file::{self, Created, NewFile};

use super::header::{self, Header, Snapshot, OFFSET_MASK};
use super::meta::{self, Geo, Meta, COMPRESSED, COPIED};

/// Bytes the snapshot table takes.
pub fn snapshot_table_len(snaps: &[Snapshot]) -> u64 {
    snaps
        .iter()
        .map(|s| (40 + s.extra.len() + s.id.len() + s.name.len()).div_ceil(8) as u64 * 8)
        .sum()
}

/// The most clusters a refcount rebuild at open counts (in memory: 8 bytes
/// a cluster, and the new refcount blocks): 1 TiB of 64 KiB clusters.
/// Larger images are left to `qemu-img check -r all`.
const MAX_REBUILD_CLUSTERS: u64 = 1 << 24;

/// Reference counts, one per cluster.
struct Counts {
    c: Vec<u64>,
    limit: u64,
}

impl Counts {
    fn add(&mut self, cluster: u64, what: &str) -> Result<(), String> {
        if cluster >= self.limit {
            return Err(format!(
                "{what} refers to cluster {cluster}, past the end of the file; repair it with 'qemu-img check -r all'"
            ));
        }
        let i = cluster as usize;
        if i >= self.c.len() {
            self.c.resize(i + 1, 0);
        }
        self.c[i] = self.c[i].saturating_add(1);
        Ok(())
    }

    fn add_range(&mut self, off: u64, len: u64, g: &Geo, what: &str) -> Result<(), String> {
        if len == 0 {
            return Ok(());
        }
        for c in (off >> g.cluster_bits)..=((off + len - 1) >> g.cluster_bits) {
            self.add(c, what)?;
        }
        Ok(())
    }
}

/// A new refcount structure: blocks (cluster, bytes), the table's first
/// cluster, its clusters, and its entries.
pub struct Layout {
    pub blocks: Vec<(u64, Vec<u8>)>,
    pub table_cluster: u64,
    pub table_clusters: u64,
    pub table: Vec<u64>,
}

/// Lays refcounts for `counts` out starting at cluster `start` (past every
/// cluster in use), counting the new clusters themselves.
pub fn layout_refcounts(g: &Geo, counts: Vec<u64>, start: u64) -> Result<Layout, String> {
    let rbe = g.rb_entries();
    let mut k = 0u64;
    let mut m = 1u64;
    loop {
        let total = start + k + m;
        let entries = total.div_ceil(rbe);
        let nm = (entries * 8).div_ceil(g.cs);
        if entries == k && nm == m {
            break;
        }
        k = entries;
        m = nm;
    }
    if m * g.cs > header::MAX_REFTABLE_BYTES {
        return Err("the refcount table would exceed its maximum size".into());
    }
    let total = start + k + m;
    let mut c = counts;
    c.resize(total as usize, 0);
    for x in start..total {
        c[x as usize] += 1;
    }
    let max = g.max_refcount();
    if let Some((i, v)) = c.iter().enumerate().find(|(_, &v)| v > max) {
        return Err(format!(
            "cluster {i} has {v} references, more than {}-bit refcounts hold",
            1 << g.refcount_order
        ));
    }
    let mut table = vec![0u64; (m * g.cs / 8) as usize];
    let mut blocks = Vec::with_capacity(k as usize);
    for b in 0..k {
        let lo = (b * rbe) as usize;
        let hi = (((b + 1) * rbe) as usize).min(c.len());
        let cluster = start + b;
        table[b as usize] = cluster << g.cluster_bits;
        blocks.push((cluster, meta::encode_refblock(g, &c[lo..hi])));
    }
    Ok(Layout {
        blocks,
        table_cluster: start + k,
        table_clusters: m,
        table,
    })
}

/// Counts every reference in an open image: header, tables, snapshots,
/// L2 tables and data clusters.
async fn count_references(
    f: &Node,
    h: &Header,
    m: &Meta,
    snaps: &[Snapshot],
) -> Result<Counts, String> {
    let g = m.g;
    let file_clusters = f.size().div_ceil(g.cs);
    if file_clusters > MAX_REBUILD_CLUSTERS {
        return Err(format!(
            "the image file has {file_clusters} clusters, more than the {MAX_REBUILD_CLUSTERS} a repair at open counts; repair it with 'qemu-img check -r all'"
        ));
    }
    let mut counts = Counts {
        c: vec![0; file_clusters as usize],
        limit: file_clusters,
    };
    counts.add(0, "the header")?;
    if let Some((off, len)) = h.crypto_ext {
        counts.add_range(off, len, &g, "the encryption header")?;
    }
    counts.add_range(m.l1_offset, u64::from(m.l1_size) * 8, &g, "the L1 table")?;
    if h.nb_snapshots > 0 {
        counts.add_range(
            h.snapshots_offset,
            snapshot_table_len(snaps),
            &g,
            "the snapshot table",
        )?;
    }
    count_l1(f, &g, &mut counts, &m.l1, m.l1_size).await?;
    // One snapshot L1 table in memory at a time.
    for s in snaps {
        counts.add_range(
            s.l1_table_offset,
            u64::from(s.l1_size) * 8,
            &g,
            "a snapshot L1 table",
        )?;
        let bytes = (u64::from(s.l1_size) * 8).div_ceil(512) * 512;
        let b = meta::read_buf(f, s.l1_table_offset, bytes.max(512) as usize)
            .await
            .map_err(|e| e.to_string())?;
        count_l1(f, &g, &mut counts, &meta::decode_be64(&b), s.l1_size).await?;
    }
    Ok(counts)
}

/// Counts the L2 tables an L1 table (`size` entries of `l1`) references,
/// and the clusters their entries reference.
async fn count_l1(
    f: &Node,
    g: &Geo,
    counts: &mut Counts,
    l1: &[u64],
    size: u32,
) -> Result<(), String> {
    let w = g.words_per_entry();
    for &e in l1.iter().take(size as usize) {
        let l2 = e & OFFSET_MASK;
        if l2 == 0 {
            continue;
        }
        counts.add(l2 >> g.cluster_bits, "an L1 entry")?;
        let t = meta::decode_be64(
            &meta::read_buf(f, l2, g.cs as usize)
                .await
                .map_err(|e| e.to_string())?,
        );
        for i in (0..t.len()).step_by(w) {
            let e = t[i];
            if e & COMPRESSED != 0 {
                let (off, len) = g.compressed(e & !COPIED);
                counts.add_range(off, len, g, "a compressed cluster")?;
            } else if e & OFFSET_MASK != 0 {
                counts.add((e & OFFSET_MASK) >> g.cluster_bits, "an L2 entry")?;
            }
        }
    }
    Ok(())
}

/// Replaces the refcounts of an open image by counted ones.
pub async fn rebuild_refcounts(
    f: &Node,
    h: &Header,
    m: &mut Meta,
    snaps: &[Snapshot],
) -> Result<(), String> {
    let g = m.g;
    let counts = count_references(f, h, m, snaps).await?;
    let used = counts
        .c
        .iter()
        .rposition(|&c| c > 0)
        .map_or(0, |i| i as u64 + 1);
    let start = used.max(f.size().div_ceil(g.cs));
    let layout = layout_refcounts(&g, counts.c, start)?;
    let io = |e: BlockError| e.to_string();
    for (cluster, bytes) in &layout.blocks {
        meta::write_buf(f, cluster << g.cluster_bits, bytes)
            .await
            .map_err(io)?;
    }
    meta::write_buf(
        f,
        layout.table_cluster << g.cluster_bits,
        &meta::encode_be64(&layout.table),
    )
    .await
    .map_err(io)?;
    f.flush().await.map_err(io)?;
    let mut field = Vec::with_capacity(12);
    field.extend_from_slice(&(layout.table_cluster << g.cluster_bits).to_be_bytes());
    field.extend_from_slice(&(layout.table_clusters as u32).to_be_bytes());
    m.write_header_field(f, header::OFF_REFTABLE, &field)
        .await
        .map_err(io)?;
    f.flush().await.map_err(io)?;
    m.replace_refcounts(
        layout.table,
        layout.table_cluster << g.cluster_bits,
        layout.table_clusters as u32,
        layout.table_cluster + layout.table_clusters,
    );
    Ok(())
}

/// `preallocation` of image creation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Preallocation {
    #[default]
    Off,
    /// L2 tables and data clusters allocated (the data reads as zeroes
    /// because the file is sparse).
    Metadata,
    /// As metadata, and the file's space reserved with fallocate.
    Falloc,
    /// As metadata, and zeroes written to every data cluster.
    Full,
}

impl std::str::FromStr for Preallocation {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(Preallocation::Off),
            "metadata" => Ok(Preallocation::Metadata),
            "falloc" => Ok(Preallocation::Falloc),
            "full" => Ok(Preallocation::Full),
            o => Err(format!(
                "preallocation '{o}' is not one of off, metadata, falloc, full"
            )),
        }
    }
}

#[derive(Debug, Clone)]
pub struct CreateOptions {
    pub size: u64,
    pub cluster_size: u64,
    /// 2 (compat=0.10) or 3 (compat=1.1).
    pub version: u32,
    pub backing_file: Option<String>,
    pub backing_fmt: Option<String>,
    pub extended_l2: bool,
    pub lazy_refcounts: bool,
    pub preallocation: Preallocation,
    pub refcount_bits: u32,
    /// `encrypt.format=luks`: the cipher and the secret holding the
    /// passphrase (its Debug hides the value).
    pub encrypt: Option<Encrypt>,
}

/// The LUKS encryption of a new image.
#[derive(Debug, Clone)]
pub struct Encrypt {
    pub spec: crate::drivers::luks::CreateSpec,
    pub secret: std::sync::Arc<crate::secret::Secret>,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: 0,
            cluster_size: 65536,
            version: 3,
            backing_file: None,
            backing_fmt: None,
            extended_l2: false,
            lazy_refcounts: false,
            preallocation: Preallocation::Off,
            refcount_bits: 16,
            encrypt: None,
        }
    }
}

impl CreateOptions {
    fn check(&self) -> Result<u32, String> {
        let cs = self.cluster_size;
        if !cs.is_power_of_two() || !(512..=2 << 20).contains(&cs) {
            return Err(format!(
                "cluster size {cs} must be a power of two between 512 and 2M"
            ));
        }
        if self.version != 2 && self.version != 3 {
            return Err(format!("version {} is not 2 or 3", self.version));
        }
        if self.size % 512 != 0 {
            return Err(format!("size {} is not a multiple of 512", self.size));
        }
        if self.size > header::MAX_IMAGE_SIZE {
            return Err(format!("size {} is too large", self.size));
        }
        if self.extended_l2 && (self.version < 3 || cs < 16384) {
            return Err("extended_l2 needs compat=1.1 and clusters of at least 16 KiB".into());
        }
        if self.lazy_refcounts && self.version < 3 {
            return Err("lazy_refcounts needs compat=1.1".into());
        }
        if !self.refcount_bits.is_power_of_two() || self.refcount_bits > 64 {
            return Err(format!(
                "refcount_bits {} must be a power of two up to 64",
                self.refcount_bits
            ));
        }
        if self.version == 2 && self.refcount_bits != 16 {
            return Err("compat=0.10 images have 16-bit refcounts".into());
        }
        if self.backing_fmt.is_some() && self.backing_file.is_none() {
            return Err("backing_fmt needs backing_file".into());
        }
        if let Some(b) = &self.backing_file {
            if b.len() > header::MAX_BACKING_NAME as usize {
                return Err("the backing file name is too long".into());
            }
            if self.preallocation != Preallocation::Off && !self.extended_l2 {
                return Err(
                    "preallocation with a backing file needs extended_l2 (else the backing data would be hidden)"
                        .into(),
                );
            }
        }
        Ok(cs.trailing_zeros())
    }
}

/// Creates a qcow2 image at `path` (the file is created or truncated)
/// from the command line: no node is open.
pub fn create(path: &str, o: &CreateOptions) -> Result<(), String> {
    create_in(path, o, &file::no_node).map(|_| ())
}

/// Creates a qcow2 image at `path`: the file is created, or truncated once
/// this call holds its write lock (see [`NewFile`]) and `in_use` names no
/// node of the daemon that has it open. Returns what undoing the creation
/// needs.
pub fn create_in(path: &str, o: &CreateOptions, in_use: file::InUse) -> Result<Created, String> {
    let cluster_bits = o.check()?;
    let cs = o.cluster_size;
    let refcount_order = o.refcount_bits.trailing_zeros();
    let g = create_geo(o, cluster_bits, refcount_order);
    let data_clusters = o.size.div_ceil(cs);
    let l1_size = data_clusters.div_ceil(g.l2_entries());
    if l1_size * 8 > header::MAX_L1_BYTES {
        return Err(format!("size {} needs too large an L1 table", o.size));
    }
    let l1_clusters = (l1_size * 8).div_ceil(cs).max(1);
    let mut next = 1 + l1_clusters;
    let mut l1 = vec![0u64; (l1_clusters * cs / 8) as usize];
    let mut counts: Vec<u64> = vec![1; next as usize];
    if o.encrypt.is_some() && o.preallocation != Preallocation::Off {
        return Err(
            "preallocation is not supported with encryption here (preallocated clusters would read as noise)"
                .into(),
        );
    }
    // The LUKS header and key material, in clusters of their own after
    // the L1 table (QEMU's qcow2_crypto_hdr_init_func).
    let crypto = match &o.encrypt {
        Some(e) => {
            let v = crate::drivers::luks::format::create(&e.spec, e.secret.bytes())?;
            let off = next << cluster_bits;
            next += v.payload.div_ceil(cs);
            counts.resize(next as usize, 1);
            Some((off, v))
        }
        None => None,
    };
    let new = NewFile::open(path, in_use)?;
    let file = new.file();
    let werr = |e: std::io::Error| format!("writing '{path}': {e}");
    file.set_len(0).map_err(werr)?;
    if let Some((off, v)) = &crypto {
        file.write_all_at(&v.head, *off).map_err(werr)?;
    }
    let mut data_ranges = Vec::new();
    if o.preallocation != Preallocation::Off {
        data_ranges =
            write_prealloc_l2(path, file, &g, &mut l1, l1_size, data_clusters, &mut next)?;
        counts.resize(next as usize, 1);
    }
    file.write_all_at(&meta::encode_be64(&l1), cs)
        .map_err(werr)?;
    let layout = layout_refcounts(&g, counts, next)?;
    for (c, bytes) in &layout.blocks {
        file.write_all_at(bytes, c << cluster_bits).map_err(werr)?;
    }
    file.write_all_at(
        &meta::encode_be64(&layout.table),
        layout.table_cluster << cluster_bits,
    )
    .map_err(werr)?;
    let end = (layout.table_cluster + layout.table_clusters) << cluster_bits;
    file.set_len(end).map_err(werr)?;
    preallocate_data(path, file, o.preallocation, cluster_bits, end, &data_ranges)?;

    // The header, last.
    let crypto_ext = crypto.as_ref().map(|(off, v)| (*off, v.payload));
    let hdr_bytes = new_header(
        o,
        cluster_bits,
        refcount_order,
        l1_size,
        &layout,
        crypto_ext,
    )?;
    file.write_all_at(&hdr_bytes, 0).map_err(werr)?;
    file.sync_all().map_err(werr)?;
    Ok(new.close())
}

/// The geometry of an image to create.
fn create_geo(o: &CreateOptions, cluster_bits: u32, refcount_order: u32) -> Geo {
    Geo {
        cluster_bits,
        cs: o.cluster_size,
        extended: o.extended_l2,
        sc_bits: if o.extended_l2 {
            cluster_bits - 5
        } else {
            cluster_bits
        },
        l2_bits: cluster_bits - if o.extended_l2 { 4 } else { 3 },
        refcount_order,
        rb_bits: cluster_bits + 3 - refcount_order,
        version: o.version,
    }
}

/// Preallocation: an L2 table for each L1 entry, each mapping its data
/// clusters, which follow it. Returns the data clusters as (first, count)
/// runs; `next` is the first cluster after them.
fn write_prealloc_l2(
    path: &str,
    file: &std::fs::File,
    g: &Geo,
    l1: &mut [u64],
    l1_size: u64,
    data_clusters: u64,
    next: &mut u64,
) -> Result<Vec<(u64, u64)>, String> {
    let werr = |e: std::io::Error| format!("writing '{path}': {e}");
    let (cs, cluster_bits) = (g.cs, g.cluster_bits);
    let mut data_ranges = Vec::new();
    let w = g.words_per_entry();
    for (i, l1e) in l1.iter_mut().enumerate().take(l1_size as usize) {
        let l2 = *next;
        *next += 1;
        let first = i as u64 * g.l2_entries();
        let n = (data_clusters - first).min(g.l2_entries());
        let mut words = vec![0u64; (cs / 8) as usize];
        for j in 0..n {
            words[j as usize * w] = ((*next + j) << cluster_bits) | COPIED;
            if w == 2 {
                words[j as usize * w + 1] = u64::from(u32::MAX);
            }
        }
        file.write_all_at(&meta::encode_be64(&words), l2 << cluster_bits)
            .map_err(werr)?;
        *l1e = (l2 << cluster_bits) | COPIED;
        data_ranges.push((*next, n));
        *next += n;
    }
    Ok(data_ranges)
}

/// Space for the data: allocated (`falloc`, the whole file) or written
/// with zeroes (`full`, the data clusters).
fn preallocate_data(
    path: &str,
    file: &std::fs::File,
    mode: Preallocation,
    cluster_bits: u32,
    end: u64,
    data_ranges: &[(u64, u64)],
) -> Result<(), String> {
    let werr = |e: std::io::Error| format!("writing '{path}': {e}");
    match mode {
        Preallocation::Off | Preallocation::Metadata => {}
        Preallocation::Falloc => {
            // SAFETY: fallocate on a descriptor we own, no pointers.
            let r =
                unsafe { libc::fallocate(std::os::fd::AsRawFd::as_raw_fd(file), 0, 0, end as i64) };
            if r < 0 {
                return Err(werr(std::io::Error::last_os_error()));
            }
        }
        Preallocation::Full => {
            let zero = vec![0u8; 1 << 20];
            for &(first, n) in data_ranges {
                let mut off = first << cluster_bits;
                let stop = (first + n) << cluster_bits;
                while off < stop {
                    let len = (stop - off).min(zero.len() as u64) as usize;
                    file.write_all_at(&zero[..len], off).map_err(werr)?;
                    off += len as u64;
                }
            }
        }
    }
    Ok(())
}

/// The header cluster of a new image: the header, its extensions (backing
/// format, feature names) and the backing file name.
fn new_header(
    o: &CreateOptions,
    cluster_bits: u32,
    refcount_order: u32,
    l1_size: u64,
    layout: &Layout,
    crypto_ext: Option<(u64, u64)>,
) -> Result<Vec<u8>, String> {
    let cs = o.cluster_size;
    let mut hdr_bytes = vec![0u8; cs as usize];
    let put32 = |b: &mut [u8], at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_be_bytes());
    let put64 = |b: &mut [u8], at: usize, v: u64| b[at..at + 8].copy_from_slice(&v.to_be_bytes());
    put32(&mut hdr_bytes, 0, header::MAGIC);
    put32(&mut hdr_bytes, 4, o.version);
    put32(&mut hdr_bytes, 20, cluster_bits);
    if crypto_ext.is_some() {
        put32(&mut hdr_bytes, 32, 2);
    }
    put64(&mut hdr_bytes, 24, o.size);
    put32(&mut hdr_bytes, 36, l1_size as u32);
    put64(&mut hdr_bytes, 40, cs);
    put64(&mut hdr_bytes, 48, layout.table_cluster << cluster_bits);
    put32(&mut hdr_bytes, 56, layout.table_clusters as u32);
    let mut at = 72usize;
    if o.version == 3 {
        let mut incompat = 0u64;
        if o.extended_l2 {
            incompat |= header::INCOMPAT_EXTL2;
        }
        put64(&mut hdr_bytes, 72, incompat);
        put64(
            &mut hdr_bytes,
            80,
            if o.lazy_refcounts {
                header::COMPAT_LAZY_REFCOUNTS
            } else {
                0
            },
        );
        put32(&mut hdr_bytes, 96, refcount_order);
        put32(&mut hdr_bytes, 100, 112);
        at = 112;
    }
    let mut ext = |ty: u32, data: &[u8], at: &mut usize| {
        put32(&mut hdr_bytes, *at, ty);
        put32(&mut hdr_bytes, *at + 4, data.len() as u32);
        hdr_bytes[*at + 8..*at + 8 + data.len()].copy_from_slice(data);
        *at += 8 + data.len().div_ceil(8) * 8;
    };
    if let Some(fmt) = &o.backing_fmt {
        ext(header::EXT_BACKING_FORMAT, fmt.as_bytes(), &mut at);
    }
    if let Some((off, len)) = crypto_ext {
        let mut d = off.to_be_bytes().to_vec();
        d.extend_from_slice(&len.to_be_bytes());
        ext(header::EXT_CRYPTO, &d, &mut at);
    }
    if o.version == 3 {
        let mut table = Vec::new();
        for (ty, bit, name) in [
            (0u8, 0u8, "dirty bit"),
            (0, 1, "corrupt bit"),
            (0, 2, "external data file"),
            (0, 3, "compression type"),
            (0, 4, "extended L2 entries"),
            (1, 0, "lazy refcounts"),
            (2, 0, "bitmaps"),
            (2, 1, "raw external data"),
        ] {
            let mut e = vec![0u8; 48];
            e[0] = ty;
            e[1] = bit;
            e[2..2 + name.len()].copy_from_slice(name.as_bytes());
            table.extend_from_slice(&e);
        }
        ext(header::EXT_FEATURE_TABLE, &table, &mut at);
    }
    at += 8; // end of extensions (zeroes)
    if let Some(b) = &o.backing_file {
        if at + b.len() > cs as usize {
            return Err("the backing file name does not fit in the header cluster".into());
        }
        hdr_bytes[at..at + b.len()].copy_from_slice(b.as_bytes());
        put64(&mut hdr_bytes, 8, at as u64);
        put32(&mut hdr_bytes, 16, b.len() as u32);
    }
    Ok(hdr_bytes)
}

/// The virtual size of an image file of format `fmt` (for a backing file
/// given without a size).
pub fn probe_size(path: &str, fmt: &str) -> Result<u64, String> {
    let mut f = std::fs::File::open(path).map_err(|e| format!("cannot open '{path}': {e}"))?;
    match fmt {
        "qcow2" => {
            let mut b = [0u8; 32];
            f.read_exact(&mut b)
                .map_err(|e| format!("'{path}': cannot read the qcow2 header: {e}"))?;
            let [m0, m1, m2, m3, ..] = b;
            if u32::from_be_bytes([m0, m1, m2, m3]) != header::MAGIC {
                return Err(format!("'{path}' is not a qcow2 image"));
            }
            let mut size = [0u8; 8];
            size.copy_from_slice(&b[24..32]);
            Ok(u64::from_be_bytes(size))
        }
        "raw" => f.seek(SeekFrom::End(0)).map_err(|e| e.to_string()),
        other => Err(format!("backing format '{other}' is not supported")),
    }
}
