//! A value that management code replaces while no request uses it (inside
//! a drained section), and that the I/O path reads with one atomic load,
//! without writing to a shared cache line.
//!
//! Replaced values are kept until the `Swap` is dropped: a management
//! thread may still hold a reference taken before the replacement.

use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::Mutex;

pub struct Swap<T> {
    cur: AtomicPtr<T>,
    retired: Mutex<Vec<Box<T>>>,
}

// SAFETY: a Swap owns its values (boxed); sharing it shares `&T` (needs
// T: Sync) and replacing moves a T in from another thread (needs T: Send).
unsafe impl<T: Send + Sync> Send for Swap<T> {}
// SAFETY: as above.
unsafe impl<T: Send + Sync> Sync for Swap<T> {}

impl<T> Swap<T> {
    pub fn new(v: T) -> Self {
        Swap {
            cur: AtomicPtr::new(Box::into_raw(Box::new(v))),
            retired: Mutex::new(Vec::new()),
        }
    }

    pub fn get(&self) -> &T {
        // SAFETY: `cur` always points to a live box we own; a replaced box
        // is kept in `retired` until `self` drops, so the reference stays
        // valid for as long as `&self` does.
        unsafe { &*self.cur.load(Ordering::Acquire) }
    }

    /// Installs `v`; the old value stays alive until the Swap drops.
    pub fn replace(&self, v: T) {
        let new = Box::into_raw(Box::new(v));
        let old = self.cur.swap(new, Ordering::AcqRel);
        // SAFETY: `old` came from Box::into_raw and is no longer current.
        let old = unsafe { Box::from_raw(old) };
        self.retired
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(old);
    }
}

impl<T> Drop for Swap<T> {
    fn drop(&mut self) {
        // SAFETY: `cur` came from Box::into_raw and nothing else owns it.
        drop(unsafe { Box::from_raw(*self.cur.get_mut()) });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_references_stay_valid_after_a_replace() {
        let s = Swap::new(String::from("a"));
        let old = s.get();
        s.replace(String::from("b"));
        assert_eq!(old, "a");
        assert_eq!(s.get(), "b");
    }
}
