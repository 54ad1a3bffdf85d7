//! One NBD client: the fixed newstyle handshake, then requests one at a
//! time on this thread (synchronous engine). Whatever the client sends
//! gets the protocol's answer (an option error, a request error) or, where
//! the stream cannot be trusted any more (a bad magic, a write payload we
//! refuse to buffer), the connection ends; never a panic.

use std::io::{self, BufReader, IoSlice, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use super::wire::*;
use super::{gate, Export, Inner, Stream, HANDSHAKE_TIMEOUT};
use crate::block::{Allocation, BlockError};
use crate::io::IoVecs;
use crate::nbd::proto::*;

/// Option payloads beyond this are drained and refused with
/// NBD_REP_ERR_TOO_BIG; beyond [`MAX_OPTION_DRAIN`] the connection ends.
const MAX_OPTION: u32 = 64 << 10;
const MAX_OPTION_DRAIN: u32 = 16 << 20;
/// Most extents in one block-status chunk.
const MAX_EXTENTS: usize = 65536;

/// A metadata context a client selected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Context {
    Base,
    Depth,
    Bitmap(usize),
}

impl Context {
    fn id(self) -> u32 {
        match self {
            Context::Base => 0,
            Context::Depth => 1,
            Context::Bitmap(i) => 2u32.saturating_add(i as u32),
        }
    }
}

fn context_name(e: &Export, c: Context) -> String {
    match c {
        Context::Base => CONTEXT_BASE_ALLOCATION.to_string(),
        Context::Depth => CONTEXT_ALLOCATION_DEPTH.to_string(),
        Context::Bitmap(i) => format!(
            "{CONTEXT_DIRTY_BITMAP_PREFIX}{}",
            e.bitmaps.get(i).map_or("", |b| b.name())
        ),
    }
}

/// Why the connection ends.
enum End {
    /// The client went away, aborted or disconnected.
    Closed,
    /// A protocol violation we cannot answer and go on from.
    Violation(String),
    Io(io::Error),
}

impl From<io::Error> for End {
    fn from(e: io::Error) -> End {
        match e.kind() {
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe => End::Closed,
            _ => End::Io(e),
        }
    }
}

/// The transmission phase of one client, shared by its workers.
struct Session {
    server: Arc<Inner>,
    client: u64,
    structured: bool,
    contexts: Vec<Context>,
    export: Arc<Export>,
    align: u64,
    rd: Mutex<Reader>,
    wr: Mutex<Writer>,
    /// The socket, to shut it under a blocked reader.
    sock: Stream,
    /// Set when the connection ends: the workers stop reading.
    done: AtomicBool,
    /// Why it ended (the first worker's reason).
    end: Mutex<Option<End>>,
}

struct Conn<'a> {
    server: &'a Inner,
    client: u64,
    rd: Reader,
    wr: Writer,
    sock: Stream,
    /// TLS negotiated (NBD_OPT_STARTTLS).
    tls: bool,
    structured: bool,
    no_zeroes: bool,
    /// The contexts of the last SET_META_CONTEXT, and the export it named.
    meta: Option<(String, Vec<Context>)>,
}

/// Requests of one client served at once (each worker reads the next
/// request under the reader lock, serves it and writes its reply under
/// the writer lock): a client with several requests in flight (qemu-img
/// convert keeps 8, nbdcopy 64 per connection) is not served one by one.
pub const WORKERS_PER_CLIENT: usize = 4;

/// The reading half of a connection: the socket, or a TLS session shared
/// with the writing half.
type Reader = Box<dyn Read + Send>;
type Writer = Box<dyn Write + Send>;

type TlsStream = rustls::StreamOwned<rustls::ServerConnection, Stream>;

/// A TLS session used for reading and writing alike. One worker serves a
/// TLS client: a reader blocked in the session would hold it against the
/// writers.
#[derive(Clone)]
struct SharedTls(Arc<Mutex<TlsStream>>);

impl Read for SharedTls {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).read(buf)
    }
}

impl Write for SharedTls {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).flush()
    }
}

pub(super) fn serve(server: &Arc<Inner>, client: u64, stream: Stream) {
    let (wr, sock) = match (stream.try_clone(), stream.try_clone()) {
        (Ok(w), Ok(s)) => (w, s),
        (Err(e), _) | (_, Err(e)) => {
            log::warn!("NBD client {client}: {e}");
            return;
        }
    };
    stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT));
    let mut c = Conn {
        server,
        client,
        rd: Box::new(BufReader::with_capacity(256 << 10, stream)),
        wr: Box::new(wr),
        sock,
        tls: false,
        structured: false,
        no_zeroes: false,
        meta: None,
    };
    let r = c.handshake().and_then(|export| {
        c.sock.set_read_timeout(None);
        server.set_client_export(client, &export.id);
        export.clients.fetch_add(1, Ordering::Relaxed);
        log::debug!("NBD client {client}: on export '{}'", export.name);
        let align = u64::from(export.blk.node().request_alignment().max(1));
        let session = Arc::new(Session {
            server: server.clone(),
            client,
            structured: c.structured,
            contexts: c.meta.take().map(|(_, ctx)| ctx).unwrap_or_default(),
            export: export.clone(),
            align,
            rd: Mutex::new(c.rd),
            wr: Mutex::new(c.wr),
            sock: c.sock,
            done: AtomicBool::new(false),
            end: Mutex::new(None),
        });
        let mut workers = Vec::new();
        let n = if c.tls { 1 } else { WORKERS_PER_CLIENT };
        for i in 1..n {
            let s = session.clone();
            match crate::sandbox::spawn(
                crate::sandbox::Class::Control,
                format!("vub-nbd-{client}.{i}"),
                move || s.work(),
            ) {
                Ok(t) => workers.push(t),
                // Fewer workers serve as well, only one at a time.
                Err(e) => log::warn!("NBD client {client}: cannot start a worker: {e}"),
            }
        }
        session.work();
        for t in workers {
            let _ = t.join();
        }
        export.clients.fetch_sub(1, Ordering::Relaxed);
        let end = session.end.lock().unwrap_or_else(|e| e.into_inner()).take();
        end.map_or(Ok(()), Err)
    });
    match r {
        Ok(()) | Err(End::Closed) => log::debug!("NBD client {client}: closed"),
        Err(End::Violation(why)) => log::info!("NBD client {client}: disconnected: {why}"),
        Err(End::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
            log::info!("NBD client {client}: handshake not finished in time")
        }
        Err(End::Io(e)) => log::info!("NBD client {client}: {e}"),
    }
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

/// A u32-length-prefixed string at `*at`, advanced past it.
fn string_at(b: &[u8], at: &mut usize) -> Option<String> {
    let n = be32(b, *at)? as usize;
    let start = at.checked_add(4)?;
    let end = start.checked_add(n)?;
    if n > MAX_STRING {
        return None;
    }
    let s = std::str::from_utf8(b.get(start..end)?).ok()?.to_string();
    *at = end;
    Some(s)
}

impl Conn<'_> {
    fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), End> {
        self.rd.read_exact(buf).map_err(End::from)
    }

    fn write_all(&mut self, parts: &[&[u8]]) -> Result<(), End> {
        write_all_vectored(&mut *self.wr, parts).map_err(End::from)
    }

    fn drain(&mut self, mut n: u64) -> Result<(), End> {
        let mut buf = [0u8; 8192];
        while n > 0 {
            let k = n.min(buf.len() as u64) as usize;
            self.read_exact(&mut buf[..k])?;
            n -= k as u64;
        }
        Ok(())
    }

    fn reply(&mut self, option: u32, kind: u32, data: &[u8]) -> Result<(), End> {
        let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
        self.write_all(&[&option_reply_header(option, kind, len), data])
    }

    fn reply_err(&mut self, option: u32, kind: u32, msg: &str) -> Result<(), End> {
        log::debug!("NBD client {}: option {option}: {msg}", self.client);
        self.reply(option, kind, msg.as_bytes())
    }

    /// The handshake, up to transmission on an export.
    fn handshake(&mut self) -> Result<Arc<Export>, End> {
        let mut greeting = Vec::with_capacity(18);
        greeting.extend_from_slice(&NBDMAGIC.to_be_bytes());
        greeting.extend_from_slice(&IHAVEOPT.to_be_bytes());
        greeting.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        self.write_all(&[&greeting])?;
        let mut f = [0u8; 4];
        self.read_exact(&mut f)?;
        let flags = u32::from_be_bytes(f);
        if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
            return Err(End::Violation(format!("unknown client flags {flags:#x}")));
        }
        self.no_zeroes = flags & FLAG_C_NO_ZEROES != 0;
        loop {
            let mut h = [0u8; 16];
            self.read_exact(&mut h)?;
            let magic = u64::from_be_bytes(h[0..8].try_into().unwrap_or_default());
            let option = be32(&h, 8).unwrap_or(0);
            let len = be32(&h, 12).unwrap_or(0);
            if magic != IHAVEOPT {
                return Err(End::Violation(format!("bad option magic {magic:#x}")));
            }
            if len > MAX_OPTION {
                if len > MAX_OPTION_DRAIN {
                    // Answer, then go: reading gigabytes to resynchronise
                    // would only hold the thread.
                    let _ = self.reply_err(option, REP_ERR_TOO_BIG, "option too long");
                    return Err(End::Violation(format!("option {option} of {len} bytes")));
                }
                self.drain(u64::from(len))?;
                self.reply_err(option, REP_ERR_TOO_BIG, "option too long")?;
                continue;
            }
            let mut data = vec![0u8; len as usize];
            self.read_exact(&mut data)?;
            if self.server.tls.is_some() && !self.tls {
                match option {
                    OPT_STARTTLS if data.is_empty() => {
                        self.reply(option, REP_ACK, &[])?;
                        self.start_tls()?;
                    }
                    OPT_STARTTLS => {
                        self.reply_err(option, REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data")?;
                    }
                    OPT_ABORT => {
                        let _ = self.reply(option, REP_ACK, &[]);
                        return Err(End::Closed);
                    }
                    OPT_EXPORT_NAME => {
                        return Err(End::Violation(
                            "NBD_OPT_EXPORT_NAME without TLS, which this server requires".into(),
                        ));
                    }
                    _ => {
                        self.reply_err(
                            option,
                            REP_ERR_TLS_REQD,
                            &format!("Option {option:#x} not permitted before TLS"),
                        )?;
                    }
                }
                continue;
            }
            match option {
                OPT_EXPORT_NAME => {
                    let name = String::from_utf8_lossy(&data).into_owned();
                    let Some(e) = self.server.export(&name) else {
                        return Err(End::Violation(format!(
                            "NBD_OPT_EXPORT_NAME: no export '{name}'"
                        )));
                    };
                    let mut b = Vec::with_capacity(134);
                    b.extend_from_slice(&e.size().to_be_bytes());
                    b.extend_from_slice(
                        &transmission_flags(&e, self.server.max_connections).to_be_bytes(),
                    );
                    if !self.no_zeroes {
                        b.extend_from_slice(&[0u8; 124]);
                    }
                    self.write_all(&[&b])?;
                    self.meta = self.meta.take().filter(|(n, _)| *n == name);
                    return Ok(e);
                }
                OPT_ABORT => {
                    let _ = self.reply(option, REP_ACK, &[]);
                    return Err(End::Closed);
                }
                OPT_LIST => {
                    if !data.is_empty() {
                        self.reply_err(option, REP_ERR_INVALID, "NBD_OPT_LIST takes no data")?;
                        continue;
                    }
                    for e in self.server.exports() {
                        let mut b = Vec::new();
                        b.extend_from_slice(&(e.name.len() as u32).to_be_bytes());
                        b.extend_from_slice(e.name.as_bytes());
                        if let Some(d) = &e.description {
                            b.extend_from_slice(d.as_bytes());
                        }
                        self.reply(option, REP_SERVER, &b)?;
                    }
                    self.reply(option, REP_ACK, &[])?;
                }
                OPT_STARTTLS if self.tls => {
                    self.reply_err(option, REP_ERR_INVALID, "TLS already negotiated")?;
                }
                OPT_STARTTLS => {
                    self.reply_err(option, REP_ERR_POLICY, "TLS not configured")?;
                }
                OPT_INFO | OPT_GO => {
                    if let Some(e) = self.info(option, &data)? {
                        return Ok(e);
                    }
                }
                OPT_STRUCTURED_REPLY => {
                    if !data.is_empty() {
                        self.reply_err(
                            option,
                            REP_ERR_INVALID,
                            "NBD_OPT_STRUCTURED_REPLY takes no data",
                        )?;
                    } else if self.structured {
                        self.reply_err(
                            option,
                            REP_ERR_INVALID,
                            "structured replies already negotiated",
                        )?;
                    } else {
                        self.structured = true;
                        self.reply(option, REP_ACK, &[])?;
                    }
                }
                OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                    self.meta_context(option, &data)?;
                }
                _ => {
                    self.reply_err(option, REP_ERR_UNSUP, "unsupported option")?;
                }
            }
        }
    }

    /// After NBD_OPT_STARTTLS's ACK: the TLS handshake, then the rest of
    /// the session goes through it.
    fn start_tls(&mut self) -> Result<(), End> {
        let creds = self
            .server
            .tls
            .as_ref()
            .ok_or_else(|| End::Violation("no TLS credentials".into()))?;
        let conn = rustls::ServerConnection::new(creds.config.clone())
            .map_err(|e| End::Violation(format!("TLS: {e}")))?;
        let sock = self.sock.try_clone().map_err(End::Io)?;
        let mut tls = rustls::StreamOwned::new(conn, sock);
        while tls.conn.is_handshaking() {
            tls.conn
                .complete_io(&mut tls.sock)
                .map_err(|e| End::Violation(format!("TLS handshake failed: {e}")))?;
        }
        log::debug!("NBD client {}: TLS negotiated", self.client);
        let shared = SharedTls(Arc::new(Mutex::new(tls)));
        self.rd = Box::new(shared.clone());
        self.wr = Box::new(shared);
        self.tls = true;
        Ok(())
    }

    /// NBD_OPT_INFO / NBD_OPT_GO; `Some` when GO succeeded.
    fn info(&mut self, option: u32, data: &[u8]) -> Result<Option<Arc<Export>>, End> {
        let mut at = 0;
        let parsed = string_at(data, &mut at).and_then(|name| {
            let n = usize::from(be16(data, at)?);
            let reqs: Option<Vec<u16>> = (0..n).map(|i| be16(data, at + 2 + 2 * i)).collect();
            (at + 2 + 2 * n == data.len()).then_some((name, reqs?))
        });
        let Some((name, reqs)) = parsed else {
            self.reply_err(option, REP_ERR_INVALID, "malformed request")?;
            return Ok(None);
        };
        let Some(e) = self.server.export(&name) else {
            self.reply_err(
                option,
                REP_ERR_UNKNOWN,
                &format!("export '{name}' not present"),
            )?;
            return Ok(None);
        };
        let align = e.blk.node().request_alignment().max(1);
        if option == OPT_GO && align > 1 && !reqs.contains(&INFO_BLOCK_SIZE) {
            self.reply_err(
                option,
                REP_ERR_BLOCK_SIZE_REQD,
                &format!("request NBD_INFO_BLOCK_SIZE to use this export (alignment {align})"),
            )?;
            return Ok(None);
        }
        if reqs.contains(&INFO_NAME) {
            let mut b = INFO_NAME.to_be_bytes().to_vec();
            b.extend_from_slice(e.name.as_bytes());
            self.reply(option, REP_INFO, &b)?;
        }
        if reqs.contains(&INFO_DESCRIPTION) {
            if let Some(d) = &e.description {
                let mut b = INFO_DESCRIPTION.to_be_bytes().to_vec();
                b.extend_from_slice(d.as_bytes());
                self.reply(option, REP_INFO, &b)?;
            }
        }
        let mut b = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
        b.extend_from_slice(&align.to_be_bytes());
        b.extend_from_slice(&4096u32.max(align).to_be_bytes());
        b.extend_from_slice(&MAX_BUFFER.to_be_bytes());
        self.reply(option, REP_INFO, &b)?;
        let mut b = INFO_EXPORT.to_be_bytes().to_vec();
        b.extend_from_slice(&e.size().to_be_bytes());
        b.extend_from_slice(&transmission_flags(&e, self.server.max_connections).to_be_bytes());
        self.reply(option, REP_INFO, &b)?;
        self.reply(option, REP_ACK, &[])?;
        if option == OPT_GO {
            // Contexts chosen for another export do not apply.
            self.meta = self.meta.take().filter(|(n, _)| *n == name);
            return Ok(Some(e));
        }
        Ok(None)
    }

    /// NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT.
    fn meta_context(&mut self, option: u32, data: &[u8]) -> Result<(), End> {
        let set = option == OPT_SET_META_CONTEXT;
        if set && !self.structured {
            return self.reply_err(
                option,
                REP_ERR_INVALID,
                "NBD_OPT_SET_META_CONTEXT before NBD_OPT_STRUCTURED_REPLY",
            );
        }
        let mut at = 0;
        let parsed = string_at(data, &mut at).and_then(|name| {
            let n = be32(data, at)?;
            at += 4;
            let mut queries = Vec::new();
            for _ in 0..n {
                queries.push(string_at(data, &mut at)?);
            }
            (at == data.len()).then_some((name, queries))
        });
        let Some((name, queries)) = parsed else {
            return self.reply_err(option, REP_ERR_INVALID, "malformed request");
        };
        let Some(e) = self.server.export(&name) else {
            return self.reply_err(
                option,
                REP_ERR_UNKNOWN,
                &format!("export '{name}' not present"),
            );
        };
        let all: Vec<Context> = std::iter::once(Context::Base)
            .chain(e.allocation_depth.then_some(Context::Depth))
            .chain((0..e.bitmaps.len()).map(Context::Bitmap))
            .collect();
        let mut chosen: Vec<Context> = Vec::new();
        if queries.is_empty() && !set {
            chosen = all.clone();
        }
        for q in &queries {
            for &c in &all {
                let n = context_name(&e, c);
                let hit = *q == n
                    || (!set
                        && match c {
                            Context::Base => q == "base:",
                            Context::Depth => q == "qemu:",
                            Context::Bitmap(_) => q == "qemu:" || q == CONTEXT_DIRTY_BITMAP_PREFIX,
                        });
                if hit && !chosen.contains(&c) {
                    chosen.push(c);
                }
            }
        }
        for &c in &chosen {
            let mut b = c.id().to_be_bytes().to_vec();
            b.extend_from_slice(context_name(&e, c).as_bytes());
            self.reply(option, REP_META_CONTEXT, &b)?;
        }
        if set {
            self.meta = Some((name, chosen));
        }
        self.reply(option, REP_ACK, &[])
    }
}

impl Session {
    fn write_all(&self, parts: &[&[u8]]) -> Result<(), End> {
        let mut w = self.wr.lock().unwrap_or_else(|e| e.into_inner());
        write_all_vectored(&mut **w, parts).map_err(End::from)
    }

    /// Ends the connection: every worker's next read fails.
    fn finish(&self, why: End) {
        self.done.store(true, Ordering::Relaxed);
        let mut end = self.end.lock().unwrap_or_else(|e| e.into_inner());
        if end.is_none() {
            *end = Some(why);
        }
        drop(end);
        // A worker may be blocked reading: shut the socket under it.
        self.sock.shutdown_read();
    }

    /// One worker: read a request, serve it, reply; until the end.
    fn work(&self) {
        while !self.done.load(Ordering::Relaxed) {
            let next = self.next_request();
            let (req, payload) = match next {
                Ok(Some(r)) => r,
                Ok(None) => return,
                Err(why) => return self.finish(why),
            };
            gate().enter();
            let r = self.request(&self.export, &self.contexts, self.align, &req, payload);
            gate().leave();
            if let Err(why) = r {
                return self.finish(why);
            }
        }
    }

    /// The next request and a write's payload, read under the reader
    /// lock (a payload is read before anything is decided, so the stream
    /// stays in step whatever the answer). None: the connection ended.
    fn next_request(&self) -> Result<Option<(Request, Option<Buffer>)>, End> {
        let mut rd = self.rd.lock().unwrap_or_else(|e| e.into_inner());
        if self.done.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let mut h = [0u8; REQUEST_LEN];
        rd.read_exact(&mut h)?;
        let Ok(req) = Request::decode(&h) else {
            return Err(End::Violation("bad request magic".into()));
        };
        if self.server.stopping() {
            return Err(End::Closed);
        }
        if req.typ == CMD_DISC {
            // The others finish what they have, then read no more.
            drop(rd);
            self.finish(End::Closed);
            return Ok(None);
        }
        let mut payload = None;
        if req.typ == CMD_WRITE {
            if req.length > MAX_BUFFER {
                drop(rd);
                let errno = if self.structured { EOVERFLOW } else { EINVAL };
                let _ = self.error(&req, errno, "write too large");
                return Err(End::Violation(format!(
                    "write of {} bytes (at most {MAX_BUFFER})",
                    req.length
                )));
            }
            let len = req.length as usize;
            let buf = Buffer::take(len);
            buf.view
                .with_bytes(&buf.iov, |b| rd.read_exact(&mut b[..len]))?;
            payload = Some(buf);
        }
        Ok(Some((req, payload)))
    }

    /// Checks that the request lies in the export, aligned.
    fn check_range(
        &self,
        e: &Export,
        align: u64,
        req: &Request,
        write: bool,
    ) -> Result<(), (u32, &'static str)> {
        let end = req.offset.checked_add(u64::from(req.length));
        if end.is_none_or(|end| end > e.size()) {
            return Err(if write {
                (ENOSPC, "request beyond the end of the export")
            } else {
                (EINVAL, "request beyond the end of the export")
            });
        }
        if req.offset % align != 0 || u64::from(req.length) % align != 0 {
            return Err((
                EINVAL,
                "request not aligned to the export's minimum block size",
            ));
        }
        Ok(())
    }

    fn request(
        &self,
        e: &Arc<Export>,
        contexts: &[Context],
        align: u64,
        req: &Request,
        payload: Option<Buffer>,
    ) -> Result<(), End> {
        let allowed = match req.typ {
            CMD_READ => CMD_FLAG_FUA | if self.structured { CMD_FLAG_DF } else { 0 },
            CMD_WRITE | CMD_TRIM => CMD_FLAG_FUA,
            CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
            CMD_FLUSH | CMD_CACHE => 0,
            _ => return self.error(req, EINVAL, "unknown command"),
        };
        if req.flags & !allowed != 0 {
            return self.error(req, EINVAL, "unsupported flags for this command");
        }
        let writes = matches!(req.typ, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
        if writes && !e.blk.is_writable() {
            return self.error(req, EPERM, "export is read-only");
        }
        if req.typ != CMD_FLUSH {
            // Past the end: ENOSPC for what writes data, EINVAL for the
            // rest (trim included), as QEMU's nbd_co_receive_request.
            let grows = matches!(req.typ, CMD_WRITE | CMD_WRITE_ZEROES);
            if let Err((errno, msg)) = self.check_range(e, align, req, grows) {
                return self.error(req, errno, msg);
            }
        }
        let blk = &e.blk;
        let fua = req.flags & CMD_FLAG_FUA != 0;
        let done = |r: Result<(), BlockError>| r.map_err(|err| errno_to_wire(err.errno()));
        let off = req.offset;
        let len = u64::from(req.length);
        let r = match req.typ {
            CMD_READ => {
                if req.length > MAX_BUFFER {
                    let errno = if self.structured { EOVERFLOW } else { EINVAL };
                    return self.error(req, errno, "read too large");
                }
                return self.read(e, req);
            }
            CMD_WRITE => {
                let buf = payload.unwrap_or_else(|| Buffer::take(0));
                let r = block_on(blk.pwritev(off, &buf.iov.head(len)));
                buf.give_back();
                done(r.and_then(|()| if fua { block_on(blk.flush()) } else { Ok(()) }))
            }
            CMD_TRIM => {
                let r = if len == 0 {
                    Ok(())
                } else {
                    block_on(blk.pdiscard(off, len))
                };
                done(r.and_then(|()| if fua { block_on(blk.flush()) } else { Ok(()) }))
            }
            CMD_WRITE_ZEROES => {
                if req.flags & CMD_FLAG_FAST_ZERO != 0 && !reads_zero(e, off, len) {
                    // We cannot promise that zeroing is faster than
                    // writing; the client falls back to writing zeroes.
                    Err(ENOTSUP)
                } else if len == 0 || (req.flags & CMD_FLAG_FAST_ZERO != 0) {
                    Ok(())
                } else {
                    let unmap = req.flags & CMD_FLAG_NO_HOLE == 0;
                    let r = block_on(blk.pwrite_zeroes(off, len, unmap));
                    done(r.and_then(|()| if fua { block_on(blk.flush()) } else { Ok(()) }))
                }
            }
            CMD_FLUSH => done(block_on(blk.flush())),
            CMD_CACHE => done(self.cache(e, off, len)),
            CMD_BLOCK_STATUS => {
                if contexts.is_empty() {
                    return self.error(req, EINVAL, "no metadata context negotiated");
                }
                if len == 0 {
                    return self.error(req, EINVAL, "empty block status request");
                }
                return self.block_status(e, contexts, req);
            }
            _ => Err(EINVAL),
        };
        match r {
            Ok(()) => self.ok(req),
            Err(errno) => self.error(req, errno, "I/O error"),
        }
    }

    /// NBD_CMD_CACHE: read the range (into the host's cache), 32 MiB at a time.
    fn cache(&self, e: &Export, mut off: u64, len: u64) -> Result<(), BlockError> {
        let end = off + len;
        let (buf, _) = IoVecs::bounce(len.min(u64::from(MAX_BUFFER)) as usize, 4096);
        while off < end {
            let n = (end - off).min(buf.len());
            block_on(e.blk.preadv(off, &buf.head(n)))?;
            off += n;
        }
        Ok(())
    }

    fn read(&self, e: &Export, req: &Request) -> Result<(), End> {
        let len = req.length as usize;
        let buf = Buffer::take(len);
        if req.length > 0 {
            let r = block_on(e.blk.preadv(req.offset, &buf.iov.head(len as u64)));
            if let Err(err) = r {
                log::debug!("NBD client {}: read failed: {err}", self.client);
                buf.give_back();
                return self.error(req, errno_to_wire(err.errno()), "read failed");
            }
        }
        let r = buf.view.with_bytes(&buf.iov, |all| {
            let data = &all[..len];
            if self.structured {
                if data.is_empty() {
                    let h = chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, req.cookie, 0);
                    return self.write_all(&[&h]);
                }
                let h = chunk_header(
                    REPLY_FLAG_DONE,
                    REPLY_TYPE_OFFSET_DATA,
                    req.cookie,
                    req.length + 8,
                );
                self.write_all(&[&h, &req.offset.to_be_bytes(), data])
            } else {
                self.write_all(&[&simple_reply(0, req.cookie), data])
            }
        });
        buf.give_back();
        r
    }

    fn ok(&self, req: &Request) -> Result<(), End> {
        if self.structured {
            let h = chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, req.cookie, 0);
            self.write_all(&[&h])
        } else {
            self.write_all(&[&simple_reply(0, req.cookie)])
        }
    }

    fn error(&self, req: &Request, errno: u32, msg: &str) -> Result<(), End> {
        log::debug!(
            "NBD client {}: request {} at {} +{}: error {errno}: {msg}",
            self.client,
            req.typ,
            req.offset,
            req.length
        );
        if self.structured {
            let mut b = errno.to_be_bytes().to_vec();
            b.extend_from_slice(&(msg.len() as u16).to_be_bytes());
            b.extend_from_slice(msg.as_bytes());
            let h = chunk_header(
                REPLY_FLAG_DONE,
                REPLY_TYPE_ERROR,
                req.cookie,
                b.len() as u32,
            );
            self.write_all(&[&h, &b])
        } else {
            self.write_all(&[&simple_reply(errno, req.cookie)])
        }
    }

    fn block_status(&self, e: &Export, contexts: &[Context], req: &Request) -> Result<(), End> {
        let one = req.flags & CMD_FLAG_REQ_ONE != 0;
        let end = req.offset + u64::from(req.length);
        let mut chunks = Vec::with_capacity(contexts.len());
        for &c in contexts {
            match extents(e, c, req.offset, end, one) {
                Ok(ext) => chunks.push((c, ext)),
                Err(err) => {
                    return self.error(req, errno_to_wire(err.errno()), "block status failed");
                }
            }
        }
        let last = chunks.len().saturating_sub(1);
        for (i, (c, ext)) in chunks.into_iter().enumerate() {
            let mut b = Vec::with_capacity(4 + 8 * ext.len());
            b.extend_from_slice(&c.id().to_be_bytes());
            for (len, flags) in ext {
                b.extend_from_slice(&len.to_be_bytes());
                b.extend_from_slice(&flags.to_be_bytes());
            }
            let flags = if i == last { REPLY_FLAG_DONE } else { 0 };
            let h = chunk_header(flags, REPLY_TYPE_BLOCK_STATUS, req.cookie, b.len() as u32);
            self.write_all(&[&h, &b])?;
        }
        Ok(())
    }
}

fn transmission_flags(e: &Export, max_connections: u32) -> u16 {
    let mut f = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_DF | FLAG_SEND_CACHE;
    if e.blk.is_writable() {
        f |= FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES | FLAG_SEND_FAST_ZERO;
    } else {
        f |= FLAG_READ_ONLY;
    }
    // Every connection goes through the same BlockBackend: what one reads
    // includes what another's completed writes wrote, and a flush on any
    // flushes the node, so every completed write of every connection.
    // QEMU 7.2's server offers it the same way (unless max-connections=1).
    if max_connections != 1 {
        f |= FLAG_CAN_MULTI_CONN;
    }
    f
}

/// Whether all of `[off, off + len)` reads as zeroes already.
fn reads_zero(e: &Export, mut off: u64, len: u64) -> bool {
    let end = off + len;
    while off < end {
        match block_on(e.blk.node().block_status(off, end - off)) {
            Ok(st) if matches!(st.kind, Allocation::Zero | Allocation::Unallocated) => {
                off += st.len.clamp(1, end - off);
            }
            _ => return false,
        }
    }
    true
}

/// The extents of `[off, end)` in context `c`: (length, flags), adjacent
/// ones with the same flags merged; one with `one`.
fn extents(
    e: &Export,
    c: Context,
    mut off: u64,
    end: u64,
    one: bool,
) -> Result<Vec<(u32, u32)>, BlockError> {
    let mut out: Vec<(u32, u32)> = Vec::new();
    // Extents are u32; a run longer than that is cut (the client asks again).
    let cap = u64::from(u32::MAX) & !0xfff;
    while off < end && out.len() < MAX_EXTENTS {
        let want = (end - off).min(cap);
        let (n, flags) = match c {
            Context::Base | Context::Depth => {
                let st = block_on(e.blk.node().block_status(off, want))?;
                let n = st.len.clamp(1, want);
                let flags = match c {
                    Context::Base => match st.kind {
                        // As QEMU: what holds no data (a zero cluster
                        // too) is a hole.
                        Allocation::Data => 0,
                        Allocation::Zero | Allocation::Unallocated => STATE_HOLE | STATE_ZERO,
                    },
                    _ => match st.kind {
                        Allocation::Unallocated => 0,
                        _ => st.depth.saturating_add(1),
                    },
                };
                (n, flags)
            }
            Context::Bitmap(i) => {
                let Some(bm) = e.bitmaps.get(i) else {
                    return Ok(vec![(want as u32, 0)]);
                };
                if bm.is_dirty(off) {
                    let g = bm.granularity();
                    let start = off - off % g;
                    let run = bm
                        .dirty_run(start, want + (off - start))
                        .saturating_sub(off - start);
                    (run.clamp(1, want), STATE_DIRTY)
                } else {
                    let next = bm.next_dirty(off).unwrap_or(end).max(off + 1);
                    ((next - off).min(want), 0)
                }
            }
        };
        let n32 = n as u32;
        match out.last_mut() {
            Some((l, f)) if *f == flags && u64::from(*l) + n <= cap => *l += n32,
            _ => out.push((n32, flags)),
        }
        off += n;
        if one {
            break;
        }
    }
    Ok(out)
}

/// A worker's I/O buffer, kept for its next request: a fresh buffer per
/// request costs a page fault per 4 KiB touched (512 for a 2 MiB read).
struct Buffer {
    iov: IoVecs,
    view: crate::io::BounceView,
    cap: usize,
}

/// The largest buffer a worker keeps between requests.
const KEEP_BUFFER: usize = 4 << 20;

thread_local! {
    static BUFFER: std::cell::RefCell<Option<Buffer>> = const { std::cell::RefCell::new(None) };
}

impl Buffer {
    /// A buffer of at least `len` bytes (the worker's own if it is large
    /// enough).
    fn take(len: usize) -> Buffer {
        if let Some(b) = BUFFER.with(|c| c.borrow_mut().take()) {
            if b.cap >= len {
                return b;
            }
        }
        let cap = len.max(256 << 10);
        let (iov, view) = IoVecs::bounce(cap, 4096);
        Buffer { iov, view, cap }
    }

    fn give_back(self) {
        if self.cap <= KEEP_BUFFER {
            BUFFER.with(|c| *c.borrow_mut() = Some(self));
        }
    }
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    futures::executor::block_on(f)
}

fn write_all_vectored<W: Write + ?Sized>(w: &mut W, parts: &[&[u8]]) -> io::Result<()> {
    let mut idx = 0;
    let mut skip = 0usize;
    while idx < parts.len() {
        let slices: Vec<IoSlice<'_>> = parts[idx..]
            .iter()
            .enumerate()
            .map(|(i, p)| IoSlice::new(if i == 0 { &p[skip..] } else { p }))
            .collect();
        let mut n = match w.write_vectored(&slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        while idx < parts.len() {
            let left = parts[idx].len() - skip;
            if n >= left {
                n -= left;
                idx += 1;
                skip = 0;
            } else {
                skip += n;
                break;
            }
        }
    }
    Ok(())
}
