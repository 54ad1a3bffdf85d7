//! Scatter-gather lists and aligned bounce buffers.
//!
//! An [`IoVecs`] is a list of `(pointer, length)` pairs plus an owner that
//! keeps the memory mapped. For guest requests the owner is the guest memory
//! snapshot the request was parsed against, so a memory-table change never
//! unmaps a buffer that an I/O still uses.

use std::alloc::{self, Layout};
use std::cell::RefCell;
use std::fmt;
use std::mem::ManuallyDrop;
use std::rc::Rc;

use smallvec::SmallVec;

/// A scatter-gather list whose memory stays valid while the value lives.
///
/// The shared part is recycled through a per-thread pool when the last
/// clone goes, so a request's list costs no allocation in steady state.
pub struct IoVecs {
    inner: ManuallyDrop<Rc<Inner>>,
}

impl Clone for IoVecs {
    fn clone(&self) -> Self {
        IoVecs {
            inner: ManuallyDrop::new(Rc::clone(&self.inner)),
        }
    }
}

impl Drop for IoVecs {
    fn drop(&mut self) {
        // SAFETY: `inner` is taken once, here, and not used afterwards.
        let mut rc = unsafe { ManuallyDrop::take(&mut self.inner) };
        let Some(inner) = Rc::get_mut(&mut rc) else {
            return; // other clones remain
        };
        // Release the memory first: dropping an owner may drop other lists,
        // which use the pool themselves.
        drop(inner.owner.take());
        if inner.iov.capacity() > 64 {
            // Do not keep a hostile guest's 1000-segment lists around.
            inner.iov = IoVecList::new();
        } else {
            inner.iov.clear();
        }
        // try_with: lists still held by other thread-locals (a worker's
        // tasks) drop while the thread exits, after the pool is gone.
        let _ = POOL.try_with(|p| {
            if let Ok(mut p) = p.try_borrow_mut() {
                if p.len() < POOL_MAX {
                    p.push(rc);
                }
            }
        });
    }
}

/// Lists kept for reuse per thread; more than a queue's worth of requests
/// in flight is rare.
const POOL_MAX: usize = 1024;

thread_local! {
    static POOL: RefCell<Vec<Rc<Inner>>> = const { RefCell::new(Vec::new()) };
}

/// The segments of one list. Guest requests rarely have more than a few,
/// so they live inside the list's one allocation.
pub type IoVecList = SmallVec<[libc::iovec; 4]>;

struct Inner {
    iov: IoVecList,
    len: u64,
    // Keeps the memory behind `iov` mapped (None only while pooled).
    owner: Option<Owner>,
}

/// What keeps the memory of an [`IoVecs`] alive. An enum rather than a
/// boxed trait object: one allocation less per request.
pub enum Owner {
    /// A snapshot of guest memory.
    Guest(crate::virtio_blk::MemGuard),
    /// A bounce buffer.
    Bounce(AlignedBuf),
    /// Part of another list.
    Parent(IoVecs),
    /// Several lists joined into one.
    Parents(Vec<IoVecs>),
}

impl fmt::Debug for IoVecs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IoVecs")
            .field("segments", &self.inner.iov.len())
            .field("len", &self.inner.len)
            .finish()
    }
}

impl IoVecs {
    /// # Safety
    ///
    /// Every `iovec` must describe memory that is valid for reads and writes
    /// for as long as `owner` is alive, and `owner` must not move that memory.
    pub unsafe fn from_raw(iov: IoVecList, owner: Owner) -> Self {
        let len = iov.iter().map(|v| v.iov_len as u64).sum();
        let pooled = POOL
            .try_with(|p| p.try_borrow_mut().ok().and_then(|mut p| p.pop()))
            .ok()
            .flatten();
        let inner = match pooled {
            Some(mut rc) => {
                let slot = Rc::get_mut(&mut rc).expect("pooled lists are unshared");
                slot.iov = iov;
                slot.len = len;
                slot.owner = Some(owner);
                rc
            }
            None => Rc::new(Inner {
                iov,
                len,
                owner: Some(owner),
            }),
        };
        IoVecs {
            inner: ManuallyDrop::new(inner),
        }
    }

    /// An aligned buffer of `len` bytes, zero-filled, as a one-segment list.
    pub fn bounce(len: usize, align: usize) -> (Self, BounceView) {
        let buf = AlignedBuf::new(len, align);
        let iov = smallvec::smallvec![libc::iovec {
            iov_base: buf.ptr.cast(),
            iov_len: len,
        }];
        let view = BounceView { ptr: buf.ptr, len };
        // SAFETY: the iovec covers exactly the allocation of `buf`, which the
        // IoVecs owns and which does not move when the Box moves.
        let v = unsafe { IoVecs::from_raw(iov, Owner::Bounce(buf)) };
        (v, view)
    }

    pub fn len(&self) -> u64 {
        self.inner.len
    }

    pub fn is_empty(&self) -> bool {
        self.inner.len == 0
    }

    pub fn as_slice(&self) -> &[libc::iovec] {
        &self.inner.iov
    }

    /// True when every segment's address and length are multiples of `align`.
    pub fn is_aligned(&self, align: usize) -> bool {
        self.inner
            .iov
            .iter()
            .all(|v| (v.iov_base as usize) % align == 0 && v.iov_len % align == 0)
    }

    /// The bytes from `skip` to the end, as a list that keeps `self` alive.
    pub fn tail(&self, skip: u64) -> IoVecs {
        self.sub(skip, self.len().saturating_sub(skip))
    }

    /// The first `len` bytes, as a list that keeps `self` alive.
    pub fn head(&self, len: u64) -> IoVecs {
        self.sub(0, len.min(self.len()))
    }

    /// `len` bytes starting `skip` bytes in.
    pub fn sub(&self, mut skip: u64, mut len: u64) -> IoVecs {
        let mut iov = IoVecList::new();
        for v in &self.inner.iov {
            if len == 0 {
                break;
            }
            let vlen = v.iov_len as u64;
            if skip >= vlen {
                skip -= vlen;
                continue;
            }
            let n = (vlen - skip).min(len);
            iov.push(libc::iovec {
                // SAFETY: skip < iov_len, so the pointer stays inside the segment.
                iov_base: unsafe { v.iov_base.cast::<u8>().add(skip as usize) }.cast(),
                iov_len: n as usize,
            });
            len -= n;
            skip = 0;
        }
        // SAFETY: every new segment lies within a segment of `self`, and the
        // new list owns a clone of `self`, which keeps that memory valid.
        unsafe { IoVecs::from_raw(iov, Owner::Parent(self.clone())) }
    }

    /// The lists one after another, as one list that keeps them alive.
    pub fn concat(parts: Vec<IoVecs>) -> IoVecs {
        let iov: IoVecList = parts
            .iter()
            .flat_map(|p| p.as_slice().iter().copied())
            .filter(|v| v.iov_len > 0)
            .collect();
        // SAFETY: every segment is a segment of one of `parts`, which the new
        // list owns, so the memory stays valid.
        unsafe { IoVecs::from_raw(iov, Owner::Parents(parts)) }
    }

    /// Whether every byte of the list is zero (detect-zeroes). Guest
    /// memory may change while it is read: the answer is then either; a
    /// guest racing its own write gets either data, as in QEMU.
    pub fn is_zero(&self) -> bool {
        self.inner.iov.iter().all(|v| {
            if v.iov_len == 0 {
                return true;
            }
            // SAFETY: by the contract of `from_raw`, each iovec is valid for
            // reads of `iov_len` bytes while `self` (and so its owner) is
            // alive; the bytes are only compared.
            let s = unsafe { std::slice::from_raw_parts(v.iov_base.cast::<u8>(), v.iov_len) };
            let (head, words, tail) = {
                // SAFETY: any bit pattern is a valid u64.
                unsafe { s.align_to::<u64>() }
            };
            head.iter().all(|&b| b == 0)
                && words.iter().all(|&w| w == 0)
                && tail.iter().all(|&b| b == 0)
        })
    }

    /// Fills the whole list with zeroes.
    pub fn fill_zero(&self) {
        for v in &self.inner.iov {
            // SAFETY: by the contract of `from_raw`, each iovec is valid for
            // writes while `self` (and so its owner) is alive.
            unsafe { std::ptr::write_bytes(v.iov_base.cast::<u8>(), 0, v.iov_len) };
        }
    }

    /// Copies the list's bytes, in order, into `dst` (at most `dst.len()`).
    pub fn copy_to(&self, dst: &mut [u8]) {
        let mut done = 0;
        for v in &self.inner.iov {
            if done == dst.len() {
                break;
            }
            let n = v.iov_len.min(dst.len() - done);
            // SAFETY: the iovec is valid for reads of `iov_len` bytes (from_raw
            // contract) and `dst[done..done + n]` is in bounds; the regions do
            // not overlap because `dst` is a Rust slice we own exclusively.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    v.iov_base.cast::<u8>(),
                    dst.as_mut_ptr().add(done),
                    n,
                )
            };
            done += n;
        }
    }

    /// The list's bytes appended to `out` (no zero-filling first, as a
    /// `copy_to` into a new buffer would need).
    pub fn extend_vec(&self, out: &mut Vec<u8>) {
        out.reserve(self.inner.len as usize);
        for v in &self.inner.iov {
            // SAFETY: the iovec is valid for reads of `iov_len` bytes while
            // `self` (and so its owner) is alive (from_raw contract).
            let s = unsafe { std::slice::from_raw_parts(v.iov_base.cast::<u8>(), v.iov_len) };
            out.extend_from_slice(s);
        }
    }

    /// Copies `src` into the list's bytes, in order (at most the list's length).
    pub fn copy_from(&self, src: &[u8]) {
        let mut done = 0;
        for v in &self.inner.iov {
            if done == src.len() {
                break;
            }
            let n = v.iov_len.min(src.len() - done);
            // SAFETY: the iovec is valid for writes of `iov_len` bytes
            // (from_raw contract) and `src[done..done + n]` is in bounds.
            unsafe {
                std::ptr::copy_nonoverlapping(src.as_ptr().add(done), v.iov_base.cast::<u8>(), n)
            };
            done += n;
        }
    }
}

/// A heap buffer aligned for O_DIRECT.
pub struct AlignedBuf {
    ptr: *mut u8,
    layout: Layout,
}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes (at least one) aligned to `align`.
    pub fn new(len: usize, align: usize) -> Self {
        let layout = Layout::from_size_align(len.max(1), align.max(1))
            .expect("bounce buffer size and alignment are checked by callers");
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            alloc::handle_alloc_error(layout);
        }
        AlignedBuf { ptr, layout }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` is a live allocation of `layout.size()` bytes that we
        // own exclusively, initialised by alloc_zeroed.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: `ptr` was allocated with exactly `layout`.
        unsafe { alloc::dealloc(self.ptr, self.layout) };
    }
}

/// Access to the bytes of a bounce buffer owned by an [`IoVecs`].
pub struct BounceView {
    ptr: *mut u8,
    len: usize,
}

impl BounceView {
    /// The buffer's bytes. The caller holds the IoVecs that owns them, and no
    /// I/O is running on the buffer while the slice is used.
    pub fn with_bytes<R>(&self, owner: &IoVecs, f: impl FnOnce(&mut [u8]) -> R) -> R {
        debug_assert_eq!(owner.as_slice()[0].iov_base.cast::<u8>(), self.ptr);
        // SAFETY: `owner` keeps the allocation alive for this call; callers
        // only use the view while no I/O on the buffer is in flight, so no one
        // else accesses the bytes.
        let s = unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) };
        f(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_dropped_after_the_pool_at_thread_exit_does_not_panic() {
        thread_local! {
            static HOLD: RefCell<Option<IoVecs>> = const { RefCell::new(None) };
        }
        let t = std::thread::spawn(|| {
            // HOLD's destructor is registered before the pool's, so it runs
            // after the pool is gone (as a worker's tasks do).
            HOLD.with(|h| h.borrow_mut().take());
            let (v, _) = IoVecs::bounce(512, 512);
            drop(v.clone());
            HOLD.with(|h| *h.borrow_mut() = Some(v));
        });
        assert!(t.join().is_ok(), "the thread panicked while exiting");
    }

    #[test]
    fn lists_are_recycled_and_nested_owners_drop_cleanly() {
        let (a, _) = IoVecs::bounce(4096, 512);
        let first = Rc::as_ptr(&a.inner);
        let sub = a.sub(512, 1024);
        let tail = sub.tail(100);
        assert_eq!(tail.len(), 924);
        // Dropping the parent first keeps its memory alive for the children.
        drop(a);
        tail.fill_zero();
        drop(sub);
        // The last drop releases the chain of owners, each back to the pool.
        drop(tail);
        let (b, _) = IoVecs::bounce(512, 512);
        let reused = Rc::as_ptr(&b.inner);
        assert!(
            POOL.with(|p| p.borrow().len()) >= 2,
            "the other two lists wait in the pool"
        );
        // One of the pooled allocations came back (the pool is a stack).
        let (c, _) = IoVecs::bounce(512, 512);
        let (d, _) = IoVecs::bounce(512, 512);
        let ptrs = [reused, Rc::as_ptr(&c.inner), Rc::as_ptr(&d.inner)];
        assert!(ptrs.contains(&first));
        assert_eq!(b.len() + c.len() + d.len(), 1536);
    }
}
