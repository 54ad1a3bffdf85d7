//! Guest memory a frontend can shrink under us.
//!
//! Guest memory is the frontend's file (a memfd, hugetlbfs or tmpfs file)
//! mapped shared. A hostile or broken frontend can map a region larger than
//! its file, or truncate the file after we mapped it: our next load or store
//! in the missing part raises SIGBUS, which would kill the daemon and every
//! export in it (qemu-storage-daemon dies that way).
//!
//! Two defences:
//! - at map time, [`Mapped::add`] refuses a region that reaches past the end
//!   of its (regular) file: the memory update fails and the connection ends;
//! - at access time, a process-wide SIGBUS handler looks the faulting address
//!   up in a lock-free registry of the guest-memory ranges mapped now. Inside
//!   one, it maps an anonymous zero page over the faulting page (the access
//!   then completes, reading zeroes or writing into a page nobody sees),
//!   marks the region's connection poisoned and returns; the iothread then
//!   fails that connection's requests and ends the connection. Any other
//!   SIGBUS goes to the previous handler, or kills the process as before.
//!
//! The kernel's own accesses (io_uring, preadv into guest buffers) fail with
//! EFAULT instead and never get here.
//!
//! A registry slot lives exactly as long as its mapping: the connection
//! holds a reference to every region it registered and releases a slot only
//! once it holds the last one (no request or ring can reach the region any
//! more), before the region is unmapped.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Once, OnceLock};

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::virtio_blk::GuestMem;

/// The mapped guest-memory regions of all connections at one time. A memory
/// update that would need more is refused (a frontend may use up to 509 per
/// connection).
const SLOTS: usize = 4096;

/// hugetlbfs's f_type (linux/magic.h).
const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;

type Region = vm_memory::GuestRegionMmap<()>;

/// One registered range. Written by the control threads under a sequence
/// number (odd while being written), read by the signal handler.
struct Slot {
    claimed: AtomicBool,
    seq: AtomicU64,
    start: AtomicUsize,
    len: AtomicUsize,
    page: AtomicUsize,
    /// The owning connection's poison flag; outlives the registration.
    flag: AtomicPtr<AtomicBool>,
}

impl Slot {
    const fn new() -> Slot {
        Slot {
            claimed: AtomicBool::new(false),
            seq: AtomicU64::new(0),
            start: AtomicUsize::new(0),
            len: AtomicUsize::new(0),
            page: AtomicUsize::new(0),
            flag: AtomicPtr::new(std::ptr::null_mut()),
        }
    }
}

static REGISTRY: [Slot; SLOTS] = [const { Slot::new() }; SLOTS];

/// Guest-memory SIGBUSes survived since start (for tests and logs).
static RECOVERED: AtomicU64 = AtomicU64::new(0);

/// The SIGBUS disposition before ours, to pass foreign faults on to.
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();

fn register(start: usize, len: usize, page: usize, flag: &Arc<AtomicBool>) -> Option<usize> {
    for (i, s) in REGISTRY.iter().enumerate() {
        if s.claimed
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
        {
            continue;
        }
        s.seq.fetch_add(1, Ordering::SeqCst);
        s.start.store(start, Ordering::SeqCst);
        s.page.store(page, Ordering::SeqCst);
        s.flag.store(Arc::as_ptr(flag).cast_mut(), Ordering::SeqCst);
        s.len.store(len, Ordering::SeqCst);
        s.seq.fetch_add(1, Ordering::SeqCst);
        return Some(i);
    }
    None
}

fn unregister(i: usize) {
    let Some(s) = REGISTRY.get(i) else {
        return;
    };
    s.seq.fetch_add(1, Ordering::SeqCst);
    s.len.store(0, Ordering::SeqCst);
    s.flag.store(std::ptr::null_mut(), Ordering::SeqCst);
    s.seq.fetch_add(1, Ordering::SeqCst);
    s.claimed.store(false, Ordering::Release);
}

/// The registered range holding `addr`: (start, len, page, flag).
/// Async-signal-safe: atomic loads only.
fn lookup(addr: usize) -> Option<(usize, usize, usize, *mut AtomicBool)> {
    for s in REGISTRY.iter() {
        let before = s.seq.load(Ordering::SeqCst);
        if before % 2 == 1 {
            continue;
        }
        let len = s.len.load(Ordering::SeqCst);
        let start = s.start.load(Ordering::SeqCst);
        let page = s.page.load(Ordering::SeqCst);
        let flag = s.flag.load(Ordering::SeqCst);
        if s.seq.load(Ordering::SeqCst) != before || len == 0 || flag.is_null() {
            continue;
        }
        if addr >= start && addr - start < len {
            return Some((start, len, page, flag));
        }
    }
    None
}

/// How many guest-memory SIGBUSes were survived.
pub fn recovered() -> u64 {
    RECOVERED.load(Ordering::Relaxed)
}

extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel hands an SA_SIGINFO handler a valid siginfo; for
    // SIGBUS, si_addr is the faulting address.
    let (code, addr) = unsafe { ((*info).si_code, (*info).si_addr() as usize) };
    if code == libc::BUS_ADRERR {
        if let Some((start, len, page, flag)) = lookup(addr) {
            // No arithmetic that could panic here: `page` is a power of two
            // (checked at registration) and `base` lies in the range.
            let base = (addr & !page.wrapping_sub(1)).max(start);
            let n = page.min(start.saturating_add(len).saturating_sub(base));
            // SAFETY: mmap is a plain system call (no lock, no allocation,
            // so safe in a signal handler, as systemd's journal does for the
            // same purpose). MAP_FIXED replaces one page of a guest-memory
            // mapping that is registered, so still mapped and ours: the
            // registration ends before the region is unmapped. Nothing but
            // guest memory lives in that range.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_mmap,
                    base,
                    n,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_FIXED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            if r == base as libc::c_long {
                // SAFETY: the flag belongs to the connection that registered
                // the range and lives at least as long as the registration.
                unsafe { (*flag).store(true, Ordering::SeqCst) };
                RECOVERED.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
    }
    pass_on(sig, code, info, ctx);
}

/// A SIGBUS outside guest memory: a fault goes to whoever handled SIGBUS
/// before us (Rust's stack-overflow handler); a sent SIGBUS, or a fault with
/// no one before us, gets the default action, which kills the process as if
/// we had never been installed.
fn pass_on(
    sig: libc::c_int,
    code: libc::c_int,
    info: *mut libc::siginfo_t,
    ctx: *mut libc::c_void,
) {
    // si_code <= 0: sent by kill/tgkill/sigqueue, not a fault. (Rust's
    // handler would only reset the action and return, losing it.)
    let fault = code > 0;
    if let Some(old) = PREVIOUS.get().filter(|_| fault) {
        let h = old.sa_sigaction;
        if h != libc::SIG_DFL && h != libc::SIG_IGN {
            if old.sa_flags & libc::SA_SIGINFO != 0 {
                // SAFETY: an SA_SIGINFO handler has this signature.
                let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                    unsafe { std::mem::transmute(h) };
                f(sig, info, ctx);
            } else {
                // SAFETY: a plain handler takes the signal number.
                let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(h) };
                f(sig);
            }
            return;
        }
    }
    // SAFETY: sigaction and raise are async-signal-safe; with the default
    // action back, the pending SIGBUS (or the faulting instruction, run
    // again on return) ends the process.
    unsafe {
        let mut dfl: libc::sigaction = std::mem::zeroed();
        dfl.sa_sigaction = libc::SIG_DFL;
        libc::sigaction(libc::SIGBUS, &dfl, std::ptr::null_mut());
        libc::raise(libc::SIGBUS);
    }
}

/// Installs the SIGBUS handler, once per process.
pub fn install() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: sigaction with a zeroed (then filled) struct; the handler
        // only does async-signal-safe work. The previous disposition is
        // stored before ours can run.
        unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut old);
            let _ = PREVIOUS.set(old);
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_sigbus as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut sa.sa_mask);
            if libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut()) != 0 {
                log::warn!(
                    "cannot install the SIGBUS handler: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
    });
}

/// Why a memory table was refused.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    #[error(
        "memory region at guest address {gpa:#x} of {len} bytes needs {need} bytes of its file, \
         which has {have}"
    )]
    BeyondFile {
        gpa: u64,
        len: u64,
        need: u64,
        have: u64,
    },
    #[error("memory region at guest address {gpa:#x}: cannot stat its file: {source}")]
    Stat {
        gpa: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("too many guest memory regions mapped in this process (at most {SLOTS})")]
    Full,
}

/// Checks `r` against its file; returns the page size of its mapping.
fn check_region(r: &Region) -> Result<usize, MapError> {
    // SAFETY: sysconf only reads a value.
    let base_page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
        .ok()
        .filter(|p| p.is_power_of_two())
        .unwrap_or(4096);
    let Some(fo) = r.file_offset() else {
        return Ok(base_page);
    };
    let gpa = r.start_addr().0;
    let fd = fo.file().as_raw_fd();
    // SAFETY: fstat into a zeroed struct on a descriptor the region owns.
    let st = unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(fd, &mut st) != 0 {
            return Err(MapError::Stat {
                gpa,
                source: std::io::Error::last_os_error(),
            });
        }
        st
    };
    if st.st_mode & libc::S_IFMT == libc::S_IFREG {
        let have = u64::try_from(st.st_size).unwrap_or(0);
        let need = fo.start().saturating_add(r.len());
        if need > have {
            return Err(MapError::BeyondFile {
                gpa,
                len: r.len(),
                need,
                have,
            });
        }
    }
    // SAFETY: fstatfs into a zeroed struct on the same descriptor.
    let page = unsafe {
        let mut sfs: libc::statfs = std::mem::zeroed();
        if libc::fstatfs(fd, &mut sfs) == 0 && sfs.f_type as i64 == HUGETLBFS_MAGIC {
            usize::try_from(sfs.f_bsize).unwrap_or(base_page)
        } else {
            base_page
        }
    };
    Ok(if page.is_power_of_two() {
        page
    } else {
        base_page
    })
}

/// The guest-memory regions one connection registered.
pub struct Mapped {
    poisoned: Arc<AtomicBool>,
    held: Vec<(usize, Arc<Region>)>,
}

impl Default for Mapped {
    fn default() -> Self {
        Self::new()
    }
}

impl Mapped {
    pub fn new() -> Mapped {
        install();
        Mapped {
            poisoned: Arc::new(AtomicBool::new(false)),
            held: Vec::new(),
        }
    }

    /// Set when the handler caught a fault in one of these regions.
    pub fn poison_flag(&self) -> Arc<AtomicBool> {
        self.poisoned.clone()
    }

    /// Registers the regions of `mem` not registered yet (so that a fault in
    /// them is survived from now on), then checks each against its file.
    pub fn add(&mut self, mem: &GuestMem) -> Result<(), MapError> {
        let mut result = Ok(());
        for r in mem.iter() {
            let host = r.as_ptr() as usize;
            if self.held.iter().any(|(_, h)| h.as_ptr() as usize == host) {
                continue;
            }
            let page = match check_region(r) {
                Ok(p) => p,
                Err(e) => {
                    result = result.and(Err(e));
                    4096
                }
            };
            // The collection hands out its regions only by reference; its
            // remove_region returns the shared one.
            let Ok((_, arc)) = mem.remove_region(r.start_addr(), r.len()) else {
                continue;
            };
            let len = usize::try_from(r.len()).unwrap_or(usize::MAX);
            match register(host, len, page, &self.poisoned) {
                Some(slot) => self.held.push((slot, arc)),
                None => result = result.and(Err(MapError::Full)),
            }
        }
        result
    }

    /// Releases the regions no one but us holds any more (no request, ring
    /// or memory table can reach them): unregistered, then unmapped.
    pub fn sweep(&mut self) {
        self.held.retain(|(slot, r)| {
            if Arc::strong_count(r) > 1 {
                return true;
            }
            unregister(*slot);
            false
        });
    }
}

/// How many registry slots are in use (all connections).
pub fn registered() -> usize {
    REGISTRY
        .iter()
        .filter(|s| s.claimed.load(Ordering::Relaxed))
        .count()
}

impl Drop for Mapped {
    fn drop(&mut self) {
        self.sweep();
        log::debug!(
            "guest memory of a connection released; {} regions registered in the process",
            registered()
        );
        if !self.held.is_empty() {
            // Still used elsewhere: keep them mapped and registered for good
            // (and the flag the registrations point at) rather than leave a
            // registration without its mapping.
            log::debug!(
                "{} guest memory regions outlive their connection",
                self.held.len()
            );
            std::mem::forget(std::mem::take(&mut self.held));
            std::mem::forget(self.poisoned.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::FromRawFd;
    use vm_memory::{FileOffset, GuestAddress};

    fn memfd(len: u64) -> std::fs::File {
        // SAFETY: memfd_create with a valid name; the File owns the fd.
        let f = unsafe {
            let fd = libc::memfd_create(c"sigbus-test".as_ptr(), libc::MFD_CLOEXEC);
            assert!(fd >= 0);
            std::fs::File::from_raw_fd(fd)
        };
        f.set_len(len).unwrap();
        f
    }

    fn map(file: &std::fs::File, len: usize) -> GuestMem {
        GuestMem::from_ranges_with_files([(
            GuestAddress(0),
            len,
            Some(FileOffset::new(file.try_clone().unwrap(), 0)),
        )])
        .unwrap()
    }

    #[test]
    fn a_fault_in_truncated_guest_memory_reads_zeroes_and_poisons() {
        let file = memfd(8192);
        let mem = map(&file, 8192);
        let mut mapped = Mapped::new();
        mapped.add(&mem).unwrap();
        let flag = mapped.poison_flag();
        let p = mem.iter().next().unwrap().as_ptr();
        // SAFETY: both pages are mapped; the first is written while the file
        // still has it.
        unsafe { p.write_volatile(7) };
        file.set_len(4096).unwrap();
        let before = recovered();
        // SAFETY: the second page is mapped; its file page is gone, so this
        // load faults and the handler puts a zero page there.
        let v = unsafe { p.add(4096).read_volatile() };
        assert_eq!(v, 0);
        assert!(flag.load(Ordering::SeqCst));
        assert!(recovered() > before);
        // SAFETY: the first page is untouched by the handler.
        assert_eq!(unsafe { p.read_volatile() }, 7);
        let addr = p as usize;
        assert!(lookup(addr).is_some());
        drop(mem);
        drop(mapped);
        assert!(lookup(addr).is_none(), "released with its mapping");
    }

    #[test]
    fn a_region_larger_than_its_file_is_refused() {
        let file = memfd(4096);
        let mem = map(&file, 16 << 20);
        let mut mapped = Mapped::new();
        let e = mapped.add(&mem).unwrap_err();
        assert!(
            matches!(e, MapError::BeyondFile { need, have: 4096, .. } if need == 16 << 20),
            "{e}"
        );
        // Registered all the same until the table is dropped (the library
        // had it in place already); released with it.
        let addr = mem.iter().next().unwrap().as_ptr() as usize;
        assert!(lookup(addr).is_some());
        drop(mem);
        mapped.sweep();
        assert!(lookup(addr).is_none());
    }
}
