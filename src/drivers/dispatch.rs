//! Each driver behind the block layer's [`BlockDriver`] interface, one
//! impl per driver.

use std::any::Any;
use std::sync::Arc;

use futures::future::LocalBoxFuture;

use super::{
    BlkdebugDriver, CorDriver, FileDriver, LuksDriver, NbdDriver, NullDriver, Qcow2Driver,
    QuorumDriver, RawDriver, RbdDriver, ThrottleDriver,
};
use crate::block::{
    Allocation, BlockDriver, BlockError, BlockFuture, BlockStatus, Child, DebugEvent, Node, Perm,
};
use crate::io::IoVecs;
use crate::throttle::{Member, ThrottleGroup};

impl BlockDriver for FileDriver {
    fn name(&self) -> &'static str {
        self.driver_name()
    }
    fn size(&self) -> u64 {
        FileDriver::size(self)
    }
    fn request_alignment(&self) -> u32 {
        FileDriver::request_alignment(self)
    }
    fn preadv<'a>(&'a self, node: &'a Node, offset: u64, iov: &'a IoVecs) -> BlockFuture<'a> {
        BlockFuture::boxed(FileDriver::preadv(self, node, offset, iov))
    }
    fn pwritev<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        iov: &'a IoVecs,
        fua: bool,
    ) -> BlockFuture<'a> {
        BlockFuture::boxed(FileDriver::pwritev(self, node, offset, iov, fua))
    }
    fn flush<'a>(&'a self, node: &'a Node) -> BlockFuture<'a> {
        BlockFuture::boxed(FileDriver::flush(self, node))
    }
    fn pdiscard<'a>(&'a self, node: &'a Node, offset: u64, len: u64) -> BlockFuture<'a> {
        BlockFuture::boxed(FileDriver::pdiscard(self, node, offset, len))
    }
    fn pwrite_zeroes<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        len: u64,
        may_unmap: bool,
        fua: bool,
    ) -> BlockFuture<'a> {
        BlockFuture::boxed(FileDriver::pwrite_zeroes(
            self, node, offset, len, may_unmap, fua,
        ))
    }
    fn truncate(&self, node: &Node, size: u64) -> Result<(), String> {
        FileDriver::truncate(self, node, size).map_err(|e| {
            let mut s = e.to_string();
            if let Some(src) = std::error::Error::source(&e) {
                s.push_str(&format!(": {src}"));
            }
            s
        })
    }
    fn update_locks(&self, perm: Perm, shared: Perm) -> Result<(), String> {
        FileDriver::update_locks(self, perm, shared)
    }
    fn activate(&self, _node: &Node) -> Result<(), String> {
        FileDriver::activate(self)
    }
    fn filename(&self) -> Option<&str> {
        Some(FileDriver::filename(self))
    }
    fn is_direct(&self) -> bool {
        FileDriver::is_direct(self)
    }
    fn is_no_flush(&self) -> bool {
        FileDriver::is_no_flush(self)
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl BlockDriver for NullDriver {
    fn name(&self) -> &'static str {
        "null-co"
    }
    fn size(&self) -> u64 {
        NullDriver::size(self)
    }
    fn request_alignment(&self) -> u32 {
        1
    }
    fn preadv<'a>(&'a self, _node: &'a Node, _offset: u64, iov: &'a IoVecs) -> BlockFuture<'a> {
        BlockFuture::ready(NullDriver::preadv(self, iov))
    }
    fn pwritev<'a>(
        &'a self,
        _node: &'a Node,
        _offset: u64,
        _iov: &'a IoVecs,
        _fua: bool,
    ) -> BlockFuture<'a> {
        BlockFuture::ready(Ok(()))
    }
    fn flush<'a>(&'a self, _node: &'a Node) -> BlockFuture<'a> {
        BlockFuture::ready(Ok(()))
    }
    fn pdiscard<'a>(&'a self, _node: &'a Node, _offset: u64, _len: u64) -> BlockFuture<'a> {
        BlockFuture::ready(Ok(()))
    }
    fn pwrite_zeroes<'a>(
        &'a self,
        _node: &'a Node,
        _offset: u64,
        _len: u64,
        _may_unmap: bool,
        _fua: bool,
    ) -> BlockFuture<'a> {
        BlockFuture::ready(Ok(()))
    }
    fn block_status<'a>(
        &'a self,
        _node: &'a Node,
        _offset: u64,
        len: u64,
    ) -> LocalBoxFuture<'a, Result<BlockStatus, BlockError>> {
        Box::pin(std::future::ready(Ok(BlockStatus {
            kind: if self.reads_zeroes() {
                Allocation::Zero
            } else {
                Allocation::Data
            },
            len,
            depth: 0,
        })))
    }
    fn truncate(&self, node: &Node, _size: u64) -> Result<(), String> {
        Err(format!(
            "node '{}' (null-co) cannot be resized",
            node.name()
        ))
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl BlockDriver for RbdDriver {
    fn name(&self) -> &'static str {
        "rbd"
    }
    fn size(&self) -> u64 {
        RbdDriver::size(self)
    }
    fn request_alignment(&self) -> u32 {
        1
    }
    fn preadv<'a>(&'a self, node: &'a Node, offset: u64, iov: &'a IoVecs) -> BlockFuture<'a> {
        BlockFuture::boxed(RbdDriver::preadv(self, node, offset, iov))
    }
    fn pwritev<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        iov: &'a IoVecs,
        fua: bool,
    ) -> BlockFuture<'a> {
        BlockFuture::boxed(RbdDriver::pwritev(self, node, offset, iov, fua))
    }
    fn flush<'a>(&'a self, node: &'a Node) -> BlockFuture<'a> {
        BlockFuture::boxed(RbdDriver::flush(self, node))
    }
    fn pdiscard<'a>(&'a self, node: &'a Node, offset: u64, len: u64) -> BlockFuture<'a> {
        BlockFuture::boxed(RbdDriver::pdiscard(self, node, offset, len))
    }
    fn pwrite_zeroes<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        len: u64,
        may_unmap: bool,
        fua: bool,
    ) -> BlockFuture<'a> {
        BlockFuture::boxed(RbdDriver::pwrite_zeroes(
            self, node, offset, len, may_unmap, fua,
        ))
    }
    fn block_status<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        len: u64,
    ) -> LocalBoxFuture<'a, Result<BlockStatus, BlockError>> {
        Box::pin(std::future::ready(RbdDriver::block_status(
            self, node, offset, len,
        )))
    }
    fn truncate(&self, _node: &Node, size: u64) -> Result<(), String> {
        RbdDriver::truncate(self, size)
    }
    fn activate(&self, _node: &Node) -> Result<(), String> {
        RbdDriver::activate(self)
    }
    fn filename(&self) -> Option<&str> {
        Some(self.display_name())
    }
    fn close(&self) {
        RbdDriver::close(self)
    }
    fn close_inactive(&self) {
        // Inactivation flushed librbd's cache; closing writes nothing.
        RbdDriver::close(self)
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl BlockDriver for NbdDriver {
    fn name(&self) -> &'static str {
        "nbd"
    }
    fn size(&self) -> u64 {
        NbdDriver::size(self)
    }
    fn request_alignment(&self) -> u32 {
        NbdDriver::request_alignment(self)
    }
    fn preadv<'a>(&'a self, _node: &'a Node, offset: u64, iov: &'a IoVecs) -> BlockFuture<'a> {
        BlockFuture::boxed(NbdDriver::preadv(self, offset, iov))
    }
    fn pwritev<'a>(
        &'a self,
        _node: &'a Node,
        offset: u64,
        iov: &'a IoVecs,
        fua: bool,
    ) -> BlockFuture<'a> {
        BlockFuture::boxed(NbdDriver::pwritev(self, offset, iov, fua))
    }
    fn flush<'a>(&'a self, _node: &'a Node) -> BlockFuture<'a> {
        BlockFuture::boxed(NbdDriver::flush(self))
    }
    fn pdiscard<'a>(&'a self, _node: &'a Node, offset: u64, len: u64) -> BlockFuture<'a> {
        BlockFuture::boxed(NbdDriver::pdiscard(self, offset, len))
    }
    fn pwrite_zeroes<'a>(
        &'a self,
        _node: &'a Node,
        offset: u64,
        len: u64,
        may_unmap: bool,
        fua: bool,
    ) -> BlockFuture<'a> {
        BlockFuture::boxed(NbdDriver::pwrite_zeroes(self, offset, len, may_unmap, fua))
    }
    fn block_status<'a>(
        &'a self,
        _node: &'a Node,
        offset: u64,
        len: u64,
    ) -> LocalBoxFuture<'a, Result<BlockStatus, BlockError>> {
        Box::pin(NbdDriver::block_status(self, offset, len))
    }
    fn truncate(&self, node: &Node, _size: u64) -> Result<(), String> {
        Err(format!("node '{}' (nbd) cannot be resized", node.name()))
    }
    fn filename(&self) -> Option<&str> {
        Some(NbdDriver::filename(self))
    }
    fn tcp_ports(&self) -> Vec<u16> {
        NbdDriver::tcp_port(self).into_iter().collect()
    }
    fn close(&self) {
        NbdDriver::close(self)
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl BlockDriver for RawDriver {
    fn name(&self) -> &'static str {
        "raw"
    }
    fn activate(&self, _node: &Node) -> Result<(), String> {
        RawDriver::reread_size(self);
        Ok(())
    }
    fn size(&self) -> u64 {
        RawDriver::size(self)
    }
    fn request_alignment(&self) -> u32 {
        RawDriver::request_alignment(self)
    }
    fn file(&self) -> Option<&Child> {
        Some(RawDriver::file(self))
    }
    fn preadv<'a>(&'a self, _node: &'a Node, offset: u64, iov: &'a IoVecs) -> BlockFuture<'a> {
        RawDriver::preadv(self, offset, iov)
    }
    fn pwritev<'a>(
        &'a self,
        _node: &'a Node,
        offset: u64,
        iov: &'a IoVecs,
        fua: bool,
    ) -> BlockFuture<'a> {
        RawDriver::pwritev(self, offset, iov, fua)
    }
    fn flush<'a>(&'a self, _node: &'a Node) -> BlockFuture<'a> {
        RawDriver::flush(self)
    }
    fn pdiscard<'a>(&'a self, _node: &'a Node, offset: u64, len: u64) -> BlockFuture<'a> {
        RawDriver::pdiscard(self, offset, len)
    }
    fn pwrite_zeroes<'a>(
        &'a self,
        _node: &'a Node,
        offset: u64,
        len: u64,
        may_unmap: bool,
        fua: bool,
    ) -> BlockFuture<'a> {
        RawDriver::pwrite_zeroes(self, offset, len, may_unmap, fua)
    }
    fn block_status<'a>(
        &'a self,
        _node: &'a Node,
        offset: u64,
        len: u64,
    ) -> LocalBoxFuture<'a, Result<BlockStatus, BlockError>> {
        let inner = RawDriver::file(self).node().clone();
        let base = self.offset();
        Box::pin(async move { inner.block_status(base + offset, len).await })
    }
    fn truncate(&self, _node: &Node, size: u64) -> Result<(), String> {
        RawDriver::truncate(self, size)
    }
    fn reopen_writable(&self, node: &Node) -> Result<(), String> {
        let f = RawDriver::file(self).node();
        if f.is_read_only() {
            let Some(fd) = f.block_driver().as_any().downcast_ref::<FileDriver>() else {
                return Err(format!("node '{}' cannot be made writable", node.name()));
            };
            fd.reopen_read_write(f)?;
        }
        RawDriver::file(self).set_perm(
            Perm::CONSISTENT_READ | Perm::WRITE,
            Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED,
        );
        node.set_read_only(false);
        Ok(())
    }
    fn make_read_only(&self) {
        RawDriver::file(self).set_perm(Perm::CONSISTENT_READ, Perm::ALL);
    }
    fn make_writable(&self) {
        RawDriver::file(self).set_perm(
            Perm::CONSISTENT_READ | Perm::WRITE,
            Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED,
        );
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl BlockDriver for Qcow2Driver {
    fn name(&self) -> &'static str {
        "qcow2"
    }
    fn is_encrypted(&self) -> bool {
        Qcow2Driver::is_encrypted(self)
    }
    fn size(&self) -> u64 {
        Qcow2Driver::size(self)
    }
    fn request_alignment(&self) -> u32 {
        Qcow2Driver::request_alignment(self)
    }
    fn file(&self) -> Option<&Child> {
        Some(Qcow2Driver::file(self))
    }
    fn backing(&self) -> Option<&Child> {
        Qcow2Driver::backing(self)
    }
    fn preadv<'a>(&'a self, _node: &'a Node, offset: u64, iov: &'a IoVecs) -> BlockFuture<'a> {
        BlockFuture::boxed(Qcow2Driver::preadv(self, offset, iov))
    }
    fn pwritev<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        iov: &'a IoVecs,
        fua: bool,
    ) -> BlockFuture<'a> {
        BlockFuture::boxed(Qcow2Driver::pwritev(self, node, offset, iov, fua))
    }
    fn flush<'a>(&'a self, _node: &'a Node) -> BlockFuture<'a> {
        BlockFuture::boxed(Qcow2Driver::flush(self))
    }
    fn pdiscard<'a>(&'a self, _node: &'a Node, offset: u64, len: u64) -> BlockFuture<'a> {
        BlockFuture::boxed(Qcow2Driver::pdiscard(self, offset, len))
    }
    fn pwrite_zeroes<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        len: u64,
        may_unmap: bool,
        fua: bool,
    ) -> BlockFuture<'a> {
        BlockFuture::boxed(Qcow2Driver::pwrite_zeroes(
            self, node, offset, len, may_unmap, fua,
        ))
    }
    fn block_status<'a>(
        &'a self,
        _node: &'a Node,
        offset: u64,
        len: u64,
    ) -> LocalBoxFuture<'a, Result<BlockStatus, BlockError>> {
        Box::pin(Qcow2Driver::block_status(self, offset, len))
    }
    fn truncate(&self, node: &Node, size: u64) -> Result<(), String> {
        Qcow2Driver::truncate(self, node, size)
    }
    fn close(&self) {
        Qcow2Driver::close(self)
    }
    fn inactivate(&self, node: &Node) -> Result<(), String> {
        Qcow2Driver::inactivate(self, node)
    }
    fn activate(&self, node: &Node) -> Result<(), String> {
        Qcow2Driver::activate(self, node)
    }
    fn cluster_size(&self) -> Option<u64> {
        Some(Qcow2Driver::cluster_size(self))
    }
    fn reopen_writable(&self, node: &Node) -> Result<(), String> {
        Qcow2Driver::reopen_writable(self, node)
    }
    fn make_read_only(&self) {
        Qcow2Driver::make_read_only(self)
    }
    fn make_writable(&self) {
        Qcow2Driver::make_writable(self)
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl BlockDriver for ThrottleDriver {
    fn name(&self) -> &'static str {
        "throttle"
    }
    fn size(&self) -> u64 {
        ThrottleDriver::size(self)
    }
    fn request_alignment(&self) -> u32 {
        ThrottleDriver::request_alignment(self)
    }
    fn file(&self) -> Option<&Child> {
        Some(ThrottleDriver::file(self))
    }
    fn is_filter(&self) -> bool {
        true
    }
    fn preadv<'a>(&'a self, _node: &'a Node, offset: u64, iov: &'a IoVecs) -> BlockFuture<'a> {
        ThrottleDriver::preadv(self, offset, iov)
    }
    fn pwritev<'a>(
        &'a self,
        _node: &'a Node,
        offset: u64,
        iov: &'a IoVecs,
        fua: bool,
    ) -> BlockFuture<'a> {
        ThrottleDriver::pwritev(self, offset, iov, fua)
    }
    fn flush<'a>(&'a self, _node: &'a Node) -> BlockFuture<'a> {
        ThrottleDriver::flush(self)
    }
    fn pdiscard<'a>(&'a self, _node: &'a Node, offset: u64, len: u64) -> BlockFuture<'a> {
        ThrottleDriver::pdiscard(self, offset, len)
    }
    fn pwrite_zeroes<'a>(
        &'a self,
        _node: &'a Node,
        offset: u64,
        len: u64,
        may_unmap: bool,
        fua: bool,
    ) -> BlockFuture<'a> {
        ThrottleDriver::pwrite_zeroes(self, offset, len, may_unmap, fua)
    }
    fn block_status<'a>(
        &'a self,
        _node: &'a Node,
        offset: u64,
        len: u64,
    ) -> LocalBoxFuture<'a, Result<BlockStatus, BlockError>> {
        ThrottleDriver::file(self).node().block_status(offset, len)
    }
    // A filter resizes what it filters.
    fn truncate(&self, _node: &Node, size: u64) -> Result<(), String> {
        ThrottleDriver::file(self).node().truncate(size)
    }
    fn throttle_member(&self) -> Option<(&Arc<ThrottleGroup>, &Arc<Member>)> {
        Some((self.group(), self.member()))
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl BlockDriver for CorDriver {
    fn name(&self) -> &'static str {
        "copy-on-read"
    }
    fn size(&self) -> u64 {
        CorDriver::size(self)
    }
    fn request_alignment(&self) -> u32 {
        CorDriver::request_alignment(self)
    }
    fn file(&self) -> Option<&Child> {
        Some(CorDriver::file(self))
    }
    fn is_filter(&self) -> bool {
        true
    }
    fn preadv<'a>(&'a self, _node: &'a Node, offset: u64, iov: &'a IoVecs) -> BlockFuture<'a> {
        BlockFuture::boxed(CorDriver::preadv(self, offset, iov))
    }
    fn pwritev<'a>(
        &'a self,
        _node: &'a Node,
        offset: u64,
        iov: &'a IoVecs,
        fua: bool,
    ) -> BlockFuture<'a> {
        BlockFuture::boxed(CorDriver::pwritev(self, offset, iov, fua))
    }
    fn flush<'a>(&'a self, _node: &'a Node) -> BlockFuture<'a> {
        CorDriver::file(self).node().flush()
    }
    fn pdiscard<'a>(&'a self, _node: &'a Node, offset: u64, len: u64) -> BlockFuture<'a> {
        BlockFuture::boxed(CorDriver::pdiscard(self, offset, len))
    }
    fn pwrite_zeroes<'a>(
        &'a self,
        _node: &'a Node,
        offset: u64,
        len: u64,
        may_unmap: bool,
        fua: bool,
    ) -> BlockFuture<'a> {
        BlockFuture::boxed(CorDriver::pwrite_zeroes(self, offset, len, may_unmap, fua))
    }
    fn block_status<'a>(
        &'a self,
        _node: &'a Node,
        offset: u64,
        len: u64,
    ) -> LocalBoxFuture<'a, Result<BlockStatus, BlockError>> {
        CorDriver::file(self).node().block_status(offset, len)
    }
    fn truncate(&self, _node: &Node, size: u64) -> Result<(), String> {
        CorDriver::file(self).node().truncate(size)
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl BlockDriver for BlkdebugDriver {
    fn name(&self) -> &'static str {
        "blkdebug"
    }
    fn size(&self) -> u64 {
        BlkdebugDriver::size(self)
    }
    fn request_alignment(&self) -> u32 {
        BlkdebugDriver::request_alignment(self)
    }
    fn file(&self) -> Option<&Child> {
        Some(BlkdebugDriver::file(self))
    }
    fn is_filter(&self) -> bool {
        true
    }
    fn preadv<'a>(&'a self, _node: &'a Node, offset: u64, iov: &'a IoVecs) -> BlockFuture<'a> {
        BlkdebugDriver::preadv(self, offset, iov)
    }
    fn pwritev<'a>(
        &'a self,
        _node: &'a Node,
        offset: u64,
        iov: &'a IoVecs,
        fua: bool,
    ) -> BlockFuture<'a> {
        BlkdebugDriver::pwritev(self, offset, iov, fua)
    }
    fn flush<'a>(&'a self, _node: &'a Node) -> BlockFuture<'a> {
        BlkdebugDriver::flush(self)
    }
    fn pdiscard<'a>(&'a self, _node: &'a Node, offset: u64, len: u64) -> BlockFuture<'a> {
        BlkdebugDriver::pdiscard(self, offset, len)
    }
    fn pwrite_zeroes<'a>(
        &'a self,
        _node: &'a Node,
        offset: u64,
        len: u64,
        may_unmap: bool,
        fua: bool,
    ) -> BlockFuture<'a> {
        BlkdebugDriver::pwrite_zeroes(self, offset, len, may_unmap, fua)
    }
    fn block_status<'a>(
        &'a self,
        _node: &'a Node,
        offset: u64,
        len: u64,
    ) -> LocalBoxFuture<'a, Result<BlockStatus, BlockError>> {
        BlkdebugDriver::block_status(self, offset, len)
    }
    fn truncate(&self, _node: &Node, size: u64) -> Result<(), String> {
        BlkdebugDriver::file(self).node().truncate(size)
    }
    fn debug_event(&self, event: DebugEvent) {
        BlkdebugDriver::event(self, event)
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl BlockDriver for QuorumDriver {
    fn name(&self) -> &'static str {
        "quorum"
    }
    fn size(&self) -> u64 {
        QuorumDriver::size(self)
    }
    fn request_alignment(&self) -> u32 {
        QuorumDriver::request_alignment(self)
    }
    fn children(&self) -> Vec<&Child> {
        self.children_list().iter().map(|c| c.child()).collect()
    }
    fn named_children(&self) -> Vec<(String, &Child)> {
        self.children_list()
            .iter()
            .map(|c| (c.name().to_string(), c.child()))
            .collect()
    }
    fn add_child(&self, _name: &str, child: Arc<Node>) -> Result<(), String> {
        QuorumDriver::add_child(self, child)
    }
    fn del_child(&self, _name: &str, child: &str) -> Result<(), String> {
        QuorumDriver::del_child(self, child)
    }
    fn preadv<'a>(&'a self, _node: &'a Node, offset: u64, iov: &'a IoVecs) -> BlockFuture<'a> {
        QuorumDriver::preadv(self, offset, iov)
    }
    fn pwritev<'a>(
        &'a self,
        _node: &'a Node,
        offset: u64,
        iov: &'a IoVecs,
        fua: bool,
    ) -> BlockFuture<'a> {
        QuorumDriver::pwritev(self, offset, iov, fua)
    }
    fn flush<'a>(&'a self, _node: &'a Node) -> BlockFuture<'a> {
        QuorumDriver::flush(self)
    }
    fn pdiscard<'a>(&'a self, _node: &'a Node, _offset: u64, _len: u64) -> BlockFuture<'a> {
        // QEMU's quorum has no discard: the request succeeds, unchanged.
        BlockFuture::ready(Ok(()))
    }
    fn pwrite_zeroes<'a>(
        &'a self,
        _node: &'a Node,
        offset: u64,
        len: u64,
        may_unmap: bool,
        fua: bool,
    ) -> BlockFuture<'a> {
        QuorumDriver::pwrite_zeroes(self, offset, len, may_unmap, fua)
    }
    fn block_status<'a>(
        &'a self,
        _node: &'a Node,
        offset: u64,
        len: u64,
    ) -> LocalBoxFuture<'a, Result<BlockStatus, BlockError>> {
        Box::pin(QuorumDriver::block_status(self, offset, len))
    }
    fn truncate(&self, _node: &Node, _size: u64) -> Result<(), String> {
        // QEMU's block_resize on a quorum node.
        Err("Image format driver does not support resize".into())
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl BlockDriver for LuksDriver {
    fn name(&self) -> &'static str {
        "luks"
    }
    fn is_encrypted(&self) -> bool {
        true
    }
    fn activate(&self, _node: &Node) -> Result<(), String> {
        LuksDriver::reread_size(self);
        Ok(())
    }
    fn size(&self) -> u64 {
        LuksDriver::size(self)
    }
    fn request_alignment(&self) -> u32 {
        LuksDriver::request_alignment(self)
    }
    fn file(&self) -> Option<&Child> {
        Some(LuksDriver::file(self))
    }
    fn preadv<'a>(&'a self, _node: &'a Node, offset: u64, iov: &'a IoVecs) -> BlockFuture<'a> {
        BlockFuture::boxed(LuksDriver::preadv(self, offset, iov))
    }
    fn pwritev<'a>(
        &'a self,
        _node: &'a Node,
        offset: u64,
        iov: &'a IoVecs,
        fua: bool,
    ) -> BlockFuture<'a> {
        BlockFuture::boxed(LuksDriver::pwritev(self, offset, iov, fua))
    }
    fn flush<'a>(&'a self, _node: &'a Node) -> BlockFuture<'a> {
        LuksDriver::file(self).node().flush()
    }
    fn pdiscard<'a>(&'a self, _node: &'a Node, _offset: u64, _len: u64) -> BlockFuture<'a> {
        // As QEMU's crypto driver: no discard (the file's holes would
        // read back as noise).
        BlockFuture::ready(Ok(()))
    }
    fn pwrite_zeroes<'a>(
        &'a self,
        _node: &'a Node,
        offset: u64,
        len: u64,
        _may_unmap: bool,
        fua: bool,
    ) -> BlockFuture<'a> {
        BlockFuture::boxed(LuksDriver::pwrite_zeroes(self, offset, len, fua))
    }
    fn block_status<'a>(
        &'a self,
        _node: &'a Node,
        _offset: u64,
        len: u64,
    ) -> LocalBoxFuture<'a, Result<BlockStatus, BlockError>> {
        Box::pin(std::future::ready(Ok(BlockStatus {
            kind: Allocation::Data,
            len,
            depth: 0,
        })))
    }
    fn truncate(&self, _node: &Node, size: u64) -> Result<(), String> {
        LuksDriver::truncate(self, size)
    }
    fn make_read_only(&self) {
        LuksDriver::file(self).set_perm(Perm::CONSISTENT_READ, Perm::ALL);
    }
    fn make_writable(&self) {
        LuksDriver::file(self).set_perm(
            Perm::CONSISTENT_READ | Perm::WRITE,
            Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED,
        );
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}
