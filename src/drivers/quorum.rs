//! The `quorum` driver (QEMU's block/quorum.c): several children hold the
//! same data; writes go to all of them, reads either vote on the content
//! (`read-pattern=quorum`) or take the first child that answers
//! (`read-pattern=fifo`).
//!
//! ```text
//!   read (quorum) -> every child into a buffer of its own, concurrently;
//!                    fewer than vote-threshold successes: QUORUM_FAILURE,
//!                    the most frequent error; else the successful copies
//!                    grouped by SHA-256, the largest group wins if it has
//!                    vote-threshold members (else QUORUM_FAILURE, EIO);
//!                    the others get QUORUM_REPORT_BAD, and with
//!                    rewrite-corrupted the winning data written over them
//!   read (fifo)   -> child 0, on error the next one, ...
//!   write, zeroes -> every child concurrently; at least vote-threshold
//!                    must succeed (else QUORUM_FAILURE, the most frequent
//!                    error); each failure is a QUORUM_REPORT_BAD
//!   flush         -> every child; at least vote-threshold must succeed
//!   discard       -> nothing (QEMU's quorum has no discard)
//! ```
//!
//! The children are kept in a [`Swap`]: x-blockdev-change replaces the list
//! inside a drained section, and a request reads it with one load. Child
//! names follow QEMU's: `children.N`, N counting up as children are added
//! (the last index is given back when its child is removed).

use std::io;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Deserializer};
use serde_json::json;
use sha2::{Digest, Sha256};

use super::BlockdevRef;
use crate::block::swap::Swap;
use crate::block::{
    Allocation, BlockError, BlockFuture, BlockStatus, Child, ChildRole, Graph, GraphError, Node,
    Perm,
};
use crate::io::IoVecs;
use crate::opts;

/// QEMU's QuorumReadPattern.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReadPattern {
    #[default]
    Quorum,
    Fifo,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct QuorumOptions {
    #[serde(default)]
    pub node_name: String,
    #[serde(default, deserialize_with = "opts::opt_list")]
    pub children: Option<Vec<BlockdevRef>>,
    #[serde(default, deserialize_with = "signed")]
    pub vote_threshold: Option<i64>,
    #[serde(default, deserialize_with = "opts::opt_bool")]
    pub blkverify: Option<bool>,
    #[serde(default, deserialize_with = "opts::opt_bool")]
    pub rewrite_corrupted: Option<bool>,
    #[serde(default, deserialize_with = "read_pattern")]
    pub read_pattern: Option<ReadPattern>,
    #[serde(default, deserialize_with = "opts::bool")]
    pub read_only: bool,
    /// Common options (QEMU's BlockdevOptions base): see [`super::CommonOptions`].
    #[serde(default, deserialize_with = "opts::bool")]
    pub auto_read_only: bool,
    #[serde(default)]
    pub detect_zeroes: super::DetectZeroes,
    #[serde(default, deserialize_with = "opts::bool")]
    pub force_share: bool,
    #[serde(default, deserialize_with = "opts::opt_bool")]
    pub active: Option<bool>,
    #[serde(default)]
    pub cache: super::CacheOptions,
}

/// An integer as JSON's number or keyval's string.
fn signed<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    use serde::de::Error;
    match Option::<serde_json::Value>::deserialize(d)? {
        None => Ok(None),
        Some(serde_json::Value::Number(n)) => n
            .as_i64()
            .map(Some)
            .ok_or_else(|| D::Error::custom("invalid type: expected integer")),
        Some(serde_json::Value::String(s)) => s
            .parse::<i64>()
            .map(Some)
            .map_err(|_| D::Error::custom("Parameter 'vote-threshold' expects a number")),
        Some(_) => Err(D::Error::custom("invalid type: expected integer")),
    }
}

/// QEMU's words for a read-pattern it does not know.
fn read_pattern<'de, D: Deserializer<'de>>(d: D) -> Result<Option<ReadPattern>, D::Error> {
    use serde::de::Error;
    match Option::<String>::deserialize(d)? {
        None => Ok(None),
        Some(s) => match s.as_str() {
            "quorum" => Ok(Some(ReadPattern::Quorum)),
            "fifo" => Ok(Some(ReadPattern::Fifo)),
            _ => Err(D::Error::custom(format!(
                "Parameter 'read-pattern' does not accept value '{s}'"
            ))),
        },
    }
}

/// One child edge and its name (`children.N`).
pub struct QuorumChild {
    name: String,
    child: Child,
}

impl QuorumChild {
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn child(&self) -> &Child {
        &self.child
    }
}

pub struct QuorumDriver {
    node_name: String,
    threshold: usize,
    read_pattern: ReadPattern,
    rewrite: bool,
    blkverify: bool,
    read_only: bool,
    size: u64,
    children: Swap<Vec<Arc<QuorumChild>>>,
    /// QEMU's next_child_index (management threads only).
    next_index: Mutex<u32>,
}

/// The permissions a quorum takes on each child and shares (QEMU's
/// quorum_child_perm: no one else writes or resizes a child, or the
/// copies would differ). With `rewrite`, reads may write a winning copy
/// over a losing one, so it writes even when read-only itself.
fn child_perm(read_only: bool, rewrite: bool) -> (Perm, Perm) {
    let mut perm = Perm::CONSISTENT_READ;
    if !read_only || rewrite {
        perm = perm | Perm::WRITE;
    }
    (perm, Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED)
}

fn open_err(node: &str, reason: impl Into<String>) -> GraphError {
    GraphError::Open {
        node: node.to_string(),
        reason: reason.into(),
    }
}

impl QuorumDriver {
    pub fn open(o: &QuorumOptions, graph: &mut Graph) -> Result<Self, GraphError> {
        let name = &o.node_name;
        // QEMU's quorum_open, in its order and words.
        let Some(refs) = &o.children else {
            return Err(open_err(name, "Parameter 'children' is missing"));
        };
        if refs.is_empty() {
            return Err(open_err(
                name,
                "Number of provided children must be 1 or more",
            ));
        }
        let Some(threshold) = o.vote_threshold else {
            return Err(open_err(name, "Parameter 'vote-threshold' is missing"));
        };
        valid_threshold(threshold, refs.len()).map_err(|e| open_err(name, e))?;
        let threshold = threshold as usize; // checked: 1..=children
        let read_pattern = o.read_pattern.unwrap_or_default();
        let (mut blkverify, mut rewrite) = (false, false);
        if read_pattern == ReadPattern::Quorum {
            blkverify = o.blkverify.unwrap_or(false);
            if blkverify && (refs.len() != 2 || threshold != 2) {
                return Err(open_err(
                    name,
                    "blkverify=on can only be set if there are exactly two files and vote-threshold is 2",
                ));
            }
            rewrite = o.rewrite_corrupted.unwrap_or(false);
            if rewrite && blkverify {
                return Err(open_err(
                    name,
                    "rewrite-corrupted=on cannot be used with blkverify=on",
                ));
            }
        }
        let (perm, shared) = child_perm(o.read_only, rewrite);
        let mut children = Vec::with_capacity(refs.len());
        for (i, r) in refs.iter().enumerate() {
            let cname = format!("children.{i}");
            // Inline children without a name get one of their own (the
            // generic `{parent}-file` would be the same for all).
            let r = match r {
                BlockdevRef::Inline(inner) if inner.node_name().is_empty() => {
                    let mut inner = (**inner).clone();
                    inner.set_node_name(format!("{name}-children.{i}"));
                    BlockdevRef::Inline(Box::new(inner))
                }
                other => other.clone(),
            };
            let node = super::open_child(graph, name, &cname, &r, super::DiscardMode::Ignore)?;
            let child = Child::attach(name, ChildRole::Data, node, perm, shared)?;
            children.push(Arc::new(QuorumChild { name: cname, child }));
        }
        // QEMU's quorum_co_getlength: every child the same length.
        let size = children[0].child.node().size();
        if children.iter().any(|c| c.child.node().size() != size) {
            return Err(open_err(
                name,
                "Could not refresh total sector count: Input/output error",
            ));
        }
        let next =
            u32::try_from(children.len()).map_err(|_| open_err(name, "Too many children"))?;
        Ok(QuorumDriver {
            node_name: name.clone(),
            threshold,
            read_pattern,
            rewrite,
            blkverify,
            read_only: o.read_only,
            size,
            children: Swap::new(children),
            next_index: Mutex::new(next),
        })
    }

    pub fn children_list(&self) -> &[Arc<QuorumChild>] {
        self.children.get()
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn request_alignment(&self) -> u32 {
        self.children
            .get()
            .iter()
            .map(|c| c.child.node().request_alignment())
            .max()
            .unwrap_or(1)
    }

    /// x-blockdev-change with `node`: QEMU's bdrv_add_child and
    /// quorum_add_child. The caller holds the node's users drained.
    pub fn add_child(&self, node: Arc<Node>) -> Result<(), String> {
        // QEMU's bdrv_add_child, then quorum_add_child.
        if !node.parents().is_empty() {
            return Err(format!("The node {} already has a parent", node.name()));
        }
        if self.blkverify {
            return Err("Cannot add a child to a quorum in blkverify mode".into());
        }
        if node.size() < self.size {
            // QEMU 7.2 takes it and then fails reads past the child's end.
            return Err(format!(
                "The node {} is smaller ({} bytes) than the quorum ({} bytes)",
                node.name(),
                node.size(),
                self.size
            ));
        }
        let mut next = self.next_index.lock().unwrap_or_else(|e| e.into_inner());
        let idx = *next;
        let bumped = idx.checked_add(1).ok_or("Too many children")?;
        let (perm, shared) = child_perm(self.read_only, self.rewrite);
        let child = Child::attach(&self.node_name, ChildRole::Data, node, perm, shared)
            .map_err(|e| e.to_string())?;
        let mut list: Vec<Arc<QuorumChild>> = self.children.get().clone();
        list.push(Arc::new(QuorumChild {
            name: format!("children.{idx}"),
            child,
        }));
        self.children.replace(list);
        *next = bumped;
        Ok(())
    }

    /// x-blockdev-change with `child`: QEMU's quorum_del_child. The caller
    /// checked the child exists and holds the node's users drained.
    pub fn del_child(&self, name: &str) -> Result<(), String> {
        let list = self.children.get();
        let Some(i) = list.iter().position(|c| c.name == name) else {
            return Err(format!(
                "Node '{}' does not have child '{name}'",
                self.node_name
            ));
        };
        if list.len() <= self.threshold {
            return Err(format!(
                "The number of children cannot be lower than the vote threshold {}",
                self.threshold
            ));
        }
        let mut next = self.next_index.lock().unwrap_or_else(|e| e.into_inner());
        if next
            .checked_sub(1)
            .map(|l| format!("children.{l}"))
            .as_deref()
            == Some(name)
        {
            *next -= 1;
        }
        let mut rest = list.clone();
        let gone = rest.remove(i);
        self.children.replace(rest);
        // The old list (and the edge with it) lives until the command
        // ends; the child's permissions go now.
        gone.child.release();
        Ok(())
    }

    pub fn preadv<'a>(&'a self, offset: u64, iov: &'a IoVecs) -> BlockFuture<'a> {
        match self.read_pattern {
            ReadPattern::Quorum => BlockFuture::boxed(self.read_quorum(offset, iov)),
            ReadPattern::Fifo => BlockFuture::boxed(self.read_fifo(offset, iov)),
        }
    }

    async fn read_fifo(&self, offset: u64, iov: &IoVecs) -> Result<(), BlockError> {
        let mut last = Ok(());
        for c in self.children.get().iter() {
            last = c.child.node().preadv(offset, iov).await;
            match &last {
                Ok(()) => return Ok(()),
                Err(e) => report_bad("read", offset, iov.len(), c.child.node().name(), Some(e)),
            }
        }
        last
    }

    async fn read_quorum(&self, offset: u64, iov: &IoVecs) -> Result<(), BlockError> {
        let list = self.children.get();
        let len = iov.len();
        let blen =
            usize::try_from(len).map_err(|_| self.io_error("read", offset, len, libc::EINVAL))?;
        let bufs: Vec<_> = list.iter().map(|_| IoVecs::bounce(blen, 4096)).collect();
        let results = futures::future::join_all(
            list.iter()
                .zip(&bufs)
                .map(|(c, (b, _))| c.child.node().preadv(offset, b)),
        )
        .await;
        for (c, r) in list.iter().zip(&results) {
            if let Err(e) = r {
                report_bad("read", offset, len, c.child.node().name(), Some(e));
            }
        }
        if let Some(errno) = self.too_many_failed(&results) {
            self.report_failure(offset, len);
            return Err(self.io_error("read", offset, len, errno));
        }
        // Group the successful copies by content (QEMU: SHA-256 of each).
        let mut versions: Vec<([u8; 32], Vec<usize>)> = Vec::new();
        for (i, ((b, view), r)) in bufs.iter().zip(&results).enumerate() {
            if r.is_err() {
                continue;
            }
            let h: [u8; 32] = view.with_bytes(b, |s| Sha256::digest(s).into());
            match versions.iter_mut().find(|(v, _)| *v == h) {
                Some((_, items)) => items.push(i),
                None => versions.push((h, vec![i])),
            }
        }
        // QEMU's quorum_get_vote_winner walks its list newest first and
        // keeps the first of the largest: a tie goes to the version seen
        // last (max_by_key keeps the last of equals).
        let Some(winner) = versions
            .iter()
            .enumerate()
            .max_by_key(|(_, v)| v.1.len())
            .map(|(i, _)| i)
        else {
            return Err(self.io_error("read", offset, len, libc::EIO));
        };
        if versions[winner].1.len() < self.threshold {
            self.report_failure(offset, len);
            return Err(self.io_error("read", offset, len, libc::EIO));
        }
        let first = versions[winner].1[0];
        let (wbuf, wview) = &bufs[first];
        wview.with_bytes(wbuf, |s| iov.copy_from(s));
        if versions.len() == 1 {
            return Ok(());
        }
        let bad: Vec<usize> = versions
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != winner)
            .flat_map(|(_, (_, items))| items.iter().copied())
            .collect();
        for &i in &bad {
            report_bad("read", offset, len, list[i].child.node().name(), None);
        }
        if self.rewrite {
            // Errors ignored, as QEMU: a correction attempt only.
            let _ = futures::future::join_all(
                bad.iter()
                    .map(|&i| list[i].child.node().pwritev(offset, wbuf, false)),
            )
            .await;
        }
        Ok(())
    }

    /// QEMU's quorum_has_too_much_io_failed: the errno voted for among the
    /// failures when fewer than vote-threshold requests succeeded.
    fn too_many_failed(&self, results: &[Result<(), BlockError>]) -> Option<i32> {
        let ok = results.iter().filter(|r| r.is_ok()).count();
        if ok >= self.threshold {
            return None;
        }
        Some(vote_errno(results))
    }

    fn report_failure(&self, offset: u64, len: u64) {
        let (sector, count) = sectors(offset, len);
        crate::events::global().emit(
            "QUORUM_FAILURE",
            json!({"reference": self.node_name, "sector-num": sector, "sectors-count": count}),
        );
    }

    fn io_error(&self, op: &'static str, offset: u64, len: u64, errno: i32) -> BlockError {
        BlockError::Io {
            node: self.node_name.clone(),
            op,
            offset,
            len,
            source: io::Error::from_raw_os_error(errno),
        }
    }

    async fn write_all<'a, F>(&'a self, offset: u64, len: u64, f: F) -> Result<(), BlockError>
    where
        F: Fn(&'a Node) -> BlockFuture<'a>,
    {
        let list = self.children.get();
        let results = futures::future::join_all(list.iter().map(|c| f(c.child.node()))).await;
        for (c, r) in list.iter().zip(&results) {
            if let Err(e) = r {
                report_bad("write", offset, len, c.child.node().name(), Some(e));
            }
        }
        if let Some(errno) = self.too_many_failed(&results) {
            self.report_failure(offset, len);
            return Err(self.io_error("write", offset, len, errno));
        }
        Ok(())
    }

    pub fn pwritev<'a>(&'a self, offset: u64, iov: &'a IoVecs, fua: bool) -> BlockFuture<'a> {
        BlockFuture::boxed(self.write_all(offset, iov.len(), move |n| n.pwritev(offset, iov, fua)))
    }

    pub fn pwrite_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
        fua: bool,
    ) -> BlockFuture<'_> {
        BlockFuture::boxed(self.write_all(offset, len, move |n| {
            n.pwrite_zeroes(offset, len, may_unmap, fua)
        }))
    }

    pub fn flush(&self) -> BlockFuture<'_> {
        BlockFuture::boxed(async move {
            let list = self.children.get();
            let results =
                futures::future::join_all(list.iter().map(|c| c.child.node().flush())).await;
            for (c, r) in list.iter().zip(&results) {
                if let Err(e) = r {
                    report_bad("flush", 0, 0, c.child.node().name(), Some(e));
                }
            }
            match self.too_many_failed(&results) {
                // No QUORUM_FAILURE for a flush, as in QEMU.
                Some(errno) => Err(self.io_error("flush", 0, 0, errno)),
                None => Ok(()),
            }
        })
    }

    /// QEMU's quorum_co_block_status: zero where every child reads zeroes
    /// (the shortest extent), data otherwise (the longest).
    pub async fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus, BlockError> {
        let mut zero_len = len;
        let mut data_len = 0u64;
        for c in self.children.get().iter() {
            match c.child.node().block_status(offset, len).await {
                Err(e) => {
                    report_bad("read", offset, len, c.child.node().name(), Some(&e));
                    data_len = len;
                    break;
                }
                Ok(s) if matches!(s.kind, Allocation::Zero | Allocation::Unallocated) => {
                    zero_len = zero_len.min(s.len)
                }
                Ok(s) => data_len = data_len.max(s.len),
            }
        }
        Ok(if data_len > 0 {
            BlockStatus {
                kind: Allocation::Data,
                len: data_len.min(len),
                depth: 0,
            }
        } else {
            BlockStatus {
                kind: Allocation::Zero,
                len: zero_len.max(1).min(len),
                depth: 0,
            }
        })
    }
}

/// QEMU's quorum_valid_threshold.
pub fn valid_threshold(threshold: i64, children: usize) -> Result<(), String> {
    if threshold < 1 {
        return Err("Parameter 'vote-threshold' expects a value >= 1".into());
    }
    if usize::try_from(threshold).map_or(true, |t| t > children) {
        return Err("threshold may not exceed children count".into());
    }
    Ok(())
}

/// QEMU's quorum_vote_error: the most frequent errno among the failures
/// (a tie goes to the value seen last, as QEMU's list is newest first).
fn vote_errno(results: &[Result<(), BlockError>]) -> i32 {
    let mut counts: Vec<(i32, usize)> = Vec::new();
    for e in results.iter().filter_map(|r| r.as_ref().err()) {
        let n = e.errno();
        match counts.iter_mut().find(|(v, _)| *v == n) {
            Some((_, c)) => *c += 1,
            None => counts.push((n, 1)),
        }
    }
    counts
        .iter()
        .rev()
        .fold(None::<(i32, usize)>, |best, &(v, c)| match best {
            Some((_, bc)) if bc >= c => best,
            _ => Some((v, c)),
        })
        .map_or(libc::EIO, |(v, _)| v)
}

/// The first sector and the number of sectors a byte range touches.
fn sectors(offset: u64, len: u64) -> (u64, u64) {
    let start = offset / 512;
    let end = offset.saturating_add(len).div_ceil(512);
    (start, end.saturating_sub(start))
}

/// QUORUM_REPORT_BAD, in QEMU's shape: `error` (strerror) only for a
/// failed request, not for a copy outvoted.
fn report_bad(op: &str, offset: u64, len: u64, node: &str, err: Option<&BlockError>) {
    let (sector, count) = sectors(offset, len);
    let mut data = json!({
        "type": op,
        "node-name": node,
        "sector-num": sector,
        "sectors-count": count,
    });
    if let Some(e) = err {
        data["error"] = json!(crate::block::os_text(&io::Error::from_raw_os_error(
            e.errno()
        )));
    }
    crate::events::global().emit("QUORUM_REPORT_BAD", data);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_are_checked_in_qemus_words() {
        assert!(valid_threshold(0, 3).unwrap_err().contains(">= 1"));
        assert!(valid_threshold(-1, 3).unwrap_err().contains(">= 1"));
        assert_eq!(
            valid_threshold(4, 3).unwrap_err(),
            "threshold may not exceed children count"
        );
        assert!(valid_threshold(3, 3).is_ok());
    }

    #[test]
    fn sector_ranges_round_out() {
        assert_eq!(sectors(0, 4096), (0, 8));
        assert_eq!(sectors(513, 1), (1, 1));
        assert_eq!(sectors(511, 2), (0, 2));
        assert_eq!(sectors(0, 0), (0, 0));
    }

    #[test]
    fn the_most_frequent_error_wins() {
        let e = |n| {
            Err(BlockError::Io {
                node: "x".into(),
                op: "read",
                offset: 0,
                len: 0,
                source: io::Error::from_raw_os_error(n),
            })
        };
        assert_eq!(vote_errno(&[e(5), e(28), e(28), Ok(())]), 28);
        // A tie goes to the one seen last.
        assert_eq!(vote_errno(&[e(5), e(28)]), 28);
        assert_eq!(vote_errno(&[Ok(())]), libc::EIO);
    }
}
