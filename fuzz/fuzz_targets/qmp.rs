//! The QMP monitor's input path: the byte stream a client sends, split into
//! JSON values by the reader (limits, duplicate keys, garbage), each value
//! parsed as a command and dispatched on a State holding a graph of null-co
//! nodes -- as a client session does, without the socket.
//!
//! Each run starts from a fresh State with nodes n0, n1 (1 MiB) and n2
//! (64 KiB) and no capabilities negotiated.
//!
//! Left out, so that a run cannot touch the host or outlive itself:
//! commands that create files or sockets (blockdev-create,
//! blockdev-snapshot-sync, drive-mirror, block-export-add), that start job
//! threads (block-stream, block-commit, blockdev-mirror, blockdev-backup,
//! also inside a transaction), object-add of an iothread, any
//! `file`/`host_device` node or `filename`, and x-debug-panic (a panic on
//! purpose, debug builds only; the monitor catches panics anyway).
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use vhost_user_blkd::drivers::BlockdevOptions;
use vhost_user_blkd::fuzz_api::{JsonReader, ReadError};
use vhost_user_blkd::io::EngineKind;
use vhost_user_blkd::qmp::{protocol, table};

const DENIED_COMMANDS: &[&str] = &[
    "blockdev-create",
    "blockdev-snapshot-sync",
    "drive-mirror",
    "block-export-add",
    "block-stream",
    "block-commit",
    "blockdev-mirror",
    "blockdev-backup",
    "x-debug-panic",
];

/// Whether `v` names something the harness keeps away from: a file node,
/// a file name, an action that starts a job or creates a file, an iothread.
fn reaches_out(v: &Value) -> bool {
    match v {
        Value::Object(m) => m.iter().any(|(k, v)| {
            let s = v.as_str();
            k == "filename"
                || (k == "driver" && matches!(s, Some("file" | "host_device")))
                || (k == "type" && s.is_some_and(|s| DENIED_COMMANDS.contains(&s)))
                || (k == "qom-type" && s != Some("throttle-group"))
                || reaches_out(v)
        }),
        Value::Array(a) => a.iter().any(reaches_out),
        _ => false,
    }
}

fn null_node(name: &str, size: u64) -> BlockdevOptions {
    serde_json::from_value(serde_json::json!({
        "driver": "null-co", "node-name": name, "size": size, "read-zeroes": true,
    }))
    .expect("null-co options")
}

fuzz_target!(|data: &[u8]| {
    let state = vhost_user_blkd::shell::new_state(EngineKind::Sync);
    for (name, size) in [("n0", 1 << 20), ("n1", 1 << 20), ("n2", 64 << 10)] {
        state
            .add_blockdev(&null_node(name, size))
            .expect("null node");
    }
    let mut reader = JsonReader::new(data);
    let mut negotiated = false;
    // A session of at most 64 commands.
    for _ in 0..64 {
        let value = match reader.next_value() {
            Ok(Some(v)) => v,
            Ok(None) | Err(ReadError::Io(_)) | Err(ReadError::Flood(_)) => break,
            Err(ReadError::Parse(desc)) => {
                let _ =
                    protocol::error_reply(&vhost_user_blkd::qapi::QmpError::generic(desc), None);
                continue;
            }
        };
        let cmd = match protocol::parse_command(value) {
            Ok(c) => c,
            Err((e, id)) => {
                let _ = protocol::error_reply(&e, id);
                continue;
            }
        };
        if DENIED_COMMANDS.contains(&cmd.name.as_str())
            || reaches_out(&Value::Object(cmd.arguments.clone()))
        {
            continue;
        }
        let reply = match table::dispatch(&state, &cmd, &mut negotiated) {
            Ok(done) => protocol::reply(done.value, cmd.id.clone()),
            Err(e) => protocol::error_reply(&e, cmd.id.clone()),
        };
        serde_json::to_string(&reply).expect("a reply serialises");
    }
    // Shutdown as the daemon does it would drain and close every node;
    // dropping the State closes them.
    drop(state);
});
