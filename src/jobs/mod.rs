//! Background jobs: the registry behind query-jobs and the job-* commands,
//! and the thread each job's work runs on.
//!
//! ```text
//!   QMP (blockdev-create, ...) --register--> Job (created) --spawn--> thread:
//!       start (running) -> pause point -> work -> work_done
//!         -> waiting -> pending [-> job-finalize] -> concluded [-> job-dismiss] -> null
//!   job-pause / job-resume / job-cancel / ... --> the Job's state, then a wake-up
//! ```
//!
//! A job's state sits under its own mutex; the job thread waits on a
//! condition variable at pause points. Jobs that reach `null` leave the
//! registry.
//!
//! Block jobs (stream, commit, mirror, backup) also name the nodes they
//! work on: a drained section of any of them pauses the job and waits
//! until it stands at a pause point (`busy` false), so that no job I/O
//! is in flight while the graph changes, as QEMU pauses jobs in drains.
//! Each job's thread is its own iothread: it does its I/O with the
//! synchronous engine, beside the exports' iothreads, and sleeps (not
//! spins) to keep to its `speed`.

mod backup;
mod commit;
mod copy;
pub mod create;
mod mirror;
pub mod qmp;
mod ratelimit;
pub mod state;
mod stream;

use std::cell::RefCell;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::block::Node;
pub use backup::{backup, backup_in, backup_source, BackupArgs};
pub use commit::{commit, CommitArgs};
pub use copy::{OnError, Users};
pub use mirror::{drive_mirror, mirror, DriveMirrorArgs, MirrorArgs};
pub use state::{JobError, JobState, JobStatus, JobVerb};
pub use stream::{stream, StreamArgs};

/// How long a drain waits for a job to reach a pause point.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// One job in the registry.
pub struct Job {
    pub id: String,
    /// qapi JobType: "create", "stream", "commit", "mirror", "backup".
    pub kind: &'static str,
    state: Mutex<JobState>,
    wake: Condvar,
    /// Block jobs are listed by query-block-jobs; create jobs are not.
    block: bool,
    /// The nodes the job works on (drains of these pause it).
    nodes: Mutex<Vec<Arc<Node>>>,
    rate: Mutex<ratelimit::RateLimit>,
    /// The group of a transaction with completion-mode grouped.
    txn: Mutex<Option<Arc<JobTxn>>>,
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
    fn abort(&self, failed: &Job) {
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
    fn arrive_and_wait(&self) -> bool {
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

thread_local! {
    /// The job whose thread this is: its own drains do not wait for it.
    static CURRENT_JOB: RefCell<Option<String>> = const { RefCell::new(None) };
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
    pub fn with_command_lock<R>(&self, state: &crate::daemon::State, f: impl FnOnce() -> R) -> R {
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
    fn cancel_group(&self) {
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

    fn touches(&self, drained: &[&Node]) -> bool {
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
    ) -> copy::ErrorAction {
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
        if action == copy::ErrorAction::Stop {
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
fn block_event(kind: &str, s: &JobState) -> Value {
    json!({
        "type": kind,
        "device": s.id,
        "len": s.progress_total,
        "offset": s.progress_current,
        "speed": s.speed,
    })
}

static REGISTRY: Mutex<Vec<Arc<Job>>> = Mutex::new(Vec::new());

fn registry() -> MutexGuard<'static, Vec<Arc<Job>>> {
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

/// QEMU's id_wellformed: a letter first, then letters, digits, '-', '.', '_'.
fn id_wellformed(id: &str) -> bool {
    let mut c = id.chars();
    c.next().is_some_and(|f| f.is_ascii_alphabetic())
        && c.all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '-' | '.' | '_'))
}

/// Registers a job in `created`, reporting every state change as
/// JOB_STATUS_CHANGE.
pub fn register(
    id: &str,
    kind: &'static str,
    auto_finalize: bool,
    auto_dismiss: bool,
) -> Result<Arc<Job>, String> {
    insert(id, kind, auto_finalize, auto_dismiss, None)
}

/// Options every block job takes (qapi: job-id, speed, auto-finalize,
/// auto-dismiss).
pub struct BlockJobOptions {
    pub id: String,
    pub speed: u64,
    pub auto_finalize: bool,
    pub auto_dismiss: bool,
}

/// Registers a block job: it sends BLOCK_JOB_COMPLETED (or _CANCELLED)
/// as it concludes, and works on `nodes`.
pub fn register_block(
    kind: &'static str,
    o: &BlockJobOptions,
    nodes: Vec<Arc<Node>>,
) -> Result<Arc<Job>, String> {
    insert(
        &o.id,
        kind,
        o.auto_finalize,
        o.auto_dismiss,
        Some((o.speed, nodes)),
    )
}

/// Refuses an id that is malformed or taken (before a job's set-up).
pub fn check_id(id: &str) -> Result<(), String> {
    if !id_wellformed(id) {
        return Err(format!("Invalid job ID '{id}'"));
    }
    if registry().iter().any(|j| j.id == id && live(j)) {
        return Err(format!("Job ID '{id}' already in use"));
    }
    Ok(())
}

fn insert(
    id: &str,
    kind: &'static str,
    auto_finalize: bool,
    auto_dismiss: bool,
    block: Option<(u64, Vec<Arc<Node>>)>,
) -> Result<Arc<Job>, String> {
    if !id_wellformed(id) {
        return Err(format!("Invalid job ID '{id}'"));
    }
    let mut reg = registry();
    reg.retain(|j| live(j));
    if reg.iter().any(|j| j.id == id) {
        return Err(format!("Job ID '{id}' already in use"));
    }
    let on_change = Box::new(|id: &str, st: JobStatus| {
        crate::events::global().emit("JOB_STATUS_CHANGE", json!({"id": id, "status": st.name()}));
    });
    let mut state = JobState::new(id, auto_finalize, auto_dismiss, on_change);
    let is_block = block.is_some();
    let mut nodes = Vec::new();
    if let Some((speed, n)) = block {
        state.speed = speed;
        nodes = n;
        state.set_on_pending(Box::new(move |s: &JobState| {
            crate::events::global().emit("BLOCK_JOB_PENDING", json!({"type": kind, "id": s.id}));
        }));
        state.set_on_conclude(Box::new(move |s: &JobState| {
            let mut v = block_event(kind, s);
            if s.is_cancelled() {
                crate::events::global().emit("BLOCK_JOB_CANCELLED", v);
            } else {
                if let Some(e) = s.error() {
                    v["error"] = json!(e);
                }
                crate::events::global().emit("BLOCK_JOB_COMPLETED", v);
            }
        }));
    }
    let job = Arc::new(Job {
        id: id.to_string(),
        kind,
        state: Mutex::new(state),
        wake: Condvar::new(),
        block: is_block,
        nodes: Mutex::new(nodes),
        rate: Mutex::new(ratelimit::RateLimit::default()),
        txn: Mutex::new(None),
    });
    reg.push(job.clone());
    Ok(job)
}

/// Runs `work` on a thread of its own: the job starts, passes a pause
/// point, works, and ends with the work's result.
pub fn spawn(job: Arc<Job>, work: impl FnOnce(&Job) -> Result<(), String> + Send + 'static) {
    job.state().start();
    let thread_job = job.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("job-{}", job.id))
        .spawn(move || {
            let job = thread_job;
            CURRENT_JOB.with(|c| *c.borrow_mut() = Some(job.id.clone()));
            job.state().busy = true;
            let result = if job.pause_point() {
                work(&job)
            } else {
                Ok(()) // cancelled before it began; work_done reports it
            };
            let failed = result.is_err() || job.is_cancelled();
            let txn = job.txn.lock().unwrap_or_else(|e| e.into_inner()).clone();
            if let (true, Some(t)) = (failed, &txn) {
                t.abort(&job);
            }
            {
                let mut s = job.state();
                s.busy = false;
                s.work_done(result);
            }
            job.nodes.lock().unwrap_or_else(|e| e.into_inner()).clear();
            job.wake.notify_all();
            reap();
        });
    if let Err(e) = spawned {
        job.state()
            .work_done(Err(format!("cannot start a thread for the job: {e}")));
        reap();
    }
}

/// Drops the jobs that reached `null`.
fn reap() {
    registry().retain(|j| j.state().status() != JobStatus::Null);
}

/// A job that reached `null` is gone, even before its thread reaped it.
fn live(j: &Job) -> bool {
    j.state().status() != JobStatus::Null
}

pub fn get(id: &str) -> Result<Arc<Job>, String> {
    registry()
        .iter()
        .find(|j| j.id == id && live(j))
        .cloned()
        .ok_or_else(|| format!("Job '{id}' not found"))
}

/// query-jobs.
pub fn query() -> Value {
    Value::Array(
        registry()
            .iter()
            .filter(|j| live(j))
            .map(|j| j.info())
            .collect(),
    )
}

/// query-block-jobs.
pub fn query_block() -> Value {
    Value::Array(
        registry()
            .iter()
            .filter(|j| j.block && live(j))
            .map(|j| j.block_info())
            .collect(),
    )
}

/// The block job `id` (block-job-* commands), or QEMU's error.
pub fn get_block(id: &str) -> Result<Arc<Job>, String> {
    registry()
        .iter()
        .find(|j| j.id == id && j.block && live(j))
        .cloned()
        .ok_or_else(|| format!("Block job '{id}' not found"))
}

/// The job-* commands: pause, resume, cancel, complete, finalize, dismiss.
pub fn command(verb: JobVerb, id: &str) -> Result<(), String> {
    run_verb(&*get(id)?, verb, true)
}

/// Applies `verb` to `job` (`force` matters for cancel only).
pub fn run_verb(job: &Job, verb: JobVerb, force: bool) -> Result<(), String> {
    let r = {
        let mut s = job.state();
        match verb {
            JobVerb::Pause => s.user_pause(),
            JobVerb::Resume => s.user_resume(),
            JobVerb::Cancel => s.cancel(force),
            JobVerb::Finalize => s.finalize(),
            JobVerb::Dismiss => s.dismiss(),
            JobVerb::Complete => s.complete(),
            JobVerb::SetSpeed => s.check(verb),
        }
    };
    job.wake.notify_all();
    if verb == JobVerb::Cancel && r.is_ok() && job.is_cancelled() {
        job.cancel_group();
    }
    reap();
    r.map_err(|e| e.0)
}

/// block-job-set-speed.
pub fn set_speed(id: &str, speed: i64) -> Result<(), String> {
    if speed < 0 {
        return Err("Parameter 'speed' expects a non-negative value".into());
    }
    let job = get_block(id)?;
    job.state().set_speed(speed as u64).map_err(|e| e.0)?;
    job.wake.notify_all();
    Ok(())
}

/// block-job-cancel: refused for a paused job unless forced, as QEMU.
pub fn cancel_block(id: &str, force: bool) -> Result<(), String> {
    let job = get_block(id)?;
    if job.state().user_paused() && !force {
        return Err(format!(
            "The block job for device '{id}' is currently paused"
        ));
    }
    run_verb(&job, JobVerb::Cancel, force)
}

/// Pauses every job (but the calling thread's own) that works on a node
/// below or above one of `nodes`, and waits until each is at rest: the
/// jobs' half of a drained section. [`drain_end`] resumes them.
pub fn drain_begin(nodes: &[&Node]) -> Vec<Arc<Job>> {
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
pub fn drain_end(jobs: Vec<Arc<Job>>) {
    for j in jobs {
        j.state().resume();
        j.wake.notify_all();
    }
}

/// Cancels every job (shutdown) and waits, up to `timeout`, until each
/// has ended: no job writes to a node once the daemon flushes and closes
/// them. QEMU's job_cancel_sync_all.
pub fn cancel_all(timeout: Duration) {
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

/// Refuses a node another block job works on (QEMU's op blockers).
pub fn check_not_busy(node: &Node) -> Result<(), String> {
    for j in registry().iter().filter(|j| j.block && live(j)) {
        let uses = j
            .nodes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|n| std::ptr::eq(&**n, node));
        if uses {
            return Err(format!(
                "Node '{}' is busy: block device is in use by block job: {}",
                node.name(),
                j.kind
            ));
        }
    }
    Ok(())
}

/// The job-id of a block job: the given one, or the device's name.
pub fn job_id(given: Option<&str>, device: &str) -> String {
    given.unwrap_or(device).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked_and_unique_and_jobs_leave_at_null() {
        assert!(register("1abc", "create", true, true).is_err());
        assert!(register("a b", "create", true, true).is_err());
        let j = register("reg-test.1", "create", true, false).unwrap();
        assert_eq!(
            register("reg-test.1", "create", true, true).err().unwrap(),
            "Job ID 'reg-test.1' already in use"
        );
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        command(JobVerb::Pause, "reg-test.1").unwrap();
        spawn(j.clone(), move |job| {
            job.progress(1, 2);
            rx.recv().ok();
            job.progress(2, 2);
            Ok(())
        });
        // Paused at the first pause point: the work has not begun.
        for _ in 0..200 {
            if j.state().status() == JobStatus::Paused {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(j.state().status(), JobStatus::Paused);
        assert_eq!(j.info()["current-progress"], 0);
        command(JobVerb::Resume, "reg-test.1").unwrap();
        tx.send(()).unwrap();
        for _ in 0..200 {
            if j.state().status() == JobStatus::Concluded {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(j.info()["status"], "concluded");
        assert_eq!(j.info()["current-progress"], 2);
        assert!(get("reg-test.1").is_ok(), "kept until dismissed");
        command(JobVerb::Dismiss, "reg-test.1").unwrap();
        assert_eq!(
            get("reg-test.1").err().unwrap(),
            "Job 'reg-test.1' not found"
        );
    }

    fn null_node(name: &str) -> Arc<Node> {
        let mut g = crate::block::Graph::new();
        let o = crate::drivers::BlockdevOptions::from_json(json!({
            "driver": "null-co", "node-name": name, "size": 1 << 20
        }))
        .unwrap();
        g.add(&o).unwrap()
    }

    fn wait_for(j: &Job, what: impl Fn(&JobState) -> bool) {
        for _ in 0..500 {
            if what(&j.state()) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("job {} never got there: {}", j.id, j.info());
    }

    #[test]
    fn a_drain_of_a_jobs_node_waits_for_it_to_rest_and_holds_it() {
        let node = null_node("drain-n0");
        let other = null_node("drain-n1");
        let o = BlockJobOptions {
            id: "drain-test".into(),
            speed: 0,
            auto_finalize: true,
            auto_dismiss: true,
        };
        let j = register_block("stream", &o, vec![node.clone()]).unwrap();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let steps = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let s2 = steps.clone();
        spawn(j.clone(), move |job| {
            while stop_rx.try_recv().is_err() {
                if !job.pause_point() {
                    break;
                }
                s2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            Ok(())
        });
        wait_for(&j, |s| s.status() == JobStatus::Running);
        // A drain of another node leaves the job alone.
        assert!(drain_begin(&[&*other]).is_empty());
        let held = drain_begin(&[&*node]);
        assert_eq!(held.len(), 1);
        assert!(!j.state().busy, "the job rests while drained");
        let before = steps.load(std::sync::atomic::Ordering::SeqCst);
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(steps.load(std::sync::atomic::Ordering::SeqCst), before);
        assert_eq!(j.state().status(), JobStatus::Paused);
        drain_end(held);
        assert_eq!(j.state().status(), JobStatus::Running);
        wait_for(&j, |_| {
            steps.load(std::sync::atomic::Ordering::SeqCst) > before
        });
        stop_tx.send(()).unwrap();
        wait_for(&j, |s| s.status() == JobStatus::Null);
    }

    #[test]
    fn without_auto_finalize_the_work_waits_in_pending_for_finalize() {
        let o = BlockJobOptions {
            id: "pending-test".into(),
            speed: 0,
            auto_finalize: false,
            auto_dismiss: false,
        };
        let j = register_block("commit", &o, Vec::new()).unwrap();
        let changed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let c2 = changed.clone();
        spawn(j.clone(), move |job| {
            if job.wait_finalize() {
                c2.store(true, std::sync::atomic::Ordering::SeqCst);
            }
            Ok(())
        });
        wait_for(&j, |s| s.status() == JobStatus::Pending);
        assert!(!changed.load(std::sync::atomic::Ordering::SeqCst));
        command(JobVerb::Finalize, "pending-test").unwrap();
        wait_for(&j, |s| s.status() == JobStatus::Concluded);
        assert!(changed.load(std::sync::atomic::Ordering::SeqCst));
        command(JobVerb::Dismiss, "pending-test").unwrap();
    }

    #[test]
    fn a_rate_limited_job_sleeps_and_wakes_for_a_cancel() {
        let o = BlockJobOptions {
            id: "speed-test".into(),
            speed: 1,
            auto_finalize: true,
            auto_dismiss: false,
        };
        let j = register_block("backup", &o, Vec::new()).unwrap();
        spawn(j.clone(), move |job| {
            // One byte per second: this chunk asks for a very long sleep.
            while job.rate_limit(1 << 20) {}
            Ok(())
        });
        wait_for(&j, |s| s.status() == JobStatus::Running && !s.busy);
        cancel_block("speed-test", true).unwrap();
        wait_for(&j, |s| s.status() == JobStatus::Concluded);
        assert_eq!(j.info()["error"], "Operation canceled");
        command(JobVerb::Dismiss, "speed-test").unwrap();
    }

    #[test]
    fn grouped_jobs_finalize_together_and_fail_together() {
        let opts = |id: &str| BlockJobOptions {
            id: id.into(),
            speed: 0,
            auto_finalize: true,
            auto_dismiss: false,
        };
        // Success: the quick one waits for the slow one before it ends.
        let txn = Arc::new(JobTxn::default());
        let quick = register_block("backup", &opts("grp-quick"), Vec::new()).unwrap();
        let slow = register_block("backup", &opts("grp-slow"), Vec::new()).unwrap();
        txn.add(&quick);
        txn.add(&slow);
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        spawn(quick.clone(), |job| {
            assert!(job.wait_finalize());
            Ok(())
        });
        spawn(slow.clone(), move |job| {
            go_rx.recv().ok();
            assert!(job.wait_finalize());
            Ok(())
        });
        txn.seal();
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(
            quick.state().status(),
            JobStatus::Running,
            "waits for its group"
        );
        go_tx.send(()).unwrap();
        wait_for(&quick, |s| s.status() == JobStatus::Concluded);
        wait_for(&slow, |s| s.status() == JobStatus::Concluded);
        assert!(quick.state().error().is_none() && slow.state().error().is_none());

        // Failure: one fails, the other (still working) is cancelled.
        let txn = Arc::new(JobTxn::default());
        let bad = register_block("backup", &opts("grp-bad"), Vec::new()).unwrap();
        let other = register_block("backup", &opts("grp-other"), Vec::new()).unwrap();
        txn.add(&bad);
        txn.add(&other);
        spawn(other.clone(), |job| {
            while job.sleep(std::time::Duration::from_millis(5)) {}
            Ok(())
        });
        spawn(bad.clone(), |_| Err("No space left on device".into()));
        txn.seal();
        wait_for(&other, |s| s.status() == JobStatus::Concluded);
        assert!(other.state().is_cancelled());
        assert_eq!(bad.state().error(), Some("No space left on device"));
        for id in ["grp-quick", "grp-slow", "grp-bad", "grp-other"] {
            command(JobVerb::Dismiss, id).unwrap();
        }
    }
}
