//! Start-up and shutdown of the daemon.
//!
//! ```text
//!   Config -> open nodes (Graph) -> BlockBackend per export -> bind sockets
//!          -> [daemonize] -> pidfile -> one server thread per export
//!   SIGTERM/SIGINT -> quiesce exports -> drain -> flush every node
//!          -> remove sockets and pidfile -> exit 0
//! ```

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::block::{BlockBackend, Graph, GraphError};
use crate::config::Config;
use crate::io::EngineKind;
use crate::signals::TerminationSignals;
use crate::vhost_user::{ExportState, Server};

/// How long shutdown waits for requests in flight.
const SHUTDOWN_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Graph(#[from] GraphError),
    #[error("export '{export}': {reason}")]
    Export { export: String, reason: String },
    #[error(transparent)]
    Server(#[from] crate::vhost_user::ServerError),
    #[error("cannot write pidfile {path}")]
    Pidfile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot daemonize")]
    Daemonize(#[source] std::io::Error),
    #[error("cannot set up signal handling")]
    Signals(#[source] std::io::Error),
}

/// The running daemon's pieces, as start-up leaves them.
pub struct Daemon {
    pub graph: Graph,
    pub servers: Vec<Server>,
}

/// Opens the graph and the exports' sockets: everything that can fail on a
/// bad configuration, before anything is detached or announced.
pub fn open(config: &Config) -> Result<Daemon, DaemonError> {
    let engine = EngineKind::probe();
    log::info!("I/O engine: {}", engine.name());
    let mut graph = Graph::new();
    for opts in &config.blockdevs {
        let node = graph.add(opts)?;
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
    }
    let mut servers = Vec::new();
    for e in &config.exports {
        let node = graph.get(&e.node_name)?;
        let err = |reason: String| DaemonError::Export {
            export: e.id.clone(),
            reason,
        };
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
        let state = Arc::new(ExportState::new(e.clone(), Arc::new(blk), engine));
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
        servers.push(server);
    }
    Ok(daemon_parts(graph, servers))
}

fn daemon_parts(graph: Graph, servers: Vec<Server>) -> Daemon {
    Daemon { graph, servers }
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
    // SAFETY: no other thread runs yet (daemonize is called before any is
    // spawned), so the child may continue to run Rust code after fork.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(DaemonError::Daemonize(std::io::Error::last_os_error()));
    }
    if pid > 0 {
        // Parent: wait for one byte from the child, then exit with its verdict.
        // SAFETY: fds[1] is the child's end; the parent owns its copy and
        // closes it so that EOF arrives if the child dies.
        unsafe { libc::close(fds[1]) };
        // SAFETY: fds[0] is an open pipe end that nothing else owns.
        let mut r = unsafe { std::fs::File::from_raw_fd(fds[0]) };
        let mut b = [0u8; 1];
        let ok = std::io::Read::read(&mut r, &mut b).map(|n| n == 1 && b[0] == b'1');
        std::process::exit(if matches!(ok, Ok(true)) { 0 } else { 1 });
    }
    // Child.
    // SAFETY: fds[0] is the parent's end, closed here; setsid has no inputs.
    unsafe {
        libc::close(fds[0]);
        libc::setsid();
    }
    redirect_stdio_to_null();
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

fn write_pidfile(path: &Path) -> Result<(), DaemonError> {
    let err = |source| DaemonError::Pidfile {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(err)?;
    writeln!(f, "{}", std::process::id()).map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)?;
    Ok(())
}

/// Runs the daemon until SIGTERM or SIGINT, then shuts down cleanly.
pub fn run(config: Config) -> Result<(), DaemonError> {
    let daemon = open(&config)?;
    let mut ready_pipe = if config.daemonize {
        Some(daemonize()?)
    } else {
        None
    };
    let signals = TerminationSignals::block().map_err(DaemonError::Signals)?;
    if let Some(p) = &config.pidfile {
        write_pidfile(p)?;
    }
    let exports: Vec<Arc<ExportState>> =
        daemon.servers.iter().map(|s| s.export().clone()).collect();
    let sockets: Vec<PathBuf> = daemon
        .servers
        .iter()
        .filter_map(|s| s.socket_path().cloned())
        .collect();
    for server in daemon.servers {
        let name = format!("vub-accept-{}", server.export().config.id);
        std::thread::Builder::new()
            .name(name)
            .spawn(move || server.run())
            .map_err(DaemonError::Daemonize)?;
    }
    if let Some(p) = ready_pipe.as_mut() {
        let _ = p.write_all(b"1");
    }
    drop(ready_pipe);
    log::info!("ready");

    let sig = signals.wait();
    log::info!("signal {sig}: draining and flushing");
    shutdown(&daemon.graph, &exports);
    for s in &sockets {
        let _ = std::fs::remove_file(s);
    }
    if let Some(p) = &config.pidfile {
        let _ = std::fs::remove_file(p);
    }
    log::info!("exiting");
    Ok(())
}

/// Stops taking requests, waits for those in flight, flushes every node.
pub fn shutdown(graph: &Graph, exports: &[Arc<ExportState>]) {
    for e in exports {
        e.quiesce();
    }
    for e in exports {
        if !e.in_flight().wait_idle(SHUTDOWN_DRAIN_TIMEOUT) {
            log::error!(
                "export {}: {} requests still in flight after {:?}",
                e.config.id,
                e.in_flight().get(),
                SHUTDOWN_DRAIN_TIMEOUT
            );
        }
    }
    for node in graph.nodes() {
        if let Err(e) = futures::executor::block_on(node.flush()) {
            log::error!("flush of node {} failed: {e}", node.name());
        }
    }
}
