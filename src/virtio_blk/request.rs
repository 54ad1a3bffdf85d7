//! Parsing a descriptor chain into a virtio-blk request.
//!
//! VERSION_1 implies ANY_LAYOUT: the driver may split or merge the header,
//! data and status across descriptors however it likes. So the chain is read
//! as two byte streams, as QEMU does:
//!
//! ```text
//!   readable descriptors:  [ header (16) | data for OUT, or ranges ]
//!   writable descriptors:  [ data for IN / GET_ID          | status ]
//! ```
//!
//! Every check on guest input happens here, once, with checked arithmetic.
//! A chain that fails them becomes [`Parsed::Failed`]: it still goes back to
//! the used ring, with IOERR or UNSUPP in its status byte when the chain has a
//! writable byte to hold it.

use virtio_bindings::virtio_blk::*;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::config::{DeviceParams, SECTOR};
use super::guest::{self, GuestMem, MemGuard, Segment};
use smallvec::SmallVec;

use crate::io::{IoVecList, IoVecs, Owner};

/// Length of the request header (type, reserved, sector).
pub const HEADER_SIZE: u64 = 16;
/// Length of one discard / write-zeroes range.
pub const RANGE_SIZE: u64 = 16;

/// A request's status byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    Ok = VIRTIO_BLK_S_OK as u8,
    IoErr = VIRTIO_BLK_S_IOERR as u8,
    Unsupp = VIRTIO_BLK_S_UNSUPP as u8,
}

/// The segments of a chain's readable or writable stream. A typical chain
/// has a header, one or two data buffers and a status byte: no allocation.
type Segs = SmallVec<[Segment; 4]>;

/// One range of a discard or write-zeroes request, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    pub offset: u64,
    pub len: u64,
    pub unmap: bool,
}

#[derive(Debug)]
pub enum RequestKind {
    Read { offset: u64, data: IoVecs },
    Write { offset: u64, data: IoVecs },
    Flush,
    GetId { data: Vec<Segment> },
    Discard { ranges: Vec<Range> },
    WriteZeroes { ranges: Vec<Range> },
}

/// A valid request, ready to execute.
pub struct Request {
    pub head: u16,
    pub kind: RequestKind,
    /// Where the status byte goes.
    pub status: GuestAddress,
    /// Bytes the device writes into the chain on success, status included.
    pub used_len: u32,
    /// Keeps the memory the request points into mapped.
    pub mem: MemGuard,
}

/// What the guest got wrong. Logged at debug level only: a guest must not be
/// able to flood the log.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("chain has no writable byte for the status")]
    NoStatus,
    #[error("readable descriptor after a writable one")]
    ReadableAfterWritable,
    #[error("header needs {HEADER_SIZE} readable bytes, chain has {0}")]
    ShortHeader(u64),
    #[error("buffer at {addr:#x} length {len} is not in guest memory")]
    BadBuffer { addr: u64, len: u64 },
    #[error("{count} data segments exceed seg_max {max}")]
    TooManySegments { count: usize, max: u32 },
    #[error("segment of {len} bytes exceeds size_max {max}")]
    SegmentTooLarge { len: u64, max: u32 },
    #[error("sector {sector} length {len} is beyond the capacity ({capacity} bytes)")]
    OutOfRange {
        sector: u64,
        len: u64,
        capacity: u64,
    },
    #[error("sector {sector} length {len} is not aligned to the logical block size {lbs}")]
    Misaligned { sector: u64, len: u64, lbs: u32 },
    #[error("write to a read-only device")]
    ReadOnly,
    #[error("unsupported request type {0}")]
    UnsupportedType(u32),
    #[error("{0} bytes of ranges is not a whole number of 16-byte ranges, or is none")]
    BadRangeList(u64),
    #[error("{count} ranges exceed the limit of {max}")]
    TooManyRanges { count: u64, max: u32 },
    #[error("range flags {flags:#x} are not supported")]
    BadRangeFlags { flags: u32 },
    #[error("range of {sectors} sectors exceeds the limit of {max}")]
    RangeTooLarge { sectors: u32, max: u32 },
    #[error("data of {0} bytes exceeds what one request may carry")]
    TooLong(u64),
}

impl ParseError {
    pub fn status(&self) -> Status {
        match self {
            ParseError::UnsupportedType(_) | ParseError::BadRangeFlags { .. } => Status::Unsupp,
            _ => Status::IoErr,
        }
    }
}

/// The result of parsing one chain.
pub enum Parsed {
    Request(Request),
    Failed {
        head: u16,
        /// Where to write the status, if the chain has a writable byte.
        status: Option<GuestAddress>,
        error: ParseError,
        mem: MemGuard,
    },
}

/// What the device advertises, against which requests are checked.
pub type Limits = DeviceParams;

/// Largest data transfer of one request: the kernel's limit on one readv.
const MAX_TRANSFER: u64 = i32::MAX as u64 & !4095;

/// Parses the chain at `head` of a queue of `queue_size` whose descriptor
/// table is at `table`. `mem` must be the memory snapshot the chain was
/// popped with.
pub fn parse(mem: MemGuard, table: u64, queue_size: u16, head: u16, limits: &Limits) -> Parsed {
    // A typical chain is header, one or two data buffers, status.
    let mut readable = Segs::new();
    let mut writable = Segs::new();
    let mut order_ok = true;
    guest::walk_chain(&mem, table, queue_size, head, |seg, write| {
        if write {
            writable.push(seg);
        } else {
            if !writable.is_empty() {
                order_ok = false;
            }
            readable.push(seg);
        }
    });
    let status = status_location(&mem, &writable);
    let fail = |error| Parsed::Failed {
        head,
        status,
        error,
        mem: mem.clone(),
    };
    let Some(status_addr) = status else {
        return fail(ParseError::NoStatus);
    };
    if !order_ok {
        return fail(ParseError::ReadableAfterWritable);
    }
    match parse_body(&mem, &readable, &writable, limits) {
        Ok((kind, used_len)) => Parsed::Request(Request {
            head,
            kind,
            status: status_addr,
            used_len,
            mem,
        }),
        Err(e) => fail(e),
    }
}

/// The last byte of the writable stream, if it is in guest memory.
fn status_location(mem: &GuestMem, writable: &[Segment]) -> Option<GuestAddress> {
    let last = writable.iter().rev().find(|s| s.len > 0)?;
    let addr = last.addr.0.checked_add(last.len - 1)?;
    guest::host_range(mem, GuestAddress(addr), 1).map(|_| GuestAddress(addr))
}

fn total(segs: &[Segment]) -> u64 {
    segs.iter().map(|s| s.len).fold(0u64, u64::saturating_add)
}

/// The part of a byte stream from `skip` bytes in, dropping `drop_back`
/// bytes at the end.
fn sub_stream(segs: &[Segment], mut skip: u64, drop_back: u64) -> Segs {
    let mut left = total(segs).saturating_sub(skip).saturating_sub(drop_back);
    let mut out = Segs::new();
    for s in segs {
        if left == 0 {
            break;
        }
        if skip >= s.len {
            skip -= s.len;
            continue;
        }
        let len = (s.len - skip).min(left);
        if len > 0 {
            out.push(Segment {
                // In range: skip < s.len and the descriptor address plus its
                // length was accepted by the memory check or fails it later.
                addr: GuestAddress(s.addr.0.wrapping_add(skip)),
                len,
            });
        }
        left -= len;
        skip = 0;
    }
    out
}

/// Reads `buf.len()` bytes starting `offset` bytes into the stream.
fn read_stream(
    mem: &GuestMem,
    segs: &[Segment],
    offset: u64,
    buf: &mut [u8],
) -> Result<(), ParseError> {
    let mut done = 0usize;
    for s in sub_stream(segs, offset, 0) {
        if done == buf.len() {
            break;
        }
        let n = (s.len as usize).min(buf.len() - done);
        if !guest::read(mem, s.addr, &mut buf[done..done + n]) {
            return Err(ParseError::BadBuffer {
                addr: s.addr.0,
                len: s.len,
            });
        }
        done += n;
    }
    if done == buf.len() {
        Ok(())
    } else {
        Err(ParseError::ShortHeader(done as u64))
    }
}

/// Translates data segments into host iovecs, checking each lies in guest
/// memory (a segment may span adjacent memory regions).
fn to_iovecs(mem: &MemGuard, segs: &[Segment], limits: &Limits) -> Result<IoVecs, ParseError> {
    if segs.len() > limits.seg_max as usize {
        return Err(ParseError::TooManySegments {
            count: segs.len(),
            max: limits.seg_max,
        });
    }
    let mut iov = IoVecList::with_capacity(segs.len());
    for s in segs {
        if s.len > u64::from(limits.size_max) {
            return Err(ParseError::SegmentTooLarge {
                len: s.len,
                max: limits.size_max,
            });
        }
        // One region (nearly always): one iovec.
        if let Some(p) = guest::host_range(mem, s.addr, s.len) {
            iov.push(libc::iovec {
                iov_base: p.cast(),
                iov_len: s.len as usize,
            });
            continue;
        }
        let bad = ParseError::BadBuffer {
            addr: s.addr.0,
            len: s.len,
        };
        let mut covered = 0u64;
        for slice in mem.get_slices(s.addr, s.len as usize) {
            let slice = slice.map_err(|_| bad.clone())?;
            covered += slice.len() as u64;
            iov.push(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: slice.len(),
            });
        }
        if covered != s.len {
            return Err(bad);
        }
    }
    // SAFETY: each iovec was produced by host_range or from a VolatileSlice
    // of `mem`, a snapshot of guest memory whose mappings stay in place while
    // the guard lives; the IoVecs owns a clone of that guard.
    Ok(unsafe { IoVecs::from_raw(iov, Owner::Guest(mem.clone())) })
}

fn check_rw(sector: u64, len: u64, limits: &Limits) -> Result<u64, ParseError> {
    let out_of_range = ParseError::OutOfRange {
        sector,
        len,
        capacity: limits.capacity_bytes,
    };
    let offset = sector.checked_mul(SECTOR).ok_or(out_of_range.clone())?;
    let end = offset.checked_add(len).ok_or(out_of_range.clone())?;
    let lbs = u64::from(limits.logical_block_size);
    if offset % lbs != 0 || len % lbs != 0 {
        return Err(ParseError::Misaligned {
            sector,
            len,
            lbs: limits.logical_block_size,
        });
    }
    if end > limits.capacity_bytes {
        return Err(out_of_range);
    }
    if len > MAX_TRANSFER {
        return Err(ParseError::TooLong(len));
    }
    Ok(offset)
}

fn parse_ranges(
    mem: &GuestMem,
    segs: &[Segment],
    limits: &Limits,
    write_zeroes: bool,
) -> Result<Vec<Range>, ParseError> {
    let bytes = total(segs);
    if bytes == 0 || bytes % RANGE_SIZE != 0 {
        return Err(ParseError::BadRangeList(bytes));
    }
    let count = bytes / RANGE_SIZE;
    let (max_seg, max_sectors) = if write_zeroes {
        (limits.max_write_zeroes_seg, limits.max_write_zeroes_sectors)
    } else {
        (limits.max_discard_seg, limits.max_discard_sectors)
    };
    if count > u64::from(max_seg) {
        return Err(ParseError::TooManyRanges {
            count,
            max: max_seg,
        });
    }
    let mut ranges = Vec::with_capacity(count as usize);
    for i in 0..count {
        let mut raw = [0u8; RANGE_SIZE as usize];
        read_stream(mem, segs, i * RANGE_SIZE, &mut raw)?;
        let sector = u64::from_le_bytes(raw[0..8].try_into().expect("8 bytes"));
        let sectors = u32::from_le_bytes(raw[8..12].try_into().expect("4 bytes"));
        let flags = u32::from_le_bytes(raw[12..16].try_into().expect("4 bytes"));
        // Unknown flags, or UNMAP on a discard, are unsupported (virtio 1.2,
        // 5.2.6.2); too large or out of range is an I/O error.
        let allowed = if write_zeroes {
            VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
        } else {
            0
        };
        if flags & !allowed != 0 {
            return Err(ParseError::BadRangeFlags { flags });
        }
        if sectors > max_sectors {
            return Err(ParseError::RangeTooLarge {
                sectors,
                max: max_sectors,
            });
        }
        let len = u64::from(sectors) * SECTOR;
        let offset = check_rw(sector, len, limits)?;
        ranges.push(Range {
            offset,
            len,
            unmap: flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
        });
    }
    Ok(ranges)
}

fn parse_body(
    mem: &MemGuard,
    readable: &[Segment],
    writable: &[Segment],
    limits: &Limits,
) -> Result<(RequestKind, u32), ParseError> {
    let mut header = [0u8; HEADER_SIZE as usize];
    let readable_len = total(readable);
    if readable_len < HEADER_SIZE {
        return Err(ParseError::ShortHeader(readable_len));
    }
    read_stream(mem, readable, 0, &mut header)?;
    let req_type = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
    let sector = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
    let out_data = || sub_stream(readable, HEADER_SIZE, 0);
    let in_data = || sub_stream(writable, 0, 1);
    match req_type {
        VIRTIO_BLK_T_IN => {
            let segs = in_data();
            let len = total(&segs);
            let offset = check_rw(sector, len, limits)?;
            let data = to_iovecs(mem, &segs, limits)?;
            let used = u32::try_from(len + 1).map_err(|_| ParseError::TooLong(len))?;
            Ok((RequestKind::Read { offset, data }, used))
        }
        VIRTIO_BLK_T_OUT => {
            if limits.read_only {
                return Err(ParseError::ReadOnly);
            }
            let segs = out_data();
            let offset = check_rw(sector, total(&segs), limits)?;
            let data = to_iovecs(mem, &segs, limits)?;
            Ok((RequestKind::Write { offset, data }, 1))
        }
        VIRTIO_BLK_T_FLUSH => Ok((RequestKind::Flush, 1)),
        VIRTIO_BLK_T_GET_ID => {
            let segs = in_data();
            let len = total(&segs).min(u64::from(VIRTIO_BLK_ID_BYTES));
            let data = sub_stream(&segs, 0, total(&segs) - len);
            for s in &data {
                if !mem.check_range(s.addr, s.len as usize) {
                    return Err(ParseError::BadBuffer {
                        addr: s.addr.0,
                        len: s.len,
                    });
                }
            }
            Ok((
                RequestKind::GetId {
                    data: data.to_vec(),
                },
                len as u32 + 1,
            ))
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            let wz = req_type == VIRTIO_BLK_T_WRITE_ZEROES;
            let ranges = parse_ranges(mem, &out_data(), limits, wz)?;
            if limits.read_only {
                return Err(ParseError::ReadOnly);
            }
            let kind = if wz {
                RequestKind::WriteZeroes { ranges }
            } else {
                RequestKind::Discard { ranges }
            };
            Ok((kind, 1))
        }
        other => Err(ParseError::UnsupportedType(other)),
    }
}

/// Writes the GET_ID answer: the serial, NUL-padded, cut to the buffer.
pub fn write_id(mem: &GuestMem, data: &[Segment], serial: &[u8]) -> Result<(), ParseError> {
    let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
    let n = serial.len().min(id.len());
    id[..n].copy_from_slice(&serial[..n]);
    let mut done = 0usize;
    for s in data {
        let n = s.len as usize;
        mem.write_slice(&id[done..done + n], s.addr)
            .map_err(|_| ParseError::BadBuffer {
                addr: s.addr.0,
                len: s.len,
            })?;
        done += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(addr: u64, len: u64) -> Segment {
        Segment {
            addr: GuestAddress(addr),
            len,
        }
    }

    #[test]
    fn sub_stream_splits_across_segments() {
        let segs = [seg(0x1000, 10), seg(0x2000, 10)];
        assert_eq!(
            sub_stream(&segs, 5, 0).to_vec(),
            vec![seg(0x1005, 5), seg(0x2000, 10)]
        );
        assert_eq!(sub_stream(&segs, 12, 1).to_vec(), vec![seg(0x2002, 7)]);
        assert_eq!(sub_stream(&segs, 0, 15).to_vec(), vec![seg(0x1000, 5)]);
        assert!(sub_stream(&segs, 30, 0).is_empty());
    }

    fn limits() -> Limits {
        Limits {
            capacity_bytes: 1 << 20,
            logical_block_size: 512,
            physical_block_size: 512,
            num_queues: 1,
            write_zeroes_may_unmap: true,
            seg_max: 8,
            size_max: 1 << 16,
            max_discard_sectors: 64,
            max_discard_seg: 2,
            max_write_zeroes_sectors: 64,
            max_write_zeroes_seg: 2,
            read_only: false,
        }
    }

    #[test]
    fn sector_near_u64_max_is_out_of_range_not_overflow() {
        let l = limits();
        assert!(matches!(
            check_rw(u64::MAX, 512, &l),
            Err(ParseError::OutOfRange { .. })
        ));
        assert!(matches!(
            check_rw(u64::MAX / 512, 4096, &l),
            Err(ParseError::OutOfRange { .. })
        ));
    }

    #[test]
    fn request_ending_exactly_at_capacity_is_accepted() {
        let l = limits();
        assert_eq!(check_rw((1 << 20) / 512 - 1, 512, &l), Ok((1 << 20) - 512));
        assert!(check_rw((1 << 20) / 512, 512, &l).is_err());
        assert!(check_rw((1 << 20) / 512, 0, &l).is_ok());
    }

    #[test]
    fn misaligned_request_on_4k_device_is_rejected() {
        let mut l = limits();
        l.logical_block_size = 4096;
        assert!(matches!(
            check_rw(1, 4096, &l),
            Err(ParseError::Misaligned { .. })
        ));
        assert!(matches!(
            check_rw(8, 512, &l),
            Err(ParseError::Misaligned { .. })
        ));
        assert_eq!(check_rw(8, 4096, &l), Ok(4096));
    }
}
