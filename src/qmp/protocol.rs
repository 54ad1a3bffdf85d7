//! The QMP wire protocol: messages, replies and errors (events are
//! stamped in `events.rs`, error classes are in `qapi.rs`).
//!
//! ```text
//!   server: {"QMP": {"version": ..., "capabilities": []}}
//!   client: {"execute": "qmp_capabilities"}        server: {"return": {}}
//!   client: {"execute": "cmd", "arguments": {..}, "id": X}
//!   server: {"return": ..., "id": X}  or  {"error": {"class": C, "desc": D}, "id": X}
//!   server: {"event": "NAME", "data": {..}, "timestamp": {"seconds": S, "microseconds": U}}
//! ```

use serde_json::{json, Map, Value};

use crate::qapi::QmpError;

/// A parsed command.
#[derive(Debug, PartialEq)]
pub struct Command {
    pub name: String,
    pub arguments: Map<String, Value>,
    pub id: Option<Value>,
}

/// Turns one JSON value received from a client into a command, with the
/// errors QEMU gives for malformed input.
pub fn parse_command(v: Value) -> Result<Command, (QmpError, Option<Value>)> {
    let Value::Object(mut obj) = v else {
        return Err((QmpError::generic("QMP input must be a JSON object"), None));
    };
    let id = obj.remove("id");
    let fail = |desc: String| Err((QmpError::generic(desc), id.clone()));
    let name = match obj.remove("execute") {
        Some(Value::String(s)) => s,
        Some(_) => return fail("QMP input member 'execute' must be a string".into()),
        None => {
            if obj.contains_key("exec-oob") {
                return fail("QMP input member 'exec-oob' is not supported".into());
            }
            return fail("QMP input lacks member 'execute'".into());
        }
    };
    let arguments = match obj.remove("arguments") {
        None => Map::new(),
        Some(Value::Object(m)) => m,
        Some(_) => return fail("QMP input member 'arguments' must be an object".into()),
    };
    if let Some(k) = obj.keys().next() {
        return fail(format!("QMP input member '{k}' is unexpected"));
    }
    Ok(Command {
        name,
        arguments,
        id,
    })
}

pub fn greeting(major: u64, minor: u64, micro: u64, package: &str) -> Value {
    json!({"QMP": {
        "version": {"qemu": {"major": major, "minor": minor, "micro": micro}, "package": package},
        "capabilities": []
    }})
}

pub fn reply(ret: Value, id: Option<Value>) -> Value {
    let mut m = Map::new();
    m.insert("return".into(), ret);
    if let Some(id) = id {
        m.insert("id".into(), id);
    }
    Value::Object(m)
}

pub fn error_reply(e: &QmpError, id: Option<Value>) -> Value {
    let mut m = Map::new();
    m.insert(
        "error".into(),
        json!({"class": e.class.name(), "desc": e.desc}),
    );
    if let Some(id) = id {
        m.insert("id".into(), id);
    }
    Value::Object(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qapi::ErrorClass;

    #[test]
    fn execute_with_arguments_and_id_parses() {
        let c = parse_command(json!({"execute": "x", "arguments": {"a": 1}, "id": "i"})).unwrap();
        assert_eq!(c.name, "x");
        assert_eq!(c.arguments["a"], 1);
        assert_eq!(c.id, Some(json!("i")));
    }

    #[test]
    fn malformed_commands_get_generic_errors_with_their_id() {
        let (e, id) = parse_command(json!({"id": 5})).unwrap_err();
        assert_eq!(e.desc, "QMP input lacks member 'execute'");
        assert_eq!(id, Some(json!(5)));
        let (e, _) = parse_command(json!({"execute": 1})).unwrap_err();
        assert!(e.desc.contains("must be a string"));
        let (e, _) = parse_command(json!({"execute": "x", "arguments": []})).unwrap_err();
        assert!(e.desc.contains("'arguments' must be an object"));
        let (e, _) = parse_command(json!({"execute": "x", "bogus": 1})).unwrap_err();
        assert!(e.desc.contains("'bogus' is unexpected"));
        let (e, _) = parse_command(json!([1, 2])).unwrap_err();
        assert_eq!(e.class, ErrorClass::GenericError);
    }
}
