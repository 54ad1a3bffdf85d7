//! A value that management code replaces while no request uses it (inside
//! a drained section), and that the I/O path reads with one atomic load,
//! without writing to a shared cache line.
//!
//! A replaced value must outlive the references taken before the
//! replacement, and no longer: kept for as long as the `Swap` lives, every
//! replaced edge kept its old node (the open image file, its caches) for
//! as long as the parent lived, so a graph that changes every day
//! (snapshot, commit, mirror) collected them all (found by scripts/soak.py:
//! three image files stayed open per cycle of changes).
//!
//! Values are replaced inside a drained section of the nodes whose
//! requests read them, by a monitor command or a job's graph change, both
//! with the command lock held ([`RetireScope`]). A reference taken on the
//! I/O path lives as long as its request, and every request that could
//! read the old value completed before the replacement (drains also wait
//! for the jobs working on the nodes to rest). Management code borrows
//! within the command; job threads borrow outside it only the edges they
//! own, which no command replaces. So a value replaced under the command
//! lock is dropped when the lock is released. A value replaced without it
//! (set-up, unit tests) is kept until the next replacement.

use std::cell::RefCell;
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::Mutex;

pub struct Swap<T> {
    cur: AtomicPtr<T>,
    /// The value replaced last outside a [`RetireScope`].
    retired: Mutex<Option<Box<T>>>,
}

// SAFETY: a Swap owns its values (boxed); sharing it shares `&T` (needs
// T: Sync) and replacing moves a T in from another thread (needs T: Send).
unsafe impl<T: Send + Sync> Send for Swap<T> {}
// SAFETY: as above.
unsafe impl<T: Send + Sync> Sync for Swap<T> {}

thread_local! {
    /// Values replaced while this thread holds the command lock: (depth of
    /// the scopes open, the values), dropped when the outermost closes.
    static RETIRED: RefCell<(u32, Vec<Box<dyn Send>>)> = const { RefCell::new((0, Vec::new())) };
}

/// Held with the command lock (`State::command_lock`): the values that
/// [`Swap::replace`] retires meanwhile are dropped when it is dropped
/// (declare it before the lock guard, so that they go first).
pub struct RetireScope(());

impl RetireScope {
    pub fn enter() -> RetireScope {
        RETIRED.with(|r| r.borrow_mut().0 += 1);
        RetireScope(())
    }
}

impl Drop for RetireScope {
    fn drop(&mut self) {
        let done = RETIRED.with(|r| {
            let mut r = r.borrow_mut();
            r.0 = r.0.saturating_sub(1);
            if r.0 == 0 {
                std::mem::take(&mut r.1)
            } else {
                Vec::new()
            }
        });
        // Dropped outside the borrow: a node's drop may replace values of
        // its own (and writes out its caches).
        drop(done);
    }
}

impl<T: Send + 'static> Swap<T> {
    pub fn new(v: T) -> Self {
        Swap {
            cur: AtomicPtr::new(Box::into_raw(Box::new(v))),
            retired: Mutex::new(None),
        }
    }

    pub fn get(&self) -> &T {
        // SAFETY: `cur` always points to a live box we own. A replaced box
        // lives until the command that replaced it releases the command
        // lock (or, replaced without it, until the next replacement); as
        // the module documentation explains, no reference taken before a
        // replacement is used after that.
        unsafe { &*self.cur.load(Ordering::Acquire) }
    }

    /// Installs `v`. The old value stays alive until the command lock is
    /// released (or, without it, until the next replacement). Callers hold
    /// every reader of the value in a drained section (see the module
    /// documentation).
    pub fn replace(&self, v: T) {
        let new = Box::into_raw(Box::new(v));
        let old = self.cur.swap(new, Ordering::AcqRel);
        // SAFETY: `old` came from Box::into_raw and is no longer current.
        let old = unsafe { Box::from_raw(old) };
        let old = RETIRED.with(|r| {
            let mut r = r.borrow_mut();
            if r.0 > 0 {
                r.1.push(old);
                None
            } else {
                Some(old)
            }
        });
        if let Some(old) = old {
            let older = self
                .retired
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .replace(old);
            // Dropped outside the lock (a node's drop writes out caches).
            drop(older);
        }
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
    use std::sync::Arc;

    #[test]
    fn old_references_stay_valid_after_a_replace() {
        let s = Swap::new(String::from("a"));
        let old = s.get();
        s.replace(String::from("b"));
        assert_eq!(old, "a");
        assert_eq!(s.get(), "b");
    }

    #[test]
    fn without_a_scope_a_value_is_dropped_at_the_second_replacement_after_it() {
        // Before: every replaced value lived as long as the Swap (an edge
        // kept every node it ever pointed to, with its open image file).
        let first = Arc::new(1);
        let s = Swap::new(first.clone());
        s.replace(Arc::new(2));
        assert_eq!(Arc::strong_count(&first), 2, "kept after one replacement");
        s.replace(Arc::new(3));
        assert_eq!(Arc::strong_count(&first), 1, "dropped at the next one");
        let second = Arc::downgrade(&Arc::clone(s.get()));
        s.replace(Arc::new(4));
        s.replace(Arc::new(5));
        assert!(second.upgrade().is_none(), "no value piles up");
        assert_eq!(**s.get(), 5);
    }

    #[test]
    fn in_a_scope_replaced_values_live_until_it_closes() {
        let first = Arc::new(1);
        let s = Swap::new(first.clone());
        let outer = RetireScope::enter();
        let old = s.get();
        s.replace(Arc::new(2));
        {
            let _inner = RetireScope::enter();
            s.replace(Arc::new(3));
        }
        // The inner scope is not the outermost: nothing is dropped yet.
        assert_eq!(**old, 1);
        assert_eq!(Arc::strong_count(&first), 2);
        drop(outer);
        assert_eq!(Arc::strong_count(&first), 1, "dropped with the scope");
        assert_eq!(**s.get(), 3);
        // Nothing was kept in the Swap itself.
        assert!(s.retired.lock().unwrap().is_none());
    }
}
