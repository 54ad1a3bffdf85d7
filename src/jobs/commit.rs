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
use crate::daemon::State;
use crate::drivers::Driver;

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
    fn run(&self, state: &State, job: &Job) -> Result<(), String> {
        let r = self.copy(job);
        let finalize = r.is_ok() && job.wait_finalize();
        job.with_command_lock(state, || {
            let r = r.and_then(|()| {
                if job.is_cancelled() || !finalize {
                    return Ok(());
                }
                copy::run(self.base.flush()).map_err(|e| copy::error_text(&e))?;
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

    fn copy(&self, job: &Job) -> Result<(), String> {
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

/// block-commit.
pub fn commit(state: &Arc<State>, a: CommitArgs) -> Result<(), String> {
    if a.filter_node_name.is_some() {
        return Err(
            "'filter-node-name' is not supported: this daemon inserts no commit filter node".into(),
        );
    }
    let active = copy::skip_filters(
        &copy::resolve(state, &a.device).map_err(|_| format!("Device '{}' not found", a.device))?,
    );
    let id = super::job_id(a.job_id.as_deref(), &a.device);
    super::check_id(&id)?;
    super::check_not_busy(&active)?;
    let not_in_chain = |n: &str| format!("'{n}' is not in this backing file chain");
    let top = match (&a.top_node, &a.top) {
        (Some(_), Some(_)) => return Err("'top-node' and 'top' are mutually exclusive".into()),
        (Some(n), None) => copy::node(state, n).map_err(|_| not_in_chain(n))?,
        (None, Some(f)) => std::iter::once(active.clone())
            .chain(copy::chain_below(&active))
            .find(|c| copy::names_file(c, f))
            .ok_or_else(|| format!("Top image file {f} not found"))?,
        (None, None) => active.clone(),
    };
    let is_active = Arc::ptr_eq(&top, &active);
    if is_active && a.backing_file.is_some() {
        return Err(format!(
            "'backing-file' specified, but '{}' is the active layer",
            top.name()
        ));
    }
    if !is_active
        && !copy::chain_below(&active)
            .iter()
            .any(|c| Arc::ptr_eq(c, &top))
    {
        return Err(not_in_chain(top.name()));
    }
    let (base, between) = match (a.base_node.as_deref(), a.base.as_deref()) {
        (None, None) => {
            let chain = copy::chain_below(&top);
            match chain.split_last() {
                Some((b, rest)) => (b.clone(), rest.to_vec()),
                None => return Err("cannot commit an image into itself".into()),
            }
        }
        (bn, bf) => {
            if bn == Some(top.name()) {
                return Err("cannot commit an image into itself".into());
            }
            let (b, between) = split_chain(state, &top, bn, bf).map_err(|e| match bn {
                Some(n) if !e.contains("cannot be specified") => not_in_chain(n),
                _ => e,
            })?;
            (b.ok_or_else(|| "no base image found".to_string())?, between)
        }
    };
    let speed = super::mirror::check_speed(a.speed)?;
    if a.backing_file.as_ref().is_some_and(|f| f.len() > 1023) {
        return Err("Parameter 'backing-file' is longer than 1023 bytes".into());
    }
    let above_base = between.last().cloned().unwrap_or_else(|| top.clone());
    let o = BlockJobOptions {
        id: id.clone(),
        speed,
        auto_finalize: a.auto_finalize,
        auto_dismiss: a.auto_dismiss,
    };
    let mut nodes = vec![top.clone(), base.clone()];
    nodes.extend(between.iter().cloned());
    {
        let edge = edge_into(&above_base, &base).ok_or_else(|| {
            format!(
                "'{}' is not the backing image above '{}'",
                above_base.name(),
                base.name()
            )
        })?;
        make_base_writable(state, &base, edge)?;
    }
    let undo = |state: &State| {
        state.drained(&base, || {
            make_base_read_only(&base, edge_into(&above_base, &base))
        });
    };
    if is_active {
        let g = match base.driver() {
            Driver::Qcow2(q) => q.cluster_size().clamp(4096, 65536),
            _ => 65536,
        };
        let mut m = match Mirror::start(state, &id, top.clone(), base.clone(), g, false, CHUNK) {
            Ok(m) => m,
            Err(e) => {
                undo(state);
                return Err(e);
            }
        };
        m.on_source_error = a.on_error;
        m.on_target_error = a.on_error;
        let job = match super::register_block("commit", &o, nodes) {
            Ok(j) => j,
            Err(e) => {
                undo(state);
                return Err(e);
            }
        };
        let depth = between.len() as u32 + 1;
        let gone: Vec<Arc<Node>> = std::iter::once(top.clone())
            .chain(between.iter().cloned())
            .collect();
        let pivot: Pivot = Box::new(move |state: &State, m: &Mirror| {
            let users = copy::users(state, &m.source, &[]);
            users
                .replace(&m.source, &m.target)
                .map_err(|e| e.to_string())?;
            for e in users.exports() {
                e.notify_config_change();
            }
            Ok(())
        });
        let st = state.clone();
        let base2 = base.clone();
        let above2 = above_base.clone();
        super::spawn(job, move |job| {
            let r = m.run(&st, job, Initial::Above(Some(depth)), pivot);
            let pivoted = r.is_ok() && job.state().complete_requested() && !job.is_cancelled();
            drop(m);
            job.with_command_lock(&st, || {
                if pivoted {
                    // The base is the active image now; what was above it goes.
                    drop_nodes(&st, &gone);
                    log::info!("job {}: active commit into '{}'", job.id, base2.name());
                } else {
                    st.drained(&base2, || {
                        make_base_read_only(&base2, edge_into(&above2, &base2))
                    });
                }
            });
            r
        });
        return Ok(());
    }
    let overlay = state
        .graph()
        .nodes()
        .find(|n| edge_into(n, &top).is_some())
        .cloned()
        .ok_or_else(|| format!("Node '{}' has no overlay", top.name()));
    let overlay = match overlay {
        Ok(o) => o,
        Err(e) => {
            undo(state);
            return Err(e);
        }
    };
    let edges = copy::job_edge(&id, top.clone(), false)
        .and_then(|t| copy::job_edge(&id, base.clone(), true).map(|b| (t, b)));
    let (top_edge, base_edge) = match edges {
        Ok(e) => e,
        Err(e) => {
            undo(state);
            return Err(e);
        }
    };
    let job = match super::register_block("commit", &o, nodes) {
        Ok(j) => j,
        Err(e) => {
            undo(state);
            return Err(e);
        }
    };
    job.progress(0, top.size());
    let c = Intermediate {
        top,
        overlay,
        base,
        between,
        above_base,
        backing_file: a.backing_file.clone(),
        on_error: a.on_error,
        top_edge,
        base_edge,
    };
    let st = state.clone();
    super::spawn(job, move |job| c.run(&st, job));
    Ok(())
}
