//! Throttle groups: one ThrottleState shared by every member (throttle
//! node) of the group, whatever iothread its requests come from.
//!
//! ```text
//!   request --intercept--> may go now? --yes--> account, go
//!                               \--no--> queue on its member (per direction)
//!   group timer thread: when the buckets allow, release the next waiting
//!   request, taking members round-robin; wake its task (Waker) and its
//!   iothread (wake eventfd)
//! ```
//!
//! A request waits if the group has requests queued in its direction (no
//! overtaking), if its own member has, or if the buckets say so. Inside a
//! drained section a member's throttling is off: its queue is released and
//! new requests pass (QEMU disables I/O limits during drain).
//!
//! Locking: one mutex per group, held briefly to decide; never across I/O.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use super::limits::{Direction, ThrottleLimits, ThrottleState};

fn now_ns() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    u64::try_from(START.get_or_init(Instant::now).elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// One throttled request waiting for its turn.
struct Waiter {
    bytes: u64,
    queued_at: Instant,
    released: AtomicBool,
    waker: Mutex<Option<Waker>>,
    wake_fd: Option<Arc<EventFd>>,
}

impl Waiter {
    fn release(&self) {
        self.released.store(true, Ordering::Release);
        if let Some(w) = self.waker.lock().unwrap_or_else(|e| e.into_inner()).take() {
            w.wake();
        }
        if let Some(fd) = &self.wake_fd {
            let _ = fd.write(1);
        }
    }
}

/// A member of a group: one throttle node.
pub struct Member {
    id: usize,
    /// Drained sections open on this member: throttling is off while > 0.
    disabled: AtomicUsize,
    /// Nanoseconds requests spent queued, per direction.
    throttled_ns: [AtomicU64; 2],
}

impl Member {
    pub fn throttled_ns(&self, dir: Direction) -> u64 {
        self.throttled_ns[dir as usize].load(Ordering::Relaxed)
    }
}

struct MemberQueues {
    member: Weak<Member>,
    queues: [VecDeque<Arc<Waiter>>; 2],
}

struct Inner {
    state: ThrottleState,
    members: Vec<MemberQueues>,
    /// Round-robin position per direction: the member served last.
    last: [usize; 2],
    closed: bool,
}

impl Inner {
    fn queued(&self, dir: Direction) -> bool {
        self.members
            .iter()
            .any(|m| !m.queues[dir as usize].is_empty())
    }
}

/// A throttle group (QEMU's throttle-group object).
pub struct ThrottleGroup {
    name: String,
    inner: Mutex<Inner>,
    timer: Condvar,
    next_member_id: AtomicUsize,
}

impl ThrottleGroup {
    /// A group with validated `limits`, and its timer thread.
    pub fn new(name: &str, limits: ThrottleLimits) -> Result<Arc<ThrottleGroup>, String> {
        limits.validate()?;
        let g = Arc::new(ThrottleGroup {
            name: name.to_string(),
            inner: Mutex::new(Inner {
                state: ThrottleState::new(limits, now_ns()),
                members: Vec::new(),
                last: [0, 0],
                closed: false,
            }),
            timer: Condvar::new(),
            next_member_id: AtomicUsize::new(0),
        });
        let weak = Arc::downgrade(&g);
        crate::sandbox::spawn(
            crate::sandbox::Class::Helper,
            format!("vub-throttle-{name}"),
            move || timer_thread(weak),
        )
        .map_err(|e| format!("cannot start the throttle timer: {e}"))?;
        Ok(g)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn limits(&self) -> ThrottleLimits {
        self.lock().state.limits().clone()
    }

    /// Replaces the limits; queued requests keep their order and are
    /// re-evaluated against the new limits at once.
    pub fn set_limits(&self, limits: ThrottleLimits) -> Result<(), String> {
        limits.validate()?;
        let mut g = self.lock();
        g.state = ThrottleState::new(limits, now_ns());
        self.timer.notify_all();
        Ok(())
    }

    pub fn member_count(&self) -> usize {
        self.lock()
            .members
            .iter()
            .filter(|m| m.member.strong_count() > 0)
            .count()
    }

    /// Joins the group.
    pub fn join(&self) -> Arc<Member> {
        let m = Arc::new(Member {
            id: self.next_member_id.fetch_add(1, Ordering::Relaxed),
            disabled: AtomicUsize::new(0),
            throttled_ns: [AtomicU64::new(0), AtomicU64::new(0)],
        });
        self.lock().members.push(MemberQueues {
            member: Arc::downgrade(&m),
            queues: [VecDeque::new(), VecDeque::new()],
        });
        m
    }

    /// Leaves the group (its queues are empty: the node is unused).
    pub fn leave(&self, member: &Member) {
        let mut g = self.lock();
        if let Some(i) = g
            .members
            .iter()
            .position(|m| m.member.upgrade().is_none_or(|x| x.id == member.id))
        {
            for w in g.members[i].queues.iter_mut().flat_map(|q| q.drain(..)) {
                w.release();
            }
            g.members.remove(i);
        }
    }

    /// Stops the timer thread (object-del).
    pub fn close(&self) {
        self.lock().closed = true;
        self.timer.notify_all();
    }

    /// Drained section: `member`'s throttling is off until `enable`; what
    /// it has queued goes now.
    pub fn disable(&self, member: &Member) {
        member.disabled.fetch_add(1, Ordering::AcqRel);
        let mut g = self.lock();
        if let Some(mq) = g
            .members
            .iter_mut()
            .find(|m| m.member.upgrade().is_some_and(|x| x.id == member.id))
        {
            for (dir, q) in mq.queues.iter_mut().enumerate() {
                for w in q.drain(..) {
                    let waited =
                        u64::try_from(w.queued_at.elapsed().as_nanos()).unwrap_or(u64::MAX);
                    member.throttled_ns[dir].fetch_add(waited, Ordering::Relaxed);
                    w.release();
                }
            }
        }
    }

    pub fn enable(&self, member: &Member) {
        member.disabled.fetch_sub(1, Ordering::AcqRel);
    }

    /// Lets a request of `bytes` in `dir` through `member`: at once when
    /// the limits allow and nobody waits, else in turn.
    pub fn intercept(
        self: &Arc<Self>,
        member: &Arc<Member>,
        dir: Direction,
        bytes: u64,
    ) -> ThrottleWait {
        if member.disabled.load(Ordering::Acquire) > 0 {
            return ThrottleWait { waiter: None };
        }
        let mut g = self.lock();
        if !g.state.is_enabled() {
            return ThrottleWait { waiter: None };
        }
        if !g.queued(dir) && g.state.wait_ns(now_ns(), dir) == 0 {
            g.state.account(dir, bytes);
            return ThrottleWait { waiter: None };
        }
        let w = Arc::new(Waiter {
            bytes,
            queued_at: Instant::now(),
            released: AtomicBool::new(false),
            waker: Mutex::new(None),
            wake_fd: crate::io::current_wake_fd(),
        });
        let Some(mq) = g
            .members
            .iter_mut()
            .find(|m| m.member.upgrade().is_some_and(|x| x.id == member.id))
        else {
            return ThrottleWait { waiter: None };
        };
        mq.queues[dir as usize].push_back(w.clone());
        let wait = g.state.wait_ns(now_ns(), dir);
        drop(g);
        // The request's own iothread releases it when its timer fires (no
        // cross-thread wake-up); the group's thread is the fallback.
        local_wait(self, Duration::from_nanos(wait.max(1_000)));
        self.timer.notify_all();
        ThrottleWait { waiter: Some(w) }
    }

    /// Releases what the limits allow now; returns how long until more may
    /// go (None when nothing waits).
    pub fn release_ready(&self) -> Option<Duration> {
        let mut g = self.lock();
        let mut next: Option<u64> = None;
        for dir in [Direction::Read, Direction::Write] {
            loop {
                if !g.queued(dir) {
                    break;
                }
                let wait = if g.state.is_enabled() {
                    g.state.wait_ns(now_ns(), dir)
                } else {
                    0
                };
                if wait > 0 {
                    next = Some(next.map_or(wait, |n| n.min(wait)));
                    break;
                }
                // Round-robin: the first member after the last one served
                // that has a request waiting.
                let n = g.members.len();
                let start = g.last[dir as usize];
                let Some(i) = (1..=n)
                    .map(|k| (start + k) % n)
                    .find(|&i| !g.members[i].queues[dir as usize].is_empty())
                else {
                    break;
                };
                g.last[dir as usize] = i;
                let w = g.members[i].queues[dir as usize]
                    .pop_front()
                    .expect("non-empty queue");
                g.state.account(dir, w.bytes);
                if let Some(m) = g.members[i].member.upgrade() {
                    let waited =
                        u64::try_from(w.queued_at.elapsed().as_nanos()).unwrap_or(u64::MAX);
                    m.throttled_ns[dir as usize].fetch_add(waited, Ordering::Relaxed);
                }
                w.release();
            }
        }
        next.map(Duration::from_nanos)
    }
}

fn timer_thread(group: Weak<ThrottleGroup>) {
    // Sleeps of a few hundred microseconds set the rate: without this, the
    // kernel's default 50 us timer slack makes every release late (5000 IOPS
    // came out 13 % low). QEMU sets the same.
    // SAFETY: PR_SET_TIMERSLACK only changes this thread's timer slack.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1, 0, 0, 0) };
    loop {
        let Some(g) = group.upgrade() else { return };
        let next = g.release_ready();
        let inner = g.lock();
        if inner.closed {
            return;
        }
        let _unused = match next {
            Some(d) => g
                .timer
                .wait_timeout(inner, d.max(Duration::from_micros(50)))
                .map(|r| r.0),
            // Wake up now and then to notice the group going away.
            None => g
                .timer
                .wait_timeout(inner, Duration::from_millis(200))
                .map(|r| r.0),
        };
    }
}

/// Resolves when the request may go.
pub struct ThrottleWait {
    waiter: Option<Arc<Waiter>>,
}

impl Future for ThrottleWait {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let Some(w) = &self.waiter else {
            return Poll::Ready(());
        };
        if w.released.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        *w.waker.lock().unwrap_or_else(|e| e.into_inner()) = Some(cx.waker().clone());
        if w.released.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

/// Throttle groups with requests queued from this iothread, and when the
/// earliest of them may go.
#[derive(Default)]
struct Local {
    groups: Vec<Weak<ThrottleGroup>>,
    deadline: Option<Instant>,
}

thread_local! {
    static LOCAL: std::cell::RefCell<Local> = std::cell::RefCell::new(Local::default());
}

fn local_wait(g: &Arc<ThrottleGroup>, wait: Duration) {
    let at = Instant::now() + wait;
    LOCAL.with(|l| {
        let mut l = l.borrow_mut();
        if !l
            .groups
            .iter()
            .any(|w| std::ptr::eq(w.as_ptr(), Arc::as_ptr(g)))
        {
            l.groups.push(Arc::downgrade(g));
        }
        l.deadline = Some(l.deadline.map_or(at, |d| d.min(at)));
    });
}

/// When this iothread's timer should fire next (and forget it): the
/// iothread arms its timerfd with it after each batch.
pub fn take_local_deadline() -> Option<Instant> {
    LOCAL.with(|l| l.borrow_mut().deadline.take())
}

/// The iothread's timer fired: release what the groups allow now, and
/// remember when to look again.
pub fn release_local() {
    let groups: Vec<Arc<ThrottleGroup>> = LOCAL.with(|l| {
        let mut l = l.borrow_mut();
        l.groups.retain(|w| w.strong_count() > 0);
        l.groups.iter().filter_map(|w| w.upgrade()).collect()
    });
    let mut next: Option<Duration> = None;
    let mut still = Vec::new();
    for g in groups {
        if let Some(d) = g.release_ready() {
            next = Some(next.map_or(d, |n| n.min(d)));
            still.push(Arc::downgrade(&g));
        }
    }
    LOCAL.with(|l| {
        let mut l = l.borrow_mut();
        l.groups = still;
        if let Some(d) = next {
            let at = Instant::now() + d;
            l.deadline = Some(l.deadline.map_or(at, |x| x.min(at)));
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(iops: u64) -> ThrottleLimits {
        ThrottleLimits {
            iops_total: Some(iops),
            ..Default::default()
        }
    }

    #[test]
    fn requests_queue_over_the_limit_and_a_raised_limit_releases_them_in_place() {
        let g = ThrottleGroup::new("t", limits(1)).unwrap();
        let (a, b) = (g.join(), g.join());
        // The first request fits the initial allowance; the next ones queue.
        assert!(g.intercept(&a, Direction::Read, 512).waiter.is_none());
        let waits: Vec<ThrottleWait> = (0..4)
            .map(|i| g.intercept(if i % 2 == 0 { &a } else { &b }, Direction::Read, 512))
            .collect();
        assert!(waits.iter().all(|w| w.waiter.is_some()));
        // A write queues too, behind nobody in its own direction but over the limit.
        g.set_limits(limits(u32::MAX.into())).unwrap();
        assert!(g.release_ready().is_none(), "nothing left waiting");
        for w in &waits {
            assert!(w.waiter.as_ref().unwrap().released.load(Ordering::Acquire));
        }
        g.close();
    }

    #[test]
    fn a_disabled_member_passes_and_releases_what_it_queued() {
        let g = ThrottleGroup::new("t2", limits(1)).unwrap();
        let a = g.join();
        assert!(g.intercept(&a, Direction::Write, 512).waiter.is_none());
        let w = g.intercept(&a, Direction::Write, 512);
        assert!(w.waiter.is_some());
        g.disable(&a);
        assert!(w.waiter.as_ref().unwrap().released.load(Ordering::Acquire));
        assert!(g.intercept(&a, Direction::Write, 512).waiter.is_none());
        g.enable(&a);
        assert!(g.intercept(&a, Direction::Write, 512).waiter.is_some());
        g.close();
    }

    #[test]
    fn invalid_limits_are_refused_and_the_old_ones_kept() {
        let g = ThrottleGroup::new("t3", limits(100)).unwrap();
        let bad = ThrottleLimits {
            iops_total: Some(10),
            iops_total_max: Some(5),
            ..Default::default()
        };
        assert!(g.set_limits(bad).is_err());
        assert_eq!(g.limits().iops_total, Some(100));
        assert!(ThrottleGroup::new(
            "t4",
            ThrottleLimits {
                iops_size: Some(1),
                ..Default::default()
            }
        )
        .is_err());
        g.close();
    }
}
