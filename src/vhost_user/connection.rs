//! The per-connection state of one vhost-user frontend: its guest
//! memory, iothread rings, wake-up and timer fds, and backend channel.
//!
//! Locking: per-connection fields are atomics or mutexes taken only by the
//! vhost-user control thread (memory, backend channel, ring hand-over). The
//! I/O path touches only the per-queue drain counters (atomics) and the
//! vring's own lock, which is per queue.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use std::os::fd::AsRawFd;
use vhost::vhost_user::Backend;
use vhost_user_backend::{ShutdownHandle, VringRwLock};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

use super::dirty_log::LogState;
use super::export::ExportState;
use super::inflight::Region;
use super::sigbus;
use crate::block::DrainCounter;
use crate::io::{EngineKind, PreparedRing};
use crate::virtio_blk::{DeviceConfig, GuestMem, MemGuard};

pub type Vring = VringRwLock<GuestMemoryAtomic<GuestMem>>;

/// Longest a queue stop or device reset waits for requests in flight.
pub(super) const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);
/// Submission queue entries of each iothread's io_uring.
const RING_ENTRIES: u32 = 256;

/// The backend of one vhost-user connection.
pub struct VhostUserBlk {
    pub(super) export: Arc<ExportState>,
    pub(super) mem: RwLock<Option<GuestMemoryAtomic<GuestMem>>>,
    /// Moves after every memory table update, once the new table is in
    /// place and before the frontend hears back: the iothreads keep their
    /// memory snapshot until it moves (worker.rs, MemCache).
    pub(super) mem_gen: AtomicU64,
    /// Requests in flight per queue, for GET_VRING_BASE.
    pub(super) queues: Vec<DrainCounter>,
    /// io_urings prepared for each iothread, taken on its first event.
    pub(super) rings: Vec<Mutex<Option<PreparedRing>>>,
    /// One wake-up eventfd per iothread (see ExportState::drained_end).
    wakers: Vec<Arc<EventFd>>,
    /// One timerfd per iothread, for I/O limits; taken on its first event.
    pub(super) timers: Vec<Mutex<Option<TimerFd>>>,
    pub(super) backend_req: Mutex<Option<Backend>>,
    /// The frontend is gone (or broke the protocol): nothing more is popped.
    closed: AtomicBool,
    /// The guest-memory regions this connection mapped, registered with the
    /// SIGBUS handler.
    pub(super) mapped: Mutex<sigbus::Mapped>,
    /// Set by the SIGBUS handler when the frontend's memory vanished under
    /// an access: the connection's requests fail and it ends.
    poisoned: Arc<AtomicBool>,
    /// The last memory table accepted, restored when an update is refused.
    pub(super) accepted: Mutex<Option<GuestMem>>,
    /// Ends this connection from an iothread.
    shutdown: Mutex<Option<ShutdownHandle>>,
    /// The connection must end, but had no shutdown handle yet.
    end_pending: AtomicBool,
    /// The inflight buffer (GET/SET_INFLIGHT_FD), if the frontend set one.
    pub(super) inflight: Mutex<Option<Arc<Region>>>,
    /// Bumped when `inflight` changes: the iothreads then take the new
    /// buffer and look at their queues' regions before popping.
    pub(super) inflight_gen: AtomicU32,
    /// The dirty log of live migration (SET_LOG_BASE, LOG_ALL).
    pub(super) dirty: Arc<LogState>,
    /// Its threads being replaced (x-blockdev-set-iothread, iothread.rs).
    pub(super) moves: super::threads::Moves,
}

/// An iothread's timerfd, for I/O limits.
pub(super) fn new_timer() -> io::Result<TimerFd> {
    let t = TimerFd::new()?;
    // Non-blocking: a re-armed timer may have nothing to read.
    // SAFETY: fcntl on a descriptor we own changes only its flags.
    unsafe {
        let fd = t.as_raw_fd();
        let flags = libc::fcntl(fd, libc::F_GETFL);
        libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
    }
    Ok(t)
}

/// The io_uring entries of an iothread's ring.
pub(super) const fn ring_entries() -> u32 {
    RING_ENTRIES
}

impl VhostUserBlk {
    pub fn new(export: Arc<ExportState>) -> io::Result<Self> {
        let threads = export.config.num_iothreads;
        let mut rings = Vec::with_capacity(threads);
        for _ in 0..threads {
            let ring = match export.engine {
                EngineKind::IoUring => Some(PreparedRing::new(RING_ENTRIES)?),
                EngineKind::Sync => None,
            };
            rings.push(Mutex::new(ring));
        }
        let queues = (0..export.config.num_queues)
            .map(|_| DrainCounter::default())
            .collect();
        // A new connection starts with the export's default (a reconnect
        // of the same guest included: QEMU does not send its choice again).
        export.blk.set_write_cache(export.default_writeback());
        let wakers = (0..threads)
            .map(|_| EventFd::new(EFD_NONBLOCK).map(Arc::new))
            .collect::<io::Result<Vec<_>>>()?;
        let mut timers = Vec::with_capacity(threads);
        for _ in 0..threads {
            timers.push(Mutex::new(Some(new_timer()?)));
        }
        let mapped = sigbus::Mapped::new();
        Ok(VhostUserBlk {
            export,
            mem: RwLock::new(None),
            mem_gen: AtomicU64::new(0),
            queues,
            rings,
            wakers,
            timers,
            backend_req: Mutex::new(None),
            closed: AtomicBool::new(false),
            poisoned: mapped.poison_flag(),
            mapped: Mutex::new(mapped),
            accepted: Mutex::new(None),
            shutdown: Mutex::new(None),
            end_pending: AtomicBool::new(false),
            inflight: Mutex::new(None),
            inflight_gen: AtomicU32::new(0),
            dirty: Arc::default(),
            moves: super::threads::Moves::new(threads),
        })
    }

    /// The connection ended: the iothreads pop no more requests (the kick
    /// eventfds stay registered until the daemon object is dropped).
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.wake_iothreads();
    }

    /// Whether the iothreads must pop nothing more: the connection ended,
    /// or its guest memory vanished under an access.
    pub(super) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire) || self.poisoned.load(Ordering::Relaxed)
    }

    /// The flag the SIGBUS handler sets for this connection.
    pub(super) fn poison_flag(&self) -> Arc<AtomicBool> {
        self.poisoned.clone()
    }

    /// Lets the iothreads end this connection (see `end_poisoned`).
    pub fn set_shutdown(&self, h: Option<ShutdownHandle>) {
        let mut slot = self.shutdown.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(h) = &h {
            if self.end_pending.load(Ordering::Acquire) {
                h.shutdown();
            }
        }
        *slot = h;
    }

    /// Ends the connection because the frontend went beyond a limit
    /// (`why` says which and by how much); from the control thread, in a
    /// callback that has no error to return. If the connection's shutdown
    /// handle is not set yet, it ends as soon as it is.
    pub(super) fn end_connection(&self, why: &str) {
        log::warn!(
            "export {}: {why}; ending the connection",
            self.export.config.id
        );
        let h = self.shutdown.lock().unwrap_or_else(|e| e.into_inner());
        match h.as_ref() {
            Some(h) => h.shutdown(),
            None => self.end_pending.store(true, Ordering::Release),
        }
    }

    /// Ends the connection once its guest memory turned out to be gone
    /// (the frontend truncated it): its requests fail, the daemon and the
    /// other exports go on.
    pub(super) fn end_poisoned(&self) {
        if !self.poisoned.load(Ordering::Relaxed) || self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        log::warn!(
            "export {}: the frontend's memory vanished under an access (its file was \
             truncated); ending the connection",
            self.export.config.id
        );
        if let Some(h) = self
            .shutdown
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            h.shutdown();
        }
    }

    /// The event id of the iothreads' wake-up eventfd.
    pub fn wake_event_id(&self) -> u16 {
        self.export.config.num_queues + 2
    }

    /// The event id of the iothreads' timerfd.
    pub fn timer_event_id(&self) -> u16 {
        self.export.config.num_queues + 3
    }

    /// Thread `t`'s timerfd, to register with its epoll.
    pub fn timer_fd(&self, t: usize) -> Option<std::os::fd::RawFd> {
        self.timers[t]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|t| t.as_raw_fd())
    }

    pub(super) fn take_timer(&self, t: usize) -> Option<TimerFd> {
        self.timers
            .get(t)?
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// Thread `t`'s wake-up eventfd, to register with its epoll.
    pub fn wake_eventfd(&self, t: usize) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.wakers[t].as_raw_fd()
    }

    /// Thread `t`'s wake-up eventfd, for other threads that make its tasks
    /// ready.
    pub(super) fn waker(&self, t: usize) -> Option<Arc<EventFd>> {
        self.wakers.get(t).cloned()
    }

    /// Wakes every iothread of the connection (they look at the memory
    /// generation, the drained state and parked requests when they wake).
    pub(super) fn wake_iothreads(&self) {
        for w in &self.wakers {
            let _ = w.write(1);
        }
    }

    pub(super) fn clear_wake(&self, t: usize) {
        if let Some(w) = self.wakers.get(t) {
            let _ = w.read();
        }
    }

    /// Hands the export clones of this connection's wake-up eventfds.
    pub fn publish_wakers(&self) -> io::Result<()> {
        let clones = self
            .wakers
            .iter()
            .map(|w| w.try_clone())
            .collect::<io::Result<Vec<_>>>()?;
        self.export.set_wakers(clones);
        Ok(())
    }

    /// The event id of the iothreads' io_uring eventfd: above the ids the
    /// library reserves for queues and the exit event.
    pub fn io_event_id(&self) -> u16 {
        self.export.config.num_queues + 1
    }

    /// The eventfd of thread `t`'s ring, to register with its epoll.
    pub fn ring_eventfd(&self, t: usize) -> Option<std::os::fd::RawFd> {
        self.rings[t]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|r| r.eventfd())
    }

    pub(super) fn take_ring(&self, t: usize) -> Option<PreparedRing> {
        self.rings
            .get(t)?
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    pub(super) fn memory(&self) -> Option<MemGuard> {
        self.mem
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|m| std::rc::Rc::new(m.memory()))
    }

    pub(super) fn config(&self) -> DeviceConfig {
        DeviceConfig {
            params: self.export.params(),
            writeback: self.export.writeback(),
        }
    }

    /// Waits until every request popped from every queue has completed
    /// (requests parked by the `stop` policy fail).
    pub fn drain_all(&self) -> bool {
        self.export.abort_parked();
        self.export.with_throttling_off(|| self.drain_queues())
    }

    fn drain_queues(&self) -> bool {
        let mut ok = true;
        for (q, c) in self.queues.iter().enumerate() {
            if !c.wait_idle(DRAIN_TIMEOUT) {
                log::error!(
                    "export {}: queue {q} still has {} requests in flight after {:?}",
                    self.export.config.id,
                    c.get(),
                    DRAIN_TIMEOUT
                );
                ok = false;
            }
        }
        ok
    }

    /// Installs the inflight buffer the iothreads track requests in.
    pub(super) fn set_inflight(&self, region: Region) {
        *self.inflight.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(region));
        self.inflight_gen.fetch_add(1, Ordering::AcqRel);
    }

    /// SET_CONFIG of the writeback byte: the guest's choice.
    pub(super) fn set_writeback(&self, on: bool) {
        if let Err(e) = self.export.set_writeback(on) {
            log::warn!(
                "export {}: flush on switch to write-through failed: {e}",
                self.export.config.id
            );
        }
    }
}

impl Drop for VhostUserBlk {
    fn drop(&mut self) {
        // Our own references to the memory go first, so that the regions
        // are unregistered from the SIGBUS handler, then unmapped.
        *self.mem.get_mut().unwrap_or_else(|e| e.into_inner()) = None;
        *self.accepted.get_mut().unwrap_or_else(|e| e.into_inner()) = None;
        self.mapped
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .sweep();
    }
}
