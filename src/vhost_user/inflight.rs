//! Inflight I/O tracking (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD): a shared
//! buffer, kept by the frontend across our restarts, that says which
//! requests were popped and not yet returned, so that a restarted daemon
//! resubmits exactly those, in the order they were first taken.
//!
//! Layout (vhost-user spec, "Inflight I/O tracking", split virtqueues): one
//! region per queue, each `align_up(16 + 16 * queue_size, 64)` bytes (the
//! same sizes as libvhost-user's), made of a header and one entry per
//! descriptor head:
//!
//! ```text
//!   header  u64 features | u16 version | u16 desc_num | u16 last_batch_head | u16 used_idx
//!   desc[i] u8 inflight | u8 padding[5] | u16 next | u64 counter
//! ```
//!
//! Popping head `i`: `desc[i].counter = counter++`, then `desc[i].inflight = 1`.
//! Returning a batch: link its heads through `next` from `last_batch_head`,
//! publish the used index, clear their `inflight`, then `used_idx = used
//! index`. On start after a restart: if `used_idx` differs from the ring's
//! used index, the last batch was published but not yet cleared: clear it;
//! then every head still marked is resubmitted in counter order, and the
//! next avail index is `used index + number resubmitted` (whatever
//! SET_VRING_BASE said: QEMU falls back to the used index when the daemon
//! died before GET_VRING_BASE).
//!
//! The buffer is shared with the frontend, which may write anything into
//! it: every field read is checked (heads against the queue size, the
//! batch length against the number of entries) and used only to choose
//! among requests the driver made available.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use vhost::vhost_user::message::VhostUserInflight;

/// The region version this daemon writes (the spec's current one).
const VERSION: u16 = 1;
const HEADER: u64 = 16;
const DESC: u64 = 16;
const ALIGN: u64 = 64;
/// Header field offsets.
const OFF_VERSION: usize = 8;
const OFF_DESC_NUM: usize = 10;
const OFF_LAST_BATCH_HEAD: usize = 12;
const OFF_USED_IDX: usize = 14;
/// Entry field offsets.
const OFF_INFLIGHT: usize = 0;
const OFF_NEXT: usize = 6;
const OFF_COUNTER: usize = 8;

/// A refused GET_INFLIGHT_FD or SET_INFLIGHT_FD.
#[derive(Debug, thiserror::Error)]
pub enum InflightError {
    #[error("inflight buffer for {num_queues} queues of {queue_size}: the export has {max_queues} queues of at most {max_size}")]
    Shape {
        num_queues: u16,
        queue_size: u16,
        max_queues: u16,
        max_size: u16,
    },
    #[error("inflight buffer of {size} bytes at offset {offset}: {num_queues} queues of {queue_size} need {need} bytes, page-aligned, within the file ({file_size} bytes)")]
    Size {
        size: u64,
        offset: u64,
        num_queues: u16,
        queue_size: u16,
        need: u64,
        file_size: u64,
    },
    #[error("inflight buffer is not sealed against shrinking (seals {0:#x}): it could vanish under an access")]
    NotSealed(i32),
    #[error("inflight buffer: {0}")]
    Io(#[from] io::Error),
}

impl From<InflightError> for io::Error {
    fn from(e: InflightError) -> io::Error {
        match e {
            InflightError::Io(e) => e,
            e => io::Error::new(io::ErrorKind::InvalidInput, e.to_string()),
        }
    }
}

/// Bytes of one queue's region for queues of `queue_size`.
pub fn queue_region_size(queue_size: u16) -> u64 {
    (HEADER + DESC * u64::from(queue_size)).div_ceil(ALIGN) * ALIGN
}

/// The mapped inflight buffer of one connection.
pub struct Region {
    ptr: NonNull<u8>,
    len: usize,
    file: File,
    num_queues: u16,
    queue_size: u16,
}

// SAFETY: the mapping is only accessed through atomics (it is shared with
// another process anyway); the pointer stays valid until drop.
unsafe impl Send for Region {}
// SAFETY: as above.
unsafe impl Sync for Region {}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map_file`; no
        // QueueRegion outlives its Arc<Region>.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

impl Region {
    /// Checks a frontend's queue count and size against the export's.
    fn check_shape(
        msg: &VhostUserInflight,
        max_queues: u16,
        max_size: u16,
    ) -> Result<(), InflightError> {
        if msg.num_queues == 0
            || msg.num_queues > max_queues
            || msg.queue_size == 0
            || msg.queue_size > max_size
        {
            return Err(InflightError::Shape {
                num_queues: msg.num_queues,
                queue_size: msg.queue_size,
                max_queues,
                max_size,
            });
        }
        Ok(())
    }

    /// GET_INFLIGHT_FD: a fresh zeroed buffer in a sealed memfd.
    pub fn create(
        msg: &VhostUserInflight,
        max_queues: u16,
        max_size: u16,
    ) -> Result<(Region, VhostUserInflight), InflightError> {
        Self::check_shape(msg, max_queues, max_size)?;
        let size = queue_region_size(msg.queue_size) * u64::from(msg.num_queues);
        // SAFETY: a constant NUL-terminated name and valid flags.
        let fd = unsafe {
            libc::memfd_create(
                c"vhost-inflight".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error().into());
        }
        // SAFETY: a descriptor memfd_create just gave us.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size)?;
        // Sealed, so that neither side can shrink it under the other's
        // accesses (SET_INFLIGHT_FD insists on it).
        // SAFETY: fcntl on a descriptor we own.
        let r = unsafe {
            libc::fcntl(
                file.as_raw_fd(),
                libc::F_ADD_SEALS,
                libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error().into());
        }
        let reply = VhostUserInflight {
            mmap_size: size,
            mmap_offset: 0,
            num_queues: msg.num_queues,
            queue_size: msg.queue_size,
        };
        let region = Self::map_file(file, &reply)?;
        Ok((region, reply))
    }

    /// SET_INFLIGHT_FD: the buffer the frontend kept.
    pub fn open(
        msg: &VhostUserInflight,
        file: File,
        max_queues: u16,
        max_size: u16,
    ) -> Result<Region, InflightError> {
        Self::check_shape(msg, max_queues, max_size)?;
        // SAFETY: fcntl on a descriptor we own.
        let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
            return Err(InflightError::NotSealed(seals));
        }
        let file_size = file.metadata()?.len();
        let need = queue_region_size(msg.queue_size) * u64::from(msg.num_queues);
        // SAFETY: sysconf has no memory-safety preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
        let fits = msg
            .mmap_offset
            .checked_add(msg.mmap_size)
            .is_some_and(|end| end <= file_size);
        if msg.mmap_size < need || !fits || msg.mmap_offset % page != 0 {
            return Err(InflightError::Size {
                size: msg.mmap_size,
                offset: msg.mmap_offset,
                num_queues: msg.num_queues,
                queue_size: msg.queue_size,
                need,
                file_size,
            });
        }
        // Only the regions this shape needs: a larger buffer is the
        // frontend's business, not address space of ours.
        Self::map_file(
            file,
            &VhostUserInflight {
                mmap_size: need,
                ..*msg
            },
        )
    }

    fn map_file(file: File, msg: &VhostUserInflight) -> Result<Region, InflightError> {
        let len = usize::try_from(msg.mmap_size)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let ptr = super::shm::map_shared(&file, len, msg.mmap_offset)?;
        Ok(Region {
            ptr,
            len,
            file,
            num_queues: msg.num_queues,
            queue_size: msg.queue_size,
        })
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// Queue `index`'s region, if the buffer has one.
    pub fn queue(self: &Arc<Self>, index: u16) -> Option<Tracker> {
        if index >= self.num_queues {
            return None;
        }
        let off = queue_region_size(self.queue_size) * u64::from(index);
        // SAFETY: open/create checked that num_queues regions fit in the
        // mapping, so the offset is inside it.
        let base = unsafe { self.ptr.as_ptr().add(off as usize) };
        Some(Tracker {
            base,
            desc_num: self.queue_size,
            counter: 0,
            _region: self.clone(),
        })
    }
}

/// One queue's part of the buffer, used by the iothread that serves it.
pub struct Tracker {
    base: *mut u8,
    /// Entries in the region (the frontend's queue size, not the header's
    /// desc_num, which the frontend could change).
    desc_num: u16,
    /// The next pop's counter.
    counter: u64,
    /// Keeps the mapping alive.
    _region: Arc<Region>,
}

/// What a restart left in flight on one queue.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Recovered {
    /// Heads to resubmit, in the order they were first popped.
    pub heads: Vec<u16>,
    /// Entries of the last batch found published but not cleared.
    pub last_batch: u16,
    /// Whether the region was in use before (false: fresh buffer).
    pub resumed: bool,
}

impl Tracker {
    fn at<T>(&self, off: usize) -> &T {
        // SAFETY: `off` is a header offset or an entry's (`entry` checks
        // the head), inside this queue's region of the mapping, aligned
        // for T (the region is 64-aligned, fields naturally aligned); the
        // mapping lives as long as `_region`.
        unsafe { &*self.base.add(off).cast::<T>() }
    }

    fn header16(&self, off: usize) -> &AtomicU16 {
        self.at(off)
    }

    /// Entry `head`'s field at `field`; None beyond the region.
    fn entry<T>(&self, head: u16, field: usize) -> Option<&T> {
        (head < self.desc_num)
            .then(|| self.at(HEADER as usize + DESC as usize * usize::from(head) + field))
    }

    /// A head was popped: it is in flight from now on.
    #[inline]
    pub fn popped(&mut self, head: u16) {
        if let Some(c) = self.entry::<AtomicU64>(head, OFF_COUNTER) {
            c.store(self.counter, Ordering::Relaxed);
            self.counter = self.counter.wrapping_add(1);
            if let Some(f) = self.entry::<AtomicU8>(head, OFF_INFLIGHT) {
                f.store(1, Ordering::Release);
            }
        }
    }

    /// Before the used index that returns `heads` is published: they form
    /// the last batch.
    #[inline]
    pub fn batch(&self, heads: impl Iterator<Item = u16>) {
        let last = self.header16(OFF_LAST_BATCH_HEAD);
        let mut prev = last.load(Ordering::Relaxed);
        for h in heads {
            if let Some(n) = self.entry::<AtomicU16>(h, OFF_NEXT) {
                n.store(prev, Ordering::Relaxed);
                prev = h;
            }
        }
        last.store(prev, Ordering::Release);
    }

    /// After the used index `used` was published: `heads` are no longer
    /// in flight.
    #[inline]
    pub fn returned(&self, heads: impl Iterator<Item = u16>, used: u16) {
        for h in heads {
            if let Some(f) = self.entry::<AtomicU8>(h, OFF_INFLIGHT) {
                f.store(0, Ordering::Release);
            }
        }
        self.header16(OFF_USED_IDX).store(used, Ordering::Release);
    }

    /// The queue starts with the ring's used index at `used`: finishes a
    /// batch a crash interrupted and says what is left to resubmit.
    /// `ring_size` is the ring's size (heads at or beyond it are not
    /// requests of it).
    pub fn recover(&mut self, used: u16, ring_size: u16) -> Recovered {
        let version = self.header16(OFF_VERSION);
        let fresh = version.load(Ordering::Acquire) == 0;
        let mut out = Recovered::default();
        if fresh || version.load(Ordering::Relaxed) != VERSION {
            if !fresh {
                log::warn!(
                    "inflight buffer of version {}: not ours, cleared",
                    version.load(Ordering::Relaxed)
                );
                for h in 0..self.desc_num {
                    if let Some(f) = self.entry::<AtomicU8>(h, OFF_INFLIGHT) {
                        f.store(0, Ordering::Relaxed);
                    }
                }
            }
            self.header16(OFF_DESC_NUM)
                .store(self.desc_num, Ordering::Relaxed);
            self.header16(OFF_USED_IDX).store(used, Ordering::Relaxed);
            version.store(VERSION, Ordering::Release);
            self.counter = 0;
            return out;
        }
        out.resumed = true;
        let used_idx = self.header16(OFF_USED_IDX);
        let batch = used.wrapping_sub(used_idx.load(Ordering::Acquire));
        if batch != 0 {
            // Published, not yet cleared: the `batch` heads linked from
            // last_batch_head.
            if batch <= self.desc_num {
                let mut h = self.header16(OFF_LAST_BATCH_HEAD).load(Ordering::Relaxed);
                for _ in 0..batch {
                    let Some(f) = self.entry::<AtomicU8>(h, OFF_INFLIGHT) else {
                        break;
                    };
                    f.store(0, Ordering::Relaxed);
                    out.last_batch = out.last_batch.saturating_add(1);
                    match self.entry::<AtomicU16>(h, OFF_NEXT) {
                        Some(n) => h = n.load(Ordering::Relaxed),
                        None => break,
                    }
                }
            } else {
                log::warn!(
                    "inflight buffer: used index {used} is {batch} past the buffer's, more \
                     than its {} entries; not a batch of ours",
                    self.desc_num
                );
            }
            used_idx.store(used, Ordering::Release);
        }
        let mut found: Vec<(u64, u16)> = Vec::new();
        for h in 0..self.desc_num.min(ring_size) {
            let on = self
                .entry::<AtomicU8>(h, OFF_INFLIGHT)
                .is_some_and(|f| f.load(Ordering::Acquire) == 1);
            if on {
                let c = self
                    .entry::<AtomicU64>(h, OFF_COUNTER)
                    .map_or(0, |c| c.load(Ordering::Relaxed));
                found.push((c, h));
            }
        }
        // Heads at or beyond the ring's size are no requests: dropped.
        for h in ring_size..self.desc_num {
            if let Some(f) = self.entry::<AtomicU8>(h, OFF_INFLIGHT) {
                f.store(0, Ordering::Relaxed);
            }
        }
        found.sort_unstable();
        self.counter = found.last().map_or(0, |&(c, _)| c.wrapping_add(1));
        out.heads = found.into_iter().map(|(_, h)| h).collect();
        out
    }

    /// Entries this tracker covers (the frontend's queue size).
    pub fn desc_num(&self) -> u16 {
        self.desc_num
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(queues: u16, size: u16) -> Arc<Region> {
        let msg = VhostUserInflight {
            mmap_size: 0,
            mmap_offset: 0,
            num_queues: queues,
            queue_size: size,
        };
        let (r, reply) = Region::create(&msg, 8, 1024).unwrap();
        assert_eq!(reply.mmap_size, queue_region_size(size) * u64::from(queues));
        Arc::new(r)
    }

    /// The same buffer mapped again, as a restarted daemon gets it.
    fn reopen(r: &Region) -> Arc<Region> {
        let msg = VhostUserInflight {
            mmap_size: queue_region_size(r.queue_size) * u64::from(r.num_queues),
            mmap_offset: 0,
            num_queues: r.num_queues,
            queue_size: r.queue_size,
        };
        Arc::new(Region::open(&msg, r.file().try_clone().unwrap(), 8, 1024).unwrap())
    }

    #[test]
    fn sizes_match_libvhost_user() {
        // libvhost-user: ALIGN_UP(16 * queue_size + 2, 64).
        for qs in [1u16, 2, 3, 4, 5, 7, 128, 255, 256, 1024] {
            let lvu = (16 * u64::from(qs) + 2).div_ceil(64) * 64;
            assert_eq!(queue_region_size(qs), lvu, "{qs}");
        }
    }

    #[test]
    fn restart_resubmits_in_flight_heads_in_pop_order() {
        let r = region(2, 8);
        let mut t = r.queue(1).unwrap();
        assert_eq!(t.recover(0, 8), Recovered::default());
        for h in [5, 2, 7, 0] {
            t.popped(h);
        }
        // 2 and 0 return in one batch, used index 0 -> 2.
        t.batch([2, 0].into_iter());
        t.returned([2, 0].into_iter(), 2);
        t.popped(3);
        drop(t);
        let r2 = reopen(&r);
        let mut t = r2.queue(1).unwrap();
        let rec = t.recover(2, 8);
        assert_eq!(rec.heads, vec![5, 7, 3]);
        assert!(rec.resumed);
        assert_eq!(rec.last_batch, 0);
        // New pops come after the resubmitted ones.
        t.popped(1);
        let rec = r2.queue(1).unwrap().recover(2, 8);
        assert_eq!(rec.heads, vec![5, 7, 3, 1]);
        // Queue 0 was never used.
        assert!(r2.queue(0).unwrap().recover(0, 8).heads.is_empty());
        assert!(r2.queue(2).is_none());
    }

    #[test]
    fn a_batch_published_but_not_cleared_is_not_resubmitted() {
        let r = region(1, 16);
        let mut t = r.queue(0).unwrap();
        t.recover(10, 16);
        for h in [4, 9, 11, 1] {
            t.popped(h);
        }
        t.batch([9, 1].into_iter());
        t.returned([9, 1].into_iter(), 12);
        t.batch([11, 4].into_iter());
        // Crash: the used index reached 14, nothing cleared.
        let mut t = reopen(&r).queue(0).unwrap();
        let rec = t.recover(14, 16);
        assert_eq!(rec.last_batch, 2);
        assert!(rec.heads.is_empty(), "{rec:?}");
        // Crash before publishing: both still in flight.
        let r = region(1, 16);
        let mut t = r.queue(0).unwrap();
        t.recover(10, 16);
        t.popped(4);
        t.popped(11);
        t.batch([11, 4].into_iter());
        let rec = reopen(&r).queue(0).unwrap().recover(10, 16);
        assert_eq!((rec.heads, rec.last_batch), (vec![4, 11], 0));
    }

    #[test]
    fn hostile_contents_stay_within_the_region() {
        let r = region(1, 8);
        let mut t = r.queue(0).unwrap();
        t.recover(0, 8);
        // Every byte 0xff: version unknown, cleared.
        // SAFETY: the test's own mapping, no tracker accesses it meanwhile.
        unsafe { std::ptr::write_bytes(r.ptr.as_ptr(), 0xff, r.len) };
        let rec = reopen(&r).queue(0).unwrap().recover(3, 8);
        assert!(rec.heads.is_empty());
        // Version 1, a used index far off, heads beyond the queue.
        // SAFETY: as above.
        unsafe { std::ptr::write_bytes(r.ptr.as_ptr(), 0xff, r.len) };
        t.header16(OFF_VERSION).store(1, Ordering::Relaxed);
        let rec = reopen(&r).queue(0).unwrap().recover(0x8000, 8);
        // inflight bytes 0xff are not 1: nothing resubmitted.
        assert!(rec.heads.is_empty());
        // A short ring: heads beyond it are dropped.
        let r = region(1, 8);
        let mut t = r.queue(0).unwrap();
        t.recover(0, 8);
        t.popped(6);
        t.popped(1);
        t.popped(300);
        let rec = reopen(&r).queue(0).unwrap().recover(0, 4);
        assert_eq!(rec.heads, vec![1]);
    }

    #[test]
    fn refused_buffers() {
        let msg = VhostUserInflight {
            mmap_size: 0,
            mmap_offset: 0,
            num_queues: 9,
            queue_size: 8,
        };
        assert!(matches!(
            Region::create(&msg, 8, 1024),
            Err(InflightError::Shape { .. })
        ));
        let r = region(2, 8);
        let mut m = VhostUserInflight {
            mmap_size: 100,
            mmap_offset: 0,
            num_queues: 2,
            queue_size: 8,
        };
        let e = Region::open(&m, r.file().try_clone().unwrap(), 8, 1024);
        assert!(
            matches!(e, Err(InflightError::Size { .. })),
            "{:?}",
            e.err()
        );
        m.mmap_size = queue_region_size(8) * 2;
        m.mmap_offset = 4096;
        let e = Region::open(&m, r.file().try_clone().unwrap(), 8, 1024);
        assert!(matches!(e, Err(InflightError::Size { .. })));
        // An unsealed file could shrink under us.
        let f = tempfile::tempfile().unwrap();
        f.set_len(4096).unwrap();
        m.mmap_offset = 0;
        let e = Region::open(&m, f, 8, 1024);
        assert!(matches!(e, Err(InflightError::NotSealed(_))));
    }

    /// The data path's share, for callgrind: `VUB_TRACK_N` rounds of 32
    /// requests popped, linked as one batch and returned. Run twice with
    /// different N under `valgrind --tool=callgrind` (release build); the
    /// difference of the totals over the difference of the requests is
    /// what tracking costs per request.
    #[test]
    #[ignore]
    fn tracker_instructions() {
        let n: u64 = std::env::var("VUB_TRACK_N")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1000);
        let r = region(1, 256);
        let mut t = r.queue(0).unwrap();
        t.recover(0, 256);
        let mut used = 0u16;
        for round in 0..n {
            let base = (round % 8) as u16 * 32;
            for h in base..base + 32 {
                t.popped(std::hint::black_box(h));
            }
            t.batch(base..base + 32);
            used = used.wrapping_add(32);
            t.returned(base..base + 32, std::hint::black_box(used));
        }
        assert!(t.recover(used, 256).heads.is_empty());
    }
}
