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
/// Default poll-max-ns: off until the performance work settles it (QEMU's
/// iothreads default to 32768; see docs/PERFORMANCE.md).
pub const DEFAULT_POLL_MAX_NS: u64 = 0;
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
    /// sleeps, in ns (like QEMU's iothread poll-max-ns); 0, the default,
    /// turns polling off. The window adapts: it grows after polling found
    /// work and shrinks when it found none. An idle export never polls.
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
    /// qemu-storage-daemon's `fixed-iothread`; accepted (an export's
    /// threads are its own and never change).
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
