//! Block drivers, by layer: protocol (`file`, `null-co`) and format (`raw`).
//!
//! The set of drivers is closed, so [`Driver`] is an enum that dispatches to
//! each driver's async callbacks (QEMU's bdrv_co_* interface).

mod cor;
pub mod file;
mod null;
pub mod qcow2;
mod raw;
mod throttle;

pub use cor::{CorDriver, CorOptions};
pub use file::{CacheOptions, FileDriver, FileOptions, Locking};
pub use null::{NullDriver, NullOptions};
pub use qcow2::{Allocation, BlockStatus, Qcow2Driver, Qcow2Options};
pub use raw::{RawDriver, RawOptions};
pub use throttle::{ThrottleDriver, ThrottleOptions};

use futures::future::LocalBoxFuture;
use serde::Deserialize;

use crate::block::{BlockError, BlockFuture, Child, Graph, GraphError, Node};
use crate::io::IoVecs;

/// Options of `--blockdev` / blockdev-add, tagged by `driver`.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "driver", rename_all = "kebab-case")]
pub enum BlockdevOptions {
    CopyOnRead(CorOptions),
    File(FileOptions),
    NullCo(NullOptions),
    Qcow2(Qcow2Options),
    Raw(RawOptions),
    Throttle(ThrottleOptions),
}

/// A reference to a child node: the name of an existing node, or the
/// options of a node to open in place (given a generated name).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum BlockdevRef {
    Name(String),
    Inline(Box<BlockdevOptions>),
}

/// Resolves a child reference: an existing node by name, or a node opened
/// in place (named after its parent when the options give no name). As in
/// QEMU, a child opened in place inherits `discard=unmap` from its parent.
pub(crate) fn open_child(
    graph: &mut Graph,
    parent: &str,
    r: &BlockdevRef,
    parent_discard: DiscardMode,
) -> Result<std::sync::Arc<Node>, GraphError> {
    match r {
        BlockdevRef::Name(name) => graph.get(name),
        BlockdevRef::Inline(inner) => {
            let mut inner = (**inner).clone();
            if inner.node_name().is_empty() {
                inner.set_node_name(format!("{parent}-file"));
            }
            if parent_discard == DiscardMode::Unmap {
                inner.inherit_discard_unmap();
            }
            graph.add_implicit(&inner)
        }
    }
}

/// `discard` option: whether discard requests reach the storage.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiscardMode {
    /// Discard requests succeed without effect (QEMU's default).
    #[default]
    Ignore,
    /// Discard requests deallocate space.
    Unmap,
}

impl BlockdevOptions {
    /// Parses options, naming the parameter an error is about (serde's
    /// tagged enums lose that).
    pub fn from_json(v: serde_json::Value) -> Result<Self, String> {
        fn de<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Result<T, String> {
            serde_path_to_error::deserialize(v).map_err(|e| {
                let path = e.path().to_string();
                format!("parameter '{path}': {}", e.into_inner())
            })
        }
        let mut inner = v.clone();
        let driver = match inner.as_object_mut().and_then(|o| o.remove("driver")) {
            Some(serde_json::Value::String(d)) => d,
            _ => return serde_json::from_value(v).map_err(|e| e.to_string()),
        };
        match driver.as_str() {
            "copy-on-read" => de(inner).map(BlockdevOptions::CopyOnRead),
            "file" => de(inner).map(BlockdevOptions::File),
            "null-co" => de(inner).map(BlockdevOptions::NullCo),
            "qcow2" => de(inner).map(BlockdevOptions::Qcow2),
            "raw" => de(inner).map(BlockdevOptions::Raw),
            "throttle" => de(inner).map(BlockdevOptions::Throttle),
            _ => serde_json::from_value(v).map_err(|e| e.to_string()),
        }
    }

    /// Takes `discard=unmap` from a parent (inline children).
    pub fn inherit_discard_unmap(&mut self) {
        match self {
            BlockdevOptions::File(o) => o.discard = DiscardMode::Unmap,
            BlockdevOptions::Raw(o) => o.discard = DiscardMode::Unmap,
            BlockdevOptions::Qcow2(o) => o.discard = DiscardMode::Unmap,
            BlockdevOptions::NullCo(_)
            | BlockdevOptions::Throttle(_)
            | BlockdevOptions::CopyOnRead(_) => {}
        }
    }

    pub fn node_name(&self) -> &str {
        match self {
            BlockdevOptions::CopyOnRead(o) => &o.node_name,
            BlockdevOptions::File(o) => &o.node_name,
            BlockdevOptions::NullCo(o) => &o.node_name,
            BlockdevOptions::Qcow2(o) => &o.node_name,
            BlockdevOptions::Raw(o) => &o.node_name,
            BlockdevOptions::Throttle(o) => &o.node_name,
        }
    }

    pub fn set_node_name(&mut self, name: String) {
        match self {
            BlockdevOptions::CopyOnRead(o) => o.node_name = name,
            BlockdevOptions::File(o) => o.node_name = name,
            BlockdevOptions::NullCo(o) => o.node_name = name,
            BlockdevOptions::Qcow2(o) => o.node_name = name,
            BlockdevOptions::Raw(o) => o.node_name = name,
            BlockdevOptions::Throttle(o) => o.node_name = name,
        }
    }

    pub fn read_only(&self) -> bool {
        match self {
            BlockdevOptions::CopyOnRead(o) => o.read_only,
            BlockdevOptions::File(o) => o.read_only,
            BlockdevOptions::NullCo(o) => o.read_only,
            BlockdevOptions::Qcow2(o) => o.read_only,
            BlockdevOptions::Raw(o) => o.read_only,
            BlockdevOptions::Throttle(o) => o.read_only,
        }
    }

    pub fn driver_name(&self) -> &'static str {
        match self {
            BlockdevOptions::CopyOnRead(_) => "copy-on-read",
            BlockdevOptions::File(_) => "file",
            BlockdevOptions::NullCo(_) => "null-co",
            BlockdevOptions::Qcow2(_) => "qcow2",
            BlockdevOptions::Raw(_) => "raw",
            BlockdevOptions::Throttle(_) => "throttle",
        }
    }
}

/// An open driver instance.
pub enum Driver {
    CopyOnRead(CorDriver),
    File(FileDriver),
    Null(NullDriver),
    Qcow2(Box<Qcow2Driver>),
    Raw(RawDriver),
    Throttle(ThrottleDriver),
}

impl Driver {
    /// Opens the driver `opts` names; child references are resolved in (or
    /// added to) `graph`.
    pub fn open(opts: &BlockdevOptions, graph: &mut Graph) -> Result<Driver, GraphError> {
        match opts {
            BlockdevOptions::CopyOnRead(o) => CorDriver::open(o, graph).map(Driver::CopyOnRead),
            BlockdevOptions::File(o) => FileDriver::open(o).map(Driver::File),
            BlockdevOptions::NullCo(o) => NullDriver::open(o).map(Driver::Null),
            BlockdevOptions::Qcow2(o) => {
                Qcow2Driver::open(o, graph).map(|d| Driver::Qcow2(Box::new(d)))
            }
            BlockdevOptions::Raw(o) => RawDriver::open(o, graph).map(Driver::Raw),
            BlockdevOptions::Throttle(o) => ThrottleDriver::open(o, graph).map(Driver::Throttle),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Driver::CopyOnRead(_) => "copy-on-read",
            Driver::File(_) => "file",
            Driver::Null(_) => "null-co",
            Driver::Qcow2(_) => "qcow2",
            Driver::Raw(_) => "raw",
            Driver::Throttle(_) => "throttle",
        }
    }

    pub fn size(&self) -> u64 {
        match self {
            Driver::CopyOnRead(d) => d.size(),
            Driver::File(d) => d.size(),
            Driver::Null(d) => d.size(),
            Driver::Qcow2(d) => d.size(),
            Driver::Raw(d) => d.size(),
            Driver::Throttle(d) => d.size(),
        }
    }

    pub fn request_alignment(&self) -> u32 {
        match self {
            Driver::CopyOnRead(d) => d.request_alignment(),
            Driver::File(d) => d.request_alignment(),
            Driver::Null(_) => 1,
            Driver::Qcow2(d) => d.request_alignment(),
            Driver::Raw(d) => d.request_alignment(),
            Driver::Throttle(d) => d.request_alignment(),
        }
    }

    pub fn children(&self) -> Vec<&Child> {
        match self {
            Driver::File(_) | Driver::Null(_) => Vec::new(),
            Driver::Raw(d) => vec![d.file()],
            Driver::Throttle(d) => vec![d.file()],
            Driver::CopyOnRead(d) => vec![d.file()],
            Driver::Qcow2(d) => {
                let mut v = vec![d.file()];
                v.extend(d.backing());
                v
            }
        }
    }

    pub fn preadv<'a>(&'a self, node: &'a Node, offset: u64, iov: &'a IoVecs) -> BlockFuture<'a> {
        match self {
            Driver::CopyOnRead(d) => BlockFuture::boxed(d.preadv(offset, iov)),
            Driver::File(d) => BlockFuture::boxed(d.preadv(node, offset, iov)),
            Driver::Null(d) => BlockFuture::ready(d.preadv(iov)),
            Driver::Qcow2(d) => BlockFuture::boxed(d.preadv(offset, iov)),
            Driver::Raw(d) => d.preadv(offset, iov),
            Driver::Throttle(d) => d.preadv(offset, iov),
        }
    }

    pub fn pwritev<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        iov: &'a IoVecs,
        fua: bool,
    ) -> BlockFuture<'a> {
        match self {
            Driver::CopyOnRead(d) => BlockFuture::boxed(d.pwritev(offset, iov, fua)),
            Driver::File(d) => BlockFuture::boxed(d.pwritev(node, offset, iov, fua)),
            Driver::Null(_) => BlockFuture::ready(Ok(())),
            Driver::Qcow2(d) => BlockFuture::boxed(d.pwritev(node, offset, iov, fua)),
            Driver::Raw(d) => d.pwritev(offset, iov, fua),
            Driver::Throttle(d) => d.pwritev(offset, iov, fua),
        }
    }

    pub fn flush<'a>(&'a self, node: &'a Node) -> BlockFuture<'a> {
        match self {
            Driver::CopyOnRead(d) => d.file().node().flush(),
            Driver::File(d) => BlockFuture::boxed(d.flush(node)),
            Driver::Null(_) => BlockFuture::ready(Ok(())),
            Driver::Qcow2(d) => BlockFuture::boxed(d.flush()),
            Driver::Raw(d) => d.flush(),
            Driver::Throttle(d) => d.flush(),
        }
    }

    pub fn pdiscard<'a>(&'a self, node: &'a Node, offset: u64, len: u64) -> BlockFuture<'a> {
        match self {
            Driver::CopyOnRead(d) => BlockFuture::boxed(d.pdiscard(offset, len)),
            Driver::File(d) => BlockFuture::boxed(d.pdiscard(node, offset, len)),
            Driver::Null(_) => BlockFuture::ready(Ok(())),
            Driver::Qcow2(d) => BlockFuture::boxed(d.pdiscard(offset, len)),
            Driver::Raw(d) => d.pdiscard(offset, len),
            Driver::Throttle(d) => d.pdiscard(offset, len),
        }
    }

    pub fn pwrite_zeroes<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        len: u64,
        may_unmap: bool,
        fua: bool,
    ) -> BlockFuture<'a> {
        match self {
            Driver::CopyOnRead(d) => {
                BlockFuture::boxed(d.pwrite_zeroes(offset, len, may_unmap, fua))
            }
            Driver::File(d) => {
                BlockFuture::boxed(d.pwrite_zeroes(node, offset, len, may_unmap, fua))
            }
            Driver::Null(_) => BlockFuture::ready(Ok(())),
            Driver::Qcow2(d) => {
                BlockFuture::boxed(d.pwrite_zeroes(node, offset, len, may_unmap, fua))
            }
            Driver::Raw(d) => d.pwrite_zeroes(offset, len, may_unmap, fua),
            Driver::Throttle(d) => d.pwrite_zeroes(offset, len, may_unmap, fua),
        }
    }
}

impl Driver {
    /// What `[offset, offset + len)` reads as from its start, and how far.
    pub fn block_status<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        len: u64,
    ) -> LocalBoxFuture<'a, Result<BlockStatus, BlockError>> {
        let data = |len| {
            Box::pin(std::future::ready(Ok(BlockStatus {
                kind: Allocation::Data,
                len,
                depth: 0,
            })))
        };
        let _ = node;
        match self {
            Driver::Qcow2(d) => Box::pin(d.block_status(offset, len)),
            Driver::Raw(d) => {
                let inner = d.file().node().clone();
                let base = d.offset();
                Box::pin(async move { inner.block_status(base + offset, len).await })
            }
            Driver::Throttle(d) => d.file().node().block_status(offset, len),
            Driver::CopyOnRead(d) => d.file().node().block_status(offset, len),
            Driver::File(_) => data(len),
            Driver::Null(d) => Box::pin(std::future::ready(Ok(BlockStatus {
                kind: if d.reads_zeroes() {
                    Allocation::Zero
                } else {
                    Allocation::Data
                },
                len,
                depth: 0,
            }))),
        }
    }

    /// Writes out what the driver keeps in memory before the node goes
    /// away (management threads only).
    pub fn close(&self) {
        if let Driver::Qcow2(d) = self {
            d.close();
        }
    }
}

/// Preallocates space in a file node (no-op for other drivers).
pub(crate) async fn preallocate(node: &Node, offset: u64, len: u64) -> Result<(), BlockError> {
    match node.driver() {
        Driver::File(f) => f.preallocate(node, offset, len).await,
        _ => Ok(()),
    }
}

/// The file name under a node, following `file` children down to a file
/// node.
pub fn file_name_of(node: &Node) -> Option<String> {
    match node.driver() {
        Driver::File(f) => Some(f.filename().to_string()),
        Driver::Raw(r) => file_name_of(r.file().node()),
        Driver::Qcow2(q) => file_name_of(q.file().node()),
        Driver::Throttle(t) => file_name_of(t.file().node()),
        Driver::CopyOnRead(c) => file_name_of(c.file().node()),
        Driver::Null(_) => None,
    }
}
