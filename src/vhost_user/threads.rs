//! An export's threads as iothread objects see them (x-blockdev-set-iothread):
//! the objects they run as, their poll window, their ids, the current
//! connection's side of a move ([`Moves`]) and, behind [`Swap`], the
//! connection whose threads a move replaces (iothread.rs implements it, on
//! top of the connection). This file depends on neither the export nor the
//! connection, so both can hold its parts.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::thread::JoinHandle;

use crate::config::ExportConfig;

/// The name of a thread running as iothread object `id` (QEMU's "IO id";
/// Linux keeps 15 bytes of it), or of an unbound one (the library's).
pub(super) fn thread_name(id: Option<&str>) -> String {
    match id {
        Some(id) => {
            let mut n = format!("IO {id}");
            let mut end = n.len().min(15);
            while !n.is_char_boundary(end) {
                end -= 1;
            }
            n.truncate(end);
            n
        }
        None => "vring_worker".to_string(),
    }
}

/// The current connection, as a move needs it: its threads, replaced one
/// by one, and its end.
pub(super) trait Swap: Send {
    /// How many worker threads the connection has.
    fn threads(&self) -> usize;
    /// Replaces thread `t` with a new one running as iothread object
    /// `iothread` (None: none), inside the caller's drained section.
    fn replace(&self, t: usize, iothread: Option<&str>) -> Result<(), String>;
    /// The connection ends: the threads that replaced the library's end.
    fn end(&self);
}

/// An export's threads and the iothread objects they run as.
pub(super) struct Threads {
    /// The objects named: thread t runs as `names[t % len]`; empty: as
    /// none (the export's own threads; QEMU's main context).
    pub(super) names: Mutex<Vec<String>>,
    /// The poll window of threads that start from now on.
    pub(super) poll_max_ns: AtomicU64,
    /// The current connection. Held for a whole move, and by the server
    /// when the connection ends.
    current: Mutex<Option<Box<dyn Swap>>>,
    /// Each thread's id (gettid) once it took its first event; 0 before.
    pub(super) tids: Mutex<Vec<i32>>,
}

impl Threads {
    pub(super) fn new(c: &ExportConfig) -> Self {
        Threads {
            names: Mutex::new(c.iothreads.clone()),
            poll_max_ns: AtomicU64::new(c.poll_max_ns),
            current: Mutex::new(None),
            tids: Mutex::new(vec![0; c.num_iothreads]),
        }
    }
}

/// A connection's side of moves: which thread must hand over, which did,
/// and the threads that replaced the library's.
pub(super) struct Moves {
    pub(super) retire: Vec<AtomicBool>,
    pub(super) retired: Mutex<Vec<bool>>,
    pub(super) cv: Condvar,
    pub(super) threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Moves {
    pub(super) fn new(threads: usize) -> Self {
        Moves {
            retire: (0..threads).map(|_| AtomicBool::new(false)).collect(),
            retired: Mutex::new(vec![false; threads]),
            cv: Condvar::new(),
            threads: Mutex::new(Vec::new()),
        }
    }

    /// On thread `t`, at each event: whether it must hand over now (it
    /// then does, and says so with [`Moves::retired`]). Only once `idle`
    /// says it has nothing in flight: a request it popped just as the
    /// drain began (after its look at the quiesce counter, before it
    /// counted the request) completes here first. Taking the flag decides:
    /// a move that gave up waiting took it back first.
    pub(super) fn must_retire(&self, t: usize, idle: impl FnOnce() -> bool) -> bool {
        self.retire.get(t).is_some_and(|r| {
            r.load(Ordering::Relaxed)
                && idle()
                && r.compare_exchange(true, false, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
        })
    }

    /// Thread `t` dropped its worker and is about to end.
    pub(super) fn retired(&self, t: usize) {
        let mut r = self.retired.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(x) = r.get_mut(t) {
            *x = true;
        }
        self.cv.notify_all();
    }

    pub(super) fn join_all(&self) {
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        for t in threads {
            let _ = t.join();
        }
    }
}

thread_local! {
    /// This thread took its first event.
    static STARTED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// On worker thread `t`, at each event: the first one records the thread's
/// id and names it after the iothread object it runs as.
pub(super) fn on_event(threads: &Threads, t: usize) {
    if STARTED.with(|s| s.replace(true)) {
        return;
    }
    // SAFETY: gettid has no arguments and cannot fail.
    let tid = unsafe { libc::gettid() };
    if let Some(x) = lock(&threads.tids).get_mut(t) {
        *x = tid;
    }
    let names = lock(&threads.names);
    if names.is_empty() {
        return;
    }
    let name = thread_name(Some(&names[t % names.len()]));
    drop(names);
    if let Ok(c) = std::ffi::CString::new(name) {
        // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16
        // bytes (the name is cut to 15) and names the calling thread.
        unsafe { libc::prctl(libc::PR_SET_NAME, c.as_ptr()) };
    }
}

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Threads {
    /// The iothread objects the export's threads run as (empty: none).
    pub(super) fn names(&self) -> Vec<String> {
        lock(&self.names).clone()
    }

    /// The ids of the current connection's threads that have started.
    pub(super) fn ids(&self) -> Vec<i32> {
        lock(&self.tids)
            .iter()
            .copied()
            .filter(|&t| t != 0)
            .collect()
    }

    /// The poll window of threads that start now.
    pub(super) fn poll_max_ns(&self) -> u64 {
        self.poll_max_ns.load(Ordering::Relaxed)
    }

    /// The server's new connection (its threads exist from now on); the
    /// previous one, if any, has ended.
    pub(super) fn set_current(&self, c: Box<dyn Swap>) {
        self.end_current();
        *lock(&self.current) = Some(c);
    }

    /// The connection ends: no move reaches it from now on (one under way
    /// finishes first), and the threads that replaced the library's end.
    pub(super) fn end_current(&self) {
        let Some(c) = lock(&self.current).take() else {
            return;
        };
        c.end();
        lock(&self.tids).iter_mut().for_each(|t| *t = 0);
    }

    /// Runs the threads as iothread objects `names` (empty: none) with
    /// poll window `poll_max_ns`: the current connection's threads are
    /// replaced by new ones. The caller holds the export in a drained
    /// section with nothing in flight.
    pub(super) fn move_to(&self, names: Vec<String>, poll_max_ns: u64) -> Result<(), String> {
        let current = lock(&self.current);
        *lock(&self.names) = names.clone();
        self.poll_max_ns.store(poll_max_ns, Ordering::Relaxed);
        let Some(c) = current.as_ref() else {
            // No connection: its threads start bound.
            return Ok(());
        };
        for t in 0..c.threads() {
            let name = (!names.is_empty()).then(|| names[t % names.len()].as_str());
            c.replace(t, name)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_names_are_qemus_cut_to_what_linux_keeps() {
        assert_eq!(thread_name(Some("io0")), "IO io0");
        assert_eq!(thread_name(Some("a-long-iothread-name")), "IO a-long-iothr");
        assert_eq!(thread_name(Some("ééééééé")).len(), 15);
        assert_eq!(thread_name(None), "vring_worker");
    }
}
