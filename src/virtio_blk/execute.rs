//! Executing a parsed request on the export's BlockBackend.

use super::request::{write_id, Request, RequestKind, Status};
use crate::block::{BlockBackend, BlockError};

/// Which error policy a failure falls under (QEMU's rerror / werror).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoDirection {
    Read,
    Write,
}

/// What running a request came to.
#[derive(Debug)]
pub enum Outcome {
    Done(Status),
    /// The storage failed (not the request): the export's error policy
    /// decides what the guest sees.
    Failed {
        direction: IoDirection,
        error: BlockError,
    },
}

fn outcome(r: Result<(), BlockError>, direction: IoDirection) -> Outcome {
    match r {
        Ok(()) => Outcome::Done(Status::Ok),
        // Requests the parser let through but the block layer refuses are
        // the guest's doing, not the storage's: no policy applies.
        // An inactive node (live migration: the other daemon owns the
        // image) fails writes with an I/O error, whatever the policy.
        Err(
            e @ (BlockError::OutOfRange { .. }
            | BlockError::ReadOnly { .. }
            | BlockError::Inactive { .. }),
        ) => {
            log::debug!("request refused: {e}");
            Outcome::Done(Status::IoErr)
        }
        Err(error) => {
            log::debug!("request failed: {error}");
            Outcome::Failed { direction, error }
        }
    }
}

/// Runs `req` once.
pub async fn execute(req: &Request, blk: &BlockBackend, serial: &[u8]) -> Outcome {
    use IoDirection::{Read, Write};
    match &req.kind {
        RequestKind::Read { offset, data } => outcome(blk.preadv(*offset, data).await, Read),
        RequestKind::Write { offset, data } => outcome(blk.pwritev(*offset, data).await, Write),
        RequestKind::Flush => outcome(blk.flush().await, Write),
        RequestKind::GetId { data } => match write_id(&req.mem, data, serial) {
            Ok(()) => Outcome::Done(Status::Ok),
            Err(_) => Outcome::Done(Status::IoErr),
        },
        RequestKind::Discard { ranges } => {
            for r in ranges {
                if let Err(e) = blk.pdiscard(r.offset, r.len).await {
                    return outcome(Err(e), Write);
                }
            }
            Outcome::Done(Status::Ok)
        }
        RequestKind::WriteZeroes { ranges } => {
            for r in ranges {
                if let Err(e) = blk.pwrite_zeroes(r.offset, r.len, r.unmap).await {
                    return outcome(Err(e), Write);
                }
            }
            Outcome::Done(Status::Ok)
        }
    }
}
