//! What drained sections and shutdown ask of the jobs: a drain of a
//! node pauses the jobs working on it until they rest; shutdown cancels
//! every job and waits for it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::job::{Job, CURRENT_JOB};
use super::registry::registry;
use super::state::{JobStatus, JobVerb};
use crate::block::Node;

/// How long a drain waits for a job to reach a pause point.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Pauses every job (but the calling thread's own) that works on a node
/// below or above one of `nodes`, and waits until each is at rest: the
/// jobs' half of a drained section. [`drain_end`] resumes them.
pub(super) fn drain_begin(nodes: &[&Node]) -> Vec<Arc<Job>> {
    let me = CURRENT_JOB.with(|c| c.borrow().clone());
    let jobs: Vec<Arc<Job>> = registry()
        .iter()
        .filter(|j| me.as_deref() != Some(j.id.as_str()) && j.touches(nodes))
        .cloned()
        .collect();
    for j in &jobs {
        let mut s = j.state();
        s.pause();
        s.kicks += 1;
        drop(s);
        j.wake.notify_all();
    }
    for j in &jobs {
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        let mut s = j.state();
        while s.busy && !s.status().is_completed() {
            let now = Instant::now();
            if now >= deadline {
                log::error!(
                    "job {}: still busy after {DRAIN_TIMEOUT:?} of a drain; going on",
                    j.id
                );
                break;
            }
            s = j
                .wake
                .wait_timeout(s, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
    jobs
}

/// Ends the jobs' half of a drained section.
pub(super) fn drain_end(jobs: Vec<Arc<Job>>) {
    for j in jobs {
        j.state().resume();
        j.wake.notify_all();
    }
}

/// Cancels every job (shutdown) and waits, up to `timeout`, until each
/// has ended: no job writes to a node once the daemon flushes and closes
/// them. QEMU's job_cancel_sync_all.
pub(super) fn cancel_all(timeout: Duration) {
    let jobs: Vec<Arc<Job>> = registry().iter().cloned().collect();
    for j in &jobs {
        let mut s = j.state();
        if JobVerb::Cancel.allowed_in(s.status()) {
            let _ = s.cancel(true);
        }
        drop(s);
        j.wake.notify_all();
        j.cancel_group();
    }
    let deadline = Instant::now() + timeout;
    for j in &jobs {
        let mut s = j.state();
        while !matches!(s.status(), JobStatus::Concluded | JobStatus::Null) {
            let now = Instant::now();
            if now >= deadline {
                log::error!("job {}: still running at shutdown after {timeout:?}", j.id);
                break;
            }
            s = j
                .wake
                .wait_timeout(s, (deadline - now).min(Duration::from_millis(50)))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// The jobs as a participant of State's drained sections, resizes and
/// shutdown: registered once with State, which then names no job.
pub struct Participant;

impl crate::state::DrainParticipant for Participant {
    fn drain_begin(&self, nodes: &[&Node]) -> crate::state::Resume {
        let jobs = drain_begin(nodes);
        if jobs.is_empty() {
            return crate::state::Resume::nothing();
        }
        crate::state::Resume::with(move || drain_end(jobs))
    }

    /// A job's bitmaps and copies are sized for its nodes as they are.
    fn check_resize(&self, node: &Node) -> Result<(), crate::state::Busy> {
        super::registry::check_not_busy(node).map_err(|e| crate::state::Busy { reason: e.desc })
    }

    fn shutdown(&self, timeout: Duration) {
        cancel_all(timeout);
    }
}
