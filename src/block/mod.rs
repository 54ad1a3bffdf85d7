//! The block graph: nodes, the edges between them, and the BlockBackend that
//! an export (or, later, a job) holds as its root.
//!
//! ```text
//!   export --BlockBackend--> Node "d0" (raw) --Child(file)--> Node "f0" (file)
//! ```
//!
//! Knows nothing of virtio. Names follow QEMU's block layer: [`Node`] is
//! BlockDriverState, [`Child`] is BdrvChild, [`BlockBackend`] is blk_*.

mod backend;
pub mod bitmap;
mod debug;
mod driver;
mod error;
mod future;
mod graph;
pub mod hooks;
mod node;
mod perm;
pub mod policy;
pub mod ranges;
mod stats;
mod status;
pub mod swap;
pub mod users;

pub use backend::BlockBackend;
pub use debug::DebugEvent;
pub use driver::BlockDriver;
pub use error::{os_text, BlockError, GraphError};
pub use future::BlockFuture;
pub use graph::Graph;
pub use node::{Child, ChildRole, DrainCounter, Node};
pub use perm::Perm;
pub use stats::{
    defer_on_this_thread, publish_deferred, stop_deferring, BlockStats, HistogramKind, IoKind,
    KindStats, LatencyHistogram,
};
pub use status::{Allocation, BlockStatus};

/// Bytes in a sector, the unit of virtio-blk and QEMU offsets.
pub const SECTOR_SIZE: u64 = 512;
