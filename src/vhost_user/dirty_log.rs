//! The dirty log of live migration (vhost-user spec, "Migration"): with
//! `VHOST_F_LOG_ALL` acked and a log shared by SET_LOG_BASE
//! (`VHOST_USER_PROTOCOL_F_LOG_SHMFD`), every guest page the daemon writes
//! (read data, GET_ID strings, status bytes, used rings) gets its bit set,
//! one bit per 4 KiB guest-physical page (page N: byte N / 8, bit N % 8, as
//! QEMU's `vhost_log_chunk_t` array on a little-endian host), so that QEMU
//! copies those pages again.
//!
//! vm-memory's own bitmap is not on the daemon's paths (they write guest
//! memory through raw host pointers, and the kernel writes read data
//! through io_uring), so the daemon marks the log itself, after each write:
//! QEMU clears bits as it copies, and a bit set before the write could be
//! cleared before the data is there. The final pass after the device stops
//! (GET_VRING_BASE waits for every request) catches the rest.
//!
//! Off (no LOG_ALL or no log), the cost is one relaxed load per completion.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, RwLock};

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use crate::virtio_blk::GuestMem;

/// Page size of the log: QEMU's VHOST_LOG_PAGE.
pub const LOG_PAGE: u64 = 4096;

/// VHOST_F_LOG_ALL, the virtio feature bit 26 that turns logging on.
pub const VHOST_F_LOG_ALL: u64 = 1 << 26;

/// A log larger than this is refused (it covers 4 KiB * 8 * 2^32 = 128 TiB
/// of guest memory).
const MAX_LOG_SIZE: u64 = 1 << 32;

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("SET_LOG_BASE: log of {0} bytes refused (1 to {MAX_LOG_SIZE} bytes)")]
    Size(u64),
    #[error("SET_LOG_BASE: cannot map the log ({size} bytes at offset {offset}): {err}")]
    Map {
        size: u64,
        offset: u64,
        err: io::Error,
    },
}

impl From<LogError> for io::Error {
    fn from(e: LogError) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidInput, e.to_string())
    }
}

/// A log shared by the frontend, mapped.
pub struct DirtyLog {
    base: *mut u8,
    len: usize,
}

// SAFETY: the mapping is only accessed through atomic byte operations and
// lives as long as the value; any thread may set bits.
unsafe impl Send for DirtyLog {}
// SAFETY: as above: shared access is atomic.
unsafe impl Sync for DirtyLog {}

impl DirtyLog {
    /// Maps `size` bytes of `file` at `offset` (SET_LOG_BASE's VhostUserLog).
    pub fn map(file: &File, size: u64, offset: u64) -> Result<DirtyLog, LogError> {
        if size == 0 || size > MAX_LOG_SIZE {
            return Err(LogError::Size(size));
        }
        let len = usize::try_from(size).map_err(|_| LogError::Size(size))?;
        let base = super::shm::map_shared(file, len, offset).map_err(|err| LogError::Map {
            size,
            offset,
            err,
        })?;
        Ok(DirtyLog {
            base: base.as_ptr(),
            len,
        })
    }

    /// Marks the pages of `len` guest-physical bytes at `gpa`. Pages beyond
    /// the log are not marked (QEMU sizes the log for all guest memory).
    pub fn mark(&self, gpa: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = gpa / LOG_PAGE;
        let last = gpa.saturating_add(len - 1) / LOG_PAGE;
        for page in first..=last {
            let Ok(byte) = usize::try_from(page / 8) else {
                return;
            };
            if byte >= self.len {
                return;
            }
            // SAFETY: `byte < len`, inside the mapping; u8 atomics have no
            // alignment requirement; the frontend only uses atomic
            // operations on the log too.
            let cell = unsafe { AtomicU8::from_ptr(self.base.add(byte)) };
            // Release: the guest-memory write this marks comes first.
            cell.fetch_or(1 << (page % 8), Ordering::Release);
        }
    }

    /// Marks the guest pages behind `len` host bytes at `ptr`, which lie in
    /// `mem`'s regions (an iovec of a request parsed against `mem`).
    pub fn mark_host(&self, mem: &GuestMem, ptr: *const u8, len: usize) {
        let mut p = ptr as usize;
        let mut left = len as u64;
        'next: while left > 0 {
            for region in mem.iter() {
                let Ok(host) = region.get_host_address(MemoryRegionAddress(0)) else {
                    continue;
                };
                let host = host as usize;
                let rlen = region.len();
                if p < host || (p - host) as u64 >= rlen {
                    continue;
                }
                let off = (p - host) as u64;
                let n = left.min(rlen - off);
                self.mark(region.start_addr().0.saturating_add(off), n);
                left -= n;
                // n <= rlen - off, so this stays within the region's end.
                p += n as usize;
                continue 'next;
            }
            // Not guest memory (a bounce buffer): nothing to mark.
            return;
        }
    }
}

impl Drop for DirtyLog {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, no longer referenced.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

/// A connection's logging state: the log the frontend shared and whether
/// LOG_ALL is acked.
#[derive(Default)]
pub struct LogState {
    on: AtomicBool,
    log_all: AtomicBool,
    log: RwLock<Option<Arc<DirtyLog>>>,
    /// SET_LOG_FD's eventfd, signalled after used rings were marked (as
    /// libvhost-user's `vu_log_kick` and the kernel's `log_ctx` do).
    kick: RwLock<Option<File>>,
    /// Each vring's used-ring log address from SET_VRING_ADDR, when its
    /// VHOST_VRING_F_LOG flag was set.
    used_log: RwLock<Vec<Option<u64>>>,
}

impl LogState {
    /// SET_LOG_BASE: the log to mark from now on (replaces the last one).
    pub fn set_log(&self, log: DirtyLog) {
        *self.log.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(log));
        self.update();
    }

    /// SET_FEATURES: logging follows VHOST_F_LOG_ALL.
    pub fn set_features(&self, features: u64) {
        self.log_all
            .store(features & VHOST_F_LOG_ALL != 0, Ordering::Relaxed);
        self.update();
    }

    fn update(&self) {
        let have = self.log.read().unwrap_or_else(|e| e.into_inner()).is_some();
        self.on.store(
            have && self.log_all.load(Ordering::Relaxed),
            Ordering::Release,
        );
    }

    /// SET_LOG_FD: the eventfd to signal after marking (replaces the last).
    pub fn set_kick(&self, fd: File) {
        *self.kick.write().unwrap_or_else(|e| e.into_inner()) = Some(fd);
    }

    /// Signals SET_LOG_FD's eventfd, if the frontend set one.
    pub fn kick(&self) {
        let kick = self.kick.read().unwrap_or_else(|e| e.into_inner());
        if let Some(fd) = kick.as_ref() {
            let one = 1u64.to_ne_bytes();
            // SAFETY: an 8-byte write from a live buffer to a descriptor we
            // own; a full counter (EAGAIN) already wakes the frontend.
            unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
        }
    }

    /// SET_VRING_ADDR: the used ring's log address of vring `index`
    /// (`None` without VHOST_VRING_F_LOG).
    pub fn set_used_log(&self, index: u32, addr: Option<u64>) {
        let Ok(i) = usize::try_from(index) else {
            return;
        };
        let mut v = self.used_log.write().unwrap_or_else(|e| e.into_inner());
        if v.len() <= i {
            // The library refused indexes beyond the queue count already.
            v.resize(i + 1, None);
        }
        v[i] = addr;
    }

    /// Where the used ring of `queue` is logged: the SET_VRING_ADDR log
    /// address if the frontend gave one (the spec's rule), else the used
    /// ring's guest address `used`.
    pub fn used_log_addr(&self, queue: u16, used: u64) -> u64 {
        let v = self.used_log.read().unwrap_or_else(|e| e.into_inner());
        v.get(usize::from(queue)).copied().flatten().unwrap_or(used)
    }

    /// The log to mark, if logging is on.
    pub fn active(&self) -> Option<Arc<DirtyLog>> {
        if !self.on.load(Ordering::Acquire) {
            return None;
        }
        self.log.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Marks the byte at `addr` (a status byte) if logging is on.
pub fn mark_byte(state: &LogState, addr: GuestAddress) {
    if let Some(log) = state.active() {
        log.mark(addr.0, 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_of(size: u64) -> (File, DirtyLog) {
        let f = tempfile::tempfile().unwrap();
        f.set_len(size).unwrap();
        let l = DirtyLog::map(&f, size, 0).unwrap();
        (f, l)
    }

    fn bits(l: &DirtyLog) -> Vec<u64> {
        let mut v = Vec::new();
        for byte in 0..l.len {
            // SAFETY: inside the mapping.
            let b = unsafe { AtomicU8::from_ptr(l.base.add(byte)) }.load(Ordering::Relaxed);
            for bit in 0..8 {
                if b & (1 << bit) != 0 {
                    v.push(byte as u64 * 8 + bit);
                }
            }
        }
        v
    }

    #[test]
    fn marks_each_page_touched() {
        let (_f, l) = log_of(8);
        l.mark(4095, 2);
        l.mark(5 * 4096, 4096);
        l.mark(9 * 4096 + 1, 0);
        l.mark(63 * 4096 + 10, 1 << 20);
        assert_eq!(bits(&l), vec![0, 1, 5, 63]);
    }

    #[test]
    fn refuses_empty_log() {
        let f = tempfile::tempfile().unwrap();
        assert!(matches!(DirtyLog::map(&f, 0, 0), Err(LogError::Size(0))));
    }
}
