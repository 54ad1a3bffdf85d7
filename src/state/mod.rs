//! The daemon's runtime state: the block graph, the exports, and the
//! subsystems registered to take part in drained sections (block jobs:
//! see [`DrainParticipant`]). Changed at start-up and at run
//! time (by the monitor's commands), and shut down. It knows nothing of
//! QMP nor of the process: the shell (`shell.rs`) builds it, registers the
//! participants and runs the monitors.
//!
//! ```text
//!   mod.rs          State: graph, nodes, objects, drained sections,
//!                   block_resize, shutdown
//!   exports.rs      exports: bind, start, delete, list
//!   iothread.rs     x-blockdev-set-iothread: a component's exports moved
//!   reopen.rs       blockdev-reopen: prepare, check, commit
//!   participant.rs  DrainParticipant, what block jobs implement (jobs/drain.rs)
//!   error.rs        StateError and the refusals it carries
//! ```
//!
//! Locking: `graph` and `exports` are taken by management only (start-up,
//! monitor threads), always in that order; the I/O path never takes them.

mod active;
mod error;
mod exports;
mod iothread;
mod nbd;
mod participant;
pub mod qmp;
mod reopen;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use crate::block::{Graph, GraphError, Node};
use crate::drivers::BlockdevOptions;
use crate::events::EventBus;
use crate::io::EngineKind;
use crate::vhost_user::{ExportState, ServerControl};

pub use active::ActiveError;
pub use error::{DataLost, ExportRefusal, ReopenError, StateError};
pub use nbd::NbdExportInfo;
pub use participant::{Busy, DrainParticipant, Resume};

/// How long shutdown waits for requests in flight.
const SHUTDOWN_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// An export whose server thread runs.
struct RunningExport {
    state: Arc<ExportState>,
    control: Arc<ServerControl>,
    socket: Option<PathBuf>,
    shutting_down: bool,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// What query-block-exports tells of one export.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    pub id: String,
    pub node_name: String,
    pub shutting_down: bool,
    /// The device's write cache is on.
    pub writeback: bool,
    /// The iothread objects its threads run as (x-blockdev-set-iothread).
    pub iothreads: Vec<String>,
    /// Its current connection's worker threads (ids).
    pub thread_ids: Vec<i32>,
}

/// The graph and the exports, shared by start-up, the monitors and shutdown.
pub struct State {
    engine: EngineKind,
    graph: Mutex<Graph>,
    exports: Mutex<BTreeMap<String, RunningExport>>,
    /// Called by drained sections, block_resize and shutdown, in this order.
    participants: RwLock<Vec<Arc<dyn DrainParticipant>>>,
    pub events: EventBus,
    /// Held by every monitor command from start to end, as QEMU's big lock
    /// serialises QMP: graph changes (snapshots, transactions) never
    /// interleave.
    commands: Mutex<()>,
    /// `--object iothread` / object-add: their properties, which exports
    /// naming them take (config::ExportConfig::iothreads).
    iothreads: Mutex<BTreeMap<String, crate::config::IothreadOptions>>,
    /// The NBD server (nbd.rs), with its exports.
    nbd: Mutex<Option<crate::nbd::NbdServer>>,
    /// `tls-creds-x509` objects (endpoint=server), loaded when added.
    tls_creds: Mutex<BTreeMap<String, crate::nbd::server::tls::TlsCreds>>,
}

/// [`State::command_lock`]'s guard. The fields drop in this order: what
/// the command replaced goes while the lock is still held.
pub struct CommandGuard<'a> {
    _retired: crate::block::swap::RetireScope,
    _lock: MutexGuard<'a, ()>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl State {
    /// The lock one monitor command (or a job's graph change) holds
    /// while it runs. Values that graph changes replace meanwhile (edges'
    /// old nodes, a node's old backing edge) are dropped when it is
    /// released (see `crate::block::swap`).
    pub fn command_lock(&self) -> CommandGuard<'_> {
        let lock = lock(&self.commands);
        CommandGuard {
            _retired: crate::block::swap::RetireScope::enter(),
            _lock: lock,
        }
    }

    /// An empty State. The subsystems that work on nodes register with
    /// [`State::register`] before anything else runs.
    pub fn new(engine: EngineKind) -> Arc<State> {
        Arc::new(State {
            engine,
            graph: Mutex::new(Graph::new()),
            exports: Mutex::new(BTreeMap::new()),
            participants: RwLock::new(Vec::new()),
            commands: Mutex::new(()),
            iothreads: Mutex::new(BTreeMap::new()),
            nbd: Mutex::new(None),
            tls_creds: Mutex::new(BTreeMap::new()),
            events: crate::events::global().clone(),
        })
    }

    /// Adds a participant to every drained section, resize and shutdown
    /// from now on, after those registered before it.
    pub fn register(&self, p: Arc<dyn DrainParticipant>) {
        self.participants
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push(p);
    }

    fn participants(&self) -> Vec<Arc<dyn DrainParticipant>> {
        self.participants
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// x-debug-panic (debug builds, for tests): panics holding the graph
    /// and the export table, as a bug in a command would.
    #[cfg(debug_assertions)]
    pub fn debug_panic(&self) -> ! {
        let _graph = self.graph();
        let _exports = lock(&self.exports);
        panic!("x-debug-panic: a panic on purpose");
    }

    pub fn graph(&self) -> MutexGuard<'_, Graph> {
        lock(&self.graph)
    }

    pub fn add_blockdev(&self, opts: &BlockdevOptions) -> Result<Arc<Node>, GraphError> {
        let node = self.graph().add(opts)?;
        log::info!(
            "node {} ({}): {} bytes{}{}",
            node.name(),
            node.driver_name(),
            node.size(),
            if node.is_read_only() {
                ", read-only"
            } else {
                ""
            },
            if node.is_active() { "" } else { ", inactive" }
        );
        Ok(node)
    }

    /// object-add.
    pub fn add_object(&self, o: &crate::config::ObjectOptions) -> Result<(), StateError> {
        let dup = |id: &str| {
            StateError::Object(format!(
                "attempt to add duplicate property '{id}' to object (type 'container')"
            ))
        };
        match o {
            crate::config::ObjectOptions::Secret(s) => {
                let mut g = self.graph();
                if lock(&self.iothreads).contains_key(&s.id)
                    || g.throttle_group(&s.id).is_some()
                    || g.secret(&s.id).is_some()
                {
                    return Err(dup(&s.id));
                }
                let secret = crate::secret::Secret::load(s).map_err(StateError::Object)?;
                g.add_secret(secret);
                log::info!("secret {}: created", s.id);
            }
            crate::config::ObjectOptions::ThrottleGroup(t) => {
                if lock(&self.iothreads).contains_key(&t.id)
                    || lock(&self.tls_creds).contains_key(&t.id)
                    || self.graph().secret(&t.id).is_some()
                {
                    return Err(dup(&t.id));
                }
                self.graph()
                    .add_throttle_group(&t.id, t.limits.clone())
                    .map_err(StateError::Object)?;
                log::info!("throttle group {}: created", t.id);
            }
            crate::config::ObjectOptions::Iothread(t) => {
                if t.id.is_empty() {
                    return Err(StateError::Object("'id' must not be empty".into()));
                }
                let mut threads = lock(&self.iothreads);
                if threads.contains_key(&t.id) || self.graph().throttle_group(&t.id).is_some() {
                    return Err(dup(&t.id));
                }
                threads.insert(t.id.clone(), t.clone());
                log::info!("iothread {}: created", t.id);
            }
            crate::config::ObjectOptions::TlsCredsX509(t) => self.add_tls_creds(t)?,
        }
        Ok(())
    }

    /// object-del of an iothread: false when there is none of that id.
    /// Exports that named it keep their own threads and settings.
    pub fn del_iothread(&self, id: &str) -> bool {
        lock(&self.iothreads).remove(id).is_some()
    }

    /// The iothread object `id`.
    pub fn iothread(&self, id: &str) -> Option<crate::config::IothreadOptions> {
        lock(&self.iothreads).get(id).cloned()
    }

    /// Removes a node no one uses (no export, no parent node).
    pub fn del_blockdev(&self, name: &str) -> Result<(), GraphError> {
        self.graph().remove(name)?;
        log::info!("node {name}: deleted");
        Ok(())
    }

    /// Runs `f` in a drained section of every export whose graph reaches
    /// `node`: they stop popping requests, the ones in flight complete, `f`
    /// runs, then the queues run again.
    pub fn drained<R>(&self, node: &Node, f: impl FnOnce() -> R) -> R {
        self.drained_many(&[node], f)
    }

    /// Like [`State::drained`], for every export that reaches any of `nodes`.
    /// The registered participants quiesce first (block jobs working on a
    /// node below or above one of them pause at their next pause point,
    /// except the calling job itself), and resume last.
    pub fn drained_many<R>(&self, nodes: &[&Node], f: impl FnOnce() -> R) -> R {
        let resumes: Vec<Resume> = self
            .participants()
            .iter()
            .map(|p| p.drain_begin(nodes))
            .collect();
        let affected: Vec<Arc<ExportState>> = self
            .export_states()
            .into_iter()
            .filter(|e| nodes.iter().any(|n| e.blk.node().reaches(n)))
            .collect();
        for e in &affected {
            if !e.drained_begin(SHUTDOWN_DRAIN_TIMEOUT) {
                log::error!(
                    "export {}: {} requests still in flight after {:?}; going on",
                    e.config.id,
                    e.in_flight().get(),
                    SHUTDOWN_DRAIN_TIMEOUT
                );
            }
        }
        let nbd = self.nbd_drain_begin(nodes);
        let r = f();
        if nbd {
            crate::nbd::server::gate().drain_end();
        }
        for e in &affected {
            e.drained_end();
        }
        for resume in resumes.into_iter().rev() {
            resume.run();
        }
        r
    }

    /// block_resize: the node's new size, set in a drained section.
    pub fn resize(&self, name: &str, size: u64) -> Result<(), StateError> {
        let node = self.graph().get(name)?;
        if size % 512 != 0 {
            return Err(StateError::ResizeUnaligned(size));
        }
        let participants = self.participants();
        for n in
            std::iter::once(node.clone()).chain(node.children().iter().map(|c| c.node().clone()))
        {
            for p in &participants {
                p.check_resize(&n)?;
            }
        }
        self.drained(&node, || -> Result<(), StateError> {
            node.truncate(size).map_err(StateError::Truncate)?;
            node.resize_bitmaps();
            for p in &participants {
                p.resized(&node);
            }
            Ok(())
        })?;
        log::info!("node {name}: resized to {size} bytes");
        for e in self.export_states() {
            if e.blk.node().reaches(&node) {
                e.notify_config_change();
            }
        }
        Ok(())
    }

    /// Stops taking requests, waits for those in flight, flushes every node.
    /// Requests parked by the `stop` policy fail at once (nobody will
    /// `cont`). Err lists what did not reach the disk: dropped writes,
    /// failed flushes.
    pub fn shutdown(&self) -> Result<(), DataLost> {
        // Participants first (block jobs are cancelled): none may write
        // once nodes are flushed and closed.
        for p in self.participants() {
            p.shutdown(SHUTDOWN_DRAIN_TIMEOUT);
        }
        // NBD clients are disconnected (each ends the request it is in).
        self.nbd_shutdown();
        let mut lost = self.drain_exports_for_shutdown();
        let nodes: Vec<Arc<Node>> = self.graph().nodes().cloned().collect();
        for node in &nodes {
            if let Err(e) = futures::executor::block_on(node.flush()) {
                let msg = format!("flush of node {} failed: {e}", node.name());
                log::error!("{msg}");
                lost.push(msg);
            }
        }
        // Parents before children: a format writes its metadata into its
        // file child as it closes.
        let mut order: Vec<&Arc<Node>> = nodes.iter().collect();
        order.sort_by_key(|n| std::cmp::Reverse(depth_below(n)));
        for node in order {
            node.close();
        }
        if lost.is_empty() {
            Ok(())
        } else {
            Err(DataLost(lost))
        }
    }
}

/// The longest path from `node` down to a leaf, over all children (for
/// close order; not a backing-chain walk: that is `Node::backing_chain`).
fn depth_below(node: &Node) -> usize {
    node.children()
        .iter()
        .map(|c| 1 + depth_below(c.node()))
        .max()
        .unwrap_or(0)
}
