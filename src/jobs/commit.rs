//! block-commit: merge the images from `top` down to just above `base`
//! into `base`, then drop them from the chain.
//!
//! ```text
//!   before:          export -> active -> top -> mid -> base
//!   intermediate:    copy what top..mid hold into base (made writable),
//!                    then active's backing becomes base
//!   active commit:   top is the active image (under the export): a mirror
//!                    from top to base (copying only what lies above base),
//!                    ready, and on complete the export moves to base
//! ```

use std::sync::Arc;

use serde::Deserialize;

use super::copy::{self, edge_into, make_base_read_only, make_base_writable};
use super::mirror::{Initial, Mirror, Pivot};
use super::stream::{drop_nodes, set_backing, split_chain};
use super::OnError;
use super::{BlockJobOptions, Job};
use crate::block::{Child, Node};
use crate::qapi::QmpError;
use crate::state::State;

const CHUNK: u64 = 1 << 20;

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct CommitArgs {
    pub job_id: Option<String>,
    pub device: String,
    pub base_node: Option<String>,
    pub base: Option<String>,
    pub top_node: Option<String>,
    pub top: Option<String>,
    pub backing_file: Option<String>,
    pub backing_mask_protocol: Option<bool>,
    #[serde(default)]
    pub speed: i64,
    #[serde(default)]
    pub on_error: OnError,
    pub filter_node_name: Option<String>,
    #[serde(default = "yes")]
    pub auto_finalize: bool,
    #[serde(default = "yes")]
    pub auto_dismiss: bool,
}

struct Intermediate {
    top: Arc<Node>,
    overlay: Arc<Node>,
    base: Arc<Node>,
    between: Vec<Arc<Node>>,
    above_base: Arc<Node>,
    backing_file: Option<String>,
    on_error: OnError,
    top_edge: Child,
    base_edge: Child,
}

impl Intermediate {
    fn run(&self, state: &State, job: &Job) -> Result<(), QmpError> {
        let r = self.copy(job);
        let finalize = r.is_ok() && job.wait_finalize();
        job.with_command_lock(state, || {
            let r = r.and_then(|()| {
                if job.is_cancelled() || !finalize {
                    return Ok(());
                }
                copy::run(self.base.flush()).map_err(|e| copy::job_error(&e))?;
                // The copy is done: the job's own edges go before the
                // overlay takes the base as its backing image.
                self.top_edge.release();
                self.base_edge.release();
                state.drained(&self.overlay, || {
                    set_backing(
                        &self.overlay,
                        Some(&self.base),
                        self.backing_file.as_deref(),
                    )
                })
            });
            let edge = edge_into(&self.above_base, &self.base);
            let done = r.is_ok() && !job.is_cancelled();
            state.drained(&self.base, || {
                make_base_read_only(&self.base, if done { None } else { edge })
            });
            if done {
                let mut gone = vec![self.top.clone()];
                gone.extend(self.between.iter().cloned());
                drop_nodes(state, &gone);
                log::info!("job {}: committed into '{}'", job.id, self.base.name());
            }
            r
        })
    }

    fn copy(&self, job: &Job) -> Result<(), QmpError> {
        let top: &Node = self.top_edge.node();
        let base: &Node = self.base_edge.node();
        let size = top.size().min(base.size());
        let depth = Some(self.between.len() as u32 + 1);
        let buf = copy::Buffer::new(CHUNK);
        let mut off = 0;
        job.progress(0, size);
        while off < size {
            if !job.pause_point() {
                return Ok(());
            }
            let len = (size - off).min(CHUNK);
            let r = copy::with_policy(job, self.on_error, false, || {
                copy::allocated_above(top, depth, off, len)
            })?;
            let Some((above, n)) = r else {
                off += len;
                continue;
            };
            if above {
                let zero = copy::reads_zero(top, off, n).is_ok_and(|(z, zn)| z && zn >= n);
                let part = buf.part(n);
                let read = if zero {
                    Some(())
                } else {
                    copy::with_policy(job, self.on_error, false, || {
                        copy::run(top.preadv(off, &part))
                    })?
                };
                if read.is_some() {
                    copy::with_policy(job, self.on_error, true, || {
                        if zero {
                            copy::run(base.pwrite_zeroes(off, n, false, false))
                        } else {
                            copy::run(base.pwritev(off, &part, false))
                        }
                    })?;
                }
            }
            off += n;
            job.progress(off, size);
            if !job.rate_limit(if above { n } else { 0 }) {
                return Ok(());
            }
        }
        Ok(())
    }
}

/// The images a block-commit names, checked.
struct Chain {
    id: String,
    top: Arc<Node>,
    base: Arc<Node>,
    /// The images between top and base, top's backing first.
    between: Vec<Arc<Node>>,
    /// The image whose backing edge points at base.
    above_base: Arc<Node>,
    /// Top is the active image (under the export).
    is_active: bool,
    speed: u64,
}

impl Chain {
    /// The nodes the job works on.
    fn nodes(&self) -> Vec<Arc<Node>> {
        let mut nodes = vec![self.top.clone(), self.base.clone()];
        nodes.extend(self.between.iter().cloned());
        nodes
    }

    /// Base back to a read-only backing image (a failed start).
    fn undo(&self, state: &State) {
        state.drained(&self.base, || {
            make_base_read_only(&self.base, edge_into(&self.above_base, &self.base))
        });
    }
}

fn not_in_chain(n: &str) -> QmpError {
    QmpError::generic(format!("'{n}' is not in this backing file chain"))
}

/// The top image `top-node` or `top` names in the chain of `active`.
fn find_top(state: &State, a: &CommitArgs, active: &Arc<Node>) -> Result<Arc<Node>, QmpError> {
    let top = match (&a.top_node, &a.top) {
        (Some(_), Some(_)) => {
            return Err(QmpError::generic(
                "'top-node' and 'top' are mutually exclusive",
            ))
        }
        (Some(n), None) => copy::node(state, n).map_err(|_| not_in_chain(n))?,
        (None, Some(f)) => std::iter::once(active.clone())
            .chain(active.backing_chain())
            .find(|c| copy::names_file(c, f))
            .ok_or_else(|| QmpError::generic(format!("Top image file {f} not found")))?,
        (None, None) => active.clone(),
    };
    let is_active = Arc::ptr_eq(&top, active);
    if is_active && a.backing_file.is_some() {
        return Err(QmpError::generic(format!(
            "'backing-file' specified, but '{}' is the active layer",
            top.name()
        )));
    }
    if !is_active && !active.backing_chain().any(|c| Arc::ptr_eq(&c, &top)) {
        return Err(not_in_chain(top.name()));
    }
    Ok(top)
}

/// The base image `base-node` or `base` names below `top` (the bottom of
/// the chain by default), and the images between them.
fn find_base(
    state: &State,
    a: &CommitArgs,
    top: &Arc<Node>,
) -> Result<(Arc<Node>, Vec<Arc<Node>>), QmpError> {
    match (a.base_node.as_deref(), a.base.as_deref()) {
        (None, None) => {
            let chain: Vec<_> = top.backing_chain().collect();
            match chain.split_last() {
                Some((b, rest)) => Ok((b.clone(), rest.to_vec())),
                None => Err(QmpError::generic("cannot commit an image into itself")),
            }
        }
        (bn, bf) => {
            if bn == Some(top.name()) {
                return Err(QmpError::generic("cannot commit an image into itself"));
            }
            let (b, between) = split_chain(state, top, bn, bf).map_err(|e| match bn {
                Some(n) if !e.desc.contains("cannot be specified") => not_in_chain(n),
                _ => e,
            })?;
            let b = b.ok_or_else(|| QmpError::generic("no base image found"))?;
            Ok((b, between))
        }
    }
}

/// Checks block-commit's arguments and finds the images they name.
fn find_chain(state: &State, a: &CommitArgs) -> Result<Chain, QmpError> {
    if a.filter_node_name.is_some() {
        return Err(QmpError::generic(
            "'filter-node-name' is not supported: this daemon inserts no commit filter node",
        ));
    }
    let active = copy::skip_filters(
        &copy::resolve(state, &a.device)
            .map_err(|_| QmpError::not_found(format!("Device '{}' not found", a.device)))?,
    );
    let id = super::job_id(a.job_id.as_deref(), &a.device);
    super::check_id(&id)?;
    super::check_not_busy(&active)?;
    let top = find_top(state, a, &active)?;
    let (base, between) = find_base(state, a, &top)?;
    let speed = copy::check_speed(a.speed)?;
    if a.backing_file.as_ref().is_some_and(|f| f.len() > 1023) {
        return Err(QmpError::generic(
            "Parameter 'backing-file' is longer than 1023 bytes",
        ));
    }
    let above_base = between.last().cloned().unwrap_or_else(|| top.clone());
    Ok(Chain {
        id,
        is_active: Arc::ptr_eq(&top, &active),
        top,
        base,
        between,
        above_base,
        speed,
    })
}

/// block-commit.
pub fn commit(state: &Arc<State>, a: CommitArgs) -> Result<(), QmpError> {
    let c = find_chain(state, &a)?;
    // The data is written into base (and, for an active commit, top's
    // users move there).
    c.base.ensure_active().map_err(QmpError::generic)?;
    let o = BlockJobOptions {
        id: c.id.clone(),
        speed: c.speed,
        auto_finalize: a.auto_finalize,
        auto_dismiss: a.auto_dismiss,
    };
    {
        let edge = edge_into(&c.above_base, &c.base).ok_or_else(|| {
            QmpError::generic(format!(
                "'{}' is not the backing image above '{}'",
                c.above_base.name(),
                c.base.name()
            ))
        })?;
        make_base_writable(state, &c.base, edge)?;
    }
    if c.is_active {
        start_active(state, &a, c, &o)
    } else {
        start_intermediate(state, &a, c, &o)
    }
}

/// Active commit: a mirror from top to base of what lies above base; on
/// complete the users move to base and the images above it go.
fn start_active(
    state: &Arc<State>,
    a: &CommitArgs,
    c: Chain,
    o: &BlockJobOptions,
) -> Result<(), QmpError> {
    let g = c
        .base
        .cluster_size()
        .map_or(65536, |c| c.clamp(4096, 65536));
    let started = Mirror::start(state, &c.id, c.top.clone(), c.base.clone(), g, false, CHUNK);
    let mut m = match started {
        Ok(m) => m,
        Err(e) => {
            c.undo(state);
            return Err(e);
        }
    };
    m.on_source_error = a.on_error;
    m.on_target_error = a.on_error;
    let job = match super::register_block("commit", o, c.nodes()) {
        Ok(j) => j,
        Err(e) => {
            c.undo(state);
            return Err(e);
        }
    };
    let depth = c.between.len() as u32 + 1;
    let gone: Vec<Arc<Node>> = std::iter::once(c.top.clone())
        .chain(c.between.iter().cloned())
        .collect();
    let pivot: Pivot = Box::new(move |state: &State, m: &Mirror| {
        let users = copy::users(state, &m.source, &[]);
        users
            .replace(&m.source, &m.target)
            .map_err(|e| QmpError::generic(e.to_string()))?;
        for e in users.exports() {
            e.notify_config_change();
        }
        Ok(())
    });
    let st = state.clone();
    super::spawn(job, move |job| {
        let r = m.run(&st, job, Initial::Above(Some(depth)), pivot);
        let pivoted = r.is_ok() && job.state().complete_requested() && !job.is_cancelled();
        drop(m);
        job.with_command_lock(&st, || {
            if pivoted {
                // The base is the active image now; what was above it goes.
                drop_nodes(&st, &gone);
                log::info!("job {}: active commit into '{}'", job.id, c.base.name());
            } else {
                c.undo(&st);
            }
        });
        r
    });
    Ok(())
}

/// Commit of an intermediate image: a copy into base, then the overlay
/// of top takes base as its backing image.
fn start_intermediate(
    state: &Arc<State>,
    a: &CommitArgs,
    c: Chain,
    o: &BlockJobOptions,
) -> Result<(), QmpError> {
    let overlay = state
        .graph()
        .nodes()
        .find(|n| edge_into(n, &c.top).is_some())
        .cloned()
        .ok_or_else(|| QmpError::generic(format!("Node '{}' has no overlay", c.top.name())));
    let overlay = match overlay {
        Ok(o) => o,
        Err(e) => {
            c.undo(state);
            return Err(e);
        }
    };
    let edges = copy::job_edge(&c.id, c.top.clone(), false)
        .and_then(|t| copy::job_edge(&c.id, c.base.clone(), true).map(|b| (t, b)));
    let (top_edge, base_edge) = match edges {
        Ok(e) => e,
        Err(e) => {
            c.undo(state);
            return Err(e);
        }
    };
    let job = match super::register_block("commit", o, c.nodes()) {
        Ok(j) => j,
        Err(e) => {
            c.undo(state);
            return Err(e);
        }
    };
    job.progress(0, c.top.size());
    let w = Intermediate {
        top: c.top,
        overlay,
        base: c.base,
        between: c.between,
        above_base: c.above_base,
        backing_file: a.backing_file.clone(),
        on_error: a.on_error,
        top_edge,
        base_edge,
    };
    let st = state.clone();
    super::spawn(job, move |job| w.run(&st, job));
    Ok(())
}
