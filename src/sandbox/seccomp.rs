//! Seccomp filters built from syscalls.rs, and the SIGSYS handler that
//! names a refused call before the daemon dies of it.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use super::syscalls::{self, Allow, Arg};
use super::{Class, Mode};

#[cfg(target_arch = "x86_64")]
const ARCH: TargetArch = TargetArch::x86_64;
#[cfg(target_arch = "aarch64")]
const ARCH: TargetArch = TargetArch::aarch64;
#[cfg(target_arch = "riscv64")]
const ARCH: TargetArch = TargetArch::riscv64;

fn condition(a: Arg, pid: u64) -> Result<SeccompCondition, seccompiler::BackendError> {
    let (index, op, value) = match a {
        Arg::Eq(i, v) => (i, SeccompCmpOp::Eq, v),
        Arg::Masked(i, mask, v) => (i, SeccompCmpOp::MaskedEq(mask), v),
        Arg::OwnPid(i) => (i, SeccompCmpOp::Eq, pid),
    };
    // Every argument we compare is an int or flags that fit 32 bits
    // except the mmap/mprotect protections and ioctl requests, which do
    // too; comparing the low word keeps the programs short.
    SeccompCondition::new(index, SeccompCmpArgLen::Dword, op, value)
}

/// The BPF program of `class`: its calls allowed, errno entries returned,
/// anything else trapped (on) or logged (log).
pub fn program(class: Class, mode: Mode) -> Result<BpfProgram, String> {
    let pid = u64::from(std::process::id());
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    let mut errnos: BTreeMap<i64, i32> = BTreeMap::new();
    let mut unconditional: Vec<i64> = Vec::new();
    // The monitor starts the network threads of nodes added over QMP and
    // opens their first connection, so its list has the network class's
    // calls; TCP and UDP sockets only where --allow-connect lets a node
    // added later reach a TCP port at all (Landlock refuses any other).
    // Extra groups (the NBD server's TCP listening with --allow-tcp-bind)
    // come on top.
    let inet = class != Class::Monitor || super::tcp_connect_configured();
    let extra = class.extra_groups().iter().flat_map(|g| g.iter());
    for s in class
        .syscalls()
        .filter(|s| inet || !is_inet_socket(s))
        .chain(extra)
    {
        match s.allow {
            Allow::Any => unconditional.push(s.nr),
            Allow::If(conds) => {
                let c = conds
                    .iter()
                    .map(|a| condition(*a, pid))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| format!("{}: {e}", s.name))?;
                let rule = SeccompRule::new(c).map_err(|e| format!("{}: {e}", s.name))?;
                rules.entry(s.nr).or_default().push(rule);
            }
            Allow::Errno(e) => {
                // Allowed here (TRAP outranks ERRNO when programs stack);
                // the errno program below answers it.
                unconditional.push(s.nr);
                errnos.insert(s.nr, e);
            }
        }
    }
    // An unconditional entry wins over conditional ones of the same call
    // (an empty rule list matches always).
    for nr in unconditional {
        rules.insert(nr, Vec::new());
    }
    let mismatch = match mode {
        Mode::Log => SeccompAction::Log,
        _ => SeccompAction::Trap,
    };
    let allow = SeccompFilter::new(rules, mismatch.clone(), SeccompAction::Allow, ARCH)
        .map_err(|e| e.to_string())?;
    let mut prog: BpfProgram = allow
        .try_into()
        .map_err(|e: seccompiler::BackendError| e.to_string())?;
    if !errnos.is_empty() {
        // Errno entries are a second, stacked program: the kernel takes
        // the most restrictive answer, and ERRNO ranks above ALLOW.
        let mut by_errno: BTreeMap<i32, BTreeMap<i64, Vec<SeccompRule>>> = BTreeMap::new();
        for (nr, e) in errnos {
            by_errno.entry(e).or_default().insert(nr, Vec::new());
        }
        let mut extra = Vec::new();
        for (e, rules) in by_errno {
            let f = SeccompFilter::new(
                rules,
                SeccompAction::Allow,
                SeccompAction::Errno(e as u32),
                ARCH,
            )
            .map_err(|e| e.to_string())?;
            let p: BpfProgram = f
                .try_into()
                .map_err(|e: seccompiler::BackendError| e.to_string())?;
            extra.push(p);
        }
        ERRNO_PROGRAMS.with(|x| *x.borrow_mut() = extra);
    }
    Ok(std::mem::take(&mut prog))
}

thread_local! {
    static ERRNO_PROGRAMS: std::cell::RefCell<Vec<BpfProgram>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Installs the filter of `class` on the calling thread.
/// socket() for a family other than AF_UNIX.
fn is_inet_socket(s: &syscalls::Syscall) -> bool {
    s.nr == libc::SYS_socket
        && !matches!(s.allow, Allow::If(c) if c.contains(&Arg::Eq(0, libc::AF_UNIX as u64)))
}

pub fn apply(class: Class, mode: Mode) -> Result<(), String> {
    let prog = program(class, mode)?;
    // The errno programs first: they must not be refused by the allow
    // list (seccomp itself is not on it).
    let extra = ERRNO_PROGRAMS.with(|x| std::mem::take(&mut *x.borrow_mut()));
    for p in &extra {
        seccompiler::apply_filter(p).map_err(|e| e.to_string())?;
    }
    seccompiler::apply_filter(&prog).map_err(|e| e.to_string())
}

/// The SIGSYS handler: a refused call logs one line naming the thread, its
/// class and the call, and the daemon dies of SIGSYS (as if the kernel had
/// killed it, but said why).
pub fn install_sigsys_handler() -> Result<(), String> {
    // SAFETY: an all-zero sigaction is a valid value of this plain C
    // struct; the fields we need are set below.
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    sa.sa_sigaction = on_sigsys as *const () as usize;
    sa.sa_flags = libc::SA_SIGINFO;
    // SAFETY: sigaction reads the struct we pass; the handler only makes
    // async-signal-safe calls.
    if unsafe { libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) } != 0 {
        return Err(format!(
            "cannot install the SIGSYS handler: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Appends `s` to `buf` at `*at`, as much as fits.
fn put(buf: &mut [u8], at: &mut usize, s: &[u8]) {
    let n = s.len().min(buf.len() - *at);
    buf[*at..*at + n].copy_from_slice(&s[..n]);
    *at += n;
}

fn put_num(buf: &mut [u8], at: &mut usize, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    put(buf, at, &digits[i..]);
}

/// The line the handler writes (a separate function, for the unit test).
pub fn kill_line(buf: &mut [u8], thread: &[u8], class: Option<Class>, nr: i64) -> usize {
    let mut at = 0;
    put(buf, &mut at, b"vhost-user-blkd: sandbox: thread '");
    put(buf, &mut at, thread);
    put(buf, &mut at, b"' (");
    put(
        buf,
        &mut at,
        class.map_or("unfiltered", Class::name).as_bytes(),
    );
    put(buf, &mut at, b") made the forbidden system call ");
    match syscalls::name(nr) {
        Some(name) => put(buf, &mut at, name.as_bytes()),
        None => put(buf, &mut at, b"?"),
    }
    put(buf, &mut at, b" (");
    put_num(buf, &mut at, nr as u64);
    put(
        buf,
        &mut at,
        b"); killing the daemon (run with --sandbox log to find what it needs)\n",
    );
    at
}

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // siginfo's _sigsys member: the call's address (a pointer) then its
    // number, after the three ints and padding of the header.
    const SYSCALL_OFFSET: usize = 16 + std::mem::size_of::<usize>();
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO; for a
    // seccomp SIGSYS the _sigsys member is the one filled.
    let nr = unsafe {
        *(info as *const u8)
            .add(SYSCALL_OFFSET)
            .cast::<libc::c_int>()
    };
    let mut name = [0u8; 17];
    // SAFETY: PR_GET_NAME writes at most 16 bytes into the buffer.
    unsafe { libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr()) };
    let len = name.iter().position(|&b| b == 0).unwrap_or(16);
    let mut buf = [0u8; 256];
    let n = kill_line(
        &mut buf,
        &name[..len],
        super::current_class(),
        i64::from(nr),
    );
    // SAFETY: write, sigaction, sigprocmask and tgkill are
    // async-signal-safe; every buffer is a live local.
    unsafe {
        libc::write(2, buf.as_ptr().cast(), n);
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = libc::SIG_DFL;
        libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut());
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGSYS);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        libc::syscall(
            libc::SYS_tgkill,
            libc::getpid(),
            libc::syscall(libc::SYS_gettid),
            libc::SIGSYS,
        );
        // Not reached; if it were, still never go on.
        libc::_exit(128 + libc::SIGSYS);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kill_line_names_thread_class_and_call() {
        let mut buf = [0u8; 256];
        let n = kill_line(&mut buf, b"vub-e0", Some(Class::Iothread), libc::SYS_execve);
        let line = std::str::from_utf8(&buf[..n]).unwrap();
        assert!(
            line.starts_with(
                "vhost-user-blkd: sandbox: thread 'vub-e0' (iothread) made the forbidden system call execve (59)"
            ) || !cfg!(target_arch = "x86_64"),
            "{line}"
        );
        assert!(line.ends_with('\n'));
    }

    #[test]
    fn every_class_compiles_to_a_program_in_both_modes() {
        for class in Class::ALL {
            for mode in [Mode::On, Mode::Log] {
                let p = program(class, mode).unwrap();
                assert!(!p.is_empty(), "{class:?}");
            }
        }
    }
}

/// What the filters cost per system call, measured (not asserted):
/// `cargo test --release --lib sandbox::seccomp::cost -- --ignored --nocapture`.
/// Each case runs in a fresh thread: the calls an iothread makes per
/// request batch (eventfd write and read, io_uring_enter with nothing to
/// submit, getpid) without a filter, then under the filters an
/// iothread has (the vhost-user thread's, inherited, and its own).
#[cfg(test)]
mod cost {
    use super::*;
    fn thread_cpu_ns() -> u64 {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes the live local.
        unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
    }

    fn calls(n: u32, efd: &vmm_sys_util::eventfd::EventFd, ring: &io_uring::IoUring) -> f64 {
        let start = thread_cpu_ns();
        for _ in 0..n {
            efd.write(1).unwrap();
            let _ = efd.read();
            let _ = ring.submit();
            // SAFETY: getpid has no arguments; a real system call
            // (unlike clock_gettime, which the vDSO answers).
            unsafe { libc::syscall(libc::SYS_getpid) };
        }
        (thread_cpu_ns() - start) as f64 / f64::from(n) / 4.0
    }

    #[test]
    #[ignore]
    fn per_call() {
        const N: u32 = 200_000;
        let setup = || {
            (
                vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap(),
                io_uring::IoUring::new(8).unwrap(),
            )
        };
        let bare = std::thread::spawn(move || {
            let (efd, ring) = setup();
            calls(N, &efd, &ring)
        })
        .join()
        .unwrap();
        let filtered = std::thread::spawn(move || {
            // The ring is set up by the vhost-user thread, before the
            // iothread's own filter.
            let (efd, ring) = setup();
            apply(Class::Control, Mode::Log).unwrap();
            apply(Class::Iothread, Mode::Log).unwrap();
            calls(N, &efd, &ring)
        })
        .join()
        .unwrap();
        eprintln!(
            "ns per system call (CPU time): no filter {bare:.0}, iothread filters {filtered:.0} ({:+.1} %)",
            (filtered / bare - 1.0) * 100.0
        );
    }
}
