//! The process's jobs (query-jobs, the job-* and block-job-* verbs), and
//! the op blocker that refuses a node a block job works on.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use serde_json::{json, Value};

use super::job::{block_event, Job, CURRENT_JOB};
use super::ratelimit;
use super::state::{JobState, JobStatus, JobVerb};
use crate::block::Node;
use crate::qapi::QmpError;

static REGISTRY: Mutex<Vec<Arc<Job>>> = Mutex::new(Vec::new());

pub(super) fn registry() -> MutexGuard<'static, Vec<Arc<Job>>> {
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
) -> Result<Arc<Job>, QmpError> {
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
) -> Result<Arc<Job>, QmpError> {
    insert(
        &o.id,
        kind,
        o.auto_finalize,
        o.auto_dismiss,
        Some((o.speed, nodes)),
    )
}

/// Refuses an id that is malformed or taken (before a job's set-up).
pub fn check_id(id: &str) -> Result<(), QmpError> {
    if !id_wellformed(id) {
        return Err(QmpError::generic(format!("Invalid job ID '{id}'")));
    }
    if registry().iter().any(|j| j.id == id && live(j)) {
        return Err(QmpError::generic(format!("Job ID '{id}' already in use")));
    }
    Ok(())
}

fn insert(
    id: &str,
    kind: &'static str,
    auto_finalize: bool,
    auto_dismiss: bool,
    block: Option<(u64, Vec<Arc<Node>>)>,
) -> Result<Arc<Job>, QmpError> {
    if !id_wellformed(id) {
        return Err(QmpError::generic(format!("Invalid job ID '{id}'")));
    }
    let mut reg = registry();
    reg.retain(|j| live(j));
    if reg.iter().any(|j| j.id == id) {
        return Err(QmpError::generic(format!("Job ID '{id}' already in use")));
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

/// Drops the jobs that reached `null`.
pub(super) fn reap() {
    registry().retain(|j| j.state().status() != JobStatus::Null);
}

/// A job that reached `null` is gone, even before its thread reaped it.
pub(super) fn live(j: &Job) -> bool {
    j.state().status() != JobStatus::Null
}

pub fn get(id: &str) -> Result<Arc<Job>, QmpError> {
    registry()
        .iter()
        .find(|j| j.id == id && live(j))
        .cloned()
        .ok_or_else(|| QmpError::generic(format!("Job '{id}' not found")))
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
pub fn get_block(id: &str) -> Result<Arc<Job>, QmpError> {
    registry()
        .iter()
        .find(|j| j.id == id && j.block && live(j))
        .cloned()
        .ok_or_else(|| QmpError::not_active(format!("Block job '{id}' not found")))
}

/// The job-* commands: pause, resume, cancel, complete, finalize, dismiss.
pub fn command(verb: JobVerb, id: &str) -> Result<(), QmpError> {
    run_verb(&*get(id)?, verb, true)
}

/// Applies `verb` to `job` (`force` matters for cancel only).
pub fn run_verb(job: &Job, verb: JobVerb, force: bool) -> Result<(), QmpError> {
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
    Ok(r?)
}

/// block-job-set-speed.
pub fn set_speed(id: &str, speed: i64) -> Result<(), QmpError> {
    if speed < 0 {
        return Err(QmpError::generic(
            "Parameter 'speed' expects a non-negative value",
        ));
    }
    let job = get_block(id)?;
    job.state().set_speed(speed as u64)?;
    job.wake.notify_all();
    Ok(())
}

/// block-job-cancel: refused for a paused job unless forced, as QEMU.
pub fn cancel_block(id: &str, force: bool) -> Result<(), QmpError> {
    let job = get_block(id)?;
    if job.state().user_paused() && !force {
        return Err(QmpError::generic(format!(
            "The block job for device '{id}' is currently paused"
        )));
    }
    run_verb(&job, JobVerb::Cancel, force)
}

/// Refuses a node another block job works on (QEMU's op blockers).
pub fn check_not_busy(node: &Node) -> Result<(), QmpError> {
    for j in registry().iter().filter(|j| j.block && live(j)) {
        let uses = j
            .nodes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|n| std::ptr::eq(&**n, node));
        if uses {
            return Err(QmpError::generic(format!(
                "Node '{}' is busy: block device is in use by block job: {}",
                node.name(),
                j.kind
            )));
        }
    }
    Ok(())
}

/// The job-id of a block job: the given one, or the device's name.
pub fn job_id(given: Option<&str>, device: &str) -> String {
    given.unwrap_or(device).to_string()
}

/// Runs `work` on a thread of its own: the job starts, passes a pause
/// point, works, and ends with the work's result.
pub fn spawn(job: Arc<Job>, work: impl FnOnce(&Job) -> Result<(), QmpError> + Send + 'static) {
    job.state().start();
    let thread_job = job.clone();
    let spawned = crate::sandbox::spawn(
        crate::sandbox::Class::Job,
        format!("job-{}", job.id),
        move || {
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
                t.abort(&*job);
            }
            {
                let mut s = job.state();
                s.busy = false;
                s.work_done(result);
            }
            job.nodes.lock().unwrap_or_else(|e| e.into_inner()).clear();
            job.wake.notify_all();
            reap();
        },
    );
    if let Err(e) = spawned {
        job.state().work_done(Err(QmpError::generic(format!(
            "cannot start a thread for the job: {e}"
        ))));
        reap();
    }
}
