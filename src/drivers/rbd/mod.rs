//! The `rbd` protocol driver: an image of a Ceph cluster through librbd's
//! asynchronous API (librbd and librados are loaded at run time: ffi.rs).
//!
//! ```text
//!   open (a Class::Cluster thread: librados starts its messenger,
//!         finisher and timer threads there, and they inherit its filter)
//!     rados_create2 -> conf file, key (secret), mon_host, auth
//!     -> rados_connect -> ioctx (pool, namespace) -> rbd_open
//!   I/O (the iothread)
//!     rbd_aio_readv/writev (iovecs straight from the request's buffers),
//!     rbd_aio_flush, rbd_aio_discard, rbd_aio_write_zeroes
//!       -> callback on a librbd thread: result stored, the task's waker
//!          woken and the submitting iothread's eventfd written
//!   block status: rbd_diff_iterate2 (whole objects, the object map)
//! ```
//!
//! Options are QEMU's BlockdevOptionsRbd; `encrypt` is refused. A request
//! future that is dropped before its completion waits for it: librbd may
//! still be reading from or writing into the request's buffers.

mod ffi;

use std::ffi::{c_int, c_void, CString};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll, Waker};

use serde::Deserialize;
use vmm_sys_util::eventfd::EventFd;

use crate::block::{Allocation, BlockError, BlockStatus, Graph, GraphError, Node};
use crate::io::IoVecs;
use crate::opts;
use crate::secret::Secret;

use super::{CacheOptions, DetectZeroes, DiscardMode};

/// `auth-client-required` entries (QEMU's RbdAuthMode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AuthMode {
    Cephx,
    None,
}

/// A monitor address (QEMU's InetSocketAddressBase).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Server {
    pub host: String,
    pub port: String,
}

/// Where an image is (QEMU's BlockdevOptionsRbd without the common
/// options): also blockdev-create's `location`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct RbdLocation {
    pub pool: String,
    #[serde(default)]
    pub namespace: Option<String>,
    pub image: String,
    #[serde(default)]
    pub conf: Option<String>,
    #[serde(default)]
    pub snapshot: Option<String>,
    #[serde(default)]
    pub encrypt: Option<serde_json::Value>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default, deserialize_with = "opts::opt_list")]
    pub auth_client_required: Option<Vec<AuthMode>>,
    #[serde(default)]
    pub key_secret: Option<String>,
    #[serde(default, deserialize_with = "opts::opt_list")]
    pub server: Option<Vec<Server>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct RbdOptions {
    #[serde(default)]
    pub node_name: String,
    pub pool: String,
    #[serde(default)]
    pub namespace: Option<String>,
    pub image: String,
    #[serde(default)]
    pub conf: Option<String>,
    #[serde(default)]
    pub snapshot: Option<String>,
    #[serde(default)]
    pub encrypt: Option<serde_json::Value>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default, deserialize_with = "opts::opt_list")]
    pub auth_client_required: Option<Vec<AuthMode>>,
    #[serde(default)]
    pub key_secret: Option<String>,
    #[serde(default, deserialize_with = "opts::opt_list")]
    pub server: Option<Vec<Server>>,
    #[serde(default, deserialize_with = "opts::bool")]
    pub read_only: bool,
    #[serde(default, deserialize_with = "opts::bool")]
    pub auto_read_only: bool,
    #[serde(default)]
    pub detect_zeroes: DetectZeroes,
    #[serde(default, deserialize_with = "opts::bool")]
    pub force_share: bool,
    #[serde(default)]
    pub discard: DiscardMode,
    /// QEMU 10's `active` (see raw.rs): an inactive rbd node writes
    /// nothing; activating it drops librbd's cache and reads the size
    /// again.
    #[serde(default, deserialize_with = "opts::opt_bool")]
    pub active: Option<bool>,
    /// As QEMU: `cache.direct=on` turns librbd's cache off
    /// (`rbd_cache=false`), otherwise it is on.
    #[serde(default)]
    pub cache: CacheOptions,
}

impl RbdOptions {
    pub fn location(&self) -> RbdLocation {
        RbdLocation {
            pool: self.pool.clone(),
            namespace: self.namespace.clone(),
            image: self.image.clone(),
            conf: self.conf.clone(),
            snapshot: self.snapshot.clone(),
            encrypt: self.encrypt.clone(),
            user: self.user.clone(),
            auth_client_required: self.auth_client_required.clone(),
            key_secret: self.key_secret.clone(),
            server: self.server.clone(),
        }
    }
}

/// Ceph's TCP ports a client connects to: the monitors (msgr2 3300,
/// legacy 6789) and the OSDs' default range (ms_bind_port_min/max).
pub const CEPH_PORTS: &[std::ops::RangeInclusive<u16>] = &[3300..=3300, 6789..=6789, 6800..=7568];

/// What the armed daemon must still reach for rbd nodes, now or added
/// later, where librbd is installed: (paths to read, TCP ports to
/// connect to). The library directory (librbd, its dependencies and
/// Ceph's plugins, loaded at the first rbd node), /etc/ceph and
/// ld.so.cache, and the `conf` files of rbd nodes open now. Empty where
/// librbd is not installed.
pub fn sandbox_reach(graph: &Graph) -> (Vec<std::path::PathBuf>, Vec<u16>) {
    let Some(dir) = ffi::library_dir() else {
        return (Vec::new(), Vec::new());
    };
    let mut paths = vec![
        dir,
        std::path::PathBuf::from("/etc/ceph"),
        std::path::PathBuf::from("/etc/ld.so.cache"),
    ];
    for n in graph.nodes() {
        if let Some(conf) = super::driver_as::<RbdDriver>(n).and_then(|d| d.conf.as_ref()) {
            paths.push(std::path::PathBuf::from(conf));
        }
    }
    let ports = CEPH_PORTS.iter().flat_map(|r| r.clone()).collect();
    (paths, ports)
}

fn cstr(what: &str, s: &str) -> Result<CString, String> {
    CString::new(s).map_err(|_| format!("'{what}' must not contain a NUL byte"))
}

fn errno_text(r: c_int) -> String {
    crate::block::os_text(&io::Error::from_raw_os_error(r.saturating_neg()))
}

/// A cluster connection and a pool's I/O context.
struct Conn {
    lib: &'static ffi::Lib,
    cluster: ffi::rados_t,
    ioctx: ffi::rados_ioctx_t,
}

// SAFETY: librados handles may be used from any thread (librados.h: the
// cluster handle and I/O contexts are thread-safe).
unsafe impl Send for Conn {}
// SAFETY: as above.
unsafe impl Sync for Conn {}

impl Drop for Conn {
    fn drop(&mut self) {
        // SAFETY: handles from a successful create/connect, destroyed once.
        unsafe {
            if !self.ioctx.is_null() {
                (self.lib.rados_ioctx_destroy)(self.ioctx);
            }
            (self.lib.rados_shutdown)(self.cluster);
        }
    }
}

impl Conn {
    /// Connects as QEMU's qemu_rbd_connect does. Runs on a cluster thread.
    fn connect(
        loc: &RbdLocation,
        secret: Option<&Secret>,
        rbd_cache: Option<bool>,
    ) -> Result<Conn, String> {
        let lib = ffi::lib()?;
        let user = loc.user.as_deref().unwrap_or("admin");
        let name = cstr("user", &format!("client.{user}"))?;
        let mut cluster: ffi::rados_t = std::ptr::null_mut();
        // SAFETY: out-pointer to a local; NUL-terminated strings.
        let r = unsafe { (lib.rados_create2)(&mut cluster, c"ceph".as_ptr(), name.as_ptr(), 0) };
        if r < 0 {
            return Err(format!("error initializing: {}", errno_text(r)));
        }
        let mut conn = Conn {
            lib,
            cluster,
            ioctx: std::ptr::null_mut(),
        };
        let set = |k: &str, v: &str| -> Result<(), String> {
            let (kc, vc) = (cstr(k, k)?, cstr(k, v)?);
            // SAFETY: a live cluster handle, NUL-terminated strings.
            let r = unsafe { (lib.rados_conf_set)(cluster, kc.as_ptr(), vc.as_ptr()) };
            if r < 0 {
                // Never the value: it may be the key.
                return Err(format!("error setting '{k}': {}", errno_text(r)));
            }
            Ok(())
        };
        match &loc.conf {
            Some(path) => {
                let c = cstr("conf", path)?;
                // SAFETY: a live cluster handle, a NUL-terminated path.
                let r = unsafe { (lib.rados_conf_read_file)(cluster, c.as_ptr()) };
                if r < 0 {
                    return Err(format!("error reading conf file {path}: {}", errno_text(r)));
                }
            }
            None => {
                // QEMU ignores a missing default configuration.
                // SAFETY: NULL asks for the default search path.
                let _ = unsafe { (lib.rados_conf_read_file)(cluster, std::ptr::null()) };
            }
        }
        if let Some(s) = secret {
            set("key", &s.as_base64())?;
        }
        if let Some(on) = rbd_cache {
            set("rbd_cache", if on { "true" } else { "false" })?;
        }
        if let Some(modes) = &loc.auth_client_required {
            let v: Vec<&str> = modes
                .iter()
                .map(|m| match m {
                    AuthMode::Cephx => "cephx",
                    AuthMode::None => "none",
                })
                .collect();
            set("auth_client_required", &v.join(";"))?;
        }
        if let Some(servers) = &loc.server {
            let v: Vec<String> = servers
                .iter()
                .map(|s| {
                    if s.host.contains(':') {
                        format!("[{}]:{}", s.host, s.port)
                    } else {
                        format!("{}:{}", s.host, s.port)
                    }
                })
                .collect();
            set("mon_host", &v.join(";"))?;
        }
        // SAFETY: a live, configured cluster handle.
        let r = unsafe { (lib.rados_connect)(cluster) };
        if r < 0 {
            return Err(format!("error connecting: {}", errno_text(r)));
        }
        let pool = cstr("pool", &loc.pool)?;
        let mut ioctx: ffi::rados_ioctx_t = std::ptr::null_mut();
        // SAFETY: a connected cluster, a NUL-terminated name, an out-pointer.
        let r = unsafe { (lib.rados_ioctx_create)(cluster, pool.as_ptr(), &mut ioctx) };
        if r < 0 {
            return Err(format!(
                "error opening pool {}: {}",
                loc.pool,
                errno_text(r)
            ));
        }
        conn.ioctx = ioctx;
        let ns = cstr("namespace", loc.namespace.as_deref().unwrap_or(""))?;
        // SAFETY: a live ioctx, a NUL-terminated namespace ("" = default).
        unsafe { (lib.rados_ioctx_set_namespace)(ioctx, ns.as_ptr()) };
        Ok(conn)
    }
}

/// Looks up the `key-secret` object.
fn secret_of(loc: &RbdLocation, graph: &Graph) -> Result<Option<Arc<Secret>>, String> {
    match &loc.key_secret {
        None => Ok(None),
        Some(id) => graph
            .secret(id)
            .map(Some)
            .ok_or_else(|| format!("No secret with id '{id}'")),
    }
}

fn check_location(loc: &RbdLocation) -> Result<(), String> {
    if loc.encrypt.is_some() {
        return Err("rbd encryption (the 'encrypt' option) is not supported".into());
    }
    if loc.pool.is_empty() {
        return Err("parameter 'pool' must not be empty".into());
    }
    if loc.image.is_empty() {
        return Err("parameter 'image' must not be empty".into());
    }
    Ok(())
}

/// A librados/librbd setup step (loading the libraries included) made on
/// a thread of the sandbox's Cluster class, so that the threads librados
/// starts get its filter, and no other class needs to load code.
fn on_cluster_thread<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    crate::sandbox::run_on_cluster_thread(f)?
}

pub struct RbdDriver {
    lib: &'static ffi::Lib,
    /// Null once closed (shutdown, blockdev-del): requests then fail.
    image: std::sync::atomic::AtomicPtr<c_void>,
    /// Shut down after the image is closed.
    conn: Mutex<Option<Conn>>,
    size: AtomicU64,
    discard: DiscardMode,
    /// The object map answers rbd_diff_iterate2 without listing objects.
    fast_diff: bool,
    /// `rbd:pool/image[@snapshot]`, for messages and the node's file name.
    name: String,
    /// The `conf` option (the sandbox keeps it readable).
    conf: Option<String>,
}

// SAFETY: librbd image handles may be used from any thread concurrently
// for I/O (librbd.h; QEMU submits from several iothreads).
unsafe impl Send for RbdDriver {}
// SAFETY: as above.
unsafe impl Sync for RbdDriver {}

struct SendImage(&'static ffi::Lib, ffi::rbd_image_t, Conn, u64, bool);
// SAFETY: see RbdDriver.
unsafe impl Send for SendImage {}

impl RbdDriver {
    pub fn open(o: &RbdOptions, graph: &Graph) -> Result<Self, GraphError> {
        let err = |reason: String| GraphError::Open {
            node: o.node_name.clone(),
            reason,
        };
        let loc = o.location();
        check_location(&loc).map_err(err)?;
        if loc.snapshot.is_some() && !o.read_only {
            return Err(err("rbd snapshots are read-only".into()));
        }
        let secret = secret_of(&loc, graph).map_err(err)?;
        let read_only = o.read_only;
        let rbd_cache = !o.cache.direct;
        let l = loc.clone();
        let opened = on_cluster_thread(move || {
            let lib = ffi::lib()?;
            let conn = Conn::connect(&l, secret.as_deref(), Some(rbd_cache))?;
            let image = cstr("image", &l.image)?;
            let snap = l
                .snapshot
                .as_deref()
                .map(|s| cstr("snapshot", s))
                .transpose()?;
            let snap_ptr = snap.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
            let mut img: ffi::rbd_image_t = std::ptr::null_mut();
            // SAFETY: a live ioctx, NUL-terminated names (or NULL), an
            // out-pointer to a local.
            let r = unsafe {
                if read_only {
                    (lib.rbd_open_read_only)(conn.ioctx, image.as_ptr(), &mut img, snap_ptr)
                } else {
                    (lib.rbd_open)(conn.ioctx, image.as_ptr(), &mut img, snap_ptr)
                }
            };
            if r < 0 {
                return Err(format!(
                    "error reading header from {}: {}",
                    l.image,
                    errno_text(r)
                ));
            }
            let (mut size, mut features) = (0u64, 0u64);
            let mut flags = 0u64;
            // SAFETY: an open image, out-pointers to locals.
            let r = unsafe { (lib.rbd_get_size)(img, &mut size) };
            // SAFETY: as above.
            let rf = unsafe { (lib.rbd_get_features)(img, &mut features) };
            // SAFETY: as above.
            let rg = unsafe { (lib.rbd_get_flags)(img, &mut flags) };
            if r < 0 || rf < 0 || rg < 0 {
                // SAFETY: the image opened above, closed once.
                unsafe { (lib.rbd_close)(img) };
                return Err(format!(
                    "error getting image size: {}",
                    errno_text(r.min(rf))
                ));
            }
            let fast = features & ffi::RBD_FEATURE_FAST_DIFF != 0
                && flags & ffi::RBD_FLAG_FAST_DIFF_INVALID == 0;
            Ok(SendImage(lib, img, conn, size, fast))
        })
        .map_err(err)?;
        let SendImage(lib, image, conn, size, fast_diff) = opened;
        let name = match &loc.snapshot {
            Some(s) => format!("rbd:{}/{}@{s}", loc.pool, loc.image),
            None => format!("rbd:{}/{}", loc.pool, loc.image),
        };
        log::info!("rbd: opened {name} ({size} bytes)");
        Ok(RbdDriver {
            lib,
            image: std::sync::atomic::AtomicPtr::new(image),
            conn: Mutex::new(Some(conn)),
            size: AtomicU64::new(size),
            discard: o.discard,
            fast_diff,
            name,
            conf: loc.conf.clone(),
        })
    }

    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    pub fn display_name(&self) -> &str {
        &self.name
    }

    fn image(&self) -> ffi::rbd_image_t {
        self.image.load(Ordering::Acquire)
    }

    /// Closes the image (releasing its exclusive lock for the next
    /// client at once, rather than when the cluster notices this one is
    /// gone) and the cluster connection. At shutdown and blockdev-del,
    /// once nothing is in flight.
    pub fn close(&self) {
        let image = self.image.swap(std::ptr::null_mut(), Ordering::AcqRel);
        if !image.is_null() {
            // SAFETY: the image opened in open(), closed once (the swap
            // above hands it to one caller); no request is in flight.
            let r = unsafe { (self.lib.rbd_close)(image) };
            if r < 0 {
                log::warn!("rbd: closing {}: {}", self.name, errno_text(r));
            }
        }
        drop(self.conn.lock().unwrap_or_else(|e| e.into_inner()).take());
    }

    fn io_error(node: &Node, op: &'static str, offset: u64, len: u64, r: i64) -> BlockError {
        let errno = i32::try_from(r.saturating_neg()).unwrap_or(libc::EIO);
        BlockError::Io {
            node: node.name().to_string(),
            op,
            offset,
            len,
            source: io::Error::from_raw_os_error(errno),
        }
    }

    /// Submits one asynchronous request; `submit` gets the completion.
    fn submit(
        &self,
        submit: impl FnOnce(ffi::rbd_completion_t) -> c_int,
    ) -> Result<AioFuture, i64> {
        if self.image().is_null() {
            return Err(-i64::from(libc::EIO));
        }
        let shared = Arc::new(Shared::default());
        let arg = Arc::into_raw(shared.clone()) as *mut c_void;
        let mut c: ffi::rbd_completion_t = std::ptr::null_mut();
        // SAFETY: `arg` is an Arc reference the callback takes back;
        // the out-pointer is a local.
        let r = unsafe { (self.lib.rbd_aio_create_completion)(arg, aio_done, &mut c) };
        if r < 0 {
            // SAFETY: the reference made above; no callback will come.
            drop(unsafe { Arc::from_raw(arg as *const Shared) });
            return Err(i64::from(r));
        }
        let r = submit(c);
        if r < 0 {
            // SAFETY: submission failed: librbd will not call back; the
            // completion and our reference are released here, once.
            unsafe {
                (self.lib.rbd_aio_release)(c);
                drop(Arc::from_raw(arg as *const Shared));
            }
            return Err(i64::from(r));
        }
        Ok(AioFuture { shared })
    }

    pub async fn preadv(&self, node: &Node, offset: u64, iov: &IoVecs) -> Result<(), BlockError> {
        let len = iov.len();
        let v = iov.as_slice();
        let cnt =
            c_int::try_from(v.len()).map_err(|_| Self::io_error(node, "read", offset, len, -22))?;
        let image = self.image();
        let lib = self.lib;
        // SAFETY: an open image; the iovecs point into the request's
        // buffers, which outlive the request (AioFuture waits for the
        // completion even when dropped); librbd copies the array.
        let f = self.submit(|c| unsafe { (lib.rbd_aio_readv)(image, v.as_ptr(), cnt, offset, c) });
        let r = match f {
            Ok(f) => f.await,
            Err(r) => r,
        };
        if r < 0 {
            return Err(Self::io_error(node, "read", offset, len, r));
        }
        Ok(())
    }

    pub async fn pwritev(
        &self,
        node: &Node,
        offset: u64,
        iov: &IoVecs,
        fua: bool,
    ) -> Result<(), BlockError> {
        let len = iov.len();
        let v = iov.as_slice();
        let cnt = c_int::try_from(v.len())
            .map_err(|_| Self::io_error(node, "write", offset, len, -22))?;
        let image = self.image();
        let lib = self.lib;
        // SAFETY: as in preadv; librbd only reads the buffers.
        let f = self.submit(|c| unsafe { (lib.rbd_aio_writev)(image, v.as_ptr(), cnt, offset, c) });
        let r = match f {
            Ok(f) => f.await,
            Err(r) => r,
        };
        if r < 0 {
            return Err(Self::io_error(node, "write", offset, len, r));
        }
        if fua {
            self.flush(node).await?;
        }
        Ok(())
    }

    pub async fn flush(&self, node: &Node) -> Result<(), BlockError> {
        let image = self.image();
        let lib = self.lib;
        // SAFETY: an open image and a fresh completion.
        let f = self.submit(|c| unsafe { (lib.rbd_aio_flush)(image, c) });
        let r = match f {
            Ok(f) => f.await,
            Err(r) => r,
        };
        if r < 0 {
            return Err(Self::io_error(node, "flush", 0, 0, r));
        }
        Ok(())
    }

    pub async fn pdiscard(&self, node: &Node, offset: u64, len: u64) -> Result<(), BlockError> {
        if self.discard != DiscardMode::Unmap {
            return Ok(());
        }
        let image = self.image();
        let lib = self.lib;
        // SAFETY: an open image and a fresh completion.
        let f = self.submit(|c| unsafe { (lib.rbd_aio_discard)(image, offset, len, c) });
        let r = match f {
            Ok(f) => f.await,
            Err(r) => r,
        };
        if r < 0 {
            return Err(Self::io_error(node, "discard", offset, len, r));
        }
        Ok(())
    }

    pub async fn pwrite_zeroes(
        &self,
        node: &Node,
        offset: u64,
        len: u64,
        may_unmap: bool,
        fua: bool,
    ) -> Result<(), BlockError> {
        let n = usize::try_from(len)
            .map_err(|_| Self::io_error(node, "write zeroes", offset, len, -22))?;
        // librbd.h: RBD_WRITE_ZEROES_FLAG_THICK_PROVISION keeps the space
        // allocated (QEMU sets it without BDRV_REQ_MAY_UNMAP).
        let flags: c_int = if may_unmap && self.discard == DiscardMode::Unmap {
            0
        } else {
            1
        };
        let image = self.image();
        let lib = self.lib;
        // SAFETY: an open image and a fresh completion.
        let f =
            self.submit(|c| unsafe { (lib.rbd_aio_write_zeroes)(image, offset, n, c, flags, 0) });
        let r = match f {
            Ok(f) => f.await,
            Err(r) => r,
        };
        if r < 0 {
            return Err(Self::io_error(node, "write zeroes", offset, len, r));
        }
        if fua {
            self.flush(node).await?;
        }
        Ok(())
    }

    /// What `[offset, offset + len)` holds from its start: allocated
    /// objects are data, the rest reads as zeroes. Without a valid object
    /// map (fast-diff) everything is data, as in QEMU (listing objects
    /// would be slow).
    pub fn block_status(
        &self,
        node: &Node,
        offset: u64,
        len: u64,
    ) -> Result<BlockStatus, BlockError> {
        let data = BlockStatus {
            kind: Allocation::Data,
            len,
            depth: 0,
        };
        let image = self.image();
        if !self.fast_diff || len == 0 || image.is_null() {
            return Ok(data);
        }
        let mut req = DiffReq {
            offset,
            end: offset.saturating_add(len),
            bytes: 0,
            exists: false,
        };
        // SAFETY: an open image; the callback gets `req` back as its
        // argument, alive for the whole (synchronous) call.
        let r = unsafe {
            (self.lib.rbd_diff_iterate2)(
                image,
                std::ptr::null(),
                offset,
                len,
                1,
                1,
                diff_cb,
                (&mut req as *mut DiffReq).cast(),
            )
        };
        if r < 0 && r != DIFF_STOP {
            log::debug!(
                "node {}: rbd_diff_iterate2: {}; reporting data",
                node.name(),
                errno_text(r)
            );
            return Ok(data);
        }
        if req.exists {
            Ok(BlockStatus {
                kind: Allocation::Data,
                len: req.bytes.clamp(1, len),
                depth: 0,
            })
        } else {
            Ok(BlockStatus {
                kind: Allocation::Zero,
                len: if req.bytes == 0 {
                    len
                } else {
                    req.bytes.min(len)
                },
                depth: 0,
            })
        }
    }

    /// blockdev-set-active true: what another client wrote or resized
    /// while this node was inactive is seen (QEMU's
    /// qemu_rbd_co_invalidate_cache: librbd's cache dropped), and the size
    /// is read again.
    pub fn activate(&self) -> Result<(), String> {
        let image = self.image();
        if image.is_null() {
            return Err(format!("{} is closed", self.name));
        }
        // SAFETY: an open image; the node's users are drained.
        let r = unsafe { (self.lib.rbd_invalidate_cache)(image) };
        if r < 0 {
            return Err(format!(
                "error invalidating the cache of {}: {}",
                self.name,
                errno_text(r)
            ));
        }
        let mut size = 0u64;
        // SAFETY: an open image, an out-pointer to a local.
        let r = unsafe { (self.lib.rbd_get_size)(image, &mut size) };
        if r < 0 {
            return Err(format!("error getting image size: {}", errno_text(r)));
        }
        self.size.store(size, Ordering::Release);
        Ok(())
    }

    /// block_resize.
    pub fn truncate(&self, size: u64) -> Result<(), String> {
        // SAFETY: an open image. Synchronous: resizing is rare and the
        // node's users are drained.
        let image = self.image();
        if image.is_null() {
            return Err(format!("{} is closed", self.name));
        }
        // SAFETY: as above.
        let r = unsafe { (self.lib.rbd_resize)(image, size) };
        if r < 0 {
            return Err(format!("error resizing {}: {}", self.name, errno_text(r)));
        }
        self.size.store(size, Ordering::Release);
        Ok(())
    }
}

impl Drop for RbdDriver {
    fn drop(&mut self) {
        self.close();
    }
}

/// blockdev-create driver=rbd: QEMU's BlockdevCreateOptionsRbd.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct RbdCreate {
    pub location: RbdLocation,
    #[serde(deserialize_with = "opts::size")]
    pub size: u64,
    #[serde(default, deserialize_with = "opts::opt_size")]
    pub cluster_size: Option<u64>,
    #[serde(default)]
    pub encrypt: Option<serde_json::Value>,
}

/// An image creation, checked (blockdev-create's QMP error) and ready
/// to run in the job.
pub struct Creation {
    loc: RbdLocation,
    secret: Option<Arc<Secret>>,
    size: u64,
    order: c_int,
}

/// Checks blockdev-create's options for an image (rbd_create, with the
/// object size from `cluster-size`: a power of two from 4 KiB to 32 MiB).
pub fn prepare_create(c: &RbdCreate, graph: &Graph) -> Result<Creation, String> {
    check_location(&c.location)?;
    if c.encrypt.is_some() {
        return Err("rbd encryption (the 'encrypt' option) is not supported".into());
    }
    if c.location.snapshot.is_some() {
        return Err("Can't use snapshot name for image creation".into());
    }
    let mut order: c_int = 0;
    if let Some(cs) = c.cluster_size {
        if !cs.is_power_of_two() || !(4096..=(32 << 20)).contains(&cs) {
            return Err("obj size needs to be power of 2 between 4K and 32M".into());
        }
        order = cs.trailing_zeros() as c_int;
    }
    Ok(Creation {
        loc: c.location.clone(),
        secret: secret_of(&c.location, graph)?,
        size: c.size,
        order,
    })
}

impl Creation {
    /// Creates the image, on a cluster thread (the job's thread may
    /// neither connect nor start threads).
    pub fn run(self) -> Result<(), String> {
        let Creation {
            loc,
            secret,
            size,
            order,
        } = self;
        on_cluster_thread(move || {
            let lib = ffi::lib()?;
            let conn = Conn::connect(&loc, secret.as_deref(), None)?;
            let name = cstr("image", &loc.image)?;
            let mut order = order;
            // SAFETY: a live ioctx, a NUL-terminated name, a local out-value.
            let r = unsafe { (lib.rbd_create)(conn.ioctx, name.as_ptr(), size, &mut order) };
            if r < 0 {
                return Err(format!("error rbd create: {}", errno_text(r)));
            }
            Ok(())
        })
    }
}

/// What one request's completion carries to the task that waits for it.
#[derive(Default)]
struct Shared {
    done: AtomicBool,
    ret: AtomicI64,
    waiter: Mutex<Option<(Waker, Option<Arc<EventFd>>)>>,
    cv: Condvar,
}

impl Shared {
    fn complete(&self, r: i64) {
        let w = {
            let mut g = self.waiter.lock().unwrap_or_else(|e| e.into_inner());
            self.ret.store(r, Ordering::Relaxed);
            self.done.store(true, Ordering::Release);
            self.cv.notify_all();
            g.take()
        };
        if let Some((waker, fd)) = w {
            waker.wake();
            // The submitting iothread sleeps in epoll on this eventfd.
            if let Some(fd) = fd {
                let _ = fd.write(1);
            }
        }
    }
}

/// librbd's completion callback, on one of its threads.
extern "C" fn aio_done(c: ffi::rbd_completion_t, arg: *mut c_void) {
    // SAFETY: `arg` is the reference `submit` leaked for this callback,
    // called once per completion.
    let shared = unsafe { Arc::from_raw(arg as *const Shared) };
    let r = match ffi::lib() {
        Ok(lib) => {
            // SAFETY: the completion this callback is for; released once,
            // after its value is read (QEMU does the same in its callback).
            unsafe {
                let r = (lib.rbd_aio_get_return_value)(c);
                (lib.rbd_aio_release)(c);
                r as i64
            }
        }
        // Cannot be: a completion exists only when the library loaded.
        Err(_) => -i64::from(libc::EIO),
    };
    shared.complete(r);
}

/// Waits for one request's completion; dropped early, it still waits
/// (the buffers must outlive librbd's use of them).
struct AioFuture {
    shared: Arc<Shared>,
}

impl Future for AioFuture {
    type Output = i64;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<i64> {
        let s = &self.shared;
        if s.done.load(Ordering::Acquire) {
            return Poll::Ready(s.ret.load(Ordering::Relaxed));
        }
        let mut g = s.waiter.lock().unwrap_or_else(|e| e.into_inner());
        if s.done.load(Ordering::Acquire) {
            return Poll::Ready(s.ret.load(Ordering::Relaxed));
        }
        *g = Some((cx.waker().clone(), crate::io::current_wake_fd()));
        Poll::Pending
    }
}

impl Drop for AioFuture {
    fn drop(&mut self) {
        let s = &self.shared;
        let mut g = s.waiter.lock().unwrap_or_else(|e| e.into_inner());
        while !s.done.load(Ordering::Acquire) {
            g = s.cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }
}

struct DiffReq {
    offset: u64,
    end: u64,
    bytes: u64,
    exists: bool,
}

/// What diff_cb returns to stop rbd_diff_iterate2 (QEMU's value).
const DIFF_STOP: c_int = -9000;

/// rbd_diff_iterate2's callback (QEMU's qemu_rbd_diff_iterate_cb), with
/// whole-object extents clipped to the range asked about.
extern "C" fn diff_cb(offs: u64, len: usize, exists: c_int, opaque: *mut c_void) -> c_int {
    // SAFETY: `opaque` is the DiffReq block_status passed, alive and not
    // otherwise borrowed during the call.
    let req = unsafe { &mut *(opaque as *mut DiffReq) };
    if exists == 0 {
        return 0;
    }
    let start = offs.max(req.offset);
    let end = offs.saturating_add(len as u64).min(req.end);
    if start >= end {
        return 0;
    }
    let cur = req.offset.saturating_add(req.bytes);
    if !req.exists && start > req.offset {
        // Started in a hole: it runs up to here.
        req.bytes = start - req.offset;
        return DIFF_STOP;
    }
    if req.exists && start > cur {
        // Data up to a hole.
        return DIFF_STOP;
    }
    req.exists = true;
    req.bytes = end - req.offset;
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_take_lists_as_json_or_keyval() {
        let keyval = serde_json::json!({
            "node-name": "r", "pool": "p", "image": "i",
            "server": {"1": {"host": "::1", "port": "3300"}, "0": {"host": "10.0.0.1", "port": "6789"}},
            "auth-client-required": {"0": "cephx", "1": "none"},
        });
        let o: RbdOptions = serde_json::from_value(keyval).unwrap();
        let s = o.server.unwrap();
        assert_eq!(s[0].host, "10.0.0.1");
        assert_eq!(s[1].host, "::1");
        assert_eq!(
            o.auth_client_required.unwrap(),
            [AuthMode::Cephx, AuthMode::None]
        );
        let json = serde_json::json!({
            "pool": "p", "image": "i", "server": [{"host": "h", "port": "1"}],
        });
        let o: RbdOptions = serde_json::from_value(json).unwrap();
        assert_eq!(o.server.unwrap().len(), 1);
        let bad = serde_json::json!({"pool": "p", "image": "i", "server": {"2": {"host": "h", "port": "1"}}});
        let e = serde_json::from_value::<RbdOptions>(bad)
            .unwrap_err()
            .to_string();
        assert!(e.contains("'2': expected a list index below 1"), "{e}");
        let e = check_location(&RbdLocation {
            pool: "p".into(),
            image: "i".into(),
            encrypt: Some(serde_json::json!({"format": "luks"})),
            ..RbdLocation::default()
        })
        .unwrap_err();
        assert!(e.contains("not supported"), "{e}");
    }

    fn status(offset: u64, len: u64, extents: &[(u64, usize)]) -> (bool, u64) {
        let mut req = DiffReq {
            offset,
            end: offset + len,
            bytes: 0,
            exists: false,
        };
        for &(o, l) in extents {
            if diff_cb(o, l, 1, (&mut req as *mut DiffReq).cast()) == DIFF_STOP {
                break;
            }
        }
        (req.exists, req.bytes)
    }

    #[test]
    fn diff_extents_become_one_status_from_the_start() {
        const M: u64 = 1 << 20;
        // Whole 4 MiB objects; the range starts inside the first one.
        assert_eq!(status(M, 10 * M, &[(0, 4 << 20)]), (true, 3 * M));
        // Two adjacent objects: data up to the end of the second.
        assert_eq!(
            status(M, 10 * M, &[(0, 4 << 20), (4 * M, 4 << 20)]),
            (true, 7 * M)
        );
        // Data, then a hole: data up to the hole.
        assert_eq!(
            status(0, 16 * M, &[(0, 4 << 20), (8 * M, 4 << 20)]),
            (true, 4 * M)
        );
        // A hole first: the hole runs up to the first object.
        assert_eq!(status(0, 16 * M, &[(8 * M, 4 << 20)]), (false, 8 * M));
        // Nothing allocated: the whole range is a hole (bytes 0).
        assert_eq!(status(0, 16 * M, &[]), (false, 0));
        // An object past the range end is clipped away.
        assert_eq!(status(0, 4 * M, &[(4 * M, 4 << 20)]), (false, 0));
    }
}
