//! The set of named nodes, and opening nodes from their options.
//!
//! Graph changes take the graph's lock; the I/O path never does (requests hold
//! `Arc<Node>`s directly).

use std::collections::BTreeMap;
use std::sync::Arc;

use super::{GraphError, Node};
use crate::drivers::{BlockdevOptions, Driver};

#[derive(Default)]
pub struct Graph {
    nodes: BTreeMap<String, Arc<Node>>,
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

    /// Opens a node from `opts` (children are looked up by name) and adds it.
    pub fn add(&mut self, opts: &BlockdevOptions) -> Result<Arc<Node>, GraphError> {
        let name = opts.node_name().to_string();
        if name.is_empty() {
            return Err(GraphError::Open {
                node: name,
                reason: "node-name is required".into(),
            });
        }
        if self.nodes.contains_key(&name) {
            return Err(GraphError::DuplicateNode(name));
        }
        let read_only = opts.read_only();
        let driver = Driver::open(opts, self)?;
        let node = Node::new(name.clone(), driver, read_only);
        self.nodes.insert(name, node.clone());
        Ok(node)
    }

    /// Removes a node that no parent uses any more.
    pub fn remove(&mut self, name: &str) -> Result<Arc<Node>, GraphError> {
        let node = self.get(name)?;
        let parents = node.parents();
        if !parents.is_empty() {
            return Err(GraphError::InUse {
                node: name.to_string(),
                users: parents.join(", "),
            });
        }
        self.nodes.remove(name);
        Ok(node)
    }
}
