//! The NBD server: one listening socket (UNIX or TCP), its exports by
//! name, an accept thread and one thread per client (conn.rs).
//!
//! Threads: the accept thread and every client thread are our own
//! (sandbox class Control, as an export's vhost-user thread); a client's
//! requests run on its thread with the synchronous I/O engine, one after
//! another, so no iothread ever waits for a socket and no NBD client ever
//! waits behind a guest queue. Several clients (nbdcopy opens four to a
//! read-only export, which offers multi-conn) run in parallel.
//!
//! Drained sections: every request passes [`gate()`]; a drained section
//! (State registers a participant) closes it and waits for the requests
//! in flight, as it does for the vhost-user exports.

mod conn;
pub mod tls;
pub mod wire;

use std::collections::BTreeMap;
use std::io;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::block::bitmap::DirtyBitmap;
use crate::block::{BlockBackend, GraphError, Node};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("NBD server not running")]
    NotRunning,
    #[error("NBD server already running")]
    Running,
    #[error("cannot listen on {addr}")]
    Listen {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot start a thread: {0}")]
    Thread(#[source] io::Error),
    #[error("export '{0}' already exists")]
    NameExists(String),
    #[error("export name '{0}' is longer than 4096 bytes")]
    NameTooLong(String),
    #[error("Bitmap '{0}' is not found")]
    BitmapNotFound(String),
    #[error("Bitmap '{0}' is currently in use by another operation and cannot be used")]
    BitmapBusy(String),
    /// A read-only export promises a stable view (QEMU's words).
    #[error("Enabled bitmap '{0}' incompatible with readonly export")]
    BitmapEnabled(String),
    #[error(transparent)]
    Graph(#[from] GraphError),
}

/// Where the server listens (QAPI's SocketAddress).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Unix(PathBuf),
    Inet {
        host: String,
        port: String,
    },
    /// A listening socket passed by number.
    Fd(RawFd),
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
            ListenAddr::Inet { host, port } if host.contains(':') => {
                write!(f, "[{host}]:{port}")
            }
            ListenAddr::Inet { host, port } => write!(f, "{host}:{port}"),
            ListenAddr::Fd(n) => write!(f, "fd:{n}"),
        }
    }
}

enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

/// A client's socket.
pub(crate) enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
        })
    }

    fn shutdown(&self) {
        let _ = match self {
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
        };
    }

    pub(crate) fn shutdown_read(&self) {
        let _ = match self {
            Stream::Unix(s) => s.shutdown(Shutdown::Read),
            Stream::Tcp(s) => s.shutdown(Shutdown::Read),
        };
    }

    pub(crate) fn set_read_timeout(&self, t: Option<Duration>) {
        let _ = match self {
            Stream::Unix(s) => s.set_read_timeout(t),
            Stream::Tcp(s) => s.set_read_timeout(t),
        };
    }
}

impl io::Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl io::Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write_vectored(bufs),
            Stream::Tcp(s) => s.write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What block-export-add type=nbd asks for.
pub struct ExportSpec {
    pub id: String,
    pub name: String,
    pub description: Option<String>,
    pub writable: bool,
    pub bitmaps: Vec<String>,
    pub allocation_depth: bool,
    pub node: Arc<Node>,
}

/// One export: a BlockBackend on its node, the bitmaps it offers as
/// `qemu:dirty-bitmap:NAME` (found on the node or down its chain) and
/// whether it offers `qemu:allocation-depth`.
pub struct Export {
    pub id: String,
    pub name: String,
    pub description: Option<String>,
    pub blk: Arc<BlockBackend>,
    pub bitmaps: Vec<Arc<DirtyBitmap>>,
    pub allocation_depth: bool,
    /// Clients in transmission on this export.
    pub clients: AtomicUsize,
}

impl Export {
    /// Attaches to the node and takes the bitmaps (marked busy while
    /// exported, as QEMU does: they cannot be removed or changed meanwhile).
    pub fn new(spec: ExportSpec) -> Result<Export, ServerError> {
        if spec.name.len() > crate::nbd::proto::MAX_STRING {
            return Err(ServerError::NameTooLong(spec.name));
        }
        let mut bitmaps = Vec::new();
        for name in &spec.bitmaps {
            let bm = find_bitmap(&spec.node, name)
                .ok_or_else(|| ServerError::BitmapNotFound(name.clone()))?;
            if bm.is_busy() {
                return Err(ServerError::BitmapBusy(name.clone()));
            }
            if !spec.writable && bm.is_enabled() {
                return Err(ServerError::BitmapEnabled(name.clone()));
            }
            bitmaps.push(bm);
        }
        let blk = BlockBackend::new(&spec.id, spec.node, spec.writable)?;
        for bm in &bitmaps {
            bm.set_busy(true);
        }
        Ok(Export {
            id: spec.id,
            name: spec.name,
            description: spec.description,
            blk: Arc::new(blk),
            bitmaps,
            allocation_depth: spec.allocation_depth,
            clients: AtomicUsize::new(0),
        })
    }

    /// The node's size.
    pub fn size(&self) -> u64 {
        self.blk.size()
    }

    fn release_bitmaps(&self) {
        for bm in &self.bitmaps {
            bm.set_busy(false);
        }
    }
}

/// A bitmap named `name` on `node` or below it: through filters to their
/// file, and down the backing chain (a fleecing overlay exports its
/// backing node's bitmap), as QEMU's block-export-add `bitmaps`.
fn find_bitmap(node: &Arc<Node>, name: &str) -> Option<Arc<DirtyBitmap>> {
    let mut cur = Some(node.clone());
    let mut depth = 0;
    while let Some(n) = cur {
        if let Some(bm) = n.bitmaps().iter().find(|b| b.name() == name) {
            return Some(bm.clone());
        }
        depth += 1;
        if depth > 1000 {
            return None;
        }
        cur = if n.is_filter() {
            n.file_child().map(|c| c.node().clone())
        } else {
            // A format node's bitmaps live on it: no need to look at its
            // protocol child.
            n.backing_node()
        };
    }
    None
}

/// The gate every NBD request passes, closed by drained sections.
pub struct Gate {
    m: Mutex<GateState>,
    cv: Condvar,
}

#[derive(Default)]
struct GateState {
    quiesced: u32,
    in_flight: u32,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Gate {
    fn enter(&self) {
        let mut g = lock(&self.m);
        while g.quiesced > 0 {
            g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        g.in_flight += 1;
    }

    fn leave(&self) {
        let mut g = lock(&self.m);
        g.in_flight = g.in_flight.saturating_sub(1);
        if g.in_flight == 0 {
            self.cv.notify_all();
        }
    }

    /// Closes the gate and waits for the requests in flight, up to
    /// `timeout`; false if some are still running.
    pub fn drain_begin(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut g = lock(&self.m);
        g.quiesced += 1;
        while g.in_flight > 0 {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            g = self
                .cv
                .wait_timeout(g, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    pub fn drain_end(&self) {
        let mut g = lock(&self.m);
        g.quiesced = g.quiesced.saturating_sub(1);
        if g.quiesced == 0 {
            self.cv.notify_all();
        }
    }
}

/// The process's gate (one for every NBD client).
pub fn gate() -> &'static Gate {
    static GATE: OnceLock<Gate> = OnceLock::new();
    GATE.get_or_init(|| Gate {
        m: Mutex::new(GateState::default()),
        cv: Condvar::new(),
    })
}

struct Client {
    stream: Stream,
    /// The export id once in transmission.
    export: Option<String>,
}

pub(crate) struct Inner {
    exports: RwLock<BTreeMap<String, Arc<Export>>>,
    pub(crate) max_connections: u32,
    clients: Mutex<BTreeMap<u64, Client>>,
    clients_cv: Condvar,
    next_client: AtomicU64,
    stopping: AtomicBool,
    addr: ListenAddr,
    /// TLS required (tls-creds), with these credentials.
    pub(crate) tls: Option<tls::TlsCreds>,
}

impl Inner {
    /// The export called `name`.
    pub(crate) fn export(&self, name: &str) -> Option<Arc<Export>> {
        self.exports
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    /// Every export, by name.
    pub(crate) fn exports(&self) -> Vec<Arc<Export>> {
        self.exports
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    pub(crate) fn set_client_export(&self, client: u64, export: &str) {
        if let Some(c) = lock(&self.clients).get_mut(&client) {
            c.export = Some(export.to_string());
        }
    }

    pub(crate) fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }
}

/// A running server.
pub struct NbdServer {
    inner: Arc<Inner>,
    listener_fd: RawFd,
    accept: Option<JoinHandle<()>>,
    socket_path: Option<PathBuf>,
}

/// How long a client may take to finish the handshake before it is
/// dropped (QEMU 7.2 has a fixed 10 s as well).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

impl NbdServer {
    /// Binds `addr`; accepting starts with [`NbdServer::start`].
    pub fn bind(
        addr: ListenAddr,
        max_connections: u32,
        tls: Option<tls::TlsCreds>,
    ) -> Result<NbdServer, ServerError> {
        let err = |source: io::Error| ServerError::Listen {
            addr: addr.to_string(),
            source,
        };
        let (listener, socket_path) = match &addr {
            ListenAddr::Unix(p) => (
                Listener::Unix(crate::sockpath::bind(p, false).map_err(err)?),
                Some(p.clone()),
            ),
            ListenAddr::Inet { host, port } => {
                // Before arm (--nbd-server) any thread may; after it the
                // monitor's filter has TCP sockets only with --allow-tcp-bind.
                if crate::sandbox::restricted() && !crate::sandbox::tcp_bind_allowed() {
                    return Err(err(io::Error::new(
                        io::ErrorKind::PermissionDenied,
                        "the sandbox allows no TCP listening socket at run time (start the daemon with --allow-tcp-bind PORT)",
                    )));
                }
                let port: u16 = port.parse().map_err(|_| {
                    err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("port '{port}' is not a number from 0 to 65535"),
                    ))
                })?;
                let host = host.trim_start_matches('[').trim_end_matches(']');
                (
                    Listener::Tcp(TcpListener::bind((host, port)).map_err(err)?),
                    None,
                )
            }
            ListenAddr::Fd(fd) => {
                // SAFETY: the orchestrator passed this listening socket to
                // us by number; it is ours from here on.
                let l = unsafe { UnixListener::from_raw_fd(*fd) };
                (Listener::Unix(l), None)
            }
        };
        let listener_fd = match &listener {
            Listener::Unix(l) => l.as_raw_fd(),
            Listener::Tcp(l) => l.as_raw_fd(),
        };
        let inner = Arc::new(Inner {
            exports: RwLock::new(BTreeMap::new()),
            max_connections,
            clients: Mutex::new(BTreeMap::new()),
            clients_cv: Condvar::new(),
            next_client: AtomicU64::new(1),
            stopping: AtomicBool::new(false),
            addr,
            tls,
        });
        let mut server = NbdServer {
            inner,
            listener_fd,
            accept: None,
            socket_path,
        };
        server.accept = Some(Self::spawn_accept(server.inner.clone(), listener)?);
        Ok(server)
    }

    fn spawn_accept(inner: Arc<Inner>, listener: Listener) -> Result<JoinHandle<()>, ServerError> {
        crate::sandbox::spawn(
            crate::sandbox::Class::Control,
            "vub-nbd-accept".into(),
            move || accept_loop(inner, listener),
        )
        .map_err(ServerError::Thread)
    }

    /// Where it listens; for a TCP port 0, the port the kernel chose.
    pub fn local_addr(&self) -> String {
        match &self.inner.addr {
            ListenAddr::Inet { host, .. } => {
                // SAFETY: the listener lives as long as `self` (closed by
                // the accept thread only after stop()); the TcpListener
                // made from it here is forgotten, never closed.
                let l = std::mem::ManuallyDrop::new(unsafe {
                    TcpListener::from_raw_fd(self.listener_fd)
                });
                match l.local_addr() {
                    Ok(a) => a.to_string(),
                    Err(_) => host.to_string(),
                }
            }
            a => a.to_string(),
        }
    }

    pub fn socket_path(&self) -> Option<&PathBuf> {
        self.socket_path.as_ref()
    }

    /// Adds an export; its name must be free.
    pub fn add_export(&self, e: Export) -> Result<Arc<Export>, ServerError> {
        let mut map = self
            .inner
            .exports
            .write()
            .unwrap_or_else(|e| e.into_inner());
        if map.contains_key(&e.name) {
            e.release_bitmaps();
            return Err(ServerError::NameExists(e.name.clone()));
        }
        let e = Arc::new(e);
        map.insert(e.name.clone(), e.clone());
        log::info!(
            "export {}: NBD export '{}' on {}, {}",
            e.id,
            e.name,
            self.inner.addr,
            if e.blk.is_writable() {
                "writable"
            } else {
                "read-only"
            }
        );
        Ok(e)
    }

    /// The export whose block-export id is `id`.
    pub fn export_by_id(&self, id: &str) -> Option<Arc<Export>> {
        self.inner.exports().into_iter().find(|e| e.id == id)
    }

    pub fn exports(&self) -> Vec<Arc<Export>> {
        self.inner.exports()
    }

    /// Removes the export with block-export id `id`: new clients no
    /// longer see it; with `hard`, its clients are disconnected (they
    /// finish the request they are in first) and waited for.
    pub fn remove_export(&self, id: &str, hard: bool) -> Option<Arc<Export>> {
        let e = {
            let mut map = self
                .inner
                .exports
                .write()
                .unwrap_or_else(|e| e.into_inner());
            let name = map.values().find(|e| e.id == id)?.name.clone();
            map.remove(&name)?
        };
        if hard {
            let clients = lock(&self.inner.clients);
            for c in clients.values() {
                if c.export.as_deref() == Some(id) {
                    c.stream.shutdown();
                }
            }
            drop(clients);
            self.wait_clients(|c| c.export.as_deref() == Some(id));
        }
        e.release_bitmaps();
        Some(e)
    }

    fn wait_clients(&self, matches: impl Fn(&Client) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut clients = lock(&self.inner.clients);
        while clients.values().any(&matches) {
            let now = Instant::now();
            if now >= deadline {
                log::warn!("NBD server: clients still running after 30 s; going on");
                return;
            }
            clients = self
                .inner
                .clients_cv
                .wait_timeout(clients, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Stops accepting, disconnects every client, waits for them and
    /// removes every export (nbd-server-stop). Returns the exports.
    pub fn stop(mut self) -> Vec<Arc<Export>> {
        self.inner.stopping.store(true, Ordering::Relaxed);
        // SAFETY: shutdown on our own listening socket; it wakes the
        // accept thread, which then ends and closes the socket.
        unsafe { libc::shutdown(self.listener_fd, libc::SHUT_RDWR) };
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        for c in lock(&self.inner.clients).values() {
            c.stream.shutdown();
        }
        self.wait_clients(|_| true);
        if let Some(p) = &self.socket_path {
            let _ = std::fs::remove_file(p);
        }
        let exports: Vec<Arc<Export>> = std::mem::take(
            &mut *self
                .inner
                .exports
                .write()
                .unwrap_or_else(|e| e.into_inner()),
        )
        .into_values()
        .collect();
        for e in &exports {
            e.release_bitmaps();
        }
        exports
    }
}

fn accept_loop(inner: Arc<Inner>, listener: Listener) {
    let mut refusals = crate::peercred::RefusalLog::new();
    loop {
        let stream = match &listener {
            Listener::Unix(l) => l.accept().map(|(s, _)| Stream::Unix(s)),
            Listener::Tcp(l) => l.accept().map(|(s, _)| {
                let _ = s.set_nodelay(true);
                Stream::Tcp(s)
            }),
        };
        if inner.stopping() {
            return;
        }
        let stream = match stream {
            Ok(s) => s,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                // EMFILE and the like: wait rather than spin.
                log::warn!("NBD server: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if let Stream::Unix(s) = &stream {
            if !crate::peercred::check(s, "NBD server", &mut refusals) {
                continue;
            }
        }
        let id = inner.next_client.fetch_add(1, Ordering::Relaxed);
        {
            let mut clients = lock(&inner.clients);
            if inner.max_connections > 0 && clients.len() >= inner.max_connections as usize {
                // QEMU stops listening at the limit; the client sees its
                // connection closed before the greeting.
                log::debug!(
                    "NBD server: refused a client: max-connections {} reached",
                    inner.max_connections
                );
                continue;
            }
            let clone = match stream.try_clone() {
                Ok(c) => c,
                Err(e) => {
                    log::warn!("NBD server: cannot keep a client's socket: {e}");
                    continue;
                }
            };
            clients.insert(
                id,
                Client {
                    stream: clone,
                    export: None,
                },
            );
        }
        let inner2 = inner.clone();
        let spawned = crate::sandbox::spawn(
            crate::sandbox::Class::Control,
            format!("vub-nbd-{id}"),
            move || {
                conn::serve(&inner2, id, stream);
                let mut clients = lock(&inner2.clients);
                clients.remove(&id);
                inner2.clients_cv.notify_all();
            },
        );
        if let Err(e) = spawned {
            log::warn!("NBD server: cannot start a client thread: {e}");
            if let Some(c) = lock(&inner.clients).remove(&id) {
                c.stream.shutdown();
            }
        }
    }
}
