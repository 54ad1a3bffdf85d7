//! Listening on a UNIX socket path that may hold a stale socket file.
//!
//! A socket file left by a process that is gone is replaced; one that a
//! live process still listens on (another export of ours, another daemon)
//! is not: taking its path over would silently cut that server off from
//! every new client. Live means a connect() to the path succeeds; only a
//! refused connection (ECONNREFUSED: nobody listens) proves it stale.
//!
//! Every UNIX socket the daemon creates (exports, monitors) is bound by
//! [`bind`], which gives it the mode, group and owner set by
//! `--socket-mode`, `--socket-group`, `--socket-owner` ([`set_perms`]).
//! Without them the socket is created as qemu-storage-daemon creates it:
//! mode 0777 minus the umask, owned by the daemon's user and group. With
//! them there is no window in which the socket is reachable more widely:
//! the socket's inode is made owner-only (fchmod) before bind, so the file
//! appears owner-only; then it gets its owner and group, and last its mode.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::OnceLock;

/// The mode and ownership of the sockets the daemon creates; `None` keeps
/// what bind() gives (umask, the daemon's user and group).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SocketPerms {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

static PERMS: OnceLock<SocketPerms> = OnceLock::new();

/// Sets the permissions of every socket bound from now on; the first call
/// wins (the shell makes it once, at start-up).
pub fn set_perms(perms: SocketPerms) {
    let _ = PERMS.set(perms);
}

fn perms() -> SocketPerms {
    PERMS.get().copied().unwrap_or_default()
}

/// Parses `--socket-mode`: octal permission bits, at most 0777.
pub fn parse_mode(s: &str) -> Result<u32, String> {
    match u32::from_str_radix(s, 8) {
        Ok(m) if m <= 0o777 => Ok(m),
        _ => Err(format!(
            "'{s}' is not an octal mode of permission bits (0000 to 0777)"
        )),
    }
}

/// Parses `--socket-group`: a group name or number.
pub fn parse_group(s: &str) -> Result<u32, String> {
    if let Ok(n) = s.parse::<u32>() {
        return Ok(n);
    }
    let name = CString::new(s).map_err(|_| format!("no group '{s}'"))?;
    // SAFETY: an all-zero group is a valid value of this plain C struct.
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut out: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is to a live local of the size given.
    let r = unsafe {
        libc::getgrnam_r(
            name.as_ptr(),
            &mut grp,
            buf.as_mut_ptr(),
            buf.len(),
            &mut out,
        )
    };
    if r != 0 || out.is_null() {
        return Err(format!("no group '{s}'"));
    }
    Ok(grp.gr_gid)
}

/// Parses `--socket-owner`: a user name or number.
pub fn parse_owner(s: &str) -> Result<u32, String> {
    if let Ok(n) = s.parse::<u32>() {
        return Ok(n);
    }
    user_entry(s).map(|u| u.uid)
}

/// A user's account: its uid, primary gid and name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserEntry {
    pub uid: u32,
    pub gid: u32,
    pub name: String,
}

/// Looks a user up by name, or by number when `s` is one; Err names it
/// when there is no such account.
pub fn user_entry(s: &str) -> Result<UserEntry, String> {
    // SAFETY: an all-zero passwd is a valid value of this plain C struct.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut out: *mut libc::passwd = std::ptr::null_mut();
    let r = if let Ok(uid) = s.parse::<u32>() {
        // SAFETY: every pointer is to a live local of the size given.
        unsafe { libc::getpwuid_r(uid, &mut pw, buf.as_mut_ptr(), buf.len(), &mut out) }
    } else {
        let name = CString::new(s).map_err(|_| format!("no user '{s}'"))?;
        // SAFETY: every pointer is to a live local of the size given.
        unsafe {
            libc::getpwnam_r(
                name.as_ptr(),
                &mut pw,
                buf.as_mut_ptr(),
                buf.len(),
                &mut out,
            )
        }
    };
    if r != 0 || out.is_null() {
        return Err(format!("no user '{s}'"));
    }
    // SAFETY: getpw*_r filled pw_name with a NUL-terminated string in buf.
    let name = unsafe { std::ffi::CStr::from_ptr(pw.pw_name) }
        .to_string_lossy()
        .into_owned();
    Ok(UserEntry {
        uid: pw.pw_uid,
        gid: pw.pw_gid,
        name,
    })
}

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

/// Listens on `path`: a stale socket file there is replaced (other kinds
/// of file too with `any_file`), a live server's path is refused, and the
/// socket gets the configured mode and ownership before anyone can reach it.
pub fn bind(path: &Path, any_file: bool) -> io::Result<UnixListener> {
    remove_stale(path, any_file)?;
    let perms = perms();
    if perms == SocketPerms::default() {
        return UnixListener::bind(path);
    }
    bind_with_perms(path, perms)
}

fn bind_with_perms(path: &Path, perms: SocketPerms) -> io::Result<UnixListener> {
    use std::os::fd::{FromRawFd, OwnedFd};
    let cpath = cstr(path)?;
    // SAFETY: an all-zero sockaddr_un is a valid value of this C struct.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = cpath.as_bytes();
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "path must be shorter than SUN_LEN",
        ));
    }
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: socket() takes no pointers.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    use std::os::fd::AsRawFd;
    let raw = fd.as_raw_fd();
    // Linux creates the socket file with the mode of the socket's inode
    // minus the umask: owner-only here, so until the owner, group and
    // mode below are set, only the daemon's own user can connect.
    let mode = perms.mode.unwrap_or(0o777 & !current_umask());
    // SAFETY: fchmod on a descriptor we own.
    if unsafe { libc::fchmod(raw, mode & 0o700) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: `addr` is a live, initialised sockaddr_un of `len` bytes.
    if unsafe { libc::bind(raw, (&addr as *const libc::sockaddr_un).cast(), len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let undo = |e: io::Error| {
        let _ = std::fs::remove_file(path);
        e
    };
    if perms.uid.is_some() || perms.gid.is_some() {
        let uid = perms.uid.unwrap_or(u32::MAX);
        let gid = perms.gid.unwrap_or(u32::MAX);
        // SAFETY: a NUL-terminated path; -1 (u32::MAX) leaves an id as is.
        if unsafe { libc::lchown(cpath.as_ptr(), uid, gid) } != 0 {
            let e = io::Error::last_os_error();
            return Err(undo(io::Error::new(
                e.kind(),
                format!("cannot give the socket owner {uid} group {gid}: {e}"),
            )));
        }
    }
    // Now the full mode, never through a symlink.
    // SAFETY: a NUL-terminated path and a mode.
    let r = unsafe {
        libc::fchmodat(
            libc::AT_FDCWD,
            cpath.as_ptr(),
            mode,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r != 0 {
        return Err(undo(io::Error::last_os_error()));
    }
    // SAFETY: listen on a bound socket we own.
    if unsafe { libc::listen(raw, 128) } != 0 {
        return Err(undo(io::Error::last_os_error()));
    }
    Ok(UnixListener::from(fd))
}

/// The process's umask, read by setting it and back at once: a file
/// another thread creates in between gets 0077 masked off, never more
/// access. Only with --socket-group/--socket-owner and no --socket-mode.
fn current_umask() -> u32 {
    // SAFETY: umask takes and returns a mode.
    let m = unsafe { libc::umask(0o077) };
    // SAFETY: as above, restoring it.
    unsafe { libc::umask(m) };
    m
}

/// Fails with `AddrInUse` when a server answers on the socket at `path`.
/// Ok when there is no socket file there, or a stale one.
pub fn check_not_live(path: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {}
        _ => return Ok(()),
    }
    match UnixStream::connect(path) {
        // The probe connection closes at once; the server sees a client
        // that went away before saying anything.
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            "a server is listening on this socket (another export or process); \
             refusing to take its path over",
        )),
        Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io::Error::new(
            e.kind(),
            format!("cannot tell whether a server listens on this socket: {e}"),
        )),
    }
}

/// Removes a stale socket file at `path` (after [`check_not_live`]); other
/// kinds of file are left alone (bind then fails on them) unless
/// `any_file`.
pub fn remove_stale(path: &Path, any_file: bool) -> io::Result<()> {
    check_not_live(path)?;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() || (any_file && !m.is_dir()) => {
            match std::fs::remove_file(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            }
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn live_socket_is_kept_and_stale_one_removed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.sock");
        let l = UnixListener::bind(&p).unwrap();
        let e = remove_stale(&p, true).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
        assert!(p.exists());
        drop(l);
        remove_stale(&p, false).unwrap();
        assert!(!p.exists());
        remove_stale(&p, false).unwrap();
    }

    #[test]
    fn bound_with_perms_and_never_over_an_existing_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.sock");
        std::fs::write(&p, b"x").unwrap();
        let perms = SocketPerms {
            mode: Some(0o640),
            uid: None,
            gid: None,
        };
        bind_with_perms(&p, perms).unwrap_err();
        assert!(!std::fs::symlink_metadata(&p)
            .unwrap()
            .file_type()
            .is_socket());
        std::fs::remove_file(&p).unwrap();
        let l = bind_with_perms(&p, perms).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let m = std::fs::symlink_metadata(&p).unwrap();
        assert!(m.file_type().is_socket());
        assert_eq!(m.permissions().mode() & 0o7777, 0o640);
        UnixStream::connect(&p).unwrap();
        drop(l);
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "only the socket is left");
        assert_eq!(parse_mode("0660"), Ok(0o660));
        assert!(parse_mode("0999").is_err() && parse_mode("4755").is_err());
        assert_eq!(parse_group("0"), Ok(0));
        assert_eq!(parse_owner("root"), Ok(0));
        assert!(parse_group("no-such-group-xyz").is_err());
    }

    #[test]
    fn regular_file_is_removed_only_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"x").unwrap();
        remove_stale(&p, false).unwrap();
        assert!(p.exists());
        remove_stale(&p, true).unwrap();
        assert!(!p.exists());
    }
}
