//! The `VhostUserBackend` implementation of one connection: features,
//! config space, drain on GET_VRING_BASE / RESET_DEVICE, memory updates;
//! queue events go to the iothread (worker.rs).

use std::fs::File;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use vhost::vhost_user::message::{VhostUserInflight, VhostUserLog, VhostUserProtocolFeatures};
use vhost::vhost_user::Backend;
use vhost_user_backend::VhostUserBackend;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use super::connection::{VhostUserBlk, Vring, DRAIN_TIMEOUT};
use super::dirty_log::{DirtyLog, VHOST_F_LOG_ALL};
use super::inflight::Region;
use super::notify::ConfigNotifier;
use super::worker;
use crate::config::ExportConfig;
use crate::virtio_blk::{self, GuestMem, WRITEBACK_OFFSET};
use std::os::unix::ffi::OsStrExt;

/// The device config space a frontend may read or write: 256 bytes, QEMU's
/// VHOST_USER_MAX_CONFIG_SIZE (virtio_blk_config has 60 of them).
const CONFIG_SPACE_MAX: u64 = 256;

/// Set in the environment, SET_LOG_BASE is accepted but the log is never
/// marked: dirty logging deliberately broken, to show that the migration
/// test fails without it.
const BREAK_DIRTY_LOG_ENV: &str = "VUB_DEBUG_BREAK_DIRTY_LOG";

/// A memory table beyond the export's limits.
#[derive(Debug, thiserror::Error)]
pub(super) enum LimitError {
    #[error("{count} guest memory regions exceed the export's max-mem-regions ({max})")]
    Regions { count: usize, max: u64 },
    #[error("{total} bytes of guest memory exceed the export's max-guest-memory ({max})")]
    Memory { total: u64, max: u64 },
}

/// Checks a memory table (after SET_MEM_TABLE or ADD_MEM_REG) against the
/// export's `max-mem-regions` and `max-guest-memory`.
pub(super) fn check_limits(mem: &GuestMem, c: &ExportConfig) -> Result<(), LimitError> {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    let count = mem.num_regions();
    if count as u64 > c.max_mem_regions {
        return Err(LimitError::Regions {
            count,
            max: c.max_mem_regions,
        });
    }
    let total = mem.iter().fold(0u64, |sum, r| sum.saturating_add(r.len()));
    if total > c.max_guest_memory {
        return Err(LimitError::Memory {
            total,
            max: c.max_guest_memory,
        });
    }
    Ok(())
}

impl VhostUserBackend for VhostUserBlk {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        usize::from(self.export.config.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.export.config.queue_size)
    }

    fn max_mem_slots(&self) -> u64 {
        self.export.config.max_mem_regions
    }

    fn features(&self) -> u64 {
        virtio_blk::device_features(self.export.read_only())
            | vhost::vhost_user::message::VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            | VHOST_F_LOG_ALL
    }

    fn acked_features(&self, features: u64) {
        self.dirty.set_features(features);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::RESET_DEVICE
            | VhostUserProtocolFeatures::BACKEND_REQ
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
            | VhostUserProtocolFeatures::LOG_SHMFD
    }

    fn own_dirty_log(&self) -> bool {
        true
    }

    fn set_dirty_log(&self, msg: &VhostUserLog, file: File) -> io::Result<()> {
        let log = DirtyLog::map(&file, msg.mmap_size, msg.mmap_offset).map_err(|e| {
            log::warn!("export {}: {e}", self.export.config.id);
            io::Error::from(e)
        })?;
        log::debug!(
            "export {}: dirty log of {} bytes set",
            self.export.config.id,
            msg.mmap_size
        );
        if std::env::var_os(BREAK_DIRTY_LOG_ENV).is_some() {
            // Test teeth only (tests/guest/migrate.sh --break-dirty-log):
            // the frontend believes pages are logged, none are.
            log::warn!(
                "export {}: {BREAK_DIRTY_LOG_ENV} is set: the dirty log is never marked",
                self.export.config.id
            );
            return Ok(());
        }
        self.dirty.set_log(log);
        Ok(())
    }

    fn set_log_fd(&self, file: File) -> io::Result<()> {
        log::debug!("export {}: dirty log eventfd set", self.export.config.id);
        self.dirty.set_kick(file);
        Ok(())
    }

    fn set_vring_log_addr(&self, index: u32, addr: Option<u64>) {
        self.dirty.set_used_log(index, addr);
    }

    fn get_inflight_fd(&self, msg: &VhostUserInflight) -> io::Result<(VhostUserInflight, File)> {
        let c = &self.export.config;
        let (region, reply) = Region::create(msg, c.num_queues, c.queue_size).map_err(|e| {
            log::warn!("export {}: GET_INFLIGHT_FD refused: {e}", c.id);
            io::Error::from(e)
        })?;
        let file = region.file().try_clone()?;
        log::debug!(
            "export {}: inflight buffer of {} bytes for {} queues of {}",
            c.id,
            reply.mmap_size,
            reply.num_queues,
            reply.queue_size
        );
        self.set_inflight(region);
        Ok((reply, file))
    }

    fn set_inflight_fd(&self, msg: &VhostUserInflight, file: File) -> io::Result<()> {
        let c = &self.export.config;
        let region = Region::open(msg, file, c.num_queues, c.queue_size).map_err(|e| {
            log::warn!("export {}: SET_INFLIGHT_FD refused: {e}", c.id);
            io::Error::from(e)
        })?;
        self.set_inflight(region);
        Ok(())
    }

    fn reset_device(&self) {
        // The library has unregistered every kick; wait for what was popped.
        self.drain_all();
        self.export
            .blk
            .set_write_cache(self.export.default_writeback());
        log::debug!("export {}: device reset", self.export.config.id);
    }

    fn set_event_idx(&self, _enabled: bool) {
        // The library sets EVENT_IDX on each vring; the worker reads it there.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        if u64::from(offset) + u64::from(size) > CONFIG_SPACE_MAX {
            // QEMU never asks for more (VHOST_USER_MAX_CONFIG_SIZE).
            self.end_connection(&format!(
                "GET_CONFIG of {size} bytes at offset {offset} is beyond the \
                 {CONFIG_SPACE_MAX}-byte config space"
            ));
        }
        // An empty reply tells the frontend the read failed.
        self.config().read(offset, size).unwrap_or_default()
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        if offset as usize == WRITEBACK_OFFSET && buf.len() == 1 {
            self.set_writeback(buf[0] != 0);
            return Ok(());
        }
        // The error ends the connection; its text goes to the log.
        let end = u64::from(offset).saturating_add(buf.len() as u64);
        Err(if end > CONFIG_SPACE_MAX {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "SET_CONFIG of {} bytes at offset {offset} is beyond the \
                     {CONFIG_SPACE_MAX}-byte config space",
                    buf.len()
                ),
            )
        } else {
            io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "SET_CONFIG of {} bytes at offset {offset} refused: only the writeback \
                     byte (offset {WRITEBACK_OFFSET}, 1 byte) is writable",
                    buf.len()
                ),
            )
        })
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMem>) -> io::Result<()> {
        // Requests hold a snapshot (an Arc) of the memory they were parsed
        // against, so old mappings live until those requests complete.
        let mut mapped = self.mapped.lock().unwrap_or_else(|e| e.into_inner());
        let new = mem.memory();
        // Over a limit, nothing of the new table is registered: it is
        // unmapped as soon as the old one is back.
        let checked = match check_limits(&new, &self.export.config) {
            Ok(()) => mapped.add(&new).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        drop(new);
        let mut accepted = self.accepted.lock().unwrap_or_else(|e| e.into_inner());
        let result = match checked {
            Ok(()) => {
                *accepted = Some((*mem.memory()).clone());
                Ok(())
            }
            Err(e) => {
                // The library put the new table in place already (the rings
                // see it too): put the last good one back. The frontend gets
                // a failure and the connection ends.
                log::warn!(
                    "export {}: {e}; memory update refused",
                    self.export.config.id
                );
                let good = accepted.clone().unwrap_or_default();
                mem.lock().unwrap_or_else(|e| e.into_inner()).replace(good);
                Err(io::Error::new(io::ErrorKind::InvalidInput, e))
            }
        };
        *self.mem.write().unwrap_or_else(|e| e.into_inner()) = Some(mem);
        // The iothreads take a new snapshot at their next look; a chain the
        // frontend publishes after our answer is read after this.
        self.mem_gen.fetch_add(1, Ordering::Release);
        self.wake_iothreads();
        mapped.sweep();
        result
    }

    fn set_backend_req_fd(&self, backend: Backend) {
        *self.backend_req.lock().unwrap_or_else(|e| e.into_inner()) = Some(backend);
        let name = self
            .export
            .listener_name
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let notifier = ConfigNotifier::find(std::ffi::OsStr::from_bytes(&name)).map(Arc::new);
        self.export.set_notifier(notifier);
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        self.export.queues_per_thread()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // GET_VRING_BASE: the ring is no longer ready, so nothing new is
        // popped; answer once what was popped is back on the used ring.
        if let Some(c) = self.queues.get(queue_index as usize) {
            if c.get() > 0 && self.export.is_stopped() {
                self.export.abort_parked();
            }
            if !self
                .export
                .with_throttling_off(|| c.wait_idle(DRAIN_TIMEOUT))
            {
                log::error!(
                    "export {}: queue {queue_index} stopped with {} requests still in flight",
                    self.export.config.id,
                    c.get()
                );
            }
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        // The library started this thread: it takes the iothread filter
        // at its first event (until then it has its creator's).
        crate::sandbox::enter_foreign(crate::sandbox::Class::Iothread);
        // x-blockdev-set-iothread (iothread.rs) asks before it wakes us;
        // asked after this first look, its wake-up may be the one this
        // event consumes: so look again after it.
        if !self.moves.must_retire(thread_id, worker::idle) {
            super::threads::on_event(&self.export.threads, thread_id);
            worker::handle_event(self, device_event, vrings, thread_id);
            if !self.moves.must_retire(thread_id, worker::idle) {
                // Never return an error otherwise: the library would end
                // the worker thread.
                return Ok(());
            }
        }
        // A new thread takes over. The error ends the library's loop, and
        // this thread.
        worker::retire();
        self.moves.retired(thread_id);
        Err(io::Error::other("moved to another iothread"))
    }
}
