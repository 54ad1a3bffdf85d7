//! What only the server needs of the wire format, on top of proto.rs
//! (the NBD client's, shared): QEMU's metadata context names, the largest
//! payload, and reply headers as byte arrays.

use crate::nbd::proto::{OptionReply, ReplyHeader};

pub const CONTEXT_ALLOCATION_DEPTH: &str = "qemu:allocation-depth";
pub const CONTEXT_DIRTY_BITMAP_PREFIX: &str = "qemu:dirty-bitmap:";
/// The largest READ/WRITE payload we accept (QEMU's NBD_MAX_BUFFER_SIZE).
pub const MAX_BUFFER: u32 = 32 << 20;

pub fn simple_reply(error: u32, cookie: u64) -> Vec<u8> {
    ReplyHeader::Simple { error, cookie }.encode()
}

pub fn chunk_header(flags: u16, typ: u16, cookie: u64, length: u32) -> Vec<u8> {
    ReplyHeader::Chunk {
        flags,
        typ,
        cookie,
        length,
    }
    .encode()
}

pub fn option_reply_header(option: u32, typ: u32, length: u32) -> [u8; 20] {
    OptionReply {
        option,
        typ,
        length,
    }
    .encode()
}
