//! QMP commands on exports (the BlockBackends the guests see):
//! block-export-add/del, query-block-exports, cont, and their statistics:
//! query-blockstats and block-latency-histogram-set.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::block::{BlockStats, HistogramKind, IoKind, LatencyHistogram};
use crate::config::{ExportConfig, ExportOptions};
use crate::opts;
use crate::qapi::{CommandDef, QmpError};
use crate::state::State;

pub static COMMANDS: &[CommandDef<Arc<State>>] = &[
    crate::command!("block-export-add", block_export_add),
    crate::command!("nbd-server-start", nbd_server_start),
    crate::command!("nbd-server-stop", nbd_server_stop, no_args),
    crate::command!("x-nbd-server-query", nbd_server_query, no_args),
    crate::command!("block-export-del", block_export_del),
    crate::command!("query-block-exports", query_block_exports, no_args),
    crate::command!("x-block-export-set-writethrough", set_writethrough),
    crate::command!("cont", cont, no_args),
    crate::command!("query-blockstats", query_blockstats),
    crate::command!("block-latency-histogram-set", histogram_set),
    crate::command!("x-blockdev-set-iothread", set_iothread),
];

/// x-blockdev-set-iothread (QEMU's `iothread` is a StrOrNull, required).
#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct SetIothread {
    node_name: String,
    #[serde(deserialize_with = "str_or_null")]
    iothread: Option<String>,
    #[serde(default, deserialize_with = "opts::bool")]
    force: bool,
}

fn str_or_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    match Value::deserialize(d)? {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s)),
        _ => Err(serde::de::Error::custom(
            "Invalid parameter type for 'iothread', expected: StrOrNull",
        )),
    }
}

/// Moves the exports on a node's graph component to another iothread
/// object (state/iothread.rs).
fn set_iothread(state: &Arc<State>, a: SetIothread) -> Result<(), QmpError> {
    state
        .set_iothread(&a.node_name, a.iothread.as_deref(), a.force)
        .map_err(QmpError::generic)
}

fn block_export_add(state: &Arc<State>, a: ExportOptions) -> Result<(), QmpError> {
    match a {
        ExportOptions::VhostUserBlk(o) => {
            let e = ExportConfig::try_from(o).map_err(|e| QmpError::generic(e.to_string()))?;
            state.add_export(&e).map_err(|e| QmpError::chain(&e))
        }
        ExportOptions::Nbd(o) => state.add_nbd_export(&o).map_err(|e| QmpError::chain(&e)),
    }
}

/// nbd-server-start: `addr` as QEMU's SocketAddressLegacy (`data`) or flat.
fn nbd_server_start(state: &Arc<State>, a: Value) -> Result<(), QmpError> {
    let o = crate::config::NbdServerOptions::from_json(&a).map_err(QmpError::generic)?;
    state.nbd_server_start(&o).map_err(|e| QmpError::chain(&e))
}

fn nbd_server_stop(state: &Arc<State>) -> Result<(), QmpError> {
    Ok(state.nbd_server_stop()?)
}

/// Where the NBD server listens (the port chosen for port 0): an extension.
fn nbd_server_query(state: &Arc<State>) -> Result<Value, QmpError> {
    Ok(match state.nbd_server_addr() {
        Some(a) => json!({ "running": true, "addr": a }),
        None => json!({ "running": false }),
    })
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
struct ExportDel {
    id: String,
    #[serde(default)]
    mode: RemoveMode,
}

fn block_export_del(state: &Arc<State>, a: ExportDel) -> Result<(), QmpError> {
    if let Some(r) = state.del_nbd_export(&a.id, a.mode == RemoveMode::Hard) {
        return Ok(r?);
    }
    Ok(state.del_export(&a.id, a.mode == RemoveMode::Hard)?)
}

fn query_block_exports(state: &Arc<State>) -> Result<Value, QmpError> {
    Ok(json!(state
        .export_list()
        .iter()
        .map(|e| json!({
            "type": "vhost-user-blk",
            "id": e.id,
            "node-name": e.node_name,
            "shutting-down": e.shutting_down,
            // The device's write cache now: the guest's choice (our
            // extension, x- as QEMU names them; a migration copies it to
            // the destination's export).
            "x-writethrough": !e.writeback,
            // The iothread object(s) the export runs as (QEMU shows a
            // node's or export's iothread nowhere): a name, a list
            // (multiqueue), or null; and its threads' ids (/proc/PID/task).
            "x-iothread": match e.iothreads.as_slice() {
                [] => Value::Null,
                [one] => json!(one),
                many => json!(many),
            },
            "x-thread-ids": e.thread_ids,
        }))
        .chain(state.nbd_export_list().iter().map(|e| json!({
            "type": "nbd",
            "id": e.id,
            "node-name": e.node_name,
            "shutting-down": false,
            "x-name": e.name,
            "x-clients": e.clients,
        })))
        .collect::<Vec<_>>()))
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct SetWritethrough {
    id: String,
    #[serde(deserialize_with = "opts::bool")]
    writethrough: bool,
}

/// x-block-export-set-writethrough: the export's `writethrough` option at
/// run time. It is the default of new connections and device resets, and
/// applies to the device now (going to write-through flushes first). A
/// live migration's destination gets the guest's choice this way: QEMU
/// does not send the write cache the guest chose to the destination's
/// backend, and the guest does not ask again.
fn set_writethrough(state: &Arc<State>, a: SetWritethrough) -> Result<(), QmpError> {
    let Some(e) = state.export(&a.id) else {
        return Err(QmpError::not_found(format!(
            "Export '{}' is not found",
            a.id
        )));
    };
    e.set_writethrough(a.writethrough).map_err(|err| {
        QmpError::generic(format!(
            "export '{}': flush before switching to write-through failed: {err}",
            a.id
        ))
    })?;
    log::info!(
        "export {}: write cache set to {} by the monitor",
        a.id,
        if a.writethrough {
            "write-through"
        } else {
            "write-back"
        }
    );
    Ok(())
}

/// cont: exports stopped by an error policy go on.
fn cont(state: &Arc<State>) -> Result<(), QmpError> {
    for e in state.export_states() {
        e.resume();
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct BlockStatsArgs {
    #[serde(default, deserialize_with = "opts::bool")]
    query_nodes: bool,
}

fn query_blockstats(state: &Arc<State>, a: BlockStatsArgs) -> Result<Value, QmpError> {
    Ok(block_stats(state, a.query_nodes))
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

fn histogram_set(state: &Arc<State>, a: HistogramSet) -> Result<(), QmpError> {
    let Some(e) = state.export(&a.id) else {
        return Err(QmpError::not_found(format!("Device '{}' not found", a.id)));
    };
    let pick = |specific: &Option<Vec<u64>>| specific.clone().or_else(|| a.boundaries.clone());
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
    Ok(())
}

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
