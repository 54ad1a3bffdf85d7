//! An async mutex whose waiters may sit on any iothread.
//!
//! `futures::lock::Mutex` wakes a waiter with its `Waker` only; a task on
//! another iothread also needs that thread's wake eventfd written, or its
//! epoll never returns to poll it. This lock records both for each waiter
//! and hands the lock over in FIFO order. It is taken for metadata work
//! only, never for guest data transfers.

use std::cell::UnsafeCell;
use std::collections::VecDeque;
use std::future::Future;
use std::ops::{Deref, DerefMut};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use vmm_sys_util::eventfd::EventFd;

struct Waiter {
    id: u64,
    waker: Waker,
    wake_fd: Option<Arc<EventFd>>,
}

impl Waiter {
    fn wake(self) {
        self.waker.wake();
        if let Some(fd) = self.wake_fd {
            let _ = fd.write(1);
        }
    }
}

#[derive(Default)]
struct State {
    locked: bool,
    waiters: VecDeque<Waiter>,
}

pub struct AsyncLock<T> {
    state: Mutex<State>,
    next_id: AtomicU64,
    value: UnsafeCell<T>,
}

// SAFETY: the value is reached only through a guard, and at most one guard
// exists at a time (`locked`); T moves between threads with the guard.
unsafe impl<T: Send> Send for AsyncLock<T> {}
// SAFETY: as above.
unsafe impl<T: Send> Sync for AsyncLock<T> {}

impl<T> AsyncLock<T> {
    pub fn new(value: T) -> Self {
        AsyncLock {
            state: Mutex::new(State::default()),
            next_id: AtomicU64::new(1),
            value: UnsafeCell::new(value),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn lock(&self) -> LockFuture<'_, T> {
        LockFuture {
            lock: self,
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            queued: false,
        }
    }

    /// Takes the lock without waiting, if it is free.
    pub fn try_lock(&self) -> Option<AsyncLockGuard<'_, T>> {
        let mut s = self.state();
        if s.locked {
            return None;
        }
        s.locked = true;
        Some(AsyncLockGuard { lock: self })
    }

    fn unlock(&self) {
        let next = {
            let mut s = self.state();
            s.locked = false;
            s.waiters.pop_front()
        };
        if let Some(w) = next {
            w.wake();
        }
    }

    /// The value, for a caller that owns the lock exclusively (`&mut self`).
    pub fn get_mut(&mut self) -> &mut T {
        self.value.get_mut()
    }
}

pub struct LockFuture<'a, T> {
    lock: &'a AsyncLock<T>,
    id: u64,
    queued: bool,
}

impl<'a, T> Future for LockFuture<'a, T> {
    type Output = AsyncLockGuard<'a, T>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let lock = self.lock;
        let id = self.id;
        let mut s = lock.state();
        if !s.locked {
            s.locked = true;
            if let Some(i) = s.waiters.iter().position(|w| w.id == id) {
                s.waiters.remove(i);
            }
            drop(s);
            self.queued = false;
            return Poll::Ready(AsyncLockGuard { lock });
        }
        if let Some(w) = s.waiters.iter_mut().find(|w| w.id == id) {
            w.waker = cx.waker().clone();
        } else {
            s.waiters.push_back(Waiter {
                id,
                waker: cx.waker().clone(),
                wake_fd: crate::io::current_wake_fd(),
            });
        }
        drop(s);
        self.queued = true;
        Poll::Pending
    }
}

impl<T> Drop for LockFuture<'_, T> {
    fn drop(&mut self) {
        if !self.queued {
            return;
        }
        // Dropped while waiting. If we were already handed a wake-up but
        // never took the lock, pass the wake-up on.
        let next = {
            let mut s = self.lock.state();
            if let Some(i) = s.waiters.iter().position(|w| w.id == self.id) {
                s.waiters.remove(i);
                None
            } else if !s.locked {
                s.waiters.pop_front()
            } else {
                None
            }
        };
        if let Some(w) = next {
            w.wake();
        }
    }
}

pub struct AsyncLockGuard<'a, T> {
    lock: &'a AsyncLock<T>,
}

impl<T> Deref for AsyncLockGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the guard is the only holder of the lock.
        unsafe { &*self.lock.value.get() }
    }
}

impl<T> DerefMut for AsyncLockGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: the guard is the only holder of the lock.
        unsafe { &mut *self.lock.value.get() }
    }
}

impl<T> Drop for AsyncLockGuard<'_, T> {
    fn drop(&mut self) {
        self.lock.unlock();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hands_over_between_threads() {
        let lock = Arc::new(AsyncLock::new(0u64));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let lock = lock.clone();
                std::thread::spawn(move || {
                    for _ in 0..2000 {
                        futures::executor::block_on(async {
                            let mut g = lock.lock().await;
                            let v = *g;
                            std::thread::yield_now();
                            *g = v + 1;
                        });
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(*futures::executor::block_on(lock.lock()), 8000);
    }

    #[test]
    fn dropped_waiter_passes_the_wakeup_on() {
        let lock = AsyncLock::new(());
        let g = lock.try_lock().unwrap();
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let mut a = Box::pin(lock.lock());
        assert!(a.as_mut().poll(&mut cx).is_pending());
        drop(g);
        drop(a);
        assert!(lock.try_lock().is_some());
    }
}

/// A one-shot signal from one task to others, on any iothread.
#[derive(Default)]
struct Signal {
    fired: bool,
    waiter: Option<(Waker, Option<Arc<EventFd>>)>,
}

/// Fires a [`Wait`] when dropped.
pub struct Notifier(Arc<Mutex<Signal>>);

/// Resolves when its [`Notifier`] is dropped.
pub struct Wait(Arc<Mutex<Signal>>);

pub fn signal() -> (Notifier, Wait) {
    let s = Arc::new(Mutex::new(Signal::default()));
    (Notifier(s.clone()), Wait(s))
}

impl Drop for Notifier {
    fn drop(&mut self) {
        let w = {
            let mut s = self.0.lock().unwrap_or_else(|e| e.into_inner());
            s.fired = true;
            s.waiter.take()
        };
        if let Some((waker, fd)) = w {
            waker.wake();
            if let Some(fd) = fd {
                let _ = fd.write(1);
            }
        }
    }
}

impl Future for Wait {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if s.fired {
            return Poll::Ready(());
        }
        s.waiter = Some((cx.waker().clone(), crate::io::current_wake_fd()));
        Poll::Pending
    }
}
