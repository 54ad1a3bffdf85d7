//! Block drivers, by layer: protocol (`file`, `null-co`, `nbd`), format (`raw`,
//! `qcow2`) and filters (`throttle`, `copy-on-read`).
//!
//! Each driver implements the block layer's [`BlockDriver`] interface
//! (dispatch.rs; QEMU's bdrv_co_* callbacks); this layer opens them
//! ([`open`], `Graph::add`) and answers what only some drivers can do:
//! capabilities (caps.rs: internal snapshots, a backing file recorded in a
//! header, persistent bitmaps, the protocol file) and reopening with new
//! options (reopen.rs). probe.rs tells formats apart by their magic, for
//! the short form without --format. Nothing outside this layer needs to know which
//! driver a node has.

mod blkdebug;
mod caps;
mod cor;
mod dispatch;
pub mod file;
pub mod luks;
pub mod nbd;
mod null;
pub mod probe;
pub mod qcow2;
mod quorum;
mod raw;
pub mod rbd;
mod reopen;
mod throttle;

pub use blkdebug::{BlkdebugDriver, BlkdebugOptions};
pub use caps::{BackingFile, FormatSpecific, ImageFormat, InternalSnapshots, ProtocolFile};
pub use cor::{CorDriver, CorOptions};
pub use file::{Aio, CacheOptions, FileDriver, FileOptions, Locking};
pub use luks::{LuksDriver, LuksOptions};
pub use nbd::{NbdDriver, NbdOptions};
pub use null::{NullDriver, NullOptions};
pub use qcow2::{Qcow2Driver, Qcow2Options};
pub use reopen::PreparedReopen;
// Moved to the block layer; callers should import them from there.
pub use crate::block::{Allocation, BlockStatus};
pub use quorum::{QuorumDriver, QuorumOptions};
pub use raw::{RawDriver, RawOptions};
pub use rbd::{RbdDriver, RbdOptions};
pub use throttle::{ThrottleDriver, ThrottleOptions};

use std::sync::Arc;

use serde::Deserialize;

use crate::block::{BlockDriver, BlockError, Graph, GraphError, Node};

/// Options of `--blockdev` / blockdev-add, tagged by `driver`.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "driver", rename_all = "kebab-case")]
pub enum BlockdevOptions {
    Blkdebug(Box<BlkdebugOptions>),
    CopyOnRead(CorOptions),
    File(FileOptions),
    /// The `file` driver on a block (or character) device, as QEMU's
    /// host_device: the same options, and the file must be a device.
    #[serde(rename = "host_device")]
    HostDevice(FileOptions),
    Luks(LuksOptions),
    Nbd(NbdOptions),
    NullCo(NullOptions),
    Qcow2(Qcow2Options),
    Quorum(Box<QuorumOptions>),
    Raw(RawOptions),
    Rbd(RbdOptions),
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
    child_name: &str,
    r: &BlockdevRef,
    parent_discard: DiscardMode,
) -> Result<Arc<Node>, GraphError> {
    match r {
        BlockdevRef::Name(name) => {
            let child = graph.get(name)?;
            // QEMU's bdrv_attach_child_common: an inactive node cannot
            // serve an active parent.
            if opening_active() && !child.is_active() {
                return Err(GraphError::Open {
                    node: parent.to_string(),
                    reason: format!(
                        "Inactive '{name}' can't be a {child_name} child of active '{parent}'"
                    ),
                });
            }
            Ok(child)
        }
        BlockdevRef::Inline(inner) => {
            let mut inner = (**inner).clone();
            if inner.common().active.is_none() {
                inner.set_active(opening_active());
            }
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

/// `detect-zeroes`: whether a write whose data is all zeroes is turned
/// into a write-zeroes request (QEMU's bdrv_aligned_pwritev).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DetectZeroes {
    #[default]
    Off,
    /// All-zero writes become write-zeroes (the space stays allocated).
    On,
    /// All-zero writes become write-zeroes that may deallocate, when the
    /// node has `discard=unmap` (QEMU refuses `unmap` without it).
    Unmap,
}

/// The options QEMU's BlockdevOptions has for every driver, beside
/// `node-name`, `read-only`, `discard` and `cache`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CommonOptions {
    /// With `read-only=off`, open read-only when the image cannot be
    /// opened for writing instead of failing (QEMU's auto-read-only; libvirt
    /// sets it on every protocol node). Only the `file`/`host_device`
    /// drivers can fall back; a writer then fails to attach.
    pub auto_read_only: bool,
    pub detect_zeroes: DetectZeroes,
    /// Open the image without taking its locks' shared-permission bytes
    /// (QEMU's force-share; needs `read-only=on`, as in QEMU).
    pub force_share: bool,
    /// QEMU 10's `active` (None: not given).
    pub active: Option<bool>,
}

thread_local! {
    /// Whether the node being opened on this thread is active: its
    /// children opened in place (inline, or backing files from a header)
    /// inherit an inactive parent's state, as in QEMU.
    static OPENING_ACTIVE: std::cell::Cell<bool> = const { std::cell::Cell::new(true) };
}

/// Whether the node being opened on this thread is active (false while an
/// inactive node opens its children).
pub(crate) fn opening_active() -> bool {
    OPENING_ACTIVE.with(|a| a.get())
}

impl BlockdevOptions {
    /// The options every driver has.
    pub fn common(&self) -> CommonOptions {
        macro_rules! c {
            ($o:expr) => {
                CommonOptions {
                    auto_read_only: $o.auto_read_only,
                    detect_zeroes: $o.detect_zeroes,
                    force_share: $o.force_share,
                    active: $o.active,
                }
            };
        }
        match self {
            BlockdevOptions::Blkdebug(o) => c!(o),
            BlockdevOptions::CopyOnRead(o) => c!(o),
            BlockdevOptions::File(o) | BlockdevOptions::HostDevice(o) => c!(o),
            BlockdevOptions::Luks(o) => c!(o),
            BlockdevOptions::Nbd(o) => c!(o),
            BlockdevOptions::NullCo(o) => c!(o),
            BlockdevOptions::Qcow2(o) => c!(o),
            BlockdevOptions::Quorum(o) => c!(o),
            BlockdevOptions::Raw(o) => c!(o),
            BlockdevOptions::Rbd(o) => c!(o),
            BlockdevOptions::Throttle(o) => c!(o),
        }
    }

    /// The `discard` option of drivers that have one.
    pub fn discard(&self) -> DiscardMode {
        match self {
            BlockdevOptions::File(o) | BlockdevOptions::HostDevice(o) => o.discard,
            BlockdevOptions::Raw(o) => o.discard,
            BlockdevOptions::Luks(o) => o.discard,
            BlockdevOptions::Nbd(o) => o.discard,
            BlockdevOptions::Qcow2(o) => o.discard,
            BlockdevOptions::Rbd(o) => o.discard,
            BlockdevOptions::NullCo(_)
            | BlockdevOptions::Throttle(_)
            | BlockdevOptions::Blkdebug(_)
            | BlockdevOptions::Quorum(_)
            | BlockdevOptions::CopyOnRead(_) => DiscardMode::Ignore,
        }
    }

    /// Checks the common options as QEMU's bdrv_open_common does.
    pub(crate) fn check_common(&self) -> Result<(), String> {
        let c = self.common();
        if c.detect_zeroes == DetectZeroes::Unmap && self.discard() != DiscardMode::Unmap {
            return Err("setting detect-zeroes to unmap is not allowed without setting discard operation to unmap".into());
        }
        if c.force_share && !self.read_only() {
            return Err("force-share=on can only be used with read-only images".into());
        }
        Ok(())
    }

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
            "blkdebug" => de(inner).map(|o| BlockdevOptions::Blkdebug(Box::new(o))),
            "copy-on-read" => de(inner).map(BlockdevOptions::CopyOnRead),
            "file" => de(inner).map(BlockdevOptions::File),
            "host_device" => de(inner).map(BlockdevOptions::HostDevice),
            "luks" => de(inner).map(BlockdevOptions::Luks),
            "nbd" => de(inner).map(BlockdevOptions::Nbd),
            "null-co" => de(inner).map(BlockdevOptions::NullCo),
            "qcow2" => de(inner).map(BlockdevOptions::Qcow2),
            "quorum" => de(inner).map(|o| BlockdevOptions::Quorum(Box::new(o))),
            "raw" => de(inner).map(BlockdevOptions::Raw),
            "rbd" => de(inner).map(BlockdevOptions::Rbd),
            "throttle" => de(inner).map(BlockdevOptions::Throttle),
            _ => serde_json::from_value(v).map_err(|e| e.to_string()),
        }
    }

    /// Whether the node opens active: as `active` says, else as the parent
    /// being opened on this thread (inactive under an inactive parent).
    pub fn opens_active(&self) -> bool {
        self.common().active.unwrap_or_else(opening_active)
    }

    /// Sets `active` (an inline child of an inactive parent).
    pub fn set_active(&mut self, active: bool) {
        let a = Some(active);
        match self {
            BlockdevOptions::Blkdebug(o) => o.active = a,
            BlockdevOptions::CopyOnRead(o) => o.active = a,
            BlockdevOptions::File(o) | BlockdevOptions::HostDevice(o) => o.active = a,
            BlockdevOptions::NullCo(o) => o.active = a,
            BlockdevOptions::Qcow2(o) => o.active = a,
            BlockdevOptions::Quorum(o) => o.active = a,
            BlockdevOptions::Raw(o) => o.active = a,
            BlockdevOptions::Luks(o) => o.active = a,
            BlockdevOptions::Rbd(o) => o.active = a,
            BlockdevOptions::Nbd(o) => o.active = a,
            BlockdevOptions::Throttle(o) => o.active = a,
        }
    }

    /// Takes `discard=unmap` from a parent (inline children).
    pub fn inherit_discard_unmap(&mut self) {
        match self {
            BlockdevOptions::File(o) | BlockdevOptions::HostDevice(o) => {
                o.discard = DiscardMode::Unmap
            }
            BlockdevOptions::Raw(o) => o.discard = DiscardMode::Unmap,
            BlockdevOptions::Luks(o) => o.discard = DiscardMode::Unmap,
            BlockdevOptions::Nbd(o) => o.discard = DiscardMode::Unmap,
            BlockdevOptions::Qcow2(o) => o.discard = DiscardMode::Unmap,
            BlockdevOptions::Rbd(o) => o.discard = DiscardMode::Unmap,
            BlockdevOptions::NullCo(_)
            | BlockdevOptions::Throttle(_)
            | BlockdevOptions::Blkdebug(_)
            | BlockdevOptions::Quorum(_)
            | BlockdevOptions::CopyOnRead(_) => {}
        }
    }

    pub fn node_name(&self) -> &str {
        match self {
            BlockdevOptions::Blkdebug(o) => &o.node_name,
            BlockdevOptions::CopyOnRead(o) => &o.node_name,
            BlockdevOptions::File(o) | BlockdevOptions::HostDevice(o) => &o.node_name,
            BlockdevOptions::Nbd(o) => &o.node_name,
            BlockdevOptions::NullCo(o) => &o.node_name,
            BlockdevOptions::Qcow2(o) => &o.node_name,
            BlockdevOptions::Quorum(o) => &o.node_name,
            BlockdevOptions::Raw(o) => &o.node_name,
            BlockdevOptions::Luks(o) => &o.node_name,
            BlockdevOptions::Rbd(o) => &o.node_name,
            BlockdevOptions::Throttle(o) => &o.node_name,
        }
    }

    pub fn set_node_name(&mut self, name: String) {
        match self {
            BlockdevOptions::Blkdebug(o) => o.node_name = name,
            BlockdevOptions::CopyOnRead(o) => o.node_name = name,
            BlockdevOptions::File(o) | BlockdevOptions::HostDevice(o) => o.node_name = name,
            BlockdevOptions::Nbd(o) => o.node_name = name,
            BlockdevOptions::NullCo(o) => o.node_name = name,
            BlockdevOptions::Qcow2(o) => o.node_name = name,
            BlockdevOptions::Quorum(o) => o.node_name = name,
            BlockdevOptions::Raw(o) => o.node_name = name,
            BlockdevOptions::Luks(o) => o.node_name = name,
            BlockdevOptions::Rbd(o) => o.node_name = name,
            BlockdevOptions::Throttle(o) => o.node_name = name,
        }
    }

    pub fn read_only(&self) -> bool {
        match self {
            BlockdevOptions::Blkdebug(o) => o.read_only,
            BlockdevOptions::CopyOnRead(o) => o.read_only,
            BlockdevOptions::File(o) | BlockdevOptions::HostDevice(o) => o.read_only,
            BlockdevOptions::Nbd(o) => o.read_only,
            BlockdevOptions::NullCo(o) => o.read_only,
            BlockdevOptions::Qcow2(o) => o.read_only,
            BlockdevOptions::Quorum(o) => o.read_only,
            BlockdevOptions::Raw(o) => o.read_only,
            BlockdevOptions::Luks(o) => o.read_only,
            BlockdevOptions::Rbd(o) => o.read_only,
            BlockdevOptions::Throttle(o) => o.read_only,
        }
    }

    pub fn driver_name(&self) -> &'static str {
        match self {
            BlockdevOptions::Blkdebug(_) => "blkdebug",
            BlockdevOptions::CopyOnRead(_) => "copy-on-read",
            BlockdevOptions::File(_) => "file",
            BlockdevOptions::HostDevice(_) => "host_device",
            BlockdevOptions::Nbd(_) => "nbd",
            BlockdevOptions::NullCo(_) => "null-co",
            BlockdevOptions::Qcow2(_) => "qcow2",
            BlockdevOptions::Quorum(_) => "quorum",
            BlockdevOptions::Raw(_) => "raw",
            BlockdevOptions::Luks(_) => "luks",
            BlockdevOptions::Rbd(_) => "rbd",
            BlockdevOptions::Throttle(_) => "throttle",
        }
    }
}

/// Opens the driver `opts` names; child references are resolved in (or
/// added to) `graph`.
pub fn open(opts: &BlockdevOptions, graph: &mut Graph) -> Result<Box<dyn BlockDriver>, GraphError> {
    Ok(match opts {
        BlockdevOptions::Blkdebug(o) => Box::new(BlkdebugDriver::open(o, graph)?),
        BlockdevOptions::CopyOnRead(o) => Box::new(CorDriver::open(o, graph)?),
        BlockdevOptions::File(o) => Box::new(FileDriver::open(o)?),
        BlockdevOptions::HostDevice(o) => Box::new(FileDriver::open_host_device(o)?),
        BlockdevOptions::Nbd(o) => Box::new(NbdDriver::open(o)?),
        BlockdevOptions::NullCo(o) => Box::new(NullDriver::open(o)?),
        BlockdevOptions::Qcow2(o) => Box::new(Qcow2Driver::open(o, graph)?),
        BlockdevOptions::Quorum(o) => Box::new(QuorumDriver::open(o, graph)?),
        BlockdevOptions::Raw(o) => Box::new(RawDriver::open(o, graph)?),
        BlockdevOptions::Luks(o) => Box::new(LuksDriver::open(o, graph)?),
        BlockdevOptions::Rbd(o) => Box::new(RbdDriver::open(o, graph)?),
        BlockdevOptions::Throttle(o) => Box::new(ThrottleDriver::open(o, graph)?),
    })
}

/// Node creation: the graph inserts a node whose driver this layer opens
/// (the block layer names no driver).
impl Graph {
    /// Opens a node from `opts` (children are looked up by name) and adds it.
    pub fn add(&mut self, opts: &BlockdevOptions) -> Result<Arc<Node>, GraphError> {
        opts.check_common().map_err(|reason| GraphError::Open {
            node: opts.node_name().to_string(),
            reason,
        })?;
        let active = opts.opens_active();
        let was = OPENING_ACTIVE.with(|a| a.replace(active));
        let opened = self.insert_opened(opts.node_name(), opts.read_only(), |g| open(opts, g));
        OPENING_ACTIVE.with(|a| a.set(was));
        let node = opened?;
        // Before any parent attaches: an inactive node's file takes only
        // a reader's lock.
        node.set_active(active);
        node.set_detect_zeroes(opts.common().detect_zeroes);
        if let Some(f) = driver_as::<FileDriver>(&node) {
            // auto-read-only fell back to a read-only descriptor.
            if !opts.read_only() && !f.is_writable() {
                node.set_read_only(true);
            }
        }
        if let Some(q) = driver_as::<Qcow2Driver>(&node) {
            let loaded = q.attach_node(&node);
            if !loaded.is_empty() {
                node.set_bitmaps(loaded);
            }
        }
        Ok(node)
    }

    /// Opens a node for a parent (an inline child or a backing file named
    /// by an image header); it goes away with its last parent.
    pub fn add_implicit(&mut self, opts: &BlockdevOptions) -> Result<Arc<Node>, GraphError> {
        let node = self.add(opts)?;
        self.mark_implicit(node.name());
        Ok(node)
    }
}

/// The node's driver, if it is a `T` (this layer's own questions).
pub(super) fn driver_as<T: 'static>(node: &Node) -> Option<&T> {
    node.block_driver().as_any().downcast_ref::<T>()
}

/// Preallocates space in a file node (no-op for other drivers).
pub(crate) async fn preallocate(node: &Node, offset: u64, len: u64) -> Result<(), BlockError> {
    match driver_as::<FileDriver>(node) {
        Some(f) => f.preallocate(node, offset, len).await,
        None => Ok(()),
    }
}

/// The file name under a node, following `file` children down to a file
/// node (same as [`Node::file_name`]).
pub fn file_name_of(node: &Node) -> Option<String> {
    node.file_name()
}
