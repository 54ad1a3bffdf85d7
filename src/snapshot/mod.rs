//! External snapshots: an overlay goes on top of a node while the guest
//! keeps writing.
//!
//! ```text
//!   before:  export --root--> base (qcow2, writable)
//!   after:   export --root--> overlay (qcow2) --backing--> base (read-only)
//! ```
//!
//! Every edge that pointed at the node (export roots, filters such as
//! throttle) is moved to the overlay inside one drained section, so no
//! request sees half of it; then the overlay takes the node as its backing
//! and the node becomes read-only. Any failure moves the edges back.

//!
//! Internal snapshots are in [`internal`], change-backing-file in
//! [`backing`]; the `transaction` engine that runs snapshots atomically
//! is `crate::transaction`.

pub mod backing;
pub mod internal;
pub mod qmp;

pub use backing::change_backing_file;
pub use internal::{internal_create, internal_delete, internal_goto, snapshot_info, InternalArgs};

use std::os::unix::fs::MetadataExt;
use std::sync::Arc;

use crate::block::users::Users;
use crate::block::{Child, ChildRole, Node, Perm};
use crate::drivers::file::{self, Created};
use crate::drivers::{self, qcow2, BlockdevOptions};
use crate::qapi::QmpError;
use crate::state::State;

fn backing_format(node: &Node) -> Result<&'static str, QmpError> {
    node.image_format().map(|f| f.name()).ok_or_else(|| {
        QmpError::generic(format!(
            "node '{}' ({}) cannot be the backing file of an image",
            node.name(),
            node.driver_name()
        ))
    })
}

/// An external snapshot that passed its checks, to be performed inside a
/// drained section.
pub struct PreparedExternal {
    node: Arc<Node>,
    overlay: Arc<Node>,
    overlay_name: String,
    /// The node's users: their edges move to the overlay.
    users: Users<Arc<crate::vhost_user::ExportState>>,
}

/// Checks that `overlay` (a qcow2 node without a backing file that no one
/// uses) can go on top of `node`.
pub fn prepare_external(
    state: &State,
    node_name: &str,
    overlay_name: &str,
) -> Result<PreparedExternal, QmpError> {
    let graph = state.graph();
    let node = graph
        .get(node_name)
        .map_err(|e| QmpError::generic(e.to_string()))?;
    // A job's writes and copies follow the node it started on.
    crate::jobs::check_not_busy(&node)?;
    let overlay = graph
        .get(overlay_name)
        .map_err(|e| QmpError::generic(e.to_string()))?;
    if overlay.backing_file().is_none() {
        return Err(QmpError::generic(format!(
            "the overlay '{overlay_name}' ({}) does not support backing files; use qcow2",
            overlay.driver_name()
        )));
    }
    if overlay.backing().is_some() {
        return Err(QmpError::generic(format!(
            "the overlay '{overlay_name}' already has a backing image"
        )));
    }
    if !overlay.parents().is_empty() {
        return Err(QmpError::generic(format!(
            "the overlay '{overlay_name}' is already in use by {}",
            overlay.parents().join(", ")
        )));
    }
    if overlay.is_read_only() {
        return Err(QmpError::generic(format!(
            "the overlay '{overlay_name}' is read-only"
        )));
    }
    if Arc::ptr_eq(&node, &overlay) || overlay.reaches(&node) || node.reaches(&overlay) {
        return Err(QmpError::generic(format!(
            "'{overlay_name}' cannot be an overlay of '{node_name}': one contains the other"
        )));
    }
    backing_format(&node)?;
    drop(graph);
    let users = crate::jobs::users(state, &node, &[]);
    Ok(PreparedExternal {
        node,
        overlay,
        overlay_name: overlay_name.to_string(),
        users,
    })
}

impl PreparedExternal {
    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }

    /// Moves every edge to the overlay, gives it the node as backing, and
    /// makes the node read-only. The caller holds the node drained.
    pub fn perform(&self) -> Result<(), QmpError> {
        let node = &self.node;
        self.users
            .replace(node, &self.overlay)
            .map_err(|e| QmpError::generic(e.to_string()))?;
        let undo = || {
            if let Err(e) = self.users.replace(&self.overlay, node) {
                log::error!("snapshot: undoing an edge move: {e}");
            }
        };
        let backing = match Child::attach(
            &self.overlay_name,
            ChildRole::Backing,
            node.clone(),
            Perm::CONSISTENT_READ,
            Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED,
        ) {
            Ok(c) => c,
            Err(e) => {
                undo();
                return Err(QmpError::generic(e.to_string()));
            }
        };
        let Some(q) = self.overlay.backing_file() else {
            unreachable!("checked by prepare_external");
        };
        if let Err(e) = q.set_backing(backing) {
            undo();
            return Err(QmpError::generic(e));
        }
        // The old image is a backing image now.
        node.make_read_only();
        Ok(())
    }

    /// Undoes a performed snapshot (a later action of a transaction
    /// failed): the edges go back to the node, which is writable again.
    /// The overlay keeps its backing edge until it is deleted.
    pub fn undo(&self) {
        let node = &self.node;
        node.make_writable();
        if let Err(e) = self.users.replace(&self.overlay, node) {
            log::error!("snapshot: undoing an edge move: {e}");
        }
    }

    pub(crate) fn announce(&self, state: &State) {
        log::info!(
            "snapshot: '{}' is now on top of '{}'",
            self.overlay_name,
            self.node.name()
        );
        for e in state.export_states() {
            if e.blk.node().reaches(&self.overlay) {
                e.notify_config_change();
            }
        }
    }
}

/// blockdev-snapshot: `overlay` goes on top of `node`.
pub fn external(state: &State, node_name: &str, overlay_name: &str) -> Result<(), QmpError> {
    let p = prepare_external(state, node_name, overlay_name)?;
    state.drained(&p.node, || p.perform())?;
    p.announce(state);
    Ok(())
}

/// blockdev-snapshot-sync's `mode`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SnapshotMode {
    /// Create the overlay, with the node's file as its backing file.
    #[default]
    AbsolutePaths,
    /// The overlay file exists already.
    Existing,
}

/// blockdev-snapshot-sync's arguments.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct SnapshotSyncArgs {
    pub device: Option<String>,
    pub node_name: Option<String>,
    pub snapshot_file: String,
    pub snapshot_node_name: Option<String>,
    pub format: Option<String>,
    #[serde(default)]
    pub mode: SnapshotMode,
}

/// blockdev-snapshot's arguments.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotArgs {
    pub node: String,
    pub overlay: String,
}

/// The node a `device` / `node-name` pair names.
fn device_or_node(
    state: &State,
    device: Option<&str>,
    node: Option<&str>,
) -> Result<String, QmpError> {
    match (node, device) {
        (Some(n), None) => Ok(n.to_string()),
        (None, Some(d)) => match state.export(d) {
            Some(e) => Ok(e.blk.node().name().to_string()),
            None => Err(QmpError::generic(format!("Device '{d}' not found"))),
        },
        _ => Err(QmpError::generic(
            "exactly one of 'device' and 'node-name' is needed",
        )),
    }
}

/// An overlay node (and file) made for blockdev-snapshot-sync: removed
/// again if the snapshot does not happen.
pub(crate) struct CreatedOverlay {
    node: String,
    /// The file, when this call created it (it did not exist before).
    file: Option<Created>,
}

impl CreatedOverlay {
    /// The snapshot happened: the overlay belongs to the parents it took
    /// over, as in QEMU, where blockdev-snapshot-sync gives the new node
    /// no monitor reference. It leaves the graph with its last parent (a
    /// commit, stream or mirror that takes it out of the chain) instead of
    /// staying open until a blockdev-del nobody sends. An overlay nobody
    /// uses (a snapshot of a node without parents) stays the monitor's.
    pub(crate) fn hand_to_parents(&self, state: &State) {
        let mut graph = state.graph();
        if graph.get(&self.node).is_ok_and(|n| !n.parents().is_empty()) {
            graph.mark_implicit(&self.node);
        }
    }

    pub(crate) fn remove(&self, state: &State) {
        if let Err(e) = state.del_blockdev(&self.node) {
            log::warn!("snapshot: removing overlay node {}: {e}", self.node);
        }
        if let Some(f) = &self.file {
            f.remove(&|dev, ino| file::node_using(&state.graph(), dev, ino, None));
        }
    }
}

/// QEMU's bdrv_img_create refuses an image named as its backing file; it
/// compares the names, this compares the files too (another name, a
/// symlink).
fn check_not_backing(file: &str, backing: &str) -> Result<(), QmpError> {
    let same = file == backing
        || matches!(
            (std::fs::metadata(file), std::fs::metadata(backing)),
            (Ok(a), Ok(b)) if (a.dev(), a.ino()) == (b.dev(), b.ino())
        );
    if same {
        return Err(QmpError::generic(
            "Error: Trying to create an image with the same filename as the backing file",
        ));
    }
    Ok(())
}

/// Creates (mode absolute-paths) or finds (existing) the overlay file of
/// blockdev-snapshot-sync, opens it, and checks the snapshot.
pub(crate) fn prepare_external_sync(
    state: &State,
    a: &SnapshotSyncArgs,
) -> Result<(PreparedExternal, CreatedOverlay), QmpError> {
    let node_name = device_or_node(state, a.device.as_deref(), a.node_name.as_deref())?;
    let file = a.snapshot_file.as_str();
    if let Some(f) = &a.format {
        if f != "qcow2" {
            return Err(QmpError::generic(format!(
                "format '{f}' cannot have a backing file here; use qcow2"
            )));
        }
    }
    let node = state
        .graph()
        .get(&node_name)
        .map_err(|e| QmpError::generic(e.to_string()))?;
    let overlay_name = match &a.snapshot_node_name {
        Some(n) => n.clone(),
        None => format!(
            "{node_name}-snapshot-{}",
            std::process::id() ^ rand_suffix()
        ),
    };
    if state.graph().get(&overlay_name).is_ok() {
        return Err(QmpError::generic(format!(
            "node name '{overlay_name}' is already in use"
        )));
    }
    let created = match a.mode {
        SnapshotMode::Existing => {
            if !std::path::Path::new(file).exists() {
                return Err(QmpError::generic(format!(
                    "snapshot file '{file}' does not exist (mode=existing)"
                )));
            }
            None
        }
        SnapshotMode::AbsolutePaths => {
            let backing = drivers::file_name_of(&node)
                .ok_or_else(|| {
                    format!("node '{node_name}' has no file name to use as a backing file")
                })
                .map_err(QmpError::generic)?;
            let backing = std::fs::canonicalize(&backing)
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or(backing);
            check_not_backing(file, &backing)?;
            // A job's node is refused before anything is created.
            crate::jobs::check_not_busy(&node)?;
            let opts = qcow2::CreateOptions {
                size: node.size(),
                backing_file: Some(backing),
                backing_fmt: Some(backing_format(&node)?.to_string()),
                ..Default::default()
            };
            let in_use = |dev, ino| file::node_using(&state.graph(), dev, ino, None);
            let made = qcow2::create_in(file, &opts, &in_use).map_err(QmpError::generic)?;
            made.created().then_some(made)
        }
    };
    let opts: BlockdevOptions = serde_json::from_value(serde_json::json!({
        "driver": "qcow2",
        "node-name": overlay_name,
        "file": {"driver": "file", "filename": file},
        "backing": null,
    }))
    .map_err(|e| QmpError::generic(e.to_string()))?;
    if let Err(e) = state.add_blockdev(&opts) {
        if let Some(c) = &created {
            c.remove(&|dev, ino| file::node_using(&state.graph(), dev, ino, None));
        }
        return Err(QmpError::generic(e.to_string()));
    }
    let made = CreatedOverlay {
        node: overlay_name.clone(),
        file: created,
    };
    match prepare_external(state, &node_name, &overlay_name) {
        Ok(p) => Ok((p, made)),
        Err(e) => {
            made.remove(state);
            Err(e)
        }
    }
}

fn rand_suffix() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
}
