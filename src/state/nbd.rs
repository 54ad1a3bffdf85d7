//! The NBD server and its exports (`--nbd-server`, nbd-server-start/stop,
//! block-export-add type=nbd): one server per process, as in QEMU; its
//! exports share block-export ids with the vhost-user ones.

use std::sync::Arc;

use serde_json::json;

use super::{lock, State, StateError, SHUTDOWN_DRAIN_TIMEOUT};
use crate::config::{NbdExportOptions, NbdServerOptions};
use crate::nbd::{Export, ExportSpec, NbdServer, ServerError};

/// What query-block-exports shows of an NBD export.
pub struct NbdExportInfo {
    pub id: String,
    pub node_name: String,
    pub name: String,
    pub clients: usize,
}

impl State {
    /// nbd-server-start / --nbd-server.
    pub fn nbd_server_start(&self, o: &NbdServerOptions) -> Result<(), StateError> {
        let mut slot = lock(&self.nbd);
        if slot.is_some() {
            return Err(ServerError::Running.into());
        }
        if o.tls_authz.is_some() {
            return Err(StateError::Object(
                "tls-authz: authorization objects are not supported (the client certificate is checked against the CA of tls-creds with verify-peer=on)".into(),
            ));
        }
        let tls =
            match &o.tls_creds {
                None => None,
                Some(id) => Some(lock(&self.tls_creds).get(id).cloned().ok_or_else(|| {
                    StateError::Object(format!("No TLS credentials with id '{id}'"))
                })?),
            };
        let with_tls = tls.is_some();
        let server = NbdServer::bind(o.addr.clone(), o.max_connections, tls)?;
        log::info!(
            "NBD server listening on {}{}",
            server.local_addr(),
            if with_tls { " (TLS required)" } else { "" }
        );
        *slot = Some(server);
        Ok(())
    }

    /// --object / object-add tls-creds-x509: loaded now (the files are read
    /// once; a server started later uses what was loaded).
    pub(super) fn add_tls_creds(
        &self,
        t: &crate::config::TlsCredsX509Options,
    ) -> Result<(), StateError> {
        let endpoint = t.endpoint.as_deref().unwrap_or("client");
        if endpoint != "server" {
            return Err(StateError::Object(format!(
                "tls-creds-x509 '{}': endpoint={endpoint} is not supported (the NBD server needs endpoint=server)",
                t.id
            )));
        }
        let creds =
            crate::nbd::server::tls::TlsCreds::load(&t.id, &t.dir, t.verify_peer.unwrap_or(true))
                .map_err(StateError::Object)?;
        let mut map = lock(&self.tls_creds);
        if map.contains_key(&t.id) || lock(&self.iothreads).contains_key(&t.id) {
            return Err(StateError::Object(format!(
                "attempt to add duplicate property '{}' to object (type 'container')",
                t.id
            )));
        }
        log::info!(
            "tls-creds-x509 {}: loaded from {}, verify-peer {}",
            t.id,
            t.dir.display(),
            if creds.verify_peer { "on" } else { "off" }
        );
        map.insert(t.id.clone(), creds);
        Ok(())
    }

    /// object-del of TLS credentials; false if `id` names none.
    pub fn del_tls_creds(&self, id: &str) -> bool {
        lock(&self.tls_creds).remove(id).is_some()
    }

    /// Where the NBD server listens (the port the kernel chose for port 0).
    pub fn nbd_server_addr(&self) -> Option<String> {
        lock(&self.nbd).as_ref().map(|s| s.local_addr())
    }

    /// nbd-server-stop: its clients disconnected, its exports deleted.
    pub fn nbd_server_stop(&self) -> Result<(), StateError> {
        let server = lock(&self.nbd).take().ok_or(ServerError::NotRunning)?;
        for e in server.stop() {
            self.nbd_export_gone(&e);
        }
        Ok(())
    }

    fn nbd_export_gone(&self, e: &Export) {
        log::info!("export {}: deleted", e.id);
        self.events
            .emit("BLOCK_EXPORT_DELETED", json!({ "id": e.id }));
    }

    /// block-export-add type=nbd / --export type=nbd.
    pub fn add_nbd_export(&self, o: &NbdExportOptions) -> Result<(), StateError> {
        let server = lock(&self.nbd);
        let server = server.as_ref().ok_or(ServerError::NotRunning)?;
        if lock(&self.exports).contains_key(&o.id) || server.export_by_id(&o.id).is_some() {
            return Err(StateError::Export {
                export: o.id.clone(),
                reason: super::ExportRefusal::Exists,
            });
        }
        let node = self.graph().get(&o.node_name)?;
        let bitmaps = o.bitmap_names().map_err(StateError::Object)?;
        let e = Export::new(ExportSpec {
            id: o.id.clone(),
            name: o.name.clone().unwrap_or_else(|| o.node_name.clone()),
            description: o.description.clone(),
            writable: o.writable,
            bitmaps,
            allocation_depth: o.allocation_depth,
            node,
        })?;
        server.add_export(e)?;
        Ok(())
    }

    /// block-export-del of an NBD export; None if `id` is not one.
    pub fn del_nbd_export(&self, id: &str, hard: bool) -> Option<Result<(), StateError>> {
        let guard = lock(&self.nbd);
        let server = guard.as_ref()?;
        let e = server.export_by_id(id)?;
        if !hard && e.clients.load(std::sync::atomic::Ordering::Relaxed) > 0 {
            return Some(Err(StateError::ExportConnected(id.to_string())));
        }
        let removed = server.remove_export(id, hard);
        drop(guard);
        if let Some(e) = removed {
            self.nbd_export_gone(&e);
        }
        Some(Ok(()))
    }

    pub fn nbd_export_list(&self) -> Vec<NbdExportInfo> {
        lock(&self.nbd)
            .as_ref()
            .map(|s| {
                s.exports()
                    .iter()
                    .map(|e| NbdExportInfo {
                        id: e.id.clone(),
                        node_name: e.blk.node().name().to_string(),
                        name: e.name.clone(),
                        clients: e.clients.load(std::sync::atomic::Ordering::Relaxed),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The NBD exports' backends (query-blockstats, drains).
    pub fn nbd_backends(&self) -> Vec<Arc<crate::block::BlockBackend>> {
        lock(&self.nbd)
            .as_ref()
            .map(|s| s.exports().iter().map(|e| e.blk.clone()).collect())
            .unwrap_or_default()
    }

    /// Drained sections: NBD requests on a node the change touches wait.
    pub(super) fn nbd_drain_begin(&self, nodes: &[&crate::block::Node]) -> bool {
        let touches = self
            .nbd_backends()
            .iter()
            .any(|b| nodes.iter().any(|n| b.node().reaches(n)));
        if touches && !crate::nbd::server::gate().drain_begin(SHUTDOWN_DRAIN_TIMEOUT) {
            log::error!(
                "NBD server: requests still in flight after {SHUTDOWN_DRAIN_TIMEOUT:?}; going on"
            );
        }
        touches
    }

    /// Shutdown: the server stops before the nodes are flushed.
    pub(super) fn nbd_shutdown(&self) {
        if let Some(server) = lock(&self.nbd).take() {
            drop(server.stop());
        }
    }
}
