//! The `copy-on-read` filter driver: reads that find their data below the
//! filtered node (in its backing chain) also write it into that node, so
//! the image fills up with what the guest reads (QEMU's copy-on-read, and
//! what block-stream builds on).
//!
//! ```text
//!   read  -> block status of the filtered node, extent by extent
//!            depth 0: read it            depth > 0: read it, write it back
//!   write -> passes through
//! ```
//!
//! A read that copies and a guest write to the same bytes are serialised
//! (QEMU marks copy-on-read requests serialising): otherwise the copy could
//! write old data over the guest's newer write. Both take the range in a
//! table of ranges in flight ([`RangeLock`]) and wait for an overlapping one.

use serde::Deserialize;

use super::{Allocation, BlockdevRef};
use crate::block::ranges::RangeLock;
use crate::block::{BlockError, Child, ChildRole, Graph, GraphError, Node, Perm};
use crate::io::IoVecs;
use crate::opts;

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct CorOptions {
    #[serde(default)]
    pub node_name: String,
    pub file: BlockdevRef,
    /// The lowest node of the chain to copy from (inclusive): data below
    /// it is read but not copied.
    pub bottom: Option<String>,
    #[serde(default, deserialize_with = "opts::bool")]
    pub read_only: bool,
    /// Common options (QEMU's BlockdevOptions base): see [`super::CommonOptions`].
    #[serde(default, deserialize_with = "opts::bool")]
    pub auto_read_only: bool,
    #[serde(default)]
    pub detect_zeroes: super::DetectZeroes,
    #[serde(default, deserialize_with = "opts::bool")]
    pub force_share: bool,
    /// QEMU 10's `active`: off opens the node inactive (no write lock,
    /// no write); absent means on, or inactive under an inactive parent.
    #[serde(default, deserialize_with = "opts::opt_bool")]
    pub active: Option<bool>,
    /// Accepted on every node as QEMU does; only `file`/`host_device`
    /// nodes act on it (a child opened in place does not inherit it).
    #[serde(default)]
    pub cache: super::CacheOptions,
}

pub struct CorDriver {
    file: Child,
    /// Depth of `bottom` below the filtered node (copy from it and above).
    bottom_depth: Option<u32>,
    ranges: RangeLock,
}

impl CorDriver {
    pub fn open(o: &CorOptions, graph: &mut Graph) -> Result<Self, GraphError> {
        let child = super::open_child(
            graph,
            &o.node_name,
            "file",
            &o.file,
            super::DiscardMode::Ignore,
        )?;
        let bottom_depth = match &o.bottom {
            None => None,
            Some(b) => {
                let bn = graph.get(b)?;
                // Its depth: 0 for the filtered node itself.
                let found = (0u32..)
                    .zip(std::iter::once(child.clone()).chain(child.backing_chain()))
                    .find(|(_, n)| std::sync::Arc::ptr_eq(n, &bn))
                    .map(|(depth, _)| depth);
                Some(found.ok_or_else(|| GraphError::Open {
                    node: o.node_name.clone(),
                    reason: format!("'{b}' is not in the backing chain of '{}'", child.name()),
                })?)
            }
        };
        let mut perm = Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED;
        if !o.read_only {
            perm = perm | Perm::WRITE;
        }
        let file = Child::attach(&o.node_name, ChildRole::Filtered, child, perm, Perm::ALL)?;
        Ok(CorDriver {
            file,
            bottom_depth,
            ranges: RangeLock::default(),
        })
    }

    pub fn file(&self) -> &Child {
        &self.file
    }

    pub fn size(&self) -> u64 {
        self.file.node().size()
    }

    pub fn request_alignment(&self) -> u32 {
        self.file.node().request_alignment()
    }

    fn copies(&self, depth: u32) -> bool {
        depth > 0 && self.bottom_depth.is_none_or(|b| depth <= b)
    }

    pub async fn preadv(&self, offset: u64, iov: &IoVecs) -> Result<(), BlockError> {
        let node: &Node = self.file.node();
        let len = iov.len();
        let mut done = 0;
        while done < len {
            let pos = offset + done;
            let st = node.block_status(pos, len - done).await?;
            let n = st.len.clamp(1, len - done);
            let part = iov.sub(done, n);
            if st.kind != Allocation::Unallocated && self.copies(st.depth) && !node.is_read_only() {
                let _g = self.ranges.take(pos, pos + n).await;
                node.preadv(pos, &part).await?;
                // QEMU's bdrv_co_do_copy_on_readv raises it on the node
                // the copy is written to.
                node.debug_event(crate::block::DebugEvent::CorWrite);
                node.pwritev(pos, &part, false).await?;
            } else {
                node.preadv(pos, &part).await?;
            }
            done += n;
        }
        Ok(())
    }

    pub async fn pwritev(&self, offset: u64, iov: &IoVecs, fua: bool) -> Result<(), BlockError> {
        let _g = self.ranges.take(offset, offset + iov.len()).await;
        self.file.node().pwritev(offset, iov, fua).await
    }

    pub async fn pwrite_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
        fua: bool,
    ) -> Result<(), BlockError> {
        let _g = self.ranges.take(offset, offset + len).await;
        self.file
            .node()
            .pwrite_zeroes(offset, len, may_unmap, fua)
            .await
    }

    pub async fn pdiscard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        let _g = self.ranges.take(offset, offset + len).await;
        self.file.node().pdiscard(offset, len).await
    }
}
