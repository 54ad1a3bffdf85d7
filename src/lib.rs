//! vhost-user-blkd: a vhost-user-blk storage daemon with a QEMU-style block
//! graph.
//!
//! The modules follow the data path, and depend one way:
//!
//! ```text
//!   shell (the process: start-up, signals, shutdown) -> qmp -> state
//!   vhost_user -> virtio_blk -> block -> drivers -> io
//!   config (shared option types)
//! ```
//!
//! See docs/ARCHITECTURE.md for the design.

#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod bitmaps;
pub mod block;
pub mod config;
pub mod create;
pub mod drivers;
pub mod events;
pub mod io;
pub mod jobs;
pub mod nbd;
pub mod opts;
pub mod peercred;
pub mod qapi;
pub mod qmp;
pub mod sandbox;
pub mod secret;
pub mod shell;
pub mod signals;
pub mod snapshot;
pub mod sockpath;
pub mod state;
pub mod systemd;
pub mod throttle;
pub mod transaction;
pub mod vhost_user;
pub mod virtio_blk;

/// Items the fuzz targets (fuzz/, docs/FUZZING.md) drive that are not part
/// of the library's interface otherwise. Not for other use.
#[doc(hidden)]
pub mod fuzz_api {
    pub use crate::qmp::reader::{JsonReader, ReadError};
}
