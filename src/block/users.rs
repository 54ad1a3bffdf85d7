//! Graph surgery: the edges that point at a node from its users, moved
//! to another node all at once (QEMU's bdrv_replace_node). Snapshots put
//! an overlay in a node's place this way, jobs a filter or their target.

use std::sync::Arc;

use super::{BlockBackend, Child, ChildRole, GraphError, Node};

/// The edges that point at a node from its users: export roots and
/// parents in the graph (backing edges excepted: an image above keeps
/// reading what it read). `E` is what holds an export's root (the caller
/// gets its exports back from [`Users::exports`] to tell them).
pub struct Users<E> {
    exports: Vec<(E, Arc<BlockBackend>)>,
    parents: Vec<Arc<Node>>,
    /// Parents that keep their edge (a filter put on top of the node).
    except: Vec<String>,
}

impl<E> Users<E> {
    /// The users of `node` now among `nodes` (the graph's) and `exports`
    /// (each with the backend whose root may point at it), but the
    /// parents named in `except`.
    pub fn of<'a>(
        nodes: impl Iterator<Item = &'a Arc<Node>>,
        exports: Vec<(E, Arc<BlockBackend>)>,
        node: &Arc<Node>,
        except: &[&str],
    ) -> Users<E> {
        let parents = nodes
            .filter(|p| !except.contains(&p.name()))
            .filter(|p| {
                p.children()
                    .iter()
                    .any(|c| Arc::ptr_eq(c.node(), node) && c.role() != ChildRole::Backing)
            })
            .cloned()
            .collect();
        let exports = exports
            .into_iter()
            .filter(|(_, blk)| Arc::ptr_eq(blk.node(), node))
            .collect();
        Users {
            exports,
            parents,
            except: except.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn edges_to<'a>(&'a self, node: &'a Arc<Node>) -> Vec<&'a Child> {
        self.exports
            .iter()
            .map(|(_, blk)| blk.root())
            .chain(
                self.parents
                    .iter()
                    .flat_map(|p| p.children())
                    .filter(move |c| {
                        c.role() != ChildRole::Backing
                            && !self.except.iter().any(|x| x == c.parent())
                    }),
            )
            .filter(move |c| Arc::ptr_eq(c.node(), node))
            .collect()
    }

    /// Moves every edge from `from` to `to`; all or none. The caller holds
    /// both in a drained section.
    pub fn replace(&self, from: &Arc<Node>, to: &Arc<Node>) -> Result<(), GraphError> {
        let mut moved: Vec<&Child> = Vec::new();
        for c in self.edges_to(from) {
            if let Err(e) = c.replace_node(to.clone()) {
                for m in moved {
                    if let Err(e) = m.replace_node(from.clone()) {
                        log::error!("moving an edge back to {}: {e}", from.name());
                    }
                }
                return Err(e);
            }
            moved.push(c);
        }
        Ok(())
    }

    /// The exports among the users (to send config-change notices).
    pub fn exports(&self) -> impl Iterator<Item = &E> {
        self.exports.iter().map(|(e, _)| e)
    }
}
