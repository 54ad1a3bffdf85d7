//! QMP commands on user-creatable objects (throttle groups, iothreads):
//! object-add, object-del, qom-get and qom-set of a group's `limits`,
//! qom-get of an iothread's properties.

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
    if state.del_iothread(&a.id) || state.del_tls_creds(&a.id) || state.graph().remove_secret(&a.id)
    {
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
    if let Some(t) = iothread_at(state, &a.path) {
        // QEMU's defaults for what was not given.
        let v = match a.property.as_str() {
            "poll-max-ns" => t
                .poll_max_ns
                .unwrap_or(crate::config::IOTHREAD_DEFAULT_POLL_MAX_NS),
            "poll-grow" => t.poll_grow.unwrap_or(0),
            "poll-shrink" => t.poll_shrink.unwrap_or(0),
            "aio-max-batch" => t.aio_max_batch.unwrap_or(0),
            "thread-pool-min" => t.thread_pool_min.unwrap_or(0),
            "thread-pool-max" => t.thread_pool_max.unwrap_or(64),
            p => return Err(QmpError::generic(format!("Property '{p}' not found"))),
        };
        return Ok(Value::from(v));
    }
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
    if iothread_at(state, &a.path).is_some() {
        // Exports copied the object's settings when they were added.
        return Err(QmpError::generic(format!(
            "Property '{}' of an iothread cannot be changed at run time here; set poll-max-ns on the export",
            a.property
        )));
    }
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

/// The iothread object a QOM path names: `io0` or `/objects/io0`.
fn iothread_at(state: &Arc<State>, path: &str) -> Option<crate::config::IothreadOptions> {
    state.iothread(path.strip_prefix("/objects/").unwrap_or(path))
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
