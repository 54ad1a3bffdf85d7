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
