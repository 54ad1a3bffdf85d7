//! `transaction`: several snapshot, bitmap and backup actions as one.
//!
//! Every action is checked first (overlay files created and opened);
//! then all are performed inside one drained section of every node
//! involved, so the guest sees all of them or none. A failure undoes what
//! was done.

pub mod qmp;

use std::sync::Arc;

use crate::block::Node;
use crate::jobs::{BackupArgs, DriveBackupArgs, JobTxn};
use crate::qapi::QmpError;
use crate::snapshot::internal::PreparedInternal;
use crate::snapshot::{
    prepare_external, prepare_external_sync, CreatedOverlay, InternalArgs, PreparedExternal,
    SnapshotArgs, SnapshotSyncArgs,
};
use crate::state::State;

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
    /// Creates or opens a target file and starts a backup job into it.
    DriveBackup(crate::jobs::DriveBackupArgs),
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
            Action::DriveBackup(_) => "drive-backup",
            Action::Abort(_) => "abort",
        }
    }
}

/// An action that passed its checks, to be performed in the drained
/// section.
enum Prepared {
    External(PreparedExternal),
    Internal(PreparedInternal),
    Bitmap(crate::bitmaps::Prepared),
}

impl Prepared {
    fn node(&self) -> &Arc<Node> {
        match self {
            Prepared::External(p) => p.node(),
            Prepared::Internal(p) => p.node(),
            Prepared::Bitmap(b) => &b.node,
        }
    }

    /// Snapshots change what a node is; two of them on one node cannot
    /// be in one transaction. Bitmap commands can share a node.
    fn is_snapshot(&self) -> bool {
        !matches!(self, Prepared::Bitmap(_))
    }

    fn perform(&self) -> Result<(), QmpError> {
        match self {
            Prepared::Bitmap(b) => {
                b.perform();
                Ok(())
            }
            Prepared::External(x) => x.perform(),
            Prepared::Internal(p) => p.perform(),
        }
    }

    fn undo(&self) {
        match self {
            Prepared::Bitmap(b) => b.undo(),
            Prepared::External(x) => x.undo(),
            Prepared::Internal(p) => p.undo(),
        }
    }

    /// Checks one action (overlay files are created and opened here).
    fn of(
        state: &State,
        a: &Action,
        created: &mut Vec<CreatedOverlay>,
    ) -> Result<Prepared, QmpError> {
        use crate::bitmaps::{prepare_add, prepare_merge, prepare_named};
        match a {
            Action::BlockdevSnapshotSync(s) => prepare_external_sync(state, s).map(|(p, c)| {
                created.push(c);
                Prepared::External(p)
            }),
            Action::BlockdevSnapshot(s) => {
                prepare_external(state, &s.node, &s.overlay).map(Prepared::External)
            }
            Action::BlockdevSnapshotInternalSync(s) => {
                PreparedInternal::prepare(state, s).map(Prepared::Internal)
            }
            Action::BlockDirtyBitmapAdd(b) => prepare_add(state, b).map(Prepared::Bitmap),
            Action::BlockDirtyBitmapRemove(b) => {
                prepare_named(state, b, "remove").map(Prepared::Bitmap)
            }
            Action::BlockDirtyBitmapClear(b) => {
                prepare_named(state, b, "clear").map(Prepared::Bitmap)
            }
            Action::BlockDirtyBitmapEnable(b) => {
                prepare_named(state, b, "enable").map(Prepared::Bitmap)
            }
            Action::BlockDirtyBitmapDisable(b) => {
                prepare_named(state, b, "disable").map(Prepared::Bitmap)
            }
            Action::BlockDirtyBitmapMerge(b) => prepare_merge(state, b).map(Prepared::Bitmap),
            Action::Abort(_) => Err(QmpError::generic("Transaction aborted using Abort action")),
            Action::BlockdevBackup(_) | Action::DriveBackup(_) => {
                unreachable!("backups are not prepared")
            }
        }
    }
}

/// A backup action: started last, in the drained section.
#[derive(Clone)]
enum Backup {
    Blockdev(BackupArgs),
    Drive(DriveBackupArgs),
}

impl Backup {
    fn source(&self, state: &State) -> Result<Arc<Node>, QmpError> {
        match self {
            Backup::Blockdev(b) => crate::jobs::backup_source(state, b),
            Backup::Drive(b) => crate::jobs::drive_backup_source(state, b),
        }
    }

    fn start(&self, state: &Arc<State>, txn: Option<&Arc<JobTxn>>) -> Result<String, QmpError> {
        match self {
            Backup::Blockdev(b) => crate::jobs::backup_in(state, b.clone(), txn),
            Backup::Drive(b) => crate::jobs::drive_backup_in(state, b.clone(), txn),
        }
    }
}

/// A transaction on its way: the actions checked so far, the backups to
/// start last, the overlays made for it.
#[derive(Default)]
struct Plan {
    prepared: Vec<Prepared>,
    /// Backups start last, inside the same drained section, once every
    /// other action has been performed (a backup that cannot start undoes
    /// them all, and cancels the backups started before it).
    backups: Vec<(usize, Backup)>,
    created: Vec<CreatedOverlay>,
}

impl Plan {
    /// Checks action `i` and adds it to the plan.
    fn add(&mut self, state: &State, i: usize, a: &Action) -> Result<(), QmpError> {
        match a {
            Action::BlockdevBackup(b) => {
                self.backups.push((i, Backup::Blockdev(b.clone())));
                return Ok(());
            }
            Action::DriveBackup(b) => {
                self.backups.push((i, Backup::Drive(b.clone())));
                return Ok(());
            }
            _ => {}
        }
        let p = Prepared::of(state, a, &mut self.created)?;
        if self.adds_a_bitmap_twice(&p) {
            return Err(QmpError::generic(
                "Bitmap already exists (added earlier in this transaction)",
            ));
        }
        if p.is_snapshot()
            && self
                .prepared
                .iter()
                .any(|q| q.is_snapshot() && Arc::ptr_eq(q.node(), p.node()))
        {
            return Err(QmpError::generic(format!(
                "node '{}' is in the transaction twice",
                p.node().name()
            )));
        }
        self.prepared.push(p);
        Ok(())
    }

    fn adds_a_bitmap_twice(&self, p: &Prepared) -> bool {
        let Prepared::Bitmap(b) = p else {
            return false;
        };
        b.adds().is_some_and(|name| {
            self.prepared.iter().any(|q| match q {
                Prepared::Bitmap(o) => Arc::ptr_eq(&o.node, &b.node) && o.adds() == Some(name),
                _ => false,
            })
        })
    }

    /// Every node the transaction changes or backs up, once each.
    fn nodes(&self, state: &State) -> Vec<Arc<Node>> {
        let mut nodes: Vec<Arc<Node>> = Vec::new();
        let backed_up = self
            .backups
            .iter()
            .filter_map(|(_, b)| b.source(state).ok());
        let touched = self.prepared.iter().map(|p| p.node().clone());
        for n in touched.chain(backed_up) {
            if !nodes.iter().any(|m| Arc::ptr_eq(m, &n)) {
                nodes.push(n);
            }
        }
        nodes
    }

    /// Performs every action, then starts the backups; on a failure undoes
    /// what was done and names the failed action's index. The caller holds
    /// the nodes drained.
    fn perform(
        &self,
        state: &Arc<State>,
        txn: Option<&Arc<JobTxn>>,
    ) -> Result<(), (usize, QmpError)> {
        for (i, p) in self.prepared.iter().enumerate() {
            if let Err(e) = p.perform() {
                undo_all(&self.prepared[..i]);
                return Err((i, e));
            }
        }
        let mut started: Vec<String> = Vec::new();
        for (i, b) in &self.backups {
            match b.start(state, txn) {
                Ok(id) => started.push(id),
                Err(e) => {
                    match txn {
                        Some(t) => t.cancel_all(),
                        None => {
                            for id in &started {
                                let _ = crate::jobs::cancel_block(id, true);
                            }
                        }
                    }
                    if let Some(t) = txn {
                        t.seal();
                    }
                    undo_all(&self.prepared);
                    return Err((*i, e));
                }
            }
        }
        if let Some(t) = txn {
            t.seal();
        }
        Ok(())
    }

    /// After the drained section: what changed is told.
    fn announce(&self, state: &State) {
        for p in &self.prepared {
            match p {
                Prepared::External(x) => x.announce(state),
                Prepared::Internal(p) => p.announce(),
                Prepared::Bitmap(_) => {}
            }
        }
    }

    /// The transaction failed at action `i`: the overlays made for it go
    /// (after our references to them), and the error names the action.
    fn fail(self, state: &State, actions: &[Action], i: usize, e: QmpError) -> QmpError {
        let Plan {
            prepared, created, ..
        } = self;
        drop(prepared);
        for c in created.iter().rev() {
            c.remove(state);
        }
        if actions.len() == 1 {
            e
        } else {
            QmpError::new(
                e.class,
                format!("action {} ({}): {}", i + 1, actions[i].name(), e.desc),
            )
        }
    }
}

/// blockdev-snapshot-sync: creates (or opens) a qcow2 overlay file and puts
/// it on top of the node, as a transaction of one action.
pub fn snapshot_sync(state: &Arc<State>, a: &SnapshotSyncArgs) -> Result<(), QmpError> {
    transaction(state, vec![Action::BlockdevSnapshotSync(a.clone())])
}

/// `transaction`: every action is checked (overlay files created and
/// opened) first; then all are performed inside one drained section of
/// every node involved, so the guest sees all of them or none. If any
/// check or step fails, what was done is undone: performed snapshots are
/// reverted, overlays made for the transaction are closed and deleted.
pub fn transaction(state: &Arc<State>, actions: Vec<Action>) -> Result<(), QmpError> {
    transaction_with(state, actions, false)
}

/// `transaction`; with `grouped` (completion-mode grouped) the jobs it
/// starts finalize together, and fail together.
pub fn transaction_with(
    state: &Arc<State>,
    actions: Vec<Action>,
    grouped: bool,
) -> Result<(), QmpError> {
    let txn = grouped.then(|| Arc::new(JobTxn::default()));
    let mut plan = Plan::default();
    for (i, a) in actions.iter().enumerate() {
        if let Err(e) = plan.add(state, i, a) {
            return Err(plan.fail(state, &actions, i, e));
        }
    }
    let nodes = plan.nodes(state);
    let node_refs: Vec<&Node> = nodes.iter().map(|n| &**n).collect();
    let done = state.drained_many(&node_refs, || plan.perform(state, txn.as_ref()));
    drop(node_refs);
    drop(nodes);
    if let Err((i, e)) = done {
        return Err(plan.fail(state, &actions, i, e));
    }
    plan.announce(state);
    for c in &plan.created {
        c.hand_to_parents(state);
    }
    Ok(())
}

/// Undoes performed actions, last first.
fn undo_all(prepared: &[Prepared]) {
    for p in prepared.iter().rev() {
        p.undo();
    }
}
