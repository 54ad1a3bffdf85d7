//! The `raw` format driver: the bytes of its `file` child, optionally a
//! window of them (`offset`, `size`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use serde::Deserialize;

use super::{probe, BlockdevRef, DiscardMode};
use crate::block::{BlockError, BlockFuture, Child, ChildRole, Graph, GraphError, Perm};
use crate::io::IoVecs;
use crate::opts;

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct RawOptions {
    #[serde(default)]
    pub node_name: String,
    pub file: BlockdevRef,
    #[serde(default, deserialize_with = "opts::size")]
    pub offset: u64,
    #[serde(default, deserialize_with = "opts::opt_size")]
    pub size: Option<u64>,
    #[serde(default, deserialize_with = "opts::bool")]
    pub read_only: bool,
    #[serde(default)]
    pub discard: DiscardMode,
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
    /// The format was probed, not given (the short form without --format):
    /// as QEMU's raw driver, a write that would give the first sector
    /// another format's header is refused (EPERM), or the next probe would
    /// open what the guest wrote as, say, a qcow2 image with a backing file
    /// of the guest's choosing on the host.
    #[serde(skip)]
    pub probed: bool,
}

/// What raw takes on its file, and shares: like QEMU's format drivers, a
/// writing raw node lets no one else write or resize the file under it.
fn raw_perms(read_only: bool) -> (Perm, Perm) {
    if read_only {
        (Perm::CONSISTENT_READ, Perm::ALL)
    } else {
        (
            Perm::CONSISTENT_READ | Perm::WRITE,
            Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED,
        )
    }
}

pub struct RawDriver {
    file: Child,
    offset: u64,
    size: AtomicU64,
    /// `size` was given: the window is fixed and cannot be resized.
    fixed_size: bool,
    discard_unmap: AtomicBool,
    /// The node's name when its format was probed (see RawOptions::probed).
    probed: Option<String>,
}

impl RawDriver {
    pub fn open(o: &RawOptions, graph: &mut Graph) -> Result<Self, GraphError> {
        let child = super::open_child(graph, &o.node_name, "file", &o.file, o.discard)?;
        let err = |reason: String| GraphError::Open {
            node: o.node_name.clone(),
            reason,
        };
        let child_size = child.size();
        if o.offset > child_size {
            return Err(err(format!(
                "offset {} is beyond the end of '{}' ({child_size} bytes)",
                o.offset,
                child.name()
            )));
        }
        let size = o.size.unwrap_or(child_size - o.offset);
        if o.offset
            .checked_add(size)
            .is_none_or(|end| end > child_size)
        {
            return Err(err(format!(
                "offset {} + size {size} is beyond the end of '{}' ({child_size} bytes)",
                o.offset,
                child.name()
            )));
        }
        let align = u64::from(child.request_alignment());
        if o.offset % align != 0 || size % align != 0 {
            return Err(err(format!(
                "offset {} and size {size} must be multiples of {align}, the request alignment of '{}'",
                o.offset,
                child.name()
            )));
        }
        let (perm, shared) = raw_perms(o.read_only);
        let file = Child::attach(&o.node_name, ChildRole::File, child, perm, shared)?;
        Ok(RawDriver {
            file,
            offset: o.offset,
            size: AtomicU64::new(size),
            fixed_size: o.size.is_some(),
            discard_unmap: AtomicBool::new(o.discard == DiscardMode::Unmap),
            probed: o.probed.then(|| o.node_name.clone()),
        })
    }

    /// Where the window starts in the file child.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    pub fn file(&self) -> &Child {
        &self.file
    }

    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Relaxed)
    }

    /// Activation: the window follows the file again, which another
    /// process may have resized (a fixed `size` stays).
    pub fn reread_size(&self) {
        if !self.fixed_size {
            let size = self.file.node().size().saturating_sub(self.offset);
            self.size.store(size, Ordering::Relaxed);
        }
    }

    fn discards(&self) -> bool {
        self.discard_unmap.load(Ordering::Relaxed)
    }

    /// Checks a blockdev-reopen of this node: only `read-only` and
    /// `discard` may change.
    pub fn check_reopen(&self, o: &RawOptions) -> Result<(), String> {
        let same_file = match &o.file {
            BlockdevRef::Name(n) => n == self.file.node().name(),
            BlockdevRef::Inline(_) => false,
        };
        if !same_file {
            return Err(format!(
                "node '{}': 'file' must stay '{}' (give it by name)",
                o.node_name,
                self.file.node().name()
            ));
        }
        if o.offset != self.offset || o.size.is_some_and(|s| s != self.size()) {
            return Err(format!(
                "node '{}': 'offset' and 'size' cannot be changed by reopen",
                o.node_name
            ));
        }
        Ok(())
    }

    pub fn commit_reopen(&self, o: &RawOptions) {
        self.discard_unmap
            .store(o.discard == DiscardMode::Unmap, Ordering::Relaxed);
        let (perm, shared) = raw_perms(o.read_only);
        self.file.set_perm(perm, shared);
    }

    /// Resizes the file child so that this node is `size` bytes.
    pub fn truncate(&self, size: u64) -> Result<(), String> {
        if self.fixed_size {
            return Err("a raw node with a fixed 'size' cannot be resized".into());
        }
        let end = self
            .offset
            .checked_add(size)
            .ok_or_else(|| format!("size {size} is too large"))?;
        self.file.node().truncate(end)?;
        self.size.store(size, Ordering::Relaxed);
        Ok(())
    }

    pub fn request_alignment(&self) -> u32 {
        self.file.node().request_alignment()
    }

    pub fn preadv<'a>(&'a self, offset: u64, iov: &'a IoVecs) -> BlockFuture<'a> {
        self.file.node().preadv(self.offset + offset, iov)
    }

    pub fn pwritev<'a>(&'a self, offset: u64, iov: &'a IoVecs, fua: bool) -> BlockFuture<'a> {
        if let Some(node) = &self.probed {
            if let Err(e) = check_probed_write(node, offset, iov) {
                return BlockFuture::ready(Err(e));
            }
        }
        self.file.node().pwritev(self.offset + offset, iov, fua)
    }

    pub fn flush(&self) -> BlockFuture<'_> {
        // QEMU's bdrv_co_flush raises both on the file child (raw has no
        // cache of its own to write between them).
        let f = self.file.node();
        f.debug_event(crate::block::DebugEvent::FlushToOs);
        f.debug_event(crate::block::DebugEvent::FlushToDisk);
        f.flush()
    }

    pub fn pdiscard(&self, offset: u64, len: u64) -> BlockFuture<'_> {
        if !self.discards() {
            return BlockFuture::ready(Ok(()));
        }
        self.file.node().pdiscard(self.offset + offset, len)
    }

    pub fn pwrite_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
        fua: bool,
    ) -> BlockFuture<'_> {
        let may_unmap = may_unmap && self.discards();
        self.file
            .node()
            .pwrite_zeroes(self.offset + offset, len, may_unmap, fua)
    }
}

/// QEMU's raw_co_pwritev rule for probed images: a write touching the first
/// sector must cover it (whole-sector writes, as every guest's are) and must
/// not make it probe as another format.
fn check_probed_write(node: &str, offset: u64, iov: &IoVecs) -> Result<(), BlockError> {
    if offset >= probe::GUARDED_LEN || iov.is_empty() {
        return Ok(());
    }
    let refuse = || BlockError::Io {
        node: node.to_string(),
        op: "write",
        offset,
        len: iov.len(),
        source: std::io::Error::from_raw_os_error(libc::EPERM),
    };
    if offset != 0 || iov.len() < probe::GUARDED_LEN {
        return Err(refuse());
    }
    let mut head = [0u8; probe::GUARDED_LEN as usize];
    iov.copy_to(&mut head);
    match probe::probe_bytes(&head) {
        probe::Probed::Raw => Ok(()),
        _ => {
            log::warn!(
                "node {node}: refused a write that would give the probed raw image a format header \
                 (give --format raw to allow it)"
            );
            Err(refuse())
        }
    }
}
