//! One NBD connection: negotiation, and two threads that do its socket
//! I/O so that no iothread ever blocks on the network.
//!
//! ```text
//!  iothread: submit(Req) --queue--> nbd-send thread: cookie, inflight map,
//!      ^                                write header + payload
//!      |                            nbd-recv thread: read reply header,
//!      |                                find cookie, read chunks into the
//!      +--- Waker + wake eventfd <---   request's buffer, complete it
//! ```
//!
//! The receiver is also the supervisor: when the socket fails (EOF, an
//! error, a reply that breaks the protocol) it drops the connection and
//! reconnects. Requests in flight go back to the front of the queue and
//! are sent again on the new connection; for `reconnect-delay` seconds
//! after the loss new requests wait too, after that every waiting and
//! new request fails with EIO until a connection is back.
//!
//! Before the sandbox is armed (the command line's nodes) the threads
//! wait in `sandbox::spawn`; a request made then (a format opened on an
//! nbd node reads its header) is done by the calling thread itself on the
//! socket, synchronously. Once armed, requests always queue, even if the
//! receiver has not started yet.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use crate::nbd::proto::{self, ProtoError, ReplyHeader, Request};

/// Where the server is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    Unix(String),
    Inet { host: String, port: u16 },
}

/// What every connection of a node is made with.
#[derive(Debug, Clone)]
pub struct Config {
    pub node: String,
    pub address: Address,
    pub export: String,
    /// The meta context block status reads: base:allocation, or the
    /// x-dirty-bitmap context.
    pub context: String,
    pub reconnect_delay: Duration,
    /// The addresses of an inet server's host, found when the node opened
    /// (the network threads cannot read /etc/hosts nor ask a resolver);
    /// empty: resolve at each connection.
    pub resolved: Vec<std::net::SocketAddr>,
}

/// What negotiation found out about the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Export {
    pub size: u64,
    pub flags: u16,
    pub min_block: u32,
    pub preferred_block: u32,
    /// The largest payload of a read or write.
    pub max_payload: u32,
    pub structured: bool,
    /// The id of the block status context, if the server has it.
    pub context_id: Option<u32>,
}

/// The default max payload when the server gives none (the protocol's
/// 32 MiB, which every server accepts).
pub const DEFAULT_MAX_PAYLOAD: u32 = 32 << 20;

/// A negotiation failure.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("Failed to connect to '{addr}': {}", crate::block::os_text(source))]
    Connect { addr: String, source: io::Error },
    #[error("NBD negotiation failed: {}", crate::block::os_text(.0))]
    Io(#[from] io::Error),
    #[error("NBD negotiation failed: {0}")]
    Proto(#[from] ProtoError),
    #[error("{0}")]
    Refused(String),
}

impl ConnectError {
    /// Whether trying again may help (the server is not up yet).
    fn transient(&self) -> bool {
        matches!(self, ConnectError::Connect { .. } | ConnectError::Io(_))
    }
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Unix(p) => write!(f, "{p}"),
            Address::Inet { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

/// The socket, of either family; `&Stream` reads and writes so the two
/// threads share one.
#[derive(Debug)]
pub enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn shutdown(&self) {
        let _ = match self {
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
        };
    }
    fn set_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
            Stream::Tcp(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
        }
    }
}

impl Read for &Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => (&*s).read(buf),
            Stream::Tcp(s) => (&*s).read(buf),
        }
    }
}

impl Write for &Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => (&*s).write(buf),
            Stream::Tcp(s) => (&*s).write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => (&*s).write_vectored(bufs),
            Stream::Tcp(s) => (&*s).write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The addresses of an inet server (none for a UNIX one).
pub fn resolve(addr: &Address) -> Result<Vec<std::net::SocketAddr>, ConnectError> {
    match addr {
        Address::Unix(_) => Ok(Vec::new()),
        Address::Inet { host, port } => (host.as_str(), *port)
            .to_socket_addrs()
            .map(|a| a.collect())
            .map_err(|source| ConnectError::Connect {
                addr: addr.to_string(),
                source,
            }),
    }
}

fn connect_socket(
    addr: &Address,
    resolved: &[std::net::SocketAddr],
    timeout: Duration,
) -> Result<Stream, ConnectError> {
    let err = |source| ConnectError::Connect {
        addr: addr.to_string(),
        source,
    };
    match addr {
        Address::Unix(p) => UnixStream::connect(p).map(Stream::Unix).map_err(err),
        Address::Inet { host, port } => {
            if let Some(why) = crate::sandbox::tcp_connect_refusal(*port) {
                return Err(err(io::Error::new(io::ErrorKind::PermissionDenied, why)));
            }
            let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
            let _ = host;
            let found;
            let addrs = if resolved.is_empty() {
                found = resolve(addr)?;
                &found[..]
            } else {
                resolved
            };
            for a in addrs {
                match TcpStream::connect_timeout(a, timeout) {
                    Ok(s) => {
                        let _ = s.set_nodelay(true);
                        return Ok(Stream::Tcp(s));
                    }
                    Err(e) => last = e,
                }
            }
            Err(err(last))
        }
    }
}

fn read_exact(s: &Stream, n: usize) -> io::Result<Vec<u8>> {
    let mut b = vec![0u8; n];
    (&mut &*s).read_exact(&mut b)?;
    Ok(b)
}

fn opt_reply(s: &Stream, opt: u32) -> Result<(proto::OptionReply, Vec<u8>), ConnectError> {
    let h = proto::OptionReply::decode(&read_exact(s, proto::OPTION_REPLY_HEADER_LEN)?)?;
    if h.option != opt {
        return Err(ProtoError::Invalid(format!(
            "reply to option {} where {opt} was sent",
            h.option
        ))
        .into());
    }
    // Nothing the client asks for has a longer answer.
    if h.length as usize > 2 * proto::MAX_STRING + 64 {
        return Err(ProtoError::Invalid(format!("option reply of {} bytes", h.length)).into());
    }
    let data = read_exact(s, h.length as usize)?;
    Ok((h, data))
}

fn opt_error(h: &proto::OptionReply, data: &[u8], what: &str) -> ConnectError {
    let msg = String::from_utf8_lossy(data);
    let kind = match h.typ {
        proto::REP_ERR_UNSUP => "unsupported",
        proto::REP_ERR_POLICY => "denied by policy",
        proto::REP_ERR_INVALID => "invalid",
        proto::REP_ERR_UNKNOWN => "export unknown",
        proto::REP_ERR_TLS_REQD => "TLS required",
        proto::REP_ERR_SHUTDOWN => "server shutting down",
        proto::REP_ERR_BLOCK_SIZE_REQD => "block size constraints required",
        _ => "failed",
    };
    ConnectError::Refused(format!(
        "Requested export not available: {what} {kind}{}{msg}",
        if msg.is_empty() { "" } else { ": " }
    ))
}

/// Connects and negotiates (fixed newstyle: STRUCTURED_REPLY,
/// SET_META_CONTEXT, GO; EXPORT_NAME where the server lacks GO).
pub fn negotiate(cfg: &Config, timeout: Duration) -> Result<(Stream, Export), ConnectError> {
    let s = connect_socket(&cfg.address, &cfg.resolved, timeout)?;
    // A server that stops answering in the handshake fails the attempt.
    s.set_timeout(Some(timeout.max(Duration::from_secs(1))))?;
    let hello = read_exact(&s, 18)?;
    let magic = u64::from_be_bytes(hello[0..8].try_into().expect("8 bytes"));
    if magic != proto::NBDMAGIC {
        return Err(ProtoError::BadMagic(magic).into());
    }
    let style = u64::from_be_bytes(hello[8..16].try_into().expect("8 bytes"));
    if style != proto::IHAVEOPT {
        return Err(ConnectError::Refused(
            "the server speaks the oldstyle protocol, which is not supported".into(),
        ));
    }
    let hflags = u16::from_be_bytes([hello[16], hello[17]]);
    if hflags & proto::FLAG_FIXED_NEWSTYLE == 0 {
        return Err(ConnectError::Refused(
            "the server does not support fixed newstyle negotiation".into(),
        ));
    }
    let no_zeroes = hflags & proto::FLAG_NO_ZEROES != 0;
    let mut cflags = proto::FLAG_C_FIXED_NEWSTYLE;
    if no_zeroes {
        cflags |= proto::FLAG_C_NO_ZEROES;
    }
    (&mut &s).write_all(&cflags.to_be_bytes())?;

    // Structured replies.
    (&mut &s).write_all(&proto::encode_option(proto::OPT_STRUCTURED_REPLY, &[]))?;
    let (h, data) = opt_reply(&s, proto::OPT_STRUCTURED_REPLY)?;
    let structured = match h.typ {
        proto::REP_ACK => true,
        _ if h.is_error() => false,
        t => return Err(ProtoError::Invalid(format!("reply {t} to STRUCTURED_REPLY")).into()),
    };
    let _ = data;

    // The block status context (needs structured replies).
    let mut context_id = None;
    if structured {
        (&mut &s).write_all(&proto::encode_option(
            proto::OPT_SET_META_CONTEXT,
            &proto::encode_meta_context(&cfg.export, &[cfg.context.as_str()]),
        ))?;
        loop {
            let (h, data) = opt_reply(&s, proto::OPT_SET_META_CONTEXT)?;
            match h.typ {
                proto::REP_META_CONTEXT => {
                    let (id, name) = proto::parse_meta_context(&data)?;
                    if name != cfg.context || context_id.is_some() {
                        return Err(ProtoError::Invalid(format!(
                            "unexpected meta context '{name}'"
                        ))
                        .into());
                    }
                    context_id = Some(id);
                }
                proto::REP_ACK => break,
                _ if h.is_error() => break,
                t => {
                    return Err(
                        ProtoError::Invalid(format!("reply {t} to SET_META_CONTEXT")).into(),
                    )
                }
            }
        }
        if context_id.is_none() && cfg.context != proto::CONTEXT_BASE_ALLOCATION {
            return Err(ConnectError::Refused(format!(
                "requested x-dirty-bitmap {} not found",
                cfg.context
            )));
        }
    }

    // GO, asking for the block size constraints.
    (&mut &s).write_all(&proto::encode_option(
        proto::OPT_GO,
        &proto::encode_go(&cfg.export, &[proto::INFO_BLOCK_SIZE]),
    ))?;
    let mut export: Option<(u64, u16)> = None;
    let mut bs: Option<(u32, u32, u32)> = None;
    let mut go = true;
    loop {
        let (h, data) = opt_reply(&s, proto::OPT_GO)?;
        match h.typ {
            proto::REP_INFO => match proto::parse_info(&data)? {
                proto::Info::Export { size, flags } => export = Some((size, flags)),
                proto::Info::BlockSize {
                    min,
                    preferred,
                    max,
                } => bs = Some((min, preferred, max)),
                proto::Info::Other(_) => {}
            },
            proto::REP_ACK => break,
            proto::REP_ERR_UNSUP => {
                go = false;
                break;
            }
            _ if h.is_error() => return Err(opt_error(&h, &data, &format!("'{}':", cfg.export))),
            t => return Err(ProtoError::Invalid(format!("reply {t} to GO")).into()),
        }
    }
    let (size, flags) = if go {
        export.ok_or_else(|| ProtoError::Invalid("GO without NBD_INFO_EXPORT".into()))?
    } else {
        // An old server: EXPORT_NAME, which has no error reply.
        (&mut &s).write_all(&proto::encode_option(
            proto::OPT_EXPORT_NAME,
            cfg.export.as_bytes(),
        ))?;
        let b = read_exact(&s, if no_zeroes { 10 } else { 134 })?;
        proto::parse_export_name_reply(&b)?
    };
    if flags & proto::FLAG_HAS_FLAGS == 0 {
        return Err(ProtoError::Invalid("transmission flags without HAS_FLAGS".into()).into());
    }
    let (min_block, preferred_block, max) = bs.unwrap_or((1, 4096, DEFAULT_MAX_PAYLOAD));
    let max_payload = max.min(DEFAULT_MAX_PAYLOAD).max(min_block);
    // Requests no longer wait for the handshake timeout.
    s.set_timeout(None)?;
    Ok((
        s,
        Export {
            size,
            flags,
            min_block,
            preferred_block,
            max_payload,
            structured,
            context_id,
        },
    ))
}

/// What a request returns: nothing, the data read, or one extent.
#[derive(Debug, PartialEq, Eq)]
pub enum Output {
    None,
    Data(Vec<u8>),
    Extent { length: u32, flags: u32 },
}

/// A request on its way; shared by the submitting future and the threads.
pub struct Req {
    pub cmd: u16,
    pub flags: u16,
    pub offset: u64,
    pub length: u32,
    pub payload: Option<Vec<u8>>,
    done: Mutex<Done>,
    wake_fd: Option<Arc<EventFd>>,
}

#[derive(Default)]
struct Done {
    result: Option<io::Result<Output>>,
    waker: Option<Waker>,
}

impl Req {
    pub fn new(cmd: u16, flags: u16, offset: u64, length: u32, payload: Option<Vec<u8>>) -> Self {
        Req {
            cmd,
            flags,
            offset,
            length,
            payload,
            done: Mutex::new(Done::default()),
            wake_fd: crate::io::current_wake_fd(),
        }
    }

    fn complete(&self, r: io::Result<Output>) {
        let waker = {
            let mut d = self.done.lock().unwrap_or_else(|e| e.into_inner());
            if d.result.is_some() {
                return;
            }
            d.result = Some(r);
            d.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
        if let Some(fd) = &self.wake_fd {
            let _ = fd.write(1);
        }
    }

    fn poll_done(&self, cx: &mut Context<'_>) -> Poll<io::Result<Output>> {
        let mut d = self.done.lock().unwrap_or_else(|e| e.into_inner());
        match d.result.take() {
            Some(r) => Poll::Ready(r),
            None => {
                if !d.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    d.waker = Some(cx.waker().clone());
                }
                Poll::Pending
            }
        }
    }
}

/// The future of a submitted request.
pub struct ReqFuture(pub Arc<Req>);

impl std::future::Future for ReqFuture {
    type Output = io::Result<Output>;
    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.0.poll_done(cx)
    }
}

/// A request sent and not yet answered, with what its reply gathered.
struct Inflight {
    req: Arc<Req>,
    data: Vec<u8>,
    /// The parts of a read its chunks filled, relative to its start.
    filled: Vec<(usize, usize)>,
    error: Option<i32>,
    extent: Option<(u32, u32)>,
}

struct State {
    queue: VecDeque<Arc<Req>>,
    inflight: HashMap<u64, Inflight>,
    stream: Option<Arc<Stream>>,
    export: Export,
    next_cookie: u64,
    /// When the connection was lost (None: connected).
    down_since: Option<Instant>,
    /// Past reconnect-delay: requests fail at once.
    failing: bool,
    closing: bool,
    /// The threads took over from synchronous requests.
    started: bool,
}

/// Read buffers kept per connection (at most this many).
const POOL_MAX: usize = 64;

pub struct Connection {
    cfg: Config,
    /// Read buffers, recycled by the iothread once it copied the data out
    /// (a new one would be zero-filled first).
    pool: Mutex<Vec<Vec<u8>>>,
    state: Mutex<State>,
    cv: Condvar,
    /// Set when the node is closed, read by the threads.
    closed: AtomicBool,
}

fn eio(msg: impl Into<String>) -> io::Error {
    io::Error::other(ProtoErrorIo(msg.into()))
}

/// An I/O error that is the server's fault (carries EIO).
#[derive(Debug)]
struct ProtoErrorIo(String);
impl std::fmt::Display for ProtoErrorIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for ProtoErrorIo {}

impl Connection {
    /// Starts the threads of a negotiated connection.
    pub fn start(
        cfg: Config,
        stream: Stream,
        export: Export,
        index: usize,
    ) -> io::Result<Arc<Connection>> {
        let c = Arc::new(Connection {
            cfg,
            pool: Mutex::new(Vec::new()),
            state: Mutex::new(State {
                queue: VecDeque::new(),
                inflight: HashMap::new(),
                stream: Some(Arc::new(stream)),
                export,
                next_cookie: 1,
                down_since: None,
                failing: false,
                closing: false,
                started: false,
            }),
            cv: Condvar::new(),
            closed: AtomicBool::new(false),
        });
        let node = &c.cfg.node;
        let r = c.clone();
        crate::sandbox::spawn(
            crate::sandbox::Class::Network,
            format!("nbd-recv-{node}-{index}"),
            move || r.receiver(),
        )?;
        let s = c.clone();
        if let Err(e) = crate::sandbox::spawn(
            crate::sandbox::Class::Network,
            format!("nbd-send-{node}-{index}"),
            move || s.sender(),
        ) {
            // The receiver runs already: it ends once closed.
            c.close();
            return Err(e);
        }
        Ok(c)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes back a read's buffer for a later read.
    pub fn recycle(&self, b: Vec<u8>) {
        let mut p = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        if p.len() < POOL_MAX {
            p.push(b);
        }
    }

    /// A buffer of `len` bytes whose content is unspecified (the caller
    /// overwrites every byte it hands out: see `Inflight::finish`).
    fn buffer(&self, len: usize) -> Vec<u8> {
        let b = self.pool.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let mut b = b.unwrap_or_default();
        b.resize(len, 0);
        b
    }

    fn read_buffer(&self, r: &Req) -> Vec<u8> {
        if r.cmd == proto::CMD_READ {
            self.buffer(r.length as usize)
        } else {
            Vec::new()
        }
    }

    /// Queues a request (or does it now, before the threads run).
    pub fn submit(&self, req: Arc<Req>) {
        let mut st = self.lock();
        if st.closing {
            drop(st);
            req.complete(Err(io::Error::from_raw_os_error(libc::EIO)));
            return;
        }
        // Only before the sandbox is armed (the command line's nodes, on
        // the main thread): an iothread's request arriving before the
        // receiver has started is queued, never done here (the iothread
        // has no socket calls, and must not block on the network).
        if !st.started && !crate::sandbox::threads_run() {
            self.sync_request(&mut st, req);
            return;
        }
        if st.failing {
            drop(st);
            req.complete(Err(io::Error::from_raw_os_error(libc::EIO)));
            return;
        }
        st.queue.push_back(req);
        drop(st);
        self.cv.notify_all();
    }

    /// A request on the calling thread, before the threads run.
    fn sync_request(&self, st: &mut State, req: Arc<Req>) {
        let Some(stream) = st.stream.clone() else {
            req.complete(Err(io::Error::from_raw_os_error(libc::EIO)));
            return;
        };
        let cookie = st.next_cookie;
        st.next_cookie = st.next_cookie.wrapping_add(1).max(1);
        let buf = self.read_buffer(&req);
        st.inflight.insert(cookie, Inflight::new(req.clone(), buf));
        if let Err(e) = send_one(&stream, cookie, &req) {
            st.inflight.remove(&cookie);
            req.complete(Err(e));
            return;
        }
        while st.inflight.contains_key(&cookie) {
            if let Err(e) = read_reply(&stream, st) {
                log::warn!("nbd node '{}': {e}", self.cfg.node);
                stream.shutdown();
                st.stream = None;
                st.down_since = Some(Instant::now());
                st.failing = true;
                for (_, i) in st.inflight.drain() {
                    i.req.complete(Err(io::Error::from_raw_os_error(libc::EIO)));
                }
                return;
            }
        }
    }

    /// Stops the threads and fails what is left (the node is closed).
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        let mut st = self.lock();
        st.closing = true;
        if let Some(s) = &st.stream {
            s.shutdown();
        }
        for r in st.queue.drain(..) {
            r.complete(Err(io::Error::from_raw_os_error(libc::EIO)));
        }
        for (_, i) in st.inflight.drain() {
            i.req.complete(Err(io::Error::from_raw_os_error(libc::EIO)));
        }
        drop(st);
        self.cv.notify_all();
    }

    fn sender(self: Arc<Self>) {
        let mut st = self.lock();
        while !st.started && !st.closing {
            st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        loop {
            if st.closing {
                return;
            }
            let stream = match &st.stream {
                Some(s) if !st.queue.is_empty() => s.clone(),
                _ => {
                    st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
                    continue;
                }
            };
            let queued: Vec<Arc<Req>> = st.queue.drain(..).collect();
            let mut batch = Vec::with_capacity(queued.len());
            for r in queued {
                let c = st.next_cookie;
                st.next_cookie = st.next_cookie.wrapping_add(1).max(1);
                batch.push((c, r));
            }
            for (c, r) in &batch {
                let buf = self.read_buffer(r);
                st.inflight.insert(*c, Inflight::new(r.clone(), buf));
            }
            drop(st);
            for (c, r) in &batch {
                if let Err(e) = send_one(&stream, *c, r) {
                    // The receiver sees the socket fail and resends.
                    log::debug!("nbd node '{}': send: {e}", self.cfg.node);
                    stream.shutdown();
                    break;
                }
            }
            st = self.lock();
        }
    }

    fn receiver(self: Arc<Self>) {
        // Test hook: a receiver that starts late (a loaded machine), so
        // that a guest request arrives before it has taken over.
        if let Some(ms) = std::env::var("VUB_DEBUG_NBD_START_DELAY_MS")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
        {
            std::thread::sleep(Duration::from_millis(ms.min(10_000)));
        }
        {
            let mut st = self.lock();
            st.started = true;
        }
        self.cv.notify_all();
        loop {
            if self.closed.load(Ordering::Acquire) {
                return;
            }
            let stream = self.lock().stream.clone();
            let Some(stream) = stream else {
                self.reconnect();
                continue;
            };
            let err = match self.receive_one(&stream) {
                Ok(()) => continue,
                Err(e) => e,
            };
            if self.closed.load(Ordering::Acquire) {
                return;
            }
            log::warn!(
                "nbd node '{}': connection to {} lost: {err}",
                self.cfg.node,
                self.cfg.address
            );
            stream.shutdown();
            let mut st = self.lock();
            st.stream = None;
            st.down_since = Some(Instant::now());
            if self.cfg.reconnect_delay.is_zero() {
                fail_all(&mut st);
            }
        }
    }

    /// Reads one reply (or chunk) and completes its request when done;
    /// the state lock is held only to look the request up and put it back.
    fn receive_one(&self, stream: &Stream) -> io::Result<()> {
        let h = read_header(stream)?;
        let cookie = h.cookie();
        let (mut inf, exp) = {
            let mut st = self.lock();
            match st.inflight.remove(&cookie) {
                Some(i) => (i, st.export),
                None => return Err(eio(format!("reply with unknown cookie {cookie:#x}"))),
            }
        };
        let r = read_body(stream, &mut inf, h, &exp);
        match r {
            Ok(true) => {
                inf.finish();
                Ok(())
            }
            Ok(false) | Err(_) => {
                let mut st = self.lock();
                if st.closing {
                    inf.req
                        .complete(Err(io::Error::from_raw_os_error(libc::EIO)));
                } else if st.failing {
                    // fail_all ran while this one was out of the map.
                    inf.req
                        .complete(Err(io::Error::from_raw_os_error(libc::EIO)));
                } else {
                    st.inflight.insert(cookie, inf);
                }
                r.map(|_| ())
            }
        }
    }

    /// One reconnection attempt, or a pause between attempts; fails the
    /// waiting requests once reconnect-delay has passed.
    fn reconnect(&self) {
        {
            let mut st = self.lock();
            if st.closing {
                return;
            }
            let since = *st.down_since.get_or_insert_with(Instant::now);
            if !st.failing && since.elapsed() >= self.cfg.reconnect_delay {
                fail_all(&mut st);
            }
        }
        let start = Instant::now();
        match negotiate(&self.cfg, Duration::from_secs(5)) {
            Ok((s, e)) => {
                let mut st = self.lock();
                let old = st.export;
                if e.size != old.size {
                    log::warn!(
                        "nbd node '{}': the export changed on reconnection (size {} -> {}); not using it",
                        self.cfg.node,
                        old.size,
                        e.size
                    );
                    s.shutdown();
                } else {
                    log::info!(
                        "nbd node '{}': reconnected to {}",
                        self.cfg.node,
                        self.cfg.address
                    );
                    st.stream = Some(Arc::new(s));
                    st.export = e;
                    st.down_since = None;
                    st.failing = false;
                    // What was sent on the old connection goes again, first.
                    let mut again: Vec<_> = st.inflight.drain().collect();
                    again.sort_by_key(|(c, _)| *c);
                    for (_, i) in again.into_iter().rev() {
                        st.queue.push_front(i.req);
                    }
                    drop(st);
                    self.cv.notify_all();
                    return;
                }
            }
            Err(e) => log::debug!("nbd node '{}': reconnect: {e}", self.cfg.node),
        }
        // Pause before the next attempt (at most 1 s, or until closed).
        let pause = Duration::from_millis(200).saturating_sub(start.elapsed());
        let st = self.lock();
        if !st.closing {
            let _ = self
                .cv
                .wait_timeout(st, pause.max(Duration::from_millis(50)));
        }
    }
}

/// Every waiting request fails; new ones fail until reconnected.
fn fail_all(st: &mut State) {
    st.failing = true;
    for r in st.queue.drain(..) {
        r.complete(Err(io::Error::from_raw_os_error(libc::EIO)));
    }
    for (_, i) in st.inflight.drain() {
        i.req.complete(Err(io::Error::from_raw_os_error(libc::EIO)));
    }
}

impl Inflight {
    /// `data`: a read's buffer of its length (contents unspecified).
    fn new(req: Arc<Req>, data: Vec<u8>) -> Self {
        Inflight {
            req,
            data,
            filled: Vec::new(),
            error: None,
            extent: None,
        }
    }

    fn finish(self) {
        let r = match (self.error, self.req.cmd) {
            (Some(e), _) => Err(io::Error::from_raw_os_error(e)),
            (None, proto::CMD_READ) => {
                // Every byte exactly once: the buffer may hold an earlier
                // read's data, which must not reach the guest.
                let mut f = self.filled;
                f.sort_unstable();
                let mut end = 0;
                let whole = f.iter().all(|&(a, b)| {
                    let ok = a == end;
                    end = b;
                    ok
                }) && end == self.data.len();
                if !whole {
                    Err(eio(format!(
                        "the server's read reply does not cover the {} bytes read exactly once",
                        self.req.length
                    )))
                } else {
                    Ok(Output::Data(self.data))
                }
            }
            (None, proto::CMD_BLOCK_STATUS) => match self.extent {
                Some((length, flags)) => Ok(Output::Extent { length, flags }),
                None => Err(eio("block status reply without an extent")),
            },
            (None, _) => Ok(Output::None),
        };
        self.req.complete(r);
    }
}

fn send_one(s: &Stream, cookie: u64, r: &Req) -> io::Result<()> {
    let h = Request {
        flags: r.flags,
        typ: r.cmd,
        cookie,
        offset: r.offset,
        length: r.length,
    }
    .encode();
    let mut w = s;
    match &r.payload {
        Some(p) => {
            let mut bufs = [io::IoSlice::new(&h), io::IoSlice::new(p)];
            let mut bufs = &mut bufs[..];
            while !bufs.is_empty() {
                let n = w.write_vectored(bufs)?;
                if n == 0 {
                    return Err(io::ErrorKind::WriteZero.into());
                }
                io::IoSlice::advance_slices(&mut bufs, n);
            }
            Ok(())
        }
        None => w.write_all(&h),
    }
}

fn read_header(s: &Stream) -> io::Result<ReplyHeader> {
    let mut b = [0u8; proto::STRUCTURED_REPLY_LEN];
    let mut r = s;
    r.read_exact(&mut b[..4])?;
    let magic = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    let len = ReplyHeader::header_len(magic).map_err(|e| eio(e.to_string()))?;
    r.read_exact(&mut b[4..len])?;
    ReplyHeader::decode(&b[..len]).map_err(|e| eio(e.to_string()))
}

fn read_reply(s: &Stream, st: &mut State) -> io::Result<()> {
    let h = read_header(s)?;
    let cookie = h.cookie();
    let Some(mut inf) = st.inflight.remove(&cookie) else {
        return Err(eio(format!("reply with unknown cookie {cookie:#x}")));
    };
    match read_body(s, &mut inf, h, &st.export) {
        Ok(true) => {
            inf.finish();
            Ok(())
        }
        Ok(false) => {
            st.inflight.insert(cookie, inf);
            Ok(())
        }
        Err(e) => {
            st.inflight.insert(cookie, inf);
            Err(e)
        }
    }
}

/// Reads what follows a reply header into its request; returns whether
/// the reply is complete. An error here breaks the connection (the
/// stream cannot be trusted any more). No lock is held: a slow server
/// never holds up a submitting iothread.
fn read_body(s: &Stream, inf: &mut Inflight, h: ReplyHeader, exp: &Export) -> io::Result<bool> {
    let req = inf.req.clone();
    let mut r = s;
    match h {
        ReplyHeader::Simple { error, .. } => {
            if error != 0 {
                inf.error = Some(proto::errno_from_wire(error));
            } else if req.cmd == proto::CMD_READ {
                if exp.structured {
                    return Err(eio("simple reply to a read with structured replies"));
                }
                r.read_exact(&mut inf.data)?;
                inf.filled = vec![(0, inf.data.len())];
            } else if req.cmd == proto::CMD_BLOCK_STATUS {
                return Err(eio("simple reply to block status"));
            }
            Ok(true)
        }
        ReplyHeader::Chunk {
            flags, typ, length, ..
        } => {
            if !exp.structured {
                return Err(eio("structured reply that was not negotiated"));
            }
            // A read's data chunk carries at most the request; nothing
            // else the client asks for is large.
            let limit = u64::from(exp.max_payload) + 64 + proto::MAX_STRING as u64;
            if u64::from(length) > limit {
                return Err(eio(format!("reply chunk of {length} bytes")));
            }
            let done = flags & proto::REPLY_FLAG_DONE != 0;
            match typ {
                proto::REPLY_TYPE_NONE => {
                    if length != 0 || !done {
                        return Err(eio("NONE chunk with a payload or without DONE"));
                    }
                }
                proto::REPLY_TYPE_OFFSET_DATA => {
                    if req.cmd != proto::CMD_READ || (length as usize) <= 8 {
                        return Err(eio("unexpected OFFSET_DATA chunk"));
                    }
                    let mut ob = [0u8; 8];
                    r.read_exact(&mut ob)?;
                    let off = u64::from_be_bytes(ob);
                    let n = u64::from(length - 8);
                    let rel = chunk_range(&req, off, n)?;
                    r.read_exact(&mut inf.data[rel..rel + n as usize])?;
                    inf.filled.push((rel, rel + n as usize));
                }
                proto::REPLY_TYPE_OFFSET_HOLE => {
                    let mut b = [0u8; 12];
                    if req.cmd != proto::CMD_READ || length != 12 {
                        return Err(eio("unexpected OFFSET_HOLE chunk"));
                    }
                    r.read_exact(&mut b)?;
                    let (off, n) = proto::parse_hole(&b).map_err(|e| eio(e.to_string()))?;
                    let rel = chunk_range(&req, off, u64::from(n))?;
                    inf.data[rel..rel + n as usize].fill(0);
                    inf.filled.push((rel, rel + n as usize));
                }
                proto::REPLY_TYPE_BLOCK_STATUS => {
                    if req.cmd != proto::CMD_BLOCK_STATUS {
                        return Err(eio("unexpected BLOCK_STATUS chunk"));
                    }
                    let b = read_exact(s, length as usize)?;
                    let (id, ext) =
                        proto::parse_block_status(&b).map_err(|e| eio(e.to_string()))?;
                    if Some(id) != exp.context_id || inf.extent.is_some() {
                        return Err(eio(format!("BLOCK_STATUS chunk for context {id}")));
                    }
                    let e = ext[0];
                    if e.length == 0 {
                        return Err(eio("BLOCK_STATUS extent of length 0"));
                    }
                    inf.extent = Some((e.length.min(req.length), e.flags));
                }
                t if proto::reply_type_is_error(t) => {
                    let b = read_exact(s, length as usize)?;
                    let e = proto::parse_error_chunk(t, &b).map_err(|e| eio(e.to_string()))?;
                    if !e.message.is_empty() {
                        log::debug!("nbd server error: {}", e.message);
                    }
                    inf.error.get_or_insert(proto::errno_from_wire(e.error));
                }
                t => return Err(eio(format!("unknown reply chunk type {t}"))),
            }
            Ok(done)
        }
    }
}

/// Where a chunk at `off` of `n` bytes lands in the request's buffer.
fn chunk_range(req: &Req, off: u64, n: u64) -> io::Result<usize> {
    let end = off.checked_add(n);
    if off < req.offset || end.is_none_or(|e| e > req.offset + u64::from(req.length)) || n == 0 {
        return Err(eio(format!(
            "chunk at {off} of {n} bytes outside the request at {} of {}",
            req.offset, req.length
        )));
    }
    Ok((off - req.offset) as usize)
}

/// Retries the first connection until `open_timeout` has passed (once
/// where it is zero).
pub fn negotiate_with_timeout(
    cfg: &Config,
    open_timeout: Duration,
) -> Result<(Stream, Export), ConnectError> {
    let start = Instant::now();
    loop {
        let left = open_timeout.saturating_sub(start.elapsed());
        match negotiate(cfg, left.max(Duration::from_secs(5))) {
            Ok(r) => return Ok(r),
            Err(e) if e.transient() && start.elapsed() < open_timeout => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(100).min(left));
            }
            Err(e) => return Err(e),
        }
    }
}
