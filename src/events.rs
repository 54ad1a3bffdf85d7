//! Asynchronous events (QMP's BLOCK_EXPORT_DELETED, BLOCK_WRITE_THRESHOLD,
//! ...). Emitting only queues the event; a delivery thread hands it to every
//! subscriber, so an iothread never waits for a slow monitor client.

use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex, OnceLock};

use serde_json::Value;

type Sink = Box<dyn Fn(&Value) -> bool + Send>;

/// Subscribers of events; a sink that returns false is removed.
#[derive(Clone)]
pub struct EventBus {
    sinks: Arc<Mutex<Vec<Sink>>>,
    queue: Sender<Value>,
}

impl Default for EventBus {
    fn default() -> Self {
        let sinks: Arc<Mutex<Vec<Sink>>> = Arc::default();
        let (queue, rx) = channel::<Value>();
        let deliver = sinks.clone();
        let spawned = std::thread::Builder::new()
            .name("vub-events".into())
            .spawn(move || {
                for ev in rx {
                    deliver
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .retain(|s| s(&ev));
                }
            });
        if let Err(e) = spawned {
            log::error!("cannot start the event thread: {e}");
        }
        EventBus { sinks, queue }
    }
}

impl EventBus {
    pub fn subscribe(&self, sink: impl Fn(&Value) -> bool + Send + 'static) {
        self.sinks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Box::new(sink));
    }

    /// Queues `name` with `data`, stamped with the current time.
    pub fn emit(&self, name: &str, data: Value) {
        let ev = crate::qmp::protocol::event(name, data);
        log::debug!("event {ev}");
        let _ = self.queue.send(ev);
    }
}

/// The daemon's event bus, reachable from the I/O path.
pub fn global() -> &'static EventBus {
    static BUS: OnceLock<EventBus> = OnceLock::new();
    BUS.get_or_init(EventBus::default)
}
