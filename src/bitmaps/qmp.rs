//! QMP handlers of the dirty bitmap commands. Each of
//! block-dirty-bitmap-add/remove/clear/enable/disable/merge runs as a
//! transaction of one action, so that it is checked, performed and undone
//! exactly as inside a `transaction`; their arguments are parsed as an
//! action's (the error names no parameter).

use std::sync::Arc;

use serde_json::{json, Value};

use super::{AddArgs, MergeArgs, NameArgs};
use crate::block::Node;
use crate::qapi::{CommandDef, QmpError};
use crate::state::State;
use crate::transaction::Action;

pub static COMMANDS: &[CommandDef<Arc<State>>] = &[
    crate::command!("block-dirty-bitmap-add", add, flat),
    crate::command!("block-dirty-bitmap-remove", remove, flat),
    crate::command!("block-dirty-bitmap-clear", clear, flat),
    crate::command!("block-dirty-bitmap-enable", enable, flat),
    crate::command!("block-dirty-bitmap-disable", disable, flat),
    crate::command!("block-dirty-bitmap-merge", merge, flat),
    crate::command!("x-debug-block-dirty-bitmap-sha256", sha256),
];

fn one(state: &Arc<State>, action: Action) -> Result<(), QmpError> {
    crate::transaction::transaction(state, vec![action])
}

fn add(state: &Arc<State>, a: AddArgs) -> Result<(), QmpError> {
    one(state, Action::BlockDirtyBitmapAdd(a))
}

fn remove(state: &Arc<State>, a: NameArgs) -> Result<(), QmpError> {
    one(state, Action::BlockDirtyBitmapRemove(a))
}

fn clear(state: &Arc<State>, a: NameArgs) -> Result<(), QmpError> {
    one(state, Action::BlockDirtyBitmapClear(a))
}

fn enable(state: &Arc<State>, a: NameArgs) -> Result<(), QmpError> {
    one(state, Action::BlockDirtyBitmapEnable(a))
}

fn disable(state: &Arc<State>, a: NameArgs) -> Result<(), QmpError> {
    one(state, Action::BlockDirtyBitmapDisable(a))
}

fn merge(state: &Arc<State>, a: MergeArgs) -> Result<(), QmpError> {
    one(state, Action::BlockDirtyBitmapMerge(a))
}

/// x-debug-block-dirty-bitmap-sha256: a digest of the bitmap's bits.
fn sha256(state: &Arc<State>, a: NameArgs) -> Result<Value, QmpError> {
    let node = state
        .graph()
        .get(&a.node)
        .map_err(|_| QmpError::generic(format!("Node '{}' not found", a.node)))?;
    let b = super::find(&node, &a.name)?;
    Ok(json!({"sha256": b.sha256()}))
}

/// BlockDirtyInfo list of a node (query-named-block-nodes).
pub fn info(node: &Node) -> Value {
    Value::Array(
        node.bitmaps()
            .iter()
            .map(|b| {
                json!({
                    "name": b.name(), "recording": b.is_enabled(), "busy": false,
                    "persistent": b.is_persistent(), "granularity": b.granularity(),
                    "count": b.count(),
                })
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use crate::qapi::Args;
    use serde_json::{json, Value};

    /// The bitmap commands used to be parsed as a transaction action
    /// (`{"type": command, "data": arguments}`); their own argument structs
    /// must give the same texts.
    #[test]
    fn arguments_fail_with_the_texts_of_a_transaction_action() {
        let cases = [
            ("block-dirty-bitmap-add", json!({})),
            ("block-dirty-bitmap-add", json!({"node": "n"})),
            ("block-dirty-bitmap-add", json!({"node": "n", "name": 1})),
            (
                "block-dirty-bitmap-add",
                json!({"node": "n", "name": "b", "granularity": "x"}),
            ),
            (
                "block-dirty-bitmap-add",
                json!({"node": "n", "name": "b", "granularity": -1}),
            ),
            (
                "block-dirty-bitmap-add",
                json!({"node": "n", "name": "b", "persistent": "yes"}),
            ),
            (
                "block-dirty-bitmap-add",
                json!({"node": "n", "name": "b", "bogus": 1}),
            ),
            ("block-dirty-bitmap-remove", json!({"node": "n"})),
            ("block-dirty-bitmap-clear", json!({"node": [], "name": "b"})),
            (
                "block-dirty-bitmap-enable",
                json!({"node": "n", "name": "b", "x": null}),
            ),
            ("block-dirty-bitmap-disable", json!({"name": "b"})),
            (
                "block-dirty-bitmap-merge",
                json!({"node": "n", "target": "t"}),
            ),
            (
                "block-dirty-bitmap-merge",
                json!({"node": "n", "target": "t", "bitmaps": [1]}),
            ),
            (
                "block-dirty-bitmap-merge",
                json!({"node": "n", "target": "t", "bitmaps": [{"node": "m"}]}),
            ),
            (
                "block-dirty-bitmap-merge",
                json!({"node": "n", "target": "t", "bitmaps": "b"}),
            ),
        ];
        for (name, args) in cases {
            let Value::Object(m) = &args else {
                unreachable!("the cases are objects")
            };
            let before = serde_json::from_value::<crate::transaction::Action>(
                json!({"type": name, "data": args}),
            )
            .map(drop)
            .map_err(|e| format!("Invalid arguments for '{name}': {e}"))
            .unwrap_err();
            let a = Args::new(name, m);
            let now = match name {
                "block-dirty-bitmap-add" => a.parse_flat::<super::AddArgs>().map(drop),
                "block-dirty-bitmap-merge" => a.parse_flat::<super::MergeArgs>().map(drop),
                _ => a.parse_flat::<super::NameArgs>().map(drop),
            }
            .unwrap_err();
            assert_eq!(now.desc, before, "{name} {args}");
        }
    }
}
