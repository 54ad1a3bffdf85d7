//! Configuration: the command line (qemu-storage-daemon's `--blockdev` and
//! `--export` syntax, or a short form for one image and one socket) and the
//! TOML config file, validated once into [`Config`].
//!
//! ```text
//!   Args --keyval--> JSON --serde--> BlockdevOptions / ExportOptions
//!   TOML file -------------serde-->  (same structs)
//!                                      \--validate--> Config
//! ```

mod export;
pub mod keyval;

pub use export::{
    ExportOptions, SocketAddress, VhostUserBlkOptions, DEFAULT_NUM_QUEUES, DEFAULT_QUEUE_SIZE,
};

use std::path::PathBuf;

use clap::Parser;
use serde::Deserialize;

use crate::block::policy::OnError;
use crate::drivers::{
    BlockdevOptions, BlockdevRef, CacheOptions, DiscardMode, FileOptions, RawOptions,
};

/// The largest number of queues: vhost-user-backend maps queues to threads
/// with 64-bit masks.
pub const MAX_QUEUES: u16 = 64;

#[derive(Parser, Debug, Default)]
#[command(
    name = "vhost-user-blkd",
    version,
    about = "vhost-user-blk storage daemon with a QEMU-style block graph",
    after_help = "Short form:  vhost-user-blkd --image disk.img --socket /tmp/vub.sock\n\
                  Full form:   vhost-user-blkd --blockdev driver=file,node-name=f0,filename=disk.img \\\n\
                  \x20             --blockdev driver=raw,node-name=d0,file=f0 \\\n\
                  \x20             --export type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path=/tmp/vub.sock,writable=on"
)]
pub struct Args {
    /// A block node, as qemu-storage-daemon's --blockdev (keyval or JSON).
    #[arg(long = "blockdev", value_name = "OPTIONS")]
    pub blockdev: Vec<String>,
    /// An export, as qemu-storage-daemon's --export (keyval or JSON).
    #[arg(long = "export", value_name = "OPTIONS")]
    pub export: Vec<String>,
    /// A TOML file with [[blockdev]] and [[export]] tables (see config/).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// A QOM object, as qemu-storage-daemon's --object:
    /// throttle-group,id=tg0,limits.iops-total=1000
    #[arg(long = "object", value_name = "OPTIONS")]
    pub object: Vec<String>,
    /// A character device for --monitor, as qemu-storage-daemon's --chardev:
    /// socket,id=ID,path=PATH,server=on,wait=off
    #[arg(long = "chardev", value_name = "OPTIONS")]
    pub chardev: Vec<String>,
    /// A QMP monitor on a --chardev: chardev=ID[,pretty=on]
    #[arg(long = "monitor", value_name = "OPTIONS")]
    pub monitor: Vec<String>,
    /// Write the daemon's PID here once every export listens.
    #[arg(long, value_name = "FILE")]
    pub pidfile: Option<PathBuf>,
    /// Detach from the terminal once every export listens.
    #[arg(long)]
    pub daemonize: bool,
    /// Append the log here once the daemon is ready (start-up messages and
    /// errors still go to stderr). Without it, --daemonize logs to syslog
    /// (/dev/log) and refuses to start if there is none.
    #[arg(long, value_name = "FILE")]
    pub log_file: Option<PathBuf>,
    /// Mode of every UNIX socket the daemon creates (exports, monitors),
    /// octal, e.g. 0660. Default: 0777 minus the umask, as QEMU.
    #[arg(long, value_name = "MODE")]
    pub socket_mode: Option<String>,
    /// Group (name or number) of every UNIX socket the daemon creates.
    #[arg(long, value_name = "GROUP")]
    pub socket_group: Option<String>,
    /// Owner (name or number) of every UNIX socket the daemon creates
    /// (root only).
    #[arg(long, value_name = "USER")]
    pub socket_owner: Option<String>,

    /// Short form: the image to serve (a raw file or block device).
    #[arg(long, value_name = "PATH")]
    pub image: Option<PathBuf>,
    /// Short form: the UNIX socket to listen on.
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Short form: an already listening socket passed by the orchestrator.
    #[arg(long, value_name = "N")]
    pub fd: Option<i32>,
    /// Short form: image format (raw).
    #[arg(long, value_name = "FORMAT", default_value = "raw")]
    pub format: String,
    /// Short form: export read-only.
    #[arg(long)]
    pub readonly: bool,
    /// Short form: open the image with O_DIRECT.
    #[arg(long)]
    pub direct: bool,
    /// Short form: start with the guest's write cache off.
    #[arg(long)]
    pub writethrough: bool,
    /// Short form: number of queues.
    #[arg(long, value_name = "N")]
    pub num_queues: Option<u16>,
    /// Short form: logical block size (512 or 4096).
    #[arg(long, value_name = "BYTES")]
    pub logical_block_size: Option<u32>,
    /// Short form: serial number reported to the guest.
    #[arg(long, value_name = "STRING")]
    pub serial: Option<String>,
}

/// A validated vhost-user-blk export.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportConfig {
    pub id: String,
    pub node_name: String,
    pub addr: SocketAddress,
    pub writable: bool,
    pub writethrough: bool,
    pub num_queues: u16,
    pub queue_size: u16,
    pub logical_block_size: u32,
    pub serial: Vec<u8>,
    pub num_iothreads: usize,
    pub on_read_error: OnError,
    pub on_write_error: OnError,
    pub poll_max_ns: u64,
}

/// `--object` / object-add, tagged by `qom-type`.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "qom-type", rename_all = "kebab-case")]
pub enum ObjectOptions {
    ThrottleGroup(ThrottleGroupOptions),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ThrottleGroupOptions {
    pub id: String,
    #[serde(default)]
    pub limits: crate::throttle::ThrottleLimits,
}

/// A QMP monitor socket.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct MonitorConfig {
    pub path: PathBuf,
    #[serde(default, deserialize_with = "crate::opts::bool")]
    pub pretty: bool,
}

/// `--chardev`: only listening UNIX sockets, the kind a monitor uses.
#[derive(Debug, Deserialize)]
#[serde(tag = "backend", rename_all = "kebab-case")]
enum ChardevOptions {
    Socket(SocketChardev),
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct SocketChardev {
    id: String,
    path: PathBuf,
    #[serde(default = "yes", deserialize_with = "crate::opts::bool")]
    server: bool,
    #[serde(default, deserialize_with = "crate::opts::bool")]
    wait: bool,
}

fn yes() -> bool {
    true
}

/// `--monitor`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct MonitorOptions {
    chardev: String,
    #[serde(default)]
    mode: Option<String>,
    #[serde(default, deserialize_with = "crate::opts::bool")]
    pretty: bool,
}

/// Everything the daemon needs to start.
#[derive(Debug, Clone)]
pub struct Config {
    pub objects: Vec<ObjectOptions>,
    pub blockdevs: Vec<BlockdevOptions>,
    pub exports: Vec<ExportConfig>,
    pub monitors: Vec<MonitorConfig>,
    pub pidfile: Option<PathBuf>,
    pub daemonize: bool,
    pub log_file: Option<PathBuf>,
    pub socket_perms: crate::sockpath::SocketPerms,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{option} '{arg}': {source}")]
    Keyval {
        option: &'static str,
        arg: String,
        #[source]
        source: keyval::KeyvalError,
    },
    #[error("{option} '{arg}': {reason}")]
    Invalid {
        option: &'static str,
        arg: String,
        reason: String,
    },
    #[error("cannot read config file {path}")]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}: {reason}")]
    ParseFile { path: PathBuf, reason: String },
    #[error("export '{id}': {option}: {reason}")]
    Export {
        id: String,
        option: &'static str,
        reason: String,
    },
    #[error("{0}")]
    Usage(String),
}

/// The TOML config file.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct ConfigFile {
    #[serde(default)]
    object: Vec<ObjectOptions>,
    #[serde(default)]
    blockdev: Vec<BlockdevOptions>,
    #[serde(default)]
    export: Vec<ExportOptions>,
    #[serde(default)]
    monitor: Vec<MonitorConfig>,
    #[serde(default)]
    pidfile: Option<PathBuf>,
    #[serde(default)]
    daemonize: bool,
    #[serde(default)]
    log_file: Option<PathBuf>,
}

fn from_keyval<T: serde::de::DeserializeOwned>(
    option: &'static str,
    arg: &str,
    implied: Option<&str>,
) -> Result<T, ConfigError> {
    let v = keyval::parse(arg, implied).map_err(|source| ConfigError::Keyval {
        option,
        arg: arg.to_string(),
        source,
    })?;
    serde_json::from_value(v).map_err(|e| ConfigError::Invalid {
        option,
        arg: arg.to_string(),
        reason: e.to_string(),
    })
}

impl TryFrom<VhostUserBlkOptions> for ExportConfig {
    type Error = ConfigError;

    fn try_from(o: VhostUserBlkOptions) -> Result<Self, ConfigError> {
        let id = o.id.clone();
        let err = |option: &'static str, reason: String| ConfigError::Export {
            id: id.clone(),
            option,
            reason,
        };
        if o.id.is_empty() {
            return Err(err("id", "must not be empty".into()));
        }
        let num_queues = o.num_queues.unwrap_or(u64::from(DEFAULT_NUM_QUEUES));
        if num_queues == 0 || num_queues > u64::from(MAX_QUEUES) {
            return Err(err(
                "num-queues",
                format!("{num_queues} is not between 1 and {MAX_QUEUES}"),
            ));
        }
        let queue_size = o.queue_size.unwrap_or(u64::from(DEFAULT_QUEUE_SIZE));
        if !(2..=32768).contains(&queue_size) || !queue_size.is_power_of_two() {
            return Err(err(
                "queue-size",
                format!("{queue_size} is not a power of two between 2 and 32768"),
            ));
        }
        let lbs = o.logical_block_size.unwrap_or(512);
        if lbs != 512 && lbs != 4096 {
            return Err(err(
                "logical-block-size",
                format!("{lbs} is not 512 or 4096"),
            ));
        }
        let serial = o.serial.unwrap_or_default().into_bytes();
        if serial.len() > 20 {
            return Err(err(
                "serial",
                format!(
                    "{} bytes is longer than the 20 virtio-blk allows",
                    serial.len()
                ),
            ));
        }
        let num_iothreads = o.num_iothreads.unwrap_or(num_queues);
        if o.poll_max_ns.is_some_and(|n| n > 1_000_000_000) {
            return Err(err(
                "poll-max-ns",
                "must be at most 1 s (1000000000)".into(),
            ));
        }
        if num_iothreads == 0 || num_iothreads > num_queues {
            return Err(err(
                "num-iothreads",
                format!("{num_iothreads} is not between 1 and num-queues ({num_queues})"),
            ));
        }
        if let SocketAddress::Fd { str } = &o.addr {
            if str.parse::<i32>().map_or(true, |fd| fd < 0) {
                return Err(err(
                    "addr.str",
                    format!("'{str}' is not a file descriptor number"),
                ));
            }
        }
        Ok(ExportConfig {
            id: o.id,
            node_name: o.node_name,
            addr: o.addr,
            writable: o.writable,
            writethrough: o.writethrough,
            num_queues: num_queues as u16,
            queue_size: queue_size as u16,
            logical_block_size: lbs as u32,
            serial,
            num_iothreads: num_iothreads as usize,
            on_read_error: o.on_read_error.unwrap_or(OnError::Report),
            on_write_error: o.on_write_error.unwrap_or(OnError::Enospc),
            poll_max_ns: o.poll_max_ns.unwrap_or(export::DEFAULT_POLL_MAX_NS),
        })
    }
}

impl Args {
    fn uses_short_form(&self) -> bool {
        self.image.is_some() || self.socket.is_some() || self.fd.is_some()
    }

    /// The nodes and export the short form stands for.
    fn short_form(&self) -> Result<(Vec<BlockdevOptions>, VhostUserBlkOptions), ConfigError> {
        let image = self
            .image
            .as_ref()
            .ok_or_else(|| ConfigError::Usage("--image is required with --socket/--fd".into()))?;
        let addr = match (&self.socket, self.fd) {
            (Some(p), None) => SocketAddress::Unix {
                path: p.to_string_lossy().into_owned(),
            },
            (None, Some(fd)) => SocketAddress::Fd {
                str: fd.to_string(),
            },
            _ => {
                return Err(ConfigError::Usage(
                    "give exactly one of --socket PATH or --fd N with --image".into(),
                ))
            }
        };
        if self.format != "raw" {
            return Err(ConfigError::Usage(format!(
                "--format {}: only raw is supported",
                self.format
            )));
        }
        let file = BlockdevOptions::File(FileOptions {
            node_name: "file0".into(),
            filename: image.to_string_lossy().into_owned(),
            read_only: self.readonly,
            cache: CacheOptions {
                direct: self.direct,
                no_flush: false,
            },
            discard: DiscardMode::Unmap,
            locking: crate::drivers::Locking::Auto,
        });
        let raw = BlockdevOptions::Raw(RawOptions {
            node_name: "disk0".into(),
            file: BlockdevRef::Name("file0".into()),
            offset: 0,
            size: None,
            read_only: self.readonly,
            discard: DiscardMode::Unmap,
        });
        let export = VhostUserBlkOptions {
            id: "export0".into(),
            node_name: "disk0".into(),
            addr,
            writable: !self.readonly,
            writethrough: self.writethrough,
            num_queues: self.num_queues.map(u64::from),
            queue_size: None,
            logical_block_size: self.logical_block_size.map(u64::from),
            serial: self.serial.clone(),
            num_iothreads: None,
            on_read_error: None,
            on_write_error: None,
            poll_max_ns: None,
        };
        Ok((vec![file, raw], export))
    }
}

impl Args {
    /// `--socket-mode`, `--socket-group`, `--socket-owner`.
    fn socket_perms(&self) -> Result<crate::sockpath::SocketPerms, ConfigError> {
        fn parse(
            option: &'static str,
            arg: &Option<String>,
            f: fn(&str) -> Result<u32, String>,
        ) -> Result<Option<u32>, ConfigError> {
            arg.as_deref()
                .map(|a| {
                    f(a).map_err(|reason| ConfigError::Invalid {
                        option,
                        arg: a.to_string(),
                        reason,
                    })
                })
                .transpose()
        }
        Ok(crate::sockpath::SocketPerms {
            mode: parse(
                "--socket-mode",
                &self.socket_mode,
                crate::sockpath::parse_mode,
            )?,
            gid: parse(
                "--socket-group",
                &self.socket_group,
                crate::sockpath::parse_group,
            )?,
            uid: parse(
                "--socket-owner",
                &self.socket_owner,
                crate::sockpath::parse_owner,
            )?,
        })
    }
}

impl TryFrom<Args> for Config {
    type Error = ConfigError;

    fn try_from(args: Args) -> Result<Self, ConfigError> {
        let mut objects = Vec::new();
        let mut blockdevs = Vec::new();
        let mut exports = Vec::new();
        let mut monitors = Vec::new();
        let mut pidfile = args.pidfile.clone();
        let mut daemonize = args.daemonize;
        let mut log_file = args.log_file.clone();
        let socket_perms = args.socket_perms()?;

        if let Some(path) = &args.config {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
                path: path.clone(),
                source,
            })?;
            let file: ConfigFile = toml::from_str(&text).map_err(|e| ConfigError::ParseFile {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            objects.extend(file.object);
            blockdevs.extend(file.blockdev);
            exports.extend(
                file.export
                    .into_iter()
                    .map(|ExportOptions::VhostUserBlk(o)| o),
            );
            monitors.extend(file.monitor);
            pidfile = pidfile.or(file.pidfile);
            daemonize |= file.daemonize;
            log_file = log_file.or(file.log_file);
        }
        if args.uses_short_form() {
            let (nodes, export) = args.short_form()?;
            blockdevs.extend(nodes);
            exports.push(export);
        }
        for arg in &args.object {
            objects.push(from_keyval("--object", arg, Some("qom-type"))?);
        }
        for arg in &args.blockdev {
            blockdevs.push(from_keyval("--blockdev", arg, None)?);
        }
        for arg in &args.export {
            let ExportOptions::VhostUserBlk(o) = from_keyval("--export", arg, Some("type"))?;
            exports.push(o);
        }
        let mut chardevs = std::collections::BTreeMap::new();
        for arg in &args.chardev {
            let ChardevOptions::Socket(c) = from_keyval("--chardev", arg, Some("backend"))?;
            if !c.server {
                return Err(ConfigError::Invalid {
                    option: "--chardev",
                    arg: arg.clone(),
                    reason: "only server=on sockets are supported".into(),
                });
            }
            let _ = c.wait;
            if chardevs.insert(c.id.clone(), c.path).is_some() {
                return Err(ConfigError::Usage(format!(
                    "chardev id '{}' is used twice",
                    c.id
                )));
            }
        }
        for arg in &args.monitor {
            let m: MonitorOptions = from_keyval("--monitor", arg, Some("chardev"))?;
            if m.mode.as_deref().is_some_and(|mode| mode != "control") {
                return Err(ConfigError::Invalid {
                    option: "--monitor",
                    arg: arg.clone(),
                    reason: "only mode=control (QMP) is supported".into(),
                });
            }
            let path = chardevs
                .get(&m.chardev)
                .ok_or_else(|| ConfigError::Invalid {
                    option: "--monitor",
                    arg: arg.clone(),
                    reason: format!("no --chardev with id '{}'", m.chardev),
                })?;
            monitors.push(MonitorConfig {
                path: path.clone(),
                pretty: m.pretty,
            });
        }
        if exports.is_empty() && monitors.is_empty() {
            return Err(ConfigError::Usage(
                "nothing to serve: give --image and --socket, or --blockdev and --export, or a --monitor, or --config (see --help)".into(),
            ));
        }
        let exports = exports
            .into_iter()
            .map(ExportConfig::try_from)
            .collect::<Result<Vec<_>, _>>()?;
        let mut ids: Vec<&str> = exports.iter().map(|e| e.id.as_str()).collect();
        ids.sort_unstable();
        if let Some(w) = ids.windows(2).find(|w| w[0] == w[1]) {
            return Err(ConfigError::Usage(format!(
                "export id '{}' is used twice",
                w[0]
            )));
        }
        Ok(Config {
            objects,
            blockdevs,
            exports,
            monitors,
            pidfile,
            daemonize,
            log_file,
            socket_perms,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Args {
        let mut all = vec!["vhost-user-blkd"];
        all.extend_from_slice(v);
        Args::try_parse_from(all).unwrap()
    }

    #[test]
    fn qsd_syntax_parses() {
        let c = Config::try_from(args(&[
            "--blockdev",
            "driver=file,node-name=f0,filename=/tmp/x.img,cache.direct=on",
            "--blockdev",
            "driver=raw,node-name=d0,file=f0",
            "--export",
            "type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path=/tmp/vub.sock,num-queues=4,writable=on,logical-block-size=4096",
        ]))
        .unwrap();
        assert_eq!(c.blockdevs.len(), 2);
        let e = &c.exports[0];
        assert_eq!(e.num_queues, 4);
        assert_eq!(e.num_iothreads, 4);
        assert_eq!(e.logical_block_size, 4096);
        assert!(e.writable);
        assert_eq!(
            e.addr,
            SocketAddress::Unix {
                path: "/tmp/vub.sock".into()
            }
        );
        match &c.blockdevs[0] {
            BlockdevOptions::File(f) => assert!(f.cache.direct),
            _ => panic!("expected a file node"),
        }
    }

    #[test]
    fn unknown_option_is_named_in_the_error() {
        let e = Config::try_from(args(&[
            "--blockdev",
            "driver=file,node-name=f0,filename=x,bogus=1",
            "--export",
            "vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path=s",
        ]))
        .unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
    }

    #[test]
    fn invalid_export_values_are_refused_with_the_option_name() {
        for (opt, needle) in [
            ("num-queues=0", "num-queues"),
            ("num-queues=65", "num-queues"),
            ("queue-size=100", "queue-size"),
            ("logical-block-size=1024", "logical-block-size"),
            ("serial=123456789012345678901", "serial"),
            ("num-queues=2,num-iothreads=3", "num-iothreads"),
        ] {
            let export =
                format!("vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path=s,{opt}");
            let e = Config::try_from(args(&["--export", &export])).unwrap_err();
            assert!(e.to_string().contains(needle), "{opt}: {e}");
        }
    }

    #[test]
    fn short_form_builds_file_raw_and_export() {
        let c =
            Config::try_from(args(&["--image", "/tmp/d.img", "--socket", "/tmp/s.sock"])).unwrap();
        assert_eq!(c.blockdevs.len(), 2);
        assert_eq!(c.exports[0].node_name, "disk0");
        assert!(c.exports[0].writable);
    }

    #[test]
    fn toml_config_file_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            r#"
pidfile = "/tmp/p.pid"
[[blockdev]]
driver = "null-co"
node-name = "n0"
size = "64M"
[[export]]
type = "vhost-user-blk"
id = "e0"
node-name = "n0"
addr = { type = "unix", path = "/tmp/n.sock" }
num-queues = 2
writable = true
"#,
        )
        .unwrap();
        let c = Config::try_from(args(&["--config", path.to_str().unwrap()])).unwrap();
        assert_eq!(c.exports[0].num_queues, 2);
        assert_eq!(
            c.pidfile.as_deref(),
            Some(std::path::Path::new("/tmp/p.pid"))
        );
        match &c.blockdevs[0] {
            BlockdevOptions::NullCo(n) => assert_eq!(n.size, 64 << 20),
            _ => panic!("expected null-co"),
        }
    }

    #[test]
    fn example_config_file_is_valid() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/example.toml");
        let c = Config::try_from(args(&["--config", path])).unwrap();
        assert_eq!(c.blockdevs.len(), 3);
        assert_eq!(c.exports[0].num_queues, 4);
        assert!(c.exports[0].writable);
    }

    #[test]
    fn monitor_on_a_chardev_parses_as_qsd_spells_it() {
        let c = Config::try_from(args(&[
            "--chardev",
            "socket,id=mon0,path=/tmp/qmp.sock,server=on,wait=off",
            "--monitor",
            "chardev=mon0",
        ]))
        .unwrap();
        assert_eq!(
            c.monitors[0].path,
            std::path::PathBuf::from("/tmp/qmp.sock")
        );
        let e = Config::try_from(args(&["--monitor", "chardev=nope"])).unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
    }

    #[test]
    fn throttle_group_objects_parse_from_the_command_line_and_the_file() {
        let c = Config::try_from(args(&[
            "--object",
            "throttle-group,id=tg0,limits.iops-total=1000,limits.bps-total=50M",
            "--blockdev",
            "driver=null-co,node-name=n0",
            "--blockdev",
            "driver=throttle,node-name=t0,throttle-group=tg0,file=n0",
            "--export",
            "vhost-user-blk,id=e0,node-name=t0,addr.type=unix,addr.path=s",
        ]))
        .unwrap();
        let ObjectOptions::ThrottleGroup(t) = &c.objects[0];
        assert_eq!(t.id, "tg0");
        assert_eq!(t.limits.iops_total, Some(1000));
        assert_eq!(t.limits.bps_total, Some(50 << 20));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "[[object]]\nqom-type = \"throttle-group\"\nid = \"tg1\"\nlimits = { iops-read = 10, iops-read-max = 20, iops-read-max-length = 3 }\n[[blockdev]]\ndriver = \"null-co\"\nnode-name = \"n0\"\n[[export]]\ntype = \"vhost-user-blk\"\nid = \"e0\"\nnode-name = \"n0\"\naddr = { type = \"unix\", path = \"/tmp/x\" }\n",
        )
        .unwrap();
        let c = Config::try_from(args(&["--config", path.to_str().unwrap()])).unwrap();
        let ObjectOptions::ThrottleGroup(t) = &c.objects[0];
        assert_eq!(t.limits.iops_read_max_length, Some(3));
        let e = Config::try_from(args(&[
            "--object",
            "throttle-group,id=t,limits.iops-totl=1",
            "--image",
            "x",
            "--socket",
            "y",
        ]))
        .unwrap_err();
        assert!(e.to_string().contains("iops-totl"), "{e}");
    }

    #[test]
    fn nothing_to_serve_is_a_usage_error() {
        assert!(matches!(
            Config::try_from(args(&[])),
            Err(ConfigError::Usage(_))
        ));
    }
}
