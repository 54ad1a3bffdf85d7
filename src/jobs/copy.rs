//! What the block jobs share: applying an error policy, finding the nodes
//! a job names, reading the chain's allocation, a job's I/O buffer, and
//! the users of a node (whose edges `block::users` moves).

use std::sync::Arc;

use crate::block::policy::{ErrorAction, OnError};
use crate::block::users::Users;
use crate::block::Allocation;
use crate::block::{BlockError, Child, ChildRole, Node, Perm};
use crate::drivers::ImageFormat;
use crate::io::IoVecs;
use crate::qapi::QmpError;
use crate::state::State;
use crate::vhost_user::ExportState;

/// The error text a job ends with: the system's words for the errno, as
/// QEMU reports it ("No space left on device").
pub fn error_text(e: &BlockError) -> String {
    let s = std::io::Error::from_raw_os_error(e.errno()).to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// A job's failure for an I/O error: the error text, as [`error_text`].
pub fn job_error(e: &BlockError) -> QmpError {
    QmpError::generic(error_text(e))
}

/// Runs `op` until it succeeds, applying `policy` to its failures.
/// `Ok(None)`: the failure was ignored; `Err`: the job must end with it.
pub fn with_policy<T>(
    job: &super::Job,
    policy: OnError,
    write: bool,
    mut op: impl FnMut() -> Result<T, BlockError>,
) -> Result<Option<T>, QmpError> {
    loop {
        match op() {
            Ok(v) => return Ok(Some(v)),
            Err(e) => match job.io_error(policy, write, &e) {
                ErrorAction::Report => return Err(job_error(&e)),
                ErrorAction::Ignore => return Ok(None),
                ErrorAction::Stop => {
                    if !job.pause_point() {
                        return Err(QmpError::generic("Operation canceled"));
                    }
                }
            },
        }
    }
}

/// Runs a node's future to completion on the job's thread (synchronous
/// engine: every operation completes as it is submitted; a wait for a
/// lock another iothread holds parks the thread until it is woken).
pub fn run<F: std::future::Future>(f: F) -> F::Output {
    futures::executor::block_on(f)
}

/// A job's bounce buffer.
pub struct Buffer {
    iov: IoVecs,
}

impl Buffer {
    pub fn new(len: u64) -> Buffer {
        let (iov, _view) = IoVecs::bounce(len as usize, 4096);
        Buffer { iov }
    }

    /// The first `n` bytes.
    pub fn part(&self, n: u64) -> IoVecs {
        self.iov.sub(0, n)
    }
}

/// The node `device` names: an export's node, or a node by name.
pub fn resolve(state: &State, device: &str) -> Result<Arc<Node>, QmpError> {
    if let Some(e) = state.export(device) {
        return Ok(e.blk.node().clone());
    }
    state.graph().get(device).map_err(|_| {
        QmpError::generic(format!(
            "Cannot find device='{device}' nor node-name='{device}'"
        ))
    })
}

/// The node a node name names, or QEMU's error for it.
pub fn node(state: &State, name: &str) -> Result<Arc<Node>, QmpError> {
    state
        .graph()
        .get(name)
        .map_err(|_| QmpError::generic(format!("Cannot find device='' nor node-name='{name}'")))
}

/// A job's target node (QEMU looks it up as a device or a node name).
pub fn target(state: &State, name: &str) -> Result<Arc<Node>, QmpError> {
    let n = state.graph().get(name).map_err(|_| {
        QmpError::generic(format!(
            "Cannot find device='{name}' nor node-name='{name}'"
        ))
    })?;
    super::check_not_busy(&n)?;
    Ok(n)
}

/// A job's `speed`: refused when negative.
pub fn check_speed(speed: i64) -> Result<u64, QmpError> {
    u64::try_from(speed)
        .map_err(|_| QmpError::generic("Parameter 'speed' expects a non-negative value"))
}

/// The format name a header records for a backing image.
pub fn format_of(node: &Node) -> &'static str {
    match node.image_format() {
        Some(ImageFormat::Qcow2) => "qcow2",
        _ => "raw",
    }
}

/// Whether `node`'s image is the file `f` (as given, or the same file by
/// its canonical path).
pub fn names_file(node: &Node, f: &str) -> bool {
    crate::drivers::file_name_of(node).is_some_and(|n| {
        n == f
            || std::fs::canonicalize(&n)
                .ok()
                .is_some_and(|c| std::fs::canonicalize(f).ok() == Some(c))
    })
}

/// Below any filters (throttle, copy-on-read): the node that holds data.
pub fn skip_filters(node: &Arc<Node>) -> Arc<Node> {
    Node::skip_filters(node)
}

/// Whether `[offset, ..)` of `top` reads as data from an image above
/// `base_depth` (the depth of the base below top; None: no base), and for
/// how many bytes (at most `len`) the answer holds. Zero clusters count as
/// allocated (they hide what is below them).
pub fn allocated_above(
    top: &Node,
    base_depth: Option<u32>,
    offset: u64,
    len: u64,
) -> Result<(bool, u64), BlockError> {
    let st = run(top.block_status(offset, len))?;
    let n = st.len.clamp(1, len);
    let above = st.kind != Allocation::Unallocated && base_depth.is_none_or(|b| st.depth < b);
    Ok((above, n))
}

/// Whether `[offset, ..)` of `node` is allocated in `node` itself (not in
/// its backing chain), and for how many bytes.
pub fn allocated_in_top(node: &Node, offset: u64, len: u64) -> Result<(bool, u64), BlockError> {
    let st = run(node.block_status(offset, len))?;
    let n = st.len.clamp(1, len);
    Ok((st.kind != Allocation::Unallocated && st.depth == 0, n))
}

/// Whether `[offset, ..)` of `node` reads as zeroes (a zero cluster, or
/// nothing allocated in the whole chain), and for how many bytes.
pub fn reads_zero(node: &Node, offset: u64, len: u64) -> Result<(bool, u64), BlockError> {
    let st = run(node.block_status(offset, len))?;
    let n = st.len.clamp(1, len);
    Ok((
        matches!(st.kind, Allocation::Zero | Allocation::Unallocated),
        n,
    ))
}

/// The users of `node` (export roots and parents in the graph, but the
/// parents named in `except`): the edges a graph change moves.
pub fn users(state: &State, node: &Arc<Node>, except: &[&str]) -> Users<Arc<ExportState>> {
    let exports = state
        .export_states()
        .into_iter()
        .map(|e| {
            let blk = e.blk.clone();
            (e, blk)
        })
        .collect();
    Users::of(state.graph().nodes(), exports, node, except)
}

/// A root edge for a job's own I/O on a node (QEMU's job BlockBackend).
pub fn job_edge(job_id: &str, node: Arc<Node>, write: bool) -> Result<Child, QmpError> {
    let mut perm = crate::block::Perm::CONSISTENT_READ;
    if write {
        perm = perm | crate::block::Perm::WRITE;
    }
    Child::attach(job_id, ChildRole::Root, node, perm, crate::block::Perm::ALL)
        .map_err(|e| QmpError::generic(e.to_string()))
}

/// The edge a job writes a target through: nobody else may write the
/// target meanwhile (QEMU's mirror and backup targets share reads only).
pub fn target_edge(job_id: &str, node: Arc<Node>) -> Result<Child, QmpError> {
    use crate::block::Perm;
    Child::attach(
        job_id,
        ChildRole::Root,
        node,
        Perm::CONSISTENT_READ | Perm::WRITE,
        Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED,
    )
    .map_err(|e| QmpError::generic(e.to_string()))
}

/// Makes an image of a chain writable for a job that writes into it
/// (commit's base, stream into an intermediate image: qcow2, or raw over
/// a file), and lets the backing edge above it share writes meanwhile.
pub fn make_base_writable(
    state: &State,
    base: &Arc<Node>,
    edge_above: &Child,
) -> Result<(), QmpError> {
    state.drained(base, || -> Result<(), QmpError> {
        base.reopen_writable().map_err(QmpError::generic)?;
        edge_above.set_perm(edge_above.perm(), edge_above.shared() | Perm::WRITE);
        Ok(())
    })
}

/// The image back to a read-only backing image after the job (the edge
/// above it shares no writes again, when given).
pub fn make_base_read_only(base: &Node, edge_above: Option<&Child>) {
    if let Some(e) = edge_above {
        e.set_perm(e.perm(), Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED);
    }
    base.make_read_only();
}

/// The backing edge that points at `node` from the image above it.
pub fn edge_into<'a>(above: &'a Node, node: &Arc<Node>) -> Option<&'a Child> {
    above
        .children()
        .into_iter()
        .find(|c| c.role() == ChildRole::Backing && Arc::ptr_eq(c.node(), node))
}
