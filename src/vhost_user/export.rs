//! The part of an export that lives across connections: its drained
//! sections, the `stop` error policy's parking, its counters and device
//! parameters. Shared by the server, each connection's backend and its
//! iothreads.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

use super::notify::ConfigNotifier;
use crate::block::{BlockBackend, DrainCounter};
use crate::config::ExportConfig;
use crate::io::EngineKind;
use crate::virtio_blk::{DeviceParams, Limits};

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
    pub(super) listener_name: Mutex<Vec<u8>>,
    /// The write cache a new connection and a device reset start with:
    /// the `writethrough` option, changed at run time by
    /// x-block-export-set-writethrough (a migration destination takes the
    /// guest's choice from the source this way).
    writethrough: AtomicBool,
    /// The iothread objects the export's threads run as now, the poll
    /// window they take, the current connection's threads
    /// (x-blockdev-set-iothread, threads.rs and iothread.rs).
    pub(super) threads: super::threads::Threads,
}

impl ExportState {
    pub fn new(config: ExportConfig, blk: Arc<BlockBackend>, engine: EngineKind) -> Self {
        blk.set_write_cache(!config.writethrough);
        let queue_requests = (0..config.num_queues).map(|_| AtomicU64::new(0)).collect();
        ExportState {
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
            writethrough: AtomicBool::new(config.writethrough),
            threads: super::threads::Threads::new(&config),
            config,
        }
    }

    /// The iothread objects the export's threads run as (empty: none).
    pub fn iothreads(&self) -> Vec<String> {
        self.threads.names()
    }

    /// The ids of the current connection's threads that have started.
    pub fn thread_ids(&self) -> Vec<i32> {
        self.threads.ids()
    }

    /// The poll window of threads that start now.
    pub(super) fn poll_max_ns(&self) -> u64 {
        self.threads.poll_max_ns()
    }

    /// The server's new connection (its threads exist from now on); the
    /// previous one, if any, has ended.
    pub(super) fn set_current(&self, c: Box<dyn super::threads::Swap>) {
        self.threads.set_current(c);
    }

    /// The connection ends: no move reaches it from now on (one under way
    /// finishes first), and the threads that replaced the library's end.
    pub(super) fn end_current(&self) {
        self.threads.end_current();
    }

    /// Runs the export as iothread objects `names` (empty: none) with poll
    /// window `poll_max_ns`: the current connection's threads are replaced
    /// by new ones (iothread.rs). The caller holds the export in a drained
    /// section with nothing in flight.
    pub fn move_to(&self, names: Vec<String>, poll_max_ns: u64) -> Result<(), String> {
        self.threads.move_to(names, poll_max_ns)
    }

    /// The write cache new connections and device resets start with.
    pub fn default_writeback(&self) -> bool {
        !self.writethrough.load(Ordering::Relaxed)
    }

    /// Whether the device's write cache is on now (the guest's choice, or
    /// the default).
    pub fn writeback(&self) -> bool {
        self.blk.write_cache()
    }

    /// Switches the device's write cache. Writes completed while it was on
    /// are flushed when it goes off: the guest, told write-through, counts
    /// them durable.
    pub fn set_writeback(&self, on: bool) -> Result<(), crate::block::BlockError> {
        let was = self.blk.swap_write_cache(on);
        if was && !on {
            futures::executor::block_on(self.blk.flush())?;
        }
        Ok(())
    }

    /// x-block-export-set-writethrough: the new default, applied to the
    /// device now too (the guest's config space reads it from here).
    pub fn set_writethrough(&self, on: bool) -> Result<(), crate::block::BlockError> {
        self.writethrough.store(on, Ordering::Relaxed);
        self.set_writeback(!on)
    }

    pub fn is_quiesced(&self) -> bool {
        self.quiesce.load(Ordering::SeqCst) > 0
    }

    /// Stops popping new requests; requests already popped complete. For
    /// shutdown, which never ends the section.
    pub fn quiesce(&self) {
        self.quiesce.fetch_add(1, Ordering::SeqCst);
    }

    /// Opens a drained section: no new request is popped, and on return
    /// every request popped before has completed (or `timeout` passed, in
    /// which case false is returned and the section is open all the same).
    pub fn drained_begin(&self, timeout: Duration) -> bool {
        self.quiesce.fetch_add(1, Ordering::SeqCst);
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
        if self.quiesce.fetch_sub(1, Ordering::SeqCst) == 1 {
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
            self.quiesce.fetch_add(1, Ordering::SeqCst);
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
