//! Inactive nodes (QEMU 10's `active` option and blockdev-set-active):
//! the handoff of an image between two processes in a live migration.
//!
//! ```text
//!   inactivate N   refuse: N has an active parent node; a user that writes
//!                  (a job, an export without allow-inactive) needs N or a
//!                  node below it
//!                  drained: parents before children, each flushed, its
//!                  driver writes back (qcow2: caches, bitmaps, clean
//!                  header), marked inactive; then the locks drop to a
//!                  reader's (another process may take the write lock)
//!   activate N     children first; each: the locks taken (fails with the
//!                  lock error), the driver reads the image again (page
//!                  cache, size, qcow2 metadata, bitmaps); on a failure the
//!                  nodes this call activated go back to inactive
//!                  exports whose capacity changed get a config change
//! ```

use std::sync::Arc;

use crate::block::{ChildRole, Node, Perm};

use super::{State, StateError};

/// Why a node cannot be inactivated or activated; QEMU's words first.
#[derive(Debug, thiserror::Error)]
pub enum ActiveError {
    #[error("Failed to find node with node-name='{0}'")]
    NotFound(String),
    /// QEMU's bdrv_inactivate.
    #[error("Node has active parent node")]
    ActiveParent,
    /// QEMU's "Failed to inactivate node: Operation not permitted", with
    /// who needs the node.
    #[error("Failed to inactivate node: Operation not permitted ({0})")]
    InUse(String),
    #[error("Failed to inactivate node: {0}")]
    Inactivate(String),
    /// Activation: the lock error of the file, or the driver's.
    #[error("{0}")]
    Activate(String),
}

/// Nodes in the order inactivation visits them (parents before children):
/// `tops` and every node below them whose node parents are all in the set
/// or inactive already (QEMU's bdrv_has_bds_parent: a node another active
/// node uses stays active).
fn inactivation_set(
    tops: &[Arc<Node>],
    is_node: &dyn Fn(&str) -> Option<Arc<Node>>,
) -> Vec<Arc<Node>> {
    let mut set: Vec<Arc<Node>> = Vec::new();
    for t in tops {
        if !set.iter().any(|s| Arc::ptr_eq(s, t)) {
            set.push(t.clone());
        }
    }
    let in_set = |set: &[Arc<Node>], n: &Arc<Node>| set.iter().any(|s| Arc::ptr_eq(s, n));
    loop {
        let candidates: Vec<Arc<Node>> = set
            .iter()
            .flat_map(|n| {
                n.children()
                    .iter()
                    .map(|c| c.node().clone())
                    .collect::<Vec<_>>()
            })
            .collect();
        let mut added = false;
        for c in candidates {
            if in_set(&set, &c) {
                continue;
            }
            let held = c.parent_links().iter().any(|(p, role, _, _)| {
                *role != ChildRole::Root
                    && is_node(p).is_some_and(|pn| pn.is_active() && !in_set(&set, &pn))
            });
            if !held {
                set.push(c);
                added = true;
            }
        }
        if !added {
            return set;
        }
    }
}

impl State {
    /// blockdev-set-active: `node` (or every node) made active or inactive.
    pub fn set_active(&self, node: Option<&str>, active: bool) -> Result<(), StateError> {
        let nodes: Vec<Arc<Node>> = match node {
            Some(name) => vec![self
                .graph()
                .get(name)
                .map_err(|_| ActiveError::NotFound(name.to_string()))?],
            None => {
                let g = self.graph();
                let all: Vec<Arc<Node>> = g.nodes().cloned().collect();
                // Inactivate all: the nodes no active node uses; the
                // rest follows them. Activate all: every node.
                all.iter()
                    .filter(|n| {
                        active
                            || n.parent_links().iter().all(|(p, role, _, _)| {
                                *role == ChildRole::Root
                                    || g.get(p).map_or(true, |pn| !pn.is_active())
                            })
                    })
                    .cloned()
                    .collect()
            }
        };
        if active {
            for n in &nodes {
                self.activate(n)?;
            }
            Ok(())
        } else {
            let set = self.inactivation_plan(&nodes)?;
            self.inactivate_set(&set)
        }
    }

    fn node_named(&self, name: &str) -> Option<Arc<Node>> {
        self.graph().get(name).ok()
    }

    /// Inactivates `top` and the nodes below it that only inactive nodes
    /// use; nothing changes when it is refused.
    pub fn inactivate(&self, top: &Arc<Node>) -> Result<(), StateError> {
        let set = self.inactivation_plan(std::slice::from_ref(top))?;
        self.inactivate_set(&set)
    }

    /// The nodes inactivating `tops` inactivates, in order, after the
    /// checks that refuse it (nothing changed then). Tops that are
    /// inactive already are left out (QEMU 10 accepts inactivating them).
    fn inactivation_plan(&self, tops: &[Arc<Node>]) -> Result<Vec<Arc<Node>>, StateError> {
        let tops: Vec<Arc<Node>> = tops.iter().filter(|t| t.is_active()).cloned().collect();
        let lookup = |p: &str| self.node_named(p);
        let in_tops = |n: &Arc<Node>| tops.iter().any(|t| Arc::ptr_eq(t, n));
        for top in &tops {
            let has_active_parent = top.parent_links().iter().any(|(p, role, _, _)| {
                *role != ChildRole::Root
                    && lookup(p).is_some_and(|pn| pn.is_active() && !in_tops(&pn))
            });
            if has_active_parent {
                return Err(ActiveError::ActiveParent.into());
            }
        }
        let set: Vec<Arc<Node>> = inactivation_set(&tops, &lookup)
            .into_iter()
            .filter(|n| n.is_active())
            .collect();
        // Users that write (QEMU's blk_root_inactivate refusing a
        // BlockBackend with write permission that is no device and was
        // not allowed to inactivate): exports without allow-inactive,
        // block jobs.
        let exports = self.export_states();
        for n in &set {
            for p in self.participants() {
                p.check_resize(n)
                    .map_err(|b| ActiveError::InUse(b.reason))?;
            }
            for (parent, role, perm, _) in n.parent_links() {
                if role != ChildRole::Root
                    || (perm & (Perm::WRITE | Perm::WRITE_UNCHANGED)).is_empty()
                {
                    continue;
                }
                let allowed = exports
                    .iter()
                    .any(|e| e.config.id == parent && e.config.allow_inactive);
                if !allowed {
                    let who = if exports.iter().any(|e| e.config.id == parent) {
                        format!(
                            "export '{parent}' writes to node '{}' and was added without allow-inactive",
                            n.name()
                        )
                    } else {
                        format!("'{parent}' writes to node '{}'", n.name())
                    };
                    return Err(ActiveError::InUse(who).into());
                }
            }
        }
        Ok(set)
    }

    /// Inactivates the planned nodes, parents first, in one drained
    /// section; the nodes marked inactive release their write locks even
    /// when a later one fails.
    fn inactivate_set(&self, set: &[Arc<Node>]) -> Result<(), StateError> {
        if set.is_empty() {
            return Ok(());
        }
        let mut marked: Vec<Arc<Node>> = Vec::new();
        let refs: Vec<&Node> = set.iter().map(|n| &**n).collect();
        let r = self.drained_many(&refs, || -> Result<(), ActiveError> {
            for n in set {
                futures::executor::block_on(n.flush()).map_err(|e| {
                    ActiveError::Inactivate(format!("flush of node '{}': {e}", n.name()))
                })?;
                n.driver_inactivate().map_err(ActiveError::Inactivate)?;
                n.set_active(false);
                marked.push(n.clone());
            }
            Ok(())
        });
        // A reader's lock only, children last (the format's edge to its
        // file shares writes now).
        for n in &marked {
            if let Err(e) = n.refresh_locks() {
                log::warn!("node {}: releasing the image locks: {e}", n.name());
            }
            log::info!("node {}: inactive", n.name());
        }
        r.map_err(Into::into)
    }

    /// Activates `node` and every node below it (children first): their
    /// locks taken, their images read again. Exports whose capacity
    /// changed meanwhile (resized by the other process) are told.
    pub fn activate(&self, node: &Arc<Node>) -> Result<(), StateError> {
        if !any_inactive(node) {
            return Ok(());
        }
        let exports = self.export_states();
        let before: Vec<u64> = exports.iter().map(|e| e.blk.node().size()).collect();
        let r = self.drained(node, || activate_tree(node));
        for (e, size) in exports.iter().zip(before) {
            if e.blk.node().size() != size {
                log::info!(
                    "export {}: capacity {size} -> {} bytes after activation",
                    e.config.id,
                    e.blk.node().size()
                );
                e.notify_config_change();
            }
        }
        r.map_err(Into::into)
    }
}

/// Whether `node` or a node below it is inactive.
pub(super) fn any_inactive(node: &Node) -> bool {
    !node.is_active() || node.children().iter().any(|c| any_inactive(c.node()))
}

/// Activates `node` and the nodes below it, children first; on an error
/// the nodes this call activated go back to inactive (parents first: a
/// format writes back through its file), so that a failed activation
/// leaves no write lock behind.
fn activate_tree(node: &Arc<Node>) -> Result<(), ActiveError> {
    let mut done: Vec<Arc<Node>> = Vec::new();
    let r = activate_recurse(node, &mut done);
    if r.is_err() {
        for n in done.iter().rev() {
            if let Err(e) = n.driver_inactivate() {
                log::warn!("node {}: back to inactive: {e}", n.name());
            }
            n.set_active(false);
            if let Err(e) = n.refresh_locks() {
                log::warn!("node {}: {e}", n.name());
            }
            log::info!("node {}: inactive again (the activation failed)", n.name());
        }
    }
    r
}

fn activate_recurse(node: &Arc<Node>, done: &mut Vec<Arc<Node>>) -> Result<(), ActiveError> {
    for c in node.children() {
        activate_recurse(c.node(), done)?;
    }
    if node.is_active() || done.iter().any(|d| Arc::ptr_eq(d, node)) {
        return Ok(());
    }
    node.set_active(true);
    if let Err(e) = node.refresh_locks() {
        node.set_active(false);
        if let Err(e) = node.refresh_locks() {
            log::warn!("node {}: {e}", node.name());
        }
        return Err(ActiveError::Activate(e));
    }
    if let Err(e) = node.driver_activate() {
        node.set_active(false);
        if let Err(e) = node.refresh_locks() {
            log::warn!("node {}: {e}", node.name());
        }
        return Err(ActiveError::Activate(e));
    }
    node.resize_bitmaps();
    done.push(node.clone());
    log::info!("node {}: active", node.name());
    Ok(())
}
