//! The driver interface a node calls (QEMU's BlockDriver): the I/O
//! callbacks, and what the block layer and its callers may ask of any
//! driver. The drivers themselves live in the driver layer, which opens
//! them; this module names none of them.
//!
//! Every question has a default answer (no child, no file name, nothing
//! to do), so a driver implements only what it has. What only some
//! formats can do (internal snapshots, a backing file name in a header,
//! persistent bitmaps, reopening with new options) is asked of the driver
//! layer, not here.

use std::any::Any;
use std::sync::Arc;

use futures::future::LocalBoxFuture;

use super::{BlockError, BlockFuture, BlockStatus, Child, Node, Perm};
use crate::io::IoVecs;
use crate::throttle::{Member, ThrottleGroup};

/// An open driver instance, held by its [`Node`].
pub trait BlockDriver: Send + Sync + 'static {
    /// The driver's name, as blockdev-add spells it (`file`, `qcow2`, ...).
    fn name(&self) -> &'static str;

    /// Size in bytes.
    fn size(&self) -> u64;

    /// Offsets and lengths of requests must be multiples of this.
    fn request_alignment(&self) -> u32;

    /// The child data is stored in or passed to: a format's `file`, a
    /// filter's filtered child.
    fn file(&self) -> Option<&Child> {
        None
    }

    /// The child unallocated data falls through to.
    fn backing(&self) -> Option<&Child> {
        None
    }

    /// Every child: `file`, then `backing`.
    fn children(&self) -> Vec<&Child> {
        self.file().into_iter().chain(self.backing()).collect()
    }

    /// Every child with its name as QEMU names the edge (`file`,
    /// `backing`, quorum's `children.N`).
    fn named_children(&self) -> Vec<(String, &Child)> {
        self.children()
            .into_iter()
            .map(|c| (c.role().name().to_string(), c))
            .collect()
    }

    /// x-blockdev-change adding `child` (QEMU's bdrv_add_child); the
    /// caller holds the node's users drained. `name` is the node's.
    fn add_child(&self, name: &str, child: Arc<Node>) -> Result<(), String> {
        let _ = child;
        Err(format!("The node {name} does not support adding a child"))
    }

    /// x-blockdev-change removing the child edge `child` (QEMU's
    /// bdrv_del_child); the caller checked the edge exists and holds the
    /// node's users drained.
    fn del_child(&self, name: &str, child: &str) -> Result<(), String> {
        let _ = child;
        Err(format!("The node {name} does not support removing a child"))
    }

    /// Whether the driver passes requests to its `file` child unchanged
    /// in content (throttle, copy-on-read): jobs and snapshots look
    /// through it.
    fn is_filter(&self) -> bool {
        false
    }

    // The I/O callbacks. Offsets and lengths are in bytes and already
    // checked against the node's size by the caller.

    fn preadv<'a>(&'a self, node: &'a Node, offset: u64, iov: &'a IoVecs) -> BlockFuture<'a>;

    fn pwritev<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        iov: &'a IoVecs,
        fua: bool,
    ) -> BlockFuture<'a>;

    fn flush<'a>(&'a self, node: &'a Node) -> BlockFuture<'a>;

    fn pdiscard<'a>(&'a self, node: &'a Node, offset: u64, len: u64) -> BlockFuture<'a>;

    fn pwrite_zeroes<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        len: u64,
        may_unmap: bool,
        fua: bool,
    ) -> BlockFuture<'a>;

    /// What `[offset, offset + len)` reads as from its start, and how far.
    /// By default: data, as a protocol without holes.
    fn block_status<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        len: u64,
    ) -> LocalBoxFuture<'a, Result<BlockStatus, BlockError>> {
        let _ = (node, offset);
        Box::pin(std::future::ready(Ok(BlockStatus {
            kind: super::Allocation::Data,
            len,
            depth: 0,
        })))
    }

    /// Changes the size (block_resize); the node checked it is writable,
    /// and its users are drained.
    fn truncate(&self, node: &Node, size: u64) -> Result<(), String>;

    /// Writes out what the driver keeps in memory before the node goes
    /// away (management threads only).
    fn close(&self) {}

    /// As `close` for an inactive node: writes no metadata (another process
    /// may own the image), only lets go of what the driver holds in the
    /// storage (an rbd image's watch, which would keep `rbd rm` waiting).
    fn close_inactive(&self) {}

    /// blockdev-set-active false: writes out what the driver keeps in
    /// memory (caches, persistent bitmaps, a clean header) so that another
    /// process may open the image; called in a drained section, before the
    /// node is marked inactive (its children are still active).
    fn inactivate(&self, node: &Node) -> Result<(), String> {
        let _ = node;
        Ok(())
    }

    /// blockdev-set-active true: reads again what another process may
    /// have changed while the node was inactive (size, metadata, bitmaps),
    /// dropping what was cached before. Called in a drained section, after
    /// the children were activated and the node's locks taken.
    fn activate(&self, node: &Node) -> Result<(), String> {
        let _ = node;
        Ok(())
    }

    /// Takes the image locks for what the node's parents take and do not
    /// share (protocol drivers over a file).
    fn update_locks(&self, perm: Perm, shared: Perm) -> Result<(), String> {
        let _ = (perm, shared);
        Ok(())
    }

    /// The throttle group membership of a throttle filter.
    fn throttle_member(&self) -> Option<(&Arc<ThrottleGroup>, &Arc<Member>)> {
        None
    }

    /// The file a protocol driver opened.
    fn filename(&self) -> Option<&str> {
        None
    }

    /// The TCP ports a network driver connects to, now and when it
    /// reconnects (the sandbox allows them).
    fn tcp_ports(&self) -> Vec<u16> {
        Vec::new()
    }

    /// Whether a protocol driver bypasses the page cache (cache.direct).
    fn is_direct(&self) -> bool {
        false
    }

    /// Whether a protocol driver ignores flushes (cache.no-flush).
    fn is_no_flush(&self) -> bool {
        false
    }

    /// Whether the format encrypts its data (QEMU's bdrv_is_encrypted:
    /// luks, and qcow2 with LUKS encryption).
    fn is_encrypted(&self) -> bool {
        false
    }

    /// The format's allocation unit (qcow2's cluster size).
    fn cluster_size(&self) -> Option<u64> {
        None
    }

    /// Makes the image writable for a job that writes into it (a backing
    /// image that block-commit or block-stream writes). The caller holds
    /// the node's users drained; on success the node is writable.
    fn reopen_writable(&self, node: &Node) -> Result<(), String> {
        Err(format!(
            "node '{}' ({}) cannot be committed into",
            node.name(),
            self.name()
        ))
    }

    /// The image became a backing image: it takes no write permission on
    /// its file any more (no-op where there is nothing to give up).
    fn make_read_only(&self) {}

    /// Undoes [`BlockDriver::make_read_only`] (a transaction aborted).
    fn make_writable(&self) {}

    /// A format driver above this node reached the point `event` names
    /// (QEMU's bdrv_debug_event): only `blkdebug` acts on it.
    fn debug_event(&self, event: super::DebugEvent) {
        let _ = event;
    }

    /// For the driver layer's own questions (downcasts to its types).
    fn as_any(&self) -> &dyn Any;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::ChildRole;

    /// A driver of the test's own: the block layer needs no real one.
    struct Fake {
        name: &'static str,
        file: Option<Child>,
        backing: Option<Child>,
        filter: bool,
        filename: Option<&'static str>,
    }

    impl BlockDriver for Fake {
        fn name(&self) -> &'static str {
            self.name
        }
        fn size(&self) -> u64 {
            1 << 20
        }
        fn request_alignment(&self) -> u32 {
            1
        }
        fn file(&self) -> Option<&Child> {
            self.file.as_ref()
        }
        fn backing(&self) -> Option<&Child> {
            self.backing.as_ref()
        }
        fn is_filter(&self) -> bool {
            self.filter
        }
        fn preadv<'a>(&'a self, _: &'a Node, _: u64, _: &'a IoVecs) -> BlockFuture<'a> {
            BlockFuture::ready(Ok(()))
        }
        fn pwritev<'a>(&'a self, _: &'a Node, _: u64, _: &'a IoVecs, _: bool) -> BlockFuture<'a> {
            BlockFuture::ready(Ok(()))
        }
        fn flush<'a>(&'a self, _: &'a Node) -> BlockFuture<'a> {
            BlockFuture::ready(Ok(()))
        }
        fn pdiscard<'a>(&'a self, _: &'a Node, _: u64, _: u64) -> BlockFuture<'a> {
            BlockFuture::ready(Ok(()))
        }
        fn pwrite_zeroes<'a>(
            &'a self,
            _: &'a Node,
            _: u64,
            _: u64,
            _: bool,
            _: bool,
        ) -> BlockFuture<'a> {
            BlockFuture::ready(Ok(()))
        }
        fn truncate(&self, node: &Node, _: u64) -> Result<(), String> {
            Err(format!("{} cannot be resized", node.name()))
        }
        fn filename(&self) -> Option<&str> {
            self.filename
        }
        fn as_any(&self) -> &dyn Any {
            self
        }
    }

    fn node(name: &str, d: Fake) -> Arc<Node> {
        Node::new(name.into(), Box::new(d), false)
    }

    fn leaf(name: &'static str, filename: Option<&'static str>) -> Fake {
        Fake {
            name,
            file: None,
            backing: None,
            filter: false,
            filename,
        }
    }

    fn edge(parent: &str, role: ChildRole, n: &Arc<Node>) -> Option<Child> {
        Some(Child::attach(parent, role, n.clone(), Perm::CONSISTENT_READ, Perm::ALL).unwrap())
    }

    #[test]
    fn node_questions_follow_file_and_backing_children() {
        // filter "t" -> format "q" -(file)-> "f" (/img); q -(backing)-> "b"
        // (a protocol without a file, like null-co).
        let f = node("f", leaf("file", Some("/img")));
        let b = node("b", leaf("null-co", None));
        let q = node(
            "q",
            Fake {
                file: edge("q", ChildRole::File, &f),
                backing: edge("q", ChildRole::Backing, &b),
                ..leaf("fmt", None)
            },
        );
        let t = node(
            "t",
            Fake {
                file: edge("t", ChildRole::Filtered, &q),
                filter: true,
                ..leaf("flt", None)
            },
        );
        assert_eq!(t.file_name().as_deref(), Some("/img"));
        assert_eq!(t.display_filename(), "/img");
        assert_eq!(b.file_name(), None);
        assert_eq!(b.display_filename(), "null-co://");
        assert!(Arc::ptr_eq(&Node::skip_filters(&t), &q));
        assert!(Arc::ptr_eq(&Node::skip_filters(&q), &q));
        assert_eq!(q.backing_depth(), 1);
        assert_eq!(t.backing_depth(), 0);
        let names: Vec<&str> = q.children().iter().map(|c| c.node().name()).collect();
        assert_eq!(names, ["f", "b"]);
        assert_eq!(q.cluster_size(), None);
        assert_eq!(
            q.reopen_writable().unwrap_err(),
            "node 'q' (fmt) cannot be committed into"
        );
        assert_eq!(t.truncate(1).unwrap_err(), "t cannot be resized");
    }

    #[test]
    fn backing_chain_runs_from_the_backing_node_to_the_bottom() {
        // top -(backing)-> mid -(backing)-> base; top's file is not in it.
        let base = node("base", leaf("null-co", None));
        let mid = node(
            "mid",
            Fake {
                backing: edge("mid", ChildRole::Backing, &base),
                ..leaf("fmt", None)
            },
        );
        let f = node("f", leaf("file", Some("/img")));
        let top = node(
            "top",
            Fake {
                file: edge("top", ChildRole::File, &f),
                backing: edge("top", ChildRole::Backing, &mid),
                ..leaf("fmt", None)
            },
        );
        let names: Vec<String> = top.backing_chain().map(|n| n.name().to_string()).collect();
        assert_eq!(names, ["mid", "base"]);
        assert!(Arc::ptr_eq(&top.backing_node().unwrap(), &mid));
        assert_eq!(top.backing_depth(), 2);
        assert_eq!(base.backing_chain().count(), 0);
        assert!(base.backing_node().is_none());
    }

    /// A protocol driver that records the locks asked of it.
    struct Locks(std::sync::Mutex<Vec<(Perm, Perm)>>);

    impl BlockDriver for Locks {
        fn name(&self) -> &'static str {
            "file"
        }
        fn size(&self) -> u64 {
            1 << 20
        }
        fn request_alignment(&self) -> u32 {
            1
        }
        fn preadv<'a>(&'a self, _: &'a Node, _: u64, _: &'a IoVecs) -> BlockFuture<'a> {
            BlockFuture::ready(Ok(()))
        }
        fn pwritev<'a>(&'a self, _: &'a Node, _: u64, _: &'a IoVecs, _: bool) -> BlockFuture<'a> {
            BlockFuture::ready(Ok(()))
        }
        fn flush<'a>(&'a self, _: &'a Node) -> BlockFuture<'a> {
            BlockFuture::ready(Ok(()))
        }
        fn pdiscard<'a>(&'a self, _: &'a Node, _: u64, _: u64) -> BlockFuture<'a> {
            BlockFuture::ready(Ok(()))
        }
        fn pwrite_zeroes<'a>(
            &'a self,
            _: &'a Node,
            _: u64,
            _: u64,
            _: bool,
            _: bool,
        ) -> BlockFuture<'a> {
            BlockFuture::ready(Ok(()))
        }
        fn truncate(&self, _: &Node, _: u64) -> Result<(), String> {
            Ok(())
        }
        fn update_locks(&self, perm: Perm, shared: Perm) -> Result<(), String> {
            self.0.lock().unwrap().push((perm, shared));
            Ok(())
        }
        fn as_any(&self) -> &dyn Any {
            self
        }
    }

    #[test]
    fn an_inactive_node_locks_for_a_reader_and_refuses_writes() {
        let n = Node::new(
            "f".into(),
            Box::new(Locks(std::sync::Mutex::new(Vec::new()))),
            false,
        );
        let last = |n: &Node| {
            let l = n.block_driver().as_any().downcast_ref::<Locks>().unwrap();
            *l.0.lock().unwrap().last().unwrap()
        };
        let w = Perm::CONSISTENT_READ | Perm::WRITE | Perm::RESIZE;
        let shared = Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED;
        let _edge = Child::attach("q", ChildRole::File, n.clone(), w, shared).unwrap();
        assert_eq!(last(&n), (w, shared));
        n.set_active(false);
        n.refresh_locks().unwrap();
        // A reader's lock, everything shared: the other process may write.
        assert_eq!(last(&n), (Perm::CONSISTENT_READ, Perm::ALL));
        let (iov, _view) = IoVecs::bounce(512, 512);
        let run = |f: BlockFuture<'_>| futures::executor::block_on(f);
        for r in [
            run(n.pwritev(0, &iov, false)),
            run(n.pdiscard(0, 512)),
            run(n.pwrite_zeroes(0, 512, false, false)),
        ] {
            assert!(matches!(r, Err(BlockError::Inactive { .. })), "{r:?}");
        }
        assert!(n.truncate(1 << 21).unwrap_err().contains("'f' is inactive"));
        assert!(run(n.preadv(0, &iov)).is_ok());
        assert!(run(n.flush()).is_ok());
        n.set_active(true);
        n.refresh_locks().unwrap();
        assert_eq!(last(&n), (w, shared));
        assert!(run(n.pwritev(0, &iov, false)).is_ok());
    }
}
