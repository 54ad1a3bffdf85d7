//! Internal snapshots: qcow2's own snapshot table (create, delete,
//! revert), and their part in a `transaction`.

use std::sync::Arc;

use crate::block::{Node, Perm};
use crate::drivers::qcow2;
use crate::qapi::QmpError;
use crate::state::State;

/// blockdev-snapshot-internal-sync's arguments.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InternalArgs {
    pub device: String,
    pub name: String,
}

/// An internal snapshot of a `transaction` that passed its checks.
pub struct PreparedInternal {
    node: Arc<Node>,
    name: String,
    /// The id of the snapshot once made (an undo deletes it).
    made: std::sync::Mutex<Option<String>>,
}

impl PreparedInternal {
    /// Checks that `a.device`'s qcow2 image can take a snapshot `a.name`.
    pub fn prepare(state: &State, a: &InternalArgs) -> Result<PreparedInternal, QmpError> {
        let node = internal_target(state, &a.device)?;
        let Some(q) = node.internal_snapshots() else {
            unreachable!("internal_target returns qcow2 nodes");
        };
        if node.is_read_only() {
            return Err(QmpError::generic(format!(
                "node '{}' is read-only",
                node.name()
            )));
        }
        if a.name.is_empty() {
            return Err(QmpError::generic("the snapshot name must not be empty"));
        }
        if q.snapshots().iter().any(|s| s.name == a.name) {
            return Err(QmpError::generic(format!(
                "a snapshot named '{}' already exists on node '{}'",
                a.name,
                node.name()
            )));
        }
        Ok(PreparedInternal {
            node,
            name: a.name.clone(),
            made: std::sync::Mutex::new(None),
        })
    }

    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }

    /// Makes the snapshot. The caller holds the node drained.
    pub fn perform(&self) -> Result<(), QmpError> {
        let Some(q) = self.node.internal_snapshots() else {
            unreachable!("checked in prepare");
        };
        let s = futures::executor::block_on(q.snapshot_create(&self.name, now()))
            .map_err(|e| QmpError::generic(e.to_string()))?;
        *self.made.lock().unwrap_or_else(|e| e.into_inner()) = Some(s.id);
        Ok(())
    }

    /// Deletes the snapshot if it was made.
    pub fn undo(&self) {
        let Some(qd) = self.node.internal_snapshots() else {
            return;
        };
        let made = self.made.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(id) = made {
            let r = qcow2::SnapshotRef {
                id: Some(&id),
                name: None,
            };
            if let Err(e) = futures::executor::block_on(qd.snapshot_delete(&r)) {
                log::error!("transaction: undoing snapshot {id}: {e}");
            }
        }
    }

    pub fn announce(&self) {
        log::info!(
            "node {}: internal snapshot '{}' created",
            self.node.name(),
            self.name
        );
    }
}

/// The qcow2 node an internal snapshot command means by `device`: an
/// export's id or a node name, followed down through filters.
pub(crate) fn internal_target(state: &State, device: &str) -> Result<Arc<Node>, QmpError> {
    let mut node = match state.export(device) {
        Some(e) => e.blk.node().clone(),
        None => state.graph().get(device).map_err(|_| {
            QmpError::generic(format!(
                "Device '{device}' not found (neither an export id nor a node name)"
            ))
        })?,
    };
    loop {
        if node.internal_snapshots().is_some() {
            // A job's copies follow the image as it is.
            crate::jobs::check_not_busy(&node)?;
            // Every internal snapshot operation writes the image.
            node.ensure_active().map_err(QmpError::generic)?;
            return Ok(node);
        }
        let next = match node.is_filter().then(|| node.file_child()).flatten() {
            Some(c) => c.node().clone(),
            None => {
                return Err(QmpError::generic(format!(
                    "node '{}' ({}) does not support internal snapshots",
                    node.name(),
                    node.driver_name()
                )))
            }
        };
        node = next;
    }
}

pub(crate) fn now() -> (u32, u32) {
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
pub fn internal_create(
    state: &State,
    device: &str,
    name: &str,
) -> Result<qcow2::Snapshot, QmpError> {
    let node = internal_target(state, device)?;
    let Some(q) = node.internal_snapshots() else {
        unreachable!("internal_target returns qcow2 nodes");
    };
    let s = state
        .drained(&node, || {
            futures::executor::block_on(q.snapshot_create(name, now()))
        })
        .map_err(|e| QmpError::generic(e.to_string()))?;
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
) -> Result<qcow2::Snapshot, QmpError> {
    if id.is_none() && name.is_none() {
        return Err(QmpError::generic("one of 'id' and 'name' is needed"));
    }
    let node = internal_target(state, device)?;
    let Some(q) = node.internal_snapshots() else {
        unreachable!("internal_target returns qcow2 nodes");
    };
    let r = qcow2::SnapshotRef { id, name };
    let s = state
        .drained(&node, || futures::executor::block_on(q.snapshot_delete(&r)))
        .map_err(|e| QmpError::generic(e.to_string()))?;
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
) -> Result<qcow2::Snapshot, QmpError> {
    if id.is_none() && name.is_none() {
        return Err(QmpError::generic("one of 'id' and 'name' is needed"));
    }
    let node = state
        .graph()
        .get(node_name)
        .map_err(|e| QmpError::generic(e.to_string()))?;
    let Some(q) = node.internal_snapshots() else {
        return Err(QmpError::generic(format!(
            "node '{node_name}' ({}) has no internal snapshots",
            node.driver_name()
        )));
    };
    let writers: Vec<String> = node
        .parent_perms()
        .into_iter()
        .filter(|(_, _, p)| p.contains(Perm::WRITE))
        .map(|(n, _, _)| n)
        .collect();
    if !writers.is_empty() {
        return Err(QmpError::generic(format!(
            "node '{node_name}' is in use for writing by {}: detach it (block-export-del) before reverting",
            writers.join(", ")
        )));
    }
    let r = qcow2::SnapshotRef { id, name };
    let s = state
        .drained(&node, || {
            futures::executor::block_on(q.snapshot_goto(&node, &r))
        })
        .map_err(|e| QmpError::generic(e.to_string()))?;
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
