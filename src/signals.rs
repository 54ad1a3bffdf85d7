//! Termination signals, handled synchronously: SIGTERM, SIGINT and SIGHUP
//! are blocked in every thread (the mask is inherited by threads spawned
//! later) and the main thread takes them with sigwait. SIGHUP stops the
//! daemon like SIGTERM, as in qemu-storage-daemon (its
//! os_setup_signal_handling sends SIGHUP to the same termsig handler):
//! drained, flushed, sockets removed, exit 0 -- not killed with status 129
//! and its socket files left behind.

use std::io;

/// The signals that ask the daemon to stop.
pub struct TerminationSignals {
    set: libc::sigset_t,
}

impl TerminationSignals {
    /// Blocks SIGTERM, SIGINT and SIGHUP in the calling thread. Call before spawning
    /// threads so that they inherit the mask.
    pub fn block() -> io::Result<Self> {
        // SAFETY: sigset_t is plain data; sigemptyset initialises it before use.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid sigset_t owned by this frame; the calls
        // only modify it and the thread's signal mask.
        let r = unsafe {
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::sigaddset(&mut set, libc::SIGHUP);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut())
        };
        if r != 0 {
            return Err(io::Error::from_raw_os_error(r));
        }
        Ok(TerminationSignals { set })
    }

    /// Waits for SIGTERM, SIGINT or SIGHUP and returns its number.
    pub fn wait(&self) -> i32 {
        loop {
            let mut sig: libc::c_int = 0;
            // SAFETY: `self.set` is an initialised sigset_t and `sig` a live local.
            let r = unsafe { libc::sigwait(&self.set, &mut sig) };
            if r == 0 {
                return sig;
            }
        }
    }
}
