//! Export options, spelled as qapi/block-export.json has them for
//! `type=vhost-user-blk`, plus our iothread mapping.

use serde::Deserialize;

use crate::block::policy::{self, OnError};
use crate::opts;

/// `--export` / block-export-add, tagged by `type`.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum ExportOptions {
    VhostUserBlk(VhostUserBlkOptions),
    Nbd(NbdExportOptions),
}

/// QAPI's SocketAddress, flat.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum SocketAddress {
    /// A path to listen on; a stale socket file there is removed.
    Unix { path: String },
    /// An already listening socket, passed by the orchestrator: `str` is
    /// its file descriptor number.
    Fd { str: String },
}

/// Default number of queues: enough that a guest with one queue per vCPU
/// attaches without tuning (QEMU refuses a device with more queues than the
/// backend offers). A frontend may use fewer.
pub const DEFAULT_NUM_QUEUES: u16 = 16;
/// Default poll-max-ns: QEMU's iothread default. Polling stops by itself
/// where it costs more CPU than sleeping (worker.rs, Poller); see
/// docs/PERFORMANCE.md, "Adaptive polling by default".
pub const DEFAULT_POLL_MAX_NS: u64 = 32768;
/// Default (maximum) queue size the frontend may choose.
pub const DEFAULT_QUEUE_SIZE: u16 = 1024;
/// Default and largest `max-mem-regions`: the memory slots advertised by
/// GET_MAX_MEM_SLOTS, as vhost-user-backend and the kernel's vhost do
/// (KVM's old 512 slots less 3 it kept for itself).
pub const MAX_MEM_REGIONS: u64 = 509;
/// Default `max-guest-memory`: the most guest memory one connection may have
/// mapped at once (1 TiB).
pub const DEFAULT_MAX_GUEST_MEMORY: u64 = 1 << 40;

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct VhostUserBlkOptions {
    pub id: String,
    pub node_name: String,
    pub addr: SocketAddress,
    #[serde(default, deserialize_with = "opts::bool")]
    pub writable: bool,
    /// The write cache the guest starts with is off: every write is durable
    /// when it completes.
    #[serde(default, deserialize_with = "opts::bool")]
    pub writethrough: bool,
    #[serde(default, deserialize_with = "opts::opt_uint")]
    pub num_queues: Option<u64>,
    /// Largest virtqueue the frontend may set up (a power of two).
    #[serde(default, deserialize_with = "opts::opt_uint")]
    pub queue_size: Option<u64>,
    #[serde(default, deserialize_with = "opts::opt_size")]
    pub logical_block_size: Option<u64>,
    /// GET_ID answer, at most 20 bytes.
    #[serde(default)]
    pub serial: Option<String>,
    /// Policy for failed reads (default report; QEMU's rerror).
    #[serde(default, deserialize_with = "policy::export_policy")]
    pub on_read_error: Option<OnError>,
    /// Policy for failed writes, flushes, discards (default enospc, as
    /// QEMU's werror).
    #[serde(default, deserialize_with = "policy::export_policy")]
    pub on_write_error: Option<OnError>,
    /// Longest time an iothread polls its rings for more work before it
    /// sleeps, in ns (like QEMU's iothread poll-max-ns; default 32768, as
    /// QEMU's); 0 turns polling off. The window adapts: it grows after
    /// polling found work and shrinks when it found none, and polling stops
    /// when it spins longer per batch found than sleeping costs. An idle
    /// export never polls.
    #[serde(default, deserialize_with = "opts::opt_uint")]
    pub poll_max_ns: Option<u64>,
    /// Worker threads (iothreads) serving the queues: queue q goes to thread
    /// q % num-iothreads. Default: one per queue, but no more than the CPUs
    /// the daemon may run on ([`online_cpus`]).
    #[serde(default, deserialize_with = "opts::opt_uint")]
    pub num_iothreads: Option<u64>,
    /// qemu-storage-daemon's `iothread`: an iothread object's id, or a list
    /// of them (QEMU 9's multiqueue export); see ExportConfig::iothreads.
    #[serde(default)]
    pub iothread: Option<IothreadRef>,
    /// qemu-storage-daemon's `fixed-iothread`: the export refuses
    /// x-blockdev-set-iothread.
    #[serde(default, deserialize_with = "opts::bool")]
    pub fixed_iothread: bool,
    /// QEMU 10's `allow-inactive`: the export may serve an inactive node
    /// (reads only) and keeps serving while its node is inactivated;
    /// without it, adding the export activates the node, and inactivating
    /// a node a writable export serves is refused.
    #[serde(default, deserialize_with = "opts::bool")]
    pub allow_inactive: bool,
    /// Most guest-memory regions a frontend may have mapped at once
    /// (SET_MEM_TABLE, ADD_MEM_REG); advertised by GET_MAX_MEM_SLOTS.
    #[serde(default, deserialize_with = "opts::opt_uint")]
    pub max_mem_regions: Option<u64>,
    /// Most guest memory, in bytes, a frontend may have mapped at once (the
    /// sum of its regions' sizes).
    #[serde(default, deserialize_with = "opts::opt_size")]
    pub max_guest_memory: Option<u64>,
}

/// `iothread`: one name or a list (`iothread.0=a,iothread.1=b` in keyval).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum IothreadRef {
    One(String),
    Many(Vec<String>),
    /// keyval's `iothread.0=a,iothread.1=b` (a list, as QEMU's keyval).
    Indexed(std::collections::BTreeMap<String, String>),
}

impl IothreadRef {
    /// The names, in order; keyval's indices must be 0, 1, ... n-1.
    pub fn names(&self) -> Result<Vec<String>, String> {
        match self {
            IothreadRef::One(n) => Ok(vec![n.clone()]),
            IothreadRef::Many(v) => Ok(v.clone()),
            IothreadRef::Indexed(m) => {
                let mut v = vec![None; m.len()];
                for (k, name) in m {
                    match k.parse::<usize>().ok().and_then(|i| v.get_mut(i)) {
                        Some(slot) => *slot = Some(name.clone()),
                        None => {
                            return Err(format!(
                                "'iothread.{k}': expected a list index below {}",
                                m.len()
                            ))
                        }
                    }
                }
                Ok(v.into_iter().flatten().collect())
            }
        }
    }

    /// A list (even of one), as opposed to one name.
    pub fn is_list(&self) -> bool {
        !matches!(self, IothreadRef::One(_))
    }
}

/// The CPUs this process may run on (its affinity mask and cgroup quota, as
/// `std::thread::available_parallelism` counts them; 1 if unknown): the
/// default cap on an export's iothreads, since more threads than CPUs only
/// add context switches.
/// Counted once: the cgroup files it reads are out of the sandbox's reach
/// later (exports added at run time use the same count).
pub fn online_cpus() -> u64 {
    static CPUS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *CPUS.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get() as u64))
}

/// Reads now what is read once and later lies outside the sandbox.
pub fn warm_up() {
    online_cpus();
}

/// The frontend options that attach an export listening on `socket`: QEMU's
/// and cloud-hypervisor's, for the start line. Both need the guest's memory
/// shared (a memfd backend), or the backend cannot map the rings.
pub fn attach_hint(id: &str, socket: &std::path::Path, num_queues: u16) -> String {
    let path = socket.display();
    format!(
        "attach with QEMU: -object memory-backend-memfd,id=mem,size=RAM,share=on \
         -machine memory-backend=mem -chardev socket,id=vub-{id},path={path},reconnect=1 \
         -device vhost-user-blk-pci,chardev=vub-{id},num-queues={num_queues}; \
         with cloud-hypervisor: --memory size=RAM,shared=on \
         --disk vhost_user=true,socket={path},num_queues={num_queues}"
    )
}

/// `--export type=nbd` / block-export-add type=nbd (QEMU's
/// BlockExportOptionsNbd, with the BlockExportOptions common fields).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct NbdExportOptions {
    pub id: String,
    pub node_name: String,
    #[serde(default, deserialize_with = "opts::bool")]
    pub writable: bool,
    /// Accepted: NBD clients flush (or ask FUA) for what must be durable.
    #[serde(default, deserialize_with = "opts::bool")]
    pub writethrough: bool,
    /// Accepted: the clients' threads serve the export (docs/ARCHITECTURE.md).
    #[serde(default)]
    pub iothread: Option<String>,
    #[serde(default, deserialize_with = "opts::bool")]
    pub fixed_iothread: bool,
    /// The name clients ask for (default: the node name).
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
    /// Bitmaps offered as `qemu:dirty-bitmap:NAME`.
    #[serde(default)]
    pub bitmaps: Option<IothreadRef>,
    /// Offer `qemu:allocation-depth`.
    #[serde(default, deserialize_with = "opts::bool")]
    pub allocation_depth: bool,
}

impl NbdExportOptions {
    /// The bitmap names (a list, or keyval's `bitmaps.0=a,bitmaps.1=b`).
    pub fn bitmap_names(&self) -> Result<Vec<String>, String> {
        match &self.bitmaps {
            None => Ok(Vec::new()),
            Some(b) => b.names().map_err(|e| e.replace("'iothread.", "'bitmaps.")),
        }
    }
}

/// `--nbd-server` / nbd-server-start (QEMU's NbdServerOptions).
#[derive(Debug, Clone)]
pub struct NbdServerOptions {
    pub addr: crate::nbd::ListenAddr,
    pub tls_creds: Option<String>,
    pub tls_authz: Option<String>,
    /// 0: no limit (QEMU 7.2's default).
    pub max_connections: u32,
}

impl NbdServerOptions {
    /// From JSON: `addr` flat (`{"type": "unix", "path": ...}`, as
    /// --nbd-server's keyval gives it) or legacy (`{"type": "unix",
    /// "data": {"path": ...}}`, as nbd-server-start takes it).
    pub fn from_json(v: &serde_json::Value) -> Result<NbdServerOptions, String> {
        use serde_json::Value;
        let Value::Object(m) = v else {
            return Err("expected an object".into());
        };
        for k in m.keys() {
            if !matches!(
                k.as_str(),
                "addr" | "tls-creds" | "tls-authz" | "max-connections" | "handshake-max-seconds"
            ) {
                return Err(format!("Parameter '{k}' is unexpected"));
            }
        }
        let addr = m.get("addr").ok_or("Parameter 'addr' is missing")?;
        let string = |k: &str| -> Result<Option<String>, String> {
            match m.get(k) {
                None => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(_) => Err(format!("Parameter '{k}' expects a string")),
            }
        };
        let max_connections = match m.get("max-connections") {
            None => 0,
            Some(Value::Number(n)) => n
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or("Parameter 'max-connections' expects uint32")?,
            Some(Value::String(s)) => s
                .parse()
                .map_err(|_| "Parameter 'max-connections' expects uint32")?,
            Some(_) => return Err("Parameter 'max-connections' expects uint32".into()),
        };
        Ok(NbdServerOptions {
            addr: listen_addr(addr)?,
            tls_creds: string("tls-creds")?,
            tls_authz: string("tls-authz")?,
            max_connections,
        })
    }
}

/// QAPI's SocketAddress (flat) or SocketAddressLegacy (`data`).
fn listen_addr(v: &serde_json::Value) -> Result<crate::nbd::ListenAddr, String> {
    use crate::nbd::ListenAddr;
    use serde_json::Value;
    let Value::Object(m) = v else {
        return Err("Parameter 'addr' expects an object".into());
    };
    let ty = match m.get("type") {
        Some(Value::String(s)) => s.as_str(),
        _ => return Err("Parameter 'addr.type' is missing".into()),
    };
    let body = match m.get("data") {
        Some(Value::Object(d)) => d,
        _ => m,
    };
    let field = |k: &str| -> Result<String, String> {
        match body.get(k) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(Value::Number(n)) => Ok(n.to_string()),
            _ => Err(format!("Parameter 'addr.{k}' is missing")),
        }
    };
    match ty {
        "unix" => Ok(ListenAddr::Unix(field("path")?.into())),
        "inet" => Ok(ListenAddr::Inet {
            host: field("host")?,
            port: field("port")?,
        }),
        "fd" => {
            let s = field("str")?;
            s.parse()
                .map(ListenAddr::Fd)
                .map_err(|_| format!("'addr.str': '{s}' is not a descriptor number"))
        }
        other => Err(format!(
            "Parameter 'addr.type': '{other}' is not supported (unix, inet, fd)"
        )),
    }
}
