//! The NBD protocol, shared by the `nbd` client driver
//! (src/drivers/nbd) and the server: the wire format (proto.rs) and the
//! server side (server/): qemu-storage-daemon's `--nbd-server` /
//! nbd-server-start and `--export type=nbd`, for backup clients that pull
//! a disk (or a point-in-time view of it) and the extents a dirty bitmap
//! marks.

pub mod proto;
pub mod server;

pub use server::{Export, ExportSpec, ListenAddr, NbdServer, ServerError};
