//! Guest writes, write-zeroes and discards (QEMU's qcow2_co_pwritev_part,
//! qcow2_alloc_cluster_offset, qcow2_cluster_zeroize/discard): a run of
//! clusters written in place, or one cluster allocated (or its
//! subclusters filled) with the guest cluster busy, its head and tail
//! filled from the old mapping, then its L2 entry updated; zeroes and
//! discards in metadata alone where whole clusters allow.

use std::sync::atomic::Ordering;

use super::lock;
use super::meta::{self, Meta, COMPRESSED, COPIED, ZERO};
use super::{header, Qcow2Driver, PREALLOC_STEP};
use crate::block::{BlockError, DebugEvent as Ev, Node};
use crate::io::IoVecs;

impl Qcow2Driver {
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
    pub(super) async fn write_some(
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
        let req = WriteReq {
            node,
            pos,
            iov,
            skip,
            want,
            fua,
        };
        if let Some(host) = self.in_place(e, b, pos, n) {
            return self.write_in_place(m, &req, host, n).await;
        }
        // Allocation (or filling subclusters of a cluster we own).
        let alloc = self.begin_alloc(&mut m, &req, n).await?;
        drop(m);
        let result = self.write_alloc_data(&alloc, &req).await;
        self.finish_alloc(&alloc, result).await.map(|()| (n, true))
    }

    /// Writes `n` bytes in place at `host`, and the following clusters
    /// that are in place and contiguous on the host. Releases `m` for the
    /// I/O.
    async fn write_in_place(
        &self,
        mut m: lock::AsyncLockGuard<'_, Meta>,
        req: &WriteReq<'_>,
        host: u64,
        n: u64,
    ) -> Result<(u64, bool), BlockError> {
        let g = self.g;
        let (pos, want) = (req.pos, req.want);
        let gc = pos >> g.cluster_bits;
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
        self.check_overlap(&mut m, req.node, host, total).await?;
        self.data_inflight.fetch_add(1, Ordering::AcqRel);
        drop(m);
        let part = if req.skip == 0 && total == req.iov.len() {
            req.iov.clone()
        } else {
            req.iov.sub(req.skip, total)
        };
        self.f().debug_event(Ev::WriteAio);
        let r = self.write_data(host, pos, &part, req.fua).await;
        self.io_done();
        r.map(|()| (total, false))
    }

    /// Under the lock: the cluster for `n` guest bytes at `req.pos`, the
    /// one mapped (reused) or a new one (the file grown ahead of it); the
    /// guest cluster marked busy and the data in flight.
    async fn begin_alloc(
        &self,
        m: &mut Meta,
        req: &WriteReq<'_>,
        n: u64,
    ) -> Result<Alloc, BlockError> {
        let g = self.g;
        let gc = req.pos >> g.cluster_bits;
        let in_c = req.pos & (g.cs - 1);
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
        self.check_overlap(m, req.node, host, g.cs).await?;
        if !reuse && host + g.cs > m.prealloc_end {
            // Grow the file ahead of the allocations, in steps: a write
            // that extends the file is far slower (ext4 serialises them).
            let end = (host + g.cs).max(m.prealloc_end + PREALLOC_STEP.max(g.cs));
            let from = m.prealloc_end.max(host);
            if let Err(e) = crate::drivers::preallocate(self.f(), from, end - from).await {
                let _ = m
                    .update_refcount(self.f(), host >> g.cluster_bits, -1, (0, 0))
                    .await;
                return Err(e);
            }
            m.prealloc_end = end;
        }
        m.busy.insert(gc, Vec::new());
        self.data_inflight.fetch_add(1, Ordering::AcqRel);
        Ok(Alloc {
            gc,
            in_c,
            n,
            e,
            b,
            old_host,
            compressed,
            reuse,
            moving,
            a,
            z,
            end_before,
            host,
        })
    }

    /// Without the lock: the guest's bytes into the allocated cluster,
    /// with the head and tail of the written subclusters filled from the
    /// old mapping (unless the cluster reads as zeroes already).
    async fn write_alloc_data(&self, al: &Alloc, req: &WriteReq<'_>) -> Result<(), BlockError> {
        let g = self.g;
        let (iov, skip, fua) = (req.iov, req.skip, req.fua);
        let (e, b, host, in_c, n, a, z) = (al.e, al.b, al.host, al.in_c, al.n, al.a, al.z);
        let base = al.gc << g.cluster_bits;
        // A cluster past everything the file ever held reads as zeroes
        // already: when the fill would be zeroes too (nothing mapped, no
        // backing data there), write the guest's bytes alone.
        // What the fill would read: zeroes (nothing mapped, no backing
        // data there).
        let zero_fill = al.old_host == 0
            && !al.compressed
            && self.backing().is_none_or(|bk| base >= bk.node().size());
        // Not when encrypted: the file's zeroes would decrypt to noise, so
        // the rest of the cluster is written as encrypted zeroes.
        let fresh = !al.reuse
            && host >> g.cluster_bits >= al.end_before
            && zero_fill
            && self.crypto.is_none();
        if zero_fill && !al.reuse && n < g.cs {
            // QEMU's handle_alloc_space: the copy-on-write areas of a new
            // cluster read as zeroes.
            self.f().debug_event(Ev::ClusterAllocSpace);
        }
        if fresh {
            let part = if skip == 0 && n == iov.len() {
                iov.clone()
            } else {
                iov.sub(skip, n)
            };
            self.f().debug_event(Ev::WriteAio);
            return self.write_data(host + in_c, base + in_c, &part, fua).await;
        }
        let mut parts = Vec::with_capacity(3);
        let cow = a < in_c || in_c + n < z;
        if cow {
            self.f().debug_event(Ev::CowRead);
        }
        if a < in_c {
            parts.push(self.read_old(e, b, base + a, in_c - a).await?);
        }
        parts.push(iov.sub(skip, n));
        if in_c + n < z {
            parts.push(self.read_old(e, b, base + in_c + n, z - in_c - n).await?);
        }
        let data = IoVecs::concat(parts);
        // As QEMU's perform_cow when the guest data goes in the same
        // write: write_aio, then cow_write, then the one write.
        self.f().debug_event(Ev::WriteAio);
        if cow {
            self.f().debug_event(Ev::CowWrite);
        }
        self.write_data(host + a, base + a, &data, fua).await
    }

    /// Under the lock again: the L2 entry points at the written cluster
    /// (the old one's reference dropped when the data moved), or, when
    /// the data write failed, a new cluster is given back. The guest
    /// cluster is no longer busy.
    async fn finish_alloc(
        &self,
        al: &Alloc,
        result: Result<(), BlockError>,
    ) -> Result<(), BlockError> {
        let g = self.g;
        let (gc, e, host, a, z) = (al.gc, al.e, al.host, al.a, al.z);
        let mut m = self.meta.lock().await;
        let commit = async {
            result?;
            let l2off = m.l2_for_write(self.f(), gc).await?;
            let (ce, cb) = m.entry_in(l2off, gc);
            let (entry, bitmap) = if g.extended {
                let bits = if al.moving {
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
            if al.moving {
                if al.compressed {
                    for c in m.compressed_clusters(e) {
                        m.queue_unref(c);
                    }
                } else {
                    m.queue_unref(al.old_host >> g.cluster_bits);
                }
            }
            Ok::<(), BlockError>(())
        }
        .await;
        if commit.is_err() && !al.reuse {
            // Nothing points at the new cluster: give it back.
            self.f().debug_event(Ev::ClusterFree);
            let _ = m
                .update_refcount(self.f(), host >> g.cluster_bits, -1, (0, 0))
                .await;
        }
        m.busy.remove(&gc);
        self.io_done();
        drop(m);
        commit
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

    pub(super) async fn zero_range_meta(
        &self,
        node: &Node,
        offset: u64,
        len: u64,
    ) -> Result<(), BlockError> {
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
}

/// One call of [`Qcow2Driver::write_some`]: guest bytes at `pos`, taken
/// from `iov` from `skip`, at most `want` of them.
struct WriteReq<'a> {
    node: &'a Node,
    pos: u64,
    iov: &'a IoVecs,
    skip: u64,
    want: u64,
    fua: bool,
}

/// An allocating write of one guest cluster between its steps.
struct Alloc {
    /// The guest cluster, and where in it the `n` guest bytes start.
    gc: u64,
    in_c: u64,
    n: u64,
    /// The L2 entry and subcluster bitmap before the write.
    e: u64,
    b: u64,
    old_host: u64,
    compressed: bool,
    /// The cluster mapped is written (subclusters filled), not a new one.
    reuse: bool,
    /// The data moves to a new cluster (the old one is dropped).
    moving: bool,
    /// The bytes of the cluster written, `[a, z)`.
    a: u64,
    z: u64,
    /// The file's end (in clusters) before allocating.
    end_before: u64,
    /// Where the cluster is in the file.
    host: u64,
}
