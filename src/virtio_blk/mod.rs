//! The virtio-blk device: its features, its configuration space, and the
//! parsing and execution of requests (virtio 1.2, section 5.2).
//!
//! ```text
//!   descriptor chain --parse--> Request --execute(BlockBackend)--> status
//!        (request.rs)                      (execute.rs)
//! ```
//!
//! Knows nothing of vhost-user: the adapter in `vhost_user` pops chains and
//! hands them here.

mod config;
mod execute;
pub mod guest;
mod request;

pub use config::{DeviceConfig, DeviceParams, CONFIG_SIZE, SECTOR, WRITEBACK_OFFSET};
pub use execute::{execute, IoDirection, Outcome};
pub use guest::{GuestMem, MemGuard, Segment};
pub use request::{
    parse, Limits, ParseError, Parsed, Range, Request, RequestKind, Status, HEADER_SIZE, RANGE_SIZE,
};

use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// The virtio feature bits this device offers.
pub fn device_features(read_only: bool) -> u64 {
    let bits = [
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_INDIRECT_DESC,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_BLK_F_SIZE_MAX,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_TOPOLOGY,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_CONFIG_WCE,
        VIRTIO_BLK_F_MQ,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
    ];
    let mut f = bits.iter().fold(0u64, |f, b| f | (1u64 << b));
    if read_only {
        f |= 1 << VIRTIO_BLK_F_RO;
    }
    f
}
