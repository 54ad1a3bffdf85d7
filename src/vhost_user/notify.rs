//! Config-change notices (CONFIG_CHANGE_MSG) on the backend request channel.
//!
//! The vhost crate (0.18) takes the channel's socket when the frontend sends
//! SET_BACKEND_REQ_FD and wraps it in a `Backend` that cannot send this
//! message and does not expose the socket. Until it can, we find the socket
//! among our open descriptors when it arrives and keep a duplicate:
//!
//! ```text
//!   candidates = AF_UNIX stream sockets, connected, with no local name,
//!                whose peer is the process of this export's connection
//!                (the accepted socket named like our listener),
//!                not already claimed by another export
//!   exactly one candidate -> dup it; otherwise send no notices (logged)
//! ```
//!
//! So a notice never goes to the wrong frontend; at worst none is sent and
//! the guest sees the new size when it next reads the config space.

use std::collections::{BTreeSet, HashSet};
use std::ffi::OsStr;
use std::io::{self, Write};
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::sync::Mutex;

/// Sockets claimed as backend channels, by inode.
static CLAIMED: Mutex<BTreeSet<u64>> = Mutex::new(BTreeSet::new());

/// The backend channel of one connection.
pub struct ConfigNotifier {
    stream: Mutex<UnixStream>,
    inode: u64,
}

struct SockInfo {
    fd: RawFd,
    inode: u64,
    /// The socket's own address (empty when unnamed).
    name: Vec<u8>,
    peer_pid: Option<i32>,
}

pub(super) fn getsockopt_int(fd: RawFd, opt: libc::c_int) -> Option<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `v`, a live local.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    (r == 0).then_some(v)
}

fn sock_name(fd: RawFd, peer: bool) -> Option<Vec<u8>> {
    // SAFETY: sockaddr_un is plain data; zeroed is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    let p = (&mut addr as *mut libc::sockaddr_un).cast();
    // SAFETY: the kernel writes at most `len` bytes into `addr`.
    let r = unsafe {
        if peer {
            libc::getpeername(fd, p, &mut len)
        } else {
            libc::getsockname(fd, p, &mut len)
        }
    };
    if r != 0 {
        return None;
    }
    let path_len = (len as usize).saturating_sub(std::mem::size_of::<libc::sa_family_t>());
    let bytes: Vec<u8> = addr.sun_path[..path_len.min(addr.sun_path.len())]
        .iter()
        .map(|&c| c as u8)
        .take_while(|&c| c != 0)
        .collect();
    Some(bytes)
}

fn peer_pid(fd: RawFd) -> Option<i32> {
    // SAFETY: ucred is plain data.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (r == 0).then_some(cred.pid)
}

/// The connected AF_UNIX stream sockets this process holds.
fn unix_stream_sockets() -> Vec<SockInfo> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<RawFd>().ok())
        else {
            continue;
        };
        // SAFETY: stat is plain data; fstat fills it for an open fd (or fails).
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: `st` is a live local the kernel writes into.
        if unsafe { libc::fstat(fd, &mut st) } != 0 || st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
            continue;
        }
        if getsockopt_int(fd, libc::SO_DOMAIN) != Some(libc::AF_UNIX)
            || getsockopt_int(fd, libc::SO_TYPE) != Some(libc::SOCK_STREAM)
            || sock_name(fd, true).is_none()
        {
            continue;
        }
        out.push(SockInfo {
            fd,
            inode: st.st_ino,
            name: sock_name(fd, false).unwrap_or_default(),
            peer_pid: peer_pid(fd),
        });
    }
    out
}

impl ConfigNotifier {
    /// Finds the backend channel that just arrived on the connection
    /// accepted from the listener named `listener_name`.
    pub fn find(listener_name: &OsStr) -> Option<ConfigNotifier> {
        let mut claimed = CLAIMED.lock().unwrap_or_else(|e| e.into_inner());
        let socks = unix_stream_sockets();
        let name = listener_name.as_bytes();
        let frontends: HashSet<i32> = socks
            .iter()
            .filter(|s| !name.is_empty() && s.name == name)
            .filter_map(|s| s.peer_pid)
            .collect();
        if frontends.len() != 1 {
            log::warn!(
                "backend channel: cannot tell the frontend's process; no config-change notices"
            );
            return None;
        }
        let candidates: Vec<&SockInfo> = socks
            .iter()
            .filter(|s| s.name.is_empty() && s.peer_pid.is_some_and(|p| frontends.contains(&p)))
            .filter(|s| !claimed.contains(&s.inode))
            .collect();
        let [only] = candidates.as_slice() else {
            log::warn!(
                "backend channel: {} candidate sockets; no config-change notices for this connection",
                candidates.len()
            );
            return None;
        };
        // SAFETY: fcntl duplicates an fd we hold open; the duplicate is ours.
        let dup = unsafe { libc::fcntl(only.fd, libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            return None;
        }
        claimed.insert(only.inode);
        // SAFETY: `dup` is a fresh descriptor that nothing else owns.
        let stream = unsafe { UnixStream::from_raw_fd(dup) };
        Some(ConfigNotifier {
            stream: Mutex::new(stream),
            inode: only.inode,
        })
    }

    /// Sends CONFIG_CHANGE_MSG: the frontend re-reads the config space and
    /// tells the guest.
    pub fn notify(&self) -> io::Result<()> {
        const CONFIG_CHANGE_MSG: u32 = 2;
        const VERSION_1: u32 = 0x1;
        let mut msg = [0u8; 12];
        msg[0..4].copy_from_slice(&CONFIG_CHANGE_MSG.to_le_bytes());
        msg[4..8].copy_from_slice(&VERSION_1.to_le_bytes());
        self.stream
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .write_all(&msg)
    }
}

impl Drop for ConfigNotifier {
    fn drop(&mut self) {
        CLAIMED
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.inode);
    }
}

/// The name a listening socket was bound to.
pub fn listener_name(fd: RawFd) -> Vec<u8> {
    sock_name(fd, false).unwrap_or_default()
}
