//! The NBD wire format (NetworkBlockDevice/nbd doc/proto.md): magics,
//! option, command, reply and flag numbers, and the fixed-size headers
//! encoded and decoded. A leaf: no I/O, nothing of the client, so a server
//! can use it as well.
//!
//! Every decoder takes the bytes of one fixed-size header and checks its
//! magic; the variable parts (option data, chunk payloads) are parsed by
//! the `parse_*` helpers, which refuse short or inconsistent input with a
//! [`ProtoError`] instead of reading past it.

/// "NBDMAGIC": the first 8 bytes a server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": newstyle negotiation; also the magic of every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// The magic of an option reply.
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Oldstyle negotiation (refused by the client).
pub const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;

pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags (server, 16 bits).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flags (32 bits).
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

/// Option reply types; errors have bit 31 set.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_FLAG_ERROR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
pub const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR | 4;
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR | 7;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR | 8;
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;

/// NBD_OPT_INFO / NBD_OPT_GO information types.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flags (16 bits).
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const FLAG_SEND_FUA: u16 = 1 << 3;
pub const FLAG_ROTATIONAL: u16 = 1 << 4;
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const FLAG_SEND_DF: u16 = 1 << 7;
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const FLAG_SEND_RESIZE: u16 = 1 << 9;
pub const FLAG_SEND_CACHE: u16 = 1 << 10;
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

/// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

/// Structured reply flags and chunk types.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) | 2;

/// Whether a chunk type is an error chunk (bit 15).
pub const fn reply_type_is_error(t: u16) -> bool {
    t & (1 << 15) != 0
}

/// Errors on the wire (their numbers are fixed by the protocol, not the
/// platform's errno values, though Linux's agree).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// base:allocation block status flags.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;
/// qemu:dirty-bitmap:NAME: the area is dirty.
pub const STATE_DIRTY: u32 = 1 << 0;

pub const CONTEXT_BASE_ALLOCATION: &str = "base:allocation";

/// Sizes of the fixed headers.
pub const REQUEST_LEN: usize = 28;
pub const SIMPLE_REPLY_LEN: usize = 16;
pub const STRUCTURED_REPLY_LEN: usize = 20;
pub const OPTION_HEADER_LEN: usize = 16;
pub const OPTION_REPLY_HEADER_LEN: usize = 20;

/// The longest string (export name, context name, error message) the
/// protocol allows.
pub const MAX_STRING: usize = 4096;

/// A malformed message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("bad magic {0:#x}")]
    BadMagic(u64),
    #[error("{what}: {len} bytes where {need} are needed")]
    Short {
        what: &'static str,
        len: usize,
        need: usize,
    },
    #[error("{0}")]
    Invalid(String),
}

/// The errno a wire error number stands for (unknown numbers are EINVAL,
/// as the protocol says).
pub fn errno_from_wire(e: u32) -> i32 {
    match e {
        EPERM => libc::EPERM,
        EIO => libc::EIO,
        ENOMEM => libc::ENOMEM,
        EINVAL => libc::EINVAL,
        ENOSPC => libc::ENOSPC,
        EOVERFLOW => libc::EOVERFLOW,
        ENOTSUP => libc::ENOTSUP,
        ESHUTDOWN => libc::ESHUTDOWN,
        _ => libc::EINVAL,
    }
}

/// The wire error number for an errno (a server's answer).
pub fn errno_to_wire(e: i32) -> u32 {
    match e {
        libc::EPERM | libc::EROFS => EPERM,
        libc::EIO => EIO,
        libc::ENOMEM => ENOMEM,
        libc::ENOSPC | libc::EDQUOT | libc::EFBIG => ENOSPC,
        libc::EOVERFLOW => EOVERFLOW,
        libc::ENOTSUP => ENOTSUP,
        libc::ESHUTDOWN => ESHUTDOWN,
        _ => EINVAL,
    }
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

fn need(what: &'static str, b: &[u8], n: usize) -> Result<(), ProtoError> {
    if b.len() < n {
        return Err(ProtoError::Short {
            what,
            len: b.len(),
            need: n,
        });
    }
    Ok(())
}

/// A transmission-phase request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub typ: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

impl Request {
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.typ.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<Self, ProtoError> {
        need("request", b, REQUEST_LEN)?;
        let magic = be32(b, 0);
        if magic != REQUEST_MAGIC {
            return Err(ProtoError::BadMagic(magic.into()));
        }
        Ok(Request {
            flags: be16(b, 4),
            typ: be16(b, 6),
            cookie: be64(b, 8),
            offset: be64(b, 16),
            length: be32(b, 24),
        })
    }
}

/// A reply header: which kind is known from its first 4 bytes (the
/// magic), and how many bytes follow from [`ReplyHeader::header_len`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    Simple {
        error: u32,
        cookie: u64,
    },
    Chunk {
        flags: u16,
        typ: u16,
        cookie: u64,
        length: u32,
    },
}

impl ReplyHeader {
    /// The header length a reply starting with `magic` has.
    pub fn header_len(magic: u32) -> Result<usize, ProtoError> {
        match magic {
            SIMPLE_REPLY_MAGIC => Ok(SIMPLE_REPLY_LEN),
            STRUCTURED_REPLY_MAGIC => Ok(STRUCTURED_REPLY_LEN),
            m => Err(ProtoError::BadMagic(m.into())),
        }
    }

    pub fn decode(b: &[u8]) -> Result<Self, ProtoError> {
        need("reply", b, 4)?;
        let magic = be32(b, 0);
        let len = Self::header_len(magic)?;
        need("reply", b, len)?;
        Ok(match magic {
            SIMPLE_REPLY_MAGIC => ReplyHeader::Simple {
                error: be32(b, 4),
                cookie: be64(b, 8),
            },
            _ => ReplyHeader::Chunk {
                flags: be16(b, 4),
                typ: be16(b, 6),
                cookie: be64(b, 8),
                length: be32(b, 16),
            },
        })
    }

    pub fn cookie(&self) -> u64 {
        match self {
            ReplyHeader::Simple { cookie, .. } | ReplyHeader::Chunk { cookie, .. } => *cookie,
        }
    }

    /// Encodes the header (a server's reply).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(STRUCTURED_REPLY_LEN);
        match *self {
            ReplyHeader::Simple { error, cookie } => {
                b.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
                b.extend_from_slice(&error.to_be_bytes());
                b.extend_from_slice(&cookie.to_be_bytes());
            }
            ReplyHeader::Chunk {
                flags,
                typ,
                cookie,
                length,
            } => {
                b.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
                b.extend_from_slice(&flags.to_be_bytes());
                b.extend_from_slice(&typ.to_be_bytes());
                b.extend_from_slice(&cookie.to_be_bytes());
                b.extend_from_slice(&length.to_be_bytes());
            }
        }
        b
    }
}

/// An option request's header (the data follows).
pub fn encode_option(opt: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(OPTION_HEADER_LEN + data.len());
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

/// An option reply's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReply {
    pub option: u32,
    pub typ: u32,
    pub length: u32,
}

impl OptionReply {
    pub fn decode(b: &[u8]) -> Result<Self, ProtoError> {
        need("option reply", b, OPTION_REPLY_HEADER_LEN)?;
        let magic = be64(b, 0);
        if magic != REPLY_MAGIC {
            return Err(ProtoError::BadMagic(magic));
        }
        Ok(OptionReply {
            option: be32(b, 8),
            typ: be32(b, 12),
            length: be32(b, 16),
        })
    }

    pub fn encode(&self) -> [u8; OPTION_REPLY_HEADER_LEN] {
        let mut b = [0u8; OPTION_REPLY_HEADER_LEN];
        b[0..8].copy_from_slice(&REPLY_MAGIC.to_be_bytes());
        b[8..12].copy_from_slice(&self.option.to_be_bytes());
        b[12..16].copy_from_slice(&self.typ.to_be_bytes());
        b[16..20].copy_from_slice(&self.length.to_be_bytes());
        b
    }

    pub fn is_error(&self) -> bool {
        self.typ & REP_FLAG_ERROR != 0
    }
}

/// The data of NBD_OPT_GO / NBD_OPT_INFO: the export name and the
/// information types asked for.
pub fn encode_go(export: &str, infos: &[u16]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&(export.len() as u32).to_be_bytes());
    b.extend_from_slice(export.as_bytes());
    b.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        b.extend_from_slice(&i.to_be_bytes());
    }
    b
}

/// The data of NBD_OPT_SET_META_CONTEXT / LIST_META_CONTEXT.
pub fn encode_meta_context(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&(export.len() as u32).to_be_bytes());
    b.extend_from_slice(export.as_bytes());
    b.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        b.extend_from_slice(&(q.len() as u32).to_be_bytes());
        b.extend_from_slice(q.as_bytes());
    }
    b
}

/// What an NBD_REP_INFO says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Info {
    Export {
        size: u64,
        flags: u16,
    },
    BlockSize {
        min: u32,
        preferred: u32,
        max: u32,
    },
    /// Types the client does not use (name, description, unknown).
    Other(u16),
}

pub fn parse_info(b: &[u8]) -> Result<Info, ProtoError> {
    need("info", b, 2)?;
    match be16(b, 0) {
        INFO_EXPORT => {
            if b.len() != 12 {
                return Err(ProtoError::Invalid(format!(
                    "NBD_INFO_EXPORT of {} bytes",
                    b.len()
                )));
            }
            Ok(Info::Export {
                size: be64(b, 2),
                flags: be16(b, 10),
            })
        }
        INFO_BLOCK_SIZE => {
            if b.len() != 14 {
                return Err(ProtoError::Invalid(format!(
                    "NBD_INFO_BLOCK_SIZE of {} bytes",
                    b.len()
                )));
            }
            let (min, preferred, max) = (be32(b, 2), be32(b, 6), be32(b, 10));
            if min == 0
                || !min.is_power_of_two()
                || min > 65536
                || !preferred.is_power_of_two()
                || preferred < min.max(512)
                || (max != u32::MAX && max % min != 0)
                || max < min
            {
                return Err(ProtoError::Invalid(format!(
                    "block sizes min {min} preferred {preferred} max {max} are inconsistent"
                )));
            }
            Ok(Info::BlockSize {
                min,
                preferred,
                max,
            })
        }
        t => Ok(Info::Other(t)),
    }
}

/// An NBD_REP_META_CONTEXT: the id the server gave a context, and its name.
pub fn parse_meta_context(b: &[u8]) -> Result<(u32, String), ProtoError> {
    need("meta context", b, 4)?;
    if b.len() - 4 > MAX_STRING {
        return Err(ProtoError::Invalid("meta context name too long".into()));
    }
    let name = String::from_utf8(b[4..].to_vec())
        .map_err(|_| ProtoError::Invalid("meta context name is not UTF-8".into()))?;
    Ok((be32(b, 0), name))
}

/// The export part of NBD_OPT_EXPORT_NAME's answer: size and flags (the
/// 124 zero bytes that may follow are the caller's).
pub fn parse_export_name_reply(b: &[u8]) -> Result<(u64, u16), ProtoError> {
    need("export name reply", b, 10)?;
    Ok((be64(b, 0), be16(b, 8)))
}

/// An OFFSET_DATA chunk's offset (its first 8 bytes; the data follows).
pub const OFFSET_DATA_HEADER_LEN: usize = 8;

pub fn parse_offset(b: &[u8]) -> Result<u64, ProtoError> {
    need("chunk offset", b, 8)?;
    Ok(be64(b, 0))
}

/// An OFFSET_HOLE chunk: offset and length of the hole.
pub fn parse_hole(b: &[u8]) -> Result<(u64, u32), ProtoError> {
    if b.len() != 12 {
        return Err(ProtoError::Invalid(format!(
            "OFFSET_HOLE chunk of {} bytes",
            b.len()
        )));
    }
    Ok((be64(b, 0), be32(b, 8)))
}

/// An error chunk: the error number, the message, and for ERROR_OFFSET
/// the offset it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorChunk {
    pub error: u32,
    pub message: String,
    pub offset: Option<u64>,
}

pub fn parse_error_chunk(typ: u16, b: &[u8]) -> Result<ErrorChunk, ProtoError> {
    need("error chunk", b, 6)?;
    let error = be32(b, 0);
    let mlen = usize::from(be16(b, 4));
    let rest = &b[6..];
    let extra = if typ == REPLY_TYPE_ERROR_OFFSET { 8 } else { 0 };
    if rest.len() != mlen + extra {
        return Err(ProtoError::Invalid(format!(
            "error chunk of {} bytes with a message of {mlen}",
            b.len()
        )));
    }
    if error == 0 {
        return Err(ProtoError::Invalid("error chunk with error 0".into()));
    }
    let message = String::from_utf8_lossy(&rest[..mlen]).into_owned();
    let offset = (extra != 0).then(|| be64(rest, mlen));
    Ok(ErrorChunk {
        error,
        message,
        offset,
    })
}

pub fn encode_error_chunk(error: u32, message: &str) -> Vec<u8> {
    let m = &message.as_bytes()[..message.len().min(MAX_STRING)];
    let mut b = Vec::with_capacity(6 + m.len());
    b.extend_from_slice(&error.to_be_bytes());
    b.extend_from_slice(&(m.len() as u16).to_be_bytes());
    b.extend_from_slice(m);
    b
}

/// One block status extent: its length and flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub length: u32,
    pub flags: u32,
}

/// A BLOCK_STATUS chunk: the context id and its extents.
pub fn parse_block_status(b: &[u8]) -> Result<(u32, Vec<Extent>), ProtoError> {
    need("block status chunk", b, 12)?;
    if (b.len() - 4) % 8 != 0 {
        return Err(ProtoError::Invalid(format!(
            "block status chunk of {} bytes",
            b.len()
        )));
    }
    let id = be32(b, 0);
    let extents = b[4..]
        .chunks_exact(8)
        .map(|e| Extent {
            length: be32(e, 0),
            flags: be32(e, 4),
        })
        .collect();
    Ok((id, extents))
}

pub fn encode_block_status(id: u32, extents: &[Extent]) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + extents.len() * 8);
    b.extend_from_slice(&id.to_be_bytes());
    for e in extents {
        b.extend_from_slice(&e.length.to_be_bytes());
        b.extend_from_slice(&e.flags.to_be_bytes());
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trips_and_checks_its_magic() {
        let r = Request {
            flags: CMD_FLAG_FUA,
            typ: CMD_WRITE,
            cookie: 0x0102_0304_0506_0708,
            offset: 1 << 40,
            length: 4096,
        };
        let b = r.encode();
        // The layout proto.md gives: magic, flags, type, cookie, offset, length.
        assert_eq!(&b[0..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(&b[4..8], &[0, 1, 0, 1]);
        assert_eq!(&b[8..16], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&b[24..28], &[0, 0, 0x10, 0]);
        assert_eq!(Request::decode(&b), Ok(r));
        let mut bad = b;
        bad[0] = 0;
        assert!(matches!(
            Request::decode(&bad),
            Err(ProtoError::BadMagic(_))
        ));
        assert!(matches!(
            Request::decode(&b[..27]),
            Err(ProtoError::Short { .. })
        ));
    }

    #[test]
    fn replies_of_both_kinds_decode() {
        let s = ReplyHeader::Simple {
            error: EIO,
            cookie: 7,
        };
        let b = s.encode();
        assert_eq!(b.len(), SIMPLE_REPLY_LEN);
        assert_eq!(ReplyHeader::decode(&b), Ok(s));
        let c = ReplyHeader::Chunk {
            flags: REPLY_FLAG_DONE,
            typ: REPLY_TYPE_OFFSET_DATA,
            cookie: 9,
            length: 4104,
        };
        let b = c.encode();
        assert_eq!(b.len(), STRUCTURED_REPLY_LEN);
        assert_eq!(&b[0..4], &[0x66, 0x8e, 0x33, 0xef]);
        assert_eq!(ReplyHeader::decode(&b), Ok(c));
        assert_eq!(c.cookie(), 9);
        assert!(ReplyHeader::decode(&b[..19]).is_err());
        assert!(ReplyHeader::header_len(0xdead_beef).is_err());
    }

    #[test]
    fn options_and_their_replies() {
        let go = encode_option(OPT_GO, &encode_go("disk", &[INFO_BLOCK_SIZE]));
        assert_eq!(&go[0..8], b"IHAVEOPT");
        assert_eq!(&go[8..12], &[0, 0, 0, 7]);
        assert_eq!(&go[12..16], &[0, 0, 0, 12]);
        assert_eq!(&go[16..20], &[0, 0, 0, 4]);
        assert_eq!(&go[20..24], b"disk");
        assert_eq!(&go[24..28], &[0, 1, 0, 3]);
        let r = OptionReply {
            option: OPT_GO,
            typ: REP_ERR_UNSUP,
            length: 0,
        };
        let d = OptionReply::decode(&r.encode()).unwrap();
        assert_eq!(d, r);
        assert!(d.is_error());
        let mc = encode_meta_context("", &["base:allocation"]);
        assert_eq!(mc.len(), 4 + 4 + 4 + 15);
    }

    #[test]
    fn info_is_checked() {
        let mut e = vec![0, 0];
        e.extend_from_slice(&(1u64 << 30).to_be_bytes());
        e.extend_from_slice(&(FLAG_HAS_FLAGS | FLAG_SEND_FLUSH).to_be_bytes());
        assert_eq!(
            parse_info(&e),
            Ok(Info::Export {
                size: 1 << 30,
                flags: 5
            })
        );
        assert!(parse_info(&e[..11]).is_err());
        let bs = |min: u32, pref: u32, max: u32| {
            let mut b = vec![0, 3];
            for v in [min, pref, max] {
                b.extend_from_slice(&v.to_be_bytes());
            }
            parse_info(&b)
        };
        assert_eq!(
            bs(512, 4096, 32 << 20),
            Ok(Info::BlockSize {
                min: 512,
                preferred: 4096,
                max: 32 << 20
            })
        );
        assert!(bs(0, 4096, 4096).is_err());
        assert!(bs(3, 4096, 4096).is_err());
        assert!(bs(4096, 4096, 512).is_err());
        assert!(parse_info(&[0, 9, 1]).is_ok_and(|i| i == Info::Other(9)));
    }

    #[test]
    fn chunks_are_checked() {
        assert_eq!(
            parse_hole(&[0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 2, 0]),
            Ok((512, 512))
        );
        assert!(parse_hole(&[0; 11]).is_err());
        let e = encode_error_chunk(EIO, "boom");
        let c = parse_error_chunk(REPLY_TYPE_ERROR, &e).unwrap();
        assert_eq!((c.error, c.message.as_str(), c.offset), (EIO, "boom", None));
        // A message length beyond the payload is refused, not read past.
        let mut bad = e.clone();
        bad[5] = 200;
        assert!(parse_error_chunk(REPLY_TYPE_ERROR, &bad).is_err());
        let mut eo = e.clone();
        eo.extend_from_slice(&4096u64.to_be_bytes());
        assert_eq!(
            parse_error_chunk(REPLY_TYPE_ERROR_OFFSET, &eo)
                .unwrap()
                .offset,
            Some(4096)
        );
        assert!(parse_error_chunk(REPLY_TYPE_ERROR, &encode_error_chunk(0, "")).is_err());
        assert!(reply_type_is_error(REPLY_TYPE_ERROR));
        assert!(!reply_type_is_error(REPLY_TYPE_OFFSET_HOLE));
        let ext = [
            Extent {
                length: 4096,
                flags: STATE_HOLE | STATE_ZERO,
            },
            Extent {
                length: 512,
                flags: 0,
            },
        ];
        let b = encode_block_status(3, &ext);
        assert_eq!(parse_block_status(&b), Ok((3, ext.to_vec())));
        assert!(parse_block_status(&b[..b.len() - 1]).is_err());
        assert!(parse_block_status(&b[..4]).is_err());
        assert_eq!(errno_from_wire(ENOSPC), libc::ENOSPC);
        assert_eq!(errno_from_wire(1234), libc::EINVAL);
        assert_eq!(errno_to_wire(libc::EROFS), EPERM);
    }
}
