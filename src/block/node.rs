//! A node of the block graph (QEMU's BlockDriverState) and the edge to a
//! child (BdrvChild), with the permissions each parent holds.
//!
//! Locking: `parents` is a mutex taken only when edges are added or removed
//! (start-up and management), never on the I/O path. A DrainCounter (used
//! by exports and queues) is atomic on the I/O path; its mutex and condvar
//! are touched only when a waiter exists.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use futures::future::LocalBoxFuture;

use super::{BlockDriver, BlockError, BlockFuture, BlockStatus, GraphError, Perm};
use crate::io::IoVecs;

/// What a child is to its parent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChildRole {
    /// The protocol node under a format (raw's `file`).
    File,
    /// The node that unallocated data falls through to.
    Backing,
    /// The node a filter passes requests to.
    Filtered,
    /// The root of a BlockBackend (an export or a job).
    Root,
    /// One of several children holding the same data (quorum's
    /// `children.N`; QEMU's BDRV_CHILD_DATA).
    Data,
}

impl ChildRole {
    pub fn name(self) -> &'static str {
        match self {
            ChildRole::File => "file",
            ChildRole::Backing => "backing",
            ChildRole::Filtered => "filtered",
            ChildRole::Root => "root",
            ChildRole::Data => "children",
        }
    }
}

#[derive(Debug, Clone)]
struct ParentLink {
    parent: String,
    role: ChildRole,
    perm: Perm,
    shared: Perm,
}

/// Counts requests in flight and lets a drain wait for zero.
#[derive(Default, Debug)]
pub struct DrainCounter {
    in_flight: AtomicUsize,
    waiting: AtomicBool,
    lock: Mutex<()>,
    idle: Condvar,
}

/// Sequentially consistent: a request path counts itself in flight and
/// then looks whether a drain began, while a drain says it began and then
/// looks at the count; only SeqCst orders those two pairs (on x86 the code
/// is the same as with AcqRel).
impl DrainCounter {
    pub fn inc(&self) {
        self.add(1);
    }

    pub fn dec(&self) {
        self.sub(1);
    }

    /// `n` more in flight (a batch counted at once: one atomic operation,
    /// which on x86 also waits for the thread's pending stores).
    pub fn add(&self, n: usize) {
        if n > 0 {
            self.in_flight.fetch_add(n, Ordering::SeqCst);
        }
    }

    /// `n` fewer in flight; wakes a drain when none is left.
    pub fn sub(&self, n: usize) {
        if n == 0 {
            return;
        }
        let before = self.in_flight.fetch_sub(n, Ordering::SeqCst);
        debug_assert!(before >= n, "drain counter underflow");
        if before == n && self.waiting.load(Ordering::SeqCst) {
            let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.idle.notify_all();
        }
    }

    pub fn get(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Waits until nothing is in flight, or `timeout` passes; returns whether
    /// the counter reached zero.
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.waiting.store(true, Ordering::SeqCst);
        let idle = loop {
            if self.get() == 0 {
                break true;
            }
            let now = Instant::now();
            if now >= deadline {
                break false;
            }
            // Short waits as a guard against a missed wake-up between the
            // check and the wait; the notify path holds the same lock.
            let step = (deadline - now).min(Duration::from_millis(100));
            g = self
                .idle
                .wait_timeout(g, step)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        };
        self.waiting.store(false, Ordering::Release);
        idle
    }
}

/// A node of the graph.
pub struct Node {
    name: String,
    driver: Box<dyn BlockDriver>,
    read_only: AtomicBool,
    /// False while the node is inactive (QEMU's BDRV_O_INACTIVE: the
    /// `active` option, blockdev-set-active): no write reaches the image,
    /// and its file takes only a reader's lock.
    active: AtomicBool,
    parents: Mutex<Vec<ParentLink>>,
    /// block-set-write-threshold: a write ending past this offset emits
    /// BLOCK_WRITE_THRESHOLD once; 0 means off.
    write_threshold: AtomicU64,
    /// Dirty bitmaps recording writes through this node.
    bitmaps: super::swap::Swap<super::bitmap::BitmapList>,
    /// Block jobs' write hooks (copy-before-write, mirroring).
    hooks: super::swap::Swap<super::hooks::HookList>,
    /// Read hooks (a fleecing backup's, on its target).
    read_hooks: super::swap::Swap<super::hooks::ReadHookList>,
    /// detect-zeroes: 0 off, 1 on, 2 unmap (see [`Node::set_detect_zeroes`]).
    detect_zeroes: std::sync::atomic::AtomicU8,
}

impl fmt::Debug for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Node")
            .field("name", &self.name)
            .field("driver", &self.driver.name())
            .field("read_only", &self.is_read_only())
            .finish()
    }
}

impl Node {
    pub fn new(name: String, driver: Box<dyn BlockDriver>, read_only: bool) -> Arc<Node> {
        Arc::new(Node {
            name,
            driver,
            read_only: AtomicBool::new(read_only),
            active: AtomicBool::new(true),
            parents: Mutex::new(Vec::new()),
            write_threshold: AtomicU64::new(0),
            bitmaps: super::swap::Swap::new(Arc::new(Vec::new())),
            hooks: super::swap::Swap::new(Arc::new(Vec::new())),
            read_hooks: super::swap::Swap::new(Arc::new(Vec::new())),
            detect_zeroes: std::sync::atomic::AtomicU8::new(0),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The node's driver, for the driver layer (which downcasts it to
    /// its own types through [`BlockDriver::as_any`]).
    pub fn block_driver(&self) -> &dyn BlockDriver {
        &*self.driver
    }

    pub fn driver_name(&self) -> &'static str {
        self.driver.name()
    }

    /// detect-zeroes: writes whose data is all zeroes become write-zeroes
    /// requests (`Unmap`: that may deallocate), as QEMU's
    /// bdrv_aligned_pwritev does. The driver layer checks at open that
    /// `Unmap` comes with discard=unmap.
    pub fn set_detect_zeroes(&self, d: crate::drivers::DetectZeroes) {
        use crate::drivers::DetectZeroes;
        let v = match d {
            DetectZeroes::Off => 0,
            DetectZeroes::On => 1,
            DetectZeroes::Unmap => 2,
        };
        self.detect_zeroes.store(v, Ordering::Relaxed);
    }

    /// The detect-zeroes setting, as QMP names it.
    pub fn detect_zeroes(&self) -> &'static str {
        match self.detect_zeroes.load(Ordering::Relaxed) {
            0 => "off",
            1 => "on",
            _ => "unmap",
        }
    }

    pub fn is_read_only(&self) -> bool {
        self.read_only.load(Ordering::Relaxed)
    }

    /// Whether the node is active (QEMU's !BDRV_O_INACTIVE).
    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }

    /// Refuses, with the node's name, an operation that would write to an
    /// inactive node (QMP commands that change an image).
    pub fn ensure_active(&self) -> Result<(), String> {
        if self.is_active() {
            Ok(())
        } else {
            Err(BlockError::Inactive {
                node: self.name.clone(),
            }
            .to_string())
        }
    }

    /// Marks the node active or inactive. The caller holds the node's
    /// users drained, then calls [`Node::refresh_locks`].
    pub fn set_active(&self, active: bool) {
        self.active.store(active, Ordering::Release);
    }

    /// Applies the image locks again for what the parents take now (and
    /// for whether the node is active): fails, changing nothing, when
    /// another process holds a conflicting lock.
    pub fn refresh_locks(&self) -> Result<(), String> {
        let parents = self.lock_parents();
        self.update_locks(&parents)
    }

    /// Inactivation, the driver's part ([`BlockDriver::inactivate`]).
    pub fn driver_inactivate(&self) -> Result<(), String> {
        self.driver.inactivate(self)
    }

    /// Activation, the driver's part ([`BlockDriver::activate`]).
    pub fn driver_activate(&self) -> Result<(), String> {
        self.driver.activate(self)
    }

    /// Parents holding an edge to this node: name, role, permissions taken,
    /// permissions shared.
    pub fn parent_links(&self) -> Vec<(String, ChildRole, Perm, Perm)> {
        self.lock_parents()
            .iter()
            .map(|p| (p.parent.clone(), p.role, p.perm, p.shared))
            .collect()
    }

    /// Parents holding an edge to this node: name, role, permissions taken.
    pub fn parent_perms(&self) -> Vec<(String, ChildRole, Perm)> {
        self.lock_parents()
            .iter()
            .map(|p| (p.parent.clone(), p.role, p.perm))
            .collect()
    }

    /// blockdev-reopen: switches read-only. The caller has checked that no
    /// parent keeps write permission, and holds a drained section.
    pub fn set_read_only(&self, ro: bool) {
        self.read_only.store(ro, Ordering::Relaxed);
    }

    fn update_parent_perm(&self, parent: &str, role: ChildRole, perm: Perm, shared: Perm) {
        let mut parents = self.lock_parents();
        if let Some(p) = parents
            .iter_mut()
            .find(|p| p.parent == parent && p.role == role)
        {
            p.perm = perm;
            p.shared = shared;
        }
        if let Err(e) = self.update_locks(&parents) {
            log::warn!("node {}: {e}", self.name);
        }
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.driver.size()
    }

    /// Offsets and lengths of requests must be multiples of this.
    pub fn request_alignment(&self) -> u32 {
        self.driver.request_alignment()
    }

    pub fn children(&self) -> Vec<&Child> {
        self.driver.children()
    }

    /// The child data is stored in (a format's `file`) or passed to (a
    /// filter's filtered child); None for a protocol node.
    pub fn file_child(&self) -> Option<&Child> {
        self.driver.file()
    }

    /// The backing child, where unallocated data falls through to.
    pub fn backing(&self) -> Option<&Child> {
        self.driver.backing()
    }

    /// Whether the node is a filter (throttle, copy-on-read).
    pub fn is_filter(&self) -> bool {
        self.driver.is_filter()
    }

    /// Below any filters (throttle, copy-on-read): the node that holds
    /// data (`node` itself when it is no filter).
    pub fn skip_filters(node: &Arc<Node>) -> Arc<Node> {
        let mut n = node.clone();
        loop {
            let next = match n.driver.is_filter().then(|| n.driver.file()).flatten() {
                Some(c) => c.node().clone(),
                None => return n,
            };
            n = next;
        }
    }

    /// The node the backing child points at, if any.
    pub fn backing_node(&self) -> Option<Arc<Node>> {
        self.backing().map(|b| b.node().clone())
    }

    /// The backing nodes below this node, in order (its backing node
    /// first, the bottom of the chain last; filters have none): the one
    /// walker of the backing chain.
    pub fn backing_chain(&self) -> impl Iterator<Item = Arc<Node>> {
        std::iter::successors(self.backing_node(), |n| n.backing_node())
    }

    /// How many backing nodes are below this node (following backing
    /// children; filters have none).
    pub fn backing_depth(&self) -> u32 {
        self.backing_chain().fold(0, |depth, _| depth + 1)
    }

    /// The protocol node at the bottom of the `file` children.
    fn protocol_leaf(&self) -> &Node {
        let mut n = self;
        while let Some(c) = n.driver.file() {
            n = c.node();
        }
        n
    }

    /// The file under the node, following `file` children down to a
    /// protocol node (None over null-co).
    pub fn file_name(&self) -> Option<String> {
        self.protocol_leaf().driver.filename().map(str::to_string)
    }

    /// The file name as QEMU reports it: a protocol without a file is
    /// `<driver>://` (`null-co://`).
    pub fn display_filename(&self) -> String {
        let leaf = self.protocol_leaf();
        match leaf.driver.filename() {
            Some(f) => f.to_string(),
            None => format!("{}://", leaf.driver.name()),
        }
    }

    /// Whether the protocol node under this one bypasses the page cache.
    pub fn is_direct(&self) -> bool {
        self.protocol_leaf().driver.is_direct()
    }

    /// Whether the protocol node under this one ignores flushes.
    pub fn is_no_flush(&self) -> bool {
        self.protocol_leaf().driver.is_no_flush()
    }

    /// Whether this node's format encrypts its data.
    pub fn is_encrypted(&self) -> bool {
        self.driver.is_encrypted()
    }

    /// The format's allocation unit (qcow2's cluster size), if it has one.
    pub fn cluster_size(&self) -> Option<u64> {
        self.driver.cluster_size()
    }

    /// Makes the image writable for a job that writes into it (commit's
    /// base, stream into an intermediate image). The caller holds the
    /// node's users drained; on an error nothing has changed.
    pub fn reopen_writable(&self) -> Result<(), String> {
        self.ensure_active()?;
        self.driver.reopen_writable(self)
    }

    /// The image becomes a backing image: the driver gives up write
    /// permission on its file, and the node is read-only.
    pub fn make_read_only(&self) {
        self.driver.make_read_only();
        self.set_read_only(true);
    }

    /// Undoes [`Node::make_read_only`] (a transaction aborted).
    pub fn make_writable(&self) {
        self.driver.make_writable();
        self.set_read_only(false);
    }

    /// The throttle group memberships of this node and every node below it.
    pub fn throttle_members(
        &self,
    ) -> Vec<(
        Arc<crate::throttle::ThrottleGroup>,
        Arc<crate::throttle::Member>,
    )> {
        let mut out = Vec::new();
        if let Some((g, m)) = self.driver.throttle_member() {
            out.push((g.clone(), m.clone()));
        }
        for c in self.children() {
            out.extend(c.node().throttle_members());
        }
        out
    }

    /// Whether `other` is this node or below it in the graph.
    pub fn reaches(&self, other: &Node) -> bool {
        std::ptr::eq(self, other) || self.children().iter().any(|c| c.node().reaches(other))
    }

    /// Changes the node's size (block_resize). The caller holds the nodes'
    /// users in a drained section.
    pub fn truncate(&self, size: u64) -> Result<(), String> {
        if self.is_read_only() {
            return Err(format!("node '{}' is read-only", self.name));
        }
        if !self.is_active() {
            return Err(BlockError::Inactive {
                node: self.name.clone(),
            }
            .to_string());
        }
        self.driver.truncate(self, size)
    }

    /// Names of the parents that hold an edge to this node.
    pub fn parents(&self) -> Vec<String> {
        self.lock_parents()
            .iter()
            .map(|p| p.parent.clone())
            .collect()
    }

    /// The node's dirty bitmaps.
    pub fn bitmaps(&self) -> &super::bitmap::BitmapList {
        self.bitmaps.get()
    }

    /// Gives the node's dirty bitmaps its size again, after block_resize
    /// (bits past a smaller size go). The caller holds the node's users
    /// drained.
    pub fn resize_bitmaps(&self) {
        let size = self.size();
        let list: Vec<Arc<super::bitmap::DirtyBitmap>> = self
            .bitmaps()
            .iter()
            .map(|b| Arc::new(b.resized(size)))
            .collect();
        if !list.is_empty() {
            self.set_bitmaps(list);
        }
    }

    /// Replaces the list of bitmaps (management; the caller serialises).
    pub fn set_bitmaps(&self, list: Vec<Arc<super::bitmap::DirtyBitmap>>) {
        self.bitmaps.replace(Arc::new(list));
    }

    /// Adds a write hook. The caller holds the node's users in a drained
    /// section, so that no write in flight misses it.
    pub fn add_write_hook(&self, hook: Arc<dyn super::hooks::WriteHook>) {
        let mut list: Vec<_> = self.hooks.get().iter().cloned().collect();
        list.push(hook);
        self.hooks.replace(Arc::new(list));
    }

    /// Removes a hook added by [`Node::add_write_hook`] (same drain rule).
    pub fn remove_write_hook(&self, hook: &Arc<dyn super::hooks::WriteHook>) {
        let list: Vec<_> = self
            .hooks
            .get()
            .iter()
            .filter(|h| !Arc::ptr_eq(h, hook))
            .cloned()
            .collect();
        self.hooks.replace(Arc::new(list));
    }

    /// Adds a read hook (the caller holds the node's users drained).
    pub fn add_read_hook(&self, hook: Arc<dyn super::hooks::ReadHook>) {
        let mut list: Vec<_> = self.read_hooks.get().iter().cloned().collect();
        list.push(hook);
        self.read_hooks.replace(Arc::new(list));
    }

    /// Removes a hook added by [`Node::add_read_hook`] (same drain rule).
    pub fn remove_read_hook(&self, hook: &Arc<dyn super::hooks::ReadHook>) {
        let list: Vec<_> = self
            .read_hooks
            .get()
            .iter()
            .filter(|h| !Arc::ptr_eq(h, hook))
            .cloned()
            .collect();
        self.read_hooks.replace(Arc::new(list));
    }

    /// Runs `inner` (a write not started yet) through the node's hooks.
    fn hooked<'a>(
        &'a self,
        offset: u64,
        len: u64,
        op: super::hooks::WriteOp<'a>,
        inner: impl FnOnce() -> BlockFuture<'a> + 'a,
    ) -> BlockFuture<'a> {
        let hooks = self.hooks.get();
        if hooks.is_empty() {
            return inner();
        }
        // The driver's call starts only when the hooks let it (an
        // async block is lazy; some drivers queue I/O when called).
        let mut f = BlockFuture::boxed(async move { inner().await });
        for h in hooks.iter() {
            f = h.wrap(self, offset, len, op, f);
        }
        f
    }

    /// Releases every child edge now (the node left the graph for good:
    /// a job dropped it from a chain). Its permissions and image locks on
    /// the children go; the node must not be used for I/O afterwards.
    pub fn release_children(&self) {
        for c in self.children() {
            c.release();
        }
    }

    fn mark_dirty(&self, offset: u64, len: u64) {
        for b in self.bitmaps().iter() {
            b.mark(offset, len);
        }
    }

    pub fn write_threshold(&self) -> u64 {
        self.write_threshold.load(Ordering::Relaxed)
    }

    pub fn set_write_threshold(&self, t: u64) {
        self.write_threshold.store(t, Ordering::Relaxed);
    }

    /// Emits BLOCK_WRITE_THRESHOLD (once) when a write ends past the threshold.
    fn check_write_threshold(&self, offset: u64, len: u64) {
        let t = self.write_threshold.load(Ordering::Relaxed);
        let end = offset.saturating_add(len);
        if t > 0
            && end > t
            && self
                .write_threshold
                .compare_exchange(t, 0, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            crate::events::global().emit(
                "BLOCK_WRITE_THRESHOLD",
                serde_json::json!({
                    "node-name": self.name,
                    "amount-exceeded": end - t,
                    "write-threshold": t,
                }),
            );
        }
    }

    fn lock_parents(&self) -> std::sync::MutexGuard<'_, Vec<ParentLink>> {
        self.parents.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a new parent edge after checking its permissions against every
    /// existing parent: what one takes, the others must share.
    fn attach_parent(
        &self,
        parent: &str,
        role: ChildRole,
        perm: Perm,
        shared: Perm,
    ) -> Result<(), GraphError> {
        if self.is_read_only() && (perm.contains(Perm::WRITE) || perm.contains(Perm::RESIZE)) {
            return Err(GraphError::ReadOnly {
                node: self.name.clone(),
                parent: parent.to_string(),
            });
        }
        let mut parents = self.lock_parents();
        for p in parents.iter() {
            let conflict = !(perm & !p.shared).is_empty() || !(p.perm & !shared).is_empty();
            if conflict {
                return Err(GraphError::PermissionConflict {
                    node: self.name.clone(),
                    new_parent: parent.to_string(),
                    old_parent: p.parent.clone(),
                    wanted: perm,
                    shared: p.shared,
                    held: p.perm,
                });
            }
        }
        parents.push(ParentLink {
            parent: parent.to_string(),
            role,
            perm,
            shared,
        });
        if let Err(reason) = self.update_locks(&parents) {
            parents.pop();
            return Err(GraphError::Open {
                node: self.name.clone(),
                reason,
            });
        }
        Ok(())
    }

    /// Image locks for what all parents take and do not share (file nodes).
    /// An inactive node locks only what a reader needs (consistent read)
    /// and shares everything, as QEMU's inactive formats do on their file
    /// (bdrv_default_perms_for_storage): the process that owns the image
    /// may write and resize it.
    fn update_locks(&self, parents: &[ParentLink]) -> Result<(), String> {
        let perm = parents.iter().fold(Perm::NONE, |a, p| a | p.perm);
        let shared = parents.iter().fold(Perm::ALL, |a, p| a & p.shared);
        if !self.is_active() {
            return self
                .driver
                .update_locks(perm & Perm::CONSISTENT_READ, Perm::ALL);
        }
        self.driver.update_locks(perm, shared)
    }

    fn detach_parent(&self, parent: &str, role: ChildRole) {
        let mut parents = self.lock_parents();
        if let Some(i) = parents
            .iter()
            .position(|p| p.parent == parent && p.role == role)
        {
            parents.remove(i);
        }
        if let Err(e) = self.update_locks(&parents) {
            log::warn!("node {}: {e}", self.name);
        }
    }

    fn refuse_if_read_only<'a>(&self) -> Option<BlockFuture<'a>> {
        if self.is_read_only() {
            return Some(BlockFuture::ready(Err(BlockError::ReadOnly {
                node: self.name.clone(),
            })));
        }
        (!self.is_active()).then(|| {
            BlockFuture::ready(Err(BlockError::Inactive {
                node: self.name.clone(),
            }))
        })
    }

    // The I/O interface, mirroring QEMU's driver callbacks. Offsets and
    // lengths are in bytes and already checked against the node's size by the
    // caller (BlockBackend or parent driver).

    pub fn preadv<'a>(&'a self, offset: u64, iov: &'a IoVecs) -> BlockFuture<'a> {
        let hooks = self.read_hooks.get();
        if hooks.is_empty() {
            return self.driver.preadv(self, offset, iov);
        }
        let mut f = BlockFuture::boxed(async move { self.driver.preadv(self, offset, iov).await });
        for h in hooks.iter() {
            f = h.wrap_read(self, offset, iov.len(), f);
        }
        f
    }

    /// Writes `iov` at `offset`; with `fua` the data is durable on return.
    pub fn pwritev<'a>(&'a self, offset: u64, iov: &'a IoVecs, fua: bool) -> BlockFuture<'a> {
        if let Some(refused) = self.refuse_if_read_only() {
            return refused;
        }
        let detect = self.detect_zeroes.load(Ordering::Relaxed);
        if detect != 0 && !iov.is_empty() && iov.is_zero() {
            return self.pwrite_zeroes(offset, iov.len(), detect == 2, fua);
        }
        self.check_write_threshold(offset, iov.len());
        self.mark_dirty(offset, iov.len());
        self.hooked(
            offset,
            iov.len(),
            super::hooks::WriteOp::Data(iov, fua),
            move || self.driver.pwritev(self, offset, iov, fua),
        )
    }

    pub fn flush(&self) -> BlockFuture<'_> {
        self.driver.flush(self)
    }

    /// Raises a debug event on this node (QEMU's BLKDBG_EVENT on a child):
    /// a no-op unless its driver is `blkdebug`.
    pub fn debug_event(&self, event: super::DebugEvent) {
        self.driver.debug_event(event)
    }

    /// What `[offset, offset + len)` reads as from its start, how far, and
    /// at which depth of the backing chain.
    pub fn block_status(
        &self,
        offset: u64,
        len: u64,
    ) -> LocalBoxFuture<'_, Result<BlockStatus, BlockError>> {
        self.driver.block_status(self, offset, len)
    }

    /// Writes out cached metadata before the node is removed; an inactive
    /// node writes nothing (its metadata went out when it was inactivated,
    /// and another process may own the image now).
    pub fn close(&self) {
        if self.is_active() {
            self.driver.close();
        } else {
            self.driver.close_inactive();
        }
    }

    pub fn pdiscard(&self, offset: u64, len: u64) -> BlockFuture<'_> {
        if let Some(refused) = self.refuse_if_read_only() {
            return refused;
        }
        self.mark_dirty(offset, len);
        self.hooked(offset, len, super::hooks::WriteOp::Discard, move || {
            self.driver.pdiscard(self, offset, len)
        })
    }

    /// Makes `len` bytes at `offset` read as zeroes; with `may_unmap` the
    /// space may be deallocated.
    pub fn pwrite_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
        fua: bool,
    ) -> BlockFuture<'_> {
        if let Some(refused) = self.refuse_if_read_only() {
            return refused;
        }
        self.check_write_threshold(offset, len);
        self.mark_dirty(offset, len);
        self.hooked(
            offset,
            len,
            super::hooks::WriteOp::Zeroes(may_unmap, fua),
            move || self.driver.pwrite_zeroes(self, offset, len, may_unmap, fua),
        )
    }
}

/// An edge from a parent to a child node, holding permissions on the child.
/// Dropping it releases them.
pub struct Child {
    parent: String,
    role: ChildRole,
    /// Replaced (external snapshots, job pivots) only inside a drained
    /// section; read by every request with one load.
    node: super::swap::Swap<Arc<Node>>,
    perm: std::sync::atomic::AtomicU8,
    shared: std::sync::atomic::AtomicU8,
    /// Set by [`Child::release`]: the parent link is gone already.
    released: AtomicBool,
}

impl fmt::Debug for Child {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Child")
            .field("parent", &self.parent)
            .field("role", &self.role)
            .field("node", &self.node().name())
            .field("perm", &self.perm())
            .field("shared", &self.shared())
            .finish()
    }
}

impl Child {
    /// Attaches `parent` to `node`, taking `perm` and sharing `shared`.
    pub fn attach(
        parent: &str,
        role: ChildRole,
        node: Arc<Node>,
        perm: Perm,
        shared: Perm,
    ) -> Result<Child, GraphError> {
        node.attach_parent(parent, role, perm, shared)?;
        Ok(Child {
            parent: parent.to_string(),
            role,
            node: super::swap::Swap::new(node),
            perm: std::sync::atomic::AtomicU8::new(perm.bits()),
            shared: std::sync::atomic::AtomicU8::new(shared.bits()),
            released: AtomicBool::new(false),
        })
    }

    /// Gives up the edge's permissions (and image locks) now rather than
    /// when the edge is dropped: for an edge that a `Swap` keeps alive
    /// after it was replaced (a backing edge a job took out of a chain).
    pub fn release(&self) {
        if !self.released.swap(true, Ordering::AcqRel) {
            self.node().detach_parent(&self.parent, self.role);
        }
    }

    pub fn node(&self) -> &Arc<Node> {
        self.node.get()
    }

    pub fn parent(&self) -> &str {
        &self.parent
    }

    /// Points this edge at `new` instead, with the same permissions
    /// (checked against `new`'s other parents). The caller holds every
    /// user of the edge in a drained section.
    pub fn replace_node(&self, new: Arc<Node>) -> Result<(), GraphError> {
        new.attach_parent(&self.parent, self.role, self.perm(), self.shared())?;
        let old = self.node().clone();
        self.node.replace(new);
        old.detach_parent(&self.parent, self.role);
        Ok(())
    }

    pub fn role(&self) -> ChildRole {
        self.role
    }

    pub fn perm(&self) -> Perm {
        Perm::from_bits(self.perm.load(Ordering::Relaxed))
    }

    /// blockdev-reopen: takes `perm` instead (checked by the caller).
    pub fn set_perm(&self, perm: Perm, shared: Perm) {
        self.perm.store(perm.bits(), Ordering::Relaxed);
        self.shared.store(shared.bits(), Ordering::Relaxed);
        self.node()
            .update_parent_perm(&self.parent, self.role, perm, shared);
    }

    pub fn shared(&self) -> Perm {
        Perm::from_bits(self.shared.load(Ordering::Relaxed))
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        self.release();
    }
}
