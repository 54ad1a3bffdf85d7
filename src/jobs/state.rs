//! The job model (QEMU's job.c, qapi/job.json): states, the transitions
//! between them, which commands each state accepts, and the lifecycle
//! bookkeeping every block job shares. The jobs themselves (stream,
//! commit, mirror, backup, create) build on this.
//!
//! ```text
//!   created --start--> running --work done--> waiting --> pending --> concluded --> null
//!      |                 |  ^ \--ready--> ready <--> standby            ^   (dismiss, or
//!      |                 v  |              |                            |    auto-dismiss)
//!      |               paused              +--complete--> waiting       |
//!      +-- cancel / error anywhere before concluded ---> aborting ------+
//! ```
//!
//! `waiting` is where a job of a transaction waits for the others;
//! `pending` is where a job without `auto-finalize` waits for
//! `job-finalize`; `concluded` keeps the result for `query-jobs` until
//! `job-dismiss` (without `auto-dismiss`). Every state change is reported
//! as JOB_STATUS_CHANGE.

use std::fmt;

/// A job's state (qapi JobStatus), in QEMU's order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobStatus {
    Undefined,
    Created,
    Running,
    Paused,
    Ready,
    Standby,
    Waiting,
    Pending,
    Aborting,
    Concluded,
    Null,
}

/// A management command on a job (qapi JobVerb).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobVerb {
    Cancel,
    Pause,
    Resume,
    SetSpeed,
    Complete,
    Finalize,
    Dismiss,
}

const N: usize = 11;

/// Allowed transitions, from (row) to (column), in JobStatus order.
#[rustfmt::skip]
const TRANSITIONS: [[u8; N]; N] = [
    //  U  C  R  P  Y  S  W  D  X  E  N
    [0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0], // undefined
    [0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 1], // created
    [0, 0, 0, 1, 1, 0, 1, 0, 1, 0, 0], // running
    [0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0], // paused
    [0, 0, 0, 0, 0, 1, 1, 0, 1, 0, 0], // ready
    [0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0], // standby
    [0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0], // waiting
    [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0], // pending
    [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0], // aborting
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1], // concluded
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], // null
];

/// Which states accept each verb, in JobVerb order.
#[rustfmt::skip]
const VERBS: [[u8; N]; 7] = [
    //  U  C  R  P  Y  S  W  D  X  E  N
    [0, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], // cancel
    [0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0], // pause
    [0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0], // resume
    [0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0], // set-speed
    [0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0], // complete (standby too, since QEMU 6.1)
    [0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], // finalize
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0], // dismiss
];

impl JobStatus {
    pub fn name(self) -> &'static str {
        match self {
            JobStatus::Undefined => "undefined",
            JobStatus::Created => "created",
            JobStatus::Running => "running",
            JobStatus::Paused => "paused",
            JobStatus::Ready => "ready",
            JobStatus::Standby => "standby",
            JobStatus::Waiting => "waiting",
            JobStatus::Pending => "pending",
            JobStatus::Aborting => "aborting",
            JobStatus::Concluded => "concluded",
            JobStatus::Null => "null",
        }
    }

    pub fn can_become(self, to: JobStatus) -> bool {
        TRANSITIONS[self as usize][to as usize] == 1
    }

    /// Whether the job's work is over (it may still be finalized).
    pub fn is_completed(self) -> bool {
        matches!(
            self,
            JobStatus::Waiting
                | JobStatus::Pending
                | JobStatus::Aborting
                | JobStatus::Concluded
                | JobStatus::Null
        )
    }
}

impl JobVerb {
    pub fn name(self) -> &'static str {
        match self {
            JobVerb::Cancel => "cancel",
            JobVerb::Pause => "pause",
            JobVerb::Resume => "resume",
            JobVerb::SetSpeed => "set-speed",
            JobVerb::Complete => "complete",
            JobVerb::Finalize => "finalize",
            JobVerb::Dismiss => "dismiss",
        }
    }

    pub fn allowed_in(self, s: JobStatus) -> bool {
        VERBS[self as usize][s as usize] == 1
    }
}

/// A command the job's state refuses, worded as QEMU words it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobError(pub String);

impl fmt::Display for JobError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for JobError {}

/// A verb the job's status refuses: a GenericError with QEMU's words.
impl From<JobError> for crate::qapi::QmpError {
    fn from(e: JobError) -> Self {
        crate::qapi::QmpError::generic(e.0)
    }
}

/// Hears a job's state changes (the daemon sends JOB_STATUS_CHANGE).
pub type OnChange = Box<dyn FnMut(&str, JobStatus) + Send>;

/// Hears a job conclude, just before `concluded` (block jobs send
/// BLOCK_JOB_COMPLETED or BLOCK_JOB_CANCELLED there, as QEMU does when it
/// finalizes a job).
pub type OnConclude = Box<dyn FnMut(&JobState) + Send>;

/// The lifecycle of one job: state, pause count, cancellation, result,
/// progress. `on_change` hears every state change (JOB_STATUS_CHANGE).
pub struct JobState {
    pub id: String,
    status: JobStatus,
    pub auto_finalize: bool,
    pub auto_dismiss: bool,
    /// Pauses requested (user and drains); the job stops at its next
    /// pause point while this is > 0.
    pause_count: u32,
    user_paused: bool,
    cancelled: bool,
    /// Set when the work ended with an error (or was cancelled).
    error: Option<String>,
    pub progress_current: u64,
    pub progress_total: u64,
    pub speed: u64,
    /// Working between pause points (holding node references, I/O in
    /// flight); a drain waits until this is false.
    pub busy: bool,
    /// block-job-complete was accepted.
    complete_requested: bool,
    /// Cancelled without `force` while ready: the job ends without its
    /// pivot, as a success (a mirror then leaves a consistent copy).
    soft_cancel: bool,
    /// qapi BlockDeviceIoStatus: "ok", "failed" or "nospace".
    pub io_status: &'static str,
    /// Bumped by every command that the work may be waiting for (pause,
    /// cancel, complete, set-speed), so that a sleeping job looks again.
    pub kicks: u64,
    /// The work waits in `pending` for job-finalize before its graph
    /// changes (auto-finalize off); set while it waits.
    waiting_finalize: bool,
    finalize_requested: bool,
    on_change: OnChange,
    on_conclude: Option<OnConclude>,
    on_pending: Option<OnConclude>,
}

impl JobState {
    /// A job in `created` (reported).
    pub fn new(id: &str, auto_finalize: bool, auto_dismiss: bool, on_change: OnChange) -> Self {
        let mut j = JobState {
            id: id.to_string(),
            status: JobStatus::Undefined,
            auto_finalize,
            auto_dismiss,
            pause_count: 0,
            user_paused: false,
            cancelled: false,
            error: None,
            progress_current: 0,
            progress_total: 0,
            speed: 0,
            busy: false,
            complete_requested: false,
            soft_cancel: false,
            io_status: "ok",
            kicks: 0,
            waiting_finalize: false,
            finalize_requested: false,
            on_change,
            on_conclude: None,
            on_pending: None,
        };
        j.set(JobStatus::Created);
        j
    }

    pub fn status(&self) -> JobStatus {
        self.status
    }

    pub fn set_on_conclude(&mut self, f: OnConclude) {
        self.on_conclude = Some(f);
    }

    /// Hears the job wait in `pending` for job-finalize (BLOCK_JOB_PENDING).
    pub fn set_on_pending(&mut self, f: OnConclude) {
        self.on_pending = Some(f);
    }

    /// The work is done but for its graph changes, which wait for
    /// job-finalize: waiting, then pending.
    pub fn enter_pending(&mut self) {
        self.set(JobStatus::Waiting);
        self.set(JobStatus::Pending);
        self.waiting_finalize = true;
        if let Some(mut f) = self.on_pending.take() {
            f(self);
        }
    }

    pub fn finalize_requested(&self) -> bool {
        self.finalize_requested
    }

    /// Whether the job is paused by a user or an error (block jobs'
    /// `paused`), or stopped at a pause point.
    pub fn is_paused(&self) -> bool {
        matches!(self.status, JobStatus::Paused | JobStatus::Standby) || self.user_paused
    }

    pub fn complete_requested(&self) -> bool {
        self.complete_requested
    }

    pub fn soft_cancel(&self) -> bool {
        self.soft_cancel
    }

    /// block-job-complete / job-complete: accepted when ready (or in
    /// standby), unless a cancel was asked for.
    pub fn complete(&mut self) -> Result<(), JobError> {
        self.check(JobVerb::Complete)?;
        if self.cancelled || self.soft_cancel {
            return Err(JobError(format!(
                "The active block job '{}' cannot be completed",
                self.id
            )));
        }
        self.complete_requested = true;
        self.kicks += 1;
        Ok(())
    }

    /// block-job-set-speed.
    pub fn set_speed(&mut self, speed: u64) -> Result<(), JobError> {
        self.check(JobVerb::SetSpeed)?;
        self.speed = speed;
        self.kicks += 1;
        Ok(())
    }

    /// An I/O error with the `stop` policy: the job pauses as if a user
    /// paused it, and block-job-resume retries.
    pub fn error_pause(&mut self, io_status: &'static str) {
        self.io_status = io_status;
        if !self.user_paused {
            self.user_paused = true;
            self.pause();
        }
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancelled
    }

    pub fn error(&self) -> Option<&str> {
        self.error.as_deref()
    }

    pub fn user_paused(&self) -> bool {
        self.user_paused
    }

    /// Whether the job must stop at its next pause point.
    pub fn should_pause(&self) -> bool {
        self.pause_count > 0 && !self.cancelled
    }

    fn set(&mut self, to: JobStatus) {
        assert!(
            self.status.can_become(to),
            "job {}: {} -> {} is not a transition of the job model",
            self.id,
            self.status.name(),
            to.name()
        );
        if self.status != to {
            self.status = to;
            (self.on_change)(&self.id, to);
        }
    }

    /// Refuses `verb` unless the current state accepts it.
    pub fn check(&self, verb: JobVerb) -> Result<(), JobError> {
        if verb.allowed_in(self.status) {
            Ok(())
        } else {
            Err(JobError(format!(
                "Job '{}' in state '{}' cannot accept command verb '{}'",
                self.id,
                self.status.name(),
                verb.name()
            )))
        }
    }

    pub fn start(&mut self) {
        self.set(JobStatus::Running);
    }

    /// The job reached the point where `complete` may pivot (mirror,
    /// active commit).
    pub fn ready(&mut self) {
        self.set(JobStatus::Ready);
    }

    /// At a pause point: if a pause is requested, moves to paused (or
    /// standby from ready) and returns true; the job then waits for
    /// `pause_point_leave`.
    pub fn pause_point_enter(&mut self) -> bool {
        if !self.should_pause() {
            return false;
        }
        let to = if self.status == JobStatus::Ready {
            JobStatus::Standby
        } else {
            JobStatus::Paused
        };
        self.set(to);
        true
    }

    /// Back from a pause to running (or ready from standby).
    pub fn pause_point_leave(&mut self) {
        let to = match self.status {
            JobStatus::Standby => JobStatus::Ready,
            JobStatus::Paused => JobStatus::Running,
            _ => return,
        };
        self.set(to);
    }

    /// An internal pause (a drain); undone by `resume`.
    pub fn pause(&mut self) {
        self.pause_count += 1;
    }

    /// Undoes a pause. The last one moves a paused job back to running
    /// (or standby to ready) at once, as QEMU's job_resume does; the work
    /// goes on when its thread wakes.
    pub fn resume(&mut self) {
        self.pause_count = self.pause_count.saturating_sub(1);
        if self.pause_count == 0 {
            self.pause_point_leave();
        }
    }

    /// job-pause / block-job-pause.
    pub fn user_pause(&mut self) -> Result<(), JobError> {
        self.check(JobVerb::Pause)?;
        if self.user_paused {
            return Err(JobError("Job is already paused".into()));
        }
        self.user_paused = true;
        self.pause();
        self.kicks += 1;
        Ok(())
    }

    /// job-resume / block-job-resume.
    pub fn user_resume(&mut self) -> Result<(), JobError> {
        if !self.user_paused || self.pause_count == 0 {
            return Err(JobError("Can't resume a job that was not paused".into()));
        }
        self.check(JobVerb::Resume)?;
        self.user_paused = false;
        self.io_status = "ok";
        self.resume();
        self.kicks += 1;
        Ok(())
    }

    /// job-cancel: the work stops at its next pause point, and the job ends
    /// through aborting. A job not started yet ends at once. Without
    /// `force`, a ready job (mirror, active commit) ends instead as a
    /// success without its pivot (QEMU's block-job-cancel semantics).
    pub fn cancel(&mut self, force: bool) -> Result<(), JobError> {
        self.check(JobVerb::Cancel)?;
        self.kicks += 1;
        if !force && matches!(self.status, JobStatus::Ready | JobStatus::Standby) {
            self.soft_cancel = true;
            return Ok(());
        }
        self.cancelled = true;
        if self.status == JobStatus::Created {
            self.error = Some("Operation canceled".into());
            self.set(JobStatus::Aborting);
            self.conclude();
        }
        Ok(())
    }

    /// The work ended, with `result`. Moves to waiting, then pending (and,
    /// with auto-finalize, through finalization).
    pub fn work_done(&mut self, result: Result<(), crate::qapi::QmpError>) {
        if let Err(e) = result {
            self.error = Some(e.desc);
        } else if self.cancelled {
            self.error = Some("Operation canceled".into());
        }
        if self.error.is_some() {
            self.set(JobStatus::Aborting);
            self.conclude();
            return;
        }
        if self.waiting_finalize {
            // Finalized already: the graph changes are made.
            self.conclude();
            return;
        }
        self.set(JobStatus::Waiting);
        self.set(JobStatus::Pending);
        if self.auto_finalize {
            self.conclude();
        }
    }

    /// job-finalize (without auto-finalize).
    pub fn finalize(&mut self) -> Result<(), JobError> {
        self.check(JobVerb::Finalize)?;
        if self.waiting_finalize {
            // The job's thread makes its graph changes, then concludes.
            self.finalize_requested = true;
            self.kicks += 1;
            return Ok(());
        }
        self.conclude();
        Ok(())
    }

    fn conclude(&mut self) {
        if let Some(mut f) = self.on_conclude.take() {
            f(self);
        }
        self.set(JobStatus::Concluded);
        if self.auto_dismiss {
            self.set(JobStatus::Null);
        }
    }

    /// job-dismiss (without auto-dismiss).
    pub fn dismiss(&mut self) -> Result<(), JobError> {
        self.check(JobVerb::Dismiss)?;
        self.set(JobStatus::Null);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    fn job(auto_finalize: bool, auto_dismiss: bool) -> (JobState, Arc<Mutex<Vec<&'static str>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let j = JobState::new(
            "j0",
            auto_finalize,
            auto_dismiss,
            Box::new(move |id, st| {
                assert_eq!(id, "j0");
                s.lock().unwrap().push(st.name());
            }),
        );
        (j, seen)
    }

    #[test]
    fn a_job_runs_to_null_with_every_change_reported() {
        let (mut j, seen) = job(true, true);
        j.start();
        j.progress_total = 10;
        j.progress_current = 10;
        j.work_done(Ok(()));
        assert_eq!(j.status(), JobStatus::Null);
        assert_eq!(
            *seen.lock().unwrap(),
            [
                "created",
                "running",
                "waiting",
                "pending",
                "concluded",
                "null"
            ]
        );
    }

    #[test]
    fn manual_finalize_and_dismiss_wait_for_their_commands() {
        let (mut j, seen) = job(false, false);
        j.start();
        assert_eq!(
            j.dismiss().unwrap_err().0,
            "Job 'j0' in state 'running' cannot accept command verb 'dismiss'"
        );
        j.work_done(Ok(()));
        assert_eq!(j.status(), JobStatus::Pending);
        assert!(j.user_pause().is_err(), "pending refuses pause");
        j.finalize().unwrap();
        assert_eq!(j.status(), JobStatus::Concluded);
        assert!(j.finalize().is_err());
        j.dismiss().unwrap();
        assert_eq!(j.status(), JobStatus::Null);
        assert_eq!(seen.lock().unwrap().last(), Some(&"null"));
    }

    #[test]
    fn pause_points_honour_user_and_internal_pauses() {
        let (mut j, seen) = job(true, true);
        j.start();
        assert!(!j.pause_point_enter());
        j.user_pause().unwrap();
        assert_eq!(j.user_pause().unwrap_err().0, "Job is already paused");
        assert!(j.pause_point_enter());
        assert_eq!(j.status(), JobStatus::Paused);
        // A drain pauses too; resuming the user pause is not enough.
        j.pause();
        j.user_resume().unwrap();
        assert!(j.should_pause());
        j.resume();
        assert!(!j.should_pause());
        j.pause_point_leave();
        assert_eq!(j.status(), JobStatus::Running);
        assert_eq!(
            j.user_resume().unwrap_err().0,
            "Can't resume a job that was not paused"
        );
        // Ready pauses into standby and comes back to ready.
        j.ready();
        j.user_pause().unwrap();
        assert!(j.pause_point_enter());
        assert_eq!(j.status(), JobStatus::Standby);
        j.user_resume().unwrap();
        j.pause_point_leave();
        assert_eq!(j.status(), JobStatus::Ready);
        assert_eq!(
            &seen.lock().unwrap()[1..],
            ["running", "paused", "running", "ready", "standby", "ready"]
        );
    }

    #[test]
    fn cancel_and_errors_end_through_aborting() {
        let (mut j, seen) = job(true, true);
        j.start();
        j.cancel(true).unwrap();
        assert!(j.is_cancelled() && !j.should_pause());
        j.work_done(Ok(()));
        assert_eq!(j.error(), Some("Operation canceled"));
        assert_eq!(
            *seen.lock().unwrap(),
            ["created", "running", "aborting", "concluded", "null"]
        );

        let (mut j, _) = job(true, false);
        j.start();
        j.work_done(Err(crate::qapi::QmpError::generic(
            "No space left on device",
        )));
        assert_eq!(j.status(), JobStatus::Concluded);
        assert_eq!(j.error(), Some("No space left on device"));
        assert!(j.cancel(true).is_err());

        // Cancelled before it started: straight to the end.
        let (mut j, seen) = job(true, true);
        j.cancel(true).unwrap();
        assert_eq!(j.status(), JobStatus::Null);
        assert_eq!(
            *seen.lock().unwrap(),
            ["created", "aborting", "concluded", "null"]
        );
    }

    #[test]
    fn complete_is_accepted_only_when_ready_or_standby() {
        let (mut j, _) = job(true, true);
        j.start();
        assert_eq!(
            j.check(JobVerb::Complete).unwrap_err().0,
            "Job 'j0' in state 'running' cannot accept command verb 'complete'"
        );
        j.ready();
        assert!(j.check(JobVerb::Complete).is_ok());
        // The tables agree with each other: every verb a state accepts
        // leads somewhere allowed.
        for s in [JobStatus::Concluded, JobStatus::Null, JobStatus::Aborting] {
            for v in [
                JobVerb::Pause,
                JobVerb::Cancel,
                JobVerb::Complete,
                JobVerb::SetSpeed,
            ] {
                assert!(!v.allowed_in(s), "{} in {}", v.name(), s.name());
            }
        }
        assert!(!JobStatus::Null.can_become(JobStatus::Created));
        assert!(JobStatus::Waiting.is_completed() && !JobStatus::Ready.is_completed());
    }

    #[test]
    fn cancel_without_force_when_ready_ends_as_a_success() {
        let (mut j, seen) = job(true, true);
        j.start();
        j.ready();
        j.cancel(false).unwrap();
        assert!(j.soft_cancel() && !j.is_cancelled());
        assert!(j.complete().is_err(), "a cancelled job cannot complete");
        j.work_done(Ok(()));
        assert_eq!(j.error(), None);
        assert_eq!(
            &seen.lock().unwrap()[1..],
            [
                "running",
                "ready",
                "waiting",
                "pending",
                "concluded",
                "null"
            ]
        );
        // While running, cancel is forced whatever the flag says.
        let (mut j, _) = job(true, true);
        j.start();
        j.cancel(false).unwrap();
        assert!(j.is_cancelled());
    }
}
