//! Asynchronous events (QMP's BLOCK_EXPORT_DELETED and friends): a list of
//! subscribers that each receive every event. Emitting never blocks on a
//! slow subscriber: sinks must not block.

use std::sync::{Arc, Mutex};

use serde_json::Value;

type Sink = Box<dyn Fn(&Value) -> bool + Send>;

/// Subscribers of events; a sink that returns false is removed.
#[derive(Clone, Default)]
pub struct EventBus {
    sinks: Arc<Mutex<Vec<Sink>>>,
}

impl EventBus {
    pub fn subscribe(&self, sink: impl Fn(&Value) -> bool + Send + 'static) {
        self.sinks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Box::new(sink));
    }

    /// Sends `name` with `data`, stamped with the current time.
    pub fn emit(&self, name: &str, data: Value) {
        let ev = crate::qmp::protocol::event(name, data);
        log::debug!("event {ev}");
        self.sinks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|s| s(&ev));
    }
}
