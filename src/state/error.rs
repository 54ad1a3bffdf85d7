//! What State's operations refuse, and why. The messages are the ones QMP
//! replies with (QEMU's where QEMU has one); the monitor picks the class.

use crate::block::GraphError;
use crate::qapi::QmpError;
use crate::vhost_user::ServerError;

use super::participant::Busy;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(transparent)]
    Graph(#[from] GraphError),
    #[error("export '{export}': {reason}")]
    Export {
        export: String,
        reason: ExportRefusal,
    },
    #[error(transparent)]
    Server(#[from] ServerError),
    #[error(transparent)]
    Nbd(#[from] crate::nbd::ServerError),
    #[error("cannot start the export's thread")]
    Thread(#[source] std::io::Error),
    /// block-export-del of an unknown id (QEMU's words).
    #[error("Export '{0}' is not found")]
    ExportNotFound(String),
    #[error("Export '{0}' is already shutting down")]
    ExportShuttingDown(String),
    #[error("export '{0}' has a connected frontend; use mode=hard to disconnect it")]
    ExportConnected(String),
    #[error("size {0} is not a multiple of 512")]
    ResizeUnaligned(u64),
    /// A registered participant (a block job) works on the node.
    #[error(transparent)]
    Busy(#[from] Busy),
    /// The node's driver refused the new size.
    #[error("{0}")]
    Truncate(String),
    /// object-add: the throttle group was refused.
    #[error("{0}")]
    Object(String),
    #[error(transparent)]
    Reopen(#[from] ReopenError),
    /// blockdev-set-active refused, or an activation failed.
    #[error(transparent)]
    Active(#[from] super::active::ActiveError),
}

/// A State refusal as a command's failure: a GenericError with the
/// refusal's text (its sources are not appended: block-export-add, which
/// wants them, uses [`QmpError::chain`]).
impl From<StateError> for QmpError {
    fn from(e: StateError) -> Self {
        QmpError::generic(e.to_string())
    }
}

/// Why an export cannot be bound to its node.
#[derive(Debug, thiserror::Error)]
pub enum ExportRefusal {
    #[error("an export with this id already exists")]
    Exists,
    /// QEMU's wording (block/export/export.c).
    #[error("iothread \"{0}\" not found")]
    NoIothread(String),
    #[error(
        "logical-block-size {lbs} is smaller than the {align}-byte alignment node '{node}' needs \
         (cache.direct=on on a device with larger sectors); set logical-block-size={align}"
    )]
    Alignment { lbs: u32, align: u32, node: String },
    #[error("node '{node}' ({size} bytes) is smaller than one logical block ({lbs})")]
    TooSmall { node: String, size: u64, lbs: u32 },
}

/// Why a blockdev-reopen is refused (nothing changed).
#[derive(Debug, thiserror::Error)]
pub enum ReopenError {
    #[error("node '{node}': the driver cannot be changed ({from} -> {to})")]
    DriverChange {
        node: String,
        from: &'static str,
        to: &'static str,
    },
    #[error("node '{0}' is listed twice")]
    ListedTwice(String),
    /// The driver refused the new options (or cannot reopen).
    #[error("{0}")]
    Driver(String),
    #[error("node '{node}' cannot be read-only: {who} writes to it")]
    Writer { node: String, who: String },
    #[error(
        "node '{node}' would need {align}-byte alignment, but export '{export}' has \
         logical-block-size {lbs}"
    )]
    Alignment {
        node: String,
        align: u32,
        export: String,
        lbs: u32,
    },
}

/// What shutdown could not bring to the disk: dropped writes, failed
/// flushes (exit status 1).
#[derive(Debug, thiserror::Error)]
#[error("{}", .0.join("; "))]
pub struct DataLost(pub Vec<String>);
