//! The QMP monitor: a UNIX socket speaking QEMU's management protocol.
//!
//! ```text
//!   accept thread --> one thread per client (at most MAX_CLIENTS)
//!     greeting -> qmp_capabilities -> commands (commands.rs) on daemon::State
//!     events (EventBus) -> every negotiated client, written without blocking
//! ```
//!
//! Malformed input gets an error reply; a flood (a value too large or too
//! deep) closes that connection. Commands run on the client's thread and
//! take the daemon's management locks, never a lock of the I/O path.

mod commands;
pub mod protocol;
mod reader;

use std::io::{self, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

use crate::config::MonitorConfig;
use crate::daemon::State;
use protocol::QmpError;
use reader::{JsonReader, ReadError};

/// Clients served at once; more are refused.
const MAX_CLIENTS: usize = 64;

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
}

impl Monitor {
    /// Listens on the monitor's socket (a stale socket file is replaced).
    pub fn bind(cfg: &MonitorConfig, state: Arc<State>) -> Result<Monitor, MonitorError> {
        let err = |source| MonitorError::Listen {
            path: cfg.path.clone(),
            source,
        };
        if let Ok(meta) = std::fs::symlink_metadata(&cfg.path) {
            use std::os::unix::fs::FileTypeExt;
            if meta.file_type().is_socket() {
                std::fs::remove_file(&cfg.path).map_err(err)?;
            }
        }
        let listener = UnixListener::bind(&cfg.path).map_err(err)?;
        log::info!("QMP monitor on {}", cfg.path.display());
        Ok(Monitor {
            listener,
            path: cfg.path.clone(),
            pretty: cfg.pretty,
            state,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves clients on a thread of its own.
    pub fn start(self) -> io::Result<()> {
        std::thread::Builder::new()
            .name("vub-qmp".into())
            .spawn(move || self.run())
            .map(|_| ())
    }

    fn run(self) {
        let clients = Arc::new(AtomicUsize::new(0));
        for stream in self.listener.incoming() {
            let stream = match stream {
                Ok(s) => s,
                Err(e) => {
                    log::warn!("QMP accept failed: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            if clients.fetch_add(1, Ordering::AcqRel) >= MAX_CLIENTS {
                clients.fetch_sub(1, Ordering::AcqRel);
                log::warn!("QMP: more than {MAX_CLIENTS} clients; connection refused");
                continue;
            }
            let state = self.state.clone();
            let pretty = self.pretty;
            let clients = clients.clone();
            let spawned = std::thread::Builder::new()
                .name("vub-qmp-client".into())
                .spawn(move || {
                    if let Err(e) = serve_client(stream, state, pretty) {
                        log::debug!("QMP client ended: {e}");
                    }
                    clients.fetch_sub(1, Ordering::AcqRel);
                });
            if spawned.is_err() {
                log::warn!("QMP: cannot start a client thread");
            }
        }
    }
}

/// The sending half of a client connection, shared with the event bus.
#[derive(Clone)]
struct Sender {
    stream: Arc<Mutex<UnixStream>>,
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
        let mut s = self.stream.lock().unwrap_or_else(|e| e.into_inner());
        s.write_all(text.as_bytes())
    }
}

fn serve_client(stream: UnixStream, state: Arc<State>, pretty: bool) -> io::Result<()> {
    let handle = stream.try_clone()?;
    let r = session(stream, state, pretty);
    // The event bus may hold a clone of the stream: close the connection
    // for real, so that the client sees it end.
    let _ = handle.shutdown(std::net::Shutdown::Both);
    r
}

fn session(stream: UnixStream, state: Arc<State>, pretty: bool) -> io::Result<()> {
    // A client that stops reading must not stall commands or events.
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let sender = Sender {
        stream: Arc::new(Mutex::new(stream.try_clone()?)),
        pretty,
    };
    let (major, minor, micro) = commands::version();
    sender.send(&protocol::greeting(major, minor, micro, commands::PACKAGE))?;
    let mut negotiated = false;
    let mut reader = JsonReader::new(stream);
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
        let outcome = commands::dispatch(&state, &cmd, &mut negotiated);
        match outcome {
            Ok(done) => {
                sender.send(&protocol::reply(done.value, cmd.id.clone()))?;
                if negotiated && !was_negotiated {
                    let events = sender.clone();
                    state.events.subscribe(move |ev| events.send(ev).is_ok());
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
