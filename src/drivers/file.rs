//! The `file` protocol driver: regular files and block devices.
//!
//! ```text
//!   preadv/pwritev --(aligned?)--yes--> io_uring readv/writev on guest memory
//!                          \--no---> aligned bounce buffer, copy, readv/writev
//! ```
//!
//! With `cache.direct=on` the file is opened with O_DIRECT; the request and
//! memory alignment it needs are probed at open (as QEMU does) and buffers
//! that do not meet the memory alignment go through a bounce buffer. Request
//! offsets and lengths must meet the request alignment: the export checks
//! that its logical block size is a multiple of it.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use serde::Deserialize;

use super::DiscardMode;
use crate::block::{BlockError, GraphError, Node, Perm};
use crate::io::{self as aio, AlignedBuf, IoVecs, Op};
use crate::opts;

/// `cache.*` options.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct CacheOptions {
    /// O_DIRECT: bypass the host page cache.
    #[serde(default, deserialize_with = "opts::bool")]
    pub direct: bool,
    /// Ignore flush requests (unsafe; for benchmarks and scratch disks).
    #[serde(default, deserialize_with = "opts::bool")]
    pub no_flush: bool,
}

/// `locking`: OFD byte locks as QEMU's file driver takes them, so that
/// two processes (two daemons, a daemon and qemu-img) cannot both write an
/// image, or read one while another writes it without sharing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Locking {
    #[default]
    Auto,
    On,
    Off,
}

/// `aio`: `threads`, `native` (Linux AIO) or `io_uring` in QEMU. We have
/// one engine, io_uring, and accept the three.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Aio {
    #[default]
    Threads,
    Native,
    IoUring,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct FileOptions {
    #[serde(default)]
    pub node_name: String,
    pub filename: String,
    #[serde(default, deserialize_with = "opts::bool")]
    pub read_only: bool,
    #[serde(default)]
    pub cache: CacheOptions,
    #[serde(default)]
    pub discard: DiscardMode,
    #[serde(default)]
    pub locking: Locking,
    /// QEMU's I/O engine choice; every request goes through our io_uring
    /// engine whatever is given (accepted for drop-in compatibility).
    #[serde(default)]
    pub aio: Aio,
    /// Common options (QEMU's BlockdevOptions base): see [`super::CommonOptions`].
    #[serde(default, deserialize_with = "opts::bool")]
    pub auto_read_only: bool,
    #[serde(default)]
    pub detect_zeroes: super::DetectZeroes,
    #[serde(default, deserialize_with = "opts::bool")]
    pub force_share: bool,
    /// QEMU 10's `active`: off opens the node inactive (no write lock,
    /// no write); absent means on, or inactive under an inactive parent.
    #[serde(default, deserialize_with = "opts::opt_bool")]
    pub active: Option<bool>,
}

/// The driver's state. What blockdev-reopen may change is atomic: it is
/// changed inside a drained section, and read (relaxed) by every request.
pub struct FileDriver {
    /// Owns the descriptor in `fd`.
    file: Mutex<File>,
    fd: AtomicI32,
    filename: String,
    block_device: bool,
    direct: AtomicBool,
    no_flush: AtomicBool,
    discard_unmap: AtomicBool,
    size: AtomicU64,
    request_alignment: AtomicU32,
    mem_alignment: AtomicUsize,
    /// The descriptor was opened read-write.
    writable: AtomicBool,
    /// Opened as `host_device`.
    host_device: bool,
    /// force-share: takes no lock that keeps others from writing.
    force_share: bool,
    locking: bool,
    /// The permissions locked now: (taken, not shared).
    locks: Mutex<(Perm, Perm)>,
}

/// QEMU's lock bytes: 100 + bit while a permission is taken, 200 + bit
/// while it is not shared (block/file-posix.c).
const LOCK_PERM_BASE: i64 = 100;
const LOCK_SHARED_BASE: i64 = 200;
const PERM_BITS: [(Perm, i64, &str); 4] = [
    (Perm::CONSISTENT_READ, 0, "consistent read"),
    (Perm::WRITE, 1, "write"),
    (Perm::WRITE_UNCHANGED, 2, "write unchanged"),
    (Perm::RESIZE, 3, "resize"),
];

fn flock(ty: i32, byte: i64) -> libc::flock {
    // SAFETY: flock is plain data; zeroed is valid (l_pid must be 0 for OFD).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = ty as i16;
    fl.l_whence = libc::SEEK_SET as i16;
    fl.l_start = byte;
    fl.l_len = 1;
    fl
}

/// Sets (F_RDLCK) or drops (F_UNLCK) an OFD lock on one byte.
fn ofd_set(fd: RawFd, byte: i64, ty: i32) -> io::Result<()> {
    let fl = flock(ty, byte);
    // SAFETY: F_OFD_SETLK reads the flock struct we pass, a live local.
    if unsafe { libc::fcntl(fd, libc::F_OFD_SETLK, &fl) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether another open file (process) holds a lock on `byte`.
fn ofd_taken(fd: RawFd, byte: i64) -> io::Result<bool> {
    let mut fl = flock(libc::F_WRLCK, byte);
    // SAFETY: F_OFD_GETLK reads and writes the flock struct, a live local.
    if unsafe { libc::fcntl(fd, libc::F_OFD_GETLK, &mut fl) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(i32::from(fl.l_type) != libc::F_UNLCK)
}

/// Sets QEMU's lock bytes on `fd`: a read lock on 100 + bit for each
/// permission taken, on 200 + bit for each one not shared; the others are
/// dropped.
fn apply_lock_bytes(fd: RawFd, perm: Perm, unshared: Perm) -> io::Result<()> {
    for (bit, i, _) in PERM_BITS {
        let ty = |on: bool| if on { libc::F_RDLCK } else { libc::F_UNLCK };
        ofd_set(fd, LOCK_PERM_BASE + i, ty(perm.contains(bit)))?;
        ofd_set(fd, LOCK_SHARED_BASE + i, ty(unshared.contains(bit)))?;
    }
    Ok(())
}

/// Checks that no other open file holds a lock that conflicts with taking
/// `perm` and not sharing `unshared` (QEMU's raw_check_lock_bytes, with
/// its wording).
fn check_locks(fd: RawFd, perm: Perm, unshared: Perm, filename: &str) -> Result<(), String> {
    let err = |e: io::Error| format!("cannot lock '{filename}': {e}");
    for (bit, i, name) in PERM_BITS {
        if perm.contains(bit) && ofd_taken(fd, LOCK_SHARED_BASE + i).map_err(err)? {
            return Err(format!(
                "Failed to get \"{name}\" lock: is another process using the image '{filename}'?"
            ));
        }
        if unshared.contains(bit) && ofd_taken(fd, LOCK_PERM_BASE + i).map_err(err)? {
            return Err(format!(
                "Failed to get shared \"{name}\" lock: is another process using the image '{filename}'?"
            ));
        }
    }
    Ok(())
}

/// Which open node of this daemon, if any, has the file `(dev, ino)` open
/// (its name). Creation outside the daemon (the `create` command) passes
/// [`no_node`].
pub type InUse<'a> = &'a dyn Fn(u64, u64) -> Option<String>;

/// For creation outside the daemon: no node has anything open.
pub fn no_node(_dev: u64, _ino: u64) -> Option<String> {
    None
}

/// The name of a file node of `graph` (other than `except`) that has the
/// file `(dev, ino)` open.
pub fn node_using(
    graph: &crate::block::Graph,
    dev: u64,
    ino: u64,
    except: Option<&Node>,
) -> Option<String> {
    graph
        .nodes()
        .filter(|n| !except.is_some_and(|e| std::ptr::eq(&***n, e)))
        .find(|n| super::driver_as::<FileDriver>(n).is_some_and(|f| f.is_file(dev, ino)))
        .map(|n| n.name().to_string())
}

/// A file opened for (re)creation that holds QEMU's creation locks: the
/// only way this daemon truncates, overwrites or removes an image file it
/// does not have open as a node. Nothing is changed by opening; the
/// caller truncates and writes through [`NewFile::file`]. The locks go when
/// it is dropped or [`NewFile::close`]d.
pub struct NewFile {
    file: File,
    path: String,
    created: bool,
    dev: u64,
    ino: u64,
}

/// A permission error on `path` that the sandbox caused says so.
pub fn sandbox_hint(e: io::Error, path: &str) -> io::Error {
    if e.raw_os_error() != Some(libc::EACCES) {
        return e;
    }
    match crate::sandbox::denial_hint(std::path::Path::new(path)) {
        Some(hint) => io::Error::new(e.kind(), format!("{}: {hint}", crate::block::os_text(&e))),
        None => e,
    }
}

impl NewFile {
    /// Opens (creating it if missing, never truncating) `path`, takes the
    /// lock bytes of write and resize and checks that no other process
    /// holds a conflicting one, and that no node of this daemon (as
    /// `in_use` tells) has the file open.
    pub fn open(path: &str, in_use: InUse) -> Result<NewFile, String> {
        let cerr = |e: io::Error| {
            let e = sandbox_hint(e, path);
            format!("Could not create '{path}': {}", crate::block::os_text(&e))
        };
        let open = |create: bool| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(create)
                .custom_flags(libc::O_CLOEXEC)
                .open(path)
        };
        let (file, created) = match open(true) {
            Ok(f) => (f, true),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                (open(false).map_err(cerr)?, false)
            }
            Err(e) => return Err(cerr(e)),
        };
        let meta = file.metadata().map_err(cerr)?;
        let new = NewFile {
            file,
            path: path.to_string(),
            created,
            dev: meta.dev(),
            ino: meta.ino(),
        };
        if let Err(e) = new.lock(in_use) {
            // A file this call made is nobody else's yet: it goes again.
            if created {
                let _ = std::fs::remove_file(path);
            }
            return Err(e);
        }
        Ok(new)
    }

    /// Takes the creation locks, then checks for other holders (in this
    /// order, as QEMU, so that two creators cannot both pass the check).
    fn lock(&self, in_use: InUse) -> Result<(), String> {
        // As QEMU's raw_co_create: write (to discard everything) and
        // resize (to set the size), sharing all but resize (no one may
        // change the size it promises).
        let (perm, unshared) = (Perm::WRITE | Perm::RESIZE, Perm::RESIZE);
        let fd = self.file.as_raw_fd();
        apply_lock_bytes(fd, perm, unshared)
            .map_err(|e| format!("cannot lock '{}': {e}", self.path))?;
        // Our own nodes first: their locks (if they take any) conflict
        // too, but the message can name the node.
        if let Some(node) = in_use(self.dev, self.ino) {
            return Err(format!(
                "Failed to get \"write\" lock: '{}' is in use by node '{node}'",
                self.path
            ));
        }
        check_locks(fd, perm, unshared, &self.path)
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// Whether the file did not exist before this open.
    pub fn created(&self) -> bool {
        self.created
    }

    /// Closes the file (dropping its locks, so that a node can open it),
    /// keeping what [`Created::remove`] needs to undo the creation.
    pub fn close(self) -> Created {
        Created {
            path: self.path,
            created: self.created,
            dev: self.dev,
            ino: self.ino,
        }
    }
}

/// A file made by [`NewFile`], closed again.
#[derive(Debug, Clone)]
pub struct Created {
    path: String,
    created: bool,
    dev: u64,
    ino: u64,
}

impl Created {
    /// Whether the file did not exist before it was created.
    pub fn created(&self) -> bool {
        self.created
    }

    /// Undoes the creation: unlinks the file if this daemon created it (it
    /// did not exist before), the name still leads to it, no other process
    /// locks it and no node of this daemon has it open. A file that
    /// existed before is never removed.
    pub fn remove(&self, in_use: InUse) {
        if !self.created {
            return;
        }
        let Ok(again) = NewFile::open_existing(&self.path) else {
            return;
        };
        if (again.dev, again.ino) != (self.dev, self.ino) {
            log::warn!("'{}' is another file now; it is not removed", self.path);
            return;
        }
        if let Err(e) = again.lock(in_use) {
            log::warn!("'{}' is not removed: {e}", self.path);
            return;
        }
        if let Err(e) = std::fs::remove_file(&self.path) {
            log::warn!("cannot remove '{}': {e}", self.path);
        }
    }
}

impl NewFile {
    fn open_existing(path: &str) -> io::Result<NewFile> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)?;
        let meta = file.metadata()?;
        Ok(NewFile {
            file,
            path: path.to_string(),
            created: false,
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }
}

/// A reopen prepared (new descriptor opened, alignment probed), not yet
/// applied.
pub struct FileReopen {
    file: File,
    writable: bool,
    direct: bool,
    no_flush: bool,
    discard_unmap: bool,
    request_alignment: u32,
    mem_alignment: usize,
}

impl FileReopen {
    /// Whether the new descriptor is open for writing.
    pub fn writable(&self) -> bool {
        self.writable
    }

    pub fn request_alignment(&self) -> u32 {
        self.request_alignment
    }
}

// Linux ioctls for block devices.
// The sandbox allows these ioctls and no other.
const BLKSSZGET: libc::c_ulong = crate::sandbox::syscalls::BLKSSZGET as libc::c_ulong;
const BLKGETSIZE64: libc::c_ulong = crate::sandbox::syscalls::BLKGETSIZE64 as libc::c_ulong;

/// Largest bounce or zero buffer we allocate at once.
const MAX_BOUNCE_CHUNK: u64 = 1 << 20;

impl FileDriver {
    /// Opens the file as `o` says: the descriptor, its size and the
    /// alignment O_DIRECT needs.
    fn open_file(
        o: &FileOptions,
        host_device: bool,
    ) -> Result<(File, bool, u64, u32, usize, bool), GraphError> {
        let open_err = |source: io::Error| GraphError::OpenFile {
            node: o.node_name.clone(),
            filename: o.filename.clone(),
            error: sandbox_hint(source, &o.filename),
        };
        if o.aio == Aio::Native && !o.cache.direct {
            return Err(GraphError::Open {
                node: o.node_name.clone(),
                reason: "aio=native was specified, but it requires cache.direct=on, which was not specified.".into(),
            });
        }
        let mut flags = libc::O_CLOEXEC;
        if o.cache.direct {
            flags |= libc::O_DIRECT;
        }
        let open = |write: bool| {
            OpenOptions::new()
                .read(true)
                .write(write)
                .custom_flags(flags)
                .open(&o.filename)
        };
        let mut writable = !o.read_only;
        let file = match open(writable) {
            // auto-read-only: an image we may not write is opened read-only
            // (QEMU's file-posix falls back the same way).
            Err(e)
                if writable
                    && o.auto_read_only
                    && matches!(
                        e.raw_os_error(),
                        Some(libc::EACCES | libc::EROFS | libc::EPERM)
                    ) =>
            {
                log::info!(
                    "node {}: '{}' cannot be written ({e}); auto-read-only opens it read-only",
                    o.node_name,
                    o.filename
                );
                writable = false;
                open(false)
            }
            r => r,
        }
        .map_err(open_err)?;
        let meta = file.metadata().map_err(open_err)?;
        let block_device = meta.file_type().is_block_device();
        if host_device && !block_device && !meta.file_type().is_char_device() {
            return Err(GraphError::Open {
                node: o.node_name.clone(),
                reason: format!(
                    "'host_device' driver requires '{}' to be either a character or block device",
                    o.filename
                ),
            });
        }
        if !block_device && !meta.is_file() {
            return Err(GraphError::Open {
                node: o.node_name.clone(),
                reason: format!(
                    "'{}' is neither a regular file nor a block device",
                    o.filename
                ),
            });
        }
        let size = if block_device {
            let mut size: u64 = 0;
            // SAFETY: BLKGETSIZE64 writes one u64 to the pointer we pass,
            // which points at a live local.
            let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size) };
            if r < 0 {
                return Err(open_err(io::Error::last_os_error()));
            }
            size
        } else {
            meta.len()
        };
        let (request_alignment, mem_alignment) = if o.cache.direct {
            probe_alignment(&file, block_device)
        } else {
            (1, 1)
        };
        log::debug!(
            "file {}: size {size}, direct {}, request alignment {request_alignment}, memory alignment {mem_alignment}",
            o.filename,
            o.cache.direct
        );
        Ok((
            file,
            block_device,
            size,
            request_alignment,
            mem_alignment,
            writable,
        ))
    }

    pub fn open(o: &FileOptions) -> Result<Self, GraphError> {
        Self::open_as(o, false)
    }

    /// Whether the descriptor is open for writing (auto-read-only may have
    /// fallen back).
    pub fn is_writable(&self) -> bool {
        self.writable.load(Ordering::Relaxed)
    }

    /// The driver name the node was opened with.
    pub fn driver_name(&self) -> &'static str {
        if self.host_device {
            "host_device"
        } else {
            "file"
        }
    }

    /// Opens a `host_device` node: the `file` driver on a device.
    pub fn open_host_device(o: &FileOptions) -> Result<Self, GraphError> {
        Self::open_as(o, true)
    }

    fn open_as(o: &FileOptions, host_device: bool) -> Result<Self, GraphError> {
        let (file, block_device, size, request_alignment, mem_alignment, writable) =
            Self::open_file(o, host_device)?;
        Ok(FileDriver {
            host_device,
            force_share: o.force_share,
            fd: AtomicI32::new(file.as_raw_fd()),
            file: Mutex::new(file),
            filename: o.filename.clone(),
            block_device,
            direct: AtomicBool::new(o.cache.direct),
            no_flush: AtomicBool::new(o.cache.no_flush),
            discard_unmap: AtomicBool::new(o.discard == DiscardMode::Unmap),
            size: AtomicU64::new(size),
            request_alignment: AtomicU32::new(request_alignment),
            mem_alignment: AtomicUsize::new(mem_alignment),
            writable: AtomicBool::new(writable),
            locking: o.locking != Locking::Off,
            locks: Mutex::new((Perm::NONE, Perm::NONE)),
        })
    }

    /// Locks the image for what the node's parents take and do not share,
    /// after checking no other process holds a conflicting lock.
    pub fn update_locks(&self, perm: Perm, shared: Perm) -> Result<(), String> {
        if !self.locking {
            return Ok(());
        }
        let fd = self.fd();
        // force-share (read-only nodes only): share everything, whatever
        // the parents ask, and ignore what others do not share.
        let unshared = if self.force_share {
            Perm::NONE
        } else {
            !shared
        };
        if self.force_share {
            self.apply_locks(fd, perm, unshared)
                .map_err(|e| format!("cannot lock '{}': {e}", self.filename))?;
            *self.locks.lock().unwrap_or_else(|e| e.into_inner()) = (perm, unshared);
            return Ok(());
        }
        let err = |e: io::Error| format!("cannot lock '{}': {e}", self.filename);
        check_locks(fd, perm, unshared, &self.filename)?;
        self.apply_locks(fd, perm, unshared).map_err(err)?;
        *self.locks.lock().unwrap_or_else(|e| e.into_inner()) = (perm, unshared);
        Ok(())
    }

    /// Activation (QEMU's raw_co_invalidate_cache): the page cache of the
    /// file is dropped, so that reads do not return what it held before
    /// another host wrote the image (shared storage), and the size is read
    /// again (another process may have resized the file).
    pub fn activate(&self) -> Result<(), String> {
        let file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        if !self.direct.load(Ordering::Relaxed) {
            // As QEMU: flush what is dirty first (nothing, normally: an
            // inactive node writes nothing), then drop; failures cost
            // only the cache's freshness and are logged.
            if let Err(e) = file.sync_data() {
                log::warn!(
                    "file {}: fdatasync before dropping the page cache: {e}",
                    self.filename
                );
            }
            // SAFETY: posix_fadvise only reads its integer arguments; the
            // descriptor is owned by `file`, held open by the guard.
            let r =
                unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
            if r != 0 {
                log::warn!(
                    "file {}: cannot drop the page cache: {}",
                    self.filename,
                    io::Error::from_raw_os_error(r)
                );
            }
        }
        let size = if self.block_device {
            let mut size: u64 = 0;
            // SAFETY: BLKGETSIZE64 writes one u64 to the pointer we pass,
            // which points at a live local.
            let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size) };
            if r < 0 {
                return Err(format!(
                    "cannot get the size of '{}': {}",
                    self.filename,
                    io::Error::last_os_error()
                ));
            }
            size
        } else {
            file.metadata()
                .map_err(|e| format!("cannot get the size of '{}': {e}", self.filename))?
                .len()
        };
        self.size.store(size, Ordering::Relaxed);
        Ok(())
    }

    fn apply_locks(&self, fd: RawFd, perm: Perm, unshared: Perm) -> io::Result<()> {
        apply_lock_bytes(fd, perm, unshared)
    }

    /// Whether this node's descriptor is the file `(dev, ino)`.
    pub fn is_file(&self, dev: u64, ino: u64) -> bool {
        self.file
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .metadata()
            .is_ok_and(|m| (m.dev(), m.ino()) == (dev, ino))
    }

    /// Opens the file again with the options of a blockdev-reopen.
    pub fn prepare_reopen(&self, o: &FileOptions) -> Result<FileReopen, String> {
        if o.filename != self.filename {
            return Err(format!(
                "node '{}': 'filename' cannot be changed by reopen ({} -> {})",
                o.node_name, self.filename, o.filename
            ));
        }
        let host_device = self.host_device;
        let (file, _, _, request_alignment, mem_alignment, writable) =
            Self::open_file(o, host_device).map_err(|e| {
                let mut s = e.to_string();
                if let Some(src) = std::error::Error::source(&e) {
                    s.push_str(&format!(": {src}"));
                }
                s
            })?;
        Ok(FileReopen {
            file,
            writable,
            direct: o.cache.direct,
            no_flush: o.cache.no_flush,
            discard_unmap: o.discard == DiscardMode::Unmap,
            request_alignment,
            mem_alignment,
        })
    }

    /// Applies a prepared reopen. Called with no request in flight (in a
    /// drained section); the old descriptor is closed here.
    pub fn commit_reopen(&self, r: FileReopen) {
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        self.fd.store(r.file.as_raw_fd(), Ordering::Release);
        self.direct.store(r.direct, Ordering::Relaxed);
        self.no_flush.store(r.no_flush, Ordering::Relaxed);
        self.discard_unmap.store(r.discard_unmap, Ordering::Relaxed);
        self.request_alignment
            .store(r.request_alignment, Ordering::Relaxed);
        self.mem_alignment.store(r.mem_alignment, Ordering::Relaxed);
        self.writable.store(r.writable, Ordering::Relaxed);
        // The old descriptor's locks go with it; the new one takes them.
        *file = r.file;
        if self.locking {
            let (perm, unshared) = *self.locks.lock().unwrap_or_else(|e| e.into_inner());
            if let Err(e) = self.apply_locks(file.as_raw_fd(), perm, unshared) {
                log::error!(
                    "file {}: cannot lock the reopened image: {e}",
                    self.filename
                );
            }
        }
    }

    /// Opens the file again read-write, with the same cache options, and
    /// makes `node` (this driver's node) writable: a backing image opened
    /// read-only becomes the target of block-commit. Called with no
    /// request in flight (in a drained section). The locks held now move
    /// to the new descriptor; taking write permission is the parents'
    /// business ([`crate::block::Child::set_perm`]).
    pub fn reopen_read_write(&self, node: &Node) -> Result<(), String> {
        self.reopen_access(node, true)
    }

    /// The reverse of [`FileDriver::reopen_read_write`]: a read-only
    /// descriptor again, and `node` read-only. The caller has dropped
    /// every parent's write permission.
    pub fn reopen_read_only(&self, node: &Node) -> Result<(), String> {
        self.reopen_access(node, false)
    }

    fn reopen_access(&self, node: &Node, write: bool) -> Result<(), String> {
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        if self.writable.load(Ordering::Relaxed) != write {
            let mut flags = libc::O_CLOEXEC;
            if self.is_direct() {
                flags |= libc::O_DIRECT;
            }
            let mode = if write { "read-write" } else { "read-only" };
            let err = |e: io::Error| {
                format!(
                    "node '{}': cannot reopen '{}' {mode}: {e}",
                    node.name(),
                    self.filename
                )
            };
            let new = OpenOptions::new()
                .read(true)
                .write(write)
                .custom_flags(flags)
                .open(&self.filename)
                .map_err(err)?;
            // The name may point at another file by now (renamed, replaced).
            let (old_meta, new_meta) =
                (file.metadata().map_err(err)?, new.metadata().map_err(err)?);
            if (old_meta.dev(), old_meta.ino()) != (new_meta.dev(), new_meta.ino()) {
                return Err(format!(
                    "node '{}': '{}' is not the file that was opened any more; it cannot be reopened {mode}",
                    node.name(),
                    self.filename
                ));
            }
            // The new descriptor takes the locks before the old one drops
            // them (closing it), so that no other process can slip in
            // between. Both are read locks of this process: no conflict.
            if self.locking {
                let (perm, unshared) = *self.locks.lock().unwrap_or_else(|e| e.into_inner());
                // On failure `new` is closed, and its locks with it.
                self.apply_locks(new.as_raw_fd(), perm, unshared)
                    .map_err(err)?;
            }
            self.fd.store(new.as_raw_fd(), Ordering::Release);
            *file = new;
            self.writable.store(write, Ordering::Relaxed);
        }
        node.set_read_only(!write);
        Ok(())
    }

    /// The image locks held now, as (permissions taken, permissions not
    /// shared); `None` with `locking=off`.
    pub fn held_locks(&self) -> Option<(Perm, Perm)> {
        self.locking
            .then(|| *self.locks.lock().unwrap_or_else(|e| e.into_inner()))
    }

    pub fn filename(&self) -> &str {
        &self.filename
    }

    pub fn is_direct(&self) -> bool {
        self.direct.load(Ordering::Relaxed)
    }

    pub fn is_no_flush(&self) -> bool {
        self.no_flush.load(Ordering::Relaxed)
    }

    fn discards(&self) -> bool {
        self.discard_unmap.load(Ordering::Relaxed)
    }

    fn mem_alignment(&self) -> usize {
        self.mem_alignment.load(Ordering::Relaxed)
    }

    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Relaxed)
    }

    pub fn request_alignment(&self) -> u32 {
        self.request_alignment.load(Ordering::Relaxed)
    }

    fn fd(&self) -> RawFd {
        self.fd.load(Ordering::Acquire)
    }

    fn io_err(
        node: &Node,
        op: &'static str,
        offset: u64,
        len: u64,
        source: io::Error,
    ) -> BlockError {
        BlockError::Io {
            node: node.name().to_string(),
            op,
            offset,
            len,
            source,
        }
    }

    pub async fn preadv(&self, node: &Node, offset: u64, iov: &IoVecs) -> Result<(), BlockError> {
        let len = iov.len();
        if self.is_direct() && !iov.is_aligned(self.mem_alignment()) {
            let (bounce, view) = IoVecs::bounce(len as usize, self.mem_alignment());
            self.read_full(node, offset, &bounce).await?;
            view.with_bytes(&bounce, |b| iov.copy_from(b));
            return Ok(());
        }
        self.read_full(node, offset, iov).await
    }

    /// Reads all of `iov`, continuing after short reads; past the end of the
    /// file the rest reads as zeroes.
    async fn read_full(&self, node: &Node, offset: u64, iov: &IoVecs) -> Result<(), BlockError> {
        self.transfer_full(node, offset, iov, None).await
    }

    /// Reads (`write` None) or writes all of `iov`, continuing after short
    /// transfers. A read that hits the end of the file zero-fills the rest
    /// (the file shrank under us, as QEMU does); a write that makes no
    /// progress fails with ENOSPC.
    async fn transfer_full(
        &self,
        node: &Node,
        offset: u64,
        iov: &IoVecs,
        write: Option<bool>,
    ) -> Result<(), BlockError> {
        let io = aio::current();
        let op_name = if write.is_some() { "write" } else { "read" };
        let len = iov.len();
        let mut done = 0u64;
        while done < len {
            let part = if done == 0 {
                iov.clone()
            } else {
                iov.tail(done)
            };
            let op = match write {
                None => Op::Readv {
                    fd: self.fd(),
                    iov: part.clone(),
                    offset: offset + done,
                },
                Some(dsync) => Op::Writev {
                    fd: self.fd(),
                    iov: part.clone(),
                    offset: offset + done,
                    dsync,
                },
            };
            let n = io
                .run(op)
                .await
                .map_err(|e| Self::io_err(node, op_name, offset, len, e))?;
            if n == 0 {
                if write.is_some() {
                    let e = io::Error::from_raw_os_error(libc::ENOSPC);
                    return Err(Self::io_err(node, op_name, offset, len, e));
                }
                part.fill_zero();
                break;
            }
            done += n;
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
        if self.is_direct() && !iov.is_aligned(self.mem_alignment()) {
            let (bounce, view) = IoVecs::bounce(len as usize, self.mem_alignment());
            view.with_bytes(&bounce, |b| iov.copy_to(b));
            return self.write_full(node, offset, &bounce, fua).await;
        }
        self.write_full(node, offset, iov, fua).await
    }

    async fn write_full(
        &self,
        node: &Node,
        offset: u64,
        iov: &IoVecs,
        fua: bool,
    ) -> Result<(), BlockError> {
        self.transfer_full(node, offset, iov, Some(fua)).await
    }

    pub async fn flush(&self, node: &Node) -> Result<(), BlockError> {
        if self.is_no_flush() {
            return Ok(());
        }
        aio::current()
            .run(Op::Fdatasync { fd: self.fd() })
            .await
            .map(|_| ())
            .map_err(|e| Self::io_err(node, "flush", 0, 0, e))
    }

    pub async fn pdiscard(&self, node: &Node, offset: u64, len: u64) -> Result<(), BlockError> {
        if !self.discards() || len == 0 {
            return Ok(());
        }
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        match self.fallocate(mode, offset, len).await {
            Ok(()) => Ok(()),
            // Discard is advisory: storage that cannot deallocate keeps the data.
            Err(e) if is_unsupported(&e) => Ok(()),
            Err(e) => Err(Self::io_err(node, "discard", offset, len, e)),
        }
    }

    pub async fn pwrite_zeroes(
        &self,
        node: &Node,
        offset: u64,
        len: u64,
        may_unmap: bool,
        fua: bool,
    ) -> Result<(), BlockError> {
        if len == 0 {
            return Ok(());
        }
        let err = |e| Self::io_err(node, "write-zeroes", offset, len, e);
        let mut done = false;
        if may_unmap && self.discards() {
            // Punching a hole reads back as zeroes on files and, through
            // REQ_OP_WRITE_ZEROES, on block devices.
            let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
            match self.fallocate(mode, offset, len).await {
                Ok(()) => done = true,
                Err(e) if is_unsupported(&e) => {}
                Err(e) => return Err(err(e)),
            }
        }
        if !done {
            let mode = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
            match self.fallocate(mode, offset, len).await {
                Ok(()) => done = true,
                Err(e) if is_unsupported(&e) => {}
                Err(e) => return Err(err(e)),
            }
        }
        if !done {
            self.write_zero_buffers(node, offset, len).await?;
        }
        if fua {
            self.flush(node).await?;
        }
        Ok(())
    }

    async fn write_zero_buffers(
        &self,
        node: &Node,
        offset: u64,
        len: u64,
    ) -> Result<(), BlockError> {
        let align = self.mem_alignment().max(512);
        let chunk = len.min(MAX_BOUNCE_CHUNK);
        let (zeroes, _view) = IoVecs::bounce(chunk as usize, align);
        let mut pos = 0;
        while pos < len {
            let n = (len - pos).min(chunk);
            let part = if n == chunk {
                zeroes.clone()
            } else {
                zeroes.head(n)
            };
            self.write_full(node, offset + pos, &part, false).await?;
            pos += n;
        }
        Ok(())
    }

    async fn fallocate(&self, mode: i32, offset: u64, len: u64) -> io::Result<()> {
        aio::current()
            .run(Op::Fallocate {
                fd: self.fd(),
                mode,
                offset,
                len,
            })
            .await
            .map(|_| ())
    }

    /// Allocates (and reads as zeroes) `[offset, offset + len)`, growing
    /// the file: later writes there are not size-extending writes, which
    /// ext4 serialises. A no-op where fallocate is unsupported.
    pub async fn preallocate(&self, node: &Node, offset: u64, len: u64) -> Result<(), BlockError> {
        if self.block_device {
            return Ok(());
        }
        match self.fallocate(0, offset, len).await {
            Ok(()) => Ok(()),
            Err(e) if is_unsupported(&e) => Ok(()),
            Err(e) => Err(Self::io_err(node, "preallocate", offset, len, e)),
        }
    }

    pub fn is_block_device(&self) -> bool {
        self.block_device
    }

    /// Re-reads the file's size after something other than this node
    /// wrote it (blockdev-create formatting the node's file).
    pub fn refresh_size(&self) -> io::Result<u64> {
        let len = self
            .file
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .metadata()?
            .len();
        if !self.block_device {
            self.size.store(len, Ordering::Relaxed);
        }
        Ok(self.size())
    }

    /// Grows or shrinks a regular file (block_resize).
    pub fn truncate(&self, node: &Node, size: u64) -> Result<(), BlockError> {
        if self.block_device {
            return Err(Self::io_err(
                node,
                "resize",
                size,
                0,
                io::Error::other("a block device cannot be resized from here"),
            ));
        }
        self.file
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .set_len(size)
            .map_err(|e| Self::io_err(node, "resize", size, 0, e))?;
        self.size.store(size, Ordering::Relaxed);
        Ok(())
    }
}

fn is_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOTTY) | Some(libc::ENOSYS) | Some(libc::EINVAL)
    )
}

/// Finds the request and memory alignment O_DIRECT needs on `file`, the way
/// QEMU's raw_probe_alignment does: the smallest read size, then buffer
/// offset, that the kernel accepts. Falls back to 4096 for both.
fn probe_alignment(file: &File, block_device: bool) -> (u32, usize) {
    const MAX_ALIGN: usize = 4096;
    let fd = file.as_raw_fd();
    let mut buf = AlignedBuf::new(2 * MAX_ALIGN, MAX_ALIGN);
    let base = buf.as_mut_slice().as_mut_ptr();
    let aligned_read = |ptr: *mut u8, len: usize| {
        // SAFETY: `ptr..ptr + len` lies within `buf` (callers pass offsets and
        // lengths of at most MAX_ALIGN into a 2 * MAX_ALIGN buffer).
        let r = unsafe { libc::pread(fd, ptr.cast(), len, 0) };
        r >= 0 || io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL)
    };
    let mut request = 0u32;
    if block_device {
        let mut sector: libc::c_int = 0;
        // SAFETY: BLKSSZGET writes one int to the pointer, a live local.
        if unsafe { libc::ioctl(fd, BLKSSZGET, &mut sector) } == 0 && sector > 0 {
            request = sector as u32;
        }
    }
    if request == 0 {
        let mut align = 512;
        while align <= MAX_ALIGN {
            if aligned_read(base, align) {
                request = align as u32;
                break;
            }
            align *= 2;
        }
    }
    if request == 0 {
        request = MAX_ALIGN as u32;
    }
    let mut mem = 0usize;
    let mut align = 512;
    while align <= MAX_ALIGN {
        // SAFETY: align <= MAX_ALIGN, so base + align stays inside `buf` and
        // leaves MAX_ALIGN bytes after it.
        let p = unsafe { base.add(align) };
        if aligned_read(p, MAX_ALIGN) {
            mem = align;
            break;
        }
        align *= 2;
    }
    if mem == 0 {
        mem = MAX_ALIGN;
    }
    (request, mem)
}
