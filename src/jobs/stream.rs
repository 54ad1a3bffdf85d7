//! block-stream: copy what the top image reads from its backing chain
//! (down to `base`, exclusive) into the top image, then make `base` its
//! backing image and drop the images in between.
//!
//! ```text
//!   before:  export -> top -> mid -> base          (guest keeps writing)
//!   job:     export -> copy-on-read filter (bottom = mid) -> top -> mid -> base
//!            the job reads every extent found in mid through the filter,
//!            which writes it into top, serialised with guest writes
//!   after:   export -> top -> base    (top's header names base)
//! ```
//!
//! The filter also copies what the guest reads, as QEMU's stream does.

use std::sync::Arc;

use serde::Deserialize;

use super::copy;
use super::OnError;
use super::{BlockJobOptions, Job};
use crate::block::{Child, ChildRole, Node, Perm};
use crate::drivers::BlockdevOptions;
use crate::qapi::QmpError;
use crate::state::State;

const CHUNK: u64 = 1 << 20;

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct StreamArgs {
    pub job_id: Option<String>,
    pub device: String,
    pub base: Option<String>,
    pub base_node: Option<String>,
    pub backing_file: Option<String>,
    pub backing_mask_protocol: Option<bool>,
    pub bottom: Option<String>,
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

/// A chain cut at its base: the base (None: the bottom of the chain) and
/// the images between the top and it.
pub(super) type Split = (Option<Arc<Node>>, Vec<Arc<Node>>);

/// Finds the base a job names (by node name, or by file name as `base`)
/// in the chain below `top`; returns it and the images above it.
pub(super) fn split_chain(
    state: &State,
    top: &Node,
    base_node: Option<&str>,
    base_file: Option<&str>,
) -> Result<Split, QmpError> {
    let chain: Vec<_> = top.backing_chain().collect();
    let pos = match (base_node, base_file) {
        (Some(_), Some(_)) => {
            return Err(QmpError::generic(
                "'base' and 'base-node' cannot be specified at the same time",
            ))
        }
        (Some(n), None) => {
            let b = copy::node(state, n)?;
            Some(
                chain
                    .iter()
                    .position(|c| Arc::ptr_eq(c, &b))
                    .ok_or_else(|| format!("Node '{n}' is not a backing image of '{}'", top.name()))
                    .map_err(QmpError::generic)?,
            )
        }
        (None, Some(f)) => Some(
            chain
                .iter()
                .position(|c| copy::names_file(c, f))
                .ok_or_else(|| {
                    QmpError::generic(format!("Can't find '{f}' in the backing chain"))
                })?,
        ),
        (None, None) => None,
    };
    Ok(match pos {
        Some(p) => (Some(chain[p].clone()), chain[..p].to_vec()),
        None => (None, chain),
    })
}

/// Makes `base` the backing image of `top` (None: no backing image), in
/// the graph and in top's header; the old backing edge is released.
/// The caller holds top's users drained.
pub(super) fn set_backing(
    top: &Node,
    base: Option<&Arc<Node>>,
    backing_file: Option<&str>,
) -> Result<(), QmpError> {
    let Some(q) = top.backing_file() else {
        return Err(QmpError::generic(format!(
            "node '{}' has no backing image",
            top.name()
        )));
    };
    let name = match (base, backing_file) {
        (_, Some(f)) => f.to_string(),
        (Some(b), None) => crate::drivers::file_name_of(b).unwrap_or_default(),
        (None, None) => String::new(),
    };
    let child = base
        .map(|b| {
            Child::attach(
                top.name(),
                ChildRole::Backing,
                b.clone(),
                Perm::CONSISTENT_READ,
                Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED,
            )
            .map_err(|e| QmpError::generic(e.to_string()))
        })
        .transpose()?;
    q.change_backing_file_and_format(&name, base.map(|b| copy::format_of(b)))
        .map_err(QmpError::generic)?;
    q.replace_backing(child);
    Ok(())
}

/// Drops the images a job took out of a chain: implicit ones (opened from
/// headers) leave the graph; those added by the user stay, unused.
pub(super) fn drop_nodes(state: &State, nodes: &[Arc<Node>]) {
    let mut graph = state.graph();
    for n in nodes {
        if graph.is_implicit(n.name()) && n.parents().is_empty() {
            if let Err(e) = graph.remove(n.name()) {
                log::warn!("removing node {}: {e}", n.name());
            }
        }
    }
}

struct Stream {
    top: Arc<Node>,
    base: Option<Arc<Node>>,
    between: Vec<Arc<Node>>,
    filter: Arc<Node>,
    backing_file: Option<String>,
    on_error: OnError,
    /// The image above `top` when top is an intermediate image, made
    /// writable for the job.
    overlay: Option<Arc<Node>>,
    edge: Child,
}

impl Stream {
    fn run(&self, state: &State, job: &Job) -> Result<(), QmpError> {
        let r = self.copy(job);
        let finalize = r.is_ok() && job.wait_finalize();
        job.with_command_lock(state, || {
            let r = r.and_then(|()| {
                if job.is_cancelled() || !finalize {
                    return Ok(());
                }
                // What was copied is durable before the header stops
                // naming the images it came from.
                copy::run(self.top.flush()).map_err(|e| copy::job_error(&e))?;
                state.drained(&self.top, || {
                    set_backing(&self.top, self.base.as_ref(), self.backing_file.as_deref())
                })
            });
            self.remove_filter(state);
            self.back_to_read_only(state);
            if r.is_ok() && !job.is_cancelled() {
                drop_nodes(state, &self.between);
                log::info!("job {}: streamed into '{}'", job.id, self.top.name());
            }
            r
        })
    }

    fn copy(&self, job: &Job) -> Result<(), QmpError> {
        if self.filter.driver_name() != "copy-on-read" {
            return Err(QmpError::generic("the stream filter is gone"));
        }
        let cor: &Node = &self.filter;
        let size = self.top.size();
        let base_depth = self.base.as_ref().map(|_| self.between.len() as u32 + 1);
        let buf = copy::Buffer::new(CHUNK);
        let mut off = 0;
        job.progress(0, size);
        while off < size {
            if !job.pause_point() {
                return Ok(());
            }
            let len = (size - off).min(CHUNK);
            let r = copy::with_policy(job, self.on_error, false, || {
                // Data found below the top and above the base is copied.
                let st = copy::run(self.top.block_status(off, len))?;
                let n = st.len.clamp(1, len);
                let below_top = st.kind != crate::drivers::Allocation::Unallocated
                    && st.depth > 0
                    && base_depth.is_none_or(|b| st.depth < b);
                if below_top {
                    copy::run(cor.preadv(off, &buf.part(n)))?;
                }
                Ok((n, below_top))
            })?;
            let (n, copied) = r.unwrap_or((len, false));
            off += n;
            job.progress(off, size);
            if !job.rate_limit(if copied { n } else { 0 }) {
                return Ok(());
            }
        }
        Ok(())
    }

    /// An intermediate image goes back to being a read-only backing image.
    fn back_to_read_only(&self, state: &State) {
        if let Some(o) = &self.overlay {
            self.edge.release();
            state.drained(&self.top, || {
                copy::make_base_read_only(&self.top, copy::edge_into(o, &self.top))
            });
        }
    }

    /// Moves the filter's users back to the top image and drops it.
    fn remove_filter(&self, state: &State) {
        let users = copy::users(state, &self.filter, &[]);
        let r = state.drained_many(&[&self.filter, &self.top], || {
            users.replace(&self.filter, &self.top)
        });
        if let Err(e) = r {
            log::error!("job: moving users back from '{}': {e}", self.filter.name());
            return;
        }
        if let Err(e) = state.del_blockdev(self.filter.name()) {
            log::error!("removing the stream filter: {e}");
        }
    }
}

/// block-stream.
pub fn stream(state: &Arc<State>, a: StreamArgs) -> Result<(), QmpError> {
    let top = copy::skip_filters(&copy::resolve(state, &a.device)?);
    let id = super::job_id(a.job_id.as_deref(), &a.device);
    super::check_id(&id)?;
    super::check_not_busy(&top)?;
    // The data is copied into top.
    top.ensure_active().map_err(QmpError::generic)?;
    if top.backing_file().is_none() {
        return Err(QmpError::generic(format!(
            "node '{}' has no backing image to stream from",
            top.name()
        )));
    }
    let overlay = find_overlay(state, &top)?;
    let (base, between) = find_base(state, &a, &top)?;
    let speed = copy::check_speed(a.speed)?;
    if a.backing_file.as_ref().is_some_and(|f| f.len() > 1023) {
        return Err(QmpError::generic(
            "Parameter 'backing-file' is longer than 1023 bytes",
        ));
    }
    let filter_name = a
        .filter_node_name
        .clone()
        .unwrap_or_else(|| format!("{id}-stream-filter"));
    let bottom = between.last().map(|n| n.name().to_string());
    let opts = BlockdevOptions::from_json(serde_json::json!({
        "driver": "copy-on-read",
        "node-name": filter_name,
        "file": top.name(),
        "bottom": bottom,
    }))
    .map_err(QmpError::generic)?;
    let (edge, filter) = insert_filter(state, &id, &top, overlay.as_ref(), &opts)?;
    let mut nodes = vec![top.clone(), filter.clone()];
    nodes.extend(between.iter().cloned());
    nodes.extend(base.iter().cloned());
    let o = BlockJobOptions {
        id: id.clone(),
        speed,
        auto_finalize: a.auto_finalize,
        auto_dismiss: a.auto_dismiss,
    };
    let s = Stream {
        top,
        base,
        between,
        filter,
        backing_file: a.backing_file.clone(),
        on_error: a.on_error,
        overlay,
        edge,
    };
    let job = match super::register_block("stream", &o, nodes) {
        Ok(j) => {
            j.progress(0, s.top.size());
            j
        }
        Err(e) => {
            s.remove_filter(state);
            s.back_to_read_only(state);
            return Err(e);
        }
    };
    let st = state.clone();
    super::spawn(job, move |job| s.run(&st, job));
    Ok(())
}

/// Streaming into an intermediate image (a read-only backing image of
/// the image above it) writes into it: the image above, whose backing
/// edge must share writes meanwhile. None for a writable (active) top.
fn find_overlay(state: &State, top: &Arc<Node>) -> Result<Option<Arc<Node>>, QmpError> {
    let overlay = top.is_read_only().then(|| {
        state
            .graph()
            .nodes()
            .find(|n| copy::edge_into(n, top).is_some())
            .cloned()
    });
    match overlay {
        Some(None) => Err(QmpError::generic(format!(
            "Node '{}' is read-only",
            top.name()
        ))),
        o => Ok(o.flatten()),
    }
}

/// The base (`bottom`, `base` or `base-node`) and the images between top
/// and it, top's backing first.
fn find_base(state: &State, a: &StreamArgs, top: &Arc<Node>) -> Result<Split, QmpError> {
    if a.bottom.is_some() && (a.base.is_some() || a.base_node.is_some()) {
        return Err(QmpError::generic(
            "'bottom' and 'base'/'base-node' cannot be specified at the same time",
        ));
    }
    match &a.bottom {
        Some(b) => {
            let bottom = copy::node(state, b)?;
            let chain: Vec<_> = top.backing_chain().collect();
            let p = chain
                .iter()
                .position(|c| Arc::ptr_eq(c, &bottom))
                .ok_or_else(|| {
                    QmpError::generic(format!(
                        "Node '{b}' is not a backing image of '{}'",
                        top.name()
                    ))
                })?;
            Ok((chain.get(p + 1).cloned(), chain[..=p].to_vec()))
        }
        None => split_chain(state, top, a.base_node.as_deref(), a.base.as_deref()),
    }
}

/// Makes an intermediate top writable, takes the job's edge on it and
/// puts the copy-on-read filter above it (its users move to the filter);
/// on a failure, undoes what it did.
fn insert_filter(
    state: &State,
    id: &str,
    top: &Arc<Node>,
    overlay: Option<&Arc<Node>>,
    opts: &BlockdevOptions,
) -> Result<(Child, Arc<Node>), QmpError> {
    if let Some(o) = overlay {
        let e = copy::edge_into(o, top).ok_or_else(|| QmpError::generic("the chain changed"))?;
        copy::make_base_writable(state, top, e)?;
    }
    let back_to_read_only = |state: &State| {
        if let Some(o) = overlay {
            state.drained(top, || {
                copy::make_base_read_only(top, copy::edge_into(o, top))
            });
        }
    };
    let edge = match copy::job_edge(id, top.clone(), true) {
        Ok(e) => e,
        Err(e) => {
            back_to_read_only(state);
            return Err(e);
        }
    };
    let filter = match state.graph().add_implicit(opts) {
        Ok(f) => f,
        Err(e) => {
            drop(edge);
            back_to_read_only(state);
            return Err(QmpError::generic(e.to_string()));
        }
    };
    let users = copy::users(state, top, &[filter.name()]);
    if let Err(e) = state.drained(top, || users.replace(top, &filter)) {
        let _ = state.del_blockdev(filter.name());
        drop(edge);
        back_to_read_only(state);
        return Err(QmpError::generic(e.to_string()));
    }
    Ok((edge, filter))
}
