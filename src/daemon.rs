//! The running daemon: its block graph and exports, changed at start-up and
//! at run time (QMP), and its start-up and shutdown.
//!
//! ```text
//!   block SIGTERM/SIGINT -> [daemonize] -> lock pidfile -> State::add_blockdev
//!          (Graph) -> State::bind_export (socket) -> write pidfile
//!          -> start exports and monitors
//!   SIGTERM/SIGINT/quit -> quiesce exports, fail parked requests -> drain
//!          -> flush every node -> remove sockets and pidfile
//!          -> exit 0 (1 if a parked write was dropped or a flush failed)
//! ```
//!
//! Locking: `graph` and `exports` are taken by management only (start-up,
//! monitor threads), always in that order; the I/O path never takes them.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::json;

use crate::block::{BlockBackend, ChildRole, Graph, GraphError, Node};
use crate::config::{Config, ExportConfig};
use crate::drivers::{BlockdevOptions, Driver};
use crate::events::EventBus;
use crate::io::EngineKind;
use crate::qmp::{Monitor, MonitorError};
use crate::signals::TerminationSignals;
use crate::vhost_user::{ExportState, Server, ServerControl, ServerError};

/// How long shutdown waits for requests in flight.
const SHUTDOWN_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Graph(#[from] GraphError),
    #[error("export '{export}': {reason}")]
    Export { export: String, reason: String },
    #[error(transparent)]
    Server(#[from] ServerError),
    #[error(transparent)]
    Monitor(#[from] MonitorError),
    #[error("--object: {reason}")]
    Object { reason: String },
    #[error("cannot write pidfile {path}")]
    Pidfile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// qemu-storage-daemon's words.
    #[error("cannot create pid file {path}: Cannot lock pid file (another instance runs?)")]
    PidfileLocked {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Exit status 1: data did not reach the disk.
    #[error("shutdown lost data: {reason}")]
    Shutdown { reason: String },
    #[error("cannot daemonize")]
    Daemonize(#[source] std::io::Error),
    #[error("cannot set up signal handling")]
    Signals(#[source] std::io::Error),
}

/// An export whose server thread runs.
struct RunningExport {
    state: Arc<ExportState>,
    control: Arc<ServerControl>,
    socket: Option<PathBuf>,
    shutting_down: bool,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The graph and the exports, shared by start-up, the monitors and shutdown.
pub struct State {
    engine: EngineKind,
    graph: Mutex<Graph>,
    exports: Mutex<BTreeMap<String, RunningExport>>,
    pub events: EventBus,
    /// Held by every monitor command from start to end, as QEMU's big lock
    /// serialises QMP: graph changes (snapshots, transactions) never
    /// interleave.
    commands: Mutex<()>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl State {
    /// The lock one monitor command holds while it runs.
    pub fn command_lock(&self) -> MutexGuard<'_, ()> {
        lock(&self.commands)
    }

    pub fn new(engine: EngineKind) -> Arc<State> {
        Arc::new(State {
            engine,
            graph: Mutex::new(Graph::new()),
            exports: Mutex::new(BTreeMap::new()),
            commands: Mutex::new(()),
            events: crate::events::global().clone(),
        })
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
            "node {} ({}): {} bytes{}",
            node.name(),
            node.driver_name(),
            node.size(),
            if node.is_read_only() {
                ", read-only"
            } else {
                ""
            }
        );
        Ok(node)
    }

    /// object-add.
    pub fn add_object(&self, o: &crate::config::ObjectOptions) -> Result<(), String> {
        let crate::config::ObjectOptions::ThrottleGroup(t) = o;
        self.graph().add_throttle_group(&t.id, t.limits.clone())?;
        log::info!("throttle group {}: created", t.id);
        Ok(())
    }

    /// Removes a node no one uses (no export, no parent node).
    pub fn del_blockdev(&self, name: &str) -> Result<(), GraphError> {
        self.graph().remove(name)?;
        log::info!("node {name}: deleted");
        Ok(())
    }

    /// Validates an export against its node and opens its socket; the
    /// server does not run until [`State::start_export`].
    pub fn bind_export(&self, e: &ExportConfig) -> Result<Server, DaemonError> {
        let err = |reason: String| DaemonError::Export {
            export: e.id.clone(),
            reason,
        };
        if lock(&self.exports).contains_key(&e.id) {
            return Err(err("an export with this id already exists".into()));
        }
        let node = self.graph().get(&e.node_name)?;
        let align = node.request_alignment();
        if e.logical_block_size % align != 0 {
            return Err(err(format!(
                "logical-block-size {} is smaller than the {align}-byte alignment node '{}' needs \
                 (cache.direct=on on a device with larger sectors); set logical-block-size={align}",
                e.logical_block_size,
                node.name()
            )));
        }
        if node.size() < u64::from(e.logical_block_size) {
            return Err(err(format!(
                "node '{}' ({} bytes) is smaller than one logical block ({})",
                node.name(),
                node.size(),
                e.logical_block_size
            )));
        }
        let blk = BlockBackend::new(&e.id, node, e.writable)?;
        let state = Arc::new(ExportState::new(e.clone(), Arc::new(blk), self.engine));
        let server = Server::bind(state)?;
        log::info!(
            "export {}: vhost-user-blk on {}, {} queues, {} iothreads, {}",
            e.id,
            match server.socket_path() {
                Some(p) => p.display().to_string(),
                None => format!("{:?}", e.addr),
            },
            e.num_queues,
            e.num_iothreads,
            if e.writable { "writable" } else { "read-only" }
        );
        Ok(server)
    }

    /// Runs a bound export's server on its own thread.
    pub fn start_export(&self, server: Server) -> Result<(), DaemonError> {
        let id = server.export().config.id.clone();
        let mut running = RunningExport {
            state: server.export().clone(),
            control: server.control(),
            socket: server.socket_path().cloned(),
            shutting_down: false,
            thread: None,
        };
        running.thread = Some(
            std::thread::Builder::new()
                .name(format!("vub-accept-{id}"))
                .spawn(move || server.run())
                .map_err(DaemonError::Daemonize)?,
        );
        lock(&self.exports).insert(id, running);
        Ok(())
    }

    /// block-export-add: bind and start.
    pub fn add_export(&self, e: &ExportConfig) -> Result<(), DaemonError> {
        let server = self.bind_export(e)?;
        self.start_export(server)
    }

    /// block-export-del. Without `hard`, refused while a frontend is
    /// connected. The export goes away in the background; BLOCK_EXPORT_DELETED
    /// says when.
    pub fn del_export(self: &Arc<Self>, id: &str, hard: bool) -> Result<(), String> {
        let (control, thread) = {
            let mut exports = lock(&self.exports);
            let Some(e) = exports.get_mut(id) else {
                return Err(format!("Export '{id}' is not found"));
            };
            if e.shutting_down {
                return Err(format!("Export '{id}' is already shutting down"));
            }
            if !hard && e.control.is_connected() {
                return Err(format!(
                    "export '{id}' has a connected frontend; use mode=hard to disconnect it"
                ));
            }
            e.shutting_down = true;
            (e.control.clone(), e.thread.take())
        };
        control.stop(true);
        let state = self.clone();
        let id = id.to_string();
        std::thread::spawn(move || {
            // The server thread ends once the connection (if any) has
            // drained; with it go the socket file and its hold on the node.
            if let Some(t) = thread {
                let _ = t.join();
            }
            lock(&state.exports).remove(&id);
            log::info!("export {id}: deleted");
            state
                .events
                .emit("BLOCK_EXPORT_DELETED", json!({ "id": id }));
        });
        Ok(())
    }

    /// Runs `f` in a drained section of every export whose graph reaches
    /// `node`: they stop popping requests, the ones in flight complete, `f`
    /// runs, then the queues run again.
    pub fn drained<R>(&self, node: &Node, f: impl FnOnce() -> R) -> R {
        self.drained_many(&[node], f)
    }

    /// Like [`State::drained`], for every export that reaches any of `nodes`.
    /// Block jobs working on a node below or above one of them pause at
    /// their next pause point first (except the calling job itself).
    pub fn drained_many<R>(&self, nodes: &[&Node], f: impl FnOnce() -> R) -> R {
        let jobs = crate::jobs::drain_begin(nodes);
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
        let r = f();
        for e in &affected {
            e.drained_end();
        }
        crate::jobs::drain_end(jobs);
        r
    }

    /// block_resize: the node's new size, set in a drained section.
    pub fn resize(&self, name: &str, size: u64) -> Result<(), String> {
        let node = self.graph().get(name).map_err(|e| e.to_string())?;
        if size % 512 != 0 {
            return Err(format!("size {size} is not a multiple of 512"));
        }
        // A job's bitmaps and copies are sized for the node as it is.
        for n in
            std::iter::once(node.clone()).chain(node.children().iter().map(|c| c.node().clone()))
        {
            crate::jobs::check_not_busy(&n).map_err(|e| e.desc)?;
        }
        self.drained(&node, || -> Result<(), String> {
            node.truncate(size)?;
            crate::bitmaps::resize_all(&node);
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

    /// blockdev-reopen: every listed node takes its new options together,
    /// in one drained section, or none does. What may change: `read-only`,
    /// `cache.*` and `discard` (file), `read-only` and `discard` (raw),
    /// `read-only` and `read-zeroes` (null-co).
    pub fn reopen(&self, list: &[BlockdevOptions]) -> Result<(), String> {
        let graph = self.graph();
        let mut items: Vec<(Arc<Node>, &BlockdevOptions)> = Vec::new();
        for o in list {
            let node = graph.get(o.node_name()).map_err(|e| e.to_string())?;
            if node.driver_name() != o.driver_name() {
                return Err(format!(
                    "node '{}': the driver cannot be changed ({} -> {})",
                    node.name(),
                    node.driver_name(),
                    o.driver_name()
                ));
            }
            if items.iter().any(|(n, _)| Arc::ptr_eq(n, &node)) {
                return Err(format!("node '{}' is listed twice", node.name()));
            }
            items.push((node, o));
        }
        let final_ro = |n: &Node| -> bool {
            items
                .iter()
                .find(|(m, _)| std::ptr::eq(&**m, n))
                .map_or(n.is_read_only(), |(_, o)| o.read_only())
        };
        // Prepare: open new descriptors, check what may not change.
        let mut prepared = Vec::new();
        for (node, o) in &items {
            let p = match (node.driver(), o) {
                (Driver::File(f), BlockdevOptions::File(fo)) => Some(f.prepare_reopen(fo)?),
                (Driver::Raw(r), BlockdevOptions::Raw(ro)) => {
                    r.check_reopen(ro)?;
                    None
                }
                (Driver::Null(n), BlockdevOptions::NullCo(no)) => {
                    n.check_reopen(no)?;
                    None
                }
                (Driver::Qcow2(_), BlockdevOptions::Qcow2(_)) => {
                    return Err(format!(
                        "node '{}': qcow2 nodes cannot be reopened yet",
                        node.name()
                    ))
                }
                (Driver::Throttle(_), BlockdevOptions::Throttle(_)) => {
                    return Err(format!(
                        "node '{}': throttle nodes cannot be reopened yet; change the group's limits with qom-set",
                        node.name()
                    ))
                }
                _ => return Err(format!("node '{}': driver mismatch", node.name())),
            };
            prepared.push(p);
        }
        // Permissions in the final state: a read-only node keeps no writer.
        let exports = self.export_states();
        for node in graph.nodes() {
            for (parent, role, _) in node.parent_perms() {
                let writes = match role {
                    ChildRole::Root => exports
                        .iter()
                        .any(|e| e.config.id == parent && e.config.writable),
                    _ => graph.get(&parent).is_ok_and(|p| !final_ro(&p)),
                };
                if writes && final_ro(node) {
                    let who = if role == ChildRole::Root {
                        format!("export '{parent}'")
                    } else {
                        format!("node '{parent}' (make it read-only in the same blockdev-reopen)")
                    };
                    return Err(format!(
                        "node '{}' cannot be read-only: {who} writes to it",
                        node.name()
                    ));
                }
            }
        }
        // Alignment: exports over a file node must still meet it.
        for ((node, _), p) in items.iter().zip(&prepared) {
            if let Some(fr) = p {
                let align = fr.request_alignment();
                for e in &exports {
                    if e.blk.node().reaches(node) && e.config.logical_block_size % align != 0 {
                        return Err(format!(
                            "node '{}' would need {align}-byte alignment, but export '{}' has logical-block-size {}",
                            node.name(),
                            e.config.id,
                            e.config.logical_block_size
                        ));
                    }
                }
            }
        }
        let nodes: Vec<&Node> = items.iter().map(|(n, _)| &**n).collect();
        self.drained_many(&nodes, || {
            for ((node, o), p) in items.iter().zip(prepared) {
                node.set_read_only(o.read_only());
                match (node.driver(), o, p) {
                    (Driver::File(f), _, Some(fr)) => f.commit_reopen(fr),
                    (Driver::Raw(r), BlockdevOptions::Raw(ro), _) => r.commit_reopen(ro),
                    (Driver::Null(n), BlockdevOptions::NullCo(no), _) => n.commit_reopen(no),
                    _ => {}
                }
                log::info!("node {}: reopened", node.name());
            }
        });
        Ok(())
    }

    /// query-block-exports.
    pub fn query_exports(&self) -> serde_json::Value {
        let exports = lock(&self.exports);
        json!(exports
            .iter()
            .map(|(id, e)| json!({
                "type": "vhost-user-blk",
                "id": id,
                "node-name": e.state.blk.node().name(),
                "shutting-down": e.shutting_down,
            }))
            .collect::<Vec<_>>())
    }

    /// The BlockBackends of the exports.
    pub fn export_backends(&self) -> Vec<Arc<BlockBackend>> {
        lock(&self.exports)
            .values()
            .map(|e| e.state.blk.clone())
            .collect()
    }

    /// The export named `id`.
    pub fn export(&self, id: &str) -> Option<Arc<ExportState>> {
        lock(&self.exports).get(id).map(|e| e.state.clone())
    }

    pub fn export_states(&self) -> Vec<Arc<ExportState>> {
        lock(&self.exports)
            .values()
            .map(|e| e.state.clone())
            .collect()
    }

    fn socket_paths(&self) -> Vec<PathBuf> {
        lock(&self.exports)
            .values()
            .filter_map(|e| e.socket.clone())
            .collect()
    }

    /// Stops taking requests, waits for those in flight, flushes every node.
    /// Requests parked by the `stop` policy fail at once (nobody will
    /// `cont`). Err lists what did not reach the disk: dropped writes,
    /// failed flushes.
    pub fn shutdown(&self) -> Result<(), Vec<String>> {
        let mut lost = Vec::new();
        // Jobs first: none may write once nodes are flushed and closed.
        crate::jobs::cancel_all(SHUTDOWN_DRAIN_TIMEOUT);
        let exports = self.export_states();
        for e in &exports {
            e.quiesce();
            e.abort_parked_for_shutdown();
        }
        for e in &exports {
            if !e.with_throttling_off(|| e.in_flight().wait_idle(SHUTDOWN_DRAIN_TIMEOUT)) {
                log::error!(
                    "export {}: {} requests still in flight after {:?}",
                    e.config.id,
                    e.in_flight().get(),
                    SHUTDOWN_DRAIN_TIMEOUT
                );
            }
        }
        for e in &exports {
            let d = e.dropped();
            if d.writes > 0 {
                let msg = format!(
                    "export {}: {} parked write request(s) dropped ({} bytes{}): \
                     the guest was told they failed; their data is not in the image",
                    e.config.id,
                    d.writes,
                    d.write_bytes,
                    d.first
                        .map(|f| format!(" at offsets {f}..{}", d.end))
                        .unwrap_or_default()
                );
                log::error!("{msg}");
                lost.push(msg);
            }
            if d.reads > 0 {
                log::warn!(
                    "export {}: {} parked read request(s) failed",
                    e.config.id,
                    d.reads
                );
            }
        }
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
            Err(lost)
        }
    }
}

/// The longest path from `node` down to a leaf.
fn depth_below(node: &Node) -> usize {
    node.children()
        .iter()
        .map(|c| 1 + depth_below(c.node()))
        .max()
        .unwrap_or(0)
}

/// Forks; the parent exits once the child reports it is ready (or failed).
/// Returns in the child, with a pipe end to report readiness on.
fn daemonize() -> Result<std::fs::File, DaemonError> {
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: `fds` is a live array of two ints for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(DaemonError::Daemonize(std::io::Error::last_os_error()));
    }
    // SAFETY: no other thread runs yet (run() forks before it creates any),
    // so the child may continue to run Rust code after fork.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(DaemonError::Daemonize(std::io::Error::last_os_error()));
    }
    if pid > 0 {
        // SAFETY: fds[1] is the child's end; the parent closes its copy so
        // that EOF arrives if the child dies.
        unsafe { libc::close(fds[1]) };
        // SAFETY: fds[0] is an open pipe end that nothing else owns.
        let mut r = unsafe { std::fs::File::from_raw_fd(fds[0]) };
        let mut b = [0u8; 1];
        let ok = std::io::Read::read(&mut r, &mut b).map(|n| n == 1 && b[0] == b'1');
        std::process::exit(if matches!(ok, Ok(true)) { 0 } else { 1 });
    }
    // SAFETY: fds[0] is the parent's end, closed here; setsid has no inputs.
    unsafe {
        libc::close(fds[0]);
        libc::setsid();
    }
    // SAFETY: fds[1] is the child's end of the pipe, now owned by the File.
    Ok(unsafe { std::fs::File::from_raw_fd(fds[1]) })
}

fn redirect_stdio_to_null() {
    use std::os::fd::AsRawFd;
    if let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        for fd in 0..=2 {
            // SAFETY: dup2 onto the standard descriptors, which we own.
            unsafe { libc::dup2(null.as_raw_fd(), fd) };
        }
    }
}

/// Opens `path` with `flags` added to O_CLOEXEC|O_NOFOLLOW: a symlink
/// there is an error (ELOOP), never followed.
fn open_nofollow(path: &Path, flags: libc::c_int) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut o = std::fs::OpenOptions::new();
    o.write(true)
        .mode(0o644)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW | flags);
    if flags & libc::O_EXCL != 0 {
        o.create_new(true);
    } else {
        o.create(true);
    }
    o.open(path)
}

/// Takes a write lock on all of `f` without waiting. An open file
/// description lock, which conflicts with the POSIX lock QEMU's
/// qemu_write_pidfile takes (and is not lost when another descriptor of
/// the file is closed).
fn lock_whole_file(f: &std::fs::File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: an all-zero flock is a valid value of this plain C struct.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    // SAFETY: F_OFD_SETLK on an fd we own, with a live flock to read.
    if unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_SETLK, &fl) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Raises the soft limit on open files to the hard limit, as QEMU does
/// ("qemu_init: increase NOFILE soft limit on POSIX"): an export holds about
/// ten descriptors per iothread, so the usual soft limit of 1024 would refuse
/// the sixth connected 16-queue export. Nothing here uses select(). A
/// failure only costs headroom, so it is logged and ignored.
fn raise_open_files_limit() {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the rlimit we pass, a live local.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) } != 0 || l.rlim_cur >= l.rlim_max {
        return;
    }
    let soft = l.rlim_cur;
    l.rlim_cur = l.rlim_max;
    // SAFETY: setrlimit only reads the rlimit we pass.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &l) } != 0 {
        log::warn!(
            "cannot raise the open-files limit from {soft} to {}: {}",
            l.rlim_max,
            std::io::Error::last_os_error()
        );
    }
}

/// The pidfile, locked from start-up to exit: a second instance with the
/// same pidfile fails to lock it and refuses to start.
struct Pidfile {
    path: PathBuf,
    /// The locked file(s): the one found at the path, then the one written.
    held: Vec<std::fs::File>,
    /// Whether we created the file at the path (removed if start-up fails).
    created: bool,
    written: bool,
}

impl Drop for Pidfile {
    /// A start-up that failed leaves no empty pidfile of its own behind
    /// (removed while still locked).
    fn drop(&mut self) {
        if self.created && !self.written {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Pidfile {
    /// Opens (or creates) the pidfile, never through a symlink, and locks
    /// it; nothing is written yet.
    fn lock(path: &Path) -> Result<Pidfile, DaemonError> {
        let err = |source| DaemonError::Pidfile {
            path: path.to_path_buf(),
            source,
        };
        let (f, created) = match open_nofollow(path, libc::O_EXCL) {
            Ok(f) => (f, true),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                (open_nofollow(path, 0).map_err(err)?, false)
            }
            Err(e) => return Err(err(e)),
        };
        let locked = lock_whole_file(&f);
        let pidfile = Pidfile {
            path: path.to_path_buf(),
            held: vec![f],
            created: created && locked.is_ok(),
            written: false,
        };
        locked.map_err(|source| DaemonError::PidfileLocked {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(pidfile)
    }

    /// Writes our pid through a temporary sibling renamed over the pidfile
    /// (a reader sees the old file or the whole new one). The sibling is
    /// created exclusively and not through a symlink, and locked before it
    /// takes the pidfile's name, so the lock never lapses.
    fn write_pid(&mut self) -> Result<(), DaemonError> {
        let err = |source| DaemonError::Pidfile {
            path: self.path.clone(),
            source,
        };
        let tmp = self.path.with_extension("tmp");
        let excl = libc::O_EXCL;
        let mut f = match open_nofollow(&tmp, excl) {
            // Left by an instance that died, or planted (a symlink): we hold
            // the pidfile's lock, so the name is ours. remove_file removes a
            // symlink itself, not what it points to.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                std::fs::remove_file(&tmp).map_err(err)?;
                open_nofollow(&tmp, excl).map_err(err)?
            }
            r => r.map_err(err)?,
        };
        let r = (|| {
            lock_whole_file(&f)?;
            writeln!(f, "{}", std::process::id())?;
            f.sync_all()?;
            std::fs::rename(&tmp, &self.path)
        })();
        if let Err(e) = r {
            let _ = std::fs::remove_file(&tmp);
            return Err(err(e));
        }
        self.held.push(f);
        self.written = true;
        Ok(())
    }
}

/// Runs the daemon until SIGTERM, SIGINT or QMP `quit`, then shuts down
/// cleanly.
pub fn run(config: Config) -> Result<(), DaemonError> {
    // Order matters: SIGTERM/SIGINT are blocked before any thread exists
    // (threads inherit the mask; a thread that had them unblocked could be
    // handed a SIGTERM and the process would die without draining), and the
    // daemon forks before any thread exists (the event thread and throttle
    // timers would not survive a fork). Start-up errors after the fork are
    // printed by the child, whose exit tells the waiting parent.
    let signals = TerminationSignals::block().map_err(DaemonError::Signals)?;
    raise_open_files_limit();
    let mut ready_pipe = if config.daemonize {
        Some(daemonize()?)
    } else {
        None
    };
    // Locked before anything is bound: a second instance stops here.
    let mut pidfile = config.pidfile.as_deref().map(Pidfile::lock).transpose()?;
    let engine = EngineKind::probe();
    log::info!("I/O engine: {}", engine.name());
    let state = State::new(engine);
    // Everything that can fail on a bad configuration, before anything is
    // announced.
    for o in &config.objects {
        state
            .add_object(o)
            .map_err(|reason| DaemonError::Object { reason })?;
    }
    for opts in &config.blockdevs {
        state.add_blockdev(opts)?;
    }
    let mut servers = Vec::new();
    for e in &config.exports {
        servers.push(state.bind_export(e)?);
    }
    let mut monitors = Vec::new();
    for m in &config.monitors {
        monitors.push(Monitor::bind(m, state.clone())?);
    }
    if let Some(p) = pidfile.as_mut() {
        p.write_pid()?;
    }
    for server in servers {
        state.start_export(server)?;
    }
    let monitor_sockets: Vec<PathBuf> = monitors.iter().map(|m| m.path().to_path_buf()).collect();
    for m in monitors {
        m.start().map_err(DaemonError::Daemonize)?;
    }
    if let Some(p) = ready_pipe.as_mut() {
        let _ = p.write_all(b"1");
        redirect_stdio_to_null();
    }
    drop(ready_pipe);
    log::info!("ready");

    let sig = signals.wait();
    log::info!("signal {sig}: draining and flushing");
    let outcome = state.shutdown();
    for s in state.socket_paths().iter().chain(&monitor_sockets) {
        let _ = std::fs::remove_file(s);
    }
    if let Some(p) = pidfile {
        // Removed while still locked: a new instance cannot lock a file
        // that is about to go.
        let _ = std::fs::remove_file(&p.path);
        drop(p);
    }
    if let Err(lost) = outcome {
        return Err(DaemonError::Shutdown {
            reason: lost.join("; "),
        });
    }
    log::info!("exiting");
    Ok(())
}
