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

use std::sync::Arc;

use crate::block::{Child, ChildRole, Node, Perm};
use crate::daemon::State;
use crate::drivers::{self, qcow2, BlockdevOptions, Driver};

fn backing_format(node: &Node) -> Result<&'static str, String> {
    match node.driver() {
        Driver::Qcow2(_) => Ok("qcow2"),
        Driver::Raw(_) | Driver::File(_) => Ok("raw"),
        _ => Err(format!(
            "node '{}' ({}) cannot be the backing file of an image",
            node.name(),
            node.driver_name()
        )),
    }
}

/// blockdev-snapshot: `overlay` (a qcow2 node without a backing file that
/// no one uses) goes on top of `node`.
pub fn external(state: &State, node_name: &str, overlay_name: &str) -> Result<(), String> {
    let (node, overlay, parents) = {
        let graph = state.graph();
        let node = graph.get(node_name).map_err(|e| e.to_string())?;
        let overlay = graph.get(overlay_name).map_err(|e| e.to_string())?;
        let Driver::Qcow2(q) = overlay.driver() else {
            return Err(format!(
                "the overlay '{overlay_name}' ({}) does not support backing files; use qcow2",
                overlay.driver_name()
            ));
        };
        if q.backing().is_some() {
            return Err(format!(
                "the overlay '{overlay_name}' already has a backing image"
            ));
        }
        if !overlay.parents().is_empty() {
            return Err(format!(
                "the overlay '{overlay_name}' is already in use by {}",
                overlay.parents().join(", ")
            ));
        }
        if overlay.is_read_only() {
            return Err(format!("the overlay '{overlay_name}' is read-only"));
        }
        if Arc::ptr_eq(&node, &overlay) || overlay.reaches(&node) || node.reaches(&overlay) {
            return Err(format!(
                "'{overlay_name}' cannot be an overlay of '{node_name}': one contains the other"
            ));
        }
        backing_format(&node)?;
        let parents: Vec<Arc<Node>> = graph
            .nodes()
            .filter(|p| {
                p.children()
                    .iter()
                    .any(|c| Arc::ptr_eq(c.node(), &node) && c.role() != ChildRole::Backing)
            })
            .cloned()
            .collect();
        (node, overlay, parents)
    };
    let exports: Vec<_> = state
        .export_states()
        .into_iter()
        .filter(|e| Arc::ptr_eq(e.blk.node(), &node))
        .collect();

    let r = state.drained(&node, || -> Result<(), String> {
        let mut moved: Vec<&Child> = Vec::new();
        let undo = |moved: &[&Child]| {
            for c in moved {
                if let Err(e) = c.replace_node(node.clone()) {
                    log::error!("snapshot: undoing an edge move: {e}");
                }
            }
        };
        let edges = exports.iter().map(|e| e.blk.root()).chain(
            parents
                .iter()
                .flat_map(|p| p.children())
                .filter(|c| Arc::ptr_eq(c.node(), &node) && c.role() != ChildRole::Backing),
        );
        for c in edges {
            if let Err(e) = c.replace_node(overlay.clone()) {
                undo(&moved);
                return Err(e.to_string());
            }
            moved.push(c);
        }
        let backing = match Child::attach(
            overlay_name,
            ChildRole::Backing,
            node.clone(),
            Perm::CONSISTENT_READ,
            Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED,
        ) {
            Ok(c) => c,
            Err(e) => {
                undo(&moved);
                return Err(e.to_string());
            }
        };
        let Driver::Qcow2(q) = overlay.driver() else {
            unreachable!("checked above");
        };
        if let Err(e) = q.set_backing(backing) {
            undo(&moved);
            return Err(e);
        }
        // The old image is a backing image now.
        node.set_read_only(true);
        match node.driver() {
            Driver::Qcow2(b) => b.make_read_only(),
            Driver::Raw(r) => r.file().set_perm(Perm::CONSISTENT_READ, Perm::ALL),
            _ => {}
        }
        Ok(())
    });
    r?;
    log::info!("snapshot: '{overlay_name}' is now on top of '{node_name}'");
    for e in state.export_states() {
        if e.blk.node().reaches(&overlay) {
            e.notify_config_change();
        }
    }
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

/// blockdev-snapshot-sync: creates (or opens) a qcow2 overlay file and puts
/// it on top of `node_name`. Returns the overlay's node name.
pub fn external_sync(
    state: &State,
    node_name: &str,
    file: &str,
    overlay_name: Option<&str>,
    format: Option<&str>,
    mode: SnapshotMode,
) -> Result<String, String> {
    if let Some(f) = format {
        if f != "qcow2" {
            return Err(format!(
                "format '{f}' cannot have a backing file here; use qcow2"
            ));
        }
    }
    let node = state.graph().get(node_name).map_err(|e| e.to_string())?;
    let overlay_name = match overlay_name {
        Some(n) => n.to_string(),
        None => format!(
            "{node_name}-snapshot-{}",
            std::process::id() ^ rand_suffix()
        ),
    };
    if state.graph().get(&overlay_name).is_ok() {
        return Err(format!("node name '{overlay_name}' is already in use"));
    }
    let created = match mode {
        SnapshotMode::Existing => {
            if !std::path::Path::new(file).exists() {
                return Err(format!(
                    "snapshot file '{file}' does not exist (mode=existing)"
                ));
            }
            false
        }
        SnapshotMode::AbsolutePaths => {
            let backing = drivers::file_name_of(&node).ok_or_else(|| {
                format!("node '{node_name}' has no file name to use as a backing file")
            })?;
            let backing = std::fs::canonicalize(&backing)
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or(backing);
            let opts = qcow2::CreateOptions {
                size: node.size(),
                backing_file: Some(backing),
                backing_fmt: Some(backing_format(&node)?.to_string()),
                ..Default::default()
            };
            qcow2::create(file, &opts)?;
            true
        }
    };
    let opts: BlockdevOptions = serde_json::from_value(serde_json::json!({
        "driver": "qcow2",
        "node-name": overlay_name,
        "file": {"driver": "file", "filename": file},
        "backing": null,
    }))
    .map_err(|e| e.to_string())?;
    let cleanup = |state: &State| {
        let _ = state.del_blockdev(&overlay_name);
        if created {
            let _ = std::fs::remove_file(file);
        }
    };
    if let Err(e) = state.add_blockdev(&opts) {
        if created {
            let _ = std::fs::remove_file(file);
        }
        return Err(e.to_string());
    }
    if let Err(e) = external(state, node_name, &overlay_name) {
        cleanup(state);
        return Err(e);
    }
    Ok(overlay_name)
}

fn rand_suffix() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
}

/// The qcow2 node an internal snapshot command means by `device`: an
/// export's id or a node name, followed down through filters.
fn internal_target(state: &State, device: &str) -> Result<Arc<Node>, String> {
    let mut node = match state.export(device) {
        Some(e) => e.blk.node().clone(),
        None => state.graph().get(device).map_err(|_| {
            format!("Device '{device}' not found (neither an export id nor a node name)")
        })?,
    };
    loop {
        let next = match node.driver() {
            Driver::Qcow2(_) => return Ok(node),
            Driver::Throttle(t) => t.file().node().clone(),
            _ => {
                return Err(format!(
                    "node '{}' ({}) does not support internal snapshots",
                    node.name(),
                    node.driver_name()
                ))
            }
        };
        node = next;
    }
}

fn now() -> (u32, u32) {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (d.as_secs() as u32, d.subsec_nanos())
}

/// SnapshotInfo (qapi/block-core.json).
pub fn snapshot_info(s: &qcow2::Snapshot) -> serde_json::Value {
    serde_json::json!({
        "id": s.id, "name": s.name, "vm-state-size": s.vm_state_size,
        "date-sec": s.date_sec, "date-nsec": s.date_nsec,
        "vm-clock-sec": s.vm_clock_nsec / 1_000_000_000,
        "vm-clock-nsec": s.vm_clock_nsec % 1_000_000_000,
    })
}

/// blockdev-snapshot-internal-sync.
pub fn internal_create(state: &State, device: &str, name: &str) -> Result<qcow2::Snapshot, String> {
    let node = internal_target(state, device)?;
    let Driver::Qcow2(q) = node.driver() else {
        unreachable!("internal_target returns qcow2 nodes");
    };
    let s = state
        .drained(&node, || {
            futures::executor::block_on(q.snapshot_create(name, now()))
        })
        .map_err(|e| e.to_string())?;
    log::info!(
        "node {}: internal snapshot '{}' (id {}) created",
        node.name(),
        s.name,
        s.id
    );
    Ok(s)
}

/// blockdev-snapshot-delete-internal-sync.
pub fn internal_delete(
    state: &State,
    device: &str,
    id: Option<&str>,
    name: Option<&str>,
) -> Result<qcow2::Snapshot, String> {
    if id.is_none() && name.is_none() {
        return Err("one of 'id' and 'name' is needed".into());
    }
    let node = internal_target(state, device)?;
    let Driver::Qcow2(q) = node.driver() else {
        unreachable!("internal_target returns qcow2 nodes");
    };
    let r = qcow2::SnapshotRef { id, name };
    let s = state
        .drained(&node, || futures::executor::block_on(q.snapshot_delete(&r)))
        .map_err(|e| e.to_string())?;
    log::info!(
        "node {}: internal snapshot '{}' (id {}) deleted",
        node.name(),
        s.name,
        s.id
    );
    Ok(s)
}

/// Reverts a node to an internal snapshot: refused while anyone holds
/// write permission on it (an export writing it must be removed first).
pub fn internal_goto(
    state: &State,
    node_name: &str,
    id: Option<&str>,
    name: Option<&str>,
) -> Result<qcow2::Snapshot, String> {
    if id.is_none() && name.is_none() {
        return Err("one of 'id' and 'name' is needed".into());
    }
    let node = state.graph().get(node_name).map_err(|e| e.to_string())?;
    let Driver::Qcow2(q) = node.driver() else {
        return Err(format!(
            "node '{node_name}' ({}) has no internal snapshots",
            node.driver_name()
        ));
    };
    let writers: Vec<String> = node
        .parent_perms()
        .into_iter()
        .filter(|(_, _, p)| p.contains(Perm::WRITE))
        .map(|(n, _, _)| n)
        .collect();
    if !writers.is_empty() {
        return Err(format!(
            "node '{node_name}' is in use for writing by {}: detach it (block-export-del) before reverting",
            writers.join(", ")
        ));
    }
    let r = qcow2::SnapshotRef { id, name };
    let s = state
        .drained(&node, || {
            futures::executor::block_on(q.snapshot_goto(&node, &r))
        })
        .map_err(|e| e.to_string())?;
    log::info!(
        "node {node_name}: reverted to internal snapshot '{}' (id {})",
        s.name,
        s.id
    );
    for e in state.export_states() {
        if e.blk.node().reaches(&node) {
            e.notify_config_change();
        }
    }
    Ok(s)
}
