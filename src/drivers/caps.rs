//! What only some drivers can do, asked of a node by capability rather
//! than by driver: each accessor returns the capability, or None when the
//! node's driver has none. Callers above the driver layer use these (and
//! the block layer's [`crate::block::BlockDriver`] questions) instead of
//! matching on driver types.

use std::io;

use futures::future::LocalBoxFuture;

use super::qcow2::{Snapshot, SnapshotRef};
use super::{FileDriver, Qcow2Driver, RawDriver};
use crate::block::{BlockError, Child, Node, Perm};

/// The format an image header names a backing image by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    Qcow2,
    Raw,
}

impl ImageFormat {
    pub fn name(self) -> &'static str {
        match self {
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Raw => "raw",
        }
    }
}

/// Internal snapshots stored in the image (qcow2).
pub trait InternalSnapshots {
    fn snapshots(&self) -> Vec<Snapshot>;

    /// A snapshot of the image as it is now. The caller holds the node's
    /// users drained.
    fn snapshot_create<'a>(
        &'a self,
        name: &'a str,
        date: (u32, u32),
    ) -> LocalBoxFuture<'a, Result<Snapshot, BlockError>>;

    fn snapshot_delete<'a>(
        &'a self,
        r: &'a SnapshotRef<'a>,
    ) -> LocalBoxFuture<'a, Result<Snapshot, BlockError>>;

    /// Reverts the image to a snapshot. The caller has checked that no one
    /// writes `node` (this driver's node), and holds it drained.
    fn snapshot_goto<'a>(
        &'a self,
        node: &'a Node,
        r: &'a SnapshotRef<'a>,
    ) -> LocalBoxFuture<'a, Result<Snapshot, BlockError>>;
}

/// A format whose header records a backing file (qcow2): the backing
/// edge it can take, and the name it writes.
pub trait BackingFile {
    /// The backing file name the header records.
    fn backing_file_name(&self) -> Option<String>;

    /// The backing format the header records.
    fn backing_format(&self) -> Option<String>;

    /// Gives an image without a backing node one (blockdev-snapshot). The
    /// caller holds the node's users drained.
    fn set_backing(&self, child: Child) -> Result<(), String>;

    /// Replaces the backing edge (None: no backing node); the old edge is
    /// released. The caller holds the node's users drained.
    fn replace_backing(&self, child: Option<Child>);

    /// Rewrites the backing file name in the header (empty: none).
    fn change_backing_file(&self, name: &str) -> Result<(), String>;

    /// Rewrites the backing file name and, where the header records one,
    /// the backing format.
    fn change_backing_file_and_format(
        &self,
        name: &str,
        format: Option<&str>,
    ) -> Result<(), String>;
}

/// Format-specific facts for query-named-block-nodes' ImageInfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FormatSpecific {
    Qcow2 {
        /// Header version 3 ("1.1"), else 2 ("0.10").
        v3: bool,
        lazy_refcounts: bool,
        refcount_bits: u32,
        corrupt: bool,
        extended_l2: bool,
    },
}

/// A protocol node over a host file (`file`).
pub trait ProtocolFile {
    fn filename(&self) -> &str;

    /// Whether this is the host file `(dev, ino)`.
    fn is_file(&self, dev: u64, ino: u64) -> bool;

    /// Sets the file's length, whatever the node's read-only state
    /// (blockdev-create formats a node no one uses).
    fn set_len(&self, node: &Node, size: u64) -> Result<(), BlockError>;

    /// Reads the file's size again (after something else wrote it).
    fn refresh_size(&self) -> io::Result<u64>;

    /// The image locks held: what is taken, what is shared.
    fn held_locks(&self) -> Option<(Perm, Perm)>;

    /// Opens the file again read-write (a read-only node becomes writable).
    fn reopen_read_write(&self, node: &Node) -> Result<(), String>;

    /// The reverse of [`ProtocolFile::reopen_read_write`].
    fn reopen_read_only(&self, node: &Node) -> Result<(), String>;
}

impl InternalSnapshots for Qcow2Driver {
    fn snapshots(&self) -> Vec<Snapshot> {
        Qcow2Driver::snapshots(self)
    }
    fn snapshot_create<'a>(
        &'a self,
        name: &'a str,
        date: (u32, u32),
    ) -> LocalBoxFuture<'a, Result<Snapshot, BlockError>> {
        Box::pin(Qcow2Driver::snapshot_create(self, name, date))
    }
    fn snapshot_delete<'a>(
        &'a self,
        r: &'a SnapshotRef<'a>,
    ) -> LocalBoxFuture<'a, Result<Snapshot, BlockError>> {
        Box::pin(Qcow2Driver::snapshot_delete(self, r))
    }
    fn snapshot_goto<'a>(
        &'a self,
        node: &'a Node,
        r: &'a SnapshotRef<'a>,
    ) -> LocalBoxFuture<'a, Result<Snapshot, BlockError>> {
        Box::pin(Qcow2Driver::snapshot_goto(self, node, r))
    }
}

impl BackingFile for Qcow2Driver {
    fn backing_file_name(&self) -> Option<String> {
        Qcow2Driver::backing_file_name(self)
    }
    fn backing_format(&self) -> Option<String> {
        self.header().backing_format.clone()
    }
    fn set_backing(&self, child: Child) -> Result<(), String> {
        Qcow2Driver::set_backing(self, child)
    }
    fn replace_backing(&self, child: Option<Child>) {
        Qcow2Driver::replace_backing(self, child)
    }
    fn change_backing_file(&self, name: &str) -> Result<(), String> {
        Qcow2Driver::change_backing_file(self, name)
    }
    fn change_backing_file_and_format(
        &self,
        name: &str,
        format: Option<&str>,
    ) -> Result<(), String> {
        Qcow2Driver::change_backing_file_and_format(self, name, format)
    }
}

impl ProtocolFile for FileDriver {
    fn filename(&self) -> &str {
        FileDriver::filename(self)
    }
    fn is_file(&self, dev: u64, ino: u64) -> bool {
        FileDriver::is_file(self, dev, ino)
    }
    fn set_len(&self, node: &Node, size: u64) -> Result<(), BlockError> {
        FileDriver::truncate(self, node, size)
    }
    fn refresh_size(&self) -> io::Result<u64> {
        FileDriver::refresh_size(self)
    }
    fn held_locks(&self) -> Option<(Perm, Perm)> {
        FileDriver::held_locks(self)
    }
    fn reopen_read_write(&self, node: &Node) -> Result<(), String> {
        FileDriver::reopen_read_write(self, node)
    }
    fn reopen_read_only(&self, node: &Node) -> Result<(), String> {
        FileDriver::reopen_read_only(self, node)
    }
}

/// Capabilities by node.
impl Node {
    fn downcast<T: 'static>(&self) -> Option<&T> {
        super::driver_as(self)
    }

    /// The format an image header names this node by as a backing image:
    /// qcow2, or raw for raw and file nodes; None for filters and null-co.
    pub fn image_format(&self) -> Option<ImageFormat> {
        if self.downcast::<Qcow2Driver>().is_some() {
            Some(ImageFormat::Qcow2)
        } else if self.downcast::<RawDriver>().is_some() || self.downcast::<FileDriver>().is_some()
        {
            Some(ImageFormat::Raw)
        } else {
            None
        }
    }

    /// Internal snapshots, where the format stores them (qcow2).
    pub fn internal_snapshots(&self) -> Option<&dyn InternalSnapshots> {
        self.downcast::<Qcow2Driver>()
            .map(|q| q as &dyn InternalSnapshots)
    }

    /// The backing file the header records, where the format has one
    /// (qcow2, with or without a backing file now).
    pub fn backing_file(&self) -> Option<&dyn BackingFile> {
        self.downcast::<Qcow2Driver>()
            .map(|q| q as &dyn BackingFile)
    }

    /// Whether persistent dirty bitmaps can be stored in the image (a
    /// writable qcow2 v3 image).
    pub fn can_store_bitmaps(&self) -> bool {
        self.downcast::<Qcow2Driver>()
            .is_some_and(|q| q.can_store_bitmaps())
    }

    /// Format-specific facts for query-named-block-nodes.
    pub fn format_specific(&self) -> Option<FormatSpecific> {
        let q = self.downcast::<Qcow2Driver>()?;
        let h = q.header();
        Some(FormatSpecific::Qcow2 {
            v3: h.version >= 3,
            lazy_refcounts: q.is_lazy(),
            refcount_bits: h.refcount_bits(),
            corrupt: h.incompatible & 2 != 0,
            extended_l2: h.extended_l2(),
        })
    }

    /// The host file of a `file` node (not of the nodes above it: see
    /// [`Node::file_name`] for that).
    pub fn protocol_file(&self) -> Option<&dyn ProtocolFile> {
        self.downcast::<FileDriver>()
            .map(|f| f as &dyn ProtocolFile)
    }
}
