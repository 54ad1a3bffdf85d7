//! Configuration: the command line (qemu-storage-daemon's `--blockdev` and
//! `--export` syntax, or a short form for one image and one socket) and the
//! TOML config file, validated once into [`Config`].
//!
//! ```text
//!   Args --keyval--> JSON --serde--> BlockdevOptions / ExportOptions
//!   TOML file -------------serde-->  (same structs)
//!                                      \--validate--> Config
//! ```

pub mod export;
pub mod keyval;

pub use export::{
    attach_hint, online_cpus, ExportOptions, NbdExportOptions, NbdServerOptions, SocketAddress,
    VhostUserBlkOptions, DEFAULT_NUM_QUEUES, DEFAULT_QUEUE_SIZE,
};

use std::path::PathBuf;

use clap::Parser;
use serde::Deserialize;

use crate::block::policy::OnError;
use crate::drivers::probe::{self, Probed};
use crate::drivers::{
    BlockdevOptions, BlockdevRef, CacheOptions, DiscardMode, FileOptions, RawOptions,
};

/// What `--print-capabilities` prints: QEMU's VHostUserBackendCapabilities
/// (docs/interop/vhost-user.json) for a backend of type `block`, with the
/// block options of the backend program conventions this daemon takes.
pub const CAPABILITIES: &str =
    "{\n  \"type\": \"block\",\n  \"features\": [\n    \"read-only\",\n    \"blk-file\"\n  ]\n}\n";

/// The largest number of queues: vhost-user-backend maps queues to threads
/// with 64-bit masks.
pub const MAX_QUEUES: u16 = 64;

#[derive(Parser, Debug, Default)]
#[command(
    name = "vhost-user-blkd",
    version,
    about = "vhost-user-blk storage daemon with a QEMU-style block graph",
    after_help = "Short form:  vhost-user-blkd --image disk.img --socket /tmp/vub.sock\n\
                  Backend program conventions (QEMU docs/interop/vhost-user.rst):\n\
                  \x20            vhost-user-blkd --blk-file disk.img --socket-path /tmp/vub.sock [--read-only]\n\
                  Create an image:  vhost-user-blkd create -f qcow2 disk.qcow2 10G  (see: vhost-user-blkd help create)\n\
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
    /// The NBD server, as qemu-storage-daemon's --nbd-server:
    /// addr.type=unix,addr.path=PATH or addr.type=inet,addr.host=H,addr.port=P
    /// [,max-connections=N]; --export type=nbd exports on it.
    #[arg(long = "nbd-server", value_name = "OPTIONS")]
    pub nbd_server: Option<String>,
    /// A TCP port nbd-server-start may listen on (repeatable; 0: a port the
    /// kernel picks). The sandbox refuses any other TCP bind.
    #[arg(long = "allow-tcp-bind", value_name = "PORT")]
    pub allow_tcp_bind: Vec<u16>,
    /// A TOML file with [[blockdev]] and [[export]] tables (see config/).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// A QOM object, as qemu-storage-daemon's --object:
    /// throttle-group,id=tg0,limits.iops-total=1000
    #[arg(long = "object", value_name = "OPTIONS")]
    pub object: Vec<String>,
    /// qemu-storage-daemon's trace option, accepted so that its command
    /// lines run unchanged: QEMU's trace events do not exist here; the
    /// daemon says so at start and logs as RUST_LOG says.
    #[arg(
        short = 'T',
        long = "trace",
        value_name = "[[enable=]PATTERN][,events=FILE][,file=FILE]"
    )]
    pub trace: Vec<String>,
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
    /// The sandbox: on (seccomp filters, Landlock, capabilities dropped,
    /// no_new_privs), log (calls outside the filters allowed and logged
    /// by the kernel, for building the lists; no Landlock), or off.
    #[arg(long, value_name = "on|off|log", env = "VHOST_USER_BLKD_SANDBOX")]
    pub sandbox: Option<String>,
    /// A directory QMP may open, create and remove images and sockets in
    /// at run time (blockdev-add, blockdev-create, snapshots, mirror
    /// targets, block-export-add). Repeatable. Without any, only what the
    /// start-up configuration names is reachable.
    #[arg(long = "allow-path", value_name = "DIR")]
    pub allow_path: Vec<PathBuf>,
    /// A TCP port (or range LOW-HIGH, or `any`) network nodes added at run
    /// time (blockdev-add driver=nbd) may connect to; the ports of the
    /// nodes on the command line are allowed without it. Repeatable.
    #[arg(long = "allow-connect", value_name = "PORT|LOW-HIGH|any")]
    pub allow_connect: Vec<String>,
    /// When started as root: the user (and group) to run as once the
    /// sockets are bound and the images open.
    #[arg(long, value_name = "USER[:GROUP]")]
    pub user: Option<String>,
    /// QEMU's form of --user: user=USER[:GROUP].
    #[arg(long = "run-with", value_name = "user=USER[:GROUP]")]
    pub run_with: Vec<String>,
    /// Also let this user (name or number; repeatable, or a comma-separated
    /// list) connect to the exports and monitors. Default: only root and
    /// the daemon's own user may connect; others are closed and logged.
    #[arg(long, value_name = "UID|USER")]
    pub allow_peer_uid: Vec<String>,
    /// Also let processes of this group (their primary group; name or
    /// number; repeatable, or a comma-separated list) connect.
    #[arg(long, value_name = "GID|GROUP")]
    pub allow_peer_gid: Vec<String>,

    /// Print the vhost-user backend capabilities as JSON and exit (QEMU's
    /// backend program conventions).
    #[arg(long)]
    pub print_capabilities: bool,

    /// Short form: the image to serve (a file or block device; raw or qcow2).
    #[arg(long, visible_alias = "blk-file", value_name = "PATH")]
    pub image: Option<PathBuf>,
    /// Short form: the UNIX socket to listen on.
    #[arg(long, visible_alias = "socket-path", value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Short form: an already listening socket passed by the orchestrator.
    #[arg(long, value_name = "N")]
    pub fd: Option<i32>,
    /// Short form: image format, raw or qcow2 (default: probed, and logged;
    /// an image with another format's header is served as raw only with
    /// --format raw).
    #[arg(long, value_name = "FORMAT")]
    pub format: Option<String>,
    /// Short form: export read-only.
    #[arg(long, visible_alias = "read-only")]
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
    /// Short form: iothreads serving the queues (default: one per queue, at
    /// most one per CPU the daemon may run on).
    #[arg(long, value_name = "N")]
    pub num_iothreads: Option<u16>,
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
    /// `iothread`: the iothread objects named (one, or a list as QEMU 9's
    /// multiqueue export). The export runs one worker thread per name
    /// (queue q on thread q % n) and, unless `poll-max-ns` is given, polls
    /// as the (first) named object's `poll-max-ns` says. Resolved against
    /// the objects when the export is bound.
    pub iothreads: Vec<String>,
    /// `poll-max-ns` was given on the export (it wins over the iothread's).
    pub poll_max_ns_given: bool,
    /// `fixed-iothread`: the export refuses x-blockdev-set-iothread.
    pub fixed_iothread: bool,
    /// `allow-inactive` (QEMU 10): see VhostUserBlkOptions::allow_inactive.
    pub allow_inactive: bool,
    /// Most guest-memory regions a frontend may map at once.
    pub max_mem_regions: u64,
    /// Most guest memory (bytes) a frontend may map at once.
    pub max_guest_memory: u64,
}

/// `--object` / object-add, tagged by `qom-type`.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "qom-type", rename_all = "kebab-case")]
// A handful of objects per daemon, parsed once: their size does not matter.
#[allow(clippy::large_enum_variant)]
pub enum ObjectOptions {
    ThrottleGroup(ThrottleGroupOptions),
    Iothread(IothreadOptions),
    Secret(crate::secret::SecretOptions),
    TlsCredsX509(TlsCredsX509Options),
}

/// `--object tls-creds-x509,id=...,dir=...,endpoint=server`: TLS
/// credentials for the NBD server (QEMU's file names in `dir`:
/// ca-cert.pem, server-cert.pem, server-key.pem).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct TlsCredsX509Options {
    pub id: String,
    pub dir: PathBuf,
    /// QEMU's default is `client`; only `server` is of use here.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Client certificates must chain to ca-cert.pem (QEMU's default: on).
    #[serde(default, deserialize_with = "crate::opts::opt_bool")]
    pub verify_peer: Option<bool>,
    /// Accepted: GnuTLS priority strings mean nothing to rustls.
    #[serde(default)]
    pub priority: Option<String>,
    #[serde(default, deserialize_with = "crate::opts::opt_bool")]
    pub sanity_check: Option<bool>,
}

/// `--object iothread,id=...`: QEMU's iothread properties. Our exports
/// run their own worker threads (an export's queues are never served by
/// another export's threads); an export naming an iothread takes its
/// `poll-max-ns` (see [`ExportConfig::iothreads`]). The other properties
/// are accepted and kept for qom-get.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct IothreadOptions {
    pub id: String,
    /// QEMU's default is 32768 ns.
    #[serde(default, deserialize_with = "crate::opts::opt_uint")]
    pub poll_max_ns: Option<u64>,
    #[serde(default, deserialize_with = "crate::opts::opt_uint")]
    pub poll_grow: Option<u64>,
    #[serde(default, deserialize_with = "crate::opts::opt_uint")]
    pub poll_shrink: Option<u64>,
    #[serde(default, deserialize_with = "crate::opts::opt_uint")]
    pub aio_max_batch: Option<u64>,
    #[serde(default, deserialize_with = "crate::opts::opt_uint")]
    pub thread_pool_min: Option<u64>,
    #[serde(default, deserialize_with = "crate::opts::opt_uint")]
    pub thread_pool_max: Option<u64>,
}

/// QEMU's iothread poll-max-ns default.
pub const IOTHREAD_DEFAULT_POLL_MAX_NS: u64 = 32768;

/// A throttle group: `limits` (QAPI's ThrottleLimits) and, as QEMU's
/// throttle-group.c still takes them, the same limits as legacy top-level
/// `x-` properties (`x-iops-total=1000`); an `x-` property overrides the
/// same field of `limits`.
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "serde_json::Map<String, serde_json::Value>")]
pub struct ThrottleGroupOptions {
    pub id: String,
    pub limits: crate::throttle::ThrottleLimits,
}

impl TryFrom<serde_json::Map<String, serde_json::Value>> for ThrottleGroupOptions {
    type Error = String;

    fn try_from(mut m: serde_json::Map<String, serde_json::Value>) -> Result<Self, String> {
        use serde_json::Value;
        let id = match m.remove("id") {
            Some(Value::String(s)) => s,
            Some(_) => return Err("parameter 'id': expected a string".into()),
            None => return Err("missing field `id`".into()),
        };
        let mut limits = match m.remove("limits") {
            Some(Value::Object(l)) => l,
            Some(_) => return Err("parameter 'limits': expected an object".into()),
            None => serde_json::Map::new(),
        };
        for (k, v) in m {
            let Some(field) = k.strip_prefix("x-") else {
                return Err(format!(
                    "unknown field `{k}`, expected `id`, `limits` or `x-*`"
                ));
            };
            limits.insert(field.to_string(), v);
        }
        let limits = serde_path_to_error::deserialize(Value::Object(limits)).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner().to_string();
            // Name the field as the user spelled it when it came as x-.
            format!("parameter 'limits.{path}' (or 'x-{path}'): {inner}")
        })?;
        Ok(ThrottleGroupOptions { id, limits })
    }
}

/// A QMP monitor socket.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct MonitorConfig {
    pub path: PathBuf,
    #[serde(default, deserialize_with = "crate::opts::bool")]
    pub pretty: bool,
    /// The --chardev id: a socket systemd passes under this name
    /// (LISTEN_FDNAMES) is the monitor's, and `path` is not bound.
    #[serde(default)]
    pub id: Option<String>,
    /// That socket (set by crate::systemd).
    #[serde(skip)]
    pub fd: Option<std::os::fd::RawFd>,
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
    /// `--nbd-server`, and the `--export type=nbd` on it.
    pub nbd_server: Option<NbdServerOptions>,
    pub nbd_exports: Vec<NbdExportOptions>,
    /// `--allow-tcp-bind`.
    pub allow_tcp_bind: Vec<u16>,
    pub monitors: Vec<MonitorConfig>,
    pub pidfile: Option<PathBuf>,
    pub daemonize: bool,
    /// `-T` options given (noted at start, otherwise ignored).
    pub trace: Vec<String>,
    pub log_file: Option<PathBuf>,
    pub socket_perms: crate::sockpath::SocketPerms,
    pub sandbox: crate::sandbox::Settings,
    /// Who may connect besides root and the daemon's own user.
    pub peer_policy: crate::peercred::PeerPolicy,
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
    /// As `--socket-mode`, `--socket-group`, `--socket-owner` (the
    /// command line wins).
    #[serde(default)]
    socket_mode: Option<String>,
    #[serde(default)]
    socket_group: Option<String>,
    #[serde(default)]
    socket_owner: Option<String>,
    /// As `--sandbox`, `--allow-path`, `--user` (the command line wins;
    /// allow-path lists add up).
    #[serde(default)]
    sandbox: Option<String>,
    #[serde(default)]
    allow_path: Vec<PathBuf>,
    /// As `--allow-connect` (the lists add up).
    #[serde(default)]
    allow_connect: Vec<String>,
    #[serde(default)]
    user: Option<String>,
    /// As `--allow-peer-uid`, `--allow-peer-gid`: lists of names or numbers
    /// (the command line's list, if given, wins).
    #[serde(default)]
    allow_peer_uid: Option<Vec<IdOrName>>,
    #[serde(default)]
    allow_peer_gid: Option<Vec<IdOrName>>,
}

/// A user or group in the config file: `1000` or `"qemu"`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum IdOrName {
    Id(u32),
    Name(String),
}

impl IdOrName {
    fn into_string(self) -> String {
        match self {
            IdOrName::Id(n) => n.to_string(),
            IdOrName::Name(s) => s,
        }
    }
}

/// The users or groups of `--allow-peer-uid` / `--allow-peer-gid`: each
/// argument a comma-separated list of names or numbers, names resolved now.
fn peer_ids(
    option: &'static str,
    args: &[String],
    resolve: fn(&str) -> Result<u32, String>,
) -> Result<Vec<u32>, ConfigError> {
    let mut ids = Vec::new();
    for arg in args {
        for item in arg.split(',').map(str::trim) {
            let invalid = |reason: String| ConfigError::Invalid {
                option,
                arg: arg.clone(),
                reason,
            };
            if item.is_empty() {
                return Err(invalid("an empty name in the list".into()));
            }
            let id = resolve(item).map_err(invalid)?;
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
    }
    Ok(ids)
}

fn from_keyval<T: serde::de::DeserializeOwned>(
    option: &'static str,
    arg: &str,
    implied: Option<&str>,
) -> Result<T, ConfigError> {
    let v = keyval::parse(arg, implied).map_err(|source| ConfigError::Keyval {
        option,
        arg: redact(arg),
        source,
    })?;
    serde_json::from_value(v).map_err(|e| ConfigError::Invalid {
        option,
        arg: redact(arg),
        reason: e.to_string(),
    })
}

/// An option string as errors may show it: a `data=` value (a secret
/// object's) replaced by `<hidden>`.
fn redact(arg: &str) -> String {
    // keyval's parts end at a comma that is not doubled (",," is a comma
    // in a value).
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut chars = arg.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push_str(",,");
                continue;
            }
            parts.push(std::mem::take(&mut cur));
        } else {
            cur.push(c);
        }
    }
    parts.push(cur);
    parts
        .into_iter()
        .map(|kv| {
            if kv.starts_with("data=") {
                "data=<hidden>".to_string()
            } else {
                kv
            }
        })
        .collect::<Vec<_>>()
        .join(",")
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
        let iothreads: Vec<String> = match &o.iothread {
            None => Vec::new(),
            Some(r) => {
                let v = r.names().map_err(|e| err("iothread", e))?;
                if v.is_empty() {
                    return Err(err("iothread", "the list of iothreads is empty".into()));
                }
                if r.is_list() && o.fixed_iothread {
                    return Err(err(
                        "fixed-iothread",
                        "cannot be used with a list of iothreads (multiqueue export)".into(),
                    ));
                }
                v
            }
        };
        let num_iothreads = match (o.num_iothreads, iothreads.len() as u64) {
            (Some(n), k) if k > 0 && n != k => {
                return Err(err(
                    "num-iothreads",
                    format!("{n} disagrees with the {k} iothread(s) named by 'iothread'"),
                ))
            }
            (Some(n), _) => n,
            // One named iothread: every queue on one thread, as in QEMU.
            (None, k) if k > 0 => k.min(num_queues),
            (None, _) => num_queues.min(export::online_cpus()),
        };
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
        let max_mem_regions = o.max_mem_regions.unwrap_or(export::MAX_MEM_REGIONS);
        if !(1..=export::MAX_MEM_REGIONS).contains(&max_mem_regions) {
            return Err(err(
                "max-mem-regions",
                format!(
                    "{max_mem_regions} is not between 1 and {}",
                    export::MAX_MEM_REGIONS
                ),
            ));
        }
        let max_guest_memory = o
            .max_guest_memory
            .unwrap_or(export::DEFAULT_MAX_GUEST_MEMORY);
        if max_guest_memory == 0 {
            return Err(err("max-guest-memory", "must not be 0".into()));
        }
        if let SocketAddress::Fd { str } = &o.addr {
            // A number, or the name of a socket systemd passes (crate::systemd).
            if str.parse::<i32>().is_ok_and(|fd| fd < 0) || str.is_empty() {
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
            poll_max_ns_given: o.poll_max_ns.is_some(),
            iothreads,
            fixed_iothread: o.fixed_iothread,
            allow_inactive: o.allow_inactive,
            max_mem_regions,
            max_guest_memory,
        })
    }
}

/// The formats the short form serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ShortFormat {
    Raw,
    Qcow2,
}

impl Args {
    /// `--format`, or the probed format (and whether it was probed): QEMU's rule for probed images, a
    /// header of another format is never served as raw unless `--format raw`
    /// says so (and then with a warning).
    fn short_form_format(
        &self,
        image: &std::path::Path,
    ) -> Result<(ShortFormat, bool), ConfigError> {
        let given = match self.format.as_deref() {
            None => None,
            Some("raw") => Some(ShortFormat::Raw),
            Some("qcow2") => Some(ShortFormat::Qcow2),
            Some(f) => {
                return Err(ConfigError::Usage(format!(
                    "--format {f}: only raw and qcow2 are supported"
                )))
            }
        };
        // A file that cannot be read is left to the file driver, whose
        // error names the cause.
        let probed = match probe::probe_file(image) {
            Ok(p) => Some(p),
            Err(e) => {
                log::debug!("{}: cannot probe the format: {e}", image.display());
                None
            }
        };
        let shown = image.display();
        match (given, probed) {
            (Some(ShortFormat::Raw), Some(Probed::Qcow2)) => log::warn!(
                "{shown}: serving an image with a qcow2 header as raw, as --format raw says: \
                 the guest sees the qcow2 metadata, not the disk it describes"
            ),
            (Some(ShortFormat::Raw), Some(Probed::Other(f))) => log::warn!(
                "{shown}: serving an image with a {f} header as raw, as --format raw says"
            ),
            (Some(f), _) => return Ok((f, false)),
            (None, Some(Probed::Qcow2)) => {
                log::info!("{shown}: format probed: qcow2 (give --format to skip probing)");
                return Ok((ShortFormat::Qcow2, true));
            }
            (None, Some(Probed::Other(f))) => {
                return Err(ConfigError::Usage(format!(
                    "{shown}: the image has a {f} header, a format this daemon cannot open; \
                     give --format raw to serve the file as a raw disk anyway"
                )))
            }
            (None, Some(Probed::Raw)) => log::info!(
                "{shown}: format probed: raw (no known header; give --format raw to skip probing)"
            ),
            (None, None) => {}
        }
        Ok((ShortFormat::Raw, given.is_none()))
    }

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
        let (format, probed) = self.short_form_format(image)?;
        let file = BlockdevOptions::File(FileOptions {
            node_name: "file0".into(),
            filename: image.to_string_lossy().into_owned(),
            read_only: self.readonly,
            cache: CacheOptions {
                direct: self.direct,
                no_flush: false,
            },
            discard: DiscardMode::Unmap,
            auto_read_only: false,
            detect_zeroes: Default::default(),
            force_share: false,
            active: None,
            aio: Default::default(),
            locking: crate::drivers::Locking::Auto,
        });
        let disk = match format {
            ShortFormat::Raw => BlockdevOptions::Raw(RawOptions {
                node_name: "disk0".into(),
                file: BlockdevRef::Name("file0".into()),
                offset: 0,
                size: None,
                read_only: self.readonly,
                discard: DiscardMode::Unmap,
                auto_read_only: false,
                detect_zeroes: Default::default(),
                force_share: false,
                active: None,
                cache: CacheOptions::default(),
                probed,
            }),
            ShortFormat::Qcow2 => serde_json::from_value(serde_json::json!({
                "driver": "qcow2",
                "node-name": "disk0",
                "file": "file0",
                "read-only": self.readonly,
                "discard": "unmap",
            }))
            .map_err(|e| ConfigError::Usage(format!("qcow2 short form: {e}")))?,
        };
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
            num_iothreads: self.num_iothreads.map(u64::from),
            iothread: None,
            fixed_iothread: false,
            allow_inactive: false,
            max_mem_regions: None,
            max_guest_memory: None,
            on_read_error: None,
            on_write_error: None,
            poll_max_ns: None,
        };
        Ok((vec![file, disk], export))
    }
}

/// The socket options given as `--socket-mode`, `--socket-group`,
/// `--socket-owner` (or the config file's `socket-mode`, ...).
struct SocketOptions {
    socket_mode: Option<String>,
    socket_group: Option<String>,
    socket_owner: Option<String>,
}

impl SocketOptions {
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
        let mut nbd_exports = Vec::new();
        let mut monitors = Vec::new();
        let mut pidfile = args.pidfile.clone();
        let mut daemonize = args.daemonize;
        let mut log_file = args.log_file.clone();
        let mut sockets = SocketOptions {
            socket_mode: args.socket_mode.clone(),
            socket_group: args.socket_group.clone(),
            socket_owner: args.socket_owner.clone(),
        };
        let mut allow_peer_uid = ("--allow-peer-uid", args.allow_peer_uid.clone());
        let mut allow_peer_gid = ("--allow-peer-gid", args.allow_peer_gid.clone());

        let mut sandbox_mode = args.sandbox.clone();
        let mut allow_paths = args.allow_path.clone();
        let mut allow_connect = args.allow_connect.clone();
        let mut user = args.user.clone();
        for r in &args.run_with {
            match r.strip_prefix("user=") {
                Some(u) if user.is_none() => user = Some(u.to_string()),
                Some(_) => {
                    return Err(ConfigError::Usage(
                        "--user and --run-with user= both given".into(),
                    ))
                }
                None => {
                    return Err(ConfigError::Invalid {
                        option: "--run-with",
                        arg: r.clone(),
                        reason: "only user=USER[:GROUP] is supported".into(),
                    })
                }
            }
        }
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
            for e in file.export {
                match e {
                    ExportOptions::VhostUserBlk(o) => exports.push(o),
                    ExportOptions::Nbd(o) => nbd_exports.push(o),
                }
            }
            monitors.extend(file.monitor);
            pidfile = pidfile.or(file.pidfile);
            daemonize |= file.daemonize;
            log_file = log_file.or(file.log_file);
            sockets.socket_mode = sockets.socket_mode.or(file.socket_mode);
            sockets.socket_group = sockets.socket_group.or(file.socket_group);
            sockets.socket_owner = sockets.socket_owner.or(file.socket_owner);
            sandbox_mode = sandbox_mode.or(file.sandbox);
            allow_paths.extend(file.allow_path);
            allow_connect.extend(file.allow_connect);
            user = user.or(file.user);
            // A list on the command line replaces the file's.
            if let (true, Some(list)) = (allow_peer_uid.1.is_empty(), file.allow_peer_uid) {
                allow_peer_uid = (
                    "config file allow-peer-uid",
                    list.into_iter().map(IdOrName::into_string).collect(),
                );
            }
            if let (true, Some(list)) = (allow_peer_gid.1.is_empty(), file.allow_peer_gid) {
                allow_peer_gid = (
                    "config file allow-peer-gid",
                    list.into_iter().map(IdOrName::into_string).collect(),
                );
            }
        }
        let mut sandbox = sandbox_settings(sandbox_mode, allow_paths, user)?;
        for v in &allow_connect {
            sandbox
                .allow_connect
                .add(v)
                .map_err(|reason| ConfigError::Invalid {
                    option: "--allow-connect",
                    arg: v.clone(),
                    reason,
                })?;
        }
        let mut peer_policy = crate::peercred::PeerPolicy {
            uids: peer_ids(
                allow_peer_uid.0,
                &allow_peer_uid.1,
                crate::sockpath::parse_owner,
            )?,
            gids: peer_ids(
                allow_peer_gid.0,
                &allow_peer_gid.1,
                crate::sockpath::parse_group,
            )?,
        };
        let socket_perms = sockets.socket_perms()?;
        // A socket given to a user or group is meant for it: it may
        // connect, as if listed in --allow-peer-uid / --allow-peer-gid.
        if let Some(uid) = socket_perms.uid {
            if !peer_policy.uids.contains(&uid) {
                peer_policy.uids.push(uid);
            }
        }
        if let Some(gid) = socket_perms.gid {
            if !peer_policy.gids.contains(&gid) {
                peer_policy.gids.push(gid);
            }
        }
        sandbox.keep_chown = socket_perms.uid.is_some() || socket_perms.gid.is_some();
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
            match from_keyval("--export", arg, Some("type"))? {
                ExportOptions::VhostUserBlk(o) => exports.push(o),
                ExportOptions::Nbd(o) => nbd_exports.push(o),
            }
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
                id: Some(m.chardev.clone()),
                fd: None,
            });
        }
        let nbd_server = match &args.nbd_server {
            None => None,
            Some(arg) => {
                let v = keyval::parse(arg, None).map_err(|source| ConfigError::Keyval {
                    option: "--nbd-server",
                    arg: arg.clone(),
                    source,
                })?;
                Some(
                    NbdServerOptions::from_json(&v).map_err(|reason| ConfigError::Invalid {
                        option: "--nbd-server",
                        arg: arg.clone(),
                        reason,
                    })?,
                )
            }
        };
        if !nbd_exports.is_empty() && nbd_server.is_none() {
            return Err(ConfigError::Usage(
                "--export type=nbd needs --nbd-server (NBD server not running)".into(),
            ));
        }
        if exports.is_empty() && monitors.is_empty() && nbd_exports.is_empty() {
            return Err(ConfigError::Usage(
                "nothing to serve: give --image and --socket, or --blockdev and --export, or a --monitor, or --config (see --help)".into(),
            ));
        }
        let exports = exports
            .into_iter()
            .map(ExportConfig::try_from)
            .collect::<Result<Vec<_>, _>>()?;
        let mut ids: Vec<&str> = exports
            .iter()
            .map(|e| e.id.as_str())
            .chain(nbd_exports.iter().map(|e| e.id.as_str()))
            .collect();
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
            nbd_server,
            nbd_exports,
            allow_tcp_bind: args.allow_tcp_bind.clone(),
            monitors,
            pidfile,
            daemonize,
            trace: args.trace.clone(),
            log_file,
            socket_perms,
            sandbox,
            peer_policy,
        })
    }
}

/// The sandbox settings from `--sandbox`, `--allow-path`, `--user` (or the
/// config file).
fn sandbox_settings(
    mode: Option<String>,
    allow_paths: Vec<PathBuf>,
    user: Option<String>,
) -> Result<crate::sandbox::Settings, ConfigError> {
    let mode = match mode {
        Some(m) => m.parse().map_err(|reason| ConfigError::Invalid {
            option: "--sandbox",
            arg: m.clone(),
            reason,
        })?,
        None => crate::sandbox::Mode::default(),
    };
    for p in &allow_paths {
        if !p.is_dir() {
            return Err(ConfigError::Invalid {
                option: "--allow-path",
                arg: p.display().to_string(),
                reason: "not a directory".into(),
            });
        }
    }
    let run_as = user
        .map(|u| {
            u.parse().map_err(|reason| ConfigError::Invalid {
                option: "--user",
                arg: u.clone(),
                reason,
            })
        })
        .transpose()?;
    Ok(crate::sandbox::Settings {
        mode,
        allow_paths,
        run_as,
        keep_chown: false,
        allow_connect: Default::default(),
    })
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
        assert_eq!(e.num_iothreads, 4.min(export::online_cpus() as usize));
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
            ("max-mem-regions=0", "max-mem-regions"),
            ("max-mem-regions=510", "max-mem-regions"),
            ("max-guest-memory=0", "max-guest-memory"),
        ] {
            let export =
                format!("vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path=s,{opt}");
            let e = Config::try_from(args(&["--export", &export])).unwrap_err();
            assert!(e.to_string().contains(needle), "{opt}: {e}");
        }
    }

    #[test]
    fn frontend_limits_have_defaults_and_take_sizes() {
        let base = "vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path=s";
        let c = Config::try_from(args(&["--export", base])).unwrap();
        assert_eq!(c.exports[0].max_mem_regions, 509);
        assert_eq!(c.exports[0].max_guest_memory, 1 << 40);
        let e = format!("{base},max-mem-regions=8,max-guest-memory=16G");
        let c = Config::try_from(args(&["--export", &e])).unwrap();
        assert_eq!(c.exports[0].max_mem_regions, 8);
        assert_eq!(c.exports[0].max_guest_memory, 16 << 30);
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
    fn socket_options_come_from_the_config_file_and_the_command_line_wins() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            r#"
socket-mode = "0660"
socket-group = "6"
[[blockdev]]
driver = "null-co"
node-name = "n0"
[[export]]
type = "vhost-user-blk"
id = "e0"
node-name = "n0"
addr = { type = "unix", path = "/tmp/n.sock" }
"#,
        )
        .unwrap();
        let file = path.to_str().unwrap();
        let c = Config::try_from(args(&["--config", file])).unwrap();
        assert_eq!(c.socket_perms.mode, Some(0o660));
        assert_eq!(c.socket_perms.gid, Some(6));
        assert_eq!(c.socket_perms.uid, None);
        let c = Config::try_from(args(&["--config", file, "--socket-mode", "0600"])).unwrap();
        assert_eq!(c.socket_perms.mode, Some(0o600));
        assert_eq!(c.socket_perms.gid, Some(6));
    }

    #[test]
    fn sandbox_options_come_from_the_config_file_and_the_command_line() {
        let dir = tempfile::tempdir().unwrap();
        let allowed = dir.path().join("images");
        std::fs::create_dir(&allowed).unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            format!(
                r#"
sandbox = "log"
allow-path = ["{}"]
user = "65534:65534"
socket-group = "6"
[[blockdev]]
driver = "null-co"
node-name = "n0"
[[export]]
type = "vhost-user-blk"
id = "e0"
node-name = "n0"
addr = {{ type = "unix", path = "/tmp/n.sock" }}
"#,
                allowed.display()
            ),
        )
        .unwrap();
        let file = path.to_str().unwrap();
        let c = Config::try_from(args(&["--config", file])).unwrap();
        assert_eq!(c.sandbox.mode, crate::sandbox::Mode::Log);
        assert_eq!(c.sandbox.allow_paths, vec![allowed.clone()]);
        let run_as = c.sandbox.run_as.clone().unwrap();
        assert_eq!((run_as.uid, run_as.gid), (65534, 65534));
        assert!(c.sandbox.keep_chown);
        // The socket's group may connect.
        assert!(c.peer_policy.gids.contains(&6));
        let tmp = std::env::temp_dir();
        let c = Config::try_from(args(&[
            "--config",
            file,
            "--sandbox",
            "off",
            "--allow-path",
            tmp.to_str().unwrap(),
            "--run-with",
            "user=0",
        ]))
        .unwrap();
        assert_eq!(c.sandbox.mode, crate::sandbox::Mode::Off);
        assert_eq!(c.sandbox.allow_paths, vec![tmp, allowed]);
        assert_eq!(c.sandbox.run_as.unwrap().uid, 0);
        // Neither a missing directory nor two ways to name the user.
        let e = Config::try_from(args(&["--allow-path", "/no/such/dir", "--image", "x"]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--allow-path '/no/such/dir': not a directory"),
            "{e}"
        );
        let e = Config::try_from(args(&["--user", "0", "--run-with", "user=0"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("both given"), "{e}");
    }

    #[test]
    fn allow_connect_from_the_config_file_and_the_command_line_adds_up() {
        use crate::sandbox::AllowConnect;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            r#"
allow-connect = ["6800-7568"]
[[blockdev]]
driver = "null-co"
node-name = "n0"
[[export]]
type = "vhost-user-blk"
id = "e0"
node-name = "n0"
addr = { type = "unix", path = "/tmp/n.sock" }
"#,
        )
        .unwrap();
        let file = path.to_str().unwrap();
        let c = Config::try_from(args(&["--config", file, "--allow-connect", "3300"])).unwrap();
        assert_eq!(
            c.sandbox.allow_connect,
            AllowConnect::Ports(vec![(3300, 3300), (6800, 7568)])
        );
        let c = Config::try_from(args(&["--config", file, "--allow-connect", "any"])).unwrap();
        assert_eq!(c.sandbox.allow_connect, AllowConnect::Any);
        let e = Config::try_from(args(&["--config", file, "--allow-connect", "99999"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("--allow-connect '99999'"), "{e}");
    }

    #[test]
    fn allowed_peers_from_the_command_line_names_numbers_and_lists() {
        let null = [
            "--blockdev",
            "driver=null-co,node-name=n0",
            "--export",
            "vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path=/tmp/n.sock",
        ];
        let c = Config::try_from(args(&null)).unwrap();
        assert_eq!(c.peer_policy, crate::peercred::PeerPolicy::default());
        let mut a = null.to_vec();
        a.extend([
            "--allow-peer-uid",
            "root,1000",
            "--allow-peer-uid",
            "65534",
            "--allow-peer-gid",
            "0",
            "--allow-peer-gid",
            "root, 36",
        ]);
        let c = Config::try_from(args(&a)).unwrap();
        assert_eq!(c.peer_policy.uids, vec![0, 1000, 65534]);
        assert_eq!(c.peer_policy.gids, vec![0, 36]);
        for (opt, bad, named) in [
            (
                "--allow-peer-uid",
                "1000,no-such-user-xyz",
                "no user 'no-such-user-xyz'",
            ),
            (
                "--allow-peer-gid",
                "no-such-group-xyz",
                "no group 'no-such-group-xyz'",
            ),
            ("--allow-peer-uid", "1,,2", "empty"),
        ] {
            let mut a = null.to_vec();
            a.extend([opt, bad]);
            let e = Config::try_from(args(&a)).unwrap_err().to_string();
            assert!(e.starts_with(opt) && e.contains(named), "{e}");
        }
    }

    #[test]
    fn allowed_peers_from_the_config_file_and_the_command_line_wins() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        let body = r#"
[[blockdev]]
driver = "null-co"
node-name = "n0"
[[export]]
type = "vhost-user-blk"
id = "e0"
node-name = "n0"
addr = { type = "unix", path = "/tmp/n.sock" }
"#;
        std::fs::write(
            &path,
            format!("allow-peer-uid = [1000, \"root\"]\nallow-peer-gid = [36]\n{body}"),
        )
        .unwrap();
        let file = path.to_str().unwrap();
        let c = Config::try_from(args(&["--config", file])).unwrap();
        assert_eq!(c.peer_policy.uids, vec![1000, 0]);
        assert_eq!(c.peer_policy.gids, vec![36]);
        let c = Config::try_from(args(&["--config", file, "--allow-peer-uid", "7"])).unwrap();
        assert_eq!(c.peer_policy.uids, vec![7]);
        assert_eq!(c.peer_policy.gids, vec![36]);
        std::fs::write(
            &path,
            format!("allow-peer-gid = [\"no-such-group-xyz\"]\n{body}"),
        )
        .unwrap();
        let e = Config::try_from(args(&["--config", file]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("allow-peer-gid") && e.contains("no group 'no-such-group-xyz'"),
            "{e}"
        );
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
    fn secret_values_are_hidden_in_option_errors() {
        let e = Config::try_from(args(&[
            "--object",
            "secret,id=s,data=TOP,,SECRET,bogus=1",
            "--image",
            "x",
            "--socket",
            "y",
        ]))
        .unwrap_err()
        .to_string();
        assert!(e.contains("data=<hidden>,bogus=1"), "{e}");
        assert!(!e.contains("TOP") && !e.contains("SECRET"), "{e}");
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
        let ObjectOptions::ThrottleGroup(t) = &c.objects[0] else {
            panic!("not a throttle group")
        };
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
        let ObjectOptions::ThrottleGroup(t) = &c.objects[0] else {
            panic!("not a throttle group")
        };
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
    fn throttle_group_takes_qemus_legacy_x_properties() {
        let c = Config::try_from(args(&[
            "--object",
            "throttle-group,id=tg0,x-iops-total=1000,x-bps-write=1M,limits.iops-read=5,x-iops-read=7,x-iops-size=8k",
            "--blockdev",
            "driver=null-co,node-name=n0",
            "--export",
            "vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path=s",
        ]))
        .unwrap();
        let ObjectOptions::ThrottleGroup(t) = &c.objects[0] else {
            panic!("not a throttle group")
        };
        assert_eq!(t.limits.iops_total, Some(1000));
        assert_eq!(t.limits.bps_write, Some(1 << 20));
        assert_eq!(t.limits.iops_read, Some(7), "x- overrides limits.");
        assert_eq!(t.limits.iops_size, Some(8192));
        // As JSON (object-add), with a number.
        let o: ObjectOptions = serde_json::from_value(serde_json::json!({
            "qom-type": "throttle-group", "id": "tg1", "x-iops-total-max": 50,
            "x-iops-total": 10, "x-iops-total-max-length": 2}))
        .unwrap();
        let ObjectOptions::ThrottleGroup(t) = &o else {
            panic!("not a throttle group")
        };
        assert_eq!(t.limits.iops_total_max_length, Some(2));
        for (bad, want) in [
            ("throttle-group,id=t,x-iops-totl=1", "iops-totl"),
            ("throttle-group,id=t,y=1", "`y`"),
            ("throttle-group,id=t,x-iops-total=abc", "x-iops-total"),
        ] {
            let e = Config::try_from(args(&["--object", bad, "--image", "x", "--socket", "y"]))
                .unwrap_err();
            assert!(e.to_string().contains(want), "{bad}: {e}");
        }
    }

    #[test]
    fn iothread_objects_and_export_iothreads_parse_as_qsd_spells_them() {
        let c = Config::try_from(args(&[
            "--object",
            "iothread,id=io0,poll-max-ns=1000,poll-grow=2,poll-shrink=4,aio-max-batch=16",
            "--object",
            "iothread,id=io1",
            "--blockdev",
            "driver=null-co,node-name=n0",
            "--export",
            "vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path=s,iothread=io0,fixed-iothread=on",
            "--export",
            "vhost-user-blk,id=e1,node-name=n0,addr.type=unix,addr.path=t,num-queues=4,iothread.0=io0,iothread.1=io1",
            "--export",
            r#"{"type":"vhost-user-blk","id":"e2","node-name":"n0","addr":{"type":"unix","path":"u"},"iothread":["io1"]}"#,
            "-T",
            "vhost_user_blk*",
        ]))
        .unwrap();
        let ObjectOptions::Iothread(t) = &c.objects[0] else {
            panic!("not an iothread")
        };
        assert_eq!(t.poll_max_ns, Some(1000));
        assert_eq!(t.aio_max_batch, Some(16));
        assert_eq!(c.exports[0].iothreads, ["io0"]);
        assert_eq!(c.exports[0].num_iothreads, 1);
        assert!(c.exports[0].fixed_iothread);
        assert_eq!(c.exports[1].iothreads, ["io0", "io1"]);
        assert_eq!(c.exports[1].num_iothreads, 2);
        assert_eq!(c.exports[2].iothreads, ["io1"]);
        assert_eq!(c.trace, ["vhost_user_blk*"]);
        for (bad, want) in [
            (
                "iothread.0=a,iothread.1=b,fixed-iothread=on",
                "fixed-iothread",
            ),
            ("iothread.0=a,iothread.2=b", "iothread.2"),
            ("iothread=a,num-iothreads=2", "num-iothreads"),
        ] {
            let e = Config::try_from(args(&[
                "--blockdev",
                "driver=null-co,node-name=n0",
                "--export",
                &format!("vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path=s,num-queues=4,{bad}"),
            ]))
            .unwrap_err();
            assert!(e.to_string().contains(want), "{bad}: {e}");
        }
        let e = Config::try_from(args(&[
            "--object",
            "iothread,id=io0,poll-max-ns=-1",
            "--image",
            "x",
            "--socket",
            "y",
        ]))
        .unwrap_err();
        assert!(e.to_string().contains("poll-max-ns"), "{e}");
    }

    #[test]
    fn nothing_to_serve_is_a_usage_error() {
        assert!(matches!(
            Config::try_from(args(&[])),
            Err(ConfigError::Usage(_))
        ));
    }
}
