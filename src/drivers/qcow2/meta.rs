//! qcow2 metadata: the L1 table, cached L2 tables and refcount blocks,
//! cluster allocation, and the order in which metadata reaches the disk.
//!
//! Everything here runs under the image's metadata lock. Caches are
//! write-back; [`Meta::flush`] writes them in the order that keeps the image
//! consistent after a crash at any point (leaked clusters at worst):
//!
//! ```text
//!   refcount blocks -> fsync -> refcount table -> fsync
//!     -> L2 tables -> fsync -> L1 table -> fsync
//! ```
//!
//! A refcount increase is thus on disk before any table points at the
//! cluster. A decrease (a cluster no longer referenced) is queued and applied
//! only after the tables that dropped the reference are on disk, and only
//! when no data request that may still use the old mapping is in flight.

use std::collections::{BTreeSet, HashMap, HashSet};

use super::cache::Cache;

use crate::block::{BlockError, DebugEvent as Ev, Node};
use crate::io::IoVecs;

use super::header::{self, OFFSET_MASK};

/// L1 and L2 entry flag: the cluster's refcount is exactly one.
pub const COPIED: u64 = 1 << 63;
/// L2 entry flag: the cluster is compressed.
pub const COMPRESSED: u64 = 1 << 62;
/// Standard L2 entry flag: the cluster reads as zeroes.
pub const ZERO: u64 = 1;

/// Sizes derived from the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geo {
    pub cluster_bits: u32,
    pub cs: u64,
    pub extended: bool,
    /// Subcluster size: the cluster without extended L2 entries.
    pub sc_bits: u32,
    pub l2_bits: u32,
    pub refcount_order: u32,
    pub rb_bits: u32,
    pub version: u32,
}

impl Geo {
    pub fn new(h: &header::Header) -> Geo {
        let extended = h.extended_l2();
        let entry_bits = if extended { 4 } else { 3 };
        Geo {
            cluster_bits: h.cluster_bits,
            cs: h.cluster_size(),
            extended,
            sc_bits: if extended {
                h.cluster_bits - 5
            } else {
                h.cluster_bits
            },
            l2_bits: h.cluster_bits - entry_bits,
            refcount_order: h.refcount_order,
            rb_bits: h.cluster_bits + 3 - h.refcount_order,
            version: h.version,
        }
    }

    pub fn sc_size(&self) -> u64 {
        1 << self.sc_bits
    }

    pub fn l2_entries(&self) -> u64 {
        1 << self.l2_bits
    }

    /// Refcount entries per refcount block.
    pub fn rb_entries(&self) -> u64 {
        1 << self.rb_bits
    }

    pub fn max_refcount(&self) -> u64 {
        if self.refcount_order == 6 {
            u64::MAX
        } else {
            (1u64 << (1 << self.refcount_order)) - 1
        }
    }

    /// Words per L2 entry in the decoded table.
    pub fn words_per_entry(&self) -> usize {
        if self.extended {
            2
        } else {
            1
        }
    }

    /// Compressed descriptor: (host offset, bytes to read).
    pub fn compressed(&self, entry: u64) -> (u64, u64) {
        let shift = 62 - (self.cluster_bits - 8);
        let mask = (1u64 << (self.cluster_bits - 8)) - 1;
        let off = entry & ((1u64 << shift) - 1);
        let sectors = ((entry >> shift) & mask) + 1;
        (off, sectors * 512 - (off & 511))
    }
}

/// What one subcluster (one cluster without extended L2) reads as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sc {
    /// Data at this host offset (of the subcluster's first byte).
    Data(u64),
    Zero,
    /// Falls through to the backing node (zeroes without one).
    Unallocated,
    /// Part of a compressed cluster (the L2 entry).
    Compressed(u64),
}

/// The state of subcluster `i` of the cluster an L2 `entry` (and, for
/// extended L2, `bitmap`) describes.
pub fn sc_state(g: &Geo, entry: u64, bitmap: u64, i: u64) -> Result<Sc, String> {
    if entry & COMPRESSED != 0 {
        return Ok(Sc::Compressed(entry & !COPIED));
    }
    let host = entry & OFFSET_MASK;
    if host % g.cs != 0 {
        return Err(format!(
            "data cluster offset {host:#x} is not cluster aligned"
        ));
    }
    if !g.extended {
        if entry & ZERO != 0 {
            return Ok(Sc::Zero);
        }
        return Ok(if host == 0 {
            Sc::Unallocated
        } else {
            Sc::Data(host)
        });
    }
    let alloc = bitmap & (1 << i) != 0;
    let zero = bitmap & (1 << (32 + i)) != 0;
    match (alloc, zero) {
        (true, true) => Err(format!(
            "subcluster {i} is both allocated and zero (bitmap {bitmap:#x})"
        )),
        (true, false) if host == 0 => Err(format!(
            "subcluster {i} is allocated in a cluster without an offset"
        )),
        (true, false) => Ok(Sc::Data(host + (i << g.sc_bits))),
        (false, true) => Ok(Sc::Zero),
        (false, false) => Ok(Sc::Unallocated),
    }
}

fn get_refcount(bytes: &[u8], order: u32, i: u64) -> u64 {
    let bits = 1u64 << order;
    if bits >= 8 {
        let n = (bits / 8) as usize;
        let at = i as usize * n;
        bytes[at..at + n]
            .iter()
            .fold(0u64, |a, &b| (a << 8) | u64::from(b))
    } else {
        let bit = i * bits;
        let byte = bytes[(bit / 8) as usize];
        (u64::from(byte) >> (bit % 8)) & ((1 << bits) - 1)
    }
}

fn set_refcount(bytes: &mut [u8], order: u32, i: u64, v: u64) {
    let bits = 1u64 << order;
    if bits >= 8 {
        let n = (bits / 8) as usize;
        let at = i as usize * n;
        for (k, b) in bytes[at..at + n].iter_mut().enumerate() {
            *b = (v >> (8 * (n - 1 - k))) as u8;
        }
    } else {
        let bit = i * bits;
        let mask = ((1u64 << bits) - 1) << (bit % 8);
        let byte = &mut bytes[(bit / 8) as usize];
        *byte = ((u64::from(*byte) & !mask) | ((v << (bit % 8)) & mask)) as u8;
    }
}

/// Encodes refcounts `counts` (one per cluster) as refcount block bytes.
pub fn encode_refblock(g: &Geo, counts: &[u64]) -> Vec<u8> {
    let mut b = vec![0u8; g.cs as usize];
    for (i, &c) in counts.iter().enumerate() {
        set_refcount(&mut b, g.refcount_order, i as u64, c);
    }
    b
}

pub fn decode_be64(b: &[u8]) -> Vec<u64> {
    b.chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
        .collect()
}

pub fn encode_be64(w: &[u64]) -> Vec<u8> {
    w.iter().flat_map(|x| x.to_be_bytes()).collect()
}

/// Reads `len` bytes at `off` of the file node into a new vector.
pub async fn read_buf(f: &Node, off: u64, len: usize) -> Result<Vec<u8>, BlockError> {
    let (iov, view) = IoVecs::bounce(len, 4096);
    f.preadv(off, &iov).await?;
    Ok(view.with_bytes(&iov, |b| b.to_vec()))
}

/// Writes `data` at `off` of the file node.
pub async fn write_buf(f: &Node, off: u64, data: &[u8]) -> Result<(), BlockError> {
    let (iov, view) = IoVecs::bounce(data.len(), 4096);
    view.with_bytes(&iov, |b| b.copy_from_slice(data));
    f.pwritev(off, &iov, false).await
}

/// The metadata of an open image.
pub struct Meta {
    pub g: Geo,
    pub node: String,
    pub l1: Vec<u64>,
    pub l1_offset: u64,
    pub l1_size: u32,
    l1_dirty: BTreeSet<usize>,
    /// L2 tables, decoded.
    l2: Cache<Vec<u64>>,
    pub reftable: Vec<u64>,
    pub reftable_offset: u64,
    pub reftable_clusters: u32,
    reftable_dirty: BTreeSet<usize>,
    /// A larger refcount table in memory (its offset and clusters) that
    /// the header does not point to yet: a write of the switch failed, so
    /// it is retried before any other refcount write-back.
    pending_reftable: Option<(u64, u32)>,
    /// Refcount blocks, as stored.
    rb: Cache<Vec<u8>>,
    free_hint: u64,
    /// One past the highest cluster in use or in the file.
    pub end_cluster: u64,
    /// Clusters to unreference once the tables that dropped them are on disk.
    pending_unref: Vec<u64>,
    /// Clusters whose unreference is safe once no old mapping is in use.
    ready_unref: Vec<u64>,
    /// Active L2 tables and refcount blocks (cluster indexes), for the
    /// overlap check.
    l2_set: HashSet<u64>,
    rb_set: HashSet<u64>,
    /// Other metadata: (start, end, what), in bytes.
    pub fixed: Vec<(u64, u64, String)>,
    /// The header's crypt_method (rewritten with the L1 table's fields).
    pub crypt_method: u32,
    /// Guest clusters with an allocating write in flight, and who waits.
    pub busy: HashMap<u64, Vec<super::lock::Notifier>>,
    /// Lazy refcounts: refcount blocks are written at close only; the
    /// header's dirty bit is set meanwhile.
    pub lazy: bool,
    /// Punch holes in the file for freed clusters.
    pub pass_discard: bool,
    /// Bytes to read-modify-write for a header field update.
    pub header_io: usize,
    /// Set when the image was found corrupt: no more writes.
    pub corrupt: bool,
    /// The file is allocated (fallocate) up to here, in bytes.
    pub prealloc_end: u64,
    /// Where the snapshot table is, and its length in bytes.
    pub snap_offset: u64,
    pub snap_len: u64,
    /// The backing file name as the header stores it (for header rewrites).
    pub backing_name_bytes: Option<Vec<u8>>,
}

impl Meta {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        g: Geo,
        node: &str,
        l1: Vec<u64>,
        l1_offset: u64,
        l1_size: u32,
        reftable: Vec<u64>,
        reftable_offset: u64,
        reftable_clusters: u32,
        file_size: u64,
        l2_cache_bytes: u64,
        rb_cache_bytes: u64,
        header_io: usize,
    ) -> Meta {
        let l2_set = l1
            .iter()
            .take(l1_size as usize)
            .map(|e| (e & OFFSET_MASK) >> g.cluster_bits)
            .filter(|&c| c != 0)
            .collect();
        let rb_set = reftable
            .iter()
            .map(|e| (e & OFFSET_MASK) >> g.cluster_bits)
            .filter(|&c| c != 0)
            .collect();
        let mut fixed = vec![(0, g.cs, "the header".to_string())];
        fixed.push((
            l1_offset,
            l1_offset + u64::from(l1_size) * 8,
            "the active L1 table".into(),
        ));
        fixed.push((
            reftable_offset,
            reftable_offset + u64::from(reftable_clusters) * g.cs,
            "the refcount table".into(),
        ));
        Meta {
            g,
            node: node.to_string(),
            l1,
            l1_offset,
            l1_size,
            l1_dirty: BTreeSet::new(),
            l2: Cache::new(((l2_cache_bytes / g.cs) as usize).max(2)),
            reftable,
            reftable_offset,
            reftable_clusters,
            reftable_dirty: BTreeSet::new(),
            pending_reftable: None,
            rb: Cache::new(((rb_cache_bytes / g.cs) as usize).max(4)),
            free_hint: 0,
            end_cluster: file_size.div_ceil(g.cs),
            pending_unref: Vec::new(),
            ready_unref: Vec::new(),
            l2_set,
            rb_set,
            fixed,
            busy: HashMap::new(),
            lazy: false,
            pass_discard: false,
            header_io,
            corrupt: false,
            prealloc_end: file_size,
            snap_offset: 0,
            snap_len: 0,
            backing_name_bytes: None,
            crypt_method: 0,
        }
    }

    pub fn corrupt_err(&self, reason: impl Into<String>) -> BlockError {
        BlockError::Corrupt {
            node: self.node.clone(),
            reason: reason.into(),
        }
    }

    // ---- overlap checks ----

    /// Names the metadata that `[off, off + len)` would overwrite, if any.
    pub fn overlap(&self, off: u64, len: u64) -> Option<String> {
        let end = off + len;
        for (s, e, what) in &self.fixed {
            if off < *e && *s < end {
                return Some(what.clone());
            }
        }
        let first = off >> self.g.cluster_bits;
        let last = (end - 1) >> self.g.cluster_bits;
        for c in first..=last {
            if self.l2_set.contains(&c) {
                return Some(format!("an L2 table (cluster {c})"));
            }
            if self.rb_set.contains(&c) {
                return Some(format!("a refcount block (cluster {c})"));
            }
        }
        None
    }

    // ---- L1 and L2 ----

    fn l1_entry_checked(&self, l1i: usize) -> Result<u64, BlockError> {
        let e = *self
            .l1
            .get(l1i)
            .ok_or_else(|| self.corrupt_err(format!("L1 index {l1i} beyond the table")))?;
        let off = e & OFFSET_MASK;
        if off % self.g.cs != 0 {
            return Err(
                self.corrupt_err(format!("L2 table offset {off:#x} is not cluster aligned"))
            );
        }
        Ok(e)
    }

    pub fn set_l1(&mut self, l1i: usize, v: u64) {
        let old = self.l1[l1i] & OFFSET_MASK;
        if old != 0 {
            self.l2_set.remove(&(old >> self.g.cluster_bits));
        }
        let new = v & OFFSET_MASK;
        if new != 0 {
            self.l2_set.insert(new >> self.g.cluster_bits);
        }
        self.l1[l1i] = v;
        self.l1_dirty.insert((l1i * 8) >> self.g.cluster_bits);
    }

    /// Evicts L2 tables while the cache is full; a dirty one waits for
    /// the refcounts it may depend on.
    async fn make_room_l2(&mut self, f: &Node) -> Result<(), BlockError> {
        while let Some((off, dirty)) = self.l2.victim() {
            if dirty {
                if !self.lazy {
                    self.flush_refcounts(f).await?;
                }
                let bytes = encode_be64(self.l2.get(off));
                f.debug_event(Ev::L2Update);
                write_buf(f, off, &bytes).await?;
            }
            self.l2.remove(off);
        }
        Ok(())
    }

    pub async fn load_l2(&mut self, f: &Node, off: u64) -> Result<(), BlockError> {
        // QEMU's l2_load raises it before its cache lookup, hit or miss.
        f.debug_event(Ev::L2Load);
        if self.l2.touch(off) {
            return Ok(());
        }
        self.make_room_l2(f).await?;
        let bytes = read_buf(f, off, self.g.cs as usize).await?;
        self.l2.insert(off, decode_be64(&bytes), false);
        Ok(())
    }

    /// The L2 entry (and bitmap) of guest cluster `gc`, and the offset of
    /// its L2 table (0 when the L1 entry is empty).
    pub async fn entry(&mut self, f: &Node, gc: u64) -> Result<(u64, u64, u64), BlockError> {
        let l1i = (gc >> self.g.l2_bits) as usize;
        if l1i >= self.l1_size as usize {
            return Ok((0, 0, 0));
        }
        let l2off = self.l1_entry_checked(l1i)? & OFFSET_MASK;
        if l2off == 0 {
            return Ok((0, 0, 0));
        }
        self.load_l2(f, l2off).await?;
        let (e, b) = self.entry_in(l2off, gc);
        Ok((e, b, l2off))
    }

    /// The words of a cached L2 table, for changes (marked dirty).
    pub fn l2_words_mut(&mut self, off: u64) -> &mut Vec<u64> {
        self.l2.get_mut(off)
    }

    /// The words of a cached L2 table.
    pub fn l2_words(&self, off: u64) -> &[u64] {
        self.l2.get(off)
    }

    /// Entry `gc` of a cached table.
    pub fn entry_in(&self, l2off: u64, gc: u64) -> (u64, u64) {
        let w = self.g.words_per_entry();
        let i = (gc & (self.g.l2_entries() - 1)) as usize * w;
        let words = self.l2.get(l2off);
        (words[i], if w == 2 { words[i + 1] } else { 0 })
    }

    /// An L2 table for guest cluster `gc` that may be written: allocated if
    /// missing, copied if shared with a snapshot. Returns its offset.
    pub async fn l2_for_write(&mut self, f: &Node, gc: u64) -> Result<u64, BlockError> {
        let l1i = (gc >> self.g.l2_bits) as usize;
        if l1i >= self.l1_size as usize {
            return Err(self.corrupt_err(format!("guest cluster {gc} is beyond the L1 table")));
        }
        let e = self.l1_entry_checked(l1i)?;
        let off = e & OFFSET_MASK;
        if off != 0 && e & COPIED != 0 {
            self.load_l2(f, off).await?;
            return Ok(off);
        }
        let words = if off != 0 {
            f.debug_event(Ev::L2AllocCowRead);
            self.load_l2(f, off).await?;
            self.l2.get(off).clone()
        } else {
            vec![0u64; (self.g.cs / 8) as usize]
        };
        let new = self.alloc(f, 1).await?;
        self.make_room_l2(f).await?;
        // QEMU writes the new table here; ours is written back in the
        // crash-safe order of the next flush or eviction.
        f.debug_event(Ev::L2AllocWrite);
        self.l2.insert(new, words, true);
        self.set_l1(l1i, new | COPIED);
        if off != 0 {
            self.pending_unref.push(off >> self.g.cluster_bits);
        }
        Ok(new)
    }

    /// Sets entry `gc` in the cached (writable) table at `l2off`.
    pub fn set_entry(&mut self, l2off: u64, gc: u64, entry: u64, bitmap: u64) {
        let w = self.g.words_per_entry();
        let i = (gc & (self.g.l2_entries() - 1)) as usize * w;
        let words = self.l2.get_mut(l2off);
        words[i] = entry;
        if w == 2 {
            words[i + 1] = bitmap;
        }
    }

    // ---- refcounts ----

    /// Evicts refcount blocks while the cache is full (a dirty one can be
    /// written at any time).
    async fn make_room_rb(&mut self, f: &Node) -> Result<(), BlockError> {
        while let Some((off, dirty)) = self.rb.victim() {
            if dirty {
                let bytes = self.rb.get(off).clone();
                f.debug_event(Ev::RefblockUpdatePart);
                write_buf(f, off, &bytes).await?;
            }
            self.rb.remove(off);
        }
        Ok(())
    }

    async fn load_rb(&mut self, f: &Node, off: u64) -> Result<(), BlockError> {
        // QEMU's load_refcount_block raises it before its cache lookup.
        f.debug_event(Ev::RefblockLoad);
        if self.rb.touch(off) {
            return Ok(());
        }
        self.make_room_rb(f).await?;
        let bytes = read_buf(f, off, self.g.cs as usize).await?;
        self.rb.insert(off, bytes, false);
        Ok(())
    }

    fn refblock_offset(&self, bi: u64) -> Result<u64, BlockError> {
        let Some(&e) = self.reftable.get(bi as usize) else {
            return Ok(0);
        };
        let off = e & OFFSET_MASK;
        if off % self.g.cs != 0 {
            return Err(self.corrupt_err(format!(
                "refcount block offset {off:#x} is not cluster aligned"
            )));
        }
        Ok(off)
    }

    pub async fn refcount(&mut self, f: &Node, c: u64) -> Result<u64, BlockError> {
        let bi = c >> self.g.rb_bits;
        let off = self.refblock_offset(bi)?;
        if off == 0 {
            return Ok(0);
        }
        self.load_rb(f, off).await?;
        let i = c & (self.g.rb_entries() - 1);
        Ok(get_refcount(self.rb.get(off), self.g.refcount_order, i))
    }

    async fn put_refcount(
        &mut self,
        f: &Node,
        c: u64,
        v: u64,
        avoid: (u64, u64),
    ) -> Result<(), BlockError> {
        let bi = c >> self.g.rb_bits;
        let mut off = self.refblock_offset(bi)?;
        if off == 0 {
            if v == 0 {
                return Ok(());
            }
            off = self.new_refblock(f, bi, avoid).await?;
        }
        self.load_rb(f, off).await?;
        let i = c & (self.g.rb_entries() - 1);
        set_refcount(self.rb.get_mut(off), self.g.refcount_order, i, v);
        Ok(())
    }

    /// Adds `delta` to the refcount of cluster `c`.
    pub async fn update_refcount(
        &mut self,
        f: &Node,
        c: u64,
        delta: i64,
        avoid: (u64, u64),
    ) -> Result<u64, BlockError> {
        let old = self.refcount(f, c).await?;
        // Below zero is corruption; past the maximum (of the width, or of
        // a u64 with 64-bit refcounts) a limit of the format.
        let new = match old.checked_add_signed(delta) {
            Some(n) => Some(n),
            None if delta < 0 => {
                return Err(self.corrupt_err(format!(
                    "refcount of cluster {c} would go from {old} by {delta}"
                )))
            }
            None => None,
        };
        let Some(new) = new.filter(|&n| n <= self.g.max_refcount()) else {
            return Err(BlockError::Unsupported {
                node: self.node.clone(),
                reason: format!(
                    "refcount of cluster {c} would exceed {} (refcount_bits {})",
                    self.g.max_refcount(),
                    1 << self.g.refcount_order
                ),
            });
        };
        self.put_refcount(f, c, new, avoid).await?;
        if new == 0 {
            self.free_hint = self.free_hint.min(c);
        }
        Ok(new)
    }

    /// Creates the refcount block for block index `bi`, placed in a
    /// cluster it covers itself (all of them are free: none has a count).
    async fn new_refblock(
        &mut self,
        f: &Node,
        bi: u64,
        avoid: (u64, u64),
    ) -> Result<u64, BlockError> {
        f.debug_event(Ev::RefblockAlloc);
        if bi >= self.reftable.len() as u64 {
            f.debug_event(Ev::ReftableGrow);
            self.grow_reftable(f, bi, avoid).await?;
            let off = self.refblock_offset(bi)?;
            if off != 0 {
                return Ok(off);
            }
        }
        let first = bi << self.g.rb_bits;
        let last = first + self.g.rb_entries();
        let own = (first..last).find(|c| !(avoid.0..avoid.1).contains(c));
        // A run being counted that covers the whole block (a large L1
        // table, say): the block goes past the run and everything in use,
        // and is counted where that cluster's block says.
        let r = own.unwrap_or_else(|| self.end_cluster.max(avoid.1));
        if own.is_none() && self.refcount(f, r).await? != 0 {
            return Err(self.corrupt_err(format!(
                "cluster {r}, past the end of the image, is already counted"
            )));
        }
        let off = r << self.g.cluster_bits;
        self.make_room_rb(f).await?;
        let mut bytes = vec![0u8; self.g.cs as usize];
        if own.is_some() {
            set_refcount(&mut bytes, self.g.refcount_order, r - first, 1);
        }
        // QEMU writes the block, then the table entry, here; ours go out
        // with the next refcount write-back (blocks first, then table).
        f.debug_event(Ev::RefblockAllocWrite);
        self.rb.insert(off, bytes, true);
        f.debug_event(Ev::RefblockAllocHookup);
        self.reftable[bi as usize] = off;
        self.reftable_dirty
            .insert(((bi * 8) >> self.g.cluster_bits) as usize);
        self.rb_set.insert(r);
        self.end_cluster = self.end_cluster.max(r + 1);
        if own.is_none() {
            // The run and this block are avoided by blocks created for it.
            let fut: futures::future::LocalBoxFuture<'_, _> =
                Box::pin(self.update_refcount(f, r, 1, (avoid.0, r + 1)));
            fut.await?;
        }
        Ok(off)
    }

    /// Replaces the refcount table by a larger one covering block index
    /// `bi`. The new table and the refcount blocks it needs for itself go
    /// past every cluster in use, and the header switches to it only once
    /// they are on disk.
    async fn grow_reftable(
        &mut self,
        f: &Node,
        bi: u64,
        avoid: (u64, u64),
    ) -> Result<(), BlockError> {
        let g = self.g;
        let too_large = || BlockError::Unsupported {
            node: self.node.clone(),
            reason: "the refcount table would exceed its maximum size".into(),
        };
        // Before anything is sized by `bi` (a cluster index from the image:
        // a corrupt entry may name any cluster up to 2^56).
        if bi >= header::MAX_REFTABLE_BYTES / 8 {
            return Err(too_large());
        }
        let old_entries = self.reftable.len() as u64;
        let start = self.end_cluster.max(avoid.1);
        let mut k = 0u64;
        let mut m;
        loop {
            let mut entries = (bi + 1).max(old_entries * 2);
            m = (entries * 8).div_ceil(g.cs);
            let end = start + k + m;
            entries = entries.max(end.div_ceil(g.rb_entries()));
            m = (entries * 8).div_ceil(g.cs);
            if m * g.cs > header::MAX_REFTABLE_BYTES {
                return Err(too_large());
            }
            let end = start + k + m;
            let missing = ((start >> g.rb_bits)..=((end - 1) >> g.rb_bits))
                .filter(|&b| b >= old_entries || self.reftable[b as usize] == 0)
                .count() as u64;
            if missing <= k {
                break;
            }
            k = missing;
        }
        let mut table = self.reftable.clone();
        table.resize((m * g.cs / 8) as usize, 0);
        // New refcount blocks for the new clusters' block indexes.
        let end = start + k + m;
        let mut next = start;
        let mut new_blocks = Vec::new();
        for b in (start >> g.rb_bits)..=((end - 1) >> g.rb_bits) {
            if table[b as usize] == 0 {
                table[b as usize] = next << g.cluster_bits;
                new_blocks.push((b, next));
                next += 1;
            }
        }
        for &(_, c) in &new_blocks {
            self.rb_set.insert(c);
        }
        let table_start = start + k;
        // Counts for the new clusters: blocks of new_blocks live in memory
        // first; existing blocks go through the cache.
        self.reftable = table;
        self.end_cluster = end;
        for &(_, c) in &new_blocks {
            self.make_room_rb(f).await?;
            self.rb
                .insert(c << g.cluster_bits, vec![0u8; g.cs as usize], true);
        }
        for c in start..end {
            // Every block these clusters need exists now, so this does not
            // recurse into growing again; boxed to let the types recurse.
            let fut: futures::future::LocalBoxFuture<'_, _> =
                Box::pin(self.update_refcount(f, c, 1, (start, end)));
            fut.await?;
        }
        // In memory the new table is the one; on disk the header points to
        // the old one until the switch is done. A failed write leaves the
        // switch pending: it is retried before any other refcount
        // write-back (which would otherwise write entries past the old
        // table's end).
        self.pending_reftable = Some((table_start << g.cluster_bits, m as u32));
        self.finish_reftable_switch(f).await
    }

    /// Writes a grown refcount table and switches the header to it:
    /// everything the new table points to goes to disk, then the table,
    /// then the header, each synced; then the old table is released.
    async fn finish_reftable_switch(&mut self, f: &Node) -> Result<(), BlockError> {
        let Some((table_off, m)) = self.pending_reftable else {
            return Ok(());
        };
        let g = self.g;
        f.debug_event(Ev::RefblockAllocWriteBlocks);
        self.write_refblocks(f).await?;
        f.flush().await?;
        let bytes = encode_be64(&self.reftable);
        f.debug_event(Ev::RefblockAllocWriteTable);
        write_buf(f, table_off, &bytes).await?;
        f.flush().await?;
        let mut field = Vec::with_capacity(12);
        field.extend_from_slice(&table_off.to_be_bytes());
        field.extend_from_slice(&m.to_be_bytes());
        f.debug_event(Ev::RefblockAllocSwitchTable);
        self.write_header_field(f, header::OFF_REFTABLE, &field)
            .await?;
        f.flush().await?;
        self.pending_reftable = None;
        let old_off = self.reftable_offset;
        let old_clusters = u64::from(self.reftable_clusters);
        self.reftable_offset = table_off;
        self.reftable_clusters = m;
        self.reftable_dirty.clear();
        if let Some(fx) = self
            .fixed
            .iter_mut()
            .find(|(_, _, w)| w == "the refcount table")
        {
            *fx = (
                table_off,
                table_off + u64::from(m) * g.cs,
                "the refcount table".into(),
            );
        }
        // The old table is no longer referenced by the (synced) header.
        for c in 0..old_clusters {
            let fut: futures::future::LocalBoxFuture<'_, _> =
                Box::pin(self.update_refcount(f, (old_off >> g.cluster_bits) + c, -1, (0, 0)));
            fut.await?;
        }
        Ok(())
    }

    /// Allocates `n` contiguous clusters; returns the first one's offset.
    pub async fn alloc(&mut self, f: &Node, n: u64) -> Result<u64, BlockError> {
        f.debug_event(Ev::ClusterAlloc);
        if self.corrupt {
            return Err(self.corrupt_err("the image is marked corrupt"));
        }
        let mut start = self.free_hint;
        // The first free cluster seen: where the next search starts.
        let mut first_free = None;
        // Past everything in use, clusters are free in a sound image; a
        // long run of counted ones there means broken refcounts, and
        // scanning on could take forever on a hostile image.
        let limit = self.end_cluster + n + (1 << 16);
        'search: loop {
            for i in 0..n {
                if start + i > limit {
                    self.corrupt = true;
                    return Err(self.corrupt_err(format!(
                        "refcounts claim clusters past cluster {limit}, beyond the end of the file"
                    )));
                }
                if self.refcount(f, start + i).await? != 0 {
                    start += i + 1;
                    continue 'search;
                }
                first_free.get_or_insert(start + i);
            }
            break;
        }
        if start << self.g.cluster_bits > OFFSET_MASK {
            return Err(BlockError::Unsupported {
                node: self.node.clone(),
                reason: "the image file would exceed the largest qcow2 offset".into(),
            });
        }
        for c in start..start + n {
            self.update_refcount(f, c, 1, (start, start + n)).await?;
        }
        self.free_hint = match first_free {
            Some(ff) if ff < start => ff,
            _ => start + n,
        };
        self.end_cluster = self.end_cluster.max(start + n);
        let off = start << self.g.cluster_bits;
        if let Some(what) = self.overlap(off, n << self.g.cluster_bits) {
            self.corrupt = true;
            return Err(self.corrupt_err(format!("allocated cluster {start} overlaps {what}")));
        }
        Ok(off)
    }

    /// Queues an unreference of host cluster `c` until the tables that
    /// dropped it are on disk.
    pub fn queue_unref(&mut self, c: u64) {
        self.pending_unref.push(c);
    }

    /// The host clusters a compressed entry's data touches.
    pub fn compressed_clusters(&self, entry: u64) -> std::ops::RangeInclusive<u64> {
        let (off, len) = self.g.compressed(entry & !COPIED);
        (off >> self.g.cluster_bits)..=((off + len - 1) >> self.g.cluster_bits)
    }

    /// Applies queued unreferences that are safe now.
    pub async fn apply_unrefs(
        &mut self,
        f: &Node,
        no_io_in_flight: bool,
    ) -> Result<(), BlockError> {
        if !no_io_in_flight || self.ready_unref.is_empty() {
            return Ok(());
        }
        let list = std::mem::take(&mut self.ready_unref);
        f.debug_event(Ev::ClusterFree);
        for c in list {
            let left = self.update_refcount(f, c, -1, (0, 0)).await?;
            if left == 0 && self.pass_discard {
                let _ = f.pdiscard(c << self.g.cluster_bits, self.g.cs).await;
            }
        }
        Ok(())
    }

    async fn write_refblocks(&mut self, f: &Node) -> Result<bool, BlockError> {
        let dirty = self.rb.dirty();
        for &off in &dirty {
            let bytes = self.rb.get(off).clone();
            f.debug_event(Ev::RefblockUpdatePart);
            write_buf(f, off, &bytes).await?;
            self.rb.mark_clean(off);
        }
        Ok(!dirty.is_empty())
    }

    /// Writes refcount blocks, then the refcount table clusters that point
    /// to new ones, each stage synced.
    pub async fn flush_refcounts(&mut self, f: &Node) -> Result<(), BlockError> {
        if self.pending_reftable.is_some() {
            let fut: futures::future::LocalBoxFuture<'_, _> =
                Box::pin(self.finish_reftable_switch(f));
            fut.await?;
        }
        if self.write_refblocks(f).await? {
            f.flush().await?;
        }
        if !self.reftable_dirty.is_empty() {
            let dirty: Vec<usize> = self.reftable_dirty.iter().copied().collect();
            for ci in dirty {
                let per = (self.g.cs / 8) as usize;
                let bytes = encode_be64(&self.reftable[ci * per..(ci + 1) * per]);
                f.debug_event(Ev::ReftableUpdate);
                write_buf(f, self.reftable_offset + ci as u64 * self.g.cs, &bytes).await?;
                // Only once written: a failed write is retried next time.
                self.reftable_dirty.remove(&ci);
            }
            f.flush().await?;
        }
        Ok(())
    }

    /// Writes every dirty table in the crash-safe order, all but the last
    /// sync. Returns the queued unreferences those tables cover: they are
    /// safe once the caller's final sync completes ([`Meta::unrefs_durable`]).
    pub async fn write_tables(&mut self, f: &Node) -> Result<Vec<u64>, BlockError> {
        let covered = std::mem::take(&mut self.pending_unref);
        let r = self.write_tables_inner(f).await;
        if r.is_err() {
            // Nothing is known to be on disk: keep them queued.
            let mut back = covered;
            back.append(&mut self.pending_unref);
            self.pending_unref = back;
            return r.map(|()| Vec::new());
        }
        Ok(covered)
    }

    async fn write_tables_inner(&mut self, f: &Node) -> Result<(), BlockError> {
        if !self.lazy {
            self.flush_refcounts(f).await?;
        }
        let dirty = self.l2.dirty();
        for &off in &dirty {
            let bytes = encode_be64(self.l2.get(off));
            f.debug_event(Ev::L2Update);
            write_buf(f, off, &bytes).await?;
            self.l2.mark_clean(off);
        }
        if !self.l1_dirty.is_empty() {
            if !dirty.is_empty() {
                f.flush().await?;
            }
            let per = (self.g.cs / 8) as usize;
            let dirty: Vec<usize> = self.l1_dirty.iter().copied().collect();
            for ci in dirty {
                let bytes = encode_be64(&self.l1[ci * per..(ci + 1) * per]);
                f.debug_event(Ev::L1Update);
                write_buf(f, self.l1_offset + ci as u64 * self.g.cs, &bytes).await?;
                // Only once written: a failed write is retried next time.
                self.l1_dirty.remove(&ci);
            }
        }
        Ok(())
    }

    /// Unreferences covered by tables now on disk may be applied.
    pub fn unrefs_durable(&mut self, covered: Vec<u64>) {
        self.ready_unref.extend(covered);
    }

    /// Writes every dirty table in the crash-safe order and syncs.
    pub async fn flush(&mut self, f: &Node, no_io_in_flight: bool) -> Result<(), BlockError> {
        let covered = self.write_tables(f).await?;
        f.flush().await?;
        self.unrefs_durable(covered);
        self.apply_unrefs(f, no_io_in_flight).await
    }

    /// Writes everything including refcounts (lazy refcounts or not).
    pub async fn flush_all(&mut self, f: &Node, no_io_in_flight: bool) -> Result<(), BlockError> {
        self.flush(f, no_io_in_flight).await?;
        self.flush_refcounts(f).await?;
        f.flush().await
    }

    /// Switches to a refcount structure built elsewhere (already on disk).
    pub fn replace_refcounts(&mut self, table: Vec<u64>, offset: u64, clusters: u32, end: u64) {
        self.rb_set = table
            .iter()
            .map(|e| (e & OFFSET_MASK) >> self.g.cluster_bits)
            .filter(|&c| c != 0)
            .collect();
        self.reftable = table;
        self.reftable_offset = offset;
        self.reftable_clusters = clusters;
        self.reftable_dirty.clear();
        self.pending_reftable = None;
        self.rb.clear();
        self.end_cluster = self.end_cluster.max(end);
        self.free_hint = 0;
        if let Some(fx) = self
            .fixed
            .iter_mut()
            .find(|(_, _, w)| w == "the refcount table")
        {
            *fx = (
                offset,
                offset + u64::from(clusters) * self.g.cs,
                "the refcount table".into(),
            );
        }
    }

    /// Rewrites header bytes at `at` (read-modify-write of the aligned
    /// start of the file).
    pub async fn write_header_field(
        &mut self,
        f: &Node,
        at: u64,
        data: &[u8],
    ) -> Result<(), BlockError> {
        let mut hdr = read_buf(f, 0, self.header_io).await?;
        hdr[at as usize..at as usize + data.len()].copy_from_slice(data);
        write_buf(f, 0, &hdr).await
    }

    /// Grows the L1 table to `entries` (for a resize): a new table is
    /// written, then the header points to it.
    pub async fn grow_l1(
        &mut self,
        f: &Node,
        entries: u64,
        new_size: u64,
    ) -> Result<(), BlockError> {
        let g = self.g;
        if entries * 8 > header::MAX_L1_BYTES {
            return Err(BlockError::Unsupported {
                node: self.node.clone(),
                reason: format!("an L1 table of {entries} entries would be too large"),
            });
        }
        self.flush(f, false).await?;
        let clusters = (entries * 8).div_ceil(g.cs);
        f.debug_event(Ev::L1GrowAllocTable);
        let new = self.alloc(f, clusters).await?;
        let mut table = self.l1.clone();
        table.resize((clusters * g.cs / 8) as usize, 0);
        self.flush_refcounts(f).await?;
        f.debug_event(Ev::L1GrowWriteTable);
        write_buf(f, new, &encode_be64(&table)).await?;
        f.flush().await?;
        // size, crypt_method, l1_size, l1_table_offset: one write.
        let mut field = Vec::with_capacity(24);
        field.extend_from_slice(&new_size.to_be_bytes());
        field.extend_from_slice(&self.crypt_method.to_be_bytes());
        field.extend_from_slice(&(entries as u32).to_be_bytes());
        field.extend_from_slice(&new.to_be_bytes());
        f.debug_event(Ev::L1GrowActivateTable);
        self.write_header_field(f, header::OFF_SIZE, &field).await?;
        f.flush().await?;
        let old = self.l1_offset;
        let old_clusters = (u64::from(self.l1_size) * 8).div_ceil(g.cs);
        self.l1 = table;
        self.l1_offset = new;
        self.l1_size = entries as u32;
        if let Some(fx) = self
            .fixed
            .iter_mut()
            .find(|(_, _, w)| w == "the active L1 table")
        {
            *fx = (new, new + entries * 8, "the active L1 table".into());
        }
        for c in 0..old_clusters {
            self.update_refcount(f, (old >> g.cluster_bits) + c, -1, (0, 0))
                .await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refcount_widths_round_trip() {
        for order in 0..=6u32 {
            let mut b = vec![0u8; 512];
            let bits = 1u64 << order;
            let max = if bits == 64 {
                u64::MAX
            } else {
                (1 << bits) - 1
            };
            let n = 512 * 8 / bits;
            for i in 0..n {
                set_refcount(&mut b, order, i, (i * 7 + 3) & max);
            }
            for i in 0..n {
                assert_eq!(
                    get_refcount(&b, order, i),
                    (i * 7 + 3) & max,
                    "order {order}"
                );
            }
        }
        // 1-bit refcounts are stored lowest bit first, as QEMU does.
        let mut b = vec![0u8; 1];
        set_refcount(&mut b, 0, 0, 1);
        assert_eq!(b[0], 1);
        // 16-bit refcounts are big-endian.
        let mut b = vec![0u8; 2];
        set_refcount(&mut b, 4, 0, 0x0102);
        assert_eq!(b, [1, 2]);
    }
}

#[cfg(test)]
#[path = "meta_tests.rs"]
mod meta_tests;
