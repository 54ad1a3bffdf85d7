//! The exports: bound to a node and checked, their servers started on a
//! thread each, deleted in the background, listed; and their half of
//! shutdown.

use std::path::PathBuf;
use std::sync::Arc;

use serde_json::json;

use super::{
    lock, ExportInfo, ExportRefusal, RunningExport, State, StateError, SHUTDOWN_DRAIN_TIMEOUT,
};
use crate::block::BlockBackend;
use crate::config::ExportConfig;
use crate::vhost_user::{ExportState, Server};

impl State {
    /// Validates an export against its node and opens its socket; the
    /// server does not run until [`State::start_export`].
    pub fn bind_export(&self, e: &ExportConfig) -> Result<Server, StateError> {
        let err = |reason: ExportRefusal| StateError::Export {
            export: e.id.clone(),
            reason,
        };
        if lock(&self.exports).contains_key(&e.id) {
            return Err(err(ExportRefusal::Exists));
        }
        // `iothread`: the named objects must exist; the export polls as
        // the first one does unless it says otherwise.
        let mut resolved = e.clone();
        for (i, name) in e.iothreads.iter().enumerate() {
            let t = self
                .iothread(name)
                .ok_or_else(|| err(ExportRefusal::NoIothread(name.clone())))?;
            if i == 0 && !e.poll_max_ns_given {
                resolved.poll_max_ns = t
                    .poll_max_ns
                    .unwrap_or(crate::config::IOTHREAD_DEFAULT_POLL_MAX_NS)
                    .min(1_000_000_000);
            }
        }
        let e = &resolved;
        let node = self.graph().get(&e.node_name)?;
        let align = node.request_alignment();
        if e.logical_block_size % align != 0 {
            return Err(err(ExportRefusal::Alignment {
                lbs: e.logical_block_size,
                align,
                node: node.name().to_string(),
            }));
        }
        if node.size() < u64::from(e.logical_block_size) {
            return Err(err(ExportRefusal::TooSmall {
                node: node.name().to_string(),
                size: node.size(),
                lbs: e.logical_block_size,
            }));
        }
        // QEMU 10's blk_exp_add: an export not allowed to serve an
        // inactive node activates it (and fails when it cannot).
        if !e.allow_inactive {
            self.activate(&node)?;
        }
        let blk = BlockBackend::new(&e.id, node, e.writable)?;
        let state = Arc::new(ExportState::new(e.clone(), Arc::new(blk), self.engine));
        let server = Server::bind(state)?;
        log::info!(
            "export {}: vhost-user-blk on {}, {} queues, {} iothreads{}, {}",
            e.id,
            match server.socket_path() {
                Some(p) => p.display().to_string(),
                None => format!("{:?}", e.addr),
            },
            e.num_queues,
            e.num_iothreads,
            if e.iothreads.is_empty() {
                String::new()
            } else {
                format!(
                    " (iothread {}, poll-max-ns {})",
                    e.iothreads.join(","),
                    e.poll_max_ns
                )
            },
            if e.writable { "writable" } else { "read-only" }
        );
        if let Some(p) = server.socket_path() {
            log::info!(
                "export {}: {}",
                e.id,
                crate::config::attach_hint(&e.id, p, e.num_queues)
            );
        }
        Ok(server)
    }

    /// Runs a bound export's server on its own thread.
    pub fn start_export(&self, server: Server) -> Result<(), StateError> {
        let id = server.export().config.id.clone();
        let mut running = RunningExport {
            state: server.export().clone(),
            control: server.control(),
            socket: server.socket_path().cloned(),
            shutting_down: false,
            thread: None,
        };
        running.thread = Some(
            crate::sandbox::spawn(
                crate::sandbox::Class::Control,
                format!("vub-accept-{id}"),
                move || server.run(),
            )
            .map_err(StateError::Thread)?,
        );
        lock(&self.exports).insert(id, running);
        Ok(())
    }

    /// block-export-add: bind and start.
    pub fn add_export(&self, e: &ExportConfig) -> Result<(), StateError> {
        let server = self.bind_export(e)?;
        self.start_export(server)
    }

    /// block-export-del. Without `hard`, refused while a frontend is
    /// connected. The export goes away in the background; BLOCK_EXPORT_DELETED
    /// says when.
    pub fn del_export(self: &Arc<Self>, id: &str, hard: bool) -> Result<(), StateError> {
        let (control, thread) = {
            let mut exports = lock(&self.exports);
            let Some(e) = exports.get_mut(id) else {
                return Err(StateError::ExportNotFound(id.to_string()));
            };
            if e.shutting_down {
                return Err(StateError::ExportShuttingDown(id.to_string()));
            }
            if !hard && e.control.is_connected() {
                return Err(StateError::ExportConnected(id.to_string()));
            }
            e.shutting_down = true;
            (e.control.clone(), e.thread.take())
        };
        control.stop(true);
        let state = self.clone();
        let id = id.to_string();
        let _ = crate::sandbox::spawn(
            crate::sandbox::Class::Monitor,
            "vub-export-del".into(),
            move || {
                // The server thread ends once the connection (if any) has
                // drained; with it go the socket file and its hold on the node.
                if let Some(t) = thread {
                    let _ = t.join();
                }
                lock(&state.exports).remove(&id);
                log::info!("export {id}: deleted");
                state
                    .events
                    .emit("BLOCK_EXPORT_DELETED", json!({ "id": id }));
            },
        );
        Ok(())
    }
    /// query-block-exports: every export, by id.
    pub fn export_list(&self) -> Vec<ExportInfo> {
        lock(&self.exports)
            .iter()
            .map(|(id, e)| ExportInfo {
                id: id.clone(),
                node_name: e.state.blk.node().name().to_string(),
                shutting_down: e.shutting_down,
                writeback: e.state.writeback(),
                iothreads: e.state.iothreads(),
                thread_ids: e.state.thread_ids(),
            })
            .collect()
    }

    /// The BlockBackends of the exports.
    pub fn export_backends(&self) -> Vec<Arc<BlockBackend>> {
        lock(&self.exports)
            .values()
            .map(|e| e.state.blk.clone())
            .collect()
    }

    /// The export named `id`.
    pub fn export(&self, id: &str) -> Option<Arc<ExportState>> {
        lock(&self.exports).get(id).map(|e| e.state.clone())
    }

    pub fn export_states(&self) -> Vec<Arc<ExportState>> {
        lock(&self.exports)
            .values()
            .map(|e| e.state.clone())
            .collect()
    }

    /// The socket files the exports listen on (removed at exit).
    pub fn socket_paths(&self) -> Vec<PathBuf> {
        lock(&self.exports)
            .values()
            .filter_map(|e| e.socket.clone())
            .collect()
    }

    /// Shutdown's half for the exports: quiesce, fail parked requests, wait
    /// for those in flight. Returns what did not reach the disk.
    pub(super) fn drain_exports_for_shutdown(&self) -> Vec<String> {
        let mut lost = Vec::new();
        let exports = self.export_states();
        for e in &exports {
            e.quiesce();
            e.abort_parked_for_shutdown();
        }
        for e in &exports {
            if !e.with_throttling_off(|| e.in_flight().wait_idle(SHUTDOWN_DRAIN_TIMEOUT)) {
                log::error!(
                    "export {}: {} requests still in flight after {:?}",
                    e.config.id,
                    e.in_flight().get(),
                    SHUTDOWN_DRAIN_TIMEOUT
                );
            }
        }
        for e in &exports {
            let d = e.dropped();
            if d.writes > 0 {
                let msg = format!(
                    "export {}: {} parked write request(s) dropped ({} bytes{}): \
                     the guest was told they failed; their data is not in the image",
                    e.config.id,
                    d.writes,
                    d.write_bytes,
                    d.first
                        .map(|f| format!(" at offsets {f}..{}", d.end))
                        .unwrap_or_default()
                );
                log::error!("{msg}");
                lost.push(msg);
            }
            if d.reads > 0 {
                log::warn!(
                    "export {}: {} parked read request(s) failed",
                    e.config.id,
                    d.reads
                );
            }
        }
        lost
    }
}
