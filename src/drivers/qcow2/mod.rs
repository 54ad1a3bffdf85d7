//! The `qcow2` format driver (docs/interop/qcow2.txt), with backing chains.
//!
//! ```text
//!   guest read  --map under the metadata lock--> extents
//!        Data -> file child   Zero -> zeroes   Unallocated -> backing child
//!        Compressed -> read + inflate
//!   guest write --in place?--yes--> file child (no lock held during I/O)
//!                          \--no---> allocate (or reuse) a cluster, mark the
//!                                    guest cluster busy, write head fill +
//!                                    data + tail fill, then update the L2 entry
//! ```
//!
//! Concurrency: requests from every iothread share one [`AsyncLock`] over
//! the metadata ([`meta::Meta`]); guest data moves without it. A guest
//! cluster with an allocating write in flight is *busy*: other writes,
//! write-zeroes and discards of it wait (QEMU's overlapping-request
//! serialisation), reads go on and see the old data. Clusters that lose
//! their last reference are freed only once no request that may still use
//! an old mapping is in flight (`data_inflight`).
//!
//! Files, by concern (as QEMU's qcow2.c, qcow2-cluster.c, ...):
//!
//! ```text
//!   mod.rs        options, the driver's state, small accessors
//!   open.rs       opening: header, tables, caches, bitmaps, backing chain
//!   read.rs       mapping guest offsets, reads, block status, flush
//!   write.rs      writes (in place or allocating), write-zeroes, discard
//!   lifecycle.rs  read-only <-> writable, resize, close
//!   reopen.rs     blockdev-reopen: what may change, and changing it
//!   chain.rs      backing edge and the backing file name in the header
//!   snap.rs       internal snapshots        bitmaps.rs  persistent bitmaps
//!   header.rs     the on-disk header        build.rs    creating images
//!   meta.rs       L1/L2, refcounts, allocation (cache.rs: its caches)
//! ```

mod bitmaps;
mod build;
mod cache;
mod chain;
mod header;
mod lifecycle;
mod meta;
mod open;
mod read;
mod reopen;
mod snap;
mod write;

use crate::io::lock;

pub use build::{create, create_in, probe_size, CreateOptions, Encrypt, Preallocation};
pub use header::{parse_snapshots, Header, Snapshot};
pub use reopen::{Applied, Qcow2Reopen};
pub use snap::SnapshotRef;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Deserializer};

use self::lock::AsyncLock;
use self::meta::{Geo, Meta};
use super::{BlockdevRef, DiscardMode};
use crate::block::{Child, Node};
use crate::opts;

/// How far ahead of allocations the image file is grown.
const PREALLOC_STEP: u64 = 1 << 20;

/// How deep a backing chain may be.
pub const MAX_CHAIN_DEPTH: u32 = 16;

/// The autoclear feature bits in a version 3 header.
const OFF_AUTOCLEAR: u64 = header::OFF_INCOMPAT + 16;

/// `backing`: absent (from the image header), `null` (none), or a node.
fn backing_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<BlockdevRef>>, D::Error> {
    let v: Option<BlockdevRef> = Option::deserialize(d)?;
    Ok(Some(match v {
        Some(BlockdevRef::Name(n)) if n.is_empty() || n == "null" => None,
        v => v,
    }))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OverlapCheck {
    None,
    Constant,
    Cached,
    All,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Qcow2Options {
    #[serde(default)]
    pub node_name: String,
    /// QEMU's `encrypt` (`format=luks`, `key-secret`): the passphrase of
    /// an encrypted image.
    #[serde(default)]
    pub encrypt: Option<Qcow2Encrypt>,
    pub file: BlockdevRef,
    #[serde(default, deserialize_with = "backing_opt")]
    pub backing: Option<Option<BlockdevRef>>,
    #[serde(default, deserialize_with = "opts::bool")]
    pub read_only: bool,
    #[serde(default)]
    pub discard: DiscardMode,
    #[serde(default, deserialize_with = "opts::opt_size")]
    pub l2_cache_size: Option<u64>,
    #[serde(default, deserialize_with = "opts::opt_size")]
    pub refcount_cache_size: Option<u64>,
    #[serde(default, deserialize_with = "opts::opt_size")]
    pub cache_size: Option<u64>,
    #[serde(default, deserialize_with = "opts::opt_bool")]
    pub lazy_refcounts: Option<bool>,
    #[serde(default, deserialize_with = "opts::opt_bool")]
    pub pass_discard_request: Option<bool>,
    #[serde(default, deserialize_with = "opts::opt_bool")]
    pub pass_discard_snapshot: Option<bool>,
    #[serde(default, deserialize_with = "opts::opt_bool")]
    pub pass_discard_other: Option<bool>,
    #[serde(default)]
    pub overlap_check: Option<OverlapCheck>,
    /// Common options (QEMU's BlockdevOptions base): see [`crate::drivers::CommonOptions`].
    #[serde(default, deserialize_with = "opts::bool")]
    pub auto_read_only: bool,
    #[serde(default)]
    pub detect_zeroes: crate::drivers::DetectZeroes,
    #[serde(default, deserialize_with = "opts::bool")]
    pub force_share: bool,
    /// QEMU 10's `active`: off opens the node inactive (no write lock,
    /// no write); absent means on, or inactive under an inactive parent.
    #[serde(default, deserialize_with = "opts::opt_bool")]
    pub active: Option<bool>,
    /// Accepted on every node as QEMU does; only `file`/`host_device`
    /// nodes act on it (a child opened in place does not inherit it).
    #[serde(default)]
    pub cache: crate::drivers::CacheOptions,
}

pub use crate::block::{Allocation, BlockStatus};

/// `encrypt.*` of a qcow2 node (QEMU's BlockdevQcow2Encryption).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Qcow2Encrypt {
    #[serde(default)]
    pub format: Option<String>,
    #[serde(default)]
    pub key_secret: Option<String>,
}

pub struct Qcow2Driver {
    name: String,
    /// The unlocked LUKS volume of an encrypted image: data clusters are
    /// encrypted with the IV of their host offset (QEMU's qcow2_co_encrypt
    /// with crypt_physical_offset, which LUKS sets).
    crypto: Option<crate::drivers::luks::Volume>,
    file: Child,
    /// Set once more by an external snapshot (an overlay gets its backing).
    backing: crate::block::swap::Swap<Option<Child>>,
    g: Geo,
    size: AtomicU64,
    meta: AsyncLock<Meta>,
    /// Requests using a host mapping read under the lock.
    data_inflight: AtomicU64,
    align: u32,
    discard_unmap: AtomicBool,
    overlap_check: bool,
    /// Read again when the node is activated (blockdev-set-active).
    header: crate::block::swap::Swap<Header>,
    /// The backing file name in the header (change-backing-file rewrites it).
    backing_name: std::sync::Mutex<Option<String>>,
    snapshots: std::sync::Mutex<Vec<Snapshot>>,
    /// The dirty bit is set by us (lazy refcounts) and cleared at close.
    lazy: AtomicBool,
    closed: AtomicBool,
    /// Opened read-only; cleared by [`Qcow2Driver::reopen_writable`].
    read_only: AtomicBool,
    /// Made read-only after being writable (it became a backing image).
    demoted: AtomicBool,
    /// Persistent bitmaps read at open, until the node takes them.
    loaded_bitmaps: std::sync::Mutex<Vec<Arc<crate::block::bitmap::DirtyBitmap>>>,
    /// Where the stored bitmaps are on disk.
    stored_bitmaps: std::sync::Mutex<bitmaps::OnDisk>,
    /// The node this driver serves (its bitmaps are stored at close).
    node: std::sync::OnceLock<std::sync::Weak<Node>>,
    /// The options it was opened with (activation reads the image again
    /// with them).
    opts: Qcow2Options,
}

impl Qcow2Driver {
    pub fn file(&self) -> &Child {
        &self.file
    }

    pub fn backing(&self) -> Option<&Child> {
        self.backing.get().as_ref()
    }

    pub fn header(&self) -> &Header {
        self.header.get()
    }

    /// Whether the image is LUKS encrypted (and unlocked).
    pub fn is_encrypted(&self) -> bool {
        self.crypto.is_some()
    }

    /// The internal snapshots, as the snapshot table lists them.
    pub fn snapshots(&self) -> Vec<Snapshot> {
        self.lock_snapshots().clone()
    }

    fn lock_snapshots(&self) -> std::sync::MutexGuard<'_, Vec<Snapshot>> {
        self.snapshots.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn cluster_size(&self) -> u64 {
        self.g.cs
    }

    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Relaxed)
    }

    pub fn request_alignment(&self) -> u32 {
        self.align
    }

    fn f(&self) -> &Node {
        self.file.node()
    }

    fn io_done(&self) {
        self.data_inflight.fetch_sub(1, Ordering::AcqRel);
    }

    fn no_io(&self) -> bool {
        self.data_inflight.load(Ordering::Acquire) == 0
    }

    /// Opened read-only, or made read-only since.
    pub fn is_read_only(&self) -> bool {
        self.read_only.load(Ordering::Acquire) || self.demoted.load(Ordering::Acquire)
    }

    pub fn is_lazy(&self) -> bool {
        self.lazy.load(Ordering::Acquire)
    }
}
