//! The vhost-user adapter: serves an export's virtio-blk device to one
//! frontend at a time over a UNIX socket.
//!
//! ```text
//!   server.rs   accept loop: one VhostUserDaemon per connection
//!   backend.rs  VhostUserBackend: features, config space, drain on
//!               GET_VRING_BASE / RESET_DEVICE, memory updates
//!   connection.rs  one connection's state: memory, rings, wake-ups
//!   export.rs   the export across connections: drained sections, the
//!               stop policy's parking, counters, device parameters
//!   worker.rs   the iothread: pop chains, run request tasks on its
//!               io_uring, fill the used ring, notify once per batch
//!   threads.rs  the iothread objects an export's threads run as, their
//!               ids, a connection's side of moves (below export.rs and
//!               connection.rs)
//!   iothread.rs x-blockdev-set-iothread: a connection's threads replaced
//!               by new ones in a drain (on top of the connection)
//!   inflight.rs the inflight buffer (INFLIGHT_SHMFD): which requests a
//!               restarted daemon resubmits, in which order
//!   dirty_log.rs the dirty log of live migration (LOG_ALL, LOG_SHMFD)
//!   sigbus.rs   guest memory checked against its file at map time, and
//!               SIGBUS in guest memory survived (that connection ends)
//! ```

mod backend;
mod connection;
pub mod dirty_log;
mod export;
pub mod inflight;
mod iothread;
mod notify;
mod server;
mod shm;
pub mod sigbus;
mod threads;
mod worker;

pub use connection::VhostUserBlk;
pub use export::{Dropped, ExportState};
pub use server::{check_listening_unix_socket, Listener, Server, ServerControl, ServerError};
