//! The `throttle` filter driver: passes requests to its `file` child once
//! its throttle group lets them go. It can sit anywhere in the graph, so
//! several exports, queues and iothreads share one group.

use std::sync::Arc;

use serde::Deserialize;

use super::BlockdevRef;
use crate::block::{BlockFuture, Child, ChildRole, Graph, GraphError, Perm};
use crate::io::IoVecs;
use crate::opts;
use crate::throttle::{Direction, Member, ThrottleGroup};

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ThrottleOptions {
    #[serde(default)]
    pub node_name: String,
    pub throttle_group: String,
    pub file: BlockdevRef,
    #[serde(default, deserialize_with = "opts::bool")]
    pub read_only: bool,
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
}

pub struct ThrottleDriver {
    group: Arc<ThrottleGroup>,
    member: Arc<Member>,
    file: Child,
}

impl ThrottleDriver {
    pub fn open(o: &ThrottleOptions, graph: &mut Graph) -> Result<Self, GraphError> {
        let group = graph
            .throttle_group(&o.throttle_group)
            .ok_or_else(|| GraphError::Open {
                node: o.node_name.clone(),
                reason: format!("throttle group '{}' does not exist", o.throttle_group),
            })?;
        let child = super::open_child(
            graph,
            &o.node_name,
            "file",
            &o.file,
            super::DiscardMode::Ignore,
        )?;
        let mut perm = Perm::CONSISTENT_READ;
        if !o.read_only {
            perm = perm | Perm::WRITE;
        }
        let file = Child::attach(&o.node_name, ChildRole::Filtered, child, perm, Perm::ALL)?;
        let member = group.join();
        Ok(ThrottleDriver {
            group,
            member,
            file,
        })
    }

    pub fn file(&self) -> &Child {
        &self.file
    }

    pub fn group(&self) -> &Arc<ThrottleGroup> {
        &self.group
    }

    pub fn member(&self) -> &Arc<Member> {
        &self.member
    }

    pub fn size(&self) -> u64 {
        self.file.node().size()
    }

    pub fn request_alignment(&self) -> u32 {
        self.file.node().request_alignment()
    }

    pub fn preadv<'a>(&'a self, offset: u64, iov: &'a IoVecs) -> BlockFuture<'a> {
        BlockFuture::boxed(async move {
            self.group
                .intercept(&self.member, Direction::Read, iov.len())
                .await;
            self.file.node().preadv(offset, iov).await
        })
    }

    pub fn pwritev<'a>(&'a self, offset: u64, iov: &'a IoVecs, fua: bool) -> BlockFuture<'a> {
        BlockFuture::boxed(async move {
            self.group
                .intercept(&self.member, Direction::Write, iov.len())
                .await;
            self.file.node().pwritev(offset, iov, fua).await
        })
    }

    pub fn flush(&self) -> BlockFuture<'_> {
        self.file.node().flush()
    }

    pub fn pdiscard(&self, offset: u64, len: u64) -> BlockFuture<'_> {
        BlockFuture::boxed(async move {
            self.group
                .intercept(&self.member, Direction::Write, len)
                .await;
            self.file.node().pdiscard(offset, len).await
        })
    }

    pub fn pwrite_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
        fua: bool,
    ) -> BlockFuture<'_> {
        BlockFuture::boxed(async move {
            self.group
                .intercept(&self.member, Direction::Write, len)
                .await;
            self.file
                .node()
                .pwrite_zeroes(offset, len, may_unmap, fua)
                .await
        })
    }
}

impl Drop for ThrottleDriver {
    fn drop(&mut self) {
        self.group.leave(&self.member);
    }
}
