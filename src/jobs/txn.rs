//! Jobs started by one `transaction` with completion-mode `grouped`.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use super::job::Job;
use super::state::JobVerb;

/// Jobs started by one `transaction` with completion-mode `grouped`
/// (QEMU's JobTxn): they finalize together once all have done their work,
/// and when one fails or is cancelled, the others are cancelled.
#[derive(Default)]
pub struct JobTxn {
    state: Mutex<TxnState>,
    changed: Condvar,
}

#[derive(Default)]
struct TxnState {
    members: Vec<Arc<Job>>,
    /// Members whose work is done and that wait to finalize.
    arrived: usize,
    aborting: bool,
    /// Every member has been added (the transaction's jobs all started).
    sealed: bool,
}

impl JobTxn {
    fn lock(&self) -> MutexGuard<'_, TxnState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes `job` a member (before it starts).
    pub fn add(self: &Arc<Self>, job: &Arc<Job>) {
        self.lock().members.push(job.clone());
        *job.txn.lock().unwrap_or_else(|e| e.into_inner()) = Some(self.clone());
    }

    /// All members are in: they may finalize once all are done.
    pub fn seal(&self) {
        self.lock().sealed = true;
        self.changed.notify_all();
    }

    /// The transaction failed after some members started: they are all
    /// cancelled.
    pub fn cancel_all(&self) {
        let members = self.lock().members.clone();
        if let Some(first) = members.first() {
            let mut s = first.state();
            if JobVerb::Cancel.allowed_in(s.status()) && !s.is_cancelled() {
                let _ = s.cancel(true);
            }
            drop(s);
            first.wake.notify_all();
            self.abort(first);
        }
    }

    /// A member failed or was cancelled: every other member is cancelled.
    pub(super) fn abort(&self, failed: &Job) {
        let members = {
            let mut t = self.lock();
            if t.aborting {
                return;
            }
            t.aborting = true;
            t.members.clone()
        };
        self.changed.notify_all();
        for m in members.iter().filter(|m| !std::ptr::eq(&***m, failed)) {
            let mut s = m.state();
            if JobVerb::Cancel.allowed_in(s.status()) && !s.is_cancelled() {
                let _ = s.cancel(true);
            }
            drop(s);
            m.wake.notify_all();
        }
    }

    /// A member's work is done: waits until every member's is, or the
    /// group aborts. Returns false when it aborted.
    pub(super) fn arrive_and_wait(&self) -> bool {
        let mut t = self.lock();
        t.arrived += 1;
        self.changed.notify_all();
        let all_done = |t: &TxnState| t.sealed && t.arrived >= t.members.len();
        while !t.aborting && !all_done(&t) {
            t = self.changed.wait(t).unwrap_or_else(|e| e.into_inner());
        }
        !t.aborting
    }
}
