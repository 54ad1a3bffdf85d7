//! An open image changing state: made read-only (it became a backing
//! image) and writable again (a transaction aborted, block-commit into
//! it), resized (block_resize), closed (metadata and persistent bitmaps
//! written, the dirty bit cleared), and linked to its node.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::meta;
use super::{bitmaps, header, Qcow2Driver, OFF_AUTOCLEAR};
use crate::block::{BlockError, Child, ChildRole, GraphError, Node, Perm};

impl Qcow2Driver {
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
        if self.closed.swap(false, Ordering::AcqRel) && self.is_lazy() {
            // Lazy refcounts: the dirty bit goes back on before writes.
            let f = self.f();
            let incompat = (self.header().incompatible | header::INCOMPAT_DIRTY).to_be_bytes();
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
        if opened_read_only && self.header().incompatible & header::INCOMPAT_DIRTY != 0 {
            return Err(format!(
                "node '{name}' was not closed cleanly (its refcounts may be wrong) and cannot be made writable: repair the image with 'qemu-img check -r all'"
            ));
        }
        let f = self.f();
        let file_was_read_only = f.is_read_only();
        if file_was_read_only {
            let Some(fd) = f.protocol_file() else {
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
            if let (true, Some(fd)) = (file_was_read_only, f.protocol_file()) {
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
        let locked = match f.protocol_file() {
            Some(fd) => fd
                .held_locks()
                .is_none_or(|(perm, _)| perm.contains(Perm::WRITE | Perm::RESIZE)),
            None => true,
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
        if self.header().version >= 3 {
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
        if self.is_lazy() {
            let incompat = (self.header().incompatible | header::INCOMPAT_DIRTY).to_be_bytes();
            m.write_header_field(f, header::OFF_INCOMPAT, &incompat)
                .await?;
            f.flush().await?;
        }
        Ok(())
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

    /// Writes everything, clears the dirty bit we set, and stops writes.
    pub fn close(&self) {
        if let Err(e) = self.write_back() {
            log::error!("node {}: closing: {e}", self.name);
        }
    }

    /// What close does, with its error: caches written, persistent bitmaps
    /// stored, the dirty bit we set cleared, the file flushed.
    pub(super) fn write_back(&self) -> Result<(), BlockError> {
        if self.read_only.load(Ordering::Acquire) || self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let f = self.f();
        futures::executor::block_on(async {
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
            let new = bitmaps::store(f, &mut m, self.header(), &persistent, &old).await?;
            *self
                .stored_bitmaps
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = new;
            if self.is_lazy() {
                let incompat = self.header().incompatible & !header::INCOMPAT_DIRTY;
                m.write_header_field(f, header::OFF_INCOMPAT, &incompat.to_be_bytes())
                    .await?;
            }
            f.flush().await?;
            Ok::<(), BlockError>(())
        })
    }

    /// blockdev-set-active false (QEMU's qcow2_inactivate): everything
    /// written as at close (caches, persistent bitmaps, the dirty bit we
    /// set cleared), then the persistent bitmaps leave the node (QEMU's
    /// bdrv_release_persistent_dirty_bitmaps): the image holds them, and
    /// activation reads them again.
    pub fn inactivate(&self, node: &Node) -> Result<(), String> {
        self.write_back()
            .map_err(|e| format!("node '{}': writing metadata back: {e}", self.name))?;
        let kept: Vec<Arc<crate::block::bitmap::DirtyBitmap>> = node
            .bitmaps()
            .iter()
            .filter(|b| !b.is_persistent())
            .cloned()
            .collect();
        if kept.len() != node.bitmaps().len() {
            node.set_bitmaps(kept);
        }
        Ok(())
    }

    /// blockdev-set-active true (QEMU's qcow2_co_invalidate_cache): the
    /// image is read again as an open reads it (header, L1 and refcount
    /// tables, snapshot table, persistent bitmaps), the metadata cached
    /// before is dropped, and a writable image's header is prepared for
    /// writes. The caller holds the node drained, its file active.
    pub fn activate(&self, node: &Node) -> Result<(), String> {
        let f = self.f();
        // As the image is now: a backing image made writable for a commit
        // (or made read-only since) is read as such.
        let mut opts = self.opts.clone();
        opts.read_only = self.is_read_only();
        let super::open::Loaded {
            hdr,
            g,
            m,
            snapshots,
            bitmaps: (loaded, on_disk),
            lazy,
        } = super::open::load(&opts, f, true).map_err(|e| e.to_string())?;
        // The geometry is fixed for the driver's life (requests in other
        // threads read it without the lock); `qemu-img amend` by the other
        // process (refcount width, version) needs the node opened again.
        if g != self.g {
            return Err(format!(
                "node '{}': the image's geometry changed while the node was inactive ({:?} -> {:?}); open it again",
                self.name, self.g, g
            ));
        }
        *futures::executor::block_on(self.meta.lock()) = m;
        self.size.store(hdr.size, Ordering::Relaxed);
        *self.backing_name.lock().unwrap_or_else(|e| e.into_inner()) = hdr.backing_file.clone();
        *self.lock_snapshots() = snapshots;
        *self
            .stored_bitmaps
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = on_disk;
        self.lazy.store(lazy, Ordering::Release);
        self.header.replace(hdr);
        self.closed.store(false, Ordering::Release);
        // The node's persistent bitmaps are the image's now.
        let mut list: Vec<Arc<crate::block::bitmap::DirtyBitmap>> = node
            .bitmaps()
            .iter()
            .filter(|b| !b.is_persistent() && !loaded.iter().any(|l| l.name() == b.name()))
            .cloned()
            .collect();
        list.extend(loaded);
        node.set_bitmaps(list);
        Ok(())
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
        self.header().version >= 3 && !self.is_read_only()
    }
}
