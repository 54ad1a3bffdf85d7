//! BlockBackend: the root edge an export holds on a node (QEMU's blk_*).
//!
//! It checks every request against the node's size, counts it in the
//! accounting, and turns the write-cache flag into
//! FUA writes: with the cache off, a write is durable when it completes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::{BlockError, BlockStats, Child, ChildRole, GraphError, IoKind, Node, Perm};
use crate::io::IoVecs;

pub struct BlockBackend {
    name: String,
    root: Child,
    writable: bool,
    write_cache: AtomicBool,
    stats: BlockStats,
}

impl BlockBackend {
    /// Attaches a backend named `name` to `node`. A writable backend takes
    /// write permission; every backend shares everything, like QEMU's exports.
    pub fn new(name: &str, node: Arc<Node>, writable: bool) -> Result<Self, GraphError> {
        let mut perm = Perm::CONSISTENT_READ;
        if writable {
            perm = perm | Perm::WRITE;
        }
        let root = Child::attach(name, ChildRole::Root, node, perm, Perm::ALL)?;
        Ok(BlockBackend {
            name: name.to_string(),
            root,
            writable,
            write_cache: AtomicBool::new(true),
            stats: BlockStats::default(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn node(&self) -> &Arc<Node> {
        self.root.node()
    }

    /// The root edge (moved to an overlay by an external snapshot).
    pub fn root(&self) -> &Child {
        &self.root
    }

    pub fn is_writable(&self) -> bool {
        self.writable
    }

    pub fn size(&self) -> u64 {
        self.node().size()
    }

    pub fn stats(&self) -> &BlockStats {
        &self.stats
    }

    pub fn write_cache(&self) -> bool {
        self.write_cache.load(Ordering::Relaxed)
    }

    /// With the cache off, every write is written through (FUA).
    pub fn set_write_cache(&self, enabled: bool) {
        self.write_cache.store(enabled, Ordering::Relaxed);
    }

    /// As `set_write_cache`, returning the setting it replaced.
    pub fn swap_write_cache(&self, enabled: bool) -> bool {
        self.write_cache.swap(enabled, Ordering::Relaxed)
    }

    fn check(&self, kind: IoKind, offset: u64, len: u64) -> Result<(), BlockError> {
        let size = self.size();
        let in_range = offset.checked_add(len).is_some_and(|end| end <= size);
        if !in_range {
            self.stats.record_invalid(kind);
            return Err(BlockError::OutOfRange {
                node: self.node().name().to_string(),
                offset,
                len,
                size,
            });
        }
        let writes = !matches!(kind, IoKind::Read | IoKind::Flush);
        if writes && !self.writable {
            self.stats.record_invalid(kind);
            return Err(BlockError::ReadOnly {
                node: self.node().name().to_string(),
            });
        }
        Ok(())
    }

    async fn account<F>(&self, kind: IoKind, bytes: u64, f: F) -> Result<(), BlockError>
    where
        F: std::future::Future<Output = Result<(), BlockError>>,
    {
        let started = crate::io::now();
        let r = f.await;
        self.stats.record_done(kind, bytes, started, r.is_ok());
        r
    }

    pub async fn preadv(&self, offset: u64, iov: &IoVecs) -> Result<(), BlockError> {
        self.check(IoKind::Read, offset, iov.len())?;
        self.account(IoKind::Read, iov.len(), self.node().preadv(offset, iov))
            .await
    }

    pub async fn pwritev(&self, offset: u64, iov: &IoVecs) -> Result<(), BlockError> {
        self.check(IoKind::Write, offset, iov.len())?;
        let fua = !self.write_cache();
        let r = self
            .account(
                IoKind::Write,
                iov.len(),
                self.node().pwritev(offset, iov, fua),
            )
            .await;
        if r.is_ok() {
            self.stats.record_write_end(offset + iov.len());
        }
        r
    }

    pub async fn flush(&self) -> Result<(), BlockError> {
        self.account(IoKind::Flush, 0, self.node().flush()).await
    }

    pub async fn pdiscard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.check(IoKind::Discard, offset, len)?;
        self.account(IoKind::Discard, len, self.node().pdiscard(offset, len))
            .await
    }

    pub async fn pwrite_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
    ) -> Result<(), BlockError> {
        self.check(IoKind::WriteZeroes, offset, len)?;
        let fua = !self.write_cache();
        let r = self
            .account(
                IoKind::WriteZeroes,
                len,
                self.node().pwrite_zeroes(offset, len, may_unmap, fua),
            )
            .await;
        if r.is_ok() {
            self.stats.record_write_end(offset + len);
        }
        r
    }
}
