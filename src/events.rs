//! Asynchronous events (QMP's BLOCK_EXPORT_DELETED, BLOCK_WRITE_THRESHOLD,
//! ...). Emitting only queues the event; a delivery thread hands it to every
//! subscriber, so an iothread never waits for a slow monitor client.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex, OnceLock};

use serde_json::{json, Value};

type Sink = (u64, Box<dyn Fn(&Value) -> bool + Send>);

/// Subscribers of events; a sink that returns false is removed, and
/// [`EventBus::unsubscribe`] removes one (with whatever it holds, such as a
/// monitor client's socket) at once.
#[derive(Clone)]
pub struct EventBus {
    sinks: Arc<Mutex<Vec<Sink>>>,
    queue: Sender<Value>,
    next_id: Arc<AtomicU64>,
}

/// Names a subscription, for [`EventBus::unsubscribe`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SubscriptionId(u64);

impl Default for EventBus {
    fn default() -> Self {
        let sinks: Arc<Mutex<Vec<Sink>>> = Arc::default();
        let (queue, rx) = channel::<Value>();
        let deliver = sinks.clone();
        let spawned = crate::sandbox::spawn(
            crate::sandbox::Class::Helper,
            "vub-events".into(),
            move || {
                for ev in rx {
                    deliver
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .retain(|(_, s)| s(&ev));
                }
            },
        );
        if let Err(e) = spawned {
            log::error!("cannot start the event thread: {e}");
        }
        EventBus {
            sinks,
            queue,
            next_id: Arc::default(),
        }
    }
}

impl EventBus {
    pub fn subscribe(&self, sink: impl Fn(&Value) -> bool + Send + 'static) -> SubscriptionId {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.sinks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((id, Box::new(sink)));
        SubscriptionId(id)
    }

    /// Drops the sink `id` (if an event had not dropped it already).
    pub fn unsubscribe(&self, id: SubscriptionId) {
        self.sinks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(i, _)| *i != id.0);
    }

    /// Queues `name` with `data`, stamped with the current time.
    pub fn emit(&self, name: &str, data: Value) {
        let ev = stamped(name, data);
        log::debug!("event {ev}");
        let _ = self.queue.send(ev);
    }
}

/// An event with the current wall-clock time, as QEMU stamps them:
/// `{"event": NAME, "data": {..}, "timestamp": {"seconds": S, "microseconds": U}}`.
pub fn stamped(name: &str, data: Value) -> Value {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    json!({
        "event": name,
        "data": data,
        "timestamp": {"seconds": now.as_secs(), "microseconds": now.subsec_micros()}
    })
}

/// The daemon's event bus, reachable from the I/O path.
pub fn global() -> &'static EventBus {
    static BUS: OnceLock<EventBus> = OnceLock::new();
    BUS.get_or_init(EventBus::default)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_carry_a_timestamp() {
        let e = stamped("X", json!({"id": "e0"}));
        assert_eq!(e["event"], "X");
        assert_eq!(e["data"], json!({"id": "e0"}));
        assert!(e["timestamp"]["seconds"].as_u64().unwrap() > 1_600_000_000);
        assert!(e["timestamp"]["microseconds"].as_u64().unwrap() < 1_000_000);
    }
}
