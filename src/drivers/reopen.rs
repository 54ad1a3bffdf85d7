//! blockdev-reopen by driver: prepare (check what may not change, open
//! new descriptors), then commit inside a drained section, or drop the
//! prepared state to abort.

use super::file::FileReopen;
use super::{BlockdevOptions, Driver};
use crate::block::Node;

/// A reopen that passed its checks; dropping it aborts (new descriptors
/// are closed).
pub struct PreparedReopen {
    opts: BlockdevOptions,
    file: Option<FileReopen>,
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

    /// Applies the reopen to `node` (the node it was prepared on): its
    /// read-only state, then the driver's options. Called with no request
    /// in flight (a drained section).
    pub fn commit(self, node: &Node) {
        node.set_read_only(self.opts.read_only());
        match (node.driver(), &self.opts, self.file) {
            (Driver::File(f), _, Some(fr)) => f.commit_reopen(fr),
            (Driver::Raw(r), BlockdevOptions::Raw(ro), _) => r.commit_reopen(ro),
            (Driver::Null(n), BlockdevOptions::NullCo(no), _) => n.commit_reopen(no),
            _ => {}
        }
    }
}

impl Node {
    /// blockdev-reopen, first step: checks `opts` against the node's
    /// driver and opens what the new options need. Nothing changes until
    /// [`PreparedReopen::commit`].
    pub fn prepare_reopen(&self, opts: &BlockdevOptions) -> Result<PreparedReopen, String> {
        let file = match (self.driver(), opts) {
            (Driver::File(f), BlockdevOptions::File(fo)) => Some(f.prepare_reopen(fo)?),
            (Driver::Raw(r), BlockdevOptions::Raw(ro)) => {
                r.check_reopen(ro)?;
                None
            }
            (Driver::Null(n), BlockdevOptions::NullCo(no)) => {
                n.check_reopen(no)?;
                None
            }
            (Driver::Qcow2(_), BlockdevOptions::Qcow2(_)) => {
                return Err(format!(
                    "node '{}': qcow2 nodes cannot be reopened yet",
                    self.name()
                ))
            }
            (Driver::Throttle(_), BlockdevOptions::Throttle(_)) => {
                return Err(format!(
                    "node '{}': throttle nodes cannot be reopened yet; change the group's limits with qom-set",
                    self.name()
                ))
            }
            _ => return Err(format!("node '{}': driver mismatch", self.name())),
        };
        Ok(PreparedReopen {
            opts: opts.clone(),
            file,
        })
    }
}
