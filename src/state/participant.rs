//! What [`State`](super::State) calls in the subsystems that work on its
//! nodes besides the exports (block jobs), so that `state/`
//! names none of them: each registers a [`DrainParticipant`] with
//! [`State::register`](super::State::register), and drained sections,
//! block_resize and shutdown call every registered participant.

use std::time::Duration;

use crate::block::Node;

/// A subsystem with work on the graph's nodes that State's drained
/// sections, resizes and shutdown must reach.
///
/// Drained sections begin the participants in the order they were
/// registered, then the exports; they end in the reverse order.
pub trait DrainParticipant: Send + Sync {
    /// Quiesces this subsystem's work on any node below or above one of
    /// `nodes` (except the calling thread's own, e.g. the job that asked for
    /// the drained section) and waits until it is at rest. The section ends
    /// when the returned [`Resume`] runs.
    fn drain_begin(&self, nodes: &[&Node]) -> Resume;

    /// block_resize is about to change `node`'s size: refuse if this
    /// subsystem's work depends on it (a job's bitmaps and copies are sized
    /// for the node as it is).
    fn check_resize(&self, _node: &Node) -> Result<(), Busy> {
        Ok(())
    }

    /// `node` has its new size; called inside the drained section.
    fn resized(&self, _node: &Node) {}

    /// Shutdown, before any node is flushed and closed: stop all work and
    /// wait for it, up to `timeout`.
    fn shutdown(&self, _timeout: Duration) {}
}

/// The end of one participant's drained section.
#[must_use = "a drained section ends when its Resume runs"]
pub struct Resume(Option<Box<dyn FnOnce() + Send>>);

impl Resume {
    /// Runs `f` when the section ends.
    pub fn with(f: impl FnOnce() + Send + 'static) -> Resume {
        Resume(Some(Box::new(f)))
    }

    /// Nothing to undo (nothing was quiesced).
    pub fn nothing() -> Resume {
        Resume(None)
    }

    /// Ends the section.
    pub fn run(self) {
        if let Some(f) = self.0 {
            f();
        }
    }
}

/// A participant refuses an operation on a node it works on (QEMU's op
/// blockers); the message is QEMU's.
#[derive(Debug, thiserror::Error)]
#[error("{reason}")]
pub struct Busy {
    pub reason: String,
}
