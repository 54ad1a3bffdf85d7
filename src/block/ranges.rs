//! A table of byte ranges in flight: a request that must not overlap
//! another (a copy-on-read copy and a guest write, a job's copy and a
//! guest write it must not race) takes its range and waits while an
//! overlapping one is held. QEMU marks such requests serialising.
//!
//! The table is a short list under a mutex taken only to look and to
//! insert or remove; waiting is async (the waiter's iothread is woken
//! when the range it waits for is released).

use std::sync::Mutex;

use crate::io::lock::{self, Notifier};

struct Range {
    id: u64,
    start: u64,
    end: u64,
    /// Dropped (waking their waiters) when the range is released.
    waiters: Vec<Notifier>,
}

#[derive(Default)]
struct Ranges {
    next: u64,
    list: Vec<Range>,
}

#[derive(Default)]
pub struct RangeLock {
    ranges: Mutex<Ranges>,
}

/// Holds a range; released (waking waiters) on drop.
pub struct RangeGuard<'a> {
    lock: &'a RangeLock,
    id: u64,
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut r = self.lock.lock();
        if let Some(i) = r.list.iter().position(|x| x.id == self.id) {
            r.list.remove(i);
        }
    }
}

impl RangeLock {
    fn lock(&self) -> std::sync::MutexGuard<'_, Ranges> {
        self.ranges.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes `[start, end)` once no overlapping range is held.
    pub async fn take(&self, start: u64, end: u64) -> RangeGuard<'_> {
        loop {
            let wait = {
                let mut r = self.lock();
                match r.list.iter_mut().find(|x| x.start < end && start < x.end) {
                    Some(busy) => {
                        let (n, w) = lock::signal();
                        busy.waiters.push(n);
                        w
                    }
                    None => {
                        r.next += 1;
                        let id = r.next;
                        r.list.push(Range {
                            id,
                            start,
                            end,
                            waiters: Vec::new(),
                        });
                        return RangeGuard { lock: self, id };
                    }
                }
            };
            wait.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;

    #[test]
    fn overlapping_ranges_wait_and_disjoint_ones_do_not() {
        let l = RangeLock::default();
        futures::executor::block_on(async {
            let a = l.take(0, 100).await;
            let _b = l.take(100, 200).await;
            let mut waiting = Box::pin(l.take(50, 150));
            let waker = futures::task::noop_waker();
            let mut cx = std::task::Context::from_waker(&waker);
            assert!(waiting.as_mut().poll(&mut cx).is_pending());
            drop(a);
            drop(_b);
            assert!(waiting.as_mut().poll(&mut cx).is_ready());
        });
    }
}
