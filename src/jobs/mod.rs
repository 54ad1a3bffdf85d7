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

//!
//! Files by concern: [`job`] is one job and the thread its work runs on,
//! [`registry`] the process's jobs and the job-* verbs, [`txn`] the
//! grouped completion of a transaction's jobs, [`drain`] what drained
//! sections and shutdown ask of the jobs.

mod backup;
mod commit;
mod copy;
pub mod create;
mod drain;
mod drive_backup;
mod job;
mod mirror;
pub mod qmp;
mod ratelimit;
mod registry;
pub mod state;
mod stream;
mod txn;

pub use crate::block::policy::OnError;
pub use backup::{backup, backup_in, backup_source, BackupArgs};
pub use commit::{commit, CommitArgs};
pub use copy::users;
pub use drain::Participant;
pub use drive_backup::{drive_backup_in, drive_backup_source, DriveBackupArgs};
pub use job::Job;
pub use mirror::{drive_mirror, mirror, DriveMirrorArgs, MirrorArgs};
pub use registry::{
    cancel_block, check_id, check_not_busy, command, get, get_block, job_id, query, query_block,
    register, register_block, run_verb, set_speed, spawn, BlockJobOptions,
};
pub use state::{JobError, JobState, JobStatus, JobVerb};
pub use stream::{stream, StreamArgs};
pub use txn::JobTxn;

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::json;

    use super::*;
    use crate::block::Node;

    #[test]
    fn ids_are_checked_and_unique_and_jobs_leave_at_null() {
        assert!(register("1abc", "create", true, true).is_err());
        assert!(register("a b", "create", true, true).is_err());
        let j = register("reg-test.1", "create", true, false).unwrap();
        assert_eq!(
            register("reg-test.1", "create", true, true)
                .err()
                .unwrap()
                .desc,
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
            get("reg-test.1").err().unwrap().desc,
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
        assert!(drain::drain_begin(&[&*other]).is_empty());
        let held = drain::drain_begin(&[&*node]);
        assert_eq!(held.len(), 1);
        assert!(!j.state().busy, "the job rests while drained");
        let before = steps.load(std::sync::atomic::Ordering::SeqCst);
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(steps.load(std::sync::atomic::Ordering::SeqCst), before);
        assert_eq!(j.state().status(), JobStatus::Paused);
        drain::drain_end(held);
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
        spawn(bad.clone(), |_| {
            Err(crate::qapi::QmpError::generic("No space left on device"))
        });
        txn.seal();
        wait_for(&other, |s| s.status() == JobStatus::Concluded);
        assert!(other.state().is_cancelled());
        // The failed one reports its failure to the group before it
        // records it: wait until it has concluded too.
        wait_for(&bad, |s| s.status() == JobStatus::Concluded);
        assert_eq!(bad.state().error(), Some("No space left on device"));
        for id in ["grp-quick", "grp-slow", "grp-bad", "grp-other"] {
            command(JobVerb::Dismiss, id).unwrap();
        }
    }
}
