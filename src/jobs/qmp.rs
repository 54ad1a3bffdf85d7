//! QMP handlers of the job commands: blockdev-create, the block jobs
//! (block-stream, block-commit, blockdev-mirror, drive-mirror,
//! blockdev-backup), the block-job-* and job-* verbs, query-jobs and
//! query-block-jobs.
//!
//! The classes come with the errors: the job layer says DeviceNotActive
//! for a missing block job (registry::get_block) and DeviceNotFound for
//! block-commit's unknown device; nothing here reads an error's text.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::Value;

use super::JobVerb;
use crate::opts;
use crate::qapi::{CommandDef, QmpError};
use crate::state::State;

pub static COMMANDS: &[CommandDef<Arc<State>>] = &[
    crate::command!("blockdev-create", blockdev_create),
    crate::command!("query-jobs", query_jobs, no_args),
    crate::command!("query-block-jobs", query_block_jobs, no_args),
    crate::command!("block-stream", block_stream),
    crate::command!("block-commit", block_commit),
    crate::command!("blockdev-mirror", blockdev_mirror),
    crate::command!("drive-mirror", drive_mirror),
    crate::command!("blockdev-backup", blockdev_backup),
    crate::command!("drive-backup", drive_backup),
    crate::command!("block-job-set-speed", block_job_set_speed),
    crate::command!("block-job-pause", block_job_pause),
    crate::command!("block-job-resume", block_job_resume),
    crate::command!("block-job-cancel", block_job_cancel),
    crate::command!("block-job-complete", block_job_complete),
    crate::command!("block-job-finalize", block_job_finalize),
    crate::command!("block-job-dismiss", block_job_dismiss),
    crate::command!("job-pause", job_pause),
    crate::command!("job-resume", job_resume),
    crate::command!("job-cancel", job_cancel),
    crate::command!("job-complete", job_complete),
    crate::command!("job-finalize", job_finalize),
    crate::command!("job-dismiss", job_dismiss),
];

fn blockdev_create(state: &Arc<State>, a: super::create::CreateArgs) -> Result<(), QmpError> {
    let work = super::create::Work::parse(a.options, &state.graph())?;
    let job = super::register(&a.job_id, "create", true, false)?;
    let st = state.clone();
    super::spawn(job, move |job| work.run(job, &st));
    Ok(())
}

fn query_jobs(_: &Arc<State>) -> Result<Value, QmpError> {
    Ok(super::query())
}

fn query_block_jobs(_: &Arc<State>) -> Result<Value, QmpError> {
    Ok(super::query_block())
}

fn block_stream(state: &Arc<State>, a: super::StreamArgs) -> Result<(), QmpError> {
    super::stream(state, a)
}

fn block_commit(state: &Arc<State>, a: super::CommitArgs) -> Result<(), QmpError> {
    super::commit(state, a)
}

fn blockdev_mirror(state: &Arc<State>, a: super::MirrorArgs) -> Result<(), QmpError> {
    super::mirror(state, a)
}

fn drive_mirror(state: &Arc<State>, a: super::DriveMirrorArgs) -> Result<(), QmpError> {
    super::drive_mirror(state, a)
}

fn blockdev_backup(state: &Arc<State>, a: super::BackupArgs) -> Result<(), QmpError> {
    super::backup(state, a).map(drop)
}

/// drive-backup: a transaction of one action, as QEMU runs it (the
/// target is created and the job started in one drained section).
fn drive_backup(state: &Arc<State>, a: super::DriveBackupArgs) -> Result<(), QmpError> {
    crate::transaction::transaction(state, vec![crate::transaction::Action::DriveBackup(a)])
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct BlockJobSpeed {
    device: String,
    speed: i64,
}

fn block_job_set_speed(_: &Arc<State>, a: BlockJobSpeed) -> Result<(), QmpError> {
    super::set_speed(&a.device, a.speed)
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct BlockJobCancel {
    device: String,
    #[serde(default, deserialize_with = "opts::bool")]
    force: bool,
}

fn block_job_cancel(_: &Arc<State>, a: BlockJobCancel) -> Result<(), QmpError> {
    super::cancel_block(&a.device, a.force)
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct BlockJobDevice {
    device: String,
}

fn block_job_verb(id: &str, verb: JobVerb) -> Result<(), QmpError> {
    let job = super::get_block(id)?;
    super::run_verb(&job, verb, false)
}

fn block_job_pause(_: &Arc<State>, a: BlockJobDevice) -> Result<(), QmpError> {
    block_job_verb(&a.device, JobVerb::Pause)
}

fn block_job_resume(_: &Arc<State>, a: BlockJobDevice) -> Result<(), QmpError> {
    block_job_verb(&a.device, JobVerb::Resume)
}

fn block_job_complete(_: &Arc<State>, a: BlockJobDevice) -> Result<(), QmpError> {
    block_job_verb(&a.device, JobVerb::Complete)
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct JobId {
    id: String,
}

fn block_job_finalize(_: &Arc<State>, a: JobId) -> Result<(), QmpError> {
    block_job_verb(&a.id, JobVerb::Finalize)
}

fn block_job_dismiss(_: &Arc<State>, a: JobId) -> Result<(), QmpError> {
    block_job_verb(&a.id, JobVerb::Dismiss)
}

/// The job-* commands name any job; all their failures are GenericErrors.
fn job_verb(id: &str, verb: JobVerb) -> Result<(), QmpError> {
    super::command(verb, id)
}

fn job_pause(_: &Arc<State>, a: JobId) -> Result<(), QmpError> {
    job_verb(&a.id, JobVerb::Pause)
}

fn job_resume(_: &Arc<State>, a: JobId) -> Result<(), QmpError> {
    job_verb(&a.id, JobVerb::Resume)
}

fn job_cancel(_: &Arc<State>, a: JobId) -> Result<(), QmpError> {
    job_verb(&a.id, JobVerb::Cancel)
}

fn job_complete(_: &Arc<State>, a: JobId) -> Result<(), QmpError> {
    job_verb(&a.id, JobVerb::Complete)
}

fn job_finalize(_: &Arc<State>, a: JobId) -> Result<(), QmpError> {
    job_verb(&a.id, JobVerb::Finalize)
}

fn job_dismiss(_: &Arc<State>, a: JobId) -> Result<(), QmpError> {
    job_verb(&a.id, JobVerb::Dismiss)
}
