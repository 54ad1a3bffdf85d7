//! Least privilege: what the daemon may still do once it serves.
//!
//! ```text
//! run(): configure (mode, SIGSYS handler)          before any thread
//!        ... objects, nodes, sockets, pidfile ...
//!        arm: bounding set dropped -> --user (setgroups, setgid, setuid)
//!             -> capabilities cleared -> no_new_privs -> Landlock
//!             (the images, sockets, pidfile, --allow-path)
//!             -> threads started before this point do the same
//!        ... exports and monitors start (their threads inherit it) ...
//!        enter(Main): the main thread's seccomp filter
//! ```
//!
//! Seccomp filters, Landlock domains, capabilities and no_new_privs all
//! belong to a thread, and a thread inherits its creator's. So every thread
//! the daemon starts goes through [`spawn`], which installs the filter of
//! its [`Class`] (syscalls.rs) on top of what it inherited; a thread
//! started before [`arm`] waits there until the process is armed and then
//! restricts itself as the main thread did. The library's vring worker
//! threads install the iothread filter at their first event
//! ([`enter_foreign`]).
//!
//! `--sandbox off` does none of this; `--sandbox log` installs the filters
//! with the kernel's log action (what would have been refused is allowed
//! and logged: `dmesg | grep 'type=1326'`) and skips Landlock, which has
//! no such mode.

mod landlock;
mod privs;
mod seccomp;
pub mod syscalls;

use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, OnceLock};

pub use privs::RunAs;

/// `--sandbox`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// Seccomp filters (a call outside them kills the daemon), Landlock,
    /// capabilities dropped. The default.
    #[default]
    On,
    /// Nothing restricted.
    Off,
    /// Filters that log instead of kill; no Landlock.
    Log,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "on" => Ok(Mode::On),
            "off" => Ok(Mode::Off),
            "log" => Ok(Mode::Log),
            _ => Err(format!("'{s}' is not one of on, off, log")),
        }
    }
}

/// `--allow-tcp-bind` given: the monitor may make a TCP listening socket
/// (nbd-server-start). Set before any thread is restricted.
static TCP_BIND: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

pub fn set_tcp_bind_allowed(on: bool) {
    TCP_BIND.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Whether a TCP listening socket may be made after arm (see
/// [`set_tcp_bind_allowed`]); always when the sandbox is off.
pub fn tcp_bind_allowed() -> bool {
    TCP_BIND.load(std::sync::atomic::Ordering::Relaxed)
        || PROCESS.get().is_none_or(|p| p.settings.mode != Mode::On)
}

/// Whether the calling thread runs under a filter of ours.
pub fn restricted() -> bool {
    RESTRICTED.with(Cell::get)
}

/// What kind of work a thread does, which decides its seccomp filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// The main thread once serving: signals, shutdown.
    Main,
    /// QMP: the accept thread and one per client.
    Monitor,
    /// An export's accept loop and vhost-user protocol thread.
    Control,
    /// A vring worker: guest requests, image I/O. Faces the guest.
    Iothread,
    /// A block job.
    Job,
    /// Timers, event delivery, syslog, watchdog.
    Helper,
    /// Connects to a storage cluster (the rbd driver): librados starts
    /// its messenger, finisher and timer threads from this thread, and
    /// they inherit its filter (TCP sockets, no files but its
    /// configuration).
    Cluster,
    /// A network block driver's socket I/O and reconnection (nbd).
    Network,
}

impl Class {
    pub const ALL: [Class; 8] = [
        Class::Main,
        Class::Monitor,
        Class::Control,
        Class::Iothread,
        Class::Job,
        Class::Helper,
        Class::Cluster,
        Class::Network,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Class::Main => "main",
            Class::Monitor => "monitor",
            Class::Control => "vhost-user",
            Class::Iothread => "iothread",
            Class::Job => "job",
            Class::Helper => "helper",
            Class::Cluster => "cluster",
            Class::Network => "network",
        }
    }
}

/// The sandbox settings of this process (`--sandbox`, `--allow-path`,
/// `--user`).
#[derive(Clone, Debug, Default)]
pub struct Settings {
    pub mode: Mode,
    /// Directories QMP may open, create and remove files in at run time.
    pub allow_paths: Vec<PathBuf>,
    /// Whom to run as once set up (root only).
    pub run_as: Option<RunAs>,
    /// Keep CAP_CHOWN (root staying root, with --socket-owner or
    /// --socket-group: sockets bound at run time are given away too).
    pub keep_chown: bool,
    /// TCP ports network nodes added at run time may connect to
    /// (`--allow-connect`), beside those of the nodes open at start.
    pub allow_connect: AllowConnect,
}

/// `--allow-connect`: TCP ports (ranges) connect may reach, or any.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AllowConnect {
    Any,
    Ports(Vec<(u16, u16)>),
}

impl Default for AllowConnect {
    fn default() -> Self {
        AllowConnect::Ports(Vec::new())
    }
}

impl AllowConnect {
    /// Adds one `--allow-connect` value: PORT, LOW-HIGH, or `any`.
    pub fn add(&mut self, v: &str) -> Result<(), String> {
        let range = if v == "any" {
            *self = AllowConnect::Any;
            return Ok(());
        } else {
            let port = |s: &str| {
                s.trim()
                    .parse::<u16>()
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| format!("'{s}' is not a port number (1-65535)"))
            };
            match v.split_once('-') {
                Some((lo, hi)) => {
                    let (lo, hi) = (port(lo)?, port(hi)?);
                    if lo > hi {
                        return Err(format!("{lo}-{hi} is an empty range"));
                    }
                    (lo, hi)
                }
                None => {
                    let p = port(v)?;
                    (p, p)
                }
            }
        };
        if let AllowConnect::Ports(list) = self {
            list.push(range);
        }
        Ok(())
    }
}

/// What the armed process may reach, gathered from the configuration and
/// the graph once set up.
#[derive(Clone, Debug, Default)]
pub struct Reach {
    /// Image files open now (read-write, as a reopen may need).
    pub images: Vec<PathBuf>,
    /// Directories the daemon creates and removes sockets in.
    pub socket_dirs: Vec<PathBuf>,
    /// Files the daemon removes at exit (pidfile), or reopens (log file).
    pub files: Vec<PathBuf>,
    /// Files and directories only read (a storage cluster client's
    /// libraries and configuration: the rbd driver).
    pub read_only: Vec<PathBuf>,
    /// TCP ports only the Cluster class connects to (the rbd driver's
    /// Ceph ports, wherever librbd is installed); they do not give the
    /// monitor TCP sockets, as `tcp_ports` do.
    pub tcp_connect: Vec<u16>,
    /// TCP ports network nodes open now connect to (they reconnect).
    pub tcp_ports: Vec<u16>,
    /// TCP ports the NBD server may bind at run time (nbd-server-start;
    /// `--allow-tcp-bind` and --nbd-server's port); 0: one the kernel picks.
    pub tcp_bind_ports: Vec<u16>,
}

struct Process {
    settings: Settings,
    /// Set by [`arm`]: the Landlock ruleset threads started earlier
    /// restrict themselves with, if Landlock is in use.
    armed: Mutex<Option<Armed>>,
    armed_cv: Condvar,
}

#[derive(Default)]
struct Armed {
    landlock: Option<landlock::Rules>,
    drop_caps: bool,
    keep_chown: bool,
}

static PROCESS: OnceLock<Process> = OnceLock::new();

thread_local! {
    /// This thread's class, once its filter is in place (the SIGSYS
    /// handler names it).
    static CLASS: Cell<Option<Class>> = const { Cell::new(None) };
    /// True once this thread is restricted (itself or by inheritance).
    static RESTRICTED: Cell<bool> = const { Cell::new(false) };
}

/// The class of the calling thread, if it has a filter.
pub(crate) fn current_class() -> Option<Class> {
    CLASS.try_with(Cell::get).ok().flatten()
}

/// Settles the sandbox of this process; call once, before any thread
/// exists. Without it (unit tests, tools) nothing is ever restricted.
pub fn configure(settings: Settings) -> Result<(), String> {
    if settings.mode != Mode::Off {
        seccomp::install_sigsys_handler()?;
        if settings.mode == Mode::Log {
            log::warn!(
                "--sandbox log: seccomp reports instead of refusing (see dmesg), Landlock is off"
            );
        }
    }
    PROCESS
        .set(Process {
            settings,
            armed: Mutex::new(None),
            armed_cv: Condvar::new(),
        })
        .map_err(|_| "the sandbox is configured twice".to_string())
}

fn process() -> Option<&'static Process> {
    PROCESS.get().filter(|p| p.settings.mode != Mode::Off)
}

/// Set by [`arm`] when network nodes open at start connect over TCP.
static TCP_AT_START: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether any TCP connect is allowed once armed: `--allow-connect`, or
/// the ports of the network nodes open at start. Without either the
/// monitor's filter has no TCP sockets.
pub(crate) fn tcp_connect_configured() -> bool {
    TCP_AT_START.load(std::sync::atomic::Ordering::Relaxed)
        || PROCESS
            .get()
            .is_some_and(|p| p.settings.allow_connect != AllowConnect::default())
}

/// Before a TCP connect to `port`: why the sandbox would refuse it (the
/// calling thread's seccomp filter has no TCP sockets, or Landlock does
/// not allow the port), so that the caller fails with a message instead
/// of making a call that kills the daemon or fails without saying why.
pub fn tcp_connect_refusal(port: u16) -> Option<String> {
    let p = process()?;
    let hint = || {
        format!(
            "TCP port {port} is outside the ports the sandbox allows (start the daemon with --allow-connect {port} or a range LOW-HIGH for nodes added at run time)"
        )
    };
    if p.settings.mode == Mode::On
        && current_class() == Some(Class::Monitor)
        && !tcp_connect_configured()
    {
        return Some(hint());
    }
    connect_denial_hint(port)
}

/// The configured mode (Off when unconfigured).
pub fn mode() -> Mode {
    PROCESS.get().map_or(Mode::Off, |p| p.settings.mode)
}

/// Drops privileges and confines the file system, for this thread and
/// (as they reach [`spawn`]'s wait) every thread started before. Call
/// once the images are open and the sockets bound, before anything is
/// served.
pub fn arm(reach: &Reach) -> Result<(), String> {
    let Some(p) = process() else {
        return Ok(());
    };
    TCP_AT_START.store(
        !reach.tcp_ports.is_empty(),
        std::sync::atomic::Ordering::Relaxed,
    );
    let root = privs::is_root();
    if root {
        privs::drop_bounding_set()?;
    }
    if let Some(run_as) = &p.settings.run_as {
        privs::switch_user(run_as)?;
        log::info!("running as {run_as}");
    }
    let drop_caps = root;
    let keep_chown = p.settings.keep_chown && p.settings.run_as.is_none();
    if drop_caps {
        privs::clear_capabilities(keep_chown)?;
    }
    privs::set_no_new_privs()?;
    let rules = if p.settings.mode == Mode::On {
        landlock::Rules::new(reach, &p.settings.allow_paths, &p.settings.allow_connect)?
    } else {
        None
    };
    let rules = match rules {
        Some(r) if r.restrict_self()? => {
            log::info!("Landlock: {}", r.describe());
            Some(r)
        }
        Some(_) => {
            log::warn!("this kernel has no Landlock: file access is not confined");
            None
        }
        None => None,
    };
    RESTRICTED.with(|r| r.set(true));
    *p.armed.lock().unwrap_or_else(|e| e.into_inner()) = Some(Armed {
        landlock: rules,
        drop_caps,
        keep_chown,
    });
    p.armed_cv.notify_all();
    Ok(())
}

/// Restricts a thread started before [`arm`]: waits until the process is
/// armed, then does what the main thread did.
fn restrict_like_main(p: &Process) -> Result<(), String> {
    let mut armed = p.armed.lock().unwrap_or_else(|e| e.into_inner());
    while armed.is_none() {
        armed = p.armed_cv.wait(armed).unwrap_or_else(|e| e.into_inner());
    }
    let a = armed.as_ref().expect("checked above");
    if a.drop_caps {
        // This thread may have lost CAP_SETPCAP with --user already; the
        // bounding set then stays, which no_new_privs makes harmless.
        let _ = privs::drop_bounding_set();
        privs::clear_capabilities(a.keep_chown)?;
    }
    privs::set_no_new_privs()?;
    if let Some(r) = &a.landlock {
        r.restrict_self()?;
    }
    RESTRICTED.with(|r| r.set(true));
    Ok(())
}

/// Installs the filter of `class` on the calling thread (and, if the
/// thread was started before [`arm`], first waits for it and restricts
/// itself as the main thread did). A failure here leaves a thread
/// unconfined, so it ends the process.
fn enter(class: Class, inherited: bool) {
    let Some(p) = process() else {
        return;
    };
    if !inherited {
        if let Err(e) = restrict_like_main(p) {
            fatal(class, &e);
        }
    }
    RESTRICTED.with(|r| r.set(true));
    if let Err(e) = seccomp::apply(class, p.settings.mode) {
        fatal(class, &e);
    }
    CLASS.with(|c| c.set(Some(class)));
    probe(class);
}

/// The test hook that proves the filters bite:
/// `VHOST_USER_BLKD_SANDBOX_PROBE=CLASS:CALL` makes the first thread of
/// CLASS (a [`Class::name`]) make CALL (execve, ptrace, or socket, which
/// asks for an AF_INET socket) once its filter is in place. The filter
/// should kill the daemon there; if the call returns, that is logged.
fn probe(class: Class) {
    static PROBE: OnceLock<Option<(String, String)>> = OnceLock::new();
    static FIRED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let probe = PROBE.get_or_init(|| {
        let v = std::env::var("VHOST_USER_BLKD_SANDBOX_PROBE").ok()?;
        let (c, call) = v.split_once(':')?;
        Some((c.to_string(), call.to_string()))
    });
    let Some((c, call)) = probe else {
        return;
    };
    if c != class.name() || FIRED.swap(true, std::sync::atomic::Ordering::SeqCst) {
        return;
    }
    // SAFETY: each call gets valid arguments (a NUL-terminated path and
    // NULL-terminated argv/envp; integers); none touches our memory.
    let r = unsafe {
        match call.as_str() {
            "execve" => {
                let path = c"/bin/true";
                let argv = [path.as_ptr(), std::ptr::null()];
                let envp: [*const libc::c_char; 1] = [std::ptr::null()];
                libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) as i64
            }
            "ptrace" => libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) as i64,
            "socket" => libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) as i64,
            other => {
                log::error!("sandbox probe: unknown call {other}");
                return;
            }
        }
    };
    log::warn!(
        "sandbox probe: {call} from a {} thread was not refused (returned {r})",
        class.name()
    );
}

fn fatal(class: Class, e: &str) -> ! {
    log::error!(
        "sandbox: a {} thread cannot restrict itself: {e}",
        class.name()
    );
    std::process::abort();
}

/// The main thread's filter, once everything is started.
pub fn enter_main() {
    enter(Class::Main, true);
}

/// For threads started by a library (the vring workers): installs the
/// filter of `class` the first time it is called on a thread.
pub fn enter_foreign(class: Class) {
    if process().is_none() || CLASS.with(Cell::get).is_some() {
        return;
    }
    // A library thread may date from before arm(): restrict it fully if
    // its creator was not restricted. Landlock and no_new_privs twice are
    // harmless; the check keeps the Landlock layers few.
    let inherited = RESTRICTED.with(Cell::get);
    enter(class, inherited || armed_before_creator());
}

/// A cluster connection made while the daemon starts (an rbd node of the
/// command line), before [`arm`]: it cannot wait for the Landlock rules
/// (the main thread waits for it), so the thread drops its capabilities,
/// takes no_new_privs and its class's filter; the library threads it
/// starts are never under Landlock. With --user they could not follow
/// the switch of user (glibc makes every thread call setresuid), so that
/// is refused. Connections made later (blockdev-add) inherit everything.
fn enter_unarmed(p: &Process, class: Class) -> Result<(), String> {
    if p.settings.run_as.is_some() {
        return Err(
            "with --user, rbd nodes cannot be opened at start under the sandbox: add them with blockdev-add"
                .into(),
        );
    }
    if privs::is_root() {
        privs::drop_bounding_set()?;
        privs::clear_capabilities(false)?;
    }
    privs::set_no_new_privs()?;
    seccomp::apply(class, p.settings.mode)?;
    CLASS.with(|c| c.set(Some(class)));
    static SAID: std::sync::Once = std::sync::Once::new();
    SAID.call_once(|| {
        log::info!(
            "sandbox: the cluster threads of nodes opened at start are under the {} filter, without capabilities, but not under Landlock",
            class.name()
        )
    });
    Ok(())
}

type ClusterTask = Box<dyn FnOnce() + Send>;

/// The cluster service: a thread of the Cluster class started by the main
/// thread at start-up, before any filter (so that no other class must
/// allow what cluster connections need). Once armed, every cluster
/// connection is made on a thread it starts, which inherits its filter
/// and Landlock domain.
static CLUSTER_SERVICE: OnceLock<Mutex<std::sync::mpsc::Sender<ClusterTask>>> = OnceLock::new();

/// Starts the cluster service (the rbd driver can be used: librbd is
/// installed). Call from the main thread before [`arm`].
pub fn start_cluster_service() -> std::io::Result<()> {
    if process().is_none() || CLUSTER_SERVICE.get().is_some() {
        return Ok(());
    }
    let (tx, rx) = std::sync::mpsc::channel::<ClusterTask>();
    spawn(Class::Cluster, "vub-cluster".into(), move || {
        for task in rx {
            let started = std::thread::Builder::new()
                .name("vub-rbd".into())
                .spawn(move || {
                    // Inherited: this thread's filter and Landlock domain.
                    RESTRICTED.with(|r| r.set(true));
                    CLASS.with(|c| c.set(Some(Class::Cluster)));
                    task()
                });
            if let Err(e) = started {
                // The task (and its reply channel) is dropped: the caller
                // sees the failure.
                log::error!("sandbox: cannot start a cluster thread: {e}");
            }
        }
    })?;
    let _ = CLUSTER_SERVICE.set(Mutex::new(tx));
    Ok(())
}

/// Runs `f` on a thread of the Cluster class and waits for its result:
/// started by the cluster service once the process is armed, else
/// directly (before arm, or without a sandbox).
pub fn run_on_cluster_thread<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    let service = CLUSTER_SERVICE
        .get()
        .filter(|_| armed_before_creator() || RESTRICTED.with(Cell::get));
    match service {
        Some(tx) => {
            let (rtx, rrx) = std::sync::mpsc::sync_channel(1);
            let task: ClusterTask = Box::new(move || {
                let _ = rtx.send(f());
            });
            tx.lock()
                .unwrap_or_else(|e| e.into_inner())
                .send(task)
                .map_err(|_| "the cluster service thread is gone".to_string())?;
            rrx.recv()
                .map_err(|_| "a cluster thread failed (see the log)".to_string())
        }
        None => {
            let unarmed = process().filter(|_| !armed_before_creator());
            let t = match unarmed {
                Some(p) => std::thread::Builder::new()
                    .name("vub-rbd".into())
                    .spawn(move || enter_unarmed(p, Class::Cluster).map(|()| f())),
                None => spawn(Class::Cluster, "vub-rbd".into(), move || Ok(f())),
            };
            t.map_err(|e| format!("cannot start a cluster thread: {e}"))?
                .join()
                .map_err(|_| "a cluster thread panicked".to_string())?
        }
    }
}

/// Library threads are created by restricted threads of ours once the
/// process is armed; before that none runs our code.
fn armed_before_creator() -> bool {
    process().is_some_and(|p| p.armed.lock().unwrap_or_else(|e| e.into_inner()).is_some())
}

/// Starts a thread of `class` named `name`: it installs its class's filter
/// before running `f`.
pub fn spawn<F, T>(class: Class, name: String, f: F) -> std::io::Result<std::thread::JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let inherited = RESTRICTED.with(Cell::get);
    std::thread::Builder::new().name(name).spawn(move || {
        enter(class, inherited);
        f()
    })
}

/// For a refused TCP connect to `port`: the hint to add to the error when
/// the sandbox is why, else None.
pub fn connect_denial_hint(port: u16) -> Option<String> {
    let p = process()?;
    let armed = p.armed.lock().unwrap_or_else(|e| e.into_inner());
    let rules = armed.as_ref()?.landlock.as_ref()?;
    if rules.allows_port(port) {
        return None;
    }
    Some(format!(
        "TCP port {port} is outside the ports the sandbox allows (start the daemon with --allow-connect {port} or a range LOW-HIGH for nodes added at run time)"
    ))
}

/// Whether the process is sandboxed and armed (its threads filtered).
pub fn armed() -> bool {
    process().is_some_and(|p| p.armed.lock().unwrap_or_else(|e| e.into_inner()).is_some())
}

/// Whether threads started now run their code at once: the process is
/// armed, or there is no sandbox. Before [`arm`], a new thread waits in
/// [`spawn`] until it is.
pub fn threads_run() -> bool {
    process().is_none_or(|p| p.armed.lock().unwrap_or_else(|e| e.into_inner()).is_some())
}

/// Whether Landlock confines this process's file system.
pub fn confines_files() -> bool {
    process().is_some_and(|p| {
        p.armed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(|a| a.landlock.is_some())
    })
}

/// For an EACCES on `path`: the hint to add to the error when the sandbox
/// is why (the path is outside what it allows), else None.
pub fn denial_hint(path: &Path) -> Option<String> {
    let p = process()?;
    let armed = p.armed.lock().unwrap_or_else(|e| e.into_inner());
    let rules = armed.as_ref()?.landlock.as_ref()?;
    if rules.allows(path) {
        return None;
    }
    Some(format!(
        "'{}' is outside the paths the sandbox allows (start the daemon with --allow-path DIR for a directory it may use, or pass an open descriptor with add-fd)",
        path.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::AllowConnect;

    #[test]
    fn allow_connect_takes_ports_ranges_and_any() {
        let mut a = AllowConnect::default();
        a.add("10809").unwrap();
        a.add("6800-7568").unwrap();
        assert_eq!(a, AllowConnect::Ports(vec![(10809, 10809), (6800, 7568)]));
        for bad in ["0", "70000", "9-3", "x", "1-", ""] {
            assert!(a.clone().add(bad).is_err(), "{bad}");
        }
        a.add("any").unwrap();
        assert_eq!(a, AllowConnect::Any);
    }
}
