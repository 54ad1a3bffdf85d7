//! Landlock: the files and directories the armed daemon may reach.
//!
//! | what                         | rights                                   |
//! |------------------------------|------------------------------------------|
//! | each image open at start     | read, write, truncate, device ioctls     |
//! | each socket's directory      | create sockets, remove files (the socket)|
//! | the pidfile's directory      | remove files (the pidfile, at exit)      |
//! | each `--allow-path` DIR      | read, write, truncate, create and remove |
//! |                              | files and sockets, list, device ioctls   |
//! | /dev/null                    | read, write                              |
//! | /proc/self/fd                | list (finding the backend channel)       |
//!
//! | TCP ports of network nodes   | connect (the `nbd` nodes open at start)  |
//! | each `--allow-connect` range | connect (nodes QMP adds later, Ceph)     |
//!
//! Everything else, executing anything included, is refused; so are TCP
//! bind and connect to other ports (all ports with `--allow-connect any`),
//! and signals to processes outside the sandbox.

use std::path::{Path, PathBuf};

use landlock::{
    Access, AccessFs, AccessNet, BitFlags, NetPort, PathBeneath, PathFd, Ruleset, RulesetAttr,
    RulesetCreated, RulesetCreatedAttr, RulesetStatus, Scope, ABI,
};

use super::Reach;

pub struct Rules {
    ruleset: RulesetCreated,
    /// What was allowed, for messages: (path, directory?).
    allowed: Vec<(PathBuf, bool)>,
    /// TCP ports connect may reach (None: any).
    ports: Option<Vec<(u16, u16)>>,
}

impl std::fmt::Debug for Rules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rules")
            .field("allowed", &self.allowed)
            .finish()
    }
}

fn image_rights() -> BitFlags<AccessFs> {
    AccessFs::ReadFile | AccessFs::WriteFile | AccessFs::Truncate | AccessFs::IoctlDev
}

fn allow_path_rights() -> BitFlags<AccessFs> {
    image_rights()
        | AccessFs::ReadDir
        | AccessFs::RemoveFile
        | AccessFs::MakeReg
        | AccessFs::MakeSock
}

/// `path` made absolute and resolved where it exists (a file that does not
/// exist yet: its directory resolved).
fn resolve(path: &Path) -> PathBuf {
    if let Ok(p) = std::fs::canonicalize(path) {
        return p;
    }
    match (path.parent(), path.file_name()) {
        (Some(dir), Some(name)) => {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            std::fs::canonicalize(dir)
                .map(|d| d.join(name))
                .unwrap_or_else(|_| path.to_path_buf())
        }
        _ => path.to_path_buf(),
    }
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Port ranges sorted, with overlapping and adjacent ones merged (the
/// Ceph ports come one by one: 6800, 6801, ... read 6800-7568).
fn coalesce(mut ranges: Vec<(u16, u16)>) -> Vec<(u16, u16)> {
    ranges.sort_unstable();
    let mut out: Vec<(u16, u16)> = Vec::with_capacity(ranges.len());
    for (lo, hi) in ranges {
        match out.last_mut() {
            Some(last) if u32::from(lo) <= u32::from(last.1) + 1 => last.1 = last.1.max(hi),
            _ => out.push((lo, hi)),
        }
    }
    out
}

impl Rules {
    /// The ruleset for `reach` and `allow_paths`, or None when this kernel
    /// has no Landlock (said once in the log).
    pub fn new(
        reach: &Reach,
        allow_paths: &[PathBuf],
        allow_connect: &super::AllowConnect,
    ) -> Result<Option<Rules>, String> {
        let abi = ABI::V5;
        let err = |e: landlock::RulesetError| format!("Landlock: {e}");
        let net = match allow_connect {
            super::AllowConnect::Any => AccessNet::BindTcp.into(),
            super::AllowConnect::Ports(_) => AccessNet::from_all(abi),
        };
        let mut ruleset = Ruleset::default()
            .handle_access(AccessFs::from_all(abi))
            .map_err(err)?
            .handle_access(net)
            .map_err(err)?
            .scope(Scope::Signal)
            .map_err(err)?
            .create()
            .map_err(err)?;
        let mut allowed = Vec::new();
        let mut add = |ruleset: RulesetCreated,
                       path: &Path,
                       access: BitFlags<AccessFs>,
                       required: bool|
         -> Result<RulesetCreated, String> {
            let fd = match PathFd::new(path) {
                Ok(fd) => fd,
                Err(e) if required => {
                    return Err(format!("Landlock: cannot open {}: {e}", path.display()))
                }
                Err(_) => return Ok(ruleset),
            };
            let is_dir = std::fs::metadata(path).is_ok_and(|m| m.is_dir());
            // A file takes file rights only.
            let access = if is_dir {
                access
            } else {
                access & AccessFs::from_file(abi)
            };
            allowed.push((resolve(path), is_dir));
            ruleset
                .add_rule(PathBeneath::new(fd, access))
                .map_err(|e| format!("Landlock: {}: {e}", path.display()))
        };
        for image in &reach.images {
            ruleset = add(ruleset, image, image_rights(), true)?;
        }
        for dir in &reach.socket_dirs {
            ruleset = add(
                ruleset,
                dir,
                AccessFs::MakeSock | AccessFs::RemoveFile,
                true,
            )?;
        }
        for file in &reach.files {
            ruleset = add(
                ruleset,
                &parent_dir(file),
                AccessFs::RemoveFile.into(),
                true,
            )?;
        }
        for dir in allow_paths {
            ruleset = add(ruleset, dir, allow_path_rights(), true)?;
        }
        for p in &reach.read_only {
            ruleset = add(ruleset, p, AccessFs::ReadFile | AccessFs::ReadDir, false)?;
        }
        ruleset = add(
            ruleset,
            Path::new("/dev/null"),
            AccessFs::ReadFile | AccessFs::WriteFile,
            false,
        )?;
        ruleset = add(
            ruleset,
            Path::new("/proc/self/fd"),
            AccessFs::ReadDir.into(),
            false,
        )?;
        let ports = match allow_connect {
            super::AllowConnect::Any => None,
            super::AllowConnect::Ports(ranges) => {
                // TCP connect: --allow-connect, the network nodes open at
                // start, and the Ceph ports where librbd is installed (the
                // Cluster class's); binding stays refused.
                let mut all: Vec<(u16, u16)> = ranges.clone();
                all.extend(reach.tcp_ports.iter().map(|p| (*p, *p)));
                all.extend(reach.tcp_connect.iter().map(|p| (*p, *p)));
                let all = coalesce(all);
                for &(lo, hi) in &all {
                    for p in lo..=hi {
                        ruleset = ruleset
                            .add_rule(NetPort::new(p, AccessNet::ConnectTcp))
                            .map_err(|e| format!("Landlock: TCP port {p}: {e}"))?;
                    }
                }
                Some(all)
            }
        };
        // The NBD server's TCP ports (ABI 4's LANDLOCK_ACCESS_NET_BIND_TCP;
        // connect rules are the NBD client's, elsewhere).
        for port in &reach.tcp_bind_ports {
            ruleset = ruleset
                .add_rule(NetPort::new(*port, AccessNet::BindTcp))
                .map_err(|e| format!("Landlock: TCP port {port}: {e}"))?;
            allowed.push((PathBuf::from(format!("tcp bind :{port}")), false));
        }
        // Probe on a copy: a kernel without Landlock says so here.
        let probe = Rules {
            ruleset,
            allowed,
            ports,
        };
        Ok(Some(probe))
    }

    /// Restricts the calling thread; Ok(false) if the kernel has no
    /// Landlock.
    pub fn restrict_self(&self) -> Result<bool, String> {
        let r = self
            .ruleset
            .try_clone()
            .map_err(|e| format!("Landlock: {e}"))?;
        let status = r.restrict_self().map_err(|e| format!("Landlock: {e}"))?;
        Ok(status.ruleset != RulesetStatus::NotEnforced)
    }

    pub fn describe(&self) -> String {
        let paths: Vec<String> = self
            .allowed
            .iter()
            .map(|(p, _)| p.display().to_string())
            .collect();
        let ports = match &self.ports {
            None => "any TCP port".to_string(),
            Some(p) if p.is_empty() => "no TCP connect".to_string(),
            Some(p) => {
                let list: Vec<String> = p
                    .iter()
                    .map(|(lo, hi)| {
                        if lo == hi {
                            lo.to_string()
                        } else {
                            format!("{lo}-{hi}")
                        }
                    })
                    .collect();
                format!("TCP connect to ports {}", list.join(", "))
            }
        };
        format!("files limited to {}; {ports}", paths.join(", "))
    }

    /// Whether TCP connect to `port` is allowed (for messages).
    pub fn allows_port(&self, port: u16) -> bool {
        self.ports
            .as_ref()
            .is_none_or(|p| p.iter().any(|(lo, hi)| (*lo..=*hi).contains(&port)))
    }

    /// Whether `path` lies within what the rules allow (for messages; the
    /// kernel decides).
    pub fn allows(&self, path: &Path) -> bool {
        let p = resolve(path);
        self.allowed
            .iter()
            .any(|(a, is_dir)| if *is_dir { p.starts_with(a) } else { p == *a })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn port_ranges_are_merged() {
        let ports = [3300, 6789, 6801, 6800, 6802, 7000]
            .iter()
            .map(|p| (*p, *p))
            .chain([(6900, 7100), (10809, 10809)])
            .collect();
        assert_eq!(
            super::coalesce(ports),
            [
                (3300, 3300),
                (6789, 6789),
                (6800, 6802),
                (6900, 7100),
                (10809, 10809)
            ]
        );
    }
}
