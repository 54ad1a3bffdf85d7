//! Executing a parsed request on the export's BlockBackend.

use super::request::write_id;
use super::{Request, RequestKind, Status};
use crate::block::{BlockBackend, BlockError};

fn status_of(r: Result<(), BlockError>) -> Status {
    match r {
        Ok(()) => Status::Ok,
        Err(e) => {
            // Host-side failures are worth a warning, but a guest can trigger
            // them at will (e.g. by filling the disk): keep them at debug.
            log::debug!("request failed: {e}");
            Status::IoErr
        }
    }
}

/// Runs `req` and returns the status to report.
pub async fn execute(req: &Request, blk: &BlockBackend, serial: &[u8]) -> Status {
    match &req.kind {
        RequestKind::Read { offset, data } => status_of(blk.preadv(*offset, data).await),
        RequestKind::Write { offset, data } => status_of(blk.pwritev(*offset, data).await),
        RequestKind::Flush => status_of(blk.flush().await),
        RequestKind::GetId { data } => match write_id(&req.mem, data, serial) {
            Ok(()) => Status::Ok,
            Err(_) => Status::IoErr,
        },
        RequestKind::Discard { ranges } => {
            for r in ranges {
                if let Err(e) = blk.pdiscard(r.offset, r.len).await {
                    return status_of(Err(e));
                }
            }
            Status::Ok
        }
        RequestKind::WriteZeroes { ranges } => {
            for r in ranges {
                if let Err(e) = blk.pwrite_zeroes(r.offset, r.len, r.unmap).await {
                    return status_of(Err(e));
                }
            }
            Status::Ok
        }
    }
}
