//! The system calls each thread class may make: the seccomp allow-lists.
//!
//! One readable table per group of calls, with why the group is needed;
//! a thread class is a list of groups (see [`Class::groups`]). The lists
//! were derived by running the whole test suite (Rust, QMP, guest) with
//! `--sandbox log` and reading the kernel's log of what was not listed
//! (`scripts/sandbox-derive.sh`), then trimmed by hand to what the code
//! needs. A call that is not listed kills the daemon with a log line
//! naming the thread and the call (`--sandbox on`), or is allowed and
//! logged by the kernel (`--sandbox log`).
//!
//! Threads inherit their parent's filter and add their own, so a class
//! that starts threads allows everything its children need (checked by a
//! test: [`Class::spawns`]).

// The constants are c_ulong or c_int depending on the architecture.
#![allow(clippy::unnecessary_cast)]

use super::Class;

/// A condition on one argument of a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arg {
    /// Argument `index` equals `value`.
    Eq(u8, u64),
    /// Argument `index` masked with `mask` equals `value`.
    Masked(u8, u64, u64),
    /// Argument `index` equals the daemon's pid (known when the filter is
    /// built).
    OwnPid(u8),
}

/// How a listed call is treated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Allow {
    /// Always allowed.
    Any,
    /// Allowed when every condition holds (a list of alternatives is
    /// written as several entries of the same call).
    If(&'static [Arg]),
    /// Never made; returns this errno instead of killing (where a caller
    /// has a fallback: glibc falls back from clone3 to clone).
    Errno(i32),
}

/// One entry: the call's number, its name (for the log), and the rule.
#[derive(Clone, Copy, Debug)]
pub struct Syscall {
    pub nr: i64,
    pub name: &'static str,
    pub allow: Allow,
}

macro_rules! sys {
    ($name:ident) => {
        Syscall {
            nr: libc::$name,
            name: strip(stringify!($name)),
            allow: Allow::Any,
        }
    };
    ($name:ident, $allow:expr) => {
        Syscall {
            nr: libc::$name,
            name: strip(stringify!($name)),
            allow: $allow,
        }
    };
}

/// "SYS_read" -> "read", at compile time.
const fn strip(s: &'static str) -> &'static str {
    match s.as_bytes() {
        [b'S', b'Y', b'S', b'_', rest @ ..] => match std::str::from_utf8(rest) {
            Ok(r) => r,
            Err(_) => s,
        },
        _ => s,
    }
}

/// BLKGETSIZE64, _IOR(0x12, 114, size_t): a block device's size.
pub const BLKGETSIZE64: u64 = 0x8008_1272;
/// BLKSSZGET, _IO(0x12, 104): its logical sector size.
pub const BLKSSZGET: u64 = 0x1268;

const PROT_EXEC: u64 = libc::PROT_EXEC as u64;
const CLONE_THREAD: u64 = libc::CLONE_THREAD as u64;

/// Every thread: memory, locks, signals, time, logging, exit.
pub const BASE: &[Syscall] = &[
    // The allocator and thread stacks. Never executable memory: no
    // mapping or protection change with PROT_EXEC.
    sys!(SYS_mmap, Allow::If(&[Arg::Masked(2, PROT_EXEC, 0)])),
    sys!(SYS_mprotect, Allow::If(&[Arg::Masked(2, PROT_EXEC, 0)])),
    sys!(SYS_munmap),
    sys!(SYS_mremap),
    sys!(SYS_madvise),
    sys!(SYS_brk),
    // Mutexes, condition variables, channels, thread joins.
    sys!(SYS_futex),
    sys!(SYS_sched_yield),
    // Signal masks and handlers (the SIGSYS and SIGBUS handlers, Rust's
    // stack-overflow handler), signal return.
    sys!(SYS_rt_sigprocmask),
    sys!(SYS_rt_sigaction),
    sys!(SYS_rt_sigreturn),
    // A sleep or wait interrupted by a signal (glibc's setuid broadcast,
    // a stop and continue) resumes with it.
    sys!(SYS_restart_syscall),
    sys!(SYS_sigaltstack),
    // Signals to this process only: abort(), the sandbox's own kill.
    sys!(SYS_tgkill, Allow::If(&[Arg::OwnPid(0)])),
    // QMP quit stops the daemon as SIGTERM does.
    sys!(SYS_kill, Allow::If(&[Arg::OwnPid(0)])),
    sys!(SYS_getpid),
    sys!(SYS_gettid),
    // Who we are (the peer check compares with it at each accept).
    sys!(SYS_geteuid),
    sys!(SYS_getuid),
    sys!(SYS_getegid),
    sys!(SYS_getgid),
    // Time: clocks outside the vDSO, sleeps, timed waits.
    sys!(SYS_clock_gettime),
    sys!(SYS_clock_nanosleep),
    sys!(SYS_nanosleep),
    sys!(SYS_gettimeofday),
    // An iothread's own involuntary context switches (adaptive polling
    // stops on a contended CPU).
    sys!(
        SYS_getrusage,
        Allow::If(&[Arg::Eq(0, libc::RUSAGE_THREAD as u64)])
    ),
    // The log (stderr, a log file or the syslog pipe).
    sys!(SYS_write),
    sys!(SYS_writev),
    sys!(SYS_close),
    // Hash map keys.
    sys!(SYS_getrandom),
    // Thread names (the log shows them; the sandbox's kill line too).
    sys!(
        SYS_prctl,
        Allow::If(&[Arg::Eq(0, libc::PR_SET_NAME as u64)])
    ),
    sys!(
        SYS_prctl,
        Allow::If(&[Arg::Eq(0, libc::PR_GET_NAME as u64)])
    ),
    sys!(SYS_sched_getaffinity),
    // A thread adds its own filter to the one it inherited (it can only
    // narrow what is allowed).
    sys!(
        SYS_prctl,
        Allow::If(&[Arg::Eq(0, libc::PR_SET_NO_NEW_PRIVS as u64)])
    ),
    sys!(
        SYS_seccomp,
        Allow::If(&[Arg::Eq(0, libc::SECCOMP_SET_MODE_FILTER as u64)])
    ),
    sys!(SYS_exit),
    sys!(SYS_exit_group),
];

/// Threads that start threads: clone for threads only (never a new
/// process), and what a new thread does before its own code runs.
pub const SPAWN: &[Syscall] = &[
    sys!(
        SYS_clone,
        Allow::If(&[Arg::Masked(0, CLONE_THREAD, CLONE_THREAD)])
    ),
    // Its flags sit in memory that seccomp cannot read: ENOSYS makes
    // glibc use clone, whose flags are checked above.
    sys!(SYS_clone3, Allow::Errno(libc::ENOSYS)),
    sys!(SYS_set_robust_list),
    sys!(SYS_rseq),
];

/// Image I/O on open descriptors: the synchronous engine, io_uring,
/// flushes, preallocation and discard, block device queries.
pub const IO: &[Syscall] = &[
    sys!(SYS_read),
    sys!(SYS_pread64),
    sys!(SYS_pwrite64),
    sys!(SYS_preadv),
    sys!(SYS_pwritev),
    sys!(SYS_preadv2),
    sys!(SYS_pwritev2),
    sys!(SYS_lseek),
    sys!(SYS_fsync),
    sys!(SYS_fdatasync),
    // Activation of an inactive file node drops its page cache, as QEMU's
    // raw_co_invalidate_cache (POSIX_FADV_DONTNEED).
    sys!(SYS_fadvise64),
    sys!(SYS_fallocate),
    sys!(SYS_ftruncate),
    sys!(SYS_fstat),
    sys!(SYS_newfstatat),
    sys!(SYS_statx),
    sys!(SYS_fcntl),
    // Only the operations the ring was set up for reach the kernel (its
    // restrictions are registered before it is enabled).
    sys!(SYS_io_uring_enter),
    // Block devices: size and sector size (the file driver takes the
    // numbers from here, so that it issues no other).
    sys!(SYS_ioctl, Allow::If(&[Arg::Eq(1, BLKGETSIZE64)])),
    sys!(SYS_ioctl, Allow::If(&[Arg::Eq(1, BLKSSZGET)])),
];

/// An iothread's loop: epoll, eventfds, its throttle timerfd.
pub const EVENT_LOOP: &[Syscall] = &[
    sys!(SYS_epoll_wait),
    sys!(SYS_epoll_pwait),
    sys!(SYS_epoll_ctl),
    sys!(SYS_timerfd_settime),
    sys!(SYS_timerfd_gettime),
    sys!(SYS_ppoll),
    sys!(SYS_poll),
    // A worker ends the connection of a frontend that broke the protocol.
    sys!(SYS_shutdown),
];

/// Threads that open nothing. glibc's malloc may read
/// /sys/devices/system/cpu/online when a thread first needs an arena (the
/// event thread did, once), and does without it: that open fails instead
/// of killing.
pub const NO_FILES: &[Syscall] = &[sys!(SYS_openat, Allow::Errno(libc::EACCES))];

/// Socket options std sets on descriptors (FIONBIO for non-blocking,
/// FIOCLEX for close-on-exec).
pub const SOCKET_FLAGS: &[Syscall] = &[
    sys!(SYS_ioctl, Allow::If(&[Arg::Eq(1, libc::FIONBIO as u64)])),
    sys!(SYS_ioctl, Allow::If(&[Arg::Eq(1, libc::FIOCLEX as u64)])),
];

/// The vhost-user protocol thread of an export: messages with descriptors
/// on the UNIX socket, guest memory mapped from them, the iothreads'
/// epolls, eventfds and rings set up.
pub const VHOST_USER: &[Syscall] = &[
    sys!(SYS_accept4),
    sys!(SYS_accept),
    // Whether guest memory is on hugetlbfs (vm-memory asks).
    sys!(SYS_fstatfs),
    sys!(SYS_recvmsg),
    sys!(SYS_sendmsg),
    sys!(SYS_recvfrom),
    sys!(SYS_sendto),
    sys!(SYS_shutdown),
    sys!(SYS_getsockopt),
    sys!(SYS_getsockname),
    sys!(SYS_getpeername),
    sys!(SYS_epoll_create1),
    sys!(SYS_eventfd2),
    sys!(SYS_timerfd_create),
    sys!(SYS_io_uring_setup),
    sys!(SYS_io_uring_register),
    sys!(SYS_dup),
    sys!(SYS_dup3),
    // GET_INFLIGHT_FD: the inflight buffer is a sealed memfd (ftruncate,
    // fcntl F_ADD_SEALS and the shared mmap are in IO and BASE).
    sys!(SYS_memfd_create),
    // The backend channel is found among this process's descriptors.
    sys!(SYS_openat),
    sys!(SYS_getdents64),
    sys!(SYS_readlinkat),
    // The export's socket file goes when its accept loop ends.
    sys!(SYS_unlinkat),
    #[cfg(target_arch = "x86_64")]
    sys!(SYS_unlink),
];

/// The NBD server (issue 22), kept apart from the NBD client's network
/// calls: its accept thread and client threads (class Control) accept,
/// set SO_RCVTIMEO for the handshake deadline and TCP_NODELAY, and shut
/// sockets down. They never create one.
pub const NBD_SERVER: &[Syscall] = &[
    sys!(SYS_setsockopt),
    sys!(SYS_getsockname),
    sys!(SYS_accept4),
    sys!(SYS_shutdown),
];

/// nbd-server-start on TCP: the monitor creates, binds and listens on a
/// TCP socket. Only with `--allow-tcp-bind` (see [`Class::extra_groups`]):
/// otherwise the monitor has no TCP socket at all, and nbd-server-start
/// over TCP is refused with a message before any call. --nbd-server binds
/// at start-up, before any filter. Landlock allows the bind only on the
/// configured ports (landlock.rs).
pub const NBD_TCP_LISTEN: &[Syscall] = &[
    sys!(SYS_socket, Allow::If(&[Arg::Eq(0, libc::AF_INET as u64)])),
    sys!(SYS_socket, Allow::If(&[Arg::Eq(0, libc::AF_INET6 as u64)])),
    sys!(SYS_setsockopt),
    sys!(SYS_bind),
    sys!(SYS_listen),
    sys!(SYS_getsockname),
];

/// Block jobs: their own executor and ring; a job that puts another
/// node under an export tells the frontend over the vhost-user backend
/// channel.
pub const JOB: &[Syscall] = &[
    sys!(SYS_sendto),
    sys!(SYS_sendmsg),
    sys!(SYS_recvfrom),
    sys!(SYS_recvmsg),
    sys!(SYS_io_uring_setup),
    sys!(SYS_io_uring_register),
    sys!(SYS_eventfd2),
    sys!(SYS_epoll_create1),
];

/// Helper threads: throttle timers, event delivery to QMP clients, the
/// syslog pipe, the systemd watchdog, export removal.
pub const HELPER: &[Syscall] = &[
    // The throttle timer's precision (as QEMU).
    sys!(
        SYS_prctl,
        Allow::If(&[Arg::Eq(0, libc::PR_SET_TIMERSLACK as u64)])
    ),
    sys!(SYS_read),
    sys!(SYS_sendmsg),
    sys!(SYS_sendto),
    sys!(SYS_socket, Allow::If(&[Arg::Eq(0, libc::AF_UNIX as u64)])),
    sys!(SYS_connect),
];

/// A network block driver's threads (nbd): TCP or UNIX stream sockets to
/// the server, made and connected again when it went away (Landlock
/// limits the TCP ports), and the request completions they signal to
/// the iothreads' eventfds (write, in BASE). Never bind, listen or accept.
pub const NETWORK: &[Syscall] = &[
    sys!(SYS_socket, Allow::If(&[Arg::Eq(0, libc::AF_UNIX as u64)])),
    sys!(SYS_socket, Allow::If(&[Arg::Eq(0, libc::AF_INET as u64)])),
    sys!(SYS_socket, Allow::If(&[Arg::Eq(0, libc::AF_INET6 as u64)])),
    sys!(SYS_connect),
    // TCP_NODELAY, the handshake's timeouts.
    sys!(SYS_setsockopt),
    // SO_ERROR after a connect with a timeout.
    sys!(SYS_getsockopt),
    sys!(SYS_poll),
    sys!(SYS_ppoll),
    sys!(SYS_read),
    sys!(SYS_readv),
    sys!(SYS_recvfrom),
    sys!(SYS_recvmsg),
    sys!(SYS_sendto),
    sys!(SYS_sendmsg),
    sys!(SYS_shutdown),
    sys!(SYS_fcntl),
];

/// Files by name: opened, created, removed, locked, their ownership and
/// mode (blockdev-add, blockdev-create, snapshots, mirror targets, socket
/// files). Landlock decides where.
pub const FILES: &[Syscall] = &[
    sys!(SYS_openat),
    sys!(SYS_unlinkat),
    sys!(SYS_renameat),
    sys!(SYS_renameat2),
    sys!(SYS_linkat),
    sys!(SYS_readlinkat),
    sys!(SYS_getdents64),
    sys!(SYS_getcwd),
    sys!(SYS_flock),
    sys!(SYS_fchmod),
    sys!(SYS_fchmodat),
    sys!(SYS_fchown),
    sys!(SYS_fchownat),
    sys!(SYS_umask),
];

/// The QMP monitor's own: UNIX sockets bound (block-export-add) and
/// descriptors received (getfd, add-fd). Never another socket family.
pub const SOCKETS: &[Syscall] = &[
    sys!(SYS_socket, Allow::If(&[Arg::Eq(0, libc::AF_UNIX as u64)])),
    sys!(
        SYS_socketpair,
        Allow::If(&[Arg::Eq(0, libc::AF_UNIX as u64)])
    ),
    sys!(SYS_bind),
    sys!(SYS_listen),
    sys!(SYS_connect),
    sys!(SYS_setsockopt),
    sys!(SYS_pipe2),
    sys!(SYS_memfd_create),
];

/// The older path calls std and glibc still use on x86_64 (remove_file
/// is unlink, canonicalize reads links, socket ownership is lchown).
#[cfg(target_arch = "x86_64")]
pub const PATHS_X86: &[Syscall] = &[
    sys!(SYS_unlink),
    sys!(SYS_readlink),
    sys!(SYS_lchown),
    sys!(SYS_chown),
    sys!(SYS_chmod),
    sys!(SYS_stat),
    sys!(SYS_lstat),
    sys!(SYS_access),
    sys!(SYS_rename),
    sys!(SYS_link),
];
#[cfg(not(target_arch = "x86_64"))]
pub const PATHS_X86: &[Syscall] = &[];

/// The main thread once serving: waits for SIGTERM/SIGINT/SIGHUP, then
/// drains, flushes, removes its sockets and pidfile.
pub const MAIN: &[Syscall] = &[
    sys!(SYS_rt_sigtimedwait),
    #[cfg(target_arch = "x86_64")]
    sys!(SYS_unlink),
    sys!(SYS_unlinkat),
    sys!(SYS_sendmsg),
    sys!(SYS_sendto),
    sys!(SYS_socket, Allow::If(&[Arg::Eq(0, libc::AF_UNIX as u64)])),
    sys!(SYS_connect),
];

/// A storage cluster's client library (librados, for the rbd driver) and
/// the threads it starts: TCP connections to the monitors and OSDs
/// (IPv4/IPv6 only; Landlock allows the Ceph ports), its configuration
/// and keyring read at connect time, its own event loops (epoll, a pipe
/// and eventfds to wake them). Derived with scripts/sandbox-derive.sh
/// on tests/rbd.rs.
pub const CLUSTER: &[Syscall] = &[
    sys!(
        SYS_socket,
        Allow::If(&[Arg::Masked(0, 0xffff, libc::AF_INET as u64)])
    ),
    sys!(
        SYS_socket,
        Allow::If(&[Arg::Masked(0, 0xffff, libc::AF_INET6 as u64)])
    ),
    sys!(SYS_connect),
    sys!(SYS_setsockopt),
    sys!(SYS_getsockopt),
    sys!(SYS_getsockname),
    sys!(SYS_getpeername),
    sys!(SYS_sendmsg),
    sys!(SYS_recvmsg),
    sys!(SYS_sendto),
    sys!(SYS_recvfrom),
    sys!(SYS_epoll_create1),
    #[cfg(target_arch = "x86_64")]
    sys!(SYS_epoll_create),
    sys!(SYS_eventfd2),
    sys!(SYS_pipe2),
    sys!(SYS_timerfd_create),
    sys!(SYS_openat),
    sys!(SYS_getdents64),
    sys!(SYS_uname),
];

/// Loading a shared library (librbd and librados at the first rbd node,
/// Ceph's plugins at the first connection): the dynamic loader maps the
/// library's files with their code executable. Only file mappings (no
/// MAP_ANONYMOUS) may be executable, and Landlock lets only the library
/// directory be read; anonymous memory stays never executable.
pub const LIBRARY_LOAD: &[Syscall] = &[
    sys!(
        SYS_mmap,
        Allow::If(&[Arg::Masked(3, libc::MAP_ANONYMOUS as u64, 0)])
    ),
    sys!(SYS_statfs),
    // ld.so: access("/etc/ld.so.preload").
    #[cfg(target_arch = "x86_64")]
    sys!(SYS_access),
    sys!(SYS_faccessat),
    sys!(SYS_openat),
    sys!(SYS_read),
    sys!(SYS_pread64),
    sys!(SYS_fstat),
    sys!(SYS_newfstatat),
];

/// Calls made by none of our threads, named in the kill line.
pub const NAMED: &[(i64, &str)] = &[
    (libc::SYS_execve, "execve"),
    (libc::SYS_execveat, "execveat"),
    (libc::SYS_ptrace, "ptrace"),
    (libc::SYS_socket, "socket"),
    (libc::SYS_fork, "fork"),
    (libc::SYS_vfork, "vfork"),
    (libc::SYS_kill, "kill"),
    (libc::SYS_open, "open"),
    (libc::SYS_mount, "mount"),
    (libc::SYS_setuid, "setuid"),
    (libc::SYS_process_vm_readv, "process_vm_readv"),
    (libc::SYS_process_vm_writev, "process_vm_writev"),
];

impl Class {
    /// The groups of calls this class may make.
    pub fn groups(self) -> &'static [&'static [Syscall]] {
        match self {
            Class::Iothread => &[BASE, IO, EVENT_LOOP, NO_FILES],
            Class::Control => &[
                BASE,
                SPAWN,
                IO,
                EVENT_LOOP,
                SOCKET_FLAGS,
                VHOST_USER,
                NBD_SERVER,
            ],
            Class::Job => &[BASE, IO, EVENT_LOOP, JOB, FILES, PATHS_X86],
            Class::Helper => &[BASE, SPAWN, SOCKET_FLAGS, HELPER, NO_FILES],
            Class::Cluster => &[
                BASE,
                SPAWN,
                IO,
                EVENT_LOOP,
                SOCKET_FLAGS,
                CLUSTER,
                LIBRARY_LOAD,
            ],
            Class::Network => &[BASE, SOCKET_FLAGS, NETWORK, NO_FILES],
            Class::Monitor => &[
                BASE,
                SPAWN,
                IO,
                EVENT_LOOP,
                SOCKET_FLAGS,
                VHOST_USER,
                JOB,
                HELPER,
                FILES,
                SOCKETS,
                NETWORK,
                NBD_SERVER,
                PATHS_X86,
            ],
            Class::Main => &[BASE, IO, EVENT_LOOP, MAIN, NO_FILES],
        }
    }

    /// Groups a class has only as the configuration says: the monitor's
    /// TCP listening socket for nbd-server-start with `--allow-tcp-bind`.
    pub fn extra_groups(self) -> &'static [&'static [Syscall]] {
        match self {
            Class::Monitor if super::tcp_bind_allowed() => &[NBD_TCP_LISTEN],
            _ => &[],
        }
    }

    /// The classes of the threads a thread of this class starts after its
    /// filter is in place (they inherit it).
    pub fn spawns(self) -> &'static [Class] {
        match self {
            Class::Iothread | Class::Helper | Class::Job | Class::Main | Class::Network => &[],
            Class::Cluster => &[Class::Cluster],
            Class::Control => &[Class::Control, Class::Iothread],
            Class::Monitor => &[
                Class::Monitor,
                Class::Control,
                // x-blockdev-set-iothread starts an export's new threads.
                Class::Iothread,
                Class::Job,
                Class::Helper,
                Class::Network,
            ],
        }
    }

    /// Every entry of this class's groups.
    pub fn syscalls(self) -> impl Iterator<Item = &'static Syscall> {
        self.groups().iter().flat_map(|g| g.iter())
    }
}

/// The name of call `nr`, if any table knows it.
pub fn name(nr: i64) -> Option<&'static str> {
    let all = [
        BASE,
        SPAWN,
        IO,
        EVENT_LOOP,
        NO_FILES,
        SOCKET_FLAGS,
        VHOST_USER,
        JOB,
        HELPER,
        FILES,
        SOCKETS,
        NETWORK,
        PATHS_X86,
        MAIN,
        CLUSTER,
        LIBRARY_LOAD,
    ];
    all.iter()
        .flat_map(|g| g.iter())
        .find(|s| s.nr == nr)
        .map(|s| s.name)
        .or_else(|| NAMED.iter().find(|(n, _)| *n == nr).map(|(_, s)| *s))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allows(class: Class, s: &Syscall) -> bool {
        class
            .syscalls()
            .any(|c| c.nr == s.nr && (c.allow == s.allow || c.allow == Allow::Any))
    }

    #[test]
    fn a_parent_allows_everything_its_children_need() {
        for parent in Class::ALL {
            for child in parent.spawns() {
                for s in child.syscalls() {
                    assert!(
                        allows(parent, s),
                        "{parent:?} starts {child:?} threads but does not allow {} ({:?})",
                        s.name,
                        s.allow
                    );
                }
            }
        }
    }

    #[test]
    fn names_come_without_the_prefix() {
        assert_eq!(name(libc::SYS_pwritev2), Some("pwritev2"));
        assert_eq!(name(libc::SYS_execve), Some("execve"));
    }

    #[test]
    fn the_guest_facing_thread_cannot_open_files_or_start_anything() {
        // glibc's malloc may try to open a file there: it gets EACCES.
        assert!(Class::Iothread
            .syscalls()
            .filter(|s| s.nr == libc::SYS_openat)
            .all(|s| s.allow == Allow::Errno(libc::EACCES)));
        for forbidden in [
            libc::SYS_socket,
            libc::SYS_clone,
            libc::SYS_execve,
            libc::SYS_io_uring_setup,
            libc::SYS_connect,
        ] {
            assert!(
                !Class::Iothread.syscalls().any(|s| s.nr == forbidden),
                "{:?}",
                name(forbidden)
            );
        }
    }
}
