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
const MAX_BITMAPS: u32 = 65535;
const MAX_DIR_BYTES: u64 = 64 << 20;

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

/// Reads the bitmaps extension's data (`ext`, 24 bytes): the bitmaps and
/// where they are stored.
pub async fn load(
    f: &Node,
    m: &Meta,
    ext: &[u8],
    size: u64,
) -> Result<(Vec<Arc<DirtyBitmap>>, OnDisk), String> {
    if ext.len() < 24 {
        return Err("the bitmaps extension is too short".into());
    }
    let g = m.g;
    let nb = be32(ext, 0);
    let dir_len = be64(ext, 8);
    let dir_offset = be64(ext, 16);
    if nb > MAX_BITMAPS || dir_len > MAX_DIR_BYTES || dir_offset % g.cs != 0 {
        return Err("the bitmap directory is invalid".into());
    }
    let io = |e: BlockError| e.to_string();
    let dir = meta::read_buf(f, dir_offset, dir_len.div_ceil(512) as usize * 512)
        .await
        .map_err(io)?;
    let mut out = Vec::new();
    let mut disk = OnDisk {
        dir_offset,
        dir_len,
        ..Default::default()
    };
    let mut off = 0usize;
    for _ in 0..nb {
        if off + 24 > dir.len() {
            return Err("the bitmap directory is truncated".into());
        }
        let table_offset = be64(&dir, off);
        let table_entries = be32(&dir, off + 8);
        let flags = be32(&dir, off + 12);
        let ty = dir[off + 16];
        let gbits = u32::from(dir[off + 17]);
        let name_len = u16::from_be_bytes([dir[off + 18], dir[off + 19]]) as usize;
        let extra_len = be32(&dir, off + 20) as usize;
        let flag_at = off as u64 + 12;
        let end = off + 24 + extra_len + name_len;
        if end > dir.len() || extra_len > 1024 {
            return Err("a bitmap directory entry is truncated".into());
        }
        let name = String::from_utf8_lossy(&dir[off + 24 + extra_len..end]).into_owned();
        off = end.div_ceil(8) * 8;
        disk.tables.push(Stored {
            table_offset,
            table_entries,
        });
        disk.flag_offsets.push(flag_at);
        if ty != TYPE_DIRTY || !(9..=31).contains(&gbits) {
            return Err(format!(
                "bitmap '{name}' has an unknown type or granularity"
            ));
        }
        if flags & IN_USE != 0 {
            log::warn!("bitmap '{name}' was not stored cleanly (in use); it is dropped");
            continue;
        }
        let b = DirtyBitmap::new(&name, size, 1 << gbits, flags & AUTO != 0, true)?;
        let bytes = size.div_ceil(1 << gbits).div_ceil(8);
        let need = bytes.div_ceil(g.cs);
        if u64::from(table_entries) < need || table_offset % g.cs != 0 {
            return Err(format!("bitmap '{name}' has an invalid table"));
        }
        let table = meta::decode_be64(
            &meta::read_buf(
                f,
                table_offset,
                (u64::from(table_entries) * 8).div_ceil(512) as usize * 512,
            )
            .await
            .map_err(io)?,
        );
        let mut data = vec![0u8; (need * g.cs) as usize];
        for (i, &e) in table.iter().take(need as usize).enumerate() {
            let at = i * g.cs as usize;
            let chunk = &mut data[at..at + g.cs as usize];
            match (e & OFFSET_MASK, e & 1) {
                (0, 0) => {}
                (0, _) => chunk.fill(0xff),
                (o, _) => {
                    chunk.copy_from_slice(&meta::read_buf(f, o, g.cs as usize).await.map_err(io)?)
                }
            }
        }
        data.truncate(bytes as usize);
        let words: Vec<u64> = data
            .chunks(8)
            .map(|c| {
                let mut w = [0u8; 8];
                w[..c.len()].copy_from_slice(c);
                u64::from_le_bytes(w)
            })
            .collect();
        b.restore(&words);
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
