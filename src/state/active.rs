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
//!                  lock error, the node stays inactive), the driver reads
//!                  the image again (size, qcow2 metadata, bitmaps)
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
/// `top` and every node below whose node parents all become inactive.
fn inactivation_set(
    top: &Arc<Node>,
    is_node: &dyn Fn(&str) -> Option<Arc<Node>>,
) -> Vec<Arc<Node>> {
    let mut set: Vec<Arc<Node>> = Vec::new();
    let mut queue = vec![top.clone()];
    while let Some(n) = queue.pop() {
        if set.iter().any(|s| Arc::ptr_eq(s, &n)) {
            continue;
        }
        // A node with another active parent node stays active (QEMU's
        // bdrv_has_bds_parent): it is reached from that parent.
        let active_parent = n.parent_links().iter().any(|(p, role, _, _)| {
            *role != ChildRole::Root
                && is_node(p)
                    .is_some_and(|pn| pn.is_active() && !set.iter().any(|s| Arc::ptr_eq(s, &pn)))
        });
        if active_parent && !Arc::ptr_eq(&n, top) {
            // Visited again once its other parents are in the set.
            continue;
        }
        set.push(n.clone());
        for c in n.children() {
            queue.push(c.node().clone());
        }
    }
    // A child seen before a second parent joined the set: look again.
    let mut changed = true;
    while changed {
        changed = false;
        let candidates: Vec<Arc<Node>> = set
            .iter()
            .flat_map(|n| {
                n.children()
                    .iter()
                    .map(|c| c.node().clone())
                    .collect::<Vec<_>>()
            })
            .collect();
        for c in candidates {
            if set.iter().any(|s| Arc::ptr_eq(s, &c)) {
                continue;
            }
            let active_parent = c.parent_links().iter().any(|(p, role, _, _)| {
                *role != ChildRole::Root
                    && is_node(p).is_some_and(|pn| {
                        pn.is_active() && !set.iter().any(|s| Arc::ptr_eq(s, &pn))
                    })
            });
            if !active_parent {
                set.push(c);
                changed = true;
            }
        }
    }
    set
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
                // Inactivate all: the top nodes (no node parent); the
                // rest follows them. Activate all: every node.
                all.iter()
                    .filter(|n| {
                        active
                            || n.parent_links().iter().all(|(p, role, _, _)| {
                                *role == ChildRole::Root || g.get(p).is_err()
                            })
                    })
                    .cloned()
                    .collect()
            }
        };
        for n in &nodes {
            if active {
                self.activate(n)?;
            } else {
                self.inactivate(n)?;
            }
        }
        Ok(())
    }

    fn node_named(&self, name: &str) -> Option<Arc<Node>> {
        self.graph().get(name).ok()
    }

    /// Inactivates `top` and the nodes below it that only inactive nodes
    /// use; nothing changes when it is refused.
    pub fn inactivate(&self, top: &Arc<Node>) -> Result<(), StateError> {
        if !top.is_active() {
            return Ok(());
        }
        let lookup = |p: &str| self.node_named(p);
        let has_active_parent = top.parent_links().iter().any(|(p, role, _, _)| {
            *role != ChildRole::Root && lookup(p).is_some_and(|pn| pn.is_active())
        });
        if has_active_parent {
            return Err(ActiveError::ActiveParent.into());
        }
        let set: Vec<Arc<Node>> = inactivation_set(top, &lookup)
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
        let refs: Vec<&Node> = set.iter().map(|n| &**n).collect();
        self.drained_many(&refs, || -> Result<(), ActiveError> {
            for n in &set {
                futures::executor::block_on(n.flush()).map_err(|e| {
                    ActiveError::Inactivate(format!("flush of node '{}': {e}", n.name()))
                })?;
                n.driver_inactivate().map_err(ActiveError::Inactivate)?;
                n.set_active(false);
            }
            Ok(())
        })?;
        // A reader's lock only, children last (the format's edge to its
        // file shares writes now).
        for n in &set {
            if let Err(e) = n.refresh_locks() {
                log::warn!("node {}: releasing the image locks: {e}", n.name());
            }
            log::info!("node {}: inactive", n.name());
        }
        Ok(())
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
        let r = self.drained(node, || activate_recurse(node));
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

fn activate_recurse(node: &Arc<Node>) -> Result<(), ActiveError> {
    for c in node.children() {
        activate_recurse(c.node())?;
    }
    if node.is_active() {
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
    log::info!("node {}: active", node.name());
    Ok(())
}
