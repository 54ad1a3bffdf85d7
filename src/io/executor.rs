//! The iothread's task executor: a slab of request tasks that allocates
//! nothing per task in steady state.
//!
//! ```text
//!   spawn(f) --> free slot (or a new one) --> f written into the slot's
//!                inline storage (boxed only if it does not fit) --> ready bit set
//!   run_until_stalled: for each chunk of 64 slots, take its ready bits
//!                (one atomic swap) and poll those tasks; repeat until no
//!                bit is set; a finished task's slot goes back on the free list
//!   wake (any thread): fetch_or the slot's bit into its chunk
//! ```
//!
//! Each slot owns one `Waker`, made when the slot is made and reused by
//! every task that runs in it, so waking and cloning a waker never
//! allocates. A waker that outlives its task may wake the slot's next task:
//! a spurious poll, which futures allow. Slots never move (each is boxed),
//! so a task is pinned where it was written.
//!
//! This replaces `futures::executor::LocalPool`, which allocated a task
//! (`Arc`) and a boxed future per request; callgrind put the pool at ~20 %
//! of the instructions of a null-co request.

use std::future::Future;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

/// Bytes of inline storage per slot. A request task is ~600 bytes; larger
/// futures still run, in a box.
const SLOT_BYTES: usize = 1024;

#[repr(C, align(16))]
struct Storage([MaybeUninit<u8>; SLOT_BYTES]);

/// Type-erased operations on the future stored inline in a slot.
struct VTable {
    poll: unsafe fn(*mut u8, &mut Context<'_>) -> Poll<()>,
    drop: unsafe fn(*mut u8),
}

/// # Safety
/// `p` must point at a live, pinned `F`.
unsafe fn poll_inline<F: Future<Output = ()>>(p: *mut u8, cx: &mut Context<'_>) -> Poll<()> {
    // SAFETY: the caller guarantees `p` is a live F that never moves.
    unsafe { Pin::new_unchecked(&mut *p.cast::<F>()) }.poll(cx)
}

/// # Safety
/// `p` must point at a live `F`, which is dead afterwards.
unsafe fn drop_inline<F>(p: *mut u8) {
    // SAFETY: the caller guarantees `p` is a live F, dropped once.
    unsafe { std::ptr::drop_in_place(p.cast::<F>()) }
}

struct VTableOf<F>(std::marker::PhantomData<F>);

impl<F: Future<Output = ()>> VTableOf<F> {
    const VTABLE: VTable = VTable {
        poll: poll_inline::<F>,
        drop: drop_inline::<F>,
    };
}

enum Task {
    Empty,
    /// A future written into the slot's storage.
    Inline(&'static VTable),
    /// A future too large or too aligned for the storage.
    Boxed(Pin<Box<dyn Future<Output = ()>>>),
}

struct Slot {
    storage: Storage,
    task: Task,
    waker: Waker,
}

/// The ready bits of 64 slots.
struct Chunk {
    ready: AtomicU64,
}

struct SlotWaker {
    chunk: Arc<Chunk>,
    bit: u64,
}

impl Wake for SlotWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.chunk.ready.fetch_or(self.bit, Ordering::Release);
    }
}

/// A single-threaded executor for `!Send` tasks; wakers may be used from
/// any thread (whoever wakes a task of another thread must also wake that
/// thread, e.g. through its eventfd).
pub struct Executor {
    /// Boxed so a slot (and the task pinned in it) stays put when the Vec
    /// grows.
    #[allow(clippy::vec_box)]
    slots: Vec<Box<Slot>>,
    chunks: Vec<Arc<Chunk>>,
    free: Vec<usize>,
    live: usize,
}

impl Default for Executor {
    fn default() -> Self {
        Self::new()
    }
}

impl Executor {
    pub fn new() -> Self {
        Executor {
            slots: Vec::new(),
            chunks: Vec::new(),
            free: Vec::new(),
            live: 0,
        }
    }

    /// Tasks spawned and not finished.
    pub fn live(&self) -> usize {
        self.live
    }

    fn new_slot(&mut self) -> usize {
        let index = self.slots.len();
        if index % 64 == 0 {
            self.chunks.push(Arc::new(Chunk {
                ready: AtomicU64::new(0),
            }));
        }
        let waker = Waker::from(Arc::new(SlotWaker {
            chunk: self.chunks[index / 64].clone(),
            bit: 1 << (index % 64),
        }));
        self.slots.push(Box::new(Slot {
            storage: Storage([MaybeUninit::uninit(); SLOT_BYTES]),
            task: Task::Empty,
            waker,
        }));
        index
    }

    /// Starts `f`; it is first polled by the next `run_until_stalled`.
    pub fn spawn<F: Future<Output = ()> + 'static>(&mut self, f: F) {
        let index = match self.free.pop() {
            Some(i) => i,
            None => self.new_slot(),
        };
        let slot = &mut self.slots[index];
        debug_assert!(matches!(slot.task, Task::Empty));
        let fits = std::mem::size_of::<F>() <= SLOT_BYTES
            && std::mem::align_of::<F>() <= std::mem::align_of::<Storage>();
        slot.task = if fits {
            let p = slot.storage.0.as_mut_ptr().cast::<F>();
            // SAFETY: the storage is large and aligned enough for F (checked
            // above) and holds no live value (the slot is empty).
            unsafe { p.write(f) };
            Task::Inline(&VTableOf::<F>::VTABLE)
        } else {
            Task::Boxed(Box::pin(f))
        };
        self.live += 1;
        self.chunks[index / 64]
            .ready
            .fetch_or(1 << (index % 64), Ordering::Relaxed);
    }

    /// Polls every woken task until none is ready; returns how many tasks
    /// finished.
    pub fn run_until_stalled(&mut self) -> usize {
        let mut finished = 0;
        loop {
            let mut polled = false;
            for c in 0..self.chunks.len() {
                // A plain load first: most chunks have nothing ready, and
                // the swap is a locked instruction.
                if self.chunks[c].ready.load(Ordering::Relaxed) == 0 {
                    continue;
                }
                let mut bits = self.chunks[c].ready.swap(0, Ordering::Acquire);
                while bits != 0 {
                    let b = bits.trailing_zeros() as usize;
                    bits &= bits - 1;
                    polled = true;
                    if self.poll_slot(c * 64 + b) {
                        finished += 1;
                    }
                }
            }
            if !polled {
                return finished;
            }
        }
    }

    /// Polls the task in slot `index`; true if it finished.
    fn poll_slot(&mut self, index: usize) -> bool {
        let Some(slot) = self.slots.get_mut(index) else {
            return false;
        };
        let Slot {
            storage,
            task,
            waker,
        } = &mut **slot;
        let mut cx = Context::from_waker(waker);
        let done = match task {
            Task::Empty => false,
            Task::Inline(vt) => {
                let p = storage.0.as_mut_ptr().cast::<u8>();
                // SAFETY: an Inline task is a live future of the type the
                // vtable was made for, written at `p`, which never moves.
                let ready = unsafe { (vt.poll)(p, &mut cx) }.is_ready();
                if ready {
                    // SAFETY: as above; the future is dropped once and the
                    // slot marked empty right after.
                    unsafe { (vt.drop)(p) };
                }
                ready
            }
            Task::Boxed(f) => f.as_mut().poll(&mut cx).is_ready(),
        };
        if done {
            slot.task = Task::Empty;
            self.free.push(index);
            self.live -= 1;
        }
        done
    }
}

impl Drop for Executor {
    fn drop(&mut self) {
        for slot in &mut self.slots {
            if let Task::Inline(vt) = slot.task {
                let p = slot.storage.0.as_mut_ptr().cast::<u8>();
                // SAFETY: a live inline future, dropped once.
                unsafe { (vt.drop)(p) };
            }
            slot.task = Task::Empty;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::{Cell, RefCell};
    use std::rc::Rc;

    /// Pending until `flag` is set; records its waker.
    struct Gate {
        open: Rc<Cell<bool>>,
        waker: Rc<RefCell<Option<Waker>>>,
    }

    impl Future for Gate {
        type Output = ();
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            if self.open.get() {
                Poll::Ready(())
            } else {
                *self.waker.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }

    #[test]
    fn runs_inline_and_boxed_tasks_and_reuses_slots() {
        let mut ex = Executor::new();
        let count = Rc::new(Cell::new(0));
        for round in 0..3 {
            for i in 0..200 {
                let c = count.clone();
                if i % 7 == 0 {
                    // Too large for a slot: boxed.
                    let big = [round as u8; 4096];
                    ex.spawn(async move {
                        c.set(c.get() + usize::from(big[4095] == round as u8));
                    });
                } else {
                    ex.spawn(async move { c.set(c.get() + 1) });
                }
            }
            assert_eq!(ex.run_until_stalled(), 200);
            assert_eq!(ex.live(), 0);
        }
        assert_eq!(count.get(), 600);
        // 200 at a time: slots were reused, not added.
        assert_eq!(ex.slots.len(), 200);
    }

    #[test]
    fn woken_tasks_run_again_from_any_thread_and_drop_releases() {
        let mut ex = Executor::new();
        let open = Rc::new(Cell::new(false));
        let waker = Rc::new(RefCell::new(None));
        let done = Rc::new(Cell::new(false));
        let held = Rc::new(());
        {
            let (open, waker, done, held) =
                (open.clone(), waker.clone(), done.clone(), held.clone());
            ex.spawn(async move {
                let _keep = held;
                Gate { open, waker }.await;
                done.set(true);
            });
        }
        assert_eq!(ex.run_until_stalled(), 0);
        assert_eq!(ex.live(), 1);
        // Not woken: not polled, even when the gate opens.
        open.set(true);
        assert_eq!(ex.run_until_stalled(), 0);
        assert!(!done.get());
        let w = waker.borrow_mut().take().expect("waker recorded");
        std::thread::spawn(move || w.wake()).join().unwrap();
        assert_eq!(ex.run_until_stalled(), 1);
        assert!(done.get());
        assert_eq!(Rc::strong_count(&held), 1);

        // A task still pending when the executor goes is dropped with it.
        let held2 = Rc::new(());
        {
            let h = held2.clone();
            let (open, waker) = (Rc::new(Cell::new(false)), waker.clone());
            ex.spawn(async move {
                let _keep = h;
                Gate { open, waker }.await;
            });
        }
        ex.run_until_stalled();
        assert_eq!(Rc::strong_count(&held2), 2);
        drop(ex);
        assert_eq!(Rc::strong_count(&held2), 1);
    }
}
