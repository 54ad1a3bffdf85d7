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

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost_user_backend::VringEpollHandler;
use vmm_sys_util::epoll::EventSet;

use super::connection::{new_timer, ring_entries, VhostUserBlk};
use super::threads::{lock, thread_name, Swap};
use crate::io::{EngineKind, PreparedRing};

type Handler = VringEpollHandler<Arc<VhostUserBlk>>;

/// How long a move waits for a thread to hand over: it does so at its
/// next event, which the move's wake-up makes at once.
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(10);

/// The current connection, as a move needs it.
pub(super) struct Current {
    blk: Arc<VhostUserBlk>,
    handlers: Vec<Arc<Handler>>,
}

impl Current {
    pub(super) fn new(blk: Arc<VhostUserBlk>, handlers: Vec<Arc<Handler>>) -> Self {
        Current { blk, handlers }
    }
}

impl Swap for Current {
    fn threads(&self) -> usize {
        self.handlers.len()
    }

    fn replace(&self, t: usize, iothread: Option<&str>) -> Result<(), String> {
        match self.handlers.get(t) {
            Some(h) => self.replace_thread(t, h, iothread),
            None => Ok(()),
        }
    }

    fn end(&self) {
        for h in &self.handlers {
            h.send_exit_event();
        }
        self.blk.moves.join_all();
    }
}

impl Current {
    /// Replaces thread `t` with a new one named after `iothread`.
    fn replace_thread(
        &self,
        t: usize,
        handler: &Arc<Handler>,
        iothread: Option<&str>,
    ) -> Result<(), String> {
        let blk = &self.blk;
        let id = &blk.export.config.id;
        let m = &blk.moves;
        // What the new thread needs is made first: a failure here leaves
        // the old thread serving.
        let ring = match blk.export.engine {
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
        lock(&blk.export.threads.tids)[t] = 0;
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
