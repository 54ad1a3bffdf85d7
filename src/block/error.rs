//! Errors of the block layer.

use std::io;

use super::Perm;

/// A failed I/O request, with the coordinates of what failed.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("request at offset {offset} length {len} is outside node {node} ({size} bytes)")]
    OutOfRange {
        node: String,
        offset: u64,
        len: u64,
        size: u64,
    },
    #[error("node {node} is read-only")]
    ReadOnly { node: String },
    /// The node is inactive (blockdev-set-active, `active=off`): another
    /// process may own the image; nothing is written.
    #[error("node '{node}' is inactive: the image is not written while another process may own it (blockdev-set-active)")]
    Inactive { node: String },
    #[error("node {node}: image is corrupt: {reason}")]
    Corrupt { node: String, reason: String },
    #[error("node {node}: {reason}")]
    Unsupported { node: String, reason: String },
    #[error("{op} at offset {offset} length {len} on node {node} failed")]
    Io {
        node: String,
        op: &'static str,
        offset: u64,
        len: u64,
        #[source]
        source: io::Error,
    },
}

impl BlockError {
    /// The errno a guest-visible error policy would look at (ENOSPC, EIO, ...).
    pub fn errno(&self) -> i32 {
        match self {
            BlockError::OutOfRange { .. } => libc::EINVAL,
            BlockError::ReadOnly { .. } => libc::EROFS,
            BlockError::Inactive { .. } => libc::EPERM,
            BlockError::Corrupt { .. } => libc::EIO,
            BlockError::Unsupported { .. } => libc::ENOTSUP,
            BlockError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
        }
    }
}

/// A graph change that was refused.
#[derive(Debug, thiserror::Error)]
pub enum GraphError {
    #[error("node name '{0}' is already in use")]
    DuplicateNode(String),
    #[error("cannot find node '{0}'")]
    NodeNotFound(String),
    #[error("node '{node}' is read-only, but {parent} needs write permission on it")]
    ReadOnly { node: String, parent: String },
    #[error(
        "conflicting permissions on node '{node}': {new_parent} needs {wanted} which {old_parent} does not share (it shares {shared}); \
         or {old_parent} holds {held} which {new_parent} does not share"
    )]
    PermissionConflict {
        node: String,
        new_parent: String,
        old_parent: String,
        wanted: Perm,
        shared: Perm,
        held: Perm,
    },
    #[error("node '{node}' is in use by {users}")]
    InUse { node: String, users: String },
    #[error("cannot open node '{node}': {reason}")]
    Open { node: String, reason: String },
    /// QEMU's words ("Could not open 'x.img': Permission denied"), and
    /// the node's name: a blockdev-add may open several files.
    #[error("Could not open '{filename}' for node '{node}': {}", os_text(error))]
    OpenFile {
        node: String,
        filename: String,
        error: io::Error,
    },
}

/// An I/O error in the system's words, without Rust's " (os error N)".
pub fn os_text(e: &io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => format!(
            "{}{}",
            &s[..i],
            &s[i..].split_once(')').map_or("", |(_, r)| r)
        ),
        None => s,
    }
}
