//! x-blockdev-set-iothread: a node's graph component, and the exports on
//! it, moved to another iothread object (or to none) in a drained section.
//! QEMU moves every node connected to the named one, and the BlockBackends
//! on them follow; here the nodes have no thread of their own (a request
//! runs on the thread that issued it), so what moves is the exports whose
//! root is in the component: their threads (vhost_user/iothread.rs).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use super::State;
use crate::block::Node;
use crate::vhost_user::ExportState;

impl State {
    /// Moves the exports on `node_name`'s graph component to iothread
    /// object `iothread` (None: to none, QEMU's main context). Errors are
    /// QEMU 7.2's words where it has them.
    pub fn set_iothread(
        &self,
        node_name: &str,
        iothread: Option<&str>,
        force: bool,
    ) -> Result<(), String> {
        let component = {
            let graph = self.graph();
            let nodes: BTreeMap<String, Arc<Node>> = graph
                .nodes()
                .map(|n| (n.name().to_string(), n.clone()))
                .collect();
            if !nodes.contains_key(node_name) {
                return Err(format!("Failed to find node with node-name='{node_name}'"));
            }
            component(&nodes, node_name)
        };
        let exports: Vec<Arc<ExportState>> = self
            .export_states()
            .into_iter()
            .filter(|e| component.contains_key(e.blk.node().name()))
            .collect();
        // Protects against accidents (QEMU's words): a node an export
        // serves directly has a BlockBackend.
        let has_blk = exports.iter().any(|e| e.blk.node().name() == node_name)
            || self
                .nbd_export_list()
                .iter()
                .any(|e| e.node_name == node_name);
        if !force && has_blk {
            return Err(format!(
                "Node {node_name} is associated with a BlockBackend and could be in use \
                 (use force=true to override this check)"
            ));
        }
        let object = match iothread {
            Some(id) => Some(
                self.iothread(id)
                    .ok_or_else(|| format!("Cannot find iothread {id}"))?,
            ),
            None => None,
        };
        // An export with fixed-iothread refuses to move (QEMU:
        // blk_root_can_set_aio_ctx).
        if exports.iter().any(|e| e.config.fixed_iothread) {
            return Err("Cannot change iothread of active block backend".into());
        }
        if exports.is_empty() {
            return Ok(());
        }
        let names: Vec<String> = iothread.map(|s| vec![s.to_string()]).unwrap_or_default();
        let roots: Vec<Arc<Node>> = exports.iter().map(|e| e.blk.node().clone()).collect();
        let refs: Vec<&Node> = roots.iter().map(|n| &**n).collect();
        self.drained_many(&refs, || {
            for e in &exports {
                let n = e.in_flight().get();
                if n > 0 && e.is_stopped() {
                    // Requests parked by the `stop` policy stay in flight
                    // until `cont`; a thread hands over only once it has
                    // nothing in flight. (A request popped just as the
                    // drain began completes before its thread hands over.)
                    return Err(format!(
                        "export {}: stopped after an I/O error with {n} requests parked;                          'cont' first",
                        e.config.id
                    ));
                }
            }
            for e in &exports {
                let poll = if e.config.poll_max_ns_given {
                    e.config.poll_max_ns
                } else {
                    match &object {
                        Some(o) => o
                            .poll_max_ns
                            .unwrap_or(crate::config::IOTHREAD_DEFAULT_POLL_MAX_NS)
                            .min(1_000_000_000),
                        None => crate::config::export::DEFAULT_POLL_MAX_NS,
                    }
                };
                e.move_to(names.clone(), poll)?;
                log::info!(
                    "export {}: moved to {} (poll-max-ns {poll})",
                    e.config.id,
                    match iothread {
                        Some(id) => format!("iothread {id}"),
                        None => "no iothread".to_string(),
                    }
                );
            }
            Ok(())
        })
    }
}

/// The nodes connected to `start` by edges either way, by name.
fn component(nodes: &BTreeMap<String, Arc<Node>>, start: &str) -> BTreeMap<String, Arc<Node>> {
    let mut seen = BTreeSet::new();
    let mut todo = vec![start.to_string()];
    while let Some(name) = todo.pop() {
        let Some(node) = nodes.get(&name) else {
            continue;
        };
        if !seen.insert(name) {
            continue;
        }
        todo.extend(node.children().iter().map(|c| c.node().name().to_string()));
        todo.extend(node.parents());
    }
    seen.into_iter()
        .filter_map(|n| nodes.get(&n).map(|x| (n, x.clone())))
        .collect()
}
