//! The process shell around [`State`]: start-up (daemonize, pidfile,
//! signals, the configured nodes, exports and monitors), the wait for
//! SIGTERM/SIGINT/SIGHUP/quit, and shutdown. `main` calls [`run`].
//!
//! ```text
//!   block SIGTERM/SIGINT/SIGHUP -> systemd's sockets to their exports/monitors
//!          -> [daemonize] -> check pidfile -> State::add_blockdev
//!          (Graph) -> State::bind_export (socket) -> write pidfile
//!          -> start exports and monitors -> READY=1 [watchdog thread]
//!   SIGTERM/SIGINT/SIGHUP/quit -> STOPPING=1 -> quiesce exports, fail parked requests -> drain
//!          -> flush every node -> remove sockets and pidfile
//!          -> exit 0 (1 if a parked write was dropped or a flush failed)
//! ```
//!
//! The shell also registers the subsystems that take part in State's
//! drained sections (block jobs), so that `state/` names none of them.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::Config;
use crate::io::EngineKind;
use crate::qmp::{Monitor, MonitorError};
use crate::signals::TerminationSignals;
use crate::state::{DataLost, State, StateError};

#[derive(Debug, thiserror::Error)]
pub enum ShellError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Monitor(#[from] MonitorError),
    /// Not a source: the message already holds it.
    #[error("--object: {0}")]
    Object(StateError),
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
    #[error("shutdown lost data: {0}")]
    Shutdown(DataLost),
    #[error("sandbox: {0}")]
    Sandbox(String),
    #[error("cannot daemonize")]
    Daemonize(#[source] std::io::Error),
    #[error("cannot open log file {path}")]
    LogFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "--daemonize: no --log-file given and no syslog socket at /dev/log: \
         the log would be lost (give --log-file FILE, or --log-file /dev/null \
         to discard it)"
    )]
    NowhereToLog,
    #[error("cannot start the monitor")]
    MonitorStart(#[source] std::io::Error),
    #[error("cannot set up signal handling")]
    Signals(#[source] std::io::Error),
    #[error(transparent)]
    Systemd(#[from] crate::systemd::SystemdError),
    #[error("cannot start the watchdog thread")]
    Watchdog(#[source] std::io::Error),
}

/// A State with the subsystems that take part in its drained sections.
pub fn new_state(engine: EngineKind) -> Arc<State> {
    let state = State::new(engine);
    state.register(Arc::new(crate::jobs::Participant));
    state
}

/// Forks; the parent exits once the child reports it is ready (or failed).
/// Returns in the child, with a pipe end to report readiness on.
fn daemonize() -> Result<std::fs::File, ShellError> {
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: `fds` is a live array of two ints for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(ShellError::Daemonize(std::io::Error::last_os_error()));
    }
    // SAFETY: no other thread runs yet (run() forks before it creates any),
    // so the child may continue to run Rust code after fork.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(ShellError::Daemonize(std::io::Error::last_os_error()));
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

/// Where the log goes once the daemon is ready: stderr (as started), a
/// file (`--log-file`), or syslog (`--daemonize` without `--log-file`).
/// Under `--daemonize` the log never silently goes to /dev/null.
enum LogTarget {
    Stderr,
    File(std::fs::File),
    Syslog,
}

/// The syslog socket, where journald listens too.
const SYSLOG_SOCKET: &str = "/dev/log";

impl LogTarget {
    /// Decided and opened before anything else, so that a log file that
    /// cannot be opened, or a daemon with nowhere to log, fails at once on
    /// the terminal.
    fn open(config: &Config) -> Result<LogTarget, ShellError> {
        use std::os::unix::fs::OpenOptionsExt;
        if let Some(path) = &config.log_file {
            let f = std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .mode(0o640)
                .custom_flags(libc::O_CLOEXEC)
                .open(path)
                .map_err(|source| ShellError::LogFile {
                    path: path.clone(),
                    source,
                })?;
            return Ok(LogTarget::File(f));
        }
        if !config.daemonize {
            return Ok(LogTarget::Stderr);
        }
        if Path::new(SYSLOG_SOCKET).exists() {
            Ok(LogTarget::Syslog)
        } else {
            Err(ShellError::NowhereToLog)
        }
    }

    /// Points stdout and stderr (where the log is written) at the target;
    /// stdin at /dev/null when detached.
    fn install(self, detached: bool) {
        use std::os::fd::AsRawFd;
        if detached {
            if let Ok(null) = std::fs::File::open("/dev/null") {
                // SAFETY: dup2 onto stdin, which we own.
                unsafe { libc::dup2(null.as_raw_fd(), 0) };
            }
        }
        let fd = match self {
            LogTarget::Stderr => return,
            LogTarget::File(f) => f,
            LogTarget::Syslog => match syslog_pipe(Path::new(SYSLOG_SOCKET)) {
                Ok(f) => f,
                Err(e) => {
                    // Still attached to the parent's stderr until here.
                    log::error!("cannot log to {SYSLOG_SOCKET}: {e}; logging to stderr");
                    return;
                }
            },
        };
        for target in [1, 2] {
            // SAFETY: dup2 onto the standard descriptors, which we own.
            unsafe { libc::dup2(fd.as_raw_fd(), target) };
        }
    }
}

/// A pipe whose lines a thread sends to the syslog socket at `socket`, one
/// datagram each (RFC 3164 without a timestamp, which syslogd adds),
/// facility daemon, severity from the log level. Returns the write end.
fn syslog_pipe(socket: &Path) -> std::io::Result<std::fs::File> {
    use std::io::BufRead;
    use std::os::fd::FromRawFd;
    let sock = std::os::unix::net::UnixDatagram::unbound()?;
    sock.connect(socket)?;
    let mut fds = [0; 2];
    // SAFETY: `fds` is a live array of two ints for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both ends are fresh descriptors that nothing else owns.
    let (r, w) = unsafe {
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    };
    let pid = std::process::id();
    crate::sandbox::spawn(crate::sandbox::Class::Helper, "syslog".into(), move || {
        for line in std::io::BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            let _ = sock.send(syslog_datagram(pid, &line).as_bytes());
        }
    })?;
    Ok(w)
}

/// One syslog datagram for a log line: facility daemon (3), severity by
/// the level env_logger wrote into the line.
fn syslog_datagram(pid: u32, line: &str) -> String {
    let severity = if line.contains(" ERROR ") {
        3
    } else if line.contains(" WARN ") {
        4
    } else if line.contains(" DEBUG ") || line.contains(" TRACE ") {
        7
    } else {
        6
    };
    format!("<{}>vhost-user-blkd[{pid}]: {line}", 3 * 8 + severity)
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

/// The pidfile. It appears only once the daemon is ready, with the pid in
/// it (an orchestrator that waits for the file never reads it empty), and
/// stays locked until exit, so a second instance with the same pidfile
/// refuses to start: at start-up when it finds the file locked, or, if both
/// started together, when it would write it.
struct Pidfile {
    path: PathBuf,
    /// The locked files: a stale pidfile found at start-up (locked, so that
    /// no other instance takes it meanwhile), then the one written.
    held: Vec<std::fs::File>,
}

/// Opens an existing file for writing, never through a symlink.
fn open_existing_nofollow(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
        .open(path)
}

impl Pidfile {
    /// Refuses to go on if another instance holds the pidfile; a stale one
    /// (its daemon is gone) is locked and replaced when the pid is written.
    /// Nothing is created yet.
    fn lock(path: &Path) -> Result<Pidfile, ShellError> {
        let mut pidfile = Pidfile {
            path: path.to_path_buf(),
            held: Vec::new(),
        };
        if std::fs::symlink_metadata(path).is_ok() {
            let f = pidfile.lock_existing()?;
            pidfile.held.push(f);
        }
        Ok(pidfile)
    }

    /// Opens the file at the pidfile's path and locks it.
    fn lock_existing(&self) -> Result<std::fs::File, ShellError> {
        let f = open_existing_nofollow(&self.path).map_err(|source| ShellError::Pidfile {
            path: self.path.clone(),
            source,
        })?;
        lock_whole_file(&f).map_err(|source| ShellError::PidfileLocked {
            path: self.path.clone(),
            source,
        })?;
        Ok(f)
    }

    /// Writes our pid into a temporary sibling, locks it, and gives it the
    /// pidfile's name (a reader sees no file, the old one, or the whole new
    /// one, never an empty one). The sibling is created exclusively and not
    /// through a symlink. With no stale pidfile held, the name is taken
    /// with link(), which fails if another instance wrote it meanwhile;
    /// that one's lock then decides.
    fn write_pid(&mut self) -> Result<(), ShellError> {
        let err = |source| ShellError::Pidfile {
            path: self.path.clone(),
            source,
        };
        let tmp = self.path.with_extension("tmp");
        let excl = libc::O_EXCL;
        let mut f = match open_nofollow(&tmp, excl) {
            // Left by an instance that died, or planted (a symlink):
            // remove_file removes a symlink itself, not what it points to.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                std::fs::remove_file(&tmp).map_err(err)?;
                open_nofollow(&tmp, excl).map_err(err)?
            }
            r => r.map_err(err)?,
        };
        let r = (|| {
            lock_whole_file(&f)?;
            writeln!(f, "{}", std::process::id())?;
            f.sync_all()
        })()
        .map_err(err)
        .and_then(|()| self.take_name(&tmp));
        if let Err(e) = r {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        self.held.push(f);
        Ok(())
    }

    /// Gives the written sibling `tmp` the pidfile's name.
    fn take_name(&mut self, tmp: &Path) -> Result<(), ShellError> {
        let err = |source| ShellError::Pidfile {
            path: self.path.clone(),
            source,
        };
        if self.held.is_empty() {
            match std::fs::hard_link(tmp, &self.path) {
                Ok(()) => return std::fs::remove_file(tmp).map_err(err),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    // Written by another instance since start-up: refused if
                    // it still runs, replaced if it is gone.
                    let f = self.lock_existing()?;
                    self.held.push(f);
                }
                Err(e) => return Err(err(e)),
            }
        }
        std::fs::rename(tmp, &self.path).map_err(err)
    }
}

/// What the sandbox lets the serving daemon reach: the images open now,
/// the sockets' directories, the pidfile's.
fn reach(config: &Config, state: &State) -> crate::sandbox::Reach {
    let images = state
        .graph()
        .nodes()
        .filter_map(|n| n.block_driver().filename().map(PathBuf::from))
        .filter(|p| p.is_absolute() || p.exists())
        .collect();
    let dir = |p: &Path| match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut socket_dirs: Vec<PathBuf> = config
        .exports
        .iter()
        .filter_map(|e| match &e.addr {
            crate::config::export::SocketAddress::Unix { path } => Some(dir(Path::new(path))),
            crate::config::export::SocketAddress::Fd { .. } => None,
        })
        .chain(
            config
                .monitors
                .iter()
                .filter(|m| m.fd.is_none())
                .map(|m| dir(&m.path)),
        )
        .collect();
    // The NBD server: its socket's directory, or its TCP port (to listen
    // again after nbd-server-stop), and the ports --allow-tcp-bind names.
    let mut nbd_ports = config.allow_tcp_bind.clone();
    match config.nbd_server.as_ref().map(|o| &o.addr) {
        Some(crate::nbd::ListenAddr::Unix(p)) => socket_dirs.push(dir(p)),
        Some(crate::nbd::ListenAddr::Inet { port, .. }) => {
            nbd_ports.extend(port.parse::<u16>().ok());
        }
        _ => {}
    }
    socket_dirs.sort();
    socket_dirs.dedup();
    let (read_only, tcp_connect) = crate::drivers::rbd::sandbox_reach(&state.graph());
    if !tcp_connect.is_empty() {
        // rbd nodes may be added over QMP: their connections are made on
        // the cluster service's threads.
        if let Err(e) = crate::sandbox::start_cluster_service() {
            log::warn!(
                "cannot start the cluster service thread ({e}): rbd nodes added over QMP will fail"
            );
        }
    }
    let mut tcp_ports: Vec<u16> = state
        .graph()
        .nodes()
        .flat_map(|n| n.block_driver().tcp_ports())
        .collect();
    tcp_ports.sort();
    tcp_ports.dedup();
    crate::sandbox::Reach {
        images,
        socket_dirs,
        files: config.pidfile.iter().cloned().collect(),
        read_only,
        tcp_connect,
        tcp_ports,
        tcp_bind_ports: nbd_ports,
    }
}

/// Runs the daemon until SIGTERM, SIGINT or QMP `quit`, then shuts down
/// cleanly.
pub fn run(mut config: Config) -> Result<(), ShellError> {
    // Order matters: SIGTERM/SIGINT/SIGHUP are blocked before any thread exists
    // (threads inherit the mask; a thread that had them unblocked could be
    // handed a SIGTERM and the process would die without draining), and the
    // daemon forks before any thread exists (the event thread and throttle
    // timers would not survive a fork). Start-up errors after the fork are
    // printed by the child, whose exit tells the waiting parent.
    let signals = TerminationSignals::block().map_err(ShellError::Signals)?;
    // Before any thread: threads started before arm() wait there for it.
    crate::sandbox::configure(config.sandbox.clone()).map_err(ShellError::Sandbox)?;
    crate::sandbox::set_tcp_bind_allowed(!config.allow_tcp_bind.is_empty());
    // Sockets systemd passed, given to the exports and monitors they name;
    // before any thread exists (it edits the environment).
    crate::systemd::Activation::from_env()?.apply(&mut config)?;
    raise_open_files_limit();
    let log_target = LogTarget::open(&config)?;
    crate::sockpath::set_perms(config.socket_perms);
    crate::peercred::set_policy(config.peer_policy.clone());
    let mut ready_pipe = if config.daemonize {
        Some(daemonize()?)
    } else {
        None
    };
    // Before anything is bound: a second instance stops here.
    let mut pidfile = config.pidfile.as_deref().map(Pidfile::lock).transpose()?;
    let engine = EngineKind::probe();
    log::info!("I/O engine: {}", engine.name());
    for t in &config.trace {
        log::warn!(
            "-T {t}: QEMU trace events are not available; ignored (set RUST_LOG, e.g. RUST_LOG=debug, for this daemon's logs)"
        );
    }
    let state = new_state(engine);
    // Everything that can fail on a bad configuration, before anything is
    // announced.
    for o in &config.objects {
        state.add_object(o).map_err(ShellError::Object)?;
    }
    for opts in &config.blockdevs {
        state.add_blockdev(opts).map_err(StateError::from)?;
    }
    let mut servers = Vec::new();
    for e in &config.exports {
        servers.push(state.bind_export(e)?);
    }
    // The NBD server binds (and accepts, once armed: its threads wait in
    // spawn() until then), then its exports.
    if let Some(o) = &config.nbd_server {
        state.nbd_server_start(o)?;
    }
    for e in &config.nbd_exports {
        state.add_nbd_export(e)?;
    }
    let mut monitors = Vec::new();
    for m in &config.monitors {
        monitors.push(Monitor::bind(m, state.clone())?);
    }
    if let Some(p) = pidfile.as_mut() {
        p.write_pid()?;
    }
    // Everything the configuration names is open or bound: from here on
    // the daemon reaches only that (and --allow-path), as --user if given.
    crate::config::export::warm_up();
    crate::sandbox::arm(&reach(&config, &state)).map_err(ShellError::Sandbox)?;
    for server in servers {
        state.start_export(server)?;
    }
    // A monitor on a socket systemd passed leaves it in place.
    let monitor_sockets: Vec<PathBuf> = config
        .monitors
        .iter()
        .filter(|m| m.fd.is_none())
        .map(|m| m.path.clone())
        .collect();
    for m in monitors {
        m.start().map_err(ShellError::MonitorStart)?;
    }
    if let Some(p) = ready_pipe.as_mut() {
        let _ = p.write_all(b"1");
    }
    let daemonized = ready_pipe.is_some();
    log_target.install(daemonized);
    drop(ready_pipe);
    log::info!("ready");
    // Every export listens and every monitor accepts: READY=1 (with our pid
    // when daemonized, for a unit with NotifyAccess=all).
    let status = format!(
        "STATUS=serving {} export(s), {} monitor(s)",
        config.exports.len(),
        config.monitors.len()
    );
    crate::systemd::notify(&if daemonized {
        format!("READY=1\n{status}\nMAINPID={}", std::process::id())
    } else {
        format!("READY=1\n{status}")
    });
    if let Some(interval) = crate::systemd::watchdog_interval() {
        // Each ping first takes the exports' lock, as every export and
        // monitor command does: a daemon wedged there stops pinging.
        let s = state.clone();
        crate::systemd::start_watchdog(interval, move || drop(s.socket_paths()))
            .map_err(ShellError::Watchdog)?;
    }

    // Every thread of ours is started: the main thread's filter last.
    crate::sandbox::enter_main();
    let sig = signals.wait();
    log::info!("signal {sig}: draining and flushing");
    crate::systemd::notify("STOPPING=1\nSTATUS=draining and flushing");
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
    outcome.map_err(ShellError::Shutdown)?;
    log::info!("exiting");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syslog_lines_arrive_one_datagram_each_with_their_severity() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let server = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        let mut w = syslog_pipe(&path).unwrap();
        w.write_all(b"[t INFO  x] ready\n[t ERROR x] bad\n")
            .unwrap();
        drop(w);
        let mut buf = [0u8; 256];
        let pid = std::process::id();
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(
            std::str::from_utf8(&buf[..n]).unwrap(),
            format!("<30>vhost-user-blkd[{pid}]: [t INFO  x] ready")
        );
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(
            std::str::from_utf8(&buf[..n]).unwrap(),
            format!("<27>vhost-user-blkd[{pid}]: [t ERROR x] bad")
        );
    }
}
