//! blockdev-reopen: every listed node takes its new options together, in
//! one drained section, or none does. Prepare (open new descriptors, check
//! what may not change), check the final state (no writer above a node
//! made read-only, exports still aligned), then commit.

use std::sync::Arc;

use super::{ReopenError, State, StateError};
use crate::block::{ChildRole, Graph, Node};
use crate::drivers::{BlockdevOptions, PreparedReopen};
use crate::vhost_user::ExportState;

/// The listed nodes with their new options.
type Items<'a> = Vec<(Arc<Node>, &'a BlockdevOptions)>;

impl State {
    /// blockdev-reopen. What may change: `read-only`, `cache.*` and
    /// `discard` (file), `read-only` and `discard` (raw), `read-only` and
    /// `read-zeroes` (null-co), `read-only`, `backing`, `discard`,
    /// `pass-discard-request` and `lazy-refcounts` (qcow2).
    pub fn reopen(&self, list: &[BlockdevOptions]) -> Result<(), StateError> {
        let graph = self.graph();
        let items = reopen_items(&graph, list)?;
        // Prepare: open new descriptors, check what may not change.
        let mut prepared = items
            .iter()
            .map(|(node, o)| node.prepare_reopen(o, &graph).map_err(ReopenError::Driver))
            .collect::<Result<Vec<_>, _>>()?;
        let exports = self.export_states();
        check_writers(&graph, &items, &exports)?;
        check_alignment(&items, &prepared, &exports)?;
        drop(graph);
        let nodes: Vec<&Node> = items.iter().map(|(n, _)| &**n).collect();
        self.drained_many(&nodes, || -> Result<(), ReopenError> {
            // The steps that can fail first, all of them, undone if one
            // fails; then the commits, which cannot.
            for i in 0..prepared.len() {
                let node = &items[i].0;
                match prepared[i].apply(node) {
                    Ok(()) => {}
                    Err(e) => {
                        for j in (0..i).rev() {
                            prepared[j].undo(&items[j].0);
                        }
                        return Err(ReopenError::Driver(e));
                    }
                }
            }
            for ((node, _), p) in items.iter().zip(prepared) {
                p.commit(node);
                log::info!("node {}: reopened", node.name());
            }
            Ok(())
        })?;
        // A backing file opened from a header that lost its parent goes,
        // as QEMU closes it.
        self.graph().remove_orphans();
        Ok(())
    }
}

/// The listed nodes, each once, with a driver that does not change.
fn reopen_items<'a>(graph: &Graph, list: &'a [BlockdevOptions]) -> Result<Items<'a>, StateError> {
    let mut items: Items<'a> = Vec::new();
    for o in list {
        let node = graph.get(o.node_name())?;
        if node.driver_name() != o.driver_name() {
            return Err(ReopenError::DriverChange {
                node: node.name().to_string(),
                from: node.driver_name(),
                to: o.driver_name(),
            }
            .into());
        }
        if items.iter().any(|(n, _)| Arc::ptr_eq(n, &node)) {
            return Err(ReopenError::ListedTwice(node.name().to_string()).into());
        }
        items.push((node, o));
    }
    Ok(items)
}

/// Permissions in the final state: a read-only node keeps no writer.
fn check_writers(
    graph: &Graph,
    items: &Items<'_>,
    exports: &[Arc<ExportState>],
) -> Result<(), ReopenError> {
    // A child given by name keeps its options (QEMU reopens only the
    // nodes listed, and inline children): a qcow2 node made writable over
    // a read-only file node needs that node listed too.
    let final_ro = |n: &Node| -> bool {
        items
            .iter()
            .find(|(m, _)| std::ptr::eq(&**m, n))
            .map_or(n.is_read_only(), |(_, o)| o.read_only())
    };
    for node in graph.nodes() {
        for (parent, role, perm) in node.parent_perms() {
            let export = exports.iter().any(|e| e.config.id == parent);
            let writes = match role {
                ChildRole::Root if export => exports
                    .iter()
                    .any(|e| e.config.id == parent && e.config.writable),
                // A block job's edge: a target it writes.
                ChildRole::Root => perm.contains(crate::block::Perm::WRITE),
                // A backing edge only reads (QEMU's COW children): a
                // writable overlay keeps a read-only backing node.
                ChildRole::Backing => false,
                _ => graph.get(&parent).is_ok_and(|p| !final_ro(&p)),
            };
            if writes && final_ro(node) {
                let who = if role == ChildRole::Root && export {
                    format!("export '{parent}'")
                } else if role == ChildRole::Root {
                    format!("job '{parent}'")
                } else {
                    format!("node '{parent}' (make it read-only in the same blockdev-reopen)")
                };
                return Err(ReopenError::Writer {
                    node: node.name().to_string(),
                    who,
                });
            }
        }
    }
    Ok(())
}

/// Alignment: exports over a file node must still meet it.
fn check_alignment(
    items: &Items<'_>,
    prepared: &[PreparedReopen],
    exports: &[Arc<ExportState>],
) -> Result<(), ReopenError> {
    for ((node, _), p) in items.iter().zip(prepared) {
        if let Some(align) = p.request_alignment() {
            for e in exports {
                if e.blk.node().reaches(node) && e.config.logical_block_size % align != 0 {
                    return Err(ReopenError::Alignment {
                        node: node.name().to_string(),
                        align,
                        export: e.config.id.clone(),
                        lbs: e.config.logical_block_size,
                    });
                }
            }
        }
    }
    Ok(())
}
