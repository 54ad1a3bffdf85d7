//! External snapshots: an overlay goes on top of a node while the guest
//! keeps writing.
//!
//! ```text
//!   before:  export --root--> base (qcow2, writable)
//!   after:   export --root--> overlay (qcow2) --backing--> base (read-only)
//! ```
//!
//! Every edge that pointed at the node (export roots, filters such as
//! throttle) is moved to the overlay inside one drained section, so no
//! request sees half of it; then the overlay takes the node as its backing
//! and the node becomes read-only. Any failure moves the edges back.

use std::os::unix::fs::MetadataExt;
use std::sync::Arc;

use crate::block::{Child, ChildRole, Node, Perm};
use crate::drivers::file::{self, Created};
use crate::drivers::{self, qcow2, BlockdevOptions, Driver};
use crate::state::State;

fn backing_format(node: &Node) -> Result<&'static str, String> {
    match node.driver() {
        Driver::Qcow2(_) => Ok("qcow2"),
        Driver::Raw(_) | Driver::File(_) => Ok("raw"),
        _ => Err(format!(
            "node '{}' ({}) cannot be the backing file of an image",
            node.name(),
            node.driver_name()
        )),
    }
}

/// An external snapshot that passed its checks, to be performed inside a
/// drained section.
pub struct PreparedExternal {
    node: Arc<Node>,
    overlay: Arc<Node>,
    overlay_name: String,
    /// The node's users: their edges move to the overlay.
    users: crate::jobs::Users,
}

/// Checks that `overlay` (a qcow2 node without a backing file that no one
/// uses) can go on top of `node`.
pub fn prepare_external(
    state: &State,
    node_name: &str,
    overlay_name: &str,
) -> Result<PreparedExternal, String> {
    let graph = state.graph();
    let node = graph.get(node_name).map_err(|e| e.to_string())?;
    // A job's writes and copies follow the node it started on.
    crate::jobs::check_not_busy(&node)?;
    let overlay = graph.get(overlay_name).map_err(|e| e.to_string())?;
    let Driver::Qcow2(q) = overlay.driver() else {
        return Err(format!(
            "the overlay '{overlay_name}' ({}) does not support backing files; use qcow2",
            overlay.driver_name()
        ));
    };
    if q.backing().is_some() {
        return Err(format!(
            "the overlay '{overlay_name}' already has a backing image"
        ));
    }
    if !overlay.parents().is_empty() {
        return Err(format!(
            "the overlay '{overlay_name}' is already in use by {}",
            overlay.parents().join(", ")
        ));
    }
    if overlay.is_read_only() {
        return Err(format!("the overlay '{overlay_name}' is read-only"));
    }
    if Arc::ptr_eq(&node, &overlay) || overlay.reaches(&node) || node.reaches(&overlay) {
        return Err(format!(
            "'{overlay_name}' cannot be an overlay of '{node_name}': one contains the other"
        ));
    }
    backing_format(&node)?;
    drop(graph);
    let users = crate::jobs::Users::of(state, &node, &[]);
    Ok(PreparedExternal {
        node,
        overlay,
        overlay_name: overlay_name.to_string(),
        users,
    })
}

impl PreparedExternal {
    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }

    /// Moves every edge to the overlay, gives it the node as backing, and
    /// makes the node read-only. The caller holds the node drained.
    pub fn perform(&self) -> Result<(), String> {
        let node = &self.node;
        self.users.replace(node, &self.overlay)?;
        let undo = || {
            if let Err(e) = self.users.replace(&self.overlay, node) {
                log::error!("snapshot: undoing an edge move: {e}");
            }
        };
        let backing = match Child::attach(
            &self.overlay_name,
            ChildRole::Backing,
            node.clone(),
            Perm::CONSISTENT_READ,
            Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED,
        ) {
            Ok(c) => c,
            Err(e) => {
                undo();
                return Err(e.to_string());
            }
        };
        let Driver::Qcow2(q) = self.overlay.driver() else {
            unreachable!("checked by prepare_external");
        };
        if let Err(e) = q.set_backing(backing) {
            undo();
            return Err(e);
        }
        // The old image is a backing image now.
        node.set_read_only(true);
        match node.driver() {
            Driver::Qcow2(b) => b.make_read_only(),
            Driver::Raw(r) => r.file().set_perm(Perm::CONSISTENT_READ, Perm::ALL),
            _ => {}
        }
        Ok(())
    }

    /// Undoes a performed snapshot (a later action of a transaction
    /// failed): the edges go back to the node, which is writable again.
    /// The overlay keeps its backing edge until it is deleted.
    pub fn undo(&self) {
        let node = &self.node;
        match node.driver() {
            Driver::Qcow2(b) => b.make_writable(),
            Driver::Raw(r) => r.file().set_perm(
                Perm::CONSISTENT_READ | Perm::WRITE,
                Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED,
            ),
            _ => {}
        }
        node.set_read_only(false);
        if let Err(e) = self.users.replace(&self.overlay, node) {
            log::error!("snapshot: undoing an edge move: {e}");
        }
    }

    fn announce(&self, state: &State) {
        log::info!(
            "snapshot: '{}' is now on top of '{}'",
            self.overlay_name,
            self.node.name()
        );
        for e in state.export_states() {
            if e.blk.node().reaches(&self.overlay) {
                e.notify_config_change();
            }
        }
    }
}

/// blockdev-snapshot: `overlay` goes on top of `node`.
pub fn external(state: &State, node_name: &str, overlay_name: &str) -> Result<(), String> {
    let p = prepare_external(state, node_name, overlay_name)?;
    state.drained(&p.node, || p.perform())?;
    p.announce(state);
    Ok(())
}

/// blockdev-snapshot-sync's `mode`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SnapshotMode {
    /// Create the overlay, with the node's file as its backing file.
    #[default]
    AbsolutePaths,
    /// The overlay file exists already.
    Existing,
}

/// blockdev-snapshot-sync's arguments.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct SnapshotSyncArgs {
    pub device: Option<String>,
    pub node_name: Option<String>,
    pub snapshot_file: String,
    pub snapshot_node_name: Option<String>,
    pub format: Option<String>,
    #[serde(default)]
    pub mode: SnapshotMode,
}

/// blockdev-snapshot's arguments.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotArgs {
    pub node: String,
    pub overlay: String,
}

/// blockdev-snapshot-internal-sync's arguments.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InternalArgs {
    pub device: String,
    pub name: String,
}

/// The node a `device` / `node-name` pair names.
fn device_or_node(
    state: &State,
    device: Option<&str>,
    node: Option<&str>,
) -> Result<String, String> {
    match (node, device) {
        (Some(n), None) => Ok(n.to_string()),
        (None, Some(d)) => match state.export(d) {
            Some(e) => Ok(e.blk.node().name().to_string()),
            None => Err(format!("Device '{d}' not found")),
        },
        _ => Err("exactly one of 'device' and 'node-name' is needed".into()),
    }
}

/// An overlay node (and file) made for blockdev-snapshot-sync: removed
/// again if the snapshot does not happen.
struct CreatedOverlay {
    node: String,
    /// The file, when this call created it (it did not exist before).
    file: Option<Created>,
}

impl CreatedOverlay {
    fn remove(&self, state: &State) {
        if let Err(e) = state.del_blockdev(&self.node) {
            log::warn!("snapshot: removing overlay node {}: {e}", self.node);
        }
        if let Some(f) = &self.file {
            f.remove(&|dev, ino| file::node_using(&state.graph(), dev, ino, None));
        }
    }
}

/// QEMU's bdrv_img_create refuses an image named as its backing file; it
/// compares the names, this compares the files too (another name, a
/// symlink).
fn check_not_backing(file: &str, backing: &str) -> Result<(), String> {
    let same = file == backing
        || matches!(
            (std::fs::metadata(file), std::fs::metadata(backing)),
            (Ok(a), Ok(b)) if (a.dev(), a.ino()) == (b.dev(), b.ino())
        );
    if same {
        return Err(
            "Error: Trying to create an image with the same filename as the backing file".into(),
        );
    }
    Ok(())
}

/// Creates (mode absolute-paths) or finds (existing) the overlay file of
/// blockdev-snapshot-sync, opens it, and checks the snapshot.
fn prepare_external_sync(
    state: &State,
    a: &SnapshotSyncArgs,
) -> Result<(PreparedExternal, CreatedOverlay), String> {
    let node_name = device_or_node(state, a.device.as_deref(), a.node_name.as_deref())?;
    let file = a.snapshot_file.as_str();
    if let Some(f) = &a.format {
        if f != "qcow2" {
            return Err(format!(
                "format '{f}' cannot have a backing file here; use qcow2"
            ));
        }
    }
    let node = state.graph().get(&node_name).map_err(|e| e.to_string())?;
    let overlay_name = match &a.snapshot_node_name {
        Some(n) => n.clone(),
        None => format!(
            "{node_name}-snapshot-{}",
            std::process::id() ^ rand_suffix()
        ),
    };
    if state.graph().get(&overlay_name).is_ok() {
        return Err(format!("node name '{overlay_name}' is already in use"));
    }
    let created = match a.mode {
        SnapshotMode::Existing => {
            if !std::path::Path::new(file).exists() {
                return Err(format!(
                    "snapshot file '{file}' does not exist (mode=existing)"
                ));
            }
            None
        }
        SnapshotMode::AbsolutePaths => {
            let backing = drivers::file_name_of(&node).ok_or_else(|| {
                format!("node '{node_name}' has no file name to use as a backing file")
            })?;
            let backing = std::fs::canonicalize(&backing)
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or(backing);
            check_not_backing(file, &backing)?;
            // A job's node is refused before anything is created.
            crate::jobs::check_not_busy(&node)?;
            let opts = qcow2::CreateOptions {
                size: node.size(),
                backing_file: Some(backing),
                backing_fmt: Some(backing_format(&node)?.to_string()),
                ..Default::default()
            };
            let in_use = |dev, ino| file::node_using(&state.graph(), dev, ino, None);
            let made = qcow2::create_in(file, &opts, &in_use)?;
            made.created().then_some(made)
        }
    };
    let opts: BlockdevOptions = serde_json::from_value(serde_json::json!({
        "driver": "qcow2",
        "node-name": overlay_name,
        "file": {"driver": "file", "filename": file},
        "backing": null,
    }))
    .map_err(|e| e.to_string())?;
    if let Err(e) = state.add_blockdev(&opts) {
        if let Some(c) = &created {
            c.remove(&|dev, ino| file::node_using(&state.graph(), dev, ino, None));
        }
        return Err(e.to_string());
    }
    let made = CreatedOverlay {
        node: overlay_name.clone(),
        file: created,
    };
    match prepare_external(state, &node_name, &overlay_name) {
        Ok(p) => Ok((p, made)),
        Err(e) => {
            made.remove(state);
            Err(e)
        }
    }
}

/// blockdev-snapshot-sync: creates (or opens) a qcow2 overlay file and puts
/// it on top of the node.
pub fn external_sync(state: &Arc<State>, a: &SnapshotSyncArgs) -> Result<(), String> {
    transaction(state, vec![Action::BlockdevSnapshotSync(a.clone())])
}

/// One action of a `transaction`.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(tag = "type", content = "data", rename_all = "kebab-case")]
pub enum Action {
    BlockdevSnapshotSync(SnapshotSyncArgs),
    BlockdevSnapshot(SnapshotArgs),
    BlockdevSnapshotInternalSync(InternalArgs),
    BlockDirtyBitmapAdd(crate::bitmaps::AddArgs),
    BlockDirtyBitmapRemove(crate::bitmaps::NameArgs),
    BlockDirtyBitmapClear(crate::bitmaps::NameArgs),
    BlockDirtyBitmapEnable(crate::bitmaps::NameArgs),
    BlockDirtyBitmapDisable(crate::bitmaps::NameArgs),
    BlockDirtyBitmapMerge(crate::bitmaps::MergeArgs),
    /// Starts a backup job at the transaction's instant.
    BlockdevBackup(crate::jobs::BackupArgs),
    /// Always fails (QEMU's, for testing the abort path).
    Abort(#[serde(default)] serde_json::Map<String, serde_json::Value>),
}

impl Action {
    fn name(&self) -> &'static str {
        match self {
            Action::BlockdevSnapshotSync(_) => "blockdev-snapshot-sync",
            Action::BlockdevSnapshot(_) => "blockdev-snapshot",
            Action::BlockdevSnapshotInternalSync(_) => "blockdev-snapshot-internal-sync",
            Action::BlockDirtyBitmapAdd(_) => "block-dirty-bitmap-add",
            Action::BlockDirtyBitmapRemove(_) => "block-dirty-bitmap-remove",
            Action::BlockDirtyBitmapClear(_) => "block-dirty-bitmap-clear",
            Action::BlockDirtyBitmapEnable(_) => "block-dirty-bitmap-enable",
            Action::BlockDirtyBitmapDisable(_) => "block-dirty-bitmap-disable",
            Action::BlockDirtyBitmapMerge(_) => "block-dirty-bitmap-merge",
            Action::BlockdevBackup(_) => "blockdev-backup",
            Action::Abort(_) => "abort",
        }
    }
}

enum Prepared {
    External(PreparedExternal),
    Internal { node: Arc<Node>, name: String },
    Bitmap(crate::bitmaps::Prepared),
}

impl Prepared {
    fn node(&self) -> &Arc<Node> {
        match self {
            Prepared::External(p) => p.node(),
            Prepared::Internal { node, .. } => node,
            Prepared::Bitmap(b) => &b.node,
        }
    }

    /// Snapshots change what a node is; two of them on one node cannot
    /// be in one transaction. Bitmap commands can share a node.
    fn is_snapshot(&self) -> bool {
        !matches!(self, Prepared::Bitmap(_))
    }
}

fn prepare_internal(state: &State, a: &InternalArgs) -> Result<Prepared, String> {
    let node = internal_target(state, &a.device)?;
    let Driver::Qcow2(q) = node.driver() else {
        unreachable!("internal_target returns qcow2 nodes");
    };
    if node.is_read_only() {
        return Err(format!("node '{}' is read-only", node.name()));
    }
    if a.name.is_empty() {
        return Err("the snapshot name must not be empty".into());
    }
    if q.snapshots().iter().any(|s| s.name == a.name) {
        return Err(format!(
            "a snapshot named '{}' already exists on node '{}'",
            a.name,
            node.name()
        ));
    }
    Ok(Prepared::Internal {
        node,
        name: a.name.clone(),
    })
}

/// `transaction`: every action is checked (overlay files created and
/// opened) first; then all are performed inside one drained section of
/// every node involved, so the guest sees all of them or none. If any
/// check or step fails, what was done is undone: performed snapshots are
/// reverted, overlays made for the transaction are closed and deleted.
pub fn transaction(state: &Arc<State>, actions: Vec<Action>) -> Result<(), String> {
    transaction_with(state, actions, false)
}

/// `transaction`; with `grouped` (completion-mode grouped) the jobs it
/// starts finalize together, and fail together.
pub fn transaction_with(
    state: &Arc<State>,
    actions: Vec<Action>,
    grouped: bool,
) -> Result<(), String> {
    let txn = grouped.then(|| Arc::new(crate::jobs::JobTxn::default()));
    let mut prepared: Vec<Prepared> = Vec::new();
    // Backups start last, inside the same drained section, once every
    // other action has been performed (a backup that cannot start undoes
    // them all, and cancels the backups started before it).
    let mut backups: Vec<(usize, crate::jobs::BackupArgs)> = Vec::new();
    let mut created: Vec<CreatedOverlay> = Vec::new();
    let fail = |created: &[CreatedOverlay], i: usize, what: &str, e: String| {
        for c in created.iter().rev() {
            c.remove(state);
        }
        if actions.len() == 1 {
            e
        } else {
            format!("action {} ({what}): {e}", i + 1)
        }
    };
    for (i, a) in actions.iter().enumerate() {
        let r = match a {
            Action::BlockdevSnapshotSync(s) => prepare_external_sync(state, s).map(|(p, c)| {
                created.push(c);
                Prepared::External(p)
            }),
            Action::BlockdevSnapshot(s) => {
                prepare_external(state, &s.node, &s.overlay).map(Prepared::External)
            }
            Action::BlockdevSnapshotInternalSync(s) => prepare_internal(state, s),
            Action::BlockDirtyBitmapAdd(b) => {
                crate::bitmaps::prepare_add(state, b).map(Prepared::Bitmap)
            }
            Action::BlockDirtyBitmapRemove(b) => {
                crate::bitmaps::prepare_named(state, b, "remove").map(Prepared::Bitmap)
            }
            Action::BlockDirtyBitmapClear(b) => {
                crate::bitmaps::prepare_named(state, b, "clear").map(Prepared::Bitmap)
            }
            Action::BlockDirtyBitmapEnable(b) => {
                crate::bitmaps::prepare_named(state, b, "enable").map(Prepared::Bitmap)
            }
            Action::BlockDirtyBitmapDisable(b) => {
                crate::bitmaps::prepare_named(state, b, "disable").map(Prepared::Bitmap)
            }
            Action::BlockDirtyBitmapMerge(b) => {
                crate::bitmaps::prepare_merge(state, b).map(Prepared::Bitmap)
            }
            Action::Abort(_) => Err("Transaction aborted using Abort action".into()),
            Action::BlockdevBackup(b) => {
                backups.push((i, b.clone()));
                continue;
            }
        };
        match r {
            Ok(p) => {
                let dup_bitmap = match &p {
                    Prepared::Bitmap(b) => b.adds().is_some_and(|name| {
                        prepared.iter().any(|q| match q {
                            Prepared::Bitmap(o) => {
                                Arc::ptr_eq(&o.node, &b.node) && o.adds() == Some(name)
                            }
                            _ => false,
                        })
                    }),
                    _ => false,
                };
                if dup_bitmap {
                    drop(p);
                    drop(prepared);
                    let e = "Bitmap already exists (added earlier in this transaction)".to_string();
                    return Err(fail(&created, i, a.name(), e));
                }
                if p.is_snapshot()
                    && prepared
                        .iter()
                        .any(|q| q.is_snapshot() && Arc::ptr_eq(q.node(), p.node()))
                {
                    let e = format!("node '{}' is in the transaction twice", p.node().name());
                    // Our references go before the overlays are removed.
                    drop(p);
                    drop(prepared);
                    return Err(fail(&created, i, a.name(), e));
                }
                prepared.push(p)
            }
            Err(e) => {
                drop(prepared);
                return Err(fail(&created, i, a.name(), e));
            }
        }
    }
    let mut nodes: Vec<Arc<Node>> = Vec::new();
    for p in &prepared {
        if !nodes.iter().any(|n| Arc::ptr_eq(n, p.node())) {
            nodes.push(p.node().clone());
        }
    }
    for (_, b) in &backups {
        if let Ok(n) = crate::jobs::backup_source(state, b) {
            if !nodes.iter().any(|m| Arc::ptr_eq(m, &n)) {
                nodes.push(n);
            }
        }
    }
    let node_refs: Vec<&Node> = nodes.iter().map(|n| &**n).collect();
    let done = state.drained_many(&node_refs, || -> Result<(), (usize, String)> {
        // Internal snapshots made so far, by index: (node, id) for undo.
        let mut made: Vec<(usize, String)> = Vec::new();
        for (i, p) in prepared.iter().enumerate() {
            let r = match p {
                Prepared::Bitmap(b) => {
                    b.perform();
                    Ok(())
                }
                Prepared::External(x) => x.perform(),
                Prepared::Internal { node, name } => {
                    let Driver::Qcow2(q) = node.driver() else {
                        unreachable!("checked in prepare");
                    };
                    futures::executor::block_on(q.snapshot_create(name, now()))
                        .map(|s| made.push((i, s.id)))
                        .map_err(|e| e.to_string())
                }
            };
            if let Err(e) = r {
                undo_all(&prepared[..i], &made);
                return Err((i, e));
            }
        }
        let mut started: Vec<String> = Vec::new();
        for (i, b) in &backups {
            match crate::jobs::backup_in(state, b.clone(), txn.as_ref()) {
                Ok(id) => started.push(id),
                Err(e) => {
                    match &txn {
                        Some(t) => t.cancel_all(),
                        None => {
                            for id in &started {
                                let _ = crate::jobs::cancel_block(id, true);
                            }
                        }
                    }
                    if let Some(t) = &txn {
                        t.seal();
                    }
                    undo_all(&prepared, &made);
                    return Err((*i, e));
                }
            }
        }
        if let Some(t) = &txn {
            t.seal();
        }
        Ok(())
    });
    drop(nodes);
    if let Err((i, e)) = done {
        drop(prepared);
        return Err(fail(&created, i, actions[i].name(), e));
    }
    for p in &prepared {
        match p {
            Prepared::External(x) => x.announce(state),
            Prepared::Internal { node, name } => {
                log::info!("node {}: internal snapshot '{name}' created", node.name());
            }
            Prepared::Bitmap(_) => {}
        }
    }
    Ok(())
}

/// Undoes performed actions, last first.
fn undo_all(prepared: &[Prepared], made: &[(usize, String)]) {
    for (j, q) in prepared.iter().enumerate().rev() {
        match q {
            Prepared::Bitmap(b) => b.undo(),
            Prepared::External(x) => x.undo(),
            Prepared::Internal { node, .. } => {
                let Driver::Qcow2(qd) = node.driver() else {
                    continue;
                };
                if let Some((_, id)) = made.iter().find(|(k, _)| *k == j) {
                    let r = qcow2::SnapshotRef {
                        id: Some(id),
                        name: None,
                    };
                    if let Err(e) = futures::executor::block_on(qd.snapshot_delete(&r)) {
                        log::error!("transaction: undoing snapshot {id}: {e}");
                    }
                }
            }
        }
    }
}

fn rand_suffix() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
}

/// The qcow2 node an internal snapshot command means by `device`: an
/// export's id or a node name, followed down through filters.
fn internal_target(state: &State, device: &str) -> Result<Arc<Node>, String> {
    let mut node = match state.export(device) {
        Some(e) => e.blk.node().clone(),
        None => state.graph().get(device).map_err(|_| {
            format!("Device '{device}' not found (neither an export id nor a node name)")
        })?,
    };
    loop {
        let next = match node.driver() {
            Driver::Qcow2(_) => {
                // A job's copies follow the image as it is.
                crate::jobs::check_not_busy(&node)?;
                return Ok(node);
            }
            Driver::Throttle(t) => t.file().node().clone(),
            Driver::CopyOnRead(c) => c.file().node().clone(),
            _ => {
                return Err(format!(
                    "node '{}' ({}) does not support internal snapshots",
                    node.name(),
                    node.driver_name()
                ))
            }
        };
        node = next;
    }
}

fn now() -> (u32, u32) {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (d.as_secs() as u32, d.subsec_nanos())
}

/// SnapshotInfo (qapi/block-core.json).
pub fn snapshot_info(s: &qcow2::Snapshot) -> serde_json::Value {
    serde_json::json!({
        "id": s.id, "name": s.name, "vm-state-size": s.vm_state_size,
        "date-sec": s.date_sec, "date-nsec": s.date_nsec,
        "vm-clock-sec": s.vm_clock_nsec / 1_000_000_000,
        "vm-clock-nsec": s.vm_clock_nsec % 1_000_000_000,
    })
}

/// blockdev-snapshot-internal-sync.
pub fn internal_create(state: &State, device: &str, name: &str) -> Result<qcow2::Snapshot, String> {
    let node = internal_target(state, device)?;
    let Driver::Qcow2(q) = node.driver() else {
        unreachable!("internal_target returns qcow2 nodes");
    };
    let s = state
        .drained(&node, || {
            futures::executor::block_on(q.snapshot_create(name, now()))
        })
        .map_err(|e| e.to_string())?;
    log::info!(
        "node {}: internal snapshot '{}' (id {}) created",
        node.name(),
        s.name,
        s.id
    );
    Ok(s)
}

/// blockdev-snapshot-delete-internal-sync.
pub fn internal_delete(
    state: &State,
    device: &str,
    id: Option<&str>,
    name: Option<&str>,
) -> Result<qcow2::Snapshot, String> {
    if id.is_none() && name.is_none() {
        return Err("one of 'id' and 'name' is needed".into());
    }
    let node = internal_target(state, device)?;
    let Driver::Qcow2(q) = node.driver() else {
        unreachable!("internal_target returns qcow2 nodes");
    };
    let r = qcow2::SnapshotRef { id, name };
    let s = state
        .drained(&node, || futures::executor::block_on(q.snapshot_delete(&r)))
        .map_err(|e| e.to_string())?;
    log::info!(
        "node {}: internal snapshot '{}' (id {}) deleted",
        node.name(),
        s.name,
        s.id
    );
    Ok(s)
}

/// Reverts a node to an internal snapshot: refused while anyone holds
/// write permission on it (an export writing it must be removed first).
pub fn internal_goto(
    state: &State,
    node_name: &str,
    id: Option<&str>,
    name: Option<&str>,
) -> Result<qcow2::Snapshot, String> {
    if id.is_none() && name.is_none() {
        return Err("one of 'id' and 'name' is needed".into());
    }
    let node = state.graph().get(node_name).map_err(|e| e.to_string())?;
    let Driver::Qcow2(q) = node.driver() else {
        return Err(format!(
            "node '{node_name}' ({}) has no internal snapshots",
            node.driver_name()
        ));
    };
    let writers: Vec<String> = node
        .parent_perms()
        .into_iter()
        .filter(|(_, _, p)| p.contains(Perm::WRITE))
        .map(|(n, _, _)| n)
        .collect();
    if !writers.is_empty() {
        return Err(format!(
            "node '{node_name}' is in use for writing by {}: detach it (block-export-del) before reverting",
            writers.join(", ")
        ));
    }
    let r = qcow2::SnapshotRef { id, name };
    let s = state
        .drained(&node, || {
            futures::executor::block_on(q.snapshot_goto(&node, &r))
        })
        .map_err(|e| e.to_string())?;
    log::info!(
        "node {node_name}: reverted to internal snapshot '{}' (id {})",
        s.name,
        s.id
    );
    for e in state.export_states() {
        if e.blk.node().reaches(&node) {
            e.notify_config_change();
        }
    }
    Ok(s)
}

/// change-backing-file: rewrites the backing file name recorded in
/// `image`, which must be in the backing chain of `device` (an export id
/// or a node name). The graph does not change.
pub fn change_backing_file(
    state: &State,
    device: &str,
    image: &str,
    backing_file: &str,
) -> Result<(), String> {
    let top = match state.export(device) {
        Some(e) => e.blk.node().clone(),
        None => state
            .graph()
            .get(device)
            .map_err(|_| format!("Device '{device}' not found"))?,
    };
    let node = state.graph().get(image).map_err(|e| e.to_string())?;
    if !top.reaches(&node) {
        return Err(format!(
            "node '{image}' is not in the backing chain of '{device}'"
        ));
    }
    let Driver::Qcow2(q) = node.driver() else {
        return Err(format!(
            "node '{image}' ({}) records no backing file name",
            node.driver_name()
        ));
    };
    q.change_backing_file(backing_file)?;
    log::info!("node {image}: backing file name set to '{backing_file}'");
    Ok(())
}
