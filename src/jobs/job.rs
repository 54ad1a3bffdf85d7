//! One job: its state, the pause points and sleeps of its work, its
//! progress and events, and the thread its work runs on.

use std::cell::RefCell;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::ratelimit;
use super::state::JobVerb;
use super::state::{JobState, JobStatus};
use super::txn::{JobTxn, Member};
use crate::block::policy::{ErrorAction, OnError};
use crate::block::Node;

/// One job in the registry.
pub struct Job {
    pub id: String,
    /// qapi JobType: "create", "stream", "commit", "mirror", "backup".
    pub kind: &'static str,
    pub(super) state: Mutex<JobState>,
    pub(super) wake: Condvar,
    /// Block jobs are listed by query-block-jobs; create jobs are not.
    pub(super) block: bool,
    /// The nodes the job works on (drains of these pause it).
    pub(super) nodes: Mutex<Vec<Arc<Node>>>,
    pub(super) rate: Mutex<ratelimit::RateLimit>,
    /// The group of a transaction with completion-mode grouped.
    pub(super) txn: Mutex<Option<Arc<JobTxn>>>,
}

thread_local! {
    /// The job whose thread this is: its own drains do not wait for it.
    pub(super) static CURRENT_JOB: RefCell<Option<String>> = const { RefCell::new(None) };
}

impl Job {
    pub fn state(&self) -> MutexGuard<'_, JobState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Where the work stops while a pause is requested (job-pause, a
    /// drain). Returns false if the job was cancelled: the work should end.
    pub fn pause_point(&self) -> bool {
        let mut s = self.state();
        if s.pause_point_enter() {
            s.busy = false;
            self.wake.notify_all();
            while s.should_pause() {
                s = self.wake.wait(s).unwrap_or_else(|e| e.into_inner());
            }
            s.busy = true;
            s.pause_point_leave();
        }
        !s.is_cancelled()
    }

    /// Sleeps up to `d`, at rest (a drain need not wait), and wakes early
    /// for any command on the job; then passes a pause point. Returns
    /// false if the job was cancelled.
    pub fn sleep(&self, d: Duration) -> bool {
        let deadline = Instant::now() + d;
        {
            let mut s = self.state();
            let kicks = s.kicks;
            s.busy = false;
            self.wake.notify_all();
            while !s.is_cancelled() && s.kicks == kicks && !s.should_pause() {
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                s = self
                    .wake
                    .wait_timeout(s, deadline - now)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            s.busy = true;
        }
        self.pause_point()
    }

    /// After `n` bytes of work: sleeps as long as `speed` asks.
    pub fn rate_limit(&self, n: u64) -> bool {
        let speed = self.state().speed;
        let d = self
            .rate
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .delay(speed, Instant::now(), n);
        if d.is_zero() {
            return self.pause_point();
        }
        self.sleep(d)
    }

    /// Runs `f` (a graph change at the end of the work) under the
    /// monitor's command lock; the job is at rest while it waits for the
    /// lock, so a command that drains its nodes meanwhile does not wait
    /// for it.
    pub fn with_command_lock<R>(&self, state: &crate::state::State, f: impl FnOnce() -> R) -> R {
        self.state().busy = false;
        self.wake.notify_all();
        let _g = state.command_lock();
        self.state().busy = true;
        f()
    }

    pub fn is_cancelled(&self) -> bool {
        self.state().is_cancelled()
    }

    /// A cancelled member of a grouped transaction takes the others with
    /// it (and wakes any that wait to finalize).
    pub(super) fn cancel_group(&self) {
        let txn = self.txn.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(t) = txn {
            t.abort(self);
        }
    }

    /// Called before the work's graph changes: without auto-finalize the
    /// job waits in `pending` for job-finalize (BLOCK_JOB_PENDING), at
    /// rest. Returns false if it was cancelled instead.
    pub fn wait_finalize(&self) -> bool {
        let txn = self.txn.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(t) = txn {
            // A grouped transaction's jobs finalize together, at rest
            // while they wait for each other.
            self.state().busy = false;
            self.wake.notify_all();
            let together = t.arrive_and_wait();
            self.state().busy = true;
            if !together {
                let mut s = self.state();
                if !s.is_cancelled() {
                    let _ = s.cancel(true);
                }
                return false;
            }
        }
        let mut s = self.state();
        if s.auto_finalize || s.is_cancelled() {
            return !s.is_cancelled();
        }
        s.enter_pending();
        s.busy = false;
        self.wake.notify_all();
        while !s.finalize_requested() && !s.is_cancelled() {
            s = self.wake.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        s.busy = true;
        !s.is_cancelled()
    }

    pub(super) fn touches(&self, drained: &[&Node]) -> bool {
        self.nodes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|n| drained.iter().any(|d| n.reaches(d) || d.reaches(n)))
    }

    /// The job reached `ready` (mirror, active commit): BLOCK_JOB_READY.
    pub fn ready(&self) {
        let mut s = self.state();
        if s.status() != JobStatus::Running {
            return;
        }
        s.ready();
        crate::events::global().emit("BLOCK_JOB_READY", block_event(self.kind, &s));
    }

    /// An I/O error of the work: reported as BLOCK_JOB_ERROR and handled
    /// as `policy` says. With `stop` the job pauses itself and the caller
    /// retries once it passes its pause point again.
    pub fn io_error(
        &self,
        policy: OnError,
        write: bool,
        err: &crate::block::BlockError,
    ) -> ErrorAction {
        let nospace = err.errno() == libc::ENOSPC;
        let action = policy.action(nospace);
        crate::events::global().emit(
            "BLOCK_JOB_ERROR",
            json!({
                "device": self.id,
                "operation": if write { "write" } else { "read" },
                "action": action.name(),
            }),
        );
        log::warn!("job {}: {err} ({})", self.id, action.name());
        if action == ErrorAction::Stop {
            self.state()
                .error_pause(if nospace { "nospace" } else { "failed" });
        }
        action
    }

    /// Progress for query-jobs: `current` of `total` units done.
    pub fn progress(&self, current: u64, total: u64) {
        let mut s = self.state();
        s.progress_current = current;
        s.progress_total = total;
    }

    /// query-jobs' JobInfo.
    pub fn info(&self) -> Value {
        let s = self.state();
        let mut v = json!({
            "id": self.id,
            "type": self.kind,
            "status": s.status().name(),
            "current-progress": s.progress_current,
            "total-progress": s.progress_total,
        });
        if let Some(e) = s.error() {
            v["error"] = json!(e);
        }
        v
    }

    /// query-block-jobs' BlockJobInfo.
    pub fn block_info(&self) -> Value {
        let s = self.state();
        let mut v = json!({
            "type": self.kind,
            "device": self.id,
            "len": s.progress_total,
            "offset": s.progress_current,
            "busy": s.busy,
            "paused": s.is_paused(),
            "speed": s.speed,
            "io-status": s.io_status,
            "ready": matches!(s.status(), JobStatus::Ready | JobStatus::Standby),
            "status": s.status().name(),
            "auto-finalize": s.auto_finalize,
            "auto-dismiss": s.auto_dismiss,
        });
        if let Some(e) = s.error() {
            v["error"] = json!(e);
        }
        v
    }
}

/// The members BLOCK_JOB_READY, _COMPLETED and _CANCELLED share.
pub(super) fn block_event(kind: &str, s: &JobState) -> Value {
    json!({
        "type": kind,
        "device": s.id,
        "len": s.progress_total,
        "offset": s.progress_current,
        "speed": s.speed,
    })
}

impl Member for Job {
    fn joined(&self, txn: Arc<JobTxn>) {
        *self.txn.lock().unwrap_or_else(|e| e.into_inner()) = Some(txn);
    }

    fn cancel_for_group(&self) {
        let mut s = self.state();
        if JobVerb::Cancel.allowed_in(s.status()) && !s.is_cancelled() {
            let _ = s.cancel(true);
        }
        drop(s);
        self.wake.notify_all();
    }
}
