//! The QMP monitor: a UNIX socket speaking QEMU's management protocol.
//!
//! ```text
//!   accept thread --> one thread per client (at most MAX_CLIENTS)
//!     greeting -> qmp_capabilities -> commands (table.rs: the subsystems'
//!       tables of typed handlers) on state::State
//!     events (EventBus) -> every negotiated client, written without blocking
//! ```
//!
//! A peer not allowed by [`crate::peercred`] is closed at the accept.
//! Malformed input gets an error reply; a flood (a value too large or too
//! deep) closes that connection. Commands run on the client's thread and
//! take the daemon's management locks, never a lock of the I/O path.

mod nodes;
pub mod protocol;
pub(crate) mod reader;
pub mod table;

use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::config::MonitorConfig;
use crate::qapi::QmpError;
use crate::state::State;
use reader::{JsonReader, ReadError};

/// Clients served at once; when full, a new client takes the slot of the
/// oldest one that has not negotiated, or is refused if all have.
pub const MAX_CLIENTS: usize = 64;

/// How long a client may take from connecting to `qmp_capabilities`.
pub const NEGOTIATION_TIMEOUT: Duration = Duration::from_secs(10);

/// Overrides [`NEGOTIATION_TIMEOUT`], in milliseconds (for tests).
pub const NEGOTIATION_TIMEOUT_ENV: &str = "VUB_QMP_NEGOTIATION_TIMEOUT_MS";

#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    #[error("cannot listen on monitor socket {path}")]
    Listen {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

pub struct Monitor {
    listener: UnixListener,
    path: PathBuf,
    pretty: bool,
    state: Arc<State>,
    negotiation_timeout: Duration,
}

/// A connected client, as the accept thread sees it.
struct Client {
    id: u64,
    since: Instant,
    negotiated: Arc<AtomicBool>,
    stream: Arc<UnixStream>,
}

type Clients = Arc<Mutex<Vec<Client>>>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Frees a client's slot when its thread ends, however it ends.
struct Slot {
    id: u64,
    clients: Clients,
}

impl Drop for Slot {
    fn drop(&mut self) {
        lock(&self.clients).retain(|c| c.id != self.id);
    }
}

fn negotiation_timeout() -> Duration {
    std::env::var(NEGOTIATION_TIMEOUT_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(NEGOTIATION_TIMEOUT, Duration::from_millis)
}

impl Monitor {
    /// Listens on the monitor's socket (a stale socket file is replaced;
    /// one a live server listens on is not).
    pub fn bind(cfg: &MonitorConfig, state: Arc<State>) -> Result<Monitor, MonitorError> {
        let err = |source| MonitorError::Listen {
            path: cfg.path.clone(),
            source,
        };
        let listener = match cfg.fd {
            // Passed by systemd (crate::systemd); its path is the .socket
            // unit's, not bound here.
            Some(fd) => {
                crate::vhost_user::check_listening_unix_socket(fd).map_err(err)?;
                log::info!("QMP monitor on the socket systemd passed (fd {fd})");
                // SAFETY: systemd passed this listening socket for this
                // monitor alone (crate::systemd hands each out once); the
                // listener owns it from here.
                unsafe { <UnixListener as std::os::fd::FromRawFd>::from_raw_fd(fd) }
            }
            None => {
                let l = crate::sockpath::bind(&cfg.path, false).map_err(err)?;
                log::info!("QMP monitor on {}", cfg.path.display());
                l
            }
        };
        Ok(Monitor {
            listener,
            path: cfg.path.clone(),
            pretty: cfg.pretty,
            state,
            negotiation_timeout: negotiation_timeout(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves clients on a thread of its own.
    pub fn start(self) -> io::Result<()> {
        crate::sandbox::spawn(
            crate::sandbox::Class::Monitor,
            "vub-qmp".into(),
            move || self.run(),
        )
        .map(|_| ())
    }

    /// Closes the clients that did not negotiate in time; returns how long
    /// until the next one's time is up.
    fn reap(&self, clients: &Clients) -> Option<Duration> {
        let now = Instant::now();
        let mut list = lock(clients);
        list.retain(|c| {
            let late = !c.negotiated.load(Ordering::Acquire)
                && now.duration_since(c.since) >= self.negotiation_timeout;
            if late {
                log::warn!(
                    "QMP client closed: no qmp_capabilities within {:?}",
                    self.negotiation_timeout
                );
                let _ = c.stream.shutdown(std::net::Shutdown::Both);
            }
            !late
        });
        list.iter()
            .filter(|c| !c.negotiated.load(Ordering::Acquire))
            .map(|c| (c.since + self.negotiation_timeout).saturating_duration_since(now))
            .min()
    }

    /// Waits until a connection is ready to accept (true) or `timeout`
    /// passes (false).
    fn wait_readable(&self, timeout: Option<Duration>) -> io::Result<bool> {
        let ms = timeout.map_or(-1, |t| {
            // Round up: waking before the deadline only loops once more.
            i32::try_from(t.as_millis().saturating_add(1)).unwrap_or(i32::MAX)
        });
        let mut pfd = libc::pollfd {
            fd: self.listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one live pollfd, for the listener we own.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                return Ok(false);
            }
            return Err(e);
        }
        Ok(r > 0)
    }

    fn run(self) {
        let clients: Clients = Arc::default();
        let mut next_id = 0u64;
        let what = format!("QMP monitor {}", self.path.display());
        let mut refusals = crate::peercred::RefusalLog::new();
        if let Err(e) = self.listener.set_nonblocking(true) {
            log::warn!("QMP: cannot make the listener non-blocking: {e}");
        }
        loop {
            let next_deadline = self.reap(&clients);
            match self.wait_readable(next_deadline) {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) => {
                    log::warn!("QMP poll failed: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            }
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => {
                    log::warn!("QMP accept failed: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            // A peer that is not allowed is closed before the greeting
            // (dropping the stream closes it) and takes no client slot.
            if !crate::peercred::check(&stream, &what, &mut refusals) {
                continue;
            }
            // Accepted sockets do not inherit O_NONBLOCK, but be sure.
            if stream.set_nonblocking(false).is_err() {
                continue;
            }
            let stream = Arc::new(stream);
            let negotiated = Arc::new(AtomicBool::new(false));
            {
                let mut list = lock(&clients);
                if list.len() >= MAX_CLIENTS {
                    // The list is in order of arrival: the first one that
                    // has not negotiated is the oldest.
                    match list
                        .iter()
                        .position(|c| !c.negotiated.load(Ordering::Acquire))
                    {
                        Some(i) => {
                            let old = list.remove(i);
                            let _ = old.stream.shutdown(std::net::Shutdown::Both);
                            log::warn!(
                                "QMP: {MAX_CLIENTS} clients; closed the oldest one that has \
                                 not negotiated to admit a new one"
                            );
                        }
                        None => {
                            log::warn!("QMP: {MAX_CLIENTS} negotiated clients; connection refused");
                            continue;
                        }
                    }
                }
                next_id += 1;
                list.push(Client {
                    id: next_id,
                    since: Instant::now(),
                    negotiated: negotiated.clone(),
                    stream: stream.clone(),
                });
            }
            let slot = Slot {
                id: next_id,
                clients: clients.clone(),
            };
            let state = self.state.clone();
            let pretty = self.pretty;
            let spawned = crate::sandbox::spawn(
                crate::sandbox::Class::Monitor,
                "vub-qmp-client".into(),
                move || {
                    let _slot = slot;
                    if let Err(e) = serve_client(stream, state, pretty, negotiated) {
                        log::debug!("QMP client ended: {e}");
                    }
                },
            );
            if spawned.is_err() {
                // The closure (and with it the slot) was dropped.
                log::warn!("QMP: cannot start a client thread");
            }
        }
    }
}

/// The sending half of a client connection, shared with the event bus.
#[derive(Clone)]
struct Sender {
    stream: Arc<UnixStream>,
    /// One message at a time: a reply and an event never interleave.
    writing: Arc<Mutex<()>>,
    pretty: bool,
}

impl Sender {
    fn send(&self, v: &Value) -> io::Result<()> {
        let mut text = if self.pretty {
            serde_json::to_string_pretty(v)
        } else {
            serde_json::to_string(v)
        }
        .map_err(io::Error::other)?;
        text.push_str("\r\n");
        let _one = lock(&self.writing);
        (&*self.stream).write_all(text.as_bytes())
    }
}

fn serve_client(
    stream: Arc<UnixStream>,
    state: Arc<State>,
    pretty: bool,
    negotiated: Arc<AtomicBool>,
) -> io::Result<()> {
    let mut subscription = None;
    let r = session(&stream, &state, pretty, &negotiated, &mut subscription);
    // Close the connection for real, so that the client sees it end, and
    // drop the event bus's hold on it: the socket is closed once the last
    // reference goes with this thread.
    let _ = stream.shutdown(std::net::Shutdown::Both);
    if let Some(id) = subscription {
        state.events.unsubscribe(id);
    }
    r
}

/// Ends a flooded connection so that the client reads the error reply:
/// our side stops writing (the client sees the end after the reply), and
/// what the client still sends is read and dropped until it closes, at
/// most 16 MiB or 2 s. Closing with unread input would reset the
/// connection instead, and the client could lose the reply still queued
/// for it (seen in half the runs of test_a_flood_closes_only_that_connection
/// once sessions stopped leaking their socket).
fn linger(stream: &UnixStream) {
    use std::io::Read;
    const MAX_BYTES: usize = 16 << 20;
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let mut buf = vec![0u8; 64 << 10];
    let mut dropped = 0;
    while dropped < MAX_BYTES {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match (&*stream).read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => dropped += n,
        }
    }
}

/// The message of a panic's payload.
fn panic_message(p: &(dyn std::any::Any + Send)) -> &str {
    if let Some(s) = p.downcast_ref::<&str>() {
        s
    } else if let Some(s) = p.downcast_ref::<String>() {
        s
    } else {
        "(no message)"
    }
}

fn session(
    stream: &Arc<UnixStream>,
    state: &Arc<State>,
    pretty: bool,
    negotiated_flag: &AtomicBool,
    subscription: &mut Option<crate::events::SubscriptionId>,
) -> io::Result<()> {
    // A client that stops reading must not stall commands or events.
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let sender = Sender {
        stream: stream.clone(),
        writing: Arc::default(),
        pretty,
    };
    let (major, minor, micro) = table::version();
    sender.send(&protocol::greeting(major, minor, micro, table::PACKAGE))?;
    let mut negotiated = false;
    let mut reader = JsonReader::new(&**stream);
    loop {
        let value = match reader.next_value() {
            Ok(Some(v)) => v,
            Ok(None) => return Ok(()),
            Err(ReadError::Io(e)) => return Err(e),
            Err(ReadError::Parse(desc)) => {
                sender.send(&protocol::error_reply(&QmpError::generic(desc), None))?;
                continue;
            }
            Err(ReadError::Flood(desc)) => {
                let _ = sender.send(&protocol::error_reply(
                    &QmpError::generic(desc.clone()),
                    None,
                ));
                log::warn!("QMP client closed: {desc}");
                linger(stream);
                return Ok(());
            }
        };
        let cmd = match protocol::parse_command(value) {
            Ok(c) => c,
            Err((e, id)) => {
                sender.send(&protocol::error_reply(&e, id))?;
                continue;
            }
        };
        let was_negotiated = negotiated;
        // A panic is a bug; it must not take the connection (or the
        // client's slot) with it. The management locks it may have held
        // are taken with into_inner() everywhere, so they stay usable.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            table::dispatch(state, &cmd, &mut negotiated)
        }))
        .unwrap_or_else(|p| {
            let msg = panic_message(&*p);
            log::error!("QMP command '{}' panicked: {msg}", cmd.name);
            Err(QmpError::generic(format!(
                "internal error in '{}': {msg}",
                cmd.name
            )))
        });
        if negotiated && !was_negotiated {
            // Before the reply: once the client has it, its slot is safe.
            negotiated_flag.store(true, Ordering::Release);
        }
        match outcome {
            Ok(done) => {
                sender.send(&protocol::reply(done.value, cmd.id.clone()))?;
                if negotiated && !was_negotiated {
                    let events = sender.clone();
                    *subscription = Some(state.events.subscribe(move |ev| events.send(ev).is_ok()));
                }
                if done.quit {
                    log::info!("QMP quit");
                    // The main thread shuts down as on SIGTERM.
                    // SAFETY: kill only takes a pid and a signal number.
                    unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
                }
            }
            Err(e) => sender.send(&protocol::error_reply(&e, cmd.id.clone()))?,
        }
    }
}
