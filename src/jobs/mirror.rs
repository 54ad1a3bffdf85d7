//! blockdev-mirror and drive-mirror: copy a node to a target while the
//! guest writes, then (block-job-complete) move the node's users to the
//! target in one drained section. Active block-commit is this job with
//! the base image as the target.
//!
//! ```text
//!   command (drained): hook on the source, dirty bitmap per sync mode
//!   job thread: copy dirty granules (source -> target), clearing them first
//!               all clean -> BLOCK_JOB_READY; keep copying new writes
//!   complete:   drained: copy what is left, flush target, move users
//!   soft cancel (ready, no force): the same without the move: the
//!               target is a consistent copy
//! ```
//!
//! Writes are tracked by a write hook on the source (background mode:
//! the range is marked dirty when the write has completed, so a copy that
//! raced it is done again; write-blocking mode: the same data is written
//! to the target before the guest's request completes). A range lock
//! serialises the job's copies with write-blocking writes, so a copy of
//! old data never lands on the target after the guest's newer write.

use std::sync::Arc;

use serde::Deserialize;

use super::copy;
use super::OnError;
use super::{BlockJobOptions, Job};
use crate::block::bitmap::DirtyBitmap;
use crate::block::hooks::{WriteHook, WriteOp};
use crate::block::ranges::RangeLock;
use crate::block::{BlockFuture, Child, Node};
use crate::drivers::file::{self, Created, NewFile};
use crate::qapi::QmpError;
use crate::state::State;

/// Largest copy the job does at once.
const CHUNK: u64 = 1 << 20;
/// How long a job in sync sleeps before it looks for new writes.
const IDLE: std::time::Duration = std::time::Duration::from_millis(20);

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SyncMode {
    #[default]
    Full,
    Top,
    None,
    Incremental,
    Bitmap,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CopyMode {
    #[default]
    Background,
    WriteBlocking,
}

fn yes() -> bool {
    true
}

/// blockdev-mirror's arguments (qapi BlockdevMirror... in block-core.json).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct MirrorArgs {
    pub job_id: Option<String>,
    pub device: String,
    pub target: String,
    pub replaces: Option<String>,
    pub sync: SyncMode,
    #[serde(default)]
    pub speed: i64,
    pub granularity: Option<u64>,
    pub buf_size: Option<u64>,
    #[serde(default)]
    pub on_source_error: OnError,
    #[serde(default)]
    pub on_target_error: OnError,
    pub filter_node_name: Option<String>,
    #[serde(default)]
    pub copy_mode: CopyMode,
    #[serde(default = "yes")]
    pub auto_finalize: bool,
    #[serde(default = "yes")]
    pub auto_dismiss: bool,
}

/// drive-mirror's `mode` (qapi NewImageMode).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NewImageMode {
    Existing,
    #[default]
    AbsolutePaths,
}

/// drive-mirror's arguments: the target is a file, created (or opened)
/// here.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct DriveMirrorArgs {
    pub job_id: Option<String>,
    pub device: String,
    pub target: String,
    pub format: Option<String>,
    pub node_name: Option<String>,
    pub replaces: Option<String>,
    pub sync: SyncMode,
    #[serde(default)]
    pub mode: NewImageMode,
    #[serde(default)]
    pub speed: i64,
    pub granularity: Option<u64>,
    pub buf_size: Option<u64>,
    #[serde(default)]
    pub on_source_error: OnError,
    #[serde(default)]
    pub on_target_error: OnError,
    pub unmap: Option<bool>,
    #[serde(default)]
    pub copy_mode: CopyMode,
    #[serde(default = "yes")]
    pub auto_finalize: bool,
    #[serde(default = "yes")]
    pub auto_dismiss: bool,
}

/// What a mirror tracks on its source.
pub(super) struct MirrorHook {
    pub dirty: DirtyBitmap,
    ranges: RangeLock,
    write_blocking: bool,
    target: Arc<Node>,
}

impl WriteHook for MirrorHook {
    fn wrap<'a>(
        &'a self,
        _node: &'a Node,
        offset: u64,
        len: u64,
        op: WriteOp<'a>,
        inner: BlockFuture<'a>,
    ) -> BlockFuture<'a> {
        if !self.write_blocking || matches!(op, WriteOp::Discard) {
            // Marked once the write is done: a copy of the range that
            // raced the write runs again.
            return BlockFuture::boxed(async move {
                let r = inner.await;
                self.dirty.set(offset, len);
                r
            });
        }
        BlockFuture::boxed(async move {
            let g = self.dirty.granularity();
            let start = offset / g * g;
            let end = (offset + len).div_ceil(g) * g;
            let _held = self.ranges.take(start, end).await;
            let r = inner.await;
            let mirrored = match (&r, op) {
                (Ok(()), WriteOp::Data(iov, fua)) => self.target.pwritev(offset, iov, fua).await,
                (Ok(()), WriteOp::Zeroes(unmap, fua)) => {
                    self.target.pwrite_zeroes(offset, len, unmap, fua).await
                }
                _ => Ok(()),
            };
            if r.is_err() || mirrored.is_err() {
                // The background copy makes it right (or reports it).
                self.dirty.set(offset, len);
            }
            r
        })
    }
}

/// One running mirror: the part the job thread and the finishing code
/// share.
pub(super) struct Mirror {
    pub source: Arc<Node>,
    pub target: Arc<Node>,
    pub hook: Arc<MirrorHook>,
    pub src_edge: Child,
    pub dst_edge: Child,
    pub on_source_error: OnError,
    pub on_target_error: OnError,
    pub chunk: u64,
    /// The target gets its backing image only at the pivot (drive-mirror
    /// with sync top/none): zeroes must be written, never left unallocated,
    /// or the backing image would show through.
    pub late_backing: bool,
}

/// How a mirror chooses what to copy first.
pub(super) enum Initial {
    /// Everything (sync=full).
    All,
    /// What the source holds itself (sync=top).
    Top,
    /// Nothing: only new writes (sync=none).
    Nothing,
    /// What is allocated above the image at this depth (active commit).
    Above(Option<u32>),
}

/// What the job does once the user completes it.
pub(super) type Pivot = Box<dyn FnOnce(&State, &Mirror) -> Result<(), QmpError> + Send>;

impl Mirror {
    /// Sets up the hook on `source` (drained) and the job's edges.
    pub fn start(
        state: &State,
        job_id: &str,
        source: Arc<Node>,
        target: Arc<Node>,
        granularity: u64,
        write_blocking: bool,
        buf_size: u64,
    ) -> Result<Mirror, QmpError> {
        let dirty = DirtyBitmap::new("", source.size(), granularity, false, false)
            .map_err(QmpError::generic)?;
        let hook = Arc::new(MirrorHook {
            dirty,
            ranges: RangeLock::default(),
            write_blocking,
            target: target.clone(),
        });
        let src_edge = copy::job_edge(job_id, source.clone(), false)?;
        let dst_edge = copy::target_edge(job_id, target.clone())?;
        let h: Arc<dyn WriteHook> = hook.clone();
        state.drained(&source, || source.add_write_hook(h));
        Ok(Mirror {
            source,
            target,
            hook,
            src_edge,
            dst_edge,
            on_source_error: OnError::Report,
            on_target_error: OnError::Report,
            chunk: buf_size.clamp(granularity, CHUNK.max(granularity)),
            late_backing: false,
        })
    }

    fn remove_hook(&self, state: &State) {
        let h: Arc<dyn WriteHook> = self.hook.clone();
        state.drained(&self.source, || self.source.remove_write_hook(&h));
    }

    /// Marks what the first pass copies.
    fn mark_initial(&self, job: &Job, initial: &Initial) -> Result<(), QmpError> {
        let size = self.source.size();
        let dirty = &self.hook.dirty;
        let mut off = 0;
        while off < size {
            if !job.pause_point() {
                return Err(QmpError::generic("Operation canceled"));
            }
            let len = (size - off).min(1 << 30);
            let (mark, n) = match initial {
                Initial::All => (true, len),
                Initial::Nothing => (false, len),
                Initial::Top => copy::allocated_in_top(&self.source, off, len)
                    .map_err(|e| copy::job_error(&e))?,
                Initial::Above(base) => copy::allocated_above(&self.source, *base, off, len)
                    .map_err(|e| copy::job_error(&e))?,
            };
            if mark {
                dirty.set(off, n);
            }
            off += n;
        }
        Ok(())
    }

    /// Copies `[off, off + n)` (dirty granules) from source to target.
    /// Returns the bytes done (0 when a failure was ignored; the range is
    /// dirty again) and how many of them were data (not zeroes: only data
    /// counts against `speed`, as in QEMU).
    fn copy(
        &self,
        job: &Job,
        off: u64,
        n: u64,
        buf: &copy::Buffer,
    ) -> Result<(u64, u64), QmpError> {
        let _held = copy::run(self.hook.ranges.take(off, off + n));
        self.hook.dirty.clear_range(off, n);
        let src: &Node = self.src_edge.node();
        let dst: &Node = self.dst_edge.node();
        let zero = copy::with_policy(job, self.on_source_error, false, || {
            copy::reads_zero(src, off, n)
        })?;
        let Some((zero, zn)) = zero else {
            self.hook.dirty.set(off, n);
            return Ok((0, 0));
        };
        let done = if zero {
            // Nothing to write where the target reads as zeroes already
            // (a fresh image).
            let (tz, tn) = if self.late_backing {
                (false, zn)
            } else {
                copy::reads_zero(dst, off, zn).unwrap_or((false, zn))
            };
            if tz {
                Some(tn)
            } else {
                let unmap = !self.late_backing;
                let w = copy::with_policy(job, self.on_target_error, true, || {
                    copy::run(dst.pwrite_zeroes(off, zn, unmap, false))
                })?;
                w.map(|_| zn)
            }
        } else {
            let part = buf.part(n);
            let r = copy::with_policy(job, self.on_source_error, false, || {
                copy::run(src.preadv(off, &part))
            })?;
            match r {
                None => None,
                Some(()) => copy::with_policy(job, self.on_target_error, true, || {
                    copy::run(dst.pwritev(off, &part, false))
                })?
                .map(|_| n),
            }
        };
        match done {
            Some(d) => {
                if d < n {
                    self.hook.dirty.set(off + d, n - d);
                }
                Ok((d, if zero { 0 } else { d }))
            }
            None => {
                self.hook.dirty.set(off, n);
                Ok((0, 0))
            }
        }
    }

    /// Copies every dirty granule (the guest is stopped: the final pass).
    fn copy_all(&self, job: &Job, buf: &copy::Buffer) -> Result<(), QmpError> {
        let mut tries = 0;
        while let Some(off) = self.hook.dirty.next_dirty(0) {
            let n = self.hook.dirty.dirty_run(off, self.chunk);
            if self.copy(job, off, n, buf)?.0 == 0 {
                tries += 1;
                if tries > 3 {
                    return Err(QmpError::generic(format!(
                        "cannot copy offset {off} of '{}' (errors ignored)",
                        self.source.name()
                    )));
                }
            }
        }
        copy::run(self.dst_edge.node().flush()).map_err(|e| copy::job_error(&e))
    }

    /// The job's work: first pass, ready, then track writes until the
    /// user completes or cancels.
    pub fn run(
        &self,
        state: &State,
        job: &Job,
        initial: Initial,
        pivot: Pivot,
    ) -> Result<(), QmpError> {
        let r = self.run_inner(state, job, initial, pivot);
        if r.is_err() || job.is_cancelled() {
            // Graph changes of a job thread run under the command lock,
            // so that two jobs never wait in each other's drains.
            job.with_command_lock(state, || self.remove_hook(state));
        }
        r
    }

    fn run_inner(
        &self,
        state: &State,
        job: &Job,
        initial: Initial,
        pivot: Pivot,
    ) -> Result<(), QmpError> {
        self.mark_initial(job, &initial)?;
        let buf = copy::Buffer::new(self.chunk);
        let mut done = 0u64;
        let mut cursor = 0u64;
        loop {
            if !job.pause_point() {
                return Ok(()); // cancelled: the job ends as such
            }
            let dirty = &self.hook.dirty;
            let next = dirty.next_dirty(cursor).or_else(|| dirty.next_dirty(0));
            match next {
                Some(off) => {
                    let n = dirty.dirty_run(off, self.chunk);
                    let (d, data) = self.copy(job, off, n, &buf)?;
                    done += d;
                    cursor = off + d.max(1);
                    job.progress(done, done + dirty.count());
                    if !job.rate_limit(data) {
                        return Ok(());
                    }
                }
                None => {
                    job.progress(done, done);
                    job.ready();
                    let (complete, soft) = {
                        let s = job.state();
                        (s.complete_requested(), s.soft_cancel())
                    };
                    if complete || soft {
                        if !job.wait_finalize() {
                            return Ok(());
                        }
                        return job
                            .with_command_lock(state, || self.finish(state, job, complete, pivot));
                    }
                    if !job.sleep(IDLE) {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// The final pass in a drained section of the source, then the pivot
    /// (`complete`) or nothing (a soft cancel: the target stays a copy).
    fn finish(
        &self,
        state: &State,
        job: &Job,
        complete: bool,
        pivot: Pivot,
    ) -> Result<(), QmpError> {
        let buf = copy::Buffer::new(self.chunk);
        let h: Arc<dyn WriteHook> = self.hook.clone();
        let r = state.drained_many(&[&self.source, &self.target], || {
            self.copy_all(job, &buf)?;
            self.source.remove_write_hook(&h);
            if complete {
                // The users that move to the target may write it.
                self.dst_edge
                    .set_perm(self.dst_edge.perm(), crate::block::Perm::ALL);
                pivot(state, self)?;
            }
            Ok(())
        });
        if r.is_err() {
            state.drained(&self.source, || self.source.remove_write_hook(&h));
        }
        let total = job.state().progress_total;
        job.progress(total, total);
        if r.is_ok() {
            log::info!(
                "job {}: {} '{}' -> '{}'",
                job.id,
                if complete {
                    "pivoted"
                } else {
                    "finished a copy of"
                },
                self.source.name(),
                self.target.name()
            );
        }
        r
    }
}

/// The default granularity: the target's cluster size within
/// [4 KiB, 64 KiB], as QEMU's bdrv_get_default_bitmap_granularity.
fn default_granularity(target: &Node) -> u64 {
    target
        .cluster_size()
        .map_or(65536, |c| c.clamp(4096, 65536))
}

fn check_granularity(g: u64) -> Result<(), QmpError> {
    if !(512..=64 << 20).contains(&g) {
        return Err(QmpError::generic(
            "Parameter 'granularity' expects a value in range [512B, 64MB]",
        ));
    }
    if !g.is_power_of_two() {
        return Err(QmpError::generic(
            "Parameter 'granularity' expects a power of 2",
        ));
    }
    Ok(())
}

/// Checks shared by blockdev-mirror and drive-mirror; starts the job.
#[allow(clippy::too_many_arguments)]
fn start_mirror(
    state: &Arc<State>,
    o: BlockJobOptions,
    source: Arc<Node>,
    target: Arc<Node>,
    replaces: Option<Arc<Node>>,
    sync: SyncMode,
    granularity: Option<u64>,
    buf_size: Option<u64>,
    errors: (OnError, OnError),
    copy_mode: CopyMode,
    backing_for_target: Option<Arc<Node>>,
) -> Result<(), QmpError> {
    check_nodes(&source, &target, replaces.as_ref())?;
    let initial = initial_of(sync)?;
    let g = granularity.unwrap_or_else(|| default_granularity(&target));
    check_granularity(g)?;
    super::check_id(&o.id)?;
    let mut m = Mirror::start(
        state,
        &o.id,
        source.clone(),
        target.clone(),
        g,
        copy_mode == CopyMode::WriteBlocking,
        buf_size.unwrap_or(CHUNK),
    )?;
    let job = match super::register_block("mirror", &o, vec![source, target]) {
        Ok(j) => j,
        Err(e) => {
            m.remove_hook(state);
            return Err(e);
        }
    };
    m.on_source_error = errors.0;
    m.on_target_error = errors.1;
    m.late_backing = backing_for_target.is_some();
    let to_replace = replaces.unwrap_or_else(|| m.source.clone());
    let replaced = to_replace.clone();
    let pivot = pivot_to(to_replace, backing_for_target);

    if matches!(initial, Initial::All) {
        // Known at once for a full copy (the other modes count what
        // their first pass finds).
        job.progress(0, m.source.size());
    }
    let st = state.clone();
    super::spawn(job, move |job| {
        let r = m.run(&st, job, initial, pivot);
        let pivoted = r.is_ok() && job.state().complete_requested() && !job.is_cancelled();
        drop(m);
        if pivoted {
            // The replaced image left the chain: one opened for its parents
            // (a snapshot-sync overlay, a backing file) leaves the graph
            // with them, as in QEMU; one the monitor added stays.
            job.with_command_lock(&st, || super::stream::drop_nodes(&st, &[replaced]));
        }
        r
    });
    Ok(())
}

/// Refuses a mirror into itself, a `replaces` that is not the source
/// (or a filter above it), and a target that cannot take the copy.
fn check_nodes(
    source: &Arc<Node>,
    target: &Arc<Node>,
    replaces: Option<&Arc<Node>>,
) -> Result<(), QmpError> {
    if Arc::ptr_eq(source, target) || source.reaches(target) || target.reaches(source) {
        return Err(QmpError::generic("Can't mirror node into itself"));
    }
    // `replaces` may name the source or a filter above it: moving the
    // users of anything else would change what they see at once.
    if let Some(r) = replaces {
        if !Arc::ptr_eq(&copy::skip_filters(r), source) {
            return Err(QmpError::generic(format!(
                "Cannot replace '{}' by a node mirrored from '{}', because it cannot be guaranteed that doing so would not lead to an abrupt change of visible data",
                r.name(),
                source.name()
            )));
        }
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
    Ok(())
}

/// Where the first pass starts for a sync mode.
fn initial_of(sync: SyncMode) -> Result<Initial, QmpError> {
    Ok(match sync {
        SyncMode::Full => Initial::All,
        SyncMode::Top => Initial::Top,
        SyncMode::None => Initial::Nothing,
        SyncMode::Incremental => {
            return Err(QmpError::generic("Sync mode 'incremental' not supported"))
        }
        SyncMode::Bitmap => return Err(QmpError::generic("Sync mode 'bitmap' not supported")),
    })
}

/// The pivot of `complete`: the users of `to_replace` move to the target,
/// which then takes its backing image when it has one to take.
fn pivot_to(to_replace: Arc<Node>, backing_for_target: Option<Arc<Node>>) -> Pivot {
    Box::new(move |state: &State, m: &Mirror| {
        let users = copy::users(state, &to_replace, &[]);
        users
            .replace(&to_replace, &m.target)
            .map_err(|e| QmpError::generic(e.to_string()))?;
        // Then the target takes its backing image (drive-mirror, sync
        // top/none): the source's users write the target now, so the
        // backing edge conflicts with no one.
        if let Some(b) = &backing_for_target {
            if let Some(q) = m.target.backing_file() {
                if m.target.backing().is_none() {
                    let attached = Child::attach(
                        m.target.name(),
                        crate::block::ChildRole::Backing,
                        b.clone(),
                        crate::block::Perm::CONSISTENT_READ,
                        crate::block::Perm::CONSISTENT_READ | crate::block::Perm::WRITE_UNCHANGED,
                    )
                    .map_err(|e| QmpError::generic(e.to_string()))
                    .and_then(|c| q.set_backing(c).map_err(QmpError::generic));
                    if let Err(e) = attached {
                        // All or nothing: the users go back to the source.
                        if let Err(e2) = users.replace(&m.target, &to_replace) {
                            log::error!("mirror: moving users back: {e2}");
                        }
                        return Err(e);
                    }
                }
            }
        }
        for e in users.exports() {
            e.notify_config_change();
        }
        Ok(())
    })
}

/// blockdev-mirror.
pub fn mirror(state: &Arc<State>, a: MirrorArgs) -> Result<(), QmpError> {
    if a.filter_node_name.is_some() {
        return Err(QmpError::generic("'filter-node-name' is not supported: this daemon tracks a mirror's writes on the source node itself and inserts no filter node"));
    }
    let source = copy::skip_filters(&copy::resolve(state, &a.device)?);
    let id = super::job_id(a.job_id.as_deref(), &a.device);
    super::check_id(&id)?;
    super::check_not_busy(&source)?;
    let target = copy::target(state, &a.target)?;
    let replaces = a
        .replaces
        .as_deref()
        .map(|r| copy::node(state, r))
        .transpose()?;
    let o = BlockJobOptions {
        id,
        speed: copy::check_speed(a.speed)?,
        auto_finalize: a.auto_finalize,
        auto_dismiss: a.auto_dismiss,
    };
    start_mirror(
        state,
        o,
        source,
        target,
        replaces,
        a.sync,
        a.granularity,
        a.buf_size,
        (a.on_source_error, a.on_target_error),
        a.copy_mode,
        None,
    )
}

/// drive-mirror: creates (mode absolute-paths) or opens (existing) the
/// target image, adds it as a node, and mirrors to it.
pub fn drive_mirror(state: &Arc<State>, a: DriveMirrorArgs) -> Result<(), QmpError> {
    let source = copy::skip_filters(&copy::resolve(state, &a.device)?);
    super::check_id(&super::job_id(a.job_id.as_deref(), &a.device))?;
    super::check_not_busy(&source)?;
    let format = a
        .format
        .clone()
        .unwrap_or_else(|| copy::format_of(&source).into());
    if format != "qcow2" && format != "raw" {
        return Err(QmpError::generic(format!(
            "format '{format}' is not supported; use qcow2 or raw"
        )));
    }
    // What the target's backing image becomes (QEMU's
    // MIRROR_SOURCE_BACKING_CHAIN): the source itself for sync=none, the
    // source's backing image for sync=top, none for a full copy.
    let backing = match a.sync {
        SyncMode::None => Some(source.clone()),
        SyncMode::Top => source.backing_node(),
        _ => None,
    };
    let node_name = target_node_name(state, &a, &source)?;
    let in_use = |dev, ino| file::node_using(&state.graph(), dev, ino, None);
    let created = if a.mode == NewImageMode::AbsolutePaths {
        Some(create_image(
            state,
            &a.target,
            source.size(),
            &format,
            backing.as_ref(),
        )?)
    } else {
        None
    };
    // The target is opened without a backing image; it takes one at the
    // pivot (the header of a new image names it already).
    let take_backing = backing.is_some() && format == "qcow2";
    let mut opts = serde_json::json!({
        "driver": format,
        "node-name": node_name,
        "file": {"driver": "file", "filename": a.target},
    });
    if take_backing {
        opts["backing"] = serde_json::Value::Null;
    }
    let opts = crate::drivers::BlockdevOptions::from_json(opts).map_err(QmpError::generic)?;
    let target = match state.add_blockdev(&opts) {
        Ok(n) => n,
        Err(e) => {
            if let Some(c) = &created {
                c.remove(&in_use);
            }
            return Err(QmpError::generic(e.to_string()));
        }
    };
    let replaces = a
        .replaces
        .as_deref()
        .map(|r| copy::node(state, r))
        .transpose()?;
    let o = BlockJobOptions {
        id: super::job_id(a.job_id.as_deref(), &a.device),
        speed: copy::check_speed(a.speed)?,
        auto_finalize: a.auto_finalize,
        auto_dismiss: a.auto_dismiss,
    };
    let r = start_mirror(
        state,
        o,
        source,
        target,
        replaces,
        a.sync,
        a.granularity,
        a.buf_size,
        (a.on_source_error, a.on_target_error),
        a.copy_mode,
        if take_backing { backing } else { None },
    );
    if r.is_err() {
        let _ = state.del_blockdev(&node_name);
        if let Some(c) = &created {
            c.remove(&in_use);
        }
    }
    r
}

/// The target's node name (given, or made up), refused when taken or when
/// a file node has the target file open already: a new image replaces
/// whatever file is at the path.
fn target_node_name(state: &State, a: &DriveMirrorArgs, source: &Node) -> Result<String, QmpError> {
    let node_name = a
        .node_name
        .clone()
        .unwrap_or_else(|| format!("{}-mirror-{}", source.name(), std::process::id()));
    if state.graph().get(&node_name).is_ok() {
        return Err(QmpError::generic(format!(
            "node name '{node_name}' is already in use"
        )));
    }
    for n in state.graph().nodes() {
        if n.protocol_file().is_some() && copy::names_file(n, &a.target) {
            return Err(QmpError::generic(format!(
                "'{}' is in use by node '{}'; choose another target file",
                a.target,
                n.name()
            )));
        }
    }
    Ok(node_name)
}

/// Creates drive-mirror's and drive-backup's target file (mode
/// absolute-paths) at `path`, `size` bytes in `format`, over `backing`
/// when given.
pub(super) fn create_image(
    state: &State,
    path: &str,
    size: u64,
    format: &str,
    backing: Option<&Arc<Node>>,
) -> Result<Created, QmpError> {
    let in_use = |dev, ino| file::node_using(&state.graph(), dev, ino, None);
    // The file is created, or truncated once this call holds its write
    // lock: never unlinked, so that a file another process has open (and
    // locked) is not replaced under it.
    if format != "qcow2" {
        let new = NewFile::open(path, &in_use).map_err(QmpError::generic)?;
        let f = new.file();
        f.set_len(0)
            .and_then(|()| f.set_len(size))
            .map_err(|e| QmpError::generic(format!("{path}: {e}")))?;
        return Ok(new.close());
    }
    let mut opts = crate::drivers::qcow2::CreateOptions {
        size,
        ..Default::default()
    };
    if let Some(b) = backing {
        let f = crate::drivers::file_name_of(b)
            .ok_or_else(|| QmpError::generic(format!("node '{}' has no file name", b.name())))?;
        opts.backing_file = Some(f);
        opts.backing_fmt = Some(copy::format_of(b).into());
    }
    crate::drivers::qcow2::create_in(path, &opts, &in_use).map_err(QmpError::generic)
}
