//! QMP commands on snapshots and backing files: blockdev-snapshot,
//! change-backing-file and the internal snapshot commands, as typed
//! handlers (`crate::qapi`). blockdev-snapshot-sync is a transaction of one
//! action and `transaction` is the engine's own: both are in
//! `crate::transaction`.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::Value;

use crate::qapi::{CommandDef, QmpError};
use crate::snapshot;
use crate::state::State;

pub static COMMANDS: &[CommandDef<Arc<State>>] = &[
    crate::command!("blockdev-snapshot", blockdev_snapshot),
    crate::command!("change-backing-file", change_backing_file),
    crate::command!("blockdev-snapshot-internal-sync", internal_sync),
    crate::command!("blockdev-snapshot-delete-internal-sync", delete_internal),
    crate::command!("x-blockdev-snapshot-goto-internal", goto_internal),
];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BlockdevSnapshot {
    node: String,
    overlay: String,
}

fn blockdev_snapshot(state: &Arc<State>, a: BlockdevSnapshot) -> Result<(), QmpError> {
    snapshot::external(state, &a.node, &a.overlay)
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct ChangeBackingFile {
    device: String,
    image_node_name: String,
    backing_file: String,
}

fn change_backing_file(state: &Arc<State>, a: ChangeBackingFile) -> Result<(), QmpError> {
    snapshot::change_backing_file(state, &a.device, &a.image_node_name, &a.backing_file)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InternalSync {
    device: String,
    name: String,
}

fn internal_sync(state: &Arc<State>, a: InternalSync) -> Result<(), QmpError> {
    snapshot::internal_create(state, &a.device, &a.name).map(drop)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeleteInternal {
    device: String,
    id: Option<String>,
    name: Option<String>,
}

fn delete_internal(state: &Arc<State>, a: DeleteInternal) -> Result<Value, QmpError> {
    let s = snapshot::internal_delete(state, &a.device, a.id.as_deref(), a.name.as_deref())?;
    Ok(snapshot::snapshot_info(&s))
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct GotoInternal {
    node_name: String,
    id: Option<String>,
    name: Option<String>,
}

fn goto_internal(state: &Arc<State>, a: GotoInternal) -> Result<Value, QmpError> {
    let s = snapshot::internal_goto(state, &a.node_name, a.id.as_deref(), a.name.as_deref())?;
    Ok(snapshot::snapshot_info(&s))
}
