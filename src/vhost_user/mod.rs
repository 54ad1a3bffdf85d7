//! The vhost-user adapter: serves an export's virtio-blk device to one
//! frontend at a time over a UNIX socket.
//!
//! ```text
//!   server.rs   accept loop: one VhostUserDaemon per connection
//!   backend.rs  VhostUserBackend: features, config space, drain on
//!               GET_VRING_BASE / RESET_DEVICE, memory updates
//!   worker.rs   the iothread: pop chains, run request tasks on its
//!               io_uring, fill the used ring, notify once per batch
//!   sigbus.rs   guest memory checked against its file at map time, and
//!               SIGBUS in guest memory survived (that connection ends)
//! ```

mod backend;
mod notify;
mod server;
pub mod sigbus;
mod worker;

pub use backend::{ExportState, VhostUserBlk};
pub use server::{Listener, Server, ServerControl, ServerError};
