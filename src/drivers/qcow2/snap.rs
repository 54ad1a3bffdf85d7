//! Internal snapshots: the snapshot table, per-snapshot L1 copies, and the
//! refcount updates that share clusters between the active image and its
//! snapshots (docs/interop/qcow2.txt, "Snapshots").
//!
//! Every operation runs with the node's users drained, under the metadata
//! lock, and orders its writes so that a crash leaves leaked clusters at
//! worst: references are counted before anything points at them, and
//! released only after nothing on disk does.

use crate::block::{BlockError, Node};

use super::header::{self, Snapshot, OFFSET_MASK};
use super::meta::{self, Meta, COMPRESSED, COPIED};
use super::Qcow2Driver;

/// What a snapshot lookup matches (QEMU's rules: with both, both must).
pub struct SnapshotRef<'a> {
    pub id: Option<&'a str>,
    pub name: Option<&'a str>,
}

impl SnapshotRef<'_> {
    fn matches(&self, s: &Snapshot) -> bool {
        match (self.id, self.name) {
            (Some(i), Some(n)) => s.id == i && s.name == n,
            (Some(i), None) => s.id == i,
            (None, Some(n)) => s.name == n,
            (None, None) => false,
        }
    }

    fn describe(&self) -> String {
        match (self.id, self.name) {
            (Some(i), Some(n)) => format!("id '{i}' and name '{n}'"),
            (Some(i), None) => format!("id '{i}'"),
            (None, Some(n)) => format!("name '{n}'"),
            (None, None) => "nothing".into(),
        }
    }
}

fn err(node: &str, reason: String) -> BlockError {
    BlockError::Unsupported {
        node: node.to_string(),
        reason,
    }
}

impl Qcow2Driver {
    /// Adds `delta` to the count of every L2 table and data cluster an L1
    /// table (`l1`, `size` entries) references.
    async fn count_l1(
        &self,
        m: &mut Meta,
        l1: &[u64],
        size: u32,
        delta: i64,
    ) -> Result<(), BlockError> {
        let f = self.f();
        let w = self.g.words_per_entry();
        // A reference past everything the file holds is corruption: its
        // count would need refcount blocks (and a table) sized by it.
        let check = |m: &Meta, c: u64, what: &str| {
            if c >= m.end_cluster {
                Err(m.corrupt_err(format!(
                    "{what} refers to cluster {c}, past the end of the image file; repair it with 'qemu-img check -r all'"
                )))
            } else {
                Ok(())
            }
        };
        for &e in l1.iter().take(size as usize) {
            let l2 = e & OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            check(m, l2 >> self.g.cluster_bits, "an L1 entry")?;
            m.load_l2(f, l2).await?;
            let words: Vec<u64> = m.l2_words(l2).to_vec();
            for i in (0..words.len()).step_by(w) {
                let e = words[i];
                if e & COMPRESSED != 0 {
                    for c in m.compressed_clusters(e) {
                        check(m, c, "a compressed L2 entry")?;
                        m.update_refcount(f, c, delta, (0, 0)).await?;
                    }
                } else if e & OFFSET_MASK != 0 {
                    let c = (e & OFFSET_MASK) >> self.g.cluster_bits;
                    check(m, c, "an L2 entry")?;
                    m.update_refcount(f, c, delta, (0, 0)).await?;
                }
            }
            m.update_refcount(f, l2 >> self.g.cluster_bits, delta, (0, 0))
                .await?;
        }
        Ok(())
    }

    /// Sets the COPIED flags of the active L1 table and its L2 tables to
    /// what the refcounts say (exactly one reference).
    async fn fix_copied_flags(&self, m: &mut Meta) -> Result<(), BlockError> {
        let f = self.f();
        let w = self.g.words_per_entry();
        for i in 0..m.l1_size as usize {
            let e = m.l1[i];
            let l2 = e & OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            let one = m.refcount(f, l2 >> self.g.cluster_bits).await? == 1;
            let want = if one { e | COPIED } else { e & !COPIED };
            if want != e {
                m.set_l1(i, want);
            }
            m.load_l2(f, l2).await?;
            let words: Vec<u64> = m.l2_words(l2).to_vec();
            let mut changed = words.clone();
            for j in (0..words.len()).step_by(w) {
                let e = words[j];
                if e & COMPRESSED != 0 || e & OFFSET_MASK == 0 {
                    continue;
                }
                let one = m
                    .refcount(f, (e & OFFSET_MASK) >> self.g.cluster_bits)
                    .await?
                    == 1;
                changed[j] = if one { e | COPIED } else { e & !COPIED };
            }
            if changed != words {
                *m.l2_words_mut(l2) = changed;
            }
        }
        Ok(())
    }

    /// Writes `snaps` as the new snapshot table and points the header at
    /// it; the old table's clusters are freed afterwards.
    async fn write_snapshot_table(
        &self,
        m: &mut Meta,
        snaps: &[Snapshot],
    ) -> Result<(), BlockError> {
        let f = self.f();
        let g = self.g;
        let bytes: Vec<u8> = snaps.iter().flat_map(Snapshot::encode).collect();
        let (new_off, clusters) = if bytes.is_empty() {
            (0, 0)
        } else {
            let clusters = (bytes.len() as u64).div_ceil(g.cs);
            let off = m.alloc(f, clusters).await?;
            let mut padded = bytes.clone();
            padded.resize((clusters * g.cs) as usize, 0);
            m.flush_refcounts(f).await?;
            meta::write_buf(f, off, &padded).await?;
            (off, clusters)
        };
        f.flush().await?;
        let mut field = Vec::with_capacity(12);
        field.extend_from_slice(&(snaps.len() as u32).to_be_bytes());
        field.extend_from_slice(&new_off.to_be_bytes());
        m.write_header_field(f, 60, &field).await?;
        f.flush().await?;
        let (old_off, old_len) = (m.snap_offset, m.snap_len);
        if old_len > 0 {
            for c in (old_off >> g.cluster_bits)..=((old_off + old_len - 1) >> g.cluster_bits) {
                m.update_refcount(f, c, -1, (0, 0)).await?;
            }
        }
        m.snap_offset = new_off;
        m.snap_len = bytes.len() as u64;
        m.fixed.retain(|(_, _, w)| w != "the snapshot table");
        if clusters > 0 {
            m.fixed.push((
                new_off,
                new_off + bytes.len() as u64,
                "the snapshot table".into(),
            ));
        }
        Ok(())
    }

    fn check_writable(&self, m: &Meta) -> Result<(), BlockError> {
        if self.is_read_only() {
            return Err(BlockError::ReadOnly {
                node: self.name.clone(),
            });
        }
        if m.corrupt {
            return Err(m.corrupt_err("the image is marked corrupt"));
        }
        Ok(())
    }

    /// blockdev-snapshot-internal-sync: a snapshot of the image as it is
    /// now. The caller holds the node's users drained.
    pub async fn snapshot_create(
        &self,
        name: &str,
        date: (u32, u32),
    ) -> Result<Snapshot, BlockError> {
        let f = self.f();
        let g = self.g;
        let mut m = self.meta.lock().await;
        self.check_writable(&m)?;
        let mut snaps = self.lock_snapshots().clone();
        if name.is_empty() {
            return Err(err(
                &self.name,
                "the snapshot name must not be empty".into(),
            ));
        }
        if name.len() > 0xffff {
            return Err(err(&self.name, "the snapshot name is too long".into()));
        }
        if snaps.iter().any(|s| s.name == name) {
            return Err(err(
                &self.name,
                format!("a snapshot named '{name}' already exists"),
            ));
        }
        if snaps.len() >= header::MAX_SNAPSHOTS as usize {
            return Err(err(&self.name, "too many snapshots".into()));
        }
        let id = snaps
            .iter()
            .filter_map(|s| s.id.parse::<u64>().ok())
            .max()
            .unwrap_or(0)
            + 1;
        m.flush_all(f, true).await?;
        // The L1 copy.
        let l1_bytes = (u64::from(m.l1_size) * 8).max(8);
        let clusters = l1_bytes.div_ceil(g.cs);
        let l1_copy = m.alloc(f, clusters).await?;
        // Count the shared clusters, then drop the COPIED flags; the copy
        // is taken without them.
        let l1 = m.l1.clone();
        let size = m.l1_size;
        self.count_l1(&mut m, &l1, size, 1).await?;
        self.fix_copied_flags(&mut m).await?;
        let mut table: Vec<u64> = m.l1.iter().take(size as usize).copied().collect();
        table.resize((clusters * g.cs / 8) as usize, 0);
        m.flush_all(f, true).await?;
        meta::write_buf(f, l1_copy, &meta::encode_be64(&table)).await?;
        let mut extra = Vec::with_capacity(24);
        extra.extend_from_slice(&0u64.to_be_bytes());
        extra.extend_from_slice(&self.size().to_be_bytes());
        extra.extend_from_slice(&u64::MAX.to_be_bytes());
        let snap = Snapshot {
            l1_table_offset: l1_copy,
            l1_size: size,
            id: id.to_string(),
            name: name.to_string(),
            date_sec: date.0,
            date_nsec: date.1,
            vm_clock_nsec: 0,
            vm_state_size: 0,
            disk_size: Some(self.size()),
            extra,
        };
        snaps.push(snap.clone());
        self.write_snapshot_table(&mut m, &snaps).await?;
        m.fixed.push((
            l1_copy,
            l1_copy + u64::from(size) * 8,
            format!("the L1 table of snapshot '{}'", snap.id),
        ));
        m.flush_all(f, true).await?;
        *self.lock_snapshots() = snaps;
        Ok(snap)
    }

    fn find(&self, snaps: &[Snapshot], r: &SnapshotRef<'_>) -> Result<usize, BlockError> {
        snaps.iter().position(|s| r.matches(s)).ok_or_else(|| {
            err(
                &self.name,
                format!("snapshot with {} not found", r.describe()),
            )
        })
    }

    async fn read_snapshot_l1(&self, s: &Snapshot) -> Result<Vec<u64>, BlockError> {
        let bytes = (u64::from(s.l1_size) * 8).div_ceil(self.g.cs) * self.g.cs;
        if bytes == 0 {
            return Ok(Vec::new());
        }
        Ok(meta::decode_be64(
            &meta::read_buf(self.f(), s.l1_table_offset, bytes as usize).await?,
        ))
    }

    /// blockdev-snapshot-delete-internal-sync. The caller holds the node's
    /// users drained.
    pub async fn snapshot_delete(&self, r: &SnapshotRef<'_>) -> Result<Snapshot, BlockError> {
        let f = self.f();
        let g = self.g;
        let mut m = self.meta.lock().await;
        self.check_writable(&m)?;
        let mut snaps = self.lock_snapshots().clone();
        let i = self.find(&snaps, r)?;
        let snap = snaps.remove(i);
        m.flush_all(f, true).await?;
        // First nothing on disk points at it; then release what it held.
        self.write_snapshot_table(&mut m, &snaps).await?;
        *self.lock_snapshots() = snaps;
        let l1 = self.read_snapshot_l1(&snap).await?;
        self.count_l1(&mut m, &l1, snap.l1_size, -1).await?;
        let l1_end = snap.l1_table_offset + u64::from(snap.l1_size) * 8;
        if snap.l1_size > 0 {
            for c in (snap.l1_table_offset >> g.cluster_bits)..=((l1_end - 1) >> g.cluster_bits) {
                m.update_refcount(f, c, -1, (0, 0)).await?;
            }
        }
        m.fixed.retain(|(s, _, w)| {
            !(*s == snap.l1_table_offset && w.starts_with("the L1 table of snapshot"))
        });
        self.fix_copied_flags(&mut m).await?;
        m.flush_all(f, true).await?;
        Ok(snap)
    }

    /// Reverts the image to a snapshot (qemu-img snapshot -a). The caller
    /// has checked that no one writes the node, and holds it drained.
    pub async fn snapshot_goto(
        &self,
        node: &Node,
        r: &SnapshotRef<'_>,
    ) -> Result<Snapshot, BlockError> {
        let f = self.f();
        let mut m = self.meta.lock().await;
        self.check_writable(&m)?;
        let snaps = self.lock_snapshots().clone();
        let snap = snaps[self.find(&snaps, r)?].clone();
        m.flush_all(f, true).await?;
        let l1 = self.read_snapshot_l1(&snap).await?;
        // Count the snapshot's clusters for the active image first.
        self.count_l1(&mut m, &l1, snap.l1_size, 1).await?;
        m.flush_all(f, true).await?;
        let size = snap.disk_size.unwrap_or(self.size());
        if u64::from(snap.l1_size) > u64::from(m.l1_size) {
            m.grow_l1(f, u64::from(snap.l1_size), self.size()).await?;
        }
        let old: Vec<u64> = m.l1.clone();
        let old_size = m.l1_size;
        for i in 0..m.l1_size as usize {
            let v = l1.get(i).copied().unwrap_or(0);
            if m.l1[i] != v {
                m.set_l1(i, v);
            }
        }
        m.flush_all(f, true).await?;
        // Now release what the old active image held.
        self.count_l1(&mut m, &old, old_size, -1).await?;
        self.fix_copied_flags(&mut m).await?;
        if size != self.size() {
            m.write_header_field(f, header::OFF_SIZE, &size.to_be_bytes())
                .await?;
            self.size.store(size, std::sync::atomic::Ordering::Relaxed);
        }
        m.flush_all(f, true).await?;
        log::debug!("node {}: reverted to snapshot {}", node.name(), snap.id);
        Ok(snap)
    }
}
