//! Listening on a UNIX socket path that may hold a stale socket file.
//!
//! A socket file left by a process that is gone is replaced; one that a
//! live process still listens on (another export of ours, another daemon)
//! is not: taking its path over would silently cut that server off from
//! every new client. Live means a connect() to the path succeeds; only a
//! refused connection (ECONNREFUSED: nobody listens) proves it stale.

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::Path;

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
