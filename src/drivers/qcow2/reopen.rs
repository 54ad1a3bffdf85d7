//! blockdev-reopen of a qcow2 node (QEMU's qcow2_reopen_prepare /
//! bdrv_reopen_prepare): what may change, checked first; then, in the
//! drained section, the steps that can fail (read-only <-> read-write,
//! lazy refcounts) with their undo; then the ones that cannot (backing
//! edge, discard options).
//!
//! ```text
//!   prepare:  file stays; backing given (QEMU: "backing is missing"),
//!             a new backing node looked up, checked (cycle, depth,
//!             active) and attached (its permissions checked now)
//!   apply:    rw -> ro: metadata and bitmaps written, dirty bit
//!             cleared, write permission on the file dropped
//!             ro -> rw: reopen_writable (locks, header prepared)
//!             lazy refcounts on/off on a writable image
//!   commit:   backing edge replaced, discard options
//! ```

use std::sync::atomic::Ordering;

use super::{header, Qcow2Driver, Qcow2Options};
use crate::block::{Child, ChildRole, Graph, Node, Perm};
use crate::drivers::{BlockdevRef, DiscardMode};

/// A qcow2 reopen that passed its checks. Dropping it aborts (a new
/// backing edge gives its permissions up).
pub struct Qcow2Reopen {
    read_only: bool,
    /// None: the backing edge stays; Some(None): detached; Some(Some):
    /// the new edge, attached (permissions held) but not yet used.
    backing: Option<Option<Child>>,
    discard_unmap: bool,
    pass_discard: bool,
    lazy: Option<bool>,
}

/// What [`Qcow2Driver::apply_reopen`] did, for its undo.
#[derive(Debug, Default, Clone, Copy)]
pub struct Applied {
    made_read_only: bool,
    made_writable: bool,
    lazy_was: Option<bool>,
}

impl Qcow2Driver {
    /// Checks `o` against the node: what QEMU refuses to change, and what
    /// this driver cannot change at run time.
    pub fn prepare_reopen(
        &self,
        node: &Node,
        o: &Qcow2Options,
        graph: &Graph,
    ) -> Result<Qcow2Reopen, String> {
        let name = &self.name;
        let same_file = match &o.file {
            BlockdevRef::Name(n) => n == self.f().name(),
            BlockdevRef::Inline(_) => false,
        };
        if !same_file {
            return Err(format!(
                "node '{name}': 'file' must stay '{}' (give it by name)",
                self.f().name()
            ));
        }
        let unchanged = [
            ("l2-cache-size", o.l2_cache_size != self.opts.l2_cache_size),
            (
                "refcount-cache-size",
                o.refcount_cache_size != self.opts.refcount_cache_size,
            ),
            ("cache-size", o.cache_size != self.opts.cache_size),
            ("overlap-check", o.overlap_check != self.opts.overlap_check),
            (
                "pass-discard-snapshot",
                o.pass_discard_snapshot != self.opts.pass_discard_snapshot,
            ),
            (
                "pass-discard-other",
                o.pass_discard_other != self.opts.pass_discard_other,
            ),
            ("force-share", !self.opts.force_share && o.force_share),
        ];
        if self.opts.force_share && !o.force_share {
            // QEMU's words for an option left out that was set.
            return Err("Option 'force-share' cannot be reset to its default value".into());
        }
        if let Some((opt, _)) = unchanged.iter().find(|(_, changed)| *changed) {
            return Err(format!(
                "node '{name}': changing '{opt}' by reopen is not supported"
            ));
        }
        if o.lazy_refcounts == Some(true) && self.header().version < 3 {
            return Err(
                "Lazy refcounts require a qcow2 image with at least qemu 1.1 compatibility level"
                    .into(),
            );
        }
        let backing = self.prepare_backing(node, o, graph)?;
        let discard_unmap = o.discard == DiscardMode::Unmap;
        Ok(Qcow2Reopen {
            read_only: o.read_only,
            backing,
            discard_unmap,
            pass_discard: o.pass_discard_request.unwrap_or(discard_unmap),
            lazy: o.lazy_refcounts,
        })
    }

    /// QEMU's bdrv_reopen_parse_file_or_backing for `backing`.
    fn prepare_backing(
        &self,
        node: &Node,
        o: &Qcow2Options,
        graph: &Graph,
    ) -> Result<Option<Option<Child>>, String> {
        let name = &self.name;
        let current = self.backing().map(|c| c.node().clone());
        let wanted = match &o.backing {
            None => {
                if current.is_some() || self.backing_file_name().is_some() {
                    return Err(format!("backing is missing for '{name}'"));
                }
                return Ok(None);
            }
            Some(None) => None,
            Some(Some(BlockdevRef::Name(n))) => Some(n.clone()),
            Some(Some(BlockdevRef::Inline(_))) => {
                return Err(format!(
                    "node '{name}': 'backing' must name an existing node, or be null"
                ))
            }
        };
        let Some(wanted) = wanted else {
            return Ok(if current.is_some() { Some(None) } else { None });
        };
        if current.as_ref().is_some_and(|c| c.name() == wanted) {
            return Ok(None);
        }
        let new = graph
            .get(&wanted)
            .map_err(|_| format!("Cannot find device='' nor node-name='{wanted}'"))?;
        if std::ptr::eq(&*new, node) || new.reaches(node) {
            return Err(format!(
                "Making '{wanted}' a backing child of '{name}' would create a cycle"
            ));
        }
        if node.is_active() && !new.is_active() {
            return Err(format!(
                "Inactive '{wanted}' can't be a backing child of active '{name}'"
            ));
        }
        if 1 + new.backing_depth() >= super::MAX_CHAIN_DEPTH {
            return Err(format!(
                "node '{name}': the backing chain would be deeper than {} images",
                super::MAX_CHAIN_DEPTH
            ));
        }
        // As a backing node given by name at open: its other users may
        // write it (fleecing).
        let child = Child::attach(
            name,
            ChildRole::Backing,
            new,
            Perm::CONSISTENT_READ,
            Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED | Perm::WRITE,
        )
        .map_err(|e| e.to_string())?;
        Ok(Some(Some(child)))
    }

    /// The steps that can fail, inside the drained section: read-only
    /// <-> read-write and lazy refcounts. On an error nothing has changed.
    pub fn apply_reopen(&self, node: &Node, r: &Qcow2Reopen) -> Result<Applied, String> {
        let mut applied = Applied::default();
        let was_ro = self.is_read_only();
        if r.read_only && !was_ro {
            self.reopen_read_only()?;
            applied.made_read_only = true;
        } else if !r.read_only && was_ro {
            self.reopen_writable(node)?;
            applied.made_writable = true;
        }
        if let Some(want) = r.lazy {
            if !r.read_only && want != self.is_lazy() {
                if let Err(e) = self.set_lazy(want) {
                    self.undo_reopen(node, applied);
                    return Err(format!("node '{}': {e}", self.name));
                }
                applied.lazy_was = Some(!want);
            }
        }
        Ok(applied)
    }

    /// Undoes [`Qcow2Driver::apply_reopen`] (another node's step failed).
    pub fn undo_reopen(&self, node: &Node, a: Applied) {
        if let Some(was) = a.lazy_was {
            if let Err(e) = self.set_lazy(was) {
                log::error!("node {}: lazy refcounts back: {e}", self.name);
            }
        }
        if a.made_read_only {
            self.make_writable();
            node.set_read_only(false);
        }
        if a.made_writable {
            self.make_read_only();
            node.set_read_only(true);
        }
    }

    /// The steps that cannot fail: the backing edge and the discard
    /// options.
    pub fn commit_reopen(&self, r: Qcow2Reopen) {
        self.discard_unmap.store(r.discard_unmap, Ordering::Relaxed);
        futures::executor::block_on(self.meta.lock()).pass_discard = r.pass_discard;
        if let Some(b) = r.backing {
            self.replace_backing(b);
        }
    }

    /// rw -> ro, as QEMU's qcow2_reopen_prepare for a read-only reopen:
    /// caches and persistent bitmaps written, the dirty bit cleared, the
    /// file flushed; then the write permission on the file goes (and the
    /// write lock with it). A failure leaves the image writable.
    fn reopen_read_only(&self) -> Result<(), String> {
        if let Err(e) = self.write_back() {
            self.closed.store(false, Ordering::Release);
            return Err(format!("node '{}': writing metadata back: {e}", self.name));
        }
        self.demoted.store(true, Ordering::Release);
        self.file.set_perm(
            Perm::CONSISTENT_READ,
            Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED,
        );
        Ok(())
    }

    /// Lazy refcounts on (the dirty bit set: refcounts may lag) or off
    /// (everything written, then the dirty bit cleared: QEMU's
    /// qcow2_mark_clean), on a writable image. As in QEMU the option is
    /// the node's, and the header's lazy-refcounts compat bit stays.
    fn set_lazy(&self, on: bool) -> Result<(), crate::block::BlockError> {
        let f = self.f();
        futures::executor::block_on(async {
            let mut m = self.meta.lock().await;
            let hdr = self.header();
            let incompat = if on {
                hdr.incompatible | header::INCOMPAT_DIRTY
            } else {
                // Refcounts first: the dirty bit may go only once they
                // are right on disk.
                m.flush_all(f, self.no_io()).await?;
                f.flush().await?;
                hdr.incompatible & !header::INCOMPAT_DIRTY
            };
            m.write_header_field(f, header::OFF_INCOMPAT, &incompat.to_be_bytes())
                .await?;
            f.flush().await?;
            m.lazy = on;
            let mut h = hdr.clone();
            h.incompatible = incompat;
            self.header.replace(h);
            self.lazy.store(on, Ordering::Release);
            Ok(())
        })
    }
}
