//! x-blockdev-set-iothread: which iothread objects an export's threads run
//! as, and moving them to others at run time.
//!
//! An export's worker threads are its own (one per `num-iothreads`, queue
//! q on thread q % n); an iothread object gives them its name ("IO io0",
//! as QEMU names its iothreads) and its `poll-max-ns`. Moving the export
//! replaces each thread with a new one, inside a drained section:
//!
//! ```text
//! monitor thread (State::set_iothread)        thread t (old)
//!   new ring + timerfd prepared
//!   retire[t] = true, wake t  --------------> next event (backend.rs):
//!                                               its Worker dropped (ring and
//!                                               timerfd closed), error returned:
//!                                               the library's loop and the
//!   <--------------------------- retired(t)     thread end
//!   ring + timerfd into t's epoll set and slots
//!   spawn "IO <id>" (class Iothread): the same handler's loop, its
//!   vrings, kick fds and wake-up fd as they were
//! drained_end wakes every thread: the new ones serve the queues.
//! ```
//!
//! Nothing is in flight across the move (the drain waited for it), so no
//! request, lock waiter or throttled request belongs to the old thread.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vhost_user_backend::VringEpollHandler;
use vmm_sys_util::epoll::EventSet;

use super::connection::{new_timer, ring_entries, VhostUserBlk};
use super::export::ExportState;
use crate::config::ExportConfig;
use crate::io::{EngineKind, PreparedRing};

type Handler = VringEpollHandler<Arc<VhostUserBlk>>;

/// How long a move waits for a thread to hand over: it does so at its
/// next event, which the move's wake-up makes at once.
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(10);

/// The name of a thread running as iothread object `id` (QEMU's "IO id";
/// Linux keeps 15 bytes of it), or of an unbound one (the library's).
fn thread_name(id: Option<&str>) -> String {
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

/// The current connection, as a move needs it.
pub(super) struct Current {
    blk: Arc<VhostUserBlk>,
    handlers: Vec<Arc<Handler>>,
}

/// An export's threads and the iothread objects they run as.
pub(super) struct Threads {
    /// The objects named: thread t runs as `names[t % len]`; empty: as
    /// none (the export's own threads; QEMU's main context).
    names: Mutex<Vec<String>>,
    /// The poll window of threads that start from now on.
    poll_max_ns: AtomicU64,
    /// The current connection. Held for a whole move, and by the server
    /// when the connection ends.
    current: Mutex<Option<Current>>,
    /// Each thread's id (gettid) once it took its first event; 0 before.
    tids: Mutex<Vec<i32>>,
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
    retire: Vec<AtomicBool>,
    retired: Mutex<Vec<bool>>,
    cv: Condvar,
    threads: Mutex<Vec<JoinHandle<()>>>,
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

    fn join_all(&self) {
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
pub(super) fn on_event(export: &ExportState, t: usize) {
    if STARTED.with(|s| s.replace(true)) {
        return;
    }
    // SAFETY: gettid has no arguments and cannot fail.
    let tid = unsafe { libc::gettid() };
    if let Some(x) = lock(&export.threads.tids).get_mut(t) {
        *x = tid;
    }
    let names = lock(&export.threads.names);
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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ExportState {
    /// The iothread objects the export's threads run as (empty: none).
    pub fn iothreads(&self) -> Vec<String> {
        lock(&self.threads.names).clone()
    }

    /// The ids of the current connection's threads that have started.
    pub fn thread_ids(&self) -> Vec<i32> {
        lock(&self.threads.tids)
            .iter()
            .copied()
            .filter(|&t| t != 0)
            .collect()
    }

    /// The poll window of threads that start now.
    pub(super) fn poll_max_ns(&self) -> u64 {
        self.threads.poll_max_ns.load(Ordering::Relaxed)
    }

    /// The server's new connection (its threads exist from now on); the
    /// previous one, if any, has ended.
    pub(super) fn set_current(&self, blk: Arc<VhostUserBlk>, handlers: Vec<Arc<Handler>>) {
        self.end_current();
        *lock(&self.threads.current) = Some(Current { blk, handlers });
    }

    /// The connection ends: no move reaches it from now on (one under way
    /// finishes first), and the threads that replaced the library's end.
    pub(super) fn end_current(&self) {
        let Some(c) = lock(&self.threads.current).take() else {
            return;
        };
        for h in &c.handlers {
            h.send_exit_event();
        }
        c.blk.moves.join_all();
        lock(&self.threads.tids).iter_mut().for_each(|t| *t = 0);
    }

    /// Runs the export as iothread objects `names` (empty: none) with poll
    /// window `poll_max_ns`: the current connection's threads are replaced
    /// by new ones. The caller holds the export in a drained section with
    /// nothing in flight.
    pub fn move_to(&self, names: Vec<String>, poll_max_ns: u64) -> Result<(), String> {
        let current = lock(&self.threads.current);
        *lock(&self.threads.names) = names.clone();
        self.threads
            .poll_max_ns
            .store(poll_max_ns, Ordering::Relaxed);
        let Some(c) = current.as_ref() else {
            // No connection: its threads start bound.
            return Ok(());
        };
        for (t, handler) in c.handlers.iter().enumerate() {
            let name = (!names.is_empty()).then(|| names[t % names.len()].as_str());
            self.replace_thread(c, t, handler, name)?;
        }
        Ok(())
    }

    /// Replaces thread `t` of connection `c` with a new one named after
    /// `iothread`.
    fn replace_thread(
        &self,
        c: &Current,
        t: usize,
        handler: &Arc<Handler>,
        iothread: Option<&str>,
    ) -> Result<(), String> {
        let id = &self.config.id;
        let blk = &c.blk;
        let m = &blk.moves;
        // What the new thread needs is made first: a failure here leaves
        // the old thread serving.
        let ring = match self.engine {
            EngineKind::IoUring => {
                Some(new_ring().map_err(|e| format!("export {id}: cannot make an io_uring: {e}"))?)
            }
            EngineKind::Sync => None,
        };
        let timer = new_timer().map_err(|e| format!("export {id}: cannot make a timerfd: {e}"))?;
        // Hand over: the old thread drops its worker at its next event.
        lock(&m.retired)[t] = false;
        m.retire[t].store(true, Ordering::Release);
        if let Some(w) = blk.waker(t) {
            let _ = w.write(1);
        }
        let deadline = Instant::now() + HANDOVER_TIMEOUT;
        let mut retired = lock(&m.retired);
        while !retired[t] {
            let now = Instant::now();
            if now >= deadline {
                // Taking the flag back decides: if the thread took it
                // first, it is handing over and says so soon.
                if m.retire[t]
                    .compare_exchange(true, false, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
                {
                    return Err(format!(
                        "export {id}: iothread {t} did not hand over its queues within {HANDOVER_TIMEOUT:?}"
                    ));
                }
                retired = m.cv.wait(retired).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            retired =
                m.cv.wait_timeout(retired, deadline - now)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
        }
        drop(retired);
        // The old thread is gone from the epoll set's users; its ring and
        // timerfd were closed with its worker.
        let ok = (|| -> std::io::Result<()> {
            if let Some(r) = &ring {
                handler.register_listener(
                    r.eventfd(),
                    EventSet::IN,
                    u64::from(blk.io_event_id()),
                )?;
            }
            handler.register_listener(
                std::os::fd::AsRawFd::as_raw_fd(&timer),
                EventSet::IN,
                u64::from(blk.timer_event_id()),
            )
        })();
        *lock(&blk.rings[t]) = ring;
        *lock(&blk.timers[t]) = Some(timer);
        lock(&self.threads.tids)[t] = 0;
        let h = handler.clone();
        let spawned = ok.and_then(|()| {
            crate::sandbox::spawn(
                crate::sandbox::Class::Iothread,
                thread_name(iothread),
                move || {
                    // Ends at the connection's exit event, or when moved
                    // again (an error from our handle_event).
                    let _ = h.run();
                },
            )
        });
        match spawned {
            Ok(j) => {
                let mut threads = lock(&m.threads);
                threads.retain(|j| !j.is_finished());
                threads.push(j);
                Ok(())
            }
            Err(e) => {
                // Nothing serves these queues now: end the connection (the
                // frontend reconnects to threads made afresh).
                blk.end_connection(&format!("iothread {t} could not be replaced: {e}"));
                Err(format!("export {id}: cannot start a thread: {e}"))
            }
        }
    }
}

/// A ring for a new thread. The kernel frees a closed ring's memory
/// asynchronously and counts it against the locked-memory limit until
/// then, so moves back to back can meet ENOMEM for a moment (a test making
/// hundreds of moves a second did): retried for up to a second.
fn new_ring() -> std::io::Result<PreparedRing> {
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        match PreparedRing::new(ring_entries()) {
            Err(e) if e.raw_os_error() == Some(libc::ENOMEM) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            r => return r,
        }
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
