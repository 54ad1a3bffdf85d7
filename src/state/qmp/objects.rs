//! QMP commands on user-creatable objects (throttle groups): object-add,
//! object-del, qom-get and qom-set of a group's `limits`.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::Value;

use crate::qapi::{CommandDef, QmpError};
use crate::state::State;

pub static COMMANDS: &[CommandDef<Arc<State>>] = &[
    crate::command!("object-add", object_add),
    crate::command!("object-del", object_del),
    crate::command!("qom-get", qom_get),
    crate::command!("qom-set", qom_set),
];

fn object_add(state: &Arc<State>, o: crate::config::ObjectOptions) -> Result<(), QmpError> {
    Ok(state.add_object(&o)?)
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct ObjectId {
    id: String,
}

fn object_del(state: &Arc<State>, a: ObjectId) -> Result<(), QmpError> {
    if state.del_iothread(&a.id) {
        return Ok(());
    }
    state
        .graph()
        .remove_throttle_group(&a.id)
        .map_err(QmpError::generic)
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct QomGet {
    path: String,
    property: String,
}

fn qom_get(state: &Arc<State>, a: QomGet) -> Result<Value, QmpError> {
    let g = throttle_group_at(state, &a.path)?;
    match a.property.as_str() {
        "limits" => Ok(serde_json::to_value(g.limits().filled()).unwrap_or(Value::Null)),
        p => Err(QmpError::generic(format!("Property '{p}' not found"))),
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct QomSet {
    path: String,
    property: String,
    value: Value,
}

fn qom_set(state: &Arc<State>, a: QomSet) -> Result<(), QmpError> {
    let g = throttle_group_at(state, &a.path)?;
    if a.property != "limits" {
        return Err(QmpError::generic(format!(
            "Property '{}' not found",
            a.property
        )));
    }
    let limits: crate::throttle::ThrottleLimits = serde_json::from_value(a.value)
        .map_err(|e| QmpError::generic(format!("Invalid 'limits': {e}")))?;
    g.set_limits(limits).map_err(QmpError::generic)
}

/// The throttle group a QOM path names: `tg0` or `/objects/tg0`.
fn throttle_group_at(
    state: &Arc<State>,
    path: &str,
) -> Result<Arc<crate::throttle::ThrottleGroup>, QmpError> {
    let id = path.strip_prefix("/objects/").unwrap_or(path);
    state
        .graph()
        .throttle_group(id)
        .ok_or_else(|| QmpError::not_found(format!("Device '{path}' not found")))
}
