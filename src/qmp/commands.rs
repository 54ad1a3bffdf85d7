//! QMP commands, named and shaped as in qapi/block-core.json and
//! qapi/block-export.json. Each takes typed arguments (unknown members are
//! errors) and answers with QEMU's return shape.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::protocol::Command;
use crate::qapi::{ErrorClass, QmpError};
use std::sync::atomic::Ordering;

use crate::block::{BlockStats, HistogramKind, IoKind, LatencyHistogram, Node, Perm};
use crate::config::{ExportConfig, ExportOptions};
use crate::drivers::{BlockdevOptions, Driver};
use crate::opts;
use crate::state::State;

pub const PACKAGE: &str = concat!("vhost-user-blkd ", env!("CARGO_PKG_VERSION"));

/// Our version, in QEMU's major/minor/micro shape.
pub fn version() -> (u64, u64, u64) {
    let parse = |s: &str| s.parse().unwrap_or(0);
    (
        parse(env!("CARGO_PKG_VERSION_MAJOR")),
        parse(env!("CARGO_PKG_VERSION_MINOR")),
        parse(env!("CARGO_PKG_VERSION_PATCH")),
    )
}

/// What a command answers.
pub struct Done {
    pub value: Value,
    /// Shut the daemon down once the reply is sent.
    pub quit: bool,
}

fn ok(value: Value) -> Result<Done, QmpError> {
    Ok(Done { value, quit: false })
}

const COMMANDS: &[&str] = &[
    "qmp_capabilities",
    "query-version",
    "query-commands",
    "quit",
    "blockdev-add",
    "blockdev-del",
    "query-named-block-nodes",
    "x-debug-query-block-graph",
    "block-export-add",
    "block-export-del",
    "query-block-exports",
    "block_resize",
    "blockdev-snapshot",
    "blockdev-snapshot-sync",
    "transaction",
    "change-backing-file",
    "block-dirty-bitmap-add",
    "block-dirty-bitmap-remove",
    "block-dirty-bitmap-clear",
    "block-dirty-bitmap-enable",
    "block-dirty-bitmap-disable",
    "block-dirty-bitmap-merge",
    "x-debug-block-dirty-bitmap-sha256",
    "blockdev-snapshot-internal-sync",
    "blockdev-snapshot-delete-internal-sync",
    "x-blockdev-snapshot-goto-internal",
    "query-blockstats",
    "block-latency-histogram-set",
    "block-set-write-threshold",
    "cont",
    "blockdev-reopen",
    "blockdev-create",
    "query-jobs",
    "query-block-jobs",
    "block-stream",
    "block-commit",
    "blockdev-mirror",
    "drive-mirror",
    "blockdev-backup",
    "block-job-set-speed",
    "block-job-pause",
    "block-job-resume",
    "block-job-cancel",
    "block-job-complete",
    "block-job-finalize",
    "block-job-dismiss",
    "job-pause",
    "job-resume",
    "job-cancel",
    "job-complete",
    "job-finalize",
    "job-dismiss",
    "object-add",
    "object-del",
    "qom-get",
    "qom-set",
];

fn args<T: serde::de::DeserializeOwned>(cmd: &Command) -> Result<T, QmpError> {
    let v = Value::Object(cmd.arguments.clone());
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path.is_empty() || path == "." {
            QmpError::generic(format!("Invalid arguments for '{}': {inner}", cmd.name))
        } else {
            QmpError::generic(format!(
                "Invalid arguments for '{}': parameter '{path}': {inner}",
                cmd.name
            ))
        }
    })
}

fn no_args(cmd: &Command) -> Result<(), QmpError> {
    match cmd.arguments.keys().next() {
        None => Ok(()),
        Some(k) => Err(QmpError::generic(format!("Parameter '{k}' is unexpected"))),
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct Capabilities {
    #[serde(default)]
    enable: Vec<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct NodeName {
    node_name: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct Flat {
    #[serde(default, deserialize_with = "opts::bool")]
    flat: bool,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct ObjectId {
    id: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct QomGet {
    path: String,
    property: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct QomSet {
    path: String,
    property: String,
    value: Value,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct Reopen {
    options: Vec<BlockdevOptions>,
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

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct BlockStatsArgs {
    #[serde(default, deserialize_with = "opts::bool")]
    query_nodes: bool,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct HistogramSet {
    id: String,
    #[serde(default)]
    boundaries: Option<Vec<u64>>,
    #[serde(default)]
    boundaries_read: Option<Vec<u64>>,
    #[serde(default)]
    boundaries_write: Option<Vec<u64>>,
    #[serde(default)]
    boundaries_zap: Option<Vec<u64>>,
    #[serde(default)]
    boundaries_flush: Option<Vec<u64>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct WriteThreshold {
    node_name: String,
    #[serde(deserialize_with = "opts::uint")]
    write_threshold: u64,
}

#[derive(Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
enum RemoveMode {
    #[default]
    Safe,
    Hard,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct JobId {
    id: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct BlockJobDevice {
    device: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct BlockJobCancel {
    device: String,
    #[serde(default, deserialize_with = "opts::bool")]
    force: bool,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct BlockJobSpeed {
    device: String,
    speed: i64,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct ExportDel {
    id: String,
    #[serde(default)]
    mode: RemoveMode,
}

/// Runs `cmd`. Before capabilities negotiation only qmp_capabilities works.
pub fn dispatch(
    state: &Arc<State>,
    cmd: &Command,
    negotiated: &mut bool,
) -> Result<Done, QmpError> {
    if !*negotiated {
        if cmd.name != "qmp_capabilities" {
            return Err(QmpError {
                class: ErrorClass::CommandNotFound,
                desc: "Expecting capabilities negotiation with 'qmp_capabilities'".into(),
            });
        }
        let caps: Capabilities = args(cmd)?;
        if let Some(c) = caps.enable.first() {
            return Err(QmpError::generic(format!(
                "Capability '{c}' is not available"
            )));
        }
        *negotiated = true;
        return ok(json!({}));
    }
    let _serialised = state.command_lock();
    match cmd.name.as_str() {
        "qmp_capabilities" => Err(QmpError {
            class: ErrorClass::CommandNotFound,
            desc: "Capabilities negotiation is already complete, command ignored".into(),
        }),
        // Debug builds only, for tests: a command that panics, as a bug
        // would, holding the management locks.
        #[cfg(debug_assertions)]
        "x-debug-panic" => state.debug_panic(),
        "query-version" => {
            no_args(cmd)?;
            let (major, minor, micro) = version();
            ok(
                json!({"qemu": {"major": major, "minor": minor, "micro": micro}, "package": PACKAGE}),
            )
        }
        "query-commands" => {
            no_args(cmd)?;
            ok(json!(COMMANDS
                .iter()
                .map(|n| json!({"name": n}))
                .collect::<Vec<_>>()))
        }
        "quit" => {
            no_args(cmd)?;
            Ok(Done {
                value: json!({}),
                quit: true,
            })
        }
        "blockdev-add" => {
            let opts =
                BlockdevOptions::from_json(Value::Object(cmd.arguments.clone())).map_err(|e| {
                    QmpError::generic(format!("Invalid arguments for 'blockdev-add': {e}"))
                })?;
            if opts.node_name().is_empty() {
                return Err(QmpError::generic(
                    "'node-name' must be specified for the root node",
                ));
            }
            state
                .add_blockdev(&opts)
                .map_err(|e| QmpError::generic(e.to_string()))?;
            ok(json!({}))
        }
        "blockdev-del" => {
            let a: NodeName = args(cmd)?;
            state.del_blockdev(&a.node_name).map_err(|e| match e {
                crate::block::GraphError::NodeNotFound(n) => {
                    QmpError::generic(format!("Failed to find node with node-name='{n}'"))
                }
                other => QmpError::generic(other.to_string()),
            })?;
            ok(json!({}))
        }
        "query-named-block-nodes" => {
            let a: Flat = args(cmd)?;
            let graph = state.graph();
            ok(json!(graph
                .nodes()
                .map(|n| block_device_info(n, a.flat))
                .collect::<Vec<_>>()))
        }
        "x-debug-query-block-graph" => {
            no_args(cmd)?;
            ok(block_graph(state))
        }
        "block-export-add" => {
            let ExportOptions::VhostUserBlk(o) = args(cmd)?;
            let e = ExportConfig::try_from(o).map_err(|e| QmpError::generic(e.to_string()))?;
            state
                .add_export(&e)
                .map_err(|e| QmpError::generic(error_chain(&e)))?;
            ok(json!({}))
        }
        "block-export-del" => {
            let a: ExportDel = args(cmd)?;
            state
                .del_export(&a.id, a.mode == RemoveMode::Hard)
                .map_err(|e| QmpError::generic(e.to_string()))?;
            ok(json!({}))
        }
        "query-block-exports" => {
            no_args(cmd)?;
            ok(json!(state
                .export_list()
                .iter()
                .map(|e| json!({
                    "type": "vhost-user-blk",
                    "id": e.id,
                    "node-name": e.node_name,
                    "shutting-down": e.shutting_down,
                }))
                .collect::<Vec<_>>()))
        }
        "blockdev-snapshot" => {
            #[derive(serde::Deserialize)]
            #[serde(deny_unknown_fields)]
            struct A {
                node: String,
                overlay: String,
            }
            let a: A = args(cmd)?;
            crate::snapshot::external(state, &a.node, &a.overlay)?;
            ok(json!({}))
        }
        "blockdev-snapshot-sync" => {
            let a: crate::snapshot::SnapshotSyncArgs = args(cmd)?;
            crate::transaction::snapshot_sync(state, &a)?;
            ok(json!({}))
        }
        "transaction" => {
            #[derive(serde::Deserialize)]
            #[serde(deny_unknown_fields)]
            struct A {
                actions: Vec<crate::transaction::Action>,
                #[serde(default)]
                properties: Option<Value>,
            }
            let a: A = args(cmd)?;
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
            crate::transaction::transaction_with(state, a.actions, grouped)?;
            ok(json!({}))
        }
        "block-dirty-bitmap-add"
        | "block-dirty-bitmap-remove"
        | "block-dirty-bitmap-clear"
        | "block-dirty-bitmap-enable"
        | "block-dirty-bitmap-disable"
        | "block-dirty-bitmap-merge" => {
            use crate::transaction::Action;
            let v = Value::Object(cmd.arguments.clone());
            let action: Action = serde_json::from_value(json!({"type": cmd.name, "data": v}))
                .map_err(|e| {
                    QmpError::generic(format!("Invalid arguments for '{}': {e}", cmd.name))
                })?;
            crate::transaction::transaction(state, vec![action])?;
            ok(json!({}))
        }
        "x-debug-block-dirty-bitmap-sha256" => {
            let a: crate::bitmaps::NameArgs = args(cmd)?;
            let node = state
                .graph()
                .get(&a.node)
                .map_err(|_| QmpError::generic(format!("Node '{}' not found", a.node)))?;
            let b = crate::bitmaps::find(&node, &a.name).map_err(QmpError::generic)?;
            ok(json!({"sha256": b.sha256()}))
        }
        "change-backing-file" => {
            #[derive(serde::Deserialize)]
            #[serde(rename_all = "kebab-case", deny_unknown_fields)]
            struct A {
                device: String,
                image_node_name: String,
                backing_file: String,
            }
            let a: A = args(cmd)?;
            crate::snapshot::change_backing_file(
                state,
                &a.device,
                &a.image_node_name,
                &a.backing_file,
            )?;
            ok(json!({}))
        }
        "blockdev-snapshot-internal-sync" => {
            #[derive(serde::Deserialize)]
            #[serde(deny_unknown_fields)]
            struct A {
                device: String,
                name: String,
            }
            let a: A = args(cmd)?;
            crate::snapshot::internal_create(state, &a.device, &a.name)?;
            ok(json!({}))
        }
        "blockdev-snapshot-delete-internal-sync" => {
            #[derive(serde::Deserialize)]
            #[serde(deny_unknown_fields)]
            struct A {
                device: String,
                id: Option<String>,
                name: Option<String>,
            }
            let a: A = args(cmd)?;
            let s = crate::snapshot::internal_delete(
                state,
                &a.device,
                a.id.as_deref(),
                a.name.as_deref(),
            )?;
            ok(crate::snapshot::snapshot_info(&s))
        }
        "x-blockdev-snapshot-goto-internal" => {
            #[derive(serde::Deserialize)]
            #[serde(rename_all = "kebab-case", deny_unknown_fields)]
            struct A {
                node_name: String,
                id: Option<String>,
                name: Option<String>,
            }
            let a: A = args(cmd)?;
            let s = crate::snapshot::internal_goto(
                state,
                &a.node_name,
                a.id.as_deref(),
                a.name.as_deref(),
            )?;
            ok(crate::snapshot::snapshot_info(&s))
        }
        "block_resize" => {
            let a: Resize = args(cmd)?;
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
            state
                .resize(&node, a.size)
                .map_err(|e| QmpError::generic(e.to_string()))?;
            ok(json!({}))
        }
        "query-blockstats" => {
            let a: BlockStatsArgs = args(cmd)?;
            ok(block_stats(state, a.query_nodes))
        }
        "block-latency-histogram-set" => {
            let a: HistogramSet = args(cmd)?;
            let Some(e) = state.export(&a.id) else {
                return Err(QmpError::not_found(format!("Device '{}' not found", a.id)));
            };
            let pick =
                |specific: &Option<Vec<u64>>| specific.clone().or_else(|| a.boundaries.clone());
            let slots = [
                (HistogramKind::Read, pick(&a.boundaries_read)),
                (HistogramKind::Write, pick(&a.boundaries_write)),
                (HistogramKind::Zap, pick(&a.boundaries_zap)),
                (HistogramKind::Flush, pick(&a.boundaries_flush)),
            ];
            let mut built = Vec::new();
            for (kind, b) in slots {
                let h = match b {
                    Some(b) => Some(LatencyHistogram::new(b).ok_or_else(|| {
                        QmpError::generic("histogram boundaries must be strictly increasing")
                    })?),
                    None => None,
                };
                built.push((kind, h));
            }
            for (kind, h) in built {
                e.blk.stats().set_histogram(kind, h);
            }
            ok(json!({}))
        }
        "block-set-write-threshold" => {
            let a: WriteThreshold = args(cmd)?;
            let node = state
                .graph()
                .get(&a.node_name)
                .map_err(|_| QmpError::not_found(format!("Device '{}' not found", a.node_name)))?;
            node.set_write_threshold(a.write_threshold);
            ok(json!({}))
        }
        "object-add" => {
            let o: crate::config::ObjectOptions = args(cmd)?;
            state
                .add_object(&o)
                .map_err(|e| QmpError::generic(e.to_string()))?;
            ok(json!({}))
        }
        "object-del" => {
            let a: ObjectId = args(cmd)?;
            state
                .graph()
                .remove_throttle_group(&a.id)
                .map_err(QmpError::generic)?;
            ok(json!({}))
        }
        "qom-get" => {
            let a: QomGet = args(cmd)?;
            let g = throttle_group_at(state, &a.path)?;
            match a.property.as_str() {
                "limits" => ok(serde_json::to_value(g.limits().filled()).unwrap_or(Value::Null)),
                p => Err(QmpError::generic(format!("Property '{p}' not found"))),
            }
        }
        "qom-set" => {
            let a: QomSet = args(cmd)?;
            let g = throttle_group_at(state, &a.path)?;
            if a.property != "limits" {
                return Err(QmpError::generic(format!(
                    "Property '{}' not found",
                    a.property
                )));
            }
            let limits: crate::throttle::ThrottleLimits = serde_json::from_value(a.value)
                .map_err(|e| QmpError::generic(format!("Invalid 'limits': {e}")))?;
            g.set_limits(limits).map_err(QmpError::generic)?;
            ok(json!({}))
        }
        "blockdev-reopen" => {
            let a: Reopen = args(cmd)?;
            state
                .reopen(&a.options)
                .map_err(|e| QmpError::generic(e.to_string()))?;
            ok(json!({}))
        }
        "cont" => {
            no_args(cmd)?;
            for e in state.export_states() {
                e.resume();
            }
            ok(json!({}))
        }
        "blockdev-create" => {
            let a: crate::jobs::create::CreateArgs = args(cmd)?;
            let work = crate::jobs::create::Work::parse(a.options, &state.graph())?;
            let job = crate::jobs::register(&a.job_id, "create", true, false)?;
            let st = state.clone();
            crate::jobs::spawn(job, move |job| work.run(job, &st));
            ok(json!({}))
        }
        "query-jobs" => {
            no_args(cmd)?;
            ok(crate::jobs::query())
        }
        "query-block-jobs" => {
            no_args(cmd)?;
            ok(crate::jobs::query_block())
        }
        "block-stream" => {
            crate::jobs::stream(state, args(cmd)?)?;
            ok(json!({}))
        }
        "block-commit" => {
            crate::jobs::commit(state, args(cmd)?)?;
            ok(json!({}))
        }
        "blockdev-mirror" => {
            crate::jobs::mirror(state, args(cmd)?)?;
            ok(json!({}))
        }
        "drive-mirror" => {
            crate::jobs::drive_mirror(state, args(cmd)?)?;
            ok(json!({}))
        }
        "blockdev-backup" => {
            crate::jobs::backup(state, args(cmd)?)?;
            ok(json!({}))
        }
        "block-job-set-speed" => {
            let a: BlockJobSpeed = args(cmd)?;
            crate::jobs::set_speed(&a.device, a.speed)?;
            ok(json!({}))
        }
        "block-job-cancel" => {
            let a: BlockJobCancel = args(cmd)?;
            crate::jobs::cancel_block(&a.device, a.force)?;
            ok(json!({}))
        }
        "block-job-pause" | "block-job-resume" | "block-job-complete" => {
            use crate::jobs::JobVerb;
            let a: BlockJobDevice = args(cmd)?;
            let verb = match cmd.name.as_str() {
                "block-job-pause" => JobVerb::Pause,
                "block-job-resume" => JobVerb::Resume,
                _ => JobVerb::Complete,
            };
            let job = crate::jobs::get_block(&a.device)?;
            crate::jobs::run_verb(&job, verb, false)?;
            ok(json!({}))
        }
        "block-job-finalize" | "block-job-dismiss" => {
            use crate::jobs::JobVerb;
            let a: JobId = args(cmd)?;
            let verb = if cmd.name == "block-job-finalize" {
                JobVerb::Finalize
            } else {
                JobVerb::Dismiss
            };
            let job = crate::jobs::get_block(&a.id)?;
            crate::jobs::run_verb(&job, verb, false)?;
            ok(json!({}))
        }
        "job-pause" | "job-resume" | "job-cancel" | "job-complete" | "job-finalize"
        | "job-dismiss" => {
            use crate::jobs::JobVerb;
            let verb = match cmd.name.as_str() {
                "job-pause" => JobVerb::Pause,
                "job-resume" => JobVerb::Resume,
                "job-cancel" => JobVerb::Cancel,
                "job-complete" => JobVerb::Complete,
                "job-finalize" => JobVerb::Finalize,
                _ => JobVerb::Dismiss,
            };
            let a: JobId = args(cmd)?;
            crate::jobs::command(verb, &a.id)?;
            ok(json!({}))
        }
        other => Err(QmpError::command_not_found(other)),
    }
}

/// "Block job x not found" is QEMU's DeviceNotActive.
fn histogram_json(h: &LatencyHistogram) -> Value {
    json!({
        "boundaries": h.boundaries,
        "bins": h.bins.iter().map(|b| b.load(Ordering::Relaxed)).collect::<Vec<_>>(),
    })
}

/// BlockDeviceStats of one BlockBackend, in QEMU's names. Write-zeroes
/// count as writes and discards as unmaps, as QEMU's virtio-blk accounts them.
fn device_stats(stats: &BlockStats) -> Map<String, Value> {
    let k = |kind| stats.kind(kind);
    let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let (r, w, z, f, u) = (
        k(IoKind::Read),
        k(IoKind::Write),
        k(IoKind::WriteZeroes),
        k(IoKind::Flush),
        k(IoKind::Discard),
    );
    let mut m = Map::new();
    let mut put = |key: &str, v: u64| {
        m.insert(key.to_string(), json!(v));
    };
    put("rd_bytes", get(&r.bytes));
    put("wr_bytes", get(&w.bytes) + get(&z.bytes));
    put("unmap_bytes", get(&u.bytes));
    put("rd_operations", get(&r.ops));
    put("wr_operations", get(&w.ops) + get(&z.ops));
    put("flush_operations", get(&f.ops));
    put("unmap_operations", get(&u.ops));
    put("rd_merged", 0);
    put("wr_merged", 0);
    put("unmap_merged", 0);
    put("rd_total_time_ns", get(&r.total_time_ns));
    put(
        "wr_total_time_ns",
        get(&w.total_time_ns) + get(&z.total_time_ns),
    );
    put("flush_total_time_ns", get(&f.total_time_ns));
    put("unmap_total_time_ns", get(&u.total_time_ns));
    put(
        "wr_highest_offset",
        stats.wr_highest_offset.load(Ordering::Relaxed),
    );
    put("failed_rd_operations", get(&r.failed));
    put("failed_wr_operations", get(&w.failed) + get(&z.failed));
    put("failed_flush_operations", get(&f.failed));
    put("failed_unmap_operations", get(&u.failed));
    put("invalid_rd_operations", get(&r.invalid));
    put("invalid_wr_operations", get(&w.invalid) + get(&z.invalid));
    put("invalid_flush_operations", get(&f.invalid));
    put("invalid_unmap_operations", get(&u.invalid));
    if let Some(idle) = stats.idle_time() {
        put(
            "idle_time_ns",
            u64::try_from(idle.as_nanos()).unwrap_or(u64::MAX),
        );
    }
    m.insert("account_invalid".into(), json!(true));
    m.insert("account_failed".into(), json!(true));
    m.insert("timed_stats".into(), json!([]));
    for (key, kind) in [
        ("rd_latency_histogram", HistogramKind::Read),
        ("wr_latency_histogram", HistogramKind::Write),
        ("zap_latency_histogram", HistogramKind::Zap),
        ("flush_latency_histogram", HistogramKind::Flush),
    ] {
        if let Some(h) = stats.histogram(kind) {
            m.insert(key.into(), histogram_json(&h));
        }
    }
    m
}

/// query-blockstats: one entry per export's BlockBackend (`device` is the
/// export id), with per-queue request counts as the `x-queues` extension;
/// with `query-nodes`, one entry per node as well (node-level counters are
/// not kept, as in QEMU most of them stay zero).
fn block_stats(state: &Arc<State>, query_nodes: bool) -> Value {
    let mut out = Vec::new();
    for e in state.export_states() {
        let queues: Vec<Value> = e
            .queue_requests()
            .iter()
            .enumerate()
            .map(|(q, n)| json!({"queue": q, "requests": n}))
            .collect();
        let mut stats = device_stats(e.blk.stats());
        let members = e.blk.node().throttle_members();
        let throttled = |dir| {
            members
                .iter()
                .map(|(_, m)| m.throttled_ns(dir))
                .sum::<u64>()
        };
        stats.insert(
            "x-throttled-rd-time-ns".into(),
            json!(throttled(crate::throttle::Direction::Read)),
        );
        stats.insert(
            "x-throttled-wr-time-ns".into(),
            json!(throttled(crate::throttle::Direction::Write)),
        );
        // Requests popped from the guest's rings and not yet returned: what
        // a drain waits for.
        stats.insert("x-in-flight".into(), json!(e.in_flight().get()));
        out.push(json!({
            "device": e.config.id,
            "node-name": e.blk.node().name(),
            "stats": Value::Object(stats),
            "x-queues": queues,
        }));
    }
    if query_nodes {
        let empty = BlockStats::default();
        for n in state.graph().nodes() {
            out.push(json!({
                "node-name": n.name(),
                "stats": Value::Object(device_stats(&empty)),
            }));
        }
    }
    json!(out)
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

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(&format!(": {c}"));
        src = c.source();
    }
    s
}

/// The file a node's data comes from, as QEMU names it.
fn filename(node: &Node) -> String {
    match node.driver() {
        Driver::File(f) => f.filename().to_string(),
        Driver::Null(_) => "null-co://".to_string(),
        Driver::Raw(r) => filename(r.file().node()),
        Driver::Qcow2(q) => filename(q.file().node()),
        Driver::Throttle(t) => filename(t.file().node()),
        Driver::CopyOnRead(c) => filename(c.file().node()),
    }
}

fn direct(node: &Node) -> bool {
    match node.driver() {
        Driver::File(f) => f.is_direct(),
        Driver::Null(_) => false,
        Driver::Raw(r) => direct(r.file().node()),
        Driver::Qcow2(q) => direct(q.file().node()),
        Driver::Throttle(t) => direct(t.file().node()),
        Driver::CopyOnRead(c) => direct(c.file().node()),
    }
}

fn no_flush(node: &Node) -> bool {
    match node.driver() {
        Driver::File(f) => f.is_no_flush(),
        Driver::Null(_) => false,
        Driver::Raw(r) => no_flush(r.file().node()),
        Driver::Qcow2(q) => no_flush(q.file().node()),
        Driver::Throttle(t) => no_flush(t.file().node()),
        Driver::CopyOnRead(c) => no_flush(c.file().node()),
    }
}

/// BlockDeviceInfo (qapi/block-core.json).
/// ImageInfo of a node and (unless `flat`) its backing chain.
fn image_info(node: &Node, flat: bool) -> Map<String, Value> {
    let mut image = Map::new();
    image.insert("filename".into(), json!(filename(node)));
    image.insert("format".into(), json!(node.driver_name()));
    image.insert("virtual-size".into(), json!(node.size()));
    image.insert("dirty-flag".into(), json!(false));
    if let Driver::Qcow2(q) = node.driver() {
        let h = q.header();
        image.insert("cluster-size".into(), json!(q.cluster_size()));
        image.insert(
            "format-specific".into(),
            json!({"type": "qcow2", "data": {
                "compat": if h.version >= 3 { "1.1" } else { "0.10" },
                "lazy-refcounts": q.is_lazy(),
                "refcount-bits": h.refcount_bits(),
                "corrupt": h.incompatible & 2 != 0,
                "extended-l2": h.extended_l2(),
            }}),
        );
        if let Some(b) = q.backing_file_name() {
            image.insert("backing-filename".into(), json!(b));
        }
        if let Some(f) = &h.backing_format {
            image.insert("backing-filename-format".into(), json!(f));
        }
        if !q.snapshots().is_empty() {
            let snaps: Vec<Value> = q
                .snapshots()
                .iter()
                .map(crate::snapshot::snapshot_info)
                .collect();
            image.insert("snapshots".into(), json!(snaps));
        }
        if let Some(b) = q.backing() {
            image.insert("full-backing-filename".into(), json!(filename(b.node())));
            if !flat {
                image.insert(
                    "backing-image".into(),
                    Value::Object(image_info(b.node(), false)),
                );
            }
        }
    }
    image
}

/// How many backing nodes are below `node`.
fn backing_depth(node: &Node) -> u32 {
    match node.driver() {
        Driver::Qcow2(q) => q.backing().map_or(0, |b| 1 + backing_depth(b.node())),
        _ => 0,
    }
}

fn block_device_info(node: &Node, flat: bool) -> Value {
    let image = image_info(node, flat);
    let mut backing = Value::Null;
    if let Driver::Qcow2(q) = node.driver() {
        if let Some(b) = q.backing() {
            backing = json!(filename(b.node()));
        }
    }
    let mut v = json!({
        "node-name": node.name(),
        "drv": node.driver_name(),
        "file": filename(node),
        "ro": node.is_read_only(),
        "encrypted": false,
        "backing_file_depth": backing_depth(node),
        "detect_zeroes": "off",
        "bps": 0, "bps_rd": 0, "bps_wr": 0,
        "iops": 0, "iops_rd": 0, "iops_wr": 0,
        "write_threshold": node.write_threshold(),
        "image": Value::Object(image),
        "cache": {"writeback": true, "direct": direct(node), "no-flush": no_flush(node)},
    });
    if !node.bitmaps().is_empty() {
        v["dirty-bitmaps"] = crate::bitmaps::info(node);
    }
    if !backing.is_null() {
        v["backing_file"] = backing;
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
fn block_graph(state: &Arc<State>) -> Value {
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
        for c in n.children() {
            if let Some(child) = id_of(c.node()) {
                edges.push(json!({
                    "parent": i + 1, "child": child, "name": c.role().name(),
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
    json!({"nodes": out_nodes, "edges": edges})
}
