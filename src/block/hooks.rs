//! Write hooks: what a block job puts around every write to a node it
//! watches (QEMU's before-write notifiers and its mirror/copy-before-write
//! filters, as a hook on the node instead of a node in the graph).
//!
//! ```text
//!   Node::pwritev / pwrite_zeroes / pdiscard
//!     -> mark dirty bitmaps
//!     -> hook N wraps ( ... hook 1 wraps ( driver write ) )
//! ```
//!
//! A hook receives the write's coordinates and the future that performs
//! it, not yet started, and returns the future to run instead: a backup
//! copies the old data out first (copy-before-write), a mirror marks the
//! range dirty once the write completed, or writes the same data to its
//! target before the guest's request completes (write-blocking).
//!
//! The set of hooks is open from the block layer's point of view (jobs
//! sit above it and depend on it, not the other way), so a trait. The
//! node's list is a `Swap`: a write reads it with one load, and an empty
//! list costs nothing else.

use std::sync::Arc;

use super::{BlockFuture, Node};
use crate::io::IoVecs;

/// What kind of write a hook wraps.
#[derive(Clone, Copy)]
pub enum WriteOp<'a> {
    /// Guest data (with `fua`).
    Data(&'a IoVecs, bool),
    /// Zeroes (may the space be unmapped, fua).
    Zeroes(bool, bool),
    /// A discard.
    Discard,
}

pub trait WriteHook: Send + Sync {
    /// Returns the future that runs in place of `inner`, a write of
    /// `[offset, offset + len)` to `node` that has not started yet.
    fn wrap<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        len: u64,
        op: WriteOp<'a>,
        inner: BlockFuture<'a>,
    ) -> BlockFuture<'a>;
}

/// The hooks of one node.
pub type HookList = Arc<Vec<Arc<dyn WriteHook>>>;

/// A read hook: what a fleecing backup puts around every read of its
/// target (QEMU serialises such reads with copy-before-write in its cbw
/// filter). A read of the target that finds a cluster not yet copied reads
/// it from the source, its backing; without the hook the guest's write
/// could land on the source between the two and the reader would see the
/// new data instead of the point in time.
pub trait ReadHook: Send + Sync {
    /// Returns the future that runs in place of `inner`, a read of
    /// `[offset, offset + len)` of `node` that has not started yet.
    fn wrap_read<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        len: u64,
        inner: BlockFuture<'a>,
    ) -> BlockFuture<'a>;
}

/// The read hooks of one node.
pub type ReadHookList = Arc<Vec<Arc<dyn ReadHook>>>;
