//! Dirty bitmap commands (block-dirty-bitmap-add/remove/clear/enable/
//! disable/merge), as transaction actions too; their QMP handlers are in
//! `qmp.rs`.
//!
//! Each operation is split the way a transaction needs it: `prepare`
//! checks without changing anything; `perform` runs inside the drained
//! section and remembers what it changed; `undo` puts it back.

use std::cell::RefCell;
use std::sync::Arc;

use serde::Deserialize;

use crate::block::bitmap::DirtyBitmap;
use crate::block::Node;
use crate::qapi::QmpError;
use crate::state::State;

pub mod qmp;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddArgs {
    pub node: String,
    pub name: String,
    pub granularity: Option<u64>,
    #[serde(default)]
    pub persistent: bool,
    #[serde(default)]
    pub disabled: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NameArgs {
    pub node: String,
    pub name: String,
}

/// A merge source: a bitmap of the target's node, or of another node.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Source {
    Name(String),
    External { node: String, name: String },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MergeArgs {
    pub node: String,
    pub target: String,
    pub bitmaps: Vec<Source>,
}

/// A bitmap command, checked and ready to run.
pub enum Op {
    Add(Arc<DirtyBitmap>),
    Remove(Arc<DirtyBitmap>),
    Clear(Arc<DirtyBitmap>),
    Enable(Arc<DirtyBitmap>, bool),
    Merge(Arc<DirtyBitmap>, Vec<Arc<DirtyBitmap>>),
}

pub struct Prepared {
    pub node: Arc<Node>,
    op: Op,
    /// What perform changed: the list or bits before it.
    saved: RefCell<Option<Saved>>,
}

enum Saved {
    List(Vec<Arc<DirtyBitmap>>),
    Bits(Vec<u64>),
    Enabled(bool),
}

fn node(state: &State, name: &str) -> Result<Arc<Node>, QmpError> {
    state
        .graph()
        .get(name)
        .map_err(|_| QmpError::generic(format!("Node '{name}' not found")))
}

pub fn find(node: &Node, name: &str) -> Result<Arc<DirtyBitmap>, QmpError> {
    node.bitmaps()
        .iter()
        .find(|b| b.name() == name)
        .cloned()
        .ok_or_else(|| {
            QmpError::generic(format!(
                "Dirty bitmap '{name}' not found on node '{}'",
                node.name()
            ))
        })
}

/// A bitmap a job uses (a backup's) cannot be changed meanwhile.
fn refuse_busy(b: &DirtyBitmap) -> Result<(), QmpError> {
    if b.is_busy() {
        return Err(QmpError::generic(format!(
            "Bitmap '{}' is currently in use by another operation and cannot be used",
            b.name()
        )));
    }
    Ok(())
}

fn default_granularity(node: &Node) -> u64 {
    node.cluster_size()
        .map_or(65536, |c| c.clamp(4096, 1 << 31))
}

pub fn prepare_add(state: &State, a: &AddArgs) -> Result<Prepared, QmpError> {
    let n = node(state, &a.node)?;
    let refuse = |desc: String| Err(QmpError::generic(desc));
    if a.name.is_empty() {
        return refuse("the bitmap name must not be empty".into());
    }
    if a.name.len() > 1023 {
        return refuse("the bitmap name is longer than 1023 bytes".into());
    }
    if n.bitmaps().iter().any(|b| b.name() == a.name) {
        return refuse(format!("Bitmap already exists: {}", a.name));
    }
    if a.persistent {
        if let Err(e) = n.ensure_active() {
            return refuse(e);
        }
    }
    if a.persistent && !n.can_store_bitmaps() {
        return refuse(format!(
            "node '{}' cannot store persistent bitmaps (a writable qcow2 v3 image can)",
            a.node
        ));
    }
    let g = a.granularity.unwrap_or_else(|| default_granularity(&n));
    let b = DirtyBitmap::new(&a.name, n.size(), g, !a.disabled, a.persistent)
        .map_err(QmpError::generic)?;
    Ok(Prepared::new(n, Op::Add(Arc::new(b))))
}

/// `kind` is "remove", "clear", "enable" or "disable".
pub fn prepare_named(state: &State, a: &NameArgs, kind: &str) -> Result<Prepared, QmpError> {
    let n = node(state, &a.node)?;
    let b = find(&n, &a.name)?;
    refuse_busy(&b)?;
    let op = match kind {
        "remove" => Op::Remove(b),
        "clear" => Op::Clear(b),
        "enable" => Op::Enable(b, true),
        "disable" => Op::Enable(b, false),
        _ => {
            return Err(QmpError::generic(format!(
                "unknown bitmap operation {kind}"
            )))
        }
    };
    Ok(Prepared::new(n, op))
}

pub fn prepare_merge(state: &State, a: &MergeArgs) -> Result<Prepared, QmpError> {
    let n = node(state, &a.node)?;
    let target = find(&n, &a.target)?;
    refuse_busy(&target)?;
    let mut sources = Vec::new();
    for s in &a.bitmaps {
        let b = match s {
            Source::Name(name) => find(&n, name)?,
            Source::External { node: sn, name } => find(&*node(state, sn)?, name)?,
        };
        sources.push(b);
    }
    Ok(Prepared::new(n, Op::Merge(target, sources)))
}

impl Prepared {
    fn new(node: Arc<Node>, op: Op) -> Prepared {
        Prepared {
            node,
            op,
            saved: RefCell::new(None),
        }
    }

    /// The name of the bitmap this adds, if it adds one.
    pub fn adds(&self) -> Option<&str> {
        match &self.op {
            Op::Add(b) => Some(b.name()),
            _ => None,
        }
    }

    /// Runs the operation (inside the drained section).
    pub fn perform(&self) {
        let saved = match &self.op {
            Op::Add(b) => {
                let before = self.node.bitmaps().to_vec();
                let mut list = before.clone();
                list.push(b.clone());
                self.node.set_bitmaps(list);
                Saved::List(before)
            }
            Op::Remove(b) => {
                let before = self.node.bitmaps().to_vec();
                let list = before
                    .iter()
                    .filter(|x| !Arc::ptr_eq(x, b))
                    .cloned()
                    .collect();
                self.node.set_bitmaps(list);
                Saved::List(before)
            }
            Op::Clear(b) => {
                let bits = b.snapshot();
                b.clear();
                Saved::Bits(bits)
            }
            Op::Enable(b, on) => {
                let was = b.is_enabled();
                b.set_enabled(*on);
                Saved::Enabled(was)
            }
            Op::Merge(t, sources) => {
                let bits = t.snapshot();
                for s in sources {
                    t.merge_from(s);
                }
                Saved::Bits(bits)
            }
        };
        *self.saved.borrow_mut() = Some(saved);
    }

    /// Puts back what perform changed.
    pub fn undo(&self) {
        let Some(saved) = self.saved.borrow_mut().take() else {
            return;
        };
        match (&self.op, saved) {
            (_, Saved::List(list)) => self.node.set_bitmaps(list),
            (Op::Clear(b) | Op::Merge(b, _), Saved::Bits(bits)) => b.restore(&bits),
            (Op::Enable(b, _), Saved::Enabled(was)) => b.set_enabled(was),
            _ => {}
        }
    }
}
