//! blockdev-backup: a point-in-time copy of a node to a target while the
//! guest keeps writing (copy-before-write), in full, of the top image
//! only, of nothing but what is overwritten (sync=none), or of what a
//! dirty bitmap says changed (incremental / bitmap).
//!
//! ```text
//!   command (drained): "to copy" bitmap for the sync mode, hook on source
//!   guest write to a cluster still to copy -> copy the old data to the
//!        target first, then let the write go
//!   job thread: copy every cluster still to copy (sync=none: none; the
//!        job then waits for block-job-cancel)
//! ```
//!
//! A range lock serialises the hook's copies with the job's, so each
//! cluster is copied once, before anything overwrites it. A failed
//! copy-before-write does not fail the guest's write (the guest's data
//! comes first); it fails the backup, whose point in time is broken.

use std::sync::{Arc, Mutex};

use serde::Deserialize;

use super::copy;
use super::mirror::SyncMode;
use super::OnError;
use super::{BlockJobOptions, Job};
use crate::block::bitmap::DirtyBitmap;
use crate::block::hooks::{ReadHook, WriteHook, WriteOp};
use crate::block::ranges::RangeLock;
use crate::block::{BlockError, BlockFuture, Child, Node};
use crate::io::IoVecs;
use crate::qapi::QmpError;
use crate::state::State;

fn yes() -> bool {
    true
}

/// qapi BitmapSyncMode.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BitmapMode {
    #[default]
    OnSuccess,
    Always,
    Never,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BackupArgs {
    pub job_id: Option<String>,
    pub device: String,
    pub target: String,
    pub sync: SyncMode,
    #[serde(default)]
    pub speed: i64,
    pub bitmap: Option<String>,
    pub bitmap_mode: Option<BitmapMode>,
    #[serde(default)]
    pub compress: bool,
    #[serde(default)]
    pub on_source_error: OnError,
    #[serde(default)]
    pub on_target_error: OnError,
    #[serde(default = "yes")]
    pub auto_finalize: bool,
    #[serde(default = "yes")]
    pub auto_dismiss: bool,
    pub filter_node_name: Option<String>,
    pub discard_source: Option<bool>,
    pub x_perf: Option<BackupPerf>,
}

/// qapi BackupPerf (x-perf): checked as QEMU checks it; this daemon's copy
/// loop has one worker and copies a cluster at a time, so the values
/// change nothing.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BackupPerf {
    pub use_copy_range: Option<bool>,
    pub max_workers: Option<i64>,
    pub max_chunk: Option<i64>,
}

impl BackupPerf {
    fn check(&self) -> Result<(), QmpError> {
        if self
            .max_workers
            .is_some_and(|w| w < 1 || w > i64::from(i32::MAX))
        {
            return Err(QmpError::generic(format!(
                "max-workers must be between 1 and {}",
                i32::MAX
            )));
        }
        if self.max_chunk.is_some_and(|c| c < 0) {
            return Err(QmpError::generic(
                "max-chunk must be zero (which means no limit) or positive",
            ));
        }
        Ok(())
    }
}

struct CbwHook {
    /// Clusters not yet copied to the target.
    todo: DirtyBitmap,
    ranges: RangeLock,
    target: Arc<Node>,
    /// The first copy-before-write failure (it fails the job).
    failed: Mutex<Option<String>>,
}

impl CbwHook {
    /// Copies the clusters of `[start, end)` still to copy, with the range
    /// held by the caller.
    async fn copy_out(&self, source: &Node, start: u64, end: u64) -> Result<u64, BlockError> {
        let cs = self.todo.granularity();
        let size = self.todo.size();
        let mut done = 0;
        let mut off = start;
        while off < end.min(size) {
            let n = cs.min(size - off);
            if self.todo.is_dirty(off) {
                let (iov, _view) = IoVecs::bounce(n as usize, 4096);
                source.preadv(off, &iov).await?;
                self.target.pwritev(off, &iov, false).await?;
                self.todo.clear_range(off, n);
                done += n;
            }
            off += n;
        }
        Ok(done)
    }
}

impl WriteHook for CbwHook {
    fn wrap<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        len: u64,
        _op: WriteOp<'a>,
        inner: BlockFuture<'a>,
    ) -> BlockFuture<'a> {
        BlockFuture::boxed(async move {
            let cs = self.todo.granularity();
            let start = offset / cs * cs;
            let end = (offset + len).div_ceil(cs) * cs;
            let _held = self.ranges.take(start, end).await;
            if let Err(e) = self.copy_out(node, start, end).await {
                let mut f = self.failed.lock().unwrap_or_else(|e| e.into_inner());
                if f.is_none() {
                    log::warn!("backup: copy before write at {offset}: {e}");
                    *f = Some(copy::error_text(&e));
                }
                // The snapshot is broken; nothing more is copied.
                self.todo.clear_range(0, self.todo.size());
            }
            inner.await
        })
    }
}

/// Fleecing (the target's backing is the source): a read of the target
/// waits for a copy-before-write of the same clusters in progress, and a
/// copy-before-write waits for the read. Either the read finds the cluster
/// not yet copied and reads the source before the guest's write lands, or
/// it finds the old data copied into the target.
impl ReadHook for CbwHook {
    fn wrap_read<'a>(
        &'a self,
        _node: &'a Node,
        offset: u64,
        len: u64,
        inner: BlockFuture<'a>,
    ) -> BlockFuture<'a> {
        BlockFuture::boxed(async move {
            let cs = self.todo.granularity();
            let start = offset / cs * cs;
            let end = (offset + len).div_ceil(cs) * cs;
            let _held = self.ranges.take(start, end).await;
            inner.await
        })
    }
}

struct Backup {
    source: Arc<Node>,
    hook: Arc<CbwHook>,
    sync: SyncMode,
    bitmap: Option<(Arc<DirtyBitmap>, BitmapMode, Vec<u64>)>,
    on_source_error: OnError,
    on_target_error: OnError,
    _src_edge: Child,
    dst_edge: Child,
}

impl Backup {
    fn run(&self, state: &State, job: &Job) -> Result<(), QmpError> {
        let r = self.copy(job);
        let r = r.and_then(|()| {
            if let Some(e) = self
                .hook
                .failed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
            {
                return Err(QmpError::generic(e));
            }
            copy::run(self.dst_edge.node().flush()).map_err(|e| copy::job_error(&e))
        });
        let r = match r {
            Ok(()) if !job.wait_finalize() => Ok(()),
            r => r,
        };
        job.with_command_lock(state, || {
            let h: Arc<dyn WriteHook> = self.hook.clone();
            let rh: Arc<dyn ReadHook> = self.hook.clone();
            state.drained(&self.source, || {
                self.source.remove_write_hook(&h);
                self.dst_edge.node().remove_read_hook(&rh);
                self.settle_bitmap(r.is_ok() && !job.is_cancelled());
            });
        });
        r
    }

    /// The user's bitmap after the job, as bitmap-mode says.
    fn settle_bitmap(&self, success: bool) {
        let Some((b, mode, saved)) = &self.bitmap else {
            return;
        };
        b.set_busy(false);
        let restore_all = match mode {
            BitmapMode::OnSuccess => !success,
            BitmapMode::Never => true,
            BitmapMode::Always => false,
        };
        if restore_all {
            let mut now = b.snapshot();
            for (w, s) in now.iter_mut().zip(saved) {
                *w |= s;
            }
            b.restore(&now);
        } else if *mode == BitmapMode::Always {
            // What was not copied stays dirty.
            b.merge_from(&self.hook.todo);
        }
    }

    fn copy(&self, job: &Job) -> Result<(), QmpError> {
        let todo = &self.hook.todo;
        let size = todo.size();
        let total = todo.count();
        let mut done_before = 0;
        job.progress(0, total);
        if self.sync == SyncMode::None {
            // Only what the guest overwrites is copied, until cancelled.
            while job.sleep(std::time::Duration::from_millis(100)) {
                job.progress(total - todo.count(), total);
            }
            return Ok(());
        }
        let cs = todo.granularity();
        let src: &Node = &self.source;
        let dst: &Node = self.dst_edge.node();
        let buf = copy::Buffer::new(cs);
        let mut off = 0;
        while let Some(d) = todo.next_dirty(off) {
            if !job.pause_point() {
                return Ok(());
            }
            let n = cs.min(size - d);
            let mut copied = 0;
            let _held = copy::run(self.hook.ranges.take(d, d + n));
            if todo.is_dirty(d) {
                let part = buf.part(n);
                let zero = copy::with_policy(job, self.on_source_error, false, || {
                    copy::reads_zero(src, d, n)
                })?;
                let zero = zero.is_some_and(|(z, zn)| z && zn >= n);
                let read = if zero {
                    Some(())
                } else {
                    copy::with_policy(job, self.on_source_error, false, || {
                        copy::run(src.preadv(d, &part))
                    })?
                };
                if read.is_some() {
                    let w = copy::with_policy(job, self.on_target_error, true, || {
                        if zero {
                            copy::run(dst.pwrite_zeroes(d, n, true, false))
                        } else {
                            copy::run(dst.pwritev(d, &part, false))
                        }
                    })?;
                    if w.is_some() {
                        todo.clear_range(d, n);
                        copied = if zero { 0 } else { n };
                    }
                }
            }
            drop(_held);
            off = d + n;
            let left = todo.count();
            let done = total.saturating_sub(left).max(done_before);
            done_before = done;
            job.progress(done, total);
            if !job.rate_limit(copied) {
                return Ok(());
            }
        }
        job.progress(total, total);
        Ok(())
    }
}

/// The node a blockdev-backup copies (for a transaction's drain).
pub fn backup_source(state: &State, a: &BackupArgs) -> Result<Arc<Node>, QmpError> {
    Ok(copy::skip_filters(&copy::resolve(state, &a.device)?))
}

/// blockdev-backup; returns the job's id.
pub fn backup(state: &Arc<State>, a: BackupArgs) -> Result<String, QmpError> {
    backup_in(state, a, None)
}

/// Refuses what this daemon does not do, and finds the source and the
/// target (and the job's id).
fn find_nodes(state: &State, a: &BackupArgs) -> Result<(Arc<Node>, String, Arc<Node>), QmpError> {
    if a.compress {
        return Err(QmpError::generic("'compress' is not supported: compressed clusters are read, never written, by this daemon's qcow2 driver"));
    }
    if a.filter_node_name.is_some() {
        return Err(QmpError::generic("'filter-node-name' is not supported: this daemon copies before writes in a hook on the source and inserts no filter node"));
    }
    if a.discard_source == Some(true) {
        return Err(QmpError::generic("'discard-source' is not supported"));
    }
    if let Some(p) = &a.x_perf {
        p.check()?;
    }
    let source = copy::skip_filters(&copy::resolve(state, &a.device)?);
    let id = super::job_id(a.job_id.as_deref(), &a.device);
    super::check_id(&id)?;
    super::check_not_busy(&source)?;
    let target = copy::target(state, &a.target)?;
    // A target whose backing image is the source is fine (image fleecing:
    // the target shows the point in time through its backing); a target
    // below the source is not.
    if Arc::ptr_eq(&source, &target) || source.reaches(&target) {
        return Err(QmpError::generic("Source and target cannot be the same"));
    }
    if target.is_read_only() {
        return Err(QmpError::generic(format!(
            "Node '{}' is read-only",
            target.name()
        )));
    }
    target.ensure_active().map_err(QmpError::generic)?;
    if source.size() != target.size() {
        return Err(QmpError::generic(
            "Source and target image have different sizes",
        ));
    }
    Ok((source, id, target))
}

/// The bitmap-mode a backup's sync mode and bitmap call for, as QEMU
/// checks them.
fn bitmap_mode(a: &BackupArgs) -> Result<BitmapMode, QmpError> {
    let mode = match (a.sync, &a.bitmap, a.bitmap_mode) {
        (SyncMode::Incremental, Some(_), None | Some(BitmapMode::OnSuccess)) => {
            BitmapMode::OnSuccess
        }
        (SyncMode::Incremental, Some(_), Some(_)) => {
            return Err(QmpError::generic(
                "Bitmap sync mode must be 'on-success' when using sync mode 'incremental'",
            ))
        }
        (SyncMode::Bitmap, Some(_), Some(m)) => m,
        (SyncMode::Bitmap, Some(_), None) => {
            return Err(QmpError::generic(
                "Bitmap sync mode must be given when providing a bitmap",
            ))
        }
        (SyncMode::Incremental | SyncMode::Bitmap, None, _) => {
            return Err(QmpError::generic(format!(
                "must provide a valid bitmap name for '{}' sync mode",
                if a.sync == SyncMode::Bitmap {
                    "bitmap"
                } else {
                    "incremental"
                }
            )))
        }
        (SyncMode::None, Some(_), _) => {
            return Err(QmpError::generic(
                "sync-mode 'none' does not produce meaningful bitmap outputs",
            ))
        }
        (_, Some(_), None) => {
            return Err(QmpError::generic(
                "Bitmap sync mode must be given when providing a bitmap",
            ))
        }
        (_, Some(_), Some(BitmapMode::Never)) => {
            return Err(QmpError::generic(format!(
            "Bitmap sync mode 'never' has no meaningful effect when combined with sync mode '{}'",
            if a.sync == SyncMode::Full {
                "full"
            } else {
                "top"
            }
        )))
        }
        // full/top with a bitmap: the bitmap restarts at the backup (a new
        // incremental chain), as bitmap-mode says.
        (_, Some(_), Some(m)) => m,
        (_, None, Some(_)) => {
            return Err(QmpError::generic(
                "Cannot specify bitmap sync mode without a bitmap",
            ))
        }
        (_, None, None) => BitmapMode::OnSuccess,
    };
    Ok(mode)
}

/// The bitmap a backup names: not in use by another operation.
fn find_bitmap(
    source: &Node,
    a: &BackupArgs,
    mode: BitmapMode,
) -> Result<Option<Arc<DirtyBitmap>>, QmpError> {
    let bitmap = match &a.bitmap {
        Some(name) => {
            let b = crate::bitmaps::find(source, name)
                .map_err(|_| QmpError::generic(format!("Bitmap '{name}' could not be found")))?;
            if b.is_busy() {
                return Err(QmpError::generic(format!(
                    "Bitmap '{name}' is currently in use by another operation and cannot be used"
                )));
            }
            if !b.is_enabled() && mode == BitmapMode::OnSuccess {
                // Allowed by QEMU too: a disabled bitmap copies its bits.
            }
            Some(b)
        }
        None => None,
    };
    Ok(bitmap)
}

/// The point in time, in a drained section of the source: nothing is in
/// flight, the hook goes on, and what to copy is decided. Returns what the
/// bitmap held (to be put back if bitmap-mode says so).
fn start_point(
    state: &State,
    source: &Arc<Node>,
    sync: SyncMode,
    hook: &Arc<CbwHook>,
    bitmap: Option<&Arc<DirtyBitmap>>,
) -> Result<Option<Vec<u64>>, QmpError> {
    let size = source.size();
    let h: Arc<dyn WriteHook> = hook.clone();
    state.drained(source, || {
        let mut saved = None;
        match sync {
            SyncMode::Full | SyncMode::None => hook.todo.set(0, size),
            SyncMode::Top => {
                let mut off = 0;
                while off < size {
                    let (top, n) = copy::allocated_in_top(source, off, size - off)
                        .map_err(|e| copy::job_error(&e))?;
                    if top {
                        hook.todo.set(off, n);
                    }
                    off += n;
                }
            }
            SyncMode::Incremental | SyncMode::Bitmap => {
                hook.todo.merge_from(bitmap.expect("checked above"));
            }
        }
        if let Some(b) = bitmap {
            // From here the bitmap records only what changes after this
            // point; what it held is kept to be put back if bitmap-mode
            // says so.
            saved = Some(b.snapshot());
            b.clear();
            b.set_busy(true);
        }
        source.add_write_hook(h);
        // Fleecing: readers of the target see the point in time.
        if hook.target.reaches(source) {
            let rh: Arc<dyn ReadHook> = hook.clone();
            hook.target.add_read_hook(rh);
        }
        Ok(saved)
    })
}

/// blockdev-backup as a member of a grouped transaction's jobs.
pub fn backup_in(
    state: &Arc<State>,
    a: BackupArgs,
    txn: Option<&Arc<super::JobTxn>>,
) -> Result<String, QmpError> {
    start(state, a, txn, false)
}

/// Starts a backup; with `drop_target` (drive-backup's implicit target)
/// the target's node is closed when the job ends.
pub(super) fn start(
    state: &Arc<State>,
    a: BackupArgs,
    txn: Option<&Arc<super::JobTxn>>,
    drop_target: bool,
) -> Result<String, QmpError> {
    let (source, id, target) = find_nodes(state, &a)?;
    if let Some(name) = &a.bitmap {
        crate::bitmaps::find(&source, name)
            .map_err(|_| QmpError::generic(format!("Bitmap '{name}' could not be found")))?;
    }
    let mode = bitmap_mode(&a)?;
    let bitmap = find_bitmap(&source, &a, mode)?;
    let speed = copy::check_speed(a.speed)?;
    let cs = target.cluster_size().map_or(65536, |c| c.max(65536));
    let todo = DirtyBitmap::new("", source.size(), cs, false, false).map_err(QmpError::generic)?;
    let hook = Arc::new(CbwHook {
        todo,
        ranges: RangeLock::default(),
        target: target.clone(),
        failed: Mutex::new(None),
    });
    let src_edge = copy::job_edge(&id, source.clone(), false)?;
    let dst_edge = copy::target_edge(&id, target.clone())?;
    let saved = start_point(state, &source, a.sync, &hook, bitmap.as_ref())?;
    let h: Arc<dyn WriteHook> = hook.clone();
    let o = BlockJobOptions {
        id,
        speed,
        auto_finalize: a.auto_finalize,
        auto_dismiss: a.auto_dismiss,
    };
    let b = Backup {
        source: source.clone(),
        hook,
        sync: a.sync,
        bitmap: bitmap.map(|b| (b, mode, saved.unwrap_or_default())),
        on_source_error: a.on_source_error,
        on_target_error: a.on_target_error,
        _src_edge: src_edge,
        dst_edge,
    };
    let job = match super::register_block("backup", &o, vec![source.clone(), target]) {
        Ok(j) => j,
        Err(e) => {
            let rh: Arc<dyn ReadHook> = b.hook.clone();
            state.drained(&source, || {
                source.remove_write_hook(&h);
                b.dst_edge.node().remove_read_hook(&rh);
                b.settle_bitmap(false);
            });
            return Err(e);
        }
    };
    let id = job.id.clone();
    // The job's length is known from its start point: a job cancelled
    // before its thread first runs (a grouped transaction's other backup
    // failed at once) reports it, as QEMU's does.
    job.progress(0, b.hook.todo.count());
    if let Some(t) = txn {
        t.add(&job);
    }
    let st = state.clone();
    super::spawn(job, move |job| {
        let r = b.run(&st, job);
        if drop_target {
            let name = b.dst_edge.node().name().to_string();
            // Our edges first: then the node has no parent left.
            drop(b);
            job.with_command_lock(&st, || {
                if let Err(e) = st.del_blockdev(&name) {
                    log::warn!("backup: closing target node {name}: {e}");
                }
            });
        }
        r
    });
    Ok(id)
}
