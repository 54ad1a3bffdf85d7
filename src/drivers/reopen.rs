//! blockdev-reopen by driver: prepare (check what may not change, open
//! new descriptors), then commit inside a drained section, or drop the
//! prepared state to abort.

use super::file::FileReopen;
use super::qcow2::{Applied, Qcow2Reopen};
use super::ThrottleDriver;
use super::{driver_as, BlockdevOptions, FileDriver, NullDriver, Qcow2Driver, RawDriver};
use crate::block::{Graph, Node};

/// A reopen that passed its checks; dropping it aborts (new descriptors
/// are closed).
pub struct PreparedReopen {
    opts: BlockdevOptions,
    file: Option<FileReopen>,
    qcow2: Option<Qcow2Reopen>,
    /// What [`PreparedReopen::apply`] did (qcow2), for its undo.
    applied: Option<Applied>,
}

impl PreparedReopen {
    /// The request alignment the node needs after the commit, when its
    /// descriptor changes (file nodes).
    pub fn request_alignment(&self) -> Option<u32> {
        self.file.as_ref().map(FileReopen::request_alignment)
    }

    /// The options the node is reopened with.
    pub fn options(&self) -> &BlockdevOptions {
        &self.opts
    }

    /// The steps that can fail, in the drained section before any
    /// commit (qcow2: read-only <-> read-write, lazy refcounts).
    pub fn apply(&mut self, node: &Node) -> Result<(), String> {
        if let (Some(r), Some(q)) = (&self.qcow2, driver_as::<Qcow2Driver>(node)) {
            self.applied = Some(q.apply_reopen(node, r)?);
        }
        Ok(())
    }

    /// Undoes [`PreparedReopen::apply`] (a later node's step failed).
    pub fn undo(&mut self, node: &Node) {
        if let (Some(a), Some(q)) = (self.applied.take(), driver_as::<Qcow2Driver>(node)) {
            q.undo_reopen(node, a);
        }
    }

    /// Applies the reopen to `node` (the node it was prepared on): its
    /// read-only state, then the driver's options. Called with no request
    /// in flight (a drained section).
    pub fn commit(self, node: &Node) {
        // auto-read-only may have opened the new descriptor read-only.
        let fell_back = self.file.as_ref().is_some_and(|f| !f.writable());
        node.set_read_only(self.opts.read_only() || fell_back);
        node.set_detect_zeroes(self.opts.common().detect_zeroes);
        if let Some(fr) = self.file {
            if let Some(f) = driver_as::<FileDriver>(node) {
                f.commit_reopen(fr);
            }
            return;
        }
        match &self.opts {
            BlockdevOptions::Raw(ro) => {
                if let Some(r) = driver_as::<RawDriver>(node) {
                    r.commit_reopen(ro);
                }
            }
            BlockdevOptions::NullCo(no) => {
                if let Some(n) = driver_as::<NullDriver>(node) {
                    n.commit_reopen(no);
                }
            }
            BlockdevOptions::Qcow2(_) => {
                if let (Some(r), Some(q)) = (self.qcow2, driver_as::<Qcow2Driver>(node)) {
                    q.commit_reopen(r);
                }
            }
            _ => {}
        }
    }
}

impl Node {
    /// blockdev-reopen, first step: checks `opts` against the node's
    /// driver and opens what the new options need. Nothing changes until
    /// [`PreparedReopen::commit`].
    pub fn prepare_reopen(
        &self,
        opts: &BlockdevOptions,
        graph: &Graph,
    ) -> Result<PreparedReopen, String> {
        let mismatch = || format!("node '{}': driver mismatch", self.name());
        opts.check_common()?;
        let mut qcow2 = None;
        let file = match opts {
            BlockdevOptions::File(fo) | BlockdevOptions::HostDevice(fo) => {
                let f = driver_as::<FileDriver>(self).ok_or_else(mismatch)?;
                Some(f.prepare_reopen(fo)?)
            }
            BlockdevOptions::Raw(ro) => {
                let r = driver_as::<RawDriver>(self).ok_or_else(mismatch)?;
                r.check_reopen(ro)?;
                None
            }
            BlockdevOptions::NullCo(no) => {
                let n = driver_as::<NullDriver>(self).ok_or_else(mismatch)?;
                n.check_reopen(no)?;
                None
            }
            BlockdevOptions::Qcow2(qo) => {
                let q = driver_as::<Qcow2Driver>(self).ok_or_else(mismatch)?;
                qcow2 = Some(q.prepare_reopen(self, qo, graph)?);
                None
            }
            BlockdevOptions::Throttle(_) => {
                driver_as::<ThrottleDriver>(self).ok_or_else(mismatch)?;
                return Err(format!(
                    "node '{}': throttle nodes cannot be reopened yet; change the group's limits with qom-set",
                    self.name()
                ));
            }
            BlockdevOptions::CopyOnRead(_) => return Err(mismatch()),
            BlockdevOptions::Rbd(_) => {
                return Err(format!(
                    "node '{}': rbd nodes cannot be reopened",
                    self.name()
                ))
            }
            BlockdevOptions::Nbd(_) => {
                return Err(format!(
                    "node '{}': nbd nodes cannot be reopened",
                    self.name()
                ))
            }
            BlockdevOptions::Quorum(_) => {
                // QEMU's quorum has no bdrv_reopen_prepare either.
                return Err(format!(
                    "Block format 'quorum' used by node '{}' does not support reopening files",
                    self.name()
                ));
            }
            BlockdevOptions::Luks(_) => {
                return Err(format!(
                    "node '{}': luks nodes cannot be reopened",
                    self.name()
                ))
            }
            BlockdevOptions::Blkdebug(_) => {
                return Err(format!(
                    "node '{}': blkdebug nodes cannot be reopened",
                    self.name()
                ))
            }
        };
        Ok(PreparedReopen {
            opts: opts.clone(),
            file,
            qcow2,
            applied: None,
        })
    }
}
