//! The listening socket of an export and its accept loop: one frontend at a
//! time; when it goes away, its state is dropped and the next one accepted.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use super::connection::VhostUserBlk;
use super::export::ExportState;
use crate::config::SocketAddress;

pub use vhost::vhost_user::Listener;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("export {export}: cannot listen on {path}")]
    Listen {
        export: String,
        path: String,
        #[source]
        source: vhost::vhost_user::Error,
    },
    #[error("export {export}: file descriptor {fd} is not a listening UNIX socket")]
    BadFd {
        export: String,
        fd: RawFd,
        #[source]
        source: io::Error,
    },
    #[error("export {export}: cannot set up the connection")]
    Setup {
        export: String,
        #[source]
        source: io::Error,
    },
    #[error("export {export}: vhost-user daemon error: {reason}")]
    Daemon { export: String, reason: String },
}

/// An export's socket and the state that outlives connections.
pub struct Server {
    export: Arc<ExportState>,
    listener: Listener,
    path: Option<PathBuf>,
    control: Arc<ServerControl>,
    /// Refused peers of this socket, for the rate-limited log line.
    refusals: crate::peercred::RefusalLog,
}

/// Stops a running server from another thread (block-export-del, quit).
pub struct ServerControl {
    stopping: AtomicBool,
    listener_fd: RawFd,
    connection: Mutex<Option<ShutdownHandle>>,
}

impl ServerControl {
    /// Whether a frontend is connected now.
    pub fn is_connected(&self) -> bool {
        self.connection
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Stops accepting; with `drop_connection`, also ends the current
    /// connection (its requests in flight complete first). The server
    /// thread then returns, removing the socket file.
    pub fn stop(&self, drop_connection: bool) {
        self.stopping.store(true, Ordering::Release);
        // SAFETY: shutdown on the listening socket wakes a blocked accept
        // (it then fails with EINVAL); the fd stays open until the server
        // thread drops the listener.
        unsafe { libc::shutdown(self.listener_fd, libc::SHUT_RDWR) };
        if drop_connection {
            if let Some(h) = self
                .connection
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
            {
                h.shutdown();
            }
        }
    }

    fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }
}

/// Checks that `fd` is a listening UNIX stream socket.
pub fn check_listening_unix_socket(fd: RawFd) -> io::Result<()> {
    use super::notify::getsockopt_int;
    match getsockopt_int(fd, libc::SO_DOMAIN) {
        None => return Err(io::Error::last_os_error()),
        Some(d) if d != libc::AF_UNIX => return Err(io::Error::other("not an AF_UNIX socket")),
        Some(_) => {}
    }
    if getsockopt_int(fd, libc::SO_ACCEPTCONN) != Some(1) {
        return Err(io::Error::other("socket is not listening"));
    }
    Ok(())
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(p) = &self.path {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl Server {
    /// Opens the export's listening socket (removing a stale socket file,
    /// refusing a path a live server listens on).
    pub fn bind(export: Arc<ExportState>) -> Result<Server, ServerError> {
        let id = export.config.id.clone();
        let (listener, path) = match &export.config.addr {
            SocketAddress::Unix { path } => {
                let err = |source| ServerError::Listen {
                    export: id.clone(),
                    path: path.clone(),
                    source,
                };
                // A stale file is replaced; the path of a live server
                // (another export, another process) is not taken over. The
                // socket file is removed when the Server is dropped.
                let l = crate::sockpath::bind(std::path::Path::new(path), true)
                    .map_err(|e| err(vhost::vhost_user::Error::SocketError(e)))?;
                (Listener::from(l), Some(PathBuf::from(path)))
            }
            SocketAddress::Fd { str } => {
                let fd: RawFd = str.parse().map_err(|_| ServerError::BadFd {
                    export: id.clone(),
                    fd: -1,
                    source: io::Error::other(format!(
                        "'{str}' is not a number, nor the name of a socket systemd passed"
                    )),
                })?;
                check_listening_unix_socket(fd).map_err(|source| ServerError::BadFd {
                    export: id.clone(),
                    fd,
                    source,
                })?;
                // SAFETY: the fd was handed to us by the orchestrator for this
                // export, checked above to be a listening UNIX socket; the
                // Listener takes sole ownership of it.
                (unsafe { Listener::from_raw_fd(fd) }, None)
            }
        };
        export.set_listener_name(super::notify::listener_name(listener.as_raw_fd()));
        let control = Arc::new(ServerControl {
            stopping: AtomicBool::new(false),
            listener_fd: listener.as_raw_fd(),
            connection: Mutex::new(None),
        });
        Ok(Server {
            export,
            listener,
            path,
            control,
            refusals: crate::peercred::RefusalLog::new(),
        })
    }

    pub fn control(&self) -> Arc<ServerControl> {
        self.control.clone()
    }

    /// The socket file, if the export listens on a path.
    pub fn socket_path(&self) -> Option<&PathBuf> {
        self.path.as_ref()
    }

    pub fn export(&self) -> &Arc<ExportState> {
        &self.export
    }

    /// Serves frontends one after another, until stopped.
    pub fn run(mut self) {
        // The last failure logged: one that repeats (out of descriptors,
        // say) is logged once, not at every retry.
        let mut last_error = None;
        while !self.control.is_stopping() {
            match self.serve_one() {
                Ok(()) => last_error = None,
                Err(e) => {
                    if self.control.is_stopping() {
                        break;
                    }
                    let msg = error_chain(&e);
                    if last_error.as_ref() != Some(&msg) {
                        log::error!("{msg}");
                        last_error = Some(msg);
                    } else {
                        log::debug!("{msg}");
                    }
                    // Do not spin if accept itself keeps failing.
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
            }
        }
        self.export.end_current();
        log::info!("export {}: stopped", self.export.config.id);
        // Dropping the server removes the socket file.
    }

    /// Accepts the next connection whose peer is allowed
    /// ([`crate::peercred`]); the others are closed as they come, before
    /// any message is read from them.
    fn accept_allowed(&mut self) -> Result<std::os::unix::net::UnixStream, ServerError> {
        let what = format!("export {}", self.export.config.id);
        loop {
            let stream = match self.listener.accept() {
                Ok(Some(s)) => s,
                // Would block, or the peer went away before the accept.
                Ok(None) => continue,
                Err(e) => {
                    return Err(ServerError::Daemon {
                        export: self.export.config.id.clone(),
                        reason: format!("cannot accept a connection: {e}"),
                    })
                }
            };
            if crate::peercred::check(&stream, &what, &mut self.refusals) {
                return Ok(stream);
            }
            // Dropping the stream closes the refused connection.
        }
    }

    /// Accepts one frontend and serves it until it disconnects.
    pub fn serve_one(&mut self) -> Result<(), ServerError> {
        let id = self.export.config.id.clone();
        let backend = Arc::new(VhostUserBlk::new(self.export.clone()).map_err(|source| {
            ServerError::Setup {
                export: id.clone(),
                source,
            }
        })?);
        let daemon_err = |reason: String| ServerError::Daemon {
            export: id.clone(),
            reason,
        };
        let mut daemon = VhostUserDaemon::new(
            format!("vub-{id}"),
            backend.clone(),
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .map_err(|e| daemon_err(e.to_string()))?;
        let setup_err = |source| ServerError::Setup {
            export: id.clone(),
            source,
        };
        for (t, handler) in daemon.get_epoll_handlers().iter().enumerate() {
            if let Some(fd) = backend.ring_eventfd(t) {
                handler
                    .register_listener(fd, EventSet::IN, u64::from(backend.io_event_id()))
                    .map_err(setup_err)?;
            }
            if let Some(fd) = backend.timer_fd(t) {
                handler
                    .register_listener(fd, EventSet::IN, u64::from(backend.timer_event_id()))
                    .map_err(setup_err)?;
            }
            handler
                .register_listener(
                    backend.wake_eventfd(t),
                    EventSet::IN,
                    u64::from(backend.wake_event_id()),
                )
                .map_err(setup_err)?;
        }
        backend.publish_wakers().map_err(setup_err)?;
        // From here a move (x-blockdev-set-iothread) replaces these threads.
        self.export
            .set_current(Box::new(super::iothread::Current::new(
                backend.clone(),
                daemon.get_epoll_handlers(),
            )));
        let stream = self.accept_allowed()?;
        daemon
            .start_with_stream(stream)
            .map_err(|e| daemon_err(e.to_string()))?;
        log::info!("export {id}: frontend connected");
        *self
            .control
            .connection
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = daemon.shutdown_handle();
        backend.set_shutdown(daemon.shutdown_handle());
        if self.control.is_stopping() {
            daemon.request_shutdown();
        }
        let result = daemon.wait();
        *self
            .control
            .connection
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = None;
        // The frontend is gone (or broke the protocol). Its kicks stay
        // registered until the daemon is dropped, so stop popping first.
        // Requests it popped may still be running: let them finish before
        // the worker threads and their rings go away with the daemon; what a
        // worker popped after this drain is cancelled when the worker ends.
        backend.close();
        backend.set_shutdown(None);
        backend.drain_all();
        // No move reaches the connection from here (one under way ends
        // first, while its threads still run); the threads that replaced
        // the library's end now, the library's own when it is dropped.
        self.export.end_current();
        drop(daemon);
        match result {
            Ok(()) => log::info!("export {id}: frontend disconnected"),
            Err(e) if is_disconnect(&e) => log::info!("export {id}: frontend disconnected"),
            Err(e) => log::warn!("export {id}: connection ended: {e}{}", protocol_hint(&e)),
        }
        Ok(())
    }
}

/// An error with its causes ("cannot set up the connection: Too many open
/// files").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    msg
}

/// What the vhost crate's own refusals mean (its errors do not carry the
/// value): the limits of the protocol a message broke.
fn protocol_hint(e: &vhost_user_backend::Error) -> &'static str {
    use vhost::vhost_user::Error as VuError;
    match e {
        vhost_user_backend::Error::HandleRequest(VuError::InvalidMessage) => {
            " (a header whose size field is over the 4096-byte message limit, a body \
             whose size does not match its request, a SET_MEM_TABLE of 0 or more than 32 \
             regions or whose region count disagrees with its body or its file descriptors, \
             a config access beyond 4096 bytes, file descriptors on a request that takes \
             none, or an unknown request)"
        }
        _ => "",
    }
}

/// A frontend that closed its socket (VM shut down, QEMU killed) is the
/// normal end of a connection, not a warning.
fn is_disconnect(e: &vhost_user_backend::Error) -> bool {
    use vhost::vhost_user::Error as VuError;
    matches!(
        e,
        vhost_user_backend::Error::HandleRequest(
            VuError::Disconnected | VuError::PartialMessage | VuError::SocketBroken(_)
        )
    )
}
