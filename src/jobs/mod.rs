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

pub mod create;
pub mod state;

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use serde_json::{json, Value};

pub use state::{JobError, JobState, JobStatus, JobVerb};

/// One job in the registry.
pub struct Job {
    pub id: String,
    /// qapi JobType: "create", "stream", "commit", "mirror", "backup".
    pub kind: &'static str,
    state: Mutex<JobState>,
    wake: Condvar,
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
            while s.should_pause() {
                s = self.wake.wait(s).unwrap_or_else(|e| e.into_inner());
            }
            s.pause_point_leave();
        }
        !s.is_cancelled()
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
    if !id_wellformed(id) {
        return Err(format!("Invalid job ID '{id}'"));
    }
    let mut reg = registry();
    if reg.iter().any(|j| j.id == id) {
        return Err(format!("Job ID '{id}' already in use"));
    }
    let on_change = Box::new(|id: &str, st: JobStatus| {
        crate::events::global().emit("JOB_STATUS_CHANGE", json!({"id": id, "status": st.name()}));
    });
    let job = Arc::new(Job {
        id: id.to_string(),
        kind,
        state: Mutex::new(JobState::new(id, auto_finalize, auto_dismiss, on_change)),
        wake: Condvar::new(),
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
            let result = if job.pause_point() {
                work(&job)
            } else {
                Ok(()) // cancelled before it began; work_done reports it
            };
            job.state().work_done(result);
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

pub fn get(id: &str) -> Result<Arc<Job>, String> {
    registry()
        .iter()
        .find(|j| j.id == id)
        .cloned()
        .ok_or_else(|| format!("Job '{id}' not found"))
}

/// query-jobs.
pub fn query() -> Value {
    Value::Array(registry().iter().map(|j| j.info()).collect())
}

/// The job-* commands: pause, resume, cancel, complete, finalize, dismiss.
pub fn command(verb: JobVerb, id: &str) -> Result<(), String> {
    let job = get(id)?;
    let r = {
        let mut s = job.state();
        match verb {
            JobVerb::Pause => s.user_pause(),
            JobVerb::Resume => s.user_resume(),
            JobVerb::Cancel => s.cancel(),
            JobVerb::Finalize => s.finalize(),
            JobVerb::Dismiss => s.dismiss(),
            // No job of ours reaches `ready` yet, and the state table
            // refuses complete in every other state.
            JobVerb::Complete | JobVerb::SetSpeed => s.check(verb),
        }
    };
    job.wake.notify_all();
    reap();
    r.map_err(|e| e.0)
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
}
