//! The qcow2 header, its extensions and the snapshot table, parsed and
//! checked against docs/interop/qcow2.txt before any table is trusted.

use std::collections::BTreeMap;

pub const MAGIC: u32 = 0x5146_49fb; // "QFI\xfb"
pub const EXT_END: u32 = 0;
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
pub const EXT_BITMAPS: u32 = 0x2385_2875;
pub const EXT_CRYPTO: u32 = 0x0537_be77;

pub const INCOMPAT_DIRTY: u64 = 1 << 0;
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;

/// Byte offsets of the header fields we rewrite in place.
pub const OFF_SIZE: u64 = 24;
pub const OFF_REFTABLE: u64 = 48;
pub const OFF_INCOMPAT: u64 = 72;

/// Limits that bound memory and time for hostile images (QEMU's, from
/// block/qcow2.h: QCOW_MAX_L1_SIZE, QCOW_MAX_REFTABLE_SIZE,
/// QCOW_MAX_SNAPSHOTS, QCOW_MAX_SNAPSHOTS_SIZE,
/// QCOW_MAX_SNAPSHOT_EXTRA_DATA; the backing file name of 1023 bytes).
pub const MAX_L1_BYTES: u64 = 32 << 20;
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
pub const MAX_SNAPSHOTS: u32 = 65536;
pub const MAX_SNAPSHOTS_BYTES: u64 = 1024 * MAX_SNAPSHOTS as u64;
pub const MAX_SNAPSHOT_EXTRA: usize = 1024;
pub const MAX_BACKING_NAME: u32 = 1023;
/// The backing format extension holds fewer bytes than QEMU's
/// `backing_format[16]`.
pub const MAX_BACKING_FORMAT: usize = 15;
/// The bitmaps extension's data: nb_bitmaps, reserved, directory size and
/// offset.
pub const BITMAPS_EXT_LEN: usize = 24;
/// Tables (offset + length) must end below this: QEMU passes them to
/// functions taking int64_t (validate_table_offset).
pub const MAX_TABLE_END: u64 = i64::MAX as u64;
/// Host offsets in tables use bits 9..55.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
pub const MAX_IMAGE_SIZE: u64 = 1 << 61;

#[derive(Debug, Clone)]
pub struct Header {
    pub version: u32,
    pub backing_file_offset: u64,
    pub backing_file_size: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible: u64,
    pub compatible: u64,
    pub autoclear: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub compression_type: u8,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
    /// Names from the feature name table: (type, bit) -> name.
    pub feature_names: BTreeMap<(u8, u8), String>,
    /// Extension types present (kept on disk as they are).
    pub extensions: Vec<u32>,
    /// The bitmaps extension's data, if present.
    pub bitmaps_ext: Option<Vec<u8>>,
    /// 0, or 2 (LUKS; 1, the legacy AES, is refused).
    pub crypt_method: u32,
    /// The full disk encryption header pointer (offset, length).
    pub crypto_ext: Option<(u64, u64)>,
}

fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes(b[off..off + 4].try_into().unwrap_or([0; 4]))
}

fn be64(b: &[u8], off: usize) -> u64 {
    u64::from_be_bytes(b[off..off + 8].try_into().unwrap_or([0; 8]))
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    pub fn extended_l2(&self) -> bool {
        self.incompatible & INCOMPAT_EXTL2 != 0
    }

    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    /// Parses the header from the image's first cluster (at least the first
    /// 4 KiB, or all of it when shorter) and checks every field.
    pub fn parse(b: &[u8], file_size: u64) -> Result<Header, String> {
        if b.len() < 72 {
            return Err("image is too short for a qcow2 header".into());
        }
        if be32(b, 0) != MAGIC {
            return Err("not a qcow2 image (bad magic)".into());
        }
        let version = be32(b, 4);
        if version != 2 && version != 3 {
            return Err(format!("unsupported qcow2 version {version}"));
        }
        let cluster_bits = be32(b, 20);
        if !(9..=21).contains(&cluster_bits) {
            return Err(format!(
                "cluster size 2^{cluster_bits} is outside 512 B to 2 MiB"
            ));
        }
        let cluster_size = 1u64 << cluster_bits;
        if b.len() < cluster_size.min(4096) as usize && (b.len() as u64) < file_size {
            return Err("short read of the header".into());
        }
        let mut h = Header {
            version,
            backing_file_offset: be64(b, 8),
            backing_file_size: be32(b, 16),
            cluster_bits,
            size: be64(b, 24),
            l1_size: be32(b, 36),
            l1_table_offset: be64(b, 40),
            refcount_table_offset: be64(b, 48),
            refcount_table_clusters: be32(b, 56),
            nb_snapshots: be32(b, 60),
            snapshots_offset: be64(b, 64),
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order: 4,
            header_length: 72,
            compression_type: 0,
            backing_file: None,
            backing_format: None,
            feature_names: BTreeMap::new(),
            extensions: Vec::new(),
            bitmaps_ext: None,
            crypt_method: 0,
            crypto_ext: None,
        };
        let crypt = be32(b, 32);
        if crypt != 0 && crypt != 2 {
            return Err(format!(
                "encrypted images (crypt_method {crypt}) are not supported (only LUKS, crypt_method 2)"
            ));
        }
        h.crypt_method = crypt;
        if version == 3 {
            if b.len() < 104 {
                return Err("image is too short for a version 3 header".into());
            }
            h.incompatible = be64(b, 72);
            h.compatible = be64(b, 80);
            h.autoclear = be64(b, 88);
            h.refcount_order = be32(b, 96);
            h.header_length = be32(b, 100);
            if h.header_length < 104 || h.header_length % 8 != 0 {
                return Err(format!(
                    "header_length {} must be at least 104 and a multiple of 8",
                    h.header_length
                ));
            }
            if u64::from(h.header_length) > cluster_size.min(b.len() as u64) {
                return Err(format!(
                    "header_length {} is larger than the cluster",
                    h.header_length
                ));
            }
            if h.header_length > 104 {
                h.compression_type = b[104];
            }
        }
        if h.refcount_order > 6 {
            return Err(format!(
                "refcount_order {} is invalid (refcounts are 1 to 64 bits)",
                h.refcount_order
            ));
        }
        if h.backing_file_offset != 0 {
            h.check_backing_offset()?;
        }
        h.parse_extensions(b)?;
        if h.crypt_method == 2 && h.crypto_ext.is_none() {
            return Err("qcow2 LUKS encryption without a crypto header extension".into());
        }
        if h.crypt_method == 0 && h.crypto_ext.is_some() {
            return Err("a crypto header extension in an image that is not encrypted".into());
        }
        h.check_features()?;
        h.check_tables(file_size)?;
        h.read_backing_name(b)?;
        Ok(h)
    }

    fn parse_extensions(&mut self, b: &[u8]) -> Result<(), String> {
        // As QEMU: the extensions end where the backing file name starts
        // (checked to be in the first cluster), else at the cluster's end.
        let mut limit = b.len().min(1 << self.cluster_bits);
        if self.backing_file_offset != 0 {
            limit = limit.min(usize::try_from(self.backing_file_offset).unwrap_or(usize::MAX));
        }
        let mut off = self.header_length as usize;
        loop {
            if off.saturating_add(8) > limit {
                // v2 images may have no end marker when the header fills
                // the cluster; stop at the end of what we read.
                break;
            }
            let ty = be32(b, off);
            let len = be32(b, off + 4) as usize;
            off += 8;
            if ty == EXT_END {
                break;
            }
            if off.saturating_add(len) > limit {
                return Err(format!(
                    "Header extension too large: extension 0x{ty:08x} of {len} bytes runs past the first cluster (or into the backing file name)"
                ));
            }
            let data = &b[off..off + len];
            match ty {
                EXT_BACKING_FORMAT if len > MAX_BACKING_FORMAT => {
                    return Err(format!(
                        "ERROR: ext_backing_format: len={len} too large (>={})",
                        MAX_BACKING_FORMAT + 1
                    ));
                }
                EXT_BITMAPS if len != BITMAPS_EXT_LEN => {
                    return Err(format!(
                        "bitmaps_ext: Invalid extension length {len} (must be {BITMAPS_EXT_LEN})"
                    ));
                }
                EXT_BACKING_FORMAT => {
                    let s = String::from_utf8_lossy(data)
                        .trim_end_matches('\0')
                        .to_string();
                    self.backing_format = Some(s);
                }
                EXT_FEATURE_TABLE => {
                    for e in data.chunks_exact(48) {
                        let name = String::from_utf8_lossy(&e[2..])
                            .trim_end_matches('\0')
                            .to_string();
                        self.feature_names.insert((e[0], e[1]), name);
                    }
                }
                EXT_BITMAPS => self.bitmaps_ext = Some(data.to_vec()),
                EXT_CRYPTO => {
                    if len != 16 {
                        return Err(format!(
                            "Unable to read CRYPTO header extension: length {len} is not 16"
                        ));
                    }
                    let (o, l) = (be64(data, 0), be64(data, 8));
                    let cs = 1u64 << self.cluster_bits;
                    if o % cs != 0 || o == 0 {
                        return Err(format!(
                            "Encryption header offset '{o}' is not a multiple of cluster size '{cs}'"
                        ));
                    }
                    if l == 0 || o.checked_add(l).is_none() {
                        return Err(format!("Encryption header length '{l}' is invalid"));
                    }
                    self.crypto_ext = Some((o, l));
                }
                _ => {}
            }
            self.extensions.push(ty);
            off += len.div_ceil(8) * 8;
        }
        Ok(())
    }

    fn feature_name(&self, ty: u8, bit: u8) -> String {
        match self.feature_names.get(&(ty, bit)) {
            Some(n) if !n.is_empty() => format!("'{n}' (bit {bit})"),
            _ => format!("unknown feature bit {bit}"),
        }
    }

    fn check_features(&self) -> Result<(), String> {
        let known = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;
        let unknown = self.incompatible & !known;
        if unknown != 0 {
            let names: Vec<String> = (0..64u8)
                .filter(|bit| unknown & (1 << bit) != 0)
                .map(|bit| {
                    if 1u64 << bit == INCOMPAT_DATA_FILE {
                        "'external data file' (bit 2)".to_string()
                    } else {
                        self.feature_name(0, bit)
                    }
                })
                .collect();
            return Err(format!(
                "unsupported incompatible feature(s): {}",
                names.join(", ")
            ));
        }
        let has_ct = self.incompatible & INCOMPAT_COMPRESSION != 0;
        match (self.compression_type, has_ct) {
            (0, _) => {}
            (1, true) => {
                return Err("compression type zstd is not supported (only zlib)".into());
            }
            (t, true) => return Err(format!("unknown compression type {t}")),
            (t, false) => {
                return Err(format!(
                    "compression type {t} set without the compression type feature bit"
                ))
            }
        }
        if self.version == 2 && self.extended_l2() {
            return Err("extended L2 entries need a version 3 image".into());
        }
        if self.extended_l2() && self.cluster_bits < 14 {
            return Err("extended L2 entries need clusters of at least 16 KiB".into());
        }
        Ok(())
    }

    fn check_tables(&self, file_size: u64) -> Result<(), String> {
        let cs = self.cluster_size();
        let aligned = |off: u64| off % cs == 0;
        if self.size > MAX_IMAGE_SIZE {
            return Err(format!("image size {} is too large", self.size));
        }
        let entry_bytes: u64 = if self.extended_l2() { 16 } else { 8 };
        let l2_entries = cs / entry_bytes;
        let needed = self.size.div_ceil(cs).div_ceil(l2_entries);
        if u64::from(self.l1_size) < needed {
            return Err(format!(
                "L1 table of {} entries is too small for {} bytes",
                self.l1_size, self.size
            ));
        }
        if u64::from(self.l1_size) * 8 > MAX_L1_BYTES {
            return Err(format!(
                "Active L1 table too large: l1_size {} entries is more than {} (too large)",
                self.l1_size,
                MAX_L1_BYTES / 8
            ));
        }
        if self.l1_size > 0 && (!aligned(self.l1_table_offset) || self.l1_table_offset == 0) {
            return Err(format!(
                "L1 table offset {:#x} is not cluster aligned",
                self.l1_table_offset
            ));
        }
        if self.refcount_table_clusters == 0 {
            return Err("the refcount table is empty".into());
        }
        if u64::from(self.refcount_table_clusters) * cs > MAX_REFTABLE_BYTES {
            return Err(format!(
                "Reference count table too large: refcount_table_clusters {} is more than {} MiB (too large)",
                self.refcount_table_clusters,
                MAX_REFTABLE_BYTES >> 20
            ));
        }
        if !aligned(self.refcount_table_offset) || self.refcount_table_offset == 0 {
            return Err(format!(
                "refcount table offset {:#x} is not cluster aligned",
                self.refcount_table_offset
            ));
        }
        if self.nb_snapshots > MAX_SNAPSHOTS {
            return Err(format!(
                "Too many snapshots: nb_snapshots {} is more than {MAX_SNAPSHOTS} (too many)",
                self.nb_snapshots
            ));
        }
        if self.nb_snapshots > 0 {
            if !aligned(self.snapshots_offset) || self.snapshots_offset == 0 {
                return Err(format!(
                    "Invalid snapshot table offset: snapshots_offset {:#x} is not cluster aligned",
                    self.snapshots_offset
                ));
            }
            if self.snapshots_offset >= file_size {
                return Err(format!(
                    "Invalid snapshot table offset: snapshots_offset {:#x} is beyond the end of the file ({file_size} bytes)",
                    self.snapshots_offset
                ));
            }
        }
        let ranges = [
            (
                "L1 table",
                self.l1_table_offset,
                u64::from(self.l1_size) * 8,
            ),
            (
                "refcount table",
                self.refcount_table_offset,
                u64::from(self.refcount_table_clusters) * cs,
            ),
        ];
        for (what, off, len) in ranges {
            if len == 0 {
                continue;
            }
            if off
                .checked_add(len)
                .is_none_or(|e| e > OFFSET_MASK.min(MAX_TABLE_END))
            {
                return Err(format!("{what} at {off:#x} lies outside any image"));
            }
            if off > file_size {
                return Err(format!(
                    "{what} at {off:#x} is beyond the end of the file ({file_size} bytes)"
                ));
            }
            if off < cs {
                return Err(format!("{what} at {off:#x} overlaps the header"));
            }
        }
        let (l1s, l1e) = (
            self.l1_table_offset,
            self.l1_table_offset + u64::from(self.l1_size) * 8,
        );
        let (rts, rte) = (
            self.refcount_table_offset,
            self.refcount_table_offset + u64::from(self.refcount_table_clusters) * cs,
        );
        if self.l1_size > 0 && l1s < rte && rts < l1e {
            return Err("the L1 table and the refcount table overlap".into());
        }
        Ok(())
    }

    /// The backing file name, checked as QEMU does: its offset within the
    /// first cluster, its length at most 1023 bytes and within the cluster.
    /// An empty name is no backing file (QEMU opens none either).
    fn check_backing_offset(&self) -> Result<(), String> {
        if self.backing_file_offset > self.cluster_size() {
            return Err(format!(
                "Invalid backing file offset: backing_file_offset {:#x} is beyond the first cluster ({} bytes)",
                self.backing_file_offset,
                self.cluster_size()
            ));
        }
        Ok(())
    }

    fn read_backing_name(&mut self, b: &[u8]) -> Result<(), String> {
        if self.backing_file_offset == 0 || self.backing_file_size == 0 {
            return Ok(());
        }
        self.check_backing_offset()?;
        let start = self.backing_file_offset;
        let room = self.cluster_size() - start;
        let len = u64::from(self.backing_file_size);
        if len > u64::from(MAX_BACKING_NAME).min(room) {
            return Err(format!(
                "Backing file name too long: backing_file_size {len} at backing_file_offset {start:#x} is more than {MAX_BACKING_NAME} bytes or runs beyond the first cluster"
            ));
        }
        let end = start + len;
        let name = usize::try_from(start)
            .ok()
            .zip(usize::try_from(end).ok())
            .and_then(|(s, e)| b.get(s..e))
            .ok_or_else(|| {
                format!(
                    "the backing file name (backing_file_offset {start:#x}, backing_file_size {len}) lies beyond the first cluster"
                )
            })?;
        let name = String::from_utf8(name.to_vec())
            .map_err(|_| "the backing file name is not UTF-8".to_string())?;
        self.backing_file = Some(name);
        Ok(())
    }
}

/// One entry of the snapshot table (what the driver needs of it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub l1_table_offset: u64,
    pub l1_size: u32,
    pub id: String,
    pub name: String,
    pub date_sec: u32,
    pub date_nsec: u32,
    pub vm_clock_nsec: u64,
    pub vm_state_size: u64,
    pub disk_size: Option<u64>,
    pub extra: Vec<u8>,
}

impl Snapshot {
    /// The entry as the snapshot table stores it (padded to 8 bytes).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(40 + self.extra.len() + self.id.len() + self.name.len() + 8);
        b.extend_from_slice(&self.l1_table_offset.to_be_bytes());
        b.extend_from_slice(&self.l1_size.to_be_bytes());
        b.extend_from_slice(&(self.id.len() as u16).to_be_bytes());
        b.extend_from_slice(&(self.name.len() as u16).to_be_bytes());
        b.extend_from_slice(&self.date_sec.to_be_bytes());
        b.extend_from_slice(&self.date_nsec.to_be_bytes());
        b.extend_from_slice(&self.vm_clock_nsec.to_be_bytes());
        b.extend_from_slice(&(self.vm_state_size.min(u64::from(u32::MAX)) as u32).to_be_bytes());
        b.extend_from_slice(&(self.extra.len() as u32).to_be_bytes());
        b.extend_from_slice(&self.extra);
        b.extend_from_slice(self.id.as_bytes());
        b.extend_from_slice(self.name.as_bytes());
        b.resize(b.len().div_ceil(8) * 8, 0);
        b
    }
}

/// Parses `n` snapshot table entries from `b`; returns them and the
/// table's length in bytes. Checked as QEMU's qcow2_read_snapshots does
/// (extra data at most 1024 bytes, the table at most 64 MiB), and each
/// snapshot's L1 table as qcow2_validate_table does (cluster aligned, at
/// most 32 MiB, within the largest offset).
pub fn parse_snapshots(
    b: &[u8],
    n: u32,
    cluster_size: u64,
) -> Result<(Vec<Snapshot>, u64), String> {
    if n > MAX_SNAPSHOTS {
        return Err(format!(
            "Too many snapshots: nb_snapshots {n} is more than {MAX_SNAPSHOTS}"
        ));
    }
    let mut out = Vec::with_capacity((n as usize).min(b.len() / 40));
    let mut off = 0usize;
    let need = |off: usize, len: usize| -> Result<(), String> {
        if off.checked_add(len).is_none_or(|e| e > b.len()) {
            Err("the snapshot table is truncated".into())
        } else {
            Ok(())
        }
    };
    for i in 0..n {
        need(off, 40)?;
        let l1_table_offset = be64(b, off);
        let l1_size = be32(b, off + 8);
        let id_len = u16::from_be_bytes([b[off + 12], b[off + 13]]) as usize;
        let name_len = u16::from_be_bytes([b[off + 14], b[off + 15]]) as usize;
        let date_sec = be32(b, off + 16);
        let date_nsec = be32(b, off + 20);
        let vm_clock_nsec = be64(b, off + 24);
        let mut vm_state_size = u64::from(be32(b, off + 32));
        let extra_len = be32(b, off + 36) as usize;
        if extra_len > MAX_SNAPSHOT_EXTRA {
            return Err(format!(
                "Too much extra metadata in snapshot table entry {i}: extra_data_size {extra_len} is more than {MAX_SNAPSHOT_EXTRA} bytes (too large)"
            ));
        }
        off += 40;
        need(off, extra_len + id_len + name_len)?;
        let extra = b[off..off + extra_len].to_vec();
        let mut disk_size = None;
        if extra_len >= 8 {
            vm_state_size = be64(&extra, 0);
        }
        if extra_len >= 16 {
            disk_size = Some(be64(&extra, 8));
        }
        off += extra_len;
        let id = String::from_utf8_lossy(&b[off..off + id_len]).to_string();
        off += id_len;
        let name = String::from_utf8_lossy(&b[off..off + name_len]).to_string();
        off += name_len;
        off = off.div_ceil(8) * 8;
        if off as u64 > MAX_SNAPSHOTS_BYTES {
            return Err(format!(
                "Snapshot table too large: more than {MAX_SNAPSHOTS_BYTES} bytes at entry {i}"
            ));
        }
        let l1_bytes = u64::from(l1_size) * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(format!(
                "Snapshot L1 table too large: snapshot '{id}' has l1_size {l1_size} (more than {} entries)",
                MAX_L1_BYTES / 8
            ));
        }
        if l1_table_offset % cluster_size != 0
            || l1_table_offset
                .checked_add(l1_bytes)
                .is_none_or(|e| e > OFFSET_MASK)
            || (l1_size > 0 && l1_table_offset == 0)
        {
            return Err(format!(
                "Snapshot L1 table offset invalid: snapshot '{id}' has l1_table_offset {l1_table_offset:#x}"
            ));
        }
        out.push(Snapshot {
            l1_table_offset,
            l1_size,
            id,
            name,
            date_sec,
            date_nsec,
            vm_clock_nsec,
            vm_state_size,
            disk_size,
            extra,
        });
    }
    Ok((out, off as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v3(cluster_bits: u32) -> Vec<u8> {
        let mut b = vec![0u8; 4096];
        b[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&3u32.to_be_bytes());
        b[20..24].copy_from_slice(&cluster_bits.to_be_bytes());
        b[24..32].copy_from_slice(&(1u64 << 20).to_be_bytes());
        b[36..40].copy_from_slice(&1u32.to_be_bytes());
        b[40..48].copy_from_slice(&(3u64 << cluster_bits).to_be_bytes());
        b[48..56].copy_from_slice(&(1u64 << cluster_bits).to_be_bytes());
        b[56..60].copy_from_slice(&1u32.to_be_bytes());
        b[96..100].copy_from_slice(&4u32.to_be_bytes());
        b[100..104].copy_from_slice(&104u32.to_be_bytes());
        b
    }

    #[test]
    fn parses_a_minimal_v3_header() {
        let h = Header::parse(&v3(16), 1 << 20).unwrap();
        assert_eq!(h.cluster_size(), 65536);
        assert_eq!(h.refcount_bits(), 16);
    }

    #[test]
    fn names_unknown_incompatible_features() {
        let mut b = v3(16);
        b[72..80].copy_from_slice(&(1u64 << 9).to_be_bytes());
        // A feature name table entry for bit 9.
        let mut ext = vec![0u8; 48];
        ext[0] = 0;
        ext[1] = 9;
        ext[2..10].copy_from_slice(b"frobnify");
        b[104..108].copy_from_slice(&EXT_FEATURE_TABLE.to_be_bytes());
        b[108..112].copy_from_slice(&48u32.to_be_bytes());
        b[112..160].copy_from_slice(&ext);
        let e = Header::parse(&b, 1 << 20).unwrap_err();
        assert!(e.contains("'frobnify' (bit 9)"), "{e}");
    }

    #[test]
    fn backing_file_name_and_format_are_bounded() {
        let with_name = |off: u64, len: u32| {
            let mut b = v3(16);
            b[8..16].copy_from_slice(&off.to_be_bytes());
            b[16..20].copy_from_slice(&len.to_be_bytes());
            b
        };
        let mut b = with_name(512, 4);
        b[512..516].copy_from_slice(b"base");
        let h = Header::parse(&b, 1 << 20).unwrap();
        assert_eq!(h.backing_file.as_deref(), Some("base"));
        // An empty name is no backing file (QEMU opens none).
        let h = Header::parse(&with_name(512, 0), 1 << 20).unwrap();
        assert_eq!(h.backing_file, None);
        for (off, len) in [(512, 1024), (4000, 200), (u64::MAX, 10), (u64::MAX - 4, 10)] {
            let e = Header::parse(&with_name(off, len), 1 << 20).unwrap_err();
            assert!(
                e.contains("backing_file_offset") || e.contains("backing_file_size"),
                "{off} {len}: {e}"
            );
        }
        // A backing format extension longer than QEMU's 15 bytes.
        let mut b = v3(16);
        b[104..108].copy_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
        b[108..112].copy_from_slice(&16u32.to_be_bytes());
        let e = Header::parse(&b, 1 << 20).unwrap_err();
        assert!(e.contains("ext_backing_format"), "{e}");
        // An extension running into the backing file name.
        let mut b = with_name(120, 4);
        b[104..108].copy_from_slice(&0x1234u32.to_be_bytes());
        b[108..112].copy_from_slice(&16u32.to_be_bytes());
        let e = Header::parse(&b, 1 << 20).unwrap_err();
        assert!(e.contains("Header extension too large"), "{e}");
    }

    #[test]
    fn refuses_bad_fields() {
        let cases: Vec<(usize, Vec<u8>, &str)> = vec![
            (20, 30u32.to_be_bytes().to_vec(), "cluster size"),
            (56, 0u32.to_be_bytes().to_vec(), "refcount table is empty"),
            (36, 0u32.to_be_bytes().to_vec(), "too small"),
            (96, 7u32.to_be_bytes().to_vec(), "refcount_order"),
            (48, 1000u64.to_be_bytes().to_vec(), "not cluster aligned"),
            (32, 1u32.to_be_bytes().to_vec(), "encrypted"),
            (4, 4u32.to_be_bytes().to_vec(), "version"),
            (
                8,
                u64::MAX.to_be_bytes().to_vec(),
                "Invalid backing file offset",
            ),
            (
                8,
                65537u64.to_be_bytes().to_vec(),
                "backing_file_offset 0x10001",
            ),
        ];
        for (off, bytes, msg) in cases {
            let mut b = v3(16);
            b[off..off + bytes.len()].copy_from_slice(&bytes);
            let e = Header::parse(&b, 1 << 20).unwrap_err();
            assert!(e.contains(msg), "{msg}: {e}");
        }
    }
}
