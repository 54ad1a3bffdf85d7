//! systemd's side of the process, spoken directly (no libsystemd): socket
//! activation (`LISTEN_PID`/`LISTEN_FDS`/`LISTEN_FDNAMES`, as
//! sd_listen_fds_with_names(3)) and notification (a datagram per message
//! to `$NOTIFY_SOCKET`, as sd_notify(3): READY=1, STATUS=, STOPPING=1,
//! WATCHDOG=1 every half `WATCHDOG_USEC`).
//!
//! The sockets systemd passes are given to the configuration by name:
//!
//! ```text
//!   name == an export's id                 -> that export listens on it
//!   an export with addr.type=fd,addr.str=NAME -> the socket named NAME
//!   name == a --chardev id (or a [[monitor]]'s id) -> that QMP monitor
//!   one socket, one export, the name no monitor's -> that export
//!   any other socket                        -> start-up is refused
//! ```
//!
//! A socket from systemd is never unlinked at exit: its path is the
//! .socket unit's.

use std::io;
use std::os::fd::RawFd;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::OnceLock;
use std::time::Duration;

use crate::config::{Config, SocketAddress};

/// The first descriptor systemd passes (SD_LISTEN_FDS_START).
const LISTEN_FDS_START: RawFd = 3;

#[derive(Debug, thiserror::Error)]
pub enum SystemdError {
    #[error("{var}={value}: {reason}")]
    Env {
        var: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("socket activation: fd {fd} ('{name}') is not a listening UNIX socket")]
    NotListening {
        fd: RawFd,
        name: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "socket activation: systemd passed a socket named '{0}' but no export or monitor has that id \
         (name the .socket unit's FileDescriptorName= after an export id or a --chardev id)"
    )]
    Unclaimed(String),
    #[error("export '{export}': addr.str={name}: systemd passed no socket of that name")]
    NoSuchName { export: String, name: String },
}

/// The sockets systemd passed, with their names.
#[derive(Debug, Default)]
pub struct Activation {
    /// (name, fd, claimed)
    fds: Vec<(String, RawFd, bool)>,
}

fn env_err(var: &'static str, value: &str, reason: &'static str) -> SystemdError {
    SystemdError::Env {
        var,
        value: value.to_string(),
        reason,
    }
}

impl Activation {
    /// Takes the sockets systemd passed to this process, if any: none when
    /// LISTEN_PID is unset or names another process (the variables were
    /// inherited). The variables are removed, so that nothing started from
    /// here takes them for its own; call this before any thread exists.
    pub fn from_env() -> Result<Activation, SystemdError> {
        let get = |v| std::env::var(v).ok();
        let (pid, n, names) = (get("LISTEN_PID"), get("LISTEN_FDS"), get("LISTEN_FDNAMES"));
        for v in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
            // No other thread exists yet (see above), so nothing reads the
            // environment meanwhile.
            std::env::remove_var(v);
        }
        let Some(pid) = pid else {
            return Ok(Activation::default());
        };
        let pid_n: u32 = pid
            .parse()
            .map_err(|_| env_err("LISTEN_PID", &pid, "not a process id"))?;
        if pid_n != std::process::id() {
            return Ok(Activation::default());
        }
        let n = n.unwrap_or_default();
        let count: usize = n
            .parse()
            .map_err(|_| env_err("LISTEN_FDS", &n, "not a number"))?;
        let count_fd = RawFd::try_from(count)
            .ok()
            .filter(|c| c.checked_add(LISTEN_FDS_START).is_some())
            .ok_or_else(|| env_err("LISTEN_FDS", &n, "too many descriptors"))?;
        let names: Vec<String> = match &names {
            None => vec!["unknown".to_string(); count],
            Some(s) => s.split(':').map(str::to_string).collect(),
        };
        if names.len() != count {
            return Err(env_err(
                "LISTEN_FDNAMES",
                names.join(":").as_str(),
                "not one name per descriptor in LISTEN_FDS",
            ));
        }
        let mut fds = Vec::with_capacity(count);
        for (fd, name) in (LISTEN_FDS_START..LISTEN_FDS_START + count_fd).zip(names) {
            // SAFETY: fcntl on a descriptor number; an fd that is not open
            // only makes it fail, which the check below reports.
            unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
            crate::vhost_user::check_listening_unix_socket(fd).map_err(|source| {
                SystemdError::NotListening {
                    fd,
                    name: name.clone(),
                    source,
                }
            })?;
            fds.push((name, fd, false));
        }
        Ok(Activation { fds })
    }

    pub fn is_empty(&self) -> bool {
        self.fds.is_empty()
    }

    fn claim(&mut self, name: &str) -> Option<RawFd> {
        let slot = self.fds.iter_mut().find(|(n, _, c)| n == name && !*c)?;
        slot.2 = true;
        Some(slot.1)
    }

    /// Gives the sockets to the exports and monitors of `config` by name
    /// (see the module's table). Every socket must find its user.
    pub fn apply(mut self, config: &mut Config) -> Result<(), SystemdError> {
        // One socket and one export, the socket named after no monitor and
        // no export's addr.str: systemd-socket-activate without --fdname
        // ("unknown"), a .socket unit without FileDescriptorName= (the
        // unit's name).
        let only = self.fds.first().map(|f| f.0.clone()).unwrap_or_default();
        if self.fds.len() == 1
            && config.exports.len() == 1
            && !config
                .monitors
                .iter()
                .any(|m| m.id.as_deref() == Some(&only))
            && !matches!(&config.exports[0].addr, SocketAddress::Fd { str } if str.parse::<RawFd>().is_err())
        {
            let name = config.exports[0].id.clone();
            self.fds[0].0 = name;
        }
        for e in &mut config.exports {
            let fd = match &e.addr {
                SocketAddress::Fd { str } if str.parse::<RawFd>().is_err() => {
                    Some(self.claim(str).ok_or_else(|| SystemdError::NoSuchName {
                        export: e.id.clone(),
                        name: str.clone(),
                    })?)
                }
                _ => self.claim(&e.id),
            };
            if let Some(fd) = fd {
                log::info!(
                    "export {}: listening on the socket systemd passed (fd {fd})",
                    e.id
                );
                e.addr = SocketAddress::Fd {
                    str: fd.to_string(),
                };
            }
        }
        for m in &mut config.monitors {
            if let Some(fd) = m.id.clone().and_then(|id| self.claim(&id)) {
                m.fd = Some(fd);
            }
        }
        match self.fds.iter().find(|(_, _, claimed)| !claimed) {
            Some((name, _, _)) => Err(SystemdError::Unclaimed(name.clone())),
            None => Ok(()),
        }
    }
}

/// Where notifications go; None when the daemon does not run under a
/// service manager that listens (no NOTIFY_SOCKET).
static NOTIFIER: OnceLock<Option<(UnixDatagram, SocketAddr)>> = OnceLock::new();

fn notifier() -> Option<&'static (UnixDatagram, SocketAddr)> {
    NOTIFIER
        .get_or_init(|| {
            let path = std::env::var_os("NOTIFY_SOCKET")?;
            let r = (|| {
                let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
                let addr = match bytes.strip_prefix(b"@") {
                    Some(abs) => {
                        <SocketAddr as std::os::linux::net::SocketAddrExt>::from_abstract_name(abs)?
                    }
                    None => SocketAddr::from_pathname(&path)?,
                };
                Ok::<_, io::Error>((UnixDatagram::unbound()?, addr))
            })();
            match r {
                Ok(n) => Some(n),
                Err(e) => {
                    log::warn!(
                        "NOTIFY_SOCKET={}: {e}; systemd is not notified",
                        path.to_string_lossy()
                    );
                    None
                }
            }
        })
        .as_ref()
}

/// Sends one sd_notify(3) message ("READY=1\nSTATUS=..."), if a service
/// manager listens. A failure is logged: the daemon serves all the same.
pub fn notify(msg: &str) {
    if let Some((sock, addr)) = notifier() {
        if let Err(e) = sock.send_to_addr(msg.as_bytes(), addr) {
            log::warn!("sd_notify {:?}: {e}", msg.lines().next().unwrap_or(""));
        }
    }
}

/// The watchdog interval systemd asked for (WATCHDOG_USEC, for this
/// process when WATCHDOG_PID is set), as sd_watchdog_enabled(3).
pub fn watchdog_interval() -> Option<Duration> {
    if let Some(pid) = std::env::var_os("WATCHDOG_PID") {
        if pid.to_str()?.parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// Sends WATCHDOG=1 every half `interval` for as long as `alive()` returns
/// (it should take the locks a wedged daemon would hold, so that a daemon
/// stuck there misses its pings and systemd restarts it).
pub fn start_watchdog(interval: Duration, alive: impl Fn() + Send + 'static) -> io::Result<()> {
    let period = interval / 2;
    crate::sandbox::spawn(
        crate::sandbox::Class::Helper,
        "vub-watchdog".into(),
        move || loop {
            alive();
            notify("WATCHDOG=1");
            std::thread::sleep(period);
        },
    )
    .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::IntoRawFd;

    fn config(args: &[&str]) -> Config {
        use clap::Parser;
        let mut v = vec!["vhost-user-blkd"];
        v.extend_from_slice(args);
        Config::try_from(crate::config::Args::parse_from(v)).unwrap()
    }

    fn listener() -> (tempfile::TempDir, RawFd) {
        let d = tempfile::tempdir().unwrap();
        let l = std::os::unix::net::UnixListener::bind(d.path().join("s")).unwrap();
        (d, l.into_raw_fd())
    }

    fn act(fds: &[(&str, RawFd)]) -> Activation {
        Activation {
            fds: fds
                .iter()
                .map(|(n, f)| (n.to_string(), *f, false))
                .collect(),
        }
    }

    const BLOCKDEV: &str = "driver=null-co,node-name=n0,size=1048576";

    #[test]
    fn sockets_go_to_exports_and_monitors_by_name() {
        let (_d1, a) = listener();
        let (_d2, b) = listener();
        let (_d3, c) = listener();
        let mut cfg = config(&[
            "--blockdev",
            BLOCKDEV,
            "--export",
            "type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path=/nonexistent/e0",
            "--export",
            "type=vhost-user-blk,id=e1,node-name=n0,addr.type=fd,addr.str=disk1",
            "--chardev",
            "socket,id=mon0,path=/nonexistent/qmp",
            "--monitor",
            "chardev=mon0",
        ]);
        act(&[("e0", a), ("mon0", c), ("disk1", b)])
            .apply(&mut cfg)
            .unwrap();
        assert_eq!(
            cfg.exports[0].addr,
            SocketAddress::Fd { str: a.to_string() }
        );
        assert_eq!(
            cfg.exports[1].addr,
            SocketAddress::Fd { str: b.to_string() }
        );
        assert_eq!(cfg.monitors[0].fd, Some(c));
    }

    #[test]
    fn an_unclaimed_socket_or_a_missing_name_is_refused() {
        let (_d, a) = listener();
        let args = [
            "--blockdev",
            BLOCKDEV,
            "--export",
            "type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path=/nonexistent/e0",
            "--export",
            "type=vhost-user-blk,id=e1,node-name=n0,addr.type=unix,addr.path=/nonexistent/e1",
        ];
        let e = act(&[("other", a)]).apply(&mut config(&args)).unwrap_err();
        assert!(
            matches!(e, SystemdError::Unclaimed(ref n) if n == "other"),
            "{e}"
        );
        let mut cfg = config(&[
            "--blockdev",
            BLOCKDEV,
            "--export",
            "type=vhost-user-blk,id=e0,node-name=n0,addr.type=fd,addr.str=nope",
        ]);
        let e = act(&[("e0", a)]).apply(&mut cfg).unwrap_err();
        assert!(matches!(e, SystemdError::NoSuchName { .. }), "{e}");
    }

    #[test]
    fn one_socket_goes_to_the_only_export_whatever_its_name() {
        let (_d, a) = listener();
        let mut cfg = config(&["--image", "/nonexistent.img", "--socket", "/nonexistent/s"]);
        act(&[("vhost-user-blkd@vm1.socket", a)])
            .apply(&mut cfg)
            .unwrap();
        assert_eq!(
            cfg.exports[0].addr,
            SocketAddress::Fd { str: a.to_string() }
        );
    }
}
