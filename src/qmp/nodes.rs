//! QMP commands on the block graph's nodes: blockdev-add/del, block_resize,
//! blockdev-reopen, block-set-write-threshold, query-named-block-nodes and
//! x-debug-query-block-graph (BlockDeviceInfo, XDbgBlockGraph in
//! qapi/block-core.json).
//!
//! These stay with the monitor rather than beside State: a node's
//! description gathers what several subsystems know of it (bitmaps,
//! internal snapshots), which sit above State.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::block::{Node, Perm};
use crate::drivers::{BlockdevOptions, FormatSpecific};
use crate::opts;
use crate::qapi::{Args, CommandDef, QmpError};
use crate::state::State;

pub static COMMANDS: &[CommandDef<Arc<State>>] = &[
    crate::command!("blockdev-add", blockdev_add, raw),
    crate::command!("blockdev-del", blockdev_del),
    crate::command!("query-named-block-nodes", query_named_block_nodes),
    crate::command!("x-debug-query-block-graph", block_graph, no_args),
    crate::command!("block_resize", block_resize),
    crate::command!("blockdev-reopen", blockdev_reopen, raw),
    crate::command!("block-set-write-threshold", set_write_threshold),
    crate::command!("blockdev-set-active", blockdev_set_active),
    crate::command!("x-blockdev-change", x_blockdev_change),
    // Not listed: qemu-storage-daemon 7.2 lists no block_passwd (QEMU 6.0
    // removed it); it exists so that an old client is told why.
    CommandDef {
        name: "block_passwd",
        run: |s, a| block_passwd(s, a.parse()?).map(Into::into),
        listed: false,
    },
];

/// block_passwd's arguments (qapi before QEMU 6.0). The password is read
/// and dropped: never stored, printed or logged.
#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct BlockPasswd {
    #[serde(default)]
    #[allow(dead_code)]
    device: Option<String>,
    #[serde(default)]
    #[allow(dead_code)]
    node_name: Option<String>,
    #[allow(dead_code)]
    password: String,
}

/// QEMU 2.10 to 5.2's answer: image passwords went with the old qcow
/// encryption; encrypted images take their key through a secret object
/// (`encrypt.key-secret`, `key-secret`).
fn block_passwd(_state: &Arc<State>, _a: BlockPasswd) -> Result<(), QmpError> {
    Err(QmpError::generic(
        "Setting block passwords directly is no longer supported",
    ))
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct BlockdevChange {
    parent: String,
    #[serde(default)]
    child: Option<String>,
    #[serde(default)]
    node: Option<String>,
}

/// x-blockdev-change (QEMU's qmp_x_blockdev_change): removes the child
/// edge `child` of `parent`, or adds the node `node` as a new child, in a
/// drained section of `parent`'s users. Only quorum nodes take either.
fn x_blockdev_change(state: &Arc<State>, a: BlockdevChange) -> Result<(), QmpError> {
    let (parent, new) = {
        let graph = state.graph();
        let parent = graph.get(&a.parent).map_err(|_| {
            QmpError::generic(format!(
                "Cannot find device='{0}' nor node-name='{0}'",
                a.parent
            ))
        })?;
        let new = match (&a.child, &a.node) {
            (Some(_), Some(_)) => {
                return Err(QmpError::generic(
                    "The parameters child and node are in conflict",
                ))
            }
            (None, None) => {
                return Err(QmpError::generic("Either child or node must be specified"))
            }
            (None, Some(n)) => Some(
                graph
                    .get(n)
                    .map_err(|_| QmpError::generic(format!("Node '{n}' not found")))?,
            ),
            (Some(_), None) => None,
        };
        (parent, new)
    };
    let name = parent.name().to_string();
    let r = match (a.child, new) {
        (Some(child), _) => {
            let found = parent
                .block_driver()
                .named_children()
                .iter()
                .any(|(n, _)| *n == child);
            if !found {
                return Err(QmpError::generic(format!(
                    "Node '{name}' does not have child '{child}'"
                )));
            }
            let gone = parent
                .block_driver()
                .named_children()
                .iter()
                .find(|(n, _)| *n == child)
                .map(|(_, c)| c.node().clone());
            let r = state.drained(&parent, || parent.block_driver().del_child(&name, &child));
            // A child opened in place (inline) goes with its last parent,
            // as QEMU drops its reference.
            if let (Ok(()), Some(gone)) = (&r, gone) {
                let mut graph = state.graph();
                if graph.is_implicit(gone.name()) && gone.parents().is_empty() {
                    if let Err(e) = graph.remove(gone.name()) {
                        log::warn!("node {}: not removed: {e}", gone.name());
                    }
                }
            }
            r
        }
        (None, Some(new)) => {
            // Requests are not split or padded here: every export above
            // must still meet the new child's alignment (as blockdev-reopen
            // checks a file node's).
            let align = new.request_alignment().max(1);
            for e in state.export_states() {
                let lbs = e.config.logical_block_size;
                if e.blk.node().reaches(&parent) && lbs % align != 0 {
                    return Err(QmpError::generic(format!(
                        "node '{}' needs requests aligned to {align} bytes, but export '{}' above '{name}' has logical-block-size {lbs}",
                        new.name(),
                        e.config.id
                    )));
                }
            }
            state.drained(&parent, || parent.block_driver().add_child(&name, new))
        }
        (None, None) => Ok(()),
    };
    r.map_err(QmpError::generic)?;
    log::info!("node {name}: children changed (x-blockdev-change)");
    Ok(())
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct SetActive {
    #[serde(default)]
    node_name: Option<String>,
    #[serde(deserialize_with = "opts::bool")]
    active: bool,
}

/// blockdev-set-active (QEMU 10): one node and the nodes below it, or
/// every node, made active (locks taken, images read again) or inactive
/// (written back, write locks released) for a live migration's handoff.
fn blockdev_set_active(state: &Arc<State>, a: SetActive) -> Result<(), QmpError> {
    Ok(state.set_active(a.node_name.as_deref(), a.active)?)
}

/// blockdev-add: the arguments are a BlockdevOptions (a union on `driver`,
/// parsed with its own texts).
fn blockdev_add(state: &Arc<State>, args: Args) -> Result<(), QmpError> {
    let opts = BlockdevOptions::from_json(args.to_value())
        .map_err(|e| QmpError::generic(format!("Invalid arguments for 'blockdev-add': {e}")))?;
    if opts.node_name().is_empty() {
        return Err(QmpError::generic(
            "'node-name' must be specified for the root node",
        ));
    }
    state
        .add_blockdev(&opts)
        .map(drop)
        .map_err(|e| QmpError::generic(e.to_string()))
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct NodeName {
    node_name: String,
}

fn blockdev_del(state: &Arc<State>, a: NodeName) -> Result<(), QmpError> {
    state.del_blockdev(&a.node_name).map_err(|e| match e {
        crate::block::GraphError::NodeNotFound(n) => {
            QmpError::generic(format!("Failed to find node with node-name='{n}'"))
        }
        other => QmpError::generic(other.to_string()),
    })
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct Flat {
    #[serde(default, deserialize_with = "opts::bool")]
    flat: bool,
}

fn query_named_block_nodes(state: &Arc<State>, a: Flat) -> Result<Value, QmpError> {
    let graph = state.graph();
    Ok(json!(graph
        .nodes()
        .map(|n| block_device_info(n, a.flat))
        .collect::<Vec<_>>()))
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct Resize {
    #[serde(default)]
    device: Option<String>,
    #[serde(default)]
    node_name: Option<String>,
    #[serde(deserialize_with = "opts::size")]
    size: u64,
}

fn block_resize(state: &Arc<State>, a: Resize) -> Result<(), QmpError> {
    let node = match (a.node_name, a.device) {
        (Some(n), None) => n,
        (None, Some(d)) => match state.export(&d) {
            Some(e) => e.blk.node().name().to_string(),
            None => return Err(QmpError::not_found(format!("Device '{d}' not found"))),
        },
        _ => {
            return Err(QmpError::generic(
                "Need exactly one of 'device' and 'node-name'",
            ))
        }
    };
    Ok(state.resize(&node, a.size)?)
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct Reopen {
    options: Vec<BlockdevOptions>,
}

/// Options of QEMU's qcow2 that this daemon has no field for, and that
/// QEMU's reopen refuses to change: refused with QEMU's words rather than
/// as unknown fields.
const QCOW2_FIXED: &[&str] = &["data-file", "data-file-raw"];

fn blockdev_reopen(state: &Arc<State>, args: crate::qapi::Args) -> Result<(), QmpError> {
    let v = args.to_value();
    let list = v.get("options").and_then(|o| o.as_array());
    for o in list.into_iter().flatten() {
        if o.get("driver").and_then(|d| d.as_str()) != Some("qcow2") {
            continue;
        }
        if let Some(k) = QCOW2_FIXED.iter().find(|k| o.get(**k).is_some()) {
            return Err(QmpError::generic(format!("Cannot change the option '{k}'")));
        }
    }
    let a: Reopen = args.parse()?;
    Ok(state.reopen(&a.options)?)
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct WriteThreshold {
    node_name: String,
    #[serde(deserialize_with = "opts::uint")]
    write_threshold: u64,
}

fn set_write_threshold(state: &Arc<State>, a: WriteThreshold) -> Result<(), QmpError> {
    let node = state
        .graph()
        .get(&a.node_name)
        .map_err(|_| QmpError::not_found(format!("Device '{}' not found", a.node_name)))?;
    node.set_write_threshold(a.write_threshold);
    Ok(())
}

/// ImageInfo of a node and (unless `flat`) its backing chain
/// (qapi/block-core.json).
fn image_info(node: &Node, flat: bool) -> Map<String, Value> {
    let mut image = Map::new();
    image.insert("filename".into(), json!(node.display_filename()));
    image.insert("format".into(), json!(node.driver_name()));
    image.insert("virtual-size".into(), json!(node.size()));
    image.insert("dirty-flag".into(), json!(false));
    // Only qcow2 has format-specific facts, and only it a backing node.
    let Some(FormatSpecific::Qcow2 {
        v3,
        lazy_refcounts,
        refcount_bits,
        corrupt,
        extended_l2,
    }) = node.format_specific()
    else {
        return image;
    };
    if let Some(c) = node.cluster_size() {
        image.insert("cluster-size".into(), json!(c));
    }
    image.insert(
        "format-specific".into(),
        json!({"type": "qcow2", "data": {
            "compat": if v3 { "1.1" } else { "0.10" },
            "lazy-refcounts": lazy_refcounts,
            "refcount-bits": refcount_bits,
            "corrupt": corrupt,
            "extended-l2": extended_l2,
        }}),
    );
    if let Some(header) = node.backing_file() {
        if let Some(b) = header.backing_file_name() {
            image.insert("backing-filename".into(), json!(b));
        }
        if let Some(f) = header.backing_format() {
            image.insert("backing-filename-format".into(), json!(f));
        }
    }
    let snapshots = node
        .internal_snapshots()
        .map(|s| s.snapshots())
        .unwrap_or_default();
    if !snapshots.is_empty() {
        let snaps: Vec<Value> = snapshots
            .iter()
            .map(crate::snapshot::snapshot_info)
            .collect();
        image.insert("snapshots".into(), json!(snaps));
    }
    if let Some(b) = node.backing() {
        image.insert(
            "full-backing-filename".into(),
            json!(b.node().display_filename()),
        );
        if !flat {
            image.insert(
                "backing-image".into(),
                Value::Object(image_info(b.node(), false)),
            );
        }
    }
    image
}

/// BlockDeviceInfo (qapi/block-core.json).
fn block_device_info(node: &Node, flat: bool) -> Value {
    let image = image_info(node, flat);
    let mut v = json!({
        "node-name": node.name(),
        "drv": node.driver_name(),
        "file": node.display_filename(),
        "ro": node.is_read_only(),
        "active": node.is_active(),
        // As QEMU's bdrv_is_encrypted: luks, and encrypted qcow2.
        "encrypted": node.is_encrypted(),
        "backing_file_depth": node.backing_depth(),
        "detect_zeroes": node.detect_zeroes(),
        "bps": 0, "bps_rd": 0, "bps_wr": 0,
        "iops": 0, "iops_rd": 0, "iops_wr": 0,
        "write_threshold": node.write_threshold(),
        "image": Value::Object(image),
        "cache": {"writeback": true, "direct": node.is_direct(), "no-flush": node.is_no_flush()},
    });
    if !node.bitmaps().is_empty() {
        v["dirty-bitmaps"] = crate::bitmaps::qmp::info(node);
    }
    if let Some(b) = node.backing() {
        v["backing_file"] = json!(b.node().display_filename());
    }
    v
}

fn perm_names(p: Perm) -> Vec<&'static str> {
    [
        (Perm::CONSISTENT_READ, "consistent-read"),
        (Perm::WRITE, "write"),
        (Perm::WRITE_UNCHANGED, "write-unchanged"),
        (Perm::RESIZE, "resize"),
    ]
    .iter()
    .filter(|(b, _)| p.contains(*b))
    .map(|(_, n)| *n)
    .collect()
}

/// XDbgBlockGraph: every node, every export's BlockBackend, and the edges
/// with the permissions they hold and share.
fn block_graph(state: &Arc<State>) -> Result<Value, QmpError> {
    let graph = state.graph();
    let nodes: Vec<&Arc<Node>> = graph.nodes().collect();
    let id_of = |n: &Node| {
        nodes
            .iter()
            .position(|m| std::ptr::eq(&***m, n))
            .map(|i| i + 1)
    };
    let mut out_nodes = Vec::new();
    let mut edges = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        out_nodes.push(json!({"id": i + 1, "type": "block-driver", "name": n.name()}));
        for (name, c) in n.block_driver().named_children() {
            if let Some(child) = id_of(c.node()) {
                edges.push(json!({
                    "parent": i + 1, "child": child, "name": name,
                    "perm": perm_names(c.perm()), "shared-perm": perm_names(c.shared()),
                }));
            }
        }
    }
    for (next, e) in (nodes.len() + 1..).zip(state.export_backends()) {
        out_nodes.push(json!({"id": next, "type": "block-backend", "name": e.name()}));
        if let Some(child) = id_of(e.node()) {
            let mut perm = Perm::CONSISTENT_READ;
            if e.is_writable() {
                perm = perm | Perm::WRITE;
            }
            edges.push(json!({
                "parent": next, "child": child, "name": "root",
                "perm": perm_names(perm), "shared-perm": perm_names(Perm::ALL),
            }));
        }
    }
    Ok(json!({"nodes": out_nodes, "edges": edges}))
}
