//! drive-backup (QEMU's blockdev.c drive_backup_prepare): the target is a
//! file, created here (mode absolute-paths, over the source's backing
//! image for sync=top and over the source for sync=none, as QEMU creates
//! it) or opened (existing), as a node of its own with no name a user
//! gave (QEMU's implicit "#blockNNN"); then the same job as
//! blockdev-backup runs into it. The node goes when the job ends.
//!
//! The target's node is opened with `discard=unmap` and
//! `detect-zeroes=unmap`, as QEMU opens it. A qcow2 target is opened
//! without its backing chain (the job writes it and never reads it; its
//! header keeps naming the backing file), except for sync=none, where the
//! source becomes its backing node (fleecing, as QEMU's
//! bdrv_set_backing_hd).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::Deserialize;

use super::backup::{BackupArgs, BackupPerf, BitmapMode};
use super::mirror::{create_image, NewImageMode, SyncMode};
use super::{copy, OnError};
use crate::drivers::file::{self, Created};
use crate::drivers::probe::{probe_file, Probed};
use crate::qapi::QmpError;
use crate::state::State;

fn yes() -> bool {
    true
}

/// qapi DriveBackup.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct DriveBackupArgs {
    pub job_id: Option<String>,
    pub device: String,
    pub target: String,
    pub format: Option<String>,
    pub sync: SyncMode,
    #[serde(default)]
    pub mode: NewImageMode,
    #[serde(default)]
    pub speed: i64,
    pub bitmap: Option<String>,
    pub bitmap_mode: Option<BitmapMode>,
    #[serde(default)]
    pub compress: bool,
    #[serde(default)]
    pub on_source_error: OnError,
    #[serde(default)]
    pub on_target_error: OnError,
    #[serde(default = "yes")]
    pub auto_finalize: bool,
    #[serde(default = "yes")]
    pub auto_dismiss: bool,
    pub filter_node_name: Option<String>,
    pub x_perf: Option<BackupPerf>,
    pub discard_source: Option<bool>,
}

/// The implicit target nodes' names: QEMU's "#block" and a number (no
/// node-name a user gives may start with '#').
fn implicit_name() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    format!("#block-backup{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// The target file's format: given, or the source's when the file is
/// created, or probed from an existing file.
fn target_format(a: &DriveBackupArgs, source_format: &str) -> Result<String, QmpError> {
    let format = match (&a.format, a.mode) {
        (Some(f), _) => f.clone(),
        (None, NewImageMode::AbsolutePaths) => source_format.to_string(),
        (None, NewImageMode::Existing) => match probe_file(std::path::Path::new(&a.target)) {
            Ok(Probed::Qcow2) => "qcow2".into(),
            Ok(Probed::Raw) => "raw".into(),
            Ok(Probed::Other(f)) => f.to_string(),
            Err(e) => return Err(open_error(&a.target, e)),
        },
    };
    if a.mode == NewImageMode::Existing {
        // QEMU's words for a target that is not there (the node's open
        // would name the node, which QEMU's does not).
        std::fs::metadata(&a.target).map_err(|e| open_error(&a.target, e))?;
    }
    match format.as_str() {
        "qcow2" | "raw" => Ok(format),
        // Formats QEMU has and this daemon does not open or create.
        "luks" | "vmdk" | "vhdx" | "vpc" | "vdi" | "qed" | "qcow" | "parallels" | "bochs"
        | "cloop" | "dmg" => Err(QmpError::generic(format!(
            "format '{format}' is not supported; use qcow2 or raw"
        ))),
        _ => Err(QmpError::generic(format!("Unknown file format '{format}'"))),
    }
}

fn open_error(path: &str, e: std::io::Error) -> QmpError {
    let e = file::sandbox_hint(e, path);
    QmpError::generic(format!(
        "Could not open '{path}': {}",
        crate::block::os_text(&e)
    ))
}

/// drive-backup, alone or as a transaction's action: creates or opens the
/// target, then starts the backup; returns the job's id. On a failure the
/// target's node is closed again and a file made here is removed.
pub fn drive_backup_in(
    state: &Arc<State>,
    a: DriveBackupArgs,
    txn: Option<&Arc<super::JobTxn>>,
) -> Result<String, QmpError> {
    let source = copy::skip_filters(&copy::resolve(state, &a.device)?);
    super::check_id(&super::job_id(a.job_id.as_deref(), &a.device))?;
    super::check_not_busy(&source)?;
    let format = target_format(&a, copy::format_of(&source))?;
    // sync=top without a backing image is a full backup (QEMU's words:
    // there is nothing below the top to leave out).
    let mut sync = a.sync;
    let backing = match sync {
        SyncMode::Top => {
            let b = source.backing_node();
            if b.is_none() {
                sync = SyncMode::Full;
            }
            b
        }
        SyncMode::None => Some(source.clone()),
        _ => None,
    };
    let name = implicit_name();
    // The source becomes the target's backing image (sync=none): QEMU's
    // words from bdrv_img_create and bdrv_set_backing_hd.
    if sync == SyncMode::None && format != "qcow2" {
        return Err(QmpError::generic(match a.mode {
            NewImageMode::AbsolutePaths => {
                format!("Backing file not supported for file format '{format}'")
            }
            NewImageMode::Existing => {
                format!("Driver '{format}' of node '{name}' does not support backing files")
            }
        }));
    }
    for n in state.graph().nodes() {
        if n.protocol_file().is_some() && copy::names_file(n, &a.target) {
            return Err(QmpError::generic(format!(
                "'{}' is in use by node '{}'; choose another target file",
                a.target,
                n.name()
            )));
        }
    }
    let in_use = |dev, ino| file::node_using(&state.graph(), dev, ino, None);
    let created: Option<Created> = match a.mode {
        NewImageMode::AbsolutePaths => Some(create_image(
            state,
            &a.target,
            source.size(),
            &format,
            backing.as_ref(),
        )?),
        NewImageMode::Existing => None,
    };
    let mut opts = serde_json::json!({
        "driver": format,
        "node-name": name,
        "discard": "unmap",
        "detect-zeroes": "unmap",
        "file": {"driver": "file", "filename": a.target, "discard": "unmap"},
    });
    if format == "qcow2" {
        opts["backing"] = match sync {
            SyncMode::None => serde_json::Value::String(source.name().to_string()),
            _ => serde_json::Value::Null,
        };
    }
    let undo_create = || {
        if let Some(c) = &created {
            c.remove(&in_use);
        }
    };
    let opened = crate::drivers::BlockdevOptions::from_json(opts)
        .map_err(QmpError::generic)
        .and_then(|o| {
            state
                .add_blockdev(&o)
                .map_err(|e| QmpError::generic(e.to_string()))
        });
    if let Err(e) = opened {
        undo_create();
        return Err(e);
    }
    let b = BackupArgs {
        job_id: Some(super::job_id(a.job_id.as_deref(), &a.device)),
        device: a.device,
        target: name.clone(),
        sync,
        speed: a.speed,
        bitmap: a.bitmap,
        bitmap_mode: a.bitmap_mode,
        compress: a.compress,
        on_source_error: a.on_source_error,
        on_target_error: a.on_target_error,
        auto_finalize: a.auto_finalize,
        auto_dismiss: a.auto_dismiss,
        filter_node_name: a.filter_node_name,
        discard_source: a.discard_source,
        x_perf: a.x_perf,
    };
    match super::backup::start(state, b, txn, true) {
        Ok(id) => Ok(id),
        Err(e) => {
            if let Err(d) = state.del_blockdev(&name) {
                log::warn!("drive-backup: closing target node {name}: {d}");
            }
            undo_create();
            Err(e)
        }
    }
}

/// The node a drive-backup copies (for a transaction's drain).
pub fn drive_backup_source(
    state: &State,
    a: &DriveBackupArgs,
) -> Result<Arc<crate::block::Node>, QmpError> {
    Ok(copy::skip_filters(&copy::resolve(state, &a.device)?))
}
