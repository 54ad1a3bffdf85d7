//! Peer credentials: who may connect to the daemon's sockets.
//!
//! Every connection accepted on a vhost-user export socket or a QMP monitor
//! socket (bound here, passed by systemd or `fd=`, or added at run time by
//! `block-export-add`) is checked against [`PeerPolicy`] before anything is
//! read from or written to it ([`check`]):
//!
//! ```text
//!   accept -> SO_PEERCRED (pid, uid, gid) -> allowed? -> vhost-user / QMP
//!                                             \-> no: closed, RefusalLog
//! ```
//!
//! A peer is allowed if its uid is 0, or the daemon's own effective uid at
//! the time of the accept (so that it follows a switch of user after
//! start-up), or is listed by `--allow-peer-uid`, or its gid (the primary
//! gid SO_PEERCRED reports) is listed by `--allow-peer-gid`. The socket's
//! file permissions are a first barrier; this check holds even when they are
//! wider than meant (umask 000, a socket systemd created, a shared directory).
//!
//! A refused connection is closed at once and logged with its pid, uid and
//! gid; a flood of them is logged once, then at most one line per
//! [`REFUSAL_LOG_INTERVAL`] per socket, with the count of those not logged
//! ([`RefusalLog`]).

use std::io;
use std::os::fd::AsRawFd;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// At most one refusal line per socket this often.
pub const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Overrides [`REFUSAL_LOG_INTERVAL`], in milliseconds (for tests: a long
/// interval makes "one line for a burst" independent of the machine's
/// speed).
pub const REFUSAL_LOG_INTERVAL_ENV: &str = "VUB_PEER_REFUSAL_LOG_INTERVAL_MS";

/// The uids and gids allowed besides root and the daemon's own user.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerPolicy {
    pub uids: Vec<u32>,
    pub gids: Vec<u32>,
}

/// What SO_PEERCRED reports of the process that connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCred {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
}

impl std::fmt::Display for PeerCred {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pid {} uid {} gid {}", self.pid, self.uid, self.gid)
    }
}

impl PeerPolicy {
    /// Whether `peer` may connect to a daemon running as `own_uid`.
    pub fn allows(&self, peer: &PeerCred, own_uid: u32) -> bool {
        peer.uid == 0
            || peer.uid == own_uid
            || self.uids.contains(&peer.uid)
            || self.gids.contains(&peer.gid)
    }
}

static POLICY: OnceLock<PeerPolicy> = OnceLock::new();

/// Sets the policy of every connection accepted from now on; the first call
/// wins (the shell makes it once, at start-up, before any socket listens).
pub fn set_policy(policy: PeerPolicy) {
    let _ = POLICY.set(policy);
}

fn policy() -> &'static PeerPolicy {
    static DEFAULT: PeerPolicy = PeerPolicy {
        uids: Vec::new(),
        gids: Vec::new(),
    };
    POLICY.get().unwrap_or(&DEFAULT)
}

/// The credentials of the peer of a connected UNIX socket.
pub fn peer_cred(sock: &impl AsRawFd) -> io::Result<PeerCred> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` is a live ucred and `len` its size; the kernel writes
    // at most `len` bytes to it.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    if len as usize != std::mem::size_of::<libc::ucred>() {
        return Err(io::Error::other("short SO_PEERCRED reply"));
    }
    Ok(PeerCred {
        pid: cred.pid,
        uid: cred.uid,
        gid: cred.gid,
    })
}

fn own_euid() -> u32 {
    // SAFETY: geteuid takes no arguments and cannot fail.
    unsafe { libc::geteuid() }
}

/// Checks the peer of an accepted connection against the policy. A refused
/// peer is logged (through `log`, as `what` says: "export e0", "QMP monitor
/// /run/qmp.sock") and `false` returned: the caller closes the connection
/// without reading or writing anything. A socket whose credentials cannot
/// be read is refused too.
pub fn check(sock: &impl AsRawFd, what: &str, log: &mut RefusalLog) -> bool {
    let peer = match peer_cred(sock) {
        Ok(p) => p,
        Err(e) => {
            log::warn!("{what}: refused a connection: cannot read its credentials: {e}");
            return false;
        }
    };
    if policy().allows(&peer, own_euid()) {
        return true;
    }
    if let Some(line) = log.refused(Instant::now(), &peer, what) {
        log::warn!("{line}");
    }
    false
}

/// Rate-limits the log lines of one socket's refused connections: the
/// first refusal is logged; later ones at most once per
/// [`REFUSAL_LOG_INTERVAL`], saying how many were refused without a line.
#[derive(Debug)]
pub struct RefusalLog {
    interval: Duration,
    last_line: Option<Instant>,
    unlogged: u64,
}

impl Default for RefusalLog {
    fn default() -> Self {
        RefusalLog::new()
    }
}

impl RefusalLog {
    /// A log with [`REFUSAL_LOG_INTERVAL`] (or [`REFUSAL_LOG_INTERVAL_ENV`]).
    pub fn new() -> RefusalLog {
        let interval = std::env::var(REFUSAL_LOG_INTERVAL_ENV)
            .ok()
            .and_then(|v| v.parse().ok())
            .map_or(REFUSAL_LOG_INTERVAL, Duration::from_millis);
        RefusalLog::with_interval(interval)
    }

    pub fn with_interval(interval: Duration) -> RefusalLog {
        RefusalLog {
            interval,
            last_line: None,
            unlogged: 0,
        }
    }

    /// Notes a refusal at `now`; returns the line to log, if one is due.
    pub fn refused(&mut self, now: Instant, peer: &PeerCred, what: &str) -> Option<String> {
        let due = self
            .last_line
            .is_none_or(|t| now.saturating_duration_since(t) >= self.interval);
        if !due {
            self.unlogged = self.unlogged.saturating_add(1);
            return None;
        }
        let mut line = format!(
            "{what}: refused a connection from {peer}: not root, the daemon's user, \
             nor allowed by --allow-peer-uid/--allow-peer-gid"
        );
        if self.unlogged > 0 {
            let s = if self.unlogged == 1 { "" } else { "s" };
            line.push_str(&format!(
                " ... and {} more refused connection{s} since the last report",
                self.unlogged
            ));
        }
        self.last_line = Some(now);
        self.unlogged = 0;
        Some(line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(uid: u32, gid: u32) -> PeerCred {
        PeerCred { pid: 42, uid, gid }
    }

    #[test]
    fn root_and_the_daemons_own_user_are_allowed_by_default() {
        let p = PeerPolicy::default();
        assert!(p.allows(&peer(0, 0), 1000));
        assert!(p.allows(&peer(0, 1234), 1000));
        assert!(p.allows(&peer(1000, 1000), 1000));
        assert!(p.allows(&peer(1000, 5), 1000));
        assert!(!p.allows(&peer(1001, 1000), 1000));
        assert!(!p.allows(&peer(65534, 65534), 0));
    }

    #[test]
    fn the_own_user_is_the_one_given_at_the_check() {
        // After a switch of user (--user), the new uid is allowed and the
        // old one (other than root) is not.
        let p = PeerPolicy::default();
        assert!(p.allows(&peer(107, 107), 107));
        assert!(!p.allows(&peer(107, 107), 108));
    }

    #[test]
    fn listed_uids_and_gids_are_allowed() {
        let p = PeerPolicy {
            uids: vec![65534, 1001],
            gids: vec![36],
        };
        assert!(p.allows(&peer(65534, 65534), 0));
        assert!(p.allows(&peer(1001, 1), 0));
        assert!(p.allows(&peer(2000, 36), 0));
        assert!(!p.allows(&peer(2000, 37), 0));
        assert!(
            !p.allows(&peer(36, 2000), 0),
            "a gid list is not a uid list"
        );
        assert!(
            !p.allows(&peer(2000, 65534), 0),
            "a uid list is not a gid list"
        );
    }

    #[test]
    fn the_first_refusal_is_logged_then_one_line_per_interval_with_a_count() {
        let t0 = Instant::now();
        let mut log = RefusalLog::with_interval(REFUSAL_LOG_INTERVAL);
        let p = peer(65534, 65534);
        let first = log.refused(t0, &p, "export e0").expect("first is logged");
        assert!(
            first.starts_with("export e0: refused a connection from pid 42 uid 65534 gid 65534"),
            "{first}"
        );
        assert!(!first.contains("more refused"), "{first}");
        for i in 1..=37u64 {
            let t = t0 + Duration::from_millis(i * 200);
            assert_eq!(log.refused(t, &p, "export e0"), None, "refusal {i}");
        }
        let t1 = t0 + REFUSAL_LOG_INTERVAL;
        let line = log.refused(t1, &p, "export e0").expect("due again");
        assert!(
            line.ends_with("... and 37 more refused connections since the last report"),
            "{line}"
        );
        // The window starts again at the line just logged.
        assert_eq!(
            log.refused(t1 + Duration::from_secs(9), &p, "export e0"),
            None
        );
        let line = log
            .refused(t1 + REFUSAL_LOG_INTERVAL, &p, "export e0")
            .expect("due again");
        assert!(line.ends_with("... and 1 more refused connection since the last report"));
        // After a quiet spell, a refusal is logged alone.
        let line = log
            .refused(t1 + REFUSAL_LOG_INTERVAL * 5, &p, "export e0")
            .expect("due");
        assert!(!line.contains("more refused"), "{line}");
    }

    #[test]
    fn a_clock_going_backwards_does_not_unlock_the_log() {
        let t0 = Instant::now() + Duration::from_secs(100);
        let mut log = RefusalLog::with_interval(REFUSAL_LOG_INTERVAL);
        let p = peer(1, 1);
        assert!(log.refused(t0, &p, "x").is_some());
        assert_eq!(log.refused(t0 - Duration::from_secs(50), &p, "x"), None);
    }

    #[test]
    fn peer_cred_reads_our_own_credentials_over_a_socket_pair() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let c = peer_cred(&a).unwrap();
        assert_eq!(c.pid, std::process::id() as i32);
        assert_eq!(c.uid, own_euid());
        // SAFETY: getegid takes no arguments and cannot fail.
        assert_eq!(c.gid, unsafe { libc::getegid() });
    }

    #[test]
    fn check_allows_our_own_connection() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut log = RefusalLog::new();
        assert!(check(&a, "test", &mut log));
    }
}
