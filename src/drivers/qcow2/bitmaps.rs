//! Persistent dirty bitmaps: the qcow2 bitmaps extension (header extension
//! 0x23852875, bitmap directory, bitmap tables, bitmap data clusters;
//! docs/interop/qcow2.txt, "Bitmaps extension").
//!
//! Bitmaps are loaded at open. A writable open marks them in use on disk
//! (so a crash leaves them marked inconsistent, as QEMU does); a clean
//! close writes them out afresh: new data clusters, tables and directory
//! first, then the header extension that points at them, then the old
//! clusters are freed. Bitmaps found in use (inconsistent) are dropped with
//! a warning, and their clusters freed at the next close.

use std::sync::Arc;

use crate::block::bitmap::DirtyBitmap;
use crate::block::{BlockError, Node};

use super::header::{self, OFFSET_MASK};
use super::meta::{self, Meta};

const IN_USE: u32 = 1;
const AUTO: u32 = 2;
const TYPE_DIRTY: u8 = 1;
/// QEMU's limits (block/qcow2.h, block/qcow2-bitmap.c): QCOW2_MAX_BITMAPS,
/// QCOW2_MAX_BITMAP_DIRECTORY_SIZE, BME_MAX_TABLE_SIZE, BME_MAX_PHYS_SIZE,
/// BME_{MIN,MAX}_GRANULARITY_BITS, BME_MAX_NAME_SIZE, BME_RESERVED_FLAGS,
/// BME_TABLE_ENTRY_RESERVED_MASK.
const MAX_BITMAPS: u32 = 65535;
const MAX_DIR_BYTES: u64 = 1024 * MAX_BITMAPS as u64;
const MAX_TABLE_ENTRIES: u64 = 0x800_0000;
const MAX_PHYS_BYTES: u64 = 0x2000_0000;
const MIN_GRANULARITY_BITS: u32 = 9;
const MAX_GRANULARITY_BITS: u32 = 31;
const MAX_NAME: usize = 1023;
const RESERVED_FLAGS: u32 = 0xffff_fffc;
const TABLE_RESERVED: u64 = 0xff00_0000_0000_01fe;
/// All the bitmaps of one image together take at most this much memory
/// (QEMU bounds each bitmap by BME_MAX_PHYS_SIZE but not their sum), and
/// their tables at most this many bytes (each table is at most 8 MiB; 65535
/// of them sharing one place in the file would be 512 GiB to read).
const MAX_TOTAL_BYTES: u64 = MAX_PHYS_BYTES;
const MAX_TOTAL_TABLE_BYTES: u64 = 64 << 20;

/// Where one stored bitmap lives (to free it when it is rewritten).
#[derive(Debug, Clone)]
pub struct Stored {
    pub table_offset: u64,
    pub table_entries: u32,
}

/// What the image holds: the directory and each bitmap's table.
#[derive(Debug, Clone, Default)]
pub struct OnDisk {
    pub dir_offset: u64,
    pub dir_len: u64,
    pub tables: Vec<Stored>,
    /// Byte offsets (in the directory) of each entry's flags field.
    flag_offsets: Vec<u64>,
}

fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes(b[o..o + 4].try_into().unwrap_or([0; 4]))
}

fn be64(b: &[u8], o: usize) -> u64 {
    u64::from_be_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]))
}

/// One bitmap directory entry, checked.
struct DirEntry {
    table_offset: u64,
    table_entries: u32,
    flags: u32,
    gbits: u32,
    name: String,
    /// Byte offset of the flags field in the directory.
    flag_at: u64,
}

/// Checks one directory entry as QEMU's check_dir_entry does; the error
/// names the field.
fn check_entry(e: &DirEntry, ty: u8, cs: u64, size: u64, file_size: u64) -> Result<(), String> {
    let bad = |what: String| {
        Err(format!(
            "Bitmap '{}' doesn't satisfy the constraints: {what}",
            e.name
        ))
    };
    let entries = u64::from(e.table_entries);
    if entries == 0 {
        return bad("bitmap_table_size is 0".into());
    }
    if entries > MAX_TABLE_ENTRIES {
        return bad(format!(
            "bitmap_table_size {entries} is more than {MAX_TABLE_ENTRIES}"
        ));
    }
    let phys = entries * cs;
    if phys > MAX_PHYS_BYTES {
        return bad(format!(
            "bitmap_table_size {entries} (x {cs}-byte clusters) is more than {} MiB",
            MAX_PHYS_BYTES >> 20
        ));
    }
    if e.table_offset == 0 || e.table_offset % cs != 0 {
        return bad(format!(
            "bitmap_table_offset {:#x} is not a cluster aligned offset",
            e.table_offset
        ));
    }
    if e.table_offset
        .checked_add(entries * 8)
        .is_none_or(|end| end > file_size)
    {
        return bad(format!(
            "the bitmap table at bitmap_table_offset {:#x} ({entries} entries) is beyond the end of the file",
            e.table_offset
        ));
    }
    if !(MIN_GRANULARITY_BITS..=MAX_GRANULARITY_BITS).contains(&e.gbits) {
        return bad(format!(
            "granularity_bits {} is outside {MIN_GRANULARITY_BITS}..={MAX_GRANULARITY_BITS}",
            e.gbits
        ));
    }
    if e.flags & RESERVED_FLAGS != 0 {
        return bad(format!("flags {:#x} has reserved bits set", e.flags));
    }
    if ty != TYPE_DIRTY {
        return bad(format!("type {ty} is not a dirty tracking bitmap"));
    }
    // A bitmap stored cleanly must cover the image; one in use may be
    // stale (QEMU's rule).
    if e.flags & IN_USE == 0 && size.div_ceil(1 << e.gbits).div_ceil(8) > phys {
        return bad(format!(
            "bitmap_table_size {entries} is too small for {size} bytes at granularity {}",
            1u64 << e.gbits
        ));
    }
    Ok(())
}

/// Reads and checks the bitmap directory (QEMU's bitmap_list_load).
fn parse_dir(
    dir: &[u8],
    nb: u32,
    cs: u64,
    size: u64,
    file_size: u64,
) -> Result<Vec<DirEntry>, String> {
    let mut out = Vec::new();
    let mut names = std::collections::HashSet::new();
    let mut off = 0usize;
    while off < dir.len() {
        if off + 24 > dir.len() {
            return Err("Broken bitmap directory: an entry runs past bitmap_directory_size".into());
        }
        if out.len() as u64 >= u64::from(nb) {
            return Err(format!(
                "More bitmaps found than specified in header extension (nb_bitmaps {nb})"
            ));
        }
        let table_offset = be64(dir, off);
        let table_entries = be32(dir, off + 8);
        let flags = be32(dir, off + 12);
        let ty = dir[off + 16];
        let gbits = u32::from(dir[off + 17]);
        let name_len = u16::from_be_bytes([dir[off + 18], dir[off + 19]]) as usize;
        let extra_len = be32(dir, off + 20) as usize;
        let end = (off + 24)
            .checked_add(extra_len)
            .and_then(|e| e.checked_add(name_len))
            .filter(|&e| e <= dir.len())
            .ok_or("Broken bitmap directory: an entry runs past bitmap_directory_size")?;
        let name = String::from_utf8_lossy(&dir[end - name_len..end]).into_owned();
        if extra_len != 0 {
            return Err(format!(
                "Bitmap extra data is not supported: bitmap '{name}' has extra_data_size {extra_len}"
            ));
        }
        if name_len > MAX_NAME {
            return Err(format!(
                "Bitmap '{name}' doesn't satisfy the constraints: name_size {name_len} is more than {MAX_NAME}"
            ));
        }
        if !names.insert(name.clone()) {
            return Err(format!(
                "Bitmap '{name}' is stored twice in the bitmap directory"
            ));
        }
        let e = DirEntry {
            table_offset,
            table_entries,
            flags,
            gbits,
            name,
            flag_at: off as u64 + 12,
        };
        check_entry(&e, ty, cs, size, file_size)?;
        out.push(e);
        off = end.div_ceil(8) * 8;
    }
    if out.len() as u64 != u64::from(nb) {
        return Err(format!(
            "Less bitmaps found than specified in header extension (nb_bitmaps {nb}, found {})",
            out.len()
        ));
    }
    Ok(out)
}

/// Reads a bitmap table and checks its entries (QEMU's check_table_entry).
async fn load_table(f: &Node, e: &DirEntry, cs: u64, file_size: u64) -> Result<Vec<u64>, String> {
    let n = u64::from(e.table_entries);
    // Bounded by check_entry: at most MAX_PHYS_BYTES / 512 * 8 bytes.
    let bytes = (n * 8).div_ceil(512) * 512;
    let table = meta::decode_be64(
        &meta::read_buf(f, e.table_offset, bytes as usize)
            .await
            .map_err(|err| err.to_string())?,
    );
    let mut table = table;
    table.truncate(n as usize);
    for (i, &t) in table.iter().enumerate() {
        let off = t & OFFSET_MASK;
        let bad = t & TABLE_RESERVED != 0
            || (off != 0 && (t & 1 != 0 || off % cs != 0 || off >= file_size));
        if bad {
            return Err(format!(
                "Could not read bitmap_table table from image for bitmap '{}': entry {i} ({t:#x}) is invalid",
                e.name
            ));
        }
    }
    Ok(table)
}

/// Reads the bitmaps extension's data (`ext`, 24 bytes): the bitmaps and
/// where they are stored. Every field is checked against QEMU's limits
/// before anything is allocated by it.
pub async fn load(
    f: &Node,
    m: &Meta,
    ext: &[u8],
    size: u64,
) -> Result<(Vec<Arc<DirtyBitmap>>, OnDisk), String> {
    if ext.len() != header::BITMAPS_EXT_LEN {
        return Err("bitmaps_ext: Invalid extension length".into());
    }
    let g = m.g;
    let file_size = f.size();
    let nb = be32(ext, 0);
    let reserved = be32(ext, 4);
    let dir_len = be64(ext, 8);
    let dir_offset = be64(ext, 16);
    if reserved != 0 {
        return Err(format!(
            "bitmaps_ext: Reserved field is not zero ({reserved:#x})"
        ));
    }
    if nb > MAX_BITMAPS {
        return Err(format!(
            "bitmaps_ext: Image has {nb} bitmaps, exceeding the QEMU supported maximum of {MAX_BITMAPS}"
        ));
    }
    if nb == 0 {
        return Err("found bitmaps extension with zero bitmaps".into());
    }
    if dir_offset % g.cs != 0 || dir_offset == 0 {
        return Err(format!(
            "bitmaps_ext: invalid bitmap directory offset {dir_offset:#x}"
        ));
    }
    if dir_len > MAX_DIR_BYTES {
        return Err(format!(
            "bitmaps_ext: bitmap directory size ({dir_len}) exceeds the maximum supported size ({MAX_DIR_BYTES})"
        ));
    }
    if dir_len < 24 {
        return Err(format!(
            "bitmaps_ext: bitmap directory size ({dir_len}) is too small for one bitmap"
        ));
    }
    if dir_offset
        .checked_add(dir_len)
        .is_none_or(|e| e > file_size)
    {
        return Err(format!(
            "bitmaps_ext: the bitmap directory at {dir_offset:#x} ({dir_len} bytes) is beyond the end of the file"
        ));
    }
    let io = |e: BlockError| e.to_string();
    let mut dir = meta::read_buf(f, dir_offset, dir_len.div_ceil(512) as usize * 512)
        .await
        .map_err(io)?;
    dir.truncate(dir_len as usize);
    let entries = parse_dir(&dir, nb, g.cs, size, file_size)?;
    let mut total = 0u64;
    let mut tables = 0u64;
    for e in &entries {
        if e.flags & IN_USE == 0 {
            total += size.div_ceil(1 << e.gbits).div_ceil(8);
        }
        tables += u64::from(e.table_entries) * 8;
    }
    if tables > MAX_TOTAL_TABLE_BYTES {
        return Err(format!(
            "the bitmap tables (bitmap_table_size) take {tables} bytes together, more than {} MiB",
            MAX_TOTAL_TABLE_BYTES >> 20
        ));
    }
    if total > MAX_TOTAL_BYTES {
        return Err(format!(
            "the persistent bitmaps would take {total} bytes of memory, more than {} MiB",
            MAX_TOTAL_BYTES >> 20
        ));
    }
    let mut out = Vec::new();
    let mut disk = OnDisk {
        dir_offset,
        dir_len,
        ..Default::default()
    };
    for e in &entries {
        // Tables of bitmaps in use are checked too: close frees them.
        let table = load_table(f, e, g.cs, file_size).await?;
        disk.tables.push(Stored {
            table_offset: e.table_offset,
            table_entries: e.table_entries,
        });
        disk.flag_offsets.push(e.flag_at);
        let name = &e.name;
        if e.flags & IN_USE != 0 {
            log::warn!("bitmap '{name}' was not stored cleanly (in use); it is dropped");
            continue;
        }
        let gran = 1u64 << e.gbits;
        let b = DirtyBitmap::new(name, size, gran, e.flags & AUTO != 0, true)?;
        let bytes = size.div_ceil(gran).div_ceil(8);
        // check_entry: the table covers `bytes`.
        let need = bytes.div_ceil(g.cs);
        let cs = g.cs as usize;
        let mut words = vec![0u64; cs / 8];
        for (i, &t) in table.iter().take(need as usize).enumerate() {
            let chunk = match (t & OFFSET_MASK, t & 1) {
                (0, 0) => continue,
                (0, _) => vec![0xffu8; cs],
                (o, _) => meta::read_buf(f, o, cs).await.map_err(io)?,
            };
            // Bitmap bytes are little-endian words of 64 granules.
            let first = i as u64 * g.cs;
            let valid = (bytes - first).min(g.cs) as usize;
            words.iter_mut().for_each(|w| *w = 0);
            for (k, &byte) in chunk[..valid].iter().enumerate() {
                words[k / 8] |= u64::from(byte) << ((k % 8) * 8);
            }
            b.restore_at((first / 8) as usize, &words[..valid.div_ceil(8)]);
        }
        out.push(Arc::new(b));
    }
    Ok((out, disk))
}

/// Marks every stored bitmap in use (writable open).
pub async fn mark_in_use(f: &Node, disk: &OnDisk) -> Result<(), BlockError> {
    if disk.flag_offsets.is_empty() {
        return Ok(());
    }
    let len = disk.dir_len.div_ceil(512) as usize * 512;
    let mut dir = meta::read_buf(f, disk.dir_offset, len).await?;
    for &at in &disk.flag_offsets {
        let at = at as usize;
        let flags = be32(&dir, at) | IN_USE;
        dir[at..at + 4].copy_from_slice(&flags.to_be_bytes());
    }
    meta::write_buf(f, disk.dir_offset, &dir).await?;
    f.flush().await
}

/// Rewrites the header's extension area with the bitmaps extension set to
/// `ext` (or removed), keeping every other extension and the backing file
/// name; sets or clears the bitmaps autoclear bit.
async fn write_extension(
    f: &Node,
    m: &mut Meta,
    h: &header::Header,
    ext: Option<[u8; 24]>,
) -> Result<(), BlockError> {
    let cs = m.g.cs as usize;
    let len = cs.min(1 << 16);
    let old = meta::read_buf(f, 0, len).await?;
    let hl = h.header_length as usize;
    if hl > len {
        // A header longer than 64 KiB (QEMU allows up to the cluster).
        return Err(BlockError::Unsupported {
            node: m.node.clone(),
            reason: format!(
                "a header_length of {hl} bytes leaves no room for the bitmaps extension here"
            ),
        });
    }
    let mut exts: Vec<(u32, Vec<u8>)> = Vec::new();
    let mut off = hl;
    while off + 8 <= old.len() {
        let ty = be32(&old, off);
        let l = be32(&old, off + 4) as usize;
        off += 8;
        if ty == header::EXT_END || off + l > old.len() {
            break;
        }
        if ty != header::EXT_BITMAPS {
            exts.push((ty, old[off..off + l].to_vec()));
        }
        off += l.div_ceil(8) * 8;
    }
    if let Some(e) = ext {
        exts.push((header::EXT_BITMAPS, e.to_vec()));
    }
    let mut new = old[..hl].to_vec();
    for (ty, data) in &exts {
        new.extend_from_slice(&ty.to_be_bytes());
        new.extend_from_slice(&(data.len() as u32).to_be_bytes());
        new.extend_from_slice(data);
        new.resize(new.len().div_ceil(8) * 8, 0);
    }
    new.extend_from_slice(&[0u8; 8]);
    let backing = m.backing_name_bytes.clone();
    if let Some(name) = &backing {
        let at = new.len() as u64;
        new.extend_from_slice(name);
        new[8..16].copy_from_slice(&at.to_be_bytes());
        new[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
    }
    if new.len() > len {
        return Err(BlockError::Unsupported {
            node: m.node.clone(),
            reason: "the header extensions do not fit in the first cluster".into(),
        });
    }
    let mut autoclear = be64(&old, 88);
    if ext.is_some() {
        autoclear |= 1;
    } else {
        autoclear &= !1;
    }
    new[88..96].copy_from_slice(&autoclear.to_be_bytes());
    new.resize(len, 0);
    meta::write_buf(f, 0, &new).await?;
    f.flush().await
}

/// Writes `bitmaps` (the persistent ones of the node) as the image's
/// bitmaps, replacing what `old` describes. Returns the new layout.
pub async fn store(
    f: &Node,
    m: &mut Meta,
    h: &header::Header,
    bitmaps: &[Arc<DirtyBitmap>],
    old: &OnDisk,
) -> Result<OnDisk, BlockError> {
    let g = m.g;
    if bitmaps.is_empty() && old.tables.is_empty() && old.dir_len == 0 {
        return Ok(OnDisk::default());
    }
    let mut disk = OnDisk::default();
    let mut dir = Vec::new();
    for b in bitmaps {
        let words = b.snapshot();
        let granules = b.size().div_ceil(b.granularity());
        let bytes: Vec<u8> = words
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .take(granules.div_ceil(8) as usize)
            .collect();
        let chunks = (bytes.len() as u64).div_ceil(g.cs).max(1);
        let mut table = vec![0u64; chunks as usize];
        for (i, c) in bytes.chunks(g.cs as usize).enumerate() {
            if c.iter().all(|&x| x == 0) {
                continue;
            }
            let off = m.alloc(f, 1).await?;
            let mut data = c.to_vec();
            data.resize(g.cs as usize, 0);
            meta::write_buf(f, off, &data).await?;
            table[i] = off;
        }
        let tclusters = (chunks * 8).div_ceil(g.cs);
        let toff = m.alloc(f, tclusters).await?;
        let mut tb = meta::encode_be64(&table);
        tb.resize((tclusters * g.cs) as usize, 0);
        meta::write_buf(f, toff, &tb).await?;
        disk.tables.push(Stored {
            table_offset: toff,
            table_entries: chunks as u32,
        });
        let name = b.name().as_bytes();
        let start = dir.len();
        dir.extend_from_slice(&toff.to_be_bytes());
        dir.extend_from_slice(&(chunks as u32).to_be_bytes());
        dir.extend_from_slice(&(if b.is_enabled() { AUTO } else { 0 }).to_be_bytes());
        dir.push(TYPE_DIRTY);
        dir.push(b.granularity().trailing_zeros() as u8);
        dir.extend_from_slice(&(name.len() as u16).to_be_bytes());
        dir.extend_from_slice(&0u32.to_be_bytes());
        dir.extend_from_slice(name);
        dir.resize(dir.len().div_ceil(8) * 8, 0);
        disk.flag_offsets.push(start as u64 + 12);
    }
    let ext = if bitmaps.is_empty() {
        None
    } else {
        let dclusters = (dir.len() as u64).div_ceil(g.cs);
        let doff = m.alloc(f, dclusters).await?;
        let mut d = dir.clone();
        d.resize((dclusters * g.cs) as usize, 0);
        meta::write_buf(f, doff, &d).await?;
        disk.dir_offset = doff;
        disk.dir_len = dir.len() as u64;
        let mut e = [0u8; 24];
        e[0..4].copy_from_slice(&(bitmaps.len() as u32).to_be_bytes());
        e[8..16].copy_from_slice(&disk.dir_len.to_be_bytes());
        e[16..24].copy_from_slice(&doff.to_be_bytes());
        Some(e)
    };
    // Everything new is counted and on disk before the header points at it.
    m.flush_all(f, true).await?;
    write_extension(f, m, h, ext).await?;
    // Then the old layout is free.
    free(f, m, old).await?;
    Ok(disk)
}

async fn free(f: &Node, m: &mut Meta, old: &OnDisk) -> Result<(), BlockError> {
    let g = m.g;
    for t in &old.tables {
        if t.table_offset == 0 || t.table_entries == 0 {
            continue;
        }
        let bytes = u64::from(t.table_entries) * 8;
        let table = meta::decode_be64(
            &meta::read_buf(f, t.table_offset, bytes.div_ceil(512) as usize * 512).await?,
        );
        for &e in table.iter().take(t.table_entries as usize) {
            let o = e & OFFSET_MASK;
            if o != 0 {
                m.update_refcount(f, o >> g.cluster_bits, -1, (0, 0))
                    .await?;
            }
        }
        for c in 0..bytes.div_ceil(g.cs) {
            m.update_refcount(f, (t.table_offset >> g.cluster_bits) + c, -1, (0, 0))
                .await?;
        }
    }
    if old.dir_len > 0 {
        for c in 0..old.dir_len.div_ceil(g.cs) {
            m.update_refcount(f, (old.dir_offset >> g.cluster_bits) + c, -1, (0, 0))
                .await?;
        }
    }
    m.flush_all(f, true).await
}
