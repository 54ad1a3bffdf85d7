//! The io_uring engine of one iothread.
//!
//! Operations live in a slab of slots indexed by the SQE's `user_data`. A slot
//! holds the operation's buffers (iovec array and the memory owner) until its
//! completion arrives, whatever happens to the future that waits for it.

use std::cell::{Cell, RefCell};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::task::Waker;

use io_uring::register::Restriction;
use io_uring::{opcode, squeue, types, IoUring, Probe};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{IoVecs, Op};

/// A ring and its eventfd, created on the thread that registers the eventfd
/// with the iothread's epoll, then moved to the iothread.
pub struct PreparedRing {
    ring: IoUring,
    eventfd: EventFd,
}

impl PreparedRing {
    /// A ring that accepts only the operations in [`OPCODES`], without
    /// SQE flags: io_uring operations do not pass through seccomp, so a
    /// ring that could open files or sockets would undo the sandbox. The
    /// kernel fails anything else with EACCES. A kernel without ring
    /// restrictions (before 5.10) gets a plain ring.
    pub fn new(entries: u32) -> io::Result<Self> {
        let eventfd = EventFd::new(EFD_NONBLOCK)?;
        let ring = match IoUring::builder().setup_r_disabled().build(entries) {
            Ok(ring) => {
                ring.submitter().register_eventfd(eventfd.as_raw_fd())?;
                let mut allowed: Vec<Restriction> =
                    OPCODES.iter().map(|op| Restriction::sqe_op(*op)).collect();
                allowed.push(Restriction::sqe_flags_allowed(0));
                ring.submitter().register_restrictions(&mut allowed)?;
                ring.submitter().register_enable_rings()?;
                ring
            }
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                let ring = IoUring::new(entries)?;
                ring.submitter().register_eventfd(eventfd.as_raw_fd())?;
                ring
            }
            Err(e) => return Err(e),
        };
        Ok(PreparedRing { ring, eventfd })
    }

    pub fn eventfd(&self) -> RawFd {
        self.eventfd.as_raw_fd()
    }
}

/// Every operation this engine issues; its rings accept nothing else.
pub const OPCODES: [u8; 4] = [
    opcode::Readv::CODE,
    opcode::Writev::CODE,
    opcode::Fsync::CODE,
    opcode::Fallocate::CODE,
];

enum SlotState {
    Free {
        next: Option<usize>,
    },
    Busy {
        result: Option<io::Result<u64>>,
        waker: Option<Waker>,
        abandoned: bool,
        // Keeps the iovec array and the memory it points into alive until the
        // kernel is done with them.
        _bufs: Option<IoVecs>,
    },
}

pub struct UringEngine {
    ring: RefCell<IoUring>,
    eventfd: EventFd,
    slots: RefCell<Vec<SlotState>>,
    free: Cell<Option<usize>>,
    busy: Cell<usize>,
    // Operations handed to the ring whose completion has not been reaped.
    pending: Cell<usize>,
    unsubmitted: Cell<usize>,
}

impl UringEngine {
    /// True when this kernel can set up a ring that supports every opcode we
    /// issue.
    pub fn supported() -> bool {
        let Ok(ring) = IoUring::new(4) else {
            return false;
        };
        let mut probe = Probe::new();
        if ring.submitter().register_probe(&mut probe).is_err() {
            return false;
        }
        OPCODES.iter().all(|c| probe.is_supported(*c))
    }

    pub fn new(prepared: PreparedRing) -> Self {
        UringEngine {
            ring: RefCell::new(prepared.ring),
            eventfd: prepared.eventfd,
            slots: RefCell::new(Vec::new()),
            free: Cell::new(None),
            busy: Cell::new(0),
            pending: Cell::new(0),
            unsubmitted: Cell::new(0),
        }
    }

    fn alloc_slot(&self, bufs: Option<IoVecs>) -> usize {
        let mut slots = self.slots.borrow_mut();
        let state = SlotState::Busy {
            result: None,
            waker: None,
            abandoned: false,
            _bufs: bufs,
        };
        self.busy.set(self.busy.get() + 1);
        match self.free.get() {
            Some(i) => {
                let SlotState::Free { next } = slots[i] else {
                    unreachable!("free list points at a busy slot");
                };
                self.free.set(next);
                slots[i] = state;
                i
            }
            None => {
                slots.push(state);
                slots.len() - 1
            }
        }
    }

    fn free_slot(&self, i: usize) {
        self.slots.borrow_mut()[i] = SlotState::Free {
            next: self.free.get(),
        };
        self.free.set(Some(i));
        self.busy.set(self.busy.get() - 1);
    }

    /// Queues `op` and returns its slot.
    pub fn push(&self, op: Op) -> io::Result<usize> {
        let (entry, bufs) = match op {
            Op::Readv { fd, iov, offset } => {
                let s = iov.as_slice();
                let e = opcode::Readv::new(types::Fd(fd), s.as_ptr(), s.len() as u32)
                    .offset(offset)
                    .build();
                (e, Some(iov))
            }
            Op::Writev {
                fd,
                iov,
                offset,
                dsync,
            } => {
                let s = iov.as_slice();
                let flags = if dsync { libc::RWF_DSYNC } else { 0 };
                let e = opcode::Writev::new(types::Fd(fd), s.as_ptr(), s.len() as u32)
                    .offset(offset)
                    .rw_flags(flags)
                    .build();
                (e, Some(iov))
            }
            Op::Fdatasync { fd } => (
                opcode::Fsync::new(types::Fd(fd))
                    .flags(types::FsyncFlags::DATASYNC)
                    .build(),
                None,
            ),
            Op::Fallocate {
                fd,
                mode,
                offset,
                len,
            } => (
                opcode::Fallocate::new(types::Fd(fd), len)
                    .offset(offset)
                    .mode(mode)
                    .build(),
                None,
            ),
        };
        let slot = self.alloc_slot(bufs);
        let entry: squeue::Entry = entry.user_data(slot as u64);
        loop {
            let mut ring = self.ring.borrow_mut();
            // SAFETY: the SQE points at the iovec array and buffers stored in
            // `slot`, which stay alive until the CQE for `slot` is reaped.
            let pushed = unsafe { ring.submission().push(&entry) };
            if pushed.is_ok() {
                break;
            }
            // The submission queue is full: hand it to the kernel and retry.
            drop(ring);
            if let Err(e) = self.submit_now() {
                self.free_slot(slot);
                return Err(e);
            }
        }
        self.unsubmitted.set(self.unsubmitted.get() + 1);
        self.pending.set(self.pending.get() + 1);
        Ok(slot)
    }

    fn submit_now(&self) -> io::Result<()> {
        loop {
            let r = self.ring.borrow().submit();
            match r {
                Ok(_) => {
                    self.unsubmitted.set(0);
                    return Ok(());
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    // Completion queue overflow: make room, then retry.
                    self.reap();
                    std::thread::yield_now();
                }
                Err(e) => return Err(e),
            }
        }
    }

    pub fn submit(&self) {
        if self.unsubmitted.get() == 0 {
            return;
        }
        if let Err(e) = self.submit_now() {
            // The SQEs stay queued; the next submit retries them.
            log::error!("io_uring submit failed: {e}");
        }
    }

    pub fn reap(&self) -> usize {
        let mut n = 0;
        loop {
            let cqe = {
                let mut ring = self.ring.borrow_mut();
                let mut cq = ring.completion();
                cq.next()
            };
            let Some(cqe) = cqe else { break };
            n += 1;
            self.pending.set(self.pending.get() - 1);
            let slot = cqe.user_data() as usize;
            let res = if cqe.result() < 0 {
                Err(io::Error::from_raw_os_error(-cqe.result()))
            } else {
                Ok(cqe.result() as u64)
            };
            let mut waker_to_wake = None;
            let mut free = false;
            if let Some(SlotState::Busy {
                result,
                waker,
                abandoned,
                ..
            }) = self.slots.borrow_mut().get_mut(slot)
            {
                if *abandoned {
                    free = true;
                } else {
                    *result = Some(res);
                    waker_to_wake = waker.take();
                }
            }
            if free {
                self.free_slot(slot);
            }
            if let Some(w) = waker_to_wake {
                w.wake();
            }
        }
        n
    }

    pub fn clear_event(&self) {
        let _ = self.eventfd.read();
    }

    /// Returns the result if the operation has completed (and frees the slot),
    /// or records the waker.
    pub fn poll_slot(&self, slot: usize, w: &Waker) -> Option<io::Result<u64>> {
        let done = {
            let mut slots = self.slots.borrow_mut();
            match slots.get_mut(slot) {
                Some(SlotState::Busy { result, waker, .. }) => match result.take() {
                    Some(r) => Some(r),
                    None => {
                        match waker {
                            Some(old) if old.will_wake(w) => {}
                            _ => *waker = Some(w.clone()),
                        }
                        None
                    }
                },
                _ => Some(Err(io::Error::other("I/O slot vanished"))),
            }
        };
        if done.is_some() {
            self.free_slot(slot);
        }
        done
    }

    /// The future for `slot` was dropped: free the slot now if the operation
    /// completed, or when its completion arrives.
    pub fn abandon(&self, slot: usize) {
        let free = {
            let mut slots = self.slots.borrow_mut();
            match slots.get_mut(slot) {
                Some(SlotState::Busy {
                    result, abandoned, ..
                }) => {
                    if result.is_some() {
                        true
                    } else {
                        *abandoned = true;
                        false
                    }
                }
                _ => false,
            }
        };
        if free {
            self.free_slot(slot);
        }
    }

    pub fn in_flight(&self) -> usize {
        self.pending.get()
    }

    pub fn wait_idle(&self) {
        self.submit();
        while self.pending.get() > 0 {
            let r = self.ring.borrow().submit_and_wait(1);
            if let Err(e) = r {
                if e.raw_os_error() != Some(libc::EINTR) {
                    log::error!("io_uring wait failed: {e}");
                    return;
                }
            }
            self.reap();
        }
    }
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        // Never let the kernel write into buffers we are about to free.
        self.wait_idle();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(ring: &mut IoUring, e: squeue::Entry) -> i32 {
        // SAFETY: the entry's pointers (a static path, or none) outlive
        // the wait below.
        unsafe { ring.submission().push(&e).unwrap() };
        ring.submit_and_wait(1).unwrap();
        ring.completion().next().unwrap().result()
    }

    #[test]
    fn a_ring_refuses_operations_it_was_not_set_up_for() {
        if !UringEngine::supported() {
            eprintln!("no io_uring here: nothing to check");
            return;
        }
        let mut ring = PreparedRing::new(4).unwrap().ring;
        let open = opcode::OpenAt::new(types::Fd(libc::AT_FDCWD), c"/etc/hostname".as_ptr())
            .build()
            .user_data(1);
        assert_eq!(run(&mut ring, open), -libc::EACCES);
        let file = tempfile::tempfile().unwrap();
        let sync = opcode::Fsync::new(types::Fd(file.as_raw_fd()))
            .build()
            .user_data(2);
        assert_eq!(run(&mut ring, sync), 0);
        let linked = opcode::Fsync::new(types::Fd(file.as_raw_fd()))
            .build()
            .flags(squeue::Flags::IO_LINK)
            .user_data(3);
        assert_eq!(run(&mut ring, linked), -libc::EACCES);
    }
}
