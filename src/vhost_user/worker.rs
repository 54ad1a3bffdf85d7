//! The iothread: one vhost-user-backend worker thread, its io_uring and a
//! local executor for request tasks.
//!
//! ```text
//!   kick ---> pop every available chain (EVENT_IDX: until none is left)
//!               parse --fail--> status, completion
//!               parse --ok----> spawn task (io::Executor): execute on BlockBackend
//!   run: poll tasks -> submit SQEs (one syscall) -> reap CQEs -> repeat
//!   flush: add_used for every completion, one notification per queue
//!   io_uring eventfd ---> reap -> run -> flush
//! ```
//!
//! The worker lives in a thread-local: futures here are not `Send`, and the
//! thread belongs to one connection's daemon, so it never serves two
//! backends.

use std::cell::RefCell;
use std::future::Future;
use std::num::Wrapping;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use vhost_user_backend::{VringState, VringT};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::GuestMemoryAtomic;
use vmm_sys_util::timerfd::TimerFd;

use super::connection::{VhostUserBlk, Vring};
use super::dirty_log::{self, DirtyLog, LogState};
use super::export::ExportState;
use super::inflight::Tracker;
use crate::block::policy::ErrorAction;
use crate::io::{self as aio, Executor, IoCtx};
use crate::virtio_blk::{self, guest, GuestMem, MemGuard, Parsed};

/// One request returned to the used ring.
#[derive(Clone, Copy, Debug)]
struct Completion {
    queue: u16,
    head: u16,
    len: u32,
}

/// Which descriptor heads of one queue are in flight (a head number is a
/// u16, so 65536 bits).
struct HeadSet {
    bits: Vec<u64>,
}

impl HeadSet {
    fn new() -> Self {
        HeadSet {
            bits: vec![0; 1024],
        }
    }

    /// Marks `head` busy; false if it already was.
    fn insert(&mut self, head: u16) -> bool {
        let (w, b) = (usize::from(head) / 64, head % 64);
        let was = self.bits[w] & (1 << b) != 0;
        self.bits[w] |= 1 << b;
        !was
    }

    fn remove(&mut self, head: u16) {
        let (w, b) = (usize::from(head) / 64, head % 64);
        self.bits[w] &= !(1 << b);
    }

    /// How many heads are in flight.
    fn count(&self) -> usize {
        self.bits.iter().map(|w| w.count_ones() as usize).sum()
    }
}

/// Adaptive polling. After a batch the iothread polls its rings and its
/// io_uring for up to `ns` before it sleeps in epoll: a frontend on another
/// CPU that answers within the window finds the iothread awake, and neither
/// its kick nor a wake-up of the iothread's CPU is paid (on this test VM a
/// halted CPU takes about 30 µs to wake, more than a 32-request batch's
/// work; docs/PERFORMANCE.md, "Adaptive polling by default").
///
/// Two rules set the window:
/// - per event, the window follows what happened: it doubles after a
///   polling session that found work, halves after one that found none,
///   and from zero it opens when the thread slept for less than four
///   ceilings (the sleep includes the thread's own wake-up, which polling
///   avoids: a frontend that answers in 20 µs is seen after 50);
/// - per period of `PERIOD` events, the ceiling follows what polling costs:
///   the time spun per batch it found must stay under `BUDGET_NS`, about
///   what sleeping and being woken costs the thread in CPU time, or the
///   ceiling halves (down to off, retried every `RETRY` idle periods);
///   otherwise it doubles back up to `max_ns`. A frontend that answers
///   slowly (QD1 on another CPU: about 60 µs) or only while this thread
///   sleeps (one sharing its CPU, which polling only delays) makes polling
///   cost more than it saves, and it stops.
struct Poller {
    max_ns: u64,
    /// The window's current ceiling (the cost rule), at most `max_ns`.
    cap_ns: u64,
    ns: u64,
    /// Whether the last polling session found work.
    productive: bool,
    /// When the thread last went to sleep.
    slept_at: Option<Instant>,
    /// This period: events, time spun, batches found by polling, and how
    /// many periods in a row polled nothing with the ceiling at zero.
    events: u32,
    spun_ns: u64,
    found: u32,
    idle_periods: u32,
    /// When the contention rule last looked, and the thread's involuntary
    /// context switches then.
    contention_at: Option<Instant>,
    preempted: u64,
}

impl Poller {
    const START_NS: u64 = 4000;
    const PERIOD: u32 = 64;
    const BUDGET_NS: u64 = 20_000;
    const RETRY: u32 = 16;
    /// Involuntary context switches per second above which the thread's
    /// CPU counts as contended (measured: 8/s with the CPU to itself,
    /// 35,000-72,000/s sharing it with the frontend's threads).
    const CONTENDED_PER_S: f64 = 1000.0;
    /// The shortest time the contention rule judges over.
    const CONTENTION_WINDOW: Duration = Duration::from_millis(10);

    fn new(max_ns: u64) -> Self {
        Poller {
            max_ns,
            cap_ns: max_ns,
            ns: 0,
            productive: false,
            slept_at: None,
            events: 0,
            spun_ns: 0,
            found: 0,
            idle_periods: 0,
            contention_at: None,
            preempted: 0,
        }
    }

    /// Called when an event arrives (the thread slept): set the next window.
    fn on_event(&mut self, now: Instant) {
        if self.max_ns == 0 {
            return;
        }
        let slept = self.slept_at.take().map_or(u64::MAX, |t| {
            u64::try_from(now.saturating_duration_since(t).as_nanos()).unwrap_or(u64::MAX)
        });
        self.events += 1;
        if self.events >= Self::PERIOD {
            let contended = self.contended(now, involuntary_switches());
            self.review(contended);
        }
        self.ns = if self.cap_ns == 0 {
            0
        } else if self.productive {
            (self.ns * 2).clamp(Self::START_NS, self.cap_ns)
        } else if self.ns > 0 {
            if self.ns / 2 >= Self::START_NS {
                self.ns / 2
            } else {
                0
            }
        } else if slept < self.cap_ns.saturating_mul(4) {
            // The sleep includes our own wake-up, which polling avoids.
            slept.clamp(Self::START_NS, self.cap_ns)
        } else {
            0
        };
        self.productive = false;
    }

    /// A polling session spun `ns` and then found work (`found`) or gave up.
    fn spun(&mut self, ns: u64, found: bool) {
        self.spun_ns = self.spun_ns.saturating_add(ns);
        if found {
            self.found += 1;
            self.productive = true;
        }
    }

    /// The thread goes to sleep.
    fn sleeping(&mut self, now: Instant) {
        if self.max_ns > 0 {
            self.slept_at = Some(now);
        }
    }

    /// Whether the thread's CPU is contended: the scheduler took it away
    /// from the thread more than `CONTENDED_PER_S` times a second since
    /// the last look (`preempted` is the thread's count of involuntary
    /// context switches now). Judged over at least `CONTENTION_WINDOW`.
    fn contended(&mut self, now: Instant, preempted: u64) -> bool {
        let Some(since) = self.contention_at else {
            self.contention_at = Some(now);
            self.preempted = preempted;
            return false;
        };
        let elapsed = now.saturating_duration_since(since);
        if elapsed < Self::CONTENTION_WINDOW {
            return false;
        }
        let n = preempted.saturating_sub(self.preempted);
        self.contention_at = Some(now);
        self.preempted = preempted;
        n as f64 / elapsed.as_secs_f64() > Self::CONTENDED_PER_S
    }

    /// End of a period: the cost rule, and the contention rule (a thread
    /// that shares its CPU with runnable threads, the frontend's among
    /// them, takes their time when it spins, even where its spinning finds
    /// work: with four queues on two CPUs, polling cost 28 % of the IOPS).
    fn review(&mut self, contended: bool) {
        log::trace!(
            "poller: cap {} ns, window {} ns, spun {} ns for {} found{}",
            self.cap_ns,
            self.ns,
            self.spun_ns,
            self.found,
            if contended { ", CPU contended" } else { "" }
        );
        if contended {
            self.cap_ns = if self.cap_ns / 2 >= Self::START_NS {
                self.cap_ns / 2
            } else {
                0
            };
            self.idle_periods = 0;
        } else if self.spun_ns == 0 && self.found == 0 {
            if self.cap_ns == 0 {
                self.idle_periods += 1;
                if self.idle_periods >= Self::RETRY {
                    self.idle_periods = 0;
                    self.cap_ns = Self::START_NS.min(self.max_ns);
                }
            }
        } else if self.spun_ns / u64::from(self.found.max(1)) > Self::BUDGET_NS {
            self.cap_ns = if self.cap_ns / 2 >= Self::START_NS {
                self.cap_ns / 2
            } else {
                0
            };
            self.idle_periods = 0;
        } else {
            self.cap_ns = (self.cap_ns * 2).clamp(Self::START_NS, self.max_ns);
        }
        self.events = 0;
        self.spun_ns = 0;
        self.found = 0;
    }
}

/// This thread's involuntary context switches so far (0 if unknown).
fn involuntary_switches() -> u64 {
    // SAFETY: getrusage writes a struct rusage, which `ru` is.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; RUSAGE_THREAD reports on the calling thread.
    if unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) } != 0 {
        return 0;
    }
    u64::try_from(ru.ru_nivcsw).unwrap_or(0)
}

/// `process_queue`'s budget meaning "early: a share of what is published".
const EARLY: usize = usize::MAX - 1;

/// When completions go back to the guest: after the whole batch popped
/// ("late", one notification per batch) or in parts while the batch runs
/// ("early"). Which one wins depends on where the guest's vCPU runs, which
/// the daemon cannot see: on the iothread's CPU, early notifications only
/// wake the guest into preempting us (null-co QD128 fell from 1.5x to 0.8x
/// qemu-storage-daemon's IOPS); on another CPU, late ones leave the guest
/// idle until the batch ends and serialise the two (QD32 0.4x late, 1.0x
/// early). So the tuner measures: every `USE` it serves `PROBE` late, then
/// `PROBE` early, and keeps the mode that completed more requests over the
/// last `PAIRS` probe pairs (one 20 ms pair is noisy: a pair that chose late
/// at QD32 with the iothread polling cost its run 10 %). Under a light load
/// both rates are equal and late, the cheaper, is kept.
struct SignalTuner {
    early: bool,
    phase: TunerPhase,
    since: Instant,
    /// Requests completed since `since`.
    done: usize,
    late_rate: f64,
    /// The last probe pairs' (late, early) rates, and how many are set.
    pairs: [(f64, f64); SignalTuner::PAIRS],
    next_pair: usize,
    set_pairs: usize,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum TunerPhase {
    ProbeLate,
    ProbeEarly,
    Use,
}

impl SignalTuner {
    const PROBE: Duration = Duration::from_millis(20);
    const USE: Duration = Duration::from_millis(460);
    const PAIRS: usize = 3;

    fn new() -> Self {
        SignalTuner {
            early: false,
            phase: TunerPhase::ProbeLate,
            since: Instant::now(),
            done: 0,
            late_rate: 0.0,
            pairs: [(0.0, 0.0); Self::PAIRS],
            next_pair: 0,
            set_pairs: 0,
        }
    }

    /// Moves to the next phase when this one is over (called per event).
    fn update(&mut self) {
        let now = aio::now();
        let elapsed = now.saturating_duration_since(self.since);
        let limit = match self.phase {
            TunerPhase::Use => Self::USE,
            _ => Self::PROBE,
        };
        if elapsed < limit {
            return;
        }
        let rate = self.done as f64 / elapsed.as_secs_f64();
        match self.phase {
            TunerPhase::ProbeLate => {
                self.late_rate = rate;
                self.phase = TunerPhase::ProbeEarly;
                self.early = true;
            }
            TunerPhase::ProbeEarly => {
                self.phase = TunerPhase::Use;
                self.pairs[self.next_pair] = (self.late_rate, rate);
                self.next_pair = (self.next_pair + 1) % Self::PAIRS;
                self.set_pairs = (self.set_pairs + 1).min(Self::PAIRS);
                let (late, early) = self.pairs[..self.set_pairs]
                    .iter()
                    .fold((0.0, 0.0), |(l, e), &(pl, pe)| (l + pl, e + pe));
                // A clear win only: measurement noise must not flip modes.
                self.early = early > late * 1.1;
                log::trace!(
                    "signal tuner: late {:.0}/s, early {rate:.0}/s; last {} pairs: late {late:.0}, early {early:.0} -> {}",
                    self.late_rate,
                    self.set_pairs,
                    if self.early { "early" } else { "late" }
                );
            }
            TunerPhase::Use => {
                self.phase = TunerPhase::ProbeLate;
                self.early = false;
            }
        }
        self.since = now;
        self.done = 0;
    }
}

/// This thread's snapshot of the guest memory, and its queues' rings mapped
/// in it. Taking a snapshot (a lock and an arc-swap load) and finding the
/// rings' regions cost as much as a small batch's parsing when the guest
/// polls; so the snapshot is taken again only when the connection's memory
/// generation moved (every memory table update moves it once the new table
/// is in place, before the frontend hears back, and wakes the iothreads so
/// that an idle one does not keep the old mappings alive).
struct MemCache {
    gen: u64,
    mem: Option<MemGuard>,
    /// Per local queue: the ring addresses and size mapped, and the rings.
    rings: Vec<Option<(u64, u64, u16, guest::Rings)>>,
}

impl MemCache {
    fn new(queues: usize) -> Self {
        MemCache {
            gen: 0,
            mem: None,
            rings: vec![None; queues],
        }
    }

    /// Takes a new snapshot if the memory table changed since this one.
    fn refresh(&mut self, blk: &VhostUserBlk) {
        let gen = blk.mem_gen.load(Ordering::Acquire);
        if gen == self.gen && self.mem.is_some() {
            return;
        }
        self.release();
        self.gen = gen;
        // A clone holds the table by its Arc rather than by one of the
        // thread's few arc-swap debt slots.
        self.mem = blk.memory().clone();
    }

    fn release(&mut self) {
        self.mem = None;
        self.rings.fill(None);
    }

    /// Queue `local`'s rings, mapped in the snapshot; None if there is no
    /// snapshot or they are not mappable directly (then the caller uses
    /// virtio-queue's accessors). The copy is valid while the snapshot is
    /// held: the caller holds a clone of it or does not release it.
    fn rings(&mut self, local: usize, q: &virtio_queue::Queue) -> Option<guest::Rings> {
        let mem = self.mem.as_ref()?;
        let key = (q.avail_ring(), q.used_ring(), q.size());
        let slot = self.rings.get_mut(local)?;
        match slot {
            Some((a, u, n, r)) if (*a, *u, *n) == key => Some(*r),
            _ => {
                let r = guest::Rings::map(mem, key.0, key.1, key.2)?;
                *slot = Some((key.0, key.1, key.2, r));
                Some(r)
            }
        }
    }
}

struct Worker {
    poll: Poller,
    /// The guest memory snapshot and mapped rings of this iteration.
    cache: MemCache,
    signal: SignalTuner,
    /// For I/O limits: fires when throttled requests of this thread may go.
    timer: Option<TimerFd>,
    timer_at: Option<Instant>,
    io: IoCtx,
    tasks: Executor,
    done: Rc<RefCell<Vec<Completion>>>,
    /// The export, shared by this thread's tasks through a thread-local Rc:
    /// cloning it per request touches no atomic shared with other queues.
    /// (One extra allocation per connection, on purpose.)
    #[allow(clippy::redundant_allocation)]
    export: Rc<Arc<ExportState>>,
    /// The other completion buffer, swapped with `done` at each flush.
    spare: Vec<Completion>,
    /// Global queue index of each of this thread's vrings.
    queues: Vec<u16>,
    heads: Vec<HeadSet>,
    /// The connection's poison flag (its guest memory vanished under an
    /// access): requests fail from then on. An Rc so tasks share it without
    /// an atomic reference count.
    #[allow(clippy::redundant_allocation)]
    poisoned: Rc<Arc<AtomicBool>>,
    /// The connection's dirty log (live migration), shared with tasks as
    /// `poisoned` is.
    #[allow(clippy::redundant_allocation)]
    dirty: Rc<Arc<LogState>>,
    /// The connection's inflight buffer generation these trackers are of.
    inflight_gen: u32,
    /// Requests the current pop started (counted in flight when it ends).
    started: usize,
    /// Each vring's region of the inflight buffer, if the frontend set one.
    trackers: Vec<Option<Tracker>>,
    /// Vrings whose region has not been looked at since it was set: done
    /// before their first pop (resubmitting what a restart left).
    recover: Vec<bool>,
}

thread_local! {
    static WORKER: RefCell<Option<Worker>> = const { RefCell::new(None) };
}

/// The worker thread ends (its connection is being dropped): requests it
/// popped and never returned are cancelled. Their futures are dropped, the
/// kernel finishes the I/O they submitted, and only then do they stop
/// counting as in flight, so that a drain never waits for a connection that
/// is gone and never runs while the kernel still works for it.
impl Drop for Worker {
    fn drop(&mut self) {
        self.tasks = Executor::new();
        let _ = PARKED.try_with(|p| p.borrow_mut().clear());
        self.io.wait_idle();
        crate::block::stop_deferring();
        let cancelled: usize = self.heads.iter().map(HeadSet::count).sum();
        if cancelled > 0 {
            log::debug!(
                "export {}: {cancelled} requests of a closed connection cancelled",
                self.export.config.id
            );
        }
        self.export.in_flight().sub(cancelled);
    }
}

impl Worker {
    fn new(blk: &VhostUserBlk, thread_id: usize) -> Worker {
        let io = match blk.take_ring(thread_id) {
            Some(ring) => IoCtx::from_ring(ring),
            None => IoCtx::sync(),
        };
        aio::set_current(Some(io.clone()));
        aio::set_current_wake_fd(blk.waker(thread_id));
        let mask = blk
            .export
            .queues_per_thread()
            .get(thread_id)
            .copied()
            .unwrap_or(0);
        let queues: Vec<u16> = (0..64u16).filter(|q| mask & (1 << q) != 0).collect();
        let heads = queues.iter().map(|_| HeadSet::new()).collect();
        let cache = MemCache::new(queues.len());
        let trackers = queues.iter().map(|_| None).collect();
        let recover = vec![false; queues.len()];
        log::debug!(
            "export {}: iothread {thread_id} serves queues {queues:?} with {:?}",
            blk.export.config.id,
            io.kind()
        );
        // SAFETY: the worker holds the export, and so its BlockBackend,
        // until it drops, which stops deferring first.
        unsafe { crate::block::defer_on_this_thread(blk.export.blk.stats()) };
        Worker {
            poll: Poller::new(blk.export.poll_max_ns()),
            cache,
            signal: SignalTuner::new(),
            timer: blk.take_timer(thread_id),
            timer_at: None,
            io,
            tasks: Executor::new(),
            done: Rc::new(RefCell::new(Vec::with_capacity(256))),
            export: Rc::new(blk.export.clone()),
            spare: Vec::with_capacity(256),
            queues,
            heads,
            poisoned: Rc::new(blk.poison_flag()),
            dirty: Rc::new(blk.dirty.clone()),
            inflight_gen: 0,
            started: 0,
            trackers,
            recover,
        }
    }

    /// Takes the connection's inflight buffer if it changed.
    fn sync_inflight(&mut self, blk: &VhostUserBlk) {
        let gen = blk.inflight_gen.load(Ordering::Acquire);
        if gen == self.inflight_gen {
            return;
        }
        self.inflight_gen = gen;
        let region = blk
            .inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for (local, &queue) in self.queues.iter().enumerate() {
            self.trackers[local] = region.as_ref().and_then(|r| r.queue(queue));
            self.recover[local] = self.trackers[local].is_some();
        }
    }

    /// The first look at vring `local`'s inflight region: requests a
    /// restart left in flight are resubmitted in the order they were first
    /// popped, and the next avail index is set past them.
    fn recover_queue(
        &mut self,
        blk: &VhostUserBlk,
        local: usize,
        queue: u16,
        limits: &virtio_blk::Limits,
        state: &mut VringState<GuestMemoryAtomic<GuestMem>>,
    ) {
        self.recover[local] = false;
        let Some(mem) = blk.memory() else {
            return;
        };
        let id = &blk.export.config.id;
        let q = state.get_queue();
        let size = q.size();
        let Some(t) = self.trackers[local].as_mut() else {
            return;
        };
        if size > t.desc_num() {
            log::warn!(
                "export {id}: queue {queue} of size {size} has an inflight region for {} \
                 entries; not tracked",
                t.desc_num()
            );
            self.trackers[local] = None;
            return;
        }
        let used = match q.used_idx(&**mem, Ordering::Acquire) {
            Ok(u) => u.0,
            Err(e) => {
                log::debug!("queue {queue}: cannot read the used index: {e}");
                return;
            }
        };
        let rec = t.recover(used, size);
        if !rec.resumed {
            return;
        }
        // At most `size` heads (a u16).
        let n = u16::try_from(rec.heads.len()).unwrap_or(u16::MAX);
        let said = q.next_avail();
        let next = used.wrapping_add(n);
        state.get_queue_mut().set_next_avail(next);
        if n > 0 || rec.last_batch > 0 || said != next {
            log::info!(
                "export {id}: queue {queue} resumes from the inflight buffer: {n} requests \
                 resubmitted, {} found returned, avail index {next} (the frontend said {said})",
                rec.last_batch
            );
        }
        let (table, qsize) = (state.get_queue().desc_table(), size);
        for head in rec.heads {
            self.start_chain(local, queue, &mem, table, qsize, head, limits, false);
        }
    }

    /// Pops and starts the available requests of this thread's vring
    /// `local`; true if it stopped early to return completions first (the
    /// caller runs and returns what it popped, then calls again).
    fn process_queue(&mut self, blk: &VhostUserBlk, local: usize, vring: &Vring) -> bool {
        let Some(&queue) = self.queues.get(local) else {
            return false;
        };
        // In flight before the look at the quiesce count: a drain that
        // begins after that look waits for this pop and what it starts (a
        // drain that began before it is seen). Without it, a request popped
        // just after a drain found the export idle would run inside the
        // drained section.
        let in_flight = blk.export.in_flight();
        in_flight.inc();
        self.started = 0;
        let mut state = vring.get_mut();
        let more = self.pop_queue(blk, local, queue, &mut state);
        // Under the vring's lock, as the per-queue count's drain (a vring
        // stop) takes it too.
        blk.queues[usize::from(queue)].add(self.started);
        drop(state);
        in_flight.add(self.started);
        in_flight.dec();
        more
    }

    fn pop_queue(
        &mut self,
        blk: &VhostUserBlk,
        local: usize,
        queue: u16,
        state: &mut VringState<GuestMemoryAtomic<GuestMem>>,
    ) -> bool {
        if blk.export.is_quiesced() || blk.is_closed() {
            return false;
        }
        self.cache.refresh(blk);
        if self.cache.mem.is_none() {
            return false;
        }
        let limits = blk.export.limits();
        if !state.is_enabled() || !state.get_queue().ready() {
            return false;
        }
        self.sync_inflight(blk);
        if self.recover[local] {
            self.recover_queue(blk, local, queue, &limits, state);
        }
        let event_idx = state.get_queue().event_idx_enabled();
        let mut budget = if self.signal.early { EARLY } else { usize::MAX };
        loop {
            if event_idx {
                let _ = state.disable_notification();
            }
            while self.pop_published(blk, local, queue, &limits, state, &mut budget) {
                if budget == 0 {
                    // Notifications stay off: the caller comes back at once.
                    return true;
                }
            }
            if !event_idx {
                break;
            }
            match state.enable_notification() {
                Ok(true) => continue,
                _ => break,
            }
        }
        false
    }

    /// Serves queue `local` until it is empty, returning completions to the
    /// guest after each chunk.
    fn serve_queue(&mut self, blk: &VhostUserBlk, local: usize, vrings: &[Vring]) {
        let Some(vring) = vrings.get(local) else {
            return;
        };
        while self.process_queue(blk, local, vring) {
            self.run();
            self.flush(blk, vrings);
        }
    }

    /// Whether queue `local` has chains the guest published that we have
    /// not popped.
    fn has_published(&mut self, blk: &VhostUserBlk, local: usize, vring: &Vring) -> bool {
        if blk.export.is_quiesced() || blk.is_closed() {
            return false;
        }
        self.cache.refresh(blk);
        let state = vring.get_ref();
        let q = state.get_queue();
        if !state.is_enabled() || !q.ready() {
            return false;
        }
        self.avail_idx(local, q)
            .is_some_and(|idx| idx != q.next_avail())
    }

    /// Queue `local`'s avail index, read through the mapped rings where it
    /// can be.
    fn avail_idx(&mut self, local: usize, q: &virtio_queue::Queue) -> Option<u16> {
        if let Some(rings) = self.cache.rings(local, q) {
            return Some(rings.avail_idx());
        }
        let mem = self.cache.mem.as_ref()?;
        match q.avail_idx(&***mem, Ordering::Acquire) {
            Ok(idx) => Some(idx.0),
            Err(e) => {
                log::debug!("cannot read the avail index: {e}");
                None
            }
        }
    }

    /// Polls the rings and the io_uring for up to the poll window, serving
    /// whatever turns up; returns once a whole window passed with nothing.
    fn poll(&mut self, blk: &VhostUserBlk, vrings: &[Vring]) {
        let mut last_work = Instant::now();
        while self.poll.ns > 0 {
            let window = Duration::from_nanos(self.poll.ns);
            let gap = last_work.elapsed();
            let mut work = self.io.in_flight() > 0 && self.io.reap() > 0;
            for (local, vring) in vrings.iter().enumerate() {
                if self.has_published(blk, local, vring) {
                    self.serve_queue(blk, local, vrings);
                    work = true;
                }
            }
            let gap_ns = u64::try_from(gap.as_nanos()).unwrap_or(u64::MAX);
            if work {
                self.poll.spun(gap_ns, true);
                aio::tick();
                self.run();
                self.flush(blk, vrings);
                last_work = Instant::now();
            } else if gap >= window {
                self.poll.spun(gap_ns, false);
                break;
            } else {
                std::hint::spin_loop();
            }
        }
    }

    /// Starts the chains published so far; returns whether there were any.
    ///
    /// The memory generation is looked at *after* the avail index is read,
    /// and only the chains that read counted are taken: the frontend
    /// publishes a chain only after the memory update its buffers need was
    /// acknowledged, and that update is in place, its generation moved,
    /// before the acknowledgement is sent. A snapshot taken earlier and
    /// kept could miss a region added meanwhile.
    fn pop_published(
        &mut self,
        blk: &VhostUserBlk,
        local: usize,
        queue: u16,
        limits: &virtio_blk::Limits,
        state: &mut VringState<GuestMemoryAtomic<GuestMem>>,
        budget: &mut usize,
    ) -> bool {
        let Some(avail) = self.avail_idx(local, state.get_queue()) else {
            return false;
        };
        self.cache.refresh(blk);
        let published = (Wrapping(avail) - Wrapping(state.get_queue().next_avail())).0;
        if *budget == EARLY {
            // Return completions in about sixteen parts of what the guest
            // published.
            *budget = (usize::from(published) / 16).clamp(1, 16);
        }
        let take = usize::from(published).min(*budget);
        if take == 0 {
            return false;
        }
        *budget -= take;
        // A clone (one reference count) that the requests started below
        // clone again: `start_chain` borrows the worker.
        let Some(mem) = self.cache.mem.clone() else {
            return false;
        };
        let q = state.get_queue();
        let (table, size) = (q.desc_table(), q.size());
        if let Some(rings) = self.cache.rings(local, q) {
            let mut next = q.next_avail();
            for _ in 0..take {
                let head = rings.avail_head(next);
                next = next.wrapping_add(1);
                self.start_chain(local, queue, &mem, table, size, head, limits, true);
            }
            state.get_queue_mut().set_next_avail(next);
            return true;
        }
        // Rings we cannot map directly. Iterate ourselves rather than with
        // pop_descriptor_chain, which logs a broken avail index at error
        // level: a guest must not be able to flood the log.
        let iter = match state.get_queue_mut().iter((*mem).clone()) {
            Ok(iter) => iter,
            Err(e) => {
                log::debug!("queue {queue}: cannot read the avail ring: {e}");
                return false;
            }
        };
        for chain in iter.take(take) {
            let head = chain.head_index();
            self.start_chain(local, queue, &mem, table, size, head, limits, true);
        }
        true
    }

    /// Parses and starts the chain at `head`, unless it is already in flight;
    /// with `track`, marks it in flight in the inflight buffer (a
    /// resubmitted head is marked already).
    #[allow(clippy::too_many_arguments)]
    fn start_chain(
        &mut self,
        local: usize,
        queue: u16,
        mem: &virtio_blk::MemGuard,
        table: u64,
        size: u16,
        head: u16,
        limits: &virtio_blk::Limits,
        track: bool,
    ) {
        if !self.heads[local].insert(head) {
            log::debug!("queue {queue}: head {head} made available while in flight; ignored");
            return;
        }
        if track {
            if let Some(t) = self.trackers[local].as_mut() {
                t.popped(head);
            }
        }
        // Counted in flight by `process_queue` once the pop is over (its
        // own count covers the requests until then; none is returned before).
        self.started += 1;
        self.start(
            queue,
            virtio_blk::parse(mem.clone(), table, size, head, limits),
        );
    }

    fn start(&mut self, queue: u16, parsed: Parsed) {
        match parsed {
            Parsed::Failed {
                head,
                status,
                error,
                mem,
            } => {
                log::debug!("queue {queue}: request at head {head} refused: {error}");
                let len = match status {
                    Some(addr) if guest::write_byte(&mem, addr, error.status() as u8) => {
                        dirty_log::mark_byte(&self.dirty, addr);
                        1
                    }
                    _ => 0,
                };
                self.done.borrow_mut().push(Completion { queue, head, len });
            }
            Parsed::Request(req) if self.poisoned.load(Ordering::Relaxed) => {
                // Parsed from memory that vanished (read back as zeroes):
                // not what the guest asked for.
                let len = u32::from(guest::write_byte(
                    &req.mem,
                    req.status,
                    virtio_blk::Status::IoErr as u8,
                ));
                self.done.borrow_mut().push(Completion {
                    queue,
                    head: req.head,
                    len,
                });
            }
            Parsed::Request(req) => {
                let export = self.export.clone();
                let done = self.done.clone();
                let poisoned = self.poisoned.clone();
                let dirty = self.dirty.clone();
                let task = async move {
                    let mut status = run_request(&req, &export).await;
                    if poisoned.load(Ordering::Relaxed) {
                        // Guest memory vanished under the request: its data
                        // may be zeroes rather than what was asked for.
                        status = virtio_blk::Status::IoErr;
                    }
                    let len = if status == virtio_blk::Status::Ok {
                        req.used_len
                    } else {
                        1
                    };
                    let written = guest::write_byte(&req.mem, req.status, status as u8);
                    if let Some(log) = dirty.active() {
                        mark_request(&log, &req, written);
                    }
                    let len = if written { len } else { 0 };
                    done.borrow_mut().push(Completion {
                        queue,
                        head: req.head,
                        len,
                    });
                };
                self.tasks.spawn(task);
            }
        }
    }

    /// Arms the timer for the earliest moment a throttled request of this
    /// thread may go.
    fn arm_timer(&mut self) {
        let Some(at) = crate::throttle::take_local_deadline() else {
            return;
        };
        if self.timer_at.is_some_and(|t| t <= at && t > Instant::now()) {
            return;
        }
        if let Some(t) = self.timer.as_mut() {
            let d = at
                .saturating_duration_since(Instant::now())
                .max(Duration::from_micros(1));
            if t.reset(d, None).is_ok() {
                self.timer_at = Some(at);
            }
        }
    }

    /// Runs tasks and I/O until nothing more can progress without waiting.
    fn run(&mut self) {
        loop {
            self.tasks.run_until_stalled();
            self.io.submit();
            if self.io.reap() == 0 {
                break;
            }
            aio::tick();
        }
    }

    /// Returns completed requests to their used rings; one notification per
    /// queue per batch, as EVENT_IDX allows.
    fn flush(&mut self, blk: &VhostUserBlk, vrings: &[Vring]) {
        // The batch's accounting is in before the guest sees its completions.
        crate::block::publish_deferred();
        // Swap with a kept buffer: taking the Vec would regrow it from
        // empty on every batch.
        let mut done = std::mem::take(&mut self.spare);
        std::mem::swap(&mut done, &mut *self.done.borrow_mut());
        if done.is_empty() {
            self.spare = done;
            return;
        }
        for (local, &queue) in self.queues.iter().enumerate() {
            if !done.iter().any(|c| c.queue == queue) {
                continue;
            }
            let Some(vring) = vrings.get(local) else {
                continue;
            };
            self.cache.refresh(blk);
            let mut state = vring.get_mut();
            let rings = self.cache.rings(local, state.get_queue());
            return_used(
                blk,
                &mut state,
                rings,
                queue,
                &done,
                self.trackers[local].as_ref(),
            );
            drop(state);
            let mut n: usize = 0;
            for c in done.iter().filter(|c| c.queue == queue) {
                n += 1;
                self.heads[local].remove(c.head);
            }
            blk.queues[usize::from(queue)].sub(n);
            blk.export.in_flight().sub(n);
            blk.export
                .count_completions(queue, u64::try_from(n).unwrap_or(u64::MAX));
            self.signal.done += n;
        }
        done.clear();
        self.spare = done;
    }
}

/// Puts `done`'s completions of `queue` on its used ring, publishes them
/// with one store of the used index, and notifies the guest if it asked.
/// With an inflight region, they are linked as its last batch before the
/// index is published and cleared after. `rings` are the queue's rings
/// mapped in the worker's snapshot, if they could be.
fn return_used(
    blk: &VhostUserBlk,
    state: &mut VringState<GuestMemoryAtomic<GuestMem>>,
    rings: Option<guest::Rings>,
    queue: u16,
    done: &[Completion],
    tracker: Option<&Tracker>,
) {
    let q = state.get_queue();
    let size = q.size();
    let mine = || {
        done.iter()
            .filter(move |c| c.queue == queue)
            .filter(move |c| {
                // A head beyond the queue is not a descriptor of it: nothing to
                // return.
                let ok = c.head < size;
                if !ok {
                    log::debug!(
                        "queue {queue}: head {} is beyond the queue size {size}",
                        c.head
                    );
                }
                ok
            })
    };
    let Some(rings) = rings else {
        // add_used publishes each one: batches of one.
        for c in mine() {
            if let Some(t) = tracker {
                t.batch(std::iter::once(c.head));
            }
            let before = state.get_queue().next_used();
            if let Err(e) = state.add_used(c.head, c.len) {
                log::debug!("queue {queue}: cannot return head {}: {e}", c.head);
                continue;
            }
            if let Some(log) = blk.dirty.active() {
                let q = state.get_queue();
                let used = blk.dirty.used_log_addr(queue, q.used_ring());
                mark_used(&log, used, size, before, q.next_used());
                blk.dirty.kick();
            }
            if let Some(t) = tracker {
                t.returned(std::iter::once(c.head), state.get_queue().next_used());
            }
        }
        notify(state, queue);
        return;
    };
    let old = q.next_used();
    let event_idx = q.event_idx_enabled();
    let mut next = old;
    for c in mine() {
        rings.put_used(next, c.head, c.len);
        next = next.wrapping_add(1);
    }
    if next == old {
        return;
    }
    if let Some(t) = tracker {
        t.batch(mine().map(|c| c.head));
    }
    rings.publish_used(next);
    if let Some(log) = blk.dirty.active() {
        mark_used(
            &log,
            blk.dirty.used_log_addr(queue, q.used_ring()),
            size,
            old,
            next,
        );
        blk.dirty.kick();
    }
    if let Some(t) = tracker {
        t.returned(mine().map(|c| c.head), next);
    }
    state.get_queue_mut().set_next_used(next);
    if !event_idx || rings.needs_event(old, next) {
        if let Err(e) = state.signal_used_queue() {
            log::debug!("queue {queue}: cannot signal the guest: {e}");
        }
    }
}

/// Marks in the dirty log what a completed request wrote into guest
/// memory: the data of a read (whatever its status: the kernel may have
/// written part of it), a GET_ID string, and the status byte if `status`.
fn mark_request(log: &DirtyLog, req: &virtio_blk::Request, status: bool) {
    match &req.kind {
        virtio_blk::RequestKind::Read { data, .. } => {
            for iov in data.as_slice() {
                log.mark_host(&req.mem, iov.iov_base as *const u8, iov.iov_len);
            }
        }
        virtio_blk::RequestKind::GetId { data } => {
            for seg in data {
                log.mark(seg.addr.0, seg.len);
            }
        }
        _ => {}
    }
    if status {
        log.mark(req.status.0, 1);
    }
}

/// Marks in the dirty log the used elements `from..to` of a used ring of
/// `size` at guest address `used`, its index field and its avail_event
/// field (EVENT_IDX: the daemon writes it when it re-enables kicks; a
/// stale one on the destination could leave kicks unsent).
fn mark_used(log: &DirtyLog, used: u64, size: u16, from: u16, to: u16) {
    if size == 0 {
        return;
    }
    let mut i = from;
    while i != to {
        let at = 4 + 8 * u64::from(i % size);
        log.mark(used.saturating_add(at), 8);
        i = i.wrapping_add(1);
    }
    log.mark(used.saturating_add(2), 2);
    log.mark(used.saturating_add(4 + 8 * u64::from(size)), 2);
}

fn notify(state: &mut VringState<GuestMemoryAtomic<GuestMem>>, queue: u16) {
    let needed = state.needs_notification().unwrap_or(true);
    if needed {
        if let Err(e) = state.signal_used_queue() {
            log::debug!("queue {queue}: cannot signal the guest: {e}");
        }
    }
}

/// Runs a request, applying the export's error policy to storage failures.
async fn run_request(req: &virtio_blk::Request, export: &Arc<ExportState>) -> virtio_blk::Status {
    use virtio_blk::{IoDirection, Outcome, Status};
    loop {
        let (direction, error) =
            match virtio_blk::execute(req, &export.blk, &export.config.serial).await {
                Outcome::Done(status) => return status,
                Outcome::Failed { direction, error } => (direction, error),
            };
        let errno = error.errno();
        if errno == libc::EFAULT {
            // The kernel could not reach the guest's buffers (memory the
            // frontend truncated): the guest's fault, not the storage's, so
            // no error policy and no BLOCK_IO_ERROR.
            return Status::IoErr;
        }
        let policy = match direction {
            IoDirection::Read => export.config.on_read_error,
            IoDirection::Write => export.config.on_write_error,
        };
        let action = policy.action(errno == libc::ENOSPC);
        let reason = std::io::Error::from_raw_os_error(errno).to_string();
        crate::events::global().emit(
            "BLOCK_IO_ERROR",
            serde_json::json!({
                "device": export.config.id,
                "node-name": export.blk.node().name(),
                "operation": if direction == IoDirection::Read { "read" } else { "write" },
                "action": action.name(),
                "nospace": errno == libc::ENOSPC,
                "reason": reason,
            }),
        );
        match action {
            ErrorAction::Ignore => return Status::Ok,
            ErrorAction::Stop => {
                let (resume, abort) = export.park_state();
                let write = direction == IoDirection::Write;
                if export.is_closing() {
                    // Shutting down: nobody will `cont`.
                    export.note_dropped(&req.kind, write);
                    return Status::IoErr;
                }
                export.stop_on_error();
                match (Parked {
                    export: export.clone(),
                    resume,
                    abort,
                })
                .await
                {
                    ParkEnd::Resume => continue,
                    ParkEnd::Abort => {
                        if export.is_closing() {
                            export.note_dropped(&req.kind, write);
                        }
                        return Status::IoErr;
                    }
                }
            }
            _ => return Status::IoErr,
        }
    }
}

thread_local! {
    /// Requests parked by the `stop` policy on this iothread.
    static PARKED: RefCell<Vec<Waker>> = const { RefCell::new(Vec::new()) };
}

enum ParkEnd {
    Resume,
    Abort,
}

/// Waits for `cont` (retry) or an abort (fail).
struct Parked {
    export: Arc<ExportState>,
    resume: u64,
    abort: u64,
}

impl Future for Parked {
    type Output = ParkEnd;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<ParkEnd> {
        let (resume, abort) = self.export.park_state();
        if abort != self.abort {
            return Poll::Ready(ParkEnd::Abort);
        }
        if resume != self.resume {
            return Poll::Ready(ParkEnd::Resume);
        }
        PARKED.with(|p| p.borrow_mut().push(cx.waker().clone()));
        Poll::Pending
    }
}

/// x-blockdev-set-iothread: this thread hands its queues over to a new
/// one (iothread.rs) and ends. Its worker goes now, ring and timerfd
/// closed; nothing is in flight (the export is drained).
pub fn retire() {
    let _ = WORKER.try_with(|cell| cell.borrow_mut().take());
    aio::set_current(None);
    aio::set_current_wake_fd(None);
}

/// Whether this thread has no request popped and not yet returned (a
/// move hands over only then).
pub fn idle() -> bool {
    WORKER.with(|cell| {
        cell.borrow()
            .as_ref()
            .is_none_or(|w| w.heads.iter().all(|h| h.count() == 0))
    })
}

/// Entry point from `VhostUserBackend::handle_event` on the worker thread.
pub fn handle_event(blk: &VhostUserBlk, device_event: u16, vrings: &[Vring], thread_id: usize) {
    WORKER.with(|cell| {
        let mut slot = cell.borrow_mut();
        let worker = slot.get_or_insert_with(|| Worker::new(blk, thread_id));
        // Lets go of an old memory table at once (a memory update wakes
        // every iothread).
        worker.cache.refresh(blk);
        aio::tick();
        worker.signal.update();
        worker.poll.on_event(Instant::now());
        if device_event == blk.io_event_id() {
            worker.io.clear_event();
            worker.io.reap();
        } else if device_event == blk.timer_event_id() {
            if let Some(t) = worker.timer.as_mut() {
                let _ = t.wait();
            }
            worker.timer_at = None;
            crate::throttle::release_local();
        } else if device_event == blk.wake_event_id() {
            // A drained section ended, or parked requests may go on:
            // requests may wait in every ring.
            blk.clear_wake(thread_id);
            for w in PARKED.with(|p| std::mem::take(&mut *p.borrow_mut())) {
                w.wake();
            }
            for local in 0..vrings.len() {
                worker.serve_queue(blk, local, vrings);
            }
        } else if usize::from(device_event) < vrings.len() {
            worker.serve_queue(blk, usize::from(device_event), vrings);
        }
        worker.run();
        worker.flush(blk, vrings);
        worker.poll(blk, vrings);
        worker.poll.sleeping(Instant::now());
        worker.arm_timer();
        if worker.poisoned.load(Ordering::Relaxed) {
            blk.end_poisoned();
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ends the tuner's current phase as if `done` requests completed in it.
    fn end_phase(t: &mut SignalTuner, done: usize) {
        t.done = done;
        t.since = Instant::now() - SignalTuner::USE - Duration::from_millis(1);
        t.update();
    }

    /// One sleep of `slept_us` ending in an event, then a polling session
    /// that spins `gaps_us` finding work after each, and gives up after
    /// `give_up_us` if given (else it is still finding work: sleeps come
    /// from a session that gave up, so `None` is only for the session's
    /// end being cut by the next event in these tests).
    fn cycle(
        p: &mut Poller,
        t: &mut Instant,
        slept_us: u64,
        gaps_us: &[u64],
        give_up_us: Option<u64>,
    ) {
        p.sleeping(*t);
        *t += Duration::from_micros(slept_us);
        p.on_event(*t);
        for &g in gaps_us {
            p.spun(g * 1000, true);
        }
        if let Some(g) = give_up_us {
            p.spun(g * 1000, false);
        }
    }

    #[test]
    fn poller_opens_after_a_short_sleep_and_follows_what_it_finds() {
        let mut p = Poller::new(32_768);
        let mut t = Instant::now();
        // The first event (no sleep measured) does not open a window.
        p.on_event(t);
        assert_eq!(p.ns, 0);
        // A long sleep (an idle frontend) does not either.
        cycle(&mut p, &mut t, 1000, &[], None);
        assert_eq!(p.ns, 0);
        // A sleep shorter than four ceilings opens it, at the sleep's length.
        cycle(&mut p, &mut t, 50, &[10, 10], Some(33));
        assert_eq!(p.ns, 32_768);
        cycle(&mut p, &mut t, 20, &[], Some(33));
        // Work found: the window doubles (capped); none: it halves, then closes.
        assert_eq!(p.ns, 32_768);
        cycle(&mut p, &mut t, 60, &[], Some(16));
        assert_eq!(p.ns, 16_384);
        cycle(&mut p, &mut t, 60, &[], Some(8));
        assert_eq!(p.ns, 8_192);
        let mut q = Poller::new(32_768);
        cycle(&mut q, &mut t, 10, &[], None);
        assert_eq!(q.ns, 10_000, "opened at the sleep's length");
        cycle(&mut q, &mut t, 10, &[], None);
        assert_eq!(q.ns, 5_000);
        cycle(&mut q, &mut t, 10, &[], None);
        assert_eq!(q.ns, 0, "below the start window it closes");
        // Off stays off.
        let mut off = Poller::new(0);
        for _ in 0..1000 {
            cycle(&mut off, &mut t, 5, &[], None);
            assert_eq!(off.ns, 0);
        }
    }

    #[test]
    fn poller_stops_when_polling_costs_more_than_sleeping() {
        // A frontend that answers every 30 µs: found every time, but each
        // find spun more than the budget. Within a few periods the
        // ceiling falls to zero and the thread only sleeps.
        let mut p = Poller::new(32_768);
        let mut t = Instant::now();
        for _ in 0..(Poller::PERIOD * 8) {
            cycle(&mut p, &mut t, 40, &[30, 30], Some(33));
        }
        assert_eq!(p.cap_ns, 0);
        assert_eq!(p.ns, 0);
        // Retried after RETRY idle periods, from the start window.
        for _ in 0..(Poller::PERIOD * (Poller::RETRY + 1)) {
            cycle(&mut p, &mut t, 40, &[], None);
        }
        assert_eq!(p.cap_ns, Poller::START_NS);
        // A frontend that answers in 5 µs: polling pays, the ceiling goes
        // back up to the maximum.
        for _ in 0..(Poller::PERIOD * 8) {
            let w = p.ns / 1000 + 1;
            cycle(&mut p, &mut t, 8, &[5, 5, 5, 5], Some(w));
        }
        assert_eq!(p.cap_ns, 32_768);
        assert!(p.ns >= Poller::START_NS);
    }

    #[test]
    fn poller_stops_on_a_contended_cpu() {
        let mut p = Poller::new(32_768);
        let t = Instant::now();
        let ms = Duration::from_millis;
        // The first look sets the baseline; a look within 10 ms judges
        // nothing.
        assert!(!p.contended(t, 1000));
        assert!(!p.contended(t + ms(5), 5000));
        // 100 preemptions in 20 ms: 5,000/s, contended.
        assert!(p.contended(t + ms(20), 1100));
        // 1 in the next 20 ms: 50/s, not.
        assert!(!p.contended(t + ms(40), 1101));
        // Contended periods halve the ceiling down to off, even while
        // polling finds work cheaply...
        for _ in 0..8 {
            p.spun(1000, true);
            p.review(true);
        }
        assert_eq!(p.cap_ns, 0);
        // ...and an off poller is not retried while the CPU stays so.
        for _ in 0..(Poller::RETRY * 2) {
            p.review(true);
        }
        assert_eq!(p.cap_ns, 0);
        // Once it is not, the retry comes after RETRY idle periods.
        for _ in 0..Poller::RETRY {
            p.review(false);
        }
        assert_eq!(p.cap_ns, Poller::START_NS);
    }

    #[test]
    fn poller_stops_when_polling_never_finds_work() {
        // A frontend sharing the thread's CPU runs only while it sleeps:
        // every window is spun for nothing, and the event comes soon after.
        let mut p = Poller::new(32_768);
        let mut t = Instant::now();
        for _ in 0..(Poller::PERIOD * 8) {
            let w = p.ns / 1000;
            cycle(&mut p, &mut t, 3, &[], (w > 0).then_some(w));
        }
        assert_eq!(p.cap_ns, 0);
        assert_eq!(p.ns, 0);
    }

    #[test]
    fn signal_tuner_keeps_the_mode_that_completed_more() {
        let mut t = SignalTuner::new();
        assert!(!t.early);
        // Early clearly faster: kept for the USE phase.
        end_phase(&mut t, 1000);
        assert!(t.early, "the early probe follows the late one");
        end_phase(&mut t, 2000);
        assert!(t.early);
        assert!(t.phase == TunerPhase::Use);
        // Then probes again, late first.
        end_phase(&mut t, 0);
        assert!(!t.early);
        // One pair where early is not clearly faster does not flip the
        // mode: the last pairs together still say early.
        end_phase(&mut t, 1000);
        end_phase(&mut t, 1050);
        assert!(t.early);
        // A pair where late is much faster tips the sum: late.
        end_phase(&mut t, 0);
        end_phase(&mut t, 3000);
        end_phase(&mut t, 1000);
        assert!(!t.early);
        // No load at all for three pairs: late.
        for _ in 0..3 {
            end_phase(&mut t, 0);
            end_phase(&mut t, 0);
            end_phase(&mut t, 0);
        }
        assert!(!t.early);
        // A phase not over yet does not move.
        assert!(t.phase == TunerPhase::Use);
        t.since = Instant::now();
        t.update();
        assert!(t.phase == TunerPhase::Use && !t.early);
    }
}
