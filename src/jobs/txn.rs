//! Jobs started by one `transaction` with completion-mode `grouped`.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// What a group asks of its members (block jobs): this file names no
/// job type.
pub trait Member: Send + Sync {
    /// The member joined `txn` (it reports its failure to it).
    fn joined(&self, txn: Arc<JobTxn>);

    /// Cancels the member (forced), where it can still be cancelled, and
    /// wakes it.
    fn cancel_for_group(&self);
}

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
    members: Vec<Arc<dyn Member>>,
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
    pub fn add<M: Member + 'static>(self: &Arc<Self>, job: &Arc<M>) {
        self.lock().members.push(job.clone());
        job.joined(self.clone());
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
            first.cancel_for_group();
            self.abort(&**first);
        }
    }

    /// A member failed or was cancelled: every other member is cancelled.
    pub(super) fn abort(&self, failed: &dyn Member) {
        let members = {
            let mut t = self.lock();
            if t.aborting {
                return;
            }
            t.aborting = true;
            t.members.clone()
        };
        self.changed.notify_all();
        let failed: *const dyn Member = failed;
        for m in members
            .iter()
            .filter(|m| !std::ptr::addr_eq(Arc::as_ptr(m), failed))
        {
            m.cancel_for_group();
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
