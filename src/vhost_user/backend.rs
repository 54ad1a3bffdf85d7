//! The vhost-user backend of one connection, and the export state that
//! outlives connections.
//!
//! Locking: per-connection fields are atomics or mutexes taken only by the
//! vhost-user control thread (memory, backend channel, ring hand-over). The
//! I/O path touches only the per-queue drain counters (atomics) and the
//! vring's own lock, which is per queue.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use std::os::fd::AsRawFd;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::Backend;
use vhost_user_backend::{ShutdownHandle, VhostUserBackend, VringRwLock};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

use super::notify::ConfigNotifier;
use super::{sigbus, worker};
use crate::block::{BlockBackend, DrainCounter};
use crate::config::ExportConfig;
use crate::io::{EngineKind, PreparedRing};
use crate::virtio_blk::{
    self, DeviceConfig, DeviceParams, GuestMem, Limits, MemGuard, WRITEBACK_OFFSET,
};
use std::os::unix::ffi::OsStrExt;

pub type Vring = VringRwLock<GuestMemoryAtomic<GuestMem>>;

/// Longest a queue stop or device reset waits for requests in flight.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);
/// Submission queue entries of each iothread's io_uring.
const RING_ENTRIES: u32 = 256;

/// Parked requests (`stop` policy) that shutdown failed instead of retrying.
#[derive(Clone, Debug, Default)]
pub struct Dropped {
    /// Writes, flushes, discards and write-zeroes: data the guest meant to
    /// store and that is not in the image.
    pub writes: u64,
    pub write_bytes: u64,
    /// Lowest offset and highest end of the dropped writes.
    pub first: Option<u64>,
    pub end: u64,
    pub reads: u64,
}

/// The part of an export that lives across connections.
pub struct ExportState {
    pub config: ExportConfig,
    pub blk: Arc<BlockBackend>,
    pub engine: EngineKind,
    /// Drained sections open on this export: while above zero, no new
    /// request is popped.
    quiesce: AtomicUsize,
    /// Requests popped and not yet returned, over every queue.
    in_flight: DrainCounter,
    /// Requests completed per queue (query-blockstats extension).
    queue_requests: Vec<AtomicU64>,
    /// Stopped by the `stop` error policy (holding one quiesce reference).
    stopped: AtomicBool,
    /// Bumped by `cont`: parked requests retry.
    resume_gen: AtomicU64,
    /// Bumped when parked requests must give up (disconnect, shutdown).
    abort_gen: AtomicU64,
    /// Set at shutdown: a request the `stop` policy would park fails at once.
    closing: AtomicBool,
    /// Parked requests shutdown gave up on.
    dropped: Mutex<Dropped>,
    /// Wakes the current connection's iothreads (one eventfd each), so that
    /// they look at their rings again when a drained section ends: the
    /// guest's kicks were consumed while the export was quiesced.
    wakers: Mutex<Vec<EventFd>>,
    /// The current connection's backend channel, for config-change notices.
    notifier: Mutex<Option<Arc<ConfigNotifier>>>,
    /// The name the export's listening socket is bound to.
    listener_name: Mutex<Vec<u8>>,
}

impl ExportState {
    pub fn new(config: ExportConfig, blk: Arc<BlockBackend>, engine: EngineKind) -> Self {
        blk.set_write_cache(!config.writethrough);
        let queue_requests = (0..config.num_queues).map(|_| AtomicU64::new(0)).collect();
        ExportState {
            config,
            blk,
            engine,
            quiesce: AtomicUsize::new(0),
            in_flight: DrainCounter::default(),
            queue_requests,
            stopped: AtomicBool::new(false),
            resume_gen: AtomicU64::new(0),
            abort_gen: AtomicU64::new(0),
            closing: AtomicBool::new(false),
            dropped: Mutex::new(Dropped::default()),
            wakers: Mutex::new(Vec::new()),
            notifier: Mutex::new(None),
            listener_name: Mutex::new(Vec::new()),
        }
    }

    pub fn is_quiesced(&self) -> bool {
        self.quiesce.load(Ordering::Acquire) > 0
    }

    /// Stops popping new requests; requests already popped complete. For
    /// shutdown, which never ends the section.
    pub fn quiesce(&self) {
        self.quiesce.fetch_add(1, Ordering::AcqRel);
    }

    /// Opens a drained section: no new request is popped, and on return
    /// every request popped before has completed (or `timeout` passed, in
    /// which case false is returned and the section is open all the same).
    pub fn drained_begin(&self, timeout: Duration) -> bool {
        self.quiesce.fetch_add(1, Ordering::AcqRel);
        self.with_throttling_off(|| self.in_flight.wait_idle(timeout))
    }

    /// Runs `f` with the I/O limits below this export off, so that a drain
    /// never waits behind a limit (QEMU disables throttling during drain);
    /// requests already throttled go at once.
    pub fn with_throttling_off<R>(&self, f: impl FnOnce() -> R) -> R {
        let members = self.blk.node().throttle_members();
        for (g, m) in &members {
            g.disable(m);
        }
        let r = f();
        for (g, m) in &members {
            g.enable(m);
        }
        r
    }

    /// Closes a drained section; the last one lets the queues run again.
    pub fn drained_end(&self) {
        if self.quiesce.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.wake_iothreads();
        }
    }

    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }

    /// The (resume, abort) generations a parked request waits to change.
    pub(super) fn park_state(&self) -> (u64, u64) {
        (
            self.resume_gen.load(Ordering::Acquire),
            self.abort_gen.load(Ordering::Acquire),
        )
    }

    /// The `stop` policy: no new requests are popped until `resume`.
    pub(super) fn stop_on_error(&self) {
        if !self.stopped.swap(true, Ordering::AcqRel) {
            self.quiesce.fetch_add(1, Ordering::AcqRel);
            log::warn!(
                "export {}: stopped after an I/O error; `cont` resumes it",
                self.config.id
            );
        }
    }

    /// `cont`: parked requests are retried and the queues run again.
    /// Returns whether the export was stopped.
    pub fn resume(&self) -> bool {
        if !self.stopped.swap(false, Ordering::AcqRel) {
            return false;
        }
        self.resume_gen.fetch_add(1, Ordering::AcqRel);
        log::info!("export {}: resumed", self.config.id);
        self.drained_end();
        true
    }

    /// Parked requests fail with an I/O error and the export is no longer
    /// stopped: its frontend is going away, or the daemon is.
    pub fn abort_parked(&self) {
        self.abort_gen.fetch_add(1, Ordering::AcqRel);
        if self.stopped.swap(false, Ordering::AcqRel) {
            self.drained_end();
        }
        // Always: drained_end wakes only when the last section ends, and
        // shutdown holds one open (the parked requests then waited out the
        // 30 s drain).
        self.wake_iothreads();
    }

    /// Shutdown: parked requests fail now, and none parks from now on
    /// (the closing flag is set before the abort generation moves, so a
    /// request that read the old generation sees the flag).
    pub fn abort_parked_for_shutdown(&self) {
        self.closing.store(true, Ordering::SeqCst);
        self.abort_parked();
    }

    pub(super) fn is_closing(&self) -> bool {
        self.closing.load(Ordering::SeqCst)
    }

    /// Records a request shutdown gave up on (failed to the guest).
    pub(super) fn note_dropped(&self, kind: &crate::virtio_blk::RequestKind, write: bool) {
        use crate::virtio_blk::RequestKind;
        let (offset, bytes) = match kind {
            RequestKind::Read { offset, data } | RequestKind::Write { offset, data } => {
                (Some(*offset), data.len())
            }
            RequestKind::Discard { ranges } | RequestKind::WriteZeroes { ranges } => (
                ranges.iter().map(|r| r.offset).min(),
                ranges.iter().fold(0u64, |a, r| a.saturating_add(r.len)),
            ),
            RequestKind::Flush | RequestKind::GetId { .. } => (None, 0),
        };
        let mut d = self.dropped.lock().unwrap_or_else(|e| e.into_inner());
        if !write {
            d.reads = d.reads.saturating_add(1);
            return;
        }
        d.writes = d.writes.saturating_add(1);
        d.write_bytes = d.write_bytes.saturating_add(bytes);
        if let Some(o) = offset {
            d.first = Some(d.first.map_or(o, |f| f.min(o)));
            d.end = d.end.max(o.saturating_add(bytes));
        }
    }

    /// The parked requests shutdown gave up on.
    pub fn dropped(&self) -> Dropped {
        self.dropped
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn wake_iothreads(&self) {
        for w in self.wakers.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = w.write(1);
        }
    }

    /// Tells the connected frontend (if any) that the config space changed,
    /// e.g. the capacity after a resize.
    pub fn notify_config_change(&self) {
        let n = self
            .notifier
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        match n {
            Some(n) => match n.notify() {
                Ok(()) => log::info!(
                    "export {}: config change sent to the frontend",
                    self.config.id
                ),
                Err(e) => log::warn!(
                    "export {}: cannot send a config change: {e}",
                    self.config.id
                ),
            },
            None => log::debug!(
                "export {}: no backend channel for a config change",
                self.config.id
            ),
        }
    }

    pub(super) fn set_notifier(&self, n: Option<Arc<ConfigNotifier>>) {
        *self.notifier.lock().unwrap_or_else(|e| e.into_inner()) = n;
    }

    pub(super) fn set_listener_name(&self, name: Vec<u8>) {
        *self.listener_name.lock().unwrap_or_else(|e| e.into_inner()) = name;
    }

    pub(crate) fn set_wakers(&self, wakers: Vec<EventFd>) {
        *self.wakers.lock().unwrap_or_else(|e| e.into_inner()) = wakers;
    }

    pub fn in_flight(&self) -> &DrainCounter {
        &self.in_flight
    }

    /// Requests completed on each queue since the export started.
    pub fn queue_requests(&self) -> Vec<u64> {
        self.queue_requests
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    }

    pub(super) fn count_completions(&self, queue: u16, n: u64) {
        if let Some(c) = self.queue_requests.get(usize::from(queue)) {
            c.fetch_add(n, Ordering::Relaxed);
        }
    }

    pub fn read_only(&self) -> bool {
        !self.config.writable
    }

    /// The device parameters for the node's current size.
    pub fn params(&self) -> DeviceParams {
        let c = &self.config;
        let lbs = c.logical_block_size;
        let seg_max = (u32::from(c.queue_size).saturating_sub(2)).clamp(1, 1022);
        // Largest discard / write-zeroes range: 1 GiB, in sectors.
        let max_range_sectors = (1u32 << 30) / 512;
        DeviceParams {
            capacity_bytes: self.blk.size() / u64::from(lbs) * u64::from(lbs),
            logical_block_size: lbs,
            physical_block_size: lbs.max(self.blk.node().request_alignment()),
            num_queues: c.num_queues,
            seg_max,
            size_max: 1 << 20,
            max_discard_sectors: max_range_sectors,
            max_discard_seg: 32,
            max_write_zeroes_sectors: max_range_sectors,
            max_write_zeroes_seg: 32,
            write_zeroes_may_unmap: true,
            read_only: self.read_only(),
        }
    }

    /// What requests are checked against: the device's parameters.
    pub fn limits(&self) -> Limits {
        self.params()
    }

    /// Queue-to-thread masks: queue q is served by thread q % threads.
    pub fn queues_per_thread(&self) -> Vec<u64> {
        let threads = self.config.num_iothreads;
        let mut masks = vec![0u64; threads];
        for q in 0..usize::from(self.config.num_queues) {
            masks[q % threads] |= 1 << q;
        }
        masks
    }
}

/// The backend of one vhost-user connection.
pub struct VhostUserBlk {
    pub(super) export: Arc<ExportState>,
    mem: RwLock<Option<GuestMemoryAtomic<GuestMem>>>,
    writeback: AtomicBool,
    /// Requests in flight per queue, for GET_VRING_BASE.
    pub(super) queues: Vec<DrainCounter>,
    /// io_urings prepared for each iothread, taken on its first event.
    rings: Vec<Mutex<Option<PreparedRing>>>,
    /// One wake-up eventfd per iothread (see ExportState::drained_end).
    wakers: Vec<Arc<EventFd>>,
    /// One timerfd per iothread, for I/O limits; taken on its first event.
    timers: Vec<Mutex<Option<TimerFd>>>,
    backend_req: Mutex<Option<Backend>>,
    /// The frontend is gone (or broke the protocol): nothing more is popped.
    closed: AtomicBool,
    /// The guest-memory regions this connection mapped, registered with the
    /// SIGBUS handler.
    mapped: Mutex<sigbus::Mapped>,
    /// Set by the SIGBUS handler when the frontend's memory vanished under
    /// an access: the connection's requests fail and it ends.
    poisoned: Arc<AtomicBool>,
    /// The last memory table accepted, restored when an update is refused.
    accepted: Mutex<Option<GuestMem>>,
    /// Ends this connection from an iothread.
    shutdown: Mutex<Option<ShutdownHandle>>,
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
        let writeback = !export.config.writethrough;
        export.blk.set_write_cache(writeback);
        let wakers = (0..threads)
            .map(|_| EventFd::new(EFD_NONBLOCK).map(Arc::new))
            .collect::<io::Result<Vec<_>>>()?;
        let mut timers = Vec::with_capacity(threads);
        for _ in 0..threads {
            let t = TimerFd::new()?;
            // Non-blocking: a re-armed timer may have nothing to read.
            // SAFETY: fcntl on a descriptor we own changes only its flags.
            unsafe {
                let fd = t.as_raw_fd();
                let flags = libc::fcntl(fd, libc::F_GETFL);
                libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
            }
            timers.push(Mutex::new(Some(t)));
        }
        let mapped = sigbus::Mapped::new();
        Ok(VhostUserBlk {
            export,
            mem: RwLock::new(None),
            writeback: AtomicBool::new(writeback),
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
        })
    }

    /// The connection ended: the iothreads pop no more requests (the kick
    /// eventfds stay registered until the daemon object is dropped).
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        for w in &self.wakers {
            let _ = w.write(1);
        }
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
        *self.shutdown.lock().unwrap_or_else(|e| e.into_inner()) = h;
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
            .map(|m| m.memory())
    }

    fn config(&self) -> DeviceConfig {
        DeviceConfig {
            params: self.export.params(),
            writeback: self.writeback.load(Ordering::Relaxed),
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

    fn set_writeback(&self, on: bool) {
        let was = self.writeback.swap(on, Ordering::Relaxed);
        self.export.blk.set_write_cache(on);
        if was && !on {
            // Writes completed while the cache was on must be durable once
            // the guest sees write-through.
            if let Err(e) = futures::executor::block_on(self.export.blk.flush()) {
                log::warn!(
                    "export {}: flush on switch to write-through failed: {e}",
                    self.export.config.id
                );
            }
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

impl VhostUserBackend for VhostUserBlk {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        usize::from(self.export.config.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.export.config.queue_size)
    }

    fn features(&self) -> u64 {
        virtio_blk::device_features(self.export.read_only())
            | vhost::vhost_user::message::VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::RESET_DEVICE
            | VhostUserProtocolFeatures::BACKEND_REQ
    }

    fn reset_device(&self) {
        // The library has unregistered every kick; wait for what was popped.
        self.drain_all();
        let default = !self.export.config.writethrough;
        self.writeback.store(default, Ordering::Relaxed);
        self.export.blk.set_write_cache(default);
        log::debug!("export {}: device reset", self.export.config.id);
    }

    fn set_event_idx(&self, _enabled: bool) {
        // The library sets EVENT_IDX on each vring; the worker reads it there.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        // An empty reply tells the frontend the read failed.
        self.config().read(offset, size).unwrap_or_default()
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        if offset as usize == WRITEBACK_OFFSET && buf.len() == 1 {
            self.set_writeback(buf[0] != 0);
            return Ok(());
        }
        log::debug!(
            "export {}: refused config write at offset {offset} length {}",
            self.export.config.id,
            buf.len()
        );
        Err(io::Error::from_raw_os_error(libc::EPERM))
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMem>) -> io::Result<()> {
        // Requests hold a snapshot (an Arc) of the memory they were parsed
        // against, so old mappings live until those requests complete.
        let mut mapped = self.mapped.lock().unwrap_or_else(|e| e.into_inner());
        let new = mem.memory();
        let checked = mapped.add(&new);
        drop(new);
        let mut accepted = self.accepted.lock().unwrap_or_else(|e| e.into_inner());
        let result = match checked {
            Ok(()) => {
                *accepted = Some((*mem.memory()).clone());
                Ok(())
            }
            Err(e) => {
                // The library put the new table in place already (the rings
                // see it too): put the last good one back. The frontend gets
                // a failure and the connection ends.
                log::warn!(
                    "export {}: {e}; memory update refused",
                    self.export.config.id
                );
                let good = accepted.clone().unwrap_or_default();
                mem.lock().unwrap_or_else(|e| e.into_inner()).replace(good);
                Err(io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))
            }
        };
        *self.mem.write().unwrap_or_else(|e| e.into_inner()) = Some(mem);
        mapped.sweep();
        result
    }

    fn set_backend_req_fd(&self, backend: Backend) {
        *self.backend_req.lock().unwrap_or_else(|e| e.into_inner()) = Some(backend);
        let name = self
            .export
            .listener_name
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let notifier = ConfigNotifier::find(std::ffi::OsStr::from_bytes(&name)).map(Arc::new);
        self.export.set_notifier(notifier);
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        self.export.queues_per_thread()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // GET_VRING_BASE: the ring is no longer ready, so nothing new is
        // popped; answer once what was popped is back on the used ring.
        if let Some(c) = self.queues.get(queue_index as usize) {
            if c.get() > 0 && self.export.is_stopped() {
                self.export.abort_parked();
            }
            if !self
                .export
                .with_throttling_off(|| c.wait_idle(DRAIN_TIMEOUT))
            {
                log::error!(
                    "export {}: queue {queue_index} stopped with {} requests still in flight",
                    self.export.config.id,
                    c.get()
                );
            }
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        // Never return an error: the library would end the worker thread.
        worker::handle_event(self, device_event, vrings, thread_id);
        Ok(())
    }
}
