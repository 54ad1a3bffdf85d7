//! The `nbd` protocol driver: a client of an NBD server (qemu-nbd,
//! nbdkit, another daemon), with QEMU's options (BlockdevOptionsNbd).
//!
//! ```text
//!   preadv/pwritev/... --split at max payload--> Req (a copy of the data)
//!      --round robin--> Connection (conn.rs: its send and receive threads)
//!      <-- ReqFuture woken by the receive thread (Waker + wake eventfd)
//! ```
//!
//! One connection, or [`MULTI_CONN`] when the server sets CAN_MULTI_CONN
//! (a flush on any of them then covers the writes of all). Data is
//! copied between guest memory and the request's buffer on the iothread,
//! so the network threads never touch guest memory and a request whose
//! future is dropped leaves nothing dangling.

mod conn;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::Deserialize;

use crate::block::{Allocation, BlockError, BlockStatus, GraphError};
use crate::io::IoVecs;
use crate::nbd::proto;
use crate::opts;

pub use conn::Address;
use conn::{Connection, Output, Req, ReqFuture};

/// Connections opened when the server allows several (CAN_MULTI_CONN).
pub const MULTI_CONN: usize = 2;

/// QEMU's SocketAddress (flat union on `type`).
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub enum SocketAddress {
    Unix {
        path: String,
    },
    Inet {
        host: String,
        #[serde(deserialize_with = "port")]
        port: String,
    },
}

/// A port: QEMU's is a string (a service name or number); JSON users
/// also write a number.
fn port<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    struct V;
    impl de::Visitor<'_> for V {
        type Value = String;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a port number")
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
            Ok(v.to_string())
        }
    }
    d.deserialize_any(V)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct NbdOptions {
    #[serde(default)]
    pub node_name: String,
    pub server: SocketAddress,
    /// The export name; QEMU's default is the empty name.
    #[serde(default)]
    pub export: Option<String>,
    #[serde(default)]
    pub tls_creds: Option<String>,
    #[serde(default)]
    pub tls_hostname: Option<String>,
    /// A `qemu:dirty-bitmap:NAME` context whose dirty areas block status
    /// reports as unallocated (QEMU's experimental option, for pull-mode
    /// incremental backup).
    #[serde(default)]
    pub x_dirty_bitmap: Option<String>,
    /// Seconds requests wait for a reconnection after the server went
    /// away before they fail (QEMU's default: 0).
    #[serde(default, deserialize_with = "opts::uint")]
    pub reconnect_delay: u64,
    /// Seconds the first connection is retried (0: once).
    #[serde(default, deserialize_with = "opts::uint")]
    pub open_timeout: u64,
    #[serde(default, deserialize_with = "opts::bool")]
    pub read_only: bool,
    #[serde(default)]
    pub discard: super::DiscardMode,
    /// QEMU 10's `active` (see raw.rs): an inactive nbd node writes
    /// nothing.
    #[serde(default, deserialize_with = "opts::opt_bool")]
    pub active: Option<bool>,
    #[serde(default, deserialize_with = "opts::bool")]
    pub auto_read_only: bool,
    #[serde(default)]
    pub detect_zeroes: super::DetectZeroes,
    #[serde(default, deserialize_with = "opts::bool")]
    pub force_share: bool,
    #[serde(default)]
    pub cache: super::CacheOptions,
}

impl NbdOptions {
    /// The server's address, checked.
    pub fn address(&self) -> Result<Address, String> {
        match &self.server {
            SocketAddress::Unix { path } => Ok(Address::Unix(path.clone())),
            SocketAddress::Inet { host, port } => {
                let p = port
                    .parse::<u16>()
                    .map_err(|_| format!("port '{port}' is not a port number"))?;
                Ok(Address::Inet {
                    host: host.clone(),
                    port: p,
                })
            }
        }
    }
}

pub struct NbdDriver {
    node: String,
    size: u64,
    flags: u16,
    min_block: u32,
    max_payload: u32,
    has_context: bool,
    dirty_bitmap: bool,
    discard: super::DiscardMode,
    read_only: bool,
    conns: Vec<Arc<Connection>>,
    next: AtomicUsize,
    filename: String,
    tcp_port: Option<u16>,
}

impl NbdDriver {
    pub fn open(o: &NbdOptions) -> Result<Self, GraphError> {
        let err = |reason: String| GraphError::Open {
            node: o.node_name.clone(),
            reason,
        };
        if o.tls_creds.is_some() || o.tls_hostname.is_some() {
            return Err(err(
                "TLS for NBD is not supported yet (tls-creds); use a UNIX socket or a trusted network"
                    .into(),
            ));
        }
        if o.x_dirty_bitmap.is_some() && !o.read_only {
            // QEMU's nbd_process_options.
            return Err(err("x-dirty-bitmap can only be used with read-only".into()));
        }
        let address = o.address().map_err(err)?;
        let export = o.export.clone().unwrap_or_default();
        if export.len() > proto::MAX_STRING {
            return Err(err("export name too long to send to server".into()));
        }
        if o.x_dirty_bitmap
            .as_ref()
            .is_some_and(|b| b.len() > proto::MAX_STRING)
        {
            return Err(err("x-dirty-bitmap too long to send to server".into()));
        }
        let context = o
            .x_dirty_bitmap
            .clone()
            .unwrap_or_else(|| proto::CONTEXT_BASE_ALLOCATION.to_string());
        let cfg = conn::Config {
            node: o.node_name.clone(),
            address: address.clone(),
            export: export.clone(),
            context,
            reconnect_delay: Duration::from_secs(o.reconnect_delay),
            resolved: Vec::new(),
        };
        let mut cfg = cfg;
        if let Address::Inet { host, port } = &address {
            // A name needs files (/etc/hosts, nsswitch) and calls (uname,
            // DNS sockets) no thread may make once the sandbox is armed:
            // nodes added then take an address.
            if crate::sandbox::armed() && host.parse::<std::net::IpAddr>().is_err() {
                return Err(err(format!(
                    "server host '{host}' is not an IP address: the sandbox cannot resolve host names for nodes added at run time (give the address, or the node on the command line)"
                )));
            }
            // Resolve here, where files may be read (reconnections happen
            // on the network threads, which open nothing); a TCP node the
            // sandbox refuses says so before any look-up.
            if let Some(why) = crate::sandbox::tcp_connect_refusal(*port) {
                return Err(err(format!("Failed to connect to '{address}': {why}")));
            }
            cfg.resolved = conn::resolve(&address).map_err(|e| err(e.to_string()))?;
        }
        let (stream, exp) = conn::negotiate_with_timeout(&cfg, Duration::from_secs(o.open_timeout))
            .map_err(|e| err(e.to_string()))?;
        if !o.read_only && exp.flags & proto::FLAG_READ_ONLY != 0 {
            return Err(err(format!(
                "export '{export}' is read-only on the server; open it with read-only=on"
            )));
        }
        let n = if exp.flags & proto::FLAG_CAN_MULTI_CONN != 0 {
            MULTI_CONN
        } else {
            1
        };
        let mut conns =
            vec![Connection::start(cfg.clone(), stream, exp, 0).map_err(|e| err(e.to_string()))?];
        for i in 1..n {
            // A further connection that fails is not fatal: fewer are used.
            match conn::negotiate(&cfg, Duration::from_secs(5)) {
                Ok((s, e)) if e.size == exp.size && e.flags == exp.flags => {
                    match Connection::start(cfg.clone(), s, e, i) {
                        Ok(c) => conns.push(c),
                        Err(e) => {
                            log::warn!("nbd node '{}': connection {i}: {e}", o.node_name);
                            break;
                        }
                    }
                }
                _ => break,
            }
        }
        let filename = match &address {
            Address::Unix(p) => format!("nbd+unix:///{export}?socket={p}"),
            // As QEMU's nbd_refresh_filename.
            Address::Inet { host, port } if export.is_empty() => format!("nbd://{host}:{port}"),
            Address::Inet { host, port } => format!("nbd://{host}:{port}/{export}"),
        };
        log::info!(
            "nbd node '{}': {filename}, {} bytes, flags {:#x}, block sizes {}/{}/{}, {} connection(s){}",
            o.node_name,
            exp.size,
            exp.flags,
            exp.min_block,
            exp.preferred_block,
            exp.max_payload,
            conns.len(),
            if exp.structured { ", structured replies" } else { "" }
        );
        Ok(NbdDriver {
            node: o.node_name.clone(),
            size: exp.size,
            flags: exp.flags,
            min_block: exp.min_block,
            max_payload: exp.max_payload,
            has_context: exp.context_id.is_some(),
            dirty_bitmap: o.x_dirty_bitmap.is_some(),
            discard: o.discard,
            read_only: o.read_only,
            conns,
            next: AtomicUsize::new(0),
            filename,
            tcp_port: match address {
                Address::Inet { port, .. } => Some(port),
                Address::Unix(_) => None,
            },
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn request_alignment(&self) -> u32 {
        self.min_block
    }

    pub fn filename(&self) -> &str {
        &self.filename
    }

    /// The server's TCP port, if it is reached over TCP.
    pub fn tcp_port(&self) -> Option<u16> {
        self.tcp_port
    }

    /// Connections in use (for tests and query results).
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    fn conn(&self) -> &Arc<Connection> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.conns.len();
        &self.conns[i]
    }

    fn io_err(&self, op: &'static str, offset: u64, len: u64, e: std::io::Error) -> BlockError {
        BlockError::Io {
            node: self.node.clone(),
            op,
            offset,
            len,
            source: e,
        }
    }

    async fn run(&self, op: &'static str, req: Req) -> Result<Output, BlockError> {
        self.run_on(self.conn(), op, req).await
    }

    async fn run_on(
        &self,
        conn: &Connection,
        op: &'static str,
        req: Req,
    ) -> Result<Output, BlockError> {
        let (offset, len) = (req.offset, u64::from(req.length));
        let r = Arc::new(req);
        conn.submit(r.clone());
        ReqFuture(r)
            .await
            .map_err(|e| self.io_err(op, offset, len, e))
    }

    /// The largest piece of a request of `cmd` (payload for reads and
    /// writes, 32-bit lengths for the others), a multiple of the minimum
    /// block size.
    fn max_piece(&self, cmd: u16) -> u64 {
        let m = match cmd {
            proto::CMD_READ | proto::CMD_WRITE => u64::from(self.max_payload),
            _ => 1 << 30,
        };
        let b = u64::from(self.min_block);
        (m / b * b).max(b)
    }

    pub async fn preadv(&self, offset: u64, iov: &IoVecs) -> Result<(), BlockError> {
        // Past the end of the export reads as zeroes (a format's metadata
        // reads may reach past a protocol's end; QEMU's block layer does
        // the same); the server would refuse it.
        let within = self.size.saturating_sub(offset).min(iov.len());
        if within < iov.len() {
            iov.tail(within).fill_zero();
        }
        let iov = &iov.head(within);
        let total = iov.len();
        let piece = self.max_piece(proto::CMD_READ);
        let mut done = 0;
        while done < total {
            let n = piece.min(total - done);
            let conn = self.conn();
            let out = self
                .run_on(
                    conn,
                    "read",
                    Req::new(proto::CMD_READ, 0, offset + done, n as u32, None),
                )
                .await?;
            match out {
                Output::Data(d) if d.len() as u64 == n => {
                    iov.sub(done, n).copy_from(&d);
                    // The buffer goes back to the connection's pool: the
                    // next read fills it without zeroing it first.
                    conn.recycle(d);
                }
                _ => {
                    return Err(self.io_err(
                        "read",
                        offset + done,
                        n,
                        std::io::Error::from_raw_os_error(libc::EIO),
                    ))
                }
            }
            done += n;
        }
        Ok(())
    }

    pub async fn pwritev(&self, offset: u64, iov: &IoVecs, fua: bool) -> Result<(), BlockError> {
        let total = iov.len();
        let piece = self.max_piece(proto::CMD_WRITE);
        let flags = if fua && self.flags & proto::FLAG_SEND_FUA != 0 {
            proto::CMD_FLAG_FUA
        } else {
            0
        };
        let mut done = 0;
        while done < total {
            let n = piece.min(total - done);
            let mut data = Vec::new();
            iov.sub(done, n).extend_vec(&mut data);
            self.run(
                "write",
                Req::new(proto::CMD_WRITE, flags, offset + done, n as u32, Some(data)),
            )
            .await?;
            done += n;
        }
        if fua && flags == 0 {
            // The server cannot force a write: a flush does.
            self.flush().await?;
        }
        Ok(())
    }

    pub async fn flush(&self) -> Result<(), BlockError> {
        if self.flags & proto::FLAG_SEND_FLUSH == 0 {
            return Ok(());
        }
        // With CAN_MULTI_CONN a flush on one connection covers every
        // connection's completed writes (proto.md).
        self.run("flush", Req::new(proto::CMD_FLUSH, 0, 0, 0, None))
            .await
            .map(|_| ())
    }

    pub async fn pdiscard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        if self.discard != super::DiscardMode::Unmap || self.flags & proto::FLAG_SEND_TRIM == 0 {
            return Ok(());
        }
        self.ranged(proto::CMD_TRIM, "discard", 0, offset, len)
            .await
    }

    pub async fn pwrite_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
        fua: bool,
    ) -> Result<(), BlockError> {
        if self.flags & proto::FLAG_SEND_WRITE_ZEROES == 0 {
            // Zeroes written as data, a piece at a time.
            let piece = self.max_piece(proto::CMD_WRITE);
            let mut done = 0;
            while done < len {
                let n = piece.min(len - done);
                self.run(
                    "write",
                    Req::new(
                        proto::CMD_WRITE,
                        0,
                        offset + done,
                        n as u32,
                        Some(vec![0u8; n as usize]),
                    ),
                )
                .await?;
                done += n;
            }
            return if fua { self.flush().await } else { Ok(()) };
        }
        let mut flags = 0;
        if !may_unmap || self.discard != super::DiscardMode::Unmap {
            flags |= proto::CMD_FLAG_NO_HOLE;
        }
        if fua && self.flags & proto::FLAG_SEND_FUA != 0 {
            flags |= proto::CMD_FLAG_FUA;
        }
        self.ranged(proto::CMD_WRITE_ZEROES, "write-zeroes", flags, offset, len)
            .await?;
        if fua && self.flags & proto::FLAG_SEND_FUA == 0 {
            self.flush().await?;
        }
        Ok(())
    }

    async fn ranged(
        &self,
        cmd: u16,
        op: &'static str,
        flags: u16,
        offset: u64,
        len: u64,
    ) -> Result<(), BlockError> {
        let piece = self.max_piece(cmd);
        let mut done = 0;
        while done < len {
            let n = piece.min(len - done);
            self.run(op, Req::new(cmd, flags, offset + done, n as u32, None))
                .await?;
            done += n;
        }
        Ok(())
    }

    pub async fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus, BlockError> {
        let data = BlockStatus {
            kind: Allocation::Data,
            len,
            depth: 0,
        };
        if !self.has_context || len == 0 {
            return Ok(data);
        }
        let n = len.min(self.max_piece(proto::CMD_BLOCK_STATUS));
        let out = self
            .run(
                "block-status",
                Req::new(
                    proto::CMD_BLOCK_STATUS,
                    proto::CMD_FLAG_REQ_ONE,
                    offset,
                    n as u32,
                    None,
                ),
            )
            .await;
        // Block status is advice: where the server cannot give it the
        // range is data, as in QEMU (a read then finds out what it is).
        let out = match out {
            Ok(o) => o,
            Err(e) => {
                log::debug!("nbd node '{}': {e}: block status taken as data", self.node);
                return Ok(data);
            }
        };
        let Output::Extent { length, flags } = out else {
            return Ok(data);
        };
        // The extent is whole blocks; the last one of an unaligned image
        // may end past it.
        let length = u64::from(length).min(len);
        let kind = if self.dirty_bitmap {
            // As QEMU: dirty areas read as "not data".
            if flags & proto::STATE_DIRTY != 0 {
                Allocation::Unallocated
            } else {
                Allocation::Data
            }
        } else if flags & proto::STATE_HOLE != 0 {
            if flags & proto::STATE_ZERO != 0 {
                Allocation::Zero
            } else {
                // A hole that does not read as zeroes: data, to be safe.
                Allocation::Data
            }
        } else if flags & proto::STATE_ZERO != 0 {
            Allocation::Zero
        } else {
            Allocation::Data
        };
        Ok(BlockStatus {
            kind,
            len: length,
            depth: 0,
        })
    }

    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    pub fn close(&self) {
        for c in &self.conns {
            c.close();
        }
    }
}

impl Drop for NbdDriver {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: serde_json::Value) -> Result<NbdOptions, String> {
        serde_json::from_value(v).map_err(|e| e.to_string())
    }

    #[test]
    fn options_as_qemu_spells_them() {
        let o = parse(serde_json::json!({
            "node-name": "n", "server": {"type": "unix", "path": "/run/nbd.sock"},
            "export": "disk", "reconnect-delay": 5, "open-timeout": "3"
        }))
        .unwrap();
        assert_eq!(o.address(), Ok(Address::Unix("/run/nbd.sock".into())));
        assert_eq!((o.reconnect_delay, o.open_timeout), (5, 3));
        let o = parse(serde_json::json!({
            "server": {"type": "inet", "host": "127.0.0.1", "port": "10809"}
        }))
        .unwrap();
        assert_eq!(
            o.address(),
            Ok(Address::Inet {
                host: "127.0.0.1".into(),
                port: 10809
            })
        );
        assert!(o.export.is_none());
        let o = parse(serde_json::json!({
            "server": {"type": "inet", "host": "h", "port": "nbd"}
        }))
        .unwrap();
        assert!(o.address().unwrap_err().contains("not a port"));
        assert!(parse(serde_json::json!({"server": {"type": "vsock", "cid": "3"}})).is_err());
        assert!(parse(serde_json::json!({"export": "x"})).is_err());
        assert!(parse(serde_json::json!({
            "server": {"type": "unix", "path": "/p"}, "bogus": 1
        }))
        .is_err());
    }

    #[test]
    fn tls_and_a_writable_dirty_bitmap_are_refused_before_connecting() {
        let o = parse(serde_json::json!({
            "node-name": "n", "server": {"type": "unix", "path": "/nonexistent"},
            "tls-creds": "tls0"
        }))
        .unwrap();
        let e = NbdDriver::open(&o).err().unwrap().to_string();
        assert!(e.contains("TLS"), "{e}");
        let o = parse(serde_json::json!({
            "node-name": "n", "server": {"type": "unix", "path": "/nonexistent"},
            "x-dirty-bitmap": "qemu:dirty-bitmap:b"
        }))
        .unwrap();
        let e = NbdDriver::open(&o).err().unwrap().to_string();
        assert!(e.contains("read-only"), "{e}");
        let o = parse(serde_json::json!({
            "node-name": "n", "server": {"type": "unix", "path": "/nonexistent/sock"}
        }))
        .unwrap();
        let e = NbdDriver::open(&o).err().unwrap().to_string();
        // QEMU's words: "Failed to connect to '/nonexistent/sock': No such
        // file or directory".
        assert!(
            e.ends_with("Failed to connect to '/nonexistent/sock': No such file or directory"),
            "{e}"
        );
    }
}
