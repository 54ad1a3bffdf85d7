//! The QMP commands of the transaction engine, as typed handlers
//! (`crate::qapi`): `transaction` itself, and blockdev-snapshot-sync, a
//! transaction of one action.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::Value;

use super::Action;
use crate::qapi::{CommandDef, QmpError};
use crate::snapshot::SnapshotSyncArgs;
use crate::state::State;

pub static COMMANDS: &[CommandDef<Arc<State>>] = &[
    crate::command!("blockdev-snapshot-sync", blockdev_snapshot_sync),
    crate::command!("transaction", transaction),
];

fn blockdev_snapshot_sync(state: &Arc<State>, a: SnapshotSyncArgs) -> Result<(), QmpError> {
    super::snapshot_sync(state, &a)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Transaction {
    actions: Vec<Action>,
    #[serde(default)]
    properties: Option<Value>,
}

fn transaction(state: &Arc<State>, a: Transaction) -> Result<(), QmpError> {
    let grouped = match a.properties.as_ref().and_then(|p| p.get("completion-mode")) {
        None => false,
        Some(m) if m == "individual" => false,
        Some(m) if m == "grouped" => true,
        Some(m) => {
            return Err(QmpError::generic(format!(
                "Parameter 'completion-mode' does not accept value {m}"
            )))
        }
    };
    super::transaction_with(state, a.actions, grouped)
}
