//! Privileges: the user to run as, capabilities, no_new_privs.

use std::ffi::CString;
use std::io;

/// `--user USER[:GROUP]` (or `--run-with user=USER[:GROUP]`): the user and
/// group to switch to once set up, with the user's supplementary groups
/// when it has a name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunAs {
    pub uid: u32,
    pub gid: u32,
    /// The account name, for its supplementary groups (initgroups).
    pub name: Option<String>,
    spec: String,
}

impl std::fmt::Display for RunAs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (uid {}, gid {})", self.spec, self.uid, self.gid)
    }
}

/// (uid, primary gid, name) of `key`, a user name or number. A number
/// with no account is still a uid, whose group is its own number unless
/// one is given.
fn passwd(key: &str) -> Result<(u32, u32, Option<String>), String> {
    match crate::sockpath::user_entry(key) {
        Ok(u) => Ok((u.uid, u.gid, Some(u.name))),
        Err(e) => match key.parse::<u32>() {
            Ok(uid) => Ok((uid, uid, None)),
            Err(_) => Err(e),
        },
    }
}

impl std::str::FromStr for RunAs {
    type Err = String;
    fn from_str(spec: &str) -> Result<Self, String> {
        let (user, group) = match spec.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (spec, None),
        };
        if user.is_empty() {
            return Err("no user given".into());
        }
        let (uid, primary, name) = passwd(user)?;
        let gid = match group {
            Some(g) => crate::sockpath::parse_group(g)?,
            None => primary,
        };
        Ok(RunAs {
            uid,
            gid,
            name,
            spec: spec.to_string(),
        })
    }
}

fn os_err(what: &str) -> String {
    format!("{what}: {}", io::Error::last_os_error())
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Switches every thread to `run_as` (glibc's setuid and setgid change all
/// threads): supplementary groups, group, then user. Needs root.
pub fn switch_user(run_as: &RunAs) -> Result<(), String> {
    if !is_root() {
        return Err(format!(
            "--user {run_as}: the daemon was not started as root, so it cannot switch user"
        ));
    }
    let groups_set = match &run_as.name {
        Some(name) => {
            let c = CString::new(name.as_str()).map_err(|_| format!("bad user name {name}"))?;
            // SAFETY: a NUL-terminated name; initgroups reads the group
            // database and calls setgroups.
            unsafe { libc::initgroups(c.as_ptr(), run_as.gid) == 0 }
        }
        None => {
            let g = [run_as.gid];
            // SAFETY: a live one-element array.
            unsafe { libc::setgroups(1, g.as_ptr()) == 0 }
        }
    };
    if !groups_set {
        return Err(os_err("cannot set the supplementary groups"));
    }
    // SAFETY: plain calls with integer arguments.
    if unsafe { libc::setgid(run_as.gid) } != 0 {
        return Err(os_err(&format!("cannot switch to group {}", run_as.gid)));
    }
    // SAFETY: plain calls with integer arguments.
    if unsafe { libc::setuid(run_as.uid) } != 0 {
        return Err(os_err(&format!("cannot switch to user {}", run_as.uid)));
    }
    // Gone for good: a uid-0 process could set it back, this one cannot.
    // SAFETY: plain calls with integer arguments.
    if run_as.uid != 0 && unsafe { libc::setuid(0) } == 0 {
        return Err("switched user but could still become root again".into());
    }
    Ok(())
}

/// Drops every capability from this thread's bounding and ambient sets
/// (nothing it executes could gain them; it executes nothing anyway).
pub fn drop_bounding_set() -> Result<(), String> {
    // SAFETY: prctl with integer arguments.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    for cap in 0..64 {
        // SAFETY: prctl with integer arguments.
        if unsafe { libc::prctl(libc::PR_CAPBSET_READ, cap, 0, 0, 0) } < 0 {
            break; // past the last capability this kernel knows
        }
        // SAFETY: prctl with integer arguments.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } != 0 {
            return Err(os_err("cannot drop the capability bounding set"));
        }
    }
    Ok(())
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Clears this thread's effective, permitted and inheritable
/// capabilities: a daemon left as root can then do only what the owner of
/// root's files can (Landlock narrows that further).
/// `keep_chown` keeps CAP_CHOWN alone, for sockets that --socket-owner or
/// --socket-group give away (block-export-add binds them at run time).
pub fn clear_capabilities(keep_chown: bool) -> Result<(), String> {
    const VERSION_3: u32 = 0x2008_0522;
    let header = CapHeader {
        version: VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    if keep_chown {
        let chown = 1 << 0; // CAP_CHOWN
        data[0].effective = chown;
        data[0].permitted = chown;
    }
    // SAFETY: capset reads a v3 header and two data structs, all live.
    if unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) } != 0 {
        return Err(os_err("cannot clear the capabilities"));
    }
    Ok(())
}

pub fn set_no_new_privs() -> Result<(), String> {
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(os_err("cannot set no_new_privs"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_parse_by_name_and_number_with_an_optional_group() {
        let r: RunAs = "root".parse().unwrap();
        assert_eq!((r.uid, r.gid, r.name.as_deref()), (0, 0, Some("root")));
        let r: RunAs = "65534:0".parse().unwrap();
        assert_eq!((r.uid, r.gid), (65534, 0));
        let r: RunAs = "4000000".parse().unwrap();
        assert_eq!((r.uid, r.gid, r.name), (4000000, 4000000, None));
        assert!("no-such-user-here".parse::<RunAs>().is_err());
        assert!(":0".parse::<RunAs>().is_err());
    }
}
