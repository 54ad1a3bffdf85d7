//! The set of named nodes. Drivers are opened by the driver layer
//! (drivers/, whose `Graph::add` passes its opener to
//! [`Graph::insert_opened`]); the graph names none.
//!
//! Graph changes take the graph's lock; the I/O path never does (requests hold
//! `Arc<Node>`s directly).

use std::collections::BTreeMap;
use std::sync::Arc;

use super::{BlockDriver, GraphError, Node};
use crate::secret::Secret;
use crate::throttle::{ThrottleGroup, ThrottleLimits};

#[derive(Default)]
pub struct Graph {
    nodes: BTreeMap<String, Arc<Node>>,
    /// Nodes opened implicitly for a parent (inline children, backing files
    /// from image headers): removed with their last parent.
    implicit: std::collections::BTreeSet<String>,
    /// Throttle groups (`throttle-group` objects), by id.
    throttle_groups: BTreeMap<String, Arc<ThrottleGroup>>,
    /// `secret` objects, by id (rbd's key-secret).
    secrets: BTreeMap<String, Arc<Secret>>,
}

impl Graph {
    pub fn new() -> Self {
        Graph::default()
    }

    pub fn get(&self, name: &str) -> Result<Arc<Node>, GraphError> {
        self.nodes
            .get(name)
            .cloned()
            .ok_or_else(|| GraphError::NodeNotFound(name.to_string()))
    }

    pub fn nodes(&self) -> impl Iterator<Item = &Arc<Node>> {
        self.nodes.values()
    }

    /// Adds a node named `name` whose driver `open` opens (the driver
    /// layer's `Graph::add` passes its opener). `open` may add the
    /// node's children to the graph; they are removed again when it
    /// fails, or panics (a bug, such as a parser that trusts image
    /// content: an error like any other, not children left open).
    pub fn insert_opened(
        &mut self,
        name: &str,
        read_only: bool,
        open: impl FnOnce(&mut Graph) -> Result<Box<dyn BlockDriver>, GraphError>,
    ) -> Result<Arc<Node>, GraphError> {
        let name = name.to_string();
        if name.is_empty() {
            return Err(GraphError::Open {
                node: name,
                reason: "node-name is required".into(),
            });
        }
        if self.nodes.contains_key(&name) {
            return Err(GraphError::DuplicateNode(name));
        }
        let before: Vec<String> = self.nodes.keys().cloned().collect();
        let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| open(self)))
            .unwrap_or_else(|p| {
                let msg = p
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                log::error!("node {name}: opening panicked: {msg}");
                Err(GraphError::Open {
                    node: name.clone(),
                    reason: format!("internal error while opening: {msg}"),
                })
            });
        let driver = match opened {
            Ok(d) => d,
            Err(e) => {
                // Children opened for this node go with it.
                self.nodes.retain(|n, _| before.contains(n));
                self.implicit.retain(|n| before.contains(n));
                return Err(e);
            }
        };
        let node = Node::new(name.clone(), driver, read_only);
        self.nodes.insert(name, node.clone());
        Ok(node)
    }

    /// Marks a node as opened for a parent: it goes away with its last
    /// parent.
    pub fn mark_implicit(&mut self, name: &str) {
        self.implicit.insert(name.to_string());
    }

    /// Whether the node was opened for a parent (and goes with it).
    pub fn is_implicit(&self, name: &str) -> bool {
        self.implicit.contains(name)
    }

    pub fn secret(&self, id: &str) -> Option<Arc<Secret>> {
        self.secrets.get(id).cloned()
    }

    /// object-add of a secret (the caller checked the id is free).
    pub fn add_secret(&mut self, s: Secret) {
        self.secrets.insert(s.id().to_string(), Arc::new(s));
    }

    /// object-del of a secret: whether there was one.
    pub fn remove_secret(&mut self, id: &str) -> bool {
        self.secrets.remove(id).is_some()
    }

    pub fn throttle_group(&self, id: &str) -> Option<Arc<ThrottleGroup>> {
        self.throttle_groups.get(id).cloned()
    }

    pub fn throttle_groups(&self) -> impl Iterator<Item = &Arc<ThrottleGroup>> {
        self.throttle_groups.values()
    }

    /// object-add of a throttle group.
    pub fn add_throttle_group(&mut self, id: &str, limits: ThrottleLimits) -> Result<(), String> {
        if id.is_empty() {
            return Err("'id' must not be empty".into());
        }
        if self.throttle_groups.contains_key(id) {
            return Err(format!(
                "attempt to add duplicate property '{id}' to object (type 'container')"
            ));
        }
        let g = ThrottleGroup::new(id, limits)?;
        self.throttle_groups.insert(id.to_string(), g);
        Ok(())
    }

    /// object-del of a throttle group no node uses.
    pub fn remove_throttle_group(&mut self, id: &str) -> Result<(), String> {
        let g = self
            .throttle_groups
            .get(id)
            .ok_or_else(|| format!("object '{id}' not found"))?;
        if g.member_count() > 0 {
            return Err(format!(
                "throttle group '{id}' is in use by {} node(s)",
                g.member_count()
            ));
        }
        g.close();
        self.throttle_groups.remove(id);
        Ok(())
    }

    /// Removes a node that no parent uses any more (writing out what its
    /// driver caches), then the implicit nodes it leaves without a parent.
    pub fn remove(&mut self, name: &str) -> Result<(), GraphError> {
        let node = self.get(name)?;
        let parents = node.parents();
        if !parents.is_empty() {
            return Err(GraphError::InUse {
                node: name.to_string(),
                users: parents.join(", "),
            });
        }
        node.close();
        // Gone for good: its edges give up their permissions and locks now,
        // even if a replaced edge elsewhere still keeps the node in memory.
        node.release_children();
        self.nodes.remove(name);
        self.implicit.remove(name);
        drop(node);
        self.remove_orphans();
        Ok(())
    }

    /// Removes the implicit nodes that no parent uses any more (a backing
    /// file a reopen or a job left), and the ones they leave in turn.
    pub fn remove_orphans(&mut self) {
        loop {
            let orphan = self.implicit.iter().find(|n| {
                self.nodes
                    .get(*n)
                    .is_some_and(|node| node.parents().is_empty())
            });
            let Some(orphan) = orphan.cloned() else {
                break;
            };
            if let Some(node) = self.nodes.remove(&orphan) {
                node.close();
                node.release_children();
            }
            self.implicit.remove(&orphan);
        }
    }
}
